//! Member replication slots (Patroni's member slots), as a pure planner: given the physical
//! slots on the primary, the members that have a key in etcd and what the primary remembers,
//! which slots to create, which to drop and which to recreate because PostgreSQL gave them up.
//!
//! - Every other member with a member key gets a slot, so its WAL stays on the primary while
//!   it is behind, restarting, or down for a while.
//! - A member whose key is gone keeps its slot for `member_slots_ttl`: a standby that reboots
//!   finds its WAL; a member removed for good stops holding WAL back after that.
//! - `max_slot_wal_keep_size` bounds what a slot holds: past it, PostgreSQL marks the slot
//!   `lost`. The primary then recreates it (reserving WAL from now) and publishes the WAL
//!   position it was recreated at; a standby still behind that position and not streaming
//!   knows its WAL is gone for good and is cloned again (`decide`). The record goes once the
//!   member has replayed past it.
//! - Only slots named after members the primary has seen are touched: any other physical slot
//!   (a backup tool's, an operator's) is not ours.

use std::collections::BTreeMap;

use crate::postgres::conf::member_slot_name;

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
    /// Members with a key in etcd now, with the WAL position each published.
    pub members: &'a BTreeMap<String, u64>,
    /// The physical slots on this primary.
    pub slots: &'a [Slot],
    /// Members this primary tracks, with the time (ms, monotonic) each last had a key.
    pub seen: &'a BTreeMap<String, u64>,
    /// Members whose slot was recreated after it was lost, with the WAL position then.
    pub lost: &'a BTreeMap<String, u64>,
    pub now_ms: u64,
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotPlan {
    /// Slot names to create (reserving WAL at once).
    pub create: Vec<String>,
    /// Members whose slot is lost: drop it, create it again, record the position.
    pub recreate: Vec<String>,
    /// Slot names to drop.
    pub drop: Vec<String>,
    /// What to remember for the next round.
    pub seen: BTreeMap<String, u64>,
    pub lost: BTreeMap<String, u64>,
}

pub fn plan(i: &SlotInput) -> SlotPlan {
    let by_name: BTreeMap<&str, &Slot> = i.slots.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut p = SlotPlan::default();
    let mut tracked: BTreeMap<String, u64> = i.seen.clone();
    for m in i.members.keys().filter(|m| m.as_str() != i.me) {
        tracked.insert(m.clone(), i.now_ms);
    }
    tracked.remove(i.me);
    for (member, last) in tracked {
        let name = member_slot_name(&member);
        let slot = by_name.get(name.as_str());
        let expired = i.now_ms.saturating_sub(last) > i.ttl_ms;
        if expired && !slot.is_some_and(|s| s.active) {
            if slot.is_some() {
                p.drop.push(name);
            }
            continue;
        }
        // A member that streams without a key (its agent is down) is still alive.
        let last = if slot.is_some_and(|s| s.active) {
            i.now_ms
        } else {
            last
        };
        match slot {
            None => p.create.push(name),
            Some(s) if s.lost => p.recreate.push(member.clone()),
            Some(_) => {}
        }
        if let Some(&at) = i.lost.get(&member) {
            let caught_up = i.members.get(&member).is_some_and(|&wal| wal >= at);
            if !caught_up {
                p.lost.insert(member.clone(), at);
            }
        }
        p.seen.insert(member, last);
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
        members: &'static [(&'static str, u64)],
        slots: Vec<Slot>,
        seen: &'static [(&'static str, u64)],
        lost: &'static [(&'static str, u64)],
        now: u64,
        create: &'static [&'static str],
        recreate: &'static [&'static str],
        drop: &'static [&'static str],
        seen_after: &'static [(&'static str, u64)],
        lost_after: &'static [(&'static str, u64)],
    }

    #[test]
    fn slot_plans() {
        let ttl = 1000;
        let cases = [
            Case {
                name: "a slot for every other member, none for me",
                members: &[("m1", 0), ("m2-b", 0), ("me", 0)],
                slots: vec![],
                seen: &[],
                lost: &[],
                now: 5,
                create: &["m1", "m2_b"],
                recreate: &[],
                drop: &[],
                seen_after: &[("m1", 5), ("m2-b", 5)],
                lost_after: &[],
            },
            Case {
                name: "a member down keeps its slot within the ttl",
                members: &[("me", 0)],
                slots: vec![slot("m1", false, false)],
                seen: &[("m1", 100)],
                lost: &[],
                now: 900,
                create: &[],
                recreate: &[],
                drop: &[],
                seen_after: &[("m1", 100)],
                lost_after: &[],
            },
            Case {
                name: "and loses it after",
                members: &[("me", 0)],
                slots: vec![slot("m1", false, false)],
                seen: &[("m1", 100)],
                lost: &[("m1", 7)],
                now: 1101,
                create: &[],
                recreate: &[],
                drop: &["m1"],
                seen_after: &[],
                lost_after: &[],
            },
            Case {
                name: "unless something still streams from it",
                members: &[("me", 0)],
                slots: vec![slot("m1", true, false)],
                seen: &[("m1", 100)],
                lost: &[],
                now: 1101,
                create: &[],
                recreate: &[],
                drop: &[],
                seen_after: &[("m1", 1101)],
                lost_after: &[],
            },
            Case {
                name: "a lost slot is recreated, for a member down too",
                members: &[("me", 0), ("m1", 10)],
                slots: vec![slot("m1", false, true), slot("m2", false, true)],
                seen: &[("m2", 600)],
                lost: &[],
                now: 700,
                create: &[],
                recreate: &["m1", "m2"],
                drop: &[],
                seen_after: &[("m1", 700), ("m2", 600)],
                lost_after: &[],
            },
            Case {
                name: "the lost record stays until the member replayed past it",
                members: &[("me", 0), ("m1", 49), ("m2", 50)],
                slots: vec![slot("m1", false, false), slot("m2", true, false)],
                seen: &[],
                lost: &[("m1", 50), ("m2", 50)],
                now: 1,
                create: &[],
                recreate: &[],
                drop: &[],
                seen_after: &[("m1", 1), ("m2", 1)],
                lost_after: &[("m1", 50)],
            },
            Case {
                name: "slots of members never seen are not ours",
                members: &[("me", 0)],
                slots: vec![slot("pgbackrest", false, true), slot("me", false, false)],
                seen: &[],
                lost: &[],
                now: 1,
                create: &[],
                recreate: &[],
                drop: &[],
                seen_after: &[],
                lost_after: &[],
            },
        ];
        for c in cases {
            let (members, seen, lost) = (map(c.members), map(c.seen), map(c.lost));
            let p = plan(&SlotInput {
                me: "me",
                members: &members,
                slots: &c.slots,
                seen: &seen,
                lost: &lost,
                now_ms: c.now,
                ttl_ms: ttl,
            });
            let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            assert_eq!(p.create, strings(c.create), "{}: create", c.name);
            assert_eq!(p.recreate, strings(c.recreate), "{}: recreate", c.name);
            assert_eq!(p.drop, strings(c.drop), "{}: drop", c.name);
            assert_eq!(p.seen, map(c.seen_after), "{}: seen", c.name);
            assert_eq!(p.lost, map(c.lost_after), "{}: lost", c.name);
        }
    }
}
