//! PCI device assignment on bare metal: resolve the manifest's `devices` against the functions
//! found at boot (`crate::pci::assign`), quiesce each assigned function, give every owning
//! domain a VT-d address space holding exactly its own pages (device address = the domain's
//! own page address, the same numbers it uses for itself), attach its functions to it, and
//! keep the config filter the `physdev_op` config hypercalls go through.
//!
//! Rules:
//! - One refusal refuses every domain that asked for devices (a half-applied assignment
//!   would leave a driver domain without the device it was built for); domains without
//!   devices still boot.
//! - A function behind no running IOMMU unit is refused unless every match that selected it
//!   says `insecure_dma = true`; then the boot says loudly that the domain can reach all of
//!   memory. Without confinement the filter refuses bus mastering unless `insecure_dma`.
//! - Until a domain's space is attached, its functions' DMA stays blocked (the unit has no
//!   context for them) and the filter refuses bus mastering.
//!
//! Not yet: pages a domain gains after its build (`increase_reservation`) and grant
//! mappings are not added to its DMA space; interrupts are not routed yet.
//!
//! Lock order: `arch::pci::PCI` → [`DEVICES`] → the IOMMU's locks (`iommu::unit_for` takes
//! PCI itself: never call it inside `pci::with`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use log::warn;
use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::manifest::Manifest;
use shared_abi::start_info;
use spin::Mutex;

use super::iommu::{self, DmaSpace};
use crate::domain::Domain;
use crate::domain::memory::PagePerms;
use crate::pci::PciAddress;
use crate::pci::assign::{self, Assignment, Request};
use crate::pci::filter::{self, ConfigFilter, MsixTable};
use crate::pci::owner::OwnerConfig;
use crate::pci::vtd::perm;
use crate::policy::DeviceToken;

/// One function as planned before the build: owner is the manifest index.
#[derive(Clone, Copy, Debug)]
struct Planned {
    assignment: Assignment,
    vendor: u16,
    device: u16,
    /// The IOMMU unit that translates it, if any.
    unit: Option<usize>,
}

/// Short PCI address (`00:03.0` on segment 0, as `lspci` prints it).
struct Short(PciAddress);

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0;
        if a.segment != 0 {
            write!(f, "{:04x}:", a.segment)?;
        }
        write!(f, "{:02x}:{:02x}.{}", a.bus, a.device, a.function)
    }
}

/// The assignment for the whole manifest, made before any domain is built.
pub struct Plan {
    planned: Vec<Planned>,
    /// Why every domain with devices is refused (the whole assignment failed).
    refused: Option<String>,
    /// Functions handed to built domains: (function, real owner, DMA confined).
    done: Vec<(Planned, DomId, bool)>,
    /// One DMA space per (owner, unit).
    spaces: Vec<(DomId, usize, DmaSpace)>,
}

/// Resolve and quiesce. Never fails: a refusal is recorded and answered per domain by
/// [`Plan::devices_for`].
pub fn plan(manifest: &Manifest) -> Plan {
    let mut p = Plan {
        planned: Vec::new(),
        refused: None,
        done: Vec::new(),
        spaces: Vec::new(),
    };
    if manifest.domains.iter().all(|d| d.devices.is_empty()) {
        return p;
    }
    // Manifest indices stand in for domain ids until the builds give the real ones
    // (at most MAX_BOOT_DOMAINS = 64, so they fit a DomId).
    let requests: Vec<Request<'_>> = manifest
        .domains
        .iter()
        .enumerate()
        .map(|(i, d)| Request {
            domain: i as DomId,
            devices: &d.devices,
        })
        .collect();
    let resolved = super::pci::with(|pci| {
        let r = assign::assign(&pci.functions, &requests)?;
        let mut out = Vec::with_capacity(r.len());
        for a in r {
            // Present by construction: `assign` only returns enumerated functions.
            if let Some(f) = pci.functions.iter().find(|f| f.address == a.address) {
                filter::quiesce(&mut pci.ecam, f);
                out.push(Planned {
                    assignment: a,
                    vendor: f.header.vendor,
                    device: f.header.device,
                    unit: None,
                });
            }
        }
        Ok::<_, assign::AssignError>(out)
    });
    match resolved {
        None => p.refused = Some("no PCI functions were enumerated (no MCFG)".into()),
        Some(Err(e)) => p.refused = Some(describe(&e, manifest)),
        Some(Ok(mut planned)) => {
            for pl in &mut planned {
                pl.unit = iommu::unit_for(pl.assignment.address);
                if let Some(u) = pl.unit
                    && let Err(e) = iommu::prepare(pl.assignment.address, u)
                {
                    warn!(
                        "iommu: no context table for {}: {e:?}",
                        Short(pl.assignment.address)
                    );
                }
            }
            p.planned = planned;
        }
    }
    if let Some(r) = &p.refused {
        crate::raw_println!("bulkhead: device assignment refused: {r}");
    }
    p
}

/// An assignment refusal with manifest domain names (the request ids are manifest indices).
fn describe(e: &assign::AssignError, manifest: &Manifest) -> String {
    use assign::AssignError as E;
    let name = |i: DomId| {
        manifest
            .domains
            .get(i as usize)
            .map_or("?", |d| d.name.as_str())
    };
    match *e {
        E::TooManyMatches { domain, count } => {
            alloc::format!("domain {:?}: {count} device matches", name(domain))
        }
        E::Invalid {
            domain,
            index,
            error,
        } => alloc::format!("domain {:?}: devices[{index}]: {error}", name(domain)),
        E::NoMatch { domain, index } => alloc::format!(
            "domain {:?}: devices[{index}] matches no PCI function",
            name(domain)
        ),
        E::NotAssignable { domain, address } => alloc::format!(
            "domain {:?}: {} is a bridge and cannot be assigned",
            name(domain),
            Short(address)
        ),
        E::Conflict {
            address,
            first,
            second,
        } => alloc::format!(
            "{} is selected by domain {:?} and by domain {:?}; a function belongs to at most one \
             domain",
            Short(address),
            name(first),
            name(second)
        ),
    }
}

impl Plan {
    /// The functions manifest domain `index` receives (for its start info), or why it is
    /// refused.
    pub fn devices_for(
        &self,
        index: usize,
        manifest: &Manifest,
    ) -> Result<Vec<start_info::PciAddress>, String> {
        let Some(spec) = manifest.domains.get(index) else {
            return Ok(Vec::new());
        };
        if spec.devices.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(r) = &self.refused {
            return Err(alloc::format!("its devices cannot be assigned: {r}"));
        }
        let mine = self
            .planned
            .iter()
            .filter(|p| p.assignment.owner as usize == index);
        let mut out = Vec::new();
        for p in mine {
            let a = p.assignment.address;
            if p.unit.is_none() && !p.assignment.insecure_dma {
                return Err(alloc::format!(
                    "device {} {:04x}:{:04x} is behind no IOMMU, so its DMA could reach all of \
                     memory; set insecure_dma = true to trust the domain with that",
                    Short(a),
                    p.vendor,
                    p.device
                ));
            }
            out.push(start_info::PciAddress {
                segment: a.segment,
                bus: a.bus,
                devfn: a.devfn(),
            });
        }
        Ok(out)
    }

    /// Domain `index` of the manifest was built as `dom`: confine its functions' DMA to its
    /// own pages and report each function on the console.
    pub fn built(&mut self, index: usize, dom: &Domain) {
        let mine: Vec<Planned> = self
            .planned
            .iter()
            .filter(|p| p.assignment.owner as usize == index)
            .copied()
            .collect();
        for p in mine {
            let a = p.assignment.address;
            let confined = match p.unit {
                Some(unit) => match self.confine(unit, a, dom) {
                    Ok(()) => true,
                    Err(e) => {
                        crate::raw_println!(
                            "bulkhead: device {} {:04x}:{:04x} assigned to domain {} ({}), DMA \
                             blocked: the IOMMU refused its address space: {e}",
                            Short(a),
                            p.vendor,
                            p.device,
                            dom.id,
                            dom.name
                        );
                        self.done.push((p, dom.id, false));
                        continue;
                    }
                },
                None => false,
            };
            if confined {
                crate::raw_println!(
                    "bulkhead: device {} {:04x}:{:04x} assigned to domain {} ({}), DMA confined \
                     by VT-d",
                    Short(a),
                    p.vendor,
                    p.device,
                    dom.id,
                    dom.name
                );
            } else {
                crate::raw_println!(
                    "bulkhead: WARNING: device {} {:04x}:{:04x} assigned to domain {} ({}) with \
                     insecure_dma and NO IOMMU: its DMA can read and write ALL memory; domain {} \
                     is trusted with the whole machine",
                    Short(a),
                    p.vendor,
                    p.device,
                    dom.id,
                    dom.name,
                    dom.id
                );
            }
            self.done.push((p, dom.id, confined));
        }
    }

    /// Attach `a` to `dom`'s space on `unit`, creating and filling the space on first use.
    fn confine(&mut self, unit: usize, a: PciAddress, dom: &Domain) -> Result<(), DmaError> {
        let pos = match self
            .spaces
            .iter()
            .position(|(d, u, _)| *d == dom.id && *u == unit)
        {
            Some(i) => i,
            None => {
                let mut space = iommu::new_space(unit).map_err(DmaError::Iommu)?;
                let aspace = dom.aspace.as_deref().ok_or(DmaError::NoAddressSpace)?;
                let pages: Vec<(u64, u64, u64)> = dom
                    .pages
                    .iter()
                    .map(|(&va, mfn)| {
                        let writable = aspace
                            .translate(va)
                            .is_some_and(|(_, p)| p.contains(PagePerms::WRITE));
                        let access = if writable {
                            perm::READ | perm::WRITE
                        } else {
                            perm::READ
                        };
                        (va, mfn.0 << 12, access)
                    })
                    .collect();
                iommu::map_pages(&mut space, &pages).map_err(DmaError::Iommu)?;
                self.spaces.push((dom.id, unit, space));
                self.spaces.len() - 1
            }
        };
        // VT-d domain id 0 is reserved; domain ids start at 0.
        let did = dom.id.checked_add(1).ok_or(DmaError::DomainId)?;
        iommu::attach(a, &self.spaces[pos].2, did).map_err(DmaError::Iommu)
    }

    /// Install the config filter for the functions handed out; every other function stays
    /// with the hypervisor. Returns how many functions were assigned.
    pub fn finish(self) -> usize {
        let assignments: Vec<Assignment> = self
            .done
            .iter()
            .map(|(p, owner, _)| Assignment {
                owner: *owner,
                ..p.assignment
            })
            .collect();
        let n = assignments.len();
        let filter = super::pci::with(|pci| {
            let mut f = ConfigFilter::new(&pci.functions, &assignments);
            for (p, _, confined) in &self.done {
                f.set_confined(p.assignment.address, *confined);
            }
            f
        });
        if let Some(filter) = filter {
            *DEVICES.lock() = Some(Devices {
                filter,
                spaces: self.spaces,
            });
        }
        n
    }
}

#[derive(Debug)]
enum DmaError {
    Iommu(iommu::DmaError),
    NoAddressSpace,
    DomainId,
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaError::Iommu(e) => write!(f, "{e:?}"),
            DmaError::NoAddressSpace => write!(f, "the domain has no address space"),
            DmaError::DomainId => write!(f, "no VT-d domain id for it"),
        }
    }
}

/// The filter and the DMA spaces (one per owning domain and unit, kept while it lives).
struct Devices {
    filter: ConfigFilter,
    spaces: Vec<(DomId, usize, DmaSpace)>,
}

static DEVICES: Mutex<Option<Devices>> = Mutex::new(None);

/// The driver domains' config access the hypercall layer holds (`Hypervisor::pci`): the
/// filter in [`DEVICES`] over ECAM. `ENODEV` for every call when nothing was assigned.
pub struct ArchPci;

impl OwnerConfig for ArchPci {
    fn read(
        &self,
        who: &DeviceToken,
        address: PciAddress,
        offset: u16,
        size: u8,
    ) -> Result<u32, XenError> {
        super::pci::with(|pci| {
            let d = DEVICES.lock();
            let d = d.as_ref().ok_or(XenError::ENODEV)?;
            d.filter
                .read(&pci.ecam, who.caller(), address, offset, size)
        })
        .unwrap_or(Err(XenError::ENODEV))
    }

    fn write(
        &mut self,
        who: &DeviceToken,
        address: PciAddress,
        offset: u16,
        size: u8,
        value: u32,
    ) -> Result<(), XenError> {
        super::pci::with(|pci| {
            let mut d = DEVICES.lock();
            let d = d.as_mut().ok_or(XenError::ENODEV)?;
            d.filter
                .write(&mut pci.ecam, who.caller(), address, offset, size, value)
        })
        .unwrap_or(Err(XenError::ENODEV))
    }

    fn bar_window(&self, who: &DeviceToken, phys: u64, len: u64) -> Result<PciAddress, XenError> {
        let d = DEVICES.lock();
        d.as_ref()
            .ok_or(XenError::ENODEV)?
            .filter
            .bar_window(who.caller(), phys, len)
    }

    fn msix_table(&self, who: &DeviceToken, address: PciAddress) -> Result<MsixTable, XenError> {
        let d = DEVICES.lock();
        d.as_ref()
            .ok_or(XenError::ENODEV)?
            .filter
            .msix_table(who.caller(), address)
    }

    fn msix_program(
        &mut self,
        owner: DomId,
        address: PciAddress,
        entry: u16,
        vector: Option<u8>,
    ) -> Result<(), XenError> {
        let t = {
            let d = DEVICES.lock();
            d.as_ref()
                .ok_or(XenError::ENODEV)?
                .filter
                .msix_table(owner, address)?
        };
        if entry >= t.entries {
            return Err(XenError::EINVAL);
        }
        let table = msix::Table::map(&t).ok_or(XenError::ENOMEM)?;
        match vector {
            Some(v) => {
                // Every device interrupt goes to the boot CPU (physical destination, fixed,
                // edge); the event it becomes may wake a vCPU anywhere.
                let apic = super::percpu::get(0).map_or(0, |c| c.apic_id);
                table.program(entry, msix::message_address(apic), u32::from(v));
            }
            None => table.set_masked(entry, true),
        }
        Ok(())
    }

    fn msix_mask(&mut self, owner: DomId, address: PciAddress, entry: u16, masked: bool) {
        let t = {
            let d = DEVICES.lock();
            match d.as_ref().map(|d| d.filter.msix_table(owner, address)) {
                Some(Ok(t)) => t,
                _ => return,
            }
        };
        if entry < t.entries
            && let Some(table) = msix::Table::map(&t)
        {
            table.set_masked(entry, masked);
        }
    }

    fn dma_map(&mut self, dom: DomId, pages: &[(u64, u64, bool)]) {
        let mut devices = DEVICES.lock();
        let Some(d) = devices.as_mut() else { return };
        let entries: Vec<(u64, u64, u64)> = pages
            .iter()
            .map(|&(va, pa, w)| {
                (
                    va,
                    pa,
                    if w {
                        perm::READ | perm::WRITE
                    } else {
                        perm::READ
                    },
                )
            })
            .collect();
        for (_, _, space) in d.spaces.iter_mut().filter(|(o, _, _)| *o == dom) {
            if let Err(e) = iommu::map_pages(space, &entries) {
                warn!("iommu: domain {dom}'s new pages not reachable by its devices: {e:?}");
            }
        }
    }

    fn dma_unmap(&mut self, dom: DomId, vas: &[u64]) -> bool {
        let mut devices = DEVICES.lock();
        let Some(d) = devices.as_mut() else {
            return true;
        };
        let mut ok = true;
        for (_, _, space) in d.spaces.iter_mut().filter(|(o, _, _)| *o == dom) {
            if let Err(e) = iommu::unmap_pages(space, vas) {
                warn!("iommu: cannot unmap domain {dom}'s pages from its devices: {e:?}");
                ok = false;
            }
        }
        ok
    }

    fn release(&mut self, dom: DomId) {
        let spaces = super::pci::with(|pci| {
            let mut devices = DEVICES.lock();
            let Some(d) = devices.as_mut() else {
                return Vec::new();
            };
            let taken = d.filter.release(dom);
            for a in &taken {
                if let Some(f) = pci.functions.iter().find(|f| f.address == *a) {
                    filter::quiesce(&mut pci.ecam, f);
                }
            }
            let (mine, others): (Vec<_>, Vec<_>) = core::mem::take(&mut d.spaces)
                .into_iter()
                .partition(|(owner, _, _)| *owner == dom);
            d.spaces = others;
            for a in &taken {
                for (_, unit, _) in &mine {
                    iommu::detach(*a, *unit);
                }
                crate::raw_println!(
                    "bulkhead: device {} taken back from dying domain {dom}: quiesced, DMA blocked",
                    Short(*a)
                );
            }
            mine
        })
        .unwrap_or_default();
        // Outside the PCI lock (iommu takes its own); the devices are detached already.
        for (_, _, space) in spaces {
            if let Err(e) = iommu::destroy_space(space) {
                warn!("iommu: cannot free domain {dom}'s DMA tables: {e:?}");
            }
        }
    }
}

/// Poll the IOMMU's fault records (called on CPU 0's timer tick, with no lock held).
pub fn poll_faults() {
    let n = iommu::poll_faults();
    if n > 0 {
        warn!("iommu: {n} DMA fault(s) blocked and reported");
    }
}

/// The MSI-X vector table through the hypervisor's uncached mapping of it: the only unsafe
/// access to it, behind entry-checked methods.
mod msix {
    use super::MsixTable;

    /// Entry words: message address low, high, data, vector control.
    const ENTRY_BYTES: u64 = 16;
    const VECTOR_MASKED: u32 = 1;

    /// The x86 MSI address for physical destination `apic_id` (no redirection hint).
    pub fn message_address(apic_id: u32) -> u64 {
        0xfee0_0000 | (u64::from(apic_id & 0xff) << 12)
    }

    pub struct Table {
        va: u64,
        entries: u16,
    }

    impl Table {
        pub fn map(t: &MsixTable) -> Option<Table> {
            let va =
                super::super::memory::map_mmio(t.phys, u64::from(t.entries) * ENTRY_BYTES).ok()?;
            Some(Table {
                va,
                entries: t.entries,
            })
        }

        fn write(&self, entry: u16, word: u64, value: u32) {
            if entry >= self.entries || word > 3 {
                return;
            }
            let at = self.va + u64::from(entry) * ENTRY_BYTES + word * 4;
            // SAFETY: `at` is a naturally aligned dword inside the table (entry and word
            // checked above), mapped uncached by `map`; MSI-X tables take dword writes.
            unsafe { core::ptr::write_volatile(at as *mut u32, value) }
        }

        fn read(&self, entry: u16, word: u64) -> u32 {
            if entry >= self.entries || word > 3 {
                return 0;
            }
            let at = self.va + u64::from(entry) * ENTRY_BYTES + word * 4;
            // SAFETY: as in `write`.
            unsafe { core::ptr::read_volatile(at as *const u32) }
        }

        /// Masked while the message changes (the spec's rule), unmasked after.
        pub fn program(&self, entry: u16, address: u64, data: u32) {
            self.set_masked(entry, true);
            self.write(entry, 0, address as u32);
            self.write(entry, 1, (address >> 32) as u32);
            self.write(entry, 2, data);
            self.set_masked(entry, false);
        }

        pub fn set_masked(&self, entry: u16, masked: bool) {
            let ctl = self.read(entry, 3);
            let ctl = if masked {
                ctl | VECTOR_MASKED
            } else {
                ctl & !VECTOR_MASKED
            };
            self.write(entry, 3, ctl);
        }
    }
}

/// Device assignment for rebuilt boot domains (`domctl REBUILD_BOOT_DOMAIN`,
/// `crate::domain::boot`): the boot plan's functions (owner = manifest index), kept after
/// [`Plan::finish`] and handed out again through the same [`Plan::devices_for`] and
/// [`Plan::built`] as at boot. The dead domain's `ArchPci::release` quiesced the functions
/// and dropped their DMA space; `built` gives the new domain a fresh space and makes the
/// config filter list it as the owner.
///
/// The filter has no "assign one more function" operation, so `built` makes a new filter
/// over every function assigned now (live owners kept) and restores each one's confinement.
pub struct BootRebuild {
    manifest: Manifest,
    planned: Vec<Planned>,
    refused: Option<String>,
    /// Per function handed out: whether the IOMMU confined it at its last assignment.
    confined: Vec<(PciAddress, bool)>,
}

impl Plan {
    /// What later rebuilds need; call after the boot builds and before [`Plan::finish`].
    pub fn keep_for_rebuild(&self, manifest: &Manifest) -> BootRebuild {
        BootRebuild {
            manifest: manifest.clone(),
            planned: self.planned.clone(),
            refused: self.refused.clone(),
            confined: self
                .done
                .iter()
                .map(|(p, _, c)| (p.assignment.address, *c))
                .collect(),
        }
    }
}

impl BootRebuild {
    fn plan(&self) -> Plan {
        Plan {
            planned: self.planned.clone(),
            refused: self.refused.clone(),
            done: Vec::new(),
            spaces: Vec::new(),
        }
    }
}

impl crate::domain::boot::BootDevices for BootRebuild {
    fn devices_for(&self, index: usize) -> Result<Vec<start_info::PciAddress>, String> {
        // A function some live domain still owns is not free (the old owner is released
        // when it dies, before a rebuild can get here; this guards everything else).
        let busy = DEVICES.lock().as_ref().and_then(|d| {
            self.planned
                .iter()
                .filter(|p| p.assignment.owner as usize == index)
                .find_map(|p| {
                    d.filter
                        .owner(p.assignment.address)
                        .map(|o| (p.assignment.address, o))
                })
        });
        if let Some((a, owner)) = busy {
            return Err(alloc::format!(
                "device {} is still owned by domain {owner}",
                Short(a)
            ));
        }
        self.plan().devices_for(index, &self.manifest)
    }

    fn built(&mut self, index: usize, dom: &Domain) {
        let mut plan = self.plan();
        plan.built(index, dom);
        let Plan { done, spaces, .. } = plan;
        for (p, _, c) in &done {
            let a = p.assignment.address;
            match self.confined.iter_mut().find(|(x, _)| *x == a) {
                Some(e) => e.1 = *c,
                None => self.confined.push((a, *c)),
            }
        }
        // Hand each function back to its new owner as the filter released it (BAR placements
        // kept); every other function and owner is left alone.
        let leftover = {
            let mut devices = DEVICES.lock();
            match devices.as_mut() {
                Some(d) => {
                    for (p, owner, c) in &done {
                        let a = p.assignment.address;
                        if d.filter.reassign(a, *owner) {
                            d.filter.set_confined(a, *c);
                        } else {
                            warn!("pci: {} was not released; not reassigned", Short(a));
                        }
                    }
                    d.spaces.extend(spaces);
                    Vec::new()
                }
                None => spaces,
            }
        };
        // No filter to hand them to (no PCI): give the DMA tables back.
        for (_, _, space) in leftover {
            if let Err(e) = iommu::destroy_space(space) {
                warn!("iommu: cannot free a rebuilt domain's DMA tables: {e:?}");
            }
        }
    }
}
