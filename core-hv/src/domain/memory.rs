//! What the portable domain code needs from the memory hardware, as traits the arch layer
//! implements (and host tests fake), plus per-domain reservation accounting.
//!
//! - [`FrameSource`]: physical frames (4 KiB) from the hypervisor's free pool.
//! - [`PhysMem`]: reading and writing a frame's bytes (the arch layer goes through its direct
//!   map; these pages may be shared with a running domain, so implementations use volatile or
//!   atomic-width copies, never Rust references into them).
//! - [`AddressSpace`]: one domain's page tables, which only the hypervisor edits.
//! - [`Reservation`] / [`ReservedFrames`]: every frame a domain holds — its pages and the page
//!   tables that map them — is drawn through its reservation, so the limit is exact and a
//!   destroyed domain gives back precisely what it took.

use alloc::boxed::Box;
use bitflags::bitflags;
use shared_abi::errno::XenError;

/// A machine frame number (physical address >> 12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mfn(pub u64);

pub const PAGE_SIZE: u64 = shared_abi::PAGE_SIZE as u64;

bitflags! {
    /// Permissions of a present mapping. Readable is implied by presence.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PagePerms: u8 {
        /// Accessible from ring 3 (every domain mapping has it).
        const USER = 1 << 0;
        const WRITE = 1 << 1;
        /// Executable (NX clear).
        const EXEC = 1 << 2;
        /// Device memory (a BAR page): uncached, never RAM. The hypervisor never copies
        /// hypercall arguments through such a page and never frees its frame.
        const UNCACHED = 1 << 3;
    }
}

impl PagePerms {
    pub const USER_RO: PagePerms = PagePerms::USER;
    pub const USER_RW: PagePerms = PagePerms::USER.union(PagePerms::WRITE);
    pub const USER_RX: PagePerms = PagePerms::USER.union(PagePerms::EXEC);
}

/// The hypervisor's pool of free frames.
pub trait FrameSource {
    /// One frame, or `None` when none is left. Its contents are unspecified (callers zero).
    fn alloc_frame(&mut self) -> Option<Mfn>;
    /// Give a frame back. Callers free only frames they allocated and no longer map.
    fn free_frame(&mut self, frame: Mfn);
    /// Frames free in the pool, if the source knows (for reports).
    fn free_frames(&self) -> Option<u64> {
        None
    }
}

/// Access to the bytes of physical frames. `offset + len` never exceeds [`PAGE_SIZE`]
/// (callers guarantee it; implementations may check and ignore out-of-range requests).
pub trait PhysMem {
    fn read(&self, frame: Mfn, offset: usize, buf: &mut [u8]);
    fn write(&self, frame: Mfn, offset: usize, data: &[u8]);
    fn zero(&self, frame: Mfn) {
        self.write(frame, 0, &[0u8; PAGE_SIZE as usize]);
    }
    /// The frame as 512 atomic little-endian words: the hypervisor's view of a page it shares
    /// with a domain (`shared_info`, grant-table frames), for the protocols that need atomic
    /// read-modify-write (event bits, grant flags). `None` if the platform cannot give one
    /// (the domain then has no event channels or grant table).
    ///
    /// The view stays usable for as long as the frame is allocated; the domain code drops every
    /// view of a frame before it frees the frame ([`super::shared`]).
    fn atomic_frame(&self, frame: Mfn) -> Option<&'static AtomicFrame> {
        let _ = frame;
        None
    }
}

/// A frame as atomic 64-bit words (see [`PhysMem::atomic_frame`]).
pub type AtomicFrame = [core::sync::atomic::AtomicU64; (PAGE_SIZE / 8) as usize];

/// Why a page-table edit failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// No frame for an intermediate table (the reservation or the pool is exhausted).
    OutOfFrames,
    /// `va` is already mapped.
    AlreadyMapped,
    /// `va` is not page-aligned or not in the domain half.
    BadAddress,
}

impl MapError {
    pub fn errno(self) -> XenError {
        match self {
            MapError::OutOfFrames => XenError::ENOMEM,
            MapError::AlreadyMapped => XenError::EEXIST,
            MapError::BadAddress => XenError::EINVAL,
        }
    }
}

/// One domain's page tables (the lower half; the arch layer shares its own upper half into
/// every one). Edited only by the hypervisor, under the hypervisor lock.
pub trait AddressSpace: Send {
    /// Map the page at `va` (page-aligned, below `DOMAIN_VA_END`) to `frame`. Intermediate
    /// tables come from `tables` (zeroed by the implementation). On error nothing is mapped.
    fn map(
        &mut self,
        va: u64,
        frame: Mfn,
        perms: PagePerms,
        tables: &mut dyn FrameSource,
    ) -> Result<(), MapError>;
    /// Remove the mapping at `va`, flushing it from every CPU's TLB; returns its frame.
    fn unmap(&mut self, va: u64) -> Option<Mfn>;
    /// The mapping of the page containing `va`.
    fn translate(&self, va: u64) -> Option<(Mfn, PagePerms)>;
    /// The root table frame (the arch layer loads it into CR3).
    fn root(&self) -> Mfn;
    /// Free every table frame into `tables`. Only called once no CPU has this address space
    /// loaded and after every page was unmapped; the object is dropped afterwards.
    fn release(&mut self, tables: &mut dyn FrameSource);
}

/// Makes empty address spaces (the arch layer: a fresh root with the hypervisor half).
pub trait AddressSpaceFactory {
    fn create(&mut self, tables: &mut dyn FrameSource) -> Result<Box<dyn AddressSpace>, MapError>;
}

/// A domain's memory limit and how much of it is in use, in pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    limit: u64,
    used: u64,
}

impl Reservation {
    pub const fn new(limit_pages: u64) -> Self {
        Reservation {
            limit: limit_pages,
            used: 0,
        }
    }
    pub const fn limit(&self) -> u64 {
        self.limit
    }
    pub const fn used(&self) -> u64 {
        self.used
    }
    pub const fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
    /// Change the limit (`XEN_DOMCTL_max_mem`). Below what is used, nothing is taken away:
    /// new allocations are refused until the domain gives pages back.
    pub fn set_limit(&mut self, limit_pages: u64) {
        self.limit = limit_pages;
    }
    /// The domain gave up a frame that is not going back to the pool yet (another domain
    /// still maps it): it no longer counts against this domain.
    pub fn uncharge(&mut self) {
        self.used = self.used.saturating_sub(1);
    }
}

/// A [`FrameSource`] that charges every frame to a domain's [`Reservation`] and refuses
/// past its limit.
pub struct ReservedFrames<'a> {
    pub reservation: &'a mut Reservation,
    pub pool: &'a mut dyn FrameSource,
}

impl FrameSource for ReservedFrames<'_> {
    fn alloc_frame(&mut self) -> Option<Mfn> {
        if self.reservation.used >= self.reservation.limit {
            return None;
        }
        let f = self.pool.alloc_frame()?;
        self.reservation.used += 1;
        Some(f)
    }

    fn free_frame(&mut self, frame: Mfn) {
        self.pool.free_frame(frame);
        self.reservation.used = self.reservation.used.saturating_sub(1);
    }

    fn free_frames(&self) -> Option<u64> {
        self.pool.free_frames()
    }
}
