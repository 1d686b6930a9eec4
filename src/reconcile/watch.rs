//! `watch`: continuous reconciliation. Observes the cluster at start, whenever the spec file
//! or a secret file it names changes (inotify, debounced), and every interval; prints drift
//! as it appears and as it goes away (each item once, see `plan::drift`); with `repair`,
//! applies everything but removals under the apply lock, taken only while applying. An
//! invalid edit of the spec is reported and the last valid spec stays in force; unreachable
//! hosts and etcd outages are reported and retried with backoff; SIGTERM/SIGINT stop it
//! cleanly (a repair in progress stops before its next step and releases the lock).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::progress::Progress;
use super::{Options, Run, apply};
use crate::plan::Phase;
use crate::plan::drift::{self, Event, Tracker};
use crate::spec::{self, Spec};

/// How long file events settle before the spec is read again (an editor writes in steps).
const FILE_SETTLE: Duration = Duration::from_millis(150);

/// Longest wait between observations while they keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub struct WatchOptions {
    pub spec: PathBuf,
    pub run: Options,
    pub interval: Duration,
    pub repair: bool,
    pub json: bool,
    pub listen: Option<SocketAddr>,
}

/// What `/metrics` shows.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Drift items by kind; a kind once seen stays, at 0, so alerts see it clear.
    pub drift: BTreeMap<String, usize>,
    pub observations: u64,
    pub last_complete_observation: Option<f64>,
    pub errors: BTreeMap<&'static str, u64>,
    pub applies: BTreeMap<&'static str, u64>,
    pub last_apply: Option<(f64, bool)>,
    pub spec_valid: bool,
}

impl Metrics {
    fn set_drift(&mut self, counts: BTreeMap<String, usize>) {
        for v in self.drift.values_mut() {
            *v = 0;
        }
        self.drift.extend(counts);
    }

    fn error(&mut self, stage: &'static str) {
        *self.errors.entry(stage).or_insert(0) += 1;
    }

    /// Prometheus text exposition.
    pub fn render(&self, cluster: &str) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, value) in samples {
                let sep = if labels.is_empty() { "" } else { "," };
                out.push_str(&format!(
                    "{name}{{cluster=\"{cluster}\"{sep}{labels}}} {value}\n"
                ));
            }
        };
        family(
            "citus_reconcile_drift_items",
            "gauge",
            "Differences from the spec by plan action type (error: a part of the cluster could not be observed)",
            self.drift
                .iter()
                .map(|(k, v)| (format!("kind=\"{k}\""), v.to_string()))
                .collect(),
        );
        family(
            "citus_reconcile_in_sync",
            "gauge",
            "1 when the last observation found nothing to change and no error",
            vec![(
                String::new(),
                u8::from(self.observations > 0 && self.drift.values().all(|v| *v == 0)).to_string(),
            )],
        );
        family(
            "citus_reconcile_observations_total",
            "counter",
            "Observations made",
            vec![(String::new(), self.observations.to_string())],
        );
        family(
            "citus_reconcile_last_complete_observation_timestamp_seconds",
            "gauge",
            "When every host and etcd were last observed without error (0: never)",
            vec![(
                String::new(),
                format!("{:.3}", self.last_complete_observation.unwrap_or(0.0)),
            )],
        );
        family(
            "citus_reconcile_errors_total",
            "counter",
            "Errors by stage: observe (host or etcd unreachable), spec (invalid edit), repair",
            ["observe", "spec", "repair"]
                .iter()
                .map(|s| {
                    (
                        format!("stage=\"{s}\""),
                        self.errors.get(s).copied().unwrap_or(0).to_string(),
                    )
                })
                .collect(),
        );
        family(
            "citus_reconcile_applies_total",
            "counter",
            "Repairs applied, by outcome",
            ["ok", "failed"]
                .iter()
                .map(|s| {
                    (
                        format!("outcome=\"{s}\""),
                        self.applies.get(s).copied().unwrap_or(0).to_string(),
                    )
                })
                .collect(),
        );
        family(
            "citus_reconcile_last_apply_timestamp_seconds",
            "gauge",
            "When the last repair ended (0: none yet)",
            vec![(
                String::new(),
                format!("{:.3}", self.last_apply.map(|a| a.0).unwrap_or(0.0)),
            )],
        );
        family(
            "citus_reconcile_last_apply_success",
            "gauge",
            "1 when the last repair succeeded (also 1 before any)",
            vec![(
                String::new(),
                u8::from(self.last_apply.is_none_or(|a| a.1)).to_string(),
            )],
        );
        family(
            "citus_reconcile_spec_valid",
            "gauge",
            "0 while the spec file holds an invalid edit (the last valid spec stays in force)",
            vec![(String::new(), u8::from(self.spec_valid).to_string())],
        );
        out
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The wait before the next observation: the interval, doubled per failure in a row.
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let doubled = interval.saturating_mul(1u32 << failures.min(5));
    doubled.min(MAX_BACKOFF.max(interval))
}

/// Lines on stdout: text for people, or JSON lines with a format version.
struct Out {
    json: bool,
}

impl Out {
    fn emit(&self, event: &str, text: &str, fields: serde_json::Value) {
        if self.json {
            super::progress::json_line(event, fields);
        } else {
            let time = crate::dcs::keys::format_rfc3339(unix_now() as i64);
            for (i, line) in text.lines().enumerate() {
                match i {
                    0 => println!("{time} {event:<9} {line}"),
                    _ => println!("{:>30} {line}", ""),
                }
            }
        }
    }

    fn drift(&self, e: &Event) {
        let (name, item) = match e {
            Event::Drift(i) => ("drift", i),
            Event::Resolved(i) => ("resolved", i),
        };
        let mut text = item.line();
        if name == "drift" && item.is_destroy() {
            text.push_str(" (removals are never repaired: apply --allow-destroy)");
        }
        if let (Some(d), "drift") = (&item.diff, name) {
            text.push('\n');
            text.push_str(d.trim_end());
        }
        self.emit(
            name,
            &text,
            serde_json::to_value(item).unwrap_or(serde_json::Value::Null),
        );
    }

    fn note(&self, event: &str, text: &str) {
        self.emit(event, text, serde_json::json!({ "message": text }));
    }
}

/// File events for the spec and the secret files it names, as a wake-up channel.
struct FileWatch {
    debouncer: notify_debouncer_full::Debouncer<
        notify_debouncer_full::notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    /// Watched folders (editors replace files by renaming, so the folder is watched).
    dirs: BTreeSet<PathBuf>,
    files: Arc<Mutex<BTreeSet<PathBuf>>>,
}

/// `path` made absolute through its folder, which must exist.
fn anchored(path: &Path) -> Option<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(dir.canonicalize().ok()?.join(path.file_name()?))
}

impl FileWatch {
    fn new(wake: mpsc::UnboundedSender<()>) -> Result<FileWatch, String> {
        let files: Arc<Mutex<BTreeSet<PathBuf>>> = Default::default();
        let followed = files.clone();
        let debouncer = notify_debouncer_full::new_debouncer(
            FILE_SETTLE,
            None,
            move |r: notify_debouncer_full::DebounceEventResult| {
                let Ok(events) = r else { return };
                let Ok(files) = followed.lock() else { return };
                // Not accesses: reading the spec is one, and would wake this again.
                if events
                    .iter()
                    .filter(|e| !e.kind.is_access())
                    .flat_map(|e| e.paths.iter())
                    .any(|p| files.contains(p))
                {
                    let _ = wake.send(());
                }
            },
        )
        .map_err(|e| format!("cannot watch files: {e}"))?;
        Ok(FileWatch {
            debouncer,
            dirs: BTreeSet::new(),
            files,
        })
    }

    /// Follow these files from now on (and only these).
    fn follow(&mut self, paths: &[PathBuf]) -> Vec<String> {
        let mut problems = Vec::new();
        let wanted: BTreeSet<PathBuf> = paths.iter().filter_map(|p| anchored(p)).collect();
        for p in paths {
            if anchored(p).is_none() {
                problems.push(format!(
                    "cannot follow {}: its folder is missing",
                    p.display()
                ));
            }
        }
        let dirs: BTreeSet<PathBuf> = wanted
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        for d in dirs.difference(&self.dirs) {
            if let Err(e) = self.debouncer.watch(
                d,
                notify_debouncer_full::notify::RecursiveMode::NonRecursive,
            ) {
                problems.push(format!("cannot watch {}: {e}", d.display()));
            }
        }
        for d in self.dirs.difference(&dirs) {
            let _ = self.debouncer.unwatch(d);
        }
        self.dirs = dirs;
        if let Ok(mut f) = self.files.lock() {
            *f = wanted;
        }
        problems
    }
}

/// Whether the files' contents differ from `last` (a digest, updated): an editor's save or a
/// `cp` comes as several file events, and touching a file changes nothing.
fn inputs_changed(files: &[PathBuf], last: &mut String) -> bool {
    let digest: Vec<String> = files
        .iter()
        .map(|f| match std::fs::read(f) {
            Ok(bytes) => super::sha256_hex(&bytes),
            Err(e) => format!("unreadable: {}", e.kind()),
        })
        .collect();
    let digest = digest.join(",");
    let changed = digest != *last;
    *last = digest;
    changed
}

/// Serve `/metrics` on `addr` (bound before returning, so a wrong address fails at start).
async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Mutex<Metrics>>,
    cluster: Arc<Mutex<String>>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = match (metrics.lock(), cluster.lock()) {
                (Ok(m), Ok(c)) => m.render(&c),
                _ => String::new(),
            };
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    text,
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}

fn load(path: &Path) -> spec::Report {
    spec::load_file(path, spec::LoadOptions::default())
}

/// Run until SIGTERM/SIGINT. Err only for what stops it from starting.
pub async fn watch(o: WatchOptions) -> Result<(), String> {
    let out = Out { json: o.json };
    let first = load(&o.spec);
    let Some(mut spec) = first.spec.clone().filter(|_| !first.has_errors()) else {
        eprint!("{}", first.render());
        return Err(format!(
            "{}: not a valid spec; nothing was watched",
            o.spec.display()
        ));
    };
    eprint!("{}", first.render());
    let metrics = Arc::new(Mutex::new(Metrics {
        spec_valid: true,
        ..Default::default()
    }));
    let cluster = Arc::new(Mutex::new(spec.cluster.clone()));
    if let Some(addr) = o.listen {
        serve_metrics(addr, metrics.clone(), cluster.clone()).await?;
    }
    let (wake_tx, mut wake) = mpsc::unbounded_channel();
    let mut files = FileWatch::new(wake_tx)?;
    let follow = |spec: &Spec| {
        let mut paths = vec![o.spec.clone()];
        paths.extend(spec.secret_files());
        paths
    };
    for p in files.follow(&follow(&spec)) {
        out.note("warning", &p);
    }
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    out.note(
        "started",
        &format!(
            "watching {} (cluster {}): every {}s, on every edit of the spec or its secret files; {}",
            o.spec.display(),
            spec.cluster,
            o.interval.as_secs_f64(),
            match o.repair {
                true => "repairing what is safe (never removals)",
                false => "reporting only",
            }
        ),
    );

    let mut inputs = String::new();
    inputs_changed(&follow(&spec), &mut inputs);
    let mut run: Option<Run> = None;
    let mut tracker = Tracker::default();
    let mut failures = 0u32;
    let mut reconnect = false;
    let mut said_in_sync = false;
    let mut reread = false;
    loop {
        if std::mem::take(&mut reread) && inputs_changed(&follow(&spec), &mut inputs) {
            let report = load(&o.spec);
            match report.spec.clone().filter(|_| !report.has_errors()) {
                Some(next) => {
                    if let Ok(mut m) = metrics.lock() {
                        m.spec_valid = true;
                    }
                    out.note(
                        "spec",
                        &format!("{} changed: planning again", o.spec.display()),
                    );
                    for p in files.follow(&follow(&next)) {
                        out.note("warning", &p);
                    }
                    if let Ok(mut c) = cluster.lock() {
                        c.clone_from(&next.cluster);
                    }
                    spec = next;
                    if let Some(r) = run.take() {
                        match r.can_serve(&spec) {
                            true => run = Some(r.with_spec(&spec)),
                            false => r.close().await,
                        }
                    }
                }
                None => {
                    if let Ok(mut m) = metrics.lock() {
                        m.spec_valid = false;
                        m.error("spec");
                    }
                    let text = format!(
                        "{} is not valid; the last valid spec stays in force:\n{}",
                        o.spec.display(),
                        report.render().trim_end()
                    );
                    match o.json {
                        true => out.emit(
                            "spec_invalid",
                            &text,
                            serde_json::json!({
                                "spec": o.spec.display().to_string(),
                                "diagnostics": spec::diagnostic::to_json(&o.spec, &report.diagnostics),
                            }),
                        ),
                        false => out.note("invalid", &text),
                    }
                }
            }
        }
        if reconnect {
            if let Some(r) = run.take() {
                r.close().await;
            }
        }
        if run.is_none() {
            run = Some(
                Run::open(&spec, o.run.clone())
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let Some(r) = run.as_ref() else { continue };
        let observed = r.observe().await;
        let plan = r.plan(&observed);
        let complete = plan.errors.is_empty();
        // A host or etcd that failed may come back on a new connection only.
        reconnect = !complete;
        failures = if complete { 0 } else { failures + 1 };
        let events = tracker.update(drift::items(&plan));
        for e in &events {
            out.drift(e);
        }
        if tracker.is_empty() && !said_in_sync {
            out.note("in_sync", "the cluster matches the spec");
        }
        said_in_sync = tracker.is_empty();
        if let Ok(mut m) = metrics.lock() {
            m.observations += 1;
            if complete {
                m.last_complete_observation = Some(unix_now());
            } else {
                m.error("observe");
            }
            m.set_drift(tracker.counts_by_kind());
        }

        let mut repaired = false;
        let fix = drift::without_destroys(&plan);
        // Only what `apply` itself does: items the agents settle on their own (a member
        // coming up, a row they are about to move) are reported, not waited for under the
        // lock, which would keep a pipeline's apply out meanwhile.
        let actionable = fix
            .actions
            .iter()
            .any(|a| a.phase < Phase::Converge || a.phase == Phase::Rebalance);
        if o.repair && complete && actionable {
            out.note(
                "repair",
                &format!(
                    "applying {} item(s) under the apply lock",
                    fix.actions.len()
                ),
            );
            let started = Instant::now();
            let progress = Arc::new(Progress::lines());
            let applying = apply::apply(r, &fix, &observed, &progress);
            tokio::pin!(applying);
            let mut stop = false;
            let result = tokio::select! {
                res = &mut applying => res,
                _ = term.recv() => { stop = true; r.stop_requested.store(true, Ordering::SeqCst); applying.await }
                _ = int.recv() => { stop = true; r.stop_requested.store(true, Ordering::SeqCst); applying.await }
            };
            let ok = result.is_ok();
            if let Ok(mut m) = metrics.lock() {
                *m.applies
                    .entry(if ok { "ok" } else { "failed" })
                    .or_insert(0) += 1;
                m.last_apply = Some((unix_now(), ok));
                if !ok {
                    m.error("repair");
                }
            }
            match result {
                Ok(_) => out.note(
                    "repaired",
                    &format!("applied in {:.1}s", started.elapsed().as_secs_f64()),
                ),
                Err(e) => {
                    failures += 1;
                    out.note("repair_failed", &format!("{e}; trying again later"));
                }
            }
            if stop {
                break;
            }
            repaired = ok;
        }

        // Right after a repair, look again at once: what it fixed is reported resolved.
        let delay = match repaired {
            true => Duration::ZERO,
            false => backoff(o.interval, failures),
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            Some(()) = wake.recv() => {
                while wake.try_recv().is_ok() {}
                reread = true;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if let Some(r) = run.take() {
        r.close().await;
    }
    out.note("stopped", "stopped on request");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_failure_up_to_a_ceiling() {
        let s = Duration::from_secs;
        for (interval, failures, want) in [
            (s(30), 0, s(30)),
            (s(30), 1, s(60)),
            (s(30), 3, s(240)),
            (s(30), 9, s(300)),
            (s(1), 4, s(16)),
            (s(1), 40, s(32)),
            (s(600), 2, s(600)),
        ] {
            assert_eq!(backoff(interval, failures), want, "{interval:?} {failures}");
        }
    }

    #[test]
    fn metrics_keep_cleared_kinds_at_zero() {
        let mut m = Metrics::default();
        m.set_drift([("start_agent".to_string(), 2)].into());
        m.set_drift(BTreeMap::new());
        m.error("observe");
        let text = m.render("c");
        assert!(text.contains("citus_reconcile_drift_items{cluster=\"c\",kind=\"start_agent\"} 0"));
        assert!(text.contains("citus_reconcile_errors_total{cluster=\"c\",stage=\"observe\"} 1"));
        assert!(text.contains("citus_reconcile_last_apply_success{cluster=\"c\"} 1"));
    }
}
