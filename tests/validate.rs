//! `validate` end to end: the corpus of broken specs under tests/specs/invalid (one snapshot of
//! the messages each), valid specs and examples, hostile files, and secret hygiene.

use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;

const SUPERUSER_SECRET: &str = "superuser-secret-value-8c1f";
const REPLICATION_SECRET: &str = "replication-secret-value-77ad";

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn validate(args: &[&str]) -> Outcome {
    let out = Command::cargo_bin("citus-reconcile")
        .expect("binary is built by cargo test")
        .arg("validate")
        .args(args)
        .env("CR_TEST_SUPERUSER", SUPERUSER_SECRET)
        .env("CR_TEST_REPLICATION", REPLICATION_SECRET)
        .env_remove("CR_TEST_UNSET_VARIABLE")
        // A guard against hangs, not a performance assertion.
        .timeout(Duration::from_secs(30))
        .output()
        .expect("validate runs");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("corpus folder exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn assert_clean(o: &Outcome, what: &str) {
    for text in [&o.stdout, &o.stderr] {
        assert!(
            !text.contains("panicked"),
            "{what}: panic in output:\n{text}"
        );
        assert!(
            !text.contains(SUPERUSER_SECRET),
            "{what}: superuser secret printed:\n{text}"
        );
        assert!(
            !text.contains(REPLICATION_SECRET),
            "{what}: replication secret printed:\n{text}"
        );
    }
}

#[test]
fn every_broken_spec_fails_with_located_messages() {
    let files = yaml_files("tests/specs/invalid");
    assert!(files.len() >= 25, "the corpus shrank to {}", files.len());
    for file in files {
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("unnamed")
            .to_string();
        let path = file.to_string_lossy().into_owned();
        let o = validate(&[&path]);
        assert_eq!(
            o.code, 1,
            "{name} should be invalid:\n{}{}",
            o.stdout, o.stderr
        );
        assert_clean(&o, &name);
        assert!(
            o.stderr.contains(&format!("error: {path}")),
            "{name}: no error line naming the file:\n{}",
            o.stderr
        );
        insta::assert_snapshot!(name, format!("{}{}", o.stderr, o.stdout));
    }
}

#[test]
fn valid_specs_and_examples_pass() {
    let mut files = yaml_files("tests/specs/valid");
    files.extend(yaml_files("examples"));
    for file in files {
        let path = file.to_string_lossy().into_owned();
        let o = validate(&[&path]);
        assert_eq!(
            o.code, 0,
            "{path} should be valid:\n{}{}",
            o.stdout, o.stderr
        );
        assert_clean(&o, &path);
        assert!(o.stdout.contains(&format!("{path}: valid")), "{}", o.stdout);
    }
}

#[test]
fn several_files_report_each_and_fail_if_any_fails() {
    let o = validate(&[
        "examples/minimal.yaml",
        "tests/specs/invalid/ttl-too-short.yaml",
    ]);
    assert_eq!(o.code, 1);
    assert!(
        o.stdout.contains("examples/minimal.yaml: valid"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("ttl-too-short.yaml: invalid: 1 error"),
        "{}",
        o.stdout
    );
}

#[test]
fn json_format_is_machine_readable() {
    let o = validate(&[
        "--format",
        "json",
        "tests/specs/invalid/unknown-fields.yaml",
    ]);
    assert_eq!(o.code, 1);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("stdout is JSON");
    let first = &v[0]["diagnostics"][0];
    assert_eq!(v[0]["valid"], false);
    assert_eq!(first["path"], "etcd.endpoint");
    assert_eq!(first["line"], 4);
    assert_eq!(first["column"], 3);
    assert_eq!(first["severity"], "error");
}

#[test]
fn skip_secrets_checks_shape_only() {
    let o = validate(&[
        "--skip-secrets",
        "tests/specs/invalid/unset-secret-env.yaml",
    ]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("temp file written");
    p.to_string_lossy().into_owned()
}

#[test]
fn hostile_files_fail_fast_and_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12u8 {
        let (prev, name) = ((b'a' + i) as char, (b'b' + i) as char);
        let refs = vec![format!("*{prev}"); 10].join(", ");
        bomb.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "non-utf8.yaml",
            b"apiVersion: citus-reconcile/v1\ncluster: \xff\xfe\n".to_vec(),
            "2:10: file is not valid UTF-8",
        ),
        (
            "huge.yaml",
            "# padding\n".repeat(120_000).into_bytes(),
            "larger than 1024 KiB",
        ),
        ("bomb.yaml", bomb.into_bytes(), "expands to more than"),
        (
            "deep.yaml",
            "[".repeat(5000).into_bytes(),
            "recursion limit exceeded",
        ),
        ("junk.yaml", junk, "error:"),
        (
            "scalar.yaml",
            b"just a string\n".to_vec(),
            "expected a map, found string",
        ),
        ("null.yaml", b"~\n".to_vec(), "expected a map, found null"),
        ("tabs.yaml", b"cluster:\n\t- x\n".to_vec(), "invalid YAML"),
    ];
    for (name, bytes, expected) in cases {
        let path = write(dir.path(), name, &bytes);
        let o = validate(&[&path]);
        assert_eq!(o.code, 1, "{name}:\n{}{}", o.stdout, o.stderr);
        assert_clean(&o, name);
        assert!(
            o.stderr.contains(expected),
            "{name}: expected {expected:?} in:\n{}",
            o.stderr
        );
    }
    let missing = dir
        .path()
        .join("missing.yaml")
        .to_string_lossy()
        .into_owned();
    let o = validate(&[&missing]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("cannot read spec file: no such file"),
        "{}",
        o.stderr
    );
    let folder = dir.path().to_string_lossy().into_owned();
    let o = validate(&[&folder]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("it is a directory"), "{}", o.stderr);
}

#[test]
fn resolved_secrets_never_reach_output() {
    // A spec whose secrets resolve and that still has errors: messages must not show them.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("repl.txt"),
        format!("{REPLICATION_SECRET}\n"),
    )
    .expect("secret file");
    let spec = std::fs::read_to_string("tests/specs/valid/base.yaml")
        .expect("base spec")
        .replace("{ env: CR_TEST_REPLICATION }", "{ file: repl.txt }")
        .replace("cluster: test", "cluster: Bad_Name");
    let path = write(dir.path(), "spec.yaml", spec.as_bytes());
    let o = validate(&[&path]);
    assert_eq!(o.code, 1);
    assert_clean(&o, "resolved secrets");
}

#[test]
fn checked_in_schema_is_current() {
    let out = Command::cargo_bin("citus-reconcile")
        .expect("binary")
        .arg("schema")
        .output()
        .expect("schema runs");
    assert!(out.status.success());
    let printed: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("schema prints JSON");
    let file =
        std::fs::read_to_string("specs/citus-reconcile.v1.schema.json").expect("checked-in schema");
    let checked_in: serde_json::Value =
        serde_json::from_str(&file).expect("checked-in schema is JSON");
    assert!(
        printed == checked_in,
        "specs/citus-reconcile.v1.schema.json is out of date: run `cargo run -- schema > specs/citus-reconcile.v1.schema.json`"
    );
}
