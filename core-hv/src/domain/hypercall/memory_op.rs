//! `memory_op`: reservation queries and changes.
//!
//! Bulkhead's PV domains are auto-translated in Xen's sense: a frame number a domain names
//! is a page number of its own address space (`va >> 12`), and only pages in the heap
//! window may be added or removed. `increase_reservation` and `populate_physmap` therefore
//! both take, in `extent_start`, the page numbers where new zeroed RW pages are to appear;
//! `decrease_reservation` takes the page numbers to give back. As in Xen, the result is the
//! number of extents done (a short count means the rest failed: limit reached, page
//! already present or absent, address outside the window), `-EFAULT` only if not even the
//! first extent could be read. Foreign domains need `DOMAIN_CONTROL`.

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::hypercall::memory_op;
use shared_abi::hypercall_args::XenMemoryReservation;
use shared_abi::start_info::{HEAP_BASE, HEAP_END};

use super::{Call, HcResult};
use crate::domain::memory::{FrameSource, PAGE_SIZE, PagePerms, ReservedFrames};
use crate::policy::{self, ControlToken};

/// `MEMOP_EXTENT_SHIFT`: the continuation's start extent lives in the command's high bits.
const EXTENT_SHIFT: u32 = 6;
const CMD_MASK: u64 = (1 << EXTENT_SHIFT) - 1;
/// Largest extent: 2 MiB.
const MAX_ORDER: u32 = 9;
/// Extents handled per call (the domain calls again for the rest).
const MAX_EXTENTS_PER_CALL: u64 = 4096;

impl Call<'_, '_> {
    /// The token for acting on `domid`'s memory: free for oneself, `DOMAIN_CONTROL` for
    /// others.
    fn memory_token(&self, domid: DomId) -> Result<ControlToken, XenError> {
        let target = self.resolve(domid);
        let token = if target == self.dom {
            policy::control_self(self.caller())
        } else {
            policy::control(self.caller(), target)?
        };
        match self.hv.domains.get(token.target()) {
            Some(d) if d.state().is_alive() => Ok(token),
            _ => Err(XenError::ESRCH),
        }
    }

    pub(super) fn memory_op(&mut self, cmd: u64, arg: u64) -> HcResult {
        let op = cmd & CMD_MASK;
        let start = cmd >> EXTENT_SHIFT;
        match op {
            memory_op::CURRENT_RESERVATION | memory_op::MAXIMUM_RESERVATION => {
                let mut b = [0u8; 2];
                self.mem()?.copy_from_guest(arg, &mut b)?;
                let token = self.memory_token(u16::from_le_bytes(b))?;
                let d = self.hv.domains.get(token.target()).ok_or(XenError::ESRCH)?;
                let pages = if op == memory_op::CURRENT_RESERVATION {
                    d.reservation.used()
                } else {
                    d.reservation.limit()
                };
                Ok(pages as i64)
            }
            memory_op::INCREASE_RESERVATION
            | memory_op::POPULATE_PHYSMAP
            | memory_op::DECREASE_RESERVATION => {
                let r: XenMemoryReservation = self.read(arg)?;
                let token = self.memory_token(r.domid)?;
                if r.extent_order > MAX_ORDER || start >= r.nr_extents {
                    return Ok(start as i64);
                }
                let end = r.nr_extents.min(start.saturating_add(MAX_EXTENTS_PER_CALL));
                let mut done = start;
                while done < end {
                    let gpfn = match self.mem()?.read_u64_at(r.extent_start, done) {
                        Ok(g) => g,
                        Err(e) if done == start => return Err(e),
                        Err(_) => break,
                    };
                    let ok = if op == memory_op::DECREASE_RESERVATION {
                        self.remove_extent(&token, gpfn, r.extent_order)
                    } else {
                        self.add_extent(&token, gpfn, r.extent_order)
                    };
                    if !ok {
                        break;
                    }
                    done += 1;
                }
                Ok(done as i64)
            }
            _ => Err(XenError::ENOSYS),
        }
    }

    /// The heap-window pages of an extent, if it is aligned and inside the window.
    fn extent_range(gpfn: u64, order: u32) -> Option<(u64, u64)> {
        let pages = 1u64 << order;
        if !gpfn.is_multiple_of(pages) {
            return None;
        }
        let va = gpfn.checked_mul(PAGE_SIZE)?;
        let end = va.checked_add(pages * PAGE_SIZE)?;
        (va >= HEAP_BASE && end <= HEAP_END).then_some((va, pages))
    }

    fn add_extent(&mut self, token: &ControlToken, gpfn: u64, order: u32) -> bool {
        let Some((va, pages)) = Self::extent_range(gpfn, order) else {
            return false;
        };
        let Some(d) = self.hv.domains.get_mut(token.target()) else {
            return false;
        };
        if (0..pages).any(|i| d.pages.contains_key(&(va + i * PAGE_SIZE))) {
            return false;
        }
        if d.reservation.available() < pages {
            return false;
        }
        let Some(aspace) = d.aspace.as_mut() else {
            return false;
        };
        let mut frames = ReservedFrames {
            reservation: &mut d.reservation,
            pool: &mut *self.p.frames,
        };
        // All or nothing: on a failure (limit reached by page tables, pool empty) the pages
        // of this extent mapped so far are given back.
        let mut mapped = 0;
        while mapped < pages {
            let page = va + mapped * PAGE_SIZE;
            let Some(f) = frames.alloc_frame() else { break };
            self.p.phys.zero(f);
            if aspace
                .map(page, f, PagePerms::USER_RW, &mut frames)
                .is_err()
            {
                frames.free_frame(f);
                break;
            }
            d.pages.insert(page, f);
            mapped += 1;
        }
        if mapped < pages {
            for i in 0..mapped {
                let page = va + i * PAGE_SIZE;
                if let Some(f) = d.pages.remove(&page) {
                    aspace.unmap(page);
                    frames.free_frame(f);
                }
            }
            return false;
        }
        if let Some(pci) = self.hv.pci.as_mut() {
            let added: alloc::vec::Vec<(u64, u64, bool)> = (0..pages)
                .filter_map(|i| {
                    let page = va + i * PAGE_SIZE;
                    d.pages.get(&page).map(|f| (page, f.0 * PAGE_SIZE, true))
                })
                .collect();
            pci.dma_map(token.target(), &added);
        }
        true
    }

    fn remove_extent(&mut self, token: &ControlToken, gpfn: u64, order: u32) -> bool {
        let Some((va, pages)) = Self::extent_range(gpfn, order) else {
            return false;
        };
        let Some(d) = self.hv.domains.get_mut(token.target()) else {
            return false;
        };
        if !(0..pages).all(|i| d.pages.contains_key(&(va + i * PAGE_SIZE))) {
            return false;
        }
        // A device of the domain must not reach a frame that goes back to the pool.
        if let Some(pci) = self.hv.pci.as_mut() {
            let vas: alloc::vec::Vec<u64> = (0..pages).map(|i| va + i * PAGE_SIZE).collect();
            if !pci.dma_unmap(token.target(), &vas) {
                return false;
            }
        }
        let Some(aspace) = d.aspace.as_mut() else {
            return false;
        };
        let mut frames = ReservedFrames {
            reservation: &mut d.reservation,
            pool: &mut *self.p.frames,
        };
        for i in 0..pages {
            let page = va + i * PAGE_SIZE;
            if let Some(f) = d.pages.remove(&page) {
                aspace.unmap(page);
                // A page another domain maps (granted) stays out of the pool until unmapped.
                if self.hv.frame_refs.lock().release(f) {
                    frames.free_frame(f);
                } else {
                    frames.reservation.uncharge();
                }
            }
        }
        true
    }
}
