//! The rx path (frames into frontend-posted buffers) and the multi-queue vif.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FRONT, Harness, pattern};
use netback_dom::backend::{Disconnect, Queue, QueueConfig, QueueState, RingKind, RxDrop, Vif};
use netback_dom::grant::PagePool;
use netback_dom::packet::{Checksum, Gso, GsoKind, Offload, Packet};
use shared_abi::PAGE_SIZE;
use shared_abi::netif::{NetifExtraInfo, extra_type, gso_type, netrxf, rsp};
use shared_abi::ring::{SharedRingMem, header};

fn packet(len: usize, seed: u8, offload: Offload) -> Packet {
    Packet {
        data: pattern(len, seed),
        offload,
    }
}

#[test]
fn rx_small_frame_lands_in_one_posted_buffer() {
    let mut h = Harness::new(Harness::default_cfg());
    let grefs = h.post_rx(4);
    assert!(h.queue.enqueue_rx(packet(100, 1, Offload::default())));

    let s = h.run_rx().unwrap();

    assert_eq!(s.packets, 1);
    assert!(!s.stalled);
    let rsps = h.rx_responses();
    assert_eq!(rsps.len(), 1);
    assert_eq!(rsps[0].id, 0);
    assert_eq!(rsps[0].status, 100);
    assert_eq!(rsps[0].offset, 0);
    assert_eq!(rsps[0].flags, 0);
    assert_eq!(
        &h.grants.page(grefs[0]).unwrap()[..100],
        &pattern(100, 1)[..]
    );
    assert_eq!(h.notify.rx, 1);
    assert_eq!(h.queue.stats().rx_packets, 1);
}

#[test]
fn rx_large_frame_splits_across_buffers_with_more_data() {
    let mut h = Harness::new(Harness::default_cfg());
    let grefs = h.post_rx(3);
    let frame = pattern(10_000, 2);
    h.queue.enqueue_rx(Packet::new(frame.clone()));

    h.run_rx().unwrap();

    let rsps = h.rx_responses();
    let st: Vec<(u16, i16, u16)> = rsps.iter().map(|r| (r.id, r.status, r.flags)).collect();
    assert_eq!(
        st,
        [
            (0, 4096, netrxf::MORE_DATA),
            (1, 4096, netrxf::MORE_DATA),
            (2, 1808, 0)
        ]
    );
    let mut got = Vec::new();
    for (g, r) in grefs.iter().zip(&rsps) {
        got.extend_from_slice(&h.grants.page(*g).unwrap()[..r.status as usize]);
    }
    assert_eq!(got, frame);
}

#[test]
fn rx_frame_over_a_page_without_sg_is_dropped() {
    let mut cfg = Harness::default_cfg();
    cfg.rx_sg = false;
    let mut h = Harness::new(cfg);
    h.post_rx(4);
    h.queue.enqueue_rx(packet(5000, 0, Offload::default()));
    h.queue.enqueue_rx(packet(60, 0, Offload::default()));

    let s = h.run_rx().unwrap();

    assert_eq!(s.packets, 2);
    assert_eq!(h.queue.stats().rx_drop(RxDrop::NeedsSg), 1);
    let rsps = h.rx_responses();
    assert_eq!(rsps.len(), 1);
    assert_eq!(rsps[0].status, 60);
}

#[test]
fn rx_checksum_state_becomes_netrxf_flags() {
    let mut h = Harness::new(Harness::default_cfg());
    h.post_rx(2);
    h.queue.enqueue_rx(packet(
        60,
        0,
        Offload {
            checksum: Checksum::Partial,
            gso: None,
        },
    ));
    h.queue.enqueue_rx(packet(
        60,
        0,
        Offload {
            checksum: Checksum::Validated,
            gso: None,
        },
    ));

    h.run_rx().unwrap();

    let flags: Vec<u16> = h.rx_responses().iter().map(|r| r.flags).collect();
    assert_eq!(
        flags,
        [
            netrxf::CSUM_BLANK | netrxf::DATA_VALIDATED,
            netrxf::DATA_VALIDATED
        ]
    );
}

#[test]
fn rx_gso_frame_carries_its_extra_info_in_the_second_slot() {
    let mut h = Harness::new(Harness::default_cfg());
    let grefs = h.post_rx(4);
    let offload = Offload {
        checksum: Checksum::Partial,
        gso: Some(Gso {
            kind: GsoKind::TcpV6,
            mss: 1440,
        }),
    };
    let frame = pattern(6000, 3);
    h.queue.enqueue_rx(Packet {
        data: frame.clone(),
        offload,
    });

    h.run_rx().unwrap();

    let rsps = h.rx_responses();
    assert_eq!(rsps.len(), 3);
    assert_eq!(
        rsps[0].flags,
        netrxf::CSUM_BLANK | netrxf::DATA_VALIDATED | netrxf::EXTRA_INFO | netrxf::MORE_DATA
    );
    assert_eq!(rsps[0].status, 4096);
    let extra = NetifExtraInfo::from_rx_slot(&rsps[1]);
    assert_eq!(extra.kind, extra_type::GSO);
    assert_eq!(extra.as_gso().kind, gso_type::TCPV6);
    assert_eq!(extra.as_gso().size, 1440);
    assert!(!extra.has_more());
    assert_eq!((rsps[2].status, rsps[2].flags), (6000 - 4096, 0));
    // Data went to the first and third posted buffers; the second carried the extra.
    assert_eq!(&h.grants.page(grefs[0]).unwrap()[..], &frame[..4096]);
    assert_eq!(&h.grants.page(grefs[2]).unwrap()[..1904], &frame[4096..]);
}

#[test]
fn rx_gso_frame_for_a_frontend_without_gso_is_dropped() {
    let mut cfg = Harness::default_cfg();
    cfg.rx_gso_tcpv4 = false;
    let mut h = Harness::new(cfg);
    h.post_rx(4);
    h.queue.enqueue_rx(packet(
        3000,
        0,
        Offload {
            checksum: Checksum::Partial,
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                mss: 1448,
            }),
        },
    ));

    h.run_rx().unwrap();

    assert_eq!(h.queue.stats().rx_drop(RxDrop::GsoUnsupported), 1);
    assert!(h.rx_responses().is_empty());
}

#[test]
fn rx_waits_for_buffers_and_delivers_once_they_are_posted() {
    let mut h = Harness::new(Harness::default_cfg());
    h.post_rx(2);
    h.queue.enqueue_rx(packet(60, 4, Offload::default()));
    h.queue.enqueue_rx(packet(9000, 4, Offload::default()));

    let s = h.run_rx().unwrap();

    assert!(s.stalled);
    assert_eq!(h.queue.backlog_len(), 1);
    assert_eq!(h.rx_responses().len(), 1);
    // The backend consumed one request and asked to be woken when 3 more are posted.
    assert_eq!(h.rx_mem.read_u32(header::REQ_EVENT), Some(1 + 3));
    h.post_rx(1);
    assert!(!h.rx_post_notified, "2 of 3 buffers: no wake-up yet");
    assert!(h.run_rx().unwrap().stalled);

    h.post_rx(1);
    assert!(h.rx_post_notified, "the third buffer wakes the backend");
    let s = h.run_rx().unwrap();

    assert!(!s.stalled);
    assert_eq!(h.queue.backlog_len(), 0);
    let total: i32 = h.rx_responses().iter().map(|r| i32::from(r.status)).sum();
    assert_eq!(total, 9000);
}

#[test]
fn rx_buffer_with_reserved_gref_fails_the_frame_with_error_responses() {
    let mut h = Harness::new(Harness::default_cfg());
    h.rx_front
        .push_request(&shared_abi::netif::NetifRxRequest {
            id: 0,
            pad: 0,
            gref: 1,
        })
        .unwrap();
    h.rx_front.push_requests_and_check_notify();
    h.queue.enqueue_rx(packet(60, 0, Offload::default()));

    h.run_rx().unwrap();

    let rsps = h.rx_responses();
    assert_eq!(rsps.len(), 1);
    assert_eq!(rsps[0].status, rsp::ERROR);
    assert_eq!(h.queue.stats().rx_drop(RxDrop::ReservedGref), 1);
    assert_eq!(h.grants.copies_done, 0);
}

#[test]
fn rx_copy_failure_into_a_revoked_buffer_answers_error_and_continues() {
    let mut h = Harness::new(Harness::default_cfg());
    let grefs = h.post_rx(2);
    h.grants.revoke(grefs[0]);
    h.queue.enqueue_rx(packet(60, 1, Offload::default()));
    h.queue.enqueue_rx(packet(70, 2, Offload::default()));

    h.run_rx().unwrap();

    let st: Vec<i16> = h.rx_responses().iter().map(|r| r.status).collect();
    assert_eq!(st, [rsp::ERROR, 70]);
    assert_eq!(h.queue.stats().rx_drop(RxDrop::GrantCopy), 1);
}

#[test]
fn rx_corrupted_request_producer_disconnects() {
    let mut h = Harness::new(Harness::default_cfg());
    h.rx_mem.write_u32(header::REQ_PROD, 1000).unwrap();
    h.queue.enqueue_rx(packet(60, 0, Offload::default()));

    let r = h.run_rx();

    assert!(matches!(
        r,
        Err(Disconnect::RingIndex {
            ring: RingKind::Rx,
            ..
        })
    ));
    assert!(matches!(h.queue.state(), QueueState::Disconnected(_)));
    assert_eq!(h.queue.backlog_len(), 0);
    assert!(!h.queue.enqueue_rx(packet(60, 0, Offload::default())));
}

#[test]
fn rx_backlog_is_bounded() {
    let mut cfg = Harness::default_cfg();
    cfg.rx_backlog = 3;
    let mut h = Harness::new(cfg);
    let accepted = (0..5)
        .filter(|_| h.queue.enqueue_rx(packet(60, 0, Offload::default())))
        .count();
    assert_eq!(accepted, 3);
    assert_eq!(h.queue.stats().rx_drop(RxDrop::BacklogFull), 2);
}

#[test]
fn rx_empty_and_oversized_frames_are_dropped() {
    let mut h = Harness::new(Harness::default_cfg());
    h.post_rx(20);
    h.queue.enqueue_rx(Packet::new(Vec::new()));
    h.queue.enqueue_rx(packet(70_000, 0, Offload::default()));

    h.run_rx().unwrap();

    assert_eq!(h.queue.stats().rx_drop(RxDrop::Empty), 1);
    assert_eq!(h.queue.stats().rx_drop(RxDrop::TooBig), 1);
    assert!(h.rx_responses().is_empty());
}

#[test]
fn rx_many_frames_batch_into_few_copies_and_one_notification() {
    let mut h = Harness::new(Harness::default_cfg());
    h.post_rx(40);
    for i in 0..40 {
        h.queue.enqueue_rx(packet(64, i, Offload::default()));
    }

    let s = h.run_rx().unwrap();

    assert_eq!(s.packets, 40);
    // A 16-page pool stages 16 one-page frames per batch.
    assert_eq!(h.grants.batches, 3);
    assert_eq!(h.notify.rx, 1);
    assert_eq!(h.rx_responses().len(), 40);
}

fn queue(idx: u16) -> (Queue, SharedRingMem, SharedRingMem) {
    let tx = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
    let rx = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
    // The frontend initialises the ring headers.
    shared_abi::ring::FrontRing::<
        shared_abi::netif::NetifTxRequest,
        shared_abi::netif::NetifTxResponse,
    >::new(tx.clone())
    .unwrap();
    let q = Queue::new(
        QueueConfig::new(FRONT, idx),
        tx.clone(),
        rx.clone(),
        PagePool::with_fake_frames(16, u64::from(idx) * 100),
    )
    .unwrap();
    (q, tx, rx)
}

fn ipv4_udp(src_port: u16) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[34..36].copy_from_slice(&src_port.to_be_bytes());
    f
}

#[test]
fn vif_spreads_flows_over_queues_and_keeps_each_flow_on_one() {
    let queues: Vec<Queue> = (0..4).map(|i| queue(i).0).collect();
    let mut vif = Vif::new(queues).unwrap();

    let mut used = [0usize; 4];
    for port in 0..64u16 {
        let f = ipv4_udp(port);
        let q = vif.select_queue(&f);
        assert_eq!(q, vif.select_queue(&f));
        used[q] += 1;
        assert!(vif.enqueue_rx(Packet::new(f)));
    }

    assert!(used.iter().all(|&n| n > 0), "{used:?}");
    let backlog: usize = (0..4).map(|i| vif.queue(i).unwrap().backlog_len()).sum();
    assert_eq!(backlog, 64);
}

#[test]
fn vif_fault_on_one_queue_disconnects_every_queue() {
    let (q0, _, _) = queue(0);
    let (q1, tx1, _) = queue(1);
    let mut vif = Vif::new(vec![q0, q1]).unwrap();
    tx1.write_u32(header::REQ_PROD, 999).unwrap();
    let mut grants = netback_dom::grant::FakeGrantTable::new(FRONT);
    let mut notify = common::CountNotify::default();

    let r = vif.process_tx(1, &mut grants, &mut notify, |_| true);

    assert!(r.is_err());
    assert!(!vif.is_connected());
    assert!(matches!(
        vif.queue(0).unwrap().state(),
        QueueState::Disconnected(_)
    ));
}

#[test]
fn vif_refuses_zero_or_too_many_queues() {
    assert!(Vif::new(Vec::new()).is_err());
    let many: Vec<Queue> = (0..17).map(|i| queue(i).0).collect();
    assert!(Vif::new(many).is_err());
}

#[test]
fn queue_refuses_a_pool_smaller_than_one_maximal_packet() {
    let tx = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
    let rx = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
    let r = Queue::new(
        QueueConfig::new(FRONT, 0),
        tx,
        rx,
        PagePool::with_fake_frames(4, 0),
    );
    assert!(r.is_err());
}
