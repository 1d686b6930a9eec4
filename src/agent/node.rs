//! One member at work: reads the local server and the group's keys into a `Snapshot`, runs the
//! actions `decide` picks, and publishes the member key. All I/O of the agent's loop is here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::config::{AgentConfig, Paths};
use super::decide::{self, Action, DataDir, Dcs as DcsView, GroupView, Running, Server, Snapshot};
use super::lease::LeaseShared;
use super::slots;
use crate::citus::metadata::{self, GroupMembers};
use crate::dcs::{Dcs, GroupState, MemberInfo, Status};
use crate::postgres::conf::{Role, member_slot_name};
use crate::postgres::process::{Pg, Postmaster, StopMode};
use crate::postgres::sql;

/// What the member is doing, as published in its member key.
fn state_label(server: &Server, busy: Option<&str>) -> (String, String) {
    if let Some(b) = busy {
        return ("uninitialized".into(), b.into());
    }
    match server {
        Server::Stopped => ("uninitialized".into(), "stopped".into()),
        Server::Starting => ("replica".into(), "starting".into()),
        Server::Running(r) if r.primary => ("primary".into(), "running".into()),
        Server::Running(r) if r.streaming => ("replica".into(), "streaming".into()),
        Server::Running(_) => ("replica".into(), "running".into()),
    }
}

pub struct Node {
    pub cfg: AgentConfig,
    /// SHA-256 of the configuration file as loaded (see `run::load_config_with_sha`).
    pub config_sha256: String,
    /// A reloaded configuration with parameters waiting for a restart: its checksum becomes
    /// `config_sha256` once PostgreSQL restarted.
    pub pending_config_sha256: Option<String>,
    pub pg: Pg,
    pub dcs: Dcs,
    pub lease: Arc<LeaseShared>,
    pub postmaster: Option<Postmaster>,
    client: Option<tokio_postgres::Client>,
    /// The member this server was configured to follow.
    upstream: Option<String>,
    setup_done: bool,
    /// What `distrust_etcd` last logged (logged again only when it changes).
    untrusted_said: Vec<String>,
    give_up_leading: bool,
    /// When the current attempt to run as leader started (for "restart in place if quick").
    leader_start: Option<Instant>,
    not_streaming_since: Option<Instant>,
    busy: Option<String>,
    /// What the member key holds, and on which lease.
    last_published: Option<(MemberInfo, i64)>,
    /// Member-key writes so far (`/metrics`).
    pub member_writes: u64,
    last_optime: Option<(u64, Instant)>,
    /// Member slots while leading (see `agent::slots`): when each member last had a key (ms
    /// since `started`).
    slots_seen: BTreeMap<String, u64>,
    started: Instant,
    /// All groups as last read (the coordinator needs every leader).
    pub cluster: BTreeMap<u32, GroupState>,
    pub last_snapshot: Option<Snapshot>,
    pub last_actions: Vec<Action>,
    pub leader_changes: u64,
    pub last_probe: Option<sql::Probe>,
    /// Set when this member stopped as primary to hand over; cleared once it runs again.
    clean_handoff: bool,
    /// synchronous_standby_names in force on this primary, when it changed, and the WAL
    /// position captured a moment after (see `agent::sync`).
    ssn: String,
    ssn_changed: Option<Instant>,
    ssn_since_lsn: Option<u64>,
    /// Consecutive failed starts as a replica.
    replica_start_failures: u32,
    handoff_started: Option<Instant>,
    /// The coordinator's write pauses (coordinator members only).
    pub pauses: Option<Arc<super::citus_pause::PauseShared>>,
    /// Operator requests from the REST API, run at the start of the next cycle.
    pub requests: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Request>>>,
}

/// What the REST API asks the loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Restart PostgreSQL in place (same role).
    Restart,
    /// Throw this replica's data away and clone it again.
    Reinit,
}

fn call_timeout(cfg: &AgentConfig) -> Duration {
    Duration::from_secs(u64::from(cfg.ha.retry_timeout.max(1)))
}

impl Node {
    pub fn new(cfg: AgentConfig, pg: Pg, dcs: Dcs, lease: Arc<LeaseShared>) -> Node {
        Node {
            cfg,
            config_sha256: String::new(),
            pending_config_sha256: None,
            pg,
            dcs,
            lease,
            postmaster: None,
            client: None,
            upstream: None,
            setup_done: false,
            untrusted_said: Vec::new(),
            give_up_leading: false,
            leader_start: None,
            not_streaming_since: None,
            busy: None,
            last_published: None,
            member_writes: 0,
            last_optime: None,
            slots_seen: BTreeMap::new(),
            started: Instant::now(),
            cluster: BTreeMap::new(),
            last_snapshot: None,
            last_actions: Vec::new(),
            leader_changes: 0,
            last_probe: None,
            clean_handoff: false,
            handoff_started: None,
            ssn: String::new(),
            ssn_changed: None,
            ssn_since_lsn: None,
            replica_start_failures: 0,
            pauses: None,
            requests: Default::default(),
        }
    }

    fn timeout(&self) -> Duration {
        call_timeout(&self.cfg)
    }

    fn keys(&self) -> &crate::dcs::ClusterKeys {
        &self.dcs.keys
    }

    /// One cycle: operator requests, observe, decide, execute. False when an action failed.
    pub async fn tick(&mut self) -> bool {
        loop {
            let next = self.requests.lock().ok().and_then(|mut q| q.pop_front());
            let Some(r) = next else { break };
            if let Err(e) = self.handle_request(&r).await {
                tracing::warn!(request = ?r, error = %e, "request failed");
            }
        }
        let snapshot = self.observe().await;
        if let Some(p) = &self.pauses {
            p.set_active(coordinator_primary(&snapshot));
        }
        let actions = decide::decide(&snapshot);
        if actions != self.last_actions {
            tracing::info!(actions = ?actions, "decided");
        }
        self.last_actions = actions.clone();
        self.last_snapshot = Some(snapshot.clone());
        let mut ok = true;
        for action in actions {
            let label = format!("{action:?}");
            let changes_server = changes_server(&action);
            match self.execute(action, &snapshot).await {
                Ok(true) => {
                    if changes_server {
                        // Publish what the server is now, before the cycle's other actions: the
                        // coordinator ends a switchover's write pause the moment the new
                        // primary's key says it runs as one.
                        let server = self.observe_server().await;
                        if let Some(s) = self.last_snapshot.as_mut() {
                            s.server = server;
                        }
                        self.publish().await;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(action = %label, error = %e, "action failed");
                    ok = false;
                    break;
                }
            }
        }
        self.publish().await;
        ok
    }

    // ---------------------------------------------------------------- observation

    async fn observe(&mut self) -> Snapshot {
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
                    members: g.members.clone(),
                    last_leader_wal: g.optime,
                    sync: g.sync.clone(),
                    failover: g.failover.clone(),
                    oldest_wal: g.oldest_wal,
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
        if let (Some(t0), DcsView::Available(g)) = (self.handoff_started, &dcs) {
            let taken = g.leader.is_some();
            if taken {
                self.handoff_started = None;
            } else if t0.elapsed() > self.lease.timing.ttl && g.failover.is_some() {
                // The candidate did not take over: drop the request so a normal election runs.
                tracing::warn!(
                    "the switchover candidate did not take over in time; clearing the request"
                );
                let _ = self.dcs.delete(&self.keys().failover(self.cfg.group)).await;
                self.handoff_started = None;
            }
        }
        let i_lead = matches!(&dcs, DcsView::Available(g) if g.leader.as_deref() == Some(self.cfg.member.as_str())
            && g.leader_lease.is_some() && g.leader_lease == self.lease.lease_id());
        if !i_lead {
            self.give_up_leading = false;
            self.leader_start = None;
            self.slots_seen.clear();
        }
        let diverged = self.detect_divergence(&server, &dcs).await;
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
            diverged,
            setup_done: self.setup_done,
            coordinator: self.cfg.is_coordinator(),
            clean_handoff: self.clean_handoff,
            use_slots: self.cfg.ha.use_slots,
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

    async fn handle_request(&mut self, r: &Request) -> Result<(), String> {
        match r {
            Request::Restart => {
                let primary = matches!(self.last_snapshot.as_ref().map(|s| &s.server), Some(Server::Running(x)) if x.primary);
                let role = if primary {
                    self.primary_role()
                } else {
                    let up = self.upstream.clone().and_then(|u| self.member_address(&u));
                    Role::Replica { upstream: up }
                };
                let upstream = self.upstream.clone();
                tracing::info!("restarting PostgreSQL on request");
                self.start(role, upstream).await?;
                if let Some(sha) = self.pending_config_sha256.take() {
                    self.config_sha256 = sha;
                }
                Ok(())
            }
            Request::Reinit => {
                let primary = matches!(self.last_snapshot.as_ref().map(|s| &s.server), Some(Server::Running(x)) if x.primary);
                if primary {
                    return Err("refusing to reinitialize the primary".into());
                }
                self.stop(StopMode::Fast).await;
                self.set_aside("reinit")?;
                tracing::warn!(
                    "data directory set aside on request; the member will be cloned again"
                );
                Ok(())
            }
        }
    }

    async fn sysid(&mut self) -> Option<String> {
        let c = self.client.as_ref()?;
        let row = sql::bounded(
            "system identifier",
            self.timeout(),
            c.query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            ),
        )
        .await
        .ok()?;
        Some(row.get(0))
    }

    async fn observe_server(&mut self) -> Server {
        let Some(pm) = self.postmaster.as_mut() else {
            self.client = None;
            return Server::Stopped;
        };
        if let Some(status) = pm.exited() {
            tracing::warn!(%status, "PostgreSQL exited");
            self.postmaster = None;
            self.client = None;
            self.lease.primary_pid.store(0, Ordering::SeqCst);
            if self.leader_start.is_none() {
                self.leader_start = Some(Instant::now());
            }
            return Server::Stopped;
        }
        match self.pg.pid_file_status().as_deref() {
            Some("ready") | Some("standby") => {}
            _ => return Server::Starting,
        }
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = sql::connect_local(&self.cfg, "postgres", self.timeout())
                .await
                .ok();
        }
        let Some(c) = self.client.as_ref() else {
            return Server::Starting;
        };
        match sql::probe(c, self.timeout()).await {
            Ok(p) => {
                let pid = self.postmaster.as_ref().map(|p| p.pid).unwrap_or(0);
                // The fence guards only a primary.
                self.lease
                    .primary_pid
                    .store(if p.in_recovery { 0 } else { pid }, Ordering::SeqCst);
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
                self.client = None;
                Server::Starting
            }
        }
    }

    /// A replica that has an upstream but has not streamed for a while, on an older timeline
    /// than its leader: its history forked and it needs pg_rewind.
    async fn detect_divergence(&mut self, server: &Server, dcs: &DcsView) -> bool {
        let (Server::Running(r), DcsView::Available(g)) = (server, dcs) else {
            self.not_streaming_since = None;
            return false;
        };
        if r.primary || r.streaming || r.upstream.is_none() {
            self.not_streaming_since = None;
            return false;
        }
        let since = *self.not_streaming_since.get_or_insert_with(Instant::now);
        let leader_tl = g
            .leader
            .as_ref()
            .and_then(|l| g.members.get(l))
            .map(|m| m.timeline)
            .unwrap_or(0);
        let patience = Duration::from_secs(u64::from(self.cfg.ha.loop_wait).max(5));
        if since.elapsed() <= patience || leader_tl <= r.timeline {
            return false;
        }
        // Not proof yet: without a WAL receiver our timeline is read from the last
        // restartpoint, which lags behind a replica that followed a promotion fine, and a dead
        // leader stops streaming too. Only a live primary, on a later timeline, that we still
        // cannot stream from means our history forked (rewinding wrongly is harmless; setting
        // data aside because the leader died would not be).
        let Some(leader) = g.leader.clone() else {
            return false;
        };
        match self.probe_member(&leader).await {
            Ok(p) => !p.in_recovery && p.timeline > r.timeline,
            Err(e) => {
                tracing::debug!(%leader, error = %e, "cannot check the leader's timeline");
                false
            }
        }
    }

    /// Probe another member's server over TCP.
    async fn probe_member(&self, name: &str) -> Result<sql::Probe, String> {
        let (host, port) = self
            .member_address(name)
            .ok_or(format!("no address published by {name}"))?;
        let t = self.timeout();
        let c = sql::connect_member(&self.cfg, &host, port, t)
            .await
            .map_err(|e| e.to_string())?;
        sql::probe(&c, t).await.map_err(|e| e.to_string())
    }

    // ---------------------------------------------------------------- actions

    /// Run one action. Ok(false) means "stop here this cycle" (a compare-and-set was lost).
    async fn execute(&mut self, action: Action, s: &Snapshot) -> Result<bool, String> {
        let t = self.timeout();
        let keys = self.keys().clone();
        let g = self.cfg.group;
        let me = self.cfg.member.clone();
        match action {
            Action::Wait(reason) => {
                tracing::debug!(%reason, "waiting");
                Ok(true)
            }
            Action::ClaimInitialize => {
                // The claim lives on our lease: only the lease id proves it is ours (every
                // member claims with the same empty value), and if we die while bootstrapping
                // it expires, so another member can try.
                let Some(lease) = self.lease.lease_id() else {
                    return Ok(false);
                };
                let won = self
                    .dcs
                    .create(&keys.initialize(g), b"", Some(lease))
                    .await
                    .map_err(|e| e.to_string())?;
                if won {
                    tracing::info!("won the initialize key: bootstrapping the group");
                }
                Ok(won)
            }
            Action::Initdb => {
                self.busy = Some("initializing new cluster".into());
                self.publish().await;
                let result = self.bootstrap_server().await;
                self.busy = None;
                if let Err(e) = &result {
                    // Let another member try: give back the initialize key.
                    let _ = self.dcs.delete_if(&keys.initialize(g), b"").await;
                    tracing::error!(error = %e, "bootstrap failed; released the initialize key");
                }
                result.map(|_| true)
            }
            Action::AcquireLeader => {
                let Some(lease) = self.lease.lease_id() else {
                    return Ok(false);
                };
                if !self.lease.valid() {
                    return Ok(false);
                }
                let won = self
                    .dcs
                    .create(&keys.leader(g), me.as_bytes(), Some(lease))
                    .await
                    .map_err(|e| e.to_string())?;
                if won {
                    tracing::info!("acquired the leader key");
                    self.leader_start = Some(Instant::now());
                } else {
                    tracing::info!("another member won the leader key");
                }
                Ok(won)
            }
            Action::ReclaimLeader => {
                let Some(lease) = self.lease.lease_id() else {
                    return Ok(false);
                };
                let me = self.cfg.member.clone();
                let won = self
                    .dcs
                    .replace(&keys.leader(g), me.as_bytes(), me.as_bytes(), Some(lease))
                    .await
                    .map_err(|e| e.to_string())?;
                if won {
                    tracing::info!("reclaimed the leader key left by a previous run of this agent");
                    self.leader_start = Some(Instant::now());
                }
                Ok(won)
            }
            Action::FinishBootstrap => {
                self.ensure_setup().await?;
                let sysid = self
                    .sysid()
                    .await
                    .ok_or("cannot read the system identifier")?;
                self.dcs
                    .put(&keys.initialize(g), sysid.as_bytes(), None)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(%sysid, "bootstrap complete");
                Ok(true)
            }
            Action::Clone { from } => {
                let (host, port) = self
                    .member_address(&from)
                    .ok_or(format!("no address published by {from}"))?;
                self.busy = Some("creating replica".into());
                self.publish().await;
                let result = async {
                    self.pg.prepare_host_files().map_err(|e| e.to_string())?;
                    self.pg
                        .basebackup(&host, port)
                        .await
                        .map_err(|e| e.to_string())?;
                    self.start(
                        Role::Replica {
                            upstream: Some((host.clone(), port)),
                        },
                        Some(from.clone()),
                    )
                    .await
                }
                .await;
                self.busy = None;
                result.map(|_| true)
            }
            Action::StartPrimary => {
                let role = self.primary_role();
                let started = self.start(role, None).await;
                let quick = self
                    .leader_start
                    .map(|t0| t0.elapsed() < self.lease.timing.ttl / 2)
                    .unwrap_or(true);
                if started.is_err() || !quick {
                    self.give_up_leading = true;
                }
                started.map(|_| true)
            }
            Action::StartReplica { upstream } => {
                let addr = upstream.as_ref().and_then(|u| self.member_address(u));
                if upstream.is_some() && addr.is_none() {
                    return Err(format!(
                        "no address published by {}",
                        upstream.unwrap_or_default()
                    ));
                }
                let leader = upstream.clone();
                if let Err(e) = self.start(Role::Replica { upstream: addr }, upstream).await {
                    self.replica_start_failures += 1;
                    // Data that cannot even start as a standby of a live leader (say, it needs
                    // WAL the leader no longer has): set it aside, never delete it, and clone
                    // afresh. Never while the leader is unreachable: this copy may be the best
                    // one left.
                    let leader_alive = match &leader {
                        Some(l) => self.probe_member(l).await.is_ok_and(|p| !p.in_recovery),
                        None => false,
                    };
                    if leader_alive && self.replica_start_failures >= 3 {
                        tracing::error!(error = %e, "PostgreSQL fails to start as a replica; setting the data directory aside to clone again");
                        self.replica_start_failures = 0;
                        self.set_aside("start-failed")?;
                        return Ok(false);
                    }
                    return Err(e);
                }
                self.replica_start_failures = 0;
                self.drop_leftover_slots().await;
                if leader.is_some() {
                    // It runs as a standby of the new leader now: a later rejoin after being
                    // primary again must rewind.
                    self.clean_handoff = false;
                }
                Ok(true)
            }
            Action::Follow { upstream } => {
                let addr = self
                    .member_address(&upstream)
                    .ok_or(format!("no address published by {upstream}"))?;
                self.pg
                    .write_conf(&Role::Replica {
                        upstream: Some(addr),
                    })
                    .map_err(|e| e.to_string())?;
                if let Some(c) = self.client.as_ref() {
                    sql::reload(c, t).await.map_err(|e| e.to_string())?;
                }
                tracing::info!(%upstream, "following a new upstream");
                self.upstream = Some(upstream);
                // A new upstream gets its own time to start streaming.
                self.not_streaming_since = None;
                self.drop_leftover_slots().await;
                Ok(true)
            }
            Action::Promote => {
                if self.cfg.ha.use_slots {
                    // Slots made on the standby survive its promotion: the other members'
                    // WAL receivers find theirs at once, instead of failing on a missing slot
                    // and retrying after `wal_retrieve_retry_interval` (5 s).
                    if let Err(e) = self.manage_slots(s).await {
                        tracing::warn!(error = %e, "cannot prepare member slots before promoting");
                    }
                }
                let c = self.client.as_ref().ok_or("not connected to PostgreSQL")?;
                let started = Instant::now();
                sql::promote(c, Duration::from_secs(60))
                    .await
                    .map_err(|e| e.to_string())?;
                let role = self.primary_role();
                self.pg.write_conf(&role).map_err(|e| e.to_string())?;
                if let Some(c) = self.client.as_ref() {
                    let _ = sql::reload(c, t).await;
                }
                let pid = self.postmaster.as_ref().map(|p| p.pid).unwrap_or(0);
                self.lease.primary_pid.store(pid, Ordering::SeqCst);
                self.upstream = None;
                self.setup_done = false;
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "promoted to primary"
                );
                Ok(true)
            }
            Action::Demote { immediate } => {
                self.stop(if immediate {
                    StopMode::Immediate
                } else {
                    StopMode::Fast
                })
                .await;
                if let DcsView::Available(v) = &s.dcs {
                    if v.leader.as_deref() == Some(me.as_str()) {
                        let _ = self.dcs.delete_if(&keys.leader(g), me.as_bytes()).await;
                    }
                }
                tracing::warn!(immediate, "demoted: PostgreSQL stopped");
                Ok(true)
            }
            Action::Rewind { from } => {
                let (host, port) = self
                    .member_address(&from)
                    .ok_or(format!("no address published by {from}"))?;
                // pg_rewind learns the source's timeline from its control file, which names the
                // new timeline only after the first checkpoint since promotion: before that it
                // finds "no rewind required" and the member can never follow. So checkpoint the
                // source first. A source we cannot reach is no reason to give up our data:
                // fail this cycle and try again.
                let t = self.timeout();
                let source = sql::connect_member(&self.cfg, &host, port, t)
                    .await
                    .map_err(|e| format!("pg_rewind source {from} unreachable: {e}"))?;
                let p = sql::probe(&source, t)
                    .await
                    .map_err(|e| format!("pg_rewind source {from}: {e}"))?;
                if p.in_recovery {
                    return Err(format!("pg_rewind source {from} is not a primary (yet)"));
                }
                sql::checkpoint(&source, Duration::from_secs(600))
                    .await
                    .map_err(|e| format!("checkpoint on the pg_rewind source {from}: {e}"))?;
                drop(source);
                self.busy = Some("rewinding".into());
                self.publish().await;
                let result = self.pg.rewind(&host, port).await;
                self.busy = None;
                match result {
                    Ok(()) => {
                        tracing::info!(%from, "pg_rewind done");
                        Ok(true)
                    }
                    Err(e) => {
                        // Rewind cannot work: keep the old data aside and clone afresh.
                        tracing::error!(error = %e, "pg_rewind failed; the data directory is set aside and the member will be cloned again");
                        self.set_aside("rewind-failed")?;
                        Ok(false)
                    }
                }
            }
            Action::ReleaseLeader => {
                self.dcs
                    .delete_if(&keys.leader(g), me.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::warn!("released the leader key");
                Ok(true)
            }
            Action::EnsureSetup => self.ensure_setup().await.map(|_| true),
            Action::SyncCitus => self.sync_citus().await.map(|_| true),
            Action::Switchover { to } => self.switchover(&to).await.map(|_| true),
            Action::ManageSync => self.manage_sync().await.map(|_| true),
            Action::ManageSlots => {
                // Best effort: a slot that cannot be made now is made next cycle, and must
                // not keep the status key (published next) from being written.
                if let Err(e) = self.manage_slots(s).await {
                    tracing::warn!(error = %e, "cannot manage member replication slots");
                }
                Ok(true)
            }
            Action::Reinit { reason } => {
                tracing::error!(%reason, "setting the data directory aside; the member will be cloned again");
                self.stop(StopMode::Fast).await;
                self.set_aside("wal-gone")?;
                Ok(false)
            }
            Action::ClearFailover { reason } => {
                tracing::info!(%reason, "clearing the failover key");
                self.dcs
                    .delete(&keys.failover(g))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(true)
            }
            Action::PublishOptime => {
                if let Server::Running(r) = &s.server {
                    let fresh = self.last_optime.as_ref().is_some_and(|(w, at)| {
                        *w == r.wal || at.elapsed() < Duration::from_millis(500)
                    });
                    if !fresh {
                        // Best effort: without it standbys only lose the re-clone shortcut.
                        let oldest_wal = match self.client.as_ref() {
                            Some(c) => sql::oldest_wal(c, self.timeout()).await.unwrap_or(None),
                            None => None,
                        };
                        let status = Status {
                            optime: r.wal,
                            oldest_wal,
                        };
                        let body = serde_json::to_vec(&status).unwrap_or_default();
                        self.dcs
                            .put(&keys.status(g), &body, None)
                            .await
                            .map_err(|e| e.to_string())?;
                        self.last_optime = Some((r.wal, Instant::now()));
                    }
                }
                Ok(true)
            }
        }
    }

    /// Planned handover: checkpoint while still serving (so the shutdown checkpoint is short),
    /// stop cleanly (WAL senders flush everything to the standbys before the server exits),
    /// publish the final WAL position, then release the leader key. The candidate, woken by
    /// the key's deletion, promotes once it has replayed up to that position.
    async fn switchover(&mut self, to: &str) -> Result<(), String> {
        let t0 = Instant::now();
        let keys = self.keys().clone();
        if let Some(c) = self.client.as_ref() {
            let _ = sql::checkpoint(c, Duration::from_secs(60)).await;
        }
        let checkpointed = t0.elapsed();
        let paused = self.request_citus_pause(to).await;
        let pause_ms = t0.elapsed().saturating_sub(checkpointed).as_millis() as u64;
        self.stop(StopMode::Fast).await;
        let stopped = t0.elapsed();
        let control = self
            .pg
            .controldata()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no pg_control after shutdown")?;
        // A stop that had to escalate (SIGQUIT after the timeout) or a crash meanwhile is no
        // clean handoff: WAL written here may never have reached the candidate. Then no
        // final position is published (the candidate goes by the last one the leader
        // published) and this member rewinds before it follows.
        let clean = shut_down_cleanly(&control.state);
        if clean {
            let body = serde_json::to_vec(&Status {
                optime: control.checkpoint_lsn,
                oldest_wal: None,
            })
            .unwrap_or_default();
            self.dcs
                .put(&keys.status(self.cfg.group), &body, None)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            tracing::error!(
                state = %control.state,
                "switchover: PostgreSQL did not shut down cleanly; no final position published, this member will rewind before following"
            );
        }
        self.dcs
            .delete_if(&keys.leader(self.cfg.group), self.cfg.member.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        self.clean_handoff = clean;
        self.handoff_started = Some(Instant::now());
        tracing::info!(
            %to,
            checkpoint_ms = checkpointed.as_millis() as u64,
            citus_paused = paused,
            pause_ms,
            stopped_ms = stopped.as_millis() as u64,
            released_ms = t0.elapsed().as_millis() as u64,
            final_lsn = control.checkpoint_lsn,
            "switchover: primary stopped cleanly and released the leader key"
        );
        Ok(())
    }

    /// A worker group's leader about to stop for a switchover asks the coordinator primary to
    /// hold the group's writes (the `citus_pause` key) and waits, bounded, for the answer.
    /// True when the coordinator holds them; otherwise the switchover goes ahead without.
    async fn request_citus_pause(&self, to: &str) -> bool {
        use crate::dcs::keys::{CitusPause, PauseState};
        if self.cfg.is_coordinator() || !self.cfg.citus.pause_on_switchover {
            return false;
        }
        let coordinator_runs = self
            .cluster
            .get(&0)
            .and_then(|g| {
                let l = g.leader.as_ref()?;
                g.members.get(&l.name)
            })
            .is_some_and(|m| m.role == "primary" && m.state == "running");
        if !coordinator_runs {
            tracing::info!("no coordinator primary running: switching over without a write pause");
            return false;
        }
        let key = self.keys().citus_pause(self.cfg.group);
        let request = CitusPause {
            leader: self.cfg.member.clone(),
            candidate: Some(to.to_string()),
            state: PauseState::Requested,
            coordinator: None,
            detail: None,
        };
        let Ok(body) = serde_json::to_vec(&request) else {
            return false;
        };
        if let Err(e) = self.dcs.put(&key, &body, self.lease.lease_id()).await {
            tracing::warn!(error = %e, "cannot ask the coordinator for a write pause");
            return false;
        }
        // The coordinator may have to wait out transactions in flight (up to the cooldown).
        let wait =
            Duration::from_millis(u64::from(self.cfg.citus.lock_cooldown_ms)) + self.timeout();
        let answer = self
            .dcs
            .wait_for(&key, wait, |v| match v {
                None => Some(Err("the request was withdrawn".to_string())),
                Some(bytes) => match serde_json::from_slice::<CitusPause>(bytes) {
                    Ok(p) if p.leader != self.cfg.member => Some(Err("another request".into())),
                    Ok(p) => match p.state {
                        PauseState::Requested => None,
                        PauseState::Paused => Some(Ok(p.coordinator.unwrap_or_default())),
                        PauseState::Refused => Some(Err(p.detail.unwrap_or_default())),
                    },
                    Err(_) => Some(Err("unreadable answer".into())),
                },
            })
            .await;
        match answer {
            Ok(Some(Ok(coordinator))) => {
                tracing::info!(%coordinator, "the coordinator holds the group's writes");
                true
            }
            other => {
                let why = match other {
                    Ok(Some(Err(why))) => why,
                    Ok(None) => format!("no answer within {} ms", wait.as_millis()),
                    Err(e) => e.to_string(),
                    Ok(Some(Ok(_))) => String::new(),
                };
                tracing::warn!(reason = %why, "switching over without a write pause");
                // Withdraw, so a late answer does not hold writes for nothing.
                let _ = self.dcs.delete_if(&key, &body).await;
                false
            }
        }
    }

    /// The primary configuration to start (or promote) with: in synchronous mode, the recorded
    /// standby if the key is ours, else what runs without one (async for `on`, waiting for
    /// any standby for `strict`).
    fn primary_role(&mut self) -> Role {
        use super::config::SyncModeConfig;
        let mode = self.cfg.ha.synchronous_mode;
        let ssn = if mode == SyncModeConfig::Off {
            String::new()
        } else {
            let key = self
                .cluster
                .get(&self.cfg.group)
                .and_then(|g| g.sync.clone());
            match key {
                Some(k) if k.leader.as_deref() == Some(self.cfg.member.as_str()) => k
                    .sync_standby
                    .as_deref()
                    .map(super::sync::names_for)
                    .unwrap_or_else(|| super::sync::names_without_standby(mode)),
                _ => super::sync::names_without_standby(mode),
            }
        };
        self.ssn = ssn.clone();
        self.ssn_changed = Some(Instant::now());
        self.ssn_since_lsn = None;
        Role::Primary {
            synchronous_standby_names: ssn,
        }
    }

    /// One step of synchronous replication management.
    async fn manage_sync(&mut self) -> Result<(), String> {
        let t = self.timeout();
        let c = self.client.as_ref().ok_or("not connected to PostgreSQL")?;
        // The switch point is read a moment after a change, once every backend sees it.
        if self.ssn_since_lsn.is_none()
            && self
                .ssn_changed
                .is_some_and(|at| at.elapsed() > Duration::from_millis(200))
        {
            let row = sql::bounded(
                "current WAL position",
                t,
                c.query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[]),
            )
            .await
            .map_err(|e| e.to_string())?;
            self.ssn_since_lsn = Some(row.get::<_, i64>(0).max(0) as u64);
        }
        let rows = sql::bounded(
            "read pg_stat_replication",
            t,
            c.query("SELECT application_name, state, COALESCE(sync_state, ''), COALESCE((flush_lsn - '0/0')::bigint, 0) FROM pg_stat_replication", &[]),
        )
        .await
        .map_err(|e| e.to_string())?;
        let group = self
            .cluster
            .get(&self.cfg.group)
            .cloned()
            .unwrap_or_default();
        let standbys = rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                let eligible = group.members.get(&name).is_some_and(|m| !m.nofailover());
                super::sync::Standby {
                    name,
                    state: r.get(1),
                    sync_state: r.get(2),
                    flush_lsn: r.get::<_, i64>(3).max(0) as u64,
                    eligible,
                }
            })
            .collect();
        let input = super::sync::SyncInput {
            mode: self.cfg.ha.synchronous_mode,
            me: self.cfg.member.clone(),
            key: group.sync.map(|k| (k.leader, k.sync_standby)),
            ssn: self.ssn.clone(),
            ssn_since_lsn: self.ssn_since_lsn,
            standbys,
        };
        match super::sync::next_step(&input) {
            super::sync::SyncStep::Nothing => Ok(()),
            super::sync::SyncStep::SetKey(standby) => {
                let body = serde_json::to_vec(&crate::dcs::SyncState {
                    leader: Some(self.cfg.member.clone()),
                    sync_standby: standby.clone(),
                })
                .unwrap_or_default();
                self.dcs
                    .put(&self.keys().sync(self.cfg.group), &body, None)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(standby = ?standby, "sync key updated");
                Ok(())
            }
            super::sync::SyncStep::SetStandbyNames(ssn) => {
                self.pg
                    .write_conf(&Role::Primary {
                        synchronous_standby_names: ssn.clone(),
                    })
                    .map_err(|e| e.to_string())?;
                if let Some(c) = self.client.as_ref() {
                    sql::reload(c, t).await.map_err(|e| e.to_string())?;
                }
                tracing::info!(synchronous_standby_names = %ssn, "synchronous standby names changed");
                self.ssn = ssn;
                self.ssn_changed = Some(Instant::now());
                self.ssn_since_lsn = None;
                Ok(())
            }
        }
    }

    fn set_aside(&self, why: &str) -> Result<(), String> {
        let dir = self.pg.data_dir();
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = format!("{}.{why}-{secs}", dir.display());
        std::fs::rename(&dir, &aside).map_err(|e| format!("set aside {}: {e}", dir.display()))
    }

    /// host and port a member published.
    fn member_address(&self, name: &str) -> Option<(String, u16)> {
        let m = self.cluster.get(&self.cfg.group)?.members.get(name)?;
        (!m.host.is_empty() && m.port != 0).then(|| (m.host.clone(), m.port))
    }

    async fn bootstrap_server(&mut self) -> Result<(), String> {
        self.pg.prepare_host_files().map_err(|e| e.to_string())?;
        self.pg.initdb().await.map_err(|e| e.to_string())?;
        let role = self.primary_role();
        self.start(role, None).await
    }

    /// Write the configuration for `role` and start the server; wait (bounded) until it accepts
    /// connections.
    async fn start(&mut self, role: Role, upstream: Option<String>) -> Result<(), String> {
        if self.postmaster.is_some() {
            self.stop(StopMode::Fast).await;
        }
        self.pg.write_conf(&role).map_err(|e| e.to_string())?;
        let primary = matches!(role, Role::Primary { .. });
        let pm = self.pg.start().map_err(|e| e.to_string())?;
        // A primary is fenced from its first moment: should the lease lapse before it is
        // ready, it must never accept a write.
        if primary {
            self.lease.arm_fence(pm.pid);
        }
        tracing::info!(pid = pm.pid, ?role, "PostgreSQL started");
        self.postmaster = Some(pm);
        self.upstream = upstream;
        self.lease.fenced.store(false, Ordering::SeqCst);
        // A primary that does not come up in time gives leadership up (a standby takes
        // over); a replica only makes the loop wait.
        let limit = if primary {
            Duration::from_secs(u64::from(self.cfg.ha.primary_start_timeout))
        } else {
            Duration::from_secs(120)
        };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(pm) = self.postmaster.as_mut() {
                if let Some(status) = pm.exited() {
                    self.postmaster = None;
                    return Err(format!(
                        "PostgreSQL exited during start ({status}); see {}",
                        Paths::new(&self.cfg.install_dir).postgres_log()
                    ));
                }
            }
            if matches!(
                self.pg.pid_file_status().as_deref(),
                Some("ready") | Some("standby")
            ) {
                break;
            }
            if Instant::now() > deadline {
                if primary {
                    // Never leave a half-started primary behind: stopped, the next cycle
                    // sees a leader without a server and releases the key. (A postmaster
                    // hung early in its start may have signals blocked: SIGKILL follows
                    // soon.)
                    self.lease.primary_pid.store(0, Ordering::SeqCst);
                    self.client = None;
                    if let Some(mut pm) = self.postmaster.take() {
                        pm.stop(StopMode::Immediate, Duration::from_secs(3)).await;
                    }
                    return Err(format!(
                        "PostgreSQL did not start as primary within primary_start_timeout ({}s); stopped it",
                        limit.as_secs()
                    ));
                }
                return Err(format!(
                    "PostgreSQL did not become ready within {}s",
                    limit.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.client = sql::connect_local(&self.cfg, "postgres", self.timeout())
            .await
            .ok();
        self.reset_alter_system().await;
        if matches!(role, Role::Primary { .. }) {
            let pid = self.postmaster.as_ref().map(|p| p.pid).unwrap_or(0);
            self.lease.primary_pid.store(pid, Ordering::SeqCst);
        }
        Ok(())
    }

    pub async fn stop(&mut self, mode: StopMode) {
        self.lease.primary_pid.store(0, Ordering::SeqCst);
        self.client = None;
        if let Some(mut pm) = self.postmaster.take() {
            pm.stop(mode, Duration::from_secs(60)).await;
            tracing::info!(?mode, "PostgreSQL stopped");
        }
    }

    /// Database, extension, roles, passwords and authinfo on this primary.
    async fn ensure_setup(&mut self) -> Result<(), String> {
        let t = self.timeout();
        sql::ensure_database_and_extension(&self.cfg, t)
            .await
            .map_err(|e| e.to_string())?;
        let authinfo = metadata::authinfo_string(
            self.cfg
                .citus
                .authinfo_password
                .then_some(&self.cfg.postgres.superuser.password),
            self.cfg.citus.sslcert.as_deref(),
            self.cfg.citus.sslkey.as_deref(),
        );
        sql::set_credentials(&self.cfg, authinfo.as_ref().map(|a| a.expose()), t)
            .await
            .map_err(|e| e.to_string())?;
        self.setup_done = true;
        Ok(())
    }

    /// Coordinator primary: keep pg_dist_node pointing at every group's current leader.
    async fn sync_citus(&mut self) -> Result<(), String> {
        let t = self.timeout();
        let groups = group_members(&self.cluster, &self.cfg);
        let desired = metadata::desired_nodes(&groups, self.cfg.citus.secondaries);
        let c = sql::connect_local(&self.cfg, &self.cfg.citus.database, t)
            .await
            .map_err(|e| e.to_string())?;
        let observed = crate::citus::sql::nodes(&c, t)
            .await
            .map_err(|e| e.to_string())?;
        // The coordinator knows only the groups that exist in etcd; it never removes a primary.
        let known: Vec<u32> = self.cluster.keys().copied().collect();
        let mut in_sync = metadata::metadata_in_sync(&observed);
        let held = self.pauses.as_ref().map(|p| p.held()).unwrap_or_default();
        let options = crate::citus::sql::UpdateOptions {
            // A primary row moves after a failover or a switchover: sessions still holding
            // the group's locks are talking to a server that is gone.
            force: true,
            lock_cooldown_ms: self.cfg.citus.lock_cooldown_ms,
        };
        for change in metadata::diff_nodes(&desired, &observed, &known)
            .into_iter()
            .filter(|c| c.is_automatic())
        {
            if held.contains(&change.group()) {
                // A write pause holds this group: its session moves the row when it ends.
                continue;
            }
            if change.needs_metadata_sync() && !in_sync {
                tracing::debug!(
                    ?change,
                    "deferred until Citus has synced metadata to the workers"
                );
                continue;
            }
            tracing::info!(?change, "updating pg_dist_node");
            crate::citus::sql::apply_node_change(&c, &change, options, t)
                .await
                .map_err(|e| e.to_string())?;
            if matches!(change, metadata::NodeChange::Update { .. }) {
                // Citus marks every worker's metadata unsynced until its daemon syncs it.
                in_sync = false;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- publishing

    pub fn member_info(&self) -> MemberInfo {
        let server = self
            .last_snapshot
            .as_ref()
            .map(|s| s.server.clone())
            .unwrap_or(Server::Stopped);
        let (role, state) = state_label(&server, self.busy.as_deref());
        let (timeline, wal) = match &server {
            Server::Running(r) => (r.timeline, r.wal),
            _ => (0, 0),
        };
        let mut tags = BTreeMap::new();
        if self.cfg.tags.nofailover {
            tags.insert("nofailover".to_string(), serde_json::json!(true));
        }
        if self.cfg.tags.noloadbalance {
            tags.insert("noloadbalance".to_string(), serde_json::json!(true));
        }
        MemberInfo {
            conn_url: format!(
                "postgres://{}:{}/{}",
                self.cfg.address, self.cfg.postgres.port, self.cfg.citus.database
            ),
            api_url: format!(
                "{}://{}:{}/patroni",
                if self.cfg.api.tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                self.cfg.address,
                self.cfg.api.port
            ),
            state,
            role,
            timeline,
            xlog_location: wal,
            receive_lsn: self.last_probe.as_ref().and_then(|p| p.receive),
            tags,
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_sha256: self.config_sha256.clone(),
            pending_restart: match &server {
                Server::Running(_) => self
                    .last_probe
                    .as_ref()
                    .map(|p| p.pending_restart.clone())
                    .unwrap_or_default(),
                _ => Vec::new(),
            },
            host: self.cfg.address.clone(),
            port: self.cfg.postgres.port,
            upstream: self.upstream.clone().unwrap_or_default(),
        }
    }

    /// Put the member key (on our lease) when it changed or has not been refreshed for a while.
    pub async fn publish(&mut self) {
        let Some(lease) = self.lease.lease_id() else {
            return;
        };
        let info = self.member_info();
        // etcd keeps every write until compaction and counts it against its quota: write only
        // what changed. The key lives on our lease, so it needs no refreshing; it is written
        // again when the lease changed or the last read did not show it (deleted by hand).
        let present = self
            .cluster
            .get(&self.cfg.group)
            .is_some_and(|g| g.members.contains_key(&self.cfg.member));
        if let Some((last, last_lease)) = &self.last_published {
            if *last == info && *last_lease == lease && present {
                return;
            }
        }
        let body = serde_json::to_vec(&info).unwrap_or_default();
        let key = self.keys().member(self.cfg.group, &self.cfg.member);
        match self.dcs.put(&key, &body, Some(lease)).await {
            Ok(()) => {
                self.member_writes += 1;
                self.last_published = Some((info, lease));
            }
            Err(e) => tracing::warn!(error = %e, "cannot publish the member key"),
        }
    }

    /// A graceful stop: PostgreSQL down, leadership and member key handed back at once so the
    /// group does not wait for the lease to run out.
    pub async fn shutdown(&mut self) {
        self.stop(StopMode::Fast).await;
        let keys = self.keys().clone();
        let _ = self
            .dcs
            .delete_if(&keys.leader(self.cfg.group), self.cfg.member.as_bytes())
            .await;
        if let Some(id) = self.lease.lease_id() {
            let _ = self.dcs.revoke(id).await;
        }
    }

    /// Keep a replication slot for every other member of the group (`agent::slots` decides).
    /// One slot failing (a timeout, no free slot) does not keep the others from being done.
    async fn manage_slots(&mut self, s: &Snapshot) -> Result<(), String> {
        let DcsView::Available(g) = &s.dcs else {
            return Ok(());
        };
        let t = self.timeout();
        let c = self.client.as_ref().ok_or("not connected to PostgreSQL")?;
        let slots: Vec<slots::Slot> = sql::physical_slots(c, t)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(name, active, lost)| slots::Slot { name, active, lost })
            .collect();
        let members: Vec<String> = g.members.keys().cloned().collect();
        let plan = slots::plan(&slots::SlotInput {
            me: &s.me,
            members: &members,
            slots: &slots,
            seen: &self.slots_seen,
            now_ms: self.started.elapsed().as_millis() as u64,
            ttl_ms: u64::from(self.cfg.ha.member_slots_ttl) * 1000,
        });
        self.slots_seen = plan.seen;
        let mut failed = Vec::new();
        for name in &plan.recreate {
            let again = async {
                sql::drop_inactive_slot(c, name, t).await?;
                sql::create_physical_slot(c, name, t).await
            };
            match again.await {
                Ok(at) => {
                    tracing::warn!(slot = %name, holds_from = at, "PostgreSQL gave the slot up (max_slot_wal_keep_size): recreated; a standby further behind is cloned again")
                }
                Err(e) => failed.push(format!("recreate {name}: {e}")),
            }
        }
        for name in &plan.create {
            match sql::create_physical_slot(c, name, t).await {
                Ok(_) => tracing::info!(slot = %name, "created a member replication slot"),
                Err(e) => failed.push(format!("create {name}: {e}")),
            }
        }
        for name in &plan.drop {
            match sql::drop_inactive_slot(c, name, t).await {
                Ok(true) => {
                    tracing::info!(slot = %name, "dropped the slot of a member gone for longer than member_slots_ttl")
                }
                Ok(false) => {}
                Err(e) => failed.push(format!("drop {name}: {e}")),
            }
        }
        if !plan.over_limit.is_empty() {
            tracing::warn!(members = ?plan.over_limit, limit = slots::MAX_MEMBER_SLOTS, "more members than member slots: these get none");
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// A standby drops the logical slots of Citus shard moves it was the source of as a
    /// primary (see `sql::drop_citus_slots_on_standby`). Best effort: logged, never fatal.
    async fn drop_leftover_slots(&mut self) {
        let t = self.timeout();
        let Ok(c) = sql::connect_local(&self.cfg, &self.cfg.citus.database, t).await else {
            return;
        };
        match sql::drop_citus_slots_on_standby(&c, t).await {
            Ok(dropped) if !dropped.is_empty() => {
                tracing::info!(
                    ?dropped,
                    "dropped Citus's logical slots left from this member's time as primary"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot look for leftover Citus slots"),
        }
        // Member slots from its time as primary would hold WAL back here and, should it lead
        // again, start out far behind: the primary of the day keeps the slots that count.
        let mut ours: Vec<String> = self
            .cluster
            .get(&self.cfg.group)
            .map(|g| g.members.keys().map(|m| member_slot_name(m)).collect())
            .unwrap_or_default();
        ours.push(member_slot_name(&self.cfg.member));
        let Ok(existing) = sql::physical_slots(&c, t).await else {
            return;
        };
        for (name, active, _) in existing {
            if !active && ours.contains(&name) {
                match sql::drop_inactive_slot(&c, &name, t).await {
                    Ok(true) => {
                        tracing::info!(slot = %name, "dropped a member slot left from this member's time as primary")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(slot = %name, error = %e, "cannot drop a leftover member slot")
                    }
                }
            }
        }
    }

    /// Whether PostgreSQL runs here as a primary (as last observed).
    pub fn is_running_primary(&self) -> bool {
        matches!(self.last_snapshot.as_ref().map(|s| &s.server), Some(Server::Running(x)) if x.primary)
    }

    /// Take new PostgreSQL parameters without a restart: postgresql.conf rewritten, then
    /// `pg_reload_conf()` when the server runs (otherwise its next start reads the file).
    /// Parameters that need a restart stay pending until one: returned (by name), so the
    /// caller does not claim to run the new configuration.
    pub async fn reload_parameters(&mut self, new: AgentConfig) -> Result<Vec<String>, String> {
        self.cfg = new.clone();
        self.pg.cfg = new;
        self.pg.write_postgresql_conf().map_err(|e| e.to_string())?;
        if !matches!(
            self.last_snapshot.as_ref().map(|s| &s.server),
            Some(Server::Running(_))
        ) {
            return Ok(Vec::new());
        }
        let t = self.timeout();
        let c = sql::connect_local(&self.cfg, "postgres", t)
            .await
            .map_err(|e| e.to_string())?;
        self.reset_alter_system().await;
        sql::bounded(
            "reload the configuration",
            t,
            c.simple_query("SELECT pg_reload_conf()"),
        )
        .await
        .map_err(|e| e.to_string())?;
        // The postmaster takes the signal asynchronously; a new session sees its result.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = sql::connect_local(&self.cfg, "postgres", t)
            .await
            .map_err(|e| e.to_string())?;
        let rows = sql::bounded(
            "read pending_restart",
            t,
            c.query("SELECT name FROM pg_settings WHERE pending_restart", &[]),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    /// Take new passwords without a restart: the passfile now, the roles and this node's
    /// pg_dist_authinfo row on the next cycle if this member is a primary (`EnsureSetup`, one
    /// transaction). Replicas keep streaming on their established connections.
    pub fn reload_secrets(&mut self, new: AgentConfig) -> Result<(), String> {
        self.cfg = new.clone();
        self.pg.cfg = new;
        self.setup_done = false;
        self.pg.prepare_host_files().map_err(|e| e.to_string())
    }

    /// Set up roles, passwords and this node's pg_dist_authinfo row again on the next cycle
    /// (as primary), repairing what was changed by hand.
    pub fn recheck_setup(&mut self) {
        self.setup_done = false;
    }

    /// The configuration is the spec's: settings made with `ALTER SYSTEM` (which override
    /// postgresql.conf) are removed whenever this agent starts PostgreSQL or is reloaded.
    /// `plan` shows them as drift before.
    pub async fn reset_alter_system(&mut self) {
        let Some(c) = &self.client else { return };
        match sql::reset_alter_system(c, self.timeout()).await {
            Ok(names) if !names.is_empty() => tracing::warn!(
                parameters = %names.join(", "),
                "removed ALTER SYSTEM settings: the spec's postgresql.conf applies"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check ALTER SYSTEM settings"),
        }
    }

    /// Drop what no agent writes from the cluster just read (see `GroupState::sanitize`),
    /// say so once per change, and remove a bogus leader key of this member's group so that
    /// a member can lead again.
    async fn distrust_etcd(&mut self) {
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

    pub fn data_dir_exists(&self) -> bool {
        Path::new(&self.cfg.postgres.data_dir).exists()
    }
}

/// pg_controldata's "Database cluster state" after a primary's clean shutdown (a standby's
/// says "shut down in recovery"; a SIGQUIT or a crash leaves "in production").
fn shut_down_cleanly(state: &str) -> bool {
    state.trim() == "shut down"
}

/// Actions after which the server's role or state differs from the cycle's snapshot.
fn changes_server(a: &Action) -> bool {
    matches!(
        a,
        Action::Promote
            | Action::StartPrimary
            | Action::StartReplica { .. }
            | Action::Demote { .. }
            | Action::Switchover { .. }
            | Action::Clone { .. }
            | Action::Reinit { .. }
    )
    // Not Initdb: a new group's primary is published only once its setup is done. Replicas
    // cloning it earlier could copy the `ssl = on` that `CREATE EXTENSION citus` writes with
    // ALTER SYSTEM without the certificate it generates beside it, and never start.
}

/// This member leads the coordinator group with its server running as primary, on a lease it
/// can trust: the only member whose write pauses mean anything.
fn coordinator_primary(s: &Snapshot) -> bool {
    let leads = matches!(&s.dcs, DcsView::Available(g)
        if g.leader.as_deref() == Some(s.me.as_str()) && g.leader_lease.is_some() && g.leader_lease == s.my_lease);
    s.coordinator && leads && s.lease_valid && matches!(&s.server, Server::Running(r) if r.primary)
}

/// Leaders and streaming replicas of every group, with addresses, from the members' keys.
pub fn group_members(
    cluster: &BTreeMap<u32, GroupState>,
    _cfg: &AgentConfig,
) -> BTreeMap<u32, GroupMembers> {
    cluster
        .iter()
        .filter_map(|(g, state)| {
            metadata::group_members(
                state.leader.as_ref().map(|l| l.name.as_str()),
                state.initialize.as_deref(),
                &state.members,
            )
            .map(|m| (*g, m))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::shut_down_cleanly;

    #[test]
    fn only_a_clean_primary_shutdown_is_a_clean_handoff() {
        for (state, clean) in [
            ("shut down", true),
            ("shut down in recovery", false),
            ("in production", false),
            ("in crash recovery", false),
            ("", false),
        ] {
            assert_eq!(shut_down_cleanly(state), clean, "{state:?}");
        }
    }
}
