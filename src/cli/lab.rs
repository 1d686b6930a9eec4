//! `citus-reconcile lab …`: local hosts in network namespaces, and faults to inject into them.

use std::path::Path;
use std::process::ExitCode;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use super::load_spec;
use crate::lab::{Lab, NodeStatus};

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Create (or repair) the lab's hosts and etcd; after a crash, boots the host again
    Up { spec: std::path::PathBuf },
    /// Show the lab's nodes
    Status { spec: std::path::PathBuf },
    /// Remove everything the lab made: namespaces, processes in them, keys, data folders
    Down { spec: std::path::PathBuf },
    /// Kill every process on a host (a power cut)
    Crash {
        spec: std::path::PathBuf,
        host: String,
    },
    /// Cut a host off the network, or only from the etcd members
    Partition {
        spec: std::path::PathBuf,
        host: String,
        #[arg(long)]
        etcd_only: bool,
    },
    /// Undo a partition
    Heal {
        spec: std::path::PathBuf,
        host: String,
    },
}

pub fn run(cmd: LabCommand) -> miette::Result<ExitCode> {
    let (spec_path, action): (&Path, &str) = match &cmd {
        LabCommand::Up { spec } => (spec, "up"),
        LabCommand::Status { spec } => (spec, "status"),
        LabCommand::Down { spec } => (spec, "down"),
        LabCommand::Crash { spec, .. } => (spec, "crash"),
        LabCommand::Partition { spec, .. } => (spec, "partition"),
        LabCommand::Heal { spec, .. } => (spec, "heal"),
    };
    // The lab never needs the secrets; it must work even where they are not set.
    let Some(spec) = load_spec(spec_path, false)? else {
        return Ok(ExitCode::FAILURE);
    };
    let lab = Lab::new(&spec).map_err(|e| miette::miette!("{e}"))?;
    let fail = |e: crate::lab::LabError| miette::miette!("lab {action}: {e}");
    match cmd {
        LabCommand::Up { spec } => {
            let started = std::time::Instant::now();
            let citus = lab.up().map_err(fail)?;
            print_status(&lab.status());
            println!("Citus: {citus}");
            println!(
                "lab {} up in {:.1}s",
                lab.topology.subnet_cidr(),
                started.elapsed().as_secs_f64()
            );
            println!("next: citus-reconcile apply {}", spec.display());
        }
        LabCommand::Status { .. } => print_status(&lab.status()),
        LabCommand::Down { .. } => {
            lab.down().map_err(fail)?;
            println!("lab {} removed", lab.topology.subnet_cidr());
        }
        LabCommand::Crash { host, .. } => {
            lab.crash(&host).map_err(fail)?;
            println!("{host}: every process killed; `lab up` boots it again");
        }
        LabCommand::Partition {
            host, etcd_only, ..
        } => {
            lab.partition(&host, etcd_only).map_err(fail)?;
            println!(
                "{host}: cut off {}",
                if etcd_only {
                    "from etcd"
                } else {
                    "from the network"
                }
            );
        }
        LabCommand::Heal { host, .. } => {
            lab.heal(&host).map_err(fail)?;
            println!("{host}: network restored");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(rows: &[NodeStatus]) {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header([
        "node",
        "address",
        "namespace",
        "sshd",
        "etcd",
        "processes",
        "network",
    ]);
    let mark = |v: Option<bool>| match v {
        Some(true) => "up",
        Some(false) => "down",
        None => "-",
    };
    for r in rows {
        table.add_row([
            r.node.clone(),
            r.address.clone(),
            if r.exists {
                r.namespace.clone()
            } else {
                format!("{} (missing)", r.namespace)
            },
            mark(r.sshd).to_string(),
            mark(r.etcd).to_string(),
            r.processes.to_string(),
            if r.partition.is_empty() {
                "ok".into()
            } else {
                r.partition.clone()
            },
        ]);
    }
    println!("{table}");
}
