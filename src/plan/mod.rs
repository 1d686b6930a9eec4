//! The plan: the ordered actions that turn what is observed into what the spec wants, with
//! diffs. `diff(desired, observed)` is pure; `render` turns a plan into text or JSON.
//! Nothing here reaches a host, etcd or PostgreSQL.

pub mod diff;
pub mod drift;
pub mod etcd;
pub mod model;
pub mod render;
pub mod repository;
pub mod saved;

use serde::Serialize;

pub use diff::diff;
pub use model::{
    DataDirState, Desired, EtcdObserved, GroupObserved, HostDesired, HostFacts, HostObserved,
    Observed, RebalanceJob, ShardsObserved,
};

/// Version of the JSON plan format.
pub const FORMAT_VERSION: u32 = 1;

/// When an action happens; phases run in this order, actions inside one in parallel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A managed etcd's members: installed, started, added (before anything else needs it).
    Etcd,
    /// Packages and folders.
    Prepare,
    /// Agent binary, configuration, service.
    Install,
    /// Start or restart agents.
    Start,
    /// What the agents do once running: bootstrap, clone, Citus metadata.
    Converge,
    /// Moving shards onto new worker groups (`citus.rebalance`), once they are registered.
    Rebalance,
    /// Removals (only with --allow-destroy).
    Destroy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Add,
    Change,
    Destroy,
}

/// What an action acts on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum Target {
    Host(String),
    Group(u32),
    Cluster,
    /// A member of a managed etcd.
    Etcd(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Kind {
    InstallPackages {
        packages: Vec<String>,
        /// The version each package would get, when the host's package lists know it.
        versions: std::collections::BTreeMap<String, String>,
        /// apt may change held packages: only where PostgreSQL is not installed yet.
        through_holds: bool,
    },
    /// etcd onto a managed member's host (Debian's etcd-server).
    EtcdInstall,
    /// Write a managed etcd member's configuration and start it: with every desired member
    /// as a new cluster, or as the member it is.
    EtcdStart {
        new_cluster: bool,
    },
    /// `member add`, then start it as a member of the existing cluster.
    EtcdAdd,
    /// `member remove` of a member the spec no longer has; its process stops.
    EtcdRemove {
        id: u64,
        peer_urls: Vec<String>,
    },
    /// An apt repository's sources file, written once the keyring it names was checked
    /// against the pinned key (`plan::repository`).
    AddAptRepository {
        name: String,
        sources: String,
        /// Where the host downloads the key; None: a keyring a distribution package ships.
        #[serde(skip_serializing_if = "Option::is_none")]
        key_url: Option<String>,
        fingerprint: String,
    },
    /// Installed packages that are no longer held (`apt-mark hold` again).
    HoldPackages {
        packages: Vec<String>,
    },
    CreateDirectories,
    UploadAgentBinary {
        sha256: String,
    },
    WriteAgentConfig,
    InstallService,
    StartAgent,
    RestartAgent {
        reason: String,
        /// Parameters standbys must keep at least as high as the primary that this change
        /// lowers ("max_connections 60 → 50"): the primary restarts first, in place.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        lowered: Vec<String>,
    },
    /// New secrets only: the agent takes them without a restart (SIGHUP).
    ReloadAgent {
        reason: String,
    },
    /// Roles or `pg_dist_authinfo` drifted while the agent has nothing new: a SIGHUP with the
    /// same configuration makes it set them up again.
    RecheckSetup,
    /// A role's password on a group's primary differs from the spec's (the agent sets it).
    RolePassword {
        group: u32,
        role: String,
    },
    /// Bootstrap a new group (the first agent to win the initialize key).
    BootstrapGroup,
    /// The agent brings this member's PostgreSQL up (clone or start).
    BringUpMember,
    /// A row of the coordinator's pg_dist_node.
    Node {
        change: crate::citus::metadata::NodeChange,
    },
    /// A row that will be added once the group has a leader.
    NodePending {
        group: u32,
    },
    Authinfo {
        group: u32,
        change: crate::citus::metadata::AuthinfoChange,
    },
    /// A row of a group primary's pg_dist_poolinfo (`citus.pooler`; the agents keep it).
    Poolinfo {
        group: u32,
        change: crate::citus::metadata::PoolinfoChange,
    },
    /// postgresql.conf differs from what the agent will write.
    PostgresConf,
    /// PostgreSQL runs other values than its files say until it restarts
    /// (`pg_settings.pending_restart`, published by the agent).
    PendingRestart {
        parameters: Vec<String>,
    },
    /// `ALTER SYSTEM` settings override the spec; the agent removes them when it reloads or
    /// starts PostgreSQL.
    AlterSystem {
        parameters: Vec<String>,
    },
    /// A member in etcd that the spec no longer has.
    RemoveMember {
        member: String,
        address: String,
    },
    /// A worker group that the spec no longer has: drain, then remove.
    RemoveGroup {
        group: u32,
    },
    /// Spread shards over every worker group (or follow the rebalance job that runs).
    Rebalance {
        transfer_mode: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Action {
    pub phase: Phase,
    pub target: Target,
    pub change: Change,
    #[serde(flatten)]
    pub kind: Kind,
    /// One line for humans.
    pub summary: String,
    /// A unified diff (secrets redacted), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub add: usize,
    pub change: usize,
    pub destroy: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub format_version: u32,
    pub cluster: String,
    pub actions: Vec<Action>,
    /// Problems that prevent applying (unreachable hosts, missing binaries…).
    pub errors: Vec<String>,
    pub summary: Summary,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
    pub fn has_destroys(&self) -> bool {
        self.summary.destroy > 0
    }
    /// Actions of one phase.
    pub fn phase(&self, phase: Phase) -> impl Iterator<Item = &Action> {
        self.actions.iter().filter(move |a| a.phase == phase)
    }
}
