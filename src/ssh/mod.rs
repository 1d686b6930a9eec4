//! SSH transport (russh): connect with verified host keys, authenticate by key file or
//! ssh-agent, run commands with exit status and timeout, upload files atomically, and forward
//! TCP connections (SQL to a host's PostgreSQL travels through SSH, so the reconciler only ever
//! needs to reach SSH and etcd).
//!
//! Host keys are always verified against the spec's known_hosts. An unknown host is refused
//! unless `accept_new` is set (then it is recorded); a changed key is always refused. That policy
//! is ours: russh reports "unknown" as Ok(false) and leaves the decision to us.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{self, HashAlg, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, ChannelStream};

pub mod script;
pub use script::{Quoted, Script, quote, quote_words};

/// Where and how to reach one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Member name, for messages.
    pub name: String,
    pub address: String,
    pub port: u16,
    pub user: String,
    pub identity_file: Option<PathBuf>,
    pub known_hosts: PathBuf,
}

impl Target {
    /// The host of a managed etcd member.
    pub fn of_etcd(m: &crate::spec::model::EtcdMemberSpec) -> Self {
        Self {
            name: format!("etcd member {}", m.name),
            address: m.address.clone(),
            port: m.ssh.port,
            user: m.ssh.user.clone(),
            identity_file: m.ssh.identity_file.clone(),
            known_hosts: m.ssh.known_hosts.clone(),
        }
    }

    pub fn of(host: &crate::spec::HostSpec) -> Self {
        Self {
            name: host.name.clone(),
            address: host.address.clone(),
            port: host.ssh.port,
            user: host.ssh.user.clone(),
            identity_file: host.ssh.identity_file.clone(),
            known_hosts: host.ssh.known_hosts.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{host}: cannot connect to {addr}: {detail}")]
    Connect {
        host: String,
        addr: String,
        detail: String,
    },
    #[error(
        "{host}: unknown host key for {addr} ({fingerprint}); not in {known_hosts}\n  = hint: verify the fingerprint, then add it with `ssh-keyscan -p {port} {address} >> {known_hosts}` or rerun with --accept-new-host-keys"
    )]
    UnknownHostKey {
        host: String,
        addr: String,
        address: String,
        port: u16,
        fingerprint: String,
        known_hosts: String,
    },
    #[error(
        "{host}: HOST KEY CHANGED for {addr} (now {fingerprint}; {known_hosts} line {line} has another key). Refusing to connect: this can be a machine-in-the-middle attack.\n  = hint: if the host was really reinstalled, remove line {line} from {known_hosts}"
    )]
    HostKeyChanged {
        host: String,
        addr: String,
        fingerprint: String,
        known_hosts: String,
        line: usize,
    },
    #[error("{host}: authentication as {user} failed: {detail}")]
    Auth {
        host: String,
        user: String,
        detail: String,
    },
    #[error("{host}: `{step}` failed (exit {status}): {stderr}")]
    Command {
        host: String,
        step: String,
        status: u32,
        stderr: String,
    },
    #[error("{host}: `{step}` timed out after {secs}s")]
    Timeout {
        host: String,
        step: String,
        secs: u64,
    },
    #[error("{host}: {detail}")]
    Protocol { host: String, detail: String },
}

/// Output of a remote command.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

/// Why a host key was refused, reported out of the russh handler.
#[derive(Debug, Clone)]
enum KeyProblem {
    Unknown(String),
    Changed(String, usize),
    Unreadable(String),
}

struct Client {
    address: String,
    port: u16,
    known_hosts: PathBuf,
    accept_new: bool,
    problem: Arc<Mutex<Option<KeyProblem>>>,
}

impl Client {
    fn record(&self, p: KeyProblem) {
        if let Ok(mut slot) = self.problem.lock() {
            *slot = Some(p);
        }
    }
}

/// The key a host offers against the keys recorded for it: Ok(true) recorded, Ok(false)
/// nothing recorded for this host (new), Err(KeyChanged) when keys are recorded and the
/// offered one is not among them — also when it is of another algorithm than those, which
/// is how a host impersonated with a fresh key would look (never "new", so never recorded
/// by `--accept-new-host-keys`).
fn judge_host_key(
    recorded: &[(usize, PublicKey)],
    offered: &PublicKey,
) -> Result<bool, keys::Error> {
    if recorded.iter().any(|(_, k)| k == offered) {
        return Ok(true);
    }
    match recorded.first() {
        Some((line, _)) => Err(keys::Error::KeyChanged { line: *line }),
        None => Ok(false),
    }
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let known = if self.known_hosts.exists() {
            keys::known_hosts::known_host_keys_path(&self.address, self.port, &self.known_hosts)
                .and_then(|recorded| judge_host_key(&recorded, key))
        } else {
            Ok(false)
        };
        match known {
            Ok(true) => Ok(true),
            Ok(false) if self.accept_new => {
                // Record the new key; a changed key never reaches this branch.
                match keys::known_hosts::learn_known_hosts_path(
                    &self.address,
                    self.port,
                    key,
                    &self.known_hosts,
                ) {
                    Ok(()) => Ok(true),
                    Err(e) => {
                        self.record(KeyProblem::Unreadable(format!(
                            "cannot record the host key in {}: {e}",
                            self.known_hosts.display()
                        )));
                        Ok(false)
                    }
                }
            }
            Ok(false) => {
                self.record(KeyProblem::Unknown(fingerprint));
                Ok(false)
            }
            Err(keys::Error::KeyChanged { line }) => {
                self.record(KeyProblem::Changed(fingerprint, line));
                Ok(false)
            }
            Err(e) => {
                self.record(KeyProblem::Unreadable(format!(
                    "cannot read {}: {e}",
                    self.known_hosts.display()
                )));
                Ok(false)
            }
        }
    }
}

/// Host-key policy and limits for a run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub accept_new_host_keys: bool,
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            accept_new_host_keys: false,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Write stdin to `path` atomically (a temporary file beside it, then a rename), with `mode`
/// and `owner` set before the rename.
pub fn upload_script(dir: &str, name: &str, path: &str, mode: u32, owner: &str) -> Script {
    Script::render(
        "set -e; mkdir -p {dir}; t=$(mktemp {tmp}); trap 'rm -f \"$t\"' EXIT; cat > \"$t\"; chmod {mode} \"$t\"; chown {owner} \"$t\"; mv -f \"$t\" {path}; trap - EXIT",
        &[
            ("dir", &quote(dir)),
            ("tmp", &quote(&format!("{dir}/.{name}.XXXXXX"))),
            ("mode", &quote(&format!("{mode:o}"))),
            ("owner", &quote(owner)),
            ("path", &quote(path)),
        ],
    )
}

/// An authenticated SSH connection to one host. Cheap to share: commands open channels.
pub struct Session {
    handle: Handle<Client>,
    pub target: Target,
}

impl Session {
    pub async fn connect(target: &Target, options: Options) -> Result<Session, SshError> {
        let addr = format!("{}:{}", target.address, target.port);
        let problem = Arc::new(Mutex::new(None));
        let handler = Client {
            address: target.address.clone(),
            port: target.port,
            known_hosts: target.known_hosts.clone(),
            accept_new: options.accept_new_host_keys,
            problem: problem.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let connecting = client::connect(config, addr.clone(), handler);
        let result = tokio::time::timeout(options.connect_timeout, connecting).await;
        let key_problem = problem.lock().ok().and_then(|p| p.clone());
        let mut handle = match (result, key_problem) {
            (_, Some(KeyProblem::Unknown(fingerprint))) => {
                return Err(SshError::UnknownHostKey {
                    host: target.name.clone(),
                    addr,
                    address: target.address.clone(),
                    port: target.port,
                    fingerprint,
                    known_hosts: target.known_hosts.display().to_string(),
                });
            }
            (_, Some(KeyProblem::Changed(fingerprint, line))) => {
                return Err(SshError::HostKeyChanged {
                    host: target.name.clone(),
                    addr,
                    fingerprint,
                    known_hosts: target.known_hosts.display().to_string(),
                    line,
                });
            }
            (_, Some(KeyProblem::Unreadable(detail))) => {
                return Err(SshError::Connect {
                    host: target.name.clone(),
                    addr,
                    detail,
                });
            }
            (Err(_), None) => {
                return Err(SshError::Connect {
                    host: target.name.clone(),
                    addr,
                    detail: format!("timed out after {}s", options.connect_timeout.as_secs()),
                });
            }
            (Ok(Err(e)), None) => {
                return Err(SshError::Connect {
                    host: target.name.clone(),
                    addr,
                    detail: e.to_string(),
                });
            }
            (Ok(Ok(h)), None) => h,
        };
        let auth =
            tokio::time::timeout(options.connect_timeout, authenticate(&mut handle, target)).await;
        match auth {
            Ok(Ok(())) => Ok(Session {
                handle,
                target: target.clone(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SshError::Auth {
                host: target.name.clone(),
                user: target.user.clone(),
                detail: format!("timed out after {}s", options.connect_timeout.as_secs()),
            }),
        }
    }

    /// Whether commands must go through sudo.
    fn needs_sudo(&self) -> bool {
        self.target.user != "root"
    }

    fn wrap(&self, script: &Script) -> Script {
        if self.needs_sudo() {
            Script::render("sudo -n sh -c {script}", &[("script", &script.quoted())])
        } else {
            script.clone()
        }
    }

    /// Run a command (through sudo when the login user is not root), feeding `stdin` if given.
    /// `step` names the command in errors.
    pub async fn exec(
        &self,
        step: &str,
        command: &Script,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, SshError> {
        let host = self.target.name.clone();
        let run = async {
            let channel =
                self.handle
                    .channel_open_session()
                    .await
                    .map_err(|e| SshError::Protocol {
                        host: host.clone(),
                        detail: format!("cannot open a channel: {e}"),
                    })?;
            channel
                .exec(true, self.wrap(command).text())
                .await
                .map_err(|e| SshError::Protocol {
                    host: host.clone(),
                    detail: format!("cannot start `{step}`: {e}"),
                })?;
            // Read while writing: russh queues a message per window adjustment on the channel,
            // and a full queue would stall the whole session while we are still sending.
            let (mut read, write) = channel.split();
            let writer = async {
                if let Some(data) = stdin {
                    write.data(data).await.map_err(|e| SshError::Protocol {
                        host: host.clone(),
                        detail: format!("cannot send input to `{step}`: {e}"),
                    })?;
                }
                // Always close our side: commands reading stdin must not wait forever.
                let _ = write.eof().await;
                Ok::<_, SshError>(write)
            };
            let reader = async {
                let mut out = Output::default();
                let mut status = None;
                while let Some(msg) = read.wait().await {
                    match msg {
                        ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                        ChannelMsg::ExtendedData { data, ext: 1 } => {
                            out.stderr.extend_from_slice(&data)
                        }
                        ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                        ChannelMsg::ExitSignal { signal_name, .. } => {
                            out.stderr.extend_from_slice(
                                format!("killed by signal {signal_name:?}").as_bytes(),
                            );
                            status = Some(255);
                        }
                        _ => {}
                    }
                }
                (out, status)
            };
            let (written, (mut out, status)) = tokio::join!(writer, reader);
            let _write_half = written?;
            out.status = status.unwrap_or(255);
            Ok(out)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(SshError::Timeout {
                host,
                step: step.to_string(),
                secs: timeout.as_secs(),
            }),
        }
    }

    /// Run a command that must succeed; returns its stdout.
    pub async fn run(
        &self,
        step: &str,
        command: &Script,
        timeout: Duration,
    ) -> Result<String, SshError> {
        let out = self.exec(step, command, None, timeout).await?;
        if out.status != 0 {
            return Err(SshError::Command {
                host: self.target.name.clone(),
                step: step.to_string(),
                status: out.status,
                stderr: last_lines(&out.stderr_text(), 5),
            });
        }
        Ok(out.stdout_text())
    }

    /// Write a file atomically: a temporary file in the same folder, mode and owner set,
    /// then renamed over the target. Readers never see a partial file.
    pub async fn upload(
        &self,
        path: &str,
        content: &[u8],
        mode: u32,
        owner: &str,
        timeout: Duration,
    ) -> Result<(), SshError> {
        let dir = Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into());
        let name = Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let script = upload_script(&dir, &name, path, mode, owner);
        let out = self
            .exec(&format!("upload {path}"), &script, Some(content), timeout)
            .await?;
        if out.status != 0 {
            return Err(SshError::Command {
                host: self.target.name.clone(),
                step: format!("upload {path}"),
                status: out.status,
                stderr: last_lines(&out.stderr_text(), 5),
            });
        }
        Ok(())
    }

    /// Open a TCP connection from the host to `address:port` (e.g. its own PostgreSQL).
    pub async fn forward(
        &self,
        address: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<ChannelStream<client::Msg>, SshError> {
        let open = self
            .handle
            .channel_open_direct_tcpip(address, u32::from(port), "127.0.0.1", 0);
        match tokio::time::timeout(timeout, open).await {
            Ok(Ok(channel)) => Ok(channel.into_stream()),
            Ok(Err(e)) => Err(SshError::Protocol {
                host: self.target.name.clone(),
                detail: format!("cannot forward to {address}:{port}: {e}"),
            }),
            Err(_) => Err(SshError::Timeout {
                host: self.target.name.clone(),
                step: format!("forward to {address}:{port}"),
                secs: timeout.as_secs(),
            }),
        }
    }

    /// Open a connection from the host to a unix socket on it (e.g. PostgreSQL's, where the
    /// agent's local trust rule needs no password). Needs a login that may open the socket.
    pub async fn forward_socket(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<ChannelStream<client::Msg>, SshError> {
        let open = self.handle.channel_open_direct_streamlocal(path);
        match tokio::time::timeout(timeout, open).await {
            Ok(Ok(channel)) => Ok(channel.into_stream()),
            Ok(Err(e)) => Err(SshError::Protocol {
                host: self.target.name.clone(),
                detail: format!("cannot forward to {path}: {e}"),
            }),
            Err(_) => Err(SshError::Timeout {
                host: self.target.name.clone(),
                step: format!("forward to {path}"),
                secs: timeout.as_secs(),
            }),
        }
    }

    pub async fn close(&self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

async fn authenticate(handle: &mut Handle<Client>, target: &Target) -> Result<(), SshError> {
    let fail = |detail: String| SshError::Auth {
        host: target.name.clone(),
        user: target.user.clone(),
        detail,
    };
    if let Some(path) = &target.identity_file {
        let key = keys::load_secret_key(path, None).map_err(|e| {
            fail(format!(
                "cannot load key {}: {e} (passphrase-protected keys are used through ssh-agent: leave identity_file out)",
                path.display()
            ))
        })?;
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        let result = handle
            .authenticate_publickey(
                target.user.clone(),
                PrivateKeyWithHashAlg::new(Arc::new(key), hash),
            )
            .await
            .map_err(|e| fail(e.to_string()))?;
        if result.success() {
            return Ok(());
        }
        return Err(fail(format!("the server refused key {}", path.display())));
    }
    let mut agent = keys::agent::client::AgentClient::connect_env()
        .await
        .map_err(|e| {
            fail(format!(
                "no identity_file in the spec and no usable ssh-agent (SSH_AUTH_SOCK): {e}"
            ))
        })?;
    let identities = agent
        .request_identities()
        .await
        .map_err(|e| fail(format!("ssh-agent: {e}")))?;
    let hash = handle
        .best_supported_rsa_hash()
        .await
        .ok()
        .flatten()
        .flatten();
    for key in identities {
        if let Ok(result) = handle
            .authenticate_publickey_with(target.user.clone(), key, hash, &mut agent)
            .await
        {
            if result.success() {
                return Ok(());
            }
        }
    }
    Err(fail(
        "the server accepted none of the ssh-agent's keys".into(),
    ))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_host_offering_an_unrecorded_key_has_changed_whatever_its_algorithm() {
        let parse = |b64: &str| keys::parse_public_key_base64(b64).expect("key");
        let ed = parse("AAAAC3NzaC1lZDI1NTE5AAAAIEoCBql0z13UFwdp/1JZFK2pnbjOmqA42xIuUW+5UvI8");
        let ecdsa = parse(
            "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEfYrsiZPbFLNrzT9picAYxaYlPRUU2l2AgduK8SMkt71e3zLUxmUZrEpikmB8WDLgv6SeVvqxXSjiu1mtmqCI0=",
        );
        assert!(
            matches!(judge_host_key(&[], &ed), Ok(false)),
            "nothing recorded: new"
        );
        assert!(matches!(judge_host_key(&[(3, ed.clone())], &ed), Ok(true)));
        assert!(matches!(
            judge_host_key(&[(1, ecdsa.clone()), (2, ed.clone())], &ed),
            Ok(true)
        ));
        // Only an ECDSA key recorded, an Ed25519 one offered: changed, not new.
        assert!(matches!(
            judge_host_key(&[(7, ecdsa)], &ed),
            Err(keys::Error::KeyChanged { line: 7 })
        ));
    }
}
