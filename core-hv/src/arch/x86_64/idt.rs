//! The IDT (one, shared by every CPU), the entry stubs for exceptions, interrupts and
//! `syscall`, the return paths to ring 0/3, and the fatal exception report.
//!
//! Every entry saves all general registers in one frame shape ([`ExceptionFrame`]) and calls
//! `pv::trap_entry`: an exception from ring 3 stops only the domain that took it; an
//! exception in ring 0 is a hypervisor bug and fatal: [`exception_report`] prints vector and
//! name, error code, RIP, RSP, RFLAGS, CS, SS, CR2, CR3, every general register and the CPU,
//! then powers off with `EXIT_FAILURE`. #DF, NMI and #MC run on their own IST stacks (so a kernel stack overflow,
//! which cannot push a #PF frame, still gets reported through #DF).
//!
//! Invariant: the table is written only by the BSP, before any AP loads it.

use core::arch::{asm, global_asm};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use shared_abi::console::EXIT_FAILURE;

use super::gdt::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI, KERNEL_CS};
use super::{console, cpu, percpu};

/// Local APIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Inter-processor "reschedule" interrupt.
pub const KICK_VECTOR: u8 = 0x21;
/// Inter-processor "TLB shootdown" interrupt (`pv::mmu`).
pub const TLB_VECTOR: u8 = 0x22;
/// The frame vector the `syscall` entry records (not an IDT vector).
pub const SYSCALL_VECTOR: u64 = 0x100;
const _: () = assert!(
    crate::irq::FIRST_VECTOR as usize > TLB_VECTOR as usize
        && crate::irq::FIRST_VECTOR as usize + crate::irq::NR_VECTORS <= 0x80,
    "device stubs push their vector as a sign-extended byte"
);
/// Local APIC spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Registers saved by the exception stub, lowest address first.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl ExceptionFrame {
    /// All registers zero.
    pub fn zeroed() -> Self {
        Self::default()
    }
}

// Entry stubs. Vectors with a CPU-pushed error code: 8, 10-14, 17, 21, 29, 30; the others push
// a zero so the frame has one shape.
global_asm!(
    r#"
    .section .text.exceptions, "ax"
    .macro EXC_STUB vec, has_err
    bulkhead_exc_stub_\vec:
    .if \has_err == 0
        push 0
    .endif
        push \vec
        jmp bulkhead_exc_common
    .endm

    EXC_STUB 0, 0
    EXC_STUB 1, 0
    EXC_STUB 2, 0
    EXC_STUB 3, 0
    EXC_STUB 4, 0
    EXC_STUB 5, 0
    EXC_STUB 6, 0
    EXC_STUB 7, 0
    EXC_STUB 8, 1
    EXC_STUB 9, 0
    EXC_STUB 10, 1
    EXC_STUB 11, 1
    EXC_STUB 12, 1
    EXC_STUB 13, 1
    EXC_STUB 14, 1
    EXC_STUB 15, 0
    EXC_STUB 16, 0
    EXC_STUB 17, 1
    EXC_STUB 18, 0
    EXC_STUB 19, 0
    EXC_STUB 20, 0
    EXC_STUB 21, 1
    EXC_STUB 22, 0
    EXC_STUB 23, 0
    EXC_STUB 24, 0
    EXC_STUB 25, 0
    EXC_STUB 26, 0
    EXC_STUB 27, 0
    EXC_STUB 28, 0
    EXC_STUB 29, 1
    EXC_STUB 30, 1
    EXC_STUB 31, 0

    // Every exception and interrupt: one frame shape ([`ExceptionFrame`]). From ring 3 the
    // GS base is the domain's, so swap in the per-CPU one first (and back on the way out).
    // The CPU aligned RSP to 16 before pushing; 22 words keep it aligned for the call.
    .global bulkhead_exc_common
    bulkhead_exc_common:
        test qword ptr [rsp + 24], 3
        jz 1f
        swapgs
    1:
        push rax
        push rbx
        push rcx
        push rdx
        push rsi
        push rdi
        push rbp
        push r8
        push r9
        push r10
        push r11
        push r12
        push r13
        push r14
        push r15
        cld
        mov rdi, rsp
        call {dispatch}
        test eax, eax
        jnz bulkhead_sysret_path

    // Return to whatever the frame at RSP describes (ring 0 or 3) with iretq.
    .global bulkhead_iret_path
    bulkhead_iret_path:
        pop r15
        pop r14
        pop r13
        pop r12
        pop r11
        pop r10
        pop r9
        pop r8
        pop rbp
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        add rsp, 16
        test qword ptr [rsp + 8], 3
        jz 2f
        swapgs
    2:
        iretq

    // Return to ring 3 with sysretq. Only taken when the dispatcher checked that RCX = RIP
    // (canonical, lower half) and R11 = RFLAGS (sanitised), so sysret loads exactly the frame.
    bulkhead_sysret_path:
        pop r15
        pop r14
        pop r13
        pop r12
        pop r11
        pop r10
        pop r9
        pop r8
        pop rbp
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        mov rsp, [rsp + 40]
        swapgs
        sysretq

    // The `syscall` entry (LSTAR). IF, DF, TF, AC are masked by SFMASK. Build the same frame
    // an interrupt from ring 3 would leave on the per-CPU kernel stack, vector 0x100.
    .global bulkhead_syscall_entry
    bulkhead_syscall_entry:
        swapgs
        mov gs:[{off_user_rsp}], rsp
        mov rsp, gs:[{off_stack}]
        push {user_ds}
        push qword ptr gs:[{off_user_rsp}]
        push r11
        push {user_cs}
        push rcx
        push 0
        push {syscall_vector}
        push rax
        push rbx
        push rcx
        push rdx
        push rsi
        push rdi
        push rbp
        push r8
        push r9
        push r10
        push r11
        push r12
        push r13
        push r14
        push r15
        cld
        mov rdi, rsp
        call {dispatch}
        test eax, eax
        jnz bulkhead_sysret_path
        jmp bulkhead_iret_path

    // Timer, kick and TLB-shootdown interrupts take the common path.
    .global bulkhead_timer_stub
    bulkhead_timer_stub:
        push 0
        push {timer_vector}
        jmp bulkhead_exc_common

    .global bulkhead_kick_stub
    bulkhead_kick_stub:
        push 0
        push {kick_vector}
        jmp bulkhead_exc_common

    .global bulkhead_tlb_stub
    bulkhead_tlb_stub:
        push 0
        push {tlb_vector}
        jmp bulkhead_exc_common

    // Spurious APIC interrupts need no EOI.
    .global bulkhead_spurious_stub
    bulkhead_spurious_stub:
        iretq

    // Device interrupts (`crate::irq` vectors): one 16-byte stub per vector, in order, so
    // the IDT can point at `bulkhead_device_stubs + 16 * i`. Each stub is 9 bytes.
    .p2align 4
    .global bulkhead_device_stubs
    bulkhead_device_stubs:
    .irp n, 48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65,66,67,68,69,70,71,72,73,74,75,76,77,78,79,80,81,82,83,84,85,86,87,88,89,90,91,92,93,94,95,96,97,98,99,100,101,102,103,104,105,106,107,108,109,110,111
        .p2align 4
        push 0
        push \n
        jmp bulkhead_exc_common
    .endr

    .section .rodata.exceptions, "a"
    .p2align 3
    .global bulkhead_exc_stub_table
    bulkhead_exc_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad bulkhead_exc_stub_\n
    .endr
    "#,
    dispatch = sym super::pv::trap_entry,
    off_user_rsp = const super::percpu::OFF_USER_RSP,
    off_stack = const super::percpu::OFF_SYSCALL_STACK,
    user_ds = const super::gdt::USER_DS as u64,
    user_cs = const super::gdt::USER_CS as u64,
    syscall_vector = const SYSCALL_VECTOR,
    timer_vector = const TIMER_VECTOR as u64,
    kick_vector = const KICK_VECTOR as u64,
    tlb_vector = const TLB_VECTOR as u64,
);

unsafe extern "C" {
    static bulkhead_exc_stub_table: [u64; 32];
    fn bulkhead_timer_stub();
    fn bulkhead_kick_stub();
    fn bulkhead_tlb_stub();
    fn bulkhead_spurious_stub();
    static bulkhead_device_stubs: u8;
    /// The `syscall` entry point (for LSTAR).
    pub fn bulkhead_syscall_entry();
    /// Return to the frame RSP points at.
    pub fn bulkhead_iret_path();
}

/// 256 gates of 16 bytes.
#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

static mut IDT: Idt = Idt([[0; 2]; 256]);

fn gate(handler: u64, ist: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | ((KERNEL_CS as u64) << 16)
        | ((ist as u64 & 7) << 32)
        | (0x8eu64 << 40) // present, DPL 0, 64-bit interrupt gate
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

fn ist_for(vector: usize) -> u8 {
    match vector {
        2 => IST_NMI,
        8 => IST_DOUBLE_FAULT,
        18 => IST_MACHINE_CHECK,
        _ => 0,
    }
}

/// Fill the IDT and load it on the BSP. `with_ist` selects IST stacks for #DF/NMI/#MC, which
/// needs a loaded TSS: the first call (before per-CPU data) passes `false`.
///
/// # Safety
/// BSP only, before any AP runs [`load`]; with `with_ist`, this CPU's TSS must be loaded.
pub unsafe fn init(with_ist: bool) {
    // SAFETY: the BSP is the only CPU running (caller), so nothing reads the IDT while it is
    // written; the stub table is a linked array of 32 addresses.
    unsafe {
        let idt: *mut Idt = &raw mut IDT;
        let stubs: *const [u64; 32] = &raw const bulkhead_exc_stub_table;
        for v in 0..32 {
            (*idt).0[v] = gate((*stubs)[v], if with_ist { ist_for(v) } else { 0 });
        }
        (*idt).0[TIMER_VECTOR as usize] = gate(bulkhead_timer_stub as *const () as u64, 0);
        (*idt).0[KICK_VECTOR as usize] = gate(bulkhead_kick_stub as *const () as u64, 0);
        (*idt).0[TLB_VECTOR as usize] = gate(bulkhead_tlb_stub as *const () as u64, 0);
        (*idt).0[SPURIOUS_VECTOR as usize] = gate(bulkhead_spurious_stub as *const () as u64, 0);
        let device_stubs = &raw const bulkhead_device_stubs as u64;
        for i in 0..crate::irq::NR_VECTORS {
            let v = crate::irq::FIRST_VECTOR as usize + i;
            (*idt).0[v] = gate(device_stubs + 16 * i as u64, 0);
        }
        load();
    }
}

/// Load the IDT on this CPU.
///
/// # Safety
/// The BSP must have run [`init`] with IST enabled, and this CPU's TSS must be loaded.
pub unsafe fn load() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let p = Pointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: &raw const IDT as u64,
    };
    // SAFETY: the IDT is a static with valid gates (caller).
    unsafe { asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags)) };
}

/// Timer interrupt bookkeeping: count the tick on this CPU, acknowledge.
pub fn count_tick_and_eoi() {
    if let Some(c) = percpu::current() {
        c.ticks.fetch_add(1, Ordering::Relaxed);
    }
    super::apic::eoi();
}

/// The name of exception `vector`.
pub fn vector_name(vector: u64) -> &'static str {
    NAMES.get(vector as usize).copied().unwrap_or("unknown")
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range exceeded",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack-segment fault",
    "#GP general protection",
    "#PF page fault",
    "reserved (15)",
    "#MF x87 floating-point",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating-point",
    "#VE virtualization",
    "#CP control protection",
    "reserved (22)",
    "reserved (23)",
    "reserved (24)",
    "reserved (25)",
    "reserved (26)",
    "reserved (27)",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved (31)",
];

/// Set by the first CPU to report; any later or nested fault just powers off.
static REPORTING: AtomicBool = AtomicBool::new(false);

/// The fatal exception report; never returns.
pub fn exception_report(f: &ExceptionFrame) -> ! {
    if REPORTING.swap(true, Ordering::AcqRel) {
        // A fault while reporting, or a second CPU: the first report is what matters.
        cpu::debug_exit(EXIT_FAILURE);
    }
    let cpu_ix = percpu::current_index();
    let name = NAMES.get(f.vector as usize).copied().unwrap_or("unknown");
    let (cr2, cr3) = (cpu::cr2(), cpu::cr3());
    console::fatal_lines(|w| {
        let p = |w: &mut dyn Write, args: core::fmt::Arguments<'_>| {
            let _ = writeln!(w, "[cpu{cpu_ix} FATAL] {args}");
        };
        p(
            w,
            format_args!(
                "EXCEPTION vector {} ({name}) on cpu{cpu_ix}, error code {:#x}",
                f.vector, f.error_code
            ),
        );
        p(
            w,
            format_args!(
                "  RIP {:#018x}  CS {:#06x}  RFLAGS {:#010x}",
                f.rip, f.cs, f.rflags
            ),
        );
        p(w, format_args!("  RSP {:#018x}  SS {:#06x}", f.rsp, f.ss));
        p(w, format_args!("  CR2 {cr2:#018x}  CR3 {cr3:#018x}"));
        p(
            w,
            format_args!(
                "  RAX {:#018x}  RBX {:#018x}  RCX {:#018x}  RDX {:#018x}",
                f.rax, f.rbx, f.rcx, f.rdx
            ),
        );
        p(
            w,
            format_args!(
                "  RSI {:#018x}  RDI {:#018x}  RBP {:#018x}  R8  {:#018x}",
                f.rsi, f.rdi, f.rbp, f.r8
            ),
        );
        p(
            w,
            format_args!(
                "  R9  {:#018x}  R10 {:#018x}  R11 {:#018x}  R12 {:#018x}",
                f.r9, f.r10, f.r11, f.r12
            ),
        );
        p(
            w,
            format_args!(
                "  R13 {:#018x}  R14 {:#018x}  R15 {:#018x}",
                f.r13, f.r14, f.r15
            ),
        );
        let _ = writeln!(w, "bulkhead: fatal exception on cpu{cpu_ix}, stopping");
    });
    cpu::debug_exit(EXIT_FAILURE)
}
