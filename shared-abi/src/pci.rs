//! PCI device selection for the boot manifest: which physical functions a driver domain is
//! given.
//!
//! A [`DeviceMatch`] names functions by address (segment:bus:device.function), by
//! vendor/device id, or by class code. The hypervisor resolves every match against the
//! functions it enumerated at boot and refuses a manifest in which one function would go to two
//! domains (`core_hv::pci::assign`). Matches are hostile input like the rest of the manifest:
//! [`DeviceMatch::validate`] checks the ranges, and a match that selects nothing is an error, not
//! a silent no-op.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most device matches one domain may carry.
pub const MAX_DEVICE_MATCHES: usize = 16;

/// A PCI function address (segment group, bus, device 0..32, function 0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PciAddress {
    pub segment: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    pub const MAX_DEVICE: u8 = 31;
    pub const MAX_FUNCTION: u8 = 7;

    /// An address, or `None` if `device` > 31 or `function` > 7.
    pub const fn new(segment: u16, bus: u8, device: u8, function: u8) -> Option<PciAddress> {
        if device > Self::MAX_DEVICE || function > Self::MAX_FUNCTION {
            return None;
        }
        Some(PciAddress {
            segment,
            bus,
            device,
            function,
        })
    }

    /// Device and function packed as in a requester id's low byte (`dev << 3 | fn`).
    pub const fn devfn(&self) -> u8 {
        (self.device << 3) | (self.function & 7)
    }

    /// The 16-bit requester (source) id a DMA or interrupt from this function carries.
    pub const fn requester_id(&self) -> u16 {
        ((self.bus as u16) << 8) | self.devfn() as u16
    }

    /// True if the fields are in range (a deserialised value is not checked by serde).
    pub const fn is_valid(&self) -> bool {
        self.device <= Self::MAX_DEVICE && self.function <= Self::MAX_FUNCTION
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

/// Why a PCI address string was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciAddressError {
    /// Not `[SSSS:]BB:DD.F` with hexadecimal fields.
    Syntax,
    /// Device above 0x1f.
    Device(u32),
    /// Function above 7.
    Function(u32),
}

impl fmt::Display for PciAddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PciAddressError::Syntax => {
                write!(
                    f,
                    "PCI address must be [segment:]bus:device.function in hex"
                )
            }
            PciAddressError::Device(d) => write!(f, "PCI device {d:#x} is above 0x1f"),
            PciAddressError::Function(n) => write!(f, "PCI function {n} is above 7"),
        }
    }
}

impl FromStr for PciAddress {
    type Err = PciAddressError;

    /// `0000:00:03.0` or `00:03.0` (segment 0).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = |t: &str, max_len: usize| -> Result<u32, PciAddressError> {
            if t.is_empty() || t.len() > max_len {
                return Err(PciAddressError::Syntax);
            }
            u32::from_str_radix(t, 16).map_err(|_| PciAddressError::Syntax)
        };
        let (head, func) = s.rsplit_once('.').ok_or(PciAddressError::Syntax)?;
        let mut parts = head.split(':');
        let (seg, bus, dev) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(b), Some(d), None, None) => (0, hex(b, 2)?, hex(d, 2)?),
            (Some(s), Some(b), Some(d), None) => (hex(s, 4)?, hex(b, 2)?, hex(d, 2)?),
            _ => return Err(PciAddressError::Syntax),
        };
        let func = hex(func, 1)?;
        if dev > PciAddress::MAX_DEVICE as u32 {
            return Err(PciAddressError::Device(dev));
        }
        if func > PciAddress::MAX_FUNCTION as u32 {
            return Err(PciAddressError::Function(func));
        }
        Ok(PciAddress {
            segment: seg as u16,
            bus: bus as u8,
            device: dev as u8,
            function: func as u8,
        })
    }
}

/// Which functions a domain is given. Every field that is present must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceMatch {
    /// Exactly this function.
    Address(PciAddress),
    /// Every function with this vendor id and, if given, device id.
    Id { vendor: u16, device: Option<u16> },
    /// Every function with this base class and, if given, subclass and programming interface.
    Class {
        base: u8,
        sub: Option<u8>,
        prog_if: Option<u8>,
    },
}

/// Why a device match was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceMatchError {
    /// Device or function number out of range.
    BadAddress(PciAddress),
    /// Vendor id 0xffff is what an absent function reads as; it matches nothing real.
    AbsentVendor,
    /// A programming interface without a subclass is ambiguous.
    ProgIfWithoutSub,
}

impl fmt::Display for DeviceMatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceMatchError::BadAddress(a) => write!(
                f,
                "PCI address {:02x}:{:02x}.{}: device must be 0..=0x1f, function 0..=7",
                a.bus, a.device, a.function
            ),
            DeviceMatchError::AbsentVendor => {
                write!(
                    f,
                    "vendor id 0xffff means \"no function\" and matches nothing"
                )
            }
            DeviceMatchError::ProgIfWithoutSub => {
                write!(f, "a class match with prog_if needs a subclass")
            }
        }
    }
}

/// What a match is compared with: one enumerated function's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionId {
    pub address: PciAddress,
    pub vendor: u16,
    pub device: u16,
    /// Base class, subclass, programming interface.
    pub class: [u8; 3],
}

impl DeviceMatch {
    /// Check the ranges a deserialised match could violate.
    pub fn validate(&self) -> Result<(), DeviceMatchError> {
        match *self {
            DeviceMatch::Address(a) if !a.is_valid() => Err(DeviceMatchError::BadAddress(a)),
            DeviceMatch::Id { vendor: 0xffff, .. } => Err(DeviceMatchError::AbsentVendor),
            DeviceMatch::Class {
                sub: None,
                prog_if: Some(_),
                ..
            } => Err(DeviceMatchError::ProgIfWithoutSub),
            _ => Ok(()),
        }
    }

    /// Does this match select `f`?
    pub fn matches(&self, f: &FunctionId) -> bool {
        match *self {
            DeviceMatch::Address(a) => a == f.address,
            DeviceMatch::Id { vendor, device } => {
                vendor == f.vendor && device.is_none_or(|d| d == f.device)
            }
            DeviceMatch::Class { base, sub, prog_if } => {
                base == f.class[0]
                    && sub.is_none_or(|s| s == f.class[1])
                    && prog_if.is_none_or(|p| p == f.class[2])
            }
        }
    }
}

/// One device grant in a domain's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAssignment {
    pub select: DeviceMatch,
    /// Let the device master the bus even when no IOMMU confines its DMA. This trusts the
    /// domain with all of memory; only for machines without an IOMMU.
    pub insecure_dma: bool,
}

/// Bulkhead's `physdev_op` (hypercall 33) sub-ops for a driver domain's PCI configuration
/// space. Xen has no such op (a PV dom0 reaches config space through port I/O it is simply
/// allowed); its own `PHYSDEVOP_*` numbers are all below 0x40, so these sit far above them.
///
/// Both take a pointer to a [`PciConfigOp`] in the caller's memory. The access goes through
/// the hypervisor's config filter (`core_hv::pci::filter`): only a domain holding the
/// `device_owner` capability may call them (`-EPERM` otherwise), and only on functions the
/// manifest assigned to it (`-ENODEV` for any other function, present or not); a malformed
/// access (size not 1/2/4, misaligned, past 4 KiB, value wider than the size, non-zero
/// padding) is `-EINVAL`; a refused write (capability headers, MSI/MSI-X registers, bus
/// mastering without IOMMU confinement, BARs outside the function's windows) is `-EPERM` or
/// `-EBUSY`. A read stores the value in `value` (zero-extended); the result is 0.
pub mod physdev {
    /// Read `size` bytes at `offset` of the function's configuration space.
    pub const PCI_CONFIG_READ: u64 = 0x4200;
    /// Write `value` (`size` bytes) at `offset`.
    pub const PCI_CONFIG_WRITE: u64 = 0x4201;
    /// Map host-physical `[phys, phys + len)` of a memory BAR of one of the caller's own
    /// functions uncached into its device window; argument [`super::BarMapOp`]. The range
    /// must lie inside one BAR and off the MSI-X table and PBA pages (those stay the
    /// hypervisor's): `-EPERM` otherwise, `-EINVAL` for an empty or overflowing range,
    /// `-ENOSPC` when the device window is full. Mapping pages already mapped returns the same
    /// address. `va` receives the domain address of `phys` itself (page offset kept).
    pub const MAP_BAR: u64 = 0x4202;
    /// Statistics of one of the caller's pirqs; argument [`super::IrqStatsOp`]
    /// (`-EINVAL` for a pirq the caller does not hold).
    pub const IRQ_STATS: u64 = 0x4203;

    /// Xen's `PHYSDEVOP_eoi`: argument [`super::PhysdevEoi`]. Unmasks an MSI-X entry the
    /// storm limiter masked once its quiet period has passed; otherwise a no-op (MSI-X is
    /// edge-triggered and the hypervisor acknowledges the local APIC itself).
    pub const EOI: u64 = 12;
    /// Xen's `PHYSDEVOP_map_pirq`: argument [`super::PhysdevMapPirq`]. Only
    /// `MAP_PIRQ_TYPE_MSI` and `MAP_PIRQ_TYPE_MSI_SEG` with `index = -1`, `domid` =
    /// `DOMID_SELF` or the caller, a function the caller owns with MSI-X, and
    /// `0 <= entry_nr < table size`; `table_base` is ignored (the hypervisor knows the
    /// table). `pirq` receives the number to bind with `EVTCHNOP_bind_pirq`. The hypervisor
    /// allocates a CPU vector, writes the table entry and unmasks it; the owner enables MSI-X
    /// in the capability's control register itself.
    pub const MAP_PIRQ: u64 = 13;
    /// Xen's `PHYSDEVOP_unmap_pirq`: argument [`super::PhysdevUnmapPirq`]; masks the entry,
    /// closes a bound port, frees the vector.
    pub const UNMAP_PIRQ: u64 = 14;

    /// `MAP_PIRQ_TYPE_MSI`: `bus` is the bus, segment 0.
    pub const MAP_PIRQ_TYPE_MSI: i32 = 0;
    /// `MAP_PIRQ_TYPE_MSI_SEG`: `bus` holds `segment << 16 | bus`.
    pub const MAP_PIRQ_TYPE_MSI_SEG: i32 = 3;
}

/// The argument of [`physdev::MAP_BAR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BarMapOp {
    /// Host-physical address (as the BAR register holds it).
    pub phys: u64,
    /// Bytes.
    pub len: u64,
    /// Out: the domain address of `phys`.
    pub va: u64,
}
crate::ring::le_struct!(BarMapOp, 24; phys: u64 @ 0, len: u64 @ 8, va: u64 @ 16);

/// The argument of [`physdev::IRQ_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqStatsOp {
    pub pirq: u32,
    /// Must be zero.
    pub pad: u32,
    /// Out: interrupts the device raised.
    pub raised: u64,
    /// Out: events delivered (raised minus those dropped while masked by the limiter).
    pub delivered: u64,
    /// Out: how often the storm limiter masked the entry.
    pub storms: u64,
    /// Out: time-stamp counter when the hypervisor took the last interrupt (its first
    /// instruction), to measure interrupt-to-event latency against the domain's own TSC.
    pub last_tsc: u64,
}
crate::ring::le_struct!(IrqStatsOp, 40; pirq: u32 @ 0, pad: u32 @ 4, raised: u64 @ 8,
    delivered: u64 @ 16, storms: u64 @ 24, last_tsc: u64 @ 32);

/// Xen's `struct physdev_map_pirq` (x86-64 layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysdevMapPirq {
    pub domid: u16,
    pub pad: u16,
    pub map_type: i32,
    pub index: i32,
    /// In (ignored: the hypervisor chooses) and out.
    pub pirq: i32,
    pub bus: i32,
    pub devfn: i32,
    pub entry_nr: i32,
    pub table_base: u64,
}
crate::ring::le_struct!(PhysdevMapPirq, 40; domid: u16 @ 0, pad: u16 @ 2, map_type: i32 @ 4,
    index: i32 @ 8, pirq: i32 @ 12, bus: i32 @ 16, devfn: i32 @ 20, entry_nr: i32 @ 24,
    table_base: u64 @ 32);

/// Xen's `struct physdev_unmap_pirq`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysdevUnmapPirq {
    pub domid: u16,
    pub pad: u16,
    pub pirq: i32,
}
crate::ring::le_struct!(PhysdevUnmapPirq, 8; domid: u16 @ 0, pad: u16 @ 2, pirq: i32 @ 4);

/// Xen's `struct physdev_eoi`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysdevEoi {
    pub irq: u32,
}
crate::ring::le_struct!(PhysdevEoi, 4; irq: u32 @ 0);

/// The argument of [`physdev::PCI_CONFIG_READ`] and [`physdev::PCI_CONFIG_WRITE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciConfigOp {
    pub segment: u16,
    pub bus: u8,
    /// `device << 3 | function`.
    pub devfn: u8,
    pub offset: u16,
    /// 1, 2 or 4.
    pub size: u8,
    /// Must be zero.
    pub pad: u8,
    pub value: u32,
}
crate::assert_layout!(PciConfigOp, 12; segment @ 0, bus @ 2, devfn @ 3, offset @ 4, size @ 6,
    pad @ 7, value @ 8);

impl PciConfigOp {
    /// The function it names (devfn always decodes to a valid device and function).
    pub const fn address(&self) -> PciAddress {
        PciAddress {
            segment: self.segment,
            bus: self.bus,
            device: self.devfn >> 3,
            function: self.devfn & 7,
        }
    }
}

impl crate::hypercall_args::Wire for PciConfigOp {
    const SIZE: usize = 12;

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(PciConfigOp {
            segment: u16::from_le_bytes([b[0], b[1]]),
            bus: b[2],
            devfn: b[3],
            offset: u16::from_le_bytes([b[4], b[5]]),
            size: b[6],
            pad: b[7],
            value: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        })
    }

    fn encode(&self, out: &mut [u8]) -> bool {
        if out.len() < Self::SIZE {
            return false;
        }
        out[0..2].copy_from_slice(&self.segment.to_le_bytes());
        out[2] = self.bus;
        out[3] = self.devfn;
        out[4..6].copy_from_slice(&self.offset.to_le_bytes());
        out[6] = self.size;
        out[7] = self.pad;
        out[8..12].copy_from_slice(&self.value.to_le_bytes());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall_args::Wire;

    #[test]
    fn config_op_round_trips_and_names_its_function() {
        let op = PciConfigOp {
            segment: 1,
            bus: 2,
            devfn: (3 << 3) | 1,
            offset: 0x104,
            size: 4,
            pad: 0,
            value: 0xdead_beef,
        };
        let mut buf = [0u8; 12];
        assert!(op.encode(&mut buf));
        assert_eq!(PciConfigOp::decode(&buf), Some(op));
        assert_eq!(&buf[8..12], &0xdead_beefu32.to_le_bytes());
        assert_eq!(op.address(), PciAddress::new(1, 2, 3, 1).unwrap());
        assert_eq!(PciConfigOp::decode(&buf[..11]), None);
        assert!(!op.encode(&mut buf[..11]));
    }

    fn virtio_blk() -> FunctionId {
        FunctionId {
            address: PciAddress::new(0, 0, 3, 0).unwrap(),
            vendor: 0x1af4,
            device: 0x1001,
            class: [1, 0, 0],
        }
    }

    #[test]
    fn address_parses_with_and_without_segment_and_round_trips() {
        let a: PciAddress = "0000:00:03.0".parse().unwrap();
        assert_eq!(a, PciAddress::new(0, 0, 3, 0).unwrap());
        assert_eq!(
            "1f:1f.7".parse::<PciAddress>().unwrap().to_string(),
            "0000:1f:1f.7"
        );
        assert_eq!(a.requester_id(), 0x18);
    }

    #[test]
    fn address_parse_refuses_out_of_range_and_garbage() {
        assert_eq!(
            "00:20.0".parse::<PciAddress>(),
            Err(PciAddressError::Device(0x20))
        );
        assert_eq!(
            "00:03.8".parse::<PciAddress>(),
            Err(PciAddressError::Function(8))
        );
        for bad in [
            "",
            "00:03",
            "0:0:0:0.0",
            "100:00.0",
            "00:03.",
            "zz:00.0",
            "00:03.00",
        ] {
            assert_eq!(
                bad.parse::<PciAddress>(),
                Err(PciAddressError::Syntax),
                "{bad}"
            );
        }
    }

    #[test]
    fn match_by_address_id_and_class() {
        let f = virtio_blk();
        assert!(DeviceMatch::Address(f.address).matches(&f));
        assert!(!DeviceMatch::Address(PciAddress::new(0, 0, 4, 0).unwrap()).matches(&f));
        assert!(
            DeviceMatch::Id {
                vendor: 0x1af4,
                device: None
            }
            .matches(&f)
        );
        assert!(
            DeviceMatch::Id {
                vendor: 0x1af4,
                device: Some(0x1001)
            }
            .matches(&f)
        );
        assert!(
            !DeviceMatch::Id {
                vendor: 0x1af4,
                device: Some(0x1000)
            }
            .matches(&f)
        );
        assert!(
            DeviceMatch::Class {
                base: 1,
                sub: Some(0),
                prog_if: None
            }
            .matches(&f)
        );
        assert!(
            !DeviceMatch::Class {
                base: 2,
                sub: None,
                prog_if: None
            }
            .matches(&f)
        );
    }

    #[test]
    fn validate_refuses_bad_fields() {
        let bad = PciAddress {
            segment: 0,
            bus: 0,
            device: 40,
            function: 0,
        };
        assert_eq!(
            DeviceMatch::Address(bad).validate(),
            Err(DeviceMatchError::BadAddress(bad))
        );
        assert_eq!(
            DeviceMatch::Id {
                vendor: 0xffff,
                device: None
            }
            .validate(),
            Err(DeviceMatchError::AbsentVendor)
        );
        assert_eq!(
            DeviceMatch::Class {
                base: 1,
                sub: None,
                prog_if: Some(1)
            }
            .validate(),
            Err(DeviceMatchError::ProgIfWithoutSub)
        );
        assert_eq!(
            DeviceMatch::Id {
                vendor: 0x8086,
                device: None
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn assignment_round_trips_through_postcard() {
        let a = DeviceAssignment {
            select: DeviceMatch::Class {
                base: 2,
                sub: Some(0),
                prog_if: None,
            },
            insecure_dma: false,
        };
        let bytes = postcard::to_allocvec(&a).unwrap();
        assert_eq!(postcard::from_bytes::<DeviceAssignment>(&bytes).unwrap(), a);
    }
}
