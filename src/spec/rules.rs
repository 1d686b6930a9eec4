//! Semantic rules over the validated model: the checks a type system cannot express
//! (uniqueness, cross-field constraints, formats). Every rule reports all its violations.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::diagnostic::{Diagnostic, FieldPath, path};
use super::model::{HostSpec, Spec, SyncMode};
use super::raw::API_VERSION;

/// Parameters the agent sets itself: letting the spec set them would break replication,
/// failover or the agent's own connections.
const MANAGED_PARAMETERS: &[&str] = &[
    "port",
    "data_directory",
    "hba_file",
    "ident_file",
    "config_file",
    "listen_addresses",
    "unix_socket_directories",
    "primary_conninfo",
    "primary_slot_name",
    "restore_command",
    "recovery_target_timeline",
    "synchronous_standby_names",
    "hot_standby",
    "cluster_name",
];

const HBA_TYPES: &[&str] = &[
    "local",
    "host",
    "hostssl",
    "hostnossl",
    "hostgssenc",
    "hostnogssenc",
];

/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

pub fn check(spec: &Spec) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    document(spec, &mut out);
    etcd(spec, &mut out);
    api(spec, &mut out);
    postgres(spec, &mut out);
    citus(spec, &mut out);
    ha(spec, &mut out);
    groups(spec, &mut out);
    hosts(spec, &mut out);
    out
}

fn document(spec: &Spec, out: &mut Vec<Diagnostic>) {
    if spec.api_version != API_VERSION {
        out.push(
            Diagnostic::error(
                path("apiVersion"),
                format!("expected `{API_VERSION}`, found {:?}", spec.api_version),
            )
            .with_hint("this version of citus-reconcile reads spec format v1"),
        );
    }
    if !is_cluster_name(&spec.cluster) {
        out.push(
            Diagnostic::error(
                path("cluster"),
                format!("invalid cluster name {:?}", spec.cluster),
            )
            .with_hint("use 1 to 63 lower-case letters, digits and `-`"),
        );
    }
}

fn api(spec: &Spec, out: &mut Vec<Diagnostic>) {
    if spec.agent.api_auth_reads && spec.agent.api_auth.is_none() {
        out.push(
            Diagnostic::error(
                path("agent.api_auth_reads"),
                "read endpoints behind credentials, but agent.api_auth gives none",
            )
            .with_hint("set agent.api_auth"),
        );
    }
    if let Some(t) = &spec.agent.api_tls {
        pem_kind(
            "agent.api_tls.cert",
            Some(t.cert.text.expose()),
            "CERTIFICATE-----",
            out,
        );
        pem_kind(
            "agent.api_tls.key",
            Some(t.key.text.expose()),
            "PRIVATE KEY-----",
            out,
        );
    }
}

fn etcd(spec: &Spec, out: &mut Vec<Diagnostic>) {
    if spec.etcd.endpoints.is_empty() {
        out.push(
            Diagnostic::error(
                path("etcd.endpoints"),
                "at least one etcd endpoint is required",
            )
            .with_hint("list the endpoints of an etcd you run, or etcd.members for one apply runs"),
        );
    }
    if !spec.etcd.members.is_empty() {
        etcd_members(spec, out);
        // The members' URLs are the endpoints: checked there, not as written ones.
        return;
    }
    let mut seen: HashMap<(String, u16), usize> = HashMap::new();
    for (i, e) in spec.etcd.endpoints.iter().enumerate() {
        let p = path("etcd.endpoints").index(i);
        match parse_endpoint(e) {
            Ok(ep) => {
                if let Some(first) = seen.insert((ep.host.clone(), ep.port), i) {
                    out.push(Diagnostic::error(
                        p.clone(),
                        format!("endpoint {e:?} repeats etcd.endpoints[{first}]"),
                    ));
                }
                match (ep.scheme.as_str(), spec.etcd.tls.is_some()) {
                    ("https", false) => out.push(
                        Diagnostic::error(p, format!("endpoint {e:?} uses TLS but etcd.tls is not set"))
                            .with_hint("add etcd.tls.ca: the CA certificate that signed etcd's server certificates"),
                    ),
                    ("http", true) => out.push(
                        Diagnostic::error(
                            p,
                            format!("endpoint {e:?} is plain http while etcd.tls is set"),
                        )
                        .with_hint("write every endpoint as https://host:port"),
                    ),
                    _ => {}
                }
            }
            Err(why) => out.push(
                Diagnostic::error(p, format!("invalid etcd endpoint {e:?}: {why}"))
                    .with_hint("write endpoints as http://host:port, e.g. http://10.0.0.5:2379"),
            ),
        }
    }
    if let Some(tls) = &spec.etcd.tls {
        etcd_tls(tls, out);
    }
    let ns = &spec.etcd.namespace;
    if !ns.starts_with('/')
        || ns.len() < 2
        || ns.ends_with('/')
        || ns.chars().any(|c| c.is_whitespace())
    {
        out.push(
            Diagnostic::error(path("etcd.namespace"), format!("invalid namespace {ns:?}"))
                .with_hint(
                    "a key prefix such as `/service`: starts with `/`, no trailing `/`, no spaces",
                ),
        );
    }
}

/// A managed etcd (`etcd.members`).
fn etcd_members(spec: &Spec, out: &mut Vec<Diagnostic>) {
    let members = &spec.etcd.members;
    if spec.etcd.endpoints_written {
        out.push(
            Diagnostic::error(
                path("etcd.members"),
                "etcd.endpoints and etcd.members together: give one of them",
            )
            .with_hint("the endpoints of a managed etcd are its members' client URLs"),
        );
    }
    if spec.etcd.tls.is_some() || spec.etcd.auth.is_some() {
        out.push(
            Diagnostic::error(
                path("etcd.members"),
                "a managed etcd (etcd.members) runs without TLS and authentication for now",
            )
            .with_hint("run etcd yourself and list its endpoints to use etcd.tls or etcd.auth"),
        );
    }
    if members.len() % 2 == 0 {
        out.push(Diagnostic::warning(
            path("etcd.members"),
            format!(
                "{} etcd members tolerate no more failures than {}: an odd number is usual",
                members.len(),
                members.len() - 1
            ),
        ));
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut ports: HashMap<(&str, u16), usize> = HashMap::new();
    for (i, m) in members.iter().enumerate() {
        let p = path("etcd.members").index(i);
        if !is_dns_label(&m.name) {
            out.push(Diagnostic::error(
                p.clone().key("name"),
                format!(
                    "invalid etcd member name {:?}: lower-case letters, digits and `-`",
                    m.name
                ),
            ));
        }
        if let Some(first) = names.insert(&m.name, i) {
            out.push(Diagnostic::error(
                p.clone().key("name"),
                format!("etcd member {:?} repeats etcd.members[{first}]", m.name),
            ));
        }
        if m.address.trim().is_empty() || m.address.chars().any(char::is_whitespace) {
            out.push(Diagnostic::error(
                p.clone().key("address"),
                format!("invalid address {:?}", m.address),
            ));
        }
        if m.client_port == m.peer_port {
            out.push(Diagnostic::error(
                p.clone().key("peer_port"),
                format!("the peer port is the client port ({})", m.client_port),
            ));
        }
        for (port, field) in [(m.client_port, "client_port"), (m.peer_port, "peer_port")] {
            if let Some(first) = ports.insert((&m.address, port), i) {
                if first != i {
                    out.push(Diagnostic::error(
                        p.clone().key(field),
                        format!("{}:{port} is taken by etcd.members[{first}]", m.address),
                    ));
                }
            }
        }
        if !m.dir.starts_with('/') || m.dir.split('/').any(|c| c == "..") {
            out.push(Diagnostic::error(
                p.key("dir"),
                format!("{:?}: an absolute path without `..` is needed", m.dir),
            ));
        }
    }
}

fn etcd_tls(tls: &crate::spec::model::EtcdTls, out: &mut Vec<Diagnostic>) {
    match (&tls.cert, &tls.key) {
        (Some(_), None) => out.push(
            Diagnostic::error(
                path("etcd.tls.cert"),
                "a client certificate without its key",
            )
            .with_hint("add etcd.tls.key"),
        ),
        (None, Some(_)) => out.push(
            Diagnostic::error(
                path("etcd.tls.key"),
                "a private key without its certificate",
            )
            .with_hint("add etcd.tls.cert"),
        ),
        _ => {}
    }
    let pem = [
        ("etcd.tls.ca", Some(&tls.ca), "CERTIFICATE-----"),
        ("etcd.tls.cert", tls.cert.as_ref(), "CERTIFICATE-----"),
        ("etcd.tls.key", tls.key.as_ref(), "PRIVATE KEY-----"),
    ];
    for (field, value, marker) in pem {
        pem_kind(field, value.map(|p| p.text.expose()), marker, out);
    }
}

/// A PEM text that was read (validation without secrets reads none) holds a block of the
/// expected kind.
fn pem_kind(field: &str, text: Option<&str>, marker: &str, out: &mut Vec<Diagnostic>) {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return;
    };
    if !(text.contains("-----BEGIN ") && text.contains(marker)) {
        out.push(
            Diagnostic::error(path(field), "not a PEM text of the expected kind")
                .with_hint(format!("expected a block ending in `{marker}`")),
        );
    }
}

/// A parsed etcd client URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

/// Parse `http(s)://host[:port][/]`. IPv6 literals are written in brackets.
pub fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let (scheme, rest) = url.split_once("://").ok_or("missing `http://`")?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("scheme must be http or https, found {scheme:?}"));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') || authority.contains('@') {
        return Err("only scheme, host and port are allowed".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unclosed `[` in IPv6 address")?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    if !is_address(&host) {
        return Err(format!("{host:?} is not an IP address or host name"));
    }
    let port = match port {
        None => 2379,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("port must be 1 to 65535, found {p:?}")),
        },
    };
    Ok(Endpoint {
        scheme: scheme.to_string(),
        host,
        port,
    })
}

fn postgres(spec: &Spec, out: &mut Vec<Diagnostic>) {
    let pg = &spec.postgres;
    if !(13..=17).contains(&pg.version) {
        out.push(
            Diagnostic::error(
                path("postgres.version"),
                format!("PostgreSQL {} is not supported", pg.version),
            )
            .with_hint("Citus 11.2 and newer run on PostgreSQL 13 to 17"),
        );
    }
    if let Some(proxy) = &pg.apt_proxy {
        if !is_http_proxy(proxy) {
            out.push(
                Diagnostic::error(
                    path("postgres.apt_proxy"),
                    format!("expected http://host or http://host:port, found {proxy:?}"),
                )
                .with_hint("apt-get's Acquire::http::Proxy; an apt-cacher-ng listens on port 3142"),
            );
        }
    }
    for (i, pkg) in pg.extra_packages.iter().enumerate() {
        if !is_package_name(pkg) {
            out.push(
                Diagnostic::error(
                    path(&format!("postgres.extra_packages[{i}]")),
                    format!("invalid package name {pkg:?}"),
                )
                .with_hint(PACKAGE_NAME_HINT),
            );
        }
    }
    if pg.repository == super::raw::PgRepository::Pgdg
        && pg.install != super::model::InstallMode::Apt
    {
        out.push(
            Diagnostic::error(
                path("postgres.repository"),
                "the PostgreSQL project's repository is added only with `install: apt`",
            )
            .with_hint("set postgres.install: apt, or leave postgres.repository out"),
        );
    }
    if !pg.extra_packages.is_empty() && pg.install != super::model::InstallMode::Apt {
        out.push(
            Diagnostic::error(
                path("postgres.extra_packages"),
                "extra packages are installed only with `install: apt`",
            )
            .with_hint("set postgres.install: apt, or install them on the hosts yourself"),
        );
    }
    if !pg.bin_dir.starts_with('/') {
        out.push(Diagnostic::error(
            path("postgres.bin_dir"),
            format!("expected an absolute path, found {:?}", pg.bin_dir),
        ));
    }
    for (field, cred) in [
        ("superuser", &pg.superuser),
        ("replication", &pg.replication),
    ] {
        if !is_identifier(&cred.username) {
            out.push(
                Diagnostic::error(
                    path(&format!("postgres.{field}.username")),
                    format!("invalid role name {:?}", cred.username),
                )
                .with_hint("use lower-case letters, digits and `_`, starting with a letter or `_`"),
            );
        }
    }
    if pg.superuser.username == pg.replication.username {
        out.push(
            Diagnostic::error(
                path("postgres.replication.username"),
                "the replication role must differ from the superuser",
            )
            .with_hint(
                "streaming replication uses its own role with only the REPLICATION privilege",
            ),
        );
    }
    for (name, value) in &pg.parameters {
        let p = path("postgres.parameters").key(name);
        if !is_guc_name(name) {
            out.push(
                Diagnostic::error(p.clone(), format!("invalid parameter name {name:?}")).at_key(),
            );
        } else if MANAGED_PARAMETERS.contains(&name.as_str()) {
            out.push(
                Diagnostic::error(
                    p.clone(),
                    format!("parameter `{name}` is managed by citus-reconcile"),
                )
                .with_hint(
                    "remove it: the agent sets it from the spec's hosts, ports and HA settings",
                )
                .at_key(),
            );
        }
        if value.contains('\n') || value.contains('\0') {
            out.push(Diagnostic::error(
                p,
                format!("value of `{name}` must be one line"),
            ));
        }
    }
    for (i, line) in pg.pg_hba.iter().enumerate() {
        let p = path("postgres.pg_hba").index(i);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let min = if fields.first() == Some(&"local") {
            4
        } else {
            5
        };
        if line.contains('\n') {
            out.push(Diagnostic::error(p, "a pg_hba rule must be one line"));
        } else if fields.is_empty() || !HBA_TYPES.contains(&fields[0]) {
            out.push(
                Diagnostic::error(
                    p,
                    format!("pg_hba rule {line:?} must start with a connection type"),
                )
                .with_hint(format!("one of {}", HBA_TYPES.join(", "))),
            );
        } else if fields.len() < min {
            out.push(
                Diagnostic::error(p, format!("pg_hba rule {line:?} has {} fields, expected at least {min}", fields.len()))
                    .with_hint("TYPE DATABASE USER ADDRESS METHOD, e.g. \"host all all 10.0.0.0/24 scram-sha-256\""),
            );
        }
    }
}

fn citus(spec: &Spec, out: &mut Vec<Diagnostic>) {
    if !is_identifier(&spec.citus.database) {
        out.push(Diagnostic::error(
            path("citus.database"),
            format!("invalid database name {:?}", spec.citus.database),
        ));
    }
    for (field, value) in [
        ("sslcert", &spec.citus.authinfo.sslcert),
        ("sslkey", &spec.citus.authinfo.sslkey),
    ] {
        if let Some(v) = value {
            if !is_plain_absolute_path(v) {
                out.push(Diagnostic::error(
                    path(&format!("citus.authinfo.{field}")),
                    format!("expected an absolute path without spaces or quotes, found {v:?}"),
                ));
            }
        }
    }
    if spec.citus.pause_timeout < 1 {
        out.push(
            Diagnostic::error(
                path("citus.pause_timeout"),
                "pause_timeout 0: a worker group's writes could never wait for a handover",
            )
            .with_hint("use at least 1 second; the default, 30, covers any handover"),
        );
    } else if u64::from(spec.citus.lock_cooldown_ms) >= u64::from(spec.citus.pause_timeout) * 1000 {
        out.push(
            Diagnostic::error(
                path("citus.lock_cooldown_ms"),
                format!(
                    "lock_cooldown_ms {} is not shorter than pause_timeout ({} s): a pause could end before it takes hold",
                    spec.citus.lock_cooldown_ms, spec.citus.pause_timeout
                ),
            )
            .with_hint("lower lock_cooldown_ms or raise pause_timeout"),
        );
    }
    if let Some(pl) = &spec.citus.pooler {
        let max_connections = spec
            .postgres
            .parameters
            .get("max_connections")
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(100);
        let pool = pl
            .pool_size
            .unwrap_or_else(|| pooler_pool_size(max_connections));
        for (field, value, least) in [
            ("port", u32::from(pl.port), 1),
            ("pool_size", pool, 1),
            ("max_client_conn", pl.max_client_conn, 2),
        ] {
            if value < least {
                out.push(Diagnostic::error(
                    path(&format!("citus.pooler.{field}")),
                    format!("{field} {value}: must be at least {least}"),
                ));
            }
        }
        if pool >= pl.max_client_conn {
            out.push(
                Diagnostic::error(
                    path(&format!(
                        "citus.pooler.{}",
                        if pl.pool_size.is_some() {
                            "pool_size"
                        } else {
                            "max_client_conn"
                        }
                    )),
                    format!(
                        "a pool of {pool} server connections is not below max_client_conn {}: clients beyond the pool would wait with nothing to wait for",
                        pl.max_client_conn
                    ),
                )
                .with_hint("PgBouncer pools many client connections into fewer server connections"),
            );
        }
        if pool > max_connections {
            out.push(
                Diagnostic::error(
                    path("citus.pooler.pool_size"),
                    format!(
                        "pool_size {pool} is above PostgreSQL's max_connections {max_connections}: PgBouncer would queue Citus's connections for server connections PostgreSQL refuses"
                    ),
                )
                .with_hint("leave pool_size out: it defaults to max_connections less 10"),
            );
        }
    }
    if let Some(r) = &spec.citus.repository {
        // The default key URL is derived from `url`: one error for both.
        let derived = r.key_url == format!("{}/gpgkey", r.url);
        for (field, url) in [("url", &r.url), ("key_url", &r.key_url)] {
            if field == "key_url" && derived {
                continue;
            }
            if !crate::plan::repository::valid_url(url) {
                out.push(
                    Diagnostic::error(
                        path(&format!("citus.repository.{field}")),
                        format!("expected an http:// or https:// URL without spaces or quotes, found {url:?}"),
                    ),
                );
            }
        }
        if r.fingerprint.len() != 40 || !r.fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
            out.push(
                Diagnostic::error(
                    path("citus.repository.key_fingerprint"),
                    "expected the key's full fingerprint: 40 hex digits",
                )
                .with_hint("a short key id can be forged; copy the fingerprint Citus publishes"),
            );
        }
        if spec.postgres.install != super::model::InstallMode::Apt || spec.citus.package.is_none() {
            out.push(
                Diagnostic::error(
                    path("citus.repository"),
                    "Citus's repository is added only with `postgres.install: apt` and a `citus.package` to install from it",
                ),
            );
        }
    }
    if let Some(pkg) = &spec.citus.package {
        if !is_package_name(pkg) {
            out.push(
                Diagnostic::error(
                    path("citus.package"),
                    format!("invalid package name {pkg:?}"),
                )
                .with_hint(PACKAGE_NAME_HINT),
            );
        }
    }
}

const PACKAGE_NAME_HINT: &str = "a Debian package name: lower-case letters, digits, `+`, `-` and `.`, starting with a letter or digit";

/// A Debian package name (policy 5.6.1), which apt-get can never take for an option.
fn is_package_name(v: &str) -> bool {
    let mut chars = v.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && v.len() >= 2
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// `http://host[:port][/]`: a host name or an IPv4 address, nothing that a shell or apt's
/// option parser could take for more than one word.
fn is_http_proxy(v: &str) -> bool {
    let Some(rest) = v.strip_prefix("http://") else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// An absolute path without whitespace or quotes (it goes into configuration files and
/// command lines).
fn is_plain_absolute_path(v: &str) -> bool {
    v.starts_with('/') && !v.contains(char::is_whitespace) && !v.contains(['\'', '"'])
}

fn ha(spec: &Spec, out: &mut Vec<Diagnostic>) {
    let ha = &spec.ha;
    let need = u64::from(ha.loop_wait) + 2 * u64::from(ha.retry_timeout);
    if u64::from(ha.ttl) < need {
        out.push(
            Diagnostic::error(
                path("ha.ttl"),
                format!(
                    "ttl {} is shorter than loop_wait + 2 * retry_timeout = {} + 2 * {} = {need}",
                    ha.ttl, ha.loop_wait, ha.retry_timeout
                ),
            )
            .with_hint("a leader must get two chances to renew its lease before it expires: raise ttl or lower the others"),
        );
    }
    if ha.ttl < 5 {
        out.push(
            Diagnostic::error(path("ha.ttl"), format!("ttl {} is below the minimum of 5 seconds", ha.ttl))
                .with_hint("shorter leases leave no time to stop a cut-off primary before another one is promoted"),
        );
    }
    if !is_plain_absolute_path(&ha.watchdog_device) {
        out.push(Diagnostic::error(
            path("ha.watchdog.device"),
            format!(
                "expected an absolute path without spaces or quotes, found {:?}",
                ha.watchdog_device
            ),
        ));
    }
    if ha.synchronous_mode == SyncMode::Strict {
        for g in &spec.groups {
            if g.hosts.len() < 2 {
                out.push(
                    Diagnostic::warning(
                        FieldPath::root().key("groups").index(g.hosts.first().map_or(0, |h| h.group_index)),
                        format!("group {} has one host: with strict synchronous mode no commit can complete", g.id),
                    )
                    .with_hint("add a standby to the group, or use synchronous_mode: on"),
                );
            }
        }
    }
}

fn groups(spec: &Spec, out: &mut Vec<Diagnostic>) {
    if spec.groups.is_empty() {
        out.push(
            Diagnostic::error(path("groups"), "at least one group is required")
                .with_hint("group 0 is the coordinator; add worker groups 1..N"),
        );
        return;
    }
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (i, g) in spec.groups.iter().enumerate() {
        let p = FieldPath::root().key("groups").index(i);
        if let Some(first) = seen.insert(g.id, i) {
            let what = if g.id == 0 {
                "a second coordinator group"
            } else {
                "a duplicate group id"
            };
            out.push(
                Diagnostic::error(
                    p.key("group"),
                    format!("{what}: group {} is already groups[{first}]", g.id),
                )
                .with_hint(if g.id == 0 {
                    "exactly one group 0 (the coordinator) is allowed"
                } else {
                    "every group needs its own id"
                }),
            );
        }
        if g.hosts.is_empty() {
            out.push(
                Diagnostic::error(p.key("hosts"), format!("group {} has no hosts", g.id))
                    .with_hint("every group needs at least one host"),
            );
        } else if g.hosts.iter().all(|h| h.tags.nofailover) && g.hosts.len() > 1 {
            out.push(Diagnostic::warning(
                p.key("hosts"),
                format!(
                    "every host of group {} is tagged nofailover: the group cannot fail over",
                    g.id
                ),
            ));
        }
    }
    if !seen.contains_key(&0) {
        out.push(
            Diagnostic::error(
                path("groups"),
                "no coordinator: exactly one group must have `group: 0`",
            )
            .with_hint("group 0 is the Citus coordinator"),
        );
    }
}

/// Folders the agent's systemd unit mounts read-only (`ProtectSystem=full`).
const SYSTEMD_READ_ONLY: [&str; 4] = ["/usr", "/boot", "/efi", "/etc"];

fn hosts(spec: &Spec, out: &mut Vec<Diagnostic>) {
    let mut names: HashMap<&str, &HostSpec> = HashMap::new();
    // (address, port) → who uses it and for what.
    let mut ports: BTreeMap<(String, u16), (&HostSpec, &str)> = BTreeMap::new();
    let mut dirs: BTreeMap<(String, String), &HostSpec> = BTreeMap::new();
    for h in spec.hosts() {
        let p = h.path();
        if !is_dns_label(&h.name) {
            out.push(
                Diagnostic::error(p.key("name"), format!("invalid host name {:?}", h.name))
                    .with_hint("use a DNS label: 1 to 63 lower-case letters, digits and `-`, not starting or ending with `-`"),
            );
        }
        if let Some(first) = names.insert(&h.name, h) {
            out.push(Diagnostic::error(
                p.key("name"),
                format!("host name {:?} is already used by {}", h.name, first.path()),
            ));
        }
        if !is_address(&h.address) {
            out.push(
                Diagnostic::error(p.key("address"), format!("invalid address {:?}", h.address))
                    .with_hint("an IPv4 or IPv6 address, or a DNS name"),
            );
        }
        let address = normalize_address(&h.address);
        for (port, what, field) in [
            (
                h.pg_port,
                "PostgreSQL",
                if h.overrides.pg_port {
                    "postgres.port"
                } else {
                    "address"
                },
            ),
            (
                h.api_port,
                "agent API",
                if h.overrides.api_port {
                    "agent.api_port"
                } else {
                    "address"
                },
            ),
        ]
        .into_iter()
        .chain(
            spec.citus
                .pooler
                .as_ref()
                .filter(|_| h.group != 0)
                .map(|pl| (pl.port, "PgBouncer", "address")),
        ) {
            let pooler = what == "PgBouncer";
            let field_path = if pooler {
                path("citus.pooler.port")
            } else {
                path(&format!("{p}.{field}"))
            };
            match ports.get(&(address.clone(), port)) {
                Some((other, other_what)) => out.push(
                    Diagnostic::error(
                        field_path,
                        format!(
                            "{}:{port} ({what} of {}) is already the {other_what} port of {} ({})",
                            h.address,
                            h.name,
                            other.name,
                            other.path()
                        ),
                    )
                    .with_hint(if pooler {
                        "every worker member runs PgBouncer on citus.pooler.port: choose one that no PostgreSQL or agent API at a worker's address uses"
                    } else {
                        "members that share an address need distinct postgres.port and agent.api_port"
                    }),
                ),
                None => {
                    ports.insert((address.clone(), port), (h, what));
                }
            }
        }
        for (dir, field, overridden) in [
            (&h.data_dir, "postgres.data_dir", h.overrides.data_dir),
            (&h.install_dir, "agent.install_dir", h.overrides.install_dir),
        ] {
            let field_path = if overridden {
                path(&format!("{p}.{field}"))
            } else {
                path(field)
            };
            if !dir.starts_with('/') {
                out.push(Diagnostic::error(
                    field_path,
                    format!("expected an absolute path, found {dir:?}"),
                ));
                continue;
            }
            if spec.agent.service == crate::spec::model::Service::Systemd
                && field == "agent.install_dir"
                && dir
                    .chars()
                    .any(|c| matches!(c, '"' | '\'' | '\\') || c.is_control())
            {
                out.push(
                    Diagnostic::error(
                        field_path.clone(),
                        format!("{dir:?}: systemd refuses quotes, backslashes and control characters in the agent's executable path"),
                    )
                    .with_hint("the agent's binary lives in this folder; choose a plainer name"),
                );
            }
            if spec.agent.service == crate::spec::model::Service::Systemd {
                if let Some(ro) = SYSTEMD_READ_ONLY
                    .iter()
                    .find(|ro| dir == *ro || dir.starts_with(&format!("{ro}/")))
                {
                    out.push(
                        Diagnostic::error(
                            field_path.clone(),
                            format!("{dir} is below {ro}, which the agent's systemd unit makes read-only"),
                        )
                        .with_hint("use a folder under /var or /srv (the unit sets ProtectSystem=full)"),
                    );
                }
            }
            if let Some(other) = dirs.insert((address.clone(), dir.clone()), h) {
                out.push(
                    Diagnostic::error(
                        field_path,
                        format!("{dir} on {} is also used by {}", h.address, other.name),
                    )
                    .with_hint(
                        "include {member} in the path so members that share a machine stay apart",
                    ),
                );
            }
        }
        let socket = format!("{}/.s.PGSQL.{}", h.socket_dir(), h.pg_port);
        if socket.len() > MAX_SOCKET_PATH {
            let field = if h.overrides.install_dir {
                path(&format!("{p}.agent.install_dir"))
            } else {
                p.key("name")
            };
            out.push(
                Diagnostic::error(
                    field,
                    format!(
                        "PostgreSQL socket path {socket} is longer than {MAX_SOCKET_PATH} bytes"
                    ),
                )
                .with_hint("shorten agent.install_dir, the cluster name or the host name"),
            );
        }
    }
}

fn normalize_address(a: &str) -> String {
    match a.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => a.to_ascii_lowercase(),
    }
}

pub fn is_cluster_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

pub fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An IP address, or a DNS name made of labels (upper case allowed, as DNS is case-blind).
pub fn is_address(s: &str) -> bool {
    if s.parse::<IpAddr>().is_ok() {
        return true;
    }
    // Four dot-separated numbers that failed to parse as IPv4 are a bad address, not a name.
    if s.split('.')
        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    s.len() <= 253
        && s.split('.')
            .all(|label| is_dns_label(&label.to_ascii_lowercase()))
}

fn is_identifier(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_guc_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// PgBouncer's server connections per user and database when the spec gives none: all that
/// PostgreSQL accepts less some for the agent, replication and superuser sessions. Session
/// pooling queues a client only when the pool is full, and a Citus statement holding some
/// connections and waiting for more would wait for itself: with the pool as large as the
/// server allows, PgBouncer queues only where a direct connection would be refused.
pub fn pooler_pool_size(max_connections: u32) -> u32 {
    max_connections.saturating_sub(10).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_proxies() {
        for ok in [
            "http://10.0.0.1:3142",
            "http://apt-cache.example.com",
            "http://proxy:8080/",
        ] {
            assert!(is_http_proxy(ok), "{ok}");
        }
        for bad in [
            "10.0.0.1:3142",
            "https://proxy:3142",
            "http://",
            "http://:3142",
            "http://p:0",
            "http://p:70000",
            "http://p:3142/path",
            "http://p q:1",
            "http://p;reboot",
            "http://p'x",
            "http://user@p:1",
        ] {
            assert!(!is_http_proxy(bad), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        let ok = |u: &str, host: &str, port: u16| {
            let e = parse_endpoint(u).unwrap_or_else(|e| panic!("{u}: {e}"));
            assert_eq!((e.host.as_str(), e.port), (host, port), "{u}");
        };
        ok("http://10.0.0.5:2379", "10.0.0.5", 2379);
        ok("http://etcd-1.example.com", "etcd-1.example.com", 2379);
        ok("https://[::1]:2380/", "::1", 2380);
        for bad in [
            "10.0.0.5:2379",
            "ftp://x:1",
            "http://:2379",
            "http://h:0",
            "http://h:99999",
            "http://h/x",
            "http://300.1.1.1:2379",
            "http://u@h:1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn names_and_addresses() {
        for (s, ok) in [
            ("coord1", true),
            ("w-1", true),
            ("-w", false),
            ("W1", false),
            ("a_b", false),
            ("", false),
        ] {
            assert_eq!(is_dns_label(s), ok, "{s}");
        }
        for (s, ok) in [
            ("10.0.0.1", true),
            ("::1", true),
            ("db.example.com", true),
            ("10.0.0.300", false),
            ("a b", false),
            ("1.2.3", false),
        ] {
            assert_eq!(is_address(s), ok, "{s}");
        }
    }
}
