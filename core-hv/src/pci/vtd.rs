//! Intel VT-d, the portable half: register layout and capability decoding, the root and
//! context tables (legacy mode) that name each device's translation, the second-level page
//! tables that map exactly the pages a domain's device may reach, and fault-record decoding.
//! `arch::x86_64::iommu` owns the registers and the memory.
//!
//! Tables live in [`TableMemory`] frames (512 `u64` slots each). A root or context entry is
//! 128 bits: slot `2i` is its low half, `2i + 1` its high half.
//!
//! Invariants: a device with no context entry, or a context entry whose tables lack a page,
//! gets a translation fault, never a pass-through: "not mapped" means "blocked". A page is
//! mapped at most once ([`SlError::AlreadyMapped`]); only 4 KiB leaves are created, so unmap is
//! exact. Hardware may cache entries: the caller invalidates the context cache after
//! changing a context entry and the IOTLB after unmapping.

use core::fmt;

use crate::mm::FRAME_SIZE;
use crate::mm::paging::TableMemory;

use super::PciAddress;

/// Register offsets.
pub mod regs {
    pub const VER: usize = 0x00;
    pub const CAP: usize = 0x08;
    pub const ECAP: usize = 0x10;
    pub const GCMD: usize = 0x18;
    pub const GSTS: usize = 0x1c;
    pub const RTADDR: usize = 0x20;
    pub const CCMD: usize = 0x28;
    pub const FSTS: usize = 0x34;
    pub const FECTL: usize = 0x38;
    pub const FEDATA: usize = 0x3c;
    pub const FEADDR: usize = 0x40;
    pub const FEUADDR: usize = 0x44;
    /// Protected memory enable: firmware may leave a region DMA-protected.
    pub const PMEN: usize = 0x64;
}

/// Global command / status bits (same positions in GCMD and GSTS).
pub mod gcmd {
    pub const TE: u32 = 1 << 31;
    pub const SRTP: u32 = 1 << 30;
    pub const SFL: u32 = 1 << 29;
    pub const EAFL: u32 = 1 << 28;
    pub const WBF: u32 = 1 << 27;
    pub const QIE: u32 = 1 << 26;
    pub const IRE: u32 = 1 << 25;
    pub const SIRTP: u32 = 1 << 24;
    pub const CFI: u32 = 1 << 23;
    /// Bits that reflect a standing state (the rest are one-shot commands): a GCMD write
    /// must repeat these from GSTS or it turns them off.
    pub const PERSISTENT: u32 = TE | EAFL | QIE | IRE | CFI;
}

/// Fault status bits.
pub mod fsts {
    pub const PFO: u32 = 1 << 0;
    pub const PPF: u32 = 1 << 1;
    pub const AFO: u32 = 1 << 2;
    pub const APF: u32 = 1 << 3;
    pub const IQE: u32 = 1 << 4;
    pub const ICE: u32 = 1 << 5;
    pub const ITE: u32 = 1 << 6;
    /// Write-1-to-clear bits.
    pub const CLEAR: u32 = PFO | AFO | APF | IQE | ICE | ITE;
}

/// Fault event control: interrupt mask.
pub const FECTL_IM: u32 = 1 << 31;

/// The GCMD value that sets (or clears) `bit` without disturbing the standing state.
pub const fn gcmd_value(gsts: u32, bit: u32, on: bool) -> u32 {
    let base = gsts & gcmd::PERSISTENT;
    if on { base | bit } else { base & !bit }
}

/// Decoded capability register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Domain ids supported: 2^(4 + 2·ND).
    pub domains: u32,
    pub required_write_buffer_flush: bool,
    pub caching_mode: bool,
    /// Supported adjusted guest address widths (bit 1: 39-bit, bit 2: 48-bit, bit 3: 57-bit).
    pub sagaw: u8,
    /// Maximum guest address width.
    pub mgaw: u8,
    /// Offset of the fault recording registers (bytes).
    pub fault_offset: usize,
    pub fault_records: usize,
    pub page_selective_invalidation: bool,
    /// Second-level large pages (bit 0: 2 MiB, bit 1: 1 GiB).
    pub large_pages: u8,
}

impl Cap {
    pub const fn decode(v: u64) -> Cap {
        Cap {
            domains: 1 << (4 + 2 * (v & 7) as u32),
            required_write_buffer_flush: v & (1 << 4) != 0,
            caching_mode: v & (1 << 7) != 0,
            sagaw: ((v >> 8) & 0x1f) as u8,
            mgaw: (((v >> 16) & 0x3f) + 1) as u8,
            fault_offset: (((v >> 24) & 0x3ff) * 16) as usize,
            fault_records: (((v >> 40) & 0xff) + 1) as usize,
            page_selective_invalidation: v & (1 << 39) != 0,
            large_pages: ((v >> 34) & 0xf) as u8,
        }
    }

    /// The page-table depth to use: 4 levels (48-bit) if supported, else 3 (39-bit).
    pub const fn levels(&self) -> Option<u32> {
        if self.sagaw & 0b100 != 0 {
            Some(4)
        } else if self.sagaw & 0b010 != 0 {
            Some(3)
        } else {
            None
        }
    }
}

/// Decoded extended capability register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecap {
    /// Page walks snoop the CPU caches; without it, table writes need a cache-line flush.
    pub coherent: bool,
    pub queued_invalidation: bool,
    pub interrupt_remapping: bool,
    pub pass_through: bool,
    /// Offset of the IOTLB registers (bytes): IVA at +0, IOTLB command at +8.
    pub iotlb_offset: usize,
    pub scalable_mode: bool,
}

impl Ecap {
    pub const fn decode(v: u64) -> Ecap {
        Ecap {
            coherent: v & 1 != 0,
            queued_invalidation: v & 2 != 0,
            interrupt_remapping: v & 8 != 0,
            pass_through: v & (1 << 6) != 0,
            iotlb_offset: (((v >> 8) & 0x3ff) * 16) as usize,
            scalable_mode: v & (1 << 43) != 0,
        }
    }
}

/// Context-command: invalidate the whole context cache.
pub const CCMD_GLOBAL_INVALIDATE: u64 = (1 << 63) | (1 << 61);
/// Context-command: the busy bit the hardware clears when done.
pub const CCMD_ICC: u64 = 1 << 63;
/// IOTLB command: invalidate everything (plus drain reads and writes).
pub const IOTLB_GLOBAL_INVALIDATE: u64 = (1 << 63) | (1 << 60) | (1 << 49) | (1 << 48);
/// IOTLB command: the busy bit.
pub const IOTLB_IVT: u64 = 1 << 63;

/// Context-entry address width field for a table depth.
const fn aw_for(levels: u32) -> u64 {
    match levels {
        3 => 1,
        4 => 2,
        _ => 3,
    }
}

const P: u64 = 1;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Why a context could not be set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextError {
    OutOfMemory,
    /// Domain id outside the unit's range (0 is reserved when caching mode is on; we never
    /// use it).
    DomainId(u16),
}

/// The root table and the context tables it points to.
#[derive(Debug)]
pub struct ContextTables {
    root: u64,
}

impl ContextTables {
    /// A new, empty root table: every device blocked.
    pub fn new(mem: &mut impl TableMemory) -> Option<ContextTables> {
        Some(ContextTables {
            root: mem.alloc_table()?,
        })
    }

    /// Physical address for RTADDR (legacy mode: TTM bits zero).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Translate `dev`'s DMA through the second-level table at `slpt` (depth `levels`) as
    /// domain `did` (1..domains).
    pub fn set(
        &mut self,
        mem: &mut impl TableMemory,
        dev: PciAddress,
        slpt: u64,
        levels: u32,
        did: u16,
        domains: u32,
    ) -> Result<(), ContextError> {
        if did == 0 || did as u32 >= domains {
            return Err(ContextError::DomainId(did));
        }
        let ctx = self
            .ensure_bus(mem, dev.bus)
            .ok_or(ContextError::OutOfMemory)?;
        let i = dev.devfn() as usize;
        // Write the high half first, then the present bit, so the hardware never sees a
        // present entry with a stale domain id.
        mem.write(ctx, 2 * i + 1, aw_for(levels) | ((did as u64) << 8));
        mem.write(ctx, 2 * i, (slpt & ADDR) | P);
        Ok(())
    }

    /// The context table of `bus`, made (all devices blocked) if there was none. It stays for
    /// the unit's lifetime: making it ahead of time keeps later attaches from allocating.
    pub fn ensure_bus(&mut self, mem: &mut impl TableMemory, bus: u8) -> Option<u64> {
        let bus = bus as usize;
        let rlo = mem.read(self.root, 2 * bus);
        if rlo & P != 0 {
            return Some(rlo & ADDR);
        }
        let t = mem.alloc_table()?;
        mem.write(self.root, 2 * bus, t | P);
        Some(t)
    }

    /// Block `dev` again. Returns whether it had a context.
    pub fn clear(&mut self, mem: &mut impl TableMemory, dev: PciAddress) -> bool {
        let rlo = mem.read(self.root, 2 * dev.bus as usize);
        if rlo & P == 0 {
            return false;
        }
        let ctx = rlo & ADDR;
        let i = dev.devfn() as usize;
        let was = mem.read(ctx, 2 * i) & P != 0;
        mem.write(ctx, 2 * i, 0);
        mem.write(ctx, 2 * i + 1, 0);
        was
    }

    /// `dev`'s second-level root and domain id, if it has a context.
    pub fn get(&self, mem: &impl TableMemory, dev: PciAddress) -> Option<(u64, u16)> {
        let rlo = mem.read(self.root, 2 * dev.bus as usize);
        if rlo & P == 0 {
            return None;
        }
        let ctx = rlo & ADDR;
        let i = dev.devfn() as usize;
        let lo = mem.read(ctx, 2 * i);
        (lo & P != 0).then(|| (lo & ADDR, (mem.read(ctx, 2 * i + 1) >> 8) as u16))
    }
}

/// Second-level page permissions.
pub mod perm {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
}

/// Why a second-level mapping was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlError {
    /// Not page-aligned, or the host frame is beyond 52 bits.
    Misaligned {
        iova: u64,
        host: u64,
    },
    /// The device address is beyond the table's width.
    OutOfRange {
        iova: u64,
    },
    AlreadyMapped {
        iova: u64,
    },
    /// Neither read nor write: map nothing instead.
    NoAccess {
        iova: u64,
    },
    OutOfMemory,
}

impl fmt::Display for SlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlError::Misaligned { iova, host } => {
                write!(
                    f,
                    "device address {iova:#x} -> {host:#x} is not page-aligned"
                )
            }
            SlError::OutOfRange { iova } => {
                write!(
                    f,
                    "device address {iova:#x} beyond the IOMMU's address width"
                )
            }
            SlError::AlreadyMapped { iova } => write!(f, "device address {iova:#x} already mapped"),
            SlError::NoAccess { iova } => write!(f, "device address {iova:#x}: no access bits"),
            SlError::OutOfMemory => write!(f, "out of memory for IOMMU page tables"),
        }
    }
}

/// One device-visible address space.
#[derive(Debug)]
pub struct SlTable {
    root: u64,
    levels: u32,
    /// Device addresses must be below this.
    limit: u64,
}

fn sl_index(iova: u64, level: u32) -> usize {
    ((iova >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

impl SlTable {
    /// An empty address space of `levels` (3 or 4) levels, device addresses below
    /// 2^min(width of the levels, `mgaw`).
    pub fn new(mem: &mut impl TableMemory, levels: u32, mgaw: u8) -> Option<SlTable> {
        if !(3..=4).contains(&levels) {
            return None;
        }
        let bits = (12 + 9 * levels).min(mgaw as u32).min(63);
        Some(SlTable {
            root: mem.alloc_table()?,
            levels,
            limit: 1u64 << bits,
        })
    }

    pub fn root(&self) -> u64 {
        self.root
    }
    pub fn levels(&self) -> u32 {
        self.levels
    }

    /// Map one 4 KiB page.
    pub fn map(
        &mut self,
        mem: &mut impl TableMemory,
        iova: u64,
        host: u64,
        access: u64,
    ) -> Result<(), SlError> {
        if !iova.is_multiple_of(FRAME_SIZE) || host & !ADDR != 0 {
            return Err(SlError::Misaligned { iova, host });
        }
        if iova >= self.limit {
            return Err(SlError::OutOfRange { iova });
        }
        let access = access & (perm::READ | perm::WRITE);
        if access == 0 {
            return Err(SlError::NoAccess { iova });
        }
        let mut table = self.root;
        for level in (2..=self.levels).rev() {
            let i = sl_index(iova, level);
            let e = mem.read(table, i);
            table = if e & (perm::READ | perm::WRITE) == 0 {
                let t = mem.alloc_table().ok_or(SlError::OutOfMemory)?;
                mem.write(table, i, t | perm::READ | perm::WRITE);
                t
            } else {
                e & ADDR
            };
        }
        let i = sl_index(iova, 1);
        if mem.read(table, i) & (perm::READ | perm::WRITE) != 0 {
            return Err(SlError::AlreadyMapped { iova });
        }
        mem.write(table, i, host | access);
        Ok(())
    }

    /// Map exactly `pages` (device address, host frame, access); on error, the pages mapped by
    /// this call are unmapped again.
    pub fn map_all(
        &mut self,
        mem: &mut impl TableMemory,
        pages: &[(u64, u64, u64)],
    ) -> Result<(), SlError> {
        for (n, &(iova, host, access)) in pages.iter().enumerate() {
            if let Err(e) = self.map(mem, iova, host, access) {
                for &(done, _, _) in &pages[..n] {
                    self.unmap(mem, done);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unmap one page; returns the host frame it mapped. The caller invalidates the IOTLB.
    pub fn unmap(&mut self, mem: &mut impl TableMemory, iova: u64) -> Option<u64> {
        if iova >= self.limit {
            return None;
        }
        let mut table = self.root;
        for level in (2..=self.levels).rev() {
            let e = mem.read(table, sl_index(iova, level));
            if e & (perm::READ | perm::WRITE) == 0 {
                return None;
            }
            table = e & ADDR;
        }
        let i = sl_index(iova, 1);
        let e = mem.read(table, i);
        if e & (perm::READ | perm::WRITE) == 0 {
            return None;
        }
        mem.write(table, i, 0);
        Some(e & ADDR)
    }

    /// Every table frame of this space (root first), for freeing it once no device uses it
    /// and the IOTLB was invalidated. Leaf entries point at the domain's frames, not tables.
    pub fn table_frames(&self, mem: &impl TableMemory) -> alloc::vec::Vec<u64> {
        let mut out = alloc::vec![self.root];
        let mut level_tables = alloc::vec![self.root];
        for _ in 2..=self.levels {
            let mut next = alloc::vec::Vec::new();
            for &t in &level_tables {
                for i in 0..512 {
                    let e = mem.read(t, i);
                    if e & (perm::READ | perm::WRITE) != 0 {
                        next.push(e & ADDR);
                    }
                }
            }
            out.extend_from_slice(&next);
            level_tables = next;
        }
        out
    }

    /// What the hardware would do with `iova`: the host address and access bits.
    pub fn translate(&self, mem: &impl TableMemory, iova: u64) -> Option<(u64, u64)> {
        if iova >= self.limit {
            return None;
        }
        let mut table = self.root;
        for level in (2..=self.levels).rev() {
            let e = mem.read(table, sl_index(iova, level));
            if e & (perm::READ | perm::WRITE) == 0 {
                return None;
            }
            table = e & ADDR;
        }
        let e = mem.read(table, sl_index(iova, 1));
        let access = e & (perm::READ | perm::WRITE);
        (access != 0).then_some(((e & ADDR) | (iova & (FRAME_SIZE - 1)), access))
    }
}

/// One primary fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Requester id (bus << 8 | devfn).
    pub source: u16,
    /// The faulting page's device address.
    pub address: u64,
    pub reason: u8,
    /// A read (else a write).
    pub read: bool,
}

impl FaultRecord {
    /// Decode a 128-bit record (`lo` at +0, `hi` at +8); `None` if its F bit is clear.
    pub const fn decode(lo: u64, hi: u64) -> Option<FaultRecord> {
        if hi & (1 << 63) == 0 {
            return None;
        }
        Some(FaultRecord {
            source: hi as u16,
            address: lo & !0xfff,
            reason: (hi >> 32) as u8,
            read: hi & (1 << 62) != 0,
        })
    }

    /// The fault reason in words (the legacy-mode codes).
    pub const fn reason_text(&self) -> &'static str {
        match self.reason {
            0x1 => "root entry not present",
            0x2 => "context entry not present",
            0x3 => "invalid context entry",
            0x4 => "address beyond the address width",
            0x5 => "write to a page without write access",
            0x6 => "read of a page without read access",
            0x7 => "page-table entry unreadable",
            0x8 => "root table unreadable",
            0x9 => "context table unreadable",
            0xa => "reserved bits set in root entry",
            0xb => "reserved bits set in context entry",
            0xc => "reserved bits set in page-table entry",
            0xd => "translation type blocked",
            _ => "other",
        }
    }
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DMA {} fault from {:02x}:{:02x}.{} at {:#x}: reason {:#x} ({})",
            if self.read { "read" } else { "write" },
            self.source >> 8,
            (self.source >> 3) & 0x1f,
            self.source & 7,
            self.address,
            self.reason,
            self.reason_text()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::bdf;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Mem {
        tables: HashMap<u64, [u64; 512]>,
        next: u64,
        limit: usize,
    }

    impl Mem {
        fn new(limit: usize) -> Mem {
            Mem {
                limit,
                next: 0x10_0000,
                ..Mem::default()
            }
        }
    }

    impl TableMemory for Mem {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.tables.len() >= self.limit {
                return None;
            }
            self.next += FRAME_SIZE;
            self.tables.insert(self.next, [0; 512]);
            Some(self.next)
        }
        fn read(&self, t: u64, i: usize) -> u64 {
            self.tables[&t][i]
        }
        fn write(&mut self, t: u64, i: usize, v: u64) {
            self.tables.get_mut(&t).unwrap()[i] = v;
        }
    }

    #[test]
    fn table_frames_lists_root_and_every_intermediate_table_once() {
        let mut mem = Mem::new(64);
        let mut t = SlTable::new(&mut mem, 3, 39).unwrap();
        assert_eq!(t.table_frames(&mem), [t.root()]);
        // Two pages under one leaf table, one far away (its own level-2 and leaf tables).
        t.map_all(
            &mut mem,
            &[
                (0x1000, 0x5000_0000, perm::READ),
                (0x2000, 0x5000_1000, perm::READ | perm::WRITE),
                (1 << 38, 0x5000_2000, perm::READ),
            ],
        )
        .unwrap();
        let frames = t.table_frames(&mem);
        assert_eq!(frames.len(), 5, "root, 2 level-2 tables, 2 leaf tables");
        assert_eq!(frames.len(), mem.tables.len());
        assert!(frames.iter().all(|f| mem.tables.contains_key(f)));
        assert!(!frames.contains(&0x5000_0000));
    }

    #[test]
    fn cap_and_ecap_decode_qemu_values() {
        // What QEMU 7.2's intel-iommu (defaults, aw-bits=39) reports.
        let c = Cap::decode(0x00d2_008c_2226_0206);
        assert_eq!(c.domains, 65536);
        assert_eq!(c.sagaw, 0b10);
        assert_eq!(c.mgaw, 39);
        assert_eq!(c.fault_offset, 0x220);
        assert_eq!(c.fault_records, 1);
        assert_eq!(c.levels(), Some(3));
        assert!(!c.caching_mode && !c.required_write_buffer_flush);
        let e = Ecap::decode(0xf0_0f4a);
        assert_eq!(e.iotlb_offset, 0xf0);
        assert!(!e.coherent);
        assert!(e.queued_invalidation && e.interrupt_remapping && e.pass_through);
        assert_eq!(Cap::decode(0).levels(), None);
    }

    #[test]
    fn gcmd_value_keeps_standing_state_and_drops_one_shot_bits() {
        let gsts = gcmd::TE | gcmd::IRE | gcmd::SRTP | gcmd::WBF;
        assert_eq!(
            gcmd_value(gsts, gcmd::SRTP, true),
            gcmd::TE | gcmd::IRE | gcmd::SRTP
        );
        assert_eq!(gcmd_value(gsts, gcmd::TE, false), gcmd::IRE);
    }

    #[test]
    fn context_entry_points_at_the_tables_with_width_and_domain() {
        let mut m = Mem::new(16);
        let mut ct = ContextTables::new(&mut m).unwrap();
        let dev = bdf(0, 3, 0);
        assert_eq!(ct.get(&m, dev), None);
        ct.set(&mut m, dev, 0x5000, 3, 7, 256).unwrap();
        assert_eq!(ct.get(&m, dev), Some((0x5000, 7)));
        let ctx = m.read(ct.root(), 0) & ADDR;
        assert_eq!(m.read(ct.root(), 0) & 1, 1);
        assert_eq!(m.read(ctx, 2 * 0x18), 0x5001);
        assert_eq!(m.read(ctx, 2 * 0x18 + 1), 1 | (7 << 8));
        assert!(ct.clear(&mut m, dev));
        assert_eq!(ct.get(&m, dev), None);
        assert!(!ct.clear(&mut m, bdf(5, 0, 0)));
        assert_eq!(
            ct.set(&mut m, dev, 0x5000, 3, 0, 256),
            Err(ContextError::DomainId(0))
        );
        assert_eq!(
            ct.set(&mut m, dev, 0x5000, 3, 256, 256),
            Err(ContextError::DomainId(256))
        );
    }

    #[test]
    fn sl_table_maps_exactly_the_given_pages() {
        let mut m = Mem::new(64);
        let mut t = SlTable::new(&mut m, 3, 39).unwrap();
        let pages = [
            (0x0000, 0x20_0000, perm::READ | perm::WRITE),
            (0x1000, 0x7000, perm::READ),
            (0x40_0000_0000, 0x9000, perm::WRITE),
        ];
        t.map_all(&mut m, &pages).unwrap();
        assert_eq!(t.translate(&m, 0x0123), Some((0x20_0123, 3)));
        assert_eq!(t.translate(&m, 0x1000), Some((0x7000, 1)));
        assert_eq!(t.translate(&m, 0x40_0000_0000), Some((0x9000, 2)));
        assert_eq!(t.translate(&m, 0x2000), None);
        assert_eq!(t.translate(&m, 0x3f_ffff_f000), None);
        assert_eq!(t.unmap(&mut m, 0x1000), Some(0x7000));
        assert_eq!(t.translate(&m, 0x1000), None);
        assert_eq!(t.unmap(&mut m, 0x1000), None);
    }

    #[test]
    fn sl_table_refuses_bad_pages() {
        let mut m = Mem::new(64);
        let mut t = SlTable::new(&mut m, 3, 39).unwrap();
        assert!(matches!(
            t.map(&mut m, 0x1001, 0x2000, perm::READ),
            Err(SlError::Misaligned { .. })
        ));
        assert!(matches!(
            t.map(&mut m, 0x1000, 0x2001, perm::READ),
            Err(SlError::Misaligned { .. })
        ));
        assert!(matches!(
            t.map(&mut m, 0x1000, 1 << 60, perm::READ),
            Err(SlError::Misaligned { .. })
        ));
        assert_eq!(
            t.map(&mut m, 1 << 39, 0x2000, perm::READ),
            Err(SlError::OutOfRange { iova: 1 << 39 })
        );
        assert_eq!(
            t.map(&mut m, 0x1000, 0x2000, 0),
            Err(SlError::NoAccess { iova: 0x1000 })
        );
        t.map(&mut m, 0x1000, 0x2000, perm::READ).unwrap();
        assert_eq!(
            t.map(&mut m, 0x1000, 0x3000, perm::READ),
            Err(SlError::AlreadyMapped { iova: 0x1000 })
        );
        // MGAW narrower than the levels bounds the space too.
        let mut narrow = SlTable::new(&mut m, 4, 36).unwrap();
        assert_eq!(
            narrow.map(&mut m, 1 << 36, 0x2000, perm::READ),
            Err(SlError::OutOfRange { iova: 1 << 36 })
        );
        assert!(SlTable::new(&mut m, 5, 57).is_none());
    }

    #[test]
    fn sl_map_all_rolls_back_on_failure() {
        let mut m = Mem::new(64);
        let mut t = SlTable::new(&mut m, 4, 48).unwrap();
        let pages = [
            (0x1000, 0x2000, perm::READ),
            (0x2000, 0x3000, perm::READ),
            (0x1000, 0x4000, perm::READ),
        ];
        assert_eq!(
            t.map_all(&mut m, &pages),
            Err(SlError::AlreadyMapped { iova: 0x1000 })
        );
        assert_eq!(t.translate(&m, 0x1000), None);
        assert_eq!(t.translate(&m, 0x2000), None);
    }

    #[test]
    fn sl_map_reports_out_of_memory() {
        let mut m = Mem::new(2);
        let mut t = SlTable::new(&mut m, 3, 39).unwrap();
        assert_eq!(
            t.map(&mut m, 0x1000, 0x2000, perm::READ),
            Err(SlError::OutOfMemory)
        );
    }

    #[test]
    fn fault_record_decodes_source_address_and_reason() {
        let hi = (1u64 << 63) | (1 << 62) | (0x02u64 << 32) | 0x0018;
        let f = FaultRecord::decode(0x1234_5678, hi).unwrap();
        assert_eq!(
            f,
            FaultRecord {
                source: 0x18,
                address: 0x1234_5000,
                reason: 2,
                read: true
            }
        );
        assert_eq!(
            f.to_string(),
            "DMA read fault from 00:03.0 at 0x12345000: reason 0x2 (context entry not present)"
        );
        assert_eq!(FaultRecord::decode(0x1000, 0x18), None);
    }
}
