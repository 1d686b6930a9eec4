//! Drift as `watch` reports it: each plan action (and each error that stops planning) is a
//! drift item with a stable identity, and a `Tracker` turns successive plans into events —
//! an item appeared, an item went away — so a long-running watch prints each drift once.
//! Pure: plans in, events out.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{Action, Change, Plan, Target};

/// One thing that differs from the spec, or one reason it cannot be told.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftItem {
    /// What identifies the item across observations: the action without its human words
    /// (which count things done, say), or the error text.
    #[serde(skip)]
    pub key: String,
    /// `host g1m0`, `group 1`, `cluster` — empty for errors.
    pub target: String,
    /// The plan action's type (`start_agent`, `node`, …) or `error`.
    pub kind: String,
    /// `add`, `change`, `destroy`, or `error`.
    pub change: String,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

impl DriftItem {
    pub fn is_error(&self) -> bool {
        self.kind == "error"
    }
    pub fn is_destroy(&self) -> bool {
        self.change == "destroy"
    }
    /// One line for people: `~ host g1m0: restart the agent (…)`.
    pub fn line(&self) -> String {
        let sigil = match self.change.as_str() {
            "add" => "+",
            "change" => "~",
            "destroy" => "-",
            _ => "!",
        };
        match self.target.is_empty() {
            true => format!("{sigil} {}", self.summary),
            false => format!("{sigil} {}: {}", self.target, self.summary),
        }
    }
}

fn target_text(t: &Target) -> String {
    match t {
        Target::Host(h) => format!("host {h}"),
        Target::Group(g) => format!("group {g}"),
        Target::Cluster => "cluster".into(),
        Target::Etcd(name) => format!("etcd member {name}"),
    }
}

fn change_text(c: Change) -> &'static str {
    match c {
        Change::Add => "add",
        Change::Change => "change",
        Change::Destroy => "destroy",
    }
}

fn action_item(a: &Action) -> DriftItem {
    let mut v = serde_json::to_value(a).unwrap_or(serde_json::Value::Null);
    let kind = v
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("unknown")
        .to_string();
    if let Some(o) = v.as_object_mut() {
        o.remove("summary");
    }
    DriftItem {
        key: v.to_string(),
        target: target_text(&a.target),
        kind,
        change: change_text(a.change).into(),
        summary: a.summary.clone(),
        diff: a.diff.clone(),
    }
}

/// The drift items of a plan: its errors first, then its actions.
pub fn items(plan: &Plan) -> Vec<DriftItem> {
    plan.errors
        .iter()
        .map(|e| DriftItem {
            key: format!("error:{e}"),
            target: String::new(),
            kind: "error".into(),
            change: "error".into(),
            summary: e.clone(),
            diff: None,
        })
        .chain(plan.actions.iter().map(action_item))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Newly seen.
    Drift(DriftItem),
    /// Seen before, gone now.
    Resolved(DriftItem),
}

/// What is drifting now, by key.
#[derive(Debug, Default)]
pub struct Tracker {
    current: BTreeMap<String, DriftItem>,
}

impl Tracker {
    /// Take a new observation's items. An observation with errors saw only part of the
    /// cluster (a host or etcd unreachable): what it could not see is not declared resolved,
    /// only errors come and go then. Events come in a stable order: resolved, then new.
    pub fn update(&mut self, items: Vec<DriftItem>) -> Vec<Event> {
        let complete = !items.iter().any(DriftItem::is_error);
        let next: BTreeSet<&str> = items.iter().map(|i| i.key.as_str()).collect();
        let mut events = Vec::new();
        let gone: Vec<String> = self
            .current
            .keys()
            .filter(|k| !next.contains(k.as_str()))
            .filter(|k| complete || self.current[*k].is_error())
            .cloned()
            .collect();
        for k in gone {
            if let Some(item) = self.current.remove(&k) {
                events.push(Event::Resolved(item));
            }
        }
        // New items in the plan's order (phase by phase), which is how people read it.
        for item in items {
            if !self.current.contains_key(&item.key) {
                events.push(Event::Drift(item.clone()));
            }
            // The latest words for an item already known (counts move), without an event.
            self.current.insert(item.key.clone(), item);
        }
        events
    }

    pub fn items(&self) -> impl Iterator<Item = &DriftItem> {
        self.current.values()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Items by kind, for metrics.
    pub fn counts_by_kind(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for i in self.current.values() {
            *out.entry(i.kind.clone()).or_insert(0) += 1;
        }
        out
    }
}

/// The part of a plan `watch --repair` may apply: everything but removals.
pub fn without_destroys(plan: &Plan) -> Plan {
    let mut p = plan.clone();
    p.actions.retain(|a| a.change != Change::Destroy);
    p.summary.destroy = 0;
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{FORMAT_VERSION, Kind, Phase, Summary};

    fn action(host: &str, kind: Kind, change: Change, summary: &str) -> Action {
        Action {
            phase: Phase::Start,
            target: Target::Host(host.into()),
            change,
            kind,
            summary: summary.into(),
            diff: None,
        }
    }

    fn plan(actions: Vec<Action>, errors: &[&str]) -> Plan {
        Plan {
            format_version: FORMAT_VERSION,
            cluster: "c".into(),
            actions,
            errors: errors.iter().map(|e| e.to_string()).collect(),
            summary: Summary::default(),
        }
    }

    fn start(host: &str) -> Action {
        action(host, Kind::StartAgent, Change::Add, "start the agent")
    }

    fn names(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Drift(i) => format!("drift {}", i.line()),
                Event::Resolved(i) => format!("resolved {}", i.line()),
            })
            .collect()
    }

    #[test]
    fn each_drift_is_reported_once_as_it_comes_and_goes() {
        let mut t = Tracker::default();
        let cases: Vec<(Plan, Vec<&str>)> = vec![
            (plan(vec![], &[]), vec![]),
            (
                plan(vec![start("a")], &[]),
                vec!["drift + host a: start the agent"],
            ),
            // The same drift again: nothing.
            (plan(vec![start("a")], &[]), vec![]),
            // Its words change (a count moved): still the same item.
            (
                plan(
                    vec![action("a", Kind::StartAgent, Change::Add, "start it now")],
                    &[],
                ),
                vec![],
            ),
            (
                plan(vec![start("b")], &[]),
                vec![
                    "resolved + host a: start it now",
                    "drift + host b: start the agent",
                ],
            ),
            // Host b unreachable now: its drift is not declared resolved, the error is new.
            (
                plan(vec![], &["b: ssh: timed out"]),
                vec!["drift ! b: ssh: timed out"],
            ),
            // Reachable again, and repaired meanwhile.
            (
                plan(vec![], &[]),
                vec![
                    "resolved ! b: ssh: timed out",
                    "resolved + host b: start the agent",
                ],
            ),
        ];
        for (i, (p, want)) in cases.into_iter().enumerate() {
            assert_eq!(names(&t.update(items(&p))), want, "step {i}");
        }
        assert!(t.is_empty());
    }

    #[test]
    fn a_changed_value_is_a_new_item() {
        let mut t = Tracker::default();
        let restart = |reason: &str| {
            action(
                "a",
                Kind::RestartAgent {
                    reason: reason.into(),
                    lowered: vec![],
                },
                Change::Change,
                "restart",
            )
        };
        t.update(items(&plan(vec![restart("x")], &[])));
        let e = t.update(items(&plan(vec![restart("y")], &[])));
        assert_eq!(
            names(&e),
            vec!["resolved ~ host a: restart", "drift ~ host a: restart"]
        );
        assert_eq!(t.counts_by_kind().get("restart_agent"), Some(&1));
    }

    #[test]
    fn repair_leaves_removals_out() {
        let mut p = plan(
            vec![
                start("a"),
                action("b", Kind::StartAgent, Change::Destroy, "x"),
            ],
            &[],
        );
        p.summary = Summary {
            add: 1,
            change: 0,
            destroy: 1,
        };
        let r = without_destroys(&p);
        assert_eq!(r.actions.len(), 1);
        assert!(!r.has_destroys());
    }
}
