//! `domctl` `CREATE_DOMAIN` (Bulkhead): a control domain builds a domain at run time from an
//! ELF image and a command line in its own memory, through the same builder as boot domains
//! (one builder, not two). Needs `DOMAIN_CONTROL`, asked before anything else is looked at.
//!
//! Everything in the request is hostile: sizes are bounded before any copy, the image is
//! copied out of the caller's memory through the checked accessor (so it cannot change under
//! the builder), and the builder validates the ELF and the config as it does at boot.
//! Capabilities that would let the new domain control others or serve xenstore, or own
//! devices (no run-time device assignment), are refused: a toolstack cannot mint authority it
//! does not need to hand out.

use alloc::string::String;
use alloc::vec::Vec;

use shared_abi::capability::Capabilities;
use shared_abi::errno::XenError;
use shared_abi::hypercall_args::Wire;
use shared_abi::hypercall_args::domctl::{self as dc, CreateDomain};
use shared_abi::manifest::{
    MAX_CMDLINE_LEN, MAX_MEMORY_KIB, MAX_VCPUS, MAX_WEIGHT, MIN_MEMORY_KIB,
};
use shared_abi::start_info::DEFAULT_STACK_PAGES;

use super::{Call, HcResult};
use crate::domain::DomainState;
use crate::domain::boot::build_errno;
use crate::domain::builder::DomainConfig;
use crate::policy;

/// Capabilities `CREATE_DOMAIN` never grants.
pub const NOT_GRANTABLE: Capabilities = Capabilities::DOMAIN_CONTROL
    .union(Capabilities::XENSTORE_SERVICE)
    .union(Capabilities::DEVICE_OWNER);

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// The checks that need no memory access: the fields of the request.
fn check(req: &CreateDomain) -> Result<Capabilities, XenError> {
    let caps = Capabilities::from_bits(req.capabilities).ok_or(XenError::EINVAL)?;
    if caps.intersects(NOT_GRANTABLE) {
        return Err(XenError::EPERM);
    }
    if !req.name().is_some_and(valid_name) {
        return Err(XenError::EINVAL);
    }
    if req.elf_len == 0 {
        return Err(XenError::EINVAL);
    }
    if req.elf_len > dc::MAX_CREATE_ELF {
        return Err(XenError::E2BIG);
    }
    if req.cmdline_len as usize > MAX_CMDLINE_LEN
        || !(MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&req.memory_kib)
        || !(1..=MAX_VCPUS).contains(&req.vcpus)
        || !(1..=MAX_WEIGHT).contains(&req.weight)
        || req.cap_percent > 100 * req.vcpus
        || req.flags & !dc::CREATE_FLAGS != 0
    {
        return Err(XenError::EINVAL);
    }
    Ok(caps)
}

impl Call<'_, '_> {
    /// `buf` is the whole domctl (header + payload) already copied in from `arg`.
    pub(super) fn create_domain(&mut self, arg: u64, buf: &mut [u8]) -> HcResult {
        let token = policy::toolstack(self.caller())?;
        let mut req =
            CreateDomain::decode(buf.get(16..).ok_or(XenError::EFAULT)?).ok_or(XenError::EFAULT)?;
        let caps = check(&req)?;
        let name = req.name().map(String::from).ok_or(XenError::EINVAL)?;
        let cmdline = {
            let mut b = alloc::vec![0u8; req.cmdline_len as usize];
            self.mem()?.copy_from_guest(req.cmdline_va, &mut b)?;
            String::from_utf8(b).map_err(|_| XenError::EINVAL)?
        };
        // Bounded above (MAX_CREATE_ELF); a failed reservation is the caller's ENOMEM, not
        // a hypervisor panic.
        let len = req.elf_len as usize;
        let mut elf: Vec<u8> = Vec::new();
        elf.try_reserve_exact(len).map_err(|_| XenError::ENOMEM)?;
        elf.resize(len, 0);
        self.mem()?.copy_from_guest(req.elf_va, &mut elf)?;
        let cfg = DomainConfig {
            name: name.clone(),
            memory_kib: req.memory_kib,
            vcpus: req.vcpus,
            weight: req.weight,
            cap_percent: req.cap_percent,
            capabilities: caps,
            cmdline,
            devices: Vec::new(),
            console_evtchn: 0,
            xenstore_evtchn: 0,
            stack_pages: DEFAULT_STACK_PAGES,
        };
        let build_start = self.p.clock.now_ns();
        let id = self.hv.build_domain(self.p, &cfg, &elf).map_err(|e| {
            let line = alloc::format!("(hv) domain {name:?} not created: {e}\n");
            self.p.console.write(line.as_bytes());
            build_errno(&e)
        })?;
        drop(elf);
        let build_us = self.p.clock.now_ns().saturating_sub(build_start) / 1000;
        // Its lifecycle policies: kept on shutdown for the reasons it says `preserve`.
        let preserve = req.flags & (dc::CREATE_FLAGS & !dc::CREATE_PAUSED);
        if preserve != 0 {
            self.hv.preserve.insert(id, preserve);
        }
        let mut kicks = self.hv.take_kicks();
        if req.flags & dc::CREATE_PAUSED != 0 {
            if let Some(d) = self.hv.domains.get_mut(id) {
                d.set_state(DomainState::Paused);
            }
            kicks = kicks.union(self.hv.sched.pause_domain(id, self.now));
        }
        let line = alloc::format!(
            "(hv) domain {id} ({name}) created by domain {}{} (built in {build_us} us)\n",
            token.caller(),
            if req.flags & dc::CREATE_PAUSED != 0 {
                ", paused"
            } else {
                ""
            }
        );
        self.p.console.write(line.as_bytes());
        // The xenstore domain learns of it (and its offered port) by listing domains on
        // this VIRQ, as it learns of boot domains; the control domain too.
        kicks = kicks.union(self.hv.raise_dom_exc(self.p));
        self.kick(kicks);
        req.domid = id;
        if let Some(dst) = buf.get_mut(16..) {
            req.encode(dst);
        }
        self.mem()?.copy_to_guest(arg, buf)?;
        Ok(i64::from(id))
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use shared_abi::DomId;
    use shared_abi::capability::Capabilities;
    use shared_abi::errno::XenError;
    use shared_abi::hypercall_args::Wire;
    use shared_abi::hypercall_args::domctl::{self as dc, CreateDomain};
    use shared_abi::start_info::HEAP_BASE;

    use crate::domain::DomainState;
    use crate::domain::builder::DomainConfig;
    use crate::domain::elf::testelf;
    use crate::domain::fake::{self, Env};
    use crate::domain::guest_memory::GuestMemory;
    use crate::domain::hypervisor::{HvConfig, Hypervisor};

    const ARG: u64 = HEAP_BASE;
    const CMDLINE_VA: u64 = HEAP_BASE + 0x1000;
    const ELF_VA: u64 = HEAP_BASE + 0x2000;

    fn cfg(name: &str, caps: Capabilities) -> DomainConfig {
        crate::domain::fake::test_config(name, 2048, caps)
    }

    /// Domain 1 "ctl" (DOMAIN_CONTROL), domain 2 "plain" (no rights); the test ELF and a
    /// command line in each one's heap.
    fn system() -> (Env, Hypervisor, Vec<u8>) {
        let mut env = Env::new(8192);
        let mut hv = Hypervisor::new(1, HvConfig::default(), 0);
        let elf = testelf::good();
        for (name, caps) in [
            ("ctl", Capabilities::DOMAIN_CONTROL),
            ("plain", Capabilities::empty()),
        ] {
            let id = hv
                .build_domain(&mut env.platform(), &cfg(name, caps), &elf)
                .unwrap();
            let a = hv.domains.get(id).unwrap().aspace.as_deref().unwrap();
            let m = GuestMemory::new(a, &env.phys);
            m.copy_to_guest(ELF_VA, &elf).unwrap();
            m.copy_to_guest(CMDLINE_VA, b"role=web port=80").unwrap();
        }
        (env, hv, elf)
    }

    fn request(elf_len: usize) -> CreateDomain {
        let mut r = CreateDomain {
            elf_va: ELF_VA,
            elf_len: elf_len as u64,
            memory_kib: 2048,
            cmdline_va: CMDLINE_VA,
            cmdline_len: 16,
            vcpus: 1,
            weight: 256,
            cap_percent: 0,
            capabilities: Capabilities::GRANT_MAP.bits(),
            flags: 0,
            ..CreateDomain::default()
        };
        r.set_name("web");
        r
    }

    fn call(
        env: &mut Env,
        hv: &mut Hypervisor,
        dom: DomId,
        req: CreateDomain,
    ) -> (i64, CreateDomain) {
        // One CPU: run the caller on it.
        hv.sched.pause_domain(if dom == 1 { 2 } else { 1 }, 0);
        hv.schedule(&mut env.platform(), 0);
        let mut p = [0u8; CreateDomain::SIZE];
        req.encode(&mut p);
        let (r, out) = fake::domctl(env, hv, dom, 0, ARG, dc::CREATE_DOMAIN, 0, &p);
        (r, CreateDomain::decode(&out[16..]).unwrap())
    }

    #[test]
    fn a_control_domain_builds_a_domain_from_an_image_in_its_memory() {
        let (mut env, mut hv, elf) = system();
        let (r, out) = call(&mut env, &mut hv, 1, request(elf.len()));
        assert_eq!(r, 3);
        assert_eq!(out.domid, 3);
        let d = hv.domains.get(3).unwrap();
        assert_eq!(d.name, "web");
        assert_eq!(d.caps, Capabilities::GRANT_MAP);
        assert_eq!(d.state(), DomainState::Running);
        assert!(
            env.console
                .text()
                .contains("(hv) domain 3 (web) created by domain 1"),
            "{}",
            env.console.text()
        );
    }

    #[test]
    fn create_paused_leaves_the_domain_paused() {
        let (mut env, mut hv, elf) = system();
        let mut req = request(elf.len());
        req.flags = dc::CREATE_PAUSED;
        let (r, _) = call(&mut env, &mut hv, 1, req);
        assert_eq!(r, 3);
        assert_eq!(hv.domains.get(3).unwrap().state(), DomainState::Paused);
    }

    #[test]
    fn preserve_flags_keep_a_domain_that_shuts_down_for_that_reason_until_destroyed() {
        use crate::domain::{ExitReason, FaultInfo, ShutdownReason};
        let (mut env, mut hv, elf) = system();
        let frames_before = env.frames.outstanding();
        let mut req = request(elf.len());
        // Paused, so the caller keeps the one CPU.
        req.flags = dc::CREATE_PAUSED | dc::CREATE_PRESERVE_CRASH | dc::CREATE_PRESERVE_REBOOT;
        assert_eq!(call(&mut env, &mut hv, 1, req).0, 3);
        req.set_name("web2");
        assert_eq!(call(&mut env, &mut hv, 1, req).0, 4);
        req.set_name("web3");
        assert_eq!(call(&mut env, &mut hv, 1, req).0, 5);
        let held = env.frames.outstanding();
        // Crash: kept, shut down, memory held.
        hv.shutdown_domain(
            &mut env.platform(),
            3,
            ExitReason::Shutdown(ShutdownReason::Crash),
        );
        let d = hv.domains.get(3).unwrap();
        assert_eq!(d.state(), DomainState::Shutdown(ShutdownReason::Crash));
        assert!(d.aspace.is_some());
        assert_eq!(env.frames.outstanding(), held);
        // Poweroff was not asked for: freed at once.
        hv.shutdown_domain(
            &mut env.platform(),
            4,
            ExitReason::Shutdown(ShutdownReason::Poweroff),
        );
        assert_eq!(hv.domains.get(4).unwrap().state(), DomainState::Dead);
        // A fault frees at once whatever the policy (as for boot domains).
        hv.shutdown_domain(
            &mut env.platform(),
            5,
            ExitReason::Fault(FaultInfo {
                vector: 14,
                error_code: 0,
                rip: 0,
                cr2: 0,
            }),
        );
        assert_eq!(hv.domains.get(5).unwrap().state(), DomainState::Dead);
        // Destroyed by the toolstack: everything back, the policy forgotten.
        hv.destroy_domain(&mut env.platform(), 3);
        assert_eq!(hv.domains.get(3).unwrap().state(), DomainState::Dead);
        assert!(hv.preserve.is_empty());
        assert_eq!(env.frames.outstanding(), frames_before);
    }

    #[test]
    fn without_domain_control_it_is_eperm_and_nothing_is_built() {
        let (mut env, mut hv, elf) = system();
        let (r, _) = call(&mut env, &mut hv, 2, request(elf.len()));
        assert_eq!(r, XenError::EPERM.as_ret());
        assert!(hv.domains.get(3).is_none());
    }

    #[test]
    fn hostile_requests_get_their_errno_and_build_nothing() {
        let (mut env, mut hv, elf) = system();
        let frames_before = env.frames.outstanding();
        let n = elf.len();
        let cases: Vec<(&str, CreateDomain, XenError)> = alloc::vec![
            (
                "domain_control",
                CreateDomain {
                    capabilities: Capabilities::DOMAIN_CONTROL.bits(),
                    ..request(n)
                },
                XenError::EPERM
            ),
            (
                "xenstore_service",
                CreateDomain {
                    capabilities: Capabilities::XENSTORE_SERVICE.bits(),
                    ..request(n)
                },
                XenError::EPERM
            ),
            (
                "device_owner",
                CreateDomain {
                    capabilities: Capabilities::DEVICE_OWNER.bits(),
                    ..request(n)
                },
                XenError::EPERM
            ),
            (
                "unknown capability bit",
                CreateDomain {
                    capabilities: 1 << 63,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            ("empty image", request(0), XenError::EINVAL),
            (
                "image over the limit",
                request(dc::MAX_CREATE_ELF as usize + 1),
                XenError::E2BIG
            ),
            (
                "memory 0",
                CreateDomain {
                    memory_kib: 0,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            (
                "memory huge",
                CreateDomain {
                    memory_kib: u64::MAX,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            (
                "no vCPU",
                CreateDomain {
                    vcpus: 0,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            (
                "too many vCPUs",
                CreateDomain {
                    vcpus: 1000,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            (
                "weight 0",
                CreateDomain {
                    weight: 0,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            (
                "cap over 100%/vCPU",
                CreateDomain {
                    cap_percent: 101,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            (
                "unknown flag",
                CreateDomain {
                    flags: 1 << 4,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            (
                "command line too long",
                CreateDomain {
                    cmdline_len: 1025,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            (
                "image not mapped",
                CreateDomain {
                    elf_va: 0x1000,
                    ..request(n)
                },
                XenError::EFAULT
            ),
            (
                "image in kernel space",
                CreateDomain {
                    elf_va: 0xffff_8000_0000_0000,
                    ..request(n)
                },
                XenError::EFAULT
            ),
            (
                "command line not mapped",
                CreateDomain {
                    cmdline_va: 0x1000,
                    ..request(n)
                },
                XenError::EFAULT
            ),
            (
                "not an ELF",
                CreateDomain {
                    elf_va: CMDLINE_VA,
                    elf_len: 16,
                    ..request(n)
                },
                XenError::EINVAL
            ),
            ("truncated ELF", request(n / 2), XenError::EINVAL),
        ];
        for (what, req, want) in cases {
            let (r, _) = call(&mut env, &mut hv, 1, req);
            assert_eq!(r, want.as_ret(), "{what}");
        }
        let mut bad_name = request(n);
        bad_name.set_name("a/b");
        let mut empty_name = request(n);
        empty_name.set_name("");
        let mut not_utf8 = request(n);
        not_utf8.name[0] = 0xff;
        for req in [bad_name, empty_name, not_utf8] {
            assert_eq!(call(&mut env, &mut hv, 1, req).0, XenError::EINVAL.as_ret());
        }
        assert!(hv.domains.get(3).is_none(), "nothing built");
        assert_eq!(env.frames.outstanding(), frames_before, "no frame kept");
        // And the control domain can still build a good one afterwards.
        assert_eq!(call(&mut env, &mut hv, 1, request(n)).0, 3);
    }
}
