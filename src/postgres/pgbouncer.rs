//! PgBouncer in front of a worker member (`citus.pooler`): its configuration as text (pure)
//! and the process, the agent's child like the postmaster, run as the `postgres` user.
//!
//! Citus reaches it through `pg_dist_poolinfo` rows that hold only `port=…`: the host stays
//! the node's own name from `pg_dist_node`, so the rows never change when a failover moves
//! a group's row to another member — every member runs its own PgBouncer on the same port.
//!
//! PgBouncer accepts Citus's TLS connections with PostgreSQL's own certificate, checks the
//! superuser's password from its auth file (other roles' verifiers come from `pg_shadow`
//! through `auth_query`), and reaches PostgreSQL over the Unix socket, which only the
//! `postgres` user can open. Session pooling: Citus's connections keep session state
//! (prepared transactions, settings) that transaction pooling would break.

use std::path::Path;

use tokio::process::{Child, Command};

use super::process::{Pg, PgError};
use crate::agent::config::{AgentConfig, Paths};
use crate::spec::model::PoolerSpec;

fn bad(what: &str, detail: impl std::fmt::Display) -> PgError {
    PgError::Failed {
        step: format!("PgBouncer configuration: {what}"),
        detail: detail.to_string(),
    }
}

/// A value for a line of pgbouncer.ini, which runs to the end of the line: no line breaks or
/// other control characters, and (inside a connection string) no quotes or backslashes.
fn ini_value<'a>(what: &str, v: &'a str, in_connstring: bool) -> Result<&'a str, PgError> {
    if v.chars().any(|c| c.is_control()) {
        return Err(bad(what, "contains a control character"));
    }
    if in_connstring && (v.contains('\'') || v.contains('\\') || v.contains(' ')) {
        return Err(bad(what, "contains a quote, a backslash or a space"));
    }
    Ok(v)
}

/// PostgreSQL's certificate and key (its `ssl_cert_file` / `ssl_key_file`, relative to the
/// data directory unless absolute), which PgBouncer presents to Citus.
pub fn tls_files(cfg: &AgentConfig) -> (String, String) {
    let at = |param: &str, default: &str| {
        let v = cfg
            .postgres
            .parameters
            .get(param)
            .map(|s| s.as_str())
            .unwrap_or(default);
        if v.starts_with('/') {
            v.to_string()
        } else {
            format!("{}/{v}", cfg.postgres.data_dir.trim_end_matches('/'))
        }
    };
    (
        at("ssl_cert_file", "server.crt"),
        at("ssl_key_file", "server.key"),
    )
}

/// pgbouncer.ini for this member.
pub fn render_ini(cfg: &AgentConfig, pooler: &PoolerSpec) -> Result<String, PgError> {
    let paths = Paths::new(&cfg.install_dir);
    let socket_dir = paths.socket_dir();
    let (cert, key) = tls_files(cfg);
    let superuser = &cfg.postgres.superuser.username;
    let mut out = String::from(
        "; Managed by citus-reconcile (citus.pooler in the spec); edits are overwritten.\n",
    );
    out.push_str("[databases]\n");
    out.push_str(&format!(
        "* = host={} port={}\n",
        ini_value("socket folder", &socket_dir, true)?,
        cfg.postgres.port
    ));
    out.push_str("\n[pgbouncer]\n");
    let mut set = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
    set(
        "listen_addr",
        ini_value("address", &cfg.address, false)?.into(),
    );
    set("listen_port", pooler.port.to_string());
    // No socket: the lab's hosts share one file system, and nothing local needs one.
    set("unix_socket_dir", String::new());
    set("pool_mode", "session".into());
    let max_connections = u32::try_from(super::conf::max_connections(cfg)).unwrap_or(u32::MAX);
    set(
        "default_pool_size",
        pooler
            .pool_size
            .unwrap_or_else(|| crate::spec::rules::pooler_pool_size(max_connections))
            .to_string(),
    );
    set("max_client_conn", pooler.max_client_conn.to_string());
    set("auth_type", "scram-sha-256".into());
    set(
        "auth_file",
        ini_value("auth file", &paths.pgbouncer_users(), false)?.into(),
    );
    set(
        "auth_user",
        ini_value("superuser", superuser, false)?.into(),
    );
    set(
        "auth_query",
        "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1".into(),
    );
    set("admin_users", superuser.clone());
    set("stats_users", superuser.clone());
    set("client_tls_sslmode", "require".into());
    set(
        "client_tls_cert_file",
        ini_value("certificate", &cert, false)?.into(),
    );
    set("client_tls_key_file", ini_value("key", &key, false)?.into());
    // Logs go to stderr, which the agent points at pgbouncer.log; Citus opens and closes
    // connections all the time, so those are not logged one by one.
    set("logfile", String::new());
    set("pidfile", String::new());
    set("log_connections", "0".into());
    set("log_disconnections", "0".into());
    set("tcp_keepalive", "1".into());
    Ok(out)
}

/// The auth file: the superuser's password (mode 0600, owned by postgres).
pub fn render_users(cfg: &AgentConfig) -> Result<String, PgError> {
    let quoted = |what: &str, v: &str| -> Result<String, PgError> {
        if v.contains('\n') || v.contains('\r') || v.contains('\0') {
            return Err(bad(what, "contains a line break"));
        }
        Ok(format!("\"{}\"", v.replace('"', "\"\"")))
    };
    let su = &cfg.postgres.superuser;
    Ok(format!(
        "{} {}\n",
        quoted("superuser name", &su.username)?,
        quoted("superuser password", su.password.expose())?
    ))
}

impl Pg {
    /// Write pgbouncer.ini and the auth file if their content differs. True when either
    /// changed (PgBouncer must start again to use them).
    pub fn write_pgbouncer_files(&self, pooler: &PoolerSpec) -> Result<bool, PgError> {
        let mut changed = false;
        for (path, text) in [
            (self.paths.pgbouncer_ini(), render_ini(&self.cfg, pooler)?),
            (self.paths.pgbouncer_users(), render_users(&self.cfg)?),
        ] {
            let path = Path::new(&path);
            if std::fs::read_to_string(path).ok().as_deref() != Some(text.as_str()) {
                self.write_owned(path, &text, 0o600)?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Start PgBouncer as the agent's child, as postgres, with the service environment. It
    /// gets SIGKILL if the agent dies (the postmaster gets SIGQUIT): nothing to flush, and
    /// PgBouncer's orderly-stop signals changed meaning in 1.23.
    pub fn start_pgbouncer(&self) -> Result<Child, PgError> {
        let step = "start pgbouncer";
        let mut cmd = Command::new("pgbouncer");
        cmd.arg(self.paths.pgbouncer_ini()).kill_on_drop(true);
        self.as_service_child(&mut cmd, &self.paths.pgbouncer_log(), libc::SIGKILL)
            .map_err(|e| bad("log", e))?;
        cmd.spawn().map_err(|e| PgError::Failed {
            step: step.into(),
            detail: format!("{e} (is the pgbouncer package installed?)"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AgentConfig {
        let mut c = crate::agent::config::sample();
        c.address = "10.0.0.5".into();
        c.install_dir = "/opt/cr".into();
        c.postgres.data_dir = "/var/lib/pg/data".into();
        c
    }

    const POOLER: PoolerSpec = PoolerSpec {
        port: 6432,
        pool_size: None,
        max_client_conn: 500,
    };

    #[test]
    fn ini_points_at_the_socket_and_presents_postgres_certificate() {
        let ini = render_ini(&cfg(), &POOLER).expect("renders");
        for line in [
            "* = host=/opt/cr/run port=5432",
            "listen_addr = 10.0.0.5",
            "listen_port = 6432",
            "unix_socket_dir = ",
            "pool_mode = session",
            "default_pool_size = 90",
            "client_tls_sslmode = require",
            "client_tls_cert_file = /var/lib/pg/data/server.crt",
            "client_tls_key_file = /var/lib/pg/data/server.key",
            "auth_file = /opt/cr/pgbouncer-users.txt",
        ] {
            assert!(ini.lines().any(|l| l == line), "{line:?} missing in\n{ini}");
        }
        let mut c = cfg();
        c.postgres
            .parameters
            .insert("ssl_cert_file".into(), "/etc/ssl/pg.crt".into());
        c.postgres
            .parameters
            .insert("ssl_key_file".into(), "tls/pg.key".into());
        assert_eq!(
            tls_files(&c),
            (
                "/etc/ssl/pg.crt".to_string(),
                "/var/lib/pg/data/tls/pg.key".to_string()
            )
        );
    }

    #[test]
    fn hostile_values_never_make_a_line_of_their_own() {
        let mut c = cfg();
        c.install_dir = "/opt/x\nauth_type = trust".into();
        assert!(render_ini(&c, &POOLER).is_err());
        let mut c = cfg();
        c.install_dir = "/opt/it's".into();
        assert!(render_ini(&c, &POOLER).is_err());
        let mut c = cfg();
        c.postgres.superuser.password = crate::spec::secret::Secret::new("a\"b");
        assert_eq!(render_users(&c).expect("renders"), "\"u\" \"a\"\"b\"\n");
        c.postgres.superuser.password = crate::spec::secret::Secret::new("a\n\"x\" \"y\"");
        assert!(render_users(&c).is_err());
    }
}
