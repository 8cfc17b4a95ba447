//! Every bad input a frontend can send: each is answered (ERROR or EOPNOTSUPP), changes
//! nothing on disk, leaks no mapping, and the ring goes on; a corrupted ring disconnects only
//! its own frontend.
#![allow(clippy::unwrap_used)]

mod common;

use blkback_dom::device::{RamDisk, SyncIo};
use blkback_dom::engine::{Disconnect, VbdConfig};
use blkback_dom::request::FaultKind;
use common::*;
use shared_abi::PAGE_SIZE;
use shared_abi::blkif::{
    BLKIF_DISCARD_SECURE, BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect,
    BlkifRequestSlot, IndirectGrefs, op, rsp,
};
use shared_abi::ring::{RingError, header};

type H = Harness<SyncIo<RamDisk>>;

fn cfg() -> VbdConfig {
    let mut c = VbdConfig::new(FRONT);
    c.max_indirect_segments = 1024;
    c
}

fn new(sectors: u64) -> H {
    Harness::new(cfg(), ram(sectors), 1, 0)
}

fn disk_is_zero(h: &H) -> bool {
    h.vbd().io().device().bytes().iter().all(|&b| b == 0)
}

/// After a refused request the ring must still serve a good one.
fn ring_goes_on(h: &mut H) {
    let data = pattern(512, 77);
    let id = h.write(0, 0, 0, &data);
    let r = h.one_response(0, 0);
    assert_eq!((r.id, r.status), (id, rsp::OKAY));
    assert!(h.vbd().io().device().bytes()[..512] == data[..]);
}

fn expect(h: &mut H, id: u64, operation: u8, status: i16, kind: FaultKind) {
    let r = h.one_response(0, 0);
    assert_eq!((r.id, r.operation, r.status), (id, operation, status));
    assert_eq!(h.vbd().stats().fault(kind), 1, "{kind:?}");
    assert_eq!(
        h.grants.live_mappings(),
        (0..h.vbd().queues())
            .map(|q| h.vbd().persistent_grants(q))
            .sum::<usize>(),
        "only persistent mappings stay"
    );
}

#[test]
fn sectors_beyond_the_disk_are_refused() {
    let mut h = new(64);
    let segs = h.data_segments(0, &pattern(1024, 1));
    let id = h.rw(0, 0, op::WRITE, 63, &segs);
    expect(&mut h, id, op::WRITE, rsp::ERROR, FaultKind::OutOfRange);
    assert!(disk_is_zero(&h));
    ring_goes_on(&mut h);
}

#[test]
fn sector_plus_length_overflow_is_refused() {
    let mut h = new(64);
    let segs = h.read_segments(0, 8);
    let id = h.rw(0, 0, op::READ, u64::MAX - 2, &segs);
    expect(&mut h, id, op::READ, rsp::ERROR, FaultKind::OutOfRange);
    assert!(h.page(0, segs[0].gref).iter().all(|&b| b == 0));
    ring_goes_on(&mut h);
}

#[test]
fn discard_overflowing_range_is_refused() {
    let mut h = new(64);
    let d = BlkifRequestDiscard {
        operation: op::DISCARD,
        id: 5,
        sector_number: 8,
        nr_sectors: u64::MAX - 4,
        ..Default::default()
    };
    h.push(0, 0, BlkifRequestSlot::from_discard(&d));
    expect(&mut h, 5, op::DISCARD, rsp::ERROR, FaultKind::OutOfRange);
    ring_goes_on(&mut h);
}

#[test]
fn unknown_grant_ref_is_refused_and_earlier_mappings_released() {
    let mut c = cfg();
    c.persistent = false;
    let mut h = Harness::new(c, ram(64), 1, 0);
    let mut segs = h.data_segments(0, &pattern(8192, 2));
    segs[1].gref = 4000; // never granted
    let id = h.rw(0, 0, op::WRITE, 0, &segs);
    expect(&mut h, id, op::WRITE, rsp::ERROR, FaultKind::GrantMap);
    assert_eq!(h.grants.live_mappings(), 0);
    assert!(disk_is_zero(&h));
    ring_goes_on(&mut h);
}

#[test]
fn read_into_a_read_only_grant_is_refused() {
    let mut h = new(64);
    let g = h.grant(0, &[], true);
    let id = h.rw(0, 0, op::READ, 0, &[seg(g, 0, 7)]);
    expect(&mut h, id, op::READ, rsp::ERROR, FaultKind::GrantMap);
    ring_goes_on(&mut h);
}

#[test]
fn reserved_grant_ref_is_refused() {
    let mut h = new(64);
    let id = h.rw(0, 0, op::READ, 0, &[seg(1, 0, 7)]);
    expect(&mut h, id, op::READ, rsp::ERROR, FaultKind::ReservedGref);
    assert_eq!(h.grants.maps, 0);
}

#[test]
fn first_sect_after_last_sect_is_refused() {
    let mut h = new(64);
    let g = h.grant(0, &pattern(PAGE_SIZE, 3), true);
    let id = h.rw(0, 0, op::WRITE, 0, &[seg(g, 4, 3)]);
    expect(&mut h, id, op::WRITE, rsp::ERROR, FaultKind::BadSegment);
    assert!(disk_is_zero(&h));
    ring_goes_on(&mut h);
}

#[test]
fn last_sect_beyond_the_page_is_refused() {
    let mut h = new(64);
    let g = h.grant(0, &pattern(PAGE_SIZE, 3), true);
    let id = h.rw(0, 0, op::WRITE, 0, &[seg(g, 0, 8)]);
    expect(&mut h, id, op::WRITE, rsp::ERROR, FaultKind::BadSegment);
    assert!(disk_is_zero(&h));
    ring_goes_on(&mut h);
}

#[test]
fn read_with_no_segments_is_refused() {
    let mut h = new(64);
    let id = h.rw(0, 0, op::READ, 0, &[]);
    expect(&mut h, id, op::READ, rsp::ERROR, FaultKind::NoSegments);
    ring_goes_on(&mut h);
}

#[test]
fn more_than_eleven_direct_segments_are_refused() {
    let mut h = new(64);
    let segs: Vec<_> = (0..11)
        .map(|i| seg(h.grant(0, &pattern(512, i), true), 0, 0))
        .collect();
    let mut s = shared_abi::blkif::DirectSegments::default();
    s.0.copy_from_slice(&segs);
    let req = BlkifRequest {
        operation: op::WRITE,
        nr_segments: 12,
        id: 9,
        seg: s,
        ..Default::default()
    };
    h.push(0, 0, BlkifRequestSlot::from_rw(&req));
    expect(&mut h, 9, op::WRITE, rsp::ERROR, FaultKind::TooManySegments);
    assert!(disk_is_zero(&h));
    ring_goes_on(&mut h);
}

#[test]
fn indirect_beyond_the_advertised_maximum_is_refused() {
    let mut c = cfg();
    c.max_indirect_segments = 32;
    let mut h = Harness::new(c, ram(1024), 1, 0);
    let segs: Vec<_> = (0..33).map(|_| seg(h.grant(0, &[], false), 0, 0)).collect();
    let id = h.indirect(0, 0, op::READ, 0, &segs);
    expect(&mut h, id, op::READ, rsp::ERROR, FaultKind::TooManySegments);
    assert_eq!(h.grants.maps, 0, "not even the indirect pages were mapped");
    ring_goes_on(&mut h);
}

#[test]
fn indirect_with_zero_segments_or_bad_indirect_op_is_refused() {
    let mut h = new(64);
    let i = BlkifRequestIndirect {
        operation: op::INDIRECT,
        indirect_op: op::READ,
        nr_segments: 0,
        id: 3,
        ..Default::default()
    };
    h.push(0, 0, BlkifRequestSlot::from_indirect(&i));
    expect(&mut h, 3, op::READ, rsp::ERROR, FaultKind::NoSegments);
    let i = BlkifRequestIndirect {
        indirect_op: op::FLUSH_DISKCACHE,
        nr_segments: 1,
        id: 4,
        ..i
    };
    h.push(0, 0, BlkifRequestSlot::from_indirect(&i));
    let r = h.one_response(0, 0);
    assert_eq!(
        (r.id, r.operation, r.status),
        (4, op::FLUSH_DISKCACHE, rsp::ERROR)
    );
    ring_goes_on(&mut h);
}

#[test]
fn indirect_page_not_granted_is_refused() {
    let mut h = new(64);
    let i = BlkifRequestIndirect {
        operation: op::INDIRECT,
        indirect_op: op::WRITE,
        nr_segments: 20,
        id: 6,
        indirect_grefs: IndirectGrefs([5000, 0, 0, 0, 0, 0, 0, 0]),
        ..Default::default()
    };
    h.push(0, 0, BlkifRequestSlot::from_indirect(&i));
    expect(&mut h, 6, op::WRITE, rsp::ERROR, FaultKind::GrantMap);
    ring_goes_on(&mut h);
}

#[test]
fn bad_segment_inside_an_indirect_page_refuses_the_whole_request() {
    let mut h = new(1024);
    let mut segs = h.data_segments(0, &pattern(20 * PAGE_SIZE, 5));
    segs[17].last_sect = 9;
    let id = h.indirect(0, 0, op::WRITE, 0, &segs);
    expect(&mut h, id, op::WRITE, rsp::ERROR, FaultKind::BadSegment);
    assert!(disk_is_zero(&h), "no data written from a rejected request");
    ring_goes_on(&mut h);
}

#[test]
fn garbage_operation_gets_eopnotsupp() {
    let mut h = new(64);
    for (n, o) in [op::RESERVED_1, 7, 200].into_iter().enumerate() {
        let id = h.rw(0, 0, o, 0, &[]);
        let r = h.one_response(0, 0);
        assert_eq!((r.id, r.operation, r.status), (id, o, rsp::EOPNOTSUPP));
        assert_eq!(
            h.vbd().stats().fault(FaultKind::UnknownOperation),
            n as u64 + 1
        );
    }
    ring_goes_on(&mut h);
}

#[test]
fn features_not_offered_get_eopnotsupp() {
    let mut c = cfg();
    c.flush = false;
    c.barrier = false;
    c.discard = false;
    c.max_indirect_segments = 0;
    let mut h = Harness::new(c, ram(64), 1, 0);
    for o in [op::FLUSH_DISKCACHE, op::WRITE_BARRIER] {
        let id = h.rw(0, 0, o, 0, &[]);
        assert_eq!(h.one_response(0, 0).status, rsp::EOPNOTSUPP, "{id}");
    }
    let d = BlkifRequestDiscard {
        operation: op::DISCARD,
        id: 1,
        nr_sectors: 8,
        ..Default::default()
    };
    h.push(0, 0, BlkifRequestSlot::from_discard(&d));
    assert_eq!(h.one_response(0, 0).status, rsp::EOPNOTSUPP);
    let segs: Vec<_> = (0..12).map(|_| seg(h.grant(0, &[], false), 0, 0)).collect();
    h.indirect(0, 0, op::READ, 0, &segs);
    assert_eq!(h.one_response(0, 0).status, rsp::EOPNOTSUPP);
    assert_eq!(h.vbd().stats().fault(FaultKind::NotNegotiated), 4);
    ring_goes_on(&mut h);
}

#[test]
fn secure_discard_on_a_device_without_it_gets_eopnotsupp() {
    let dir = tempfile::tempdir().unwrap();
    let file = blkback_dom::file::FileDisk::create(&dir.path().join("d.img"), 512, 64).unwrap();
    let mut h = Harness::new(cfg(), SyncIo::new(file), 1, 0);
    let d = BlkifRequestDiscard {
        operation: op::DISCARD,
        flag: BLKIF_DISCARD_SECURE,
        id: 1,
        nr_sectors: 8,
        ..Default::default()
    };
    h.push(0, 0, BlkifRequestSlot::from_discard(&d));
    assert_eq!(h.one_response(0, 0).status, rsp::EOPNOTSUPP);
}

#[test]
fn writes_to_a_read_only_disk_are_refused() {
    // Read-only by the toolstack's mode...
    let mut c = cfg();
    c.read_only = true;
    let mut h = Harness::new(c, ram(64), 1, 0);
    let segs = h.data_segments(0, &pattern(4096, 6));
    let id = h.rw(0, 0, op::WRITE, 0, &segs);
    expect(&mut h, id, op::WRITE, rsp::ERROR, FaultKind::ReadOnly);
    assert!(disk_is_zero(&h));
    assert!(h.vbd().advertised().read_only);
    // ... and by the medium; reads still work.
    let mut h = Harness::new(
        cfg(),
        SyncIo::new(RamDisk::new(64, 512).unwrap().read_only()),
        1,
        0,
    );
    let segs = h.data_segments(0, &pattern(4096, 6));
    let id = h.indirect(0, 0, op::WRITE, 0, &segs);
    expect(&mut h, id, op::WRITE, rsp::ERROR, FaultKind::ReadOnly);
    let segs = h.read_segments(0, 8);
    h.rw(0, 0, op::READ, 0, &segs);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
}

#[test]
fn corrupted_ring_index_disconnects_only_that_frontend() {
    let mut h = new(64);
    let mut other = cfg();
    other.frontend = FRONT + 1;
    let d1 = h.add_disk(other, ram(64), 1, 0);
    // Both frontends have persistent mappings.
    for d in [0, d1] {
        let segs = h.read_segments(d, 8);
        h.rw(d, 0, op::READ, 0, &segs);
        h.service(d).unwrap();
        assert_eq!(h.responses(d, 0).len(), 1);
    }
    assert_eq!(h.grants.live_mappings_of(FRONT), 1);
    // Frontend 0 publishes a producer index far beyond its ring.
    let nr = h.disks[0].front.rings[0].nr_ents();
    h.disks[0].front.mems[0]
        .write_u32(header::REQ_PROD, nr + 7)
        .unwrap();
    let err = h.service(0).unwrap_err();
    assert!(matches!(
        err,
        Disconnect::RingCorrupted {
            queue: 0,
            error: RingError::BogusRequestProducer { .. }
        }
    ));
    assert_eq!(
        h.grants.live_mappings_of(FRONT),
        0,
        "all its grants unmapped"
    );
    assert_eq!(h.service(0).unwrap_err(), err, "stays disconnected");
    // The other frontend on the same backend is unaffected.
    let data = pattern(4096, 8);
    let id = h.write(d1, 0, 8, &data);
    h.service(d1).unwrap();
    let r = h.responses(d1, 0);
    assert_eq!((r[0].id, r[0].status), (id, rsp::OKAY));
    assert_eq!(h.grants.live_mappings_of(FRONT + 1), 1);
}

#[test]
fn producer_index_moving_backwards_disconnects() {
    let mut h = new(64);
    for _ in 0..3 {
        h.rw(0, 0, op::READ, 0, &[]);
    }
    h.service(0).unwrap();
    h.disks[0].front.mems[0]
        .write_u32(header::REQ_PROD, 1)
        .unwrap();
    assert!(matches!(
        h.service(0),
        Err(Disconnect::RingCorrupted { .. })
    ));
}
