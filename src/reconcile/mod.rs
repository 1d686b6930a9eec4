//! observe → plan → apply: the reconciler an operator or CI runs. `Run` holds one run's
//! connections (SSH sessions, etcd) and the desired state; `apply` executes a plan phase by
//! phase; `status` summarises the cluster like `patronictl list`.

pub mod apply;
pub mod etcd;
pub mod lock;
pub mod progress;
pub mod rebalance;
pub mod status;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::agent::config::AgentConfig;
use crate::citus::metadata::{self, AuthinfoRow};
use crate::dcs::Dcs;
use crate::observe::{self, Sessions};
use crate::plan::{self, Desired, HostDesired, Observed, Plan};
use crate::postgres::conf;
use crate::spec::Spec;
use crate::spec::model::InstallMode;
use crate::ssh;

#[derive(Debug, Clone)]
pub struct Options {
    pub parallelism: usize,
    pub accept_new_host_keys: bool,
    /// The binary uploaded as the agent (default: this executable).
    pub agent_binary: PathBuf,
    /// How long `apply` waits for the agents to converge.
    pub timeout: Duration,
    pub allow_destroy: bool,
    /// How long `apply` waits for another apply's lock before failing.
    pub lock_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot read the agent binary {path}: {detail}")]
    Binary { path: String, detail: String },
    #[error("{0}")]
    Blocked(String),
    #[error("{host}: {step}: {detail}")]
    Step {
        host: String,
        step: String,
        detail: String,
    },
    #[error("{0}")]
    Lock(String),
    #[error("{0}")]
    Timeout(String),
}

/// The agent binary to install: its bytes are read only when an upload is needed.
#[derive(Debug, Clone)]
pub struct AgentBinary {
    pub path: PathBuf,
    pub sha256: String,
}

impl AgentBinary {
    pub fn open(path: &std::path::Path) -> Result<AgentBinary, ReconcileError> {
        let bytes = std::fs::read(path).map_err(|e| ReconcileError::Binary {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(AgentBinary {
            path: path.to_path_buf(),
            sha256: sha256_hex(&bytes),
        })
    }
    pub fn bytes(&self) -> Result<Vec<u8>, ReconcileError> {
        std::fs::read(&self.path).map_err(|e| ReconcileError::Binary {
            path: self.path.display().to_string(),
            detail: e.to_string(),
        })
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the spec asks for, as plain values for `plan::diff`.
pub fn desired(spec: &Spec, binary_sha256: &str) -> Desired {
    let mut hosts = BTreeMap::new();
    for h in spec.hosts() {
        let cfg = AgentConfig::for_host(spec, h);
        let rendered = cfg.render();
        hosts.insert(
            h.name.clone(),
            HostDesired {
                name: h.name.clone(),
                group: h.group,
                address: h.address.clone(),
                pg_port: h.pg_port,
                pg_major: spec.postgres.version,
                install: spec.postgres.install,
                packages: match spec.postgres.install {
                    InstallMode::Apt => spec.postgres_packages(h),
                    InstallMode::None => vec![],
                },
                extra_packages: match spec.postgres.install {
                    InstallMode::Apt => spec.postgres.extra_packages.clone(),
                    InstallMode::None => vec![],
                },
                pgdg: spec.postgres.install == InstallMode::Apt
                    && spec.postgres.repository == crate::spec::raw::PgRepository::Pgdg,
                citus_package: spec.citus.package.clone(),
                citus_repository: match spec.postgres.install {
                    InstallMode::Apt => spec.citus.repository.clone(),
                    InstallMode::None => None,
                },
                service: spec.agent.service,
                agent_config_sha256: sha256_hex(rendered.as_bytes()),
                agent_config_redacted: cfg.render_redacted(),
                secret_digests: cfg.secret_digests(),
                postgresql_conf: conf::render_postgresql_conf(&cfg),
            },
        );
    }
    let authinfo = metadata::authinfo_string(
        spec.citus
            .authinfo
            .password
            .then_some(&spec.postgres.superuser.password),
        spec.citus.authinfo.sslcert.as_deref(),
        spec.citus.authinfo.sslkey.as_deref(),
    )
    .map(|authinfo| AuthinfoRow {
        nodeid: 0,
        rolename: spec.postgres.superuser.username.clone(),
        authinfo,
    });
    Desired {
        cluster: spec.cluster.clone(),
        groups: spec
            .groups
            .iter()
            .map(|g| (g.id, g.hosts.iter().map(|h| h.name.clone()).collect()))
            .collect(),
        hosts,
        binary_sha256: binary_sha256.to_string(),
        secondaries: spec.citus.secondaries,
        rebalance: spec.citus.rebalance,
        superuser: spec.postgres.superuser.username.clone(),
        authinfo,
        pooler_port: spec.citus.pooler.as_ref().map(|p| p.port),
        role_passwords: [&spec.postgres.superuser, &spec.postgres.replication]
            .into_iter()
            .map(|c| (c.username.clone(), c.password.clone()))
            .collect(),
        etcd_members: spec
            .etcd
            .members
            .iter()
            .map(|m| plan::etcd::EtcdMemberDesired {
                name: m.name.clone(),
                address: m.address.clone(),
                peer_url: m.peer_url(),
                client_url: m.client_url(),
                dir: m.dir.clone(),
            })
            .collect(),
        etcd_install: spec.postgres.install,
    }
}

/// One run's connections and targets.
pub struct Run {
    pub spec: Spec,
    pub options: Options,
    pub binary: AgentBinary,
    pub desired: Desired,
    pub sessions: Sessions,
    pub dcs: Option<Dcs>,
    pub etcd_error: Option<String>,
    /// Set when the apply lock's lease is lost: every step checks it first.
    pub lock_lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set when the process was asked to stop (`watch` on SIGTERM): the same check stops
    /// an apply before its next step, and it releases its lock on the way out.
    pub stop_requested: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Run {
    pub async fn open(spec: &Spec, options: Options) -> Result<Run, ReconcileError> {
        let t0 = std::time::Instant::now();
        let binary = AgentBinary::open(&options.agent_binary)?;
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            "hashed the agent binary"
        );
        let ssh_options = ssh::Options {
            accept_new_host_keys: options.accept_new_host_keys,
            ..Default::default()
        };
        let (sessions, dcs) = tokio::join!(
            Sessions::connect(spec, ssh_options, options.parallelism),
            observe::connect_etcd(spec)
        );
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "connected");
        let (dcs, etcd_error) = match dcs {
            Ok(d) => (Some(d), None),
            // A managed etcd may not run yet: apply starts it, then this client connects.
            Err(_) if !spec.etcd.members.is_empty() => (observe::unproven_etcd(spec).ok(), None),
            Err(e) => (None, Some(e)),
        };
        Ok(Run {
            desired: desired(spec, &binary.sha256),
            spec: spec.clone(),
            options,
            binary,
            sessions,
            dcs,
            etcd_error,
            lock_lost: Default::default(),
            stop_requested: Default::default(),
        })
    }

    /// Whether this run's connections and agent binary serve an edited spec too: every host
    /// reached the same way and the same etcd (a parameter edit, say). `watch` then plans
    /// an edit at once instead of connecting again.
    pub fn can_serve(&self, spec: &Spec) -> bool {
        let targets = |s: &Spec| -> Vec<ssh::Target> { s.hosts().map(ssh::Target::of).collect() };
        targets(&self.spec) == targets(spec)
            && self.spec.etcd.endpoints == spec.etcd.endpoints
            && self.spec.etcd.namespace == spec.etcd.namespace
            && self.spec.cluster == spec.cluster
    }

    /// This run for an edited spec (see `can_serve`).
    pub fn with_spec(mut self, spec: &Spec) -> Run {
        self.desired = desired(spec, &self.binary.sha256);
        self.spec = spec.clone();
        self
    }

    /// Err when this run's apply lock was lost: stop before the next step.
    pub fn check_lock(&self) -> Result<(), ReconcileError> {
        if self
            .stop_requested
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(ReconcileError::Lock(
                "asked to stop: stopped before the next step — run apply again to finish".into(),
            ));
        }
        if self.lock_lost.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ReconcileError::Lock(
                "the apply lock's lease was lost (etcd unreachable for longer than its time to live); stopped before the next step — run apply again".into(),
            ));
        }
        Ok(())
    }

    pub async fn observe(&self) -> Observed {
        let t0 = std::time::Instant::now();
        let mut o = observe::observe(
            &self.spec,
            &self.sessions,
            self.dcs.as_ref(),
            self.options.parallelism,
        )
        .await;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "observed");
        if let Some(e) = &self.etcd_error {
            o.etcd.error = Some(e.clone());
        }
        o
    }

    pub fn plan(&self, observed: &Observed) -> Plan {
        plan::diff(&self.desired, observed)
    }

    pub async fn close(&self) {
        self.sessions.close().await;
    }
}
