//! Grant tables (v1) from both sides.
//!
//! - Granting: [`GrantTable`] is this domain's own table, mapped by the hypervisor at
//!   `GRANT_TABLE_VA` ([`GrantTable::own`]). [`GrantTable::grant_access`] writes an entry in
//!   the order the ABI asks (grantee and frame, then the flags); [`GrantTable::end_access`]
//!   revokes it only if the grantee holds no mapping or copy (`GTF_reading`/`GTF_writing`
//!   clear), by compare-exchange, like Linux's `gnttab_end_foreign_access_ref`.
//! - Mapping: [`map`] / [`unmap`] install and remove another domain's grant at an address of
//!   the grant window ([`MapWindow`] hands them out); [`copy`] runs a batch of copies.
//! - [`ring_mem`]: a shared ring region over a page (granted by us or mapped from a peer).
//!
//! Frame numbers are Bulkhead's auto-translated ones: a page's number is `va >> 12`.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::grant_table::{
    GntStatus, GnttabCopy, GnttabMapGrantRef, GnttabQuerySize, GnttabSetVersion,
    GnttabUnmapGrantRef, GrantHandle, GrantRef, gntmap, gtf, op,
};
use shared_abi::hypercall as hc;
use shared_abi::start_info::{GRANT_MAP_BASE, GRANT_MAP_END};

use crate::hypercall::call;

/// Why a grant operation failed: the hypercall itself, or the element's `GNTST_*` status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantError {
    Hypercall(XenError),
    Status(GntStatus),
}

impl From<XenError> for GrantError {
    fn from(e: XenError) -> Self {
        GrantError::Hypercall(e)
    }
}

fn status(raw: i16) -> Result<(), GrantError> {
    match GntStatus::from_i16(raw) {
        Some(GntStatus::Okay) => Ok(()),
        Some(s) => Err(GrantError::Status(s)),
        None => Err(GrantError::Status(GntStatus::GeneralError)),
    }
}

/// `grant_table_op(cmd, uop, count)`.
pub fn raw_op(cmd: u32, uop: &mut [u8], count: u32) -> Result<(), XenError> {
    call(
        hc::GRANT_TABLE_OP,
        [
            u64::from(cmd),
            uop.as_mut_ptr() as u64,
            u64::from(count),
            0,
            0,
        ],
    )
    .map(|_| ())
}

/// The revocation found the grant still in use by its grantee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InUse;

/// A domain's own v1 grant entries (each one little-endian word: `flags | domid << 16 |
/// frame << 32`).
pub struct GrantTable<'a> {
    entries: &'a [AtomicU64],
}

impl<'a> GrantTable<'a> {
    /// A table over `entries` (tests; [`GrantTable::own`] on a domain).
    pub fn new(entries: &'a [AtomicU64]) -> Self {
        GrantTable { entries }
    }

    pub fn nr_entries(&self) -> u32 {
        self.entries.len() as u32
    }

    /// Grant page `va` (page-aligned) to `domid`; `EINVAL` for a ref outside the table.
    pub fn grant_access(
        &self,
        gref: GrantRef,
        domid: DomId,
        va: u64,
        readonly: bool,
    ) -> Result<(), XenError> {
        let e = self.entries.get(gref as usize).ok_or(XenError::EINVAL)?;
        let frame = u32::try_from(va >> 12).map_err(|_| XenError::EINVAL)?;
        // Grantee and frame first with the flags invalid, then the flags (release): the
        // hypervisor never sees a valid entry with a stale grantee or frame.
        e.store(
            (u64::from(frame) << 32) | (u64::from(domid) << 16),
            Ordering::Release,
        );
        let flags = gtf::PERMIT_ACCESS | if readonly { gtf::READONLY } else { 0 };
        e.fetch_or(u64::from(flags), Ordering::Release);
        Ok(())
    }

    /// Revoke `gref` unless the grantee still maps or copies it.
    pub fn end_access(&self, gref: GrantRef) -> Result<(), InUse> {
        let Some(e) = self.entries.get(gref as usize) else {
            return Ok(());
        };
        let cur = e.load(Ordering::Acquire);
        if cur as u16 & (gtf::READING | gtf::WRITING) != 0 {
            return Err(InUse);
        }
        e.compare_exchange(cur, cur & !0xFFFF, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(|_| InUse)
    }

    /// The entry's flags now.
    pub fn flags(&self, gref: GrantRef) -> u16 {
        self.entries
            .get(gref as usize)
            .map_or(0, |e| e.load(Ordering::Acquire) as u16)
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
impl GrantTable<'static> {
    /// This domain's table, as the hypervisor mapped it.
    pub fn own() -> Self {
        use shared_abi::start_info::{GRANT_TABLE_FRAMES, GRANT_TABLE_VA};
        let n = (GRANT_TABLE_FRAMES * 512) as usize;
        // SAFETY: the hypervisor maps GRANT_TABLE_FRAMES RW pages at GRANT_TABLE_VA for the
        // domain's life (shared_abi::start_info); entries are 8-byte aligned and accessed
        // only atomically here and by the hypervisor.
        let entries = unsafe { core::slice::from_raw_parts(GRANT_TABLE_VA as *const AtomicU64, n) };
        GrantTable { entries }
    }
}

/// `GNTTABOP_query_size` of this domain: (frames in use, maximum).
pub fn query_size() -> Result<(u32, u32), GrantError> {
    let mut b = GnttabQuerySize {
        dom: shared_abi::domid::DOMID_SELF,
        ..Default::default()
    }
    .to_bytes();
    raw_op(op::QUERY_SIZE, &mut b, 1)?;
    let q = GnttabQuerySize::from_bytes(&b).ok_or(XenError::EFAULT)?;
    status(q.status)?;
    Ok((q.nr_frames, q.max_nr_frames))
}

/// `GNTTABOP_set_version`: the version now in force (always 1 on Bulkhead).
pub fn set_version(version: u32) -> Result<u32, XenError> {
    let mut b = GnttabSetVersion { version }.to_bytes();
    let r = raw_op(op::SET_VERSION, &mut b, 1);
    let now = GnttabSetVersion::from_bytes(&b).map_or(0, |v| v.version);
    r.map(|_| now)
}

/// Map `dom`'s grant `gref` at `host_addr` (a page of the grant window): the handle.
pub fn map(
    dom: DomId,
    gref: GrantRef,
    host_addr: u64,
    readonly: bool,
) -> Result<GrantHandle, GrantError> {
    let mut b = GnttabMapGrantRef {
        host_addr,
        flags: gntmap::HOST_MAP | if readonly { gntmap::READONLY } else { 0 },
        gref,
        dom,
        ..Default::default()
    }
    .to_bytes();
    raw_op(op::MAP_GRANT_REF, &mut b, 1)?;
    let m = GnttabMapGrantRef::from_bytes(&b).ok_or(XenError::EFAULT)?;
    status(m.status)?;
    Ok(m.handle)
}

/// Remove the mapping `handle` made at `host_addr`.
pub fn unmap(handle: GrantHandle, host_addr: u64) -> Result<(), GrantError> {
    let mut b = GnttabUnmapGrantRef {
        host_addr,
        handle,
        ..Default::default()
    }
    .to_bytes();
    raw_op(op::UNMAP_GRANT_REF, &mut b, 1)?;
    let u = GnttabUnmapGrantRef::from_bytes(&b).ok_or(XenError::EFAULT)?;
    status(u.status)
}

/// Run a batch of copies; each element's `status` is filled in.
pub fn copy(ops: &mut [GnttabCopy]) -> Result<(), XenError> {
    let mut buf = Vec::with_capacity(ops.len() * GnttabCopy::WIRE_SIZE);
    for o in ops.iter() {
        buf.extend_from_slice(&o.to_bytes());
    }
    let n = u32::try_from(ops.len()).map_err(|_| XenError::EINVAL)?;
    raw_op(op::COPY, &mut buf, n)?;
    for (o, b) in ops.iter_mut().zip(buf.chunks(GnttabCopy::WIRE_SIZE)) {
        o.status = GnttabCopy::from_bytes(b).map_or(GntStatus::GeneralError.as_i16(), |c| c.status);
    }
    Ok(())
}

/// Hands out page addresses of the grant window for [`map`].
#[derive(Debug)]
pub struct MapWindow {
    next: u64,
    free: Vec<u64>,
}

impl Default for MapWindow {
    fn default() -> Self {
        MapWindow {
            next: GRANT_MAP_BASE,
            free: Vec::new(),
        }
    }
}

impl MapWindow {
    pub fn new() -> Self {
        Self::default()
    }

    /// A free page address, or `None` when the window is used up.
    pub fn alloc(&mut self) -> Option<u64> {
        if let Some(a) = self.free.pop() {
            return Some(a);
        }
        if self.next >= GRANT_MAP_END {
            return None;
        }
        let a = self.next;
        self.next += 4096;
        Some(a)
    }

    /// Give back an address after its mapping was removed.
    pub fn release(&mut self, addr: u64) {
        self.free.push(addr);
    }
}

/// A shared-ring region over the page at `va`.
///
/// # Safety
/// The page must stay mapped readable and writable (a page of ours we granted, or a page we
/// mapped writable) for as long as the returned handle or a clone of it is used, and this
/// domain must touch it only through such handles.
pub unsafe fn ring_mem(
    va: u64,
) -> Result<shared_abi::ring::SharedRingMem, shared_abi::ring::RingError> {
    // SAFETY: forwarded from the caller.
    unsafe { shared_abi::ring::SharedRingMem::from_raw(va as *mut u8, shared_abi::PAGE_SIZE) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_then_end_access_follows_the_flag_protocol() {
        let words: Vec<AtomicU64> = (0..16).map(|_| AtomicU64::new(0)).collect();
        let t = GrantTable::new(&words);
        t.grant_access(8, 3, 0x8000_5000, true).unwrap();
        let w = words[8].load(Ordering::SeqCst);
        assert_eq!(w >> 32, 0x8_0005);
        assert_eq!((w >> 16) as u16, 3);
        assert_eq!(w as u16, gtf::PERMIT_ACCESS | gtf::READONLY);
        // The grantee maps it (the hypervisor sets GTF_reading): revocation refused.
        words[8].fetch_or(u64::from(gtf::READING), Ordering::SeqCst);
        assert_eq!(t.end_access(8), Err(InUse));
        words[8].fetch_and(!u64::from(gtf::READING), Ordering::SeqCst);
        assert_eq!(t.end_access(8), Ok(()));
        assert_eq!(t.flags(8), 0);
        assert_eq!(t.grant_access(16, 3, 0, false), Err(XenError::EINVAL));
    }

    #[test]
    fn map_window_reuses_released_pages_and_ends() {
        let mut w = MapWindow::new();
        let a = w.alloc().unwrap();
        let b = w.alloc().unwrap();
        assert_eq!((a, b), (GRANT_MAP_BASE, GRANT_MAP_BASE + 4096));
        w.release(a);
        assert_eq!(w.alloc(), Some(a));
        w.next = GRANT_MAP_END;
        assert_eq!(w.alloc(), None);
    }
}
