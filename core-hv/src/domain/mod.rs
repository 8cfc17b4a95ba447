//! Domains: the table of domains, their lifecycle, the builder that makes them from ELF
//! images, the checked guest-memory accessor and the hypercall dispatcher.
//!
//! Lifecycle (the only legal transitions, checked in [`DomainState::can_become`]):
//!
//! ```text
//! Building ──► Running ◄──► Paused
//!    │            │            │
//!    │            ▼            ▼
//!    │        Shutdown(reason) ◄┘
//!    │            │
//!    └──────────► Dying ──► Dead
//! ```
//!
//! `Dying` means "no longer scheduled, memory not yet returned": a CPU may still have the
//! address space loaded. A dying domain becomes `Dead` once no CPU runs or has loaded it;
//! then every frame it held (its pages and its page tables) is back in the pool and its
//! reservation reads zero. A dead domain keeps its table entry (name, exit reason) so the
//! reason can be reported; its id is never reused within one boot.
//!
//! Lock order: the arch layer keeps the whole [`Hypervisor`] (domain table + scheduler)
//! under one lock, taken on syscall entry, faults and timer ticks; the frame pool's lock
//! nests inside it. Inside it, each domain's event-channel and grant state has its own
//! uncontended mutex (taken one at a time, or two lower-domid-first for event channels),
//! and the frame reference counts' mutex last ([`shared`]). Nothing here blocks.
//!
//! Teardown order (why the shared-page views are safe): a domain that becomes `Dying`
//! closes its event channels (peers revert to unbound), loses every grant mapping it held
//! (unmapped from its address space), and drops its grant table (mappings others hold keep
//! their frames referenced); only later, in `reap`, are its pages freed, a referenced page
//! becoming an orphan that returns to the pool on its last unmap.

pub mod boot;
pub mod builder;
pub mod console;
pub mod elf;
#[cfg(test)]
pub mod fake;
pub mod guest_memory;
pub mod hypercall;
pub mod hypervisor;
pub mod memory;
pub mod shared;
mod xenstore_port;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::hypercall::sched_op;
use shared_abi::start_info::PciAddress;

pub use hypervisor::{Clock, HvConfig, Hypervisor, Platform};

use crate::sched::VcpuId;
use console::DomainConsole;
use memory::{AddressSpace, Mfn, Reservation};

/// Why a domain stopped (`SHUTDOWN_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    Poweroff,
    Reboot,
    Suspend,
    Crash,
    Watchdog,
    SoftReset,
}

impl ShutdownReason {
    /// The reason for a `SHUTDOWN_*` code; `None` for codes Xen does not define.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            sched_op::SHUTDOWN_POWEROFF => ShutdownReason::Poweroff,
            sched_op::SHUTDOWN_REBOOT => ShutdownReason::Reboot,
            sched_op::SHUTDOWN_SUSPEND => ShutdownReason::Suspend,
            sched_op::SHUTDOWN_CRASH => ShutdownReason::Crash,
            sched_op::SHUTDOWN_WATCHDOG => ShutdownReason::Watchdog,
            sched_op::SHUTDOWN_SOFT_RESET => ShutdownReason::SoftReset,
            _ => return None,
        })
    }

    pub fn code(self) -> u32 {
        match self {
            ShutdownReason::Poweroff => sched_op::SHUTDOWN_POWEROFF,
            ShutdownReason::Reboot => sched_op::SHUTDOWN_REBOOT,
            ShutdownReason::Suspend => sched_op::SHUTDOWN_SUSPEND,
            ShutdownReason::Crash => sched_op::SHUTDOWN_CRASH,
            ShutdownReason::Watchdog => sched_op::SHUTDOWN_WATCHDOG,
            ShutdownReason::SoftReset => sched_op::SHUTDOWN_SOFT_RESET,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ShutdownReason::Poweroff => "poweroff",
            ShutdownReason::Reboot => "reboot",
            ShutdownReason::Suspend => "suspend",
            ShutdownReason::Crash => "crash",
            ShutdownReason::Watchdog => "watchdog",
            ShutdownReason::SoftReset => "soft_reset",
        }
    }
}

/// A CPU exception taken in a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultInfo {
    pub vector: u8,
    pub error_code: u64,
    pub rip: u64,
    /// Faulting address for #PF.
    pub cr2: u64,
}

/// Why a domain is no longer running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// It shut itself down (`SCHEDOP_shutdown`).
    Shutdown(ShutdownReason),
    /// Another domain shut it down (`SCHEDOP_remote_shutdown`).
    RemoteShutdown { by: DomId, reason: ShutdownReason },
    /// It took an exception it cannot handle.
    Fault(FaultInfo),
    /// A controlling domain destroyed it (`XEN_DOMCTL_destroydomain`).
    Destroyed { by: DomId },
}

impl ExitReason {
    pub fn shutdown_reason(self) -> ShutdownReason {
        match self {
            ExitReason::Shutdown(r) | ExitReason::RemoteShutdown { reason: r, .. } => r,
            ExitReason::Fault(_) | ExitReason::Destroyed { .. } => ShutdownReason::Crash,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Shutdown(r) => write!(f, "shutdown({})", r.name()),
            ExitReason::RemoteShutdown { by, reason } => {
                write!(f, "shutdown({}) by domain {by}", reason.name())
            }
            ExitReason::Fault(i) => write!(
                f,
                "fault: vector {} error {:#x} at rip {:#x} cr2 {:#x}",
                i.vector, i.error_code, i.rip, i.cr2
            ),
            ExitReason::Destroyed { by } => write!(f, "destroyed by domain {by}"),
        }
    }
}

/// Where a domain is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainState {
    Building,
    Running,
    Paused,
    Shutdown(ShutdownReason),
    Dying,
    Dead,
}

impl DomainState {
    /// The legal transitions, in one place.
    pub fn can_become(self, next: DomainState) -> bool {
        use DomainState::*;
        matches!(
            (self, next),
            (Building, Running)
                | (Building, Dying)
                | (Running, Paused)
                | (Paused, Running)
                | (Running | Paused, Shutdown(_))
                | (Running | Paused | Shutdown(_), Dying)
                | (Dying, Dead)
        )
    }

    /// The `domctl` state code.
    pub fn code(self) -> u32 {
        use shared_abi::hypercall_args::domctl::state;
        match self {
            DomainState::Building => state::BUILDING,
            DomainState::Running => state::RUNNING,
            DomainState::Paused => state::PAUSED,
            DomainState::Shutdown(_) => state::SHUTDOWN,
            DomainState::Dying => state::DYING,
            DomainState::Dead => state::DEAD,
        }
    }

    /// Still holding resources and visible to control operations.
    pub fn is_alive(self) -> bool {
        !matches!(self, DomainState::Dying | DomainState::Dead)
    }
}

/// One domain.
pub struct Domain {
    pub id: DomId,
    pub name: String,
    pub caps: Capabilities,
    state: DomainState,
    pub exit: Option<ExitReason>,
    pub reservation: Reservation,
    /// `None` once the domain is dead.
    pub aspace: Option<Box<dyn AddressSpace>>,
    /// Every page mapped into the domain that it holds (VA → frame): ELF, stack, special
    /// pages, heap. Page-table frames are the address space's.
    pub pages: BTreeMap<u64, Mfn>,
    pub vcpus: Vec<VcpuId>,
    /// Per vCPU: blocked in `SCHEDOP_poll` (woken by any event on the domain).
    pub polling: Vec<bool>,
    pub weight: u32,
    pub cap_percent: u32,
    pub devices: Vec<PciAddress>,
    pub cmdline: String,
    pub entry: u64,
    pub start_info: Mfn,
    pub shared_info: Mfn,
    pub console_ring: Mfn,
    pub xenstore_ring: Mfn,
    pub console: DomainConsole,
    /// Event channels (`None` once the domain is dying, or if the platform gave no atomic
    /// view of its `shared_info`).
    pub evtchn: Option<spin::Mutex<crate::evtchn::DomainEvtchn<shared::EventPage>>>,
    /// Its grant table and the mappings it holds of others' grants (`None` once dying).
    pub grants: Option<spin::Mutex<crate::gnttab::DomainGrants<shared::GrantFrames>>>,
    /// Differs between any two domains ever built in this boot (grant mappings record it).
    pub instance: u64,
    /// Device (BAR) pages mapped into its device window (`physdev_op` map_bar).
    pub mmio: Vec<MmioMapping>,
    /// I/O counters (`domctl DOMAIN_STATS`, `hvctl top`).
    pub io: IoCounters,
}

/// A domain's I/O counters: running totals since it was built, each counted once, where the
/// work is done (see `shared_abi::hypercall_args::domctl::DomainStats` for their meaning).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    pub evtchn_sends: u64,
    pub grant_copy_bytes: u64,
    pub grant_copies_done: u64,
    pub grant_maps: u64,
}

/// A run of a device's pages mapped uncached at `va` (not the domain's frames).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioMapping {
    pub va: u64,
    /// Host-physical address of the first page.
    pub phys: u64,
    pub pages: u64,
}

impl Domain {
    pub fn state(&self) -> DomainState {
        self.state
    }

    /// Move to `next` if the lifecycle allows it.
    pub fn set_state(&mut self, next: DomainState) -> bool {
        if self.state.can_become(next) {
            self.state = next;
            true
        } else {
            false
        }
    }
}

/// The domain table: id allocation and lookup.
#[derive(Default)]
pub struct DomainTable {
    doms: BTreeMap<DomId, Domain>,
    next_id: DomId,
}

impl DomainTable {
    pub fn new() -> Self {
        DomainTable {
            doms: BTreeMap::new(),
            // 0 is Xen's dom0; Bulkhead has none, so ids start at 1 to keep tools that treat
            // domain 0 specially from being confused.
            next_id: 1,
        }
    }

    /// A fresh id, never reused within a boot; `None` when the regular ids are spent.
    pub fn allocate_id(&mut self) -> Option<DomId> {
        let id = self.next_id;
        if !shared_abi::domid::is_regular(id) {
            return None;
        }
        self.next_id += 1;
        Some(id)
    }

    pub fn insert(&mut self, d: Domain) {
        self.doms.insert(d.id, d);
    }

    pub fn remove(&mut self, id: DomId) -> Option<Domain> {
        self.doms.remove(&id)
    }

    pub fn get(&self, id: DomId) -> Option<&Domain> {
        self.doms.get(&id)
    }

    pub fn get_mut(&mut self, id: DomId) -> Option<&mut Domain> {
        self.doms.get_mut(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Domain> {
        self.doms.values()
    }

    pub fn ids(&self) -> Vec<DomId> {
        self.doms.keys().copied().collect()
    }

    /// Find by name (live domains).
    pub fn by_name(&self, name: &str) -> Option<&Domain> {
        self.doms
            .values()
            .find(|d| d.name == name && d.state.is_alive())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_allows_only_the_documented_transitions() {
        use DomainState::*;
        let s = Shutdown(ShutdownReason::Poweroff);
        let all = [Building, Running, Paused, s, Dying, Dead];
        let legal = [
            (Building, Running),
            (Building, Dying),
            (Running, Paused),
            (Paused, Running),
            (Running, s),
            (Paused, s),
            (Running, Dying),
            (Paused, Dying),
            (s, Dying),
            (Dying, Dead),
        ];
        for a in all {
            for b in all {
                assert_eq!(a.can_become(b), legal.contains(&(a, b)), "{a:?} -> {b:?}");
            }
        }
    }

    #[test]
    fn shutdown_codes_round_trip_and_unknown_codes_are_refused() {
        for c in 0..6 {
            assert_eq!(ShutdownReason::from_code(c).unwrap().code(), c);
        }
        assert_eq!(ShutdownReason::from_code(6), None);
        assert_eq!(ShutdownReason::from_code(u32::MAX), None);
    }

    #[test]
    fn ids_start_at_one_and_are_never_reused() {
        let mut t = DomainTable::new();
        assert_eq!(t.allocate_id(), Some(1));
        assert_eq!(t.allocate_id(), Some(2));
        t.next_id = shared_abi::domid::DOMID_FIRST_RESERVED;
        assert_eq!(t.allocate_id(), None);
    }
}
