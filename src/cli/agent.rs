//! `citus-reconcile agent`: run the per-host HA agent (what `apply` starts on every host).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::agent::config::AgentConfig;
use crate::agent::run;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Agent configuration written by `apply`
    #[arg(long, required_unless_present = "spec")]
    config: Option<PathBuf>,
    /// Run from a spec instead (debugging): the member to be
    #[arg(long, requires = "member", conflicts_with = "config")]
    spec: Option<PathBuf>,
    #[arg(long)]
    member: Option<String>,
    /// Keep an agent child running (restart it when it exits); for `agent.service: process`
    #[arg(long)]
    supervise: bool,
    /// Pid file written by the supervisor
    #[arg(long, requires = "supervise")]
    pid_file: Option<PathBuf>,
    /// Log as JSON lines
    #[arg(long)]
    log_json: bool,
}

pub fn run(args: AgentArgs) -> miette::Result<ExitCode> {
    init_logging(args.log_json);
    let config = match (&args.config, &args.spec, &args.member) {
        (Some(c), _, _) => c.clone(),
        (None, Some(spec), Some(member)) => {
            let Some(spec) = super::load_spec(spec, true)? else {
                return Ok(ExitCode::FAILURE);
            };
            let host = spec.host(member).ok_or_else(|| {
                miette::miette!("no member {member:?} in {}", spec.file.display())
            })?;
            let cfg = AgentConfig::for_host(&spec, host);
            let path = std::env::temp_dir().join(format!(
                "citus-reconcile-agent-{}-{member}.yaml",
                spec.cluster
            ));
            write_private(&path, &cfg.render()).map_err(|e| miette::miette!("{e}"))?;
            path
        }
        _ => {
            return Err(miette::miette!(
                "--config or --spec with --member is required"
            ));
        }
    };
    let result = if args.supervise {
        let mut extra = Vec::new();
        if args.log_json {
            extra.push("--log-json".to_string());
        }
        run::supervise(&config, args.pid_file.as_deref(), &extra)
    } else {
        run::run(&config)
    };
    result.map_err(|e| miette::miette!("agent: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
