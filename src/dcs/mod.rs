//! etcd as the distributed configuration store: the key layout (`keys`, pure) and a client
//! whose every call is bounded by a timeout, with the compare-and-set primitives leader
//! election needs: create-if-absent, replace-if-unchanged, delete-if-mine, leases.

pub mod diagnose;
pub mod handover;
pub mod keys;
pub mod membership;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions, Watcher,
};
pub use store::{Condition, Reply, Request, Store, StoreError, WatchBatch, WatchEvent};

pub use keys::{
    ClusterKeys, FailoverRequest, GroupState, LeaderKey, MemberInfo, MemberRole, MemberState,
    RawKv, Status, SyncState,
};

#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    #[error("etcd {op}: timed out after {ms} ms")]
    Timeout { op: String, ms: u128 },
    #[error("etcd {op}: {detail}")]
    Failed { op: String, detail: String },
    #[error("etcd endpoint {0}: {1}")]
    Tls(String, String),
}

/// How to reach etcd beyond its URLs: who we are and whom we trust.
#[derive(Clone, Default)]
pub struct Access {
    /// etcd user and password: each client authenticates when it connects.
    pub user: Option<(String, crate::spec::secret::Secret)>,
    pub tls: Option<TlsMaterial>,
}

/// PEM texts for TLS to etcd.
#[derive(Clone)]
pub struct TlsMaterial {
    /// CA certificate(s) that signed the servers' certificates.
    pub ca: String,
    /// Client certificate and private key, when etcd checks client certificates.
    pub identity: Option<(String, crate::spec::secret::Secret)>,
}

impl Access {
    pub fn from_spec(etcd: &crate::spec::model::EtcdSpec) -> Access {
        Access::from_agent(&crate::agent::config::EtcdConfig::from_spec(etcd))
    }

    pub fn from_agent(etcd: &crate::agent::config::EtcdConfig) -> Access {
        Access {
            user: etcd
                .auth
                .as_ref()
                .map(|c| (c.username.clone(), c.password.clone())),
            tls: etcd.tls.as_ref().map(|t| TlsMaterial {
                ca: t.ca.clone(),
                identity: t
                    .cert
                    .as_ref()
                    .zip(t.key.as_ref())
                    .map(|(c, k)| (c.clone(), k.clone())),
            }),
        }
    }

    fn tls_options(&self) -> Option<etcd_client::TlsOptions> {
        let t = self.tls.as_ref()?;
        let options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(t.ca.as_bytes()));
        Some(match &t.identity {
            Some((cert, key)) => options.identity(etcd_client::Identity::from_pem(
                cert.as_bytes(),
                key.expose().as_bytes(),
            )),
            None => options,
        })
    }
}

async fn bounded<T>(
    op: &str,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DcsError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(DcsError::Failed {
            op: op.to_string(),
            detail: describe(&e),
        }),
        Err(_) => Err(DcsError::Timeout {
            op: op.to_string(),
            ms: timeout.as_millis(),
        }),
    }
}

/// Whether an error means the request never reached a working member (a dead endpoint, a
/// broken connection): then another endpoint is worth a try.
/// An authentication token etcd no longer accepts (it expired), as opposed to a refusal.
fn auth_expired(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::Unauthenticated && s.message().contains("invalid auth token"))
}

/// An error in words: a gRPC status as its code and message (not the metadata dump).
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let message = s.message().trim_start_matches("etcdserver: ");
            format!("{:?}: {message}", s.code())
        }
        other => other.to_string(),
    }
}

/// etcd refused who we are: a wrong password, a user without a role, bad arguments.
fn refused(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if matches!(
        s.code(),
        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    ))
}

fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
                && !s.message().contains("etcdserver:")
        }
        _ => false,
    }
}

/// How the time of a retried call is shared between its attempts.
struct Budget {
    timeout: Duration,
    deadline: tokio::time::Instant,
    /// A partitioned endpoint drops packets: each attempt gets a share of the time, not all.
    per_attempt: Duration,
}

impl Budget {
    fn new(timeout: Duration) -> Budget {
        Budget {
            timeout,
            deadline: tokio::time::Instant::now() + timeout,
            per_attempt: (timeout / 3).max(Duration::from_millis(300)),
        }
    }

    /// How long the next attempt may take; the call's error once the time is up (`last`:
    /// what the last attempt said, if anything).
    fn next_attempt(&self, op: &str, last: &str) -> Result<Duration, DcsError> {
        let remaining = self
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        if !remaining.is_zero() {
            return Ok(remaining.min(self.per_attempt));
        }
        Err(match last.is_empty() {
            true => DcsError::Timeout {
                op: op.to_string(),
                ms: self.timeout.as_millis(),
            },
            false => DcsError::Failed {
                op: op.to_string(),
                detail: last.to_string(),
            },
        })
    }
}

/// Run `f` on the current endpoint's client until it succeeds, moving to the next endpoint
/// when a call fails in transit or one attempt takes too long, all within `timeout`. Only for
/// calls that are safe to repeat: reads, puts, and compare-and-sets whose outcome the caller
/// verifies.
async fn retried<T, F, Fut>(op: &str, timeout: Duration, dcs: &Dcs, mut f: F) -> Result<T, DcsError>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let budget = Budget::new(timeout);
    let mut last = String::new();
    loop {
        let attempt = budget.next_attempt(op, &last)?;
        let (i, client) = dcs.current(attempt).await;
        let client = match client {
            Ok(c) => c,
            // Refused credentials do not get better with another try (an election in
            // progress, "leader changed", does: it is Unavailable).
            Err(e) if refused(&e) => {
                return Err(DcsError::Failed {
                    op: op.to_string(),
                    detail: format!("{}: {}", dcs.url(i), describe(&e)),
                });
            }
            Err(e) => {
                last = format!("{}: {}", dcs.url(i), describe(&e));
                dcs.rotate(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        match tokio::time::timeout(attempt, f(client)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if auth_expired(&e) => {
                // The token from the connect expired (etcd's auth-token TTL): a new client
                // authenticates again.
                tracing::debug!(
                    op,
                    endpoint = i,
                    "etcd auth token expired; connecting again"
                );
                last = describe(&e);
                dcs.forget(i).await;
            }
            Ok(Err(e)) if transient(&e) => {
                tracing::debug!(op, endpoint = i, error = %e, "etcd endpoint failed; trying the next");
                last = describe(&e);
                dcs.rotate(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Err(e)) => {
                return Err(DcsError::Failed {
                    op: op.to_string(),
                    detail: describe(&e),
                });
            }
            Err(_) => {
                tracing::debug!(op, endpoint = i, "etcd endpoint too slow; trying the next");
                last = format!("no answer within {} ms", attempt.as_millis());
                dcs.rotate(i);
            }
        }
    }
}

/// One etcd endpoint as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EndpointHealth {
    pub url: String,
    /// Why it could not be asked; None when it answered.
    pub error: Option<String>,
    pub version: String,
    /// Bytes of its backend database (what the space quota counts).
    pub db_size: i64,
    pub leader: bool,
    pub errors: Vec<String>,
    /// Active alarms of the cluster (`NOSPACE`, `CORRUPT`).
    pub alarms: Vec<String>,
}

impl EndpointHealth {
    fn unreachable(url: &str, why: String) -> EndpointHealth {
        EndpointHealth {
            url: url.to_string(),
            error: Some(why),
            ..EndpointHealth::default()
        }
    }

    /// What an operator must hear about, if anything.
    pub fn problem(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(format!("etcd {}: {e}", self.url));
        }
        if self.alarms.iter().any(|a| a == "NOSPACE") {
            return Some(format!(
                "etcd {}: NOSPACE alarm — the database reached its space quota and etcd refuses writes (leases are still renewed and primaries keep serving, but no failover, switchover or agent restart can happen); compact, defragment and disarm (see the README)",
                self.url
            ));
        }
        if !self.alarms.is_empty() {
            return Some(format!(
                "etcd {}: alarms {}",
                self.url,
                self.alarms.join(", ")
            ));
        }
        if !self.errors.is_empty() {
            return Some(format!("etcd {}: {}", self.url, self.errors.join("; ")));
        }
        None
    }
}

/// A connection to etcd for one cluster.
///
/// One client per endpoint, used one at a time: the current endpoint serves every call until
/// it fails, then the next one takes over. (etcd-client's own balancer prefers the least
/// loaded endpoint, and a dead endpoint that fails at once always looks least loaded.)
#[derive(Clone)]
pub struct Dcs {
    backend: Backend,
    pub keys: ClusterKeys,
    timeout: Duration,
}

/// Who answers the requests: etcd through etcd-client, or a `Store` a test provides.
#[derive(Clone)]
enum Backend {
    Etcd(Arc<Endpoints>),
    Store(Arc<dyn Store>),
}

struct Endpoints {
    /// etcd user and password: each client authenticates when it connects.
    user: Option<(String, crate::spec::secret::Secret)>,
    tls: Option<etcd_client::TlsOptions>,
    urls: Vec<String>,
    clients: Vec<tokio::sync::Mutex<Option<Client>>>,
    current: std::sync::atomic::AtomicUsize,
}

impl Dcs {
    /// Connect to the endpoints (any reachable one will do). `timeout` bounds every call.
    pub async fn connect(
        endpoints: &[String],
        access: &Access,
        keys: ClusterKeys,
        timeout: Duration,
    ) -> Result<Dcs, DcsError> {
        let dcs = Self::unproven(endpoints, access, keys, timeout)?;
        dcs.prove(endpoints, access, timeout).await?;
        Ok(dcs)
    }

    /// A client that connects at its first call: for a managed etcd that `apply` is about
    /// to form (nothing answers yet).
    pub fn unproven(
        endpoints: &[String],
        access: &Access,
        keys: ClusterKeys,
        timeout: Duration,
    ) -> Result<Dcs, DcsError> {
        for e in endpoints {
            match (e.starts_with("https://"), access.tls.is_some()) {
                (true, false) => {
                    return Err(DcsError::Tls(
                        e.clone(),
                        "https:// without a CA certificate (etcd.tls.ca)".into(),
                    ));
                }
                // Never send a password or trust a leader election over plain text when TLS
                // was asked for.
                (false, true) => {
                    return Err(DcsError::Tls(
                        e.clone(),
                        "plain http:// while etcd.tls is set".into(),
                    ));
                }
                _ => {}
            }
        }
        if endpoints.is_empty() {
            return Err(DcsError::Failed {
                op: "connect".into(),
                detail: "no endpoints".into(),
            });
        }
        let dcs = Dcs {
            backend: Backend::Etcd(Arc::new(Endpoints {
                user: access.user.clone(),
                tls: access.tls_options(),
                urls: endpoints.to_vec(),
                clients: endpoints
                    .iter()
                    .map(|_| tokio::sync::Mutex::new(None))
                    .collect(),
                current: std::sync::atomic::AtomicUsize::new(0),
            })),
            keys,
            timeout,
        };
        Ok(dcs)
    }

    /// Prove that one endpoint answers; later calls fail over on their own.
    async fn prove(
        &self,
        endpoints: &[String],
        access: &Access,
        timeout: Duration,
    ) -> Result<(), DcsError> {
        let answered = retried(
            "connect",
            timeout,
            self,
            |mut c| async move { c.status().await },
        )
        .await;
        match answered {
            Ok(_) => Ok(()),
            Err(e) => {
                // A channel that cannot connect waits or gives up without saying why (a
                // certificate refused either way shows as a timeout or "canceled"): probe
                // for the reason. The probe says nothing when TCP and TLS are fine.
                let mut why = Vec::new();
                for url in endpoints {
                    let probe_timeout = Duration::from_secs(2).min(timeout);
                    if let Some(w) =
                        diagnose::why_unreachable(url, access.tls.as_ref(), probe_timeout).await
                    {
                        why.push(format!("{url}: {w}"));
                    }
                }
                if why.is_empty() {
                    Err(e)
                } else {
                    Err(DcsError::Failed {
                        op: "connect".into(),
                        detail: why.join("; "),
                    })
                }
            }
        }
    }

    /// A client whose requests `store` answers (the simulation's etcd). `timeout` bounds
    /// every call, as with `connect`.
    pub fn with_store(store: Arc<dyn Store>, keys: ClusterKeys, timeout: Duration) -> Dcs {
        Dcs {
            backend: Backend::Store(store),
            keys,
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn endpoints(&self) -> Option<&Endpoints> {
        match &self.backend {
            Backend::Etcd(e) => Some(e),
            Backend::Store(_) => None,
        }
    }

    fn url(&self, i: usize) -> String {
        self.endpoints()
            .and_then(|e| e.urls.get(i).cloned())
            .unwrap_or_default()
    }

    /// One request, retried within the timeout (see `retried`). Only for requests that are
    /// safe to repeat: reads, puts, and compare-and-sets whose outcome the caller verifies.
    async fn request(&self, op: &str, request: Request) -> Result<Reply, DcsError> {
        match &self.backend {
            Backend::Etcd(_) => {
                retried(op, self.timeout, self, |c| on_client(c, request.clone())).await
            }
            Backend::Store(store) => {
                retried_store(op, self.timeout, store.as_ref(), &request).await
            }
        }
    }

    /// The client of the current endpoint, connecting it if needed.
    async fn current(
        &self,
        connect_timeout: Duration,
    ) -> (usize, Result<Client, etcd_client::Error>) {
        let Some(e) = self.endpoints() else {
            return (
                0,
                Err(etcd_client::Error::InvalidArgs("no etcd endpoints".into())),
            );
        };
        let n = e.urls.len();
        let i = e.current.load(std::sync::atomic::Ordering::SeqCst) % n;
        (i, self.client_at(i, connect_timeout).await)
    }

    /// The client of endpoint `i`, connecting it if needed.
    async fn client_at(
        &self,
        i: usize,
        connect_timeout: Duration,
    ) -> Result<Client, etcd_client::Error> {
        let Some(inner) = self.endpoints() else {
            return Err(etcd_client::Error::InvalidArgs("no etcd endpoints".into()));
        };
        let mut slot = inner.clients[i].lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(2), self.timeout)
            .with_keep_alive_while_idle(true);
        let options = match &inner.user {
            Some((name, password)) => options.with_user(name.clone(), password.expose()),
            None => options,
        };
        let options = match &inner.tls {
            Some(tls) => options.with_tls(tls.clone()),
            None => options,
        };
        let url = inner.urls[i].clone();
        match tokio::time::timeout(connect_timeout, Client::connect([url], Some(options))).await {
            Ok(Ok(c)) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
    }

    /// Each endpoint's own view of itself: reachable, version, database size, leader or
    /// not, errors it reports, and the cluster's alarms (`NOSPACE`: writes refused until an
    /// operator compacts, defragments and disarms). Each endpoint bounded by the timeout.
    pub async fn endpoint_health(&self) -> Vec<EndpointHealth> {
        let mut out = Vec::new();
        let urls = self.endpoints().map(|e| e.urls.clone()).unwrap_or_default();
        for (i, url) in urls.iter().enumerate() {
            out.push(self.health_of(i, url).await);
        }
        out
    }

    async fn health_of(&self, i: usize, url: &str) -> EndpointHealth {
        let status = async {
            let mut c = self.client_at(i, self.timeout).await?;
            let st = c.status().await?;
            Ok::<_, etcd_client::Error>((c, st))
        };
        // Status is answered by the member alone; alarms need a quorum.
        let (mut c, st) = match tokio::time::timeout(self.timeout, status).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.forget(i).await;
                return EndpointHealth::unreachable(url, describe(&e));
            }
            Err(_) => {
                self.forget(i).await;
                return EndpointHealth::unreachable(
                    url,
                    format!("no answer within {} ms", self.timeout.as_millis()),
                );
            }
        };
        let mut h = EndpointHealth {
            url: url.to_string(),
            error: None,
            version: st.version().to_string(),
            db_size: st.db_size(),
            leader: st.header().is_some_and(|h| h.member_id() == st.leader()),
            errors: st.errors().to_vec(),
            alarms: Vec::new(),
        };
        if st.leader() == 0 {
            h.error = Some("up, but without a leader: the etcd cluster has lost its quorum".into());
            return h;
        }
        let alarms = c.alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        );
        match tokio::time::timeout(self.timeout, alarms).await {
            Ok(Ok(a)) => {
                h.alarms = a
                    .alarms()
                    .iter()
                    .map(|a| match a.alarm() {
                        etcd_client::AlarmType::Nospace => "NOSPACE".to_string(),
                        etcd_client::AlarmType::Corrupt => "CORRUPT".to_string(),
                        other => format!("{other:?}").to_uppercase(),
                    })
                    .collect();
            }
            Ok(Err(e)) => h.errors.push(format!("alarms: {}", describe(&e))),
            Err(_) => h.errors.push("alarms: no answer".into()),
        }
        h
    }

    /// Move on from endpoint `i` (unless another call already did).
    /// Drop endpoint `i`'s client: the next call connects (and authenticates) again.
    async fn forget(&self, i: usize) {
        if let Some(slot) = self.endpoints().and_then(|e| e.clients.get(i)) {
            *slot.lock().await = None;
        }
    }

    fn rotate(&self, i: usize) {
        let Some(e) = self.endpoints() else { return };
        let n = e.urls.len();
        let _ = e.current.compare_exchange(
            i,
            (i + 1) % n,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Every key of the cluster, and the revision they were read at.
    pub async fn read_cluster(&self) -> Result<(Vec<RawKv>, i64), DcsError> {
        let key = self.keys.prefix.clone();
        match self
            .request("read", Request::Range { key, prefix: true })
            .await?
        {
            Reply::Range { kvs, revision } => Ok((kvs, revision)),
            other => Err(unexpected("read", &other)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<RawKv>, DcsError> {
        Ok(self.get_at(key).await?.0)
    }

    /// One key and the revision it was read at.
    async fn get_at(&self, key: &str) -> Result<(Option<RawKv>, i64), DcsError> {
        let request = Request::Range {
            key: key.to_string(),
            prefix: false,
        };
        match self.request("get", request).await? {
            Reply::Range { kvs, revision } => Ok((kvs.into_iter().next(), revision)),
            other => Err(unexpected("get", &other)),
        }
    }

    pub async fn grant(&self, ttl: i64) -> Result<i64, DcsError> {
        // An extra lease from a retried grant is harmless: it expires unused.
        match self.request("lease grant", Request::Grant { ttl }).await? {
            Reply::Lease(id) => Ok(id),
            other => Err(unexpected("lease grant", &other)),
        }
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), DcsError> {
        self.request("lease revoke", Request::Revoke { lease })
            .await
            .map(|_| ())
    }

    /// Open a keep-alive stream for a lease. `probe_key` is a key the caller may read (one of
    /// its own, inside the namespace its etcd user is granted): see `LeaseRefresher::refresh`.
    pub async fn keeper(&self, lease: i64, probe_key: &str) -> Result<LeaseRefresher, DcsError> {
        let channel = match &self.backend {
            Backend::Store(store) => Refresh::Store(store.clone()),
            Backend::Etcd(_) => {
                let (keeper, stream, client) =
                    retried("lease keep-alive", self.timeout, self, |mut c| async move {
                        let (keeper, stream) = c.lease_keep_alive(lease).await?;
                        Ok((keeper, stream, c))
                    })
                    .await?;
                Refresh::Etcd(Box::new(EtcdRefresh {
                    keeper,
                    stream,
                    client,
                }))
            }
        };
        Ok(LeaseRefresher {
            channel,
            probe_key: probe_key.to_string(),
            lease,
        })
    }

    pub async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), DcsError> {
        let request = Request::Put {
            key: key.to_string(),
            value: value.to_vec(),
            lease,
        };
        self.request("put", request).await.map(|_| ())
    }

    /// Create `key` only if it does not exist. True when this call created it — also when an
    /// earlier attempt of this call did: then the key holds our value on our lease. Without a
    /// lease that proof is only as unique as the value, so callers racing with equal values
    /// must pass their lease.
    pub async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<bool, DcsError> {
        self.put_when("create", Condition::Absent, key, value, lease)
            .await
    }

    /// Replace `key` only if it still holds `expected`. True when it holds `value` afterwards
    /// (by this call or an earlier attempt of it).
    pub async fn replace(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<bool, DcsError> {
        let unchanged = Condition::ValueIs(expected.to_vec());
        self.put_when("replace", unchanged, key, value, lease).await
    }

    /// Put `value` (on `lease`) if `condition` holds, in one transaction. True when the key
    /// holds exactly that afterwards: a retry whose first attempt succeeded but whose answer
    /// was lost then still reports success instead of a lost race.
    async fn put_when(
        &self,
        what: &'static str,
        condition: Condition,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<bool, DcsError> {
        let request = Request::PutIf {
            condition,
            key: key.to_string(),
            value: value.to_vec(),
            lease,
        };
        if succeeded(what, self.request(what, request).await?)? {
            return Ok(true);
        }
        Ok(self
            .get(key)
            .await?
            .is_some_and(|kv| kv.value == value && lease.is_none_or(|l| kv.lease == l)))
    }

    /// Delete `key` only if it still holds `expected`. True when it is gone afterwards.
    pub async fn delete_if(&self, key: &str, expected: &[u8]) -> Result<bool, DcsError> {
        let request = Request::DeleteIf {
            key: key.to_string(),
            expected: expected.to_vec(),
        };
        let deleted = succeeded("delete", self.request("delete", request).await?)?;
        Ok(deleted || self.get(key).await?.is_none())
    }

    pub async fn delete(&self, key: &str) -> Result<(), DcsError> {
        let request = Request::Delete {
            key: key.to_string(),
            prefix: false,
        };
        self.request("delete", request).await.map(|_| ())
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), DcsError> {
        let request = Request::Delete {
            key: prefix.to_string(),
            prefix: true,
        };
        self.request("delete", request).await.map(|_| ())
    }

    /// Wait until `accept` returns Some for the value of `key` (None when the key is absent):
    /// one read, then a watch from just after it. Ok(None) when `timeout` passes first.
    pub async fn wait_for<T>(
        &self,
        key: &str,
        timeout: Duration,
        mut accept: impl FnMut(Option<&[u8]>) -> Option<T>,
    ) -> Result<Option<T>, DcsError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (kv, revision) = self.get_at(key).await?;
        if let Some(v) = accept(kv.as_ref().map(|kv| kv.value.as_slice())) {
            return Ok(Some(v));
        }
        let mut watch = self.watch(key, revision + 1).await?;
        loop {
            let batch = match tokio::time::timeout_at(deadline, watch.next()).await {
                Err(_) => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(b))) => b,
            };
            for ev in batch.events.iter().filter(|ev| ev.key == key) {
                if let Some(v) = accept(ev.value.as_deref()) {
                    return Ok(Some(v));
                }
            }
        }
    }

    /// Watch every key under `prefix` from `revision` on.
    pub async fn watch(&self, prefix: &str, revision: i64) -> Result<Watch, DcsError> {
        match &self.backend {
            Backend::Store(store) => {
                let attempt = tokio::time::timeout(self.timeout, store.watch(prefix, revision));
                match attempt.await {
                    Ok(Ok(rx)) => Ok(Watch::Store(rx)),
                    Ok(Err(e)) => Err(DcsError::Failed {
                        op: "watch".into(),
                        detail: e.detail,
                    }),
                    Err(_) => Err(DcsError::Timeout {
                        op: "watch".into(),
                        ms: self.timeout.as_millis(),
                    }),
                }
            }
            Backend::Etcd(_) => {
                let (watcher, stream) = retried("watch", self.timeout, self, |mut c| {
                    let prefix = prefix.to_string();
                    let opts = WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision);
                    async move { c.watch(prefix, Some(opts)).await }
                })
                .await?;
                Ok(Watch::Etcd(Box::new((watcher, stream))))
            }
        }
    }
}

/// A watch: batches of changes under a prefix, in revision order.
pub enum Watch {
    /// The watcher is kept only so the watch lives as long as this value.
    Etcd(Box<(Watcher, etcd_client::WatchStream)>),
    Store(tokio::sync::mpsc::UnboundedReceiver<WatchBatch>),
}

impl Watch {
    /// The next batch; None when the watch ended.
    pub async fn next(&mut self) -> Result<Option<WatchBatch>, DcsError> {
        match self {
            Watch::Store(rx) => Ok(rx.recv().await),
            Watch::Etcd(w) => {
                let resp = w.1.message().await.map_err(|e| DcsError::Failed {
                    op: "watch".into(),
                    detail: describe(&e),
                })?;
                Ok(resp.map(|r| WatchBatch {
                    canceled: r.canceled(),
                    events: r
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            Some(WatchEvent {
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                value: match ev.event_type() {
                                    etcd_client::EventType::Put => Some(kv.value().to_vec()),
                                    etcd_client::EventType::Delete => None,
                                },
                            })
                        })
                        .collect(),
                }))
            }
        }
    }
}

/// A request's answer was not the kind asked for (a `Store` that does not keep the contract).
fn unexpected(op: &str, reply: &Reply) -> DcsError {
    DcsError::Failed {
        op: op.to_string(),
        detail: format!("unexpected answer {reply:?}"),
    }
}

fn succeeded(op: &str, reply: Reply) -> Result<bool, DcsError> {
    match reply {
        Reply::Succeeded(s) => Ok(s),
        other => Err(unexpected(op, &other)),
    }
}

fn compare(key: &str, condition: &Condition) -> Compare {
    match condition {
        Condition::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
        Condition::ValueIs(v) => Compare::value(key, CompareOp::Equal, v.clone()),
    }
}

/// A request through etcd-client.
async fn on_client(mut c: Client, request: Request) -> Result<Reply, etcd_client::Error> {
    let raw = |kv: &etcd_client::KeyValue| RawKv {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    };
    Ok(match request {
        Request::Range { key, prefix } => {
            let opts = prefix.then(|| GetOptions::new().with_prefix());
            let resp = c.get(key, opts).await?;
            Reply::Range {
                kvs: resp.kvs().iter().map(raw).collect(),
                revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            }
        }
        Request::Put { key, value, lease } => {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            c.put(key, value, opts).await?;
            Reply::Done
        }
        Request::PutIf {
            condition,
            key,
            value,
            lease,
        } => {
            let put = TxnOp::put(
                key.as_str(),
                value,
                lease.map(|l| PutOptions::new().with_lease(l)),
            );
            let txn = Txn::new().when([compare(&key, &condition)]).and_then([put]);
            Reply::Succeeded(c.txn(txn).await?.succeeded())
        }
        Request::DeleteIf { key, expected } => {
            let txn = Txn::new()
                .when([Compare::value(key.as_str(), CompareOp::Equal, expected)])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            Reply::Succeeded(c.txn(txn).await?.succeeded())
        }
        Request::Delete { key, prefix } => {
            let opts = prefix.then(|| DeleteOptions::new().with_prefix());
            c.delete(key, opts).await?;
            Reply::Done
        }
        Request::Grant { ttl } => Reply::Lease(c.lease_grant(ttl, None).await?.id()),
        Request::Revoke { lease } => {
            c.lease_revoke(lease).await?;
            Reply::Done
        }
        // Keep-alives go through the refresher's stream (`LeaseRefresher`).
        Request::KeepAlive { .. } => {
            return Err(etcd_client::Error::InvalidArgs(
                "keep-alive outside a refresher".into(),
            ));
        }
    })
}

/// `retried` for a `Store`: the same shares of the timeout per attempt, another attempt after
/// an error that allows one.
async fn retried_store(
    op: &str,
    timeout: Duration,
    store: &dyn Store,
    request: &Request,
) -> Result<Reply, DcsError> {
    let budget = Budget::new(timeout);
    let mut last = String::new();
    loop {
        let attempt = budget.next_attempt(op, &last)?;
        match tokio::time::timeout(attempt, store.call(request.clone())).await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(e)) if e.retry => {
                last = e.detail;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Err(e)) => {
                return Err(DcsError::Failed {
                    op: op.to_string(),
                    detail: e.detail,
                });
            }
            Err(_) => last = format!("no answer within {} ms", attempt.as_millis()),
        }
    }
}

/// Keeps one lease alive, one bounded round trip at a time.
pub struct LeaseRefresher {
    channel: Refresh,
    /// What the quorum check reads (counts only): a key of the caller's, so that an etcd user
    /// granted only the cluster's namespace may read it.
    probe_key: String,
    pub lease: i64,
}

enum Refresh {
    Etcd(Box<EtcdRefresh>),
    Store(Arc<dyn Store>),
}

struct EtcdRefresh {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// The connection the keep-alives go through, for the quorum check.
    client: Client,
}

impl LeaseRefresher {
    /// Refresh the lease. Returns the remaining TTL in seconds; 0 means the lease is gone.
    ///
    /// A keep-alive alone proves little: etcd releases without the fix for etcd-io/etcd#15247
    /// (Debian 12's 3.4.23 among them) renew leases on a leader that has lost its quorum and
    /// does not know it yet (it steps down only after an election timeout), so an agent could
    /// keep trusting a lease for that long after every other member stopped hearing from it. A linearizable read through the same connection after
    /// the keep-alive needs a quorum's acknowledgement: when it succeeds, the renewal happened
    /// on a leader that still had its quorum afterwards, so any later leader extends the
    /// lease by a full TTL from its own election.
    pub async fn refresh(&mut self, timeout: Duration) -> Result<i64, DcsError> {
        let probe_key = self.probe_key.as_str();
        match &mut self.channel {
            Refresh::Store(store) => {
                let request = Request::KeepAlive {
                    lease: self.lease,
                    probe_key: probe_key.to_string(),
                };
                match tokio::time::timeout(timeout, store.call(request)).await {
                    Ok(Ok(Reply::Ttl(ttl))) => Ok(ttl),
                    Ok(Ok(other)) => Err(unexpected("lease keep-alive", &other)),
                    Ok(Err(e)) => Err(DcsError::Failed {
                        op: "lease keep-alive".into(),
                        detail: e.detail,
                    }),
                    Err(_) => Err(DcsError::Timeout {
                        op: "lease keep-alive".into(),
                        ms: timeout.as_millis(),
                    }),
                }
            }
            Refresh::Etcd(e) => {
                let EtcdRefresh {
                    keeper,
                    stream,
                    client,
                } = e.as_mut();
                let round_trip = async move {
                    keeper.keep_alive().await?;
                    let resp = stream.message().await?;
                    if resp.as_ref().is_some_and(|r| r.ttl() > 0) {
                        client
                            .get(
                                probe_key,
                                Some(etcd_client::GetOptions::new().with_count_only()),
                            )
                            .await?;
                    }
                    Ok(resp)
                };
                match bounded("lease keep-alive", timeout, round_trip).await? {
                    Some(resp) => Ok(resp.ttl()),
                    None => Err(DcsError::Failed {
                        op: "lease keep-alive".into(),
                        detail: "stream closed".into(),
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EndpointHealth;

    #[test]
    fn endpoint_problems_name_what_to_do() {
        let ok = EndpointHealth {
            url: "http://e:2379".into(),
            version: "3.4.23".into(),
            ..EndpointHealth::default()
        };
        assert_eq!(ok.problem(), None);
        let full = EndpointHealth {
            alarms: vec!["NOSPACE".into()],
            ..ok.clone()
        };
        let p = full.problem().unwrap_or_default();
        assert!(p.contains("NOSPACE") && p.contains("defragment"), "{p}");
        let gone = EndpointHealth::unreachable("http://e:2379", "tcp connect error".into());
        assert!(
            gone.problem()
                .unwrap_or_default()
                .contains("tcp connect error")
        );
        let noisy = EndpointHealth {
            errors: vec!["slow disk".into()],
            ..ok
        };
        assert!(noisy.problem().unwrap_or_default().contains("slow disk"));
    }
}
