//! dom-rt's blkfront against this engine in one process: the real xenbus handshake on both
//! sides over a shared store, rings and data pages in dom-rt's fake grant model (which both
//! ends use, as a real grant mapping shares the page), and the engine run by the fake's
//! "peer" whenever the frontend waits. Checks data end to end (a seeded pattern of mixed
//! sizes and offsets, against the RAM disk's bytes) under every feature combination:
//! persistent grants, indirect requests, multi-page rings, multiple queues, each on and
//! negotiated off; out-of-order completion; a read-only disk.
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use blkback_dom::device::{BlockIo, DeviceInfo, IoCompletion, IoRequest, RamDisk, SyncIo};
use blkback_dom::engine::{Notify, Vbd};
use blkback_dom::grant::{GrantMapper, MapRequest, Mapping};
use blkback_dom::xenbus::{Action, BackendOffer, BlkbackXenbus};
use dom_rt::blkfront::fake::{
    FakeEvents, FakeGrants, FakePage, FakeStore, FakeXen, Peer, SharedXen,
};
use dom_rt::blkfront::{BlkError, Blkfront, BlockDevice, FrontConfig};
use shared_abi::DomId;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::GntStatus;
use shared_abi::xenbus::MemStore;

const FRONT: DomId = 7;
const BACK: DomId = 1;
const FE: &str = "/local/domain/7/device/vbd/51712";
const BE: &str = "/local/domain/1/backend/vbd/7/51712";

/// blkback's grant seam over the fake: mappings are the frontend's very pages.
struct Mapper {
    xen: SharedXen,
    live: BTreeMap<u64, FakePage>,
    next: u64,
}

impl GrantMapper for Mapper {
    fn map(
        &mut self,
        domid: DomId,
        reqs: &[MapRequest],
        out: &mut Vec<Result<Mapping, GntStatus>>,
    ) {
        out.clear();
        for r in reqs {
            let res = self.xen.borrow_mut().map(BACK, domid, r.gref, r.writable);
            out.push(res.map(|page| {
                self.next += 1;
                self.live.insert(self.next, page);
                Mapping {
                    domid,
                    gref: r.gref,
                    writable: r.writable,
                    handle: self.next as u32,
                    token: self.next,
                }
            }));
        }
    }

    fn unmap(&mut self, maps: &[Mapping]) {
        for m in maps {
            if self.live.remove(&m.token).is_some() {
                self.xen.borrow_mut().unmap(m.domid, m.gref);
            }
        }
    }

    fn read(&mut self, m: &Mapping, offset: usize, out: &mut [u8]) -> Result<(), GntStatus> {
        let p = self.live.get(&m.token).ok_or(GntStatus::BadHandle)?;
        p.read(offset, out)
            .then_some(())
            .ok_or(GntStatus::BadCopyArg)
    }

    fn write(&mut self, m: &Mapping, offset: usize, data: &[u8]) -> Result<(), GntStatus> {
        if !m.writable {
            return Err(GntStatus::PermissionDenied);
        }
        let p = self.live.get(&m.token).ok_or(GntStatus::BadHandle)?;
        p.write(offset, data)
            .then_some(())
            .ok_or(GntStatus::BadCopyArg)
    }
}

struct Ports {
    xen: SharedXen,
    ports: Vec<EvtchnPort>,
}

impl Notify for Ports {
    fn notify(&mut self, queue: u16) {
        if let Some(&p) = self.ports.get(usize::from(queue)) {
            self.xen.borrow_mut().notify_frontend(p);
        }
    }
}

/// Completes operations out of order: holds every completion and hands out the newest
/// first.
struct Lifo<D> {
    inner: SyncIo<D>,
    held: VecDeque<IoCompletion>,
}

impl<D: blkback_dom::device::BlockDevice> BlockIo for Lifo<D> {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn submit(&mut self, req: IoRequest) {
        self.inner.submit(req);
        while let Some(c) = self.inner.poll() {
            self.held.push_back(c);
        }
    }
    fn poll(&mut self) -> Option<IoCompletion> {
        self.held.pop_back()
    }
}

type Io = Lifo<RamDisk>;

/// The backend domain as the test plays it.
struct Backend {
    xen: SharedXen,
    store: Rc<RefCell<MemStore>>,
    xb: BlkbackXenbus,
    offer: BackendOffer,
    disk: Option<RamDisk>,
    vbd: Option<Vbd<Io>>,
    mapper: Mapper,
    ports: Ports,
    last_front: Option<String>,
    rounds: u64,
    ring_refs: Vec<u32>,
}

impl Backend {
    fn round(&mut self) {
        self.rounds += 1;
        let fstate = self
            .store
            .borrow()
            .get(&format!("{FE}/state"))
            .map(String::from);
        if fstate != self.last_front {
            self.last_front = fstate;
            let action = self.xb.frontend_changed(&mut *self.store.borrow_mut());
            if let Ok(Action::Disconnect { .. } | Action::Remove) = action {
                if let Some(mut v) = self.vbd.take() {
                    v.shutdown(&mut self.mapper);
                }
                for g in self.ring_refs.drain(..) {
                    self.xen.borrow_mut().unmap(FRONT, g);
                }
                self.xb.disconnected(&mut *self.store.borrow_mut()).unwrap();
            }
            if let Ok(Action::Connect(conn)) = action {
                self.ring_refs = conn
                    .queues
                    .iter()
                    .flat_map(|q| q.ring_refs.clone())
                    .collect();
                let rings = conn
                    .queues
                    .iter()
                    .map(|q| {
                        self.xen
                            .borrow_mut()
                            .map_ring(BACK, FRONT, &q.ring_refs)
                            .unwrap()
                    })
                    .collect();
                self.ports.ports = conn.queues.iter().map(|q| q.event_channel).collect();
                let io = Lifo {
                    inner: SyncIo::new(self.disk.take().unwrap()),
                    held: VecDeque::new(),
                };
                let vbd = Vbd::new(conn.vbd_config(&self.offer), io, rings).unwrap();
                self.xb
                    .connected(&mut *self.store.borrow_mut(), &vbd.advertised())
                    .unwrap();
                self.vbd = Some(vbd);
            }
        }
        if let Some(v) = &mut self.vbd {
            // Notifications are only hints; the engine checks every ring.
            for &p in &self.ports.ports {
                self.xen.borrow_mut().take_backend_event(p);
            }
            v.service(&mut self.mapper, &mut self.ports).unwrap();
        }
    }
}

struct World {
    xen: SharedXen,
    backend: Rc<RefCell<Backend>>,
    front: Blkfront<FakeGrants, FakeEvents>,
    fs: FakeStore,
}

impl World {
    fn disk(&self) -> Vec<u8> {
        let b = self.backend.borrow();
        b.vbd.as_ref().unwrap().io().inner.device().bytes().to_vec()
    }
}

fn toolstack(s: &mut MemStore, read_only: bool) {
    for (k, v) in [
        ("backend", BE),
        ("backend-id", "1"),
        ("state", "1"),
        ("device-type", "disk"),
        ("virtual-device", "51712"),
    ] {
        s.set(&format!("{FE}/{k}"), v);
    }
    for (k, v) in [
        ("frontend", FE),
        ("frontend-id", "7"),
        ("state", "1"),
        ("online", "1"),
        ("mode", if read_only { "r" } else { "w" }),
        ("device-type", "disk"),
    ] {
        s.set(&format!("{BE}/{k}"), v);
    }
}

fn world(offer: BackendOffer, cfg: FrontConfig, sectors: u64, read_only: bool) -> World {
    let xen: SharedXen = Rc::new(RefCell::new(FakeXen::new()));
    let store = Rc::new(RefCell::new(MemStore::default()));
    toolstack(&mut store.borrow_mut(), read_only);
    let xb = BlkbackXenbus::probe(&mut *store.borrow_mut(), BE, offer.clone()).unwrap();
    let backend = Rc::new(RefCell::new(Backend {
        xen: xen.clone(),
        store: store.clone(),
        xb,
        offer,
        disk: Some(RamDisk::new(sectors, 512).unwrap()),
        vbd: None,
        mapper: Mapper {
            xen: xen.clone(),
            live: BTreeMap::new(),
            next: 0,
        },
        ports: Ports {
            xen: xen.clone(),
            ports: Vec::new(),
        },
        last_front: None,
        rounds: 0,
        ring_refs: Vec::new(),
    }));
    let b = backend.clone();
    let peer: Peer = Rc::new(RefCell::new(move || b.borrow_mut().round()));
    let mut fs = FakeStore::new(store, peer.clone());
    let front = Blkfront::connect(
        &mut fs,
        FakeGrants::new(xen.clone(), FRONT),
        FakeEvents::new(xen.clone(), peer),
        &cfg,
    )
    .unwrap();
    World {
        xen,
        backend,
        front,
        fs,
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Mixed sizes and offsets over a 4 MiB disk, flushes in between; the model is checked
/// against the frontend's reads and the backend's disk bytes.
fn pattern_roundtrip(w: &mut World) {
    let disk_bytes = (w.front.sectors() * 512) as usize;
    let mut model = vec![0u8; disk_bytes];
    let sizes = [
        512usize,
        4096,
        1536,
        45056,
        45568,
        131072,
        1 << 20,
        7 * 512,
        65536,
    ];
    let mut rng = 0x1234_5678u64;
    for (i, &size) in sizes.iter().cycle().take(40).enumerate() {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let max_sector = (disk_bytes - size) / 512;
        let sector = (rng >> 33) % (max_sector as u64 + 1);
        let data = pattern(size, i as u64);
        w.front.write(sector, &data).unwrap();
        let off = sector as usize * 512;
        model[off..off + size].copy_from_slice(&data);
        if i % 7 == 0 {
            w.front.flush().unwrap();
        }
    }
    w.front.flush().unwrap();
    let mut back = vec![0u8; 1 << 20];
    for chunk in 0..disk_bytes / back.len() {
        w.front.read((chunk * 2048) as u64, &mut back).unwrap();
        assert!(
            back == model[chunk * back.len()..(chunk + 1) * back.len()],
            "chunk {chunk} read back differs"
        );
    }
    assert!(w.disk() == model, "disk image differs from the pattern");
}

fn offer(persistent: bool, indirect: usize, order: u32, queues: u32) -> BackendOffer {
    let mut o = BackendOffer::default();
    o.vbd.persistent = persistent;
    o.vbd.max_indirect_segments = indirect;
    o.max_ring_page_order = order;
    o.max_queues = queues;
    o
}

fn front(persistent: bool, order: u32, queues: u32) -> FrontConfig {
    let mut c = FrontConfig::new(FE);
    c.persistent = persistent;
    c.ring_page_order = order;
    c.max_queues = queues;
    c
}

#[test]
fn pattern_roundtrip_with_everything_negotiated() {
    let mut w = world(offer(true, 256, 4, 4), front(true, 2, 4), 8192, false);
    let i = *w.front.info();
    assert!(i.persistent && i.indirect && i.flush);
    assert_eq!((i.queues, i.ring_page_order, i.max_segments), (4, 2, 32));
    pattern_roundtrip(&mut w);
    let s = w.front.stats();
    assert!(s.indirect_requests > 0);
    let b = w.backend.borrow();
    let vs = b.vbd.as_ref().unwrap().stats();
    assert!(vs.persistent_hits > 0, "{vs:?}");
    assert_eq!(vs.error + vs.eopnotsupp, 0, "{vs:?}");
    // Persistent pages are granted once and reused.
    assert!(s.grants < 1200, "{s:?}");
    drop(b);
    close_cleanly(w);
}

#[test]
fn pattern_roundtrip_with_everything_off() {
    // An old backend: no persistent grants, no indirect, one single-page ring.
    let mut w = world(offer(false, 0, 0, 1), front(true, 2, 4), 8192, false);
    let i = *w.front.info();
    assert!(!i.persistent && !i.indirect);
    assert_eq!((i.queues, i.ring_page_order, i.max_segments), (1, 0, 11));
    pattern_roundtrip(&mut w);
    assert_eq!(w.front.stats().indirect_requests, 0);
    // Every per-request grant was ended: only the ring page is still granted.
    assert_eq!(w.xen.borrow().live_grants(FRONT), 1);
    assert_eq!(w.xen.borrow().mapped_grants(FRONT), 1);
    close_cleanly(w);
}

/// Close: both sides end Closed, the backend unmapped everything, every grant ended.
fn close_cleanly(w: World) {
    let World {
        xen,
        backend,
        front,
        mut fs,
    } = w;
    front.close(&mut fs, FE, 100).unwrap();
    let store = fs.store.borrow();
    assert_eq!(store.get(&format!("{FE}/state")), Some("6"));
    assert_eq!(store.get(&format!("{BE}/state")), Some("6"));
    drop(store);
    assert!(backend.borrow().vbd.is_none() || xen.borrow().mapped_grants(FRONT) == 0);
    assert_eq!(xen.borrow().mapped_grants(FRONT), 0);
    assert_eq!(xen.borrow().live_grants(FRONT), 0);
}

#[test]
fn pattern_roundtrip_old_frontend_on_a_full_backend() {
    // The frontend declines persistent grants and indirect requests.
    let mut cfg = front(false, 0, 1);
    cfg.max_indirect_segments = 0;
    let mut w = world(offer(true, 256, 4, 4), cfg, 8192, false);
    let i = *w.front.info();
    assert!(!i.persistent && !i.indirect);
    pattern_roundtrip(&mut w);
    let b = w.backend.borrow();
    assert_eq!(b.vbd.as_ref().unwrap().stats().persistent_hits, 0);
}

#[test]
fn each_feature_alone() {
    for (o, c) in [
        (offer(true, 0, 0, 1), front(true, 0, 1)),
        (offer(false, 256, 0, 1), front(false, 0, 1)),
        (offer(false, 0, 4, 1), front(false, 4, 1)),
        (offer(false, 0, 0, 4), front(false, 0, 4)),
    ] {
        let mut w = world(o, c, 8192, false);
        pattern_roundtrip(&mut w);
    }
}

#[test]
fn queue_depth_32_random_reads_complete_out_of_order() {
    let mut w = world(offer(true, 256, 0, 1), front(true, 0, 1), 8192, false);
    let data = pattern(4 << 20, 99);
    w.front.write(0, &data).unwrap();
    let mut want = BTreeMap::new();
    let mut rng = 7u64;
    for _ in 0..32 {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
        let sector = ((rng >> 33) % 1024) * 8;
        let t = w.front.submit_read(sector, 4096).unwrap();
        want.insert(t, sector as usize * 512);
    }
    let mut order = Vec::new();
    while let Some(c) = w.front.wait_any() {
        let off = want.remove(&c.tag).unwrap();
        assert!(c.result.unwrap() == data[off..off + 4096]);
        order.push(c.tag);
    }
    assert!(want.is_empty());
    assert!(
        order.windows(2).any(|p| p[0] > p[1]),
        "completions came in order: {order:?}"
    );
}

#[test]
fn a_read_only_disk_refuses_writes_and_serves_reads() {
    let mut w = world(offer(true, 256, 0, 1), front(true, 0, 1), 2048, true);
    assert!(w.front.read_only());
    assert_eq!(w.front.write(0, &[0; 512]), Err(BlkError::ReadOnly));
    let mut buf = vec![1u8; 4096];
    w.front.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

/// `block-detach` as libxl does it against the real engine with persistent grants: the
/// toolstack writes `online` = 0 and the backend's Closing; the frontend releases the disk
/// (straight to Closed), the backend unmaps every persistent grant before it writes Closed,
/// and every grant of the frontend ends.
#[test]
fn toolstack_detach_with_persistent_grants_releases_every_grant() {
    let mut w = world(offer(true, 256, 2, 2), front(true, 2, 2), 4096, false);
    assert!(w.front.info().persistent);
    pattern_roundtrip(&mut w);
    assert!(
        w.xen.borrow().mapped_grants(FRONT) > 4,
        "persistent pages mapped"
    );
    let World {
        xen,
        backend,
        front,
        mut fs,
    } = w;
    {
        let mut s = fs.store.borrow_mut();
        s.set(&format!("{BE}/online"), "0");
        s.set(&format!("{BE}/state"), "5");
    }
    let r = front.release(&mut fs, FE, 100);
    assert_eq!(r.result(), Ok(()), "{r:?}");
    assert_eq!(r.leaked, 0, "{r:?}");
    let fe_writes: Vec<&str> = fs
        .log
        .iter()
        .filter(|(k, _)| *k == format!("{FE}/state"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(fe_writes.last(), Some(&"6"));
    assert!(!fe_writes.contains(&"5"), "{fe_writes:?}");
    assert_eq!(fs.store.borrow().get(&format!("{BE}/state")), Some("6"));
    assert!(backend.borrow().vbd.is_none());
    assert_eq!(xen.borrow().mapped_grants(FRONT), 0);
    assert_eq!(xen.borrow().live_grants(FRONT), 0);
}
