//! The mapper's handle table (Xen's maptrack): one entry per live grant mapping, found by the
//! `grant_handle_t` the mapper got back, bounded by a per-domain quota.
//!
//! Invariant: an entry is `Reserved` only between the two halves of a map operation, and
//! `Mapped` exactly while the granted frame is pinned for it.

use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::grant_table::{GrantHandle, GrantRef};

use super::memory::Mfn;

/// A live mapping: everything unmap needs, even after the granter is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub granter: DomId,
    /// The granter's `DomainGrants::instance` when mapped (a reused domid is another domain).
    pub granter_instance: u64,
    pub gref: GrantRef,
    pub frame: Mfn,
    pub readonly: bool,
    /// Where it is installed in the mapper (a GFN for auto-translated mappers).
    pub host_addr: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    Reserved,
    Mapped(MapEntry),
}

/// A domain's mappings of other domains' grants.
#[derive(Debug)]
pub struct Maptrack {
    slots: Vec<Slot>,
    max: u32,
    in_use: u32,
}

impl Maptrack {
    /// An empty table allowing at most `max` simultaneous mappings.
    pub fn new(max: u32) -> Self {
        Maptrack {
            slots: Vec::new(),
            max,
            in_use: 0,
        }
    }

    /// Mappings live or being made.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Reserve a handle (lowest free); `None` when the quota is used up.
    pub fn reserve(&mut self) -> Option<GrantHandle> {
        if self.in_use >= self.max {
            return None;
        }
        let h = match self.slots.iter().position(|s| *s == Slot::Free) {
            Some(h) => h,
            None => {
                self.slots.push(Slot::Free);
                self.slots.len() - 1
            }
        };
        self.slots[h] = Slot::Reserved;
        self.in_use += 1;
        Some(h as GrantHandle)
    }

    /// Fill a reserved handle.
    pub fn fill(&mut self, handle: GrantHandle, entry: MapEntry) -> bool {
        match self.slots.get_mut(handle as usize) {
            Some(slot @ Slot::Reserved) => {
                *slot = Slot::Mapped(entry);
                true
            }
            _ => false,
        }
    }

    /// Give back a reserved (unfilled) handle.
    pub fn cancel(&mut self, handle: GrantHandle) {
        if let Some(slot @ Slot::Reserved) = self.slots.get_mut(handle as usize) {
            *slot = Slot::Free;
            self.in_use -= 1;
        }
    }

    /// The mapping behind `handle`, if it is live.
    pub fn get(&self, handle: GrantHandle) -> Option<MapEntry> {
        match self.slots.get(handle as usize) {
            Some(Slot::Mapped(e)) => Some(*e),
            _ => None,
        }
    }

    /// Remove and return the mapping behind `handle`.
    pub fn remove(&mut self, handle: GrantHandle) -> Option<MapEntry> {
        let slot = self.slots.get_mut(handle as usize)?;
        let Slot::Mapped(e) = *slot else {
            return None;
        };
        *slot = Slot::Free;
        self.in_use -= 1;
        Some(e)
    }

    /// Remove every live mapping (mapper teardown).
    pub fn drain(&mut self) -> Vec<(GrantHandle, MapEntry)> {
        let mut out = Vec::new();
        for (h, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Mapped(e) = *slot {
                out.push((h as GrantHandle, e));
            }
            if *slot != Slot::Free {
                *slot = Slot::Free;
            }
        }
        self.in_use = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> MapEntry {
        MapEntry {
            granter: 1,
            granter_instance: 0,
            gref: 8,
            frame: 100,
            readonly: true,
            host_addr: 0x5000,
        }
    }

    #[test]
    fn handles_are_bounded_and_reused() {
        let mut m = Maptrack::new(2);
        let a = m.reserve().unwrap();
        let b = m.reserve().unwrap();
        assert_eq!((a, b), (0, 1));
        assert_eq!(m.reserve(), None);
        assert!(m.fill(a, entry()));
        m.cancel(b);
        assert_eq!(m.reserve(), Some(1));
        assert_eq!(m.remove(a), Some(entry()));
        assert_eq!(m.remove(a), None);
        assert_eq!(m.reserve(), Some(0));
    }

    #[test]
    fn only_reserved_handles_fill_and_only_mapped_ones_read() {
        let mut m = Maptrack::new(4);
        assert!(!m.fill(0, entry()));
        let h = m.reserve().unwrap();
        assert_eq!(m.get(h), None);
        assert!(m.fill(h, entry()));
        assert!(!m.fill(h, entry()));
        assert_eq!(m.get(h), Some(entry()));
        assert_eq!(m.get(99), None);
        assert_eq!(m.drain(), alloc::vec![(h, entry())]);
        assert_eq!(m.in_use(), 0);
    }
}
