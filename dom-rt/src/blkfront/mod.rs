//! blkfront: the Xen block frontend (`blkif`, XEN-ABI.md §5, §8) for Bulkhead domains.
//!
//! A domain gets a disk served by a block backend domain (blkback) as a [`Blkfront`]:
//!
//! - **Negotiation** ([`Blkfront::connect`]): the xenbus handshake as Linux's `xen-blkfront`
//!   runs it: read `backend`/`backend-id` from the frontend directory the toolstack wrote,
//!   wait for the backend's InitWait, read `max-ring-page-order` and
//!   `multi-queue-max-queues`, grant the ring page(s), allocate the event channel(s), write
//!   `ring-ref` (or `ring-page-order` + `ring-ref<i>`), `event-channel`,
//!   `multi-queue-num-queues` with per-queue keys under `queue-<n>/`, `protocol` =
//!   `x86_64-abi`, `feature-persistent`, then go Initialised; on the backend's Connected read
//!   `sectors`, `sector-size`, `info` (mandatory), `physical-sector-size`,
//!   `feature-flush-cache`, `feature-barrier`, `feature-persistent`,
//!   `feature-max-indirect-segments`, `feature-discard`, and go Connected. Every value the
//!   backend wrote is parsed strictly (`shared_abi::xenbus`); a bad one fails the handshake
//!   with an error naming the key, recorded under `error/<frontend>/error`.
//! - **I/O** ([`Blkfront::submit_read`], [`Blkfront::submit_write`],
//!   [`Blkfront::submit_flush`], completions by [`Tag`]): an operation is split into
//!   requests of at most 11 segments (one granted page each), or into indirect requests when
//!   the backend offers `feature-max-indirect-segments`. Data is copied through pages of
//!   this domain: with persistent grants (when both sides offer them) a bounded pool of pages
//!   stays granted and is reused; otherwise each request's pages are granted for it and the
//!   grants ended when its response arrives (a grant the backend still holds is never
//!   reused). Responses may arrive in any order; an operation completes when all of its
//!   requests did. [`BlockDevice`] is the simple blocking view for domains.
//! - **Hostile backend**: every response is checked before it is acted on: its `id` must
//!   name a request in flight on the ring it arrived on, its `operation` must echo the
//!   request's, its `status` must be one the protocol defines, and the backend's response
//!   producer index must stay within what was requested. A backend that breaks any of this
//!   has broken the protocol: the device goes [`Broken`] (every pending operation fails, no
//!   page it may still write is reused, later calls fail), nothing panics.
//!
//! The transport is three seams so that the same code runs on a domain and on the host
//! against the real blkback engine: [`Grants`] (pages of ours and granting them),
//! [`Events`] (event channels) and [`XsStore`] (xenstore). `domain` (bare metal only) implements them with
//! hypercalls on bare metal; [`fake`] is a host model shared by a frontend and a backend in
//! one process.
//!
//! Single-threaded: a `Blkfront` is driven through `&mut self`; waiting blocks in
//! [`Events::wait`].

mod io;
mod negotiate;

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub mod domain;
pub mod fake;

#[cfg(test)]
mod tests;

use core::fmt;

#[cfg(test)]
use shared_abi::DomId;
use shared_abi::ring::RingError;
use shared_abi::xenbus::{StoreError, XenbusError};

pub use io::{Blkfront, Completion, Stats, Tag};
pub use negotiate::{DiskInfo, FrontConfig};

/// The seams (shared with the network frontend): see [`crate::front`].
pub use crate::front::{Events, Grants, XsStore};

/// How the backend broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// A bogus response producer index (or another ring fault).
    Ring(RingError),
    /// A response whose id names no request in flight on its ring.
    UnknownId { queue: u16, id: u64 },
    /// A response whose operation is not the request's.
    OperationMismatch { id: u64, expected: u8, got: u8 },
    /// A response status the protocol does not define.
    BadStatus { id: u64, status: i16 },
    /// The backend went away and reconnecting to its successor failed.
    Lost,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Broken::Ring(e) => write!(f, "ring: {e}"),
            Broken::UnknownId { queue, id } => {
                write!(
                    f,
                    "response id {id:#x} on queue {queue} names no request in flight"
                )
            }
            Broken::OperationMismatch { id, expected, got } => write!(
                f,
                "response {id:#x}: operation {got}, the request's was {expected}"
            ),
            Broken::BadStatus { id, status } => {
                write!(f, "response {id:#x}: undefined status {status}")
            }
            Broken::Lost => write!(f, "the backend went away and reconnecting failed"),
        }
    }
}

/// Why a frontend call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The handshake: a store failure, a missing or malformed key, an illegal transition.
    Xenbus(XenbusError),
    /// The backend did not reach `waiting_for` in time.
    Timeout { waiting_for: &'static str },
    /// The backend closed the device during the handshake (it refused our keys).
    BackendClosed,
    /// Out of pages, grant refs or event channels.
    NoResources(&'static str),
    /// A hypercall failed.
    Hypercall(crate::XenError),
    /// The backend answered `BLKIF_RSP_ERROR`.
    Io,
    /// The backend answered `BLKIF_RSP_EOPNOTSUPP`, or the feature was not offered.
    Unsupported,
    /// A write to a read-only disk.
    ReadOnly,
    /// Outside the disk, or not a whole number of logical sectors, or empty.
    BadRange { sector: u64, bytes: usize },
    /// The tag names no operation.
    UnknownTag(Tag),
    /// The backend broke the protocol; the device is dead.
    Broken(Broken),
}

impl From<XenbusError> for BlkError {
    fn from(e: XenbusError) -> Self {
        BlkError::Xenbus(e)
    }
}

impl From<StoreError> for BlkError {
    fn from(e: StoreError) -> Self {
        BlkError::Xenbus(XenbusError::Store(e))
    }
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::Xenbus(e) => write!(f, "xenbus: {e}"),
            BlkError::Timeout { waiting_for } => write!(f, "timed out waiting for {waiting_for}"),
            BlkError::BackendClosed => write!(f, "the backend closed the device"),
            BlkError::NoResources(what) => write!(f, "out of {what}"),
            BlkError::Hypercall(e) => write!(f, "hypercall failed: {e:?}"),
            BlkError::Io => write!(f, "I/O error (backend)"),
            BlkError::Unsupported => write!(f, "operation not supported by the backend"),
            BlkError::ReadOnly => write!(f, "the disk is read-only"),
            BlkError::BadRange { sector, bytes } => {
                write!(f, "bad range: {bytes} bytes at sector {sector}")
            }
            BlkError::UnknownTag(t) => write!(f, "unknown tag {t}"),
            BlkError::Broken(b) => write!(f, "backend broke the protocol: {b}"),
        }
    }
}

impl core::error::Error for BlkError {}

/// A disk as a domain uses it: logical sectors of [`sector_size`](Self::sector_size) bytes,
/// blocking calls.
pub trait BlockDevice {
    /// Logical sector size in bytes (a power of two, at least 512).
    fn sector_size(&self) -> u32;
    /// Capacity in logical sectors.
    fn sectors(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Fill `buf` (a whole number of sectors) from `sector`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError>;
    /// Write `data` (a whole number of sectors) at `sector`; returns once the backend
    /// acknowledged it.
    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), BlkError>;
    /// Make every acknowledged write durable.
    fn flush(&mut self) -> Result<(), BlkError>;
}
