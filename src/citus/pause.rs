//! The coordinator's write pause for one worker group, as values: when to open it, when to
//! release it (moving the group's `pg_dist_node` row to the new primary in the same
//! transaction) and when to give up. Pure — the coordinator's agent feeds it what etcd, its
//! probes and `pg_dist_node` say, and runs the steps it returns (`agent::citus_pause`).
//!
//! The pause itself is an open transaction on the coordinator primary that holds the group's
//! shard metadata locks (`lock_shard_metadata`, exclusive mode): distributed writes routed to
//! the group wait for those locks and, once they get them, read the group's row afresh. The
//! locks cover only shards that live on this group alone — never reference tables, whose one
//! shard every group shares — so another group's failover or a secondary row change never
//! waits behind this pause.
//!
//! Rules:
//! - a switchover pause opens only when the group's current leader asks for it, and the
//!   leader stops only once it is acknowledged (or refused, or the wait times out);
//! - a loss pause (`pause_on_loss`) opens when the coordinator's probes of the group's primary
//!   fail a few times in a row, or the group's leader key goes;
//! - a pause is released only when a primary runs at the address the row will name: a new
//!   leader running as primary, or — for a loss that was a false alarm or a restart in place —
//!   the same leader answering as primary again (a member answering as a standby is not
//!   enough: after a switchover the old primary answers as one);
//! - every pause ends by `deadline_ms` at the latest, rolled back; nothing waits forever.

use crate::dcs::keys::{CitusPause, PauseState};

/// Why a pause was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The group's leader asked for it before stopping for a switchover.
    Switchover,
    /// The coordinator lost the group's primary (`pause_on_loss`).
    Loss,
}

/// A pause the coordinator holds (the I/O side keeps the SQL session beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenPause {
    pub trigger: Trigger,
    pub nodeid: i32,
    /// The row's address when the pause opened.
    pub from: (String, u16),
    pub opened_ms: u64,
    pub deadline_ms: u64,
    /// Name and leader-key revision of the leader when the pause opened.
    pub leader_at_open: Option<(String, i64)>,
    /// Since the pause opened, the group was seen without a primary running at `from` (its
    /// leader stopped, changed or went). Until then a primary at `from` is the one that asked
    /// for the pause, not its successor.
    pub handover_seen: bool,
}

/// The group's leader, from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub name: String,
    /// mod_revision of the leader key: a new key (even with the same name) is a new term.
    pub revision: i64,
    /// Where it runs as primary, when its member key says it does.
    pub primary_at: Option<(String, u16)>,
}

/// The group's primary row in `pg_dist_node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub nodeid: i32,
    pub host: String,
    pub port: u16,
}

/// What the coordinator knows about one worker group now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub now_ms: u64,
    pub request: Option<CitusPause>,
    pub leader: Option<Leader>,
    pub row: Option<Row>,
    /// Consecutive failed probes of the row's address by the coordinator.
    pub probe_failures: u32,
    /// The last probe that got an answer: true when the server answered as a primary.
    pub probe_primary: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub pause_timeout_ms: u64,
    pub pause_on_loss: bool,
    /// Failed probes in a row that count as a loss.
    pub loss_after: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Open the pause: lock the group's shards in a new transaction.
    Open {
        trigger: Trigger,
        nodeid: i32,
        from: (String, u16),
        leader_at_open: Option<(String, i64)>,
    },
    /// Tell the leader that the pause holds (request key → `paused`).
    Acknowledge,
    /// Tell the leader that no pause will come (request key → `refused`).
    Refuse(String),
    /// Point the row at `to` (when it moved) and commit: the waiting writes go on.
    Release { to: Option<(String, u16)> },
    /// Roll back: the deadline passed; the row stays as it was.
    Expire,
    /// Delete the request key (stale: no pause of ours stands behind it).
    ClearRequest,
}

/// The next steps for one group. `open` is updated in place (`handover_seen`).
pub fn next(open: Option<&mut OpenPause>, f: &Facts, s: &Settings) -> Vec<Step> {
    match open {
        None => closed(f, s),
        Some(p) => opened(p, f),
    }
}

fn closed(f: &Facts, s: &Settings) -> Vec<Step> {
    if let Some(r) = &f.request {
        match r.state {
            PauseState::Requested => return switchover_request(r, f),
            // An answer with no pause of ours behind it: left by a coordinator that is gone,
            // or by one of our pauses that ended. The leader read it (or gave up) already.
            PauseState::Paused => return vec![Step::ClearRequest],
            // Refusals are the leader's to delete once read.
            PauseState::Refused => {}
        }
    }
    if !s.pause_on_loss {
        return Vec::new();
    }
    let Some(row) = &f.row else {
        return Vec::new();
    };
    let lost = match &f.leader {
        None => true,
        Some(_) => f.probe_failures >= s.loss_after.max(1),
    };
    if !lost {
        return Vec::new();
    }
    vec![Step::Open {
        trigger: Trigger::Loss,
        nodeid: row.nodeid,
        from: (row.host.clone(), row.port),
        leader_at_open: f.leader.as_ref().map(|l| (l.name.clone(), l.revision)),
    }]
}

fn switchover_request(r: &CitusPause, f: &Facts) -> Vec<Step> {
    let Some(row) = &f.row else {
        return vec![Step::Refuse(
            "the group has no primary row in pg_dist_node".into(),
        )];
    };
    let Some(leader) = f.leader.as_ref().filter(|l| l.name == r.leader) else {
        return vec![Step::Refuse(format!(
            "{} does not lead the group",
            r.leader
        ))];
    };
    if leader.primary_at.as_ref() != Some(&(row.host.clone(), row.port)) {
        // The row does not name the leader yet: writes do not go to it, nothing to hold.
        return vec![Step::Refuse(format!(
            "the group's row names {}:{}, not the leader {}",
            row.host, row.port, r.leader
        ))];
    }
    vec![
        Step::Open {
            trigger: Trigger::Switchover,
            nodeid: row.nodeid,
            from: (row.host.clone(), row.port),
            leader_at_open: Some((leader.name.clone(), leader.revision)),
        },
        Step::Acknowledge,
    ]
}

fn opened(p: &mut OpenPause, f: &Facts) -> Vec<Step> {
    let clear = |mut steps: Vec<Step>| {
        if f.request.is_some() {
            steps.push(Step::ClearRequest);
        }
        steps
    };
    if f.now_ms >= p.deadline_ms {
        return clear(vec![Step::Expire]);
    }
    let same_term = |l: &Leader| {
        p.leader_at_open
            .as_ref()
            .is_some_and(|(n, rev)| *n == l.name && *rev == l.revision)
    };
    match (&f.leader, p.trigger) {
        (None, _) => p.handover_seen = true,
        (Some(l), _) if !same_term(l) => p.handover_seen = true,
        (Some(l), Trigger::Switchover) if l.primary_at.as_ref() != Some(&p.from) => {
            p.handover_seen = true
        }
        _ => {}
    }
    let Some(leader) = &f.leader else {
        return Vec::new();
    };
    match p.trigger {
        Trigger::Switchover => {
            if let Some(at) = leader.primary_at.clone().filter(|_| p.handover_seen) {
                let to = (at != p.from).then_some(at);
                return clear(vec![Step::Release { to }]);
            }
            if !p.handover_seen && f.request.is_none() {
                // The leader withdrew its request before stopping: nothing changes hands.
                return vec![Step::Release { to: None }];
            }
            Vec::new()
        }
        Trigger::Loss => match leader.primary_at.clone() {
            // A primary runs elsewhere (a new leader, or a row that was stale already): move.
            Some(at) if at != p.from => clear(vec![Step::Release { to: Some(at) }]),
            // At the row's own address: under a new term it is the successor; under the same
            // term only the server answering as a primary again ends it (a false alarm, or
            // PostgreSQL restarted in place under the same lease) — its member key alone may
            // be the lost server's last word.
            Some(_) if !same_term(leader) => clear(vec![Step::Release { to: None }]),
            Some(_) if f.probe_primary == Some(true) && f.probe_failures == 0 => {
                clear(vec![Step::Release { to: None }])
            }
            _ => Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings {
        pause_timeout_ms: 30_000,
        pause_on_loss: true,
        loss_after: 3,
    };

    fn addr(h: &str) -> (String, u16) {
        (h.to_string(), 5432)
    }

    fn leader(name: &str, rev: i64, primary_at: Option<&str>) -> Option<Leader> {
        Some(Leader {
            name: name.into(),
            revision: rev,
            primary_at: primary_at.map(addr),
        })
    }

    fn request(leader: &str, state: PauseState) -> Option<CitusPause> {
        Some(CitusPause {
            leader: leader.into(),
            candidate: Some("w2".into()),
            state,
            coordinator: None,
            detail: None,
        })
    }

    fn facts(request: Option<CitusPause>, l: Option<Leader>) -> Facts {
        Facts {
            now_ms: 1_000,
            request,
            leader: l,
            row: Some(Row {
                nodeid: 2,
                host: "w1".into(),
                port: 5432,
            }),
            probe_failures: 0,
            probe_primary: Some(true),
        }
    }

    fn open(trigger: Trigger, leader_rev: i64) -> OpenPause {
        OpenPause {
            trigger,
            nodeid: 2,
            from: addr("w1"),
            opened_ms: 500,
            deadline_ms: 30_500,
            leader_at_open: Some(("w1".into(), leader_rev)),
            handover_seen: false,
        }
    }

    #[test]
    fn switchover_request_opens_and_acknowledges() {
        let f = facts(
            request("w1", PauseState::Requested),
            leader("w1", 10, Some("w1")),
        );
        assert_eq!(
            next(None, &f, &S),
            vec![
                Step::Open {
                    trigger: Trigger::Switchover,
                    nodeid: 2,
                    from: addr("w1"),
                    leader_at_open: Some(("w1".into(), 10)),
                },
                Step::Acknowledge
            ]
        );
    }

    #[test]
    fn requests_that_cannot_be_served_are_refused_at_once() {
        let cases = [
            // From a member that does not lead.
            facts(
                request("w3", PauseState::Requested),
                leader("w1", 10, Some("w1")),
            ),
            // The row does not name the leader.
            facts(
                request("w1", PauseState::Requested),
                leader("w1", 10, Some("w9")),
            ),
            // No row at all.
            Facts {
                row: None,
                ..facts(
                    request("w1", PauseState::Requested),
                    leader("w1", 10, Some("w1")),
                )
            },
        ];
        for f in cases {
            assert!(
                matches!(next(None, &f, &S).as_slice(), [Step::Refuse(_)]),
                "{f:?}"
            );
        }
    }

    #[test]
    fn stale_answers_are_cleared_refusals_left_to_the_leader() {
        let f = facts(
            request("w1", PauseState::Paused),
            leader("w1", 10, Some("w1")),
        );
        assert_eq!(next(None, &f, &S), vec![Step::ClearRequest]);
        let f = facts(
            request("w1", PauseState::Refused),
            leader("w1", 10, Some("w1")),
        );
        assert_eq!(next(None, &f, &S), vec![]);
    }

    #[test]
    fn switchover_releases_only_on_the_successor() {
        let mut p = open(Trigger::Switchover, 10);
        // Right after the pause opened, the old leader still runs: keep holding.
        let f = facts(
            request("w1", PauseState::Paused),
            leader("w1", 10, Some("w1")),
        );
        assert_eq!(next(Some(&mut p), &f, &S), vec![]);
        assert!(!p.handover_seen);
        // It stopped and released the key.
        let f = facts(request("w1", PauseState::Paused), None);
        assert_eq!(next(Some(&mut p), &f, &S), vec![]);
        assert!(p.handover_seen);
        // The candidate took the key but is not primary yet.
        let f = facts(request("w1", PauseState::Paused), leader("w2", 11, None));
        assert_eq!(next(Some(&mut p), &f, &S), vec![]);
        // It runs as primary: move the row and commit.
        let f = facts(
            request("w1", PauseState::Paused),
            leader("w2", 11, Some("w2")),
        );
        assert_eq!(
            next(Some(&mut p), &f, &S),
            vec![
                Step::Release {
                    to: Some(addr("w2"))
                },
                Step::ClearRequest
            ]
        );
    }

    #[test]
    fn switchover_that_falls_back_to_the_old_leader_releases_in_place() {
        // The candidate never promoted; the old leader took the key again (a new term).
        let mut p = open(Trigger::Switchover, 10);
        let f = facts(None, leader("w1", 12, Some("w1")));
        assert_eq!(next(Some(&mut p), &f, &S), vec![Step::Release { to: None }]);
    }

    #[test]
    fn a_withdrawn_request_releases_without_a_move() {
        let mut p = open(Trigger::Switchover, 10);
        let f = facts(None, leader("w1", 10, Some("w1")));
        assert_eq!(next(Some(&mut p), &f, &S), vec![Step::Release { to: None }]);
    }

    #[test]
    fn every_pause_expires() {
        for trigger in [Trigger::Switchover, Trigger::Loss] {
            let mut p = open(trigger, 10);
            let f = Facts {
                now_ms: 30_500,
                ..facts(request("w1", PauseState::Paused), None)
            };
            assert_eq!(
                next(Some(&mut p), &f, &S),
                vec![Step::Expire, Step::ClearRequest],
                "{trigger:?}"
            );
        }
    }

    #[test]
    fn loss_opens_after_failed_probes_or_a_lost_leader_key() {
        let mut f = facts(None, leader("w1", 10, Some("w1")));
        f.probe_failures = 2;
        assert_eq!(next(None, &f, &S), vec![]);
        f.probe_failures = 3;
        assert!(matches!(
            next(None, &f, &S).as_slice(),
            [Step::Open {
                trigger: Trigger::Loss,
                ..
            }]
        ));
        let f = facts(None, None);
        assert!(matches!(
            next(None, &f, &S).as_slice(),
            [Step::Open {
                trigger: Trigger::Loss,
                leader_at_open: None,
                ..
            }]
        ));
        // Off unless the spec asks for it.
        let off = Settings {
            pause_on_loss: false,
            ..S
        };
        assert_eq!(next(None, &f, &off), vec![]);
    }

    #[test]
    fn loss_releases_on_a_new_primary_or_the_old_one_answering_as_primary() {
        // The old primary answers again, but as a standby: not a release.
        let mut p = open(Trigger::Loss, 10);
        let mut f = facts(None, leader("w1", 10, Some("w1")));
        f.probe_primary = Some(false);
        assert_eq!(next(Some(&mut p), &f, &S), vec![]);
        // Still failing probes: hold.
        f.probe_primary = Some(true);
        f.probe_failures = 4;
        assert_eq!(next(Some(&mut p), &f, &S), vec![]);
        // A false alarm: it answers as primary under the same term.
        f.probe_failures = 0;
        assert_eq!(next(Some(&mut p), &f, &S), vec![Step::Release { to: None }]);
        // The row named a server that was replaced already (the leader runs elsewhere under
        // the same term): move at once.
        let mut p = open(Trigger::Loss, 10);
        let f = facts(None, leader("w1", 10, Some("w3")));
        assert_eq!(
            next(Some(&mut p), &f, &S),
            vec![Step::Release {
                to: Some(addr("w3"))
            }]
        );
        // A new leader, not primary yet, then primary.
        let mut p = open(Trigger::Loss, 10);
        let f = facts(None, leader("w2", 11, None));
        assert_eq!(next(Some(&mut p), &f, &S), vec![]);
        let f = facts(None, leader("w2", 11, Some("w2")));
        assert_eq!(
            next(Some(&mut p), &f, &S),
            vec![Step::Release {
                to: Some(addr("w2"))
            }]
        );
    }
}
