//! The coordinator primary's write pauses (see `citus::pause` for the rules): a task of its
//! own beside the agent's loop, so a pause opens and ends the moment etcd says so — never a
//! loop cycle later, never behind a slow action of the loop.
//!
//! It runs only while this agent leads the coordinator group with PostgreSQL running as
//! primary (`PauseShared::active`, set by the loop). While it holds a group, the loop's
//! `pg_dist_node` sync leaves that group's rows alone (`PauseShared::held`): the pause
//! session moves the row itself, inside the transaction that holds the writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::Client;

use super::config::AgentConfig;
use crate::citus::metadata::{self, NodeChange, NodeRow};
use crate::citus::pause::{self, Facts, Leader, OpenPause, Row, Settings, Step, Trigger};
use crate::citus::sql::{PauseOptions, PauseSession, UpdateOptions};
use crate::dcs::Dcs;
use crate::dcs::keys::{CitusPause, GroupState, PauseState};
use crate::postgres::sql;

/// What the pauser shares with the agent's loop.
#[derive(Default)]
pub struct PauseShared {
    /// This agent leads the coordinator group and its PostgreSQL runs as primary.
    pub active: AtomicBool,
    /// Worker groups whose row a pause holds now.
    pub held: Mutex<BTreeSet<u32>>,
    /// Wakes the pauser (etcd watch events, a change of `active`).
    pub wake: Notify,
    /// A configuration with new secrets, for the probes (they log in with the superuser's).
    new_config: Mutex<Option<AgentConfig>>,
}

impl PauseShared {
    pub fn held(&self) -> BTreeSet<u32> {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }

    fn set_held(&self, groups: BTreeSet<u32>) {
        if let Ok(mut h) = self.held.lock() {
            *h = groups;
        }
    }

    /// The agent reloaded new secrets.
    pub fn set_config(&self, cfg: AgentConfig) {
        if let Ok(mut c) = self.new_config.lock() {
            *c = Some(cfg);
        }
        self.wake.notify_one();
    }

    /// Called by the loop after each observation.
    pub fn set_active(&self, active: bool) {
        if self.active.swap(active, Ordering::SeqCst) != active {
            self.wake.notify_one();
        }
    }
}

/// How often an open pause re-checks its deadline when nothing else wakes it.
const OPEN_TICK: Duration = Duration::from_millis(50);

/// `pause_on_loss`: how often the coordinator probes each worker primary, how long one probe
/// may take, and how many failures in a row are a loss (about 0.3–0.5 s to detect).
const PROBE_EVERY: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_millis(150);
const LOSS_AFTER: u32 = 3;

/// What the probes of one worker primary found.
#[derive(Debug, Clone, Default)]
struct ProbeResult {
    failures: u32,
    /// The last answer: true when the server answered as a primary.
    primary: Option<bool>,
}

type ProbeResults = Arc<Mutex<BTreeMap<(String, u16), ProbeResult>>>;

/// Probe one worker primary until aborted: one connection kept open, `pg_is_in_recovery()`
/// every `PROBE_EVERY`, each attempt bounded by `PROBE_TIMEOUT` (a silent host answers
/// nothing, not even a reset). Wakes the pauser when a loss starts or ends.
async fn probe(
    cfg: Arc<Mutex<AgentConfig>>,
    target: (String, u16),
    results: ProbeResults,
    wake: Arc<PauseShared>,
) {
    let mut conn: Option<Client> = None;
    loop {
        let started = Instant::now();
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            let current = cfg.lock().map(|c| c.clone()).ok();
            conn = match current {
                Some(c) => sql::connect_member(&c, &target.0, target.1, PROBE_TIMEOUT)
                    .await
                    .ok(),
                None => None,
            };
        }
        let answer = match conn.as_ref() {
            Some(c) => sql::bounded(
                "probe",
                PROBE_TIMEOUT,
                c.query_one("SELECT pg_is_in_recovery()", &[]),
            )
            .await
            .map(|r| !r.get::<_, bool>(0))
            .ok(),
            None => None,
        };
        if answer.is_none() {
            conn = None;
        }
        let notify = {
            let Ok(mut all) = results.lock() else { return };
            let r = all.entry(target.clone()).or_default();
            let before = r.failures >= LOSS_AFTER;
            match answer {
                Some(primary) => {
                    r.failures = 0;
                    r.primary = Some(primary);
                }
                None => r.failures = r.failures.saturating_add(1),
            }
            before != (r.failures >= LOSS_AFTER)
        };
        if notify {
            wake.wake.notify_one();
        }
        tokio::time::sleep(PROBE_EVERY.saturating_sub(started.elapsed())).await;
    }
}

/// One group's pause: its lock request still waiting, or held.
struct Slot {
    pause: OpenPause,
    session: Session,
    /// The leader asked for this pause: tell it once the lock is held (or refused).
    acknowledge: bool,
}

enum Session {
    /// Waiting for the group's locks (writes arriving now queue behind the request).
    Opening(tokio::task::JoinHandle<Result<PauseSession, String>>),
    Held(PauseSession),
}

/// Milliseconds since the pauser started: the pure rules compare deadlines in these.
fn now_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

pub async fn run(mut cfg: AgentConfig, dcs: Dcs, shared: Arc<PauseShared>) {
    let epoch = Instant::now();
    let t = Duration::from_secs(u64::from(cfg.ha.retry_timeout.max(1)));
    let settings = Settings {
        pause_timeout_ms: u64::from(cfg.citus.pause_timeout) * 1000,
        pause_on_loss: cfg.citus.pause_on_loss,
        loss_after: LOSS_AFTER,
    };
    let idle = Duration::from_secs(u64::from(cfg.ha.loop_wait.max(1)));
    let mut slots: BTreeMap<u32, Slot> = BTreeMap::new();
    let mut control: Option<Client> = None;
    let mut cluster: BTreeMap<u32, GroupState> = BTreeMap::new();
    let results: ProbeResults = Arc::default();
    let mut probes: BTreeMap<(String, u16), tokio::task::JoinHandle<()>> = BTreeMap::new();
    let probe_cfg = Arc::new(Mutex::new(cfg.clone()));
    loop {
        let pause = if slots.is_empty() { idle } else { OPEN_TICK };
        let _ = tokio::time::timeout(pause, shared.wake.notified()).await;
        if let Some(new) = shared.new_config.lock().ok().and_then(|mut c| c.take()) {
            // Probes keep their connections and log in with the new password when they
            // reconnect: a reconnect racing the workers' own change could look like a loss.
            if let Ok(mut c) = probe_cfg.lock() {
                *c = new.clone();
            }
            cfg = new;
        }

        if !shared.active.load(Ordering::SeqCst) {
            if !slots.is_empty() {
                tracing::warn!(groups = ?slots.keys().collect::<Vec<_>>(), "no longer the coordinator primary: write pauses dropped");
                // Dropping the sessions ends their transactions (and lock requests).
                for (_, slot) in std::mem::take(&mut slots) {
                    if let Session::Opening(task) = slot.session {
                        task.abort();
                    }
                }
                shared.set_held(BTreeSet::new());
            }
            control = None;
            for (_, task) in std::mem::take(&mut probes) {
                task.abort();
            }
            continue;
        }
        collect_opened(&mut slots, &dcs, &cluster, &cfg).await;
        if control.as_ref().is_none_or(|c| c.is_closed()) {
            control = sql::connect_local(&cfg, &cfg.citus.database, t).await.ok();
        }
        // etcd unreachable: keep what is held on the last view; deadlines still apply.
        if let Ok((kvs, _)) = dcs.read_cluster().await {
            cluster = crate::dcs::keys::parse_cluster(&dcs.keys, &kvs);
        }
        let rows = match control.as_ref() {
            Some(c) => crate::citus::sql::nodes(c, t)
                .await
                .map_err(|e| e.to_string()),
            None => Err("no connection".into()),
        };
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read pg_dist_node");
                expire_due(&mut slots, epoch, t).await;
                shared.set_held(slots.keys().copied().collect());
                continue;
            }
        };
        if settings.pause_on_loss {
            keep_probes(&probe_cfg, &rows, &mut probes, &results, &shared);
        }
        let groups: BTreeSet<u32> = cluster
            .keys()
            .copied()
            .chain(slots.keys().copied())
            .filter(|g| *g != 0)
            .collect();
        for g in groups {
            let state = cluster.get(&g).cloned().unwrap_or_default();
            let mut facts = facts_for(g, &state, &rows, now_ms(epoch));
            if let Some(row) = &facts.row {
                let found = results
                    .lock()
                    .ok()
                    .and_then(|r| r.get(&(row.host.clone(), row.port)).cloned());
                if let Some(found) = found {
                    facts.probe_failures = found.failures;
                    facts.probe_primary = found.primary;
                }
            }
            let steps = pause::next(slots.get_mut(&g).map(|s| &mut s.pause), &facts, &settings);
            for step in steps {
                execute(
                    step, g, &facts, &state, &rows, &cfg, &dcs, &mut slots, &settings, &shared,
                    epoch, t,
                )
                .await;
            }
        }
        shared.set_held(slots.keys().copied().collect());
    }
}

/// Pauses whose lock request finished: held now, or failed. The leader that asked is told.
async fn collect_opened(
    slots: &mut BTreeMap<u32, Slot>,
    dcs: &Dcs,
    cluster: &BTreeMap<u32, GroupState>,
    cfg: &AgentConfig,
) {
    let done: Vec<u32> = slots
        .iter()
        .filter(|(_, s)| matches!(&s.session, Session::Opening(t) if t.is_finished()))
        .map(|(g, _)| *g)
        .collect();
    for g in done {
        let Some(slot) = slots.remove(&g) else {
            continue;
        };
        let Session::Opening(task) = slot.session else {
            continue;
        };
        let request = cluster.get(&g).and_then(|s| s.citus_pause.clone());
        let key = dcs.keys.citus_pause(g);
        match task.await.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(session) => {
                tracing::info!(
                    group = g,
                    trigger = ?slot.pause.trigger,
                    shards = session.shards,
                    "paused the group's writes"
                );
                if slot.acknowledge {
                    answer(dcs, &key, request.as_ref(), PauseState::Paused, None, cfg).await;
                }
                slots.insert(
                    g,
                    Slot {
                        session: Session::Held(session),
                        acknowledge: false,
                        ..slot
                    },
                );
            }
            Err(e) => {
                tracing::warn!(group = g, error = %e, "cannot pause the group's writes");
                if slot.acknowledge {
                    answer(
                        dcs,
                        &key,
                        request.as_ref(),
                        PauseState::Refused,
                        Some(e),
                        cfg,
                    )
                    .await;
                }
            }
        }
    }
}

/// One probe task per worker primary named in pg_dist_node (`pause_on_loss`).
fn keep_probes(
    cfg: &Arc<Mutex<AgentConfig>>,
    rows: &[NodeRow],
    probes: &mut BTreeMap<(String, u16), tokio::task::JoinHandle<()>>,
    results: &ProbeResults,
    shared: &Arc<PauseShared>,
) {
    let targets: BTreeSet<(String, u16)> = rows
        .iter()
        .filter(|r| r.groupid > 0 && r.noderole == "primary")
        .map(|r| {
            (
                r.nodename.clone(),
                r.nodeport.clamp(0, i32::from(u16::MAX)) as u16,
            )
        })
        .collect();
    probes.retain(|t, task| {
        let keep = targets.contains(t);
        if !keep {
            task.abort();
        }
        keep
    });
    if let Ok(mut r) = results.lock() {
        r.retain(|t, _| targets.contains(t));
    }
    for target in targets {
        probes.entry(target.clone()).or_insert_with(|| {
            tokio::spawn(probe(cfg.clone(), target, results.clone(), shared.clone()))
        });
    }
}

async fn expire_due(slots: &mut BTreeMap<u32, Slot>, epoch: Instant, t: Duration) {
    let now = now_ms(epoch);
    let due: Vec<u32> = slots
        .iter()
        .filter(|(_, s)| now >= s.pause.deadline_ms)
        .map(|(g, _)| *g)
        .collect();
    for g in due {
        if let Some(slot) = slots.remove(&g) {
            tracing::warn!(group = g, "write pause expired; rolled back");
            end(slot, t).await;
        }
    }
}

/// Roll a pause back: a held one explicitly, a waiting request by dropping its connection (the
/// server's lock_timeout bounds it in any case).
async fn end(slot: Slot, t: Duration) {
    match slot.session {
        Session::Held(s) => s.abandon(t).await,
        Session::Opening(task) => task.abort(),
    }
}

/// What the pure rules need about group `g`.
fn facts_for(g: u32, state: &GroupState, rows: &[NodeRow], now_ms: u64) -> Facts {
    let leader = state.leader.as_ref().map(|l| Leader {
        name: l.name.clone(),
        revision: l.mod_revision,
        primary_at: state
            .members
            .get(&l.name)
            .filter(|m| m.is_running_primary() && !m.host.is_empty())
            .map(|m| (m.host.clone(), m.port)),
    });
    let row = rows
        .iter()
        .find(|r| r.groupid == g as i32 && r.noderole == "primary")
        .map(|r| Row {
            nodeid: r.nodeid,
            host: r.nodename.clone(),
            port: r.nodeport.clamp(0, i32::from(u16::MAX)) as u16,
        });
    Facts {
        now_ms,
        request: state.citus_pause.clone(),
        leader,
        row,
        probe_failures: 0,
        probe_primary: None,
    }
}

#[allow(clippy::too_many_arguments)]
async fn execute(
    step: Step,
    g: u32,
    facts: &Facts,
    state: &GroupState,
    rows: &[NodeRow],
    cfg: &AgentConfig,
    dcs: &Dcs,
    slots: &mut BTreeMap<u32, Slot>,
    settings: &Settings,
    shared: &Arc<PauseShared>,
    epoch: Instant,
    t: Duration,
) {
    let key = dcs.keys.citus_pause(g);
    match step {
        Step::Open {
            trigger,
            nodeid,
            from,
            leader_at_open,
        } => {
            let now = now_ms(epoch);
            let pause = OpenPause {
                trigger,
                nodeid,
                from,
                opened_ms: now,
                deadline_ms: now + settings.pause_timeout_ms,
                leader_at_open,
                handover_seen: trigger == Trigger::Loss,
            };
            let deadline = Duration::from_millis(settings.pause_timeout_ms);
            let options = PauseOptions {
                terminate_after: match trigger {
                    Trigger::Switchover => {
                        Some(Duration::from_millis(u64::from(cfg.citus.lock_cooldown_ms)))
                    }
                    Trigger::Loss => None,
                },
                lock_wait: match trigger {
                    // The leader waits for the answer about as long.
                    Trigger::Switchover => {
                        Duration::from_millis(u64::from(cfg.citus.lock_cooldown_ms)) + t
                    }
                    Trigger::Loss => deadline,
                },
                // The server's own deadline, a little after ours: it only acts when this
                // agent cannot (frozen, cut off).
                server_deadline: deadline + Duration::from_secs(2),
            };
            let cfg = cfg.clone();
            let task = tokio::spawn(async move {
                let session = sql::connect_local(&cfg, &cfg.citus.database, t)
                    .await
                    .map_err(|e| e.to_string())?;
                let control = match options.terminate_after {
                    Some(_) => sql::connect_local(&cfg, &cfg.citus.database, t).await.ok(),
                    None => None,
                };
                crate::citus::sql::open_pause(session, control, g, options, t)
                    .await
                    .map_err(|e| e.to_string())
            });
            slots.insert(
                g,
                Slot {
                    pause,
                    session: Session::Opening(task),
                    acknowledge: false,
                },
            );
            // From now on the loop's row sync leaves this group to the pause.
            shared.set_held(slots.keys().copied().collect());
            tracing::info!(group = g, ?trigger, "pausing the group's writes");
        }
        Step::Acknowledge => match slots.get_mut(&g) {
            Some(Slot {
                session: Session::Held(_),
                ..
            }) => {
                answer(
                    dcs,
                    &key,
                    facts.request.as_ref(),
                    PauseState::Paused,
                    None,
                    cfg,
                )
                .await
            }
            Some(slot) => slot.acknowledge = true,
            None => {}
        },
        Step::Refuse(why) => {
            tracing::info!(group = g, reason = %why, "switchover without a write pause");
            answer(
                dcs,
                &key,
                facts.request.as_ref(),
                PauseState::Refused,
                Some(why),
                cfg,
            )
            .await;
        }
        Step::Release { to } => {
            // A lock request still waiting cannot move the row: wait for it (the deadline
            // bounds that).
            if !matches!(slots.get(&g).map(|s| &s.session), Some(Session::Held(_))) {
                return;
            }
            let Some(Slot {
                pause,
                session: Session::Held(session),
                ..
            }) = slots.remove(&g)
            else {
                return;
            };
            let updates = match &to {
                Some(addr) => release_updates(g, pause.nodeid, addr, state, rows, cfg),
                None => Vec::new(),
            };
            let held_ms = now_ms(epoch).saturating_sub(pause.opened_ms);
            // The pause holds the group's own shards already; what is left to lock are shards
            // shared with other groups (reference tables), briefly held by writes in flight.
            // `force` would start a helper worker per call: tens of milliseconds the writes
            // would wait for. After a loss, though, writes to reference tables may wait on the
            // lost server: those are failing anyway.
            let options = match pause.trigger {
                Trigger::Switchover => UpdateOptions {
                    force: false,
                    lock_cooldown_ms: cfg.citus.lock_cooldown_ms,
                },
                Trigger::Loss => UpdateOptions {
                    force: true,
                    lock_cooldown_ms: cfg.citus.lock_cooldown_ms.min(1000),
                },
            };
            let started = Instant::now();
            match session.release(&updates, options, t).await {
                Ok(()) => {
                    let commit_ms = started.elapsed().as_millis() as u64;
                    tracing::info!(group = g, to = ?to, held_ms, commit_ms, "released the group's writes");
                    spawn_recovery(cfg.clone(), t);
                }
                Err(e) => {
                    // Rolled back with the session: the loop's sync moves the row instead.
                    tracing::warn!(group = g, error = %e, held_ms, "could not move the group's row inside the pause");
                }
            }
        }
        Step::Expire => {
            if let Some(slot) = slots.remove(&g) {
                tracing::warn!(
                    group = g,
                    "write pause reached pause_timeout; rolled back (the row stays as it was)"
                );
                end(slot, t).await;
            }
        }
        Step::ClearRequest => {
            if let Err(e) = dcs.delete(&key).await {
                tracing::debug!(group = g, error = %e, "cannot delete the pause request");
            }
        }
    }
}

/// The row changes that move group `g`'s primary row (`nodeid`) to `to`, as the metadata
/// planner would make them (a secondary row holding that address makes way in the same
/// transaction).
fn release_updates(
    g: u32,
    nodeid: i32,
    to: &(String, u16),
    state: &GroupState,
    rows: &[NodeRow],
    cfg: &AgentConfig,
) -> Vec<metadata::RowUpdate> {
    let replicas = metadata::group_members(
        state.leader.as_ref().map(|l| l.name.as_str()),
        state.initialize.as_deref(),
        &state.members,
    )
    .map(|m| m.replicas)
    .unwrap_or_default();
    let members = metadata::GroupMembers {
        leader: Some(to.clone()),
        replicas,
    };
    let desired = metadata::desired_nodes(&BTreeMap::from([(g, members)]), cfg.citus.secondaries);
    let known: Vec<u32> = rows
        .iter()
        .filter(|r| r.groupid >= 0)
        .map(|r| r.groupid as u32)
        .collect();
    metadata::diff_nodes(&desired, rows, &known)
        .into_iter()
        .find_map(|c| match c {
            NodeChange::Update { group, rows }
                if group == g && rows.iter().any(|u| u.nodeid == nodeid) =>
            {
                Some(rows)
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// Write the coordinator's answer into the request key, if it still holds the same request.
async fn answer(
    dcs: &Dcs,
    key: &str,
    request: Option<&CitusPause>,
    state: PauseState,
    detail: Option<String>,
    cfg: &AgentConfig,
) {
    let Some(request) = request.filter(|r| r.state == PauseState::Requested) else {
        return;
    };
    let Ok(expected) = serde_json::to_vec(request) else {
        return;
    };
    let reply = CitusPause {
        state,
        coordinator: Some(cfg.member.clone()),
        detail,
        ..request.clone()
    };
    let Ok(body) = serde_json::to_vec(&reply) else {
        return;
    };
    // Same lease as the request's: if the leader's agent dies, the whole exchange goes.
    let lease = dcs
        .get(key)
        .await
        .ok()
        .flatten()
        .map(|kv| kv.lease)
        .filter(|l| *l != 0);
    if let Err(e) = dcs.replace(key, &expected, &body, lease).await {
        tracing::warn!(error = %e, "cannot answer the pause request");
    }
}

/// Two-phase transactions the stopped primary had prepared would keep their rows locked on the
/// new primary until Citus's own recovery, up to a minute later: resolve them now, off the
/// pauser's path.
fn spawn_recovery(cfg: AgentConfig, t: Duration) {
    tokio::spawn(async move {
        let bound = t * 3;
        let Ok(c) = sql::connect_local(&cfg, &cfg.citus.database, t).await else {
            return;
        };
        match crate::citus::sql::recover_prepared_transactions(&c, bound).await {
            Ok(n) if n > 0 => tracing::info!(recovered = n, "resolved prepared transactions"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "recover_prepared_transactions failed"),
        }
    });
}
