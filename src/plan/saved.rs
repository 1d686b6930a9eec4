//! Saved plans: `plan --out FILE` writes what was reviewed, `apply FILE` applies exactly that or
//! refuses. A saved plan is stale when the spec file changed, when a secret it reads changed,
//! or when planning again gives other actions. What is compared is what `apply` does — phase,
//! target, kind and its values — never the human summary (which counts moves done, say) or the
//! agents' own convergence work (a replica catching up is not a change of plan). The file holds
//! no secret: plan values are redacted, and the secrets are represented by a SCRAM verifier
//! (salted, iterated) of their digests, which can only confirm a guess.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Phase, Plan};
use crate::postgres::scram;

pub const FORMAT: &str = "citus-reconcile-plan";
pub const FORMAT_VERSION: u32 = 1;
const SECRET_ITERATIONS: u32 = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedPlan {
    pub format: String,
    pub format_version: u32,
    pub cluster: String,
    /// The spec file as named on the command line (relative paths resolve from where `apply`
    /// runs: a CI pipeline plans and applies from the repository's root).
    pub spec: String,
    pub spec_sha256: String,
    /// SCRAM verifier of the secrets' digests.
    pub secrets: String,
    /// The actions as compared (see the module comment).
    pub compared: Vec<serde_json::Value>,
    /// The whole plan, as `plan --json` prints it, for people and CI artifacts.
    pub plan: serde_json::Value,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One string standing for every secret the plan depends on: each host's secret digests, in
/// a stable order.
pub fn secrets_material(digests: &[(String, String)]) -> String {
    let mut parts: Vec<String> = digests.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.sort();
    parts.dedup();
    sha256_hex(parts.join("\n").as_bytes())
}

/// What `apply` does, action by action, without the words around it.
pub fn compared(plan: &Plan) -> Vec<serde_json::Value> {
    plan.actions
        .iter()
        .filter(|a| a.phase != Phase::Converge)
        .map(|a| {
            let mut v = serde_json::to_value(a).unwrap_or(serde_json::Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.remove("summary");
                o.remove("diff");
            }
            v
        })
        .collect()
}

impl SavedPlan {
    pub fn new(
        plan: &Plan,
        spec: &str,
        spec_bytes: &[u8],
        secrets_material: &str,
        salt: &[u8],
    ) -> SavedPlan {
        SavedPlan {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            cluster: plan.cluster.clone(),
            spec: spec.into(),
            spec_sha256: sha256_hex(spec_bytes),
            secrets: scram::verifier(secrets_material, salt, SECRET_ITERATIONS).unwrap_or_default(),
            compared: compared(plan),
            plan: serde_json::to_value(plan).unwrap_or(serde_json::Value::Null),
        }
    }

    /// Parse a file that may be a saved plan: None when it is not one (a spec, say).
    pub fn parse(text: &str) -> Option<Result<SavedPlan, String>> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return None;
        }
        Some(match v.get("format_version").and_then(|f| f.as_u64()) {
            Some(n) if n == u64::from(FORMAT_VERSION) => {
                serde_json::from_value(v).map_err(|e| format!("unreadable saved plan: {e}"))
            }
            other => Err(format!(
                "saved plan format version {other:?}; this citus-reconcile reads version {FORMAT_VERSION}: plan again"
            )),
        })
    }

    /// Why this saved plan may no longer be applied (empty: it may).
    pub fn stale(&self, spec_bytes: &[u8], secrets_material: &str, now: &Plan) -> Vec<String> {
        let mut why = Vec::new();
        if sha256_hex(spec_bytes) != self.spec_sha256 {
            why.push(format!(
                "the spec {} changed since the plan was made",
                self.spec
            ));
        }
        if !scram::verifier_matches(&self.secrets, secrets_material) {
            why.push("a secret the spec reads changed since the plan was made".into());
        }
        if now.cluster != self.cluster {
            why.push(format!(
                "the plan is for cluster {}, the spec names {}",
                self.cluster, now.cluster
            ));
        }
        let fresh = compared(now);
        if fresh != self.compared {
            let describe = |v: &serde_json::Value| -> String {
                // The fresh plan's summary for this action, when it has one.
                let summary = now
                    .actions
                    .iter()
                    .zip(compared(now))
                    .find(|(_, c)| c == v)
                    .map(|(a, _)| a.summary.clone());
                summary.unwrap_or_else(|| v.to_string())
            };
            let saved_summaries = |v: &serde_json::Value| -> String {
                let actions = self.plan.get("actions").and_then(|a| a.as_array());
                actions
                    .and_then(|list| {
                        list.iter().find(|a| {
                            let mut a = (*a).clone();
                            if let Some(o) = a.as_object_mut() {
                                o.remove("summary");
                                o.remove("diff");
                            }
                            a == *v
                        })
                    })
                    .and_then(|a| a.get("summary").and_then(|s| s.as_str()).map(String::from))
                    .unwrap_or_else(|| v.to_string())
            };
            for gone in self.compared.iter().filter(|c| !fresh.contains(c)) {
                why.push(format!("no longer planned: {}", saved_summaries(gone)));
            }
            for new in fresh.iter().filter(|c| !self.compared.contains(c)) {
                why.push(format!("now also planned: {}", describe(new)));
            }
            if why.is_empty() {
                why.push("the same actions are planned in another order".into());
            }
        }
        if !now.errors.is_empty() {
            why.push(format!("planning now fails: {}", now.errors.join("; ")));
        }
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Action, Change, Kind, Summary, Target};

    fn action(phase: Phase, host: &str, kind: Kind, summary: &str) -> Action {
        Action {
            phase,
            target: Target::Host(host.into()),
            change: Change::Change,
            kind,
            summary: summary.into(),
            diff: None,
        }
    }

    fn plan(actions: Vec<Action>) -> Plan {
        Plan {
            format_version: 1,
            cluster: "c".into(),
            actions,
            errors: vec![],
            summary: Summary::default(),
        }
    }

    fn restart(host: &str) -> Action {
        action(
            Phase::Start,
            host,
            Kind::RestartAgent {
                reason: "new configuration".into(),
                lowered: vec![],
            },
            &format!("restart the agent on {host}"),
        )
    }

    const SPEC: &[u8] = b"cluster: c\n";

    #[test]
    fn stale_or_not() {
        let reviewed = plan(vec![restart("a"), restart("b")]);
        let saved = SavedPlan::new(
            &reviewed,
            "spec.yaml",
            SPEC,
            "material-one",
            b"0123456789abcdef",
        );
        // Round trip through the file; no secret material in it.
        let text = serde_json::to_string(&saved).unwrap_or_default();
        assert!(!text.contains("material-one"));
        let saved = match SavedPlan::parse(&text) {
            Some(Ok(s)) => s,
            other => panic!("{other:?}"),
        };
        assert!(SavedPlan::parse("cluster: c\n").is_none());
        assert!(
            SavedPlan::parse(r#"{"format":"citus-reconcile-plan","format_version":9}"#)
                .is_some_and(|r| r.is_err())
        );

        let mut moved_on = reviewed.clone();
        moved_on.actions[0].summary = "restart the agent on a (reworded)".into();
        moved_on.actions.push(action(
            Phase::Converge,
            "a",
            Kind::BringUpMember,
            "replica: not streaming yet",
        ));
        let fewer = plan(vec![restart("a")]);
        let more = plan(vec![restart("a"), restart("b"), restart("c")]);
        // (case, spec bytes, secret material, plan now, why stale)
        type Case<'a> = (&'a str, &'a [u8], &'a str, &'a Plan, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            ("the same", SPEC, "material-one", &reviewed, vec![]),
            (
                "words and agent work differ only",
                SPEC,
                "material-one",
                &moved_on,
                vec![],
            ),
            (
                "spec edited",
                b"cluster: c # edited\n",
                "material-one",
                &reviewed,
                vec!["the spec spec.yaml changed since the plan was made"],
            ),
            (
                "secret changed",
                SPEC,
                "material-two",
                &reviewed,
                vec!["a secret the spec reads changed since the plan was made"],
            ),
            (
                "an action went",
                SPEC,
                "material-one",
                &fewer,
                vec!["no longer planned: restart the agent on b"],
            ),
            (
                "an action came",
                SPEC,
                "material-one",
                &more,
                vec!["now also planned: restart the agent on c"],
            ),
        ];
        for (name, spec, secrets, now, want) in cases {
            assert_eq!(saved.stale(spec, secrets, now), want, "{name}");
        }
    }
}
