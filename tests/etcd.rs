//! Lab test of a managed etcd (`etcd.members`): `apply` forms a three-member etcd from
//! nothing on hosts of their own, then replaces one member (added before the old one goes,
//! one at a time) while a database group fails over; no two primaries, nothing
//! acknowledged lost (synchronous mode). Then a dead member is replaced (removed first: etcd
//! adds none while a voter is down), then two members' hosts crash (quorum lost) and apply
//! starts them again before it can take its lock; the lab leaves no etcd folder behind.

mod common;

use std::time::Duration;

use common::prober::{self, Prober};
use common::*;

const SUBNET: u8 = 163;

/// A coordinator group of two on a managed etcd whose members sit on `.{octet}` hosts.
fn spec(etcd_octets: &[u8]) -> String {
    let members: String = etcd_octets
        .iter()
        .map(|o| format!("    - {{ name: e{o}, address: 10.213.{SUBNET}.{o} }}\n"))
        .collect();
    lab_spec(
        "mgdetcd",
        SUBNET,
        &[(0, 2)],
        0,
        "ha: { ttl: 10, loop_wait: 1, retry_timeout: 3, synchronous_mode: on }\n",
    )
    .replacen("  endpoints: []\n", &format!("  members:\n{members}"), 1)
}

fn member_names(t: &TestLab) -> Vec<String> {
    let out = etcdctl(t, &["member", "list", "-w", "simple"]).unwrap_or_default();
    // id, status, name, peer URLs, client URLs, learner
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(", ").nth(2).map(str::to_string))
        .collect();
    names.sort();
    names
}

/// The lab of the spec the test wrote last (the new members' hosts).
fn lab_of(t: &TestLab) -> citus_reconcile::lab::Lab {
    let spec = citus_reconcile::spec::load_file(
        &t.spec_path,
        citus_reconcile::spec::LoadOptions {
            resolve_secrets: true,
            resolve_etcd_secret: true,
        },
    )
    .spec
    .expect("the new spec loads");
    citus_reconcile::lab::Lab::new(&spec).expect("the new lab")
}

#[test]
fn a_managed_etcd_is_formed_then_a_member_replaced_while_a_group_fails_over() {
    if !lab_available("managed etcd") {
        return;
    }
    set_lab_secrets();
    let first = spec(&[2, 3, 4]);
    assert!(first.contains("members:"), "{first}");
    let t = TestLab::up(&first);

    // 1. From nothing: etcd installed nowhere by the lab, formed by apply.
    assert!(
        etcdctl(&t, &["endpoint", "health"]).is_none(),
        "the lab must not run a managed etcd itself"
    );
    let o = cli(&t, &["apply", "--auto-approve"]);
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("a new etcd cluster of e2, e3, e4"), "{text}");
    assert_eq!(member_names(&t), ["e2", "e3", "e4"]);
    let old_leader = wait_for("a leader", Duration::from_secs(60), || leader(&t, 0));
    let s = status(&t);
    let healthy = s["etcd"]
        .as_array()
        .map(|e| e.iter().filter(|x| x["error"].is_null()).count())
        .unwrap_or(0);
    assert_eq!(healthy, 3, "status: {s}");
    let o = cli(&t, &["plan"]);
    assert!(
        output_text(&o).contains("No changes"),
        "{}",
        output_text(&o)
    );

    // 2. e4 is replaced by e5; meanwhile the group's leader host crashes.
    let second = spec(&[2, 3, 5]);
    std::fs::write(&t.spec_path, &second).expect("write the new spec");
    let shape = t.spec.clone();
    let lab2 = lab_of(&t);
    lab2.up().expect("the new etcd member's host");
    let p = Prober::start(&members(&t, 0), Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(2));
    let apply = {
        let spec_path = t.spec_path.clone();
        std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_citus-reconcile"))
                .args(["apply", "--auto-approve", "--allow-destroy"])
                .arg(&spec_path)
                .output()
                .expect("apply runs")
        })
    };
    wait_for("e5 to be added", Duration::from_secs(90), || {
        member_names(&t).contains(&"e5".to_string()).then_some(())
    });
    t.lab.crash(&old_leader).expect("crash the leader's host");
    let new = wait_for("a new leader", Duration::from_secs(60), || {
        leader(&t, 0).filter(|l| *l != old_leader)
    });
    wait_for("writes on the new leader", Duration::from_secs(30), || {
        p.log
            .lock()
            .ok()?
            .iter()
            .any(|a| a.ok && a.member == new)
            .then_some(())
    });
    // The first apply may stop at the crashed host; the host reboots and apply finishes.
    let first_apply = apply.join().expect("apply thread");
    eprintln!("apply during the crash:\n{}", output_text(&first_apply));
    t.lab.up().expect("the crashed host reboots");
    // apply starts the rebooted member's agent; the new leader's restart (its etcd endpoints
    // changed) waits until that member streams again, so apply may have to run twice, as an
    // operator would be told.
    let mut outputs = Vec::new();
    let finished = (0..3).any(|_| {
        let o = cli(&t, &["apply", "--auto-approve", "--allow-destroy"]);
        outputs.push(output_text(&o));
        if o.status.success() {
            return true;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let s = status(&t);
            let streaming = s["members"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|x| x["member"] == old_leader.as_str() && x["state"] == "streaming")
            });
            if streaming {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    });
    assert!(
        finished,
        "apply never finished:\n{}",
        outputs.join("\n---\n")
    );
    assert_eq!(member_names(&t), ["e2", "e3", "e5"]);
    let log = p.stop();
    prober::assert_no_split_brain(&log);
    let acked = prober::acknowledged(&log);
    let final_leader = wait_for("a leader at the end", Duration::from_secs(60), || {
        leader(&t, 0)
    });
    let address = t
        .spec
        .host(&final_leader)
        .map(|h| h.address.clone())
        .unwrap_or_default();
    let mut c = wait_for(
        "a connection to the leader",
        Duration::from_secs(30),
        || prober::postgres_sync::Client::connect(&address, 5432),
    );
    let present: std::collections::BTreeSet<i64> = c
        .query_ids("SELECT id FROM probe")
        .expect("read probe")
        .into_iter()
        .collect();
    let lost: Vec<&i64> = acked.iter().filter(|id| !present.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost",
        lost.len(),
        acked.len()
    );
    eprintln!(
        "managed etcd: e4 replaced by e5; {} writes acknowledged, none lost; leader {old_leader} -> {new} -> {final_leader}",
        acked.len()
    );
    let o = cli(&t, &["plan"]);
    assert!(
        output_text(&o).contains("No changes"),
        "{}",
        output_text(&o)
    );

    // 3. A dead member replaced: e3's host crashes (its etcd with it), and the spec swaps it
    // for e6. etcd adds no member while a voter is down, so apply removes e3 first.
    t.lab
        .crash(&format!("10.213.{SUBNET}.3"))
        .expect("crash e3's host");
    let third = spec(&[2, 5, 6]);
    std::fs::write(&t.spec_path, &third).expect("write the third spec");
    let lab3 = lab_of(&t);
    lab3.up().expect("e6's host");
    let o = cli(&t, &["plan"]);
    let text = output_text(&o);
    let dead_first = text.find("remove etcd member e3");
    let add = text.find("add etcd member e6");
    assert!(
        dead_first.is_some()
            && add.is_some()
            && dead_first < add
            && text.contains("does not answer"),
        "the dead member is not removed first:\n{text}"
    );
    let o = cli(&t, &["apply", "--auto-approve", "--allow-destroy"]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(member_names(&t), ["e2", "e5", "e6"]);
    let o = cli(&t, &["plan"]);
    assert!(
        output_text(&o).contains("No changes"),
        "{}",
        output_text(&o)
    );

    // 4. Quorum lost: two of the three members' hosts crash and come back without etcd (as
    // after a reboot with `agent.service: process`). The apply lock lives in etcd, so apply
    // starts the members first, then takes it.
    t.lab
        .crash(&format!("10.213.{SUBNET}.2"))
        .expect("crash e2's host");
    lab2.crash(&format!("10.213.{SUBNET}.5"))
        .expect("crash e5's host");
    t.lab.up().expect("e2's host reboots");
    lab2.up().expect("e5's host reboots");
    assert!(
        etcdctl(&t, &["endpoint", "health"]).is_none(),
        "etcd still answers without a quorum"
    );
    let o = cli(&t, &["apply", "--auto-approve"]);
    let text = output_text(&o);
    assert!(
        o.status.success()
            && text.contains("start etcd member e2")
            && text.contains("start etcd member e5"),
        "apply did not start the members of an etcd without quorum:\n{text}"
    );
    assert_eq!(member_names(&t), ["e2", "e5", "e6"]);
    wait_for(
        "a leader after the quorum came back",
        Duration::from_secs(60),
        || leader(&t, 0),
    );
    let o = cli(&t, &["plan"]);
    assert!(
        output_text(&o).contains("No changes"),
        "{}",
        output_text(&o)
    );

    // 5. Nothing left behind: the removed members' folders included.
    drop(lab3);
    drop(lab2);
    let dirs: Vec<String> = shape.etcd.members.iter().map(|m| m.dir.clone()).collect();
    drop(t);
    let later = ["e5", "e6"].map(|m| format!("/var/lib/citus-reconcile/etcd/mgdetcd-{m}"));
    for d in dirs.iter().chain(later.iter()) {
        assert!(!std::path::Path::new(d).exists(), "{d} left behind");
    }
}
