//! Entry point of the single `citus-reconcile` binary (reconciler, agent and lab in one).

use clap::Parser;

fn main() -> std::process::ExitCode {
    citus_reconcile::cli::run(citus_reconcile::cli::Cli::parse())
}
