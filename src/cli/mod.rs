//! The command line: argument types and dispatch. Each command lives in its own file and
//! returns an exit code; errors are rendered once, here.

mod agent;
mod lab;
mod reconcile;
mod switchover;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "citus-reconcile", version, about = "Declarative, highly available Citus on plain VMs", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check spec files and report every problem (exit 0 when valid, 1 when not)
    Validate {
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Check the shape of secret references without reading environment variables or files
        #[arg(long)]
        skip_secrets: bool,
    },
    /// Print the JSON Schema of the spec format
    Schema,
    /// Show what apply would change, with diffs
    Plan(reconcile::PlanArgs),
    /// Print only the differences (configuration files, parameters, Citus metadata rows)
    Diff(reconcile::RunArgs),
    /// Bring the hosts to the spec: provision, start agents, wait for convergence
    Apply(reconcile::ApplyArgs),
    /// Keep comparing the cluster with the spec: report drift as it comes and goes, and with --repair fix it
    Watch(reconcile::WatchArgs),
    /// Members, roles, lag and pg_dist_node, like `patronictl list`
    Status(reconcile::StatusArgs),
    /// Hand a group's leadership to another member (planned, no lost commits)
    Switchover(switchover::SwitchoverArgs),
    /// Promote a chosen member of a group whose leader is gone
    Failover(switchover::FailoverArgs),
    /// Maintenance mode: agents take no automatic action (no failover, no restarts); fencing stays on
    Pause(switchover::PauseArgs),
    /// Leave maintenance mode
    Resume(switchover::PauseArgs),
    /// Remove the apply lock of an apply that died (by the lock id a waiting apply shows)
    ForceUnlock(switchover::ForceUnlockArgs),
    /// Run the per-host HA agent (started on every host by `apply`)
    Agent(agent::AgentArgs),
    /// The agent's guard process (started by the agent)
    #[command(hide = true)]
    AgentGuard(crate::agent::guard::GuardArgs),
    /// Local hosts in network namespaces for trying citus-reconcile and for tests (root)
    #[command(subcommand)]
    Lab(lab::LabCommand),
}

pub fn run(cli: Cli) -> ExitCode {
    if !matches!(cli.command, Command::Agent(_) | Command::AgentGuard(_)) {
        // Reconciler commands log only when asked (RUST_LOG=debug); output is for people.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .try_init();
    }
    // Errors stay on one line each: CI logs and `grep` find a message whole, whatever the
    // width of the terminal that is not there.
    let _ = miette::set_hook(Box::new(|_| {
        Box::new(miette::MietteHandlerOpts::new().wrap_lines(false).build())
    }));
    let result = match cli.command {
        Command::Validate {
            specs,
            format,
            skip_secrets,
        } => validate::run(&specs, format, skip_secrets),
        Command::Lab(cmd) => lab::run(cmd),
        Command::Agent(args) => agent::run(args),
        Command::AgentGuard(args) => crate::agent::guard::run_guard(args),
        Command::Plan(args) => reconcile::plan(args),
        Command::Diff(args) => reconcile::diff(args),
        Command::Apply(args) => reconcile::apply(args),
        Command::Status(args) => reconcile::status(args),
        Command::Watch(args) => reconcile::watch(args),
        Command::Switchover(args) => switchover::switchover(args),
        Command::Failover(args) => switchover::failover(args),
        Command::Pause(args) => switchover::set_paused(args, true),
        Command::Resume(args) => switchover::set_paused(args, false),
        Command::ForceUnlock(args) => switchover::force_unlock(args),
        Command::Schema => {
            let schema = crate::spec::raw::json_schema();
            match serde_json::to_string_pretty(&schema) {
                Ok(text) => {
                    println!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(miette::miette!("cannot render the schema: {e}")),
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(report) => {
            eprintln!("{report:?}");
            ExitCode::FAILURE
        }
    }
}

/// Load a spec for a command that acts on it; on problems, print them and return None.
pub(crate) fn load_spec(
    path: &std::path::Path,
    resolve_secrets: bool,
) -> miette::Result<Option<crate::spec::Spec>> {
    let report = crate::spec::load_file(
        path,
        crate::spec::LoadOptions {
            resolve_secrets,
            resolve_etcd_secret: resolve_secrets,
        },
    );
    eprint!("{}", report.render());
    Ok(report.spec)
}

/// Ask on the terminal and return the answer line, trimmed. Never waits on a stdin that is
/// not a terminal (a CI job would hang): that is an error naming the flag that skips asking.
fn ask(prompt: &str, skip_flag: &str) -> Result<String, String> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "refusing to wait for confirmation: stdin is not a terminal; pass {skip_flag}"
        ));
    }
    print!("{prompt}");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(line.trim().to_string())
}
