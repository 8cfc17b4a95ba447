//! Capability lists: the conventional list (from the header's capability pointer, in
//! 0x40..0x100) and the PCIe extended list (from 0x100), plus the two capabilities the
//! hypervisor must understand to own a device's interrupts: MSI and MSI-X.
//!
//! A device writes its own lists, so a walk trusts nothing: every pointer must land inside its
//! region, and a pointer that revisits an entry ends the walk with [`CapError::Loop`]. The walk
//! is bounded by the number of dword slots in the region, so it ends even on a loop the
//! visited set somehow missed.

use core::fmt;

use heapless::Vec;

use super::bar::{BarKind, Bars};
use super::{ConfigAccess, HeaderType, PciAddress, STATUS_CAP_LIST, reg};

/// Capability ids (conventional list).
pub mod id {
    pub const POWER_MANAGEMENT: u8 = 0x01;
    pub const MSI: u8 = 0x05;
    pub const VENDOR: u8 = 0x09;
    pub const PCIE: u8 = 0x10;
    pub const MSIX: u8 = 0x11;
}

/// Most conventional capabilities: one per dword of 0x40..0x100.
pub const MAX_CAPS: usize = 48;
/// Most extended capabilities kept (the region has 960 dwords; real devices have a handful).
pub const MAX_EXT_CAPS: usize = 32;

/// One capability: where it is and its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub offset: u16,
    pub id: u16,
    /// Extended capabilities: the version field.
    pub version: u8,
}

/// Why a walk stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapError {
    /// A pointer outside the region (conventional: below 0x40; extended: below 0x100).
    OutOfRange { from: u16, to: u16 },
    /// A pointer back to an entry already seen.
    Loop { from: u16, to: u16 },
    /// More entries than this walker keeps.
    TooMany,
}

impl fmt::Display for CapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapError::OutOfRange { from, to } => {
                write!(
                    f,
                    "capability at {from:#x} points outside its region, to {to:#x}"
                )
            }
            CapError::Loop { from, to } => {
                write!(f, "capability at {from:#x} points back to {to:#x} (a loop)")
            }
            CapError::TooMany => write!(f, "too many capabilities"),
        }
    }
}

/// A walked list: what was found before any error.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapList {
    pub caps: Vec<Capability, MAX_CAPS>,
    pub ext: Vec<Capability, MAX_EXT_CAPS>,
    pub error: Option<CapError>,
    pub ext_error: Option<CapError>,
}

impl CapList {
    /// The first conventional capability with `id`.
    pub fn find(&self, id: u8) -> Option<u16> {
        self.caps
            .iter()
            .find(|c| c.id == id as u16)
            .map(|c| c.offset)
    }
}

/// Walk both lists of `addr`. `extended`: the function has 4 KiB of config space (ECAM and a
/// PCIe capability).
pub fn walk(cfg: &impl ConfigAccess, addr: PciAddress, ht: HeaderType, extended: bool) -> CapList {
    let mut list = CapList::default();
    let status = cfg.read16(addr, reg::STATUS);
    if status & STATUS_CAP_LIST != 0 {
        let ptr_reg = if ht == HeaderType::CardBus {
            0x14
        } else {
            reg::CAP_PTR
        };
        let first = (cfg.read8(addr, ptr_reg) & 0xfc) as u16;
        list.error = walk_conventional(cfg, addr, ptr_reg, first, &mut list.caps).err();
    }
    if extended && list.find(id::PCIE).is_some() {
        list.ext_error = walk_extended(cfg, addr, &mut list.ext).err();
    }
    list
}

fn walk_conventional(
    cfg: &impl ConfigAccess,
    addr: PciAddress,
    mut from: u16,
    mut ptr: u16,
    out: &mut Vec<Capability, MAX_CAPS>,
) -> Result<(), CapError> {
    let mut seen = [false; 64];
    while ptr != 0 {
        if !(0x40..=0xfc).contains(&ptr) {
            return Err(CapError::OutOfRange { from, to: ptr });
        }
        let slot = (ptr / 4) as usize;
        if seen[slot] {
            return Err(CapError::Loop { from, to: ptr });
        }
        seen[slot] = true;
        let id = cfg.read8(addr, ptr);
        out.push(Capability {
            offset: ptr,
            id: id as u16,
            version: 0,
        })
        .map_err(|_| CapError::TooMany)?;
        from = ptr;
        ptr = (cfg.read8(addr, ptr + 1) & 0xfc) as u16;
    }
    Ok(())
}

fn walk_extended(
    cfg: &impl ConfigAccess,
    addr: PciAddress,
    out: &mut Vec<Capability, MAX_EXT_CAPS>,
) -> Result<(), CapError> {
    // One bit per dword of 0x100..0x1000.
    let mut seen = [0u64; 15];
    let mut from = 0x100;
    let mut ptr: u16 = 0x100;
    loop {
        let h = cfg.read32(addr, ptr);
        // An empty or absent header ends the list (only legal as the first entry, but a
        // device saying so later just ends it early).
        if h == 0 || h == u32::MAX {
            return Ok(());
        }
        let slot = ((ptr - 0x100) / 4) as usize;
        let (w, b) = (slot / 64, slot % 64);
        if seen[w] & (1 << b) != 0 {
            return Err(CapError::Loop { from, to: ptr });
        }
        seen[w] |= 1 << b;
        out.push(Capability {
            offset: ptr,
            id: h as u16,
            version: ((h >> 16) & 0xf) as u8,
        })
        .map_err(|_| CapError::TooMany)?;
        let next = ((h >> 20) & 0xffc) as u16;
        if next == 0 {
            return Ok(());
        }
        if next < 0x100 {
            return Err(CapError::OutOfRange {
                from: ptr,
                to: next,
            });
        }
        from = ptr;
        ptr = next;
    }
}

/// An MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    pub offset: u16,
    pub enabled: bool,
    /// Vectors the function can request (1, 2, 4 … 32).
    pub vectors: u8,
    pub addr64: bool,
    pub per_vector_mask: bool,
}

impl Msi {
    pub fn read(cfg: &impl ConfigAccess, addr: PciAddress, offset: u16) -> Msi {
        let ctl = cfg.read16(addr, offset + 2);
        // Encodings above 5 (32 vectors) are reserved: clamp rather than trust them.
        let mmc = ((ctl >> 1) & 7).min(5);
        Msi {
            offset,
            enabled: ctl & 1 != 0,
            vectors: 1 << mmc,
            addr64: ctl & (1 << 7) != 0,
            per_vector_mask: ctl & (1 << 8) != 0,
        }
    }

    /// The message address (and upper address) and data registers: `[start, end)` offsets.
    /// Only the hypervisor may write them: they say which CPU and vector the device
    /// interrupts.
    pub fn message_registers(&self) -> (u16, u16) {
        let data = if self.addr64 { 0x0c } else { 0x08 };
        (self.offset + 4, self.offset + data + 2)
    }

    /// Bytes the capability occupies.
    pub fn size(&self) -> u16 {
        match (self.addr64, self.per_vector_mask) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }
}

/// An MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msix {
    pub offset: u16,
    pub enabled: bool,
    pub function_mask: bool,
    /// Table entries (1..=2048).
    pub entries: u16,
    pub table_bir: u8,
    pub table_offset: u32,
    pub pba_bir: u8,
    pub pba_offset: u32,
}

/// Where an MSI-X structure would lie, or why it cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixError {
    /// BIR names no implemented memory BAR.
    NoSuchBar { bir: u8 },
    /// The structure does not fit inside its BAR.
    OutsideBar { bir: u8, offset: u32, len: u64 },
}

impl fmt::Display for MsixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MsixError::NoSuchBar { bir } => write!(f, "BIR {bir} is not a memory BAR"),
            MsixError::OutsideBar { bir, offset, len } => {
                write!(f, "{len:#x} bytes at BAR{bir}+{offset:#x} overrun the BAR")
            }
        }
    }
}

/// A located MSI-X structure: BAR slot, offset in it, length, and physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixRegion {
    pub bir: u8,
    pub offset: u32,
    pub len: u64,
    pub phys: u64,
}

impl Msix {
    pub fn read(cfg: &impl ConfigAccess, addr: PciAddress, offset: u16) -> Msix {
        let ctl = cfg.read16(addr, offset + 2);
        let table = cfg.read32(addr, offset + 4);
        let pba = cfg.read32(addr, offset + 8);
        Msix {
            offset,
            enabled: ctl & (1 << 15) != 0,
            function_mask: ctl & (1 << 14) != 0,
            entries: (ctl & 0x7ff) + 1,
            table_bir: (table & 7) as u8,
            table_offset: table & !7,
            pba_bir: (pba & 7) as u8,
            pba_offset: pba & !7,
        }
    }

    fn locate(bars: &Bars, bir: u8, offset: u32, len: u64) -> Result<MsixRegion, MsixError> {
        let bar = bars
            .get(bir)
            .filter(|b| b.kind != BarKind::Io)
            .ok_or(MsixError::NoSuchBar { bir })?;
        let end = (offset as u64).checked_add(len);
        if end.is_none_or(|e| e > bar.size) {
            return Err(MsixError::OutsideBar { bir, offset, len });
        }
        Ok(MsixRegion {
            bir,
            offset,
            len,
            phys: bar.base + offset as u64,
        })
    }

    /// The vector table (16 bytes per entry).
    pub fn table(&self, bars: &Bars) -> Result<MsixRegion, MsixError> {
        Self::locate(
            bars,
            self.table_bir,
            self.table_offset,
            self.entries as u64 * 16,
        )
    }

    /// The pending-bit array (one bit per entry, in qwords).
    pub fn pba(&self, bars: &Bars) -> Result<MsixRegion, MsixError> {
        let len = (self.entries as u64).div_ceil(64) * 8;
        Self::locate(bars, self.pba_bir, self.pba_offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::Header;
    use crate::pci::bar;
    use crate::pci::fake::{FakeConfig, FakeFunction, bdf};

    fn one(f: FakeFunction) -> FakeConfig {
        let mut cfg = FakeConfig::default();
        cfg.add(bdf(0, 3, 0), f);
        cfg
    }

    fn ids(l: &CapList) -> std::vec::Vec<(u16, u16)> {
        l.caps.iter().map(|c| (c.offset, c.id)).collect()
    }

    #[test]
    fn walk_follows_the_list_in_order() {
        let mut f = FakeFunction::endpoint(1, 2, [2, 0, 0]);
        f.caps(&[
            (0x98, id::MSIX, 0x84),
            (0x84, id::VENDOR, 0x40),
            (0x40, id::MSI, 0),
        ]);
        let l = walk(&one(f), bdf(0, 3, 0), HeaderType::Endpoint, false);
        assert_eq!(ids(&l), [(0x98, 0x11), (0x84, 0x09), (0x40, 0x05)]);
        assert_eq!(l.error, None);
        assert_eq!(l.find(id::MSI), Some(0x40));
    }

    #[test]
    fn walk_stops_on_a_cyclic_list() {
        let mut f = FakeFunction::endpoint(1, 2, [2, 0, 0]);
        f.caps(&[(0x40, id::MSI, 0x50), (0x50, id::VENDOR, 0x40)]);
        let l = walk(&one(f), bdf(0, 3, 0), HeaderType::Endpoint, false);
        assert_eq!(ids(&l), [(0x40, 5), (0x50, 9)]);
        assert_eq!(
            l.error,
            Some(CapError::Loop {
                from: 0x50,
                to: 0x40
            })
        );
    }

    #[test]
    fn walk_stops_on_a_self_loop_and_on_pointers_into_the_header() {
        let mut f = FakeFunction::endpoint(1, 2, [2, 0, 0]);
        f.caps(&[(0x40, id::MSI, 0x40)]);
        let l = walk(&one(f), bdf(0, 3, 0), HeaderType::Endpoint, false);
        assert_eq!(
            l.error,
            Some(CapError::Loop {
                from: 0x40,
                to: 0x40
            })
        );

        let mut f = FakeFunction::endpoint(1, 2, [2, 0, 0]);
        f.caps(&[(0x40, id::MSI, 0x10)]);
        let l = walk(&one(f), bdf(0, 3, 0), HeaderType::Endpoint, false);
        assert_eq!(
            l.error,
            Some(CapError::OutOfRange {
                from: 0x40,
                to: 0x10
            })
        );
    }

    #[test]
    fn walk_ignores_the_pointer_without_the_status_bit() {
        let mut f = FakeFunction::endpoint(1, 2, [2, 0, 0]);
        f.set8(reg::CAP_PTR, 0x40);
        f.set8(0x40, id::MSI);
        let l = walk(&one(f), bdf(0, 3, 0), HeaderType::Endpoint, false);
        assert!(l.caps.is_empty());
    }

    #[test]
    fn walk_terminates_on_a_chain_through_every_slot() {
        // 48 entries, the last pointing back to the first: all kept, then a loop.
        let mut f = FakeFunction::endpoint(1, 2, [2, 0, 0]);
        let list: std::vec::Vec<(u8, u8, u8)> = (0..48u16)
            .map(|i| {
                let off = 0x40 + 4 * i;
                let next = if i == 47 { 0x40 } else { off + 4 };
                (off as u8, id::VENDOR, next as u8)
            })
            .collect();
        f.caps(&list);
        let l = walk(&one(f), bdf(0, 3, 0), HeaderType::Endpoint, false);
        assert_eq!(l.caps.len(), 48);
        assert_eq!(
            l.error,
            Some(CapError::Loop {
                from: 0xfc,
                to: 0x40
            })
        );
    }

    #[test]
    fn extended_walk_follows_and_stops_on_loops_and_low_pointers() {
        let mut f = FakeFunction::endpoint(1, 2, [2, 0, 0]);
        f.caps(&[(0x40, id::PCIE, 0)]);
        f.set32(0x100, 0x0001 | (1 << 16) | (0x140 << 20));
        f.set32(0x140, 0x000d | (1 << 16) | (0x100 << 20));
        let l = walk(&one(f.clone()), bdf(0, 3, 0), HeaderType::Endpoint, true);
        assert_eq!(
            l.ext
                .iter()
                .map(|c| (c.offset, c.id))
                .collect::<std::vec::Vec<_>>(),
            [(0x100, 1), (0x140, 0xd)]
        );
        assert_eq!(
            l.ext_error,
            Some(CapError::Loop {
                from: 0x140,
                to: 0x100
            })
        );

        f.set32(0x140, 0x000d | (1 << 16) | (0x0c0 << 20));
        let l = walk(&one(f.clone()), bdf(0, 3, 0), HeaderType::Endpoint, true);
        assert_eq!(
            l.ext_error,
            Some(CapError::OutOfRange {
                from: 0x140,
                to: 0xc0
            })
        );

        // Without 4 KiB of config space the extended region is not read.
        let l = walk(&one(f), bdf(0, 3, 0), HeaderType::Endpoint, false);
        assert!(l.ext.is_empty());
    }

    #[test]
    fn msi_decodes_control_and_message_registers() {
        let mut f = FakeFunction::endpoint(1, 2, [2, 0, 0]);
        f.caps(&[(0x50, id::MSI, 0)]);
        // 64-bit, per-vector masking, MMC = 7 (reserved: clamped to 32), enabled.
        f.set16(0x52, 1 | (7 << 1) | (1 << 7) | (1 << 8));
        let m = Msi::read(&one(f), bdf(0, 3, 0), 0x50);
        assert_eq!(
            (m.enabled, m.vectors, m.addr64, m.per_vector_mask),
            (true, 32, true, true)
        );
        assert_eq!(m.message_registers(), (0x54, 0x5e));
        assert_eq!(m.size(), 24);
    }

    #[test]
    fn msix_locates_table_and_pba_inside_their_bar_and_refuses_overruns() {
        let mut f = FakeFunction::endpoint(0x1af4, 0x1000, [2, 0, 0]);
        f.mem_bar(1, 0xfebd_1000, 0x1000, false, false);
        f.caps(&[(0x98, id::MSIX, 0)]);
        f.set16(0x9a, 2 | (1 << 15)); // 3 entries, enabled
        f.set32(0x9c, 1); // table: BAR1 + 0
        f.set32(0xa0, 0x800 | 1); // PBA: BAR1 + 0x800
        let mut cfg = one(f);
        let h = Header::read(&cfg, bdf(0, 3, 0)).unwrap();
        let bars = bar::probe(&mut cfg, bdf(0, 3, 0), &h);
        let m = Msix::read(&cfg, bdf(0, 3, 0), 0x98);
        assert_eq!((m.entries, m.enabled), (3, true));
        assert_eq!(m.table(&bars).unwrap().phys, 0xfebd_1000);
        assert_eq!(m.table(&bars).unwrap().len, 48);
        assert_eq!(m.pba(&bars).unwrap().phys, 0xfebd_1800);

        cfg.get(bdf(0, 3, 0)).set32(0x9c, 0xff8 | 1);
        let m = Msix::read(&cfg, bdf(0, 3, 0), 0x98);
        assert!(matches!(
            m.table(&bars),
            Err(MsixError::OutsideBar { bir: 1, .. })
        ));
        cfg.get(bdf(0, 3, 0)).set32(0x9c, 3);
        let m = Msix::read(&cfg, bdf(0, 3, 0), 0x98);
        assert_eq!(m.table(&bars), Err(MsixError::NoSuchBar { bir: 3 }));
    }
}
