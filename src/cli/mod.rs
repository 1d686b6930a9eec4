//! The command line: argument types and dispatch. Each command lives in its own file and
//! returns an exit code; errors are rendered once, here.

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
}

pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Validate {
            specs,
            format,
            skip_secrets,
        } => validate::run(&specs, format, skip_secrets),
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
