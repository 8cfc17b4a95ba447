//! Host harness: netfront against the real netback engine (`netback_dom`) in one process.
//!
//! The frontend runs on blkfront's fake grant model ([`crate::blkfront::fake`]: pages,
//! grants with the hypervisor's checks, ports with pending flags, a shared [`MemStore`]),
//! with a clock ([`NetEvents`]) that advances on every wait. The backend side is
//! [`Backend`]: the engine's xenbus half ([`NetbackXenbus`]) over the same store, its
//! queues ([`Vif`]) over the frontend's ring pages, and a [`GrantCopier`] ([`Copier`]) that
//! performs `GNTTABOP_copy` against the fake grants as the hypervisor would (the backend
//! domain must be the grantee; writing needs a writable grant; offsets stay in the page).
//! Whenever the frontend waits (for the store or an event), every backend runs one round.

#![allow(clippy::unwrap_used)]

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use netback_dom::backend::{MIN_POOL_PAGES, Notify, Queue, QueueConfig, QueueState, RingKind, Vif};
use netback_dom::grant::{GrantCopier, PagePool};
use netback_dom::packet::Packet;
use netback_dom::xenbus::{Action, BackendFeatures, EventChannels, NetbackXenbus};
use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::domid::DOMID_SELF;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::{GntStatus, GnttabCopy, GrantRef, gntcopy};
use shared_abi::xenbus::MemStore;

use crate::blkfront::fake::{FakeEvents, Peer, SharedXen};
use crate::front::{BlkError, Events};

/// blkfront's fake events plus a clock that advances `step_ns` per wait.
pub struct NetEvents {
    pub inner: FakeEvents,
    pub now: u64,
    pub step_ns: u64,
}

impl NetEvents {
    pub fn new(xen: SharedXen, peer: Peer) -> Self {
        NetEvents {
            inner: FakeEvents::new(xen, peer),
            now: 0,
            step_ns: 1_000_000,
        }
    }
}

impl Events for NetEvents {
    fn alloc_unbound(&mut self, remote: DomId) -> Result<EvtchnPort, BlkError> {
        self.inner.alloc_unbound(remote)
    }
    fn close(&mut self, port: EvtchnPort) {
        self.inner.close(port)
    }
    fn notify(&mut self, port: EvtchnPort) -> Result<(), BlkError> {
        self.inner.notify(port)
    }
    fn wait(&mut self, ports: &[EvtchnPort]) {
        self.now += self.step_ns;
        self.inner.wait(ports)
    }
    fn now_ns(&mut self) -> u64 {
        self.now
    }
}

/// `GNTTABOP_copy` for backend domain `me` against the fake grants.
pub struct Copier {
    pub xen: SharedXen,
    pub me: DomId,
}

impl Copier {
    fn one(&mut self, op: &GnttabCopy, pool: &mut PagePool) -> GntStatus {
        let len = usize::from(op.len);
        let (so, doff) = (usize::from(op.source.offset), usize::from(op.dest.offset));
        if so + len > PAGE_SIZE || doff + len > PAGE_SIZE {
            return GntStatus::BadCopyArg;
        }
        let mut tmp = alloc::vec![0u8; len];
        if op.flags & gntcopy::SOURCE_GREF != 0 {
            let Ok(gref) = GrantRef::try_from(op.source.u) else {
                return GntStatus::BadGntref;
            };
            let page = match self
                .xen
                .borrow_mut()
                .map(self.me, op.source.domid, gref, false)
            {
                Ok(p) => p,
                Err(e) => return e,
            };
            page.read(so, &mut tmp);
            self.xen.borrow_mut().unmap(op.source.domid, gref);
        } else {
            if op.source.domid != DOMID_SELF {
                return GntStatus::PermissionDenied;
            }
            let Some(p) = pool.page_by_gfn(op.source.u) else {
                return GntStatus::BadPage;
            };
            tmp.copy_from_slice(&p[so..so + len]);
        }
        if op.flags & gntcopy::DEST_GREF != 0 {
            let Ok(gref) = GrantRef::try_from(op.dest.u) else {
                return GntStatus::BadGntref;
            };
            let page = match self
                .xen
                .borrow_mut()
                .map(self.me, op.dest.domid, gref, true)
            {
                Ok(p) => p,
                Err(e) => return e,
            };
            page.write(doff, &tmp);
            self.xen.borrow_mut().unmap(op.dest.domid, gref);
        } else {
            if op.dest.domid != DOMID_SELF {
                return GntStatus::PermissionDenied;
            }
            let Some(p) = pool.page_by_gfn_mut(op.dest.u) else {
                return GntStatus::BadPage;
            };
            p[doff..doff + len].copy_from_slice(&tmp);
        }
        GntStatus::Okay
    }
}

impl GrantCopier for Copier {
    fn copy(&mut self, ops: &mut [GnttabCopy], pool: &mut PagePool) -> Result<(), GntStatus> {
        for op in ops.iter_mut() {
            op.status = self.one(op, pool).as_i16();
        }
        Ok(())
    }
}

/// The backend's event channels to the frontend, per queue (tx, rx).
pub struct Ports {
    pub xen: SharedXen,
    pub ports: Vec<(EvtchnPort, EvtchnPort)>,
}

impl Notify for Ports {
    fn notify(&mut self, queue: u16, ring: RingKind) {
        if let Some(&(tx, rx)) = self.ports.get(usize::from(queue)) {
            let p = match ring {
                RingKind::Tx => tx,
                RingKind::Rx => rx,
            };
            self.xen.borrow_mut().notify_frontend(p);
        }
    }
}

/// A backend domain as a test plays it, around the real engine.
pub struct Backend {
    pub xen: SharedXen,
    pub store: Rc<RefCell<MemStore>>,
    pub domid: DomId,
    pub front: DomId,
    pub be_dir: String,
    pub fe_dir: String,
    pub features: BackendFeatures,
    /// The vif's MTU (the engine refuses larger non-GSO tx frames).
    pub mtu: usize,
    pub xb: Option<NetbackXenbus>,
    pub vif: Option<Vif>,
    pub copier: Copier,
    pub notify: Ports,
    ring_refs: Vec<GrantRef>,
    last_front: Option<String>,
    /// Frames the frontend sent.
    pub received: Vec<Packet>,
    /// Frames to hand to the frontend (spread over its queues by flow).
    pub to_front: VecDeque<Packet>,
    /// A dead backend does nothing.
    pub alive: bool,
    /// Serve the rings (false: connect, then leave the rings alone).
    pub serve: bool,
    pub rounds: u64,
    /// Last xenbus error (a frontend key the engine refused).
    pub error: Option<String>,
}

impl Backend {
    pub fn new(
        xen: SharedXen,
        store: Rc<RefCell<MemStore>>,
        domid: DomId,
        front: DomId,
        be_dir: &str,
        fe_dir: &str,
    ) -> Self {
        Backend {
            copier: Copier {
                xen: xen.clone(),
                me: domid,
            },
            notify: Ports {
                xen: xen.clone(),
                ports: Vec::new(),
            },
            xen,
            store,
            domid,
            front,
            be_dir: String::from(be_dir),
            fe_dir: String::from(fe_dir),
            features: BackendFeatures::default(),
            mtu: 1500,
            xb: None,
            vif: None,
            ring_refs: Vec::new(),
            last_front: None,
            received: Vec::new(),
            to_front: VecDeque::new(),
            alive: true,
            serve: true,
            rounds: 0,
            error: None,
        }
    }

    /// The backend dies: the hypervisor tears its ring mappings down.
    pub fn kill(&mut self) {
        self.alive = false;
        self.vif = None;
        for g in self.ring_refs.drain(..) {
            self.xen.borrow_mut().unmap(self.front, g);
        }
    }

    fn disconnect(&mut self) {
        self.vif = None;
        for g in self.ring_refs.drain(..) {
            self.xen.borrow_mut().unmap(self.front, g);
        }
    }

    fn connect(&mut self, conn: &netback_dom::xenbus::Connection) {
        let mut queues = Vec::new();
        let mut ports = Vec::new();
        for (i, q) in conn.queues.iter().enumerate() {
            let tx = self
                .xen
                .borrow_mut()
                .map_ring(self.domid, self.front, &[q.tx_ring_ref])
                .unwrap();
            let rx = self
                .xen
                .borrow_mut()
                .map_ring(self.domid, self.front, &[q.rx_ring_ref])
                .unwrap();
            self.ring_refs.push(q.tx_ring_ref);
            self.ring_refs.push(q.rx_ring_ref);
            ports.push(match q.event {
                EventChannels::Single(p) => (p, p),
                EventChannels::Split { tx, rx } => (tx, rx),
            });
            let mut cfg = QueueConfig::new(conn.frontend_id, i as u16);
            cfg.rx_sg = conn.sg;
            cfg.rx_gso_tcpv4 = conn.gso_tcpv4;
            cfg.rx_gso_tcpv6 = conn.gso_tcpv6;
            cfg.mtu = self.mtu;
            let pool = PagePool::with_fake_frames(MIN_POOL_PAGES, 0x10_000 * (i as u64 + 1));
            queues.push(Queue::new(cfg, tx, rx, pool).unwrap());
        }
        self.notify.ports = ports;
        self.vif = Some(Vif::new(queues).unwrap());
    }

    /// One round: react to the frontend's state, then serve the rings.
    pub fn round(&mut self) {
        if !self.alive {
            return;
        }
        self.rounds += 1;
        if self.xb.is_none() {
            match NetbackXenbus::probe(&mut *self.store.borrow_mut(), &self.be_dir, self.features) {
                Ok(xb) => self.xb = Some(xb),
                Err(e) => {
                    self.error = Some(alloc::format!("{e}"));
                    return;
                }
            }
        }
        let fstate = self
            .store
            .borrow()
            .get(&alloc::format!("{}/state", self.fe_dir))
            .map(String::from);
        if fstate != self.last_front {
            self.last_front = fstate;
            let Some(xb) = self.xb.as_mut() else {
                return;
            };
            let action = xb.frontend_changed(&mut *self.store.borrow_mut());
            match action {
                Ok(Action::Connect(conn)) => {
                    self.connect(&conn);
                    let Some(xb) = self.xb.as_mut() else {
                        return;
                    };
                    xb.connected(&mut *self.store.borrow_mut()).unwrap();
                }
                Ok(Action::Disconnect) => self.disconnect(),
                Ok(Action::Close | Action::Remove) => {
                    // Unmap first, then Closed (the frontend ends its grants on Closed).
                    self.disconnect();
                    if let Some(xb) = self.xb.as_mut() {
                        let _ = xb.disconnected(&mut *self.store.borrow_mut());
                    }
                }
                Ok(Action::None) => {}
                Err(e) => self.error = Some(alloc::format!("{e}")),
            }
        }
        if self.serve {
            self.service();
        }
    }

    /// Serve every queue once: tx to `received`, `to_front` onto the rx rings.
    pub fn service(&mut self) {
        let Some(vif) = self.vif.as_mut() else {
            return;
        };
        for &(tx, rx) in &self.notify.ports {
            self.xen.borrow_mut().take_backend_event(tx);
            self.xen.borrow_mut().take_backend_event(rx);
        }
        while let Some(p) = self.to_front.pop_front() {
            vif.enqueue_rx(p);
        }
        for i in 0..vif.num_queues() {
            let received = &mut self.received;
            let _ = vif.process_tx(i, &mut self.copier, &mut self.notify, |p| {
                received.push(p);
                true
            });
            let _ = vif.deliver_rx(i, &mut self.copier, &mut self.notify);
        }
    }

    pub fn connected(&self) -> bool {
        self.vif.as_ref().is_some_and(|v| {
            (0..v.num_queues()).all(|i| {
                v.queue(i)
                    .is_some_and(|q| q.state() == QueueState::Connected)
            })
        })
    }
}

/// Every backend of a test, run in turn as the frontend's peer.
pub type Backends = Rc<RefCell<Vec<Backend>>>;

/// A peer that runs one round of every live backend.
pub fn backends_peer(b: Backends) -> Peer {
    let p: Peer = Rc::new(RefCell::new(move || {
        for be in b.borrow_mut().iter_mut() {
            be.round();
        }
    }));
    p
}
