//! Problems found in a spec: what, where (file, line, column, field path) and how to fix it.
//!
//! Analyses return every diagnostic they find rather than stopping at the first, so one run of
//! `validate` shows the whole list. Rendering is plain text in a compiler-like shape (one
//! greppable `file:line:col` header per problem, then the source line) or JSON for tools.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::yaml::{Node, Pos, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One step of a field path: a map key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A field path such as `groups[1].hosts[0].address`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }
    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Segment::Key(k.to_string()));
        Self(v)
    }
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Segment::Index(i));
        Self(v)
    }
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

/// Build a path from a dotted literal: `path("groups[1].hosts[0].address")`.
pub fn path(text: &str) -> FieldPath {
    let mut out = FieldPath::root();
    for part in text.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        if let Some(open) = rest.find('[') {
            out = out.key(&rest[..open]);
            rest = &rest[open..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let close = stripped.find(']').unwrap_or(stripped.len());
                out = out.index(stripped[..close].parse().unwrap_or(0));
                rest = stripped.get(close + 1..).unwrap_or("");
            }
        } else {
            out = out.key(rest);
        }
    }
    out
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

impl Serialize for FieldPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Where a diagnostic points: the value itself, or its key (for unknown and duplicate fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    Value,
    Key,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub path: FieldPath,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip)]
    pub pos: Option<Pos>,
    #[serde(skip)]
    pub anchor: Anchor,
}

impl Diagnostic {
    pub fn error(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            path,
            message: message.into(),
            hint: None,
            pos: None,
            anchor: Anchor::Value,
        }
    }
    pub fn warning(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(path, message)
        }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn at_key(mut self) -> Self {
        self.anchor = Anchor::Key;
        self
    }
    pub fn at(mut self, pos: Pos) -> Self {
        self.pos = Some(pos);
        self
    }

    /// Fill in the position from the tree: the node at the path, or the nearest ancestor that
    /// exists (a missing field points at the map that should hold it).
    pub fn locate(mut self, root: Option<&Node>) -> Self {
        if self.pos.is_some() {
            return self;
        }
        let Some(mut node) = root else {
            return self;
        };
        let mut pos = node.pos;
        for (i, seg) in self.path.0.iter().enumerate() {
            let last = i + 1 == self.path.0.len();
            let next = match (seg, &node.value) {
                (Segment::Key(k), Value::Map(_)) => node.entry(k).map(|(key, value)| {
                    if last && self.anchor == Anchor::Key {
                        (key, key.pos)
                    } else {
                        (value, value.pos)
                    }
                }),
                (Segment::Index(n), Value::Seq(items)) => items.get(*n).map(|v| (v, v.pos)),
                _ => None,
            };
            match next {
                Some((child, p)) => {
                    node = child;
                    pos = p;
                }
                None => break,
            }
        }
        self.pos = Some(pos);
        self
    }
}

/// Source text of one spec file, kept to render diagnostics with their line.
pub struct Source<'a> {
    pub name: &'a Path,
    pub text: &'a str,
    /// Places that hold secret values; they are masked wherever a source line is shown.
    pub secrets: &'a [Pos],
}

/// Whether a field path leads into a secret (any `password` field).
pub fn is_secret_path(path: &FieldPath) -> bool {
    path.0
        .iter()
        .any(|s| matches!(s, Segment::Key(k) if k == "password"))
}

/// Positions of every scalar under a `password` key, for masking.
pub fn secret_positions(root: &Node) -> Vec<Pos> {
    fn walk(node: &Node, inside: bool, out: &mut Vec<Pos>) {
        match &node.value {
            Value::Map(entries) => {
                for (k, v) in entries {
                    let key = match &k.value {
                        Value::Str(s) => s.as_str(),
                        _ => "",
                    };
                    // `{env: NAME}` and `{file: PATH}` name where a secret is, not the secret.
                    if inside && (key == "env" || key == "file") {
                        continue;
                    }
                    walk(v, inside || key == "password", out);
                }
            }
            Value::Seq(items) => items.iter().for_each(|i| walk(i, inside, out)),
            _ if inside => out.push(node.pos),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(root, false, &mut out);
    out
}

/// Mask secrets on one displayed source line: exact positions when known, and, as a fallback
/// for text that never parsed, whatever follows a `password:` key up to `,` or `}`.
fn mask_line(line: &str, line_no: usize, secrets: &[Pos]) -> String {
    let mut chars: Vec<char> = line.chars().collect();
    for p in secrets.iter().filter(|p| p.line == line_no) {
        let start = p.column.saturating_sub(1);
        for c in chars.iter_mut().skip(start).take(p.len) {
            *c = '*';
        }
    }
    let text: String = chars.iter().collect();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("password") {
        let (before, after) = rest.split_at(i + "password".len());
        out.push_str(before);
        let trimmed = after.trim_start_matches(['"', '\'']).trim_start();
        if let Some(value) = trimmed.strip_prefix(':') {
            let lead = after.len() - value.len();
            out.push_str(&after[..lead]);
            let end = value.find([',', '}']).unwrap_or(value.len());
            let (secret, tail) = value.split_at(end);
            let masked: String = secret
                .chars()
                .map(|c| {
                    if c.is_whitespace() || c == '{' {
                        c
                    } else {
                        '*'
                    }
                })
                .collect();
            // `{env: NAME}` and `{file: PATH}` are references, not secrets: keep them readable.
            if secret.trim_start().starts_with('{') {
                out.push_str(secret);
            } else {
                out.push_str(&masked);
            }
            rest = tail;
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Render diagnostics as text, errors first, in source order.
pub fn render_text(source: &Source<'_>, diagnostics: &[Diagnostic]) -> String {
    let mut sorted: Vec<&Diagnostic> = diagnostics.iter().collect();
    sorted.sort_by_key(|d| (d.severity, d.pos.map(|p| (p.line, p.column))));
    let mut out = String::new();
    for d in sorted {
        render_one(&mut out, source, d);
    }
    out
}

fn render_one(out: &mut String, source: &Source<'_>, d: &Diagnostic) {
    let level = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    let file = source.name.display();
    let location = match d.pos {
        Some(p) => format!("{file}:{}:{}", p.line, p.column),
        None => file.to_string(),
    };
    if d.path.is_root() {
        out.push_str(&format!("{level}: {location}: {}\n", d.message));
    } else {
        out.push_str(&format!("{level}: {location}: {}: {}\n", d.path, d.message));
    }
    if let Some(p) = d.pos {
        if let Some(line) = source.text.lines().nth(p.line.saturating_sub(1)) {
            let line: String = mask_line(line, p.line, source.secrets)
                .chars()
                .take(200)
                .collect();
            let gutter = p.line.to_string();
            let pad = " ".repeat(gutter.len());
            let available = line.chars().count().saturating_sub(p.column - 1).max(1);
            let width = p.len.min(available);
            out.push_str(&format!("{pad} |\n{gutter} | {line}\n{pad} | "));
            out.push_str(&" ".repeat(p.column.saturating_sub(1)));
            out.push_str(&"^".repeat(width.max(1)));
            out.push('\n');
        }
    }
    if let Some(h) = &d.hint {
        out.push_str(&format!("  = hint: {h}\n"));
    }
}

#[derive(Serialize)]
struct JsonDiagnostic<'a> {
    file: String,
    line: Option<usize>,
    column: Option<usize>,
    #[serde(flatten)]
    diagnostic: &'a Diagnostic,
}

/// Render diagnostics as JSON objects, one per problem.
pub fn to_json(source_name: &Path, diagnostics: &[Diagnostic]) -> Vec<serde_json::Value> {
    diagnostics
        .iter()
        .map(|d| {
            serde_json::to_value(JsonDiagnostic {
                file: source_name.display().to_string(),
                line: d.pos.map(|p| p.line),
                column: d.pos.map(|p| p.column),
                diagnostic: d,
            })
            .unwrap_or(serde_json::Value::Null)
        })
        .collect()
}

/// Levenshtein distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate to `word`, when it is close enough to be a plausible typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for p in ["groups[1].hosts[0].address", "etcd.endpoints[2]", "cluster"] {
            assert_eq!(path(p).to_string(), p);
        }
        assert_eq!(FieldPath::root().to_string(), "(document)");
    }

    #[test]
    fn suggestions_catch_typos_only() {
        assert_eq!(suggest("adress", ["address", "name"]), Some("address"));
        assert_eq!(
            suggest("identity_fle", ["identity_file", "user"]),
            Some("identity_file")
        );
        assert_eq!(suggest("zzz", ["address", "name"]), None);
    }
}
