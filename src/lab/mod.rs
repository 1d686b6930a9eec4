//! The lab: the hosts and etcd endpoints a spec names, made real on one Linux machine with
//! network namespaces, so that `apply` and the tests reach them as they would reach VMs, and
//! faults (crash, partition) can be injected. Linux and root only.
//!
//! Everything a lab creates is named after its /24 (see `topology`), recorded in a state file,
//! and removed by `down`: namespaces (and with them every process inside), the state folder,
//! and the members' data and install folders. It never sends a packet to an address that is
//! not routed to its own link.

pub mod net;
pub mod pki;
pub mod services;
pub mod standin;
pub mod sys;
pub mod topology;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::Spec;
pub use standin::CitusInstall;
pub use topology::Topology;

/// Root-only folder holding every lab's state.
pub const LAB_ROOT: &str = "/var/lib/citus-reconcile-lab";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (network namespaces, sshd, iptables)")]
    NotRoot,
    #[error("this spec cannot be a lab: {0}")]
    Spec(String),
    #[error("{command}: {detail}")]
    Command { command: String, detail: String },
    #[error("{0}")]
    Network(String),
    #[error("{0}")]
    Io(String),
    #[error("no lab node is called {0:?} (use a member name, an address or etcdN)")]
    UnknownNode(String),
    #[error("{0}")]
    NotReady(String),
}

/// What the lab remembers between commands.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    cluster: String,
    subnet: u8,
    /// Pids the lab started, by namespace and service.
    pids: BTreeMap<String, BTreeMap<String, u32>>,
    /// Client key files the lab generated (removed by `down`).
    created_keys: Vec<PathBuf>,
    /// known_hosts files the lab wrote lines into.
    known_hosts: Vec<PathBuf>,
    /// etcd TLS files the lab wrote at the paths the spec names (removed by `down`).
    #[serde(default)]
    created_files: Vec<PathBuf>,
    /// Members' data and install folders ever seen by `up` (a later spec may have fewer).
    #[serde(default)]
    member_dirs: Vec<PathBuf>,
    /// For each member folder that did not exist at `up`, its highest ancestor that did not
    /// either: everything below was made for this lab (by the agents), whatever its name.
    #[serde(default)]
    made_dirs: Vec<PathBuf>,
}

/// A lab for one spec.
pub struct Lab {
    pub spec: Spec,
    pub topology: Topology,
    state_dir: PathBuf,
}

/// One row of `lab status` / `lab up` output.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub namespace: String,
    pub address: String,
    pub exists: bool,
    pub sshd: Option<bool>,
    pub etcd: Option<bool>,
    pub processes: usize,
    pub partition: String,
}

impl Lab {
    pub fn new(spec: &Spec) -> Result<Self, LabError> {
        let topology = topology::of(spec).map_err(LabError::Spec)?;
        let state_dir = Path::new(LAB_ROOT).join(format!("lab{}", topology.subnet));
        Ok(Self {
            spec: spec.clone(),
            topology,
            state_dir,
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn load_state(&self) -> State {
        fs::read_to_string(self.state_dir.join("lab.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn save_state(&self, state: &State) -> Result<(), LabError> {
        let text = serde_json::to_string_pretty(state).map_err(|e| LabError::Io(e.to_string()))?;
        services::write_private(&self.state_dir.join("lab.json"), &text, 0o600)
    }

    fn require_root() -> Result<(), LabError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(LabError::NotRoot);
        }
        Ok(())
    }

    /// Bring the lab up, or repair it: whatever exists and runs is left as it is.
    pub fn up(&self) -> Result<CitusInstall, LabError> {
        Self::require_root()?;
        let t = &self.topology;
        let mut state = self.load_state();
        if !state.cluster.is_empty() && state.cluster != t.cluster {
            return Err(LabError::Spec(format!(
                "{} already belongs to the lab of cluster {:?}; run `lab down` on its spec first",
                t.subnet_cidr(),
                state.cluster
            )));
        }
        state.cluster = t.cluster.clone();
        state.subnet = t.subnet;
        // Every managed etcd member's folder this lab ever served (a replaced member's too).
        for m in &self.spec.etcd.members {
            let p = PathBuf::from(&m.dir);
            if owned_by_member(&m.dir, &self.spec.cluster, &m.name)
                && !state.member_dirs.contains(&p)
            {
                state.member_dirs.push(p);
            }
            if let Some(made) = first_missing_ancestor(Path::new(&m.dir)) {
                if !state.made_dirs.iter().any(|d| made.starts_with(d)) {
                    state.made_dirs.retain(|d| !d.starts_with(&made));
                    state.made_dirs.push(made);
                }
            }
        }
        for h in self.spec.hosts() {
            for dir in [&h.data_dir, &h.install_dir] {
                let p = PathBuf::from(dir);
                if owned_by_member(dir, &self.spec.cluster, &h.name)
                    && !state.member_dirs.contains(&p)
                {
                    state.member_dirs.push(p);
                }
                if let Some(made) = first_missing_ancestor(Path::new(dir)) {
                    if !state.made_dirs.iter().any(|m| made.starts_with(m)) {
                        state.made_dirs.retain(|m| !m.starts_with(&made));
                        state.made_dirs.push(made);
                    }
                }
            }
        }
        net::check_subnet_free(t)?;
        fs::create_dir_all(&self.state_dir)
            .map_err(|e| LabError::Io(format!("create {}: {e}", self.state_dir.display())))?;
        use std::os::unix::fs::PermissionsExt;
        for dir in [Path::new(LAB_ROOT), self.state_dir.as_path()] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| LabError::Io(format!("chmod {}: {e}", dir.display())))?;
        }
        self.save_state(&state)?;

        net::ensure_bridge(t)?;
        for node in &t.nodes {
            net::ensure_node(t, node)?;
        }
        net::verify_routes(t)?;

        // Client keys at the paths the spec names, and the authorized_keys every sshd reads.
        let mut authorized = Vec::new();
        let logins = self
            .spec
            .hosts()
            .map(|h| (h.name.clone(), h.ssh.clone()))
            .chain(
                self.spec
                    .etcd
                    .members
                    .iter()
                    .map(|m| (format!("etcd member {}", m.name), m.ssh.clone())),
            );
        for (name, ssh) in logins {
            let Some(identity) = &ssh.identity_file else {
                return Err(LabError::Spec(format!(
                    "host {name} has no ssh.identity_file; the lab writes its key there"
                )));
            };
            if !identity.exists() && !state.created_keys.contains(identity) {
                state.created_keys.push(identity.clone());
            }
            let public =
                services::ensure_keypair(identity, &format!("citus-reconcile lab {}", t.cluster))?;
            if !authorized.contains(&public) {
                authorized.push(public);
            }
        }
        services::write_private(
            &self.state_dir.join("authorized_keys"),
            &(authorized.join("\n") + "\n"),
            0o600,
        )?;
        self.save_state(&state)?;
        let pki = self.ensure_etcd_tls(&mut state)?;
        self.save_state(&state)?;

        for node in &t.nodes {
            let pids = state.pids.entry(node.ns.clone()).or_default();
            if !node.ssh_ports.is_empty() {
                let pid = services::ensure_sshd(&self.state_dir, node, pids.get("sshd").copied())?;
                pids.insert("sshd".into(), pid);
            }
            if let Some(member) = &node.etcd {
                let pid = services::ensure_etcd(
                    &self.state_dir,
                    t,
                    node,
                    member,
                    pki.as_ref(),
                    pids.get("etcd").copied(),
                )?;
                pids.insert("etcd".into(), pid);
            }
        }
        self.save_state(&state)?;

        // known_hosts with the real host keys, per known_hosts file the spec names.
        let mut per_file: BTreeMap<PathBuf, Vec<(String, String)>> = BTreeMap::new();
        let logins = self
            .spec
            .hosts()
            .map(|h| (h.name.clone(), h.ssh.clone()))
            .chain(
                self.spec
                    .etcd
                    .members
                    .iter()
                    .map(|m| (m.address.clone(), m.ssh.clone())),
            );
        for (name, ssh) in logins {
            let node = t
                .node(&name)
                .ok_or_else(|| LabError::UnknownNode(name.clone()))?;
            let key = services::host_public_key(&self.state_dir, node)?;
            let entry = (services::known_host_name(node, ssh.port), key);
            let list = per_file.entry(ssh.known_hosts.clone()).or_default();
            if !list.contains(&entry) {
                list.push(entry);
            }
        }
        for (file, entries) in &per_file {
            services::write_known_hosts(file, entries)?;
            if !state.known_hosts.contains(file) {
                state.known_hosts.push(file.clone());
            }
        }
        self.save_state(&state)?;

        for node in t.nodes.iter().filter(|n| !n.ssh_ports.is_empty()) {
            if !services::wait_sshd(node, Duration::from_secs(15)) {
                return Err(LabError::NotReady(format!(
                    "sshd on {} ({}) did not come up",
                    node.address, node.ns
                )));
            }
        }
        self.wait_etcd(Duration::from_secs(30))?;
        standin::ensure(&self.spec.postgres.bin_dir)
    }

    /// When the lab's etcd speaks TLS: its CA, and the CA certificate, client certificate
    /// and key at the paths the spec's `etcd.tls` names as files (when missing there; a file
    /// holding something else is left alone and is an error).
    fn ensure_etcd_tls(&self, state: &mut State) -> Result<Option<pki::Pki>, LabError> {
        use crate::spec::secret::SecretSource;
        if !self.topology.etcd_nodes().any(|(_, m)| m.tls) {
            return Ok(None);
        }
        let pki = pki::Pki::ensure(&self.state_dir.join("etcd").join("tls"), &self.spec.cluster)?;
        let Some(tls) = &self.spec.etcd.tls else {
            return Ok(Some(pki));
        };
        let client = match &tls.cert {
            Some(_) => Some(pki.client()?),
            None => None,
        };
        let wanted = [
            (Some(&tls.ca), Some(pki.ca()), 0o644),
            (
                tls.cert.as_ref(),
                client.as_ref().map(|c| c.cert.clone()),
                0o644,
            ),
            (
                tls.key.as_ref(),
                client.as_ref().map(|c| c.key.clone()),
                0o600,
            ),
        ];
        for (pem, made, mode) in wanted {
            let (Some(pem), Some(made)) = (pem, made) else {
                continue;
            };
            let SecretSource::File(target) = &pem.source else {
                continue;
            };
            let target = PathBuf::from(target);
            let content = fs::read_to_string(&made)
                .map_err(|e| LabError::Io(format!("read {}: {e}", made.display())))?;
            match fs::read_to_string(&target) {
                Ok(existing) if existing == content => {}
                Ok(_) => {
                    return Err(LabError::Spec(format!(
                        "{} holds something else than the lab's etcd TLS file; remove it or name another path",
                        target.display()
                    )));
                }
                Err(_) => {
                    services::write_private(&target, &content, mode)?;
                    if !state.created_files.contains(&target) {
                        state.created_files.push(target);
                    }
                }
            }
        }
        Ok(Some(pki))
    }

    /// Wait until every etcd member that runs reports healthy.
    pub fn wait_etcd(&self, timeout: Duration) -> Result<(), LabError> {
        let deadline = std::time::Instant::now() + timeout;
        for (node, member) in self.topology.etcd_nodes() {
            while !services::etcd_healthy(node, member) {
                if std::time::Instant::now() > deadline {
                    return Err(LabError::NotReady(format!(
                        "etcd member {} on {} is not healthy after {}s (log: {})",
                        member.name,
                        node.address,
                        timeout.as_secs(),
                        self.state_dir
                            .join("etcd")
                            .join(format!("{}.log", member.name))
                            .display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Remove everything the lab made. Safe to run at any time, any number of times.
    pub fn down(&self) -> Result<(), LabError> {
        Self::require_root()?;
        let t = &self.topology;
        let state = self.load_state();
        // Every namespace named after this lab's /24, also those of hosts a later spec dropped.
        let mut namespaces = net::namespaces_with_prefix(&format!("crl{}-", t.subnet));
        for ns in t.nodes.iter().map(|n| n.ns.clone()).chain([t.bridge_ns()]) {
            if !namespaces.contains(&ns) {
                namespaces.push(ns);
            }
        }
        for ns in &namespaces {
            if net::ns_exists(ns) {
                sys::kill_all_in(ns)?;
            }
        }
        net::remove(t, &namespaces)?;
        // The members' disks: data and install folders of every host, now and ever.
        let mut dirs: Vec<PathBuf> = state.member_dirs.clone();
        for h in self.spec.hosts() {
            for dir in [&h.data_dir, &h.install_dir] {
                if owned_by_member(dir, &self.spec.cluster, &h.name) {
                    dirs.push(PathBuf::from(dir));
                }
            }
        }
        // A managed etcd's members' folders (data, configuration, log), and the data they
        // set aside when removed (`data.removed-*`, inside).
        for m in &self.spec.etcd.members {
            if owned_by_member(&m.dir, &self.spec.cluster, &m.name) {
                dirs.push(PathBuf::from(&m.dir));
            }
        }
        for dir in &dirs {
            remove_dir(dir)?;
            // Copies the agent set aside (`{data_dir}.{reason}-{time}`) are the member's too.
            for copy in set_aside_copies(dir) {
                remove_dir(&copy)?;
            }
            prune_empty_parents(dir, 1);
        }
        for dir in &state.made_dirs {
            remove_dir(dir)?;
            for copy in set_aside_copies(dir) {
                remove_dir(&copy)?;
            }
        }
        let lab_addresses: Vec<String> = t
            .nodes
            .iter()
            .flat_map(|n| {
                n.ssh_ports
                    .iter()
                    .map(move |p| services::known_host_name(n, *p))
            })
            .collect();
        for file in &state.known_hosts {
            services::forget_known_hosts(file, &lab_addresses)?;
        }
        for file in &state.created_files {
            let _ = fs::remove_file(file);
        }
        for key in &state.created_keys {
            let _ = fs::remove_file(key);
            let _ = fs::remove_file(key.with_extension("pub"));
            if let Some(parent) = key.parent() {
                // Only if the lab's key folder is now empty.
                let _ = fs::remove_dir(parent);
            }
        }
        remove_dir(&self.state_dir)
    }

    fn node(&self, name: &str) -> Result<&topology::Node, LabError> {
        self.topology
            .node(name)
            .ok_or_else(|| LabError::UnknownNode(name.to_string()))
    }

    /// Power-cut a node: SIGKILL every process in its namespace.
    pub fn crash(&self, name: &str) -> Result<(), LabError> {
        Self::require_root()?;
        let node = self.node(name)?;
        sys::kill_all_in(&node.ns)
    }

    pub fn partition(&self, name: &str, etcd_only: bool) -> Result<(), LabError> {
        Self::require_root()?;
        net::partition(&self.topology, self.node(name)?, etcd_only)
    }

    pub fn heal(&self, name: &str) -> Result<(), LabError> {
        Self::require_root()?;
        net::heal(self.node(name)?)
    }

    /// Run a command inside a node's namespace (tests use it to act from a host).
    pub fn exec(&self, name: &str, program: &str, args: &[&str]) -> Result<String, LabError> {
        sys::run_in(Some(&self.node(name)?.ns), program, args)
    }

    /// The namespace of a node, for callers that start their own processes in it.
    pub fn namespace(&self, name: &str) -> Result<String, LabError> {
        Ok(self.node(name)?.ns.clone())
    }

    pub fn status(&self) -> Vec<NodeStatus> {
        let state = self.load_state();
        self.topology
            .nodes
            .iter()
            .map(|n| {
                let exists = net::ns_exists(&n.ns);
                let pid = |svc: &str| state.pids.get(&n.ns).and_then(|p| p.get(svc)).copied();
                let sshd = (!n.ssh_ports.is_empty())
                    .then(|| exists && pid("sshd").is_some_and(|p| sys::alive_in(p, &n.ns)));
                let etcd = n
                    .etcd
                    .as_ref()
                    .map(|m| exists && services::etcd_healthy(n, m));
                let mut names = n.members.clone();
                if let Some(e) = &n.etcd {
                    names.push(e.name.clone());
                }
                NodeStatus {
                    node: names.join(","),
                    namespace: n.ns.clone(),
                    address: n.address.to_string(),
                    exists,
                    sshd,
                    etcd,
                    processes: if exists { sys::pids_in(&n.ns).len() } else { 0 },
                    partition: if exists {
                        net::partition_state(n)
                    } else {
                        String::new()
                    },
                }
            })
            .collect()
    }
}

/// A folder is the member's to delete only if its path names the cluster or the member, so a
/// spec pointing `data_dir` at a shared place can never make `lab down` wipe it.
fn owned_by_member(dir: &str, cluster: &str, member: &str) -> bool {
    let path = Path::new(dir);
    let deep_enough = path.components().count() >= 4;
    let named = path.components().any(|c| {
        c.as_os_str() == member
            || c.as_os_str() == cluster
            || c.as_os_str().to_string_lossy().contains(member)
    });
    deep_enough && named
}

/// Siblings of `dir` the agent set aside: `{its name}.{reason}-{unix time}`.
fn set_aside_copies(dir: &Path) -> Vec<PathBuf> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    fs::read_dir(parent)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            file.strip_prefix(&prefix)
                .and_then(|rest| rest.rsplit_once('-'))
                .is_some_and(|(reason, time)| {
                    !reason.is_empty()
                        && !time.is_empty()
                        && time.chars().all(|c| c.is_ascii_digit())
                })
        })
        .map(|e| e.path())
        .collect()
}

/// The highest ancestor of `dir` (or `dir` itself) that does not exist, if `dir` does not.
fn first_missing_ancestor(dir: &Path) -> Option<PathBuf> {
    if !dir.is_absolute() || dir.exists() {
        return None;
    }
    let mut missing = dir.to_path_buf();
    while let Some(parent) = missing.parent() {
        if parent.exists() || parent.parent().is_none() {
            break;
        }
        missing = parent.to_path_buf();
    }
    (missing.parent().is_some()).then_some(missing)
}

fn remove_dir(dir: &Path) -> Result<(), LabError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LabError::Io(format!("remove {}: {e}", dir.display()))),
    }
}

/// Remove now-empty parents (e.g. `/var/lib/postgresql/15/{cluster}`), at most `levels` up.
fn prune_empty_parents(dir: &Path, levels: usize) {
    let mut current = dir.parent();
    for _ in 0..levels {
        match current {
            Some(p) if fs::remove_dir(p).is_ok() => current = p.parent(),
            _ => break,
        }
    }
}
