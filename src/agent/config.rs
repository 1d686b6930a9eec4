//! The agent's configuration file: what `apply` uploads to each host (mode 0600, it holds
//! secrets) and what `citus-reconcile agent --config FILE` reads. Pure: built from the spec,
//! rendered to YAML with real secrets for the file or redacted for display.
//!
//! It holds only cluster-wide settings and the member's own identity, never the list of other
//! members: adding a host to the spec changes that host's file and no other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::model::SyncMode;
pub use crate::spec::raw::WatchdogMode;
use crate::spec::secret::{REDACTED, Secret, exposed};
use crate::spec::{HostSpec, Spec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub cluster: String,
    pub group: u32,
    pub member: String,
    pub address: String,
    pub install_dir: String,
    pub etcd: EtcdConfig,
    pub postgres: PgConfig,
    pub citus: CitusConfig,
    pub ha: HaConfig,
    pub api: ApiConfig,
    pub tags: TagsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub namespace: String,
    /// etcd user and password, when etcd requires authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Credential>,
    /// TLS to etcd (PEM texts; this file is 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    pub ca: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "exposed_option"
    )]
    pub key: Option<Secret>,
}

impl EtcdConfig {
    /// How the spec says to reach etcd (also what `citus-reconcile` itself uses).
    pub fn from_spec(etcd: &crate::spec::model::EtcdSpec) -> EtcdConfig {
        EtcdConfig {
            endpoints: etcd.endpoints.clone(),
            namespace: etcd.namespace.clone(),
            auth: etcd.auth.as_ref().map(|c| Credential {
                username: c.username.clone(),
                password: c.password.clone(),
            }),
            tls: etcd.tls.as_ref().map(|t| EtcdTlsConfig {
                ca: t.ca.text.expose().to_string(),
                cert: t.cert.as_ref().map(|c| c.text.expose().to_string()),
                key: t.key.as_ref().map(|k| k.text.clone()),
            }),
        }
    }
}

/// An optional secret written as its value (the file is 0600).
mod exposed_option {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::spec::secret::Secret;

    pub fn serialize<S: Serializer>(v: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(secret) => s.serialize_some(secret.expose()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(Secret::new))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub username: String,
    #[serde(with = "exposed")]
    pub password: Secret,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    pub version: u32,
    pub bin_dir: String,
    pub port: u16,
    pub data_dir: String,
    pub superuser: Credential,
    pub replication: Credential,
    pub parameters: BTreeMap<String, String>,
    pub pg_hba: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CitusConfig {
    pub database: String,
    pub authinfo_password: bool,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub secondaries: bool,
    /// Seconds a group's writes may stay paused on the coordinator (see `citus::pause`).
    /// Defaults keep configurations written by an older release readable.
    #[serde(default = "default_pause_timeout")]
    pub pause_timeout: u32,
    #[serde(default = "default_lock_cooldown_ms")]
    pub lock_cooldown_ms: u32,
    #[serde(default = "yes")]
    pub pause_on_switchover: bool,
    #[serde(default)]
    pub pause_on_loss: bool,
    /// PgBouncer in front of this member when it is a worker (`citus.pooler`). Left out when
    /// absent, so configurations without one read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooler: Option<crate::spec::model::PoolerSpec>,
}

fn yes() -> bool {
    true
}

fn default_pause_timeout() -> u32 {
    30
}

fn default_lock_cooldown_ms() -> u32 {
    10_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
    pub synchronous_mode: SyncModeConfig,
    pub maximum_lag_on_failover: u64,
    /// See the spec's `ha.primary_start_timeout`; older configurations lack it.
    #[serde(default = "default_primary_start_timeout")]
    pub primary_start_timeout: u32,
    /// See the spec's `ha.use_slots` (configurations written before it had no slots).
    #[serde(default)]
    pub use_slots: bool,
    #[serde(default = "default_member_slots_ttl")]
    pub member_slots_ttl: u32,
    /// See the spec's `ha.watchdog` (configurations written before it had none).
    #[serde(default)]
    pub watchdog: WatchdogConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    pub mode: WatchdogMode,
    pub device: String,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            mode: WatchdogMode::Off,
            device: crate::spec::raw::DEFAULT_WATCHDOG_DEVICE.to_string(),
        }
    }
}

fn default_primary_start_timeout() -> u32 {
    300
}

fn default_member_slots_ttl() -> u32 {
    1800
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncModeConfig {
    Off,
    On,
    Strict,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub port: u16,
    pub auth: Option<Credential>,
    /// The read endpoints that reveal the cluster need `auth` too.
    #[serde(default)]
    pub auth_reads: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ApiTlsConfig>,
}

/// The REST API's certificate (chain) and key, as PEM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsConfig {
    pub cert: String,
    #[serde(with = "exposed")]
    pub key: Secret,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagsConfig {
    pub nofailover: bool,
    pub noloadbalance: bool,
}

impl AgentConfig {
    /// The configuration of one member of a validated spec.
    pub fn for_host(spec: &Spec, host: &HostSpec) -> AgentConfig {
        let cred = |c: &crate::spec::model::Credential| Credential {
            username: c.username.clone(),
            password: c.password.clone(),
        };
        AgentConfig {
            cluster: spec.cluster.clone(),
            group: host.group,
            member: host.name.clone(),
            address: host.address.clone(),
            install_dir: host.install_dir.clone(),
            etcd: EtcdConfig::from_spec(&spec.etcd),
            postgres: PgConfig {
                version: spec.postgres.version,
                bin_dir: spec.postgres.bin_dir.clone(),
                port: host.pg_port,
                data_dir: host.data_dir.clone(),
                superuser: cred(&spec.postgres.superuser),
                replication: cred(&spec.postgres.replication),
                parameters: spec.postgres.parameters.clone(),
                pg_hba: spec.postgres.pg_hba.clone(),
            },
            citus: CitusConfig {
                database: spec.citus.database.clone(),
                authinfo_password: spec.citus.authinfo.password,
                sslcert: spec.citus.authinfo.sslcert.clone(),
                sslkey: spec.citus.authinfo.sslkey.clone(),
                secondaries: spec.citus.secondaries,
                pause_timeout: spec.citus.pause_timeout,
                lock_cooldown_ms: spec.citus.lock_cooldown_ms,
                pause_on_switchover: spec.citus.pause_on_switchover,
                pause_on_loss: spec.citus.pause_on_loss,
                pooler: spec.citus.pooler.clone(),
            },
            ha: HaConfig {
                ttl: spec.ha.ttl,
                loop_wait: spec.ha.loop_wait,
                retry_timeout: spec.ha.retry_timeout,
                synchronous_mode: match spec.ha.synchronous_mode {
                    SyncMode::Off => SyncModeConfig::Off,
                    SyncMode::On => SyncModeConfig::On,
                    SyncMode::Strict => SyncModeConfig::Strict,
                },
                maximum_lag_on_failover: spec.ha.maximum_lag_on_failover,
                primary_start_timeout: spec.ha.primary_start_timeout,
                use_slots: spec.ha.use_slots,
                member_slots_ttl: spec.ha.member_slots_ttl,
                watchdog: WatchdogConfig {
                    mode: spec.ha.watchdog_mode,
                    device: spec.ha.watchdog_device.clone(),
                },
            },
            api: ApiConfig {
                port: host.api_port,
                auth: spec.agent.api_auth.as_ref().map(cred),
                auth_reads: spec.agent.api_auth_reads,
                tls: spec.agent.api_tls.as_ref().map(|t| ApiTlsConfig {
                    cert: t.cert.text.expose().to_string(),
                    key: t.key.text.clone(),
                }),
            },
            tags: TagsConfig {
                nofailover: host.tags.nofailover,
                noloadbalance: host.tags.noloadbalance,
            },
        }
    }

    /// The file's text, with the real secrets.
    pub fn render(&self) -> String {
        let body = serde_yaml::to_string(self).unwrap_or_default();
        format!(
            "# citus-reconcile agent configuration; written by `citus-reconcile apply`, do not edit\n{body}"
        )
    }

    /// The same text with every secret replaced, for plans and diffs.
    pub fn render_redacted(&self) -> String {
        let mut c = self.clone();
        let hide = |cred: &mut Credential| cred.password = Secret::new(REDACTED);
        hide(&mut c.postgres.superuser);
        hide(&mut c.postgres.replication);
        if let Some(a) = c.api.auth.as_mut() {
            hide(a);
        }
        if let Some(a) = c.etcd.auth.as_mut() {
            hide(a);
        }
        // Certificates are public but long: a digest shows that one changed.
        if let Some(t) = c.etcd.tls.as_mut() {
            t.ca = format!("sha256:{}", sha256_hex(&t.ca));
            if let Some(cert) = t.cert.as_mut() {
                *cert = format!("sha256:{}", sha256_hex(cert));
            }
            if let Some(k) = t.key.as_mut() {
                *k = Secret::new(REDACTED);
            }
        }
        if let Some(t) = c.api.tls.as_mut() {
            t.cert = format!("sha256:{}", sha256_hex(&t.cert));
            t.key = Secret::new(REDACTED);
        }
        c.render()
    }

    /// When `new` differs from this configuration in secrets only, which ones (possibly
    /// none); None when anything else differs. Secrets can change under a running agent (a
    /// reload); anything else restarts it.
    pub fn secret_changes(&self, new: &AgentConfig) -> Option<Vec<&'static str>> {
        // The etcd session authenticates once, at connect: a new etcd password or key
        // takes a restart of the agent.
        // The API's TLS material is loaded at start, too.
        if self.render_redacted() != new.render_redacted()
            || self.etcd != new.etcd
            || self.api.tls != new.api.tls
        {
            return None;
        }
        let mut changed = Vec::new();
        if self.postgres.superuser.password != new.postgres.superuser.password {
            changed.push("superuser password");
        }
        if self.postgres.replication.password != new.postgres.replication.password {
            changed.push("replication password");
        }
        let api = |c: &AgentConfig| c.api.auth.as_ref().map(|a| a.password.clone());
        if api(self) != api(new) {
            changed.push("REST API password");
        }
        Some(changed)
    }

    /// When `new` differs from this configuration in PostgreSQL parameters only (and perhaps
    /// secrets): the names of the parameters added, removed or changed. None when anything
    /// else differs (that takes a restart of the agent).
    pub fn parameter_changes(&self, new: &AgentConfig) -> Option<Vec<String>> {
        let without = |c: &AgentConfig| {
            let mut c = c.clone();
            c.postgres.parameters.clear();
            c.render_redacted()
        };
        if without(self) != without(new) || self.etcd != new.etcd || self.api.tls != new.api.tls {
            return None;
        }
        let (old, now) = (&self.postgres.parameters, &new.postgres.parameters);
        let mut names: Vec<String> = old
            .keys()
            .chain(now.keys())
            .filter(|k| old.get(*k) != now.get(*k))
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        Some(names)
    }

    /// `new` differs from this configuration in `citus.pooler` only: PgBouncer is restarted
    /// with it, PostgreSQL and the agent keep running.
    /// Secrets may change too (the caller applies them as on their own).
    pub fn pooler_change_only(&self, new: &AgentConfig) -> bool {
        let without = |c: &AgentConfig| {
            let mut c = c.clone();
            c.citus.pooler = None;
            c.render_redacted()
        };
        self.citus.pooler != new.citus.pooler
            && without(self) == without(new)
            && self.etcd == new.etcd
            && self.api.tls == new.api.tls
    }

    /// This member runs PgBouncer: a worker, with `citus.pooler` set.
    pub fn runs_pooler(&self) -> Option<&crate::spec::model::PoolerSpec> {
        self.citus
            .pooler
            .as_ref()
            .filter(|_| !self.is_coordinator())
    }

    /// A digest of each secret, to tell which changed without keeping or showing values.
    pub fn secret_digests(&self) -> BTreeMap<String, String> {
        let digest = |s: &Secret| sha256_hex(s.expose());
        let mut out = BTreeMap::new();
        out.insert(
            "superuser".to_string(),
            digest(&self.postgres.superuser.password),
        );
        out.insert(
            "replication".to_string(),
            digest(&self.postgres.replication.password),
        );
        if let Some(a) = &self.api.auth {
            out.insert("api".to_string(), digest(&a.password));
        }
        if let Some(a) = &self.etcd.auth {
            out.insert("etcd".to_string(), digest(&a.password));
        }
        if let Some(k) = self.etcd.tls.as_ref().and_then(|t| t.key.as_ref()) {
            out.insert("etcd_tls_key".to_string(), digest(k));
        }
        if let Some(t) = &self.api.tls {
            out.insert("api_tls_key".to_string(), digest(&t.key));
        }
        out
    }

    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn is_coordinator(&self) -> bool {
        self.group == 0
    }
}

/// Where things live on a host, derived from the install folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub install_dir: String,
}

impl Paths {
    pub fn new(install_dir: &str) -> Self {
        Self {
            install_dir: install_dir.trim_end_matches('/').to_string(),
        }
    }
    pub fn binary(&self) -> String {
        format!("{}/bin/citus-reconcile", self.install_dir)
    }
    pub fn config(&self) -> String {
        format!("{}/agent.yaml", self.install_dir)
    }
    pub fn pid_file(&self) -> String {
        format!("{}/agent.pid", self.install_dir)
    }
    pub fn log_file(&self) -> String {
        format!("{}/agent.log", self.install_dir)
    }
    pub fn postgres_log(&self) -> String {
        format!("{}/postgresql.log", self.install_dir)
    }
    pub fn socket_dir(&self) -> String {
        format!("{}/run", self.install_dir)
    }
    pub fn pgpass(&self) -> String {
        format!("{}/pgpass", self.install_dir)
    }
    pub fn pgbouncer_ini(&self) -> String {
        format!("{}/pgbouncer.ini", self.install_dir)
    }
    pub fn pgbouncer_users(&self) -> String {
        format!("{}/pgbouncer-users.txt", self.install_dir)
    }
    pub fn pgbouncer_log(&self) -> String {
        format!("{}/pgbouncer.log", self.install_dir)
    }
    /// The system identifier of the cluster this member's own bootstrap made.
    pub fn bootstrap_marker(&self) -> String {
        format!("{}/bootstrapped-sysid", self.install_dir)
    }
    /// systemd unit name for a member.
    pub fn unit_name(cluster: &str, member: &str) -> String {
        format!("citus-reconcile-{cluster}-{member}.service")
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A configuration for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn sample() -> AgentConfig {
    let cred = |p: &str| Credential {
        username: "u".into(),
        password: Secret::new(p),
    };
    AgentConfig {
        cluster: "c".into(),
        group: 1,
        member: "m".into(),
        address: "10.0.0.1".into(),
        install_dir: "/x".into(),
        etcd: EtcdConfig {
            endpoints: vec!["http://e:2379".into()],
            namespace: "/service".into(),
            auth: Some(Credential {
                username: "citus".into(),
                password: Secret::new("etcd-secret"),
            }),
            tls: Some(EtcdTlsConfig {
                ca: "CA-PEM".into(),
                cert: Some("CERT-PEM".into()),
                key: Some(Secret::new("tls-key-secret")),
            }),
        },
        postgres: PgConfig {
            version: 15,
            bin_dir: "/b".into(),
            port: 5432,
            data_dir: "/d".into(),
            superuser: cred("su-secret"),
            replication: cred("repl-secret"),
            parameters: BTreeMap::new(),
            pg_hba: vec![],
        },
        citus: CitusConfig {
            database: "citus".into(),
            authinfo_password: true,
            sslcert: None,
            sslkey: None,
            secondaries: false,
            pause_timeout: 30,
            lock_cooldown_ms: 10_000,
            pause_on_switchover: true,
            pause_on_loss: false,
            pooler: None,
        },
        ha: HaConfig {
            ttl: 30,
            loop_wait: 10,
            retry_timeout: 10,
            synchronous_mode: SyncModeConfig::Off,
            maximum_lag_on_failover: 1,
            primary_start_timeout: 300,
            use_slots: true,
            member_slots_ttl: 1800,
            watchdog: WatchdogConfig::default(),
        },
        api: ApiConfig {
            port: 8008,
            auth: Some(cred("api-secret")),
            auth_reads: true,
            tls: Some(ApiTlsConfig {
                cert: "API-CERT".into(),
                key: Secret::new("api-key-secret"),
            }),
        },
        tags: TagsConfig::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_changes_only_when_nothing_else_differs() {
        let old = sample();
        let with = |f: &dyn Fn(&mut AgentConfig)| {
            let mut c = sample();
            f(&mut c);
            c
        };
        let cases: Vec<(&str, AgentConfig, Option<Vec<&str>>)> = vec![
            ("same", sample(), Some(vec![])),
            (
                "added and changed",
                with(&|c| {
                    c.postgres
                        .parameters
                        .insert("work_mem".into(), "8MB".into());
                }),
                Some(vec!["work_mem"]),
            ),
            (
                "with a new password",
                with(&|c| {
                    c.postgres
                        .parameters
                        .insert("max_connections".into(), "60".into());
                    c.postgres.superuser.password = Secret::new("other");
                }),
                Some(vec!["max_connections"]),
            ),
            ("something else", with(&|c| c.ha.ttl = 10), None),
        ];
        for (name, new, want) in cases {
            let got = old.parameter_changes(&new);
            let want = want.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn redaction_hides_every_password() {
        let cfg = sample();
        let full = cfg.render();
        let secrets = [
            "su-secret",
            "repl-secret",
            "api-secret",
            "etcd-secret",
            "tls-key-secret",
            "api-key-secret",
        ];
        for s in secrets {
            assert!(full.contains(s));
        }
        let shown = cfg.render_redacted();
        for s in secrets {
            assert!(!shown.contains(s), "{s} leaked:\n{shown}");
        }
        assert_eq!(AgentConfig::parse(&full).as_ref(), Ok(&cfg));

        // Secrets alone change under a running agent; anything else needs a restart.
        let check = |edit: &dyn Fn(&mut AgentConfig), expected: Option<Vec<&str>>| {
            let mut new = cfg.clone();
            edit(&mut new);
            assert_eq!(cfg.secret_changes(&new), expected);
        };
        check(&|_| {}, Some(vec![]));
        // The etcd session authenticated at connect: a new etcd password is a restart.
        let etcd = |c: &mut AgentConfig| {
            if let Some(a) = c.etcd.auth.as_mut() {
                a.password = Secret::new("new");
            }
        };
        check(&etcd, None);
        let mut new = cfg.clone();
        etcd(&mut new);
        assert_eq!(cfg.parameter_changes(&new), None);
        // So is new TLS material: the key (hidden) and the CA (shown as a digest).
        let key = |c: &mut AgentConfig| {
            if let Some(t) = c.etcd.tls.as_mut() {
                t.key = Some(Secret::new("new"));
            }
        };
        check(&key, None);
        let mut new = cfg.clone();
        key(&mut new);
        assert_ne!(cfg.secret_digests(), new.secret_digests());
        let mut new = cfg.clone();
        if let Some(t) = new.etcd.tls.as_mut() {
            t.ca = "OTHER-CA".into();
        }
        assert_ne!(cfg.render_redacted(), new.render_redacted());
        assert!(!cfg.render_redacted().contains("CA-PEM"));
        check(
            &|c| c.postgres.superuser.password = Secret::new("new"),
            Some(vec!["superuser password"]),
        );
        check(
            &|c| {
                c.postgres.replication.password = Secret::new("new");
                c.api.auth = Some(Credential {
                    username: "u".into(),
                    password: Secret::new("other"),
                });
            },
            Some(vec!["replication password", "REST API password"]),
        );
        check(&|c| c.postgres.port = 5433, None);
        check(
            &|c| {
                c.postgres.superuser.password = Secret::new("new");
                c.postgres.superuser.username = "admin".into();
            },
            None,
        );
    }
}
