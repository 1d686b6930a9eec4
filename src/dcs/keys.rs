//! The etcd key layout (Patroni's, so Patroni tooling and operators can read it) and the values
//! stored there. Pure: parsing and formatting only.
//!
//! `{namespace}/{cluster}/{group}/` holds `leader` (member name, on the leader's lease),
//! `members/{name}` (JSON, on the member's lease), `initialize` (system identifier),
//! `config`, `sync`, `failover`, `status` and `history` — and two keys of ours: `citus_pause`
//! (the handshake between a worker group's leader and the coordinator around a switchover)
//! and `max_timeline` (timeline numbers reserved for promotions, so that no two promotions
//! ever pick the same one).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Key names of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterKeys {
    /// `{namespace}/{cluster}/`
    pub prefix: String,
    namespace: String,
    cluster: String,
}

impl ClusterKeys {
    pub fn new(namespace: &str, cluster: &str) -> Self {
        let ns = namespace.trim_end_matches('/');
        Self {
            prefix: format!("{ns}/{cluster}/"),
            namespace: ns.to_string(),
            cluster: cluster.to_string(),
        }
    }
    pub fn group(&self, group: u32) -> String {
        format!("{}{group}/", self.prefix)
    }
    pub fn leader(&self, group: u32) -> String {
        format!("{}leader", self.group(group))
    }
    pub fn member(&self, group: u32, name: &str) -> String {
        format!("{}members/{name}", self.group(group))
    }
    pub fn members(&self, group: u32) -> String {
        format!("{}members/", self.group(group))
    }
    pub fn initialize(&self, group: u32) -> String {
        format!("{}initialize", self.group(group))
    }
    pub fn sync(&self, group: u32) -> String {
        format!("{}sync", self.group(group))
    }
    pub fn failover(&self, group: u32) -> String {
        format!("{}failover", self.group(group))
    }
    pub fn history(&self, group: u32) -> String {
        format!("{}history", self.group(group))
    }
    pub fn status(&self, group: u32) -> String {
        format!("{}status", self.group(group))
    }
    pub fn citus_pause(&self, group: u32) -> String {
        format!("{}citus_pause", self.group(group))
    }
    /// Ours: the highest timeline number any member of the group has reserved for a
    /// promotion (see `postgres::timeline`).
    pub fn max_timeline(&self, group: u32) -> String {
        format!("{}max_timeline", self.group(group))
    }
    /// Outside the cluster's own tree, so Patroni tools that list groups never see it.
    pub fn apply_lock(&self) -> String {
        format!(
            "{}/.citus-reconcile/{}/apply-lock",
            self.namespace, self.cluster
        )
    }
}

/// What a member publishes about itself (Patroni's field names, plus a few of ours).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    #[serde(default)]
    pub conn_url: String,
    #[serde(default)]
    pub api_url: String,
    /// `running`, `streaming`, `starting`, `stopped`, `crashed`, `initializing`, `cloning`…
    #[serde(default)]
    pub state: String,
    /// `primary`, `replica` or `uninitialized`.
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub timeline: u32,
    /// WAL position: the current position on a primary, the replayed one on a replica.
    #[serde(default)]
    pub xlog_location: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lsn: Option<u64>,
    #[serde(default)]
    pub tags: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Host and port, for Citus and for cloning.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub port: u16,
    /// Name of the member this replica streams from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub upstream: String,
    /// SHA-256 of the agent configuration file the agent runs with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_sha256: String,
    /// Parameters PostgreSQL takes only at its next restart (`pg_settings.pending_restart`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
    /// The port of the PgBouncer in front of this member (`citus.pooler`), while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooler_port: Option<u16>,
}

fn is_zero(p: &u16) -> bool {
    *p == 0
}

/// A member's role as its key says (Patroni's words), read as a value; anything else a key
/// may hold (etcd content is untrusted) is `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberRole {
    Primary,
    Replica,
    Uninitialized,
    Unknown,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Primary => "primary",
            MemberRole::Replica => "replica",
            MemberRole::Uninitialized => "uninitialized",
            MemberRole::Unknown => "unknown",
        }
    }

    fn parse(s: &str) -> MemberRole {
        match s {
            "primary" => MemberRole::Primary,
            "replica" => MemberRole::Replica,
            "uninitialized" => MemberRole::Uninitialized,
            _ => MemberRole::Unknown,
        }
    }
}

/// A member's server state as its key says; what it is busy with (`creating replica`, …) and
/// anything unknown is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Running,
    Streaming,
    Starting,
    Stopped,
    Other,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Running => "running",
            MemberState::Streaming => "streaming",
            MemberState::Starting => "starting",
            MemberState::Stopped => "stopped",
            MemberState::Other => "other",
        }
    }

    fn parse(s: &str) -> MemberState {
        match s {
            "running" => MemberState::Running,
            "streaming" => MemberState::Streaming,
            "starting" => MemberState::Starting,
            "stopped" => MemberState::Stopped,
            _ => MemberState::Other,
        }
    }
}

impl MemberInfo {
    pub fn role(&self) -> MemberRole {
        MemberRole::parse(&self.role)
    }

    pub fn state(&self) -> MemberState {
        MemberState::parse(&self.state)
    }

    /// A primary whose server runs: one to route writes to, clone from or hand over from.
    pub fn is_running_primary(&self) -> bool {
        self.role() == MemberRole::Primary && self.state() == MemberState::Running
    }

    /// A standby that streams from its upstream: one to promote, read from or hand over to.
    pub fn is_streaming_replica(&self) -> bool {
        self.role() == MemberRole::Replica && self.state() == MemberState::Streaming
    }

    pub fn nofailover(&self) -> bool {
        self.tags
            .get("nofailover")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }
}

/// The `sync` key: who leads and which standby is synchronous.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    #[serde(default)]
    pub leader: Option<String>,
    #[serde(default)]
    pub sync_standby: Option<String>,
}

/// The `failover` key: a requested switchover (with `leader`) or failover.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<String>,
}

impl FailoverRequest {
    /// `scheduled_at` as seconds since the Unix epoch, when present and well-formed.
    pub fn scheduled_unix(&self) -> Option<i64> {
        self.scheduled_at.as_deref().and_then(parse_rfc3339)
    }
}

/// The `citus_pause` key: a worker group's leader asks the coordinator to hold the group's
/// writes before it stops for a switchover; the coordinator answers in the same key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CitusPause {
    /// The leader that is about to stop.
    pub leader: String,
    /// The member expected to take over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    pub state: PauseState,
    /// The coordinator member that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Why a pause was refused, for the leader's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseState {
    /// Written by the leader.
    Requested,
    /// Written by the coordinator once the group's writes wait.
    Paused,
    /// Written by the coordinator when it cannot pause (the leader goes ahead without).
    Refused,
}

/// Parse an RFC 3339 timestamp (`2026-11-25T20:00:00Z`, `…+02:00`, fractions ignored) into
/// seconds since the Unix epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = s.split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let (y, mo, da): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    // RFC 3339 years have four digits; beyond, the arithmetic below could overflow.
    if d.next().is_some()
        || !(0..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
    {
        return None;
    }
    let (clock, offset) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, o) = time.split_at(i);
        let sign = if o.starts_with('-') { -1 } else { 1 };
        let (oh, om) = o[1..].split_once(':')?;
        (
            c,
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
        )
    };
    let clock = clock.split('.').next()?;
    let mut c = clock.split(':');
    let (h, mi, se): (i64, i64, i64) = (
        c.next()?.parse().ok()?,
        c.next()?.parse().ok()?,
        c.next()?.parse().ok()?,
    );
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se - offset)
}

/// Seconds since the Unix epoch as RFC 3339 in UTC (`2026-11-27T01:00:00Z`).
pub fn format_rfc3339(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // The civil date from days (the inverse of the algorithm in `parse_rfc3339`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Who holds the apply lock: written by `apply` into the lock key, shown to whoever waits,
/// and named by `force-unlock ID`. Read back from etcd as untrusted text (only shown).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyLockHolder {
    /// The etcd lease of the lock, in hex: what `force-unlock` takes.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub since_unix: i64,
    /// The CI job, when `apply` runs in one (GitHub Actions, GitLab CI, or `CI_JOB_URL`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ci_job: String,
}

impl ApplyLockHolder {
    /// The holder for this process, from the usual environment variables.
    pub fn new(
        env: impl Fn(&str) -> Option<String>,
        host: &str,
        pid: u32,
        since_unix: i64,
        lease: i64,
    ) -> ApplyLockHolder {
        let get = |k: &str| env(k).filter(|v| !v.is_empty());
        let user = get("GITLAB_USER_LOGIN")
            .or_else(|| get("GITHUB_ACTOR"))
            .or_else(|| get("USER"))
            .or_else(|| get("LOGNAME"))
            .unwrap_or_else(|| "unknown".into());
        let ci_job = if let Some(url) = get("CI_JOB_URL") {
            url
        } else if let (Some(server), Some(repo), Some(run)) = (
            get("GITHUB_SERVER_URL"),
            get("GITHUB_REPOSITORY"),
            get("GITHUB_RUN_ID"),
        ) {
            format!("{server}/{repo}/actions/runs/{run}")
        } else {
            String::new()
        };
        ApplyLockHolder {
            id: format!("{lease:x}"),
            user,
            host: host.trim().to_string(),
            pid,
            since_unix,
            ci_job,
        }
    }

    /// One line for people: who, where, since when, and the id to force-unlock.
    pub fn describe(&self) -> String {
        let clean =
            |s: &str| -> String { s.chars().filter(|c| !c.is_control()).take(200).collect() };
        let job = if self.ci_job.is_empty() {
            String::new()
        } else {
            format!(", CI job {}", clean(&self.ci_job))
        };
        format!(
            "{}@{} (pid {}{job}) since {}, lock id {}",
            clean(&self.user),
            clean(&self.host),
            self.pid,
            format_rfc3339(self.since_unix),
            clean(&self.id)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub name: String,
    pub mod_revision: i64,
    pub lease: i64,
}

/// Everything etcd holds about one group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupState {
    pub leader: Option<LeaderKey>,
    pub members: BTreeMap<String, MemberInfo>,
    /// Present once bootstrap started; the system identifier once it finished.
    pub initialize: Option<String>,
    /// The lease a bootstrap's claim (`initialize` still empty) lives on.
    pub initialize_lease: Option<i64>,
    pub sync: Option<SyncState>,
    pub failover: Option<FailoverRequest>,
    /// The `failover` key's bytes as read: clearing a request deletes only that request,
    /// never one an operator wrote since.
    pub failover_raw: Option<Vec<u8>>,
    pub config: Option<serde_json::Value>,
    /// The last WAL position the leader published (`status` key); it outlives the leader.
    pub optime: Option<u64>,
    /// From the `status` key: see `Status::oldest_wal`.
    pub oldest_wal: Option<u64>,
    /// From the `status` key: see `Status::handed_to`.
    pub handed_to: Option<String>,
    pub citus_pause: Option<CitusPause>,
    /// The `max_timeline` key, as read: its bytes (for a compare-and-set) and its number.
    pub max_timeline: Option<(Vec<u8>, Option<u32>)>,
}

/// What `GroupState::sanitize` found wrong in a group's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Untrusted {
    /// One line per problem, for the log.
    pub problems: Vec<String>,
    /// A leader key no agent could have written (no lease, or a name that is not a member
    /// name): nobody could ever take the key while it stays, so it is removed (by value).
    pub bogus_leader: Option<String>,
}

/// Failover schedules further ahead than this are refused (a typo, or a key written to
/// keep a group's switchover pending forever).
pub const MAX_SCHEDULE_AHEAD_S: i64 = 30 * 86_400;

impl GroupState {
    /// etcd content is input like any other: whoever reaches etcd can write it. Drop what no
    /// agent writes — member keys with a name that is not a member name, or a host that is
    /// not an address (it would become a clone source and a pg_dist_node row); a leader key
    /// without a lease or with such a name — and say what was dropped.
    pub fn sanitize(&mut self) -> Untrusted {
        use crate::spec::rules::{is_address, is_dns_label};
        let mut out = Untrusted::default();
        self.members.retain(|name, m| {
            let ok_name = is_dns_label(name);
            let ok_host = m.host.is_empty() || is_address(&m.host);
            if !ok_name || !ok_host {
                out.problems.push(format!(
                    "ignored the member key {:?}: {}",
                    name.escape_debug().to_string(),
                    if ok_name {
                        format!(
                            "its host {:?} is not an address",
                            m.host.escape_debug().to_string()
                        )
                    } else {
                        "not a member name".to_string()
                    }
                ));
            }
            ok_name && ok_host
        });
        if let Some(l) = &self.leader {
            let why = match (l.lease, is_dns_label(&l.name)) {
                (0, _) => Some("it has no lease (an agent always writes it on one)"),
                (_, false) => Some("it does not name a member"),
                _ => None,
            };
            if let Some(why) = why {
                out.problems.push(format!(
                    "removing the leader key {:?}: {why}; nobody could take the key while it stays",
                    l.name.escape_debug().to_string()
                ));
                out.bogus_leader = Some(l.name.clone());
                self.leader = None;
            }
        }
        out
    }

    /// Why promoting `candidate` by hand must not go ahead without the operator accepting
    /// the risk, if it must not: in synchronous mode only the synchronous standby is sure to
    /// hold every commit acknowledged to clients; a member tagged `nofailover` never
    /// promotes (the request would only hang).
    pub fn manual_failover_refusal(&self, candidate: &str) -> Option<String> {
        let m = self.members.get(candidate)?;
        if m.nofailover() {
            return Some(format!(
                "{candidate} is tagged nofailover: it never promotes"
            ));
        }
        // Who holds every acknowledged commit: the synchronous standby, and the leader that
        // wrote the key. With no standby named, only that leader (it acknowledged commits
        // alone; the simulation's seed 32 lost them by promoting another member).
        let k = self.sync.as_ref()?;
        let holds = |name: Option<&str>| name == Some(candidate);
        if holds(k.sync_standby.as_deref()) || holds(k.leader.as_deref()) {
            return None;
        }
        Some(match (k.sync_standby.as_deref(), k.leader.as_deref()) {
            (Some(sync), _) => format!(
                "synchronous mode is on and {sync} is the synchronous standby: only it is sure to hold every commit acknowledged to clients; promoting {candidate} can lose some"
            ),
            (None, leader) => format!(
                "synchronous mode is on and no standby is synchronous: only the last leader ({}) is sure to hold every commit acknowledged to clients; promoting {candidate} can lose some",
                leader.unwrap_or("unknown")
            ),
        })
    }

    /// Who should take over from `leader` in a planned switchover: a streaming replica not
    /// tagged `nofailover`, the furthest ahead (ties: by name); in synchronous mode only the
    /// synchronous standby, since any other could miss acknowledged commits.
    pub fn switchover_candidate(&self, leader: &str) -> Result<String, String> {
        let eligible = |name: &str, m: &MemberInfo| {
            name != leader && m.is_streaming_replica() && !m.nofailover()
        };
        if let Some(sync) = self.sync.as_ref().and_then(|s| s.sync_standby.as_deref()) {
            return match self.members.get(sync) {
                Some(m) if eligible(sync, m) => Ok(sync.to_string()),
                _ => Err(format!(
                    "synchronous mode: only the synchronous standby ({sync}) can take over without losing commits, and it is not a healthy streaming replica"
                )),
            };
        }
        self.members
            .iter()
            .filter(|(n, m)| eligible(n, m))
            .max_by_key(|(n, m)| (m.xlog_location, std::cmp::Reverse(n.as_str())))
            .map(|(n, _)| n.clone())
            .ok_or_else(|| "no healthy streaming replica to hand over to".to_string())
    }
}

/// The `status` key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub optime: u64,
    /// Where the oldest WAL segment the leader still has begins: a standby further behind,
    /// and not streaming, can never catch up and must be cloned again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_wal: Option<u64>,
    /// Written by a leader that stopped cleanly for a switchover: the candidate it handed
    /// over to, whose `optime` above is then the last WAL the old leader wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_to: Option<String>,
}

/// One key-value pair as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawKv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// Sort a cluster's keys into groups. Unparseable values are skipped: one member with a
/// corrupt key must not blind everyone else.
pub fn parse_cluster(keys: &ClusterKeys, kvs: &[RawKv]) -> BTreeMap<u32, GroupState> {
    let mut groups: BTreeMap<u32, GroupState> = BTreeMap::new();
    for kv in kvs {
        let Some(rest) = kv.key.strip_prefix(&keys.prefix) else {
            continue;
        };
        let Some((group, name)) = rest.split_once('/') else {
            continue;
        };
        let Ok(group) = group.parse::<u32>() else {
            continue;
        };
        let g = groups.entry(group).or_default();
        let text = String::from_utf8_lossy(&kv.value).into_owned();
        match name {
            "leader" => {
                g.leader = Some(LeaderKey {
                    name: text,
                    mod_revision: kv.mod_revision,
                    lease: kv.lease,
                });
            }
            "initialize" => {
                g.initialize = Some(text);
                g.initialize_lease = Some(kv.lease).filter(|l| *l != 0);
            }
            "sync" => g.sync = serde_json::from_str(&text).ok(),
            "failover" => {
                g.failover = serde_json::from_str(&text).ok();
                g.failover_raw = Some(kv.value.clone());
            }
            "config" => g.config = serde_json::from_str(&text).ok(),
            "status" => {
                if let Ok(s) = serde_json::from_str::<Status>(&text) {
                    g.optime = Some(s.optime);
                    g.oldest_wal = s.oldest_wal;
                    g.handed_to = s.handed_to;
                }
            }
            "citus_pause" => g.citus_pause = serde_json::from_str(&text).ok(),
            "max_timeline" => {
                g.max_timeline = Some((kv.value.clone(), text.trim().parse::<u32>().ok()));
            }
            other => {
                if let Some(member) = other.strip_prefix("members/") {
                    if let Ok(info) = serde_json::from_str::<MemberInfo>(&text) {
                        g.members.insert(member.to_string(), info);
                    }
                }
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_states_read_as_values_and_unknown_words_as_unknown() {
        for r in [
            MemberRole::Primary,
            MemberRole::Replica,
            MemberRole::Uninitialized,
        ] {
            assert_eq!(MemberRole::parse(r.as_str()), r);
        }
        for st in [
            MemberState::Running,
            MemberState::Streaming,
            MemberState::Starting,
            MemberState::Stopped,
        ] {
            assert_eq!(MemberState::parse(st.as_str()), st);
        }
        let m = MemberInfo {
            role: "PRIMARY".into(),
            state: "creating replica".into(),
            ..MemberInfo::default()
        };
        assert_eq!(
            (m.role(), m.state()),
            (MemberRole::Unknown, MemberState::Other)
        );
        assert!(!m.is_running_primary() && !m.is_streaming_replica());
        let m = MemberInfo {
            role: "replica".into(),
            state: "streaming".into(),
            ..MemberInfo::default()
        };
        assert!(m.is_streaming_replica() && !m.is_running_primary());
    }

    #[test]
    fn manual_failovers_that_can_lose_commits_or_never_happen_are_refused() {
        let member = |tags: &str| -> MemberInfo {
            serde_json::from_str(&format!(
                r#"{{"role":"replica","state":"streaming","tags":{{{tags}}}}}"#
            ))
            .expect("member")
        };
        let mut g = GroupState::default();
        g.members.insert("a".into(), member(""));
        g.members.insert("b".into(), member(""));
        g.members.insert("c".into(), member(r#""nofailover":true"#));
        assert_eq!(
            g.manual_failover_refusal("a"),
            None,
            "asynchronous: any replica"
        );
        assert!(
            g.manual_failover_refusal("c")
                .is_some_and(|r| r.contains("nofailover"))
        );
        g.sync = Some(SyncState {
            leader: Some("old".into()),
            sync_standby: Some("a".into()),
        });
        assert_eq!(
            g.manual_failover_refusal("a"),
            None,
            "the synchronous standby"
        );
        let why = g.manual_failover_refusal("b").expect("refused");
        assert!(
            why.contains("synchronous mode") && why.contains("a is the synchronous standby"),
            "{why}"
        );
        assert_eq!(
            g.manual_failover_refusal("stranger"),
            None,
            "checked elsewhere"
        );
        g.members.insert("old".into(), member(""));
        assert_eq!(
            g.manual_failover_refusal("old"),
            None,
            "the leader that wrote the key"
        );
        g.sync = Some(SyncState {
            leader: Some("old".into()),
            sync_standby: None,
        });
        assert_eq!(g.manual_failover_refusal("old"), None, "the last leader");
        let why = g.manual_failover_refusal("a").expect("refused");
        assert!(
            why.starts_with("synchronous mode") && why.contains("only the last leader (old)"),
            "{why}"
        );
    }

    #[test]
    fn hostile_keys_are_dropped_and_said() {
        let keys = ClusterKeys::new("/service", "c");
        let member = |host: &str| {
            format!(r#"{{"role":"replica","state":"streaming","host":"{host}","port":5432}}"#)
        };
        let mut leaderless = kv("/service/c/1/leader", "m1");
        leaderless.lease = 0;
        let kvs = vec![
            leaderless,
            kv("/service/c/1/members/m1", &member("10.0.0.1")),
            kv("/service/c/1/members/m2", &member("10.0.0.2; rm -rf /")),
            kv("/service/c/1/members/Bad Name", &member("10.0.0.3")),
            kv("/service/c/2/leader", "../../etc"),
            kv("/service/c/2/members/w1", &member("w1.example")),
        ];
        let mut groups = parse_cluster(&keys, &kvs);
        let mut g1 = groups.remove(&1).expect("group 1");
        let u = g1.sanitize();
        assert_eq!(g1.members.keys().collect::<Vec<_>>(), vec!["m1"]);
        assert!(g1.leader.is_none());
        assert_eq!(u.bogus_leader.as_deref(), Some("m1"));
        assert_eq!(u.problems.len(), 3, "{:#?}", u.problems);
        assert!(u.problems.iter().any(|p| p.contains("no lease")));
        let mut g2 = groups.remove(&2).expect("group 2");
        let u = g2.sanitize();
        assert_eq!(u.bogus_leader.as_deref(), Some("../../etc"));
        assert!(g2.members.contains_key("w1"));
        // A well-formed group has nothing to say.
        let mut good = parse_cluster(
            &keys,
            &[
                kv("/service/c/3/leader", "m1"),
                kv("/service/c/3/members/m1", &member("10.0.0.1")),
            ],
        );
        let u = good.get_mut(&3).expect("group 3").sanitize();
        assert_eq!(u, Untrusted::default());
        assert_eq!(parse_rfc3339("900000-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("9223372036854775807-01-01T00:00:00Z"), None);
    }

    fn kv(key: &str, value: &str) -> RawKv {
        RawKv {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 7,
            lease: 42,
        }
    }

    #[test]
    fn apply_lock_holders() {
        for unix in [0, 1_795_636_800, 1_709_208_000, 951_782_400, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&format_rfc3339(unix)), Some(unix), "{unix}");
        }
        assert_eq!(format_rfc3339(1_795_636_800), "2026-11-25T20:00:00Z");
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let cases: Vec<(&str, ApplyLockHolder, &str)> = vec![
            (
                "by hand",
                ApplyLockHolder::new(
                    env(&[("USER", "ana")]),
                    "laptop\n",
                    42,
                    1_795_636_800,
                    0x7a3f,
                ),
                "ana@laptop (pid 42) since 2026-11-25T20:00:00Z, lock id 7a3f",
            ),
            (
                "GitHub Actions",
                ApplyLockHolder::new(
                    env(&[
                        ("USER", "runner"),
                        ("GITHUB_ACTOR", "octo"),
                        ("GITHUB_SERVER_URL", "https://github.com"),
                        ("GITHUB_REPOSITORY", "acme/db"),
                        ("GITHUB_RUN_ID", "991"),
                    ]),
                    "runner-3",
                    7,
                    1_795_636_800,
                    1,
                ),
                "octo@runner-3 (pid 7, CI job https://github.com/acme/db/actions/runs/991) since 2026-11-25T20:00:00Z, lock id 1",
            ),
            (
                "GitLab CI",
                ApplyLockHolder::new(
                    env(&[
                        ("GITLAB_USER_LOGIN", "bo"),
                        ("CI_JOB_URL", "https://gitlab.example/acme/db/-/jobs/5"),
                    ]),
                    "gl",
                    9,
                    0,
                    255,
                ),
                "bo@gl (pid 9, CI job https://gitlab.example/acme/db/-/jobs/5) since 1970-01-01T00:00:00Z, lock id ff",
            ),
            (
                "hostile text read back from etcd",
                ApplyLockHolder {
                    user: "x\u{1b}[2J".into(),
                    host: "h\nFAKE".into(),
                    ..Default::default()
                },
                "x[2J@hFAKE (pid 0) since 1970-01-01T00:00:00Z, lock id ",
            ),
        ];
        for (name, holder, want) in cases {
            assert_eq!(holder.describe(), want, "{name}");
        }
    }

    #[test]
    fn switchover_candidates() {
        let m = |role: &str, state: &str, lsn: u64, nofailover: bool| {
            let mut i = MemberInfo {
                role: role.into(),
                state: state.into(),
                xlog_location: lsn,
                ..Default::default()
            };
            if nofailover {
                i.tags
                    .insert("nofailover".into(), serde_json::Value::Bool(true));
            }
            i
        };
        let group = |members: Vec<(&str, MemberInfo)>, sync: Option<&str>| GroupState {
            members: members
                .into_iter()
                .map(|(n, i)| (n.to_string(), i))
                .collect(),
            sync: sync.map(|s| SyncState {
                leader: Some("a".into()),
                sync_standby: Some(s.into()),
            }),
            ..Default::default()
        };
        let lead = ("a", m("primary", "running", 100, false));
        let cases: Vec<(&str, GroupState, Result<&str, &str>)> = vec![
            (
                "furthest ahead",
                group(
                    vec![
                        lead.clone(),
                        ("b", m("replica", "streaming", 90, false)),
                        ("c", m("replica", "streaming", 95, false)),
                    ],
                    None,
                ),
                Ok("c"),
            ),
            (
                "ties by name",
                group(
                    vec![
                        lead.clone(),
                        ("c", m("replica", "streaming", 95, false)),
                        ("b", m("replica", "streaming", 95, false)),
                    ],
                    None,
                ),
                Ok("b"),
            ),
            (
                "not streaming, nofailover",
                group(
                    vec![
                        lead.clone(),
                        ("b", m("replica", "starting", 99, false)),
                        ("c", m("replica", "streaming", 98, true)),
                    ],
                    None,
                ),
                Err("no healthy streaming replica to hand over to"),
            ),
            (
                "alone",
                group(vec![lead.clone()], None),
                Err("no healthy streaming replica to hand over to"),
            ),
            (
                "synchronous standby only",
                group(
                    vec![
                        lead.clone(),
                        ("b", m("replica", "streaming", 90, false)),
                        ("c", m("replica", "streaming", 99, false)),
                    ],
                    Some("b"),
                ),
                Ok("b"),
            ),
            (
                "synchronous standby down",
                group(
                    vec![
                        lead.clone(),
                        ("b", m("replica", "stopped", 90, false)),
                        ("c", m("replica", "streaming", 99, false)),
                    ],
                    Some("b"),
                ),
                Err(
                    "synchronous mode: only the synchronous standby (b) can take over without losing commits, and it is not a healthy streaming replica",
                ),
            ),
        ];
        for (name, g, want) in cases {
            assert_eq!(
                g.switchover_candidate("a")
                    .as_deref()
                    .map_err(|e| e.as_str()),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn timestamps() {
        for (text, unix) in [
            ("1970-01-01T00:00:00Z", Some(0)),
            ("2026-11-25T20:00:00Z", Some(1_795_636_800)),
            ("2026-11-25T22:00:00+02:00", Some(1_795_636_800)),
            ("2026-11-25T20:00:00.123Z", Some(1_795_636_800)),
            ("2024-02-29T12:00:00Z", Some(1_709_208_000)),
            ("2026-13-01T00:00:00Z", None),
            ("tomorrow", None),
        ] {
            assert_eq!(parse_rfc3339(text), unix, "{text}");
        }
    }

    #[test]
    fn layout_is_patronis() {
        let k = ClusterKeys::new("/service/", "demo");
        assert_eq!(k.leader(1), "/service/demo/1/leader");
        assert_eq!(k.member(0, "coord1"), "/service/demo/0/members/coord1");
        assert_eq!(k.initialize(2), "/service/demo/2/initialize");
        assert!(!k.apply_lock().starts_with(&k.prefix));
    }

    #[test]
    fn parses_groups_and_skips_garbage() {
        let k = ClusterKeys::new("/service", "demo");
        let groups = parse_cluster(
            &k,
            &[
                kv("/service/demo/0/leader", "coord1"),
                kv("/service/demo/0/initialize", "7310"),
                kv(
                    "/service/demo/0/members/coord1",
                    r#"{"role":"primary","state":"running","timeline":2,"xlog_location":100}"#,
                ),
                kv("/service/demo/0/members/broken", "{not json"),
                kv(
                    "/service/demo/1/sync",
                    r#"{"leader":"w1","sync_standby":"w2"}"#,
                ),
                kv("/service/demo/x/leader", "ignored"),
                kv("/service/other/0/leader", "ignored"),
            ],
        );
        assert_eq!(groups.len(), 2);
        let g0 = &groups[&0];
        assert_eq!(
            g0.leader.as_ref().map(|l| (l.name.as_str(), l.lease)),
            Some(("coord1", 42))
        );
        assert_eq!(g0.initialize.as_deref(), Some("7310"));
        assert_eq!(g0.members.len(), 1);
        assert_eq!(g0.members["coord1"].timeline, 2);
        assert_eq!(
            groups[&1]
                .sync
                .as_ref()
                .and_then(|s| s.sync_standby.as_deref()),
            Some("w2")
        );
    }
}
