//! What the client logic in `dcs` asks of an etcd cluster, one request at a time, as values.
//!
//! Production sends these through etcd-client (`Dcs::connect`); a test may answer them itself
//! (`Dcs::with_store`): the deterministic simulation (`tests/simulation.rs`) runs the agent's
//! real client logic — retries, the read-back after a compare-and-set whose answer was lost,
//! the lease keeper's quorum check — against an etcd it controls, in simulated time.

use std::future::Future;
use std::pin::Pin;

use super::keys::RawKv;

/// The condition of a conditional put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The key does not exist (create revision 0).
    Absent,
    /// The key holds exactly this value.
    ValueIs(Vec<u8>),
}

/// One request to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read one key, or every key under a prefix; `Reply::Range`.
    Range { key: String, prefix: bool },
    /// `Reply::Done`.
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    /// Put only if `condition` holds, in one transaction; `Reply::Succeeded`.
    PutIf {
        condition: Condition,
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    /// Delete only if the key holds `expected`; `Reply::Succeeded`.
    DeleteIf { key: String, expected: Vec<u8> },
    /// `Reply::Done`.
    Delete { key: String, prefix: bool },
    /// `Reply::Lease`.
    Grant { ttl: i64 },
    /// `Reply::Done`.
    Revoke { lease: i64 },
    /// One keep-alive of `lease`, then (when it is still alive) a linearizable read of
    /// `probe_key`, so a renewal counts only on a leader that still has its quorum;
    /// `Reply::Ttl` (0: the lease is gone).
    KeepAlive { lease: i64, probe_key: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Range { kvs: Vec<RawKv>, revision: i64 },
    Succeeded(bool),
    Lease(i64),
    Ttl(i64),
    Done,
}

/// A failed request. `retry`: the request may not have reached a working member (a lost
/// connection, an election), so another attempt is worth it; otherwise the answer is final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    pub retry: bool,
    pub detail: String,
}

/// Changes under a watched prefix, in revision order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchBatch {
    pub events: Vec<WatchEvent>,
    /// The server ended the watch (compaction, shutdown): read again and watch anew.
    pub canceled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub key: String,
    /// None: deleted (or expired with its lease).
    pub value: Option<Vec<u8>>,
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// An etcd cluster answering `Request`s. Every call is bounded by the caller.
pub trait Store: Send + Sync {
    fn call(&self, request: Request) -> StoreFuture<'_, Reply>;
    /// Watch every key under `prefix` from `revision` on. The receiver ends when the watch
    /// breaks.
    fn watch(
        &self,
        prefix: &str,
        revision: i64,
    ) -> StoreFuture<'_, tokio::sync::mpsc::UnboundedReceiver<WatchBatch>>;
}
