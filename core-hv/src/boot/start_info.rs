//! Copying and validating the PVH `hvm_start_info` and everything it points to.
//!
//! The loader's structures live in low memory the hypervisor later reuses, and every count and
//! address in them is unchecked input: [`BootInfo::read`] copies them out into bounded,
//! owned storage, refusing anything out of range with an error that names the field.

use heapless::{String, Vec};
use shared_abi::hvm_start_info::{HVM_START_MAGIC, HvmMemmapEntry, HvmModlistEntry, HvmStartInfo};

/// Most memory-map entries accepted (QEMU gives under 10).
pub const MAX_MEMMAP_ENTRIES: usize = 128;
/// Most boot modules accepted (QEMU's PVH loader passes at most one).
pub const MAX_MODULES: usize = 8;
/// Longest kernel command line accepted, in bytes.
pub const MAX_CMDLINE: usize = 1024;

/// Reads physical memory during boot.
pub trait PhysMemory {
    /// Fill `buf` from physical address `paddr`; `false` if any byte is out of reach.
    fn read(&self, paddr: u64, buf: &mut [u8]) -> bool;
}

/// Why the start info was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    /// A structure lies where it cannot be read (`what` names it).
    Unreadable {
        what: &'static str,
        paddr: u64,
    },
    BadMagic {
        found: u32,
    },
    /// Version 0 has no memory map, which the hypervisor needs.
    UnsupportedVersion {
        found: u32,
    },
    TooManyMemmapEntries {
        count: u32,
        max: usize,
    },
    NoMemmap,
    TooManyModules {
        count: u32,
        max: usize,
    },
    CmdlineTooLong {
        max: usize,
    },
    CmdlineNotAscii {
        offset: usize,
        byte: u8,
    },
}

impl core::fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartInfoError::Unreadable { what, paddr } => {
                write!(f, "{what} at {paddr:#x} is outside readable memory")
            }
            StartInfoError::BadMagic { found } => write!(
                f,
                "hvm_start_info magic is {found:#x}, expected {HVM_START_MAGIC:#x}"
            ),
            StartInfoError::UnsupportedVersion { found } => {
                write!(
                    f,
                    "hvm_start_info version {found} has no memory map; need >= 1"
                )
            }
            StartInfoError::TooManyMemmapEntries { count, max } => {
                write!(f, "memmap_entries is {count}, allowed 1..={max}")
            }
            StartInfoError::NoMemmap => write!(f, "memmap_entries is 0, allowed 1..=128"),
            StartInfoError::TooManyModules { count, max } => {
                write!(f, "nr_modules is {count}, allowed 0..={max}")
            }
            StartInfoError::CmdlineTooLong { max } => {
                write!(f, "command line has no NUL within {max} bytes")
            }
            StartInfoError::CmdlineNotAscii { offset, byte } => write!(
                f,
                "command line byte {offset} is {byte:#04x}, allowed printable ASCII"
            ),
        }
    }
}

/// Everything the hypervisor keeps from the PVH loader, copied out of low memory.
#[derive(Clone, Debug, Default)]
pub struct BootInfo {
    pub start_info_paddr: u64,
    pub start_info: HvmStartInfo,
    pub rsdp_paddr: u64,
    /// Non-empty entries only (an all-zero terminator is dropped).
    pub memmap: Vec<HvmMemmapEntry, MAX_MEMMAP_ENTRIES>,
    pub modules: Vec<HvmModlistEntry, MAX_MODULES>,
    pub cmdline: String<MAX_CMDLINE>,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn read_exact<M: PhysMemory>(
    mem: &M,
    what: &'static str,
    paddr: u64,
    buf: &mut [u8],
) -> Result<(), StartInfoError> {
    if paddr.checked_add(buf.len() as u64).is_none() || !mem.read(paddr, buf) {
        return Err(StartInfoError::Unreadable { what, paddr });
    }
    Ok(())
}

impl BootInfo {
    /// Copy and validate the start info at `paddr` and what it points to.
    pub fn read<M: PhysMemory>(mem: &M, paddr: u64) -> Result<BootInfo, StartInfoError> {
        let mut raw = [0u8; core::mem::size_of::<HvmStartInfo>()];
        read_exact(mem, "hvm_start_info", paddr, &mut raw)?;
        let si = HvmStartInfo {
            magic: le_u32(&raw, 0),
            version: le_u32(&raw, 4),
            flags: le_u32(&raw, 8),
            nr_modules: le_u32(&raw, 12),
            modlist_paddr: le_u64(&raw, 16),
            cmdline_paddr: le_u64(&raw, 24),
            rsdp_paddr: le_u64(&raw, 32),
            memmap_paddr: le_u64(&raw, 40),
            memmap_entries: le_u32(&raw, 48),
            reserved: le_u32(&raw, 52),
        };
        if si.magic != HVM_START_MAGIC {
            return Err(StartInfoError::BadMagic { found: si.magic });
        }
        if si.version < 1 {
            return Err(StartInfoError::UnsupportedVersion { found: si.version });
        }
        let mut info = BootInfo {
            start_info_paddr: paddr,
            start_info: si,
            rsdp_paddr: si.rsdp_paddr,
            ..BootInfo::default()
        };

        if si.memmap_entries == 0 {
            return Err(StartInfoError::NoMemmap);
        }
        if si.memmap_entries as usize > MAX_MEMMAP_ENTRIES {
            return Err(StartInfoError::TooManyMemmapEntries {
                count: si.memmap_entries,
                max: MAX_MEMMAP_ENTRIES,
            });
        }
        for i in 0..si.memmap_entries as u64 {
            let mut e = [0u8; 24];
            let at = si
                .memmap_paddr
                .checked_add(i * 24)
                .ok_or(StartInfoError::Unreadable {
                    what: "memory map",
                    paddr: si.memmap_paddr,
                })?;
            read_exact(mem, "memory map", at, &mut e)?;
            let entry = HvmMemmapEntry {
                addr: le_u64(&e, 0),
                size: le_u64(&e, 8),
                kind: le_u32(&e, 16),
                reserved: le_u32(&e, 20),
            };
            if entry.size != 0 {
                // Cannot overflow: the count was bounded above.
                let _ = info.memmap.push(entry);
            }
        }
        if info.memmap.is_empty() {
            return Err(StartInfoError::NoMemmap);
        }

        if si.nr_modules as usize > MAX_MODULES {
            return Err(StartInfoError::TooManyModules {
                count: si.nr_modules,
                max: MAX_MODULES,
            });
        }
        for i in 0..si.nr_modules as u64 {
            let mut e = [0u8; 32];
            let at = si
                .modlist_paddr
                .checked_add(i * 32)
                .ok_or(StartInfoError::Unreadable {
                    what: "module list",
                    paddr: si.modlist_paddr,
                })?;
            read_exact(mem, "module list", at, &mut e)?;
            let _ = info.modules.push(HvmModlistEntry {
                paddr: le_u64(&e, 0),
                size: le_u64(&e, 8),
                cmdline_paddr: le_u64(&e, 16),
                reserved: le_u64(&e, 24),
            });
        }

        if si.cmdline_paddr != 0 {
            info.cmdline = read_cmdline(mem, si.cmdline_paddr)?;
        }
        Ok(info)
    }
}

/// A NUL-terminated command line of at most [`MAX_CMDLINE`] printable ASCII bytes (tabs and
/// newlines count as spaces).
fn read_cmdline<M: PhysMemory>(mem: &M, paddr: u64) -> Result<String<MAX_CMDLINE>, StartInfoError> {
    let mut out: String<MAX_CMDLINE> = String::new();
    for offset in 0..=MAX_CMDLINE {
        let mut b = [0u8; 1];
        let at = paddr
            .checked_add(offset as u64)
            .ok_or(StartInfoError::Unreadable {
                what: "command line",
                paddr,
            })?;
        read_exact(mem, "command line", at, &mut b)?;
        let c = match b[0] {
            0 => return Ok(out),
            b'\t' | b'\n' | b'\r' => ' ',
            c @ 0x20..=0x7e => c as char,
            byte => return Err(StartInfoError::CmdlineNotAscii { offset, byte }),
        };
        if out.push(c).is_err() {
            break;
        }
    }
    Err(StartInfoError::CmdlineTooLong { max: MAX_CMDLINE })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fake physical memory: 64 KiB starting at 0.
    struct Mem(std::vec::Vec<u8>);

    impl PhysMemory for Mem {
        fn read(&self, paddr: u64, buf: &mut [u8]) -> bool {
            let Some(end) = (paddr as usize).checked_add(buf.len()) else {
                return false;
            };
            match self.0.get(paddr as usize..end) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    impl Mem {
        fn put(&mut self, at: usize, bytes: &[u8]) {
            self.0[at..at + bytes.len()].copy_from_slice(bytes);
        }
        fn put_u32(&mut self, at: usize, v: u32) {
            self.put(at, &v.to_le_bytes());
        }
        fn put_u64(&mut self, at: usize, v: u64) {
            self.put(at, &v.to_le_bytes());
        }
    }

    const SI: usize = 0x21e0;

    /// What QEMU's PVH loader gives on q35 with one module and `-append`.
    fn qemu_like(cmdline: &[u8]) -> Mem {
        let mut m = Mem(vec![0; 0x10000]);
        m.put_u32(SI, HVM_START_MAGIC);
        m.put_u32(SI + 4, 1);
        m.put_u32(SI + 12, 1);
        m.put_u64(SI + 16, 0x21c0);
        m.put_u64(SI + 24, 0x3000);
        m.put_u64(SI + 32, 0xf59d0);
        m.put_u64(SI + 40, 0x5a8);
        m.put_u32(SI + 48, 3);
        // memmap: RAM 0..0x9fc00, RAM 1M..512M, all-zero terminator
        m.put_u64(0x5a8, 0);
        m.put_u64(0x5a8 + 8, 0x9fc00);
        m.put_u32(0x5a8 + 16, 1);
        m.put_u64(0x5a8 + 24, 0x100000);
        m.put_u64(0x5a8 + 32, 0x1ff00000);
        m.put_u32(0x5a8 + 40, 1);
        // module
        m.put_u64(0x21c0, 0x1ff8e000);
        m.put_u64(0x21c0 + 8, 300057);
        m.put(0x3000, cmdline);
        m
    }

    #[test]
    fn qemu_start_info_is_copied_and_zero_terminator_dropped() {
        let m = qemu_like(b"exit_when_done loglevel=debug\0");
        let bi = BootInfo::read(&m, SI as u64).unwrap();
        assert_eq!(bi.memmap.len(), 2);
        assert_eq!(bi.modules.len(), 1);
        assert_eq!(bi.modules[0].paddr, 0x1ff8e000);
        assert_eq!(bi.modules[0].size, 300057);
        assert_eq!(bi.rsdp_paddr, 0xf59d0);
        assert_eq!(bi.cmdline.as_str(), "exit_when_done loglevel=debug");
    }

    #[test]
    fn bad_magic_and_version_zero_are_refused() {
        let mut m = qemu_like(b"\0");
        m.put_u32(SI, 0x1234);
        assert_eq!(
            BootInfo::read(&m, SI as u64).unwrap_err(),
            StartInfoError::BadMagic { found: 0x1234 }
        );
        let mut m = qemu_like(b"\0");
        m.put_u32(SI + 4, 0);
        assert_eq!(
            BootInfo::read(&m, SI as u64).unwrap_err(),
            StartInfoError::UnsupportedVersion { found: 0 }
        );
    }

    #[test]
    fn hostile_counts_and_addresses_are_refused() {
        let mut m = qemu_like(b"\0");
        m.put_u32(SI + 48, 100_000);
        assert!(matches!(
            BootInfo::read(&m, SI as u64).unwrap_err(),
            StartInfoError::TooManyMemmapEntries { count: 100_000, .. }
        ));
        let mut m = qemu_like(b"\0");
        m.put_u32(SI + 12, 9);
        assert!(matches!(
            BootInfo::read(&m, SI as u64).unwrap_err(),
            StartInfoError::TooManyModules { count: 9, .. }
        ));
        let mut m = qemu_like(b"\0");
        m.put_u64(SI + 40, u64::MAX - 8);
        assert!(matches!(
            BootInfo::read(&m, SI as u64).unwrap_err(),
            StartInfoError::Unreadable {
                what: "memory map",
                ..
            }
        ));
        let mut m = qemu_like(b"\0");
        m.put_u64(SI + 16, 0xfff0);
        assert!(matches!(
            BootInfo::read(&m, SI as u64).unwrap_err(),
            StartInfoError::Unreadable {
                what: "module list",
                ..
            }
        ));
        assert!(matches!(
            BootInfo::read(&m, 0xfff0).unwrap_err(),
            StartInfoError::Unreadable {
                what: "hvm_start_info",
                ..
            }
        ));
    }

    #[test]
    fn all_empty_memmap_is_refused() {
        let mut m = qemu_like(b"\0");
        m.put_u32(SI + 48, 1);
        m.put_u64(0x5a8 + 8, 0);
        assert_eq!(
            BootInfo::read(&m, SI as u64).unwrap_err(),
            StartInfoError::NoMemmap
        );
    }

    #[test]
    fn cmdline_must_be_ascii_and_bounded() {
        let m = qemu_like(b"ok\xffno\0");
        assert_eq!(
            BootInfo::read(&m, SI as u64).unwrap_err(),
            StartInfoError::CmdlineNotAscii {
                offset: 2,
                byte: 0xff
            }
        );
        let long = vec![b'a'; MAX_CMDLINE + 10];
        let m = qemu_like(&long);
        assert_eq!(
            BootInfo::read(&m, SI as u64).unwrap_err(),
            StartInfoError::CmdlineTooLong { max: MAX_CMDLINE }
        );
        let mut exact = vec![b'a'; MAX_CMDLINE];
        exact.push(0);
        let m = qemu_like(&exact);
        assert_eq!(
            BootInfo::read(&m, SI as u64).unwrap().cmdline.len(),
            MAX_CMDLINE
        );
        let m = qemu_like(b"a\tb\0");
        assert_eq!(
            BootInfo::read(&m, SI as u64).unwrap().cmdline.as_str(),
            "a b"
        );
    }
}
