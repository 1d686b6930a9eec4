//! The agent's brain: `decide(snapshot) -> actions`. Pure — a snapshot of local PostgreSQL,
//! the group's keys in etcd and the lease goes in, an ordered list of actions comes out. The
//! executor (`node.rs`) performs them and stops at the first that fails.
//!
//! Safety rules encoded here (design.md):
//! - a member promotes only after winning the leader key by compare-and-set (`AcquireLeader`
//!   always precedes `Promote`), and only when its WAL is within `maximum_lag_on_failover` of
//!   the last known leader position and no healthier eligible member exists;
//! - a primary whose lease is no longer valid, or that sees another leader, stops accepting
//!   writes at once (`Demote { immediate: true }`); the fence task enforces the same deadline
//!   independently of this loop;
//! - in synchronous mode only the recorded synchronous standby may promote.

use crate::agent::config::SyncModeConfig;
use crate::dcs::keys::{FailoverRequest, MemberInfo, SyncState};
use crate::dcs::keys::{MemberRole, MemberState};
pub use crate::postgres::timeline::Verdict;

/// Where the data directory stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// Missing or empty: this member has never been initialised.
    Empty,
    Initialized {
        sysid: String,
        /// pg_control says the last run was a primary ("in production" or "shut down").
        was_primary: bool,
    },
}

/// The local PostgreSQL server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    Stopped,
    /// Started but not yet accepting connections.
    Starting,
    Running(Running),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub primary: bool,
    pub timeline: u32,
    /// Current WAL position (primary) or last replayed one (replica).
    pub wal: u64,
    /// The member this replica is configured to follow (None: no upstream).
    pub upstream: Option<String>,
    /// Whether a WAL receiver is streaming.
    pub streaming: bool,
}

/// What etcd says about the group, or that etcd could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum Dcs {
    Unavailable,
    Available(Box<GroupView>),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupView {
    pub leader: Option<String>,
    /// The lease the leader key is attached to.
    pub leader_lease: Option<i64>,
    pub initialize: Option<String>,
    /// The lease of a bootstrap's claim (`initialize` empty).
    pub initialize_lease: Option<i64>,
    pub members: std::collections::BTreeMap<String, MemberInfo>,
    /// Last WAL position the leader published (`status` key), kept across leader loss.
    pub last_leader_wal: Option<u64>,
    pub sync: Option<SyncState>,
    pub failover: Option<FailoverRequest>,
    /// Maintenance mode (Patroni's `pause`): no automatic action but fencing.
    pub paused: bool,
    /// Where the oldest WAL segment the leader still has begins (`status` key).
    pub oldest_wal: Option<u64>,
    /// The candidate the last leader handed over to after a clean stop (`status` key).
    pub handed_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub me: String,
    pub nofailover: bool,
    pub maximum_lag_on_failover: u64,
    pub synchronous_mode: SyncModeConfig,
    /// Member replication slots (`ha.use_slots`).
    pub use_slots: bool,
    /// The lease can still be trusted (refreshed recently enough that no one else can have
    /// won the leader key yet).
    pub lease_valid: bool,
    /// This agent's current lease. Leading means the leader key holds our name *and* this
    /// lease: a key left by a previous run of this agent hangs on a lease about to expire.
    pub my_lease: Option<i64>,
    pub data: DataDir,
    pub server: Server,
    pub dcs: Dcs,
    /// Set after a failed or slow start as leader: stop trying in place, let another member lead.
    pub give_up_leading: bool,
    /// A replica that cannot follow its leader's timeline (detected by the executor).
    /// What a standby that cannot stream must do about its history (`Follows`: nothing).
    pub history: Verdict,
    /// Roles, database, extension and authinfo are in place for the current configuration.
    pub setup_done: bool,
    pub coordinator: bool,
    /// This member stopped as primary cleanly to hand over (switchover): its WAL is all on the
    /// new leader, so it follows without pg_rewind.
    pub clean_handoff: bool,
    /// Wall-clock time, seconds since the Unix epoch (for scheduled switchovers).
    pub now_unix: i64,
    /// How long this replica has been running without a WAL receiver that streams.
    pub not_streaming_for: std::time::Duration,
    /// A switchover or failover request has been pending for more than a lease with nobody
    /// leading (timed from this member's handoff, or from when it first saw it so).
    pub handoff_overdue: bool,
    /// Failed starts as a standby in a row (reset by a start that succeeds).
    pub failed_replica_starts: u32,
    /// The leader answered as a running primary when asked directly (asked only once
    /// `failed_replica_starts` reaches the limit: a stale member key must not cost us data).
    pub leader_confirmed_primary: bool,
    /// pg_rewind from this member failed (the source was reachable and a primary).
    pub rewind_failed_from: Option<String>,
    /// `citus.pooler` is set: every primary keeps its pg_dist_poolinfo in line.
    pub pooler: bool,
    /// Why this member must not lead at all now (`ha.watchdog.mode: required` without a
    /// usable device): it neither bootstraps, races nor promotes, and a leader steps down.
    pub cannot_lead: Option<String>,
    /// The system identifier of the cluster this member's own bootstrap made (recorded in
    /// its install folder, so it outlives an agent restart). If the group's is another, that
    /// bootstrap failed and another member's succeeded: the leftovers were never the group's
    /// data.
    pub bootstrapped_here: Option<String>,
}

/// A standby whose WAL the leader no longer has is cloned again only after this long without
/// streaming: a receiver between two attempts is not a lost standby.
pub const RECLONE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// This standby does not stream and the leader no longer has the WAL it needs next (its slot
/// was given up past `max_slot_wal_keep_size`, or it has none): it can never catch up.
pub fn wal_gone(g: &GroupView, r: &Running) -> bool {
    !r.primary && !r.streaming && g.oldest_wal.is_some_and(|oldest| r.wal < oldest)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the `initialize` key (compare-and-set); the executor stops here if it loses.
    ClaimInitialize,
    /// initdb, configuration, start as a primary (bootstrap of a new group).
    Initdb,
    /// Create the leader key with our lease (compare-and-set); the executor stops if it loses.
    AcquireLeader,
    /// The leader key holds our name but a previous run's lease: attach it to our lease
    /// (compare-and-set on the name). Nobody else led meanwhile, so our data is the latest.
    ReclaimLeader,
    /// Roles, database, extension, authinfo; then record the system identifier in `initialize`.
    FinishBootstrap,
    /// Copy the leader's data with pg_basebackup and configure a standby.
    Clone {
        from: String,
    },
    StartPrimary,
    StartReplica {
        upstream: Option<String>,
    },
    /// Point a running replica at another upstream.
    Follow {
        upstream: String,
    },
    Promote,
    /// Stop the server (immediate: at once; otherwise a fast shutdown).
    Demote {
        immediate: bool,
    },
    /// pg_rewind against the leader (server must be stopped).
    Rewind {
        from: String,
    },
    ReleaseLeader,
    /// Roles, passwords, extension, authinfo for the current configuration (primary only).
    EnsureSetup,
    /// Bring the coordinator's pg_dist_node in line with the group leaders.
    SyncCitus,
    /// Bring this primary's pg_dist_poolinfo in line with `citus.pooler` (see `node::pooler`).
    SyncPoolinfo,
    /// Publish the last known WAL position of the leader (`status` key).
    PublishOptime,
    /// One step of synchronous replication management (see `agent::sync`).
    ManageSync,
    /// Planned handover to `to`: checkpoint, clean stop, publish the final WAL position,
    /// release the leader key.
    Switchover {
        to: String,
    },
    /// Keep a replication slot for every other member (see `agent::slots`).
    ManageSlots,
    /// Stop, set the data directory aside (never deleted) and let the member be cloned again:
    /// its data cannot rejoin the group as it is.
    Reinit {
        cause: ReinitCause,
        reason: String,
    },
    /// Delete the `failover` key (done, stale or impossible).
    ClearFailover {
        reason: String,
    },
    Wait(String),
}

/// Why a member's data is set aside to be cloned again. Its `tag` names the set-aside copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReinitCause {
    /// The leader no longer has the WAL this standby needs next.
    WalGone,
    /// PostgreSQL failed to start as a standby of a live leader several times in a row.
    StartFailed,
    /// pg_rewind against the current leader failed.
    RewindFailed,
    /// This member's own bootstrap failed, and another member bootstrapped the group.
    BootstrapFailed,
    /// Its history forked from the leader's on the same timeline number.
    ForkedTimeline,
}

impl ReinitCause {
    pub fn tag(self) -> &'static str {
        match self {
            ReinitCause::WalGone => "wal-gone",
            ReinitCause::StartFailed => "start-failed",
            ReinitCause::RewindFailed => "rewind-failed",
            ReinitCause::BootstrapFailed => "bootstrap-failed",
            ReinitCause::ForkedTimeline => "forked-timeline",
        }
    }
}

/// Failed starts as a standby of a leader that answers as primary, in a row, after which the
/// data is set aside (it may need WAL the leader no longer has). Fewer could be a passing
/// fault (disk full, a port still taken).
pub const MAX_REPLICA_START_FAILURES: u32 = 3;

use Action::*;

/// Pick the next actions.
pub fn decide(s: &Snapshot) -> Vec<Action> {
    let g = match &s.dcs {
        Dcs::Unavailable => return without_dcs(s),
        Dcs::Available(g) => g,
    };
    let me = s.me.as_str();
    let leader = g.leader.as_deref();
    let named_me = leader == Some(me);
    let i_lead = named_me && g.leader_lease.is_some() && g.leader_lease == s.my_lease;
    let other_leader = leader.filter(|l| *l != me);
    if s.handoff_overdue && leader.is_none() && g.failover.is_some() {
        // The candidate did not take over within a lease (stuck, or gone with its key
        // still alive): drop the request so that a normal election runs. Any member may.
        return vec![ClearFailover {
            reason: "nobody took over under the switchover or failover request within a lease"
                .into(),
        }];
    }
    if named_me && !i_lead {
        // Our name on a lease that is not ours: a key left by a previous run of this agent.
        return match (&s.data, s.my_lease) {
            (DataDir::Empty, _) => vec![ReleaseLeader],
            (_, Some(_)) => vec![ReclaimLeader],
            (_, None) => vec![Wait("no lease yet".into())],
        };
    }

    if g.paused {
        return paused(s, other_leader, i_lead);
    }
    let sysid = match &s.data {
        DataDir::Empty => return uninitialized(s, g, other_leader, i_lead),
        DataDir::Initialized { sysid, .. } => sysid,
    };
    // An empty identifier is one we could not read this cycle (PostgreSQL just died), not
    // another cluster's.
    if let Some(expected) = g.initialize.as_deref().filter(|v| !v.is_empty()) {
        if !sysid.is_empty() && expected != sysid {
            // Our own failed bootstrap's leftovers: the group never recorded that cluster,
            // so they are set aside (kept, not deleted) and the member is cloned like a new
            // one, instead of waiting for an operator for ever (the simulation's seed 136).
            if s.bootstrapped_here.as_deref() == Some(sysid.as_str()) {
                return vec![Reinit {
                    cause: ReinitCause::BootstrapFailed,
                    reason: format!(
                        "this member's failed bootstrap left a cluster of its own (system identifier {sysid}); the group's is {expected}"
                    ),
                }];
            }
            return vec![Wait(format!(
                "the data directory belongs to another cluster (system identifier {sysid}, the group's is {expected}); reinitialize this member"
            ))];
        }
    }

    // Another member's bootstrap is under way (claimed, not finished): its new primary may
    // already run. Data here — left by a bootstrap of ours that failed — must not lead
    // meanwhile (the simulation's seed 165: two primaries of two different clusters).
    let bootstrapping = g.initialize.as_deref() == Some("")
        && g.initialize_lease.is_some()
        && g.initialize_lease != s.my_lease;
    if bootstrapping && other_leader.is_none() && !i_lead {
        return match &s.server {
            Server::Running(r) if r.primary => vec![Demote { immediate: true }],
            _ => vec![Wait("another member is bootstrapping the group".into())],
        };
    }
    match &s.server {
        Server::Starting => vec![Wait("PostgreSQL is starting".into())],
        Server::Stopped => stopped(s, g, other_leader, i_lead),
        Server::Running(r) if r.primary => running_primary(s, g, other_leader, i_lead),
        Server::Running(r) => running_replica(s, g, r, other_leader, i_lead),
    }
}

/// etcd cannot be read: a primary keeps writing only while its lease is surely valid.
fn without_dcs(s: &Snapshot) -> Vec<Action> {
    match &s.server {
        Server::Running(r) if r.primary && !s.lease_valid => vec![Demote { immediate: true }],
        Server::Running(r) if r.primary => vec![Wait(
            "etcd unreachable; keeping the primary while the lease is valid".into(),
        )],
        _ => vec![Wait("etcd unreachable".into())],
    }
}

/// Paused: keep what runs as it is. A primary still holds (or retakes) its key and still
/// stops if its lease is not valid or another leader exists — safety is never paused.
fn paused(s: &Snapshot, other_leader: Option<&str>, i_lead: bool) -> Vec<Action> {
    match &s.server {
        Server::Running(r) if r.primary => {
            if other_leader.is_some() || !s.lease_valid {
                return vec![Demote { immediate: true }];
            }
            let mut a = if i_lead {
                Vec::new()
            } else {
                vec![AcquireLeader]
            };
            a.extend(leader_duties(s));
            a
        }
        Server::Running(r) => match other_leader {
            Some(l) if r.upstream.as_deref() != Some(l) => vec![Follow {
                upstream: l.to_string(),
            }],
            _ => vec![Wait("paused".into())],
        },
        _ => vec![Wait(
            "paused: PostgreSQL is not started, cloned or bootstrapped automatically".into(),
        )],
    }
}

fn uninitialized(
    s: &Snapshot,
    g: &GroupView,
    other_leader: Option<&str>,
    i_lead: bool,
) -> Vec<Action> {
    if let Some(l) = other_leader {
        let ready = g
            .members
            .get(l)
            .is_some_and(|m| m.role() == MemberRole::Primary && !m.host.is_empty());
        return if ready {
            vec![Clone {
                from: l.to_string(),
            }]
        } else {
            vec![Wait(format!(
                "waiting for leader {l} to be ready to clone from"
            ))]
        };
    }
    if i_lead {
        // A leader key of ours without data: a previous life of this member; let it go.
        return vec![ReleaseLeader];
    }
    if g.initialize.is_none() {
        if s.nofailover {
            return vec![Wait(
                "no leader yet; nofailover members never bootstrap".into(),
            )];
        }
        if let Some(why) = &s.cannot_lead {
            return vec![Wait(format!("no leader yet; {why}"))];
        }
        return vec![ClaimInitialize, Initdb, AcquireLeader, FinishBootstrap];
    }
    vec![Wait("another member is bootstrapping the group".into())]
}

fn stopped(s: &Snapshot, g: &GroupView, other_leader: Option<&str>, i_lead: bool) -> Vec<Action> {
    let was_primary = matches!(
        s.data,
        DataDir::Initialized {
            was_primary: true,
            ..
        }
    );
    if i_lead {
        if s.lease_valid && !s.give_up_leading && s.cannot_lead.is_none() {
            // PostgreSQL went down under a live leader: restart in place, keeping the key.
            // Data still a standby's (a promotion cut short) starts as a standby and is
            // promoted: started as a primary straight away, it would end recovery without
            // a new timeline and write on the timeline the last primary wrote on — the
            // histories would fork on one timeline (the simulation's seed 262).
            if !was_primary {
                return vec![StartReplica { upstream: None }];
            }
            return vec![StartPrimary];
        }
        return vec![ReleaseLeader];
    }
    if let Some(l) = other_leader {
        // Data that cannot rejoin as it is: set it aside (never deleted) and clone afresh.
        // Only against a leader that answered as a primary: the rewind checks its source
        // directly before it runs, repeated failed starts ask the leader (this copy may be
        // the best one left otherwise).
        if s.rewind_failed_from.as_deref() == Some(l) {
            return vec![Reinit {
                cause: ReinitCause::RewindFailed,
                reason: format!("pg_rewind from {l} failed"),
            }];
        }
        if s.failed_replica_starts >= MAX_REPLICA_START_FAILURES && s.leader_confirmed_primary {
            return vec![Reinit {
                cause: ReinitCause::StartFailed,
                reason: format!(
                    "PostgreSQL failed to start as a standby of {l} {} times in a row",
                    s.failed_replica_starts
                ),
            }];
        }
        if was_primary && !s.clean_handoff {
            // We were a primary and someone else leads now: our timeline may have forked.
            return vec![
                Rewind {
                    from: l.to_string(),
                },
                StartReplica {
                    upstream: Some(l.to_string()),
                },
            ];
        }
        return vec![StartReplica {
            upstream: Some(l.to_string()),
        }];
    }
    let _ = g;
    // No leader: come up as a standby without upstream, then compete from there.
    vec![StartReplica { upstream: None }]
}

fn running_primary(
    s: &Snapshot,
    g: &GroupView,
    other_leader: Option<&str>,
    i_lead: bool,
) -> Vec<Action> {
    if other_leader.is_some() {
        // Another member holds the key: it may already accept writes. Stop now.
        return vec![Demote { immediate: true }];
    }
    if !s.lease_valid {
        return vec![Demote { immediate: true }];
    }
    if s.cannot_lead.is_some() {
        // Not unsafe yet (the lease is valid), but not what the operator allows: a clean stop
        // ships all WAL to the standbys, then the key goes.
        return vec![Demote { immediate: false }];
    }
    if !i_lead {
        // The key is gone while our lease is still valid (deleted by hand, or released):
        // take it back; if someone else wins, the next cycle demotes us.
        let mut a = vec![AcquireLeader];
        a.extend(leader_duties(s));
        return a;
    }
    if let Some(f) = &g.failover {
        match switchover_target(s, g, f) {
            Handover::Now(to) => return vec![Switchover { to }],
            Handover::Later => {}
            Handover::Reject(reason) => {
                let mut a = vec![ClearFailover { reason }];
                a.extend(leader_duties(s));
                return a;
            }
        }
    }
    let mut a = leader_duties(s);
    if g.initialize.as_deref().is_none_or(str::is_empty) {
        // The group runs, yet etcd does not record which cluster it is (a bootstrap whose
        // last step failed, keys lost): record it, or a member without data could later
        // bootstrap a new, empty cluster over it (the simulation's seed 165).
        a.insert(0, FinishBootstrap);
    }
    a
}

enum Handover {
    Now(String),
    Later,
    Reject(String),
}

/// What the leader does with a `failover` key.
fn switchover_target(s: &Snapshot, g: &GroupView, f: &FailoverRequest) -> Handover {
    if f.member.as_deref() == Some(s.me.as_str()) {
        // We are the requested candidate and already lead: done.
        return Handover::Reject("switchover done: the candidate leads".into());
    }
    if let Some(l) = f.leader.as_deref() {
        if l != s.me {
            return Handover::Reject(format!("requested for leader {l}, but {} leads", s.me));
        }
    }
    if let Some(at) = f.scheduled_at.as_deref() {
        match f.scheduled_unix() {
            Some(t) if t > s.now_unix + crate::dcs::keys::MAX_SCHEDULE_AHEAD_S => {
                return Handover::Reject(format!(
                    "scheduled_at {at:?} is more than {} days ahead",
                    crate::dcs::keys::MAX_SCHEDULE_AHEAD_S / 86_400
                ));
            }
            Some(t) if t > s.now_unix => return Handover::Later,
            Some(_) => {}
            None => return Handover::Reject(format!("unreadable scheduled_at {at:?}")),
        }
    }
    let eligible = |name: &str, m: &MemberInfo| {
        name != s.me && m.is_streaming_replica() && !m.nofailover() && sync_allows(s, g, name)
    };
    match f.member.as_deref() {
        Some(c) => match g.members.get(c) {
            Some(m) if eligible(c, m) => Handover::Now(c.to_string()),
            Some(_) => {
                Handover::Reject(format!("candidate {c} is not a healthy, eligible replica"))
            }
            None => Handover::Reject(format!("candidate {c} is not a member of the group")),
        },
        None => match g
            .members
            .iter()
            .filter(|(n, m)| eligible(n, m))
            .max_by_key(|(n, m)| (m.xlog_location, std::cmp::Reverse(n.as_str())))
        {
            Some((n, _)) => Handover::Now(n.clone()),
            None => Handover::Reject("no healthy replica to hand over to".into()),
        },
    }
}

fn leader_duties(s: &Snapshot) -> Vec<Action> {
    let mut a = Vec::new();
    if !s.setup_done {
        a.push(EnsureSetup);
    }
    if s.coordinator {
        a.push(SyncCitus);
    }
    if s.pooler {
        a.push(SyncPoolinfo);
    }
    if s.synchronous_mode != SyncModeConfig::Off {
        a.push(ManageSync);
    }
    if s.use_slots {
        a.push(ManageSlots);
    }
    a.push(PublishOptime);
    a
}

fn running_replica(
    s: &Snapshot,
    g: &GroupView,
    r: &Running,
    other_leader: Option<&str>,
    i_lead: bool,
) -> Vec<Action> {
    if i_lead {
        if s.cannot_lead.is_some() {
            return vec![ReleaseLeader];
        }
        if s.lease_valid {
            return vec![Promote];
        }
        return vec![Wait("leader key is ours but the lease is not valid".into())];
    }
    if let Some(l) = other_leader {
        if s.history == Verdict::Reclone {
            // Forked on one timeline number: pg_rewind would see one timeline and do
            // nothing. The leader answered as primary just now (`check_history`).
            return vec![Reinit {
                cause: ReinitCause::ForkedTimeline,
                reason: format!(
                    "this standby's history forked from {l}'s on timeline {}; pg_rewind cannot repair that",
                    r.timeline
                ),
            }];
        }
        if s.history == Verdict::Rewind {
            return vec![
                Demote { immediate: false },
                Rewind {
                    from: l.to_string(),
                },
                StartReplica {
                    upstream: Some(l.to_string()),
                },
            ];
        }
        if r.upstream.as_deref() != Some(l) {
            return vec![Follow {
                upstream: l.to_string(),
            }];
        }
        if wal_gone(g, r) && s.not_streaming_for >= RECLONE_AFTER {
            return vec![Reinit {
                cause: ReinitCause::WalGone,
                reason: format!(
                    "the leader no longer has the WAL this member needs (received up to {}, the leader's oldest WAL begins at {})",
                    r.wal,
                    g.oldest_wal.unwrap_or_default()
                ),
            }];
        }
        return Vec::new();
    }
    // No leader, and a switchover or manual failover names a candidate: only it races, once it
    // has replayed everything the old leader wrote.
    if let Some(c) = g.failover.as_ref().and_then(|f| f.member.clone()) {
        // One that never promotes (tagged nofailover) is not waited for.
        let candidate_alive = g
            .members
            .get(&c)
            .is_some_and(|m| m.role() == MemberRole::Replica && !m.nofailover());
        if c == s.me {
            // Only a clean handoff promises a final position that will arrive: the old
            // leader's WAL senders shipped it all before it stopped. A leader that died,
            // was fenced or did not stop cleanly promises nothing, and waiting for its
            // last published position could last until the request expires (the
            // simulation's seed 136: a failover written while a dead agent's key lingered).
            let handed_to_me = g.handed_to.as_deref() == Some(c.as_str());
            if let Some(final_wal) = g.last_leader_wal.filter(|_| handed_to_me) {
                if r.wal < final_wal && g.failover.as_ref().is_some_and(|f| f.leader.is_some()) {
                    return vec![Wait(format!(
                        "switchover: replaying up to the old leader's last position ({} of {final_wal})",
                        r.wal
                    ))];
                }
            }
            if s.nofailover {
                return vec![Wait("named as candidate but tagged nofailover".into())];
            }
            if let Some(why) = &s.cannot_lead {
                return vec![Wait(format!("named as candidate, but {why}"))];
            }
            // A switchover promises no loss: in synchronous mode a candidate the sync key does
            // not name may take over only from a leader that stopped cleanly and handed over
            // to it (its WAL senders sent everything first). A leader that died or was fenced
            // meanwhile may have acknowledged commits alone (the simulation's seed 201). A
            // manual failover (no leader named) is the operator's explicit choice.
            // The old leader publishes its handoff before it deletes its key, so with the key
            // gone and no handoff to us, none will come: the request can never be carried
            // out. Drop it, so that the members the sync key names take over now instead of
            // waiting for us until the request expires (the simulation's seed 99).
            let switchover = g.failover.as_ref().is_some_and(|f| f.leader.is_some());
            if switchover && !sync_allows(s, g, &s.me) && g.handed_to.as_deref() != Some(c.as_str())
            {
                return vec![ClearFailover {
                    reason: "switchover to this member: the old leader is gone without a clean handoff, and in synchronous mode only the synchronous standby or the last leader may promote then".into(),
                }];
            }
            if let Some(leader_wal) = g.last_leader_wal {
                if leader_wal.saturating_sub(r.wal) > s.maximum_lag_on_failover {
                    // No leader to catch up from: the request cannot be carried out. Drop it,
                    // so that the healthiest member takes over instead.
                    return vec![ClearFailover {
                        reason: format!(
                            "named as candidate, but {} bytes behind the last leader position with no leader to catch up from (maximum_lag_on_failover {})",
                            leader_wal.saturating_sub(r.wal),
                            s.maximum_lag_on_failover
                        ),
                    }];
                }
            }
            return vec![AcquireLeader, Promote];
        }
        if candidate_alive {
            return vec![Wait(format!("{c} is taking over (switchover)"))];
        }
    }
    // No leader: race for it if we are fit to lead.
    match unfit_to_lead(s, g, r) {
        Some(reason) => vec![Wait(reason)],
        None => vec![AcquireLeader, Promote],
    }
}

/// Why this replica must not try to become the leader now, if it must not.
pub fn unfit_to_lead(s: &Snapshot, g: &GroupView, r: &Running) -> Option<String> {
    if s.nofailover {
        return Some("no leader; this member is tagged nofailover".into());
    }
    if let Some(why) = &s.cannot_lead {
        return Some(format!("no leader; {why}"));
    }
    if !sync_allows(s, g, &s.me) {
        let sync = g.sync.as_ref();
        return Some(format!(
            "no leader; only the synchronous standby ({}) or the last leader ({}) may promote",
            sync.and_then(|k| k.sync_standby.as_deref())
                .unwrap_or("none"),
            sync.and_then(|k| k.leader.as_deref()).unwrap_or("none"),
        ));
    }
    if let Some(leader_wal) = g.last_leader_wal {
        let behind = leader_wal.saturating_sub(r.wal);
        if behind > s.maximum_lag_on_failover {
            return Some(format!(
                "no leader; {behind} bytes behind the last leader position, more than maximum_lag_on_failover ({})",
                s.maximum_lag_on_failover
            ));
        }
    }
    // A healthier eligible member (more WAL; ties go to the smaller name) should win instead.
    let better = g.members.iter().find(|(name, m)| {
        name.as_str() != s.me
            && m.role() == MemberRole::Replica
            && (m.state() == MemberState::Running || m.state() == MemberState::Streaming)
            && !m.nofailover()
            && (m.xlog_location > r.wal
                || (m.xlog_location == r.wal && name.as_str() < s.me.as_str()))
            && sync_allows(s, g, name)
    });
    if let Some((name, m)) = better {
        return Some(format!(
            "no leader; {name} is healthier (WAL {} vs {})",
            m.xlog_location, r.wal
        ));
    }
    None
}

/// In synchronous mode, who holds every acknowledged commit: the synchronous standby the
/// `sync` key names, and the leader that wrote the key (it acknowledged them). Without the
/// latter, a leader that lost its key while it had no synchronous standby (cut off etcd,
/// restarted) could never lead again and the group would stay without one.
fn sync_allows(s: &Snapshot, g: &GroupView, name: &str) -> bool {
    if s.synchronous_mode == SyncModeConfig::Off {
        return true;
    }
    match &g.sync {
        Some(sync) => {
            sync.sync_standby.as_deref() == Some(name) || sync.leader.as_deref() == Some(name)
        }
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Snapshot {
        Snapshot {
            me: "m1".into(),
            nofailover: false,
            maximum_lag_on_failover: 1000,
            synchronous_mode: SyncModeConfig::Off,
            lease_valid: true,
            my_lease: Some(7),
            data: DataDir::Initialized {
                sysid: "42".into(),
                was_primary: false,
            },
            server: Server::Stopped,
            dcs: Dcs::Available(Box::new(GroupView {
                initialize: Some("42".into()),
                ..Default::default()
            })),
            give_up_leading: false,
            history: Verdict::Follows,
            setup_done: true,
            coordinator: false,
            clean_handoff: false,
            now_unix: 1_000_000,
            use_slots: false,
            not_streaming_for: std::time::Duration::ZERO,
            handoff_overdue: false,
            failed_replica_starts: 0,
            leader_confirmed_primary: false,
            rewind_failed_from: None,
            pooler: false,
            cannot_lead: None,
            bootstrapped_here: None,
        }
    }

    fn group(s: &mut Snapshot) -> &mut GroupView {
        match &mut s.dcs {
            Dcs::Available(g) => g,
            Dcs::Unavailable => unreachable!("test snapshot has etcd"),
        }
    }

    /// Make `name` the leader; the key is on our lease when it is us.
    fn set_leader(s: &mut Snapshot, name: &str) {
        let lease = if name == s.me { s.my_lease } else { Some(99) };
        let g = group(s);
        g.leader = Some(name.to_string());
        g.leader_lease = lease;
    }

    fn member(role: &str, state: &str, wal: u64) -> MemberInfo {
        MemberInfo {
            role: role.into(),
            state: state.into(),
            xlog_location: wal,
            host: "10.0.0.9".into(),
            port: 5432,
            ..Default::default()
        }
    }

    fn running(primary: bool, wal: u64, upstream: Option<&str>) -> Server {
        Server::Running(Running {
            primary,
            timeline: 1,
            wal,
            upstream: upstream.map(str::to_string),
            streaming: upstream.is_some(),
        })
    }

    /// One row of the table: a name, a snapshot, the expected actions (Wait compared by kind).
    fn check(name: &str, s: Snapshot, expected: &[Action]) {
        let got = decide(&s);
        let norm = |a: &[Action]| -> Vec<Action> {
            a.iter()
                .map(|x| match x {
                    Wait(_) => Wait(String::new()),
                    ClearFailover { .. } => ClearFailover {
                        reason: String::new(),
                    },
                    Reinit { cause, .. } => Reinit {
                        cause: *cause,
                        reason: String::new(),
                    },
                    other => other.clone(),
                })
                .collect()
        };
        assert_eq!(norm(&got), norm(expected), "case {name:?}: got {got:?}");
    }

    fn w() -> Action {
        Wait(String::new())
    }

    #[test]
    fn bootstrap_and_clone() {
        let mut s = base();
        s.data = DataDir::Empty;
        group(&mut s).initialize = None;
        check(
            "first member of a new group bootstraps",
            s.clone(),
            &[ClaimInitialize, Initdb, AcquireLeader, FinishBootstrap],
        );

        let mut t = s.clone();
        t.nofailover = true;
        check("nofailover never bootstraps", t, &[w()]);

        let mut t = s.clone();
        group(&mut t).initialize = Some(String::new());
        check("someone else is bootstrapping", t, &[w()]);

        let mut t = s.clone();
        set_leader(&mut t, "m2");
        group(&mut t).initialize = Some("42".into());
        check("leader not published yet", t.clone(), &[w()]);
        group(&mut t)
            .members
            .insert("m2".into(), member("primary", "running", 10));
        check(
            "clone from a ready leader",
            t,
            &[Clone { from: "m2".into() }],
        );

        let mut t = s;
        set_leader(&mut t, "m1");
        check(
            "stale own key without data is released",
            t,
            &[ReleaseLeader],
        );
    }

    #[test]
    fn a_key_left_by_a_previous_run_is_reclaimed_before_anything() {
        let mut s = base();
        set_leader(&mut s, "m1");
        group(&mut s).leader_lease = Some(3);
        check(
            "stopped, our name on an old lease: reclaim, do not start as primary",
            s.clone(),
            &[ReclaimLeader],
        );
        let mut t = s.clone();
        t.server = running(true, 10, None);
        check(
            "running primary on an old lease: reclaim",
            t,
            &[ReclaimLeader],
        );
        let mut t = s.clone();
        t.data = DataDir::Empty;
        check("no data: release it", t, &[ReleaseLeader]);
        let mut t = s;
        t.my_lease = None;
        check("no lease of our own yet: wait", t, &[w()]);
    }

    #[test]
    fn foreign_data_is_never_touched() {
        let mut s = base();
        group(&mut s).initialize = Some("99".into());
        check("system identifier mismatch", s.clone(), &[w()]);
        let mut t = s.clone();
        t.bootstrapped_here = Some("7".into());
        check("another bootstrap's leftovers are still foreign", t, &[w()]);
        let DataDir::Initialized { sysid, .. } = &s.data else {
            panic!("base() has data");
        };
        s.bootstrapped_here = Some(sysid.clone());
        check(
            "this member's own failed bootstrap: set aside, cloned again",
            s,
            &[Reinit {
                cause: ReinitCause::BootstrapFailed,
                reason: String::new(),
            }],
        );
    }

    #[test]
    fn stopped_server() {
        let mut s = base();
        s.data = DataDir::Initialized {
            sysid: "42".into(),
            was_primary: true,
        };
        set_leader(&mut s, "m1");
        check(
            "leader restarts in place while its lease holds",
            s.clone(),
            &[StartPrimary],
        );
        let mut u = s.clone();
        u.data = DataDir::Initialized {
            sysid: "42".into(),
            was_primary: false,
        };
        check(
            "a promotion cut short: started as a standby, promoted next (a new timeline)",
            u,
            &[StartReplica { upstream: None }],
        );
        let mut t = s.clone();
        t.give_up_leading = true;
        check(
            "leader that cannot restart quickly releases the key",
            t,
            &[ReleaseLeader],
        );
        let mut t = s.clone();
        t.lease_valid = false;
        check("leader with an expired lease releases", t, &[ReleaseLeader]);

        let mut t = base();
        set_leader(&mut t, "m2");
        check(
            "replica starts following the leader",
            t.clone(),
            &[StartReplica {
                upstream: Some("m2".into()),
            }],
        );
        t.data = DataDir::Initialized {
            sysid: "42".into(),
            was_primary: true,
        };
        check(
            "former primary rewinds first",
            t,
            &[
                Rewind { from: "m2".into() },
                StartReplica {
                    upstream: Some("m2".into()),
                },
            ],
        );

        check(
            "no leader: start as a standby and compete",
            base(),
            &[StartReplica { upstream: None }],
        );
    }

    #[test]
    fn primary_keeps_or_loses_leadership() {
        let mut s = base();
        s.server = running(true, 100, None);
        set_leader(&mut s, "m1");
        check("steady leader", s.clone(), &[PublishOptime]);

        let mut t = s.clone();
        t.coordinator = true;
        t.setup_done = false;
        check(
            "coordinator leader: setup and citus sync",
            t,
            &[EnsureSetup, SyncCitus, PublishOptime],
        );

        let mut t = s.clone();
        t.lease_valid = false;
        check(
            "lease no longer valid: demote at once",
            t,
            &[Demote { immediate: true }],
        );

        let mut t = s.clone();
        set_leader(&mut t, "m2");
        check(
            "another leader: demote at once",
            t,
            &[Demote { immediate: true }],
        );

        let mut t = s.clone();
        group(&mut t).leader = None;
        check(
            "key vanished, lease valid: take it back",
            t.clone(),
            &[AcquireLeader, PublishOptime],
        );
        t.lease_valid = false;
        check(
            "key vanished, lease gone: demote",
            t,
            &[Demote { immediate: true }],
        );

        let mut t = s;
        t.dcs = Dcs::Unavailable;
        check(
            "etcd unreachable, lease valid: keep writing",
            t.clone(),
            &[w()],
        );
        t.lease_valid = false;
        check(
            "etcd unreachable, lease expired: demote",
            t,
            &[Demote { immediate: true }],
        );
    }

    #[test]
    fn a_standby_whose_wal_is_gone_is_cloned_again() {
        let mut s = base();
        s.server = Server::Running(Running {
            primary: false,
            timeline: 1,
            wal: 100,
            upstream: Some("m2".into()),
            streaming: false,
        });
        s.not_streaming_for = RECLONE_AFTER;
        set_leader(&mut s, "m2");
        check("not streaming, no lost slot: wait it out", s.clone(), &[]);

        let mut t = s.clone();
        group(&mut t).oldest_wal = Some(101);
        check(
            "the leader's oldest WAL is past our position: clone again",
            t.clone(),
            &[Reinit {
                cause: ReinitCause::WalGone,
                reason: String::new(),
            }],
        );
        let mut u = t.clone();
        u.not_streaming_for = RECLONE_AFTER - std::time::Duration::from_millis(1);
        check("not for long yet", u, &[]);
        let mut u = t.clone();
        if let Server::Running(r) = &mut u.server {
            r.streaming = true;
        }
        check("streaming after all", u, &[]);
        let mut u = t.clone();
        if let Server::Running(r) = &mut u.server {
            r.wal = 101;
        }
        check("the leader still has what we need", u, &[]);
        let mut u = t;
        group(&mut u).oldest_wal = None;
        check("the leader did not say", u, &[]);
    }

    #[test]
    fn a_handover_nobody_took_is_withdrawn() {
        let mut s = base();
        s.server = Server::Stopped;
        group(&mut s).failover = Some(FailoverRequest {
            leader: Some("m1".into()),
            member: Some("m2".into()),
            ..Default::default()
        });
        s.handoff_overdue = true;
        check(
            "overdue, nobody leads: clear",
            s.clone(),
            &[ClearFailover {
                reason: String::new(),
            }],
        );
        let mut t = s.clone();
        set_leader(&mut t, "m2");
        assert!(!decide(&t).iter().any(|a| matches!(a, ClearFailover { .. })));
        let mut t = s;
        t.handoff_overdue = false;
        assert!(!decide(&t).iter().any(|a| matches!(a, ClearFailover { .. })));
    }

    #[test]
    fn a_leader_keeps_member_slots_when_asked() {
        let mut s = base();
        s.server = running(true, 100, None);
        set_leader(&mut s, "m1");
        check("no slots", s.clone(), &[PublishOptime]);
        s.use_slots = true;
        check("slots", s.clone(), &[ManageSlots, PublishOptime]);
        let mut t = s.clone();
        t.pooler = true;
        check(
            "a pooler: pg_dist_poolinfo kept in line",
            t,
            &[SyncPoolinfo, ManageSlots, PublishOptime],
        );
    }

    #[test]
    fn data_that_cannot_rejoin_is_set_aside_only_against_a_confirmed_leader() {
        let mut s = base();
        set_leader(&mut s, "m2");
        let start = [StartReplica {
            upstream: Some("m2".into()),
        }];
        let mut t = s.clone();
        t.failed_replica_starts = MAX_REPLICA_START_FAILURES - 1;
        t.leader_confirmed_primary = true;
        check("two failed starts: try again", t, &start);
        let mut t = s.clone();
        t.failed_replica_starts = MAX_REPLICA_START_FAILURES;
        check(
            "three failed starts, the leader unconfirmed: keep the data, try again",
            t.clone(),
            &start,
        );
        t.leader_confirmed_primary = true;
        let set_aside = |cause| {
            [Reinit {
                cause,
                reason: String::new(),
            }]
        };
        check(
            "three failed starts under a confirmed leader: set aside",
            t,
            &set_aside(ReinitCause::StartFailed),
        );

        let mut t = s.clone();
        t.data = DataDir::Initialized {
            sysid: "42".into(),
            was_primary: true,
        };
        t.rewind_failed_from = Some("m2".into());
        check(
            "pg_rewind from the leader failed: set aside",
            t.clone(),
            &set_aside(ReinitCause::RewindFailed),
        );
        set_leader(&mut t, "m3");
        check(
            "it failed against another member: rewind from the new leader",
            t.clone(),
            &[
                Rewind { from: "m3".into() },
                StartReplica {
                    upstream: Some("m3".into()),
                },
            ],
        );
        let mut u = t.clone();
        group(&mut u).leader = None;
        group(&mut u).leader_lease = None;
        check(
            "no leader: never set aside",
            u,
            &[StartReplica { upstream: None }],
        );
        set_leader(&mut t, "m1");
        t.rewind_failed_from = Some("m1".into());
        check(
            "our own key: restart as leader, never set aside",
            t,
            &[StartPrimary],
        );
    }

    #[test]
    fn replica_follows_and_races() {
        let mut s = base();
        s.server = running(false, 100, Some("m2"));
        set_leader(&mut s, "m2");
        check("following the leader", s.clone(), &[]);

        let mut t = s.clone();
        set_leader(&mut t, "m3");
        check(
            "new leader: follow it",
            t,
            &[Follow {
                upstream: "m3".into(),
            }],
        );

        let mut t = s.clone();
        t.history = Verdict::Rewind;
        check(
            "diverged timeline: rewind",
            t,
            &[
                Demote { immediate: false },
                Rewind { from: "m2".into() },
                StartReplica {
                    upstream: Some("m2".into()),
                },
            ],
        );
        let mut t = s.clone();
        t.history = Verdict::Reclone;
        check(
            "forked on the same timeline number: cloned again (pg_rewind would do nothing)",
            t,
            &[Reinit {
                cause: ReinitCause::ForkedTimeline,
                reason: String::new(),
            }],
        );

        let mut t = s.clone();
        set_leader(&mut t, "m1");
        check("won the key: promote", t.clone(), &[Promote]);
        t.lease_valid = false;
        check("won the key but lease invalid: wait", t, &[w()]);

        // Leader gone.
        let mut t = s.clone();
        group(&mut t).leader = None;
        check(
            "sole healthy replica races",
            t.clone(),
            &[AcquireLeader, Promote],
        );

        let mut u = t.clone();
        u.nofailover = true;
        check("nofailover never races", u, &[w()]);

        let mut u = t.clone();
        group(&mut u).last_leader_wal = Some(5000);
        check("too far behind the last leader position", u.clone(), &[w()]);
        group(&mut u).last_leader_wal = Some(1100);
        check(
            "within maximum_lag_on_failover",
            u,
            &[AcquireLeader, Promote],
        );

        let mut u = t.clone();
        group(&mut u)
            .members
            .insert("m3".into(), member("replica", "streaming", 200));
        check("a healthier replica exists", u.clone(), &[w()]);
        group(&mut u)
            .members
            .insert("m3".into(), member("replica", "stopped", 200));
        check(
            "a stopped replica does not count",
            u.clone(),
            &[AcquireLeader, Promote],
        );
        let mut tagged = member("replica", "streaming", 200);
        tagged
            .tags
            .insert("nofailover".into(), serde_json::json!(true));
        group(&mut u).members.insert("m3".into(), tagged);
        check(
            "a nofailover replica does not count",
            u,
            &[AcquireLeader, Promote],
        );

        let mut u = t.clone();
        group(&mut u)
            .members
            .insert("m0".into(), member("replica", "streaming", 100));
        check("equal WAL: the smaller name wins", u, &[w()]);
        let mut u = t.clone();
        group(&mut u)
            .members
            .insert("m9".into(), member("replica", "streaming", 100));
        check(
            "equal WAL: we have the smaller name",
            u,
            &[AcquireLeader, Promote],
        );
    }

    #[test]
    fn switchover() {
        let mut s = base();
        s.server = running(true, 500, None);
        set_leader(&mut s, "m1");
        group(&mut s)
            .members
            .insert("m2".into(), member("replica", "streaming", 480));
        group(&mut s)
            .members
            .insert("m3".into(), member("replica", "streaming", 490));
        let req = |leader: Option<&str>, member: Option<&str>, at: Option<&str>| FailoverRequest {
            leader: leader.map(str::to_string),
            member: member.map(str::to_string),
            scheduled_at: at.map(str::to_string),
        };
        let with = |s: &Snapshot, f: FailoverRequest| {
            let mut t = s.clone();
            group(&mut t).failover = Some(f);
            t
        };
        check(
            "to the named candidate",
            with(&s, req(Some("m1"), Some("m2"), None)),
            &[Switchover { to: "m2".into() }],
        );
        check(
            "to the healthiest when none is named",
            with(&s, req(Some("m1"), None, None)),
            &[Switchover { to: "m3".into() }],
        );
        // now_unix is 1 000 000 s: 1970-01-12T13:46:40Z.
        check(
            "not yet: scheduled later",
            with(
                &s,
                req(Some("m1"), Some("m2"), Some("1970-01-20T00:00:00Z")),
            ),
            &[PublishOptime],
        );
        for (what, at) in [
            (
                "further ahead than 30 days: rejected",
                "2099-01-01T00:00:00Z",
            ),
            ("in the year 900000: rejected", "900000-01-01T00:00:00Z"),
            ("unreadable: rejected", "soon"),
        ] {
            check(
                what,
                with(&s, req(Some("m1"), Some("m2"), Some(at))),
                &[
                    ClearFailover {
                        reason: String::new(),
                    },
                    PublishOptime,
                ],
            );
        }
        check(
            "due: scheduled in the past",
            with(
                &s,
                req(Some("m1"), Some("m2"), Some("1970-01-02T00:00:00Z")),
            ),
            &[Switchover { to: "m2".into() }],
        );
        check(
            "for another leader: rejected",
            with(&s, req(Some("m9"), Some("m2"), None)),
            &[
                ClearFailover {
                    reason: String::new(),
                },
                PublishOptime,
            ],
        );
        check(
            "to a stranger: rejected",
            with(&s, req(Some("m1"), Some("m7"), None)),
            &[
                ClearFailover {
                    reason: String::new(),
                },
                PublishOptime,
            ],
        );
        let mut t = with(&s, req(Some("m1"), Some("m2"), None));
        group(&mut t)
            .members
            .insert("m2".into(), member("replica", "running", 480));
        check(
            "to a replica that does not stream: rejected",
            t,
            &[
                ClearFailover {
                    reason: String::new(),
                },
                PublishOptime,
            ],
        );
        let mut t = s.clone();
        t.me = "m2".into();
        set_leader(&mut t, "m2");
        group(&mut t).failover = Some(req(Some("m1"), Some("m2"), None));
        check(
            "the new leader clears the key",
            t,
            &[
                ClearFailover {
                    reason: String::new(),
                },
                PublishOptime,
            ],
        );

        // The candidate, once the old leader let go.
        let mut c = base();
        c.me = "m2".into();
        c.server = running(false, 500, Some("m1"));
        group(&mut c).failover = Some(req(Some("m1"), Some("m2"), None));
        group(&mut c)
            .members
            .insert("m2".into(), member("replica", "streaming", 500));
        group(&mut c)
            .members
            .insert("m3".into(), member("replica", "streaming", 900));
        group(&mut c).last_leader_wal = Some(600);
        let mut d = c.clone();
        check(
            "no handoff (the old leader died): no final position to wait for",
            d.clone(),
            &[AcquireLeader, Promote],
        );
        d.maximum_lag_on_failover = 50;
        check(
            "no handoff, too far behind, no leader to catch up from: the request is dropped",
            d,
            &[ClearFailover {
                reason: String::new(),
            }],
        );
        group(&mut c).handed_to = Some("m2".into());
        check("candidate waits to replay everything", c.clone(), &[w()]);
        group(&mut c).last_leader_wal = Some(500);
        check(
            "candidate takes over, even if another has more WAL",
            c.clone(),
            &[AcquireLeader, Promote],
        );
        // Synchronous mode: a candidate the sync key does not name takes over only after a
        // clean handoff to it (the simulation's seed 201).
        let mut y = c.clone();
        group(&mut y).handed_to = None;
        y.synchronous_mode = SyncModeConfig::On;
        group(&mut y).sync = Some(SyncState {
            leader: Some("m1".into()),
            sync_standby: None,
        });
        check(
            "sync: not after a leader that died; the request is dropped",
            y.clone(),
            &[ClearFailover {
                reason: String::new(),
            }],
        );
        group(&mut y).handed_to = Some("m2".into());
        check(
            "sync: after a clean handoff to it",
            y.clone(),
            &[AcquireLeader, Promote],
        );
        group(&mut y).handed_to = None;
        group(&mut y).sync = Some(SyncState {
            leader: Some("m1".into()),
            sync_standby: Some("m2".into()),
        });
        check(
            "sync: the synchronous standby in any case",
            y,
            &[AcquireLeader, Promote],
        );
        let mut o = c.clone();
        o.me = "m3".into();
        check("the others wait for the candidate", o.clone(), &[w()]);
        // A candidate that never promotes (tagged nofailover) is not waited for.
        if let Some(m2) = group(&mut o).members.get_mut("m2") {
            m2.tags.insert("nofailover".into(), serde_json::json!(true));
        }
        group(&mut o).last_leader_wal = Some(900);
        check(
            "a nofailover candidate is not waited for",
            o,
            &[AcquireLeader, Promote],
        );

        // The old leader, stopped cleanly, follows without pg_rewind.
        let mut old = base();
        old.data = DataDir::Initialized {
            sysid: "42".into(),
            was_primary: true,
        };
        old.clean_handoff = true;
        set_leader(&mut old, "m2");
        check(
            "clean handoff: follow at once",
            old,
            &[StartReplica {
                upstream: Some("m2".into()),
            }],
        );
    }

    #[test]
    fn paused_cluster_takes_no_automatic_action() {
        let mut s = base();
        group(&mut s).paused = true;
        check("stopped: not started", s.clone(), &[w()]);
        let mut t = s.clone();
        t.data = DataDir::Empty;
        group(&mut t).initialize = None;
        check("empty: not bootstrapped", t, &[w()]);
        let mut t = s.clone();
        t.server = running(false, 100, Some("m2"));
        check("replica without leader: no race", t.clone(), &[w()]);
        set_leader(&mut t, "m3");
        check(
            "replica still follows a new leader",
            t,
            &[Follow {
                upstream: "m3".into(),
            }],
        );
        let mut t = s.clone();
        t.server = running(true, 100, None);
        set_leader(&mut t, "m1");
        group(&mut t).failover = Some(FailoverRequest {
            leader: Some("m1".into()),
            member: Some("m2".into()),
            scheduled_at: None,
        });
        check(
            "primary keeps leading (no switchover while paused)",
            t.clone(),
            &[PublishOptime],
        );
        t.lease_valid = false;
        check(
            "but is still fenced without a valid lease",
            t,
            &[Demote { immediate: true }],
        );
    }

    #[test]
    fn a_leader_records_the_group_s_system_when_etcd_does_not() {
        let mut s = base();
        s.server = running(true, 100, None);
        set_leader(&mut s, "m1");
        group(&mut s).initialize = None;
        check(
            "no initialize key",
            s.clone(),
            &[FinishBootstrap, PublishOptime],
        );
        group(&mut s).initialize = Some(String::new());
        check(
            "a claim left over",
            s.clone(),
            &[FinishBootstrap, PublishOptime],
        );
        group(&mut s).initialize = Some("42".into());
        check("recorded", s, &[PublishOptime]);
    }

    #[test]
    fn data_left_by_a_failed_bootstrap_waits_for_another_members_bootstrap() {
        let mut s = base();
        group(&mut s).initialize = Some(String::new());
        group(&mut s).initialize_lease = Some(99);
        check("stopped: it waits", s.clone(), &[w()]);
        s.server = running(true, 100, None);
        check(
            "running as primary: it stops at once",
            s.clone(),
            &[Demote { immediate: true }],
        );
        // Our own claim (this member is the one bootstrapping): business as usual.
        group(&mut s).initialize_lease = Some(7);
        check("our own claim", s, &[AcquireLeader, PublishOptime]);
    }

    #[test]
    fn synchronous_mode_restricts_promotion() {
        let mut s = base();
        s.server = running(false, 100, Some("m2"));
        s.synchronous_mode = SyncModeConfig::On;
        group(&mut s).sync = Some(SyncState {
            leader: Some("m2".into()),
            sync_standby: Some("m3".into()),
        });
        check("not the synchronous standby", s.clone(), &[w()]);
        group(&mut s).sync = Some(SyncState {
            leader: Some("m2".into()),
            sync_standby: Some("m1".into()),
        });
        group(&mut s)
            .members
            .insert("m3".into(), member("replica", "streaming", 500));
        check(
            "the sync standby promotes even if an async one has more WAL",
            s.clone(),
            &[AcquireLeader, Promote],
        );
        // A leader that lost its key while it had no synchronous standby (cut off etcd)
        // acknowledged every commit alone: it, and only it, may lead again (the simulation's
        // seed 2 found the group waiting for ever instead).
        group(&mut s).members.remove("m3");
        group(&mut s).sync = Some(SyncState {
            leader: Some("m1".into()),
            sync_standby: None,
        });
        check(
            "the last leader of the sync key",
            s.clone(),
            &[AcquireLeader, Promote],
        );
        group(&mut s).sync = Some(SyncState {
            leader: Some("m2".into()),
            sync_standby: None,
        });
        check("but no other member", s, &[w()]);
        let mut l = base();
        l.synchronous_mode = SyncModeConfig::On;
        l.server = running(true, 100, None);
        set_leader(&mut l, "m1");
        check(
            "a synchronous-mode leader manages its standby",
            l,
            &[ManageSync, PublishOptime],
        );
    }

    #[test]
    fn a_member_whose_required_watchdog_is_missing_never_leads() {
        let why = Some("the watchdog is required but /dev/watchdog: not found".to_string());
        let mut s = base();
        s.cannot_lead = why.clone();

        let mut t = s.clone();
        t.data = DataDir::Empty;
        group(&mut t).initialize = None;
        check("it does not bootstrap a new group", t, &[w()]);

        let mut t = s.clone();
        t.server = running(false, 100, None);
        check("it does not race for a free key", t, &[w()]);

        let mut t = s.clone();
        t.server = running(false, 100, None);
        group(&mut t).failover = Some(FailoverRequest {
            member: Some("m1".into()),
            ..Default::default()
        });
        check("named as the candidate, it still waits", t, &[w()]);

        let mut t = s.clone();
        set_leader(&mut t, "m1");
        t.server = running(true, 100, None);
        check(
            "a leader steps down cleanly (the lease is still good)",
            t.clone(),
            &[Demote { immediate: false }],
        );
        t.server = Server::Stopped;
        check(
            "and gives the key up once stopped",
            t.clone(),
            &[ReleaseLeader],
        );
        t.server = running(false, 100, None);
        check(
            "a key won this cycle is given back before promoting",
            t,
            &[ReleaseLeader],
        );

        let mut t = s.clone();
        set_leader(&mut t, "m2");
        t.server = Server::Stopped;
        check(
            "it still follows another leader",
            t,
            &[StartReplica {
                upstream: Some("m2".into()),
            }],
        );

        // The same member with the device back is a candidate like any other.
        let mut t = s.clone();
        t.cannot_lead = None;
        t.server = running(false, 100, None);
        check("device back: it races", t, &[AcquireLeader, Promote]);
    }
}
