//! Scratch PostgreSQL servers on loopback for tests that need SQL but no lab.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// uid and gid of the `postgres` OS user.
pub fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
        })
        .expect("a postgres OS user (install postgresql-15)")
}

/// A free TCP port on loopback (the OS picks it; the tiny race with other tests is accepted).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running PostgreSQL owned by the test; killed (by pid) on drop.
pub struct ScratchPg {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
    _tmp: tempfile::TempDir,
}

impl ScratchPg {
    pub fn start(extra: &[&str]) -> ScratchPg {
        let tmp = tempfile::Builder::new()
            .prefix("crpg")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        let (uid, gid) = postgres_ids();
        // As the agent does: the server gets the postgres user's environment, not ours (libpq
        // inside Citus reads client certificates under $HOME).
        let user = citus_reconcile::postgres::process::OsUser::postgres().expect("postgres user");
        let dir = tmp.path().join("data");
        std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid)).expect("chown");
        let mut initdb = Command::new(format!("{BIN}/initdb"));
        user.apply_to(&mut initdb);
        let status = initdb
            .args([
                "-D",
                &dir.to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("initdb runs");
        assert!(status.success(), "initdb failed");
        let port = free_port();
        let mut args: Vec<String> = vec![
            "-D".into(),
            dir.to_string_lossy().into_owned(),
            "-p".into(),
            port.to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            format!("unix_socket_directories={}", tmp.path().display()),
            "-c".into(),
            "fsync=off".into(),
        ];
        for e in extra {
            args.push("-c".into());
            args.push((*e).to_string());
        }
        let log = std::fs::File::create(tmp.path().join("log")).expect("log file");
        let mut postgres = Command::new(format!("{BIN}/postgres"));
        user.apply_to(&mut postgres);
        let child = postgres
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        let pg = ScratchPg {
            port,
            dir,
            child,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                pg.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pg
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.parent().unwrap_or(Path::new("/")).join("log"))
            .unwrap_or_default()
    }

    pub async fn connect(&self, db: &str) -> tokio_postgres::Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let conninfo = format!(
                "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=5",
                self.port
            );
            match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    return client;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("connect to {}: {e}\n{}", self.port, self.log())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for ScratchPg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
