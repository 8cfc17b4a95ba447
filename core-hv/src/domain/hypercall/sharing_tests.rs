//! Dispatcher tests of `event_channel_op` and `grant_table_op` on fake memory: the wiring
//! into real domains (shared_info bits, wake-ups, page tables, frame lifetimes) and the
//! refusals, each with Xen's code.

use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::domid::DOMID_SELF;
use shared_abi::errno::XenError;
use shared_abi::event_channel::{
    EvtchnAllocUnbound, EvtchnBindInterdomain, EvtchnBindVirq, EvtchnSend, EvtchnStatus,
    StatusInfo, op as eop, virq,
};
use shared_abi::grant_table::{
    GntStatus, GnttabCopy, GnttabCopyPtr, GnttabMapGrantRef, GnttabQuerySize, GnttabSetVersion,
    GnttabSetupTable, GnttabUnmapGrantRef, GrantEntryV1, gntcopy, gntmap, gtf, op as gop,
};
use shared_abi::hypercall::{self as hc, sched_op};
use shared_abi::start_info::{GRANT_MAP_BASE, GRANT_TABLE_FRAMES, GRANT_TABLE_VA, HEAP_BASE};

use crate::domain::builder::DomainConfig;
use crate::domain::elf::testelf;
use crate::domain::fake::Env;
use crate::domain::guest_memory::GuestMemory;
use crate::domain::hypervisor::{HvConfig, Hypervisor};
use crate::domain::memory::{Mfn, PagePerms};

/// Argument scratch page and a data page, both in the heap.
const ARG: u64 = HEAP_BASE;
const DATA: u64 = HEAP_BASE + 0x1000;

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
        cmdline: String::new(),
        devices: Vec::new(),
        console_evtchn: 0,
        xenstore_evtchn: 0,
        stack_pages: 4,
    }
}

use alloc::string::String;

impl T {
    /// Domains 1 "a" (no rights), 2 "b" (grant_map, domain death events), 3 "c" (no rights),
    /// each on its own CPU.
    fn with(config: HvConfig) -> T {
        let mut env = Env::new(4096);
        let mut hv = Hypervisor::new(3, config, 0);
        let elf = testelf::good();
        for (n, caps) in [
            ("a", Capabilities::empty()),
            (
                "b",
                Capabilities::GRANT_MAP | Capabilities::DOMAIN_DEATH_EVENTS,
            ),
            ("c", Capabilities::empty()),
        ] {
            hv.build_domain(&mut env.platform(), &cfg(n, caps), &elf)
                .unwrap();
        }
        for cpu in 0..3 {
            hv.schedule(&mut env.platform(), cpu);
        }
        T { env, hv }
    }

    fn new() -> T {
        T::with(HvConfig::default())
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

    fn call(&mut self, dom: DomId, nr: u64, args: [u64; 5]) -> i64 {
        let cpu = self.cpu_of(dom);
        self.hv
            .hypercall(&mut self.env.platform(), cpu, nr, args)
            .ret
    }

    fn mem(&self, dom: DomId) -> GuestMemory<'_> {
        let a = self.hv.domains.get(dom).unwrap().aspace.as_deref().unwrap();
        GuestMemory::new(a, &self.env.phys)
    }

    fn put(&self, dom: DomId, va: u64, b: &[u8]) {
        self.mem(dom).copy_to_guest(va, b).unwrap();
    }

    fn get(&self, dom: DomId, va: u64, len: usize) -> Vec<u8> {
        let mut b = alloc::vec![0u8; len];
        self.mem(dom).copy_from_guest(va, &mut b).unwrap();
        b
    }

    /// `event_channel_op(cmd, ARG)` with `arg` as the argument bytes; the bytes after.
    fn evtchn(&mut self, dom: DomId, cmd: u32, arg: &[u8]) -> (i64, Vec<u8>) {
        self.put(dom, ARG, arg);
        let r = self.call(dom, hc::EVENT_CHANNEL_OP, [u64::from(cmd), ARG, 0, 0, 0]);
        (r, self.get(dom, ARG, arg.len()))
    }

    fn gnttab(&mut self, dom: DomId, cmd: u32, args: &[u8], count: u64) -> (i64, Vec<u8>) {
        self.put(dom, ARG, args);
        let r = self.call(dom, hc::GRANT_TABLE_OP, [u64::from(cmd), ARG, count, 0, 0]);
        (r, self.get(dom, ARG, args.len()))
    }

    fn alloc_unbound(&mut self, dom: DomId, remote: DomId) -> Result<u32, i64> {
        let a = EvtchnAllocUnbound {
            dom: DOMID_SELF,
            remote_dom: remote,
            port: 0,
        };
        match self.evtchn(dom, eop::ALLOC_UNBOUND, &a.to_bytes()) {
            (0, b) => Ok(EvtchnAllocUnbound::from_bytes(&b).unwrap().port),
            (e, _) => Err(e),
        }
    }

    fn bind(&mut self, dom: DomId, remote: DomId, port: u32) -> Result<u32, i64> {
        let a = EvtchnBindInterdomain {
            remote_dom: remote,
            remote_port: port,
            local_port: 0,
        };
        match self.evtchn(dom, eop::BIND_INTERDOMAIN, &a.to_bytes()) {
            (0, b) => Ok(EvtchnBindInterdomain::from_bytes(&b).unwrap().local_port),
            (e, _) => Err(e),
        }
    }

    fn send(&mut self, dom: DomId, port: u32) -> i64 {
        self.evtchn(dom, eop::SEND, &EvtchnSend { port }.to_bytes())
            .0
    }

    fn pending(&self, dom: DomId, port: u32) -> bool {
        let si = self.hv.domains.get(dom).unwrap().shared_info;
        let w = self
            .env
            .frame_bytes(si, 0x800 + (port as usize / 64) * 8, 8);
        u64::from_le_bytes(w.try_into().unwrap()) & (1 << (port % 64)) != 0
    }

    /// Domain `dom` writes grant entry `gref` in its own table.
    fn grant(&self, dom: DomId, gref: u32, to: DomId, va: u64, readonly: bool) {
        let e = GrantEntryV1 {
            flags: gtf::PERMIT_ACCESS | if readonly { gtf::READONLY } else { 0 },
            domid: to,
            frame: (va >> 12) as u32,
        };
        self.put(dom, GRANT_TABLE_VA + u64::from(gref) * 8, &e.to_bytes());
    }

    fn flags(&self, dom: DomId, gref: u32) -> u16 {
        let b = self.get(dom, GRANT_TABLE_VA + u64::from(gref) * 8, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn map(&mut self, dom: DomId, granter: DomId, gref: u32, at: u64, ro: bool) -> (i16, u32) {
        let m = GnttabMapGrantRef {
            host_addr: at,
            flags: gntmap::HOST_MAP | if ro { gntmap::READONLY } else { 0 },
            gref,
            dom: granter,
            ..Default::default()
        };
        let (r, b) = self.gnttab(dom, gop::MAP_GRANT_REF, &m.to_bytes(), 1);
        assert_eq!(r, 0);
        let m = GnttabMapGrantRef::from_bytes(&b).unwrap();
        (m.status, m.handle)
    }

    fn unmap(&mut self, dom: DomId, handle: u32, at: u64) -> i16 {
        let u = GnttabUnmapGrantRef {
            host_addr: at,
            handle,
            ..Default::default()
        };
        let (r, b) = self.gnttab(dom, gop::UNMAP_GRANT_REF, &u.to_bytes(), 1);
        assert_eq!(r, 0);
        GnttabUnmapGrantRef::from_bytes(&b).unwrap().status
    }

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
fn interdomain_send_sets_pending_and_wakes_the_blocked_peer() {
    let mut t = T::new();
    let pa = t.alloc_unbound(1, 2).unwrap();
    let pb = t.bind(2, 1, pa).unwrap();
    // Binding marks the binder's port pending (Xen); B takes it, then blocks.
    assert!(t.pending(2, pb));
    let si = t.hv.domains.get(2).unwrap().shared_info;
    t.env.phys.write_bytes(si, 0, &[0]); // upcall_pending
    t.env.phys.write_bytes(si, 8, &[0; 8]); // selector
    t.env.phys.write_bytes(si, 0x800, &[0; 8]);
    assert_eq!(t.call(2, hc::SCHED_OP, [sched_op::BLOCK, 0, 0, 0, 0]), 0);
    let vb = t.hv.domains.get(2).unwrap().vcpus[0];
    assert!(t.hv.sched.is_blocked(vb));
    assert_eq!(t.send(1, pa), 0);
    assert!(t.pending(2, pb));
    assert!(!t.hv.sched.is_blocked(vb), "the event woke B");
    assert_eq!(t.hv.domains.get(1).unwrap().io.evtchn_sends, 1, "counted");
    assert_eq!(t.hv.domains.get(2).unwrap().io.evtchn_sends, 0);
    assert_eq!(t.env.frame_bytes(si, 0, 1), [1], "upcall pending set");
    // Status from both sides.
    let st = EvtchnStatus {
        dom: DOMID_SELF,
        port: pa,
        ..Default::default()
    };
    let (r, b) = t.evtchn(1, eop::STATUS, &st.to_bytes());
    assert_eq!(r, 0);
    assert_eq!(
        EvtchnStatus::from_bytes(&b).unwrap().info(),
        Some(StatusInfo::Interdomain { dom: 2, port: pb })
    );
    // A closes: B's end reverts to unbound-to-A; B's sends are dropped silently.
    assert_eq!(t.evtchn(1, eop::CLOSE, &pa.to_le_bytes()).0, 0);
    let st = EvtchnStatus {
        dom: DOMID_SELF,
        port: pb,
        ..Default::default()
    };
    let (_, b) = t.evtchn(2, eop::STATUS, &st.to_bytes());
    assert_eq!(
        EvtchnStatus::from_bytes(&b).unwrap().info(),
        Some(StatusInfo::Unbound { remote_dom: 1 })
    );
    assert_eq!(t.send(2, pb), 0);
}

#[test]
fn evtchn_refusals_carry_xen_errnos() {
    let mut t = T::with(HvConfig {
        evtchn_max_ports: 8,
        ..HvConfig::default()
    });
    let pa = t.alloc_unbound(1, 2).unwrap();
    // C binds a port offered to B; invalid ports; sends on bad ports.
    assert_eq!(t.bind(3, 1, pa), Err(E(XenError::EINVAL)));
    assert_eq!(t.bind(3, 1, 4000), Err(E(XenError::EINVAL)));
    assert_eq!(t.bind(3, 77, 1), Err(E(XenError::ESRCH)));
    assert_eq!(t.send(1, 4095), E(XenError::EINVAL));
    assert_eq!(t.send(1, u32::MAX), E(XenError::EINVAL));
    assert_eq!(t.send(1, 0), E(XenError::EINVAL));
    assert_eq!(
        t.evtchn(1, eop::CLOSE, &9u32.to_le_bytes()).0,
        E(XenError::EINVAL)
    );
    // Acting for another domain without domain control.
    let foreign = EvtchnAllocUnbound {
        dom: 2,
        remote_dom: 1,
        port: 0,
    };
    assert_eq!(
        t.evtchn(1, eop::ALLOC_UNBOUND, &foreign.to_bytes()).0,
        E(XenError::EPERM)
    );
    // VIRQs: death events need the capability; unknown VIRQ; bad vCPU.
    let bv = |v, vcpu| {
        EvtchnBindVirq {
            virq: v,
            vcpu,
            port: 0,
        }
        .to_bytes()
    };
    assert_eq!(
        t.evtchn(1, eop::BIND_VIRQ, &bv(virq::DOM_EXC, 0)).0,
        E(XenError::EPERM)
    );
    assert_eq!(t.evtchn(2, eop::BIND_VIRQ, &bv(virq::DOM_EXC, 0)).0, 0);
    assert_eq!(
        t.evtchn(1, eop::BIND_VIRQ, &bv(99, 0)).0,
        E(XenError::EINVAL)
    );
    assert_eq!(
        t.evtchn(1, eop::BIND_VIRQ, &bv(virq::TIMER, 5)).0,
        E(XenError::ENOENT)
    );
    // PIRQs belong to device owners only (and to the domain that mapped them).
    assert_eq!(t.evtchn(1, eop::BIND_PIRQ, &[0; 12]).0, E(XenError::EPERM));
    // FIFO: not offered. A bad pointer: EFAULT.
    for op in [eop::INIT_CONTROL, eop::EXPAND_ARRAY, eop::SET_PRIORITY, 99] {
        assert_eq!(t.evtchn(1, op, &[0; 24]).0, E(XenError::ENOSYS), "op {op}");
    }
    assert_eq!(
        t.call(
            1,
            hc::EVENT_CHANNEL_OP,
            [u64::from(eop::SEND), 0xdead_0000, 0, 0, 0]
        ),
        E(XenError::EFAULT)
    );
    // Quota: 8 ports, port 0 reserved, one in use: six more, then ENOSPC.
    for _ in 0..6 {
        t.alloc_unbound(1, 3).unwrap();
    }
    assert_eq!(t.alloc_unbound(1, 3), Err(E(XenError::ENOSPC)));
}

#[test]
fn death_raises_dom_exc_and_closes_the_dead_domains_channels() {
    let mut t = T::new();
    let bv = EvtchnBindVirq {
        virq: virq::DOM_EXC,
        vcpu: 0,
        port: 0,
    };
    let (r, b) = t.evtchn(2, eop::BIND_VIRQ, &bv.to_bytes());
    assert_eq!(r, 0);
    let death_port = EvtchnBindVirq::from_bytes(&b).unwrap().port;
    let pc = t.alloc_unbound(3, 2).unwrap();
    let pb = t.bind(2, 3, pc).unwrap();
    assert!(!t.pending(2, death_port));
    let reason = shared_abi::hypercall_args::SchedShutdown { reason: 0 };
    use shared_abi::hypercall_args::Wire;
    let mut buf = [0u8; 4];
    reason.encode(&mut buf);
    t.put(3, ARG, &buf);
    t.call(3, hc::SCHED_OP, [sched_op::SHUTDOWN, ARG, 0, 0, 0]);
    assert!(t.pending(2, death_port));
    let st = EvtchnStatus {
        dom: DOMID_SELF,
        port: pb,
        ..Default::default()
    };
    let (_, b) = t.evtchn(2, eop::STATUS, &st.to_bytes());
    assert_eq!(
        EvtchnStatus::from_bytes(&b).unwrap().info(),
        Some(StatusInfo::Unbound { remote_dom: 3 })
    );
}

#[test]
fn timer_virq_is_raised_when_the_vcpu_timer_fires() {
    let mut t = T::new();
    let bv = EvtchnBindVirq {
        virq: virq::TIMER,
        vcpu: 0,
        port: 0,
    };
    let (_, b) = t.evtchn(1, eop::BIND_VIRQ, &bv.to_bytes());
    let port = EvtchnBindVirq::from_bytes(&b).unwrap().port;
    let v = t.hv.domains.get(1).unwrap().vcpus[0];
    t.hv.sched.set_timer(v, Some(1_000));
    t.env.clock.now.set(2_000_000);
    let cpu = t.cpu_of(1);
    let r = t.hv.timer_tick(&mut t.env.platform(), cpu);
    assert!(r.timers_fired.contains(&v));
    assert!(t.pending(1, port));
}

#[test]
fn table_ops_report_the_fixed_table_and_version_one() {
    let mut t = T::new();
    let q = GnttabQuerySize {
        dom: DOMID_SELF,
        ..Default::default()
    };
    let (r, b) = t.gnttab(1, gop::QUERY_SIZE, &q.to_bytes(), 1);
    let q = GnttabQuerySize::from_bytes(&b).unwrap();
    assert_eq!(
        (r, q.status, q.nr_frames),
        (0, 0, GRANT_TABLE_FRAMES as u32)
    );
    let s = GnttabSetupTable {
        dom: DOMID_SELF,
        nr_frames: 2,
        status: 0,
        frame_list: DATA,
    };
    let (r, b) = t.gnttab(1, gop::SETUP_TABLE, &s.to_bytes(), 1);
    assert_eq!(
        (r, GnttabSetupTable::from_bytes(&b).unwrap().status),
        (0, 0)
    );
    let frames = t.get(1, DATA, 16);
    assert_eq!(
        u64::from_le_bytes(frames[..8].try_into().unwrap()),
        GRANT_TABLE_VA >> 12
    );
    assert_eq!(
        u64::from_le_bytes(frames[8..].try_into().unwrap()),
        (GRANT_TABLE_VA >> 12) + 1
    );
    let too_many = GnttabSetupTable { nr_frames: 99, ..s };
    let (_, b) = t.gnttab(1, gop::SETUP_TABLE, &too_many.to_bytes(), 1);
    assert_eq!(
        GnttabSetupTable::from_bytes(&b).unwrap().status,
        GntStatus::GeneralError.as_i16()
    );
    let foreign = GnttabSetupTable { dom: 2, ..s };
    let (_, b) = t.gnttab(1, gop::SETUP_TABLE, &foreign.to_bytes(), 1);
    assert_eq!(
        GnttabSetupTable::from_bytes(&b).unwrap().status,
        GntStatus::PermissionDenied.as_i16()
    );
    for (v, want) in [(1, 0), (2, E(XenError::ENOSYS)), (3, E(XenError::EINVAL))] {
        let (r, b) = t.gnttab(
            1,
            gop::SET_VERSION,
            &GnttabSetVersion { version: v }.to_bytes(),
            1,
        );
        assert_eq!(r, want);
        assert_eq!(GnttabSetVersion::from_bytes(&b).unwrap().version, 1);
    }
    assert_eq!(
        t.gnttab(1, gop::QUERY_SIZE, &[0; 16], 2).0,
        E(XenError::EINVAL)
    );
    assert_eq!(
        t.gnttab(1, gop::COPY, &[0; 16], 5000).0,
        E(XenError::EINVAL)
    );
    assert_eq!(
        t.gnttab(1, gop::TRANSFER, &[0; 24], 1).0,
        E(XenError::ENOSYS)
    );
}

#[test]
fn readonly_map_is_a_readonly_pte_and_keeps_the_grant_busy_until_unmapped() {
    let mut t = T::new();
    t.put(1, DATA, b"granted data");
    t.grant(1, 8, 2, DATA, true);
    // Writable mapping of a read-only grant; mapping without GRANT_MAP; bad addresses.
    assert_eq!(
        t.map(2, 1, 8, GRANT_MAP_BASE, false).0,
        GntStatus::GeneralError.as_i16()
    );
    assert_eq!(
        t.map(3, 1, 8, GRANT_MAP_BASE, true).0,
        GntStatus::PermissionDenied.as_i16()
    );
    for bad in [GRANT_MAP_BASE + 1, HEAP_BASE, 0, !0xfff] {
        assert_eq!(
            t.map(2, 1, 8, bad, true).0,
            GntStatus::BadVirtAddr.as_i16(),
            "{bad:#x}"
        );
    }
    assert_eq!(
        t.map(2, 1, 9, GRANT_MAP_BASE, true).0,
        GntStatus::GeneralError.as_i16()
    );
    assert_eq!(
        t.map(2, 1, 1 << 20, GRANT_MAP_BASE, true).0,
        GntStatus::BadGntref.as_i16()
    );
    assert_eq!(
        t.map(2, 77, 8, GRANT_MAP_BASE, true).0,
        GntStatus::BadDomain.as_i16()
    );
    let (st, h) = t.map(2, 1, 8, GRANT_MAP_BASE, true);
    assert_eq!(st, 0);
    let (frame, perms) =
        t.hv.domains
            .get(2)
            .unwrap()
            .aspace
            .as_ref()
            .unwrap()
            .translate(GRANT_MAP_BASE)
            .unwrap();
    assert_eq!(perms, PagePerms::USER_RO);
    assert_eq!(Some(&frame), t.hv.domains.get(1).unwrap().pages.get(&DATA));
    assert_eq!(t.get(2, GRANT_MAP_BASE, 12), b"granted data");
    assert_ne!(t.flags(1, 8) & gtf::READING, 0, "busy while mapped");
    assert_eq!(
        t.hv.domains.get(1).unwrap().io.grant_maps,
        1,
        "only the mapping that succeeded counts, against the granter"
    );
    assert_eq!(
        t.map(2, 1, 8, GRANT_MAP_BASE, true).0,
        GntStatus::BadVirtAddr.as_i16()
    );
    assert_eq!(t.unmap(2, h + 7, 0), GntStatus::BadHandle.as_i16());
    assert_eq!(
        t.unmap(2, h, GRANT_MAP_BASE + 0x1000),
        GntStatus::GeneralError.as_i16()
    );
    assert_eq!(t.unmap(2, h, GRANT_MAP_BASE), 0);
    assert_eq!(t.flags(1, 8) & (gtf::READING | gtf::WRITING), 0);
    assert!(
        t.hv.domains
            .get(2)
            .unwrap()
            .aspace
            .as_ref()
            .unwrap()
            .translate(GRANT_MAP_BASE)
            .is_none()
    );
    assert_eq!(t.unmap(2, h, GRANT_MAP_BASE), GntStatus::BadHandle.as_i16());
}

#[test]
fn granter_death_keeps_the_mapped_frame_until_the_last_unmap() {
    let mut t = T::new();
    t.put(1, DATA, b"still here");
    t.grant(1, 8, 2, DATA, false);
    let frame: Mfn = *t.hv.domains.get(1).unwrap().pages.get(&DATA).unwrap();
    let (st, h) = t.map(2, 1, 8, GRANT_MAP_BASE, false);
    assert_eq!(st, 0);
    let free_before = t.env.frames.outstanding();
    t.hv.destroy_domain(&mut t.env.platform(), 1);
    t.settle();
    let free_mid = t.env.frames.outstanding();
    assert_eq!(t.hv.frame_refs.lock().orphans(), 1);
    assert!(t.env.console.text().contains("kept out of the pool"));
    assert!(free_mid < free_before);
    assert_eq!(t.get(2, GRANT_MAP_BASE, 10), b"still here");
    t.put(2, GRANT_MAP_BASE, b"written");
    assert_eq!(t.unmap(2, h, GRANT_MAP_BASE), 0);
    assert_eq!(
        t.env.frames.outstanding(),
        free_mid - 1,
        "frame back in the pool"
    );
    assert_eq!(t.hv.frame_refs.lock().orphans(), 0);
    assert_eq!(t.hv.frame_refs.lock().refs(frame), 0);
}

#[test]
fn mapper_death_tears_its_mappings_down_and_frees_the_grant() {
    let mut t = T::new();
    t.grant(1, 8, 2, DATA, true);
    assert_eq!(t.map(2, 1, 8, GRANT_MAP_BASE, true).0, 0);
    assert_ne!(t.flags(1, 8) & gtf::READING, 0);
    t.hv.destroy_domain(&mut t.env.platform(), 2);
    t.settle();
    assert_eq!(t.flags(1, 8) & gtf::READING, 0);
    assert_eq!(
        t.hv.frame_refs
            .lock()
            .refs(*t.hv.domains.get(1).unwrap().pages.get(&DATA).unwrap()),
        0
    );
}

#[test]
fn maptrack_quota_gives_no_space() {
    let mut t = T::with(HvConfig {
        maptrack_max: 3,
        ..HvConfig::default()
    });
    t.grant(1, 8, 2, DATA, true);
    for i in 0..3 {
        assert_eq!(t.map(2, 1, 8, GRANT_MAP_BASE + i * 0x1000, true).0, 0);
    }
    assert_eq!(
        t.map(2, 1, 8, GRANT_MAP_BASE + 0x3000, true).0,
        GntStatus::NoSpace.as_i16()
    );
}

#[test]
fn copy_moves_bytes_both_ways_and_checks_every_element() {
    let mut t = T::new();
    t.put(1, DATA, &[0xAB; 64]);
    t.grant(1, 8, 3, DATA, false);
    t.put(3, DATA + 0x100, b"from c");
    let to_a = GnttabCopy {
        source: GnttabCopyPtr {
            u: DATA >> 12,
            domid: DOMID_SELF,
            offset: 0x100,
        },
        dest: GnttabCopyPtr {
            u: 8,
            domid: 1,
            offset: 10,
        },
        len: 6,
        flags: gntcopy::DEST_GREF,
        status: 0,
    };
    let from_a = GnttabCopy {
        source: GnttabCopyPtr {
            u: 8,
            domid: 1,
            offset: 0,
        },
        dest: GnttabCopyPtr {
            u: DATA >> 12,
            domid: DOMID_SELF,
            offset: 0x800,
        },
        len: 20,
        flags: gntcopy::SOURCE_GREF,
        status: 0,
    };
    let bad_len = GnttabCopy {
        len: 4000,
        ..from_a
    };
    let not_self = GnttabCopy {
        dest: GnttabCopyPtr {
            u: DATA >> 12,
            domid: 3,
            offset: 0,
        },
        ..from_a
    };
    let mut batch = Vec::new();
    for c in [to_a, from_a, bad_len, not_self] {
        batch.extend_from_slice(&c.to_bytes());
    }
    let (r, b) = t.gnttab(3, gop::COPY, &batch, 4);
    assert_eq!(r, 0);
    let st: Vec<i16> = b
        .chunks(40)
        .map(|c| GnttabCopy::from_bytes(c).unwrap().status)
        .collect();
    assert_eq!(
        st,
        [
            0,
            0,
            GntStatus::BadCopyArg.as_i16(),
            GntStatus::PermissionDenied.as_i16()
        ]
    );
    assert_eq!(&t.get(1, DATA + 10, 6), b"from c");
    let mut want = [0xABu8; 20];
    want[10..16].copy_from_slice(b"from c");
    assert_eq!(t.get(3, DATA + 0x800, 20), want);
    assert_eq!(
        t.flags(1, 8) & (gtf::READING | gtf::WRITING),
        0,
        "copy leaves no pin"
    );
    // I/O counters: the two good copies went through A's grant (26 bytes), done by C.
    let io = |t: &T, d: DomId| t.hv.domains.get(d).unwrap().io;
    assert_eq!(io(&t, 1).grant_copy_bytes, 26);
    assert_eq!(io(&t, 3).grant_copies_done, 2);
    assert_eq!(
        (io(&t, 3).grant_copy_bytes, io(&t, 1).grant_copies_done),
        (0, 0)
    );
}
