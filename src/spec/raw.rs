//! The spec as it is written on disk: serde types for YAML, and the source of the JSON Schema.
//!
//! These types are a boundary, not the model the rest of the program uses: they keep what the
//! user wrote (optional overrides stay optional) and deny unknown fields so a typo fails. The
//! validated, defaults-applied model lives in `model.rs`. Doc comments here become the
//! descriptions in the published JSON Schema, so they are written for users.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "citus-reconcile/v1";

/// Desired state of one Citus cluster: its etcd, its PostgreSQL settings and the hosts of each
/// Citus group (group 0 is the coordinator, 1..N are workers).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "citus-reconcile spec v1")]
pub struct RawSpec {
    /// Format version; must be `citus-reconcile/v1`.
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// Cluster name: lower-case letters, digits and `-`, 1 to 63 characters. It is the etcd scope
    /// and part of every default path on a host.
    pub cluster: String,
    pub etcd: RawEtcd,
    #[serde(default)]
    pub ssh: RawSsh,
    pub postgres: RawPostgres,
    #[serde(default)]
    pub citus: RawCitus,
    #[serde(default)]
    pub ha: RawHa,
    #[serde(default)]
    pub agent: RawAgent,
    /// The Citus groups: exactly one group 0 (the coordinator) and any number of worker groups.
    pub groups: Vec<RawGroup>,
}

/// The etcd cluster used for leader election and member state.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    /// Client URLs of an etcd you run, `http://host:port` (the port defaults to 2379). Give
    /// either these or `members`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Managed etcd: the hosts that run it (dedicated ones or database hosts), installed,
    /// formed into one cluster and kept by `apply`, which adds and removes members one at a
    /// time. The endpoints are theirs. Give either these or `endpoints`.
    #[serde(default)]
    pub members: Vec<RawEtcdMember>,
    /// Key prefix; keys live under `{namespace}/{cluster}/{group}/`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// etcd user and password (etcd's authentication, `etcdctl auth enable`), used by
    /// citus-reconcile and by every agent. The user needs read-write access to the
    /// namespace's keys.
    #[serde(default)]
    pub auth: Option<RawCredential>,
    /// TLS to etcd: required by `https://` endpoints, refused with `http://` ones.
    #[serde(default)]
    pub tls: Option<RawEtcdTls>,
}

/// One member of a managed etcd.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEtcdMember {
    /// Member name, unique among the etcd members: a DNS label.
    pub name: String,
    /// IP address or DNS name of its host, which the reconciler reaches over SSH.
    pub address: String,
    /// Client port (the endpoint's).
    #[serde(default = "default_client_port")]
    #[schemars(range(min = 1))]
    pub client_port: u16,
    /// Peer port (between members).
    #[serde(default = "default_peer_port")]
    #[schemars(range(min = 1))]
    pub peer_port: u16,
    /// Folder of the member's data, configuration and log (`{cluster}` and `{member}` are
    /// replaced).
    #[serde(default = "default_etcd_dir")]
    pub dir: String,
    #[serde(default)]
    pub ssh: Option<RawSshOverride>,
}

fn default_client_port() -> u16 {
    2379
}
fn default_peer_port() -> u16 {
    2380
}
fn default_etcd_dir() -> String {
    "/var/lib/citus-reconcile/etcd/{cluster}-{member}".into()
}

/// TLS material for etcd, each a PEM text given as `{file: PATH}` or `{env: NAME}` on the
/// machine running citus-reconcile; `apply` hands it to every agent in the agent's 0600
/// configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEtcdTls {
    /// The CA certificate(s) that signed etcd's server certificates. The server certificates
    /// must name the endpoints' hosts (an IP address as an IP subject alternative name).
    pub ca: RawSecret,
    /// A client certificate, when etcd checks them (`--client-cert-auth`); needs `key`.
    #[serde(default)]
    pub cert: Option<RawSecret>,
    /// The client certificate's private key (a secret: keep it out of Git).
    #[serde(default)]
    pub key: Option<RawSecret>,
}

fn default_namespace() -> String {
    "/service".into()
}

/// SSH defaults for every host. Host keys are always verified against `known_hosts`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSsh {
    /// Login user; commands run through `sudo` when it is not `root`.
    #[serde(default = "default_ssh_user")]
    pub user: String,
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Private key file. When absent, keys from the running ssh-agent (`SSH_AUTH_SOCK`) are used.
    /// Relative paths resolve against the spec file's folder; `~/` against `$HOME`.
    #[serde(default)]
    pub identity_file: Option<String>,
    /// known_hosts file that host keys are checked against.
    #[serde(default = "default_known_hosts")]
    pub known_hosts: String,
}

impl Default for RawSsh {
    fn default() -> Self {
        Self {
            user: default_ssh_user(),
            port: default_ssh_port(),
            identity_file: None,
            known_hosts: default_known_hosts(),
        }
    }
}

fn default_ssh_user() -> String {
    "root".into()
}
fn default_ssh_port() -> u16 {
    22
}
fn default_known_hosts() -> String {
    "~/.ssh/known_hosts".into()
}

/// Per-host SSH settings; any field left out falls back to the top-level `ssh`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSshOverride {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    #[serde(default)]
    pub identity_file: Option<String>,
    #[serde(default)]
    pub known_hosts: Option<String>,
}

/// Citus's apt repository (packagecloud's layout: `{url}/{debian|ubuntu}/ {codename} main`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCitusRepository {
    /// Base URL; default `https://repos.citusdata.com/community`.
    #[serde(default = "default_citus_repository_url")]
    pub url: String,
    /// Where its signing key is downloaded from (on the host); default `{url}/gpgkey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_url: Option<String>,
    /// The signing key's fingerprint (40 hex digits, spaces allowed): the downloaded key is
    /// refused unless it is exactly this key. Default: the key of packagecloud's
    /// citusdata/community repository (see `plan::repository::CITUS_KEY_FINGERPRINT`).
    #[serde(default = "default_citus_key_fingerprint")]
    pub key_fingerprint: String,
}

fn default_citus_key_fingerprint() -> String {
    crate::plan::repository::CITUS_KEY_FINGERPRINT.into()
}

fn default_citus_repository_url() -> String {
    "https://repos.citusdata.com/community".into()
}

/// Where `install: apt` takes PostgreSQL from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PgRepository {
    /// The distribution's own archive (Debian 12 has PostgreSQL 15, Ubuntu 24.04 has 16).
    #[default]
    Distribution,
    /// The PostgreSQL project's repository (apt.postgresql.org), for the other versions; its
    /// key is the one Debian's postgresql-common ships, checked against a pinned fingerprint.
    Pgdg,
}

/// How PostgreSQL gets onto a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Install {
    /// Install `postgresql-{version}` (and `citus.package`, if set) with apt.
    Apt,
    /// The binaries are already present in `bin_dir`.
    None,
}

/// PostgreSQL settings shared by every member.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// Major version, 13 to 17.
    #[serde(default = "default_pg_version")]
    pub version: u32,
    #[serde(default = "default_pg_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    #[serde(default = "default_install")]
    pub install: Install,
    /// With `install: apt`: an HTTP proxy every `apt-get` that `apply` runs goes through
    /// (`http://host:port`, e.g. an apt-cacher-ng), for hosts without a direct way to the
    /// archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apt_proxy: Option<String>,
    /// With `install: apt`: more Debian packages every member gets with PostgreSQL, and
    /// holds, such as extensions (`postgresql-15-hll`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_packages: Vec<String>,
    /// With `install: apt`: where PostgreSQL's packages come from.
    #[serde(default)]
    pub repository: PgRepository,
    /// Folder of the PostgreSQL programs; default `/usr/lib/postgresql/{version}/bin`.
    #[serde(default)]
    pub bin_dir: Option<String>,
    /// Data directory; default `/var/lib/postgresql/{version}/{cluster}/{member}`. The strings
    /// `{version}`, `{cluster}` and `{member}` are replaced.
    #[serde(default)]
    pub data_dir: Option<String>,
    pub superuser: RawCredential,
    pub replication: RawCredential,
    /// Extra server parameters. Parameters the agent owns (port, replication settings, paths)
    /// are refused; `shared_preload_libraries` always gets `citus` first.
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamValue>,
    /// Extra pg_hba.conf lines, placed before the rules the agent adds for replication and Citus.
    #[serde(default)]
    pub pg_hba: Vec<String>,
}

fn default_pg_version() -> u32 {
    15
}
fn default_pg_port() -> u16 {
    5432
}
fn default_install() -> Install {
    Install::Apt
}

/// A PostgreSQL role and its password.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub username: String,
    pub password: RawSecret,
}

/// A secret, written as `{env: NAME}`, `{file: PATH}` or a plain string. `env` reads an
/// environment variable of the machine running citus-reconcile; `file` reads a file there
/// (relative to the spec's folder; one trailing newline is dropped). A plain string is allowed
/// but warned about.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RawSecret {
    Plain(String),
    Env(EnvRef),
    File(FileRef),
}

/// Read the secret from an environment variable.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvRef {
    pub env: String,
}

/// Read the secret from a file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub file: String,
}

/// A server parameter value, written as YAML scalars are.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl ParamValue {
    /// The value as postgresql.conf spells it.
    pub fn to_conf(&self) -> String {
        match self {
            ParamValue::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            ParamValue::Int(i) => i.to_string(),
            ParamValue::Float(f) => f.to_string(),
            ParamValue::Text(s) => s.clone(),
        }
    }
}

/// Citus settings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCitus {
    /// Database that holds the Citus extension.
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default)]
    pub authinfo: RawAuthInfo,
    /// Register standbys as `secondary` nodes in `pg_dist_node`, for read scaling.
    #[serde(default)]
    pub secondaries: bool,
    /// Keep shards spread over the worker groups: whenever Citus's rebalancer has moves to
    /// make (a worker group joined, say), `apply` runs `citus_rebalance_start` and follows it.
    #[serde(default)]
    pub rebalance: bool,
    /// apt package that provides the Citus extension (e.g. `postgresql-15-citus-13.2`), installed
    /// when `postgres.install` is `apt`. When absent, the extension must already be present.
    #[serde(default)]
    pub package: Option<String>,
    /// With `install: apt`: Citus's apt repository, from which `package` is installed. Its
    /// key is trusted only if its fingerprint is the one given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RawCitusRepository>,
    /// Seconds a worker group's writes may be held (paused) on the coordinator while its
    /// leadership changes hands; the pause is rolled back after that, whatever happened.
    #[serde(default = "default_pause_timeout")]
    pub pause_timeout: u32,
    /// Milliseconds to wait for transactions in flight on a group before the coordinator
    /// terminates those still holding it up when it pauses or moves the group
    /// (`citus_update_node`'s `lock_cooldown`).
    #[serde(default = "default_lock_cooldown_ms")]
    pub lock_cooldown_ms: u32,
    /// Hold a worker group's writes on the coordinator while its leadership changes hands in a
    /// switchover, so they wait instead of failing.
    #[serde(default = "yes")]
    pub pause_on_switchover: bool,
    /// Also pause a worker group's writes when its primary is lost unexpectedly (the
    /// coordinator's probe fails or its leader key goes), until a new primary runs or
    /// `pause_timeout` passes: writes wait instead of failing for the whole failover.
    #[serde(default)]
    pub pause_on_loss: bool,
    /// A PgBouncer on every worker member, which Citus's connections to the workers go
    /// through (`pg_dist_poolinfo`). Off when absent.
    #[serde(default)]
    pub pooler: Option<RawPooler>,
}

/// PgBouncer in front of each worker member (session pooling).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPooler {
    /// Port PgBouncer listens on, at each worker member's address.
    #[serde(default = "default_pooler_port")]
    pub port: u16,
    /// Server connections per user and database (PgBouncer's `default_pool_size`). Default:
    /// PostgreSQL's `max_connections` less 10. A pool smaller than what Citus opens to a worker
    /// at once (up to `citus.max_adaptive_executor_pool_size`, 16, per distributed statement)
    /// makes a statement wait for connections it holds itself.
    #[serde(default)]
    pub pool_size: Option<u32>,
    /// Client connections PgBouncer accepts (its `max_client_conn`).
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: u32,
}

fn default_pooler_port() -> u16 {
    6432
}

fn default_max_client_conn() -> u32 {
    500
}

impl Default for RawCitus {
    fn default() -> Self {
        Self {
            database: default_database(),
            authinfo: RawAuthInfo::default(),
            secondaries: false,
            rebalance: false,
            package: None,
            repository: None,
            pause_timeout: default_pause_timeout(),
            lock_cooldown_ms: default_lock_cooldown_ms(),
            pause_on_switchover: true,
            pause_on_loss: false,
            pooler: None,
        }
    }
}

fn default_pause_timeout() -> u32 {
    30
}

fn default_lock_cooldown_ms() -> u32 {
    10_000
}

fn default_database() -> String {
    "citus".into()
}

/// What goes into `pg_dist_authinfo` for the superuser's connections between nodes.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAuthInfo {
    /// Include the superuser password.
    #[serde(default = "yes")]
    pub password: bool,
    /// Client certificate path on the hosts.
    #[serde(default)]
    pub sslcert: Option<String>,
    /// Client key path on the hosts.
    #[serde(default)]
    pub sslkey: Option<String>,
}

impl Default for RawAuthInfo {
    fn default() -> Self {
        Self {
            password: true,
            sslcert: None,
            sslkey: None,
        }
    }
}

fn yes() -> bool {
    true
}

/// Leader election and failover settings (Patroni's names and meanings).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHa {
    /// Leader lease in seconds; must be at least `loop_wait + 2 * retry_timeout`, and at least 5.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 1))]
    pub ttl: u32,
    /// Longest sleep between two agent cycles, in seconds (events wake the agent sooner).
    #[serde(default = "default_loop_wait")]
    #[schemars(range(min = 1))]
    pub loop_wait: u32,
    /// Timeout for one etcd or PostgreSQL operation, in seconds.
    #[serde(default = "default_retry_timeout")]
    #[schemars(range(min = 1))]
    pub retry_timeout: u32,
    /// `off` (or false), `on` (or true): a standby confirms commits while one is healthy;
    /// `strict`: commits wait for a synchronous standby even when none is available.
    #[serde(default)]
    pub synchronous_mode: RawSyncMode,
    /// A standby whose WAL is further behind the leader than this many bytes never promotes.
    #[serde(default = "default_max_lag")]
    pub maximum_lag_on_failover: u64,
    /// Seconds a leader's PostgreSQL may take to start as primary (crash recovery included)
    /// before the leader gives the key up so a standby takes over; 0 fails over at once
    /// rather than restart in place. Patroni's `primary_start_timeout`.
    #[serde(default = "default_primary_start_timeout")]
    pub primary_start_timeout: u32,
    /// A physical replication slot on the primary for every other member of its group
    /// (Patroni's member slots), so a standby that falls behind or restarts finds the WAL it
    /// needs. Bounded by `max_slot_wal_keep_size` (4GB unless `postgres.parameters` sets it):
    /// a standby that falls further behind is cloned again.
    #[serde(default = "default_true")]
    pub use_slots: bool,
    /// Seconds a member's slot outlives its member key (the member is down or gone) before
    /// the primary drops it.
    #[serde(default = "default_member_slots_ttl")]
    pub member_slots_ttl: u32,
    /// A Linux watchdog device (Patroni's `watchdog`): while this member runs the primary, the
    /// agent's guard process keeps it from resetting the machine only as long as the lease
    /// is surely valid, so a host whose kernel or guard hangs is reset before another member
    /// can have been promoted. The guard itself (a second fence in its own process) runs
    /// whatever the mode.
    #[serde(default)]
    pub watchdog: RawWatchdog,
}

/// `ha.watchdog`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWatchdog {
    /// `off`: no device; `automatic`: use the device when it can be activated; `required`: a
    /// member never leads without an active device.
    #[serde(default)]
    pub mode: WatchdogMode,
    /// The watchdog device (absolute path); `/dev/watchdog` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WatchdogMode {
    #[default]
    Off,
    Automatic,
    Required,
}

/// Where the watchdog device is when the spec does not say.
pub const DEFAULT_WATCHDOG_DEVICE: &str = "/dev/watchdog";

fn default_true() -> bool {
    true
}

fn default_member_slots_ttl() -> u32 {
    1800
}

fn default_primary_start_timeout() -> u32 {
    300
}

impl Default for RawHa {
    fn default() -> Self {
        Self {
            ttl: default_ttl(),
            loop_wait: default_loop_wait(),
            retry_timeout: default_retry_timeout(),
            synchronous_mode: RawSyncMode::default(),
            maximum_lag_on_failover: default_max_lag(),
            primary_start_timeout: default_primary_start_timeout(),
            use_slots: true,
            member_slots_ttl: default_member_slots_ttl(),
            watchdog: RawWatchdog::default(),
        }
    }
}

fn default_ttl() -> u32 {
    30
}
fn default_loop_wait() -> u32 {
    10
}
fn default_retry_timeout() -> u32 {
    10
}
fn default_max_lag() -> u64 {
    1_048_576
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RawSyncMode {
    Bool(bool),
    Named(SyncModeName),
}

impl Default for RawSyncMode {
    fn default() -> Self {
        RawSyncMode::Bool(false)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SyncModeName {
    Off,
    On,
    Strict,
}

/// How the agent runs on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// A systemd unit, `citus-reconcile-{cluster}-{member}.service`.
    Systemd,
    /// A detached, self-supervising process with a pid file (hosts without systemd, the lab).
    Process,
}

/// The per-host HA agent.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// Port of the agent's REST API (health checks for load balancers, switchover).
    #[serde(default = "default_api_port")]
    #[schemars(range(min = 1))]
    pub api_port: u16,
    #[serde(default = "default_service")]
    pub service: ServiceKind,
    /// Folder for the agent's binary, configuration, logs and sockets; default
    /// `/var/lib/citus-reconcile/{cluster}/{member}`.
    #[serde(default)]
    pub install_dir: Option<String>,
    /// Basic-auth credentials required by the REST API's write endpoints (switchover, restart…).
    /// When absent, those endpoints are refused.
    #[serde(default)]
    pub api_auth: Option<RawCredential>,
    /// Require `api_auth` for the read endpoints that reveal the cluster (`/status`,
    /// `/patroni`, `/cluster`, `/metrics`) too. Health checks (`/primary`, `/replica`, …)
    /// stay open: load balancers call them.
    #[serde(default)]
    pub api_auth_reads: bool,
    /// Serve the REST API over TLS: a certificate (chain) valid for every host's address and
    /// its key, as PEM from `{file: PATH}` or `{env: NAME}`.
    #[serde(default)]
    pub api_tls: Option<RawApiTls>,
}

/// The REST API's server certificate and key.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawApiTls {
    pub cert: RawSecret,
    pub key: RawSecret,
}

impl Default for RawAgent {
    fn default() -> Self {
        Self {
            api_port: default_api_port(),
            service: default_service(),
            install_dir: None,
            api_auth: None,
            api_auth_reads: false,
            api_tls: None,
        }
    }
}

fn default_api_port() -> u16 {
    8008
}
fn default_service() -> ServiceKind {
    ServiceKind::Systemd
}

/// One Citus group and the hosts that serve it.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    /// Group id: 0 for the coordinator, 1..N for workers.
    pub group: u32,
    /// Members of the group; one is the primary, the others stream from it.
    pub hosts: Vec<RawHost>,
}

/// One machine running one PostgreSQL instance and one agent.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    /// Member name, unique in the cluster: a DNS label (lower-case letters, digits, `-`).
    pub name: String,
    /// IP address or DNS name that the reconciler, the other members and Citus use.
    pub address: String,
    #[serde(default)]
    pub ssh: Option<RawSshOverride>,
    #[serde(default)]
    pub postgres: Option<RawHostPostgres>,
    #[serde(default)]
    pub agent: Option<RawHostAgent>,
    #[serde(default)]
    pub tags: Option<RawTags>,
}

/// Per-host PostgreSQL overrides.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHostPostgres {
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    #[serde(default)]
    pub data_dir: Option<String>,
}

/// Per-host agent overrides.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHostAgent {
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub api_port: Option<u16>,
    #[serde(default)]
    pub install_dir: Option<String>,
}

/// Patroni-style member tags.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTags {
    /// Never promote this member.
    #[serde(default)]
    pub nofailover: bool,
    /// Report this member as unavailable for read load balancing.
    #[serde(default)]
    pub noloadbalance: bool,
}

/// The JSON Schema of spec v1, as published in `specs/citus-reconcile.v1.schema.json`.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(RawSpec)).unwrap_or(serde_json::Value::Null)
}
