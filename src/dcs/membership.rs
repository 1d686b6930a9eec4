//! The etcd cluster's own membership (for a managed etcd): list, add and remove members.
//! Each call goes to the first endpoint that answers, bounded by the timeout.

use super::{Dcs, DcsError, bounded};
pub use crate::plan::etcd::ClusterMember;

fn member_of(m: &etcd_client::Member) -> ClusterMember {
    ClusterMember {
        id: m.id(),
        name: m.name().to_string(),
        peer_urls: m.peer_urls().to_vec(),
        client_urls: m.client_urls().to_vec(),
        learner: m.is_learner(),
        answers: None,
    }
}

impl Dcs {
    /// Every member etcd knows of.
    pub async fn cluster_members(&self) -> Result<Vec<ClusterMember>, DcsError> {
        let mut last = None;
        for i in 0..self.endpoint_count() {
            let c = bounded("member list", self.timeout, self.client_at(i, self.timeout)).await;
            let mut c = match c {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match bounded("member list", self.timeout, c.member_list()).await {
                Ok(r) => return Ok(r.members().iter().map(member_of).collect()),
                Err(e) => {
                    self.forget(i).await;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| DcsError::Failed {
            op: "member list".into(),
            detail: "no endpoints".into(),
        }))
    }

    /// Add a member by its peer URL (it joins when it starts); its id.
    pub async fn add_cluster_member(&self, peer_url: &str) -> Result<u64, DcsError> {
        self.on_any("member add", |mut c| {
            let url = peer_url.to_string();
            async move {
                c.member_add([url], None)
                    .await
                    .map(|r| r.member().map(|m| m.id()).unwrap_or(0))
            }
        })
        .await
    }

    /// Remove a member (etcd refuses when that would cost the cluster its quorum).
    pub async fn remove_cluster_member(&self, id: u64) -> Result<(), DcsError> {
        self.on_any("member remove", |mut c| async move {
            c.member_remove(id).await.map(drop)
        })
        .await
    }

    /// Whether a member answers a status call on `url`, one of the client URLs etcd lists for
    /// it. The URL is etcd's content: the call carries no password (a status needs none).
    pub async fn member_answers(&self, url: &str, timeout: std::time::Duration) -> bool {
        let Some(inner) = self.endpoints() else {
            return false;
        };
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let options = match &inner.tls {
            Some(tls) => options.with_tls(tls.clone()),
            None => options,
        };
        let call = async {
            let mut c = etcd_client::Client::connect([url.to_string()], Some(options)).await?;
            c.status().await
        };
        matches!(tokio::time::timeout(timeout, call).await, Ok(Ok(_)))
    }

    fn endpoint_count(&self) -> usize {
        self.endpoints().map(|e| e.urls.len()).unwrap_or(0)
    }

    /// One membership change, sent once to the first endpoint that connects: never retried
    /// on another (an add that took effect but whose reply was lost must not run twice).
    async fn on_any<T, F, Fut>(&self, op: &str, f: F) -> Result<T, DcsError>
    where
        F: FnOnce(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = None;
        for i in 0..self.endpoint_count() {
            match bounded(op, self.timeout, self.client_at(i, self.timeout)).await {
                Ok(c) => return bounded(op, self.timeout, f(c)).await,
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| DcsError::Failed {
            op: op.into(),
            detail: "no endpoints".into(),
        }))
    }
}
