//! The tools `cargo hv` needs besides cargo: QEMU and the bare-metal Rust target.
//!
//! A missing one is installed when that is safe to do unattended — QEMU with `apt-get` when we
//! are root on Debian or Ubuntu; the Rust target with `rustup toolchain install`, which reads
//! `rust-toolchain.toml` (machines here set `RUSTUP_AUTO_INSTALL=0`, so the toolchain file
//! alone installs nothing) — and otherwise the run stops with the exact command to type.

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::qemu::QEMU;
use crate::workspace::{BARE_METAL_TARGET, Workspace};

/// The Debian package that provides `qemu-system-x86_64`.
pub const QEMU_PACKAGE: &str = "qemu-system-x86";

/// Find an executable on `PATH`.
pub fn find_in_path(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    let name = name.as_ref();
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What to do about a missing Debian package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AptPlan {
    /// Run these commands ourselves (we are root on a Debian-like system).
    Install(Vec<Vec<String>>),
    /// Stop and tell the user to run this.
    AskUser(String),
}

/// Decide how a missing Debian `package` gets installed.
pub fn apt_plan(package: &str, is_root: bool, is_debian: bool, has_apt: bool) -> AptPlan {
    let install = |sudo: &str| {
        format!(
            "{sudo}apt-get update && {sudo}apt-get install -y --no-install-recommends {package}"
        )
    };
    match (is_debian && has_apt, is_root) {
        (true, true) => AptPlan::Install(vec![
            vec!["apt-get".into(), "update".into()],
            vec![
                "apt-get".into(),
                "install".into(),
                "-y".into(),
                "--no-install-recommends".into(),
                package.into(),
            ],
        ]),
        (true, false) => AptPlan::AskUser(install("sudo ")),
        (false, _) => AptPlan::AskUser(format!(
            "install the package that provides it (on Debian/Ubuntu: `{}`)",
            install("sudo ")
        )),
    }
}

fn is_debian_like() -> bool {
    Path::new("/etc/debian_version").exists()
}

fn run_checked(cmd: &[String]) -> Result<()> {
    eprintln!("hv: running `{}`", cmd.join(" "));
    let (prog, args) = cmd.split_first().context("empty command")?;
    let status = Command::new(prog)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {prog}"))?;
    if !status.success() {
        bail!("`{}` failed ({status})", cmd.join(" "));
    }
    Ok(())
}

/// The path of `qemu-system-x86_64`, installing it first if that is allowed here.
pub fn ensure_qemu() -> Result<PathBuf> {
    if let Some(p) = find_in_path(QEMU) {
        return Ok(p);
    }
    let plan = apt_plan(
        QEMU_PACKAGE,
        nix::unistd::geteuid().is_root(),
        is_debian_like(),
        find_in_path("apt-get").is_some(),
    );
    match plan {
        AptPlan::Install(cmds) => {
            eprintln!("hv: {QEMU} is missing; installing {QEMU_PACKAGE}");
            for c in &cmds {
                run_checked(c)?;
            }
            find_in_path(QEMU)
                .with_context(|| format!("{QEMU_PACKAGE} was installed but {QEMU} is not on PATH"))
        }
        AptPlan::AskUser(cmd) => bail!("{QEMU} is missing. Install it with:\n    {cmd}"),
    }
}

/// The active toolchain's sysroot, asked in the project root so `rust-toolchain.toml` applies.
fn sysroot(ws: &Workspace) -> Result<PathBuf> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .current_dir(&ws.root)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", rustc.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "`rustc --print sysroot` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// True if the toolchain in use has the standard library for `target`.
pub fn has_target(ws: &Workspace, target: &str) -> Result<bool> {
    Ok(sysroot(ws)?.join("lib/rustlib").join(target).is_dir())
}

/// Make sure the bare-metal target is installed (`rustup toolchain install` in the project
/// root installs everything `rust-toolchain.toml` lists).
pub fn ensure_bare_metal_target(ws: &Workspace) -> Result<()> {
    if has_target(ws, BARE_METAL_TARGET)? {
        return Ok(());
    }
    let fix = format!("cd {} && rustup toolchain install", ws.root.display());
    if find_in_path("rustup").is_none() {
        bail!(
            "the Rust target {BARE_METAL_TARGET} is missing and rustup is not on PATH. \
             Install rustup, then run:\n    {fix}"
        );
    }
    eprintln!(
        "hv: the Rust target {BARE_METAL_TARGET} is missing; running `rustup toolchain install`"
    );
    let status = Command::new("rustup")
        .args(["toolchain", "install"])
        .current_dir(&ws.root)
        .stdin(Stdio::null())
        .status()
        .context("cannot run rustup")?;
    if !status.success() || !has_target(ws, BARE_METAL_TARGET)? {
        bail!("could not install the Rust target {BARE_METAL_TARGET}. Run:\n    {fix}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_on_debian_installs_qemu_with_apt() {
        let AptPlan::Install(cmds) = apt_plan(QEMU_PACKAGE, true, true, true) else {
            panic!("expected an install plan");
        };
        assert_eq!(cmds[0], ["apt-get", "update"]);
        assert_eq!(
            cmds[1],
            [
                "apt-get",
                "install",
                "-y",
                "--no-install-recommends",
                "qemu-system-x86"
            ]
        );
    }

    #[test]
    fn non_root_is_told_the_exact_command() {
        assert_eq!(
            apt_plan(QEMU_PACKAGE, false, true, true),
            AptPlan::AskUser(
                "sudo apt-get update && sudo apt-get install -y --no-install-recommends qemu-system-x86"
                    .into()
            )
        );
    }

    #[test]
    fn non_debian_is_never_installed_automatically() {
        for root in [true, false] {
            assert!(matches!(
                apt_plan(QEMU_PACKAGE, root, false, false),
                AptPlan::AskUser(_)
            ));
            assert!(matches!(
                apt_plan(QEMU_PACKAGE, root, true, false),
                AptPlan::AskUser(_)
            ));
        }
    }

    #[test]
    fn find_in_path_finds_sh_and_not_nonsense() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("no-such-tool-bulkhead").is_none());
    }

    #[test]
    fn installed_bare_metal_target_is_detected() {
        let ws = Workspace::locate();
        assert!(has_target(&ws, BARE_METAL_TARGET).unwrap());
        assert!(!has_target(&ws, "no-such-target-triple").unwrap());
    }
}
