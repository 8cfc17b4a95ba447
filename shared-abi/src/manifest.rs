//! The boot image: Bulkhead's manifest plus the domain ELF files, in the one module QEMU's PVH
//! loader passes (`-initrd`).
//!
//! Layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BULKHEAD` |
//! | 8 | 4 | version ([`IMAGE_VERSION`]) |
//! | 12 | 4 | header length (64) |
//! | 16 | 4 | manifest length (postcard bytes at offset 64) |
//! | 20 | 4 | CRC-32 (IEEE) of bytes 64..total length |
//! | 24 | 8 | total length |
//! | 32 | 32 | reserved, zero |
//! | 64 | manifest length | [`Manifest`], postcard |
//! | … | | domain ELF files, each page-aligned, where the manifest says |
//!
//! The image is hostile input to the hypervisor: [`parse_image`] checks every field before
//! anything is built from it and answers one [`ImageError`] naming the field and what was
//! allowed.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use serde::{Deserialize, Serialize};

use crate::capability::Capabilities;
use crate::domain_config::LifecycleAction;
use crate::pci::{DeviceAssignment, DeviceMatchError, MAX_DEVICE_MATCHES};

pub const IMAGE_MAGIC: [u8; 8] = *b"BULKHEAD";
/// Version 2 added [`DomainSpec::devices`]; version 3 the lifecycle policies
/// ([`DomainSpec::on_poweroff`], [`DomainSpec::on_reboot`], [`DomainSpec::on_crash`]).
pub const IMAGE_VERSION: u32 = 3;
pub const HEADER_LEN: usize = 64;

/// Limits on what a manifest may ask for; values outside are refused, not clamped.
pub const MAX_BOOT_DOMAINS: usize = 64;
pub const MAX_NAME_LEN: usize = 32;
pub const MAX_CMDLINE_LEN: usize = 1024;
pub const MAX_VCPUS: u32 = 32;
pub const MIN_MEMORY_KIB: u64 = 256;
/// 64 GiB: far above what QEMU tests give, low enough that arithmetic cannot overflow.
pub const MAX_MEMORY_KIB: u64 = 64 << 20;
pub const MAX_WEIGHT: u32 = 65535;
/// Image payloads are aligned so the hypervisor can map them page by page.
pub const PAYLOAD_ALIGN: usize = crate::PAGE_SIZE;

/// A byte range inside the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub offset: u64,
    pub len: u64,
}

impl Blob {
    fn range(&self) -> Option<Range<u64>> {
        Some(self.offset..self.offset.checked_add(self.len)?)
    }
}

/// One boot domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSpec {
    pub name: String,
    /// Where its ELF file lies in the image.
    pub elf: Blob,
    pub memory_kib: u64,
    pub vcpus: u32,
    /// Credit-scheduler weight (relative share), 1..=65535.
    pub weight: u32,
    /// CPU cap in percent of one CPU; 0 = uncapped.
    pub cap_percent: u32,
    pub capabilities: Capabilities,
    pub cmdline: String,
    /// The PCI functions this domain owns (at most [`MAX_DEVICE_MATCHES`] matches; needs
    /// [`Capabilities::DEVICE_OWNER`]). Resolved against the enumerated functions at boot.
    pub devices: Vec<DeviceAssignment>,
    /// What the control domain does when this domain powers off, reboots or crashes
    /// (xl's `on_*`; [`LifecycleAction::Destroy`] by default). Applied by a domain holding
    /// `DOMAIN_CONTROL` through the hypervisor's rebuild-boot-domain domctl; without one, every
    /// dead boot domain stays destroyed. `Preserve` also tells the hypervisor to keep the
    /// domain's memory when it shuts down (not when it faults).
    pub on_poweroff: LifecycleAction,
    pub on_reboot: LifecycleAction,
    pub on_crash: LifecycleAction,
}

impl DomainSpec {
    /// The policy for a Xen `SHUTDOWN_*` reason (poweroff, reboot; everything else, a fault
    /// included, counts as a crash).
    pub fn action_for(&self, shutdown_reason: u32) -> LifecycleAction {
        match shutdown_reason {
            0 => self.on_poweroff,
            1 => self.on_reboot,
            _ => self.on_crash,
        }
    }
}

/// The manifest: the boot domains, built in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub domains: Vec<DomainSpec>,
}

/// A validated image: the manifest and the bytes its blobs point into.
#[derive(Debug)]
pub struct BootImage<'a> {
    pub manifest: Manifest,
    bytes: &'a [u8],
}

impl<'a> BootImage<'a> {
    /// The ELF bytes of domain `index` (ranges were checked by [`parse_image`]).
    pub fn elf(&self, index: usize) -> Option<&'a [u8]> {
        let d = self.manifest.domains.get(index)?;
        let r = d.elf.range()?;
        self.bytes.get(r.start as usize..r.end as usize)
    }
}

/// Why an image was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageError {
    Truncated {
        have: u64,
        need: u64,
    },
    BadMagic {
        found: [u8; 8],
    },
    UnsupportedVersion {
        found: u32,
    },
    BadHeaderLength {
        found: u32,
    },
    ManifestOutOfRange {
        manifest_len: u32,
        total_len: u64,
    },
    ChecksumMismatch {
        stored: u32,
        computed: u32,
    },
    ReservedNotZero,
    ManifestUndecodable,
    ManifestTrailingBytes {
        extra: usize,
    },
    TooManyDomains {
        count: usize,
    },
    Domain {
        index: usize,
        problem: DomainProblem,
    },
}

/// What is wrong with one domain entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainProblem {
    NameEmpty,
    NameTooLong {
        len: usize,
    },
    NameCharacter,
    NameDuplicate,
    ElfOutOfRange {
        offset: u64,
        len: u64,
        payload: Range<u64>,
    },
    ElfMisaligned {
        offset: u64,
    },
    ElfEmpty,
    ElfOverlaps {
        other: usize,
    },
    Memory {
        kib: u64,
    },
    Vcpus {
        count: u32,
    },
    Weight {
        weight: u32,
    },
    Cap {
        percent: u32,
        max: u32,
    },
    CmdlineTooLong {
        len: usize,
    },
    TooManyDevices {
        count: usize,
    },
    Device {
        index: usize,
        error: DeviceMatchError,
    },
    DevicesWithoutCapability,
    /// `restart` for a domain holding `domain_control` or `xenstore_service`: the domain that
    /// applies the policies (or every other domain's store) cannot restart itself safely.
    RestartOfServiceDomain,
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Truncated { have, need } => {
                write!(
                    f,
                    "boot image truncated: {have} bytes present, {need} needed"
                )
            }
            ImageError::BadMagic { found } => {
                write!(f, "boot image magic is {found:02x?}, expected \"BULKHEAD\"")
            }
            ImageError::UnsupportedVersion { found } => write!(
                f,
                "boot image version {found} is not supported (this hypervisor reads {IMAGE_VERSION})"
            ),
            ImageError::BadHeaderLength { found } => {
                write!(f, "boot image header length {found}, expected {HEADER_LEN}")
            }
            ImageError::ManifestOutOfRange {
                manifest_len,
                total_len,
            } => write!(
                f,
                "boot image manifest length {manifest_len} runs past the image's total length {total_len}"
            ),
            ImageError::ChecksumMismatch { stored, computed } => write!(
                f,
                "boot image checksum mismatch: header says {stored:#010x}, contents give {computed:#010x}"
            ),
            ImageError::ReservedNotZero => {
                write!(f, "boot image header reserved bytes 32..64 are not zero")
            }
            ImageError::ManifestUndecodable => write!(f, "boot image manifest does not decode"),
            ImageError::ManifestTrailingBytes { extra } => {
                write!(f, "boot image manifest has {extra} trailing bytes")
            }
            ImageError::TooManyDomains { count } => write!(
                f,
                "manifest names {count} domains, at most {MAX_BOOT_DOMAINS} allowed"
            ),
            ImageError::Domain { index, problem } => {
                write!(f, "manifest domain {index}: ")?;
                match problem {
                    DomainProblem::NameEmpty => write!(f, "name is empty"),
                    DomainProblem::NameTooLong { len } => {
                        write!(f, "name is {len} bytes, at most {MAX_NAME_LEN} allowed")
                    }
                    DomainProblem::NameCharacter => {
                        write!(f, "name may hold only a-z A-Z 0-9 - _ .")
                    }
                    DomainProblem::NameDuplicate => write!(f, "name is used by an earlier domain"),
                    DomainProblem::ElfOutOfRange {
                        offset,
                        len,
                        payload,
                    } => write!(
                        f,
                        "elf at {offset:#x}+{len:#x} is outside the payload {:#x}..{:#x}",
                        payload.start, payload.end
                    ),
                    DomainProblem::ElfMisaligned { offset } => {
                        write!(
                            f,
                            "elf offset {offset:#x} is not {PAYLOAD_ALIGN}-byte aligned"
                        )
                    }
                    DomainProblem::ElfEmpty => write!(f, "elf length is 0"),
                    DomainProblem::ElfOverlaps { other } => {
                        write!(f, "elf overlaps the elf of domain {other}")
                    }
                    DomainProblem::Memory { kib } => write!(
                        f,
                        "memory_kib {kib} outside {MIN_MEMORY_KIB}..={MAX_MEMORY_KIB}"
                    ),
                    DomainProblem::Vcpus { count } => {
                        write!(f, "vcpus {count} outside 1..={MAX_VCPUS}")
                    }
                    DomainProblem::Weight { weight } => {
                        write!(f, "weight {weight} outside 1..={MAX_WEIGHT}")
                    }
                    DomainProblem::Cap { percent, max } => {
                        write!(f, "cap_percent {percent} outside 0..={max}")
                    }
                    DomainProblem::CmdlineTooLong { len } => {
                        write!(
                            f,
                            "cmdline is {len} bytes, at most {MAX_CMDLINE_LEN} allowed"
                        )
                    }
                    DomainProblem::TooManyDevices { count } => write!(
                        f,
                        "{count} device matches, at most {MAX_DEVICE_MATCHES} allowed"
                    ),
                    DomainProblem::Device { index, error } => {
                        write!(f, "devices[{index}]: {error}")
                    }
                    DomainProblem::DevicesWithoutCapability => write!(
                        f,
                        "devices are assigned but the domain lacks the device_owner capability"
                    ),
                    DomainProblem::RestartOfServiceDomain => write!(
                        f,
                        "on_poweroff/on_reboot/on_crash = restart is not allowed for a domain \
                         holding domain_control or xenstore_service"
                    ),
                }
            }
        }
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Validate an image and decode its manifest. Never panics, whatever the bytes.
pub fn parse_image(bytes: &[u8]) -> Result<BootImage<'_>, ImageError> {
    let have = bytes.len() as u64;
    if bytes.len() < HEADER_LEN {
        return Err(ImageError::Truncated {
            have,
            need: HEADER_LEN as u64,
        });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&bytes[0..8]);
    if magic != IMAGE_MAGIC {
        return Err(ImageError::BadMagic { found: magic });
    }
    let version = le_u32(bytes, 8);
    if version != IMAGE_VERSION {
        return Err(ImageError::UnsupportedVersion { found: version });
    }
    let header_len = le_u32(bytes, 12);
    if header_len as usize != HEADER_LEN {
        return Err(ImageError::BadHeaderLength { found: header_len });
    }
    let manifest_len = le_u32(bytes, 16);
    let stored_crc = le_u32(bytes, 20);
    let total_len = le_u64(bytes, 24);
    if bytes[32..HEADER_LEN].iter().any(|&b| b != 0) {
        return Err(ImageError::ReservedNotZero);
    }
    if total_len > have {
        return Err(ImageError::Truncated {
            have,
            need: total_len,
        });
    }
    let manifest_end = HEADER_LEN as u64 + manifest_len as u64;
    if manifest_end > total_len {
        return Err(ImageError::ManifestOutOfRange {
            manifest_len,
            total_len,
        });
    }
    // total_len <= have, so these casts and slices are in bounds.
    let body = &bytes[HEADER_LEN..total_len as usize];
    let computed = crc32fast::hash(body);
    if computed != stored_crc {
        return Err(ImageError::ChecksumMismatch {
            stored: stored_crc,
            computed,
        });
    }
    let manifest_bytes = &bytes[HEADER_LEN..manifest_end as usize];
    let (manifest, rest): (Manifest, &[u8]) =
        postcard::take_from_bytes(manifest_bytes).map_err(|_| ImageError::ManifestUndecodable)?;
    if !rest.is_empty() {
        return Err(ImageError::ManifestTrailingBytes { extra: rest.len() });
    }
    validate_manifest(&manifest, manifest_end..total_len)?;
    Ok(BootImage {
        manifest,
        bytes: &bytes[..total_len as usize],
    })
}

fn validate_manifest(m: &Manifest, payload: Range<u64>) -> Result<(), ImageError> {
    if m.domains.len() > MAX_BOOT_DOMAINS {
        return Err(ImageError::TooManyDomains {
            count: m.domains.len(),
        });
    }
    for (index, d) in m.domains.iter().enumerate() {
        let fail = |problem| Err(ImageError::Domain { index, problem });
        if d.name.is_empty() {
            return fail(DomainProblem::NameEmpty);
        }
        if d.name.len() > MAX_NAME_LEN {
            return fail(DomainProblem::NameTooLong { len: d.name.len() });
        }
        if !d
            .name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return fail(DomainProblem::NameCharacter);
        }
        if m.domains[..index].iter().any(|e| e.name == d.name) {
            return fail(DomainProblem::NameDuplicate);
        }
        if d.elf.len == 0 {
            return fail(DomainProblem::ElfEmpty);
        }
        let Some(r) = d
            .elf
            .range()
            .filter(|r| r.start >= payload.start && r.end <= payload.end)
        else {
            return fail(DomainProblem::ElfOutOfRange {
                offset: d.elf.offset,
                len: d.elf.len,
                payload,
            });
        };
        if r.start % PAYLOAD_ALIGN as u64 != 0 {
            return fail(DomainProblem::ElfMisaligned { offset: r.start });
        }
        for (other, e) in m.domains[..index].iter().enumerate() {
            if let Some(o) = e.elf.range()
                && o.start < r.end
                && r.start < o.end
            {
                return fail(DomainProblem::ElfOverlaps { other });
            }
        }
        if !(MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&d.memory_kib) {
            return fail(DomainProblem::Memory { kib: d.memory_kib });
        }
        if !(1..=MAX_VCPUS).contains(&d.vcpus) {
            return fail(DomainProblem::Vcpus { count: d.vcpus });
        }
        if !(1..=MAX_WEIGHT).contains(&d.weight) {
            return fail(DomainProblem::Weight { weight: d.weight });
        }
        let max_cap = 100 * d.vcpus;
        if d.cap_percent > max_cap {
            return fail(DomainProblem::Cap {
                percent: d.cap_percent,
                max: max_cap,
            });
        }
        if d.cmdline.len() > MAX_CMDLINE_LEN {
            return fail(DomainProblem::CmdlineTooLong {
                len: d.cmdline.len(),
            });
        }
        if d.devices.len() > MAX_DEVICE_MATCHES {
            return fail(DomainProblem::TooManyDevices {
                count: d.devices.len(),
            });
        }
        for (i, dev) in d.devices.iter().enumerate() {
            if let Err(error) = dev.select.validate() {
                return fail(DomainProblem::Device { index: i, error });
            }
        }
        if !d.devices.is_empty() && !d.capabilities.contains(Capabilities::DEVICE_OWNER) {
            return fail(DomainProblem::DevicesWithoutCapability);
        }
        let restarts = [d.on_poweroff, d.on_reboot, d.on_crash].contains(&LifecycleAction::Restart);
        if restarts
            && d.capabilities
                .intersects(Capabilities::DOMAIN_CONTROL | Capabilities::XENSTORE_SERVICE)
        {
            return fail(DomainProblem::RestartOfServiceDomain);
        }
    }
    Ok(())
}

/// A domain to put into an image: its spec (the `elf` blob is filled in) and its ELF bytes.
pub struct ImageDomain<'a> {
    pub spec: DomainSpec,
    pub elf: &'a [u8],
}

/// Write an image: header, manifest, then each ELF page-aligned.
pub fn build_image(domains: &[ImageDomain<'_>]) -> Result<Vec<u8>, postcard::Error> {
    // The manifest's size depends on the offsets it records, so lay out with placeholder
    // offsets of the final width: postcard varints grow with the value, so iterate until the
    // layout is stable (two rounds in practice).
    let mut specs: Vec<DomainSpec> = domains.iter().map(|d| d.spec.clone()).collect();
    let mut manifest_bytes = Vec::new();
    for _ in 0..4 {
        manifest_bytes = postcard::to_allocvec(&Manifest {
            domains: specs.clone(),
        })?;
        let mut at = align_up(HEADER_LEN + manifest_bytes.len(), PAYLOAD_ALIGN);
        let mut changed = false;
        for (s, d) in specs.iter_mut().zip(domains) {
            let blob = Blob {
                offset: at as u64,
                len: d.elf.len() as u64,
            };
            changed |= s.elf != blob;
            s.elf = blob;
            at = align_up(at + d.elf.len(), PAYLOAD_ALIGN);
        }
        if !changed {
            break;
        }
    }
    let total = specs
        .last()
        .map(|s| (s.elf.offset + s.elf.len) as usize)
        .unwrap_or(HEADER_LEN + manifest_bytes.len());
    let mut out = alloc::vec![0u8; total];
    out[HEADER_LEN..HEADER_LEN + manifest_bytes.len()].copy_from_slice(&manifest_bytes);
    for (s, d) in specs.iter().zip(domains) {
        let start = s.elf.offset as usize;
        out[start..start + d.elf.len()].copy_from_slice(d.elf);
    }
    out[0..8].copy_from_slice(&IMAGE_MAGIC);
    out[8..12].copy_from_slice(&IMAGE_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out[16..20].copy_from_slice(&(manifest_bytes.len() as u32).to_le_bytes());
    out[24..32].copy_from_slice(&(total as u64).to_le_bytes());
    let crc = crc32fast::hash(&out[HEADER_LEN..]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Recompute and store the checksum after a deliberate edit (tests of the validator use this
/// to reach the checks behind the checksum).
pub fn reseal(image: &mut [u8]) {
    if image.len() >= HEADER_LEN {
        let total = (le_u64(image, 24) as usize).min(image.len());
        let crc = crc32fast::hash(&image[HEADER_LEN..total.max(HEADER_LEN)]);
        image[20..24].copy_from_slice(&crc.to_le_bytes());
    }
}

const fn align_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;

    use crate::pci::{DeviceMatch, PciAddress};

    fn spec(name: &str) -> DomainSpec {
        DomainSpec {
            name: name.into(),
            elf: Blob { offset: 0, len: 0 },
            memory_kib: 4096,
            vcpus: 1,
            weight: 256,
            cap_percent: 0,
            capabilities: Capabilities::empty(),
            cmdline: String::new(),
            devices: Vec::new(),
            on_poweroff: LifecycleAction::Destroy,
            on_reboot: LifecycleAction::Destroy,
            on_crash: LifecycleAction::Destroy,
        }
    }

    fn two_domain_image() -> Vec<u8> {
        let a = vec![0x7fu8; 5000];
        let b = vec![0x45u8; 100];
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
        .unwrap()
    }

    #[test]
    fn built_image_parses_and_returns_each_elf() {
        let img = two_domain_image();
        let parsed = parse_image(&img).unwrap();
        assert_eq!(parsed.manifest.domains.len(), 2);
        assert_eq!(parsed.elf(0).unwrap(), &[0x7f; 5000][..]);
        assert_eq!(parsed.elf(1).unwrap(), &[0x45; 100][..]);
        assert_eq!(parsed.manifest.domains[1].elf.offset % 4096, 0);
    }

    #[test]
    fn empty_manifest_is_valid() {
        let img = build_image(&[]).unwrap();
        assert!(parse_image(&img).unwrap().manifest.domains.is_empty());
    }

    #[test]
    fn bad_magic_is_named() {
        let mut img = two_domain_image();
        img[0] = b'X';
        let e = parse_image(&img).unwrap_err();
        assert!(matches!(e, ImageError::BadMagic { .. }));
        assert!(e.to_string().contains("magic"));
    }

    #[test]
    fn bad_version_checksum_and_truncation_are_refused() {
        let mut img = two_domain_image();
        img[8] = 9;
        assert_eq!(
            parse_image(&img).unwrap_err(),
            ImageError::UnsupportedVersion { found: 9 }
        );
        let mut img = two_domain_image();
        let last = img.len() - 1;
        img[last] ^= 1;
        assert!(matches!(
            parse_image(&img).unwrap_err(),
            ImageError::ChecksumMismatch { .. }
        ));
        let img = two_domain_image();
        assert!(matches!(
            parse_image(&img[..img.len() - 1]).unwrap_err(),
            ImageError::Truncated { .. }
        ));
        assert!(matches!(
            parse_image(&img[..10]).unwrap_err(),
            ImageError::Truncated { have: 10, need: 64 }
        ));
    }

    #[test]
    fn overlapping_and_out_of_range_elves_are_refused() {
        let img = two_domain_image();
        let parsed = parse_image(&img).unwrap();
        let mut m = parsed.manifest.clone();
        m.domains[1].elf = m.domains[0].elf;
        assert_eq!(
            validate_manifest(&m, 64..img.len() as u64).unwrap_err(),
            ImageError::Domain {
                index: 1,
                problem: DomainProblem::ElfOverlaps { other: 0 }
            }
        );
        m.domains[1].elf = Blob {
            offset: u64::MAX - 1,
            len: 10,
        };
        assert!(matches!(
            validate_manifest(&m, 64..img.len() as u64).unwrap_err(),
            ImageError::Domain {
                index: 1,
                problem: DomainProblem::ElfOutOfRange { .. }
            }
        ));
    }

    #[test]
    fn domain_limits_name_the_field() {
        let mut m = Manifest {
            domains: vec![spec("a")],
        };
        m.domains[0].elf = Blob {
            offset: 4096,
            len: 1,
        };
        m.domains[0].vcpus = 0;
        let e = validate_manifest(&m, 64..8192).unwrap_err();
        assert_eq!(e.to_string(), "manifest domain 0: vcpus 0 outside 1..=32");
        m.domains[0].vcpus = 1;
        m.domains[0].memory_kib = 1;
        assert!(e.to_string().contains("vcpus"));
        assert!(
            validate_manifest(&m, 64..8192)
                .unwrap_err()
                .to_string()
                .contains("memory_kib 1")
        );
        m.domains[0].memory_kib = 4096;
        m.domains[0].name = "bad name".into();
        assert!(matches!(
            validate_manifest(&m, 64..8192).unwrap_err(),
            ImageError::Domain {
                problem: DomainProblem::NameCharacter,
                ..
            }
        ));
    }

    fn one_domain_manifest() -> Manifest {
        let mut m = Manifest {
            domains: vec![spec("drv")],
        };
        m.domains[0].elf = Blob {
            offset: 4096,
            len: 1,
        };
        m
    }

    fn blk_by_id() -> DeviceAssignment {
        DeviceAssignment {
            select: DeviceMatch::Id {
                vendor: 0x1af4,
                device: Some(0x1001),
            },
            insecure_dma: false,
        }
    }

    #[test]
    fn devices_round_trip_through_an_image() {
        let mut s = spec("blk");
        s.capabilities = Capabilities::DEVICE_OWNER;
        s.devices = vec![
            blk_by_id(),
            DeviceAssignment {
                select: DeviceMatch::Address(PciAddress::new(0, 0, 3, 0).unwrap()),
                insecure_dma: true,
            },
        ];
        let elf = vec![1u8; 10];
        let img = build_image(&[ImageDomain {
            spec: s.clone(),
            elf: &elf,
        }])
        .unwrap();
        let parsed = parse_image(&img).unwrap();
        assert_eq!(parsed.manifest.domains[0].devices, s.devices);
    }

    #[test]
    fn too_many_device_matches_are_refused() {
        let mut m = one_domain_manifest();
        m.domains[0].capabilities = Capabilities::DEVICE_OWNER;
        m.domains[0].devices = vec![blk_by_id(); MAX_DEVICE_MATCHES + 1];
        let e = validate_manifest(&m, 64..8192).unwrap_err();
        assert_eq!(
            e,
            ImageError::Domain {
                index: 0,
                problem: DomainProblem::TooManyDevices { count: 17 }
            }
        );
        assert_eq!(
            e.to_string(),
            "manifest domain 0: 17 device matches, at most 16 allowed"
        );
        m.domains[0].devices.truncate(MAX_DEVICE_MATCHES);
        assert_eq!(validate_manifest(&m, 64..8192), Ok(()));
    }

    #[test]
    fn invalid_device_match_is_refused_with_its_index() {
        let mut m = one_domain_manifest();
        m.domains[0].capabilities = Capabilities::DEVICE_OWNER;
        let bad = PciAddress {
            segment: 0,
            bus: 0,
            device: 32,
            function: 0,
        };
        m.domains[0].devices = vec![
            blk_by_id(),
            DeviceAssignment {
                select: DeviceMatch::Address(bad),
                insecure_dma: false,
            },
        ];
        let e = validate_manifest(&m, 64..8192).unwrap_err();
        assert_eq!(
            e,
            ImageError::Domain {
                index: 0,
                problem: DomainProblem::Device {
                    index: 1,
                    error: DeviceMatchError::BadAddress(bad)
                }
            }
        );
        assert!(e.to_string().starts_with("manifest domain 0: devices[1]: "));
        m.domains[0].devices[1].select = DeviceMatch::Id {
            vendor: 0xffff,
            device: None,
        };
        assert!(matches!(
            validate_manifest(&m, 64..8192).unwrap_err(),
            ImageError::Domain {
                problem: DomainProblem::Device {
                    index: 1,
                    error: DeviceMatchError::AbsentVendor
                },
                ..
            }
        ));
    }

    #[test]
    fn devices_without_device_owner_capability_are_refused() {
        let mut m = one_domain_manifest();
        m.domains[0].devices = vec![blk_by_id()];
        assert_eq!(
            validate_manifest(&m, 64..8192).unwrap_err(),
            ImageError::Domain {
                index: 0,
                problem: DomainProblem::DevicesWithoutCapability
            }
        );
        m.domains[0].capabilities = Capabilities::DEVICE_OWNER;
        assert_eq!(validate_manifest(&m, 64..8192), Ok(()));
    }

    #[test]
    fn lifecycle_policies_round_trip_and_pick_by_reason() {
        let mut s = spec("drv");
        s.on_crash = LifecycleAction::Restart;
        s.on_reboot = LifecycleAction::Preserve;
        let elf = vec![1u8; 10];
        let img = build_image(&[ImageDomain {
            spec: s.clone(),
            elf: &elf,
        }])
        .unwrap();
        let d = &parse_image(&img).unwrap().manifest.domains[0];
        assert_eq!(
            (d.on_poweroff, d.on_reboot, d.on_crash),
            (s.on_poweroff, s.on_reboot, s.on_crash)
        );
        assert_eq!(d.action_for(0), LifecycleAction::Destroy);
        assert_eq!(d.action_for(1), LifecycleAction::Preserve);
        assert_eq!(d.action_for(3), LifecycleAction::Restart);
        assert_eq!(d.action_for(99), LifecycleAction::Restart);
    }

    #[test]
    fn restart_of_a_service_domain_is_refused() {
        let mut m = one_domain_manifest();
        m.domains[0].on_crash = LifecycleAction::Restart;
        assert_eq!(validate_manifest(&m, 64..8192), Ok(()));
        for cap in [Capabilities::DOMAIN_CONTROL, Capabilities::XENSTORE_SERVICE] {
            m.domains[0].capabilities = cap;
            let e = validate_manifest(&m, 64..8192).unwrap_err();
            assert_eq!(
                e,
                ImageError::Domain {
                    index: 0,
                    problem: DomainProblem::RestartOfServiceDomain
                }
            );
            assert!(e.to_string().contains("restart is not allowed"), "{e}");
        }
        m.domains[0].on_crash = LifecycleAction::Preserve;
        assert_eq!(validate_manifest(&m, 64..8192), Ok(()));
    }

    #[test]
    fn undecodable_policy_is_refused() {
        // A policy byte past the enum's variants makes the manifest undecodable.
        let mut s = spec("a");
        s.on_crash = LifecycleAction::Preserve;
        let elf = vec![1u8; 10];
        let img = build_image(&[ImageDomain { spec: s, elf: &elf }]).unwrap();
        let mlen = le_u32(&img, 16) as usize;
        // The last three manifest bytes are the three policies (varint enum tags).
        let mut bad = img.clone();
        assert_eq!(bad[HEADER_LEN + mlen - 1], 2);
        bad[HEADER_LEN + mlen - 1] = 7;
        reseal(&mut bad);
        assert_eq!(
            parse_image(&bad).unwrap_err(),
            ImageError::ManifestUndecodable
        );
    }

    #[test]
    fn version_one_images_are_refused() {
        let img = two_domain_image();
        let mut old = img.clone();
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            parse_image(&old).unwrap_err(),
            ImageError::UnsupportedVersion { found: 1 }
        );
        let mut v2 = img.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            parse_image(&v2).unwrap_err(),
            ImageError::UnsupportedVersion { found: 2 }
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_image(&bytes);
        }

        #[test]
        fn parse_never_panics_on_corrupted_valid_image(
            flips in proptest::collection::vec((0usize..6000, any::<u8>()), 1..8),
            reseal_after in any::<bool>(),
        ) {
            let mut img = two_domain_image();
            for (at, v) in flips {
                let n = img.len();
                img[at % n] = v;
            }
            if reseal_after { reseal(&mut img); }
            let _ = parse_image(&img);
        }
    }
}
