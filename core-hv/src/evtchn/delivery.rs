//! 2-level event delivery into a domain's `shared_info` (XEN-ABI.md §2.3, Xen's `event_2l.c`).
//!
//! Owns the bit protocol only: which bits are test-and-set in which order, and when a vCPU
//! needs a kick. The memory is behind [`EventWords`], so the hypervisor plugs in the domain's
//! real `shared_info` page and tests use an in-memory [`SharedInfoPage`] with the same layout.
//! Every access is atomic: the guest changes these words concurrently (it clears pending and
//! selector bits, sets and clears mask bits).

use core::sync::atomic::{AtomicU64, Ordering};

use shared_abi::event_channel::EvtchnPort;
use shared_abi::shared_info::{EVTCHN_2L_NR_CHANNELS, LEGACY_MAX_VCPUS, SharedInfo, VcpuInfo};

use super::port::VcpuId;

/// Atomic access to the 2-level event words of one domain. Ports are < 4096 and vCPUs < 32
/// (callers validate); implementations ignore out-of-range arguments (reporting "was set").
pub trait EventWords {
    /// Set port's pending bit; true if it was already set.
    fn test_and_set_pending(&self, port: EvtchnPort) -> bool;
    fn test_pending(&self, port: EvtchnPort) -> bool;
    fn clear_pending(&self, port: EvtchnPort);
    fn test_mask(&self, port: EvtchnPort) -> bool;
    /// Clear port's mask bit; true if it was set.
    fn test_and_clear_mask(&self, port: EvtchnPort) -> bool;
    /// Set bit `word` of `vcpu`'s `evtchn_pending_sel`; true if it was already set.
    fn test_and_set_selector(&self, vcpu: VcpuId, word: u32) -> bool;
    /// Set `vcpu`'s `evtchn_upcall_pending`; true if it was already set.
    fn test_and_set_upcall_pending(&self, vcpu: VcpuId) -> bool;
}

impl<T: EventWords + ?Sized> EventWords for &T {
    fn test_and_set_pending(&self, port: EvtchnPort) -> bool {
        (**self).test_and_set_pending(port)
    }
    fn test_pending(&self, port: EvtchnPort) -> bool {
        (**self).test_pending(port)
    }
    fn clear_pending(&self, port: EvtchnPort) {
        (**self).clear_pending(port)
    }
    fn test_mask(&self, port: EvtchnPort) -> bool {
        (**self).test_mask(port)
    }
    fn test_and_clear_mask(&self, port: EvtchnPort) -> bool {
        (**self).test_and_clear_mask(port)
    }
    fn test_and_set_selector(&self, vcpu: VcpuId, word: u32) -> bool {
        (**self).test_and_set_selector(vcpu, word)
    }
    fn test_and_set_upcall_pending(&self, vcpu: VcpuId) -> bool {
        (**self).test_and_set_upcall_pending(vcpu)
    }
}

impl<T: EventWords + ?Sized> EventWords for alloc::sync::Arc<T> {
    fn test_and_set_pending(&self, port: EvtchnPort) -> bool {
        (**self).test_and_set_pending(port)
    }
    fn test_pending(&self, port: EvtchnPort) -> bool {
        (**self).test_pending(port)
    }
    fn clear_pending(&self, port: EvtchnPort) {
        (**self).clear_pending(port)
    }
    fn test_mask(&self, port: EvtchnPort) -> bool {
        (**self).test_mask(port)
    }
    fn test_and_clear_mask(&self, port: EvtchnPort) -> bool {
        (**self).test_and_clear_mask(port)
    }
    fn test_and_set_selector(&self, vcpu: VcpuId, word: u32) -> bool {
        (**self).test_and_set_selector(vcpu, word)
    }
    fn test_and_set_upcall_pending(&self, vcpu: VcpuId) -> bool {
        (**self).test_and_set_upcall_pending(vcpu)
    }
}

/// What raising an event did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// The pending bit went from 0 to 1 (wake vCPUs polling this port, even if masked).
    pub newly_pending: bool,
    /// This vCPU's `evtchn_upcall_pending` went from 0 to 1: kick/wake it to take the upcall.
    pub kick: Option<VcpuId>,
}

/// Mark port pending for `vcpu` (`evtchn_2l_set_pending`).
pub fn set_pending<W: EventWords + ?Sized>(w: &W, port: EvtchnPort, vcpu: VcpuId) -> Delivery {
    if w.test_and_set_pending(port) {
        return Delivery::default();
    }
    let kick = if !w.test_mask(port) && !w.test_and_set_selector(vcpu, port / 64) {
        mark_events_pending(w, vcpu)
    } else {
        None
    };
    Delivery {
        newly_pending: true,
        kick,
    }
}

/// Unmask port (`evtchn_2l_unmask`): if it was masked and is pending, deliver it to `vcpu`
/// now. Returns the vCPU to kick, if any.
pub fn unmask<W: EventWords + ?Sized>(w: &W, port: EvtchnPort, vcpu: VcpuId) -> Option<VcpuId> {
    if w.test_and_clear_mask(port)
        && w.test_pending(port)
        && !w.test_and_set_selector(vcpu, port / 64)
    {
        mark_events_pending(w, vcpu)
    } else {
        None
    }
}

fn mark_events_pending<W: EventWords + ?Sized>(w: &W, vcpu: VcpuId) -> Option<VcpuId> {
    (!w.test_and_set_upcall_pending(vcpu)).then_some(vcpu)
}

const WORDS: usize = shared_abi::PAGE_SIZE / 8;
const PENDING_W: usize = core::mem::offset_of!(SharedInfo, evtchn_pending) / 8;
const MASK_W: usize = core::mem::offset_of!(SharedInfo, evtchn_mask) / 8;
const VCPU_INFO_W: usize = core::mem::size_of::<VcpuInfo>() / 8;
const SEL_W: usize = core::mem::offset_of!(VcpuInfo, evtchn_pending_sel) / 8;
// evtchn_upcall_pending is byte 0 of vcpu_info: bit 0 of its first (little-endian) word.
const UPCALL_W: usize = core::mem::offset_of!(VcpuInfo, evtchn_upcall_pending) / 8;

/// A `shared_info` page as 512 atomic words, with the ABI layout (`SharedInfo`). The
/// hypervisor can view a domain's real page as this type; tests own one.
#[repr(C, align(4096))]
pub struct SharedInfoPage {
    words: [AtomicU64; WORDS],
}

impl core::fmt::Debug for SharedInfoPage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedInfoPage").finish_non_exhaustive()
    }
}

impl Default for SharedInfoPage {
    fn default() -> Self {
        SharedInfoPage {
            words: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn bit(port: EvtchnPort) -> Option<(usize, u64)> {
    ((port as usize) < EVTCHN_2L_NR_CHANNELS).then(|| (port as usize / 64, 1u64 << (port % 64)))
}

impl SharedInfoPage {
    /// A zeroed page on the heap.
    pub fn new_boxed() -> alloc::boxed::Box<Self> {
        alloc::boxed::Box::default()
    }

    /// The 64-bit word at byte `offset` (8-aligned), to inspect the page as the guest sees it.
    pub fn read_u64(&self, offset: usize) -> Option<u64> {
        if !offset.is_multiple_of(8) {
            return None;
        }
        Some(self.words.get(offset / 8)?.load(Ordering::SeqCst))
    }

    fn vcpu_word(&self, vcpu: VcpuId, w: usize) -> Option<&AtomicU64> {
        if vcpu as usize >= LEGACY_MAX_VCPUS {
            return None;
        }
        self.words.get(vcpu as usize * VCPU_INFO_W + w)
    }

    // Guest-side operations, as a guest kernel performs them (used by tests and by code that
    // simulates a guest).

    /// Guest: set port's mask bit.
    pub fn guest_mask(&self, port: EvtchnPort) {
        if let Some((w, b)) = bit(port) {
            self.words[MASK_W + w].fetch_or(b, Ordering::SeqCst);
        }
    }

    /// Guest: clear `evtchn_upcall_pending`, take the selector, and collect (and clear)
    /// pending, unmasked ports — the upcall handler's scan.
    pub fn guest_take_events(&self, vcpu: VcpuId) -> alloc::vec::Vec<EvtchnPort> {
        let mut out = alloc::vec::Vec::new();
        let (Some(up), Some(sel)) = (self.vcpu_word(vcpu, UPCALL_W), self.vcpu_word(vcpu, SEL_W))
        else {
            return out;
        };
        up.fetch_and(!0xFF, Ordering::SeqCst);
        let mut sel = sel.swap(0, Ordering::SeqCst);
        while sel != 0 {
            let w = sel.trailing_zeros() as usize;
            sel &= sel - 1;
            let ready = self.words[PENDING_W + w].load(Ordering::SeqCst)
                & !self.words[MASK_W + w].load(Ordering::SeqCst);
            self.words[PENDING_W + w].fetch_and(!ready, Ordering::SeqCst);
            let mut r = ready;
            while r != 0 {
                out.push((w * 64) as u32 + r.trailing_zeros());
                r &= r - 1;
            }
        }
        out
    }

    /// Guest: is `evtchn_upcall_pending` set for `vcpu`?
    pub fn upcall_pending(&self, vcpu: VcpuId) -> bool {
        self.vcpu_word(vcpu, UPCALL_W)
            .is_some_and(|w| w.load(Ordering::SeqCst) & 1 != 0)
    }
}

impl EventWords for SharedInfoPage {
    fn test_and_set_pending(&self, port: EvtchnPort) -> bool {
        bit(port)
            .is_none_or(|(w, b)| self.words[PENDING_W + w].fetch_or(b, Ordering::SeqCst) & b != 0)
    }
    fn test_pending(&self, port: EvtchnPort) -> bool {
        bit(port).is_some_and(|(w, b)| self.words[PENDING_W + w].load(Ordering::SeqCst) & b != 0)
    }
    fn clear_pending(&self, port: EvtchnPort) {
        if let Some((w, b)) = bit(port) {
            self.words[PENDING_W + w].fetch_and(!b, Ordering::SeqCst);
        }
    }
    fn test_mask(&self, port: EvtchnPort) -> bool {
        bit(port).is_none_or(|(w, b)| self.words[MASK_W + w].load(Ordering::SeqCst) & b != 0)
    }
    fn test_and_clear_mask(&self, port: EvtchnPort) -> bool {
        bit(port)
            .is_some_and(|(w, b)| self.words[MASK_W + w].fetch_and(!b, Ordering::SeqCst) & b != 0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn set_pending_writes_abi_offsets_and_kicks_once() {
        let page = SharedInfoPage::new_boxed();
        let d = set_pending(&*page, 70, 1);
        assert_eq!(
            d,
            Delivery {
                newly_pending: true,
                kick: Some(1)
            }
        );
        let pend = offset_of!(SharedInfo, evtchn_pending);
        assert_eq!(page.read_u64(pend + 8), Some(1 << 6)); // port 70 = word 1 bit 6
        let vi = offset_of!(SharedInfo, vcpu_info) + 64; // vcpu 1
        assert_eq!(
            page.read_u64(vi + offset_of!(VcpuInfo, evtchn_pending_sel)),
            Some(1 << 1)
        );
        assert_eq!(page.read_u64(vi), Some(1)); // evtchn_upcall_pending byte
        // Already pending: nothing more.
        assert_eq!(set_pending(&*page, 70, 1), Delivery::default());
        // Another port in the same word: pending, but selector and upcall already set.
        assert_eq!(
            set_pending(&*page, 71, 1),
            Delivery {
                newly_pending: true,
                kick: None
            }
        );
    }

    #[test]
    fn masked_port_goes_pending_without_upcall_until_unmask() {
        let page = SharedInfoPage::new_boxed();
        page.guest_mask(5);
        let d = set_pending(&*page, 5, 0);
        assert!(d.newly_pending && d.kick.is_none());
        assert!(!page.upcall_pending(0));
        assert_eq!(unmask(&*page, 5, 0), Some(0));
        assert!(page.upcall_pending(0));
        assert_eq!(page.guest_take_events(0), alloc::vec![5]);
        // Unmasking an unmasked or non-pending port does nothing.
        assert_eq!(unmask(&*page, 5, 0), None);
        page.guest_mask(6);
        assert_eq!(unmask(&*page, 6, 0), None);
    }

    #[test]
    fn guest_scan_acknowledges_and_rearms_delivery() {
        let page = SharedInfoPage::new_boxed();
        assert_eq!(set_pending(&*page, 1, 0).kick, Some(0));
        assert_eq!(set_pending(&*page, 200, 0).kick, None);
        assert_eq!(page.guest_take_events(0), alloc::vec![1, 200]);
        assert!(!page.upcall_pending(0));
        // After the guest's scan, the next event kicks again.
        assert_eq!(set_pending(&*page, 1, 0).kick, Some(0));
    }

    #[test]
    fn out_of_range_arguments_do_nothing() {
        let page = SharedInfoPage::new_boxed();
        assert_eq!(set_pending(&*page, 4096, 0), Delivery::default());
        assert!(page.test_and_set_selector(32, 0));
        assert!(page.test_and_set_upcall_pending(32));
        assert!(page.guest_take_events(40).is_empty());
        assert_eq!(page.read_u64(3), None);
        assert_eq!(page.read_u64(4096), None);
    }
}
