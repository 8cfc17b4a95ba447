//! The tx path: frontend requests on a real ring, packets out, one response per request.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Harness, pattern};
use netback_dom::backend::{Disconnect, QueueState, RingKind, TxFault};
use netback_dom::packet::{Checksum, Gso, GsoKind};
use shared_abi::netif::{
    GsoInfo, NetifExtraInfo, NetifTxRequest, XEN_NETIF_EXTRA_FLAG_MORE, gso_type, nettxf, rsp,
};
use shared_abi::ring::{RingError, header};

fn req(gref: u32, offset: u16, flags: u16, id: u16, size: u16) -> NetifTxRequest {
    NetifTxRequest {
        gref,
        offset,
        flags,
        id,
        size,
    }
}

fn statuses(h: &mut Harness) -> Vec<(u16, i16)> {
    h.tx_responses().iter().map(|r| (r.id, r.status)).collect()
}

#[test]
fn tx_single_slot_packet_is_copied_answered_okay_and_notified_once() {
    let mut h = Harness::new(Harness::default_cfg());
    let frame = pattern(60, 1);
    let g = h.grant_data(&frame, 100);
    h.push_tx(&[req(g, 100, 0, 42, 60)]);

    let (r, pkts) = h.run_tx();

    let summary = r.unwrap();
    assert_eq!(summary.packets, 1);
    assert!(!summary.more);
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].data, frame);
    assert_eq!(pkts[0].offload.checksum, Checksum::None);
    assert_eq!(statuses(&mut h), [(42, rsp::OKAY)]);
    assert_eq!(h.notify.tx, 1);
    assert_eq!(h.queue.stats().tx_packets, 1);
}

#[test]
fn tx_multi_slot_packet_concatenates_fragments_in_order() {
    let mut h = Harness::new(Harness::default_cfg());
    let frame = pattern(1400, 3);
    let g0 = h.grant_data(&frame[..500], 3596);
    let g1 = h.grant_data(&frame[500..1300], 0);
    let g2 = h.grant_data(&frame[1300..], 17);
    h.push_tx(&[
        req(g0, 3596, nettxf::MORE_DATA, 1, 1400),
        req(g1, 0, nettxf::MORE_DATA, 2, 800),
        req(g2, 17, 0, 3, 100),
    ]);

    let (r, pkts) = h.run_tx();

    r.unwrap();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].data, frame);
    assert_eq!(
        statuses(&mut h),
        [(1, rsp::OKAY), (2, rsp::OKAY), (3, rsp::OKAY)]
    );
}

#[test]
fn tx_eighteen_slot_packet_is_accepted() {
    let mut h = Harness::new(Harness::default_cfg());
    let frame = pattern(18 * 50, 9);
    let mut reqs = Vec::new();
    for i in 0..18 {
        let g = h.grant_data(&frame[i * 50..(i + 1) * 50], 0);
        let flags = if i < 17 { nettxf::MORE_DATA } else { 0 };
        let size = if i == 0 { 900 } else { 50 };
        reqs.push(req(g, 0, flags, i as u16, size));
    }
    h.push_tx(&reqs);

    let (r, pkts) = h.run_tx();

    r.unwrap();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].data, frame);
    assert!(statuses(&mut h).iter().all(|(_, s)| *s == rsp::OKAY));
}

#[test]
fn tx_checksum_flags_become_offload_state() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(60, 0), 0);
    h.push_tx(&[
        req(g, 0, nettxf::CSUM_BLANK | nettxf::DATA_VALIDATED, 1, 60),
        req(g, 0, nettxf::DATA_VALIDATED, 2, 60),
    ]);

    let (r, pkts) = h.run_tx();

    r.unwrap();
    assert_eq!(pkts[0].offload.checksum, Checksum::Partial);
    assert_eq!(pkts[1].offload.checksum, Checksum::Validated);
}

#[test]
fn tx_gso_extra_info_is_parsed_and_answered_null() {
    let mut h = Harness::new(Harness::default_cfg());
    let frame = pattern(3000, 5);
    let g0 = h.grant_data(&frame[..2000], 0);
    let g1 = h.grant_data(&frame[2000..], 0);
    let extra = NetifExtraInfo::gso(
        GsoInfo {
            size: 1448,
            kind: gso_type::TCPV4,
            features: 0,
        },
        0,
    );
    let mut ex = extra.to_tx_slot();
    ex.id = 11;
    h.push_tx(&[
        req(
            g0,
            0,
            nettxf::EXTRA_INFO | nettxf::MORE_DATA | nettxf::CSUM_BLANK,
            10,
            3000,
        ),
        ex,
        req(g1, 0, 0, 12, 1000),
    ]);

    let (r, pkts) = h.run_tx();

    r.unwrap();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].data, frame);
    assert_eq!(
        pkts[0].offload.gso,
        Some(Gso {
            kind: GsoKind::TcpV4,
            mss: 1448
        })
    );
    assert_eq!(
        statuses(&mut h),
        [(10, rsp::OKAY), (11, rsp::NULL), (12, rsp::OKAY)]
    );
}

/// Push `reqs` (one bad packet), then a good packet; the bad one is answered ERROR with the
/// fault counted, the good one still goes through.
fn assert_refused(h: &mut Harness, reqs: &[NetifTxRequest], fault: TxFault) {
    let before = h.queue.stats().tx_fault(fault);
    let good = h.grant_data(&pattern(60, 77), 0);
    let mut all = reqs.to_vec();
    all.push(req(good, 0, 0, 999, 60));
    h.push_tx(&all);

    let (r, pkts) = h.run_tx();

    r.unwrap();
    assert_eq!(pkts.len(), 1, "only the good packet is emitted");
    assert_eq!(pkts[0].data, pattern(60, 77));
    let st = statuses(h);
    assert_eq!(st.len(), reqs.len() + 1, "one response per request");
    for (i, (id, s)) in st[..reqs.len()].iter().enumerate() {
        assert_eq!(*id, reqs[i].id);
        assert!(*s == rsp::ERROR || *s == rsp::NULL, "{s}");
    }
    assert_eq!(st[reqs.len()], (999, rsp::OKAY));
    assert_eq!(h.queue.stats().tx_fault(fault), before + 1, "{fault:?}");
}

#[test]
fn tx_fragments_larger_than_the_declared_total_are_refused() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(200, 0), 0);
    assert_refused(
        &mut h,
        &[req(g, 0, nettxf::MORE_DATA, 1, 100), req(g, 0, 0, 2, 150)],
        TxFault::FragExceedsPacket,
    );
}

#[test]
fn tx_non_gso_frame_over_the_mtu_is_refused() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(2000, 0), 0);
    assert_refused(&mut h, &[req(g, 0, 0, 1, 2000)], TxFault::Oversize);
}

#[test]
fn tx_offset_plus_size_past_the_page_is_refused() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(60, 0), 0);
    assert_refused(&mut h, &[req(g, 4050, 0, 1, 60)], TxFault::CrossesPage);
    let g2 = h.grant_data(&pattern(60, 0), 0);
    assert_refused(
        &mut h,
        &[
            req(g2, 0, nettxf::MORE_DATA, 2, 120),
            req(g2, 4090, 0, 3, 60),
        ],
        TxFault::CrossesPage,
    );
}

#[test]
fn tx_more_than_eighteen_data_slots_are_refused() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(64, 0), 0);
    let mut reqs = Vec::new();
    for i in 0..19u16 {
        let flags = if i < 18 { nettxf::MORE_DATA } else { 0 };
        let size = if i == 0 { 19 * 20 } else { 20 };
        reqs.push(req(g, 0, flags, i, size));
    }
    assert_refused(&mut h, &reqs, TxFault::TooManySlots);
}

#[test]
fn tx_reserved_grant_refs_are_refused_before_any_copy() {
    let mut h = Harness::new(Harness::default_cfg());
    assert_refused(&mut h, &[req(1, 0, 0, 1, 60)], TxFault::ReservedGref);
    assert_eq!(h.grants.copies_done, 1, "only the good packet was copied");
}

#[test]
fn tx_ungranted_ref_fails_the_copy_and_is_answered_error() {
    let mut h = Harness::new(Harness::default_cfg());
    assert_refused(&mut h, &[req(5000, 0, 0, 1, 60)], TxFault::GrantCopy);
    assert!(h.grants.page(5000).is_none());
}

#[test]
fn tx_garbage_flags_are_refused() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(60, 0), 0);
    assert_refused(&mut h, &[req(g, 0, 0x40, 1, 60)], TxFault::BadFlags);
    assert_refused(
        &mut h,
        &[
            req(g, 0, nettxf::MORE_DATA, 2, 60),
            req(g, 0, nettxf::EXTRA_INFO, 3, 10),
        ],
        TxFault::BadFlags,
    );
}

#[test]
fn tx_runt_below_an_ethernet_header_is_refused() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(60, 0), 0);
    assert_refused(&mut h, &[req(g, 0, 0, 1, 10)], TxFault::TooShort);
}

#[test]
fn tx_bad_extra_info_is_refused() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(60, 0), 0);
    let unknown = NetifExtraInfo {
        kind: 9,
        flags: 0,
        payload: Default::default(),
    }
    .to_tx_slot();
    assert_refused(
        &mut h,
        &[req(g, 0, nettxf::EXTRA_INFO, 1, 60), unknown],
        TxFault::BadExtra,
    );
    let zero_mss = NetifExtraInfo::gso(
        GsoInfo {
            size: 0,
            kind: gso_type::TCPV4,
            features: 0,
        },
        0,
    )
    .to_tx_slot();
    assert_refused(
        &mut h,
        &[req(g, 0, nettxf::EXTRA_INFO, 2, 60), zero_mss],
        TxFault::BadExtra,
    );
}

#[test]
fn tx_gso_kind_not_offered_is_refused() {
    let mut cfg = Harness::default_cfg();
    cfg.tx_gso_tcpv6 = false;
    let mut h = Harness::new(cfg);
    let g = h.grant_data(&pattern(60, 0), 0);
    let v6 = NetifExtraInfo::gso(
        GsoInfo {
            size: 1400,
            kind: gso_type::TCPV6,
            features: 0,
        },
        0,
    )
    .to_tx_slot();
    assert_refused(
        &mut h,
        &[req(g, 0, nettxf::EXTRA_INFO, 1, 60), v6],
        TxFault::GsoUnsupported,
    );
}

#[test]
fn tx_extra_chain_longer_than_the_type_count_is_refused() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(60, 0), 0);
    let mut reqs = vec![req(g, 0, nettxf::EXTRA_INFO, 1, 60)];
    for i in 0..5u16 {
        let more = if i < 4 { XEN_NETIF_EXTRA_FLAG_MORE } else { 0 };
        let mut s = NetifExtraInfo::hash(Default::default(), more).to_tx_slot();
        s.id = 10 + i;
        reqs.push(s);
    }
    // Hash repeated is already a BadExtra; either way the packet is refused.
    h.push_tx(&reqs);
    let (r, pkts) = h.run_tx();
    r.unwrap();
    assert!(pkts.is_empty());
    let st = statuses(&mut h);
    assert_eq!(st[0], (1, rsp::ERROR));
    assert!(st[1..].iter().all(|(_, s)| *s == rsp::NULL));
    assert_eq!(h.queue.stats().tx_faults_total(), 1);
}

#[test]
fn tx_packet_the_sink_refuses_is_answered_dropped() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(60, 0), 0);
    h.push_tx(&[req(g, 0, 0, 1, 60)]);

    let r = h
        .queue
        .process_tx(&mut h.grants, &mut h.notify, |_| false)
        .unwrap();

    assert_eq!(r.packets, 1);
    assert_eq!(statuses(&mut h), [(1, rsp::DROPPED)]);
    assert_eq!(h.queue.stats().tx_dropped, 1);
}

#[test]
fn tx_many_packets_use_one_copy_batch_and_one_notification() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(64, 0), 0);
    let reqs: Vec<_> = (0..50).map(|i| req(g, 0, 0, i, 64)).collect();
    h.push_tx(&reqs);

    let (r, pkts) = h.run_tx();

    r.unwrap();
    assert_eq!(pkts.len(), 50);
    assert_eq!(h.grants.batches, 1);
    assert_eq!(h.notify.tx, 1);
    assert_eq!(statuses(&mut h).len(), 50);
}

#[test]
fn tx_packets_beyond_the_pool_flush_mid_pass_keeping_response_order() {
    let mut h = Harness::new(Harness::default_cfg());
    // 16-page pool = 65536 bytes; five 20000-byte GSO packets need several flushes.
    let frame = pattern(20_000, 1);
    let mut reqs = Vec::new();
    let mut id = 0;
    for _ in 0..5 {
        let gso = NetifExtraInfo::gso(
            GsoInfo {
                size: 1448,
                kind: gso_type::TCPV4,
                features: 0,
            },
            0,
        );
        let chunks: Vec<_> = frame.chunks(4000).collect();
        for (i, c) in chunks.iter().enumerate() {
            let g = h.grant_data(c, 0);
            let mut flags = if i + 1 < chunks.len() {
                nettxf::MORE_DATA
            } else {
                0
            };
            let size = if i == 0 { 20_000 } else { c.len() as u16 };
            if i == 0 {
                flags |= nettxf::EXTRA_INFO;
            }
            reqs.push(req(g, 0, flags, id, size));
            id += 1;
            if i == 0 {
                let mut s = gso.to_tx_slot();
                s.id = id;
                id += 1;
                reqs.push(s);
            }
        }
    }
    h.push_tx(&reqs);

    let (r, pkts) = h.run_tx();

    r.unwrap();
    assert_eq!(pkts.len(), 5);
    assert!(pkts.iter().all(|p| p.data == frame));
    assert!(h.grants.batches >= 2);
    let st = statuses(&mut h);
    let ids: Vec<u16> = st.iter().map(|(i, _)| *i).collect();
    assert_eq!(ids, (0..id).collect::<Vec<_>>());
}

#[test]
fn tx_budget_limits_a_pass_and_the_next_call_continues() {
    let mut cfg = Harness::default_cfg();
    cfg.tx_budget = 4;
    let mut h = Harness::new(cfg);
    let g = h.grant_data(&pattern(64, 0), 0);
    let reqs: Vec<_> = (0..10).map(|i| req(g, 0, 0, i, 64)).collect();
    h.push_tx(&reqs);

    let (r1, p1) = h.run_tx();
    let (r2, p2) = h.run_tx();
    let (r3, p3) = h.run_tx();

    assert!(r1.unwrap().more);
    assert!(r2.unwrap().more);
    assert!(!r3.unwrap().more);
    assert_eq!((p1.len(), p2.len(), p3.len()), (4, 4, 2));
    assert_eq!(statuses(&mut h).len(), 10);
}

#[test]
fn tx_multicast_control_updates_the_filter_without_emitting_a_packet() {
    let mut cfg = Harness::default_cfg();
    cfg.multicast_control = true;
    let mut h = Harness::new(cfg);
    let g = h.grant_data(&pattern(60, 0), 0);
    let group = [0x01, 0x00, 0x5e, 0, 0, 0xfb];
    h.push_tx(&[
        req(g, 0, nettxf::EXTRA_INFO, 1, 60),
        NetifExtraInfo::mcast(true, group, 0).to_tx_slot(),
    ]);

    let (r, pkts) = h.run_tx();

    r.unwrap();
    assert!(pkts.is_empty());
    assert_eq!(h.queue.multicast_filter().len(), 1);
    assert_eq!(statuses(&mut h)[0], (1, rsp::OKAY));

    // A zero-size dummy data slot is fine: no packet is built for a multicast update.
    h.push_tx(&[
        req(0, 0, nettxf::EXTRA_INFO, 2, 0),
        NetifExtraInfo::mcast(false, group, 0).to_tx_slot(),
    ]);
    let (r, pkts) = h.run_tx();
    r.unwrap();
    assert!(pkts.is_empty());
    assert!(h.queue.multicast_filter().is_empty());
    assert_eq!(statuses(&mut h)[0], (2, rsp::OKAY));
    assert_eq!(h.queue.stats().tx_mcast_ops, 2);
}

#[test]
fn tx_multicast_extra_without_multicast_control_is_refused() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(60, 0), 0);
    assert_refused(
        &mut h,
        &[
            req(g, 0, nettxf::EXTRA_INFO, 1, 60),
            NetifExtraInfo::mcast(true, [1, 0, 0x5e, 0, 0, 1], 0).to_tx_slot(),
        ],
        TxFault::McastRefused,
    );
}

#[test]
fn tx_corrupted_request_producer_disconnects_and_refuses_further_work() {
    let mut h = Harness::new(Harness::default_cfg());
    // The frontend claims 300 requests on a 256-slot ring.
    h.tx_mem.write_u32(header::REQ_PROD, 300).unwrap();

    let (r, pkts) = h.run_tx();

    assert!(matches!(
        r,
        Err(Disconnect::RingIndex {
            ring: RingKind::Tx,
            err: RingError::BogusRequestProducer { .. }
        })
    ));
    assert!(pkts.is_empty());
    assert!(matches!(h.queue.state(), QueueState::Disconnected(_)));
    // Even a now-sane ring gets no more service.
    h.tx_mem.write_u32(header::REQ_PROD, 0).unwrap();
    assert!(h.run_tx().0.is_err());
    assert!(h.queue.deliver_rx(&mut h.grants, &mut h.notify).is_err());
    assert_eq!(h.tx_mem.read_u32(header::RSP_PROD), Some(0));
}

#[test]
fn tx_chain_running_past_the_producer_disconnects() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(60, 0), 0);
    h.push_tx(&[req(g, 0, nettxf::MORE_DATA, 1, 60)]);

    let (r, _) = h.run_tx();

    assert_eq!(r, Err(Disconnect::TruncatedChain));
    assert_eq!(
        h.queue.state(),
        QueueState::Disconnected(Disconnect::TruncatedChain)
    );
}

#[test]
fn tx_ring_wraps_around_many_times() {
    let mut h = Harness::new(Harness::default_cfg());
    let g = h.grant_data(&pattern(64, 4), 0);
    let mut total = 0;
    for round in 0..20u16 {
        let reqs: Vec<_> = (0..100)
            .map(|i| req(g, 0, 0, round * 100 + i, 64))
            .collect();
        h.push_tx(&reqs);
        loop {
            let (r, pkts) = h.run_tx();
            total += pkts.len();
            if !r.unwrap().more {
                break;
            }
        }
        assert_eq!(statuses(&mut h).len(), 100);
    }
    assert_eq!(total, 2000);
    assert_eq!(h.queue.stats().tx_slots, 2000);
}
