//! The life of a cluster from Git, on the real extension, with a client writing through the
//! coordinator the whole time: a worker group joins (registered, then shards spread onto it,
//! with a switchover of a source group in the middle of a move), then leaves (drained with
//! writes blocked per shard because a table has no replica identity; refused without
//! `--allow-destroy`; interrupted and continued). No row is lost; failed queries and the
//! longest wait are reported.

mod common;

use std::time::Duration;

use common::citus_client::{
    self, Sql, Writer, address_of, addresses, coordinator, real_citus, wait_rows_follow_leaders,
    writes_resume,
};
use common::{TestLab, cli, lab_spec, leader, members, output_text, set_lab_secrets, wait_for};

const EXTRA: &str = "citus: { rebalance: true }\nha: { ttl: 5, loop_wait: 1, retry_timeout: 2 }\n";

/// Shards of distributed tables on each worker group.
fn shards_per_group(t: &TestLab) -> Vec<(u32, u32)> {
    let mut c = coordinator(t);
    c.strings(
        "SELECT p.groupid || ':' || count(*) FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid)
           JOIN pg_dist_partition d USING (logicalrelid) WHERE d.partmethod <> 'n' GROUP BY p.groupid ORDER BY p.groupid",
    )
    .expect("placements")
    .iter()
    .filter_map(|l| {
        let (g, n) = l.split_once(':')?;
        Some((g.parse().ok()?, n.parse().ok()?))
    })
    .collect()
}

fn count(t: &TestLab, table: &str) -> String {
    coordinator(t)
        .one(&format!("SELECT count(*) FROM {table}"))
        .expect("count")
}

fn write_spec(t: &TestLab, text: &str) {
    std::fs::write(&t.spec_path, text).expect("write the spec");
}

#[test]
fn a_worker_group_joins_online_then_leaves_drained() {
    if !real_citus("group lifecycle") {
        return;
    }
    set_lab_secrets();
    let three = [(0, 1), (1, 2), (2, 2), (3, 2)];
    let full = lab_spec("lifecyc", 147, &three, 3, EXTRA);
    let small = lab_spec("lifecyc", 147, &three[..3], 3, EXTRA);
    // The lab has the hosts of both specs; the cluster starts with the smaller one.
    let t = TestLab::up(&full);
    write_spec(&t, &small);
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", output_text(&o));

    let mut c = coordinator(&t);
    c.exec(
        "CREATE TABLE big (id bigint PRIMARY KEY, payload text);
         SELECT create_distributed_table('big', 'id');
         INSERT INTO big SELECT g, repeat(md5(g::text), 5) FROM generate_series(1, 400000) g;
         CREATE TABLE w (id bigint PRIMARY KEY);
         SELECT create_distributed_table('w', 'id');",
    )
    .expect("tables and data");
    drop(c);
    let big = count(&t, "big");
    let coord = addresses(&t, 0);
    let writer = Writer::start(&coord, "w", Duration::from_millis(10));
    writes_resume(&writer, "the writer to start");

    // 1. A worker group joins.
    write_spec(&t, &full);
    let o = cli(&t, &["plan"]);
    let plan = output_text(&o);
    for needle in [
        "group 3: initialize",
        "pg_dist_node: + group 3 primary (at its leader, once elected)",
        "rebalance shards once group 3 is registered (citus_rebalance_start, shard_transfer_mode => force_logical: online",
    ] {
        assert!(plan.contains(needle), "plan lacks {needle:?}:\n{plan}");
    }
    let apply = {
        let spec = t.spec_path.clone();
        std::thread::spawn(move || {
            assert_cmd::Command::cargo_bin("citus-reconcile")
                .expect("binary")
                .args(["apply", "--auto-approve"])
                .arg(spec)
                .env("CR_LAB_SUPERUSER", "lab-superuser-pw")
                .env("CR_LAB_REPLICATION", "lab-replication-pw")
                .timeout(Duration::from_secs(600))
                .output()
                .expect("apply runs")
        })
    };
    // In the middle of a move off group 1, group 1 switches over.
    let source = leader(&t, 1).expect("group 1 leader");
    let (source_addr, source_port) = address_of(&t, &source);
    wait_for("a shard move off group 1", Duration::from_secs(300), || {
        let mut c = Sql::connect(&coord, "citus").ok()?;
        let moving = c
            .strings("SELECT t->'hosts'->>'source' FROM citus_rebalance_status() s, jsonb_array_elements(s.details->'tasks') t WHERE t->>'state' = 'running'")
            .ok()?;
        moving
            .iter()
            .any(|h| *h == format!("{source_addr}:{source_port}"))
            .then_some(())
    });
    let o = cli(&t, &["switchover", "--group", "1", "--force"]);
    assert!(
        o.status.success(),
        "switchover mid-move: {}",
        output_text(&o)
    );
    let o = apply.join().expect("apply thread");
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("rebalance job"), "{text}");
    let spread = shards_per_group(&t);
    assert!(
        [1, 2, 3]
            .iter()
            .all(|g| spread.iter().any(|(x, n)| x == g && *n > 0)),
        "shards not spread over every group: {spread:?}"
    );
    assert_eq!(count(&t, "big"), big, "rows lost or doubled by the moves");
    // Nothing left behind by the interrupted move: no logical slot on any member, no cleanup
    // record (Citus's deferred cleanup takes a few seconds).
    for g in 1..=3 {
        for (m, a, p) in members(&t, g) {
            wait_for(
                &format!("no logical slot left on {m}"),
                Duration::from_secs(90),
                || {
                    let mut s = Sql::connect_any(&(a.clone(), p), "citus").ok()?;
                    (s.one("SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'")
                        .ok()?
                        == "0")
                        .then_some(())
                },
            );
        }
    }
    wait_for("pg_dist_cleanup to empty", Duration::from_secs(120), || {
        (coordinator(&t)
            .one("SELECT count(*) FROM pg_dist_cleanup")
            .ok()?
            == "0")
            .then_some(())
    });

    // 2. It leaves again; meanwhile a table without a primary key has arrived.
    // Set-up, not what is tested: one batch (a single implicit transaction, so a failed try
    // leaves nothing behind), tried again when Citus could not connect to a worker within
    // its 5 s connection timeout — CI failed once that way while the other lifecycle test
    // loaded the machine.
    let mut tries = 0;
    loop {
        tries += 1;
        let r = coordinator(&t).exec(
            "CREATE TABLE events (k bigint, payload text);
             SELECT create_distributed_table('events', 'k');
             INSERT INTO events SELECT g % 1000, md5(g::text) FROM generate_series(1, 100000) g;",
        );
        match r {
            Ok(()) => break,
            Err(e) if tries < 3 && e.contains("could not establish any connections") => {
                eprintln!("creating the table without a primary key, try {tries}: {e}");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => panic!("a table without a primary key: {e}"),
        }
    }
    let events = count(&t, "events");
    write_spec(&t, &small);
    let o = cli(&t, &["plan"]);
    let plan = output_text(&o);
    assert!(
        plan.contains("group 3: move its") && plan.contains("shard_transfer_mode => block_writes"),
        "{plan}"
    );
    // Refused without --allow-destroy, saying why; nothing touched.
    let o = cli(&t, &["apply", "--auto-approve"]);
    let text = output_text(&o);
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("needs --allow-destroy"), "{text}");
    assert!(shards_per_group(&t).iter().any(|(g, n)| *g == 3 && *n > 0));
    // Interrupted: the drain runs on; the group stays registered and serving.
    let o = cli(
        &t,
        &[
            "apply",
            "--auto-approve",
            "--allow-destroy",
            "--timeout",
            "2",
        ],
    );
    let text = output_text(&o);
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("carries on on the coordinator"), "{text}");
    let mut c = coordinator(&t);
    assert_eq!(
        c.one("SELECT count(*) FROM pg_dist_node WHERE groupid = 3")
            .expect("rows"),
        "1"
    );
    assert_eq!(count(&t, "events"), events);
    // The next apply continues.
    let o = cli(&t, &["apply", "--auto-approve", "--allow-destroy"]);
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    let mut c = coordinator(&t);
    assert_eq!(
        c.one("SELECT count(*) FROM pg_dist_node WHERE groupid = 3")
            .expect("rows"),
        "0"
    );
    assert_eq!(count(&t, "big"), big);
    assert_eq!(count(&t, "events"), events);
    // Its members' data directories are set aside, not deleted.
    let full_spec = citus_reconcile::spec::load_file(
        &{
            let p = t.dir.path().join("full.yaml");
            std::fs::write(&p, &full).expect("write");
            p
        },
        citus_reconcile::spec::LoadOptions::default(),
    )
    .spec
    .expect("full spec");
    for h in full_spec
        .group(3)
        .map(|g| g.hosts.clone())
        .unwrap_or_default()
    {
        let dir = std::path::Path::new(&h.data_dir);
        assert!(!dir.exists(), "{} still in place", h.data_dir);
        let name = format!(
            "{}.removed-",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("")
        );
        let aside = std::fs::read_dir(dir.parent().expect("parent"))
            .expect("list")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .any(|f| f.starts_with(&name));
        assert!(aside, "{}: no directory set aside", h.data_dir);
    }

    wait_rows_follow_leaders(&t, &[0, 1, 2]);
    let log = writer.stop();
    let summary = citus_client::summarize(&log);
    eprintln!("writer through the coordinator, group joined and left: {summary}");
    assert_eq!(summary.failed, 0, "{summary}");
    citus_client::assert_nothing_acknowledged_lost(&coord, "w", &log);
}

/// Timeline of each member of a group, from `status`.
fn timelines(t: &TestLab, group: u64) -> Vec<(String, u64)> {
    common::status(t)["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter(|m| m["group"] == group)
                .filter_map(|m| Some((m["member"].as_str()?.to_string(), m["timeline"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn configuration_and_agent_upgrades_roll_without_a_failover() {
    if !real_citus("rolling changes") {
        return;
    }
    set_lab_secrets();
    let groups = [(0, 2), (1, 2)];
    let before = lab_spec("rolling", 148, &groups, 3, EXTRA);
    let t = common::cluster(&before);
    let mut c = coordinator(&t);
    c.exec("CREATE TABLE w (id bigint PRIMARY KEY); SELECT create_distributed_table('w', 'id');")
        .expect("table");
    drop(c);
    let leaders: Vec<String> = [0, 1]
        .iter()
        .map(|g| leader(&t, *g).expect("leader"))
        .collect();
    let tl_before: Vec<u64> = [0, 1]
        .iter()
        .map(|g| {
            timelines(&t, *g)
                .iter()
                .map(|(_, tl)| *tl)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let coord = addresses(&t, 0);
    let writer = Writer::start(&coord, "w", Duration::from_millis(10));
    writes_resume(&writer, "the writer to start");

    // Failed inserts per phase, reported (the coordinator's own handover makes clients
    // reconnect; a primary restarted in place fails its group's writes for the restart).
    let phase = |w: &Writer, from: usize, what: &str| -> usize {
        let log = w.snapshot();
        let s = citus_client::summarize(&log[from.min(log.len())..]);
        eprintln!("writer through the coordinator, {what}: {s}");
        log.len()
    };
    let mark = writer.snapshot().len();
    // A parameter a reload takes: reloaded, nothing restarts.
    let pids: Vec<Option<i32>> = [0, 1]
        .iter()
        .flat_map(|g| members(&t, *g))
        .map(|(m, _, _)| common::agent_pid(&t, &m))
        .collect();
    let reload = before.replace(
        "shared_buffers: 16MB",
        "shared_buffers: 16MB, work_mem: 8MB",
    );
    assert_ne!(reload, before);
    write_spec(&t, &reload);
    let o = cli(&t, &["plan"]);
    let plan = output_text(&o);
    assert!(
        plan.contains("reload: work_mem (PostgreSQL takes them with a reload; nothing restarts)"),
        "{plan}"
    );
    let o = cli(&t, &["apply", "--auto-approve"]);
    assert!(o.status.success(), "{}", output_text(&o));
    for g in [0, 1] {
        for (m, a, p) in members(&t, g) {
            let got = wait_for(&format!("work_mem on {m}"), Duration::from_secs(30), || {
                let v = Sql::connect_any(&(a.clone(), p), "citus")
                    .ok()?
                    .one("SHOW work_mem")
                    .ok()?;
                (v == "8MB").then_some(v)
            });
            assert_eq!(got, "8MB");
        }
    }
    let after_reload: Vec<Option<i32>> = [0, 1]
        .iter()
        .flat_map(|g| members(&t, *g))
        .map(|(m, _, _)| common::agent_pid(&t, &m))
        .collect();
    assert_eq!(pids, after_reload, "a reload restarts no agent");
    let o = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let before = reload;
    let mark = phase(&writer, mark, "reload of work_mem");

    // A parameter that needs a restart, and a new agent binary (the same program with other
    // bytes: a new checksum), in one commit.
    let after = before.replace("max_connections: 50", "max_connections: 60");
    assert_ne!(after, before);
    write_spec(&t, &after);
    let upgraded = t.dir.path().join("citus-reconcile-next");
    let mut bytes =
        std::fs::read(assert_cmd::cargo::cargo_bin("citus-reconcile")).expect("read the binary");
    bytes.extend_from_slice(b"\nnext build\n");
    std::fs::write(&upgraded, bytes).expect("write the upgraded binary");
    let upgraded = upgraded.to_string_lossy().to_string();
    let o = cli(&t, &["plan", "--agent-binary", &upgraded]);
    let plan = output_text(&o);
    for g in [0, 1] {
        assert!(
            plan.contains(&format!(
                "restart the agent (new binary and configuration); leads group {g}: last, after a switchover to a streaming replica"
            )),
            "{plan}"
        );
    }
    assert!(plan.contains("rolling: one member at a time"), "{plan}");
    let o = cli(
        &t,
        &["apply", "--auto-approve", "--agent-binary", &upgraded],
    );
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    for (g, old) in leaders.iter().enumerate() {
        assert!(
            text.contains(&format!("switchover of group {g} to ")),
            "{text}"
        );
        let now = leader(&t, g as u64).expect("a leader");
        assert_ne!(
            &now, old,
            "group {g}: the leader hands over before its restart"
        );
        // One promotion per group: the planned switchover, no failover on top of it.
        let tls = timelines(&t, g as u64);
        assert!(
            tls.iter().all(|(_, tl)| *tl == tl_before[g] + 1),
            "group {g}: timelines {tls:?}, before {}",
            tl_before[g]
        );
    }
    for g in [0, 1] {
        for (m, a, p) in members(&t, g) {
            let got = wait_for(&format!("{m} up"), Duration::from_secs(60), || {
                Sql::connect_any(&(a.clone(), p), "citus")
                    .ok()?
                    .one("SHOW max_connections")
                    .ok()
            });
            assert_eq!(got, "60", "{m}");
        }
    }
    // Every agent runs what its file says: nothing left to do.
    let o = cli(
        &t,
        &["plan", "--detailed-exitcode", "--agent-binary", &upgraded],
    );
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));

    let mark = phase(
        &writer,
        mark,
        "rolling restart for max_connections and a new agent binary",
    );

    // Lowering it again: standbys need at least the primary's value, so each primary
    // restarts first, in place — still no promotion anywhere.
    let leaders: Vec<String> = [0, 1]
        .iter()
        .map(|g| leader(&t, *g).expect("leader"))
        .collect();
    let tl_before: Vec<u64> = [0, 1]
        .iter()
        .map(|g| {
            timelines(&t, *g)
                .iter()
                .map(|(_, tl)| *tl)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let lower = before.replace("max_connections: 50", "max_connections: 45");
    write_spec(&t, &lower);
    let o = cli(&t, &["plan", "--agent-binary", &upgraded]);
    let plan = output_text(&o);
    assert!(
        plan.contains(
            "lowers max_connections 60 → 45, max_prepared_transactions 120 → 90, which standbys need at least as high as the primary"
        ),
        "{plan}"
    );
    let o = cli(
        &t,
        &["apply", "--auto-approve", "--agent-binary", &upgraded],
    );
    let text = output_text(&o);
    assert!(o.status.success(), "{text}\n{}", common::agent_logs(&t, 25));
    for (g, old) in leaders.iter().enumerate() {
        let now = wait_for("a leader", Duration::from_secs(60), || leader(&t, g as u64));
        assert_eq!(&now, old, "group {g}: the primary restarts in place");
        let tls = wait_for("every member back", Duration::from_secs(60), || {
            let tls = timelines(&t, g as u64);
            (tls.len() == 2).then_some(tls)
        });
        assert!(
            tls.iter().all(|(_, tl)| *tl == tl_before[g]),
            "group {g}: timelines {tls:?}, before {}",
            tl_before[g]
        );
        for (m, a, p) in members(&t, g as u32) {
            let got = wait_for(&format!("{m} up"), Duration::from_secs(60), || {
                Sql::connect_any(&(a.clone(), p), "citus")
                    .ok()?
                    .one("SHOW max_connections")
                    .ok()
            });
            assert_eq!(got, "45", "{m}");
        }
    }

    phase(
        &writer,
        mark,
        "lowering max_connections (primaries restarted in place)",
    );
    wait_rows_follow_leaders(&t, &[0, 1]);
    let log = writer.stop();
    let summary = citus_client::summarize(&log);
    eprintln!("writer through the coordinator, whole test: {summary}");
    citus_client::assert_nothing_acknowledged_lost(&coord, "w", &log);
}
