//! Executing a plan: under an etcd lock, phase by phase (prepare, install, start), in parallel
//! across hosts within a phase (bounded) except agent restarts, which roll group by group
//! with a switchover before each leader's (no group fails over), then waiting for the agents to converge, then — only
//! with `--allow-destroy` — removals. Every step is idempotent: after a failure, a rerun plans
//! again from what is there and continues.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::lock::Lock;
use super::progress::Progress;
use super::{ReconcileError, Run};
use crate::agent::config::{AgentConfig, Paths};
use crate::citus::metadata::NodeChange;
use crate::dcs::keys::MemberState;
use crate::observe::SQL_TIMEOUT;
use crate::plan::{Action, Kind, Observed, Phase, Plan, Target};
use crate::provision;
use crate::ssh::{self, Session};

fn host_of(a: &Action) -> Option<&str> {
    match &a.target {
        Target::Host(h) => Some(h),
        _ => None,
    }
}

/// Run the per-host actions of some phases, one task per host, bounded.
async fn run_host_actions(
    run: &Run,
    actions: &[Action],
    progress: &Arc<Progress>,
    binary: &Option<Arc<Vec<u8>>>,
) -> Result<(), ReconcileError> {
    run.check_lock()?;
    let mut per_host: BTreeMap<String, Vec<Action>> = BTreeMap::new();
    for a in actions {
        if let Some(h) = host_of(a) {
            per_host.entry(h.to_string()).or_default().push(a.clone());
        }
    }
    let sem = Arc::new(Semaphore::new(run.options.parallelism.max(1)));
    let mut set = JoinSet::new();
    for (host, list) in per_host {
        let Some(session) = run.sessions.ok.get(&host).cloned() else {
            return Err(ReconcileError::Step {
                host,
                step: "connect".into(),
                detail: "no SSH session".into(),
            });
        };
        let Some(h) = run.spec.host(&host).cloned() else {
            continue;
        };
        let cfg = AgentConfig::for_host(&run.spec, &h);
        let (sem, binary, service, cluster) = (
            sem.clone(),
            binary.clone(),
            run.spec.agent.service,
            run.spec.cluster.clone(),
        );
        let apt_proxy = run.spec.postgres.apt_proxy.clone();
        let progress = progress.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let paths = Paths::new(&h.install_dir);
            for a in list {
                progress.step(&host, &a.summary);
                let t0 = Instant::now();
                let r = match &a.kind {
                    Kind::InstallPackages {
                        packages,
                        through_holds,
                        ..
                    } => {
                        provision::install_packages(
                            &session,
                            packages,
                            apt_proxy.as_deref(),
                            *through_holds,
                        )
                        .await
                    }
                    Kind::AddAptRepository {
                        name,
                        sources,
                        key_url,
                        fingerprint,
                    } => {
                        provision::add_apt_repository(
                            &session,
                            name,
                            sources,
                            key_url.as_deref(),
                            fingerprint,
                            apt_proxy.as_deref(),
                        )
                        .await
                    }
                    Kind::HoldPackages { packages } => {
                        provision::hold_packages(&session, packages).await
                    }
                    Kind::UploadAgentBinary { sha256 } => match &binary {
                        Some(b) => provision::upload_binary(&session, &paths, b, sha256).await,
                        None => Ok(()),
                    },
                    Kind::WriteAgentConfig => {
                        provision::write_config(&session, &paths, &cfg.render()).await
                    }
                    Kind::InstallService => {
                        provision::install_unit(&session, &paths, &cluster, &h.name).await
                    }
                    Kind::StartAgent => {
                        provision::start_agent(&session, service, &paths, &cluster, &h.name).await
                    }
                    Kind::RestartAgent { .. } => {
                        provision::restart_agent(&session, service, &paths, &cluster, &h.name).await
                    }
                    Kind::ReloadAgent { .. } | Kind::RecheckSetup => {
                        provision::reload_agent(&session, service, &paths, &cluster, &h.name).await
                    }
                    _ => Ok(()),
                };
                if let Err(e) = r {
                    progress.done(&host, &format!("failed: {}", a.summary));
                    return Err(step_error(&host, &a.summary, e));
                }
                progress.step(
                    &host,
                    &format!("{} ({:.1}s)", a.summary, t0.elapsed().as_secs_f64()),
                );
            }
            Ok(host)
        });
    }
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(ReconcileError::Step {
                    host: "?".into(),
                    step: "task".into(),
                    detail: e.to_string(),
                });
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn step_error(host: &str, step: &str, e: ssh::SshError) -> ReconcileError {
    ReconcileError::Step {
        host: host.into(),
        step: step.into(),
        detail: e.to_string(),
    }
}

/// Execute the prepare/install/start phases of a plan. Restarts go to replicas before leaders.
async fn execute_host_phases(
    run: &Run,
    plan: &Plan,
    observed: &Observed,
    progress: &Arc<Progress>,
) -> Result<(), ReconcileError> {
    let needs_binary = plan
        .actions
        .iter()
        .any(|a| matches!(a.kind, Kind::UploadAgentBinary { .. }));
    let binary = if needs_binary {
        Some(Arc::new(run.binary.bytes()?))
    } else {
        None
    };
    let phase = |p: Phase| plan.phase(p).cloned().collect::<Vec<_>>();
    super::etcd::execute(run, plan, observed, progress).await?;
    run_host_actions(run, &phase(Phase::Prepare), progress, &binary).await?;
    run_host_actions(run, &phase(Phase::Install), progress, &binary).await?;
    let (restarts, rest): (Vec<Action>, Vec<Action>) = phase(Phase::Start)
        .into_iter()
        .partition(|a| matches!(a.kind, Kind::RestartAgent { .. }));
    run_host_actions(run, &rest, progress, &binary).await?;
    wait_reloaded(run, &rest, progress).await;
    rolling_restarts(run, &restarts, observed, progress, &binary).await
}

/// After a reload, wait (briefly) until each agent says it runs its file's configuration,
/// so convergence does not take the moment in between for an agent left behind. One that
/// does not (a parameter left pending a restart) is restarted by the convergence that follows.
async fn wait_reloaded(run: &Run, actions: &[Action], progress: &Arc<Progress>) {
    let Some(dcs) = run.dcs.as_ref() else {
        return;
    };
    let mut waiting: BTreeMap<String, (u32, String)> = actions
        .iter()
        .filter(|a| matches!(a.kind, Kind::ReloadAgent { .. }))
        .filter_map(|a| {
            let h = host_of(a)?;
            let d = run.desired.hosts.get(h)?;
            Some((h.to_string(), (d.group, d.agent_config_sha256.clone())))
        })
        .collect();
    let started = Instant::now();
    while !waiting.is_empty() && started.elapsed() < RELOAD_WAIT {
        let groups: BTreeSet<u32> = waiting.values().map(|(g, _)| *g).collect();
        for g in groups {
            let Ok(state) = crate::dcs::handover::group_state(dcs, g).await else {
                continue;
            };
            waiting.retain(|host, (group, sha)| {
                let done = *group == g
                    && state
                        .members
                        .get(host)
                        // An agent from before checksums were published cannot confirm.
                        .is_some_and(|m| m.config_sha256 == *sha || m.config_sha256.is_empty());
                if done {
                    progress.step(
                        host,
                        &format!("reloaded ({:.1}s)", started.elapsed().as_secs_f64()),
                    );
                }
                !done
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for host in waiting.keys() {
        progress.step(
            host,
            "the reload is not confirmed yet; convergence checks again",
        );
    }
}

/// How long `apply` waits for agents to confirm a reload.
const RELOAD_WAIT: Duration = Duration::from_secs(15);

/// Agent restarts (new configuration, new binary) roll so that no group fails over: one
/// group at a time, workers first and the coordinator last; in a group, the replicas one by
/// one, each streaming again before the next; then the leader hands over to a caught-up
/// replica (a planned switchover, which Citus clients wait through) and restarts as a
/// replica. A leader with no streaming replica restarts in place.
async fn rolling_restarts(
    run: &Run,
    restarts: &[Action],
    observed: &Observed,
    progress: &Arc<Progress>,
    binary: &Option<Arc<Vec<u8>>>,
) -> Result<(), ReconcileError> {
    let mut per_group: BTreeMap<u32, Vec<Action>> = BTreeMap::new();
    let mut elsewhere = Vec::new();
    for a in restarts {
        match host_of(a).and_then(|h| run.spec.host(h)) {
            Some(h) => per_group.entry(h.group).or_default().push(a.clone()),
            None => elsewhere.push(a.clone()),
        }
    }
    run_host_actions(run, &elsewhere, progress, binary).await?;
    let coordinator = per_group.remove(&0);
    let groups = per_group.into_iter().chain(coordinator.map(|c| (0, c)));
    for (group, list) in groups {
        run.check_lock()?;
        // Who leads and who streams now, not when the plan was made: a failover since then
        // must not turn the new leader's restart into a replica's.
        let fresh = match run.dcs.as_ref() {
            Some(d) => crate::dcs::handover::group_state(d, group).await.ok(),
            None => None,
        };
        let leader = match &fresh {
            Some(g) => g.leader.as_ref().map(|l| l.name.clone()),
            None => observed
                .etcd
                .groups
                .get(&group)
                .and_then(|g| g.leader.clone()),
        };
        let streaming = |name: &str| {
            fresh
                .as_ref()
                .and_then(|g| g.members.get(name))
                .is_some_and(|m| m.state() == MemberState::Streaming)
        };
        let lowers = list
            .iter()
            .any(|a| matches!(&a.kind, Kind::RestartAgent { lowered, .. } if !lowered.is_empty()));
        let (lead, replicas): (Vec<Action>, Vec<Action>) = list
            .into_iter()
            .partition(|a| host_of(a).is_some() && host_of(a) == leader.as_deref());
        let lowered_first = match (&leader, lowers && !lead.is_empty()) {
            (Some(l), true) => {
                primary_first(run, group, l, progress).await?;
                true
            }
            _ => false,
        };
        for a in replicas {
            run.check_lock()?;
            let host = host_of(&a).unwrap_or_default().to_string();
            run_host_actions(run, std::slice::from_ref(&a), progress, binary).await?;
            if streaming(&host) {
                let after = member_revision(run, group, &host).await;
                wait_streaming(run, group, &host, after, progress).await?;
            }
        }
        if lowered_first {
            continue;
        }
        for a in lead {
            run.check_lock()?;
            let host = host_of(&a).unwrap_or_default().to_string();
            let handed_over = hand_over(run, group, &host, progress).await?;
            run_host_actions(run, std::slice::from_ref(&a), progress, binary).await?;
            if handed_over {
                let after = member_revision(run, group, &host).await;
                wait_streaming(run, group, &host, after, progress).await?;
            }
        }
    }
    Ok(())
}

/// A change that lowers a parameter standbys must keep at least as high as the primary: the
/// leader goes first. Its agent reloads the new parameters and, seeing a lowered value,
/// restarts PostgreSQL in place keeping its leadership (`plan` allows this path only for a
/// change of parameters alone); the replicas, still running with the higher value (allowed),
/// restart after it, one at a time.
async fn primary_first(
    run: &Run,
    group: u32,
    leader: &str,
    progress: &Arc<Progress>,
) -> Result<(), ReconcileError> {
    run.check_lock()?;
    let (session, paths) = agent_access(run, leader)?;
    progress.step(
        leader,
        "reload the agent: it restarts PostgreSQL in place, as primary, before its replicas",
    );
    provision::reload_agent(
        &session,
        run.spec.agent.service,
        &paths,
        &run.spec.cluster,
        leader,
    )
    .await
    .map_err(|e| step_error(leader, "reload the agent", e))?;
    wait_leading(run, group, leader, progress).await
}

/// The SSH session and install paths of a host in the spec.
fn agent_access(run: &Run, host: &str) -> Result<(Arc<Session>, Paths), ReconcileError> {
    let missing = |detail: &str| ReconcileError::Step {
        host: host.into(),
        step: "connect".into(),
        detail: detail.into(),
    };
    let session = run
        .sessions
        .ok
        .get(host)
        .cloned()
        .ok_or_else(|| missing("no SSH session"))?;
    let h = run
        .spec
        .host(host)
        .ok_or_else(|| missing("not in the spec"))?;
    Ok((session, Paths::new(&h.install_dir)))
}

/// Wait until `member` holds its group's leader key, runs as primary and says it runs its
/// file's configuration.
async fn wait_leading(
    run: &Run,
    group: u32,
    member: &str,
    progress: &Arc<Progress>,
) -> Result<(), ReconcileError> {
    let sha = run
        .desired
        .hosts
        .get(member)
        .map(|d| d.agent_config_sha256.clone())
        .unwrap_or_default();
    let took = wait_member(run, group, member, 0, |g, m| {
        g.leader.as_ref().is_some_and(|l| l.name == member)
            && m.is_running_primary()
            && m.config_sha256 == sha
    })
    .await
    .map_err(|waited| ReconcileError::Step {
        host: member.into(),
        step: "wait until it runs the new configuration as primary".into(),
        detail: format!(
            "not running its new configuration as group {group}'s primary after {waited}s (see its agent log); its replicas keep the old value until it does"
        ),
    })?;
    progress.step(
        member,
        &format!("restarted in place with the new configuration, leads group {group} ({took:.1}s)"),
    );
    Ok(())
}

/// Poll `member`'s key in its group until `done` accepts it, written after etcd revision
/// `after` (so a key the agent wrote before it was restarted does not count). Ok(seconds
/// waited), or Err(the timeout in seconds).
async fn wait_member(
    run: &Run,
    group: u32,
    member: &str,
    after: i64,
    done: impl Fn(&crate::dcs::keys::GroupState, &crate::dcs::keys::MemberInfo) -> bool,
) -> Result<f64, u64> {
    let started = Instant::now();
    let Some(dcs) = run.dcs.as_ref() else {
        return Err(0);
    };
    loop {
        let fresh = match after {
            0 => true,
            _ => dcs
                .get(&dcs.keys.member(group, member))
                .await
                .ok()
                .flatten()
                .is_some_and(|kv| kv.mod_revision > after),
        };
        if fresh {
            if let Ok(g) = crate::dcs::handover::group_state(dcs, group).await {
                if g.members.get(member).is_some_and(|m| done(&g, m)) {
                    return Ok(started.elapsed().as_secs_f64());
                }
            }
        }
        if started.elapsed() > run.options.timeout {
            return Err(run.options.timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The etcd revision of `member`'s key now (0 when unknown).
async fn member_revision(run: &Run, group: u32, member: &str) -> i64 {
    let Some(dcs) = run.dcs.as_ref() else {
        return 0;
    };
    dcs.get(&dcs.keys.member(group, member))
        .await
        .ok()
        .flatten()
        .map(|kv| kv.mod_revision)
        .unwrap_or(0)
}

/// Before its agent restarts, a leader hands over to the best streaming replica. Returns
/// whether it did (false: no replica to hand over to, it restarts in place).
async fn hand_over(
    run: &Run,
    group: u32,
    leader: &str,
    progress: &Arc<Progress>,
) -> Result<bool, ReconcileError> {
    let dcs = run
        .dcs
        .as_ref()
        .ok_or_else(|| ReconcileError::Blocked("etcd is not reachable".into()))?;
    let step = |detail: String| ReconcileError::Step {
        host: leader.into(),
        step: "switchover before the restart".into(),
        detail,
    };
    // A replica restarted a moment ago streams before its leader names it synchronous
    // standby again; in synchronous mode only that standby may take over (the leader drops
    // a request for any other), so wait a little for it.
    let synchronous = run.spec.ha.synchronous_mode != crate::spec::model::SyncMode::Off;
    let deadline = Instant::now() + CANDIDATE_WAIT;
    let (state, chosen) = loop {
        let state = crate::dcs::handover::group_state(dcs, group)
            .await
            .map_err(step)?;
        if state.leader.as_ref().map(|l| l.name.as_str()) != Some(leader) {
            // Leadership moved since the plan: it restarts as a replica anyway.
            return Ok(state
                .members
                .get(leader)
                .is_some_and(|m| m.state() == MemberState::Streaming));
        }
        let chosen = state.switchover_candidate(leader).and_then(|c| {
            match state.sync.as_ref().map(|k| k.sync_standby.as_deref()) {
                Some(named) if synchronous && named != Some(c.as_str()) => Err(format!(
                    "synchronous mode: {c} streams but is not the synchronous standby yet"
                )),
                _ => Ok(c),
            }
        });
        if chosen.is_ok() || Instant::now() >= deadline {
            break (state, chosen);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let candidate = match chosen {
        Ok(c) => c,
        // Other members that cannot take over now could still win the key if the leader let
        // go of it: restarting the leader would be a failover. Refuse instead.
        Err(why) if state.members.keys().any(|m| m != leader) => {
            return Err(step(format!(
                "{why}; its other members are not ready to take over, and restarting the leader would fail the group over: apply again once they stream"
            )));
        }
        Err(why) => {
            progress.step(leader, &format!("restart in place: {why}"));
            return Ok(false);
        }
    };
    progress.step(
        leader,
        &format!(
            "switchover of group {group} to {candidate}, so that {leader} restarts as a replica"
        ),
    );
    let req = crate::dcs::keys::FailoverRequest {
        leader: Some(leader.into()),
        member: Some(candidate.clone()),
        scheduled_at: None,
    };
    match crate::dcs::handover::request(dcs, group, &req, Some(&candidate), HANDOVER_TIMEOUT).await
    {
        Ok(crate::dcs::handover::Outcome::Done { after, .. }) => {
            progress.step(
                leader,
                &format!(
                    "{candidate} leads group {group} ({:.2}s)",
                    after.as_secs_f64()
                ),
            );
            Ok(true)
        }
        Ok(crate::dcs::handover::Outcome::Scheduled) => Err(step("scheduled, not done".into())),
        Err(e) => Err(step(e)),
    }
}

/// How long a planned switchover before a restart may take.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a leader's restart waits for a replica to become a switchover candidate (a
/// replica restarted just before is named synchronous standby again within a few cycles).
const CANDIDATE_WAIT: Duration = Duration::from_secs(30);

/// After its agent restarted: wait until `member` streams again, as its new agent says (a key
/// written after revision `after`, the one it had once the restart returned).
async fn wait_streaming(
    run: &Run,
    group: u32,
    member: &str,
    after: i64,
    progress: &Arc<Progress>,
) -> Result<(), ReconcileError> {
    progress.step(member, "waiting until it streams again");
    let took = wait_member(run, group, member, after, |_, m| {
        m.is_streaming_replica()
    })
    .await
    .map_err(|waited| ReconcileError::Step {
        host: member.into(),
        step: "wait until it streams again after the restart".into(),
        detail: format!(
            "not streaming after {waited}s; the rest of group {group} waits (see its agent log), and the next apply continues"
        ),
    })?;
    progress.step(member, &format!("streaming again ({took:.1}s)"));
    Ok(())
}

/// Apply a plan that the caller has shown and had confirmed.
pub async fn apply(
    run: &Run,
    plan: &Plan,
    observed: &Observed,
    progress: &Arc<Progress>,
) -> Result<Observed, ReconcileError> {
    if !plan.errors.is_empty() {
        return Err(ReconcileError::Blocked(format!(
            "cannot apply: {}",
            plan.errors.join("; ")
        )));
    }
    refuse_unallowed_destroys(run, plan)?;
    // A managed etcd's membership changes come first, for the rest runs against it. (etcd
    // guards them itself: a second add of one peer URL, or a removal that costs the quorum,
    // is refused.) Under the lock, which lives in etcd, unless etcd does not answer — not
    // formed yet, or its members stopped (a reboot, a lost quorum): then there is nothing to
    // hold a lock in, and it is formed or started first.
    let has_etcd_work = plan.phase(Phase::Etcd).next().is_some();
    let etcd_down = observed.managed_etcd.is_some() && observed.etcd.error.is_some();
    let started;
    let (plan, observed) = if has_etcd_work && etcd_down {
        started = etcd_then_plan_again(run, plan, observed, progress).await?;
        (&started.0, &started.1)
    } else {
        (plan, observed)
    };
    let dcs = run
        .dcs
        .as_ref()
        .ok_or_else(|| ReconcileError::Blocked("etcd is not reachable".into()))?;
    let lock = Lock::take(dcs, run.options.lock_timeout, run.lock_lost.clone()).await?;
    let result = async {
        if has_etcd_work && !etcd_down {
            let (plan, observed) = etcd_then_plan_again(run, plan, observed, progress).await?;
            apply_locked(run, &plan, &observed, progress).await
        } else {
            apply_locked(run, plan, observed, progress).await
        }
    }
    .await;
    lock.release().await;
    result
}

/// Removals need `--allow-destroy`: the plan shown, and the plan made again once a managed
/// etcd changed.
fn refuse_unallowed_destroys(run: &Run, plan: &Plan) -> Result<(), ReconcileError> {
    if !plan.has_destroys() || run.options.allow_destroy {
        return Ok(());
    }
    let what: Vec<&str> = plan
        .actions
        .iter()
        .filter(|a| a.change == crate::plan::Change::Destroy)
        .map(|a| a.summary.as_str())
        .collect();
    Err(ReconcileError::Blocked(format!(
        "nothing applied: the plan removes what left the spec, which needs --allow-destroy:\n  {}\nreview the plan, then rerun with --allow-destroy",
        what.join("\n  ")
    )))
}

/// The managed etcd's actions, then everything else planned again against the etcd that
/// now runs (and checked as the first plan was).
async fn etcd_then_plan_again(
    run: &Run,
    plan: &Plan,
    observed: &Observed,
    progress: &Arc<Progress>,
) -> Result<(Plan, Observed), ReconcileError> {
    super::etcd::execute(run, plan, observed, progress).await?;
    let o = run.observe().await;
    let p = run.plan(&o);
    if !p.errors.is_empty() {
        return Err(ReconcileError::Blocked(format!(
            "etcd runs, but the rest cannot be applied: {}",
            p.errors.join("; ")
        )));
    }
    refuse_unallowed_destroys(run, &p)?;
    Ok((p, o))
}

async fn apply_locked(
    run: &Run,
    plan: &Plan,
    observed: &Observed,
    progress: &Arc<Progress>,
) -> Result<Observed, ReconcileError> {
    execute_host_phases(run, plan, observed, progress).await?;
    let mut converged = converge(run, progress).await?;
    // Shards onto new groups, once they are registered (the plan of now says so).
    let now = run.plan(&converged);
    if let Some(Kind::Rebalance { transfer_mode }) =
        now.phase(Phase::Rebalance).map(|a| &a.kind).next().cloned()
    {
        super::rebalance::run_to_end(run, &converged, false, &transfer_mode, progress).await?;
        converged = run.observe().await;
    }
    if plan.has_destroys() {
        destroy(run, &run.plan(&converged), progress).await?;
        converged = run.observe().await;
    }
    Ok(converged)
}

/// Wait until only shard moves and removals are left in the plan (the agents bootstrap, clone and register
/// on their own). Host-level work that reappears (an agent that died) is done again, a few
/// times at most.
async fn converge(run: &Run, progress: &Arc<Progress>) -> Result<Observed, ReconcileError> {
    let deadline = Instant::now() + run.options.timeout;
    let mut redo = 0;
    let mut last_pending = String::new();
    loop {
        run.check_lock()?;
        let o = run.observe().await;
        let p = run.plan(&o);
        let pending: Vec<&Action> = p
            .actions
            .iter()
            .filter(|a| a.phase < Phase::Rebalance)
            .collect();
        if p.errors.is_empty() && pending.is_empty() {
            return Ok(o);
        }
        // A setup recheck planned mid-convergence only means an agent has not yet set up
        // what it was just given: it will, unasked.
        let host_work: Vec<String> = pending
            .iter()
            .filter(|a| a.phase < Phase::Converge && a.kind != Kind::RecheckSetup)
            .map(|a| format!("{:?}: {}", a.target, a.summary))
            .collect();
        if !host_work.is_empty() && redo < 3 && p.errors.is_empty() {
            redo += 1;
            progress.note(&format!(
                "host-level work reappeared while converging; doing it again:\n  {}",
                host_work.join("\n  ")
            ));
            execute_host_phases(run, &p, &o, progress).await?;
            continue;
        }
        let text: String = pending
            .iter()
            .map(|a| format!("{:?}: {}", a.target, a.summary))
            .chain(p.errors.iter().cloned())
            .collect::<Vec<_>>()
            .join("\n  ");
        if Instant::now() > deadline {
            return Err(ReconcileError::Timeout(format!(
                "not converged after {}s; still pending:\n  {text}",
                run.options.timeout.as_secs()
            )));
        }
        if text != last_pending {
            progress.note(&format!(
                "waiting for the agents: {} item(s) pending:\n  {text}",
                pending.len() + p.errors.len()
            ));
            last_pending = text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removals: worker groups (drained first) and members no longer in the spec.
async fn destroy(run: &Run, plan: &Plan, progress: &Arc<Progress>) -> Result<(), ReconcileError> {
    let dcs = run
        .dcs
        .as_ref()
        .ok_or_else(|| ReconcileError::Blocked("etcd is not reachable".into()))?;
    for a in plan.phase(Phase::Destroy) {
        progress.note(&format!("destroy: {}", a.summary));
        match &a.kind {
            Kind::RemoveGroup { group } => {
                let observed = run.observe().await;
                drain_group(run, &observed, *group, progress).await?;
                // Stop the members before the rows go: while the group has a leader in etcd,
                // the coordinator's agent would register it again. Replicas first, the leader
                // last, so leadership never moves to a member about to stop.
                if let Some(g) = observed.etcd.groups.get(group) {
                    let mut members: Vec<_> = g.members.iter().collect();
                    members.sort_by_key(|(name, _)| g.leader.as_ref() == Some(*name));
                    for (member, m) in members {
                        retire_member(run, member, &m.host, progress).await;
                    }
                }
                dcs.delete_prefix(&dcs.keys.group(*group))
                    .await
                    .map_err(|e| ReconcileError::Blocked(e.to_string()))?;
                remove_group_rows(run, &observed, *group).await?;
            }
            Kind::EtcdRemove { .. } => super::etcd::remove(run, a, progress).await?,
            Kind::RemoveMember { member, address } => {
                let group = match &a.target {
                    Target::Group(g) => *g,
                    _ => continue,
                };
                retire_member(run, member, address, progress).await;
                let _ = dcs
                    .delete_if(&dcs.keys.leader(group), member.as_bytes())
                    .await;
                dcs.delete(&dcs.keys.member(group, member))
                    .await
                    .map_err(|e| ReconcileError::Blocked(e.to_string()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Move every shard off a worker group (it stops taking new ones first). Interrupted or
/// failed, the group stays registered and serving; the next apply continues.
async fn drain_group(
    run: &Run,
    observed: &Observed,
    group: u32,
    progress: &Arc<Progress>,
) -> Result<(), ReconcileError> {
    let Some(rows) = &observed.nodes else {
        return Err(ReconcileError::Blocked(
            "cannot read pg_dist_node on the coordinator's primary".into(),
        ));
    };
    let (host, c) = super::rebalance::coordinator(run, observed).await?;
    let fail = |e: crate::postgres::sql::SqlError| ReconcileError::Step {
        host: host.clone(),
        step: format!("drain group {group}"),
        detail: e.to_string(),
    };
    for r in rows
        .iter()
        .filter(|r| r.groupid == group as i32 && r.noderole == "primary" && r.shouldhaveshards)
    {
        crate::postgres::sql::bounded(
            "citus_set_node_property",
            SQL_TIMEOUT,
            c.execute(
                "SELECT citus_set_node_property($1, $2, 'shouldhaveshards', false)",
                &[&r.nodename, &r.nodeport],
            ),
        )
        .await
        .map_err(fail)?;
    }
    let shards = crate::citus::rebalance::observe(&c, SQL_TIMEOUT)
        .await
        .map_err(fail)?;
    if shards.per_group.get(&group).copied().unwrap_or(0) > 0 || shards.running_job.is_some() {
        let mode = crate::citus::metadata::transfer_mode(
            &shards.without_replica_identity,
            run.spec.citus.pooler.is_some(),
        );
        super::rebalance::run_to_end(run, observed, true, mode, progress).await?;
    }
    let left = crate::citus::rebalance::observe(&c, SQL_TIMEOUT)
        .await
        .map_err(fail)?
        .per_group
        .get(&group)
        .copied()
        .unwrap_or(0);
    if left > 0 {
        return Err(ReconcileError::Step {
            host,
            step: format!("drain group {group}"),
            detail: format!(
                "{left} shard(s) still on the group after the drain; it stays registered and serving; run apply again"
            ),
        });
    }
    Ok(())
}

/// Remove a drained group's rows (secondaries first), as they are now: the coordinator's
/// agent may have moved one since the plan was made.
async fn remove_group_rows(
    run: &Run,
    observed: &Observed,
    group: u32,
) -> Result<(), ReconcileError> {
    let (host, client) = super::rebalance::coordinator(run, observed).await?;
    let fail = |e: crate::postgres::sql::SqlError| ReconcileError::Step {
        host: host.clone(),
        step: format!("remove group {group}"),
        detail: e.to_string(),
    };
    let rows = crate::citus::sql::nodes(&client, SQL_TIMEOUT)
        .await
        .map_err(fail)?;
    let mut ours: Vec<&crate::citus::metadata::NodeRow> =
        rows.iter().filter(|r| r.groupid == group as i32).collect();
    ours.sort_by_key(|r| r.noderole == "primary");
    for r in ours {
        // Its members are stopped by now: citus_remove_node alone would try to reach the node;
        // disabled first (synchronously, on the nodes that are up), it does not.
        if r.isactive {
            crate::postgres::sql::bounded(
                "citus_disable_node",
                SQL_TIMEOUT,
                client.execute(
                    "SELECT citus_disable_node($1, $2, synchronous => true)",
                    &[&r.nodename, &r.nodeport],
                ),
            )
            .await
            .map_err(fail)?;
        }
        let change = NodeChange::Remove {
            nodeid: r.nodeid,
            group: r.groupid,
            host: r.nodename.clone(),
            port: r.nodeport,
            role: r.noderole.clone(),
        };
        let options = crate::citus::sql::UpdateOptions {
            force: false,
            lock_cooldown_ms: 0,
        };
        crate::citus::sql::apply_node_change(&client, &change, options, SQL_TIMEOUT)
            .await
            .map_err(fail)?;
    }
    Ok(())
}

/// Stop the agent of a member that left the spec (it stops PostgreSQL and hands leadership
/// over), then set its data directory aside — renamed, never deleted. Reached with the spec's
/// default SSH settings; a host that is gone is only reported: its etcd keys are removed
/// regardless.
async fn retire_member(run: &Run, member: &str, address: &str, progress: &Arc<Progress>) {
    let d = &run.spec.ssh_defaults;
    let target = ssh::Target {
        name: member.to_string(),
        address: address.to_string(),
        port: d.port,
        user: d.user.clone(),
        identity_file: d.identity_file.clone(),
        known_hosts: d.known_hosts.clone(),
    };
    let options = ssh::Options {
        accept_new_host_keys: run.options.accept_new_host_keys,
        ..Default::default()
    };
    match Session::connect(&target, options).await {
        Ok(s) => {
            let paths = Paths::new(&run.spec.install_dir_of(member));
            if let Err(e) = provision::stop_agent(
                &s,
                run.spec.agent.service,
                &paths,
                &run.spec.cluster,
                member,
            )
            .await
            {
                progress.note(&format!("{member}: could not stop its agent: {e}"));
            } else {
                match provision::set_data_aside(&s, &paths).await {
                    Ok(Some(aside)) => {
                        progress.note(&format!("{member}: data directory set aside as {aside}"))
                    }
                    Ok(None) => {}
                    Err(e) => progress.note(&format!(
                        "{member}: could not set its data directory aside: {e}"
                    )),
                }
            }
            s.close().await;
        }
        Err(e) => progress.note(&format!(
            "{member}: not reachable ({e}); removing its keys anyway"
        )),
    }
}
