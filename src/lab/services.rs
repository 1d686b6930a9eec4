//! What runs on a lab node the way it would on a booted VM: sshd (with its own host key,
//! accepting root by the lab's key) and, on etcd nodes, an etcd member. Also the client side:
//! the lab's key pair and the known_hosts entries with the real host keys.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::LabError;
use super::sys::{alive_in, run, spawn_detached, wait_for_tcp};
use super::topology::{EtcdMember, Node, Topology};

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |e| LabError::Io(format!("{what}: {e}"))
}

pub fn write_private(path: &Path, content: &str, mode: u32) -> Result<(), LabError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    // Private keys among them: the mode holds from the first byte, never a moment open.
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(format!("create {}", tmp.display())))?;
    std::io::Write::write_all(&mut f, content.as_bytes())
        .map_err(io(format!("write {}", tmp.display())))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io(format!("rename to {}", path.display())))
}

/// Make sure an ed25519 key pair exists at `private`; returns the public key line.
pub fn ensure_keypair(private: &Path, comment: &str) -> Result<String, LabError> {
    if let Some(parent) = private.parent() {
        fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    let p = private.to_string_lossy().into_owned();
    if !private.exists() {
        run(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", &p],
        )?;
    }
    let public = run("ssh-keygen", &["-y", "-f", &p])?;
    Ok(public.trim().to_string())
}

fn node_dir(state: &Path, node: &Node) -> PathBuf {
    state.join("nodes").join(&node.ns)
}

/// The host's public key, as it appears in known_hosts (type and key).
pub fn host_public_key(state: &Path, node: &Node) -> Result<String, LabError> {
    let key = node_dir(state, node).join("ssh_host_ed25519_key");
    let public = run("ssh-keygen", &["-y", "-f", &key.to_string_lossy()])?;
    Ok(public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// Start sshd in a node unless it already runs there; returns its pid.
pub fn ensure_sshd(state: &Path, node: &Node, known_pid: Option<u32>) -> Result<u32, LabError> {
    if let Some(pid) = known_pid.filter(|p| alive_in(*p, &node.ns)) {
        return Ok(pid);
    }
    let dir = node_dir(state, node);
    fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io("chmod node dir"))?;
    ensure_keypair(
        &dir.join("ssh_host_ed25519_key"),
        &format!("lab host {}", node.address),
    )?;
    let listen: String = node
        .ssh_ports
        .iter()
        .map(|p| format!("ListenAddress {}:{p}\n", node.address))
        .collect();
    let config = format!(
        "{listen}HostKey {dir}/ssh_host_ed25519_key\nPidFile none\nAuthorizedKeysFile {state}/authorized_keys\n\
         PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         UsePAM no\nPrintMotd no\nUseDNS no\nStrictModes yes\nMaxStartups 200:30:400\nMaxSessions 100\n\
         Subsystem sftp internal-sftp\n\
         # Lab hosts behave like fresh VMs, whose root .bashrc returns at once for non-interactive\n\
         # shells; this machine's may not. With SHLVL set, bash skips .bashrc for ssh commands.\n\
         SetEnv SHLVL=1\n",
        dir = dir.display(),
        state = state.display()
    );
    let config_path = dir.join("sshd_config");
    write_private(&config_path, &config, 0o600)?;
    // sshd's privilege separation folder.
    fs::create_dir_all("/run/sshd").map_err(io("create /run/sshd"))?;
    let cfg = config_path.to_string_lossy().into_owned();
    run("/usr/sbin/sshd", &["-t", "-f", &cfg])?;
    let hostname = node.members.first().map(String::as_str);
    spawn_detached(
        &node.ns,
        hostname,
        &dir.join("sshd.log"),
        "/usr/sbin/sshd",
        &["-D", "-e", "-f", &cfg],
    )
}

/// Start this node's etcd member unless it already runs; returns its pid.
pub fn ensure_etcd(
    state: &Path,
    t: &Topology,
    node: &Node,
    member: &EtcdMember,
    pki: Option<&super::pki::Pki>,
    known_pid: Option<u32>,
) -> Result<u32, LabError> {
    if let Some(pid) = known_pid.filter(|p| alive_in(*p, &node.ns)) {
        return Ok(pid);
    }
    let dir = state.join("etcd");
    fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let data = dir.join(&member.name);
    let scheme = if member.tls { "https" } else { "http" };
    let client = format!("{scheme}://{}:{}", node.address, member.client_port);
    let peer = format!("http://{}:{}", node.address, member.peer_port);
    let token = format!("crl{}-{}", t.subnet, t.cluster);
    let initial = t.etcd_initial_cluster();
    let data_s = data.to_string_lossy().into_owned();
    let mut args = vec![
        "--name",
        &member.name,
        "--data-dir",
        &data_s,
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &initial,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        &token,
        // Lab disks are shared by every member: keep the WAL small and the snapshots rare.
        "--snapshot-count",
        "10000",
        "--quota-backend-bytes",
        "268435456",
    ];
    let tls_args: Vec<String> = match (member.tls, pki) {
        (false, _) => Vec::new(),
        (true, None) => {
            return Err(LabError::Spec(format!(
                "etcd member {} speaks TLS but the lab has no CA",
                member.name
            )));
        }
        (true, Some(pki)) => {
            let server = pki.server(&member.name, &[node.address])?;
            let mut a = vec![
                "--cert-file".to_string(),
                server.cert.to_string_lossy().into_owned(),
                "--key-file".into(),
                server.key.to_string_lossy().into_owned(),
                "--trusted-ca-file".into(),
                pki.ca().to_string_lossy().into_owned(),
                "--listen-metrics-urls".into(),
                format!("http://{}:{}", node.address, member.metrics_port()),
            ];
            if member.client_cert_auth {
                a.push("--client-cert-auth".into());
            }
            a
        }
    };
    args.extend(tls_args.iter().map(String::as_str));
    spawn_detached(
        &node.ns,
        Some(&member.name),
        &dir.join(format!("{}.log", member.name)),
        "etcd",
        &args,
    )
}

/// Whether an etcd member reports itself healthy (it has a leader).
pub fn etcd_healthy(node: &Node, member: &EtcdMember) -> bool {
    use std::io::{Read, Write};
    let port = if member.tls {
        member.metrics_port()
    } else {
        member.client_port
    };
    let addr = std::net::SocketAddr::from((node.address, port));
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

pub fn wait_sshd(node: &Node, timeout: Duration) -> bool {
    node.ssh_ports
        .iter()
        .all(|p| wait_for_tcp(std::net::SocketAddr::from((node.address, *p)), timeout))
}

/// Replace this lab's lines in a known_hosts file (keeping everyone else's).
pub fn write_known_hosts(path: &Path, entries: &[(String, String)]) -> Result<(), LabError> {
    let hosts: Vec<&str> = entries.iter().map(|(h, _)| h.as_str()).collect();
    let existing = fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_none_or(|h| !hosts.contains(&h))
        })
        .map(str::to_string)
        .collect();
    lines.extend(entries.iter().map(|(h, k)| format!("{h} {k}")));
    write_private(path, &(lines.join("\n") + "\n"), 0o600)
}

/// Remove this lab's lines from a known_hosts file; delete it when nothing else is left.
pub fn forget_known_hosts(path: &Path, hosts: &[String]) -> Result<(), LabError> {
    let Ok(existing) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = existing
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_none_or(|h| !hosts.iter().any(|x| x == h))
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    if kept.is_empty() {
        fs::remove_file(path).map_err(io(format!("remove {}", path.display())))
    } else {
        write_private(path, &(kept.join("\n") + "\n"), 0o600)
    }
}

/// The known_hosts name of an address and port (`[addr]:port` unless the port is 22).
pub fn known_host_name(node: &Node, port: u16) -> String {
    if port == 22 {
        node.address.to_string()
    } else {
        format!("[{}]:{port}", node.address)
    }
}
