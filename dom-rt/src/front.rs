//! The seams a Xen split-driver frontend runs on, shared by [`crate::blkfront`] and
//! [`crate::netfront`]: [`Grants`] (pages of ours and granting them), [`Events`] (event
//! channels, waiting, the clock) and [`XsStore`] (xenstore as a handshake needs it).
//!
//! On a Bulkhead domain they are implemented with hypercalls by `DomainGrants`,
//! `DomainEvents` and `XenbusStore` (`crate::blkfront::domain`, bare metal only, also
//! re-exported here); on the host by `crate::blkfront::fake`, a model shared in one process
//! by a frontend and the backend a test runs.
//!
//! The seams report failures as [`BlkError`] (`NoResources`, `Hypercall`): they were
//! blkfront's first; the network frontend maps them into its own error type.

use alloc::string::String;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::GrantRef;
use shared_abi::ring::SharedRingMem;
use shared_abi::xenbus::{Store, StoreError, XenbusState, path, read_state};

pub use crate::blkfront::BlkError;
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub use crate::blkfront::domain::{DomPage, DomainEvents, DomainGrants, XenbusStore};

/// Pages of this domain and granting them to another domain.
pub trait Grants {
    /// A page of ours (4 KiB).
    type Page;
    /// A fresh page (contents unspecified).
    fn alloc_page(&mut self) -> Result<Self::Page, BlkError>;
    /// Give a page back (its grant, if any, has ended).
    fn free_page(&mut self, page: Self::Page);
    /// `2^order` contiguous zeroed pages holding a shared ring: the region and a handle per
    /// page (page 0 first), to grant each.
    fn alloc_ring(&mut self, order: u32) -> Result<(SharedRingMem, Vec<Self::Page>), BlkError>;
    /// Copy `out.len()` bytes at `offset` of `page` into `out` (`offset + len <= 4096`).
    fn read(&mut self, page: &Self::Page, offset: usize, out: &mut [u8]);
    /// Copy `data` into `page` at `offset` (`offset + len <= 4096`).
    fn write(&mut self, page: &Self::Page, offset: usize, data: &[u8]);
    /// Grant `page` to `domid`: the grant ref.
    fn grant(
        &mut self,
        domid: DomId,
        page: &Self::Page,
        readonly: bool,
    ) -> Result<GrantRef, BlkError>;
    /// End the grant `gref`; false (and the grant stays) if the grantee still maps it.
    fn end_access(&mut self, gref: GrantRef) -> bool;
}

/// Event channels to the backend.
pub trait Events {
    /// A new port of ours that `remote` may bind.
    fn alloc_unbound(&mut self, remote: DomId) -> Result<EvtchnPort, BlkError>;
    /// Close a port.
    fn close(&mut self, port: EvtchnPort);
    /// Signal the peer.
    fn notify(&mut self, port: EvtchnPort) -> Result<(), BlkError>;
    /// Block until one of `ports` may have fired. Returning early (spuriously, or after a
    /// bounded time) is allowed: callers re-check the rings.
    fn wait(&mut self, ports: &[EvtchnPort]);
    /// Monotonic time in ns, the clock deadlines given to the frontends are in
    /// ([`crate::time::now_ns`] unless a host model keeps its own).
    fn now_ns(&mut self) -> u64 {
        crate::time::now_ns()
    }
}

/// Xenstore as the handshake needs it.
pub trait XsStore: Store {
    /// Write every `(path, value)`, atomically where the store can (a transaction).
    fn write_all(&mut self, entries: &[(String, String)]) -> Result<(), StoreError> {
        for (k, v) in entries {
            self.write(k, v)?;
        }
        Ok(())
    }
    /// Block until something in the store may have changed (bounded; spurious returns are
    /// allowed: callers re-read).
    fn wait(&mut self);
}

/// Wait (bounded by `rounds` store waits) until the backend's state satisfies `done`;
/// `waiting_for` names the state in a timeout. A backend closing while a frontend waits for
/// Connected has refused the device.
pub(crate) fn wait_backend<S: XsStore>(
    store: &mut S,
    backend: &str,
    rounds: u32,
    waiting_for: &'static str,
    done: impl Fn(XenbusState) -> bool,
) -> Result<XenbusState, BlkError> {
    for _ in 0..=rounds {
        // A backend directory still being created (or not yet readable) is not ready yet.
        let st = read_state(store, backend).unwrap_or(XenbusState::Unknown);
        if done(st) {
            return Ok(st);
        }
        if matches!(st, XenbusState::Closing | XenbusState::Closed) && waiting_for == "Connected" {
            return Err(BlkError::BackendClosed);
        }
        store.wait();
    }
    Err(BlkError::Timeout { waiting_for })
}

/// Write a frontend's `state`.
pub(crate) fn set_state<S: XsStore>(
    store: &mut S,
    dir: &str,
    st: XenbusState,
) -> Result<(), BlkError> {
    store.write(&path(dir, "state"), st.as_str())?;
    Ok(())
}

/// Most store waits a release spends retrying grants the backend still maps (a backend
/// tearing down on its own after a forced detach may not have unmapped yet).
pub(crate) const GRANT_RETRY_ROUNDS: u32 = 2000;

/// How a frontend's release of a device ended ([`crate::blkfront::Blkfront::release`],
/// [`crate::netfront::Netfront::release`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// The backend was Closing or Closed (or its directory was gone) in time.
    pub backend_closing: bool,
    /// The backend reached Closed (or its directory went away) in time: it unmapped
    /// everything.
    pub backend_closed: bool,
    /// The frontend directory was gone (a forced detach): nothing was written to it.
    pub frontend_gone: bool,
    /// Grants ended.
    pub ended: usize,
    /// Grants the backend still mapped: they stay, and their pages are leaked (never reused).
    pub leaked: usize,
    /// Operations (blkfront) or tx frames (netfront) in flight that failed or were dropped.
    pub dropped: usize,
}

impl Released {
    /// As a result: a timeout if the backend never reached Closing (`waiting_for` =
    /// "Closing") or never reached Closed ("Closed").
    pub fn result(&self) -> Result<(), BlkError> {
        if !self.backend_closing {
            Err(BlkError::Timeout {
                waiting_for: "Closing",
            })
        } else if !self.backend_closed {
            Err(BlkError::Timeout {
                waiting_for: "Closed",
            })
        } else {
            Ok(())
        }
    }
}

/// The frontend half of the xenbus close handshake, shared by blkfront and netfront (Linux's
/// `xenbus_dev_shutdown` / `xenbus_frontend_closed`): unless the backend already closes
/// (a toolstack detach: it went Closing, or its directory is gone), go Closing and wait for
/// it to; then go Closed, and wait for the backend's Closed (it unmaps everything before it
/// writes that). Each wait is bounded by `rounds` store waits; a backend that never answers
/// is reported in the result, never waited for forever. Nothing is written to a frontend
/// directory that is gone (the toolstack removed the device): that would re-create it.
/// Only the `backend_*` and `frontend_gone` fields are filled in.
pub(crate) fn close_handshake<S: XsStore>(
    store: &mut S,
    frontend_dir: &str,
    backend: &str,
    rounds: u32,
) -> Released {
    let state = |store: &mut S| read_state(store, backend).unwrap_or(XenbusState::Unknown);
    let closing = |s: XenbusState| {
        matches!(
            s,
            XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown
        )
    };
    let closed = |s: XenbusState| matches!(s, XenbusState::Closed | XenbusState::Unknown);
    // A `state` node we cannot read counts as gone too: writing there cannot help.
    let mut r = Released {
        frontend_gone: !matches!(store.read(&path(frontend_dir, "state")), Ok(Some(_))),
        ..Released::default()
    };
    if !closing(state(store)) && !r.frontend_gone {
        let _ = set_state(store, frontend_dir, XenbusState::Closing);
    }
    for _ in 0..=rounds {
        if closing(state(store)) {
            r.backend_closing = true;
            break;
        }
        store.wait();
    }
    if !r.frontend_gone {
        let _ = set_state(store, frontend_dir, XenbusState::Closed);
    }
    if r.backend_closing {
        for _ in 0..=rounds {
            if closed(state(store)) {
                r.backend_closed = true;
                break;
            }
            store.wait();
        }
    }
    r
}
