//! The guard's rules, as a pure core: what the agent tells its guard, when the guard kills a
//! primary whose lease ran out, when it opens the watchdog device, when it may keep it from
//! firing, and when it closes it. The guard process (`agent::guard`) carries the effects out
//! with pipes, signals and ioctls; the simulation (`tests/simulation.rs`) carries them out on
//! its simulated hosts, so its seeds test these very rules.
//!
//! Times are milliseconds on one monotonic clock that the agent and its guard share
//! (CLOCK_MONOTONIC in production).

use std::fmt;

/// A line from the agent to its guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Guard postmaster `pid` as a primary whose lease is surely valid until `lease_end_ms`.
    Arm { pid: u32, lease_end_ms: u64 },
    /// Nothing runs as primary.
    Disarm,
}

impl Message {
    /// One line as the agent writes it; anything else is refused (pid 0 and 1 included: a
    /// kill of either would hit far more than a postmaster).
    pub fn parse(line: &str) -> Option<Message> {
        let mut words = line.split_whitespace();
        let message = match words.next()? {
            "disarm" => Message::Disarm,
            "arm" => {
                let pid: u32 = words.next()?.parse().ok()?;
                let lease_end_ms = words.next()?.parse().ok()?;
                if pid <= 1 {
                    return None;
                }
                Message::Arm { pid, lease_end_ms }
            }
            _ => return None,
        };
        words.next().is_none().then_some(message)
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Arm { pid, lease_end_ms } => write!(f, "arm {pid} {lease_end_ms}"),
            Message::Disarm => f.write_str("disarm"),
        }
    }
}

/// What the agent tells its guard when the fence reports postmaster `pid` (0: none) with
/// its lease surely valid until `lease_end_ms` (None: no lease to trust). `armed_pid` is the
/// pid the last `arm` named; `fallback_end_ms` a short deadline (now plus the fence's margin).
/// None: nothing new to say.
pub fn message_for(
    pid: u32,
    lease_end_ms: Option<u64>,
    armed_pid: Option<u32>,
    fallback_end_ms: u64,
) -> Option<Message> {
    match (pid, lease_end_ms) {
        (0, _) => Some(Message::Disarm),
        (pid, Some(lease_end_ms)) => Some(Message::Arm { pid, lease_end_ms }),
        // No lease to trust: the agent's own fence stops this primary now, being able to say
        // so. The guard keeps the deadline it has for it, or gets a short one.
        (pid, None) if armed_pid == Some(pid) => None,
        (pid, None) => Some(Message::Arm {
            pid,
            lease_end_ms: fallback_end_ms,
        }),
    }
}

/// What the guard watches over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Armed {
    pub pid: u32,
    /// The process's start time (/proc/PID/stat): a pid reused by another process is never
    /// killed.
    pub start_time: u64,
    pub lease_end_ms: u64,
}

/// When the guard kills the postmaster: a little after the agent's own fence
/// (`lease_end - margin`), so the agent, when it can, acts first; and early enough that a
/// device petted until the last moment `may_pet` allows has not fired yet when the guard
/// closes it after the kill (a healthy guard never has a host reset).
pub fn kill_at(lease_end_ms: u64, margin_ms: u64) -> u64 {
    lease_end_ms.saturating_sub(margin_ms) + (margin_ms / 4).min(250)
}

/// The watchdog may be kept from firing at `now` only if, fired `timeout` after, it still
/// resets the host before the lease can have ended (with a little slack for the pet itself).
pub fn may_pet(now_ms: u64, lease_end_ms: u64, timeout_s: u32) -> bool {
    now_ms + u64::from(timeout_s) * 1000 + PET_SLACK_MS <= lease_end_ms
}

/// Room left between a reset the last pet allows and the lease's end: hardware timers tick
/// coarsely, and a pet is a system call that can be late too.
pub const PET_SLACK_MS: u64 = 500;
/// How often the guard keeps the device from firing while that is safe.
pub const PET_EVERY_MS: u64 = 100;

/// The device timeout to ask for: a renewal comes every `ttl / 4` or so, and the device must
/// be petted between two of them with its whole timeout still inside the lease.
pub fn wanted_timeout_s(ttl_ms: u64, margin_ms: u64) -> u32 {
    let room = ttl_ms.saturating_sub(margin_ms).saturating_sub(ttl_ms / 2);
    ((room / 1000) as u32).max(1)
}

/// What the guard has to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Open the watchdog device asking for this timeout (seconds), and tell `opened` how it
    /// went.
    OpenDevice { want_s: u32 },
    /// Kill this postmaster and every process it started.
    Kill(Armed),
    /// Keep the open device from firing.
    Pet,
    /// Close the open device, saying the close is intended.
    CloseDevice,
    /// A line for the agent.
    Report(String),
}

/// The guard's state between two events.
#[derive(Debug, Clone)]
pub struct GuardCore {
    margin_ms: u64,
    ttl_ms: u64,
    want_s: u32,
    /// A device is configured (`ha.watchdog` not `off`).
    device: bool,
    /// No primary runs without the device (`ha.watchdog: required`).
    required: bool,
    armed: Option<Armed>,
    /// The postmaster the device was last tried for: one attempt per primary, not one per
    /// lease renewal.
    tried_for: Option<u32>,
    /// The open device's timeout (seconds).
    device_timeout_s: Option<u32>,
}

impl GuardCore {
    pub fn new(margin_ms: u64, ttl_ms: u64, device: bool, required: bool) -> GuardCore {
        GuardCore {
            margin_ms,
            ttl_ms,
            want_s: wanted_timeout_s(ttl_ms, margin_ms),
            device,
            required: required && device,
            armed: None,
            tried_for: None,
            device_timeout_s: None,
        }
    }

    pub fn armed(&self) -> Option<Armed> {
        self.armed
    }

    /// The open device's timeout, if one is open.
    pub fn device_timeout_s(&self) -> Option<u32> {
        self.device_timeout_s
    }

    /// A message from the agent at `now_ms`. `start_time` reads a process's start time; it
    /// is asked only for a pid not guarded yet (None: no such process, nothing to guard).
    pub fn receive(
        &mut self,
        message: Message,
        now_ms: u64,
        start_time: impl FnOnce(u32) -> Option<u64>,
    ) -> Option<Effect> {
        match message {
            Message::Disarm => {
                self.armed = None;
                self.tried_for = None;
                None
            }
            Message::Arm { pid, lease_end_ms } => {
                self.armed = match self.armed.filter(|a| a.pid == pid) {
                    Some(a) => Some(Armed { lease_end_ms, ..a }),
                    None => start_time(pid).map(|start_time| Armed {
                        pid,
                        start_time,
                        lease_end_ms,
                    }),
                };
                // Opened once per primary, and only when a timer started now would still fire
                // before the lease ends.
                let untried = self.armed.is_some_and(|a| {
                    self.tried_for != Some(a.pid) && may_pet(now_ms, a.lease_end_ms, self.want_s)
                });
                if untried && self.device && self.device_timeout_s.is_none() {
                    self.tried_for = self.armed.map(|a| a.pid);
                    return Some(Effect::OpenDevice {
                        want_s: self.want_s,
                    });
                }
                None
            }
        }
    }

    /// How opening the device went: the timeout in force (a device may round what it was
    /// asked for) or why it failed. Returns whether to keep the device open (otherwise close
    /// it at once) and what else to do.
    pub fn opened(&mut self, result: Result<u32, String>) -> (bool, Vec<Effect>) {
        let limit_ms = self.ttl_ms.saturating_sub(self.margin_ms);
        let mut effects = Vec::new();
        let keep = match result {
            Ok(t) if t == 0 || u64::from(t) * 1000 + PET_SLACK_MS >= limit_ms => {
                effects.push(Effect::Report(format!(
                    "watchdog failed its timeout is {t} s, which does not fit a lease of {} ms",
                    self.ttl_ms
                )));
                false
            }
            Ok(t) => {
                effects.push(Effect::Report(format!("watchdog active {t}")));
                self.device_timeout_s = Some(t);
                true
            }
            Err(e) => {
                effects.push(Effect::Report(format!("watchdog failed {e}")));
                false
            }
        };
        if !keep && self.required {
            // No primary runs without the device the operator required.
            if let Some(a) = self.armed.take() {
                effects.push(Effect::Kill(a));
            }
        }
        (keep, effects)
    }

    /// Time has come to `now_ms`: kill a primary whose deadline passed, keep the device from
    /// firing while that is safe, and close it once nothing is guarded.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(a) = self.armed {
            if now_ms >= kill_at(a.lease_end_ms, self.margin_ms) {
                effects.push(Effect::Kill(a));
                self.armed = None;
                self.tried_for = None;
            }
        }
        match (self.armed, self.device_timeout_s) {
            (Some(a), Some(t)) if may_pet(now_ms, a.lease_end_ms, t) => effects.push(Effect::Pet),
            (None, Some(_)) => {
                self.device_timeout_s = None;
                effects.push(Effect::CloseDevice);
                effects.push(Effect::Report("watchdog closed".into()));
            }
            _ => {}
        }
        effects
    }

    /// How long the guard may sleep before `tick` has something to do; None while nothing
    /// is guarded.
    pub fn wait_ms(&self, now_ms: u64) -> Option<u64> {
        self.armed.map(|a| {
            let until_kill = kill_at(a.lease_end_ms, self.margin_ms).saturating_sub(now_ms);
            if self.device_timeout_s.is_some() {
                until_kill.min(PET_EVERY_MS)
            } else {
                until_kill
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_nothing_else_does() {
        for m in [
            Message::Arm {
                pid: 4242,
                lease_end_ms: 1000,
            },
            Message::Disarm,
        ] {
            assert_eq!(Message::parse(&m.to_string()), Some(m));
        }
        for bad in [
            "",
            "arm",
            "arm x 1",
            "arm 1 5",
            "arm 0 5",
            "arm 12 -3",
            "arm 12 5 7",
            "kill 12",
        ] {
            assert_eq!(Message::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn what_the_agent_says() {
        let arm = |pid, lease_end_ms| Some(Message::Arm { pid, lease_end_ms });
        let cases = [
            (
                "nothing runs as primary",
                0,
                Some(5),
                Some(9),
                Some(Message::Disarm),
            ),
            ("a lease to trust", 9, Some(5_000), None, arm(9, 5_000)),
            ("renewed", 9, Some(6_000), Some(9), arm(9, 6_000)),
            (
                "lease lost, already guarded: keep its deadline",
                9,
                None,
                Some(9),
                None,
            ),
            (
                "lease lost, not guarded yet: a short deadline",
                9,
                None,
                None,
                arm(9, 77),
            ),
            (
                "lease lost, another pid guarded",
                9,
                None,
                Some(8),
                arm(9, 77),
            ),
        ];
        for (what, pid, end, armed, want) in cases {
            assert_eq!(message_for(pid, end, armed, 77), want, "{what}");
        }
    }

    #[test]
    fn the_guard_acts_after_the_fence_and_before_the_lease_ends() {
        for margin in [1000u64, 3000] {
            let end = 100_000;
            let k = kill_at(end, margin);
            assert!(k > end - margin && k < end, "{margin}: {k}");
        }
    }

    #[test]
    fn the_device_is_petted_only_while_its_timeout_fits_in_the_lease() {
        // Lease ends at 10 s; a 2 s device may be petted until 7.5 s, never after.
        assert!(may_pet(7_000, 10_000, 2));
        assert!(may_pet(7_500, 10_000, 2));
        assert!(!may_pet(7_501, 10_000, 2));
        assert!(!may_pet(10_000, 10_000, 2));
        for (ttl, margin) in [
            (5_000u64, 1_000u64),
            (10_000, 1_000),
            (30_000, 3_000),
            (60_000, 6_000),
        ] {
            let t = wanted_timeout_s(ttl, margin);
            assert!(t >= 1 && u64::from(t) * 1000 < ttl - margin, "{ttl}: {t}");
            let end = 1_000_000;
            // Pets come every PET_EVERY_MS: the last one falls up to that much before the
            // last moment allowed.
            let last_allowed = (0..end).rev().find(|n| may_pet(*n, end, t)).unwrap_or(0);
            let earliest_reset = last_allowed - PET_EVERY_MS + u64::from(t) * 1000;
            let latest_reset = last_allowed + u64::from(t) * 1000;
            // A hung guard: the host is reset before the lease can have ended.
            assert!(
                latest_reset < end,
                "{ttl}: reset {latest_reset} after {end}"
            );
            // A healthy guard kills, then closes the device, before it can fire.
            assert!(
                kill_at(end, margin) < earliest_reset,
                "{ttl}: kill after a reset"
            );
            // In steady state (a renewal every ttl / 4, each taking up to a second), the
            // device can be kept: the lease end is always far enough ahead.
            let worst_ahead = ttl - ttl / 4 - 1_000;
            assert!(may_pet(end - worst_ahead, end, t), "{ttl}: never petted");
        }
    }

    const ARM: Message = Message::Arm {
        pid: 42,
        lease_end_ms: 10_000,
    };

    fn armed(lease_end_ms: u64) -> Armed {
        Armed {
            pid: 42,
            start_time: 7,
            lease_end_ms,
        }
    }

    #[test]
    fn a_primary_is_killed_when_its_deadline_comes_and_not_before() {
        let mut g = GuardCore::new(1_000, 5_000, false, false);
        assert_eq!(g.receive(ARM, 5_000, |_| Some(7)), None);
        assert_eq!(g.tick(9_000), vec![]);
        assert_eq!(g.wait_ms(9_000), Some(250));
        // Renewed: the deadline moves; the start time read first is kept.
        let renewed = Message::Arm {
            pid: 42,
            lease_end_ms: 12_000,
        };
        assert_eq!(g.receive(renewed, 9_100, |_| Some(99)), None);
        assert_eq!(g.tick(11_000), vec![]);
        assert_eq!(g.tick(11_250), vec![Effect::Kill(armed(12_000))]);
        assert_eq!(g.armed(), None);
        assert_eq!(g.tick(20_000), vec![]);
        assert_eq!(g.wait_ms(20_000), None);
    }

    #[test]
    fn a_disarmed_or_vanished_primary_is_left_alone() {
        let mut g = GuardCore::new(1_000, 5_000, false, false);
        g.receive(ARM, 5_000, |_| Some(7));
        g.receive(Message::Disarm, 6_000, |_| Some(7));
        assert_eq!(g.tick(50_000), vec![]);
        // A pid that names no process is not guarded.
        g.receive(ARM, 6_000, |_| None);
        assert_eq!(g.armed(), None);
        assert_eq!(g.tick(50_000), vec![]);
    }

    #[test]
    fn the_device_is_opened_once_per_primary_petted_and_closed() {
        let mut g = GuardCore::new(1_000, 5_000, true, false);
        // Too close to the lease's end for a timer started now: not yet.
        let late = Message::Arm {
            pid: 42,
            lease_end_ms: 5_500,
        };
        assert_eq!(g.receive(late, 5_000, |_| Some(7)), None);
        assert_eq!(
            g.receive(ARM, 5_000, |_| Some(7)),
            Some(Effect::OpenDevice { want_s: 1 })
        );
        assert_eq!(
            g.opened(Ok(1)),
            (true, vec![Effect::Report("watchdog active 1".into())])
        );
        // A renewal does not open it again.
        assert_eq!(g.receive(ARM, 6_000, |_| Some(7)), None);
        assert_eq!(g.tick(8_000), vec![Effect::Pet]);
        assert_eq!(g.wait_ms(8_000), Some(PET_EVERY_MS));
        // Past the last safe pet the device is left to fire, should the guard hang now.
        assert_eq!(g.tick(8_600), vec![]);
        assert_eq!(
            g.tick(9_250),
            vec![
                Effect::Kill(armed(10_000)),
                Effect::CloseDevice,
                Effect::Report("watchdog closed".into())
            ]
        );
        assert_eq!(g.device_timeout_s(), None);
    }

    #[test]
    fn a_device_that_does_not_fit_or_fails_is_refused_and_required_kills() {
        for (result, required, kills) in [
            (Ok(4), false, false),
            (Ok(0), false, false),
            (Err("no such device".to_string()), false, false),
            (Ok(4), true, true),
            (Err("no such device".to_string()), true, true),
        ] {
            let mut g = GuardCore::new(1_000, 5_000, true, required);
            assert!(g.receive(ARM, 5_000, |_| Some(7)).is_some());
            let (keep, effects) = g.opened(result.clone());
            assert!(!keep, "{result:?}");
            assert_eq!(
                effects.contains(&Effect::Kill(armed(10_000))),
                kills,
                "{result:?} required={required}: {effects:?}"
            );
            assert_eq!(g.device_timeout_s(), None);
        }
    }
}
