//! The part of a kernel ELF that the domain builder loads, rebuilt as a minimal ELF: the ELF
//! header, the `PT_LOAD` program headers and their file bytes; section headers, symbols,
//! debug information and other segments are dropped. It keeps the serial transfer short
//! (hello-dom: 2.8 MB on disk, about 30 KiB loadable).
//!
//! The file is hostile input like any other: every offset and size is checked before use
//! and a file that is not a 64-bit little-endian x86-64 executable is refused with what was
//! wrong. Each segment keeps `p_offset ≡ p_vaddr (mod p_align)` (with `p_align` capped at
//! one page, which the builder's page-granular loader needs at most), so the builder loads
//! exactly the same bytes at the same addresses.

/// ELF64 header size.
const EHDR: usize = 64;
/// ELF64 program header size.
const PHDR: usize = 56;
const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
/// Largest alignment kept (one page).
const PAGE: u64 = 4096;
/// Most program headers read.
const MAX_PHNUM: usize = 64;

fn u16_at(b: &[u8], o: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[o..o + 2]);
    u16::from_le_bytes(a)
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// One `PT_LOAD` segment as read from a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub flags: u32,
    pub vaddr: u64,
    pub paddr: u64,
    pub memsz: u64,
    pub align: u64,
    /// The file bytes (`p_filesz` of them).
    pub data: Vec<u8>,
    /// Where they were in the file.
    pub offset: u64,
}

/// The header fields kept and the `PT_LOAD` segments of an ELF file.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The original 64-byte header.
    pub header: [u8; EHDR],
    pub entry: u64,
    pub segments: Vec<Segment>,
}

/// Read the header and the `PT_LOAD` segments, checking every offset and size.
pub fn parse(b: &[u8]) -> Result<Parsed, String> {
    if b.len() < EHDR || !b.starts_with(b"\x7fELF") {
        return Err("not an ELF file (no 0x7f 'E' 'L' 'F' header)".into());
    }
    if b[4] != 2 || b[5] != 1 || b[6] != 1 {
        return Err("not a 64-bit little-endian ELF (version 1)".into());
    }
    if u16_at(b, 16) != ET_EXEC {
        return Err("not an executable (ET_EXEC) ELF".into());
    }
    if u16_at(b, 18) != EM_X86_64 {
        return Err("not an x86-64 ELF".into());
    }
    let phoff = u64_at(b, 32);
    let phentsize = usize::from(u16_at(b, 54));
    let phnum = usize::from(u16_at(b, 56));
    if phentsize != PHDR || phnum == 0 || phnum > MAX_PHNUM {
        return Err(format!(
            "bad program header table (entry size {phentsize}, {phnum} entries; want {PHDR}-byte entries, 1..={MAX_PHNUM})"
        ));
    }
    let table = usize::try_from(phoff)
        .ok()
        .and_then(|o| Some((o, o.checked_add(phnum * PHDR)?)))
        .filter(|&(_, end)| end <= b.len())
        .ok_or("program header table outside the file")?;
    let mut header = [0u8; EHDR];
    header.copy_from_slice(&b[..EHDR]);
    let mut segments = Vec::new();
    for i in 0..phnum {
        let p = &b[table.0 + i * PHDR..table.0 + (i + 1) * PHDR];
        if u32_at(p, 0) != PT_LOAD {
            continue;
        }
        let (offset, filesz, memsz) = (u64_at(p, 8), u64_at(p, 32), u64_at(p, 40));
        let range = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(filesz).ok())
            .and_then(|(o, n)| Some((o, o.checked_add(n)?)))
            .filter(|&(_, end)| end <= b.len())
            .ok_or_else(|| format!("segment {i}: file bytes outside the file"))?;
        if filesz > memsz {
            return Err(format!("segment {i}: p_filesz is larger than p_memsz"));
        }
        segments.push(Segment {
            flags: u32_at(p, 4),
            vaddr: u64_at(p, 16),
            paddr: u64_at(p, 24),
            memsz,
            align: u64_at(p, 48),
            data: b[range.0..range.1].to_vec(),
            offset,
        });
    }
    if segments.is_empty() {
        return Err("no PT_LOAD segment".into());
    }
    Ok(Parsed {
        header,
        entry: u64_at(b, 24),
        segments,
    })
}

/// The smallest offset `>= at` congruent to `vaddr` modulo `align` (a power of two).
fn place(at: u64, vaddr: u64, align: u64) -> u64 {
    if align <= 1 {
        return at;
    }
    let want = vaddr & (align - 1);
    let base = at & !(align - 1);
    let o = base | want;
    if o >= at { o } else { o + align }
}

/// The minimal ELF: header, `PT_LOAD` headers, segment bytes.
pub fn loadable(b: &[u8]) -> Result<Vec<u8>, String> {
    let p = parse(b)?;
    let n = p.segments.len();
    let headers = (EHDR + n * PHDR) as u64;
    let mut out: Vec<u8> = Vec::new();
    let mut phdrs = Vec::with_capacity(n * PHDR);
    // Segments placed after the headers and after any segment kept at offset 0 (its first
    // bytes are the headers, which the new ones replace: only the loaded copy of the
    // header page changes, in fields nothing reads).
    let mut cursor = p
        .segments
        .iter()
        .filter(|s| s.offset == 0)
        .map(|s| s.data.len() as u64)
        .fold(headers, u64::max);
    for (i, s) in p.segments.iter().enumerate() {
        // p_align 0 or 1: no constraint; otherwise a power of two, capped at a page.
        let align = match s.align {
            0 | 1 => 1,
            a if a.is_power_of_two() => a.min(PAGE),
            a => return Err(format!("segment {i}: p_align {a:#x} is not a power of two")),
        };
        // A segment that starts at offset 0 holds the headers themselves: keep it there.
        let at = if s.offset == 0 && !s.data.is_empty() {
            0
        } else {
            place(cursor, s.vaddr, align)
        };
        let end = at + s.data.len() as u64;
        let end_us = usize::try_from(end).map_err(|_| "image too large".to_string())?;
        if out.len() < end_us {
            out.resize(end_us, 0);
        }
        out[at as usize..end_us].copy_from_slice(&s.data);
        cursor = cursor.max(end);
        let mut ph = [0u8; PHDR];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&s.flags.to_le_bytes());
        ph[8..16].copy_from_slice(&at.to_le_bytes());
        ph[16..24].copy_from_slice(&s.vaddr.to_le_bytes());
        ph[24..32].copy_from_slice(&s.paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(s.data.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&s.memsz.to_le_bytes());
        ph[48..56].copy_from_slice(&align.to_le_bytes());
        phdrs.extend_from_slice(&ph);
    }
    if out.len() < headers as usize {
        out.resize(headers as usize, 0);
    }
    let mut h = p.header;
    h[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    h[40..48].copy_from_slice(&0u64.to_le_bytes()); // e_shoff
    h[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    h[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    h[56..58].copy_from_slice(&(n as u16).to_le_bytes()); // e_phnum
    h[58..64].copy_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    out[..EHDR].copy_from_slice(&h);
    out[EHDR..headers as usize].copy_from_slice(&phdrs);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An ELF with two PT_LOAD segments, a PT_GNU_STACK, padding and a section header
    /// table at the end.
    fn sample() -> Vec<u8> {
        let mut b = vec![0u8; 0x3000];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&0x40_0010u64.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[40..48].copy_from_slice(&0x2800u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&3u16.to_le_bytes());
        b[58..60].copy_from_slice(&64u16.to_le_bytes());
        b[60..62].copy_from_slice(&5u16.to_le_bytes());
        let ph =
            |b: &mut Vec<u8>, i: usize, ty: u32, fl: u32, off: u64, va: u64, fs: u64, ms: u64| {
                let p = 64 + i * 56;
                b[p..p + 4].copy_from_slice(&ty.to_le_bytes());
                b[p + 4..p + 8].copy_from_slice(&fl.to_le_bytes());
                b[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
                b[p + 16..p + 24].copy_from_slice(&va.to_le_bytes());
                b[p + 24..p + 32].copy_from_slice(&va.to_le_bytes());
                b[p + 32..p + 40].copy_from_slice(&fs.to_le_bytes());
                b[p + 40..p + 48].copy_from_slice(&ms.to_le_bytes());
                b[p + 48..p + 56].copy_from_slice(&0x1000u64.to_le_bytes());
            };
        ph(&mut b, 0, PT_LOAD, 5, 0x1000, 0x40_0000, 0x123, 0x123);
        ph(&mut b, 1, 0x6474_e551, 6, 0, 0, 0, 0);
        ph(&mut b, 2, PT_LOAD, 6, 0x2010, 0x40_1010, 0x20, 0x800);
        for i in 0..0x123 {
            b[0x1000 + i] = (i * 7) as u8;
        }
        for i in 0..0x20 {
            b[0x2010 + i] = 0xa0 + i as u8;
        }
        b[0x2800..].fill(0xee); // "section headers"
        b
    }

    /// What a loader sees: (vaddr, memsz, flags, bytes) of each PT_LOAD.
    fn view(b: &[u8]) -> Vec<(u64, u64, u32, Vec<u8>)> {
        parse(b)
            .unwrap()
            .segments
            .into_iter()
            .map(|s| (s.vaddr, s.memsz, s.flags, s.data))
            .collect()
    }

    fn congruent(b: &[u8]) -> bool {
        parse(b)
            .unwrap()
            .segments
            .iter()
            .all(|s| s.align <= 1 || s.offset % s.align == s.vaddr % s.align)
    }

    #[test]
    fn the_stripped_image_loads_the_same_segments() {
        let orig = sample();
        let min = loadable(&orig).unwrap();
        // Headers, then each segment at its page offset: 0x1000 + 0x123, 0x2010 + 0x20.
        assert_eq!(min.len(), 0x2030);
        assert_eq!(view(&min), view(&orig));
        assert_eq!(parse(&min).unwrap().entry, 0x40_0010);
        assert!(congruent(&min));
        // No section headers left.
        assert_eq!(u64_at(&min, 40), 0);
        assert_eq!(u16_at(&min, 60), 0);
        // Stripping is idempotent.
        assert_eq!(loadable(&min).unwrap(), min);
    }

    #[test]
    fn the_real_hello_dom_strips_to_its_loadable_bytes() {
        // The bare-metal build's hello-dom, when there is one (the QEMU scenarios build it).
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dirs = [
            std::env::var_os("CARGO_TARGET_DIR").map(std::path::PathBuf::from),
            Some(root.join("target")),
        ];
        let Some(orig) = dirs
            .into_iter()
            .flatten()
            .map(|d| d.join("x86_64-unknown-none/release/hello-dom"))
            .find_map(|p| std::fs::read(p).ok())
        else {
            eprintln!("no bare-metal hello-dom built: only the synthetic ELF was checked");
            return;
        };
        let min = loadable(&orig).unwrap();
        assert!(min.len() < orig.len());
        assert_eq!(view(&min), view(&orig));
        assert!(congruent(&min));
    }

    #[test]
    fn hostile_files_are_refused_with_a_reason() {
        let good = sample();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("text", b"not an elf at all, really not".to_vec()),
            ("short", good[..40].to_vec()),
        ];
        let mut c = good.clone();
        c[4] = 1;
        cases.push(("32-bit", c));
        let mut c = good.clone();
        c[18] = 3;
        cases.push(("i386", c));
        let mut c = good.clone();
        c[16] = 3;
        cases.push(("shared object", c));
        let mut c = good.clone();
        c[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        cases.push(("too many phdrs", c));
        let mut c = good.clone();
        c[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(("phoff overflow", c));
        let mut c = good.clone();
        c[64 + 8..64 + 16].copy_from_slice(&(u64::MAX - 4).to_le_bytes());
        cases.push(("segment offset overflow", c));
        let mut c = good.clone();
        c[64 + 32..64 + 40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        cases.push(("segment past the end", c));
        let mut c = good.clone();
        c[64 + 40..64 + 48].copy_from_slice(&1u64.to_le_bytes());
        cases.push(("filesz > memsz", c));
        let mut c = good.clone();
        c[64 + 48..64 + 56].copy_from_slice(&0x1001u64.to_le_bytes());
        cases.push(("bad align", c));
        let mut c = good;
        c[64..68].copy_from_slice(&0u32.to_le_bytes());
        c[64 + 112..64 + 116].copy_from_slice(&0u32.to_le_bytes());
        cases.push(("no PT_LOAD", c));
        for (what, bytes) in cases {
            let e = loadable(&bytes).expect_err(what);
            assert!(!e.is_empty(), "{what}");
        }
    }

    #[test]
    fn placement_keeps_congruence() {
        for at in [0u64, 1, 0x77, 0x1000, 0x1fff] {
            for va in [0x40_0000u64, 0x40_1010, 0x40_0fff] {
                for align in [1u64, 8, 0x1000] {
                    let o = place(at, va, align);
                    assert!(o >= at && o < at + align.max(1));
                    assert_eq!(o % align, va % align);
                }
            }
        }
    }
}
