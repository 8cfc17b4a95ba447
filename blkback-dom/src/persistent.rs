//! Persistent grants (`feature-persistent`): one queue's pool of grant mappings kept after
//! their request completes, keyed by grant ref, so a frontend that reuses the same pages
//! (Linux blkfront does) costs no map/unmap per request.
//!
//! Invariants: at most `max` entries; each entry is one live writable mapping (mapped
//! read-write whatever the first request needed, since a later request may read into it);
//! `users` counts the in-flight requests holding it. When the pool is full, further grants are
//! mapped per request and unmapped after (no eviction: blkfront's working set is a fixed set
//! of pages, so a full pool means the frontend is not reusing and eviction would not help).
//! [`PersistentGrants::drain`] hands back every mapping for unmapping at disconnect.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use shared_abi::grant_table::GrantRef;

use crate::grant::Mapping;

#[derive(Clone, Copy, Debug)]
struct Entry {
    mapping: Mapping,
    users: u32,
}

/// One queue's persistent mappings.
#[derive(Debug, Default)]
pub struct PersistentGrants {
    max: usize,
    entries: BTreeMap<GrantRef, Entry>,
}

impl PersistentGrants {
    /// A pool of at most `max` mappings (0: persistence off).
    pub fn new(max: usize) -> Self {
        PersistentGrants {
            max,
            entries: BTreeMap::new(),
        }
    }

    /// Mappings kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries that can still be added.
    pub fn room(&self) -> usize {
        self.max.saturating_sub(self.entries.len())
    }

    /// Take a reference on the mapping of `gref`, if kept.
    pub fn get(&mut self, gref: GrantRef) -> Option<Mapping> {
        let e = self.entries.get_mut(&gref)?;
        e.users += 1;
        Some(e.mapping)
    }

    /// Keep `m` (with one user). False if full or `m.gref` is already kept: the caller then
    /// treats `m` as a per-request mapping.
    pub fn insert(&mut self, m: Mapping) -> bool {
        if self.room() == 0 || self.entries.contains_key(&m.gref) || !m.writable {
            return false;
        }
        self.entries.insert(
            m.gref,
            Entry {
                mapping: m,
                users: 1,
            },
        );
        true
    }

    /// Drop one reference on `gref`'s mapping (it stays mapped).
    pub fn put(&mut self, gref: GrantRef) {
        if let Some(e) = self.entries.get_mut(&gref) {
            e.users = e.users.saturating_sub(1);
        }
    }

    /// True if `gref` is kept.
    pub fn contains(&self, gref: GrantRef) -> bool {
        self.entries.contains_key(&gref)
    }

    /// Forget every entry and return the mappings to unmap.
    pub fn drain(&mut self) -> Vec<Mapping> {
        let out = self.entries.values().map(|e| e.mapping).collect();
        self.entries.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(gref: GrantRef) -> Mapping {
        Mapping {
            domid: 1,
            gref,
            writable: true,
            handle: gref,
            token: u64::from(gref),
        }
    }

    #[test]
    fn pool_is_bounded_and_reuses_by_gref() {
        let mut p = PersistentGrants::new(2);
        assert!(p.insert(m(8)));
        assert!(!p.insert(m(8)), "duplicate ref");
        assert!(p.insert(m(9)));
        assert!(!p.insert(m(10)), "full");
        assert_eq!(p.get(8), Some(m(8)));
        assert_eq!(p.get(10), None);
        p.put(8);
        let read_only = Mapping {
            writable: false,
            ..m(11)
        };
        let mut q = PersistentGrants::new(4);
        assert!(!q.insert(read_only), "only writable mappings are kept");
        let mut all = p.drain();
        all.sort_by_key(|x| x.gref);
        assert_eq!(all, [m(8), m(9)]);
        assert!(p.is_empty());
    }
}
