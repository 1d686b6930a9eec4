//! The per-host HA agent (`citus-reconcile agent --config FILE`): its configuration
//! (`config`, pure), the decision core (`decide`, pure), and the edges around it — the lease
//! and fence (`lease`), the executor (`node`), the loop and supervisor (`run`), and the REST API
//! (`api`).

pub mod api;
pub mod config;
pub mod decide;
pub mod lease;
pub mod node;
pub mod run;
pub mod sync;
