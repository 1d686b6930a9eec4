//! Structural checks of a YAML tree against the spec's JSON Schema: types, required and unknown
//! fields, enumerations and ranges, every problem at once and each with its position.
//!
//! The schema is generated from the serde types in `raw.rs`, so the published schema, this
//! check and deserialization cannot drift apart. Only the keywords that schemars emits for our
//! types are interpreted.

use serde_json::{Map, Value as Json};

use super::diagnostic::{Diagnostic, FieldPath, is_secret_path, suggest};
use super::yaml::{Node, Value, quote_for_message};

pub struct Checker<'a> {
    defs: Option<&'a Map<String, Json>>,
}

impl<'a> Checker<'a> {
    pub fn new(schema: &'a Json) -> Self {
        Self {
            defs: schema.get("$defs").and_then(Json::as_object),
        }
    }

    /// All structural problems of `node` against `schema`.
    pub fn check(&self, node: &Node, schema: &Json, path: &FieldPath) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        self.check_into(node, schema, path, &mut out);
        out
    }

    fn resolve<'s>(&'s self, schema: &'s Json) -> &'s Json {
        let mut current = schema;
        // Bounded: schemars emits at most one level of indirection per reference.
        for _ in 0..8 {
            let Some(target) = current.get("$ref").and_then(Json::as_str) else {
                break;
            };
            let name = target.trim_start_matches("#/$defs/");
            match self.defs.and_then(|d| d.get(name)) {
                Some(def) => current = def,
                None => break,
            }
        }
        current
    }

    fn check_into(&self, node: &Node, schema: &Json, path: &FieldPath, out: &mut Vec<Diagnostic>) {
        let schema = self.resolve(schema);
        if let Some(branches) = schema
            .get("anyOf")
            .or_else(|| schema.get("oneOf"))
            .and_then(Json::as_array)
        {
            self.check_any_of(node, schema, branches, path, out);
            return;
        }
        if !self.type_matches(node, schema) {
            let mut d = Diagnostic::error(
                path.clone(),
                format!(
                    "expected {}, found {}",
                    self.expectation(schema),
                    describe(node, path)
                ),
            )
            .at(node.pos);
            if let Some(h) = schema.get("description").and_then(Json::as_str) {
                if matches!(node.value, Value::Map(_) | Value::Seq(_) | Value::Null) {
                    d = d.with_hint(first_sentence(h));
                }
            }
            out.push(d);
            return;
        }
        match &node.value {
            Value::Str(s) => self.check_string(node, s, schema, path, out),
            Value::Int(i) => self.check_integer(node, *i, schema, path, out),
            Value::Seq(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check_into(item, item_schema, &path.index(i), out);
                    }
                }
            }
            Value::Map(entries) => self.check_map(node, entries, schema, path, out),
            _ => {}
        }
    }

    fn check_string(
        &self,
        node: &Node,
        s: &str,
        schema: &Json,
        path: &FieldPath,
        out: &mut Vec<Diagnostic>,
    ) {
        if let Some(expected) = schema.get("const").and_then(Json::as_str) {
            if s != expected {
                out.push(
                    Diagnostic::error(
                        path.clone(),
                        format!("expected `{expected}`, found {}", quote_for_message(s)),
                    )
                    .at(node.pos),
                );
            }
        }
        if let Some(options) = schema.get("enum").and_then(Json::as_array) {
            let names: Vec<&str> = options.iter().filter_map(Json::as_str).collect();
            if !names.contains(&s) {
                let mut d = Diagnostic::error(
                    path.clone(),
                    format!(
                        "expected one of {}, found {}",
                        list(&names),
                        quote_for_message(s)
                    ),
                )
                .at(node.pos);
                if let Some(best) = suggest(s, names.iter().copied()) {
                    d = d.with_hint(format!("did you mean `{best}`?"));
                }
                out.push(d);
            }
        }
    }

    fn check_integer(
        &self,
        node: &Node,
        i: i128,
        schema: &Json,
        path: &FieldPath,
        out: &mut Vec<Diagnostic>,
    ) {
        let min = schema.get("minimum").and_then(Json::as_f64);
        let max = schema.get("maximum").and_then(Json::as_f64);
        let (min_i, max_i) = (min.map(|m| m as i128), max.map(|m| m as i128));
        let below = min_i.is_some_and(|m| i < m);
        let above = max_i.is_some_and(|m| i > m);
        if below || above {
            let range = match (min_i, max_i) {
                (Some(a), Some(b)) => format!("an integer from {a} to {b}"),
                (Some(a), None) => format!("an integer of at least {a}"),
                (None, Some(b)) => format!("an integer of at most {b}"),
                (None, None) => "an integer".into(),
            };
            out.push(
                Diagnostic::error(path.clone(), format!("expected {range}, found {i}"))
                    .at(node.pos),
            );
        }
    }

    fn check_map(
        &self,
        node: &Node,
        entries: &[(Node, Node)],
        schema: &Json,
        path: &FieldPath,
        out: &mut Vec<Diagnostic>,
    ) {
        let properties = schema.get("properties").and_then(Json::as_object);
        let additional = schema.get("additionalProperties");
        for (key, value) in entries {
            let Value::Str(name) = &key.value else {
                out.push(
                    Diagnostic::error(
                        path.clone(),
                        format!("expected a field name, found {}", key.describe()),
                    )
                    .at(key.pos),
                );
                continue;
            };
            let child = path.key(name);
            if let Some(prop) = properties.and_then(|p| p.get(name)) {
                self.check_into(value, prop, &child, out);
                continue;
            }
            match additional {
                Some(Json::Bool(false)) => {
                    let known: Vec<&str> = properties
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    let hint = match suggest(name, known.iter().copied()) {
                        Some(best) => format!(
                            "did you mean `{best}`? fields allowed here: {}",
                            known.join(", ")
                        ),
                        None => format!("fields allowed here: {}", known.join(", ")),
                    };
                    out.push(
                        Diagnostic::error(
                            child,
                            format!("unknown field {}", quote_for_message(name)),
                        )
                        .with_hint(hint)
                        .at(key.pos),
                    );
                }
                Some(extra @ Json::Object(_)) => self.check_into(value, extra, &child, out),
                _ => {}
            }
        }
        if let Some(required) = schema.get("required").and_then(Json::as_array) {
            for name in required.iter().filter_map(Json::as_str) {
                if node.get(name).is_none() {
                    let mut d = Diagnostic::error(
                        path.key(name),
                        format!("missing required field `{name}`"),
                    )
                    .at(node.pos);
                    if let Some(desc) = properties
                        .and_then(|p| p.get(name))
                        .map(|p| self.resolve(p))
                        .and_then(|p| p.get("description"))
                        .and_then(Json::as_str)
                    {
                        d = d.with_hint(first_sentence(desc));
                    }
                    out.push(d);
                }
            }
        }
    }

    fn check_any_of(
        &self,
        node: &Node,
        schema: &Json,
        branches: &[Json],
        path: &FieldPath,
        out: &mut Vec<Diagnostic>,
    ) {
        let mut candidates: Vec<Vec<Diagnostic>> = Vec::new();
        for branch in branches {
            let errs = self.check(node, branch, path);
            if errs.is_empty() {
                return;
            }
            if self.type_matches(node, self.resolve(branch)) {
                candidates.push(errs);
            }
        }
        // Report the branch of the right shape that came closest; when none has the right
        // shape, or several are equally close, name every accepted form.
        candidates.sort_by_key(Vec::len);
        let unique_best = match candidates.as_slice() {
            [only] => Some(only),
            [a, b, ..] if a.len() < b.len() => Some(a),
            _ => None,
        };
        if let Some(best) = unique_best {
            out.extend(best.iter().cloned());
            return;
        }
        let forms: Vec<String> = branches
            .iter()
            .map(|b| self.expectation(self.resolve(b)))
            .collect();
        let mut d = Diagnostic::error(
            path.clone(),
            format!(
                "expected {}, found {}",
                or_list(&forms),
                describe(node, path)
            ),
        )
        .at(node.pos);
        // A closed set of words (an enum whose variants carry docs): suggest the nearest.
        let words: Vec<&str> = branches
            .iter()
            .filter_map(|b| self.resolve(b).get("const").and_then(Json::as_str))
            .collect();
        let suggestion = match &node.value {
            Value::Str(s) if !words.is_empty() => suggest(s, words.iter().copied()),
            _ => None,
        };
        if let Some(best) = suggestion {
            d = d.with_hint(format!("did you mean `{best}`?"));
        } else if let Some(h) = schema.get("description").and_then(Json::as_str) {
            d = d.with_hint(first_sentence(h));
        }
        out.push(d);
    }

    fn type_matches(&self, node: &Node, schema: &Json) -> bool {
        let types: Vec<&str> = match schema.get("type") {
            Some(Json::String(t)) => vec![t.as_str()],
            Some(Json::Array(ts)) => ts.iter().filter_map(Json::as_str).collect(),
            _ => return true,
        };
        types.iter().any(|t| {
            matches!(
                (*t, &node.value),
                ("null", Value::Null)
                    | ("boolean", Value::Bool(_))
                    | ("integer", Value::Int(_))
                    | ("number", Value::Int(_) | Value::Float(_))
                    | ("string", Value::Str(_))
                    | ("array", Value::Seq(_))
                    | ("object", Value::Map(_))
            )
        })
    }

    /// "an integer", "one of `apt`, `none`", "a map with `env`"…
    fn expectation(&self, schema: &Json) -> String {
        if let Some(c) = schema.get("const").and_then(Json::as_str) {
            return format!("`{c}`");
        }
        if let Some(options) = schema.get("enum").and_then(Json::as_array) {
            let names: Vec<&str> = options.iter().filter_map(Json::as_str).collect();
            return format!("one of {}", list(&names));
        }
        if let Some(branches) = schema.get("anyOf").and_then(Json::as_array) {
            let forms: Vec<String> = branches
                .iter()
                .map(|b| self.expectation(self.resolve(b)))
                .collect();
            return or_list(&forms);
        }
        let types: Vec<&str> = match schema.get("type") {
            Some(Json::String(t)) => vec![t.as_str()],
            Some(Json::Array(ts)) => ts
                .iter()
                .filter_map(Json::as_str)
                .filter(|t| *t != "null")
                .collect(),
            _ => vec![],
        };
        let forms: Vec<String> = types
            .iter()
            .map(|t| match *t {
                "object" => match schema.get("required").and_then(Json::as_array) {
                    Some(req)
                        if !req.is_empty()
                            && schema.get("additionalProperties") == Some(&Json::Bool(false))
                            && req.len() == 1 =>
                    {
                        format!("a map with `{}`", req[0].as_str().unwrap_or_default())
                    }
                    _ => "a map".to_string(),
                },
                "array" => "a list".to_string(),
                "string" => "a string".to_string(),
                "integer" => match (
                    schema.get("minimum").and_then(Json::as_f64),
                    schema.get("maximum").and_then(Json::as_f64),
                ) {
                    (Some(0.0), None) | (None, None) => "an integer".to_string(),
                    (Some(a), Some(b)) => format!("an integer from {a} to {b}"),
                    (Some(a), None) => format!("an integer of at least {a}"),
                    (None, Some(b)) => format!("an integer of at most {b}"),
                },
                "number" => "a number".to_string(),
                "boolean" => "a boolean".to_string(),
                other => other.to_string(),
            })
            .collect();
        if forms.is_empty() {
            "a value".into()
        } else {
            or_list(&forms)
        }
    }
}

/// Describe a value for a message, without its content when it sits in a secret field.
fn describe(node: &Node, path: &FieldPath) -> String {
    if !is_secret_path(path) {
        return node.describe();
    }
    match &node.value {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Int(_) | Value::Float(_) => "a number".into(),
        Value::Str(_) => "a string".into(),
        Value::Seq(_) => "a list".into(),
        Value::Map(_) => "a map".into(),
    }
}

fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn or_list(forms: &[String]) -> String {
    let mut unique: Vec<&String> = Vec::new();
    for f in forms {
        if !unique.contains(&f) {
            unique.push(f);
        }
    }
    match unique.as_slice() {
        [] => "a value".into(),
        [one] => (*one).clone(),
        [init @ .., last] => format!(
            "{} or {last}",
            init.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn first_sentence(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.find(". ") {
        Some(i) => one_line[..i].to_string(),
        None => one_line.trim_end_matches('.').to_string(),
    }
}
