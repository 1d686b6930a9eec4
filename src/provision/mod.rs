//! Per-host steps of `apply`, over SSH: packages, the agent binary and configuration, the
//! service, starting and stopping the agent. Each step is idempotent, so a rerun after a failure
//! simply continues.

pub mod etcd;

use std::time::Duration;

use crate::agent::config::Paths;
use crate::spec::model::Service;
use crate::ssh::{Quoted, Script, Session, SshError, quote, quote_words};

pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);
pub const PACKAGE_TIMEOUT: Duration = Duration::from_secs(900);
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Where `apply` tells Debian's postgresql-common not to make a `main` cluster: the file is
/// read through `include_dir` of the packaged createcluster.conf.
pub const NO_MAIN_CLUSTER_CONF: &str =
    "/etc/postgresql-common/createcluster.d/50-citus-reconcile.conf";

/// Install `packages` with apt, through `proxy` when one is given.
/// - Debian's PostgreSQL packages make and start a `main` cluster on port 5432 at their first
///   install: a drop-in with `create_main_cluster = false` comes first, so none appears
///   beside the agent's.
/// - The packages are held afterwards: an unattended upgrade must never restart PostgreSQL
///   (or PgBouncer) behind the agent's back. On a host without PostgreSQL yet (a rerun of a
///   failed install) apt may change what apply held; beside a PostgreSQL that is installed
///   (an extension, a new Citus package) it may not: apt then refuses a package that would
///   upgrade the server under its running postmaster, instead of doing it.
/// - Debian's pgbouncer package starts a PgBouncer of its own (on localhost): the agent runs
///   the one Citus uses, so the packaged service is stopped and never starts again.
pub fn install_packages_script(
    packages: &[String],
    proxy: Option<&str>,
    through_holds: bool,
) -> Script {
    const INSTALL: &str = "export DEBIAN_FRONTEND=noninteractive; mkdir -p /etc/postgresql-common/createcluster.d && printf '%s\\n' 'create_main_cluster = false' > {no_main} && apt-get {proxy} update -qq && apt-get {proxy} install -y -qq --no-install-recommends {through_holds} -o Dpkg::Options::=--force-confold {packages} && apt-mark hold {packages} >/dev/null";
    const WITH_PGBOUNCER: &str = "export DEBIAN_FRONTEND=noninteractive; mkdir -p /etc/postgresql-common/createcluster.d && printf '%s\\n' 'create_main_cluster = false' > {no_main} && apt-get {proxy} update -qq && apt-get {proxy} install -y -qq --no-install-recommends {through_holds} -o Dpkg::Options::=--force-confold {packages} && apt-mark hold {packages} >/dev/null && { systemctl disable --now pgbouncer.service >/dev/null 2>&1 || { [ ! -x /etc/init.d/pgbouncer ] || /etc/init.d/pgbouncer stop >/dev/null 2>&1; update-rc.d pgbouncer disable >/dev/null 2>&1; true; }; }";
    let template = if packages.iter().any(|p| p == "pgbouncer") {
        WITH_PGBOUNCER
    } else {
        INSTALL
    };
    // No proxy: no option at all, so a proxy the host's own apt configuration names holds.
    let proxy_option = proxy.map(|p| format!("-oAcquire::http::Proxy={p}"));
    Script::render(
        template,
        &[
            ("no_main", &quote(NO_MAIN_CLUSTER_CONF)),
            ("proxy", &quote_words(proxy_option.as_deref())),
            (
                "through_holds",
                &quote_words(through_holds.then_some("--allow-change-held-packages")),
            ),
            (
                "packages",
                &quote_words(packages.iter().map(String::as_str)),
            ),
        ],
    )
}

/// The keyring a repository is signed with, as the host has it (postgresql-common installed
/// from the distribution first when it is missing), base64 on one line.
pub fn read_keyring_script(keyring: &str, package: &str, proxy: Option<&str>) -> Script {
    let proxy_option = proxy.map(|p| format!("-oAcquire::http::Proxy={p}"));
    Script::render(
        "export DEBIAN_FRONTEND=noninteractive; if [ ! -f {keyring} ]; then apt-get {proxy} update -qq && apt-get {proxy} install -y -qq --no-install-recommends {package} >/dev/null; fi && base64 -w0 {keyring}",
        &[
            ("keyring", &quote(keyring)),
            ("package", &quote(package)),
            ("proxy", &quote_words(proxy_option.as_deref())),
        ],
    )
}

/// Download a repository's key on the host (apt's own downloader, through the proxy when
/// there is one), base64 on one line; the file is removed again.
pub fn download_key_script(key_url: &str, proxy: Option<&str>) -> Script {
    let proxy_options =
        proxy.map(|p| format!("-oAcquire::http::Proxy={p} -oAcquire::https::Proxy={p}"));
    Script::render(
        "set -e; f=$(mktemp); trap 'rm -f \"$f\"' EXIT; chown _apt \"$f\" 2>/dev/null || true; /usr/lib/apt/apt-helper {proxy} download-file {url} \"$f\" >/dev/null; base64 -w0 \"$f\"",
        &[
            ("url", &quote(key_url)),
            (
                "proxy",
                &quote_words(proxy_options.iter().flat_map(|o| o.split(' '))),
            ),
        ],
    )
}

/// Add an apt repository: its key (a keyring a distribution package ships, or one downloaded
/// from `key_url`) must be exactly the pinned key, checked on this side; only then are the
/// checked keyring and the sources file written. The next `apt-get update` (the
/// package install's) reads them.
pub async fn add_apt_repository(
    s: &Session,
    name: &str,
    sources: &str,
    key_url: Option<&str>,
    fingerprint: &str,
    proxy: Option<&str>,
) -> Result<(), SshError> {
    use crate::plan::repository as repo;
    let refuse = |detail: String| SshError::Protocol {
        host: s.target.name.clone(),
        detail: format!("{detail}; the {name} repository was not added"),
    };
    let (script, source) = match key_url {
        Some(url) => (download_key_script(url, proxy), url.to_string()),
        None if name == repo::PGDG => (
            read_keyring_script(repo::PGDG_KEYRING, "postgresql-common", proxy),
            repo::PGDG_KEYRING.to_string(),
        ),
        None => return Err(refuse(format!("no key for apt repository {name:?}"))),
    };
    let out = s
        .run("read the repository's key", &script, PACKAGE_TIMEOUT)
        .await?;
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, out.trim())
        .map_err(|e| refuse(format!("{source}: not base64 ({e})")))?;
    let keyring = repo::dearmor(&bytes).map_err(|e| refuse(format!("{source}: {e}")))?;
    repo::check_keyring(&keyring, fingerprint).map_err(|e| refuse(format!("{source}: {e}")))?;
    // The checked bytes, not the file they came from: a later package upgrade cannot add a
    // key apt would trust for this repository.
    s.run(
        "create /etc/apt/keyrings",
        &Script::render("mkdir -p -m 0755 /etc/apt/keyrings", &[]),
        STEP_TIMEOUT,
    )
    .await?;
    s.upload(
        &repo::keyring_path(name),
        &keyring,
        0o644,
        "root:root",
        STEP_TIMEOUT,
    )
    .await?;
    s.upload(
        &repo::sources_path(name),
        sources.as_bytes(),
        0o644,
        "root:root",
        STEP_TIMEOUT,
    )
    .await
}

pub async fn install_packages(
    s: &Session,
    packages: &[String],
    proxy: Option<&str>,
    through_holds: bool,
) -> Result<(), SshError> {
    s.run(
        "install packages",
        &install_packages_script(packages, proxy, through_holds),
        PACKAGE_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// Hold installed packages again, so that no unattended upgrade restarts them.
pub fn hold_packages_script(packages: &[String]) -> Script {
    Script::render(
        "apt-mark hold {packages} >/dev/null",
        &[(
            "packages",
            &quote_words(packages.iter().map(String::as_str)),
        )],
    )
}

pub async fn hold_packages(s: &Session, packages: &[String]) -> Result<(), SshError> {
    s.run(
        "hold packages",
        &hold_packages_script(packages),
        STEP_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// The install folder: traversable by postgres (socket and passfile live below it), readable
/// by root only otherwise.
pub fn prepare_dirs_script(paths: &Paths) -> Script {
    Script::render(
        "mkdir -p {dir} {bin} && chmod 0711 {dir}",
        &[
            ("dir", &quote(&paths.install_dir)),
            ("bin", &quote(&format!("{}/bin", paths.install_dir))),
        ],
    )
}

pub async fn prepare_dirs(s: &Session, paths: &Paths) -> Result<(), SshError> {
    s.run("create folders", &prepare_dirs_script(paths), STEP_TIMEOUT)
        .await
        .map(|_| ())
}

/// Upload the agent binary, then record its hash with its size and mtime beside it, so that
/// `plan` need not hash 30 MB on every host each time: a binary whose size or mtime changed is
/// hashed again.
pub async fn upload_binary(
    s: &Session,
    paths: &Paths,
    binary: &[u8],
    sha256: &str,
) -> Result<(), SshError> {
    prepare_dirs(s, paths).await?;
    s.upload(&paths.binary(), binary, 0o755, "root:root", UPLOAD_TIMEOUT)
        .await?;
    s.run(
        "record the binary's hash",
        &record_hash_script(paths, sha256),
        STEP_TIMEOUT,
    )
    .await
    .map(|_| ())
}

pub fn record_hash_script(paths: &Paths, sha256: &str) -> Script {
    Script::render(
        "printf '%s\\n%s\\n' {sha} \"$(stat -c %s.%Y {bin})\" > {record}",
        &[
            ("sha", &quote(sha256)),
            ("bin", &quote(&paths.binary())),
            ("record", &quote(&format!("{}.sha256", paths.binary()))),
        ],
    )
}

/// The agent configuration holds secrets: mode 0600, root only.
pub async fn write_config(s: &Session, paths: &Paths, text: &str) -> Result<(), SshError> {
    prepare_dirs(s, paths).await?;
    s.upload(
        &paths.config(),
        text.as_bytes(),
        0o600,
        "root:root",
        STEP_TIMEOUT,
    )
    .await
}

/// One argument of a unit file's command line, quoted as systemd.syntax(7) and
/// systemd.service(5) define: double quotes with C-style escapes, `%` as `%%` (specifiers)
/// and `$` as `$$` (variable expansion), so a path is taken as written.
pub fn systemd_quote(word: &str) -> String {
    systemd_word(word, true)
}

/// The executable of a command line: systemd expands specifiers there but not variables
/// (`$$` would stay `$$`), and refuses quotes, backslashes and control characters in it
/// (checked by `systemd-analyze verify` in the tests), so the spec keeps those out of
/// `agent.install_dir` for systemd. They are still escaped here: whatever the path, it
/// cannot end the line or the word.
pub fn systemd_executable(path: &str) -> String {
    systemd_word(path, false)
}

fn systemd_word(word: &str, expands_variables: bool) -> String {
    let mut out = String::from("\"");
    for c in word.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '%' => out.push_str("%%"),
            '$' if expands_variables => out.push_str("$$"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32 & 0xff)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Text for a unit file's free-form values (Description=): specifiers escaped, one line.
pub(crate) fn systemd_text(value: &str) -> String {
    value
        .replace('%', "%%")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The agent's systemd unit. Why each setting:
/// - `Restart=always` with no start limit: the agent is what keeps PostgreSQL's lease honest;
///   it must come back however often it dies (its fence and PostgreSQL's parent-death signal
///   make a dead agent stop its primary, so a restart loop is never a split brain).
/// - `KillMode=mixed`: `systemctl stop` sends SIGTERM to the agent alone, which shuts
///   PostgreSQL down cleanly (a fast shutdown: every standby gets the WAL); whatever is left
///   after `TimeoutStopSec` is killed.
/// - `TasksMax=infinity`, `LimitNOFILE`: a backend per connection, a file per relation.
/// - Hardening that leaves an agent that runs PostgreSQL and writes only under `/var`-like
///   folders working: no privilege gains, `/usr`, `/boot` and `/etc` read-only (the spec
///   refuses data and install folders there), a private `/tmp`, no kernel tunables, modules,
///   cgroups, realtime scheduling or personality changes. Devices stay visible (a watchdog
///   device is one) and homes stay writable (data folders live there on some hosts).
pub fn unit_text(paths: &Paths, cluster: &str, member: &str) -> String {
    format!(
        "# Written by citus-reconcile apply.\n[Unit]\nDescription={}\nAfter=network-online.target\nWants=network-online.target\nStartLimitIntervalSec=0\n\n\
         [Service]\nType=simple\nExecStart={} agent --config {}\nExecReload=/bin/kill -HUP $MAINPID\nRestart=always\nRestartSec=2\nKillMode=mixed\nTimeoutStopSec=90\nLimitNOFILE=65536\nTasksMax=infinity\n\
         NoNewPrivileges=yes\nProtectSystem=full\nPrivateTmp=yes\nProtectKernelTunables=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\nRestrictRealtime=yes\nLockPersonality=yes\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        systemd_text(&format!("citus-reconcile agent ({cluster}/{member})")),
        systemd_executable(&paths.binary()),
        systemd_quote(&paths.config())
    )
}

/// Every key `unit_text` writes (tests check that no value can add another).
pub const UNIT_KEYS: [&str; 25] = [
    "[Unit]",
    "Description",
    "After",
    "Wants",
    "StartLimitIntervalSec",
    "[Service]",
    "Type",
    "ExecStart",
    "ExecReload",
    "Restart",
    "RestartSec",
    "KillMode",
    "TimeoutStopSec",
    "LimitNOFILE",
    "TasksMax",
    "NoNewPrivileges",
    "ProtectSystem",
    "PrivateTmp",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "RestrictRealtime",
    "LockPersonality",
    "[Install]",
    "WantedBy",
];

pub async fn install_unit(
    s: &Session,
    paths: &Paths,
    cluster: &str,
    member: &str,
) -> Result<(), SshError> {
    let unit = Paths::unit_name(cluster, member);
    s.upload(
        &format!("/etc/systemd/system/{unit}"),
        unit_text(paths, cluster, member).as_bytes(),
        0o644,
        "root:root",
        STEP_TIMEOUT,
    )
    .await?;
    s.run(
        "enable the unit",
        &Script::render(
            "systemctl daemon-reload && systemctl enable {unit}",
            &[("unit", &quote(&unit))],
        ),
        STEP_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// The shell test that is true when the pid file names a live agent for this config
/// (placeholders `{pid}` and `{needle}`, from `alive_args`).
macro_rules! alive {
    () => {
        "[ -f {pid} ] && pid=$(cat {pid}) && [ -r /proc/$pid/cmdline ] && tr '\\0' ' ' < /proc/$pid/cmdline | grep -q -- {needle}"
    };
}

fn alive_args(paths: &Paths) -> (Quoted, Quoted) {
    (
        quote(&paths.pid_file()),
        quote(&format!("--config {}", paths.config())),
    )
}

/// The script that starts the agent (idempotent).
pub fn start_script(service: Service, paths: &Paths, cluster: &str, member: &str) -> Script {
    match service {
        Service::Systemd => Script::render(
            "systemctl start {unit}",
            &[("unit", &quote(&Paths::unit_name(cluster, member)))],
        ),
        Service::Process => {
            // A detached, self-supervising process; its pid file proves it started. Its
            // environment is what systemd gives a system service (a plain PATH and a locale),
            // not the SSH session's.
            let (pid, needle) = alive_args(paths);
            Script::render(
                concat!(
                    "set -e\nif ",
                    alive!(),
                    "; then exit 0; fi\nrm -f {pid}\n",
                    "env -i PATH={path} LANG=C.UTF-8 setsid {bin} agent --config {cfg} --supervise --pid-file {pid} >> {log} 2>&1 < /dev/null &\n",
                    "i=0; while [ $i -lt 100 ]; do [ -s {pid} ] && exit 0; sleep 0.05; i=$((i+1)); done\n",
                    "echo \"the agent did not start; see \"{log} >&2; tail -n 5 {log} >&2; exit 1\n",
                ),
                &[
                    ("pid", &pid),
                    ("needle", &needle),
                    ("path", &quote(crate::postgres::process::SERVICE_PATH)),
                    ("bin", &quote(&paths.binary())),
                    ("cfg", &quote(&paths.config())),
                    ("log", &quote(&paths.log_file())),
                ],
            )
        }
    }
}

pub async fn start_agent(
    s: &Session,
    service: Service,
    paths: &Paths,
    cluster: &str,
    member: &str,
) -> Result<(), SshError> {
    s.run(
        "start the agent",
        &start_script(service, paths, cluster, member),
        STEP_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// The script that stops the agent gracefully (it stops PostgreSQL and hands leadership over
/// first).
pub fn stop_script(service: Service, paths: &Paths, cluster: &str, member: &str) -> Script {
    match service {
        Service::Systemd => Script::render(
            "systemctl stop {unit} || true",
            &[("unit", &quote(&Paths::unit_name(cluster, member)))],
        ),
        Service::Process => {
            let (pid, needle) = alive_args(paths);
            Script::render(
                concat!(
                    "if ",
                    alive!(),
                    "; then kill -TERM $pid; i=0; while [ -d /proc/$pid ] && [ $i -lt 1800 ]; do sleep 0.05; i=$((i+1)); done; ",
                    "[ -d /proc/$pid ] && kill -KILL $pid; fi; rm -f {pid}; true",
                ),
                &[("pid", &pid), ("needle", &needle)],
            )
        }
    }
}

pub async fn stop_agent(
    s: &Session,
    service: Service,
    paths: &Paths,
    cluster: &str,
    member: &str,
) -> Result<(), SshError> {
    s.run(
        "stop the agent",
        &stop_script(service, paths, cluster, member),
        STEP_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// New secrets for a running agent: it takes them without a restart (SIGHUP; the supervisor
/// of a `process` agent forwards it).
pub fn reload_script(service: Service, paths: &Paths, cluster: &str, member: &str) -> Script {
    match service {
        Service::Systemd => Script::render(
            "systemctl reload {unit}",
            &[("unit", &quote(&Paths::unit_name(cluster, member)))],
        ),
        Service::Process => {
            let (pid, needle) = alive_args(paths);
            Script::render(
                concat!(
                    "if ",
                    alive!(),
                    "; then kill -HUP $pid; else echo 'the agent is not running' >&2; exit 1; fi"
                ),
                &[("pid", &pid), ("needle", &needle)],
            )
        }
    }
}

pub async fn reload_agent(
    s: &Session,
    service: Service,
    paths: &Paths,
    cluster: &str,
    member: &str,
) -> Result<(), SshError> {
    s.run(
        "reload the agent",
        &reload_script(service, paths, cluster, member),
        STEP_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// Print the agent configuration, if there is one.
pub fn read_config_script(paths: &Paths) -> Script {
    Script::render(
        "cat {config} 2>/dev/null || true",
        &[("config", &quote(&paths.config()))],
    )
}

/// Rename `dir` to `aside` when it exists (prints `moved`).
pub fn set_aside_script(dir: &str, aside: &str) -> Script {
    Script::render(
        "if [ -d {dir} ]; then mv -T -- {dir} {aside} && echo moved; fi",
        &[("dir", &quote(dir)), ("aside", &quote(aside))],
    )
}

/// Rename a retired member's data directory (named in its agent configuration) to
/// `{data_dir}.removed-{unix time}`: set aside, never deleted. Returns the new name, or None
/// when there was none.
pub async fn set_data_aside(s: &Session, paths: &Paths) -> Result<Option<String>, SshError> {
    let text = s
        .run(
            "read the agent configuration",
            &read_config_script(paths),
            STEP_TIMEOUT,
        )
        .await?;
    let Ok(cfg) = crate::agent::config::AgentConfig::parse(&text) else {
        return Ok(None);
    };
    let dir = cfg.postgres.data_dir.trim_end_matches('/').to_string();
    if dir.is_empty() || dir == "/" {
        return Ok(None);
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = format!("{dir}.removed-{secs}");
    let out = s
        .run(
            "set the data directory aside",
            &set_aside_script(&dir, &aside),
            STEP_TIMEOUT,
        )
        .await?;
    Ok(out.contains("moved").then_some(aside))
}

pub async fn restart_agent(
    s: &Session,
    service: Service,
    paths: &Paths,
    cluster: &str,
    member: &str,
) -> Result<(), SshError> {
    stop_agent(s, service, paths, cluster, member).await?;
    start_agent(s, service, paths, cluster, member).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_come_without_a_main_cluster_through_the_proxy_and_stay_held() {
        let pkgs = [
            "postgresql-15".to_string(),
            "postgresql-15-citus-13.2".into(),
        ];
        let direct = install_packages_script(&pkgs, None, true)
            .text()
            .to_string();
        // No proxy in the spec: no option, so the host's own apt configuration holds.
        assert!(!direct.contains("Acquire::http::Proxy"), "{direct}");
        let proxied = install_packages_script(&pkgs, Some("http://10.0.0.1:3142"), true)
            .text()
            .to_string();
        assert_eq!(
            proxied
                .matches("apt-get -oAcquire::http::Proxy=http://10.0.0.1:3142 ")
                .count(),
            2,
            "update and install both go through the proxy: {proxied}"
        );
        for script in [&direct, &proxied] {
            let at = |needle: &str| {
                script
                    .find(needle)
                    .unwrap_or_else(|| panic!("{needle:?} missing from {script}"))
            };
            // The drop-in exists before any package can run its postinst.
            assert!(
                at(
                    "'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/50-citus-reconcile.conf"
                ) < at(" update -qq")
            );
            assert!(at(" install -y") < at("apt-mark hold postgresql-15 postgresql-15-citus-13.2"));
            assert!(script.contains("--allow-change-held-packages"));
            assert!(!script.contains("pgbouncer"), "{script}");
        }
        // Beside an installed PostgreSQL: apt may not change a held package.
        let beside = install_packages_script(&pkgs, None, false)
            .text()
            .to_string();
        assert!(!beside.contains("--allow-change-held-packages"), "{beside}");
        let with_pooler = install_packages_script(&["pgbouncer".to_string()], None, true)
            .text()
            .to_string();
        assert!(with_pooler.contains("apt-mark hold pgbouncer"));
        assert!(with_pooler.contains("systemctl disable --now pgbouncer.service"));
    }

    #[test]
    fn unit_files_take_hostile_paths_as_written() {
        for (path, quoted) in [
            ("/opt/cr/bin", r#""/opt/cr/bin""#),
            ("/opt/a b/$(reboot)", r#""/opt/a b/$$(reboot)""#),
            ("/x/%n%i", r#""/x/%%n%%i""#),
            ("/x/\"q\"\\`id`", r#""/x/\"q\"\\`id`""#),
            (
                "/x/a\nExecStartPre=/bin/sh",
                r#""/x/a\nExecStartPre=/bin/sh""#,
            ),
        ] {
            assert_eq!(systemd_quote(path), quoted, "{path:?}");
        }
        let paths = Paths::new("/srv/$HOME/%h\nExecStartPre=/bin/false");
        let unit = unit_text(&paths, "c%n", "m");
        // Every line is one of ours: nothing smuggled a directive in.
        for line in unit
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let key = line.split('=').next().unwrap_or_default();
            assert!(UNIT_KEYS.contains(&key), "{line}");
        }
        assert!(
            unit.contains("Description=citus-reconcile agent (c%%n/m)"),
            "{unit}"
        );
        assert!(
            unit.contains(
                r#"ExecStart="/srv/$HOME/%%h\nExecStartPre=/bin/false/bin/citus-reconcile" agent --config "/srv/$$HOME/%%h\nExecStartPre=/bin/false/agent.yaml""#
            ),
            "{unit}"
        );
    }
}
