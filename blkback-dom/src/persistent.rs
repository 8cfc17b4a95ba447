//! Persistent grants (`feature-persistent`): one queue's pool of grant mappings kept after
//! their request completes, keyed by grant ref, so a frontend that reuses the same pages
//! (Linux blkfront does) costs no map/unmap per request.
//!
//! Invariants: at most `max` entries once in-use entries over a lowered limit are released;
//! each entry is one live writable mapping (mapped read-write whatever the first request
//! needed, since a later request may read into it); `users` counts the in-flight requests
//! holding it. When the pool is full, further grants are mapped per request and unmapped after
//! (blkfront's working set is a fixed set of pages, so a full pool means the frontend is not
//! reusing and churning the pool would not help).
//!
//! The limit can move: every mapping counts against the backend domain's one maptrack quota,
//! shared by all its frontends, so the domain divides a budget among the connected queues and
//! lowers a pool's limit when another frontend connects ([`PersistentGrants::set_max`]:
//! idle entries go at once, least recently used first; busy ones when their last user puts
//! them back). Under map pressure [`PersistentGrants::evict_idle`] gives up every idle entry.
//! [`PersistentGrants::drain`] hands back every mapping for unmapping at disconnect.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use shared_abi::grant_table::GrantRef;

use crate::grant::Mapping;

#[derive(Clone, Copy, Debug)]
struct Entry {
    mapping: Mapping,
    users: u32,
    /// The pool's clock when last taken: the lowest is the least recently used.
    last_used: u64,
}

/// One queue's persistent mappings.
#[derive(Debug, Default)]
pub struct PersistentGrants {
    max: usize,
    entries: BTreeMap<GrantRef, Entry>,
    clock: u64,
}

impl PersistentGrants {
    /// A pool of at most `max` mappings (0: persistence off).
    pub fn new(max: usize) -> Self {
        PersistentGrants {
            max,
            entries: BTreeMap::new(),
            clock: 0,
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
        self.clock += 1;
        e.last_used = self.clock;
        Some(e.mapping)
    }

    /// The current limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Change the limit; returns the idle mappings that must go now to meet it (least
    /// recently used first). Busy entries over the limit go when [`Self::put`] frees them.
    pub fn set_max(&mut self, max: usize) -> Vec<Mapping> {
        self.max = max;
        let excess = self.entries.len().saturating_sub(max);
        if excess == 0 {
            return Vec::new();
        }
        let mut idle: Vec<(u64, GrantRef)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.users == 0)
            .map(|(&g, e)| (e.last_used, g))
            .collect();
        idle.sort_unstable();
        idle.truncate(excess);
        idle.into_iter()
            .filter_map(|(_, g)| self.entries.remove(&g).map(|e| e.mapping))
            .collect()
    }

    /// Give up every mapping no request holds (map pressure); returns them for unmapping.
    pub fn evict_idle(&mut self) -> Vec<Mapping> {
        let idle: Vec<GrantRef> = self
            .entries
            .iter()
            .filter(|(_, e)| e.users == 0)
            .map(|(&g, _)| g)
            .collect();
        idle.into_iter()
            .filter_map(|g| self.entries.remove(&g).map(|e| e.mapping))
            .collect()
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
                last_used: self.clock,
            },
        );
        self.clock += 1;
        true
    }

    /// Drop one reference on `gref`'s mapping. It stays mapped, unless the pool is over its
    /// (lowered) limit and this was the last user: then it is returned for unmapping.
    pub fn put(&mut self, gref: GrantRef) -> Option<Mapping> {
        let e = self.entries.get_mut(&gref)?;
        e.users = e.users.saturating_sub(1);
        if e.users == 0 && self.entries.len() > self.max {
            return self.entries.remove(&gref).map(|e| e.mapping);
        }
        None
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

    #[test]
    fn lowering_the_limit_evicts_idle_least_recently_used_first_and_busy_ones_on_release() {
        let mut p = PersistentGrants::new(4);
        for g in 8..12 {
            assert!(p.insert(m(g)));
            assert_eq!(p.put(g), None);
        }
        // 8 is used again (most recent); 9 is busy.
        p.get(8);
        assert_eq!(p.put(8), None);
        p.get(9);
        let gone = p.set_max(1);
        assert_eq!(
            gone,
            [m(10), m(11), m(8)],
            "idle ones, least recently used first"
        );
        assert_eq!(p.len(), 1, "9 is busy and stays");
        assert_eq!(p.put(9), None, "at the limit: kept");
        assert_eq!(p.set_max(0), [m(9)]);
        assert!(p.is_empty());
        assert!(!p.insert(m(12)), "limit 0 keeps nothing");
    }

    #[test]
    fn a_busy_entry_over_the_limit_goes_when_its_last_user_releases_it() {
        let mut p = PersistentGrants::new(2);
        assert!(p.insert(m(8)));
        assert!(p.insert(m(9)));
        p.get(8);
        assert!(p.set_max(0).is_empty(), "both busy");
        assert_eq!(p.put(8), None, "8 still has a user");
        assert_eq!(p.put(8), Some(m(8)));
        assert_eq!(p.put(9), Some(m(9)));
        assert!(p.is_empty());
    }

    #[test]
    fn evict_idle_keeps_busy_entries() {
        let mut p = PersistentGrants::new(3);
        for g in 8..11 {
            assert!(p.insert(m(g)));
        }
        assert_eq!(p.put(8), None);
        assert_eq!(p.put(10), None);
        let mut gone = p.evict_idle();
        gone.sort_by_key(|x| x.gref);
        assert_eq!(gone, [m(8), m(10)]);
        assert!(p.contains(9));
    }
}
