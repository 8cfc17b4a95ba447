//! blkback-dom: the block backend driver domain (Xen `blkif`), as a host-tested library. The
//! domain binary `blkback-domain` (src/bin/blkback-domain.rs: xenstore watch, grant mapping,
//! event loop, RAM disk or the assigned virtio-blk disk) is a thin shell around it; dom-rt's
//! blkfront is tested against it in one process (tests/blkfront.rs).
//!
//! - [`device`]: storage behind the engine: [`device::BlockDevice`] (synchronous disk),
//!   [`device::BlockIo`] (submit now, complete later, in any order), the RAM disk; and, with
//!   feature `std`, [`file::FileDisk`] (a host file, `fdatasync` for flush).
//! - [`grant`]: the grant-mapping seam ([`grant::GrantMapper`]) and a fake grant memory for
//!   host tests and benches.
//! - [`request`]: checking one request completely before acting on it.
//! - [`persistent`]: the bounded per-queue pool of persistent grant mappings.
//! - [`engine`]: the per-device engine ([`engine::Vbd`]): queues, dispatch, completions.
//! - [`xenbus`]: the backend side of the xenbus handshake over a key/value store.
//!
//! No locks anywhere: each engine is driven by one thread at a time (`&mut self`).
#![forbid(unsafe_code)]
#![cfg_attr(not(any(test, feature = "std")), no_std)]

extern crate alloc;

pub mod device;
pub mod engine;
#[cfg(feature = "std")]
pub mod file;
pub mod grant;
pub mod persistent;
pub mod request;
pub mod xenbus;
