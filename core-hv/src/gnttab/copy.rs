//! `GNTTABOP_copy`: copy bytes between a grant (or the caller's own frame) and another.
//!
//! Each element stands alone and gets its own status. A side addressed by grant ref names the
//! granting domain and must be granted to the caller (read-only suffices for the source, the
//! destination needs write access); a side addressed by frame must say `DOMID_SELF` and names
//! one of the caller's own GFNs. `offset + len` must stay within the page on both sides.
//! Both frames are referenced and both grants pinned (`GTF_reading` / `GTF_writing` set) for
//! the duration of the copy, so a racing revoke sees them busy.

use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::domid::DOMID_SELF;
use shared_abi::grant_table::{GntStatus, GnttabCopy, GnttabCopyPtr, GrantRef, gntcopy};

use super::GrantRegistry;
use super::memory::{GrantMemory, Mfn};
use super::policy::GrantPolicy;

/// One claimed side: a referenced frame, and the grant pinned for it if any.
struct Claim {
    frame: Mfn,
    grant: Option<(DomId, u64, GrantRef, bool)>,
}

fn claim<G: GrantRegistry>(
    reg: &G,
    caller: DomId,
    side: &GnttabCopyPtr,
    is_gref: bool,
    readonly: bool,
    mem: &(impl GrantMemory + ?Sized),
    policy: &(impl GrantPolicy + ?Sized),
) -> Result<Claim, GntStatus> {
    if !is_gref {
        // Only the caller's own frames, and only named as DOMID_SELF (as Xen requires).
        if side.domid != DOMID_SELF {
            return Err(GntStatus::PermissionDenied);
        }
        let frame = mem.frame_of(caller, side.u).ok_or(GntStatus::BadPage)?;
        if !mem.pin(frame) {
            return Err(GntStatus::BadPage);
        }
        return Ok(Claim { frame, grant: None });
    }
    let granter = if side.domid == DOMID_SELF {
        caller
    } else {
        side.domid
    };
    let lock = reg.grants(granter).ok_or(GntStatus::BadDomain)?;
    if !policy.may_copy(caller, granter) {
        return Err(GntStatus::PermissionDenied);
    }
    let gref = GrantRef::try_from(side.u).map_err(|_| GntStatus::BadGntref)?;
    let mut g = lock.lock();
    let gfn = g.table.pin(gref, caller, readonly)?;
    match mem.frame_of(granter, u64::from(gfn)) {
        Some(frame) if mem.pin(frame) => Ok(Claim {
            frame,
            grant: Some((granter, g.instance(), gref, readonly)),
        }),
        _ => {
            g.table.unpin(gref, readonly);
            Err(GntStatus::BadPage)
        }
    }
}

fn release<G: GrantRegistry>(reg: &G, c: Claim, mem: &(impl GrantMemory + ?Sized)) {
    if let Some((granter, instance, gref, readonly)) = c.grant
        && let Some(lock) = reg.grants(granter)
    {
        let mut g = lock.lock();
        if g.instance() == instance {
            g.table.unpin(gref, readonly);
        }
    }
    mem.unpin(c.frame);
}

/// Perform one `gnttab_copy` element for `caller`. Status: `BadCopyArg` (offset + len beyond
/// the page), then per side (source first) `PermissionDenied` (frame side not `DOMID_SELF`,
/// or policy), `BadDomain`, `BadGntref`, `GeneralError` (not granted to the caller, or
/// destination grant read-only), `BadPage`; `GeneralError` if the copy itself fails.
pub fn copy<G: GrantRegistry>(
    reg: &G,
    caller: DomId,
    op: &GnttabCopy,
    mem: &(impl GrantMemory + ?Sized),
    policy: &(impl GrantPolicy + ?Sized),
) -> GntStatus {
    let len = usize::from(op.len);
    if usize::from(op.source.offset) + len > PAGE_SIZE
        || usize::from(op.dest.offset) + len > PAGE_SIZE
    {
        return GntStatus::BadCopyArg;
    }
    let src_gref = op.flags & gntcopy::SOURCE_GREF != 0;
    let dst_gref = op.flags & gntcopy::DEST_GREF != 0;
    let src = match claim(reg, caller, &op.source, src_gref, true, mem, policy) {
        Ok(c) => c,
        Err(s) => return s,
    };
    let dst = match claim(reg, caller, &op.dest, dst_gref, false, mem, policy) {
        Ok(c) => c,
        Err(s) => {
            release(reg, src, mem);
            return s;
        }
    };
    let ok = mem.copy(
        src.frame,
        usize::from(op.source.offset),
        dst.frame,
        usize::from(op.dest.offset),
        len,
    );
    release(reg, src, mem);
    release(reg, dst, mem);
    if ok {
        GntStatus::Okay
    } else {
        GntStatus::GeneralError
    }
}
