//! PV domains on bare metal: the arch half of `domain` and `sched`.
//!
//! Owns the one hypervisor lock ([`STATE`]: the portable [`Hypervisor`] plus each vCPU's
//! saved registers and FPU state and what each CPU runs), the trap dispatcher every entry
//! from ring 3 goes through (`syscall`, exceptions, timer and kick interrupts), the vCPU
//! context switch, the per-CPU run loop and the boot of the manifest's domains.
//!
//! Execution model: the hypervisor is not preemptible (traps run with IF clear) and never
//! blocks inside a hypercall, so there is no per-vCPU kernel stack. Every entry from ring 3
//! lands at the top of its CPU's kernel stack with a full [`ExceptionFrame`]; the dispatcher
//! handles the event and, when the scheduler says so, swaps the frame's contents with
//! another vCPU's saved context (general registers in the frame, FPU/SSE/AVX eagerly through
//! `fpu`, CR3), then returns through `sysretq` (when RCX = RIP and R11 = RFLAGS) or `iretq`.
//! A CPU with nothing to run halts with interrupts on inside the dispatcher, lock released.
//!
//! Faults from ring 3 stop only the faulting domain (one report line, its memory freed, the
//! fault recorded as its exit reason); faults in ring 0 stay fatal. Guest memory is only
//! touched through the domain module's checked accessor, which translates through the
//! domain's own tables and copies through the direct map: it cannot fault and SMAP stays on.
//!
//! Lock order: [`STATE`] → shootdown initiator (`mmu`) → frame allocator → console.
//! [`STATE`] is only taken with interrupts off, and always through [`lock_state`], which
//! serves TLB shootdown requests while it spins: the holder may be waiting for this CPU's
//! acknowledgement (see `mmu`).

pub mod fpu;
pub mod mmu;

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shared_abi::DomId;
use shared_abi::console::{EXIT_FAILURE, EXIT_SUCCESS};
use shared_abi::manifest::parse_image;
use spin::{Mutex, MutexGuard};

use super::gdt::{USER_CS, USER_DS};
use super::idt::{self, ExceptionFrame, KICK_VECTOR, SYSCALL_VECTOR, TIMER_VECTOR, TLB_VECTOR};
use super::{apic, console, cpu, memory, percpu};
use crate::domain::builder::DomainConfig;
use crate::domain::console::ConsoleSink;
use crate::domain::{Clock, DomainState, ExitReason, FaultInfo, HvConfig, Hypervisor, Platform};
use crate::sched::{CpuSet, VcpuId};
use fpu::FpuState;
use mmu::{DirectPhys, Factory, GlobalFrames};

/// RFLAGS bits a domain may hold: CF PF AF ZF SF DF OF AC ID (IF and bit 1 are forced on;
/// IOPL, NT, TF, VM and RF are forced off).
const USER_RFLAGS: u64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800 | 0x4_0000 | 0x20_0000;
/// SFMASK: clear IF, TF, DF, NT and AC on `syscall`.
const SFMASK: u64 = 0x100 | 0x200 | 0x400 | 0x4000 | 0x4_0000;
/// Longest gap between timer interrupts on a CPU (timers and accounting need a pulse).
const MAX_TICK_NS: u64 = 10_000_000;
/// Shortest one-shot programmed (below this the interrupt would only cost time).
const MIN_TICK_NS: u64 = 50_000;
/// End of the canonical lower half.
const LOWER_HALF_END: u64 = 0x0000_8000_0000_0000;

/// A vCPU's saved state while it does not run.
struct VcpuCtx {
    dom: DomId,
    frame: ExceptionFrame,
    fpu: FpuState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Running {
    vcpu: VcpuId,
    dom: DomId,
}

struct State {
    hv: Hypervisor,
    /// By `VcpuId` (ids are reused; `dom` tells a stale context apart).
    ctx: BTreeMap<usize, VcpuCtx>,
    /// Per CPU: the vCPU whose registers are live on it.
    cur: Vec<Option<Running>>,
    /// Domains whose exit was reported.
    reported: BTreeSet<DomId>,
    exit_when_done: bool,
    /// Boot domains refused at build time.
    build_failures: u32,
    free_frames_before: u64,
    heap_frames_before: u64,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Take [`STATE`] (interrupts off), serving TLB shootdowns while another CPU holds it.
fn lock_state() -> MutexGuard<'static, Option<State>> {
    mmu::lock_serving(&STATE)
}

/// Set once [`STATE`] exists: APs leave their boot idle loop for [`cpu_loop`].
static STARTED: AtomicBool = AtomicBool::new(false);
/// TSC at hypervisor time 0.
static TSC_BASE: AtomicU64 = AtomicU64::new(0);

struct Sink;

impl ConsoleSink for Sink {
    fn write(&mut self, bytes: &[u8]) {
        console::hv_bytes(bytes);
    }
    fn domain_line(&mut self, bytes: &[u8]) {
        console::raw_bytes(bytes);
    }
    fn read_log(
        &mut self,
        from: u64,
        out: &mut [u8],
    ) -> Result<crate::domain::console::RingRead, shared_abi::errno::XenError> {
        console::read_dmesg(from, out)
    }
}

struct TscClock;

impl Clock for TscClock {
    fn now_ns(&self) -> u64 {
        let d = cpu::rdtsc().saturating_sub(TSC_BASE.load(Ordering::Relaxed));
        (d as u128 * 1_000_000 / apic::tsc_khz().max(1) as u128) as u64
    }
    fn tsc(&self) -> u64 {
        cpu::rdtsc()
    }
    fn tsc_hz(&self) -> u64 {
        apic::tsc_khz().max(1) * 1000
    }
}

fn with_platform<R>(f: impl FnOnce(&mut Platform<'_>) -> R) -> R {
    let mut frames = GlobalFrames;
    let phys = DirectPhys;
    let mut mmu = Factory;
    let clock = TscClock;
    let mut sink = Sink;
    let mut mgmt = super::serial::com2::Line;
    let mut p = Platform {
        frames: &mut frames,
        phys: &phys,
        mmu: &mut mmu,
        clock: &clock,
        console: &mut sink,
        mgmt: &mut mgmt,
    };
    f(&mut p)
}

/// Per-CPU setup for ring 3: `syscall` (EFER.SCE, LSTAR, SFMASK; STAR is set with the GDT),
/// the kernel GS base swap target, and the FPU. Returns the FPU mode for the log.
pub fn init_cpu() -> &'static str {
    // SAFETY: these MSRs exist on every x86-64 CPU; LSTAR points at the syscall entry stub,
    // which switches to this CPU's kernel stack before touching memory; KERNEL_GS_BASE = 0
    // is what a domain's GS base starts as (the per-CPU base is swapped in on entry).
    unsafe {
        cpu::wrmsr(
            x86::msr::IA32_LSTAR,
            idt::bulkhead_syscall_entry as *const () as u64,
        );
        cpu::wrmsr(x86::msr::IA32_FMASK, SFMASK);
        cpu::wrmsr(x86::msr::IA32_KERNEL_GSBASE, 0);
        let efer = cpu::rdmsr(x86::msr::IA32_EFER);
        cpu::wrmsr(x86::msr::IA32_EFER, efer | 1);
    }
    fpu::init_cpu()
}

/// Build every boot domain of the image at `module` (already validated by
/// `boot::image::check`), in order, and make them runnable. Returns the number built.
pub fn boot_domains(module: &'static [u8], nr_cpus: usize, exit_when_done: bool) -> usize {
    TSC_BASE.store(cpu::rdtsc(), Ordering::Relaxed);
    let mut free_frames_before = memory::free_frames();
    let heap_frames_before = super::heap::HEAP_FRAMES.load(Ordering::Relaxed)
        + memory::KERNEL_TABLE_FRAMES.load(Ordering::Relaxed);
    let mut hv = Hypervisor::new(nr_cpus, HvConfig::default(), 0);
    hv.pci = Some(alloc::boxed::Box::new(super::devices::ArchPci));
    let mut built = 0;
    let mut failures = 0;
    match parse_image(module) {
        Ok(image) => {
            // The plan's frames (IOMMU context tables) stay for the whole boot: not the
            // domains' to give back.
            let before_plan = memory::free_frames();
            let mut devices = super::devices::plan(&image.manifest);
            free_frames_before -= before_plan.saturating_sub(memory::free_frames());
            // Kept for rebuilds (`domctl REBUILD_BOOT_DOMAIN`): entry i is manifest domain i.
            let mut boot = crate::domain::boot::BootSet::default();
            for (i, spec) in image.manifest.domains.iter().enumerate() {
                boot.entries.push(crate::domain::boot::BootEntry {
                    spec: spec.clone(),
                    elf: image.elf(i).unwrap_or(&[]),
                    domid: None,
                    rebuilds: 0,
                });
                let Some(elf) = image.elf(i) else {
                    crate::raw_println!("bulkhead: domain {:?} refused: ELF missing", spec.name);
                    failures += 1;
                    continue;
                };
                let mut cfg = DomainConfig::from_spec(spec);
                match devices.devices_for(i, &image.manifest) {
                    Ok(d) => cfg.devices = d,
                    Err(why) => {
                        crate::raw_println!("bulkhead: domain {:?} refused: {why}", spec.name);
                        failures += 1;
                        continue;
                    }
                }
                let t0 = cpu::rdtsc();
                let r = with_platform(|p| hv.build_domain(p, &cfg, elf));
                let us = cpu::rdtsc().wrapping_sub(t0) * 1000 / apic::tsc_khz().max(1);
                match r {
                    Ok(id) => {
                        built += 1;
                        if let Some(e) = boot.entries.get_mut(i) {
                            e.domid = Some(id);
                        }
                        if let Some(d) = hv.domains.get(id) {
                            devices.built(i, d);
                        }
                        crate::raw_println!(
                            "bulkhead: domain {id} ({}) running ({} KiB, {} vCPUs, built in {}.{:03} ms)",
                            spec.name,
                            spec.memory_kib,
                            spec.vcpus,
                            us / 1000,
                            us % 1000
                        );
                        crate::raw_println!(
                            "METRIC domain_build_ms {}.{:03} ms",
                            us / 1000,
                            us % 1000
                        );
                    }
                    Err(e) => {
                        failures += 1;
                        crate::raw_println!("bulkhead: domain {:?} refused: {e}", spec.name);
                    }
                }
            }
            boot.devices = Some(alloc::boxed::Box::new(
                devices.keep_for_rebuild(&image.manifest),
            ));
            hv.boot = Some(alloc::boxed::Box::new(boot));
            devices.finish();
        }
        Err(e) => {
            crate::raw_println!("bulkhead: boot image unreadable: {e}");
            failures += 1;
        }
    }
    let kicks = hv.take_kicks();
    *lock_state() = Some(State {
        hv,
        ctx: BTreeMap::new(),
        cur: alloc::vec![None; nr_cpus.max(1)],
        reported: BTreeSet::new(),
        exit_when_done,
        build_failures: failures,
        free_frames_before,
        heap_frames_before,
    });
    STARTED.store(true, Ordering::Release);
    send_kicks(kicks, usize::MAX);
    built
}

/// True once [`boot_domains`] ran (APs then enter [`cpu_loop`]).
pub fn started() -> bool {
    STARTED.load(Ordering::Acquire)
}

/// Interrupt every CPU in `set` but `me`.
fn send_kicks(set: CpuSet, me: usize) {
    for c in set.iter() {
        if c == me {
            continue;
        }
        if let Some(pc) = percpu::get(c)
            && pc.online.load(Ordering::Acquire)
        {
            apic::send_fixed(pc.apic_id, KICK_VECTOR);
        }
    }
}

/// Run vCPUs on this CPU for ever (interrupts may be on or off on entry).
pub fn cpu_loop() -> ! {
    cpu::disable_interrupts();
    apic::set_oneshot();
    apic::arm_ns(MAX_TICK_NS);
    let mut f = ExceptionFrame::zeroed();
    let cpu_ix = percpu::current_index() as usize;
    let g = lock_state();
    resume(g, &mut f, cpu_ix);
    finish_user_frame(&mut f);
    // SAFETY: `f` now holds a ring-3 frame of a domain vCPU whose address space is loaded;
    // the return path pops it and `iretq`s; nothing on this stack is used afterwards (the
    // next entry from ring 3 starts again at the top of the kernel stack).
    unsafe {
        core::arch::asm!(
            "mov rsp, {f}",
            "jmp {ret}",
            f = in(reg) &f as *const ExceptionFrame,
            ret = sym idt::bulkhead_iret_path,
            options(noreturn)
        )
    }
}

/// The dispatcher for every exception and interrupt (and `syscall`, vector 0x100). Returns
/// 1 when the frame may be resumed with `sysretq`, 0 for `iretq`.
pub extern "C" fn trap_entry(f: &mut ExceptionFrame) -> u64 {
    let from_user = f.cs & 3 == 3;
    let vector = f.vector;
    if vector == TLB_VECTOR as u64 {
        // Needs no lock: the initiator holds STATE and waits for this.
        mmu::serve_shootdown();
        apic::eoi();
        return if from_user { finish_user_frame(f) } else { 0 };
    }
    if let Some(v) = device_vector(vector) {
        // Taken first, for the interrupt-to-event latency figure.
        let tsc = cpu::rdtsc();
        // MSI-X is edge-triggered: acknowledge now; a new edge may queue behind this one.
        apic::eoi();
        device_interrupt(v, tsc, from_user, f)
    } else {
        trap_entry_other(f, from_user, vector)
    }
}

/// `vector` as a device interrupt vector (`crate::irq`), if it is one.
fn device_vector(vector: u64) -> Option<u8> {
    let v = u8::try_from(vector).ok()?;
    crate::irq::IrqTable::pirq_of_vector(v).map(|_| v)
}

/// A device interrupt: deliver its event; from ring 3, reschedule if that woke a vCPU here.
fn device_interrupt(vector: u8, tsc: u64, from_user: bool, f: &mut ExceptionFrame) -> u64 {
    let cpu_ix = percpu::current_index() as usize;
    let mut g = lock_state();
    let Some(st) = g.as_mut() else {
        drop(g);
        return if from_user { finish_user_frame(f) } else { 0 };
    };
    let kicks = with_platform(|p| st.hv.device_interrupt(p, vector, tsc));
    send_kicks(kicks, cpu_ix);
    if !from_user {
        // Idle: the idle loop asks the scheduler again once this returns.
        return 0;
    }
    if kicks.contains(cpu_ix) {
        resume(g, f, cpu_ix);
    } else {
        drop(g);
    }
    finish_user_frame(f)
}

/// Every other exception and interrupt.
fn trap_entry_other(f: &mut ExceptionFrame, from_user: bool, vector: u64) -> u64 {
    if !from_user {
        match vector {
            v if v == TIMER_VECTOR as u64 => {
                idt::count_tick_and_eoi();
                poll_iommu();
                idle_tick();
                return 0;
            }
            v if v == KICK_VECTOR as u64 => {
                apic::eoi();
                return 0;
            }
            _ => idt::exception_report(f),
        }
    }
    // Machine-level events are never a domain's fault.
    if vector == 2 || vector == 8 || vector == 18 {
        idt::exception_report(f);
    }
    if vector == TIMER_VECTOR as u64 {
        poll_iommu();
    }
    let cpu_ix = percpu::current_index() as usize;
    let mut g = lock_state();
    let Some(st) = g.as_mut() else {
        idt::exception_report(f)
    };
    let resched;
    if vector == SYSCALL_VECTOR {
        if f.rip >= LOWER_HALF_END {
            // `syscall` in the last bytes of the lower half: the return RIP is not
            // canonical, and neither sysret nor iret could use it. The domain dies.
            domain_fault(st, cpu_ix, f, 13);
            resched = true;
        } else {
            let exit = with_platform(|p| {
                st.hv
                    .hypercall(p, cpu_ix, f.rax, [f.rdi, f.rsi, f.rdx, f.r10, f.r8])
            });
            f.rax = exit.ret as u64;
            send_kicks(exit.kicks, cpu_ix);
            resched = exit.resched;
        }
    } else if vector == TIMER_VECTOR as u64 {
        idt::count_tick_and_eoi();
        let r = with_platform(|p| st.hv.timer_tick(p, cpu_ix));
        send_kicks(r.kicks, cpu_ix);
        resched = r.resched;
    } else if vector == KICK_VECTOR as u64 {
        apic::eoi();
        resched = true;
    } else if vector < 32 {
        domain_fault(st, cpu_ix, f, vector);
        resched = true;
    } else {
        // Spurious or unexpected vectors: ignore (no EOI for spurious).
        resched = false;
    }
    report_exits(st);
    if resched {
        resume(g, f, cpu_ix);
    } else {
        if vector == TIMER_VECTOR as u64 {
            arm_timer(st, cpu_ix);
        }
        drop(g);
    }
    finish_user_frame(f)
}

/// Force a user frame's selectors and flags to what ring 3 may hold; say whether `sysretq`
/// restores it exactly.
fn finish_user_frame(f: &mut ExceptionFrame) -> u64 {
    f.rflags = (f.rflags & USER_RFLAGS) | 0x202;
    f.cs = USER_CS as u64;
    f.ss = USER_DS as u64;
    u64::from(f.rip < LOWER_HALF_END && f.rcx == f.rip && f.r11 == f.rflags)
}

/// Report a ring-3 exception and stop the domain that took it.
fn domain_fault(st: &mut State, cpu_ix: usize, f: &ExceptionFrame, vector: u64) {
    let cr2 = if vector == 14 { cpu::cr2() } else { 0 };
    if let Some(r) = st.cur.get(cpu_ix).copied().flatten() {
        let name = st.hv.domains.get(r.dom).map_or("?", |d| d.name.as_str());
        crate::raw_println!(
            "bulkhead: domain {} ({name}) fault: vector {vector} ({}) rip {:#x} cr2 {cr2:#x} error {:#x} on cpu{cpu_ix}",
            r.dom,
            idt::vector_name(vector),
            f.rip,
            f.error_code
        );
    }
    let info = FaultInfo {
        vector: vector as u8,
        error_code: f.error_code,
        rip: f.rip,
        cr2,
    };
    let exit = with_platform(|p| st.hv.fault(p, cpu_ix, info));
    send_kicks(exit.kicks, cpu_ix);
}

/// Print one line per domain that stopped since the last call; drop their contexts.
fn report_exits(st: &mut State) {
    let mut gone = Vec::new();
    for d in st.hv.domains.iter() {
        if let Some(exit) = d.exit
            && !st.reported.contains(&d.id)
        {
            let why = match exit {
                ExitReason::Shutdown(r) => r.name(),
                ExitReason::RemoteShutdown { reason, .. } => reason.name(),
                ExitReason::Fault(_) => "fault",
                ExitReason::Destroyed { .. } => "destroyed",
            };
            crate::raw_println!("bulkhead: domain {} ({}) exited: {why}", d.id, d.name);
            gone.push(d.id);
        }
    }
    for id in gone {
        st.reported.insert(id);
    }
}

/// Save the live vCPU (if its domain still lives) out of `f` and the FPU.
fn park_current(st: &mut State, cpu_ix: usize, f: &ExceptionFrame) {
    let Some(r) = st.cur.get_mut(cpu_ix).and_then(Option::take) else {
        return;
    };
    let alive = st
        .hv
        .domains
        .get(r.dom)
        .is_some_and(|d| d.state().is_alive());
    if !alive {
        st.ctx.remove(&r.vcpu.0);
        return;
    }
    if let Some(c) = st.ctx.get_mut(&r.vcpu.0)
        && c.dom == r.dom
    {
        c.frame = f.clone();
        c.fpu.save();
    }
}

/// Make `v` the live vCPU on this CPU: its registers into `f`, its FPU state, its CR3.
/// Returns false if it cannot run (no address space, no memory for its FPU area).
fn load_vcpu(st: &mut State, cpu_ix: usize, f: &mut ExceptionFrame, v: VcpuId) -> bool {
    let Some((dom, _)) = st.hv.sched.owner(v) else {
        return false;
    };
    let Some(root) = st.hv.address_space_root(dom) else {
        return false;
    };
    let fresh = st.ctx.get(&v.0).is_none_or(|c| c.dom != dom);
    if fresh {
        let Some(es) = st.hv.entry_state(dom) else {
            return false;
        };
        let Some(fpu) = FpuState::new() else {
            return false;
        };
        let mut frame = ExceptionFrame::zeroed();
        frame.rip = es.rip;
        frame.rsp = es.rsp;
        frame.rdi = es.rdi;
        frame.rflags = es.rflags;
        frame.cs = USER_CS as u64;
        frame.ss = USER_DS as u64;
        st.ctx.insert(v.0, VcpuCtx { dom, frame, fpu });
    }
    let Some(c) = st.ctx.get(&v.0) else {
        return false;
    };
    *f = c.frame.clone();
    c.fpu.restore();
    // The root shares the hypervisor's upper half; the lower half is the domain's.
    mmu::switch_root(root.0 << 12, true);
    with_platform(|p| st.hv.address_space_loaded(p, cpu_ix, Some(dom)));
    if let Some(slot) = st.cur.get_mut(cpu_ix) {
        *slot = Some(Running { vcpu: v, dom });
    }
    true
}

/// Ask the scheduler what this CPU runs next and make `f` that vCPU's frame; halt (lock
/// released, interrupts on) while there is nothing to run. Consumes the lock guard.
fn resume(mut g: MutexGuard<'_, Option<State>>, f: &mut ExceptionFrame, cpu_ix: usize) {
    loop {
        let Some(st) = g.as_mut() else {
            drop(g);
            cpu::halt_forever();
        };
        let d = with_platform(|p| st.hv.schedule(p, cpu_ix));
        let cur = st.cur.get(cpu_ix).copied().flatten();
        match d.next {
            Some(v)
                if cur.is_some_and(|r| {
                    r.vcpu == v && st.hv.sched.owner(v).map(|o| o.0) == Some(r.dom)
                }) =>
            {
                arm_timer(st, cpu_ix);
                return;
            }
            Some(v) => {
                park_current(st, cpu_ix, f);
                if load_vcpu(st, cpu_ix, f, v) {
                    report_exits(st);
                    arm_timer(st, cpu_ix);
                    return;
                }
                // Cannot run it (its domain is going away): ask again.
                if let Some((dom, _)) = st.hv.sched.owner(v) {
                    let k = with_platform(|p| st.hv.crash(p, dom));
                    send_kicks(k, cpu_ix);
                }
            }
            None => {
                park_current(st, cpu_ix, f);
                go_idle(st, cpu_ix);
                report_exits(st);
                check_done(st);
                arm_timer(st, cpu_ix);
                drop(g);
                cpu::enable_interrupts();
                cpu::halt();
                cpu::disable_interrupts();
                g = lock_state();
            }
        }
    }
}

/// No vCPU on this CPU: the hypervisor's own tables, and tell the domain code (which frees
/// dying domains no CPU holds any more).
fn go_idle(st: &mut State, cpu_ix: usize) {
    mmu::switch_root(memory::kernel_cr3(), false);
    with_platform(|p| st.hv.address_space_loaded(p, cpu_ix, None));
}

/// Program this CPU's one-shot timer for its next scheduling deadline (slice end, a vCPU
/// timer, a new accounting period), at most [`MAX_TICK_NS`] away.
fn arm_timer(st: &State, cpu_ix: usize) {
    let now = TscClock.now_ns();
    let ns = st
        .hv
        .sched
        .next_deadline(cpu_ix)
        .map_or(MAX_TICK_NS, |d| d.saturating_sub(now))
        .clamp(MIN_TICK_NS, MAX_TICK_NS);
    apic::arm_ns(ns);
}

/// On CPU 0's timer ticks (ring 3 or idle: no lock held), report IOMMU faults.
fn poll_iommu() {
    if percpu::current_index() == 0 {
        super::devices::poll_faults();
    }
}

/// A timer tick while idle in ring 0: fire due timers (waking vCPUs, maybe on other CPUs).
fn idle_tick() {
    if !started() {
        return;
    }
    let cpu_ix = percpu::current_index() as usize;
    // The lock is never held with interrupts on, so this cannot be our own CPU holding it.
    // Wait for it rather than skip: only this tick re-arms this CPU's one-shot timer, and
    // a skipped one leaves the CPU halted while timers of vCPUs homed here fall due.
    let mut g = lock_state();
    if let Some(st) = g.as_mut() {
        let r = with_platform(|p| st.hv.timer_tick(p, cpu_ix));
        send_kicks(r.kicks, cpu_ix);
        arm_timer(st, cpu_ix);
    }
}

/// With `exit_when_done`: once every domain is dead (memory returned), print the memory
/// balance and power off.
fn check_done(st: &mut State) {
    if !st.exit_when_done {
        return;
    }
    if !st.hv.domains.iter().all(|d| d.state() == DomainState::Dead) {
        return;
    }
    let free = memory::free_frames();
    // The heap and the hypervisor's own page tables only grow; what they took is not lost.
    let heap = (super::heap::HEAP_FRAMES.load(Ordering::Relaxed)
        + memory::KERNEL_TABLE_FRAMES.load(Ordering::Relaxed))
    .saturating_sub(st.heap_frames_before);
    let balanced = free + heap == st.free_frames_before;
    crate::raw_println!(
        "bulkhead: all {} domains stopped; free frames {} before, {} after + {} heap and page-table growth: {}",
        st.hv.domains.iter().count(),
        st.free_frames_before,
        free,
        heap,
        if balanced { "balanced" } else { "LEAK" }
    );
    let code = if st.build_failures == 0 && balanced {
        EXIT_SUCCESS
    } else {
        EXIT_FAILURE
    };
    cpu::debug_exit(code)
}
