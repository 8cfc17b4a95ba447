//! A fake configuration space for tests: functions with byte arrays, per-dword write masks
//! (so BARs size like hardware: written ones stick only in the address bits) and a log of
//! every write with the command register's value at that moment.

use std::collections::BTreeMap;
use std::vec::Vec;

use super::{ConfigAccess, PciAddress, command, reg};

/// One fake function.
#[derive(Clone)]
pub struct FakeFunction {
    pub bytes: Vec<u8>,
    /// Per dword: bits a write may change.
    pub rw_mask: Vec<u32>,
}

impl FakeFunction {
    /// An endpoint (header type 0) with nothing writable but the command register.
    pub fn endpoint(vendor: u16, device: u16, class: [u8; 3]) -> FakeFunction {
        let mut f = FakeFunction {
            bytes: std::vec![0; 4096],
            rw_mask: std::vec![0; 1024],
        };
        f.set16(reg::VENDOR_ID, vendor);
        f.set16(reg::DEVICE_ID, device);
        f.bytes[reg::CLASS as usize] = class[0];
        f.bytes[reg::SUBCLASS as usize] = class[1];
        f.bytes[reg::PROG_IF as usize] = class[2];
        f.rw_mask[1] = 0x0000_0407;
        f
    }

    /// A PCI-to-PCI bridge with the given bus numbers.
    pub fn bridge(primary: u8, secondary: u8, subordinate: u8) -> FakeFunction {
        let mut f = FakeFunction::endpoint(0x8086, 0x1234, [6, 4, 0]);
        f.bytes[reg::HEADER_TYPE as usize] = 1;
        f.bytes[reg::PRIMARY_BUS as usize] = primary;
        f.bytes[reg::SECONDARY_BUS as usize] = secondary;
        f.bytes[reg::SUBORDINATE_BUS as usize] = subordinate;
        f
    }

    pub fn set8(&mut self, off: u16, v: u8) {
        self.bytes[off as usize] = v;
    }
    pub fn set16(&mut self, off: u16, v: u16) {
        self.bytes[off as usize..off as usize + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set32(&mut self, off: u16, v: u32) {
        self.bytes[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn get32(&self, off: u16) -> u32 {
        let o = off as usize;
        u32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap())
    }

    /// A memory BAR at `slot` (32- or 64-bit) of `size` bytes at `base`.
    pub fn mem_bar(&mut self, slot: u16, base: u64, size: u64, is64: bool, prefetch: bool) {
        let off = reg::BAR0 + slot * 4;
        let flags = (if is64 { 0b100 } else { 0 }) | (if prefetch { 0b1000 } else { 0 });
        let mask = !(size - 1);
        self.set32(off, (base as u32 & !0xf) | flags);
        self.rw_mask[off as usize / 4] = mask as u32 & !0xf;
        if is64 {
            self.set32(off + 4, (base >> 32) as u32);
            self.rw_mask[off as usize / 4 + 1] = (mask >> 32) as u32;
        }
    }

    /// An I/O BAR at `slot` of `size` bytes at `base`.
    pub fn io_bar(&mut self, slot: u16, base: u32, size: u32) {
        let off = reg::BAR0 + slot * 4;
        self.set32(off, (base & !3) | 1);
        self.rw_mask[off as usize / 4] = !(size - 1) & !3;
    }

    /// Set up a capability list: `(offset, id, next)` entries, the first one pointed to by the
    /// header.
    pub fn caps(&mut self, list: &[(u8, u8, u8)]) {
        let status = u16::from_le_bytes([self.bytes[6], self.bytes[7]]) | super::STATUS_CAP_LIST;
        self.set16(reg::STATUS, status);
        if let Some(first) = list.first() {
            self.bytes[reg::CAP_PTR as usize] = first.0;
        }
        for &(off, id, next) in list {
            self.bytes[off as usize] = id;
            self.bytes[off as usize + 1] = next;
        }
    }
}

/// One logged write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoggedWrite {
    pub addr: PciAddress,
    pub offset: u16,
    pub size: u8,
    pub value: u32,
    /// The function's command register when the write happened.
    pub command_before: u16,
}

/// A whole fake segment.
#[derive(Clone, Default)]
pub struct FakeConfig {
    pub functions: BTreeMap<PciAddress, FakeFunction>,
    pub writes: Vec<LoggedWrite>,
}

pub fn bdf(bus: u8, dev: u8, func: u8) -> PciAddress {
    PciAddress::new(0, bus, dev, func).unwrap()
}

impl FakeConfig {
    pub fn add(&mut self, addr: PciAddress, f: FakeFunction) -> &mut FakeFunction {
        self.functions.entry(addr).or_insert(f)
    }
    pub fn get(&mut self, addr: PciAddress) -> &mut FakeFunction {
        self.functions.get_mut(&addr).unwrap()
    }
    /// Writes that touched BARs while memory or I/O decode was on.
    pub fn bar_writes_with_decode_on(&self) -> usize {
        self.writes
            .iter()
            .filter(|w| (0x10..0x28).contains(&w.offset) || w.offset == 0x30)
            .filter(|w| w.command_before & (command::MEMORY_SPACE | command::IO_SPACE) != 0)
            .count()
    }
}

impl ConfigAccess for FakeConfig {
    fn read(&self, addr: PciAddress, offset: u16, size: u8) -> u32 {
        let Some(f) = self.functions.get(&addr) else {
            return u32::MAX >> (32 - 8 * size as u32);
        };
        let mut v = 0u32;
        for i in 0..size as usize {
            v |= (f.bytes[offset as usize + i] as u32) << (8 * i);
        }
        v
    }

    fn write(&mut self, addr: PciAddress, offset: u16, size: u8, value: u32) {
        let Some(f) = self.functions.get_mut(&addr) else {
            return;
        };
        let command_before = u16::from_le_bytes([f.bytes[4], f.bytes[5]]);
        self.writes.push(LoggedWrite {
            addr,
            offset,
            size,
            value,
            command_before,
        });
        let dw = offset & !3;
        let shift = 8 * (offset & 3) as u32;
        let width_mask = if size == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * size as u32)) - 1) << shift
        };
        let mask = f.rw_mask[dw as usize / 4] & width_mask;
        let old = f.get32(dw);
        f.set32(dw, (old & !mask) | ((value << shift) & mask));
    }
}
