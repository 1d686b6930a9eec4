//! Synchronous replication, as a pure planner: given the `sync` key, the current
//! `synchronous_standby_names` and what `pg_stat_replication` shows, the next single step.
//!
//! Invariant: the `sync` key never names a standby that might lack an acknowledged commit.
//! - To change standby, the key is cleared first (nobody may promote while it is empty), then
//!   `synchronous_standby_names` names the new standby, and only once that standby is `sync`
//!   and has flushed past the WAL position at which it was named does the key name it.
//! - With no candidate: `on` lets commits go asynchronous (the key stays empty, so no automatic
//!   failover can lose them); `strict` makes commits wait for any standby (`*`).

use super::config::SyncModeConfig;

/// One standby as the primary's `pg_stat_replication` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standby {
    /// application_name, which is the member name.
    pub name: String,
    /// `streaming`, `catchup`, …
    pub state: String,
    /// `sync`, `async`, `potential`, `quorum`.
    pub sync_state: String,
    pub flush_lsn: u64,
    /// May be chosen (a member of the group, not tagged nofailover).
    pub eligible: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncInput {
    pub mode: SyncModeConfig,
    pub me: String,
    /// The `sync` key: (leader, standby), if present.
    pub key: Option<(Option<String>, Option<String>)>,
    /// The `synchronous_standby_names` in force.
    pub ssn: String,
    /// WAL position right after `ssn` last changed (commits before it may be async).
    pub ssn_since_lsn: Option<u64>,
    pub standbys: Vec<Standby>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncStep {
    Nothing,
    /// Write the `sync` key as (me, standby).
    SetKey(Option<String>),
    /// Set `synchronous_standby_names`.
    SetStandbyNames(String),
}

/// `synchronous_standby_names` for one member.
pub fn names_for(member: &str) -> String {
    format!("\"{}\"", member.replace('"', ""))
}

/// What the primary runs with before a standby is known.
pub fn names_without_standby(mode: SyncModeConfig) -> String {
    match mode {
        SyncModeConfig::Strict => "*".into(),
        _ => String::new(),
    }
}

pub fn next_step(i: &SyncInput) -> SyncStep {
    if i.mode == SyncModeConfig::Off {
        return SyncStep::Nothing;
    }
    let (key_leader, key_standby) = i.key.clone().unwrap_or((None, None));
    if key_leader.as_deref() != Some(i.me.as_str()) {
        // Just promoted (or no key yet): take the key over before anything else.
        return SyncStep::SetKey(None);
    }
    let streaming: Vec<&Standby> = {
        let mut v: Vec<&Standby> = i
            .standbys
            .iter()
            .filter(|s| s.eligible && s.state == "streaming")
            .collect();
        v.sort_by(|a, b| b.flush_lsn.cmp(&a.flush_lsn).then(a.name.cmp(&b.name)));
        v
    };
    // Keep the current standby while it streams; otherwise the best one.
    let desired = match &key_standby {
        Some(cur) if streaming.iter().any(|s| &s.name == cur) => Some(cur.clone()),
        _ => streaming.first().map(|s| s.name.clone()),
    };
    if let Some(cur) = &key_standby {
        if desired.as_deref() == Some(cur.as_str()) {
            let want = names_for(cur);
            return if i.ssn == want {
                SyncStep::Nothing
            } else {
                SyncStep::SetStandbyNames(want)
            };
        }
        // Changing standby: first make sure nobody but this leader may promote.
        return SyncStep::SetKey(None);
    }
    match desired {
        Some(x) => {
            let want = names_for(&x);
            if i.ssn != want {
                return SyncStep::SetStandbyNames(want);
            }
            let s = streaming.iter().find(|s| s.name == x);
            let caught_up = s.is_some_and(|s| {
                s.sync_state == "sync" && i.ssn_since_lsn.is_some_and(|l| s.flush_lsn >= l)
            });
            if caught_up {
                SyncStep::SetKey(Some(x))
            } else {
                SyncStep::Nothing
            }
        }
        None => {
            let want = names_without_standby(i.mode);
            if i.ssn != want {
                SyncStep::SetStandbyNames(want)
            } else {
                SyncStep::Nothing
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SyncStep::*;

    fn sb(name: &str, state: &str, sync_state: &str, flush: u64) -> Standby {
        Standby {
            name: name.into(),
            state: state.into(),
            sync_state: sync_state.into(),
            flush_lsn: flush,
            eligible: true,
        }
    }

    fn input(
        key: Option<(&str, Option<&str>)>,
        ssn: &str,
        since: Option<u64>,
        standbys: Vec<Standby>,
    ) -> SyncInput {
        SyncInput {
            mode: SyncModeConfig::On,
            me: "m1".into(),
            key: key.map(|(l, s)| (Some(l.to_string()), s.map(str::to_string))),
            ssn: ssn.into(),
            ssn_since_lsn: since,
            standbys,
        }
    }

    #[test]
    fn steps() {
        let cases: Vec<(&str, SyncInput, SyncStep)> = vec![
            (
                "no key yet: take it",
                input(None, "", None, vec![]),
                SetKey(None),
            ),
            (
                "old leader's key after promotion: take it",
                input(Some(("m0", Some("m1"))), "", None, vec![]),
                SetKey(None),
            ),
            (
                "a standby streams: name it in ssn first",
                input(
                    Some(("m1", None)),
                    "",
                    None,
                    vec![sb("m2", "streaming", "async", 10)],
                ),
                SetStandbyNames("\"m2\"".into()),
            ),
            (
                "named but not yet sync: wait",
                input(
                    Some(("m1", None)),
                    "\"m2\"",
                    Some(50),
                    vec![sb("m2", "streaming", "async", 60)],
                ),
                Nothing,
            ),
            (
                "sync but not past the switch point: wait",
                input(
                    Some(("m1", None)),
                    "\"m2\"",
                    Some(50),
                    vec![sb("m2", "streaming", "sync", 40)],
                ),
                Nothing,
            ),
            (
                "sync and caught up: record it",
                input(
                    Some(("m1", None)),
                    "\"m2\"",
                    Some(50),
                    vec![sb("m2", "streaming", "sync", 50)],
                ),
                SetKey(Some("m2".into())),
            ),
            (
                "steady",
                input(
                    Some(("m1", Some("m2"))),
                    "\"m2\"",
                    Some(50),
                    vec![sb("m2", "streaming", "sync", 90)],
                ),
                Nothing,
            ),
            (
                "recorded standby gone: clear the key first",
                input(
                    Some(("m1", Some("m2"))),
                    "\"m2\"",
                    Some(50),
                    vec![sb("m3", "streaming", "async", 90)],
                ),
                SetKey(None),
            ),
            (
                "then switch ssn to the new one",
                input(
                    Some(("m1", None)),
                    "\"m2\"",
                    Some(50),
                    vec![sb("m3", "streaming", "async", 90)],
                ),
                SetStandbyNames("\"m3\"".into()),
            ),
            (
                "no candidate in on mode: async",
                input(Some(("m1", None)), "\"m2\"", Some(50), vec![]),
                SetStandbyNames(String::new()),
            ),
            (
                "best candidate: most WAL, then name",
                input(
                    Some(("m1", None)),
                    "",
                    None,
                    vec![
                        sb("m3", "streaming", "async", 5),
                        sb("m2", "streaming", "async", 9),
                    ],
                ),
                SetStandbyNames("\"m2\"".into()),
            ),
            (
                "catching-up standbys are not candidates",
                input(
                    Some(("m1", None)),
                    "",
                    None,
                    vec![sb("m2", "catchup", "async", 9)],
                ),
                Nothing,
            ),
        ];
        for (name, i, want) in cases {
            assert_eq!(next_step(&i), want, "{name}");
        }
        let mut strict = input(Some(("m1", None)), "\"m2\"", Some(50), vec![]);
        strict.mode = SyncModeConfig::Strict;
        assert_eq!(
            next_step(&strict),
            SetStandbyNames("*".into()),
            "strict: commits wait for any standby"
        );
        let mut ineligible = input(
            Some(("m1", None)),
            "",
            None,
            vec![sb("m2", "streaming", "async", 9)],
        );
        ineligible.standbys[0].eligible = false;
        assert_eq!(
            next_step(&ineligible),
            Nothing,
            "nofailover members are never the sync standby"
        );
        let mut off = input(None, "", None, vec![]);
        off.mode = SyncModeConfig::Off;
        assert_eq!(next_step(&off), Nothing);
    }
}
