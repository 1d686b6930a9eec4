//! High availability under real faults, in the lab. Every test runs a split-brain prober (a
//! writer per member) and fails if two members of a group ever accepted writes at once.
//! Waits are liveness guards with generous limits; no test asserts on timing.

mod common;

use std::time::Duration;

use common::prober::{self, Prober};
use common::{
    TestLab, cli, cluster, lab_available, lab_spec, leader, members, output_text, status, wait_for,
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

fn coordinator_row(t: &TestLab, group: u32) -> Option<String> {
    let s = status(t);
    s["pg_dist_node"]
        .as_array()?
        .iter()
        .find(|r| r["groupid"] == group && r["noderole"] == "primary")
        .and_then(|r| r["nodename"].as_str().map(str::to_string))
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
    let t = worker_cluster("hacrash", 130);
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
    let data_dir = t
        .spec
        .host(&l)
        .map(|h| h.data_dir.clone())
        .unwrap_or_default();
    let pid_text =
        std::fs::read_to_string(format!("{data_dir}/postmaster.pid")).expect("postmaster.pid");
    let pid: i32 = pid_text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid");
    // SAFETY: kill(2) on the postmaster the lab's agent runs; the lab owns it.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
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
    assert_eq!(
        leader(&t, 1).as_deref(),
        Some(l.as_str()),
        "leadership moved although the agent was alive"
    );
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
        || {
            (member_state(&t, &old) == ("Replica".to_string(), "streaming".to_string()))
                .then_some(())
        },
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
    assert_eq!(
        leader(&t, 1).as_deref(),
        Some(l.as_str()),
        "leadership changed after losing one etcd member of three"
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
