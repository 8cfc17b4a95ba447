//! The PVH entry and the boot CPU's boot sequence.
//!
//! QEMU (or any PVH loader) enters `pvh_start32` in 32-bit protected mode with paging off and
//! `%ebx` = physical address of `hvm_start_info`. The stub reads the TSC first (for
//! `boot_to_ready_ms`), zeroes .bss, builds boot page tables (identity and direct map of
//! 0..4 GiB, image at [`KERNEL_VMA`](super::KERNEL_VMA)), enters long mode and calls
//! [`bsp_entry`] on the boot stack.
//!
//! The boot sequence then: early IDT and console → copy and check the start info →
//! command line → frame allocator → own page tables → heap → boot image check (refusal powers
//! off) → per-CPU data, GDT/TSS/IST, own stack → APIC, TSC and timer calibration, tick →
//! ACPI MADT and the APs → ready line → `test_fault` / `exit_when_done` / idle.

use core::arch::{asm, global_asm};
use core::fmt;

use alloc::boxed::Box;
use heapless::Vec;
use log::{LevelFilter, info, warn};
use shared_abi::console::{EXIT_FAILURE, EXIT_SUCCESS, MetricLine, ReadyLine};

use super::memory::{self, BootPhysMemory};
use super::percpu::PerCpu;
use super::{apic, console, cpu, gdt, idt, smp};
use crate::boot::cmdline::{self, Options, TestFault};
use crate::boot::image::{self, Refusal};
use crate::boot::start_info::BootInfo;
use crate::mm::PhysRange;

global_asm!(
    r#"
    .set BULKHEAD_KVMA, 0xffffffff80000000

    .section .note.Xen, "a", @note
    .p2align 2
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .p2align 2
    .quad pvh_start32 - BULKHEAD_KVMA

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
    pvh_start32:
        rdtsc
        movl %eax, (bulkhead_boot_tsc - BULKHEAD_KVMA)
        movl %edx, (bulkhead_boot_tsc - BULKHEAD_KVMA + 4)
        cli
        cld
        movl %ebx, %ebp

        movl $(__bss_start - BULKHEAD_KVMA), %edi
        movl $(__bss_end - BULKHEAD_KVMA), %ecx
        subl %edi, %ecx
        shrl $2, %ecx
        xorl %eax, %eax
        rep stosl

        movl $(bulkhead_boot_stack_top - BULKHEAD_KVMA), %esp

        movl $(bulkhead_boot_pdpt_lo - BULKHEAD_KVMA + 3), %eax
        movl %eax, (bulkhead_boot_pml4 - BULKHEAD_KVMA)
        movl %eax, (bulkhead_boot_pml4 - BULKHEAD_KVMA + 262 * 8)
        movl $(bulkhead_boot_pdpt_hi - BULKHEAD_KVMA + 3), %eax
        movl %eax, (bulkhead_boot_pml4 - BULKHEAD_KVMA + 511 * 8)

        movl $(bulkhead_boot_pd - BULKHEAD_KVMA + 3), %eax
        movl $(bulkhead_boot_pdpt_lo - BULKHEAD_KVMA), %edi
        movl $4, %ecx
    1:  movl %eax, (%edi)
        addl $0x1000, %eax
        addl $8, %edi
        loop 1b

        movl $(bulkhead_boot_pd - BULKHEAD_KVMA + 3), %eax
        movl %eax, (bulkhead_boot_pdpt_hi - BULKHEAD_KVMA + 510 * 8)

        movl $(bulkhead_boot_pd - BULKHEAD_KVMA), %edi
        movl $0x83, %eax
        movl $2048, %ecx
    2:  movl %eax, (%edi)
        addl $0x200000, %eax
        addl $8, %edi
        loop 2b

        movl %cr4, %eax
        orl $0x20, %eax
        movl %eax, %cr4
        movl $(bulkhead_boot_pml4 - BULKHEAD_KVMA), %eax
        movl %eax, %cr3
        movl $0xc0000080, %ecx
        rdmsr
        orl $0x900, %eax
        wrmsr
        movl %cr0, %eax
        orl $0x80010001, %eax
        movl %eax, %cr0
        lgdt (bulkhead_boot_gdt_ptr32 - BULKHEAD_KVMA)
        ljmp $0x08, $(bulkhead_boot_long - BULKHEAD_KVMA)

    .code64
    bulkhead_boot_long:
        movabsq $bulkhead_boot_high, %rax
        jmp *%rax
    bulkhead_boot_high:
        lgdt bulkhead_boot_gdt_ptr64(%rip)
        movl $0x10, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        xorl %eax, %eax
        movl %eax, %fs
        movl %eax, %gs
        movabsq $bulkhead_boot_stack_top, %rsp
        movl %ebp, %edi
        xorl %ebp, %ebp
        call {entry}
        ud2

    .section .rodata.boot, "a"
    .p2align 4
    bulkhead_boot_gdt:
        .quad 0
        .quad 0x00af9b000000ffff
        .quad 0x00cf93000000ffff
    bulkhead_boot_gdt_ptr32:
        .word 23
        .long bulkhead_boot_gdt - BULKHEAD_KVMA
    bulkhead_boot_gdt_ptr64:
        .word 23
        .quad bulkhead_boot_gdt

    .section .data.boot, "aw"
    .p2align 3
    .global bulkhead_boot_tsc
    bulkhead_boot_tsc:
        .quad 0

    .section .bss.boot, "aw", @nobits
    .p2align 12
    .global bulkhead_boot_pml4
    bulkhead_boot_pml4:
        .skip 4096
    bulkhead_boot_pdpt_lo:
        .skip 4096
    bulkhead_boot_pdpt_hi:
        .skip 4096
    bulkhead_boot_pd:
        .skip 4 * 4096
    .global bulkhead_boot_stack_guard
    bulkhead_boot_stack_guard:
        .skip 4096
        .skip 65536
    bulkhead_boot_stack_top:
    "#,
    entry = sym bsp_entry,
    options(att_syntax)
);

unsafe extern "C" {
    static bulkhead_boot_tsc: u64;
}

/// Print `bulkhead: fatal: <message>` and power off with failure.
pub fn fatal(args: fmt::Arguments<'_>) -> ! {
    console::fatal_lines(|w| {
        let _ = writeln!(w, "bulkhead: fatal: {args}");
    });
    cpu::debug_exit(EXIT_FAILURE)
}

fn on(b: bool) -> &'static str {
    if b { "on" } else { "off (not supported)" }
}

/// What the boot CPU carries across its switch to its own stack.
struct BspContext {
    info: BootInfo,
    options: Options,
    boot_tsc: u64,
    boot_domains: u32,
    bsp_apic_id: u32,
    /// The boot image (validated by `check_boot_module`): physical address and size.
    module: (u64, u64),
}

/// First Rust code on the boot CPU (boot stack, boot page tables).
extern "C" fn bsp_entry(start_info_paddr: u32) -> ! {
    // SAFETY: single CPU, before anything else: an IDT without IST (no TSS yet) so early
    // faults are reported rather than triple-faulting.
    unsafe { idt::init(false) };
    console::init(LevelFilter::Info);
    // SAFETY: written once by the stub before .bss/paging; read-only afterwards.
    let boot_tsc = unsafe { core::ptr::read_volatile(&raw const bulkhead_boot_tsc) };

    let info = match BootInfo::read(&BootPhysMemory, start_info_paddr as u64) {
        Ok(i) => i,
        Err(e) => fatal(format_args!("PVH start info refused: {e}")),
    };
    let parsed = cmdline::parse(&info.cmdline);
    if let Some(level) = parsed.options.log_level {
        console::set_level(level);
    }
    info!(
        "bulkhead core-hv {}: PVH start info at {:#x}, command line {:?}",
        env!("CARGO_PKG_VERSION"),
        start_info_paddr,
        info.cmdline.as_str()
    );
    if super::serial::com2::probe() {
        info!("management line: COM2 (domctl MGMT_IO for the control domain)");
    }
    for w in &parsed.warnings {
        warn!("{w}");
    }
    if parsed.dropped_warnings > 0 {
        warn!("{} more command-line warnings", parsed.dropped_warnings);
    }
    let options = parsed.options;
    drop(parsed);

    // Memory: keep the boot structures and every module out of the allocator.
    let mut reserved: Vec<PhysRange, 16> = Vec::new();
    let si = &info.start_info;
    for r in [
        PhysRange::with_len(start_info_paddr as u64, 56),
        PhysRange::with_len(si.memmap_paddr, si.memmap_entries as u64 * 24),
        PhysRange::with_len(si.modlist_paddr, si.nr_modules as u64 * 32),
        PhysRange::with_len(si.cmdline_paddr, info.cmdline.len() as u64 + 1),
    ]
    .into_iter()
    .flatten()
    .chain(
        info.modules
            .iter()
            .filter_map(|m| PhysRange::with_len(m.paddr, m.size)),
    ) {
        let _ = reserved.push(r);
    }
    if let Err(e) = memory::init_frames(&info.memmap, &reserved) {
        fatal(format_args!("memory map refused: {e}"));
    }
    if let Err(e) = memory::init_paging(&info.memmap) {
        fatal(format_args!("cannot build page tables: {e}"));
    }
    if let Err(e) = memory::check_layout() {
        fatal(format_args!("page-table layout check failed: {e}"));
    }
    let f = cpu::features();
    info!(
        "paging: own tables loaded; NX {}, WP on, SMEP {}, SMAP {}, global pages {}",
        on(f.nx),
        on(f.smep),
        on(f.smap),
        on(f.global_pages)
    );
    let usable = memory::usable_ranges();
    info!(
        "memory: {} MiB free in {} ranges; image at {:#x}..{:#x}",
        memory::free_bytes() >> 20,
        usable.len(),
        memory::image_range().start,
        memory::image_range().end
    );
    for r in &usable {
        log::debug!("  usable {:#012x}..{:#012x}", r.start, r.end);
    }

    // The boot image: hostile input, checked before anything else is built.
    let boot_domains = check_boot_module(&info);

    // Per-CPU data for the BSP: GDT, TSS with IST stacks, GS, IDT with IST.
    if let Err(e) = apic::init_bsp() {
        fatal(format_args!("cannot map the local APIC: {e}"));
    }
    let bsp_apic_id = apic::id();
    let pc: &'static PerCpu = match smp::create_cpu(0, bsp_apic_id) {
        Ok(pc) => pc,
        Err(e) => fatal(format_args!("no memory for the boot CPU's stacks: {e}")),
    };
    let guard = pc.kernel_stack_top - (smp::KERNEL_STACK_PAGES + 1) * crate::mm::FRAME_SIZE;
    if memory::is_mapped(guard) || !memory::is_mapped(guard + crate::mm::FRAME_SIZE) {
        fatal(format_args!(
            "kernel stack guard at {guard:#x} is not in place"
        ));
    }
    // SAFETY: BSP, once; the GDT and TSS are permanent; GS is set after the GDT load clears
    // it; the IDT is rewritten before any AP exists.
    unsafe {
        gdt::load(&pc.gdt);
        pc.install();
        idt::init(true);
    }
    let module = info.modules.first().map_or((0, 0), |m| (m.paddr, m.size));
    let ctx = Box::leak(Box::new(BspContext {
        info,
        options,
        boot_tsc,
        boot_domains,
        bsp_apic_id,
        module,
    }));
    // SAFETY: the new stack is mapped, unused, with a guard below; `bsp_main` never returns,
    // so nothing on the boot stack is used again.
    unsafe {
        asm!(
            "mov rsp, {top}",
            "xor ebp, ebp",
            "call {main}",
            "ud2",
            top = in(reg) pc.kernel_stack_top,
            main = sym bsp_main,
            in("rdi") ctx as *const BspContext,
            options(noreturn)
        )
    }
}

/// Parse the boot module; on refusal print the one refusal line and power off.
fn check_boot_module(info: &BootInfo) -> u32 {
    let refuse = |r: Refusal| -> ! {
        crate::raw_println!("{r}");
        cpu::debug_exit(EXIT_FAILURE)
    };
    let Some(m) = info.modules.first() else {
        refuse(Refusal::NoModule)
    };
    if info.modules.len() > 1 {
        warn!(
            "{} boot modules given; only the first is used",
            info.modules.len()
        );
    }
    if !memory::is_direct_mapped_ram(&info.memmap, m.paddr, m.size) {
        refuse(Refusal::ModuleNotInRam {
            paddr: m.paddr,
            size: m.size,
        });
    }
    // SAFETY: the module lies in RAM (checked just above), which the direct map covers; it
    // was reserved from the frame allocator, so nothing else writes it.
    let bytes = unsafe {
        core::slice::from_raw_parts(super::phys_to_virt(m.paddr) as *const u8, m.size as usize)
    };
    match image::check(bytes) {
        Ok(domains) => {
            info!(
                "boot image: {} bytes at {:#x}, {} boot domains",
                m.size,
                m.paddr,
                domains.len()
            );
            for d in &domains {
                info!(
                    "  boot domain {:?}: {} KiB, {} vCPUs",
                    d.name, d.memory_kib, d.vcpus
                );
            }
            domains.len() as u32
        }
        Err(r) => refuse(r),
    }
}

/// The rest of the boot, on the BSP's own stack.
extern "C" fn bsp_main(ctx: &'static BspContext) -> ! {
    apic::enable_local();
    let cal = match apic::calibrate() {
        Ok(c) => c,
        Err(apic::NoPit) => fatal(format_args!(
            "no working PIT channel 2 (port 0x61): cannot calibrate the TSC and APIC timer"
        )),
    };
    info!(
        "TSC {}.{:03} MHz; APIC timer {} counts per {} Hz tick",
        cal.tsc_khz / 1000,
        cal.tsc_khz % 1000,
        cal.timer_count,
        apic::TICK_HZ
    );
    apic::start_timer();
    cpu::enable_interrupts();
    if let Some(pc) = super::percpu::current() {
        pc.online.store(true, core::sync::atomic::Ordering::Release);
    }

    let ids = smp::find_cpus(ctx.info.rsdp_paddr, ctx.bsp_apic_id);
    info!(
        "ACPI MADT: {} CPUs (APIC ids {:?})",
        ids.len(),
        ids.as_slice()
    );
    let started = smp::start_aps(&ids, ctx.bsp_apic_id);
    let ticking = smp::wait_for_ticks();
    let cpus = smp::online();
    info!(
        "{} APs started; {cpus} CPUs online, {ticking} taking timer ticks",
        started
    );
    super::pci::init(ctx.info.rsdp_paddr);
    super::iommu::init(ctx.info.rsdp_paddr);

    let now = cpu::rdtsc();
    let us = now.wrapping_sub(ctx.boot_tsc) * 1000 / apic::tsc_khz().max(1);
    crate::raw_println!(
        "{}",
        MetricLine {
            name: "boot_to_ready_ms",
            value: us as f64 / 1000.0,
            unit: "ms",
        }
    );
    crate::raw_println!(
        "{}",
        ReadyLine {
            cpus: cpus as u32,
            free_mib: memory::free_bytes() >> 20,
            boot_domains: ctx.boot_domains,
        }
    );

    if let Some(f) = ctx.options.test_fault {
        warn!("test_fault: raising {f:?} on purpose");
        raise(f);
    }
    if ctx.options.exit_when_done && ctx.boot_domains == 0 {
        info!("exit_when_done: no boot domains, powering off");
        cpu::debug_exit(EXIT_SUCCESS);
    }
    let fpu = super::pv::init_cpu();
    info!("PV domains: syscall entry on, FPU state switched eagerly with {fpu}");
    // SAFETY: `check_boot_module` checked that the module lies in direct-mapped RAM; it is
    // reserved from the frame allocator and nothing writes it.
    let module = unsafe {
        core::slice::from_raw_parts(
            super::phys_to_virt(ctx.module.0) as *const u8,
            ctx.module.1 as usize,
        )
    };
    let built = super::pv::boot_domains(module, super::percpu::count(), ctx.options.exit_when_done);
    info!("{built} of {} boot domains built", ctx.boot_domains);
    super::pv::cpu_loop()
}

/// Raise the requested exception on this CPU.
fn raise(f: TestFault) {
    match f {
        // SAFETY: ud2 faults before it has any effect; the report powers off.
        TestFault::InvalidOpcode => unsafe { asm!("ud2") },
        // SAFETY: the read faults (nothing is mapped in the lower half); the report powers off.
        TestFault::PageFault => unsafe {
            asm!("mov {0}, [{0}]", inout(reg) 0x0000_0dea_dbee_f000u64 => _)
        },
        // SAFETY: a non-canonical address faults before any access; the report powers off.
        TestFault::GeneralProtection => unsafe {
            asm!("mov {0}, [{0}]", inout(reg) 0x8000_0000_0000_0000u64 => _)
        },
        // SAFETY: division by zero faults before writing anything; the report powers off.
        TestFault::DivideError => unsafe {
            asm!("div {0:e}", in(reg) 0u32, inout("eax") 1u32 => _, inout("edx") 0u32 => _)
        },
        TestFault::StackOverflow => {
            let depth = recurse(core::hint::black_box(1));
            warn!("stack did not overflow at depth {depth}");
        }
    }
}

/// Uses 4 KiB of stack per level until the guard page stops it.
#[inline(never)]
fn recurse(n: u64) -> u64 {
    let mut buf = [0u8; 4096];
    buf[(n % 4096) as usize] = n as u8;
    let buf = core::hint::black_box(buf);
    if n > 1_000_000 {
        return n;
    }
    recurse(n + 1) + buf[0] as u64
}
