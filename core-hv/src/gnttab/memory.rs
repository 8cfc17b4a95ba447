//! The memory the grant code works on, behind traits: the granting domain's v1 entries
//! ([`GrantEntries`], shared with and concurrently written by that guest) and physical frames
//! ([`GrantMemory`]: translation, reference counts, copies). The hypervisor implements them
//! over real pages; tests use [`InMemoryEntries`] and a fake physical memory.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use shared_abi::DomId;
use shared_abi::grant_table::{GrantRef, gtf};

/// A machine frame number.
pub type Mfn = u64;

/// Atomic access to a domain's grant entries. The first 32-bit word of an entry is
/// `flags | domid << 16` (little-endian `grant_entry_v1`), updated as one word so that the
/// grantee cannot change between the check and the `GTF_reading/writing` update. Callers
/// check `gref < nr_entries()` first; implementations treat other refs as absent.
pub trait GrantEntries {
    fn nr_entries(&self) -> u32;
    /// The header word (`flags | domid << 16`).
    fn load_header(&self, gref: GrantRef) -> u32;
    /// Compare-exchange the header word; `Err(actual)` if it was not `current`.
    fn compare_exchange_header(&self, gref: GrantRef, current: u32, new: u32) -> Result<u32, u32>;
    /// Atomically clear `bits` in the flags.
    fn clear_flags(&self, gref: GrantRef, bits: u16);
    /// The granted frame (GFN of the granter).
    fn load_frame(&self, gref: GrantRef) -> u32;
}

/// Frames: ownership translation, reference counts that keep a frame alive, and copies.
pub trait GrantMemory {
    /// The machine frame behind `dom`'s `gfn`, if `dom` has memory there.
    fn frame_of(&self, dom: DomId, gfn: u64) -> Option<Mfn>;
    /// Take a reference on `frame` (it is not freed until the matching `unpin`); false if
    /// the frame cannot be referenced (freed, not RAM).
    fn pin(&self, frame: Mfn) -> bool;
    /// Drop a reference taken by `pin`.
    fn unpin(&self, frame: Mfn);
    /// Copy `len` bytes between frames (offsets already validated within the page).
    fn copy(&self, src: Mfn, src_off: usize, dst: Mfn, dst_off: usize, len: usize) -> bool;
}

/// Grant entries in ordinary memory, with the guest-side operations a granting kernel
/// performs (for tests and simulations).
#[derive(Debug)]
pub struct InMemoryEntries {
    /// Two words per entry: header, frame.
    words: Vec<AtomicU32>,
}

impl InMemoryEntries {
    /// `nr` zeroed (invalid) entries.
    pub fn new(nr: u32) -> Self {
        InMemoryEntries {
            words: (0..nr as usize * 2).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn header(&self, gref: GrantRef) -> Option<&AtomicU32> {
        self.words.get(gref as usize * 2)
    }

    /// Guest: grant `frame` to `domid` (domid and frame first, then flags, as the ABI asks).
    pub fn grant(&self, gref: GrantRef, domid: DomId, frame: u32, readonly: bool) {
        if let (Some(h), Some(f)) = (self.header(gref), self.words.get(gref as usize * 2 + 1)) {
            f.store(frame, Ordering::SeqCst);
            let flags = gtf::PERMIT_ACCESS | if readonly { gtf::READONLY } else { 0 };
            h.store(u32::from(flags) | u32::from(domid) << 16, Ordering::SeqCst);
        }
    }

    /// Guest: revoke as Linux does — only if neither `GTF_reading` nor `GTF_writing` is set,
    /// by compare-exchange of the flags to 0. False if the grantee still holds it.
    pub fn end_access(&self, gref: GrantRef) -> bool {
        let Some(h) = self.header(gref) else {
            return false;
        };
        let cur = h.load(Ordering::SeqCst);
        if cur as u16 & (gtf::READING | gtf::WRITING) != 0 {
            return false;
        }
        h.compare_exchange(cur, cur & 0xFFFF_0000, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// The current flags.
    pub fn flags(&self, gref: GrantRef) -> u16 {
        self.header(gref)
            .map_or(0, |h| h.load(Ordering::SeqCst) as u16)
    }
}

impl GrantEntries for InMemoryEntries {
    fn nr_entries(&self) -> u32 {
        (self.words.len() / 2) as u32
    }
    fn load_header(&self, gref: GrantRef) -> u32 {
        self.header(gref).map_or(0, |h| h.load(Ordering::SeqCst))
    }
    fn compare_exchange_header(&self, gref: GrantRef, current: u32, new: u32) -> Result<u32, u32> {
        match self.header(gref) {
            Some(h) => h.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst),
            None => Err(0),
        }
    }
    fn clear_flags(&self, gref: GrantRef, bits: u16) {
        if let Some(h) = self.header(gref) {
            h.fetch_and(!u32::from(bits), Ordering::SeqCst);
        }
    }
    fn load_frame(&self, gref: GrantRef) -> u32 {
        self.words
            .get(gref as usize * 2 + 1)
            .map_or(0, |f| f.load(Ordering::SeqCst))
    }
}

impl<T: GrantEntries + ?Sized> GrantEntries for alloc::sync::Arc<T> {
    fn nr_entries(&self) -> u32 {
        (**self).nr_entries()
    }
    fn load_header(&self, gref: GrantRef) -> u32 {
        (**self).load_header(gref)
    }
    fn compare_exchange_header(&self, gref: GrantRef, current: u32, new: u32) -> Result<u32, u32> {
        (**self).compare_exchange_header(gref, current, new)
    }
    fn clear_flags(&self, gref: GrantRef, bits: u16) {
        (**self).clear_flags(gref, bits)
    }
    fn load_frame(&self, gref: GrantRef) -> u32 {
        (**self).load_frame(gref)
    }
}
