//! The domain builder: from a [`DomainConfig`] and an ELF file to a running domain.
//!
//! Steps: validate the config; validate the ELF into a load plan ([`super::elf`]); create an
//! address space; map and fill, all from frames charged to the domain's reservation: the
//! ELF's pages with their permissions, the boot stack with an unmapped guard page below
//! it, the start-info page (read-only), `shared_info`, the console and xenstore ring pages,
//! the grant-table frames, and the rest of the reservation as heap; write the start info and
//! initialise `shared_info`; set up the domain's event channels and grant table; register the
//! vCPUs with the scheduler and start vCPU 0.
//!
//! Reserved grant refs: ref 0 (`GNTTAB_RESERVED_CONSOLE`) grants the console ring page to
//! the first live domain holding `CONSOLE_SERVICE`, ref 1 (`GNTTAB_RESERVED_XENSTORE`) the
//! xenstore ring page to the first live domain holding `XENSTORE_SERVICE`, so a service
//! domain built *earlier* (manifest order) can map them. With no such domain the entry stays
//! invalid (all zero), as do refs 2..8. With such a xenstore domain the builder also offers it
//! an unbound event-channel port of the new domain, named in `xenstore_evtchn`
//! ([`super::xenstore_port`]).
//!
//! On any failure everything already taken is given back and the domain never appears in
//! the table: a refused build leaks nothing.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::grant_table::{GrantEntryV1, RESERVED_CONSOLE, RESERVED_XENSTORE, gtf};
use shared_abi::manifest::{self, DomainSpec};
use shared_abi::shared_info::LEGACY_MAX_VCPUS;
use shared_abi::start_info::{
    self, CONSOLE_RING_VA, DEFAULT_STACK_PAGES, GRANT_TABLE_FRAMES, GRANT_TABLE_VA, HEAP_BASE,
    HEAP_END, MAX_DEVICES, MAX_STACK_PAGES, PciAddress, SHARED_INFO_VA, STACK_TOP, START_INFO_VA,
    StartInfo, XENSTORE_RING_VA,
};

use super::console::DomainConsole;
use super::elf::{self, ElfError, LoadPlan};
use super::hypervisor::{Hypervisor, Platform};
use super::memory::FrameSource as _;
use super::memory::{
    AddressSpace, MapError, Mfn, PAGE_SIZE, PagePerms, Reservation, ReservedFrames,
};
use super::shared::{EventPage, GrantFrames};
use super::{Domain, DomainState};
use crate::evtchn::DomainEvtchn;
use crate::gnttab::DomainGrants;
use spin::Mutex;

type EvtchnState = Mutex<DomainEvtchn<EventPage>>;
type GrantState = Mutex<DomainGrants<GrantFrames>>;

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    pub name: String,
    pub memory_kib: u64,
    pub vcpus: u32,
    pub weight: u32,
    pub cap_percent: u32,
    pub capabilities: Capabilities,
    pub cmdline: String,
    pub devices: Vec<PciAddress>,
    /// Event channel ports for the console and xenstore rings (0 = none), allocated by the
    /// event-channel layer before the build.
    pub console_evtchn: u32,
    pub xenstore_evtchn: u32,
    pub stack_pages: u64,
}

impl DomainConfig {
    /// The config for a manifest entry (devices come from the manifest once it carries
    /// them; event channels are filled in by the caller).
    pub fn from_spec(spec: &DomainSpec) -> Self {
        DomainConfig {
            name: spec.name.clone(),
            memory_kib: spec.memory_kib,
            vcpus: spec.vcpus,
            weight: spec.weight,
            cap_percent: spec.cap_percent,
            capabilities: spec.capabilities,
            cmdline: spec.cmdline.clone(),
            devices: Vec::new(),
            console_evtchn: 0,
            xenstore_evtchn: 0,
            stack_pages: DEFAULT_STACK_PAGES,
        }
    }
}

/// Why a build was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildError {
    Config {
        field: &'static str,
        problem: String,
    },
    Elf(ElfError),
    /// The memory limit cannot hold the image, stack and special pages.
    TooSmall {
        need_pages: u64,
        limit_pages: u64,
    },
    /// The frame pool ran dry.
    OutOfMemory,
    NoDomainIds,
    Map(MapError),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Config { field, problem } => write!(f, "domain config {field}: {problem}"),
            BuildError::Elf(e) => write!(f, "{e}"),
            BuildError::TooSmall {
                need_pages,
                limit_pages,
            } => write!(
                f,
                "memory limit of {limit_pages} pages cannot hold the {need_pages} pages the image, stack, special pages and page tables need"
            ),
            BuildError::OutOfMemory => write!(f, "the hypervisor is out of free frames"),
            BuildError::NoDomainIds => write!(f, "no free domain id"),
            BuildError::Map(e) => write!(f, "page-table edit failed: {e:?}"),
        }
    }
}

fn config_error(field: &'static str, problem: String) -> BuildError {
    BuildError::Config { field, problem }
}

fn validate(cfg: &DomainConfig) -> Result<u64, BuildError> {
    use alloc::format;
    let n = &cfg.name;
    if n.is_empty()
        || n.len() > manifest::MAX_NAME_LEN
        || !n
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(config_error(
            "name",
            format!("{n:?} must be 1..=32 characters of a-z A-Z 0-9 - _ ."),
        ));
    }
    if !(manifest::MIN_MEMORY_KIB..=manifest::MAX_MEMORY_KIB).contains(&cfg.memory_kib) {
        return Err(config_error(
            "memory_kib",
            format!(
                "{} outside {}..={}",
                cfg.memory_kib,
                manifest::MIN_MEMORY_KIB,
                manifest::MAX_MEMORY_KIB
            ),
        ));
    }
    if cfg.vcpus == 0 || cfg.vcpus as usize > LEGACY_MAX_VCPUS {
        return Err(config_error(
            "vcpus",
            format!("{} outside 1..={LEGACY_MAX_VCPUS}", cfg.vcpus),
        ));
    }
    if !(1..=manifest::MAX_WEIGHT).contains(&cfg.weight) {
        return Err(config_error(
            "weight",
            format!("{} outside 1..={}", cfg.weight, manifest::MAX_WEIGHT),
        ));
    }
    if cfg.cap_percent > 100 * cfg.vcpus {
        return Err(config_error(
            "cap_percent",
            format!("{} outside 0..={}", cfg.cap_percent, 100 * cfg.vcpus),
        ));
    }
    if cfg.cmdline.len() > start_info::CMDLINE_LEN {
        return Err(config_error(
            "cmdline",
            format!(
                "{} bytes, at most {}",
                cfg.cmdline.len(),
                start_info::CMDLINE_LEN
            ),
        ));
    }
    if cfg.devices.len() > MAX_DEVICES {
        return Err(config_error(
            "devices",
            format!("{} devices, at most {MAX_DEVICES}", cfg.devices.len()),
        ));
    }
    if cfg.stack_pages == 0 || cfg.stack_pages > MAX_STACK_PAGES {
        return Err(config_error(
            "stack_pages",
            format!("{} outside 1..={MAX_STACK_PAGES}", cfg.stack_pages),
        ));
    }
    Ok(cfg.memory_kib / 4)
}

/// Page-table frames needed to map `pages` contiguous pages (one leaf table per 2 MiB, one
/// directory per 1 GiB) plus `extra`.
pub fn table_overhead(pages: u64, extra: u64) -> u64 {
    pages.div_ceil(512) + pages.div_ceil(512 * 512) + extra
}

/// The domain being built, before it enters the table.
struct Partial {
    reservation: Reservation,
    aspace: alloc::boxed::Box<dyn AddressSpace>,
    pages: BTreeMap<u64, Mfn>,
}

impl Partial {
    /// Allocate a zeroed frame from the reservation and map it at `va`.
    fn map_new(
        &mut self,
        p: &mut Platform<'_>,
        va: u64,
        perms: PagePerms,
    ) -> Result<Mfn, BuildError> {
        let mut frames = ReservedFrames {
            reservation: &mut self.reservation,
            pool: &mut *p.frames,
        };
        let f = frames.alloc_frame_checked()?;
        p.phys.zero(f);
        if let Err(e) = self.aspace.map(va, f, perms, &mut frames) {
            frames.free_frame(f);
            return Err(match e {
                MapError::OutOfFrames => BuildError::OutOfMemory,
                e => BuildError::Map(e),
            });
        }
        self.pages.insert(va, f);
        Ok(f)
    }

    /// Give back everything (a failed build).
    fn tear_down(mut self, p: &mut Platform<'_>) {
        let mut frames = ReservedFrames {
            reservation: &mut self.reservation,
            pool: &mut *p.frames,
        };
        for (va, f) in core::mem::take(&mut self.pages) {
            self.aspace.unmap(va);
            frames.free_frame(f);
        }
        self.aspace.release(&mut frames);
    }
}

trait CheckedAlloc {
    fn alloc_frame_checked(&mut self) -> Result<Mfn, BuildError>;
}

impl CheckedAlloc for ReservedFrames<'_> {
    fn alloc_frame_checked(&mut self) -> Result<Mfn, BuildError> {
        use super::memory::FrameSource;
        if self.reservation.available() == 0 {
            return Err(BuildError::TooSmall {
                need_pages: self.reservation.limit() + 1,
                limit_pages: self.reservation.limit(),
            });
        }
        self.alloc_frame().ok_or(BuildError::OutOfMemory)
    }
}

fn load(
    part: &mut Partial,
    p: &mut Platform<'_>,
    plan: &LoadPlan,
    elf_bytes: &[u8],
) -> Result<(), BuildError> {
    for seg in &plan.segments {
        let mut va = seg.first_page();
        while va < seg.end_page() {
            let f = part.map_new(p, va, seg.perms)?;
            if let Some((dst, src)) = seg.file_bytes_in_page(va)
                && let Some(bytes) = elf_bytes.get(src)
            {
                p.phys.write(f, dst, bytes);
            }
            va += PAGE_SIZE;
        }
    }
    Ok(())
}

impl Hypervisor {
    /// Build a domain and start its boot vCPU. Returns its id.
    pub fn build_domain(
        &mut self,
        p: &mut Platform<'_>,
        cfg: &DomainConfig,
        elf_bytes: &[u8],
    ) -> Result<DomId, BuildError> {
        let limit = validate(cfg)?;
        let plan = elf::plan(elf_bytes).map_err(BuildError::Elf)?;
        // Image + stack + 4 special pages + the grant table, and their tables (ELF window,
        // special window, stack window each need their own directory and leaf tables) + root.
        let fixed = plan.pages() + cfg.stack_pages + 4 + GRANT_TABLE_FRAMES;
        let need = fixed + table_overhead(plan.pages(), 0) + 2 + 2 + 2 + 1;
        if need > limit {
            return Err(BuildError::TooSmall {
                need_pages: need,
                limit_pages: limit,
            });
        }
        let id = self.domains.allocate_id().ok_or(BuildError::NoDomainIds)?;
        let mut reservation = Reservation::new(limit);
        let aspace = {
            let mut frames = ReservedFrames {
                reservation: &mut reservation,
                pool: &mut *p.frames,
            };
            p.mmu
                .create(&mut frames)
                .map_err(|_| BuildError::OutOfMemory)?
        };
        let mut part = Partial {
            reservation,
            aspace,
            pages: BTreeMap::new(),
        };
        match self.fill(&mut part, p, cfg, &plan, elf_bytes, id) {
            Ok(special) => {
                let now = p.clock.now_ns();
                let (evtchn, grants) = match self.sharing_state(p, &part, id, cfg.vcpus, special[1])
                {
                    Ok(s) => s,
                    Err(e) => {
                        part.tear_down(p);
                        return Err(e);
                    }
                };
                // Before the domain is in the table: it cannot run yet.
                let _ =
                    self.offer_xenstore_port(p, cfg.xenstore_evtchn, evtchn.as_ref(), special[0]);
                let vcpus =
                    match self
                        .sched
                        .add_domain(id, cfg.weight, cfg.cap_percent, cfg.vcpus, now)
                    {
                        Ok(v) => v,
                        Err(_) => {
                            part.tear_down(p);
                            return Err(config_error(
                                "weight",
                                String::from("refused by the scheduler"),
                            ));
                        }
                    };
                let mut d = Domain {
                    id,
                    name: cfg.name.clone(),
                    caps: cfg.capabilities,
                    state: DomainState::Building,
                    exit: None,
                    reservation: part.reservation,
                    aspace: Some(part.aspace),
                    pages: part.pages,
                    polling: alloc::vec![false; vcpus.len()],
                    vcpus: vcpus.clone(),
                    weight: cfg.weight,
                    cap_percent: cfg.cap_percent,
                    devices: cfg.devices.clone(),
                    cmdline: cfg.cmdline.clone(),
                    entry: plan.entry,
                    start_info: special[0],
                    shared_info: special[1],
                    console_ring: special[2],
                    xenstore_ring: special[3],
                    console: DomainConsole::new(now),
                    evtchn,
                    grants,
                    instance: self.next_instance,
                    mmio: Vec::new(),
                    io: super::IoCounters::default(),
                };
                self.next_instance += 1;
                d.set_state(DomainState::Running);
                self.domains.insert(d);
                if let Some(&v0) = vcpus.first() {
                    let k = self.sched.vcpu_up(v0, now);
                    self.pending_kicks = self.pending_kicks.union(k);
                }
                Ok(id)
            }
            Err(e) => {
                part.tear_down(p);
                Err(e)
            }
        }
    }

    /// The first live domain holding `cap` (a service domain built earlier).
    fn service_domain(&self, cap: Capabilities) -> Option<DomId> {
        self.domains
            .iter()
            .find(|d| d.state().is_alive() && d.caps.contains(cap))
            .map(|d| d.id)
    }

    /// The new domain's event-channel and grant state, over atomic views of its
    /// `shared_info` and grant-table frames. A platform without atomic views gives a domain
    /// with neither (its `event_channel_op` and `grant_table_op` answer `-ENOSYS`).
    fn sharing_state(
        &self,
        p: &Platform<'_>,
        part: &Partial,
        id: DomId,
        vcpus: u32,
        shared_info: Mfn,
    ) -> Result<(Option<EvtchnState>, Option<GrantState>), BuildError> {
        let Some(si) = p.phys.atomic_frame(shared_info) else {
            return Ok((None, None));
        };
        let ev = DomainEvtchn::new(id, vcpus, self.config.evtchn_max_ports, EventPage::new(si))
            .map_err(|e| {
                config_error(
                    "evtchn_max_ports",
                    alloc::format!("{} refused ({e})", self.config.evtchn_max_ports),
                )
            })?;
        let mut views = Vec::new();
        for i in 0..GRANT_TABLE_FRAMES {
            let f = part
                .pages
                .get(&(GRANT_TABLE_VA + i * PAGE_SIZE))
                .and_then(|&f| p.phys.atomic_frame(f));
            match f {
                Some(v) => views.push(v),
                None => return Ok((Some(Mutex::new(ev)), None)),
            }
        }
        let g = DomainGrants::new(
            id,
            self.next_instance,
            GrantFrames::new(views),
            self.config.maptrack_max,
        );
        Ok((Some(Mutex::new(ev)), Some(Mutex::new(g))))
    }

    fn fill(
        &mut self,
        part: &mut Partial,
        p: &mut Platform<'_>,
        cfg: &DomainConfig,
        plan: &LoadPlan,
        elf_bytes: &[u8],
        id: DomId,
    ) -> Result<[Mfn; 4], BuildError> {
        load(part, p, plan, elf_bytes)?;
        // The stack; the page below it stays unmapped (guard).
        for i in 1..=cfg.stack_pages {
            part.map_new(p, STACK_TOP - i * PAGE_SIZE, PagePerms::USER_RW)?;
        }
        let si = part.map_new(p, START_INFO_VA, PagePerms::USER_RO)?;
        let sh = part.map_new(p, SHARED_INFO_VA, PagePerms::USER_RW)?;
        let con = part.map_new(p, CONSOLE_RING_VA, PagePerms::USER_RW)?;
        let xs = part.map_new(p, XENSTORE_RING_VA, PagePerms::USER_RW)?;
        for i in 0..GRANT_TABLE_FRAMES {
            part.map_new(p, GRANT_TABLE_VA + i * PAGE_SIZE, PagePerms::USER_RW)?;
        }
        if let Some(&gt0) = part.pages.get(&GRANT_TABLE_VA) {
            for (gref, cap, ring_va) in [
                (
                    RESERVED_CONSOLE,
                    Capabilities::CONSOLE_SERVICE,
                    CONSOLE_RING_VA,
                ),
                (
                    RESERVED_XENSTORE,
                    Capabilities::XENSTORE_SERVICE,
                    XENSTORE_RING_VA,
                ),
            ] {
                if let Some(server) = self.service_domain(cap) {
                    let e = GrantEntryV1 {
                        flags: gtf::PERMIT_ACCESS,
                        domid: server,
                        frame: (ring_va / PAGE_SIZE) as u32,
                    };
                    p.phys.write(gt0, gref as usize * 8, &e.to_bytes());
                }
            }
        }
        // The heap: what is left once its own page tables are paid for.
        // The page tables a full maptrack quota of grant mappings needs stay unspent, so a
        // domain can always map what its quota allows: leaf tables for the quota, one more
        // leaf for a second region of the window (backends keep rings apart from data pages,
        // at the top), and the window's directory.
        let window_tables = u64::from(self.config.maptrack_max).div_ceil(512) + 2;
        let avail = part.reservation.available().saturating_sub(window_tables);
        let mut heap = avail;
        for _ in 0..4 {
            heap = avail.saturating_sub(table_overhead(heap, 1));
        }
        heap = heap.min((HEAP_END - HEAP_BASE) / PAGE_SIZE);
        for i in 0..heap {
            part.map_new(p, HEAP_BASE + i * PAGE_SIZE, PagePerms::USER_RW)?;
        }
        let mut s = StartInfo {
            domid: id,
            nr_vcpus: cfg.vcpus,
            capabilities: cfg.capabilities.bits(),
            max_pages: part.reservation.limit(),
            console_evtchn: cfg.console_evtchn,
            xenstore_evtchn: cfg.xenstore_evtchn,
            heap_pages: heap,
            stack_pages: cfg.stack_pages,
            ..StartInfo::default()
        };
        s.set_name(&cfg.name);
        s.set_cmdline(&cfg.cmdline);
        s.set_devices(&cfg.devices);
        p.phys.write(si, 0, &s.encode());
        // shared_info: events masked on every vCPU until the domain unmasks them.
        for v in 0..cfg.vcpus as usize {
            p.phys.write(sh, v * 64 + 1, &[1]);
        }
        Ok([si, sh, con, xs])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::elf::testelf;
    use crate::domain::fake::Env;
    use crate::domain::hypervisor::HvConfig;
    use crate::sched::RunState;
    use shared_abi::start_info::{ELF_LOAD_BASE, EntryState, STACK_TOP};

    /// `cargo build -p hello-dom --target x86_64-unknown-none --release` then
    /// `objcopy --strip-all target/x86_64-unknown-none/release/hello-dom
    /// core-hv/src/domain/fixtures/hello-dom.elf` regenerates this.
    const HELLO: &[u8] = include_bytes!("fixtures/hello-dom.elf");

    fn aligned(bytes: &[u8]) -> Vec<u8> {
        // Vec<u8> from the global allocator is at least 8-byte aligned on the host.
        let v = bytes.to_vec();
        assert_eq!(v.as_ptr().align_offset(8), 0);
        v
    }

    fn cfg() -> DomainConfig {
        DomainConfig {
            name: "hello".into(),
            memory_kib: 2048,
            vcpus: 1,
            weight: 256,
            cap_percent: 0,
            capabilities: Capabilities::XENSTORE_SERVICE,
            cmdline: "loglevel=debug".into(),
            devices: alloc::vec![PciAddress {
                segment: 0,
                bus: 0,
                devfn: 0x18
            }],
            console_evtchn: 1,
            xenstore_evtchn: 2,
            stack_pages: DEFAULT_STACK_PAGES,
        }
    }

    #[test]
    fn real_hello_dom_elf_is_accepted_by_the_validator() {
        let elf = aligned(HELLO);
        let plan = elf::plan(&elf).unwrap();
        assert_eq!(plan.segments.len(), 3);
        assert_eq!(plan.segments[0].perms, PagePerms::USER_RX);
        assert_eq!(plan.segments[1].perms, PagePerms::USER_RO);
        assert_eq!(plan.segments[2].perms, PagePerms::USER_RW);
        assert_eq!(plan.entry, ELF_LOAD_BASE);
    }

    #[test]
    fn built_domain_has_its_segments_stack_guard_and_special_pages() {
        let mut env = Env::new(2048);
        let mut hv = Hypervisor::new(1, HvConfig::default(), 0);
        let elf = aligned(HELLO);
        let id = hv.build_domain(&mut env.platform(), &cfg(), &elf).unwrap();
        let d = hv.domains.get(id).unwrap();
        assert_eq!(d.state(), DomainState::Running);
        let a = d.aspace.as_deref().unwrap();
        let perms = |va| a.translate(va).map(|(_, p)| p);
        assert_eq!(perms(0x40_0000), Some(PagePerms::USER_RX));
        assert_eq!(perms(0x40_5000), Some(PagePerms::USER_RO));
        assert_eq!(perms(0x40_8000), Some(PagePerms::USER_RW));
        assert_eq!(perms(0x3f_f000), None);
        assert_eq!(perms(STACK_TOP - 4096), Some(PagePerms::USER_RW));
        let guard = STACK_TOP - (DEFAULT_STACK_PAGES + 1) * 4096;
        assert_eq!(perms(guard), None, "guard page below the stack");
        assert_eq!(perms(START_INFO_VA), Some(PagePerms::USER_RO));
        assert_eq!(perms(SHARED_INFO_VA), Some(PagePerms::USER_RW));
        assert_eq!(perms(CONSOLE_RING_VA), Some(PagePerms::USER_RW));
        assert_eq!(perms(XENSTORE_RING_VA), Some(PagePerms::USER_RW));
        // The text bytes are the file's.
        let (text, _) = a.translate(0x40_0000).unwrap();
        assert_eq!(env.frame_bytes(text, 0, 64), &elf[0x1000..0x1040]);
        // Start info.
        let si = StartInfo::decode(&env.frame_bytes(d.start_info, 0, 4096)).unwrap();
        assert_eq!(
            (si.domid, si.name(), si.cmdline()),
            (id, "hello", "loglevel=debug")
        );
        assert_eq!((si.console_evtchn, si.xenstore_evtchn), (1, 2));
        assert_eq!(si.devices().len(), 1);
        assert_eq!(si.max_pages, 512);
        assert!(si.heap_pages > 400);
        assert_eq!(
            perms(HEAP_BASE + (si.heap_pages - 1) * 4096),
            Some(PagePerms::USER_RW)
        );
        assert_eq!(perms(HEAP_BASE + si.heap_pages * 4096), None);
        // Events start masked; everything counted; the limit holds.
        assert_eq!(env.frame_bytes(d.shared_info, 1, 1), [1]);
        assert_eq!(d.reservation.used() as usize, env.frames.outstanding());
        assert!(d.reservation.used() <= d.reservation.limit());
        assert_eq!(
            hv.entry_state(id),
            Some(EntryState::for_entry(ELF_LOAD_BASE))
        );
        let v = d.vcpus[0];
        assert_eq!(
            hv.sched.runstate(v, 0).unwrap().state,
            RunState::Runnable as i32
        );
    }

    #[test]
    fn refused_builds_name_the_problem_and_leak_nothing() {
        let mut env = Env::new(2048);
        let mut hv = Hypervisor::new(1, HvConfig::default(), 0);
        let elf = aligned(HELLO);
        let mut bad = elf.clone();
        bad[18] = 0x28; // EM_ARM
        let e = hv
            .build_domain(&mut env.platform(), &cfg(), &bad)
            .unwrap_err();
        assert!(alloc::format!("{e}").contains("EM_X86_64"), "{e}");
        let small = DomainConfig {
            memory_kib: 256,
            stack_pages: 64,
            ..cfg()
        };
        let e = hv
            .build_domain(&mut env.platform(), &small, &elf)
            .unwrap_err();
        assert!(matches!(e, BuildError::TooSmall { .. }), "{e}");
        for (c, field) in [
            (
                DomainConfig {
                    name: "bad name".into(),
                    ..cfg()
                },
                "name",
            ),
            (DomainConfig { vcpus: 0, ..cfg() }, "vcpus"),
            (DomainConfig { weight: 0, ..cfg() }, "weight"),
            (
                DomainConfig {
                    cap_percent: 101,
                    ..cfg()
                },
                "cap_percent",
            ),
            (
                DomainConfig {
                    memory_kib: 1,
                    ..cfg()
                },
                "memory_kib",
            ),
            (
                DomainConfig {
                    stack_pages: 0,
                    ..cfg()
                },
                "stack_pages",
            ),
            (
                DomainConfig {
                    devices: alloc::vec![PciAddress::default(); 17],
                    ..cfg()
                },
                "devices",
            ),
        ] {
            let e = hv.build_domain(&mut env.platform(), &c, &elf).unwrap_err();
            assert!(alloc::format!("{e}").contains(field), "{e}");
        }
        // The pool runs dry mid-build: everything taken is given back.
        let mut tiny = Env::new(20);
        let e = hv
            .build_domain(&mut tiny.platform(), &cfg(), &elf)
            .unwrap_err();
        assert_eq!(e, BuildError::OutOfMemory);
        assert_eq!(tiny.frames.outstanding(), 0);
        assert_eq!(env.frames.outstanding(), 0);
        assert!(hv.domains.iter().next().is_none());
    }

    #[test]
    fn destroying_a_domain_returns_every_frame() {
        let mut env = Env::new(4096);
        let mut hv = Hypervisor::new(1, HvConfig::default(), 0);
        let a = hv
            .build_domain(&mut env.platform(), &cfg(), &testelf::good())
            .unwrap();
        let b = hv
            .build_domain(
                &mut env.platform(),
                &DomainConfig {
                    name: "b".into(),
                    ..cfg()
                },
                &testelf::good(),
            )
            .unwrap();
        let held_b = hv.domains.get(b).unwrap().reservation.used() as usize;
        hv.destroy_domain(&mut env.platform(), a);
        assert_eq!(hv.domains.get(a).unwrap().state(), DomainState::Dead);
        assert_eq!(hv.domains.get(a).unwrap().reservation.used(), 0);
        assert_eq!(env.frames.outstanding(), held_b);
        hv.destroy_domain(&mut env.platform(), b);
        assert_eq!(env.frames.outstanding(), 0);
    }
}
