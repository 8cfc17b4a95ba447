//! The portable hypervisor state (domain table + scheduler) and the entry points the arch
//! layer calls: syscall entry ([`Hypervisor::hypercall`]), CPU exceptions in a domain
//! ([`Hypervisor::fault`]), the timer interrupt ([`Hypervisor::timer_tick`]), picking the
//! next vCPU ([`Hypervisor::schedule`]), and reporting which address space a CPU has loaded
//! ([`Hypervisor::address_space_loaded`]), which is when dying domains are freed.
//!
//! Every entry point takes a [`Platform`]: the arch layer's frame pool, physical memory
//! access, page-table factory, clock and console, borrowed for the call.

use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::shared_info::{LEGACY_MAX_VCPUS, VcpuTimeInfo};
use shared_abi::start_info::EntryState;

use shared_abi::event_channel::virq;
use spin::Mutex;

use super::console::{ConsoleSink, MgmtLine};
use super::memory::{AddressSpaceFactory, FrameSource, Mfn, PhysMem, ReservedFrames};
use super::shared::{FrameRefs, HvGrantMemory};
use super::{DomainState, DomainTable, ExitReason, FaultInfo, ShutdownReason};
use crate::evtchn::{self, Delivery};
use crate::gnttab;
use crate::sched::{CpuId, CpuSet, Decision, SchedConfig, Scheduler, TickResult, VcpuId};

/// Hypervisor system time and the TSC.
pub trait Clock {
    /// Nanoseconds since boot (monotonic).
    fn now_ns(&self) -> u64;
    /// The TSC now.
    fn tsc(&self) -> u64;
    /// TSC ticks per second.
    fn tsc_hz(&self) -> u64;
}

/// What the portable code borrows from the arch layer for one call.
pub struct Platform<'a> {
    pub frames: &'a mut dyn FrameSource,
    pub phys: &'a dyn PhysMem,
    pub mmu: &'a mut dyn AddressSpaceFactory,
    pub clock: &'a dyn Clock,
    pub console: &'a mut dyn ConsoleSink,
    /// The management serial line (`domctl MGMT_IO`).
    pub mgmt: &'a mut dyn MgmtLine,
}

/// Policy knobs of the core.
#[derive(Clone, Copy, Debug)]
pub struct HvConfig {
    /// Free a domain's memory as soon as it shuts down (no toolstack keeps it for
    /// inspection yet). Faults always free at once.
    pub destroy_on_shutdown: bool,
    pub sched: SchedConfig,
    /// Event-channel ports per domain, port 0 included (2..=4096; beyond: `-ENOSPC`).
    pub evtchn_max_ports: u32,
    /// Grant mappings one domain may hold at once (beyond: `GNTST_no_space`).
    pub maptrack_max: u32,
}

/// Xen's default `max_event_channels` for a guest is 1023 usable ports.
pub const DEFAULT_EVTCHN_MAX_PORTS: u32 = 1024;
/// Default maptrack quota (shared with backends, which budget their mappings within it).
pub const DEFAULT_MAPTRACK_MAX: u32 = shared_abi::grant_table::DEFAULT_MAPTRACK_QUOTA;

impl Default for HvConfig {
    fn default() -> Self {
        HvConfig {
            destroy_on_shutdown: true,
            sched: SchedConfig::default(),
            evtchn_max_ports: DEFAULT_EVTCHN_MAX_PORTS,
            maptrack_max: DEFAULT_MAPTRACK_MAX,
        }
    }
}

/// What the arch layer must do after a hypercall, fault or event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exit {
    /// The value for the caller's RAX (hypercalls only).
    pub ret: i64,
    /// This CPU must call [`Hypervisor::schedule`] before returning to a domain.
    pub resched: bool,
    /// Other CPUs to interrupt.
    pub kicks: CpuSet,
}

/// The hypervisor's portable state.
pub struct Hypervisor {
    pub domains: DomainTable,
    pub sched: Scheduler,
    pub config: HvConfig,
    /// Per CPU: the domain whose address space is loaded (CR3), if any.
    loaded: Vec<Option<DomId>>,
    /// Kicks produced outside an entry point (e.g. by building a domain), handed out by the
    /// next [`Hypervisor::take_kicks`].
    pub(crate) pending_kicks: CpuSet,
    /// References on frames that grant mappings hold, and orphans (see [`super::shared`]).
    pub frame_refs: Mutex<FrameRefs>,
    /// The next domain instance number.
    pub(crate) next_instance: u64,
    /// Driver domains' PCI configuration access (`physdev_op`); `None` until the arch layer
    /// installs it (no PCI: every call answers `-ENODEV`).
    pub pci: Option<alloc::boxed::Box<dyn crate::pci::owner::OwnerConfig>>,
    /// Device interrupts mapped by driver domains (`physdev_op` map_pirq).
    pub irqs: crate::irq::IrqTable,
    /// The boot domains' manifest entries, kept for rebuilds (`None` until the arch layer
    /// installs them; see [`super::boot`]).
    pub boot: Option<alloc::boxed::Box<super::boot::BootSet>>,
    /// Run-time domains kept on shutdown for some reasons (`CREATE_DOMAIN`'s
    /// `CREATE_PRESERVE_*` flags), until reaped.
    pub(crate) preserve: alloc::collections::BTreeMap<DomId, u32>,
}

impl Hypervisor {
    pub fn new(nr_cpus: usize, config: HvConfig, now: u64) -> Self {
        let sched = Scheduler::new(nr_cpus, config.sched, now);
        Hypervisor {
            domains: DomainTable::new(),
            loaded: alloc::vec![None; sched.nr_cpus()],
            sched,
            config,
            pending_kicks: CpuSet::EMPTY,
            frame_refs: Mutex::new(FrameRefs::default()),
            next_instance: 1,
            pci: None,
            irqs: crate::irq::IrqTable::default(),
            boot: None,
            preserve: alloc::collections::BTreeMap::new(),
        }
    }

    /// Whether `dom`, shutting down for `reason`, is kept: a boot domain whose policy for it
    /// is `preserve`, or a run-time domain created with the matching `CREATE_PRESERVE_*`
    /// flag.
    fn preserves(&self, dom: DomId, reason: ShutdownReason) -> bool {
        use shared_abi::hypercall_args::domctl as dc;
        let flag = match reason {
            ShutdownReason::Poweroff => dc::CREATE_PRESERVE_POWEROFF,
            ShutdownReason::Reboot => dc::CREATE_PRESERVE_REBOOT,
            _ => dc::CREATE_PRESERVE_CRASH,
        };
        self.preserve.get(&dom).is_some_and(|f| f & flag != 0)
            || self.boot.as_ref().is_some_and(|b| b.preserves(dom, reason))
    }

    /// CPUs to interrupt because of work created outside the entry points.
    pub fn take_kicks(&mut self) -> CpuSet {
        core::mem::take(&mut self.pending_kicks)
    }

    /// The register state a freshly built domain starts with.
    pub fn entry_state(&self, dom: DomId) -> Option<EntryState> {
        self.domains
            .get(dom)
            .map(|d| EntryState::for_entry(d.entry))
    }

    /// The page-table root to load for `dom`.
    pub fn address_space_root(&self, dom: DomId) -> Option<Mfn> {
        self.domains.get(dom)?.aspace.as_ref().map(|a| a.root())
    }

    /// Shut a domain down: it stops running, the reason is recorded; with
    /// `destroy_on_shutdown` (and always for crashes by fault) it is destroyed too.
    pub fn shutdown_domain(
        &mut self,
        p: &mut Platform<'_>,
        dom: DomId,
        exit: ExitReason,
    ) -> CpuSet {
        let now = p.clock.now_ns();
        let Some(d) = self.domains.get_mut(dom) else {
            return CpuSet::EMPTY;
        };
        let reason = exit.shutdown_reason();
        if !d.set_state(DomainState::Shutdown(reason)) {
            return CpuSet::EMPTY;
        }
        d.exit = Some(exit);
        if d.console.has_partial_line() {
            let name = d.name.clone();
            d.console.flush(&name, p.console);
        }
        let mut line = alloc::format!("(hv) domain {dom} ({}) stopped: {exit}\n", d.name);
        line.truncate(256);
        p.console.write(line.as_bytes());
        let mut kicks = self.sched.pause_domain(dom, now);
        kicks = kicks.union(self.raise_dom_exc(p));
        // A domain whose policy for this reason is `preserve` keeps its memory.
        let preserve = self.preserves(dom, reason);
        if (self.config.destroy_on_shutdown && !preserve) || matches!(exit, ExitReason::Fault(_)) {
            kicks = kicks.union(self.destroy_domain(p, dom));
        }
        kicks
    }

    /// Destroy a domain: it leaves the scheduler now and its memory is freed as soon as no
    /// CPU has its address space loaded.
    pub fn destroy_domain(&mut self, p: &mut Platform<'_>, dom: DomId) -> CpuSet {
        let Some(d) = self.domains.get_mut(dom) else {
            return CpuSet::EMPTY;
        };
        if !d.set_state(DomainState::Dying) {
            return CpuSet::EMPTY;
        }
        // Its devices first: no DMA may reach its frames once they can go back to the pool.
        if let Some(pci) = self.pci.as_mut() {
            pci.release(dom);
        }
        // Its devices are quiesced (MSI-X off): their vectors can go.
        self.irqs.release_domain(dom);
        let mut kicks = self.sched.remove_domain(dom);
        self.release_sharing(p, dom);
        kicks = kicks.union(self.raise_dom_exc(p));
        self.reap(p);
        kicks
    }

    /// A dying domain's event channels are closed (peers' ends revert to unbound), the grant
    /// mappings it holds are removed from its address space and released, and its grant table
    /// goes (mappings others hold of its pages keep those frames referenced).
    fn release_sharing(&mut self, p: &mut Platform<'_>, dom: DomId) {
        if self.domains.get(dom).is_some_and(|d| d.evtchn.is_some()) {
            // Only ESRCH is possible (the state is there): nothing to undo either way.
            let _ = evtchn::reset(&self.domains, dom);
        }
        let unmapped = {
            let mem = HvGrantMemory {
                domains: &self.domains,
                refs: &self.frame_refs,
                phys: p.phys,
            };
            gnttab::map::teardown_mapper(&self.domains, dom, &mem)
        };
        if let Some(d) = self.domains.get_mut(dom) {
            if let Some(a) = d.aspace.as_mut() {
                for u in &unmapped {
                    a.unmap(u.host_addr);
                }
            }
            d.evtchn = None;
            d.grants = None;
        }
        self.free_orphans(p);
    }

    /// Return to the pool every orphaned frame whose last reference went.
    pub(crate) fn free_orphans(&mut self, p: &mut Platform<'_>) {
        let freeable = self.frame_refs.lock().take_freeable();
        if freeable.is_empty() {
            return;
        }
        for &f in &freeable {
            p.frames.free_frame(f);
        }
        let line = alloc::format!(
            "(hv) {} orphaned frame(s) back in the pool after their last grant mapping went (free frames {})\n",
            freeable.len(),
            p.frames.free_frames().map_or(-1, |n| n as i64),
        );
        p.console.write(line.as_bytes());
    }

    /// Raise `VIRQ_DOM_EXC` in every live domain that bound it (a domain stopped or died).
    pub(crate) fn raise_dom_exc(&mut self, p: &mut Platform<'_>) -> CpuSet {
        let targets: Vec<DomId> = self
            .domains
            .iter()
            .filter(|d| d.state().is_alive() && d.evtchn.is_some())
            .map(|d| d.id)
            .collect();
        targets.into_iter().fold(CpuSet::EMPTY, |k, t| {
            k.union(self.raise_virq(p, t, virq::DOM_EXC, 0))
        })
    }

    /// Raise `virq` in `dom` (on `vcpu` for per-vCPU VIRQs), if it bound it; wakes as needed.
    pub fn raise_virq(
        &mut self,
        p: &mut Platform<'_>,
        dom: DomId,
        virq_nr: u32,
        vcpu: u32,
    ) -> CpuSet {
        let delivery = match self.domains.get(dom).and_then(|d| d.evtchn.as_ref()) {
            Some(e) => e.lock().raise_virq(virq_nr, vcpu),
            None => None,
        };
        match delivery {
            Some(d) => self.deliver(p, dom, d),
            None => CpuSet::EMPTY,
        }
    }

    /// Act on what setting a port pending did (Xen's `evtchn_2l_set_pending` tail): a new
    /// upcall wakes the notified vCPU and the domain's pollers; a newly pending bit without an
    /// upcall (masked, or the upcall already pending) still wakes pollers.
    pub fn deliver(&mut self, p: &mut Platform<'_>, dom: DomId, d: Delivery) -> CpuSet {
        match d.kick {
            Some(v) => self.event_pending(p, dom, v),
            None if d.newly_pending => self.event_pending(p, dom, u32::MAX),
            None => CpuSet::EMPTY,
        }
    }

    /// Console input is waiting: raise `VIRQ_CONSOLE` in every console-service domain that
    /// bound it (other domains bind it for their own input, `domctl CONSOLE_WRITE`). For the arch layer's serial receive path.
    pub fn console_input(&mut self, p: &mut Platform<'_>) -> CpuSet {
        let targets: Vec<DomId> = self
            .domains
            .iter()
            .filter(|d| {
                d.state().is_alive()
                    && d.evtchn.is_some()
                    && d.caps
                        .contains(shared_abi::capability::Capabilities::CONSOLE_SERVICE)
            })
            .map(|d| d.id)
            .collect();
        targets.into_iter().fold(CpuSet::EMPTY, |k, t| {
            k.union(self.raise_virq(p, t, virq::CONSOLE, 0))
        })
    }

    /// Free every dying domain no CPU runs or has loaded.
    fn reap(&mut self, p: &mut Platform<'_>) {
        let dying: Vec<DomId> = self
            .domains
            .iter()
            .filter(|d| d.state() == DomainState::Dying)
            .map(|d| d.id)
            .collect();
        for id in dying {
            if self.sched.domain_on_cpu(id) || self.loaded.contains(&Some(id)) {
                continue;
            }
            let Some(d) = self.domains.get_mut(id) else {
                continue;
            };
            // Views of its shared pages go before the pages do (normally already gone).
            d.evtchn = None;
            d.grants = None;
            let mut kept = 0u64;
            let mut frames = ReservedFrames {
                reservation: &mut d.reservation,
                pool: &mut *p.frames,
            };
            if let Some(mut aspace) = d.aspace.take() {
                // Device pages are not the domain's frames: unmapped, never freed.
                for m in core::mem::take(&mut d.mmio) {
                    for i in 0..m.pages {
                        aspace.unmap(m.va + i * crate::domain::memory::PAGE_SIZE);
                    }
                }
                for (va, f) in core::mem::take(&mut d.pages) {
                    aspace.unmap(va);
                    if self.frame_refs.lock().release(f) {
                        frames.free_frame(f);
                    } else {
                        frames.reservation.uncharge();
                        kept += 1;
                    }
                }
                aspace.release(&mut frames);
            }
            if kept > 0 {
                let mut line = alloc::format!(
                    "(hv) domain {id} ({}) died with {kept} page(s) mapped by other domains: kept out of the pool until unmapped (free frames {})\n",
                    d.name,
                    p.frames.free_frames().map_or(-1, |n| n as i64),
                );
                line.truncate(256);
                p.console.write(line.as_bytes());
            }
            // Its console history goes with it.
            d.console.release_history();
            d.set_state(DomainState::Dead);
            self.preserve.remove(&id);
        }
    }

    /// The arch layer loaded `dom`'s address space on `cpu` (or the hypervisor's own, for
    /// `None`). Dying domains no CPU holds any more are freed here.
    pub fn address_space_loaded(&mut self, p: &mut Platform<'_>, cpu: CpuId, dom: Option<DomId>) {
        if let Some(slot) = self.loaded.get_mut(cpu) {
            *slot = dom;
        }
        self.reap(p);
    }

    /// A CPU exception in the domain running on `cpu`: that domain stops, its memory is
    /// freed, the fault is its recorded exit reason. Every other domain goes on.
    pub fn fault(&mut self, p: &mut Platform<'_>, cpu: CpuId, info: FaultInfo) -> Exit {
        let Some((dom, _)) = self.sched.current(cpu).and_then(|v| self.sched.owner(v)) else {
            return Exit {
                resched: true,
                ..Exit::default()
            };
        };
        let kicks = self.shutdown_domain(p, dom, ExitReason::Fault(info));
        Exit {
            ret: 0,
            resched: true,
            kicks: CpuSet(kicks.0 & !(1u64 << cpu.min(63))),
        }
    }

    /// The timer interrupt on `cpu`.
    pub fn timer_tick(&mut self, p: &mut Platform<'_>, cpu: CpuId) -> TickResult {
        let now = p.clock.now_ns();
        let mut r = self.sched.tick(cpu, now);
        let fired = core::mem::take(&mut r.timers_fired);
        for &v in &fired {
            let Some((dom, idx)) = self.sched.owner(v) else {
                continue;
            };
            if let Some(d) = self.domains.get_mut(dom)
                && let Some(flag) = d.polling.get_mut(idx as usize)
            {
                *flag = false;
            }
            let delivery = match self.domains.get(dom).and_then(|d| d.evtchn.as_ref()) {
                Some(e) => e.lock().raise_virq(virq::TIMER, idx),
                None => None,
            };
            // Bound and unmasked: the upcall-pending flag ends a later block by itself.
            if delivery.as_ref().is_some_and(|d| d.kick.is_some()) {
                self.sched.timer_delivered(v);
            }
            let k = match delivery {
                Some(d) => self.deliver(p, dom, d),
                None => CpuSet::EMPTY,
            };
            if k.contains(cpu) {
                r.resched = true;
            }
            r.kicks = r.kicks.union(CpuSet(k.0 & !(1u64 << cpu.min(63))));
        }
        r.timers_fired = fired;
        if self.irqs.next_unmask().is_some_and(|t| now >= t) {
            for u in self.irqs.due_unmasks(now) {
                if let Some(pci) = self.pci.as_mut() {
                    pci.msix_mask(u.owner, u.address, u.entry, false);
                }
            }
        }
        r
    }

    /// A device interrupt on CPU `vector` (taken at `tsc`): the bound port of its pirq goes
    /// pending; a storming entry is masked at the device and reported. Returns the CPUs to
    /// kick (the woken vCPU's).
    pub fn device_interrupt(&mut self, p: &mut Platform<'_>, vector: u8, tsc: u64) -> CpuSet {
        use crate::irq::IrqAction;
        let now = p.clock.now_ns();
        let deliver = match self.irqs.interrupt(vector, now, tsc) {
            IrqAction::Stray | IrqAction::Unbound => None,
            IrqAction::Deliver { owner, port, pirq } => Some((owner, port, pirq)),
            IrqAction::Storm {
                owner,
                address,
                entry,
                deliver,
            } => {
                if let Some(pci) = self.pci.as_mut() {
                    pci.msix_mask(owner, address, entry, true);
                }
                let line = alloc::format!(
                    "(hv) interrupt storm from {:02x}:{:02x}.{} MSI-X entry {entry} (domain {owner}): masked for a quiet period\n",
                    address.bus,
                    address.device,
                    address.function
                );
                p.console.write(line.as_bytes());
                deliver.map(|(port, pirq)| (owner, port, pirq))
            }
        };
        let Some((owner, port, pirq)) = deliver else {
            return CpuSet::EMPTY;
        };
        let delivery = match self.domains.get(owner).and_then(|d| d.evtchn.as_ref()) {
            Some(e) => e.lock().raise_pirq(port, pirq),
            None => None,
        };
        match delivery {
            Some(d) => self.deliver(p, owner, d),
            None => CpuSet::EMPTY,
        }
    }

    /// Pick what `cpu` runs next. Before entering the chosen vCPU the arch layer loads its
    /// domain's address space, calls [`Hypervisor::address_space_loaded`], and restores its
    /// registers (or the [`EntryState`] on first entry).
    pub fn schedule(&mut self, p: &mut Platform<'_>, cpu: CpuId) -> Decision {
        let now = p.clock.now_ns();
        let d = self.sched.schedule(cpu, now);
        if let Some(v) = d.next {
            self.publish_time(p, v);
        }
        d
    }

    /// Write the vCPU's time info into its `shared_info` slot (seqlock: odd version while
    /// writing).
    pub fn publish_time(&mut self, p: &mut Platform<'_>, v: VcpuId) {
        let Some((dom, idx)) = self.sched.owner(v) else {
            return;
        };
        if idx as usize >= LEGACY_MAX_VCPUS {
            return;
        }
        let Some(d) = self.domains.get(dom) else {
            return;
        };
        let at = idx as usize * 64 + 32;
        let mut ver = [0u8; 4];
        p.phys.read(d.shared_info, at, &mut ver);
        let ver = u32::from_le_bytes(ver);
        let (mul, shift) = VcpuTimeInfo::scale_for_tsc_hz(p.clock.tsc_hz());
        let t = VcpuTimeInfo {
            version: ver.wrapping_add(1) | 1,
            pad0: 0,
            tsc_timestamp: p.clock.tsc(),
            system_time: p.clock.now_ns(),
            tsc_to_system_mul: mul,
            tsc_shift: shift,
            flags: shared_abi::shared_info::PVCLOCK_TSC_STABLE,
            pad1: [0; 2],
        };
        p.phys.write(d.shared_info, at, &t.version.to_le_bytes());
        let mut body = [0u8; 24];
        body[0..8].copy_from_slice(&t.tsc_timestamp.to_le_bytes());
        body[8..16].copy_from_slice(&t.system_time.to_le_bytes());
        body[16..20].copy_from_slice(&t.tsc_to_system_mul.to_le_bytes());
        body[20] = t.tsc_shift as u8;
        body[21] = t.flags;
        p.phys.write(d.shared_info, at + 8, &body);
        p.phys
            .write(d.shared_info, at, &t.version.wrapping_add(1).to_le_bytes());
    }

    /// The event-channel layer marked `port` pending for `dom`, notifying vCPU `vcpu`:
    /// wake that vCPU if it is blocked, and every vCPU of the domain blocked in a poll.
    pub fn event_pending(&mut self, p: &mut Platform<'_>, dom: DomId, vcpu: u32) -> CpuSet {
        let now = p.clock.now_ns();
        let Some(d) = self.domains.get_mut(dom) else {
            return CpuSet::EMPTY;
        };
        let mut wake: Vec<VcpuId> = Vec::new();
        for (i, &v) in d.vcpus.iter().enumerate() {
            let polling = d.polling.get(i).copied().unwrap_or(false);
            if i as u32 == vcpu || polling {
                wake.push(v);
            }
            if polling && let Some(f) = d.polling.get_mut(i) {
                *f = false;
            }
        }
        wake.into_iter()
            .fold(CpuSet::EMPTY, |k, v| k.union(self.sched.wake(v, now)))
    }

    /// Status line for a domain: `(name, state, exit reason)`.
    pub fn describe(&self, dom: DomId) -> Option<(&str, DomainState, Option<ExitReason>)> {
        self.domains
            .get(dom)
            .map(|d| (d.name.as_str(), d.state(), d.exit))
    }

    /// True once every domain has stopped (the `exit_when_done` condition).
    pub fn all_stopped(&self) -> bool {
        self.domains.iter().all(|d| {
            !matches!(
                d.state(),
                DomainState::Running | DomainState::Paused | DomainState::Building
            )
        })
    }

    /// Shutdown reason helper for callers without an `ExitReason` at hand.
    pub fn crash(&mut self, p: &mut Platform<'_>, dom: DomId) -> CpuSet {
        self.shutdown_domain(p, dom, ExitReason::Shutdown(ShutdownReason::Crash))
    }
}
