//! The Citus stand-in: a SQL-only extension named `citus` (plus an empty loadable module) that
//! has Citus's metadata tables and node functions, for machines without the real extension.
//! It is installed only where no real Citus is, and never over one: a `citus.control` whose
//! text lacks the stand-in's marker belongs to a real Citus and is left alone.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::LabError;
use super::sys::run;

const CONTROL: &str = include_str!("standin/citus.control");
const SQL: &str = include_str!("standin/citus--0.0-standin-1.sql");
const MODULE_C: &str = include_str!("standin/citus.c");
const SQL_NAME: &str = "citus--0.0-standin-1.sql";
/// Text only the stand-in's control file contains.
pub const MARKER: &str = "citus-reconcile stand-in";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CitusInstall {
    /// A real Citus is installed; the stand-in was not touched.
    Real { control: PathBuf, version: String },
    /// The stand-in is installed (now or before).
    StandIn { control: PathBuf },
}

impl std::fmt::Display for CitusInstall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CitusInstall::Real { control, version } => {
                write!(f, "real Citus {version} ({})", control.display())
            }
            CitusInstall::StandIn { control } => {
                write!(f, "citus-reconcile stand-in ({})", control.display())
            }
        }
    }
}

fn pg_config(bin_dir: &str, what: &str) -> Result<PathBuf, LabError> {
    let tool = Path::new(bin_dir).join("pg_config");
    let program = if tool.exists() {
        tool.to_string_lossy().into_owned()
    } else {
        "pg_config".into()
    };
    Ok(PathBuf::from(run(&program, &[what])?.trim()))
}

/// Which Citus this machine's PostgreSQL (in `bin_dir`) would load, without changing anything.
pub fn detect(bin_dir: &str) -> Result<Option<CitusInstall>, LabError> {
    let control = pg_config(bin_dir, "--sharedir")?
        .join("extension")
        .join("citus.control");
    let Ok(text) = fs::read_to_string(&control) else {
        return Ok(None);
    };
    if text.contains(MARKER) {
        return Ok(Some(CitusInstall::StandIn { control }));
    }
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("default_version"))
        .map(|v| {
            v.trim_start_matches([' ', '='])
                .trim()
                .trim_matches('\'')
                .to_string()
        })
        .unwrap_or_else(|| "unknown".into());
    Ok(Some(CitusInstall::Real { control, version }))
}

/// Install the stand-in unless a real Citus is present. Serialised machine-wide by a lock so
/// parallel labs do not write the same files at once.
pub fn ensure(bin_dir: &str) -> Result<CitusInstall, LabError> {
    let lock_path = Path::new(super::LAB_ROOT).join(".standin.lock");
    fs::create_dir_all(super::LAB_ROOT)
        .map_err(|e| LabError::Io(format!("create {}: {e}", super::LAB_ROOT)))?;
    let lock = fs::File::create(&lock_path)
        .map_err(|e| LabError::Io(format!("open {}: {e}", lock_path.display())))?;
    // SAFETY: flock on an fd we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(LabError::Io("cannot lock the stand-in installation".into()));
    }
    if let Some(real @ CitusInstall::Real { .. }) = detect(bin_dir)? {
        return Ok(real);
    }
    let ext_dir = pg_config(bin_dir, "--sharedir")?.join("extension");
    let lib_dir = pg_config(bin_dir, "--pkglibdir")?;
    let include = pg_config(bin_dir, "--includedir-server")?;
    let module = lib_dir.join("citus.so");
    if !include.join("postgres.h").exists() {
        return Err(LabError::Io(format!(
            "{} has no postgres.h: install postgresql-server-dev-{{version}} to build the Citus stand-in",
            include.display()
        )));
    }
    let source_changed = fs::read_to_string(ext_dir.join(SQL_NAME)).ok().as_deref() != Some(SQL);
    if !module.exists() || source_changed {
        let dir = std::env::temp_dir().join(format!("crl-standin-{}", std::process::id()));
        fs::create_dir_all(&dir)
            .map_err(|e| LabError::Io(format!("create {}: {e}", dir.display())))?;
        let c = dir.join("citus.c");
        let so = dir.join("citus.so");
        fs::write(&c, MODULE_C).map_err(|e| LabError::Io(format!("write {}: {e}", c.display())))?;
        let inc = format!("-I{}", include.display());
        run(
            "gcc",
            &[
                "-shared",
                "-fPIC",
                "-O2",
                &inc,
                "-o",
                &so.to_string_lossy(),
                &c.to_string_lossy(),
            ],
        )?;
        install_file(&so, &module)?;
        let _ = fs::remove_dir_all(&dir);
    }
    for (name, text) in [(SQL_NAME, SQL), ("citus.control", CONTROL)] {
        let target = ext_dir.join(name);
        if fs::read_to_string(&target).ok().as_deref() != Some(text) {
            let tmp = ext_dir.join(format!(".{name}.{}", std::process::id()));
            fs::write(&tmp, text)
                .map_err(|e| LabError::Io(format!("write {}: {e}", tmp.display())))?;
            fs::rename(&tmp, &target)
                .map_err(|e| LabError::Io(format!("install {}: {e}", target.display())))?;
        }
    }
    Ok(CitusInstall::StandIn {
        control: ext_dir.join("citus.control"),
    })
}

fn install_file(from: &Path, to: &Path) -> Result<(), LabError> {
    let tmp = to.with_extension(format!("so.{}", std::process::id()));
    fs::copy(from, &tmp).map_err(|e| LabError::Io(format!("copy to {}: {e}", tmp.display())))?;
    fs::rename(&tmp, to).map_err(|e| LabError::Io(format!("install {}: {e}", to.display())))
}
