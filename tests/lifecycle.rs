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
    let mut c = coordinator(&t);
    c.exec(
        "CREATE TABLE events (k bigint, payload text);
         SELECT create_distributed_table('events', 'k');
         INSERT INTO events SELECT g % 1000, md5(g::text) FROM generate_series(1, 100000) g;",
    )
    .expect("a table without a primary key");
    drop(c);
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
