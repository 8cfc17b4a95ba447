//! Base address registers: decoding and size probing.
//!
//! Probing writes all ones to a BAR and reads back which address bits stuck. It is done with
//! the function's memory and I/O decode turned off (so the device never answers at the
//! all-ones address meanwhile) and every register restored afterwards, the command register
//! last. A device's answers are not trusted: a reserved memory type, a 64-bit BAR in the last
//! slot or a range that wraps the address space is reported as [`BarError`], never used.

use core::fmt;

use super::{ConfigAccess, Header, PciAddress, command, reg};

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    /// 32-bit memory (also the legacy "below 1 MiB" type).
    Mem32,
    /// 64-bit memory: this slot and the next.
    Mem64,
}

/// One implemented BAR (or the expansion ROM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Slot 0..=5, or [`ROM_SLOT`] for the expansion ROM.
    pub slot: u8,
    pub kind: BarKind,
    pub prefetchable: bool,
    /// Address currently programmed (flag bits removed).
    pub base: u64,
    /// Size in bytes: a power of two.
    pub size: u64,
}

/// Pseudo slot number of the expansion ROM.
pub const ROM_SLOT: u8 = 6;

impl Bar {
    /// `[base, base + size)`; `None` never happens for a probed BAR (overflow is refused).
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }
    pub fn is_memory(&self) -> bool {
        self.kind != BarKind::Io
    }
    /// Offset of the BAR's (low) register.
    pub fn offset(&self, header: &Header) -> u16 {
        if self.slot == ROM_SLOT {
            header.rom_offset().unwrap_or(reg::ROM_TYPE0)
        } else {
            reg::BAR0 + 4 * self.slot as u16
        }
    }
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.slot == ROM_SLOT {
            "ROM"
        } else {
            match self.kind {
                BarKind::Io => "io",
                BarKind::Mem32 => "mem32",
                BarKind::Mem64 => "mem64",
            }
        };
        let (size, unit) = human(self.size);
        write!(
            f,
            "{name} {:#x}..{:#x} ({size} {unit}{})",
            self.base,
            self.base.saturating_add(self.size),
            if self.prefetchable {
                ", prefetchable"
            } else {
                ""
            }
        )
    }
}

fn human(n: u64) -> (u64, &'static str) {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        (n >> 30, "GiB")
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        (n >> 20, "MiB")
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        (n >> 10, "KiB")
    } else {
        (n, "B")
    }
}

/// Why a BAR was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarError {
    /// Memory type 0b11 is reserved.
    ReservedType { slot: u8 },
    /// A 64-bit BAR in the last slot has no upper half.
    Mem64InLastSlot { slot: u8 },
    /// `base + size` wraps.
    Wraps { slot: u8, base: u64, size: u64 },
    /// The programmed base is not aligned to the size the device claims.
    Misaligned { slot: u8, base: u64, size: u64 },
}

impl fmt::Display for BarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BarError::ReservedType { slot } => write!(f, "BAR{slot}: reserved memory type"),
            BarError::Mem64InLastSlot { slot } => {
                write!(f, "BAR{slot}: 64-bit BAR in the last slot")
            }
            BarError::Wraps { slot, base, size } => {
                write!(f, "BAR{slot}: {base:#x} + {size:#x} wraps")
            }
            BarError::Misaligned { slot, base, size } => {
                write!(
                    f,
                    "BAR{slot}: base {base:#x} not aligned to its size {size:#x}"
                )
            }
        }
    }
}

/// One BAR slot after probing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarSlot {
    /// Not implemented (all address bits read back zero).
    Empty,
    /// The upper half of the 64-bit BAR in the slot before.
    Upper,
    Bar(Bar),
    Bad(BarError),
}

/// The probed BARs of one function (slots beyond the header's layout stay `Empty`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bars {
    pub slots: [BarSlot; 6],
    pub rom: BarSlot,
}

impl Bars {
    pub const NONE: Bars = Bars {
        slots: [BarSlot::Empty; 6],
        rom: BarSlot::Empty,
    };

    /// Every implemented BAR, the ROM last.
    pub fn iter(&self) -> impl Iterator<Item = &Bar> {
        self.slots
            .iter()
            .chain(core::iter::once(&self.rom))
            .filter_map(|s| match s {
                BarSlot::Bar(b) => Some(b),
                _ => None,
            })
    }

    /// The BAR in `slot` (0..=5), if implemented.
    pub fn get(&self, slot: u8) -> Option<&Bar> {
        match self.slots.get(slot as usize) {
            Some(BarSlot::Bar(b)) => Some(b),
            _ => None,
        }
    }
}

/// Lowest set bit: the size a sizing mask encodes (the bits above it may have holes on a
/// hostile device; the lowest writable address bit alone decides the size).
fn size_from_mask(mask: u64) -> u64 {
    mask & mask.wrapping_neg()
}

fn check(slot: u8, kind: BarKind, prefetchable: bool, base: u64, size: u64) -> BarSlot {
    if base.checked_add(size).is_none() {
        return BarSlot::Bad(BarError::Wraps { slot, base, size });
    }
    if !base.is_multiple_of(size) {
        return BarSlot::Bad(BarError::Misaligned { slot, base, size });
    }
    BarSlot::Bar(Bar {
        slot,
        kind,
        prefetchable,
        base,
        size,
    })
}

/// Probe `value` all-ones on `off` and return what reads back, restoring the original.
fn sample(cfg: &mut impl ConfigAccess, addr: PciAddress, off: u16, probe: u32) -> (u32, u32) {
    let orig = cfg.read32(addr, off);
    cfg.write(addr, off, 4, probe);
    let got = cfg.read32(addr, off);
    cfg.write(addr, off, 4, orig);
    (orig, got)
}

/// Decode and size every BAR and the expansion ROM of `addr` (header already read).
pub fn probe(cfg: &mut impl ConfigAccess, addr: PciAddress, header: &Header) -> Bars {
    let mut bars = Bars::NONE;
    let slots = header.header_type.bar_slots();
    if slots == 0 {
        return bars;
    }
    let cmd = cfg.read16(addr, reg::COMMAND);
    let decode = command::MEMORY_SPACE | command::IO_SPACE;
    if cmd & decode != 0 {
        cfg.write(addr, reg::COMMAND, 2, (cmd & !decode) as u32);
    }
    let mut slot = 0;
    while slot < slots {
        let s = slot as u8;
        let off = reg::BAR0 + 4 * slot as u16;
        let (orig, got) = sample(cfg, addr, off, u32::MAX);
        if orig & 1 == 1 {
            // I/O: bits 31:2 are address; a 16-bit decoder leaves the top half zero.
            let mut mask = (got & !3) as u64;
            if mask != 0 && mask & 0xffff_0000 == 0 {
                mask |= 0xffff_0000;
            }
            bars.slots[slot] = if mask == 0 {
                BarSlot::Empty
            } else {
                check(
                    s,
                    BarKind::Io,
                    false,
                    (orig & !3) as u64,
                    size_from_mask(mask),
                )
            };
            slot += 1;
            continue;
        }
        let prefetchable = orig & 0b1000 != 0;
        match (orig >> 1) & 3 {
            0 | 1 => {
                let mask = (got & !0xf) as u64;
                bars.slots[slot] = if mask == 0 {
                    BarSlot::Empty
                } else {
                    check(
                        s,
                        BarKind::Mem32,
                        prefetchable,
                        (orig & !0xf) as u64,
                        size_from_mask(mask | 0xffff_ffff_0000_0000),
                    )
                };
                slot += 1;
            }
            2 if slot + 1 < slots => {
                let (orig_hi, got_hi) = sample(cfg, addr, off + 4, u32::MAX);
                let mask = ((got_hi as u64) << 32) | (got & !0xf) as u64;
                let base = ((orig_hi as u64) << 32) | (orig & !0xf) as u64;
                bars.slots[slot] = if mask == 0 {
                    BarSlot::Empty
                } else {
                    check(s, BarKind::Mem64, prefetchable, base, size_from_mask(mask))
                };
                bars.slots[slot + 1] = BarSlot::Upper;
                slot += 2;
            }
            2 => {
                bars.slots[slot] = BarSlot::Bad(BarError::Mem64InLastSlot { slot: s });
                slot += 1;
            }
            _ => {
                bars.slots[slot] = BarSlot::Bad(BarError::ReservedType { slot: s });
                slot += 1;
            }
        }
    }
    if let Some(off) = header.rom_offset() {
        // Bit 0 (enable) stays clear during the probe so the ROM never decodes at all ones.
        let (orig, got) = sample(cfg, addr, off, 0xffff_f800);
        let mask = (got & 0xffff_f800) as u64;
        if mask != 0 {
            bars.rom = check(
                ROM_SLOT,
                BarKind::Mem32,
                false,
                (orig & 0xffff_f800) as u64,
                size_from_mask(mask | 0xffff_ffff_0000_0000),
            );
        }
    }
    if cmd & decode != 0 {
        cfg.write(addr, reg::COMMAND, 2, cmd as u32);
    }
    bars
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::{FakeConfig, FakeFunction, bdf};

    fn probe_one(f: FakeFunction) -> (Bars, FakeConfig) {
        let mut cfg = FakeConfig::default();
        cfg.add(bdf(0, 3, 0), f);
        let h = Header::read(&cfg, bdf(0, 3, 0)).unwrap();
        let bars = probe(&mut cfg, bdf(0, 3, 0), &h);
        (bars, cfg)
    }

    #[test]
    fn probe_decodes_io_mem32_mem64_and_prefetchable() {
        let mut f = FakeFunction::endpoint(0x1af4, 0x1001, [1, 0, 0]);
        f.io_bar(0, 0xc000, 0x80);
        f.mem_bar(1, 0xfebd_1000, 0x1000, false, false);
        f.mem_bar(4, 0x8_0000_0000, 0x4000, true, true);
        let (bars, _) = probe_one(f);
        assert_eq!(
            bars.get(0),
            Some(&Bar {
                slot: 0,
                kind: BarKind::Io,
                prefetchable: false,
                base: 0xc000,
                size: 0x80
            })
        );
        assert_eq!(bars.get(1).unwrap().size, 0x1000);
        assert_eq!(bars.get(1).unwrap().kind, BarKind::Mem32);
        let b4 = bars.get(4).unwrap();
        assert_eq!(
            (b4.kind, b4.prefetchable, b4.base, b4.size),
            (BarKind::Mem64, true, 0x8_0000_0000, 0x4000)
        );
        assert_eq!(bars.slots[5], BarSlot::Upper);
        assert_eq!(bars.slots[2], BarSlot::Empty);
        assert_eq!(bars.iter().count(), 3);
    }

    #[test]
    fn probe_restores_registers_and_never_writes_bars_with_decode_on() {
        let mut f = FakeFunction::endpoint(0x1af4, 0x1001, [1, 0, 0]);
        f.mem_bar(0, 0xfebd_1000, 0x1000, false, false);
        f.set16(reg::COMMAND, command::MEMORY_SPACE | command::BUS_MASTER);
        let before = f.bytes.clone();
        let (_, cfg) = probe_one(f);
        assert_eq!(cfg.bar_writes_with_decode_on(), 0);
        assert_eq!(cfg.functions[&bdf(0, 3, 0)].bytes, before);
    }

    #[test]
    fn probe_sizes_the_expansion_rom_without_enabling_it() {
        let mut f = FakeFunction::endpoint(0x1af4, 0x1000, [2, 0, 0]);
        f.set32(reg::ROM_TYPE0, 0xfeb0_0000);
        f.rw_mask[reg::ROM_TYPE0 as usize / 4] = !(0x4_0000u32 - 1) | 1;
        let (bars, cfg) = probe_one(f);
        match bars.rom {
            BarSlot::Bar(b) => {
                assert_eq!((b.base, b.size, b.slot), (0xfeb0_0000, 0x4_0000, ROM_SLOT))
            }
            other => panic!("rom {other:?}"),
        }
        assert!(
            cfg.writes
                .iter()
                .filter(|w| w.offset == 0x30)
                .all(|w| w.value & 1 == 0 || w.value == 0xfeb0_0000)
        );
    }

    #[test]
    fn probe_refuses_hostile_encodings() {
        let mut f = FakeFunction::endpoint(1, 2, [0xff, 0, 0]);
        // Slot 0: reserved memory type 0b11.
        f.set32(0x10, 0b110);
        f.rw_mask[4] = 0xffff_f000;
        // Slot 5: a 64-bit BAR with no room for its upper half.
        f.set32(0x24, 0b100);
        f.rw_mask[9] = 0xffff_f000;
        let (bars, _) = probe_one(f);
        assert_eq!(
            bars.slots[0],
            BarSlot::Bad(BarError::ReservedType { slot: 0 })
        );
        assert_eq!(
            bars.slots[5],
            BarSlot::Bad(BarError::Mem64InLastSlot { slot: 5 })
        );
        // A base the device reports but cannot hold at the size it claims.
        assert_eq!(
            check(2, BarKind::Mem32, false, 0x1000, 0x1_0000),
            BarSlot::Bad(BarError::Misaligned {
                slot: 2,
                base: 0x1000,
                size: 0x1_0000
            })
        );
    }

    #[test]
    fn probe_uses_the_lowest_writable_bit_when_the_mask_has_holes() {
        let mut f = FakeFunction::endpoint(1, 2, [0xff, 0, 0]);
        f.set32(0x10, 0);
        f.rw_mask[4] = 0xf0f0_1000;
        let (bars, _) = probe_one(f);
        assert_eq!(bars.get(0).unwrap().size, 0x1000);
    }

    #[test]
    fn probe_refuses_a_64bit_bar_that_wraps() {
        let mut f = FakeFunction::endpoint(1, 2, [0xff, 0, 0]);
        f.mem_bar(0, 0xffff_ffff_ffff_0000, 0x1_0000, true, false);
        // The device claims more than it can hold at that base.
        f.rw_mask[4] = 0;
        f.rw_mask[5] = 0x8000_0000;
        let (bars, _) = probe_one(f);
        assert!(
            matches!(bars.slots[0], BarSlot::Bad(_)),
            "{:?}",
            bars.slots[0]
        );
    }
}
