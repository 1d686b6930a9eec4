//! Shard moves during `apply`: start Citus's rebalance job on the coordinator's primary (or
//! find the one that runs), then follow it with a progress line whenever it changes, until it
//! finishes. Giving up at `--timeout` is never silent: the error says the job carries on on
//! the coordinator and that the next `apply` follows it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::progress::Progress;
use super::{ReconcileError, Run};
use crate::citus::rebalance;
use crate::observe::{self, SQL_TIMEOUT};
use crate::plan::Observed;

/// SQL to the coordinator's primary (through SSH, on its own socket).
pub async fn coordinator(
    run: &Run,
    observed: &Observed,
) -> Result<(String, Client), ReconcileError> {
    let leader = observed
        .etcd
        .groups
        .get(&0)
        .and_then(|g| g.leader.clone())
        .ok_or_else(|| ReconcileError::Blocked("no coordinator primary".into()))?;
    let (Some(h), Some(s)) = (run.spec.host(&leader), run.sessions.ok.get(&leader)) else {
        return Err(ReconcileError::Blocked(format!(
            "no SSH session to the coordinator primary {leader}"
        )));
    };
    let client = observe::sql_through(&run.spec, h, s, &run.spec.citus.database)
        .await
        .map_err(ReconcileError::Blocked)?;
    Ok((leader, client))
}

fn sql_error(host: &str, step: &str) -> impl Fn(crate::postgres::sql::SqlError) -> ReconcileError {
    let (host, step) = (host.to_string(), step.to_string());
    move |e| ReconcileError::Step {
        host: host.clone(),
        step: step.clone(),
        detail: e.to_string(),
    }
}

/// Run a rebalance (`drain_only`: only off groups that should have no shards) to its end,
/// following one that already runs instead of starting another.
pub async fn run_to_end(
    run: &Run,
    observed: &Observed,
    drain_only: bool,
    transfer_mode: &str,
    progress: &Arc<Progress>,
) -> Result<(), ReconcileError> {
    let (host, c) = coordinator(run, observed).await?;
    let what = if drain_only { "drain" } else { "rebalance" };
    let running = rebalance::job(&c, SQL_TIMEOUT)
        .await
        .map_err(sql_error(&host, what))?
        .filter(|j| !matches!(j.state.as_str(), "finished" | "failed" | "cancelled"));
    let job_id = match running {
        Some(j) => {
            progress.note(&format!(
                "{what}: following rebalance job {} ({} of {} moves done)",
                j.job_id, j.done, j.total
            ));
            j.job_id
        }
        None => match rebalance::start(&c, drain_only, transfer_mode, SQL_TIMEOUT)
            .await
            .map_err(sql_error(&host, what))?
        {
            Some(id) => {
                progress.note(&format!(
                    "{what}: started rebalance job {id} (shard_transfer_mode => {transfer_mode})"
                ));
                id
            }
            None => {
                progress.note(&format!("{what}: no shard to move"));
                return Ok(());
            }
        },
    };
    let deadline = Instant::now() + run.options.timeout;
    let mut last = String::new();
    let mut c = c;
    loop {
        // citus_rebalance_status() measures shards on every node: while one changes hands
        // (a switchover in the middle of a move) it fails for a moment. Only the deadline
        // ends the wait.
        let job = match rebalance::job(&c, SQL_TIMEOUT).await {
            Ok(j) => j,
            Err(e) => {
                if Instant::now() > deadline {
                    return Err(sql_error(&host, what)(e));
                }
                tracing::debug!(error = %e, "cannot read the rebalance job; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if c.is_closed() {
                    if let Ok((_, fresh)) = coordinator(run, observed).await {
                        c = fresh;
                    }
                }
                continue;
            }
        };
        let Some(job) = job.filter(|j| j.job_id == job_id) else {
            return Err(ReconcileError::Blocked(format!(
                "rebalance job {job_id} is no longer the latest; run apply again"
            )));
        };
        let activity = rebalance::activity(&c, SQL_TIMEOUT)
            .await
            .unwrap_or_default()
            .join("; ");
        let line = format!(
            "{what} job {job_id}: {} of {} moves done, {}{}{}",
            job.done,
            job.total,
            job.state,
            if activity.is_empty() { "" } else { ": " },
            activity
        );
        if line != last {
            progress.note(&line);
            last = line;
        }
        match job.state.as_str() {
            "finished" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(ReconcileError::Step {
                    host,
                    step: what.into(),
                    detail: format!(
                        "rebalance job {job_id} {}: {} of {} moves done; the shards moved stay where they are; run apply again to continue",
                        job.state, job.done, job.total
                    ),
                });
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(ReconcileError::Timeout(format!(
                "rebalance job {job_id} still runs after {}s ({} of {} moves done): it carries on on the coordinator; run apply again to follow it (or SELECT citus_rebalance_wait() there)",
                run.options.timeout.as_secs(),
                job.done,
                job.total
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
