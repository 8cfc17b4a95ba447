//! The blkfront seams on a Bulkhead domain: pages from the heap granted through this
//! domain's own grant table ([`DomainGrants`]), event channels by hypercall with
//! `SCHEDOP_poll` for waiting ([`DomainEvents`]), and xenstore through dom-rt's xenbus
//! client ([`XenbusStore`]).

use alloc::alloc::{Layout, alloc_zeroed};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::{GrantRef, NR_RESERVED_ENTRIES};
use shared_abi::ring::SharedRingMem;
use shared_abi::xenbus::{Store, StoreError};

use super::{BlkError, Events, Grants, XsStore};
use crate::XenError;
use crate::gnttab::GrantTable;
use crate::xenbus::{TRANSACTION_TRIES, Transport, Tx, Xenbus};
use crate::{evtchn, hypercall, time};

/// A page of this domain's heap (its virtual address; frame = `va >> 12`).
#[derive(Debug)]
pub struct DomPage {
    va: u64,
}

/// Heap pages and grant refs of this domain's own table: `first..end` for this one user
/// ([`DomainGrants::new`]), or every ref above the reserved ones, shared by every
/// [`DomainGrants::all`] in the domain (several frontends: each disk or vif hotplugged gets
/// its own `DomainGrants`, and a ref is handed to one of them at a time).
pub struct DomainGrants {
    table: GrantTable<'static>,
    next: GrantRef,
    end: GrantRef,
    free: Vec<GrantRef>,
    shared: bool,
}

/// The refs every [`DomainGrants::all`] of this domain draws from: never handed out yet
/// from `next` on, and ended ones to reuse.
struct SharedRefs {
    next: GrantRef,
    free: Vec<GrantRef>,
}

static SHARED_REFS: spin::Mutex<SharedRefs> = spin::Mutex::new(SharedRefs {
    next: NR_RESERVED_ENTRIES,
    free: Vec::new(),
});

impl core::fmt::Debug for DomainGrants {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DomainGrants")
            .field("next", &self.next)
            .field("end", &self.end)
            .finish()
    }
}

impl DomainGrants {
    /// Grant refs `first..end` are this frontend's (no one else in the domain may use them).
    pub fn new(first: GrantRef, end: GrantRef) -> Self {
        let table = GrantTable::own();
        let end = end.min(table.nr_entries());
        DomainGrants {
            table,
            next: first.max(NR_RESERVED_ENTRIES),
            end,
            free: Vec::new(),
            shared: false,
        }
    }

    /// Every ref above the reserved ones, shared with every other `all()` of the domain.
    pub fn all() -> Self {
        let mut g = Self::new(NR_RESERVED_ENTRIES, GrantRef::MAX);
        g.shared = true;
        g
    }

    fn take_ref(&mut self) -> Option<GrantRef> {
        if self.shared {
            let mut r = SHARED_REFS.lock();
            if let Some(g) = r.free.pop() {
                return Some(g);
            }
            if r.next < self.end {
                r.next += 1;
                return Some(r.next - 1);
            }
            return None;
        }
        match self.free.pop() {
            Some(g) => Some(g),
            None if self.next < self.end => {
                self.next += 1;
                Some(self.next - 1)
            }
            None => None,
        }
    }

    fn put_ref(&mut self, gref: GrantRef) {
        if self.shared {
            SHARED_REFS.lock().free.push(gref);
        } else {
            self.free.push(gref);
        }
    }

    fn pages(n: usize) -> Result<u64, BlkError> {
        let layout = Layout::from_size_align(PAGE_SIZE * n, PAGE_SIZE)
            .map_err(|_| BlkError::NoResources("pages"))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return Err(BlkError::NoResources("pages"));
        }
        Ok(p as u64)
    }
}

impl Grants for DomainGrants {
    type Page = DomPage;

    fn alloc_page(&mut self) -> Result<DomPage, BlkError> {
        Ok(DomPage {
            va: Self::pages(1)?,
        })
    }

    fn free_page(&mut self, page: DomPage) {
        if let Ok(layout) = Layout::from_size_align(PAGE_SIZE, PAGE_SIZE) {
            // SAFETY: `page` came from `alloc_page` with this layout and its grant has
            // ended, so nothing else refers to it.
            unsafe { alloc::alloc::dealloc(page.va as *mut u8, layout) };
        }
    }

    fn alloc_ring(&mut self, order: u32) -> Result<(SharedRingMem, Vec<DomPage>), BlkError> {
        let n = 1usize << order;
        let va = Self::pages(n)?;
        // SAFETY: the pages were just allocated for this ring and are never freed (rings
        // live as long as the domain), so they stay mapped RW; they are touched only
        // through SharedRingMem handles (and by the backend through its grant mapping).
        let mem = unsafe { SharedRingMem::from_raw(va as *mut u8, PAGE_SIZE * n) }
            .map_err(|_| BlkError::NoResources("ring pages"))?;
        let pages = (0..n as u64)
            .map(|i| DomPage {
                va: va + i * PAGE_SIZE as u64,
            })
            .collect();
        Ok((mem, pages))
    }

    fn read(&mut self, page: &DomPage, offset: usize, out: &mut [u8]) {
        if offset.checked_add(out.len()).is_none_or(|e| e > PAGE_SIZE) {
            return;
        }
        // SAFETY: the page is ours and mapped; the range is inside it (checked). The backend
        // may write it concurrently only if it misbehaves; the bytes are then garbage, never
        // undefined for u8.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (page.va as usize + offset) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }

    fn write(&mut self, page: &DomPage, offset: usize, data: &[u8]) {
        if offset.checked_add(data.len()).is_none_or(|e| e > PAGE_SIZE) {
            return;
        }
        // SAFETY: as in `read`.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (page.va as usize + offset) as *mut u8,
                data.len(),
            )
        };
    }

    fn grant(
        &mut self,
        domid: DomId,
        page: &DomPage,
        readonly: bool,
    ) -> Result<GrantRef, BlkError> {
        let gref = self.take_ref().ok_or(BlkError::NoResources("grant refs"))?;
        if let Err(e) = self.table.grant_access(gref, domid, page.va, readonly) {
            self.put_ref(gref);
            return Err(BlkError::Hypercall(e));
        }
        Ok(gref)
    }

    fn end_access(&mut self, gref: GrantRef) -> bool {
        if self.table.end_access(gref).is_ok() {
            self.put_ref(gref);
            true
        } else {
            false
        }
    }
}

/// Event channels by hypercall; waiting is `SCHEDOP_poll` on the queue ports with a short
/// timeout.
#[derive(Debug)]
pub struct DomainEvents {
    /// Longest single wait (ns).
    pub max_wait_ns: u64,
}

impl Default for DomainEvents {
    fn default() -> Self {
        DomainEvents {
            max_wait_ns: 10_000_000,
        }
    }
}

impl Events for DomainEvents {
    fn alloc_unbound(&mut self, remote: DomId) -> Result<EvtchnPort, BlkError> {
        let p = evtchn::alloc_unbound(remote).map_err(BlkError::Hypercall)?;
        let _ = evtchn::unmask(p);
        Ok(p)
    }

    fn close(&mut self, port: EvtchnPort) {
        let _ = evtchn::close(port);
    }

    fn notify(&mut self, port: EvtchnPort) -> Result<(), BlkError> {
        evtchn::send(port).map_err(BlkError::Hypercall)
    }

    fn wait(&mut self, ports: &[EvtchnPort]) {
        // Poll returns at once if a port is already pending, so an event that arrived after
        // the caller's last ring check is not lost; the bits are cleared after waking.
        let deadline = time::now_ns().saturating_add(self.max_wait_ns);
        let _ = hypercall::sched_poll(ports, deadline);
        for &p in ports {
            crate::event::clear_pending(p);
        }
    }
}

/// Xenstore through dom-rt's client: `write_all` is one transaction; waiting sleeps 1 ms.
pub struct XenbusStore<'a, T> {
    pub xb: &'a mut Xenbus<T>,
}

fn store_err(op: &'static str, path: &str, e: XenError) -> StoreError {
    StoreError {
        op,
        path: String::from(path),
        reason: format!("{e:?}"),
    }
}

impl<T: Transport> Store for XenbusStore<'_, T> {
    fn read(&mut self, path: &str) -> Result<Option<String>, StoreError> {
        match self.xb.read(Tx::NONE, path) {
            Ok(v) => String::from_utf8(v)
                .map(Some)
                .map_err(|_| store_err("read", path, XenError::EINVAL)),
            Err(XenError::ENOENT) => Ok(None),
            Err(e) => Err(store_err("read", path, e)),
        }
    }

    fn write(&mut self, path: &str, value: &str) -> Result<(), StoreError> {
        self.xb
            .write(Tx::NONE, path, value.as_bytes())
            .map_err(|e| store_err("write", path, e))
    }
}

impl<T: Transport> XsStore for XenbusStore<'_, T> {
    fn write_all(&mut self, entries: &[(String, String)]) -> Result<(), StoreError> {
        self.xb
            .transaction(TRANSACTION_TRIES, |xb, tx| {
                for (k, v) in entries {
                    xb.write(tx, k, v.as_bytes())?;
                }
                Ok(())
            })
            .map_err(|e| store_err("transaction", "", e))
    }

    fn wait(&mut self) {
        let _ = time::sleep(1_000_000);
    }
}

impl<T: Transport> crate::hotplug::DirStore for XenbusStore<'_, T> {
    fn directory(&mut self, path: &str) -> Result<Vec<String>, StoreError> {
        match self.xb.directory(Tx::NONE, path) {
            Ok(v) => Ok(v),
            Err(XenError::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(store_err("directory", path, e)),
        }
    }
}
