//! The agent process: `citus-reconcile agent --config FILE`. Starts the lease keeper, the
//! fence and the etcd watch, then runs `Node::tick` whenever something happened (a watch event,
//! PostgreSQL exiting, the lease changing, a signal) or `loop_wait` passed.
//!
//! Single-threaded on purpose: the postmaster's parent-death signal is tied to the thread that
//! spawned it, and one thread keeps the agent small.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

use super::citus_pause::PauseShared;
use super::config::AgentConfig;
use super::lease::{self, LeaseShared, Timing};
use super::node::{Host, LocalHost, Node, Process};
use crate::dcs::{ClusterKeys, Dcs};
use crate::postgres::process::Pg;

pub fn load_config(path: &Path) -> Result<AgentConfig, String> {
    load_config_with_sha(path).map(|(cfg, _)| cfg)
}

/// The configuration and the SHA-256 of the file it came from: published in the member key
/// so `plan` can tell an agent still running an older configuration than its file holds
/// (an `apply` interrupted between writing the file and restarting the agent).
pub fn load_config_with_sha(path: &Path) -> Result<(AgentConfig, String), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let sha = sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cfg = AgentConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((cfg, sha))
}

/// Connect to etcd, retrying (bounded per attempt) until it answers or we are told to stop.
async fn connect_dcs(cfg: &AgentConfig, timeout: Duration) -> Dcs {
    let keys = ClusterKeys::new(&cfg.etcd.namespace, &cfg.cluster);
    let mut backoff = Duration::from_millis(200);
    loop {
        match Dcs::connect(
            &cfg.etcd.endpoints,
            &crate::dcs::Access::from_agent(&cfg.etcd),
            keys.clone(),
            timeout,
        )
        .await
        {
            Ok(d) => return d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach etcd; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Which watch events should wake this member.
fn relevant(key: &str, keys: &ClusterKeys, cfg: &AgentConfig) -> bool {
    let own = keys.member(cfg.group, &cfg.member);
    if key == own || key.ends_with("/status") {
        return false;
    }
    key.starts_with(&keys.group(cfg.group))
        || (cfg.is_coordinator() && key.starts_with(&keys.prefix))
}

/// Wake the loop (and the coordinator's pauser) on changes of the cluster's keys in etcd.
pub async fn watch(
    dcs: Dcs,
    cfg: AgentConfig,
    wake: Arc<Notify>,
    pauses: Option<Arc<PauseShared>>,
) {
    let keys = dcs.keys.clone();
    loop {
        let rev = match dcs.read_cluster().await {
            Ok((_, rev)) => rev,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        match dcs.watch(&keys.prefix, rev + 1).await {
            Ok(mut stream) => {
                while let Ok(Some(batch)) = stream.next().await {
                    if batch.canceled {
                        break;
                    }
                    let hit = batch.events.iter().any(|ev| relevant(&ev.key, &keys, &cfg));
                    if hit {
                        wake.notify_one();
                    }
                    if let Some(p) = &pauses {
                        // A pause starts on a request or a lost leader key; one that is held
                        // ends on the new leader's member key: any event counts then.
                        let holding = !p.held().is_empty();
                        let hit = batch.events.iter().any(|ev| {
                            holding
                                || ev.key.ends_with("/citus_pause")
                                || ev.key.ends_with("/leader")
                        });
                        if hit {
                            p.wake.notify_one();
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        // Something may have changed while the watch was down.
        wake.notify_one();
        if let Some(p) = &pauses {
            p.wake.notify_one();
        }
    }
}

/// Run the agent until SIGTERM/SIGINT.
pub fn run(config: &Path) -> Result<(), String> {
    let (cfg, config_sha256) = load_config_with_sha(config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run_async(cfg, config_sha256, config.to_path_buf()))
}

async fn run_async(
    cfg: AgentConfig,
    config_sha256: String,
    config_path: std::path::PathBuf,
) -> Result<(), String> {
    let timing = Timing::new(cfg.ha.ttl, cfg.ha.loop_wait, cfg.ha.retry_timeout);
    tracing::info!(cluster = %cfg.cluster, group = cfg.group, member = %cfg.member, ?timing, "agent starting");
    let api_tls = super::api::tls_config(&cfg)?;
    let pg = Pg::new(&cfg).map_err(|e| e.to_string())?;
    pg.prepare_host_files().map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;

    let dcs = tokio::select! {
        d = connect_dcs(&cfg, timing.call_timeout.max(Duration::from_secs(1))) => d,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let wake = Arc::new(Notify::new());
    let shared = LeaseShared::new(timing, wake.clone());
    // The quorum check after each renewal reads the group's leader key (counts only).
    let probe_key = ClusterKeys::new(&cfg.etcd.namespace, &cfg.cluster).leader(cfg.group);
    tokio::spawn(lease::keep_alive(dcs.clone(), shared.clone(), probe_key));
    let guard = super::guard::Guard::new(timing.margin, timing.ttl, &cfg.ha.watchdog);
    let guard_state = guard.state();
    tokio::spawn(lease::fence(shared.clone(), guard));
    let pauses = cfg
        .is_coordinator()
        .then(|| Arc::new(PauseShared::default()));
    tokio::spawn(watch(
        dcs.clone(),
        cfg.clone(),
        wake.clone(),
        pauses.clone(),
    ));
    if let Some(p) = &pauses {
        tokio::spawn(super::citus_pause::run(cfg.clone(), dcs.clone(), p.clone()));
    }
    let mut node = Node::new(cfg.clone(), LocalHost::new(pg), dcs, shared.clone());
    node.guard = guard_state;
    node.config_sha256 = config_sha256;
    node.pauses = pauses;
    let api = super::api::Handle::new(&node);
    super::api::serve(&cfg, api.clone(), api_tls);

    let mut pacer = Pacer::new(&cfg, wake.clone());
    loop {
        let ok = node.tick().await;
        pacer.cycled(ok);
        api.publish(&node);
        tokio::select! {
            _ = pacer.until_next(&mut node) => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                match load_config_with_sha(&config_path) {
                    Ok((new, sha)) if new == node.cfg => {
                        // Not while parameters wait for a restart: it does not run them yet.
                        if node.pending_config_sha256.is_none() {
                            node.config_sha256 = sha;
                        }
                        // Nothing new: look at roles, passwords and this node's
                        // pg_dist_authinfo row again (`apply` asks for this when they drifted).
                        tracing::info!("reload with the same configuration; checking the database setup again");
                        node.recheck_setup();
                        node.reset_alter_system().await;
                        wake.notify_one();
                    }
                    Ok((new, sha)) => match node.cfg.secret_changes(&new) {
                        // New passwords: applied in place, PostgreSQL keeps running.
                        Some(changed) => {
                            // Parameters still waiting for a restart stay waiting.
                            match node.pending_config_sha256.is_some() {
                                true => node.pending_config_sha256 = Some(sha),
                                false => node.config_sha256 = sha,
                            }
                            tracing::info!(?changed, "new secrets; reloaded without a restart");
                            api.set_auth(new.api.auth.clone());
                            if let Some(p) = &node.pauses {
                                p.set_config(new.clone());
                            }
                            if let Err(e) = node.reload_secrets(new) {
                                tracing::error!(error = %e, "cannot apply the new secrets");
                            }
                            wake.notify_one();
                        }
                        None if node.cfg.pooler_change_only(&new) => {
                            // PgBouncer restarts with its new settings on the next cycle;
                            // PostgreSQL and the agent keep running.
                            tracing::info!("citus.pooler changed; PgBouncer follows");
                            // Parameters still waiting for a restart stay waiting.
                            match node.pending_config_sha256.is_some() {
                                true => node.pending_config_sha256 = Some(sha),
                                false => node.config_sha256 = sha,
                            }
                            take_secrets_and_pause_settings(&mut node, &api, &new);
                            node.adopt_config(new);
                            wake.notify_one();
                        }
                        None if node.cfg.parameter_changes(&new).is_some() => {
                            // New parameters (and perhaps secrets): rewritten and reloaded in
                            // place. `plan` sends this only when PostgreSQL can take them all
                            // with a reload; any other stays pending until a restart.
                            let names = node.cfg.parameter_changes(&new).unwrap_or_default();
                            tracing::info!(?names, "new parameters; reloading PostgreSQL's configuration");
                            // Against the configuration in force, before anything adopts `new`.
                            let lowered = crate::postgres::conf::lowered_standby_minimums(
                                &crate::postgres::conf::render_postgresql_conf(&node.cfg),
                                &crate::postgres::conf::render_postgresql_conf(&new),
                            );
                            take_secrets_and_pause_settings(&mut node, &api, &new);
                            match node.reload_parameters(new).await {
                                // A primary lowering what standbys need restarts in place, keeping
                                // its leadership, before its replicas take the lower value (a
                                // restart as a standby would refuse values below those its
                                // control file records). Always: a reload never lowers them.
                                Ok(pending) if !lowered.is_empty() && node.is_running_primary() => {
                                    tracing::info!(?lowered, ?pending, "lowering what standbys need: restarting the primary in place");
                                    node.pending_config_sha256 = Some(sha);
                                    if let Ok(mut q) = node.requests.lock() {
                                        q.push_back(super::node::Request::Restart);
                                    }
                                }
                                Ok(pending) if pending.is_empty() => node.config_sha256 = sha,
                                // The old values stay in effect: `plan` sees an agent running an
                                // older configuration than its file, and restarts it.
                                Ok(pending) => {
                                    tracing::warn!(?pending, "parameters need a restart to take effect");
                                    node.pending_config_sha256 = Some(sha);
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "cannot reload the configuration");
                                    node.pending_config_sha256 = Some(sha);
                                }
                            }
                            wake.notify_one();
                        }
                        None => {
                            // Anything else is applied by a fresh start (the supervisor restarts
                            // us): simpler and always correct. Leadership is handed over cleanly.
                            tracing::info!("configuration changed; restarting");
                            node.shutdown().await;
                            std::process::exit(75);
                        }
                    },
                    Err(e) => tracing::error!(error = %e, "new configuration unreadable; keeping the old one"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// When the loop runs its next cycle.
pub struct Pacer {
    loop_wait: Duration,
    wake: Arc<Notify>,
    /// After failed cycles, watch events wake the loop only after a growing pause: members
    /// failing together would otherwise wake each other with every key they publish.
    failed_cycles: u32,
}

impl Pacer {
    pub fn new(cfg: &AgentConfig, wake: Arc<Notify>) -> Pacer {
        Pacer {
            loop_wait: Duration::from_secs(u64::from(cfg.ha.loop_wait.max(1))),
            wake,
            failed_cycles: 0,
        }
    }

    /// A cycle ended, well or not.
    pub fn cycled(&mut self, ok: bool) {
        self.failed_cycles = match ok {
            true => 0,
            false => self.failed_cycles.saturating_add(1),
        };
    }

    /// Until the next cycle is due: `loop_wait` passed, something woke the loop (after the
    /// pause failed cycles earn), or PostgreSQL exited.
    pub async fn until_next<H: Host>(&self, node: &mut Node<H>) {
        let hold = retry_pause(self.failed_cycles, self.loop_wait);
        let woken = async {
            tokio::time::sleep(hold).await;
            self.wake.notified().await;
        };
        let postmaster_exit = async {
            match node.postmaster.as_mut() {
                Some(pm) => pm.wait().await,
                None => std::future::pending::<()>().await,
            }
        };
        // In order, not at random: the same inputs give the same cycles (the simulation).
        tokio::select! {
            biased;
            _ = postmaster_exit => {}
            _ = woken => {}
            _ = tokio::time::sleep(self.loop_wait) => {}
        }
    }
}

/// The new secrets of a configuration taken without a restart (passfile now, roles and
/// authinfo on the next cycle), and its write-pause settings.
fn take_secrets_and_pause_settings(node: &mut Node, api: &super::api::Handle, new: &AgentConfig) {
    if node.cfg.secret_digests() != new.secret_digests() {
        api.set_auth(new.api.auth.clone());
        if let Err(e) = node.reload_secrets(new.clone()) {
            tracing::error!(error = %e, "cannot apply the new secrets");
        }
    }
    if let Some(p) = &node.pauses {
        p.set_config(new.clone());
    }
}

/// How long watch events may not wake the loop after `failed` failed cycles in a row: none
/// after a good cycle, then 100 ms doubling up to `loop_wait`.
fn retry_pause(failed: u32, loop_wait: Duration) -> Duration {
    if failed == 0 {
        return Duration::ZERO;
    }
    (Duration::from_millis(100) * 2u32.saturating_pow(failed.min(16) - 1)).min(loop_wait)
}

/// `agent --supervise`: keep an agent child running; restart it whenever it exits, with
/// backoff; forward SIGTERM/SIGHUP; write the pid file.
pub fn supervise(config: &Path, pid_file: Option<&Path>, extra: &[String]) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        if let Some(p) = pid_file {
            std::fs::write(p, format!("{}\n", std::process::id()))
                .map_err(|e| format!("write {}: {e}", p.display()))?;
        }
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
        // A crashed agent should be back while its lease still holds the leader key.
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("agent").arg("--config").arg(config).args(extra);
            // SAFETY: prctl is async-signal-safe: if the supervisor dies, the agent stops cleanly.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start the agent: {e}"))?;
            let pid = child.id().unwrap_or(0) as libc::pid_t;
            let started = std::time::Instant::now();
            let forward = |sig| {
                // SAFETY: kill(2) on our own child.
                unsafe {
                    libc::kill(pid, sig);
                }
            };
            let stop = loop {
                tokio::select! {
                    status = child.wait() => {
                        tracing::warn!(status = ?status.ok(), "agent exited; restarting");
                        break false;
                    }
                    _ = hup.recv() => forward(libc::SIGHUP),
                    _ = term.recv() => break true,
                    _ = int.recv() => break true,
                }
            };
            if stop {
                forward(libc::SIGTERM);
                if tokio::time::timeout(Duration::from_secs(90), child.wait())
                    .await
                    .is_err()
                {
                    forward(libc::SIGKILL);
                    let _ = child.wait().await;
                }
                if let Some(p) = pid_file {
                    let _ = std::fs::remove_file(p);
                }
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_millis(200);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_pause_grows_to_loop_wait() {
        let lw = Duration::from_secs(10);
        let cases = [
            (0, 0),
            (1, 100),
            (2, 200),
            (3, 400),
            (7, 6400),
            (8, 10_000),
            (u32::MAX, 10_000),
        ];
        for (failed, ms) in cases {
            assert_eq!(
                retry_pause(failed, lw),
                Duration::from_millis(ms),
                "failed={failed}"
            );
        }
    }
}
