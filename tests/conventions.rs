//! Conventions the codebase keeps, checked so they stay kept.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir)
        .expect("readable source folder")
        .flatten()
    {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_module_starts_with_a_doc_line() {
    let mut files = Vec::new();
    rust_files(Path::new("src"), &mut files);
    assert!(!files.is_empty());
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        assert!(
            text.starts_with("//!"),
            "{} must start with a `//!` line saying what it owns",
            f.display()
        );
    }
}

#[test]
fn ci_runs_the_readme_test_command() {
    let readme = std::fs::read_to_string("README.md").expect("README");
    let ci = std::fs::read_to_string(".ci/run").expect(".ci/run");
    // The command is the one in the README's first shell block after the setup step.
    let block = readme
        .split("```sh")
        .nth(2)
        .and_then(|b| b.split("```").next())
        .expect("README test block");
    let command = block.trim().trim_start_matches(".ci/setup && ").trim();
    assert!(!command.is_empty());
    assert!(
        ci.lines().any(|l| l.trim() == command),
        "README's test command `{command}` is not a line of .ci/run"
    );
}

/// Every `crate::a::b` path a file mentions.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        out.push(tail[..end].trim_end_matches(':').to_string());
        rest = &tail[end.max(7)..];
    }
    out
}

#[test]
fn pure_cores_import_no_io_modules() {
    // The pure cores take values and return values. They may use other pure modules, never a
    // transport, SQL, processes or the runtime.
    let pure_allowed = [
        "crate::spec",
        "crate::plan",
        "crate::citus::metadata",
        "crate::citus::pause",
        "crate::dcs::keys",
        "crate::postgres::conf",
        "crate::postgres::scram",
        "crate::postgres::timeline",
        "crate::agent::config",
        "crate::agent::decide",
        "crate::agent::sync",
        "crate::agent::slots",
        "crate::agent::guard_core",
    ];
    let mut files = Vec::new();
    rust_files(Path::new("src/spec"), &mut files);
    rust_files(Path::new("src/plan"), &mut files);
    files.extend(
        [
            "src/agent/decide.rs",
            "src/agent/config.rs",
            "src/agent/sync.rs",
            "src/agent/slots.rs",
            "src/agent/guard_core.rs",
            "src/citus/metadata.rs",
            "src/citus/pause.rs",
            "src/dcs/keys.rs",
            "src/postgres/conf.rs",
            "src/postgres/scram.rs",
            "src/postgres/timeline.rs",
        ]
        .map(PathBuf::from),
    );
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        for path in crate_paths(&text) {
            assert!(
                pure_allowed
                    .iter()
                    .any(|a| path == *a || path.starts_with(&format!("{a}::"))),
                "{} is a pure module but uses {path}",
                f.display()
            );
        }
        for forbidden in [
            "tokio::",
            "std::process",
            "std::net::Tcp",
            "std::net::Udp",
            "std::fs",
            "russh",
            "etcd_client",
            "tokio_postgres",
        ] {
            // The one exception: spec's loader reads the spec file and its secret files.
            if forbidden == "std::fs" && f == Path::new("src/spec/mod.rs") {
                continue;
            }
            assert!(
                !text.contains(forbidden),
                "{} is a pure module but uses {forbidden}",
                f.display()
            );
        }
    }
}
