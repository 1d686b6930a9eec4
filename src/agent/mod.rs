//! The per-host HA agent (`citus-reconcile agent --config FILE`): its configuration
//! (`config`, pure), the decision core (`decide`, pure) with its pure planners for synchronous
//! replication (`sync`) and member slots (`slots`), and the edges around it — the lease
//! and fence (`lease`), the guard process that fences a frozen agent's primary and keeps the
//! watchdog device (`guard`, its rules pure in `guard_core`), the executor (`node`), the loop and supervisor (`run`), the REST API
//! (`api`: its routes; `api_server`: its own thread, connection limits and TLS), and on the coordinator the write pauses around worker handovers (`citus_pause`).

pub mod api;
pub mod api_server;
pub mod citus_pause;
pub mod config;
pub mod decide;
pub mod guard;
pub mod guard_core;
pub mod lease;
pub mod node;
pub mod run;
pub mod slots;
pub mod sync;
