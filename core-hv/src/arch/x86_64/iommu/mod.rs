//! The Intel VT-d driver: find the remapping units in the ACPI DMAR table, give each a root
//! table, turn translation on with no device mapped (every DMA blocked until a device is
//! attached to a domain's address space), and report faults by polling the fault recording
//! registers ([`poll_faults`]).
//!
//! The tables are built by the portable `crate::pci::vtd` code in frames from the frame
//! allocator; when the unit's page walks do not snoop the caches (ECAP.C = 0) every table
//! write is flushed to memory with `clflush`.
//!
//! Verified under QEMU 7.2 (`-device intel-iommu`, by a temporary self-test that made the AHCI
//! controller DMA): with no context entry the DMA faults ("root entry not present") and the
//! fault is logged and cleared; attached to a space mapping the page read/write it succeeds;
//! mapped read-only, the write faults with reason 5.
//!
//! Lock order: `arch::pci::PCI` → `DMAR` → `UNITS` → frame allocator. Never taken in
//! interrupt context.

mod regs;

use alloc::vec::Vec;

use acpi::AcpiTable;
use acpi::sdt::{SdtHeader, Signature};
use log::{info, warn};
use spin::Mutex;

use self::regs::Regs;
use super::{apic, cpu, memory, phys_to_virt};
use crate::mm::FRAME_SIZE;
use crate::mm::paging::TableMemory;
use crate::pci::PciAddress;
use crate::pci::dmar::Dmar;
use crate::pci::vtd::{
    self, CCMD_GLOBAL_INVALIDATE, CCMD_ICC, Cap, ContextError, ContextTables, Ecap, FaultRecord,
    IOTLB_GLOBAL_INVALIDATE, IOTLB_IVT, SlError, SlTable, fsts, gcmd, gcmd_value, regs as r,
};

/// The DMAR table as the acpi crate finds it (header only; the body is parsed from bytes).
#[repr(C, packed)]
struct DmarTable {
    header: SdtHeader,
}

// SAFETY: the struct is exactly the SDT header every ACPI table starts with, and the
// signature is DMAR's.
unsafe impl AcpiTable for DmarTable {
    const SIGNATURE: Signature = Signature::DMAR;
    fn header(&self) -> &SdtHeader {
        &self.header
    }
}

/// Frames for VT-d tables.
struct Tables {
    coherent: bool,
}

fn flush(virt: u64, len: u64) {
    let mut p = virt & !63;
    while p < virt + len {
        // SAFETY: `p` is inside a direct-mapped table frame; clflush only writes the line
        // back, it changes no data.
        unsafe { core::arch::x86_64::_mm_clflush(p as *const u8) };
        p += 64;
    }
    // SAFETY: a fence has no memory-safety effect.
    unsafe { core::arch::x86_64::_mm_mfence() };
}

impl TableMemory for Tables {
    fn alloc_table(&mut self) -> Option<u64> {
        let f = memory::alloc_frame()?;
        // SAFETY: the frame was just allocated (no one else uses it) and is direct-mapped.
        unsafe { core::ptr::write_bytes(phys_to_virt(f) as *mut u8, 0, FRAME_SIZE as usize) };
        if !self.coherent {
            flush(phys_to_virt(f), FRAME_SIZE);
        }
        Some(f)
    }

    fn read(&self, table: u64, index: usize) -> u64 {
        // SAFETY: `table` is a frame from `alloc_table`, direct-mapped; index masked to 511.
        unsafe { core::ptr::read_volatile((phys_to_virt(table) as *const u64).add(index & 511)) }
    }

    fn write(&mut self, table: u64, index: usize, value: u64) {
        let p = phys_to_virt(table) + 8 * (index & 511) as u64;
        // SAFETY: as for `read`; the UNITS lock serialises writers.
        unsafe { core::ptr::write_volatile(p as *mut u64, value) };
        if !self.coherent {
            flush(p, 8);
        }
    }
}

/// One remapping unit, translation on.
struct Unit {
    base: u64,
    /// Its index in the DMAR table (what `Dmar::unit_for` answers).
    dmar_index: usize,
    regs: Regs,
    cap: Cap,
    ecap: Ecap,
    levels: u32,
    mem: Tables,
    contexts: ContextTables,
}

static UNITS: Mutex<Vec<Unit>> = Mutex::new(Vec::new());
/// The parsed DMAR table (which unit translates which device).
static DMAR: Mutex<Option<Dmar>> = Mutex::new(None);

/// Spin until `done` or about `timeout_us`; false on timeout.
fn wait(timeout_us: u64, mut done: impl FnMut() -> bool) -> bool {
    let limit = timeout_us * apic::tsc_khz().max(1) / 1000;
    let start = cpu::rdtsc();
    while cpu::rdtsc().wrapping_sub(start) < limit {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Why a unit was left off.
#[derive(Debug)]
enum UnitError {
    Map(memory::MemError),
    NoUsableWidth { sagaw: u8 },
    OutOfMemory,
    Timeout(&'static str),
}

impl core::fmt::Display for UnitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            UnitError::Map(e) => write!(f, "cannot map registers: {e}"),
            UnitError::NoUsableWidth { sagaw } => {
                write!(f, "no 39- or 48-bit table format (SAGAW {sagaw:#x})")
            }
            UnitError::OutOfMemory => write!(f, "out of memory for the root table"),
            UnitError::Timeout(what) => write!(f, "timed out waiting for {what}"),
        }
    }
}

impl Unit {
    fn command(&self, bit: u32, on: bool, what: &'static str) -> Result<(), UnitError> {
        let gsts = self.regs.read32(r::GSTS);
        self.regs.write32(r::GCMD, gcmd_value(gsts, bit, on));
        if wait(100_000, || (self.regs.read32(r::GSTS) & bit != 0) == on) {
            Ok(())
        } else {
            Err(UnitError::Timeout(what))
        }
    }

    fn invalidate_all(&self) -> Result<(), UnitError> {
        self.regs.write64(r::CCMD, CCMD_GLOBAL_INVALIDATE);
        if !wait(100_000, || self.regs.read64(r::CCMD) & CCMD_ICC == 0) {
            return Err(UnitError::Timeout("context-cache invalidation"));
        }
        let iotlb = self.ecap.iotlb_offset + 8;
        self.regs.write64(iotlb, IOTLB_GLOBAL_INVALIDATE);
        if !wait(100_000, || self.regs.read64(iotlb) & IOTLB_IVT == 0) {
            return Err(UnitError::Timeout("IOTLB invalidation"));
        }
        if self.cap.required_write_buffer_flush {
            let gsts = self.regs.read32(r::GSTS);
            self.regs
                .write32(r::GCMD, gcmd_value(gsts, gcmd::WBF, true));
            if !wait(100_000, || self.regs.read32(r::GSTS) & gcmd::WBF == 0) {
                return Err(UnitError::Timeout("write-buffer flush"));
            }
        }
        Ok(())
    }

    /// Map the registers, install an empty root table and turn translation on.
    fn bring_up(base: u64, dmar_index: usize) -> Result<Unit, UnitError> {
        let probe = Regs::map(base, FRAME_SIZE as usize).map_err(UnitError::Map)?;
        let (cap_raw, ecap_raw) = (probe.read64(r::CAP), probe.read64(r::ECAP));
        let cap = Cap::decode(cap_raw);
        let ecap = Ecap::decode(ecap_raw);
        // The fault recording and IOTLB registers may lie past the first page.
        let len = [
            FRAME_SIZE as usize,
            cap.fault_offset + 16 * cap.fault_records,
            ecap.iotlb_offset + 16,
        ]
        .into_iter()
        .max()
        .unwrap_or(FRAME_SIZE as usize)
        .next_multiple_of(FRAME_SIZE as usize);
        let regs = Regs::map(base, len).map_err(UnitError::Map)?;
        let levels = cap
            .levels()
            .ok_or(UnitError::NoUsableWidth { sagaw: cap.sagaw })?;
        let mut mem = Tables {
            coherent: ecap.coherent,
        };
        let contexts = ContextTables::new(&mut mem).ok_or(UnitError::OutOfMemory)?;
        let ver = regs.read32(r::VER);
        info!(
            "iommu: VT-d unit at {base:#x}: version {}.{}, {}-level tables (MGAW {}), {} domain \
             ids, {} fault record(s) at {:#x}, coherent walks {}, queued invalidation {}, \
             interrupt remapping {}, caching mode {} (CAP {cap_raw:#x}, ECAP {ecap_raw:#x})",
            (ver >> 4) & 0xf,
            ver & 0xf,
            levels,
            cap.mgaw,
            cap.domains,
            cap.fault_records,
            cap.fault_offset,
            yes(ecap.coherent),
            yes(ecap.queued_invalidation),
            yes(ecap.interrupt_remapping),
            yes(cap.caching_mode),
        );
        let unit = Unit {
            base,
            dmar_index,
            regs,
            cap,
            ecap,
            levels,
            mem,
            contexts,
        };
        if unit.regs.read32(r::GSTS) & gcmd::TE != 0 {
            warn!("iommu: unit {base:#x}: firmware left translation on; turning it off first");
            unit.command(gcmd::TE, false, "translation off")?;
        }
        if unit.regs.read32(r::PMEN) & (1 << 31) != 0 {
            info!("iommu: unit {base:#x}: firmware's protected memory region is on");
        }
        // Fault events are polled: keep the fault interrupt masked, clear old status.
        unit.regs.write32(r::FECTL, vtd::FECTL_IM);
        unit.clear_faults(false);
        unit.regs.write64(r::RTADDR, unit.contexts.root());
        unit.command(gcmd::SRTP, true, "root table pointer")?;
        unit.invalidate_all()?;
        unit.command(gcmd::TE, true, "translation on")?;
        Ok(unit)
    }

    /// Read, log (if `log`) and clear every pending fault record. Returns how many.
    fn clear_faults(&self, log: bool) -> usize {
        let status = self.regs.read32(r::FSTS);
        let mut n = 0;
        if status & fsts::PPF != 0 {
            let first = ((status >> 8) & 0xff) as usize;
            let count = self.cap.fault_records;
            for k in 0..count {
                let off = self.cap.fault_offset + 16 * ((first + k) % count);
                let lo = self.regs.read64(off);
                let hi = self.regs.read64(off + 8);
                let Some(f) = FaultRecord::decode(lo, hi) else {
                    continue;
                };
                if log {
                    warn!("iommu: unit {:#x}: {f}", self.base);
                }
                // F is write-1-to-clear (bit 31 of the record's last dword).
                self.regs.write32(off + 12, 1 << 31);
                n += 1;
            }
        }
        if status & fsts::PFO != 0 && log {
            warn!(
                "iommu: unit {:#x}: fault records overflowed; some faults were lost",
                self.base
            );
        }
        self.regs.write32(r::FSTS, status & fsts::CLEAR);
        n
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Find the VT-d units and turn each on with every device blocked. Returns how many are on.
/// Without a DMAR table, logs "no IOMMU".
pub fn init(rsdp_paddr: u64) -> usize {
    let Some(tables) = super::pci::acpi_tables(rsdp_paddr) else {
        info!("iommu: no IOMMU (no ACPI tables): device DMA is not confined");
        return 0;
    };
    let table = match tables.find_table::<DmarTable>() {
        Ok(t) => t,
        Err(_) => {
            info!("iommu: no IOMMU (no DMAR table): device DMA is not confined");
            return 0;
        }
    };
    let len = (table.get().header.length as usize).min(table.mapped_length());
    // SAFETY: the acpi crate mapped the whole table (its length, checksum validated) at this
    // address; the mapping is permanent and read-only use.
    let bytes =
        unsafe { core::slice::from_raw_parts(table.virtual_start().as_ptr() as *const u8, len) };
    let dmar = match Dmar::parse(bytes) {
        Ok(d) => d,
        Err(e) => {
            warn!("iommu: DMAR table refused ({e}): no IOMMU used");
            return 0;
        }
    };
    info!(
        "iommu: DMAR: host address width {}, {} unit(s), {} reserved region(s), interrupt \
         remapping {}",
        dmar.host_address_width,
        dmar.units.len(),
        dmar.rmrrs.len(),
        if dmar.interrupt_remapping {
            "offered"
        } else {
            "not offered"
        }
    );
    for rm in &dmar.rmrrs {
        info!(
            "iommu: reserved region {:#x}..={:#x} for {} device(s) (not mapped: those devices \
             stay blocked)",
            rm.base,
            rm.limit,
            rm.scopes.len()
        );
    }
    let mut units = UNITS.lock();
    for (i, d) in dmar.units.iter().enumerate() {
        if d.segment != 0 {
            warn!(
                "iommu: unit {:#x} serves segment {}: not used",
                d.register_base, d.segment
            );
            continue;
        }
        match Unit::bring_up(d.register_base, i) {
            Ok(u) => {
                info!(
                    "iommu: unit {:#x}: translation on ({}), no device mapped: all DMA blocked",
                    u.base,
                    if d.include_all {
                        "every device of segment 0"
                    } else {
                        "its listed devices"
                    }
                );
                units.push(u);
            }
            Err(e) => warn!("iommu: unit {:#x} left off: {e}", d.register_base),
        }
    }
    let on = units.len();
    drop(units);
    *DMAR.lock() = Some(dmar);
    if on > 0 {
        report_coverage();
    }
    on
}

/// Log every PCI function no running unit translates: its DMA is not confined.
fn report_coverage() {
    let (mut covered, mut uncovered) = (0, 0);
    super::pci::with(|p| {
        for f in &p.functions {
            if unit_index(f.address, &p.ecam).is_some() {
                covered += 1;
            } else {
                uncovered += 1;
                warn!(
                    "iommu: {} is behind no running unit: its DMA is not confined",
                    f.address
                );
            }
        }
    });
    info!("iommu: {covered} PCI function(s) behind a running unit, {uncovered} not");
}

fn unit_index(dev: PciAddress, cfg: &impl crate::pci::ConfigAccess) -> Option<usize> {
    let i = DMAR.lock().as_ref()?.unit_for(dev, cfg)?;
    UNITS.lock().iter().position(|u| u.dmar_index == i)
}

/// The running unit that translates `dev` (index for [`new_space`] and [`detach`]), if any.
/// Takes the PCI lock.
pub fn unit_for(dev: PciAddress) -> Option<usize> {
    super::pci::with(|p| unit_index(dev, &p.ecam)).flatten()
}

/// Read, log and clear every unit's pending faults. Returns how many were found. Cheap when
/// there are none (one register read per unit): call it from a periodic path.
pub fn poll_faults() -> usize {
    let Some(units) = UNITS.try_lock() else {
        return 0;
    };
    units.iter().map(|u| u.clear_faults(true)).sum()
}

/// Number of units with translation on.
pub fn units() -> usize {
    UNITS.lock().len()
}

/// A device address space on one unit (a domain's DMA view).
pub struct DmaSpace {
    unit: usize,
    table: SlTable,
}

/// Why a DMA operation was refused.
#[derive(Debug)]
pub enum DmaError {
    NoUnit,
    Map(SlError),
    Context(ContextError),
    OutOfMemory,
    /// The unit did not finish an invalidation.
    Timeout,
}

/// A new, empty address space on unit `unit`.
pub fn new_space(unit: usize) -> Result<DmaSpace, DmaError> {
    let mut units = UNITS.lock();
    let u = units.get_mut(unit).ok_or(DmaError::NoUnit)?;
    let levels = u.levels;
    let mgaw = u.cap.mgaw;
    let table = SlTable::new(&mut u.mem, levels, mgaw).ok_or(DmaError::OutOfMemory)?;
    Ok(DmaSpace { unit, table })
}

/// Map exactly `pages` (device address, host frame, `vtd::perm` bits) into `space`.
pub fn map_pages(space: &mut DmaSpace, pages: &[(u64, u64, u64)]) -> Result<(), DmaError> {
    let mut units = UNITS.lock();
    let u = units.get_mut(space.unit).ok_or(DmaError::NoUnit)?;
    space
        .table
        .map_all(&mut u.mem, pages)
        .map_err(DmaError::Map)?;
    // Caching mode (emulated IOMMUs) caches not-present entries too.
    if u.cap.caching_mode {
        let _ = u.invalidate_all();
    }
    Ok(())
}

/// Unmap `iovas` from `space` and flush the unit's IOTLB; returns the host frames unmapped
/// (the caller may reuse them only after this returns).
pub fn unmap_pages(space: &mut DmaSpace, iovas: &[u64]) -> Result<Vec<u64>, DmaError> {
    let mut units = UNITS.lock();
    let u = units.get_mut(space.unit).ok_or(DmaError::NoUnit)?;
    let freed = iovas
        .iter()
        .filter_map(|&a| space.table.unmap(&mut u.mem, a))
        .collect();
    u.invalidate_all().map_err(|_| DmaError::Timeout)?;
    Ok(freed)
}

/// Point `dev`'s DMA at `space` as domain id `did`. The caller then tells the config filter
/// the device is confined.
pub fn attach(dev: PciAddress, space: &DmaSpace, did: u16) -> Result<(), DmaError> {
    let mut units = UNITS.lock();
    let u = units.get_mut(space.unit).ok_or(DmaError::NoUnit)?;
    let domains = u.cap.domains;
    let Unit { mem, contexts, .. } = u;
    contexts
        .set(
            mem,
            dev,
            space.table.root(),
            space.table.levels(),
            did,
            domains,
        )
        .map_err(DmaError::Context)?;
    u.invalidate_all().map_err(|_| DmaError::Timeout)
}

/// Make the context table of `dev`'s bus on `unit` now (at boot, before domains are
/// built), so attaching later allocates nothing that outlives the domain.
pub fn prepare(dev: PciAddress, unit: usize) -> Result<(), DmaError> {
    let mut units = UNITS.lock();
    let u = units.get_mut(unit).ok_or(DmaError::NoUnit)?;
    let Unit { mem, contexts, .. } = u;
    contexts
        .ensure_bus(mem, dev.bus)
        .map(|_| ())
        .ok_or(DmaError::OutOfMemory)
}

/// Free `space`'s tables. Every device attached to it must have been detached first
/// ([`detach`] invalidates the unit's caches, so the hardware no longer walks them).
pub fn destroy_space(space: DmaSpace) -> Result<(), DmaError> {
    let mut units = UNITS.lock();
    let u = units.get_mut(space.unit).ok_or(DmaError::NoUnit)?;
    u.invalidate_all().map_err(|_| DmaError::Timeout)?;
    for f in space.table.table_frames(&u.mem) {
        memory::free_frame(f);
    }
    Ok(())
}

/// Block `dev`'s DMA again (before the device goes back or to another domain).
pub fn detach(dev: PciAddress, unit: usize) -> bool {
    let mut units = UNITS.lock();
    let Some(u) = units.get_mut(unit) else {
        return false;
    };
    let Unit { mem, contexts, .. } = u;
    let had = contexts.clear(mem, dev);
    let _ = u.invalidate_all();
    had
}
