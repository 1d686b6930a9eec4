//! Reading and changing Citus metadata over a SQL connection: `pg_dist_node`,
//! `pg_dist_authinfo`, and the node functions. Used by the coordinator's agent (on its local
//! socket) and by the reconciler (through an SSH tunnel).

use std::time::Duration;

use tokio_postgres::Client;

use super::metadata::{AuthinfoChange, AuthinfoRow, NodeChange, NodeRow};
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
            "SELECT nodeid, groupid, nodename, nodeport, noderole::text, isactive, shouldhaveshards FROM pg_catalog.pg_dist_node ORDER BY groupid, nodeid",
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

/// Apply one change to pg_dist_node.
pub async fn apply_node_change(
    c: &Client,
    change: &NodeChange,
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
            bounded(
                "citus_add_node",
                timeout,
                c.execute(
                    "SELECT citus_add_node($1, $2, $3)",
                    &[host, &i32::from(*port), &g],
                ),
            )
            .await?;
        }
        NodeChange::AddSecondary {
            host,
            port,
            primary_host,
            primary_port,
            ..
        } => {
            bounded(
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
            .await?;
        }
        NodeChange::Move {
            nodeid, host, port, ..
        } => {
            bounded(
                "citus_update_node",
                timeout,
                c.execute(
                    "SELECT citus_update_node($1, $2, $3)",
                    &[nodeid, host, &i32::from(*port)],
                ),
            )
            .await?;
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

/// Apply authinfo changes (the statements carry secrets only as bound parameters).
pub async fn apply_authinfo_change(
    c: &Client,
    change: &AuthinfoChange,
    timeout: Duration,
) -> Result<(), SqlError> {
    match change {
        AuthinfoChange::Add { row } | AuthinfoChange::Change { row, .. } => {
            bounded(
                "write pg_dist_authinfo",
                timeout,
                c.execute(
                    "INSERT INTO pg_catalog.pg_dist_authinfo (nodeid, rolename, authinfo) VALUES ($1, $2, $3)
                     ON CONFLICT (rolename, nodeid) DO UPDATE SET authinfo = EXCLUDED.authinfo",
                    &[&row.nodeid, &row.rolename, &row.authinfo.expose()],
                ),
            )
            .await?;
        }
        AuthinfoChange::Remove { row } => {
            bounded(
                "delete from pg_dist_authinfo",
                timeout,
                c.execute(
                    "DELETE FROM pg_catalog.pg_dist_authinfo WHERE nodeid = $1 AND rolename = $2",
                    &[&row.nodeid, &row.rolename],
                ),
            )
            .await?;
        }
    }
    Ok(())
}

/// Drain a worker before it is removed (moves its shards away).
pub async fn drain(c: &Client, host: &str, port: i32, timeout: Duration) -> Result<(), SqlError> {
    bounded(
        "citus_drain_node",
        timeout,
        c.execute("SELECT citus_drain_node($1, $2)", &[&host, &port]),
    )
    .await
    .map(|_| ())
}
