//! The Citus metadata we manage, as values: rows of `pg_dist_node` and `pg_dist_authinfo`,
//! what they should be given the spec and the current leaders, and the changes that get from
//! one to the other. Pure; used by the coordinator's agent (to act) and by `plan` (to show).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::spec::secret::{REDACTED, Secret};

/// One row of `pg_dist_node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub nodeid: i32,
    pub groupid: i32,
    pub nodename: String,
    pub nodeport: i32,
    pub noderole: String,
    pub isactive: bool,
    pub shouldhaveshards: bool,
}

/// A row as it should be. `nodeid` is assigned by Citus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredNode {
    pub groupid: u32,
    pub nodename: String,
    pub nodeport: u16,
    pub role: NodeRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Primary,
    Secondary,
}

impl NodeRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeRole::Primary => "primary",
            NodeRole::Secondary => "secondary",
        }
    }
}

/// Where a group's members are now: the leader's address, and the streaming replicas'.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupMembers {
    pub leader: Option<(String, u16)>,
    pub replicas: Vec<(String, u16)>,
}

/// Where one group's members are, from its etcd keys: the leader (only once bootstrap
/// finished and it runs as primary — before that, Citus could not connect to it) and its
/// streaming replicas.
pub fn group_members(
    leader: Option<&str>,
    initialize: Option<&str>,
    members: &BTreeMap<String, crate::dcs::keys::MemberInfo>,
) -> Option<GroupMembers> {
    let leader = leader?;
    if initialize.is_none_or(str::is_empty) {
        return None;
    }
    let m = members
        .get(leader)
        .filter(|m| m.role == "primary" && !m.host.is_empty())?;
    let replicas = members
        .iter()
        .filter(|(name, r)| {
            name.as_str() != leader
                && r.role == "replica"
                && r.state == "streaming"
                && !r.host.is_empty()
        })
        .map(|(_, r)| (r.host.clone(), r.port))
        .collect();
    Some(GroupMembers {
        leader: Some((m.host.clone(), m.port)),
        replicas,
    })
}

/// The rows `pg_dist_node` should hold: one primary per group with a leader (group 0 is the
/// coordinator itself) and, with `secondaries`, one secondary row per streaming replica.
pub fn desired_nodes(groups: &BTreeMap<u32, GroupMembers>, secondaries: bool) -> Vec<DesiredNode> {
    let mut out = Vec::new();
    for (g, m) in groups {
        let Some((host, port)) = &m.leader else {
            continue;
        };
        out.push(DesiredNode {
            groupid: *g,
            nodename: host.clone(),
            nodeport: *port,
            role: NodeRole::Primary,
        });
        if secondaries {
            for (h, p) in &m.replicas {
                out.push(DesiredNode {
                    groupid: *g,
                    nodename: h.clone(),
                    nodeport: *p,
                    role: NodeRole::Secondary,
                });
            }
        }
    }
    out
}

/// One change to `pg_dist_node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum NodeChange {
    /// `citus_set_coordinator_host(host, port)`: the coordinator's first registration.
    SetCoordinator { host: String, port: u16 },
    /// `citus_add_node(host, port, group)`.
    AddPrimary { group: u32, host: String, port: u16 },
    /// `citus_add_secondary_node(host, port, primary_host, primary_port)`.
    AddSecondary {
        group: u32,
        host: String,
        port: u16,
        primary_host: String,
        primary_port: u16,
    },
    /// `citus_update_node(nodeid, host, port)`: the group's primary moved.
    Move {
        nodeid: i32,
        group: u32,
        from_host: String,
        from_port: i32,
        host: String,
        port: u16,
    },
    /// `citus_remove_node(host, port)`: a secondary that no longer streams, or (destructive, never
    /// done by an agent) a group that left the spec.
    Remove {
        nodeid: i32,
        group: i32,
        host: String,
        port: i32,
        role: String,
    },
}

impl NodeChange {
    /// Changes an agent may make on its own: keeping rows in step with failovers and replicas.
    /// Removing a primary (a whole worker group) needs an operator and `--allow-destroy`.
    pub fn is_automatic(&self) -> bool {
        !matches!(self, NodeChange::Remove { role, .. } if role == "primary")
    }
}

/// The changes that turn `observed` into `desired`, in a safe order: removals of secondaries
/// first (an address they hold may be needed by a primary), then the coordinator, primaries,
/// secondaries; finally removals of primaries of groups that are no longer wanted.
/// `known_groups` are groups the spec declares: their primary rows are kept even while the
/// group has no leader (a group mid-failover must not be dropped from Citus).
pub fn diff_nodes(
    desired: &[DesiredNode],
    observed: &[NodeRow],
    known_groups: &[u32],
) -> Vec<NodeChange> {
    let mut out = Vec::new();
    let primary_of = |g: i32| {
        observed
            .iter()
            .find(|r| r.groupid == g && r.noderole == "primary")
    };
    let desired_primary = |g: u32| {
        desired
            .iter()
            .find(|d| d.groupid == g && d.role == NodeRole::Primary)
    };

    // Secondaries that are not wanted (or whose address a primary needs).
    for r in observed.iter().filter(|r| r.noderole == "secondary") {
        let wanted = desired.iter().any(|d| {
            d.role == NodeRole::Secondary
                && d.groupid as i32 == r.groupid
                && d.nodename == r.nodename
                && i32::from(d.nodeport) == r.nodeport
        });
        if !wanted {
            out.push(NodeChange::Remove {
                nodeid: r.nodeid,
                group: r.groupid,
                host: r.nodename.clone(),
                port: r.nodeport,
                role: r.noderole.clone(),
            });
        }
    }
    // Primaries, coordinator first.
    for d in desired.iter().filter(|d| d.role == NodeRole::Primary) {
        match primary_of(d.groupid as i32) {
            None if d.groupid == 0 => out.push(NodeChange::SetCoordinator {
                host: d.nodename.clone(),
                port: d.nodeport,
            }),
            None => out.push(NodeChange::AddPrimary {
                group: d.groupid,
                host: d.nodename.clone(),
                port: d.nodeport,
            }),
            Some(r) if r.nodename != d.nodename || r.nodeport != i32::from(d.nodeport) => {
                out.push(NodeChange::Move {
                    nodeid: r.nodeid,
                    group: d.groupid,
                    from_host: r.nodename.clone(),
                    from_port: r.nodeport,
                    host: d.nodename.clone(),
                    port: d.nodeport,
                })
            }
            Some(_) => {}
        }
    }
    // Secondaries to add.
    for d in desired.iter().filter(|d| d.role == NodeRole::Secondary) {
        let present = observed.iter().any(|r| {
            r.nodename == d.nodename
                && r.nodeport == i32::from(d.nodeport)
                && r.noderole == "secondary"
        });
        if present {
            continue;
        }
        if let Some(p) = desired_primary(d.groupid) {
            out.push(NodeChange::AddSecondary {
                group: d.groupid,
                host: d.nodename.clone(),
                port: d.nodeport,
                primary_host: p.nodename.clone(),
                primary_port: p.nodeport,
            });
        }
    }
    // Primary rows of groups the spec no longer has.
    for r in observed.iter().filter(|r| r.noderole == "primary") {
        let known = r.groupid >= 0 && known_groups.contains(&(r.groupid as u32));
        if !known {
            out.push(NodeChange::Remove {
                nodeid: r.nodeid,
                group: r.groupid,
                host: r.nodename.clone(),
                port: r.nodeport,
                role: r.noderole.clone(),
            });
        }
    }
    out
}

/// One row of `pg_dist_authinfo`. `authinfo` holds a password: it is a [`Secret`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthinfoRow {
    pub nodeid: i32,
    pub rolename: String,
    pub authinfo: Secret,
}

impl AuthinfoRow {
    /// The libpq string with the password replaced, for display.
    pub fn redacted(&self) -> String {
        redact_conninfo(self.authinfo.expose())
    }
}

/// Replace the value of `password=` in a libpq keyword string.
pub fn redact_conninfo(s: &str) -> String {
    let mut out = Vec::new();
    for part in split_conninfo(s) {
        match part.split_once('=') {
            Some((k, _)) if k.trim() == "password" => out.push(format!("password={REDACTED}")),
            _ => out.push(part),
        }
    }
    out.join(" ")
}

fn split_conninfo(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '\'' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    parts.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
}

/// The authinfo string for the superuser: only `password`, `sslcert` and `sslkey` are allowed.
pub fn authinfo_string(
    password: Option<&Secret>,
    sslcert: Option<&str>,
    sslkey: Option<&str>,
) -> Option<Secret> {
    let q = crate::postgres::conf::quote_libpq;
    let mut parts = Vec::new();
    if let Some(p) = password {
        parts.push(format!("password={}", q(p.expose())));
    }
    if let Some(c) = sslcert {
        parts.push(format!("sslcert={}", q(c)));
    }
    if let Some(k) = sslkey {
        parts.push(format!("sslkey={}", q(k)));
    }
    (!parts.is_empty()).then(|| Secret::new(parts.join(" ")))
}

/// One change to `pg_dist_authinfo` (only the superuser's rows are ours to manage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AuthinfoChange {
    Add {
        row: AuthinfoRow,
    },
    Change {
        row: AuthinfoRow,
        previous: AuthinfoRow,
    },
    Remove {
        row: AuthinfoRow,
    },
}

/// `desired` is the row for (nodeid 0, superuser), if any; rows of other roles are left alone.
pub fn diff_authinfo(
    desired: Option<&AuthinfoRow>,
    observed: &[AuthinfoRow],
    superuser: &str,
) -> Vec<AuthinfoChange> {
    let mut out = Vec::new();
    let ours: Vec<&AuthinfoRow> = observed
        .iter()
        .filter(|r| r.rolename == superuser)
        .collect();
    match desired {
        Some(d) => match ours.iter().find(|r| r.nodeid == d.nodeid) {
            None => out.push(AuthinfoChange::Add { row: d.clone() }),
            Some(r) if r.authinfo != d.authinfo => out.push(AuthinfoChange::Change {
                row: d.clone(),
                previous: (*r).clone(),
            }),
            Some(_) => {}
        },
        None => {
            if let Some(r) = ours.iter().find(|r| r.nodeid == 0) {
                out.push(AuthinfoChange::Remove { row: (*r).clone() });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i32, g: i32, host: &str, role: &str) -> NodeRow {
        NodeRow {
            nodeid: id,
            groupid: g,
            nodename: host.into(),
            nodeport: 5432,
            noderole: role.into(),
            isactive: true,
            shouldhaveshards: g != 0,
        }
    }

    fn members(leader: Option<&str>, replicas: &[&str]) -> GroupMembers {
        GroupMembers {
            leader: leader.map(|h| (h.to_string(), 5432)),
            replicas: replicas.iter().map(|h| (h.to_string(), 5432)).collect(),
        }
    }

    fn check(
        groups: &[(u32, GroupMembers)],
        secondaries: bool,
        observed: &[NodeRow],
        expected: &[&str],
    ) {
        let groups: BTreeMap<u32, GroupMembers> = groups.iter().cloned().collect();
        let known: Vec<u32> = groups.keys().copied().collect();
        let got: Vec<String> = diff_nodes(&desired_nodes(&groups, secondaries), observed, &known)
            .iter()
            .map(|c| match c {
                NodeChange::SetCoordinator { host, .. } => format!("coordinator {host}"),
                NodeChange::AddPrimary { group, host, .. } => format!("add {group} {host}"),
                NodeChange::AddSecondary {
                    group,
                    host,
                    primary_host,
                    ..
                } => format!("add-secondary {group} {host} of {primary_host}"),
                NodeChange::Move {
                    nodeid,
                    from_host,
                    host,
                    ..
                } => format!("move {nodeid} {from_host}->{host}"),
                NodeChange::Remove { nodeid, role, .. } => format!("remove {nodeid} {role}"),
            })
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn node_diffs() {
        // Fresh cluster: the coordinator registers itself, then each worker group.
        check(
            &[
                (0, members(Some("c1"), &["c2"])),
                (1, members(Some("w1"), &[])),
            ],
            false,
            &[],
            &["coordinator c1", "add 1 w1"],
        );
        // Converged: nothing to do.
        check(
            &[(0, members(Some("c1"), &[])), (1, members(Some("w1"), &[]))],
            false,
            &[row(1, 0, "c1", "primary"), row(2, 1, "w1", "primary")],
            &[],
        );
        // Worker failover: the row moves to the new leader.
        check(
            &[(0, members(Some("c1"), &[])), (1, members(Some("w2"), &[]))],
            false,
            &[row(1, 0, "c1", "primary"), row(2, 1, "w1", "primary")],
            &["move 2 w1->w2"],
        );
        // Coordinator failover: its own row moves (citus_update_node, not set_coordinator_host).
        check(
            &[(0, members(Some("c2"), &[]))],
            false,
            &[row(1, 0, "c1", "primary")],
            &["move 1 c1->c2"],
        );
        // A group without a leader keeps its row; nothing is proposed for it.
        check(
            &[(0, members(Some("c1"), &[])), (1, members(None, &[]))],
            false,
            &[row(1, 0, "c1", "primary"), row(2, 1, "w1", "primary")],
            &[],
        );
        // A group that left the spec: its primary row is proposed for removal (not automatic).
        check(
            &[(0, members(Some("c1"), &[]))],
            false,
            &[row(1, 0, "c1", "primary"), row(2, 5, "w9", "primary")],
            &["remove 2 primary"],
        );
        // Secondaries: added for streaming replicas, removed when stale; a promoted replica's
        // secondary row goes before its primary row moves onto that address.
        check(
            &[
                (0, members(Some("c1"), &[])),
                (1, members(Some("w1"), &["w2"])),
            ],
            true,
            &[row(1, 0, "c1", "primary"), row(2, 1, "w1", "primary")],
            &["add-secondary 1 w2 of w1"],
        );
        check(
            &[(0, members(Some("c1"), &[])), (1, members(Some("w2"), &[]))],
            true,
            &[
                row(1, 0, "c1", "primary"),
                row(2, 1, "w1", "primary"),
                row(3, 1, "w2", "secondary"),
            ],
            &["remove 3 secondary", "move 2 w1->w2"],
        );
    }

    #[test]
    fn authinfo() {
        let s = |t: &str| Secret::new(t);
        let want = AuthinfoRow {
            nodeid: 0,
            rolename: "postgres".into(),
            authinfo: s("password=a"),
        };
        let other_role = AuthinfoRow {
            nodeid: 0,
            rolename: "app".into(),
            authinfo: s("password=z"),
        };
        assert!(matches!(
            diff_authinfo(Some(&want), std::slice::from_ref(&other_role), "postgres").as_slice(),
            [AuthinfoChange::Add { .. }]
        ));
        let old = AuthinfoRow {
            authinfo: s("password=old"),
            ..want.clone()
        };
        assert!(matches!(
            diff_authinfo(Some(&want), &[old], "postgres").as_slice(),
            [AuthinfoChange::Change { .. }]
        ));
        assert!(
            diff_authinfo(Some(&want), &[want.clone(), other_role.clone()], "postgres").is_empty()
        );
        assert!(matches!(
            diff_authinfo(None, std::slice::from_ref(&want), "postgres").as_slice(),
            [AuthinfoChange::Remove { .. }]
        ));
        assert!(diff_authinfo(None, &[other_role], "postgres").is_empty());
    }

    #[test]
    fn authinfo_strings_and_redaction() {
        let pw = Secret::new("p w'd");
        let a =
            authinfo_string(Some(&pw), Some("/etc/c.pem"), None).map(|s| s.expose().to_string());
        assert_eq!(a.as_deref(), Some("password='p w\\'d' sslcert=/etc/c.pem"));
        assert_eq!(
            redact_conninfo("password='p w\\'d' sslcert=/etc/c.pem"),
            "password=<redacted> sslcert=/etc/c.pem"
        );
        assert_eq!(authinfo_string(None, None, None), None);
    }
}
