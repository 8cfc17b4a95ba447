//! Thin wrappers over single CPU instructions and registers.
//!
//! Only instructions that cannot break memory safety are wrapped as safe functions here;
//! port I/O and MSR/control-register writes stay `unsafe` for the device modules to justify.

use core::arch::asm;

/// The time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the counter; CR4.TSD is never set.
    unsafe { x86::time::rdtsc() }
}

/// Stop the CPU until the next interrupt.
#[inline]
pub fn halt() {
    // SAFETY: hlt has no memory effects.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) }
}

/// Enable interrupts.
#[inline]
pub fn enable_interrupts() {
    // SAFETY: callers run after the IDT and the APIC are set up (checked by construction of
    // the boot sequence); sti has no memory effects.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Disable interrupts; returns whether they were enabled.
#[inline]
pub fn disable_interrupts() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS and clears IF; no memory effects besides the stack push/pop.
    unsafe { asm!("pushfq", "pop {}", "cli", out(reg) flags, options(nomem)) };
    flags & (1 << 9) != 0
}

/// Re-enable interrupts if `was_enabled`.
#[inline]
pub fn restore_interrupts(was_enabled: bool) {
    if was_enabled {
        enable_interrupts();
    }
}

/// Stop this CPU for good (interrupts off).
pub fn halt_forever() -> ! {
    disable_interrupts();
    loop {
        halt();
    }
}

/// `cpuid` leaf/subleaf.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// CPU features the hypervisor uses when present.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub smep: bool,
    pub smap: bool,
    pub global_pages: bool,
    pub nx: bool,
}

pub fn features() -> Features {
    let max = cpuid(0, 0)[0];
    let leaf7 = if max >= 7 { cpuid(7, 0)[1] } else { 0 };
    let leaf1 = cpuid(1, 0)[3];
    let ext_max = cpuid(0x8000_0000, 0)[0];
    let ext1 = if ext_max >= 0x8000_0001 {
        cpuid(0x8000_0001, 0)[3]
    } else {
        0
    };
    Features {
        smep: leaf7 & (1 << 7) != 0,
        smap: leaf7 & (1 << 20) != 0,
        global_pages: leaf1 & (1 << 13) != 0,
        nx: ext1 & (1 << 20) != 0,
    }
}

/// Read an MSR.
///
/// # Safety
/// `msr` must exist on this CPU.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: the caller guarantees the MSR exists.
    unsafe { x86::msr::rdmsr(msr) }
}

/// Write an MSR.
///
/// # Safety
/// `msr` must exist and `value` must not break any invariant the hypervisor relies on.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the write is sound.
    unsafe { x86::msr::wrmsr(msr, value) }
}

/// CR2 (the faulting address of the last #PF).
pub fn cr2() -> u64 {
    // SAFETY: reading CR2 has no side effects.
    unsafe { x86::controlregs::cr2() as u64 }
}

/// CR3 (the current root page table).
pub fn cr3() -> u64 {
    // SAFETY: reading CR3 has no side effects.
    unsafe { x86::controlregs::cr3() }
}

/// Write a byte to an I/O port.
///
/// # Safety
/// The port must belong to a device whose driver is the caller.
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: the caller owns the device.
    unsafe { x86::io::outb(port, v) }
}

/// Read a byte from an I/O port.
///
/// # Safety
/// The port must belong to a device whose driver is the caller.
pub unsafe fn inb(port: u16) -> u8 {
    // SAFETY: the caller owns the device.
    unsafe { x86::io::inb(port) }
}

/// Power the machine off through QEMU's `isa-debug-exit` with `code`
/// (`shared_abi::console::EXIT_*`); halts if the device is absent.
pub fn debug_exit(code: u32) -> ! {
    // SAFETY: port 0xf4 is QEMU's debug-exit device (or nothing on other machines); writing
    // it has no effect on memory.
    unsafe { x86::io::outl(shared_abi::console::DEBUG_EXIT_PORT, code) };
    halt_forever()
}
