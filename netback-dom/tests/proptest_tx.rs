//! Random tx ring contents: the engine never panics, answers every consumed request exactly
//! once and in order, and emits a packet only for a slot chain that an independent check
//! finds valid, with exactly the bytes those slots describe.
#![allow(clippy::unwrap_used)]

mod common;

use common::Harness;
use netback_dom::backend::{Disconnect, QueueState};
use netback_dom::packet::Packet;
use proptest::prelude::*;
use shared_abi::PAGE_SIZE;
use shared_abi::netif::{NetifExtraInfo, NetifTxRequest, nettxf, rsp};

const GRANTED: std::ops::Range<u32> = 8..16;

fn page_byte(gref: u32, idx: usize) -> u8 {
    (gref as usize * 7 + idx * 13) as u8
}

fn slot() -> impl Strategy<Value = NetifTxRequest> {
    let gref = prop_oneof![4 => GRANTED, 1 => 0u32..8, 1 => any::<u32>()];
    let offset = prop_oneof![4 => 0u16..64, 1 => any::<u16>()];
    let flags = prop_oneof![
        4 => Just(0u16),
        3 => Just(nettxf::MORE_DATA),
        1 => Just(nettxf::EXTRA_INFO),
        1 => Just(nettxf::CSUM_BLANK | nettxf::DATA_VALIDATED),
        1 => any::<u16>(),
    ];
    let size = prop_oneof![4 => 14u16..300, 1 => any::<u16>()];
    (gref, offset, flags, size).prop_map(|(gref, offset, flags, size)| NetifTxRequest {
        gref,
        offset,
        flags,
        id: 0,
        size,
    })
}

/// Split the requests into packets by the chain rules alone (no validation): first slot,
/// its extra-info slots while each says "more", then `more_data` fragments. Returns
/// (first data index, extra indices, fragment indices) per packet, or None if the last
/// chain runs off the end.
#[allow(clippy::type_complexity)]
fn segment(reqs: &[NetifTxRequest]) -> Option<Vec<(usize, Vec<usize>, Vec<usize>)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < reqs.len() {
        let first = i;
        i += 1;
        let mut extras = Vec::new();
        if reqs[first].flags & nettxf::EXTRA_INFO != 0 {
            loop {
                let e = reqs.get(i)?;
                extras.push(i);
                i += 1;
                if !NetifExtraInfo::from_tx_slot(e).has_more() {
                    break;
                }
            }
        }
        let mut frags = Vec::new();
        let mut last = reqs[first].flags;
        while last & nettxf::MORE_DATA != 0 {
            let r = reqs.get(i)?;
            frags.push(i);
            last = r.flags;
            i += 1;
        }
        out.push((first, extras, frags));
    }
    Some(out)
}

/// The bytes a valid packet must carry, or None if an independent check finds a slot that
/// can never be valid.
fn expected_bytes(reqs: &[NetifTxRequest], first: usize, frags: &[usize]) -> Option<Vec<u8>> {
    let f = &reqs[first];
    let total = usize::from(f.size);
    if total < 14 || frags.len() + 1 > 18 || f.flags & !nettxf::ALL != 0 {
        return None;
    }
    let frag_sum: usize = frags.iter().map(|&i| usize::from(reqs[i].size)).sum();
    if frag_sum > total {
        return None;
    }
    let mut pieces = vec![(f.gref, usize::from(f.offset), total - frag_sum)];
    for &i in frags {
        let r = &reqs[i];
        if r.flags & !nettxf::ALL != 0 || r.flags & nettxf::EXTRA_INFO != 0 {
            return None;
        }
        pieces.push((r.gref, usize::from(r.offset), usize::from(r.size)));
    }
    let mut out = Vec::new();
    for (gref, off, len) in pieces {
        // An empty piece is never copied, so its ref need not be granted (only in range).
        if (len > 0 && !GRANTED.contains(&gref)) || gref < 8 || off + len > PAGE_SIZE {
            return None;
        }
        out.extend((off..off + len).map(|idx| page_byte(gref, idx)));
    }
    Some(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_tx_ring_contents_are_answered_once_each_and_never_leak_invalid_packets(
        mut reqs in prop::collection::vec(slot(), 1..200),
        terminate in any::<bool>(),
    ) {
        for (i, r) in reqs.iter_mut().enumerate() {
            r.id = i as u16;
        }
        if terminate && let Some(last) = reqs.last_mut() {
            last.flags &= !(nettxf::MORE_DATA | nettxf::EXTRA_INFO);
        }
        let mut h = Harness::new(Harness::default_cfg());
        for g in GRANTED {
            h.grants.grant(g, true);
            let page = h.grants.page_mut(g).unwrap();
            for (idx, b) in page.iter_mut().enumerate() {
                *b = page_byte(g, idx);
            }
        }
        h.push_tx(&reqs);

        let mut pkts: Vec<Packet> = Vec::new();
        let outcome = loop {
            let mut out = Vec::new();
            let r = h.queue.process_tx(&mut h.grants, &mut h.notify, |p| {
                out.push(p);
                true
            });
            pkts.extend(out);
            match r {
                Ok(s) if s.more => continue,
                other => break other,
            }
        };

        let segments = segment(&reqs);
        match outcome {
            Err(d) => {
                // Only a truncated chain may disconnect: the ring indices were sane.
                prop_assert_eq!(d, Disconnect::TruncatedChain);
                prop_assert!(segments.is_none());
                prop_assert_eq!(h.queue.state(), QueueState::Disconnected(d));
            }
            Ok(_) => {
                let segments = segments.expect("engine finished a chain the oracle could not");
                let rsps = h.tx_responses();
                prop_assert_eq!(rsps.len(), reqs.len(), "one response per request");
                for (r, q) in rsps.iter().zip(&reqs) {
                    prop_assert_eq!(r.id, q.id, "responses in request order");
                }
                let mut emitted = pkts.iter();
                let mut okay_packets = 0;
                for (first, extras, frags) in &segments {
                    for &e in extras {
                        prop_assert_eq!(rsps[e].status, rsp::NULL);
                    }
                    let st = rsps[*first].status;
                    for &f in frags {
                        prop_assert_eq!(rsps[f].status, st, "one status per packet");
                    }
                    if st == rsp::OKAY && extras.is_empty() {
                        let want = expected_bytes(&reqs, *first, frags);
                        prop_assert!(want.is_some(), "OKAY for an invalid chain at {}", first);
                        let got = emitted.next();
                        prop_assert!(got.is_some());
                        prop_assert_eq!(&got.unwrap().data, want.as_ref().unwrap());
                        okay_packets += 1;
                    } else if st == rsp::OKAY {
                        // With extras the data slots obey the same rules.
                        let want = expected_bytes(&reqs, *first, frags);
                        prop_assert!(want.is_some());
                        // A multicast extra answers OKAY without a packet (control off
                        // here, so it cannot), else the packet is emitted.
                        let got = emitted.next();
                        prop_assert!(got.is_some());
                        prop_assert_eq!(&got.unwrap().data, want.as_ref().unwrap());
                        okay_packets += 1;
                    } else {
                        prop_assert_eq!(st, rsp::ERROR);
                    }
                }
                prop_assert!(emitted.next().is_none(), "no packet beyond the OKAY ones");
                prop_assert_eq!(okay_packets, pkts.len());
                let faults = h.queue.stats().tx_faults_total() as usize;
                prop_assert_eq!(faults + okay_packets, segments.len());
            }
        }
    }
}
