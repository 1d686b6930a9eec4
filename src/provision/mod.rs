//! Per-host steps of `apply`, over SSH: packages, the agent binary and configuration, the
//! service, starting and stopping the agent. Each step is idempotent, so a rerun after a failure
//! simply continues.

use std::time::Duration;

use crate::agent::config::Paths;
use crate::spec::model::Service;
use crate::ssh::{Session, SshError, shell_quote};

pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);
pub const PACKAGE_TIMEOUT: Duration = Duration::from_secs(900);
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn install_packages(s: &Session, packages: &[String]) -> Result<(), SshError> {
    let list: Vec<String> = packages.iter().map(|p| shell_quote(p)).collect();
    let cmd = format!(
        "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends {}",
        list.join(" ")
    );
    s.run("install packages", &cmd, PACKAGE_TIMEOUT)
        .await
        .map(|_| ())
}

/// The install folder: traversable by postgres (socket and passfile live below it), readable
/// by root only otherwise.
pub async fn prepare_dirs(s: &Session, paths: &Paths) -> Result<(), SshError> {
    let dir = shell_quote(&paths.install_dir);
    let bin = shell_quote(&format!("{}/bin", paths.install_dir));
    s.run(
        "create folders",
        &format!("mkdir -p {dir} {bin} && chmod 0711 {dir}"),
        STEP_TIMEOUT,
    )
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
    let bin = shell_quote(&paths.binary());
    let cmd = format!(
        "printf '%s\\n%s\\n' {} \"$(stat -c %s.%Y {bin})\" > {bin}.sha256",
        shell_quote(sha256)
    );
    s.run("record the binary's hash", &cmd, STEP_TIMEOUT)
        .await
        .map(|_| ())
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

/// One word of a unit file's command line, quoted as systemd.syntax(7) and
/// systemd.service(5) define: double quotes with C-style escapes, `%` as `%%` (specifiers)
/// and `$` as `$$` (variable expansion), so a path is taken as written.
pub fn systemd_quote(word: &str) -> String {
    let mut out = String::from("\"");
    for c in word.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32 & 0xff)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Text for a unit file's free-form values (Description=): specifiers escaped, one line.
fn systemd_text(value: &str) -> String {
    value
        .replace('%', "%%")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub fn unit_text(paths: &Paths, cluster: &str, member: &str) -> String {
    format!(
        "# Written by citus-reconcile apply.\n[Unit]\nDescription={}\nAfter=network-online.target\nWants=network-online.target\n\n\
         [Service]\nExecStart={} agent --config {}\nExecReload=/bin/kill -HUP $MAINPID\nRestart=always\nRestartSec=2\nKillMode=mixed\nTimeoutStopSec=90\nLimitNOFILE=65536\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        systemd_text(&format!("citus-reconcile agent ({cluster}/{member})")),
        systemd_quote(&paths.binary()),
        systemd_quote(&paths.config())
    )
}

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
        &format!(
            "systemctl daemon-reload && systemctl enable {}",
            shell_quote(&unit)
        ),
        STEP_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// A shell test that is true when the pid file names a live agent for this config.
fn agent_alive_test(paths: &Paths) -> String {
    format!(
        "[ -f {pid} ] && pid=$(cat {pid}) && [ -r /proc/$pid/cmdline ] && tr '\\0' ' ' < /proc/$pid/cmdline | grep -q -- {needle}",
        pid = shell_quote(&paths.pid_file()),
        needle = shell_quote(&format!("--config {}", paths.config())),
    )
}

pub async fn start_agent(
    s: &Session,
    service: Service,
    paths: &Paths,
    cluster: &str,
    member: &str,
) -> Result<(), SshError> {
    match service {
        Service::Systemd => {
            let unit = shell_quote(&Paths::unit_name(cluster, member));
            s.run(
                "start the agent",
                &format!("systemctl start {unit}"),
                STEP_TIMEOUT,
            )
            .await
            .map(|_| ())
        }
        Service::Process => {
            // A detached, self-supervising process; its pid file proves it started. Its
            // environment is what systemd gives a system service (a plain PATH and a locale),
            // not the SSH session's.
            let script = format!(
                "set -e\nif {alive}; then exit 0; fi\nrm -f {pid}\n\
                 env -i PATH={path} LANG=C.UTF-8 setsid {bin} agent --config {cfg} --supervise --pid-file {pid} >> {log} 2>&1 < /dev/null &\n\
                 i=0; while [ $i -lt 100 ]; do [ -s {pid} ] && exit 0; sleep 0.05; i=$((i+1)); done\n\
                 echo \"the agent did not start; see \"{log} >&2; tail -n 5 {log} >&2; exit 1\n",
                alive = agent_alive_test(paths),
                path = shell_quote(crate::postgres::process::SERVICE_PATH),
                pid = shell_quote(&paths.pid_file()),
                bin = shell_quote(&paths.binary()),
                cfg = shell_quote(&paths.config()),
                log = shell_quote(&paths.log_file()),
            );
            s.run("start the agent", &script, STEP_TIMEOUT)
                .await
                .map(|_| ())
        }
    }
}

/// Stop the agent gracefully: it stops PostgreSQL and hands leadership over first.
pub async fn stop_agent(
    s: &Session,
    service: Service,
    paths: &Paths,
    cluster: &str,
    member: &str,
) -> Result<(), SshError> {
    match service {
        Service::Systemd => {
            let unit = shell_quote(&Paths::unit_name(cluster, member));
            s.run(
                "stop the agent",
                &format!("systemctl stop {unit} || true"),
                STEP_TIMEOUT,
            )
            .await
            .map(|_| ())
        }
        Service::Process => {
            let script = format!(
                "if {alive}; then kill -TERM $pid; i=0; while [ -d /proc/$pid ] && [ $i -lt 1800 ]; do sleep 0.05; i=$((i+1)); done; \
                 [ -d /proc/$pid ] && kill -KILL $pid; fi; rm -f {pid_file}; true",
                alive = agent_alive_test(paths),
                pid_file = shell_quote(&paths.pid_file()),
            );
            s.run("stop the agent", &script, STEP_TIMEOUT)
                .await
                .map(|_| ())
        }
    }
}

/// New secrets for a running agent: it takes them without a restart (SIGHUP; the supervisor
/// of a `process` agent forwards it).
pub async fn reload_agent(
    s: &Session,
    service: Service,
    paths: &Paths,
    cluster: &str,
    member: &str,
) -> Result<(), SshError> {
    let script = match service {
        Service::Systemd => format!(
            "systemctl reload {}",
            shell_quote(&Paths::unit_name(cluster, member))
        ),
        Service::Process => format!(
            "if {alive}; then kill -HUP $pid; else echo 'the agent is not running' >&2; exit 1; fi",
            alive = agent_alive_test(paths),
        ),
    };
    s.run("reload the agent", &script, STEP_TIMEOUT)
        .await
        .map(|_| ())
}

/// Rename a retired member's data directory (named in its agent configuration) to
/// `{data_dir}.removed-{unix time}`: set aside, never deleted. Returns the new name, or None
/// when there was none.
pub async fn set_data_aside(s: &Session, paths: &Paths) -> Result<Option<String>, SshError> {
    let text = s
        .run(
            "read the agent configuration",
            &format!("cat {} 2>/dev/null || true", shell_quote(&paths.config())),
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
            &format!(
                "if [ -d {d} ]; then mv -T -- {d} {a} && echo moved; fi",
                d = shell_quote(&dir),
                a = shell_quote(&aside)
            ),
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
            assert!(
                [
                    "[Unit]",
                    "Description",
                    "After",
                    "Wants",
                    "[Service]",
                    "ExecStart",
                    "ExecReload",
                    "Restart",
                    "RestartSec",
                    "KillMode",
                    "TimeoutStopSec",
                    "LimitNOFILE",
                    "[Install]",
                    "WantedBy"
                ]
                .contains(&key),
                "{line}"
            );
        }
        assert!(
            unit.contains("Description=citus-reconcile agent (c%%n/m)"),
            "{unit}"
        );
        assert!(
            unit.contains(
                r#"ExecStart="/srv/$$HOME/%%h\nExecStartPre=/bin/false/bin/citus-reconcile" agent"#
            ),
            "{unit}"
        );
    }
}
