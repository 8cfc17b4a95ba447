//! The QEMU scenario harness.
//!
//! A scenario boots the real `core-hv` with a boot image under QEMU, with a time limit, and
//! judges what the serial console and the exit status say. The scenarios themselves are in
//! `tests/scenarios.rs`; this library gives them:
//!
//! - [`artifacts`]: the hypervisor and the base system's image (`systems/base.toml`).
//!   `cargo hv test` builds them once and passes their paths in `BULKHEAD_CORE_HV` /
//!   `BULKHEAD_IMAGE`; when those are unset (`cargo test -p tests`) the harness builds them
//!   itself, once per process. Relative paths
//!   in those variables are taken from the project root. A missing tool
//!   or a failed build fails every scenario with the reason: nothing is skipped silently.
//! - [`Scenario`] / [`Boot`]: one boot and the checks on it. A failed check panics with the
//!   outcome, the QEMU command line, the last console lines and QEMU's own messages.
//! - [`corrupt`]: deliberate damage to a boot image, for the refusal scenarios.
//!
//! Every QEMU runs in its own process group and is killed with it on timeout, on Ctrl-C and
//! on every error path (`bulkhead_build::qemu`).
#![forbid(unsafe_code)]

use std::fs;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bulkhead_build::commands::{ENV_CORE_HV, ENV_IMAGE};
use bulkhead_build::console::{Console, FaultKind};
use bulkhead_build::outcome::Outcome;
use bulkhead_build::qemu::{self, QemuConfig, Run};
use bulkhead_build::workspace::Workspace;
use bulkhead_build::{image, setup, system};
use shared_abi::console::ReadyLine;

/// What every scenario boots.
#[derive(Clone, Debug)]
pub struct Artifacts {
    pub qemu: PathBuf,
    pub core_hv: PathBuf,
    /// The base system's boot image.
    pub image: PathBuf,
}

static ARTIFACTS: OnceLock<Result<Artifacts, String>> = OnceLock::new();

fn prepare() -> Result<Artifacts, String> {
    // Without the handler a Ctrl-C would still end the run, only less tidily: warn, go on.
    if let Err(e) = qemu::install_interrupt_handler() {
        eprintln!("warning: {e}");
    }
    let qemu = setup::ensure_qemu().map_err(|e| format!("{e:#}"))?;
    if let (Some(core_hv), Some(image)) =
        (std::env::var_os(ENV_CORE_HV), std::env::var_os(ENV_IMAGE))
    {
        // Relative paths are taken from the project root (cargo runs tests in `tests/`).
        let root = Workspace::locate().root;
        let (core_hv, image) = (root.join(core_hv), root.join(image));
        for p in [&core_hv, &image] {
            if !p.is_file() {
                return Err(format!(
                    "{} (from {ENV_CORE_HV}/{ENV_IMAGE}) does not exist",
                    p.display()
                ));
            }
        }
        return Ok(Artifacts {
            qemu,
            core_hv,
            image,
        });
    }
    let ws = Workspace::locate();
    setup::ensure_bare_metal_target(&ws).map_err(|e| format!("{e:#}"))?;
    let sys = system::load(&ws.base_system()).map_err(|e| e.to_string())?;
    let built = image::write(&ws, &sys, &scenario_dir())
        .map_err(|e| format!("building the image: {e:#}"))?;
    Ok(Artifacts {
        qemu,
        core_hv: built.core_hv,
        image: built.image,
    })
}

/// The hypervisor and default image, built on first use (see the module doc).
pub fn artifacts() -> &'static Artifacts {
    match ARTIFACTS.get_or_init(prepare) {
        Ok(a) => a,
        Err(e) => panic!("cannot prepare the scenarios: {e}"),
    }
}

/// Where scenarios keep the images they boot (kept after the run, for a look at a failure).
pub fn scenario_dir() -> PathBuf {
    Workspace::locate().out_dir().join("scenarios")
}

/// The default time limit of one boot. Boots take seconds; the limit only matters when
/// something hangs, and must hold with two heavy QEMUs sharing two cores.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// One boot to judge.
#[derive(Clone, Debug)]
pub struct Scenario {
    name: String,
    smp: u32,
    memory_mib: u32,
    append: Vec<String>,
    image: ImageChoice,
    timeout: Duration,
    /// QEMU arguments after the harness's own (devices).
    qemu_args: Vec<String>,
}

#[derive(Clone, Debug)]
enum ImageChoice {
    Default,
    Bytes(Vec<u8>),
    None,
}

impl Scenario {
    /// A 1-CPU, 256 MiB boot of the default image with no command-line words.
    pub fn new(name: &str) -> Scenario {
        Scenario {
            name: name.into(),
            smp: 1,
            memory_mib: 256,
            append: Vec::new(),
            image: ImageChoice::Default,
            timeout: DEFAULT_TIMEOUT,
            qemu_args: Vec::new(),
        }
    }

    pub fn smp(mut self, cpus: u32) -> Scenario {
        self.smp = cpus;
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Scenario {
        self.memory_mib = mib;
        self
    }

    /// Add a `core-hv` command-line word.
    pub fn append(mut self, word: &str) -> Scenario {
        self.append.push(word.into());
        self
    }

    /// Power off once ready and done (`exit_when_done`).
    pub fn exit_when_done(self) -> Scenario {
        self.append(shared_abi::console::cmdline::EXIT_WHEN_DONE)
    }

    /// Boot these image bytes instead of the default image.
    pub fn image(mut self, bytes: Vec<u8>) -> Scenario {
        self.image = ImageChoice::Bytes(bytes);
        self
    }

    /// Boot with no boot image at all (no `-initrd`).
    pub fn no_image(mut self) -> Scenario {
        self.image = ImageChoice::None;
        self
    }

    /// Add QEMU arguments (after the harness's own), e.g. `["-device", "intel-iommu"]`.
    pub fn qemu_args(mut self, args: &[&str]) -> Scenario {
        self.qemu_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Scenario {
        self.timeout = t;
        self
    }

    /// Boot and wait for the end (poweroff, QEMU's death, the time limit, or Ctrl-C).
    pub fn boot(self) -> Boot {
        self.boot_watching(|_| {})
    }

    /// [`boot`](Self::boot), handing each console line to `on_line` as it arrives, while
    /// QEMU runs (e.g. to reach a guest's server once it says it is ready).
    pub fn boot_watching(self, on_line: impl FnMut(&str)) -> Boot {
        let a = artifacts();
        let initrd = match &self.image {
            ImageChoice::None => None,
            ImageChoice::Default => Some(a.image.clone()),
            ImageChoice::Bytes(bytes) => {
                let dir = scenario_dir();
                let path = dir.join(format!("{}.img", self.name));
                if let Err(e) = fs::create_dir_all(&dir).and_then(|_| fs::write(&path, bytes)) {
                    panic!(
                        "scenario {}: cannot write {}: {e}",
                        self.name,
                        path.display()
                    );
                }
                Some(path)
            }
        };
        let cfg = QemuConfig {
            qemu: a.qemu.clone(),
            kernel: a.core_hv.clone(),
            initrd,
            smp: self.smp,
            memory_mib: self.memory_mib,
            append: self.append.clone(),
        };
        let command = if self.qemu_args.is_empty() {
            cfg.command_line()
        } else {
            format!("{} {}", cfg.command_line(), self.qemu_args.join(" "))
        };
        let run = match qemu::run_with_args(&cfg, &self.qemu_args, Some(self.timeout), on_line) {
            Ok(r) => r,
            Err(e) => panic!("scenario {}: {e}\n  command: {command}", self.name),
        };
        Boot {
            name: self.name,
            outcome: Outcome::classify(run.ending),
            command,
            run,
        }
    }
}

/// A finished boot and the checks on it. Each `expect_*` panics with the context needed to
/// see why.
#[derive(Debug)]
pub struct Boot {
    pub name: String,
    pub outcome: Outcome,
    pub command: String,
    pub run: Run,
}

/// Console lines shown when a check fails.
pub const TAIL_LINES: usize = 40;

impl Boot {
    pub fn console(&self) -> &Console {
        &self.run.console
    }

    /// Fail the scenario, showing how the boot ended and what it printed last.
    pub fn fail(&self, what: &str) -> ! {
        let stderr = self.run.stderr.trim_end();
        panic!(
            "scenario {}: {what}\n  ended: {} after {:.2} s\n  command: {}\n  last console lines:\n{}{}",
            self.name,
            self.outcome,
            self.run.wall.as_secs_f64(),
            self.command,
            self.run.console.tail(TAIL_LINES),
            if stderr.is_empty() {
                String::new()
            } else {
                format!("  QEMU's own messages:\n{stderr}\n")
            }
        );
    }

    pub fn expect_outcome(&self, expected: Outcome) -> &Boot {
        if self.outcome != expected {
            self.fail(&format!("expected {expected}"));
        }
        self
    }

    /// The ready line (fails the scenario if there is none).
    pub fn expect_ready(&self) -> ReadyLine {
        match self.console().ready() {
            Some(r) => r,
            None => self.fail("no ready line (`bulkhead: ready: ...`)"),
        }
    }

    /// Every `RESULT` line passed (and there may be none).
    pub fn expect_no_failed_results(&self) -> &Boot {
        let j = self.console().judge_results();
        if !j.failed.is_empty() {
            self.fail(&format!("RESULT lines failed: {}", j.failed.join("; ")));
        }
        self
    }

    /// The details of domain `name`'s `RESULT` line, which must say `pass`.
    pub fn expect_result_pass(&self, name: &str) -> String {
        let results = self.console().results();
        match results.iter().find(|r| r.name == name) {
            Some(r) if r.verdict == shared_abi::console::Verdict::Pass => r.details.to_string(),
            Some(r) => self.fail(&format!("{name} reported fail: {}", r.details)),
            None => self.fail(&format!("no RESULT line from {name}")),
        }
    }

    /// Why domain `name` stopped, from `bulkhead: domain <id> (<name>) exited: <why>`.
    pub fn domain_exit(&self, name: &str) -> Option<String> {
        let needle = format!("({name}) exited: ");
        self.console()
            .lines()
            .iter()
            .find(|l| l.starts_with("bulkhead: domain ") && l.contains(&needle))
            .and_then(|l| l.split(&needle).nth(1).map(str::to_string))
    }

    /// Domain `name` stopped for exactly `why`.
    pub fn expect_domain_exit(&self, name: &str, why: &str) -> &Boot {
        match self.domain_exit(name) {
            Some(w) if w == why => self,
            Some(w) => self.fail(&format!("domain {name} exited with {w}, expected {why}")),
            None => self.fail(&format!("no exit line for domain {name}")),
        }
    }

    /// The image was refused with exactly `reason`, and no exception was raised.
    pub fn expect_refusal(&self, reason: &str) -> &Boot {
        match self.console().refusal() {
            Some(r) if r == reason => {}
            Some(r) => self.fail(&format!(
                "refused with the wrong reason:\n    got:      {r}\n    expected: {reason}"
            )),
            None => self.fail(&format!("no refusal line; expected: {reason}")),
        }
        if let Some(report) = self.console().exception_report() {
            self.fail(&format!(
                "a refused image must not raise an exception, but the console shows:\n{}",
                report.text
            ));
        }
        if self.console().ready().is_some() {
            self.fail("a refused image must not reach the ready line");
        }
        self
    }

    /// An exception report for `kind`, after the ready line, naming the vector, RIP and the
    /// registers.
    pub fn expect_exception_report(&self, kind: FaultKind) -> &Boot {
        let Some((ready_at, _)) = self.console().ready_at() else {
            self.fail("no ready line before the deliberate fault");
        };
        let Some(report) = self.console().exception_report_from(ready_at + 1) else {
            self.fail(&format!(
                "no exception report for {} after the ready line",
                kind.mnemonic()
            ));
        };
        let missing = report.missing(kind);
        if !missing.is_empty() {
            self.fail(&format!(
                "the exception report does not name {}",
                missing.join(", ")
            ));
        }
        self
    }
}

/// Deliberate damage to boot images. Each function returns a new image; the refusal it must
/// cause is what `shared_abi::manifest::parse_image` says about it on the host.
pub mod toolstack;

pub mod corrupt {
    use shared_abi::manifest::{
        Blob, DomainSpec, HEADER_LEN, ImageDomain, Manifest, build_image, parse_image, reseal,
    };

    /// A valid image with two domains (their "ELFs" are filler: the manifest checks run
    /// before any ELF is read, and these images are only booted damaged).
    pub fn image_with_two_domains() -> Vec<u8> {
        let spec = |name: &str| DomainSpec {
            name: name.into(),
            elf: Blob { offset: 0, len: 0 },
            memory_kib: 4096,
            vcpus: 1,
            weight: 256,
            cap_percent: 0,
            capabilities: Default::default(),
            cmdline: String::new(),
            devices: Vec::new(),
            on_poweroff: shared_abi::domain_config::LifecycleAction::Destroy,
            on_reboot: shared_abi::domain_config::LifecycleAction::Destroy,
            on_crash: shared_abi::domain_config::LifecycleAction::Destroy,
        };
        let a = vec![0x7f; 6000];
        let b = vec![0x45; 300];
        build_image(&[
            ImageDomain {
                spec: spec("alpha"),
                elf: &a,
            },
            ImageDomain {
                spec: spec("beta"),
                elf: &b,
            },
        ])
        .expect("encoding a two-domain manifest")
    }

    pub fn wrong_magic(mut img: Vec<u8>) -> Vec<u8> {
        img[0..8].copy_from_slice(b"NOTBULKH");
        img
    }

    pub fn wrong_version(mut img: Vec<u8>, version: u32) -> Vec<u8> {
        img[8..12].copy_from_slice(&version.to_le_bytes());
        img
    }

    /// Flip one bit of the manifest without resealing.
    pub fn bad_checksum(mut img: Vec<u8>) -> Vec<u8> {
        img[HEADER_LEN] ^= 0x01;
        img
    }

    /// Cut the image to `len` bytes.
    pub fn truncated(mut img: Vec<u8>, len: usize) -> Vec<u8> {
        img.truncate(len);
        img
    }

    /// Replace the manifest by `bytes` (which must fit before the first ELF) and reseal, so
    /// the checks behind the checksum are reached.
    pub fn with_manifest_bytes(img: &[u8], bytes: &[u8]) -> Vec<u8> {
        let old_len = u32::from_le_bytes([img[16], img[17], img[18], img[19]]) as usize;
        let parsed = parse_image(img).expect("the base image must be valid");
        let first_payload = parsed
            .manifest
            .domains
            .iter()
            .map(|d| d.elf.offset as usize)
            .min()
            .unwrap_or(img.len());
        assert!(
            HEADER_LEN + bytes.len() <= first_payload,
            "the new manifest overlaps the first ELF"
        );
        let mut out = img.to_vec();
        out[HEADER_LEN..HEADER_LEN + old_len].fill(0);
        out[HEADER_LEN..HEADER_LEN + bytes.len()].copy_from_slice(bytes);
        out[16..20].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        reseal(&mut out);
        out
    }

    /// Edit the decoded manifest, re-encode it and reseal.
    pub fn with_manifest(img: &[u8], edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
        let mut m = parse_image(img)
            .expect("the base image must be valid")
            .manifest;
        edit(&mut m);
        let bytes = postcard::to_allocvec(&m).expect("re-encoding the manifest");
        with_manifest_bytes(img, &bytes)
    }

    /// Domain 1's ELF moved past the end of the image.
    pub fn elf_out_of_range(img: &[u8]) -> Vec<u8> {
        let end = img.len() as u64;
        with_manifest(img, |m| {
            m.domains[1].elf = Blob {
                offset: end.next_multiple_of(4096) + 4096,
                len: 4096,
            }
        })
    }

    /// Domain 1's ELF placed on top of domain 0's.
    pub fn elf_overlapping(img: &[u8]) -> Vec<u8> {
        with_manifest(img, |m| {
            let first = m.domains[0].elf;
            m.domains[1].elf = Blob {
                offset: first.offset,
                len: 100,
            };
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use shared_abi::manifest::{DomainProblem, IMAGE_VERSION, ImageError};

        fn err(img: &[u8]) -> ImageError {
            parse_image(img).unwrap_err()
        }

        #[test]
        fn each_corruption_causes_its_own_refusal() {
            let base = image_with_two_domains();
            assert!(parse_image(&base).is_ok());
            assert!(matches!(
                err(&wrong_magic(base.clone())),
                ImageError::BadMagic { .. }
            ));
            assert_eq!(
                err(&wrong_version(base.clone(), IMAGE_VERSION + 1)),
                ImageError::UnsupportedVersion {
                    found: IMAGE_VERSION + 1
                }
            );
            assert!(matches!(
                err(&bad_checksum(base.clone())),
                ImageError::ChecksumMismatch { .. }
            ));
            let n = base.len();
            assert_eq!(
                err(&truncated(base.clone(), n - 100)),
                ImageError::Truncated {
                    have: n as u64 - 100,
                    need: n as u64
                }
            );
            assert_eq!(
                err(&truncated(base.clone(), 40)),
                ImageError::Truncated { have: 40, need: 64 }
            );
            assert_eq!(
                err(&with_manifest_bytes(&base, &[0xff; 8])),
                ImageError::ManifestUndecodable
            );
            assert!(matches!(
                err(&elf_out_of_range(&base)),
                ImageError::Domain {
                    index: 1,
                    problem: DomainProblem::ElfOutOfRange { .. }
                }
            ));
            assert_eq!(
                err(&elf_overlapping(&base)),
                ImageError::Domain {
                    index: 1,
                    problem: DomainProblem::ElfOverlaps { other: 0 }
                }
            );
        }

        #[test]
        fn unedited_manifest_round_trips() {
            let base = image_with_two_domains();
            assert_eq!(with_manifest(&base, |_| {}), base);
        }
    }
}

/// Image builds share one cargo target directory: one at a time.
static SYSTEM_BUILD: Mutex<()> = Mutex::new(());

/// Build the boot image of an inline system description (the `systems/*.toml` format) into
/// its own scenario directory `<tag>-<name>`, and return its bytes.
pub fn system_image(tag: &str, name: &str, toml: &str) -> Vec<u8> {
    let _g = SYSTEM_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let ws = Workspace::locate();
    let dir = scenario_dir().join(format!("{tag}-{name}"));
    fs::create_dir_all(&dir).expect("scenario dir");
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, toml).expect("writing the system description");
    let sys =
        bulkhead_build::system::parse(&path, toml).unwrap_or_else(|e| panic!("system {name}: {e}"));
    let built = bulkhead_build::image::write(&ws, &sys, &dir)
        .unwrap_or_else(|e| panic!("image {name}: {e:#}"));
    fs::read(&built.image).expect("reading the built image")
}

/// `GET /` over HTTP/1.0 to `127.0.0.1:<port>` (a guest's server behind a QEMU port
/// forward), retried every 300 ms until an answer or the deadline: the answer, or the last
/// error.
pub fn http_get(port: u16, deadline: std::time::Instant) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut last = String::from("no attempt");
    while std::time::Instant::now() < deadline {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: bulkhead\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(r) if !r.is_empty() => return Ok(r),
            Ok(_) => last = "empty answer".into(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(last)
}
