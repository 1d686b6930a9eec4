//! Replication duties of a primary: the role file (synchronous standby names), synchronous
//! replication one step at a time (`agent::sync`), member slots (`agent::slots`), and on a
//! standby the slots left from its time as primary.

use super::*;

impl<H: Host> Node<H> {
    /// The primary configuration to start (or promote) with: in synchronous mode, the recorded
    /// standby if the key is ours, else what runs without one (async for `on`, waiting for
    /// any standby for `strict`).
    pub(super) fn primary_role(&mut self) -> Role {
        use crate::agent::config::SyncModeConfig;
        let mode = self.cfg.ha.synchronous_mode;
        let ssn = if mode == SyncModeConfig::Off {
            String::new()
        } else {
            let key = self
                .cluster
                .get(&self.cfg.group)
                .and_then(|g| g.sync.clone());
            match key {
                Some(k) if k.leader.as_deref() == Some(self.cfg.member.as_str()) => k
                    .sync_standby
                    .as_deref()
                    .map(crate::agent::sync::names_for)
                    .unwrap_or_else(|| crate::agent::sync::names_without_standby(mode)),
                _ => crate::agent::sync::names_without_standby(mode),
            }
        };
        self.ssn = ssn.clone();
        self.ssn_changed = Some(Instant::now());
        self.ssn_since_lsn = None;
        Role::Primary {
            synchronous_standby_names: ssn,
        }
    }

    /// In synchronous mode, before promoting: the `sync` key names this member as leader,
    /// without a standby. A new primary without a synchronous standby acknowledges commits
    /// alone (`on`); were the key still to name the previous leader, that leader could take
    /// over after this one failed and lose them (found by the simulation, seed 200). Written
    /// while still a standby, so nothing was acknowledged yet; from then on only this member
    /// may promote until it names a standby that has caught up.
    pub(super) async fn take_sync_key(&mut self) -> Result<(), String> {
        if self.cfg.ha.synchronous_mode == crate::agent::config::SyncModeConfig::Off {
            return Ok(());
        }
        let me = self.cfg.member.clone();
        let group = self.cluster.entry(self.cfg.group).or_default();
        if group
            .sync
            .as_ref()
            .is_some_and(|k| k.leader.as_deref() == Some(me.as_str()) && k.sync_standby.is_none())
        {
            return Ok(());
        }
        let state = crate::dcs::SyncState {
            leader: Some(me),
            sync_standby: None,
        };
        let body = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
        self.dcs
            .put(&self.keys().sync(self.cfg.group), &body, None)
            .await
            .map_err(|e| format!("cannot take the sync key over before promoting: {e}"))?;
        // `primary_role` reads it from here.
        if let Some(g) = self.cluster.get_mut(&self.cfg.group) {
            g.sync = Some(state);
        }
        tracing::info!("sync key taken over before promoting");
        Ok(())
    }

    /// One step of synchronous replication management.
    pub(super) async fn manage_sync(&mut self) -> Result<(), String> {
        let t = self.timeout();
        if !self.pg.connected() {
            return Err("not connected to PostgreSQL".into());
        }
        // The switch point is read a moment after a change, once every backend sees it.
        if self.ssn_since_lsn.is_none()
            && self
                .ssn_changed
                .is_some_and(|at| at.elapsed() > Duration::from_millis(200))
        {
            self.ssn_since_lsn = Some(self.pg.current_wal(t).await?);
        }
        let rows = self.pg.replication(t).await?;
        let group = self
            .cluster
            .get(&self.cfg.group)
            .cloned()
            .unwrap_or_default();
        let standbys = rows
            .into_iter()
            .map(|r| {
                let eligible = group.members.get(&r.name).is_some_and(|m| !m.nofailover());
                crate::agent::sync::Standby {
                    name: r.name,
                    state: r.state,
                    sync_state: r.sync_state,
                    flush_lsn: r.flush_lsn,
                    eligible,
                }
            })
            .collect();
        let input = crate::agent::sync::SyncInput {
            mode: self.cfg.ha.synchronous_mode,
            me: self.cfg.member.clone(),
            key: group.sync.map(|k| (k.leader, k.sync_standby)),
            ssn: self.ssn.clone(),
            ssn_since_lsn: self.ssn_since_lsn,
            standbys,
        };
        match crate::agent::sync::next_step(&input) {
            crate::agent::sync::SyncStep::Nothing => Ok(()),
            crate::agent::sync::SyncStep::SetKey(standby) => {
                let body = serde_json::to_vec(&crate::dcs::SyncState {
                    leader: Some(self.cfg.member.clone()),
                    sync_standby: standby.clone(),
                })
                .unwrap_or_default();
                self.dcs
                    .put(&self.keys().sync(self.cfg.group), &body, None)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(standby = ?standby, "sync key updated");
                Ok(())
            }
            crate::agent::sync::SyncStep::SetStandbyNames(ssn) => {
                self.pg
                    .write_conf(&Role::Primary {
                        synchronous_standby_names: ssn.clone(),
                    })
                    .map_err(|e| e.to_string())?;
                self.pg.reload(t).await?;
                tracing::info!(synchronous_standby_names = %ssn, "synchronous standby names changed");
                self.ssn = ssn;
                self.ssn_changed = Some(Instant::now());
                self.ssn_since_lsn = None;
                Ok(())
            }
        }
    }

    /// Keep a replication slot for every other member of the group (`agent::slots` decides).
    /// One slot failing (a timeout, no free slot) does not keep the others from being done.
    pub(super) async fn manage_slots(&mut self, s: &Snapshot) -> Result<(), String> {
        let DcsView::Available(g) = &s.dcs else {
            return Ok(());
        };
        let t = self.timeout();
        let slots: Vec<slots::Slot> = self
            .pg
            .physical_slots(t)
            .await?
            .into_iter()
            .map(|(name, active, lost)| slots::Slot { name, active, lost })
            .collect();
        let members: Vec<String> = g.members.keys().cloned().collect();
        let plan = slots::plan(&slots::SlotInput {
            me: &s.me,
            members: &members,
            slots: &slots,
            seen: &self.slots_seen,
            now_ms: self.started.elapsed().as_millis() as u64,
            ttl_ms: u64::from(self.cfg.ha.member_slots_ttl) * 1000,
        });
        self.slots_seen = plan.seen;
        let mut failed = Vec::new();
        for name in &plan.recreate {
            let again = async {
                self.pg.drop_inactive_slot(name, t).await?;
                self.pg.create_physical_slot(name, t).await
            };
            match again.await {
                Ok(at) => {
                    tracing::warn!(slot = %name, holds_from = at, "PostgreSQL gave the slot up (max_slot_wal_keep_size): recreated; a standby further behind is cloned again")
                }
                Err(e) => failed.push(format!("recreate {name}: {e}")),
            }
        }
        for name in &plan.create {
            match self.pg.create_physical_slot(name, t).await {
                Ok(_) => tracing::info!(slot = %name, "created a member replication slot"),
                Err(e) => failed.push(format!("create {name}: {e}")),
            }
        }
        for name in &plan.drop {
            match self.pg.drop_inactive_slot(name, t).await {
                Ok(true) => {
                    tracing::info!(slot = %name, "dropped the slot of a member gone for longer than member_slots_ttl")
                }
                Ok(false) => {}
                Err(e) => failed.push(format!("drop {name}: {e}")),
            }
        }
        if !plan.over_limit.is_empty() {
            tracing::warn!(members = ?plan.over_limit, limit = slots::MAX_MEMBER_SLOTS, "more members than member slots: these get none");
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// A standby drops the logical slots of Citus shard moves it was the source of as a
    /// primary (see `sql::drop_citus_slots_on_standby`). Best effort: logged, never fatal.
    pub(super) async fn drop_leftover_slots(&mut self) {
        let t = self.timeout();
        let Ok(Some(c)) = self.pg.citus_session(t).await else {
            return;
        };
        match sql::drop_citus_slots_on_standby(&c, t).await {
            Ok(dropped) if !dropped.is_empty() => {
                tracing::info!(
                    ?dropped,
                    "dropped Citus's logical slots left from this member's time as primary"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot look for leftover Citus slots"),
        }
        // Member slots from its time as primary would hold WAL back here and, should it lead
        // again, start out far behind: the primary of the day keeps the slots that count.
        let mut ours: Vec<String> = self
            .cluster
            .get(&self.cfg.group)
            .map(|g| g.members.keys().map(|m| member_slot_name(m)).collect())
            .unwrap_or_default();
        ours.push(member_slot_name(&self.cfg.member));
        let Ok(existing) = sql::physical_slots(&c, t).await else {
            return;
        };
        for (name, active, _) in existing {
            if !active && ours.contains(&name) {
                match sql::drop_inactive_slot(&c, &name, t).await {
                    Ok(true) => {
                        tracing::info!(slot = %name, "dropped a member slot left from this member's time as primary")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(slot = %name, error = %e, "cannot drop a leftover member slot")
                    }
                }
            }
        }
    }
}
