//! Building a boot image: compile `core-hv` and every domain a system lists for
//! `x86_64-unknown-none`, check each domain ELF, and pack them behind the manifest
//! (`shared_abi::manifest::build_image`).
//!
//! The artifact paths come from cargo's own JSON messages, not from guessing the target
//! directory layout. The packed image is parsed back with `parse_image` before it is written:
//! the host refuses what the hypervisor would refuse.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shared_abi::manifest::{ImageDomain, build_image, parse_image};

use crate::process::run_streaming;
use crate::system::System;
use crate::workspace::{BARE_METAL_TARGET, CORE_HV, Workspace};

const ELF64_HEADER_LEN: usize = 64;
const ELF64_PHDR_LEN: u64 = 56;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 0x3e;
const PT_LOAD: u32 = 1;

/// The longest a build of the image's pieces may take before it is killed.
pub const BUILD_LIMIT: Duration = Duration::from_secs(30 * 60);

/// What one build produced: the hypervisor and each domain's ELF, in system order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifacts {
    pub core_hv: PathBuf,
    pub domains: Vec<PathBuf>,
}

/// A written image and the hypervisor copied beside it.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub core_hv: PathBuf,
    pub image: PathBuf,
    pub domains: usize,
    pub image_len: usize,
}

/// Why a domain ELF was refused before packing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("domain {domain}: {path} is not an ELF file: {reason}")]
    NotElf {
        domain: String,
        path: String,
        reason: &'static str,
    },
    #[error("domain {domain}: {path} is {found}, expected {expected}")]
    Wrong {
        domain: String,
        path: String,
        found: String,
        expected: &'static str,
    },
    #[error("domain {domain}: {path} has no loadable segment")]
    NoLoadSegment { domain: String, path: String },
}

/// The `(package, binary)` pairs one build must produce: `core-hv` first, then each distinct
/// domain binary in system order.
pub fn build_targets(system: &System) -> Vec<(String, String)> {
    let mut targets = vec![(CORE_HV.to_string(), CORE_HV.to_string())];
    for d in &system.domains {
        let t = (d.krate.clone(), d.binary.clone());
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    targets
}

/// The arguments of the one `cargo build` that compiles everything an image needs.
pub fn cargo_build_args(system: &System) -> Vec<String> {
    let mut args: Vec<String> = [
        "build",
        "--release",
        "--target",
        BARE_METAL_TARGET,
        "--message-format",
        "json-render-diagnostics",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let targets = build_targets(system);
    let mut packages: Vec<&str> = Vec::new();
    for (p, _) in &targets {
        if !packages.contains(&p.as_str()) {
            packages.push(p);
        }
    }
    for p in packages {
        args.extend(["-p".to_string(), p.to_string()]);
    }
    for (_, b) in &targets {
        args.extend(["--bin".to_string(), b.clone()]);
    }
    args
}

/// Pick the executables out of cargo's `--message-format json` stdout: binary name → path.
pub fn executables_from_messages(stdout: &str) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let is_bin = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bin"));
        if let (true, Some(name), Some(exe)) = (
            is_bin,
            v["target"]["name"].as_str(),
            v["executable"].as_str(),
        ) {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    found
}

/// Build `core-hv` and the system's domains; cargo's progress goes to stderr as it happens.
pub fn build(ws: &Workspace, system: &System) -> Result<Artifacts> {
    let args = cargo_build_args(system);
    eprintln!(
        "hv: building {CORE_HV} and {} domain(s) for {BARE_METAL_TARGET} (release)",
        system.domains.len()
    );
    let mut stdout = String::new();
    let status = run_streaming(
        ws.cargo_command().args(&args).stderr(Stdio::inherit()),
        BUILD_LIMIT,
        |line| {
            stdout.push_str(line);
            stdout.push('\n');
        },
    )?;
    if !status.success() {
        bail!(
            "`cargo {}` failed ({status}); its errors are above",
            args.join(" ")
        );
    }
    let exes = executables_from_messages(&stdout);
    let find = |bin: &str| {
        exes.get(bin).cloned().with_context(|| {
            format!("cargo reported no executable for binary `{bin}` (is it a [[bin]] target?)")
        })
    };
    Ok(Artifacts {
        core_hv: find(CORE_HV)?,
        domains: system
            .domains
            .iter()
            .map(|d| find(&d.binary))
            .collect::<Result<_>>()?,
    })
}

/// Check that `bytes` is what a domain must be: a little-endian ELF64 x86-64 executable with
/// at least one loadable segment. The hypervisor's loader checks again; this catches a wrong
/// artifact (a host binary, a library, a truncated file) at build time with a clear message.
/// Read with explicit bounds checks, never by casting: the file may be anything.
pub fn check_domain_elf(domain: &str, path: &Path, bytes: &[u8]) -> Result<(), ElfError> {
    let not_elf = |reason| ElfError::NotElf {
        domain: domain.to_string(),
        path: path.display().to_string(),
        reason,
    };
    let wrong = |found: String, expected| ElfError::Wrong {
        domain: domain.to_string(),
        path: path.display().to_string(),
        found,
        expected,
    };
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        let b = bytes.get(at..at + 8)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        Some(u64::from_le_bytes(w))
    };
    if bytes.len() < ELF64_HEADER_LEN {
        return Err(not_elf("shorter than an ELF64 header"));
    }
    if bytes[0..4] != *b"\x7fELF" {
        return Err(not_elf("no ELF magic"));
    }
    if bytes[4] != 2 {
        return Err(wrong(format!("ELF class {}", bytes[4]), "64-bit (class 2)"));
    }
    if bytes[5] != 1 {
        return Err(wrong(
            format!("data encoding {}", bytes[5]),
            "little-endian (1)",
        ));
    }
    let kind = u16_at(16).unwrap_or(0);
    if kind != ET_EXEC && kind != ET_DYN {
        return Err(wrong(
            format!("of ELF type {kind}"),
            "an executable (type 2 or 3)",
        ));
    }
    let machine = u16_at(18).unwrap_or(0);
    if machine != EM_X86_64 {
        return Err(wrong(format!("for machine {machine:#x}"), "x86-64 (0x3e)"));
    }
    let phoff = u64_at(32).unwrap_or(0);
    let phentsize = u16_at(54).unwrap_or(0) as u64;
    let phnum = u16_at(56).unwrap_or(0) as u64;
    if phnum > 0 && phentsize < ELF64_PHDR_LEN {
        return Err(not_elf("program header entries are too small"));
    }
    let table_end = phentsize
        .checked_mul(phnum)
        .and_then(|n| n.checked_add(phoff));
    if table_end.is_none_or(|end| end > bytes.len() as u64) {
        return Err(not_elf(
            "program header table runs past the end of the file",
        ));
    }
    // The table lies inside `bytes`, so every offset below fits in usize.
    let loads = (0..phnum)
        .filter(|i| u32_at((phoff + i * phentsize) as usize) == Some(PT_LOAD))
        .count();
    if loads == 0 {
        return Err(ElfError::NoLoadSegment {
            domain: domain.to_string(),
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// Pack the system's domains (`elfs[i]` is the ELF of `system.domains[i]`, read from
/// `paths[i]`) into a boot image, and parse it back as the hypervisor will.
pub fn pack(system: &System, paths: &[PathBuf], elfs: &[Vec<u8>]) -> Result<Vec<u8>> {
    if elfs.len() != system.domains.len() || paths.len() != elfs.len() {
        bail!(
            "{} domains listed but {} ELF files given",
            system.domains.len(),
            elfs.len()
        );
    }
    let mut domains = Vec::with_capacity(elfs.len());
    for ((d, path), elf) in system.domains.iter().zip(paths).zip(elfs) {
        check_domain_elf(&d.name, path, elf)?;
        domains.push(ImageDomain {
            spec: d.spec(),
            elf,
        });
    }
    let image = build_image(&domains).map_err(|e| anyhow::anyhow!("encoding manifest: {e}"))?;
    let parsed = parse_image(&image).map_err(|e| {
        anyhow::anyhow!(
            "{}: the packed image does not validate: {e}",
            system.path.display()
        )
    })?;
    if parsed.manifest.domains.len() != system.domains.len() {
        bail!("the packed image lost domains");
    }
    Ok(image)
}

/// Build everything, pack the image and write `<out>/<system>.img` plus a copy of `core-hv`
/// (`<out>/core-hv`), so the pair in `out` always belongs together.
pub fn write(ws: &Workspace, system: &System, out: &Path) -> Result<BuiltImage> {
    let artifacts = build(ws, system)?;
    let elfs = artifacts
        .domains
        .iter()
        .map(|p| fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let image = pack(system, &artifacts.domains, &elfs)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let image_path = out.join(format!("{}.img", system.name));
    fs::write(&image_path, &image).with_context(|| format!("writing {}", image_path.display()))?;
    let core_hv = out.join(CORE_HV);
    fs::copy(&artifacts.core_hv, &core_hv).with_context(|| {
        format!(
            "copying {} to {}",
            artifacts.core_hv.display(),
            core_hv.display()
        )
    })?;
    Ok(BuiltImage {
        core_hv,
        image: image_path,
        domains: system.domains.len(),
        image_len: image.len(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::system;
    use shared_abi::manifest::{HEADER_LEN, PAYLOAD_ALIGN};
    use std::os::unix::fs::PermissionsExt;

    /// A minimal ELF64 x86-64 executable: header plus one PT_LOAD covering `payload`.
    pub(crate) fn fake_elf(payload: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[0..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // ELFCLASS64
        e[5] = 1; // little-endian
        e[6] = 1; // EV_CURRENT
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x40_0000u64.to_le_bytes()); // entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        e[58..60].copy_from_slice(&64u16.to_le_bytes()); // shentsize
        let ph = &mut e[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R|X
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&0x40_0000u64.to_le_bytes());
        ph[24..32].copy_from_slice(&0x40_0000u64.to_le_bytes());
        ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        ph[48..56].copy_from_slice(&4096u64.to_le_bytes());
        e.extend_from_slice(payload);
        e
    }

    fn two_domain_system() -> System {
        system::parse(
            Path::new("systems/two.toml"),
            r#"
            [[domain]]
            name = "xenstore"
            crate = "xenstore-dom"
            memory_mib = 16
            capabilities = ["xenstore_service"]
            [[domain]]
            name = "blk"
            crate = "blkback-dom"
            binary = "blkback"
            memory_mib = 32
            [[domain]]
            name = "blk2"
            crate = "blkback-dom"
            binary = "blkback"
            memory_mib = 32
            "#,
        )
        .unwrap()
    }

    #[test]
    fn build_args_name_core_and_each_distinct_domain_binary_once() {
        let args = cargo_build_args(&two_domain_system());
        let joined = args.join(" ");
        assert!(
            joined.starts_with("build --release --target x86_64-unknown-none"),
            "{joined}"
        );
        assert!(
            joined.ends_with(
                "-p core-hv -p xenstore-dom -p blkback-dom --bin core-hv --bin xenstore-dom --bin blkback"
            ),
            "{joined}"
        );
    }

    #[test]
    fn empty_system_builds_only_core_hv() {
        let s = system::parse(Path::new("default.toml"), "").unwrap();
        assert_eq!(
            build_targets(&s),
            vec![("core-hv".to_string(), "core-hv".to_string())]
        );
    }

    #[test]
    fn fake_elves_pack_into_an_image_the_hypervisor_parser_accepts() {
        let s = two_domain_system();
        let elfs = vec![fake_elf(&[1; 5000]), fake_elf(&[2; 10]), fake_elf(&[3; 7])];
        let paths = vec![PathBuf::from("a"), PathBuf::from("b"), PathBuf::from("c")];
        let img = pack(&s, &paths, &elfs).unwrap();
        let parsed = parse_image(&img).unwrap();
        assert_eq!(parsed.manifest.domains.len(), 3);
        for (i, elf) in elfs.iter().enumerate() {
            assert_eq!(parsed.elf(i).unwrap(), &elf[..]);
            assert_eq!(
                parsed.manifest.domains[i].elf.offset % PAYLOAD_ALIGN as u64,
                0
            );
        }
        let x = &parsed.manifest.domains[0];
        assert_eq!(x.name, "xenstore");
        assert_eq!(x.memory_kib, 16 * 1024);
        assert!(img.len() > HEADER_LEN);
    }

    #[test]
    fn packing_refuses_a_non_elf_or_wrong_machine_domain() {
        let s = two_domain_system();
        let paths = vec![PathBuf::from("a"), PathBuf::from("b"), PathBuf::from("c")];
        let mut bad = vec![b"#!/bin/sh\n".to_vec(), fake_elf(&[2]), fake_elf(&[3])];
        let e = pack(&s, &paths, &bad).unwrap_err().to_string();
        assert!(e.contains("domain xenstore: a is not an ELF file"), "{e}");
        bad[0] = fake_elf(&[1]);
        bad[0][18] = 0xb7; // EM_AARCH64
        let e = pack(&s, &paths, &bad).unwrap_err().to_string();
        assert!(e.contains("expected x86-64"), "{e}");
        bad[0] = fake_elf(&[1]);
        bad[0][32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // phoff far away
        let e = pack(&s, &paths, &bad).unwrap_err().to_string();
        assert!(e.contains("program header table runs past"), "{e}");
        let e = check_domain_elf("d", Path::new("p"), &fake_elf(&[1])[..40]).unwrap_err();
        assert!(
            e.to_string().contains("shorter than an ELF64 header"),
            "{e}"
        );
        let e = pack(&s, &paths[..2], &bad[..2]).unwrap_err().to_string();
        assert!(e.contains("3 domains listed but 2"), "{e}");
    }

    #[test]
    fn elf_without_load_segment_is_refused() {
        let mut e = fake_elf(&[1]);
        e[64..68].copy_from_slice(&0u32.to_le_bytes()); // PT_NULL
        assert!(matches!(
            check_domain_elf("d", Path::new("p"), &e),
            Err(ElfError::NoLoadSegment { .. })
        ));
    }

    #[test]
    fn executables_are_read_from_cargo_json_messages() {
        let out = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"shared_abi"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"core-hv"},"executable":"/t/core-hv"}
not json
{"reason":"build-finished","success":true}"#;
        let m = executables_from_messages(out);
        assert_eq!(m.len(), 1);
        assert_eq!(m["core-hv"], PathBuf::from("/t/core-hv"));
    }

    /// Runs the real build path (`build` then `write`) with a stand-in `cargo` that checks its
    /// arguments and "builds" fake ELF files, reporting them as cargo does.
    #[test]
    fn write_builds_listed_domains_and_packs_their_elves() {
        let dir = std::env::temp_dir().join(format!("hv-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let elf_core = dir.join("core-hv.elf");
        let elf_x = dir.join("xenstore-dom.elf");
        let elf_b = dir.join("blkback.elf");
        fs::write(&elf_core, fake_elf(b"core")).unwrap();
        fs::write(&elf_x, fake_elf(&[7; 3000])).unwrap();
        fs::write(&elf_b, fake_elf(&[8; 20])).unwrap();
        let fake_cargo = dir.join("cargo");
        let script = format!(
            "#!/bin/sh\n\
             case \"$*\" in *'-p core-hv -p xenstore-dom -p blkback-dom --bin core-hv --bin xenstore-dom --bin blkback'*) ;; *) echo \"bad args: $*\" >&2; exit 9;; esac\n\
             for b in core-hv:{} xenstore-dom:{} blkback:{}; do\n\
               echo \"{{\\\"reason\\\":\\\"compiler-artifact\\\",\\\"target\\\":{{\\\"kind\\\":[\\\"bin\\\"],\\\"name\\\":\\\"${{b%%:*}}\\\"}},\\\"executable\\\":\\\"${{b#*:}}\\\"}}\"\n\
             done\n",
            elf_core.display(),
            elf_x.display(),
            elf_b.display()
        );
        fs::write(&fake_cargo, script).unwrap();
        fs::set_permissions(&fake_cargo, fs::Permissions::from_mode(0o755)).unwrap();
        let ws = Workspace {
            root: dir.clone(),
            target_dir: dir.join("target"),
            cargo: fake_cargo,
        };
        let out = dir.join("out");
        let built = write(&ws, &two_domain_system(), &out).unwrap();
        assert_eq!(built.image, out.join("two.img"));
        assert_eq!(fs::read(&built.core_hv).unwrap(), fake_elf(b"core"));
        let bytes = fs::read(&built.image).unwrap();
        let parsed = parse_image(&bytes).unwrap();
        assert_eq!(parsed.elf(0).unwrap(), &fake_elf(&[7; 3000])[..]);
        assert_eq!(parsed.elf(1).unwrap(), &fake_elf(&[8; 20])[..]);
        assert_eq!(parsed.elf(2).unwrap(), &fake_elf(&[8; 20])[..]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failing_cargo_build_is_an_error() {
        let dir = std::env::temp_dir().join(format!("hv-image-fail-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fake_cargo = dir.join("cargo");
        fs::write(&fake_cargo, "#!/bin/sh\nexit 101\n").unwrap();
        fs::set_permissions(&fake_cargo, fs::Permissions::from_mode(0o755)).unwrap();
        let ws = Workspace {
            root: dir.clone(),
            target_dir: dir.join("target"),
            cargo: fake_cargo,
        };
        let e = build(&ws, &two_domain_system()).unwrap_err().to_string();
        assert!(e.contains("failed"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
