//! x86-64 4-level page-table editing, as portable logic over an abstract table memory (on bare
//! metal: frames reached through the direct map; in tests: a map of fake frames).
//!
//! Invariants: intermediate entries are always present + writable and carry no NX bit, so a
//! leaf's flags alone decide its permissions; a range is mapped with 2 MiB pages only where
//! both addresses are 2 MiB-aligned and the whole large page is inside the range; an existing
//! mapping is never silently replaced ([`MapError::AlreadyMapped`]).
//!
//! Not synchronised: the caller holds the lock of the address space it edits and flushes TLBs
//! after unmapping.

use super::{FRAME_SIZE, LARGE_PAGE_SIZE};

/// Page-table entry bits.
pub mod flags {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const WRITE_THROUGH: u64 = 1 << 3;
    pub const CACHE_DISABLE: u64 = 1 << 4;
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    /// In a level-2 entry: a 2 MiB page.
    pub const HUGE: u64 = 1 << 7;
    pub const GLOBAL: u64 = 1 << 8;
    pub const NO_EXECUTE: u64 = 1 << 63;
}

/// Physical-address bits of an entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Memory that holds page tables.
pub trait TableMemory {
    /// A new zero-filled table frame, or `None` when memory is exhausted.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Entry `index` of the table at physical address `table`.
    fn read(&self, table: u64, index: usize) -> u64;
    /// Set entry `index` of the table at physical address `table`.
    fn write(&mut self, table: u64, index: usize, value: u64);
}

/// Why a mapping was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    Misaligned {
        virt: u64,
        phys: u64,
    },
    NonCanonical {
        virt: u64,
    },
    /// The page (or a large page covering it) is already mapped.
    AlreadyMapped {
        virt: u64,
    },
    /// A table could not be allocated.
    OutOfMemory,
}

/// Page sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    Small,
    Large,
}

impl PageSize {
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Small => FRAME_SIZE,
            PageSize::Large => LARGE_PAGE_SIZE,
        }
    }
}

/// True if `virt` is a canonical 48-bit address.
pub const fn is_canonical(virt: u64) -> bool {
    let top = virt >> 47;
    top == 0 || top == 0x1_ffff
}

fn index(virt: u64, level: u32) -> usize {
    ((virt >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

/// An address space: a root (PML4) table and the memory its tables live in.
#[derive(Debug)]
pub struct PageTable<M: TableMemory> {
    root: u64,
    mem: M,
}

impl<M: TableMemory> PageTable<M> {
    /// A new, empty address space.
    pub fn new(mut mem: M) -> Option<PageTable<M>> {
        let root = mem.alloc_table()?;
        Some(PageTable { root, mem })
    }

    /// Physical address of the root table (the CR3 value).
    pub fn root(&self) -> u64 {
        self.root
    }

    pub fn memory(&mut self) -> &mut M {
        &mut self.mem
    }

    /// The table at `level` (1 = page table) covering `virt`, creating missing tables.
    fn table_for(&mut self, virt: u64, level: u32, leaf_user: bool) -> Result<u64, MapError> {
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let i = index(virt, l);
            let e = self.mem.read(table, i);
            if e & flags::PRESENT == 0 {
                let t = self.mem.alloc_table().ok_or(MapError::OutOfMemory)?;
                let user = if leaf_user { flags::USER } else { 0 };
                self.mem
                    .write(table, i, t | flags::PRESENT | flags::WRITABLE | user);
                table = t;
            } else if e & flags::HUGE != 0 {
                return Err(MapError::AlreadyMapped { virt });
            } else {
                if leaf_user && e & flags::USER == 0 {
                    self.mem.write(table, i, e | flags::USER);
                }
                table = e & ADDR_MASK;
            }
        }
        Ok(table)
    }

    /// Map one page.
    pub fn map(&mut self, virt: u64, phys: u64, size: PageSize, fl: u64) -> Result<(), MapError> {
        let b = size.bytes();
        if !virt.is_multiple_of(b) || !phys.is_multiple_of(b) || phys & !ADDR_MASK != 0 {
            return Err(MapError::Misaligned { virt, phys });
        }
        if !is_canonical(virt) {
            return Err(MapError::NonCanonical { virt });
        }
        let (level, extra) = match size {
            PageSize::Small => (1, 0),
            PageSize::Large => (2, flags::HUGE),
        };
        let table = self.table_for(virt, level, fl & flags::USER != 0)?;
        let i = index(virt, level);
        if self.mem.read(table, i) & flags::PRESENT != 0 {
            return Err(MapError::AlreadyMapped { virt });
        }
        let leaf = phys | (fl & !ADDR_MASK & !flags::HUGE) | flags::PRESENT | extra;
        self.mem.write(table, i, leaf);
        Ok(())
    }

    /// Map `[virt, virt + len)` to `[phys, phys + len)` (both page-aligned, `len` a multiple
    /// of a page), with 2 MiB pages where allowed and `large` is set.
    pub fn map_range(
        &mut self,
        virt: u64,
        phys: u64,
        len: u64,
        fl: u64,
        large: bool,
    ) -> Result<(), MapError> {
        self.map_range_inner(virt, phys, len, fl, large, false)
    }

    /// Like [`Self::map_range`], but pages already mapped to the same physical address (by a
    /// small or large page) are left as they are.
    pub fn map_range_if_absent(
        &mut self,
        virt: u64,
        phys: u64,
        len: u64,
        fl: u64,
    ) -> Result<(), MapError> {
        self.map_range_inner(virt, phys, len, fl, false, true)
    }

    fn map_range_inner(
        &mut self,
        virt: u64,
        phys: u64,
        len: u64,
        fl: u64,
        large: bool,
        skip_same: bool,
    ) -> Result<(), MapError> {
        if !virt.is_multiple_of(FRAME_SIZE)
            || !phys.is_multiple_of(FRAME_SIZE)
            || !len.is_multiple_of(FRAME_SIZE)
        {
            return Err(MapError::Misaligned { virt, phys });
        }
        let end = virt
            .checked_add(len)
            .ok_or(MapError::NonCanonical { virt })?;
        let mut off = 0;
        while off < len {
            let (v, p) = (virt + off, phys + off);
            let can_large = large
                && v.is_multiple_of(LARGE_PAGE_SIZE)
                && p.is_multiple_of(LARGE_PAGE_SIZE)
                && end - v >= LARGE_PAGE_SIZE;
            let size = if can_large {
                PageSize::Large
            } else {
                PageSize::Small
            };
            if skip_same && let Some((mapped, _)) = self.translate(v) {
                if mapped != p {
                    return Err(MapError::AlreadyMapped { virt: v });
                }
            } else {
                self.map(v, p, size, fl)?;
            }
            off += size.bytes();
        }
        Ok(())
    }

    /// The physical address `virt` maps to and the leaf entry's flags.
    pub fn translate(&self, virt: u64) -> Option<(u64, u64)> {
        if !is_canonical(virt) {
            return None;
        }
        let mut table = self.root;
        for level in (1..=4).rev() {
            let e = self.mem.read(table, index(virt, level));
            if e & flags::PRESENT == 0 {
                return None;
            }
            if level == 1 || (level == 2 && e & flags::HUGE != 0) {
                let page = if level == 1 {
                    FRAME_SIZE
                } else {
                    LARGE_PAGE_SIZE
                };
                let base = e & ADDR_MASK & !(page - 1);
                return Some((base + (virt & (page - 1)), e & !ADDR_MASK));
            }
            if level == 3 && e & flags::HUGE != 0 {
                // 1 GiB pages are never created here; refuse to interpret one.
                return None;
            }
            table = e & ADDR_MASK;
        }
        None
    }

    /// Remove the small-page mapping of `virt`, returning the physical address it mapped.
    /// The caller must flush the TLB. Large pages are not split.
    pub fn unmap(&mut self, virt: u64) -> Option<u64> {
        let mut table = self.root;
        for level in (2..=4).rev() {
            let e = self.mem.read(table, index(virt, level));
            if e & flags::PRESENT == 0 || e & flags::HUGE != 0 {
                return None;
            }
            table = e & ADDR_MASK;
        }
        let i = index(virt, 1);
        let e = self.mem.read(table, i);
        if e & flags::PRESENT == 0 {
            return None;
        }
        self.mem.write(table, i, 0);
        Some(e & ADDR_MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const ENTRIES: usize = 512;

    #[derive(Default)]
    struct FakeMem {
        tables: HashMap<u64, [u64; ENTRIES]>,
        next: u64,
        limit: usize,
    }

    impl TableMemory for FakeMem {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.tables.len() >= self.limit {
                return None;
            }
            self.next += FRAME_SIZE;
            self.tables.insert(self.next, [0; ENTRIES]);
            Some(self.next)
        }
        fn read(&self, t: u64, i: usize) -> u64 {
            self.tables[&t][i]
        }
        fn write(&mut self, t: u64, i: usize, v: u64) {
            self.tables.get_mut(&t).unwrap()[i] = v;
        }
    }

    fn pt() -> PageTable<FakeMem> {
        PageTable::new(FakeMem {
            limit: 64,
            ..Default::default()
        })
        .unwrap()
    }

    const HV: u64 = 0xffff_8300_0000_0000;

    #[test]
    fn small_page_translates_with_offset_and_flags() {
        let mut p = pt();
        p.map(HV + 0x5000, 0x1234_5000, PageSize::Small, flags::NO_EXECUTE)
            .unwrap();
        let (phys, f) = p.translate(HV + 0x5abc).unwrap();
        assert_eq!(phys, 0x1234_5abc);
        assert_ne!(f & flags::NO_EXECUTE, 0);
        assert_eq!(f & flags::WRITABLE, 0);
        assert_eq!(p.translate(HV + 0x6000), None);
    }

    #[test]
    fn range_uses_large_pages_only_where_fully_covered() {
        let mut p = pt();
        // 1 MiB below a 2 MiB boundary to 1 MiB above the next one.
        let start = 0x10_0000u64;
        let len = 0x40_0000u64;
        p.map_range(HV + start, start, len, flags::WRITABLE, true)
            .unwrap();
        let (_, f) = p.translate(HV + 0x20_0000).unwrap();
        assert_ne!(f & flags::HUGE, 0, "2..4 MiB is one large page");
        let (_, f) = p.translate(HV + 0x1f_f000).unwrap();
        assert_eq!(f & flags::HUGE, 0, "below 2 MiB stays small");
        let (phys, f) = p.translate(HV + 0x40_0000).unwrap();
        assert_eq!(
            (phys, f & flags::HUGE),
            (0x40_0000, 0),
            "4..5 MiB stays small"
        );
        assert_eq!(p.translate(HV + 0x50_0000), None);
    }

    #[test]
    fn double_map_and_bad_addresses_are_refused() {
        let mut p = pt();
        p.map(HV, 0, PageSize::Large, 0).unwrap();
        assert_eq!(
            p.map(HV + 0x1000, 0x1000, PageSize::Small, 0),
            Err(MapError::AlreadyMapped { virt: HV + 0x1000 })
        );
        assert_eq!(
            p.map(HV, 0, PageSize::Large, 0),
            Err(MapError::AlreadyMapped { virt: HV })
        );
        assert_eq!(
            p.map(0x1000, 0x800, PageSize::Small, 0),
            Err(MapError::Misaligned {
                virt: 0x1000,
                phys: 0x800
            })
        );
        assert_eq!(
            p.map(0x0000_8000_0000_0000, 0, PageSize::Small, 0),
            Err(MapError::NonCanonical {
                virt: 0x0000_8000_0000_0000
            })
        );
    }

    #[test]
    fn map_if_absent_skips_same_mapping_and_refuses_a_different_one() {
        let mut p = pt();
        p.map_range(HV, 0, 0x40_0000, 0, true).unwrap();
        p.map_range_if_absent(HV + 0x1f_f000, 0x1f_f000, 0x3000, 0)
            .unwrap();
        assert_eq!(
            p.map_range_if_absent(HV + 0x1000, 0x9000, 0x1000, 0),
            Err(MapError::AlreadyMapped { virt: HV + 0x1000 })
        );
        p.map_range_if_absent(HV + 0x40_0000, 0x40_0000, 0x1000, 0)
            .unwrap();
        assert_eq!(p.translate(HV + 0x40_0010).unwrap().0, 0x40_0010);
    }

    #[test]
    fn unmap_leaves_a_hole_and_out_of_memory_is_reported() {
        let mut p = pt();
        p.map_range(HV, 0x100_0000, 0x3000, 0, false).unwrap();
        assert_eq!(p.unmap(HV + 0x1000), Some(0x100_1000));
        assert_eq!(p.translate(HV + 0x1000), None);
        assert!(p.translate(HV + 0x2000).is_some());
        assert_eq!(p.unmap(HV + 0x1000), None);

        let mut tiny = PageTable::new(FakeMem {
            limit: 2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            tiny.map(HV, 0, PageSize::Small, 0),
            Err(MapError::OutOfMemory)
        );
    }

    #[test]
    fn intermediate_entries_carry_user_only_for_user_leaves() {
        let mut p = pt();
        p.map(0x40_0000, 0x1000, PageSize::Small, flags::USER)
            .unwrap();
        let root = p.root();
        let e = p.memory().read(root, 0);
        assert_ne!(e & flags::USER, 0);
        p.map(HV, 0x2000, PageSize::Small, 0).unwrap();
        let e = p.memory().read(root, index(HV, 4));
        assert_eq!(e & flags::USER, 0);
    }
}
