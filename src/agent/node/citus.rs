//! The coordinator primary's Citus duties: `pg_dist_node` in line with the group leaders.

use super::*;

impl<H: Host> Node<H> {
    /// Coordinator primary: keep pg_dist_node pointing at every group's current leader.
    pub(super) async fn sync_citus(&mut self) -> Result<(), String> {
        let t = self.timeout();
        let groups = group_members(&self.cluster, &self.cfg);
        let desired = metadata::desired_nodes(&groups, self.cfg.citus.secondaries);
        let Some(c) = self.pg.citus_session(t).await? else {
            return Ok(());
        };
        let observed = crate::citus::sql::nodes(&c, t)
            .await
            .map_err(|e| e.to_string())?;
        // The coordinator knows only the groups that exist in etcd; it never removes a primary.
        let known: Vec<u32> = self.cluster.keys().copied().collect();
        let mut in_sync = metadata::metadata_in_sync(&observed);
        let held = self.pauses.as_ref().map(|p| p.held()).unwrap_or_default();
        let options = crate::citus::sql::UpdateOptions {
            // A primary row moves after a failover or a switchover: sessions still holding
            // the group's locks are talking to a server that is gone.
            force: true,
            lock_cooldown_ms: self.cfg.citus.lock_cooldown_ms,
        };
        for change in metadata::diff_nodes(&desired, &observed, &known)
            .into_iter()
            .filter(|c| c.is_automatic())
        {
            if held.contains(&change.group()) {
                // A write pause holds this group: its session moves the row when it ends.
                continue;
            }
            if change.needs_metadata_sync() && !in_sync {
                tracing::debug!(
                    ?change,
                    "deferred until Citus has synced metadata to the workers"
                );
                continue;
            }
            tracing::info!(?change, "updating pg_dist_node");
            crate::citus::sql::apply_node_change(&c, &change, options, t)
                .await
                .map_err(|e| e.to_string())?;
            if matches!(change, metadata::NodeChange::Update { .. }) {
                // Citus marks every worker's metadata unsynced until its daemon syncs it.
                in_sync = false;
            }
        }
        Ok(())
    }
}

/// Leaders and streaming replicas of every group, with addresses, from the members' keys.
pub fn group_members(
    cluster: &BTreeMap<u32, GroupState>,
    _cfg: &AgentConfig,
) -> BTreeMap<u32, GroupMembers> {
    cluster
        .iter()
        .filter_map(|(g, state)| {
            metadata::group_members(
                state.leader.as_ref().map(|l| l.name.as_str()),
                state.initialize.as_deref(),
                &state.members,
            )
            .map(|m| (*g, m))
        })
        .collect()
}
