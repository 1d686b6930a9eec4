//! What a client writing through the coordinator sees (needs root, the lab and real Citus):
//! the seed's experiment. A distributed table, one client inserting every 10 ms through the
//! coordinator (autocommit, reconnecting after an error); `switchover --group 1` repeated;
//! then the worker leader's host going silent (cut off, then crashed) at ttl 10. Printed for
//! the write pauses on (`pause_on_switchover`, `pause_on_loss`) and, as the baseline in the
//! same run, off. Run: `cargo bench --bench citus`. Prints numbers; asserts nothing about them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::citus_client::{Insert, Sql, Writer};
use common::{TestLab, cli, cluster, lab_spec, leader, members, wait_for};

const SWITCHOVERS: usize = 6;
const CRASHES: usize = 3;

fn coordinators(t: &TestLab) -> Vec<(String, u16)> {
    members(t, 0).into_iter().map(|(_, a, p)| (a, p)).collect()
}

/// Inserts that started in `[from, to)`.
fn window(log: &[Insert], from: Duration, to: Duration) -> Vec<&Insert> {
    log.iter()
        .filter(|i| i.started >= from && i.started < to)
        .collect()
}

/// Longest time between two acknowledged inserts among `inserts` (or, for an insert that
/// waited, from its start to its end).
fn longest_gap(inserts: &[&Insert]) -> Duration {
    let mut gap = Duration::ZERO;
    let mut last: Option<Duration> = None;
    for i in inserts.iter().filter(|i| i.ok) {
        if let Some(l) = last {
            gap = gap.max(i.ended.saturating_sub(l));
        }
        gap = gap.max(i.ended - i.started);
        last = Some(i.ended);
    }
    gap
}

/// The end of the last insert, among those that started after `at`, that failed or waited
/// (took over 300 ms): from then on writes flow.
fn stalled_until(log: &[Insert], at: Duration) -> Duration {
    log.iter()
        .filter(|i| i.started >= at && (!i.ok || i.ended - i.started > Duration::from_millis(300)))
        .map(|i| i.ended)
        .max()
        .unwrap_or(at)
}

fn range(v: &[u128]) -> String {
    let mut v = v.to_vec();
    v.sort();
    match (v.first(), v.last()) {
        (Some(a), Some(b)) if a == b => format!("{a}"),
        (Some(a), Some(b)) => format!("{a}–{b} (median {})", v[v.len() / 2]),
        _ => "-".into(),
    }
}

fn run(label: &str, subnet: u8, pauses: bool) {
    let extra = format!(
        "citus: {{ pause_on_switchover: {pauses}, pause_on_loss: {pauses} }}\nha: {{ ttl: 10, loop_wait: 2, retry_timeout: 4 }}\n"
    );
    let t = cluster(&lab_spec(
        &format!("bcitus{subnet}"),
        subnet,
        &[(0, 1), (1, 2), (2, 2)],
        3,
        &extra,
    ));
    let coord = coordinators(&t);
    let mut c = wait_for("the coordinator", Duration::from_secs(60), || {
        Sql::connect(&coord, "citus").ok()
    });
    c.exec("CREATE TABLE bench (id bigint PRIMARY KEY, at timestamptz DEFAULT now()); SELECT create_distributed_table('bench', 'id');")
        .expect("table");
    let w = Writer::start(&coord, "bench", Duration::from_millis(10));
    std::thread::sleep(Duration::from_secs(2));

    // Switchovers of group 1.
    let mut failed = Vec::new();
    let mut gaps = Vec::new();
    for _ in 0..SWITCHOVERS {
        let at = w.t0.elapsed();
        let o = cli(&t, &["switchover", "--group", "1", "--force"]);
        assert!(o.status.success(), "switchover failed");
        std::thread::sleep(Duration::from_secs(3));
        let log = w.snapshot();
        let win = window(&log, at, at + Duration::from_secs(3));
        failed.push(win.iter().filter(|i| !i.ok).count() as u128);
        gaps.push(longest_gap(&win).as_millis());
    }

    // The worker leader's host goes silent: cut off first (no reset reaches anyone), then
    // every process on it dies.
    let mut crash_failed = Vec::new();
    let mut last_failure = Vec::new();
    let mut back = Vec::new();
    for _ in 0..CRASHES {
        let lost = leader(&t, 1).expect("leader");
        let at = w.t0.elapsed();
        t.lab.partition(&lost, false).expect("cut off");
        t.lab.crash(&lost).expect("crash");
        wait_for("a new worker leader", Duration::from_secs(90), || {
            leader(&t, 1).filter(|l| *l != lost)
        });
        // Writes are back when the last insert that failed, or waited (a pause), ended: after
        // it every insert went through promptly. Waited for until plenty did.
        let resumed = wait_for("writes to resume", Duration::from_secs(90), || {
            let log = w.snapshot();
            let back = stalled_until(&log, at);
            let after = log.iter().filter(|i| i.ok && i.started >= back).count();
            (after > 100).then_some(back)
        });
        let log = w.snapshot();
        let win = window(&log, at, resumed + Duration::from_secs(1));
        for f in win.iter().filter(|i| !i.ok) {
            eprintln!(
                "    failed insert +{} ms (took {} ms): {}",
                f.started.saturating_sub(at).as_millis(),
                (f.ended - f.started).as_millis(),
                f.error.as_deref().unwrap_or("")
            );
        }
        crash_failed.push(win.iter().filter(|i| !i.ok).count() as u128);
        last_failure.push(
            win.iter()
                .filter(|i| !i.ok)
                .map(|i| i.started.saturating_sub(at).as_millis())
                .max()
                .unwrap_or(0),
        );
        back.push(resumed.saturating_sub(at).as_millis());
        t.lab.heal(&lost).expect("heal");
        t.lab.up().expect("reboot");
        let o = cli(&t, &["apply", "--auto-approve"]);
        assert!(o.status.success(), "apply after the crash failed");
        std::thread::sleep(Duration::from_secs(2));
    }
    let log = w.stop();
    let acked = log.iter().filter(|i| i.ok).count();
    println!("{label}");
    println!(
        "  switchover of group 1 (n={SWITCHOVERS}): failed inserts {}, longest gap {} ms",
        range(&failed),
        range(&gaps)
    );
    println!(
        "  silent host crash of group 1's leader at ttl 10 (n={CRASHES}): failed inserts {}, last failed insert started {} ms after the crash, writes back after {} ms",
        range(&crash_failed),
        range(&last_failure),
        range(&back)
    );
    println!("  ({acked} inserts acknowledged in all)");
}

fn main() {
    if !common::lab_available("citus benchmark") {
        return;
    }
    match citus_reconcile::lab::standin::detect(common::pg::BIN) {
        Ok(Some(citus_reconcile::lab::standin::CitusInstall::Real { .. })) => {}
        other => {
            eprintln!("skipped: needs real Citus (found {other:?}); run .ci/setup");
            return;
        }
    }
    common::set_lab_secrets();
    // CITUS_BENCH_ONLY=on|off runs one half (for investigating; the figures need both).
    let only = std::env::var("CITUS_BENCH_ONLY").unwrap_or_default();
    if only != "off" {
        run(
            "write pauses on (pause_on_switchover, pause_on_loss):",
            210,
            true,
        );
    }
    if only != "on" {
        run("baseline, same run, pauses off:", 211, false);
    }
}
