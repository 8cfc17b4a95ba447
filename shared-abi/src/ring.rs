//! The generic Xen shared I/O ring (`io/ring.h`): one implementation for every protocol that
//! uses it (blkif, netif tx/rx/ctrl, ...).
//!
//! **Layout** (XEN-ABI.md §4.1): a 64-byte header (`req_prod`, `req_event`, `rsp_prod`,
//! `rsp_event`, `pvt`, padding) and then `nr_ents` slots, each the size of the C
//! `union { request; response; }`. `nr_ents` is the largest power of two that fits; the slot
//! for free-running index `i` is `i & (nr_ents - 1)`; all index arithmetic wraps in `u32`.
//!
//! **Threat model.** The peer is hostile and writes the shared region whenever it likes. So:
//! - every shared word is accessed atomically (relaxed for entries), never through `&T` or a
//!   plain load, and entries are *copied* out of / into the region, never used in place;
//! - every shared index is read once into a local, checked against this side's private indices
//!   and only then used (no double fetch); a producer index outside the possible window is a
//!   [`RingError::BogusRequestProducer`] / [`RingError::BogusResponseProducer`], which the
//!   caller turns into a disconnect;
//! - this side's own notion of what it published (`*_published`) is private, so a peer that
//!   scribbles over our producer index cannot make us skip or repeat work.
//!
//! **Memory ordering.** Producer: entries stored (relaxed), then `prod` stored with `Release`,
//! then a `SeqCst` fence, then the peer's event index loaded. Consumer: `prod` loaded with
//! `Acquire` before any entry is read; the final check stores `event`, `SeqCst` fence, then
//! reloads `prod`. The two fences make the store-buffer pattern safe: either the producer sees
//! the consumer's new event index (and notifies), or the consumer sees the new producer index
//! (and keeps working). `loom` checks this (`tests/loom_ring.rs`, `--cfg loom`).
//!
//! **Ownership.** A [`FrontRing`] and a [`BackRing`] are each used by one thread at a time
//! (`&mut self`); there are no locks. The only `unsafe` is in [`shared_mem`], which turns a
//! raw pointer to a shared page into a [`SharedRingMem`].

use core::fmt;
use core::marker::PhantomData;
use core::mem::{align_of, size_of};

#[cfg(not(loom))]
use core::sync::atomic::{Ordering, fence};
#[cfg(loom)]
use loom::sync::atomic::{Ordering, fence};

pub use shared_mem::SharedRingMem;

/// Bytes of the shared header before the first slot.
pub const HEADER_BYTES: usize = 64;
/// Largest entry (request or response) the ring copies; blkif's 112-byte request is the
/// largest Xen protocol entry.
pub const MAX_ENTRY_BYTES: usize = 512;

/// Byte offsets of the header fields (`struct <name>_sring`).
pub mod header {
    pub const REQ_PROD: usize = 0;
    pub const REQ_EVENT: usize = 4;
    pub const RSP_PROD: usize = 8;
    pub const RSP_EVENT: usize = 12;
    pub const PVT: usize = 16;
}

const HEADER_WORDS: usize = HEADER_BYTES / 4;
const REQ_PROD_W: usize = header::REQ_PROD / 4;
const REQ_EVENT_W: usize = header::REQ_EVENT / 4;
const RSP_PROD_W: usize = header::RSP_PROD / 4;
const RSP_EVENT_W: usize = header::RSP_EVENT / 4;

/// A request or response type that travels on a ring.
///
/// Implementors are plain `#[repr(C)]` structs of integers mirroring the C struct, so that
/// `size_of::<Self>()` and `align_of::<Self>()` equal the C ones (the slot size is computed from
/// them, as C sizes the union). `encode`/`decode` convert to and from the little-endian wire
/// bytes; every byte pattern decodes to *some* value (validation is the protocol's job, after
/// the copy). The size must be a multiple of 4 and at most [`MAX_ENTRY_BYTES`] (checked at
/// compile time when a ring is built).
pub trait RingEntry: Copy + Default {
    /// Write the wire form into `out`, which is exactly `size_of::<Self>()` bytes. Padding
    /// bytes must be written (as zero), so nothing private leaks to the peer.
    fn encode(&self, out: &mut [u8]);
    /// Read a value from `bytes`, exactly `size_of::<Self>()` bytes.
    fn decode(bytes: &[u8]) -> Self;
}

/// Number of slots in a ring of `region_bytes` whose slots are `slot_bytes` each: the largest
/// power of two not above `(region_bytes - 64) / slot_bytes` (`__RING_SIZE`), or 0 if none fits.
pub const fn ring_entries(region_bytes: usize, slot_bytes: usize) -> u32 {
    if slot_bytes == 0 || region_bytes < HEADER_BYTES {
        return 0;
    }
    let fit = (region_bytes - HEADER_BYTES) / slot_bytes;
    if fit == 0 {
        return 0;
    }
    let pow = 1usize << (usize::BITS - 1 - fit.leading_zeros());
    // Indices are u32 and compared by wrapping distance, which needs nr_ents <= 2^31.
    if pow > (1usize << 31) {
        1 << 31
    } else {
        pow as u32
    }
}

/// Size of one slot: `sizeof(union { Req; Rsp; })` under the C layout rules.
pub const fn slot_bytes<Req, Rsp>() -> usize {
    let size = if size_of::<Req>() > size_of::<Rsp>() {
        size_of::<Req>()
    } else {
        size_of::<Rsp>()
    };
    let align = if align_of::<Req>() > align_of::<Rsp>() {
        align_of::<Req>()
    } else {
        align_of::<Rsp>()
    };
    size.div_ceil(align) * align
}

/// What can go wrong on a ring. `is_peer_fault()` separates what the peer did (disconnect it)
/// from what this side asked for (its own bug or back-pressure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The region cannot hold even one slot after the header.
    RegionTooSmall { bytes: usize, slot_bytes: usize },
    /// The region's address is null or not 4-byte aligned, or its length not a multiple of 4.
    RegionMisaligned,
    /// The frontend published a request producer index outside
    /// `[req_cons, rsp_prod_pvt + nr_ents]`: requests are bogus (`RING_REQUEST_PROD_OVERFLOW`).
    BogusRequestProducer {
        req_prod: u32,
        req_cons: u32,
        rsp_prod_pvt: u32,
        nr_ents: u32,
    },
    /// The backend published a response producer index outside
    /// `[rsp_cons, requests published]`: it answered requests that were never made.
    BogusResponseProducer {
        rsp_prod: u32,
        rsp_cons: u32,
        req_prod: u32,
    },
    /// No free slot for another request (frontend back-pressure).
    Full,
    /// A response was pushed with no consumed, unanswered request for it to take the slot of.
    NoRequestToAnswer,
}

impl RingError {
    /// True when the peer broke the protocol (the caller should disconnect it).
    pub const fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            RingError::BogusRequestProducer { .. } | RingError::BogusResponseProducer { .. }
        )
    }
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RingError::RegionTooSmall { bytes, slot_bytes } => write!(
                f,
                "ring region of {bytes} bytes holds no {slot_bytes}-byte slot after the {HEADER_BYTES}-byte header"
            ),
            RingError::RegionMisaligned => {
                write!(
                    f,
                    "ring region must be non-null, 4-byte aligned and a multiple of 4 bytes"
                )
            }
            RingError::BogusRequestProducer {
                req_prod,
                req_cons,
                rsp_prod_pvt,
                nr_ents,
            } => write!(
                f,
                "peer's req_prod {req_prod} outside [{req_cons}, {rsp_prod_pvt} + {nr_ents}]"
            ),
            RingError::BogusResponseProducer {
                rsp_prod,
                rsp_cons,
                req_prod,
            } => write!(
                f,
                "peer's rsp_prod {rsp_prod} outside [{rsp_cons}, {req_prod}] (requests published)"
            ),
            RingError::Full => write!(f, "ring full"),
            RingError::NoRequestToAnswer => write!(f, "no consumed request to answer"),
        }
    }
}

/// Geometry shared by both ends.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    nr_ents: u32,
    slot_words: usize,
}

impl Geometry {
    fn new<Req: RingEntry, Rsp: RingEntry>(mem: &SharedRingMem) -> Result<Self, RingError> {
        const {
            assert!(size_of::<Req>().is_multiple_of(4) && size_of::<Req>() <= MAX_ENTRY_BYTES);
            assert!(size_of::<Rsp>().is_multiple_of(4) && size_of::<Rsp>() <= MAX_ENTRY_BYTES);
        }
        let slot = slot_bytes::<Req, Rsp>();
        let nr_ents = ring_entries(mem.len(), slot);
        if nr_ents == 0 {
            return Err(RingError::RegionTooSmall {
                bytes: mem.len(),
                slot_bytes: slot,
            });
        }
        Ok(Geometry {
            nr_ents,
            slot_words: slot / 4,
        })
    }

    fn slot_word(&self, idx: u32) -> usize {
        HEADER_WORDS + (idx & (self.nr_ents - 1)) as usize * self.slot_words
    }
}

fn write_entry<T: RingEntry>(mem: &SharedRingMem, first_word: usize, value: &T) {
    let len = size_of::<T>();
    let mut buf = [0u8; MAX_ENTRY_BYTES];
    let bytes = &mut buf[..len];
    value.encode(bytes);
    for (i, chunk) in bytes.chunks_exact(4).enumerate() {
        let word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        mem.word(first_word + i).store(word, Ordering::Relaxed);
    }
}

fn read_entry<T: RingEntry>(mem: &SharedRingMem, first_word: usize) -> T {
    let len = size_of::<T>();
    let mut buf = [0u8; MAX_ENTRY_BYTES];
    let bytes = &mut buf[..len];
    for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
        let word = mem.word(first_word + i).load(Ordering::Relaxed);
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    T::decode(bytes)
}

/// Publish `new` as our producer index and decide whether the peer asked to be told
/// (`RING_PUSH_*_AND_CHECK_NOTIFY`): notify iff its event index is in `(old, new]`.
fn publish_and_check(
    mem: &SharedRingMem,
    prod_w: usize,
    event_w: usize,
    old: u32,
    new: u32,
) -> bool {
    mem.word(prod_w).store(new, Ordering::Release);
    // Our new index must be visible before we read the peer's event index, or both sides can
    // decide the other will act (lost wake-up).
    fence(Ordering::SeqCst);
    let event = mem.word(event_w).load(Ordering::Relaxed);
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// The frontend's end: produces requests, consumes responses.
pub struct FrontRing<Req, Rsp> {
    mem: SharedRingMem,
    geo: Geometry,
    req_prod_pvt: u32,
    req_prod_published: u32,
    rsp_cons: u32,
    /// Last validated response producer index.
    rsp_prod_seen: u32,
    _entries: PhantomData<fn(Req) -> Rsp>,
}

impl<Req, Rsp> fmt::Debug for FrontRing<Req, Rsp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrontRing")
            .field("nr_ents", &self.geo.nr_ents)
            .field("req_prod_pvt", &self.req_prod_pvt)
            .field("rsp_cons", &self.rsp_cons)
            .finish()
    }
}

impl<Req: RingEntry, Rsp: RingEntry> FrontRing<Req, Rsp> {
    /// Initialise the shared header as the frontend does (`SHARED_RING_INIT` +
    /// `FRONT_RING_INIT`): producers 0, event indices 1, `pvt` and padding zero.
    pub fn new(mem: SharedRingMem) -> Result<Self, RingError> {
        let geo = Geometry::new::<Req, Rsp>(&mem)?;
        for w in 0..HEADER_WORDS {
            mem.word(w).store(0, Ordering::Relaxed);
        }
        mem.word(REQ_EVENT_W).store(1, Ordering::Relaxed);
        mem.word(RSP_EVENT_W).store(1, Ordering::Release);
        Ok(FrontRing {
            mem,
            geo,
            req_prod_pvt: 0,
            req_prod_published: 0,
            rsp_cons: 0,
            rsp_prod_seen: 0,
            _entries: PhantomData,
        })
    }

    /// Slots in the ring.
    pub fn nr_ents(&self) -> u32 {
        self.geo.nr_ents
    }

    /// The shared region this ring lives in.
    pub fn mem(&self) -> &SharedRingMem {
        &self.mem
    }

    /// Slots free for new requests (`RING_FREE_REQUESTS`).
    pub fn free_slots(&self) -> u32 {
        self.geo.nr_ents - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// True when no request can be queued until responses are consumed.
    pub fn is_full(&self) -> bool {
        self.free_slots() == 0
    }

    /// Requests queued (published or not) whose responses have not been consumed yet.
    pub fn in_flight(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Copy `req` into the next free slot. It becomes visible to the backend at the next
    /// [`push_requests_and_check_notify`](Self::push_requests_and_check_notify).
    pub fn push_request(&mut self, req: &Req) -> Result<(), RingError> {
        if self.is_full() {
            return Err(RingError::Full);
        }
        write_entry(&self.mem, self.geo.slot_word(self.req_prod_pvt), req);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publish queued requests; true if the backend must be notified (event channel send).
    pub fn push_requests_and_check_notify(&mut self) -> bool {
        let old = self.req_prod_published;
        let new = self.req_prod_pvt;
        self.req_prod_published = new;
        publish_and_check(&self.mem, REQ_PROD_W, REQ_EVENT_W, old, new)
    }

    /// Read the backend's response producer once and validate it; returns how many responses
    /// are ready to consume.
    pub fn unconsumed_responses(&mut self) -> Result<u32, RingError> {
        let rsp_prod = self.mem.word(RSP_PROD_W).load(Ordering::Acquire);
        let ready = rsp_prod.wrapping_sub(self.rsp_cons);
        // The backend can only answer requests it has seen.
        if ready > self.req_prod_published.wrapping_sub(self.rsp_cons) {
            return Err(RingError::BogusResponseProducer {
                rsp_prod,
                rsp_cons: self.rsp_cons,
                req_prod: self.req_prod_published,
            });
        }
        self.rsp_prod_seen = rsp_prod;
        Ok(ready)
    }

    /// Take the next response, copied out of the ring, if one is ready.
    pub fn get_response(&mut self) -> Result<Option<Rsp>, RingError> {
        if self.rsp_cons == self.rsp_prod_seen && self.unconsumed_responses()? == 0 {
            return Ok(None);
        }
        let rsp = read_entry(&self.mem, self.geo.slot_word(self.rsp_cons));
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// Before sleeping (`RING_FINAL_CHECK_FOR_RESPONSES`): true if responses are ready (keep
    /// working); otherwise arm `rsp_event` for the next response and check again, so that a
    /// response published meanwhile is either seen here or notified.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_responses()? > 0 {
            return Ok(true);
        }
        self.mem
            .word(RSP_EVENT_W)
            .store(self.rsp_cons.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_responses()? > 0)
    }
}

/// The backend's end: consumes requests, produces responses.
pub struct BackRing<Req, Rsp> {
    mem: SharedRingMem,
    geo: Geometry,
    rsp_prod_pvt: u32,
    rsp_prod_published: u32,
    req_cons: u32,
    /// Last validated request producer index.
    req_prod_seen: u32,
    _entries: PhantomData<fn(Req) -> Rsp>,
}

impl<Req, Rsp> fmt::Debug for BackRing<Req, Rsp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackRing")
            .field("nr_ents", &self.geo.nr_ents)
            .field("req_cons", &self.req_cons)
            .field("rsp_prod_pvt", &self.rsp_prod_pvt)
            .finish()
    }
}

impl<Req: RingEntry, Rsp: RingEntry> BackRing<Req, Rsp> {
    /// Attach to a ring the frontend initialised (`BACK_RING_INIT`); writes nothing shared.
    pub fn new(mem: SharedRingMem) -> Result<Self, RingError> {
        let geo = Geometry::new::<Req, Rsp>(&mem)?;
        Ok(BackRing {
            mem,
            geo,
            rsp_prod_pvt: 0,
            rsp_prod_published: 0,
            req_cons: 0,
            req_prod_seen: 0,
            _entries: PhantomData,
        })
    }

    /// Slots in the ring.
    pub fn nr_ents(&self) -> u32 {
        self.geo.nr_ents
    }

    /// The shared region this ring lives in.
    pub fn mem(&self) -> &SharedRingMem {
        &self.mem
    }

    /// Requests consumed but not yet answered.
    pub fn unanswered(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Requests consumed so far: the private, free-running `req_cons`.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Read the frontend's request producer once and validate it; returns how many requests
    /// are ready to consume. A producer more than `nr_ents` ahead of our responses, or behind
    /// what we already consumed, is bogus (`RING_REQUEST_PROD_OVERFLOW`).
    pub fn unconsumed_requests(&mut self) -> Result<u32, RingError> {
        let req_prod = self.mem.word(REQ_PROD_W).load(Ordering::Acquire);
        let unanswered_total = req_prod.wrapping_sub(self.rsp_prod_pvt);
        if unanswered_total > self.geo.nr_ents || unanswered_total < self.unanswered() {
            return Err(RingError::BogusRequestProducer {
                req_prod,
                req_cons: self.req_cons,
                rsp_prod_pvt: self.rsp_prod_pvt,
                nr_ents: self.geo.nr_ents,
            });
        }
        self.req_prod_seen = req_prod;
        Ok(req_prod.wrapping_sub(self.req_cons))
    }

    /// Take the next request, copied out of the ring, if one is ready.
    pub fn get_request(&mut self) -> Result<Option<Req>, RingError> {
        if self.req_cons == self.req_prod_seen && self.unconsumed_requests()? == 0 {
            return Ok(None);
        }
        let req = read_entry(&self.mem, self.geo.slot_word(self.req_cons));
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// Copy `rsp` into the slot of the oldest unanswered request. Published at the next
    /// [`push_responses_and_check_notify`](Self::push_responses_and_check_notify).
    pub fn push_response(&mut self, rsp: &Rsp) -> Result<(), RingError> {
        if self.unanswered() == 0 {
            return Err(RingError::NoRequestToAnswer);
        }
        write_entry(&self.mem, self.geo.slot_word(self.rsp_prod_pvt), rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publish queued responses; true if the frontend must be notified.
    pub fn push_responses_and_check_notify(&mut self) -> bool {
        let old = self.rsp_prod_published;
        let new = self.rsp_prod_pvt;
        self.rsp_prod_published = new;
        publish_and_check(&self.mem, RSP_PROD_W, RSP_EVENT_W, old, new)
    }

    /// Before sleeping (`RING_FINAL_CHECK_FOR_REQUESTS`): true if requests are ready (keep
    /// working); otherwise arm `req_event` for the next request and check again.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        Ok(self.arm_request_event(1)? > 0)
    }

    /// Ask to be notified once `ahead` requests beyond those consumed are posted (a batching
    /// consumer, e.g. netback waiting for enough rx buffers for one packet): set
    /// `req_event = req_cons + ahead`, full fence, then read `req_prod` again and return how
    /// many requests are ready, validated as [`unconsumed_requests`](Self::unconsumed_requests)
    /// does. If that is already `>= ahead` the caller must go on working rather than wait: the
    /// frontend may have posted them before it could see the new event index, and then it
    /// does not notify.
    ///
    /// `ahead` is clamped to `1..=nr_ents`: 0 would name an index already passed, and more
    /// than a ring's worth can never be outstanding, so either would leave the caller waiting
    /// for a notification that never comes.
    pub fn arm_request_event(&mut self, ahead: u32) -> Result<u32, RingError> {
        let ahead = ahead.clamp(1, self.geo.nr_ents);
        self.mem
            .word(REQ_EVENT_W)
            .store(self.req_cons.wrapping_add(ahead), Ordering::Relaxed);
        // The event index must be visible before we look at the producer again, or the
        // frontend's push-and-check and this re-check can both miss (lost wake-up).
        fence(Ordering::SeqCst);
        self.unconsumed_requests()
    }
}

/// Little-endian field codec used by [`le_struct!`] for ABI structs in this crate.
pub(crate) trait LeField: Sized {
    const LEN: usize;
    /// Read from the first `LEN` bytes of `bytes`; `None` if too short.
    fn read_le(bytes: &[u8]) -> Option<Self>;
    /// Write into the first `LEN` bytes of `out` (which the caller sized).
    fn write_le(&self, out: &mut [u8]);
}

macro_rules! le_int_field {
    ($($t:ty),*) => {$(
        impl LeField for $t {
            const LEN: usize = size_of::<$t>();
            fn read_le(bytes: &[u8]) -> Option<Self> {
                Some(<$t>::from_le_bytes(bytes.get(..Self::LEN)?.try_into().ok()?))
            }
            fn write_le(&self, out: &mut [u8]) {
                if let Some(dst) = out.get_mut(..Self::LEN) {
                    dst.copy_from_slice(&self.to_le_bytes());
                }
            }
        }
    )*};
}
le_int_field!(u8, u16, u32, u64, i8, i16, i32, i64);

/// Give a `#[repr(C)]` ABI struct its wire codec and layout assertion:
/// `le_struct!(Type, size; field: type @ offset, ...)` generates `WIRE_SIZE`,
/// `from_bytes(&[u8]) -> Option<Self>` (exactly `size` bytes, else `None`), `to_bytes() ->
/// [u8; size]` (padding written as zero), a [`LeField`] impl so it can nest, and
/// `assert_layout!`. Every field must be listed (the struct literal will not compile otherwise).
macro_rules! le_struct {
    ($ty:ident, $size:expr; $($field:ident : $fty:ident @ $off:expr),+ $(,)?) => {
        impl $ty {
            /// Size of the wire form in bytes.
            #[allow(dead_code)]
            pub const WIRE_SIZE: usize = $size;

            /// Decode from exactly `WIRE_SIZE` little-endian bytes.
            pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
                if bytes.len() != $size {
                    return None;
                }
                Some(Self {
                    $($field: <$fty as $crate::ring::LeField>::read_le(bytes.get($off..)?)?,)+
                })
            }

            /// Encode to the wire form; padding bytes are zero.
            pub fn to_bytes(self) -> [u8; $size] {
                let mut out = [0u8; $size];
                $(<$fty as $crate::ring::LeField>::write_le(&self.$field, &mut out[$off..]);)+
                out
            }
        }

        impl $crate::ring::LeField for $ty {
            const LEN: usize = $size;
            fn read_le(bytes: &[u8]) -> Option<Self> {
                Self::from_bytes(bytes.get(..$size)?)
            }
            fn write_le(&self, out: &mut [u8]) {
                if let Some(dst) = out.get_mut(..$size) {
                    dst.copy_from_slice(&self.to_bytes());
                }
            }
        }

        $crate::assert_layout!($ty, $size; $($field @ $off),+);
    };
}
pub(crate) use le_struct;

/// The one place that touches raw shared memory: a region of 32-bit words accessed only
/// atomically. Either borrowed from a shared page (`unsafe` constructor with a contract) or
/// owned (safe, for tests and host use).
pub mod shared_mem {
    use alloc::boxed::Box;
    use alloc::sync::Arc;
    use core::fmt;
    use core::ptr::NonNull;

    #[cfg(not(loom))]
    use core::sync::atomic::{AtomicU32, Ordering};
    #[cfg(loom)]
    use loom::sync::atomic::{AtomicU32, Ordering};

    use super::RingError;

    #[cfg(not(loom))]
    #[repr(C, align(4096))]
    struct Page([AtomicU32; crate::PAGE_SIZE / 4]);

    /// Backing store of an owned region; only kept alive, never accessed directly.
    struct Owned {
        #[cfg(not(loom))]
        _pages: Box<[Page]>,
        #[cfg(loom)]
        _words: Box<[AtomicU32]>,
    }

    /// A shared memory region holding a ring, accessed as 32-bit atomic words.
    ///
    /// Cloning gives another handle to the same memory (as the peer has).
    #[derive(Clone)]
    pub struct SharedRingMem {
        base: NonNull<AtomicU32>,
        words: usize,
        _owner: Option<Arc<Owned>>,
    }

    // SAFETY: the region is only accessed through `AtomicU32`, which is Sync; the owned variant
    // is kept alive by the Arc, and `from_raw`'s contract requires the borrowed memory to stay
    // valid for every handle on every thread.
    unsafe impl Send for SharedRingMem {}
    // SAFETY: as above: shared access is atomic-only.
    unsafe impl Sync for SharedRingMem {}

    impl fmt::Debug for SharedRingMem {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("SharedRingMem")
                .field("base", &self.base)
                .field("len", &self.len())
                .finish()
        }
    }

    impl SharedRingMem {
        /// A zeroed region of `len` bytes (a multiple of 4) that this handle owns. Outside
        /// `loom` it is page-aligned, like a real ring page.
        pub fn new_owned(len: usize) -> Result<Self, RingError> {
            if !len.is_multiple_of(4) {
                return Err(RingError::RegionMisaligned);
            }
            let words = len / 4;
            #[cfg(not(loom))]
            let (owner, base) = {
                let pages: Box<[Page]> = (0..len.div_ceil(crate::PAGE_SIZE).max(1))
                    .map(|_| Page(core::array::from_fn(|_| AtomicU32::new(0))))
                    .collect();
                let owner = Arc::new(Owned { _pages: pages });
                // From the whole slice, so the pointer may reach every page (not just word 0).
                let base = NonNull::from(&*owner._pages).cast::<AtomicU32>();
                (owner, base)
            };
            #[cfg(loom)]
            let (owner, base) = {
                let store: Box<[AtomicU32]> =
                    (0..words.max(1)).map(|_| AtomicU32::new(0)).collect();
                let owner = Arc::new(Owned { _words: store });
                let base = NonNull::from(&*owner._words).cast::<AtomicU32>();
                (owner, base)
            };
            Ok(SharedRingMem {
                base,
                words,
                _owner: Some(owner),
            })
        }

        /// A region borrowed from memory shared with a peer (a granted or mapped page).
        ///
        /// # Safety
        /// For as long as this handle or any clone of it exists, `ptr .. ptr + len` must be
        /// mapped, readable and writable, not freed or remapped, and accessed by this program
        /// only through `SharedRingMem` handles (the peer, outside this program, may write it at
        /// any time). `ptr` must be 4-byte aligned and `len` a multiple of 4 (checked: an
        /// error, not undefined behaviour, if not).
        #[cfg(not(loom))]
        pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Result<Self, RingError> {
            let base = NonNull::new(ptr.cast::<AtomicU32>()).ok_or(RingError::RegionMisaligned)?;
            if !(base.as_ptr() as usize).is_multiple_of(4) || !len.is_multiple_of(4) {
                return Err(RingError::RegionMisaligned);
            }
            Ok(SharedRingMem {
                base,
                words: len / 4,
                _owner: None,
            })
        }

        /// Length of the region in bytes.
        pub fn len(&self) -> usize {
            self.words * 4
        }

        /// True for a zero-length region.
        pub fn is_empty(&self) -> bool {
            self.words == 0
        }

        fn as_words(&self) -> &[AtomicU32] {
            // SAFETY: `base` points to `words` initialised AtomicU32s that stay valid while
            // `self` lives: owned ones by the Arc in `_owner`, borrowed ones by `from_raw`'s
            // contract. AtomicU32 tolerates concurrent writes by the peer.
            unsafe { core::slice::from_raw_parts(self.base.as_ptr(), self.words) }
        }

        /// The word at index `i`. Callers in this module's parent index only within the
        /// validated geometry (slot indices are masked), so this never fails for them.
        pub(super) fn word(&self, i: usize) -> &AtomicU32 {
            &self.as_words()[i]
        }

        /// Relaxed read of the 32-bit word at byte `offset` (4-aligned), e.g. to inspect the
        /// header or play a (possibly misbehaving) peer in tests.
        pub fn read_u32(&self, offset: usize) -> Option<u32> {
            if !offset.is_multiple_of(4) {
                return None;
            }
            Some(self.as_words().get(offset / 4)?.load(Ordering::Relaxed))
        }

        /// Release store of the 32-bit word at byte `offset` (4-aligned).
        pub fn write_u32(&self, offset: usize, value: u32) -> Option<()> {
            if !offset.is_multiple_of(4) {
                return None;
            }
            self.as_words()
                .get(offset / 4)?
                .store(value, Ordering::Release);
            Some(())
        }
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)] // test code; clippy only recognises a plain cfg(test)
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    /// An entry of `N` 32-bit words, the first carrying a sequence number.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(C)]
    struct Words<const N: usize>([u32; N]);

    impl<const N: usize> Default for Words<N> {
        fn default() -> Self {
            Words([0; N])
        }
    }

    impl<const N: usize> RingEntry for Words<N> {
        fn encode(&self, out: &mut [u8]) {
            for (dst, w) in out.chunks_exact_mut(4).zip(self.0.iter()) {
                dst.copy_from_slice(&w.to_le_bytes());
            }
        }
        fn decode(bytes: &[u8]) -> Self {
            let mut v = [0u32; N];
            for (w, src) in v.iter_mut().zip(bytes.chunks_exact(4)) {
                *w = u32::from_le_bytes([src[0], src[1], src[2], src[3]]);
            }
            Words(v)
        }
    }

    /// Stand-in with blkif's 112-byte request size.
    type Blk = Words<28>;
    /// Stand-in with netif tx's 12-byte request size.
    type NetTx = Words<3>;
    /// Stand-in with netif rx's 8-byte size (align 8, like netif_rx_request with its u16s
    /// padded... the response is 8 bytes too).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    #[repr(C)]
    struct NetRx(u64);
    impl RingEntry for NetRx {
        fn encode(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.0.to_le_bytes());
        }
        fn decode(bytes: &[u8]) -> Self {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            NetRx(u64::from_le_bytes(b))
        }
    }

    type Small = Words<1>;

    fn page() -> SharedRingMem {
        SharedRingMem::new_owned(PAGE_SIZE).unwrap()
    }

    fn pair<Req: RingEntry, Rsp: RingEntry>(
        mem: SharedRingMem,
    ) -> (FrontRing<Req, Rsp>, BackRing<Req, Rsp>) {
        let front = FrontRing::new(mem.clone()).unwrap();
        let back = BackRing::new(mem).unwrap();
        (front, back)
    }

    #[test]
    fn entry_counts_match_xen_for_blkif_and_netif_sizes() {
        assert_eq!(
            FrontRing::<Blk, Words<4>>::new(page()).unwrap().nr_ents(),
            32
        );
        assert_eq!(
            FrontRing::<NetTx, Small>::new(page()).unwrap().nr_ents(),
            256
        );
        assert_eq!(
            FrontRing::<NetRx, NetRx>::new(page()).unwrap().nr_ents(),
            256
        );
        assert_eq!(
            FrontRing::<Words<4>, Words<4>>::new(page())
                .unwrap()
                .nr_ents(),
            128
        );
        // blkif multi-page rings: orders 1..4.
        for (pages, ents) in [(2, 64), (4, 128), (8, 256), (16, 512)] {
            let mem = SharedRingMem::new_owned(pages * PAGE_SIZE).unwrap();
            assert_eq!(FrontRing::<Blk, Blk>::new(mem).unwrap().nr_ents(), ents);
        }
    }

    #[test]
    fn slot_size_follows_c_union_rules() {
        assert_eq!(slot_bytes::<Blk, Words<4>>(), 112);
        assert_eq!(slot_bytes::<NetTx, Small>(), 12);
        // A 12-byte align-4 request with an align-8 response rounds up to 16, as C would.
        assert_eq!(slot_bytes::<NetTx, NetRx>(), 16);
    }

    #[test]
    fn ring_entries_edge_cases() {
        assert_eq!(ring_entries(0, 8), 0);
        assert_eq!(ring_entries(64, 8), 0);
        assert_eq!(ring_entries(72, 8), 1);
        assert_eq!(ring_entries(64 + 8 * 3, 8), 2);
        assert_eq!(ring_entries(4096, 0), 0);
        assert_eq!(ring_entries(usize::MAX, 4), 1 << 31);
    }

    #[test]
    fn region_too_small_is_refused() {
        let mem = SharedRingMem::new_owned(64 + 100).unwrap();
        assert_eq!(
            FrontRing::<Blk, Blk>::new(mem).unwrap_err(),
            RingError::RegionTooSmall {
                bytes: 164,
                slot_bytes: 112
            }
        );
        assert_eq!(
            SharedRingMem::new_owned(4095).unwrap_err(),
            RingError::RegionMisaligned
        );
    }

    #[test]
    fn front_init_writes_xen_initial_header() {
        let mem = page();
        for off in (0..64).step_by(4) {
            mem.write_u32(off, 0xdead_beef).unwrap();
        }
        let _front = FrontRing::<Small, Small>::new(mem.clone()).unwrap();
        assert_eq!(mem.read_u32(header::REQ_PROD), Some(0));
        assert_eq!(mem.read_u32(header::REQ_EVENT), Some(1));
        assert_eq!(mem.read_u32(header::RSP_PROD), Some(0));
        assert_eq!(mem.read_u32(header::RSP_EVENT), Some(1));
        for off in (16..64).step_by(4) {
            assert_eq!(mem.read_u32(off), Some(0), "pad at {off}");
        }
    }

    #[test]
    fn requests_and_responses_round_trip_in_order_with_layout() {
        let mem = page();
        let (mut front, mut back) = pair::<Words<2>, Small>(mem.clone());
        front.push_request(&Words([7, 70])).unwrap();
        front.push_request(&Words([8, 80])).unwrap();
        // Unpublished requests are invisible.
        assert_eq!(back.get_request().unwrap(), None);
        assert!(front.push_requests_and_check_notify());
        // Entry 0 sits right after the header, entry 1 after it.
        assert_eq!(mem.read_u32(64), Some(7));
        assert_eq!(mem.read_u32(72), Some(8));
        assert_eq!(mem.read_u32(header::REQ_PROD), Some(2));
        assert_eq!(back.get_request().unwrap(), Some(Words([7, 70])));
        assert_eq!(back.get_request().unwrap(), Some(Words([8, 80])));
        assert_eq!(back.get_request().unwrap(), None);
        back.push_response(&Words([7])).unwrap();
        back.push_response(&Words([8])).unwrap();
        assert_eq!(
            back.push_response(&Words([9])),
            Err(RingError::NoRequestToAnswer)
        );
        assert!(back.push_responses_and_check_notify());
        assert_eq!(front.get_response().unwrap(), Some(Words([7])));
        assert_eq!(front.get_response().unwrap(), Some(Words([8])));
        assert_eq!(front.get_response().unwrap(), None);
        assert_eq!(front.free_slots(), front.nr_ents());
    }

    #[test]
    fn front_full_refuses_push_until_responses_consumed() {
        let mem = SharedRingMem::new_owned(64 + 4 * 4).unwrap();
        let (mut front, mut back) = pair::<Small, Small>(mem);
        assert_eq!(front.nr_ents(), 4);
        for i in 0..4 {
            front.push_request(&Words([i])).unwrap();
        }
        assert_eq!(front.push_request(&Words([4])), Err(RingError::Full));
        front.push_requests_and_check_notify();
        while let Some(r) = back.get_request().unwrap() {
            back.push_response(&r).unwrap();
        }
        back.push_responses_and_check_notify();
        assert!(front.is_full());
        front.get_response().unwrap().unwrap();
        assert_eq!(front.free_slots(), 1);
        front.push_request(&Words([4])).unwrap();
    }

    /// Put both ends of an idle ring at index `start` (as after `start` requests answered).
    fn start_at(
        front: &mut FrontRing<Small, Small>,
        back: &mut BackRing<Small, Small>,
        start: u32,
    ) {
        front.req_prod_pvt = start;
        front.req_prod_published = start;
        front.rsp_cons = start;
        front.rsp_prod_seen = start;
        back.req_cons = start;
        back.req_prod_seen = start;
        back.rsp_prod_pvt = start;
        back.rsp_prod_published = start;
        front.mem().write_u32(header::REQ_PROD, start).unwrap();
        front.mem().write_u32(header::RSP_PROD, start).unwrap();
    }

    #[test]
    fn indices_wrap_around_u32() {
        let mem = SharedRingMem::new_owned(64 + 4 * 4).unwrap();
        let (mut front, mut back) = pair::<Small, Small>(mem);
        // Start both ends just below the wrap point, as after 2^32 - 2 requests.
        let start = u32::MAX - 1;
        start_at(&mut front, &mut back, start);
        for i in 0..10u32 {
            front.push_request(&Words([i])).unwrap();
            front.push_requests_and_check_notify();
            assert_eq!(back.get_request().unwrap(), Some(Words([i])));
            back.push_response(&Words([i])).unwrap();
            back.push_responses_and_check_notify();
            assert_eq!(front.get_response().unwrap(), Some(Words([i])));
        }
        assert_eq!(front.req_prod_pvt, start.wrapping_add(10));
    }

    #[test]
    fn notify_only_when_peer_event_in_published_window() {
        let (mut front, mut back) = pair::<Small, Small>(page());
        // Initial req_event = 1: the first request notifies, the next does not.
        front.push_request(&Words([0])).unwrap();
        assert!(front.push_requests_and_check_notify());
        front.push_request(&Words([1])).unwrap();
        assert!(!front.push_requests_and_check_notify());
        // The backend drains and goes to sleep: the next push must notify.
        while back.get_request().unwrap().is_some() {}
        assert!(!back.final_check_for_requests().unwrap());
        front.push_request(&Words([2])).unwrap();
        front.push_request(&Words([3])).unwrap();
        assert!(front.push_requests_and_check_notify());
        // Publishing nothing new never notifies.
        assert!(!front.push_requests_and_check_notify());
    }

    #[test]
    fn final_check_reports_work_without_arming() {
        let mem = page();
        let (mut front, mut back) = pair::<Small, Small>(mem.clone());
        front.push_request(&Words([1])).unwrap();
        front.push_requests_and_check_notify();
        assert!(back.final_check_for_requests().unwrap());
        assert_eq!(mem.read_u32(header::REQ_EVENT), Some(1));
        back.get_request().unwrap();
        assert!(!back.final_check_for_requests().unwrap());
        assert_eq!(mem.read_u32(header::REQ_EVENT), Some(2));
    }

    #[test]
    fn arm_request_event_sets_event_ahead_of_consumer_and_notifies_on_crossing() {
        let mem = page();
        let (mut front, mut back) = pair::<Small, Small>(mem.clone());
        for i in 0..3 {
            front.push_request(&Words([i])).unwrap();
        }
        front.push_requests_and_check_notify();
        while back.get_request().unwrap().is_some() {}
        assert_eq!(back.req_cons(), 3);

        assert_eq!(back.arm_request_event(4).unwrap(), 0);

        assert_eq!(mem.read_u32(header::REQ_EVENT), Some(7));
        // Three more posts stay below the event index: no notification.
        for i in 0..3 {
            front.push_request(&Words([i])).unwrap();
            assert!(!front.push_requests_and_check_notify(), "post {i}");
        }
        // The fourth reaches req_cons + 4.
        front.push_request(&Words([3])).unwrap();
        assert!(front.push_requests_and_check_notify());
    }

    #[test]
    fn arm_request_event_reports_requests_posted_before_arming() {
        let mem = page();
        let (mut front, mut back) = pair::<Small, Small>(mem.clone());
        front.push_request(&Words([1])).unwrap();
        front.push_request(&Words([2])).unwrap();
        front.push_requests_and_check_notify();

        // Two are ready, three wanted: not enough yet, but the caller learns what is there.
        assert_eq!(back.arm_request_event(3).unwrap(), 2);
        assert_eq!(mem.read_u32(header::REQ_EVENT), Some(3));
        // Already enough: the caller keeps working.
        assert_eq!(back.arm_request_event(2).unwrap(), 2);
        assert_eq!(back.get_request().unwrap(), Some(Words([1])));
    }

    #[test]
    fn arm_request_event_clamps_ahead_to_one_ring() {
        let mem = SharedRingMem::new_owned(64 + 4 * 4).unwrap();
        let (mut front, mut back) = pair::<Small, Small>(mem.clone());
        front.push_request(&Words([1])).unwrap();
        front.push_requests_and_check_notify();
        back.get_request().unwrap().unwrap();

        back.arm_request_event(0).unwrap();
        assert_eq!(mem.read_u32(header::REQ_EVENT), Some(2));
        back.arm_request_event(u32::MAX).unwrap();
        assert_eq!(mem.read_u32(header::REQ_EVENT), Some(1 + back.nr_ents()));
    }

    #[test]
    fn arm_request_event_refuses_a_bogus_producer_and_wraps_with_req_cons() {
        let mem = page();
        let (mut front, mut back) = pair::<Small, Small>(mem.clone());
        let start = u32::MAX - 1;
        start_at(&mut front, &mut back, start);

        assert_eq!(back.arm_request_event(5).unwrap(), 0);

        assert_eq!(mem.read_u32(header::REQ_EVENT), Some(3));
        mem.write_u32(header::REQ_PROD, start.wrapping_sub(1))
            .unwrap();
        assert!(back.arm_request_event(5).unwrap_err().is_peer_fault());
    }

    #[test]
    fn bogus_request_producer_ahead_of_ring_is_peer_fault() {
        let mem = page();
        let mut back = BackRing::<Small, Small>::new(mem.clone()).unwrap();
        let nr = back.nr_ents();
        mem.write_u32(header::REQ_PROD, nr + 1).unwrap();
        let err = back.get_request().unwrap_err();
        assert!(err.is_peer_fault());
        assert_eq!(
            err,
            RingError::BogusRequestProducer {
                req_prod: nr + 1,
                req_cons: 0,
                rsp_prod_pvt: 0,
                nr_ents: nr
            }
        );
        // Exactly nr_ents outstanding is legal.
        mem.write_u32(header::REQ_PROD, nr).unwrap();
        assert_eq!(back.unconsumed_requests().unwrap(), nr);
    }

    #[test]
    fn request_producer_moving_backwards_is_peer_fault() {
        let mem = page();
        let (mut front, mut back) = pair::<Small, Small>(mem.clone());
        for i in 0..5 {
            front.push_request(&Words([i])).unwrap();
        }
        front.push_requests_and_check_notify();
        for _ in 0..5 {
            back.get_request().unwrap().unwrap();
        }
        mem.write_u32(header::REQ_PROD, 3).unwrap();
        assert!(back.unconsumed_requests().unwrap_err().is_peer_fault());
        mem.write_u32(header::REQ_PROD, u32::MAX).unwrap();
        assert!(back.final_check_for_requests().unwrap_err().is_peer_fault());
    }

    #[test]
    fn responses_beyond_published_requests_are_peer_fault() {
        let mem = page();
        let mut front = FrontRing::<Small, Small>::new(mem.clone()).unwrap();
        front.push_request(&Words([1])).unwrap();
        front.push_requests_and_check_notify();
        mem.write_u32(header::RSP_PROD, 2).unwrap();
        assert_eq!(
            front.get_response().unwrap_err(),
            RingError::BogusResponseProducer {
                rsp_prod: 2,
                rsp_cons: 0,
                req_prod: 1
            }
        );
        // A backwards rsp_prod is just as bogus.
        mem.write_u32(header::RSP_PROD, u32::MAX).unwrap();
        assert!(front.unconsumed_responses().unwrap_err().is_peer_fault());
        // A sane value afterwards is accepted (the slot still holds the request's bytes).
        mem.write_u32(header::RSP_PROD, 1).unwrap();
        assert_eq!(front.get_response().unwrap(), Some(Words([1])));
    }

    #[test]
    fn peer_scribbling_our_producer_index_does_not_change_notify_decisions() {
        let mem = page();
        let (mut front, mut back) = pair::<Small, Small>(mem.clone());
        assert!(!back.final_check_for_requests().unwrap());
        // A hostile backend rewrites req_prod to claim the request was already published.
        mem.write_u32(header::REQ_PROD, 1).unwrap();
        front.push_request(&Words([5])).unwrap();
        assert!(front.push_requests_and_check_notify());
    }

    #[test]
    fn raw_region_is_checked_and_usable() {
        let mut buf = alloc::vec![0u32; 1024];
        let ptr = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` outlives every handle made here and is only accessed through them.
        let misaligned = unsafe { SharedRingMem::from_raw(ptr.wrapping_add(1), 64) };
        assert_eq!(misaligned.unwrap_err(), RingError::RegionMisaligned);
        // SAFETY: as above.
        let null = unsafe { SharedRingMem::from_raw(core::ptr::null_mut(), 64) };
        assert_eq!(null.unwrap_err(), RingError::RegionMisaligned);
        // SAFETY: as above.
        let mem = unsafe { SharedRingMem::from_raw(ptr, 4096) }.unwrap();
        let (mut front, mut back) = pair::<Small, Small>(mem.clone());
        front.push_request(&Words([42])).unwrap();
        front.push_requests_and_check_notify();
        assert_eq!(back.get_request().unwrap(), Some(Words([42])));
        drop((front, back, mem));
        assert_eq!(buf[16], 42);
        assert_eq!(buf[0], 1);
    }

    #[test]
    fn read_write_u32_refuse_bad_offsets() {
        let mem = SharedRingMem::new_owned(128).unwrap();
        assert_eq!(mem.read_u32(2), None);
        assert_eq!(mem.read_u32(128), None);
        assert_eq!(mem.write_u32(126, 1), None);
        assert_eq!(mem.write_u32(124, 9), Some(()));
        assert_eq!(mem.read_u32(124), Some(9));
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    struct Sample {
        a: u16,
        b: u32,
        c: i16,
        d: u64,
    }
    le_struct!(Sample, 24; a: u16 @ 0, b: u32 @ 4, c: i16 @ 8, d: u64 @ 16);

    #[test]
    fn le_struct_codec_round_trips_zeroes_padding_and_rejects_wrong_length() {
        let v = Sample {
            a: 0x1234,
            b: 0xdead_beef,
            c: -2,
            d: 0x0102_0304_0506_0708,
        };
        let bytes = v.to_bytes();
        assert_eq!(&bytes[0..2], &[0x34, 0x12]);
        assert_eq!(&bytes[2..4], &[0, 0]);
        assert_eq!(&bytes[8..10], &[0xfe, 0xff]);
        assert_eq!(&bytes[10..16], &[0; 6]);
        assert_eq!(bytes[16], 0x08);
        assert_eq!(Sample::from_bytes(&bytes), Some(v));
        assert_eq!(Sample::from_bytes(&bytes[..23]), None);
        assert_eq!(Sample::from_bytes(&[0u8; 25]), None);
    }
}

/// `loom` model of arming `req_event` several requests ahead (run with `--cfg loom`, see
/// `tests/loom_ring.rs` for the command): the backend wants two requests, the frontend posts
/// them one publish at a time. Whatever the interleaving, a backend that goes to sleep after
/// arming is notified by the publish that completes the pair.
#[cfg(all(test, loom))]
#[allow(clippy::unwrap_used)] // test code; clippy only recognises a plain cfg(test)
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicBool;
    use loom::thread;

    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    #[repr(C)]
    struct Item(u32);

    impl RingEntry for Item {
        fn encode(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.0.to_le_bytes());
        }
        fn decode(bytes: &[u8]) -> Self {
            Item(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        }
    }

    #[test]
    fn loom_arm_request_event_two_ahead_no_lost_wakeup() {
        loom::model(|| {
            let mem = SharedRingMem::new_owned(HEADER_BYTES + 4 * 4).unwrap();
            let mut front = FrontRing::<Item, Item>::new(mem.clone()).unwrap();
            let mut back = BackRing::<Item, Item>::new(mem).unwrap();
            // Move past the initial req_event = 1, which would make the first publish notify
            // whatever the backend armed.
            front.push_request(&Item(9)).unwrap();
            front.push_requests_and_check_notify();
            assert_eq!(back.get_request().unwrap(), Some(Item(9)));
            let notified = Arc::new(AtomicBool::new(false));
            let n2 = notified.clone();
            let producer = thread::spawn(move || {
                for i in 0..2 {
                    front.push_request(&Item(i)).unwrap();
                    if front.push_requests_and_check_notify() {
                        n2.store(true, Ordering::Release);
                    }
                }
            });
            let ready = back.arm_request_event(2).unwrap();
            producer.join().unwrap();
            if ready < 2 {
                assert!(
                    notified.load(Ordering::Acquire),
                    "backend waited for two requests but was never notified"
                );
            }
            assert_eq!(back.get_request().unwrap(), Some(Item(0)));
            assert_eq!(back.get_request().unwrap(), Some(Item(1)));
        });
    }
}
