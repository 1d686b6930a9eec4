//! Observe what is really there and fill the plain `plan::Observed` value: each host over SSH
//! (one probe command per host), etcd, and the Citus metadata on each group's primary through
//! an SSH tunnel. Bounded parallelism, every call with a timeout; a host that cannot be
//! reached is reported, never guessed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::agent::config::{AgentConfig, Paths};
use crate::citus;
use crate::dcs::{ClusterKeys, Dcs, keys};
use crate::plan::{DataDirState, EtcdObserved, GroupObserved, HostFacts, HostObserved, Observed};
use crate::spec::model::Service;
use crate::spec::{HostSpec, Spec};
use crate::ssh::{self, Script, Session, Target, quote, quote_words};

pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
pub const SQL_TIMEOUT: Duration = Duration::from_secs(10);
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// SSH sessions to the spec's hosts (by member name), and why the others failed.
#[derive(Default, Clone)]
pub struct Sessions {
    pub ok: BTreeMap<String, Arc<Session>>,
    pub failed: BTreeMap<String, String>,
    /// The hosts of a managed etcd's members, by member name.
    pub etcd_ok: BTreeMap<String, Arc<Session>>,
    pub etcd_failed: BTreeMap<String, String>,
}

impl Sessions {
    /// Connect to every host (members sharing an address share nothing: one session each).
    pub async fn connect(spec: &Spec, options: ssh::Options, parallelism: usize) -> Sessions {
        let sem = Arc::new(Semaphore::new(parallelism.max(1)));
        let mut set = JoinSet::new();
        let targets = spec
            .hosts()
            .map(|h| (false, h.name.clone(), Target::of(h)))
            .chain(
                spec.etcd
                    .members
                    .iter()
                    .map(|m| (true, m.name.clone(), Target::of_etcd(m))),
            );
        for (etcd, name, target) in targets {
            let sem = sem.clone();
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let r = Session::connect(&target, options).await;
                (etcd, name, r)
            });
        }
        let mut out = Sessions::default();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((false, name, Ok(s))) => {
                    out.ok.insert(name, Arc::new(s));
                }
                Ok((false, name, Err(e))) => {
                    out.failed.insert(name, e.to_string());
                }
                Ok((true, name, Ok(s))) => {
                    out.etcd_ok.insert(name, Arc::new(s));
                }
                Ok((true, name, Err(e))) => {
                    out.etcd_failed.insert(name, e.to_string());
                }
                Err(e) => tracing::error!(error = %e, "connection task failed"),
            }
        }
        out
    }

    pub async fn close(&self) {
        for s in self.ok.values().chain(self.etcd_ok.values()) {
            s.close().await;
        }
    }
}

/// The shell probe: prints `key=value` lines about PostgreSQL, Citus, the data directory and
/// the agent. File contents travel base64-encoded.
pub fn probe_script(spec: &Spec, h: &HostSpec) -> Script {
    let p = Paths::new(&h.install_dir);
    let unit = format!(
        "/etc/systemd/system/{}",
        Paths::unit_name(&spec.cluster, &h.name)
    );
    Script::render(
        r#"echo "os=$(. /etc/os-release 2>/dev/null; echo ${ID:-unknown}-${VERSION_ID:-})"
echo "codename=$(. /etc/os-release 2>/dev/null; echo ${VERSION_CODENAME:-})"
[ -f {pgdg_sources} ] && [ -f {pgdg_keyring} ] && echo "repo=pgdg $(sha256sum {pgdg_sources} | cut -d' ' -f1)"
[ -f {citus_sources} ] && [ -f {citus_keyring} ] && echo "repo=citus $(sha256sum {citus_sources} | cut -d' ' -f1)"
echo "user=$(id -un)"
command -v apt-get >/dev/null 2>&1 && echo apt=yes
if [ -x {bin}/postgres ]; then echo "pg=$({bin}/postgres --version 2>/dev/null)"; fi
share=$({bin}/pg_config --sharedir 2>/dev/null || echo {default_share})
[ -f "$share/extension/citus.control" ] && echo citus=yes
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin command -v pgbouncer >/dev/null 2>&1 && echo pgbouncer=yes
[ -f {data}/PG_VERSION ] && echo "data_major=$(head -c 8 {data}/PG_VERSION)"
if [ -f {data}/global/pg_control ]; then echo data=initialized; echo "sysid=$({bin}/pg_controldata {data} 2>/dev/null | sed -n 's/^Database system identifier: *//p')"
elif [ -d {data} ] && [ -n "$(ls -A {data} 2>/dev/null)" ]; then echo data=partial
else echo data=absent; fi
if [ -f {binary} ]; then
  if [ -f {binary_sha} ] && [ "$(stat -c %s.%Y {binary})" = "$(sed -n 2p {binary_sha})" ]; then echo "binary_sha=$(sed -n 1p {binary_sha})"
  else echo "binary_sha=$(sha256sum {binary} | cut -d' ' -f1)"; fi
fi
if [ -f {config} ]; then echo "config_sha=$(sha256sum {config} | cut -d' ' -f1)"; echo "config_b64=$(base64 -w0 {config})"; fi
[ -f {data}/postmaster.pid ] && echo "pm_status=$(sed -n 8p {data}/postmaster.pid)"
[ -f {data}/postgresql.conf ] && echo "pgconf_b64=$(base64 -w0 {data}/postgresql.conf)"
[ -f {data}/postgresql.auto.conf ] && echo "autoconf_b64=$(base64 -w0 {data}/postgresql.auto.conf)"
if [ -f {pid_file} ]; then pid=$(cat {pid_file}); if [ -r /proc/$pid/cmdline ] && tr '\0' ' ' < /proc/$pid/cmdline | grep -qF -- {agent_args}; then echo agent_pid=$pid; fi; fi
[ -f {unit} ] && echo unit=yes
if command -v dpkg-query >/dev/null 2>&1; then
  for p in {packages}; do
    v=$(dpkg-query -W -f '${db:Status-Want} ${db:Status-Status} ${Version}' "$p" 2>/dev/null)
    [ "${v%% *}" = hold ] && echo "held=$p"
    v=${v#* }
    case "$v" in
      "installed "*) echo "pkg=$p ${v#installed }" ;;
      *) if [ {lookup} = yes ]; then echo "cand=$p $(apt-cache policy "$p" 2>/dev/null | sed -n 's/^ *Candidate: *//p')"; fi ;;
    esac
  done
fi
true
"#,
        &[
            ("bin", &quote(&spec.postgres.bin_dir)),
            (
                "default_share",
                &quote(&format!("/usr/share/postgresql/{}", spec.postgres.version)),
            ),
            ("data", &quote(&h.data_dir)),
            ("binary", &quote(&p.binary())),
            ("binary_sha", &quote(&format!("{}.sha256", p.binary()))),
            ("config", &quote(&p.config())),
            ("agent_args", &quote(&format!("--config {}", p.config()))),
            ("pid_file", &quote(&p.pid_file())),
            ("unit", &quote(&unit)),
            (
                "citus_sources",
                &quote(&crate::plan::repository::sources_path(
                    crate::plan::repository::CITUS,
                )),
            ),
            (
                "citus_keyring",
                &quote(&crate::plan::repository::keyring_path(
                    crate::plan::repository::CITUS,
                )),
            ),
            (
                "pgdg_keyring",
                &quote(&crate::plan::repository::keyring_path(
                    crate::plan::repository::PGDG,
                )),
            ),
            (
                "pgdg_sources",
                &quote(&crate::plan::repository::sources_path(
                    crate::plan::repository::PGDG,
                )),
            ),
            (
                "packages",
                &quote_words(spec.apt_packages(h).iter().map(String::as_str)),
            ),
            // apt's candidate (half a second a package) only where apply may install.
            (
                "lookup",
                &quote(
                    if spec.postgres.install == crate::spec::model::InstallMode::Apt {
                        "yes"
                    } else {
                        "no"
                    },
                ),
            ),
        ],
    )
}

/// Parse the probe's output into facts.
/// What `systemctl show -p MainPID -p ActiveState -p SubState -p Result -p NRestarts UNIT`
/// printed: the agent's pid while the unit runs, and the unit's state in words for `plan`
/// ("failed (exit-code), restarted 3 times").
pub fn parse_unit_show(text: &str) -> (Option<u32>, Option<String>) {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let pid = get("MainPID")
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|p| *p != 0);
    let state = get("ActiveState").map(|active| {
        let mut s = active.to_string();
        match (get("SubState"), get("Result")) {
            (_, Some(r)) if r != "success" => s.push_str(&format!(" ({r})")),
            (Some(sub), _) if sub != active => s.push_str(&format!(" ({sub})")),
            _ => {}
        }
        match get("NRestarts").and_then(|n| n.parse::<u32>().ok()) {
            Some(1) => s.push_str(", restarted once"),
            Some(n) if n > 1 => s.push_str(&format!(", restarted {n} times")),
            _ => {}
        }
        s
    });
    (pid, state)
}

pub fn parse_probe(output: &str, service: Service, systemd_active: Option<u32>) -> HostFacts {
    let mut f = HostFacts::default();
    let b64 = |v: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(v.trim())
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    for line in output.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "os" => f.os = v.to_string(),
            "user" => f.login_user = v.to_string(),
            "apt" => f.apt = true,
            "pg" => f.postgres_version = Some(v.to_string()),
            "citus" => f.citus_available = true,
            "pgbouncer" => f.pgbouncer_available = true,
            "data" => {
                f.data_dir = match v {
                    "initialized" => DataDirState::Initialized,
                    "partial" => DataDirState::Partial,
                    _ => DataDirState::Absent,
                }
            }
            "data_major" => f.data_major = v.trim().parse().ok(),
            "sysid" if !v.trim().is_empty() => f.sysid = Some(v.trim().to_string()),
            "binary_sha" => f.agent_binary_sha256 = Some(v.to_string()),
            "config_sha" => f.agent_config_sha256 = Some(v.to_string()),
            "config_b64" => {
                f.agent_config_redacted = Some(match b64(v).map(|t| AgentConfig::parse(&t)) {
                    Some(Ok(cfg)) => {
                        f.secret_digests = cfg.secret_digests();
                        cfg.render_redacted()
                    }
                    // Never echo an unparseable file: it may hold secrets in unknown places.
                    _ => "# (unreadable agent configuration; it will be replaced)\n".to_string(),
                })
            }
            "pgconf_b64" => f.postgresql_conf = b64(v),
            "autoconf_b64" => {
                f.alter_system = b64(v)
                    .map(|t| {
                        crate::postgres::conf::foreign_alter_system(
                            &crate::postgres::conf::parse_postgresql_conf(&t),
                        )
                    })
                    .unwrap_or_default()
            }
            "agent_pid" => f.agent_pid = v.trim().parse().ok(),
            "codename" => {
                f.codename = Some(v.trim().to_string()).filter(|c| !c.is_empty());
            }
            "repo" => {
                if let Some((name, sha)) = v.trim().split_once(' ') {
                    f.repositories.insert(name.to_string(), sha.to_string());
                }
            }
            "pm_status" => f.postgres_ready = matches!(v.trim(), "ready" | "standby"),
            "pkg" | "cand" => {
                let (name, version) = v.split_once(' ').unwrap_or((v, ""));
                let version = version.trim();
                // apt-cache says "(none)" for a package no list has.
                let version =
                    (!version.is_empty() && version != "(none)").then(|| version.to_string());
                let p = f.packages.entry(name.to_string()).or_default();
                if k == "pkg" {
                    p.installed = version;
                } else {
                    p.candidate = version;
                }
            }
            "held" => f.packages.entry(v.trim().to_string()).or_default().held = true,
            "unit" => f.unit_installed = true,
            _ => {}
        }
    }
    if service == Service::Systemd {
        f.agent_pid = systemd_active;
    }
    f
}

async fn host_facts(spec: &Spec, h: &HostSpec, s: &Session) -> Result<HostFacts, String> {
    let out = s
        .run("probe", &probe_script(spec, h), PROBE_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let (systemd, unit_state) = if spec.agent.service == Service::Systemd {
        let unit = Paths::unit_name(&spec.cluster, &h.name);
        let cmd = Script::render(
            "systemctl show -p MainPID -p ActiveState -p SubState -p Result -p NRestarts {unit} 2>/dev/null || true",
            &[("unit", &quote(&unit))],
        );
        s.run("systemctl show", &cmd, PROBE_TIMEOUT)
            .await
            .map(|o| parse_unit_show(&o))
            .unwrap_or_default()
    } else {
        (None, None)
    };
    let mut facts = parse_probe(&out, spec.agent.service, systemd);
    facts.unit_state = unit_state;
    Ok(facts)
}

/// How long a member the spec dropped has to answer a status call.
const DROPPED_MEMBER_TIMEOUT: Duration = Duration::from_secs(2);

/// Connect to etcd (bounded); the error is part of the observation.
pub async fn connect_etcd(spec: &Spec) -> Result<Dcs, String> {
    let keys = ClusterKeys::new(&spec.etcd.namespace, &spec.cluster);
    let access = crate::dcs::Access::from_spec(&spec.etcd);
    Dcs::connect(&spec.etcd.endpoints, &access, keys, ETCD_TIMEOUT)
        .await
        .map_err(|e| e.to_string())
}

/// A managed etcd: each member's host over SSH, and the member list from any endpoint.
pub async fn managed_etcd(
    spec: &Spec,
    sessions: &Sessions,
    dcs: Option<&Dcs>,
) -> crate::plan::etcd::ManagedEtcdObserved {
    use crate::plan::etcd::EtcdHost;
    let mut hosts = BTreeMap::new();
    let mut set = JoinSet::new();
    for m in &spec.etcd.members {
        match (
            sessions.etcd_ok.get(&m.name),
            sessions.etcd_failed.get(&m.name),
        ) {
            (Some(s), _) => {
                let (s, m) = (s.clone(), m.clone());
                let (service, cluster) = (spec.agent.service, spec.cluster.clone());
                set.spawn(async move {
                    let h = crate::provision::etcd::probe(&s, &m, service, &cluster).await;
                    (m.name.clone(), h)
                });
            }
            (None, failed) => {
                hosts.insert(
                    m.name.clone(),
                    EtcdHost::Unreachable {
                        error: failed.cloned().unwrap_or_else(|| "not connected".into()),
                    },
                );
            }
        }
    }
    while let Some(joined) = set.join_next().await {
        if let Ok((name, h)) = joined {
            hosts.insert(name, h);
        }
    }
    let members = match dcs {
        Some(d) => Some(match d.cluster_members().await {
            Ok(mut listed) => {
                // Members the spec dropped: a dead one must go before any is added (etcd
                // refuses an add while a voter is down).
                let wanted: Vec<String> = spec.etcd.members.iter().map(|m| m.peer_url()).collect();
                for c in listed.iter_mut() {
                    if c.peer_urls.iter().any(|u| wanted.contains(u)) {
                        continue;
                    }
                    c.answers = Some(match c.client_urls.first() {
                        Some(url) => d.member_answers(url, DROPPED_MEMBER_TIMEOUT).await,
                        None => false,
                    });
                }
                Ok(listed)
            }
            Err(e) => Err(e.to_string()),
        }),
        None => Some(Err("not connected".into())),
    };
    crate::plan::etcd::ManagedEtcdObserved { hosts, members }
}

/// A client of the spec's etcd that connects at its first call (see `Dcs::unproven`).
pub fn unproven_etcd(spec: &Spec) -> Result<Dcs, String> {
    let keys = ClusterKeys::new(&spec.etcd.namespace, &spec.cluster);
    let access = crate::dcs::Access::from_spec(&spec.etcd);
    Dcs::unproven(&spec.etcd.endpoints, &access, keys, ETCD_TIMEOUT).map_err(|e| e.to_string())
}

pub async fn etcd_state(dcs: &Dcs) -> EtcdObserved {
    match dcs.read_cluster().await {
        Ok((kvs, _)) => {
            let mut untrusted = Vec::new();
            let groups = keys::parse_cluster(&dcs.keys, &kvs)
                .into_iter()
                .map(|(g, mut s)| {
                    // What no agent writes is left out of the view (the agents ignore it too).
                    untrusted.extend(
                        s.sanitize()
                            .problems
                            .into_iter()
                            .map(|p| format!("etcd, group {g}: {p}")),
                    );
                    (
                        g,
                        GroupObserved {
                            leader: s.leader.map(|l| l.name),
                            initialize: s.initialize,
                            members: s.members,
                        },
                    )
                })
                .collect();
            EtcdObserved {
                error: None,
                groups,
                untrusted,
            }
        }
        Err(e) => EtcdObserved {
            error: Some(e.to_string()),
            groups: BTreeMap::new(),
            untrusted: Vec::new(),
        },
    }
}

/// A SQL connection to a member's PostgreSQL through its SSH session, as the superuser.
pub async fn sql_through(
    spec: &Spec,
    h: &HostSpec,
    s: &Session,
    dbname: &str,
) -> Result<tokio_postgres::Client, String> {
    // PostgreSQL's own socket first: the agent's `local … trust` rule (the socket folder is
    // 0700, reachable by root and postgres only) needs no password, so the metadata can be
    // read whatever the password in force — also while a new one in the spec is not applied
    // yet. A login that cannot open the socket falls back to TCP with the spec's password.
    let socket = format!("{}/.s.PGSQL.{}", h.socket_dir(), h.pg_port);
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(&spec.postgres.superuser.username)
        .dbname(dbname)
        .application_name("citus-reconcile");
    let local = match s.forward_socket(&socket, SQL_TIMEOUT).await {
        Ok(stream) => connect_over(&cfg, stream, h).await,
        Err(e) => Err(e.to_string()),
    };
    if let Ok(client) = local {
        return Ok(client);
    }
    let stream = s
        .forward(&h.address, h.pg_port, SQL_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    cfg.password(spec.postgres.superuser.password.expose());
    connect_over(&cfg, stream, h).await
}

async fn connect_over<S>(
    cfg: &tokio_postgres::Config,
    stream: S,
    h: &HostSpec,
) -> Result<tokio_postgres::Client, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connect = cfg.connect_raw(stream, tokio_postgres::NoTls);
    let (client, conn) = match tokio::time::timeout(SQL_TIMEOUT, connect).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            return Err(format!(
                "{}: SQL connection: {}",
                h.name,
                crate::postgres::sql::db_message(&e)
            ));
        }
        Err(_) => return Err(format!("{}: SQL connection timed out", h.name)),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// pg_dist_node from the coordinator's primary, pg_dist_authinfo and pg_dist_poolinfo from
/// every group primary.
async fn metadata(spec: &Spec, sessions: &Sessions, etcd: &EtcdObserved, o: &mut Observed) {
    for (g, group) in &etcd.groups {
        let Some(leader) = &group.leader else {
            continue;
        };
        let running = group
            .members
            .get(leader)
            .is_some_and(|m| m.is_running_primary());
        let (Some(h), Some(s)) = (spec.host(leader), sessions.ok.get(leader)) else {
            continue;
        };
        if !running || spec.group(*g).is_none() {
            continue;
        }
        let client = match sql_through(spec, h, s, &spec.citus.database).await {
            Ok(c) => c,
            Err(e) => {
                o.metadata_error = Some(e);
                continue;
            }
        };
        match citus::sql::extension_installed(&client, SQL_TIMEOUT).await {
            Ok(true) => {}
            _ => continue,
        }
        match citus::sql::authinfo(&client, SQL_TIMEOUT).await {
            Ok(rows) => {
                o.authinfo.insert(*g, rows);
            }
            Err(e) => o.metadata_error = Some(format!("{leader}: {e}")),
        }
        match citus::sql::poolinfo(&client, SQL_TIMEOUT).await {
            Ok(rows) => {
                o.poolinfo.insert(*g, rows);
            }
            Err(e) => o.metadata_error = Some(format!("{leader}: {e}")),
        }
        let roles = [
            spec.postgres.superuser.username.clone(),
            spec.postgres.replication.username.clone(),
        ];
        match crate::postgres::sql::bounded(
            "read role passwords",
            SQL_TIMEOUT,
            client.query(
                "SELECT rolname::text, COALESCE(rolpassword, '') FROM pg_authid WHERE rolname = ANY($1)",
                &[&roles.as_slice()],
            ),
        )
        .await
        {
            Ok(rows) => {
                o.role_verifiers.insert(
                    *g,
                    rows.iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                        .collect(),
                );
            }
            Err(e) => o.metadata_error = Some(format!("{leader}: {e}")),
        }
        if *g == 0 {
            match crate::postgres::sql::bounded(
                "read parameter contexts",
                SQL_TIMEOUT,
                client.query("SELECT name, context FROM pg_settings", &[]),
            )
            .await
            {
                Ok(rows) => {
                    o.parameter_contexts = rows
                        .iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                        .collect()
                }
                Err(e) => tracing::debug!(error = %e, "cannot read parameter contexts"),
            }
            match citus::sql::nodes(&client, SQL_TIMEOUT).await {
                Ok(rows) => o.nodes = Some(rows),
                Err(e) => o.metadata_error = Some(format!("{leader}: {e}")),
            }
            // A Citus without the rebalancer (or the stand-in) simply has no shard view.
            match citus::rebalance::observe(&client, SQL_TIMEOUT).await {
                Ok(s) => o.shards = Some(s),
                Err(e) => tracing::debug!(error = %e, "cannot read shard placement"),
            }
        }
    }
}

/// Observe everything the plan needs.
pub async fn observe(
    spec: &Spec,
    sessions: &Sessions,
    dcs: Option<&Dcs>,
    parallelism: usize,
) -> Observed {
    let mut o = Observed::default();
    for (name, err) in &sessions.failed {
        o.hosts.insert(
            name.clone(),
            HostObserved::Unreachable { error: err.clone() },
        );
    }
    let sem = Arc::new(Semaphore::new(parallelism.max(1)));
    let mut set = JoinSet::new();
    for (name, s) in &sessions.ok {
        let Some(h) = spec.host(name).cloned() else {
            continue;
        };
        let (spec, s, sem) = (spec.clone(), s.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (h.name.clone(), host_facts(&spec, &h, &s).await)
        });
    }
    while let Some(joined) = set.join_next().await {
        if let Ok((name, r)) = joined {
            let entry = match r {
                Ok(f) => HostObserved::Reachable(f),
                Err(error) => HostObserved::Unreachable { error },
            };
            o.hosts.insert(name, entry);
        }
    }
    tracing::debug!("hosts probed");
    o.etcd = match dcs {
        Some(d) => etcd_state(d).await,
        None => EtcdObserved {
            error: Some("not connected".into()),
            groups: BTreeMap::new(),
            untrusted: Vec::new(),
        },
    };
    tracing::debug!("etcd read");
    if !spec.etcd.members.is_empty() {
        o.managed_etcd = Some(managed_etcd(spec, sessions, dcs).await);
    }
    if o.etcd.error.is_none() {
        let etcd = o.etcd.clone();
        metadata(spec, sessions, &etcd, &mut o).await;
    }
    tracing::debug!("metadata read");
    o
}

#[cfg(test)]
mod tests {

    #[test]
    fn systemd_unit_state_in_words() {
        let cases = [
            (
                "MainPID=4242\nActiveState=active\nSubState=running\nResult=success\nNRestarts=0\n",
                (Some(4242), Some("active (running)")),
            ),
            (
                "MainPID=0\nActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=3\n",
                (None, Some("failed (exit-code), restarted 3 times")),
            ),
            (
                "MainPID=0\nActiveState=activating\nSubState=auto-restart\nResult=signal\nNRestarts=1\n",
                (None, Some("activating (signal), restarted once")),
            ),
            (
                "MainPID=0\nActiveState=inactive\nSubState=dead\nResult=success\n",
                (None, Some("inactive (dead)")),
            ),
            ("", (None, None)),
        ];
        for (text, (pid, state)) in cases {
            assert_eq!(
                parse_unit_show(text),
                (pid, state.map(str::to_string)),
                "{text:?}"
            );
        }
    }

    use super::*;

    #[test]
    fn probe_output_parses() {
        let cfg = "cluster: c\n";
        let enc = base64::engine::general_purpose::STANDARD.encode("max_connections = '100'\n");
        let out = format!(
            "os=debian-12\nuser=root\napt=yes\npg=postgres (PostgreSQL) 15.18\ncitus=yes\ndata=initialized\nbinary_sha=abc\nconfig_sha=def\nconfig_b64={}\npgconf_b64={enc}\nagent_pid=42\n",
            base64::engine::general_purpose::STANDARD.encode(cfg)
        );
        let f = parse_probe(&out, Service::Process, None);
        assert_eq!(f.os, "debian-12");
        assert!(f.apt && f.citus_available);
        assert_eq!(f.data_dir, DataDirState::Initialized);
        assert_eq!(f.agent_pid, Some(42));
        assert_eq!(
            f.postgresql_conf.as_deref(),
            Some("max_connections = '100'\n")
        );
        // An agent.yaml that does not parse is never shown (it may hold secrets).
        assert_eq!(
            f.agent_config_redacted.as_deref(),
            Some("# (unreadable agent configuration; it will be replaced)\n")
        );
        // Packages: installed (held or not), or the version apt would install ("(none)": no
        // package list has it).
        let f = parse_probe(
            "pkg=postgresql-15 15.14-0+deb12u1\nheld=postgresql-15\npkg=pgbouncer 1.24.1-1\ncand=postgresql-15-citus-13.2 (none)\ncand=postgresql-16 16.10-1.pgdg120+1\n",
            Service::Process,
            None,
        );
        let p = |n: &str| f.packages.get(n).cloned().unwrap_or_default();
        assert_eq!(
            (
                p("postgresql-15").installed.as_deref(),
                p("postgresql-15").held
            ),
            (Some("15.14-0+deb12u1"), true)
        );
        assert_eq!(
            (p("pgbouncer").installed.as_deref(), p("pgbouncer").held),
            (Some("1.24.1-1"), false)
        );
        assert_eq!(p("postgresql-15-citus-13.2"), Default::default());
        assert_eq!(
            p("postgresql-16").candidate.as_deref(),
            Some("16.10-1.pgdg120+1")
        );
        // The release and the repositories apply wrote; the postmaster's state.
        let f = parse_probe(
            "codename=bookworm\nrepo=pgdg 0123abcd\npm_status=standby\n",
            Service::Process,
            None,
        );
        assert_eq!(f.codename.as_deref(), Some("bookworm"));
        assert_eq!(
            f.repositories.get("pgdg").map(String::as_str),
            Some("0123abcd")
        );
        assert!(f.postgres_ready);
        let f = parse_probe("codename=\npm_status=starting\n", Service::Process, None);
        assert_eq!((f.codename, f.postgres_ready), (None, false));
        let f = parse_probe("data=partial\n", Service::Systemd, Some(7));
        assert_eq!((f.data_dir, f.agent_pid), (DataDirState::Partial, Some(7)));
    }
}
