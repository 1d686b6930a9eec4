//! The values `plan` works on: what is wanted (`Desired`, built by `reconcile` from the spec)
//! and what is there (`Observed`, filled by `observe`). Plain data, no I/O.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::citus::metadata::{AuthinfoRow, NodeRow};
use crate::dcs::keys::MemberInfo;
use crate::spec::model::{InstallMode, Service};

#[derive(Debug, Clone, Serialize)]
pub struct Desired {
    pub cluster: String,
    /// Group id → member names, in spec order.
    pub groups: BTreeMap<u32, Vec<String>>,
    pub hosts: BTreeMap<String, HostDesired>,
    /// SHA-256 of the agent binary that would be uploaded.
    pub binary_sha256: String,
    pub secondaries: bool,
    /// `citus.rebalance`.
    pub rebalance: bool,
    pub superuser: String,
    /// The (0, superuser) row every primary's pg_dist_authinfo should hold.
    pub authinfo: Option<AuthinfoRow>,
    /// `citus.pooler`'s port: every worker member runs PgBouncer there.
    pub pooler_port: Option<u16>,
    /// The passwords the superuser and the replication role should have, by role name.
    #[serde(skip)]
    pub role_passwords: BTreeMap<String, crate::spec::secret::Secret>,
    /// A managed etcd's members (`etcd.members`; empty when etcd is the operator's).
    pub etcd_members: Vec<super::etcd::EtcdMemberDesired>,
    /// How etcd gets onto their hosts (`postgres.install`).
    pub etcd_install: InstallMode,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostDesired {
    pub name: String,
    pub group: u32,
    pub address: String,
    pub pg_port: u16,
    /// `postgres.version`: the PostgreSQL major version.
    pub pg_major: u32,
    pub install: InstallMode,
    /// apt packages to install (empty with `install: none`).
    pub packages: Vec<String>,
    /// `postgres.extra_packages`: installed wherever dpkg does not list them (also on hosts
    /// that have PostgreSQL already).
    pub extra_packages: Vec<String>,
    /// `postgres.repository: pgdg`: the PostgreSQL project's apt repository is added first.
    pub pgdg: bool,
    pub citus_package: Option<String>,
    /// Citus's apt repository (`citus.repository`, with `install: apt`).
    pub citus_repository: Option<super::repository::CitusRepository>,
    pub service: Service,
    pub agent_config_sha256: String,
    pub agent_config_redacted: String,
    #[serde(skip)]
    pub secret_digests: BTreeMap<String, String>,
    pub postgresql_conf: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Observed {
    pub hosts: BTreeMap<String, HostObserved>,
    pub etcd: EtcdObserved,
    /// A managed etcd's hosts and membership (None when etcd is the operator's).
    pub managed_etcd: Option<super::etcd::ManagedEtcdObserved>,
    /// pg_dist_node as the coordinator's primary sees it (None: no coordinator primary yet,
    /// or it could not be read — see `metadata_error`).
    pub nodes: Option<Vec<NodeRow>>,
    /// pg_dist_authinfo of each group's primary.
    pub authinfo: BTreeMap<u32, Vec<AuthinfoRow>>,
    /// pg_dist_poolinfo (beside pg_dist_node) of each group's primary.
    pub poolinfo: BTreeMap<u32, Vec<crate::citus::metadata::PoolinfoRow>>,
    /// Stored password verifiers (`pg_authid.rolpassword`) of the superuser and the
    /// replication role on each group's primary, by role. Never shown.
    #[serde(skip)]
    pub role_verifiers: BTreeMap<u32, BTreeMap<String, String>>,
    pub metadata_error: Option<String>,
    /// `pg_settings.context` of every parameter, as the coordinator's primary reports it:
    /// which changes a reload takes and which need a restart (empty: unknown, so restart).
    #[serde(skip)]
    pub parameter_contexts: BTreeMap<String, String>,
    /// Where shards are and what the rebalancer would do (None: not readable, e.g. no
    /// coordinator primary yet, or a Citus without the rebalancer).
    pub shards: Option<ShardsObserved>,
}

/// Shard placement and rebalancing, as the coordinator's primary sees them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShardsObserved {
    /// Shards of distributed tables (not reference tables) on each group.
    pub per_group: BTreeMap<u32, u32>,
    /// Moves the rebalancer would make now (`get_rebalance_table_shards_plan()`).
    pub planned_moves: u32,
    /// Distributed tables without a replica identity: their shards cannot move while
    /// writes go on (logical replication needs one).
    pub without_replica_identity: Vec<String>,
    /// The latest rebalance job, while it runs.
    pub running_job: Option<RebalanceJob>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RebalanceJob {
    pub job_id: i64,
    pub state: String,
    pub done: u32,
    pub total: u32,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "reachable", rename_all = "lowercase")]
// One value per host per observation: its size does not matter, boxing would only add noise.
#[allow(clippy::large_enum_variant)]
pub enum HostObserved {
    #[serde(rename = "no")]
    Unreachable { error: String },
    #[serde(rename = "yes")]
    Reachable(HostFacts),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HostFacts {
    pub os: String,
    /// The release codename (`VERSION_CODENAME` of /etc/os-release), for apt repositories.
    pub codename: Option<String>,
    /// SHA-256 of the sources files `apply` wrote, by repository name.
    pub repositories: BTreeMap<String, String>,
    pub login_user: String,
    pub apt: bool,
    /// `postgres --version` output, when the binaries are present.
    pub postgres_version: Option<String>,
    pub citus_available: bool,
    /// `pgbouncer` is on the service PATH (for `citus.pooler`).
    pub pgbouncer_available: bool,
    pub data_dir: DataDirState,
    /// The major version the data directory was made with (its PG_VERSION file).
    pub data_major: Option<u32>,
    /// The data directory's system identifier (from pg_controldata).
    pub sysid: Option<String>,
    pub agent_binary_sha256: Option<String>,
    pub agent_config_sha256: Option<String>,
    /// The config on the host with secrets replaced (None when absent or unreadable).
    pub agent_config_redacted: Option<String>,
    /// Digests of the secrets in that config (see `AgentConfig::secret_digests`); never shown.
    #[serde(skip)]
    pub secret_digests: BTreeMap<String, String>,
    /// The postmaster's pid file said "ready" or "standby" just before postgresql.conf was
    /// read: the file is then the one the agent wrote before it started the server, not
    /// initdb's or a clone's copy of the leader's, which the agent has yet to replace.
    pub postgres_ready: bool,
    pub postgresql_conf: Option<String>,
    /// Parameters set with `ALTER SYSTEM` (postgresql.auto.conf), which override the spec.
    /// Names only: values may hold secrets (a conninfo, say).
    pub alter_system: Vec<String>,
    pub agent_pid: Option<u32>,
    pub unit_installed: bool,
    /// The systemd unit's state (`agent.service: systemd`), e.g. "failed (exit-code),
    /// restarted 3 times".
    pub unit_state: Option<String>,
    /// The spec's packages as dpkg and apt know them (hosts with dpkg only).
    pub packages: BTreeMap<String, PackageState>,
}

/// One package on a host: its installed version, or the version apt would install from the
/// package lists the host has (as of its last `apt-get update`), and whether it is held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PackageState {
    pub installed: Option<String>,
    pub candidate: Option<String>,
    pub held: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataDirState {
    #[default]
    Absent,
    /// Files but no pg_control: an interrupted clone.
    Partial,
    Initialized,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EtcdObserved {
    pub error: Option<String>,
    pub groups: BTreeMap<u32, GroupObserved>,
    /// Keys no agent writes (a malformed member key, a leader key without a lease), left out
    /// of `groups`: for `status` to show.
    pub untrusted: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupObserved {
    pub leader: Option<String>,
    /// Present once bootstrap started; the system identifier once it finished.
    pub initialize: Option<String>,
    pub members: BTreeMap<String, MemberInfo>,
}
