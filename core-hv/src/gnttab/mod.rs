//! Grant tables v1: map, copy, maptrack and their policy checks.
//!
//! - [`memory`]: the traits over guest-shared grant entries and physical frames.
//! - [`table`]: a granter's entries and active (pinned) refs; the `GTF_reading/writing`
//!   protocol with compare-exchange.
//! - [`maptrack`]: a mapper's handle table, bounded by quota.
//! - [`map`]: `GNTTABOP_map_grant_ref` / `unmap_grant_ref` and mapper teardown.
//! - [`copy`]: the `GNTTABOP_copy` operation.
//! - [`policy`]: the [`GrantPolicy`] hook called at every map and copy.
//!
//! **Locking.** Each domain's [`DomainGrants`] sits behind its own `spin::Mutex`. Every
//! operation here holds at most *one* domain's lock at a time (reserve a handle in the
//! mapper, then pin in the granter, then fill the handle), so there is no lock order to get
//! wrong; what keeps a frame alive between the steps is the frame reference
//! ([`GrantMemory::pin`]), taken before the granter's lock is dropped.
//!
//! **Lifetimes.** A mapped frame holds a frame reference until it is unmapped, so it is never
//! freed while mapped even if the granter dies (the granter's `DomainGrants` is simply dropped
//! from the registry). Each `DomainGrants` has an `instance` number, recorded in every
//! mapping, so a later domain reusing the domid is never unpinned by a stale mapping.
//! A dying mapper's mappings are torn down with [`map::teardown_mapper`].

pub mod copy;
pub mod map;
pub mod maptrack;
pub mod memory;
pub mod policy;
pub mod table;

use shared_abi::DomId;
use spin::Mutex;

pub use memory::{GrantEntries, GrantMemory, InMemoryEntries, Mfn};
pub use policy::{CapabilityPolicy, GrantPolicy};
pub use table::GrantTable;

use maptrack::Maptrack;

/// One domain's grant state: the table of grants it makes and the mappings it holds.
#[derive(Debug)]
pub struct DomainGrants<E> {
    domid: DomId,
    instance: u64,
    pub table: GrantTable<E>,
    pub maptrack: Maptrack,
}

impl<E: GrantEntries> DomainGrants<E> {
    /// `instance` must differ between two domains that ever share a domid (a generation
    /// counter); `max_maps` is the maptrack quota.
    pub fn new(domid: DomId, instance: u64, entries: E, max_maps: u32) -> Self {
        DomainGrants {
            domid,
            instance,
            table: GrantTable::new(domid, entries),
            maptrack: Maptrack::new(max_maps),
        }
    }

    pub fn domid(&self) -> DomId {
        self.domid
    }

    pub fn instance(&self) -> u64 {
        self.instance
    }
}

/// Finds a live domain's grant state by domid (implemented by the domain table).
pub trait GrantRegistry {
    type Entries: GrantEntries;
    fn grants(&self, dom: DomId) -> Option<&Mutex<DomainGrants<Self::Entries>>>;
}

#[cfg(test)]
mod tests;
