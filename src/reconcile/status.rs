//! `status`: the cluster at a glance, like `patronictl list` — every member's role, state,
//! timeline and lag — and the coordinator's view of pg_dist_node.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;

use crate::citus::metadata::NodeRow;
use crate::dcs::EndpointHealth;
use crate::dcs::keys::MemberRole;
use crate::plan::Observed;
use crate::plan::model::HostObserved;
use crate::spec::Spec;

#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub group: u32,
    pub member: String,
    pub host: String,
    pub role: String,
    pub state: String,
    pub timeline: Option<u32>,
    pub lag_mb: Option<f64>,
    /// Parameters that take effect only at the member's next restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
    /// The agent on the member's host, as its probe saw it: "running (pid …)", "not
    /// running; systemd unit failed (exit-code), restarted 3 times", "host unreachable".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The spec's packages installed on the member's host, with their versions ("held" when
    /// apt-mark holds them).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub packages: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub cluster: String,
    pub members: Vec<MemberStatus>,
    pub pg_dist_node: Option<Vec<NodeRow>>,
    /// Each etcd endpoint's health (when etcd could be reached at all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<EndpointHealth>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl Status {
    /// Add the endpoints' health, and their problems.
    pub fn with_etcd(mut self, endpoints: Vec<EndpointHealth>) -> Status {
        self.problems
            .extend(endpoints.iter().filter_map(EndpointHealth::problem));
        self.etcd = endpoints;
        self
    }
}

pub fn of(spec: &Spec, o: &Observed) -> Status {
    let mut members = Vec::new();
    let mut problems: Vec<String> = o.etcd.error.iter().map(|e| format!("etcd: {e}")).collect();
    problems.extend(o.metadata_error.iter().cloned());
    problems.extend(o.etcd.untrusted.iter().cloned());
    for g in &spec.groups {
        let obs = o.etcd.groups.get(&g.id);
        let leader = obs.and_then(|x| x.leader.clone());
        let leader_wal = leader
            .as_ref()
            .and_then(|l| obs.and_then(|x| x.members.get(l)))
            .map(|m| m.xlog_location);
        let mut names: Vec<String> = g.hosts.iter().map(|h| h.name.clone()).collect();
        if let Some(x) = obs {
            let extra: Vec<String> = x
                .members
                .keys()
                .filter(|k| !names.contains(k))
                .cloned()
                .collect();
            names.extend(extra);
        }
        for name in names {
            let m = obs.and_then(|x| x.members.get(&name));
            let host = spec
                .host(&name)
                .map(|h| format!("{}:{}", h.address, h.pg_port))
                .or_else(|| m.map(|m| format!("{}:{}", m.host, m.port)))
                .unwrap_or_default();
            let is_leader = leader.as_deref() == Some(name.as_str());
            let role = match m {
                None => "-".to_string(),
                Some(_) if is_leader => "Leader".to_string(),
                Some(m) if m.role() == MemberRole::Replica => "Replica".to_string(),
                Some(m) => m.role.clone(),
            };
            let lag_mb = match (m, leader_wal, is_leader) {
                (Some(m), Some(lw), false) if m.role() == MemberRole::Replica => {
                    Some(lw.saturating_sub(m.xlog_location) as f64 / 1_048_576.0)
                }
                _ => None,
            };
            members.push(MemberStatus {
                group: g.id,
                member: name.clone(),
                host,
                role,
                state: m
                    .map(|m| m.state.clone())
                    .unwrap_or_else(|| "not running".into()),
                timeline: m.map(|m| m.timeline).filter(|t| *t > 0),
                lag_mb,
                pending_restart: m.map(|m| m.pending_restart.clone()).unwrap_or_default(),
                agent: agent_state(o.hosts.get(&name), &name, &mut problems),
                packages: installed_packages(o.hosts.get(&name)),
            });
        }
    }
    Status {
        cluster: spec.cluster.clone(),
        members,
        pg_dist_node: o.nodes.clone(),
        etcd: Vec::new(),
        problems,
    }
}

fn installed_packages(host: Option<&HostObserved>) -> std::collections::BTreeMap<String, String> {
    let Some(HostObserved::Reachable(f)) = host else {
        return Default::default();
    };
    f.packages
        .iter()
        .filter_map(|(name, p)| {
            let v = p.installed.as_ref()?;
            Some((
                name.clone(),
                if p.held {
                    format!("{v} (held)")
                } else {
                    v.clone()
                },
            ))
        })
        .collect()
}

/// "postgresql-15: 15.14-0+deb12u1 (held) on every member" — one line per package and
/// version, naming the members unless all have it.
fn package_lines(s: &Status) -> Vec<String> {
    let mut by: std::collections::BTreeMap<(&str, &str), Vec<&str>> = Default::default();
    for m in &s.members {
        for (p, v) in &m.packages {
            by.entry((p.as_str(), v.as_str()))
                .or_default()
                .push(m.member.as_str());
        }
    }
    by.into_iter()
        .map(|((p, v), members)| {
            let on = if members.len() == s.members.len() {
                "every member".to_string()
            } else {
                members.join(", ")
            };
            format!("{p}: {v} on {on}")
        })
        .collect()
}

/// The agent's state on a host in words; a problem when it does not run.
fn agent_state(
    host: Option<&HostObserved>,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    let state = match host? {
        HostObserved::Unreachable { error } => {
            problems.push(format!("{name}: host unreachable: {error}"));
            return Some("host unreachable".into());
        }
        HostObserved::Reachable(f) => match (f.agent_pid, &f.unit_state) {
            (Some(pid), _) => return Some(format!("running (pid {pid})")),
            (None, Some(unit)) => format!("not running; systemd unit {unit}"),
            (None, None) => "not running".to_string(),
        },
    };
    problems.push(format!("{name}: agent {state}"));
    Some(state)
}

pub fn text(s: &Status) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "Group",
        "Member",
        "Host",
        "Role",
        "State",
        "TL",
        "Lag in MB",
        "Pending restart",
        "Agent",
    ]);
    for m in &s.members {
        t.add_row([
            m.group.to_string(),
            m.member.clone(),
            m.host.clone(),
            m.role.clone(),
            m.state.clone(),
            m.timeline.map(|x| x.to_string()).unwrap_or_default(),
            m.lag_mb.map(|x| format!("{x:.1}")).unwrap_or_default(),
            m.pending_restart.join(", "),
            m.agent.clone().unwrap_or_default(),
        ]);
    }
    let mut out = format!("Cluster: {}\n{t}\n", s.cluster);
    let packages = package_lines(s);
    if !packages.is_empty() {
        out.push_str("Packages:\n");
        for l in packages {
            out.push_str(&format!("  {l}\n"));
        }
    }
    match &s.pg_dist_node {
        Some(rows) => {
            let mut n = Table::new();
            n.load_preset(UTF8_FULL_CONDENSED);
            n.set_header([
                "nodeid",
                "groupid",
                "nodename",
                "nodeport",
                "noderole",
                "isactive",
                "shouldhaveshards",
            ]);
            for r in rows {
                n.add_row([
                    r.nodeid.to_string(),
                    r.groupid.to_string(),
                    r.nodename.clone(),
                    r.nodeport.to_string(),
                    r.noderole.clone(),
                    r.isactive.to_string(),
                    r.shouldhaveshards.to_string(),
                ]);
            }
            out.push_str(&format!("pg_dist_node (coordinator primary):\n{n}\n"));
        }
        None => out.push_str("pg_dist_node: not available (no coordinator primary yet)\n"),
    }
    for e in &s.etcd {
        let line = match &e.error {
            Some(why) => why.clone(),
            None => format!(
                "{}v{}, database {}{}",
                if e.leader { "leader, " } else { "" },
                e.version,
                if e.db_size < 1_048_576 {
                    format!("{} kB", e.db_size / 1024)
                } else {
                    format!("{:.1} MB", e.db_size as f64 / 1_048_576.0)
                },
                if e.alarms.is_empty() {
                    String::new()
                } else {
                    format!(", alarms: {}", e.alarms.join(", "))
                }
            ),
        };
        out.push_str(&format!("etcd {}: {line}\n", e.url));
    }
    for p in &s.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::model::HostFacts;

    #[test]
    fn the_agent_column_says_why_it_does_not_run() {
        let facts = |pid: Option<u32>, unit: Option<&str>| {
            HostObserved::Reachable(HostFacts {
                agent_pid: pid,
                unit_state: unit.map(str::to_string),
                ..Default::default()
            })
        };
        let cases = [
            (None, None, false),
            (
                Some(facts(Some(42), Some("active (running)"))),
                Some("running (pid 42)"),
                false,
            ),
            (Some(facts(None, None)), Some("not running"), true),
            (
                Some(facts(None, Some("failed (exit-code), restarted 3 times"))),
                Some("not running; systemd unit failed (exit-code), restarted 3 times"),
                true,
            ),
            (
                Some(HostObserved::Unreachable {
                    error: "connection refused".into(),
                }),
                Some("host unreachable"),
                true,
            ),
        ];
        for (host, want, problem) in cases {
            let mut problems = Vec::new();
            let got = agent_state(host.as_ref(), "w1", &mut problems);
            assert_eq!(got.as_deref(), want, "{host:?}");
            assert_eq!(!problems.is_empty(), problem, "{host:?}: {problems:?}");
            assert!(
                problems.iter().all(|p| p.starts_with("w1: ")),
                "{problems:?}"
            );
        }
    }
}
