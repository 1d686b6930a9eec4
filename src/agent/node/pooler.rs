//! `citus.pooler`: PgBouncer in front of a worker member, and each group primary's
//! `pg_dist_poolinfo` (a node-local table, replicated to the group's standbys like
//! `pg_dist_authinfo`).
//!
//! Every member of a worker group runs PgBouncer whatever its role: a standby's serves its
//! `secondary` row, and is in place the moment the member is promoted. A member publishes
//! PgBouncer's port in its key while PgBouncer runs; a primary gives a worker node a pool row
//! only while the member that node names publishes it, so Citus never connects to a
//! PgBouncer that is down or not started yet — it connects directly instead.

use super::*;
use crate::postgres::pgbouncer;
use crate::spec::model::PoolerSpec;

/// A PgBouncer that exits within this long of its start counts as a failed start: the next
/// one waits (doubling from 1 s up to a minute), so a port taken or a bad certificate does
/// not restart it every cycle.
const QUICK_EXIT: Duration = Duration::from_secs(5);

pub(super) struct PoolerProcess {
    child: tokio::process::Child,
    started: Instant,
    port: u16,
}

#[derive(Default)]
pub(super) struct PoolerState {
    process: Option<PoolerProcess>,
    failed_starts: u32,
    next_start: Option<Instant>,
    /// The last reason PgBouncer could not start (logged when it changes).
    said: Option<String>,
    /// The pooler left the configuration at this time: PgBouncer is no longer published but
    /// still serves until the primaries had time to drop its rows.
    retiring_since: Option<Instant>,
}

impl<H: Host> Node<H> {
    /// The port PgBouncer listens on, for the member key: only once it has run past
    /// `QUICK_EXIT` (one that cannot bind its port or read its certificate has exited by
    /// then) and not while it retires, so no primary points Citus at it before or after.
    pub(super) fn pooler_port(&self) -> Option<u16> {
        self.pooler
            .process
            .as_ref()
            .filter(|p| p.started.elapsed() >= QUICK_EXIT)
            .filter(|_| self.pooler.retiring_since.is_none())
            .map(|p| p.port)
    }

    /// Keep PgBouncer running as `citus.pooler` says: started once PostgreSQL's certificate
    /// exists, restarted when it exits or its files change, stopped when the pooler is gone
    /// from the configuration. Never fails the cycle: Citus connects directly meanwhile.
    pub(super) async fn supervise_pooler(&mut self) {
        let Some(pooler) = self.cfg.runs_pooler().cloned() else {
            // Its port is no longer published, so the primaries drop its rows on their next
            // cycle; stopping it at once would fail Citus's new connections until then.
            if self.retire_pooler() {
                self.stop_pooler().await;
            }
            return;
        };
        let moving = self
            .pooler
            .process
            .as_ref()
            .is_some_and(|p| p.port != pooler.port);
        if moving {
            // A new port: the old PgBouncer serves unpublished until the primaries dropped
            // its rows, then the new one starts (and is published once it runs).
            if !self.retire_pooler() {
                return;
            }
            tracing::info!(
                port = pooler.port,
                "PgBouncer's port changed; restarting it"
            );
            self.stop_pooler().await;
        }
        self.pooler.retiring_since = None;
        if let Some(p) = self.pooler.process.as_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                let quick = p.started.elapsed() < QUICK_EXIT;
                self.pooler.process = None;
                self.pooler.failed_starts = if quick {
                    self.pooler.failed_starts.saturating_add(1)
                } else {
                    0
                };
                let wait =
                    Duration::from_secs(1u64 << self.pooler.failed_starts.min(6).saturating_sub(1))
                        .min(Duration::from_secs(60));
                self.pooler.next_start = quick.then(|| Instant::now() + wait);
                tracing::warn!(%status, log = %self.pg.pgbouncer_log(), "PgBouncer exited");
            }
        }
        let (cert, key) = pgbouncer::tls_files(&self.cfg);
        if !Path::new(&cert).exists() || !Path::new(&key).exists() {
            // Citus makes a certificate when its extension is created; until then there is
            // nothing PgBouncer could present to Citus's TLS connections.
            self.pooler_not_started(format!("waiting for PostgreSQL's certificate {cert}"));
            return;
        }
        let changed = match self.pg.write_pgbouncer_files(&pooler) {
            Ok(changed) => changed,
            Err(e) => {
                self.pooler_not_started(e.to_string());
                return;
            }
        };
        if let Some(p) = &self.pooler.process {
            if changed {
                // Pool sizes and the auth file (the port is the same: see above): PgBouncer
                // rereads them on SIGHUP, keeping its connections.
                if let Some(pid) = p.child.id() {
                    // SAFETY: kill(2) on our own child, which has not been reaped yet.
                    unsafe {
                        libc::kill(pid as i32, libc::SIGHUP);
                    }
                }
                tracing::info!("PgBouncer's configuration changed; reloaded");
            }
            return;
        }
        if self.pooler.next_start.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match self.pg.start_pgbouncer() {
            Ok(child) => {
                tracing::info!(port = pooler.port, "PgBouncer started");
                self.pooler.process = Some(PoolerProcess {
                    child,
                    started: Instant::now(),
                    port: pooler.port,
                });
                self.pooler.said = None;
            }
            Err(e) => {
                self.pooler.failed_starts = self.pooler.failed_starts.saturating_add(1);
                self.pooler.next_start = Some(Instant::now() + Duration::from_secs(10));
                self.pooler_not_started(e.to_string());
            }
        }
    }

    /// Start (or go on) retiring the running PgBouncer; true once its grace has passed and it
    /// may stop (also when none runs).
    fn retire_pooler(&mut self) -> bool {
        if self.pooler.process.is_none() {
            self.pooler.retiring_since = None;
            return true;
        }
        let since = *self.pooler.retiring_since.get_or_insert_with(Instant::now);
        since.elapsed() >= self.pooler_grace()
    }

    /// How long a retiring PgBouncer keeps serving: two cycles of the primaries, and a
    /// call's timeout for their write.
    fn pooler_grace(&self) -> Duration {
        Duration::from_secs(u64::from(
            2 * self.cfg.ha.loop_wait.max(1) + self.cfg.ha.retry_timeout,
        ))
    }

    fn pooler_not_started(&mut self, why: String) {
        if self.pooler.said.as_ref() != Some(&why) {
            tracing::warn!(reason = %why, "PgBouncer not started");
            self.pooler.said = Some(why);
        }
    }

    /// Stop PgBouncer, if it runs: SIGKILL, as it keeps nothing to flush. (Its signals for
    /// an orderly stop changed meaning in PgBouncer 1.23, and some wait for every client
    /// to leave, which Citus's cached connections never do.)
    pub(super) async fn stop_pooler(&mut self) {
        self.pooler.retiring_since = None;
        let Some(mut p) = self.pooler.process.take() else {
            return;
        };
        // (kill() sends SIGKILL and reaps the child.)
        let _ = p.child.kill().await;
        tracing::info!("PgBouncer stopped");
    }

    /// This primary's `pg_dist_poolinfo` in line with `citus.pooler` and the members whose
    /// PgBouncer runs (as their keys say).
    pub(super) async fn sync_poolinfo(&mut self) -> Result<(), String> {
        let t = self.timeout();
        let Some(mut c) = self.pg.citus_session(t).await? else {
            return Ok(());
        };
        if !crate::citus::sql::extension_installed(&c, t)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(());
        }
        let running = running_poolers(&self.cluster);
        let port = self.cfg.citus.pooler.as_ref().map(|p: &PoolerSpec| p.port);
        let changes = crate::citus::sql::sync_poolinfo(&mut c, port, &running, t)
            .await
            .map_err(|e| e.to_string())?;
        for change in changes {
            tracing::info!(?change, "updated pg_dist_poolinfo");
        }
        Ok(())
    }
}

/// Members whose key says their PgBouncer runs, by PostgreSQL's address and port.
pub fn running_poolers(cluster: &BTreeMap<u32, GroupState>) -> Vec<metadata::PoolerAt> {
    cluster
        .values()
        .flat_map(|g| g.members.values())
        .filter_map(|m| {
            Some(metadata::PoolerAt {
                host: m.host.clone(),
                port: m.port,
                pooler_port: m.pooler_port?,
            })
        })
        .collect()
}
