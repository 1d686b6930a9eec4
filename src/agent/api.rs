//! The agent's REST API, compatible with the way load balancers check Patroni:
//! `GET/HEAD/OPTIONS /primary` (also `/`, `/master`, `/read-write`), `/replica` (`?lag=`),
//! `/read-only`, `/leader`, `/health`, `/liveness`, `/readiness` answer 200 or 503;
//! `/cluster` and `/status` (`/patroni`) return JSON; `/metrics` is Prometheus text.
//!
//! The answers come from what the loop last observed, except that `/primary` and `/leader`
//! also require the lease to be valid *now*: a primary about to be fenced stops attracting
//! writes before it is stopped.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Serialize;

use super::config::AgentConfig;
use super::decide::{Dcs, Server};
use super::lease::LeaseShared;
use super::node::{Node, Request};
use crate::dcs::MemberInfo;
use crate::dcs::handover::{self, Outcome};
use crate::dcs::keys::FailoverRequest;

/// What the API serves, refreshed after every cycle of the loop.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub member: MemberInfo,
    pub name: String,
    pub group: u32,
    pub cluster: String,
    pub leader: Option<String>,
    pub running: bool,
    pub primary: bool,
    pub streaming: bool,
    pub noloadbalance: bool,
    /// A standby the leader no longer has the WAL for (`decide::wal_gone`): no reads here.
    pub wal_gone: bool,
    pub members: BTreeMap<String, MemberInfo>,
    /// Bytes behind the leader (replicas), from the leader's published position.
    pub lag: Option<u64>,
    pub last_tick: Option<Instant>,
    pub loop_seconds: f64,
    pub leader_changes: u64,
    pub ttl: Duration,
    /// The last cycle could read etcd.
    pub etcd_reachable: bool,
    pub member_writes: u64,
    /// Postmasters the guard process had to kill (the agent was frozen past its lease).
    pub guard_fenced: u64,
    /// The watchdog device is open and kept (this member runs the primary).
    pub watchdog_active: bool,
    pub guard_running: bool,
}

#[derive(Clone)]
pub struct Handle {
    view: Arc<Mutex<View>>,
    lease: Arc<LeaseShared>,
    dcs: crate::dcs::Dcs,
    /// Replaced when the agent reloads new secrets.
    auth: Arc<Mutex<Option<super::config::Credential>>>,
    group: u32,
    requests: Arc<Mutex<std::collections::VecDeque<Request>>>,
    /// The agent's runtime: etcd work of a request runs there, where the etcd clients live,
    /// not on the API's own thread.
    agent_runtime: tokio::runtime::Handle,
    /// `/status`, `/patroni`, `/cluster` and `/metrics` need the credentials too.
    auth_reads: bool,
}

impl Handle {
    pub fn new(node: &Node) -> Handle {
        Handle {
            view: Arc::new(Mutex::new(View::default())),
            lease: node.lease.clone(),
            dcs: node.dcs.clone(),
            auth: Arc::new(Mutex::new(node.cfg.api.auth.clone())),
            group: node.cfg.group,
            requests: node.requests.clone(),
            agent_runtime: tokio::runtime::Handle::current(),
            auth_reads: node.cfg.api.auth_reads,
        }
    }

    /// Run `work` on the agent's runtime and wait for it here.
    async fn on_agent<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, String> {
        self.agent_runtime
            .spawn(work)
            .await
            .map_err(|e| format!("the agent's runtime dropped the request: {e}"))
    }

    /// The REST API's credentials after a reload.
    pub fn set_auth(&self, auth: Option<super::config::Credential>) {
        if let Ok(mut a) = self.auth.lock() {
            *a = auth;
        }
    }

    fn view(&self) -> View {
        self.view.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Refresh what the API serves from the node (called after each cycle).
    pub fn publish(&self, node: &Node) {
        let Some(s) = node.last_snapshot.as_ref() else {
            return;
        };
        let (leader, members) = match &s.dcs {
            Dcs::Available(g) => (g.leader.clone(), g.members.clone()),
            Dcs::Unavailable => (None, BTreeMap::new()),
        };
        let wal_gone = match (&s.dcs, &s.server) {
            (Dcs::Available(g), Server::Running(r)) => super::decide::wal_gone(g, r),
            _ => false,
        };
        let (running, primary, streaming, wal) = match &s.server {
            Server::Running(r) => (true, r.primary, r.streaming, r.wal),
            _ => (false, false, false, 0),
        };
        let leader_wal = leader
            .as_ref()
            .and_then(|l| members.get(l))
            .map(|m| m.xlog_location);
        let lag = (!primary && running).then(|| leader_wal.unwrap_or(wal).saturating_sub(wal));
        if let Ok(mut v) = self.view.lock() {
            let now = Instant::now();
            let loop_seconds = v
                .last_tick
                .map(|t| now.duration_since(t).as_secs_f64())
                .unwrap_or(0.0);
            *v = View {
                member: node.member_info(),
                name: node.cfg.member.clone(),
                group: node.cfg.group,
                cluster: node.cfg.cluster.clone(),
                leader,
                running,
                primary,
                streaming,
                noloadbalance: node.cfg.tags.noloadbalance,
                wal_gone,
                members,
                lag,
                last_tick: Some(now),
                loop_seconds,
                leader_changes: node.leader_changes,
                ttl: node.lease.timing.ttl,
                etcd_reachable: matches!(s.dcs, Dcs::Available(_)),
                member_writes: node.member_writes,
                guard_fenced: node.guard.fenced.load(Ordering::Relaxed),
                watchdog_active: node.guard.watchdog.lock().is_ok_and(|w| {
                    matches!(*w, crate::agent::guard::WatchdogStatus::Active { .. })
                }),
                guard_running: node.guard.running.load(Ordering::Relaxed),
            };
        }
    }
}

fn code(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[derive(Serialize)]
struct StatusBody<'a> {
    state: &'a str,
    role: &'a str,
    name: &'a str,
    group: u32,
    scope: &'a str,
    timeline: u32,
    xlog_location: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    lag: Option<u64>,
    leader: Option<&'a str>,
    lease_valid: bool,
    version: &'a str,
}

fn status_response(h: &Handle, ok: bool) -> Response {
    let v = h.view();
    let body = StatusBody {
        state: &v.member.state,
        role: &v.member.role,
        name: &v.name,
        group: v.group,
        scope: &v.cluster,
        timeline: v.member.timeline,
        xlog_location: v.member.xlog_location,
        lag: v.lag,
        leader: v.leader.as_deref(),
        lease_valid: h.lease.valid(),
        version: env!("CARGO_PKG_VERSION"),
    };
    let json = serde_json::to_string(&body).unwrap_or_default();
    (code(ok), [(header::CONTENT_TYPE, "application/json")], json).into_response()
}

fn is_primary(h: &Handle, v: &View) -> bool {
    v.running && v.primary && v.leader.as_deref() == Some(v.name.as_str()) && h.lease.valid()
}

fn lag_ok(v: &View, q: &BTreeMap<String, String>) -> bool {
    match q.get("lag").and_then(|l| parse_bytes(l)) {
        Some(max) => v.lag.is_some_and(|lag| lag <= max),
        None => true,
    }
}

/// `1048576`, `16kB`, `10MB`, `1GB` → bytes (Patroni accepts the same units).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

async fn primary(State(h): State<Handle>) -> Response {
    let v = h.view();
    status_response(&h, is_primary(&h, &v))
}

async fn leader(State(h): State<Handle>) -> Response {
    let v = h.view();
    status_response(&h, is_primary(&h, &v))
}

async fn replica(State(h): State<Handle>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let v = h.view();
    let ok = v.running && !v.primary && !v.noloadbalance && !v.wal_gone && lag_ok(&v, &q);
    status_response(&h, ok)
}

async fn read_only(State(h): State<Handle>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let v = h.view();
    let ok = is_primary(&h, &v)
        || (v.running && !v.primary && !v.noloadbalance && !v.wal_gone && lag_ok(&v, &q));
    status_response(&h, ok)
}

async fn health(State(h): State<Handle>) -> Response {
    let v = h.view();
    status_response(&h, v.running)
}

async fn liveness(State(h): State<Handle>) -> Response {
    let v = h.view();
    let alive = v
        .last_tick
        .is_some_and(|t| t.elapsed() < v.ttl.max(Duration::from_secs(5)));
    (code(alive), "").into_response()
}

async fn readiness(State(h): State<Handle>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let v = h.view();
    let ok = is_primary(&h, &v) || (v.running && !v.primary && v.streaming && lag_ok(&v, &q));
    (code(ok), "").into_response()
}

/// The read endpoints that reveal the cluster: open, or behind the write credentials when
/// `agent.api_auth_reads` says so.
fn may_read(h: &Handle, headers: &HeaderMap) -> Result<(), Box<Response>> {
    if h.auth_reads {
        authorized(h, headers)
    } else {
        Ok(())
    }
}

async fn status(State(h): State<Handle>, headers: HeaderMap) -> Response {
    if let Err(r) = may_read(&h, &headers) {
        return *r;
    }
    status_response(&h, true)
}

async fn cluster(State(h): State<Handle>, headers: HeaderMap) -> Response {
    if let Err(r) = may_read(&h, &headers) {
        return *r;
    }
    let v = h.view();
    let members: Vec<serde_json::Value> = v
        .members
        .iter()
        .map(|(name, m)| {
            let role = if v.leader.as_deref() == Some(name.as_str()) { "leader" } else { m.role.as_str() };
            serde_json::json!({
                "name": name, "role": role, "state": m.state, "host": m.host, "port": m.port,
                "api_url": m.api_url, "timeline": m.timeline, "xlog_location": m.xlog_location, "tags": m.tags,
            })
        })
        .collect();
    let body = serde_json::json!({ "scope": v.cluster, "group": v.group, "leader": v.leader, "members": members });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(State(h): State<Handle>, headers: HeaderMap) -> Response {
    if let Err(r) = may_read(&h, &headers) {
        return *r;
    }
    let v = h.view();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{cluster=\"{}\",group=\"{}\",member=\"{}\"}} {value}\n", v.cluster, v.group, v.name));
    };
    gauge(
        "citus_reconcile_primary",
        "1 when this member is the running primary holding the leader key",
        u8::from(is_primary(&h, &v)).to_string(),
    );
    gauge(
        "citus_reconcile_running",
        "1 when PostgreSQL is running",
        u8::from(v.running).to_string(),
    );
    gauge(
        "citus_reconcile_timeline",
        "PostgreSQL timeline",
        v.member.timeline.to_string(),
    );
    gauge(
        "citus_reconcile_xlog_location_bytes",
        "WAL position",
        v.member.xlog_location.to_string(),
    );
    gauge(
        "citus_reconcile_replication_lag_bytes",
        "bytes behind the leader (replicas)",
        v.lag.unwrap_or(0).to_string(),
    );
    gauge(
        "citus_reconcile_loop_interval_seconds",
        "time between the last two agent cycles",
        format!("{:.3}", v.loop_seconds),
    );
    gauge(
        "citus_reconcile_lease_valid",
        "1 while the etcd lease is trusted",
        u8::from(h.lease.valid()).to_string(),
    );
    gauge(
        "citus_reconcile_etcd_reachable",
        "1 when the agent's last cycle could read etcd",
        u8::from(v.etcd_reachable).to_string(),
    );
    gauge(
        "citus_reconcile_watchdog_active",
        "1 while the watchdog device is open and kept (ha.watchdog)",
        u8::from(v.watchdog_active).to_string(),
    );
    gauge(
        "citus_reconcile_guard_running",
        "1 while the guard process (the fence outside the agent) runs",
        u8::from(v.guard_running).to_string(),
    );
    let counter = |out: &mut String, name: &str, help: &str, value: String| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name}{{cluster=\"{}\",group=\"{}\",member=\"{}\"}} {value}\n", v.cluster, v.group, v.name));
    };
    counter(
        &mut out,
        "citus_reconcile_leader_changes_total",
        "leader changes seen by this member",
        v.leader_changes.to_string(),
    );
    counter(
        &mut out,
        "citus_reconcile_lease_renewals_total",
        "successful lease refreshes",
        h.lease.renewals.load(Ordering::Relaxed).to_string(),
    );
    counter(
        &mut out,
        "citus_reconcile_member_key_writes_total",
        "writes of this member's key to etcd (only when it changed)",
        v.member_writes.to_string(),
    );
    counter(
        &mut out,
        "citus_reconcile_guard_fenced_total",
        "primaries the guard process stopped because the agent could not (frozen past its lease)",
        v.guard_fenced.to_string(),
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}

/// Basic auth against `agent.api_auth`; without it, write endpoints are off.
fn authorized(h: &Handle, headers: &HeaderMap) -> Result<(), Box<Response>> {
    use base64::Engine;
    let auth = h.auth.lock().ok().and_then(|a| a.clone());
    let Some(cred) = &auth else {
        let denied = (
            StatusCode::FORBIDDEN,
            "write endpoints are disabled: set agent.api_auth in the spec\n",
        );
        return Err(Box::new(denied.into_response()));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .unwrap_or_default();
    let expected = format!("{}:{}", cred.username, cred.password.expose()).into_bytes();
    // Compare without an early exit, so timing says nothing about the password.
    let same = given.len() == expected.len()
        && given
            .iter()
            .zip(&expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        let challenge = [(header::WWW_AUTHENTICATE, "Basic realm=\"citus-reconcile\"")];
        Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                challenge,
                "authentication required\n",
            )
                .into_response(),
        ))
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoverBody {
    leader: Option<String>,
    candidate: Option<String>,
    scheduled_at: Option<String>,
    /// `POST /failover` to a member that is not the synchronous standby in synchronous mode.
    #[serde(default)]
    accept_data_loss: bool,
}

/// Authorize a write request and parse its JSON body (an empty body means no fields). A
/// malformed body is refused: guessing would start a switchover nobody asked for.
fn handover_body(
    h: &Handle,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<HandoverBody, Box<Response>> {
    authorized(h, headers)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(HandoverBody::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        Box::new((StatusCode::BAD_REQUEST, format!("request body: {e}\n")).into_response())
    })
}

fn handover_response(r: Result<Outcome, String>) -> Response {
    match r {
        Ok(Outcome::Done { leader, after }) => (
            StatusCode::OK,
            format!(
                "Successfully switched over to \"{leader}\" ({:.2}s)\n",
                after.as_secs_f64()
            ),
        )
            .into_response(),
        Ok(Outcome::Scheduled) => (StatusCode::ACCEPTED, "Switchover scheduled\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn switchover(
    State(h): State<Handle>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let b = match handover_body(&h, &headers, &body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let v = h.view();
    let Some(leader) = v.leader.clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the group has no leader; use /failover\n",
        )
            .into_response();
    };
    if b.leader.as_deref().is_some_and(|l| l != leader) {
        return (
            StatusCode::PRECONDITION_FAILED,
            format!("leader name does not match: the leader is {leader}\n"),
        )
            .into_response();
    }
    if b.scheduled_at
        .as_deref()
        .is_some_and(|t| crate::dcs::keys::parse_rfc3339(t).is_none())
    {
        return (StatusCode::BAD_REQUEST, "scheduled_at: expected RFC 3339\n").into_response();
    }
    let req = FailoverRequest {
        leader: Some(leader),
        member: b.candidate.clone(),
        scheduled_at: b.scheduled_at,
    };
    let (dcs, group) = (h.dcs.clone(), h.group);
    let outcome = h
        .on_agent(async move {
            handover::request(
                &dcs,
                group,
                &req,
                b.candidate.as_deref(),
                Duration::from_secs(30),
            )
            .await
        })
        .await;
    handover_response(outcome.and_then(|r| r))
}

async fn failover(
    State(h): State<Handle>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let b = match handover_body(&h, &headers, &body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(candidate) = b.candidate else {
        return (StatusCode::BAD_REQUEST, "failover needs a candidate\n").into_response();
    };
    let (dcs, group) = (h.dcs.clone(), h.group);
    let state = h
        .on_agent(async move {
            handover::group_state(&dcs, group)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .and_then(|r| r);
    let refusal = match state {
        Ok(g) => g.manual_failover_refusal(&candidate),
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("etcd: {e}\n")).into_response(),
    };
    if let Some(why) = refusal {
        if !(why.starts_with("synchronous mode") && b.accept_data_loss) {
            return (
                StatusCode::PRECONDITION_FAILED,
                format!("refused: {why} (\"accept_data_loss\": true overrides the synchronous-mode check)\n"),
            )
                .into_response();
        }
        tracing::warn!(%candidate, %why, "manual failover accepted with possible data loss");
    }
    let req = FailoverRequest {
        leader: h.view().leader,
        member: Some(candidate.clone()),
        scheduled_at: None,
    };
    let (dcs, group) = (h.dcs.clone(), h.group);
    let outcome = h
        .on_agent(async move {
            handover::request(&dcs, group, &req, Some(&candidate), Duration::from_secs(30)).await
        })
        .await;
    handover_response(outcome.and_then(|r| r))
}

fn enqueue(h: &Handle, r: Request) {
    if let Ok(mut q) = h.requests.lock() {
        q.push_back(r);
    }
    h.lease.wake.notify_one();
}

async fn restart(State(h): State<Handle>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&h, &headers) {
        return *r;
    }
    enqueue(&h, Request::Restart);
    (StatusCode::ACCEPTED, "restart scheduled\n").into_response()
}

async fn reinit(State(h): State<Handle>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&h, &headers) {
        return *r;
    }
    if h.view().primary {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "refusing to reinitialize the primary\n",
        )
            .into_response();
    }
    enqueue(&h, Request::Reinit);
    (StatusCode::ACCEPTED, "reinitialize scheduled\n").into_response()
}

async fn options_ok(headers: HeaderMap) -> Response {
    let _ = headers;
    StatusCode::OK.into_response()
}

pub fn router(h: Handle) -> Router {
    // `any` so HEAD and OPTIONS (what HAProxy's httpchk sends) get the same answer as GET.
    Router::new()
        .route("/", any(primary))
        .route("/primary", any(primary))
        .route("/master", any(primary))
        .route("/read-write", any(primary))
        .route("/leader", any(leader))
        .route("/replica", any(replica))
        .route("/read-only", any(read_only))
        .route("/health", any(health))
        .route("/liveness", any(liveness))
        .route("/readiness", any(readiness))
        .route("/status", get(status))
        .route("/patroni", get(status))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route("/switchover", post(switchover))
        .route("/failover", post(failover))
        .route("/restart", post(restart))
        .route("/reinit", post(reinit))
        .fallback(options_ok_or_404)
        .with_state(h)
}

async fn options_ok_or_404(method: axum::http::Method, headers: HeaderMap) -> Response {
    if method == axum::http::Method::OPTIONS {
        return options_ok(headers).await;
    }
    StatusCode::NOT_FOUND.into_response()
}

/// The API's TLS configuration, if it serves TLS. A certificate or key that cannot be used
/// is an error (the agent does not start): plain text instead would be a silent downgrade.
pub fn tls_config(cfg: &AgentConfig) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    match &cfg.api.tls {
        Some(t) => crate::tls::server_config(&t.cert, t.key.expose())
            .map(|c| Some(Arc::new(c)))
            .map_err(|e| format!("REST API TLS: {e}")),
        None => Ok(None),
    }
}

/// Serve the API on `address:port` from its own thread (see `api_server`), binding in the
/// background (retrying) so the HA loop never waits for it.
pub fn serve(cfg: &AgentConfig, handle: Handle, tls: Option<Arc<rustls::ServerConfig>>) {
    let addr = format!("{}:{}", cfg.address, cfg.api.port);
    super::api_server::spawn(addr, router(handle), tls);
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_units() {
        for (s, n) in [
            ("1048576", Some(1048576)),
            ("16kB", Some(16384)),
            ("10MB", Some(10 << 20)),
            ("1gb", Some(1 << 30)),
            ("x", None),
            ("5 parsecs", None),
        ] {
            assert_eq!(parse_bytes(s), n, "{s}");
        }
    }
}
