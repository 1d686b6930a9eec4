//! The guard: a second fence in a process of its own, and the keeper of the watchdog device.
//!
//! The fence task (`lease::fence`) runs on the agent's runtime. An agent that is frozen
//! (SIGSTOP, a debugger, swap storms), deadlocked, or stuck in a blocking call cannot run it,
//! and its PostgreSQL would go on accepting writes after the lease ran out, while another
//! member promotes. The guard closes that hole: the agent tells it, over a pipe, which
//! postmaster runs as primary and until when the lease is surely valid; when that moment
//! comes without a newer one, the guard stops the postmaster and kills it and every process
//! it started. It runs in its own session, so signals to the agent's process group do not
//! reach it, and (run as a process, not under systemd, whose `KillMode=mixed` kills it with
//! the agent) it outlives a dead agent until the last deadline it was given.
//!
//! With `ha.watchdog`, the guard also keeps the Linux watchdog device (Patroni's watchdog):
//! opened while a primary is guarded, kept from firing only while the lease leaves room for
//! the device's own timeout, and closed with the magic character once PostgreSQL is stopped.
//! A guard that hangs (with the kernel, for a hardware watchdog) thus has the machine reset
//! before another member can have been promoted.
//!
//! Messages, one per line. Agent to guard: `arm PID LEASE_END_MS` (CLOCK_MONOTONIC
//! milliseconds), `disarm`. Guard to agent: `watchdog active SECONDS`, `watchdog failed
//! REASON`, `fenced PID`.

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::{WatchdogConfig, WatchdogMode};
use super::guard_core::{Armed, Effect, GuardCore, Message, message_for};

/// Milliseconds on CLOCK_MONOTONIC, which every process on the host shares.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// An `Instant` as CLOCK_MONOTONIC milliseconds (std's `Instant` is that clock on Linux).
fn instant_to_monotonic_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let base = monotonic_ms();
    match at.checked_duration_since(now) {
        Some(ahead) => base + ahead.as_millis() as u64,
        None => base.saturating_sub(now.duration_since(at).as_millis() as u64),
    }
}

/// What the guard last said about the watchdog device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WatchdogStatus {
    /// No device configured, or none opened yet.
    #[default]
    Idle,
    Active {
        timeout_s: u32,
    },
    Failed {
        reason: String,
        at: Instant,
    },
}

/// What the agent knows about its guard.
#[derive(Debug, Default)]
pub struct GuardState {
    pub watchdog: Mutex<WatchdogStatus>,
    /// Postmasters the guard had to kill (the agent's own fence was late: it was frozen).
    pub fenced: std::sync::atomic::AtomicU64,
    pub running: std::sync::atomic::AtomicBool,
    /// Which start of the guard process `running` speaks of (a report thread of a guard
    /// that was replaced must not mark the new one gone).
    generation: std::sync::atomic::AtomicU64,
}

/// How long a failed activation keeps a member with `required` from leading before it may
/// try again.
pub const FAILED_ACTIVATION_HOLDS: Duration = Duration::from_secs(60);

/// Why this member must not lead now because of its watchdog (`required` only), if so.
pub fn blocks_leading(cfg: &WatchdogConfig, state: &GuardState) -> Option<String> {
    if cfg.mode != WatchdogMode::Required {
        return None;
    }
    if !state.running.load(std::sync::atomic::Ordering::SeqCst) {
        return Some("the watchdog is required but the guard process is not running".into());
    }
    if let Err(e) = device_usable(Path::new(&cfg.device)) {
        return Some(format!("the watchdog is required but {e}"));
    }
    let status = state.watchdog.lock().map(|w| w.clone()).unwrap_or_default();
    match status {
        WatchdogStatus::Failed { reason, at } if at.elapsed() < FAILED_ACTIVATION_HOLDS => Some(
            format!("the watchdog is required but activating it failed: {reason}"),
        ),
        _ => None,
    }
}

/// A character device this process may write to.
fn device_usable(device: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    // Not followed through a link: the guard opens it with O_NOFOLLOW.
    let meta =
        std::fs::symlink_metadata(device).map_err(|e| format!("{}: {e}", device.display()))?;
    if !meta.file_type().is_char_device() {
        return Err(format!("{} is not a character device", device.display()));
    }
    let c = std::ffi::CString::new(device.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: not a usable path", device.display()))?;
    // SAFETY: access(2) on a NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!(
            "{} is not writable: {}",
            device.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The agent's end: starts the guard, tells it what to guard, and reads what it reports.
pub struct Guard {
    program: PathBuf,
    args: Vec<String>,
    child: Option<std::process::Child>,
    stdin: Option<std::process::ChildStdin>,
    state: Arc<GuardState>,
    /// The last message sent (nothing is sent twice in a row).
    last: Option<String>,
    /// The postmaster the last `arm` named.
    armed_pid: Option<u32>,
    margin: Duration,
    /// After a failed start, when to try again.
    retry_at: Option<Instant>,
}

impl Guard {
    /// A guard for a primary fenced `margin` before its lease ends, with the watchdog device
    /// `watchdog` (when its mode is not `off`) and the lease's `ttl`.
    pub fn new(margin: Duration, ttl: Duration, watchdog: &WatchdogConfig) -> Guard {
        let mut args = vec![
            "agent-guard".to_string(),
            "--margin-ms".to_string(),
            margin.as_millis().to_string(),
            "--ttl-ms".to_string(),
            ttl.as_millis().to_string(),
        ];
        if watchdog.mode != WatchdogMode::Off {
            args.push("--watchdog-device".into());
            args.push(watchdog.device.clone());
            if watchdog.mode == WatchdogMode::Required {
                args.push("--watchdog-required".into());
            }
        }
        Guard {
            // The running image itself, even after `apply` replaced the file on disk.
            program: PathBuf::from("/proc/self/exe"),
            args,
            child: None,
            stdin: None,
            state: Arc::new(GuardState::default()),
            last: None,
            armed_pid: None,
            margin,
            retry_at: None,
        }
    }

    pub fn state(&self) -> Arc<GuardState> {
        self.state.clone()
    }

    /// Start the guard process (again, if it died).
    fn spawn(&mut self) -> std::io::Result<()> {
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Its own session: a SIGSTOP or SIGKILL sent to the agent's process group (a shell's
        // job control, `kill -- -PGID`) must not reach the process that guards against it.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        if let Some(s) = &stdin {
            // A guard that stops reading must never block the agent's fence task.
            // SAFETY: fcntl on a pipe descriptor this process owns.
            unsafe {
                let fd = s.as_raw_fd();
                let flags = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let generation = self
            .state
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        if let Some(out) = child.stdout.take() {
            let state = self.state.clone();
            std::thread::Builder::new()
                .name("guard-reports".into())
                .spawn(move || read_reports(out, &state, generation))?;
        }
        self.stdin = stdin;
        self.child = Some(child);
        self.last = None;
        self.armed_pid = None;
        self.state
            .running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("guard process started");
        Ok(())
    }

    /// Guard `pid` (0: nothing) as a primary whose lease is valid until `lease_end`.
    pub fn update(&mut self, pid: u32, lease_end: Option<Instant>) {
        // A guard that died is started again, whatever there is to say.
        if (self.child.is_none() || self.exited()) && !self.try_spawn() {
            return;
        }
        let Some(message) = message_for(
            pid,
            lease_end.map(instant_to_monotonic_ms),
            self.armed_pid,
            instant_to_monotonic_ms(Instant::now() + self.margin),
        ) else {
            return;
        };
        let line = message.to_string();
        if self.last.as_deref() == Some(line.as_str()) {
            return;
        }
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        match stdin.write_all(format!("{line}\n").as_bytes()) {
            Ok(()) => {
                self.armed_pid = (pid != 0).then_some(pid);
                self.last = Some(line);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tracing::error!("the guard process does not read its messages (hung?)");
            }
            Err(e) => {
                // Started again at the next update (`spawn` reaps this one).
                tracing::warn!(error = %e, "guard process gone; starting it again");
                self.stdin = None;
                self.state
                    .running
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// Start the guard unless a failed start is too recent; true when one runs.
    fn try_spawn(&mut self) -> bool {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        match self.spawn() {
            Ok(()) => {
                self.retry_at = None;
                true
            }
            Err(e) => {
                self.state
                    .running
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                self.retry_at = Some(Instant::now() + Duration::from_secs(5));
                tracing::error!(error = %e, "cannot start the guard process");
                false
            }
        }
    }

    fn exited(&mut self) -> bool {
        if self.stdin.is_none() {
            return true;
        }
        let gone = match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => {
                tracing::warn!(%status, "the guard process exited");
                true
            }
            Some(Ok(None)) => false,
            _ => true,
        };
        if gone {
            self.state
                .running
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        gone
    }
}

impl super::lease::Fencer for Guard {
    fn guard(&mut self, pid: u32, lease_end: Option<tokio::time::Instant>) {
        self.update(pid, lease_end.map(|t| t.into_std()));
    }

    fn quit(&mut self, pid: u32) {
        // SAFETY: kill(2) on the postmaster the agent started.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGQUIT);
        }
    }

    fn alive(&self, pid: u32) -> bool {
        alive(pid)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // A clean exit: nothing left to guard (the postmaster is stopped by now).
        if let Some(s) = self.stdin.as_mut() {
            let _ = s.write_all(b"disarm\n");
        }
    }
}

fn read_reports(out: std::process::ChildStdout, state: &GuardState, generation: u64) {
    for line in std::io::BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        let (word, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match (word, rest.split_once(' ')) {
            ("watchdog", Some(("active", t))) => {
                let timeout_s = t.trim().parse().unwrap_or(0);
                tracing::info!(timeout_s, "watchdog device active");
                if let Ok(mut w) = state.watchdog.lock() {
                    *w = WatchdogStatus::Active { timeout_s };
                }
            }
            ("watchdog", Some(("failed", reason))) => {
                tracing::error!(reason, "watchdog device could not be activated");
                if let Ok(mut w) = state.watchdog.lock() {
                    *w = WatchdogStatus::Failed {
                        reason: reason.to_string(),
                        at: Instant::now(),
                    };
                }
            }
            ("watchdog", _) if rest.trim() == "closed" => {
                if let Ok(mut w) = state.watchdog.lock() {
                    if matches!(*w, WatchdogStatus::Active { .. }) {
                        *w = WatchdogStatus::Idle;
                    }
                }
            }
            ("fenced", _) => {
                tracing::error!(
                    pid = rest,
                    "the guard stopped PostgreSQL: the lease ran out while the agent could not act"
                );
                state
                    .fenced
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            _ => tracing::debug!(line, "unexpected line from the guard"),
        }
    }
    if state.generation.load(std::sync::atomic::Ordering::SeqCst) == generation {
        state
            .running
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// The guard process.

/// `citus-reconcile agent-guard` (started by the agent, never by hand).
#[derive(Debug, Clone, clap::Args)]
pub struct GuardArgs {
    /// How long before the lease's end the agent's own fence acts (the guard acts halfway
    /// between that and the end)
    #[arg(long)]
    margin_ms: u64,
    /// The lease's length
    #[arg(long)]
    ttl_ms: u64,
    #[arg(long)]
    watchdog_device: Option<PathBuf>,
    /// Kill a primary at once when the device cannot be activated
    #[arg(long, requires = "watchdog_device")]
    watchdog_required: bool,
}

/// The fields of /proc/PID/stat after the command name (which may hold spaces and
/// parentheses): state, ppid, … (field 3 onwards).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The process start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// The process state letter (R, S, D, T, Z, …).
fn state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// `pid` runs (exists and is no zombie).
pub fn alive(pid: u32) -> bool {
    !matches!(state(pid), None | Some('Z'))
}

/// Every process whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            stat_fields(*p)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| ppid == pid)
        })
        .collect()
}

fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Kill the postmaster `a` and every process it started, if it is still that process and
/// alive. PostgreSQL's children each call setsid(), so no process group holds them all, and
/// a postmaster killed alone leaves its backends running: one in the middle of a statement
/// would still commit. So: stop the postmaster (it can fork nothing more), SIGKILL each of its
/// children, then the postmaster. This needs nothing from PostgreSQL, which may be frozen too.
/// True when something was killed.
fn fence(a: &Armed) -> bool {
    if start_time(a.pid) != Some(a.start_time) || matches!(state(a.pid), None | Some('Z')) {
        return false;
    }
    let pid = a.pid as libc::pid_t;
    // SAFETY: kill(2) on the postmaster the agent named (checked by start time) and on its
    // children (checked by parent pid while it is stopped: no pid can be reused meanwhile).
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    // A fork under way when the signal came ends before the postmaster stops.
    for _ in 0..20 {
        if matches!(state(a.pid), Some('T') | Some('Z') | None) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..2 {
        for child in children_of(a.pid) {
            // SAFETY: see above.
            unsafe {
                libc::kill(child as libc::pid_t, libc::SIGKILL);
            }
        }
    }
    // SAFETY: see above.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    report(&format!("fenced {}", a.pid));
    eprintln!(
        "guard: the lease of the primary PostgreSQL (pid {}) ran out and the agent did not stop it: killed it and its children",
        a.pid
    );
    true
}

/// Linux's watchdog interface (linux/watchdog.h).
mod device {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::path::Path;

    // The generic _IOR/_IOWR encoding (x86, Arm, RISC-V); PowerPC, MIPS and SPARC encode
    // ioctls differently, and the device is refused there rather than sent wrong numbers.
    const GENERIC_IOCTLS: bool = cfg!(any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64"
    ));
    const WDIOC_KEEPALIVE: libc::c_ulong = 0x8004_5705;
    const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;
    const WDIOC_GETTIMEOUT: libc::c_ulong = 0x8004_5707;

    pub struct Watchdog {
        file: std::fs::File,
        pub timeout_s: u32,
    }

    impl Watchdog {
        /// Open the device (which starts it) and set its timeout; the timeout in force is
        /// read back, as a device may round it.
        pub fn open(path: &Path, want_s: u32) -> Result<Watchdog, String> {
            use std::os::unix::fs::OpenOptionsExt;
            if !GENERIC_IOCTLS {
                return Err("watchdog devices are not supported on this architecture".into());
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let mut w = Watchdog { file, timeout_s: 0 };
            let fd = w.file.as_raw_fd();
            let mut t: libc::c_int = want_s as libc::c_int;
            // SAFETY: the watchdog ioctls read and write one int.
            let set = unsafe { libc::ioctl(fd, WDIOC_SETTIMEOUT as _, &mut t) };
            let mut got: libc::c_int = 0;
            // SAFETY: as above.
            let get = unsafe { libc::ioctl(fd, WDIOC_GETTIMEOUT as _, &mut got) };
            if get != 0 {
                let e = std::io::Error::last_os_error();
                w.close();
                return Err(format!(
                    "{} is not a watchdog whose timeout can be read ({e}; setting it {})",
                    path.display(),
                    if set == 0 { "worked" } else { "failed too" }
                ));
            }
            w.timeout_s = got.max(0) as u32;
            Ok(w)
        }

        pub fn keepalive(&mut self) {
            let mut dummy: libc::c_int = 0;
            // SAFETY: WDIOC_KEEPALIVE takes an int it ignores.
            let r = unsafe { libc::ioctl(self.file.as_raw_fd(), WDIOC_KEEPALIVE as _, &mut dummy) };
            if r != 0 {
                let _ = self.file.write_all(b"1");
            }
        }

        /// Stop the device: the magic character tells the driver the close is intended.
        pub fn close(mut self) {
            let _ = self.file.write_all(b"V");
        }
    }
}

/// The guard's main loop. Never returns; exits when the agent is gone and nothing is left
/// to guard.
pub fn run_guard(args: GuardArgs) -> ! {
    // SAFETY: signal(2) with SIG_IGN: a SIGINT/SIGTERM meant for the agent's terminal must not
    // take the guard down while it guards.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let stdin = std::io::stdin();
    let fd = stdin.as_raw_fd();
    let mut buf: Vec<u8> = Vec::new();
    let mut eof = false;
    let mut core = GuardCore::new(
        args.margin_ms,
        args.ttl_ms,
        args.watchdog_device.is_some(),
        args.watchdog_required,
    );
    let mut dog: Option<device::Watchdog> = None;
    loop {
        let now = monotonic_ms();
        // Sleep until a message, the next pet, or the kill.
        let wait_ms = match core.wait_ms(now) {
            Some(ms) => ms.min(60_000),
            None if eof => break,
            None => 60_000,
        };
        if eof {
            std::thread::sleep(Duration::from_millis(wait_ms));
        } else {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one descriptor.
            let n = unsafe { libc::poll(&mut pfd, 1, wait_ms as libc::c_int) };
            if n > 0 {
                // Everything queued, not one chunk: acting on an old lease end after a stall
                // could kill a healthy primary.
                loop {
                    let mut chunk = [0u8; 4096];
                    // SAFETY: read(2) into a buffer of the given size.
                    let r = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
                    if r <= 0 {
                        eof = true;
                        break;
                    }
                    buf.extend_from_slice(&chunk[..r as usize]);
                    pfd.revents = 0;
                    // SAFETY: poll(2) on one descriptor, without waiting.
                    if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
                        break;
                    }
                }
            }
        }
        let mut effects = Vec::new();
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            let Some(message) = Message::parse(&line) else {
                eprintln!("guard: ignoring an unreadable message");
                continue;
            };
            let Some(Effect::OpenDevice { want_s }) =
                core.receive(message, monotonic_ms(), start_time)
            else {
                continue;
            };
            let Some(path) = &args.watchdog_device else {
                continue;
            };
            let more = match device::Watchdog::open(path, want_s) {
                Ok(w) => {
                    let (keep, more) = core.opened(Ok(w.timeout_s));
                    if keep {
                        dog = Some(w);
                    } else {
                        w.close();
                    }
                    more
                }
                Err(e) => core.opened(Err(e)).1,
            };
            effects.extend(more);
        }
        effects.extend(core.tick(monotonic_ms()));
        for effect in effects {
            match effect {
                Effect::Kill(a) => {
                    fence(&a);
                }
                Effect::Pet => {
                    if let Some(w) = dog.as_mut() {
                        w.keepalive();
                    }
                }
                Effect::CloseDevice => {
                    if let Some(w) = dog.take() {
                        w.close();
                    }
                }
                Effect::Report(line) => report(&line),
                Effect::OpenDevice { .. } => {}
            }
        }
    }
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PostgreSQL's children leave the postmaster's process group (setsid): a fence that
    /// signals the group, or the postmaster alone, leaves them running.
    #[test]
    fn the_fence_kills_children_in_sessions_of_their_own() {
        let Ok(mut parent) = std::process::Command::new("sh")
            .args(["-c", "setsid sleep 60 & setsid sleep 60 & wait"])
            .spawn()
        else {
            panic!("cannot run sh");
        };
        let pid = parent.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while children_of(pid).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let kids = children_of(pid);
        assert_eq!(kids.len(), 2, "children of {pid}: {kids:?}");
        for k in &kids {
            assert_ne!(
                stat_fields(*k).and_then(|f| f.get(3).cloned()),
                Some(pid.to_string()),
                "the child should be in a session of its own"
            );
        }
        let a = Armed {
            pid,
            start_time: start_time(pid).unwrap_or_default(),
            lease_end_ms: 0,
        };
        assert!(fence(&a));
        let _ = parent.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = || {
            kids.iter()
                .filter(|k| !matches!(state(**k), None | Some('Z')))
                .count()
        };
        while alive() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(alive(), 0, "children survived the fence: {kids:?}");
        // A process that is gone, or another one under a reused pid, is never killed.
        assert!(!fence(&a));
        let me = Armed {
            pid: std::process::id(),
            start_time: 1,
            lease_end_ms: 0,
        };
        assert!(!fence(&me));
    }

    #[test]
    fn start_time_reads_this_process() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn something_that_is_no_watchdog_is_refused() {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        assert!(device::Watchdog::open(f.path(), 5).is_err());
        assert!(device_usable(f.path()).is_err());
        assert!(device::Watchdog::open(Path::new("/nonexistent/watchdog"), 5).is_err());
        // /dev/null is a character device, but no watchdog.
        assert!(device_usable(Path::new("/dev/null")).is_ok());
        assert!(device::Watchdog::open(Path::new("/dev/null"), 5).is_err());
    }

    #[test]
    fn only_required_blocks_leading() {
        let state = GuardState::default();
        state
            .running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut cfg = WatchdogConfig {
            mode: WatchdogMode::Automatic,
            device: "/nonexistent/watchdog".into(),
        };
        assert_eq!(blocks_leading(&cfg, &state), None);
        cfg.mode = WatchdogMode::Required;
        let why = blocks_leading(&cfg, &state).unwrap_or_default();
        assert!(why.contains("/nonexistent/watchdog"), "{why}");
        cfg.device = "/dev/null".into();
        assert_eq!(blocks_leading(&cfg, &state), None);
        if let Ok(mut w) = state.watchdog.lock() {
            *w = WatchdogStatus::Failed {
                reason: "not a watchdog".into(),
                at: Instant::now(),
            };
        }
        let why = blocks_leading(&cfg, &state).unwrap_or_default();
        assert!(why.contains("not a watchdog"), "{why}");
        state
            .running
            .store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(blocks_leading(&cfg, &state).is_some());
    }
}
