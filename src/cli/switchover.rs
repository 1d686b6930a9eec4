//! `switchover` and `failover`: planned handover of a group's leadership, and promotion of a
//! chosen member when the leader is gone. Both write Patroni's `failover` key; the agents do
//! the rest. Both confirm on a terminal unless `--force`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::dcs::Dcs;
use crate::dcs::handover::{self, Outcome};
use crate::dcs::keys::MemberRole;
use crate::dcs::keys::{FailoverRequest, parse_rfc3339};

#[derive(Debug, clap::Args)]
pub struct SwitchoverArgs {
    pub spec: PathBuf,
    /// The Citus group (0 is the coordinator)
    #[arg(long)]
    pub group: u32,
    /// The member to hand over to (default: the healthiest streaming replica)
    #[arg(long)]
    pub candidate: Option<String>,
    /// When, as RFC 3339 (e.g. 2026-11-25T22:00:00Z); default now
    #[arg(long, value_name = "TIME")]
    pub scheduled_at: Option<String>,
    /// Do not ask for confirmation
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for the candidate to lead
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    pub spec: PathBuf,
    /// The Citus group (0 is the coordinator)
    #[arg(long)]
    pub group: u32,
    /// The member to promote
    #[arg(long)]
    pub candidate: String,
    /// Do not ask for confirmation
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for the candidate to lead
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Promote a candidate that is not the synchronous standby in synchronous mode, accepting
    /// that commits acknowledged to clients may be lost
    #[arg(long)]
    pub accept_data_loss: bool,
}

fn confirm(question: &str) -> Result<bool, String> {
    let answer = super::ask(&format!("{question} [y/N] "), "--force")?;
    Ok(matches!(answer.as_str(), "y" | "Y" | "yes"))
}

struct Context {
    dcs: Dcs,
    group: u32,
}

async fn open(spec_path: &std::path::Path, group: u32) -> miette::Result<Option<Context>> {
    let Some(spec) = load_for_etcd(spec_path)? else {
        return Ok(None);
    };
    if spec.group(group).is_none() {
        return Err(miette::miette!("the spec has no group {group}"));
    }
    let dcs = connect_etcd(&spec).await?;
    Ok(Some(Context { dcs, group }))
}

/// The spec for a command that talks to etcd only: no secret is read but etcd's password
/// (an operator running `switchover` need not hold the database's).
fn load_for_etcd(path: &std::path::Path) -> miette::Result<Option<crate::spec::Spec>> {
    let report = crate::spec::load_file(
        path,
        crate::spec::LoadOptions {
            resolve_secrets: false,
            resolve_etcd_secret: true,
        },
    );
    eprint!("{}", report.render());
    let ok = !report.has_errors();
    Ok(report.spec.filter(|_| ok))
}

async fn connect_etcd(spec: &crate::spec::Spec) -> miette::Result<Dcs> {
    crate::observe::connect_etcd(spec)
        .await
        .map_err(|e| miette::miette!("{e}"))
}

async fn state(ctx: &Context) -> miette::Result<crate::dcs::GroupState> {
    handover::group_state(&ctx.dcs, ctx.group)
        .await
        .map_err(|e| miette::miette!("{e}"))
}

async fn request(
    ctx: &Context,
    req: &FailoverRequest,
    candidate: Option<&str>,
    timeout: Duration,
) -> miette::Result<ExitCode> {
    match handover::request(&ctx.dcs, ctx.group, req, candidate, timeout).await {
        Ok(Outcome::Scheduled) => {
            println!(
                "Scheduled; the leader hands over at {}.",
                req.scheduled_at.as_deref().unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(Outcome::Done { leader, after }) => {
            println!(
                "{leader} now leads group {} ({:.2}s after the request).",
                ctx.group,
                after.as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(miette::miette!("{e}")),
    }
}

fn runtime() -> miette::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| miette::miette!("{e}"))
}

pub fn switchover(args: SwitchoverArgs) -> miette::Result<ExitCode> {
    runtime()?.block_on(async {
        let Some(ctx) = open(&args.spec, args.group).await? else { return Ok(ExitCode::FAILURE) };
        let g = state(&ctx).await?;
        let leader = g.leader.as_ref().map(|l| l.name.clone()).ok_or_else(|| {
            miette::miette!("group {} has no leader; use `failover --candidate NAME` to promote a member", args.group)
        })?;
        let eligible = |name: &str| {
            g.members.get(name).is_some_and(|m| name != leader && m.is_streaming_replica() && !m.nofailover())
        };
        let candidate = match &args.candidate {
            Some(c) if c == &leader => return Err(miette::miette!("{c} already leads group {}", args.group)),
            Some(c) if !g.members.contains_key(c) => return Err(miette::miette!("{c} is not a running member of group {}", args.group)),
            Some(c) if !eligible(c) => return Err(miette::miette!("{c} is not a healthy streaming replica (or is tagged nofailover)")),
            Some(c) => c.clone(),
            None => g.switchover_candidate(&leader).map_err(|e| miette::miette!("group {}: {e}", args.group))?,
        };
        if let Some(sync) = &g.sync {
            if sync.sync_standby.as_deref().is_some_and(|s| s != candidate) {
                return Err(miette::miette!(
                    "synchronous mode: only the synchronous standby ({}) can take over without losing commits",
                    sync.sync_standby.as_deref().unwrap_or_default()
                ));
            }
        }
        if let Some(at) = &args.scheduled_at {
            if parse_rfc3339(at).is_none() {
                return Err(miette::miette!("--scheduled-at {at:?}: expected RFC 3339, e.g. 2026-11-25T22:00:00Z"));
            }
        }
        let when = args.scheduled_at.as_deref().map(|t| format!(" at {t}")).unwrap_or_default();
        println!("Switchover of group {}: {leader} → {candidate}{when}", args.group);
        if !args.force && !confirm("Proceed?").map_err(|e| miette::miette!("{e}"))? {
            println!("Cancelled.");
            return Ok(ExitCode::FAILURE);
        }
        let req = FailoverRequest { leader: Some(leader), member: Some(candidate.clone()), scheduled_at: args.scheduled_at.clone() };
        request(&ctx, &req, Some(&candidate), Duration::from_secs(args.timeout)).await
    })
}

pub fn failover(args: FailoverArgs) -> miette::Result<ExitCode> {
    runtime()?.block_on(async {
        let Some(ctx) = open(&args.spec, args.group).await? else {
            return Ok(ExitCode::FAILURE);
        };
        let g = state(&ctx).await?;
        let m = g.members.get(&args.candidate).ok_or_else(|| {
            miette::miette!(
                "{} is not a running member of group {}",
                args.candidate,
                args.group
            )
        })?;
        if m.role() != MemberRole::Replica {
            return Err(miette::miette!(
                "{} is not a replica (role {})",
                args.candidate,
                m.role
            ));
        }
        if let Some(why) = g.manual_failover_refusal(&args.candidate) {
            let risky = why.starts_with("synchronous mode");
            if !(risky && args.accept_data_loss) {
                return Err(miette::miette!(
                    "refused: {why}{}",
                    if risky {
                        "; pass --accept-data-loss to promote it anyway"
                    } else {
                        ""
                    }
                ));
            }
            println!("warning: {why}; going ahead (--accept-data-loss)");
        }
        let leader = g.leader.as_ref().map(|l| l.name.clone());
        match &leader {
            Some(l) => println!(
                "Group {} has a leader ({l}); this hands over to {} like a switchover.",
                args.group, args.candidate
            ),
            None => println!(
                "Failover of group {}: promote {}",
                args.group, args.candidate
            ),
        }
        if !args.force && !confirm("Proceed?").map_err(|e| miette::miette!("{e}"))? {
            println!("Cancelled.");
            return Ok(ExitCode::FAILURE);
        }
        let req = FailoverRequest {
            leader,
            member: Some(args.candidate.clone()),
            scheduled_at: None,
        };
        request(
            &ctx,
            &req,
            Some(&args.candidate),
            Duration::from_secs(args.timeout),
        )
        .await
    })
}

#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    pub spec: PathBuf,
    /// Only this group (default: every group of the spec)
    #[arg(long)]
    pub group: Option<u32>,
}

/// `pause`/`resume`: set or clear `pause` in each group's `config` key (Patroni's maintenance
/// mode). While paused, agents take no automatic action; fencing stays on.
pub fn set_paused(args: PauseArgs, paused: bool) -> miette::Result<ExitCode> {
    runtime()?.block_on(async {
        let Some(spec) = load_for_etcd(&args.spec)? else {
            return Ok(ExitCode::FAILURE);
        };
        let groups: Vec<u32> = match args.group {
            Some(g) if spec.group(g).is_none() => {
                return Err(miette::miette!("the spec has no group {g}"));
            }
            Some(g) => vec![g],
            None => spec.groups.iter().map(|g| g.id).collect(),
        };
        let dcs = connect_etcd(&spec).await?;
        for g in groups {
            let key = format!("{}config", dcs.keys.group(g));
            let mut config = dcs
                .get(&key)
                .await
                .map_err(|e| miette::miette!("{e}"))?
                .and_then(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).ok())
                .filter(|v| v.is_object())
                .unwrap_or_else(|| serde_json::json!({}));
            if let Some(map) = config.as_object_mut() {
                if paused {
                    map.insert("pause".into(), serde_json::Value::Bool(true));
                } else {
                    map.remove("pause");
                }
            }
            let body = serde_json::to_vec(&config).map_err(|e| miette::miette!("{e}"))?;
            dcs.put(&key, &body, None)
                .await
                .map_err(|e| miette::miette!("{e}"))?;
            println!("group {g}: {}", if paused { "paused" } else { "resumed" });
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Debug, clap::Args)]
pub struct ForceUnlockArgs {
    pub spec: PathBuf,
    /// The lock id, as a waiting `apply` names it
    pub id: String,
    /// Do not ask for confirmation
    #[arg(long)]
    pub force: bool,
}

/// `force-unlock`: remove the apply lock of an `apply` that died, by the id it shows (as
/// Terraform's force-unlock). Only that lock: a new holder is never removed by mistake.
pub fn force_unlock(args: ForceUnlockArgs) -> miette::Result<ExitCode> {
    runtime()?.block_on(async {
        let Some(spec) = load_for_etcd(&args.spec)? else {
            return Ok(ExitCode::FAILURE);
        };
        let dcs = connect_etcd(&spec).await?;
        let holder = crate::reconcile::lock::holder(&dcs)
            .await
            .map_err(|e| miette::miette!("{e}"))?
            .map(|(h, _)| h.describe())
            .ok_or_else(|| miette::miette!("the apply lock is not held"))?;
        println!("The apply lock is held by {holder}.");
        println!("Removing it while that apply still runs lets two applies run at once.");
        if !args.force && !confirm("Remove it?").map_err(|e| miette::miette!("{e}"))? {
            println!("Cancelled.");
            return Ok(ExitCode::FAILURE);
        }
        let was = crate::reconcile::lock::force_unlock(&dcs, &args.id)
            .await
            .map_err(|e| miette::miette!("{e}"))?;
        println!("Removed the apply lock of {was}.");
        Ok(ExitCode::SUCCESS)
    })
}
