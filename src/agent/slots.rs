//! Member replication slots (Patroni's member slots), as a pure planner: given the physical
//! slots on the primary, the members that have a key in etcd and when the primary last saw
//! each, which slots to create, which to drop and which to recreate because PostgreSQL gave
//! them up.
//!
//! - Every other member with a member key gets a slot, so its WAL stays on the primary while
//!   it is behind, restarting, or down for a while.
//! - A member whose key is gone keeps its slot for `member_slots_ttl`: a standby that reboots
//!   finds its WAL; a member removed for good stops holding WAL back after that.
//! - `max_slot_wal_keep_size` bounds what a slot holds: past it, PostgreSQL marks the slot
//!   `lost` and the primary recreates it. Whether a standby can still catch up is decided
//!   elsewhere, from the oldest WAL the primary still has (`status` key, `decide::wal_gone`),
//!   which holds across agent restarts and failovers, and for members without a slot.
//! - Member names come from etcd, which is untrusted input: only names a host can have (DNS
//!   labels) get a slot, and at most `MAX_MEMBER_SLOTS`, so a flood of member keys cannot
//!   take the slots Citus's shard moves need (`max_replication_slots` is 10).
//! - Only slots named after members the primary has seen are touched: any other physical slot
//!   (a backup tool's, an operator's) is not ours.

use std::collections::BTreeMap;

use crate::postgres::conf::member_slot_name;
use crate::spec::rules::is_dns_label;

/// Member slots one primary keeps at most.
pub const MAX_MEMBER_SLOTS: usize = 5;

/// One physical slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub active: bool,
    /// `wal_status = 'lost'`: PostgreSQL removed WAL the slot needed; it is useless now.
    pub lost: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInput<'a> {
    pub me: &'a str,
    /// Members with a key in etcd now.
    pub members: &'a [String],
    /// The physical slots on this primary.
    pub slots: &'a [Slot],
    /// Members this primary tracks, with the time (ms, monotonic) each last had a key.
    pub seen: &'a BTreeMap<String, u64>,
    pub now_ms: u64,
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotPlan {
    /// Slot names to create (reserving WAL at once).
    pub create: Vec<String>,
    /// Slot names PostgreSQL gave up: drop, then create again.
    pub recreate: Vec<String>,
    /// Slot names to drop.
    pub drop: Vec<String>,
    /// Members left without a slot: over `MAX_MEMBER_SLOTS`.
    pub over_limit: Vec<String>,
    /// What to remember for the next round.
    pub seen: BTreeMap<String, u64>,
}

pub fn plan(i: &SlotInput) -> SlotPlan {
    let by_name: BTreeMap<&str, &Slot> = i.slots.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut p = SlotPlan::default();
    let mut tracked: BTreeMap<String, u64> = i.seen.clone();
    for m in i.members.iter().filter(|m| is_dns_label(m)) {
        tracked.insert(m.clone(), i.now_ms);
    }
    tracked.remove(i.me);
    let mut kept = 0;
    for (member, last) in tracked {
        let name = member_slot_name(&member);
        let slot = by_name.get(name.as_str());
        let active = slot.is_some_and(|s| s.active);
        if i.now_ms.saturating_sub(last) > i.ttl_ms && !active {
            if slot.is_some() {
                p.drop.push(name);
            }
            continue;
        }
        if kept >= MAX_MEMBER_SLOTS {
            p.over_limit.push(member);
            continue;
        }
        kept += 1;
        match slot {
            None => p.create.push(name),
            Some(s) if s.lost => p.recreate.push(name),
            Some(_) => {}
        }
        // A member that streams without a key (its agent is down) is still alive.
        p.seen.insert(member, if active { i.now_ms } else { last });
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, active: bool, lost: bool) -> Slot {
        Slot {
            name: name.into(),
            active,
            lost,
        }
    }

    fn map(v: &[(&str, u64)]) -> BTreeMap<String, u64> {
        v.iter().map(|(k, x)| (k.to_string(), *x)).collect()
    }

    struct Case {
        name: &'static str,
        members: &'static [&'static str],
        slots: Vec<Slot>,
        seen: &'static [(&'static str, u64)],
        now: u64,
        create: &'static [&'static str],
        recreate: &'static [&'static str],
        drop: &'static [&'static str],
        seen_after: &'static [(&'static str, u64)],
    }

    #[test]
    fn slot_plans() {
        let ttl = 1000;
        let cases = [
            Case {
                name: "a slot for every other member, none for me",
                members: &["m1", "m2-b", "me"],
                slots: vec![],
                seen: &[],
                now: 5,
                create: &["m1", "m2_b"],
                recreate: &[],
                drop: &[],
                seen_after: &[("m1", 5), ("m2-b", 5)],
            },
            Case {
                name: "a member down keeps its slot within the ttl",
                members: &["me"],
                slots: vec![slot("m1", false, false)],
                seen: &[("m1", 100)],
                now: 900,
                create: &[],
                recreate: &[],
                drop: &[],
                seen_after: &[("m1", 100)],
            },
            Case {
                name: "and loses it after",
                members: &["me"],
                slots: vec![slot("m1", false, false)],
                seen: &[("m1", 100)],
                now: 1101,
                create: &[],
                recreate: &[],
                drop: &["m1"],
                seen_after: &[],
            },
            Case {
                name: "unless something still streams from it",
                members: &["me"],
                slots: vec![slot("m1", true, false)],
                seen: &[("m1", 100)],
                now: 1101,
                create: &[],
                recreate: &[],
                drop: &[],
                seen_after: &[("m1", 1101)],
            },
            Case {
                name: "a lost slot is recreated, for a member down too",
                members: &["me", "m1"],
                slots: vec![slot("m1", false, true), slot("m2", false, true)],
                seen: &[("m2", 600)],
                now: 700,
                create: &[],
                recreate: &["m1", "m2"],
                drop: &[],
                seen_after: &[("m1", 700), ("m2", 600)],
            },
            Case {
                name: "slots of members never seen are not ours",
                members: &["me"],
                slots: vec![slot("pgbackrest", false, true), slot("me", false, false)],
                seen: &[],
                now: 1,
                create: &[],
                recreate: &[],
                drop: &[],
                seen_after: &[],
            },
            Case {
                name: "names no host can have get no slot (etcd is untrusted)",
                members: &["", "M1", "a b", "x/../y", "ok"],
                slots: vec![],
                seen: &[],
                now: 1,
                create: &["ok"],
                recreate: &[],
                drop: &[],
                seen_after: &[("ok", 1)],
            },
            Case {
                name: "at most MAX_MEMBER_SLOTS",
                members: &["a1", "a2", "a3", "a4", "a5", "a6", "a7"],
                slots: vec![],
                seen: &[],
                now: 1,
                create: &["a1", "a2", "a3", "a4", "a5"],
                recreate: &[],
                drop: &[],
                seen_after: &[("a1", 1), ("a2", 1), ("a3", 1), ("a4", 1), ("a5", 1)],
            },
        ];
        for c in cases {
            let members: Vec<String> = c.members.iter().map(|m| m.to_string()).collect();
            let seen = map(c.seen);
            let p = plan(&SlotInput {
                me: "me",
                members: &members,
                slots: &c.slots,
                seen: &seen,
                now_ms: c.now,
                ttl_ms: ttl,
            });
            let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            assert_eq!(p.create, strings(c.create), "{}: create", c.name);
            assert_eq!(p.recreate, strings(c.recreate), "{}: recreate", c.name);
            assert_eq!(p.drop, strings(c.drop), "{}: drop", c.name);
            assert_eq!(p.seen, map(c.seen_after), "{}: seen", c.name);
        }
    }
}
