//! `diff(desired, observed) -> Plan`: pure. Every rule that decides what `apply` will do
//! lives here, so it is tested with tables of values, without hosts.

use std::collections::{BTreeMap, BTreeSet};

use similar::TextDiff;

use super::model::{DataDirState, Desired, HostDesired, HostFacts, HostObserved, Observed};
use super::{Action, Change, FORMAT_VERSION, Kind, Phase, Plan, Summary, Target};
use crate::citus::metadata::{self, AuthinfoChange, NodeChange, PoolinfoChange};
use crate::dcs::keys::{MemberRole, MemberState};
use crate::spec::model::{InstallMode, Service};

/// A unified diff of two texts, or None when equal.
pub fn unified(old: &str, new: &str, old_name: &str, new_name: &str) -> Option<String> {
    if old == new {
        return None;
    }
    Some(
        TextDiff::from_lines(old, new)
            .unified_diff()
            .context_radius(2)
            .header(old_name, new_name)
            .to_string(),
    )
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

pub fn diff(d: &Desired, o: &Observed) -> Plan {
    let mut actions = Vec::new();
    let mut errors = Vec::new();
    // A managed etcd comes first: until a new one is formed, an empty etcd is the truth for
    // the rest of the plan (nothing was ever stored).
    let mut starting = false;
    let forming = match (&o.managed_etcd, d.etcd_members.is_empty()) {
        (Some(m), false) => {
            let (a, e) = super::etcd::diff(&d.etcd_members, d.etcd_install, m);
            // Members to start: while etcd cannot be read (a reboot, a lost quorum — a
            // member may still list the members alone), that is what apply repairs first,
            // then it plans the rest again.
            starting = a.iter().any(|x| matches!(x.kind, Kind::EtcdStart { .. }));
            actions.extend(a);
            errors.extend(e);
            // A new etcd beside PostgreSQL data: that data was led through another etcd
            // (the spec moved from endpoints to members, or every member moved at once).
            // Forming an empty one would let its replicas elect a second primary.
            let led: Vec<&String> = o
                .hosts
                .iter()
                .filter(|(_, h)| matches!(h, HostObserved::Reachable(f) if f.data_dir == DataDirState::Initialized))
                .map(|(n, _)| n)
                .collect();
            if m.forming() && !led.is_empty() {
                actions.retain(|a| a.phase != Phase::Etcd);
                errors.push(format!(
                    "refusing to form a new etcd: no member of etcd.members answers, yet PostgreSQL data exists on {} (led through another etcd); bring that etcd's members back, or migrate it by hand",
                    led.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ));
                false
            } else {
                m.forming()
            }
        }
        _ => false,
    };
    if let Some(e) = o.etcd.error.as_ref().filter(|_| !forming && !starting) {
        errors.push(format!("etcd: {e}"));
    }
    for (name, hd) in &d.hosts {
        match o.hosts.get(name) {
            None => errors.push(format!("{name}: not observed")),
            Some(HostObserved::Unreachable { error }) => errors.push(error.clone()),
            Some(HostObserved::Reachable(f)) => {
                // Never let an agent start on data of another cluster.
                let expected = o
                    .etcd
                    .groups
                    .get(&hd.group)
                    .and_then(|g| g.initialize.clone())
                    .filter(|s| !s.is_empty());
                if let (Some(found), Some(expected)) = (&f.sysid, &expected) {
                    if found != expected {
                        errors.push(format!(
                            "{name}: the data directory belongs to another cluster (system identifier {found}, group {} has {expected}); move it away to let the member be cloned",
                            hd.group
                        ));
                        continue;
                    }
                }
                // PostgreSQL drift only counts for a member that is up: while an agent creates
                // or starts its server, the files are in flux.
                let member = o
                    .etcd
                    .groups
                    .get(&hd.group)
                    .and_then(|g| g.members.get(name));
                let up = member.is_some_and(running);
                // The configuration the agent runs with, when it says (older agents do not).
                let running_config = member
                    .map(|m| m.config_sha256.as_str())
                    .filter(|s| !s.is_empty());
                host_actions(d, hd, f, up, running_config, &mut actions, &mut errors)
            }
        }
    }
    if o.etcd.error.is_none() {
        convergence(d, o, &mut actions);
        metadata_actions(d, o, &mut actions);
        poolinfo_actions(d, o, &mut actions);
        rebalance_actions(d, o, &mut actions);
        destroy_actions(d, o, &mut actions);
        alter_system_actions(d, o, &mut actions);
        pending_restarts(d, o, &mut actions);
        setup_repairs(d, o, &mut actions);
    }
    reload_or_restart(d, o, &mut actions);
    errors.extend(rolling_notes(d, o, &mut actions));
    // By phase, then target; within the etcd phase a removal comes before anything else (a
    // dead member must go before etcd accepts an add), whatever the members are called.
    let rank = |a: &Action| {
        let later = !(a.phase == Phase::Etcd && matches!(a.kind, Kind::EtcdRemove { .. }));
        (a.phase, later)
    };
    actions.sort_by(|a, b| (rank(a), &a.target).cmp(&(rank(b), &b.target)));
    let mut summary = Summary::default();
    for a in &actions {
        match a.change {
            Change::Add => summary.add += 1,
            Change::Change => summary.change += 1,
            Change::Destroy => summary.destroy += 1,
        }
    }
    Plan {
        format_version: FORMAT_VERSION,
        cluster: d.cluster.clone(),
        actions,
        errors,
        summary,
    }
}

/// A new configuration that changes only PostgreSQL parameters PostgreSQL can take with a
/// reload (`pg_settings.context` sighup, superuser, user, backend) is a reload: no restart
/// of the agent or PostgreSQL. Otherwise the restart says which parameters need it.
fn reload_or_restart(d: &Desired, o: &Observed, actions: &mut [Action]) {
    const RELOAD: [&str; 5] = [
        "sighup",
        "superuser",
        "user",
        "backend",
        "superuser-backend",
    ];
    for a in actions.iter_mut() {
        let (Kind::RestartAgent { reason, .. }, Target::Host(name)) = (&a.kind, &a.target) else {
            continue;
        };
        if reason != "new configuration" {
            continue;
        }
        let Some(h) = d.hosts.get(name) else {
            continue;
        };
        // Only when the agent runs what its file says: otherwise the file holds other
        // changes too (an apply stopped half way), and the agent must restart for them.
        let running = o
            .etcd
            .groups
            .get(&h.group)
            .and_then(|g| g.members.get(name))
            .map(|m| m.config_sha256.as_str());
        let file = match o.hosts.get(name) {
            Some(HostObserved::Reachable(f)) => f.agent_config_sha256.as_deref(),
            _ => None,
        };
        if running.is_none_or(str::is_empty) || running != file {
            continue;
        }
        if pooler_only_change(d, h, o.hosts.get(name)) {
            a.kind = Kind::ReloadAgent {
                reason: "citus.pooler changed".into(),
            };
            a.summary = if h.group == 0 {
                "reload the agent (citus.pooler changed: it keeps pg_dist_poolinfo for it; PostgreSQL keeps running)"
            } else {
                "reload the agent (citus.pooler changed: PgBouncer starts, reloads, restarts or stops; PostgreSQL keeps running)"
            }
            .into();
            continue;
        }
        let Some(names) = parameter_only_change(d, h, o.hosts.get(name)) else {
            continue;
        };
        let context = |n: &String| o.parameter_contexts.get(n).map(String::as_str);
        let (reload, restart): (Vec<&String>, Vec<&String>) = names
            .iter()
            .partition(|n| context(n).is_some_and(|c| RELOAD.contains(&c)));
        let list = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        if restart.is_empty() && !reload.is_empty() {
            a.kind = Kind::ReloadAgent {
                reason: format!("new parameters: {}", list(&reload)),
            };
            a.summary = format!(
                "reload: {} (PostgreSQL takes them with a reload; nothing restarts)",
                list(&reload)
            );
        } else if !restart.is_empty() {
            let mut why = format!("restart for {}", list(&restart));
            if !reload.is_empty() {
                why.push_str(&format!("; reload would do for {}", list(&reload)));
            }
            a.summary = format!("restart the agent (new configuration: {why})");
        }
    }
}

/// Agent restarts roll (see `reconcile::apply`): say how, host by host, so the plan shows
/// which group changes leader and why none fails over.
fn rolling_notes(d: &Desired, o: &Observed, actions: &mut [Action]) -> Vec<String> {
    let mut errors = Vec::new();
    for a in actions.iter_mut() {
        let (Kind::RestartAgent { lowered, .. }, Target::Host(name)) = (&mut a.kind, &a.target)
        else {
            continue;
        };
        let Some(h) = d.hosts.get(name) else {
            continue;
        };
        if let Some(HostObserved::Reachable(f)) = o.hosts.get(name) {
            if let Some(current) = &f.postgresql_conf {
                *lowered =
                    crate::postgres::conf::lowered_standby_minimums(current, &h.postgresql_conf);
            }
        }
        let lowered = lowered.clone();
        // The primary takes a lowered value with a reload and a restart in place by its own
        // agent, which only a change of parameters alone allows.
        if !lowered.is_empty() && parameter_only_change(d, h, o.hosts.get(name)).is_none() {
            errors.push(format!(
                "{name}: lowering {} together with other agent changes (binary or settings) cannot roll safely in one apply; apply the parameter change alone first",
                lowered.join(", ")
            ));
        }
        let Some(g) = o.etcd.groups.get(&h.group) else {
            continue;
        };
        let group = h.group;
        let others_streaming = g
            .members
            .iter()
            .any(|(n, m)| n != name && m.is_streaming_replica());
        let note = if !lowered.is_empty() {
            let what = lowered.join(", ");
            if g.leader.as_deref() == Some(name.as_str()) {
                format!(
                    "; lowers {what}, which standbys need at least as high as the primary: first its agent restarts PostgreSQL in place keeping the leadership (writes to group {group} fail meanwhile), then its replicas one at a time"
                )
            } else {
                format!("; lowers {what}: after the primary of group {group}")
            }
        } else if g.leader.as_deref() == Some(name.as_str()) {
            if others_streaming {
                format!("; leads group {group}: last, after a switchover to a streaming replica")
            } else {
                format!(
                    "; leads group {group}, no streaming replica: in place, the group is down meanwhile"
                )
            }
        } else {
            "; rolling: one member at a time, each streaming again before the next".into()
        };
        a.summary.push_str(&note);
    }
    errors
}

/// The parameters a host's new agent configuration changes, when it changes nothing else
/// (same binary, same other settings; secrets may change too).
fn parameter_only_change(
    d: &Desired,
    h: &HostDesired,
    observed: Option<&HostObserved>,
) -> Option<Vec<String>> {
    let Some(HostObserved::Reachable(f)) = observed else {
        return None;
    };
    if f.agent_binary_sha256.as_deref() != Some(d.binary_sha256.as_str()) {
        return None;
    }
    let parse = |t: &str| crate::agent::config::AgentConfig::parse(t).ok();
    let old = f.agent_config_redacted.as_deref().and_then(parse)?;
    let new = parse(&h.agent_config_redacted)?;
    old.parameter_changes(&new)
}

/// A host's new agent configuration changes `citus.pooler` and nothing else (same binary).
fn pooler_only_change(d: &Desired, h: &HostDesired, observed: Option<&HostObserved>) -> bool {
    let Some(HostObserved::Reachable(f)) = observed else {
        return false;
    };
    if f.agent_binary_sha256.as_deref() != Some(d.binary_sha256.as_str()) {
        return false;
    }
    let parse = |t: &str| crate::agent::config::AgentConfig::parse(t).ok();
    match (
        f.agent_config_redacted.as_deref().and_then(parse),
        parse(&h.agent_config_redacted),
    ) {
        (Some(old), Some(new)) => old.pooler_change_only(&new),
        _ => false,
    }
}

fn act(phase: Phase, target: Target, change: Change, kind: Kind, summary: String) -> Action {
    Action {
        phase,
        target,
        change,
        kind,
        summary,
        diff: None,
    }
}

fn host_actions(
    d: &Desired,
    h: &HostDesired,
    f: &HostFacts,
    member_up: bool,
    running_config: Option<&str>,
    out: &mut Vec<Action>,
    errors: &mut Vec<String>,
) {
    let target = || Target::Host(h.name.clone());
    // A major upgrade needs pg_upgrade (or a logical copy), which nothing here does: refuse
    // before anything starts a server of another version on these files.
    if let Some(found) = f.data_major.filter(|v| *v != h.pg_major) {
        errors.push(format!(
            "{}: the data directory is PostgreSQL {found} but the spec says postgres.version {}; changing the major version of a running cluster is not supported (major upgrades are not implemented): set postgres.version back to {found}",
            h.name, h.pg_major
        ));
        return;
    }
    // The PostgreSQL project's repository and Citus's, before any package is installed from
    // them: (name, sources file, where the key comes from, its pinned fingerprint, summary).
    use super::repository as repo;
    let mut repositories: Vec<(&str, String, Option<String>, String, String)> = Vec::new();
    let codename = f.codename.as_deref().filter(|c| repo::valid_codename(c));
    let os_id = f.os.split('-').next().unwrap_or_default();
    if h.pgdg && f.apt {
        match codename {
            Some(codename) => repositories.push((
                repo::PGDG,
                repo::pgdg_sources(codename),
                None,
                repo::PGDG_KEY_FINGERPRINT.into(),
                format!(
                    "add the PostgreSQL project's apt repository ({} {codename}-pgdg), signed by key {} as Debian's postgresql-common ships it (checked against the pinned fingerprint)",
                    repo::PGDG_URL,
                    repo::PGDG_KEY_FINGERPRINT
                ),
            )),
            None => errors.push(format!(
                "{}: postgres.repository: pgdg needs the host's release codename (VERSION_CODENAME in /etc/os-release), and it has none apt could use",
                h.name
            )),
        }
    }
    if let (Some(r), true) = (&h.citus_repository, f.apt) {
        match codename {
            Some(codename) if matches!(os_id, "debian" | "ubuntu") => repositories.push((
                repo::CITUS,
                repo::citus_sources(r, os_id, codename),
                Some(r.key_url.clone()),
                r.fingerprint.clone(),
                format!(
                    "add Citus's apt repository ({}/{os_id}/ {codename}), its key downloaded from {} and trusted only as {}",
                    r.url, r.key_url, r.fingerprint
                ),
            )),
            _ => errors.push(format!(
                "{}: citus.repository needs a Debian or Ubuntu host with a release codename (found {:?}, codename {:?})",
                h.name, f.os, f.codename
            )),
        }
    }
    for (name, sources, key_url, fingerprint, summary) in repositories {
        let have = f.repositories.get(name);
        if have == Some(&repo::sources_sha256(&sources)) {
            continue;
        }
        out.push(act(
            Phase::Prepare,
            target(),
            if have.is_none() {
                Change::Add
            } else {
                Change::Change
            },
            Kind::AddAptRepository {
                name: name.into(),
                sources,
                key_url,
                fingerprint,
            },
            summary,
        ));
    }
    // Software.
    let mut packages = Vec::new();
    if f.postgres_version.is_none() {
        match h.install {
            InstallMode::Apt => packages.extend(h.packages.iter().cloned()),
            InstallMode::None => errors.push(format!(
                "{}: no PostgreSQL binaries in the spec's bin_dir (install: none)",
                h.name
            )),
        }
    }
    if !f.citus_available {
        match (&h.citus_package, h.install) {
            (Some(pkg), InstallMode::Apt) => packages.push(pkg.clone()),
            _ if f.postgres_version.is_some() || h.install == InstallMode::None => errors.push(format!(
                "{}: the Citus extension is not installed (no citus.control); install it or set citus.package with install: apt",
                h.name
            )),
            _ => {}
        }
    }
    if d.pooler_port.is_some() && h.group != 0 && !f.pgbouncer_available {
        match h.install {
            InstallMode::Apt => {
                if !packages.iter().any(|p| p == "pgbouncer") {
                    packages.push("pgbouncer".into());
                }
            }
            InstallMode::None => errors.push(format!(
                "{}: citus.pooler needs PgBouncer on every worker member, and pgbouncer is not installed (install: none); install Debian's pgbouncer package",
                h.name
            )),
        }
    }
    // Extra packages (extensions, say) on a host that has PostgreSQL already: as dpkg lists
    // them.
    if h.install == InstallMode::Apt && f.apt {
        for p in &h.extra_packages {
            let installed = f.packages.get(p).is_some_and(|s| s.installed.is_some());
            if !installed && !packages.contains(p) {
                packages.push(p.clone());
            }
        }
    }
    if !packages.is_empty() {
        if f.apt {
            // The version each would get, as far as the host's package lists know today (the
            // install runs `apt-get update` first, which may move it).
            let versions: BTreeMap<String, String> = packages
                .iter()
                .filter_map(|p| {
                    let v = f.packages.get(p)?.candidate.clone()?;
                    Some((p.clone(), v))
                })
                .collect();
            let listed = packages
                .iter()
                .map(|p| match versions.get(p) {
                    Some(v) => format!("{p} {v}"),
                    // PostgreSQL itself missing from the distribution's lists: most likely a
                    // version it does not ship.
                    None if *p == format!("postgresql-{}", h.pg_major) && !h.pgdg => format!(
                        "{p} (not in the host's package lists yet; if the distribution does not ship PostgreSQL {}, set postgres.repository: pgdg)",
                        h.pg_major
                    ),
                    None => format!("{p} (not in the host's package lists yet)"),
                })
                .collect::<Vec<_>>()
                .join(", ");
            out.push(act(
                Phase::Prepare,
                target(),
                Change::Add,
                Kind::InstallPackages {
                    packages: packages.clone(),
                    versions,
                    through_holds: f.postgres_version.is_none(),
                },
                format!(
                    "install packages: {listed} (then held, so that no unattended upgrade restarts them; no `main` cluster)"
                ),
            ));
        } else {
            errors.push(format!(
                "{}: packages {} are needed but apt-get is not available",
                h.name,
                packages.join(" ")
            ));
        }
    }

    // Installed packages that are not held any more (`apt-mark unhold`, a restored image):
    // an unattended upgrade could restart PostgreSQL behind the agent's back.
    if h.install == InstallMode::Apt && f.apt {
        let unheld: Vec<(String, String)> = h
            .packages
            .iter()
            .chain(h.citus_package.iter())
            .filter(|p| !packages.contains(p))
            .filter_map(|p| {
                let s = f.packages.get(p).filter(|s| !s.held)?;
                Some((p.clone(), s.installed.clone()?))
            })
            .collect();
        if !unheld.is_empty() {
            out.push(act(
                Phase::Prepare,
                target(),
                Change::Change,
                Kind::HoldPackages {
                    packages: unheld.iter().map(|(p, _)| p.clone()).collect(),
                },
                format!(
                    "hold packages: {} (installed but not held: an unattended upgrade could restart PostgreSQL behind the agent)",
                    unheld
                        .iter()
                        .map(|(p, v)| format!("{p} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }

    // The agent.
    let first_install = f.agent_binary_sha256.is_none() && f.agent_config_sha256.is_none();
    let binary_changed = f.agent_binary_sha256.as_deref() != Some(d.binary_sha256.as_str());
    if binary_changed {
        let (change, summary) = match &f.agent_binary_sha256 {
            None => (
                Change::Add,
                format!("upload agent binary (sha256 {})", short(&d.binary_sha256)),
            ),
            Some(old) => (
                Change::Change,
                format!(
                    "replace agent binary (sha256 {} → {})",
                    short(old),
                    short(&d.binary_sha256)
                ),
            ),
        };
        out.push(act(
            Phase::Install,
            target(),
            change,
            Kind::UploadAgentBinary {
                sha256: d.binary_sha256.clone(),
            },
            summary,
        ));
    }
    let config_changed = f.agent_config_sha256.as_deref() != Some(h.agent_config_sha256.as_str());
    if config_changed {
        let old = f.agent_config_redacted.clone().unwrap_or_default();
        let mut a = act(
            Phase::Install,
            target(),
            if f.agent_config_sha256.is_none() {
                Change::Add
            } else {
                Change::Change
            },
            Kind::WriteAgentConfig,
            if f.agent_config_sha256.is_none() {
                "write agent configuration".into()
            } else {
                "update agent configuration".into()
            },
        );
        a.diff = unified(
            &old,
            &h.agent_config_redacted,
            "agent.yaml (current)",
            "agent.yaml (desired)",
        );
        if a.diff.is_none() {
            a.summary = match changed_secrets(f, h).as_slice() {
                [] => "update agent configuration (secret values changed; not shown)".into(),
                list => format!(
                    "update agent configuration: new {} (values not shown), new passfile",
                    list.join(", ")
                ),
            };
        }
        out.push(a);
    }
    // Only secrets changed (the redacted texts match): the running agent takes them.
    // (Not the etcd password: the agent's etcd session logs in once, so that restarts it.)
    let secrets_only = config_changed
        && f.agent_config_sha256.is_some()
        && f.agent_config_redacted.as_deref() == Some(h.agent_config_redacted.as_str())
        && !changed_secrets(f, h).contains(&"etcd password");
    if h.service == Service::Systemd && !f.unit_installed {
        out.push(act(
            Phase::Install,
            target(),
            Change::Add,
            Kind::InstallService,
            "install the systemd unit".into(),
        ));
    }
    match f.agent_pid {
        None => out.push(act(
            Phase::Start,
            target(),
            if first_install {
                Change::Add
            } else {
                Change::Change
            },
            Kind::StartAgent,
            match (first_install, &f.unit_state) {
                (true, _) => "start the agent".into(),
                (false, Some(state)) if f.unit_installed => {
                    format!("start the agent (not running; systemd unit {state})")
                }
                _ => "start the agent (not running)".into(),
            },
        )),
        Some(_) if secrets_only && !binary_changed => out.push(act(
            Phase::Start,
            target(),
            Change::Change,
            Kind::ReloadAgent {
                reason: "new secrets".into(),
            },
            "reload the agent (new secrets; PostgreSQL keeps running)".into(),
        )),
        // The file was edited by hand while the agent runs the spec's configuration: putting
        // the file back is all there is to do.
        Some(_)
            if config_changed
                && !binary_changed
                && running_config == Some(h.agent_config_sha256.as_str()) => {}
        Some(_) if binary_changed || config_changed => {
            let reason = match (binary_changed, config_changed) {
                (true, true) => "new binary and configuration",
                (true, false) => "new binary",
                _ => "new configuration",
            };
            out.push(act(
                Phase::Start,
                target(),
                Change::Change,
                Kind::RestartAgent {
                    reason: reason.into(),
                    lowered: vec![],
                },
                format!("restart the agent ({reason})"),
            ));
        }
        // An apply stopped between writing the file and restarting the agent.
        Some(_)
            if running_config.is_some() && running_config != f.agent_config_sha256.as_deref() =>
        {
            out.push(act(
                Phase::Start,
                target(),
                Change::Change,
                Kind::RestartAgent {
                    reason: "runs an older configuration than its file".into(),
                    lowered: vec![],
                },
                "restart the agent (it runs an older configuration than its file)".into(),
            ))
        }
        Some(_) => {}
    }
    // postgresql.conf drift (the agent rewrites it whenever it starts PostgreSQL).
    if f.data_dir == DataDirState::Initialized && member_up && f.postgres_ready {
        if let Some(current) = &f.postgresql_conf {
            if let Some(text) = unified(
                current,
                &h.postgresql_conf,
                "postgresql.conf (current)",
                "postgresql.conf (desired)",
            ) {
                let mut a = act(
                    Phase::Converge,
                    target(),
                    Change::Change,
                    Kind::PostgresConf,
                    "PostgreSQL parameters".into(),
                );
                a.diff = Some(text);
                out.push(a);
                let restarting = out.iter().any(|x| {
                    x.target == target()
                        && matches!(x.kind, Kind::RestartAgent { .. } | Kind::StartAgent)
                });
                if !restarting && f.agent_pid.is_some() {
                    out.push(act(
                        Phase::Start,
                        target(),
                        Change::Change,
                        Kind::RestartAgent {
                            reason: "postgresql.conf drifted".into(),
                            lowered: vec![],
                        },
                        "restart the agent (postgresql.conf drifted)".into(),
                    ));
                }
            }
        }
    }
}

/// Settings made with `ALTER SYSTEM` on a member that runs: they override the spec.
fn alter_system_actions(d: &Desired, o: &Observed, out: &mut Vec<Action>) {
    for (name, hd) in &d.hosts {
        let Some(HostObserved::Reachable(f)) = o.hosts.get(name) else {
            continue;
        };
        let up = o
            .etcd
            .groups
            .get(&hd.group)
            .and_then(|g| g.members.get(name))
            .is_some_and(running);
        if f.alter_system.is_empty()
            || !up
            || !f.postgres_ready
            || f.data_dir != DataDirState::Initialized
        {
            continue;
        }
        out.push(act(
            Phase::Converge,
            Target::Host(name.clone()),
            Change::Change,
            Kind::AlterSystem {
                parameters: f.alter_system.clone(),
            },
            format!(
                "remove ALTER SYSTEM settings that override the spec: {} (postgresql.auto.conf; values not shown)",
                f.alter_system.join(", ")
            ),
        ));
    }
}

/// Members whose PostgreSQL waits for a restart to run what its files say (a parameter
/// reloaded that needs a restart, say): shown, and restarted (rolling) unless something
/// planned already restarts the agent, or removes the `ALTER SYSTEM` setting behind it.
fn pending_restarts(d: &Desired, o: &Observed, out: &mut Vec<Action>) {
    for (name, hd) in &d.hosts {
        let Some(m) = o
            .etcd
            .groups
            .get(&hd.group)
            .and_then(|g| g.members.get(name))
        else {
            continue;
        };
        if m.pending_restart.is_empty() || !running(m) {
            continue;
        }
        let target = Target::Host(name.clone());
        let list = m.pending_restart.join(", ");
        out.push(act(
            Phase::Converge,
            target.clone(),
            Change::Change,
            Kind::PendingRestart {
                parameters: m.pending_restart.clone(),
            },
            format!("pending restart: {list} (PostgreSQL runs other values than its files say)"),
        ));
        let handled = out.iter().any(|a| {
            a.target == target
                && (a.phase == Phase::Start || matches!(a.kind, Kind::AlterSystem { .. }))
        });
        let agent_runs =
            matches!(o.hosts.get(name), Some(HostObserved::Reachable(f)) if f.agent_pid.is_some());
        if !handled && agent_runs {
            let reason = format!("pending restart: {list}");
            out.push(act(
                Phase::Start,
                target,
                Change::Change,
                Kind::RestartAgent {
                    reason: reason.clone(),
                    lowered: vec![],
                },
                format!("restart the agent ({reason})"),
            ));
        }
    }
}

/// Which secrets differ between a host's agent configuration and the desired one.
fn changed_secrets(f: &HostFacts, h: &HostDesired) -> Vec<&'static str> {
    [
        ("superuser", "superuser password"),
        ("replication", "replication password"),
        ("api", "REST API password"),
        ("etcd", "etcd password"),
    ]
    .into_iter()
    .filter(|(k, _)| f.secret_digests.get(*k) != h.secret_digests.get(*k))
    .map(|(_, label)| label)
    .collect()
}

/// A member is converged when it runs as primary, or as a replica that streams.
fn running(m: &crate::dcs::keys::MemberInfo) -> bool {
    (m.is_running_primary()) || (m.is_streaming_replica())
}

/// What the agents will do once running: bootstrap groups and bring members up.
fn convergence(d: &Desired, o: &Observed, out: &mut Vec<Action>) {
    for (g, members) in &d.groups {
        let obs = o.etcd.groups.get(g);
        if obs.and_then(|x| x.initialize.as_ref()).is_none() {
            out.push(act(
                Phase::Converge,
                Target::Group(*g),
                Change::Add,
                Kind::BootstrapGroup,
                format!(
                    "group {g}: initialize (the first agent to win the initialize key runs initdb)"
                ),
            ));
        }
        for name in members {
            let member = obs.and_then(|x| x.members.get(name));
            if member.is_some_and(|m| {
                m.role() == MemberRole::Replica && m.state() == MemberState::Running
            }) {
                out.push(act(
                    Phase::Converge,
                    Target::Host(name.clone()),
                    Change::Change,
                    Kind::BringUpMember,
                    "replica: not streaming from the leader yet (the agent follows it)".into(),
                ));
                continue;
            }
            let up = member.is_some_and(running);
            if !up {
                let fresh = matches!(o.hosts.get(name), Some(HostObserved::Reachable(f)) if f.data_dir != DataDirState::Initialized);
                out.push(act(
                    Phase::Converge,
                    Target::Host(name.clone()),
                    if fresh { Change::Add } else { Change::Change },
                    Kind::BringUpMember,
                    if fresh {
                        "PostgreSQL: created by the agent (initdb or clone of the leader)".into()
                    } else {
                        "PostgreSQL: started by the agent".into()
                    },
                ));
            }
        }
    }
}

fn node_summary(c: &NodeChange) -> (Change, String) {
    match c {
        NodeChange::SetCoordinator { host, port } => (
            Change::Add,
            format!("pg_dist_node: + coordinator {host}:{port} (group 0)"),
        ),
        NodeChange::AddPrimary { group, host, port } => (
            Change::Add,
            format!("pg_dist_node: + group {group} primary {host}:{port}"),
        ),
        NodeChange::AddSecondary {
            group, host, port, ..
        } => (
            Change::Add,
            format!("pg_dist_node: + group {group} secondary {host}:{port}"),
        ),
        NodeChange::Update { group, rows } => (
            Change::Change,
            format!(
                "pg_dist_node: ~ {}",
                rows.iter()
                    .map(|u| format!(
                        "node {} (group {group} {}) {}:{} → {}:{}",
                        u.nodeid, u.role, u.from_host, u.from_port, u.host, u.port
                    ))
                    .collect::<Vec<_>>()
                    .join(", then ")
            ),
        ),
        NodeChange::Remove {
            nodeid,
            group,
            host,
            port,
            role,
        } => (
            Change::Change,
            format!("pg_dist_node: - node {nodeid} (group {group} {role}) {host}:{port}"),
        ),
    }
}

fn metadata_actions(d: &Desired, o: &Observed, out: &mut Vec<Action>) {
    let mut groups = BTreeMap::new();
    for (g, obs) in &o.etcd.groups {
        if let Some(m) = metadata::group_members(
            obs.leader.as_deref(),
            obs.initialize.as_deref(),
            &obs.members,
        ) {
            groups.insert(*g, m);
        }
    }
    let desired_rows = metadata::desired_nodes(&groups, d.secondaries);
    let known: Vec<u32> = d.groups.keys().copied().collect();
    let observed_rows = o.nodes.clone().unwrap_or_default();
    if o.nodes.is_some() {
        for change in metadata::diff_nodes(&desired_rows, &observed_rows, &known) {
            if matches!(&change, NodeChange::Remove { role, .. } if role == "primary") {
                continue; // reported as RemoveGroup
            }
            let (kind_change, summary) = node_summary(&change);
            let target = Target::Group(change.group());
            out.push(act(
                Phase::Converge,
                target,
                kind_change,
                Kind::Node { change },
                summary,
            ));
        }
    }
    // Groups whose row cannot be written yet (no leader, or no coordinator to write it).
    for g in d.groups.keys() {
        let has_row = observed_rows
            .iter()
            .any(|r| r.groupid == *g as i32 && r.noderole == "primary");
        let planned = out
            .iter()
            .any(|a| a.target == Target::Group(*g) && matches!(a.kind, Kind::Node { .. }));
        if !has_row && !planned {
            let what = if *g == 0 {
                "coordinator".to_string()
            } else {
                format!("group {g} primary")
            };
            out.push(act(
                Phase::Converge,
                Target::Group(*g),
                Change::Add,
                Kind::NodePending { group: *g },
                format!("pg_dist_node: + {what} (at its leader, once elected)"),
            ));
        }
    }
    // Role passwords on every group primary that could be read: set by the primary's agent
    // (one transaction with its pg_dist_authinfo row), replicated to its standbys.
    for (g, verifiers) in &o.role_verifiers {
        for (role, password) in &d.role_passwords {
            // A password that needs SASLprep is hashed by the server: not comparable here.
            let comparable =
                crate::postgres::scram::verifier(password.expose(), b"salt", 1).is_some();
            let current = !comparable
                || verifiers.get(role).is_some_and(|v| {
                    crate::postgres::scram::verifier_matches(v, password.expose())
                });
            if !current {
                out.push(act(
                    Phase::Converge,
                    Target::Group(*g),
                    Change::Change,
                    Kind::RolePassword {
                        group: *g,
                        role: role.clone(),
                    },
                    format!(
                        "role {role}: new password on the group's primary (a SCRAM verifier; standbys replicate it)"
                    ),
                ));
            }
        }
    }
    // pg_dist_authinfo on every group primary that could be read.
    for (g, rows) in &o.authinfo {
        for change in metadata::diff_authinfo(d.authinfo.as_ref(), rows, &d.superuser) {
            let (c, text) = match &change {
                AuthinfoChange::Add { row } => (
                    Change::Add,
                    format!(
                        "pg_dist_authinfo: + ({}, {}) {}",
                        row.nodeid,
                        row.rolename,
                        row.redacted()
                    ),
                ),
                AuthinfoChange::Change { row, previous } => {
                    let (old, new) = (previous.redacted(), row.redacted());
                    let what = if old == new {
                        "password changed".to_string()
                    } else {
                        format!("{old} → {new}")
                    };
                    (
                        Change::Change,
                        format!(
                            "pg_dist_authinfo: ~ ({}, {}) {what}",
                            row.nodeid, row.rolename
                        ),
                    )
                }
                AuthinfoChange::Remove { row } => (
                    Change::Change,
                    format!("pg_dist_authinfo: - ({}, {})", row.nodeid, row.rolename),
                ),
            };
            out.push(act(
                Phase::Converge,
                Target::Group(*g),
                c,
                Kind::Authinfo { group: *g, change },
                text,
            ));
        }
    }
}

/// `pg_dist_poolinfo` on every group primary that could be read: as it will be once every
/// worker member of the spec runs its PgBouncer (the agents add a row only then).
fn poolinfo_actions(d: &Desired, o: &Observed, out: &mut Vec<Action>) {
    let running: Vec<metadata::PoolerAt> = d
        .pooler_port
        .map(|pooler_port| {
            d.hosts
                .values()
                .filter(|h| h.group != 0)
                .map(|h| metadata::PoolerAt {
                    host: h.address.clone(),
                    port: h.pg_port,
                    pooler_port,
                })
                .collect()
        })
        .unwrap_or_default();
    for (g, rows) in &o.poolinfo {
        for change in metadata::diff_poolinfo(rows, d.pooler_port, &running) {
            let (c, text) = match &change {
                PoolinfoChange::Set {
                    nodeid,
                    poolinfo,
                    previous: None,
                } => (
                    Change::Add,
                    format!(
                        "pg_dist_poolinfo: + ({nodeid}) {poolinfo} (Citus connects to that node through its PgBouncer)"
                    ),
                ),
                PoolinfoChange::Set {
                    nodeid,
                    poolinfo,
                    previous: Some(old),
                } => (
                    Change::Change,
                    format!("pg_dist_poolinfo: ~ ({nodeid}) {old} → {poolinfo}"),
                ),
                PoolinfoChange::Remove { nodeid, poolinfo } => (
                    Change::Change,
                    format!("pg_dist_poolinfo: - ({nodeid}) {poolinfo}"),
                ),
            };
            out.push(act(
                Phase::Converge,
                Target::Group(*g),
                c,
                Kind::Poolinfo { group: *g, change },
                text,
            ));
        }
    }
}

/// A role password or `pg_dist_authinfo` row that differs while the group primary's agent has
/// nothing new to take (edited by hand, say): the agent set them up once and does not look
/// again on its own. A reload makes it (one transaction, PostgreSQL keeps running) — unless
/// the host's agent is being started, restarted or reloaded anyway.
/// The same for `ALTER SYSTEM` settings on any member: a reload makes the agent remove them.
/// `pg_dist_poolinfo` rows left after the pooler went from the spec, too (with a pooler the
/// primaries' agents keep the table in line on every cycle by themselves).
fn setup_repairs(d: &Desired, o: &Observed, out: &mut Vec<Action>) {
    let groups: BTreeSet<u32> = out
        .iter()
        .filter_map(|a| match a.kind {
            Kind::RolePassword { group, .. } | Kind::Authinfo { group, .. } => Some(group),
            _ => None,
        })
        .collect();
    let mut hosts: BTreeMap<String, &str> = groups
        .iter()
        .filter_map(|g| o.etcd.groups.get(g).and_then(|e| e.leader.clone()))
        .map(|leader| {
            (
                leader,
                "reload the agent (it sets roles and pg_dist_authinfo again; PostgreSQL keeps running)",
            )
        })
        .collect();
    if d.pooler_port.is_none() {
        for a in out.iter() {
            if let Kind::Poolinfo { group, .. } = a.kind {
                if let Some(leader) = o.etcd.groups.get(&group).and_then(|e| e.leader.clone()) {
                    hosts.entry(leader).or_insert(
                        "reload the agent (it sets pg_dist_poolinfo again; PostgreSQL keeps running)",
                    );
                }
            }
        }
    }
    for a in out.iter() {
        if let (Kind::AlterSystem { .. }, Target::Host(h)) = (&a.kind, &a.target) {
            hosts
                .entry(h.clone())
                .and_modify(|s| *s = "reload the agent (it sets roles and pg_dist_authinfo again and removes ALTER SYSTEM settings; PostgreSQL keeps running)")
                .or_insert("reload the agent (it removes ALTER SYSTEM settings; PostgreSQL keeps running)");
        }
    }
    for (host, summary) in hosts {
        let agent_runs = matches!(
            o.hosts.get(&host),
            Some(HostObserved::Reachable(f)) if f.agent_pid.is_some()
        );
        // Started, restarted or reloaded anyway: that does it too.
        let busy = out
            .iter()
            .any(|a| a.phase == Phase::Start && a.target == Target::Host(host.clone()));
        if agent_runs && !busy {
            out.push(act(
                Phase::Start,
                Target::Host(host),
                Change::Change,
                Kind::RecheckSetup,
                summary.into(),
            ));
        }
    }
}

/// `citus.rebalance`: spread shards over every worker group once all are registered, or follow
/// the job that runs. Nothing is planned while Citus's view is unreadable.
fn rebalance_actions(d: &Desired, o: &Observed, out: &mut Vec<Action>) {
    let Some(shards) = o.shards.as_ref().filter(|_| d.rebalance) else {
        return;
    };
    let mode = crate::citus::metadata::transfer_mode(
        &shards.without_replica_identity,
        d.pooler_port.is_some(),
    );
    let why = match shards.without_replica_identity.as_slice() {
        [] if d.pooler_port.is_some() => "writes to each shard wait while it moves: Citus would open a logical move's replication connections through PgBouncer (citus.pooler), which refuses them before 1.23".to_string(),
        [] => "online: writes go on while shards move".to_string(),
        tables => format!(
            "{} {} no replica identity, so writes to each shard wait while it moves; a primary key or REPLICA IDENTITY FULL would let {} move online",
            tables.join(", "),
            if tables.len() == 1 { "has" } else { "have" },
            if tables.len() == 1 { "it" } else { "them" }
        ),
    };
    // Worker groups of the spec without their row yet: they will be, then shards move.
    let rows = o.nodes.as_deref().unwrap_or_default();
    let pending: Vec<u32> = d
        .groups
        .keys()
        .filter(|g| **g != 0)
        .filter(|g| {
            !rows
                .iter()
                .any(|r| r.groupid == **g as i32 && r.noderole == "primary")
        })
        .copied()
        .collect();
    let summary = if let Some(j) = &shards.running_job {
        format!(
            "rebalance job {} {} ({} of {} moves done): apply follows it",
            j.job_id, j.state, j.done, j.total
        )
    } else if !pending.is_empty() && shards.per_group.values().any(|n| *n > 0) {
        format!(
            "rebalance shards once group{} {} {} registered (citus_rebalance_start, shard_transfer_mode => {mode}: {why})",
            if pending.len() == 1 { "" } else { "s" },
            pending
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if pending.len() == 1 { "is" } else { "are" }
        )
    } else if shards.planned_moves > 0 {
        format!(
            "rebalance: {} shard move{} over {} worker groups (citus_rebalance_start, shard_transfer_mode => {mode}: {why})",
            shards.planned_moves,
            if shards.planned_moves == 1 { "" } else { "s" },
            d.groups.keys().filter(|g| **g != 0).count()
        )
    } else {
        return;
    };
    out.push(act(
        Phase::Rebalance,
        Target::Cluster,
        Change::Change,
        Kind::Rebalance {
            transfer_mode: mode.to_string(),
        },
        summary,
    ));
}

fn destroy_actions(d: &Desired, o: &Observed, out: &mut Vec<Action>) {
    let spec_groups: BTreeSet<u32> = d.groups.keys().copied().collect();
    let mut gone_groups: BTreeSet<u32> = o
        .etcd
        .groups
        .keys()
        .filter(|g| !spec_groups.contains(g))
        .copied()
        .collect();
    if let Some(rows) = &o.nodes {
        gone_groups.extend(
            rows.iter()
                .filter(|r| r.groupid > 0 && !spec_groups.contains(&(r.groupid as u32)))
                .map(|r| r.groupid as u32),
        );
    }
    for g in &gone_groups {
        let drain = match o.shards.as_ref() {
            Some(s) => {
                let n = s.per_group.get(g).copied().unwrap_or(0);
                let mode = crate::citus::metadata::transfer_mode(
                    &s.without_replica_identity,
                    d.pooler_port.is_some(),
                );
                if n == 0 {
                    "no shards to move".to_string()
                } else {
                    format!(
                        "move its {n} shard{} to the other groups (citus_rebalance_start drain_only, shard_transfer_mode => {mode})",
                        if n == 1 { "" } else { "s" }
                    )
                }
            }
            None => "move its shards to the other groups (citus_rebalance_start drain_only)".into(),
        };
        out.push(act(
            Phase::Destroy,
            Target::Group(*g),
            Change::Destroy,
            Kind::RemoveGroup { group: *g },
            format!("group {g}: {drain}, stop its agents and set their data directories aside (never deleted), delete its etcd keys, remove its rows from pg_dist_node"),
        ));
    }
    for (g, obs) in &o.etcd.groups {
        if gone_groups.contains(g) {
            continue;
        }
        for (name, m) in &obs.members {
            if !d.hosts.contains_key(name) {
                out.push(act(
                    Phase::Destroy,
                    Target::Group(*g),
                    Change::Destroy,
                    Kind::RemoveMember { member: name.clone(), address: m.host.clone() },
                    format!("member {name} ({}): stop its agent, set its data directory aside (never deleted), delete its etcd keys", m.host),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests;
