//! An application's view of the cluster: SQL through the coordinator, connected as an
//! application would be — libpq's multi-host list of every coordinator member with
//! `target_session_attrs=read-write`, reconnecting on error — and a writer that inserts every
//! few milliseconds and records what was acknowledged, what failed and how long it waited.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::TestLab;

pub const PASSWORD: &str = "lab-superuser-pw";

/// The superuser password of each lab host, by address, once a test rotated it. Keyed by
/// address, not global: tests run in parallel in one process, each on its own subnet, and a
/// rotation in one lab must not change the password another lab's connections use.
static ROTATED_PASSWORDS: std::sync::Mutex<Vec<(String, String)>> =
    std::sync::Mutex::new(Vec::new());

/// From now on, connections to this lab's hosts log in with `p`.
pub fn set_password(t: &TestLab, p: &str) {
    if let Ok(mut all) = ROTATED_PASSWORDS.lock() {
        for h in t.spec.hosts() {
            all.retain(|(a, _)| *a != h.address);
            all.push((h.address.clone(), p.to_string()));
        }
    }
}

fn password(address: &str) -> String {
    ROTATED_PASSWORDS
        .lock()
        .ok()
        .and_then(|all| {
            all.iter()
                .find(|(a, _)| a == address)
                .map(|(_, p)| p.clone())
        })
        .unwrap_or_else(|| PASSWORD.to_string())
}

/// A blocking SQL client (its own small runtime), for test threads.
pub struct Sql {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

/// libpq connection string for `hosts` (one or more "addr" or "addr:port").
pub fn conninfo(hosts: &[(String, u16)], dbname: &str, extra: &str) -> String {
    let h: Vec<&str> = hosts.iter().map(|(a, _)| a.as_str()).collect();
    let p: Vec<String> = hosts.iter().map(|(_, p)| p.to_string()).collect();
    format!(
        "host={} port={} user=postgres password={} dbname={dbname} connect_timeout=2 target_session_attrs=read-write {extra}",
        h.join(","),
        p.join(","),
        password(h.first().copied().unwrap_or_default())
    )
}

impl Sql {
    /// Connect (bounded) to the first member of `hosts` that accepts writes.
    pub fn connect(hosts: &[(String, u16)], dbname: &str) -> Result<Sql, String> {
        Self::connect_with(&conninfo(hosts, dbname, ""))
    }

    /// Connect to this very server, primary or standby.
    pub fn connect_any(host: &(String, u16), dbname: &str) -> Result<Sql, String> {
        Self::connect_with(
            &conninfo(std::slice::from_ref(host), dbname, "")
                .replace("target_session_attrs=read-write", ""),
        )
    }

    pub fn connect_with(conninfo: &str) -> Result<Sql, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let client = rt.block_on(async {
            let (client, conn) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_postgres::connect(conninfo, tokio_postgres::NoTls),
            )
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| message(&e))?;
            tokio::spawn(conn);
            Ok::<_, String>(client)
        })?;
        Ok(Sql { rt, client })
    }

    /// Run statements; the error is the server's message.
    pub fn exec(&mut self, sql: &str) -> Result<(), String> {
        self.exec_timeout(sql, Duration::from_secs(60))
    }

    pub fn exec_timeout(&mut self, sql: &str, timeout: Duration) -> Result<(), String> {
        let c = &self.client;
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, c.batch_execute(sql)).await {
                Ok(r) => r.map_err(|e| message(&e)),
                Err(_) => Err("timeout".into()),
            }
        })
    }

    /// One column of text from every row.
    pub fn strings(&mut self, sql: &str) -> Result<Vec<String>, String> {
        let c = &self.client;
        self.rt.block_on(async {
            let rows = tokio::time::timeout(Duration::from_secs(60), c.simple_query(sql))
                .await
                .map_err(|_| "timeout".to_string())?
                .map_err(|e| message(&e))?;
            Ok(rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some(r.get(0).unwrap_or("").to_string())
                    }
                    _ => None,
                })
                .collect())
        })
    }

    pub fn one(&mut self, sql: &str) -> Result<String, String> {
        self.strings(sql)?
            .into_iter()
            .next()
            .ok_or_else(|| format!("no row from {sql}"))
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

pub fn message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

/// One insert the writer tried.
#[derive(Debug, Clone)]
pub struct Insert {
    pub id: i64,
    pub started: Duration,
    pub ended: Duration,
    pub ok: bool,
    pub error: Option<String>,
}

/// Reads through the coordinator every `every` in sessions with `options` (say
/// `-c citus.use_secondary_nodes=always`), reconnecting after an error; counts answers that
/// match `expected`, answers that do not (a read served by a member that lags or does not
/// stream) and failures.
pub struct Reader {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<ReadCounts>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default, Clone)]
pub struct ReadCounts {
    pub ok: u32,
    pub wrong: Vec<String>,
    pub failed: u32,
    pub first_error: Option<String>,
}

impl Reader {
    pub fn start(
        hosts: &[(String, u16)],
        options: &str,
        query: &str,
        expected: &str,
        every: Duration,
    ) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(ReadCounts::default()));
        let conninfo = conninfo(hosts, "citus", &format!("options='{options}'"));
        let (query, expected) = (query.to_string(), expected.to_string());
        let thread = {
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || {
                let mut sql: Option<Sql> = None;
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    if sql.is_none() {
                        sql = Sql::connect_with(&conninfo).ok();
                    }
                    let result = match sql.as_mut() {
                        Some(s) => s.one(&query),
                        None => Err("cannot connect".to_string()),
                    };
                    if let Ok(mut c) = counts.lock() {
                        match result {
                            Ok(v) if v == expected => c.ok += 1,
                            Ok(v) => c.wrong.push(v),
                            Err(e) => {
                                c.failed += 1;
                                c.first_error.get_or_insert(e);
                                sql = None;
                            }
                        }
                    }
                    let spent = started.elapsed();
                    if spent < every {
                        std::thread::sleep(every - spent);
                    }
                }
            })
        };
        Reader {
            stop,
            counts,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> ReadCounts {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Inserts `(id)` rows into `table` through the coordinator every `every`, one at a time in
/// autocommit, reconnecting after an error, as a plain application would.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pub log: Arc<Mutex<Vec<Insert>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub t0: Instant,
    /// Wall-clock time at `t0`, to compare with the agents' log timestamps.
    pub wall0: std::time::SystemTime,
}

impl Writer {
    pub fn start(hosts: &[(String, u16)], table: &str, every: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let wall0 = std::time::SystemTime::now();
        let conninfo = conninfo(hosts, "citus", "");
        let insert = format!("INSERT INTO {table} (id) VALUES ");
        // Distinct ids across writers of one process.
        static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
        let thread = {
            let (stop, log) = (stop.clone(), log.clone());
            std::thread::spawn(move || {
                let mut sql: Option<Sql> = None;
                while !stop.load(Ordering::SeqCst) {
                    let started = t0.elapsed();
                    let id = NEXT.fetch_add(1, Ordering::SeqCst);
                    let result = match sql.as_mut() {
                        Some(s) => {
                            s.exec_timeout(&format!("{insert}({id})"), Duration::from_secs(60))
                        }
                        None => match Sql::connect_with(&conninfo) {
                            Ok(mut s) => {
                                let r = s.exec_timeout(
                                    &format!("{insert}({id})"),
                                    Duration::from_secs(60),
                                );
                                sql = Some(s);
                                r
                            }
                            Err(e) => Err(e),
                        },
                    };
                    let ended = t0.elapsed();
                    let ok = result.is_ok();
                    if !ok {
                        sql = None;
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push(Insert {
                            id,
                            started,
                            ended,
                            ok,
                            error: result.err(),
                        });
                    }
                    let spent = t0.elapsed() - started;
                    if spent < every {
                        std::thread::sleep(every - spent);
                    }
                }
            })
        };
        Writer {
            stop,
            log,
            thread: Some(thread),
            t0,
            wall0,
        }
    }

    pub fn snapshot(&self) -> Vec<Insert> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn stop(mut self) -> Vec<Insert> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snapshot()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a writer saw.
#[derive(Debug, Default)]
pub struct Summary {
    pub acknowledged: usize,
    pub failed: usize,
    /// The longest time between two acknowledged inserts.
    pub longest_gap: Duration,
    /// The longest any one insert took.
    pub longest_insert: Duration,
    pub errors: BTreeMap<String, usize>,
}

pub fn summarize(log: &[Insert]) -> Summary {
    let mut s = Summary::default();
    let mut last_ok: Option<Duration> = None;
    for i in log {
        s.longest_insert = s.longest_insert.max(i.ended - i.started);
        if i.ok {
            s.acknowledged += 1;
            if let Some(prev) = last_ok {
                s.longest_gap = s.longest_gap.max(i.ended.saturating_sub(prev));
            }
            last_ok = Some(i.ended);
        } else {
            s.failed += 1;
            let e = i.error.clone().unwrap_or_default();
            // Group messages by their first words (addresses and ids differ).
            let key: String = e.split_whitespace().take(8).collect::<Vec<_>>().join(" ");
            *s.errors.entry(key).or_default() += 1;
        }
    }
    s
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} acknowledged, {} failed, longest gap {} ms, longest insert {} ms",
            self.acknowledged,
            self.failed,
            self.longest_gap.as_millis(),
            self.longest_insert.as_millis()
        )?;
        for (e, n) in &self.errors {
            write!(f, "\n  {n} × {e}")?;
        }
        Ok(())
    }
}

/// Every acknowledged id must be in `table` (read through the coordinator). Returns how many
/// were checked.
pub fn assert_nothing_acknowledged_lost(
    hosts: &[(String, u16)],
    table: &str,
    log: &[Insert],
) -> usize {
    let mut sql = super::wait_for("the coordinator", Duration::from_secs(60), || {
        Sql::connect(hosts, "citus").ok()
    });
    let present: std::collections::BTreeSet<i64> = sql
        .strings(&format!("SELECT id FROM {table}"))
        .expect("read the table")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let acked: Vec<i64> = log.iter().filter(|i| i.ok).map(|i| i.id).collect();
    let lost: Vec<&i64> = acked.iter().filter(|id| !present.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged inserts lost (of {}): {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    acked.len()
}

/// Real Citus is installed (the tests below need it). Without it: skipped, or a failure where
/// CI expects it.
pub fn real_citus(test: &str) -> bool {
    if !super::lab_available(test) {
        return false;
    }
    match citus_reconcile::lab::standin::detect(super::pg::BIN) {
        Ok(Some(citus_reconcile::lab::standin::CitusInstall::Real { .. })) => true,
        other => {
            let why =
                format!("{test}: needs the real Citus extension (found {other:?}); run .ci/setup");
            if std::env::var("CITUS_RECONCILE_REQUIRE_LAB").as_deref() == Ok("1")
                && std::path::Path::new("../shared/citus/install.sh").exists()
            {
                panic!("{why}");
            }
            eprintln!("skipped {why}");
            false
        }
    }
}

/// (address, port) of every member of a group.
pub fn addresses(t: &TestLab, group: u32) -> Vec<(String, u16)> {
    super::members(t, group)
        .into_iter()
        .map(|(_, a, p)| (a, p))
        .collect()
}

pub fn address_of(t: &TestLab, member: &str) -> (String, u16) {
    t.spec
        .host(member)
        .map(|h| (h.address.clone(), h.pg_port))
        .unwrap_or_default()
}

/// SQL through the coordinator (whichever member accepts writes).
pub fn coordinator(t: &TestLab) -> Sql {
    super::wait_for(
        "the coordinator to accept writes",
        Duration::from_secs(60),
        || Sql::connect(&addresses(t, 0), "citus").ok(),
    )
}

/// Every group has a leader and the coordinator's pg_dist_node names each one as its
/// primary: the state in which distributed queries can work.
pub fn wait_rows_follow_leaders(t: &TestLab, groups: &[u32]) -> Vec<String> {
    super::wait_for(
        "pg_dist_node to name every group's leader",
        Duration::from_secs(90),
        || {
            let leaders: Vec<String> = groups
                .iter()
                .map(|g| super::leader(t, u64::from(*g)))
                .collect::<Option<_>>()?;
            let mut c = Sql::connect(&addresses(t, 0), "citus").ok()?;
            for (g, l) in groups.iter().zip(&leaders) {
                let (addr, port) = address_of(t, l);
                let row = c
                    .one(&format!(
                        "SELECT nodename || ':' || nodeport FROM pg_dist_node WHERE groupid = {g} AND noderole = 'primary'"
                    ))
                    .ok()?;
                if row != format!("{addr}:{port}") {
                    return None;
                }
            }
            Some(leaders)
        },
    )
}

/// The writer acknowledges inserts again: nothing holds it (inserts are sequential, so one
/// stuck on a blocked group would stop them all).
pub fn writes_resume(w: &Writer, what: &str) {
    let from = w.t0.elapsed();
    super::wait_for(what, Duration::from_secs(90), || {
        w.snapshot()
            .iter()
            .filter(|i| i.ok && i.started > from)
            .nth(20)
            .map(|_| ())
    });
}
