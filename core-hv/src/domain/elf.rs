//! The domain ELF validator: turns an ELF file (hostile input from the boot image or the
//! toolstack) into a [`LoadPlan`] — which pages to map, with which permissions, filled from
//! which bytes — or refuses it with an [`ElfError`] naming what is wrong.
//!
//! Accepted: ELF64, little-endian, version 1, `ET_EXEC`, `EM_X86_64`, 1..=[`MAX_SEGMENTS`]
//! `PT_LOAD` segments, each inside `[ELF_LOAD_BASE, ELF_LOAD_END)`, with `filesz <= memsz`,
//! file bytes inside the file, a power-of-two `p_align` with `vaddr ≡ offset (mod align)`,
//! never writable and executable at once, and no two segments sharing a page (each page has
//! one set of permissions); the entry point inside an executable segment's file bytes.
//! `PT_DYNAMIC`, `PT_INTERP` and `PT_TLS` are refused (domains are static, without TLS);
//! other program headers (notes, `GNU_STACK`, ...) are ignored.
//!
//! `xmas-elf` reads the headers; because it slices and casts without checking bounds or
//! alignment, every offset and size it will use is checked here first.

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use shared_abi::start_info::{ELF_LOAD_BASE, ELF_LOAD_END};
use xmas_elf::ElfFile;
use xmas_elf::header::{Class, Data, Machine, Type};
use xmas_elf::program::Type as PhType;

use super::memory::{PAGE_SIZE, PagePerms};

/// Most `PT_LOAD` segments a domain ELF may have.
pub const MAX_SEGMENTS: usize = 16;
/// Most program headers of any kind.
pub const MAX_PROGRAM_HEADERS: u16 = 64;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: u16 = 56;

/// Why an ELF file was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// The buffer is not 8-byte aligned in memory (the hypervisor's placement, not the file).
    Misaligned,
    TooShort {
        len: usize,
    },
    /// `xmas-elf` refused the header.
    Header(&'static str),
    NotElf64,
    NotLittleEndian,
    NotExecutable {
        found: &'static str,
    },
    WrongMachine {
        found: u16,
    },
    ProgramHeaderTable {
        reason: &'static str,
    },
    NoLoadSegments,
    TooManySegments {
        count: usize,
    },
    Unsupported {
        index: usize,
        what: &'static str,
    },
    FileSizeExceedsMemSize {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    FileRangeOutsideFile {
        index: usize,
        offset: u64,
        filesz: u64,
        file_len: usize,
    },
    OutsideLoadWindow {
        index: usize,
        vaddr: u64,
        memsz: u64,
    },
    BadAlignment {
        index: usize,
        align: u64,
        vaddr: u64,
        offset: u64,
    },
    WriteAndExecute {
        index: usize,
        vaddr: u64,
    },
    Overlap {
        index: usize,
        other: usize,
    },
    EntryNotExecutable {
        entry: u64,
    },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ElfError::*;
        match self {
            Misaligned => write!(f, "ELF buffer is not 8-byte aligned in memory"),
            TooShort { len } => write!(f, "ELF is {len} bytes, shorter than its 64-byte header"),
            Header(e) => write!(f, "ELF header refused: {e}"),
            NotElf64 => write!(f, "ELF class is not ELF64"),
            NotLittleEndian => write!(f, "ELF data encoding is not little-endian"),
            NotExecutable { found } => write!(
                f,
                "ELF type is {found}, expected ET_EXEC (static executable)"
            ),
            WrongMachine { found } => {
                write!(f, "ELF machine is {found:#x}, expected EM_X86_64 (0x3e)")
            }
            ProgramHeaderTable { reason } => write!(f, "ELF program header table: {reason}"),
            NoLoadSegments => write!(f, "ELF has no PT_LOAD segment"),
            TooManySegments { count } => write!(
                f,
                "ELF has {count} PT_LOAD segments, at most {MAX_SEGMENTS} allowed"
            ),
            Unsupported { index, what } => write!(
                f,
                "ELF program header {index}: {what} is not supported (domains are static, without TLS)"
            ),
            FileSizeExceedsMemSize {
                index,
                filesz,
                memsz,
            } => write!(
                f,
                "ELF segment {index}: p_filesz {filesz:#x} exceeds p_memsz {memsz:#x}"
            ),
            FileRangeOutsideFile {
                index,
                offset,
                filesz,
                file_len,
            } => write!(
                f,
                "ELF segment {index}: file bytes {offset:#x}+{filesz:#x} run past the file's {file_len:#x} bytes"
            ),
            OutsideLoadWindow {
                index,
                vaddr,
                memsz,
            } => write!(
                f,
                "ELF segment {index}: {vaddr:#x}+{memsz:#x} is outside the domain load window {ELF_LOAD_BASE:#x}..{ELF_LOAD_END:#x}"
            ),
            BadAlignment {
                index,
                align,
                vaddr,
                offset,
            } => write!(
                f,
                "ELF segment {index}: p_align {align:#x} is not a power of two or p_vaddr {vaddr:#x} and p_offset {offset:#x} disagree modulo it"
            ),
            WriteAndExecute { index, vaddr } => write!(
                f,
                "ELF segment {index} at {vaddr:#x} is both writable and executable"
            ),
            Overlap { index, other } => {
                write!(f, "ELF segment {index} shares a page with segment {other}")
            }
            EntryNotExecutable { entry } => write!(
                f,
                "ELF entry point {entry:#x} is not inside an executable segment's file bytes"
            ),
        }
    }
}

/// One segment to load: the pages covering `vaddr .. vaddr + memsz`, filled with
/// `file` bytes starting at `vaddr`, the rest zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    pub vaddr: u64,
    pub memsz: u64,
    /// Byte range of the ELF file copied to `vaddr`.
    pub file: Range<usize>,
    pub perms: PagePerms,
}

impl LoadSegment {
    /// First page (aligned down).
    pub fn first_page(&self) -> u64 {
        self.vaddr & !(PAGE_SIZE - 1)
    }
    /// End of the last page (aligned up). Cannot overflow: the window ends at 1 GiB.
    pub fn end_page(&self) -> u64 {
        (self.vaddr + self.memsz + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
    }
    pub fn pages(&self) -> u64 {
        (self.end_page() - self.first_page()) / PAGE_SIZE
    }
    /// For the page at `page_va`: where in the page file bytes go and which file bytes.
    pub fn file_bytes_in_page(&self, page_va: u64) -> Option<(usize, Range<usize>)> {
        let file_start = self.vaddr;
        let file_end = self.vaddr + (self.file.end - self.file.start) as u64;
        let lo = page_va.max(file_start);
        let hi = (page_va + PAGE_SIZE).min(file_end);
        if lo >= hi {
            return None;
        }
        let src = self.file.start + (lo - file_start) as usize;
        Some(((lo - page_va) as usize, src..src + (hi - lo) as usize))
    }
}

/// What the builder must map for an ELF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadPlan {
    pub entry: u64,
    pub segments: Vec<LoadSegment>,
}

impl LoadPlan {
    /// Pages the segments need.
    pub fn pages(&self) -> u64 {
        self.segments.iter().map(LoadSegment::pages).sum()
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Validate `bytes` as a domain ELF and plan its loading. Never panics, whatever the bytes.
pub fn plan(bytes: &[u8]) -> Result<LoadPlan, ElfError> {
    if bytes.len() < EHDR_SIZE {
        return Err(ElfError::TooShort { len: bytes.len() });
    }
    if bytes.as_ptr().align_offset(8) != 0 {
        return Err(ElfError::Misaligned);
    }
    // Bytes 4 and 5 (class, data) before xmas-elf reads a class-dependent header.
    if bytes[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err(ElfError::Header("no ELF magic number"));
    }
    if bytes[4] != 2 {
        return Err(ElfError::NotElf64);
    }
    // The program header table, checked before xmas-elf slices into it.
    let phoff = le64(bytes, 32);
    let phentsize = le16(bytes, 54);
    let phnum = le16(bytes, 56);
    if phentsize != PHDR_SIZE {
        return Err(ElfError::ProgramHeaderTable {
            reason: "e_phentsize is not 56",
        });
    }
    if phnum == 0 || phnum > MAX_PROGRAM_HEADERS {
        return Err(ElfError::ProgramHeaderTable {
            reason: "e_phnum is 0 or above 64",
        });
    }
    if !phoff.is_multiple_of(8) {
        return Err(ElfError::ProgramHeaderTable {
            reason: "e_phoff is not 8-byte aligned",
        });
    }
    let table_end = phoff.checked_add(u64::from(phnum) * u64::from(phentsize));
    if phoff < EHDR_SIZE as u64 || table_end.is_none_or(|e| e > bytes.len() as u64) {
        return Err(ElfError::ProgramHeaderTable {
            reason: "the table lies outside the file",
        });
    }
    let elf = ElfFile::new(bytes).map_err(ElfError::Header)?;
    if elf.header.pt1.class() != Class::SixtyFour {
        return Err(ElfError::NotElf64);
    }
    if elf.header.pt1.data() != Data::LittleEndian {
        return Err(ElfError::NotLittleEndian);
    }
    if elf.header.pt1.version.is_none() {
        return Err(ElfError::Header("ELF version is not 1"));
    }
    match elf.header.pt2.type_().as_type() {
        Type::Executable => {}
        Type::Relocatable => return Err(ElfError::NotExecutable { found: "ET_REL" }),
        Type::SharedObject => {
            return Err(ElfError::NotExecutable {
                found: "ET_DYN (position-independent)",
            });
        }
        Type::Core => return Err(ElfError::NotExecutable { found: "ET_CORE" }),
        _ => return Err(ElfError::NotExecutable { found: "unknown" }),
    }
    match elf.header.pt2.machine().as_machine() {
        Machine::X86_64 => {}
        _ => {
            return Err(ElfError::WrongMachine {
                found: le16(bytes, 18),
            });
        }
    }
    let entry = elf.header.pt2.entry_point();

    let mut segments: Vec<LoadSegment> = Vec::new();
    for index in 0..phnum {
        let ph = elf
            .program_header(index)
            .map_err(|reason| ElfError::ProgramHeaderTable { reason })?;
        let index = usize::from(index);
        let kind = ph.get_type();
        match kind {
            Ok(PhType::Load) => {}
            Ok(PhType::Dynamic) => {
                return Err(ElfError::Unsupported {
                    index,
                    what: "PT_DYNAMIC",
                });
            }
            Ok(PhType::Interp) => {
                return Err(ElfError::Unsupported {
                    index,
                    what: "PT_INTERP",
                });
            }
            Ok(PhType::Tls) => {
                return Err(ElfError::Unsupported {
                    index,
                    what: "PT_TLS",
                });
            }
            _ => continue,
        }
        let (vaddr, memsz, offset, filesz, align) = (
            ph.virtual_addr(),
            ph.mem_size(),
            ph.offset(),
            ph.file_size(),
            ph.align(),
        );
        if memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(ElfError::FileSizeExceedsMemSize {
                index,
                filesz,
                memsz,
            });
        }
        let file_end = offset.checked_add(filesz);
        if file_end.is_none_or(|e| e > bytes.len() as u64) {
            return Err(ElfError::FileRangeOutsideFile {
                index,
                offset,
                filesz,
                file_len: bytes.len(),
            });
        }
        let end = vaddr.checked_add(memsz);
        if vaddr < ELF_LOAD_BASE || end.is_none_or(|e| e > ELF_LOAD_END) {
            return Err(ElfError::OutsideLoadWindow {
                index,
                vaddr,
                memsz,
            });
        }
        let a = align.max(1);
        if !a.is_power_of_two() || vaddr % a.min(PAGE_SIZE) != offset % a.min(PAGE_SIZE) {
            return Err(ElfError::BadAlignment {
                index,
                align,
                vaddr,
                offset,
            });
        }
        let flags = ph.flags();
        if flags.is_write() && flags.is_execute() {
            return Err(ElfError::WriteAndExecute { index, vaddr });
        }
        let mut perms = PagePerms::USER;
        if flags.is_write() {
            perms |= PagePerms::WRITE;
        }
        if flags.is_execute() {
            perms |= PagePerms::EXEC;
        }
        if segments.len() == MAX_SEGMENTS {
            return Err(ElfError::TooManySegments {
                count: MAX_SEGMENTS + 1,
            });
        }
        // Both fit in usize: they are bounded by bytes.len().
        let seg = LoadSegment {
            vaddr,
            memsz,
            file: offset as usize..(offset + filesz) as usize,
            perms,
        };
        // Segments are identified by program header index in messages.
        if let Some((other, _)) = segments
            .iter()
            .enumerate()
            .find(|(_, s)| s.first_page() < seg.end_page() && seg.first_page() < s.end_page())
        {
            let other_index = seg_indices(&elf, phnum, other);
            return Err(ElfError::Overlap {
                index,
                other: other_index,
            });
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadSegments);
    }
    let entry_ok = segments.iter().any(|s| {
        s.perms.contains(PagePerms::EXEC)
            && entry >= s.vaddr
            && entry < s.vaddr + (s.file.end - s.file.start) as u64
    });
    if !entry_ok {
        return Err(ElfError::EntryNotExecutable { entry });
    }
    Ok(LoadPlan { entry, segments })
}

/// Program header index of the `n`th non-empty `PT_LOAD` (for error messages).
fn seg_indices(elf: &ElfFile<'_>, phnum: u16, n: usize) -> usize {
    (0..phnum)
        .filter_map(|i| elf.program_header(i).ok().map(|ph| (i, ph)))
        .filter(|(_, ph)| matches!(ph.get_type(), Ok(PhType::Load)) && ph.mem_size() > 0)
        .nth(n)
        .map_or(n, |(i, _)| usize::from(i))
}

/// Builds ELF files for tests (and for the fuzz/proptest of the validator).
#[cfg(test)]
pub mod testelf {
    use alloc::vec::Vec;

    /// One program header: (type, flags, offset, vaddr, filesz, memsz, align).
    pub type Ph = (u32, u32, u64, u64, u64, u64, u64);

    pub const PT_LOAD: u32 = 1;
    pub const R: u32 = 4;
    pub const W: u32 = 2;
    pub const X: u32 = 1;

    /// An ELF64 x86-64 ET_EXEC with these program headers, file padded to `len`.
    pub fn build(entry: u64, phs: &[Ph], len: usize) -> Vec<u8> {
        let mut b = alloc::vec![0u8; len.max(64 + 56 * phs.len())];
        b[..4].copy_from_slice(&[0x7f, b'E', b'L', b'F']);
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little-endian
        b[6] = 1; // EV_CURRENT
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phs.len() as u16).to_le_bytes());
        for (i, &(t, f, off, va, fsz, msz, al)) in phs.iter().enumerate() {
            let p = 64 + i * 56;
            b[p..p + 4].copy_from_slice(&t.to_le_bytes());
            b[p + 4..p + 8].copy_from_slice(&f.to_le_bytes());
            b[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            b[p + 16..p + 24].copy_from_slice(&va.to_le_bytes());
            b[p + 24..p + 32].copy_from_slice(&va.to_le_bytes());
            b[p + 32..p + 40].copy_from_slice(&fsz.to_le_bytes());
            b[p + 40..p + 48].copy_from_slice(&msz.to_le_bytes());
            b[p + 48..p + 56].copy_from_slice(&al.to_le_bytes());
        }
        b
    }

    /// A typical good domain: text RX at 4 MiB, rodata R, data+bss RW.
    pub fn good() -> Vec<u8> {
        let mut b = build(
            0x40_0010,
            &[
                (PT_LOAD, R | X, 0x1000, 0x40_0000, 0x100, 0x100, 0x1000),
                (PT_LOAD, R, 0x2000, 0x40_1000, 0x20, 0x20, 0x1000),
                (PT_LOAD, R | W, 0x3000, 0x40_2000, 0x10, 0x2100, 0x1000),
            ],
            0x3010,
        );
        for (i, x) in b[0x1000..0x1100].iter_mut().enumerate() {
            *x = i as u8;
        }
        b[0x2000..0x2020].fill(0xEE);
        b[0x3000..0x3010].fill(0xDD);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::testelf::*;
    use super::*;
    use proptest::prelude::*;

    /// Run the validator on an 8-byte-aligned copy.
    fn check(bytes: &[u8]) -> Result<LoadPlan, ElfError> {
        let mut v: Vec<u8> = Vec::with_capacity(bytes.len() + 8);
        let pad = v.as_ptr().align_offset(8);
        v.resize(pad, 0);
        v.extend_from_slice(bytes);
        plan(&v[pad..])
    }

    #[test]
    fn good_elf_plans_segments_with_their_permissions() {
        let p = check(&good()).unwrap();
        assert_eq!(p.entry, 0x40_0010);
        assert_eq!(p.segments.len(), 3);
        assert_eq!(p.segments[0].perms, PagePerms::USER_RX);
        assert_eq!(p.segments[1].perms, PagePerms::USER_RO);
        assert_eq!(p.segments[2].perms, PagePerms::USER_RW);
        assert_eq!(p.pages(), 1 + 1 + 3);
        assert_eq!(
            p.segments[2].file_bytes_in_page(0x40_2000),
            Some((0, 0x3000..0x3010))
        );
        assert_eq!(p.segments[2].file_bytes_in_page(0x40_3000), None);
    }

    #[test]
    fn malformed_elves_are_refused_with_a_reason() {
        let g = good();
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        cases.push((g[..40].to_vec(), "shorter than"));
        let mut b = g.clone();
        b[0] = 0;
        cases.push((b, "magic"));
        let mut b = g.clone();
        b[4] = 1;
        cases.push((b, "ELF64"));
        let mut b = g.clone();
        b[5] = 2;
        cases.push((b, "little-endian"));
        let mut b = g.clone();
        b[16] = 3;
        cases.push((b, "ET_DYN"));
        let mut b = g.clone();
        b[18] = 0x28;
        cases.push((b, "EM_X86_64"));
        let mut b = g.clone();
        b[54] = 32;
        cases.push((b, "e_phentsize"));
        let mut b = g.clone();
        b[56..58].copy_from_slice(&500u16.to_le_bytes());
        cases.push((b, "e_phnum"));
        let mut b = g.clone();
        b[32..40].copy_from_slice(&0x3000u64.to_le_bytes());
        cases.push((b, "outside the file"));
        let mut b = g.clone();
        b[32..40].copy_from_slice(&65u64.to_le_bytes());
        cases.push((b, "aligned"));
        let bad = |ph: Ph, needle: &'static str| (build(0x40_0010, &[ph], 0x2000), needle);
        cases.push(bad(
            (PT_LOAD, R | X, 0x1000, 0x40_0000, 0x200, 0x100, 0x1000),
            "exceeds p_memsz",
        ));
        cases.push(bad(
            (PT_LOAD, R | X, 0x1000, 0x40_0000, 0x2000, 0x2000, 0x1000),
            "run past",
        ));
        cases.push(bad(
            (PT_LOAD, R | X, 0x1000, 0x1000, 0x100, 0x100, 0x1000),
            "load window",
        ));
        cases.push(bad(
            (PT_LOAD, R | X, 0x1000, 0x3fff_f000, 0x100, 0x2000, 0x1000),
            "load window",
        ));
        cases.push(bad(
            (PT_LOAD, R | X, 0x1000, 0x40_0000, 0x100, u64::MAX, 0x1000),
            "load window",
        ));
        cases.push(bad(
            (PT_LOAD, R | X, 0x1000, 0x40_0000, 0x100, 0x100, 0x3000),
            "p_align",
        ));
        cases.push(bad(
            (PT_LOAD, R | X, 0x1008, 0x40_0000, 0x100, 0x100, 0x1000),
            "p_align",
        ));
        cases.push(bad(
            (PT_LOAD, R | W | X, 0x1000, 0x40_0000, 0x100, 0x100, 0x1000),
            "writable and executable",
        ));
        cases.push(bad(
            (PT_LOAD, R, 0x1000, 0x40_0000, 0x100, 0x100, 0x1000),
            "entry point",
        ));
        cases.push(bad(
            (2, R, 0x1000, 0x40_0000, 0x100, 0x100, 0x1000),
            "PT_DYNAMIC",
        ));
        cases.push(bad(
            (7, R, 0x1000, 0x40_0000, 0x100, 0x100, 0x1000),
            "PT_TLS",
        ));
        cases.push(bad(
            (4, R, 0x1000, 0x40_0000, 0x100, 0x100, 0x1000),
            "no PT_LOAD",
        ));
        cases.push((
            build(
                0x40_0010,
                &[
                    (PT_LOAD, R | X, 0x1000, 0x40_0000, 0x100, 0x100, 0x1000),
                    (PT_LOAD, R | W, 0x1800, 0x40_0800, 0x100, 0x100, 0x800),
                ],
                0x2000,
            ),
            "shares a page with segment 0",
        ));
        let many: Vec<Ph> = (0..17)
            .map(|i| {
                (
                    PT_LOAD,
                    R | X,
                    0x1000,
                    0x40_0000 + i * 0x1000,
                    0x10,
                    0x10,
                    0x1000,
                )
            })
            .collect();
        cases.push((build(0x40_0000, &many, 0x2000), "at most 16"));
        for (bytes, needle) in cases {
            let err = check(&bytes).unwrap_err();
            let msg = alloc::format!("{err}");
            assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
        }
    }

    #[test]
    fn misaligned_buffer_is_refused_not_trusted() {
        let g = good();
        let mut v = alloc::vec![0u8; g.len() + 16];
        let pad = v.as_ptr().align_offset(8) + 1;
        v[pad..pad + g.len()].copy_from_slice(&g);
        assert_eq!(plan(&v[pad..pad + g.len()]), Err(ElfError::Misaligned));
    }

    proptest! {
        #[test]
        fn validator_never_panics_on_mutated_elves(
            edits in proptest::collection::vec((0usize..0x3010, any::<u8>()), 0..12),
            cut in 0usize..0x3010,
        ) {
            let mut b = good();
            for (at, v) in edits {
                b[at] = v;
            }
            b.truncate(cut.max(1));
            let _ = check(&b);
        }

        #[test]
        fn validator_never_panics_on_random_program_headers(
            phs in proptest::collection::vec(
                (0u32..8, 0u32..8, any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
                1..6),
            entry in any::<u64>(),
        ) {
            let b = build(entry, &phs, 0x2000);
            if let Ok(p) = check(&b) {
                for s in &p.segments {
                    prop_assert!(s.vaddr >= ELF_LOAD_BASE && s.vaddr + s.memsz <= ELF_LOAD_END);
                    prop_assert!(!(s.perms.contains(PagePerms::WRITE) && s.perms.contains(PagePerms::EXEC)));
                }
            }
        }
    }
}
