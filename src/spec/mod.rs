//! The desired-state document: parse, check structure and rules, resolve, and report every
//! problem with file, line, column and field path. No I/O beyond reading the spec and the
//! secret files it names; nothing here talks to hosts, etcd or PostgreSQL.

pub mod diagnostic;
pub mod model;
pub mod raw;
pub mod rules;
pub mod secret;
mod structure;
pub mod yaml;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use diagnostic::{Diagnostic, FieldPath, Severity};
pub use model::{Context, HostSpec, Spec};
pub use secret::Secret;

/// Specs larger than this are refused before parsing.
pub const MAX_SPEC_BYTES: u64 = 1024 * 1024;

/// The outcome of analysing one spec file: its text (for rendering) and every diagnostic.
/// `spec` is present exactly when there is no error.
pub struct Report {
    pub file: PathBuf,
    pub text: String,
    pub diagnostics: Vec<Diagnostic>,
    pub spec: Option<Spec>,
    /// Positions of secret values in `text`, masked when lines are shown.
    pub secrets: Vec<yaml::Pos>,
}

impl Report {
    pub fn has_errors(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }
    pub fn render(&self) -> String {
        diagnostic::render_text(
            &diagnostic::Source {
                name: &self.file,
                text: &self.text,
                secrets: &self.secrets,
            },
            &self.diagnostics,
        )
    }
    fn failed(file: &Path, text: String, d: Diagnostic) -> Self {
        Self {
            file: file.to_path_buf(),
            text,
            diagnostics: vec![d],
            spec: None,
            secrets: Vec::new(),
        }
    }
}

/// Options for loading from disk with the real environment.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub resolve_secrets: bool,
    /// Read etcd's password even without `resolve_secrets`.
    pub resolve_etcd_secret: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            resolve_secrets: true,
            resolve_etcd_secret: true,
        }
    }
}

/// Read and analyse a spec file with the process environment and file system.
pub fn load_file(file: &Path, options: LoadOptions) -> Report {
    let env = |name: &str| std::env::var(name).ok();
    let read = |p: &Path| std::fs::read_to_string(p);
    let ctx = Context {
        spec_dir: file
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf(),
        env: &env,
        read_file: &read,
        resolve_secrets: options.resolve_secrets,
        resolve_etcd_secret: options.resolve_etcd_secret,
    };
    match read_limited(file) {
        Ok(bytes) => analyze(file, &bytes, &ctx),
        Err(message) => Report::failed(
            file,
            String::new(),
            Diagnostic::error(FieldPath::root(), message),
        ),
    }
}

fn read_limited(file: &Path) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(file)
        .map_err(|e| format!("cannot read spec file: {}", e.to_string().to_lowercase()))?;
    if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err("cannot read spec file: it is a directory".into());
    }
    let mut bytes = Vec::new();
    f.take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read spec file: {}", e.to_string().to_lowercase()))?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(format!(
            "spec file is larger than {} KiB; refusing to parse it",
            MAX_SPEC_BYTES / 1024
        ));
    }
    Ok(bytes)
}

/// Analyse spec bytes: every syntax, structure, rule and secret problem at once.
pub fn analyze(file: &Path, bytes: &[u8], ctx: &Context<'_>) -> Report {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t.to_string(),
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
            let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1;
            let lossy = String::from_utf8_lossy(bytes).into_owned();
            return Report::failed(
                file,
                lossy,
                Diagnostic::error(
                    FieldPath::root(),
                    format!(
                        "file is not valid UTF-8 (byte 0x{:02x})",
                        bytes[e.valid_up_to()]
                    ),
                )
                .with_hint("save the spec as UTF-8 text")
                .at(yaml::Pos {
                    line,
                    column,
                    len: 1,
                }),
            );
        }
    };
    let root = match yaml::parse(&text) {
        Ok(Some(root)) => root,
        Ok(None) => {
            return Report::failed(
                file,
                text,
                Diagnostic::error(FieldPath::root(), "the spec is empty").with_hint(
                    "start from examples/minimal.yaml; `citus-reconcile schema` prints the format",
                ),
            );
        }
        Err(e) => {
            // libyaml (behind serde_yaml) words syntax errors with more context ("while parsing
            // a flow sequence at line 4…"); prefer its message when it agrees there is one.
            let d = match serde_yaml::from_str::<serde_yaml::Value>(&text) {
                Err(se) if se.location().is_some() => {
                    let loc = se
                        .location()
                        .map(|l| (l.line(), l.column()))
                        .unwrap_or((e.pos.line, e.pos.column));
                    Diagnostic::error(
                        FieldPath::root(),
                        format!("invalid YAML: {}", strip_location(&se.to_string())),
                    )
                    .at(yaml::Pos {
                        line: loc.0,
                        column: loc.1,
                        len: 1,
                    })
                }
                _ => Diagnostic::error(FieldPath::root(), e.message).at(e.pos),
            };
            return Report::failed(file, text.clone(), d);
        }
    };

    let secrets = diagnostic::secret_positions(&root);
    let schema = raw::json_schema();
    let mut diagnostics =
        structure::Checker::new(&schema).check(&root, &schema, &FieldPath::root());
    if !diagnostics.is_empty() {
        return Report {
            file: file.to_path_buf(),
            text,
            diagnostics,
            spec: None,
            secrets,
        };
    }

    // The parse of record. The structural check above accepts only documents serde accepts,
    // so an error here is a disagreement between the two readers; it is still reported.
    let raw: raw::RawSpec = match serde_yaml::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            let mut d = Diagnostic::error(FieldPath::root(), strip_location(&e.to_string()));
            if let Some(loc) = e.location() {
                d = d.at(yaml::Pos {
                    line: loc.line(),
                    column: loc.column(),
                    len: 1,
                });
            }
            let mut report = Report::failed(file, text, d);
            report.secrets = secrets;
            return report;
        }
    };

    let (spec, secret_diags) = model::build(&raw, file, ctx);
    diagnostics.extend(secret_diags);
    diagnostics.extend(rules::check(&spec));
    let diagnostics: Vec<Diagnostic> = diagnostics
        .into_iter()
        .map(|d| d.locate(Some(&root)))
        .collect();
    let ok = !diagnostics.iter().any(|d| d.severity == Severity::Error);
    Report {
        file: file.to_path_buf(),
        text,
        diagnostics,
        spec: ok.then_some(spec),
        secrets,
    }
}

/// Drop the first " at line N column M" (the diagnostic shows it already); later ones, such as
/// "while parsing a flow sequence at line 4 column 14", are context worth keeping.
fn strip_location(message: &str) -> String {
    let Some(start) = message.find(" at line ") else {
        return message.to_string();
    };
    let rest = &message[start + " at line ".len()..];
    let skip_number = |s: &str| {
        s.trim_start_matches(|c: char| c.is_ascii_digit())
            .to_string()
    };
    let after_line = skip_number(rest);
    let after = match after_line.strip_prefix(" column ") {
        Some(r) => skip_number(r),
        None => after_line,
    };
    format!("{}{}", &message[..start], after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::model::SyncMode;

    fn analyze_str(text: &str) -> Report {
        let env = |name: &str| match name {
            "CR_TEST_SUPERUSER" => Some("su-pass".to_string()),
            "CR_TEST_REPLICATION" => Some("repl-pass".to_string()),
            "HOME" => Some("/home/op".to_string()),
            _ => None,
        };
        let read = |p: &Path| match p.to_str() {
            Some("/specs/etcd-ca.pem") => {
                Ok(include_str!("../../tests/specs/valid/etcd-ca.pem").to_string())
            }
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                p.display().to_string(),
            )),
        };
        let ctx = Context {
            spec_dir: PathBuf::from("/specs"),
            env: &env,
            read_file: &read,
            resolve_secrets: true,
            resolve_etcd_secret: true,
        };
        analyze(Path::new("/specs/s.yaml"), text.as_bytes(), &ctx)
    }

    #[test]
    fn overrides_merge_over_defaults() {
        let text = include_str!("../../tests/specs/valid/overrides.yaml");
        let report = analyze_str(text);
        let spec = report
            .spec
            .as_ref()
            .unwrap_or_else(|| panic!("{}", report.render()));
        let coord1 = spec.host("coord1").expect("coord1");
        let coord2 = spec.host("coord2").expect("coord2");
        let w1 = spec.host("w1").expect("w1");
        assert_eq!((coord1.ssh.user.as_str(), coord1.ssh.port), ("admin", 22));
        assert_eq!(coord2.ssh.port, 2222);
        assert_eq!(
            coord1.ssh.identity_file,
            Some(PathBuf::from("/specs/keys/id"))
        );
        assert_eq!(
            coord1.ssh.known_hosts,
            PathBuf::from("/home/op/.ssh/known_hosts")
        );
        assert_eq!((coord1.pg_port, coord2.pg_port), (5432, 5433));
        assert_eq!((coord1.api_port, coord2.api_port), (8008, 8009));
        assert_eq!(coord1.data_dir, "/var/lib/postgresql/16/overrides/coord1");
        assert_eq!(coord2.data_dir, "/data/overrides/coord2");
        assert_eq!(w1.install_dir, "/var/lib/citus-reconcile/overrides/w1");
        assert_eq!(w1.group, 7);
        assert!(coord1.tags.nofailover && !coord2.tags.nofailover);
        assert_eq!(spec.ha.synchronous_mode, SyncMode::Strict);
        assert_eq!(spec.postgres.superuser.password.expose(), "su-pass");
        assert_eq!(
            spec.postgres.parameters.get("jit").map(String::as_str),
            Some("off")
        );
        assert_eq!(
            spec.postgres
                .parameters
                .get("shared_buffers")
                .map(String::as_str),
            Some("1GB")
        );
        assert_eq!(spec.group_prefix(7), "/citus/overrides/7/");
        let tls = spec.etcd.tls.as_ref().expect("etcd.tls");
        assert!(
            tls.ca
                .text
                .expose()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert!(tls.cert.is_none() && tls.key.is_none());
        assert_eq!(
            spec.secret_files(),
            vec![PathBuf::from("/specs/etcd-ca.pem")]
        );
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let report = analyze_str(include_str!("../../tests/specs/valid/base.yaml"));
        let spec = report
            .spec
            .as_ref()
            .unwrap_or_else(|| panic!("{}", report.render()));
        assert_eq!(
            (spec.ha.ttl, spec.ha.loop_wait, spec.ha.retry_timeout),
            (30, 10, 10)
        );
        assert_eq!(spec.ha.synchronous_mode, SyncMode::Off);
        assert_eq!(spec.postgres.bin_dir, "/usr/lib/postgresql/15/bin");
        assert_eq!(spec.etcd.namespace, "/service");
        assert_eq!(spec.citus.database, "citus");
        assert!(spec.citus.authinfo.password);
        assert_eq!(
            spec.host("work1").map(|h| h.socket_dir()),
            Some("/var/lib/citus-reconcile/test/work1/run".into())
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = analyze_str(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn arbitrary_yamlish_text_never_panics(text in "[a-z:{}\\[\\],&*!|>'\" \n-]{0,300}") {
            let _ = analyze_str(&text);
        }
    }
}
