//! Citus through SQL, on the real extension, as an application meets it: distributed and
//! reference tables created and written through the coordinator and through the workers
//! (Citus syncs its metadata to them, so any node routes queries), across switchovers and
//! failovers of every group; the coordinator's metadata repaired after any failover, with and
//! without secondaries; and a worker switchover during which writes through the coordinator
//! wait instead of failing. The stand-in routes no distributed query: on a machine without
//! real Citus these tests say so and skip (in CI, where `.ci/setup` builds it, they fail).

mod common;

use std::time::Duration;

use common::citus_client::{
    self, Sql, Writer, address_of, addresses, coordinator, real_citus, wait_rows_follow_leaders,
    writes_resume,
};
use common::{
    TestLab, cli, cluster, etcd_get, lab_spec, leader, members, output_text, postmaster_pid,
    signal_agent, status, sync_key, wait_for,
};

const FAST_HA: &str = "ha: { ttl: 5, loop_wait: 1, retry_timeout: 2 }\n";

/// Distributed and reference tables work through the coordinator and through every worker
/// primary; each worker holds its own pg_dist_authinfo row; every node reaches every other.
fn check_sql_everywhere(t: &TestLab, round: i64) {
    let leaders = wait_rows_follow_leaders(t, &[0, 1, 2]);
    let mut c = coordinator(t);
    let base = round * 1000;
    c.exec(&format!(
        "INSERT INTO items (id, kind, v) SELECT g, 1 + g % 3, 'r{round}' FROM generate_series({base}, {base} + 99) g"
    ))
    .unwrap_or_else(|e| panic!("round {round}: insert through the coordinator: {e}"));
    let total = c.one("SELECT count(*) FROM items").expect("count");
    let joined = c
        .one("SELECT count(*) FROM items JOIN kinds USING (kind)")
        .expect("join with the reference table");
    assert_eq!(total, joined, "round {round}: every item has its kind");
    // Query from any node: each worker primary routes the same statements itself, with its
    // own copy of the metadata (synced by Citus a moment after any change of pg_dist_node).
    for (g, l) in leaders.iter().enumerate().skip(1) {
        let addr = address_of(t, l);
        let id = base + 500 + g as i64;
        wait_for(
            &format!("round {round}: writes routed by group {g}'s primary {l}"),
            Duration::from_secs(60),
            || {
                let mut w = Sql::connect(std::slice::from_ref(&addr), "citus").ok()?;
                w.exec(&format!("INSERT INTO items (id, kind, v) VALUES ({id}, 1, 'via {l}') ON CONFLICT (id) DO NOTHING"))
                    .ok()?;
                let n: i64 = w.one("SELECT count(*) FROM items").ok()?.parse().ok()?;
                let kinds = w.one("SELECT count(*) FROM kinds").ok()?;
                let authinfo = w
                    .one("SELECT count(*) FROM pg_dist_authinfo WHERE rolename = 'postgres' AND nodeid = 0")
                    .ok()?;
                (n >= total.parse::<i64>().ok()? && kinds == "3" && authinfo == "1").then_some(())
            },
        );
    }
    let unhealthy = wait_for(
        &format!("round {round}: citus_check_cluster_node_health()"),
        Duration::from_secs(60),
        || {
            let mut c = Sql::connect(&addresses(t, 0), "citus").ok()?;
            let bad = c
                .strings("SELECT from_nodename || ' -> ' || to_nodename FROM citus_check_cluster_node_health() WHERE result IS NOT TRUE")
                .ok()?;
            bad.is_empty().then_some(bad)
        },
    );
    assert!(unhealthy.is_empty());
}

/// The environment of a member's running postmaster.
fn postmaster_env(t: &TestLab, member: &str) -> Vec<String> {
    let pid = postmaster_pid(t, member).unwrap_or_default();
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| {
            b.split(|c| *c == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .filter(|v| !v.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn distributed_sql_through_any_node_across_switchovers_and_failovers() {
    if !real_citus("distributed SQL") {
        return;
    }
    let t = cluster(&lab_spec(
        "citussql",
        141,
        &[(0, 2), (1, 2), (2, 2)],
        3,
        FAST_HA,
    ));

    // PostgreSQL runs with the postgres user's environment: none of root's.
    let home = citus_reconcile::postgres::process::OsUser::postgres()
        .expect("postgres user")
        .home;
    for (m, _, _) in members(&t, 1) {
        let env = postmaster_env(&t, &m);
        assert!(env.contains(&format!("HOME={home}")), "{m}: {env:?}");
        assert!(env.contains(&"USER=postgres".to_string()), "{m}: {env:?}");
        assert!(!env.iter().any(|v| v.starts_with("SSH_")), "{m}: {env:?}");
    }
    // A fresh apply uses no more node ids than rows (a failed citus_add_node burns none).
    let mut c = coordinator(&t);
    let ids = c
        .one("SELECT max(nodeid) || '/' || count(*) FROM pg_dist_node")
        .expect("ids");
    assert_eq!(ids, "3/3", "node ids (max/count)");

    c.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, kind int NOT NULL, v text);
         SELECT create_distributed_table('items', 'id');
         CREATE TABLE kinds (kind int PRIMARY KEY, name text);
         SELECT create_reference_table('kinds');
         INSERT INTO kinds VALUES (1, 'a'), (2, 'b'), (3, 'c');",
    )
    .expect("distributed and reference tables");
    drop(c);
    check_sql_everywhere(&t, 0);

    // A switchover of every group, the coordinator's last.
    let mut round = 1;
    for g in [1u32, 2, 0] {
        let before = leader(&t, u64::from(g)).expect("a leader");
        let o = cli(&t, &["switchover", "--group", &g.to_string(), "--force"]);
        assert!(
            o.status.success(),
            "switchover of group {g}: {}",
            output_text(&o)
        );
        let after = leader(&t, u64::from(g)).expect("a leader");
        assert_ne!(before, after, "group {g}");
        check_sql_everywhere(&t, round);
        round += 1;
    }

    // A failover of every group at once: their leaders' hosts crash together. The new
    // coordinator primary must repair every row (its own first) while worker rows still name
    // servers that are gone.
    let old: Vec<String> = [0u64, 1, 2]
        .iter()
        .map(|g| leader(&t, *g).expect("leader"))
        .collect();
    for l in &old {
        t.lab.crash(l).expect("crash a leader's host");
    }
    for (g, l) in old.iter().enumerate() {
        wait_for(
            &format!("a new leader in group {g}"),
            Duration::from_secs(90),
            || leader(&t, g as u64).filter(|n| n != l),
        );
    }
    check_sql_everywhere(&t, round);
    round += 1;

    // The crashed hosts come back, rejoin as replicas, and everything still works.
    t.lab.up().expect("reboot the crashed hosts");
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", output_text(&o));
    check_sql_everywhere(&t, round);
    let mut c = coordinator(&t);
    let total = c.one("SELECT count(*) FROM items").expect("count");
    eprintln!("items after {} rounds: {total}", round + 1);
}

#[test]
fn metadata_follows_every_failover_with_secondaries() {
    if !real_citus("metadata repair with secondaries") {
        return;
    }
    let spec = lab_spec(
        "citussec",
        142,
        &[(0, 2), (1, 3), (2, 2)],
        3,
        &format!("citus: {{ secondaries: true }}\n{FAST_HA}"),
    );
    let t = cluster(&spec);
    let mut c = coordinator(&t);
    c.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, kind int NOT NULL, v text);
         SELECT create_distributed_table('items', 'id');
         CREATE TABLE kinds (kind int PRIMARY KEY, name text);
         SELECT create_reference_table('kinds');
         INSERT INTO kinds VALUES (1, 'a'), (2, 'b'), (3, 'c');
         INSERT INTO items SELECT g, 1 + g % 3, 'x' FROM generate_series(1, 300) g;",
    )
    .expect("tables");
    drop(c);
    wait_secondaries_are_the_streaming_replicas(&t);
    reads_from_secondaries_see(&t, 300);

    // A switchover of group 1 with a client reading from the secondaries all along: the
    // promoted member's secondary row goes, the old primary's comes once it streams; no read
    // ever answers from a member that does not have the rows.
    let reader = citus_client::Reader::start(
        &addresses(&t, 0),
        "-c citus.use_secondary_nodes=always",
        "SELECT count(*) FROM items",
        "300",
        Duration::from_millis(20),
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = leader(&t, 1).expect("group 1 leader");
    let o = cli(&t, &["switchover", "--group", "1", "--force"]);
    assert!(o.status.success(), "{}", output_text(&o));
    wait_for("group 1's new leader", Duration::from_secs(60), || {
        leader(&t, 1).filter(|l| *l != before)
    });
    wait_secondaries_are_the_streaming_replicas(&t);
    std::thread::sleep(Duration::from_millis(500));
    let reads = reader.stop();
    eprintln!(
        "reads from secondaries across a switchover of group 1: {} answered, {} failed (first: {:?}), {} wrong",
        reads.ok,
        reads.failed,
        reads.first_error,
        reads.wrong.len()
    );
    assert!(
        reads.wrong.is_empty(),
        "reads answered wrongly: {:?}",
        reads.wrong
    );
    assert!(reads.ok > 0, "no read answered: {reads:?}");
    reads_from_secondaries_see(&t, 300);

    // Every leader's host crashes at once (as when a change restarted every leader).
    let old: Vec<String> = [0u64, 1, 2]
        .iter()
        .map(|g| leader(&t, *g).expect("leader"))
        .collect();
    for l in &old {
        t.lab.crash(l).expect("crash a leader's host");
    }
    for (g, l) in old.iter().enumerate() {
        wait_for(
            &format!("a new leader in group {g}"),
            Duration::from_secs(90),
            || leader(&t, g as u64).filter(|n| n != l),
        );
    }
    check_sql_everywhere_minimal(&t, 301);
    // No secondary row names a member that does not stream (the crashed ones are down).
    wait_secondaries_are_the_streaming_replicas(&t);

    t.lab.up().expect("reboot");
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", output_text(&o));
    wait_secondaries_are_the_streaming_replicas(&t);
    reads_from_secondaries_see(&t, 301);
    let mut c = coordinator(&t);
    let rows = c
        .strings("SELECT nodeid || ' ' || groupid || ' ' || nodename || ' ' || noderole FROM pg_dist_node ORDER BY groupid, noderole")
        .expect("rows");
    eprintln!("pg_dist_node after the repair:\n  {}", rows.join("\n  "));
}

/// After the crash: writes through the coordinator work again (one more row, `expected`
/// rows in all).
fn check_sql_everywhere_minimal(t: &TestLab, expected: i64) {
    wait_rows_follow_leaders(t, &[0, 1, 2]);
    wait_for(
        "a write through the coordinator",
        Duration::from_secs(60),
        || {
            let mut c = Sql::connect(&addresses(t, 0), "citus").ok()?;
            c.exec(&format!(
                "INSERT INTO items VALUES ({expected}, 1, 'after') ON CONFLICT (id) DO NOTHING"
            ))
            .ok()?;
            (c.one("SELECT count(*) FROM items").ok()? == expected.to_string()).then_some(())
        },
    );
}

/// The secondary rows of pg_dist_node are exactly the members that stream from their leader
/// (as `status` reports them); rows parked at an `.invalid` name may remain while Citus's
/// metadata is out of sync.
fn wait_secondaries_are_the_streaming_replicas(t: &TestLab) {
    wait_for(
        "secondary rows to match the streaming replicas",
        Duration::from_secs(90),
        || {
            let s = status(t);
            let mut streaming: Vec<String> = s["members"]
                .as_array()?
                .iter()
                .filter(|m| m["role"] == "Replica" && m["state"] == "streaming")
                .filter_map(|m| m["member"].as_str())
                .map(|m| address_of(t, m).0)
                .collect();
            streaming.sort();
            let mut c = Sql::connect(&addresses(t, 0), "citus").ok()?;
            let mut rows = c
                .strings("SELECT nodename FROM pg_dist_node WHERE noderole = 'secondary' AND nodename NOT LIKE '%.invalid' ORDER BY 1")
                .ok()?;
            rows.sort();
            (rows == streaming).then_some(())
        },
    );
}

/// A session that reads only from secondaries sees `expected` rows.
fn reads_from_secondaries_see(t: &TestLab, expected: i64) {
    let conninfo = citus_client::conninfo(
        &addresses(t, 0),
        "citus",
        "options='-c citus.use_secondary_nodes=always'",
    )
    .replace("target_session_attrs=read-write", "");
    wait_for(
        "reads from the secondaries",
        Duration::from_secs(60),
        || {
            let mut c = Sql::connect_with(&conninfo).ok()?;
            (c.one("SELECT count(*) FROM items").ok()? == expected.to_string()).then_some(())
        },
    );
}

#[test]
fn worker_switchover_holds_writes_through_the_coordinator_instead_of_failing() {
    if !real_citus("transparent switchover") {
        return;
    }
    let t = cluster(&lab_spec(
        "citusswo",
        143,
        &[(0, 1), (1, 2), (2, 2)],
        3,
        FAST_HA,
    ));
    let mut c = coordinator(&t);
    c.exec("CREATE TABLE w (id bigint PRIMARY KEY, at timestamptz DEFAULT now()); SELECT create_distributed_table('w', 'id');")
        .expect("table");
    drop(c);
    let coord = addresses(&t, 0);
    let w = Writer::start(&coord, "w", Duration::from_millis(10));
    std::thread::sleep(Duration::from_secs(1));
    for g in [1u32, 2, 1] {
        let o = cli(&t, &["switchover", "--group", &g.to_string(), "--force"]);
        assert!(
            o.status.success(),
            "switchover of group {g}: {}",
            output_text(&o)
        );
        wait_rows_follow_leaders(&t, &[1, 2]);
        std::thread::sleep(Duration::from_millis(500));
    }
    // Both worker groups at once: neither pause may hold the other group up.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| cli(&t, &["switchover", "--group", "1", "--force"]));
        let b = s.spawn(|| cli(&t, &["switchover", "--group", "2", "--force"]));
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    assert!(a.status.success(), "{}", output_text(&a));
    assert!(b.status.success(), "{}", output_text(&b));
    wait_rows_follow_leaders(&t, &[1, 2]);
    std::thread::sleep(Duration::from_secs(1));
    let log = w.stop();
    let summary = citus_client::summarize(&log);
    eprintln!("writer through the coordinator, 5 worker switchovers: {summary}");
    assert_eq!(summary.failed, 0, "inserts failed: {summary}");
    let checked = citus_client::assert_nothing_acknowledged_lost(&coord, "w", &log);
    assert!(checked > 100, "only {checked} inserts");
}

/// State of a group's pause request (`requested`, `paused`, `refused`), if any.
fn pause_state(t: &TestLab, group: u32) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&etcd_get(t, &format!("{group}/citus_pause"))?).ok()?;
    v["state"].as_str().map(str::to_string)
}

/// Freeze the candidate's agent and ask for a switchover to it: the leader gets the pause,
/// stops and hands over, but nobody takes over. Returns once the coordinator holds the pause.
fn switchover_to_a_frozen_candidate(t: &TestLab, group: u32) -> String {
    // The request of an earlier scenario lives on its lease (the CLI's wait plus 30 s) until
    // a new leader clears it: a new request meanwhile is refused as "pending".
    wait_for(
        "no switchover pending from an earlier scenario",
        Duration::from_secs(180),
        || {
            etcd_get(t, &format!("{group}/failover"))
                .is_none()
                .then_some(())
        },
    );
    // A candidate the CLI accepts: a replica that streams (the one thawed in an earlier
    // scenario may still be rejoining).
    let candidate = wait_for(
        "a streaming replica to switch over to",
        Duration::from_secs(60),
        || {
            let l = leader(t, u64::from(group))?;
            members(t, group)
                .into_iter()
                .map(|(m, _, _)| m)
                .filter(|m| *m != l)
                .find(|m| {
                    etcd_get(t, &format!("{group}/members/{m}"))
                        .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
                        .is_some_and(|v| v["role"] == "replica" && v["state"] == "streaming")
                })
        },
    );
    signal_agent(t, &candidate, libc::SIGSTOP);
    let (spec, g) = (t.spec_path.clone(), group.to_string());
    let c2 = candidate.clone();
    // The CLI waits for the candidate and gives up; the test does not wait for it, but keeps
    // what it said for a failure's message.
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let said2 = said.clone();
    std::thread::spawn(move || {
        let o = assert_cmd::Command::cargo_bin("citus-reconcile")
            .expect("binary")
            .args(["switchover", "--group", &g, "--candidate", &c2, "--force"])
            .arg(spec)
            .env("CR_LAB_SUPERUSER", "lab-superuser-pw")
            .env("CR_LAB_REPLICATION", "lab-replication-pw")
            .timeout(Duration::from_secs(120))
            .output();
        if let (Ok(o), Ok(mut s)) = (o, said2.lock()) {
            *s = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pause_state(t, group).as_deref() != Some("paused") {
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator did not hold group {group}'s writes within 30 s; pause state {:?}; the switchover said: {}",
            pause_state(t, group),
            said.lock().map(|s| s.clone()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    candidate
}

#[test]
fn a_write_pause_never_leaves_a_group_blocked() {
    if !real_citus("pause failure paths") {
        return;
    }
    let t = cluster(&lab_spec(
        "citusblk",
        144,
        &[(0, 2), (1, 2), (2, 2)],
        3,
        // Group 1's held pause lasts until its deadline or until the frozen candidate's
        // member key expires (a ttl) and the old leader leads again: both long enough that
        // group 2's switchover below fits inside it even on a loaded 2-core host (with a
        // 5 s ttl a busy CI run missed the window).
        "citus: { pause_timeout: 20, lock_cooldown_ms: 1000 }\nha: { ttl: 15, loop_wait: 1, retry_timeout: 2 }\n",
    ));
    let mut c = coordinator(&t);
    c.exec("CREATE TABLE w (id bigint PRIMARY KEY); SELECT create_distributed_table('w', 'id');")
        .expect("table");
    drop(c);
    let coord = addresses(&t, 0);
    let w = Writer::start(&coord, "w", Duration::from_millis(10));
    writes_resume(&w, "the writer to start");

    // 1. The candidate never takes over: the pause ends at its deadline (or when the old
    //    leader leads again), never later. Meanwhile another group switches over: its own
    //    pause and row move must not wait behind the held one.
    let frozen = switchover_to_a_frozen_candidate(&t, 1);
    let o = cli(&t, &["switchover", "--group", "2", "--force"]);
    assert!(
        o.status.success(),
        "group 2 while group 1 is held: {}",
        output_text(&o)
    );
    let g2 = leader(&t, 2).expect("group 2 leader");
    let (g2_addr, g2_port) = address_of(&t, &g2);
    wait_for("group 2's row to follow", Duration::from_secs(30), || {
        let mut c = Sql::connect(&coord, "citus").ok()?;
        let row = c.one("SELECT nodename || ':' || nodeport FROM pg_dist_node WHERE groupid = 2 AND noderole = 'primary'").ok()?;
        (row == format!("{g2_addr}:{g2_port}")).then_some(())
    });
    assert_eq!(
        pause_state(&t, 1).as_deref(),
        Some("paused"),
        "group 2's handover waited for group 1's pause to end"
    );
    writes_resume(&w, "writes after the candidate never came");
    signal_agent(&t, &frozen, libc::SIGCONT);
    wait_rows_follow_leaders(&t, &[0, 1, 2]);

    // 2. The agent holding the pause crashes (PostgreSQL goes with it: parent-death signal).
    let _frozen = switchover_to_a_frozen_candidate(&t, 1);
    let coordinator_leader = leader(&t, 0).expect("coordinator leader");
    signal_agent(&t, &coordinator_leader, libc::SIGKILL);
    writes_resume(&w, "writes after the coordinator's agent crashed");
    signal_agent(&t, &_frozen, libc::SIGCONT);
    wait_rows_follow_leaders(&t, &[0, 1, 2]);

    // 3. The coordinator primary loses etcd mid-pause: it is fenced; its pause ends with it.
    let frozen = switchover_to_a_frozen_candidate(&t, 1);
    let cut = leader(&t, 0).expect("coordinator leader");
    t.lab
        .partition(&cut, true)
        .expect("cut the coordinator off etcd");
    writes_resume(&w, "writes after the coordinator lost etcd");
    t.lab.heal(&cut).expect("heal");
    signal_agent(&t, &frozen, libc::SIGCONT);
    wait_rows_follow_leaders(&t, &[0, 1, 2]);

    // 4. The coordinator primary's host crashes mid-pause: the other coordinator takes over.
    let frozen = switchover_to_a_frozen_candidate(&t, 1);
    let crashed = leader(&t, 0).expect("coordinator leader");
    t.lab
        .crash(&crashed)
        .expect("crash the coordinator primary's host");
    writes_resume(&w, "writes after the coordinator primary crashed");
    signal_agent(&t, &frozen, libc::SIGCONT);
    wait_rows_follow_leaders(&t, &[0, 1, 2]);
    t.lab.up().expect("reboot");

    let log = w.stop();
    eprintln!(
        "writer across the failure paths: {}",
        citus_client::summarize(&log)
    );
    citus_client::assert_nothing_acknowledged_lost(&coord, "w", &log);
}

/// When a member's agent first logged a line containing every one of `needles` (its
/// timestamp, to the microsecond).
fn agent_logged(t: &TestLab, member: &str, needles: &[&str]) -> Option<std::time::SystemTime> {
    let dir = t.spec.host(member)?.install_dir.clone();
    let text = std::fs::read_to_string(format!("{dir}/agent.log")).ok()?;
    let plain = strip_ansi(&text);
    let line = plain
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))?;
    let stamp = line.split_whitespace().next()?;
    let secs = citus_reconcile::dcs::keys::parse_rfc3339(stamp)?;
    let micros: u64 = stamp
        .split_once('.')
        .map(|(_, f)| f.trim_end_matches('Z'))
        .map(|f| format!("{f:0<6}")[..6].parse().unwrap_or(0))
        .unwrap_or(0);
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_micros(micros))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn pause_on_loss_turns_a_silent_worker_primary_into_a_wait() {
    if !real_citus("pause on loss") {
        return;
    }
    let t = cluster(&lab_spec(
        "citusloss",
        145,
        &[(0, 1), (1, 2), (2, 2)],
        3,
        // Synchronous mode: the host dies without warning, and only a synchronous standby is
        // sure to hold every commit the old primary acknowledged (asynchronously, CI once lost
        // the one insert acknowledged in the milliseconds before the cut).
        "citus: { pause_on_loss: true, pause_timeout: 20 }\nha: { ttl: 10, loop_wait: 2, retry_timeout: 4, synchronous_mode: on }\n",
    ));
    let mut c = coordinator(&t);
    c.exec("CREATE TABLE w (id bigint PRIMARY KEY); SELECT create_distributed_table('w', 'id');")
        .expect("table");
    drop(c);
    let coord = addresses(&t, 0);
    let coordinator_member = leader(&t, 0).expect("coordinator");
    let lost = leader(&t, 1).expect("group 1 leader");
    wait_for(
        "group 1's synchronous standby",
        Duration::from_secs(30),
        || sync_key(&t, 1).filter(|(l, _)| *l == lost),
    );
    let w = Writer::start(&coord, "w", Duration::from_millis(10));
    writes_resume(&w, "the writer to start");

    // The worker primary's host goes silent: cut off first (no reset reaches anyone), then
    // everything on it dies.
    let lost_at = w.t0.elapsed();
    t.lab.partition(&lost, false).expect("cut the host off");
    t.lab.crash(&lost).expect("crash it");
    let new = wait_for("a new leader in group 1", Duration::from_secs(60), || {
        leader(&t, 1).filter(|n| *n != lost)
    });
    wait_rows_follow_leaders(&t, &[0, 1, 2]);
    writes_resume(&w, "writes on the new primary");
    let wall0 = w.wall0;
    let log = w.stop();

    let pausing_at = agent_logged(
        &t,
        &coordinator_member,
        &["pausing the group's writes", "group=1", "Loss"],
    )
    .expect("the coordinator asked to pause group 1 for the loss");
    let paused_at = agent_logged(
        &t,
        &coordinator_member,
        &["paused the group's writes", "group=1", "Loss"],
    )
    .expect("the coordinator paused group 1 for the loss");
    let released_at = agent_logged(
        &t,
        &coordinator_member,
        &["released the group's writes", "group=1"],
    );
    let summary = citus_client::summarize(&log);
    let to_wall = |d: Duration| wall0 + d;
    let failed_after_pause: Vec<&citus_client::Insert> = log
        .iter()
        .filter(|i| !i.ok && to_wall(i.started) >= pausing_at)
        .collect();
    let since = |at: std::time::SystemTime| {
        at.duration_since(to_wall(lost_at))
            .map(|d| d.as_millis() as i64)
            .unwrap_or(-1)
    };
    let last_failure = log.iter().filter(|i| !i.ok).map(|i| i.started).max();
    // Writes are back once an insert that started after the last failure (or after the loss)
    // and went to the lost group succeeded: the first acknowledged insert that waited on the
    // pause (inserts to the other group do not wait) marks it; lacking that, the first one
    // after the last failure.
    let last_failure_end = log
        .iter()
        .filter(|i| !i.ok)
        .map(|i| i.ended)
        .max()
        .unwrap_or(lost_at);
    let back = log
        .iter()
        .filter(|i| i.ok && i.started >= last_failure_end)
        .max_by_key(|i| i.ended - i.started)
        .filter(|i| i.ended - i.started > Duration::from_millis(500))
        .or_else(|| log.iter().find(|i| i.ok && i.started >= last_failure_end))
        .map(|i| i.ended);
    eprintln!(
        "silent loss of {lost} (new leader {new}): {summary}\n  pause requested at +{} ms, held at +{} ms, released at +{} ms, last failed insert started at +{} ms, writes back at +{} ms",
        since(pausing_at),
        since(paused_at),
        released_at.map(since).unwrap_or(-1),
        last_failure
            .map(|d| d.as_millis() as i64 - lost_at.as_millis() as i64)
            .unwrap_or(-1),
        back.map(|d| d.as_millis() as i64 - lost_at.as_millis() as i64)
            .unwrap_or(-1),
    );
    // Once the pause is requested, writes wait for the new primary instead of failing (they
    // queue behind the pause's lock request even before it is granted).
    assert!(
        failed_after_pause.is_empty(),
        "{} inserts started after the pause took hold and failed: {:?}",
        failed_after_pause.len(),
        failed_after_pause.iter().take(3).collect::<Vec<_>>()
    );
    for f in log.iter().filter(|i| !i.ok) {
        eprintln!(
            "  failed insert started +{} ms, ended +{} ms: {}",
            f.started.as_millis() as i64 - lost_at.as_millis() as i64,
            f.ended.as_millis() as i64 - lost_at.as_millis() as i64,
            f.error.as_deref().unwrap_or("")
        );
    }
    citus_client::assert_nothing_acknowledged_lost(&coord, "w", &log);
    t.lab.heal(&lost).expect("heal");
    t.lab.up().expect("reboot");
}

#[test]
fn credentials_rotate_without_a_restart_or_a_failed_query() {
    if !real_citus("credential rotation") {
        return;
    }
    let t = cluster(&lab_spec(
        "citusrot",
        146,
        &[(0, 1), (1, 2), (2, 2)],
        3,
        FAST_HA,
    ));
    let mut c = coordinator(&t);
    c.exec("CREATE TABLE w (id bigint PRIMARY KEY); SELECT create_distributed_table('w', 'id');")
        .expect("table");
    drop(c);
    let coord = addresses(&t, 0);
    let all: Vec<String> = [0, 1, 2]
        .iter()
        .flat_map(|g| members(&t, *g))
        .map(|(m, _, _)| m)
        .collect();
    let pids: Vec<Option<i32>> = all.iter().map(|m| postmaster_pid(&t, m)).collect();
    let leaders: Vec<Option<String>> = [0u64, 1, 2].iter().map(|g| leader(&t, *g)).collect();
    let w = Writer::start(&coord, "w", Duration::from_millis(10));
    writes_resume(&w, "the writer to start");

    let (su, repl) = ("rotated-superuser-pw", "rotated-replication-pw");
    // The plan names what changes and never a value.
    let o = common::cli_with_secrets(&t, &["plan", "--detailed-exitcode"], su, repl);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    for needle in [
        "role postgres: new password",
        "role replicator: new password",
        "new superuser password, replication password, REST API password (values not shown), new passfile",
        "reload the agent (new secrets; PostgreSQL keeps running)",
        "pg_dist_authinfo: ~ (0, postgres) password changed",
    ] {
        assert!(text.contains(needle), "plan lacks {needle:?}:\n{text}");
    }
    for leak in [su, repl, "lab-superuser-pw", "lab-replication-pw"] {
        assert!(!text.contains(leak), "plan shows a secret:\n{text}");
    }
    assert!(
        !text.contains("pg_dist_node: +"),
        "the plan takes existing rows for missing:\n{text}"
    );

    let o = common::cli_with_secrets(&t, &["apply", "--auto-approve"], su, repl);
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    for leak in [su, repl] {
        assert!(!text.contains(leak), "apply shows a secret:\n{text}");
    }
    let o = common::cli_with_secrets(&t, &["plan", "--detailed-exitcode"], su, repl);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));

    // No restart, no failover: the same postmasters, the same leaders, replicas streaming.
    let after: Vec<Option<i32>> = all.iter().map(|m| postmaster_pid(&t, m)).collect();
    assert_eq!(pids, after, "PostgreSQL restarted");
    let now: Vec<Option<String>> = [0u64, 1, 2].iter().map(|g| leader(&t, *g)).collect();
    assert_eq!(leaders, now, "leadership moved");
    wait_secondaries_streaming(&t);

    // New logins take the new password only; every node's pg_dist_authinfo row carries it, and
    // every node reaches every other with it (new connections).
    citus_client::set_password(&t, su);
    let mut c = coordinator(&t);
    let old = Sql::connect_with(
        &citus_client::conninfo(&coord, "citus", "").replace(su, "lab-superuser-pw"),
    );
    assert!(old.is_err(), "the old password still logs in");
    for l in now.iter().flatten() {
        let addr = address_of(&t, l);
        let mut n = Sql::connect(std::slice::from_ref(&addr), "citus").expect("login");
        let row = n
            .one("SELECT authinfo FROM pg_dist_authinfo WHERE nodeid = 0 AND rolename = 'postgres'")
            .expect("authinfo row");
        assert_eq!(row, format!("password={su}"), "{l}");
    }
    let bad = c
        .strings("SELECT from_nodename || ' -> ' || to_nodename FROM citus_check_cluster_node_health() WHERE result IS NOT TRUE")
        .expect("health");
    assert!(bad.is_empty(), "{bad:?}");

    let log = w.stop();
    let summary = citus_client::summarize(&log);
    eprintln!("writer through the coordinator during the rotation: {summary}");
    assert_eq!(summary.failed, 0, "{summary}");
    citus_client::assert_nothing_acknowledged_lost(&coord, "w", &log);

    // Drift: group 1's authinfo row edited by hand shows in the plan; apply has the primary's
    // agent set it again (a reload), nothing restarts.
    let g1 = now[1].clone().expect("group 1 leader");
    let mut n = Sql::connect(&[address_of(&t, &g1)], "citus").expect("login");
    n.exec("UPDATE pg_dist_authinfo SET authinfo = 'password=edited-by-hand' WHERE nodeid = 0 AND rolename = 'postgres'")
        .expect("edit authinfo");
    let o = common::cli_with_secrets(&t, &["plan", "--detailed-exitcode"], su, repl);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(
        text.contains("pg_dist_authinfo: ~ (0, postgres) password changed"),
        "{text}"
    );
    assert!(
        text.contains("it sets roles and pg_dist_authinfo again"),
        "{text}"
    );
    assert!(!text.contains("edited-by-hand"), "{text}");
    let o = common::cli_with_secrets(&t, &["apply", "--auto-approve"], su, repl);
    assert!(o.status.success(), "{}", output_text(&o));
    let o = common::cli_with_secrets(&t, &["plan", "--detailed-exitcode"], su, repl);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let row = n
        .one("SELECT authinfo FROM pg_dist_authinfo WHERE nodeid = 0 AND rolename = 'postgres'")
        .expect("authinfo row");
    assert_eq!(row, format!("password={su}"));
    let again: Vec<Option<i32>> = all.iter().map(|m| postmaster_pid(&t, m)).collect();
    assert_eq!(pids, again, "PostgreSQL restarted");
}

/// Every replica streams (as `status` reports it).
fn wait_secondaries_streaming(t: &TestLab) {
    wait_for("every replica to stream", Duration::from_secs(60), || {
        let s = status(t);
        let members = s["members"].as_array()?;
        members
            .iter()
            .filter(|m| m["role"] == "Replica")
            .all(|m| m["state"] == "streaming")
            .then_some(())
    });
}

/// Transactions PgBouncer at `addr` has carried for the `citus` database (its admin
/// console's `SHOW STATS`), or None when it does not answer.
fn pgbouncer_transactions(addr: &str, port: u16) -> Option<u64> {
    let out = std::process::Command::new("psql")
        .args([
            "-XAt",
            "-F",
            ",",
            "-c",
            "SHOW STATS",
            &format!(
                "host={addr} port={port} user=postgres dbname=pgbouncer sslmode=require connect_timeout=3"
            ),
        ])
        .env("PGPASSWORD", "lab-superuser-pw")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split(',');
        (f.next() == Some("citus")).then(|| f.next()?.parse().ok())?
    })
}

/// Every primary's pg_dist_poolinfo, as `nodeid poolinfo` lines, from the coordinator.
fn poolinfo_rows(c: &mut Sql) -> Vec<String> {
    c.strings("SELECT nodeid || ' ' || poolinfo FROM pg_dist_poolinfo ORDER BY nodeid")
        .unwrap_or_default()
}

#[test]
fn a_pgbouncer_before_each_worker_carries_citus_traffic_across_a_failover() {
    if !real_citus("PgBouncer in front of the workers") {
        return;
    }
    if std::process::Command::new("pgbouncer")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("pgbouncer is not installed (.ci/setup installs it)");
    }
    let spec = lab_spec(
        "cituspool",
        160,
        &[(0, 1), (1, 2)],
        1,
        &format!("citus: {{ pooler: {{ port: 6432 }} }}\n{FAST_HA}"),
    );
    let t = cluster(&spec);
    let plan = cli(&t, &["plan"]);
    let first = leader(&t, 1).expect("group 1 leader");
    let mut c = coordinator(&t);
    // The worker's row has its pool row; the coordinator's has none.
    let worker_row = wait_for(
        "the worker's pg_dist_poolinfo row on the coordinator",
        Duration::from_secs(30),
        || {
            let rows = poolinfo_rows(&mut c);
            (rows.len() == 1 && rows[0].ends_with(" port=6432")).then(|| rows[0].clone())
        },
    );
    c.exec(
        "CREATE TABLE pooled (id bigint PRIMARY KEY, v text);
         SELECT create_distributed_table('pooled', 'id');
         INSERT INTO pooled SELECT g, 'x' FROM generate_series(1000001, 1000200) g;",
    )
    .expect("a distributed table through the coordinator");
    let (first_addr, _) = address_of(&t, &first);
    let carried = wait_for(
        "the leader's PgBouncer to carry Citus's transactions",
        Duration::from_secs(30),
        || pgbouncer_transactions(&first_addr, 6432).filter(|n| *n > 0),
    );
    drop(c);

    // The group's primary host crashes under a writer: its row moves to the other member,
    // whose PgBouncer already runs; the pool row stays as it is.
    let coord = addresses(&t, 0);
    let w = Writer::start(&coord, "pooled", Duration::from_millis(10));
    std::thread::sleep(Duration::from_secs(1));
    t.lab.crash(&first).expect("crash group 1's primary host");
    let second = wait_for("a new group 1 leader", Duration::from_secs(60), || {
        leader(&t, 1).filter(|l| *l != first)
    });
    wait_rows_follow_leaders(&t, &[1]);
    writes_resume(&w, "writes through the coordinator after the failover");
    let log = w.stop();
    let summary = citus_client::summarize(&log);
    eprintln!("writer through the coordinator and PgBouncer, failover of group 1: {summary}");
    citus_client::assert_nothing_acknowledged_lost(&coord, "pooled", &log);
    let mut c = coordinator(&t);
    assert_eq!(
        poolinfo_rows(&mut c),
        vec![worker_row.clone()],
        "the pool row changed with the failover"
    );
    let (second_addr, _) = address_of(&t, &second);
    let after = pgbouncer_transactions(&second_addr, 6432).unwrap_or(0);
    assert!(
        after > 0,
        "the new primary's PgBouncer carried nothing after the failover"
    );
    eprintln!(
        "PgBouncer transactions: {carried} on {first} before its crash, {after} on {second} after"
    );
    assert_eq!(
        c.one("SELECT count(*) FROM pooled WHERE id > 1000000")
            .expect("count"),
        "200"
    );
    drop(c);

    // The pooler leaves the spec: PgBouncer stops and the rows go, PostgreSQL keeps running
    // (no leader changes).
    t.lab.up().expect("the crashed host back");
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let without = spec.replace("citus: { pooler: { port: 6432 } }\n", "");
    std::fs::write(&t.spec_path, &without).expect("rewrite the spec");
    let o = cli(&t, &["plan"]);
    let text = output_text(&o);
    assert!(
        text.contains("citus.pooler changed") && text.contains("pg_dist_poolinfo: - "),
        "{text}"
    );
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let mut c = coordinator(&t);
    wait_for("pg_dist_poolinfo emptied", Duration::from_secs(30), || {
        poolinfo_rows(&mut c).is_empty().then_some(())
    });
    wait_for("PgBouncer stopped", Duration::from_secs(30), || {
        pgbouncer_transactions(&second_addr, 6432)
            .is_none()
            .then_some(())
    });
    assert_eq!(
        leader(&t, 1).as_deref(),
        Some(second.as_str()),
        "a pooler change moved leadership"
    );
    c.exec("INSERT INTO pooled VALUES (2000000, 'direct')")
        .expect("a write through the coordinator without the pooler");
    eprintln!("plan with the pooler:\n{}", output_text(&plan));
}
