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
        }
    }

    /// Plain timestamped lines even on a terminal (a long-running `watch` prints its own
    /// lines between applies; spinners would fight them).
    pub fn lines() -> Progress {
        Progress {
            bars: None,
            started: Instant::now(),
            lines: Mutex::new(()),
        }
    }

    pub fn step(&self, host: &str, what: &str) {
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
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(what);
            }
            None => self.line("", what),
        }
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
