//! vCPU FPU/SSE/AVX state, switched eagerly on every vCPU switch (LAB.md: lazy switching
//! through CR0.TS loses YMM state under QEMU 7.2's TCG).
//!
//! With XSAVE the state components are x87 + SSE (+ AVX when the CPU has it), saved with
//! XSAVE/XRSTOR into a 64-byte aligned area of the size CPUID leaf 0xD reports; without it,
//! FXSAVE64/FXRSTOR64 into 512 bytes. The hypervisor itself is built soft-float and never
//! touches these registers, so the registers always hold the current vCPU's state.
//!
//! Invariant: set up ([`init_cpu`]) on every CPU before any vCPU runs there; the BSP's call
//! decides the mode and area size for all.

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use core::arch::asm;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use super::super::cpu;

/// 0 = FXSAVE; otherwise the XCR0 mask in use.
static XCR0: AtomicU64 = AtomicU64::new(0);
static AREA_SIZE: AtomicU64 = AtomicU64::new(512);

const MXCSR_DEFAULT: u32 = 0x1f80;
const FCW_DEFAULT: u16 = 0x037f;

/// Enable SSE for ring 3 (CR4.OSFXSR/OSXMMEXCPT, CR0.MP, clear EM/TS) and XSAVE with
/// x87|SSE|AVX when present. Returns a description for the log.
pub fn init_cpu() -> &'static str {
    use x86::controlregs::{Cr0, Cr4, cr0, cr0_write, cr4, cr4_write};
    let leaf1 = cpu::cpuid(1, 0);
    let has_xsave = leaf1[2] & (1 << 26) != 0;
    let has_avx = leaf1[2] & (1 << 28) != 0;
    // SAFETY: enabling FXSR/XMM exceptions and XSAVE only changes how ring 3's SSE
    // instructions behave; the hypervisor uses none of them.
    unsafe {
        let mut c0 = cr0();
        c0 |= Cr0::CR0_MONITOR_COPROCESSOR | Cr0::CR0_NUMERIC_ERROR;
        c0 &= !(Cr0::CR0_EMULATE_COPROCESSOR | Cr0::CR0_TASK_SWITCHED);
        cr0_write(c0);
        let mut c4 = cr4();
        c4 |= Cr4::CR4_ENABLE_SSE | Cr4::CR4_UNMASKED_SSE;
        if has_xsave {
            c4 |= Cr4::CR4_ENABLE_OS_XSAVE;
        }
        cr4_write(c4);
        if has_xsave {
            let mask: u64 = if has_avx { 0x7 } else { 0x3 };
            x86::controlregs::xcr0_write(x86::controlregs::Xcr0::from_bits_truncate(mask));
            XCR0.store(mask, Ordering::Release);
            let size = cpu::cpuid(0xd, 0)[1] as u64;
            AREA_SIZE.store(size.max(576), Ordering::Release);
            if has_avx {
                return "XSAVE (x87, SSE, AVX)";
            }
            return "XSAVE (x87, SSE)";
        }
    }
    "FXSAVE (x87, SSE)"
}

/// One vCPU's saved FPU state.
pub struct FpuState {
    area: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the area is owned by this value alone; it is only touched by the CPU that runs the
// vCPU, under the hypervisor lock.
unsafe impl Send for FpuState {}

impl FpuState {
    /// The initial state (x87 and SSE control words at their reset values, registers zero).
    pub fn new() -> Option<FpuState> {
        let size = AREA_SIZE.load(Ordering::Acquire) as usize;
        let layout = Layout::from_size_align(size, 64).ok()?;
        // SAFETY: the layout has a non-zero size.
        let area = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        // SAFETY: the area is at least 512 bytes: FCW at 0, MXCSR at 24 (FXSAVE layout, which
        // is also XSAVE's legacy region). XSTATE_BV stays 0: every component starts in its
        // init state, except MXCSR, which XRSTOR loads from the area.
        unsafe {
            core::ptr::write_unaligned(area.as_ptr() as *mut u16, FCW_DEFAULT);
            core::ptr::write_unaligned(area.as_ptr().add(24) as *mut u32, MXCSR_DEFAULT);
        }
        Some(FpuState { area, layout })
    }

    /// Save this CPU's FPU registers here.
    pub fn save(&mut self) {
        let mask = XCR0.load(Ordering::Relaxed);
        let p = self.area.as_ptr();
        // SAFETY: the area is 64-byte aligned and as large as the enabled components need.
        unsafe {
            if mask != 0 {
                asm!("xsave64 [{}]", in(reg) p, in("eax") mask as u32, in("edx") (mask >> 32) as u32, options(nostack));
            } else {
                asm!("fxsave64 [{}]", in(reg) p, options(nostack));
            }
        }
    }

    /// Load this state into the CPU's FPU registers.
    pub fn restore(&self) {
        let mask = XCR0.load(Ordering::Relaxed);
        let p = self.area.as_ptr();
        // SAFETY: the area holds a state saved by `save` or built by `new` (valid header,
        // reserved bits zero, MXCSR valid).
        unsafe {
            if mask != 0 {
                asm!("xrstor64 [{}]", in(reg) p, in("eax") mask as u32, in("edx") (mask >> 32) as u32, options(nostack, readonly));
            } else {
                asm!("fxrstor64 [{}]", in(reg) p, options(nostack, readonly));
            }
        }
    }
}

impl Drop for FpuState {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.area.as_ptr(), self.layout) }
    }
}
