//! The old primary's half of a planned switchover: the Citus write pause around it, the
//! checkpoint, the clean stop and the handoff of the final WAL position.

use super::*;

impl<H: Host> Node<H> {
    /// Planned handover: checkpoint while still serving (so the shutdown checkpoint is short),
    /// stop cleanly (WAL senders flush everything to the standbys before the server exits),
    /// publish the final WAL position, then release the leader key. The candidate, woken by
    /// the key's deletion, promotes once it has replayed up to that position.
    pub(super) async fn switchover(&mut self, to: &str) -> Result<(), String> {
        let t0 = Instant::now();
        let keys = self.keys().clone();
        if self.pg.connected() {
            let _ = self.pg.checkpoint(Duration::from_secs(60)).await;
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
                handed_to: Some(to.to_string()),
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
        self.unled_request = Some((None, Instant::now()));
        tracing::info!(
            %to,
            checkpoint_ms = checkpointed.as_millis() as u64,
            citus_paused = paused,
            pause_ms,
            stopped_ms = stopped.as_millis() as u64,
            released_ms = t0.elapsed().as_millis() as u64,
            final_lsn = control.checkpoint_lsn,
            clean,
            "switchover: primary stopped and released the leader key"
        );
        Ok(())
    }

    /// A new term begins here: a handoff still on record (`status.handed_to`) speaks of the
    /// term that ended and must not let that switchover's candidate promote later, past the
    /// WAL this term writes (the simulation's seed 195: the candidate was cut off, the old
    /// leader led again, was fenced, and the candidate then promoted on the stale handoff,
    /// behind a replica that had more). Withdrawn before this member can accept a write; if
    /// that fails, it does not promote.
    pub(super) async fn withdraw_old_handoff(&mut self) -> Result<(), String> {
        let group = self.cfg.group;
        let Some(state) = self.cluster.get(&group).filter(|g| g.handed_to.is_some()) else {
            return Ok(());
        };
        let status = Status {
            optime: state.optime.unwrap_or_default(),
            oldest_wal: state.oldest_wal,
            handed_to: None,
        };
        let body = serde_json::to_vec(&status).map_err(|e| e.to_string())?;
        self.dcs
            .put(&self.keys().status(group), &body, None)
            .await
            .map_err(|e| {
                format!("cannot withdraw the last term's handoff before promoting: {e}")
            })?;
        if let Some(state) = self.cluster.get_mut(&group) {
            state.handed_to = None;
        }
        tracing::info!("withdrew the last term's switchover handoff before promoting");
        Ok(())
    }

    /// Reserve the next timeline number in etcd (`max_timeline`) and make PostgreSQL's
    /// promotion pick it. Without this, two members that promote from the same timeline
    /// without seeing each other's history files (one promoted and was fenced at once, the
    /// next promoted after it) pick the same number, and their histories fork on one
    /// timeline: PostgreSQL then streams one history on top of the other, and pg_rewind
    /// finds nothing to do (the simulation's seeds 25, 70, 129, …; see `postgres::timeline`).
    /// If the reservation fails, this member does not promote.
    pub(super) async fn reserve_timeline(&mut self, current: u32) -> Result<u32, String> {
        let group = self.cfg.group;
        let key = self.keys().max_timeline(group);
        let state = self.cluster.get(&group);
        let read = state.and_then(|g| g.max_timeline.clone());
        let reserved = read.as_ref().and_then(|(_, n)| *n).unwrap_or(0);
        // Timelines the members publish count too (a group from before this key existed).
        let published = state
            .and_then(|g| g.members.values().map(|m| m.timeline).max())
            .unwrap_or(0);
        let highest = reserved.max(published);
        let next = timeline::next_timeline(current, highest)
            .map_err(|e| format!("cannot promote: {e} ({key} or a member key)"))?;
        let value = next.to_string().into_bytes();
        let won = match &read {
            Some((bytes, _)) => self.dcs.replace(&key, bytes, &value, None).await,
            None => self.dcs.create(&key, &value, None).await,
        }
        .map_err(|e| format!("cannot reserve timeline {next} before promoting: {e}"))?;
        if !won {
            return Err(format!(
                "cannot reserve timeline {next} before promoting: another member reserved one meanwhile"
            ));
        }
        if let Some(g) = self.cluster.get_mut(&group) {
            g.max_timeline = Some((value, Some(next)));
        }
        self.pg.skip_timelines(current, next)?;
        // Both inputs are logged: the data's own timeline alone can look far behind (a
        // standby's control file names the timeline of its last restartpoint).
        tracing::info!(
            data_timeline = current,
            group_highest = highest,
            timeline = next,
            "reserved the next timeline"
        );
        Ok(next)
    }

    /// A worker group's leader about to stop for a switchover asks the coordinator primary to
    /// hold the group's writes (the `citus_pause` key) and waits, bounded, for the answer.
    /// True when the coordinator holds them; otherwise the switchover goes ahead without.
    pub(super) async fn request_citus_pause(&self, to: &str) -> bool {
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
            .is_some_and(|m| m.is_running_primary());
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
}

/// pg_controldata's "Database cluster state" after a primary's clean shutdown (a standby's
/// says "shut down in recovery"; a SIGQUIT or a crash leaves "in production").
fn shut_down_cleanly(state: &str) -> bool {
    state.trim() == "shut down"
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
