//! `physdev_op` (hypercall 33): Bulkhead's PCI configuration-space sub-ops for driver
//! domains (`shared_abi::pci::physdev`). Xen's own `PHYSDEVOP_*` sub-ops are not implemented
//! (`-ENOSYS`).
//!
//! Order of checks: the sub-op, then the right (`device_owner`, `-EPERM`, before the argument
//! is even read, so a domain without it learns nothing), then the argument (`-EFAULT`, and
//! `-EINVAL` for non-zero padding), then the config filter (`-ENODEV` for a function the caller
//! does not own, `-EINVAL`/`-EPERM`/`-EBUSY` for the access itself).

use shared_abi::errno::XenError;
use shared_abi::pci::{PciConfigOp, physdev};

use super::{Call, HcResult};
use crate::policy;

impl Call<'_, '_> {
    pub(super) fn physdev_op(&mut self, cmd: u64, arg: u64) -> HcResult {
        if cmd != physdev::PCI_CONFIG_READ && cmd != physdev::PCI_CONFIG_WRITE {
            return Err(XenError::ENOSYS);
        }
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
}

#[cfg(test)]
mod tests {
    use alloc::boxed::Box;
    use alloc::vec::Vec;

    use shared_abi::DomId;
    use shared_abi::capability::Capabilities;
    use shared_abi::errno::XenError;
    use shared_abi::hypercall as hc;
    use shared_abi::pci::{PciConfigOp, physdev};
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
            hv.pci = Some(Box::new(Filtered { filter, cfg: pci }));
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
}
