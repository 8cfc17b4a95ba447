//! The hypervisor's side of the memory domains share: the `shared_info` event words
//! ([`EventPage`]), grant-table frames ([`GrantFrames`]), the reference counts that keep a
//! granted frame alive while another domain maps it ([`FrameRefs`]), and the
//! [`GrantMemory`] / registry implementations the portable `evtchn` and `gnttab` code runs on.
//!
//! Invariants:
//! - An [`EventPage`] or [`GrantFrames`] view of a frame lives inside the owning domain's
//!   `evtchn` / `grants` state, which the domain code drops before it frees the frame (see
//!   `Hypervisor::destroy_domain` and `reap`).
//! - A frame with a non-zero count in [`FrameRefs`] is never returned to the pool: when its
//!   domain gives it up (death, `decrease_reservation`) it becomes an *orphan*, and goes back to
//!   the pool when the last reference is dropped ([`FrameRefs::take_freeable`]).
//!
//! Lock order: the whole hypervisor is under one lock; inside it, at most one domain's
//! `evtchn` or `grants` mutex at a time except `evtchn::lock_pair` (lower domid first), and
//! the [`FrameRefs`] mutex is taken last and never held across another lock.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::mem::offset_of;
use core::sync::atomic::Ordering;

use shared_abi::DomId;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::GrantRef;
use shared_abi::shared_info::{EVTCHN_2L_NR_CHANNELS, LEGACY_MAX_VCPUS, SharedInfo, VcpuInfo};
use spin::Mutex;

use super::DomainTable;
use super::memory::{AtomicFrame, Mfn, PAGE_SIZE, PhysMem};
use crate::evtchn::{DomainEvtchn, EventWords, EvtchnRegistry, VcpuId};
use crate::gnttab::{self, DomainGrants, GrantEntries, GrantMemory, GrantRegistry};

const PENDING_W: usize = offset_of!(SharedInfo, evtchn_pending) / 8;
const MASK_W: usize = offset_of!(SharedInfo, evtchn_mask) / 8;
const VCPU_INFO_W: usize = core::mem::size_of::<VcpuInfo>() / 8;
const SEL_W: usize = offset_of!(VcpuInfo, evtchn_pending_sel) / 8;
// evtchn_upcall_pending is byte 0 of vcpu_info: bit 0 of its first little-endian word.
const UPCALL_W: usize = offset_of!(VcpuInfo, evtchn_upcall_pending) / 8;

/// A domain's real `shared_info` page as [`EventWords`] (the layout of
/// `evtchn::SharedInfoPage`, over the hypervisor's atomic view of the frame).
pub struct EventPage(&'static AtomicFrame);

impl EventPage {
    pub fn new(words: &'static AtomicFrame) -> Self {
        EventPage(words)
    }

    fn port_bit(port: EvtchnPort) -> Option<(usize, u64)> {
        ((port as usize) < EVTCHN_2L_NR_CHANNELS).then(|| (port as usize / 64, 1u64 << (port % 64)))
    }

    fn vcpu_word(&self, vcpu: VcpuId, w: usize) -> Option<&core::sync::atomic::AtomicU64> {
        if vcpu as usize >= LEGACY_MAX_VCPUS {
            return None;
        }
        self.0.get(vcpu as usize * VCPU_INFO_W + w)
    }
}

impl EventWords for EventPage {
    fn test_and_set_pending(&self, port: EvtchnPort) -> bool {
        Self::port_bit(port)
            .is_none_or(|(w, b)| self.0[PENDING_W + w].fetch_or(b, Ordering::SeqCst) & b != 0)
    }
    fn test_pending(&self, port: EvtchnPort) -> bool {
        Self::port_bit(port)
            .is_some_and(|(w, b)| self.0[PENDING_W + w].load(Ordering::SeqCst) & b != 0)
    }
    fn clear_pending(&self, port: EvtchnPort) {
        if let Some((w, b)) = Self::port_bit(port) {
            self.0[PENDING_W + w].fetch_and(!b, Ordering::SeqCst);
        }
    }
    fn test_mask(&self, port: EvtchnPort) -> bool {
        Self::port_bit(port).is_none_or(|(w, b)| self.0[MASK_W + w].load(Ordering::SeqCst) & b != 0)
    }
    fn test_and_clear_mask(&self, port: EvtchnPort) -> bool {
        Self::port_bit(port)
            .is_some_and(|(w, b)| self.0[MASK_W + w].fetch_and(!b, Ordering::SeqCst) & b != 0)
    }
    fn test_and_set_selector(&self, vcpu: VcpuId, word: u32) -> bool {
        if word >= 64 {
            return true;
        }
        let b = 1u64 << word;
        self.vcpu_word(vcpu, SEL_W)
            .is_none_or(|w| w.fetch_or(b, Ordering::SeqCst) & b != 0)
    }
    fn test_and_set_upcall_pending(&self, vcpu: VcpuId) -> bool {
        self.vcpu_word(vcpu, UPCALL_W)
            .is_none_or(|w| w.fetch_or(1, Ordering::SeqCst) & 1 != 0)
    }
}

/// Attempts at the 64-bit compare-exchange that updates an entry's header while the guest
/// keeps rewriting the entry's frame half (each failure of that kind is retried; the header
/// check itself is the caller's, with its own bound).
const HEADER_CAS_RETRIES: usize = 16;

/// A domain's v1 grant entries in its grant-table frames (8 bytes each: the header word
/// `flags | domid << 16`, then the frame), as [`GrantEntries`].
pub struct GrantFrames {
    frames: Vec<&'static AtomicFrame>,
}

impl GrantFrames {
    pub fn new(frames: Vec<&'static AtomicFrame>) -> Self {
        GrantFrames { frames }
    }

    fn entry(&self, gref: GrantRef) -> Option<&core::sync::atomic::AtomicU64> {
        let per = (PAGE_SIZE / 8) as usize;
        self.frames
            .get(gref as usize / per)
            .and_then(|f| f.get(gref as usize % per))
    }
}

impl GrantEntries for GrantFrames {
    fn nr_entries(&self) -> u32 {
        (self.frames.len() * (PAGE_SIZE as usize / 8)) as u32
    }
    fn load_header(&self, gref: GrantRef) -> u32 {
        self.entry(gref)
            .map_or(0, |e| e.load(Ordering::SeqCst) as u32)
    }
    fn compare_exchange_header(&self, gref: GrantRef, current: u32, new: u32) -> Result<u32, u32> {
        let Some(e) = self.entry(gref) else {
            return Err(0);
        };
        let mut word = e.load(Ordering::SeqCst);
        for _ in 0..HEADER_CAS_RETRIES {
            if word as u32 != current {
                return Err(word as u32);
            }
            let want = (word & !0xFFFF_FFFF) | u64::from(new);
            match e.compare_exchange(word, want, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(current),
                Err(actual) => word = actual,
            }
        }
        Err(word as u32)
    }
    fn clear_flags(&self, gref: GrantRef, bits: u16) {
        if let Some(e) = self.entry(gref) {
            e.fetch_and(!u64::from(bits), Ordering::SeqCst);
        }
    }
    fn load_frame(&self, gref: GrantRef) -> u32 {
        self.entry(gref)
            .map_or(0, |e| (e.load(Ordering::SeqCst) >> 32) as u32)
    }
}

/// References on frames held by grant mappings and copies in progress, and the frames their
/// owners gave up while referenced.
#[derive(Debug, Default)]
pub struct FrameRefs {
    refs: BTreeMap<Mfn, u32>,
    orphans: BTreeSet<Mfn>,
    freeable: Vec<Mfn>,
}

impl FrameRefs {
    pub fn refs(&self, frame: Mfn) -> u32 {
        self.refs.get(&frame).copied().unwrap_or(0)
    }

    /// Frames given up by their owner that something still references.
    pub fn orphans(&self) -> usize {
        self.orphans.len()
    }

    fn pin(&mut self, frame: Mfn) -> bool {
        if self.orphans.contains(&frame) {
            // Given up by its owner: no new references (only live domains' pages are looked
            // up, so this is a belt-and-braces check).
            return false;
        }
        *self.refs.entry(frame).or_insert(0) += 1;
        true
    }

    fn unpin(&mut self, frame: Mfn) {
        let Some(n) = self.refs.get_mut(&frame) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&frame);
            if self.orphans.remove(&frame) {
                self.freeable.push(frame);
            }
        }
    }

    /// The owner gives `frame` up: true if it may be freed now; false if it is referenced and
    /// became an orphan (it is freed when the last reference goes).
    pub fn release(&mut self, frame: Mfn) -> bool {
        if self.refs.contains_key(&frame) {
            self.orphans.insert(frame);
            false
        } else {
            true
        }
    }

    /// Orphans whose last reference went since the last call: the caller frees them.
    pub fn take_freeable(&mut self) -> Vec<Mfn> {
        core::mem::take(&mut self.freeable)
    }
}

/// [`GrantMemory`] over the domain table: a domain's GFN is its page number (`va >> 12`) of a
/// page it holds; references go to [`FrameRefs`]; copies go through [`PhysMem`].
pub struct HvGrantMemory<'a> {
    pub domains: &'a DomainTable,
    pub refs: &'a Mutex<FrameRefs>,
    pub phys: &'a dyn PhysMem,
}

impl GrantMemory for HvGrantMemory<'_> {
    fn frame_of(&self, dom: DomId, gfn: u64) -> Option<gnttab::Mfn> {
        let d = self.domains.get(dom)?;
        if !d.state().is_alive() {
            return None;
        }
        let va = gfn.checked_mul(PAGE_SIZE)?;
        d.pages.get(&va).map(|m| m.0)
    }
    fn pin(&self, frame: gnttab::Mfn) -> bool {
        self.refs.lock().pin(Mfn(frame))
    }
    fn unpin(&self, frame: gnttab::Mfn) {
        self.refs.lock().unpin(Mfn(frame))
    }
    fn copy(
        &self,
        src: gnttab::Mfn,
        src_off: usize,
        dst: gnttab::Mfn,
        dst_off: usize,
        len: usize,
    ) -> bool {
        let page = PAGE_SIZE as usize;
        if src_off.checked_add(len).is_none_or(|e| e > page)
            || dst_off.checked_add(len).is_none_or(|e| e > page)
        {
            return false;
        }
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.phys.read(Mfn(src), src_off, &mut buf[..len]);
        self.phys.write(Mfn(dst), dst_off, &buf[..len]);
        true
    }
}

impl EvtchnRegistry for DomainTable {
    type Words = EventPage;
    fn evtchn(&self, dom: DomId) -> Option<&Mutex<DomainEvtchn<EventPage>>> {
        self.get(dom)?.evtchn.as_ref()
    }
}

impl GrantRegistry for DomainTable {
    type Entries = GrantFrames;
    fn grants(&self, dom: DomId) -> Option<&Mutex<DomainGrants<GrantFrames>>> {
        self.get(dom)?.grants.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evtchn::delivery;
    use alloc::boxed::Box;
    use core::sync::atomic::AtomicU64;

    fn page() -> &'static AtomicFrame {
        Box::leak(Box::new(core::array::from_fn(|_| AtomicU64::new(0))))
    }

    #[test]
    fn event_page_sets_xen_offsets_like_the_reference_page() {
        let p = page();
        let ev = EventPage::new(p);
        let reference = crate::evtchn::SharedInfoPage::new_boxed();
        for (port, vcpu) in [(70u32, 1u32), (71, 1), (3, 0), (4095, 31)] {
            assert_eq!(
                delivery::set_pending(&ev, port, vcpu),
                delivery::set_pending(&*reference, port, vcpu)
            );
        }
        for off in (0..4096).step_by(8) {
            assert_eq!(
                Some(p[off / 8].load(Ordering::SeqCst)),
                reference.read_u64(off),
                "word at {off:#x}"
            );
        }
        assert_eq!(delivery::set_pending(&ev, 4096, 0), Default::default());
    }

    #[test]
    fn grant_frames_header_cas_keeps_the_frame_half() {
        let (a, b) = (page(), page());
        let g = GrantFrames::new(alloc::vec![a, b]);
        assert_eq!(g.nr_entries(), 1024);
        // ref 600 lives in frame 1, word 88.
        b[88].store((0x1234u64 << 32) | (5 << 16) | 1, Ordering::SeqCst);
        assert_eq!(g.load_header(600), (5 << 16) | 1);
        assert_eq!(g.load_frame(600), 0x1234);
        assert_eq!(g.compare_exchange_header(600, 7, 9), Err((5 << 16) | 1));
        assert_eq!(
            g.compare_exchange_header(600, (5 << 16) | 1, (5 << 16) | 9),
            Ok((5 << 16) | 1)
        );
        g.clear_flags(600, 8);
        assert_eq!(
            b[88].load(Ordering::SeqCst),
            (0x1234u64 << 32) | (5 << 16) | 1
        );
        assert_eq!(g.load_header(1024), 0);
        assert_eq!(g.compare_exchange_header(5000, 0, 1), Err(0));
    }

    #[test]
    fn referenced_frame_is_orphaned_then_freed_on_last_unpin() {
        let mut r = FrameRefs::default();
        assert!(r.pin(Mfn(7)));
        assert!(r.pin(Mfn(7)));
        assert!(!r.release(Mfn(7)));
        assert_eq!(r.orphans(), 1);
        assert!(!r.pin(Mfn(7)), "no new references to an orphan");
        r.unpin(Mfn(7));
        assert!(r.take_freeable().is_empty());
        r.unpin(Mfn(7));
        assert_eq!(r.take_freeable(), alloc::vec![Mfn(7)]);
        assert_eq!(r.orphans(), 0);
        assert!(r.release(Mfn(8)), "unreferenced frames are freed at once");
    }
}
