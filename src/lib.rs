//! citus-reconcile: declarative, highly available Citus on plain VMs.
//!
//! The pipeline, in the order data flows:
//! - [`spec`]: the desired-state document, validated with positions.
//! - [`cli`]: the command line that drives it.
pub mod agent;
pub mod citus;
pub mod cli;
pub mod dcs;
pub mod lab;
pub mod observe;
pub mod plan;
pub mod postgres;
pub mod provision;
pub mod reconcile;
pub mod spec;
pub mod ssh;
pub mod tls;
