//! A position-carrying YAML tree, used only to locate problems in a spec.
//!
//! serde_yaml is the parse of record (it builds the typed document), but it exposes no positions
//! for values that parsed fine, and semantic errors ("two hosts share 10.0.0.5:5432") need a
//! line and column too. This module reads the same text into a small tree of [`Node`]s that
//! remember where they start. It resolves scalars with the YAML 1.2 core schema, as serde_yaml
//! does, and it defends itself: alias expansion and nesting depth are bounded, so a hostile file
//! fails fast instead of eating memory.

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Upper bound on nodes produced after alias expansion ("billion laughs" defence).
const MAX_EXPANDED_NODES: usize = 100_000;
/// Upper bound on nesting depth.
const MAX_DEPTH: usize = 64;

/// A place in the source text. `line` and `column` are 1-based; `len` is the number of
/// characters worth underlining (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// Human description of the kind of value, used in "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "null".to_string(),
            Value::Bool(b) => format!("boolean `{b}`"),
            Value::Int(i) => format!("integer `{i}`"),
            Value::Float(f) => format!("number `{f}`"),
            Value::Str(s) => format!("string {}", quote_for_message(s)),
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a map".to_string(),
        }
    }

    /// The entry `key` of a map node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key node and value node of entry `key` of a map node.
    pub fn entry(&self, key: &str) -> Option<(&Node, &Node)> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key))
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }
}

/// Quote a user value for an error message, shortened so that a huge value cannot flood output.
pub fn quote_for_message(s: &str) -> String {
    let mut short: String = s.chars().take(60).collect();
    if short.len() < s.len() {
        short.push('…');
    }
    format!("{short:?}")
}

/// A YAML syntax or resource-limit error with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct YamlError {
    pub message: String,
    pub pos: Pos,
}

fn pos_of(m: &Marker, len: usize) -> Pos {
    Pos {
        line: m.line().max(1),
        column: m.col() + 1,
        len: len.max(1),
    }
}

/// Parse one YAML document into a [`Node`] tree. An empty document yields `Ok(None)`.
pub fn parse(text: &str) -> Result<Option<Node>, YamlError> {
    let mut parser = Parser::new_from_str(text);
    let mut builder = Builder {
        anchors: Vec::new(),
        expanded: 0,
    };
    let mut documents = 0usize;
    let mut root = None;
    loop {
        let (event, mark) = next(&mut parser)?;
        match event {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(YamlError {
                        message: "expected a single YAML document, found a second one".into(),
                        pos: pos_of(&mark, 3),
                    });
                }
            }
            other => {
                let node = builder.node(&mut parser, other, mark, 0)?;
                root = Some(node);
            }
        }
    }
    Ok(root)
}

fn next(parser: &mut Parser<std::str::Chars<'_>>) -> Result<(Event, Marker), YamlError> {
    parser.next_token().map_err(|e| YamlError {
        message: format!("invalid YAML: {}", e.info()),
        pos: pos_of(e.marker(), 1),
    })
}

struct Builder {
    /// Anchored nodes by anchor id (ids are dense, starting at 1).
    anchors: Vec<Option<Node>>,
    expanded: usize,
}

impl Builder {
    fn count(&mut self, n: usize, mark: &Marker) -> Result<(), YamlError> {
        self.expanded = self.expanded.saturating_add(n);
        if self.expanded > MAX_EXPANDED_NODES {
            return Err(YamlError {
                message: format!(
                    "document expands to more than {MAX_EXPANDED_NODES} values through aliases; refusing it"
                ),
                pos: pos_of(mark, 1),
            });
        }
        Ok(())
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor == 0 {
            return;
        }
        if self.anchors.len() <= anchor {
            self.anchors.resize(anchor + 1, None);
        }
        self.anchors[anchor] = Some(node.clone());
    }

    fn node(
        &mut self,
        parser: &mut Parser<std::str::Chars<'_>>,
        event: Event,
        mark: Marker,
        depth: usize,
    ) -> Result<Node, YamlError> {
        if depth > MAX_DEPTH {
            return Err(YamlError {
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
                pos: pos_of(&mark, 1),
            });
        }
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                self.count(1, &mark)?;
                let quoted = !matches!(style, TScalarStyle::Plain);
                let len = text.chars().count() + if quoted { 2 } else { 0 };
                let value = if tag.is_some() || quoted {
                    // A tag such as `!!str` or quoting makes the scalar a string.
                    Value::Str(text)
                } else {
                    resolve_plain(text)
                };
                let node = Node {
                    value,
                    pos: pos_of(&mark, len),
                };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, m) = next(parser)?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.node(parser, ev, m, depth + 1)?);
                }
                self.count(1, &mark)?;
                let node = Node {
                    value: Value::Seq(items),
                    pos: pos_of(&mark, 1),
                };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries: Vec<(Node, Node)> = Vec::new();
                loop {
                    let (ev, m) = next(parser)?;
                    if ev == Event::MappingEnd {
                        break;
                    }
                    let key = self.node(parser, ev, m, depth + 1)?;
                    let (vev, vm) = next(parser)?;
                    let value = self.node(parser, vev, vm, depth + 1)?;
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.value == key.value) {
                        return Err(YamlError {
                            message: format!(
                                "duplicate key {} (first defined on line {})",
                                key_text(&key),
                                first.pos.line
                            ),
                            pos: key.pos,
                        });
                    }
                    entries.push((key, value));
                }
                self.count(1, &mark)?;
                // A block mapping's start mark is unreliable; its first key is where it begins.
                let pos = entries
                    .first()
                    .map(|(k, _)| k.pos)
                    .unwrap_or(pos_of(&mark, 1));
                let node = Node {
                    value: Value::Map(entries),
                    pos,
                };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::Alias(id) => {
                let Some(Some(target)) = self.anchors.get(id).cloned() else {
                    return Err(YamlError {
                        message: "alias refers to an unknown anchor".into(),
                        pos: pos_of(&mark, 1),
                    });
                };
                self.count(size(&target), &mark)?;
                // The alias's copy is reported at the alias, where the user wrote it.
                Ok(relocate(target, pos_of(&mark, 1)))
            }
            other => Err(YamlError {
                message: format!("unexpected YAML event {other:?}"),
                pos: pos_of(&mark, 1),
            }),
        }
    }
}

fn key_text(node: &Node) -> String {
    match &node.value {
        Value::Str(s) => quote_for_message(s),
        _ => node.describe(),
    }
}

fn size(node: &Node) -> usize {
    match &node.value {
        Value::Seq(items) => 1 + items.iter().map(size).sum::<usize>(),
        Value::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| size(k) + size(v))
                .sum::<usize>()
        }
        _ => 1,
    }
}

fn relocate(mut node: Node, pos: Pos) -> Node {
    node.pos = pos;
    node
}

/// YAML 1.2 core-schema resolution of a plain scalar, matching serde_yaml.
fn resolve_plain(text: String) -> Value {
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    if let Some(i) = parse_int(&text) {
        return Value::Int(i);
    }
    let looks_numeric = text
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+' || c == '.');
    if looks_numeric
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'))
    {
        if let Ok(f) = text.parse::<f64>() {
            return Value::Float(f);
        }
    }
    Value::Str(text)
}

fn parse_int(text: &str) -> Option<i128> {
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => (-1i128, rest),
        None => (1, text.strip_prefix('+').unwrap_or(text)),
    };
    let (radix, body) = if let Some(b) = digits.strip_prefix("0x") {
        (16, b)
    } else if let Some(b) = digits.strip_prefix("0o") {
        (8, b)
    } else {
        (10, digits)
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    i128::from_str_radix(body, radix).ok().map(|v| sign * v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(src: &str, expected: &str) {
        let got = match parse(src) {
            Ok(Some(node)) => summarize(&node),
            Ok(None) => "<empty>".to_string(),
            Err(e) => format!("error {}:{} {}", e.pos.line, e.pos.column, e.message),
        };
        assert_eq!(got, expected, "input: {src:?}");
    }

    fn summarize(node: &Node) -> String {
        let inner = match &node.value {
            Value::Null => "null".to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format!("{f}f"),
            Value::Str(s) => format!("{s:?}"),
            Value::Seq(items) => format!(
                "[{}]",
                items.iter().map(summarize).collect::<Vec<_>>().join(", ")
            ),
            Value::Map(entries) => format!(
                "{{{}}}",
                entries
                    .iter()
                    .map(|(k, v)| format!("{}: {}", summarize(k), summarize(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!("{inner}@{}:{}", node.pos.line, node.pos.column)
    }

    #[test]
    fn scalars_resolve_like_serde_yaml() {
        check("a: 1", "{\"a\"@1:1: 1@1:4}@1:1");
        check(
            "- ~\n- yes\n- 'true'\n- 0x1f\n- 1.5\n- -3",
            "[null@1:3, \"yes\"@2:3, \"true\"@3:3, 31@4:3, 1.5f@5:3, -3@6:3]@1:1",
        );
        check("", "<empty>");
        check("# only a comment\n", "<empty>");
    }

    #[test]
    fn positions_are_one_based() {
        check(
            "x:\n  y: [1, 2]\n",
            "{\"x\"@1:1: {\"y\"@2:3: [1@2:7, 2@2:10]@2:6}@2:3}@1:1",
        );
    }

    #[test]
    fn defends_against_hostile_documents() {
        check(
            "a: 1\na: 2\n",
            "error 2:1 duplicate key \"a\" (first defined on line 1)",
        );
        check(
            "a: 1\n---\nb: 2\n",
            "error 2:1 expected a single YAML document, found a second one",
        );
        check(
            "a: [1, 2\n",
            "error 2:1 invalid YAML: while parsing a flow sequence, expected ',' or ']'",
        );
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..10u8 {
            let prev = (b'a' + i) as char;
            let name = (b'b' + i) as char;
            bomb.push_str(&format!("{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let err = parse(&bomb).err().map(|e| e.message).unwrap_or_default();
        assert!(err.contains("expands to more than"), "{err}");
        let deep = "[".repeat(200);
        let err = parse(&deep).err().map(|e| e.message).unwrap_or_default();
        assert!(err.contains("nesting deeper"), "{err}");
    }
}
