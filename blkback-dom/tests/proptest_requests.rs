//! Random request slots against the engine: it never panics, answers every request exactly
//! once with its id, writes nothing for a refused request, and leaks no mapping.
#![allow(clippy::unwrap_used)]

mod common;

use blkback_dom::engine::VbdConfig;
use common::*;
use proptest::prelude::*;
use shared_abi::PAGE_SIZE;
use shared_abi::blkif::{BlkifRequestSlot, op, rsp};

const SECTORS: u64 = 64;

/// A slot: mostly plausible fields (known ops, granted refs, sectors near the disk's end),
/// sometimes raw garbage.
fn slot() -> impl Strategy<Value = [u8; 112]> {
    let plausible = (
        prop_oneof![4 => 0u8..=6, 1 => any::<u8>()],
        prop_oneof![4 => 0u8..=12, 1 => any::<u8>()],
        prop_oneof![3 => 0u64..=72, 1 => any::<u64>()],
        proptest::collection::vec((6u32..=26, 0u8..=9, 0u8..=9), 11),
        any::<u8>(),
        prop_oneof![3 => 0u16..=40, 1 => any::<u16>()],
    )
        .prop_map(|(o, nseg, sector, segs, b1, nind)| {
            let mut b = [0u8; 112];
            b[0] = o;
            b[1] = if o == op::INDIRECT { b1 % 2 } else { nseg };
            if o == op::INDIRECT {
                b[2..4].copy_from_slice(&nind.to_le_bytes());
                // Indirect pages among the granted refs.
                for (i, (g, _, _)) in segs.iter().take(8).enumerate() {
                    b[28 + i * 4..32 + i * 4].copy_from_slice(&g.to_le_bytes());
                }
            }
            b[16..24].copy_from_slice(&sector.to_le_bytes());
            if o == op::DISCARD {
                b[1] = b1 & 1;
                b[24..32].copy_from_slice(&u64::from(nseg).to_le_bytes());
            } else if o != op::INDIRECT {
                for (i, (g, f, l)) in segs.iter().enumerate() {
                    let at = 24 + i * 8;
                    b[at..at + 4].copy_from_slice(&g.to_le_bytes());
                    b[at + 4] = *f;
                    b[at + 5] = *l;
                }
            }
            b
        });
    prop_oneof![4 => plausible, 1 => proptest::collection::vec(any::<u8>(), 112)
        .prop_map(|v| { let mut b = [0u8; 112]; b.copy_from_slice(&v); b })]
}

fn run(slots: Vec<[u8; 112]>, persistent: bool) {
    let mut cfg = VbdConfig::new(FRONT);
    cfg.max_indirect_segments = 32;
    cfg.persistent = persistent;
    let mut h = Harness::new(cfg, ram(SECTORS), 1, 0);
    // Refs 8..=24: pages of pattern bytes (which, read as segment arrays, are garbage); every
    // third read-only. 25 and 26 are never granted.
    for i in 0..17u64 {
        let g = h.grant(0, &pattern(PAGE_SIZE, i), i % 3 == 0);
        assert_eq!(u64::from(g), 8 + i);
    }
    for (n, mut raw) in slots.into_iter().enumerate() {
        let id = 0xA000_0000 + n as u64;
        raw[8..16].copy_from_slice(&id.to_le_bytes());
        let before = h.vbd().io().device().bytes().to_vec();
        h.push(0, 0, BlkifRequestSlot(raw));
        h.service(0).unwrap();
        let rs = h.responses(0, 0);
        assert_eq!(rs.len(), 1, "exactly one response for slot {n}");
        assert_eq!(rs[0].id, id);
        assert!([rsp::OKAY, rsp::ERROR, rsp::EOPNOTSUPP].contains(&rs[0].status));
        if rs[0].status != rsp::OKAY {
            assert!(
                h.vbd().io().device().bytes() == &before[..],
                "refused slot {n} changed the disk"
            );
        }
        assert_eq!(
            h.grants.live_mappings(),
            h.vbd().persistent_grants(0),
            "only persistent mappings outlive a request"
        );
    }
    let s = h.vbd().stats().clone();
    assert_eq!(s.okay + s.error + s.eopnotsupp, s.requests);
    let mut g = std::mem::take(&mut h.grants);
    h.vbd_mut().shutdown(&mut g);
    assert_eq!(g.live_mappings(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_slots_get_one_response_each_and_refusals_write_nothing(
        slots in proptest::collection::vec(slot(), 1..24),
        persistent in any::<bool>(),
    ) {
        run(slots, persistent);
    }
}
