//! `apply`, `plan`, `status` and `watch` end to end in the lab: bare hosts to a replicated
//! Citus cluster, an empty plan afterwards, adding a standby, the SSH host-key policy, and
//! drift made by hand reported (and with `--repair` repaired) while a client writes.

mod common;

use std::process::Output;
use std::time::Duration;

use assert_cmd::Command;
use common::{TestLab, lab_available, lab_spec, psql, set_lab_secrets};

fn cli(t: &TestLab, args: &[&str]) -> Output {
    Command::cargo_bin("citus-reconcile")
        .expect("binary")
        .args(args)
        .arg(&t.spec_path)
        .env("CR_LAB_SUPERUSER", "lab-superuser-pw")
        .env("CR_LAB_REPLICATION", "lab-replication-pw")
        .timeout(Duration::from_secs(420))
        .output()
        .expect("citus-reconcile runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn bare_hosts_to_converged_cluster_then_an_empty_plan_and_a_new_standby() {
    if !lab_available("apply from bare hosts") {
        return;
    }
    set_lab_secrets();
    // The reference topology: 3 coordinators, two worker groups of two, a 3-member etcd.
    let spec = lab_spec(
        "applyseed",
        110,
        &[(0, 3), (1, 2), (2, 2)],
        3,
        "ha: { ttl: 10, loop_wait: 2, retry_timeout: 4 }\n",
    );
    let mut t = TestLab::up(&spec);

    let plan = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(2), "{}", text(&plan));
    assert!(
        text(&plan).contains("Plan: 34 to add, 0 to change, 0 to destroy."),
        "{}",
        text(&plan)
    );

    let apply = cli(&t, &["apply", "--auto-approve"]);
    let out = text(&apply);
    assert!(apply.status.success(), "{out}");
    assert!(out.contains("Apply complete"), "{out}");
    assert!(
        !out.contains("lab-superuser-pw") && !out.contains("lab-replication-pw"),
        "a secret was printed:\n{out}"
    );

    // status: one leader and streaming replicas in each group.
    let status = cli(&t, &["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let members = s["members"].as_array().expect("members");
    assert_eq!(members.len(), 7);
    let mut leaders = std::collections::BTreeMap::new();
    for m in members {
        match m["role"].as_str() {
            Some("Leader") => {
                assert_eq!(m["state"], "running", "{m}");
                leaders.insert(
                    m["group"].as_u64().unwrap_or(99),
                    m["host"].as_str().unwrap_or("").to_string(),
                );
            }
            Some("Replica") => assert_eq!(m["state"], "streaming", "{m}"),
            other => panic!("unexpected role {other:?}: {m}"),
        }
    }
    assert_eq!(leaders.len(), 3, "{leaders:?}");

    // pg_dist_node on the coordinator primary: the coordinator and one primary per worker
    // group, at the leaders' addresses.
    let coordinator = members
        .iter()
        .find(|m| m["group"] == 0 && m["role"] == "Leader")
        .and_then(|m| m["member"].as_str())
        .expect("coordinator leader");
    let rows = psql(
        &t,
        coordinator,
        "SELECT groupid, nodename || ':' || nodeport, noderole FROM pg_dist_node ORDER BY groupid",
    );
    let expected: Vec<String> = leaders
        .iter()
        .map(|(g, host)| format!("{g}|{host}|primary"))
        .collect();
    assert_eq!(rows.lines().collect::<Vec<_>>(), expected);
    // pg_dist_authinfo matches the spec on every group primary.
    for (g, host) in &leaders {
        let member = members
            .iter()
            .find(|m| m["host"] == host.as_str())
            .and_then(|m| m["member"].as_str())
            .expect("member");
        let auth = psql(
            &t,
            member,
            "SELECT nodeid, rolename, authinfo FROM pg_dist_authinfo",
        );
        assert_eq!(auth, "0|postgres|password=lab-superuser-pw", "group {g}");
    }

    // Converged: the plan is empty and a second apply changes nothing.
    let plan = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    let again = cli(&t, &["apply", "--auto-approve"]);
    assert!(
        again.status.success() && text(&again).contains("No changes."),
        "{}",
        text(&again)
    );

    // With the real Citus extension, a distributed table takes writes and reads.
    if matches!(
        citus_reconcile::lab::standin::detect("/usr/lib/postgresql/15/bin"),
        Ok(Some(citus_reconcile::lab::CitusInstall::Real { .. }))
    ) {
        psql(
            &t,
            coordinator,
            "CREATE TABLE t (id int primary key, v text); SELECT create_distributed_table('t', 'id'); INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g;",
        );
        assert_eq!(psql(&t, coordinator, "SELECT count(*) FROM t"), "100");
    } else {
        eprintln!(
            "skipped distributed-table check: needs the real Citus extension (the stand-in routes no queries)"
        );
    }

    // Adding a standby to group 1: the plan touches exactly that host; apply converges.
    let grown = spec.replace(
        "      - { name: g1m1, address: 10.213.110.21 }\n",
        "      - { name: g1m1, address: 10.213.110.21 }\n      - { name: g1m2, address: 10.213.110.22 }\n",
    );
    assert_ne!(grown, spec);
    std::fs::write(&t.spec_path, &grown).expect("write spec");
    let grown_lab = citus_reconcile::lab::Lab::new(
        &citus_reconcile::spec::load_file(&t.spec_path, Default::default())
            .spec
            .expect("valid grown spec"),
    )
    .expect("lab");
    grown_lab.up().expect("lab up with the new host");
    // From now on the guard tears down the grown lab, new member included.
    t.lab = grown_lab;
    let plan = cli(&t, &["plan", "--json"]);
    let p: serde_json::Value =
        serde_json::from_slice(&plan.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&plan)));
    let targets: std::collections::BTreeSet<String> = p["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .map(|a| a["target"].to_string())
        .collect();
    assert_eq!(
        targets.into_iter().collect::<Vec<_>>(),
        vec![r#"{"kind":"host","name":"g1m2"}"#.to_string()],
        "{}",
        text(&plan)
    );
    assert_eq!(p["summary"]["change"], 0, "{}", text(&plan));
    assert_eq!(p["summary"]["destroy"], 0);

    // As CI does it: a saved plan, applied as reviewed — refused once stale.
    let saved = t.dir.path().join("reviewed.plan.json");
    let saved_arg = saved.to_string_lossy().to_string();
    let out = cli(&t, &["plan", "--out", &saved_arg]);
    assert!(out.status.success(), "{}", text(&out));
    let file = std::fs::read_to_string(&saved).expect("saved plan");
    for secret in ["lab-superuser-pw", "lab-replication-pw"] {
        assert!(!file.contains(secret), "the saved plan holds a secret");
    }
    let apply_saved = |superuser: &str| {
        assert_cmd::Command::cargo_bin("citus-reconcile")
            .expect("binary")
            .args(["apply", &saved_arg])
            .env("CR_LAB_SUPERUSER", superuser)
            .env("CR_LAB_REPLICATION", "lab-replication-pw")
            .timeout(std::time::Duration::from_secs(420))
            .output()
            .expect("citus-reconcile runs")
    };
    std::fs::write(&t.spec_path, format!("{grown}# edited after review\n")).expect("edit");
    let out = apply_saved("lab-superuser-pw");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is stale") && text(&out).contains("changed since the plan was made"),
        "{}",
        text(&out)
    );
    std::fs::write(&t.spec_path, &grown).expect("restore");
    let out = apply_saved("another-superuser-pw");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("a secret the spec reads changed"),
        "{}",
        text(&out)
    );
    // Another apply holds the lock (a holder that died, written as it would be): refused at
    // once naming it, or after --lock-timeout; force-unlock takes only its id.
    let grant = common::etcdctl(&t, &["lease", "grant", "120"]).expect("lease");
    let lease = grant
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    let holder = format!(
        r#"{{"id":"{lease}","user":"ana","host":"ci-runner-7","pid":4242,"since_unix":1795636800,"ci_job":"https://ci.example/jobs/9"}}"#
    );
    common::etcdctl(
        &t,
        &[
            "put",
            &format!("--lease={lease}"),
            &common::apply_lock_key(&t),
            &holder,
        ],
    )
    .expect("put the lock");
    let out = apply_saved("lab-superuser-pw");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "another apply holds the lock: ana@ci-runner-7 (pid 4242, CI job https://ci.example/jobs/9) since 2026-11-25T20:00:00Z, lock id {lease}"
        )),
        "{}",
        text(&out)
    );
    let out = cli(&t, &["apply", "--auto-approve", "--lock-timeout", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("Waiting for the apply lock")
            && text(&out).contains("(waited 2 s, --lock-timeout)"),
        "{}",
        text(&out)
    );
    let force_unlock = |id: &str| {
        Command::cargo_bin("citus-reconcile")
            .expect("binary")
            .arg("force-unlock")
            .arg(&t.spec_path)
            .args([id, "--force"])
            .timeout(Duration::from_secs(60))
            .output()
            .expect("citus-reconcile runs")
    };
    let out = force_unlock("123abc");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not lock id 123abc; nothing removed"),
        "{}",
        text(&out)
    );
    let out = force_unlock(&lease);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("Removed the apply lock of ana@ci-runner-7"),
        "{}",
        text(&out)
    );

    let apply = apply_saved("lab-superuser-pw");
    assert!(apply.status.success(), "{}", text(&apply));
    assert!(text(&apply).contains("still holds"), "{}", text(&apply));
    let plan = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    // The new member streams from its group's leader.
    let status = cli(&t, &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let new = s["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["member"] == "g1m2").cloned())
        .expect("g1m2");
    assert_eq!(
        (new["role"].as_str(), new["state"].as_str()),
        (Some("Replica"), Some("streaming")),
        "{new}"
    );
}

#[test]
fn host_keys_are_verified_and_bad_input_touches_nothing() {
    if !lab_available("host key policy") {
        return;
    }
    set_lab_secrets();
    let t = TestLab::up(&lab_spec("applykeys", 111, &[(0, 1)], 1, ""));
    let known = t.dir.path().join(".lab/known_hosts");
    let original = std::fs::read_to_string(&known).expect("known_hosts");

    // A changed key is always refused, even with --accept-new-host-keys.
    let other =
        citus_reconcile::lab::services::ensure_keypair(&t.dir.path().join("other_key"), "x")
            .expect("another key");
    let forged: String = other
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&known, format!("10.213.111.10 {forged}\n")).expect("forge known_hosts");
    for extra in [&[][..], &["--accept-new-host-keys"][..]] {
        let mut args = vec!["plan"];
        args.extend_from_slice(extra);
        let out = cli(&t, &args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains("HOST KEY CHANGED"), "{}", text(&out));
    }

    // An unknown host is refused with a hint, and recorded with --accept-new-host-keys.
    std::fs::write(&known, "").expect("empty known_hosts");
    let out = cli(&t, &["plan"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("unknown host key") && text(&out).contains("--accept-new-host-keys"),
        "{}",
        text(&out)
    );
    let out = cli(&t, &["plan", "--accept-new-host-keys"]);
    assert!(out.status.success(), "{}", text(&out));
    let learned = std::fs::read_to_string(&known).expect("known_hosts");
    let key = |s: &str| s.split_whitespace().nth(2).map(str::to_string);
    assert_eq!(
        learned.lines().filter_map(key).collect::<Vec<_>>(),
        original.lines().filter_map(key).collect::<Vec<_>>()
    );

    // apply does not wait on a prompt when stdin is not a terminal, and changes nothing.
    let out = cli(&t, &["apply"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("stdin is not a terminal"),
        "{}",
        text(&out)
    );
    let plan = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(
        plan.status.code(),
        Some(2),
        "apply without approval changed something:\n{}",
        text(&plan)
    );

    // An invalid spec: a located error, exit 1, nothing touched.
    let good = std::fs::read_to_string(&t.spec_path).expect("spec");
    std::fs::write(
        &t.spec_path,
        good.replace("cluster: applykeys", "cluster: Bad_Name"),
    )
    .expect("break spec");
    let out = cli(&t, &["apply", "--auto-approve"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("spec.yaml:2:10: cluster: invalid cluster name"),
        "{}",
        text(&out)
    );
    std::fs::write(&t.spec_path, &good).expect("restore spec");
    let plan = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(2), "{}", text(&plan));

    // ssh-agent authentication: no identity_file in the spec, the key held by an agent.
    let agent_dir = t.dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("agent dir");
    let sock = agent_dir.join("sock");
    let agent = std::process::Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(agent);
    let mut added = false;
    for _ in 0..50 {
        let ok = std::process::Command::new("ssh-add")
            .arg(t.dir.path().join(".lab/id_ed25519"))
            .env("SSH_AUTH_SOCK", &sock)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            added = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(added, "ssh-add failed");
    let agent_spec = t.dir.path().join("agent-spec.yaml");
    std::fs::write(
        &agent_spec,
        good.replace("identity_file: .lab/id_ed25519, ", ""),
    )
    .expect("spec without identity_file");
    let out = Command::cargo_bin("citus-reconcile")
        .expect("binary")
        .args(["plan", "--detailed-exitcode"])
        .arg(&agent_spec)
        .env("CR_LAB_SUPERUSER", "lab-superuser-pw")
        .env("CR_LAB_REPLICATION", "lab-replication-pw")
        .env("SSH_AUTH_SOCK", &sock)
        .timeout(Duration::from_secs(60))
        .output()
        .expect("plan runs");
    assert_eq!(
        out.status.code(),
        Some(2),
        "plan through ssh-agent: {}",
        text(&out)
    );
}

#[test]
fn apply_restarts_what_should_run_after_a_reboot() {
    if !lab_available("apply after a reboot") {
        return;
    }
    set_lab_secrets();
    let t = TestLab::up(&lab_spec(
        "applyboot",
        112,
        &[(0, 1), (1, 1)],
        1,
        "ha: { ttl: 10, loop_wait: 2, retry_timeout: 4 }\n",
    ));
    let apply = cli(&t, &["apply", "--auto-approve"]);
    assert!(apply.status.success(), "{}", text(&apply));
    // A power cut and a reboot: sshd comes back, nothing else.
    t.lab.crash("g1m0").expect("crash");
    t.lab.up().expect("reboot");
    let plan = cli(&t, &["plan"]);
    assert!(
        text(&plan).contains("start the agent (not running)"),
        "{}",
        text(&plan)
    );
    let apply = cli(&t, &["apply", "--auto-approve"]);
    assert!(apply.status.success(), "{}", text(&apply));
    let plan = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    // The worker's data survived the crash: same system identifier, no re-initialisation.
    let status = cli(&t, &["status"]);
    assert!(text(&status).contains("Leader"), "{}", text(&status));
}

/// A running `watch --json`: its events as they come, its stderr in a file.
struct Watch {
    child: std::process::Child,
    events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    stderr: std::path::PathBuf,
}

impl Watch {
    fn start(t: &TestLab, extra: &[&str]) -> Watch {
        use std::io::BufRead;
        let stderr = t.dir.path().join(format!("watch-{}.err", extra.join("")));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_citus-reconcile"))
            .args(["watch", "--json", "--interval", "1"])
            .args(extra)
            .arg(&t.spec_path)
            .env("CR_LAB_SUPERUSER", "lab-superuser-pw")
            .env("CR_LAB_REPLICATION", "lab-replication-pw")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("watch starts");
        let events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
        let stdout = child.stdout.take().expect("stdout");
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("watch printed a line that is not JSON ({e}): {line}")
                });
                assert_eq!(v["format_version"], 1, "{line}");
                if let Ok(mut s) = sink.lock() {
                    s.push(v);
                }
            }
        });
        Watch {
            child,
            events,
            stderr,
        }
    }

    fn all(&self) -> Vec<serde_json::Value> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The first event from index `from` on that `pred` accepts, and its index.
    fn wait(
        &self,
        what: &str,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (usize, serde_json::Value) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(found) = self
                .all()
                .into_iter()
                .enumerate()
                .skip(from)
                .find(|(_, e)| pred(e))
            {
                return found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "watch: no {what} within {timeout:?}; events:\n{}\nstderr:\n{}",
                self.all()
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; it must stop by itself, say so and exit 0.
    fn stop(mut self) {
        // SAFETY: kill(2) on the child this test started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "watch did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "watch exited with {status}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(self.all().iter().any(|e| e["event"] == "stopped"));
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drift_of(kind: &'static str, target: String) -> impl Fn(&serde_json::Value) -> bool {
    move |e| e["event"] == "drift" && e["kind"] == kind && e["target"] == target.as_str()
}

/// Scrape the watch's /metrics: the value of one sample (`name{labels}` as printed).
fn metric(port: u16, sample: &str) -> Option<String> {
    let (status, body) = common::http("GET", &format!("127.0.0.1:{port}"), "/metrics", None, "");
    (status == 200).then_some(())?;
    body.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')
            .map(str::to_string)
    })
}

#[test]
fn watch_reports_drift_once_and_repairs_it_only_when_asked() {
    if !common::citus_client::real_citus("watch") {
        return;
    }
    set_lab_secrets();
    let spec = lab_spec(
        "watching",
        150,
        &[(0, 1), (1, 2)],
        1,
        "ha: { ttl: 30, loop_wait: 1, retry_timeout: 3 }\n",
    );
    let t = TestLab::up(&spec);
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", text(&o));
    psql(
        &t,
        "g0m0",
        "CREATE TABLE w (id bigint PRIMARY KEY); SELECT create_distributed_table('w', 'id')",
    );
    let coord = common::citus_client::addresses(&t, 0);
    let writer = common::citus_client::Writer::start(&coord, "w", Duration::from_millis(20));
    common::citus_client::writes_resume(&writer, "the writer to start");
    let replica = common::members(&t, 1)
        .into_iter()
        .map(|(m, _, _)| m)
        .find(|m| common::leader(&t, 1).as_deref() != Some(m.as_str()))
        .expect("a replica in group 1");
    let host = |m: &str| format!("host {m}");

    // 1. Report only: each drift made by hand is reported once, and left alone.
    let port = 18150;
    let watch = Watch::start(&t, &["--listen", &format!("127.0.0.1:{port}")]);
    let (mut at, _) = watch.wait("in_sync", 0, Duration::from_secs(60), |e| {
        e["event"] == "in_sync"
    });
    let install = t.spec.host(&replica).expect("replica").install_dir.clone();
    psql(&t, &replica, "ALTER SYSTEM SET work_mem = '77MB'");
    at = watch
        .wait(
            "ALTER SYSTEM drift",
            at,
            Duration::from_secs(30),
            drift_of("alter_system", host(&replica)),
        )
        .0;
    // A pg_dist_node row deleted (before the authinfo edit, which would keep the agent from
    // adding it back): the coordinator's agent puts it back within a loop, so it
    // is frozen meanwhile (well inside its lease) for the drift to be there to see.
    common::signal_agent(&t, "g0m0", libc::SIGSTOP);
    psql(&t, "g0m0", "DELETE FROM pg_dist_node WHERE groupid = 1");
    let seen = watch.wait("pg_dist_node drift", at, Duration::from_secs(8), |e| {
        e["event"] == "drift" && (e["kind"] == "node_pending" || e["kind"] == "node")
    });
    common::signal_agent(&t, "g0m0", libc::SIGCONT);
    let row = seen.1.clone();
    at = watch
        .wait(
            "the row back (the agent's own repair)",
            seen.0,
            Duration::from_secs(30),
            move |e| e["event"] == "resolved" && e["summary"] == row["summary"],
        )
        .0;
    psql(
        &t,
        "g0m0",
        "UPDATE pg_dist_authinfo SET authinfo = 'password=edited' WHERE nodeid = 0",
    );
    at = watch
        .wait(
            "authinfo drift",
            at,
            Duration::from_secs(30),
            drift_of("authinfo", "group 0".into()),
        )
        .0;
    let config = format!("{install}/agent.yaml");
    let edited = std::fs::read_to_string(&config)
        .expect("agent config")
        .replace("shared_buffers: 16MB", "shared_buffers: 24MB");
    std::fs::write(&config, edited).expect("edit the agent config");
    at = watch
        .wait(
            "agent config drift",
            at,
            Duration::from_secs(30),
            drift_of("write_agent_config", host(&replica)),
        )
        .0;
    assert_eq!(
        metric(
            port,
            "citus_reconcile_drift_items{cluster=\"watching\",kind=\"alter_system\"}"
        )
        .as_deref(),
        Some("1"),
        "metrics"
    );
    assert_eq!(
        metric(port, "citus_reconcile_in_sync{cluster=\"watching\"}").as_deref(),
        Some("0")
    );
    // Several intervals later: nothing repaired, nothing reported twice.
    std::thread::sleep(Duration::from_secs(3));
    let events = watch.all();
    let drifts: Vec<String> = events
        .iter()
        .filter(|e| e["event"] == "drift")
        .map(|e| format!("{} {} {}", e["target"], e["kind"], e["summary"]))
        .collect();
    let unique: std::collections::BTreeSet<&String> = drifts.iter().collect();
    assert_eq!(
        unique.len(),
        drifts.len(),
        "a drift reported twice: {drifts:#?}"
    );
    assert!(
        !events[at..].iter().any(|e| e["event"] == "repair"),
        "report-only watch repaired something"
    );
    let auto_conf = "SELECT coalesce(string_agg(name || '=' || setting, ','), '') FROM pg_file_settings WHERE sourcefile LIKE '%/postgresql.auto.conf' AND name NOT LIKE 'ssl%'";
    assert_eq!(psql(&t, &replica, auto_conf), "work_mem=77MB");
    // Last, as it takes the replica's server down with it: an agent killed, supervisor and
    // all (a killed child alone is restarted by its supervisor).
    let supervisor: i32 = std::fs::read_to_string(format!("{install}/agent.pid"))
        .expect("agent pid file")
        .trim()
        .parse()
        .expect("a pid");
    // SAFETY: kill(2) on the agent the lab test started.
    unsafe {
        libc::kill(supervisor, libc::SIGKILL);
    }
    watch.wait(
        "agent drift",
        at,
        Duration::from_secs(30),
        drift_of("start_agent", host(&replica)),
    );
    watch.stop();

    // 2. --repair: all of it repaired, under the lock, and reported resolved.
    let watch = Watch::start(&t, &["--repair"]);
    let (mut at, _) = watch.wait("repair", 0, Duration::from_secs(60), |e| {
        e["event"] == "repair"
    });
    at = watch
        .wait("back in sync", at, Duration::from_secs(180), |e| {
            e["event"] == "in_sync"
        })
        .0;
    assert!(
        watch.all().iter().any(|e| e["event"] == "repaired"),
        "{:#?}",
        watch.all()
    );
    assert_eq!(
        psql(&t, &replica, auto_conf),
        "",
        "ALTER SYSTEM settings left"
    );
    assert_eq!(
        psql(
            &t,
            "g0m0",
            "SELECT authinfo FROM pg_dist_authinfo WHERE nodeid = 0"
        ),
        "password=lab-superuser-pw"
    );
    assert!(common::agent_pid(&t, &replica).is_some());
    assert_eq!(
        common::etcdctl(
            &t,
            &["get", &common::apply_lock_key(&t), "--print-value-only"]
        )
        .as_deref(),
        Some(""),
        "the apply lock is held outside of a repair"
    );
    common::citus_client::writes_resume(&writer, "writes after the repair");

    // 3. An edit of the spec is planned at once (and repaired: a reload, no restart).
    let before = std::fs::read_to_string(&t.spec_path).expect("spec");
    let edited = before.replace(
        "shared_buffers: 16MB }",
        "shared_buffers: 16MB, work_mem: 5MB }",
    );
    assert_ne!(edited, before);
    let edit_at = std::time::Instant::now();
    std::fs::write(&t.spec_path, &edited).expect("edit the spec");
    at = watch
        .wait("the edit planned", at, Duration::from_secs(30), |e| {
            e["event"] == "drift" && e["kind"] == "reload_agent"
        })
        .0;
    eprintln!(
        "watch: spec edit planned {:.2}s after the write",
        edit_at.elapsed().as_secs_f64()
    );
    at = watch
        .wait(
            "in sync after the edit",
            at,
            Duration::from_secs(120),
            |e| e["event"] == "in_sync",
        )
        .0;
    for m in ["g0m0", "g1m0", "g1m1"] {
        assert_eq!(psql(&t, m, "SHOW work_mem"), "5MB", "{m}");
    }

    // 4. An invalid edit: reported with its position; the last valid spec stays in force.
    std::fs::write(
        &t.spec_path,
        edited.replace("cluster: watching", "cluster: [watching"),
    )
    .expect("break the spec");
    let (i, bad) = watch.wait("the invalid edit", at, Duration::from_secs(30), |e| {
        e["event"] == "spec_invalid"
    });
    assert!(bad["diagnostics"][0]["line"].as_u64().is_some(), "{bad}");
    std::fs::write(&t.spec_path, &edited).expect("repair the spec");
    at = i;

    // 5. etcd out of reach: reported, retried with backoff, and gone when etcd is back.
    t.lab.partition("etcd2", false).expect("partition etcd");
    at = watch
        .wait("etcd error", at, Duration::from_secs(60), |e| {
            e["event"] == "drift"
                && e["kind"] == "error"
                && e["summary"].as_str().is_some_and(|s| s.contains("etcd"))
        })
        .0;
    std::thread::sleep(Duration::from_secs(4));
    t.lab.heal("etcd2").expect("heal etcd");
    watch.wait("etcd back", at, Duration::from_secs(120), |e| {
        e["event"] == "resolved" && e["kind"] == "error"
    });
    watch.stop();

    let log = writer.stop();
    let summary = common::citus_client::summarize(&log);
    eprintln!("writes through the coordinator during the watch test: {summary}");
    common::citus_client::assert_nothing_acknowledged_lost(&coord, "w", &log);
}

/// The shell lines of a GitHub Actions job, in order: its `run:` steps but the installs.
fn github_lines(workflow: &serde_yaml::Value, job: &str) -> Vec<String> {
    workflow["jobs"][job]["steps"]
        .as_sequence()
        .unwrap_or_else(|| panic!("github-actions.yml: no job {job}"))
        .iter()
        .filter(|s| !s["name"].as_str().is_some_and(|n| n.starts_with("Install")))
        .filter_map(|s| s["run"].as_str())
        .flat_map(|r| {
            r.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
        })
        .collect()
}

/// The script lines of a GitLab CI job, in order.
fn gitlab_lines(pipeline: &serde_yaml::Value, job: &str) -> Vec<String> {
    pipeline[job]["script"]
        .as_sequence()
        .unwrap_or_else(|| panic!("gitlab-ci.yml: no job {job}"))
        .iter()
        .filter_map(|l| l.as_str().map(String::from))
        .collect()
}

#[test]
fn the_ci_examples_deploy_a_lab_from_a_merge_request_to_main() {
    let read = |f: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(f).expect("example")).expect("YAML")
    };
    let (github, gitlab) = (
        read("examples/ci/github-actions.yml"),
        read("examples/ci/gitlab-ci.yml"),
    );
    let jobs = ["validate", "plan", "apply"];
    for job in jobs {
        assert_eq!(
            github_lines(&github, job),
            gitlab_lines(&gitlab, job),
            "the two pipelines run different commands in {job}"
        );
        assert!(
            github_lines(&github, job)
                .iter()
                .any(|l| l.starts_with("citus-reconcile ")),
            "{job}"
        );
    }
    assert_eq!(github["env"]["SPEC"], gitlab["variables"]["SPEC"]);
    let spec_path = github["env"]["SPEC"].as_str().expect("SPEC").to_string();
    if !lab_available("ci examples") {
        return;
    }
    set_lab_secrets();
    let t = TestLab::up(&lab_spec("cipipe", 151, &[(0, 1), (1, 1)], 1, ""));
    // The repository a team would have: the spec as examples/ci/cluster.yaml writes it, with
    // the lab's hosts.
    let repo = t.dir.path().join("repo");
    let home = t.dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let spec = std::fs::read_to_string(&t.spec_path)
        .expect("lab spec")
        .replace(
            "ssh: { identity_file: .lab/id_ed25519, known_hosts: .lab/known_hosts }",
            "ssh: { identity_file: ~/.ssh/citus_deploy, known_hosts: ~/.ssh/citus_known_hosts }",
        )
        .replace("CR_LAB_SUPERUSER", "CITUS_SUPERUSER_PASSWORD")
        .replace("CR_LAB_REPLICATION", "CITUS_REPLICATION_PASSWORD");
    assert!(spec.contains("~/.ssh/citus_deploy"), "{spec}");
    let spec_file = repo.join(&spec_path);
    std::fs::create_dir_all(spec_file.parent().expect("folder")).expect("spec folder");
    std::fs::write(&spec_file, &spec).expect("spec");
    let lab_file = |f: &str| {
        std::fs::read_to_string(t.dir.path().join(".lab").join(f)).expect("lab credentials")
    };
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_citus-reconcile"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // One pipeline run: the jobs' lines in order, as the CI's shell would run them, with the
    // secrets in the environment as the CI's secret store gives them.
    let pipeline = |jobs: &[&str]| {
        for job in jobs {
            for line in github_lines(&github, job) {
                let o = std::process::Command::new("bash")
                    .args(["-eo", "pipefail", "-c", &line])
                    .current_dir(&repo)
                    .env_clear()
                    .env("PATH", &path)
                    .env("HOME", &home)
                    .env("SPEC", &spec_path)
                    .env("CI", "true")
                    .env("CITUS_SSH_KEY", lab_file("id_ed25519").trim_end())
                    .env("CITUS_KNOWN_HOSTS", lab_file("known_hosts").trim_end())
                    .env("CITUS_SUPERUSER_PASSWORD", "lab-superuser-pw")
                    .env("CITUS_REPLICATION_PASSWORD", "lab-replication-pw")
                    .output()
                    .expect("bash runs");
                assert!(o.status.success(), "{job}: `{line}` failed:\n{}", text(&o));
            }
        }
    };
    // A merge request: validated and planned; the plan artifact holds no secret.
    pipeline(&["validate", "plan"]);
    let saved = std::fs::read_to_string(repo.join("plan.json")).expect("plan artifact");
    assert!(saved.contains("start the agent"), "{saved}");
    for secret in ["lab-superuser-pw", "lab-replication-pw", "PRIVATE KEY"] {
        assert!(!saved.contains(secret), "the plan artifact holds {secret}");
    }
    // Merged: planned again and that plan applied; nothing is left to do afterwards.
    pipeline(&jobs);
    let o = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The next change through the same pipeline: a reload, applied.
    std::fs::write(
        &spec_file,
        spec.replace(
            "shared_buffers: 16MB }",
            "shared_buffers: 16MB, work_mem: 6MB }",
        ),
    )
    .expect("edit");
    pipeline(&jobs);
    assert_eq!(psql(&t, "g1m0", "SHOW work_mem"), "6MB");

    // `apply --json`: JSON lines only on stdout, from the plan to the outcome.
    let lines = |o: &Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))
            })
            .collect()
    };
    let o = cli(&t, &["apply", "--json"]);
    assert!(!o.status.success());
    let events = lines(&o);
    assert_eq!(
        events.last().expect("an event")["event"],
        "failed",
        "{events:?}"
    );
    // The lab's own spec has no work_mem: a reload back to the default.
    let o = cli(&t, &["apply", "--json", "--auto-approve"]);
    assert!(o.status.success(), "{}", text(&o));
    let events = lines(&o);
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names.first(), Some(&"plan"), "{names:?}");
    assert_eq!(names.last(), Some(&"applied"), "{names:?}");
    assert!(names.contains(&"step"), "{names:?}");
    assert!(
        events
            .iter()
            .all(|e| e["format_version"] == 1 && e["time"].is_string())
    );
    assert_eq!(
        events.last().expect("applied")["summary"]["change"],
        6,
        "{events:?}"
    );
    assert_eq!(psql(&t, "g1m0", "SHOW work_mem"), "4MB");
}

#[test]
fn an_etcd_with_tls_client_certificates_and_authentication() {
    if !lab_available("etcd TLS and authentication") {
        return;
    }
    set_lab_secrets();
    // etcd over TLS, checking client certificates (the lab makes a CA and writes the files
    // the spec names), and etcd's own users on top.
    const TLS: &str = "  tls: { ca: { file: .lab/etcd-ca.pem }, cert: { file: .lab/etcd-client.pem }, key: { file: .lab/etcd-client.key } }\n";
    let spec = lab_spec("etcdauth", 152, &[(0, 1), (1, 1)], 1, "")
        .replacen(
            "]\nssh:",
            &format!(
                "]\n  auth: {{ username: citus, password: {{ env: CR_LAB_ETCD }} }}\n{TLS}ssh:"
            ),
            1,
        )
        .replace("http://10.213.152.", "https://10.213.152.");
    assert!(spec.contains("auth: { username: citus"), "{spec}");
    // The REST API over TLS too, its read endpoints behind the credentials: a certificate
    // for both hosts from a CA of the test's own.
    let api_pki_dir = tempfile::tempdir().expect("temp dir");
    let api_pki = citus_reconcile::lab::pki::Pki::ensure(api_pki_dir.path(), "api").expect("CA");
    let api_cert = api_pki
        .server(
            "api",
            &[
                "10.213.152.10".parse().expect("ip"),
                "10.213.152.20".parse().expect("ip"),
            ],
        )
        .expect("API certificate");
    let spec = spec.replacen(
        "agent: { service: process, ",
        &format!(
            "agent: {{ service: process, api_auth_reads: true, api_tls: {{ cert: {{ file: {} }}, key: {{ file: {} }} }}, ",
            api_cert.cert.display(),
            api_cert.key.display()
        ),
        1,
    );
    assert!(spec.contains("api_tls"), "{spec}");
    use std::os::unix::fs::PermissionsExt;
    let t = TestLab::up(&spec);
    let key = t.dir.path().join(".lab/etcd-client.key");
    assert_eq!(
        std::fs::metadata(&key)
            .map(|m| m.permissions().mode() & 0o777)
            .ok(),
        Some(0o600),
        "the client key the lab wrote"
    );
    // etcd's authentication on, with a user that may use the cluster's namespace only.
    for args in [
        &["user", "add", "root", "--new-user-password=lab-etcd-root"][..],
        &["user", "add", "citus", "--new-user-password=lab-etcd-pw"],
        &["role", "add", "citus"],
        &[
            "role",
            "grant-permission",
            "citus",
            "readwrite",
            "--prefix=true",
            "/service/",
        ],
        &["user", "grant-role", "citus", "citus"],
        &["auth", "enable"],
    ] {
        let o = common::etcdctl_output(&t, args);
        assert!(o.status.success(), "etcdctl {args:?}: {}", text(&o));
    }
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(psql(&t, "g1m0", "SELECT 1"), "1");
    let o = cli(&t, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    // Commands that talk to etcd only read etcd's password, not the others.
    for cmd in ["pause", "resume"] {
        let o = Command::cargo_bin("citus-reconcile")
            .expect("binary")
            .arg(cmd)
            .arg(&t.spec_path)
            .env_remove("CR_LAB_SUPERUSER")
            .env_remove("CR_LAB_REPLICATION")
            .timeout(Duration::from_secs(60))
            .output()
            .expect("runs");
        assert!(o.status.success(), "{cmd}: {}", text(&o));
    }
    // The agents hold their keys through etcd's authentication.
    let o = common::etcdctl_output(
        &t,
        &[
            "--user",
            "root:lab-etcd-root",
            "get",
            "/service/etcdauth/1/leader",
            "--print-value-only",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "g1m0",
        "{}",
        text(&o)
    );
    // The REST API: health checks over TLS without credentials, the topology only with
    // them, and no plain text.
    let ca = std::fs::read_to_string(api_pki.ca()).expect("CA");
    let api = "10.213.152.20:8008";
    let https = |path: &str, auth| common::https("GET", api, path, auth, "", &ca);
    assert_eq!(https("/primary", None).0, 200);
    assert_eq!(https("/cluster", None).0, 401);
    let (code, body) = https("/cluster", Some(("admin", "lab-superuser-pw")));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("g1m0"), "{body}");
    assert_eq!(https("/metrics", None).0, 401);
    assert_eq!(common::http("GET", api, "/primary", None, "").0, 0);
    // A flood of requests and idle connections on the leader's API leaves its lease alone.
    let leader_before = common::wait_for("a worker leader", Duration::from_secs(30), || {
        common::leader(&t, 1)
    });
    let flood_until = std::time::Instant::now() + Duration::from_secs(8);
    let idle: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(api).ok())
        .collect();
    let served: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0;
                    while std::time::Instant::now() < flood_until {
                        if https("/primary", None).0 == 200 {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    // More idle connections than the API admits (256): the ones beyond wait for a slot that
    // a silent connection gives back after 3 s. How many checks fit into the 8 s depends on
    // the machine's load (reported, not asserted); that one is answered while the idle
    // connections still stand is not.
    let answered_after = common::wait_for(
        "a health check answered beside the idle connections",
        Duration::from_secs(30),
        || (https("/primary", None).0 == 200).then_some(flood_until.elapsed()),
    );
    drop(idle);
    eprintln!(
        "REST API flood: {served} health checks answered in 8 s beside 300 idle connections; one more {:.1} s after",
        answered_after.as_secs_f64()
    );
    common::assert_still_leader(&t, 1, &leader_before, "leadership moved during the flood");
    let log = std::fs::read_to_string(format!(
        "{}/agent.log",
        t.spec.host("g1m0").expect("g1m0").install_dir
    ))
    .unwrap_or_default();
    assert!(
        !log.contains("lease can no longer be trusted") && !log.contains("the etcd lease expired"),
        "the leader lost its lease during the flood:\n{log}"
    );
    // The agents' configuration carries the TLS material, 0600 like the rest of it.
    let agent_config = format!(
        "{}/agent.yaml",
        t.spec.host("g1m0").expect("g1m0").install_dir
    );
    let cfg = std::fs::read_to_string(&agent_config).expect("agent config");
    assert!(cfg.contains("BEGIN CERTIFICATE") && cfg.contains("PRIVATE KEY"));
    assert_eq!(
        std::fs::metadata(&agent_config)
            .map(|m| m.permissions().mode() & 0o777)
            .ok(),
        Some(0o600)
    );
    // Without the user, with a wrong password, without a client certificate, trusting
    // another CA, or in plain text: a clear error, nothing touched.
    let anonymous = spec.replace(
        "  auth: { username: citus, password: { env: CR_LAB_ETCD } }\n",
        "",
    );
    let another_ca = std::fs::canonicalize("tests/specs/valid/etcd-ca.pem").expect("a test CA");
    let wrong = t.dir.path().join("wrong.yaml");
    for (text_of, what, expect) in [
        (anonymous, "no user", "permission denied"),
        (
            spec.replace("CR_LAB_ETCD", "CR_LAB_REPLICATION"),
            "a wrong password",
            "authentication failed",
        ),
        (
            spec.replace(TLS, "  tls: { ca: { file: .lab/etcd-ca.pem } }\n"),
            "no client certificate",
            "etcd requires a client certificate",
        ),
        (
            spec.replace(".lab/etcd-ca.pem", &another_ca.display().to_string()),
            "another CA",
            "not signed by the CA in etcd.tls.ca",
        ),
        (
            spec.replace(TLS, "").replace("https://", "http://"),
            "plain text to a TLS etcd",
            "if it speaks TLS",
        ),
    ] {
        std::fs::write(&wrong, &text_of).expect("spec");
        let o = Command::cargo_bin("citus-reconcile")
            .expect("binary")
            .args(["plan"])
            .arg(&wrong)
            .timeout(Duration::from_secs(120))
            .output()
            .expect("runs");
        let out = text(&o);
        eprintln!("{what}: {}", out.trim());
        assert!(!o.status.success(), "{what}: {out}");
        assert!(out.contains(expect), "{what}: {out}");
        assert!(
            !out.contains("lab-etcd-pw") && !out.contains("lab-replication-pw"),
            "{what}: a secret in the output: {out}"
        );
    }
}
