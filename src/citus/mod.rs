//! Citus metadata: the row model and its diff (`metadata`, pure), the coordinator's write
//! pause around a worker group's handover (`pause`, pure), and the SQL that reads and changes
//! them (`sql`).

pub mod metadata;
pub mod pause;
pub mod sql;
