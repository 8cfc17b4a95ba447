//! Grant mapping as the block backend uses it: the [`GrantMapper`] seam (batched
//! `GNTTABOP_map_grant_ref` / `unmap_grant_ref`, and copy-based access to a mapped page), and
//! [`FakeGrantMemory`], a host model of frontends' granted pages with the hypervisor's checks,
//! for tests and benches.
//!
//! A grant ref from a ring is only an index: the engine never sees a frame, only the
//! [`Mapping`] the mapper returns, and reads or writes the page through the mapper (copies,
//! never references into shared memory). A mapping is released exactly once, by
//! [`GrantMapper::unmap`]; the engine tracks every live mapping so that disconnecting unmaps
//! all of them (the frontend cannot revoke a grant that is still mapped).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::grant_table::{GntStatus, GrantHandle, GrantRef};

/// One grant to map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    pub gref: GrantRef,
    /// Map read-write (the backend will write the page: a read request's data) rather than
    /// read-only.
    pub writable: bool,
}

/// A live mapping of a frontend's granted page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub domid: DomId,
    pub gref: GrantRef,
    pub writable: bool,
    /// The hypervisor's handle (needed to unmap).
    pub handle: GrantHandle,
    /// The mapper's own locator for the page (e.g. the address it was mapped at).
    pub token: u64,
}

/// The hypercall seam.
pub trait GrantMapper {
    /// Map every element of `reqs`, granted by `domid`, as one batched map would: `out` is
    /// cleared and receives one result per element, in order.
    fn map(&mut self, domid: DomId, reqs: &[MapRequest], out: &mut Vec<Result<Mapping, GntStatus>>);
    /// Unmap every element (each exactly once).
    fn unmap(&mut self, maps: &[Mapping]);
    /// Copy `out.len()` bytes at `offset` of the mapped page into `out`.
    fn read(&mut self, m: &Mapping, offset: usize, out: &mut [u8]) -> Result<(), GntStatus>;
    /// Copy `data` into the mapped page at `offset` (the mapping must be writable).
    fn write(&mut self, m: &Mapping, offset: usize, data: &[u8]) -> Result<(), GntStatus>;
}

struct FakePage {
    data: Box<[u8; PAGE_SIZE]>,
    readonly: bool,
    /// Live mappings of this grant.
    mapped: u32,
}

/// A host model of frontend domains' grant tables and granted pages. Mapping checks what the
/// hypervisor checks: the ref must be granted by `domid` (`GNTST_bad_gntref`), a writable
/// mapping needs a writable grant (`GNTST_permission_denied`). Access through a mapping goes
/// straight to the frontend's page, as a real mapping does; offset + length must stay in the
/// page (`GNTST_bad_copy_arg`), writes need a writable mapping, and with a quota set
/// ([`FakeGrantMemory::set_quota`], the backend's maptrack quota) a map beyond it fails with
/// `GNTST_no_space`.
pub struct FakeGrantMemory {
    pages: BTreeMap<(DomId, GrantRef), FakePage>,
    live: BTreeMap<u64, (DomId, GrantRef, bool)>,
    next_token: u64,
    quota: Option<usize>,
    /// Maps refused for the quota.
    pub no_space: u64,
    /// Map batches issued (hypercalls).
    pub map_batches: u64,
    /// Grants mapped successfully so far.
    pub maps: u64,
    /// Grants unmapped so far.
    pub unmaps: u64,
}

impl core::fmt::Debug for FakeGrantMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FakeGrantMemory")
            .field("grants", &self.pages.len())
            .field("live", &self.live.len())
            .finish()
    }
}

impl Default for FakeGrantMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeGrantMemory {
    pub fn new() -> Self {
        FakeGrantMemory {
            pages: BTreeMap::new(),
            live: BTreeMap::new(),
            next_token: 1,
            quota: None,
            no_space: 0,
            map_batches: 0,
            maps: 0,
            unmaps: 0,
        }
    }

    /// `domid` grants a fresh zeroed page as `gref` (replacing an unmapped earlier grant).
    /// False if the ref is currently mapped (a real grant cannot be replaced then).
    pub fn grant(&mut self, domid: DomId, gref: GrantRef, readonly: bool) -> bool {
        if self.pages.get(&(domid, gref)).is_some_and(|p| p.mapped > 0) {
            return false;
        }
        self.pages.insert(
            (domid, gref),
            FakePage {
                data: Box::new([0; PAGE_SIZE]),
                readonly,
                mapped: 0,
            },
        );
        true
    }

    /// End a grant; false (and nothing changes) while it is mapped, as with
    /// `gnttab_end_foreign_access` on a busy entry.
    pub fn revoke(&mut self, domid: DomId, gref: GrantRef) -> bool {
        match self.pages.get(&(domid, gref)) {
            Some(p) if p.mapped > 0 => false,
            Some(_) => {
                self.pages.remove(&(domid, gref));
                true
            }
            None => true,
        }
    }

    /// The frontend's view of its page.
    pub fn page(&self, domid: DomId, gref: GrantRef) -> Option<&[u8; PAGE_SIZE]> {
        self.pages.get(&(domid, gref)).map(|p| &*p.data)
    }

    /// The frontend's view of its page, writable.
    pub fn page_mut(&mut self, domid: DomId, gref: GrantRef) -> Option<&mut [u8; PAGE_SIZE]> {
        self.pages.get_mut(&(domid, gref)).map(|p| &mut *p.data)
    }

    /// Refuse maps once `quota` mappings are live (as the hypervisor's maptrack quota does).
    pub fn set_quota(&mut self, quota: usize) {
        self.quota = Some(quota);
    }

    /// Mappings currently live (all domains).
    pub fn live_mappings(&self) -> usize {
        self.live.len()
    }

    /// Mappings currently live of `domid`'s grants.
    pub fn live_mappings_of(&self, domid: DomId) -> usize {
        self.live.values().filter(|(d, _, _)| *d == domid).count()
    }

    fn resolve(&self, m: &Mapping) -> Result<(DomId, GrantRef, bool), GntStatus> {
        match self.live.get(&m.token) {
            Some(&(d, g, w)) if d == m.domid && g == m.gref => Ok((d, g, w)),
            _ => Err(GntStatus::BadHandle),
        }
    }
}

fn in_page(offset: usize, len: usize) -> Result<(), GntStatus> {
    match offset.checked_add(len) {
        Some(end) if end <= PAGE_SIZE => Ok(()),
        _ => Err(GntStatus::BadCopyArg),
    }
}

impl GrantMapper for FakeGrantMemory {
    fn map(
        &mut self,
        domid: DomId,
        reqs: &[MapRequest],
        out: &mut Vec<Result<Mapping, GntStatus>>,
    ) {
        self.map_batches += 1;
        out.clear();
        for r in reqs {
            let full = self.quota.is_some_and(|q| self.live.len() >= q);
            let res = match self.pages.get_mut(&(domid, r.gref)) {
                None => Err(GntStatus::BadGntref),
                Some(_) if full => {
                    self.no_space += 1;
                    Err(GntStatus::NoSpace)
                }
                Some(p) if r.writable && p.readonly => Err(GntStatus::PermissionDenied),
                Some(p) => {
                    p.mapped += 1;
                    let token = self.next_token;
                    self.next_token += 1;
                    self.live.insert(token, (domid, r.gref, r.writable));
                    self.maps += 1;
                    Ok(Mapping {
                        domid,
                        gref: r.gref,
                        writable: r.writable,
                        handle: token as GrantHandle,
                        token,
                    })
                }
            };
            out.push(res);
        }
    }

    fn unmap(&mut self, maps: &[Mapping]) {
        for m in maps {
            if let Some((d, g, _)) = self.live.remove(&m.token) {
                if let Some(p) = self.pages.get_mut(&(d, g)) {
                    p.mapped = p.mapped.saturating_sub(1);
                }
                self.unmaps += 1;
            }
        }
    }

    fn read(&mut self, m: &Mapping, offset: usize, out: &mut [u8]) -> Result<(), GntStatus> {
        in_page(offset, out.len())?;
        let key = self.resolve(m)?;
        let p = self
            .pages
            .get(&(key.0, key.1))
            .ok_or(GntStatus::BadHandle)?;
        out.copy_from_slice(&p.data[offset..offset + out.len()]);
        Ok(())
    }

    fn write(&mut self, m: &Mapping, offset: usize, data: &[u8]) -> Result<(), GntStatus> {
        in_page(offset, data.len())?;
        let (d, g, writable) = self.resolve(m)?;
        if !writable {
            return Err(GntStatus::PermissionDenied);
        }
        let p = self.pages.get_mut(&(d, g)).ok_or(GntStatus::BadHandle)?;
        p.data[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_map_checks_grant_and_access_then_unmaps_once() {
        let mut g = FakeGrantMemory::new();
        g.grant(3, 8, true);
        g.grant(3, 9, false);
        let mut out = Vec::new();
        g.map(
            3,
            &[
                MapRequest {
                    gref: 8,
                    writable: true,
                },
                MapRequest {
                    gref: 8,
                    writable: false,
                },
                MapRequest {
                    gref: 10,
                    writable: false,
                },
                MapRequest {
                    gref: 9,
                    writable: true,
                },
            ],
            &mut out,
        );
        assert_eq!(out[0], Err(GntStatus::PermissionDenied));
        assert_eq!(out[2], Err(GntStatus::BadGntref));
        let ro = out[1].unwrap();
        let rw = out[3].unwrap();
        assert_eq!(g.write(&ro, 0, &[1]), Err(GntStatus::PermissionDenied));
        assert_eq!(g.write(&rw, 4095, &[1, 2]), Err(GntStatus::BadCopyArg));
        g.write(&rw, 10, b"xy").unwrap();
        assert_eq!(&g.page(3, 9).unwrap()[10..12], b"xy");
        assert!(!g.revoke(3, 9), "a mapped grant cannot be revoked");
        g.unmap(&[rw, ro, rw]);
        assert_eq!(g.unmaps, 2);
        assert_eq!(g.live_mappings(), 0);
        assert_eq!(g.read(&rw, 0, &mut [0; 1]), Err(GntStatus::BadHandle));
        assert!(g.revoke(3, 9));
    }
}
