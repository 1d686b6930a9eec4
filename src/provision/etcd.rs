//! A managed etcd member on its host (`etcd.members`): its configuration file, and the
//! scripts that probe, install, start, stop and retire it. Everything lives in the member's
//! folder: `data/`, `etcd.conf.yml`, `etcd.pid`, `etcd.log`.

use std::time::Duration;

use crate::plan::etcd::{EtcdHost, EtcdHostFacts};
use crate::spec::model::{EtcdMemberSpec, Service};
use crate::ssh::{Script, Session, SshError, quote, quote_words};

/// How long a started member may take to answer on its client URL.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Space quota of a managed member's database: writes are refused (`NOSPACE`) past it, so a
/// runaway writer cannot fill the disk. Auto-compaction keeps the history small.
pub const QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;

pub struct MemberPaths {
    pub dir: String,
}

impl MemberPaths {
    pub fn of(m: &EtcdMemberSpec) -> MemberPaths {
        MemberPaths { dir: m.dir.clone() }
    }
    pub fn data(&self) -> String {
        format!("{}/data", self.dir)
    }
    pub fn config(&self) -> String {
        format!("{}/etcd.conf.yml", self.dir)
    }
    pub fn pid(&self) -> String {
        format!("{}/etcd.pid", self.dir)
    }
    pub fn log(&self) -> String {
        format!("{}/etcd.log", self.dir)
    }
}

/// A YAML scalar, quoted (the values are URLs, names and paths the spec gives).
fn yaml(v: &str) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into())
}

/// The member's `--config-file`. `initial` is the cluster it joins: every member of a new
/// cluster, or the members listed after its `member add` (itself included). etcd reads the
/// `initial-*` settings only until the member has data.
pub fn config_text(
    m: &EtcdMemberSpec,
    cluster: &str,
    initial: &[(String, String)],
    new_cluster: bool,
) -> String {
    let p = MemberPaths::of(m);
    let initial_cluster = initial
        .iter()
        .map(|(name, url)| format!("{name}={url}"))
        .collect::<Vec<_>>()
        .join(",");
    let lines = [
        ("name", yaml(&m.name)),
        ("data-dir", yaml(&p.data())),
        ("listen-client-urls", yaml(&m.client_url())),
        ("advertise-client-urls", yaml(&m.client_url())),
        ("listen-peer-urls", yaml(&m.peer_url())),
        ("initial-advertise-peer-urls", yaml(&m.peer_url())),
        ("initial-cluster", yaml(&initial_cluster)),
        (
            "initial-cluster-state",
            yaml(if new_cluster { "new" } else { "existing" }),
        ),
        (
            "initial-cluster-token",
            yaml(&format!("citus-reconcile-{cluster}")),
        ),
        ("auto-compaction-mode", yaml("periodic")),
        ("auto-compaction-retention", yaml("1h")),
        ("quota-backend-bytes", QUOTA_BYTES.to_string()),
        ("strict-reconfig-check", "true".into()),
    ];
    let mut out = String::from("# Written by citus-reconcile apply: a managed etcd member.\n");
    for (k, v) in lines {
        out.push_str(&format!("{k}: {v}\n"));
    }
    out
}

macro_rules! alive {
    () => {
        "[ -f {pid} ] && pid=$(cat {pid}) && [ -r /proc/$pid/cmdline ] && tr '\\0' ' ' < /proc/$pid/cmdline | grep -qF -- {needle}"
    };
}

fn needle(p: &MemberPaths) -> String {
    format!("--config-file {}", p.config())
}

/// The member's systemd unit (`agent.service: systemd`): `citus-reconcile-etcd-{cluster}-{member}`.
pub fn unit_name(cluster: &str, member: &str) -> String {
    format!("citus-reconcile-etcd-{cluster}-{member}.service")
}

/// The member's unit: back after a crash or a reboot without an apply. `Type=simple`: a
/// member of a new cluster is ready only once the others are up, so starting one must not
/// wait for it (apply waits on the member list instead). etcd is found on the service PATH
/// (Debian's is /usr/bin/etcd). Hardening as the agent's, with its folder the one place it
/// writes.
pub fn unit_text(m: &EtcdMemberSpec, cluster: &str) -> String {
    let p = MemberPaths::of(m);
    format!(
        "# Written by citus-reconcile apply: a managed etcd member.\n[Unit]\nDescription={}\nAfter=network-online.target\nWants=network-online.target\nStartLimitIntervalSec=0\n\n\
         [Service]\nType=simple\nEnvironment=PATH={}\nExecStart=/usr/bin/env etcd --config-file {}\nRestart=always\nRestartSec=2\nTimeoutStopSec=30\nLimitNOFILE=65536\n\
         NoNewPrivileges=yes\nProtectSystem=full\nPrivateTmp=yes\nProtectKernelTunables=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\nRestrictRealtime=yes\nLockPersonality=yes\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        super::systemd_text(&format!(
            "citus-reconcile etcd member ({cluster}/{})",
            m.name
        )),
        crate::postgres::process::SERVICE_PATH,
        super::systemd_quote(&p.config()),
    )
}

/// What the member's host says: `etcd=VERSION`, `data=yes`, `running=PID` (its process, or
/// its unit active).
pub fn probe_script(m: &EtcdMemberSpec, service: Service, cluster: &str) -> Script {
    let p = MemberPaths::of(m);
    Script::render(
        concat!(
            "PATH={path}\n",
            "command -v etcd >/dev/null 2>&1 && echo \"etcd=$(etcd --version 2>/dev/null | head -n 1)\"\n",
            "[ -d {data}/member ] && echo data=yes\n",
            "if [ {service} = systemd ]; then systemctl is-active --quiet {unit} && echo running=unit\n",
            "elif ",
            alive!(),
            "; then echo running=$pid; fi\ntrue\n"
        ),
        &[
            ("path", &quote(crate::postgres::process::SERVICE_PATH)),
            ("data", &quote(&p.data())),
            ("service", &quote(service_word(service))),
            ("unit", &quote(&unit_name(cluster, &m.name))),
            ("pid", &quote(&p.pid())),
            ("needle", &quote(&needle(&p))),
        ],
    )
}

fn service_word(service: Service) -> &'static str {
    match service {
        Service::Systemd => "systemd",
        Service::Process => "process",
    }
}

pub fn parse_probe(output: &str) -> EtcdHost {
    let mut f = EtcdHostFacts::default();
    for line in output.lines() {
        match line.split_once('=') {
            Some(("etcd", v)) => f.binary = Some(v.trim().to_string()),
            Some(("data", _)) => f.data = true,
            Some(("running", _)) => f.running = true,
            _ => {}
        }
    }
    EtcdHost::Reachable(f)
}

/// Debian's etcd-server, held like the PostgreSQL packages; the packaged service (an etcd on
/// localhost with its own data) is stopped and never starts again.
pub fn install_script(proxy: Option<&str>) -> Script {
    let proxy_option = proxy.map(|p| format!("-oAcquire::http::Proxy={p}"));
    Script::render(
        "export DEBIAN_FRONTEND=noninteractive; apt-get {proxy} update -qq && apt-get {proxy} install -y -qq --no-install-recommends etcd-server && apt-mark hold etcd-server >/dev/null && { systemctl disable --now etcd.service >/dev/null 2>&1 || { [ ! -x /etc/init.d/etcd ] || /etc/init.d/etcd stop >/dev/null 2>&1; update-rc.d etcd disable >/dev/null 2>&1; true; }; }",
        &[("proxy", &quote_words(proxy_option.as_deref()))],
    )
}

/// Start the member's unit (written before): enabled, so a reboot brings it back.
pub fn start_unit_script(cluster: &str, member: &str) -> Script {
    Script::render(
        "systemctl daemon-reload && systemctl enable --now {unit}",
        &[("unit", &quote(&unit_name(cluster, member)))],
    )
}

/// Start the member unless it runs: a detached process with the environment a system
/// service gets, its pid recorded; fails with the log's tail if it dies at once.
pub fn start_script(m: &EtcdMemberSpec) -> Script {
    let p = MemberPaths::of(m);
    Script::render(
        concat!(
            "set -e\nif ",
            alive!(),
            "; then exit 0; fi\n",
            "mkdir -p {dir}\nchmod 0700 {dir}\nrm -f {pid}\ncd {dir}\n",
            "env -i PATH={path} LANG=C.UTF-8 setsid etcd --config-file {conf} >> {log} 2>&1 < /dev/null &\n",
            "echo $! > {pid}\n",
            "sleep 1\n",
            "if ! ",
            alive!(),
            "; then echo \"etcd did not start; see \"{log} >&2; tail -n 5 {log} >&2; exit 1; fi\n"
        ),
        &[
            ("dir", &quote(&p.dir)),
            ("pid", &quote(&p.pid())),
            ("needle", &quote(&needle(&p))),
            ("path", &quote(crate::postgres::process::SERVICE_PATH)),
            ("conf", &quote(&p.config())),
            ("log", &quote(&p.log())),
        ],
    )
}

/// Stop the member (its unit disabled and removed; its process SIGTERM, then SIGKILL after
/// 30 s) and set its data aside, never deleted: a removed member must not come back with it.
pub fn retire_script(m: &EtcdMemberSpec, cluster: &str) -> Script {
    let p = MemberPaths::of(m);
    Script::render(
        concat!(
            "if [ -f /etc/systemd/system/{unit} ]; then systemctl disable --now {unit} >/dev/null 2>&1 || true; rm -f /etc/systemd/system/{unit}; systemctl daemon-reload >/dev/null 2>&1 || true; fi; ",
            "if ",
            alive!(),
            "; then kill -TERM $pid; i=0; while [ -d /proc/$pid ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; ",
            "[ -d /proc/$pid ] && kill -KILL $pid; fi; rm -f {pid}; ",
            "if [ -d {data} ]; then mv {data} {data}.removed-$(date +%s); fi; true"
        ),
        &[
            ("unit", &quote(&unit_name(cluster, &m.name))),
            ("pid", &quote(&p.pid())),
            ("needle", &quote(&needle(&p))),
            ("data", &quote(&p.data())),
        ],
    )
}

pub async fn probe(s: &Session, m: &EtcdMemberSpec, service: Service, cluster: &str) -> EtcdHost {
    match s
        .run(
            "probe etcd",
            &probe_script(m, service, cluster),
            Duration::from_secs(20),
        )
        .await
    {
        Ok(out) => parse_probe(&out),
        Err(e) => EtcdHost::Unreachable {
            error: e.to_string(),
        },
    }
}

pub async fn install(s: &Session, proxy: Option<&str>) -> Result<(), SshError> {
    s.run(
        "install etcd",
        &install_script(proxy),
        super::PACKAGE_TIMEOUT,
    )
    .await
    .map(drop)
}

/// Write the configuration (0600 from its first byte) and, with systemd, the unit; then
/// start.
pub async fn start(
    s: &Session,
    service: Service,
    m: &EtcdMemberSpec,
    cluster: &str,
    initial: &[(String, String)],
    new_cluster: bool,
) -> Result<(), SshError> {
    let p = MemberPaths::of(m);
    s.run(
        "prepare etcd's folder",
        &prepare_dir_script(&p.dir),
        super::STEP_TIMEOUT,
    )
    .await?;
    s.upload(
        &p.config(),
        config_text(m, cluster, initial, new_cluster).as_bytes(),
        0o600,
        "root",
        super::STEP_TIMEOUT,
    )
    .await?;
    match service {
        Service::Process => {
            s.run("start etcd", &start_script(m), super::STEP_TIMEOUT)
                .await
        }
        Service::Systemd => {
            s.upload(
                &format!("/etc/systemd/system/{}", unit_name(cluster, &m.name)),
                unit_text(m, cluster).as_bytes(),
                0o644,
                "root:root",
                super::STEP_TIMEOUT,
            )
            .await?;
            s.run(
                "start etcd's unit",
                &start_unit_script(cluster, &m.name),
                super::STEP_TIMEOUT,
            )
            .await
        }
    }
    .map(drop)
}

/// Create the member's folder (0700) after checking its path: root writes the
/// configuration there and etcd its data, so no folder on the way may be a link, or
/// belong to or be writable by another user, who could redirect those writes (a `dir` under
/// a folder that postgres owns, say).
pub fn prepare_dir_script(dir: &str) -> Script {
    Script::render(
        r#"set -e
d={dir}
while [ "$d" != / ] && [ -n "$d" ]; do
  if [ -L "$d" ]; then echo "refusing etcd's folder: $d is a symbolic link" >&2; exit 3; fi
  if [ -e "$d" ]; then
    set -- $(stat -c '%u %a' "$d")
    if [ "$1" != 0 ]; then echo "refusing etcd's folder: $d belongs to uid $1, not root" >&2; exit 3; fi
    if [ $(( 0$2 & 022 )) -ne 0 ]; then echo "refusing etcd's folder: others can write to $d (mode $2)" >&2; exit 3; fi
  fi
  d=$(dirname "$d")
done
mkdir -p {dir}
chmod 0700 {dir}
"#,
        &[("dir", &quote(dir))],
    )
}

pub async fn retire(s: &Session, m: &EtcdMemberSpec, cluster: &str) -> Result<(), SshError> {
    s.run("stop etcd", &retire_script(m, cluster), super::STEP_TIMEOUT)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::model::SshSpec;

    fn member() -> EtcdMemberSpec {
        EtcdMemberSpec {
            name: "e1".into(),
            address: "10.0.0.5".into(),
            client_port: 2379,
            peer_port: 2380,
            dir: "/var/lib/citus-reconcile/etcd/c-e1".into(),
            ssh: SshSpec {
                user: "root".into(),
                port: 22,
                identity_file: None,
                known_hosts: "/k".into(),
            },
        }
    }

    #[test]
    fn a_members_configuration() {
        let initial = vec![
            ("e1".to_string(), "http://10.0.0.5:2380".to_string()),
            ("e2".to_string(), "http://10.0.0.6:2380".to_string()),
        ];
        let text = config_text(&member(), "c", &initial, true);
        for line in [
            "name: \"e1\"",
            "data-dir: \"/var/lib/citus-reconcile/etcd/c-e1/data\"",
            "listen-client-urls: \"http://10.0.0.5:2379\"",
            "initial-advertise-peer-urls: \"http://10.0.0.5:2380\"",
            "initial-cluster: \"e1=http://10.0.0.5:2380,e2=http://10.0.0.6:2380\"",
            "initial-cluster-state: \"new\"",
            "initial-cluster-token: \"citus-reconcile-c\"",
            "auto-compaction-mode: \"periodic\"",
            "quota-backend-bytes: 2147483648",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(
            config_text(&member(), "c", &initial, false)
                .contains("initial-cluster-state: \"existing\"")
        );
    }

    #[test]
    fn the_probe_says_what_runs() {
        assert_eq!(
            parse_probe("etcd=etcd Version: 3.4.23\ndata=yes\nrunning=42\n"),
            EtcdHost::Reachable(EtcdHostFacts {
                binary: Some("etcd Version: 3.4.23".into()),
                data: true,
                running: true,
            })
        );
        assert_eq!(
            parse_probe(""),
            EtcdHost::Reachable(EtcdHostFacts::default())
        );
    }
}
