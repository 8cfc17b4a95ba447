//! Where things are: the project root, its target directory, the `cargo` to run, and the
//! paths of the bare-metal artifacts. One place, so `cargo hv` and the scenario harness agree.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Rust target every bare-metal piece (the hypervisor and the domains) is built for.
pub const BARE_METAL_TARGET: &str = "x86_64-unknown-none";
/// The package and binary name of the hypervisor.
pub const CORE_HV: &str = "core-hv";
/// The system booted when no `--config` is given, relative to the project root.
pub const DEFAULT_SYSTEM: &str = "systems/default.toml";
/// The small system scenarios and the boot benchmark start from: xenstore and one PV domain,
/// ending on its own.
pub const BASE_SYSTEM: &str = "systems/base.toml";

/// The project's locations.
#[derive(Clone, Debug)]
pub struct Workspace {
    /// The directory holding the workspace `Cargo.toml`.
    pub root: PathBuf,
    /// Cargo's target directory (honours `CARGO_TARGET_DIR`).
    pub target_dir: PathBuf,
    /// The `cargo` to run (the one running us, when cargo tells us).
    pub cargo: PathBuf,
}

impl Workspace {
    /// The workspace this crate was built from. `cargo hv` and the scenario tests always run
    /// from a build of this tree, so the compile-time manifest directory is the reliable anchor
    /// (the current directory may be anywhere inside, or outside, the project).
    pub fn locate() -> Workspace {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let target_dir = match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => root.join(dir),
            _ => root.join("target"),
        };
        let cargo = env::var_os("CARGO")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("cargo"));
        Workspace {
            root,
            target_dir,
            cargo,
        }
    }

    /// A `cargo` command run in the project root.
    pub fn cargo_command(&self) -> Command {
        let mut c = Command::new(&self.cargo);
        c.current_dir(&self.root);
        c
    }

    /// Where release builds for [`BARE_METAL_TARGET`] land.
    pub fn bare_metal_release_dir(&self) -> PathBuf {
        self.target_dir.join(BARE_METAL_TARGET).join("release")
    }

    /// Where `cargo hv` writes images and scenario artifacts by default.
    pub fn out_dir(&self) -> PathBuf {
        self.target_dir.join("bulkhead")
    }

    /// The default system description.
    pub fn default_system(&self) -> PathBuf {
        self.root.join(DEFAULT_SYSTEM)
    }

    /// The base system description (scenarios' default image, boot benchmark).
    pub fn base_system(&self) -> PathBuf {
        self.root.join(BASE_SYSTEM)
    }

    /// Criterion's output directory.
    pub fn criterion_dir(&self) -> PathBuf {
        self.target_dir.join("criterion")
    }
}
