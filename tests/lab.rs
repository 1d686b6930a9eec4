//! The lab for real: namespaces, sshd with verified host keys, a 3-member etcd, faults, and a
//! `down` that leaves nothing behind.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{TestLab, lab_available, lab_spec, set_lab_secrets};

fn ssh(t: &TestLab, address: &str, command: &str) -> Result<String, String> {
    let out = Command::new("ssh")
        .args([
            "-i",
            &t.dir.path().join(".lab/id_ed25519").to_string_lossy(),
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=3",
        ])
        .args([
            "-o",
            &format!(
                "UserKnownHostsFile={}",
                t.dir.path().join(".lab/known_hosts").display()
            ),
        ])
        .arg(format!("root@{address}"))
        .arg(command)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn reachable(addr: &str, port: u16) -> bool {
    let a: SocketAddr = format!("{addr}:{port}").parse().expect("address");
    TcpStream::connect_timeout(&a, Duration::from_millis(700)).is_ok()
}

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn lifecycle_up_is_reachable_idempotent_and_down_is_clean() {
    if !lab_available("lab lifecycle") {
        return;
    }
    set_lab_secrets();
    // One member keeps its folders where nothing names the cluster or the member: one below
    // a folder that exists before the lab (it must survive `down`), one below folders that
    // do not (they are the lab's).
    let kept = std::path::Path::new("/var/tmp/crlab100-kept");
    let _ = std::fs::remove_dir_all(kept);
    let _ = std::fs::remove_dir_all("/var/tmp/crlab100-made");
    std::fs::create_dir_all(kept).expect("a folder from before the lab");
    std::fs::write(kept.join("marker"), "not the lab's").expect("marker");
    let spec = lab_spec("lablife", 100, &[(0, 1), (1, 1)], 3, "").replace(
        "{ name: g1m0, address: 10.213.100.20 }",
        "{ name: g1m0, address: 10.213.100.20, postgres: { data_dir: /var/tmp/crlab100-kept/data }, agent: { install_dir: /var/tmp/crlab100-made/x/agent } }",
    );
    let t = TestLab::up(&spec);
    // What the agent would make there: the folders, and a data folder set aside.
    for dir in [
        "/var/tmp/crlab100-kept/data",
        "/var/tmp/crlab100-kept/data.rewind-failed-1795000000",
        "/var/tmp/crlab100-made/x/agent/bin",
    ] {
        std::fs::create_dir_all(dir).expect("member folder");
    }
    // Every host answers over SSH with strict host-key checking, under its own name.
    for (name, addr) in [("g0m0", "10.213.100.10"), ("g1m0", "10.213.100.20")] {
        assert_eq!(ssh(&t, addr, "hostname").as_deref(), Ok(name));
    }
    // The three etcd members form one healthy cluster.
    let health = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &t.spec.etcd.endpoints.join(","),
            "endpoint",
            "health",
        ])
        .output()
        .expect("etcdctl runs");
    let text = String::from_utf8_lossy(&health.stdout).to_string()
        + &String::from_utf8_lossy(&health.stderr);
    assert!(health.status.success(), "{text}");
    assert_eq!(text.matches("is healthy").count(), 3, "{text}");

    // A second `up` changes nothing: same processes.
    let before: Vec<usize> = t.lab.status().iter().map(|s| s.processes).collect();
    let pids_before = std::fs::read_to_string(t.lab.state_dir().join("lab.json")).expect("state");
    t.lab.up().expect("second up");
    assert_eq!(
        pids_before,
        std::fs::read_to_string(t.lab.state_dir().join("lab.json")).expect("state")
    );
    assert_eq!(
        before,
        t.lab
            .status()
            .iter()
            .map(|s| s.processes)
            .collect::<Vec<_>>()
    );

    // `down` leaves no namespace, process, folder or key behind; twice is fine.
    let state_dir = t.lab.state_dir().to_path_buf();
    t.lab.down().expect("down");
    t.lab.down().expect("second down");
    assert!(
        namespaces_with_prefix("crl100-").is_empty(),
        "{:?}",
        namespaces_with_prefix("crl100-")
    );
    assert!(!state_dir.exists());
    for gone in [
        "/var/tmp/crlab100-kept/data",
        "/var/tmp/crlab100-kept/data.rewind-failed-1795000000",
        "/var/tmp/crlab100-made",
    ] {
        assert!(!std::path::Path::new(gone).exists(), "{gone} left behind");
    }
    assert!(
        kept.join("marker").exists(),
        "a folder from before the lab was removed"
    );
    std::fs::remove_dir_all(kept).expect("clean up");
    assert!(!t.dir.path().join(".lab/id_ed25519").exists());
    assert!(!t.dir.path().join(".lab/known_hosts").exists());
    // No connection is attempted now: without the lab's route a packet would leave the machine.
    let route = Command::new("ip")
        .args(["-o", "route", "show", "10.213.100.0/24"])
        .output()
        .expect("ip");
    assert!(
        String::from_utf8_lossy(&route.stdout).trim().is_empty(),
        "the lab route is still there"
    );
}

#[test]
fn faults_crash_partition_and_heal() {
    if !lab_available("lab faults") {
        return;
    }
    set_lab_secrets();
    let t = TestLab::up(&lab_spec("labfault", 101, &[(0, 1), (1, 1)], 3, ""));
    let (a, b) = ("10.213.101.10", "10.213.101.20");

    // A crash kills every process on the host; `up` boots it again (sshd only).
    t.lab
        .exec("g0m0", "sh", &["-c", "sleep 300 >/dev/null 2>&1 &"])
        .expect("start a process on the host");
    assert!(
        t.lab
            .status()
            .iter()
            .any(|s| s.node == "g0m0" && s.processes >= 2)
    );
    t.lab.crash("g0m0").expect("crash");
    let row = t
        .lab
        .status()
        .into_iter()
        .find(|s| s.node == "g0m0")
        .expect("row");
    assert_eq!((row.processes, row.sshd), (0, Some(false)));
    assert!(!reachable(a, 22));
    t.lab.up().expect("reboot");
    assert_eq!(ssh(&t, a, "hostname").as_deref(), Ok("g0m0"));
    let row = t
        .lab
        .status()
        .into_iter()
        .find(|s| s.node == "g0m0")
        .expect("row");
    assert_eq!(row.processes, 1, "after a reboot only sshd runs");

    // A full partition cuts the host off everything; heal restores it.
    t.lab.partition("g1m0", false).expect("partition");
    assert!(!reachable(b, 22));
    assert!(ssh(&t, a, &format!("timeout 2 bash -c '</dev/tcp/{b}/22'")).is_err());
    t.lab.heal("g1m0").expect("heal");
    assert!(reachable(b, 22));

    // An etcd-only partition keeps the host reachable but cuts it from every etcd member.
    t.lab.partition("g1m0", true).expect("etcd partition");
    assert_eq!(ssh(&t, b, "hostname").as_deref(), Ok("g1m0"));
    for etcd in ["10.213.101.2", "10.213.101.3", "10.213.101.4"] {
        assert!(
            ssh(&t, b, &format!("timeout 2 bash -c '</dev/tcp/{etcd}/2379'")).is_err(),
            "{etcd} still reachable"
        );
    }
    assert!(ssh(&t, b, &format!("timeout 2 bash -c '</dev/tcp/{a}/22'")).is_ok());
    t.lab.heal("g1m0").expect("heal");
    assert!(ssh(&t, b, "timeout 2 bash -c '</dev/tcp/10.213.101.2/2379'").is_ok());

    // Losing one etcd member of three keeps etcd available. A request in flight while the
    // lost member was the raft leader stalls until its timeout, so retry (bounded), as a
    // client does.
    t.lab.crash("etcd2").expect("crash an etcd member");
    let mut last = String::new();
    let ok = (0..4).any(|_| {
        let put = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                "http://10.213.101.3:2379",
                "--command-timeout=3s",
                "put",
                "k",
                "v",
            ])
            .output()
            .expect("etcdctl");
        last = String::from_utf8_lossy(&put.stderr).into_owned();
        put.status.success()
    });
    assert!(ok, "etcd unavailable with 2 of 3 members: {last}");
}
