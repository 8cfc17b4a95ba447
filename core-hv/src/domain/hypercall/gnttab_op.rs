//! `grant_table_op` (hypercall 20): `GNTTABOP_*` on v1 grant tables, over [`crate::gnttab`]
//! with the domain table as registry, [`HvGrantMemory`] as memory and [`SharingPolicy`]
//! (`crate::policy`) as the policy.
//!
//! - `setup_table` / `query_size`: every domain's table is [`GRANT_TABLE_FRAMES`] frames,
//!   mapped RW at [`GRANT_TABLE_VA`] in its own address space from the start; the frame numbers
//!   reported are those pages' numbers (`va >> 12`, Bulkhead's auto-translated frames).
//! - `set_version` / `get_version`: only version 1 exists (`set_version(2)` is `-ENOSYS`, as
//!   Xen answers when v2 is disabled; anything else `-EINVAL`).
//! - `map_grant_ref`: `GNTMAP_host_map` only; `host_addr` is a page-aligned address in the
//!   mapper's grant window ([`GRANT_MAP_BASE`]..[`GRANT_MAP_END`]) with nothing mapped there
//!   (else `GNTST_bad_virt_addr`). The granted frame is installed there, USER + NX, writable
//!   only for a writable mapping. Device and PTE-address mappings are `GNTST_general_error`.
//! - `unmap_grant_ref`: the PTE goes (with a TLB shootdown) before the frame can be freed.
//! - `copy`: element by element, each with its own status.
//!
//! Batches (`count` elements at `uop`) are copied in and their out-fields copied back one
//! element at a time through the checked accessor; a fault stops the batch with `-EFAULT`
//! (the elements before it are done, as in Xen). `count` above [`MAX_BATCH`] is `-EINVAL`
//! (bounds the work done under the hypervisor lock; Xen preempts instead).

use shared_abi::errno::XenError;
use shared_abi::grant_table::{
    GntStatus, GnttabCopy, GnttabGetVersion, GnttabMapGrantRef, GnttabQuerySize, GnttabSetVersion,
    GnttabSetupTable, GnttabUnmapGrantRef, gntcopy, gntmap, op,
};
use shared_abi::start_info::{GRANT_MAP_BASE, GRANT_MAP_END, GRANT_TABLE_FRAMES, GRANT_TABLE_VA};
use shared_abi::{DomId, PAGE_SIZE};

use super::evtchn_op::read_abi;
use super::{Call, HcResult};
use crate::domain::memory::{Mfn, PagePerms, ReservedFrames};
use crate::domain::shared::HvGrantMemory;
use crate::gnttab;
use crate::policy;

/// Most elements one `grant_table_op` call handles.
pub const MAX_BATCH: u64 = 1024;

impl Call<'_, '_> {
    fn grant_mem(&self) -> HvGrantMemory<'_> {
        HvGrantMemory {
            domains: &self.hv.domains,
            refs: &self.hv.frame_refs,
            phys: self.p.phys,
        }
    }

    /// The address of element `i` of a batch of `size`-byte elements at `uop`.
    fn element(uop: u64, i: u64, size: usize) -> Result<u64, XenError> {
        i.checked_mul(size as u64)
            .and_then(|o| uop.checked_add(o))
            .ok_or(XenError::EFAULT)
    }

    /// A table-level op's target: oneself, or another domain with `DOMAIN_CONTROL`
    /// (`PermissionDenied`); it must exist with a grant table (`BadDomain`).
    fn grant_target(&self, dom: DomId) -> Result<DomId, GntStatus> {
        let target = self.resolve(dom);
        if target != self.dom && policy::control(self.caller(), target).is_err() {
            return Err(GntStatus::PermissionDenied);
        }
        match self.hv.domains.get(target) {
            Some(d) if d.state().is_alive() && d.grants.is_some() => Ok(target),
            _ => Err(GntStatus::BadDomain),
        }
    }

    pub(super) fn grant_table_op(&mut self, cmd: u64, uop: u64, count: u64) -> HcResult {
        let Ok(cmd) = u32::try_from(cmd) else {
            return Err(XenError::ENOSYS);
        };
        if self
            .hv
            .domains
            .get(self.dom)
            .is_none_or(|d| d.grants.is_none())
        {
            return Err(XenError::ENOSYS);
        }
        if count > MAX_BATCH {
            return Err(XenError::EINVAL);
        }
        let single = || {
            if count == 1 {
                Ok(())
            } else {
                Err(XenError::EINVAL)
            }
        };
        match cmd {
            op::SETUP_TABLE => {
                single()?;
                let mut s = read_abi!(self, GnttabSetupTable, uop);
                s.status = match self.grant_target(s.dom) {
                    Err(st) => st.as_i16(),
                    Ok(_) if u64::from(s.nr_frames) > GRANT_TABLE_FRAMES => {
                        GntStatus::GeneralError.as_i16()
                    }
                    Ok(_) => {
                        let mut st = GntStatus::Okay;
                        for i in 0..u64::from(s.nr_frames) {
                            let gfn = GRANT_TABLE_VA / PAGE_SIZE as u64 + i;
                            let at = Self::element(s.frame_list, i, 8);
                            if at
                                .and_then(|a| self.bytes_out(a, &gfn.to_le_bytes()))
                                .is_err()
                            {
                                st = GntStatus::BadVirtAddr;
                                break;
                            }
                        }
                        st.as_i16()
                    }
                };
                self.bytes_out(uop + 8, &s.status.to_le_bytes())?;
                Ok(0)
            }
            op::QUERY_SIZE => {
                single()?;
                let mut q = read_abi!(self, GnttabQuerySize, uop);
                match self.grant_target(q.dom) {
                    Ok(_) => {
                        q.nr_frames = GRANT_TABLE_FRAMES as u32;
                        q.max_nr_frames = GRANT_TABLE_FRAMES as u32;
                        q.status = GntStatus::Okay.as_i16();
                    }
                    Err(st) => q.status = st.as_i16(),
                }
                self.bytes_out(uop, &q.to_bytes())?;
                Ok(0)
            }
            op::SET_VERSION => {
                single()?;
                let mut v = read_abi!(self, GnttabSetVersion, uop);
                let asked = v.version;
                v.version = 1;
                self.bytes_out(uop, &v.to_bytes())?;
                match asked {
                    1 => Ok(0),
                    2 => Err(XenError::ENOSYS),
                    _ => Err(XenError::EINVAL),
                }
            }
            op::GET_VERSION => {
                single()?;
                let mut g = read_abi!(self, GnttabGetVersion, uop);
                let target = self.resolve(g.dom);
                if target != self.dom {
                    policy::control(self.caller(), target)?;
                }
                if !self
                    .hv
                    .domains
                    .get(target)
                    .is_some_and(|d| d.state().is_alive() && d.grants.is_some())
                {
                    return Err(XenError::ESRCH);
                }
                g.version = 1;
                self.bytes_out(uop, &g.to_bytes())?;
                Ok(0)
            }
            op::MAP_GRANT_REF => {
                let r = self.batch(uop, count, GnttabMapGrantRef::WIRE_SIZE, |c, at| {
                    let mut m = read_abi!(c, GnttabMapGrantRef, at);
                    match c.map_one(&m) {
                        Ok(handle) => {
                            m.status = GntStatus::Okay.as_i16();
                            m.handle = handle;
                            let granter = c.resolve(m.dom);
                            if let Some(d) = c.hv.domains.get_mut(granter) {
                                d.io.grant_maps = d.io.grant_maps.saturating_add(1);
                            }
                        }
                        Err(st) => m.status = st.as_i16(),
                    }
                    m.dev_bus_addr = 0;
                    // Out fields only: status, handle, dev_bus_addr (bytes 18..32).
                    c.bytes_out(at + 18, &m.to_bytes()[18..])
                });
                self.hv.free_orphans(self.p);
                r
            }
            op::UNMAP_GRANT_REF => {
                let r = self.batch(uop, count, GnttabUnmapGrantRef::WIRE_SIZE, |c, at| {
                    let u = read_abi!(c, GnttabUnmapGrantRef, at);
                    let st = match c.unmap_one(&u) {
                        Ok(()) => GntStatus::Okay,
                        Err(st) => st,
                    };
                    c.bytes_out(at + 20, &st.as_i16().to_le_bytes())
                });
                self.hv.free_orphans(self.p);
                r
            }
            op::COPY => {
                let r = self.batch(uop, count, GnttabCopy::WIRE_SIZE, |c, at| {
                    let cp = read_abi!(c, GnttabCopy, at);
                    let st = {
                        let pol = c.sharing_policy();
                        let mem = c.grant_mem();
                        gnttab::copy::copy(&c.hv.domains, c.dom, &cp, &mem, &pol)
                    };
                    if st == GntStatus::Okay {
                        c.count_copy(&cp);
                    }
                    c.bytes_out(at + 36, &st.as_i16().to_le_bytes())
                });
                self.hv.free_orphans(self.p);
                r
            }
            // dump_table, transfer, unmap_and_replace, get_status_frames (v2), swap_grant_ref,
            // cache_flush: not offered.
            _ => Err(XenError::ENOSYS),
        }
    }

    /// Count one successful copy: the caller did it; its bytes went through the grants of
    /// the domains named by the grant-ref sides (each granter counted once).
    fn count_copy(&mut self, cp: &GnttabCopy) {
        let len = u64::from(cp.len);
        if let Some(d) = self.hv.domains.get_mut(self.dom) {
            d.io.grant_copies_done = d.io.grant_copies_done.saturating_add(1);
        }
        let src = (cp.flags & gntcopy::SOURCE_GREF != 0).then(|| self.resolve(cp.source.domid));
        let dst = (cp.flags & gntcopy::DEST_GREF != 0).then(|| self.resolve(cp.dest.domid));
        let dst = dst.filter(|&d| Some(d) != src);
        for granter in [src, dst].into_iter().flatten() {
            if let Some(d) = self.hv.domains.get_mut(granter) {
                d.io.grant_copy_bytes = d.io.grant_copy_bytes.saturating_add(len);
            }
        }
    }

    /// Run `f` on each element's address; stop at the first fault.
    fn batch(
        &mut self,
        uop: u64,
        count: u64,
        size: usize,
        mut f: impl FnMut(&mut Self, u64) -> Result<(), XenError>,
    ) -> HcResult {
        for i in 0..count {
            let at = Self::element(uop, i, size)?;
            f(self, at)?;
        }
        Ok(0)
    }

    /// One `map_grant_ref`: the handle, or the status.
    fn map_one(&mut self, m: &GnttabMapGrantRef) -> Result<u32, GntStatus> {
        if m.flags & (gntmap::HOST_MAP | gntmap::DEVICE_MAP) != 0
            && (m.flags & gntmap::HOST_MAP == 0 || m.flags & gntmap::CONTAINS_PTE != 0)
        {
            // Device (bus-address) and PTE-address mappings are not offered.
            return Err(GntStatus::GeneralError);
        }
        if m.flags & gntmap::HOST_MAP != 0 {
            let a = m.host_addr;
            let in_window =
                a.is_multiple_of(PAGE_SIZE as u64) && (GRANT_MAP_BASE..GRANT_MAP_END).contains(&a);
            let free = self
                .hv
                .domains
                .get(self.dom)
                .and_then(|d| d.aspace.as_ref())
                .is_some_and(|s| s.translate(a).is_none());
            if !in_window || !free {
                return Err(GntStatus::BadVirtAddr);
            }
        }
        let mapping = {
            let pol = self.sharing_policy();
            let mem = self.grant_mem();
            gnttab::map::map_grant_ref(&self.hv.domains, self.dom, m, &mem, &pol)?
        };
        let installed = match self.hv.domains.get_mut(self.dom) {
            Some(d) => match d.aspace.as_mut() {
                Some(a) => {
                    let perms = if mapping.readonly {
                        PagePerms::USER_RO
                    } else {
                        PagePerms::USER_RW
                    };
                    let mut frames = ReservedFrames {
                        reservation: &mut d.reservation,
                        pool: &mut *self.p.frames,
                    };
                    a.map(mapping.host_addr, Mfn(mapping.frame), perms, &mut frames)
                        .is_ok()
                }
                None => false,
            },
            None => false,
        };
        if !installed {
            // No frame for a page table (the mapper's limit): undo the grant side.
            let mem = self.grant_mem();
            let _ =
                gnttab::map::unmap_grant_ref(&self.hv.domains, self.dom, mapping.handle, 0, &mem);
            return Err(GntStatus::GeneralError);
        }
        Ok(mapping.handle)
    }

    /// One `unmap_grant_ref`.
    fn unmap_one(&mut self, u: &GnttabUnmapGrantRef) -> Result<(), GntStatus> {
        let gone = {
            let mem = self.grant_mem();
            gnttab::map::unmap_grant_ref(&self.hv.domains, self.dom, u.handle, u.host_addr, &mem)?
        };
        // The frame is freed (if orphaned) only by `free_orphans` after the batch, once this
        // synchronous unmap has removed every CPU's translation.
        if let Some(a) = self
            .hv
            .domains
            .get_mut(self.dom)
            .and_then(|d| d.aspace.as_mut())
        {
            a.unmap(gone.host_addr);
        }
        Ok(())
    }
}
