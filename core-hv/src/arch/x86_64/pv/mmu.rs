//! The memory traits of the portable domain code (`domain::memory`), on bare metal: frames
//! from the global frame allocator, frame bytes through the direct map, and per-domain
//! 4-level page tables.
//!
//! A domain's PML4 shares the hypervisor's upper half (entries 256..512 are copies of the
//! hypervisor's root, which never gains new top-level entries once domains exist) and maps
//! in its lower half only what the builder and `memory_op` map: every leaf is USER, NX
//! unless the page is executable, writable only if asked. Intermediate tables are
//! present + writable + user, so a leaf alone decides permissions. The domain never sees
//! its tables (they are not mapped in its half) and cannot edit them.
//!
//! Invariants: every table frame of a domain came from the `tables` source handed to
//! [`DomainAddressSpace::map`] (the domain's reservation) and is recorded in `tables`, so
//! [`AddressSpace::release`] gives back exactly what was taken. Only the hypervisor lock's
//! holder edits an address space.
//!
//! # TLB shootdown
//!
//! Removing a translation is synchronous: [`AddressSpace::unmap`] returns only once no CPU
//! can still reach the old frame through its TLB, so the caller may free the frame at once.
//! The unmapping CPU clears the entry, invalidates it locally, then interrupts
//! ([`idt::TLB_VECTOR`](super::super::idt::TLB_VECTOR)) every other CPU whose CR3 holds that
//! address space, and spins until each has run `invlpg` and acknowledged. Only CPUs with the
//! root loaded can hold its translations: nothing uses PCIDs and domain leaves are never
//! global, so the CR3 write that leaves an address space drops all of them (and its
//! paging-structure caches). Each CPU records its root in `LOADED_ROOT` ([`switch_root`]).
//! CR3 changes and unmaps both happen under the hypervisor lock, so the record is exact
//! whenever an unmapper reads it.
//!
//! Deadlock freedom: the unmapping CPU holds the hypervisor lock with interrupts off while it
//! waits, so a target may be spinning for that lock with interrupts off too. Every such
//! spin (`pv::lock_state`, [`shootdown`]'s own waits) serves pending requests
//! ([`serve_shootdown`]) while it spins; a target in ring 3 takes the interrupt (halted CPUs
//! have left every domain's tables and are never targets); anywhere else in the hypervisor
//! it holds no lock the initiator needs and soon reaches one of those.
//! A CPU that never answers (a hypervisor bug) is reported as fatal rather than waited on for
//! ever, since freeing the frame would be unsafe.
//!
//! Lock order: hypervisor lock (and the per-domain locks nested in it) → `INITIATOR` (one
//! request in flight at a time) → nothing. The initiator may hold locks nested inside the
//! hypervisor lock while it waits (no CPU can want those without holding the hypervisor lock
//! first), but never the frame-allocator, heap, page-table or console locks, which a target
//! may need on its way to a serving point.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering, fence};

use shared_abi::start_info::DOMAIN_VA_END;
use spin::{Mutex, MutexGuard};

use super::super::{DIRECT_MAP_LIMIT, MAX_CPUS, apic, cpu, idt, memory, percpu, phys_to_virt};
use crate::domain::memory::{
    AddressSpace, AddressSpaceFactory, AtomicFrame, FrameSource, MapError, Mfn, PAGE_SIZE,
    PagePerms, PhysMem,
};
use crate::mm::paging::{ADDR_MASK, flags};

/// Per CPU: the physical root its CR3 holds when that is a domain's (0 otherwise).
static LOADED_ROOT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: the last shootdown generation asked of it, and the last it completed.
static REQUESTED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The request in flight: root and page. Written only by the `INITIATOR` holder before it
/// raises any `REQUESTED`, and left alone until every target acknowledged.
static REQ_ROOT: AtomicU64 = AtomicU64::new(0);
static REQ_VA: AtomicU64 = AtomicU64::new(0);
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// One shootdown in flight at a time.
static INITIATOR: Mutex<()> = Mutex::new(());
/// How long a target may take to acknowledge before the system is stopped (TSC-timed; a
/// CPU of a loaded TCG host can be descheduled for a while, so generous).
const SHOOTDOWN_TIMEOUT_MS: u64 = 5_000;

/// Load `root` (physical; a domain's root or the hypervisor's own tables) into this CPU's
/// CR3 and record it for [`shootdown`]. Call with interrupts off, under the hypervisor lock.
pub fn switch_root(root: u64, is_domain: bool) {
    let Some(slot) = LOADED_ROOT.get(percpu::current_index() as usize) else {
        return;
    };
    let root = root & ADDR_MASK;
    if is_domain {
        slot.store(root, Ordering::SeqCst);
    }
    if cpu::cr3() & ADDR_MASK != root {
        // SAFETY: every root this is given shares the hypervisor's upper half (domain roots
        // copy it), so everything the hypervisor runs on stays mapped.
        unsafe { x86::controlregs::cr3_write(root) };
    }
    if !is_domain {
        slot.store(0, Ordering::SeqCst);
    }
}

/// Serve this CPU's pending shootdown request, if any: drop the page's translation if the
/// address space is loaded here, and acknowledge. Safe to call at any time in ring 0.
pub fn serve_shootdown() {
    let me = percpu::current_index() as usize;
    let (Some(req), Some(done)) = (REQUESTED.get(me), DONE.get(me)) else {
        return;
    };
    let want = req.load(Ordering::Acquire);
    if done.load(Ordering::Acquire) >= want {
        return;
    }
    let (root, va) = (
        REQ_ROOT.load(Ordering::Acquire),
        REQ_VA.load(Ordering::Acquire),
    );
    if cpu::cr3() & ADDR_MASK == root {
        invlpg(va);
    }
    done.store(want, Ordering::Release);
}

fn invlpg(va: u64) {
    // SAFETY: invlpg only drops TLB and paging-structure-cache entries.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}

/// Take `lock`, serving shootdown requests while it is held elsewhere (see the module doc).
pub fn lock_serving<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    loop {
        if let Some(g) = lock.try_lock() {
            return g;
        }
        serve_shootdown();
        core::hint::spin_loop();
    }
}

/// Make every CPU drop its translation of `va` in the address space rooted at `root`, and
/// return only once they all have. The caller already changed the entry.
fn shootdown(root: u64, va: u64) {
    // The cleared entry is globally visible before any target is asked to drop it.
    fence(Ordering::SeqCst);
    let me = percpu::current_index() as usize;
    if cpu::cr3() & ADDR_MASK == root {
        invlpg(va);
    }
    let targets: u64 = (0..percpu::count().min(MAX_CPUS))
        .filter(|&c| c != me && LOADED_ROOT[c].load(Ordering::SeqCst) == root)
        .fold(0, |m, c| m | 1 << c);
    if targets == 0 {
        return;
    }
    let _one = lock_serving(&INITIATOR);
    REQ_ROOT.store(root, Ordering::Release);
    REQ_VA.store(va, Ordering::Release);
    let generation = GENERATION.fetch_add(1, Ordering::AcqRel) + 1;
    for c in (0..MAX_CPUS).filter(|c| targets & 1 << c != 0) {
        REQUESTED[c].store(generation, Ordering::Release);
        if let Some(pc) = percpu::get(c) {
            apic::send_fixed(pc.apic_id, idt::TLB_VECTOR);
        }
    }
    let start = cpu::rdtsc();
    let limit = SHOOTDOWN_TIMEOUT_MS.saturating_mul(apic::tsc_khz().max(1));
    let mut pending = targets;
    while pending != 0 {
        let waiting = pending;
        for c in (0..MAX_CPUS).filter(|c| waiting & 1 << c != 0) {
            if DONE[c].load(Ordering::Acquire) >= generation {
                pending &= !(1 << c);
            }
        }
        if pending == 0 {
            break;
        }
        serve_shootdown();
        if cpu::rdtsc().wrapping_sub(start) > limit {
            super::super::boot::fatal(format_args!(
                "TLB shootdown of {va:#x}: CPUs {pending:#x} did not acknowledge within {SHOOTDOWN_TIMEOUT_MS} ms"
            ));
        }
        core::hint::spin_loop();
    }
}

/// The global free-frame pool.
#[derive(Debug, Default)]
pub struct GlobalFrames;

impl FrameSource for GlobalFrames {
    fn alloc_frame(&mut self) -> Option<Mfn> {
        memory::alloc_frame().map(|p| Mfn(p >> 12))
    }

    fn free_frame(&mut self, frame: Mfn) {
        if !memory::free_frame(frame.0 << 12) {
            log::error!("frame {:#x} freed twice or never allocated", frame.0 << 12);
        }
    }

    fn free_frames(&self) -> Option<u64> {
        Some(memory::free_frames())
    }
}

/// Frame bytes through the direct map. Reads and writes (every guest-memory copy and both
/// halves of a grant copy) move aligned u64 words, volatile on the frame side.
#[derive(Debug, Default)]
pub struct DirectPhys;

fn frame_ptr(frame: Mfn, offset: usize, len: usize) -> Option<*mut u8> {
    let phys = frame.0.checked_mul(PAGE_SIZE)?;
    if phys >= DIRECT_MAP_LIMIT || offset.checked_add(len)? > PAGE_SIZE as usize {
        return None;
    }
    Some((phys_to_virt(phys) + offset as u64) as *mut u8)
}

/// Bytes from the start of `p` to the next 8-byte boundary (0 if aligned).
fn to_word_boundary(p: *const u8) -> usize {
    (8 - (p as usize & 7)) & 7
}

/// Copy `buf.len()` bytes out of a frame at `src` into `buf`: bytes up to the frame side's
/// first 8-byte boundary, then aligned u64 words, then the tail bytes.
///
/// Every access to the frame is volatile and at most 8 bytes wide (one aligned `mov`), never
/// a Rust reference or a `memcpy` over it: the frame may be a domain's page that the domain
/// (another vCPU) or a grant peer writes while the copy runs, and the compiler must neither
/// assume the bytes stable nor read one twice. A word that races with such a write may mix
/// old and new bytes, as Xen's copies may; only the domain's own data is affected.
///
/// # Safety
/// `src .. src + buf.len()` lies inside one direct-mapped RAM frame (see [`frame_ptr`]).
unsafe fn copy_from_frame(src: *const u8, buf: &mut [u8]) {
    let head_len = to_word_boundary(src).min(buf.len());
    let (head, rest) = buf.split_at_mut(head_len);
    let mut p = src;
    for b in head {
        // SAFETY: `p` stays inside the checked range (one step per byte of `buf`).
        *b = unsafe { core::ptr::read_volatile(p) };
        p = p.wrapping_add(1);
    }
    let mut words = rest.chunks_exact_mut(8);
    for w in &mut words {
        // SAFETY: `p` is 8-aligned here (the head ended on a boundary) and `p .. p + 8` is
        // inside the checked range (a whole chunk of `buf` is left).
        let v = unsafe { core::ptr::read_volatile(p.cast::<u64>()) };
        w.copy_from_slice(&v.to_ne_bytes());
        p = p.wrapping_add(8);
    }
    for b in words.into_remainder() {
        // SAFETY: as for the head.
        *b = unsafe { core::ptr::read_volatile(p) };
        p = p.wrapping_add(1);
    }
}

/// Copy `data` into a frame at `dst`, the mirror of [`copy_from_frame`] (volatile, aligned
/// words on the frame side).
///
/// # Safety
/// `dst .. dst + data.len()` lies inside one direct-mapped RAM frame (see [`frame_ptr`]).
unsafe fn copy_to_frame(data: &[u8], dst: *mut u8) {
    let head_len = to_word_boundary(dst).min(data.len());
    let (head, rest) = data.split_at(head_len);
    let mut p = dst;
    for &b in head {
        // SAFETY: `p` stays inside the checked range (one step per byte of `data`).
        unsafe { core::ptr::write_volatile(p, b) };
        p = p.wrapping_add(1);
    }
    let mut words = rest.chunks_exact(8);
    for w in &mut words {
        let mut v = [0u8; 8];
        v.copy_from_slice(w);
        // SAFETY: `p` is 8-aligned here and `p .. p + 8` is inside the checked range.
        unsafe { core::ptr::write_volatile(p.cast::<u64>(), u64::from_ne_bytes(v)) };
        p = p.wrapping_add(8);
    }
    for &b in words.remainder() {
        // SAFETY: as for the head.
        unsafe { core::ptr::write_volatile(p, b) };
        p = p.wrapping_add(1);
    }
}

impl PhysMem for DirectPhys {
    fn atomic_frame(&self, frame: Mfn) -> Option<&'static AtomicFrame> {
        let p = frame_ptr(frame, 0, PAGE_SIZE as usize)?;
        // SAFETY: `p` is the direct-map address of one whole RAM frame (checked by
        // `frame_ptr`): page-aligned, mapped for the hypervisor's life, and `[AtomicU64; 512]`
        // has the layout of `[u64; 512]`. The hypervisor touches a shared frame through this
        // view only atomically (the domain may write it concurrently), and the domain code
        // drops the view before the frame is freed (`domain::shared`).
        Some(unsafe { &*(p as *const AtomicFrame) })
    }

    fn read(&self, frame: Mfn, offset: usize, buf: &mut [u8]) {
        let Some(src) = frame_ptr(frame, offset, buf.len()) else {
            return;
        };
        // SAFETY: `src..src+len` is inside one direct-mapped RAM frame (checked by
        // `frame_ptr`); `copy_from_frame` touches it only through volatile accesses because a
        // domain may write the page concurrently.
        unsafe { copy_from_frame(src, buf) };
    }

    fn write(&self, frame: Mfn, offset: usize, data: &[u8]) {
        let Some(dst) = frame_ptr(frame, offset, data.len()) else {
            return;
        };
        // SAFETY: as in `read`; the frame belongs to the domain being served, which may race
        // with the write but cannot make it leave the frame.
        unsafe { copy_to_frame(data, dst) };
    }

    fn zero(&self, frame: Mfn) {
        if let Some(dst) = frame_ptr(frame, 0, PAGE_SIZE as usize) {
            // SAFETY: one whole direct-mapped frame the caller owns.
            unsafe { core::ptr::write_bytes(dst, 0, PAGE_SIZE as usize) };
        }
    }
}

fn table_read(table: u64, index: usize) -> u64 {
    // SAFETY: `table` is a page-table frame of this address space (direct-mapped RAM);
    // index is masked to the table.
    unsafe { core::ptr::read_volatile((phys_to_virt(table) as *const u64).add(index & 511)) }
}

fn table_write(table: u64, index: usize, value: u64) {
    // SAFETY: as in `table_read`; the hypervisor lock serialises writers.
    unsafe { core::ptr::write_volatile((phys_to_virt(table) as *mut u64).add(index & 511), value) }
}

fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

/// One domain's page tables.
pub struct DomainAddressSpace {
    root: u64,
    /// Every table frame below the root (physical addresses).
    tables: Vec<u64>,
}

impl DomainAddressSpace {
    fn leaf_flags(perms: PagePerms) -> u64 {
        let mut f = flags::PRESENT | flags::USER;
        if perms.contains(PagePerms::WRITE) {
            f |= flags::WRITABLE;
        }
        if !perms.contains(PagePerms::EXEC) {
            f |= flags::NO_EXECUTE;
        }
        if perms.contains(PagePerms::UNCACHED) {
            f |= flags::CACHE_DISABLE | flags::WRITE_THROUGH;
        }
        f
    }

    /// The level-1 table for `va`, creating tables from `src` when `src` is given.
    fn l1_for(&mut self, va: u64, mut src: Option<&mut dyn FrameSource>) -> Result<u64, MapError> {
        let mut table = self.root;
        let mut created: Vec<(u64, usize, u64)> = Vec::new();
        for level in (2..=4).rev() {
            let i = index(va, level);
            let e = table_read(table, i);
            if e & flags::PRESENT != 0 {
                table = e & ADDR_MASK;
                continue;
            }
            let Some(s) = src.as_deref_mut() else {
                return Err(MapError::BadAddress);
            };
            let Some(f) = s.alloc_frame() else {
                // Undo the tables made for this call so a refused map leaves nothing. They
                // were linked in, so another CPU running this address space may have cached
                // them (paging-structure caches): shoot down before they are freed.
                for &(parent, pi, _) in created.iter().rev() {
                    table_write(parent, pi, 0);
                }
                if !created.is_empty() {
                    shootdown(self.root, va);
                }
                for (_, _, t) in created {
                    self.tables.retain(|&x| x != t);
                    s.free_frame(Mfn(t >> 12));
                }
                return Err(MapError::OutOfFrames);
            };
            let t = f.0 << 12;
            if t >= DIRECT_MAP_LIMIT {
                // Never linked in, so no CPU can have cached it.
                s.free_frame(f);
                return Err(MapError::OutOfFrames);
            }
            // SAFETY: a fresh frame from the pool, direct-mapped, owned by this table.
            unsafe { core::ptr::write_bytes(phys_to_virt(t) as *mut u8, 0, PAGE_SIZE as usize) };
            table_write(table, i, t | flags::PRESENT | flags::WRITABLE | flags::USER);
            self.tables.push(t);
            created.push((table, i, t));
            table = t;
        }
        Ok(table)
    }
}

impl AddressSpace for DomainAddressSpace {
    fn map(
        &mut self,
        va: u64,
        frame: Mfn,
        perms: PagePerms,
        tables: &mut dyn FrameSource,
    ) -> Result<(), MapError> {
        if !va.is_multiple_of(PAGE_SIZE) || va >= DOMAIN_VA_END {
            return Err(MapError::BadAddress);
        }
        let phys = frame.0.checked_mul(PAGE_SIZE).ok_or(MapError::BadAddress)?;
        if phys >= DIRECT_MAP_LIMIT || phys & !ADDR_MASK != 0 {
            return Err(MapError::BadAddress);
        }
        if self.translate(va).is_some() {
            return Err(MapError::AlreadyMapped);
        }
        let l1 = self.l1_for(va, Some(tables))?;
        table_write(l1, index(va, 1), phys | Self::leaf_flags(perms));
        Ok(())
    }

    fn unmap(&mut self, va: u64) -> Option<Mfn> {
        if va >= DOMAIN_VA_END {
            return None;
        }
        let va = va & !(PAGE_SIZE - 1);
        let l1 = self.l1_for(va, None).ok()?;
        let i = index(va, 1);
        let e = table_read(l1, i);
        if e & flags::PRESENT == 0 {
            return None;
        }
        table_write(l1, i, 0);
        // Synchronous: once this returns the caller may free the frame.
        shootdown(self.root, va);
        Some(Mfn((e & ADDR_MASK) >> 12))
    }

    fn translate(&self, va: u64) -> Option<(Mfn, PagePerms)> {
        if va >= DOMAIN_VA_END {
            return None;
        }
        let mut table = self.root;
        for level in (1..=4).rev() {
            let e = table_read(table, index(va, level));
            if e & flags::PRESENT == 0 || (level > 1 && e & flags::HUGE != 0) {
                return None;
            }
            if level == 1 {
                let mut p = PagePerms::empty();
                if e & flags::USER != 0 {
                    p |= PagePerms::USER;
                }
                if e & flags::WRITABLE != 0 {
                    p |= PagePerms::WRITE;
                }
                if e & flags::NO_EXECUTE == 0 {
                    p |= PagePerms::EXEC;
                }
                if e & flags::CACHE_DISABLE != 0 {
                    p |= PagePerms::UNCACHED;
                }
                return Some((Mfn((e & ADDR_MASK) >> 12), p));
            }
            table = e & ADDR_MASK;
        }
        None
    }

    fn root(&self) -> Mfn {
        Mfn(self.root >> 12)
    }

    fn release(&mut self, tables: &mut dyn FrameSource) {
        for t in core::mem::take(&mut self.tables) {
            tables.free_frame(Mfn(t >> 12));
        }
        if self.root != 0 {
            tables.free_frame(Mfn(self.root >> 12));
            self.root = 0;
        }
    }
}

/// Makes domain address spaces: a fresh root with the hypervisor's upper half.
#[derive(Debug, Default)]
pub struct Factory;

impl AddressSpaceFactory for Factory {
    fn create(&mut self, tables: &mut dyn FrameSource) -> Result<Box<dyn AddressSpace>, MapError> {
        let kernel = memory::kernel_cr3() & ADDR_MASK;
        if kernel == 0 {
            return Err(MapError::OutOfFrames);
        }
        let f = tables.alloc_frame().ok_or(MapError::OutOfFrames)?;
        let root = f.0 << 12;
        if root >= DIRECT_MAP_LIMIT {
            tables.free_frame(f);
            return Err(MapError::OutOfFrames);
        }
        // SAFETY: a fresh direct-mapped frame owned by the new address space.
        unsafe { core::ptr::write_bytes(phys_to_virt(root) as *mut u8, 0, PAGE_SIZE as usize) };
        for i in 256..512 {
            table_write(root, i, table_read(kernel, i));
        }
        Ok(Box::new(DomainAddressSpace {
            root,
            tables: Vec::new(),
        }))
    }
}
