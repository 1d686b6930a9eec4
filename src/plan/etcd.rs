//! The managed etcd's part of the plan (`etcd.members`): pure. Which members to install,
//! start, add and remove, from what their hosts and the etcd cluster itself say.
//!
//! Quorum is kept by order: members are added one at a time before any is removed (removals
//! wait for the destroy phase, after the agents have moved to the new endpoints), and etcd's
//! own reconfiguration check refuses a removal that would cost the cluster its quorum.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Action, Change, Kind, Phase, Target};
use crate::spec::model::InstallMode;

/// One member as etcd lists it. A member added but not started yet has no name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterMember {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub learner: bool,
    /// Whether it answered on its client URL; asked only of members the spec dropped (a
    /// dead one is removed before any member is added).
    pub answers: Option<bool>,
}

/// One member the spec wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EtcdMemberDesired {
    pub name: String,
    pub address: String,
    pub peer_url: String,
    pub client_url: String,
    /// Its folder on the host.
    pub dir: String,
}

/// What a member's host says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EtcdHostFacts {
    /// `etcd --version`'s first line, when etcd is installed.
    pub binary: Option<String>,
    /// `{dir}/data/member` exists: this member has joined a cluster once.
    pub data: bool,
    /// Its etcd process runs (pid file and command line).
    pub running: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum EtcdHost {
    Unreachable { error: String },
    Reachable(EtcdHostFacts),
}

/// The managed etcd as observed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ManagedEtcdObserved {
    /// Each desired member's host, by member name.
    pub hosts: BTreeMap<String, EtcdHost>,
    /// The cluster's member list, or why no endpoint gave it.
    pub members: Option<Result<Vec<ClusterMember>, String>>,
}

impl ManagedEtcdObserved {
    /// No endpoint answers and no member has data: `apply` forms a new cluster, and until
    /// then an empty etcd is the truth for the rest of the plan.
    pub fn forming(&self) -> bool {
        !matches!(self.members, Some(Ok(_)))
            && !self
                .hosts
                .values()
                .any(|h| matches!(h, EtcdHost::Reachable(f) if f.data))
    }
}

/// A listed member's name, or its id in hex while it has not started (and so has no name).
pub fn listed_name(c: &ClusterMember) -> String {
    if c.name.is_empty() {
        format!("{:x}", c.id)
    } else {
        c.name.clone()
    }
}

fn act(phase: Phase, name: &str, change: Change, kind: Kind, summary: String) -> Action {
    Action {
        phase,
        target: Target::Etcd(name.to_string()),
        change,
        kind,
        summary,
        diff: None,
    }
}

/// The actions that bring the managed etcd to `desired`, and what prevents it.
pub fn diff(
    desired: &[EtcdMemberDesired],
    install: InstallMode,
    o: &ManagedEtcdObserved,
) -> (Vec<Action>, Vec<String>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    // etcd on each host that needs it.
    let needs_binary = |name: &str| matches!(o.hosts.get(name), Some(EtcdHost::Reachable(f)) if f.binary.is_none());
    let install_on = |m: &EtcdMemberDesired, out: &mut Vec<Action>, errors: &mut Vec<String>| {
        if !needs_binary(&m.name) {
            return true;
        }
        match install {
            InstallMode::Apt => {
                out.push(act(
                    Phase::Etcd,
                    &m.name,
                    Change::Add,
                    Kind::EtcdInstall,
                    format!(
                        "install etcd on {} (Debian's etcd-server, held; its own service disabled)",
                        m.address
                    ),
                ));
                true
            }
            InstallMode::None => {
                errors.push(format!(
                    "etcd member {}: etcd is not installed on {} (install: none)",
                    m.name, m.address
                ));
                false
            }
        }
    };
    let unreachable = |name: &str| match o.hosts.get(name) {
        Some(EtcdHost::Unreachable { error }) => Some(error.clone()),
        None => Some("not observed".into()),
        Some(EtcdHost::Reachable(_)) => None,
    };
    let facts = |name: &str| match o.hosts.get(name) {
        Some(EtcdHost::Reachable(f)) => Some(f.clone()),
        _ => None,
    };

    match &o.members {
        Some(Ok(members)) => {
            // A member the spec dropped that does not answer goes first: etcd's strict
            // reconfiguration check refuses to add a member while a voter is down, so a dead
            // member could otherwise never be replaced. (With it gone, the quorum counts
            // only the members that answer.)
            for c in members.iter().filter(|c| c.answers == Some(false)) {
                if desired.iter().any(|m| c.peer_urls.contains(&m.peer_url)) {
                    continue;
                }
                let name = listed_name(c);
                out.push(act(
                    Phase::Etcd,
                    &name,
                    Change::Destroy,
                    Kind::EtcdRemove {
                        id: c.id,
                        peer_urls: c.peer_urls.clone(),
                    },
                    format!(
                        "remove etcd member {name} ({}) first: it does not answer, and etcd adds no member while a voter is down",
                        c.peer_urls.join(", ")
                    ),
                ));
            }
            for m in desired {
                let listed = members.iter().find(|c| c.peer_urls.contains(&m.peer_url));
                match (listed, facts(&m.name)) {
                    (_, None) => {
                        // A member that is down does not stop the rest; one to add does.
                        if listed.is_none() {
                            errors.push(format!(
                                "etcd member {}: cannot add it: {}",
                                m.name,
                                unreachable(&m.name).unwrap_or_default()
                            ));
                        }
                    }
                    (Some(_), Some(f)) if f.running => {}
                    // A member that joined once but has no data (a reimaged host): started
                    // again it would have forgotten its votes.
                    (Some(c), Some(f)) if !c.name.is_empty() && !f.data => errors.push(format!(
                        "etcd member {}: etcd lists it as a started member, but {} has no data in {}/data; remove it from the spec, apply with --allow-destroy, then add it again",
                        m.name, m.address, m.dir
                    )),
                    (Some(_), Some(_)) => {
                        if install_on(m, &mut out, &mut errors) {
                            out.push(act(
                                Phase::Etcd,
                                &m.name,
                                Change::Change,
                                Kind::EtcdStart { new_cluster: false },
                                format!("start etcd member {} on {} (a member, not running)", m.name, m.address),
                            ));
                        }
                    }
                    (None, Some(f)) if f.data => errors.push(format!(
                        "etcd member {}: {} holds data of a member the cluster no longer lists; move {}/data away to add it again",
                        m.name, m.address, m.dir
                    )),
                    (None, Some(_)) => {
                        if install_on(m, &mut out, &mut errors) {
                            out.push(act(
                                Phase::Etcd,
                                &m.name,
                                Change::Add,
                                Kind::EtcdAdd,
                                format!(
                                    "add etcd member {} ({}): member add, then start it; members join one at a time, each healthy before the next",
                                    m.name, m.peer_url
                                ),
                            ));
                        }
                    }
                }
            }
            for c in members.iter().filter(|c| c.answers != Some(false)) {
                if desired.iter().any(|m| c.peer_urls.contains(&m.peer_url)) {
                    continue;
                }
                let name = listed_name(c);
                out.push(act(
                    Phase::Destroy,
                    &name,
                    Change::Destroy,
                    Kind::EtcdRemove {
                        id: c.id,
                        peer_urls: c.peer_urls.clone(),
                    },
                    format!(
                        "remove etcd member {name} ({}): member remove once the others are healthy (etcd refuses one that would cost its quorum); its process stops when its host is the spec's",
                        c.peer_urls.join(", ")
                    ),
                ));
            }
        }
        _ if o.forming() => {
            let down: Vec<String> = desired
                .iter()
                .filter_map(|m| unreachable(&m.name).map(|e| format!("{}: {e}", m.name)))
                .collect();
            if !down.is_empty() {
                errors.push(format!(
                    "cannot form the etcd cluster: every member's host is needed ({})",
                    down.join("; ")
                ));
                return (out, errors);
            }
            let names: Vec<&str> = desired.iter().map(|m| m.name.as_str()).collect();
            for m in desired {
                if install_on(m, &mut out, &mut errors) {
                    out.push(act(
                        Phase::Etcd,
                        &m.name,
                        Change::Add,
                        Kind::EtcdStart { new_cluster: true },
                        format!(
                            "start etcd member {} on {}: a new etcd cluster of {}",
                            m.name,
                            m.address,
                            names.join(", ")
                        ),
                    ));
                }
            }
        }
        _ => {
            // Members with data, none answering: start those that are stopped.
            let mut any = false;
            for m in desired {
                if let Some(f) = facts(&m.name).filter(|f| f.data && !f.running) {
                    let _ = f;
                    any = true;
                    out.push(act(
                        Phase::Etcd,
                        &m.name,
                        Change::Change,
                        Kind::EtcdStart { new_cluster: false },
                        format!(
                            "start etcd member {} on {} (not running)",
                            m.name, m.address
                        ),
                    ));
                }
            }
            if !any {
                let why = match &o.members {
                    Some(Err(e)) => e.clone(),
                    _ => "not asked".into(),
                };
                errors.push(format!(
                    "etcd: no member answers ({why}), and none is stopped that apply could start"
                ));
            }
        }
    }
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(names: &[&str]) -> Vec<EtcdMemberDesired> {
        names
            .iter()
            .map(|n| {
                let octet = n.trim_start_matches('e');
                EtcdMemberDesired {
                    name: n.to_string(),
                    address: format!("10.0.0.{octet}"),
                    peer_url: format!("http://10.0.0.{octet}:2380"),
                    client_url: format!("http://10.0.0.{octet}:2379"),
                    dir: format!("/var/lib/e/{n}"),
                }
            })
            .collect()
    }

    fn host(binary: bool, data: bool, running: bool) -> EtcdHost {
        EtcdHost::Reachable(EtcdHostFacts {
            binary: binary.then(|| "etcd Version: 3.4.23".to_string()),
            data,
            running,
        })
    }

    fn listed(names: &[&str]) -> Vec<ClusterMember> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let octet = n.trim_start_matches('e');
                ClusterMember {
                    id: 100 + i as u64,
                    name: n.to_string(),
                    peer_urls: vec![format!("http://10.0.0.{octet}:2380")],
                    client_urls: vec![format!("http://10.0.0.{octet}:2379")],
                    learner: false,
                    answers: None,
                }
            })
            .collect()
    }

    /// `listed`, with what the members the spec dropped said to a status call.
    fn listed_answering(names: &[&str], dropped: &[(&str, bool)]) -> Vec<ClusterMember> {
        let mut out = listed(names);
        for c in out.iter_mut() {
            c.answers = dropped.iter().find(|(n, _)| *n == c.name).map(|(_, a)| *a);
        }
        out
    }

    fn lines(
        d: &[EtcdMemberDesired],
        install: InstallMode,
        o: &ManagedEtcdObserved,
    ) -> Vec<String> {
        let (actions, errors) = diff(d, install, o);
        actions
            .iter()
            .map(|a| {
                let c = match a.change {
                    Change::Add => "+",
                    Change::Change => "~",
                    Change::Destroy => "-",
                };
                let t = match &a.target {
                    Target::Etcd(n) => n.clone(),
                    other => format!("{other:?}"),
                };
                let k = match &a.kind {
                    Kind::EtcdInstall => "install".to_string(),
                    Kind::EtcdStart { new_cluster } => format!("start new={new_cluster}"),
                    Kind::EtcdAdd => "add".to_string(),
                    Kind::EtcdRemove { id, .. } => format!("remove {id}"),
                    other => format!("{other:?}"),
                };
                format!("{c} {t} {k} {:?}", a.phase)
            })
            .chain(errors.iter().map(|e| format!("! {e}")))
            .collect()
    }

    fn observed(
        hosts: &[(&str, EtcdHost)],
        members: Option<Result<Vec<ClusterMember>, String>>,
    ) -> ManagedEtcdObserved {
        ManagedEtcdObserved {
            hosts: hosts
                .iter()
                .map(|(n, h)| (n.to_string(), h.clone()))
                .collect(),
            members,
        }
    }

    type Case = (
        &'static str,
        Vec<EtcdMemberDesired>,
        InstallMode,
        ManagedEtcdObserved,
        Vec<&'static str>,
    );

    #[test]
    fn the_plan_of_a_managed_etcd() {
        let three = want(&["e1", "e2", "e3"]);
        let down = || Some(Err("connection refused".to_string()));
        let cases: Vec<Case> = vec![
            (
                "bare hosts, apt: install everywhere, then a new cluster",
                three.clone(),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(false, false, false)),
                        ("e2", host(false, false, false)),
                        ("e3", host(true, false, false)),
                    ],
                    down(),
                ),
                vec![
                    "+ e1 install Etcd",
                    "+ e1 start new=true Etcd",
                    "+ e2 install Etcd",
                    "+ e2 start new=true Etcd",
                    "+ e3 start new=true Etcd",
                ],
            ),
            (
                "no etcd and install: none",
                three.clone(),
                InstallMode::None,
                observed(
                    &[
                        ("e1", host(false, false, false)),
                        ("e2", host(true, false, false)),
                        ("e3", host(true, false, false)),
                    ],
                    down(),
                ),
                vec![
                    "+ e2 start new=true Etcd",
                    "+ e3 start new=true Etcd",
                    "! etcd member e1: etcd is not installed on 10.0.0.1 (install: none)",
                ],
            ),
            (
                "a new cluster needs every host",
                three.clone(),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, false, false)),
                        (
                            "e2",
                            EtcdHost::Unreachable {
                                error: "timed out".into(),
                            },
                        ),
                        ("e3", host(true, false, false)),
                    ],
                    down(),
                ),
                vec![
                    "! cannot form the etcd cluster: every member's host is needed (e2: timed out)",
                ],
            ),
            (
                "converged",
                three.clone(),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, true)),
                        ("e2", host(true, true, true)),
                        ("e3", host(true, true, true)),
                    ],
                    Some(Ok(listed(&["e1", "e2", "e3"]))),
                ),
                vec![],
            ),
            (
                "a member stopped; another's host down (not blocking)",
                three.clone(),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, false)),
                        ("e2", EtcdHost::Unreachable { error: "x".into() }),
                        ("e3", host(true, true, true)),
                    ],
                    Some(Ok(listed(&["e1", "e2", "e3"]))),
                ),
                vec!["~ e1 start new=false Etcd"],
            ),
            (
                "one replaced: add the new one now, remove the old at the end",
                want(&["e1", "e2", "e4"]),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, true)),
                        ("e2", host(true, true, true)),
                        ("e4", host(true, false, false)),
                    ],
                    Some(Ok(listed(&["e1", "e2", "e3"]))),
                ),
                vec!["+ e4 add Etcd", "- e3 remove 102 Destroy"],
            ),
            (
                "a dead member replaced: removed first, since etcd adds none while a voter is down",
                want(&["e1", "e2", "e4"]),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, true)),
                        ("e2", host(true, true, true)),
                        ("e4", host(true, false, false)),
                    ],
                    Some(Ok(listed_answering(&["e1", "e2", "e3"], &[("e3", false)]))),
                ),
                vec!["- e3 remove 102 Etcd", "+ e4 add Etcd"],
            ),
            (
                "a dropped member that answers waits for the end",
                want(&["e1", "e2", "e4"]),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, true)),
                        ("e2", host(true, true, true)),
                        ("e4", host(true, false, false)),
                    ],
                    Some(Ok(listed_answering(&["e1", "e2", "e3"], &[("e3", true)]))),
                ),
                vec!["+ e4 add Etcd", "- e3 remove 102 Destroy"],
            ),
            (
                "a new member whose host is down blocks",
                want(&["e1", "e2", "e3", "e4", "e5"]),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, true)),
                        ("e2", host(true, true, true)),
                        ("e3", host(true, true, true)),
                        ("e4", host(true, false, false)),
                        (
                            "e5",
                            EtcdHost::Unreachable {
                                error: "no route".into(),
                            },
                        ),
                    ],
                    Some(Ok(listed(&["e1", "e2", "e3"]))),
                ),
                vec!["+ e4 add Etcd", "! etcd member e5: cannot add it: no route"],
            ),
            (
                "a started member whose data is gone is never started empty",
                three.clone(),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, true)),
                        ("e2", host(true, true, true)),
                        ("e3", host(true, false, false)),
                    ],
                    Some(Ok(listed(&["e1", "e2", "e3"]))),
                ),
                vec![
                    "! etcd member e3: etcd lists it as a started member, but 10.0.0.3 has no data in /var/lib/e/e3/data; remove it from the spec, apply with --allow-destroy, then add it again",
                ],
            ),
            (
                "stale data of a removed member is never reused",
                three.clone(),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, true)),
                        ("e2", host(true, true, true)),
                        ("e3", host(true, true, false)),
                    ],
                    Some(Ok(listed(&["e1", "e2"]))),
                ),
                vec![
                    "! etcd member e3: 10.0.0.3 holds data of a member the cluster no longer lists; move /var/lib/e/e3/data away to add it again",
                ],
            ),
            (
                "every member stopped with data: start them (never a new cluster)",
                three.clone(),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, false)),
                        ("e2", host(true, true, false)),
                        ("e3", host(true, true, true)),
                    ],
                    down(),
                ),
                vec!["~ e1 start new=false Etcd", "~ e2 start new=false Etcd"],
            ),
            (
                "members with data run, yet none answers",
                three.clone(),
                InstallMode::Apt,
                observed(
                    &[
                        ("e1", host(true, true, true)),
                        ("e2", host(true, true, true)),
                        ("e3", host(true, true, true)),
                    ],
                    down(),
                ),
                vec![
                    "! etcd: no member answers (connection refused), and none is stopped that apply could start",
                ],
            ),
        ];
        for (what, d, install, o, expected) in cases {
            assert_eq!(lines(&d, install, &o), expected, "{what}");
        }
    }

    #[test]
    fn forming_only_without_an_answer_and_without_data() {
        let o = observed(
            &[("e1", host(true, false, false))],
            Some(Err("refused".into())),
        );
        assert!(o.forming());
        let o = observed(
            &[("e1", host(true, true, false))],
            Some(Err("refused".into())),
        );
        assert!(!o.forming());
        let o = observed(&[("e1", host(true, false, false))], Some(Ok(vec![])));
        assert!(!o.forming());
    }
}
