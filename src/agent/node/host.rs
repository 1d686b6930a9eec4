//! What the node does to its PostgreSQL server and reads from it: files, programs, the
//! postmaster, SQL on its own session, and probes of other members' servers.
//!
//! `LocalHost` does it for real (`postgres::process`, `postgres::sql`). The deterministic
//! simulation (`tests/simulation.rs`) provides simulated servers instead, so the real loop,
//! executor and decisions run against crashes, slow stops and timelines it controls.

use std::time::Duration;

use crate::agent::config::{AgentConfig, Paths};
use crate::postgres::conf::Role;
use crate::postgres::process::{Control, Pg, PgError, Postmaster, StopMode};
use crate::postgres::sql::{self, Probe};
use crate::postgres::timeline::{self, Switch};
use crate::spec::model::PoolerSpec;

/// A started postmaster.
#[allow(async_fn_in_trait)]
pub trait Process {
    fn pid(&self) -> u32;
    /// Exited already? Returns the exit description.
    fn exited(&mut self) -> Option<String>;
    /// Stop it and wait (bounded), escalating to immediate and then SIGKILL.
    async fn stop(&mut self, mode: StopMode, timeout: Duration);
    /// Until it exits.
    async fn wait(&mut self);
}

impl Process for Postmaster {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn exited(&mut self) -> Option<String> {
        Postmaster::exited(self)
    }

    async fn stop(&mut self, mode: StopMode, timeout: Duration) {
        Postmaster::stop(self, mode, timeout).await
    }

    async fn wait(&mut self) {
        let _ = self.child.wait().await;
    }
}

/// One standby as the primary's `pg_stat_replication` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub name: String,
    pub state: String,
    pub sync_state: String,
    pub flush_lsn: u64,
}

/// The member's PostgreSQL server.
#[allow(async_fn_in_trait)]
pub trait Host {
    type Postmaster: Process;

    /// A new configuration (secrets, parameters) for everything written from now on.
    fn set_config(&mut self, cfg: AgentConfig);

    // ------------------------------------------------------------ files and programs
    fn prepare_host_files(&self) -> Result<(), PgError>;
    fn write_conf(&self, role: &Role) -> Result<(), PgError>;
    fn write_postgresql_conf(&self) -> Result<(), PgError>;
    /// Line 8 of `postmaster.pid`: "starting", "ready", "standby", "stopping".
    fn pid_file_status(&self) -> Option<String>;
    fn data_dir_exists(&self) -> bool;
    /// Rename the data directory out of the way (never deleted), tagged with `why`.
    fn set_aside(&self, why: &str) -> Result<(), String>;
    /// Remember, across restarts of the agent, which cluster this member's own bootstrap
    /// made (`Snapshot::bootstrapped_here`).
    fn remember_bootstrap(&self, sysid: &str) -> Result<(), String>;
    fn bootstrapped_here(&self) -> Option<String>;
    async fn initdb(&self) -> Result<(), PgError>;
    async fn basebackup(&self, host: &str, port: u16) -> Result<(), PgError>;
    async fn rewind(&self, host: &str, port: u16) -> Result<(), PgError>;
    async fn controldata(&self) -> Result<Option<Control>, PgError>;
    /// The ancestors of timeline `tli` from this data directory's history file.
    fn timeline_history(&self, tli: u32) -> Result<Vec<Switch>, String>;
    /// Make PostgreSQL's next promotion from timeline `current` pick timeline `next`: a
    /// history file for each number in between (PostgreSQL takes the newest history file
    /// it finds, counting up from its own timeline, plus one).
    fn skip_timelines(&self, current: u32, next: u32) -> Result<(), String>;
    fn start(&self) -> Result<Self::Postmaster, PgError>;
    fn write_pgbouncer_files(&self, pooler: &PoolerSpec) -> Result<bool, PgError>;
    fn start_pgbouncer(&self) -> Result<tokio::process::Child, PgError>;
    fn pgbouncer_log(&self) -> String;

    // ------------------------------------------------------------ the node's own session
    /// Connect unless a session is open. True when one is.
    async fn connect(&mut self, timeout: Duration) -> bool;
    fn disconnect(&mut self);
    fn connected(&self) -> bool;
    async fn probe(&self, timeout: Duration) -> Result<Probe, String>;
    async fn promote(&self, timeout: Duration) -> Result<(), String>;
    /// `pg_reload_conf()`; nothing without a session.
    async fn reload(&self, timeout: Duration) -> Result<(), String>;
    async fn checkpoint(&self, timeout: Duration) -> Result<(), String>;
    async fn system_identifier(&self, timeout: Duration) -> Option<String>;
    async fn oldest_wal(&self, timeout: Duration) -> Option<u64>;
    /// Remove settings made with ALTER SYSTEM; their names.
    async fn reset_alter_system(&self, timeout: Duration) -> Result<Vec<String>, String>;
    async fn current_wal(&self, timeout: Duration) -> Result<u64, String>;
    async fn replication(&self, timeout: Duration) -> Result<Vec<Replication>, String>;
    /// (name, active, lost)
    async fn physical_slots(&self, timeout: Duration) -> Result<Vec<(String, bool, bool)>, String>;
    async fn create_physical_slot(&self, name: &str, timeout: Duration) -> Result<u64, String>;
    async fn drop_inactive_slot(&self, name: &str, timeout: Duration) -> Result<bool, String>;

    // ------------------------------------------------------------ sessions of their own
    /// Database, extension, roles, passwords and this node's authinfo row.
    async fn ensure_setup(&self, authinfo: Option<&str>, timeout: Duration) -> Result<(), String>;
    /// `pg_reload_conf()`, then the parameters that still wait for a restart.
    async fn reload_and_pending_restart(&self, timeout: Duration) -> Result<Vec<String>, String>;
    /// A session on the Citus database, for the Citus metadata duties (None: no Citus here).
    async fn citus_session(
        &self,
        timeout: Duration,
    ) -> Result<Option<tokio_postgres::Client>, String>;

    // ------------------------------------------------------------ other members
    async fn probe_member(&self, host: &str, port: u16, timeout: Duration)
    -> Result<Probe, String>;
    async fn checkpoint_member(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<(), String>;
    /// The ancestors of timeline `tli` on another member's server.
    async fn member_timeline_history(
        &self,
        host: &str,
        port: u16,
        tli: u32,
        timeout: Duration,
    ) -> Result<Vec<Switch>, String>;
}

/// This machine's PostgreSQL.
pub struct LocalHost {
    pub pg: Pg,
    client: Option<tokio_postgres::Client>,
}

impl LocalHost {
    pub fn new(pg: Pg) -> LocalHost {
        LocalHost { pg, client: None }
    }

    fn session(&self) -> Result<&tokio_postgres::Client, String> {
        self.client
            .as_ref()
            .ok_or_else(|| "not connected to PostgreSQL".to_string())
    }
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Host for LocalHost {
    type Postmaster = Postmaster;

    fn set_config(&mut self, cfg: AgentConfig) {
        self.pg.cfg = cfg;
    }

    fn prepare_host_files(&self) -> Result<(), PgError> {
        self.pg.prepare_host_files()
    }

    fn write_conf(&self, role: &Role) -> Result<(), PgError> {
        self.pg.write_conf(role)
    }

    fn write_postgresql_conf(&self) -> Result<(), PgError> {
        self.pg.write_postgresql_conf()
    }

    fn pid_file_status(&self) -> Option<String> {
        self.pg.pid_file_status()
    }

    fn data_dir_exists(&self) -> bool {
        self.pg.data_dir().exists()
    }

    fn remember_bootstrap(&self, sysid: &str) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = Paths::new(&self.pg.cfg.install_dir).bootstrap_marker();
        // The install folder is root's; still, never through a link.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("{path}: {e}"))?;
        std::io::Write::write_all(&mut f, sysid.as_bytes()).map_err(|e| format!("{path}: {e}"))
    }

    fn bootstrapped_here(&self) -> Option<String> {
        let path = Paths::new(&self.pg.cfg.install_dir).bootstrap_marker();
        let text = std::fs::read_to_string(path).ok()?;
        let sysid = text.trim();
        (!sysid.is_empty() && sysid.bytes().all(|b| b.is_ascii_digit())).then(|| sysid.to_string())
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

    async fn initdb(&self) -> Result<(), PgError> {
        self.pg.initdb().await
    }

    async fn basebackup(&self, host: &str, port: u16) -> Result<(), PgError> {
        self.pg.basebackup(host, port).await
    }

    async fn rewind(&self, host: &str, port: u16) -> Result<(), PgError> {
        self.pg.rewind(host, port).await
    }

    async fn controldata(&self) -> Result<Option<Control>, PgError> {
        self.pg.controldata().await
    }

    fn skip_timelines(&self, current: u32, next: u32) -> Result<(), String> {
        // Only the placeholders' content needs our history, and PostgreSQL only checks that
        // they exist: without our own history file (a clone that lacks it) they start at 0.
        let ancestors = self.timeline_history(current).unwrap_or_default();
        let begins = ancestors.last().map(|s| s.end).unwrap_or(0);
        for tli in current.saturating_add(1)..next {
            let Some(file) = timeline::history_file(tli) else {
                continue;
            };
            let path = self.pg.data_dir().join(&file);
            if path.exists() {
                continue;
            }
            // A valid history (PostgreSQL may read it while it looks for the newest
            // timeline) that forks off at the start of our timeline: before anything a
            // standby has replayed, so recovery never switches to it.
            let text = timeline::placeholder_history(&ancestors, current, begins);
            self.pg
                .write_owned(&path, &text, 0o600)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn timeline_history(&self, tli: u32) -> Result<Vec<Switch>, String> {
        let Some(file) = timeline::history_file(tli) else {
            return Ok(Vec::new());
        };
        let path = self.pg.data_dir().join(&file);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        timeline::parse_history(&text)
            .ok_or_else(|| format!("{}: not a timeline history", path.display()))
    }

    fn start(&self) -> Result<Postmaster, PgError> {
        self.pg.start()
    }

    fn write_pgbouncer_files(&self, pooler: &PoolerSpec) -> Result<bool, PgError> {
        self.pg.write_pgbouncer_files(pooler)
    }

    fn start_pgbouncer(&self) -> Result<tokio::process::Child, PgError> {
        self.pg.start_pgbouncer()
    }

    fn pgbouncer_log(&self) -> String {
        self.pg.paths.pgbouncer_log()
    }

    async fn connect(&mut self, timeout: Duration) -> bool {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = sql::connect_local(&self.pg.cfg, "postgres", timeout)
                .await
                .ok();
        }
        self.client.is_some()
    }

    fn disconnect(&mut self) {
        self.client = None;
    }

    fn connected(&self) -> bool {
        self.client.is_some()
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe, String> {
        sql::probe(self.session()?, timeout).await.map_err(text)
    }

    async fn promote(&self, timeout: Duration) -> Result<(), String> {
        sql::promote(self.session()?, timeout).await.map_err(text)
    }

    async fn reload(&self, timeout: Duration) -> Result<(), String> {
        match &self.client {
            Some(c) => sql::reload(c, timeout).await.map_err(text),
            None => Ok(()),
        }
    }

    async fn checkpoint(&self, timeout: Duration) -> Result<(), String> {
        sql::checkpoint(self.session()?, timeout)
            .await
            .map_err(text)
    }

    async fn system_identifier(&self, timeout: Duration) -> Option<String> {
        let c = self.client.as_ref()?;
        let row = sql::bounded(
            "system identifier",
            timeout,
            c.query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            ),
        )
        .await
        .ok()?;
        Some(row.get(0))
    }

    async fn oldest_wal(&self, timeout: Duration) -> Option<u64> {
        let c = self.client.as_ref()?;
        sql::oldest_wal(c, timeout).await.unwrap_or(None)
    }

    async fn reset_alter_system(&self, timeout: Duration) -> Result<Vec<String>, String> {
        sql::reset_alter_system(self.session()?, timeout)
            .await
            .map_err(text)
    }

    async fn current_wal(&self, timeout: Duration) -> Result<u64, String> {
        let row = sql::bounded(
            "current WAL position",
            timeout,
            self.session()?
                .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[]),
        )
        .await
        .map_err(text)?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    async fn replication(&self, timeout: Duration) -> Result<Vec<Replication>, String> {
        let rows = sql::bounded(
            "read pg_stat_replication",
            timeout,
            self.session()?.query("SELECT application_name, state, COALESCE(sync_state, ''), COALESCE((flush_lsn - '0/0')::bigint, 0) FROM pg_stat_replication", &[]),
        )
        .await
        .map_err(text)?;
        Ok(rows
            .iter()
            .map(|r| Replication {
                name: r.get(0),
                state: r.get(1),
                sync_state: r.get(2),
                flush_lsn: r.get::<_, i64>(3).max(0) as u64,
            })
            .collect())
    }

    async fn physical_slots(&self, timeout: Duration) -> Result<Vec<(String, bool, bool)>, String> {
        sql::physical_slots(self.session()?, timeout)
            .await
            .map_err(text)
    }

    async fn create_physical_slot(&self, name: &str, timeout: Duration) -> Result<u64, String> {
        sql::create_physical_slot(self.session()?, name, timeout)
            .await
            .map_err(text)
    }

    async fn drop_inactive_slot(&self, name: &str, timeout: Duration) -> Result<bool, String> {
        sql::drop_inactive_slot(self.session()?, name, timeout)
            .await
            .map_err(text)
    }

    async fn ensure_setup(&self, authinfo: Option<&str>, timeout: Duration) -> Result<(), String> {
        sql::ensure_database_and_extension(&self.pg.cfg, timeout)
            .await
            .map_err(text)?;
        sql::set_credentials(&self.pg.cfg, authinfo, timeout)
            .await
            .map_err(text)
    }

    async fn reload_and_pending_restart(&self, timeout: Duration) -> Result<Vec<String>, String> {
        let c = sql::connect_local(&self.pg.cfg, "postgres", timeout)
            .await
            .map_err(text)?;
        sql::bounded(
            "reload the configuration",
            timeout,
            c.simple_query("SELECT pg_reload_conf()"),
        )
        .await
        .map_err(text)?;
        // The postmaster takes the signal asynchronously; a new session sees its result.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = sql::connect_local(&self.pg.cfg, "postgres", timeout)
            .await
            .map_err(text)?;
        let rows = sql::bounded(
            "read pending_restart",
            timeout,
            c.query("SELECT name FROM pg_settings WHERE pending_restart", &[]),
        )
        .await
        .map_err(text)?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    async fn citus_session(
        &self,
        timeout: Duration,
    ) -> Result<Option<tokio_postgres::Client>, String> {
        sql::connect_local(&self.pg.cfg, &self.pg.cfg.citus.database, timeout)
            .await
            .map(Some)
            .map_err(text)
    }

    async fn probe_member(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Probe, String> {
        let c = sql::connect_member(&self.pg.cfg, host, port, timeout)
            .await
            .map_err(text)?;
        sql::probe(&c, timeout).await.map_err(text)
    }

    async fn checkpoint_member(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<(), String> {
        let connect = Duration::from_secs(u64::from(self.pg.cfg.ha.retry_timeout.max(1)));
        let c = sql::connect_member(&self.pg.cfg, host, port, connect)
            .await
            .map_err(text)?;
        sql::checkpoint(&c, timeout).await.map_err(text)
    }

    async fn member_timeline_history(
        &self,
        host: &str,
        port: u16,
        tli: u32,
        timeout: Duration,
    ) -> Result<Vec<Switch>, String> {
        let c = sql::connect_member(&self.pg.cfg, host, port, timeout)
            .await
            .map_err(text)?;
        sql::timeline_history(&c, tli, timeout).await.map_err(text)
    }
}
