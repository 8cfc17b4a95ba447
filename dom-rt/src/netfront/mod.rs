//! netfront: the Xen network frontend (`netif`, XEN-ABI.md §6, §8) for Bulkhead domains.
//!
//! A domain gets a virtual NIC served by a network backend domain (netback) as a
//! [`Netfront`]:
//!
//! - **Negotiation** ([`Netfront::connect`]): the xenbus handshake as Linux's `xen-netfront`
//!   runs it: read `backend`/`backend-id` and `mac` from the frontend directory the
//!   toolstack wrote (`/local/domain/<me>/device/vif/<devid>`), wait for the backend's
//!   InitWait, read `feature-rx-copy` (required), `multi-queue-max-queues`,
//!   `feature-split-event-channels`, `feature-sg`, `feature-gso-tcpv4`,
//!   `feature-ipv6-csum-offload`; grant one tx and one rx ring page per queue, allocate the
//!   event channel(s), write `tx-ring-ref`, `rx-ring-ref`, `event-channel` (or
//!   `event-channel-tx` + `event-channel-rx`), with `multi-queue-num-queues` and per-queue
//!   keys under `queue-<n>/` when there is more than one queue, `request-rx-copy` = 1,
//!   `feature-rx-notify` = 1, `feature-sg`, `feature-gso-tcpv4` = 0 and
//!   `feature-gso-tcpv6` = 0 (no GSO), `feature-no-csum-offload` /
//!   `feature-ipv6-csum-offload` (from [`NetConfig::csum_offload`]), in one transaction;
//!   fill the rx rings; go **Connected** and wait for the backend's Connected. Like Linux,
//!   netfront never goes Initialised: netback (Linux's and Bulkhead's `netback-dom`)
//!   connects when the frontend reads Connected. Every value the backend (or the toolstack)
//!   wrote is parsed strictly (`shared_abi::xenbus`); a bad one fails the handshake with an
//!   error naming the key, recorded under `error/<frontend>/error`, and the frontend goes
//!   Closing.
//! - **Data path**: the rx rings are kept filled with pages granted (writable) to the
//!   backend, one grant per posted buffer, ended when the buffer's response arrives
//!   (`feature-rx-copy`: the backend grant-copies into them). Multi-slot frames
//!   (`NETRXF_more_data`) are reassembled, extra-info slots (GSO and others) are skipped,
//!   `NETRXF_data_validated`/`NETRXF_csum_blank` are handed up on [`RxFrame`]. A frame is
//!   sent by copying it into pages of ours granted read-only, one slot per page
//!   (`NETTXF_more_data` chains them when the backend offers `feature-sg`); each slot's
//!   grant ends when its response arrives, and a page is reused only after that (a page the
//!   backend still maps is set aside).
//! - **Hostile backend**: every response is checked before it is acted on: a tx response's
//!   id must name a slot in flight on that ring and its status be OKAY, ERROR or DROPPED;
//!   an rx response must echo the id of the request in its slot and carry a status that is
//!   ERROR, DROPPED or a byte count fitting the page after its offset; the response
//!   producer index must stay within what was requested. A backend that breaks any of this
//!   makes the device [`Broken`]: nothing panics, no page it was given is reused, later calls
//!   fail (frames already received can still be read).
//! - **Backend restart** ([`Netfront::follow_backend`], [`Netfront::reconnect`]): when the
//!   toolstack re-points the device at a new backend (or the backend offers the device
//!   again from InitWait), the old rings are dropped, the handshake runs again and the rx
//!   rings are refilled. **Tx frames that had no response from the old backend are dropped**
//!   (counted in [`NetStats::tx_dropped`]); like a lost frame on a wire, TCP retransmits.
//!   The toolstack is expected to reset the frontend's `state` to Initialising when it
//!   re-points the device (as Bulkhead's ctl does), so that the new backend does not connect
//!   to the old ring keys before the frontend has written new ones.
//!
//! The transport is the seams of [`crate::front`] ([`Grants`], [`Events`], [`XsStore`]),
//! shared with blkfront: the same code runs on a domain (`DomainGrants`, `DomainEvents`,
//! `XenbusStore`) and on the host against the real netback engine (`tests.rs`).
//!
//! Single-threaded: a `Netfront` is driven through `&mut self`; [`Netfront::wait_event`]
//! blocks in [`Events::wait`].

mod io;
mod negotiate;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use core::fmt;

use shared_abi::ring::RingError;
use shared_abi::xenbus::{StoreError, XenbusError};

pub use crate::front::{Events, Grants, XsStore};
pub use io::{NetStats, Netfront, RxFrame};
pub use negotiate::NetInfo;

use crate::blkfront::BlkError;

/// Most queues a frontend asks for (Linux's `xennet_max_queues` is the vCPU count; the
/// backends Bulkhead runs offer at most 16).
pub const MAX_QUEUES: u32 = 16;
/// Slots of a one-page tx or rx ring.
pub const RING_SLOTS: usize = 256;
/// Most data slots one frame may use (`XEN_NETIF_NR_SLOTS_MIN`).
pub const MAX_SLOTS_PER_FRAME: usize = shared_abi::netif::XEN_NETIF_NR_SLOTS_MIN;
/// Largest frame (`XEN_NETIF_MAX_TX_SIZE`).
pub const MAX_FRAME: usize = shared_abi::netif::XEN_NETIF_MAX_TX_SIZE;
/// Smallest frame the backend accepts (an Ethernet header).
pub const MIN_FRAME: usize = 14;

/// What the frontend asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Most queues to use (capped by the backend's `multi-queue-max-queues` and by
    /// [`MAX_QUEUES`]).
    pub queues: u32,
    /// Receive buffers (pages) kept posted on each queue's rx ring, `1..=256`. A multi-slot
    /// frame needs as many buffers as it has pages: keep at least 18 with `sg`.
    pub rx_buffers: usize,
    /// Accept multi-slot rx frames (`feature-sg`) and send frames larger than a page as
    /// several slots (when the backend offers `feature-sg` too).
    pub sg: bool,
    /// Accept frames whose checksum is left blank (`csum_blank`, checksum offload); off
    /// writes `feature-no-csum-offload` = 1 so the backend delivers complete checksums.
    pub csum_offload: bool,
    /// Use one event channel per ring direction when the backend offers it.
    pub split_event_channels: bool,
    /// Received frames kept until [`Netfront::recv`] takes them; more are dropped
    /// ([`NetStats::rx_dropped`]).
    pub rx_queue: usize,
    /// How many [`XsStore::wait`] rounds to wait for each backend state before giving up.
    pub wait_rounds: u32,
}

impl Default for NetConfig {
    /// One queue, 64 rx buffers, scatter-gather, no checksum offload, split event channels
    /// when offered.
    fn default() -> Self {
        NetConfig {
            queues: 1,
            rx_buffers: 64,
            sg: true,
            csum_offload: false,
            split_event_channels: true,
            rx_queue: 1024,
            wait_rounds: 20_000,
        }
    }
}

/// Which ring of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    Tx,
    Rx,
}

/// How the backend broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// A bogus response producer index (or another ring fault).
    Ring {
        queue: u16,
        ring: Ring,
        err: RingError,
    },
    /// A response whose id names no request in flight (tx), or is not the id of the request
    /// in its slot (rx).
    UnknownId { queue: u16, ring: Ring, id: u16 },
    /// A response status the protocol does not define there.
    BadStatus {
        queue: u16,
        ring: Ring,
        id: u16,
        status: i16,
    },
    /// An rx response whose data runs past its page (`offset` + `status` > 4096).
    BadOffset {
        queue: u16,
        id: u16,
        offset: u16,
        status: i16,
    },
    /// The backend went away and reconnecting to its successor failed.
    Lost,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Broken::Ring { queue, ring, err } => write!(f, "queue {queue} {ring:?} ring: {err}"),
            Broken::UnknownId { queue, ring, id } => write!(
                f,
                "queue {queue} {ring:?} response id {id} names no request in flight"
            ),
            Broken::BadStatus {
                queue,
                ring,
                id,
                status,
            } => write!(
                f,
                "queue {queue} {ring:?} response {id}: undefined status {status}"
            ),
            Broken::BadOffset {
                queue,
                id,
                offset,
                status,
            } => write!(
                f,
                "queue {queue} rx response {id}: {status} bytes at offset {offset} run past the page"
            ),
            Broken::Lost => write!(f, "the backend went away and reconnecting failed"),
        }
    }
}

/// Why a frontend call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetError {
    /// The handshake: a store failure, a missing or malformed key.
    Xenbus(XenbusError),
    /// The backend did not reach `waiting_for` in time.
    Timeout { waiting_for: &'static str },
    /// The backend closed the device during the handshake (it refused our keys).
    BackendClosed,
    /// Out of pages, grant refs or event channels.
    NoResources(&'static str),
    /// A hypercall failed.
    Hypercall(crate::XenError),
    /// No room on the tx ring (after taking the responses there were): try again after
    /// [`Netfront::poll`] or [`Netfront::wait_event`].
    Busy,
    /// A frame shorter than an Ethernet header, longer than 65535 bytes, or longer than a
    /// page without scatter-gather.
    BadFrame { len: usize },
    /// The backend broke the protocol; the device is dead.
    Broken(Broken),
}

impl From<XenbusError> for NetError {
    fn from(e: XenbusError) -> Self {
        NetError::Xenbus(e)
    }
}

impl From<StoreError> for NetError {
    fn from(e: StoreError) -> Self {
        NetError::Xenbus(XenbusError::Store(e))
    }
}

/// The seams report [`BlkError`]; only these variants come out of them.
impl From<BlkError> for NetError {
    fn from(e: BlkError) -> Self {
        match e {
            BlkError::NoResources(what) => NetError::NoResources(what),
            BlkError::Hypercall(e) => NetError::Hypercall(e),
            BlkError::Xenbus(e) => NetError::Xenbus(e),
            BlkError::Timeout { waiting_for } => NetError::Timeout { waiting_for },
            BlkError::BackendClosed => NetError::BackendClosed,
            _ => NetError::NoResources("the transport"),
        }
    }
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::Xenbus(e) => write!(f, "xenbus: {e}"),
            NetError::Timeout { waiting_for } => write!(f, "timed out waiting for {waiting_for}"),
            NetError::BackendClosed => write!(f, "the backend closed the device"),
            NetError::NoResources(what) => write!(f, "out of {what}"),
            NetError::Hypercall(e) => write!(f, "hypercall failed: {e:?}"),
            NetError::Busy => write!(f, "no room on the tx ring"),
            NetError::BadFrame { len } => write!(f, "cannot send a frame of {len} bytes"),
            NetError::Broken(b) => write!(f, "backend broke the protocol: {b}"),
        }
    }
}

impl core::error::Error for NetError {}
