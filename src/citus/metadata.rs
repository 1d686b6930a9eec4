//! The Citus metadata we manage, as values: rows of `pg_dist_node` and `pg_dist_authinfo`,
//! what they should be given the spec and the current leaders, and the changes that get from
//! one to the other. Pure; used by the coordinator's agent (to act) and by `plan` (to show).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dcs::keys::MemberRole;
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
    pub hasmetadata: bool,
    /// NULL in the table is read as true (nothing to sync).
    pub metadatasynced: bool,
}

impl NodeRow {
    fn addr(&self) -> (String, i32) {
        (self.nodename.clone(), self.nodeport)
    }
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
        .filter(|m| m.role() == MemberRole::Primary && !m.host.is_empty())?;
    let replicas = members
        .iter()
        .filter(|(name, r)| {
            name.as_str() != leader && r.is_streaming_replica() && !r.host.is_empty()
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

/// One `citus_update_node` call: a row gets a new address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowUpdate {
    pub nodeid: i32,
    pub role: String,
    pub from_host: String,
    pub from_port: i32,
    pub host: String,
    pub port: u16,
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
    /// `citus_update_node` for each row, in order, in one transaction: a primary that moved
    /// (failover, switchover), and the rows that must make way for it or be reused.
    Update { group: u32, rows: Vec<RowUpdate> },
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

    /// Adding and removing nodes changes the metadata of every worker in one distributed
    /// transaction: Citus refuses it while a worker's metadata is out of sync (as it is for a
    /// few seconds after every `citus_update_node`), and it fails while a worker row names a
    /// server that cannot take writes. Updates never need it: Citus syncs them afterwards.
    pub fn needs_metadata_sync(&self) -> bool {
        matches!(
            self,
            NodeChange::AddPrimary { .. }
                | NodeChange::AddSecondary { .. }
                | NodeChange::Remove { .. }
        )
    }

    pub fn group(&self) -> u32 {
        match self {
            NodeChange::SetCoordinator { .. } => 0,
            NodeChange::AddPrimary { group, .. }
            | NodeChange::AddSecondary { group, .. }
            | NodeChange::Update { group, .. } => *group,
            NodeChange::Remove { group, .. } => (*group).max(0) as u32,
        }
    }
}

/// Whether every worker that holds metadata has it in sync: the condition Citus puts on adding
/// or removing nodes.
pub fn metadata_in_sync(observed: &[NodeRow]) -> bool {
    observed
        .iter()
        .filter(|r| r.noderole == "primary" && r.groupid != 0 && r.hasmetadata)
        .all(|r| r.metadatasynced)
}

/// The address a row is parked at while it has no member to name: a host name that can never
/// resolve (RFC 2606 reserves `.invalid`), unique per row. Reads routed to it fail rather than
/// reach a member that is not streaming.
pub fn parked_host(nodeid: i32) -> String {
    format!("parked-node-{nodeid}.invalid")
}

pub fn is_parked(host: &str) -> bool {
    host.starts_with("parked-node-") && host.ends_with(".invalid")
}

/// The changes that turn `observed` into `desired`, in an order that works on the real
/// extension in any state a failover leaves behind:
///
/// 1. every group's primary row follows its leader, the coordinator first, by
///    `citus_update_node` only (it always works: a worker row may still name a demoted,
///    read-only server, and metadata may be out of sync). A secondary row that holds the new
///    primary's address makes way in the same transaction: it is reused for a streaming
///    replica that has no row, or parked;
/// 2. secondary rows are reused for streaming replicas that lack one, by update;
/// 3. only then — and only once metadata is in sync, which the caller checks with
///    [`NodeChange::needs_metadata_sync`] — secondaries are removed (or parked until then) and
///    nodes added;
/// 4. finally, primary rows of groups the spec no longer has (for the operator, never
///    automatic).
///
/// `known_groups` are groups the spec declares: their primary rows are kept even while the
/// group has no leader (a group mid-failover must not be dropped from Citus).
pub fn diff_nodes(
    desired: &[DesiredNode],
    observed: &[NodeRow],
    known_groups: &[u32],
) -> Vec<NodeChange> {
    // The rows as they will be after each change, to keep addresses unique along the way.
    let mut rows: Vec<NodeRow> = observed.to_vec();
    let in_sync = metadata_in_sync(observed);
    let holder =
        |rows: &[NodeRow], addr: &(String, i32)| rows.iter().position(|r| &r.addr() == addr);
    let groups: std::collections::BTreeSet<u32> = desired
        .iter()
        .map(|d| d.groupid)
        .chain(
            observed
                .iter()
                .filter(|r| r.groupid >= 0)
                .map(|r| r.groupid as u32),
        )
        .collect();
    let wanted_secondaries = |g: u32| -> Vec<(String, i32)> {
        desired
            .iter()
            .filter(|d| d.groupid == g && d.role == NodeRole::Secondary)
            .map(|d| (d.nodename.clone(), i32::from(d.nodeport)))
            .collect()
    };
    let mut primary_moves = Vec::new();
    let mut adds = Vec::new();

    // 1. Primaries (BTreeSet order: the coordinator, group 0, first).
    for &g in &groups {
        let Some(want) = desired
            .iter()
            .find(|d| d.groupid == g && d.role == NodeRole::Primary)
        else {
            continue;
        };
        let target = (want.nodename.clone(), i32::from(want.nodeport));
        let Some(pi) = rows
            .iter()
            .position(|r| r.groupid == g as i32 && r.noderole == "primary")
        else {
            if g == 0 && holder(&rows, &target).is_none() {
                primary_moves.push(NodeChange::SetCoordinator {
                    host: want.nodename.clone(),
                    port: want.nodeport,
                });
            } else if g != 0 {
                adds.push(NodeChange::AddPrimary {
                    group: g,
                    host: want.nodename.clone(),
                    port: want.nodeport,
                });
            }
            continue;
        };
        if rows[pi].addr() == target {
            continue;
        }
        let mut updates = Vec::new();
        if let Some(hi) = holder(&rows, &target) {
            if rows[hi].groupid != g as i32 || rows[hi].noderole != "secondary" {
                // Another group's row holds the address: nothing sane to do automatically.
                continue;
            }
            // Make way: reuse the row for a streaming replica without one, else park it.
            let free = wanted_secondaries(g)
                .into_iter()
                .find(|a| *a != target && holder(&rows, a).is_none());
            let (host, port) = match free {
                Some((h, p)) => (h, p),
                None => (parked_host(rows[hi].nodeid), rows[hi].nodeport),
            };
            updates.push(update(&mut rows[hi], host, port));
            let old_primary = rows[pi].addr();
            updates.push(update(&mut rows[pi], target.0, target.1));
            // The old primary streams again already: the parked row takes its address in the
            // same transaction (a swap).
            if is_parked(&rows[hi].nodename) && wanted_secondaries(g).contains(&old_primary) {
                updates.push(update(&mut rows[hi], old_primary.0, old_primary.1));
            }
        } else {
            updates.push(update(&mut rows[pi], target.0, target.1));
        }
        primary_moves.push(NodeChange::Update {
            group: g,
            rows: updates,
        });
    }

    // 2 and 3. Secondaries.
    let mut secondary_updates = Vec::new();
    let mut removals = Vec::new();
    for &g in &groups {
        let wanted = wanted_secondaries(g);
        let mut spare: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.groupid == g as i32 && r.noderole == "secondary" && !wanted.contains(&r.addr())
            })
            .map(|(i, _)| i)
            .collect();
        let primary = rows
            .iter()
            .find(|r| r.groupid == g as i32 && r.noderole == "primary")
            .map(|r| (r.nodename.clone(), r.nodeport));
        for addr in &wanted {
            if holder(&rows, addr).is_some() {
                continue;
            }
            if let Some(i) = spare.pop() {
                secondary_updates.push(NodeChange::Update {
                    group: g,
                    rows: vec![update(&mut rows[i], addr.0.clone(), addr.1)],
                });
            } else if let Some((ph, pp)) = &primary {
                adds.push(NodeChange::AddSecondary {
                    group: g,
                    host: addr.0.clone(),
                    port: addr.1.max(0) as u16,
                    primary_host: ph.clone(),
                    primary_port: (*pp).max(0) as u16,
                });
            }
        }
        for i in spare {
            // While it cannot be removed, it must not route reads to a member that no longer
            // streams: park it first.
            if !in_sync && !is_parked(&rows[i].nodename) {
                let (host, port) = (parked_host(rows[i].nodeid), rows[i].nodeport);
                secondary_updates.push(NodeChange::Update {
                    group: g,
                    rows: vec![update(&mut rows[i], host, port)],
                });
            }
            let r = &rows[i];
            removals.push(NodeChange::Remove {
                nodeid: r.nodeid,
                group: r.groupid,
                host: r.nodename.clone(),
                port: r.nodeport,
                role: r.noderole.clone(),
            });
        }
    }

    // 4. Primary rows of groups the spec no longer has.
    let mut destroys = Vec::new();
    for r in observed.iter().filter(|r| r.noderole == "primary") {
        let known = r.groupid >= 0 && known_groups.contains(&(r.groupid as u32));
        if !known {
            destroys.push(NodeChange::Remove {
                nodeid: r.nodeid,
                group: r.groupid,
                host: r.nodename.clone(),
                port: r.nodeport,
                role: r.noderole.clone(),
            });
        }
    }

    let mut out = primary_moves;
    out.extend(secondary_updates);
    // Removals before additions: an address a removed row holds may be the one to add.
    out.extend(removals);
    out.extend(adds);
    out.extend(destroys);
    out
}

fn update(row: &mut NodeRow, host: String, port: i32) -> RowUpdate {
    let u = RowUpdate {
        nodeid: row.nodeid,
        role: row.noderole.clone(),
        from_host: row.nodename.clone(),
        from_port: row.nodeport,
        host: host.clone(),
        port: port.max(0) as u16,
    };
    row.nodename = host;
    row.nodeport = port;
    u
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

/// One row of `pg_dist_poolinfo` on a node, beside the `pg_dist_node` row it belongs to
/// (either may be missing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolinfoRow {
    pub nodeid: i32,
    /// The node's group, name and port; None for a pool row whose node is gone.
    pub groupid: Option<i32>,
    pub nodename: Option<String>,
    pub nodeport: Option<i32>,
    pub poolinfo: Option<String>,
}

/// One change to a node's `pg_dist_poolinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PoolinfoChange {
    Set {
        nodeid: i32,
        poolinfo: String,
        previous: Option<String>,
    },
    Remove {
        nodeid: i32,
        poolinfo: String,
    },
}

/// A member whose PgBouncer runs, as its member key says: PostgreSQL's address and port
/// (what `pg_dist_node` names), and PgBouncer's port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolerAt {
    pub host: String,
    pub port: u16,
    pub pooler_port: u16,
}

/// The `poolinfo` of a worker node whose member runs PgBouncer on `port`: only the port —
/// the host stays the node's own, so it never points one node's traffic at another host,
/// and a failover that moves a group's row changes nothing here (every member of the group
/// runs its own PgBouncer on the same port).
pub fn poolinfo_for(port: u16) -> String {
    format!("port={port}")
}

/// The changes that bring a node's `pg_dist_poolinfo` in line. A worker row (primary or
/// secondary) gets a pool row while the member it names runs PgBouncer on the spec's port
/// (`running`); otherwise Citus connects directly, so a PgBouncer that is down or not
/// started yet costs no connection. The table is ours: rows of the coordinator, of nodes
/// that are gone (Citus leaves them behind) and all rows without a pooler in the spec go.
pub fn diff_poolinfo(
    observed: &[PoolinfoRow],
    port: Option<u16>,
    running: &[PoolerAt],
) -> Vec<PoolinfoChange> {
    let mut out = Vec::new();
    for r in observed {
        let desired = match (r.groupid, &r.nodename, r.nodeport, port) {
            (Some(g), Some(host), Some(node_port), Some(want)) if g > 0 => running
                .iter()
                .any(|p| p.host == *host && i32::from(p.port) == node_port && p.pooler_port == want)
                .then(|| poolinfo_for(want)),
            _ => None,
        };
        match (desired, &r.poolinfo) {
            (Some(d), cur) if cur.as_deref() != Some(d.as_str()) => out.push(PoolinfoChange::Set {
                nodeid: r.nodeid,
                poolinfo: d,
                previous: cur.clone(),
            }),
            (None, Some(cur)) => out.push(PoolinfoChange::Remove {
                nodeid: r.nodeid,
                poolinfo: cur.clone(),
            }),
            _ => {}
        }
    }
    out
}

/// How shards move: online (logical replication) when every distributed table has a replica
/// identity, otherwise with writes to each shard blocked while it moves. Also blocked with a
/// pooler in `pg_dist_poolinfo`: Citus opens the replication connections of a logical move
/// through it, and PgBouncer before 1.23 (Debian 12 ships 1.18) refuses them.
pub fn transfer_mode(without_replica_identity: &[String], pooler: bool) -> &'static str {
    if without_replica_identity.is_empty() && !pooler {
        "force_logical"
    } else {
        "block_writes"
    }
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
            hasmetadata: role == "primary",
            metadatasynced: true,
        }
    }

    /// A worker row whose metadata Citus has not synced yet (right after an update).
    fn unsynced(mut r: NodeRow) -> NodeRow {
        r.metadatasynced = false;
        r
    }

    fn members(leader: Option<&str>, replicas: &[&str]) -> GroupMembers {
        GroupMembers {
            leader: leader.map(|h| (h.to_string(), 5432)),
            replicas: replicas.iter().map(|h| (h.to_string(), 5432)).collect(),
        }
    }

    /// Changes rendered one per string; a change the agent must defer until metadata is in
    /// sync is marked `(sync)` when it is not.
    fn check(
        groups: &[(u32, GroupMembers)],
        secondaries: bool,
        observed: &[NodeRow],
        expected: &[&str],
    ) {
        let groups: BTreeMap<u32, GroupMembers> = groups.iter().cloned().collect();
        let known: Vec<u32> = groups.keys().copied().collect();
        let in_sync = metadata_in_sync(observed);
        let got: Vec<String> = diff_nodes(&desired_nodes(&groups, secondaries), observed, &known)
            .iter()
            .map(|c| {
                let text = match c {
                    NodeChange::SetCoordinator { host, .. } => format!("coordinator {host}"),
                    NodeChange::AddPrimary { group, host, .. } => format!("add {group} {host}"),
                    NodeChange::AddSecondary {
                        group,
                        host,
                        primary_host,
                        ..
                    } => format!("add-secondary {group} {host} of {primary_host}"),
                    NodeChange::Update { group, rows } => format!(
                        "update {group} [{}]",
                        rows.iter()
                            .map(|u| format!("{}:{}->{}", u.nodeid, u.from_host, u.host))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    NodeChange::Remove {
                        nodeid, role, host, ..
                    } => format!("remove {nodeid} {role} {host}"),
                };
                if !in_sync && c.needs_metadata_sync() {
                    format!("{text} (sync)")
                } else {
                    text
                }
            })
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn node_diffs() {
        let p = |id, g, h| row(id, g, h, "primary");
        let s = |id, g, h| row(id, g, h, "secondary");
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
            &[p(1, 0, "c1"), p(2, 1, "w1")],
            &[],
        );
        // Worker failover: the row moves to the new leader.
        check(
            &[(0, members(Some("c1"), &[])), (1, members(Some("w2"), &[]))],
            false,
            &[p(1, 0, "c1"), p(2, 1, "w1")],
            &["update 1 [2:w1->w2]"],
        );
        // Coordinator failover: its own row moves (citus_update_node, not set_coordinator_host).
        check(
            &[(0, members(Some("c2"), &[]))],
            false,
            &[p(1, 0, "c1")],
            &["update 0 [1:c1->c2]"],
        );
        // A group without a leader keeps its row; nothing is proposed for it.
        check(
            &[(0, members(Some("c1"), &[])), (1, members(None, &[]))],
            false,
            &[p(1, 0, "c1"), p(2, 1, "w1")],
            &[],
        );
        // A group that left the spec: its primary row is proposed for removal (not automatic).
        check(
            &[(0, members(Some("c1"), &[]))],
            false,
            &[p(1, 0, "c1"), p(2, 5, "w9")],
            &["remove 2 primary w9"],
        );
        // Secondaries: added for streaming replicas.
        check(
            &[
                (0, members(Some("c1"), &[])),
                (1, members(Some("w1"), &["w2"])),
            ],
            true,
            &[p(1, 0, "c1"), p(2, 1, "w1")],
            &["add-secondary 1 w2 of w1"],
        );
        // Failover onto a member registered as secondary, the old primary not streaming yet:
        // in one transaction its row is parked and the primary row takes the address.
        check(
            &[(0, members(Some("c1"), &[])), (1, members(Some("w2"), &[]))],
            true,
            &[p(1, 0, "c1"), p(2, 1, "w1"), s(3, 1, "w2")],
            &[
                "update 1 [3:w2->parked-node-3.invalid, 2:w1->w2]",
                // Proposed now; the agent runs it only once Citus has synced the update.
                "remove 3 secondary parked-node-3.invalid",
            ],
        );
        // Right after it (metadata out of sync): the parked row can only be removed later.
        check(
            &[(0, members(Some("c1"), &[])), (1, members(Some("w2"), &[]))],
            true,
            &[
                p(1, 0, "c1"),
                unsynced(p(2, 1, "w2")),
                s(3, 1, "parked-node-3.invalid"),
            ],
            &["remove 3 secondary parked-node-3.invalid (sync)"],
        );
        // ... but once the old primary streams again, the parked row is reused for it.
        check(
            &[
                (0, members(Some("c1"), &[])),
                (1, members(Some("w2"), &["w1"])),
            ],
            true,
            &[
                p(1, 0, "c1"),
                unsynced(p(2, 1, "w2")),
                s(3, 1, "parked-node-3.invalid"),
            ],
            &["update 1 [3:parked-node-3.invalid->w1]"],
        );
        // Three members: the promoted secondary's row is reused for a streaming replica that
        // has none, the old primary is no secondary any more.
        check(
            &[
                (0, members(Some("c1"), &[])),
                (1, members(Some("w2"), &["w3"])),
            ],
            true,
            &[p(1, 0, "c1"), p(2, 1, "w1"), s(3, 1, "w2"), s(4, 1, "w3")],
            &[
                "update 1 [3:w2->parked-node-3.invalid, 2:w1->w2]",
                "remove 3 secondary parked-node-3.invalid",
            ],
        );
        check(
            &[
                (0, members(Some("c1"), &[])),
                (1, members(Some("w2"), &["w3", "w1"])),
            ],
            true,
            &[p(1, 0, "c1"), p(2, 1, "w1"), s(3, 1, "w2"), s(4, 1, "w3")],
            &["update 1 [3:w2->parked-node-3.invalid, 2:w1->w2, 3:parked-node-3.invalid->w1]"],
        );
        // Every group failed over at once (a restart of every leader), secondaries on, worker
        // rows naming demoted (read-only) servers: primaries move first, coordinator first, by
        // update only; nothing that needs a synchronous metadata change runs before.
        check(
            &[
                (0, members(Some("c2"), &["c1"])),
                (1, members(Some("w2"), &[])),
            ],
            true,
            &[p(1, 0, "c1"), s(2, 0, "c2"), p(3, 1, "w1"), s(4, 1, "w2")],
            &[
                "update 0 [2:c2->parked-node-2.invalid, 1:c1->c2, 2:parked-node-2.invalid->c1]",
                "update 1 [4:w2->parked-node-4.invalid, 3:w1->w2]",
                "remove 4 secondary parked-node-4.invalid",
            ],
        );
        // Out of sync with a secondary to drop: parked now, removed once in sync.
        check(
            &[(0, members(Some("c1"), &[])), (1, members(Some("w1"), &[]))],
            true,
            &[p(1, 0, "c1"), unsynced(p(2, 1, "w1")), s(3, 1, "w2")],
            &[
                "update 1 [3:w2->parked-node-3.invalid]",
                "remove 3 secondary parked-node-3.invalid (sync)",
            ],
        );
        // A new group while metadata is out of sync: proposed, deferred by the agent.
        check(
            &[
                (0, members(Some("c1"), &[])),
                (1, members(Some("w1"), &[])),
                (2, members(Some("x1"), &[])),
            ],
            false,
            &[p(1, 0, "c1"), unsynced(p(2, 1, "w1"))],
            &["add 2 x1 (sync)"],
        );
    }

    #[test]
    fn parked_hosts_are_recognisable_and_unique() {
        assert!(is_parked(&parked_host(7)));
        assert_ne!(parked_host(7), parked_host(8));
        assert!(!is_parked("10.0.0.1"));
        assert!(!is_parked("parked-node-1.example.com"));
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
    fn poolinfo_rows_for_workers_whose_pgbouncer_runs() {
        let row = |id: i32, g: Option<i32>, host: &str, p: Option<&str>| PoolinfoRow {
            nodeid: id,
            groupid: g,
            nodename: g.map(|_| host.to_string()),
            nodeport: g.map(|_| 5432),
            poolinfo: p.map(str::to_string),
        };
        let at = |host: &str, pooler_port: u16| PoolerAt {
            host: host.into(),
            port: 5432,
            pooler_port,
        };
        let set = |id: i32, p: &str, prev: Option<&str>| PoolinfoChange::Set {
            nodeid: id,
            poolinfo: p.into(),
            previous: prev.map(str::to_string),
        };
        let remove = |id: i32, p: &str| PoolinfoChange::Remove {
            nodeid: id,
            poolinfo: p.into(),
        };
        let all = vec![at("c", 6432), at("w1", 6432), at("w2", 6432)];
        // (case, the node's rows, the spec's port, PgBouncers running, expected changes)
        type Case<'a> = (
            &'a str,
            Vec<PoolinfoRow>,
            Option<u16>,
            Vec<PoolerAt>,
            Vec<PoolinfoChange>,
        );
        let cases: Vec<Case> = vec![
            (
                "every worker row whose PgBouncer runs, never the coordinator's",
                vec![
                    row(1, Some(0), "c", None),
                    row(2, Some(1), "w1", None),
                    row(3, Some(2), "w2", None),
                ],
                Some(6432),
                all.clone(),
                vec![set(2, "port=6432", None), set(3, "port=6432", None)],
            ),
            (
                "in place already",
                vec![row(2, Some(1), "w1", Some("port=6432"))],
                Some(6432),
                all.clone(),
                vec![],
            ),
            (
                "PgBouncer not running (yet): Citus connects directly",
                vec![
                    row(2, Some(1), "w1", Some("port=6432")),
                    row(3, Some(2), "w2", None),
                ],
                Some(6432),
                vec![at("w2", 6432)],
                vec![remove(2, "port=6432"), set(3, "port=6432", None)],
            ),
            (
                "running on another port than the spec's (not restarted yet)",
                vec![row(2, Some(1), "w1", Some("port=6000"))],
                Some(6432),
                vec![at("w1", 6000)],
                vec![remove(2, "port=6000")],
            ),
            (
                "a row pointing somewhere by hand",
                vec![row(2, Some(1), "w1", Some("host=10.9.9.9 port=6432"))],
                Some(6432),
                all.clone(),
                vec![set(2, "port=6432", Some("host=10.9.9.9 port=6432"))],
            ),
            (
                "no pooler in the spec: rows go",
                vec![
                    row(2, Some(1), "w1", Some("port=6432")),
                    row(3, Some(2), "w2", None),
                ],
                None,
                all.clone(),
                vec![remove(2, "port=6432")],
            ),
            (
                "the row of a node that is gone",
                vec![row(9, None, "", Some("port=6432"))],
                Some(6432),
                all.clone(),
                vec![remove(9, "port=6432")],
            ),
            (
                "a coordinator row with a pool row",
                vec![row(1, Some(0), "c", Some("port=6432"))],
                Some(6432),
                all,
                vec![remove(1, "port=6432")],
            ),
        ];
        for (name, rows, port, running, want) in cases {
            assert_eq!(diff_poolinfo(&rows, port, &running), want, "{name}");
        }
        assert_eq!(transfer_mode(&[], false), "force_logical");
        assert_eq!(transfer_mode(&[], true), "block_writes");
        assert_eq!(transfer_mode(&["t".into()], false), "block_writes");
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
