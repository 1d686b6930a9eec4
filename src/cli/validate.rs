//! `citus-reconcile validate SPEC…`: every problem of every file, then a one-line verdict each.

use std::path::PathBuf;
use std::process::ExitCode;

use super::Format;
use crate::spec::{self, LoadOptions, Severity};

pub fn run(files: &[PathBuf], format: Format, skip_secrets: bool) -> miette::Result<ExitCode> {
    let options = LoadOptions {
        resolve_secrets: !skip_secrets,
        resolve_etcd_secret: !skip_secrets,
    };
    let mut all_ok = true;
    let mut json = Vec::new();
    for file in files {
        let report = spec::load_file(file, options);
        all_ok &= !report.has_errors();
        match format {
            Format::Text => {
                eprint!("{}", report.render());
                let errors = count(&report, Severity::Error);
                let warnings = count(&report, Severity::Warning);
                if errors == 0 {
                    println!(
                        "{}: valid{}",
                        file.display(),
                        plural(", ", warnings, "warning")
                    );
                } else {
                    println!(
                        "{}: invalid: {}{}",
                        file.display(),
                        plural("", errors, "error"),
                        plural(", ", warnings, "warning")
                    );
                }
            }
            Format::Json => json.push(serde_json::json!({
                "file": file.display().to_string(),
                "valid": !report.has_errors(),
                "diagnostics": spec::diagnostic::to_json(file, &report.diagnostics),
            })),
        }
    }
    if format == Format::Json {
        let text = serde_json::to_string_pretty(&json)
            .map_err(|e| miette::miette!("cannot render JSON: {e}"))?;
        println!("{text}");
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn count(report: &spec::Report, severity: Severity) -> usize {
    report
        .diagnostics
        .iter()
        .filter(|d| d.severity == severity)
        .count()
}

fn plural(prefix: &str, n: usize, word: &str) -> String {
    match n {
        0 => String::new(),
        1 => format!("{prefix}1 {word}"),
        _ => format!("{prefix}{n} {word}s"),
    }
}
