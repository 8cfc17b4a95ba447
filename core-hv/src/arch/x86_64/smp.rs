//! SMP bring-up: find the CPUs in the ACPI MADT, give each one its per-CPU data and stacks, and
//! start the APs one at a time with INIT-SIPI-SIPI through a real-mode trampoline copied to
//! [`TRAMPOLINE_PHYS`] (below 1 MiB, reserved from the frame allocator with the rest of the
//! low 1 MiB).
//!
//! An AP's path: real mode → protected mode (trampoline GDT) → long mode on the boot stub's
//! page tables (they identity-map the trampoline) → `bulkhead_ap_long_entry` in the image,
//! which loads the hypervisor's CR3 and the AP's own stack → [`ap_main`]: GDT/TSS, GS, IDT,
//! protections, APIC timer, then idle with interrupts on.
//!
//! The trampoline's parameter block is shared, so APs start strictly one after another: the
//! BSP waits for each AP to come online (or times out) before writing the next parameters.

use core::arch::global_asm;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use heapless::Vec;

use super::percpu::{self, PerCpu};
use super::{MAX_CPUS, apic, cpu, gdt, idt, memory, phys_to_virt};

/// Where the trampoline runs (SIPI vector 0x08).
pub const TRAMPOLINE_PHYS: u64 = 0x8000;
const PARAM_BOOT_CR3: u64 = 0x08;
const PARAM_CR3: u64 = 0x10;
const PARAM_STACK: u64 = 0x18;
const PARAM_ENTRY: u64 = 0x20;
const PARAM_ARG: u64 = 0x28;

/// Pages of kernel stack per CPU.
pub const KERNEL_STACK_PAGES: u64 = 16;
/// Pages of each IST stack.
pub const IST_STACK_PAGES: u64 = 4;

// The trampoline: fixed offsets (`.org`) so every address in it is a constant once it sits at
// 0x8000. Offsets 0x08-0x2f: parameters; 0x30: GDT; 0x58: GDT pointer; 0x60: 16-bit code;
// 0x100: 32-bit code; 0x180: 64-bit code.
global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .code16
    .global bulkhead_ap_tramp_start
    bulkhead_ap_tramp_start:
        jmp 1f
    .org 0x08
        .quad 0, 0, 0, 0, 0
    .org 0x30
        .quad 0
        .quad 0x00af9b000000ffff
        .quad 0x00cf93000000ffff
        .quad 0x00cf9b000000ffff
        .quad 0x00cf93000000ffff
    .org 0x58
        .word 39
        .long 0x8030
    .org 0x60
    1:
        cli
        cld
        xorw %ax, %ax
        movw %ax, %ds
        lgdtl 0x8058
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $0x18, $0x8100
    .org 0x100
    .code32
        movw $0x20, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl %cr4, %eax
        orl $0x20, %eax
        movl %eax, %cr4
        movl 0x8008, %eax
        movl %eax, %cr3
        movl $0xc0000080, %ecx
        rdmsr
        orl $0x900, %eax
        wrmsr
        movl %cr0, %eax
        orl $0x80010000, %eax
        movl %eax, %cr0
        ljmpl $0x08, $0x8180
    .org 0x180
    .code64
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movq 0x8028, %rdi
        movq 0x8010, %rsi
        movq 0x8018, %rdx
        movq 0x8020, %rax
        jmp *%rax
    .global bulkhead_ap_tramp_end
    bulkhead_ap_tramp_end:

    .section .text.ap_entry, "ax"
    .global bulkhead_ap_long_entry
    bulkhead_ap_long_entry:
        movq %rsi, %cr3
        movq %rdx, %rsp
        xorl %ebp, %ebp
        call {ap_main}
        ud2
    "#,
    ap_main = sym ap_main,
    options(att_syntax)
);

unsafe extern "C" {
    static bulkhead_ap_tramp_start: u8;
    static bulkhead_ap_tramp_end: u8;
    fn bulkhead_ap_long_entry();
}

/// Maps ACPI tables through the direct map.
#[derive(Clone, Copy, Debug)]
struct Firmware;

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
        // SAFETY: [phys, phys + size) is now mapped at `virt` (write-back, read-write) and
        // stays mapped for ever.
        unsafe { PhysicalMapping::new(phys, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// APIC ids of the enabled processors in the MADT (the BSP's included), at most
/// [`MAX_CPUS`]. Errors are reported and leave only the BSP.
pub fn find_cpus(rsdp_paddr: u64, bsp_apic_id: u32) -> Vec<u32, MAX_CPUS> {
    let mut ids: Vec<u32, MAX_CPUS> = Vec::new();
    let _ = ids.push(bsp_apic_id);
    // SAFETY: the RSDP address comes from the PVH start info; the acpi crate checks the
    // signature and checksum of every table before using it, and the handler maps exactly
    // the ranges it asks for.
    let tables = match unsafe {
        if rsdp_paddr != 0 {
            AcpiTables::from_rsdp(Firmware, rsdp_paddr as usize)
        } else {
            AcpiTables::search_for_rsdp_bios(Firmware)
        }
    } {
        Ok(t) => t,
        Err(e) => {
            log::warn!("no usable ACPI tables ({e:?}): running on the boot CPU only");
            return ids;
        }
    };
    let madt = match tables.find_table::<Madt>() {
        Ok(m) => m,
        Err(e) => {
            log::warn!("no MADT ({e:?}): running on the boot CPU only");
            return ids;
        }
    };
    for entry in madt.get().entries() {
        let (id, flags) = match entry {
            MadtEntry::LocalApic(l) => (l.apic_id as u32, l.flags),
            MadtEntry::LocalX2Apic(x) => (x.x2apic_id, x.flags),
            _ => continue,
        };
        // Bit 0: enabled. "Online capable" (bit 1) CPUs are absent until hot-plugged.
        if flags & 1 == 0 || ids.contains(&id) {
            continue;
        }
        if id > 0xfe {
            log::warn!("CPU with APIC id {id} needs x2APIC: not started");
            continue;
        }
        if ids.push(id).is_err() {
            log::warn!("more than {MAX_CPUS} CPUs: the rest are not started");
            break;
        }
    }
    ids
}

/// Per-CPU data plus kernel and IST stacks for CPU `index`.
pub fn create_cpu(index: u32, apic_id: u32) -> Result<&'static PerCpu, memory::MemError> {
    let kstack = memory::alloc_stack(KERNEL_STACK_PAGES)?;
    let df = memory::alloc_stack(IST_STACK_PAGES)?;
    let nmi = memory::alloc_stack(IST_STACK_PAGES)?;
    let mc = memory::alloc_stack(IST_STACK_PAGES)?;
    Ok(PerCpu::create(index, apic_id, kstack, [df, nmi, mc]))
}

fn write_param(off: u64, v: u64) {
    // SAFETY: the trampoline page is RAM in the low 1 MiB (reserved from the allocator,
    // direct-mapped); only the BSP writes it, while no AP is reading it.
    unsafe { core::ptr::write_volatile(phys_to_virt(TRAMPOLINE_PHYS + off) as *mut u64, v) }
}

fn wait_until(timeout_us: u64, mut done: impl FnMut() -> bool) -> bool {
    let khz = apic::tsc_khz().max(1);
    let start = cpu::rdtsc();
    let limit = timeout_us * khz / 1000;
    while cpu::rdtsc().wrapping_sub(start) < limit {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Start every AP in `apic_ids` (the BSP's id is skipped). Returns how many came online.
pub fn start_aps(apic_ids: &[u32], bsp_apic_id: u32) -> usize {
    // SAFETY: the symbols delimit the trampoline bytes in .rodata.
    let code = unsafe {
        let start = &raw const bulkhead_ap_tramp_start;
        let end = &raw const bulkhead_ap_tramp_end;
        core::slice::from_raw_parts(start, end as usize - start as usize)
    };
    if memory::map_firmware(TRAMPOLINE_PHYS, 0x1000).is_err() {
        log::warn!("cannot map the AP trampoline: running on the boot CPU only");
        return 0;
    }
    // SAFETY: see write_param; the code is under a page long.
    unsafe {
        core::ptr::copy_nonoverlapping(
            code.as_ptr(),
            phys_to_virt(TRAMPOLINE_PHYS) as *mut u8,
            code.len(),
        )
    };
    // The 10 ms wait after INIT is only needed by pre-P6 processors; like Linux, skip it
    // (down to 10 µs) on family 6 and later, which every x86-64 CPU and QEMU model is.
    let family = (cpu::cpuid(1, 0)[0] >> 8) & 0xf;
    let init_delay_us = if family >= 6 { 10 } else { 10_000 };
    let mut started = 0;
    let mut index = 1u32;
    for &apic_id in apic_ids.iter().filter(|&&id| id != bsp_apic_id) {
        let pc = match create_cpu(index, apic_id) {
            Ok(pc) => pc,
            Err(e) => {
                log::warn!("no memory for CPU {index} (APIC id {apic_id}): {e}");
                break;
            }
        };
        write_param(PARAM_BOOT_CR3, memory::boot_pml4_phys());
        write_param(PARAM_CR3, memory::kernel_cr3());
        write_param(PARAM_STACK, pc.kernel_stack_top);
        write_param(PARAM_ENTRY, bulkhead_ap_long_entry as *const () as u64);
        write_param(PARAM_ARG, pc as *const PerCpu as u64);
        let vector = (TRAMPOLINE_PHYS >> 12) as u8;
        apic::send_init(apic_id);
        apic::delay_us(init_delay_us);
        apic::send_startup(apic_id, vector);
        if !wait_until(200, || pc.online.load(Ordering::Acquire)) {
            apic::send_startup(apic_id, vector);
        }
        if wait_until(1_000_000, || pc.online.load(Ordering::Acquire)) {
            started += 1;
            index += 1;
        } else {
            // Park it again (wait-for-SIPI) so it cannot run late on the next AP's
            // parameters and stack.
            apic::send_init(apic_id);
            log::warn!("CPU with APIC id {apic_id} did not come up; continuing without it");
            // Its per-CPU slot stays registered but offline; the index is not reused so a
            // late AP cannot share data with the next one.
            index += 1;
        }
    }
    started
}

/// Wait until every online CPU has taken at least one timer tick; returns how many did.
pub fn wait_for_ticks() -> usize {
    let mut ticking = 0;
    for i in 0..percpu::count() {
        let Some(pc) = percpu::get(i) else { continue };
        if !pc.online.load(Ordering::Acquire) {
            continue;
        }
        if wait_until(1_000_000, || pc.ticks.load(Ordering::Relaxed) > 0) {
            ticking += 1;
        } else {
            log::warn!("cpu{i} takes no timer interrupts");
        }
    }
    ticking
}

/// Number of CPUs online.
pub fn online() -> usize {
    (0..percpu::count())
        .filter_map(percpu::get)
        .filter(|c| c.online.load(Ordering::Acquire))
        .count()
}

/// An AP's first Rust code, on its own stack and the hypervisor's page tables.
extern "C" fn ap_main(pc: &'static PerCpu) -> ! {
    memory::enable_protections();
    // SAFETY: first code on this AP; its GDT/TSS are its own and permanent; the BSP built
    // the IDT before starting any AP.
    unsafe {
        gdt::load(&pc.gdt);
        pc.install();
        idt::load();
    }
    apic::enable_local();
    if apic::id() != pc.apic_id {
        log::warn!("APIC id is {}, MADT said {}", apic::id(), pc.apic_id);
    }
    super::pv::init_cpu();
    apic::start_timer();
    cpu::enable_interrupts();
    pc.online.store(true, Ordering::Release);
    log::debug!("online (APIC id {})", pc.apic_id);
    loop {
        if super::pv::started() {
            super::pv::cpu_loop();
        }
        cpu::halt();
    }
}
