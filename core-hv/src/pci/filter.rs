//! The configuration-space filter: every config read or write a driver domain makes goes
//! through [`ConfigFilter`], which lets it touch only the functions it owns and refuses the
//! writes that would let it reach beyond them. Every refusal is a Xen errno:
//!
//! | refusal | errno |
//! |---|---|
//! | malformed access (size not 1/2/4, misaligned, past 4 KiB; value wider than the size) | `EINVAL` |
//! | a function the domain does not own (absent ones look the same) | `ENODEV` |
//! | changing a capability pointer or header, or the MSI/MSI-X registers the hypervisor owns | `EPERM` |
//! | bus master on without IOMMU confinement (and no `insecure_dma`) | `EPERM` |
//! | decode on while a BAR is not placed inside the owner's windows | `EPERM` |
//! | moving a BAR outside the owner's windows (the ranges its BARs had at assignment) | `EPERM` |
//! | moving a BAR onto another BAR (any device's) | `EBUSY` |
//! | sizing a BAR (all ones) while its decode is on | `EBUSY` |
//!
//! Invariant: while a function's memory (I/O) decode is on, each of its memory (I/O) BARs lies
//! inside the owner's windows and overlaps no other BAR. A BAR being sized, or a 64-bit BAR
//! half-way through a move, is "unplaced" and blocks decode until it is placed again. The
//! filter keeps its own record of where each BAR is; it never believes the device's readback
//! for a decision.

use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::errno::XenError;

use super::assign::Assignment;
use super::bar::{BarKind, BarSlot, ROM_SLOT};
use super::caps::Msix;
use super::enumerate::Function;
use super::{ConfigAccess, Header, HeaderType, PciAddress, access_ok, command, reg};

/// Most protected byte ranges per function.
const MAX_PROTECTED: usize = 96;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Space {
    Io,
    Mem,
}

/// One BAR of an owned function, as the filter tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TrackedBar {
    kind: BarKind,
    size: u64,
    /// Where it was at assignment: part of the owner's windows.
    original: u64,
    /// Where it decodes now; `None` while being sized or moved.
    current: Option<u64>,
}

impl TrackedBar {
    fn space(&self) -> Space {
        if self.kind == BarKind::Io {
            Space::Io
        } else {
            Space::Mem
        }
    }
}

/// What a BAR slot holds in an owned function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Empty,
    /// Implemented but refused at probe time: its value may not change.
    Frozen,
    Bar(TrackedBar),
    /// Upper half of the 64-bit BAR in the slot before.
    Upper,
}

#[derive(Clone, Debug)]
struct Owned {
    address: PciAddress,
    owner: DomId,
    insecure_dma: bool,
    confined: bool,
    header: Header,
    /// BAR0..5, then the ROM.
    slots: [Slot; 7],
    /// Byte ranges `[start, end)` whose contents may not change.
    protected: heapless::Vec<(u16, u16), MAX_PROTECTED>,
    msix: Option<Msix>,
}

/// BARs of functions no domain owns: fixed, but nothing may be moved onto them.
#[derive(Clone, Copy, Debug)]
struct FixedBar {
    space: Space,
    start: u64,
    end: u64,
}

/// The filter for the whole machine.
#[derive(Clone, Debug, Default)]
pub struct ConfigFilter {
    owned: Vec<Owned>,
    fixed: Vec<FixedBar>,
    /// Functions taken back from dead owners, as they were left: [`ConfigFilter::reassign`]
    /// hands them to a new owner without losing where their BARs now are.
    released: Vec<Owned>,
}

/// Where an MSI-X table lies for the hypervisor to program it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixTable {
    pub entries: u16,
    /// Physical address of entry 0.
    pub phys: u64,
    /// The capability's offset in config space.
    pub cap_offset: u16,
}

fn slot_from(s: &BarSlot) -> Slot {
    match s {
        BarSlot::Empty => Slot::Empty,
        BarSlot::Upper => Slot::Upper,
        BarSlot::Bad(_) => Slot::Frozen,
        BarSlot::Bar(b) => Slot::Bar(TrackedBar {
            kind: b.kind,
            size: b.size,
            original: b.base,
            current: Some(b.base),
        }),
    }
}

fn protected_ranges(f: &Function) -> heapless::Vec<(u16, u16), MAX_PROTECTED> {
    let mut p = heapless::Vec::new();
    let _ = p.push((reg::CAP_PTR, reg::CAP_PTR + 1));
    for c in &f.caps.caps {
        let _ = p.push((c.offset, c.offset + 2));
    }
    for c in &f.caps.ext {
        let _ = p.push((c.offset, c.offset + 4));
    }
    if let Some(m) = &f.msi {
        let _ = p.push(m.message_registers());
    }
    if let Some(m) = &f.msix {
        let _ = p.push((m.offset + 4, m.offset + 12));
    }
    p
}

/// Merge a `size`-byte write of `value` at `offset` into the dword `current` (at `offset & !3`).
fn merge(current: u32, offset: u16, size: u8, value: u32) -> u32 {
    let shift = 8 * (offset & 3) as u32;
    let mask = if size == 4 {
        u32::MAX
    } else {
        ((1u32 << (8 * size as u32)) - 1) << shift
    };
    (current & !mask) | ((value << shift) & mask)
}

impl ConfigFilter {
    /// Build the filter from the enumeration and the assignment. Functions not in
    /// `assignments` stay with the hypervisor; their BARs become fixed obstacles.
    pub fn new(functions: &[Function], assignments: &[Assignment]) -> ConfigFilter {
        let mut filter = ConfigFilter::default();
        for f in functions {
            match assignments.iter().find(|a| a.address == f.address) {
                Some(a) if f.header.header_type == HeaderType::Endpoint => {
                    let mut slots = [Slot::Empty; 7];
                    for (i, s) in f.bars.slots.iter().enumerate() {
                        slots[i] = slot_from(s);
                    }
                    slots[ROM_SLOT as usize] = slot_from(&f.bars.rom);
                    filter.owned.push(Owned {
                        address: f.address,
                        owner: a.owner,
                        insecure_dma: a.insecure_dma,
                        confined: false,
                        header: f.header,
                        slots,
                        protected: protected_ranges(f),
                        msix: f.msix,
                    });
                }
                _ => {
                    for b in f.bars.iter() {
                        filter.fixed.push(FixedBar {
                            space: if b.kind == BarKind::Io {
                                Space::Io
                            } else {
                                Space::Mem
                            },
                            start: b.base,
                            end: b.base.saturating_add(b.size),
                        });
                    }
                }
            }
        }
        filter
    }

    /// Record whether the IOMMU now confines `address`'s DMA (bus mastering depends on it).
    pub fn set_confined(&mut self, address: PciAddress, confined: bool) -> bool {
        match self.owned.iter_mut().find(|o| o.address == address) {
            Some(o) => {
                o.confined = confined;
                true
            }
            None => false,
        }
    }

    /// Take back every function `domain` owns (it is dying): they return to the hypervisor
    /// and their BARs, where they are now placed, become fixed obstacles. Returns their
    /// addresses; the caller quiesces them and blocks their DMA.
    pub fn release(&mut self, domain: DomId) -> Vec<PciAddress> {
        let mut out = Vec::new();
        let mut kept = Vec::with_capacity(self.owned.len());
        for o in core::mem::take(&mut self.owned) {
            if o.owner != domain {
                kept.push(o);
                continue;
            }
            out.push(o.address);
            for (i, s) in o.slots.iter().enumerate() {
                if let Slot::Bar(b) = s
                    && i != ROM_SLOT as usize
                {
                    let start = b.current.unwrap_or(b.original);
                    self.fixed.push(FixedBar {
                        space: b.space(),
                        start,
                        end: start.saturating_add(b.size),
                    });
                }
            }
            self.released.retain(|r| r.address != o.address);
            self.released.push(o);
        }
        self.owned = kept;
        out
    }

    /// Hand a function taken back by [`ConfigFilter::release`] to `owner` (a restarted
    /// driver domain): its BARs stop being obstacles and become that owner's windows again,
    /// DMA counts as unconfined until [`ConfigFilter::set_confined`]. `false` if `address`
    /// was never released (or is owned now).
    pub fn reassign(&mut self, address: PciAddress, owner: DomId) -> bool {
        let Some(i) = self.released.iter().position(|r| r.address == address) else {
            return false;
        };
        let mut o = self.released.swap_remove(i);
        for (slot, s) in o.slots.iter().enumerate() {
            if let Slot::Bar(b) = s
                && slot != ROM_SLOT as usize
            {
                let start = b.current.unwrap_or(b.original);
                let end = start.saturating_add(b.size);
                if let Some(k) = self
                    .fixed
                    .iter()
                    .position(|f| f.space == b.space() && f.start == start && f.end == end)
                {
                    self.fixed.swap_remove(k);
                }
            }
        }
        o.owner = owner;
        o.confined = false;
        self.owned.push(o);
        true
    }

    /// The physical base of `o`'s memory BAR `slot`, where it decodes now.
    fn placed_mem_bar(o: &Owned, slot: u8) -> Option<(u64, u64)> {
        match o.slots.get(slot as usize)? {
            Slot::Bar(b) if b.space() == Space::Mem && slot != ROM_SLOT => {
                Some((b.current?, b.size))
            }
            _ => None,
        }
    }

    /// Page-rounded `[start, end)` of the MSI-X table and PBA of `o` (where placed).
    fn msix_pages(o: &Owned) -> heapless::Vec<(u64, u64), 2> {
        let mut out = heapless::Vec::new();
        let Some(m) = &o.msix else { return out };
        let table_len = u64::from(m.entries) * 16;
        let pba_len = u64::from(m.entries).div_ceil(64) * 8;
        for (bir, off, len) in [
            (m.table_bir, m.table_offset, table_len),
            (m.pba_bir, m.pba_offset, pba_len),
        ] {
            if let Some((base, _)) = Self::placed_mem_bar(o, bir) {
                let start = base.saturating_add(u64::from(off)) & !0xfff;
                let end = base
                    .saturating_add(u64::from(off))
                    .saturating_add(len)
                    .saturating_add(0xfff)
                    & !0xfff;
                let _ = out.push((start, end));
            }
        }
        out
    }

    /// May `domain` map host-physical `[phys, phys + len)`? Only inside one placed memory
    /// BAR of a function it owns, and on no page of that function's MSI-X table or PBA (the
    /// hypervisor programs those: a domain writing them could aim interrupts anywhere).
    /// Returns the function. `EINVAL` for an empty or wrapping range, `ENODEV` if it owns
    /// nothing, `EPERM` otherwise.
    pub fn bar_window(&self, domain: DomId, phys: u64, len: u64) -> Result<PciAddress, XenError> {
        let end = phys
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(XenError::EINVAL)?;
        let mut owns_any = false;
        for o in self.owned.iter().filter(|o| o.owner == domain) {
            owns_any = true;
            let inside = (0..6u8).any(|slot| {
                Self::placed_mem_bar(o, slot)
                    .is_some_and(|(base, size)| phys >= base && end <= base.saturating_add(size))
            });
            if !inside {
                continue;
            }
            let (p0, p1) = (phys & !0xfff, end.saturating_add(0xfff) & !0xfff);
            if Self::msix_pages(o).iter().any(|&(s, e)| p0 < e && s < p1) {
                return Err(XenError::EPERM);
            }
            return Ok(o.address);
        }
        Err(if owns_any {
            XenError::EPERM
        } else {
            XenError::ENODEV
        })
    }

    /// The MSI-X table of `domain`'s function `address`. `ENODEV` if not its own, `EINVAL`
    /// without MSI-X, `EBUSY` while the table's BAR is not placed.
    pub fn msix_table(&self, domain: DomId, address: PciAddress) -> Result<MsixTable, XenError> {
        let o = &self.owned[self.find(domain, address)?];
        let m = o.msix.as_ref().ok_or(XenError::EINVAL)?;
        let (base, size) = Self::placed_mem_bar(o, m.table_bir).ok_or(XenError::EBUSY)?;
        let len = u64::from(m.entries) * 16;
        if u64::from(m.table_offset).saturating_add(len) > size {
            return Err(XenError::EINVAL);
        }
        Ok(MsixTable {
            entries: m.entries,
            phys: base + u64::from(m.table_offset),
            cap_offset: m.offset,
        })
    }

    /// The owner of `address`, if assigned.
    pub fn owner(&self, address: PciAddress) -> Option<DomId> {
        self.owned
            .iter()
            .find(|o| o.address == address)
            .map(|o| o.owner)
    }

    /// Functions `domain` owns.
    pub fn owned_by(&self, domain: DomId) -> impl Iterator<Item = PciAddress> + '_ {
        self.owned
            .iter()
            .filter(move |o| o.owner == domain)
            .map(|o| o.address)
    }

    fn find(&self, domain: DomId, address: PciAddress) -> Result<usize, XenError> {
        self.owned
            .iter()
            .position(|o| o.address == address && o.owner == domain)
            .ok_or(XenError::ENODEV)
    }

    /// A config read by `domain`.
    pub fn read(
        &self,
        cfg: &impl ConfigAccess,
        domain: DomId,
        address: PciAddress,
        offset: u16,
        size: u8,
    ) -> Result<u32, XenError> {
        if !access_ok(offset, size) {
            return Err(XenError::EINVAL);
        }
        self.find(domain, address)?;
        Ok(cfg.read(address, offset, size))
    }

    /// A config write by `domain`: checked, then done, then recorded.
    pub fn write(
        &mut self,
        cfg: &mut impl ConfigAccess,
        domain: DomId,
        address: PciAddress,
        offset: u16,
        size: u8,
        value: u32,
    ) -> Result<(), XenError> {
        if !access_ok(offset, size) || (size < 4 && value >> (8 * size as u32) != 0) {
            return Err(XenError::EINVAL);
        }
        let idx = self.find(domain, address)?;
        let dword = offset & !3;
        let current = cfg.read32(address, dword);
        let new = merge(current, offset, size, value);
        let o = &self.owned[idx];

        for &(start, end) in &o.protected {
            for b in start.max(dword)..end.min(dword + 4) {
                let sh = 8 * (b - dword) as u32;
                if (current >> sh) as u8 != (new >> sh) as u8 {
                    return Err(XenError::EPERM);
                }
            }
        }

        let cmd_now = (cfg.read32(address, reg::COMMAND & !3) & 0xffff) as u16;
        let mut cmd = cmd_now;
        if dword == reg::COMMAND & !3 && offset < reg::STATUS {
            cmd = new as u16;
            self.check_command(idx, cmd)?;
        }

        let update = match self.bar_slot_for(idx, dword) {
            Some(slot) => self.check_bar(cfg, idx, slot, current, new, cmd)?,
            None => None,
        };

        cfg.write(address, offset, size, value);
        if let Some((slot, placed)) = update
            && let Slot::Bar(b) = &mut self.owned[idx].slots[slot]
        {
            b.current = placed;
        }
        Ok(())
    }

    /// Which tracked slot (0..=6) the dword at `dword` belongs to, if a BAR register.
    fn bar_slot_for(&self, idx: usize, dword: u16) -> Option<usize> {
        let o = &self.owned[idx];
        if Some(dword) == o.header.rom_offset() {
            return Some(ROM_SLOT as usize);
        }
        if (reg::BAR0..reg::BAR0 + 24).contains(&dword) {
            return Some(((dword - reg::BAR0) / 4) as usize);
        }
        None
    }

    fn check_command(&self, idx: usize, cmd: u16) -> Result<(), XenError> {
        let o = &self.owned[idx];
        if cmd & command::BUS_MASTER != 0 && !(o.confined || o.insecure_dma) {
            return Err(XenError::EPERM);
        }
        for (i, s) in o.slots.iter().enumerate() {
            let Slot::Bar(b) = s else { continue };
            // The ROM's own enable bit guards it; decode of an unplaced ROM is refused when
            // that bit is set (check_bar).
            if i == ROM_SLOT as usize {
                continue;
            }
            let on = match b.space() {
                Space::Io => cmd & command::IO_SPACE != 0,
                Space::Mem => cmd & command::MEMORY_SPACE != 0,
            };
            if on && b.current.is_none() {
                return Err(XenError::EPERM);
            }
        }
        Ok(())
    }

    /// Check a write that changes BAR register dword `slot` from `current` to `new`; returns
    /// the tracked BAR to update and where it is placed afterwards.
    fn check_bar(
        &self,
        cfg: &impl ConfigAccess,
        idx: usize,
        slot: usize,
        current: u32,
        new: u32,
        cmd: u16,
    ) -> Result<Option<(usize, Option<u64>)>, XenError> {
        let o = &self.owned[idx];
        // (tracked slot, its BAR, the full new base register value, sizing?)
        let (tslot, bar, raw, sizing) = match o.slots[slot] {
            Slot::Empty if new == current || new == u32::MAX => return Ok(None),
            Slot::Frozen | Slot::Empty if new == current => return Ok(None),
            Slot::Frozen | Slot::Empty => return Err(XenError::EPERM),
            Slot::Upper => {
                let Some(Slot::Bar(b)) = slot.checked_sub(1).map(|s| o.slots[s]) else {
                    return Err(XenError::EPERM);
                };
                let low = cfg.read32(o.address, reg::BAR0 + 4 * (slot as u16 - 1));
                let raw = ((new as u64) << 32) | (low & !0xf) as u64;
                (slot - 1, b, raw, new == u32::MAX)
            }
            Slot::Bar(b) if slot == ROM_SLOT as usize => (
                slot,
                b,
                (new & 0xffff_f800) as u64,
                new & 0xffff_f800 == 0xffff_f800,
            ),
            Slot::Bar(b) => match b.kind {
                BarKind::Io => (slot, b, (new & !3) as u64, new | 3 == u32::MAX),
                BarKind::Mem32 => (slot, b, (new & !0xf) as u64, new | 0xf == u32::MAX),
                BarKind::Mem64 => {
                    let high = cfg.read32(o.address, reg::BAR0 + 4 * (slot as u16 + 1));
                    let raw = ((high as u64) << 32) | (new & !0xf) as u64;
                    (slot, b, raw, new | 0xf == u32::MAX)
                }
            },
        };
        let decode_on = if tslot == ROM_SLOT as usize {
            // Only the new value's enable bit matters for the ROM itself.
            let rom = if slot == ROM_SLOT as usize {
                new
            } else {
                current
            };
            rom & 1 != 0 && cmd & command::MEMORY_SPACE != 0
        } else {
            match bar.space() {
                Space::Io => cmd & command::IO_SPACE != 0,
                Space::Mem => cmd & command::MEMORY_SPACE != 0,
            }
        };
        if sizing {
            return if decode_on {
                Err(XenError::EBUSY)
            } else {
                Ok(Some((tslot, None)))
            };
        }
        // The device ignores the address bits below its size.
        let base = raw & !(bar.size - 1);
        match self.placement(idx, tslot, &bar, base) {
            Ok(()) => Ok(Some((tslot, Some(base)))),
            Err(_) if !decode_on && bar.kind == BarKind::Mem64 => Ok(Some((tslot, None))),
            Err(e) => Err(e),
        }
    }

    /// May BAR `slot` of owned function `idx` decode at `base`?
    fn placement(
        &self,
        idx: usize,
        slot: usize,
        bar: &TrackedBar,
        base: u64,
    ) -> Result<(), XenError> {
        let o = &self.owned[idx];
        let end = base.checked_add(bar.size).ok_or(XenError::EPERM)?;
        let space = bar.space();
        let in_window = self
            .owned
            .iter()
            .filter(|w| w.owner == o.owner)
            .flat_map(|w| w.slots.iter())
            .filter_map(|s| match s {
                Slot::Bar(b) if b.space() == space => Some(b),
                _ => None,
            })
            .any(|w| base >= w.original && end <= w.original.saturating_add(w.size));
        if !in_window {
            return Err(XenError::EPERM);
        }
        let hits_fixed = self
            .fixed
            .iter()
            .any(|f| f.space == space && base < f.end && f.start < end);
        let hits_owned = self.owned.iter().enumerate().any(|(j, w)| {
            w.slots.iter().enumerate().any(|(k, s)| match s {
                Slot::Bar(b) if (j, k) != (idx, slot) && b.space() == space => b
                    .current
                    .is_some_and(|c| base < c.saturating_add(b.size) && c < end),
                _ => false,
            })
        });
        if hits_fixed || hits_owned {
            return Err(XenError::EBUSY);
        }
        Ok(())
    }
}

/// Turn off what lets a function act on its own (bus mastering, MSI, MSI-X), before it is
/// handed to a domain and after it is taken back.
pub fn quiesce(cfg: &mut impl ConfigAccess, f: &Function) {
    let cmd = cfg.read16(f.address, reg::COMMAND);
    cfg.write(
        f.address,
        reg::COMMAND,
        2,
        ((cmd & !command::BUS_MASTER) | command::INTX_DISABLE) as u32,
    );
    if let Some(m) = &f.msi {
        let ctl = cfg.read16(f.address, m.offset + 2);
        cfg.write(f.address, m.offset + 2, 2, (ctl & !1) as u32);
    }
    if let Some(m) = &f.msix {
        let ctl = cfg.read16(f.address, m.offset + 2);
        cfg.write(
            f.address,
            m.offset + 2,
            2,
            ((ctl & !(1 << 15)) | (1 << 14)) as u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::caps::id;
    use crate::pci::enumerate::enumerate;
    use crate::pci::fake::{FakeConfig, FakeFunction, bdf};

    const DOM: DomId = 3;
    const OTHER: DomId = 4;

    /// 00:02.0 net (dom 4), 00:03.0 blk (dom 3, MSI-X and a 64-bit BAR), 00:04.0 unassigned.
    fn setup(insecure: bool) -> (FakeConfig, ConfigFilter) {
        let mut cfg = FakeConfig::default();
        let mut net = FakeFunction::endpoint(0x1af4, 0x1000, [2, 0, 0]);
        net.mem_bar(1, 0xfe00_0000, 0x1000, false, false);
        cfg.add(bdf(0, 2, 0), net);
        let mut blk = FakeFunction::endpoint(0x1af4, 0x1001, [1, 0, 0]);
        blk.io_bar(0, 0xc000, 0x80);
        blk.mem_bar(1, 0xfe10_0000, 0x1000, false, false);
        blk.mem_bar(2, 0xfe10_1000, 0x1000, false, false);
        blk.mem_bar(4, 0x8_0000_0000, 0x4000, true, true);
        blk.caps(&[
            (0x98, id::MSIX, 0x84),
            (0x84, id::VENDOR, 0x70),
            (0x70, id::MSI, 0),
        ]);
        blk.set16(0x9a, 1);
        blk.set32(0x9c, 1);
        blk.set32(0xa0, 0x800 | 1);
        blk.set16(0x72, 1 << 7);
        // Device-specific and MSI control bytes are writable.
        for dw in [0x40, 0x70, 0x74, 0x78, 0x7c, 0x98] {
            blk.rw_mask[dw / 4] = u32::MAX;
        }
        blk.set32(reg::ROM_TYPE0, 0xfe14_0000);
        blk.rw_mask[reg::ROM_TYPE0 as usize / 4] = !(0x4_0000u32 - 1) | 1;
        cfg.add(bdf(0, 3, 0), blk);
        let mut free = FakeFunction::endpoint(0x8086, 0x10d3, [2, 0, 0]);
        free.mem_bar(0, 0xfe20_0000, 0x2_0000, false, false);
        cfg.add(bdf(0, 4, 0), free);
        let (fs, _) = enumerate(&mut cfg, 0, 0..=255, true);
        let asg = [
            Assignment {
                address: bdf(0, 2, 0),
                owner: OTHER,
                insecure_dma: false,
            },
            Assignment {
                address: bdf(0, 3, 0),
                owner: DOM,
                insecure_dma: insecure,
            },
        ];
        cfg.writes.clear();
        (cfg, ConfigFilter::new(&fs, &asg))
    }

    const BLK: PciAddress = PciAddress {
        segment: 0,
        bus: 0,
        device: 3,
        function: 0,
    };

    #[test]
    fn released_functions_go_back_to_the_hypervisor_and_others_stay() {
        let (mut cfg, mut f) = setup(false);
        assert_eq!(f.release(DOM), [BLK]);
        assert_eq!(f.owner(BLK), None);
        assert_eq!(f.read(&cfg, DOM, BLK, 0, 4), Err(XenError::ENODEV));
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x40, 4, 1),
            Err(XenError::ENODEV)
        );
        assert_eq!(f.owner(bdf(0, 2, 0)), Some(OTHER));
        assert_eq!(f.read(&cfg, OTHER, bdf(0, 2, 0), 0, 2), Ok(0x1af4));
        assert!(f.release(DOM).is_empty());
    }

    #[test]
    fn owner_reads_and_writes_its_own_function_only() {
        let (mut cfg, mut f) = setup(false);
        assert_eq!(f.read(&cfg, DOM, BLK, 0, 4), Ok(0x1001_1af4));
        assert_eq!(f.read(&cfg, OTHER, BLK, 0, 4), Err(XenError::ENODEV));
        assert_eq!(f.read(&cfg, DOM, bdf(0, 4, 0), 0, 4), Err(XenError::ENODEV));
        assert_eq!(f.read(&cfg, DOM, bdf(0, 9, 0), 0, 4), Err(XenError::ENODEV));
        assert_eq!(
            f.write(&mut cfg, DOM, bdf(0, 2, 0), 0x40, 4, 1),
            Err(XenError::ENODEV)
        );
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x40, 4, 0xdead_beef), Ok(()));
        assert_eq!(cfg.read32(BLK, 0x40), 0xdead_beef);
        assert_eq!(f.owner(BLK), Some(DOM));
        assert_eq!(f.owned_by(DOM).collect::<std::vec::Vec<_>>(), [BLK]);
    }

    #[test]
    fn malformed_accesses_are_einval() {
        let (mut cfg, mut f) = setup(false);
        assert_eq!(f.read(&cfg, DOM, BLK, 0x41, 4), Err(XenError::EINVAL));
        assert_eq!(f.read(&cfg, DOM, BLK, 0x40, 3), Err(XenError::EINVAL));
        assert_eq!(f.read(&cfg, DOM, BLK, 0xffe, 4), Err(XenError::EINVAL));
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x1000, 1, 0),
            Err(XenError::EINVAL)
        );
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x40, 1, 0x100),
            Err(XenError::EINVAL)
        );
        assert!(cfg.writes.is_empty());
    }

    #[test]
    fn capability_pointers_and_headers_cannot_change() {
        let (mut cfg, mut f) = setup(false);
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, reg::CAP_PTR, 1, 0x40),
            Err(XenError::EPERM)
        );
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x85, 1, 0x98),
            Err(XenError::EPERM)
        );
        // A dword write over a header that keeps id and next is fine (MSI control changes).
        let v = 0x0005 | (0x0081 << 16);
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x70, 4, v), Ok(()));
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x70, 4, v | 0x40),
            Err(XenError::EPERM)
        );
        assert!(
            cfg.writes
                .iter()
                .all(|w| w.offset != reg::CAP_PTR && w.offset != 0x85)
        );
    }

    #[test]
    fn msi_message_and_msix_location_registers_belong_to_the_hypervisor() {
        let (mut cfg, mut f) = setup(false);
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x74, 4, 0xfee0_0000),
            Err(XenError::EPERM)
        );
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x7c, 2, 0x41),
            Err(XenError::EPERM)
        );
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x9c, 4, 2),
            Err(XenError::EPERM)
        );
        // MSI-X control (enable) is the owner's.
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x9a, 2, 0x8001), Ok(()));
    }

    #[test]
    fn bus_master_needs_iommu_confinement_or_insecure_dma() {
        let (mut cfg, mut f) = setup(false);
        let bm = (command::BUS_MASTER | command::MEMORY_SPACE) as u32;
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, reg::COMMAND, 2, bm),
            Err(XenError::EPERM)
        );
        assert_eq!(cfg.read16(BLK, reg::COMMAND) & command::BUS_MASTER, 0);
        assert!(f.set_confined(BLK, true));
        assert_eq!(f.write(&mut cfg, DOM, BLK, reg::COMMAND, 2, bm), Ok(()));
        assert_ne!(cfg.read16(BLK, reg::COMMAND) & command::BUS_MASTER, 0);

        let (mut cfg, mut f) = setup(true);
        assert_eq!(f.write(&mut cfg, DOM, BLK, reg::COMMAND, 2, bm), Ok(()));
    }

    #[test]
    fn bar_moves_inside_the_owners_windows_only() {
        let (mut cfg, mut f) = setup(false);
        // Own window: the BAR's own range. Same place again: fine.
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x14, 4, 0xfe10_0000), Ok(()));
        // Onto RAM, onto another domain's BAR, onto an unassigned device's BAR: outside.
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x14, 4, 0x0010_0000),
            Err(XenError::EPERM)
        );
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x14, 4, 0xfe00_0000),
            Err(XenError::EPERM)
        );
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x14, 4, 0xfe20_0000),
            Err(XenError::EPERM)
        );
        // Low memory: outside.
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x14, 4, 0x1000),
            Err(XenError::EPERM)
        );
        assert_eq!(cfg.read32(BLK, 0x14), 0xfe10_0000);
    }

    #[test]
    fn bar_cannot_overlap_another_bar_but_may_take_a_freed_spot_in_the_windows() {
        let (mut cfg, mut f) = setup(false);
        // BAR2's spot is the owner's window, but BAR2 decodes there.
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x14, 4, 0xfe10_1000),
            Err(XenError::EBUSY)
        );
        // Swap BAR1 and BAR2: size BAR2 (unplaced), move BAR1, then BAR2.
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x18, 4, u32::MAX), Ok(()));
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x14, 4, 0xfe10_1000), Ok(()));
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x18, 4, 0xfe10_1000),
            Err(XenError::EBUSY)
        );
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x18, 4, 0xfe10_0000), Ok(()));
        assert_eq!(
            f.write(
                &mut cfg,
                DOM,
                BLK,
                reg::COMMAND,
                2,
                command::MEMORY_SPACE as u32
            ),
            Ok(())
        );
        // The ROM (256 KiB) does not fit in BAR1's 4 KiB window.
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, reg::ROM_TYPE0, 4, 0xfe10_0001),
            Err(XenError::EPERM)
        );
    }

    #[test]
    fn sizing_needs_decode_off_and_decode_needs_every_bar_placed() {
        let (mut cfg, mut f) = setup(false);
        let mem = command::MEMORY_SPACE as u32;
        assert_eq!(f.write(&mut cfg, DOM, BLK, reg::COMMAND, 2, mem), Ok(()));
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x14, 4, u32::MAX),
            Err(XenError::EBUSY)
        );
        assert_eq!(f.write(&mut cfg, DOM, BLK, reg::COMMAND, 2, 0), Ok(()));
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x14, 4, u32::MAX), Ok(()));
        assert_eq!(cfg.read32(BLK, 0x14), 0xffff_f000);
        // Unplaced: memory decode refused until restored.
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, reg::COMMAND, 2, mem),
            Err(XenError::EPERM)
        );
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x14, 4, 0xfe10_0000), Ok(()));
        assert_eq!(f.write(&mut cfg, DOM, BLK, reg::COMMAND, 2, mem), Ok(()));
        // I/O decode is separate: the I/O BAR may be sized now, but I/O decode then waits.
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x10, 4, u32::MAX), Ok(()));
        let both = (command::MEMORY_SPACE | command::IO_SPACE) as u32;
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, reg::COMMAND, 2, both),
            Err(XenError::EPERM)
        );
    }

    #[test]
    fn a_64bit_bar_may_pass_through_an_unplaced_state_only_with_decode_off() {
        let (mut cfg, mut f) = setup(false);
        // Size it (both halves), then restore high then low.
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x20, 4, u32::MAX), Ok(()));
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x24, 4, u32::MAX), Ok(()));
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x24, 4, 0x8), Ok(()));
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x20, 4, 0x0000_000c), Ok(()));
        let mem = command::MEMORY_SPACE as u32;
        assert_eq!(f.write(&mut cfg, DOM, BLK, reg::COMMAND, 2, mem), Ok(()));
        // With decode on, a half-move to a bad place is refused.
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x24, 4, 0x9),
            Err(XenError::EPERM)
        );
        assert_eq!(cfg.read32(BLK, 0x24), 0x8);
    }

    #[test]
    fn unimplemented_and_refused_bars_stay_as_they_are() {
        let (mut cfg, mut f) = setup(false);
        // BAR3 is not implemented: sizing probes are harmless, other values refused.
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x1c, 4, u32::MAX), Ok(()));
        assert_eq!(f.write(&mut cfg, DOM, BLK, 0x1c, 4, 0), Ok(()));
        assert_eq!(
            f.write(&mut cfg, DOM, BLK, 0x1c, 4, 0xfe30_0000),
            Err(XenError::EPERM)
        );
    }

    #[test]
    fn quiesce_turns_off_bus_master_msi_and_msix() {
        let (mut cfg, _) = setup(false);
        cfg.get(BLK)
            .set16(reg::COMMAND, command::BUS_MASTER | command::MEMORY_SPACE);
        cfg.get(BLK).set16(0x9a, 0x8001);
        cfg.get(BLK).set16(0x72, (1 << 7) | 1);
        let (fs, _) = enumerate(&mut cfg, 0, 0..=255, true);
        let blk = fs.iter().find(|f| f.address == BLK).unwrap();
        quiesce(&mut cfg, blk);
        assert_eq!(cfg.read16(BLK, reg::COMMAND) & command::BUS_MASTER, 0);
        assert_eq!(cfg.read16(BLK, 0x72) & 1, 0);
        assert_eq!(cfg.read16(BLK, 0x9a) & 0xc000, 0x4000);
    }

    #[test]
    fn bar_window_allows_own_bars_off_the_msix_pages_only() {
        let (_, f) = setup(false);
        // BAR4 (64-bit, 16 KiB) is free of MSI-X structures.
        assert_eq!(f.bar_window(DOM, 0x8_0000_0000, 0x4000), Ok(BLK));
        assert_eq!(f.bar_window(DOM, 0x8_0000_3000, 0x10), Ok(BLK));
        // Table and PBA live in BAR1: every page of it is the hypervisor's.
        assert_eq!(f.bar_window(DOM, 0xfe10_0000, 16), Err(XenError::EPERM));
        assert_eq!(f.bar_window(DOM, 0xfe10_0ff0, 8), Err(XenError::EPERM));
        // BAR2 is next to it and free.
        assert_eq!(f.bar_window(DOM, 0xfe10_1000, 0x1000), Ok(BLK));
        // Straddling two BARs, past the end, another domain's BAR, unowned, RAM.
        assert_eq!(f.bar_window(DOM, 0xfe10_0f00, 0x200), Err(XenError::EPERM));
        assert_eq!(
            f.bar_window(DOM, 0x8_0000_3000, 0x1001),
            Err(XenError::EPERM)
        );
        assert_eq!(f.bar_window(DOM, 0xfe00_0000, 0x10), Err(XenError::EPERM));
        assert_eq!(f.bar_window(DOM, 0xfe20_0000, 0x10), Err(XenError::EPERM));
        assert_eq!(f.bar_window(DOM, 0x10_0000, 0x1000), Err(XenError::EPERM));
        assert_eq!(f.bar_window(OTHER, 0xfe00_0000, 0x1000), Ok(bdf(0, 2, 0)));
        // Malformed ranges, a domain that owns nothing.
        assert_eq!(f.bar_window(DOM, 0x8_0000_0000, 0), Err(XenError::EINVAL));
        assert_eq!(f.bar_window(DOM, u64::MAX - 1, 4), Err(XenError::EINVAL));
        assert_eq!(f.bar_window(9, 0x8_0000_0000, 0x10), Err(XenError::ENODEV));
    }

    #[test]
    fn msix_table_is_found_for_the_owner_only() {
        let (_, f) = setup(false);
        let t = f.msix_table(DOM, BLK).unwrap();
        assert_eq!(
            t,
            MsixTable {
                entries: 2,
                phys: 0xfe10_0000,
                cap_offset: 0x98
            }
        );
        assert_eq!(f.msix_table(OTHER, BLK), Err(XenError::ENODEV));
        // The net function has no MSI-X.
        assert_eq!(f.msix_table(OTHER, bdf(0, 2, 0)), Err(XenError::EINVAL));
    }

    #[test]
    fn a_released_function_can_be_reassigned_with_its_bars_as_windows() {
        let (mut cfg, mut f) = setup(false);
        assert!(!f.reassign(BLK, 7), "not released yet");
        f.release(DOM);
        assert_eq!(
            f.bar_window(DOM, 0x8_0000_0000, 0x10),
            Err(XenError::ENODEV)
        );
        assert!(f.reassign(BLK, 7));
        assert!(!f.reassign(BLK, 8), "only once");
        assert_eq!(f.owner(BLK), Some(7));
        assert_eq!(f.bar_window(7, 0x8_0000_0000, 0x10), Ok(BLK));
        assert_eq!(f.read(&cfg, DOM, BLK, 0, 4), Err(XenError::ENODEV));
        // Its BARs are its windows again, not obstacles: moving BAR2 back onto itself works.
        f.write(&mut cfg, 7, BLK, 0x18, 4, 0xfe10_1000).unwrap();
        // Bus mastering waits for confinement again.
        assert_eq!(
            f.write(
                &mut cfg,
                7,
                BLK,
                reg::COMMAND,
                2,
                u32::from(command::BUS_MASTER)
            ),
            Err(XenError::EPERM)
        );
    }
}
