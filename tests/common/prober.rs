//! A split-brain prober: one writer per member of a group, each trying an INSERT every few
//! milliseconds directly against that member, recording when it was accepted. A member's
//! *streak* is a run of consecutive accepted writes; two members whose streaks overlap in time
//! both accepted writes at once — the thing that must never happen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Attempt {
    pub member: String,
    pub started: Duration,
    pub ended: Duration,
    pub ok: bool,
    pub id: i64,
}

pub struct Prober {
    stop: Arc<AtomicBool>,
    pub log: Arc<Mutex<Vec<Attempt>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub t0: Instant,
}

fn connect(addr: &str, port: u16) -> Option<postgres_sync::Client> {
    postgres_sync::Client::connect(addr, port)
}

/// A tiny blocking wrapper around tokio-postgres for the prober threads.
pub mod postgres_sync {
    pub struct Client {
        rt: tokio::runtime::Runtime,
        client: tokio_postgres::Client,
    }

    impl Client {
        pub fn connect(addr: &str, port: u16) -> Option<Client> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            let conninfo = format!(
                "host={addr} port={port} user=postgres password=lab-superuser-pw dbname=postgres connect_timeout=1 options='-c statement_timeout=1000'"
            );
            let client = rt.block_on(async {
                let (client, conn) = tokio::time::timeout(
                    std::time::Duration::from_millis(1500),
                    tokio_postgres::connect(&conninfo, tokio_postgres::NoTls),
                )
                .await
                .ok()?
                .ok()?;
                tokio::spawn(conn);
                Some(client)
            })?;
            Some(Client { rt, client })
        }

        pub fn execute(&mut self, sql: &str) -> Result<u64, String> {
            let c = &self.client;
            self.rt.block_on(async {
                match tokio::time::timeout(
                    std::time::Duration::from_millis(1500),
                    c.execute(sql, &[]),
                )
                .await
                {
                    Ok(Ok(n)) => Ok(n),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timeout".into()),
                }
            })
        }

        pub fn query_ids(&mut self, sql: &str) -> Result<Vec<i64>, String> {
            let c = &self.client;
            self.rt.block_on(async {
                c.query(sql, &[])
                    .await
                    .map(|rows| rows.iter().map(|r| r.get::<_, i64>(0)).collect())
                    .map_err(|e| e.to_string())
            })
        }
    }
}

impl Prober {
    /// Create the probe table through whichever member accepts it, then start one writer per member.
    pub fn start(members: &[(String, String, u16)], every: Duration) -> Prober {
        // Retried for a while: a load balancer in front may not have marked a server up yet.
        let mut created = false;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !created && Instant::now() < deadline {
            for (_, addr, port) in members {
                if let Some(mut c) = connect(addr, *port) {
                    if c.execute("CREATE TABLE IF NOT EXISTS probe (id bigint primary key, member text, at timestamptz default now())").is_ok() {
                        created = true;
                        break;
                    }
                }
            }
            if !created {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        assert!(created, "no member accepted the probe table");
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        // One id sequence for every prober of the process: two probers may share a table.
        static NEXT_ID: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
        let mut threads = Vec::new();
        for (name, addr, port) in members.iter().cloned() {
            let (stop, log) = (stop.clone(), log.clone());
            threads.push(std::thread::spawn(move || {
                let mut client = None;
                while !stop.load(Ordering::SeqCst) {
                    let started = t0.elapsed();
                    if client.is_none() {
                        client = connect(&addr, port);
                    }
                    let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
                    let ok = match client.as_mut() {
                        Some(c) => match c.execute(&format!(
                            "INSERT INTO probe (id, member) VALUES ({id}, '{name}')"
                        )) {
                            Ok(_) => true,
                            Err(_) => {
                                client = None;
                                false
                            }
                        },
                        None => false,
                    };
                    let ended = t0.elapsed();
                    if let Ok(mut l) = log.lock() {
                        l.push(Attempt {
                            member: name.clone(),
                            started,
                            ended,
                            ok,
                            id,
                        });
                    }
                    std::thread::sleep(every);
                }
            }));
        }
        Prober {
            stop,
            log,
            threads,
            t0,
        }
    }

    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// Streaks of accepted writes per member: (member, first start, last end).
pub fn streaks(attempts: &[Attempt]) -> Vec<(String, Duration, Duration)> {
    let mut by_member: std::collections::BTreeMap<&str, Vec<&Attempt>> =
        std::collections::BTreeMap::new();
    for a in attempts {
        by_member.entry(&a.member).or_default().push(a);
    }
    let mut out = Vec::new();
    for (m, mut list) in by_member {
        list.sort_by_key(|a| a.started);
        let mut current: Option<(Duration, Duration)> = None;
        for a in list {
            match (a.ok, current) {
                (true, None) => current = Some((a.started, a.ended)),
                (true, Some((s, _))) => current = Some((s, a.ended)),
                (false, Some((s, e))) => {
                    out.push((m.to_string(), s, e));
                    current = None;
                }
                (false, None) => {}
            }
        }
        if let Some((s, e)) = current {
            out.push((m.to_string(), s, e));
        }
    }
    out
}

/// Panics if two members accepted writes at overlapping times.
pub fn assert_no_split_brain(attempts: &[Attempt]) {
    let s = streaks(attempts);
    for (i, a) in s.iter().enumerate() {
        for b in &s[i + 1..] {
            if a.0 != b.0 && a.1 < b.2 && b.1 < a.2 {
                panic!(
                    "split brain: {} accepted writes {:?}..{:?} while {} accepted writes {:?}..{:?}",
                    a.0, a.1, a.2, b.0, b.1, b.2
                );
            }
        }
    }
    assert!(!s.is_empty(), "no member ever accepted a write");
}

/// The longest time with no accepted write at all, after the first accepted write and before
/// the last.
pub fn longest_gap(attempts: &[Attempt]) -> Duration {
    let mut ok: Vec<&Attempt> = attempts.iter().filter(|a| a.ok).collect();
    ok.sort_by_key(|a| a.ended);
    ok.windows(2)
        .map(|w| w[1].ended.saturating_sub(w[0].ended))
        .max()
        .unwrap_or_default()
}

/// Ids of accepted writes.
pub fn acknowledged(attempts: &[Attempt]) -> Vec<i64> {
    attempts.iter().filter(|a| a.ok).map(|a| a.id).collect()
}
