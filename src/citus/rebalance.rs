//! Moving shards: what the rebalancer would do, the job that runs, and starting one — to
//! spread shards onto a new worker group, or to drain a group before it is removed. The
//! moves themselves are Citus's background job on the coordinator; this reads and starts it.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::Client;

use crate::plan::{RebalanceJob, ShardsObserved};
use crate::postgres::sql::{SqlError, bounded};

/// Shard placement and the rebalancer's view, on the coordinator's primary.
pub async fn observe(c: &Client, timeout: Duration) -> Result<ShardsObserved, SqlError> {
    let per_group: BTreeMap<u32, u32> = bounded(
        "count shards",
        timeout,
        c.query(
            "SELECT p.groupid, count(*)::int FROM pg_catalog.pg_dist_placement p
               JOIN pg_catalog.pg_dist_shard s USING (shardid)
               JOIN pg_catalog.pg_dist_partition t USING (logicalrelid)
              WHERE t.partmethod <> 'n' GROUP BY p.groupid",
            &[],
        ),
    )
    .await?
    .iter()
    .map(|r| {
        (
            r.get::<_, i32>(0).max(0) as u32,
            r.get::<_, i32>(1).max(0) as u32,
        )
    })
    .collect();
    let planned_moves: i64 = bounded(
        "plan a rebalance",
        timeout,
        c.query_one(
            "SELECT count(*) FROM get_rebalance_table_shards_plan()",
            &[],
        ),
    )
    .await?
    .get(0);
    let without_replica_identity = bounded(
        "tables without replica identity",
        timeout,
        c.query(
            "SELECT t.logicalrelid::regclass::text FROM pg_catalog.pg_dist_partition t
               JOIN pg_catalog.pg_class r ON r.oid = t.logicalrelid
              WHERE t.partmethod <> 'n'
                AND (r.relreplident = 'n'
                     OR (r.relreplident = 'd' AND NOT EXISTS (
                         SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = r.oid AND i.indisprimary)))
              ORDER BY 1",
            &[],
        ),
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    Ok(ShardsObserved {
        per_group,
        planned_moves: planned_moves.max(0) as u32,
        without_replica_identity,
        running_job: job(c, timeout)
            .await?
            .filter(|j| !matches!(j.state.as_str(), "finished" | "failed" | "cancelled")),
    })
}

/// The latest rebalance job, whatever its state.
pub async fn job(c: &Client, timeout: Duration) -> Result<Option<RebalanceJob>, SqlError> {
    let row = bounded(
        "citus_rebalance_status",
        timeout,
        c.query_opt(
            "SELECT job_id, state::text,
                    COALESCE((SELECT sum(value::int) FROM jsonb_each_text(details->'task_state_counts')
                               WHERE key = 'done'), 0)::int,
                    COALESCE((SELECT sum(value::int) FROM jsonb_each_text(details->'task_state_counts')), 0)::int
               FROM citus_rebalance_status()",
            &[],
        ),
    )
    .await?;
    Ok(row.map(|r| RebalanceJob {
        job_id: r.get(0),
        state: r.get(1),
        done: r.get::<_, i32>(2).max(0) as u32,
        total: r.get::<_, i32>(3).max(0) as u32,
    }))
}

/// What the running job is doing now, for progress lines: "shard 102008 10.0.0.21:5432 →
/// 10.0.0.41:5432 (12 MB of 40 MB)", and the messages of tasks that failed and will be retried.
pub async fn activity(c: &Client, timeout: Duration) -> Result<Vec<String>, SqlError> {
    let rows = bounded(
        "citus_rebalance_status",
        timeout,
        c.query(
            "SELECT t->>'state', t->'hosts'->>'source', t->'hosts'->>'target',
                    t->'size'->>'target', t->'size'->>'source', t->>'message', t->>'retried'
               FROM citus_rebalance_status() s, jsonb_array_elements(s.details->'tasks') t",
            &[],
        ),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let get = |i: usize| r.get::<_, Option<String>>(i).unwrap_or_default();
            match get(0).as_str() {
                "running" => format!("moving {} → {} ({} of {})", get(1), get(2), get(3), get(4)),
                other => format!(
                    "{other} (retried {}): {}",
                    get(6),
                    get(5).lines().next().unwrap_or("")
                ),
            }
        })
        .collect())
}

/// Start a rebalance job (`drain_only`: move shards off groups that should have none).
/// Returns its id, or None when there is nothing to move.
pub async fn start(
    c: &Client,
    drain_only: bool,
    transfer_mode: &str,
    timeout: Duration,
) -> Result<Option<i64>, SqlError> {
    Ok(bounded(
        "citus_rebalance_start",
        timeout,
        c.query_one(
            "SELECT citus_rebalance_start(drain_only => $1, shard_transfer_mode => $2::text::citus.shard_transfer_mode)",
            &[&drain_only, &transfer_mode],
        ),
    )
    .await?
    .get(0))
}
