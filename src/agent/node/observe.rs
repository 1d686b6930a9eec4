//! Observation: the local server, the group's keys and the lease, read into the `Snapshot`
//! `decide` takes; and the checks that need more than one reading (a forked history, etcd
//! content that cannot be trusted).

use super::*;

impl<H: Host> Node<H> {
    pub(super) async fn observe(&mut self) -> Snapshot {
        let server = self.observe_server().await;
        let data = match &server {
            Server::Stopped => match self.pg.controldata().await {
                Ok(Some(c)) => DataDir::Initialized {
                    was_primary: c.was_primary(),
                    sysid: c.sysid,
                },
                Ok(None) => DataDir::Empty,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read pg_control");
                    DataDir::Initialized {
                        sysid: String::new(),
                        was_primary: false,
                    }
                }
            },
            _ => {
                let sysid = self.sysid().await.unwrap_or_default();
                DataDir::Initialized {
                    sysid,
                    was_primary: false,
                }
            }
        };
        let dcs = match self.dcs.read_cluster().await {
            Ok((kvs, _)) => {
                self.cluster = crate::dcs::keys::parse_cluster(self.keys(), &kvs);
                self.distrust_etcd().await;
                let g = self
                    .cluster
                    .get(&self.cfg.group)
                    .cloned()
                    .unwrap_or_default();
                let previous_leader = self.last_snapshot.as_ref().and_then(|s| match &s.dcs {
                    DcsView::Available(v) => v.leader.clone(),
                    DcsView::Unavailable => None,
                });
                let leader = g.leader.as_ref().map(|l| l.name.clone());
                if leader != previous_leader {
                    self.leader_changes += 1;
                }
                DcsView::Available(Box::new(GroupView {
                    leader,
                    leader_lease: g.leader.as_ref().map(|l| l.lease),
                    initialize: g.initialize.clone(),
                    initialize_lease: g.initialize_lease,
                    members: g.members.clone(),
                    last_leader_wal: g.optime,
                    sync: g.sync.clone(),
                    failover: g.failover.clone(),
                    oldest_wal: g.oldest_wal,
                    handed_to: g.handed_to.clone(),
                    paused: g
                        .config
                        .as_ref()
                        .and_then(|c| c.get("pause"))
                        .and_then(|p| p.as_bool())
                        .unwrap_or(false),
                }))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read etcd");
                DcsView::Unavailable
            }
        };
        let mut handoff_overdue = false;
        if let DcsView::Available(g) = &dcs {
            if g.leader.is_some() || g.failover.is_none() {
                self.unled_request = None;
            } else {
                // Every member times a request that nobody leads under, from its handoff
                // (the old leader) or from when it first sees one: a candidate that never
                // takes over (its loop stuck while its key lives on) must not hold the group,
                // and an old leader whose agent restarted meanwhile must not forget it (the
                // simulation's seed 20).
                // Timed per request: one written since (its bytes differ) starts anew.
                let raw = self
                    .cluster
                    .get(&self.cfg.group)
                    .and_then(|s| s.failover_raw.clone());
                let since = match &self.unled_request {
                    Some((seen, at)) if seen.is_none() || *seen == raw => *at,
                    _ => Instant::now(),
                };
                self.unled_request = Some((raw, since));
                handoff_overdue = since.elapsed() > self.lease.timing.ttl;
            }
        }
        let i_lead = matches!(&dcs, DcsView::Available(g) if g.leader.as_deref() == Some(self.cfg.member.as_str())
            && g.leader_lease.is_some() && g.leader_lease == self.lease.lease_id());
        if !i_lead {
            self.give_up_leading = false;
            self.leader_start = None;
            self.slots_seen.clear();
        }
        let history = self.check_history(&server, &dcs).await;
        // Failed starts count only under the leader of now.
        let failed_replica_starts = match &dcs {
            DcsView::Available(g)
                if g.leader.is_some() && g.leader == self.start_failures_under =>
            {
                self.replica_start_failures
            }
            _ => 0,
        };
        // Asked only when `decide` would set our data aside on the answer.
        let leader_confirmed_primary = match &dcs {
            DcsView::Available(g)
                if failed_replica_starts >= decide::MAX_REPLICA_START_FAILURES =>
            {
                match g.leader.as_deref().filter(|l| *l != self.cfg.member) {
                    Some(l) => self.probe_member(l).await.is_ok_and(|p| !p.in_recovery),
                    None => false,
                }
            }
            _ => false,
        };
        Snapshot {
            me: self.cfg.member.clone(),
            nofailover: self.cfg.tags.nofailover,
            maximum_lag_on_failover: self.cfg.ha.maximum_lag_on_failover,
            synchronous_mode: self.cfg.ha.synchronous_mode,
            lease_valid: self.lease.valid(),
            my_lease: self.lease.lease_id(),
            data,
            server,
            dcs,
            give_up_leading: self.give_up_leading,
            history,
            setup_done: self.setup_done,
            coordinator: self.cfg.is_coordinator(),
            clean_handoff: self.clean_handoff,
            use_slots: self.cfg.ha.use_slots,
            handoff_overdue,
            failed_replica_starts,
            leader_confirmed_primary,
            rewind_failed_from: self.rewind_failed_from.clone(),
            pooler: self.cfg.citus.pooler.is_some(),
            cannot_lead: crate::agent::guard::blocks_leading(&self.cfg.ha.watchdog, &self.guard),
            bootstrapped_here: self.bootstrapped_here.clone(),
            not_streaming_for: self
                .not_streaming_since
                .map(|t| t.elapsed())
                .unwrap_or_default(),
            now_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        }
    }

    pub(super) async fn sysid(&mut self) -> Option<String> {
        self.pg.system_identifier(self.timeout()).await
    }

    pub(super) async fn observe_server(&mut self) -> Server {
        let Some(pm) = self.postmaster.as_mut() else {
            self.pg.disconnect();
            return Server::Stopped;
        };
        if let Some(status) = pm.exited() {
            tracing::warn!(%status, "PostgreSQL exited");
            self.postmaster = None;
            self.pg.disconnect();
            self.lease.disarm_fence();
            if self.leader_start.is_none() {
                self.leader_start = Some(Instant::now());
            }
            return Server::Stopped;
        }
        match self.pg.pid_file_status().as_deref() {
            Some("ready") | Some("standby") => {}
            _ => return Server::Starting,
        }
        let t = self.timeout();
        if !self.pg.connect(t).await {
            return Server::Starting;
        }
        match self.pg.probe(t).await {
            Ok(p) => {
                let pid = self.postmaster.as_ref().map(|p| p.pid()).unwrap_or(0);
                // The fence guards only a primary.
                let guarded = if p.in_recovery { 0 } else { pid };
                if self.lease.primary_pid.load(Ordering::SeqCst) != guarded {
                    self.lease.arm_fence(guarded);
                }
                let running = Running {
                    primary: !p.in_recovery,
                    timeline: p.timeline,
                    wal: p.wal.max(p.receive.unwrap_or(0)),
                    upstream: if p.in_recovery {
                        self.upstream.clone()
                    } else {
                        None
                    },
                    streaming: p.streaming,
                };
                self.last_probe = Some(p);
                Server::Running(running)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot probe PostgreSQL");
                self.pg.disconnect();
                Server::Starting
            }
        }
    }

    /// A standby that has not streamed for a while compares its timeline history with its
    /// leader's (`postgres::timeline`).
    pub(super) async fn check_history(&mut self, server: &Server, dcs: &DcsView) -> Verdict {
        let (Server::Running(r), DcsView::Available(g)) = (server, dcs) else {
            self.not_streaming_since = None;
            return Verdict::Follows;
        };
        if r.primary || r.streaming || r.upstream.is_none() {
            self.not_streaming_since = None;
            return Verdict::Follows;
        }
        let since = *self.not_streaming_since.get_or_insert_with(Instant::now);
        let patience = Duration::from_secs(u64::from(self.cfg.ha.loop_wait).max(5));
        if since.elapsed() <= patience {
            return Verdict::Follows;
        }
        // Only a live primary that we still cannot stream from says anything about our
        // history: a dead leader stops streaming too (rewinding wrongly is harmless; setting
        // data aside because the leader died would not be).
        let Some(leader) = g.leader.clone().filter(|l| *l != self.cfg.member) else {
            return Verdict::Follows;
        };
        let probe = match self.probe_member(&leader).await {
            Ok(p) if !p.in_recovery => p,
            Ok(_) => return Verdict::Follows,
            Err(e) => {
                tracing::debug!(%leader, error = %e, "cannot check the leader's timeline");
                return Verdict::Follows;
            }
        };
        let histories = match self.member_address(&leader) {
            Some((host, port)) => {
                let theirs = self
                    .pg
                    .member_timeline_history(&host, port, probe.timeline, self.timeout())
                    .await;
                theirs.and_then(|t| Ok((t, self.pg.timeline_history(r.timeline)?)))
            }
            None => Err(format!("no address published by {leader}")),
        };
        match histories {
            Ok((theirs, ours)) => {
                let mine = Line {
                    tli: r.timeline,
                    ancestors: ours,
                };
                let leader_line = Line {
                    tli: probe.timeline,
                    ancestors: theirs,
                };
                let end = r.wal;
                timeline::verdict(&mine, end, &leader_line)
            }
            Err(e) => {
                // Without the histories, only a later timeline on the leader is evidence.
                // (Without a WAL receiver our timeline is read from the last restartpoint,
                // which lags behind a standby that followed a promotion fine: a needless
                // rewind then, never a needless clone.)
                tracing::warn!(%leader, error = %e, "cannot compare timeline histories with the leader");
                if probe.timeline > r.timeline {
                    Verdict::Rewind
                } else {
                    Verdict::Follows
                }
            }
        }
    }

    /// Probe another member's server over TCP.
    pub(super) async fn probe_member(&self, name: &str) -> Result<sql::Probe, String> {
        let (host, port) = self
            .member_address(name)
            .ok_or(format!("no address published by {name}"))?;
        self.pg.probe_member(&host, port, self.timeout()).await
    }

    /// Drop what no agent writes from the cluster just read (see `GroupState::sanitize`),
    /// say so once per change, and remove a bogus leader key of this member's group so that
    /// a member can lead again.
    pub(super) async fn distrust_etcd(&mut self) {
        let mut problems = Vec::new();
        let mut bogus_leader = None;
        for (gid, g) in self.cluster.iter_mut() {
            let u = g.sanitize();
            problems.extend(u.problems.into_iter().map(|p| format!("group {gid}: {p}")));
            if *gid == self.cfg.group {
                bogus_leader = u.bogus_leader;
            }
        }
        if problems != self.untrusted_said {
            for p in &problems {
                tracing::warn!("etcd: {p}");
            }
            self.untrusted_said = problems;
        }
        if let Some(name) = bogus_leader {
            let key = self.keys().leader(self.cfg.group);
            match self.dcs.delete_if(&key, name.as_bytes()).await {
                Ok(true) => tracing::warn!(key, "removed a leader key no agent wrote"),
                Ok(false) => {}
                Err(e) => tracing::warn!(key, error = %e, "cannot remove a bogus leader key"),
            }
        }
    }
}
