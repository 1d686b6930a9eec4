//! Asking a group for a switchover or failover: write Patroni's `failover` key (only if none
//! is pending) and wait until the new leader runs. Shared by the CLI and the agent's REST API.

use std::time::Duration;

use tokio::time::Instant;

use super::Dcs;
use super::keys::{FailoverRequest, GroupState, parse_cluster};

pub async fn group_state(dcs: &Dcs, group: u32) -> Result<GroupState, String> {
    let (kvs, _) = dcs.read_cluster().await.map_err(|e| e.to_string())?;
    Ok(parse_cluster(&dcs.keys, &kvs)
        .remove(&group)
        .unwrap_or_default())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new leader runs; how long it took from the request.
    Done {
        leader: String,
        after: Duration,
    },
    Scheduled,
}

/// Write the request, then wait (bounded) for `candidate` — or any new leader when None —
/// to run as primary. On timeout the request is withdrawn.
pub async fn request(
    dcs: &Dcs,
    group: u32,
    req: &FailoverRequest,
    candidate: Option<&str>,
    timeout: Duration,
) -> Result<Outcome, String> {
    let key = dcs.keys.failover(group);
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let started = Instant::now();
    // A request that is not scheduled lives on a lease a little longer than the wait: if
    // this process dies, or the candidate never promotes, it expires instead of holding
    // the group's switchovers and failovers back for ever.
    let lease = match req.scheduled_at {
        Some(_) => None,
        None => Some(
            dcs.grant(timeout.as_secs() as i64 + 30)
                .await
                .map_err(|e| e.to_string())?,
        ),
    };
    if !dcs
        .create(&key, &body, lease)
        .await
        .map_err(|e| e.to_string())?
    {
        return Err(format!(
            "another switchover or failover is pending for group {group}"
        ));
    }
    if req.scheduled_at.is_some() {
        return Ok(Outcome::Scheduled);
    }
    loop {
        let g = group_state(dcs, group).await?;
        let leader = g.leader.map(|l| l.name);
        let running = leader
            .as_ref()
            .and_then(|l| g.members.get(l))
            .is_some_and(|m| m.is_running_primary());
        let done = match candidate {
            Some(c) => leader.as_deref() == Some(c) && running,
            None => leader.is_some() && running && leader.as_deref() != req.leader.as_deref(),
        };
        if done {
            return Ok(Outcome::Done {
                leader: leader.unwrap_or_default(),
                after: started.elapsed(),
            });
        }
        // Gone while the old leader still leads: that leader refused the request (a
        // candidate that is not eligible, say), or an operator withdrew it. Waiting on would
        // only run into the timeout.
        let requested = g.failover_raw.as_deref() == Some(body.as_slice());
        if !requested
            && req.leader.is_some()
            && leader.as_deref() == req.leader.as_deref()
            && running
        {
            return Err(format!(
                "group {group}: its leader {} dropped the request without handing over (its agent log says why)",
                leader.unwrap_or_default()
            ));
        }
        if started.elapsed() > timeout {
            let _ = dcs.delete_if(&key, &body).await;
            return Err(format!(
                "group {group} has no new leader after {}s; the request was withdrawn",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
