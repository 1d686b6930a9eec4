//! Plans for people and for machines: text grouped by host and group with unified diffs, the
//! `kubectl diff`-style diff-only view, and JSON. Secrets never reach these: the plan holds
//! only redacted text.

use std::fmt::Write;

use console::style;

use super::model::Desired;
use super::{Action, Change, Kind, Plan, Target};

fn sigil(c: Change) -> String {
    match c {
        Change::Add => style("+").green().to_string(),
        Change::Change => style("~").yellow().to_string(),
        Change::Destroy => style("-").red().to_string(),
    }
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .map(|l| {
            let colored = if l.starts_with('+') && !l.starts_with("+++") {
                style(l).green().to_string()
            } else if l.starts_with('-') && !l.starts_with("---") {
                style(l).red().to_string()
            } else {
                l.to_string()
            };
            format!("{pad}{colored}\n")
        })
        .collect()
}

fn heading(t: &Target, desired: &Desired) -> String {
    match t {
        Target::Host(name) => match desired.hosts.get(name) {
            Some(h) => format!("{name} (group {}, {})", h.group, h.address),
            None => name.clone(),
        },
        Target::Group(0) => "group 0 (coordinator)".into(),
        Target::Group(g) => format!("group {g}"),
        Target::Cluster => "cluster".into(),
        Target::Etcd(name) => format!("etcd member {name}"),
    }
}

/// The plan as text, ending with the summary line.
pub fn text(plan: &Plan, desired: &Desired) -> String {
    let mut out = String::new();
    for e in &plan.errors {
        let _ = writeln!(out, "{} {e}", style("error:").red().bold());
    }
    if !plan.errors.is_empty() {
        out.push('\n');
    }
    if plan.actions.is_empty() {
        if plan.errors.is_empty() {
            out.push_str("No changes. The cluster matches the spec.\n");
        }
        return out;
    }
    // Group the actions by target, in the order: hosts of each group, then the group itself.
    let mut targets: Vec<Target> = Vec::new();
    for (g, members) in &desired.groups {
        for m in members {
            targets.push(Target::Host(m.clone()));
        }
        targets.push(Target::Group(*g));
    }
    for a in &plan.actions {
        if !targets.contains(&a.target) {
            targets.push(a.target.clone());
        }
    }
    for t in &targets {
        let actions: Vec<&Action> = plan.actions.iter().filter(|a| &a.target == t).collect();
        if actions.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{}", style(heading(t, desired)).bold());
        for a in actions {
            let _ = writeln!(out, "  {} {}", sigil(a.change), a.summary);
            if a.change == Change::Change {
                if let Some(d) = &a.diff {
                    out.push_str(&indent(d, 6));
                }
            }
        }
        out.push('\n');
    }
    let _ = writeln!(out, "{}", summary_line(plan));
    out
}

pub fn summary_line(plan: &Plan) -> String {
    format!(
        "Plan: {} to add, {} to change, {} to destroy.",
        plan.summary.add, plan.summary.change, plan.summary.destroy
    )
}

/// Only the differences, as unified diffs: configuration files, PostgreSQL parameters and
/// Citus metadata rows (like `kubectl diff`).
pub fn diff_only(plan: &Plan) -> String {
    let mut out = String::new();
    for a in &plan.actions {
        if let (Kind::WriteAgentConfig | Kind::PostgresConf, Some(d), Target::Host(h)) =
            (&a.kind, &a.diff, &a.target)
        {
            let _ = writeln!(out, "# {h}");
            out.push_str(&indent(d, 0));
        }
    }
    let rows: Vec<&Action> = plan
        .actions
        .iter()
        .filter(|a| {
            matches!(
                a.kind,
                Kind::Node { .. }
                    | Kind::NodePending { .. }
                    | Kind::Authinfo { .. }
                    | Kind::Poolinfo { .. }
                    | Kind::RemoveGroup { .. }
            )
        })
        .collect();
    if !rows.is_empty() {
        out.push_str("--- citus metadata (current)\n+++ citus metadata (desired)\n");
        for a in rows {
            let mark = match a.change {
                Change::Add => "+",
                Change::Change => "~",
                Change::Destroy => "-",
            };
            out.push_str(&indent(&format!("{mark} {}", a.summary), 0));
        }
    }
    out
}

/// The plan as JSON (with `format_version`).
pub fn json(plan: &Plan) -> String {
    serde_json::to_string_pretty(plan)
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the plan: {e}\"}}"))
}
