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
