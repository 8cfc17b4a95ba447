//! The hypervisor's physical memory and its own address space, on bare metal: the global frame
//! allocator (`mm::frame`) over the PVH memory map, the kernel page tables (`mm::paging`) in
//! frames reached through the direct map, and helpers to map stacks, MMIO and firmware tables.
//!
//! Lock order: `KERNEL_PT` → `FRAMES`. Neither lock is taken in interrupt handlers.

use core::sync::atomic::{AtomicU64, Ordering};

use heapless::Vec;
use shared_abi::hvm_start_info::{HvmMemmapEntry, memmap_type};
use spin::Mutex;

use super::{DIRECT_MAP_BASE, DIRECT_MAP_LIMIT, KERNEL_VMA, STACK_REGION_BASE, STACK_SLOT_SIZE};
use super::{cpu, phys_to_virt};
use crate::boot::start_info::PhysMemory;
use crate::mm::frame::FrameAllocator;
use crate::mm::memmap::{self, MAX_RANGES, MemMapError, PhysRange};
use crate::mm::paging::{MapError, PageTable, TableMemory, flags};
use crate::mm::{FRAME_SIZE, align_up};

/// The boot stub's direct map covers physical 0..4 GiB with 2 MiB pages.
const BOOT_MAP_LIMIT: u64 = 4 << 30;

static FRAMES: Mutex<Option<FrameAllocator<'static>>> = Mutex::new(None);
static KERNEL_PT: Mutex<Option<PageTable<DirectMapTables>>> = Mutex::new(None);
static NEXT_STACK_SLOT: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __bss_end: u8;
    static bulkhead_boot_stack_guard: u8;
    static bulkhead_boot_pml4: u8;
}

fn sym(s: *const u8) -> u64 {
    s as u64
}

/// Physical range of the loaded hypervisor image.
pub fn image_range() -> PhysRange {
    PhysRange::new(
        sym(&raw const __image_start) - KERNEL_VMA,
        sym(&raw const __image_end) - KERNEL_VMA,
    )
}

/// Physical address of the boot stub's PML4 (identity + direct map of 0..4 GiB + image).
pub fn boot_pml4_phys() -> u64 {
    sym(&raw const bulkhead_boot_pml4) - KERNEL_VMA
}

/// Reads physical memory below 4 GiB through the boot stub's direct map.
pub struct BootPhysMemory;

impl PhysMemory for BootPhysMemory {
    fn read(&self, paddr: u64, buf: &mut [u8]) -> bool {
        match paddr.checked_add(buf.len() as u64) {
            Some(end) if end <= BOOT_MAP_LIMIT => {
                // SAFETY: [paddr, end) is below 4 GiB, which the boot tables map (read-write,
                // write-back) at DIRECT_MAP_BASE; this only reads, into a separate buffer.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        phys_to_virt(paddr) as *const u8,
                        buf.as_mut_ptr(),
                        buf.len(),
                    )
                };
                true
            }
            _ => false,
        }
    }
}

/// Frames the hypervisor's own page tables took since boot (they are never given back: a
/// mapping made once, e.g. of a device's MSI-X table, stays). The memory balance at power-off
/// counts them like heap growth.
pub static KERNEL_TABLE_FRAMES: core::sync::atomic::AtomicU64 =
    core::sync::atomic::AtomicU64::new(0);

/// Page-table frames reached through the direct map.
pub struct DirectMapTables {
    /// New tables come from below this address (the boot direct map's reach while building).
    below: u64,
}

impl TableMemory for DirectMapTables {
    fn alloc_table(&mut self) -> Option<u64> {
        let f = FRAMES.lock().as_mut()?.alloc_below(self.below)?;
        KERNEL_TABLE_FRAMES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        // SAFETY: the frame was just allocated (no one else uses it) and is direct-mapped.
        unsafe { core::ptr::write_bytes(phys_to_virt(f) as *mut u8, 0, FRAME_SIZE as usize) };
        Some(f)
    }

    fn read(&self, table: u64, index: usize) -> u64 {
        // SAFETY: `table` is a page-table frame allocated by `alloc_table` (or the root),
        // direct-mapped; index < 512 by construction in `mm::paging`.
        unsafe { core::ptr::read_volatile((phys_to_virt(table) as *const u64).add(index & 511)) }
    }

    fn write(&mut self, table: u64, index: usize, value: u64) {
        // SAFETY: as for `read`; the KERNEL_PT lock serialises writers.
        unsafe {
            core::ptr::write_volatile((phys_to_virt(table) as *mut u64).add(index & 511), value)
        }
    }
}

/// Why memory setup failed.
#[derive(Debug)]
pub enum MemError {
    Map(MemMapError),
    /// No room below 4 GiB for the frame bitmap.
    NoRoomForBitmap {
        bytes: u64,
    },
    Frames(crate::mm::frame::FrameError),
    Paging(MapError),
    OutOfMemory,
}

impl core::fmt::Display for MemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MemError::Map(e) => write!(f, "{e}"),
            MemError::NoRoomForBitmap { bytes } => {
                write!(f, "no {bytes}-byte run below 4 GiB for the frame bitmap")
            }
            MemError::Frames(e) => write!(f, "frame allocator: {e:?}"),
            MemError::Paging(e) => write!(f, "page tables: {e:?}"),
            MemError::OutOfMemory => write!(f, "out of memory"),
        }
    }
}

/// Set up the frame allocator: usable RAM from `map` minus `reserved` (plus the low 1 MiB and
/// the image, always), with its bitmap carved out of that RAM below 4 GiB.
pub fn init_frames(map: &[HvmMemmapEntry], reserved: &[PhysRange]) -> Result<(), MemError> {
    let mut all: Vec<PhysRange, 24> = Vec::new();
    let _ = all.push(PhysRange::new(0, 1 << 20));
    let _ = all.push(image_range());
    for r in reserved {
        if all.push(*r).is_err() {
            break;
        }
    }
    let usable = memmap::usable_ranges(map, &all, DIRECT_MAP_LIMIT).map_err(MemError::Map)?;
    let end = usable.last().map_or(0, |r| r.end);
    let words = FrameAllocator::words_needed(end);
    let bytes = align_up(words as u64 * 8, FRAME_SIZE).ok_or(MemError::OutOfMemory)?;
    let spot = usable
        .iter()
        .find(|r| r.end <= BOOT_MAP_LIMIT && r.len() >= bytes)
        .map(|r| PhysRange::new(r.start, r.start + bytes))
        .ok_or(MemError::NoRoomForBitmap { bytes })?;
    // SAFETY: `spot` is usable RAM below 4 GiB (boot direct map), reserved below before the
    // allocator can hand it out, and used only as this bitmap for ever.
    let storage: &'static mut [u64] =
        unsafe { core::slice::from_raw_parts_mut(phys_to_virt(spot.start) as *mut u64, words) };
    let mut fa = FrameAllocator::new(storage, &usable).map_err(MemError::Frames)?;
    fa.reserve(spot);
    *FRAMES.lock() = Some(fa);
    Ok(())
}

/// Free memory in bytes.
pub fn free_bytes() -> u64 {
    FRAMES.lock().as_ref().map_or(0, |f| f.free_bytes())
}

/// Usable ranges the allocator manages (for the boot log).
pub fn usable_ranges() -> Vec<PhysRange, MAX_RANGES> {
    FRAMES
        .lock()
        .as_ref()
        .map(|f| f.usable().iter().copied().collect())
        .unwrap_or_default()
}

/// One free frame (physical address), or `None` when memory is exhausted.
pub fn alloc_frame() -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc()
}

/// Give back a frame from [`alloc_frame`]. Returns false (and changes nothing) if the
/// allocator refuses it (not allocated, outside RAM).
pub fn free_frame(phys: u64) -> bool {
    FRAMES.lock().as_mut().is_some_and(|f| f.free(phys).is_ok())
}

/// Number of free frames.
pub fn free_frames() -> u64 {
    FRAMES.lock().as_ref().map_or(0, |f| f.free_frames())
}

/// `count` contiguous frames aligned to `align` bytes; physical address.
pub fn alloc_contiguous(count: u64, align: u64) -> Option<u64> {
    FRAMES
        .lock()
        .as_mut()?
        .alloc_contiguous(count, align, DIRECT_MAP_LIMIT)
}

/// Build the hypervisor's own page tables (image with per-section permissions, direct map of
/// RAM) and switch to them; then turn on NX, WP, SMEP/SMAP and global pages as available.
pub fn init_paging(map: &[HvmMemmapEntry]) -> Result<(), MemError> {
    let mut pt = PageTable::new(DirectMapTables {
        below: BOOT_MAP_LIMIT,
    })
    .ok_or(MemError::OutOfMemory)?;
    let feats = cpu::features();
    let g = if feats.global_pages { flags::GLOBAL } else { 0 };

    // The image: text R-X, rodata R, data+bss RW NX, except the boot stack's guard page.
    let sections = [
        (sym(&raw const __text_start), sym(&raw const __text_end), g),
        (
            sym(&raw const __rodata_start),
            sym(&raw const __rodata_end),
            g | flags::NO_EXECUTE,
        ),
        (
            sym(&raw const __data_start),
            sym(&raw const __bss_end),
            g | flags::WRITABLE | flags::NO_EXECUTE,
        ),
    ];
    let guard = sym(&raw const bulkhead_boot_stack_guard);
    for (start, end, fl) in sections {
        let mut v = start;
        while v < end {
            if v != guard {
                pt.map(v, v - KERNEL_VMA, crate::mm::paging::PageSize::Small, fl)
                    .map_err(MemError::Paging)?;
            }
            v += FRAME_SIZE;
        }
    }

    // The direct map: RAM, ACPI and NVS, merged, with 2 MiB pages where they fit.
    let mut ranges: Vec<PhysRange, MAX_RANGES> = Vec::new();
    for e in map {
        if matches!(
            e.kind,
            memmap_type::RAM | memmap_type::ACPI | memmap_type::NVS
        ) && let Some(r) = PhysRange::with_len(e.addr, e.size)
        {
            let r = r.grow_to_pages();
            let r = PhysRange::new(r.start, r.end.min(DIRECT_MAP_LIMIT));
            if !r.is_empty() && ranges.push(r).is_err() {
                break;
            }
        }
    }
    memmap::normalise(&mut ranges);
    for r in &ranges {
        pt.map_range(
            DIRECT_MAP_BASE + r.start,
            r.start,
            r.len(),
            g | flags::WRITABLE | flags::NO_EXECUTE,
            true,
        )
        .map_err(MemError::Paging)?;
    }

    // SAFETY: EFER.NXE (set by the boot stub, set again here) makes NX bits valid; the new
    // tables map everything the running code touches at the same virtual addresses (image,
    // boot stack, direct map of RAM incl. these tables and the frame bitmap).
    unsafe {
        let efer = cpu::rdmsr(x86::msr::IA32_EFER);
        cpu::wrmsr(x86::msr::IA32_EFER, efer | (1 << 11));
        x86::controlregs::cr3_write(pt.root());
    }
    pt.memory().below = u64::MAX;
    *KERNEL_PT.lock() = Some(pt);
    enable_protections();
    Ok(())
}

/// The root table's physical address (the CR3 every CPU loads).
pub fn kernel_cr3() -> u64 {
    KERNEL_PT.lock().as_ref().map_or(0, |p| p.root())
}

/// CR0.WP, CR4.SMEP/SMAP/PGE where the CPU has them. Run on every CPU after it loads the
/// hypervisor's tables.
pub fn enable_protections() {
    use x86::controlregs::{Cr0, Cr4, cr0, cr0_write, cr4, cr4_write};
    let f = cpu::features();
    // SAFETY: the hypervisor maps nothing user-accessible, so SMEP/SMAP cannot fault its own
    // accesses; WP only makes read-only pages read-only for ring 0 too; PGE is a TLB hint.
    unsafe {
        cr0_write(cr0() | Cr0::CR0_WRITE_PROTECT);
        let mut c4 = cr4();
        if f.smep {
            c4 |= Cr4::CR4_ENABLE_SMEP;
        }
        if f.smap {
            c4 |= Cr4::CR4_ENABLE_SMAP;
        }
        if f.global_pages {
            c4 |= Cr4::CR4_ENABLE_GLOBAL_PAGES;
        }
        cr4_write(c4);
    }
}

/// Map `[phys, phys + len)` into the direct map if not mapped yet; returns its virtual
/// address. `uncached` for MMIO.
fn map_direct(phys: u64, len: u64, uncached: bool) -> Result<u64, MemError> {
    let start = crate::mm::align_down(phys, FRAME_SIZE);
    let end = phys
        .checked_add(len.max(1))
        .and_then(|e| align_up(e, FRAME_SIZE))
        .filter(|&e| e <= DIRECT_MAP_LIMIT)
        .ok_or(MemError::Paging(MapError::NonCanonical { virt: phys }))?;
    let fl = flags::WRITABLE
        | flags::NO_EXECUTE
        | if uncached {
            flags::CACHE_DISABLE | flags::WRITE_THROUGH
        } else {
            0
        };
    let mut pt = KERNEL_PT.lock();
    let pt = pt.as_mut().ok_or(MemError::OutOfMemory)?;
    pt.map_range_if_absent(DIRECT_MAP_BASE + start, start, end - start, fl)
        .map_err(MemError::Paging)?;
    Ok(phys_to_virt(phys))
}

/// Map a device's registers (uncached) and return their virtual address.
pub fn map_mmio(phys: u64, len: u64) -> Result<u64, MemError> {
    map_direct(phys, len, true)
}

/// Map firmware tables (ACPI; write-back) and return their virtual address.
pub fn map_firmware(phys: u64, len: u64) -> Result<u64, MemError> {
    map_direct(phys, len, false)
}

/// A new stack of `pages` pages at the top of its own slot in the stack region: everything
/// below it in the slot stays unmapped, so running off the bottom faults. Returns the top.
pub fn alloc_stack(pages: u64) -> Result<u64, MemError> {
    let bytes = pages * FRAME_SIZE;
    if bytes + FRAME_SIZE > STACK_SLOT_SIZE {
        return Err(MemError::OutOfMemory);
    }
    let slot = NEXT_STACK_SLOT.fetch_add(1, Ordering::Relaxed);
    let top = STACK_REGION_BASE + (slot + 1) * STACK_SLOT_SIZE;
    let bottom = top - bytes;
    let mut pt = KERNEL_PT.lock();
    let pt = pt.as_mut().ok_or(MemError::OutOfMemory)?;
    let mut v = bottom;
    while v < top {
        let f = FRAMES
            .lock()
            .as_mut()
            .and_then(|f| f.alloc())
            .ok_or(MemError::OutOfMemory)?;
        pt.map(
            v,
            f,
            crate::mm::paging::PageSize::Small,
            flags::WRITABLE | flags::NO_EXECUTE,
        )
        .map_err(MemError::Paging)?;
        v += FRAME_SIZE;
    }
    Ok(top)
}

/// Is `[paddr, paddr + size)` RAM the memory map reports, inside the direct map?
pub fn is_direct_mapped_ram(map: &[HvmMemmapEntry], paddr: u64, size: u64) -> bool {
    match PhysRange::with_len(paddr, size) {
        Some(r) if r.end <= DIRECT_MAP_LIMIT => memmap::is_ram(map, r).unwrap_or(false),
        _ => false,
    }
}

/// Check the permissions the hypervisor's tables promise (W^X on the image, NX direct map,
/// unmapped guard page and lower half) by walking them; names the first broken promise.
pub fn check_layout() -> Result<(), &'static str> {
    let pt = KERNEL_PT.lock();
    let pt = pt.as_ref().ok_or("page tables not built")?;
    let w = |v: u64| pt.translate(v).map(|(_, f)| f);
    let text = w(sym(&raw const __text_start)).ok_or(".text unmapped")?;
    if text & flags::WRITABLE != 0 || text & flags::NO_EXECUTE != 0 {
        return Err(".text is not R-X");
    }
    let ro = w(sym(&raw const __rodata_start)).ok_or(".rodata unmapped")?;
    if ro & flags::WRITABLE != 0 || ro & flags::NO_EXECUTE == 0 {
        return Err(".rodata is not read-only NX");
    }
    let data = w(sym(&raw const __data_start)).ok_or(".data unmapped")?;
    if data & flags::WRITABLE == 0 || data & flags::NO_EXECUTE == 0 {
        return Err(".data is not RW NX");
    }
    if w(sym(&raw const bulkhead_boot_stack_guard)).is_some() {
        return Err("boot stack guard page is mapped");
    }
    let dm = w(phys_to_virt(image_range().start)).ok_or("direct map misses the image")?;
    if dm & flags::NO_EXECUTE == 0 {
        return Err("direct map is executable");
    }
    if w(0).is_some() || w(0x8000).is_some() {
        return Err("lower half is mapped");
    }
    Ok(())
}

/// Is `virt` mapped in the hypervisor's tables?
pub fn is_mapped(virt: u64) -> bool {
    KERNEL_PT
        .lock()
        .as_ref()
        .is_some_and(|pt| pt.translate(virt).is_some())
}
