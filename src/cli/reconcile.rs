//! `plan`, `diff`, `apply` and `status`: the reconciler's commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load_spec;
use crate::plan::{render, saved};
use crate::reconcile::progress::json_line;
use crate::reconcile::{Options, Run, apply, progress::Progress, status};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The spec file (`apply` also takes a plan saved by `plan --out`)
    pub spec: PathBuf,
    /// Hosts worked on at once
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub parallelism: u16,
    /// Record host keys of hosts not yet in known_hosts (a changed key is always refused)
    #[arg(long)]
    pub accept_new_host_keys: bool,
    /// Upload this binary as the agent instead of the running executable
    #[arg(long, value_name = "PATH")]
    pub agent_binary: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print the plan as JSON
    #[arg(long)]
    pub json: bool,
    /// Exit 0 when there is nothing to do, 2 when there are changes, 1 on errors
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Also save the plan to FILE, for `apply FILE` (it holds no secret)
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Do not ask for confirmation
    #[arg(long)]
    pub auto_approve: bool,
    /// Allow removing members and worker groups that left the spec (groups are drained first)
    #[arg(long)]
    pub allow_destroy: bool,
    /// Seconds to wait for the agents to converge
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Seconds to wait for another apply's lock (0: fail at once, naming its holder)
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub lock_timeout: u64,
    /// Plan, progress and outcome as JSON lines on stdout (with a format version); needs
    /// --auto-approve or a saved plan
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Seconds between observations (sooner when the spec or a secret file changes)
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    pub interval: f64,
    /// Apply what drifted, except removals, under the apply lock
    #[arg(long)]
    pub repair: bool,
    /// Seconds a repair waits for the agents to converge
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Events as JSON lines (with a format version) instead of text
    #[arg(long)]
    pub json: bool,
    /// Serve Prometheus metrics at http://ADDRESS/metrics (e.g. 127.0.0.1:9187)
    #[arg(long, value_name = "ADDRESS")]
    pub listen: Option<std::net::SocketAddr>,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: expected seconds between 0.1 and 86400")),
    }
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[arg(long)]
    pub json: bool,
}

fn options(run: &RunArgs, timeout: u64, allow_destroy: bool) -> miette::Result<Options> {
    let agent_binary = match &run.agent_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| miette::miette!("cannot locate this executable: {e}"))?,
    };
    Ok(Options {
        parallelism: usize::from(run.parallelism),
        accept_new_host_keys: run.accept_new_host_keys,
        agent_binary,
        timeout: Duration::from_secs(timeout),
        allow_destroy,
        lock_timeout: Duration::ZERO,
    })
}

fn runtime() -> miette::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| miette::miette!("cannot start the runtime: {e}"))
}

/// Open a run and observe; None (after printing why) when the spec is invalid.
async fn open(
    args: &RunArgs,
    opts: Options,
) -> miette::Result<Option<(Run, crate::plan::Observed)>> {
    open_at(&args.spec, opts).await
}

async fn open_at(
    spec_path: &std::path::Path,
    opts: Options,
) -> miette::Result<Option<(Run, crate::plan::Observed)>> {
    let Some(spec) = load_spec(spec_path, true)? else {
        return Ok(None);
    };
    let run = Run::open(&spec, opts)
        .await
        .map_err(|e| miette::miette!("{e}"))?;
    let observed = run.observe().await;
    Ok(Some((run, observed)))
}

pub fn plan(args: PlanArgs) -> miette::Result<ExitCode> {
    let started = Instant::now();
    runtime()?.block_on(async {
        let Some((run, observed)) = open(&args.run, options(&args.run, 300, false)?).await? else {
            return Ok(ExitCode::FAILURE);
        };
        let plan = run.plan(&observed);
        run.close().await;
        if let Some(out) = &args.out {
            save_plan(&plan, &run, &args.run.spec, out)?;
        }
        if args.json {
            println!("{}", render::json(&plan));
        } else {
            print!("{}", render::text(&plan, &run.desired));
            eprintln!("(planned in {:.2}s)", started.elapsed().as_secs_f64());
        }
        Ok(
            match (
                plan.errors.is_empty(),
                plan.is_empty(),
                args.detailed_exitcode,
            ) {
                (false, _, _) => ExitCode::FAILURE,
                (true, false, true) => ExitCode::from(2),
                _ => ExitCode::SUCCESS,
            },
        )
    })
}

/// `diff`: exit 0 without differences, 1 with differences, 2 on errors (as `kubectl diff`).
pub fn diff(args: RunArgs) -> miette::Result<ExitCode> {
    let result = runtime()?.block_on(async {
        let Some((run, observed)) = open(&args, options(&args, 300, false)?).await? else {
            return Ok(ExitCode::from(2));
        };
        let plan = run.plan(&observed);
        run.close().await;
        for e in &plan.errors {
            eprintln!("error: {e}");
        }
        print!("{}", render::diff_only(&plan));
        Ok(match (plan.errors.is_empty(), plan.is_empty()) {
            (false, _) => ExitCode::from(2),
            (true, true) => ExitCode::SUCCESS,
            (true, false) => ExitCode::from(1),
        })
    });
    result.or_else(|e: miette::Report| {
        eprintln!("{e:?}");
        Ok(ExitCode::from(2))
    })
}

/// Every secret the plan depends on, as digests (see `plan::saved`).
fn secrets_material(run: &Run) -> String {
    let digests: Vec<(String, String)> = run
        .desired
        .hosts
        .iter()
        .flat_map(|(host, h)| {
            h.secret_digests
                .iter()
                .map(move |(k, v)| (format!("{host}.{k}"), v.clone()))
        })
        .collect();
    saved::secrets_material(&digests)
}

fn save_plan(
    plan: &crate::plan::Plan,
    run: &Run,
    spec: &std::path::Path,
    out: &std::path::Path,
) -> miette::Result<()> {
    let spec_bytes =
        std::fs::read(spec).map_err(|e| miette::miette!("cannot read {}: {e}", spec.display()))?;
    let mut salt = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut salt))
        .map_err(|e| miette::miette!("cannot read /dev/urandom: {e}"))?;
    let saved = saved::SavedPlan::new(
        plan,
        &spec.to_string_lossy(),
        &spec_bytes,
        &secrets_material(run),
        &salt,
    );
    let text = serde_json::to_string_pretty(&saved)
        .map_err(|e| miette::miette!("cannot render the plan: {e}"))?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, format!("{text}\n"))
        .and_then(|_| std::fs::rename(&tmp, out))
        .map_err(|e| miette::miette!("cannot write {}: {e}", out.display()))?;
    eprintln!(
        "Saved the plan to {}; `citus-reconcile apply {}` applies exactly it.",
        out.display(),
        out.display()
    );
    Ok(())
}

/// The saved plan in `path`, if it holds one (it may be a spec instead).
fn read_saved_plan(path: &std::path::Path) -> miette::Result<Option<saved::SavedPlan>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    match saved::SavedPlan::parse(&text) {
        None => Ok(None),
        Some(Ok(p)) => Ok(Some(p)),
        Some(Err(e)) => Err(miette::miette!("{}: {e}", path.display())),
    }
}

fn confirm() -> Result<bool, String> {
    let answer = super::ask(
        "\nApply these changes? Only 'yes' is accepted: ",
        "--auto-approve (after reviewing the plan)",
    )?;
    Ok(answer == "yes")
}

pub fn apply(args: ApplyArgs) -> miette::Result<ExitCode> {
    if !args.json {
        return apply_run(args);
    }
    // Everything a program reading the lines needs is on stdout, failures included.
    match apply_run(args) {
        Ok(code) => Ok(code),
        Err(e) => {
            json_line("failed", serde_json::json!({ "message": format!("{e}") }));
            Ok(ExitCode::FAILURE)
        }
    }
}

fn apply_run(args: ApplyArgs) -> miette::Result<ExitCode> {
    let started = Instant::now();
    let saved = read_saved_plan(&args.run.spec)?;
    let spec_path = match &saved {
        Some(s) => PathBuf::from(&s.spec),
        None => args.run.spec.clone(),
    };
    runtime()?.block_on(async {
        let mut opts = options(&args.run, args.timeout, args.allow_destroy)?;
        opts.lock_timeout = Duration::from_secs(args.lock_timeout);
        let Some((run, observed)) = open_at(&spec_path, opts).await? else {
            return Ok(ExitCode::FAILURE);
        };
        let plan = run.plan(&observed);
        match args.json {
            true => json_line("plan", serde_json::json!({ "plan": plan })),
            false => print!("{}", render::text(&plan, &run.desired)),
        }
        if let Some(saved) = &saved {
            let spec_bytes = std::fs::read(&spec_path).unwrap_or_default();
            let why = saved.stale(&spec_bytes, &secrets_material(&run), &plan);
            if !why.is_empty() {
                run.close().await;
                return Err(miette::miette!(
                    "nothing was changed: the saved plan {} is stale:\n  {}\nplan again and review the new plan",
                    args.run.spec.display(),
                    why.join("\n  ")
                ));
            }
            let holds = format!("The saved plan {} still holds: applying it.", args.run.spec.display());
            match args.json {
                true => json_line("note", serde_json::json!({ "message": holds })),
                false => eprintln!("{holds}"),
            }
        }
        if !plan.errors.is_empty() {
            run.close().await;
            return Err(miette::miette!("nothing was changed: fix the errors above and run again"));
        }
        if plan.is_empty() {
            run.close().await;
            if args.json {
                json_line("applied", serde_json::json!({ "seconds": started.elapsed().as_secs_f64(), "summary": plan.summary }));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if plan.has_destroys() && !args.allow_destroy {
            run.close().await;
            return Err(miette::miette!(
                "nothing was changed: the plan removes what left the spec ({} item(s) marked - above: a group's shards move to the others, members stop, their data directories are set aside), which needs --allow-destroy; review it, then rerun with --allow-destroy",
                plan.summary.destroy
            ));
        }
        // A saved plan was reviewed when it was made.
        if args.json && !args.auto_approve && saved.is_none() {
            run.close().await;
            return Err(miette::miette!("nothing was changed: --json does not ask for confirmation; pass --auto-approve (after reviewing the plan) or apply a saved plan"));
        }
        if !args.auto_approve && saved.is_none() {
            match confirm() {
                Ok(true) => {}
                Ok(false) => {
                    run.close().await;
                    println!("Apply cancelled; nothing was changed.");
                    return Ok(ExitCode::FAILURE);
                }
                Err(e) => {
                    run.close().await;
                    return Err(miette::miette!("{e}"));
                }
            }
        }
        let hosts: Vec<String> = run.spec.hosts().map(|h| h.name.clone()).collect();
        let progress = Arc::new(match args.json {
            true => Progress::json(),
            false => Progress::new(&hosts),
        });
        let result = apply::apply(&run, &plan, &observed, &progress).await;
        progress.finish();
        run.close().await;
        match result {
            Ok(final_state) if args.json => {
                let after = run.plan(&final_state);
                json_line(
                    "applied",
                    serde_json::json!({
                        "seconds": started.elapsed().as_secs_f64(),
                        "summary": plan.summary,
                        "drifted_again": !after.is_empty(),
                        "status": status::of(&run.spec, &final_state),
                    }),
                );
                Ok(ExitCode::SUCCESS)
            }
            Ok(final_state) => {
                let after = run.plan(&final_state);
                print!("{}", status::text(&status::of(&run.spec, &final_state)));
                println!(
                    "Apply complete in {:.1}s: {} added, {} changed, {} destroyed.",
                    started.elapsed().as_secs_f64(),
                    plan.summary.add,
                    plan.summary.change,
                    plan.summary.destroy
                );
                if !after.is_empty() {
                    println!("note: the cluster drifted again while applying; `plan` shows what is left.");
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(miette::miette!("apply failed: {e}\nThe steps before it were completed; run apply again to continue.")),
        }
    })
}

pub fn watch(args: WatchArgs) -> miette::Result<ExitCode> {
    let opts = options(&args.run, args.timeout, false)?;
    runtime()?.block_on(async {
        crate::reconcile::watch::watch(crate::reconcile::watch::WatchOptions {
            spec: args.run.spec.clone(),
            run: opts,
            interval: Duration::from_secs_f64(args.interval),
            repair: args.repair,
            json: args.json,
            listen: args.listen,
        })
        .await
        .map_err(|e| miette::miette!("{e}"))?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn status(args: StatusArgs) -> miette::Result<ExitCode> {
    runtime()?.block_on(async {
        let Some((run, observed)) = open(&args.run, options(&args.run, 300, false)?).await? else {
            return Ok(ExitCode::FAILURE);
        };
        let etcd = match &run.dcs {
            Some(d) => d.endpoint_health().await,
            None => Vec::new(),
        };
        run.close().await;
        let s = status::of(&run.spec, &observed).with_etcd(etcd);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        } else {
            print!("{}", status::text(&s));
        }
        Ok(if s.problems.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}
