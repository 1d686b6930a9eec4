//! `vagrant/`: the Vagrantfile and the spec it is made for agree, and both are valid as far as
//! this machine can tell without VMs — `vagrant validate` (Debian's vagrant, installed by
//! `.ci/setup`) and `citus-reconcile validate` (secrets skipped: `vagrant up` makes them) — and
//! the spec itself runs on the lab with its addresses moved to a lab subnet.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

const VAGRANTFILE: &str = include_str!("../vagrant/Vagrantfile");

/// `"name" => octet` pairs of one Ruby hash constant, with the network prefix.
fn machines(constant: &str) -> BTreeMap<String, String> {
    let net = VAGRANTFILE
        .lines()
        .find_map(|l| l.strip_prefix("NET = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("NET in the Vagrantfile");
    let start = VAGRANTFILE
        .find(&format!("{constant} = {{"))
        .expect("the constant");
    let body = &VAGRANTFILE[start..];
    let body = &body[..body.find('}').expect("closing brace")];
    body.split(',')
        .filter_map(|pair| {
            let (name, octet) = pair.split_once("=>")?;
            let name = name
                .trim()
                .trim_start_matches(&format!("{constant} = {{"))
                .trim();
            Some((
                name.trim_matches('"').to_string(),
                format!("{net}.{}", octet.trim()),
            ))
        })
        .collect()
}

#[test]
fn the_vagrantfile_makes_the_hosts_the_spec_names() {
    let report = citus_reconcile::spec::load_file(
        std::path::Path::new("vagrant/cluster.yaml"),
        citus_reconcile::spec::LoadOptions {
            resolve_secrets: false,
            resolve_etcd_secret: false,
        },
    );
    let spec = report
        .spec
        .clone()
        .unwrap_or_else(|| panic!("vagrant/cluster.yaml:\n{}", report.render()));
    let hosts: BTreeMap<String, String> = spec
        .hosts()
        .map(|h| (h.name.clone(), h.address.clone()))
        .collect();
    assert_eq!(machines("DATABASE"), hosts);
    // etcd's VMs are the managed etcd's members.
    let etcd: BTreeMap<String, String> = spec
        .etcd
        .members
        .iter()
        .map(|m| (m.name.clone(), m.address.clone()))
        .collect();
    assert_eq!(machines("ETCD"), etcd);
    // The seed's shape: 3 coordinators, 2 worker groups of 2, 3 etcd members.
    let sizes: Vec<usize> = spec.groups.iter().map(|g| g.hosts.len()).collect();
    assert_eq!(sizes, vec![3, 2, 2]);
}

#[test]
fn the_spec_validates_without_its_generated_secrets() {
    let out = Command::new(env!("CARGO_BIN_EXE_citus-reconcile"))
        .args(["validate", "--skip-secrets", "vagrant/cluster.yaml"])
        .output()
        .expect("runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
}

#[test]
fn vagrant_validates_the_vagrantfile() {
    if Command::new("vagrant").arg("--version").output().is_err() {
        assert_ne!(
            std::env::var("CITUS_RECONCILE_REQUIRE_LAB").as_deref(),
            Ok("1"),
            "vagrant is not installed; run .ci/setup"
        );
        eprintln!("skipped: vagrant is not installed");
        return;
    }
    // In a copy: loading the Vagrantfile writes keys and passwords beside it.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy("vagrant/Vagrantfile", dir.path().join("Vagrantfile")).expect("copy");
    let out = Command::new("vagrant")
        .args(["validate", "--ignore-provider"])
        .current_dir(dir.path())
        .env("VAGRANT_HOME", dir.path().join(".vagrant.d"))
        .output()
        .expect("vagrant runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    // What `vagrant up` leaves for citus-reconcile: a key, known_hosts for every VM (etcd's
    // too: apply logs in there to run it), the passwords — private files private.
    use std::os::unix::fs::PermissionsExt;
    let generated = dir.path().join(".generated");
    let known = std::fs::read_to_string(generated.join("known_hosts")).expect("known_hosts");
    assert_eq!(known.lines().count(), 10, "{known}");
    for f in [
        "id_ed25519",
        "superuser.password",
        "replication.password",
        "host_coord1",
    ] {
        let mode = std::fs::metadata(generated.join(f))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_default();
        assert_eq!(mode, 0o600, "{f}");
    }
}

/// The Vagrant spec on the lab: the same topology, settings and names, with what only VMs
/// have replaced — addresses moved from 192.168.56.0/24 to a lab subnet, the lab's SSH key and
/// secrets, no packages to install (the lab has PostgreSQL and Citus) and agents as processes
/// (no systemd here).
#[test]
fn the_vagrant_spec_converges_on_the_lab() {
    if !common::lab_available("the vagrant spec on the lab") {
        return;
    }
    let original = std::fs::read_to_string("vagrant/cluster.yaml").expect("the spec");
    let mut text = original.replace("192.168.56.", "10.213.158.");
    for (from, to) in [
        ("  install: apt\n", "  install: none\n"),
        ("  repository: {}\n", ""),
        ("  service: systemd\n", "  service: process\n"),
        (".generated/id_ed25519", ".lab/id_ed25519"),
        (".generated/known_hosts", ".lab/known_hosts"),
        (
            "{ file: .generated/superuser.password }",
            "{ env: CR_LAB_SUPERUSER }",
        ),
        (
            "{ file: .generated/replication.password }",
            "{ env: CR_LAB_REPLICATION }",
        ),
    ] {
        assert!(
            text.contains(from),
            "vagrant/cluster.yaml no longer has {from:?}"
        );
        text = text.replace(from, to);
    }
    let t = common::cluster(&text);
    let s = common::status(&t);
    let members = s["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 7, "{s}");
    for g in 0..3 {
        assert!(
            common::leader(&t, g).is_some(),
            "group {g} has no leader: {s}"
        );
    }
    let primaries = s["pg_dist_node"]
        .as_array()
        .map(|rows| rows.iter().filter(|r| r["noderole"] == "primary").count())
        .unwrap_or(0);
    assert_eq!(primaries, 3, "{s}");
    // A distributed table through the coordinator, spread over both worker groups.
    let coordinator = common::leader(&t, 0).expect("a coordinator leader");
    common::psql(
        &t,
        &coordinator,
        "CREATE TABLE vagrant_probe (id int PRIMARY KEY)",
    );
    common::psql(
        &t,
        &coordinator,
        "SELECT create_distributed_table('vagrant_probe', 'id')",
    );
    common::psql(
        &t,
        &coordinator,
        "INSERT INTO vagrant_probe SELECT generate_series(1, 1000)",
    );
    assert_eq!(
        common::psql(&t, &coordinator, "SELECT count(*) FROM vagrant_probe"),
        "1000"
    );
}
