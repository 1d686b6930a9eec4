//! Test support shared by the integration tests: labs that tear themselves down, scratch
//! PostgreSQL servers, and the switch that turns "skipped" into "failed" in CI.
//!
//! Each lab test owns one /24 (10.213.N.0/24) and one cluster name; the table below keeps them
//! apart so every test can run in parallel with every other.
//!
//! | N   | test |
//! |-----|------|
//! | 100 | lab::lifecycle |
//! | 101 | lab::faults |
//! | 110 | apply::bare_hosts… (the seed topology) |
//! | 111 | apply::host_keys… |
//! | 112 | apply::apply_restarts… |
//! | 130 | ha::host_crash… |
//! | 131 | ha::postgres_crash… |
//! | 132 | ha::etcd_partition… |
//! | 133 | ha::losing_one_etcd… |
//! | 134 | ha::switchover… |
//! | 135 | ha::manual_failover… |
//! | 136 | ha::haproxy… |
//! | 137 | ha::synchronous… |
//! | 138 | ha::paused… |
//! | 139 | ha::agent_crash… |
//! | 140 | ha::coordinator_failover… |
//! | 141 | citus::distributed_sql… |
//! | 142 | citus::metadata_follows… |
//! | 143 | citus::worker_switchover… |
//! | 144 | citus::a_pause_never… |
//! | 145 | citus::pause_on_loss… |
//! | 146 | citus::credentials_rotate… |
//! | 147 | lifecycle::a_worker_group_joins… |
//! | 148 | lifecycle::configuration_and_agent_upgrades… |
//! | 200 | benches/apply.rs |
//! | 201–209 | benches/ha.rs |
//! | 210, 211 | benches/citus.rs |
#![allow(dead_code)]

pub mod citus_client;
pub mod pg;
pub mod prober;

use std::path::{Path, PathBuf};

use citus_reconcile::lab::Lab;
use citus_reconcile::spec::{self, LoadOptions, Spec};

/// Whether tests that need root, namespaces and the apt packages can run here. When they
/// cannot, say so; with CITUS_RECONCILE_REQUIRE_LAB=1 (set by CI) that is a failure instead.
pub fn lab_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["/usr/sbin/sshd", "/usr/bin/etcd", "/usr/sbin/ip"]
        .iter()
        .all(|p| Path::new(p).exists());
    if root && tools {
        return true;
    }
    let why = if root {
        "sshd, etcd or iproute2 is missing (run .ci/setup)"
    } else {
        "it needs root"
    };
    if std::env::var("CITUS_RECONCILE_REQUIRE_LAB").as_deref() == Ok("1") {
        panic!("{test}: cannot run: {why}");
    }
    eprintln!("skipped {test}: {why}");
    false
}

/// A lab built from a spec text in its own temporary folder; `down` runs on drop, also when
/// the test fails.
pub struct TestLab {
    pub lab: Lab,
    pub spec: Spec,
    pub spec_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl TestLab {
    /// Write the spec, clear leftovers of an earlier crashed run, and bring the lab up.
    pub fn up(spec_text: &str) -> TestLab {
        let mut t = Self::prepare(spec_text);
        t.lab.up().unwrap_or_else(|e| panic!("lab up: {e}"));
        // The lab may have written files the spec reads (etcd's TLS material).
        t.spec = load_spec(&t.spec_path, true).unwrap_or_else(|e| panic!("{e}"));
        t
    }

    /// Like `up` but without bringing anything up.
    pub fn prepare(spec_text: &str) -> TestLab {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec_path = dir.path().join("spec.yaml");
        std::fs::write(&spec_path, spec_text).expect("write spec");
        let shape = load_spec(&spec_path, false).unwrap_or_else(|e| panic!("{e}"));
        let lab = Lab::new(&shape).unwrap_or_else(|e| panic!("{e}"));
        // Files the lab writes (etcd's TLS material) exist only after `up`.
        let spec = match (load_spec(&spec_path, true), &shape.etcd.tls) {
            (Ok(s), _) => s,
            (Err(_), Some(_)) => shape,
            (Err(e), None) => panic!("{e}"),
        };
        let _ = lab.down();
        TestLab {
            lab,
            spec,
            spec_path,
            dir,
        }
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        // Debug aid: CR_KEEP_LAB=1 leaves a failed test's lab for inspection (`lab down` later).
        if std::env::var("CR_KEEP_LAB").as_deref() == Ok("1") {
            eprintln!(
                "keeping lab {} (spec {})",
                self.lab.topology.subnet_cidr(),
                self.spec_path.display()
            );
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("temp dir"),
            ));
            return;
        }
        if let Err(e) = self.lab.down() {
            eprintln!("lab down failed: {e}");
        }
        // The lab leaves nothing behind: no member's data or install folder.
        let left: Vec<String> = self
            .spec
            .hosts()
            .flat_map(|h| [h.data_dir.clone(), h.install_dir.clone()])
            .filter(|d| std::path::Path::new(d).exists())
            .collect();
        if !left.is_empty() && !std::thread::panicking() {
            panic!("`lab down` left member folders behind: {left:?}");
        }
    }
}

/// Load a test spec, with its secrets or only its shape.
fn load_spec(path: &std::path::Path, secrets: bool) -> Result<Spec, String> {
    let report = spec::load_file(
        path,
        LoadOptions {
            resolve_secrets: secrets,
            resolve_etcd_secret: secrets,
        },
    );
    report
        .spec
        .clone()
        .ok_or_else(|| format!("test spec invalid:\n{}", report.render()))
}

/// A spec for a lab on 10.213.{subnet}.0/24 with the given groups (`[(group, n_hosts)]`) and
/// `etcd` members. Host names are `g{group}m{i}`; addresses 10.213.N.{10*group+i+10}.
pub fn lab_spec(
    cluster: &str,
    subnet: u8,
    groups: &[(u32, usize)],
    etcd: usize,
    extra: &str,
) -> String {
    let endpoints: Vec<String> = (0..etcd)
        .map(|i| format!("http://10.213.{subnet}.{}:2379", 2 + i))
        .collect();
    let mut text = format!(
        "apiVersion: citus-reconcile/v1\ncluster: {cluster}\netcd:\n  endpoints: [{}]\n\
         ssh: {{ identity_file: .lab/id_ed25519, known_hosts: .lab/known_hosts }}\n\
         postgres:\n  install: none\n  superuser: {{ username: postgres, password: {{ env: CR_LAB_SUPERUSER }} }}\n\
         \x20 replication: {{ username: replicator, password: {{ env: CR_LAB_REPLICATION }} }}\n\
         \x20 parameters: {{ max_connections: 50, shared_buffers: 16MB }}\n\
         \x20 pg_hba: [\"host all all 10.213.{subnet}.0/24 scram-sha-256\"]\n\
         agent: {{ service: process, api_auth: {{ username: admin, password: {{ env: CR_LAB_SUPERUSER }} }} }}\n{extra}groups:\n",
        endpoints.join(", ")
    );
    for (g, n) in groups {
        text.push_str(&format!("  - group: {g}\n    hosts:\n"));
        for i in 0..*n {
            text.push_str(&format!(
                "      - {{ name: g{g}m{i}, address: 10.213.{subnet}.{} }}\n",
                10 * g + i as u32 + 10
            ));
        }
    }
    text
}

/// Secrets the lab specs read, set once per test process.
pub fn set_lab_secrets() {
    // SAFETY: called before any thread of the test reads the environment concurrently
    // (std's env lock serialises readers and writers within the process).
    unsafe {
        std::env::set_var("CR_LAB_SUPERUSER", "lab-superuser-pw");
        std::env::set_var("CR_LAB_REPLICATION", "lab-replication-pw");
        std::env::set_var("CR_LAB_ETCD", "lab-etcd-pw");
    }
}

/// Run the CLI on a lab's spec, with the lab's secrets.
pub fn cli(t: &TestLab, args: &[&str]) -> std::process::Output {
    cli_with_secrets(t, args, "lab-superuser-pw", "lab-replication-pw")
}

/// Run the CLI on a lab's spec with other values for the spec's secrets.
pub fn cli_with_secrets(
    t: &TestLab,
    args: &[&str],
    superuser: &str,
    replication: &str,
) -> std::process::Output {
    assert_cmd::Command::cargo_bin("citus-reconcile")
        .expect("binary")
        .args(args)
        .arg(&t.spec_path)
        .env("CR_LAB_SUPERUSER", superuser)
        .env("CR_LAB_REPLICATION", replication)
        // Longer than apply's own convergence timeout, so its report is never cut off.
        .timeout(std::time::Duration::from_secs(420))
        .output()
        .expect("citus-reconcile runs")
}

pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `status --json` of a lab's cluster.
pub fn status(t: &TestLab) -> serde_json::Value {
    let o = cli(t, &["status", "--json"]);
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

/// The leader of a group according to etcd (via `status`), if any.
pub fn leader(t: &TestLab, group: u64) -> Option<String> {
    status(t)["members"]
        .as_array()?
        .iter()
        .find(|m| m["group"] == group && m["role"] == "Leader" && m["state"] == "running")
        .and_then(|m| m["member"].as_str().map(str::to_string))
}

/// Who holds a group's leader key according to `status`, whatever that member's PostgreSQL is
/// doing at the moment (a leader restarting PostgreSQL after a crash is still the leader).
/// `None` when nobody holds it or `status` did not answer.
pub fn leader_key_holder(t: &TestLab, group: u64) -> Option<String> {
    status(t)["members"]
        .as_array()?
        .iter()
        .find(|m| m["group"] == group && m["role"] == "Leader")
        .and_then(|m| m["member"].as_str().map(str::to_string))
}

/// Asserts that `expected` still leads `group`: waits (bounded) for the group to report a
/// running leader, then checks it is `expected`; the failure message carries the agents' logs.
pub fn assert_still_leader(t: &TestLab, group: u64, expected: &str, why: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = leader_key_holder(t, group);
    while std::time::Instant::now() < deadline {
        if leader(t, group).as_deref() == Some(expected) {
            return;
        }
        seen = leader_key_holder(t, group);
        if seen.as_deref().is_some_and(|s| s != expected) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!(
        "{why}: expected {expected} to lead group {group}, the leader key is held by {seen:?}\n{}",
        agent_logs(t, 40)
    );
}

/// (name, address, port) of every member of a group in the spec.
pub fn members(t: &TestLab, group: u32) -> Vec<(String, String, u16)> {
    t.spec
        .group(group)
        .map(|g| {
            g.hosts
                .iter()
                .map(|h| (h.name.clone(), h.address.clone(), h.pg_port))
                .collect()
        })
        .unwrap_or_default()
}

/// Poll `cond` until it returns Some, or give up after `timeout` (a liveness guard, not a
/// performance assertion).
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for {what} after {timeout:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Bring a lab up and apply its spec.
pub fn cluster(spec: &str) -> TestLab {
    set_lab_secrets();
    let t = TestLab::up(spec);
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "apply failed:\n{}", output_text(&o));
    t
}

/// One HTTP/1.0 request to an agent's REST API: (status, body); status 0 when the server
/// cannot be reached.
pub fn http(
    method: &str,
    addr: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: &str,
) -> (u16, String) {
    let Some(s) = connect(addr) else {
        return (0, String::new());
    };
    exchange(s, method, addr, path, auth, body)
}

/// The same over TLS, trusting `ca_pem` (status 0 also when the handshake fails).
pub fn https(
    method: &str,
    addr: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: &str,
    ca_pem: &str,
) -> (u16, String) {
    let Some(s) = connect(addr) else {
        return (0, String::new());
    };
    let config = citus_reconcile::tls::client_config(ca_pem, None).expect("a CA");
    let host: std::net::SocketAddr = addr.parse().expect("address");
    let name = rustls::pki_types::ServerName::IpAddress(host.ip().into());
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("tls");
    exchange(
        rustls::StreamOwned::new(conn, s),
        method,
        addr,
        path,
        auth,
        body,
    )
}

fn connect(addr: &str) -> Option<std::net::TcpStream> {
    let s = std::net::TcpStream::connect_timeout(
        &addr.parse().expect("address"),
        std::time::Duration::from_secs(2),
    )
    .ok()?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(60)));
    Some(s)
}

fn exchange(
    mut s: impl std::io::Read + std::io::Write,
    method: &str,
    addr: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: &str,
) -> (u16, String) {
    use base64::Engine;
    let auth = auth
        .map(|(u, p)| {
            format!(
                "Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let resp = String::from_utf8_lossy(&raw);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Pid of a member's agent (the supervised child, not the supervisor).
pub fn agent_pid(t: &TestLab, member: &str) -> Option<i32> {
    let config = format!("{}/agent.yaml", t.spec.host(member)?.install_dir);
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains(&format!("agent --config {config}")) && !c.contains("--supervise")
                })
                .unwrap_or(false)
        })
}

/// Send `sig` to a member's agent (SIGSTOP freezes it: a hung agent).
pub fn signal_agent(t: &TestLab, member: &str, sig: i32) {
    let pid = agent_pid(t, member).unwrap_or_else(|| panic!("no agent running for {member}"));
    // SAFETY: kill(2) on an agent the lab started for this test.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The value of one of the cluster's etcd keys (`{namespace}/{cluster}/{rest}`).
pub fn etcd_get(t: &TestLab, rest: &str) -> Option<String> {
    let key = format!(
        "{}/{}/{rest}",
        t.spec.etcd.namespace.trim_end_matches('/'),
        t.spec.cluster
    );
    let out = etcdctl_output(t, &["get", &key, "--print-value-only"]);
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// A group's `sync` key: (leader, synchronous standby).
pub fn sync_key(t: &TestLab, group: u32) -> Option<(String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&etcd_get(t, &format!("{group}/sync"))?).ok()?;
    Some((
        v["leader"].as_str()?.to_string(),
        v["sync_standby"].as_str()?.to_string(),
    ))
}

/// The postmaster pid of a member (from postmaster.pid).
pub fn postmaster_pid(t: &TestLab, member: &str) -> Option<i32> {
    let dir = &t.spec.host(member)?.data_dir;
    std::fs::read_to_string(format!("{dir}/postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// SIGKILL a member's postmaster (the agent notices and acts).
pub fn kill_postmaster(t: &TestLab, member: &str) {
    let pid = postmaster_pid(t, member).expect("a running postmaster");
    // SAFETY: kill(2) on the postmaster the lab's agent runs; the lab owns it.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// The last `n` lines of every member's agent log, for a failure message.
pub fn agent_logs(t: &TestLab, n: usize) -> String {
    let mut out = String::new();
    for g in &t.spec.groups {
        for h in &g.hosts {
            let log =
                std::fs::read_to_string(format!("{}/agent.log", h.install_dir)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(n);
            out.push_str(&format!("--- {} agent log (last {n} lines)\n", h.name));
            for l in &lines[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

/// Run etcdctl against a lab's etcd; stdout on success.
pub fn etcdctl(t: &TestLab, args: &[&str]) -> Option<String> {
    let out = etcdctl_output(t, args);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Run etcdctl against a lab's etcd: its whole output.
pub fn etcdctl_output(t: &TestLab, args: &[&str]) -> std::process::Output {
    use citus_reconcile::spec::secret::SecretSource;
    // With TLS: the files the spec names (the lab wrote them).
    let mut tls = Vec::new();
    if let Some(spec_tls) = &t.spec.etcd.tls {
        for (flag, pem) in [
            ("--cacert", Some(&spec_tls.ca)),
            ("--cert", spec_tls.cert.as_ref()),
            ("--key", spec_tls.key.as_ref()),
        ] {
            if let Some(SecretSource::File(path)) = pem.map(|p| &p.source) {
                tls.push(format!("{flag}={path}"));
            }
        }
    }
    std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &t.spec.etcd.endpoints.join(","),
            "--command-timeout=5s",
        ])
        .args(&tls)
        .args(args)
        .output()
        .expect("etcdctl runs")
}

/// The full key of the apply lock of a lab's cluster.
pub fn apply_lock_key(t: &TestLab) -> String {
    format!(
        "{}/.citus-reconcile/{}/apply-lock",
        t.spec.etcd.namespace.trim_end_matches('/'),
        t.spec.cluster
    )
}

/// Run one SQL statement with psql on a member's server (database `citus`); its output.
pub fn psql(t: &TestLab, member: &str, sql: &str) -> String {
    match try_psql(t, member, sql) {
        Ok(out) => out,
        Err(e) => panic!("psql on {member}: {e}"),
    }
}

/// `psql`, for a server that may be restarting meanwhile: its error instead of a panic.
pub fn try_psql(t: &TestLab, member: &str, sql: &str) -> Result<String, String> {
    let h = t.spec.host(member).expect("member");
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            &h.address,
            "-p",
            &h.pg_port.to_string(),
            "-U",
            "postgres",
            "-d",
            "citus",
            "-XAtc",
            sql,
        ])
        .env("PGPASSWORD", "lab-superuser-pw")
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("psql runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
