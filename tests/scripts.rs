//! Hostile spec values never run as commands on a host. Every script `plan` and `apply` send
//! over SSH is rendered from a spec whose free-form fields hold `$(…)`, backticks, quotes,
//! newlines, spaces, `%`, `;`, `&` and globs, then run by real shells (`sh` and `bash`) whose
//! PATH holds only stubs that do nothing, except `touch`, which leaves a mark: a mark means a
//! value escaped its quoting. The systemd unit gets the same values: every line stays one of
//! ours.

use std::path::Path;
use std::process::{Command, Stdio};

use citus_reconcile::agent::config::Paths;
use citus_reconcile::observe::probe_script;
use citus_reconcile::provision::etcd;
use citus_reconcile::provision::{
    UNIT_KEYS, download_key_script, hold_packages_script, install_packages_script,
    prepare_dirs_script, read_config_script, read_keyring_script, record_hash_script,
    reload_script, set_aside_script, start_script, stop_script, unit_text,
};
use citus_reconcile::spec::model::{EtcdMemberSpec, Service};
use citus_reconcile::spec::{self, Context, Spec};
use citus_reconcile::ssh::{Script, upload_script};
use proptest::prelude::*;

/// Commands the scripts call; each becomes a stub that exits 0 without doing anything.
const STUBS: &[&str] = &[
    "apt-get",
    "base64",
    "cat",
    "chmod",
    "chown",
    "cut",
    "env",
    "grep",
    "head",
    "id",
    "ls",
    "mkdir",
    "mktemp",
    "mv",
    "rm",
    "sed",
    "setsid",
    "sha256sum",
    "sleep",
    "stat",
    "sudo",
    "systemctl",
    "tail",
    "tr",
    "citus-reconcile",
    "postgres",
    "pg_config",
    "pg_controldata",
    "etcd",
    "kill",
    "date",
    "apt-mark",
    "update-rc.d",
];

/// A folder of stubs, and a `touch` that marks `$MARK`.
fn sandbox() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("stub");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    };
    for s in STUBS {
        write(s, "#!/bin/sh\nexit 0\n");
    }
    write("touch", "#!/bin/sh\necho \"$@\" >> \"$MARK\"\n");
    dir
}

/// Run `script` under `shell` with only the stubs on PATH; what an injected `touch` marked.
fn marks(shell: &str, script: &Script, stubs: &Path) -> String {
    let mark = stubs.join("mark");
    let _ = std::fs::remove_file(&mark);
    let status = Command::new(shell)
        .arg("-c")
        .arg(script.text())
        .env_clear()
        .env("PATH", stubs)
        .env("MARK", &mark)
        .current_dir(stubs)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("the shell runs");
    let _ = status;
    std::fs::read_to_string(&mark).unwrap_or_default()
}

/// Fragments that would run `touch` if a shell read them as code.
const HOSTILE: &[&str] = &[
    "$(touch dollar)",
    "`touch backtick`",
    "'; touch single; '",
    "\"; touch double; \"",
    "\ntouch newline\n",
    "; touch semicolon",
    "& touch amp",
    "| touch pipe",
    "$(IFS=_;touch${IFS}ifs)",
    "%n%i%h",
    " space ",
    "*",
    "\\",
    "{dir}",
    "${HOME}",
    "'",
    "\"",
    "#",
];

fn hostile() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(HOSTILE).prop_map(str::to_string),
            "[a-z0-9/._-]{0,6}",
        ],
        1..4,
    )
    .prop_map(|parts| format!("/nonexistent/{}", parts.concat()))
}

/// A spec whose free-form fields hold the given values (as YAML double-quoted strings).
/// A one-host spec with these folders. The agent runs as a `process`: for `systemd` the spec
/// refuses quotes and backslashes in the install folder (systemd refuses them in an
/// executable's path), and the scripts of both services are rendered below anyway.
fn spec_with(bin_dir: &str, data_dir: &str, install_dir: &str) -> Option<Spec> {
    let q = |s: &str| serde_json::to_string(s).expect("json");
    let text = format!(
        "apiVersion: citus-reconcile/v1\ncluster: c\netcd: {{ endpoints: [http://10.0.0.5:2379] }}\n\
         postgres:\n  install: none\n  bin_dir: {}\n  superuser: {{ username: postgres, password: su }}\n  \
         replication: {{ username: replicator, password: re }}\n\
         agent: {{ service: process }}\n\
         groups:\n  - group: 0\n    hosts:\n      - {{ name: m1, address: 10.0.0.11, postgres: {{ data_dir: {} }}, agent: {{ install_dir: {} }} }}\n",
        q(bin_dir),
        q(data_dir),
        q(install_dir)
    );
    let env = |_: &str| None;
    let read = |p: &Path| {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            p.display().to_string(),
        ))
    };
    let ctx = Context {
        spec_dir: "/".into(),
        env: &env,
        read_file: &read,
        resolve_secrets: true,
        resolve_etcd_secret: true,
    };
    spec::analyze(Path::new("/s.yaml"), text.as_bytes(), &ctx).spec
}

/// Every script for one host of `spec`, with `odd` where a function takes a free value.
fn every_script(spec: &Spec, odd: &str) -> Vec<(&'static str, Script)> {
    let h = &spec.groups[0].hosts[0];
    let paths = Paths::new(&h.install_dir);
    let mut out = vec![
        ("probe", probe_script(spec, h)),
        (
            "install packages",
            install_packages_script(&[odd.to_string(), "citus".into()], Some(odd), true),
        ),
        ("hold packages", hold_packages_script(&[odd.to_string()])),
        ("read keyring", read_keyring_script(odd, odd, Some(odd))),
        ("download key", download_key_script(odd, Some(odd))),
        ("prepare dirs", prepare_dirs_script(&paths)),
        ("record hash", record_hash_script(&paths, odd)),
        ("read config", read_config_script(&paths)),
        (
            "set aside",
            set_aside_script(&h.data_dir, &format!("{}.removed-1", h.data_dir)),
        ),
        (
            "upload",
            upload_script(&h.install_dir, odd, &paths.config(), 0o600, odd),
        ),
    ];
    // A managed etcd member whose name, address and folder are the odd value.
    let m = EtcdMemberSpec {
        name: odd.to_string(),
        address: odd.to_string(),
        client_port: 2379,
        peer_port: 2380,
        dir: format!("/tmp/{odd}"),
        ssh: h.ssh.clone(),
    };
    out.push(("etcd prepare dir", etcd::prepare_dir_script(&m.dir)));
    out.push(("etcd start", etcd::start_script(&m)));
    out.push(("etcd start unit", etcd::start_unit_script(odd, odd)));
    out.push(("etcd retire", etcd::retire_script(&m, odd)));
    out.push(("etcd install", etcd::install_script(Some(odd))));
    for service in [Service::Process, Service::Systemd] {
        out.push(("etcd probe", etcd::probe_script(&m, service, odd)));
        out.push(("start", start_script(service, &paths, odd, odd)));
        out.push(("stop", stop_script(service, &paths, odd, odd)));
        out.push(("reload", reload_script(service, &paths, odd, odd)));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn hostile_values_stay_data_in_every_remote_script(
        bin_dir in hostile(),
        data_dir in hostile(),
        install_dir in hostile(),
        odd in hostile(),
    ) {
        // A value validation refuses never reaches a host: draw another (rejected draws do
        // not count toward the cases).
        let spec = spec_with(&bin_dir, &data_dir, &install_dir);
        prop_assume!(spec.is_some());
        let Some(spec) = spec else { return Ok(()) };
        let stubs = sandbox();
        for (name, script) in every_script(&spec, &odd) {
            for shell in ["/bin/sh", "/bin/bash"] {
                let m = marks(shell, &script, stubs.path());
                prop_assert!(m.is_empty(), "{name} under {shell} ran an injected command ({m}):\n{}", script.text());
            }
        }
        // The unit file: every line is a directive of ours, whatever the paths and names.
        let unit = unit_text(&Paths::new(&install_dir), &odd, &odd);
        for line in unit.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let key = line.split('=').next().unwrap_or_default();
            prop_assert!(
                UNIT_KEYS.contains(&key),
                "a line not of ours: {line:?}\n{unit}"
            );
        }
    }
}

/// The stubs must not hide a real injection: the same harness marks an unquoted value.
#[test]
fn the_harness_sees_an_injection() {
    let stubs = sandbox();
    let quoted = citus_reconcile::ssh::quote("$(touch dollar)");
    let safe = Script::render("mkdir -p {dir}", &[("dir", &quoted)]);
    assert_eq!(marks("/bin/sh", &safe, stubs.path()), "");
    // A value spliced in by hand, as a bug would: the mark appears.
    let unquoted = citus_reconcile::ssh::quote("x");
    let bug = Script::render("mkdir -p $(touch dollar) {dir}", &[("dir", &unquoted)]);
    assert_eq!(marks("/bin/sh", &bug, stubs.path()).trim(), "dollar");
}

/// The property above is not vacuous: validation lets such values through to the scripts.
#[test]
fn validation_lets_hostile_paths_through() {
    let all = format!("/nonexistent-cr-test/{}", HOSTILE.concat());
    // The install folder is short: the PostgreSQL socket lives below it (107 bytes at most).
    let install = "/i/$(touch d)`touch b`'\";\n%*&|";
    assert!(spec_with(&all, &format!("{all}/data"), install).is_some());
}

/// systemd itself reads the unit as meant: `systemd-analyze verify` accepts it without a
/// warning, and finds the agent's binary in an install folder whose name holds what systemd
/// treats specially (`%` specifiers, `$` variables, spaces; quotes and backslashes it refuses
/// in an executable's path, and so does the spec). A quoting mistake would point ExecStart= at
/// a file that does not exist (as doubling `$` in the executable did).
#[test]
fn systemd_analyze_verifies_the_agent_unit() {
    let analyze = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: install Debian's `systemd` package (.ci/setup does)"
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let install = tmp.path().join("odd %n $HOME ${X} & b;|");
    let paths = Paths::new(&install.to_string_lossy());
    let binary = std::path::PathBuf::from(paths.binary());
    std::fs::create_dir_all(binary.parent().expect("a folder")).expect("install folder");
    std::fs::copy("/bin/true", &binary).expect("a binary to start");
    let unit = tmp.path().join("citus-reconcile-verify-test.service");
    std::fs::write(&unit, unit_text(&paths, "c%n$x", "m1")).expect("write the unit");
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}\n{}",
        std::fs::read_to_string(&unit).unwrap_or_default()
    );
    // A managed etcd member's unit, its folder as odd as the agent's.
    let etcd_unit = tmp.path().join("citus-reconcile-etcd-verify-test.service");
    let m = EtcdMemberSpec {
        name: "e1".into(),
        address: "10.0.0.5".into(),
        client_port: 2379,
        peer_port: 2380,
        dir: install.to_string_lossy().into_owned(),
        ssh: citus_reconcile::spec::model::SshSpec {
            user: "root".into(),
            port: 22,
            identity_file: None,
            known_hosts: "/k".into(),
        },
    };
    std::fs::write(&etcd_unit, etcd::unit_text(&m, "c%n$x")).expect("write the unit");
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&etcd_unit)
        .output()
        .expect("systemd-analyze runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && said.trim().is_empty(),
        "systemd-analyze verify (etcd): {said}\n{}",
        std::fs::read_to_string(&etcd_unit).unwrap_or_default()
    );
    // The check bites: the same unit pointing at a binary that is not there is refused.
    std::fs::remove_file(&binary).expect("remove the binary");
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    assert!(
        !o.status.success(),
        "a missing ExecStart binary went unnoticed"
    );
}

/// A managed etcd member's folder: root writes its configuration there, so the path must not
/// pass through a link or a folder another user owns or can write to.
#[test]
fn an_etcd_folder_another_user_could_redirect_is_refused() {
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let b = base.path();
    let run = |dir: &Path| {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(etcd::prepare_dir_script(&dir.to_string_lossy()).text())
            .output()
            .expect("sh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // The checkout's own folders must be safe for the cases below to mean anything.
    let (ok, err) = run(&b.join("good/etcd"));
    assert!(ok, "a root-owned path is refused: {err}");
    assert!(b.join("good/etcd").is_dir());
    std::fs::create_dir(b.join("shared")).expect("mkdir");
    std::fs::set_permissions(
        b.join("shared"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    std::fs::create_dir(b.join("owned")).expect("mkdir");
    std::os::unix::fs::chown(b.join("owned"), Some(65534), Some(65534)).expect("chown");
    std::fs::create_dir(b.join("elsewhere")).expect("mkdir");
    std::os::unix::fs::symlink(b.join("elsewhere"), b.join("link")).expect("symlink");
    for (dir, why) in [
        (b.join("shared/etcd"), "others can write to"),
        (b.join("owned/etcd"), "belongs to uid 65534"),
        (b.join("link/etcd"), "is a symbolic link"),
    ] {
        let (ok, err) = run(&dir);
        assert!(!ok && err.contains(why), "{}: {err}", dir.display());
        assert!(!dir.exists(), "{} was created", dir.display());
    }
}

/// The PostgreSQL project's key, pinned in `plan::repository`, is the one Debian's
/// postgresql-common ships (installed here with postgresql-15).
#[test]
fn the_pinned_pgdg_key_is_the_one_postgresql_common_ships() {
    use citus_reconcile::plan::repository as repo;
    let keyring = match std::fs::read(repo::PGDG_KEYRING) {
        Ok(b) => b,
        Err(e) if std::env::var("CITUS_RECONCILE_REQUIRE_LAB").as_deref() == Ok("1") => {
            panic!(
                "{}: {e} (.ci/setup installs postgresql-common)",
                repo::PGDG_KEYRING
            )
        }
        Err(e) => {
            eprintln!("skipped: {}: {e}", repo::PGDG_KEYRING);
            return;
        }
    };
    assert_eq!(
        repo::primary_key_fingerprints(&keyring),
        Ok(vec![repo::PGDG_KEY_FINGERPRINT.to_string()])
    );
    assert_eq!(
        repo::check_keyring(&keyring, repo::PGDG_KEY_FINGERPRINT),
        Ok(())
    );
    // Flip one bit of the key material: another fingerprint, refused.
    let mut tampered = keyring.clone();
    if let Some(b) = tampered.get_mut(20) {
        *b ^= 1;
    }
    assert!(repo::check_keyring(&tampered, repo::PGDG_KEY_FINGERPRINT).is_err());
    // The armored copy beside it (what a repository's `gpgkey` URL serves) gives the same.
    let armored_path = repo::PGDG_KEYRING.replace(".gpg", ".asc");
    if let Ok(armored) = std::fs::read(&armored_path) {
        let keyring = repo::dearmor(&armored).expect("dearmor");
        assert_eq!(
            repo::check_keyring(&keyring, repo::PGDG_KEY_FINGERPRINT),
            Ok(())
        );
    }
}
