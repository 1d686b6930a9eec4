//! The apply lock: one etcd key on a lease, so two pipelines never apply at once. The key
//! names its holder (user, host, CI job, since when); a second `apply` waits up to
//! `--lock-timeout` for it, then fails naming the holder; `force-unlock ID` removes a lock
//! whose holder died. An `apply` whose lease is lost stops before its next step.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::ReconcileError;
use crate::dcs::Dcs;
use crate::dcs::keys::ApplyLockHolder;

/// The lease's time to live: a holder that dies frees the lock this long after.
const LEASE_TTL_S: i64 = 30;

pub struct Lock {
    dcs: Dcs,
    lease: i64,
    keeper: tokio::task::JoinHandle<()>,
}

/// The holder in the lock key now, if any (unreadable content shows as such).
pub async fn holder(dcs: &Dcs) -> Result<Option<(ApplyLockHolder, Vec<u8>)>, ReconcileError> {
    let kv = dcs
        .get(&dcs.keys.apply_lock())
        .await
        .map_err(|e| ReconcileError::Lock(format!("cannot read the apply lock: {e}")))?;
    Ok(kv.map(|kv| {
        let h = serde_json::from_slice(&kv.value).unwrap_or_else(|_| ApplyLockHolder {
            user: "(unreadable lock content)".into(),
            ..Default::default()
        });
        (h, kv.value)
    }))
}

impl Lock {
    /// Take the lock, waiting up to `wait` for a holder to let go. `lost` is set when the
    /// lease cannot be kept: the caller checks it before each step.
    pub async fn take(
        dcs: &Dcs,
        wait: Duration,
        lost: Arc<AtomicBool>,
    ) -> Result<Lock, ReconcileError> {
        let key = dcs.keys.apply_lock();
        let started = Instant::now();
        let mut told = false;
        loop {
            let lease = dcs
                .grant(LEASE_TTL_S)
                .await
                .map_err(|e| ReconcileError::Lock(format!("cannot take the apply lock: {e}")))?;
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let me = ApplyLockHolder::new(
                |k| std::env::var(k).ok(),
                &host,
                std::process::id(),
                since,
                lease,
            );
            let body = serde_json::to_vec(&me).unwrap_or_default();
            let won = dcs
                .create(&key, &body, Some(lease))
                .await
                .map_err(|e| ReconcileError::Lock(e.to_string()))?;
            if won {
                lost.store(false, Ordering::SeqCst);
                let keeper = tokio::spawn(keep(dcs.clone(), lease, key.clone(), lost));
                return Ok(Lock {
                    dcs: dcs.clone(),
                    lease,
                    keeper,
                });
            }
            let _ = dcs.revoke(lease).await;
            let current = holder(dcs)
                .await?
                .map(|(h, _)| h.describe())
                .unwrap_or_else(|| "a holder that just let go".into());
            if started.elapsed() >= wait {
                return Err(ReconcileError::Lock(format!(
                    "another apply holds the lock: {current}{}; try again when it is done, or, if that apply is dead, `citus-reconcile force-unlock SPEC ID` (the lock also frees itself {LEASE_TTL_S} s after its holder dies)",
                    if wait.is_zero() {
                        String::new()
                    } else {
                        format!(" (waited {} s, --lock-timeout)", wait.as_secs())
                    }
                )));
            }
            if !told {
                eprintln!("Waiting for the apply lock, held by {current}");
                told = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    pub async fn release(self) {
        self.keeper.abort();
        let _ = self.dcs.revoke(self.lease).await;
    }
}

/// Keep the lease alive; flag it lost when it expired or could not be refreshed for longer
/// than its time to live (someone may hold the lock by now).
async fn keep(dcs: Dcs, lease: i64, key: String, lost: Arc<AtomicBool>) {
    let mut last_ok = Instant::now();
    let ttl = Duration::from_secs(LEASE_TTL_S as u64);
    let mut refresher = dcs.keeper(lease, &key).await.ok();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let ttl_left = match refresher.as_mut() {
            Some(r) => r.refresh(Duration::from_secs(5)).await.ok(),
            None => None,
        };
        match ttl_left {
            Some(t) if t > 0 => last_ok = Instant::now(),
            Some(_) => {
                // Expired: etcd may have given the key to someone else.
                lost.store(true, Ordering::SeqCst);
                return;
            }
            None => {
                refresher = dcs.keeper(lease, &key).await.ok();
                if last_ok.elapsed() >= ttl {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

/// Remove the lock if its id is `id` (a holder that died); says whose it was.
pub async fn force_unlock(dcs: &Dcs, id: &str) -> Result<String, ReconcileError> {
    let Some((h, body)) = holder(dcs).await? else {
        return Err(ReconcileError::Lock("the apply lock is not held".into()));
    };
    if h.id != id {
        return Err(ReconcileError::Lock(format!(
            "the apply lock is held by {} — not lock id {id}; nothing removed",
            h.describe()
        )));
    }
    let removed = dcs
        .delete_if(&dcs.keys.apply_lock(), &body)
        .await
        .map_err(|e| ReconcileError::Lock(e.to_string()))?;
    if !removed {
        return Err(ReconcileError::Lock(
            "the apply lock changed meanwhile; nothing removed".into(),
        ));
    }
    Ok(h.describe())
}
