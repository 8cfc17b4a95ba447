//! Per-CPU GDT and TSS.
//!
//! The selector order is fixed by `syscall`/`sysret` (STAR): kernel code, kernel data, then
//! 32-bit user code, user data, 64-bit user code, so that `sysret` finds user SS at
//! STAR[63:48] + 8 and 64-bit user CS at STAR[63:48] + 16. The TSS (one per CPU, each with its
//! own IST stacks for #DF, NMI and #MC) follows.

use core::arch::asm;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_CS32: u16 = 0x18 | 3;
pub const USER_DS: u16 = 0x20 | 3;
pub const USER_CS: u16 = 0x28 | 3;
pub const TSS_SEL: u16 = 0x30;

/// STAR: `syscall` loads CS = 0x08, SS = 0x10; `sysretq` loads CS = 0x18 + 16 = 0x28 | 3 and
/// SS = 0x18 + 8 = 0x20 | 3.
pub const STAR: u64 = ((0x18u64 | 3) << 48) | ((KERNEL_CS as u64) << 32);

/// IST slots (1-based as the IDT encodes them).
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;

/// 64-bit TSS.
#[repr(C, packed(4))]
pub struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}
shared_abi::assert_layout!(Tss, 104);

impl Tss {
    pub fn new(kernel_stack_top: u64, ist: [u64; 3]) -> Tss {
        Tss {
            _reserved0: 0,
            rsp: [kernel_stack_top, 0, 0],
            _reserved1: 0,
            ist: [ist[0], ist[1], ist[2], 0, 0, 0, 0],
            _reserved2: 0,
            _reserved3: 0,
            // Past the limit: no I/O bitmap, so ring 3 has no port access.
            iomap_base: core::mem::size_of::<Tss>() as u16,
        }
    }
}

/// The GDT entries in selector order (accessed bits preset: the CPU never writes them).
#[repr(C, align(16))]
pub struct Gdt([u64; 8]);

impl Gdt {
    pub fn new() -> Gdt {
        Gdt([
            0,
            0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
            0x00cf_9300_0000_ffff, // 0x10 kernel data
            0x00cf_fb00_0000_ffff, // 0x18 user code, 32-bit (compat; sysret base)
            0x00cf_f300_0000_ffff, // 0x20 user data
            0x00af_fb00_0000_ffff, // 0x28 user code, 64-bit
            0,                     // 0x30 TSS (low)
            0,                     // 0x38 TSS (high)
        ])
    }

    /// Point the TSS descriptor at `tss` (available 64-bit TSS, DPL 0).
    pub fn set_tss(&mut self, tss: &Tss) {
        let base = tss as *const Tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        self.0[6] = low;
        self.0[7] = base >> 32;
    }
}

impl Default for Gdt {
    fn default() -> Self {
        Gdt::new()
    }
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Load `gdt`, reload every segment register and the task register, and program STAR.
///
/// # Safety
/// `gdt` must live for ever, contain a TSS descriptor for a live TSS, and this must run once
/// per CPU (a second `ltr` of a busy TSS faults). GS base is cleared: set it afterwards.
pub unsafe fn load(gdt: &'static Gdt) {
    let ptr = Pointer {
        limit: (core::mem::size_of::<Gdt>() - 1) as u16,
        base: gdt as *const Gdt as u64,
    };
    // SAFETY: the GDT is valid and permanent (caller); the far return reloads CS with the
    // kernel code selector it describes; the data selectors are valid; ltr marks the TSS busy.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, {ds}",
            "mov ss, {tmp:e}",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:e}",
            "mov gs, {tmp:e}",
            "mov {tmp:e}, {tss}",
            "ltr {tmp:x}",
            ptr = in(reg) &ptr,
            cs = const KERNEL_CS as u64,
            ds = const KERNEL_DS as u32,
            tss = const TSS_SEL as u32,
            tmp = out(reg) _,
        );
        // syscall is not enabled yet (EFER.SCE stays clear); STAR is laid out for the PV
        // domains of the next stage.
        super::cpu::wrmsr(x86::msr::IA32_STAR, STAR);
    }
}
