//! Progress of `apply`: a spinner per host on a terminal, plain timestamped lines otherwise
//! (CI logs). Output goes to stderr; stdout stays for the plan and results.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct Progress {
    bars: Option<(MultiProgress, BTreeMap<String, ProgressBar>)>,
    started: Instant,
    lines: Mutex<()>,
    /// JSON lines on stdout instead (`apply --json`).
    json: bool,
}

/// Version of the JSON progress lines.
pub const JSON_FORMAT_VERSION: u32 = 1;

/// One JSON line on stdout: `{"format_version", "time", "event", …fields}`.
pub fn json_line(event: &str, fields: serde_json::Value) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut v = serde_json::json!({
        "format_version": JSON_FORMAT_VERSION,
        "time": crate::dcs::keys::format_rfc3339(now),
        "event": event,
    });
    if let (Some(o), Some(extra)) = (v.as_object_mut(), fields.as_object()) {
        o.extend(extra.clone());
    }
    println!("{v}");
}

impl Progress {
    pub fn new(hosts: &[String]) -> Progress {
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let style = ProgressStyle::with_template("{spinner} {prefix:<14} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            let bars = hosts
                .iter()
                .map(|h| {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(style.clone());
                    bar.set_prefix(h.clone());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    (h.clone(), bar)
                })
                .collect();
            (multi, bars)
        });
        Progress {
            bars,
            started: Instant::now(),
            lines: Mutex::new(()),
            json: false,
        }
    }

    /// JSON lines on stdout (`apply --json`): one per step, for CI logs a program reads.
    pub fn json() -> Progress {
        Progress {
            json: true,
            ..Progress::lines()
        }
    }

    /// Plain timestamped lines even on a terminal (a long-running `watch` prints its own
    /// lines between applies; spinners would fight them).
    pub fn lines() -> Progress {
        Progress {
            bars: None,
            started: Instant::now(),
            lines: Mutex::new(()),
            json: false,
        }
    }

    pub fn step(&self, host: &str, what: &str) {
        if self.json {
            return self.json_event("step", host, what);
        }
        match &self.bars {
            Some((_, bars)) => {
                if let Some(b) = bars.get(host) {
                    b.set_message(what.to_string());
                }
            }
            None => self.line(host, what),
        }
    }

    pub fn done(&self, host: &str, what: &str) {
        if self.json {
            return self.json_event("done", host, what);
        }
        match &self.bars {
            Some((_, bars)) => {
                if let Some(b) = bars.get(host) {
                    b.finish_with_message(what.to_string());
                }
            }
            None => self.line(host, what),
        }
    }

    pub fn note(&self, what: &str) {
        if self.json {
            return self.json_event("note", "", what);
        }
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(what);
            }
            None => self.line("", what),
        }
    }

    fn json_event(&self, event: &str, host: &str, what: &str) {
        let _guard = self.lines.lock();
        let mut fields = serde_json::json!({
            "elapsed_s": (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "message": what,
        });
        if !host.is_empty() {
            fields["host"] = host.into();
        }
        json_line(event, fields);
    }

    fn line(&self, host: &str, what: &str) {
        let _guard = self.lines.lock();
        let t = self.started.elapsed().as_secs_f64();
        if host.is_empty() {
            eprintln!("[{t:6.1}s] {what}");
        } else {
            eprintln!("[{t:6.1}s] {host}: {what}");
        }
    }

    pub fn finish(&self) {
        if let Some((_, bars)) = &self.bars {
            for b in bars.values() {
                if !b.is_finished() {
                    b.finish();
                }
            }
        }
    }
}
