//! The engine against a frontend played by the test: data paths, features, ordering.
#![allow(clippy::unwrap_used)]

mod common;

use blkback_dom::device::{RamDisk, SyncIo};
use blkback_dom::engine::VbdConfig;
use blkback_dom::request::FaultKind;
use common::*;
use shared_abi::PAGE_SIZE;
use shared_abi::blkif::{
    BLKIF_DISCARD_SECURE, BlkifRequestDiscard, BlkifRequestSlot, op, ring_size, rsp,
};

fn cfg() -> VbdConfig {
    let mut c = VbdConfig::new(FRONT);
    c.max_indirect_segments = 1024;
    c
}

fn disk_bytes(h: &Harness<SyncIo<RamDisk>>, d: usize) -> &[u8] {
    h.disks[d].vbd.io().device().bytes()
}

#[test]
fn every_segment_shape_writes_and_reads_back() {
    let mut h = Harness::new(cfg(), ram(2048), 1, 0);
    let mut sector = 0u64;
    for first in 0..8u8 {
        for last in first..8u8 {
            let n = usize::from(last - first + 1);
            let data = pattern(n * 512, sector);
            let mut page = vec![0u8; PAGE_SIZE];
            page[usize::from(first) * 512..(usize::from(last) + 1) * 512].copy_from_slice(&data);
            let g = h.grant(0, &page, true);
            let id = h.rw(0, 0, op::WRITE, sector, &[seg(g, first, last)]);
            let r = h.one_response(0, 0);
            assert_eq!((r.id, r.operation, r.status), (id, op::WRITE, rsp::OKAY));
            let off = sector as usize * 512;
            assert!(disk_bytes(&h, 0)[off..off + n * 512] == data[..]);

            let rg = h.grant(0, &[], false);
            let id = h.rw(0, 0, op::READ, sector, &[seg(rg, first, last)]);
            let r = h.one_response(0, 0);
            assert_eq!((r.id, r.operation, r.status), (id, op::READ, rsp::OKAY));
            assert!(h.gather(0, &[seg(rg, first, last)]) == data);
            // Bytes of the page outside the segment stay untouched.
            let p = h.page(0, rg);
            assert!(p[..usize::from(first) * 512].iter().all(|&b| b == 0));
            assert!(p[(usize::from(last) + 1) * 512..].iter().all(|&b| b == 0));
            sector += n as u64;
        }
    }
    assert_eq!(h.vbd().stats().okay, 72);
}

#[test]
fn eleven_segment_write_and_read_round_trip() {
    let mut h = Harness::new(cfg(), ram(2048), 1, 0);
    let data = pattern(11 * PAGE_SIZE, 1);
    h.write(0, 0, 64, &data);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    assert!(disk_bytes(&h, 0)[64 * 512..64 * 512 + data.len()] == data[..]);
    let segs = h.read_segments(0, 88);
    h.rw(0, 0, op::READ, 64, &segs);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    assert!(h.gather(0, &segs) == data);
}

#[test]
fn indirect_request_over_two_indirect_pages_moves_all_segments() {
    let mut h = Harness::new(cfg(), ram(8192), 1, 0);
    // 600 segments of mixed shapes: the descriptors fill one page and spill into a second.
    let mut segs = Vec::new();
    let mut total = 0usize;
    let mut expect = Vec::new();
    for i in 0..600usize {
        let (first, last) = if i % 3 == 0 {
            (0u8, 7u8)
        } else {
            (0, (i % 8) as u8)
        };
        let n = usize::from(last - first + 1) * 512;
        let bytes = pattern(n, i as u64);
        let g = h.grant(0, &bytes, true);
        segs.push(seg(g, first, last));
        expect.extend_from_slice(&bytes);
        total += n;
    }
    let id = h.indirect(0, 0, op::WRITE, 16, &segs);
    let r = h.one_response(0, 0);
    assert_eq!((r.id, r.operation, r.status), (id, op::WRITE, rsp::OKAY));
    assert!(disk_bytes(&h, 0)[16 * 512..16 * 512 + total] == expect[..]);

    // Read it back into fresh pages with the same segment shapes.
    let rsegs: Vec<_> = segs
        .iter()
        .map(|s| seg(h.grant(0, &[], false), s.first_sect, s.last_sect))
        .collect();
    let id = h.indirect(0, 0, op::READ, 16, &rsegs);
    let r = h.one_response(0, 0);
    assert_eq!((r.id, r.operation, r.status), (id, op::READ, rsp::OKAY));
    assert!(h.gather(0, &rsegs) == expect);
    assert_eq!(h.grants.live_mappings(), h.vbd().persistent_grants(0));
}

#[test]
fn persistent_grants_are_kept_and_reused() {
    let mut h = Harness::new(cfg(), ram(2048), 1, 0);
    let segs = h.read_segments(0, 32);
    h.rw(0, 0, op::READ, 0, &segs);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    let maps = h.grants.maps;
    assert_eq!(maps, 4);
    assert_eq!(h.vbd().persistent_grants(0), 4);
    assert_eq!(h.grants.live_mappings(), 4, "kept mapped after completion");
    for i in 0..5 {
        h.rw(0, 0, op::READ, 32 * i, &segs);
        assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    }
    assert_eq!(h.grants.maps, maps, "no new map for reused grants");
    assert_eq!(h.vbd().stats().persistent_hits, 20);
    // Shutdown unmaps them so the frontend can revoke its grants.
    let mut g = std::mem::take(&mut h.grants);
    h.vbd_mut().shutdown(&mut g);
    assert_eq!(g.live_mappings(), 0);
    assert!(g.revoke(FRONT, segs[0].gref));
}

#[test]
fn persistent_pool_is_bounded_and_overflow_is_mapped_per_request() {
    let mut c = cfg();
    c.max_persistent_grants = 2;
    let mut h = Harness::new(c, ram(2048), 1, 0);
    let segs = h.read_segments(0, 40);
    h.rw(0, 0, op::READ, 0, &segs);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    assert_eq!(h.vbd().persistent_grants(0), 2);
    assert_eq!(h.grants.live_mappings(), 2, "the 3 others were unmapped");
}

#[test]
fn without_persistent_grants_everything_is_unmapped_after_each_request() {
    let mut c = cfg();
    c.persistent = false;
    let mut h = Harness::new(c, ram(2048), 1, 0);
    let data = pattern(3 * PAGE_SIZE, 9);
    h.write(0, 0, 0, &data);
    let segs = h.read_segments(0, 24);
    h.rw(0, 0, op::READ, 0, &segs);
    h.service(0).unwrap();
    assert_eq!(h.responses(0, 0).len(), 2);
    assert_eq!(h.grants.live_mappings(), 0);
    assert!(h.gather(0, &segs) == data);
}

#[test]
fn order_2_ring_holds_128_requests_and_answers_all() {
    let mut h = Harness::new(cfg(), ram(4096), 1, 2);
    assert_eq!(h.disks[0].front.rings[0].nr_ents(), ring_size(2));
    assert_eq!(ring_size(2), 128);
    let mut ids = Vec::new();
    for i in 0..128u64 {
        let data = pattern(512, i);
        ids.push(h.write(0, 0, i, &data));
    }
    assert!(h.disks[0].front.rings[0].is_full());
    h.service(0).unwrap();
    let rs = h.responses(0, 0);
    assert_eq!(rs.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    assert!(rs.iter().all(|r| r.status == rsp::OKAY));
    for i in 0..128u64 {
        let off = i as usize * 512;
        assert!(disk_bytes(&h, 0)[off..off + 512] == pattern(512, i)[..]);
    }
}

#[test]
fn two_queues_answer_on_their_own_rings() {
    let mut h = Harness::new(cfg(), ram(2048), 2, 0);
    let a = h.write(0, 0, 0, &pattern(4096, 1));
    let b = h.write(0, 1, 8, &pattern(4096, 2));
    let c = h.write(0, 1, 16, &pattern(4096, 3));
    h.service(0).unwrap();
    assert_eq!(
        h.responses(0, 0).iter().map(|r| r.id).collect::<Vec<_>>(),
        [a]
    );
    assert_eq!(
        h.responses(0, 1).iter().map(|r| r.id).collect::<Vec<_>>(),
        [b, c]
    );
    assert_eq!(h.notify.per_queue, [1, 1]);
    assert!(disk_bytes(&h, 0)[8 * 512..16 * 512] == pattern(4096, 2)[..]);
}

#[test]
fn flush_reaches_the_device_and_flush_with_data_is_a_durable_write() {
    let mut h = Harness::new(cfg(), ram(2048), 1, 0);
    let id = h.rw(0, 0, op::FLUSH_DISKCACHE, 0, &[]);
    let r = h.one_response(0, 0);
    assert_eq!(
        (r.id, r.operation, r.status),
        (id, op::FLUSH_DISKCACHE, rsp::OKAY)
    );
    assert_eq!(h.vbd().io().device().flushes, 1);
    let segs = h.data_segments(0, &pattern(1024, 4));
    h.rw(0, 0, op::FLUSH_DISKCACHE, 8, &segs);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    assert_eq!(h.vbd().io().device().flushes, 3, "pre-flush and FUA flush");
    assert!(disk_bytes(&h, 0)[8 * 512..10 * 512] == pattern(1024, 4)[..]);
}

#[test]
fn discard_zeroes_the_range_and_secure_discard_needs_the_device() {
    let mut h = Harness::new(cfg(), ram(2048), 1, 0);
    h.write(0, 0, 0, &pattern(8192, 5));
    h.service(0).unwrap();
    h.responses(0, 0);
    let d = BlkifRequestDiscard {
        operation: op::DISCARD,
        flag: BLKIF_DISCARD_SECURE,
        id: 77,
        sector_number: 4,
        nr_sectors: 8,
        ..Default::default()
    };
    h.push(0, 0, BlkifRequestSlot::from_discard(&d));
    let r = h.one_response(0, 0);
    assert_eq!((r.id, r.operation, r.status), (77, op::DISCARD, rsp::OKAY));
    let b = disk_bytes(&h, 0);
    assert!(b[..2048] == pattern(8192, 5)[..2048]);
    assert!(b[2048..6144].iter().all(|&x| x == 0));
    assert!(b[6144..8192] == pattern(8192, 5)[6144..]);
}

#[test]
fn completions_out_of_order_are_answered_by_id_with_the_right_data() {
    let mut disk = RamDisk::new(2048, 512).unwrap();
    for (i, chunk) in disk.bytes_mut().chunks_mut(4096).enumerate() {
        chunk.copy_from_slice(&pattern(4096, 100 + i as u64));
    }
    let mut h = Harness::new(cfg(), DeferredIo::new(disk), 1, 0);
    let mut reads = Vec::new();
    for i in 0..4u64 {
        let segs = h.read_segments(0, 8);
        let id = h.rw(0, 0, op::READ, i * 8, &segs);
        reads.push((id, segs, i));
    }
    h.service(0).unwrap();
    assert_eq!(h.vbd().inflight(), 4);
    assert!(
        h.responses(0, 0).is_empty(),
        "nothing answered before completion"
    );
    h.vbd_mut().io_mut().complete_all_reversed();
    h.service(0).unwrap();
    let rs = h.responses(0, 0);
    let want: Vec<u64> = reads.iter().rev().map(|r| r.0).collect();
    assert_eq!(rs.iter().map(|r| r.id).collect::<Vec<_>>(), want);
    for (_, segs, i) in &reads {
        assert!(h.gather(0, segs) == pattern(4096, 100 + i));
    }
}

#[test]
fn write_is_acknowledged_only_after_the_device_completes_it() {
    let mut h = Harness::new(cfg(), DeferredIo::new(RamDisk::new(64, 512).unwrap()), 1, 0);
    h.write(0, 0, 0, &pattern(512, 3));
    h.service(0).unwrap();
    assert!(h.responses(0, 0).is_empty());
    assert!(h.vbd().io().device.bytes()[..512].iter().all(|&b| b == 0));
    h.vbd_mut().io_mut().complete(0);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    assert!(h.vbd().io().device.bytes()[..512] == pattern(512, 3)[..]);
}

#[test]
fn device_error_is_answered_error() {
    let mut h = Harness::new(cfg(), DeferredIo::new(RamDisk::new(64, 512).unwrap()), 1, 0);
    let segs = h.read_segments(0, 8);
    h.rw(0, 0, op::READ, 0, &segs);
    h.service(0).unwrap();
    let tag = h.vbd().io().pending[0].tag;
    h.vbd_mut().io_mut().fail.push(tag);
    h.vbd_mut().io_mut().complete(0);
    assert_eq!(h.one_response(0, 0).status, rsp::ERROR);
    assert_eq!(h.vbd().stats().device_errors, 1);
}

#[test]
fn barrier_waits_for_earlier_requests_and_holds_later_ones() {
    let mut h = Harness::new(
        cfg(),
        DeferredIo::new(RamDisk::new(256, 512).unwrap()),
        1,
        0,
    );
    let w1 = h.write(0, 0, 0, &pattern(512, 1));
    let bar = h.rw(0, 0, op::WRITE_BARRIER, 0, &[]);
    let w2 = h.write(0, 0, 8, &pattern(512, 2));
    h.service(0).unwrap();
    assert_eq!(h.vbd().io().pending.len(), 1, "barrier waits for w1");
    h.vbd_mut().io_mut().complete(0);
    h.service(0).unwrap();
    assert_eq!(
        h.responses(0, 0).iter().map(|r| r.id).collect::<Vec<_>>(),
        [w1]
    );
    assert_eq!(h.vbd().io().pending.len(), 1, "barrier alone on the device");
    h.vbd_mut().io_mut().complete(0);
    h.service(0).unwrap();
    let r = h.responses(0, 0);
    assert_eq!((r[0].id, r[0].operation), (bar, op::WRITE_BARRIER));
    assert_eq!(
        h.vbd().io().pending.len(),
        1,
        "w2 started after the barrier"
    );
    h.vbd_mut().io_mut().complete(0);
    h.service(0).unwrap();
    assert_eq!(h.responses(0, 0)[0].id, w2);
    assert_eq!(h.vbd().stats().parked, 1);
}

#[test]
fn inflight_byte_bound_parks_requests_until_room() {
    let mut c = cfg();
    c.max_inflight_bytes = 8192;
    let mut h = Harness::new(c, DeferredIo::new(RamDisk::new(256, 512).unwrap()), 1, 0);
    for i in 0..3 {
        h.write(0, 0, i * 8, &pattern(4096, i));
    }
    h.service(0).unwrap();
    assert_eq!(h.vbd().io().pending.len(), 2);
    h.vbd_mut().io_mut().complete(0);
    h.service(0).unwrap();
    assert_eq!(h.vbd().io().pending.len(), 2, "the parked request started");
    h.vbd_mut().io_mut().complete_all_reversed();
    h.service(0).unwrap();
    assert_eq!(h.responses(0, 0).len(), 3);
}

#[test]
fn stats_count_faults_by_kind() {
    let mut h = Harness::new(cfg(), ram(64), 1, 0);
    h.rw(0, 0, 99, 0, &[]);
    h.rw(0, 0, op::READ, 0, &[]);
    h.service(0).unwrap();
    let s = h.vbd().stats();
    assert_eq!(s.fault(FaultKind::UnknownOperation), 1);
    assert_eq!(s.fault(FaultKind::NoSegments), 1);
    assert_eq!((s.eopnotsupp, s.error, s.requests), (1, 1, 2));
}
