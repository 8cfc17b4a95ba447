//! Checking the boot module: Bulkhead's boot image, hostile input like any other. The parse
//! itself is `shared_abi::manifest::parse_image`; this module turns its verdict into what the
//! hypervisor prints: a summary of each boot domain, or exactly one refusal line.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use shared_abi::manifest::{ImageError, parse_image};

/// What the hypervisor logs about one boot domain before it can build them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSummary {
    pub name: String,
    pub memory_kib: u64,
    pub vcpus: u32,
}

/// Why the boot module was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `-initrd` was given.
    NoModule,
    /// The module's address range is not RAM the memory map reports.
    ModuleNotInRam { paddr: u64, size: u64 },
    /// The image failed validation.
    Image(ImageError),
}

impl fmt::Display for Refusal {
    /// The one console line a refused boot prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bulkhead: boot image refused: ")?;
        match self {
            Refusal::NoModule => f.write_str("no boot module was passed (QEMU: -initrd <image>)"),
            Refusal::ModuleNotInRam { paddr, size } => write!(
                f,
                "boot module at {paddr:#x} (size {size:#x}) is not inside RAM"
            ),
            Refusal::Image(e) => write!(f, "{e}"),
        }
    }
}

/// Validate the image bytes and summarise its domains.
pub fn check(bytes: &[u8]) -> Result<Vec<DomainSummary>, Refusal> {
    let image = parse_image(bytes).map_err(Refusal::Image)?;
    Ok(image
        .manifest
        .domains
        .iter()
        .map(|d| DomainSummary {
            name: d.name.clone(),
            memory_kib: d.memory_kib,
            vcpus: d.vcpus,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use shared_abi::manifest::build_image;

    #[test]
    fn empty_manifest_is_accepted_with_no_domains() {
        let img = build_image(&[]).unwrap();
        assert_eq!(check(&img), Ok(vec![]));
    }

    #[test]
    fn corrupted_images_give_one_refusal_line() {
        let good = build_image(&[]).unwrap();
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        let mut magic = good.clone();
        magic[0] = b'X';
        for bad in [&flipped[..], &good[..good.len() - 1], &magic[..], &[][..]] {
            let err = check(bad).unwrap_err();
            let line = err.to_string();
            assert!(line.starts_with("bulkhead: boot image refused: "), "{line}");
            assert!(!line.contains('\n'));
            if let Refusal::Image(e) = &err {
                assert!(line.ends_with(&e.to_string()));
            } else {
                panic!("expected an image error, got {err:?}");
            }
        }
    }

    #[test]
    fn module_refusals_are_one_line() {
        assert_eq!(
            Refusal::NoModule.to_string(),
            "bulkhead: boot image refused: no boot module was passed (QEMU: -initrd <image>)"
        );
        assert_eq!(
            Refusal::ModuleNotInRam {
                paddr: 0x1000,
                size: 0x20
            }
            .to_string(),
            "bulkhead: boot image refused: boot module at 0x1000 (size 0x20) is not inside RAM"
        );
    }
}
