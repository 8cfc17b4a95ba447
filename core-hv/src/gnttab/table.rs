//! A granting domain's v1 grant table and its active (pinned) entries.
//!
//! Owns the `GTF_reading` / `GTF_writing` protocol: the first pin of a ref checks the entry
//! (`permit_access`, grantee, read-only) and sets the bits with a compare-exchange of the
//! 32-bit `flags|domid` word, retrying a bounded number of times if the guest races to change
//! it (Xen's `_set_status_v1`); the last read-only / writable unpin clears them. While a ref
//! is active its frame is the one captured at the first pin: a guest rewriting the entry
//! cannot redirect an existing mapping.
//!
//! Invariant: for every active ref, `GTF_reading` is set in the shared entry while
//! `ro + rw > 0`, and `GTF_writing` while `rw > 0` (unless the guest cleared them, which only
//! hurts itself).

use alloc::collections::BTreeMap;

use shared_abi::DomId;
use shared_abi::grant_table::{GntStatus, GrantRef, gtf};

use super::memory::GrantEntries;

/// Attempts at the flags compare-exchange before declaring the entry unstable.
const SET_STATUS_RETRIES: usize = 5;

/// A pinned ref: who uses it, which frame, and how many read-only / writable users.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveEntry {
    pub grantee: DomId,
    pub gfn: u32,
    pub ro: u32,
    pub rw: u32,
}

/// The granter's table: its entries (in its own memory) and the active refs.
#[derive(Debug)]
pub struct GrantTable<E> {
    owner: DomId,
    entries: E,
    active: BTreeMap<GrantRef, ActiveEntry>,
}

impl<E: GrantEntries> GrantTable<E> {
    pub fn new(owner: DomId, entries: E) -> Self {
        GrantTable {
            owner,
            entries,
            active: BTreeMap::new(),
        }
    }

    pub fn owner(&self) -> DomId {
        self.owner
    }

    pub fn entries(&self) -> &E {
        &self.entries
    }

    /// The active state of `gref`, if pinned.
    pub fn active(&self, gref: GrantRef) -> Option<ActiveEntry> {
        self.active.get(&gref).copied()
    }

    /// Number of pinned refs.
    pub fn nr_active(&self) -> usize {
        self.active.len()
    }

    /// Pin `gref` for `grantee`, read-only or writable; returns the granted GFN.
    /// Status: `BadGntref` (ref beyond the table), `GeneralError` (not `permit_access`, not
    /// granted to `grantee`, write access to a read-only grant, or the guest keeps changing
    /// the entry) — Xen's codes.
    pub fn pin(
        &mut self,
        gref: GrantRef,
        grantee: DomId,
        readonly: bool,
    ) -> Result<u32, GntStatus> {
        if gref >= self.entries.nr_entries() {
            return Err(GntStatus::BadGntref);
        }
        let act = self.active.get(&gref).copied();
        if let Some(a) = act
            && a.grantee != grantee
        {
            return Err(GntStatus::GeneralError);
        }
        // The shared entry is (re)checked on the first pin, and on the first writable pin.
        let need_status = match act {
            None => true,
            Some(a) => !readonly && a.rw == 0,
        };
        if need_status {
            self.set_status(gref, grantee, readonly)?;
        }
        let entry = self.active.entry(gref).or_insert_with(|| ActiveEntry {
            grantee,
            gfn: self.entries.load_frame(gref),
            ro: 0,
            rw: 0,
        });
        if readonly {
            entry.ro += 1;
        } else {
            entry.rw += 1;
        }
        Ok(entry.gfn)
    }

    /// Drop one pin taken by [`pin`](Self::pin) with the same `readonly`. Clears
    /// `GTF_writing` when the last writable pin goes and `GTF_reading` when the last pin goes.
    /// Returns false (and changes nothing) if there was no such pin.
    pub fn unpin(&mut self, gref: GrantRef, readonly: bool) -> bool {
        let Some(entry) = self.active.get_mut(&gref) else {
            return false;
        };
        let count = if readonly {
            &mut entry.ro
        } else {
            &mut entry.rw
        };
        if *count == 0 {
            return false;
        }
        *count -= 1;
        let (ro, rw) = (entry.ro, entry.rw);
        if rw == 0 && !readonly {
            self.entries.clear_flags(gref, gtf::WRITING);
        }
        if ro == 0 && rw == 0 {
            self.entries.clear_flags(gref, gtf::READING);
            self.active.remove(&gref);
        }
        true
    }

    fn set_status(&self, gref: GrantRef, grantee: DomId, readonly: bool) -> Result<(), GntStatus> {
        let mut cur = self.entries.load_header(gref);
        for _ in 0..SET_STATUS_RETRIES {
            let flags = cur as u16;
            let domid = (cur >> 16) as DomId;
            if flags & gtf::TYPE_MASK != gtf::PERMIT_ACCESS || domid != grantee {
                return Err(GntStatus::GeneralError);
            }
            let mut new_flags = flags | gtf::READING;
            if !readonly {
                if flags & gtf::READONLY != 0 {
                    return Err(GntStatus::GeneralError);
                }
                new_flags |= gtf::WRITING;
            }
            let new = (cur & 0xFFFF_0000) | u32::from(new_flags);
            match self.entries.compare_exchange_header(gref, cur, new) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
        Err(GntStatus::GeneralError)
    }
}
