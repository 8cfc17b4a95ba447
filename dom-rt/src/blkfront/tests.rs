//! Frontend against a backend played by the test: the handshake keys, and a hostile backend
//! (garbage ids, operations, statuses, ring indices). The conversation with the real blkback
//! engine is in `blkback-dom/tests/blkfront.rs`.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use shared_abi::blkif::{BlkifRequestKind, BlkifRequestSlot, BlkifResponse, op, rsp};
use shared_abi::ring::{BackRing, SharedRingMem, header};
use shared_abi::xenbus::MemStore;

use super::fake::{FakeEvents, FakeGrants, FakeStore, FakeXen, Peer, SharedXen};
use super::*;

const FE: &str = "/local/domain/7/device/vbd/51712";
const BE: &str = "/local/domain/1/backend/vbd/7/51712";

struct Setup {
    xen: SharedXen,
    store: Rc<RefCell<MemStore>>,
}

fn toolstack(s: &mut MemStore) {
    s.set(&format!("{FE}/backend"), BE);
    s.set(&format!("{FE}/backend-id"), "1");
    s.set(&format!("{FE}/state"), "1");
    s.set(&format!("{FE}/device-type"), "disk");
    s.set(&format!("{BE}/frontend"), FE);
    s.set(&format!("{BE}/frontend-id"), "7");
    s.set(&format!("{BE}/state"), "1");
}

/// A backend that only does the handshake, with `disk` keys at Connected.
fn handshake_peer(
    store: Rc<RefCell<MemStore>>,
    probe: Vec<(&'static str, &'static str)>,
    disk: Vec<(&'static str, &'static str)>,
) -> Peer {
    let p: Peer = Rc::new(RefCell::new(move || {
        let mut s = store.borrow_mut();
        let be_state = s.get(&format!("{BE}/state")).map(String::from);
        let fe_state = s.get(&format!("{FE}/state")).map(String::from);
        if be_state.as_deref() == Some("1") {
            for (k, v) in &probe {
                s.set(&format!("{BE}/{k}"), v);
            }
            s.set(&format!("{BE}/state"), "2");
        } else if be_state.as_deref() == Some("2") && fe_state.as_deref() == Some("3") {
            for (k, v) in &disk {
                s.set(&format!("{BE}/{k}"), v);
            }
            s.set(&format!("{BE}/state"), "4");
        }
    }));
    p
}

fn default_disk() -> Vec<(&'static str, &'static str)> {
    Vec::from([
        ("sectors", "2048"),
        ("sector-size", "512"),
        ("info", "0"),
        ("feature-flush-cache", "1"),
        ("feature-persistent", "0"),
    ])
}

fn connect_with(
    cfg: FrontConfig,
    probe: Vec<(&'static str, &'static str)>,
    disk: Vec<(&'static str, &'static str)>,
) -> (Setup, Result<Blkfront<FakeGrants, FakeEvents>, BlkError>) {
    let xen: SharedXen = Rc::new(RefCell::new(FakeXen::new()));
    let store = Rc::new(RefCell::new(MemStore::default()));
    toolstack(&mut store.borrow_mut());
    let peer = handshake_peer(store.clone(), probe, disk);
    let mut fs = FakeStore::new(store.clone(), peer.clone());
    let f = Blkfront::connect(
        &mut fs,
        FakeGrants::new(xen.clone(), 7),
        FakeEvents::new(xen.clone(), peer),
        &cfg,
    );
    (Setup { xen, store }, f)
}

fn connect() -> (Setup, Blkfront<FakeGrants, FakeEvents>) {
    let (s, f) = connect_with(FrontConfig::new(FE), Vec::new(), default_disk());
    (s, f.unwrap())
}

/// The backend's view of queue 0's ring.
fn back_ring(s: &Setup, key: &str) -> BackRing<BlkifRequestSlot, BlkifResponse> {
    let gref: u32 = s
        .store
        .borrow()
        .get(&format!("{FE}/{key}"))
        .unwrap()
        .parse()
        .unwrap();
    let mem: SharedRingMem = s.xen.borrow_mut().map_ring(1, 7, &[gref]).unwrap();
    BackRing::new(mem).unwrap()
}

fn take_request(b: &mut BackRing<BlkifRequestSlot, BlkifResponse>) -> (u64, u8) {
    let slot = b.get_request().unwrap().unwrap();
    match slot.parse() {
        BlkifRequestKind::Read(r) | BlkifRequestKind::Write(r) | BlkifRequestKind::Flush(r) => {
            (r.id, r.operation)
        }
        BlkifRequestKind::Indirect(r) => (r.id, r.indirect_op),
        k => panic!("unexpected {k:?}"),
    }
}

fn answer(b: &mut BackRing<BlkifRequestSlot, BlkifResponse>, id: u64, operation: u8, status: i16) {
    b.push_response(&BlkifResponse {
        id,
        operation,
        status,
    })
    .unwrap();
    b.push_responses_and_check_notify();
}

#[test]
fn handshake_writes_linux_keys_and_reads_the_disk() {
    let (s, f) = connect();
    let st = s.store.borrow();
    assert_eq!(st.get(&format!("{FE}/state")), Some("4"));
    assert_eq!(st.get(&format!("{FE}/protocol")), Some("x86_64-abi"));
    assert_eq!(st.get(&format!("{FE}/feature-persistent")), Some("1"));
    assert!(st.get(&format!("{FE}/ring-ref")).is_some());
    assert!(st.get(&format!("{FE}/event-channel")).is_some());
    assert_eq!(st.get(&format!("{FE}/ring-page-order")), None);
    assert_eq!(st.get(&format!("{FE}/multi-queue-num-queues")), None);
    let i = f.info();
    assert_eq!((i.sectors_512, i.sector_size, i.devid), (2048, 512, 51712));
    assert!(i.flush && !i.persistent && !i.indirect);
    assert_eq!(i.max_segments, 11);
}

#[test]
fn multi_queue_and_multi_page_rings_use_per_queue_keys() {
    let mut cfg = FrontConfig::new(FE);
    cfg.max_queues = 4;
    cfg.ring_page_order = 3;
    let (s, f) = connect_with(
        cfg,
        Vec::from([
            ("multi-queue-max-queues", "2"),
            ("max-ring-page-order", "2"),
        ]),
        default_disk(),
    );
    let f = f.unwrap();
    let st = s.store.borrow();
    assert_eq!(st.get(&format!("{FE}/multi-queue-num-queues")), Some("2"));
    assert_eq!(st.get(&format!("{FE}/ring-page-order")), Some("2"));
    for q in 0..2 {
        for r in 0..4 {
            assert!(st.get(&format!("{FE}/queue-{q}/ring-ref{r}")).is_some());
        }
        assert!(st.get(&format!("{FE}/queue-{q}/event-channel")).is_some());
        assert_eq!(st.get(&format!("{FE}/queue-{q}/ring-ref")), None);
    }
    assert_eq!((f.info().queues, f.info().ring_page_order), (2, 2));
}

#[test]
fn malformed_backend_keys_fail_the_handshake_and_are_recorded() {
    for (k, v) in [
        ("sector-size", "1000"),
        ("sector-size", "0512"),
        ("sectors", "-1"),
        ("info", "x"),
        ("feature-persistent", "yes"),
    ] {
        let mut disk = default_disk();
        disk.retain(|(dk, _)| *dk != k);
        disk.push((k, v));
        let (s, f) = connect_with(FrontConfig::new(FE), Vec::new(), disk);
        assert!(matches!(f, Err(BlkError::Xenbus(_))), "{k}={v}: {f:?}");
        let st = s.store.borrow();
        assert_eq!(st.get(&format!("{FE}/state")), Some("5"), "{k}={v}");
        let err = st.get(&format!("error{FE}/error")).unwrap_or("");
        assert!(err.contains(k), "{k}={v}: {err}");
    }
    let (_, f) = connect_with(
        FrontConfig::new(FE),
        Vec::from([("max-ring-page-order", "01")]),
        default_disk(),
    );
    assert!(matches!(f, Err(BlkError::Xenbus(_))));
}

#[test]
fn a_silent_backend_times_out() {
    let xen: SharedXen = Rc::new(RefCell::new(FakeXen::new()));
    let store = Rc::new(RefCell::new(MemStore::default()));
    toolstack(&mut store.borrow_mut());
    let peer = super::fake::idle_peer();
    let mut fs = FakeStore::new(store, peer.clone());
    let mut cfg = FrontConfig::new(FE);
    cfg.wait_rounds = 5;
    let r = Blkfront::connect(
        &mut fs,
        FakeGrants::new(xen.clone(), 7),
        FakeEvents::new(xen, peer),
        &cfg,
    );
    assert_eq!(
        r.err(),
        Some(BlkError::Timeout {
            waiting_for: "InitWait"
        })
    );
}

#[test]
fn out_of_order_responses_complete_the_right_operations() {
    let (s, mut f) = connect();
    let mut b = back_ring(&s, "ring-ref");
    let t1 = f.submit_read(0, 512).unwrap();
    let t2 = f.submit_read(8, 4096).unwrap();
    let (id1, op1) = take_request(&mut b);
    let (id2, op2) = take_request(&mut b);
    answer(&mut b, id2, op2, rsp::OKAY);
    let c = f.poll().unwrap();
    assert_eq!(c.tag, t2);
    assert_eq!(c.result.unwrap().len(), 4096);
    answer(&mut b, id1, op1, rsp::ERROR);
    let c = f.poll().unwrap();
    assert_eq!((c.tag, c.result), (t1, Err(BlkError::Io)));
    assert!(f.broken().is_none(), "an I/O error is not a protocol error");
    // Per-request grants were ended once answered.
    assert_eq!(
        s.xen.borrow().live_grants(7),
        1,
        "only the ring page stays granted"
    );
}

fn hostile(
    respond: impl FnOnce(&mut BackRing<BlkifRequestSlot, BlkifResponse>, u64, u8),
) -> Broken {
    let (s, mut f) = connect();
    let mut b = back_ring(&s, "ring-ref");
    let t = f.submit_write(4, &[0xAB; 1024]).unwrap();
    let (id, operation) = take_request(&mut b);
    respond(&mut b, id, operation);
    let c = f.poll().unwrap();
    assert_eq!(c.tag, t);
    let Err(BlkError::Broken(why)) = c.result else {
        panic!("accepted garbage: {c:?}");
    };
    assert_eq!(f.submit_read(0, 512), Err(BlkError::Broken(why)));
    assert!(f.wait_any().is_none());
    why
}

#[test]
fn a_response_with_an_unknown_id_breaks_the_device() {
    let why = hostile(|b, id, operation| answer(b, id + 1000, operation, rsp::OKAY));
    assert!(matches!(why, Broken::UnknownId { .. }));
    let why = hostile(|b, _, operation| answer(b, u64::MAX, operation, rsp::OKAY));
    assert!(matches!(why, Broken::UnknownId { .. }));
}

#[test]
fn a_response_with_the_wrong_operation_or_status_breaks_the_device() {
    let why = hostile(|b, id, _| answer(b, id, op::READ, rsp::OKAY));
    assert!(matches!(why, Broken::OperationMismatch { .. }));
    let why = hostile(|b, id, operation| answer(b, id, operation, 7));
    assert!(matches!(why, Broken::BadStatus { status: 7, .. }));
}

#[test]
fn a_duplicate_response_breaks_the_device() {
    let (s, mut f) = connect();
    let mut b = back_ring(&s, "ring-ref");
    let t1 = f.submit_read(0, 512).unwrap();
    let _t2 = f.submit_read(1, 512).unwrap();
    let (id1, op1) = take_request(&mut b);
    let _ = take_request(&mut b);
    answer(&mut b, id1, op1, rsp::OKAY);
    answer(&mut b, id1, op1, rsp::OKAY);
    let mut got = Vec::new();
    while let Some(c) = f.poll() {
        got.push(c);
    }
    assert_eq!(got[0].tag, t1);
    assert!(got[0].result.is_ok());
    assert!(matches!(
        got[1].result,
        Err(BlkError::Broken(Broken::UnknownId { .. }))
    ));
}

#[test]
fn a_corrupted_response_producer_breaks_the_device() {
    let (s, mut f) = connect();
    let b = back_ring(&s, "ring-ref");
    let t = f.submit_read(0, 512).unwrap();
    // More responses than requests.
    b.mem().write_u32(header::RSP_PROD, 1000).unwrap();
    let c = f.poll().unwrap();
    assert_eq!(c.tag, t);
    assert!(matches!(c.result, Err(BlkError::Broken(Broken::Ring(_)))));
    // The page of the failed request stays granted: the backend may still write it.
    assert!(s.xen.borrow().live_grants(7) >= 2);
}

#[test]
fn bad_ranges_are_refused_before_the_ring() {
    let (_s, mut f) = connect();
    assert!(matches!(
        f.submit_read(2048, 512),
        Err(BlkError::BadRange { .. })
    ));
    assert!(matches!(
        f.submit_read(2047, 1024),
        Err(BlkError::BadRange { .. })
    ));
    assert!(matches!(
        f.submit_read(0, 100),
        Err(BlkError::BadRange { .. })
    ));
    assert!(matches!(
        f.submit_read(0, 0),
        Err(BlkError::BadRange { .. })
    ));
    assert!(matches!(
        f.submit_read(u64::MAX, 512),
        Err(BlkError::BadRange { .. })
    ));
    assert_eq!(f.stats().requests, 0);
}

#[test]
fn large_operations_split_into_eleven_segment_requests() {
    let (s, mut f) = connect();
    let mut b = back_ring(&s, "ring-ref");
    let t = f.submit_write(0, &[1u8; 100 * 1024]).unwrap();
    let mut n = 0;
    while let Some(slot) = b.get_request().unwrap() {
        let BlkifRequestKind::Write(r) = slot.parse() else {
            panic!("not a write");
        };
        assert!(r.nr_segments as usize <= 11);
        assert_eq!(r.sector_number, n * 88);
        answer(&mut b, r.id, op::WRITE, rsp::OKAY);
        n += 1;
    }
    assert_eq!(n, 3, "100 KiB = 44 + 44 + 12 KiB");
    assert_eq!(f.wait(t), Ok(Vec::new()));
}

const BE2: &str = "/local/domain/2/backend/vbd/7/51712";

/// The restarted backend (domain 2): handshake only, default disk keys.
fn restarted_peer(store: Rc<RefCell<MemStore>>) -> Peer {
    let p: Peer = Rc::new(RefCell::new(move || {
        let mut s = store.borrow_mut();
        let be_state = s.get(&format!("{BE2}/state")).map(String::from);
        let fe_state = s.get(&format!("{FE}/state")).map(String::from);
        if be_state.as_deref() == Some("1") {
            s.set(&format!("{BE2}/state"), "2");
        } else if be_state.as_deref() == Some("2") && fe_state.as_deref() == Some("3") {
            for (k, v) in default_disk() {
                s.set(&format!("{BE2}/{k}"), v);
            }
            s.set(&format!("{BE2}/state"), "4");
        }
    }));
    p
}

/// (id, sector, first data byte) of the next request on `b`, reading its data page as
/// domain `mapper`.
fn take_write(
    s: &Setup,
    b: &mut BackRing<BlkifRequestSlot, BlkifResponse>,
    mapper: DomId,
) -> (u64, u64, u8) {
    let slot = b.get_request().unwrap().unwrap();
    let BlkifRequestKind::Write(r) = slot.parse() else {
        panic!("not a write");
    };
    let gref = r.seg.0[0].gref;
    let page = s.xen.borrow_mut().map(mapper, 7, gref, false).unwrap();
    let mut first = [0u8; 1];
    assert!(page.read(0, &mut first));
    s.xen.borrow_mut().unmap(7, gref);
    (r.id, r.sector_number, first[0])
}

#[test]
fn a_restarted_backend_gets_every_unanswered_request_again_in_order() {
    let (s, mut f) = connect();
    let mut b = back_ring(&s, "ring-ref");
    let tags: Vec<Tag> = (0..4u8)
        .map(|i| f.submit_write(8 * u64::from(i), &[i + 1; 4096]).unwrap())
        .collect();
    let reqs: Vec<_> = (0..4).map(|_| take_write(&s, &mut b, 1)).collect();
    // The old backend answers the first and third, then dies: the hypervisor tears its
    // ring mapping down.
    answer(&mut b, reqs[0].0, op::WRITE, rsp::OKAY);
    answer(&mut b, reqs[2].0, op::WRITE, rsp::OKAY);
    let old_ring: u32 = s
        .store
        .borrow()
        .get(&format!("{FE}/ring-ref"))
        .unwrap()
        .parse()
        .unwrap();
    s.xen.borrow_mut().unmap(7, old_ring);
    let cfg = FrontConfig::new(FE);
    let mut fs = FakeStore::new(s.store.clone(), restarted_peer(s.store.clone()));
    assert!(
        !f.follow_backend(&mut fs, &cfg).unwrap(),
        "not re-pointed yet"
    );
    // Caught between the toolstack's two keys (read apart): not yet.
    s.store.borrow_mut().set(&format!("{FE}/backend"), BE2);
    assert!(!f.follow_backend(&mut fs, &cfg).unwrap(), "half re-pointed");
    // The toolstack re-points the device at the restarted backend.
    {
        let mut st = s.store.borrow_mut();
        st.set(&format!("{FE}/backend"), BE2);
        st.set(&format!("{FE}/backend-id"), "2");
        st.set(&format!("{FE}/state"), "1");
        st.set(&format!("{BE2}/frontend"), FE);
        st.set(&format!("{BE2}/frontend-id"), "7");
        st.set(&format!("{BE2}/state"), "1");
    }
    assert!(f.follow_backend(&mut fs, &cfg).unwrap());
    assert_eq!(f.info().backend_id, 2);
    assert_eq!(s.store.borrow().get(&format!("{FE}/state")), Some("4"));
    // Nothing is granted to the dead backend any more.
    assert_eq!(s.xen.borrow().grants_to(1), 0);
    let st = f.stats();
    assert_eq!((st.reconnects, st.reissued), (1, 2));
    // The two answered before the crash completed.
    let mut done: Vec<Tag> = Vec::new();
    while let Some(c) = f.poll() {
        c.result.unwrap();
        done.push(c.tag);
    }
    assert_eq!(done, [tags[0], tags[2]]);
    // The new ring carries the second and fourth writes, in order, with their data.
    let mut b2 = {
        let gref: u32 = s
            .store
            .borrow()
            .get(&format!("{FE}/ring-ref"))
            .unwrap()
            .parse()
            .unwrap();
        let mem = s.xen.borrow_mut().map_ring(2, 7, &[gref]).unwrap();
        BackRing::new(mem).unwrap()
    };
    let r1 = take_write(&s, &mut b2, 2);
    let r3 = take_write(&s, &mut b2, 2);
    assert_eq!((r1.1, r1.2), (8, 2));
    assert_eq!((r3.1, r3.2), (24, 4));
    assert!(b2.get_request().unwrap().is_none());
    answer(&mut b2, r3.0, op::WRITE, rsp::OKAY);
    answer(&mut b2, r1.0, op::WRITE, rsp::OKAY);
    assert_eq!(f.wait(tags[1]), Ok(Vec::new()));
    assert_eq!(f.wait(tags[3]), Ok(Vec::new()));
    // And it goes on.
    let t = f.submit_read(0, 512).unwrap();
    let slot = b2.get_request().unwrap().unwrap();
    let BlkifRequestKind::Read(r) = slot.parse() else {
        panic!("not a read");
    };
    answer(&mut b2, r.id, op::READ, rsp::OKAY);
    assert!(f.wait(t).is_ok());
}

#[test]
fn a_failed_reconnect_fails_what_was_pending() {
    let (s, mut f) = connect();
    let t = f.submit_write(0, &[1; 512]).unwrap();
    {
        let mut st = s.store.borrow_mut();
        st.set(&format!("{FE}/backend"), BE2);
        st.set(&format!("{FE}/backend-id"), "2");
    }
    let mut cfg = FrontConfig::new(FE);
    cfg.wait_rounds = 3;
    let mut fs = FakeStore::new(s.store.clone(), super::fake::idle_peer());
    assert_eq!(
        f.follow_backend(&mut fs, &cfg),
        Err(BlkError::Timeout {
            waiting_for: "InitWait"
        })
    );
    assert_eq!(
        f.wait_once().map(|c| (c.tag, c.result)),
        Some((t, Err(BlkError::Broken(Broken::Lost))))
    );
    assert!(f.submit_read(0, 512).is_err());
}
