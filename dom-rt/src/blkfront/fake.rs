//! A host model of what blkfront needs from Xen, shared in one process by a frontend and the
//! backend a test plays (or the real blkback engine): granted pages with the hypervisor's
//! checks ([`FakeXen::map`]: the grantee must be the mapper, a writable mapping needs a
//! writable grant, a mapped grant cannot be ended), event-channel ports with pending flags
//! each way, and a xenstore ([`MemStore`]). Waiting ([`Events::wait`], [`XsStore::wait`])
//! runs the *peer*: a closure the test supplies that plays the backend for one round, so a
//! whole frontend/backend conversation runs deterministically on one thread.
//!
//! Pages are [`SharedRingMem`] regions (atomic words), so the frontend's and the backend's
//! view of a page are the same memory, as with a real grant mapping.

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::{GntStatus, GrantRef, NR_RESERVED_ENTRIES};
use shared_abi::ring::SharedRingMem;
use shared_abi::xenbus::{MemStore, Store, StoreError};

use super::{BlkError, Events, Grants, XsStore};

/// A page of a frontend: page `index` of region `mem` (region `region`).
#[derive(Clone, Debug)]
pub struct FakePage {
    pub mem: SharedRingMem,
    pub index: usize,
    pub region: u64,
}

impl FakePage {
    /// Copy bytes out of the page (offset + len within the page).
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        if offset.checked_add(out.len()).is_none_or(|e| e > PAGE_SIZE) {
            return false;
        }
        let base = self.index * PAGE_SIZE + offset;
        for (i, b) in out.iter_mut().enumerate() {
            let a = base + i;
            let w = self.mem.read_u32(a & !3).unwrap_or(0);
            *b = (w >> ((a & 3) * 8)) as u8;
        }
        true
    }

    /// Copy bytes into the page (offset + len within the page).
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        if offset.checked_add(data.len()).is_none_or(|e| e > PAGE_SIZE) {
            return false;
        }
        let base = self.index * PAGE_SIZE + offset;
        let mut i = 0;
        while i < data.len() {
            let a = base + i;
            if a & 3 == 0 && i + 4 <= data.len() {
                let w = u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
                self.mem.write_u32(a, w);
                i += 4;
            } else {
                let wa = a & !3;
                let sh = (a & 3) * 8;
                let w = self.mem.read_u32(wa).unwrap_or(0);
                let w = (w & !(0xFF << sh)) | (u32::from(data[i]) << sh);
                self.mem.write_u32(wa, w);
                i += 1;
            }
        }
        true
    }
}

#[derive(Debug)]
struct FakeGrant {
    page: FakePage,
    grantee: DomId,
    readonly: bool,
    mapped: u32,
}

#[derive(Debug, Default)]
struct FakePort {
    /// The frontend notified the backend.
    to_backend: bool,
    /// The backend notified the frontend.
    to_frontend: bool,
    closed: bool,
}

/// The shared model. See the module doc.
#[derive(Debug, Default)]
pub struct FakeXen {
    grants: BTreeMap<(DomId, GrantRef), FakeGrant>,
    next_ref: BTreeMap<DomId, GrantRef>,
    free_refs: BTreeMap<DomId, Vec<GrantRef>>,
    ports: BTreeMap<EvtchnPort, FakePort>,
    next_port: EvtchnPort,
    next_region: u64,
    /// Grants ever issued, and ended.
    pub granted: u64,
    pub ended: u64,
    /// Notifications each way.
    pub to_backend: u64,
    pub to_frontend: u64,
}

impl FakeXen {
    pub fn new() -> Self {
        Self::default()
    }

    fn region(&mut self) -> u64 {
        self.next_region += 1;
        self.next_region
    }

    /// `domid` grants `page` to `grantee`.
    pub fn grant(
        &mut self,
        domid: DomId,
        grantee: DomId,
        page: &FakePage,
        readonly: bool,
    ) -> Option<GrantRef> {
        let gref = match self.free_refs.get_mut(&domid).and_then(Vec::pop) {
            Some(g) => g,
            None => {
                let n = self.next_ref.entry(domid).or_insert(NR_RESERVED_ENTRIES);
                let g = *n;
                *n = n.checked_add(1)?;
                g
            }
        };
        self.grants.insert(
            (domid, gref),
            FakeGrant {
                page: page.clone(),
                grantee,
                readonly,
                mapped: 0,
            },
        );
        self.granted += 1;
        Some(gref)
    }

    /// End `domid`'s grant `gref`; false while it is mapped.
    pub fn end_access(&mut self, domid: DomId, gref: GrantRef) -> bool {
        match self.grants.get(&(domid, gref)) {
            Some(g) if g.mapped > 0 => false,
            Some(_) => {
                self.grants.remove(&(domid, gref));
                self.free_refs.entry(domid).or_default().push(gref);
                self.ended += 1;
                true
            }
            None => true,
        }
    }

    /// `mapper` maps `domid`'s grant `gref`, with the hypervisor's checks.
    pub fn map(
        &mut self,
        mapper: DomId,
        domid: DomId,
        gref: GrantRef,
        writable: bool,
    ) -> Result<FakePage, GntStatus> {
        match self.grants.get_mut(&(domid, gref)) {
            None => Err(GntStatus::BadGntref),
            Some(g) if g.grantee != mapper => Err(GntStatus::PermissionDenied),
            Some(g) if writable && g.readonly => Err(GntStatus::PermissionDenied),
            Some(g) => {
                g.mapped += 1;
                Ok(g.page.clone())
            }
        }
    }

    /// Undo one [`map`](Self::map).
    pub fn unmap(&mut self, domid: DomId, gref: GrantRef) {
        if let Some(g) = self.grants.get_mut(&(domid, gref)) {
            g.mapped = g.mapped.saturating_sub(1);
        }
    }

    /// Live grants of `domid`.
    pub fn live_grants(&self, domid: DomId) -> usize {
        self.grants.keys().filter(|(d, _)| *d == domid).count()
    }

    /// Live grants (of anyone) to `grantee`.
    pub fn grants_to(&self, grantee: DomId) -> usize {
        self.grants
            .values()
            .filter(|g| g.grantee == grantee)
            .count()
    }

    /// Mapped grants of `domid`.
    pub fn mapped_grants(&self, domid: DomId) -> usize {
        self.grants
            .iter()
            .filter(|((d, _), g)| *d == domid && g.mapped > 0)
            .count()
    }

    /// The ring region behind `domid`'s ring grants (page i of one region each), checking
    /// the grants as a mapping would (and leaving them mapped).
    pub fn map_ring(
        &mut self,
        mapper: DomId,
        domid: DomId,
        grefs: &[GrantRef],
    ) -> Result<SharedRingMem, GntStatus> {
        let mut region = None;
        let mut mem = None;
        for (i, &gref) in grefs.iter().enumerate() {
            let p = self.map(mapper, domid, gref, true)?;
            if p.index != i || region.is_some_and(|r| r != p.region) {
                return Err(GntStatus::BadGntref);
            }
            region = Some(p.region);
            mem.get_or_insert(p.mem);
        }
        mem.ok_or(GntStatus::BadGntref)
    }

    fn port(&mut self, port: EvtchnPort) -> Option<&mut FakePort> {
        self.ports.get_mut(&port).filter(|p| !p.closed)
    }

    /// The backend signals the frontend on `port`.
    pub fn notify_frontend(&mut self, port: EvtchnPort) {
        if let Some(p) = self.port(port) {
            p.to_frontend = true;
            self.to_frontend += 1;
        }
    }

    /// Consume a frontend → backend notification on `port`.
    pub fn take_backend_event(&mut self, port: EvtchnPort) -> bool {
        self.port(port)
            .map(|p| core::mem::take(&mut p.to_backend))
            .unwrap_or(false)
    }
}

/// The shared model, as each party holds it.
pub type SharedXen = Rc<RefCell<FakeXen>>;
/// One round of the backend (or anything else the test runs while the frontend waits).
pub type Peer = Rc<RefCell<dyn FnMut()>>;

/// The frontend's [`Grants`].
#[derive(Clone)]
pub struct FakeGrants {
    pub xen: SharedXen,
    pub domid: DomId,
    /// Refuse to allocate more than this many data pages (tests of exhaustion).
    pub page_limit: usize,
    pub pages: usize,
}

impl FakeGrants {
    pub fn new(xen: SharedXen, domid: DomId) -> Self {
        FakeGrants {
            xen,
            domid,
            page_limit: usize::MAX,
            pages: 0,
        }
    }
}

impl Grants for FakeGrants {
    type Page = FakePage;

    fn alloc_page(&mut self) -> Result<FakePage, BlkError> {
        if self.pages >= self.page_limit {
            return Err(BlkError::NoResources("pages"));
        }
        self.pages += 1;
        let region = self.xen.borrow_mut().region();
        let mem =
            SharedRingMem::new_owned(PAGE_SIZE).map_err(|_| BlkError::NoResources("pages"))?;
        Ok(FakePage {
            mem,
            index: 0,
            region,
        })
    }

    fn free_page(&mut self, _page: FakePage) {
        self.pages = self.pages.saturating_sub(1);
    }

    fn alloc_ring(&mut self, order: u32) -> Result<(SharedRingMem, Vec<FakePage>), BlkError> {
        let n = 1usize << order;
        let mem = SharedRingMem::new_owned(PAGE_SIZE * n)
            .map_err(|_| BlkError::NoResources("ring pages"))?;
        let region = self.xen.borrow_mut().region();
        let pages = (0..n)
            .map(|index| FakePage {
                mem: mem.clone(),
                index,
                region,
            })
            .collect();
        Ok((mem, pages))
    }

    fn read(&mut self, page: &FakePage, offset: usize, out: &mut [u8]) {
        page.read(offset, out);
    }

    fn write(&mut self, page: &FakePage, offset: usize, data: &[u8]) {
        page.write(offset, data);
    }

    fn grant(
        &mut self,
        domid: DomId,
        page: &FakePage,
        readonly: bool,
    ) -> Result<GrantRef, BlkError> {
        self.xen
            .borrow_mut()
            .grant(self.domid, domid, page, readonly)
            .ok_or(BlkError::NoResources("grant refs"))
    }

    fn end_access(&mut self, gref: GrantRef) -> bool {
        self.xen.borrow_mut().end_access(self.domid, gref)
    }
}

/// The frontend's [`Events`]: waiting runs the peer once.
pub struct FakeEvents {
    pub xen: SharedXen,
    pub peer: Peer,
    /// Waits so far.
    pub waits: u64,
    /// Stop running the peer after this many waits (a hung backend in tests ends).
    pub wait_limit: u64,
}

impl FakeEvents {
    pub fn new(xen: SharedXen, peer: Peer) -> Self {
        FakeEvents {
            xen,
            peer,
            waits: 0,
            wait_limit: u64::MAX,
        }
    }
}

impl Events for FakeEvents {
    fn alloc_unbound(&mut self, _remote: DomId) -> Result<EvtchnPort, BlkError> {
        let mut x = self.xen.borrow_mut();
        x.next_port += 1;
        let p = x.next_port;
        x.ports.insert(p, FakePort::default());
        Ok(p)
    }

    fn close(&mut self, port: EvtchnPort) {
        if let Some(p) = self.xen.borrow_mut().ports.get_mut(&port) {
            p.closed = true;
        }
    }

    fn notify(&mut self, port: EvtchnPort) -> Result<(), BlkError> {
        let mut x = self.xen.borrow_mut();
        match x.port(port) {
            Some(p) => {
                p.to_backend = true;
                x.to_backend += 1;
                Ok(())
            }
            None => Err(BlkError::Hypercall(crate::XenError::EINVAL)),
        }
    }

    fn wait(&mut self, ports: &[EvtchnPort]) {
        self.waits += 1;
        {
            let mut x = self.xen.borrow_mut();
            for &p in ports {
                if let Some(p) = x.port(p) {
                    p.to_frontend = false;
                }
            }
        }
        if self.waits <= self.wait_limit {
            (self.peer.borrow_mut())();
        }
    }
}

/// The frontend's [`XsStore`] over a shared [`MemStore`]: waiting runs the peer once.
pub struct FakeStore {
    pub store: Rc<RefCell<MemStore>>,
    pub peer: Peer,
    /// Writes in the order they were made (path, value).
    pub log: Vec<(String, String)>,
}

impl FakeStore {
    pub fn new(store: Rc<RefCell<MemStore>>, peer: Peer) -> Self {
        FakeStore {
            store,
            peer,
            log: Vec::new(),
        }
    }
}

impl Store for FakeStore {
    fn read(&mut self, path: &str) -> Result<Option<String>, StoreError> {
        self.store.borrow_mut().read(path)
    }

    fn write(&mut self, path: &str, value: &str) -> Result<(), StoreError> {
        self.log.push((String::from(path), String::from(value)));
        self.store.borrow_mut().write(path, value)
    }
}

impl XsStore for FakeStore {
    fn wait(&mut self) {
        (self.peer.borrow_mut())();
    }
}

impl crate::hotplug::DirStore for FakeStore {
    fn directory(&mut self, path: &str) -> Result<Vec<String>, StoreError> {
        let prefix = alloc::format!("{}/", path.trim_end_matches('/'));
        let mut out: Vec<String> = Vec::new();
        for k in self.store.borrow().nodes.keys() {
            if let Some(rest) = k.strip_prefix(&prefix)
                && let Some(child) = rest.split('/').next()
                && !child.is_empty()
                && out.last().is_none_or(|l| l != child)
            {
                out.push(String::from(child));
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

/// A peer that does nothing.
pub fn idle_peer() -> Peer {
    let p: Peer = Rc::new(RefCell::new(|| {}));
    p
}
