//! Citus metadata: the row model and its diff (`metadata`, pure) and the SQL that reads and
//! changes it (`sql`).

pub mod metadata;
pub mod sql;
