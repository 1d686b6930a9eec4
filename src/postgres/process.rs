//! The PostgreSQL server and its tools on this host: initdb, pg_basebackup, pg_rewind,
//! pg_controldata, and the postmaster itself — always as the `postgres` OS user, always with a
//! timeout.
//!
//! The postmaster is the agent's child and gets SIGQUIT (immediate shutdown) if the agent
//! dies (`PR_SET_PDEATHSIG`): a primary can never outlive the process that holds its lease.
//! The agent runs a single-threaded runtime, so the thread that spawned it lives as long as
//! the agent.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::conf::{self, Role};
use crate::agent::config::{AgentConfig, Paths};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{step}: {detail}")]
    Failed { step: String, detail: String },
    #[error("{step}: timed out after {secs}s")]
    Timeout { step: String, secs: u64 },
}

fn failed(step: &str, detail: impl std::fmt::Display) -> PgError {
    PgError::Failed {
        step: step.to_string(),
        detail: detail.to_string(),
    }
}

/// What pg_controldata reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub sysid: String,
    /// "in production", "shut down", "shut down in recovery", "in archive recovery"…
    pub state: String,
    pub timeline: u32,
    /// "Latest checkpoint location" as a byte position: after a clean shutdown, the last WAL
    /// the server wrote.
    pub checkpoint_lsn: u64,
}

pub use super::timeline::parse_lsn;

impl Control {
    pub fn was_primary(&self) -> bool {
        self.state == "in production" || self.state == "shut down"
    }
}

/// The `postgres` OS user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// The search path a service manager gives a service (systemd's default for system units).
pub const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl OsUser {
    pub fn postgres() -> Result<OsUser, PgError> {
        let passwd =
            std::fs::read_to_string("/etc/passwd").map_err(|e| failed("read /etc/passwd", e))?;
        Self::from_passwd(&passwd, "postgres").ok_or_else(|| {
            failed(
                "find the postgres user",
                "no `postgres` OS user on this host (is PostgreSQL installed?)",
            )
        })
    }

    /// The entry for `name` in a passwd file's text.
    pub fn from_passwd(passwd: &str, name: &str) -> Option<OsUser> {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() != Some(&name) {
                return None;
            }
            Some(OsUser {
                name: name.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f
                    .get(5)
                    .filter(|h| !h.is_empty())
                    .unwrap_or(&"/")
                    .to_string(),
            })
        })
    }

    /// The environment a service manager would give a process of this user — and nothing of
    /// the agent's own. Root's `HOME` in particular must never reach PostgreSQL: libpq inside
    /// the server (Citus's connections to other nodes) reads client certificates from
    /// `$HOME/.postgresql/`, and under root's home it cannot even open them.
    pub fn service_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HOME", self.home.clone()),
            ("USER", self.name.clone()),
            ("LOGNAME", self.name.clone()),
            ("PATH", SERVICE_PATH.to_string()),
            ("LANG", "C.UTF-8".to_string()),
        ]
    }

    /// Run `cmd` as this user with [`service_env`](Self::service_env) only. (For a tokio
    /// command, pass `as_std_mut()`.)
    pub fn apply_to(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        cmd.env_clear()
            .envs(self.service_env())
            .uid(self.uid)
            .gid(self.gid)
            .current_dir("/");
    }
}

/// PostgreSQL of one member.
#[derive(Debug, Clone)]
pub struct Pg {
    pub cfg: AgentConfig,
    pub paths: Paths,
    pub user: OsUser,
}

impl Pg {
    pub fn new(cfg: &AgentConfig) -> Result<Pg, PgError> {
        Ok(Pg {
            cfg: cfg.clone(),
            paths: Paths::new(&cfg.install_dir),
            user: OsUser::postgres()?,
        })
    }

    fn bin(&self, tool: &str) -> String {
        format!("{}/{tool}", self.cfg.postgres.bin_dir)
    }

    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(&self.cfg.postgres.data_dir)
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin(tool));
        self.user.apply_to(c.as_std_mut());
        c.env("PGPASSFILE", self.paths.pgpass())
            .env("PGCONNECT_TIMEOUT", "5")
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Run a tool to completion as postgres; error carries the last lines of its output.
    async fn run(
        &self,
        step: &str,
        mut cmd: Command,
        timeout: Duration,
    ) -> Result<String, PgError> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .map_err(|e| failed(step, format!("cannot start: {e}")))?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Err(_) => Err(PgError::Timeout {
                step: step.to_string(),
                secs: timeout.as_secs(),
            }),
            Ok(Err(e)) => Err(failed(step, e)),
            Ok(Ok(out)) if out.status.success() => {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            Ok(Ok(out)) => {
                let text = String::from_utf8_lossy(&out.stderr).into_owned()
                    + &String::from_utf8_lossy(&out.stdout);
                let tail: Vec<&str> = text.lines().rev().take(4).collect();
                Err(failed(
                    step,
                    format!(
                        "{}: {}",
                        out.status,
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ),
                ))
            }
        }
    }

    /// Write a file atomically, owned by postgres.
    pub fn write_owned(&self, path: &Path, content: &str, mode: u32) -> Result<(), PgError> {
        let step = format!("write {}", path.display());
        let tmp = path.with_file_name(format!(
            ".{}.tmp",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        // The folder may be the data directory, which the database superuser can write to
        // (`COPY … TO PROGRAM`): a link planted at the temporary name must not be followed.
        // A leftover (link or file) is removed, not followed; the new file is created
        // exclusively, never through a link, with its final mode from the first byte, and
        // owned through its descriptor; the rename replaces the entry, not what it points to.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(&step, e)),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| failed(&step, e))?;
        // The umask may have taken bits off `mode`; it never adds any.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| failed(&step, e))?;
        std::os::unix::fs::fchown(&f, Some(self.user.uid), Some(self.user.gid))
            .map_err(|e| failed(&step, e))?;
        std::io::Write::write_all(&mut f, content.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| failed(&step, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| failed(&step, e))
    }

    /// A folder owned by postgres with the given mode.
    pub fn ensure_dir(&self, path: &Path, mode: u32) -> Result<(), PgError> {
        let step = format!("create {}", path.display());
        std::fs::create_dir_all(path).map_err(|e| failed(&step, e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| failed(&step, e))?;
        std::os::unix::fs::chown(path, Some(self.user.uid), Some(self.user.gid))
            .map_err(|e| failed(&step, e))
    }

    /// The socket folder and the passfile, needed before any server or tool runs.
    pub fn prepare_host_files(&self) -> Result<(), PgError> {
        self.ensure_dir(Path::new(&self.paths.socket_dir()), 0o700)?;
        self.write_owned(
            Path::new(&self.paths.pgpass()),
            &conf::render_pgpass(&self.cfg),
            0o600,
        )
    }

    /// pg_control of the data directory; None when there is no complete data directory.
    pub async fn controldata(&self) -> Result<Option<Control>, PgError> {
        if !self.data_dir().join("global/pg_control").exists() {
            return Ok(None);
        }
        let mut cmd = self.command("pg_controldata");
        cmd.arg("-D").arg(self.data_dir());
        let out = self
            .run("pg_controldata", cmd, Duration::from_secs(10))
            .await?;
        let field = |name: &str| {
            out.lines()
                .find_map(|l| {
                    l.strip_prefix(name)
                        .map(|v| v.trim_start_matches(':').trim().to_string())
                })
                .unwrap_or_default()
        };
        Ok(Some(Control {
            sysid: field("Database system identifier"),
            state: field("Database cluster state"),
            timeline: field("Latest checkpoint's TimeLineID").parse().unwrap_or(0),
            checkpoint_lsn: parse_lsn(&field("Latest checkpoint location")).unwrap_or(0),
        }))
    }

    /// Move an incomplete data directory (a failed clone) out of the way. Never deletes one.
    pub fn set_aside_incomplete(&self) -> Result<(), PgError> {
        let dir = self.data_dir();
        let has_content = std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if has_content && !dir.join("global/pg_control").exists() {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let aside = PathBuf::from(format!("{}.incomplete-{secs}", dir.display()));
            std::fs::rename(&dir, &aside)
                .map_err(|e| failed("set aside an incomplete data directory", e))?;
            tracing::warn!(from = %dir.display(), to = %aside.display(), "moved an incomplete data directory aside");
        }
        Ok(())
    }

    /// The data directory's missing parents, created by and for root (`data_dir: /pgdata`
    /// must not hand `/` to postgres): only the data directory itself becomes postgres's.
    fn ensure_parent(&self) -> Result<(), PgError> {
        let dir = self.data_dir();
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| failed("create the data directory's parent", e))?;
        }
        Ok(())
    }

    /// initdb with Citus-ready settings; the superuser gets its password at once.
    pub async fn initdb(&self) -> Result<(), PgError> {
        self.set_aside_incomplete()?;
        self.ensure_parent()?;
        self.ensure_dir(&self.data_dir(), 0o700)?;
        let pwfile = PathBuf::from(format!("{}/.initdb-pw", self.paths.install_dir));
        self.write_owned(
            &pwfile,
            self.cfg.postgres.superuser.password.expose(),
            0o600,
        )?;
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", &self.cfg.postgres.superuser.username])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--data-checksums",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ]);
        let result = self.run("initdb", cmd, Duration::from_secs(120)).await;
        let _ = std::fs::remove_file(&pwfile);
        result.map(|_| ())
    }

    /// Copy the leader with pg_basebackup (fast checkpoint: no waiting for a spread one).
    pub async fn basebackup(&self, host: &str, port: u16) -> Result<(), PgError> {
        self.set_aside_incomplete()?;
        self.ensure_parent()?;
        // pg_basebackup (as postgres) fills an empty folder it owns; the parent is root's.
        self.ensure_dir(&self.data_dir(), 0o700)?;
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args([
                "-h",
                host,
                "-p",
                &port.to_string(),
                "-U",
                &self.cfg.postgres.replication.username,
            ])
            .args(["-X", "stream", "-c", "fast", "-w", "--no-password"])
            .env("PGAPPNAME", &self.cfg.member);
        self.run("pg_basebackup", cmd, Duration::from_secs(3600))
            .await
            .map(|_| ())
    }

    /// pg_rewind against the leader (which also finishes crash recovery first, PG 13+).
    pub async fn rewind(&self, host: &str, port: u16) -> Result<(), PgError> {
        let source = format!(
            "host={} port={port} user={} dbname=postgres passfile={} connect_timeout=5",
            conf::quote_libpq(host),
            conf::quote_libpq(&self.cfg.postgres.superuser.username),
            conf::quote_libpq(&self.paths.pgpass())
        );
        // Its config must be ours while it runs crash recovery in single-user mode, and without
        // standby.signal: single-user mode refuses standby mode. The caller writes the
        // replica configuration before the next start.
        self.write_conf(&Role::Primary {
            synchronous_standby_names: String::new(),
        })?;
        let mut cmd = self.command("pg_rewind");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg(format!("--source-server={source}"));
        self.run("pg_rewind", cmd, Duration::from_secs(3600))
            .await
            .map(|_| ())
    }

    /// Rewrite postgresql.conf alone (new parameters, taken by a reload).
    pub fn write_postgresql_conf(&self) -> Result<(), PgError> {
        self.write_owned(
            &self.data_dir().join("postgresql.conf"),
            &conf::render_postgresql_conf(&self.cfg),
            0o600,
        )
    }

    /// Write postgresql.conf, the role file, pg_hba.conf and the standby signal.
    pub fn write_conf(&self, role: &Role) -> Result<(), PgError> {
        let d = self.data_dir();
        self.write_owned(
            &d.join("postgresql.conf"),
            &conf::render_postgresql_conf(&self.cfg),
            0o600,
        )?;
        self.write_owned(
            &d.join(conf::ROLE_CONF),
            &conf::render_role_conf(&self.cfg, role),
            0o600,
        )?;
        self.write_owned(&d.join("pg_hba.conf"), &conf::render_hba(&self.cfg), 0o600)?;
        let signal = d.join("standby.signal");
        match role {
            Role::Replica { .. } => self.write_owned(&signal, "", 0o600)?,
            Role::Primary { .. } => {
                if signal.exists() {
                    std::fs::remove_file(&signal)
                        .map_err(|e| failed("remove standby.signal", e))?;
                }
            }
        }
        Ok(())
    }

    /// Start the postmaster as the agent's child.
    pub fn start(&self) -> Result<Postmaster, PgError> {
        self.prepare_host_files()?;
        self.remove_stale_pid_file();
        let mut cmd = Command::new(self.bin("postgres"));
        cmd.arg("-D").arg(self.data_dir());
        self.as_service_child(&mut cmd, &self.paths.postgres_log(), libc::SIGQUIT)
            .map_err(|e| failed("open the PostgreSQL log", e))?;
        let child = cmd.spawn().map_err(|e| failed("start postgres", e))?;
        let pid = child.id().unwrap_or(0);
        Ok(Postmaster { child, pid })
    }

    /// Make `cmd` a service child of the agent: run as postgres with that user's own
    /// environment, stdin closed, stdout and stderr appended to `log`, its own process group
    /// (a Ctrl-C aimed at the agent is the agent's to handle), and `death_signal` when the
    /// agent dies. The log can carry data and statements: readable by root only from the
    /// first byte, and never opened through a link (the install folder is root's).
    pub fn as_service_child(
        &self,
        cmd: &mut Command,
        log: &str,
        death_signal: libc::c_int,
    ) -> std::io::Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(log)?;
        let err = out.try_clone()?;
        self.user.apply_to(cmd.as_std_mut());
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl and setpgid are async-signal-safe; run in the child before exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        Ok(())
    }

    /// Lock files left by a killed server (postmaster.pid, and the socket's `.lock`, which
    /// lives on disk here, not on a tmpfs a reboot would empty) can name a pid that now
    /// belongs to another process; PostgreSQL would then refuse to start. Remove those whose
    /// pid is not a live postgres.
    fn remove_stale_pid_file(&self) {
        let socket_lock = PathBuf::from(format!(
            "{}/.s.PGSQL.{}.lock",
            self.paths.socket_dir(),
            self.cfg.postgres.port
        ));
        for file in [self.data_dir().join("postmaster.pid"), socket_lock] {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let pid: u32 = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or(0);
            let alive_postgres = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("postgres"))
                .unwrap_or(false);
            if pid == 0 || !alive_postgres {
                let _ = std::fs::remove_file(&file);
            }
        }
    }

    /// The status word in postmaster.pid: "starting", "ready", "standby", "stopping".
    pub fn pid_file_status(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().nth(7).map(|s| s.trim().to_string())
    }
}

/// The running server process.
pub struct Postmaster {
    pub child: Child,
    pub pid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: roll back sessions, checkpoint, exit.
    Fast,
    /// SIGQUIT: exit at once; crash recovery on the next start.
    Immediate,
}

impl Postmaster {
    /// Exited already? Returns the exit description.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        if self.pid > 0 {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.pid as libc::pid_t, sig);
            }
        }
    }

    /// Stop the server and wait (bounded), escalating to immediate and then SIGKILL.
    pub async fn stop(&mut self, mode: StopMode, timeout: Duration) {
        let first = match mode {
            StopMode::Fast => libc::SIGINT,
            StopMode::Immediate => libc::SIGQUIT,
        };
        self.signal(first);
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_ok()
        {
            return;
        }
        tracing::warn!(
            pid = self.pid,
            "PostgreSQL did not stop in time; immediate shutdown"
        );
        self.signal(libc::SIGQUIT);
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_ok()
        {
            return;
        }
        self.signal(libc::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Pg in a temporary folder, "postgres" being uid/gid 4242 (chown as root works for
    /// any id). None when not root: ownership cannot be checked then.
    fn pg_in(dir: &std::path::Path) -> Option<Pg> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let mut cfg = crate::agent::config::sample();
        cfg.install_dir = dir.join("install").display().to_string();
        cfg.postgres.data_dir = dir.join("a/b/data").display().to_string();
        std::fs::create_dir_all(&cfg.install_dir).ok()?;
        Some(Pg {
            paths: Paths::new(&cfg.install_dir),
            cfg,
            user: OsUser {
                name: "postgres".into(),
                uid: 4242,
                gid: 4242,
                home: "/".into(),
            },
        })
    }

    #[test]
    fn files_written_in_the_data_directory_never_follow_a_planted_link() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let Some(pg) = pg_in(dir.path()) else { return };
        let target = dir.path().join("outside");
        std::fs::write(&target, "untouched").expect("target");
        std::fs::create_dir_all(pg.data_dir()).expect("data dir");
        // What `COPY … TO PROGRAM 'ln -s …'` could leave at the temporary name.
        let path = pg.data_dir().join("citus-reconcile.role.conf");
        std::os::unix::fs::symlink(
            &target,
            pg.data_dir().join(".citus-reconcile.role.conf.tmp"),
        )
        .expect("plant a link");
        pg.write_owned(&path, "secret = 1\n", 0o600).expect("write");
        assert_eq!(
            std::fs::read_to_string(&target).expect("target"),
            "untouched"
        );
        let meta = std::fs::symlink_metadata(&path).expect("written");
        assert!(meta.file_type().is_file());
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (4242, 4242));
        assert_eq!(
            std::fs::read_to_string(&path).expect("content"),
            "secret = 1\n"
        );
        // A link at the final name is replaced, not written through.
        std::fs::remove_file(&path).expect("remove");
        std::os::unix::fs::symlink(&target, &path).expect("plant a link");
        pg.write_owned(&path, "x\n", 0o600).expect("write");
        assert_eq!(
            std::fs::read_to_string(&target).expect("target"),
            "untouched"
        );
    }

    #[test]
    fn only_the_data_directory_becomes_postgres_s() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let Some(pg) = pg_in(dir.path()) else { return };
        pg.ensure_parent().expect("parents");
        pg.ensure_dir(&pg.data_dir(), 0o700).expect("data dir");
        for (p, uid) in [("a", 0), ("a/b", 0), ("a/b/data", 4242)] {
            let meta = std::fs::metadata(dir.path().join(p)).expect("created");
            assert_eq!(meta.uid(), uid, "{p}");
        }
    }

    #[test]
    fn the_postgres_user_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgresx:x:1:1::/nope:/bin/sh\n\
                      postgres:x:105:111:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        let u = OsUser::from_passwd(passwd, "postgres").expect("found");
        assert_eq!(
            (u.uid, u.gid, u.home.as_str()),
            (105, 111, "/var/lib/postgresql")
        );
        assert!(OsUser::from_passwd(passwd, "nobody").is_none());
        // An empty home field falls back to "/", never to the agent's own HOME.
        let u = OsUser::from_passwd("postgres:x:5:5:::/bin/sh\n", "postgres").expect("found");
        assert_eq!(u.home, "/");
    }

    #[test]
    fn children_get_their_own_users_environment_only() {
        let u = OsUser {
            name: "postgres".into(),
            uid: 105,
            gid: 111,
            home: "/var/lib/postgresql".into(),
        };
        let env: std::collections::BTreeMap<_, _> = u.service_env().into_iter().collect();
        assert_eq!(env["HOME"], "/var/lib/postgresql");
        assert_eq!(env["USER"], "postgres");
        assert_eq!(env["LOGNAME"], "postgres");
        assert_eq!(env["PATH"], SERVICE_PATH);
        assert_eq!(env.len(), 5, "{env:?}");
        // And the command starts from an empty environment.
        let mut cmd = std::process::Command::new("/bin/true");
        u.apply_to(&mut cmd);
        let vars: Vec<_> = cmd.get_envs().collect();
        assert_eq!(vars.len(), 5, "{vars:?}");
    }
}
