//! PCI: configuration-space parsing, enumeration, device assignment to driver domains, the
//! config-write filter that keeps an owner inside its own devices, and the portable half of the
//! Intel VT-d IOMMU driver (DMAR parsing, context and second-level tables).
//!
//! Everything here is portable logic over [`ConfigAccess`] (on bare metal: ECAM memory in
//! `arch::x86_64::pci`; in tests: [`fake::FakeConfig`]). A device is hostile input: its
//! registers may read back anything, its capability list may loop, its BARs may claim absurd
//! sizes. Nothing read from a device is used as an index or address before it is bounded.
//!
//! Locking: none here; the arch layer keeps the enumeration result and the filter under one
//! lock, taken after the domain table's lock when a hypercall reaches it.

pub mod assign;
pub mod bar;
pub mod caps;
pub mod dmar;
pub mod enumerate;
#[cfg(test)]
pub mod fake;
pub mod filter;
pub mod owner;
pub mod vtd;

pub use shared_abi::pci::PciAddress;

/// Bytes of one function's configuration space with ECAM (PCIe).
pub const CONFIG_SIZE: u16 = 4096;
/// Bytes of the conventional (PCI 3.0) configuration space.
pub const LEGACY_CONFIG_SIZE: u16 = 256;

/// Header registers (offsets) shared by every header type.
pub mod reg {
    pub const VENDOR_ID: u16 = 0x00;
    pub const DEVICE_ID: u16 = 0x02;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const REVISION: u16 = 0x08;
    pub const PROG_IF: u16 = 0x09;
    pub const SUBCLASS: u16 = 0x0a;
    pub const CLASS: u16 = 0x0b;
    pub const HEADER_TYPE: u16 = 0x0e;
    pub const BAR0: u16 = 0x10;
    /// Type 0: expansion ROM base.
    pub const ROM_TYPE0: u16 = 0x30;
    /// Type 1: expansion ROM base.
    pub const ROM_TYPE1: u16 = 0x38;
    pub const CAP_PTR: u16 = 0x34;
    pub const INTERRUPT_LINE: u16 = 0x3c;
    pub const INTERRUPT_PIN: u16 = 0x3d;
    /// Type 1: primary, secondary, subordinate bus numbers.
    pub const PRIMARY_BUS: u16 = 0x18;
    pub const SECONDARY_BUS: u16 = 0x19;
    pub const SUBORDINATE_BUS: u16 = 0x1a;
}

/// Command register bits.
pub mod command {
    pub const IO_SPACE: u16 = 1 << 0;
    pub const MEMORY_SPACE: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register bit: the function has a capability list.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Configuration-space access for one segment. Offsets are aligned to `size` and
/// `offset + size <= CONFIG_SIZE`; callers check that before calling (see [`access_ok`]).
/// Absent functions read as all ones.
pub trait ConfigAccess {
    /// Read `size` (1, 2 or 4) bytes at `offset` of function `addr`.
    fn read(&self, addr: PciAddress, offset: u16, size: u8) -> u32;
    /// Write `size` (1, 2 or 4) bytes at `offset` of function `addr`.
    fn write(&mut self, addr: PciAddress, offset: u16, size: u8, value: u32);

    fn read8(&self, addr: PciAddress, offset: u16) -> u8 {
        self.read(addr, offset, 1) as u8
    }
    fn read16(&self, addr: PciAddress, offset: u16) -> u16 {
        self.read(addr, offset, 2) as u16
    }
    fn read32(&self, addr: PciAddress, offset: u16) -> u32 {
        self.read(addr, offset, 4)
    }
}

/// Is an access of `size` bytes at `offset` well-formed (size 1/2/4, naturally aligned, inside
/// the 4 KiB configuration space)?
pub const fn access_ok(offset: u16, size: u8) -> bool {
    matches!(size, 1 | 2 | 4)
        && offset.is_multiple_of(size as u16)
        && (offset as u32) + (size as u32) <= CONFIG_SIZE as u32
}

/// Header layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderType {
    /// An endpoint.
    Endpoint,
    /// A PCI-to-PCI bridge.
    Bridge,
    /// A CardBus bridge.
    CardBus,
    /// Anything else (reserved encodings).
    Unknown(u8),
}

impl HeaderType {
    /// Number of BAR slots in this layout.
    pub const fn bar_slots(self) -> usize {
        match self {
            HeaderType::Endpoint => 6,
            HeaderType::Bridge => 2,
            _ => 0,
        }
    }
}

/// The standard header fields of one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub vendor: u16,
    pub device: u16,
    pub command: u16,
    pub status: u16,
    pub revision: u8,
    /// Base class, subclass, programming interface.
    pub class: [u8; 3],
    pub header_type: HeaderType,
    pub multifunction: bool,
    pub interrupt_pin: u8,
    /// Bridges: (primary, secondary, subordinate) bus numbers.
    pub buses: Option<(u8, u8, u8)>,
}

impl Header {
    /// Read the header of `addr`, or `None` if no function answers there.
    pub fn read(cfg: &impl ConfigAccess, addr: PciAddress) -> Option<Header> {
        let id = cfg.read32(addr, reg::VENDOR_ID);
        let vendor = id as u16;
        // 0xffff: nothing there. 0x0000 is not a valid vendor either (some dead links read 0).
        if vendor == 0xffff || vendor == 0 {
            return None;
        }
        let ht = cfg.read8(addr, reg::HEADER_TYPE);
        let header_type = match ht & 0x7f {
            0 => HeaderType::Endpoint,
            1 => HeaderType::Bridge,
            2 => HeaderType::CardBus,
            t => HeaderType::Unknown(t),
        };
        let buses = matches!(header_type, HeaderType::Bridge).then(|| {
            (
                cfg.read8(addr, reg::PRIMARY_BUS),
                cfg.read8(addr, reg::SECONDARY_BUS),
                cfg.read8(addr, reg::SUBORDINATE_BUS),
            )
        });
        Some(Header {
            vendor,
            device: (id >> 16) as u16,
            command: cfg.read16(addr, reg::COMMAND),
            status: cfg.read16(addr, reg::STATUS),
            revision: cfg.read8(addr, reg::REVISION),
            class: [
                cfg.read8(addr, reg::CLASS),
                cfg.read8(addr, reg::SUBCLASS),
                cfg.read8(addr, reg::PROG_IF),
            ],
            header_type,
            multifunction: ht & 0x80 != 0,
            interrupt_pin: cfg.read8(addr, reg::INTERRUPT_PIN),
            buses,
        })
    }

    /// Offset of the expansion ROM BAR for this layout.
    pub const fn rom_offset(&self) -> Option<u16> {
        match self.header_type {
            HeaderType::Endpoint => Some(reg::ROM_TYPE0),
            HeaderType::Bridge => Some(reg::ROM_TYPE1),
            _ => None,
        }
    }

    /// Identity for manifest matching.
    pub fn id(&self, address: PciAddress) -> shared_abi::pci::FunctionId {
        shared_abi::pci::FunctionId {
            address,
            vendor: self.vendor,
            device: self.device,
            class: self.class,
        }
    }
}
