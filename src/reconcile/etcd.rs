//! Executing a managed etcd's actions (`plan::etcd`): install, start (a new cluster, or a
//! member that stopped), add one member at a time, each healthy before the next, and remove.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::progress::Progress;
use super::{ReconcileError, Run};
use crate::dcs::Dcs;
use crate::plan::{Action, Kind, Phase, Plan, Target};
use crate::provision::etcd as member;
use crate::spec::model::EtcdMemberSpec;

fn step_error(name: &str, step: &str, detail: impl std::fmt::Display) -> ReconcileError {
    ReconcileError::Step {
        host: format!("etcd member {name}"),
        step: step.into(),
        detail: detail.to_string(),
    }
}

fn dcs(run: &Run) -> Result<&Dcs, ReconcileError> {
    run.dcs
        .as_ref()
        .ok_or_else(|| ReconcileError::Blocked("etcd: not connected".into()))
}

/// The Etcd phase of `plan`, in order.
pub async fn execute(
    run: &Run,
    plan: &Plan,
    observed: &crate::plan::Observed,
    progress: &Arc<Progress>,
) -> Result<(), ReconcileError> {
    let actions: Vec<&Action> = plan.phase(Phase::Etcd).collect();
    if actions.is_empty() {
        return Ok(());
    }
    let mut formed_new = false;
    for a in &actions {
        let Target::Etcd(name) = &a.target else {
            continue;
        };
        if let Kind::EtcdRemove { .. } = &a.kind {
            progress.note(&format!("etcd: {}", a.summary));
            remove(run, a, progress).await?;
            continue;
        }
        let m = run
            .spec
            .etcd
            .members
            .iter()
            .find(|m| &m.name == name)
            .ok_or_else(|| step_error(name, "find", "not in the spec"))?;
        let session = run
            .sessions
            .etcd_ok
            .get(name)
            .ok_or_else(|| step_error(name, "connect", "its host is not reachable"))?;
        progress.note(&format!("etcd: {}", a.summary));
        match &a.kind {
            Kind::EtcdInstall => member::install(session, run.spec.postgres.apt_proxy.as_deref())
                .await
                .map_err(|e| step_error(name, "install etcd", e))?,
            Kind::EtcdStart { new_cluster: true } => {
                let initial: Vec<(String, String)> = run
                    .spec
                    .etcd
                    .members
                    .iter()
                    .map(|m| (m.name.clone(), m.peer_url()))
                    .collect();
                member::start(
                    session,
                    run.spec.agent.service,
                    m,
                    &run.spec.cluster,
                    &initial,
                    true,
                )
                .await
                .map_err(|e| step_error(name, "start etcd", e))?;
                formed_new = true;
            }
            Kind::EtcdStart { new_cluster: false } => {
                // A member with data ignores the initial cluster (and when every member
                // stopped, nothing can list it); one without takes the members etcd lists
                // now, or does not start.
                let has_data = observed
                    .managed_etcd
                    .as_ref()
                    .and_then(|o| o.hosts.get(name))
                    .is_some_and(
                        |h| matches!(h, crate::plan::etcd::EtcdHost::Reachable(f) if f.data),
                    );
                let initial = match initial_cluster(run, m).await {
                    Ok(i) => i,
                    Err(_) if has_data => vec![(m.name.clone(), m.peer_url())],
                    Err(e) => return Err(e),
                };
                member::start(
                    session,
                    run.spec.agent.service,
                    m,
                    &run.spec.cluster,
                    &initial,
                    false,
                )
                .await
                .map_err(|e| step_error(name, "start etcd", e))?;
            }
            Kind::EtcdAdd => add(run, session, m, progress).await?,
            _ => {}
        }
    }
    if formed_new {
        wait_until(run, "the new etcd cluster to answer", |members| {
            run.spec.etcd.members.iter().all(|m| {
                members
                    .iter()
                    .any(|c| c.name == m.name && c.peer_urls.contains(&m.peer_url()))
            })
        })
        .await?;
    }
    Ok(())
}

/// The members etcd lists now as `name=peer URL` pairs, every peer URL of every member:
/// etcd refuses to join with an initial cluster of another size. A member added but not
/// started has no name yet: `m`'s when it is that one, its id otherwise (names only have to
/// be unique here).
async fn initial_cluster(
    run: &Run,
    m: &EtcdMemberSpec,
) -> Result<Vec<(String, String)>, ReconcileError> {
    let listed = dcs(run)?
        .cluster_members()
        .await
        .map_err(|e| step_error(&m.name, "member list (for its initial cluster)", e))?;
    Ok(initial_of(&listed, m))
}

fn initial_of(
    listed: &[crate::dcs::membership::ClusterMember],
    m: &EtcdMemberSpec,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for c in listed {
        let name = if c.peer_urls.contains(&m.peer_url()) {
            m.name.clone()
        } else {
            crate::plan::etcd::listed_name(c)
        };
        out.extend(c.peer_urls.iter().map(|u| (name.clone(), u.clone())));
    }
    if !out.iter().any(|(n, _)| n == &m.name) {
        out.push((m.name.clone(), m.peer_url()));
    }
    out
}

/// `member add`, start it with the cluster as listed, and wait until it has joined (etcd
/// lists it by name): the next change waits for this one.
async fn add(
    run: &Run,
    session: &crate::ssh::Session,
    m: &EtcdMemberSpec,
    progress: &Arc<Progress>,
) -> Result<(), ReconcileError> {
    let d = dcs(run)?;
    // An add whose reply was lost took effect all the same: never add one peer URL twice.
    let listed = d
        .cluster_members()
        .await
        .map_err(|e| step_error(&m.name, "member list", e))?;
    if !listed.iter().any(|c| c.peer_urls.contains(&m.peer_url())) {
        d.add_cluster_member(&m.peer_url())
            .await
            .map_err(|e| step_error(&m.name, "member add", e))?;
    }
    let initial = initial_cluster(run, m).await?;
    member::start(
        session,
        run.spec.agent.service,
        m,
        &run.spec.cluster,
        &initial,
        false,
    )
    .await
    .map_err(|e| step_error(&m.name, "start etcd", e))?;
    wait_until(run, &format!("etcd member {} to join", m.name), |members| {
        members
            .iter()
            .any(|c| c.name == m.name && c.peer_urls.contains(&m.peer_url()))
    })
    .await?;
    progress.note(&format!("etcd: member {} joined", m.name));
    Ok(())
}

/// `member remove` (etcd refuses one that would cost the cluster its quorum); a removed
/// member's process stops by itself. Then its data is set aside if its host is the spec's.
pub async fn remove(
    run: &Run,
    action: &Action,
    progress: &Arc<Progress>,
) -> Result<(), ReconcileError> {
    let Kind::EtcdRemove { id, peer_urls } = &action.kind else {
        return Ok(());
    };
    let name = match &action.target {
        Target::Etcd(n) => n.clone(),
        _ => format!("{id:x}"),
    };
    let d = dcs(run)?;
    // A member that answers leaves only once every member of the spec has joined and
    // answers: a member added but never started would otherwise count for nothing once the
    // old one is gone. (A dead one is removed first, with nothing to wait for.)
    if action.phase == Phase::Destroy {
        let listed = d
            .cluster_members()
            .await
            .map_err(|e| step_error(&name, "member list", e))?;
        for m in &run.spec.etcd.members {
            let joined = listed
                .iter()
                .any(|c| c.name == m.name && c.peer_urls.contains(&m.peer_url()));
            if !joined || !d.member_answers(&m.client_url(), d.timeout()).await {
                return Err(ReconcileError::Blocked(format!(
                    "etcd member {name} stays: {} has not joined or does not answer on {}; apply again once it does",
                    m.name,
                    m.client_url()
                )));
            }
        }
    }
    if let Err(e) = d.remove_cluster_member(*id).await {
        // The reply may be lost while the removal took effect: the list says.
        let still = d
            .cluster_members()
            .await
            .map(|l| l.iter().any(|c| c.id == *id))
            .unwrap_or(true);
        if still {
            return Err(step_error(&name, "member remove", e));
        }
    }
    wait_until(run, &format!("etcd member {name} to leave"), |members| {
        !members.iter().any(|c| c.id == *id)
    })
    .await?;
    progress.note(&format!(
        "etcd: member {name} ({}) removed",
        peer_urls.join(", ")
    ));
    retire_removed(run, &name, peer_urls, progress).await;
    Ok(())
}

/// A removed member's host, reached with the spec's default SSH settings (it left the
/// spec): its unit disabled (a removed etcd exits, and `Restart=always` would start it again
/// and again), its data set aside under the default folder. Best effort: an unreachable host
/// is only reported.
async fn retire_removed(run: &Run, name: &str, peer_urls: &[String], progress: &Arc<Progress>) {
    let Some((address, peer_port)) = peer_urls.first().and_then(|u| host_port(u)) else {
        return;
    };
    let m = EtcdMemberSpec {
        name: name.to_string(),
        address,
        client_port: 2379,
        peer_port,
        dir: format!("/var/lib/citus-reconcile/etcd/{}-{name}", run.spec.cluster),
        ssh: run.spec.ssh_defaults.clone(),
    };
    // Its address is etcd's content: only a host whose key is known already (one the spec
    // named once), never one met for the first time.
    let options = crate::ssh::Options {
        accept_new_host_keys: false,
        ..Default::default()
    };
    match crate::ssh::Session::connect(&crate::ssh::Target::of_etcd(&m), options).await {
        Ok(s) => {
            if let Err(e) = member::retire(&s, &m, &run.spec.cluster).await {
                progress.note(&format!("etcd member {name}: could not stop it: {e}"));
            }
            s.close().await;
        }
        Err(e) => progress.note(&format!(
            "etcd member {name}: its host is not reachable ({e}); it stops by itself once removed"
        )),
    }
}

/// `http://host:port` → (host, port).
fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    Some((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port.parse().ok()?,
    ))
}

/// Poll the member list until `done` holds, for at most `member::START_TIMEOUT`.
async fn wait_until(
    run: &Run,
    what: &str,
    done: impl Fn(&[crate::dcs::membership::ClusterMember]) -> bool,
) -> Result<(), ReconcileError> {
    let d = dcs(run)?;
    let deadline = Instant::now() + member::START_TIMEOUT;
    loop {
        let last = match d.cluster_members().await {
            Ok(members) if done(&members) => return Ok(()),
            Ok(members) => members
                .iter()
                .map(|c| {
                    if c.name.is_empty() {
                        format!("{:x} (not started)", c.id)
                    } else {
                        c.name.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(ReconcileError::Timeout(format!(
                "waited {} s for {what}; last seen: {last}",
                member::START_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::membership::ClusterMember;

    fn member(name: &str, octet: u8) -> EtcdMemberSpec {
        EtcdMemberSpec {
            name: name.into(),
            address: format!("10.0.0.{octet}"),
            client_port: 2379,
            peer_port: 2380,
            dir: format!("/e/{name}"),
            ssh: crate::spec::model::SshSpec {
                user: "root".into(),
                port: 22,
                identity_file: None,
                known_hosts: "/k".into(),
            },
        }
    }

    fn listed(id: u64, name: &str, peers: &[&str]) -> ClusterMember {
        ClusterMember {
            id,
            name: name.into(),
            peer_urls: peers.iter().map(|p| p.to_string()).collect(),
            client_urls: vec![],
            learner: false,
            answers: None,
        }
    }

    #[test]
    fn the_initial_cluster_names_every_member_and_peer_url() {
        let e4 = member("e4", 4);
        let pairs = |v: Vec<(String, String)>| -> Vec<String> {
            v.into_iter().map(|(n, u)| format!("{n}={u}")).collect()
        };
        let cases: Vec<(&str, Vec<ClusterMember>, Vec<&str>)> = vec![
            (
                "added, not started yet: its own name",
                vec![
                    listed(1, "e1", &["http://10.0.0.1:2380"]),
                    listed(0x2a, "", &["http://10.0.0.4:2380"]),
                ],
                vec!["e1=http://10.0.0.1:2380", "e4=http://10.0.0.4:2380"],
            ),
            (
                "another unstarted member keeps its place under its id; two peer URLs both listed",
                vec![
                    listed(1, "e1", &["http://10.0.0.1:2380", "http://10.1.0.1:2380"]),
                    listed(0x2b, "", &["http://10.0.0.9:2380"]),
                    listed(0x2a, "", &["http://10.0.0.4:2380"]),
                ],
                vec![
                    "e1=http://10.0.0.1:2380",
                    "e1=http://10.1.0.1:2380",
                    "2b=http://10.0.0.9:2380",
                    "e4=http://10.0.0.4:2380",
                ],
            ),
            (
                "not listed at all: itself added at the end",
                vec![listed(1, "e1", &["http://10.0.0.1:2380"])],
                vec!["e1=http://10.0.0.1:2380", "e4=http://10.0.0.4:2380"],
            ),
        ];
        for (what, members, want) in cases {
            assert_eq!(pairs(initial_of(&members, &e4)), want, "{what}");
        }
    }
}
