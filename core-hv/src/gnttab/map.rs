//! `GNTTABOP_map_grant_ref`, `GNTTABOP_unmap_grant_ref` and mapper teardown.
//!
//! Map checks in Xen's order and returns what the caller installs in the mapper's address
//! space (the frame, at `host_addr`, read-only or not); it never touches page tables itself.
//! The frame is referenced ([`GrantMemory::pin`]) for as long as the mapping lives.

use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::domid::DOMID_SELF;
use shared_abi::grant_table::{GntStatus, GnttabMapGrantRef, GrantHandle, gntmap};

use super::GrantRegistry;
use super::maptrack::MapEntry;
use super::memory::{GrantMemory, Mfn};
use super::policy::GrantPolicy;

/// A mapping made: install `frame` at `host_addr` in the mapper (read-only if `readonly`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub handle: GrantHandle,
    pub frame: Mfn,
    pub host_addr: u64,
    pub readonly: bool,
}

/// A mapping to remove from the mapper's address space after unmap / teardown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmapped {
    pub handle: GrantHandle,
    pub frame: Mfn,
    pub host_addr: u64,
}

/// Drop the granter's pin for a mapping, if that granter (the same instance) still lives.
fn granter_unpin<G: GrantRegistry>(reg: &G, e: &MapEntry) {
    if let Some(g) = reg.grants(e.granter) {
        let mut g = g.lock();
        if g.instance() == e.granter_instance {
            g.table.unpin(e.gref, e.readonly);
        }
    }
}

/// `GNTTABOP_map_grant_ref` by `mapper`. Status in Xen's order: `BadGntref` (neither
/// host nor device map requested), `BadDomain` (no such granter), `PermissionDenied`
/// (policy), `NoSpace` (maptrack quota), then the table's `BadGntref` / `GeneralError`
/// (ref out of range; not granted to the mapper; write to a read-only grant), `BadPage`
/// (granted frame not the granter's memory).
pub fn map_grant_ref<G: GrantRegistry>(
    reg: &G,
    mapper: DomId,
    op: &GnttabMapGrantRef,
    mem: &(impl GrantMemory + ?Sized),
    policy: &(impl GrantPolicy + ?Sized),
) -> Result<Mapping, GntStatus> {
    if op.flags & (gntmap::HOST_MAP | gntmap::DEVICE_MAP) == 0 {
        return Err(GntStatus::BadGntref);
    }
    let readonly = op.flags & gntmap::READONLY != 0;
    let granter = if op.dom == DOMID_SELF { mapper } else { op.dom };
    let granter_lock = reg.grants(granter).ok_or(GntStatus::BadDomain)?;
    if !policy.may_map(mapper, granter) {
        return Err(GntStatus::PermissionDenied);
    }
    let mapper_lock = reg.grants(mapper).ok_or(GntStatus::BadDomain)?;
    let handle = mapper_lock
        .lock()
        .maptrack
        .reserve()
        .ok_or(GntStatus::NoSpace)?;

    let pinned = {
        let mut g = granter_lock.lock();
        let instance = g.instance();
        match g.table.pin(op.gref, mapper, readonly) {
            Err(s) => Err(s),
            Ok(gfn) => match mem.frame_of(granter, u64::from(gfn)) {
                Some(frame) if mem.pin(frame) => Ok((frame, instance)),
                _ => {
                    g.table.unpin(op.gref, readonly);
                    Err(GntStatus::BadPage)
                }
            },
        }
    };
    let (frame, instance) = match pinned {
        Ok(v) => v,
        Err(s) => {
            mapper_lock.lock().maptrack.cancel(handle);
            return Err(s);
        }
    };
    let entry = MapEntry {
        granter,
        granter_instance: instance,
        gref: op.gref,
        frame,
        readonly,
        host_addr: op.host_addr,
    };
    mapper_lock.lock().maptrack.fill(handle, entry);
    Ok(Mapping {
        handle,
        frame,
        host_addr: op.host_addr,
        readonly,
    })
}

/// `GNTTABOP_unmap_grant_ref` of `handle` by `mapper`. `host_addr`, if non-zero, must be
/// where the mapping was installed. Status: `BadHandle` (no live mapping), `GeneralError`
/// (wrong address). Works whether or not the granter is still alive.
pub fn unmap_grant_ref<G: GrantRegistry>(
    reg: &G,
    mapper: DomId,
    handle: GrantHandle,
    host_addr: u64,
    mem: &(impl GrantMemory + ?Sized),
) -> Result<Unmapped, GntStatus> {
    let mapper_lock = reg.grants(mapper).ok_or(GntStatus::BadDomain)?;
    let entry = {
        let mut m = mapper_lock.lock();
        let e = m.maptrack.get(handle).ok_or(GntStatus::BadHandle)?;
        if host_addr != 0 && host_addr != e.host_addr {
            return Err(GntStatus::GeneralError);
        }
        m.maptrack.remove(handle);
        e
    };
    granter_unpin(reg, &entry);
    mem.unpin(entry.frame);
    Ok(Unmapped {
        handle,
        frame: entry.frame,
        host_addr: entry.host_addr,
    })
}

/// A dying mapper: unmap everything it holds (its address space is going away; the list is
/// returned for completeness).
pub fn teardown_mapper<G: GrantRegistry>(
    reg: &G,
    mapper: DomId,
    mem: &(impl GrantMemory + ?Sized),
) -> Vec<Unmapped> {
    let Some(mapper_lock) = reg.grants(mapper) else {
        return Vec::new();
    };
    let entries = mapper_lock.lock().maptrack.drain();
    let mut out = Vec::with_capacity(entries.len());
    for (handle, e) in entries {
        granter_unpin(reg, &e);
        mem.unpin(e.frame);
        out.push(Unmapped {
            handle,
            frame: e.frame,
            host_addr: e.host_addr,
        });
    }
    out
}
