//! `virtio-drivers` on Bulkhead: its [`Hal`] ([`DomHal`]) and PCI [`ConfigurationAccess`]
//! ([`ConfigAccess`]) on top of this module's device layer, and the part of virtio-PCI setup the
//! crate leaves out.
//!
//! ```ignore
//! let dev = device::find(0x1af4, &[0x1001, 0x1042]).ok_or(..)?;
//! let pci = VirtioPci::open(dev)?;                // decode + bus master on, regions mapped
//! let irq = pci.device().bind_msix(0)?;           // MSI-X entry 0 -> event channel
//! let t = pci.transport()?.with_queue_vector(0, irq.entry());
//! let mut blk = VirtIOBlk::<DomHal, _>::new(t)?;  // queue 0 -> entry 0 set during init
//! assert_eq!(pci.queue_vector(0)?, irq.entry());
//! ```
//!
//! Two things `virtio-drivers` 0.13 leaves out, done by [`VirtioTransport`], a wrapper around
//! its `PciTransport`:
//!
//! - It never writes `queue_msix_vector` (nor `msix_config`); with MSI-X enabled a device only
//!   interrupts for a queue whose vector is set. The wrapper writes the vector configured with
//!   [`VirtioTransport::with_queue_vector`] whenever the driver sets the queue up (so again
//!   after every reset, which forgets the vectors), through this layer's own mapping of the
//!   common configuration structure. [`VirtioPci::set_queue_vector`] does it by hand.
//! - It does not accept `VIRTIO_F_ACCESS_PLATFORM`. A device behind an IOMMU offers it (QEMU:
//!   `iommu_platform=on`; without it QEMU's virtio DMA bypasses the IOMMU altogether) and
//!   refuses `FEATURES_OK` from a driver that does not accept it. Bulkhead's DMA always goes
//!   through the IOMMU, so the wrapper accepts the bit whenever it is offered.

use alloc::vec::Vec;
use core::ptr::NonNull;

use shared_abi::errno::XenError;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::{PciTransport, VirtioPciError};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::dma::{DmaBuffer, device_addr, is_dma_window};
use super::irq::Interrupt;
use super::mmio::Mmio;
use super::{Device, DeviceError, PciAddress, reg};
use crate::hypercall;

/// `virtio_pci_cap.cfg_type` values.
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI: u8 = 5;
}

/// Offsets in `virtio_pci_common_cfg`.
pub mod common {
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// Bytes of the structure this layer touches.
    pub const LEN: u64 = 0x38;
    /// "No vector" (and the device's answer when it refuses one).
    pub const NO_VECTOR: u16 = 0xffff;
    /// `device_status` bit: the device hit an error and needs a reset.
    pub const STATUS_NEEDS_RESET: u8 = 0x40;
    /// `device_status` bit: the driver gave up on the device.
    pub const STATUS_FAILED: u8 = 0x80;
}

/// The HAL `virtio-drivers` needs: DMA memory is heap pages and a device address is the
/// virtual address (see [`super::dma`]); BAR regions are mapped with `MAP_BAR`.
#[derive(Debug)]
pub struct DomHal;

// SAFETY: dma_alloc returns zeroed, page-aligned pages owned by nobody else until dma_dealloc
// (DmaBuffer); mmio_phys_to_virt returns a hypervisor mapping of the device window, which holds
// no Rust objects; share returns the address the IOMMU maps to the buffer itself.
unsafe impl Hal for DomHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match DmaBuffer::new(pages) {
            Ok(b) => {
                let (p, _) = b.into_raw();
                (device_addr(p.as_ptr() as u64), p)
            }
            // virtio-drivers treats a zero device address as allocation failure.
            Err(_) => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the caller passes back what dma_alloc returned, i.e. DmaBuffer::into_raw's
        // pointer and page count.
        drop(unsafe { DmaBuffer::from_raw(vaddr, pages) });
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // VirtioPci::open mapped every region the transport asks for, so this only looks the
        // mapping up again (MAP_BAR answers the same address for pages already mapped). A
        // refusal here means the transport was built some other way: there is no error path
        // in the trait, and handing back a bad pointer would be worse than stopping.
        match Mmio::map(paddr, size as u64) {
            Ok(m) => match NonNull::new(m.va() as *mut u8) {
                Some(p) => p,
                None => panic!("MAP_BAR answered a null address"),
            },
            Err(e) => panic!("MAP_BAR {paddr:#x}+{size:#x} refused: {e:?}"),
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let va = buffer.as_ptr() as *mut u8 as u64;
        if !is_dma_window(va, buffer.len() as u64) {
            log::warn!(
                "dma: buffer {va:#x}+{:#x} is not this domain's own memory; the IOMMU will block the device",
                buffer.len()
            );
        }
        device_addr(va)
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // The device wrote the buffer itself: nothing to copy back.
    }
}

/// `virtio-drivers`' view of configuration space: the `PCI_CONFIG_READ/WRITE` hypercalls on
/// one segment. The hypervisor filters every access; a refused read reads as all ones (like
/// an absent function) and a refused write is logged and dropped.
#[derive(Debug)]
pub struct ConfigAccess {
    segment: u16,
}

impl ConfigAccess {
    pub fn new(segment: u16) -> ConfigAccess {
        ConfigAccess { segment }
    }

    fn address(&self, df: DeviceFunction) -> PciAddress {
        PciAddress {
            segment: self.segment,
            bus: df.bus,
            devfn: (df.device << 3) | (df.function & 7),
        }
    }
}

impl ConfigurationAccess for ConfigAccess {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        hypercall::pci_config_read(self.address(df), u16::from(offset), 4).unwrap_or(u32::MAX)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        if let Err(e) = hypercall::pci_config_write(self.address(df), u16::from(offset), 4, data) {
            log::warn!(
                "pci: write {data:#x} at {offset:#x} of {} refused: {e:?}",
                super::fmt_address(self.address(df))
            );
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        ConfigAccess {
            segment: self.segment,
        }
    }
}

/// The `DeviceFunction` of an address (the segment goes to [`ConfigAccess::new`]).
pub fn device_function(a: PciAddress) -> DeviceFunction {
    DeviceFunction {
        bus: a.bus,
        device: a.devfn >> 3,
        function: a.devfn & 7,
    }
}

/// One `virtio_pci_cap` (a vendor capability naming a structure inside a BAR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    pub cfg_type: u8,
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// The virtio structures a function's capability list names (the first of each type, as the
/// specification says), ignoring malformed ones.
pub fn virtio_caps(dev: &Device) -> Result<Vec<VirtioCap>, XenError> {
    let mut out: Vec<VirtioCap> = Vec::new();
    for c in dev.capabilities()? {
        if c.id != reg::CAP_VENDOR {
            continue;
        }
        let at = u16::from(c.offset);
        let hdr = dev.read32(at)?;
        let (cap_len, cfg_type) = ((hdr >> 16) as u8, (hdr >> 24) as u8);
        if cap_len < 16 || out.iter().any(|v| v.cfg_type == cfg_type) {
            continue;
        }
        out.push(VirtioCap {
            cfg_type,
            bar: dev.read8(at + 4)?,
            offset: dev.read32(at + 8)?,
            length: dev.read32(at + 12)?,
        });
    }
    Ok(out)
}

/// A virtio-PCI function ready for `virtio-drivers`: decode and bus mastering on, every
/// structure it names mapped, and the common configuration reachable for the MSI-X vectors.
#[derive(Debug)]
pub struct VirtioPci {
    dev: Device,
    common: Mmio,
}

impl VirtioPci {
    /// Prepare `dev`. Bus mastering is refused unless the IOMMU confines the device.
    pub fn open(dev: Device) -> Result<VirtioPci, DeviceError> {
        dev.enable()?;
        let mut common = None;
        for c in virtio_caps(&dev)? {
            if !matches!(
                c.cfg_type,
                cfg_type::COMMON | cfg_type::NOTIFY | cfg_type::ISR | cfg_type::DEVICE
            ) {
                continue;
            }
            let m = dev.map_bar(c.bar, u64::from(c.offset), u64::from(c.length))?;
            if c.cfg_type == cfg_type::COMMON {
                if m.len() < common::LEN {
                    return Err(DeviceError::BadDevice("common config length"));
                }
                common = Some(m);
            }
        }
        let common = common.ok_or(DeviceError::MissingCapability(reg::CAP_VENDOR))?;
        Ok(VirtioPci { dev, common })
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// A `virtio-drivers` transport for the function (each call makes a new one; dropping a
    /// transport resets the device).
    pub fn transport(&self) -> Result<VirtioTransport, VirtioPciError> {
        let mut root = PciRoot::new(ConfigAccess::new(self.dev.address.segment));
        let inner = PciTransport::new::<DomHal, _>(&mut root, device_function(self.dev.address))?;
        Ok(VirtioTransport {
            inner,
            common: self.common.clone(),
            offered: 0,
            vectors: [common::NO_VECTOR; MAX_ROUTED_QUEUES],
        })
    }

    /// `queue_msix_vector` of `queue` as the device holds it now.
    pub fn queue_vector(&self, queue: u16) -> Result<u16, XenError> {
        self.common.write::<u16>(common::QUEUE_SELECT, queue)?;
        self.common.read::<u16>(common::QUEUE_MSIX_VECTOR)
    }

    /// Route queue `queue`'s interrupts to `irq`'s MSI-X entry. Call after the driver's
    /// initialisation and after every reset.
    pub fn route_queue(&self, queue: u16, irq: &Interrupt) -> Result<(), DeviceError> {
        self.set_queue_vector(queue, irq.entry())
    }

    /// Write `queue_msix_vector` of `queue` and check the device took it.
    pub fn set_queue_vector(&self, queue: u16, vector: u16) -> Result<(), DeviceError> {
        self.common.write::<u16>(common::QUEUE_SELECT, queue)?;
        self.common
            .write::<u16>(common::QUEUE_MSIX_VECTOR, vector)?;
        let got = self.common.read::<u16>(common::QUEUE_MSIX_VECTOR)?;
        if got != vector {
            return Err(DeviceError::VectorRefused {
                queue: Some(queue),
                vector,
            });
        }
        Ok(())
    }

    /// Write `msix_config` (configuration-change interrupts; [`common::NO_VECTOR`] for none).
    pub fn set_config_vector(&self, vector: u16) -> Result<(), DeviceError> {
        self.common.write::<u16>(common::MSIX_CONFIG, vector)?;
        let got = self.common.read::<u16>(common::MSIX_CONFIG)?;
        if got != vector {
            return Err(DeviceError::VectorRefused {
                queue: None,
                vector,
            });
        }
        Ok(())
    }

    /// `device_status` (see [`common::STATUS_NEEDS_RESET`]).
    pub fn device_status(&self) -> Result<u8, XenError> {
        self.common.read::<u8>(common::DEVICE_STATUS)
    }

    /// Number of queues the device offers.
    pub fn num_queues(&self) -> Result<u16, XenError> {
        self.common.read::<u16>(common::NUM_QUEUES)
    }

    /// Reset the device (status 0) and wait until it reads back 0, at most `spins` reads.
    /// Whether it completed.
    pub fn reset(&self, spins: u32) -> Result<bool, XenError> {
        self.common.write::<u8>(common::DEVICE_STATUS, 0)?;
        for _ in 0..spins {
            if self.device_status()? == 0 {
                return Ok(true);
            }
            core::hint::spin_loop();
        }
        Ok(false)
    }
}

/// `VIRTIO_F_ACCESS_PLATFORM`: the device's DMA goes through the platform's IOMMU.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// Queues a [`VirtioTransport`] can route to MSI-X vectors.
pub const MAX_ROUTED_QUEUES: usize = 8;

/// `virtio-drivers`' PCI transport with the two additions described in the module
/// documentation (MSI-X vector per queue, `VIRTIO_F_ACCESS_PLATFORM`).
#[derive(Debug)]
pub struct VirtioTransport {
    inner: PciTransport,
    common: Mmio,
    offered: u64,
    vectors: [u16; MAX_ROUTED_QUEUES],
}

impl VirtioTransport {
    /// Route queue `queue` to MSI-X table entry `vector` from its next setup on (queues past
    /// [`MAX_ROUTED_QUEUES`] are ignored).
    pub fn with_queue_vector(mut self, queue: u16, vector: u16) -> Self {
        if let Some(v) = self.vectors.get_mut(usize::from(queue)) {
            *v = vector;
        }
        self
    }

    fn route(&self, queue: u16) {
        let Some(&vector) = self.vectors.get(usize::from(queue)) else {
            return;
        };
        if vector == common::NO_VECTOR {
            return;
        }
        let r = self
            .common
            .write::<u16>(common::QUEUE_SELECT, queue)
            .and_then(|_| self.common.write::<u16>(common::QUEUE_MSIX_VECTOR, vector))
            .and_then(|_| self.common.read::<u16>(common::QUEUE_MSIX_VECTOR));
        match r {
            Ok(v) if v == vector => {}
            other => log::error!("virtio: queue {queue} refused MSI-X vector {vector}: {other:?}"),
        }
    }
}

impl Transport for VirtioTransport {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.offered = self.inner.read_device_features();
        self.offered
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner
            .write_driver_features(driver_features | (self.offered & F_ACCESS_PLATFORM));
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue);
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status);
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size);
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        // The vector first: a queue is enabled (last step of queue_set) with its vector set.
        self.route(queue);
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{DEV, MAPPED_VA, SPACE, install};
    use super::*;
    use crate::hypercall::{MOCK, TEST_LOCK};

    #[test]
    fn virtio_caps_are_parsed_first_of_each_type_and_short_ones_skipped() {
        let _g = TEST_LOCK.lock();
        install();
        let d = Device::open(DEV).unwrap();
        let caps = virtio_caps(&d).unwrap();
        assert_eq!(
            caps,
            [
                VirtioCap {
                    cfg_type: 1,
                    bar: 4,
                    offset: 0,
                    length: 0x38
                },
                VirtioCap {
                    cfg_type: 3,
                    bar: 4,
                    offset: 0x1000,
                    length: 0x1000
                }
            ]
        );
        *MOCK.lock() = None;
    }

    #[test]
    fn open_enables_decode_and_bus_master_and_maps_the_structures() {
        let _g = TEST_LOCK.lock();
        install();
        let d = Device::open(DEV).unwrap();
        let p = VirtioPci::open(d).unwrap();
        assert_eq!(p.common.va(), MAPPED_VA);
        let cmd = {
            let s = SPACE.lock();
            u16::from_le_bytes([s[4], s[5]])
        };
        assert_eq!(
            cmd,
            reg::CMD_MEMORY | reg::CMD_BUS_MASTER | reg::CMD_INTX_DISABLE
        );
        // A common structure too short for the registers this layer writes is refused.
        SPACE.lock()[0x90] = 0x10;
        assert_eq!(
            VirtioPci::open(d).map(|_| ()),
            Err(DeviceError::BadDevice("common config length"))
        );
        // A structure in a BAR the hypervisor will not map: the refusal comes back.
        SPACE.lock()[0x90] = 0x38;
        SPACE.lock()[0x8d] = 0x40; // offset 0x4000: outside the mock's BAR
        assert_eq!(
            VirtioPci::open(d).map(|_| ()),
            Err(DeviceError::Hypercall(XenError::EPERM))
        );
        *MOCK.lock() = None;
    }

    #[test]
    fn config_access_reads_all_ones_when_refused_and_addresses_the_function() {
        let _g = TEST_LOCK.lock();
        install();
        let mut a = ConfigAccess::new(0);
        let df = device_function(DEV);
        assert_eq!((df.bus, df.device, df.function), (0, 3, 0));
        assert_eq!(a.read_word(df, 0), 0x1001_1af4);
        a.write_word(df, 0x3c, 0x0000_010b);
        assert_eq!(SPACE.lock()[0x3c], 0x0b);
        let other = DeviceFunction {
            bus: 0,
            device: 4,
            function: 0,
        };
        assert_eq!(a.read_word(other, 0), u32::MAX);
        a.write_word(other, 4, 6); // refused: logged, not fatal
        // SAFETY: only used for reads here.
        let b = unsafe { a.unsafe_clone() };
        assert_eq!(b.read_word(df, 8), 0x0100_0000);
        *MOCK.lock() = None;
    }

    #[test]
    fn hal_memory_is_zeroed_aligned_and_identity_mapped() {
        let (pa, va) = DomHal::dma_alloc(3, BufferDirection::Both);
        assert_eq!(pa, va.as_ptr() as u64);
        assert_eq!(pa % 4096, 0);
        // SAFETY: 3 pages were just allocated at `va`.
        let s = unsafe { core::slice::from_raw_parts(va.as_ptr(), 3 * 4096) };
        assert!(s.iter().all(|&b| b == 0));
        let mut buf = [0u8; 16];
        let nn = NonNull::from(&mut buf[..]);
        // SAFETY: `buf` is live and not otherwise accessed during the calls.
        unsafe {
            assert_eq!(
                DomHal::share(nn, BufferDirection::DeviceToDriver),
                buf.as_ptr() as u64
            );
            DomHal::unshare(pa, nn, BufferDirection::DeviceToDriver);
            assert_eq!(DomHal::dma_dealloc(pa, va, 3), 0);
        }
        let (pa, _) = DomHal::dma_alloc(usize::MAX / 2, BufferDirection::Both);
        assert_eq!(pa, 0);
    }
}
