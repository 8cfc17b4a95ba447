//! The event loop: wait in the hypervisor until there is work, then run the handlers of the
//! event channels that fired and the timers that are due.
//!
//! Pending ports are taken from `shared_info.evtchn_pending` with an atomic swap per word, so
//! a port that fires again while its handler runs is seen on the next round, never lost.
//!
//! Before each scan the domain clears vCPU 0's `evtchn_upcall_pending` and takes its
//! `evtchn_pending_sel` (as a Xen guest's upcall handler does): the hypervisor raises the
//! upcall, and wakes a blocked vCPU, only when it sets a selector bit that was clear, so an
//! event arriving after the scan makes the next `SCHEDOP_block` return at once.
//!
//! [`Waiter`] is for code that waits for particular ports in sequence (ping-pong, rings): it
//! keeps every port it took but was not asked about, so none is lost between waits.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use shared_abi::errno::XenError;

use crate::{hypercall, time};

/// Take every pending, unmasked port from 2-level event words (`pending[i]`, `mask[i]`),
/// clearing the taken bits; calls `f(port)` in port order.
pub fn take_pending(pending: &[AtomicU64], mask: &[AtomicU64], mut f: impl FnMut(u32)) {
    for (i, (p, m)) in pending.iter().zip(mask).enumerate() {
        let m = m.load(Ordering::Relaxed);
        let mut bits = p.fetch_and(m, Ordering::AcqRel) & !m;
        while bits != 0 {
            let b = bits.trailing_zeros();
            bits &= bits - 1;
            f((i as u32) * 64 + b);
        }
    }
}

/// What a handler may ask of the loop.
#[derive(Default)]
pub struct Control {
    stop: bool,
}

impl Control {
    /// Leave [`EventLoop::run`] after this round.
    pub fn stop(&mut self) {
        self.stop = true;
    }
}

type Handler<'a> = Box<dyn FnMut(&mut Control) + 'a>;

/// Handlers per event-channel port and one-shot timers.
#[derive(Default)]
pub struct EventLoop<'a> {
    ports: Vec<(u32, Handler<'a>)>,
    timers: Vec<(u64, Handler<'a>)>,
}

impl<'a> EventLoop<'a> {
    pub fn new() -> Self {
        EventLoop {
            ports: Vec::new(),
            timers: Vec::new(),
        }
    }

    /// Run `h` whenever `port` fires.
    pub fn on_event(&mut self, port: u32, h: impl FnMut(&mut Control) + 'a) {
        self.ports.push((port, Box::new(h)));
    }

    /// Run `h` once at system time `deadline_ns`.
    pub fn at(&mut self, deadline_ns: u64, h: impl FnMut(&mut Control) + 'a) {
        self.timers.push((deadline_ns, Box::new(h)));
    }

    /// The earliest timer.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.iter().map(|t| t.0).min()
    }

    /// One round: dispatch `fired` ports and the timers due at `now`. Returns whether a
    /// handler asked to stop.
    pub fn dispatch(&mut self, fired: &[u32], now: u64) -> bool {
        let mut c = Control::default();
        for &p in fired {
            for (port, h) in self.ports.iter_mut() {
                if *port == p {
                    h(&mut c);
                }
            }
        }
        let mut i = 0;
        while i < self.timers.len() {
            if self.timers[i].0 <= now {
                let (_, mut h) = self.timers.swap_remove(i);
                h(&mut c);
            } else {
                i += 1;
            }
        }
        c.stop
    }

    /// Loop until a handler stops it, blocking in the hypervisor when idle (no busy wait).
    pub fn run(&mut self) -> Result<(), XenError> {
        loop {
            let mut fired = Vec::new();
            events::take(|p| fired.push(p));
            if self.dispatch(&fired, time::now_ns()) {
                return Ok(());
            }
            if self.ports.is_empty() && self.timers.is_empty() {
                return Ok(());
            }
            match self.next_deadline() {
                Some(d) if d <= time::now_ns() => continue,
                Some(d) => hypercall::set_timer(0, d)?,
                None => hypercall::stop_timer(0)?,
            }
            hypercall::sched_block()?;
        }
    }
}

/// Ports taken from `shared_info` and not yet consumed, for waiting on particular ports.
#[derive(Clone, Debug)]
pub struct Waiter {
    bits: [u64; 64],
}

impl Default for Waiter {
    fn default() -> Self {
        Waiter { bits: [0; 64] }
    }
}

impl Waiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take every pending port from `shared_info` into this waiter.
    pub fn collect(&mut self) {
        let bits = &mut self.bits;
        events::take(|p| {
            if let Some(w) = bits.get_mut(p as usize / 64) {
                *w |= 1 << (p % 64);
            }
        });
    }

    /// Record `port` as fired (for callers that learn of events another way, and tests).
    pub fn note(&mut self, port: u32) {
        if let Some(w) = self.bits.get_mut(port as usize / 64) {
            *w |= 1 << (port % 64);
        }
    }

    /// Consume `port` if it fired.
    pub fn take(&mut self, port: u32) -> bool {
        match self.bits.get_mut(port as usize / 64) {
            Some(w) if *w & (1 << (port % 64)) != 0 => {
                *w &= !(1 << (port % 64));
                true
            }
            _ => false,
        }
    }

    /// Block until `port` fires (consuming it).
    pub fn wait(&mut self, port: u32) -> Result<(), XenError> {
        loop {
            self.collect();
            if self.take(port) {
                return Ok(());
            }
            hypercall::sched_block()?;
        }
    }

    /// Block until `port` fires or system time `deadline_ns`: whether it fired.
    pub fn wait_until(&mut self, port: u32, deadline_ns: u64) -> Result<bool, XenError> {
        loop {
            self.collect();
            if self.take(port) {
                return Ok(true);
            }
            if time::now_ns() >= deadline_ns {
                return Ok(false);
            }
            hypercall::set_timer(0, deadline_ns)?;
            hypercall::sched_block()?;
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod events {
    use super::*;
    use shared_abi::start_info::SHARED_INFO_VA;

    fn words(off: u64) -> &'static [AtomicU64] {
        // SAFETY: shared_info is mapped RW at SHARED_INFO_VA for the domain's life; the
        // 64-word pending (0x800) and mask (0xA00) arrays are 8-byte aligned and only ever
        // accessed atomically by the domain and the hypervisor.
        unsafe { core::slice::from_raw_parts((SHARED_INFO_VA + off) as *const AtomicU64, 64) }
    }

    pub fn take(f: impl FnMut(u32)) {
        // Keep upcalls masked (vcpu_info[0].evtchn_upcall_mask): Bulkhead domains poll the
        // bitmap here instead of taking callbacks; SCHEDOP_block unmasks while waiting.
        // SAFETY: byte 1 of vcpu_info[0] in the mapped shared_info page.
        unsafe { core::ptr::write_volatile((SHARED_INFO_VA + 1) as *mut u8, 1) };
        // SAFETY: byte 0, evtchn_upcall_pending: cleared before scanning so an event that
        // arrives during the scan makes the next block return at once.
        unsafe { core::ptr::write_volatile(SHARED_INFO_VA as *mut u8, 0) };
        // SAFETY: vcpu_info[0].evtchn_pending_sel, the 8-aligned word at offset 8, accessed
        // atomically by the domain and the hypervisor. Taken so the next event sets a clear
        // selector bit again (and so raises the upcall that wakes us).
        let sel = unsafe { &*((SHARED_INFO_VA + 8) as *const AtomicU64) };
        sel.swap(0, Ordering::AcqRel);
        take_pending(words(0x800), words(0xA00), f);
    }

    pub fn clear_pending(port: u32) {
        if let Some(w) = words(0x800).get(port as usize / 64) {
            w.fetch_and(!(1u64 << (port % 64)), Ordering::AcqRel);
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
mod events {
    /// Host stand-in: no event channels.
    pub fn take(_f: impl FnMut(u32)) {}

    pub fn clear_pending(_port: u32) {}
}

/// Clear `port`'s pending bit in shared_info, leaving every other port's alone: for loops
/// that poll their own ports (`SCHEDOP_poll`) and then serve everything.
pub fn clear_pending(port: u32) {
    events::clear_pending(port);
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    #[test]
    fn pending_unmasked_ports_are_taken_once_and_masked_ones_stay() {
        let pending: Vec<AtomicU64> = (0..64).map(|_| AtomicU64::new(0)).collect();
        let mask: Vec<AtomicU64> = (0..64).map(|_| AtomicU64::new(0)).collect();
        pending[0].store(0b1010, Ordering::Relaxed);
        pending[1].store(1, Ordering::Relaxed);
        mask[0].store(0b1000, Ordering::Relaxed);
        let mut got = Vec::new();
        take_pending(&pending, &mask, |p| got.push(p));
        assert_eq!(got, [1, 64]);
        assert_eq!(pending[0].load(Ordering::Relaxed), 0b1000);
        got.clear();
        take_pending(&pending, &mask, |p| got.push(p));
        assert!(got.is_empty());
    }

    #[test]
    fn waiter_keeps_ports_it_was_not_asked_about() {
        let mut w = Waiter::new();
        w.note(3);
        w.note(200);
        assert!(!w.take(4));
        assert!(w.take(200));
        assert!(!w.take(200));
        assert!(w.take(3));
        w.note(5000);
        assert!(!w.take(5000));
    }

    #[test]
    fn dispatch_runs_port_handlers_and_due_timers_only() {
        let hits = Cell::new(0);
        let timer = Cell::new(false);
        let mut l = EventLoop::new();
        l.on_event(5, |_| hits.set(hits.get() + 1));
        l.at(100, |c| {
            timer.set(true);
            c.stop();
        });
        assert!(!l.dispatch(&[5, 6], 50));
        assert_eq!(hits.get(), 1);
        assert!(!timer.get());
        assert_eq!(l.next_deadline(), Some(100));
        assert!(l.dispatch(&[], 100));
        assert!(timer.get());
        assert_eq!(l.next_deadline(), None);
    }
}
