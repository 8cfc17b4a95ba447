//! `domctl` `BOOT_DOMAIN_INFO` and `REBUILD_BOOT_DOMAIN` (Bulkhead): a control domain reads a
//! boot domain's manifest entry (name, current domain, lifecycle policies) and rebuilds it
//! through the boot builder ([`crate::domain::boot`]). Needs `DOMAIN_CONTROL`, asked before
//! any entry is looked at.

use shared_abi::errno::XenError;
use shared_abi::hypercall_args::Wire;
use shared_abi::hypercall_args::domctl::{self as dc, BootDomain};

use super::{Call, HcResult};
use crate::domain::boot::BootEntry;
use crate::policy;

fn describe(index: usize, e: &BootEntry, nr: usize) -> BootDomain {
    let mut b = BootDomain {
        index: index as u32,
        domid: e.domid.unwrap_or(dc::BOOT_NO_DOMAIN),
        on_poweroff: e.spec.on_poweroff.code(),
        on_reboot: e.spec.on_reboot.code(),
        on_crash: e.spec.on_crash.code(),
        nr_boot_domains: nr as u32,
        ..BootDomain::default()
    };
    b.set_name(&e.spec.name);
    b
}

impl Call<'_, '_> {
    /// `buf` is the whole domctl (header + payload) already copied in from `arg`.
    pub(super) fn boot_domain(&mut self, cmd: u32, arg: u64, buf: &mut [u8]) -> HcResult {
        let token = policy::boot_domains(self.caller())?;
        let req =
            BootDomain::decode(buf.get(16..).ok_or(XenError::EFAULT)?).ok_or(XenError::EFAULT)?;
        let boot = self.hv.boot.as_ref().ok_or(XenError::ESRCH)?;
        let index = if req.index == dc::BOOT_BY_NAME {
            let name = req.name().ok_or(XenError::EINVAL)?;
            boot.index_of(name).ok_or(XenError::ESRCH)?
        } else {
            req.index as usize
        };
        if index >= boot.entries.len() {
            return Err(XenError::ESRCH);
        }
        let ret = if cmd == dc::REBUILD_BOOT_DOMAIN {
            let (id, kicks) = self.hv.rebuild_boot_domain(self.p, token.caller(), index)?;
            self.kick(kicks);
            i64::from(id)
        } else {
            0
        };
        let boot = self.hv.boot.as_ref().ok_or(XenError::ESRCH)?;
        let e = boot.entries.get(index).ok_or(XenError::ESRCH)?;
        let out = describe(index, e, boot.entries.len());
        if let Some(dst) = buf.get_mut(16..) {
            out.encode(dst);
        }
        self.mem()?.copy_to_guest(arg, buf)?;
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use alloc::boxed::Box;
    use alloc::string::String;
    use alloc::vec::Vec;

    use shared_abi::DomId;
    use shared_abi::capability::Capabilities;
    use shared_abi::domain_config::LifecycleAction;
    use shared_abi::errno::XenError;
    use shared_abi::event_channel::virq;
    use shared_abi::hypercall as hc;
    use shared_abi::hypercall_args::Wire;
    use shared_abi::hypercall_args::domctl::{self as dc, BootDomain, DomctlHeader};
    use shared_abi::manifest::{Blob, DomainSpec};
    use shared_abi::start_info::{HEAP_BASE, PciAddress};
    use spin::Mutex;

    use crate::domain::boot::{BootDevices, BootEntry, BootSet};
    use crate::domain::builder::DomainConfig;
    use crate::domain::elf::testelf;
    use crate::domain::fake::{self, Env};
    use crate::domain::guest_memory::GuestMemory;
    use crate::domain::hypervisor::{HvConfig, Hypervisor};
    use crate::domain::{Domain, DomainState, ExitReason, ShutdownReason};

    const ARG: u64 = HEAP_BASE;

    fn spec(name: &str, caps: Capabilities) -> DomainSpec {
        DomainSpec {
            name: name.into(),
            elf: Blob { offset: 0, len: 0 },
            memory_kib: 1024,
            vcpus: 1,
            weight: 256,
            cap_percent: 0,
            capabilities: caps,
            cmdline: String::new(),
            devices: Vec::new(),
            on_poweroff: LifecycleAction::Destroy,
            on_reboot: LifecycleAction::Destroy,
            on_crash: LifecycleAction::Destroy,
        }
    }

    /// What the fake device layer was asked.
    static BUILT: Mutex<Vec<(usize, DomId)>> = Mutex::new(Vec::new());

    struct FakeDevices {
        refuse: bool,
    }

    impl BootDevices for FakeDevices {
        fn devices_for(&self, _index: usize) -> Result<Vec<PciAddress>, String> {
            if self.refuse {
                Err("no IOMMU".into())
            } else {
                Ok(alloc::vec![PciAddress {
                    segment: 0,
                    bus: 0,
                    devfn: 0x18
                }])
            }
        }
        fn built(&mut self, index: usize, dom: &Domain) {
            BUILT.lock().push((index, dom.id));
        }
    }

    /// Boot domains: 1 "ctl" (DOMAIN_CONTROL + death events), 2 "plain" (no rights),
    /// 3 "drv" (on_crash restart, a device), 4 "keep" (on_crash preserve); one CPU each.
    fn system(refuse_devices: bool) -> (Env, Hypervisor) {
        let mut env = Env::new(8192);
        let mut hv = Hypervisor::new(4, HvConfig::default(), 0);
        let elf: &'static [u8] = Box::leak(testelf::good().into_boxed_slice());
        let mut drv = spec("drv", Capabilities::DEVICE_OWNER);
        drv.on_crash = LifecycleAction::Restart;
        drv.devices = alloc::vec![shared_abi::pci::DeviceAssignment {
            select: shared_abi::pci::DeviceMatch::Id {
                vendor: 0x1af4,
                device: None
            },
            insecure_dma: false,
        }];
        let mut keep = spec("keep", Capabilities::empty());
        keep.on_crash = LifecycleAction::Preserve;
        let specs = [
            spec(
                "ctl",
                Capabilities::DOMAIN_CONTROL | Capabilities::DOMAIN_DEATH_EVENTS,
            ),
            spec("plain", Capabilities::empty()),
            drv,
            keep,
        ];
        let mut set = BootSet {
            entries: Vec::new(),
            devices: Some(Box::new(FakeDevices {
                refuse: refuse_devices,
            })),
        };
        for s in specs {
            let id = hv
                .build_domain(&mut env.platform(), &DomainConfig::from_spec(&s), elf)
                .unwrap();
            set.entries.push(BootEntry {
                spec: s,
                elf,
                domid: Some(id),
                rebuilds: 0,
            });
        }
        hv.boot = Some(Box::new(set));
        for cpu in 0..4 {
            hv.schedule(&mut env.platform(), cpu);
        }
        (env, hv)
    }

    fn call(
        env: &mut Env,
        hv: &mut Hypervisor,
        dom: DomId,
        cmd: u32,
        req: BootDomain,
    ) -> (i64, BootDomain) {
        let cpu = (0..4)
            .find(|&c| {
                hv.sched
                    .current(c)
                    .and_then(|v| hv.sched.owner(v))
                    .is_some_and(|(d, _)| d == dom)
            })
            .unwrap();
        let mut p = [0u8; BootDomain::SIZE];
        req.encode(&mut p);
        let (r, out) = fake::domctl(env, hv, dom, cpu, ARG, cmd, 0, &p);
        (r, BootDomain::decode(&out[16..]).unwrap())
    }

    fn by_index(i: u32) -> BootDomain {
        BootDomain {
            index: i,
            ..BootDomain::default()
        }
    }

    fn by_name(n: &str) -> BootDomain {
        let mut b = BootDomain {
            index: dc::BOOT_BY_NAME,
            ..BootDomain::default()
        };
        b.set_name(n);
        b
    }

    #[test]
    fn info_names_the_entry_its_domain_and_policies() {
        let (mut env, mut hv) = system(false);
        let (r, b) = call(&mut env, &mut hv, 1, dc::BOOT_DOMAIN_INFO, by_index(2));
        assert_eq!(r, 0);
        assert_eq!((b.index, b.domid, b.nr_boot_domains), (2, 3, 4));
        assert_eq!(b.name(), Some("drv"));
        assert_eq!(
            (b.on_poweroff, b.on_reboot, b.on_crash),
            (0, 0, LifecycleAction::Restart.code())
        );
        let (r, b) = call(&mut env, &mut hv, 1, dc::BOOT_DOMAIN_INFO, by_name("keep"));
        assert_eq!((r, b.index, b.domid), (0, 3, 4));
        assert_eq!(b.on_crash, LifecycleAction::Preserve.code());
    }

    #[test]
    fn without_domain_control_both_ops_are_eperm() {
        let (mut env, mut hv) = system(false);
        for cmd in [dc::BOOT_DOMAIN_INFO, dc::REBUILD_BOOT_DOMAIN] {
            for req in [by_index(2), by_index(99), by_name("ctl")] {
                let (r, _) = call(&mut env, &mut hv, 2, cmd, req);
                assert_eq!(r, XenError::EPERM.as_ret());
            }
        }
        assert_eq!(hv.domains.get(3).unwrap().state(), DomainState::Running);
    }

    #[test]
    fn bad_index_and_unknown_or_garbled_names_are_refused() {
        let (mut env, mut hv) = system(false);
        for cmd in [dc::BOOT_DOMAIN_INFO, dc::REBUILD_BOOT_DOMAIN] {
            for i in [4, 64, dc::BOOT_BY_NAME - 1] {
                let (r, _) = call(&mut env, &mut hv, 1, cmd, by_index(i));
                assert_eq!(r, XenError::ESRCH.as_ret());
            }
            let (r, _) = call(&mut env, &mut hv, 1, cmd, by_name("nobody"));
            assert_eq!(r, XenError::ESRCH.as_ret());
            let mut bad = by_name("x");
            bad.name[0] = 0xff;
            let (r, _) = call(&mut env, &mut hv, 1, cmd, bad);
            assert_eq!(r, XenError::EINVAL.as_ret());
        }
        // A system without a boot set answers ESRCH too.
        hv.boot = None;
        let (r, _) = call(&mut env, &mut hv, 1, dc::BOOT_DOMAIN_INFO, by_index(0));
        assert_eq!(r, XenError::ESRCH.as_ret());
    }

    #[test]
    fn a_running_boot_domain_is_not_rebuilt() {
        let (mut env, mut hv) = system(false);
        let (r, _) = call(&mut env, &mut hv, 1, dc::REBUILD_BOOT_DOMAIN, by_index(1));
        assert_eq!(r, XenError::EBUSY.as_ret());
        assert_eq!(hv.domains.get(2).unwrap().state(), DomainState::Running);
    }

    #[test]
    fn a_crashed_driver_domain_is_rebuilt_with_a_new_id_and_its_devices() {
        let (mut env, mut hv) = system(false);
        let port = fake::bind_virq(&mut env, &mut hv, 1, 0, ARG, virq::DOM_EXC);
        hv.crash(&mut env.platform(), 3);
        fake::clear_pending(&env, &hv, 1, port);
        assert!(!hv.domains.get(3).unwrap().state().is_alive());
        let before = BUILT.lock().len();
        let (r, b) = call(
            &mut env,
            &mut hv,
            1,
            dc::REBUILD_BOOT_DOMAIN,
            by_name("drv"),
        );
        assert_eq!(r, 5, "the next domain id");
        assert_eq!((b.domid, b.index), (5, 2));
        let d = hv.domains.get(5).unwrap();
        assert_eq!(d.name, "drv");
        assert_eq!(d.state(), DomainState::Running);
        assert_eq!(d.devices.len(), 1);
        assert!(BUILT.lock()[before..].contains(&(2, 5)));
        let e = &hv.boot.as_ref().unwrap().entries[2];
        assert_eq!((e.domid, e.rebuilds), (Some(5), 1));
        // The control domain hears of it (and so does a xenstore domain, which then finds
        // the new domain's offered port by listing).
        assert!(fake::event_pending(&env, &hv, 1, port));
        // Running again: a second rebuild is refused.
        let (r, _) = call(&mut env, &mut hv, 1, dc::REBUILD_BOOT_DOMAIN, by_index(2));
        assert_eq!(r, XenError::EBUSY.as_ret());
    }

    #[test]
    fn preserve_keeps_a_crashed_domain_until_it_is_rebuilt() {
        let (mut env, mut hv) = system(false);
        hv.shutdown_domain(
            &mut env.platform(),
            4,
            ExitReason::RemoteShutdown {
                by: 2,
                reason: ShutdownReason::Crash,
            },
        );
        let d = hv.domains.get(4).unwrap();
        assert_eq!(d.state(), DomainState::Shutdown(ShutdownReason::Crash));
        assert!(d.reservation.used() > 0, "memory kept for inspection");
        // A poweroff is not preserved (on_poweroff = destroy): "plain" goes at once.
        hv.shutdown_domain(
            &mut env.platform(),
            2,
            ExitReason::Shutdown(ShutdownReason::Poweroff),
        );
        assert!(!hv.domains.get(2).unwrap().state().is_alive());
        let (r, _) = call(&mut env, &mut hv, 1, dc::REBUILD_BOOT_DOMAIN, by_index(3));
        assert_eq!(r, 5);
        assert!(
            !hv.domains.get(4).unwrap().state().is_alive(),
            "old one destroyed first"
        );
        assert_eq!(
            hv.domains.get(4).unwrap().exit,
            Some(ExitReason::RemoteShutdown {
                by: 2,
                reason: ShutdownReason::Crash
            })
        );
    }

    #[test]
    fn devices_that_cannot_be_assigned_refuse_the_rebuild() {
        let (mut env, mut hv) = system(true);
        hv.crash(&mut env.platform(), 3);
        let (r, b) = call(&mut env, &mut hv, 1, dc::REBUILD_BOOT_DOMAIN, by_index(2));
        assert_eq!(r, XenError::ENODEV.as_ret());
        assert_eq!(b.domid, dc::BOOT_NO_DOMAIN);
        assert_eq!(hv.domains.iter().count(), 4, "nothing built");
    }

    #[test]
    fn rebuilt_domains_return_every_frame_when_they_die() {
        let (mut env, mut hv) = system(false);
        let before = env.frames.outstanding();
        let held = hv.domains.get(2).unwrap().reservation.used() as usize;
        hv.crash(&mut env.platform(), 2);
        // Its CPU moves on, so its memory can go back.
        hv.schedule(&mut env.platform(), 1);
        hv.address_space_loaded(&mut env.platform(), 1, None);
        assert_eq!(env.frames.outstanding(), before - held);
        // "plain" is rebuilt although its policy is destroy: policies are the caller's.
        let (r, _) = call(&mut env, &mut hv, 1, dc::REBUILD_BOOT_DOMAIN, by_index(1));
        assert_eq!(r, 5);
        assert_eq!(env.frames.outstanding(), before);
        hv.crash(&mut env.platform(), 5);
        assert_eq!(env.frames.outstanding(), before - held);
    }

    #[test]
    fn the_cause_of_death_is_in_the_domain_list() {
        use crate::domain::FaultInfo;
        use shared_abi::hypercall_args::domctl::{DomainInfo, ListDomains};
        let (mut env, mut hv) = system(false);
        hv.shutdown_domain(
            &mut env.platform(),
            2,
            ExitReason::Shutdown(ShutdownReason::Poweroff),
        );
        let cpu3 = (0..4)
            .find(|&c| {
                hv.sched
                    .current(c)
                    .and_then(|v| hv.sched.owner(v))
                    .is_some_and(|(d, _)| d == 3)
            })
            .unwrap();
        hv.fault(
            &mut env.platform(),
            cpu3,
            FaultInfo {
                vector: 14,
                error_code: 7,
                rip: 0x40_0000,
                cr2: 0x40_0000,
            },
        );
        hv.shutdown_domain(
            &mut env.platform(),
            4,
            ExitReason::Shutdown(ShutdownReason::Reboot),
        );
        let out = ARG + 0x1000;
        let mut b = [0u8; dc::DOMCTL_LEN];
        DomctlHeader {
            cmd: dc::LIST_DOMAINS,
            interface_version: dc::INTERFACE_VERSION,
            domain: 0,
            pad: [0; 3],
        }
        .encode(&mut b);
        ListDomains {
            first_domain: 0,
            pad: 0,
            max_domains: 8,
            buffer: out,
        }
        .encode(&mut b[16..]);
        let a = hv.domains.get(1).unwrap().aspace.as_deref().unwrap();
        GuestMemory::new(a, &env.phys)
            .copy_to_guest(ARG, &b)
            .unwrap();
        let r = hv
            .hypercall(&mut env.platform(), 0, hc::DOMCTL, [ARG, 0, 0, 0, 0])
            .ret;
        assert_eq!(r, 4);
        let a = hv.domains.get(1).unwrap().aspace.as_deref().unwrap();
        let mut raw = alloc::vec![0u8; 4 * DomainInfo::SIZE];
        GuestMemory::new(a, &env.phys)
            .copy_from_guest(out, &mut raw)
            .unwrap();
        let infos: Vec<DomainInfo> = raw
            .chunks(DomainInfo::SIZE)
            .map(|c| DomainInfo::decode(c).unwrap())
            .collect();
        // poweroff 0, crash 3 (a fault), reboot 1; each flagged shut down.
        let reasons: Vec<(DomId, u32)> = infos[1..]
            .iter()
            .map(|i| (i.domid, i.shutdown_reason))
            .collect();
        assert_eq!(reasons, [(2, 0), (3, 3), (4, 1)]);
        for i in &infos[1..] {
            assert_ne!(i.flags & dc::DOMINF_SHUTDOWN, 0);
            assert_eq!(
                (i.flags >> dc::DOMINF_SHUTDOWN_SHIFT) & 0xff,
                i.shutdown_reason
            );
        }
        assert_eq!(infos[0].flags & dc::DOMINF_SHUTDOWN, 0);
    }
}
