//! High availability under real faults, in the lab. Every test runs a split-brain prober (a
//! writer per member) and fails if two members of a group ever accepted writes at once.
//! Waits are liveness guards with generous limits; no test asserts on timing.

mod common;

use std::time::Duration;

use common::prober::{self, Prober};
use common::{
    TestLab, agent_pid, cli, cluster, etcd_get, etcdctl, lab_available, lab_spec, leader, members,
    output_text, psql, status, sync_key, try_psql, wait_for,
};

/// Short leases keep the tests quick: ttl 5 s ≥ loop_wait 1 + 2 × retry_timeout 2.
const FAST_HA: &str = "ha: { ttl: 5, loop_wait: 1, retry_timeout: 2 }\n";

fn worker_cluster(name: &str, subnet: u8) -> TestLab {
    cluster(&lab_spec(name, subnet, &[(0, 1), (1, 3)], 3, FAST_HA))
}

fn probe_group(t: &TestLab, group: u32) -> Prober {
    Prober::start(&members(t, group), Duration::from_millis(20))
}

fn member_state(t: &TestLab, member: &str) -> (String, String) {
    let s = status(t);
    let m = s["members"]
        .as_array()
        .and_then(|m| m.iter().find(|x| x["member"] == member).cloned())
        .unwrap_or_default();
    (
        m["role"].as_str().unwrap_or("").to_string(),
        m["state"].as_str().unwrap_or("").to_string(),
    )
}

/// `Some(())` once `member` is a replica that streams (for `wait_for`).
fn streaming(t: &TestLab, member: &str) -> Option<()> {
    (member_state(t, member) == ("Replica".to_string(), "streaming".to_string())).then_some(())
}

fn coordinator_row(t: &TestLab, group: u32) -> Option<String> {
    let s = status(t);
    s["pg_dist_node"]
        .as_array()?
        .iter()
        .find(|r| r["groupid"] == group && r["noderole"] == "primary")
        .and_then(|r| r["nodename"].as_str().map(str::to_string))
}

/// Every write the prober saw acknowledged, on any member, is on `primary` now. Returns how
/// many were checked. (Holds whenever the old primary's WAL reached the new one: a restart in
/// place, a switchover, synchronous mode. Not after an asynchronous failover.)
fn assert_nothing_acknowledged_lost(t: &TestLab, primary: &str, log: &[prober::Attempt]) -> usize {
    let acked = prober::acknowledged(log);
    // The prober's clients give up after 1.5 s; a host busy with another test's checkpoints
    // can take longer to accept one connection. Waiting for it is a liveness guard: the
    // check below is what matters.
    let mut c = wait_for(
        "a connection to the primary",
        Duration::from_secs(30),
        || prober::postgres_sync::Client::connect(&address(t, primary), 5432),
    );
    let present: std::collections::BTreeSet<i64> = c
        .query_ids("SELECT id FROM probe")
        .expect("read probe")
        .into_iter()
        .collect();
    let lost: Vec<&i64> = acked.iter().filter(|id| !present.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost (of {}): {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    acked.len()
}

fn address(t: &TestLab, member: &str) -> String {
    t.spec
        .host(member)
        .map(|h| h.address.clone())
        .unwrap_or_default()
}

#[test]
fn prober_detects_overlap_only() {
    use prober::Attempt;
    let at = |m: &str, s: u64, ok: bool| Attempt {
        member: m.into(),
        started: Duration::from_millis(s),
        ended: Duration::from_millis(s + 5),
        ok,
        id: 0,
    };
    prober::assert_no_split_brain(&[
        at("a", 0, true),
        at("a", 10, true),
        at("a", 20, false),
        at("b", 30, true),
        at("b", 40, true),
    ]);
    let r = std::panic::catch_unwind(|| {
        prober::assert_no_split_brain(&[at("a", 0, true), at("b", 10, true), at("a", 20, true)])
    });
    assert!(r.is_err());
}

#[test]
fn host_crash_fails_over_without_split_brain_and_citus_follows() {
    if !lab_available("host crash failover") {
        return;
    }
    // A longer ttl than the other tests: the dead leader's key must outlive the replicas'
    // patience with a silent upstream (5 s), which is where a false "forked history" showed.
    let t = cluster(&lab_spec(
        "hacrash",
        130,
        &[(0, 1), (1, 3)],
        3,
        "ha: { ttl: 15, loop_wait: 2, retry_timeout: 4 }\n",
    ));
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));
    t.lab.crash(&old).expect("crash the leader's host");
    let new = wait_for("a new worker leader", Duration::from_secs(60), || {
        leader(&t, 1).filter(|l| *l != old)
    });
    // The coordinator's pg_dist_node follows the new leader.
    let new_addr = address(&t, &new);
    wait_for("pg_dist_node to follow", Duration::from_secs(30), || {
        coordinator_row(&t, 1).filter(|h| *h == new_addr)
    });
    std::thread::sleep(Duration::from_secs(2));
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    assert!(
        log.iter().any(|a| a.ok && a.member == new),
        "the new leader never accepted a write"
    );

    // The crashed host reboots; apply restarts its agent and it rejoins as a replica.
    t.lab.up().expect("reboot");
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(
        member_state(&t, &old),
        ("Replica".to_string(), "streaming".to_string())
    );

    // A second crash, of the new leader, right after the rejoin: the replicas lose their
    // upstream while their timeline still reads as the old one. They must neither take that
    // for a forked history nor give up their data because the leader is unreachable.
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));
    t.lab.crash(&new).expect("crash the second leader's host");
    let third = wait_for("a third worker leader", Duration::from_secs(60), || {
        leader(&t, 1).filter(|l| *l != new)
    });
    wait_for(
        "writes on the third leader",
        Duration::from_secs(30),
        || {
            p.log
                .lock()
                .ok()?
                .iter()
                .any(|a| a.ok && a.member == third)
                .then_some(())
        },
    );
    prober::assert_no_split_brain(&p.stop());
    let set_aside: Vec<String> = members(&t, 1)
        .iter()
        .flat_map(|(m, _, _)| set_aside_dirs(&t, m))
        .collect();
    assert!(set_aside.is_empty(), "data set aside: {set_aside:?}");
}

/// The data directories set aside beside a member's (`{data_dir}.{why}-{time}`).
fn set_aside_dirs(t: &TestLab, member: &str) -> Vec<String> {
    let Some(d) = t.spec.host(member).map(|h| h.data_dir.clone()) else {
        return Vec::new();
    };
    let dir = std::path::Path::new(&d).parent().map(|p| p.to_path_buf());
    let name = format!("{}.", d.rsplit('/').next().unwrap_or_default());
    dir.and_then(|p| std::fs::read_dir(p).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.starts_with(&name))
        .collect()
}

/// The copy of `member`'s data directory set aside for `why` (`start-failed`, …), as a full
/// path; fails with the agents' logs when there is none.
fn set_aside_copy(t: &TestLab, member: &str, why: &str) -> std::path::PathBuf {
    let aside = set_aside_dirs(t, member);
    let Some(copy) = aside.iter().find(|d| d.contains(&format!(".{why}-"))) else {
        panic!(
            "{member} not set aside as {why}: {aside:?}\n{}",
            common::agent_logs(t, 40)
        )
    };
    let data_dir = t
        .spec
        .host(member)
        .map(|h| h.data_dir.clone())
        .unwrap_or_default();
    std::path::Path::new(&data_dir)
        .parent()
        .map(|p| p.join(copy))
        .unwrap_or_default()
}

#[test]
fn postgres_crash_restarts_in_place_under_the_same_leader() {
    if !lab_available("postgres crash") {
        return;
    }
    let t = worker_cluster("hapgcrash", 131);
    let l = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));
    common::kill_postmaster(&t, &l);
    let crashed_at = p.t0.elapsed();
    wait_for(
        "writes to resume on the same leader",
        Duration::from_secs(30),
        || {
            let log = p.log.lock().ok()?;
            log.iter()
                .any(|a| a.ok && a.member == l && a.started > crashed_at)
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    common::assert_still_leader(&t, 1, &l, "leadership moved although the agent was alive");
    assert_nothing_acknowledged_lost(&t, &l, &log);
}

#[test]
fn etcd_partition_demotes_the_primary_then_it_rejoins() {
    if !lab_available("etcd partition") {
        return;
    }
    let t = worker_cluster("hapart", 132);
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let data_dir = t
        .spec
        .host(&old)
        .map(|h| h.data_dir.clone())
        .unwrap_or_default();
    let inode =
        |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("data dir"));
    let before = inode(&data_dir);
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));
    t.lab
        .partition(&old, true)
        .expect("cut the leader off etcd");
    let new = wait_for("a new worker leader", Duration::from_secs(60), || {
        leader(&t, 1).filter(|l| *l != old)
    });
    std::thread::sleep(Duration::from_secs(2));
    t.lab.heal(&old).expect("heal");
    wait_for(
        "the old primary to rejoin as a streaming replica",
        Duration::from_secs(90),
        || streaming(&t, &old),
    );
    let log = p.stop();
    // The cut-off primary must have stopped accepting writes before the new one started.
    prober::assert_no_split_brain(&log);
    assert!(log.iter().any(|a| a.ok && a.member == new));
    assert_eq!(
        inode(&data_dir),
        before,
        "the old primary was re-cloned instead of rewound"
    );
}

#[test]
fn losing_one_etcd_member_of_three_is_no_disruption() {
    if !lab_available("etcd member loss") {
        return;
    }
    let t = worker_cluster("haetcd", 133);
    let l = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));
    // Take out the etcd raft leader: the harshest member to lose.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &t.spec.etcd.endpoints.join(","),
            "endpoint",
            "status",
            "-w",
            "json",
        ])
        .output()
        .expect("etcdctl");
    let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let raft_leader = statuses.as_array().and_then(|a| {
        a.iter()
            .find(|s| s["Status"]["header"]["member_id"] == s["Status"]["leader"])
            .and_then(|s| s["Endpoint"].as_str().map(str::to_string))
    });
    let victim = raft_leader
        .as_deref()
        .and_then(|e| e.split("//").nth(1))
        .and_then(|hp| hp.split(':').next())
        .unwrap_or("10.213.133.2")
        .to_string();
    t.lab.crash(&victim).expect("crash an etcd member");
    std::thread::sleep(Duration::from_secs(12));
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    common::assert_still_leader(
        &t,
        1,
        &l,
        "leadership changed after losing one etcd member of three",
    );
    assert!(
        log.iter().filter(|a| a.ok && a.member == l).count() > 100,
        "writes stopped"
    );
    eprintln!(
        "longest write gap while losing the etcd raft leader: {:?}",
        prober::longest_gap(&log)
    );
}

#[test]
fn switchover_under_write_load_then_back_through_the_rest_api() {
    if !lab_available("switchover") {
        return;
    }
    let t = worker_cluster("haswitch", 134);
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let candidate = members(&t, 1)
        .into_iter()
        .map(|m| m.0)
        .find(|m| *m != old)
        .expect("a replica");
    let data_dir = t
        .spec
        .host(&old)
        .map(|h| h.data_dir.clone())
        .unwrap_or_default();
    let inode =
        |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("data dir"));
    let before = inode(&data_dir);
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));

    let o = cli(
        &t,
        &[
            "switchover",
            "--group",
            "1",
            "--candidate",
            &candidate,
            "--force",
        ],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(leader(&t, 1).as_deref(), Some(candidate.as_str()));
    let new_addr = address(&t, &candidate);
    wait_for("pg_dist_node to follow", Duration::from_secs(30), || {
        coordinator_row(&t, 1).filter(|h| *h == new_addr)
    });
    // The old primary follows the new one without a rebuild.
    wait_for(
        "the old primary to stream from the new one",
        Duration::from_secs(60),
        || streaming(&t, &old),
    );
    assert_eq!(inode(&data_dir), before, "the old primary was re-cloned");

    // Back, through the REST API: refused without credentials, done with them.
    let api = format!("{}:8008", address(&t, &candidate));
    let body = format!(r#"{{"leader": "{candidate}", "candidate": "{old}"}}"#);
    let (code, _) = common::http("POST", &api, "/switchover", None, &body);
    assert_eq!(code, 401);
    let (code, _) = common::http("POST", &api, "/switchover", Some(("admin", "wrong")), &body);
    assert_eq!(code, 401);
    let (code, text) = common::http(
        "POST",
        &api,
        "/switchover",
        Some(("admin", "lab-superuser-pw")),
        &body,
    );
    assert_eq!(code, 200, "{text}");
    assert_eq!(leader(&t, 1).as_deref(), Some(old.as_str()));
    std::thread::sleep(Duration::from_secs(1));
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    // A switchover hands over every byte of WAL: nothing acknowledged is lost, even without
    // synchronous replication.
    let acked = assert_nothing_acknowledged_lost(&t, &old, &log);
    eprintln!(
        "two switchovers: {acked} acknowledged writes, none lost; longest gap {:?}",
        prober::longest_gap(&log)
    );
}

#[test]
fn manual_failover_promotes_the_chosen_member_of_a_leaderless_group() {
    if !lab_available("manual failover") {
        return;
    }
    let t = worker_cluster("hafail", 135);
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    // Choose the replica an automatic election would not (it prefers the smaller name on a tie).
    let mut replicas: Vec<String> = members(&t, 1)
        .into_iter()
        .map(|m| m.0)
        .filter(|m| *m != old)
        .collect();
    replicas.sort();
    let chosen = replicas.last().cloned().expect("a replica");
    // Timelines up to 5 are taken (as if promotions elsewhere had used them): the promotion
    // must reserve 6 and PostgreSQL must pick exactly that (placeholder history files).
    let key = format!(
        "{}/{}/1/max_timeline",
        t.spec.etcd.namespace.trim_end_matches('/'),
        t.spec.cluster
    );
    assert!(
        etcdctl(&t, &["put", &key, "5"]).is_some(),
        "set max_timeline"
    );
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));
    t.lab.crash(&old).expect("crash the leader");
    let o = cli(
        &t,
        &[
            "failover",
            "--group",
            "1",
            "--candidate",
            &chosen,
            "--force",
        ],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(leader(&t, 1).as_deref(), Some(chosen.as_str()));
    assert_eq!(etcd_get(&t, "1/max_timeline").as_deref(), Some("6"));
    let tli = psql(
        &t,
        &chosen,
        "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
    );
    assert_eq!(tli.trim(), "00000006", "the timeline the promotion picked");
    // The other replica follows onto it.
    let other = replicas.first().cloned().expect("another replica");
    wait_for(
        "the other replica to stream on timeline 6",
        Duration::from_secs(60),
        || {
            // It restarts to follow the new leader: "shutting down" is a moment of that.
            let r = try_psql(
                &t,
                &other,
                "SELECT received_tli FROM pg_stat_wal_receiver WHERE status = 'streaming'",
            )
            .ok()?;
            (r.trim() == "6").then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    prober::assert_no_split_brain(&p.stop());
}

#[test]
fn coordinator_failover_moves_its_own_pg_dist_node_row() {
    if !lab_available("coordinator failover") {
        return;
    }
    let t = cluster(&lab_spec("hacoord", 140, &[(0, 2), (1, 1)], 3, FAST_HA));
    let old = wait_for("a coordinator leader", Duration::from_secs(30), || {
        leader(&t, 0)
    });
    assert_eq!(coordinator_row(&t, 0), Some(address(&t, &old)));
    let p = probe_group(&t, 0);
    std::thread::sleep(Duration::from_secs(1));
    t.lab
        .crash(&old)
        .expect("crash the coordinator leader's host");
    let new = wait_for("a new coordinator leader", Duration::from_secs(60), || {
        leader(&t, 0).filter(|l| *l != old)
    });
    // The new coordinator primary's own row (replicated from the old one) names it, and the
    // worker's row is untouched.
    let new_addr = address(&t, &new);
    wait_for(
        "the coordinator row to follow",
        Duration::from_secs(30),
        || coordinator_row(&t, 0).filter(|h| *h == new_addr),
    );
    let worker = leader(&t, 1).expect("worker leader");
    assert_eq!(coordinator_row(&t, 1), Some(address(&t, &worker)));
    prober::assert_no_split_brain(&p.stop());
}

#[test]
fn haproxy_checked_like_patroni_follows_switchover_and_crash() {
    if !lab_available("haproxy") || !std::path::Path::new("/usr/sbin/haproxy").exists() {
        return;
    }
    let t = worker_cluster("hahap", 136);
    let l = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let port = common::pg::free_port();
    let stats = t.dir.path().join("haproxy.sock");
    let servers: String = members(&t, 1)
        .iter()
        .map(|(n, a, p)| format!("    server {n} {a}:{p} check port 8008\n"))
        .collect();
    let cfg = format!(
        "global\n    stats socket {}\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30m\n    timeout server 30m\n\
         listen primary\n    bind 127.0.0.1:{port}\n    option httpchk OPTIONS /primary\n    http-check expect status 200\n\
         \x20   default-server inter 200ms fall 2 rise 1 on-marked-down shutdown-sessions\n{servers}",
        stats.display()
    );
    let cfg_path = t.dir.path().join("haproxy.cfg");
    std::fs::write(&cfg_path, cfg).expect("haproxy.cfg");
    let mut haproxy = std::process::Command::new("/usr/sbin/haproxy")
        .arg("-f")
        .arg(&cfg_path)
        .arg("-db")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut haproxy);
    let p = probe_group(&t, 1);
    let through = vec![("haproxy".to_string(), "127.0.0.1".to_string(), port)];
    let client = Prober::start(&through, Duration::from_millis(10));
    let up_server = || {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo 'show servers state primary' | socat - UNIX-CONNECT:{} 2>/dev/null || true",
                stats.display()
            ))
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // Fields: be_id be_name srv_id srv_name srv_addr srv_op_state (2 = running) …
        let up: Vec<String> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 5 && f[5] == "2").then(|| f[3].to_string())
            })
            .collect();
        (up.len() == 1).then(|| up[0].clone())
    };
    let socat = std::path::Path::new("/usr/bin/socat").exists();
    wait_for("writes through haproxy", Duration::from_secs(30), || {
        client.log.lock().ok()?.iter().any(|a| a.ok).then_some(())
    });
    if socat {
        assert_eq!(
            wait_for(
                "haproxy to see one primary",
                Duration::from_secs(10),
                up_server
            ),
            l
        );
    }
    // A switchover, then a crash of the new primary; the client keeps writing through haproxy.
    let other = members(&t, 1)
        .into_iter()
        .map(|m| m.0)
        .find(|m| *m != l)
        .expect("replica");
    let o = cli(
        &t,
        &[
            "switchover",
            "--group",
            "1",
            "--candidate",
            &other,
            "--force",
        ],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    let mark = client.t0.elapsed();
    wait_for(
        "writes through haproxy after the switchover",
        Duration::from_secs(30),
        || {
            client
                .log
                .lock()
                .ok()?
                .iter()
                .any(|a| a.ok && a.started > mark)
                .then_some(())
        },
    );
    t.lab.crash(&other).expect("crash the new primary");
    let third = wait_for("a leader after the crash", Duration::from_secs(60), || {
        leader(&t, 1).filter(|x| *x != other)
    });
    let mark = client.t0.elapsed();
    wait_for(
        "writes through haproxy after the crash",
        Duration::from_secs(30),
        || {
            client
                .log
                .lock()
                .ok()?
                .iter()
                .any(|a| a.ok && a.started > mark)
                .then_some(())
        },
    );
    if socat {
        assert_eq!(
            wait_for(
                "haproxy's view to match status",
                Duration::from_secs(10),
                up_server
            ),
            third
        );
    } else {
        eprintln!("socat not installed: HAProxy's server states not compared");
    }
    let through_log = client.stop();
    prober::assert_no_split_brain(&p.stop());
    eprintln!(
        "client through haproxy: longest gap {:?}",
        prober::longest_gap(&through_log)
    );
}

#[test]
fn synchronous_mode_loses_no_acknowledged_write_across_a_crash() {
    if !lab_available("synchronous mode") {
        return;
    }
    let t = cluster(&lab_spec(
        "hasync",
        137,
        &[(0, 1), (1, 3)],
        3,
        "ha: { ttl: 5, loop_wait: 1, retry_timeout: 2, synchronous_mode: on }\n",
    ));
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let (_, standby) = wait_for(
        "a recorded synchronous standby",
        Duration::from_secs(30),
        || sync_key(&t, 1).filter(|(l, _)| *l == old),
    );
    // A manual failover to the other replica could lose acknowledged commits: refused at
    // once, naming synchronous mode and the standby, unless the operator accepts the risk.
    let other = members(&t, 1)
        .into_iter()
        .map(|(m, _, _)| m)
        .find(|m| *m != old && *m != standby)
        .expect("a third member");
    let started = std::time::Instant::now();
    let o = cli(
        &t,
        &["failover", "--group", "1", "--candidate", &other, "--force"],
    );
    let text = output_text(&o);
    assert!(!o.status.success(), "{text}");
    assert!(
        text.contains("synchronous mode")
            && text.contains(&standby)
            && text.contains("--accept-data-loss"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it waited instead of refusing"
    );
    assert_eq!(leader(&t, 1).as_deref(), Some(old.as_str()));
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(2));
    t.lab.crash(&old).expect("crash the primary's host");
    let new = wait_for("a new worker leader", Duration::from_secs(60), || {
        leader(&t, 1).filter(|l| *l != old)
    });
    assert_eq!(
        new, standby,
        "a member other than the synchronous standby was promoted"
    );
    // No commit stall: the new primary takes writes without waiting for the dead old one.
    let mark = p.t0.elapsed();
    wait_for("writes on the new primary", Duration::from_secs(30), || {
        p.log
            .lock()
            .ok()?
            .iter()
            .any(|a| a.ok && a.member == new && a.started > mark)
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    // Every write acknowledged anywhere is on the new primary.
    let acked = assert_nothing_acknowledged_lost(&t, &new, &log);
    eprintln!(
        "synchronous mode: {acked} acknowledged writes, none lost; longest gap {:?}",
        prober::longest_gap(&log)
    );
}

#[test]
fn paused_cluster_does_not_fail_over_until_resumed() {
    if !lab_available("pause") {
        return;
    }
    let t = worker_cluster("hapause", 138);
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let o = cli(&t, &["pause"]);
    assert!(o.status.success(), "{}", output_text(&o));
    std::thread::sleep(Duration::from_secs(2));
    t.lab.crash(&old).expect("crash the leader's host");
    // Three lease lengths without a new leader: the replicas must not race while paused.
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(
        leader(&t, 1),
        None,
        "a member was promoted while the cluster was paused"
    );
    let o = cli(&t, &["resume"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let new = wait_for("a leader after resume", Duration::from_secs(60), || {
        leader(&t, 1)
    });
    assert_ne!(new, old);
}

#[test]
fn agent_crash_restarts_and_reclaims_leadership_without_split_brain() {
    if !lab_available("agent crash") {
        return;
    }
    let t = worker_cluster("haagent", 139);
    let l = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));
    let endpoints = t.spec.etcd.endpoints.join(",");
    let key = format!("{}/{}/1/leader", t.spec.etcd.namespace, t.spec.cluster);
    let key_lease = || -> Option<i64> {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoints, "get", &key, "-w", "json"])
            .output()
            .ok()?;
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["kvs"][0]["lease"].as_i64()
    };
    let lease_alive = |lease: i64| -> bool {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &endpoints,
                "lease",
                "timetolive",
                &format!("{lease:x}"),
            ])
            .output();
        out.map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            o.status.success() && !text.contains("expired")
        })
        .unwrap_or(false)
    };
    let old_lease = key_lease().expect("the leader key's lease");
    let pid = agent_pid(&t, &l).expect("the leader's agent");
    // SAFETY: kill(2) on the lab's own agent; PostgreSQL dies with it (parent-death signal).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    // The supervisor restarts it at once; the restarted agent must take its key over while
    // the old lease is still alive (never start as primary on a lease about to expire).
    let moved_while_alive = wait_for(
        "the leader key to move to a new lease",
        Duration::from_secs(30),
        || {
            let now = key_lease()?;
            (now != old_lease).then(|| lease_alive(old_lease))
        },
    );
    assert!(
        moved_while_alive,
        "the key only moved once the old lease had expired: it was not reclaimed"
    );
    let mark = p.t0.elapsed();
    wait_for("writes again", Duration::from_secs(60), || {
        p.log
            .lock()
            .ok()?
            .iter()
            .any(|a| a.ok && a.started > mark)
            .then_some(())
    });
    // Two lease lengths: the old lease has expired by now; no second primary may appear.
    std::thread::sleep(Duration::from_secs(10));
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    // The restarted agent reclaimed its key within the old lease: leadership did not move.
    // (Starting as primary on the old lease instead would lose the key when that lease ends.)
    assert_eq!(
        leader(&t, 1).as_deref(),
        Some(l.as_str()),
        "leadership moved after an agent restart"
    );
    assert_nothing_acknowledged_lost(&t, &l, &log);
    eprintln!(
        "agent crash: leader kept by {l}; longest write gap {:?}",
        prober::longest_gap(&log)
    );
}

/// etcd content is untrusted input: a leader key without a lease (nobody could ever take
/// it), a member key naming another host, a switchover scheduled for the year 900000. The
/// group must lead again, nothing may follow or register the stranger, and the pending key
/// must go — never a stuck group, never two primaries.
#[test]
fn hostile_etcd_content_neither_sticks_a_group_nor_becomes_a_clone_source() {
    if !lab_available("hostile etcd content") {
        return;
    }
    let t = worker_cluster("hahostile", 153);
    let l = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let p = probe_group(&t, 1);
    let prefix = format!("{}/{}/1", t.spec.etcd.namespace, t.spec.cluster);
    let etcd = |args: &[&str]| {
        let o = common::etcdctl_output(&t, args);
        assert!(o.status.success(), "etcdctl {args:?}: {}", output_text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // A member key pointing at a host of the attacker's, and the leader key moved off its
    // lease.
    etcd(&[
        "put",
        &format!("{prefix}/members/intruder"),
        r#"{"role":"replica","state":"streaming","host":"10.213.153.99 dbname=evil","port":5432,"timeline":99,"xlog_location":999999999999}"#,
    ]);
    // A put without a lease detaches the key from the leader's lease.
    etcd(&["put", &format!("{prefix}/leader"), &l]);
    etcd(&[
        "put",
        &format!("{prefix}/failover"),
        r#"{"leader":"g1m0","member":"g1m1","scheduled_at":"900000-01-01T00:00:00Z"}"#,
    ]);
    // The group leads again, on a lease; the schedule is dropped.
    wait_for(
        "a leader key on a lease again",
        Duration::from_secs(60),
        || {
            let v: serde_json::Value =
                serde_json::from_str(&etcd(&["get", &format!("{prefix}/leader"), "-w", "json"]))
                    .ok()?;
            (v["kvs"][0]["lease"].as_i64().unwrap_or(0) != 0).then_some(())
        },
    );
    wait_for("the failover key gone", Duration::from_secs(60), || {
        etcd(&["get", &format!("{prefix}/failover"), "--print-value-only"])
            .is_empty()
            .then_some(())
    });
    let now = wait_for("a worker leader", Duration::from_secs(60), || leader(&t, 1));
    assert_ne!(now, "intruder");
    // No member follows the intruder, the coordinator never registers it, and `status`
    // names it as a problem instead of a member.
    std::thread::sleep(Duration::from_secs(3));
    let s = status(&t);
    assert!(
        !s["members"].to_string().contains("10.213.153.99")
            && !s["pg_dist_node"].to_string().contains("10.213.153.99"),
        "the intruder reached the cluster's view: {s}"
    );
    assert!(
        s["problems"].to_string().contains("intruder"),
        "status does not say: {s}"
    );
    for (m, _, _) in members(&t, 1) {
        let conf = std::fs::read_to_string(format!(
            "{}/citus-reconcile.role.conf",
            t.spec.host(&m).expect("member").data_dir
        ))
        .unwrap_or_default();
        assert!(
            !conf.contains("10.213.153.99"),
            "{m} follows the intruder: {conf}"
        );
    }
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    assert!(
        common::agent_logs(&t, 200).contains("no agent wrote"),
        "the agents did not say what they removed"
    );
}

#[test]
fn a_leader_whose_postgres_hangs_while_starting_gives_the_key_up() {
    if !lab_available("primary start timeout") {
        return;
    }
    let t = cluster(&lab_spec(
        "hastart",
        154,
        &[(0, 1), (1, 2)],
        1,
        "ha: { ttl: 5, loop_wait: 1, retry_timeout: 2, primary_start_timeout: 8 }\n",
    ));
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));
    // The leader's PostgreSQL will hang while starting: the configuration file it reads
    // first thing becomes a pipe nobody writes to. Then it crashes, and its agent restarts
    // it in place, as it should.
    let data_dir = t
        .spec
        .host(&old)
        .map(|h| h.data_dir.clone())
        .unwrap_or_default();
    let auto = format!("{data_dir}/postgresql.auto.conf");
    let kept = std::fs::read(&auto).unwrap_or_default();
    std::fs::remove_file(&auto).expect("remove postgresql.auto.conf");
    let fifo = std::ffi::CString::new(auto.clone()).expect("path");
    // SAFETY: mkfifo(3) on a path in the lab's data directory.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
    common::kill_postmaster(&t, &old);
    let crashed = std::time::Instant::now();
    let new = wait_for(
        "another member to lead (the hung one gave the key up)",
        Duration::from_secs(60),
        || leader(&t, 1).filter(|l| *l != old),
    );
    eprintln!(
        "{old} gave the key up; {new} leads {:.1} s after the crash (primary_start_timeout 8 s)",
        crashed.elapsed().as_secs_f64()
    );
    let log = std::fs::read_to_string(format!(
        "{}/agent.log",
        t.spec.host(&old).expect("member").install_dir
    ))
    .unwrap_or_default();
    assert!(
        log.contains("primary_start_timeout"),
        "the agent did not say why it gave up:\n{log}"
    );
    let mark = p.t0.elapsed();
    wait_for("writes on the new primary", Duration::from_secs(30), || {
        p.log
            .lock()
            .ok()?
            .iter()
            .any(|a| a.ok && a.member == new && a.started > mark)
            .then_some(())
    });
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    // Its configuration readable again, the old leader rejoins as a replica. (Its agent may
    // already be starting it, blocked on the pipe: feed the pipe once, then replace it.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        use std::os::unix::fs::OpenOptionsExt;
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&auto);
        if let Ok(mut w) = writer {
            let _ = std::io::Write::write_all(&mut w, &kept);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&auto).expect("remove the pipe");
    std::fs::write(&auto, &kept).expect("restore postgresql.auto.conf");
    let owner = std::fs::metadata(&data_dir).expect("data dir");
    use std::os::unix::fs::MetadataExt;
    std::os::unix::fs::chown(&auto, Some(owner.uid()), Some(owner.gid())).expect("chown");
    wait_for(
        "the old leader to stream again",
        Duration::from_secs(90),
        || {
            let (role, state) = member_state(&t, &old);
            (role == "Replica" && state == "streaming").then_some(())
        },
    );
}

#[test]
fn etcd_losing_quorum_stops_every_primary_until_it_returns() {
    if !lab_available("etcd quorum loss") {
        return;
    }
    // Synchronous mode: whoever leads after the outage holds every acknowledged write.
    let t = cluster(&lab_spec(
        "haquorum",
        155,
        &[(0, 1), (1, 2)],
        3,
        "ha: { ttl: 5, loop_wait: 1, retry_timeout: 2, synchronous_mode: on }\n",
    ));
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    wait_for("a synchronous standby", Duration::from_secs(30), || {
        common::sync_key(&t, 1).filter(|(l, _)| *l == old)
    });
    // `status` shows every endpoint healthy, one of them etcd's leader.
    let s = status(&t);
    let endpoints = s["etcd"].as_array().cloned().unwrap_or_default();
    assert_eq!(endpoints.len(), 3, "{s}");
    assert_eq!(
        endpoints.iter().filter(|e| e["leader"] == true).count(),
        1,
        "{s}"
    );
    assert!(endpoints.iter().all(|e| e["error"].is_null()), "{s}");

    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(2));
    // Two of three etcd members die: no quorum, no lease can be renewed. We run no failsafe
    // (Patroni's failsafe_mode): every primary must stop accepting writes within its lease.
    t.lab.crash("etcd3").expect("crash etcd3");
    t.lab.crash("etcd4").expect("crash etcd4");
    let lost = p.t0.elapsed();
    std::thread::sleep(Duration::from_secs(12));
    let during = p.t0.elapsed();
    let o = cli(&t, &["status"]);
    let text = output_text(&o);
    assert!(!o.status.success(), "status without etcd quorum: {text}");
    assert!(text.contains("etcd"), "{text}");
    eprintln!("status without quorum:\n{text}");
    t.lab.up().expect("etcd members back");
    let new = wait_for("a leader again", Duration::from_secs(90), || leader(&t, 1));
    let back = p.t0.elapsed();
    wait_for("writes again", Duration::from_secs(60), || {
        p.log
            .lock()
            .ok()?
            .iter()
            .any(|a| a.ok && a.started > back)
            .then_some(())
    });
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    // No write was acknowledged later than the lease allows after quorum went, nor while it
    // was gone.
    let ttl = Duration::from_secs(5);
    let late: Vec<&prober::Attempt> = log
        .iter()
        .filter(|a| a.ok && a.ended > lost + ttl && a.started < during)
        .collect();
    let last_ok = log
        .iter()
        .filter(|a| a.ok && a.started < during)
        .map(|a| a.ended)
        .max()
        .unwrap_or_default();
    eprintln!(
        "quorum lost at +{:.1} s; last write acknowledged at +{:.1} s; {new} leads again {:.1} s after etcd returned",
        lost.as_secs_f64(),
        last_ok.as_secs_f64(),
        (back - during).as_secs_f64()
    );
    assert!(
        late.is_empty(),
        "writes acknowledged after the lease ran out: {:?}",
        late.iter().take(3).collect::<Vec<_>>()
    );
    assert_nothing_acknowledged_lost(&t, &new, &log);
}

#[test]
fn member_slots_keep_a_standbys_wal_and_a_standby_past_them_is_cloned_again() {
    if !lab_available("member replication slots") {
        return;
    }
    // Little WAL kept without a slot, and slots bounded at 48 MB: what a standby down for a
    // while needs must come from its slot, and past the bound the slot is given up.
    let spec = lab_spec(
        "haslots",
        156,
        &[(0, 1), (1, 2)],
        1,
        "ha: { ttl: 5, loop_wait: 1, retry_timeout: 2, member_slots_ttl: 600 }\n",
    )
    .replace(
        "parameters: { max_connections: 50, shared_buffers: 16MB }",
        "parameters: { max_connections: 50, shared_buffers: 16MB, wal_keep_size: 0, max_wal_size: 64MB, min_wal_size: 32MB, max_slot_wal_keep_size: 48MB }",
    );
    let t = cluster(&spec);
    let primary = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let standby = members(&t, 1)
        .into_iter()
        .map(|(m, _, _)| m)
        .find(|m| *m != primary)
        .expect("a second member");
    let slot = standby.replace('-', "_");
    wait_for("the standby's slot in use", Duration::from_secs(30), || {
        (psql(
            &t,
            &primary,
            &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        ) == "t")
            .then_some(())
    });
    psql(&t, &primary, "CREATE TABLE filler (id bigint, pad text)");
    // About `mb` MB of WAL, with segment switches and checkpoints so that PostgreSQL removes
    // every segment nothing holds.
    let write_wal = |mb: u32| {
        for _ in 0..mb.div_ceil(8) {
            psql(
                &t,
                &primary,
                "INSERT INTO filler SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 7000) g",
            );
            psql(&t, &primary, "SELECT pg_switch_wal()");
        }
        psql(&t, &primary, "CHECKPOINT");
        psql(&t, &primary, "CHECKPOINT");
    };
    let slot_state = || {
        psql(
            &t,
            &primary,
            &format!(
                "SELECT COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ),
        )
    };

    // 1. The standby's host goes down for longer than its member key lives; 24 MB of WAL go
    // by. Its slot stays and holds them, so it streams again when it is back, without a clone.
    t.lab.crash(&standby).expect("crash the standby's host");
    wait_for(
        "the standby's member key to expire",
        Duration::from_secs(30),
        || {
            etcd_get(&t, &format!("1/members/{standby}"))
                .is_none()
                .then_some(())
        },
    );
    write_wal(24);
    let held = slot_state();
    assert!(
        held == "reserved" || held == "extended",
        "the slot of a standby that is down must hold its WAL: wal_status {held:?}"
    );
    t.lab.up().expect("the standby's host back");
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", output_text(&o));
    wait_for(
        "the standby to stream again",
        Duration::from_secs(60),
        || streaming(&t, &standby),
    );
    assert!(
        set_aside_dirs(&t, &standby).is_empty(),
        "cloned again: {:?}",
        set_aside_dirs(&t, &standby)
    );
    let rows = psql(&t, &primary, "SELECT count(*) FROM filler");
    wait_for(
        "the standby to hold every row",
        Duration::from_secs(30),
        || (psql(&t, &standby, "SELECT count(*) FROM filler") == rows).then_some(()),
    );

    // 2. Down again, and 96 MB go by: past max_slot_wal_keep_size, PostgreSQL gives the slot
    // up. The primary recreates it and says so in the status key; the standby, when it is
    // back, finds its WAL gone, answers 503 on /replica and is cloned again.
    t.lab
        .crash(&standby)
        .expect("crash the standby's host again");
    let down_at: u64 = psql(
        &t,
        &primary,
        "SELECT (pg_current_wal_lsn() - '0/0')::bigint",
    )
    .parse()
    .expect("an LSN");
    write_wal(96);
    // (It may be lost more than once: recreated while the filler still runs, it falls behind
    // again. The primary recreates it each time.)
    wait_for("the lost slot recreated", Duration::from_secs(30), || {
        let state = slot_state();
        (state == "reserved" || state == "extended").then_some(())
    });
    let oldest = wait_for(
        "the primary to publish WAL older than the standby's as gone",
        Duration::from_secs(30),
        || {
            let status: serde_json::Value =
                serde_json::from_str(&etcd_get(&t, "1/status")?).ok()?;
            status["oldest_wal"].as_u64().filter(|o| *o > down_at)
        },
    );
    t.lab.up().expect("the standby's host back again");
    let api = format!("{}:8008", address(&t, &standby));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (api, stop) = (api.clone(), stop.clone());
        std::thread::spawn(move || {
            // Running (health 200) yet not to be read from (replica 503): the lost standby.
            let mut seen = false;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let health = common::http("GET", &api, "/health", None, "").0;
                let replica = common::http("GET", &api, "/replica", None, "").0;
                seen |= health == 200 && replica == 503;
                std::thread::sleep(Duration::from_millis(200));
            }
            seen
        })
    };
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", output_text(&o));
    // First the clone: until its WAL receiver is told the WAL is gone, the lost standby can
    // report "streaming" for a moment (the walsender fails only once it reads the WAL).
    wait_for(
        "the lost standby's data set aside for a new clone",
        Duration::from_secs(120),
        || {
            set_aside_dirs(&t, &standby)
                .iter()
                .any(|d| d.contains(".wal-gone-"))
                .then_some(())
        },
    );
    wait_for(
        "the standby to stream after a new clone",
        Duration::from_secs(120),
        || streaming(&t, &standby),
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen_503 = watcher.join().unwrap_or(false);
    assert!(
        seen_503,
        "/replica never answered 503 for the standby whose WAL was gone"
    );
    let rows = psql(&t, &primary, "SELECT count(*) FROM filler");
    wait_for(
        "the clone to hold every row",
        Duration::from_secs(30),
        || (psql(&t, &standby, "SELECT count(*) FROM filler") == rows).then_some(()),
    );
    eprintln!(
        "the standby went down at {down_at}, the primary kept WAL from {oldest} on; the standby was cloned again ({:?})",
        set_aside_dirs(&t, &standby)
    );
}

/// Put 1 MiB values under `/junk/` until etcd refuses for want of space; how many it took.
fn fill_etcd_until_nospace(t: &TestLab) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = etcd_client::Client::connect(t.spec.etcd.endpoints.clone(), None)
            .await
            .expect("connect to etcd");
        let value = vec![b'x'; 1 << 20];
        for i in 0..4000 {
            let put = c.put(format!("/junk/{i}"), value.clone(), None);
            match tokio::time::timeout(Duration::from_secs(20), put).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.to_string().contains("space exceeded") => return i,
                other => panic!("filling etcd: {other:?}"),
            }
        }
        panic!("etcd never ran out of space")
    })
}

#[test]
fn etcd_out_of_space_freezes_the_cluster_as_it_is_until_cleared() {
    if !lab_available("etcd out of space") {
        return;
    }
    let t = cluster(&lab_spec("hanospace", 157, &[(0, 1), (1, 2)], 1, FAST_HA));
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(1));
    let puts = fill_etcd_until_nospace(&t);
    let full = p.t0.elapsed();
    let alarms = common::etcdctl(&t, &["alarm", "list"]).unwrap_or_default();
    assert!(alarms.contains("NOSPACE"), "alarms: {alarms}");
    // Three leases' worth of time with etcd refusing every write but deletes.
    std::thread::sleep(Duration::from_secs(15));
    let o = cli(&t, &["status"]);
    let text = output_text(&o);
    assert!(
        text.contains("NOSPACE"),
        "status with etcd out of space: {text}"
    );
    let during = p.t0.elapsed();
    let leader_during = leader(&t, 1);
    let acked_while_full = p
        .log
        .lock()
        .map(|l| l.iter().filter(|a| a.ok && a.started > full).count())
        .unwrap_or(0);

    // What the README tells the operator to do.
    common::etcdctl(&t, &["del", "/junk/", "--prefix"]).expect("delete the filler");
    let status = common::etcdctl(&t, &["endpoint", "status", "-w", "json"]).expect("status");
    let revision = serde_json::from_str::<serde_json::Value>(&status)
        .ok()
        .and_then(|v| v[0]["Status"]["header"]["revision"].as_i64())
        .expect("a revision");
    common::etcdctl(&t, &["compact", &revision.to_string()]).expect("compact");
    common::etcdctl(&t, &["defrag"]).expect("defrag");
    common::etcdctl(&t, &["alarm", "disarm"]).expect("disarm");
    // The cluster can change again: a switchover goes through.
    let o = cli(&t, &["switchover", "--group", "1", "--force"]);
    assert!(
        o.status.success(),
        "switchover after recovery: {}",
        output_text(&o)
    );
    let new = wait_for("the new leader", Duration::from_secs(30), || {
        leader(&t, 1).filter(|l| *l != old)
    });
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    eprintln!(
        "etcd full after {puts} puts of 1 MiB at +{:.1} s; {acked_while_full} writes acknowledged in the {:.1} s it stayed full; leader then {leader_during:?}; {new} leads after the recovery",
        full.as_secs_f64(),
        (during - full).as_secs_f64()
    );
    // Leases live on (renewing one is no write), so the primaries keep theirs and serve; no
    // key can be written, so nothing changes (no failover, no new member) until it is cleared.
    assert_eq!(leader_during.as_deref(), Some(old.as_str()));
    assert!(
        acked_while_full > 100,
        "the primary stopped serving while etcd was full"
    );
}

#[test]
fn a_standby_that_cannot_start_under_a_live_leader_is_set_aside_and_cloned_again() {
    if !lab_available("standby start failures") {
        return;
    }
    let t = cluster(&lab_spec("hastartfail", 159, &[(0, 1), (1, 2)], 1, FAST_HA));
    let primary = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let standby = members(&t, 1)
        .into_iter()
        .map(|(m, _, _)| m)
        .find(|m| *m != primary)
        .expect("a second member");
    wait_for("the standby to stream", Duration::from_secs(60), || {
        streaming(&t, &standby)
    });
    psql(
        &t,
        &primary,
        "CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 1000) g",
    );
    let p = probe_group(&t, 1);
    // A value PostgreSQL refuses at start, where an edit by hand would put it: the standby can
    // never start with this data, while its leader runs.
    let data_dir = t
        .spec
        .host(&standby)
        .map(|h| h.data_dir.clone())
        .expect("the standby's data dir");
    let auto_conf = format!("{data_dir}/postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto_conf).expect("postgresql.auto.conf");
    text.push_str("shared_buffers = 'plenty'\n");
    std::fs::write(&auto_conf, text).expect("edit postgresql.auto.conf");
    common::kill_postmaster(&t, &standby);
    wait_for(
        "the standby to stream again after a new clone",
        Duration::from_secs(120),
        || streaming(&t, &standby),
    );
    // Set aside, never deleted: the copy still holds the data and the edit that broke it.
    let copy = set_aside_copy(&t, &standby, "start-failed");
    let kept = std::fs::read_to_string(copy.join("postgresql.auto.conf")).unwrap_or_default();
    assert!(kept.contains("'plenty'"), "{kept}");
    wait_for(
        "the clone to hold every row",
        Duration::from_secs(30),
        || (psql(&t, &standby, "SELECT count(*) FROM kept") == "1000").then_some(()),
    );
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    common::assert_still_leader(&t, 1, &primary, "the leader changed while a standby failed");
    assert_nothing_acknowledged_lost(&t, &primary, &log);
}

/// A frozen agent (SIGSTOP: a debugger, a stuck kernel call) cannot run its own fence, and
/// its PostgreSQL would go on accepting writes after the lease ran out, beside the member
/// promoted after it. The agent's guard, a process of its own, must stop that primary
/// before the lease can have ended. Thawed, the old primary cannot be rewound (a folder it
/// may not read): it is set aside and cloned again, and the new leader stays.
#[test]
fn a_frozen_leader_is_fenced_by_its_guard_and_rejoins_by_a_new_clone_when_rewind_fails() {
    if !lab_available("frozen agent") {
        return;
    }
    let t = worker_cluster("hafrozen", 161);
    let l = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    for (m, _, _) in members(&t, 1).iter().filter(|(m, _, _)| *m != l) {
        wait_for("the standbys streaming", Duration::from_secs(60), || {
            streaming(&t, m)
        });
    }
    let postmaster = common::postmaster_pid(&t, &l).expect("the leader's postmaster");
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(2));
    // A statement already running on the frozen primary: it computes for 6.5 s without
    // waiting on anything (so it never notices a dead postmaster), then writes and commits.
    // That commit would land after the lease ran out, beside the new leader, unless the
    // guard's fence stops the backend too and not the postmaster alone.
    let late_commit = {
        let h = t.spec.host(&l).expect("the leader's host").clone();
        std::thread::spawn(move || {
            std::process::Command::new("psql")
                .args(["-h", &h.address, "-p", &h.pg_port.to_string(), "-U", "postgres", "-d", "postgres", "-XAtc"])
                .arg("DO $$ BEGIN WHILE clock_timestamp() < statement_timestamp() + interval '6.5 s' LOOP END LOOP; END $$; INSERT INTO probe (id, member) VALUES (-1, 'late')")
                .env("PGPASSWORD", "lab-superuser-pw")
                .env("PGCONNECT_TIMEOUT", "5")
                .output()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    common::signal_agent(&t, &l, libc::SIGSTOP);
    let frozen = p.t0.elapsed();
    let new = wait_for("another member leading", Duration::from_secs(60), || {
        leader(&t, 1).filter(|n| *n != l)
    });
    let promoted = p.t0.elapsed();
    // Killed, it stays a zombie until the frozen agent reaps it: alive means not in state Z.
    let postmaster_alive = std::fs::read_to_string(format!("/proc/{postmaster}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'));
    wait_for("writes on the new leader", Duration::from_secs(60), || {
        p.log
            .lock()
            .ok()?
            .iter()
            .any(|a| a.ok && a.member == new && a.started > promoted)
            .then_some(())
    });
    let late = late_commit.join().expect("the late statement's thread");
    let late = late.expect("psql runs");
    eprintln!(
        "the statement running on the frozen primary: {} {}",
        late.status,
        String::from_utf8_lossy(&late.stderr).trim()
    );
    let why = String::from_utf8_lossy(&late.stderr);
    assert!(
        !late.status.success(),
        "a statement running on the frozen primary committed after its lease"
    );
    // Cut off with its backend, not refused by SQL.
    assert!(
        !why.contains("ERROR:")
            && (why.contains("connection to server was lost")
                || why.contains("server closed the connection")),
        "the late statement failed for another reason: {why}"
    );
    std::thread::sleep(Duration::from_secs(3));
    // Thawed, the former primary must rewind before it follows. Here pg_rewind cannot:
    // a folder in its data directory it may not read (as a careless backup tool run by root
    // would leave). Its data is set aside, never deleted, and it is cloned again.
    let data_dir = t
        .spec
        .host(&l)
        .map(|h| h.data_dir.clone())
        .expect("the frozen member's data dir");
    let blocker = format!("{data_dir}/unreadable-by-postgres");
    std::fs::create_dir(&blocker).expect("a folder for root only");
    std::fs::write(format!("{blocker}/note"), "root's").expect("a file in it");
    std::fs::set_permissions(
        &blocker,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod 0700");
    common::signal_agent(&t, &l, libc::SIGCONT);
    wait_for(
        "the thawed member streaming from the new leader",
        Duration::from_secs(120),
        || streaming(&t, &l),
    );
    let copy = set_aside_copy(&t, &l, "rewind-failed");
    assert!(
        copy.join("unreadable-by-postgres/note").exists(),
        "the set-aside copy lost the data it held"
    );
    common::assert_still_leader(
        &t,
        1,
        &new,
        "leadership moved while the old primary rejoined",
    );
    let log = p.stop();
    let last_on_frozen = log
        .iter()
        .filter(|a| a.ok && a.member == l)
        .map(|a| a.ended)
        .max()
        .unwrap_or_default();
    eprintln!(
        "frozen at +{:.2} s; last write acknowledged by the frozen member at +{:.2} s; {new} led at +{:.2} s",
        frozen.as_secs_f64(),
        last_on_frozen.as_secs_f64(),
        promoted.as_secs_f64()
    );
    assert!(
        !postmaster_alive,
        "the frozen leader's PostgreSQL still ran when {new} took over\n{}",
        common::agent_logs(&t, 30)
    );
    prober::assert_no_split_brain(&log);
    // It was the guard that stopped it (the agent's own fence was frozen too): the guard
    // writes to the agent's log itself, and the agent counts it once thawed.
    let install_dir = t
        .spec
        .host(&l)
        .map(|h| h.install_dir.clone())
        .unwrap_or_default();
    let agent_log = std::fs::read_to_string(format!("{install_dir}/agent.log")).unwrap_or_default();
    assert!(
        agent_log.contains(&format!(
            "guard: the lease of the primary PostgreSQL (pid {postmaster})"
        )),
        "no word from the guard in {l}'s log\n{}",
        common::agent_logs(&t, 40)
    );
    let api = format!("{}:8008", address(&t, &l));
    let (_, metrics) = common::http("GET", &api, "/metrics", None, "");
    let fenced = metrics
        .lines()
        .find(|x| x.starts_with("citus_reconcile_guard_fenced_total"))
        .and_then(|x| x.rsplit(' ').next())
        .unwrap_or("")
        .to_string();
    eprintln!("guard_fenced_total on {l}: {fenced:?}");
    // The lease is 5 s: nothing the frozen member acknowledged may end later than that.
    let ttl = Duration::from_secs(5);
    assert!(
        last_on_frozen <= frozen + ttl,
        "the frozen member acknowledged a write {:.2} s after it froze",
        (last_on_frozen - frozen).as_secs_f64()
    );
}

/// A primary whose postmaster is stuck (here: stopped) while its backends still serve, cut
/// off etcd. The fence's SIGQUIT never reaches the backends through a stuck postmaster, and
/// stopping it from the agent waits; the guard must still kill every backend before the lease
/// can have ended, or the old primary keeps acknowledging writes beside the new one.
#[test]
fn a_primary_with_a_stuck_postmaster_is_still_fenced_when_cut_off_etcd() {
    if !lab_available("stuck postmaster") {
        return;
    }
    let t = worker_cluster("hastuck", 162);
    let old = wait_for("a worker leader", Duration::from_secs(30), || leader(&t, 1));
    let postmaster = common::postmaster_pid(&t, &old).expect("the leader's postmaster");
    let p = probe_group(&t, 1);
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill(2) on the lab's own postmaster.
    unsafe {
        libc::kill(postmaster, libc::SIGSTOP);
    }
    t.lab
        .partition(&old, true)
        .expect("cut the leader off etcd");
    let cut = p.t0.elapsed();
    let new = wait_for("a new worker leader", Duration::from_secs(60), || {
        leader(&t, 1).filter(|l| *l != old)
    });
    let promoted = p.t0.elapsed();
    wait_for("writes on the new leader", Duration::from_secs(60), || {
        p.log
            .lock()
            .ok()?
            .iter()
            .any(|a| a.ok && a.member == new && a.started > promoted)
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let log = p.stop();
    // Whatever happened, leave no stopped process behind for the lab to tear down.
    // SAFETY: as above.
    unsafe {
        libc::kill(postmaster, libc::SIGCONT);
    }
    t.lab.heal(&old).expect("heal");
    let last_on_old = log
        .iter()
        .filter(|a| a.ok && a.member == old)
        .map(|a| a.ended)
        .max()
        .unwrap_or_default();
    eprintln!(
        "cut off at +{:.2} s; last write acknowledged by the stuck primary at +{:.2} s; {new} led at +{:.2} s",
        cut.as_secs_f64(),
        last_on_old.as_secs_f64(),
        promoted.as_secs_f64()
    );
    prober::assert_no_split_brain(&log);
    assert!(
        last_on_old <= cut + Duration::from_secs(5),
        "the stuck primary acknowledged a write {:.2} s after it was cut off (lease 5 s)\n{}",
        (last_on_old - cut).as_secs_f64(),
        common::agent_logs(&t, 30)
    );
}
