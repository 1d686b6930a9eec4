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

#[test]
fn pure_cores_import_no_io_modules() {
    // spec and plan are values in, values out: they must not reach for transports.
    for dir in ["src/spec"] {
        let mut files = Vec::new();
        rust_files(Path::new(dir), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).expect("readable");
            for forbidden in [
                "crate::ssh",
                "crate::dcs",
                "crate::postgres",
                "crate::observe",
                "crate::lab",
                "tokio::",
            ] {
                assert!(
                    !text.contains(forbidden),
                    "{} uses {forbidden}",
                    f.display()
                );
            }
        }
    }
}
