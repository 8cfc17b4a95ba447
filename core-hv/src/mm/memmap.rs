//! The physical memory map: turns the firmware's e820-style table and the ranges the
//! hypervisor must keep for itself (its image, the boot module, the low 1 MiB, boot data) into
//! sorted, disjoint, page-aligned ranges of usable RAM.
//!
//! Invariants of [`usable_ranges`]' result: every range is non-empty and page-aligned, ranges are
//! sorted and neither overlap nor touch, every byte lies in a RAM entry, and no byte lies in a
//! non-RAM entry (where the firmware contradicts itself, "not RAM" wins) or a reserved range.

use heapless::Vec;
use shared_abi::hvm_start_info::{HvmMemmapEntry, memmap_type};

use super::{FRAME_SIZE, align_down, align_up};

/// Most usable ranges the map can hold (holes split ranges, so this exceeds the entry limit).
pub const MAX_RANGES: usize = 256;

/// A half-open physical address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysRange {
    pub start: u64,
    pub end: u64,
}

impl PhysRange {
    pub const fn new(start: u64, end: u64) -> PhysRange {
        PhysRange { start, end }
    }

    /// `[start, start + len)`, or `None` if that overflows.
    pub const fn with_len(start: u64, len: u64) -> Option<PhysRange> {
        match start.checked_add(len) {
            Some(end) => Some(PhysRange { start, end }),
            None => None,
        }
    }

    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    pub const fn contains_range(&self, other: &PhysRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The largest page-aligned range inside this one (may be empty).
    pub fn shrink_to_pages(&self) -> PhysRange {
        let start = align_up(self.start, FRAME_SIZE).unwrap_or(u64::MAX);
        let end = align_down(self.end, FRAME_SIZE);
        PhysRange::new(start, end.max(start))
    }

    /// The smallest page-aligned range covering this one (saturating at the top page).
    pub fn grow_to_pages(&self) -> PhysRange {
        let start = align_down(self.start, FRAME_SIZE);
        let end = align_up(self.end, FRAME_SIZE).unwrap_or(align_down(u64::MAX, FRAME_SIZE));
        PhysRange::new(start, end)
    }
}

/// Why a memory map was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemMapError {
    /// An entry's `addr + size` wraps around the address space.
    EntryOverflows { index: usize, addr: u64, size: u64 },
    /// The map is so fragmented that it needs more than [`MAX_RANGES`] ranges.
    TooFragmented { max: usize },
    /// No usable RAM is left once the reserved ranges are taken out.
    NoUsableRam,
}

impl core::fmt::Display for MemMapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MemMapError::EntryOverflows { index, addr, size } => write!(
                f,
                "memory map entry {index} (addr {addr:#x}, size {size:#x}) wraps past 2^64"
            ),
            MemMapError::TooFragmented { max } => {
                write!(f, "memory map needs more than {max} usable ranges")
            }
            MemMapError::NoUsableRam => write!(f, "memory map leaves no usable RAM"),
        }
    }
}

/// The ranges an entry covers, checked for overflow; empty entries (such as the all-zero last
/// entry some firmware appends) give `None`.
fn entry_range(index: usize, e: &HvmMemmapEntry) -> Result<Option<PhysRange>, MemMapError> {
    if e.size == 0 {
        return Ok(None);
    }
    let r = PhysRange::with_len(e.addr, e.size).ok_or(MemMapError::EntryOverflows {
        index,
        addr: e.addr,
        size: e.size,
    })?;
    Ok(Some(r))
}

/// Remove `hole` from every range in `ranges`.
fn subtract(ranges: &mut Vec<PhysRange, MAX_RANGES>, hole: PhysRange) -> Result<(), MemMapError> {
    let mut i = 0;
    while i < ranges.len() {
        let r = ranges[i];
        if !r.overlaps(&hole) {
            i += 1;
            continue;
        }
        let left = PhysRange::new(r.start, hole.start.max(r.start).min(r.end));
        let right = PhysRange::new(hole.end.min(r.end).max(r.start), r.end);
        ranges.swap_remove(i);
        for piece in [left, right] {
            if !piece.is_empty() {
                ranges
                    .push(piece)
                    .map_err(|_| MemMapError::TooFragmented { max: MAX_RANGES })?;
            }
        }
        // The swapped-in element (and the pushed pieces, which no longer overlap) are
        // re-examined from index `i`.
    }
    Ok(())
}

/// Sort and merge overlapping or touching ranges.
pub fn normalise(ranges: &mut Vec<PhysRange, MAX_RANGES>) {
    ranges.sort_unstable();
    let mut out: Vec<PhysRange, MAX_RANGES> = Vec::new();
    for r in ranges.iter().copied() {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            // Cannot fail: `out` never holds more elements than `ranges`.
            _ => {
                let _ = out.push(r);
            }
        }
    }
    *ranges = out;
}

/// RAM as the firmware reports it (merged, not page-aligned, no reservations applied; non-RAM
/// entries still win over overlapping RAM entries).
pub fn ram_ranges(entries: &[HvmMemmapEntry]) -> Result<Vec<PhysRange, MAX_RANGES>, MemMapError> {
    let mut ram: Vec<PhysRange, MAX_RANGES> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind == memmap_type::RAM
            && let Some(r) = entry_range(i, e)?
        {
            ram.push(r)
                .map_err(|_| MemMapError::TooFragmented { max: MAX_RANGES })?;
        }
    }
    for (i, e) in entries.iter().enumerate() {
        if e.kind != memmap_type::RAM
            && let Some(r) = entry_range(i, e)?
        {
            subtract(&mut ram, r)?;
        }
    }
    normalise(&mut ram);
    Ok(ram)
}

/// True if `range` lies entirely in RAM the firmware reported.
pub fn is_ram(entries: &[HvmMemmapEntry], range: PhysRange) -> Result<bool, MemMapError> {
    if range.is_empty() {
        return Ok(false);
    }
    Ok(ram_ranges(entries)?
        .iter()
        .any(|r| r.contains_range(&range)))
}

/// Usable RAM: RAM entries shrunk to whole pages, minus every non-RAM entry and every
/// `reserved` range (each grown to whole pages), clipped below `limit`.
pub fn usable_ranges(
    entries: &[HvmMemmapEntry],
    reserved: &[PhysRange],
    limit: u64,
) -> Result<Vec<PhysRange, MAX_RANGES>, MemMapError> {
    let mut ranges: Vec<PhysRange, MAX_RANGES> = Vec::new();
    for r in ram_ranges(entries)? {
        let r = r.shrink_to_pages();
        let r = PhysRange::new(r.start, r.end.min(align_down(limit, FRAME_SIZE)));
        if !r.is_empty() {
            ranges
                .push(r)
                .map_err(|_| MemMapError::TooFragmented { max: MAX_RANGES })?;
        }
    }
    for hole in reserved {
        if !hole.is_empty() {
            subtract(&mut ranges, hole.grow_to_pages())?;
        }
    }
    normalise(&mut ranges);
    if ranges.is_empty() {
        return Err(MemMapError::NoUsableRam);
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(addr: u64, size: u64, kind: u32) -> HvmMemmapEntry {
        HvmMemmapEntry {
            addr,
            size,
            kind,
            reserved: 0,
        }
    }

    /// QEMU q35 with 512 MiB, as observed (plus microvm's all-zero terminator).
    fn q35_map() -> [HvmMemmapEntry; 7] {
        [
            e(0, 0x9fc00, memmap_type::RAM),
            e(0x9fc00, 0x400, memmap_type::RESERVED),
            e(0xf0000, 0x10000, memmap_type::RESERVED),
            e(0x100000, 0x1fee0000, memmap_type::RAM),
            e(0x1ffe0000, 0x20000, memmap_type::RESERVED),
            e(0xb0000000, 0x10000000, memmap_type::RESERVED),
            e(0, 0, 0),
        ]
    }

    #[test]
    fn q35_map_minus_reservations_gives_page_aligned_disjoint_ranges() {
        let reserved = [
            PhysRange::new(0, 0x100000),
            PhysRange::new(0x100000, 0x180123),
            PhysRange::new(0x1ff8e000, 0x1ffd4e19),
        ];
        let r = usable_ranges(&q35_map(), &reserved, u64::MAX).unwrap();
        assert_eq!(
            r.as_slice(),
            &[
                PhysRange::new(0x181000, 0x1ff8e000),
                PhysRange::new(0x1ffd5000, 0x1ffe0000)
            ]
        );
    }

    #[test]
    fn all_zero_last_entry_is_tolerated() {
        let r = ram_ranges(&[e(0x1000, 0x3000, 1), e(0, 0, 0)]).unwrap();
        assert_eq!(r.as_slice(), &[PhysRange::new(0x1000, 0x4000)]);
    }

    #[test]
    fn overflowing_entry_is_refused_with_its_index() {
        let err = ram_ranges(&[e(0, 0x1000, 1), e(u64::MAX - 10, 100, 1)]).unwrap_err();
        assert_eq!(
            err,
            MemMapError::EntryOverflows {
                index: 1,
                addr: u64::MAX - 10,
                size: 100
            }
        );
    }

    #[test]
    fn reserved_entry_overlapping_ram_wins() {
        let r = ram_ranges(&[e(0, 0x10000, 1), e(0x4000, 0x1000, 2)]).unwrap();
        assert_eq!(
            r.as_slice(),
            &[PhysRange::new(0, 0x4000), PhysRange::new(0x5000, 0x10000)]
        );
    }

    #[test]
    fn unaligned_ram_is_shrunk_and_limit_clips() {
        let r = usable_ranges(&[e(0x1001, 0x5000, 1)], &[], 0x4800).unwrap();
        assert_eq!(r.as_slice(), &[PhysRange::new(0x2000, 0x4000)]);
    }

    #[test]
    fn no_ram_at_all_is_an_error() {
        assert_eq!(
            usable_ranges(&[e(0, 0x1000, 2)], &[], u64::MAX),
            Err(MemMapError::NoUsableRam)
        );
        assert_eq!(
            usable_ranges(&[e(0, 0x1000, 1)], &[PhysRange::new(0, 0x1000)], u64::MAX),
            Err(MemMapError::NoUsableRam)
        );
    }

    #[test]
    fn is_ram_checks_whole_range_inside_one_ram_span() {
        let m = q35_map();
        assert!(is_ram(&m, PhysRange::new(0x1ff8e000, 0x1ffd4e19)).unwrap());
        assert!(!is_ram(&m, PhysRange::new(0x1ff8e000, 0x1ffe0001)).unwrap());
        assert!(!is_ram(&m, PhysRange::new(0x9f000, 0x100000)).unwrap());
        assert!(!is_ram(&m, PhysRange::new(0x5000, 0x5000)).unwrap());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_entry() -> impl Strategy<Value = HvmMemmapEntry> {
            (0u64..0x400, 0u64..0x100, 1u32..5, 0u64..0x1000)
                .prop_map(|(a, s, k, frac)| e(a * 0x1000 + frac, s * 0x1000 + frac / 3, k))
        }

        /// Do the RAM entries, clipped to `page`, cover it without gaps?
        fn covered(page: PhysRange, entries: &[HvmMemmapEntry]) -> bool {
            let mut parts: std::vec::Vec<(u64, u64)> = entries
                .iter()
                .filter(|x| x.kind == memmap_type::RAM)
                .map(|x| (x.addr.max(page.start), (x.addr + x.size).min(page.end)))
                .filter(|(s, e)| s < e)
                .collect();
            parts.sort();
            let mut at = page.start;
            for (s, e) in parts {
                if s > at {
                    return false;
                }
                at = at.max(e);
            }
            at >= page.end
        }

        proptest! {
            #[test]
            fn usable_ranges_are_sorted_aligned_ram_and_avoid_holes(
                entries in prop::collection::vec(arb_entry(), 1..12),
                reserved in prop::collection::vec((0u64..0x500_000, 1u64..0x40_000), 0..6),
            ) {
                let reserved: std::vec::Vec<PhysRange> =
                    reserved.iter().map(|&(s, l)| PhysRange::new(s, s + l)).collect();
                let Ok(ranges) = usable_ranges(&entries, &reserved, u64::MAX) else {
                    return Ok(());
                };
                for w in ranges.windows(2) {
                    prop_assert!(w[0].end < w[1].start, "sorted, disjoint, not touching");
                }
                for r in &ranges {
                    prop_assert!(!r.is_empty());
                    prop_assert_eq!(r.start % FRAME_SIZE, 0);
                    prop_assert_eq!(r.end % FRAME_SIZE, 0);
                    // Probe every page: inside a RAM entry, outside every non-RAM entry and
                    // every reserved range.
                    let mut a = r.start;
                    while a < r.end {
                        let page = PhysRange::new(a, a + FRAME_SIZE);
                        prop_assert!(covered(page, &entries), "page {a:#x} not all RAM");
                        for x in entries.iter().filter(|x| x.kind != memmap_type::RAM) {
                            prop_assert!(!PhysRange::new(x.addr, x.addr + x.size).overlaps(&page));
                        }
                        for h in &reserved {
                            prop_assert!(!h.overlaps(&page));
                        }
                        a += FRAME_SIZE;
                    }
                }
            }
        }
    }
}
