//! Dispatcher tests: every hypercall and its refusals, on fake memory, plus a property test
//! that random calls never panic and never change another domain.

use alloc::vec::Vec;

use proptest::prelude::*;
use shared_abi::capability::Capabilities;
use shared_abi::domid::DOMID_SELF;
use shared_abi::errno::XenError;
use shared_abi::hypercall::{self as hc, console_io, memory_op, sched_op, vcpu_op, xen_version};
use shared_abi::hypercall_args::domctl::{
    self as dc, DomainInfo, DomctlHeader, ListDomains, SchedulerOp,
};
use shared_abi::hypercall_args::*;
use shared_abi::start_info::{HEAP_BASE, HEAP_END, SHARED_INFO_VA, START_INFO_VA};

use crate::domain::builder::DomainConfig;
use crate::domain::elf::testelf;
use crate::domain::fake::Env;
use crate::domain::guest_memory::GuestMemory;
use crate::domain::hypervisor::{Exit, HvConfig, Hypervisor};
use crate::domain::{DomainState, ExitReason, FaultInfo, ShutdownReason};
use shared_abi::DomId;

const SCRATCH: u64 = HEAP_BASE;

struct T {
    env: Env,
    hv: Hypervisor,
}

fn cfg(name: &str, caps: Capabilities) -> DomainConfig {
    DomainConfig {
        name: name.into(),
        memory_kib: 1024,
        vcpus: 1,
        weight: 256,
        cap_percent: 0,
        capabilities: caps,
        cmdline: "x=1".into(),
        devices: Vec::new(),
        console_evtchn: 0,
        xenstore_evtchn: 0,
        stack_pages: 4,
    }
}

impl T {
    /// Domains 1 (no rights), 2 (no rights), 3 (domain control + remote shutdown), each
    /// running on its own CPU.
    fn new() -> T {
        let mut env = Env::new(4096);
        let mut hv = Hypervisor::new(3, HvConfig::default(), 0);
        let elf = testelf::good();
        for (n, caps) in [
            ("a", Capabilities::empty()),
            ("b", Capabilities::empty()),
            (
                "ctl",
                Capabilities::DOMAIN_CONTROL | Capabilities::REMOTE_SHUTDOWN,
            ),
        ] {
            hv.build_domain(&mut env.platform(), &cfg(n, caps), &elf)
                .unwrap();
        }
        for cpu in 0..3 {
            hv.schedule(&mut env.platform(), cpu);
        }
        T { env, hv }
    }

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

    fn call(&mut self, dom: DomId, nr: u64, args: [u64; 5]) -> Exit {
        let cpu = self.cpu_of(dom);
        self.hv.hypercall(&mut self.env.platform(), cpu, nr, args)
    }

    fn ret(&mut self, dom: DomId, nr: u64, args: [u64; 5]) -> i64 {
        self.call(dom, nr, args).ret
    }

    fn mem(&self, dom: DomId) -> GuestMemory<'_> {
        let a = self.hv.domains.get(dom).unwrap().aspace.as_deref().unwrap();
        GuestMemory::new(a, &self.env.phys)
    }

    fn put<W: Wire>(&self, dom: DomId, va: u64, v: &W) {
        self.mem(dom).write(va, v).unwrap();
    }

    fn get<W: Wire>(&self, dom: DomId, va: u64) -> W {
        self.mem(dom).read(va).unwrap()
    }

    fn put_bytes(&self, dom: DomId, va: u64, b: &[u8]) {
        self.mem(dom).copy_to_guest(va, b).unwrap();
    }

    fn domctl(&mut self, dom: DomId, cmd: u32, target: DomId, payload: &[u8]) -> i64 {
        let mut b = [0u8; dc::DOMCTL_LEN];
        DomctlHeader {
            cmd,
            interface_version: dc::INTERFACE_VERSION,
            domain: target,
            pad: [0; 3],
        }
        .encode(&mut b);
        b[16..16 + payload.len()].copy_from_slice(payload);
        self.put_bytes(dom, SCRATCH, &b);
        self.ret(dom, hc::DOMCTL, [SCRATCH, 0, 0, 0, 0])
    }

    fn state(&self, dom: DomId) -> DomainState {
        self.hv.domains.get(dom).unwrap().state()
    }

    /// Let every CPU reschedule and report its loaded address space (frees dying domains).
    fn settle(&mut self) {
        for cpu in 0..3 {
            let d = self.hv.schedule(&mut self.env.platform(), cpu);
            let dom = d.next.and_then(|v| self.hv.sched.owner(v)).map(|(d, _)| d);
            self.hv
                .address_space_loaded(&mut self.env.platform(), cpu, dom);
        }
    }
}

const E: fn(XenError) -> i64 = XenError::as_ret;

#[test]
fn unknown_hypercall_numbers_are_enosys() {
    let mut t = T::new();
    for nr in [
        hc::SET_TRAP_TABLE,
        hc::MMU_UPDATE,
        11,
        31,
        38,
        47,
        48,
        63,
        64,
        u64::MAX,
    ] {
        assert_eq!(t.ret(1, nr, [0; 5]), E(XenError::ENOSYS), "nr {nr}");
    }
}

#[test]
fn console_write_prefixes_lines_with_the_domain_name() {
    let mut t = T::new();
    t.put_bytes(1, SCRATCH, b"hello\n");
    assert_eq!(
        t.ret(1, hc::CONSOLE_IO, [console_io::WRITE, 6, SCRATCH, 0, 0]),
        0
    );
    assert!(t.env.console.text().contains("(a) hello\n"));
}

#[test]
fn console_refusals_follow_xen() {
    let mut t = T::new();
    assert_eq!(
        t.ret(1, hc::CONSOLE_IO, [console_io::READ, 6, SCRATCH, 0, 0]),
        0,
        "no input waiting: nothing read"
    );
    assert_eq!(
        t.ret(1, hc::CONSOLE_IO, [7, 6, SCRATCH, 0, 0]),
        E(XenError::ENOSYS)
    );
    assert_eq!(
        t.ret(
            1,
            hc::CONSOLE_IO,
            [console_io::WRITE, 6, 0xffff_8000_0000_0000, 0, 0]
        ),
        E(XenError::EFAULT)
    );
    assert_eq!(
        t.ret(1, hc::CONSOLE_IO, [console_io::WRITE, 6, 0x1000, 0, 0]),
        E(XenError::EFAULT)
    );
}

#[test]
fn console_flood_is_rate_limited() {
    let mut t = T::new();
    t.put_bytes(1, SCRATCH, &[b'x'; 4096]);
    for _ in 0..10 {
        assert_eq!(
            t.ret(1, hc::CONSOLE_IO, [console_io::WRITE, 4096, SCRATCH, 0, 0]),
            0
        );
    }
    let printed = t.env.console.0.iter().filter(|&&b| b == b'x').count();
    assert_eq!(printed as u64, crate::domain::console::BUCKET_BYTES);
}

#[test]
fn xen_version_reports_version_strings_and_features() {
    let mut t = T::new();
    assert_eq!(
        t.ret(1, hc::XEN_VERSION, [xen_version::VERSION, 0, 0, 0, 0]),
        (4 << 16) | 17
    );
    assert_eq!(
        t.ret(
            1,
            hc::XEN_VERSION,
            [xen_version::EXTRAVERSION, SCRATCH, 0, 0, 0]
        ),
        0
    );
    let mut b = [0u8; 16];
    t.mem(1).copy_from_guest(SCRATCH, &mut b).unwrap();
    assert_eq!(&b[..11], b".0-bulkhead");
    assert_eq!(
        t.ret(
            1,
            hc::XEN_VERSION,
            [xen_version::CAPABILITIES, SCRATCH, 0, 0, 0]
        ),
        0
    );
    t.mem(1).copy_from_guest(SCRATCH, &mut b).unwrap();
    assert_eq!(&b[..14], b"xen-3.0-x86_64");
    t.put(
        1,
        SCRATCH,
        &XenFeatureInfo {
            submap_idx: 0,
            submap: 0,
        },
    );
    assert_eq!(
        t.ret(
            1,
            hc::XEN_VERSION,
            [xen_version::GET_FEATURES, SCRATCH, 0, 0, 0]
        ),
        0
    );
    assert_eq!(
        t.get::<XenFeatureInfo>(1, SCRATCH).submap,
        super::FEATURES_SUBMAP0
    );
    t.put(
        1,
        SCRATCH,
        &XenFeatureInfo {
            submap_idx: 1,
            submap: 0,
        },
    );
    assert_eq!(
        t.ret(
            1,
            hc::XEN_VERSION,
            [xen_version::GET_FEATURES, SCRATCH, 0, 0, 0]
        ),
        E(XenError::EINVAL)
    );
    assert_eq!(
        t.ret(1, hc::XEN_VERSION, [99, SCRATCH, 0, 0, 0]),
        E(XenError::ENOSYS)
    );
    // The start-info page is read-only to the domain, so the hypervisor will not write it.
    assert_eq!(
        t.ret(
            1,
            hc::XEN_VERSION,
            [xen_version::EXTRAVERSION, START_INFO_VA, 0, 0, 0]
        ),
        E(XenError::EFAULT)
    );
}

#[test]
fn yield_and_block_deschedule_the_caller() {
    let mut t = T::new();
    let e = t.call(1, hc::SCHED_OP, [sched_op::YIELD, 0, 0, 0, 0]);
    assert_eq!((e.ret, e.resched), (0, true));
    let v = t.hv.domains.get(1).unwrap().vcpus[0];
    let e = t.call(1, hc::SCHED_OP, [sched_op::BLOCK, 0, 0, 0, 0]);
    assert_eq!((e.ret, e.resched), (0, true));
    assert!(t.hv.sched.is_blocked(v));
    // Unmasked by block.
    let si = t.hv.domains.get(1).unwrap().shared_info;
    assert_eq!(t.env.frame_bytes(si, 1, 1), [0]);
}

#[test]
fn block_returns_at_once_when_an_event_is_pending() {
    let mut t = T::new();
    let si = t.hv.domains.get(1).unwrap().shared_info;
    t.env.phys.write_bytes(si, 0, &[1]);
    let e = t.call(1, hc::SCHED_OP, [sched_op::BLOCK, 0, 0, 0, 0]);
    assert_eq!((e.ret, e.resched), (0, false));
}

#[test]
fn shutdown_records_the_reason_and_frees_the_domain() {
    let mut t = T::new();
    let before = t.env.frames.outstanding();
    let held = t.hv.domains.get(1).unwrap().reservation.used() as usize;
    t.put(1, SCRATCH, &SchedShutdown { reason: 9 });
    assert_eq!(
        t.ret(1, hc::SCHED_OP, [sched_op::SHUTDOWN, SCRATCH, 0, 0, 0]),
        E(XenError::EINVAL)
    );
    t.put(
        1,
        SCRATCH,
        &SchedShutdown {
            reason: sched_op::SHUTDOWN_POWEROFF,
        },
    );
    let e = t.call(1, hc::SCHED_OP, [sched_op::SHUTDOWN, SCRATCH, 0, 0, 0]);
    assert!(e.resched);
    assert_eq!(t.state(1), DomainState::Dying, "still loaded on its CPU");
    t.settle();
    assert_eq!(t.state(1), DomainState::Dead);
    assert_eq!(
        t.hv.domains.get(1).unwrap().exit,
        Some(ExitReason::Shutdown(ShutdownReason::Poweroff))
    );
    assert_eq!(t.hv.domains.get(1).unwrap().reservation.used(), 0);
    assert_eq!(t.env.frames.outstanding(), before - held);
    assert!(
        t.env
            .console
            .text()
            .contains("domain 1 (a) stopped: shutdown(poweroff)")
    );
    assert_eq!(t.state(2), DomainState::Running);
}

#[test]
fn poll_checks_ports_then_blocks_until_timeout() {
    let mut t = T::new();
    t.put(
        1,
        SCRATCH,
        &SchedPoll {
            ports: SCRATCH + 64,
            nr_ports: 129,
            pad: 0,
            timeout: 0,
        },
    );
    assert_eq!(
        t.ret(1, hc::SCHED_OP, [sched_op::POLL, SCRATCH, 0, 0, 0]),
        E(XenError::EINVAL)
    );
    t.put_bytes(1, SCRATCH + 64, &4096u32.to_le_bytes());
    t.put(
        1,
        SCRATCH,
        &SchedPoll {
            ports: SCRATCH + 64,
            nr_ports: 1,
            pad: 0,
            timeout: 0,
        },
    );
    assert_eq!(
        t.ret(1, hc::SCHED_OP, [sched_op::POLL, SCRATCH, 0, 0, 0]),
        E(XenError::EINVAL)
    );
    t.put(
        1,
        SCRATCH,
        &SchedPoll {
            ports: 0x10,
            nr_ports: 1,
            pad: 0,
            timeout: 0,
        },
    );
    assert_eq!(
        t.ret(1, hc::SCHED_OP, [sched_op::POLL, SCRATCH, 0, 0, 0]),
        E(XenError::EFAULT)
    );
    // Port 70 pending: returns without blocking.
    let si = t.hv.domains.get(1).unwrap().shared_info;
    t.env
        .phys
        .write_bytes(si, 0x800 + 8, &(1u64 << 6).to_le_bytes());
    t.put_bytes(1, SCRATCH + 64, &70u32.to_le_bytes());
    t.put(
        1,
        SCRATCH,
        &SchedPoll {
            ports: SCRATCH + 64,
            nr_ports: 1,
            pad: 0,
            timeout: 0,
        },
    );
    let e = t.call(1, hc::SCHED_OP, [sched_op::POLL, SCRATCH, 0, 0, 0]);
    assert_eq!((e.ret, e.resched), (0, false));
    // Port 3 not pending: blocks until the timeout.
    t.put_bytes(1, SCRATCH + 64, &3u32.to_le_bytes());
    t.put(
        1,
        SCRATCH,
        &SchedPoll {
            ports: SCRATCH + 64,
            nr_ports: 1,
            pad: 0,
            timeout: 5_000_000,
        },
    );
    let cpu = t.cpu_of(1);
    let e = t.call(1, hc::SCHED_OP, [sched_op::POLL, SCRATCH, 0, 0, 0]);
    assert_eq!((e.ret, e.resched), (0, true));
    let v = t.hv.domains.get(1).unwrap().vcpus[0];
    assert!(t.hv.sched.is_blocked(v));
    t.hv.schedule(&mut t.env.platform(), cpu);
    t.env.clock.now.set(5_000_000);
    t.hv.timer_tick(&mut t.env.platform(), cpu);
    assert!(!t.hv.sched.is_blocked(v));
}

#[test]
fn remote_shutdown_needs_the_capability_and_a_live_target() {
    let mut t = T::new();
    t.put(
        1,
        SCRATCH,
        &SchedRemoteShutdown {
            domain_id: 2,
            pad: 0,
            reason: 0,
        },
    );
    assert_eq!(
        t.ret(
            1,
            hc::SCHED_OP,
            [sched_op::REMOTE_SHUTDOWN, SCRATCH, 0, 0, 0]
        ),
        E(XenError::EPERM)
    );
    assert_eq!(t.state(2), DomainState::Running);
    t.put(
        3,
        SCRATCH,
        &SchedRemoteShutdown {
            domain_id: 77,
            pad: 0,
            reason: 0,
        },
    );
    assert_eq!(
        t.ret(
            3,
            hc::SCHED_OP,
            [sched_op::REMOTE_SHUTDOWN, SCRATCH, 0, 0, 0]
        ),
        E(XenError::ESRCH)
    );
    t.put(
        3,
        SCRATCH,
        &SchedRemoteShutdown {
            domain_id: 2,
            pad: 0,
            reason: 1,
        },
    );
    assert_eq!(
        t.ret(
            3,
            hc::SCHED_OP,
            [sched_op::REMOTE_SHUTDOWN, SCRATCH, 0, 0, 0]
        ),
        0
    );
    t.settle();
    assert_eq!(t.state(2), DomainState::Dead);
    assert_eq!(
        t.hv.domains.get(2).unwrap().exit,
        Some(ExitReason::RemoteShutdown {
            by: 3,
            reason: ShutdownReason::Reboot
        })
    );
    assert_eq!(
        t.ret(1, hc::SCHED_OP, [42, 0, 0, 0, 0]),
        E(XenError::ENOSYS)
    );
}

#[test]
fn vcpu_op_timers_and_runstate() {
    let mut t = T::new();
    assert_eq!(
        t.ret(
            1,
            hc::VCPU_OP,
            [vcpu_op::GET_RUNSTATE_INFO, 1, SCRATCH, 0, 0]
        ),
        E(XenError::ENOENT)
    );
    assert_eq!(
        t.ret(
            1,
            hc::VCPU_OP,
            [vcpu_op::GET_RUNSTATE_INFO, u64::MAX, SCRATCH, 0, 0]
        ),
        E(XenError::ENOENT)
    );
    t.env.clock.now.set(1_000);
    assert_eq!(
        t.ret(
            1,
            hc::VCPU_OP,
            [vcpu_op::GET_RUNSTATE_INFO, 0, SCRATCH, 0, 0]
        ),
        0
    );
    let r: VcpuRunstateInfo = t.get(1, SCRATCH);
    assert_eq!(r.state, vcpu_op::RUNSTATE_RUNNING);
    assert_eq!(r.time.iter().sum::<u64>(), 1_000);
    t.put(
        1,
        SCRATCH,
        &VcpuSetSingleshotTimer {
            timeout_abs_ns: 500,
            flags: vcpu_op::SSHOTTMR_FUTURE,
            pad: 0,
        },
    );
    assert_eq!(
        t.ret(
            1,
            hc::VCPU_OP,
            [vcpu_op::SET_SINGLESHOT_TIMER, 0, SCRATCH, 0, 0]
        ),
        E(XenError::ETIME)
    );
    t.put(
        1,
        SCRATCH,
        &VcpuSetSingleshotTimer {
            timeout_abs_ns: 9_000,
            flags: 0,
            pad: 0,
        },
    );
    assert_eq!(
        t.ret(
            1,
            hc::VCPU_OP,
            [vcpu_op::SET_SINGLESHOT_TIMER, 0, SCRATCH, 0, 0]
        ),
        0
    );
    let cpu = t.cpu_of(1);
    t.env.clock.now.set(9_000);
    let tick = t.hv.timer_tick(&mut t.env.platform(), cpu);
    assert_eq!(tick.timers_fired.len(), 1);
    assert_eq!(
        t.ret(1, hc::VCPU_OP, [vcpu_op::STOP_SINGLESHOT_TIMER, 0, 0, 0, 0]),
        0
    );
    assert_eq!(t.ret(1, hc::VCPU_OP, [vcpu_op::IS_UP, 0, 0, 0, 0]), 1);
    assert_eq!(
        t.ret(1, hc::VCPU_OP, [vcpu_op::INITIALISE, 0, 0, 0, 0]),
        E(XenError::ENOSYS)
    );
    assert_eq!(
        t.ret(
            1,
            hc::VCPU_OP,
            [vcpu_op::GET_RUNSTATE_INFO, 0, START_INFO_VA, 0, 0]
        ),
        E(XenError::EFAULT)
    );
}

#[test]
fn memory_op_reservation_queries_respect_policy() {
    let mut t = T::new();
    let used = t.hv.domains.get(1).unwrap().reservation.used() as i64;
    t.put_bytes(1, SCRATCH, &DOMID_SELF.to_le_bytes());
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::CURRENT_RESERVATION, SCRATCH, 0, 0, 0]
        ),
        used
    );
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::MAXIMUM_RESERVATION, SCRATCH, 0, 0, 0]
        ),
        256
    );
    t.put_bytes(1, SCRATCH, &2u16.to_le_bytes());
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::CURRENT_RESERVATION, SCRATCH, 0, 0, 0]
        ),
        E(XenError::EPERM)
    );
    t.put_bytes(3, SCRATCH, &1u16.to_le_bytes());
    assert_eq!(
        t.ret(
            3,
            hc::MEMORY_OP,
            [memory_op::CURRENT_RESERVATION, SCRATCH, 0, 0, 0]
        ),
        used
    );
    t.put_bytes(3, SCRATCH, &99u16.to_le_bytes());
    assert_eq!(
        t.ret(
            3,
            hc::MEMORY_OP,
            [memory_op::CURRENT_RESERVATION, SCRATCH, 0, 0, 0]
        ),
        E(XenError::ESRCH)
    );
    assert_eq!(
        t.ret(1, hc::MEMORY_OP, [memory_op::MEMORY_MAP, SCRATCH, 0, 0, 0]),
        E(XenError::ENOSYS)
    );
}

#[test]
fn memory_op_decrease_then_increase_within_the_limit_balances() {
    let mut t = T::new();
    let heap = {
        let d = t.hv.domains.get(1).unwrap();
        d.pages
            .keys()
            .filter(|&&va| (HEAP_BASE..HEAP_END).contains(&va))
            .count() as u64
    };
    assert!(heap >= 8);
    let used0 = t.hv.domains.get(1).unwrap().reservation.used();
    let out0 = t.env.frames.outstanding();
    // Give back the last 4 heap pages.
    let first = HEAP_BASE / 4096 + heap - 4;
    let list: Vec<u8> = (0..4u64).flat_map(|i| (first + i).to_le_bytes()).collect();
    t.put_bytes(1, SCRATCH, &list);
    let r = XenMemoryReservation {
        extent_start: SCRATCH,
        nr_extents: 4,
        extent_order: 0,
        mem_flags: 0,
        domid: DOMID_SELF,
        pad: [0; 3],
    };
    t.put(1, SCRATCH + 256, &r);
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::DECREASE_RESERVATION, SCRATCH + 256, 0, 0, 0]
        ),
        4
    );
    assert_eq!(t.hv.domains.get(1).unwrap().reservation.used(), used0 - 4);
    assert_eq!(t.env.frames.outstanding(), out0 - 4);
    assert!(
        t.mem(1)
            .copy_from_guest(first * 4096, &mut [0u8; 1])
            .is_err()
    );
    // Again: they are gone, nothing done.
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::DECREASE_RESERVATION, SCRATCH + 256, 0, 0, 0]
        ),
        0
    );
    // Put them back.
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::INCREASE_RESERVATION, SCRATCH + 256, 0, 0, 0]
        ),
        4
    );
    assert_eq!(t.hv.domains.get(1).unwrap().reservation.used(), used0);
    t.mem(1).copy_to_guest(first * 4096, &[1u8; 8]).unwrap();
    // Over the limit: ask for 4 more pages than the limit leaves (the builder keeps a few
    // frames unspent for grant-window page tables); only part is given.
    let spare = t.hv.domains.get(1).unwrap().reservation.available();
    let want = spare + 4;
    assert!(
        want <= 28,
        "{spare} spare pages do not fit the scratch list"
    );
    let beyond: Vec<u8> = (0..want)
        .flat_map(|i| (HEAP_BASE / 4096 + 10_000 + i).to_le_bytes())
        .collect();
    t.put_bytes(1, SCRATCH, &beyond);
    t.put(
        1,
        SCRATCH + 256,
        &XenMemoryReservation {
            nr_extents: want,
            ..r
        },
    );
    let got = t.ret(
        1,
        hc::MEMORY_OP,
        [memory_op::INCREASE_RESERVATION, SCRATCH + 256, 0, 0, 0],
    );
    assert!(
        (0..want as i64).contains(&got),
        "got {got} pages past the limit"
    );
    t.put(1, SCRATCH + 256, &r);
    let d = t.hv.domains.get(1).unwrap();
    assert!(d.reservation.used() <= d.reservation.limit());
    let more: Vec<u8> = (0..4u64)
        .flat_map(|i| (HEAP_BASE / 4096 + 20_000 + i).to_le_bytes())
        .collect();
    t.put_bytes(1, SCRATCH, &more);
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::INCREASE_RESERVATION, SCRATCH + 256, 0, 0, 0]
        ),
        0
    );
    // Outside the heap window (the ELF's text page).
    t.put_bytes(1, SCRATCH, &0x400u64.to_le_bytes());
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::DECREASE_RESERVATION, SCRATCH + 256, 0, 0, 0]
        ),
        0
    );
    // Unreadable extent array.
    let bad = XenMemoryReservation {
        extent_start: 0x10,
        ..r
    };
    t.put(1, SCRATCH + 256, &bad);
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::DECREASE_RESERVATION, SCRATCH + 256, 0, 0, 0]
        ),
        E(XenError::EFAULT)
    );
    // Foreign without the capability.
    let foreign = XenMemoryReservation { domid: 2, ..r };
    t.put(1, SCRATCH + 256, &foreign);
    assert_eq!(
        t.ret(
            1,
            hc::MEMORY_OP,
            [memory_op::DECREASE_RESERVATION, SCRATCH + 256, 0, 0, 0]
        ),
        E(XenError::EPERM)
    );
}

#[test]
fn domctl_requires_domain_control_and_the_bulkhead_version() {
    let mut t = T::new();
    assert_eq!(t.domctl(1, dc::GETDOMAININFO, 2, &[]), E(XenError::EPERM));
    assert_eq!(t.domctl(1, dc::PAUSEDOMAIN, 2, &[]), E(XenError::EPERM));
    assert_eq!(t.domctl(1, dc::LIST_DOMAINS, 0, &[]), E(XenError::EPERM));
    let mut b = [0u8; dc::DOMCTL_LEN];
    DomctlHeader {
        cmd: dc::GETDOMAININFO,
        interface_version: 0x18,
        domain: 1,
        pad: [0; 3],
    }
    .encode(&mut b);
    t.put_bytes(3, SCRATCH, &b);
    assert_eq!(
        t.ret(3, hc::DOMCTL, [SCRATCH, 0, 0, 0, 0]),
        E(XenError::EACCES)
    );
    assert_eq!(t.domctl(3, 999, 1, &[]), E(XenError::ENOSYS));
    assert_eq!(
        t.ret(3, hc::DOMCTL, [0xffff_ffff_ffff_f000, 0, 0, 0, 0]),
        E(XenError::EFAULT)
    );
}

#[test]
fn domctl_info_list_pause_unpause_destroy() {
    let mut t = T::new();
    assert_eq!(t.domctl(3, dc::GETDOMAININFO, 1, &[]), 0);
    let mut b = [0u8; dc::DOMCTL_LEN];
    t.mem(3).copy_from_guest(SCRATCH, &mut b).unwrap();
    let info = DomainInfo::decode(&b[16..]).unwrap();
    assert_eq!(
        (info.domid, info.name(), info.state),
        (1, "a", dc::state::RUNNING)
    );
    assert_eq!(info.max_pages, 256);
    assert_eq!(t.domctl(3, dc::GETDOMAININFO, 99, &[]), E(XenError::ESRCH));
    let mut l = [0u8; 16];
    ListDomains {
        first_domain: 2,
        pad: 0,
        max_domains: 10,
        buffer: SCRATCH + 4096,
    }
    .encode(&mut l);
    assert_eq!(t.domctl(3, dc::LIST_DOMAINS, 0, &l), 2);
    let second: DomainInfo = t.get(3, SCRATCH + 4096 + 96);
    assert_eq!(second.name(), "ctl");
    // Pause / unpause.
    assert_eq!(t.domctl(3, dc::UNPAUSEDOMAIN, 1, &[]), E(XenError::EINVAL));
    assert_eq!(
        t.domctl(3, dc::PAUSEDOMAIN, 3, &[]),
        E(XenError::EINVAL),
        "not itself"
    );
    assert_eq!(t.domctl(3, dc::PAUSEDOMAIN, 1, &[]), 0);
    assert_eq!(t.state(1), DomainState::Paused);
    t.settle();
    assert!(!t.hv.sched.domain_on_cpu(1));
    assert_eq!(t.domctl(3, dc::UNPAUSEDOMAIN, 1, &[]), 0);
    assert_eq!(t.state(1), DomainState::Running);
    // Destroy.
    assert_eq!(t.domctl(3, dc::DESTROYDOMAIN, 2, &[]), 0);
    t.settle();
    assert_eq!(t.state(2), DomainState::Dead);
    assert_eq!(
        t.hv.domains.get(2).unwrap().exit,
        Some(ExitReason::Destroyed { by: 3 })
    );
    assert_eq!(t.domctl(3, dc::DESTROYDOMAIN, 2, &[]), E(XenError::ESRCH));
}

#[test]
fn domctl_scheduler_op_gets_and_puts_credit_parameters() {
    let mut t = T::new();
    let mut p = [0u8; 16];
    SchedulerOp {
        sched_id: dc::SCHEDULER_CREDIT,
        cmd: dc::SCHEDOP_PUTINFO,
        weight: 512,
        cap: 50,
        pad: 0,
    }
    .encode(&mut p);
    assert_eq!(t.domctl(3, dc::SCHEDULER_OP, 1, &p), 0);
    assert_eq!(t.hv.sched.params(1), Some((512, 50)));
    SchedulerOp {
        sched_id: dc::SCHEDULER_CREDIT,
        cmd: dc::SCHEDOP_PUTINFO,
        weight: 0,
        cap: dc::CAP_UNCHANGED,
        pad: 0,
    }
    .encode(&mut p);
    assert_eq!(t.domctl(3, dc::SCHEDULER_OP, 1, &p), 0);
    assert_eq!(t.hv.sched.params(1), Some((512, 50)));
    SchedulerOp {
        sched_id: dc::SCHEDULER_CREDIT,
        cmd: dc::SCHEDOP_PUTINFO,
        weight: 1,
        cap: 101,
        pad: 0,
    }
    .encode(&mut p);
    assert_eq!(t.domctl(3, dc::SCHEDULER_OP, 1, &p), E(XenError::EINVAL));
    SchedulerOp {
        sched_id: dc::SCHEDULER_CREDIT,
        cmd: dc::SCHEDOP_GETINFO,
        weight: 0,
        cap: 0,
        pad: 0,
    }
    .encode(&mut p);
    assert_eq!(t.domctl(3, dc::SCHEDULER_OP, 1, &p), 0);
    let mut b = [0u8; dc::DOMCTL_LEN];
    t.mem(3).copy_from_guest(SCRATCH, &mut b).unwrap();
    let got = SchedulerOp::decode(&b[16..]).unwrap();
    assert_eq!((got.weight, got.cap), (512, 50));
    SchedulerOp {
        sched_id: 6,
        cmd: dc::SCHEDOP_GETINFO,
        weight: 0,
        cap: 0,
        pad: 0,
    }
    .encode(&mut p);
    assert_eq!(t.domctl(3, dc::SCHEDULER_OP, 1, &p), E(XenError::EINVAL));
}

#[test]
fn a_fault_stops_only_that_domain_and_frees_what_it_held() {
    let mut t = T::new();
    let held = t.hv.domains.get(2).unwrap().reservation.used() as usize;
    let before = t.env.frames.outstanding();
    let cpu = t.cpu_of(2);
    let info = FaultInfo {
        vector: 14,
        error_code: 6,
        rip: 0x40_0010,
        cr2: 0,
    };
    let e = t.hv.fault(&mut t.env.platform(), cpu, info);
    assert!(e.resched);
    t.settle();
    assert_eq!(t.state(2), DomainState::Dead);
    assert_eq!(
        t.hv.domains.get(2).unwrap().exit,
        Some(ExitReason::Fault(info))
    );
    assert_eq!(t.env.frames.outstanding(), before - held);
    assert_eq!(t.state(1), DomainState::Running);
    assert_eq!(t.state(3), DomainState::Running);
    assert!(t.env.console.text().contains("stopped: fault: vector 14"));
}

/// Everything about a domain another one might disturb: state, pages held, (VA, content
/// hash) of every page, scheduler parameters.
type Snapshot = (DomainState, u64, Vec<(u64, u64)>, Option<(u32, u32)>);

fn snapshot(t: &T, dom: DomId) -> Snapshot {
    let d = t.hv.domains.get(dom).unwrap();
    // FNV-1a of each page, so a failure prints short.
    let hash = |b: Vec<u8>| {
        b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
            (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
        })
    };
    // The hypervisor itself refreshes vcpu_info time when it schedules the domain: compare
    // the event words of shared_info, everything else whole.
    let pages = d
        .pages
        .iter()
        .map(|(&va, &f)| {
            let bytes = if va == SHARED_INFO_VA {
                t.env.frame_bytes(f, 0x800, 0x800)
            } else {
                t.env.frame_bytes(f, 0, 4096)
            };
            (va, hash(bytes))
        })
        .collect();
    (
        d.state(),
        d.reservation.used(),
        pages,
        t.hv.sched.params(dom),
    )
}

fn arb_pointer() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0u64..0x20000).prop_map(|o| SCRATCH + o),
        (0u64..0x4000).prop_map(|o| START_INFO_VA + o),
        (0u64..0x4000).prop_map(|o| 0x40_0000 + o),
        Just(0u64),
        Just(0xffff_8000_0000_0000u64),
    ]
}

fn arb_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(hc::CONSOLE_IO),
        Just(hc::XEN_VERSION),
        Just(hc::SCHED_OP),
        Just(hc::VCPU_OP),
        Just(hc::MEMORY_OP),
        Just(hc::DOMCTL),
        0u64..64,
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn random_hypercalls_never_panic_and_never_touch_another_domain(
        calls in proptest::collection::vec(
            (arb_number(), 0u64..12, prop_oneof![0u64..8, any::<u64>()], arb_pointer(), arb_pointer(),
             proptest::collection::vec(any::<u8>(), 0..160)),
            1..8)
    ) {
        let mut t = T::new();
        let victim = snapshot(&t, 2);
        let ctl = snapshot(&t, 3);
        for (nr, a0, a1, a2, a3, bytes) in calls {
            if t.hv.domains.get(1).unwrap().state() != DomainState::Running {
                break;
            }
            // Plant hostile structures (domids 2 and 3 included) at the scratch page.
            let _ = t.mem(1).copy_to_guest(SCRATCH, &bytes);
            let cpu = (0..3).find(|&c| t.hv.sched.current(c).and_then(|v| t.hv.sched.owner(v)).is_some_and(|(d, _)| d == 1));
            let Some(cpu) = cpu else { break };
            let e = t.hv.hypercall(&mut t.env.platform(), cpu, nr, [a0, a1, a2, a3, a0]);
            prop_assert!(e.ret >= 0 || XenError::from_ret(e.ret).is_err());
            if e.resched {
                t.settle();
            }
        }
        prop_assert_eq!(snapshot(&t, 2), victim);
        prop_assert_eq!(snapshot(&t, 3), ctl);
    }
}
