//! The agent's etcd lease, kept alive by its own task, and the fence that stops a primary
//! whose lease may have run out — independently of the main loop, which may be stuck in a slow
//! call when the deadline comes.
//!
//! Timing: a refresh sent at `t` that succeeds keeps the lease alive on the etcd side until at
//! least `t + ttl` (etcd counts from when it receives it). So the lease is trusted until
//! `t + ttl - margin`; at that moment the fence stops PostgreSQL immediately (SIGQUIT), before
//! any other member can have won the leader key, let alone promoted.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;

use crate::dcs::Dcs;

/// Timing derived from the HA settings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ttl: Duration,
    pub refresh_every: Duration,
    pub call_timeout: Duration,
    pub margin: Duration,
}

impl Timing {
    pub fn new(ttl_s: u32, loop_wait_s: u32, retry_timeout_s: u32) -> Timing {
        let ttl = Duration::from_secs(u64::from(ttl_s));
        let refresh_every = (ttl / 4).clamp(
            Duration::from_millis(250),
            Duration::from_secs(u64::from(loop_wait_s.max(1))),
        );
        let margin = (ttl / 10).max(Duration::from_secs(1));
        let call_timeout = Duration::from_secs(u64::from(retry_timeout_s))
            .min(refresh_every.max(Duration::from_millis(500)));
        Timing {
            ttl,
            refresh_every,
            call_timeout,
            margin,
        }
    }
}

/// State shared by the lease task, the fence and the main loop.
pub struct LeaseShared {
    /// Current lease id, 0 when none.
    pub id: AtomicI64,
    /// Trusted until this instant (None: not trusted).
    valid_until: Mutex<Option<Instant>>,
    pub timing: Timing,
    /// Set by the main loop: pid of a postmaster running as primary (0 when none).
    pub primary_pid: AtomicU32,
    pub fenced: AtomicBool,
    /// Wakes the main loop (lease lost or regained).
    pub wake: Arc<Notify>,
    fence_wake: Notify,
    /// Lease renewals that succeeded, for metrics.
    pub renewals: AtomicI64,
}

impl LeaseShared {
    pub fn new(timing: Timing, wake: Arc<Notify>) -> Arc<LeaseShared> {
        Arc::new(LeaseShared {
            id: AtomicI64::new(0),
            valid_until: Mutex::new(None),
            timing,
            primary_pid: AtomicU32::new(0),
            fenced: AtomicBool::new(false),
            wake,
            fence_wake: Notify::new(),
            renewals: AtomicI64::new(0),
        })
    }

    pub fn lease_id(&self) -> Option<i64> {
        Some(self.id.load(Ordering::SeqCst)).filter(|i| *i != 0)
    }

    fn deadline(&self) -> Option<Instant> {
        self.valid_until
            .lock()
            .ok()
            .and_then(|v| *v)
            .map(|v| v.checked_sub(self.timing.margin).unwrap_or(v))
    }

    /// Whether no other member can have won the leader key from us yet.
    pub fn valid(&self) -> bool {
        self.lease_id().is_some() && self.deadline().is_some_and(|d| Instant::now() < d)
    }

    /// Guard the postmaster `pid` as a primary from now on (the fence and the guard look
    /// at once).
    pub fn arm_fence(&self, pid: u32) {
        self.primary_pid.store(pid, Ordering::SeqCst);
        self.fence_wake.notify_one();
    }

    /// Nothing runs as primary any more.
    pub fn disarm_fence(&self) {
        self.arm_fence(0);
    }

    fn valid_until(&self) -> Option<Instant> {
        self.valid_until.lock().ok().and_then(|v| *v)
    }

    fn set_valid_until(&self, v: Option<Instant>) {
        if let Ok(mut slot) = self.valid_until.lock() {
            *slot = v;
        }
        self.fence_wake.notify_one();
    }
}

/// Keep a lease alive forever: grant one when there is none, refresh it, and when etcd says it
/// is gone, drop it (the main loop sees that and acts) and grant a new one.
pub async fn keep_alive(dcs: Dcs, shared: Arc<LeaseShared>, probe_key: String) {
    let t = shared.timing;
    let ttl_secs = t.ttl.as_secs() as i64;
    let mut refresher = None;
    loop {
        if shared.lease_id().is_none() {
            let sent = Instant::now();
            match dcs.grant(ttl_secs).await {
                Ok(id) => {
                    shared.id.store(id, Ordering::SeqCst);
                    shared.set_valid_until(Some(sent + t.ttl));
                    refresher = None;
                    shared.wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot grant an etcd lease");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let Some(id) = shared.lease_id() else {
            continue;
        };
        if refresher.is_none() {
            match dcs.keeper(id, &probe_key).await {
                Ok(r) => refresher = Some(r),
                Err(e) if lease_gone(&e) => {
                    lost(&shared, id);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the lease keep-alive stream");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            }
        }
        let sent = Instant::now();
        let result = match refresher.as_mut() {
            Some(r) => r.refresh(t.call_timeout).await,
            None => continue,
        };
        match result {
            Ok(ttl) if ttl > 0 => {
                let granted = Duration::from_secs(ttl as u64).min(t.ttl);
                shared.set_valid_until(Some(sent + granted));
                shared.renewals.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(t.refresh_every.saturating_sub(sent.elapsed())).await;
            }
            Ok(_) => {
                tracing::warn!(
                    lease = id,
                    "the etcd lease expired; keys attached to it are gone"
                );
                shared.set_valid_until(None);
                shared.id.store(0, Ordering::SeqCst);
                shared.wake.notify_one();
            }
            Err(e) => {
                // Keep the old deadline: it is still a safe bound. Retry soon on a new stream.
                tracing::warn!(error = %e, "lease refresh failed");
                refresher = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// etcd says the lease no longer exists (it expired while we could not refresh it).
fn lease_gone(e: &crate::dcs::DcsError) -> bool {
    e.to_string().contains("lease not found")
}

/// The lease is gone: keys attached to it (leader, member) were deleted by etcd. Forget it so
/// a new one is granted, and wake the loop to act on the loss.
fn lost(shared: &LeaseShared, id: i64) {
    tracing::warn!(
        lease = id,
        "the etcd lease expired; keys attached to it are gone"
    );
    shared.set_valid_until(None);
    shared.id.store(0, Ordering::SeqCst);
    shared.wake.notify_one();
}

/// What the fence acts on: in production the guard process and the postmaster
/// (`agent::guard::Guard`); in the simulation, its servers.
pub trait Fencer: Send {
    /// What runs as primary (0: nothing) and until when its lease holds, for the guard.
    fn guard(&mut self, pid: u32, lease_end: Option<Instant>);
    /// Stop the postmaster `pid` at once (immediate shutdown).
    fn quit(&mut self, pid: u32);
    /// Whether the process `pid` still exists.
    fn alive(&self, pid: u32) -> bool;
}

/// Stop a primary the moment its lease can no longer be trusted. Every change of what runs
/// as primary and of the lease also goes to the guard process (`agent::guard`), which acts
/// if this task cannot.
pub async fn fence(shared: Arc<LeaseShared>, mut guard: impl Fencer) {
    // The postmaster this task last sent SIGQUIT to: a stuck one (stopped, hung in the
    // kernel) never passes the signal on to its backends, which go on committing; the guard
    // keeps its deadline on it until it is gone.
    let mut fired: Option<u32> = None;
    loop {
        let pid = shared.primary_pid.load(Ordering::SeqCst);
        if fired.is_some_and(|f| pid != 0 || !guard.alive(f)) {
            fired = None;
        }
        guard.guard(
            if pid == 0 { fired.unwrap_or(0) } else { pid },
            shared.valid_until(),
        );
        let deadline = shared.deadline();
        let now = Instant::now();
        match (pid, deadline) {
            (0, _) => {
                // Not a primary: nothing to guard. Wake on any lease change.
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), shared.fence_wake.notified())
                        .await;
            }
            (pid, Some(d)) if now < d => {
                let _ = tokio::time::timeout(d - now, shared.fence_wake.notified()).await;
                let _ = pid;
            }
            (pid, _) => {
                tracing::error!(
                    pid,
                    "lease can no longer be trusted: stopping PostgreSQL now (immediate shutdown)"
                );
                guard.quit(pid);
                fired = Some(pid);
                shared.primary_pid.store(0, Ordering::SeqCst);
                shared.fenced.store(true, Ordering::SeqCst);
                shared.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_leaves_room_before_the_lease_ends() {
        for (ttl, loop_wait, retry) in [(5, 1, 2), (10, 2, 4), (30, 10, 10), (60, 10, 25)] {
            let t = Timing::new(ttl, loop_wait, retry);
            // Several refreshes fit between the last success and the fence.
            assert!(t.refresh_every * 3 <= t.ttl - t.margin, "{ttl}: {t:?}");
            assert!(t.call_timeout <= t.refresh_every.max(Duration::from_millis(500)));
            assert!(t.margin >= Duration::from_secs(1));
        }
    }
}
