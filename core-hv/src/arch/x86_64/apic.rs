//! Local APIC (xAPIC, MMIO) and time: TSC and APIC-timer calibration against the PIT, the
//! periodic tick, and the INIT/SIPI IPIs that start the APs.
//!
//! QEMU 7.2's TCG has no x2APIC, so the registers are reached through the MMIO page, mapped
//! uncached in the direct map; every CPU sees its own APIC at the same address.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::idt::{SPURIOUS_VECTOR, TIMER_VECTOR};
use super::{cpu, memory};

const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_ESR: u32 = 0x280;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_LINT0: u32 = 0x350;
const REG_LVT_LINT1: u32 = 0x360;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;

const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const SVR_ENABLE: u32 = 1 << 8;
const ICR_PENDING: u32 = 1 << 12;
/// Divide configuration 0b0011: divide the bus clock by 16.
const DIVIDE_BY_16: u32 = 0x3;

/// Tick rate of the periodic timer.
pub const TICK_HZ: u64 = 100;

/// Virtual address of the APIC registers (0 before [`init_bsp`]).
static BASE: AtomicU64 = AtomicU64::new(0);
/// TSC ticks per millisecond (kHz), from calibration.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
/// APIC timer initial count for one tick at [`TICK_HZ`] (divide by 16).
static TIMER_COUNT: AtomicU32 = AtomicU32::new(0);

fn read(reg: u32) -> u32 {
    let base = BASE.load(Ordering::Relaxed);
    if base == 0 {
        return 0;
    }
    // SAFETY: BASE is the uncached mapping of the APIC page; `reg` is a register offset
    // inside it; APIC registers are 32-bit and 16-byte aligned.
    unsafe { core::ptr::read_volatile((base + reg as u64) as *const u32) }
}

fn write(reg: u32, v: u32) {
    let base = BASE.load(Ordering::Relaxed);
    if base == 0 {
        return;
    }
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile((base + reg as u64) as *mut u32, v) }
}

/// Map the APIC (BSP, once) and mask the legacy PICs, which this hypervisor does not use.
pub fn init_bsp() -> Result<(), memory::MemError> {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    let phys = unsafe { cpu::rdmsr(x86::msr::IA32_APIC_BASE) } & 0x000f_ffff_ffff_f000;
    let virt = memory::map_mmio(phys, 0x1000)?;
    BASE.store(virt, Ordering::Release);
    // SAFETY: ports 0x21/0xa1 are the 8259 PICs' mask registers; masking every line keeps
    // them from raising ExtINT interrupts (LINT0 is masked below as well).
    unsafe {
        cpu::outb(0x21, 0xff);
        cpu::outb(0xa1, 0xff);
    }
    Ok(())
}

/// Enable this CPU's APIC: spurious vector, LINT0/LINT1/error masked, timer masked.
pub fn enable_local() {
    write(REG_TPR, 0);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED);
    write(REG_LVT_ERROR, LVT_MASKED);
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_SVR, SVR_ENABLE | SPURIOUS_VECTOR as u32);
    write(REG_ESR, 0);
    write(REG_ESR, 0);
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Acknowledge the interrupt being serviced.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Calibration result.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    pub tsc_khz: u64,
    pub timer_count: u32,
}

const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_MS: u64 = 10;

/// Why calibration failed.
#[derive(Clone, Copy, Debug)]
pub struct NoPit;

/// Measure the TSC and the APIC timer (divide by 16) over 10 ms of PIT channel 2.
pub fn calibrate() -> Result<Calibration, NoPit> {
    let pit_count = (PIT_HZ * CALIBRATION_MS / 1000) as u16;
    let (tsc0, tsc1, apic_elapsed, pit_fired);
    // SAFETY: ports 0x42/0x43/0x61 are PIT channel 2 and its gate, used by nothing else; the
    // speaker output stays off (bit 1 of 0x61 clear).
    unsafe {
        let gate = cpu::inb(0x61) & !0x03;
        cpu::outb(0x61, gate); // gate low: channel 2 holds
        cpu::outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        cpu::outb(0x42, pit_count as u8);
        cpu::outb(0x42, (pit_count >> 8) as u8);
        // Mode 0 drives OUT2 low once programmed: a high bit 5 now means there is no PIT
        // gate/status port here (QEMU microvm has none), and waiting for it would be a lie.
        if cpu::inb(0x61) & 0x20 != 0 {
            return Err(NoPit);
        }
        write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
        write(REG_LVT_TIMER, LVT_MASKED);
        write(REG_TIMER_INIT, u32::MAX);
        tsc0 = cpu::rdtsc();
        let apic0 = read(REG_TIMER_CURRENT);
        cpu::outb(0x61, gate | 0x01); // gate high: count down
        // OUT2 (bit 5) rises at terminal count; bounded so a missing PIT cannot hang boot.
        let mut spins = 0u64;
        while cpu::inb(0x61) & 0x20 == 0 && spins < 50_000_000 {
            spins += 1;
        }
        tsc1 = cpu::rdtsc();
        pit_fired = cpu::inb(0x61) & 0x20 != 0;
        apic_elapsed = apic0.wrapping_sub(read(REG_TIMER_CURRENT));
        write(REG_TIMER_INIT, 0);
        cpu::outb(0x61, gate);
    }
    if !pit_fired {
        return Err(NoPit);
    }
    let tsc_khz = ((tsc1 - tsc0) / CALIBRATION_MS).max(1);
    let per_tick = apic_elapsed as u64 * 1000 / (CALIBRATION_MS * TICK_HZ);
    let c = Calibration {
        tsc_khz,
        timer_count: per_tick.clamp(1, u32::MAX as u64) as u32,
    };
    TSC_KHZ.store(c.tsc_khz, Ordering::Release);
    TIMER_COUNT.store(c.timer_count, Ordering::Release);
    Ok(c)
}

/// TSC frequency in kHz (0 before calibration).
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Acquire)
}

/// Busy-wait `us` microseconds on the calibrated TSC.
pub fn delay_us(us: u64) {
    let start = cpu::rdtsc();
    let ticks = us * tsc_khz().max(1) / 1000;
    while cpu::rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

/// Start this CPU's periodic tick at [`TICK_HZ`].
pub fn start_timer() {
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, TIMER_COUNT.load(Ordering::Acquire));
}

/// Switch this CPU's timer to one-shot mode (the PV scheduler arms it per decision).
pub fn set_oneshot() {
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, TIMER_VECTOR as u32);
}

/// Fire the one-shot timer in `ns` nanoseconds (at least one count).
pub fn arm_ns(ns: u64) {
    let per_tick = TIMER_COUNT.load(Ordering::Relaxed) as u128;
    let counts =
        (ns as u128 * per_tick * TICK_HZ as u128 / 1_000_000_000).clamp(1, u32::MAX as u128);
    write(REG_TIMER_INIT, counts as u32);
}

fn send_ipi(apic_id: u32, low: u32) {
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, low);
    for _ in 0..1_000_000 {
        if read(REG_ICR_LOW) & ICR_PENDING == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// A fixed-delivery interrupt with `vector` to `apic_id`.
pub fn send_fixed(apic_id: u32, vector: u8) {
    send_ipi(apic_id, 0x0000_4000 | vector as u32);
}

/// INIT (assert, level) then INIT de-assert to `apic_id`.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, 0x0000_c500);
    send_ipi(apic_id, 0x0000_8500);
}

/// Startup IPI: the AP starts in real mode at `page << 12`.
pub fn send_startup(apic_id: u32, page: u8) {
    send_ipi(apic_id, 0x0000_4600 | page as u32);
}
