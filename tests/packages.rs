//! Lab test of `install: apt` through a caching proxy: the lab's hosts reach Debian's archive
//! only through the machine, so an apt-cacher-ng listens on the lab link and the spec points
//! `postgres.apt_proxy` at it. `apply` installs an extension package that is not on the host
//! (`postgres.extra_packages`), holds every package, and the next plan is empty. Then
//! `postgres.repository: pgdg` adds the PostgreSQL project's repository, its key checked.
//!
//! The lab's hosts share the machine's filesystem: the package lands on the machine itself.
//! The test removes it first (so it is really downloaded) and afterwards, and gives back the
//! holds it found.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const SUBNET: u8 = 164;
/// A small extension in Debian's archive (HyperLogLog, by Citus Data): not installed by
/// `.ci/setup`, so `apply` has to download it.
const PACKAGE: &str = "postgresql-15-hll";
const PROXY_PORT: u16 = 3142;
/// The sources file `postgres.repository: pgdg` makes apply write.
const PGDG_SOURCES: &str = "/etc/apt/sources.list.d/citus-reconcile-pgdg.sources";
const PGDG_KEYRING: &str = "/etc/apt/keyrings/citus-reconcile-pgdg.gpg";
/// What `citus.repository` makes apply write.
const CITUS_SOURCES: &str = "/etc/apt/sources.list.d/citus-reconcile-citus.sources";
const CITUS_KEYRING: &str = "/etc/apt/keyrings/citus-reconcile-citus.gpg";

/// A key server of the test's own on the lab link (the lab cannot reach
/// repos.citusdata.com): every GET is answered with `body`. On port 80 of the lab's own
/// address, the one port apt-cacher-ng proxies to by default.
fn serve_key(address: &str, body: Vec<u8>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind((address, 80)).expect("key server");
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
            );
            let _ = c.write_all(&body);
        }
    });
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("sh runs")
}

fn holds() -> Vec<String> {
    String::from_utf8_lossy(&sh("apt-mark showhold").stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn installed(pkg: &str) -> bool {
    String::from_utf8_lossy(
        &sh(&format!(
            "dpkg-query -W -f '${{db:Status-Status}}' {pkg} 2>/dev/null"
        ))
        .stdout,
    ) == "installed"
}

fn purge(pkg: &str) {
    let o = sh(&format!(
        "apt-mark unhold {pkg} >/dev/null 2>&1; apt-get purge -y -qq {pkg}"
    ));
    assert!(
        o.status.success() && !installed(pkg),
        "cannot remove {pkg}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Put the machine back as the test found it, also when it fails: the extension removed, the
/// holds it did not find released, the proxy stopped (by its pid).
struct Restore {
    holds_before: Vec<String>,
    proxy: Option<Child>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = sh(&format!(
            "apt-mark unhold {PACKAGE} >/dev/null 2>&1; apt-get purge -y -qq {PACKAGE}"
        ));
        for h in holds() {
            if !self.holds_before.contains(&h) {
                let _ = sh(&format!("apt-mark unhold {h}"));
            }
        }
        for f in [PGDG_SOURCES, PGDG_KEYRING, CITUS_SOURCES, CITUS_KEYRING] {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// An apt-cacher-ng of the test's own (its configuration and folders in `dir`), on the lab
/// link only. Its own configuration has no mirror remapping: the package's
/// `/etc/apt-cacher-ng` sends Debian's requests to a fixed mirror list, while this one fetches
/// the URL apt asked for, from wherever the machine's own apt reaches it.
fn start_proxy(dir: &Path, address: &str) -> Child {
    for d in ["cache", "log", "conf"] {
        std::fs::create_dir_all(dir.join(d)).expect("proxy folders");
    }
    std::fs::write(
        dir.join("conf/acng.conf"),
        format!(
            "CacheDir: {}\nLogDir: {}\n",
            dir.join("cache").display(),
            dir.join("log").display()
        ),
    )
    .expect("proxy configuration");
    Command::new("/usr/sbin/apt-cacher-ng")
        .arg("-c")
        .arg(dir.join("conf"))
        .arg("ForeGround=1")
        .arg(format!("Port={PROXY_PORT}"))
        .arg(format!("BindAddress={address}"))
        .arg(format!("PidFile={}", dir.join("pid").display()))
        .arg(format!("SocketPath={}", dir.join("socket").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("apt-cacher-ng starts")
}

#[test]
fn extra_packages_install_through_an_apt_cacher_ng_on_the_lab_link() {
    if !lab_available("install: apt through an apt-cacher-ng") {
        return;
    }
    if !Path::new("/usr/sbin/apt-cacher-ng").exists() {
        if std::env::var("CITUS_RECONCILE_REQUIRE_LAB").as_deref() == Ok("1") {
            panic!("apt-cacher-ng is not installed (.ci/setup installs it)");
        }
        eprintln!("skipped: apt-cacher-ng is not installed");
        return;
    }
    let mut restore = Restore {
        holds_before: holds(),
        proxy: None,
    };
    if installed(PACKAGE) {
        purge(PACKAGE);
    }
    let gateway = format!("10.213.{SUBNET}.254");
    let spec = lab_spec("citusapt", SUBNET, &[(0, 1)], 1, "").replacen(
        "  install: none\n",
        &format!(
            "  install: apt\n  apt_proxy: http://{gateway}:{PROXY_PORT}\n  extra_packages: [{PACKAGE}]\n"
        ),
        1,
    );
    set_lab_secrets();
    let t = TestLab::up(&spec);
    let proxy_dir = t.dir.path().join("apt-cacher-ng");
    restore.proxy = Some(start_proxy(&proxy_dir, &gateway));
    // The proxy answers on the lab link before apply needs it.
    wait_for(
        "apt-cacher-ng on the lab link",
        Duration::from_secs(20),
        || {
            std::net::TcpStream::connect_timeout(
                &format!("{gateway}:{PROXY_PORT}").parse().ok()?,
                Duration::from_millis(200),
            )
            .ok()
        },
    );

    let plan = output_text(&cli(&t, &["plan"]));
    assert!(
        plan.contains(&format!("install packages: {PACKAGE} ")),
        "the plan installs the extension:\n{plan}"
    );
    let o = cli(&t, &["apply", "--auto-approve"]);
    let text = output_text(&o);
    assert!(o.status.success(), "apply failed:\n{text}");

    // Installed, held, and usable through the coordinator.
    assert!(installed(PACKAGE), "{PACKAGE} is not installed:\n{text}");
    let held = holds();
    for p in [PACKAGE, "postgresql-15"] {
        assert!(held.iter().any(|h| h == p), "{p} is not held: {held:?}");
    }
    assert!(
        Path::new("/etc/postgresql-common/createcluster.d/50-citus-reconcile.conf").exists(),
        "no createcluster.d file keeping Debian from making a `main` cluster"
    );
    let (member, _, _) = members(&t, 0).remove(0);
    let version = psql(
        &t,
        &member,
        "CREATE EXTENSION IF NOT EXISTS hll; SELECT extversion FROM pg_extension WHERE extname = 'hll'",
    );
    assert!(!version.trim().is_empty(), "hll not created: {version:?}");

    // The package lists and the package came through the proxy, asked for by the lab host.
    let log = std::fs::read_to_string(proxy_dir.join("log/apt-cacher.log")).unwrap_or_default();
    let host = &t.spec.groups[0].hosts[0].address;
    for what in ["InRelease", PACKAGE] {
        assert!(
            log.lines()
                .any(|l| l.contains(what) && l.contains(host.as_str())),
            "apt-cacher-ng did not serve {what} to {host}:\n{log}"
        );
    }

    // Idempotent: nothing left to do.
    let again = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "a second plan is not empty:\n{}",
        output_text(&again)
    );

    // The PostgreSQL project's repository: the keyring postgresql-common ships is read from
    // the host and checked against the pinned key before the sources file is written. (The
    // lab cannot reach apt.postgresql.org: nothing is installed from it here.)
    assert!(
        !Path::new(PGDG_SOURCES).exists(),
        "{PGDG_SOURCES} exists before the test wrote it"
    );
    let spec = std::fs::read_to_string(&t.spec_path).expect("spec");
    std::fs::write(
        &t.spec_path,
        spec.replacen(
            "  install: apt\n",
            "  install: apt\n  repository: pgdg\n",
            1,
        ),
    )
    .expect("write spec");
    let o = cli(&t, &["apply", "--auto-approve"]);
    let text = output_text(&o);
    assert!(
        o.status.success() && text.contains("add the PostgreSQL project's apt repository"),
        "{text}"
    );
    let sources = std::fs::read_to_string(PGDG_SOURCES).unwrap_or_default();
    assert!(
        sources.contains("-pgdg\n")
            && sources.contains("Signed-By: /etc/apt/keyrings/citus-reconcile-pgdg.gpg"),
        "{sources}"
    );
    let again = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "a plan after the repository was added is not empty:\n{}",
        output_text(&again)
    );

    // Citus's repository: its key is downloaded on the host (through the proxy) and trusted
    // only with the spec's fingerprint. The key served is the PostgreSQL project's armored
    // key, whose fingerprint is known; a spec naming another is refused, nothing written.
    let armored = std::fs::read("/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc")
        .expect("postgresql-common's armored key");
    serve_key(&gateway, armored);
    let with_citus_repo = |fingerprint: &str| {
        // The spec without a citus line, then with this one.
        let text = std::fs::read_to_string(&t.spec_path).expect("spec");
        let base = match text.find("citus: {") {
            Some(i) => {
                let end = text[i..]
                    .find('\n')
                    .map(|e| i + e + 1)
                    .unwrap_or(text.len());
                format!("{}{}", &text[..i], &text[end..])
            }
            None => text,
        };
        base.replacen(
            "groups:\n",
            &format!(
                "citus: {{ package: postgresql-15-citus-13.2, repository: {{ url: \"http://{gateway}/citus\", key_url: \"http://{gateway}/key.asc\", key_fingerprint: \"{fingerprint}\" }} }}\ngroups:\n"
            ),
            1,
        )
    };
    std::fs::write(&t.spec_path, with_citus_repo(&"A".repeat(40))).expect("write spec");
    let o = cli(&t, &["apply", "--auto-approve"]);
    let text = output_text(&o);
    assert!(
        !o.status.success() && text.contains("not the pinned"),
        "a key with another fingerprint was not refused:\n{text}"
    );
    assert!(
        !Path::new(CITUS_SOURCES).exists() && !Path::new(CITUS_KEYRING).exists(),
        "files written for a refused key"
    );
    std::fs::write(
        &t.spec_path,
        with_citus_repo("B97B 0AFC AA1A 47F0 44F2  44A0 7FCC 7D46 ACCC 4CF8"),
    )
    .expect("write spec");
    let o = cli(&t, &["apply", "--auto-approve"]);
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    let sources = std::fs::read_to_string(CITUS_SOURCES).unwrap_or_default();
    assert!(
        sources.contains(&format!(
            "URIs: http://{gateway}/citus/debian/\nSuites: bookworm\n"
        )),
        "{sources}"
    );
    let keyring = std::fs::read(CITUS_KEYRING).unwrap_or_default();
    assert_eq!(
        citus_reconcile::plan::repository::primary_key_fingerprints(&keyring),
        Ok(vec!["B97B0AFCAA1A47F044F244A07FCC7D46ACCC4CF8".to_string()]),
        "the keyring written is the binary key"
    );
    let again = cli(&t, &["plan", "--detailed-exitcode"]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "a plan after Citus's repository was added is not empty:\n{}",
        output_text(&again)
    );
    drop(t);
    drop(restore);
    assert!(!installed(PACKAGE), "{PACKAGE} left behind");
}
