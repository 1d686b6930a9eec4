//! Reading and changing Citus metadata over a SQL connection: `pg_dist_node`,
//! `pg_dist_authinfo`, and the node functions. Used by the coordinator's agent (on its local
//! socket) and by the reconciler (through an SSH tunnel).

use std::time::Duration;

use tokio_postgres::Client;

use super::metadata::{AuthinfoRow, NodeChange, NodeRow, PoolinfoChange, PoolinfoRow, RowUpdate};
use crate::postgres::sql::{SqlError, bounded};
use crate::spec::secret::Secret;

pub async fn extension_installed(c: &Client, timeout: Duration) -> Result<bool, SqlError> {
    Ok(bounded(
        "check extension",
        timeout,
        c.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
            &[],
        ),
    )
    .await?
    .get(0))
}

pub async fn nodes(c: &Client, timeout: Duration) -> Result<Vec<NodeRow>, SqlError> {
    let rows = bounded(
        "read pg_dist_node",
        timeout,
        c.query(
            "SELECT nodeid, groupid, nodename, nodeport, noderole::text, isactive, shouldhaveshards, hasmetadata, COALESCE(metadatasynced, true) FROM pg_catalog.pg_dist_node ORDER BY groupid, nodeid",
            &[],
        ),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| NodeRow {
            nodeid: r.get(0),
            groupid: r.get(1),
            nodename: r.get(2),
            nodeport: r.get(3),
            noderole: r.get(4),
            isactive: r.get(5),
            shouldhaveshards: r.get(6),
            hasmetadata: r.get(7),
            metadatasynced: r.get(8),
        })
        .collect())
}

pub async fn authinfo(c: &Client, timeout: Duration) -> Result<Vec<AuthinfoRow>, SqlError> {
    let rows = bounded(
        "read pg_dist_authinfo",
        timeout,
        c.query("SELECT nodeid, rolename::text, authinfo FROM pg_catalog.pg_dist_authinfo ORDER BY rolename, nodeid", &[]),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| AuthinfoRow {
            nodeid: r.get(0),
            rolename: r.get(1),
            authinfo: Secret::new(r.get::<_, String>(2)),
        })
        .collect())
}

/// This node's `pg_dist_poolinfo` beside its `pg_dist_node` (both node-local here: Citus
/// syncs neither table's pool rows between nodes).
pub async fn poolinfo(c: &Client, timeout: Duration) -> Result<Vec<PoolinfoRow>, SqlError> {
    let rows = bounded(
        "read pg_dist_poolinfo",
        timeout,
        c.query(
            "SELECT COALESCE(n.nodeid, p.nodeid), n.groupid, n.nodename::text, n.nodeport, p.poolinfo \
             FROM pg_catalog.pg_dist_node n FULL JOIN pg_catalog.pg_dist_poolinfo p ON p.nodeid = n.nodeid \
             ORDER BY 1",
            &[],
        ),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| PoolinfoRow {
            nodeid: r.get(0),
            groupid: r.get(1),
            nodename: r.get(2),
            nodeport: r.get(3),
            poolinfo: r.get(4),
        })
        .collect())
}

/// Bring this node's `pg_dist_poolinfo` in line (one transaction). The changes made.
pub async fn sync_poolinfo(
    c: &mut Client,
    port: Option<u16>,
    running: &[crate::citus::metadata::PoolerAt],
    timeout: Duration,
) -> Result<Vec<PoolinfoChange>, SqlError> {
    let changes =
        crate::citus::metadata::diff_poolinfo(&poolinfo(c, timeout).await?, port, running);
    if changes.is_empty() {
        return Ok(changes);
    }
    let tx = bounded("begin", timeout, c.transaction()).await?;
    for ch in &changes {
        match ch {
            PoolinfoChange::Set {
                nodeid, poolinfo, ..
            } => {
                bounded(
                    "set a pg_dist_poolinfo row",
                    timeout,
                    tx.execute(
                        "INSERT INTO pg_catalog.pg_dist_poolinfo (nodeid, poolinfo) VALUES ($1, $2) \
                         ON CONFLICT (nodeid) DO UPDATE SET poolinfo = EXCLUDED.poolinfo",
                        &[nodeid, poolinfo],
                    ),
                )
                .await?;
            }
            PoolinfoChange::Remove { nodeid, .. } => {
                bounded(
                    "remove a pg_dist_poolinfo row",
                    timeout,
                    tx.execute(
                        "DELETE FROM pg_catalog.pg_dist_poolinfo WHERE nodeid = $1",
                        &[nodeid],
                    ),
                )
                .await?;
            }
        }
    }
    bounded("commit", timeout, tx.commit()).await?;
    Ok(changes)
}

/// How `citus_update_node` treats transactions in flight on the group whose row moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateOptions {
    /// Terminate sessions still holding the group's locks after the cooldown (a failover:
    /// they are failing anyway).
    pub force: bool,
    pub lock_cooldown_ms: u32,
}

impl UpdateOptions {
    /// How long one update may take: the cooldown, then the work itself.
    pub fn timeout(&self, base: Duration) -> Duration {
        base + Duration::from_millis(u64::from(self.lock_cooldown_ms))
    }
}

/// Apply one change to pg_dist_node.
pub async fn apply_node_change(
    c: &Client,
    change: &NodeChange,
    options: UpdateOptions,
    timeout: Duration,
) -> Result<(), SqlError> {
    match change {
        NodeChange::SetCoordinator { host, port } => {
            bounded(
                "citus_set_coordinator_host",
                timeout,
                c.execute(
                    "SELECT citus_set_coordinator_host($1, $2)",
                    &[host, &i32::from(*port)],
                ),
            )
            .await?;
        }
        NodeChange::AddPrimary { group, host, port } => {
            let g = *group as i32;
            let added = bounded(
                "citus_add_node",
                timeout,
                c.execute(
                    "SELECT citus_add_node($1, $2, $3)",
                    &[host, &i32::from(*port), &g],
                ),
            )
            .await;
            if added.is_err() {
                give_back_node_ids(c, timeout).await;
            }
            added?;
        }
        NodeChange::AddSecondary {
            host,
            port,
            primary_host,
            primary_port,
            ..
        } => {
            let added = bounded(
                "citus_add_secondary_node",
                timeout,
                c.execute(
                    "SELECT citus_add_secondary_node($1, $2, $3, $4)",
                    &[
                        host,
                        &i32::from(*port),
                        primary_host,
                        &i32::from(*primary_port),
                    ],
                ),
            )
            .await;
            if added.is_err() {
                give_back_node_ids(c, timeout).await;
            }
            added?;
        }
        NodeChange::Update { rows, .. } => {
            // Several rows (a swap through a parked name) change in one transaction, so no
            // session ever sees the group without its primary row.
            let t = options.timeout(timeout);
            bounded("begin", timeout, c.batch_execute("BEGIN")).await?;
            let mut result = Ok(());
            for u in rows {
                result = bounded(
                    "citus_update_node",
                    t,
                    c.execute(
                        "SELECT citus_update_node($1, $2, $3, $4, $5)",
                        &[
                            &u.nodeid,
                            &u.host,
                            &i32::from(u.port),
                            &options.force,
                            &(options.lock_cooldown_ms.min(i32::MAX as u32) as i32),
                        ],
                    ),
                )
                .await
                .map(|_| ());
                if result.is_err() {
                    break;
                }
            }
            match result {
                Ok(()) => {
                    bounded("commit", timeout, c.batch_execute("COMMIT")).await?;
                    restart_moves_involving(c, rows, timeout).await;
                }
                Err(e) => {
                    let _ = bounded("rollback", timeout, c.batch_execute("ROLLBACK")).await;
                    return Err(e);
                }
            }
        }
        NodeChange::Remove { host, port, .. } => {
            bounded(
                "citus_remove_node",
                timeout,
                c.execute("SELECT citus_remove_node($1, $2)", &[host, port]),
            )
            .await?;
        }
    }
    Ok(())
}

/// A shard move caught by a change of primary in its source or target group does not fail on
/// its own: it waits for a logical replication subscription to the old primary to catch up,
/// for `citus.logical_replication_timeout` (two hours by default), while the rebalance job
/// stalls and `citus_rebalance_status()` fails on the demoted server. Cancel the task's
/// backend (the signal `citus_job_cancel` sends, without marking the task cancelled): Citus
/// counts it as a failed attempt, cleans up after it and runs it again a few seconds later,
/// against the rows as they are now. Best effort: a task that was not running is untouched.
async fn restart_moves_involving(c: &Client, rows: &[RowUpdate], timeout: Duration) {
    let ids: Vec<i32> = rows.iter().map(|u| u.nodeid).collect();
    let cancelled = bounded(
        "restart shard moves",
        timeout,
        c.query_one(
            "SELECT count(*) FILTER (WHERE pg_catalog.pg_cancel_backend(pid))
               FROM pg_catalog.pg_dist_background_task
              WHERE status = 'running' AND pid IS NOT NULL AND nodes_involved && $1::int[]",
            &[&ids],
        ),
    )
    .await;
    match cancelled {
        Ok(row) => {
            let n: i64 = row.get(0);
            if n > 0 {
                tracing::info!(tasks = n, nodes = ?ids, "restarted shard moves caught by the change of primary");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot restart shard moves caught by the change of primary")
        }
    }
}

/// `nextval` is not transactional: every failed `citus_add_node` would use up a node id for
/// good, and an agent retrying every few seconds would leave rows numbered in the hundreds.
/// Put the sequence back to the highest id in use. Only the coordinator primary's agent adds
/// nodes, so no concurrent add is racing this.
async fn give_back_node_ids(c: &Client, timeout: Duration) {
    let _ = bounded(
        "reset pg_dist_node_nodeid_seq",
        timeout,
        c.execute(
            "SELECT setval('pg_catalog.pg_dist_node_nodeid_seq', m) FROM (SELECT max(nodeid) AS m FROM pg_catalog.pg_dist_node) s WHERE m IS NOT NULL",
            &[],
        ),
    )
    .await;
}

/// A write pause on the coordinator: an open transaction holding, in exclusive mode, the shard
/// metadata locks of the shards that live on one group alone. Distributed writes to those
/// shards wait for the locks and read the group's row again once they get them; reads and
/// writes elsewhere (reference tables included) go on. Dropping it rolls back.
pub struct PauseSession {
    client: Client,
    /// Shards held (for the log).
    pub shards: usize,
}

/// How a pause takes hold.
#[derive(Debug, Clone, Copy)]
pub struct PauseOptions {
    /// Terminate the sessions whose writes to the group still hold the pause up after this
    /// long (Citus's own `citus_update_node(…, force => true, lock_cooldown)` does the same):
    /// a switchover. None: wait for them — after a loss they wait on a server that went
    /// silent, and cancelling them would make their backends hang in libpq's blocking cancel
    /// request to that server; they fail on their own (`tcp_user_timeout`). Writes that come
    /// after the pause's lock request queue behind it either way.
    pub terminate_after: Option<Duration>,
    /// The longest the lock request may wait, enforced by the server (`lock_timeout`), so a
    /// request this agent gave up on never lingers.
    pub lock_wait: Duration,
    /// The server ends the session (and the pause) itself after this long idle in the
    /// transaction: a frozen or cut-off agent cannot hold a group forever.
    pub server_deadline: Duration,
}

/// Open a pause on `group` over `client` (a fresh connection to the Citus database, used for
/// nothing else); `control`, another connection, terminates blockers when asked to.
pub async fn open_pause(
    client: Client,
    control: Option<Client>,
    group: u32,
    options: PauseOptions,
    timeout: Duration,
) -> Result<PauseSession, SqlError> {
    let pid: i32 = bounded(
        "backend pid",
        timeout,
        client.query_one("SELECT pg_backend_pid()", &[]),
    )
    .await?
    .get(0);
    let idle_ms = options.server_deadline.as_millis().min(i32::MAX as u128);
    let lock_ms = options.lock_wait.as_millis().clamp(1, i32::MAX as u128);
    bounded(
        "begin the pause",
        timeout,
        client.batch_execute(&format!(
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {idle_ms}"
        )),
    )
    .await?;
    let g = group as i32;
    let shards: Vec<i64> = bounded(
        "shards of the group",
        timeout,
        client.query_one(
            "SELECT COALESCE(array_agg(shardid ORDER BY shardid), '{}') FROM (
               SELECT shardid FROM pg_catalog.pg_dist_placement
               GROUP BY shardid HAVING bool_and(groupid = $1)) s",
            &[&g],
        ),
    )
    .await?
    .get(0);
    // Take every shard nobody holds at once, then wait for the ones writes in flight hold.
    // Locks are taken one at a time: waiting in plain shard order would leave the shards after
    // the first busy one open to new writes until it is free — writes that, after a loss, go
    // to the lost server. Each quick attempt runs in a savepoint, so a busy shard costs
    // nothing but the attempt.
    let busy = take_free_shards(&client, &shards, timeout).await?;
    bounded(
        "lock timeout",
        timeout,
        client.batch_execute(&format!("SET LOCAL lock_timeout = {lock_ms}")),
    )
    .await?;
    if !busy.is_empty() {
        // 7 = ExclusiveLock: conflicts with the ShareLock every distributed write takes on
        // its shard's metadata, not with readers. Shard ids sorted, as Citus requires.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&busy];
        let lock = client.execute("SELECT lock_shard_metadata(7, $1)", &params);
        let force = async {
            match (options.terminate_after, &control) {
                (Some(after), Some(control)) => {
                    tokio::time::sleep(after).await;
                    loop {
                        let _ = control
                            .execute(
                                "SELECT pg_terminate_backend(b) FROM unnest(pg_blocking_pids($1)) b",
                                &[&pid],
                            )
                            .await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        let what = "lock the group's shards";
        let bound = options.lock_wait + timeout;
        let taken = tokio::time::timeout(bound, async {
            tokio::select! {
                r = lock => r.map(|_| ()),
                _ = force => Ok(()),
            }
        })
        .await;
        match taken {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(SqlError::Failed {
                    what: what.into(),
                    detail: crate::postgres::sql::db_message(&e),
                });
            }
            Err(_) => {
                return Err(SqlError::Timeout {
                    what: what.into(),
                    ms: bound.as_millis(),
                });
            }
        }
    }
    Ok(PauseSession {
        client,
        shards: shards.len(),
    })
}

/// Lock (exclusive) each of `shards` that can be locked at once; return those that could not.
async fn take_free_shards(
    client: &Client,
    shards: &[i64],
    timeout: Duration,
) -> Result<Vec<i64>, SqlError> {
    let mut busy = Vec::new();
    if shards.is_empty() {
        return Ok(busy);
    }
    bounded(
        "lock timeout",
        timeout,
        client.batch_execute("SET LOCAL lock_timeout = 5"),
    )
    .await?;
    for shard in shards {
        bounded(
            "savepoint",
            timeout,
            client.batch_execute("SAVEPOINT pause_try"),
        )
        .await?;
        let one = [*shard];
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&one.as_slice()];
        let taken = bounded(
            "lock a shard",
            timeout,
            client.execute("SELECT lock_shard_metadata(7, $1)", &params),
        )
        .await;
        match taken {
            Ok(_) => {
                bounded(
                    "savepoint",
                    timeout,
                    client.batch_execute("RELEASE SAVEPOINT pause_try"),
                )
                .await?;
            }
            Err(SqlError::Failed { .. }) => {
                bounded(
                    "savepoint",
                    timeout,
                    client.batch_execute("ROLLBACK TO SAVEPOINT pause_try"),
                )
                .await?;
                busy.push(*shard);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(busy)
}

impl PauseSession {
    /// Apply `rows` (the group's row moving to its new primary, and any row that makes way for
    /// it) and commit: the waiting writes go on, to the new address.
    pub async fn release(
        self,
        rows: &[RowUpdate],
        options: UpdateOptions,
        timeout: Duration,
    ) -> Result<(), SqlError> {
        if !rows.is_empty() && !options.force {
            let ms = options.lock_cooldown_ms.min(i32::MAX as u32);
            bounded(
                "lock timeout",
                timeout,
                self.client
                    .batch_execute(&format!("SET LOCAL lock_timeout = {ms}")),
            )
            .await?;
        }
        for u in rows {
            bounded(
                "citus_update_node",
                options.timeout(timeout),
                self.client.execute(
                    "SELECT citus_update_node($1, $2, $3, $4, $5)",
                    &[
                        &u.nodeid,
                        &u.host,
                        &i32::from(u.port),
                        &options.force,
                        &(options.lock_cooldown_ms.min(i32::MAX as u32) as i32),
                    ],
                ),
            )
            .await?;
        }
        bounded(
            "commit the pause",
            timeout,
            self.client.batch_execute("COMMIT"),
        )
        .await?;
        restart_moves_involving(&self.client, rows, timeout).await;
        Ok(())
    }

    /// Roll back: the writes go on to the row as it was.
    pub async fn abandon(self, timeout: Duration) {
        let _ = bounded(
            "roll back the pause",
            timeout,
            self.client.batch_execute("ROLLBACK"),
        )
        .await;
    }

    /// The session died (the server ended it, or the connection broke): the pause is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Resolve two-phase transactions left prepared on workers (Citus's own recovery runs only
/// every `citus.recover_2pc_interval`). Rows they lock stay locked until then.
pub async fn recover_prepared_transactions(c: &Client, timeout: Duration) -> Result<i32, SqlError> {
    Ok(bounded(
        "recover_prepared_transactions",
        timeout,
        c.query_one("SELECT recover_prepared_transactions()", &[]),
    )
    .await?
    .get(0))
}
