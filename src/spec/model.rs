//! The validated spec: defaults applied, per-host overrides merged, paths and secrets resolved.
//!
//! This is what every other module receives. Each host remembers its place in the document
//! (`group_index`, `host_index`) so later checks can point at the field that caused a problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::diagnostic::{Diagnostic, FieldPath};
use super::raw::{
    Install, RawCredential, RawSecret, RawSpec, RawSyncMode, ServiceKind, SyncModeName,
};
use super::secret::{Secret, SecretSource};

pub use super::raw::{Install as InstallMode, ServiceKind as Service};

#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    /// The spec file, as given on the command line.
    pub file: PathBuf,
    /// Top-level SSH settings (hosts may override them), for members no longer in the spec.
    pub ssh_defaults: SshSpec,
    pub api_version: String,
    pub cluster: String,
    pub etcd: EtcdSpec,
    pub postgres: PostgresSpec,
    pub citus: CitusSpec,
    pub ha: HaSpec,
    pub agent: AgentSpec,
    pub groups: Vec<GroupSpec>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EtcdSpec {
    /// The endpoints: as given, or a managed etcd's members' client URLs.
    pub endpoints: Vec<String>,
    /// Managed etcd (`etcd.members`): the hosts `apply` runs etcd on. Empty when etcd is the
    /// operator's.
    pub members: Vec<EtcdMemberSpec>,
    /// `etcd.endpoints` was written (rules refuse it beside `members`).
    #[serde(skip)]
    pub endpoints_written: bool,
    pub namespace: String,
    /// etcd authentication (user and password), when etcd requires it.
    pub auth: Option<Credential>,
    /// TLS to etcd (`https://` endpoints).
    pub tls: Option<EtcdTls>,
}

/// One member of a managed etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EtcdMemberSpec {
    pub name: String,
    pub address: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// Its folder: `data/`, `etcd.conf.yml`, the pid file and the log.
    pub dir: String,
    pub ssh: SshSpec,
}

impl EtcdMemberSpec {
    pub fn client_url(&self) -> String {
        format!("http://{}:{}", url_host(&self.address), self.client_port)
    }
    pub fn peer_url(&self) -> String {
        format!("http://{}:{}", url_host(&self.address), self.peer_port)
    }
}

/// An address as the host part of a URL (IPv6 in brackets).
fn url_host(address: &str) -> String {
    if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]")
    } else {
        address.to_string()
    }
}

/// PEM texts for TLS to etcd, as read from their sources.
#[derive(Debug, Clone, Serialize)]
pub struct EtcdTls {
    pub ca: Pem,
    pub cert: Option<Pem>,
    pub key: Option<Pem>,
}

/// The REST API's server certificate and key.
#[derive(Debug, Clone, Serialize)]
pub struct ApiTls {
    pub cert: Pem,
    pub key: Pem,
}

/// A PEM text and where it came from. Held as a `Secret` so that neither `Debug` nor output
/// shows it (a private key is secret; certificates are merely long).
#[derive(Debug, Clone, Serialize)]
pub struct Pem {
    pub text: Secret,
    pub source: SecretSource,
}

#[derive(Debug, Clone, Serialize)]
pub struct PostgresSpec {
    pub version: u32,
    pub install: Install,
    pub apt_proxy: Option<String>,
    /// Installed with PostgreSQL on every member (`install: apt`).
    pub extra_packages: Vec<String>,
    pub repository: super::raw::PgRepository,
    pub bin_dir: String,
    pub superuser: Credential,
    pub replication: Credential,
    /// Extra parameters as postgresql.conf spells their values.
    pub parameters: BTreeMap<String, String>,
    pub pg_hba: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Credential {
    pub username: String,
    pub password: Secret,
    pub password_source: SecretSource,
}

#[derive(Debug, Clone, Serialize)]
pub struct CitusSpec {
    pub database: String,
    pub authinfo: AuthInfoSpec,
    pub secondaries: bool,
    pub rebalance: bool,
    pub package: Option<String>,
    /// Citus's apt repository (`citus.repository`), its key URL resolved.
    pub repository: Option<crate::plan::repository::CitusRepository>,
    pub pause_timeout: u32,
    pub lock_cooldown_ms: u32,
    pub pause_on_switchover: bool,
    pub pause_on_loss: bool,
    /// PgBouncer in front of every worker member (`citus.pooler`), if any.
    pub pooler: Option<PoolerSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PoolerSpec {
    pub port: u16,
    /// None: PostgreSQL's `max_connections` less 10 (see `postgres::pgbouncer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
    pub max_client_conn: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthInfoSpec {
    pub password: bool,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    Off,
    On,
    Strict,
}

#[derive(Debug, Clone, Serialize)]
pub struct HaSpec {
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
    pub synchronous_mode: SyncMode,
    pub maximum_lag_on_failover: u64,
    pub primary_start_timeout: u32,
    pub use_slots: bool,
    pub member_slots_ttl: u32,
    pub watchdog_mode: crate::spec::raw::WatchdogMode,
    pub watchdog_device: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentSpec {
    pub service: ServiceKind,
    pub api_auth: Option<Credential>,
    pub api_auth_reads: bool,
    pub api_tls: Option<ApiTls>,
    /// `agent.install_dir` with `{cluster}`/`{version}` expanded and `{member}` left in, for
    /// members that are no longer in the spec (they must still be found to be removed).
    pub install_dir_template: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupSpec {
    pub id: u32,
    pub hosts: Vec<HostSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshSpec {
    pub user: String,
    pub port: u16,
    pub identity_file: Option<PathBuf>,
    pub known_hosts: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tags {
    pub nofailover: bool,
    pub noloadbalance: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostSpec {
    pub name: String,
    pub address: String,
    pub group: u32,
    pub ssh: SshSpec,
    pub pg_port: u16,
    pub data_dir: String,
    pub api_port: u16,
    pub install_dir: String,
    pub tags: Tags,
    /// Position in the document, for diagnostics.
    #[serde(skip)]
    pub group_index: usize,
    #[serde(skip)]
    pub host_index: usize,
    /// Whether these were set on the host (rather than inherited), for diagnostics.
    #[serde(skip)]
    pub overrides: HostOverrides,
}

#[derive(Debug, Clone, Default)]
pub struct HostOverrides {
    pub pg_port: bool,
    pub data_dir: bool,
    pub api_port: bool,
    pub install_dir: bool,
}

impl HostSpec {
    pub fn path(&self) -> FieldPath {
        FieldPath::root()
            .key("groups")
            .index(self.group_index)
            .key("hosts")
            .index(self.host_index)
    }
    /// Folder for the unix socket of this member's PostgreSQL.
    pub fn socket_dir(&self) -> String {
        format!("{}/run", self.install_dir)
    }
}

impl Spec {
    pub fn hosts(&self) -> impl Iterator<Item = &HostSpec> {
        self.groups.iter().flat_map(|g| g.hosts.iter())
    }
    pub fn host(&self, name: &str) -> Option<&HostSpec> {
        self.hosts().find(|h| h.name == name)
    }
    pub fn group(&self, id: u32) -> Option<&GroupSpec> {
        self.groups.iter().find(|g| g.id == id)
    }
    /// Local files the spec reads secrets from (`watch` follows them).
    pub fn secret_files(&self) -> Vec<std::path::PathBuf> {
        [
            Some(&self.postgres.superuser),
            Some(&self.postgres.replication),
            self.agent.api_auth.as_ref(),
            self.etcd.auth.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|c| &c.password_source)
        .chain(self.etcd.tls.iter().flat_map(|t| {
            [Some(&t.ca), t.cert.as_ref(), t.key.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| &p.source)
        }))
        .chain(
            self.agent
                .api_tls
                .iter()
                .flat_map(|t| [&t.cert.source, &t.key.source]),
        )
        .filter_map(|s| match s {
            SecretSource::File(p) => Some(std::path::PathBuf::from(p)),
            _ => None,
        })
        .collect()
    }
    /// The PostgreSQL packages a member needs (with `install: apt`, what apply installs):
    /// `postgresql-{version}`, and PgBouncer on workers when `citus.pooler` is set.
    pub fn postgres_packages(&self, h: &HostSpec) -> Vec<String> {
        let mut p = vec![format!("postgresql-{}", self.postgres.version)];
        if self.citus.pooler.is_some() && h.group != 0 {
            p.push("pgbouncer".into());
        }
        p.extend(self.postgres.extra_packages.iter().cloned());
        p
    }
    /// Every package of a member that `plan` reports on: `postgres_packages` and
    /// `citus.package`.
    pub fn apt_packages(&self, h: &HostSpec) -> Vec<String> {
        let mut p = self.postgres_packages(h);
        p.extend(self.citus.package.iter().cloned());
        p
    }
    /// Install folder of a member by name, also for members no longer in the spec.
    pub fn install_dir_of(&self, member: &str) -> String {
        match self.host(member) {
            Some(h) => h.install_dir.clone(),
            None => self.agent.install_dir_template.replace("{member}", member),
        }
    }
    /// etcd key prefix of one group: `{namespace}/{cluster}/{group}/`.
    pub fn group_prefix(&self, group: u32) -> String {
        format!(
            "{}/{}/{}/",
            self.etcd.namespace.trim_end_matches('/'),
            self.cluster,
            group
        )
    }
}

/// What building the model may look up outside the document. Abstracted so tests need not
/// touch the process environment or the file system.
pub struct Context<'a> {
    /// Folder of the spec file; relative paths resolve against it.
    pub spec_dir: PathBuf,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub read_file: &'a dyn Fn(&Path) -> std::io::Result<String>,
    /// When false, secrets are not looked up (validation of shape only, e.g. in CI without them).
    pub resolve_secrets: bool,
    /// Resolve etcd's password even when `resolve_secrets` is off (commands that talk to
    /// etcd only).
    pub resolve_etcd_secret: bool,
}

impl Context<'_> {
    /// Expand `~/` and resolve relative paths against the spec's folder.
    /// Whether the secret at `path` is to be read.
    fn resolves(&self, path: &FieldPath) -> bool {
        self.resolve_secrets || (self.resolve_etcd_secret && path.to_string().starts_with("etcd."))
    }

    pub fn local_path(&self, p: &str) -> PathBuf {
        if let Some(rest) = p.strip_prefix("~/") {
            if let Some(home) = (self.env)("HOME") {
                return Path::new(&home).join(rest);
            }
        }
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.spec_dir.join(path)
        }
    }
}

/// Build the validated model. Secret problems are returned as diagnostics; everything else
/// the document can express has a value here, and `rules` judges it.
pub fn build(raw: &RawSpec, file: &Path, ctx: &Context<'_>) -> (Spec, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let version = raw.postgres.version;
    let mut credential = |c: &RawCredential, path: FieldPath| -> Credential {
        let (password, password_source) = resolve_secret(
            &c.password,
            &path.key("password"),
            SecretKind::PASSWORD,
            ctx,
            &mut diags,
        );
        Credential {
            username: c.username.clone(),
            password,
            password_source,
        }
    };
    let superuser = credential(
        &raw.postgres.superuser,
        FieldPath::root().key("postgres").key("superuser"),
    );
    let replication = credential(
        &raw.postgres.replication,
        FieldPath::root().key("postgres").key("replication"),
    );
    let etcd_auth = raw
        .etcd
        .auth
        .as_ref()
        .map(|c| credential(c, FieldPath::root().key("etcd").key("auth")));
    let api_auth = raw
        .agent
        .api_auth
        .as_ref()
        .map(|c| credential(c, FieldPath::root().key("agent").key("api_auth")));
    let mut pem = |r: &RawSecret, path: FieldPath, kind: SecretKind| {
        let (text, source) = resolve_secret(r, &path, kind, ctx, &mut diags);
        Pem { text, source }
    };
    let api_tls = raw.agent.api_tls.as_ref().map(|t| {
        let base = FieldPath::root().key("agent").key("api_tls");
        ApiTls {
            cert: pem(&t.cert, base.key("cert"), SecretKind::CERTIFICATE),
            key: pem(&t.key, base.key("key"), SecretKind::PRIVATE_KEY),
        }
    });
    let etcd_tls = raw.etcd.tls.as_ref().map(|t| {
        let base = FieldPath::root().key("etcd").key("tls");
        let mut pem = |r: &RawSecret, field: &str, kind: SecretKind| pem(r, base.key(field), kind);
        EtcdTls {
            ca: pem(&t.ca, "ca", SecretKind::CERTIFICATE),
            cert: t
                .cert
                .as_ref()
                .map(|c| pem(c, "cert", SecretKind::CERTIFICATE)),
            key: t
                .key
                .as_ref()
                .map(|k| pem(k, "key", SecretKind::PRIVATE_KEY)),
        }
    });

    let expand = |template: &str, member: &str| {
        template
            .replace("{version}", &version.to_string())
            .replace("{cluster}", &raw.cluster)
            .replace("{member}", member)
    };
    let default_data_dir = raw
        .postgres
        .data_dir
        .clone()
        .unwrap_or_else(|| "/var/lib/postgresql/{version}/{cluster}/{member}".into());
    let default_install_dir = raw
        .agent
        .install_dir
        .clone()
        .unwrap_or_else(|| "/var/lib/citus-reconcile/{cluster}/{member}".into());

    let etcd_members: Vec<EtcdMemberSpec> = raw
        .etcd
        .members
        .iter()
        .map(|m| {
            let ssh_o = m.ssh.clone().unwrap_or_default();
            let identity = ssh_o
                .identity_file
                .as_ref()
                .or(raw.ssh.identity_file.as_ref());
            EtcdMemberSpec {
                name: m.name.clone(),
                address: m.address.clone(),
                client_port: m.client_port,
                peer_port: m.peer_port,
                dir: m
                    .dir
                    .replace("{cluster}", &raw.cluster)
                    .replace("{member}", &m.name),
                ssh: SshSpec {
                    user: ssh_o.user.unwrap_or_else(|| raw.ssh.user.clone()),
                    port: ssh_o.port.unwrap_or(raw.ssh.port),
                    identity_file: identity.map(|p| ctx.local_path(p)),
                    known_hosts: ctx
                        .local_path(ssh_o.known_hosts.as_ref().unwrap_or(&raw.ssh.known_hosts)),
                },
            }
        })
        .collect();

    let mut groups = Vec::new();
    for (gi, g) in raw.groups.iter().enumerate() {
        let mut hosts = Vec::new();
        for (hi, h) in g.hosts.iter().enumerate() {
            let ssh_o = h.ssh.clone().unwrap_or_default();
            let pg_o = h.postgres.clone().unwrap_or_default();
            let agent_o = h.agent.clone().unwrap_or_default();
            let tags = h.tags.clone().unwrap_or_default();
            let identity = ssh_o
                .identity_file
                .as_ref()
                .or(raw.ssh.identity_file.as_ref());
            hosts.push(HostSpec {
                name: h.name.clone(),
                address: h.address.clone(),
                group: g.group,
                ssh: SshSpec {
                    user: ssh_o.user.unwrap_or_else(|| raw.ssh.user.clone()),
                    port: ssh_o.port.unwrap_or(raw.ssh.port),
                    identity_file: identity.map(|p| ctx.local_path(p)),
                    known_hosts: ctx
                        .local_path(ssh_o.known_hosts.as_ref().unwrap_or(&raw.ssh.known_hosts)),
                },
                pg_port: pg_o.port.unwrap_or(raw.postgres.port),
                data_dir: expand(pg_o.data_dir.as_ref().unwrap_or(&default_data_dir), &h.name),
                api_port: agent_o.api_port.unwrap_or(raw.agent.api_port),
                install_dir: expand(
                    agent_o.install_dir.as_ref().unwrap_or(&default_install_dir),
                    &h.name,
                ),
                tags: Tags {
                    nofailover: tags.nofailover,
                    noloadbalance: tags.noloadbalance,
                },
                group_index: gi,
                host_index: hi,
                overrides: HostOverrides {
                    pg_port: pg_o.port.is_some(),
                    data_dir: pg_o.data_dir.is_some(),
                    api_port: agent_o.api_port.is_some(),
                    install_dir: agent_o.install_dir.is_some(),
                },
            });
        }
        groups.push(GroupSpec { id: g.group, hosts });
    }

    let synchronous_mode = match raw.ha.synchronous_mode {
        RawSyncMode::Bool(false) | RawSyncMode::Named(SyncModeName::Off) => SyncMode::Off,
        RawSyncMode::Bool(true) | RawSyncMode::Named(SyncModeName::On) => SyncMode::On,
        RawSyncMode::Named(SyncModeName::Strict) => SyncMode::Strict,
    };

    let spec = Spec {
        file: file.to_path_buf(),
        ssh_defaults: SshSpec {
            user: raw.ssh.user.clone(),
            port: raw.ssh.port,
            identity_file: raw.ssh.identity_file.as_ref().map(|p| ctx.local_path(p)),
            known_hosts: ctx.local_path(&raw.ssh.known_hosts),
        },
        api_version: raw.api_version.clone(),
        cluster: raw.cluster.clone(),
        etcd: EtcdSpec {
            endpoints: if etcd_members.is_empty() {
                raw.etcd.endpoints.clone()
            } else {
                etcd_members
                    .iter()
                    .map(EtcdMemberSpec::client_url)
                    .collect()
            },
            members: etcd_members,
            endpoints_written: !raw.etcd.endpoints.is_empty(),
            namespace: raw.etcd.namespace.clone(),
            auth: etcd_auth,
            tls: etcd_tls,
        },
        postgres: PostgresSpec {
            version,
            install: raw.postgres.install,
            apt_proxy: raw.postgres.apt_proxy.clone(),
            extra_packages: raw.postgres.extra_packages.clone(),
            repository: raw.postgres.repository,
            bin_dir: raw
                .postgres
                .bin_dir
                .clone()
                .unwrap_or_else(|| format!("/usr/lib/postgresql/{version}/bin")),
            superuser,
            replication,
            parameters: raw
                .postgres
                .parameters
                .iter()
                .map(|(k, v)| (k.clone(), v.to_conf()))
                .collect(),
            pg_hba: raw.postgres.pg_hba.clone(),
        },
        citus: CitusSpec {
            database: raw.citus.database.clone(),
            authinfo: AuthInfoSpec {
                password: raw.citus.authinfo.password,
                sslcert: raw.citus.authinfo.sslcert.clone(),
                sslkey: raw.citus.authinfo.sslkey.clone(),
            },
            secondaries: raw.citus.secondaries,
            rebalance: raw.citus.rebalance,
            package: raw.citus.package.clone(),
            repository: raw.citus.repository.as_ref().map(|r| {
                let url = r.url.trim_end_matches('/').to_string();
                crate::plan::repository::CitusRepository {
                    key_url: r.key_url.clone().unwrap_or_else(|| format!("{url}/gpgkey")),
                    url,
                    fingerprint: r
                        .key_fingerprint
                        .chars()
                        .filter(|c| !c.is_whitespace())
                        .collect::<String>()
                        .to_ascii_uppercase(),
                }
            }),
            pause_timeout: raw.citus.pause_timeout,
            lock_cooldown_ms: raw.citus.lock_cooldown_ms,
            pause_on_switchover: raw.citus.pause_on_switchover,
            pause_on_loss: raw.citus.pause_on_loss,
            pooler: raw.citus.pooler.as_ref().map(|p| PoolerSpec {
                port: p.port,
                pool_size: p.pool_size,
                max_client_conn: p.max_client_conn,
            }),
        },
        ha: crate::spec::model::HaSpec {
            ttl: raw.ha.ttl,
            loop_wait: raw.ha.loop_wait,
            retry_timeout: raw.ha.retry_timeout,
            synchronous_mode,
            maximum_lag_on_failover: raw.ha.maximum_lag_on_failover,
            primary_start_timeout: raw.ha.primary_start_timeout,
            use_slots: raw.ha.use_slots,
            member_slots_ttl: raw.ha.member_slots_ttl,
            watchdog_mode: raw.ha.watchdog.mode,
            watchdog_device: raw
                .ha
                .watchdog
                .device
                .clone()
                .unwrap_or_else(|| crate::spec::raw::DEFAULT_WATCHDOG_DEVICE.to_string()),
        },
        agent: AgentSpec {
            service: raw.agent.service,
            api_auth,
            api_auth_reads: raw.agent.api_auth_reads,
            api_tls,
            install_dir_template: default_install_dir
                .replace("{version}", &version.to_string())
                .replace("{cluster}", &raw.cluster),
        },
        groups,
    };
    (spec, diags)
}

/// What a secret source holds, for messages: whether writing it in the spec is worth a
/// warning.
#[derive(Clone, Copy)]
struct SecretKind {
    noun: &'static str,
    secret: bool,
}

impl SecretKind {
    const PASSWORD: SecretKind = SecretKind {
        noun: "password",
        secret: true,
    };
    const CERTIFICATE: SecretKind = SecretKind {
        noun: "certificate",
        secret: false,
    };
    const PRIVATE_KEY: SecretKind = SecretKind {
        noun: "private key",
        secret: true,
    };
}

fn resolve_secret(
    raw: &RawSecret,
    path: &FieldPath,
    kind: SecretKind,
    ctx: &Context<'_>,
    diags: &mut Vec<Diagnostic>,
) -> (Secret, SecretSource) {
    match raw {
        RawSecret::Plain(value) => {
            if kind.secret {
                diags.push(
                    Diagnostic::warning(
                        path.clone(),
                        format!("{} written in the spec in plain text", kind.noun),
                    )
                    .with_hint("use {env: NAME} or {file: PATH} so the secret stays out of Git"),
                );
            }
            if value.is_empty() {
                diags.push(Diagnostic::error(
                    path.clone(),
                    format!("{} is empty", kind.noun),
                ));
            }
            (Secret::new(value.clone()), SecretSource::Inline)
        }
        RawSecret::Env(r) => {
            let source = SecretSource::Env(r.env.clone());
            if r.env.is_empty() || r.env.contains('=') || r.env.contains('\0') {
                diags.push(Diagnostic::error(
                    path.key("env"),
                    format!("{:?} is not a valid environment variable name", r.env),
                ));
                return (Secret::default(), source);
            }
            if !ctx.resolves(path) {
                return (Secret::default(), source);
            }
            match (ctx.env)(&r.env) {
                Some(v) if !v.is_empty() => (Secret::new(v), source),
                Some(_) => {
                    diags.push(Diagnostic::error(
                        path.key("env"),
                        format!("environment variable {} is empty", r.env),
                    ));
                    (Secret::default(), source)
                }
                None => {
                    diags.push(
                        Diagnostic::error(
                            path.key("env"),
                            format!("environment variable {} is not set", r.env),
                        )
                        .with_hint(format!("export {}=… before running citus-reconcile", r.env)),
                    );
                    (Secret::default(), source)
                }
            }
        }
        RawSecret::File(r) => {
            let resolved = ctx.local_path(&r.file);
            let source = SecretSource::File(resolved.display().to_string());
            if !ctx.resolves(path) {
                return (Secret::default(), source);
            }
            match (ctx.read_file)(&resolved) {
                Ok(text) => {
                    let value = text.strip_suffix('\n').unwrap_or(&text);
                    let value = value.strip_suffix('\r').unwrap_or(value);
                    if value.is_empty() {
                        diags.push(Diagnostic::error(
                            path.key("file"),
                            format!("secret file {} is empty", resolved.display()),
                        ));
                    }
                    (Secret::new(value), source)
                }
                Err(e) => {
                    // The error text names the path and the OS reason, never the content.
                    diags.push(Diagnostic::error(
                        path.key("file"),
                        format!(
                            "cannot read secret file {}: {}",
                            resolved.display(),
                            io_reason(&e)
                        ),
                    ));
                    (Secret::default(), source)
                }
            }
        }
    }
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string().to_lowercase(),
    }
}
