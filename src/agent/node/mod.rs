//! One member at work: reads the local server and the group's keys into a `Snapshot`
//! (`observe`), runs the actions `decide` picks (here, with the switchover in `switchover`,
//! replication duties in `replication`, Citus's in `citus` and PgBouncer's in `pooler`), and
//! publishes the member key.
//! All I/O of the agent's loop is in this module and its children.

mod citus;
pub mod host;
mod observe;
mod pooler;
mod replication;
mod switchover;

pub use citus::group_members;
pub use host::{Host, LocalHost, Process};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::config::{AgentConfig, Paths};
use super::decide::{self, Action, DataDir, Dcs as DcsView, GroupView, Running, Server, Snapshot};
use super::lease::LeaseShared;
use super::slots;
use crate::citus::metadata::{self, GroupMembers};
use crate::dcs::{Dcs, GroupState, MemberInfo, Status};
use crate::postgres::conf::{Role, member_slot_name};
use crate::postgres::process::StopMode;
use crate::postgres::sql;
use crate::postgres::timeline::{self, Line, Verdict};

/// What the member is doing, as published in its member key.
fn state_label(server: &Server, busy: Option<&str>) -> (String, String) {
    use crate::dcs::{MemberRole as R, MemberState as S};
    let (role, state) = match server {
        _ if busy.is_some() => (R::Uninitialized, S::Other),
        Server::Stopped => (R::Uninitialized, S::Stopped),
        Server::Starting => (R::Replica, S::Starting),
        Server::Running(r) if r.primary => (R::Primary, S::Running),
        Server::Running(r) if r.streaming => (R::Replica, S::Streaming),
        Server::Running(_) => (R::Replica, S::Running),
    };
    let state = busy.unwrap_or(state.as_str());
    (role.as_str().to_string(), state.to_string())
}

pub struct Node<H: Host = LocalHost> {
    pub cfg: AgentConfig,
    /// SHA-256 of the configuration file as loaded (see `run::load_config_with_sha`).
    pub config_sha256: String,
    /// A reloaded configuration with parameters waiting for a restart: its checksum becomes
    /// `config_sha256` once PostgreSQL restarted.
    pub pending_config_sha256: Option<String>,
    /// The server: files, programs, the postmaster, SQL (`host`).
    pub pg: H,
    pub dcs: Dcs,
    pub lease: Arc<LeaseShared>,
    pub postmaster: Option<H::Postmaster>,
    /// The member this server was configured to follow.
    upstream: Option<String>,
    setup_done: bool,
    /// What `distrust_etcd` last logged (logged again only when it changes).
    untrusted_said: Vec<String>,
    give_up_leading: bool,
    /// When the current attempt to run as leader started (for "restart in place if quick").
    leader_start: Option<Instant>,
    not_streaming_since: Option<Instant>,
    busy: Option<String>,
    /// What the member key holds, and on which lease.
    last_published: Option<(MemberInfo, i64)>,
    /// Member-key writes so far (`/metrics`).
    pub member_writes: u64,
    last_optime: Option<(u64, Instant)>,
    /// Member slots while leading (see `agent::slots`): when each member last had a key (ms
    /// since `started`).
    slots_seen: BTreeMap<String, u64>,
    started: Instant,
    /// All groups as last read (the coordinator needs every leader).
    pub cluster: BTreeMap<u32, GroupState>,
    pub last_snapshot: Option<Snapshot>,
    pub last_actions: Vec<Action>,
    pub leader_changes: u64,
    pub last_probe: Option<sql::Probe>,
    /// Set when this member stopped as primary to hand over; cleared once it runs again.
    clean_handoff: bool,
    /// See `Snapshot::bootstrapped_here`.
    bootstrapped_here: Option<String>,
    /// synchronous_standby_names in force on this primary, when it changed, and the WAL
    /// position captured a moment after (see `agent::sync`).
    ssn: String,
    ssn_changed: Option<Instant>,
    ssn_since_lsn: Option<u64>,
    /// Consecutive failed starts as a replica.
    replica_start_failures: u32,
    /// The leader those failed starts were to follow (a count under another leader, or with
    /// none, says nothing about this one).
    start_failures_under: Option<String>,
    /// pg_rewind from this member failed (see `Snapshot::rewind_failed_from`); cleared by
    /// any start that works and by setting the data aside.
    rewind_failed_from: Option<String>,
    /// Since when a switchover or failover request has been pending with nobody leading
    /// (`Snapshot::handoff_overdue`), and which request (the `failover` key's bytes; None:
    /// the one this member just acted on, whatever its bytes): a new request starts anew.
    unled_request: Option<(Option<Vec<u8>>, Instant)>,
    /// The coordinator's write pauses (coordinator members only).
    pub pauses: Option<Arc<super::citus_pause::PauseShared>>,
    /// PgBouncer in front of this worker (`citus.pooler`).
    pooler: pooler::PoolerState,
    /// What the guard process reports (its watchdog device above all).
    pub guard: Arc<super::guard::GuardState>,
    /// Operator requests from the REST API, run at the start of the next cycle.
    pub requests: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Request>>>,
}

/// What the REST API asks the loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Restart PostgreSQL in place (same role).
    Restart,
    /// Throw this replica's data away and clone it again.
    Reinit,
}

fn call_timeout(cfg: &AgentConfig) -> Duration {
    Duration::from_secs(u64::from(cfg.ha.retry_timeout.max(1)))
}

impl<H: Host> Node<H> {
    pub fn new(cfg: AgentConfig, pg: H, dcs: Dcs, lease: Arc<LeaseShared>) -> Node<H> {
        let bootstrapped_here = pg.bootstrapped_here();
        Node {
            cfg,
            config_sha256: String::new(),
            pending_config_sha256: None,
            pg,
            dcs,
            lease,
            postmaster: None,
            upstream: None,
            setup_done: false,
            untrusted_said: Vec::new(),
            give_up_leading: false,
            leader_start: None,
            not_streaming_since: None,
            busy: None,
            last_published: None,
            member_writes: 0,
            last_optime: None,
            slots_seen: BTreeMap::new(),
            started: Instant::now(),
            cluster: BTreeMap::new(),
            last_snapshot: None,
            last_actions: Vec::new(),
            leader_changes: 0,
            last_probe: None,
            clean_handoff: false,
            bootstrapped_here,
            unled_request: None,
            ssn: String::new(),
            ssn_changed: None,
            ssn_since_lsn: None,
            replica_start_failures: 0,
            start_failures_under: None,
            rewind_failed_from: None,
            pauses: None,
            pooler: Default::default(),
            guard: Default::default(),
            requests: Default::default(),
        }
    }

    fn timeout(&self) -> Duration {
        call_timeout(&self.cfg)
    }

    fn keys(&self) -> &crate::dcs::ClusterKeys {
        &self.dcs.keys
    }

    /// One cycle: operator requests, observe, decide, execute. False when an action failed.
    pub async fn tick(&mut self) -> bool {
        loop {
            let next = self.requests.lock().ok().and_then(|mut q| q.pop_front());
            let Some(r) = next else { break };
            if let Err(e) = self.handle_request(&r).await {
                tracing::warn!(request = ?r, error = %e, "request failed");
            }
        }
        let snapshot = self.observe().await;
        if let Some(p) = &self.pauses {
            p.set_active(coordinator_primary(&snapshot));
        }
        let actions = decide::decide(&snapshot);
        if actions != self.last_actions {
            tracing::info!(actions = ?actions, "decided");
        }
        self.last_actions = actions.clone();
        self.last_snapshot = Some(snapshot.clone());
        let mut ok = true;
        for action in actions {
            let label = format!("{action:?}");
            let changes_server = changes_server(&action);
            match self.execute(action, &snapshot).await {
                Ok(true) => {
                    if changes_server {
                        // Publish what the server is now, before the cycle's other actions: the
                        // coordinator ends a switchover's write pause the moment the new
                        // primary's key says it runs as one.
                        let server = self.observe_server().await;
                        if let Some(s) = self.last_snapshot.as_mut() {
                            s.server = server;
                        }
                        self.publish().await;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(action = %label, error = %e, "action failed");
                    ok = false;
                    break;
                }
            }
        }
        self.supervise_pooler().await;
        self.publish().await;
        ok
    }

    // ---------------------------------------------------------------- observation

    async fn handle_request(&mut self, r: &Request) -> Result<(), String> {
        match r {
            Request::Restart => {
                let primary = matches!(self.last_snapshot.as_ref().map(|s| &s.server), Some(Server::Running(x)) if x.primary);
                let role = if primary {
                    self.primary_role()
                } else {
                    let up = self.upstream.clone().and_then(|u| self.member_address(&u));
                    Role::Replica { upstream: up }
                };
                let upstream = self.upstream.clone();
                tracing::info!("restarting PostgreSQL on request");
                self.start(role, upstream).await?;
                if let Some(sha) = self.pending_config_sha256.take() {
                    self.config_sha256 = sha;
                }
                Ok(())
            }
            Request::Reinit => {
                let primary = matches!(self.last_snapshot.as_ref().map(|s| &s.server), Some(Server::Running(x)) if x.primary);
                if primary {
                    return Err("refusing to reinitialize the primary".into());
                }
                self.stop(StopMode::Fast).await;
                self.set_aside("reinit")?;
                self.forget_failed_starts();
                tracing::warn!(
                    "data directory set aside on request; the member will be cloned again"
                );
                Ok(())
            }
        }
    }

    // ---------------------------------------------------------------- actions

    /// Run one action. Ok(false) means "stop here this cycle" (a compare-and-set was lost).
    async fn execute(&mut self, action: Action, s: &Snapshot) -> Result<bool, String> {
        let t = self.timeout();
        let keys = self.keys().clone();
        let g = self.cfg.group;
        let me = self.cfg.member.clone();
        match action {
            Action::Wait(reason) => {
                tracing::debug!(%reason, "waiting");
                Ok(true)
            }
            Action::ClaimInitialize => {
                // The claim lives on our lease: only the lease id proves it is ours (every
                // member claims with the same empty value), and if we die while bootstrapping
                // it expires, so another member can try.
                let Some(lease) = self.lease.lease_id() else {
                    return Ok(false);
                };
                let won = self
                    .dcs
                    .create(&keys.initialize(g), b"", Some(lease))
                    .await
                    .map_err(|e| e.to_string())?;
                if won {
                    tracing::info!("won the initialize key: bootstrapping the group");
                }
                Ok(won)
            }
            Action::Initdb => {
                self.busy = Some("initializing new cluster".into());
                self.publish().await;
                let result = self.bootstrap_server().await;
                self.busy = None;
                if let Err(e) = &result {
                    // Let another member try: give back the initialize key.
                    let _ = self.dcs.delete_if(&keys.initialize(g), b"").await;
                    tracing::error!(error = %e, "bootstrap failed; released the initialize key");
                }
                result.map(|_| true)
            }
            Action::AcquireLeader => {
                let Some(lease) = self.lease.lease_id() else {
                    return Ok(false);
                };
                if !self.lease.valid() {
                    return Ok(false);
                }
                let won = self
                    .dcs
                    .create(&keys.leader(g), me.as_bytes(), Some(lease))
                    .await
                    .map_err(|e| e.to_string())?;
                if won {
                    tracing::info!("acquired the leader key");
                    self.leader_start = Some(Instant::now());
                } else {
                    tracing::info!("another member won the leader key");
                }
                Ok(won)
            }
            Action::ReclaimLeader => {
                let Some(lease) = self.lease.lease_id() else {
                    return Ok(false);
                };
                let me = self.cfg.member.clone();
                let won = self
                    .dcs
                    .replace(&keys.leader(g), me.as_bytes(), me.as_bytes(), Some(lease))
                    .await
                    .map_err(|e| e.to_string())?;
                if won {
                    tracing::info!("reclaimed the leader key left by a previous run of this agent");
                    self.leader_start = Some(Instant::now());
                }
                Ok(won)
            }
            Action::FinishBootstrap => {
                self.ensure_setup().await?;
                let sysid = self
                    .sysid()
                    .await
                    .ok_or("cannot read the system identifier")?;
                self.dcs
                    .put(&keys.initialize(g), sysid.as_bytes(), None)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(%sysid, "bootstrap complete");
                Ok(true)
            }
            Action::Clone { from } => {
                let (host, port) = self
                    .member_address(&from)
                    .ok_or(format!("no address published by {from}"))?;
                self.busy = Some("creating replica".into());
                self.publish().await;
                let result = async {
                    self.pg.prepare_host_files().map_err(|e| e.to_string())?;
                    self.pg
                        .basebackup(&host, port)
                        .await
                        .map_err(|e| e.to_string())?;
                    self.start(
                        Role::Replica {
                            upstream: Some((host.clone(), port)),
                        },
                        Some(from.clone()),
                    )
                    .await
                }
                .await;
                self.busy = None;
                result.map(|_| true)
            }
            Action::StartPrimary => {
                // A standby's data started as primary acknowledges commits too (see
                // `take_sync_key`).
                self.take_sync_key().await?;
                self.withdraw_old_handoff().await?;
                let role = self.primary_role();
                let started = self.start(role, None).await;
                let quick = self
                    .leader_start
                    .map(|t0| t0.elapsed() < self.lease.timing.ttl / 2)
                    .unwrap_or(true);
                if started.is_err() || !quick {
                    self.give_up_leading = true;
                }
                started.map(|_| true)
            }
            Action::StartReplica { upstream } => {
                let addr = upstream.as_ref().and_then(|u| self.member_address(u));
                if upstream.is_some() && addr.is_none() {
                    return Err(format!(
                        "no address published by {}",
                        upstream.unwrap_or_default()
                    ));
                }
                let leader = upstream.clone();
                if let Err(e) = self.start(Role::Replica { upstream: addr }, upstream).await {
                    // Counted for `decide`, which sets the data aside after a few in a row
                    // under the same live leader.
                    if let Some(l) = &leader {
                        if self.start_failures_under.as_ref() != Some(l) {
                            self.start_failures_under = Some(l.clone());
                            self.replica_start_failures = 0;
                        }
                        self.replica_start_failures += 1;
                    }
                    return Err(e);
                }
                self.drop_leftover_slots().await;
                if leader.is_some() {
                    // It runs as a standby of the new leader now: a later rejoin after being
                    // primary again must rewind.
                    self.clean_handoff = false;
                }
                Ok(true)
            }
            Action::Follow { upstream } => {
                let addr = self
                    .member_address(&upstream)
                    .ok_or(format!("no address published by {upstream}"))?;
                self.pg
                    .write_conf(&Role::Replica {
                        upstream: Some(addr),
                    })
                    .map_err(|e| e.to_string())?;
                self.pg.reload(t).await?;
                tracing::info!(%upstream, "following a new upstream");
                self.upstream = Some(upstream);
                // A new upstream gets its own time to start streaming.
                self.not_streaming_since = None;
                self.drop_leftover_slots().await;
                Ok(true)
            }
            Action::Promote => {
                if self.cfg.ha.use_slots {
                    // Slots made on the standby survive its promotion: the other members'
                    // WAL receivers find theirs at once, instead of failing on a missing slot
                    // and retrying after `wal_retrieve_retry_interval` (5 s).
                    if let Err(e) = self.manage_slots(s).await {
                        tracing::warn!(error = %e, "cannot prepare member slots before promoting");
                    }
                }
                if !self.pg.connected() {
                    return Err("not connected to PostgreSQL".into());
                }
                self.take_sync_key().await?;
                self.withdraw_old_handoff().await?;
                let current = match &s.server {
                    Server::Running(r) => r.timeline,
                    _ => return Err("PostgreSQL is not running".into()),
                };
                let reserved = self.reserve_timeline(current).await?;
                // Fenced before it can accept its first write: should the lease lapse during
                // the promotion, the fence and the guard stop it.
                let pid = self.postmaster.as_ref().map(|p| p.pid()).unwrap_or(0);
                self.lease.arm_fence(pid);
                let started = Instant::now();
                self.pg.promote(Duration::from_secs(60)).await?;
                match self.pg.probe(t).await.map(|p| p.timeline) {
                    Ok(tli) if tli != reserved => tracing::warn!(
                        timeline = tli,
                        reserved,
                        "promoted onto another timeline than the one reserved"
                    ),
                    _ => {}
                }
                let role = self.primary_role();
                self.pg.write_conf(&role).map_err(|e| e.to_string())?;
                let _ = self.pg.reload(t).await;
                self.upstream = None;
                self.setup_done = false;
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "promoted to primary"
                );
                Ok(true)
            }
            Action::Demote { immediate } => {
                self.stop(if immediate {
                    StopMode::Immediate
                } else {
                    StopMode::Fast
                })
                .await;
                if let DcsView::Available(v) = &s.dcs {
                    if v.leader.as_deref() == Some(me.as_str()) {
                        let _ = self.dcs.delete_if(&keys.leader(g), me.as_bytes()).await;
                    }
                }
                tracing::warn!(immediate, "demoted: PostgreSQL stopped");
                Ok(true)
            }
            Action::Rewind { from } => {
                let (host, port) = self
                    .member_address(&from)
                    .ok_or(format!("no address published by {from}"))?;
                // pg_rewind learns the source's timeline from its control file, which names the
                // new timeline only after the first checkpoint since promotion: before that it
                // finds "no rewind required" and the member can never follow. So checkpoint the
                // source first. A source we cannot reach is no reason to give up our data:
                // fail this cycle and try again.
                let t = self.timeout();
                let p = self
                    .pg
                    .probe_member(&host, port, t)
                    .await
                    .map_err(|e| format!("pg_rewind source {from}: {e}"))?;
                if p.in_recovery {
                    return Err(format!("pg_rewind source {from} is not a primary (yet)"));
                }
                self.pg
                    .checkpoint_member(&host, port, Duration::from_secs(600))
                    .await
                    .map_err(|e| format!("checkpoint on the pg_rewind source {from}: {e}"))?;
                self.busy = Some("rewinding".into());
                self.publish().await;
                let result = self.pg.rewind(&host, port).await;
                self.busy = None;
                match result {
                    Ok(()) => {
                        tracing::info!(%from, "pg_rewind done");
                        self.rewind_failed_from = None;
                        Ok(true)
                    }
                    Err(e) => {
                        // `decide` sets the data aside next cycle (against this leader only).
                        self.rewind_failed_from = Some(from);
                        Err(format!("pg_rewind failed: {e}"))
                    }
                }
            }
            Action::ReleaseLeader => {
                self.dcs
                    .delete_if(&keys.leader(g), me.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::warn!("released the leader key");
                Ok(true)
            }
            Action::EnsureSetup => self.ensure_setup().await.map(|_| true),
            Action::SyncCitus => self.sync_citus().await.map(|_| true),
            Action::SyncPoolinfo => {
                // Best effort, like the slots: a failure must not keep this cycle's other
                // duties (synchronous standbys, the status key) from running.
                if let Err(e) = self.sync_poolinfo().await {
                    tracing::warn!(error = %e, "cannot update pg_dist_poolinfo");
                }
                Ok(true)
            }
            Action::Switchover { to } => self.switchover(&to).await.map(|_| true),
            Action::ManageSync => self.manage_sync().await.map(|_| true),
            Action::ManageSlots => {
                // Best effort: a slot that cannot be made now is made next cycle, and must
                // not keep the status key (published next) from being written.
                if let Err(e) = self.manage_slots(s).await {
                    tracing::warn!(error = %e, "cannot manage member replication slots");
                }
                Ok(true)
            }
            Action::Reinit { cause, reason } => {
                tracing::error!(%reason, "setting the data directory aside; the member will be cloned again");
                self.stop(StopMode::Fast).await;
                self.set_aside(cause.tag())?;
                self.forget_failed_starts();
                Ok(false)
            }
            Action::ClearFailover { reason } => {
                tracing::info!(%reason, "clearing the failover key");
                // Only the request decided on: one written since is the operator's new word.
                let read = self.cluster.get(&g).and_then(|c| c.failover_raw.clone());
                match read {
                    Some(bytes) => self
                        .dcs
                        .delete_if(&keys.failover(g), &bytes)
                        .await
                        .map(drop),
                    None => self.dcs.delete(&keys.failover(g)).await,
                }
                .map_err(|e| e.to_string())?;
                self.unled_request = None;
                Ok(true)
            }
            Action::PublishOptime => {
                if let Server::Running(r) = &s.server {
                    let fresh = self.last_optime.as_ref().is_some_and(|(w, at)| {
                        *w == r.wal || at.elapsed() < Duration::from_millis(500)
                    });
                    if !fresh {
                        // Best effort: without it standbys only lose the re-clone shortcut.
                        let oldest_wal = self.pg.oldest_wal(self.timeout()).await;
                        let status = Status {
                            optime: r.wal,
                            oldest_wal,
                            handed_to: None,
                        };
                        let body = serde_json::to_vec(&status).unwrap_or_default();
                        self.dcs
                            .put(&keys.status(g), &body, None)
                            .await
                            .map_err(|e| e.to_string())?;
                        self.last_optime = Some((r.wal, Instant::now()));
                    }
                }
                Ok(true)
            }
        }
    }

    fn set_aside(&self, why: &str) -> Result<(), String> {
        self.pg.set_aside(why)
    }

    /// host and port a member published.
    fn member_address(&self, name: &str) -> Option<(String, u16)> {
        let m = self.cluster.get(&self.cfg.group)?.members.get(name)?;
        (!m.host.is_empty() && m.port != 0).then(|| (m.host.clone(), m.port))
    }

    async fn bootstrap_server(&mut self) -> Result<(), String> {
        self.pg.prepare_host_files().map_err(|e| e.to_string())?;
        self.pg.initdb().await.map_err(|e| e.to_string())?;
        // Remember which cluster this attempt made: should the bootstrap fail and another
        // member's succeed, `decide` recognises the leftovers (`Snapshot::bootstrapped_here`).
        if let Ok(Some(control)) = self.pg.controldata().await {
            if let Err(e) = self.pg.remember_bootstrap(&control.sysid) {
                tracing::warn!(error = %e, "cannot record which cluster this bootstrap made");
            }
            self.bootstrapped_here = Some(control.sysid);
        }
        let role = self.primary_role();
        self.start(role, None).await
    }

    /// Write the configuration for `role` and start the server; wait (bounded) until it accepts
    /// connections.
    async fn start(&mut self, role: Role, upstream: Option<String>) -> Result<(), String> {
        if self.postmaster.is_some() {
            self.stop(StopMode::Fast).await;
        }
        self.pg.write_conf(&role).map_err(|e| e.to_string())?;
        let primary = matches!(role, Role::Primary { .. });
        let pm = self.pg.start().map_err(|e| e.to_string())?;
        // A primary is fenced from its first moment: should the lease lapse before it is
        // ready, it must never accept a write.
        if primary {
            self.lease.arm_fence(pm.pid());
        }
        tracing::info!(pid = pm.pid(), ?role, "PostgreSQL started");
        self.postmaster = Some(pm);
        self.upstream = upstream;
        self.lease.fenced.store(false, Ordering::SeqCst);
        // A primary that does not come up in time gives leadership up (a standby takes
        // over); a replica only makes the loop wait.
        let limit = if primary {
            Duration::from_secs(u64::from(self.cfg.ha.primary_start_timeout))
        } else {
            Duration::from_secs(120)
        };
        let deadline = Instant::now() + limit;
        let mut published_at: Option<Instant> = None;
        loop {
            if !primary && published_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                // A standby waits here until it has replayed to a consistent point, which
                // may need WAL the leader keeps only in this member's slot, which the leader
                // makes only for members with a key. After its lease ran out (a frozen or
                // cut-off agent), that key is gone: publish it while waiting.
                self.busy = Some(crate::dcs::MemberState::Starting.as_str().to_string());
                self.publish_member(false).await;
                self.busy = None;
                published_at = Some(Instant::now());
            }
            if let Some(pm) = self.postmaster.as_mut() {
                if let Some(status) = pm.exited() {
                    self.postmaster = None;
                    return Err(format!(
                        "PostgreSQL exited during start ({status}); see {}",
                        Paths::new(&self.cfg.install_dir).postgres_log()
                    ));
                }
            }
            if matches!(
                self.pg.pid_file_status().as_deref(),
                Some("ready") | Some("standby")
            ) {
                break;
            }
            if Instant::now() > deadline {
                if primary {
                    // Never leave a half-started primary behind: stopped, the next cycle
                    // sees a leader without a server and releases the key. (A postmaster
                    // hung early in its start may have signals blocked: SIGKILL follows
                    // soon.)
                    self.lease.disarm_fence();
                    self.pg.disconnect();
                    if let Some(mut pm) = self.postmaster.take() {
                        pm.stop(StopMode::Immediate, Duration::from_secs(3)).await;
                    }
                    return Err(format!(
                        "PostgreSQL did not start as primary within primary_start_timeout ({}s); stopped it",
                        limit.as_secs()
                    ));
                }
                return Err(format!(
                    "PostgreSQL did not become ready within {}s",
                    limit.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t = self.timeout();
        self.pg.connect(t).await;
        // It runs: whatever failed before says nothing about this data any more.
        self.forget_failed_starts();
        self.reset_alter_system().await;
        if matches!(role, Role::Primary { .. }) {
            let pid = self.postmaster.as_ref().map(|p| p.pid()).unwrap_or(0);
            self.lease.arm_fence(pid);
        }
        Ok(())
    }

    pub async fn stop(&mut self, mode: StopMode) {
        self.pg.disconnect();
        if let Some(mut pm) = self.postmaster.take() {
            // Still fenced while it stops: a postmaster that does not stop (stuck, or its
            // backends busy) when the lease runs out is stopped by the fence and the guard.
            pm.stop(mode, Duration::from_secs(60)).await;
            tracing::info!(?mode, "PostgreSQL stopped");
        }
        self.lease.disarm_fence();
    }

    /// Failed starts and a failed rewind, which `decide` would set the data aside for.
    fn forget_failed_starts(&mut self) {
        self.replica_start_failures = 0;
        self.start_failures_under = None;
        self.rewind_failed_from = None;
    }

    /// Database, extension, roles, passwords and authinfo on this primary.
    async fn ensure_setup(&mut self) -> Result<(), String> {
        let t = self.timeout();
        let authinfo = metadata::authinfo_string(
            self.cfg
                .citus
                .authinfo_password
                .then_some(&self.cfg.postgres.superuser.password),
            self.cfg.citus.sslcert.as_deref(),
            self.cfg.citus.sslkey.as_deref(),
        );
        self.pg
            .ensure_setup(authinfo.as_ref().map(|a| a.expose()), t)
            .await?;
        // Also without a pooler: rows left from one go. Best effort (`plan` shows rows left).
        if let Err(e) = self.sync_poolinfo().await {
            tracing::warn!(error = %e, "cannot update pg_dist_poolinfo");
        }
        self.setup_done = true;
        Ok(())
    }

    // ---------------------------------------------------------------- publishing

    pub fn member_info(&self) -> MemberInfo {
        let server = self
            .last_snapshot
            .as_ref()
            .map(|s| s.server.clone())
            .unwrap_or(Server::Stopped);
        let (role, state) = state_label(&server, self.busy.as_deref());
        let (timeline, wal) = match &server {
            Server::Running(r) => (r.timeline, r.wal),
            _ => (0, 0),
        };
        let mut tags = BTreeMap::new();
        // A member that may not lead (its required watchdog is missing) tells the others not
        // to wait for it as the healthiest candidate.
        let cannot_lead = self
            .last_snapshot
            .as_ref()
            .is_some_and(|s| s.cannot_lead.is_some());
        if self.cfg.tags.nofailover || cannot_lead {
            tags.insert("nofailover".to_string(), serde_json::json!(true));
        }
        if self.cfg.tags.noloadbalance {
            tags.insert("noloadbalance".to_string(), serde_json::json!(true));
        }
        MemberInfo {
            conn_url: format!(
                "postgres://{}:{}/{}",
                self.cfg.address, self.cfg.postgres.port, self.cfg.citus.database
            ),
            api_url: format!(
                "{}://{}:{}/patroni",
                if self.cfg.api.tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                self.cfg.address,
                self.cfg.api.port
            ),
            state,
            role,
            timeline,
            xlog_location: wal,
            receive_lsn: self.last_probe.as_ref().and_then(|p| p.receive),
            tags,
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_sha256: self.config_sha256.clone(),
            pending_restart: match &server {
                Server::Running(_) => self
                    .last_probe
                    .as_ref()
                    .map(|p| p.pending_restart.clone())
                    .unwrap_or_default(),
                _ => Vec::new(),
            },
            host: self.cfg.address.clone(),
            port: self.cfg.postgres.port,
            upstream: self.upstream.clone().unwrap_or_default(),
            pooler_port: self.pooler_port(),
        }
    }

    /// Put the member key (on our lease) when it changed or has not been refreshed for a while.
    pub async fn publish(&mut self) {
        self.publish_member(true).await
    }

    /// Write the member key if it changed. With `recheck`, also when the last read of etcd
    /// did not show it (deleted by hand); without, that read is not fresh enough to say.
    async fn publish_member(&mut self, recheck: bool) {
        let Some(lease) = self.lease.lease_id() else {
            return;
        };
        let info = self.member_info();
        // etcd keeps every write until compaction and counts it against its quota: write only
        // what changed. The key lives on our lease, so it needs no refreshing; it is written
        // again when the lease changed or the last read did not show it (deleted by hand).
        let present = !recheck
            || self
                .cluster
                .get(&self.cfg.group)
                .is_some_and(|g| g.members.contains_key(&self.cfg.member));
        if let Some((last, last_lease)) = &self.last_published {
            if *last == info && *last_lease == lease && present {
                return;
            }
        }
        let body = serde_json::to_vec(&info).unwrap_or_default();
        let key = self.keys().member(self.cfg.group, &self.cfg.member);
        match self.dcs.put(&key, &body, Some(lease)).await {
            Ok(()) => {
                self.member_writes += 1;
                self.last_published = Some((info, lease));
            }
            Err(e) => tracing::warn!(error = %e, "cannot publish the member key"),
        }
    }

    /// A graceful stop: PostgreSQL down, leadership and member key handed back at once so the
    /// group does not wait for the lease to run out.
    pub async fn shutdown(&mut self) {
        self.stop(StopMode::Fast).await;
        self.stop_pooler().await;
        let keys = self.keys().clone();
        let _ = self
            .dcs
            .delete_if(&keys.leader(self.cfg.group), self.cfg.member.as_bytes())
            .await;
        if let Some(id) = self.lease.lease_id() {
            let _ = self.dcs.revoke(id).await;
        }
    }

    /// Take a configuration that changes nothing PostgreSQL runs with (see
    /// `AgentConfig::pooler_change_only`); the primary's setup (pg_dist_poolinfo) runs again.
    pub fn adopt_config(&mut self, new: AgentConfig) {
        self.cfg = new.clone();
        self.pg.set_config(new);
        self.setup_done = false;
    }

    /// Whether PostgreSQL runs here as a primary (as last observed).
    pub fn is_running_primary(&self) -> bool {
        matches!(self.last_snapshot.as_ref().map(|s| &s.server), Some(Server::Running(x)) if x.primary)
    }

    /// Take new PostgreSQL parameters without a restart: postgresql.conf rewritten, then
    /// `pg_reload_conf()` when the server runs (otherwise its next start reads the file).
    /// Parameters that need a restart stay pending until one: returned (by name), so the
    /// caller does not claim to run the new configuration.
    pub async fn reload_parameters(&mut self, new: AgentConfig) -> Result<Vec<String>, String> {
        self.cfg = new.clone();
        self.pg.set_config(new);
        self.pg.write_postgresql_conf().map_err(|e| e.to_string())?;
        if !matches!(
            self.last_snapshot.as_ref().map(|s| &s.server),
            Some(Server::Running(_))
        ) {
            return Ok(Vec::new());
        }
        let t = self.timeout();
        self.reset_alter_system().await;
        self.pg.reload_and_pending_restart(t).await
    }

    /// Take new passwords without a restart: the passfile now, the roles and this node's
    /// pg_dist_authinfo row on the next cycle if this member is a primary (`EnsureSetup`, one
    /// transaction). Replicas keep streaming on their established connections.
    pub fn reload_secrets(&mut self, new: AgentConfig) -> Result<(), String> {
        self.cfg = new.clone();
        self.pg.set_config(new);
        self.setup_done = false;
        self.pg.prepare_host_files().map_err(|e| e.to_string())
    }

    /// Set up roles, passwords and this node's pg_dist_authinfo row again on the next cycle
    /// (as primary), repairing what was changed by hand.
    pub fn recheck_setup(&mut self) {
        self.setup_done = false;
    }

    /// The configuration is the spec's: settings made with `ALTER SYSTEM` (which override
    /// postgresql.conf) are removed whenever this agent starts PostgreSQL or is reloaded.
    /// `plan` shows them as drift before.
    pub async fn reset_alter_system(&mut self) {
        if !self.pg.connected() {
            return;
        }
        match self.pg.reset_alter_system(self.timeout()).await {
            Ok(names) if !names.is_empty() => tracing::warn!(
                parameters = %names.join(", "),
                "removed ALTER SYSTEM settings: the spec's postgresql.conf applies"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check ALTER SYSTEM settings"),
        }
    }

    pub fn data_dir_exists(&self) -> bool {
        self.pg.data_dir_exists()
    }
}

/// Actions after which the server's role or state differs from the cycle's snapshot.
fn changes_server(a: &Action) -> bool {
    matches!(
        a,
        Action::Promote
            | Action::StartPrimary
            | Action::StartReplica { .. }
            | Action::Demote { .. }
            | Action::Switchover { .. }
            | Action::Clone { .. }
            | Action::Reinit { .. }
    )
    // Not Initdb: a new group's primary is published only once its setup is done. Replicas
    // cloning it earlier could copy the `ssl = on` that `CREATE EXTENSION citus` writes with
    // ALTER SYSTEM without the certificate it generates beside it, and never start.
}

/// This member leads the coordinator group with its server running as primary, on a lease it
/// can trust: the only member whose write pauses mean anything.
fn coordinator_primary(s: &Snapshot) -> bool {
    let leads = matches!(&s.dcs, DcsView::Available(g)
        if g.leader.as_deref() == Some(s.me.as_str()) && g.leader_lease.is_some() && g.leader_lease == s.my_lease);
    s.coordinator && leads && s.lease_valid && matches!(&s.server, Server::Running(r) if r.primary)
}
