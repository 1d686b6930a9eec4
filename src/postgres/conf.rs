//! PostgreSQL configuration text the agent writes: `postgresql.conf` (role-independent),
//! `citus-reconcile.role.conf` (what differs between primary and replica), `pg_hba.conf`,
//! the passfile, and libpq connection strings. Pure.

use std::collections::BTreeMap;

use crate::agent::config::{AgentConfig, Paths};

/// The file that holds role-dependent settings, included by postgresql.conf.
pub const ROLE_CONF: &str = "citus-reconcile.role.conf";

/// Quote a value for postgresql.conf.
pub fn quote_conf(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quote a value for a libpq keyword/value string.
pub fn quote_libpq(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:@".contains(c))
    {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Settings of postgresql.conf: citus-reconcile's own, then the spec's on top.
/// `max_connections` as the spec sets it, or PostgreSQL's default.
pub fn max_connections(cfg: &AgentConfig) -> u64 {
    cfg.postgres
        .parameters
        .get("max_connections")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

pub fn parameters(cfg: &AgentConfig) -> BTreeMap<String, String> {
    let user = &cfg.postgres.parameters;
    let paths = Paths::new(&cfg.install_dir);
    let max_connections = max_connections(cfg);
    let mut p: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        p.insert(k.to_string(), v);
    };
    set("listen_addresses", cfg.address.clone());
    set("port", cfg.postgres.port.to_string());
    set("unix_socket_directories", paths.socket_dir());
    set("unix_socket_permissions", "0700".into());
    set("cluster_name", format!("{}-{}", cfg.cluster, cfg.member));
    set("max_connections", max_connections.to_string());
    set(
        "max_prepared_transactions",
        (2 * max_connections).to_string(),
    );
    set("wal_level", "logical".into());
    set("wal_log_hints", "on".into());
    set("hot_standby", "on".into());
    set("max_wal_senders", "10".into());
    set("max_replication_slots", "10".into());
    set("wal_keep_size", "512MB".into());
    // Member slots keep WAL for standbys that are behind or down; this bounds how much, so a
    // dead standby cannot fill the primary's disk (past it, the slot is lost and the standby
    // is cloned again). Also with `use_slots` off: slots made while it was on would otherwise
    // hold WAL without limit.
    set(
        "max_slot_wal_keep_size",
        DEFAULT_MAX_SLOT_WAL_KEEP_SIZE.into(),
    );
    set("password_encryption", "scram-sha-256".into());
    set("logging_collector", "off".into());
    // Citus's own connections between nodes: TLS, as Citus requires by default, and TCP
    // timeouts, so a statement waiting on a server that went silent (no reset: a host that
    // crashed or was cut off) fails within seconds instead of waiting out the kernel's
    // retransmissions — minutes during which it holds its shard locks, and the row move of a
    // failover (or a write pause) waits for them. It holds them about twice this long (the
    // statement fails, then Citus's cancel request to the silent server times out too), which
    // stays well inside the lease: the new primary is not there before.
    let user_timeout_ms = citus_tcp_user_timeout_ms(cfg.ha.ttl);
    set(
        "citus.node_conninfo",
        format!(
            "sslmode=require tcp_user_timeout={user_timeout_ms} keepalives=1 keepalives_idle={} keepalives_interval=1 keepalives_count=2",
            user_timeout_ms.div_ceil(1000)
        ),
    );
    // Setting up a connection (fork, TLS, SCRAM, Citus's backend start) takes well over a
    // second on a loaded host, and a statement whose connection times out fails: 5 s keeps
    // that from happening to a live server, and a dead one costs only a statement that was
    // going to fail until its row moves anyway (after the lease, longer than this).
    set(
        "citus.node_connection_timeout",
        user_timeout_ms.max(NODE_CONNECTION_TIMEOUT_MS).to_string(),
    );
    // Citus connects to its own server for background work (the rebalancer's tasks, shard
    // splits) at this name; the default, localhost, is not where the server listens.
    set("citus.local_hostname", cfg.address.clone());
    for (k, v) in user {
        if k != "shared_preload_libraries" {
            set(k, v.clone());
        }
    }
    // citus must come first in shared_preload_libraries.
    let mut libs = vec!["citus".to_string()];
    if let Some(extra) = user.get("shared_preload_libraries") {
        for lib in extra
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "citus")
        {
            libs.push(lib.to_string());
        }
    }
    set("shared_preload_libraries", libs.join(","));
    p
}

/// Parameters a standby must keep at least as high as its primary (PostgreSQL refuses hot
/// standby otherwise), so a decrease must reach the primary first.
pub const STANDBY_AT_LEAST: [&str; 5] = [
    "max_connections",
    "max_locks_per_transaction",
    "max_prepared_transactions",
    "max_wal_senders",
    "max_worker_processes",
];

/// The `name = 'value'` lines of a postgresql.conf we rendered (see `render_postgresql_conf`).
pub fn parse_postgresql_conf(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .map(|v| v.replace("''", "'").replace("\\\\", "\\"))
                .unwrap_or_else(|| v.to_string());
            Some((k.trim().to_string(), v))
        })
        .collect()
}

/// Which of `STANDBY_AT_LEAST` go down from `current` to `desired`, as "name old → new".
pub fn lowered_standby_minimums(current: &str, desired: &str) -> Vec<String> {
    let (old, new) = (
        parse_postgresql_conf(current),
        parse_postgresql_conf(desired),
    );
    STANDBY_AT_LEAST
        .iter()
        .filter_map(|k| {
            let (a, b) = (old.get(*k)?, new.get(*k)?);
            let (x, y) = (a.parse::<i64>().ok()?, b.parse::<i64>().ok()?);
            (y < x).then(|| format!("{k} {a} → {b}"))
        })
        .collect()
}

/// The ciphers `CREATE EXTENSION citus` sets with `ALTER SYSTEM` (with `ssl = on`) on a
/// server that has SSL off: TLS 1.2 and up.
pub const CITUS_SSL_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384";

/// Settings of postgresql.auto.conf (name → value) that override the spec: all but the two
/// Citus writes itself when it turns SSL on (`ssl = on` and its cipher list), which its
/// connections between nodes need.
pub fn foreign_alter_system(auto_conf: &BTreeMap<String, String>) -> Vec<String> {
    auto_conf
        .iter()
        .filter(|(k, v)| {
            !matches!(
                (k.as_str(), v.as_str()),
                ("ssl", "on") | ("ssl", "true") | ("ssl_ciphers", CITUS_SSL_CIPHERS)
            )
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// WAL that member slots may hold back, unless the spec sets `max_slot_wal_keep_size`.
pub const DEFAULT_MAX_SLOT_WAL_KEEP_SIZE: &str = "4GB";

/// The physical replication slot the primary keeps for a member: PostgreSQL allows lower-case
/// letters, digits and underscores, at most 63 bytes. Host names are DNS labels (no `_`), so
/// two members never share a slot.
pub fn member_slot_name(member: &str) -> String {
    let mut name: String = member
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    name.truncate(63);
    name
}

/// Lower bound of `citus.node_connection_timeout`.
const NODE_CONNECTION_TIMEOUT_MS: u64 = 5000;

/// How long data sent on one of Citus's connections may stay unacknowledged before the kernel
/// drops the connection: a third of the lease, at most 5 s.
pub fn citus_tcp_user_timeout_ms(ttl_s: u32) -> u64 {
    (u64::from(ttl_s) * 1000 / 3).clamp(1000, 5000)
}

/// postgresql.conf: the same on every member of the cluster but for identity and ports.
pub fn render_postgresql_conf(cfg: &AgentConfig) -> String {
    let mut out = String::from(
        "# Managed by citus-reconcile; edits are overwritten. Set parameters in the spec (postgres.parameters).\n",
    );
    for (k, v) in parameters(cfg) {
        out.push_str(&format!("{k} = {}\n", quote_conf(&v)));
    }
    out.push_str(&format!("include_if_exists = {}\n", quote_conf(ROLE_CONF)));
    out
}

/// Where a member stands, for the role-dependent settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Primary {
        synchronous_standby_names: String,
    },
    /// A standby; `upstream` is `(host, port, application_name)` or None while no leader is known.
    Replica {
        upstream: Option<(String, u16)>,
    },
}

pub fn render_role_conf(cfg: &AgentConfig, role: &Role) -> String {
    let mut out = String::from("# Managed by citus-reconcile: role-dependent settings.\n");
    match role {
        Role::Primary {
            synchronous_standby_names,
        } => {
            out.push_str(&format!(
                "synchronous_standby_names = {}\n",
                quote_conf(synchronous_standby_names)
            ));
        }
        Role::Replica { upstream } => {
            if let Some((host, port)) = upstream {
                let conninfo = replication_conninfo(cfg, host, *port);
                out.push_str(&format!("primary_conninfo = {}\n", quote_conf(&conninfo)));
            }
            if cfg.ha.use_slots {
                out.push_str(&format!(
                    "primary_slot_name = {}\n",
                    quote_conf(&member_slot_name(&cfg.member))
                ));
            }
        }
    }
    // On every role: a restart-only parameter removed from the files counts as pending a
    // restart even when its default is the same, so a promoted member whose role file lost
    // it would report `pending_restart` on its next reload (and its reload look unconfirmed).
    out.push_str("recovery_target_timeline = 'latest'\n");
    out
}

/// How a standby connects to its upstream: the replication role, password from the passfile.
pub fn replication_conninfo(cfg: &AgentConfig, host: &str, port: u16) -> String {
    let paths = Paths::new(&cfg.install_dir);
    format!(
        "host={} port={port} user={} passfile={} application_name={} sslmode=prefer connect_timeout=3 keepalives_idle=5 keepalives_interval=2 keepalives_count=3",
        quote_libpq(host),
        quote_libpq(&cfg.postgres.replication.username),
        quote_libpq(&paths.pgpass()),
        quote_libpq(&cfg.member),
    )
}

/// pg_hba.conf: local socket trusted (its folder is 0700, reachable by root and postgres
/// only), then the spec's rules, then replication and the superuser (for Citus between nodes),
/// both with SCRAM passwords.
pub fn render_hba(cfg: &AgentConfig) -> String {
    let mut out = String::from(
        "# Managed by citus-reconcile; edits are overwritten. Add rules in the spec (postgres.pg_hba).\n",
    );
    out.push_str("local all all trust\n");
    for line in &cfg.postgres.pg_hba {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!(
        "host replication {} all scram-sha-256\n",
        cfg.postgres.replication.username
    ));
    out.push_str(&format!(
        "host all {} all scram-sha-256\n",
        cfg.postgres.superuser.username
    ));
    out
}

fn pgpass_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

/// The passfile (mode 0600, owned by postgres) for replication and Citus connections.
pub fn render_pgpass(cfg: &AgentConfig) -> String {
    let mut out = String::new();
    for c in [&cfg.postgres.replication, &cfg.postgres.superuser] {
        out.push_str(&format!(
            "*:*:*:{}:{}\n",
            pgpass_escape(&c.username),
            pgpass_escape(c.password.expose())
        ));
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn alter_system_but_citus_ssl_is_foreign() {
        let auto = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        for (settings, want) in [
            (
                auto(&[("ssl", "on"), ("ssl_ciphers", CITUS_SSL_CIPHERS)]),
                vec![],
            ),
            (
                auto(&[("ssl", "off"), ("work_mem", "1GB")]),
                vec!["ssl", "work_mem"],
            ),
            (
                auto(&[
                    ("ssl", "on"),
                    ("ssl_ciphers", "ALL"),
                    ("citus.node_conninfo", "x"),
                ]),
                vec!["citus.node_conninfo", "ssl_ciphers"],
            ),
        ] {
            assert_eq!(foreign_alter_system(&settings), want, "{settings:?}");
        }
    }

    use super::*;

    #[test]
    fn lowered_standby_minimums_are_found() {
        let conf = |mc: &str, wal: &str| {
            format!(
                "# Managed\nmax_connections = '{mc}'\nmax_wal_senders = '{wal}'\nwork_mem = '4MB'\n"
            )
        };
        for (current, desired, want) in [
            (conf("50", "10"), conf("60", "10"), vec![]),
            (
                conf("60", "10"),
                conf("50", "10"),
                vec!["max_connections 60 → 50"],
            ),
            (
                conf("60", "10"),
                conf("50", "8"),
                vec!["max_connections 60 → 50", "max_wal_senders 10 → 8"],
            ),
            (
                conf("60", "10"),
                conf("60", "10").replace("4MB", "1MB"),
                vec![],
            ),
            (conf("x", "10"), conf("50", "10"), vec![]),
        ] {
            assert_eq!(
                lowered_standby_minimums(&current, &desired),
                want,
                "{current} → {desired}"
            );
        }
        assert_eq!(
            parse_postgresql_conf("a = 'it''s'\nb = 'c:\\\\d'\n")
                .get("a")
                .map(String::as_str),
            Some("it's")
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_conf("it's"), "'it''s'");
        assert_eq!(quote_libpq("10.0.0.1"), "10.0.0.1");
        assert_eq!(quote_libpq("a b'c"), "'a b\\'c'");
        assert_eq!(pgpass_escape("a:b\\c"), "a\\:b\\\\c");
    }
}
