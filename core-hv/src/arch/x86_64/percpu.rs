//! Per-CPU data, reached through the GS base: each CPU's [`PerCpu`] holds its index, APIC id,
//! tick counter, descriptor tables and stack tops. Allocated once per CPU and never freed.
//!
//! Invariant: a CPU sets its GS base to its own `PerCpu` before it runs any code that logs or
//! takes interrupts; the BSP then sets [`GS_READY`], after which every running CPU has one.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use super::MAX_CPUS;
use super::gdt::{Gdt, Tss};

/// Offsets the assembly entry stubs use (`gs:[..]`).
pub const OFF_USER_RSP: usize = core::mem::offset_of!(PerCpu, user_rsp);
pub const OFF_SYSCALL_STACK: usize = core::mem::offset_of!(PerCpu, syscall_stack);

/// Set once the BSP's GS base points at its `PerCpu`.
static GS_READY: AtomicBool = AtomicBool::new(false);
/// Every CPU's `PerCpu`, by index (0 = BSP).
static CPUS: [AtomicPtr<PerCpu>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];
static CPU_COUNT: AtomicUsize = AtomicUsize::new(0);

/// One CPU's private state. `repr(C)`: the first field is read through `gs:0`.
#[repr(C)]
pub struct PerCpu {
    /// Points at this structure (so `gs:0` yields a normal pointer).
    self_ptr: *const PerCpu,
    /// Scratch for the `syscall` entry: the domain's RSP while the stub switches stacks.
    pub user_rsp: AtomicU64,
    /// Where the `syscall` entry puts its frame (= the TSS's RSP0, the kernel stack top).
    pub syscall_stack: u64,
    pub index: u32,
    pub apic_id: u32,
    /// Local APIC timer interrupts taken.
    pub ticks: AtomicU64,
    /// Set by the CPU itself once it runs on its own tables with interrupts on.
    pub online: AtomicBool,
    pub kernel_stack_top: u64,
    pub gdt: Gdt,
    pub tss: Tss,
}

// SAFETY: `self_ptr` only ever points at the structure itself; the rest is atomics or data
// written before the structure is shared.
unsafe impl Sync for PerCpu {}
// SAFETY: as above; the structure is never moved after registration.
unsafe impl Send for PerCpu {}

impl PerCpu {
    /// A new structure for CPU `index`, leaked (per-CPU data lives for ever), registered.
    /// `stack_tops` are the kernel stack and the IST stacks for #DF, NMI and #MC.
    pub fn create(
        index: u32,
        apic_id: u32,
        kernel_stack_top: u64,
        ist: [u64; 3],
    ) -> &'static PerCpu {
        let b = alloc::boxed::Box::new(PerCpu {
            self_ptr: core::ptr::null(),
            user_rsp: AtomicU64::new(0),
            syscall_stack: kernel_stack_top,
            index,
            apic_id,
            ticks: AtomicU64::new(0),
            online: AtomicBool::new(false),
            kernel_stack_top,
            gdt: Gdt::new(),
            tss: Tss::new(kernel_stack_top, ist),
        });
        let p: &'static mut PerCpu = alloc::boxed::Box::leak(b);
        p.self_ptr = p;
        p.gdt.set_tss(&p.tss);
        let r: &'static PerCpu = p;
        if let Some(slot) = CPUS.get(index as usize) {
            slot.store(r as *const PerCpu as *mut PerCpu, Ordering::Release);
            CPU_COUNT.fetch_max(index as usize + 1, Ordering::AcqRel);
        }
        r
    }

    /// Make this the current CPU's structure (GS base).
    ///
    /// # Safety
    /// Must be called on the CPU this structure was created for, once, after its GDT is loaded
    /// (loading GS clears the base).
    pub unsafe fn install(&'static self) {
        // SAFETY: IA32_GS_BASE exists on every x86-64 CPU; the pointer is 'static.
        unsafe { super::cpu::wrmsr(x86::msr::IA32_GS_BASE, self as *const PerCpu as u64) };
        if self.index == 0 {
            GS_READY.store(true, Ordering::Release);
        }
    }
}

/// The current CPU's structure, if GS is set up.
pub fn current() -> Option<&'static PerCpu> {
    if !GS_READY.load(Ordering::Acquire) {
        return None;
    }
    let p: *const PerCpu;
    // SAFETY: once GS_READY is set, every CPU running code has its GS base at its PerCpu,
    // whose first field points at itself.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags))
    };
    // SAFETY: the pointer is a leaked, never-freed PerCpu.
    Some(unsafe { &*p })
}

/// The current CPU's index (0 before per-CPU data exists).
pub fn current_index() -> u32 {
    current().map_or(0, |c| c.index)
}

/// CPU `index`'s structure, if registered.
pub fn get(index: usize) -> Option<&'static PerCpu> {
    let p = CPUS.get(index)?.load(Ordering::Acquire);
    // SAFETY: registered pointers are leaked, never-freed PerCpus.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Number of CPUs registered.
pub fn count() -> usize {
    CPU_COUNT.load(Ordering::Acquire)
}
