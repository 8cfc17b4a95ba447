//! PCI on bare metal: find ECAM through the ACPI MCFG table, access configuration space
//! through it (mapped uncached, one bus = 1 MiB at a time, on first touch), enumerate with
//! the portable `crate::pci` logic and log every function.
//!
//! Only the first MCFG entry (segment 0, the one QEMU's q35 has) is used; the others are
//! logged and left alone. Lock order: `PCI` → page tables (mapping a bus) → frame allocator.

use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use acpi::mcfg::Mcfg;
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use log::{info, warn};
use spin::Mutex;

use super::{memory, phys_to_virt};
use crate::pci::bar::{BarSlot, Bars};
use crate::pci::caps::{CapList, id};
use crate::pci::enumerate::{self, Function};
use crate::pci::{ConfigAccess, HeaderType, PciAddress, access_ok};

/// Maps ACPI tables through the direct map (write-back; they stay mapped).
#[derive(Clone, Copy, Debug)]
pub struct Firmware;

impl AcpiHandler for Firmware {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let virt = match memory::map_firmware(phys as u64, size as u64) {
            Ok(v) => v,
            Err(e) => super::boot::fatal(format_args!(
                "cannot map ACPI table at {phys:#x} (+{size:#x}): {e}"
            )),
        };
        let Some(ptr) = NonNull::new(virt as *mut T) else {
            super::boot::fatal(format_args!("ACPI table at {phys:#x} maps to null"))
        };
        // SAFETY: [phys, phys + size) is now mapped at `virt` and stays mapped for ever.
        unsafe { PhysicalMapping::new(phys, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The ACPI tables, or `None` (logged) if there are none usable.
pub fn acpi_tables(rsdp_paddr: u64) -> Option<AcpiTables<Firmware>> {
    // SAFETY: the RSDP address comes from the PVH start info (or the BIOS search); the acpi
    // crate checks signatures and checksums, and the handler maps exactly what it asks for.
    let tables = unsafe {
        if rsdp_paddr != 0 {
            AcpiTables::from_rsdp(Firmware, rsdp_paddr as usize)
        } else {
            AcpiTables::search_for_rsdp_bios(Firmware)
        }
    };
    match tables {
        Ok(t) => Some(t),
        Err(e) => {
            warn!("no usable ACPI tables: {e:?}");
            None
        }
    }
}

/// ECAM for one segment: `base` is bus `start_bus`'s configuration space.
pub struct Ecam {
    base: u64,
    segment: u16,
    start_bus: u8,
    end_bus: u8,
    /// One bit per bus: its 1 MiB is mapped.
    mapped: [AtomicU64; 4],
}

impl Ecam {
    /// Physical address of `addr`'s config space at `offset`, if inside this window.
    fn phys(&self, addr: PciAddress, offset: u16) -> Option<u64> {
        if addr.segment != self.segment
            || !(self.start_bus..=self.end_bus).contains(&addr.bus)
            || !addr.is_valid()
        {
            return None;
        }
        let bus = (addr.bus - self.start_bus) as u64;
        Some(
            self.base
                + (bus << 20)
                + ((addr.device as u64) << 15)
                + ((addr.function as u64) << 12)
                + offset as u64,
        )
    }

    /// Virtual address of a well-formed access, mapping the bus on first touch.
    fn virt(&self, addr: PciAddress, offset: u16, size: u8) -> Option<u64> {
        if !access_ok(offset, size) {
            return None;
        }
        let phys = self.phys(addr, offset)?;
        let bus = addr.bus as usize;
        let (w, b) = (bus / 64, 1u64 << (bus % 64));
        if self.mapped[w].load(Ordering::Acquire) & b == 0 {
            let bus_base = self.phys(PciAddress::new(addr.segment, addr.bus, 0, 0)?, 0)?;
            if let Err(e) = memory::map_mmio(bus_base, 1 << 20) {
                warn!("pci: cannot map ECAM for bus {:#04x}: {e}", addr.bus);
                return None;
            }
            self.mapped[w].fetch_or(b, Ordering::AcqRel);
        }
        Some(phys_to_virt(phys))
    }
}

impl ConfigAccess for Ecam {
    fn read(&self, addr: PciAddress, offset: u16, size: u8) -> u32 {
        let Some(v) = self.virt(addr, offset, size) else {
            return u32::MAX >> (32 - 8 * size.clamp(1, 4) as u32);
        };
        // SAFETY: `v` is inside this bus's ECAM, mapped uncached by `virt`, naturally aligned
        // for `size`; a config read has no side effects on memory the hypervisor uses.
        unsafe {
            match size {
                1 => core::ptr::read_volatile(v as *const u8) as u32,
                2 => core::ptr::read_volatile(v as *const u16) as u32,
                _ => core::ptr::read_volatile(v as *const u32),
            }
        }
    }

    fn write(&mut self, addr: PciAddress, offset: u16, size: u8, value: u32) {
        let Some(v) = self.virt(addr, offset, size) else {
            return;
        };
        // SAFETY: as for `read`; the caller (enumeration or the filter) decided the write is
        // allowed.
        unsafe {
            match size {
                1 => core::ptr::write_volatile(v as *mut u8, value as u8),
                2 => core::ptr::write_volatile(v as *mut u16, value as u16),
                _ => core::ptr::write_volatile(v as *mut u32, value),
            }
        }
    }
}

/// What PCI discovery found.
pub struct Pci {
    pub ecam: Ecam,
    pub functions: Vec<Function>,
}

static PCI: Mutex<Option<Pci>> = Mutex::new(None);

/// Run `f` on the discovered PCI state, if discovery ran and found ECAM.
pub fn with<R>(f: impl FnOnce(&mut Pci) -> R) -> Option<R> {
    PCI.lock().as_mut().map(f)
}

fn class_name(class: [u8; 3]) -> &'static str {
    match (class[0], class[1]) {
        (0x01, 0x00) => "SCSI storage",
        (0x01, 0x01) => "IDE",
        (0x01, 0x06) => "SATA",
        (0x01, 0x08) => "NVMe",
        (0x01, _) => "storage",
        (0x02, _) => "network",
        (0x03, _) => "display",
        (0x06, 0x00) => "host bridge",
        (0x06, 0x01) => "ISA bridge",
        (0x06, 0x04) => "PCI bridge",
        (0x06, _) => "bridge",
        (0x07, _) => "communication",
        (0x08, 0x06) => "IOMMU",
        (0x08, _) => "system peripheral",
        (0x0c, 0x03) => "USB",
        (0x0c, 0x05) => "SMBus",
        (0x0c, _) => "serial bus",
        (0xff, _) => "unassigned class",
        _ => "other",
    }
}

fn cap_name(id: u16) -> &'static str {
    match id as u8 {
        id::POWER_MANAGEMENT => "PM",
        id::MSI => "MSI",
        id::VENDOR => "vendor",
        id::PCIE => "PCIe",
        id::MSIX => "MSI-X",
        0x03 => "VPD",
        0x0d => "bridge subsystem",
        0x12 => "SATA",
        0x13 => "AF",
        _ => "?",
    }
}

fn log_function(f: &Function) {
    let h = &f.header;
    let kind = match h.header_type {
        HeaderType::Endpoint => "endpoint",
        HeaderType::Bridge => "PCI bridge",
        HeaderType::CardBus => "CardBus bridge",
        HeaderType::Unknown(_) => "unknown header",
    };
    info!(
        "pci {} {:04x}:{:04x} class {:02x}.{:02x}.{:02x} ({}) rev {:#x}, {}{}{}",
        f.address,
        h.vendor,
        h.device,
        h.class[0],
        h.class[1],
        h.class[2],
        class_name(h.class),
        h.revision,
        kind,
        if h.multifunction {
            ", multi-function"
        } else {
            ""
        },
        if h.interrupt_pin != 0 { ", INTx" } else { "" }
    );
    if let Some((p, s, sub)) = h.buses {
        info!("    buses: primary {p:#04x}, secondary {s:#04x}, subordinate {sub:#04x}");
    }
    log_bars(&f.bars);
    log_caps(&f.caps);
    if let Some(m) = &f.msi {
        info!(
            "    MSI at {:#x}: {} vector(s), {}-bit address{}, {}",
            m.offset,
            m.vectors,
            if m.addr64 { 64 } else { 32 },
            if m.per_vector_mask {
                ", per-vector mask"
            } else {
                ""
            },
            if m.enabled { "enabled" } else { "disabled" }
        );
    }
    if let Some(m) = &f.msix {
        let mut line = heapless::String::<160>::new();
        let _ = core::fmt::write(
            &mut line,
            format_args!("    MSI-X at {:#x}: {} entries, ", m.offset, m.entries),
        );
        for (name, r) in [("table", m.table(&f.bars)), ("PBA", m.pba(&f.bars))] {
            let _ = match r {
                Ok(r) => core::fmt::write(
                    &mut line,
                    format_args!("{name} BAR{}+{:#x} ({:#x}); ", r.bir, r.offset, r.phys),
                ),
                Err(e) => core::fmt::write(&mut line, format_args!("{name} refused: {e}; ")),
            };
        }
        info!("{line}{}", if m.enabled { "enabled" } else { "disabled" });
    }
}

fn log_bars(bars: &Bars) {
    for (i, s) in bars.slots.iter().enumerate() {
        match s {
            BarSlot::Bar(b) => info!("    BAR{i} {b}"),
            BarSlot::Bad(e) => warn!("    {e}: BAR ignored"),
            BarSlot::Empty | BarSlot::Upper => {}
        }
    }
    match &bars.rom {
        BarSlot::Bar(b) => info!("    {b}"),
        BarSlot::Bad(e) => warn!("    ROM {e}: ignored"),
        _ => {}
    }
}

fn log_caps(caps: &CapList) {
    if !caps.caps.is_empty() {
        let mut line = heapless::String::<200>::new();
        for c in &caps.caps {
            let _ = core::fmt::write(
                &mut line,
                format_args!(" {:#x} {}", c.offset, cap_name(c.id)),
            );
        }
        info!("    caps:{line}");
    }
    if let Some(e) = caps.error {
        warn!("    capability list cut short: {e}");
    }
    if !caps.ext.is_empty() {
        let mut line = heapless::String::<200>::new();
        for c in &caps.ext {
            let _ = core::fmt::write(&mut line, format_args!(" {:#x} id {:#x}", c.offset, c.id));
        }
        info!("    extended caps:{line}");
    }
    if let Some(e) = caps.ext_error {
        warn!("    extended capability list cut short: {e}");
    }
}

/// Find ECAM in the MCFG, enumerate segment 0 and log every function. Without an MCFG (or
/// ACPI) PCI is left alone, logged.
pub fn init(rsdp_paddr: u64) -> usize {
    let Some(tables) = acpi_tables(rsdp_paddr) else {
        warn!("pci: no ACPI tables: PCI not enumerated");
        return 0;
    };
    let mcfg = match tables.find_table::<Mcfg>() {
        Ok(m) => m,
        Err(e) => {
            warn!("pci: no MCFG ({e:?}): PCI not enumerated");
            return 0;
        }
    };
    let mcfg = mcfg.get();
    let entries = mcfg.entries();
    for (i, e) in entries.iter().enumerate() {
        let (base, seg, start, end) = (
            e.base_address,
            e.pci_segment_group,
            e.bus_number_start,
            e.bus_number_end,
        );
        info!(
            "pci: MCFG[{i}]: segment {seg}, buses {start:#04x}..={end:#04x}, ECAM at {base:#x}{}",
            if i == 0 { "" } else { " (not used)" }
        );
    }
    let Some(e) = entries.first() else {
        warn!("pci: MCFG lists no ECAM window: PCI not enumerated");
        return 0;
    };
    let (base, segment, start_bus, end_bus) = (
        e.base_address,
        e.pci_segment_group,
        e.bus_number_start,
        e.bus_number_end,
    );
    let window = ((end_bus as u64).saturating_sub(start_bus as u64) + 1) << 20;
    if start_bus > end_bus
        || base & 0xf_ffff != 0
        || base
            .checked_add(window)
            .is_none_or(|end| end > super::DIRECT_MAP_LIMIT)
    {
        warn!(
            "pci: ECAM window {base:#x} buses {start_bus:#04x}..={end_bus:#04x} is not usable: \
             PCI not enumerated"
        );
        return 0;
    }
    let mut ecam = Ecam {
        base,
        segment,
        start_bus,
        end_bus,
        mapped: [const { AtomicU64::new(0) }; 4],
    };
    let (functions, stats) = enumerate::enumerate(&mut ecam, segment, start_bus..=end_bus, true);
    for f in &functions {
        log_function(f);
    }
    if stats.bad_bridges > 0 {
        warn!(
            "pci: {} bridge(s) point at buses already scanned or outside the window: not followed",
            stats.bad_bridges
        );
    }
    if stats.dropped > 0 {
        warn!(
            "pci: {} functions beyond the limit were not recorded",
            stats.dropped
        );
    }
    info!(
        "pci: {} functions on {} bus(es)",
        functions.len(),
        stats.buses_scanned
    );
    let n = functions.len();
    *PCI.lock() = Some(Pci { ecam, functions });
    n
}
