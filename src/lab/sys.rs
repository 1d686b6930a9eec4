//! Running the system programs the lab drives (`ip`, `iptables`, `ssh-keygen`, …): every run
//! has a timeout, and failures carry the command line and its stderr.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::LabError;

/// Default timeout for one system command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Run a program to completion; Ok(stdout) on exit status 0.
pub fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    run_in(None, program, args)
}

/// Run a program inside a network namespace (or the machine's when `ns` is None).
pub fn run_in(ns: Option<&str>, program: &str, args: &[&str]) -> Result<String, LabError> {
    run_with(ns, None, program, args)
}

/// Like [`run_in`], and with `hostname` set, in a UTS namespace of its own with that name, so
/// everything started from it (sshd and its sessions) sees the host's own name.
fn run_with(
    ns: Option<&str>,
    hostname: Option<&str>,
    program: &str,
    args: &[&str],
) -> Result<String, LabError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = ns {
        enter_netns(&mut cmd, ns)?;
    }
    if let Some(name) = hostname {
        let name = name.as_bytes().to_vec();
        // SAFETY: unshare and sethostname are async-signal-safe; `name` is owned by the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWUTS) != 0
                    || libc::sethostname(name.as_ptr().cast(), name.len()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let shown = format!(
        "{}{} {}",
        ns.map(|n| format!("[{n}] ")).unwrap_or_default(),
        program,
        args.join(" ")
    );
    let mut child = cmd.spawn().map_err(|e| LabError::Command {
        command: shown.clone(),
        detail: format!("cannot start: {e}"),
    })?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    // Readers on threads so a chatty program cannot block on a full pipe.
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::Command {
                    command: shown,
                    detail: format!("timed out after {}s", COMMAND_TIMEOUT.as_secs()),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return Err(LabError::Command {
                    command: shown,
                    detail: format!("cannot wait: {e}"),
                });
            }
        }
    };
    let out = out_thread.join().unwrap_or_default();
    let err = err_thread.join().unwrap_or_default();
    if status.success() {
        Ok(out)
    } else {
        Err(LabError::Command {
            command: shown,
            detail: format!("{status}: {}", err.trim()),
        })
    }
}

/// Make `cmd` start inside network namespace `ns` (`/run/netns/{ns}`), without the mount
/// namespace games of `ip netns exec`.
fn enter_netns(cmd: &mut Command, ns: &str) -> Result<(), LabError> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let file =
        std::fs::File::open(Path::new("/run/netns").join(ns)).map_err(|e| LabError::Command {
            command: format!("enter namespace {ns}"),
            detail: e.to_string(),
        })?;
    let fd: OwnedFd = file.into();
    let raw = fd.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the fd stays open in the parent (moved into the
    // closure) until the command has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fd;
            if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Start a long-running program detached (own session, reparented to init) inside `ns`,
/// with output appended to `log`. Returns its pid.
pub fn spawn_detached(
    ns: &str,
    hostname: Option<&str>,
    log: &Path,
    program: &str,
    args: &[&str],
) -> Result<u32, LabError> {
    // `sh` backgrounds the program and prints its pid, then exits: the program is reparented
    // to init at once, so no zombie is left with us whatever happens to it later.
    let script = r#"log="$1"; shift; setsid "$@" </dev/null >>"$log" 2>&1 & echo $!"#;
    let log_s = log.to_string_lossy().into_owned();
    let mut argv: Vec<&str> = vec!["-c", script, "sh", &log_s, program];
    argv.extend_from_slice(args);
    let out = run_with(Some(ns), hostname, "sh", &argv)?;
    out.trim().parse::<u32>().map_err(|_| LabError::Command {
        command: format!("start {program} in {ns}"),
        detail: format!("unexpected pid output {out:?}"),
    })
}

/// Whether `pid` is a live (non-zombie) process inside namespace `ns`.
pub fn alive_in(pid: u32, ns: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    same_netns(pid, ns)
}

/// Whether `pid` lives in network namespace `ns`.
pub fn same_netns(pid: u32, ns: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(proc_ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
        return false;
    };
    let Ok(named) = std::fs::metadata(Path::new("/run/netns").join(ns)) else {
        return false;
    };
    proc_ns.ino() == named.ino() && proc_ns.dev() == named.dev()
}

/// Every pid inside namespace `ns`.
pub fn pids_in(ns: &str) -> Vec<u32> {
    run("ip", &["netns", "pids", ns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL every process in `ns` and wait (bounded) until none is left.
pub fn kill_all_in(ns: &str) -> Result<(), LabError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() {
            return Ok(());
        }
        for pid in &pids {
            // Only processes verified to be inside the lab's own namespace are signalled.
            if same_netns(*pid, ns) {
                // SAFETY: plain kill(2) on a pid we just checked.
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(LabError::Command {
                command: format!("kill processes in {ns}"),
                detail: format!("still running after 10s: {pids:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until a TCP port accepts connections, from the machine's namespace.
pub fn wait_for_tcp(addr: std::net::SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}
