//! etcd as the distributed configuration store: the key layout (`keys`, pure) and a client
//! whose every call is bounded by a timeout, with the compare-and-set primitives leader
//! election needs: create-if-absent, replace-if-unchanged, delete-if-mine, leases.

pub mod keys;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions, WatchStream, Watcher,
};

pub use keys::{
    ClusterKeys, FailoverRequest, GroupState, LeaderKey, MemberInfo, RawKv, Status, SyncState,
};

#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    #[error("etcd {op}: timed out after {ms} ms")]
    Timeout { op: String, ms: u128 },
    #[error("etcd {op}: {detail}")]
    Failed { op: String, detail: String },
    #[error(
        "etcd endpoint {0}: TLS to etcd is not supported yet; use http:// endpoints on a trusted network"
    )]
    Tls(String),
}

/// A connection to etcd for one cluster.
#[derive(Clone)]
pub struct Dcs {
    client: Client,
    pub keys: ClusterKeys,
    timeout: Duration,
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
            detail: e.to_string(),
        }),
        Err(_) => Err(DcsError::Timeout {
            op: op.to_string(),
            ms: timeout.as_millis(),
        }),
    }
}

/// Whether an error means the request never reached a working member (a dead endpoint, a
/// broken connection): then another attempt, likely on another endpoint, is worth it.
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

/// Like [`bounded`], retrying transient failures until the deadline. With one etcd member
/// down, the client's balancer still sends some requests to it; they fail at once and the
/// retry goes elsewhere. Only for calls that are safe to repeat (reads, puts, and
/// compare-and-sets whose outcome the caller verifies).
async fn retried<T, F, Fut>(op: &str, timeout: Duration, mut f: F) -> Result<T, DcsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(DcsError::Timeout {
                op: op.to_string(),
                ms: timeout.as_millis(),
            });
        }
        match tokio::time::timeout(remaining, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if transient(&e) && remaining > Duration::from_millis(60) => {
                tracing::debug!(op, error = %e, "transient etcd error; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Err(e)) => {
                return Err(DcsError::Failed {
                    op: op.to_string(),
                    detail: e.to_string(),
                });
            }
            Err(_) => {
                return Err(DcsError::Timeout {
                    op: op.to_string(),
                    ms: timeout.as_millis(),
                });
            }
        }
    }
}

impl Dcs {
    /// Connect to the endpoints (any reachable one will do). `timeout` bounds every call.
    pub async fn connect(
        endpoints: &[String],
        keys: ClusterKeys,
        timeout: Duration,
    ) -> Result<Dcs, DcsError> {
        if let Some(e) = endpoints.iter().find(|e| e.starts_with("https://")) {
            return Err(DcsError::Tls(e.clone()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout)
            .with_keep_alive_while_idle(true);
        let client = bounded(
            "connect",
            timeout,
            Client::connect(endpoints, Some(options)),
        )
        .await?;
        Ok(Dcs {
            client,
            keys,
            timeout,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Every key of the cluster, and the revision they were read at.
    pub async fn read_cluster(&self) -> Result<(Vec<RawKv>, i64), DcsError> {
        let mut c = self.client.clone();
        let resp = bounded(
            "read",
            self.timeout,
            c.get(
                self.keys.prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            ),
        )
        .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| RawKv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            })
            .collect();
        Ok((kvs, revision))
    }

    pub async fn get(&self, key: &str) -> Result<Option<RawKv>, DcsError> {
        let resp = retried("get", self.timeout, || {
            let mut c = self.client.clone();
            let key = key.to_string();
            async move { c.get(key, None).await }
        })
        .await?;
        Ok(resp.kvs().first().map(|kv| RawKv {
            key: key.to_string(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }))
    }

    pub async fn grant(&self, ttl: i64) -> Result<i64, DcsError> {
        let mut c = self.client.clone();
        Ok(
            bounded("lease grant", self.timeout, c.lease_grant(ttl, None))
                .await?
                .id(),
        )
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), DcsError> {
        let mut c = self.client.clone();
        bounded("lease revoke", self.timeout, c.lease_revoke(lease))
            .await
            .map(|_| ())
    }

    /// Open a keep-alive stream for a lease.
    pub async fn keeper(&self, lease: i64) -> Result<LeaseRefresher, DcsError> {
        let mut c = self.client.clone();
        let (keeper, stream) =
            bounded("lease keep-alive", self.timeout, c.lease_keep_alive(lease)).await?;
        Ok(LeaseRefresher {
            keeper,
            stream,
            lease,
        })
    }

    pub async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), DcsError> {
        let mut c = self.client.clone();
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        bounded("put", self.timeout, c.put(key, value, opts))
            .await
            .map(|_| ())
    }

    /// Create `key` only if it does not exist. True when this call created it.
    pub async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<bool, DcsError> {
        let put = TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([put]);
        let mut c = self.client.clone();
        Ok(bounded("create", self.timeout, c.txn(txn))
            .await?
            .succeeded())
    }

    /// Replace `key` only if it still holds `expected`. True on success.
    pub async fn replace(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<bool, DcsError> {
        let put = TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)));
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, expected)])
            .and_then([put]);
        let mut c = self.client.clone();
        Ok(bounded("replace", self.timeout, c.txn(txn))
            .await?
            .succeeded())
    }

    /// Delete `key` only if it still holds `expected`. True when it was deleted.
    pub async fn delete_if(&self, key: &str, expected: &[u8]) -> Result<bool, DcsError> {
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::delete(key, None)]);
        let mut c = self.client.clone();
        Ok(bounded("delete", self.timeout, c.txn(txn))
            .await?
            .succeeded())
    }

    pub async fn delete(&self, key: &str) -> Result<(), DcsError> {
        let mut c = self.client.clone();
        bounded("delete", self.timeout, c.delete(key, None))
            .await
            .map(|_| ())
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), DcsError> {
        let mut c = self.client.clone();
        bounded(
            "delete",
            self.timeout,
            c.delete(prefix, Some(DeleteOptions::new().with_prefix())),
        )
        .await
        .map(|_| ())
    }

    /// Watch every key under `prefix` from `revision` on.
    pub async fn watch(
        &self,
        prefix: &str,
        revision: i64,
    ) -> Result<(Watcher, WatchStream), DcsError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        bounded("watch", self.timeout, c.watch(prefix, Some(opts))).await
    }
}

/// Keeps one lease alive, one bounded round trip at a time.
pub struct LeaseRefresher {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    pub lease: i64,
}

impl LeaseRefresher {
    /// Refresh the lease. Returns the remaining TTL in seconds; 0 means the lease is gone.
    pub async fn refresh(&mut self, timeout: Duration) -> Result<i64, DcsError> {
        let round_trip = async {
            self.keeper.keep_alive().await?;
            self.stream.message().await
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
