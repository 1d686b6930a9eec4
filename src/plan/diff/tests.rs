//! Table tests of `diff`: a desired state, an observed state, the expected action lines.

use std::collections::BTreeMap;

use super::*;
use crate::citus::metadata::{AuthinfoRow, NodeRow};
use crate::dcs::keys::MemberInfo;
use crate::plan::model::{EtcdObserved, GroupObserved, PackageState};
use crate::spec::secret::Secret;

const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn host(name: &str, group: u32, address: &str) -> HostDesired {
    HostDesired {
        name: name.into(),
        group,
        address: address.into(),
        pg_port: 5432,
        pg_major: 15,
        install: InstallMode::None,
        packages: vec!["postgresql-15".into()],
        extra_packages: vec![],
        pgdg: false,
        citus_package: None,
        citus_repository: None,
        service: Service::Process,
        agent_config_sha256: format!("cfg-{name}"),
        agent_config_redacted: format!("member: {name}\npassword: <redacted>\n"),
        secret_digests: digests("s3cret", "r3pl"),
        postgresql_conf: "port = '5432'\n".into(),
    }
}

fn digests(superuser: &str, replication: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("superuser".to_string(), format!("d-{superuser}")),
        ("replication".to_string(), format!("d-{replication}")),
    ])
}

/// What a primary stores for the lab's two roles with these passwords.
fn verifiers(superuser: &str, replication: &str) -> BTreeMap<String, String> {
    let v =
        |p: &str| crate::postgres::scram::verifier(p, b"0123456789abcdef", 16).unwrap_or_default();
    BTreeMap::from([
        ("postgres".to_string(), v(superuser)),
        ("replicator".to_string(), v(replication)),
    ])
}

/// Two groups: coordinator c1 (+ c2), worker w1.
fn desired() -> Desired {
    let hosts = [
        host("c1", 0, "10.0.0.11"),
        host("c2", 0, "10.0.0.12"),
        host("w1", 1, "10.0.0.21"),
    ];
    Desired {
        cluster: "t".into(),
        groups: BTreeMap::from([(0, vec!["c1".into(), "c2".into()]), (1, vec!["w1".into()])]),
        hosts: hosts.into_iter().map(|h| (h.name.clone(), h)).collect(),
        binary_sha256: SHA.into(),
        secondaries: false,
        rebalance: false,
        superuser: "postgres".into(),
        authinfo: Some(AuthinfoRow {
            nodeid: 0,
            rolename: "postgres".into(),
            authinfo: Secret::new("password=s3cret"),
        }),
        pooler_port: None,
        role_passwords: BTreeMap::from([
            ("postgres".to_string(), Secret::new("s3cret")),
            ("replicator".to_string(), Secret::new("r3pl")),
        ]),
        etcd_members: vec![],
        etcd_install: InstallMode::None,
    }
}

/// A host as it is after a successful apply.
fn converged_facts(d: &Desired, name: &str) -> HostFacts {
    let h = &d.hosts[name];
    HostFacts {
        os: "debian-12".into(),
        codename: Some("bookworm".into()),
        repositories: BTreeMap::new(),
        login_user: "root".into(),
        apt: true,
        postgres_version: Some("postgres (PostgreSQL) 15.18".into()),
        citus_available: true,
        pgbouncer_available: true,
        data_dir: DataDirState::Initialized,
        data_major: Some(15),
        sysid: None,
        agent_binary_sha256: Some(SHA.into()),
        agent_config_sha256: Some(h.agent_config_sha256.clone()),
        agent_config_redacted: Some(h.agent_config_redacted.clone()),
        secret_digests: h.secret_digests.clone(),
        postgres_ready: true,
        postgresql_conf: Some(h.postgresql_conf.clone()),
        alter_system: vec![],
        agent_pid: Some(100),
        unit_installed: false,
        unit_state: None,
        packages: BTreeMap::new(),
    }
}

fn member(role: &str, state: &str, host: &str) -> MemberInfo {
    MemberInfo {
        role: role.into(),
        state: state.into(),
        host: host.into(),
        port: 5432,
        ..Default::default()
    }
}

fn node(id: i32, g: i32, host: &str) -> NodeRow {
    NodeRow {
        nodeid: id,
        groupid: g,
        nodename: host.into(),
        nodeport: 5432,
        noderole: "primary".into(),
        isactive: true,
        shouldhaveshards: g != 0,
        hasmetadata: true,
        metadatasynced: true,
    }
}

fn converged(d: &Desired) -> Observed {
    let hosts = d
        .hosts
        .keys()
        .map(|n| (n.clone(), HostObserved::Reachable(converged_facts(d, n))))
        .collect();
    let g0 = GroupObserved {
        leader: Some("c1".into()),
        initialize: Some("1".into()),
        members: BTreeMap::from([
            ("c1".into(), member("primary", "running", "10.0.0.11")),
            ("c2".into(), member("replica", "streaming", "10.0.0.12")),
        ]),
    };
    let g1 = GroupObserved {
        leader: Some("w1".into()),
        initialize: Some("2".into()),
        members: BTreeMap::from([("w1".into(), member("primary", "running", "10.0.0.21"))]),
    };
    let auth = vec![AuthinfoRow {
        nodeid: 0,
        rolename: "postgres".into(),
        authinfo: Secret::new("password=s3cret"),
    }];
    // Every agent runs what its file says.
    let (mut g0, mut g1) = (g0, g1);
    for g in [&mut g0, &mut g1] {
        for (name, m) in g.members.iter_mut() {
            if let Some(h) = d.hosts.get(name) {
                m.config_sha256 = h.agent_config_sha256.clone();
            }
        }
    }
    Observed {
        managed_etcd: None,
        hosts,
        etcd: EtcdObserved {
            error: None,
            groups: BTreeMap::from([(0, g0), (1, g1)]),
            untrusted: Vec::new(),
        },
        nodes: Some(vec![node(1, 0, "10.0.0.11"), node(2, 1, "10.0.0.21")]),
        authinfo: BTreeMap::from([(0, auth.clone()), (1, auth)]),
        poolinfo: BTreeMap::new(),
        role_verifiers: BTreeMap::from([
            (0, verifiers("s3cret", "r3pl")),
            (1, verifiers("s3cret", "r3pl")),
        ]),
        metadata_error: None,
        parameter_contexts: BTreeMap::from([
            ("work_mem".to_string(), "user".to_string()),
            ("max_connections".to_string(), "postmaster".to_string()),
        ]),
        shards: None,
    }
}

fn bare(d: &Desired) -> Observed {
    let hosts = d
        .hosts
        .keys()
        .map(|n| {
            let f = HostFacts {
                postgres_version: Some("15".into()),
                citus_available: true,
                apt: true,
                ..Default::default()
            };
            (n.clone(), HostObserved::Reachable(f))
        })
        .collect();
    Observed {
        hosts,
        ..Default::default()
    }
}

/// Lines like "+ c1 upload agent binary (…)".
fn lines(plan: &Plan) -> Vec<String> {
    let mut v: Vec<String> = plan
        .actions
        .iter()
        .map(|a| {
            let t = match &a.target {
                Target::Host(h) => h.clone(),
                Target::Group(g) => format!("g{g}"),
                Target::Cluster => "cluster".into(),
                Target::Etcd(n) => format!("etcd {n}"),
            };
            let c = match a.change {
                Change::Add => "+",
                Change::Change => "~",
                Change::Destroy => "-",
            };
            format!("{c} {t} {}", a.summary)
        })
        .collect();
    v.extend(plan.errors.iter().map(|e| format!("! {e}")));
    v
}

fn check(d: &Desired, o: &Observed, expected: &[&str]) {
    let plan = diff(d, o);
    let got = lines(&plan);
    assert_eq!(got, expected, "\ngot:\n{}", got.join("\n"));
    let (add, change, destroy) =
        expected
            .iter()
            .filter(|l| !l.starts_with('!'))
            .fold((0, 0, 0), |(a, c, x), l| match &l[..1] {
                "+" => (a + 1, c, x),
                "~" => (a, c + 1, x),
                _ => (a, c, x + 1),
            });
    assert_eq!(
        (plan.summary.add, plan.summary.change, plan.summary.destroy),
        (add, change, destroy)
    );
}

#[test]
fn converged_cluster_has_an_empty_plan() {
    let d = desired();
    check(&d, &converged(&d), &[]);
}

#[test]
fn bare_hosts_get_everything() {
    let d = desired();
    check(
        &d,
        &bare(&d),
        &[
            "+ c1 upload agent binary (sha256 aaaaaaaaaaaa)",
            "+ c1 write agent configuration",
            "+ c2 upload agent binary (sha256 aaaaaaaaaaaa)",
            "+ c2 write agent configuration",
            "+ w1 upload agent binary (sha256 aaaaaaaaaaaa)",
            "+ w1 write agent configuration",
            "+ c1 start the agent",
            "+ c2 start the agent",
            "+ w1 start the agent",
            "+ c1 PostgreSQL: created by the agent (initdb or clone of the leader)",
            "+ c2 PostgreSQL: created by the agent (initdb or clone of the leader)",
            "+ w1 PostgreSQL: created by the agent (initdb or clone of the leader)",
            "+ g0 group 0: initialize (the first agent to win the initialize key runs initdb)",
            "+ g0 pg_dist_node: + coordinator (at its leader, once elected)",
            "+ g1 group 1: initialize (the first agent to win the initialize key runs initdb)",
            "+ g1 pg_dist_node: + group 1 primary (at its leader, once elected)",
        ],
    );
}

#[test]
fn adding_a_standby_touches_only_that_host() {
    let mut d = desired();
    let w2 = host("w2", 1, "10.0.0.22");
    d.hosts.insert("w2".into(), w2);
    if let Some(g) = d.groups.get_mut(&1) {
        g.push("w2".into());
    }
    let mut o = converged(&d);
    o.hosts.insert(
        "w2".into(),
        bare(&d)
            .hosts
            .remove("w2")
            .unwrap_or(HostObserved::Unreachable {
                error: String::new(),
            }),
    );
    check(
        &d,
        &o,
        &[
            "+ w2 upload agent binary (sha256 aaaaaaaaaaaa)",
            "+ w2 write agent configuration",
            "+ w2 start the agent",
            "+ w2 PostgreSQL: created by the agent (initdb or clone of the leader)",
        ],
    );
}

#[test]
fn changes_restart_agents_and_show_diffs() {
    let mut d = desired();
    d.binary_sha256 = "b".repeat(64);
    if let Some(h) = d.hosts.get_mut("w1") {
        h.agent_config_sha256 = "cfg-w1-new".into();
        h.agent_config_redacted = "member: w1\npassword: <redacted>\nmax_connections: 300\n".into();
        h.postgresql_conf = "port = '5432'\nmax_connections = '300'\n".into();
    }
    let plan = diff(&d, &converged(&desired()));
    let got = lines(&plan);
    assert!(
        got.contains(&"~ c1 replace agent binary (sha256 aaaaaaaaaaaa → bbbbbbbbbbbb)".to_string()),
        "{got:?}"
    );
    assert!(
        got.contains(
            &"~ c1 restart the agent (new binary); leads group 0: last, after a switchover to a streaming replica"
                .to_string()
        ),
        "{got:?}"
    );
    assert!(
        got.contains(
            &"~ w1 restart the agent (new binary and configuration); leads group 1, no streaming replica: in place, the group is down meanwhile"
                .to_string()
        ),
        "{got:?}"
    );
    let cfg = plan
        .actions
        .iter()
        .find(|a| a.kind == Kind::WriteAgentConfig)
        .and_then(|a| a.diff.clone())
        .unwrap_or_default();
    assert!(cfg.contains("+max_connections: 300"), "{cfg}");
    let conf = plan
        .actions
        .iter()
        .find(|a| a.kind == Kind::PostgresConf)
        .and_then(|a| a.diff.clone())
        .unwrap_or_default();
    assert!(conf.contains("+max_connections = '300'"), "{conf}");
}

#[test]
fn secret_only_changes_say_so_without_showing_them() {
    let mut d = desired();
    if let Some(h) = d.hosts.get_mut("c2") {
        h.agent_config_sha256 = "rotated".into();
    }
    check(
        &d,
        &converged(&desired()),
        &[
            "~ c2 update agent configuration (secret values changed; not shown)",
            // Only secrets: taken without a restart.
            "~ c2 reload the agent (new secrets; PostgreSQL keeps running)",
        ],
    );
    let mut d = desired();
    d.authinfo = Some(AuthinfoRow {
        nodeid: 0,
        rolename: "postgres".into(),
        authinfo: Secret::new("password=rotated"),
    });
    let plan = diff(&d, &converged(&desired()));
    let text = format!("{:?}{}", lines(&plan), super::super::render::json(&plan));
    assert!(
        !text.contains("rotated") && !text.contains("s3cret"),
        "{text}"
    );
    assert!(
        text.contains("pg_dist_authinfo: ~ (0, postgres) password changed"),
        "{text}"
    );
}

#[test]
fn failover_moves_the_worker_row_and_stopped_members_come_up() {
    let d = desired();
    let mut o = converged(&d);
    if let Some(g1) = o.etcd.groups.get_mut(&1) {
        g1.leader = None;
    }
    // No leader in group 1: its row stays; nothing is proposed until there is one.
    check(&d, &o, &[]);
    let mut o = converged(&d);
    if let Some(g0) = o.etcd.groups.get_mut(&0) {
        g0.leader = Some("c2".into());
        g0.members
            .insert("c2".into(), member("primary", "running", "10.0.0.12"));
        g0.members
            .insert("c1".into(), member("replica", "stopped", "10.0.0.11"));
    }
    check(
        &d,
        &o,
        &[
            "~ c1 PostgreSQL: started by the agent",
            "~ g0 pg_dist_node: ~ node 1 (group 0 primary) 10.0.0.11:5432 → 10.0.0.12:5432",
        ],
    );
}

#[test]
fn removed_hosts_and_groups_are_destroys() {
    let mut d = desired();
    d.hosts.remove("c2");
    d.groups.insert(0, vec!["c1".into()]);
    d.hosts.remove("w1");
    d.groups.remove(&1);
    let mut o = converged(&desired());
    o.hosts.remove("c2");
    o.hosts.remove("w1");
    o.authinfo.remove(&1);
    check(
        &d,
        &o,
        &[
            "- g0 member c2 (10.0.0.12): stop its agent, set its data directory aside (never deleted), delete its etcd keys",
            "- g1 group 1: move its shards to the other groups (citus_rebalance_start drain_only), stop its agents and set their data directories aside (never deleted), delete its etcd keys, remove its rows from pg_dist_node",
        ],
    );
}

#[test]
fn blockers_are_errors() {
    let d = desired();
    let mut o = converged(&d);
    o.hosts.insert(
        "c2".into(),
        HostObserved::Unreachable {
            error: "c2: cannot connect to 10.0.0.12:22: timed out".into(),
        },
    );
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.postgres_version = None;
        f.citus_available = false;
    }
    check(
        &d,
        &o,
        &[
            "! c2: cannot connect to 10.0.0.12:22: timed out",
            "! w1: no PostgreSQL binaries in the spec's bin_dir (install: none)",
            "! w1: the Citus extension is not installed (no citus.control); install it or set citus.package with install: apt",
        ],
    );
    let mut o = converged(&d);
    o.etcd.error = Some("timed out".into());
    check(&d, &o, &["! etcd: timed out"]);
    let mut o = converged(&d);
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.sysid = Some("999".into());
    }
    check(
        &d,
        &o,
        &[
            "! w1: the data directory belongs to another cluster (system identifier 999, group 1 has 2); move it away to let the member be cloned",
        ],
    );
}

#[test]
fn apt_installs_what_is_missing() {
    let mut d = desired();
    for h in d.hosts.values_mut() {
        h.install = InstallMode::Apt;
        h.citus_package = Some("postgresql-15-citus-13.2".into());
    }
    let mut o = converged(&d);
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.postgres_version = None;
        f.citus_available = false;
        // The host's package lists know PostgreSQL, not yet Citus (its repository is new).
        f.packages.insert(
            "postgresql-15".into(),
            PackageState {
                candidate: Some("15.14-0+deb12u1".into()),
                ..Default::default()
            },
        );
    }
    check(
        &d,
        &o,
        &[
            "+ w1 install packages: postgresql-15 15.14-0+deb12u1, postgresql-15-citus-13.2 (not in the host's package lists yet) (then held, so that no unattended upgrade restarts them; no `main` cluster)",
        ],
    );
    let plan = diff(&d, &o);
    assert!(matches!(
        &plan.actions[0].kind,
        Kind::InstallPackages { versions, .. }
            if versions.get("postgresql-15").map(String::as_str) == Some("15.14-0+deb12u1")
            && versions.len() == 1
    ));
}

#[test]
fn extra_packages_are_installed_beside_a_running_postgresql() {
    let mut d = desired();
    for h in d.hosts.values_mut() {
        h.install = InstallMode::Apt;
        h.packages = vec!["postgresql-15".into(), "postgresql-15-hll".into()];
        h.extra_packages = vec!["postgresql-15-hll".into()];
    }
    let held = |v: &str| PackageState {
        installed: Some(v.into()),
        candidate: None,
        held: true,
    };
    let mut o = converged(&d);
    for f in o.hosts.values_mut() {
        if let HostObserved::Reachable(f) = f {
            f.packages = BTreeMap::from([
                ("postgresql-15".into(), held("15.14-0+deb12u1")),
                ("postgresql-15-hll".into(), held("2.17-1+b1")),
            ]);
        }
    }
    check(&d, &o, &[]);
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.packages.insert(
            "postgresql-15-hll".into(),
            PackageState {
                candidate: Some("2.17-1+b1".into()),
                ..Default::default()
            },
        );
    }
    check(
        &d,
        &o,
        &[
            "+ w1 install packages: postgresql-15-hll 2.17-1+b1 (then held, so that no unattended upgrade restarts them; no `main` cluster)",
        ],
    );
}

#[test]
fn the_postgresql_projects_repository_comes_before_its_packages() {
    use crate::plan::repository as repo;
    let mut d = desired();
    for h in d.hosts.values_mut() {
        h.install = InstallMode::Apt;
        h.pgdg = true;
    }
    let mut o = converged(&d);
    let current = repo::sources_sha256(&repo::pgdg_sources("bookworm"));
    for f in o.hosts.values_mut() {
        if let HostObserved::Reachable(f) = f {
            f.repositories.insert("pgdg".into(), current.clone());
        }
    }
    check(&d, &o, &[]);
    let add = "+ w1 add the PostgreSQL project's apt repository (http://apt.postgresql.org/pub/repos/apt bookworm-pgdg), signed by key B97B0AFCAA1A47F044F244A07FCC7D46ACCC4CF8 as Debian's postgresql-common ships it (checked against the pinned fingerprint)";
    // A bare host: the repository first, then PostgreSQL from it.
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.repositories.clear();
        f.postgres_version = None;
    }
    let got = lines(&diff(&d, &o));
    let at = |prefix: &str| got.iter().position(|l| l.starts_with(prefix));
    assert_eq!(at(add), Some(0), "{got:#?}");
    assert!(
        at("+ w1 install packages: postgresql-15").is_some_and(|i| i > 0),
        "{got:#?}"
    );
    // A file edited by hand is written again; a host without a usable codename is an error.
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.postgres_version = Some("postgres (PostgreSQL) 15.18".into());
        f.repositories.insert("pgdg".into(), "0".repeat(64));
    }
    assert!(
        lines(&diff(&d, &o))
            .iter()
            .any(|l| l.starts_with("~ w1 add the PostgreSQL project's apt repository"))
    );
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.codename = Some("bookworm\nURIs: http://evil".into());
    }
    check(
        &d,
        &o,
        &[
            "! w1: postgres.repository: pgdg needs the host's release codename (VERSION_CODENAME in /etc/os-release), and it has none apt could use",
        ],
    );
}

#[test]
fn citus_repository_is_added_with_its_pinned_key() {
    use crate::plan::repository::{self as repo, CitusRepository};
    let mut d = desired();
    let r = CitusRepository {
        url: "https://repos.citusdata.com/community".into(),
        key_url: "https://repos.citusdata.com/community/gpgkey".into(),
        fingerprint: "A".repeat(40),
    };
    for h in d.hosts.values_mut() {
        h.install = InstallMode::Apt;
        h.citus_repository = Some(r.clone());
    }
    let mut o = converged(&d);
    let current = repo::sources_sha256(&repo::citus_sources(&r, "debian", "bookworm"));
    for f in o.hosts.values_mut() {
        if let HostObserved::Reachable(f) = f {
            f.repositories.insert("citus".into(), current.clone());
        }
    }
    check(&d, &o, &[]);
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.repositories.clear();
    }
    check(
        &d,
        &o,
        &[&format!(
            "+ w1 add Citus's apt repository (https://repos.citusdata.com/community/debian/ bookworm), its key downloaded from https://repos.citusdata.com/community/gpgkey and trusted only as {}",
            "A".repeat(40)
        )],
    );
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.os = "rocky-9".into();
    }
    check(
        &d,
        &o,
        &[
            "! w1: citus.repository needs a Debian or Ubuntu host with a release codename (found \"rocky-9\", codename Some(\"bookworm\"))",
        ],
    );
}

#[test]
fn installed_packages_that_lost_their_hold_are_held_again() {
    let mut d = desired();
    for h in d.hosts.values_mut() {
        h.citus_package = Some("postgresql-15-citus-13.2".into());
    }
    let installed = |v: &str, held: bool| PackageState {
        installed: Some(v.into()),
        candidate: None,
        held,
    };
    let mut o = converged(&d);
    for f in o.hosts.values_mut() {
        if let HostObserved::Reachable(f) = f {
            f.packages = BTreeMap::from([
                ("postgresql-15".into(), installed("15.14-0+deb12u1", true)),
                (
                    "postgresql-15-citus-13.2".into(),
                    installed("13.2.0.citus-1", true),
                ),
            ]);
        }
    }
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("c2") {
        f.packages.insert(
            "postgresql-15-citus-13.2".into(),
            installed("13.2.0.citus-1", false),
        );
    }
    // install: none: the operator's packages are the operator's business.
    check(&d, &o, &[]);
    for h in d.hosts.values_mut() {
        h.install = InstallMode::Apt;
    }
    check(
        &d,
        &o,
        &[
            "~ c2 hold packages: postgresql-15-citus-13.2 13.2.0.citus-1 (installed but not held: an unattended upgrade could restart PostgreSQL behind the agent)",
        ],
    );
    // A package that is not installed is installed (and held then), not held now.
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("c2") {
        f.packages.remove("postgresql-15-citus-13.2");
    }
    check(&d, &o, &[]);
}

#[test]
fn plan_text_snapshot() {
    let d = desired();
    console::set_colors_enabled(false);
    let mut o = converged(&d);
    if let Some(g0) = o.etcd.groups.get_mut(&0) {
        g0.leader = Some("c2".into());
        g0.members
            .insert("c2".into(), member("primary", "running", "10.0.0.12"));
    }
    let mut d2 = desired();
    if let Some(h) = d2.hosts.get_mut("c1") {
        h.agent_config_sha256 = "new".into();
        h.agent_config_redacted = "member: c1\npassword: <redacted>\nttl: 20\n".into();
    }
    let plan = diff(&d2, &o);
    insta::assert_snapshot!(super::super::render::text(&plan, &d2));
    insta::assert_snapshot!("diff_only", super::super::render::diff_only(&plan));
}

#[test]
fn new_passwords_are_a_reload_and_name_what_changes_never_a_value() {
    // The spec's passwords changed; hosts still hold the old ones.
    let old = desired();
    let mut d = desired();
    d.role_passwords
        .insert("postgres".into(), Secret::new("n3w"));
    d.authinfo = Some(AuthinfoRow {
        nodeid: 0,
        rolename: "postgres".into(),
        authinfo: Secret::new("password=n3w"),
    });
    for h in d.hosts.values_mut() {
        h.agent_config_sha256 = format!("{}-new", h.agent_config_sha256);
        h.secret_digests = digests("n3w", "r3pl");
    }
    let o = converged(&old);
    let plan = diff(&d, &o);
    let got = lines(&plan);
    for h in ["c1", "c2", "w1"] {
        assert!(got.contains(&format!("~ {h} update agent configuration: new superuser password (values not shown), new passfile")), "{got:#?}");
        assert!(
            got.contains(&format!(
                "~ {h} reload the agent (new secrets; PostgreSQL keeps running)"
            )),
            "{got:#?}"
        );
    }
    for g in [0, 1] {
        assert!(got.contains(&format!("~ g{g} role postgres: new password on the group's primary (a SCRAM verifier; standbys replicate it)")), "{got:#?}");
        assert!(
            got.contains(&format!(
                "~ g{g} pg_dist_authinfo: ~ (0, postgres) password changed"
            )),
            "{got:#?}"
        );
    }
    assert!(
        !got.iter()
            .any(|l| l.contains("replicator") || l.contains("restart")),
        "{got:#?}"
    );
    let json = serde_json::to_string(&plan).unwrap_or_default();
    let text = got.join("\n");
    for secret in ["n3w", "s3cret"] {
        assert!(
            !json.contains(secret) && !text.contains(secret),
            "{secret} shown"
        );
    }

    // Once the agents have applied them: nothing left.
    let mut after = converged(&d);
    for v in after.role_verifiers.values_mut() {
        *v = verifiers("n3w", "r3pl");
    }
    let auth = vec![AuthinfoRow {
        nodeid: 0,
        rolename: "postgres".into(),
        authinfo: Secret::new("password=n3w"),
    }];
    after.authinfo = BTreeMap::from([(0, auth.clone()), (1, auth)]);
    check(&d, &after, &[]);
}

#[test]
fn other_configuration_changes_still_restart() {
    let old = desired();
    let mut d = desired();
    for h in d.hosts.values_mut() {
        h.agent_config_sha256 = format!("{}-new", h.agent_config_sha256);
        h.agent_config_redacted = format!("{}ttl: 10\n", h.agent_config_redacted);
    }
    let got = lines(&diff(&d, &converged(&old)));
    assert!(
        got.contains(&"~ c2 restart the agent (new configuration); rolling: one member at a time, each streaming again before the next".to_string()),
        "{got:#?}"
    );
    assert!(!got.iter().any(|l| l.contains("reload")), "{got:#?}");
}

#[test]
fn an_agent_running_an_older_configuration_than_its_file_restarts() {
    // `apply` wrote the file, then stopped before the restart; the agent says what it runs.
    let d = desired();
    let mut o = converged(&d);
    let same = |o: &mut Observed, sha: &str| {
        if let Some(m) = o
            .etcd
            .groups
            .get_mut(&0)
            .and_then(|g| g.members.get_mut("c2"))
        {
            m.config_sha256 = sha.into();
        }
    };
    same(&mut o, "cfg-c2");
    check(&d, &o, &[]);
    same(&mut o, "cfg-c2-before");
    check(
        &d,
        &o,
        &[
            "~ c2 restart the agent (it runs an older configuration than its file); rolling: one member at a time, each streaming again before the next",
        ],
    );
}

#[test]
fn parameters_a_reload_takes_are_reloaded_and_the_rest_restart() {
    // Real agent configurations on both sides, differing in parameters only.
    let with = |params: &[(&str, &str)]| {
        let mut c = crate::agent::config::sample();
        for (k, v) in params {
            c.postgres.parameters.insert((*k).into(), (*v).into());
        }
        c.render_redacted()
    };
    // (case, parameters in the new configuration, the restart/reload line)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "reload only",
            vec![("work_mem", "8MB")],
            "~ w1 reload: work_mem (PostgreSQL takes them with a reload; nothing restarts)",
        ),
        (
            "one needs a restart",
            vec![("work_mem", "8MB"), ("max_connections", "60")],
            "~ w1 restart the agent (new configuration: restart for max_connections; reload would do for work_mem); leads group 1, no streaming replica: in place, the group is down meanwhile",
        ),
        (
            "unknown context: restart",
            vec![("citus.something", "on")],
            "~ w1 restart the agent (new configuration: restart for citus.something); leads group 1, no streaming replica: in place, the group is down meanwhile",
        ),
    ];
    for (name, params, want) in cases {
        let old = desired();
        let mut o = converged(&old);
        if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
            f.agent_config_redacted = Some(with(&[]));
        }
        let mut d = desired();
        if let Some(h) = d.hosts.get_mut("w1") {
            h.agent_config_sha256 = "cfg-w1-new".into();
            h.agent_config_redacted = with(&params);
        }
        let plan = diff(&d, &o);
        let got = lines(&plan);
        assert!(got.contains(&want.to_string()), "{name}: {got:#?}");
        let reloads = plan
            .actions
            .iter()
            .any(|a| matches!(a.kind, Kind::ReloadAgent { .. }));
        assert_eq!(reloads, name == "reload only", "{name}");
        // An agent that does not run what its file says (an apply stopped half way) gets a
        // restart, never a reload: the file may hold other changes.
        if let Some(m) = o
            .etcd
            .groups
            .get_mut(&1)
            .and_then(|g| g.members.get_mut("w1"))
        {
            m.config_sha256 = "cfg-w1-older".into();
        }
        let plan = diff(&d, &o);
        assert!(
            !plan
                .actions
                .iter()
                .any(|a| matches!(a.kind, Kind::ReloadAgent { .. })),
            "{name}: {:#?}",
            lines(&plan)
        );
    }
}

#[test]
fn lowering_what_standbys_need_restarts_the_primary_first() {
    let with = |mc: &str| {
        let mut c = crate::agent::config::sample();
        c.postgres
            .parameters
            .insert("max_connections".into(), mc.into());
        c.render_redacted()
    };
    let old = desired();
    let mut d = desired();
    for h in d.hosts.values_mut() {
        h.agent_config_sha256 = format!("{}-new", h.agent_config_sha256);
        h.agent_config_redacted = with("40");
    }
    let mut o = converged(&old);
    for (name, f) in o.hosts.iter_mut() {
        if let HostObserved::Reachable(f) = f {
            f.postgresql_conf = Some("port = '5432'\nmax_connections = '50'\n".into());
            f.agent_config_redacted = Some(with("50"));
        }
        if let Some(h) = d.hosts.get_mut(name) {
            h.postgresql_conf = "port = '5432'\nmax_connections = '40'\n".into();
        }
    }
    let plan = diff(&d, &o);
    let got = lines(&plan);
    for want in [
        "~ c1 restart the agent (new configuration: restart for max_connections); lowers max_connections 50 → 40, which standbys need at least as high as the primary: first its agent restarts PostgreSQL in place keeping the leadership (writes to group 0 fail meanwhile), then its replicas one at a time",
        "~ c2 restart the agent (new configuration: restart for max_connections); lowers max_connections 50 → 40: after the primary of group 0",
    ] {
        assert!(got.contains(&want.to_string()), "{got:#?}");
    }
    assert!(plan.actions.iter().any(|a| matches!(&a.kind, Kind::RestartAgent { lowered, .. } if lowered == &vec!["max_connections 50 → 40".to_string()])));
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    // With a new agent binary in the same apply: refused, saying how to proceed.
    d.binary_sha256 = "b".repeat(64);
    let plan = diff(&d, &o);
    assert!(
        plan.errors.iter().any(|e| e
            .starts_with("c1: lowering max_connections 50 → 40 together with other agent changes")),
        "{:?}",
        plan.errors
    );
}

fn shards(
    per_group: &[(u32, u32)],
    moves: u32,
    no_identity: &[&str],
) -> crate::plan::ShardsObserved {
    crate::plan::ShardsObserved {
        per_group: per_group.iter().copied().collect(),
        planned_moves: moves,
        without_replica_identity: no_identity.iter().map(|s| s.to_string()).collect(),
        running_job: None,
    }
}

#[test]
fn rebalance_is_planned_only_when_asked_and_says_how_shards_move() {
    let mut d = desired();
    let mut o = converged(&d);
    o.shards = Some(shards(&[(1, 32)], 10, &[]));
    // Off by default.
    check(&d, &o, &[]);
    d.rebalance = true;
    check(
        &d,
        &o,
        &[
            "~ cluster rebalance: 10 shard moves over 1 worker groups (citus_rebalance_start, shard_transfer_mode => force_logical: online: writes go on while shards move)",
        ],
    );
    // A table without replica identity: writes to each shard wait while it moves.
    o.shards = Some(shards(&[(1, 32)], 10, &["events"]));
    let got = lines(&diff(&d, &o));
    assert!(
        got[0].contains("block_writes: events has no replica identity"),
        "{got:?}"
    );
    // A new group not registered yet: the rebalance comes once it is.
    d.groups.insert(2, vec!["x1".into()]);
    d.hosts.insert("x1".into(), host("x1", 2, "10.0.0.31"));
    o.shards = Some(shards(&[(1, 32)], 0, &[]));
    let got = lines(&diff(&d, &o));
    assert!(
        got.iter()
            .any(|l| l.starts_with("~ cluster rebalance shards once group 2 is registered")),
        "{got:#?}"
    );
    // A job that runs is followed, not started again.
    o.shards = Some(crate::plan::ShardsObserved {
        running_job: Some(crate::plan::RebalanceJob {
            job_id: 7,
            state: "running".into(),
            done: 3,
            total: 10,
        }),
        ..shards(&[(1, 29), (2, 3)], 7, &[])
    });
    let got = lines(&diff(&d, &o));
    assert!(
        got.iter().any(
            |l| l == "~ cluster rebalance job 7 running (3 of 10 moves done): apply follows it"
        ),
        "{got:#?}"
    );
}

#[test]
fn a_group_leaving_the_spec_is_drained_then_removed() {
    let mut d = desired();
    let mut o = converged(&d);
    d.groups.remove(&1);
    d.hosts.remove("w1");
    o.hosts.remove("w1");
    o.shards = Some(shards(&[(1, 32)], 0, &[]));
    let got = lines(&diff(&d, &o));
    assert_eq!(
        got,
        vec![
            "- g1 group 1: move its 32 shards to the other groups (citus_rebalance_start drain_only, shard_transfer_mode => force_logical), stop its agents and set their data directories aside (never deleted), delete its etcd keys, remove its rows from pg_dist_node"
        ],
    );
}

#[test]
fn setup_drift_is_repaired_by_a_reload_of_the_group_primarys_agent() {
    let d = desired();
    let mut o = converged(&d);
    // Edited by hand: group 1's authinfo row, group 0's superuser password.
    o.authinfo.insert(
        1,
        vec![AuthinfoRow {
            nodeid: 0,
            rolename: "postgres".into(),
            authinfo: Secret::new("password=edited"),
        }],
    );
    if let Some(v) = o.role_verifiers.get_mut(&0) {
        *v = verifiers("edited", "r3pl");
    }
    check(
        &d,
        &o,
        &[
            "~ c1 reload the agent (it sets roles and pg_dist_authinfo again; PostgreSQL keeps running)",
            "~ w1 reload the agent (it sets roles and pg_dist_authinfo again; PostgreSQL keeps running)",
            "~ g0 role postgres: new password on the group's primary (a SCRAM verifier; standbys replicate it)",
            "~ g1 pg_dist_authinfo: ~ (0, postgres) password changed",
        ],
    );

    // A host whose agent restarts anyway gets no extra reload; one whose agent is not
    // running cannot take one.
    let mut d2 = desired();
    if let Some(h) = d2.hosts.get_mut("w1") {
        h.agent_config_sha256 = format!("{}-new", h.agent_config_sha256);
    }
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("c1") {
        f.agent_pid = None;
    }
    let got = lines(&diff(&d2, &o));
    assert_eq!(
        got.iter()
            .filter(|l| l.contains("sets roles and pg_dist_authinfo again"))
            .count(),
        0,
        "{got:#?}"
    );
}

#[test]
fn the_pooler_shows_as_pg_dist_poolinfo_rows_and_blocks_logical_moves() {
    use crate::citus::metadata::PoolinfoRow;
    let row = |id: i32, g: i32, host: &str, p: Option<&str>| PoolinfoRow {
        nodeid: id,
        groupid: Some(g),
        nodename: Some(host.into()),
        nodeport: Some(5432),
        poolinfo: p.map(str::to_string),
    };
    let mut d = desired();
    d.pooler_port = Some(6432);
    let mut o = converged(&d);
    let rows = vec![row(1, 0, "10.0.0.11", None), row(2, 1, "10.0.0.21", None)];
    o.poolinfo = BTreeMap::from([(0, rows.clone()), (1, rows)]);
    // Each primary's table gains the worker's row; the agents do it (no reload).
    check(
        &d,
        &o,
        &[
            "+ g0 pg_dist_poolinfo: + (2) port=6432 (Citus connects to that node through its PgBouncer)",
            "+ g1 pg_dist_poolinfo: + (2) port=6432 (Citus connects to that node through its PgBouncer)",
        ],
    );
    let done = vec![
        row(1, 0, "10.0.0.11", None),
        row(2, 1, "10.0.0.21", Some("port=6432")),
    ];
    o.poolinfo = BTreeMap::from([(0, done.clone()), (1, done.clone())]);
    check(&d, &o, &[]);
    // Shards move with writes blocked, and the plan says why.
    d.rebalance = true;
    o.shards = Some(shards(&[(1, 32)], 10, &[]));
    let got = lines(&diff(&d, &o));
    assert!(
        got.iter()
            .any(|l| l.contains("shard_transfer_mode => block_writes")
                && l.contains("PgBouncer (citus.pooler)")),
        "{got:#?}"
    );
    // The pooler leaves the spec: the rows go, through a reload of each primary's agent.
    d.rebalance = false;
    o.shards = None;
    d.pooler_port = None;
    check(
        &d,
        &o,
        &[
            "~ c1 reload the agent (it sets pg_dist_poolinfo again; PostgreSQL keeps running)",
            "~ w1 reload the agent (it sets pg_dist_poolinfo again; PostgreSQL keeps running)",
            "~ g0 pg_dist_poolinfo: - (2) port=6432",
            "~ g1 pg_dist_poolinfo: - (2) port=6432",
        ],
    );
}

#[test]
fn a_hand_edited_postgresql_conf_is_drift_only_on_a_running_server() {
    let d = desired();
    let edited = "port = '5432'\nwork_mem = '1GB'\n";
    let drift = vec![
        "~ w1 restart the agent (postgresql.conf drifted); leads group 1, no streaming replica: in place, the group is down meanwhile".to_string(),
        "~ w1 PostgreSQL parameters".to_string(),
    ];
    // (member state in etcd, the postmaster's pid file said ready, plan for w1)
    let cases: [(&str, bool, Vec<String>); 4] = [
        ("running", true, drift),
        // initdb's file, or a clone's copy of the leader's, read just before the agent
        // replaced it and started the server: the server's state in etcd is newer.
        ("running", false, vec![]),
        ("starting", true, vec![]),
        ("stopped", false, vec![]),
    ];
    for (state, ready, want) in cases {
        let mut o = converged(&d);
        if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
            f.postgresql_conf = Some(edited.into());
            f.postgres_ready = ready;
        }
        if let Some(m) = o
            .etcd
            .groups
            .get_mut(&1)
            .and_then(|g| g.members.get_mut("w1"))
        {
            m.state = state.into();
        }
        let got: Vec<String> = lines(&diff(&d, &o))
            .into_iter()
            .filter(|l| {
                l.starts_with("~ w1 PostgreSQL parameters") || l.starts_with("~ w1 restart")
            })
            .collect();
        assert_eq!(got, want, "state {state}, ready {ready}");
    }
}

#[test]
fn alter_system_settings_are_drift_that_a_reload_removes() {
    let d = desired();
    let mut o = converged(&d);
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.alter_system = vec!["primary_conninfo".into(), "work_mem".into()];
    }
    check(
        &d,
        &o,
        &[
            "~ w1 reload the agent (it removes ALTER SYSTEM settings; PostgreSQL keeps running)",
            "~ w1 remove ALTER SYSTEM settings that override the spec: primary_conninfo, work_mem (postgresql.auto.conf; values not shown)",
        ],
    );
    // With authinfo drift on the same host, one reload does both.
    o.authinfo.insert(
        1,
        vec![AuthinfoRow {
            nodeid: 0,
            rolename: "postgres".into(),
            authinfo: Secret::new("password=edited"),
        }],
    );
    let got = lines(&diff(&d, &o));
    assert!(
        got.contains(&"~ w1 reload the agent (it sets roles and pg_dist_authinfo again and removes ALTER SYSTEM settings; PostgreSQL keeps running)".to_string()),
        "{got:#?}"
    );
    // A member that is not up: nothing to say yet (it is being started).
    if let Some(m) = member_mut(&mut o, 1, "w1") {
        m.state = "starting".into();
    }
    let got = lines(&diff(&d, &o));
    assert!(!got.iter().any(|l| l.contains("ALTER SYSTEM")), "{got:#?}");
}

#[test]
fn an_agent_file_edited_by_hand_is_put_back_without_a_restart() {
    let d = desired();
    let mut o = converged(&d);
    // The agent runs the spec's configuration; only its file differs.
    if let Some(m) = member_mut(&mut o, 1, "w1") {
        m.config_sha256 = d.hosts["w1"].agent_config_sha256.clone();
    }
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.agent_config_sha256 = Some("edited".into());
    }
    let got = lines(&diff(&d, &o));
    assert!(
        got.iter()
            .any(|l| l.starts_with("~ w1 update agent configuration"))
            && !got.iter().any(|l| l.contains("restart")),
        "{got:#?}"
    );
}

#[test]
fn a_major_version_change_is_refused_not_attempted() {
    let mut d = desired();
    for h in d.hosts.values_mut() {
        h.pg_major = 16;
    }
    let plan = diff(&d, &converged(&d));
    assert!(
        plan.actions
            .iter()
            .all(|a| a.target != Target::Host("w1".into()))
    );
    assert!(
        plan.errors.iter().any(|e| e.starts_with(
            "w1: the data directory is PostgreSQL 15 but the spec says postgres.version 16"
        ) && e.contains("not supported")),
        "{:#?}",
        plan.errors
    );
}

#[test]
fn a_pending_restart_is_shown_and_rolled_unless_something_else_takes_care_of_it() {
    let d = desired();
    let mut o = converged(&d);
    if let Some(m) = member_mut(&mut o, 1, "w1") {
        m.pending_restart = vec!["shared_buffers".into()];
    }
    let got = lines(&diff(&d, &o));
    assert!(
        got.iter()
            .any(|l| l.starts_with("~ w1 restart the agent (pending restart: shared_buffers)")),
        "{got:#?}"
    );
    assert!(
        got.contains(&"~ w1 pending restart: shared_buffers (PostgreSQL runs other values than its files say)".to_string()),
        "{got:#?}"
    );
    // Behind it an ALTER SYSTEM setting: removing it (a reload) is the repair, no restart.
    if let Some(HostObserved::Reachable(f)) = o.hosts.get_mut("w1") {
        f.alter_system = vec!["shared_buffers".into()];
    }
    let got = lines(&diff(&d, &o));
    assert!(
        !got.iter().any(|l| l.contains("restart the agent")),
        "{got:#?}"
    );
}

fn member_mut<'a>(o: &'a mut Observed, group: u32, name: &str) -> Option<&'a mut MemberInfo> {
    o.etcd.groups.get_mut(&group)?.members.get_mut(name)
}

#[test]
fn no_new_etcd_is_formed_beside_postgres_data() {
    use crate::plan::etcd::EtcdMemberDesired;
    let mut d = desired();
    d.etcd_members = vec![EtcdMemberDesired {
        name: "e1".into(),
        address: "10.0.0.5".into(),
        peer_url: "http://10.0.0.5:2380".into(),
        client_url: "http://10.0.0.5:2379".into(),
        dir: "/e".into(),
    }];
    let mut o = converged(&d);
    o.etcd.error = Some("connection refused".into());
    o.managed_etcd = converged_etcd_none();
    let plan = diff(&d, &o);
    assert!(
        plan.actions.iter().all(|a| a.phase != Phase::Etcd),
        "{:?}",
        plan.actions
    );
    assert!(
        plan.errors
            .iter()
            .any(|e| e.starts_with("refusing to form a new etcd")),
        "{:?}",
        plan.errors
    );
    // Bare hosts: formed.
    let mut o = bare(&d);
    o.etcd.error = Some("connection refused".into());
    o.managed_etcd = converged_etcd_none();
    let plan = diff(&d, &o);
    assert!(
        plan.actions.iter().any(|a| a.phase == Phase::Etcd),
        "{:?}",
        plan.errors
    );
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
}

#[test]
fn a_dead_etcd_member_goes_before_the_add_whatever_the_names() {
    use crate::plan::etcd::{
        ClusterMember, EtcdHost, EtcdHostFacts, EtcdMemberDesired, ManagedEtcdObserved,
    };
    let member = |name: &str, octet: u8| EtcdMemberDesired {
        name: name.into(),
        address: format!("10.0.0.{octet}"),
        peer_url: format!("http://10.0.0.{octet}:2380"),
        client_url: format!("http://10.0.0.{octet}:2379"),
        dir: format!("/e/{name}"),
    };
    let mut d = desired();
    // `zeta` (dead) is replaced by `alpha`, which sorts first.
    d.etcd_members = vec![member("alpha", 4), member("beta", 5), member("gamma", 6)];
    let mut o = converged(&d);
    let listed = |name: &str, octet: u8, id: u64, answers: Option<bool>| ClusterMember {
        id,
        name: name.into(),
        peer_urls: vec![format!("http://10.0.0.{octet}:2380")],
        client_urls: vec![format!("http://10.0.0.{octet}:2379")],
        learner: false,
        answers,
    };
    let up = |data: bool| {
        EtcdHost::Reachable(EtcdHostFacts {
            binary: Some("etcd 3.4".into()),
            data,
            running: data,
        })
    };
    o.managed_etcd = Some(ManagedEtcdObserved {
        hosts: BTreeMap::from([
            ("alpha".to_string(), up(false)),
            ("beta".to_string(), up(true)),
            ("gamma".to_string(), up(true)),
        ]),
        members: Some(Ok(vec![
            listed("beta", 5, 1, None),
            listed("gamma", 6, 2, None),
            listed("zeta", 9, 3, Some(false)),
        ])),
    });
    let plan = diff(&d, &o);
    let etcd: Vec<String> = plan
        .actions
        .iter()
        .filter(|a| a.phase == Phase::Etcd)
        .map(|a| format!("{:?} {:?}", a.target, a.change))
        .collect();
    assert_eq!(
        etcd,
        [
            "Etcd(\"zeta\") Destroy".to_string(),
            "Etcd(\"alpha\") Add".to_string()
        ],
        "{:?}",
        plan.errors
    );
}

/// A managed etcd of one member, e1, that nothing answers for and that has no data.
fn converged_etcd_none() -> Option<crate::plan::etcd::ManagedEtcdObserved> {
    use crate::plan::etcd::{EtcdHost, EtcdHostFacts, ManagedEtcdObserved};
    Some(ManagedEtcdObserved {
        hosts: BTreeMap::from([(
            "e1".to_string(),
            EtcdHost::Reachable(EtcdHostFacts {
                binary: Some("etcd 3.4".into()),
                data: false,
                running: false,
            }),
        )]),
        members: Some(Err("connection refused".into())),
    })
}
