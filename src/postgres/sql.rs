//! SQL the agent runs on its own server over the unix socket (a state probe, promotion,
//! reload, the setup of roles, database and Citus extension) and on another member's over TCP
//! (the leader's timeline before a rewind). Every call has a timeout.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::agent::config::{AgentConfig, Paths};

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{what}: {detail}")]
    Failed { what: String, detail: String },
    #[error("{what}: timed out after {ms} ms")]
    Timeout { what: String, ms: u128 },
}

/// Run one SQL future with a deadline.
pub async fn bounded<T>(
    what: &str,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, SqlError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(SqlError::Failed {
            what: what.into(),
            detail: db_message(&e),
        }),
        Err(_) => Err(SqlError::Timeout {
            what: what.into(),
            ms: timeout.as_millis(),
        }),
    }
}

/// The server's message without the Rust wrapper noise.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

/// Connect to this member's server over its unix socket as the superuser.
pub async fn connect_local(
    cfg: &AgentConfig,
    dbname: &str,
    timeout: Duration,
) -> Result<Client, SqlError> {
    let mut c = superuser_config(cfg, dbname, timeout);
    c.host_path(Paths::new(&cfg.install_dir).socket_dir())
        .port(cfg.postgres.port);
    connect(c, timeout).await
}

/// Connect to another member's server over TCP as the superuser (the password travels only
/// inside the libpq handshake, never in a statement).
pub async fn connect_member(
    cfg: &AgentConfig,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Client, SqlError> {
    let mut c = superuser_config(cfg, "postgres", timeout);
    c.host(host)
        .port(port)
        .password(cfg.postgres.superuser.password.expose());
    connect(c, timeout).await
}

fn superuser_config(cfg: &AgentConfig, dbname: &str, timeout: Duration) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.user(&cfg.postgres.superuser.username)
        .dbname(dbname)
        .application_name("citus-reconcile-agent")
        .connect_timeout(timeout);
    c
}

async fn connect(c: tokio_postgres::Config, timeout: Duration) -> Result<Client, SqlError> {
    let (client, conn) = bounded("connect", timeout, c.connect(NoTls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// What one probe of a running server reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub in_recovery: bool,
    pub timeline: u32,
    pub wal: u64,
    pub receive: Option<u64>,
    pub streaming: bool,
    /// `host` of the WAL receiver's connection, if any.
    pub sender_host: Option<String>,
    /// Parameters whose files say another value than the server runs until a restart.
    pub pending_restart: Vec<String>,
}

const PROBE: &str = "
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery()
            THEN COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), (SELECT timeline_id FROM pg_control_checkpoint()))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
       (CASE WHEN pg_is_in_recovery() THEN COALESCE(pg_last_wal_replay_lsn(), '0/0') ELSE pg_current_wal_lsn() END - '0/0')::bigint,
       (pg_last_wal_receive_lsn() - '0/0')::bigint,
       COALESCE((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false),
       (SELECT sender_host FROM pg_stat_wal_receiver),
       ARRAY(SELECT name FROM pg_settings WHERE pending_restart ORDER BY name)::text[]";

pub async fn probe(client: &Client, timeout: Duration) -> Result<Probe, SqlError> {
    let row = bounded("probe", timeout, client.query_one(PROBE, &[])).await?;
    Ok(Probe {
        in_recovery: row.get(0),
        timeline: row.get::<_, Option<i32>>(1).unwrap_or(0).max(0) as u32,
        wal: row.get::<_, Option<i64>>(2).unwrap_or(0).max(0) as u64,
        receive: row.get::<_, Option<i64>>(3).map(|v| v.max(0) as u64),
        streaming: row.get(4),
        sender_host: row.get(5),
        pending_restart: row.get::<_, Option<Vec<String>>>(6).unwrap_or_default(),
    })
}

/// Quote an identifier.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quote a string literal: right whatever `standard_conforming_strings` says (a backslash
/// goes into an escape string, doubled).
pub fn literal(s: &str) -> String {
    if s.contains('\\') {
        return format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"));
    }
    format!("'{}'", s.replace('\'', "''"))
}

/// The Citus database and extension, on a primary. Idempotent.
pub async fn ensure_database_and_extension(
    cfg: &AgentConfig,
    timeout: Duration,
) -> Result<(), SqlError> {
    let c = connect_local(cfg, "postgres", timeout).await?;
    let db = &cfg.citus.database;
    let has_db: bool = bounded(
        "check database",
        timeout,
        c.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[db],
        ),
    )
    .await?
    .get(0);
    if !has_db {
        bounded(
            "create the Citus database",
            Duration::from_secs(120),
            c.batch_execute(&format!("CREATE DATABASE {}", ident(db))),
        )
        .await?;
    }
    let d = connect_local(cfg, db, timeout).await?;
    bounded(
        "create extension citus",
        Duration::from_secs(120),
        d.batch_execute("CREATE EXTENSION IF NOT EXISTS citus"),
    )
    .await?;
    Ok(())
}

/// A role's password as PostgreSQL should store it: a SCRAM verifier computed here (with a
/// fresh salt), so the password itself is never part of a statement; only a password that
/// needs SASLprep goes as text for the server to hash.
fn password_value(password: &str) -> Result<String, SqlError> {
    let mut salt = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut salt));
    // Only ever a verifier computed here: the password itself never reaches the server as
    // SQL text (where `log_statement` or an error message could keep it).
    random
        .ok()
        .and_then(|_| super::scram::verifier(password, &salt, super::scram::ITERATIONS))
        .map(|v| literal(&v))
        .ok_or_else(|| SqlError::Failed {
            what: "set a password".into(),
            detail: "cannot compute a SCRAM verifier (no /dev/urandom?)".into(),
        })
}

/// The superuser's and the replication role's passwords, and this node's pg_dist_authinfo
/// row (`authinfo`: Some to set, None to remove), in one transaction on this primary: from
/// its commit on, the node both accepts and presents the new password. Citus's DDL
/// propagation is off for it — every group primary does its own (a rotation changes them all
/// within milliseconds of each other), and established connections between nodes are not
/// affected at all. A role whose stored verifier already matches is left alone.
pub async fn set_credentials(
    cfg: &AgentConfig,
    authinfo: Option<&str>,
    timeout: Duration,
) -> Result<(), SqlError> {
    let c = connect_local(cfg, &cfg.citus.database, timeout).await?;
    let su = &cfg.postgres.superuser;
    let repl = &cfg.postgres.replication;
    let stored = |name: &str| {
        let name = name.to_string();
        let c = &c;
        async move {
            bounded(
                "read roles",
                timeout,
                c.query_opt(
                    "SELECT COALESCE(rolpassword, '') FROM pg_authid WHERE rolname = $1",
                    &[&name],
                ),
            )
            .await
            .map(|r| r.map(|r| r.get::<_, String>(0)))
        }
    };
    let mut statements = vec![
        "BEGIN".to_string(),
        "SET LOCAL citus.enable_ddl_propagation = off".to_string(),
        // Never in a log: statements that set passwords carry verifiers, but still.
        "SET LOCAL log_statement = 'none'".to_string(),
    ];
    match stored(&repl.username).await? {
        None => statements.push(format!(
            "CREATE ROLE {} WITH REPLICATION LOGIN PASSWORD {}",
            ident(&repl.username),
            password_value(repl.password.expose())?
        )),
        Some(v) if !super::scram::verifier_matches(&v, repl.password.expose()) => {
            statements.push(format!(
                "ALTER ROLE {} WITH REPLICATION LOGIN PASSWORD {}",
                ident(&repl.username),
                password_value(repl.password.expose())?
            ))
        }
        Some(_) => {}
    }
    match stored(&su.username).await? {
        Some(v) if super::scram::verifier_matches(&v, su.password.expose()) => {}
        _ => statements.push(format!(
            "ALTER ROLE {} WITH PASSWORD {}",
            ident(&su.username),
            password_value(su.password.expose())?
        )),
    }
    let mut t = bounded(
        "set passwords",
        timeout,
        c.batch_execute(&statements.join("; ")),
    )
    .await;
    if t.is_ok() {
        t = match authinfo {
            Some(a) => bounded(
                "write pg_dist_authinfo",
                timeout,
                c.execute(
                    "INSERT INTO pg_catalog.pg_dist_authinfo (nodeid, rolename, authinfo) VALUES (0, $1, $2)
                     ON CONFLICT (rolename, nodeid) DO UPDATE SET authinfo = EXCLUDED.authinfo
                     WHERE pg_dist_authinfo.authinfo IS DISTINCT FROM EXCLUDED.authinfo",
                    &[&su.username, &a],
                ),
            )
            .await
            .map(|_| ()),
            None => bounded(
                "delete from pg_dist_authinfo",
                timeout,
                c.execute(
                    "DELETE FROM pg_catalog.pg_dist_authinfo WHERE nodeid = 0 AND rolename = $1",
                    &[&su.username],
                ),
            )
            .await
            .map(|_| ()),
        };
    }
    match t {
        Ok(()) => bounded("commit passwords", timeout, c.batch_execute("COMMIT")).await,
        Err(e) => {
            let _ = bounded("roll back", timeout, c.batch_execute("ROLLBACK")).await;
            Err(e)
        }
    }
}

/// Drop Citus's shard-move and shard-split logical slots on a standby: left by a move that a
/// switchover or failover interrupted while this server was the move's source, they can only
/// hold WAL back here (Citus retries the move from the new primary). Returns their names.
/// Other slots are not ours to touch.
pub async fn drop_citus_slots_on_standby(
    client: &Client,
    timeout: Duration,
) -> Result<Vec<String>, SqlError> {
    let rows = bounded(
        "drop leftover Citus slots",
        timeout,
        client.query(
            "SELECT name FROM (
               SELECT slot_name::text AS name, pg_drop_replication_slot(slot_name)
                 FROM pg_replication_slots
                WHERE pg_is_in_recovery() AND slot_type = 'logical' AND NOT active
                  AND slot_name ~ '^citus_shard_(move|split)_slot(_[0-9]+){2,3}$') dropped",
            &[],
        ),
    )
    .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The physical replication slots: (name, active, PostgreSQL gave it up: `wal_status = 'lost'`).
pub async fn physical_slots(
    client: &Client,
    timeout: Duration,
) -> Result<Vec<(String, bool, bool)>, SqlError> {
    let rows = bounded(
        "read pg_replication_slots",
        timeout,
        client.query(
            "SELECT slot_name::text, active, COALESCE(wal_status, '') = 'lost'
               FROM pg_replication_slots WHERE slot_type = 'physical'",
            &[],
        ),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Create a physical slot that holds WAL at once (from the last checkpoint's redo point on a
/// primary, the last restartpoint on a standby); returns the position it holds from.
pub async fn create_physical_slot(
    client: &Client,
    name: &str,
    timeout: Duration,
) -> Result<u64, SqlError> {
    let row = bounded(
        "create a replication slot",
        timeout,
        client.query_one(
            "SELECT (lsn - '0/0')::bigint FROM pg_create_physical_replication_slot($1, true)",
            &[&name],
        ),
    )
    .await?;
    Ok(row.get::<_, Option<i64>>(0).unwrap_or(0).max(0) as u64)
}

/// Where the oldest WAL segment in `pg_wal` begins (any timeline): WAL before it is gone.
/// Recycled segments are renamed to future names, so the smallest name is the oldest kept.
pub async fn oldest_wal(client: &Client, timeout: Duration) -> Result<Option<u64>, SqlError> {
    let row = bounded(
        "find the oldest WAL segment",
        timeout,
        client.query_one(
            "SELECT ('x' || substr(m, 1, 8))::bit(32)::bigint * 4294967296
                  + ('x' || substr(m, 9, 8))::bit(32)::bigint
                    * (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')
               FROM (SELECT min(substr(name, 9, 16)) AS m FROM pg_ls_waldir()
                      WHERE name ~ '^[0-9A-F]{24}$') oldest",
            &[],
        ),
    )
    .await?;
    Ok(row.get::<_, Option<i64>>(0).map(|v| v.max(0) as u64))
}

/// The history file of timeline `tli` on the server behind `client` (superuser), parsed; an
/// empty history for timeline 1.
pub async fn timeline_history(
    client: &Client,
    tli: u32,
    timeout: Duration,
) -> Result<Vec<super::timeline::Switch>, SqlError> {
    let Some(file) = super::timeline::history_file(tli) else {
        return Ok(Vec::new());
    };
    let row = bounded(
        "read a timeline history",
        timeout,
        client.query_one("SELECT pg_read_file($1)", &[&file]),
    )
    .await?;
    let text: String = row.get(0);
    super::timeline::parse_history(&text).ok_or_else(|| SqlError::Failed {
        what: format!("read {file}"),
        detail: "not a timeline history".into(),
    })
}

/// Drop a replication slot unless something uses it.
pub async fn drop_inactive_slot(
    client: &Client,
    name: &str,
    timeout: Duration,
) -> Result<bool, SqlError> {
    let rows = bounded(
        "drop a replication slot",
        timeout,
        client.query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = $1 AND NOT active",
            &[&name],
        ),
    )
    .await?;
    Ok(!rows.is_empty())
}

/// Promote and wait (bounded) until the server accepts writes. `pg_promote(wait => true)`
/// looks only every 100 ms; during a switchover every one of those counts, so this asks
/// without waiting and then looks every 5 ms.
pub async fn promote(client: &Client, timeout: Duration) -> Result<(), SqlError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let signalled: bool = bounded(
        "promote",
        timeout,
        client.query_one("SELECT pg_promote(false)", &[]),
    )
    .await?
    .get(0);
    if !signalled {
        return Err(SqlError::Failed {
            what: "promote".into(),
            detail: "pg_promote returned false".into(),
        });
    }
    loop {
        let in_recovery: bool = bounded(
            "promote",
            timeout,
            client.query_one("SELECT pg_is_in_recovery()", &[]),
        )
        .await?
        .get(0);
        if !in_recovery {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SqlError::Timeout {
                what: "promote".into(),
                ms: timeout.as_millis(),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Remove what `ALTER SYSTEM` put in postgresql.auto.conf (it overrides the spec's
/// postgresql.conf) and reload — but what Citus writes there itself to turn SSL on (see
/// `conf::foreign_alter_system`). Returns the parameters it removed; nothing is done when
/// there are none. Allowed on a standby too.
pub async fn reset_alter_system(
    client: &Client,
    timeout: Duration,
) -> Result<Vec<String>, SqlError> {
    let rows = bounded(
        "read postgresql.auto.conf",
        timeout,
        client.query(
            "SELECT name, setting FROM pg_file_settings WHERE sourcefile LIKE '%/postgresql.auto.conf'",
            &[],
        ),
    )
    .await?;
    let settings: std::collections::BTreeMap<String, String> = rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
        .collect();
    let names = crate::postgres::conf::foreign_alter_system(&settings);
    for name in &names {
        bounded(
            "ALTER SYSTEM RESET",
            timeout,
            client.batch_execute(&format!(
                "ALTER SYSTEM RESET {}",
                name.split('.').map(ident).collect::<Vec<_>>().join(".")
            )),
        )
        .await?;
    }
    if !names.is_empty() {
        reload(client, timeout).await?;
    }
    Ok(names)
}

pub async fn reload(client: &Client, timeout: Duration) -> Result<(), SqlError> {
    bounded(
        "reload",
        timeout,
        client.batch_execute("SELECT pg_reload_conf()"),
    )
    .await
}

pub async fn checkpoint(client: &Client, timeout: Duration) -> Result<(), SqlError> {
    bounded("checkpoint", timeout, client.batch_execute("CHECKPOINT")).await
}
