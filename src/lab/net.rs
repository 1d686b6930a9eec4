//! Namespaces, the bridge, veth links and partitions: the lab's network, through `ip` and
//! `iptables`. Every step checks before it changes, so running it twice changes nothing.

use std::path::Path;

use super::LabError;
use super::sys::{run, run_in};
use super::topology::{Node, Topology};

pub fn ns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

fn ensure_ns(ns: &str) -> Result<(), LabError> {
    if ns_exists(ns) {
        return Ok(());
    }
    // The very first `ip netns add` on a machine sets up /run/netns; parallel first calls can
    // trip over each other, so retry a few times.
    let mut last = None;
    for _ in 0..5 {
        match run("ip", &["netns", "add", ns]) {
            Ok(_) => return Ok(()),
            Err(_) if ns_exists(ns) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(last.unwrap_or(LabError::Command {
        command: format!("ip netns add {ns}"),
        detail: "failed".into(),
    }))
}

fn link_exists(ns: Option<&str>, dev: &str) -> bool {
    run_in(ns, "ip", &["link", "show", "dev", dev]).is_ok()
}

fn has_address(ns: Option<&str>, dev: &str, cidr: &str) -> bool {
    run_in(ns, "ip", &["-o", "-4", "addr", "show", "dev", dev])
        .map(|out| out.split_whitespace().any(|w| w == cidr))
        .unwrap_or(false)
}

/// Refuse to build a lab whose subnet the machine already uses for something else.
pub fn check_subnet_free(t: &Topology) -> Result<(), LabError> {
    let ours = t.root_if();
    let routes = run(
        "ip",
        &[
            "-o",
            "-4",
            "route",
            "show",
            "match",
            &format!("{}.1", t.subnet_cidr().trim_end_matches(".0/24")),
        ],
    )?;
    for line in routes.lines() {
        if line.starts_with("default") {
            continue;
        }
        if !line
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0] == "dev" && w[1] == ours)
        {
            return Err(LabError::Network(format!(
                "{} is already routed on this machine ({}); pick another 10.213.N.0/24",
                t.subnet_cidr(),
                line.trim()
            )));
        }
    }
    Ok(())
}

/// The bridge namespace, its bridge, and the link from the machine's namespace to it.
pub fn ensure_bridge(t: &Topology) -> Result<(), LabError> {
    let br = t.bridge_ns();
    ensure_ns(&br)?;
    run_in(Some(&br), "ip", &["link", "set", "lo", "up"])?;
    if !link_exists(Some(&br), "br0") {
        run_in(Some(&br), "ip", &["link", "add", "br0", "type", "bridge"])?;
    }
    run_in(Some(&br), "ip", &["link", "set", "br0", "up"])?;
    let root_if = t.root_if();
    if !link_exists(None, &root_if) {
        run(
            "ip",
            &[
                "link", "add", &root_if, "type", "veth", "peer", "name", "up0", "netns", &br,
            ],
        )?;
    }
    run_in(
        Some(&br),
        "ip",
        &["link", "set", "up0", "master", "br0", "up"],
    )?;
    let cidr = format!("{}/24", t.root_address());
    if !has_address(None, &root_if, &cidr) {
        run("ip", &["addr", "add", &cidr, "dev", &root_if])?;
    }
    run("ip", &["link", "set", &root_if, "up"])?;
    Ok(())
}

/// One node's namespace, plugged into the bridge with its address.
pub fn ensure_node(t: &Topology, node: &Node) -> Result<(), LabError> {
    let br = t.bridge_ns();
    ensure_ns(&node.ns)?;
    let port = Topology::bridge_port(node);
    if !link_exists(Some(&node.ns), "eth0") {
        if link_exists(Some(&br), &port) {
            // Half a pair left behind by an interrupted run: remove it and start over.
            run_in(Some(&br), "ip", &["link", "del", &port])?;
        }
        run_in(
            Some(&br),
            "ip",
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &node.ns,
            ],
        )?;
    }
    run_in(
        Some(&br),
        "ip",
        &["link", "set", &port, "master", "br0", "up"],
    )?;
    let cidr = format!("{}/24", node.address);
    if !has_address(Some(&node.ns), "eth0", &cidr) {
        run_in(Some(&node.ns), "ip", &["addr", "add", &cidr, "dev", "eth0"])?;
    }
    run_in(Some(&node.ns), "ip", &["link", "set", "eth0", "up"])?;
    run_in(Some(&node.ns), "ip", &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Check, before any connection, that every lab address is routed to the lab's own link.
pub fn verify_routes(t: &Topology) -> Result<(), LabError> {
    let ours = t.root_if();
    for node in &t.nodes {
        let addr = node.address.to_string();
        let out = run("ip", &["-o", "-4", "route", "get", &addr])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        let dev = words.windows(2).find(|w| w[0] == "dev").map(|w| w[1]);
        if dev != Some(ours.as_str()) {
            return Err(LabError::Network(format!(
                "{addr} is routed to {} instead of the lab link {ours}; refusing to send it anything",
                dev.unwrap_or("nowhere")
            )));
        }
    }
    Ok(())
}

/// Names of existing namespaces that start with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Remove the lab's namespaces (links die with them) and its link from the machine.
pub fn remove(t: &Topology, namespaces: &[String]) -> Result<(), LabError> {
    for ns in namespaces {
        if ns_exists(ns) {
            run("ip", &["netns", "del", ns])?;
        }
    }
    // The kernel removes a namespace's links in the background, the peer of our link with
    // them: it can vanish between the check and the delete, which is what we wanted anyway.
    if link_exists(None, &t.root_if()) {
        if let Err(e) = run("ip", &["link", "del", &t.root_if()]) {
            if link_exists(None, &t.root_if()) {
                return Err(e);
            }
        }
    }
    Ok(())
}

const CHAIN: &str = "CRLAB";

fn ensure_chain(ns: &str) -> Result<(), LabError> {
    if run_in(Some(ns), "iptables", &["-w", "-L", CHAIN, "-n"]).is_err() {
        run_in(Some(ns), "iptables", &["-w", "-N", CHAIN])?;
    }
    for hook in ["INPUT", "OUTPUT"] {
        if run_in(Some(ns), "iptables", &["-w", "-C", hook, "-j", CHAIN]).is_err() {
            run_in(Some(ns), "iptables", &["-w", "-I", hook, "-j", CHAIN])?;
        }
    }
    Ok(())
}

/// Cut a node off: from everything but itself, or only from the etcd members.
pub fn partition(t: &Topology, node: &Node, etcd_only: bool) -> Result<(), LabError> {
    ensure_chain(&node.ns)?;
    run_in(Some(&node.ns), "iptables", &["-w", "-F", CHAIN])?;
    if etcd_only {
        for (etcd_node, _) in t.etcd_nodes() {
            if etcd_node.address == node.address {
                continue;
            }
            let a = etcd_node.address.to_string();
            run_in(
                Some(&node.ns),
                "iptables",
                &["-w", "-A", CHAIN, "-s", &a, "-j", "DROP"],
            )?;
            run_in(
                Some(&node.ns),
                "iptables",
                &["-w", "-A", CHAIN, "-d", &a, "-j", "DROP"],
            )?;
        }
    } else {
        run_in(
            Some(&node.ns),
            "iptables",
            &["-w", "-A", CHAIN, "-i", "lo", "-j", "RETURN"],
        )?;
        run_in(
            Some(&node.ns),
            "iptables",
            &["-w", "-A", CHAIN, "-o", "lo", "-j", "RETURN"],
        )?;
        run_in(
            Some(&node.ns),
            "iptables",
            &["-w", "-A", CHAIN, "-j", "DROP"],
        )?;
    }
    Ok(())
}

pub fn heal(node: &Node) -> Result<(), LabError> {
    if run_in(Some(&node.ns), "iptables", &["-w", "-L", CHAIN, "-n"]).is_ok() {
        run_in(Some(&node.ns), "iptables", &["-w", "-F", CHAIN])?;
    }
    Ok(())
}

/// "full", "etcd" or "" for a node's partition state.
pub fn partition_state(node: &Node) -> String {
    match run_in(Some(&node.ns), "iptables", &["-w", "-S", CHAIN]) {
        Ok(rules) if rules.contains("-o lo -j RETURN") => "cut off".into(),
        Ok(rules) if rules.contains("DROP") => "cut from etcd".into(),
        _ => String::new(),
    }
}
