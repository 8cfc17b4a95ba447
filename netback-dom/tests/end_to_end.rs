//! Two frontends joined by the switch: a frame sent on one vif's tx ring arrives in a buffer
//! posted on the other's rx ring; a spoofed frame is answered DROPPED and goes nowhere.
#![allow(clippy::unwrap_used)]

mod common;

use common::Harness;
use netback_dom::packet::MacAddr;
use netback_dom::switch::{DropReason, PortKind, Switch, SwitchConfig, VifPolicy};
use shared_abi::netif::{NetifTxRequest, netrxf, nettxf, rsp};

fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
    let mut f = common::pattern(len, 9);
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&0x88B5u16.to_be_bytes());
    f
}

#[test]
fn frame_from_vif_a_reaches_vif_b_through_the_switch() {
    let mac_a = MacAddr([0, 0x16, 0x3e, 0, 0, 0xa]);
    let mac_b = MacAddr([0, 0x16, 0x3e, 0, 0, 0xb]);
    let mut sw = Switch::new(SwitchConfig::default());
    let pa = sw
        .add_port(PortKind::Vif(VifPolicy {
            mac: mac_a,
            ipv4: None,
            ipv6: None,
            rate: None,
        }))
        .unwrap();
    let pb = sw
        .add_port(PortKind::Vif(VifPolicy {
            mac: mac_b,
            ipv4: None,
            ipv6: None,
            rate: None,
        }))
        .unwrap();
    // Jumbo frames on this link: a 5000-byte non-GSO frame is within A's MTU.
    let mut cfg_a = Harness::default_cfg();
    cfg_a.mtu = 9000;
    let mut a = Harness::new(cfg_a);
    let mut b = Harness::new(Harness::default_cfg());
    let b_bufs = b.post_rx(4);

    let good = frame(mac_b, mac_a, 5000);
    let spoofed = frame(mac_b, MacAddr([0, 0x16, 0x3e, 0, 0, 0xc]), 100);
    let g0 = a.grant_data(&good[..3000], 1000);
    let g1 = a.grant_data(&good[3000..], 0);
    let g2 = a.grant_data(&spoofed, 0);
    a.push_tx(&[
        NetifTxRequest {
            gref: g0,
            offset: 1000,
            flags: nettxf::MORE_DATA | nettxf::DATA_VALIDATED,
            id: 1,
            size: 5000,
        },
        NetifTxRequest {
            gref: g1,
            offset: 0,
            flags: 0,
            id: 2,
            size: 2000,
        },
        NetifTxRequest {
            gref: g2,
            offset: 0,
            flags: 0,
            id: 3,
            size: 100,
        },
    ]);

    // A's tx pass feeds the switch; frames for B go to B's backlog.
    let mut out = Vec::new();
    let mut to_b = Vec::new();
    a.queue
        .process_tx(&mut a.grants, &mut a.notify, |pkt| {
            match sw.forward(pa, &pkt.data, 0, &mut out) {
                Ok(()) => {
                    if out.contains(&pb) {
                        to_b.push(pkt);
                    }
                    true
                }
                Err(_) => false,
            }
        })
        .unwrap();
    for p in to_b {
        assert!(b.queue.enqueue_rx(p));
    }
    b.run_rx().unwrap();

    let tx: Vec<(u16, i16)> = a.tx_responses().iter().map(|r| (r.id, r.status)).collect();
    assert_eq!(tx, [(1, rsp::OKAY), (2, rsp::OKAY), (3, rsp::DROPPED)]);
    assert_eq!(sw.counters(pa).unwrap().drops(DropReason::SpoofedMac), 1);
    let rx = b.rx_responses();
    assert_eq!(rx.len(), 2);
    assert_eq!(
        rx[0].flags,
        netrxf::DATA_VALIDATED | netrxf::MORE_DATA,
        "checksum state crosses the switch"
    );
    let mut got = Vec::new();
    for (g, r) in b_bufs.iter().zip(&rx) {
        got.extend_from_slice(&b.grants.page(*g).unwrap()[..r.status as usize]);
    }
    assert_eq!(got, good);
    assert_eq!(b.queue.stats().rx_packets, 1);
}
