//! What a lab consists of, derived from a spec without touching the machine: one node per
//! distinct address (hosts that share an address share a node, as members sharing a VM do),
//! each in its own network namespace on the lab's bridge, and which nodes run etcd.
//!
//! Every address must sit in one /24 inside 10.213.0.0/16: that /24 is the lab's identity
//! (namespace and interface names derive from its third octet), so two labs can only collide
//! if they claim the same addresses.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::spec::Spec;
use crate::spec::rules::parse_endpoint;

/// The /16 every lab lives in.
pub const LAB_NET: [u8; 2] = [10, 213];
/// The machine's own address on a lab's bridge: `10.213.N.254`.
pub const ROOT_OCTET: u8 = 254;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub cluster: String,
    /// N in 10.213.N.0/24.
    pub subnet: u8,
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub address: Ipv4Addr,
    /// Namespace name: `crl{N}-{first member}` or `crl{N}-etcd{octet}`.
    pub ns: String,
    /// Spec members served from this address.
    pub members: Vec<String>,
    /// Ports sshd listens on (one per distinct per-member SSH port).
    pub ssh_ports: Vec<u16>,
    pub etcd: Option<EtcdMember>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// Clients speak TLS (`https://` endpoints); health is then read on `metrics_port`.
    pub tls: bool,
    /// Clients must present a certificate (the spec gives `etcd.tls.cert`).
    pub client_cert_auth: bool,
}

impl EtcdMember {
    /// Plain-http port for `/health` when clients speak TLS.
    pub fn metrics_port(&self) -> u16 {
        self.peer_port + 2
    }
}

impl Topology {
    pub fn bridge_ns(&self) -> String {
        format!("crl{}-br", self.subnet)
    }
    /// The machine-side end of the link to the lab's bridge.
    pub fn root_if(&self) -> String {
        format!("crl{}", self.subnet)
    }
    pub fn root_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(LAB_NET[0], LAB_NET[1], self.subnet, ROOT_OCTET)
    }
    pub fn subnet_cidr(&self) -> String {
        format!("{}.{}.{}.0/24", LAB_NET[0], LAB_NET[1], self.subnet)
    }
    /// The node answering to a member name, an address, or `etcd{octet}`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| {
            n.members.iter().any(|m| m == name)
                || n.address.to_string() == name
                || n.etcd.as_ref().is_some_and(|e| e.name == name)
        })
    }
    pub fn etcd_nodes(&self) -> impl Iterator<Item = (&Node, &EtcdMember)> {
        self.nodes
            .iter()
            .filter_map(|n| n.etcd.as_ref().map(|e| (n, e)))
    }
    /// `--initial-cluster` of the lab's etcd.
    pub fn etcd_initial_cluster(&self) -> String {
        self.etcd_nodes()
            .map(|(n, e)| format!("{}=http://{}:{}", e.name, n.address, e.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }
    /// Name of the veth end of a node inside the bridge namespace.
    pub fn bridge_port(node: &Node) -> String {
        format!("h{}", node.address.octets()[3])
    }
}

/// Work out the lab of a spec, or say why the spec cannot be a lab.
pub fn of(spec: &Spec) -> Result<Topology, String> {
    let mut subnet: Option<(u8, String)> = None;
    let mut check = |addr: &str, what: &str| -> Result<Ipv4Addr, String> {
        let ip: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{what}: the lab needs IPv4 addresses, found {addr:?}"))?;
        let o = ip.octets();
        if [o[0], o[1]] != LAB_NET {
            return Err(format!(
                "{what}: {ip} is outside the lab network 10.213.0.0/16"
            ));
        }
        if o[3] == 0 || o[3] >= ROOT_OCTET {
            return Err(format!(
                "{what}: {ip} is reserved in a lab (use .1 to .253)"
            ));
        }
        match &subnet {
            Some((n, first)) if *n != o[2] => Err(format!(
                "{what}: {ip} is not in the same /24 as {first}; a lab uses one 10.213.N.0/24"
            )),
            Some(_) => Ok(ip),
            None => {
                subnet = Some((o[2], format!("{ip} ({what})")));
                Ok(ip)
            }
        }
    };

    let mut by_address: BTreeMap<Ipv4Addr, Node> = BTreeMap::new();
    for h in spec.hosts() {
        let ip = check(&h.address, &format!("host {}", h.name))?;
        let node = by_address.entry(ip).or_insert_with(|| Node {
            address: ip,
            ns: String::new(),
            members: Vec::new(),
            ssh_ports: Vec::new(),
            etcd: None,
        });
        node.members.push(h.name.clone());
        if !node.ssh_ports.contains(&h.ssh.port) {
            node.ssh_ports.push(h.ssh.port);
        }
    }
    // A managed etcd's hosts: `apply` runs etcd there, the lab only makes the hosts.
    for m in &spec.etcd.members {
        let ip = check(&m.address, &format!("etcd member {}", m.name))?;
        let node = by_address.entry(ip).or_insert_with(|| Node {
            address: ip,
            ns: String::new(),
            members: Vec::new(),
            ssh_ports: Vec::new(),
            etcd: None,
        });
        if !node.ssh_ports.contains(&m.ssh.port) {
            node.ssh_ports.push(m.ssh.port);
        }
    }
    let lab_etcd = if spec.etcd.members.is_empty() {
        &spec.etcd.endpoints[..]
    } else {
        &[]
    };
    for (i, url) in lab_etcd.iter().enumerate() {
        let ep = parse_endpoint(url).map_err(|e| format!("etcd.endpoints[{i}]: {e}"))?;
        let ip = check(&ep.host, &format!("etcd endpoint {url}"))?;
        let node = by_address.entry(ip).or_insert_with(|| Node {
            address: ip,
            ns: String::new(),
            members: Vec::new(),
            ssh_ports: Vec::new(),
            etcd: None,
        });
        if node.etcd.is_some() {
            return Err(format!("etcd.endpoints[{i}]: two etcd endpoints on {ip}"));
        }
        let peer_port = if ep.port == 2380 { 2381 } else { 2380 };
        node.etcd = Some(EtcdMember {
            name: format!("etcd{}", ip.octets()[3]),
            client_port: ep.port,
            peer_port,
            tls: ep.scheme == "https",
            client_cert_auth: spec.etcd.tls.as_ref().is_some_and(|t| t.cert.is_some()),
        });
    }
    let Some((n, _)) = subnet else {
        return Err("the spec names no hosts".into());
    };
    let nodes = by_address
        .into_values()
        .map(|mut node| {
            node.ns = match node.members.first() {
                Some(m) => format!("crl{n}-{m}"),
                None => format!("crl{n}-etcd{}", node.address.octets()[3]),
            };
            node
        })
        .collect();
    Ok(Topology {
        cluster: spec.cluster.clone(),
        subnet: n,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{self, Context};
    use std::path::{Path, PathBuf};

    fn spec_of(hosts: &str, etcd: &str) -> Spec {
        let text = format!(
            "apiVersion: citus-reconcile/v1\ncluster: t\netcd: {{ endpoints: [{etcd}] }}\n\
             postgres: {{ superuser: {{username: postgres, password: a}}, replication: {{username: r, password: b}} }}\n\
             groups:\n  - group: 0\n    hosts: [{hosts}]\n"
        );
        let env = |_: &str| None;
        let read = |_: &Path| Err(std::io::Error::other("no files"));
        let ctx = Context {
            spec_dir: PathBuf::from("/"),
            env: &env,
            read_file: &read,
            resolve_secrets: true,
            resolve_etcd_secret: true,
        };
        let report = spec::analyze(Path::new("t.yaml"), text.as_bytes(), &ctx);
        match report.spec {
            Some(s) => s,
            None => panic!("{}", report.render()),
        }
    }

    fn check(hosts: &str, etcd: &str, expected: Result<&str, &str>) {
        let got = of(&spec_of(hosts, etcd)).map(|t| {
            t.nodes
                .iter()
                .map(|n| {
                    let etcd = n
                        .etcd
                        .as_ref()
                        .map(|e| format!("+{}:{}/{}", e.name, e.client_port, e.peer_port))
                        .unwrap_or_default();
                    format!("{}={}{:?}{}", n.ns, n.address, n.ssh_ports, etcd)
                })
                .collect::<Vec<_>>()
                .join(" ")
        });
        match expected {
            Ok(e) => assert_eq!(got.as_deref(), Ok(e)),
            Err(e) => match got {
                Err(msg) => assert!(msg.contains(e), "{msg:?} should contain {e:?}"),
                Ok(t) => panic!("expected error {e:?}, got {t}"),
            },
        }
    }

    #[test]
    fn topologies() {
        check(
            "{name: a, address: 10.213.9.11}, {name: b, address: 10.213.9.12}",
            "http://10.213.9.5:2379",
            Ok(
                "crl9-etcd5=10.213.9.5[]+etcd5:2379/2380 crl9-a=10.213.9.11[22] crl9-b=10.213.9.12[22]",
            ),
        );
        // Members sharing an address share a node; etcd may share it too.
        check(
            "{name: a, address: 10.213.9.11}, {name: b, address: 10.213.9.11, postgres: {port: 5433}, agent: {api_port: 8009}, ssh: {port: 2222}}",
            "http://10.213.9.11:2380",
            Ok("crl9-a=10.213.9.11[22, 2222]+etcd11:2380/2381"),
        );
        check(
            "{name: a, address: 10.0.0.1}",
            "http://10.213.9.5:2379",
            Err("outside the lab network"),
        );
        check(
            "{name: a, address: 10.213.9.11}",
            "http://10.213.8.5:2379",
            Err("same /24"),
        );
        check(
            "{name: a, address: 10.213.9.254}",
            "http://10.213.9.5:2379",
            Err("reserved"),
        );
        check(
            "{name: a, address: db.example.com}",
            "http://10.213.9.5:2379",
            Err("IPv4"),
        );
    }
}
