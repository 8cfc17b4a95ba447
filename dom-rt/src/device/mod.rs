//! Device access for driver domains: the PCI functions the manifest assigned to this domain,
//! their configuration space, their BARs, their MSI-X interrupts as event channels, and
//! DMA-able buffers.
//!
//! - [`assigned`] lists the functions from the start info as [`Device`]s. A [`Device`] reads
//!   and writes its configuration space through `physdev_op` `PCI_CONFIG_READ/WRITE` (the
//!   hypervisor filters every access), walks its capability list, reads its BAR registers and
//!   maps BAR ranges ([`Device::map_bar`], `MAP_BAR`) as [`mmio::Mmio`] windows.
//! - [`Device::bind_msix`] turns one MSI-X table entry into an event-channel port
//!   (`PHYSDEVOP_map_pirq`, then `EVTCHNOP_bind_pirq`) and enables MSI-X in the capability's
//!   control register; [`irq::Interrupt`] gives the statistics (`IRQ_STATS`) and `EOI`.
//! - [`dma::DmaBuffer`]: zeroed, page-aligned heap pages. A device address **is** this
//!   domain's virtual address: the hypervisor programs VT-d so that the device sees exactly the
//!   domain's own pages (heap, stack, ELF) at the addresses the domain uses. Pages mapped from
//!   other domains' grants and the device window are not DMA-reachable.
//! - [`virtio`]: `virtio-drivers`' `Hal` and `ConfigurationAccess` on top of this, and the
//!   virtio-PCI setup the crate leaves out (MSI-X vectors per queue).
//!
//! Unsafe code is limited to the volatile accesses of mapped BAR windows ([`mmio`]) and the
//! heap pages of [`dma`].

use alloc::vec::Vec;

use shared_abi::errno::XenError;
pub use shared_abi::start_info::PciAddress;

use crate::hypercall;

pub mod dma;
pub mod irq;
pub mod mmio;
pub mod virtio;

/// Configuration-space registers and bits this layer uses.
pub mod reg {
    pub const VENDOR_ID: u16 = 0x00;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const CLASS_REV: u16 = 0x08;
    pub const HEADER_TYPE: u16 = 0x0e;
    pub const BAR0: u16 = 0x10;
    pub const CAP_PTR: u16 = 0x34;

    /// Command register: memory-space decode.
    pub const CMD_MEMORY: u16 = 1 << 1;
    /// Command register: bus mastering (DMA).
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
    /// Command register: legacy INTx disabled.
    pub const CMD_INTX_DISABLE: u16 = 1 << 10;
    /// Status register: the function has a capability list.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;

    /// Capability id of MSI-X.
    pub const CAP_MSIX: u8 = 0x11;
    /// Capability id of a vendor-specific capability (virtio's structures).
    pub const CAP_VENDOR: u8 = 0x09;
    /// MSI-X message control: enable.
    pub const MSIX_ENABLE: u16 = 1 << 15;
    /// MSI-X message control: function mask.
    pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
}

/// Why a device operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// The hypervisor refused (or the hypercall does not exist yet: `ENOSYS`).
    Hypercall(XenError),
    /// The function has no capability the operation needs (e.g. MSI-X).
    MissingCapability(u8),
    /// A BAR register holds no usable memory BAR (empty, I/O, or the upper half of one).
    NotMemoryBar(u8),
    /// A value read from the device is out of range (hostile or broken device).
    BadDevice(&'static str),
    /// The device refused an MSI-X vector (virtio reads back `0xffff`).
    VectorRefused { queue: Option<u16>, vector: u16 },
}

impl From<XenError> for DeviceError {
    fn from(e: XenError) -> Self {
        DeviceError::Hypercall(e)
    }
}

impl core::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DeviceError::Hypercall(e) => write!(f, "hypercall refused: {e:?}"),
            DeviceError::MissingCapability(id) => write!(f, "no capability {id:#04x}"),
            DeviceError::NotMemoryBar(i) => write!(f, "BAR{i} is not a memory BAR"),
            DeviceError::BadDevice(what) => write!(f, "device gave a bad {what}"),
            DeviceError::VectorRefused {
                queue: Some(q),
                vector,
            } => write!(f, "device refused MSI-X vector {vector} for queue {q}"),
            DeviceError::VectorRefused {
                queue: None,
                vector,
            } => write!(f, "device refused MSI-X vector {vector} for config changes"),
        }
    }
}

/// One capability in a function's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability id.
    pub id: u8,
    /// Its offset in configuration space.
    pub offset: u8,
}

/// What a BAR register says (read without sizing: the register is not written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    Io {
        port: u32,
    },
    Memory {
        address: u64,
        is_64: bool,
        prefetchable: bool,
    },
}

/// The MSI-X capability of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msix {
    pub offset: u8,
    /// Entries in the table (1..=2048).
    pub table_size: u16,
}

/// One assigned PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device {
    pub address: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    /// Base class, subclass, programming interface.
    pub class: [u8; 3],
}

/// The functions assigned to this domain (from the start info; none before the runtime ran,
/// and none on the host). A function whose identity cannot be read is left out.
pub fn assigned() -> Vec<Device> {
    crate::start_info()
        .map(|si| {
            si.devices()
                .iter()
                .filter_map(|a| Device::open(*a).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The first assigned function with this vendor id and one of `device_ids`.
pub fn find(vendor_id: u16, device_ids: &[u16]) -> Option<Device> {
    assigned()
        .into_iter()
        .find(|d| d.vendor_id == vendor_id && device_ids.contains(&d.device_id))
}

/// `bb:dd.f` of an address (segment omitted when 0).
pub fn fmt_address(a: PciAddress) -> impl core::fmt::Display {
    struct D(PciAddress);
    impl core::fmt::Display for D {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            if self.0.segment != 0 {
                write!(f, "{:04x}:", self.0.segment)?;
            }
            write!(
                f,
                "{:02x}:{:02x}.{}",
                self.0.bus,
                self.0.devfn >> 3,
                self.0.devfn & 7
            )
        }
    }
    D(a)
}

/// Most capabilities followed before a list is declared looped (48 fit in 192 bytes).
const MAX_CAPS: usize = 48;

impl Device {
    /// Read the identity of `address` (one of this domain's functions).
    pub fn open(address: PciAddress) -> Result<Device, DeviceError> {
        let id = hypercall::pci_config_read(address, reg::VENDOR_ID, 4)?;
        if id & 0xffff == 0xffff {
            return Err(DeviceError::BadDevice("vendor id"));
        }
        let class = hypercall::pci_config_read(address, reg::CLASS_REV, 4)?;
        Ok(Device {
            address,
            vendor_id: id as u16,
            device_id: (id >> 16) as u16,
            class: [(class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8],
        })
    }

    pub fn read8(&self, offset: u16) -> Result<u8, XenError> {
        hypercall::pci_config_read(self.address, offset, 1).map(|v| v as u8)
    }

    pub fn read16(&self, offset: u16) -> Result<u16, XenError> {
        hypercall::pci_config_read(self.address, offset, 2).map(|v| v as u16)
    }

    pub fn read32(&self, offset: u16) -> Result<u32, XenError> {
        hypercall::pci_config_read(self.address, offset, 4)
    }

    pub fn write8(&self, offset: u16, value: u8) -> Result<(), XenError> {
        hypercall::pci_config_write(self.address, offset, 1, u32::from(value))
    }

    pub fn write16(&self, offset: u16, value: u16) -> Result<(), XenError> {
        hypercall::pci_config_write(self.address, offset, 2, u32::from(value))
    }

    pub fn write32(&self, offset: u16, value: u32) -> Result<(), XenError> {
        hypercall::pci_config_write(self.address, offset, 4, value)
    }

    /// Turn memory decode and bus mastering on (and legacy INTx off: interrupts are MSI-X).
    /// Bus mastering is refused (`EPERM`) unless the IOMMU confines the device.
    pub fn enable(&self) -> Result<(), XenError> {
        let cmd = self.read16(reg::COMMAND)?;
        let want = cmd | reg::CMD_MEMORY | reg::CMD_BUS_MASTER | reg::CMD_INTX_DISABLE;
        if want != cmd {
            self.write16(reg::COMMAND, want)?;
        }
        Ok(())
    }

    /// Turn bus mastering off (the device can no longer DMA).
    pub fn disable_bus_master(&self) -> Result<(), XenError> {
        let cmd = self.read16(reg::COMMAND)?;
        self.write16(reg::COMMAND, cmd & !reg::CMD_BUS_MASTER)
    }

    /// The capability list. A list that loops, points into the header or is unaligned ends
    /// where it goes wrong (the device is not trusted to be well formed).
    pub fn capabilities(&self) -> Result<Vec<Capability>, XenError> {
        let mut out = Vec::new();
        if self.read16(reg::STATUS)? & reg::STATUS_CAP_LIST == 0 {
            return Ok(out);
        }
        let mut next = self.read8(reg::CAP_PTR)? & !3;
        while next >= 0x40 && out.len() < MAX_CAPS {
            let hdr = self.read16(u16::from(next))?;
            if out.iter().any(|c: &Capability| c.offset == next) {
                break;
            }
            out.push(Capability {
                id: hdr as u8,
                offset: next,
            });
            next = ((hdr >> 8) as u8) & !3;
        }
        Ok(out)
    }

    /// The first capability with `id`.
    pub fn find_capability(&self, id: u8) -> Result<Option<Capability>, XenError> {
        Ok(self.capabilities()?.into_iter().find(|c| c.id == id))
    }

    /// What BAR register `index` (0..6) holds, without sizing it; `None` if it is empty or the
    /// upper half of a 64-bit BAR cannot be told apart from an empty one.
    pub fn bar(&self, index: u8) -> Result<Option<Bar>, DeviceError> {
        if index >= 6 {
            return Err(DeviceError::NotMemoryBar(index));
        }
        let off = reg::BAR0 + 4 * u16::from(index);
        let low = self.read32(off)?;
        if low & 1 == 1 {
            return Ok(Some(Bar::Io { port: low & !3 }));
        }
        let is_64 = (low >> 1) & 3 == 2;
        let high = if is_64 {
            if index == 5 {
                return Err(DeviceError::BadDevice("64-bit BAR5"));
            }
            self.read32(off + 4)?
        } else {
            0
        };
        let address = (u64::from(high) << 32) | u64::from(low & !0xf);
        if address == 0 {
            return Ok(None);
        }
        Ok(Some(Bar::Memory {
            address,
            is_64,
            prefetchable: low & 8 != 0,
        }))
    }

    /// Map `len` bytes at `offset` into memory BAR `index` (`MAP_BAR`).
    pub fn map_bar(&self, index: u8, offset: u64, len: u64) -> Result<mmio::Mmio, DeviceError> {
        let Some(Bar::Memory { address, .. }) = self.bar(index)? else {
            return Err(DeviceError::NotMemoryBar(index));
        };
        let phys = address
            .checked_add(offset)
            .ok_or(DeviceError::BadDevice("BAR offset"))?;
        Ok(mmio::Mmio::map(phys, len)?)
    }

    /// The MSI-X capability.
    pub fn msix(&self) -> Result<Msix, DeviceError> {
        let cap = self
            .find_capability(reg::CAP_MSIX)?
            .ok_or(DeviceError::MissingCapability(reg::CAP_MSIX))?;
        let ctrl = self.read16(u16::from(cap.offset) + 2)?;
        Ok(Msix {
            offset: cap.offset,
            table_size: (ctrl & 0x7ff) + 1,
        })
    }

    /// Turn MSI-X on (function mask off) or off in the capability's control register.
    pub fn set_msix_enabled(&self, on: bool) -> Result<(), DeviceError> {
        let m = self.msix()?;
        let at = u16::from(m.offset) + 2;
        let ctrl = self.read16(at)?;
        let want = if on {
            (ctrl | reg::MSIX_ENABLE) & !reg::MSIX_FUNCTION_MASK
        } else {
            ctrl & !reg::MSIX_ENABLE
        };
        if want != ctrl {
            self.write16(at, want)?;
        }
        Ok(())
    }

    /// Route MSI-X table entry `entry` to a new event-channel port and enable MSI-X.
    pub fn bind_msix(&self, entry: u16) -> Result<irq::Interrupt, DeviceError> {
        let m = self.msix()?;
        if entry >= m.table_size {
            return Err(DeviceError::Hypercall(XenError::EINVAL));
        }
        let irq = irq::Interrupt::bind(self.address, entry)?;
        self.set_msix_enabled(true)?;
        Ok(irq)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake function's configuration space behind the hypercall mock.

    use shared_abi::hypercall as hc;
    use shared_abi::pci::{PciConfigOp, physdev};

    use super::*;
    use crate::hypercall::MOCK;
    use shared_abi::hypercall_args::Wire;

    pub static SPACE: spin::Mutex<[u8; 256]> = spin::Mutex::new([0; 256]);
    pub static LAST_MAP_PIRQ: spin::Mutex<Option<shared_abi::pci::PhysdevMapPirq>> =
        spin::Mutex::new(None);
    pub const DEV: PciAddress = PciAddress {
        segment: 0,
        bus: 0,
        devfn: 3 << 3,
    };
    pub const MAPPED_VA: u64 = shared_abi::start_info::DEVICE_MMIO_BASE + 0x5000;

    fn put(s: &mut [u8; 256], off: usize, bytes: &[u8]) {
        s[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// A virtio-blk-like function: MSI-X (4 entries) at 0x98, virtio common cfg in 64-bit
    /// BAR4 at 0xfe000000, a looping capability chain guarded against.
    pub fn install() {
        let mut s = SPACE.lock();
        *s = [0; 256];
        put(&mut s, 0, &[0xf4, 0x1a, 0x01, 0x10]);
        put(&mut s, 6, &reg::STATUS_CAP_LIST.to_le_bytes());
        put(&mut s, 8, &[0, 0, 0, 1]);
        put(&mut s, 0x14, &0xfebf_1000u32.to_le_bytes());
        put(&mut s, 0x20, &0xfe00_000cu32.to_le_bytes());
        put(&mut s, 0x24, &0u32.to_le_bytes());
        put(&mut s, 0x34, &[0x98]);
        // MSI-X: next 0x84, control table size 3 (4 entries).
        put(&mut s, 0x98, &[0x11, 0x84, 0x03, 0x00]);
        // Vendor cap cfg_type 1 (common), bar 4, offset 0, length 0x38; next 0x70.
        put(&mut s, 0x84, &[0x09, 0x70, 16, 1, 4, 0, 0, 0]);
        put(&mut s, 0x8c, &0u32.to_le_bytes());
        put(&mut s, 0x90, &0x38u32.to_le_bytes());
        // Vendor cap cfg_type 3 (ISR), bar 4 offset 0x1000; next points back at 0x98: a loop.
        put(&mut s, 0x70, &[0x09, 0x98, 16, 3, 4, 0, 0, 0]);
        put(&mut s, 0x78, &0x1000u32.to_le_bytes());
        put(&mut s, 0x7c, &0x1000u32.to_le_bytes());
        drop(s);
        *MOCK.lock() = Some(mock);
    }

    fn mock(nr: u64, a: [u64; 5]) -> i64 {
        if nr == hc::EVENT_CHANNEL_OP && a[0] == u64::from(shared_abi::event_channel::op::BIND_PIRQ)
        {
            // SAFETY: bind_pirq passes its live 12-byte argument.
            let b = unsafe { core::slice::from_raw_parts_mut(a[1] as *mut u8, 12) };
            let pirq = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            b[8..12].copy_from_slice(&(pirq + 100).to_le_bytes());
            return 0;
        }
        if nr != hc::PHYSDEV_OP {
            return XenError::ENOSYS.as_ret();
        }
        match a[0] {
            physdev::PCI_CONFIG_READ | physdev::PCI_CONFIG_WRITE => {
                // SAFETY: the config wrappers pass their live 12-byte argument.
                let b = unsafe { core::slice::from_raw_parts_mut(a[1] as *mut u8, 12) };
                let Some(mut op) = PciConfigOp::decode(b) else {
                    return XenError::EFAULT.as_ret();
                };
                if op.address() != DEV.to_pci() {
                    return XenError::ENODEV.as_ret();
                }
                let (off, size) = (op.offset as usize, op.size as usize);
                if !matches!(size, 1 | 2 | 4) || off % size != 0 || off + size > 256 {
                    return XenError::EINVAL.as_ret();
                }
                let mut s = SPACE.lock();
                if a[0] == physdev::PCI_CONFIG_READ {
                    let mut v = [0u8; 4];
                    v[..size].copy_from_slice(&s[off..off + size]);
                    op.value = u32::from_le_bytes(v);
                    op.encode(b);
                } else {
                    put(&mut s, off, &op.value.to_le_bytes()[..size]);
                }
                0
            }
            physdev::MAP_BAR => {
                // SAFETY: map_bar passes its live 24-byte argument.
                let b = unsafe { core::slice::from_raw_parts_mut(a[1] as *mut u8, 24) };
                let phys = u64::from_le_bytes(b[0..8].try_into().unwrap_or_default());
                if !(0xfe00_0000..0xfe00_4000).contains(&phys) {
                    return XenError::EPERM.as_ret();
                }
                b[16..24].copy_from_slice(&(MAPPED_VA + (phys & 0x3fff)).to_le_bytes());
                0
            }
            physdev::MAP_PIRQ => {
                // SAFETY: map_pirq passes its live 40-byte argument.
                let b = unsafe { core::slice::from_raw_parts_mut(a[1] as *mut u8, 40) };
                let op = shared_abi::pci::PhysdevMapPirq::from_bytes(b);
                *LAST_MAP_PIRQ.lock() = op;
                b[12..16].copy_from_slice(&7i32.to_le_bytes());
                0
            }
            _ => XenError::ENOSYS.as_ret(),
        }
    }

    trait ToPci {
        fn to_pci(&self) -> shared_abi::pci::PciAddress;
    }

    impl ToPci for PciAddress {
        fn to_pci(&self) -> shared_abi::pci::PciAddress {
            shared_abi::pci::PciAddress {
                segment: self.segment,
                bus: self.bus,
                device: self.devfn >> 3,
                function: self.devfn & 7,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{DEV, LAST_MAP_PIRQ, MAPPED_VA, SPACE, install};
    use super::*;
    use crate::hypercall::{MOCK, TEST_LOCK};

    #[test]
    fn open_reads_identity_and_walks_a_looping_capability_list_once() {
        let _g = TEST_LOCK.lock();
        install();
        let d = Device::open(DEV).unwrap();
        assert_eq!(
            (d.vendor_id, d.device_id, d.class),
            (0x1af4, 0x1001, [1, 0, 0])
        );
        let caps = d.capabilities().unwrap();
        let ids: Vec<(u8, u8)> = caps.iter().map(|c| (c.id, c.offset)).collect();
        assert_eq!(ids, [(0x11, 0x98), (0x09, 0x84), (0x09, 0x70)]);
        assert_eq!(
            d.msix().unwrap(),
            Msix {
                offset: 0x98,
                table_size: 4
            }
        );
        *MOCK.lock() = None;
    }

    #[test]
    fn bars_are_read_without_sizing_and_io_or_empty_bars_are_not_mapped() {
        let _g = TEST_LOCK.lock();
        install();
        let d = Device::open(DEV).unwrap();
        assert_eq!(
            d.bar(4).unwrap(),
            Some(Bar::Memory {
                address: 0xfe00_0000,
                is_64: true,
                prefetchable: true
            })
        );
        assert_eq!(d.bar(0).unwrap(), None);
        assert_eq!(d.bar(6), Err(DeviceError::NotMemoryBar(6)));
        assert!(matches!(
            d.map_bar(0, 0, 4096),
            Err(DeviceError::NotMemoryBar(0))
        ));
        let m = d.map_bar(4, 0x1000, 4).unwrap();
        assert_eq!(m.va(), MAPPED_VA + 0x1000);
        // The register was never written (no sizing).
        assert_eq!(SPACE.lock()[0x20..0x24], 0xfe00_000cu32.to_le_bytes());
        *MOCK.lock() = None;
    }

    #[test]
    fn bind_msix_maps_the_entry_binds_it_and_enables_msix_unmasked() {
        let _g = TEST_LOCK.lock();
        install();
        SPACE.lock()[0x9b] = 0x40; // function mask set
        let d = Device::open(DEV).unwrap();
        assert!(matches!(
            d.bind_msix(4),
            Err(DeviceError::Hypercall(XenError::EINVAL))
        ));
        let irq = d.bind_msix(2).unwrap();
        assert_eq!((irq.pirq(), irq.port()), (7, 107));
        let op = LAST_MAP_PIRQ.lock().unwrap();
        assert_eq!(op.entry_nr, 2);
        assert_eq!(op.devfn, 3 << 3);
        assert_eq!(op.index, -1);
        assert_eq!(op.domid, shared_abi::domid::DOMID_SELF);
        assert_eq!(op.map_type, shared_abi::pci::physdev::MAP_PIRQ_TYPE_MSI_SEG);
        let ctrl = {
            let s = SPACE.lock();
            u16::from_le_bytes([s[0x9a], s[0x9b]])
        };
        assert_eq!(
            ctrl & (reg::MSIX_ENABLE | reg::MSIX_FUNCTION_MASK),
            reg::MSIX_ENABLE
        );
        *MOCK.lock() = None;
    }

    #[test]
    fn refused_hypercalls_surface_as_errors() {
        let _g = TEST_LOCK.lock();
        *MOCK.lock() = None;
        assert_eq!(
            Device::open(DEV),
            Err(DeviceError::Hypercall(XenError::ENOSYS))
        );
        assert!(assigned().is_empty());
        assert_eq!(
            alloc::format!("{}", fmt_address(DEV)),
            "00:03.0".to_string()
        );
    }
}
