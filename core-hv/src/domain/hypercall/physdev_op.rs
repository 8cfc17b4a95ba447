//! `physdev_op` (hypercall 33) for driver domains: Bulkhead's PCI configuration-space, BAR
//! mapping and IRQ statistics sub-ops (`shared_abi::pci::physdev`), and Xen's `map_pirq`,
//! `unmap_pirq` and `eoi` for MSI-X entries. Other Xen sub-ops are `-ENOSYS`.
//!
//! Order of checks: the sub-op, then the right (`device_owner`, `-EPERM`, before the argument
//! is even read, so a domain without it learns nothing), then the argument (`-EFAULT`, and
//! `-EINVAL` for non-zero padding or fields out of range), then ownership (`-ENODEV` for a
//! function the caller does not own, `-EPERM` for a range outside its BARs or on its MSI-X
//! table, `-EINVAL` for a pirq it does not hold).

use shared_abi::errno::XenError;
use shared_abi::pci::{
    BarMapOp, IrqStatsOp, PciAddress as AbiAddress, PciConfigOp, PhysdevEoi, PhysdevMapPirq,
    PhysdevUnmapPirq, physdev,
};
use shared_abi::start_info::{DEVICE_MMIO_BASE, DEVICE_MMIO_END};

use super::evtchn_op::read_abi;
use super::{Call, HcResult};
use crate::domain::MmioMapping;
use crate::domain::memory::{Mfn, PAGE_SIZE, PagePerms, ReservedFrames};
use crate::pci::PciAddress;
use crate::policy;

/// Most BAR mappings one domain may hold (each a run of pages).
const MAX_MMIO_MAPPINGS: usize = 256;

impl Call<'_, '_> {
    pub(super) fn physdev_op(&mut self, cmd: u64, arg: u64) -> HcResult {
        match cmd {
            physdev::PCI_CONFIG_READ | physdev::PCI_CONFIG_WRITE => self.pci_config(cmd, arg),
            physdev::MAP_BAR => self.map_bar(arg),
            physdev::IRQ_STATS => self.irq_stats(arg),
            physdev::MAP_PIRQ => self.map_pirq(arg),
            physdev::UNMAP_PIRQ => self.unmap_pirq(arg),
            physdev::EOI => self.pirq_eoi(arg),
            _ => Err(XenError::ENOSYS),
        }
    }

    fn pci_config(&mut self, cmd: u64, arg: u64) -> HcResult {
        let token = policy::device_owner(self.caller())?;
        let mut op: PciConfigOp = self.read(arg)?;
        if op.pad != 0 {
            return Err(XenError::EINVAL);
        }
        let pci = self.hv.pci.as_mut().ok_or(XenError::ENODEV)?;
        if cmd == physdev::PCI_CONFIG_READ {
            op.value = pci.read(&token, op.address(), op.offset, op.size)?;
            self.write(arg, &op)?;
        } else {
            pci.write(&token, op.address(), op.offset, op.size, op.value)?;
        }
        Ok(0)
    }

    /// Map a run of one of the caller's BARs uncached into its device window (or find the
    /// mapping it already has of exactly those pages).
    fn map_bar(&mut self, arg: u64) -> HcResult {
        let token = policy::device_owner(self.caller())?;
        let mut op = read_abi!(self, BarMapOp, arg);
        let pci = self.hv.pci.as_ref().ok_or(XenError::ENODEV)?;
        pci.bar_window(&token, op.phys, op.len)?;
        let first = op.phys & !(PAGE_SIZE - 1);
        // bar_window checked phys + len does not wrap and lies in a BAR below 2^64.
        let end = (op.phys + op.len).next_multiple_of(PAGE_SIZE);
        let pages = (end - first) / PAGE_SIZE;
        let d = self.hv.domains.get_mut(self.dom).ok_or(XenError::ESRCH)?;
        let existing = d
            .mmio
            .iter()
            .find(|m| m.phys == first && m.pages == pages)
            .map(|m| m.va);
        let va = match existing {
            Some(va) => va,
            None => {
                if d.mmio.len() >= MAX_MMIO_MAPPINGS {
                    return Err(XenError::ENOSPC);
                }
                let va = d
                    .mmio
                    .iter()
                    .map(|m| m.va + m.pages * PAGE_SIZE)
                    .max()
                    .unwrap_or(DEVICE_MMIO_BASE);
                if va
                    .checked_add(pages * PAGE_SIZE)
                    .is_none_or(|e| e > DEVICE_MMIO_END)
                {
                    return Err(XenError::ENOSPC);
                }
                let aspace = d.aspace.as_mut().ok_or(XenError::ESRCH)?;
                let mut tables = ReservedFrames {
                    reservation: &mut d.reservation,
                    pool: &mut *self.p.frames,
                };
                let perms = PagePerms::USER_RW | PagePerms::UNCACHED;
                for i in 0..pages {
                    let page = va + i * PAGE_SIZE;
                    let frame = Mfn((first >> 12) + i);
                    if let Err(e) = aspace.map(page, frame, perms, &mut tables) {
                        // All or nothing.
                        for j in 0..i {
                            aspace.unmap(va + j * PAGE_SIZE);
                        }
                        return Err(e.errno());
                    }
                }
                d.mmio.push(MmioMapping {
                    va,
                    phys: first,
                    pages,
                });
                va
            }
        };
        op.va = va + (op.phys - first);
        self.bytes_out(arg, &op.to_bytes())?;
        Ok(0)
    }

    fn irq_stats(&mut self, arg: u64) -> HcResult {
        policy::device_owner(self.caller())?;
        let mut op = read_abi!(self, IrqStatsOp, arg);
        if op.pad != 0 {
            return Err(XenError::EINVAL);
        }
        let s = self.hv.irqs.get(self.dom, op.pirq)?.stats;
        op.raised = s.raised;
        op.delivered = s.delivered;
        op.storms = s.storms;
        op.last_tsc = s.last_tsc;
        self.bytes_out(arg, &op.to_bytes())?;
        Ok(0)
    }

    /// The function a `physdev_map_pirq` names, checking Xen's fields.
    fn map_pirq_address(op: &PhysdevMapPirq) -> Result<PciAddress, XenError> {
        let (segment, bus) = match op.map_type {
            physdev::MAP_PIRQ_TYPE_MSI => (0u32, u32::try_from(op.bus).ok()),
            physdev::MAP_PIRQ_TYPE_MSI_SEG => {
                let b = u32::try_from(op.bus).map_err(|_| XenError::EINVAL)?;
                (b >> 16, Some(b & 0xffff))
            }
            _ => return Err(XenError::EINVAL),
        };
        let bus = bus
            .and_then(|b| u8::try_from(b).ok())
            .ok_or(XenError::EINVAL)?;
        let devfn = u8::try_from(op.devfn).map_err(|_| XenError::EINVAL)?;
        let segment = u16::try_from(segment).map_err(|_| XenError::EINVAL)?;
        Ok(AbiAddress {
            segment,
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        })
    }

    fn map_pirq(&mut self, arg: u64) -> HcResult {
        let token = policy::device_owner(self.caller())?;
        let mut op = read_abi!(self, PhysdevMapPirq, arg);
        if self.resolve(op.domid) != self.dom {
            // Mapping for another domain is a toolstack's right Bulkhead does not offer.
            return Err(XenError::EPERM);
        }
        if op.pad != 0 || op.index != -1 {
            return Err(XenError::EINVAL);
        }
        let address = Self::map_pirq_address(&op)?;
        let entry = u16::try_from(op.entry_nr).map_err(|_| XenError::EINVAL)?;
        let pci = self.hv.pci.as_mut().ok_or(XenError::ENODEV)?;
        let table = pci.msix_table(&token, address)?;
        if entry >= table.entries {
            return Err(XenError::EINVAL);
        }
        let fresh = !self.hv.irqs.mapped_entry(self.dom, address, entry);
        let pirq = self.hv.irqs.map(self.dom, address, entry)?;
        let vector = self.hv.irqs.get(self.dom, pirq)?.vector;
        if let Err(e) = pci.msix_program(self.dom, address, entry, Some(vector)) {
            if fresh {
                let _ = self.hv.irqs.unmap(self.dom, pirq);
            }
            return Err(e);
        }
        op.pirq = pirq as i32;
        if let Err(e) = self.bytes_out(arg, &op.to_bytes()) {
            if fresh {
                self.forget_pirq(pirq);
            }
            return Err(e);
        }
        Ok(0)
    }

    /// Mask the entry, free the vector, close the port that received it.
    fn forget_pirq(&mut self, pirq: u32) {
        let Ok(p) = self.hv.irqs.unmap(self.dom, pirq) else {
            return;
        };
        if let Some(pci) = self.hv.pci.as_mut() {
            let _ = pci.msix_program(self.dom, p.address, p.entry, None);
        }
        if let Some(port) = p.port
            && let Some(e) = self
                .hv
                .domains
                .get(self.dom)
                .and_then(|d| d.evtchn.as_ref())
        {
            e.lock().close_pirq_port(port, pirq);
        }
    }

    fn unmap_pirq(&mut self, arg: u64) -> HcResult {
        policy::device_owner(self.caller())?;
        let op = read_abi!(self, PhysdevUnmapPirq, arg);
        if self.resolve(op.domid) != self.dom {
            return Err(XenError::EPERM);
        }
        if op.pad != 0 {
            return Err(XenError::EINVAL);
        }
        let pirq = u32::try_from(op.pirq).map_err(|_| XenError::EINVAL)?;
        self.hv.irqs.get(self.dom, pirq)?;
        self.forget_pirq(pirq);
        Ok(0)
    }

    fn pirq_eoi(&mut self, arg: u64) -> HcResult {
        policy::device_owner(self.caller())?;
        let op = read_abi!(self, PhysdevEoi, arg);
        if let Some(u) = self.hv.irqs.eoi(self.dom, op.irq, self.now)?
            && let Some(pci) = self.hv.pci.as_mut()
        {
            pci.msix_mask(u.owner, u.address, u.entry, false);
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use alloc::boxed::Box;
    use alloc::vec::Vec;

    use shared_abi::DomId;
    use shared_abi::capability::Capabilities;
    use shared_abi::errno::XenError;
    use shared_abi::hypercall as hc;
    use shared_abi::pci::{
        BarMapOp, IrqStatsOp, PciConfigOp, PhysdevMapPirq, PhysdevUnmapPirq, physdev,
    };
    use shared_abi::start_info::HEAP_BASE;

    use crate::domain::builder::DomainConfig;
    use crate::domain::elf::testelf;
    use crate::domain::fake::Env;
    use crate::domain::guest_memory::GuestMemory;
    use crate::domain::hypervisor::{HvConfig, Hypervisor};
    use crate::pci::assign::Assignment;
    use crate::pci::enumerate::enumerate;
    use crate::pci::fake::{FakeConfig, FakeFunction, bdf};
    use crate::pci::filter::ConfigFilter;
    use crate::pci::owner::Filtered;

    /// Domain 0 is the driver (device_owner, owns 00:03.0), 1 holds device_owner but owns
    /// nothing, 2 holds no right.
    struct T {
        env: Env,
        hv: Hypervisor,
        ids: Vec<DomId>,
    }

    fn cfg(name: &str, caps: Capabilities) -> DomainConfig {
        DomainConfig {
            name: name.into(),
            memory_kib: 1024,
            vcpus: 1,
            weight: 256,
            cap_percent: 0,
            capabilities: caps,
            cmdline: alloc::string::String::new(),
            devices: Vec::new(),
            console_evtchn: 0,
            xenstore_evtchn: 0,
            stack_pages: 4,
        }
    }

    fn setup(with_pci: bool) -> T {
        let mut env = Env::new(4096);
        let mut hv = Hypervisor::new(3, HvConfig::default(), 0);
        let elf = testelf::good();
        let mut ids = Vec::new();
        for (n, caps) in [
            ("drv", Capabilities::DEVICE_OWNER),
            ("other", Capabilities::DEVICE_OWNER),
            ("guest", Capabilities::empty()),
        ] {
            ids.push(
                hv.build_domain(&mut env.platform(), &cfg(n, caps), &elf)
                    .unwrap(),
            );
        }
        for cpu in 0..3 {
            hv.schedule(&mut env.platform(), cpu);
        }
        if with_pci {
            let mut pci = FakeConfig::default();
            pci.add(
                bdf(0, 3, 0),
                FakeFunction::endpoint(0x1af4, 0x1001, [1, 0, 0]),
            );
            pci.add(
                bdf(0, 4, 0),
                FakeFunction::endpoint(0x8086, 0x10d3, [2, 0, 0]),
            );
            let (fs, _) = enumerate(&mut pci, 0, 0..=255, true);
            let filter = ConfigFilter::new(
                &fs,
                &[Assignment {
                    address: bdf(0, 3, 0),
                    owner: ids[0],
                    insecure_dma: false,
                }],
            );
            hv.pci = Some(Box::new(Filtered {
                filter,
                cfg: pci,
                msix: Vec::new(),
            }));
        }
        T { env, hv, ids }
    }

    impl T {
        fn cpu_of(&self, dom: DomId) -> usize {
            (0..3)
                .find(|&c| {
                    self.hv
                        .sched
                        .current(c)
                        .and_then(|v| self.hv.sched.owner(v))
                        .is_some_and(|(d, _)| d == dom)
                })
                .expect("domain not running")
        }

        fn mem(&self, dom: DomId) -> GuestMemory<'_> {
            let a = self.hv.domains.get(dom).unwrap().aspace.as_deref().unwrap();
            GuestMemory::new(a, &self.env.phys)
        }

        /// Put `op` at the heap base of domain `who`, make the call, return (ret, op after).
        fn op(&mut self, who: usize, cmd: u64, op: PciConfigOp) -> (i64, PciConfigOp) {
            let dom = self.ids[who];
            self.mem(dom).write(HEAP_BASE, &op).unwrap();
            let cpu = self.cpu_of(dom);
            let r = self.hv.hypercall(
                &mut self.env.platform(),
                cpu,
                hc::PHYSDEV_OP,
                [cmd, HEAP_BASE, 0, 0, 0],
            );
            (r.ret, self.mem(dom).read(HEAP_BASE).unwrap())
        }
    }

    fn at(device: u8, offset: u16, size: u8, value: u32) -> PciConfigOp {
        PciConfigOp {
            segment: 0,
            bus: 0,
            devfn: device << 3,
            offset,
            size,
            pad: 0,
            value,
        }
    }

    #[test]
    fn owner_reads_its_function_ids() {
        let mut t = setup(true);
        let (r, op) = t.op(0, physdev::PCI_CONFIG_READ, at(3, 0, 4, 0));
        assert_eq!(r, 0);
        assert_eq!(op.value, 0x1001_1af4);
        let (r, op) = t.op(0, physdev::PCI_CONFIG_READ, at(3, 2, 2, 0));
        assert_eq!((r, op.value), (0, 0x1001));
    }

    #[test]
    fn other_functions_are_enodev_and_rightless_domains_eperm() {
        let mut t = setup(true);
        let (r, op) = t.op(1, physdev::PCI_CONFIG_READ, at(3, 0, 4, 7));
        assert_eq!(r, XenError::ENODEV.as_ret());
        assert_eq!(op.value, 7, "a refused read leaves the argument alone");
        let (r, _) = t.op(0, physdev::PCI_CONFIG_READ, at(4, 0, 4, 0));
        assert_eq!(r, XenError::ENODEV.as_ret());
        let (r, _) = t.op(2, physdev::PCI_CONFIG_READ, at(3, 0, 4, 0));
        assert_eq!(r, XenError::EPERM.as_ret());
        let (r, _) = t.op(2, physdev::PCI_CONFIG_WRITE, at(3, 4, 2, 0));
        assert_eq!(r, XenError::EPERM.as_ret());
    }

    #[test]
    fn bus_mastering_without_confinement_is_refused_and_memory_decode_allowed() {
        let mut t = setup(true);
        let (r, _) = t.op(0, physdev::PCI_CONFIG_WRITE, at(3, 4, 2, 0x4));
        assert_eq!(r, XenError::EPERM.as_ret());
        let (r, _) = t.op(0, physdev::PCI_CONFIG_WRITE, at(3, 4, 2, 0x2));
        assert_eq!(r, 0);
        let (_, op) = t.op(0, physdev::PCI_CONFIG_READ, at(3, 4, 2, 0));
        assert_eq!(op.value & 0x7, 0x2);
    }

    #[test]
    fn malformed_arguments_are_refused() {
        let mut t = setup(true);
        let (r, _) = t.op(0, physdev::PCI_CONFIG_READ, at(3, 1, 2, 0));
        assert_eq!(r, XenError::EINVAL.as_ret());
        let (r, _) = t.op(0, physdev::PCI_CONFIG_READ, at(3, 0, 3, 0));
        assert_eq!(r, XenError::EINVAL.as_ret());
        let (r, _) = t.op(0, physdev::PCI_CONFIG_READ, at(3, 4096, 4, 0));
        assert_eq!(r, XenError::EINVAL.as_ret());
        let mut padded = at(3, 0, 4, 0);
        padded.pad = 1;
        let (r, _) = t.op(0, physdev::PCI_CONFIG_READ, padded);
        assert_eq!(r, XenError::EINVAL.as_ret());
        let (r, _) = t.op(0, physdev::PCI_CONFIG_WRITE, at(3, 0x40, 1, 0x100));
        assert_eq!(r, XenError::EINVAL.as_ret());
        let (r, _) = t.op(0, 1, at(3, 0, 4, 0));
        assert_eq!(r, XenError::ENOSYS.as_ret());
        let dom = t.ids[0];
        let cpu = t.cpu_of(dom);
        let r = t.hv.hypercall(
            &mut t.env.platform(),
            cpu,
            hc::PHYSDEV_OP,
            [physdev::PCI_CONFIG_READ, 0x10, 0, 0, 0],
        );
        assert_eq!(r.ret, XenError::EFAULT.as_ret());
    }

    /// Records the DMA hooks; refuses unmaps when told to.
    struct DmaLog {
        log: std::sync::Arc<spin::Mutex<Vec<(DomId, bool, u64)>>>,
        refuse_unmap: bool,
    }

    impl crate::pci::owner::OwnerConfig for DmaLog {
        fn read(
            &self,
            _: &crate::policy::DeviceToken,
            _: crate::pci::PciAddress,
            _: u16,
            _: u8,
        ) -> Result<u32, XenError> {
            Err(XenError::ENODEV)
        }
        fn write(
            &mut self,
            _: &crate::policy::DeviceToken,
            _: crate::pci::PciAddress,
            _: u16,
            _: u8,
            _: u32,
        ) -> Result<(), XenError> {
            Err(XenError::ENODEV)
        }
        fn release(&mut self, dom: DomId) {
            self.log.lock().push((dom, false, u64::MAX));
        }
        fn dma_map(&mut self, dom: DomId, pages: &[(u64, u64, bool)]) {
            self.log
                .lock()
                .extend(pages.iter().map(|&(va, _, _)| (dom, true, va)));
        }
        fn dma_unmap(&mut self, dom: DomId, vas: &[u64]) -> bool {
            self.log
                .lock()
                .extend(vas.iter().map(|&va| (dom, false, va)));
            !self.refuse_unmap
        }
        fn as_any(&mut self) -> &mut dyn core::any::Any {
            self
        }
    }

    /// Give back (`decrease`) or take again the last heap page of domain `who`.
    fn reservation(t: &mut T, who: usize, op: u64) -> (i64, u64) {
        use shared_abi::hypercall::memory_op;
        use shared_abi::hypercall_args::XenMemoryReservation;
        use shared_abi::start_info::HEAP_END;
        let dom = t.ids[who];
        let last = {
            let d = t.hv.domains.get(dom).unwrap();
            *d.pages
                .keys()
                .filter(|&&va| (HEAP_BASE..HEAP_END).contains(&va))
                .max()
                .unwrap()
        };
        let page = if op == memory_op::DECREASE_RESERVATION {
            last
        } else {
            last + 4096
        };
        let scratch = HEAP_BASE;
        t.mem(dom)
            .copy_to_guest(scratch, &(page / 4096).to_le_bytes())
            .unwrap();
        let r = XenMemoryReservation {
            extent_start: scratch,
            nr_extents: 1,
            extent_order: 0,
            mem_flags: 0,
            domid: shared_abi::domid::DOMID_SELF,
            pad: [0; 3],
        };
        t.mem(dom).write(scratch + 64, &r).unwrap();
        let cpu = t.cpu_of(dom);
        let ret =
            t.hv.hypercall(
                &mut t.env.platform(),
                cpu,
                hc::MEMORY_OP,
                [op, scratch + 64, 0, 0, 0],
            )
            .ret;
        (ret, page)
    }

    #[test]
    fn pages_given_back_leave_the_dma_view_first_and_new_pages_join_it() {
        use shared_abi::hypercall::memory_op;
        let mut t = setup(false);
        let log = std::sync::Arc::new(spin::Mutex::new(Vec::new()));
        t.hv.pci = Some(Box::new(DmaLog {
            log: log.clone(),
            refuse_unmap: false,
        }));
        let (r, page) = reservation(&mut t, 0, memory_op::DECREASE_RESERVATION);
        assert_eq!(r, 1);
        assert_eq!(*log.lock(), [(t.ids[0], false, page)]);
        log.lock().clear();
        let (r, page) = reservation(&mut t, 0, memory_op::INCREASE_RESERVATION);
        assert_eq!(r, 1);
        assert_eq!(*log.lock(), [(t.ids[0], true, page)]);
    }

    #[test]
    fn a_dying_domain_loses_its_devices_once_and_others_keep_theirs() {
        let mut t = setup(false);
        let log = std::sync::Arc::new(spin::Mutex::new(Vec::new()));
        t.hv.pci = Some(Box::new(DmaLog {
            log: log.clone(),
            refuse_unmap: false,
        }));
        let dom = t.ids[0];
        t.hv.destroy_domain(&mut t.env.platform(), dom);
        t.hv.destroy_domain(&mut t.env.platform(), dom);
        assert_eq!(*log.lock(), [(dom, false, u64::MAX)]);
    }

    #[test]
    fn a_page_the_iommu_cannot_forget_is_not_given_back() {
        use shared_abi::hypercall::memory_op;
        let mut t = setup(false);
        t.hv.pci = Some(Box::new(DmaLog {
            log: std::sync::Arc::new(spin::Mutex::new(Vec::new())),
            refuse_unmap: true,
        }));
        let dom = t.ids[0];
        let used = t.hv.domains.get(dom).unwrap().reservation.used();
        let (r, page) = reservation(&mut t, 0, memory_op::DECREASE_RESERVATION);
        assert_eq!(r, 0);
        let d = t.hv.domains.get(dom).unwrap();
        assert!(d.pages.contains_key(&page));
        assert_eq!(d.reservation.used(), used);
    }

    #[test]
    fn without_pci_every_owner_call_is_enodev() {
        let mut t = setup(false);
        let (r, _) = t.op(0, physdev::PCI_CONFIG_READ, at(3, 0, 4, 0));
        assert_eq!(r, XenError::ENODEV.as_ret());
        let (r, _) = t.op(2, physdev::PCI_CONFIG_READ, at(3, 0, 4, 0));
        assert_eq!(r, XenError::EPERM.as_ret());
    }

    /// `setup(false)` plus 00:05.0 owned by domain 0: BAR1 (4 KiB) holds the MSI-X table
    /// (2 entries) and PBA, BAR4 (16 KiB, 64-bit) is free to map.
    fn setup_msix() -> T {
        use crate::pci::caps::id;
        let mut t = setup(false);
        let mut pci = FakeConfig::default();
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, [1, 0, 0]);
        f.mem_bar(1, 0xfe10_0000, 0x1000, false, false);
        f.mem_bar(4, 0x8_0000_0000, 0x4000, true, true);
        f.caps(&[(0x98, id::MSIX, 0)]);
        f.set16(0x9a, 1);
        f.set32(0x9c, 1);
        f.set32(0xa0, 0x800 | 1);
        pci.add(bdf(0, 5, 0), f);
        let (fs, _) = enumerate(&mut pci, 0, 0..=255, true);
        let filter = ConfigFilter::new(
            &fs,
            &[Assignment {
                address: bdf(0, 5, 0),
                owner: t.ids[0],
                insecure_dma: false,
            }],
        );
        t.hv.pci = Some(Box::new(Filtered {
            filter,
            cfg: pci,
            msix: Vec::new(),
        }));
        t
    }

    impl T {
        /// Put `bytes` at the heap base of domain `who`, make `physdev_op(cmd)`, return
        /// (ret, the bytes after).
        fn raw(&mut self, who: usize, hcall: u64, cmd: u64, bytes: &[u8]) -> (i64, Vec<u8>) {
            let dom = self.ids[who];
            self.mem(dom).copy_to_guest(HEAP_BASE, bytes).unwrap();
            let cpu = self.cpu_of(dom);
            let r = self.hv.hypercall(
                &mut self.env.platform(),
                cpu,
                hcall,
                [cmd, HEAP_BASE, 0, 0, 0],
            );
            let mut out = alloc::vec![0u8; bytes.len()];
            self.mem(dom).copy_from_guest(HEAP_BASE, &mut out).unwrap();
            (r.ret, out)
        }

        fn map_bar(&mut self, who: usize, phys: u64, len: u64) -> (i64, u64) {
            let op = BarMapOp { phys, len, va: 0 };
            let (r, out) = self.raw(who, hc::PHYSDEV_OP, physdev::MAP_BAR, &op.to_bytes());
            (r, BarMapOp::from_bytes(&out).unwrap().va)
        }

        fn map_pirq(&mut self, who: usize, op: PhysdevMapPirq) -> (i64, i32) {
            let (r, out) = self.raw(who, hc::PHYSDEV_OP, physdev::MAP_PIRQ, &op.to_bytes());
            (r, PhysdevMapPirq::from_bytes(&out).unwrap().pirq)
        }

        fn bind_pirq(&mut self, who: usize, pirq: u32) -> (i64, u32) {
            use shared_abi::event_channel::{EvtchnBindPirq, op};
            let b = EvtchnBindPirq {
                pirq,
                flags: 0,
                port: 0,
            };
            let (r, out) = self.raw(
                who,
                hc::EVENT_CHANNEL_OP,
                u64::from(op::BIND_PIRQ),
                &b.to_bytes(),
            );
            (r, EvtchnBindPirq::from_bytes(&out).unwrap().port)
        }

        fn pending(&self, dom: DomId, port: u32) -> bool {
            let si = self.hv.domains.get(dom).unwrap().shared_info;
            let w = self
                .env
                .frame_bytes(si, 0x800 + (port as usize / 64) * 8, 8);
            u64::from_le_bytes(w.try_into().unwrap()) & (1 << (port % 64)) != 0
        }

        fn msix_log(&mut self) -> Vec<(crate::pci::PciAddress, u16, Option<u8>)> {
            // The fake is the only OwnerConfig these tests install.
            let pci = self.hv.pci.as_mut().unwrap();
            let any: &mut dyn core::any::Any = pci.as_any();
            any.downcast_mut::<Filtered<FakeConfig>>()
                .unwrap()
                .msix
                .clone()
        }
    }

    fn msi(entry: i32) -> PhysdevMapPirq {
        PhysdevMapPirq {
            domid: shared_abi::domid::DOMID_SELF,
            pad: 0,
            map_type: physdev::MAP_PIRQ_TYPE_MSI,
            index: -1,
            pirq: -1,
            bus: 0,
            devfn: 5 << 3,
            entry_nr: entry,
            table_base: 0,
        }
    }

    #[test]
    fn bar_pages_map_uncached_once_and_the_msix_table_never() {
        use crate::domain::memory::PagePerms;
        use shared_abi::start_info::DEVICE_MMIO_BASE;
        let mut t = setup_msix();
        let (r, va) = t.map_bar(0, 0x8_0000_0010, 0x20);
        assert_eq!(r, 0);
        assert_eq!(va, DEVICE_MMIO_BASE + 0x10);
        let dom = t.ids[0];
        let (frame, perms) =
            t.hv.domains
                .get(dom)
                .unwrap()
                .aspace
                .as_ref()
                .unwrap()
                .translate(DEVICE_MMIO_BASE)
                .unwrap();
        assert_eq!(frame.0, 0x8_0000_0000 >> 12);
        assert!(perms.contains(PagePerms::UNCACHED | PagePerms::WRITE));
        // The same pages again: the same address; the whole BAR: a new run after it.
        assert_eq!(t.map_bar(0, 0x8_0000_0000, 0x1000), (0, DEVICE_MMIO_BASE));
        assert_eq!(
            t.map_bar(0, 0x8_0000_0000, 0x4000),
            (0, DEVICE_MMIO_BASE + 0x1000)
        );
        // MSI-X table page, outside any BAR, other domains, no right, a hypercall argument
        // in device memory.
        assert_eq!(t.map_bar(0, 0xfe10_0000, 4).0, XenError::EPERM.as_ret());
        assert_eq!(t.map_bar(0, 0x10_0000, 4).0, XenError::EPERM.as_ret());
        assert_eq!(t.map_bar(0, 0x8_0000_0000, 0).0, XenError::EINVAL.as_ret());
        assert_eq!(t.map_bar(1, 0x8_0000_0000, 4).0, XenError::ENODEV.as_ret());
        assert_eq!(t.map_bar(2, 0x8_0000_0000, 4).0, XenError::EPERM.as_ret());
        let cpu = t.cpu_of(dom);
        let r = t.hv.hypercall(
            &mut t.env.platform(),
            cpu,
            hc::PHYSDEV_OP,
            [physdev::MAP_BAR, DEVICE_MMIO_BASE, 0, 0, 0],
        );
        assert_eq!(r.ret, XenError::EFAULT.as_ret());
        // Death unmaps the device pages and frees every frame the domain had.
        let free_before = crate::domain::memory::FrameSource::free_frames(&t.env.frames).unwrap();
        let held = t.hv.domains.get(dom).unwrap().reservation.used();
        t.hv.destroy_domain(&mut t.env.platform(), dom);
        for cpu in 0..3 {
            t.hv.schedule(&mut t.env.platform(), cpu);
            t.hv.address_space_loaded(&mut t.env.platform(), cpu, None);
        }
        assert_eq!(
            crate::domain::memory::FrameSource::free_frames(&t.env.frames).unwrap(),
            free_before + held
        );
    }

    #[test]
    fn an_msix_entry_becomes_an_event_and_goes_with_unmap_and_death() {
        let mut t = setup_msix();
        let dom = t.ids[0];
        let (r, pirq) = t.map_pirq(0, msi(1));
        assert_eq!(r, 0);
        let pirq = pirq as u32;
        let vector = t.hv.irqs.get(dom, pirq).unwrap().vector;
        assert_eq!(t.msix_log(), [(bdf(0, 5, 0), 1, Some(vector))]);
        // Mapping again is idempotent; the other entry gets another vector.
        assert_eq!(t.map_pirq(0, msi(1)), (0, pirq as i32));
        let (r, pirq0) = t.map_pirq(0, msi(0));
        assert_eq!(r, 0);
        assert_ne!(pirq0 as u32, pirq);
        // Not bound yet: counted, nothing pending anywhere.
        t.hv.device_interrupt(&mut t.env.platform(), vector, 11);
        let (r, port) = t.bind_pirq(0, pirq);
        assert_eq!(r, 0);
        assert!(!t.pending(dom, port));
        assert_eq!(t.bind_pirq(0, pirq).0, XenError::EEXIST.as_ret());
        assert_eq!(t.bind_pirq(1, pirq).0, XenError::EINVAL.as_ret());
        assert_eq!(t.bind_pirq(2, pirq).0, XenError::EPERM.as_ret());
        t.hv.device_interrupt(&mut t.env.platform(), vector, 42);
        assert!(t.pending(dom, port));
        let stats = IrqStatsOp {
            pirq,
            ..IrqStatsOp::default()
        };
        let (r, out) = t.raw(0, hc::PHYSDEV_OP, physdev::IRQ_STATS, &stats.to_bytes());
        let s = IrqStatsOp::from_bytes(&out).unwrap();
        assert_eq!((r, s.raised, s.delivered, s.last_tsc), (0, 2, 1, 42));
        assert_eq!(
            t.raw(1, hc::PHYSDEV_OP, physdev::IRQ_STATS, &stats.to_bytes())
                .0,
            XenError::EINVAL.as_ret()
        );
        // Unmap: entry masked, port closed, the vector is stray afterwards.
        let un = PhysdevUnmapPirq {
            domid: shared_abi::domid::DOMID_SELF,
            pad: 0,
            pirq: pirq as i32,
        };
        assert_eq!(
            t.raw(1, hc::PHYSDEV_OP, physdev::UNMAP_PIRQ, &un.to_bytes())
                .0,
            XenError::EINVAL.as_ret()
        );
        assert_eq!(
            t.raw(0, hc::PHYSDEV_OP, physdev::UNMAP_PIRQ, &un.to_bytes())
                .0,
            0
        );
        assert_eq!(t.msix_log().last(), Some(&(bdf(0, 5, 0), 1, None)));
        assert!(
            !t.pending(dom, port),
            "the closed port's pending bit is cleared"
        );
        assert_eq!(t.hv.device_interrupt(&mut t.env.platform(), vector, 0).0, 0);
        // Death frees the rest.
        assert_eq!(t.hv.irqs.mapped(), 1);
        t.hv.destroy_domain(&mut t.env.platform(), dom);
        assert_eq!(t.hv.irqs.mapped(), 0);
    }

    #[test]
    fn map_pirq_refuses_bad_fields_and_foreign_functions() {
        let mut t = setup_msix();
        let bad = [
            (
                PhysdevMapPirq {
                    map_type: 1,
                    ..msi(0)
                },
                XenError::EINVAL,
            ),
            (PhysdevMapPirq { index: 0, ..msi(0) }, XenError::EINVAL),
            (PhysdevMapPirq { pad: 1, ..msi(0) }, XenError::EINVAL),
            (PhysdevMapPirq { bus: 256, ..msi(0) }, XenError::EINVAL),
            (PhysdevMapPirq { bus: -1, ..msi(0) }, XenError::EINVAL),
            (
                PhysdevMapPirq {
                    devfn: 300,
                    ..msi(0)
                },
                XenError::EINVAL,
            ),
            (
                PhysdevMapPirq {
                    entry_nr: 2,
                    ..msi(0)
                },
                XenError::EINVAL,
            ),
            (
                PhysdevMapPirq {
                    entry_nr: -1,
                    ..msi(0)
                },
                XenError::EINVAL,
            ),
            (
                PhysdevMapPirq {
                    devfn: 3 << 3,
                    ..msi(0)
                },
                XenError::ENODEV,
            ),
            (PhysdevMapPirq { domid: 2, ..msi(0) }, XenError::EPERM),
            (
                PhysdevMapPirq {
                    map_type: physdev::MAP_PIRQ_TYPE_MSI_SEG,
                    bus: 1 << 16,
                    ..msi(0)
                },
                XenError::ENODEV,
            ),
        ];
        for (op, e) in bad {
            assert_eq!(t.map_pirq(0, op).0, e.as_ret(), "{op:?}");
        }
        assert_eq!(t.map_pirq(1, msi(0)).0, XenError::ENODEV.as_ret());
        assert_eq!(t.map_pirq(2, msi(0)).0, XenError::EPERM.as_ret());
        assert_eq!(t.hv.irqs.mapped(), 0);
        assert!(t.msix_log().is_empty());
    }
}
