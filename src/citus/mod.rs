//! Citus metadata: the row model and its diff (`metadata`, pure), the coordinator's write
//! pause around a worker group's handover (`pause`, pure), the SQL that reads and changes
//! them (`sql`), and shard moves (`rebalance`).

pub mod metadata;
pub mod pause;
pub mod rebalance;
pub mod sql;
