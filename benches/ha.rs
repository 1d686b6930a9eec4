//! HA benchmark (needs root and the lab): unplanned failover after a host crash at the default
//! and at a short ttl, PostgreSQL crash recovery with a live agent, switchover downtime for a
//! client writing every 10 ms (against unplanned failover at the same ttl, in the same run),
//! and the agent's memory and idle CPU (beside an etcd member and the postmaster, measured in
//! the same run). Run: `cargo bench --bench ha`. Prints numbers; asserts nothing about them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::prober::Prober;
use common::{TestLab, cli, cluster, lab_spec, leader, members, wait_for};

/// Time from `event` to the first write accepted after it by a member other than `gone`
/// (which may still finish a write it started before it died).
fn writes_back_after(p: &Prober, event: Duration, gone: Option<&str>) -> Option<Duration> {
    let log = p.log.lock().ok()?;
    log.iter()
        .filter(|a| a.ok && a.started >= event && Some(a.member.as_str()) != gone)
        .map(|a| a.ended)
        .min()
        .map(|t| t - event)
}

fn wait_writes(p: &Prober, event: Duration, gone: Option<&str>) -> Duration {
    wait_for("writes to come back", Duration::from_secs(180), || {
        writes_back_after(p, event, gone)
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fmt(v: &[Duration]) -> String {
    let mut s = v.to_vec();
    s.sort();
    format!(
        "median {:6.2} s  (min {:.2}, max {:.2}, n={})",
        median(s.clone()).as_secs_f64(),
        s[0].as_secs_f64(),
        s[s.len() - 1].as_secs_f64(),
        s.len()
    )
}

/// Crash the worker leader's host `runs` times; each time measure until writes resume, then
/// reboot the host and apply so it rejoins.
fn host_crash_failovers(t: &TestLab, runs: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let old = wait_for("a leader", Duration::from_secs(60), || leader(t, 1));
        let p = Prober::start(&members(t, 1), Duration::from_millis(10));
        std::thread::sleep(Duration::from_secs(1));
        let at = p.t0.elapsed();
        t.lab.crash(&old).expect("crash");
        out.push(wait_writes(&p, at, Some(&old)));
        let _ = p.stop();
        t.lab.up().expect("reboot");
        let o = cli(t, &["apply", "--auto-approve"]);
        assert!(o.status.success(), "{}", common::output_text(&o));
    }
    out
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Pids of processes whose command line contains `needle`.
fn pids(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| {
                    std::fs::read(format!("/proc/{p}/cmdline"))
                        .map(|c| {
                            String::from_utf8_lossy(&c)
                                .replace('\0', " ")
                                .contains(needle)
                        })
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !common::lab_available("HA benchmark") {
        return;
    }
    let runs: usize = std::env::var("CR_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let agent = env!("CARGO_BIN_EXE_citus-reconcile");
    let mut lines = Vec::new();

    // Short leases: ttl 5 s.
    let short = lab_spec(
        "benchha",
        201,
        &[(0, 1), (1, 3)],
        3,
        "ha: { ttl: 5, loop_wait: 1, retry_timeout: 2 }\n",
    );
    let t = cluster(&short);
    let o = cli(&t, &["apply", "--auto-approve", "--agent-binary", agent]);
    assert!(o.status.success());
    let crash5 = host_crash_failovers(&t, runs);

    // PostgreSQL crash with the agent alive.
    let mut pg = Vec::new();
    for _ in 0..runs {
        let l = wait_for("a leader", Duration::from_secs(60), || leader(&t, 1));
        let p = Prober::start(&members(&t, 1), Duration::from_millis(10));
        std::thread::sleep(Duration::from_secs(1));
        let dir = t
            .spec
            .host(&l)
            .map(|h| h.data_dir.clone())
            .unwrap_or_default();
        let pid: i32 = std::fs::read_to_string(format!("{dir}/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok())
            .unwrap_or(0);
        let at = p.t0.elapsed();
        // SAFETY: kill(2) on the lab's own postmaster.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        pg.push(wait_writes(&p, at, None));
        let _ = p.stop();
        std::thread::sleep(Duration::from_secs(2));
    }

    // Switchover downtime: the longest gap in accepted writes around each switchover.
    let mut switch = Vec::new();
    for _ in 0..runs.max(5) {
        let l = wait_for("a leader", Duration::from_secs(60), || leader(&t, 1));
        let candidate = members(&t, 1)
            .into_iter()
            .map(|m| m.0)
            .find(|m| *m != l)
            .unwrap_or_default();
        std::thread::sleep(Duration::from_secs(2));
        let p = Prober::start(&members(&t, 1), Duration::from_millis(10));
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
        assert!(o.status.success(), "{}", common::output_text(&o));
        std::thread::sleep(Duration::from_secs(1));
        switch.push(common::prober::longest_gap(&p.stop()));
    }

    // Agent memory and idle CPU, beside an etcd member and a postmaster.
    std::thread::sleep(Duration::from_secs(3));
    let agents: Vec<u32> = pids("agent --config /var/lib/citus-reconcile/benchha/")
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| !String::from_utf8_lossy(&c).contains("--supervise"))
                .unwrap_or(false)
        })
        .collect();
    let rss: Vec<u64> = agents.iter().map(|p| proc_rss_kib(*p)).collect();
    let before: u64 = agents.iter().map(|p| proc_cpu_ticks(*p)).sum();
    let window = Duration::from_secs(10);
    let t0 = Instant::now();
    std::thread::sleep(window);
    let after: u64 = agents.iter().map(|p| proc_cpu_ticks(*p)).sum();
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let cpu_pct = (after.saturating_sub(before) as f64 / ticks_per_s)
        / t0.elapsed().as_secs_f64()
        / agents.len().max(1) as f64
        * 100.0;
    let etcd_rss = pids("--name etcd")
        .first()
        .map(|p| proc_rss_kib(*p))
        .unwrap_or(0);
    let postmaster_rss = pids("/bin/postgres -D /var/lib/postgresql/15/benchha/")
        .first()
        .map(|p| proc_rss_kib(*p))
        .unwrap_or(0);
    drop(t);

    // Default leases: ttl 30 s (the baseline for failover time).
    let default = lab_spec("benchhadef", 202, &[(0, 1), (1, 3)], 3, "");
    let t = cluster(&default);
    let crash30 = host_crash_failovers(&t, runs);
    drop(t);

    lines.push(format!(
        "host crash → writes back, ttl 30 s (default)     {}",
        fmt(&crash30)
    ));
    lines.push(format!(
        "host crash → writes back, ttl 5 s               {}",
        fmt(&crash5)
    ));
    lines.push(format!(
        "PostgreSQL crash, agent alive → writes back     {}",
        fmt(&pg)
    ));
    lines.push(format!(
        "switchover: longest write gap (10 ms client)    {}",
        fmt(&switch)
    ));
    lines.push(format!(
        "agent RSS (idle, {} agents)                      median {:.1} MiB (max {:.1}); beside: etcd member {:.1} MiB, postmaster {:.1} MiB",
        rss.len(),
        median(rss.iter().map(|k| Duration::from_millis(*k)).collect()).as_millis() as f64 / 1024.0,
        rss.iter().max().copied().unwrap_or(0) as f64 / 1024.0,
        etcd_rss as f64 / 1024.0,
        postmaster_rss as f64 / 1024.0
    ));
    lines.push(format!("agent idle CPU                                   {cpu_pct:.2} % of one core per agent (over {}s)", window.as_secs()));
    println!(
        "\nHA benchmark: worker group of 3 + a coordinator, 3-member etcd, lab on one machine (release agent)"
    );
    for l in lines {
        println!("{l}");
    }
}
