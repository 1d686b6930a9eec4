//! Apply benchmark (needs root and the lab): wall time of `apply` from bare hosts to converged
//! on the 7-host reference topology, of `plan` on the converged cluster, and of a no-op
//! `apply`; the baseline in the same run is the same apply with `--parallelism 1` (one host
//! at a time). Run: `cargo bench --bench apply`. Prints numbers; asserts nothing about them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

fn run(spec: &std::path::Path, args: &[&str]) -> Duration {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_citus-reconcile"))
        .args(args)
        .arg(spec)
        .env("CR_LAB_SUPERUSER", "lab-superuser-pw")
        .env("CR_LAB_REPLICATION", "lab-replication-pw")
        .output()
        .expect("citus-reconcile runs");
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !common::lab_available("apply benchmark") {
        return;
    }
    common::set_lab_secrets();
    let extra = "ha: { ttl: 10, loop_wait: 2, retry_timeout: 4 }\n";
    let mut rows = Vec::new();
    for (label, parallelism) in [
        ("citus-reconcile (parallelism 10)", "10"),
        ("baseline: one host at a time", "1"),
    ] {
        let spec = common::lab_spec("benchapply", 200, &[(0, 3), (1, 2), (2, 2)], 3, extra);
        let t = common::TestLab::up(&spec);
        let apply = run(
            &t.spec_path,
            &["apply", "--auto-approve", "--parallelism", parallelism],
        );
        let plan = median(
            (0..5)
                .map(|_| run(&t.spec_path, &["plan", "--parallelism", parallelism]))
                .collect(),
        );
        let noop = median(
            (0..3)
                .map(|_| {
                    run(
                        &t.spec_path,
                        &["apply", "--auto-approve", "--parallelism", parallelism],
                    )
                })
                .collect(),
        );
        rows.push((label, apply, plan, noop));
        drop(t);
    }
    println!(
        "\napply benchmark: 7 hosts (3 coordinators, 2 worker groups of 2), 3-member etcd, lab on one machine"
    );
    println!(
        "{:<36} {:>22} {:>24} {:>16}",
        "", "bare → converged", "plan (converged, median)", "no-op apply"
    );
    for (label, apply, plan, noop) in rows {
        println!(
            "{label:<36} {:>20.2} s {:>22.2} s {:>14.2} s",
            apply.as_secs_f64(),
            plan.as_secs_f64(),
            noop.as_secs_f64()
        );
    }
}
