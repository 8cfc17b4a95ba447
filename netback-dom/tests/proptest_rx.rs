//! Random rx buffers and frames: the engine never panics, answers each buffer it takes in
//! the buffer's own slot, and every frame it reports delivered is in the buffers intact.
#![allow(clippy::unwrap_used)]

mod common;

use common::Harness;
use netback_dom::packet::{Checksum, Gso, GsoKind, Offload, Packet};
use proptest::prelude::*;
use shared_abi::netif::{NetifExtraInfo, NetifRxRequest, extra_type, netrxf, rsp};

fn frame() -> impl Strategy<Value = Packet> {
    let len = prop_oneof![4 => 1usize..2000, 1 => 0usize..70_000];
    let gso = prop_oneof![
        3 => Just(None),
        1 => (1u16..9000).prop_map(|mss| Some(Gso { kind: GsoKind::TcpV4, mss })),
    ];
    (len, gso, any::<u8>()).prop_map(|(len, gso, seed)| Packet {
        data: common::pattern(len, seed),
        offload: Offload {
            checksum: if gso.is_some() {
                Checksum::Partial
            } else {
                Checksum::None
            },
            gso,
        },
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_rx_buffers_and_frames_are_delivered_intact_or_refused(
        buffers in prop::collection::vec(prop_oneof![6 => Just(0u32), 1 => 0u32..8, 1 => Just(99_999u32)], 0..120),
        frames in prop::collection::vec(frame(), 0..40),
    ) {
        let mut h = Harness::new(Harness::default_cfg());
        // 0 stands for "a fresh granted page"; anything else is used as the gref as is.
        let mut grefs = Vec::new();
        for (i, b) in buffers.iter().enumerate() {
            let g = if *b == 0 { 1000 + i as u32 } else { *b };
            if *b == 0 {
                h.grants.grant(g, false);
            }
            h.rx_front.push_request(&NetifRxRequest { id: i as u16, pad: 0, gref: g }).unwrap();
            grefs.push(g);
        }
        h.rx_front.push_requests_and_check_notify();
        for f in &frames {
            h.queue.enqueue_rx(f.clone());
        }

        loop {
            let s = h.run_rx().unwrap();
            if !s.more {
                break;
            }
        }

        let rsps = h.rx_responses();
        prop_assert_eq!(rsps.len() as u64, h.queue.stats().rx_slots);
        prop_assert!(rsps.len() <= buffers.len());
        // Walk the responses as netfront would and compare delivered frames with the input.
        let delivered: Vec<&Packet> = frames
            .iter()
            .filter(|f| !f.data.is_empty() && f.data.len() <= 0xFFFF)
            .collect();
        let mut i = 0;
        let mut k = 0;
        while i < rsps.len() {
            let r = rsps[i];
            if r.status < 0 {
                prop_assert_eq!(r.status, rsp::ERROR);
                prop_assert_eq!(r.flags, 0);
                i += 1;
                continue;
            }
            // A good frame: data slots plus an optional extra after the first.
            let mut got = h.grants.page(grefs[i]).unwrap()[..r.status as usize].to_vec();
            let mut more = r.flags & netrxf::MORE_DATA != 0;
            let has_extra = r.flags & netrxf::EXTRA_INFO != 0;
            i += 1;
            if has_extra {
                let e = NetifExtraInfo::from_rx_slot(&rsps[i]);
                prop_assert_eq!(e.kind, extra_type::GSO);
                i += 1;
            }
            while more {
                let r = rsps[i];
                prop_assert!(r.status >= 0);
                got.extend_from_slice(&h.grants.page(grefs[i]).unwrap()[..r.status as usize]);
                more = r.flags & netrxf::MORE_DATA != 0;
                i += 1;
            }
            // It is one of the deliverable frames, in order.
            while k < delivered.len() && delivered[k].data != got {
                k += 1;
            }
            prop_assert!(k < delivered.len(), "delivered bytes match no input frame in order");
            k += 1;
        }
    }
}
