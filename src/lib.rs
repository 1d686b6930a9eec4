//! citus-reconcile: declarative, highly available Citus on plain VMs.
//!
//! The pipeline, in the order data flows:
//! - [`spec`]: the desired-state document, validated with positions.
//! - [`cli`]: the command line that drives it.
pub mod cli;
pub mod lab;
pub mod spec;
