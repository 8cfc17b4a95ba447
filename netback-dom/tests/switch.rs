//! The L2 switch: learning, ageing, flooding, anti-spoofing, rate limits, the MAC table bound.
#![allow(clippy::unwrap_used)]

use netback_dom::packet::MacAddr;
use netback_dom::switch::{
    DropReason, PortId, PortKind, Switch, SwitchConfig, SwitchError, TokenBucket, VifPolicy,
};

const SEC: u64 = 1_000_000_000;

fn mac(last: u8) -> MacAddr {
    MacAddr([0x00, 0x16, 0x3e, 0, 0, last])
}

fn vif(m: MacAddr) -> PortKind {
    PortKind::Vif(VifPolicy {
        mac: m,
        ipv4: None,
        ipv6: None,
        rate: None,
    })
}

fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

fn ipv4(src: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&[10, 0, 0, 254]);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p
}

fn ipv6(src: [u8; 16], next: u8) -> Vec<u8> {
    let mut p = vec![0u8; 48];
    p[0] = 0x60;
    p[6] = next;
    p[8..24].copy_from_slice(&src);
    p
}

fn arp(sha: MacAddr, spa: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&sha.0);
    p.extend_from_slice(&spa);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&[10, 0, 0, 254]);
    p
}

struct Net {
    sw: Switch,
    a: PortId,
    b: PortId,
    c: PortId,
    up: PortId,
}

fn net() -> Net {
    let mut sw = Switch::new(SwitchConfig::default());
    let a = sw.add_port(vif(mac(1))).unwrap();
    let b = sw.add_port(vif(mac(2))).unwrap();
    let c = sw.add_port(vif(mac(3))).unwrap();
    let up = sw.add_port(PortKind::Uplink).unwrap();
    Net { sw, a, b, c, up }
}

fn fwd(sw: &mut Switch, from: PortId, frame: &[u8], now: u64) -> Result<Vec<PortId>, DropReason> {
    let mut out = Vec::new();
    sw.forward(from, frame, now, &mut out).map(|_| out)
}

#[test]
fn unicast_to_a_vif_mac_goes_only_to_that_vif() {
    let mut n = net();
    let f = eth(mac(2), mac(1), 0x0800, &ipv4([10, 0, 0, 1], 6, 1, 2));

    let out = fwd(&mut n.sw, n.a, &f, 0).unwrap();

    assert_eq!(out, [n.b]);
    let ca = n.sw.counters(n.a).unwrap();
    let cb = n.sw.counters(n.b).unwrap();
    assert_eq!((ca.rx_packets, ca.rx_bytes), (1, f.len() as u64));
    assert_eq!((cb.tx_packets, cb.tx_bytes), (1, f.len() as u64));
}

#[test]
fn unknown_unicast_floods_everywhere_but_the_ingress_then_learns() {
    let mut n = net();
    let x = MacAddr([0x02, 0, 0, 0, 0, 0x99]);

    let out = fwd(&mut n.sw, n.a, &eth(x, mac(1), 0x88B5, &[]), 0).unwrap();
    assert_eq!(out, [n.b, n.c, n.up]);

    // x answers from the uplink: learned there, and the reply goes straight to a.
    let out = fwd(&mut n.sw, n.up, &eth(mac(1), x, 0x88B5, &[]), 1).unwrap();
    assert_eq!(out, [n.a]);
    assert_eq!(n.sw.lookup(x, 1), Some(n.up));
    let out = fwd(&mut n.sw, n.b, &eth(x, mac(2), 0x88B5, &[]), 2).unwrap();
    assert_eq!(out, [n.up]);
}

#[test]
fn broadcast_and_multicast_flood_without_reflection() {
    let mut n = net();
    let bcast = eth(MacAddr::BROADCAST, mac(3), 0x88B5, &[]);
    let mcast = eth(MacAddr([0x01, 0, 0x5e, 0, 0, 1]), mac(3), 0x88B5, &[]);

    assert_eq!(fwd(&mut n.sw, n.c, &bcast, 0).unwrap(), [n.a, n.b, n.up]);
    assert_eq!(fwd(&mut n.sw, n.c, &mcast, 0).unwrap(), [n.a, n.b, n.up]);
}

#[test]
fn frame_to_a_mac_learned_on_the_ingress_port_is_not_reflected() {
    let mut n = net();
    let x = MacAddr([0x02, 0, 0, 0, 0, 0x10]);
    let y = MacAddr([0x02, 0, 0, 0, 0, 0x11]);
    fwd(&mut n.sw, n.up, &eth(y, x, 0x88B5, &[]), 0).unwrap();

    let r = fwd(&mut n.sw, n.up, &eth(x, y, 0x88B5, &[]), 1);

    assert_eq!(r, Err(DropReason::Reflection));
    assert_eq!(
        n.sw.counters(n.up).unwrap().drops(DropReason::Reflection),
        1
    );
}

#[test]
fn learned_entries_age_out_and_pinned_vif_macs_never_do() {
    let mut n = net();
    let x = MacAddr([0x02, 0, 0, 0, 0, 0x20]);
    fwd(&mut n.sw, n.up, &eth(mac(1), x, 0x88B5, &[]), 0).unwrap();
    assert_eq!(n.sw.lookup(x, 299 * SEC), Some(n.up));

    // Stale after the ageing time: unknown again, so flooded.
    assert_eq!(n.sw.lookup(x, 301 * SEC), None);
    let out = fwd(&mut n.sw, n.a, &eth(x, mac(1), 0x88B5, &[]), 301 * SEC).unwrap();
    assert_eq!(out.len(), 3);

    assert_eq!(n.sw.age(301 * SEC), 1);
    assert_eq!(n.sw.mac_table_len(), 3);
    assert_eq!(n.sw.lookup(mac(1), 10_000 * SEC), Some(n.a));
}

#[test]
fn station_moving_ports_is_relearned() {
    let mut sw = Switch::new(SwitchConfig::default());
    let u1 = sw.add_port(PortKind::Uplink).unwrap();
    let u2 = sw.add_port(PortKind::Uplink).unwrap();
    let x = MacAddr([0x02, 0, 0, 0, 0, 0x30]);
    fwd(&mut sw, u1, &eth(MacAddr::BROADCAST, x, 0x88B5, &[]), 0).unwrap();
    fwd(&mut sw, u2, &eth(MacAddr::BROADCAST, x, 0x88B5, &[]), 1).unwrap();
    assert_eq!(sw.lookup(x, 1), Some(u2));
}

#[test]
fn vif_sending_from_a_foreign_mac_is_dropped_and_counted() {
    let mut n = net();
    let f = eth(mac(2), mac(9), 0x0800, &ipv4([10, 0, 0, 1], 6, 1, 2));

    assert_eq!(fwd(&mut n.sw, n.a, &f, 0), Err(DropReason::SpoofedMac));
    assert_eq!(n.sw.counters(n.a).unwrap().drops(DropReason::SpoofedMac), 1);
    assert_eq!(n.sw.lookup(mac(9), 0), None, "a spoofed MAC is not learned");
}

#[test]
fn uplink_claiming_a_vif_mac_is_dropped() {
    let mut n = net();
    let f = eth(MacAddr::BROADCAST, mac(1), 0x88B5, &[]);

    assert_eq!(fwd(&mut n.sw, n.up, &f, 0), Err(DropReason::SpoofedMac));
    assert_eq!(n.sw.lookup(mac(1), 0), Some(n.a));
}

#[test]
fn multicast_or_zero_source_mac_is_dropped_on_any_port() {
    let mut n = net();
    let f = eth(mac(1), MacAddr([0x01, 0, 0, 0, 0, 1]), 0x88B5, &[]);
    assert_eq!(fwd(&mut n.sw, n.up, &f, 0), Err(DropReason::BadSourceMac));
    let f = eth(mac(1), MacAddr([0; 6]), 0x88B5, &[]);
    assert_eq!(fwd(&mut n.sw, n.up, &f, 0), Err(DropReason::BadSourceMac));
}

fn policed(ipv4s: Vec<[u8; 4]>, ipv6s: Vec<[u8; 16]>) -> (Switch, PortId) {
    let mut sw = Switch::new(SwitchConfig::default());
    let p = sw
        .add_port(PortKind::Vif(VifPolicy {
            mac: mac(1),
            ipv4: Some(ipv4s),
            ipv6: Some(ipv6s),
            rate: None,
        }))
        .unwrap();
    sw.add_port(PortKind::Uplink).unwrap();
    (sw, p)
}

#[test]
fn vif_ipv4_source_must_be_one_of_its_addresses() {
    let (mut sw, p) = policed(vec![[10, 0, 0, 1]], vec![]);
    let ok = eth(
        MacAddr::BROADCAST,
        mac(1),
        0x0800,
        &ipv4([10, 0, 0, 1], 6, 1, 2),
    );
    let bad = eth(
        MacAddr::BROADCAST,
        mac(1),
        0x0800,
        &ipv4([10, 0, 0, 9], 6, 1, 2),
    );

    assert!(fwd(&mut sw, p, &ok, 0).is_ok());
    assert_eq!(fwd(&mut sw, p, &bad, 0), Err(DropReason::SpoofedIp));
    assert_eq!(sw.counters(p).unwrap().drops(DropReason::SpoofedIp), 1);
}

#[test]
fn vif_dhcp_discover_from_zero_address_is_allowed_but_other_zero_source_traffic_is_not() {
    let (mut sw, p) = policed(vec![[10, 0, 0, 1]], vec![]);
    let dhcp = eth(
        MacAddr::BROADCAST,
        mac(1),
        0x0800,
        &ipv4([0; 4], 17, 68, 67),
    );
    let other = eth(
        MacAddr::BROADCAST,
        mac(1),
        0x0800,
        &ipv4([0; 4], 17, 68, 53),
    );

    assert!(fwd(&mut sw, p, &dhcp, 0).is_ok());
    assert_eq!(fwd(&mut sw, p, &other, 0), Err(DropReason::SpoofedIp));
}

#[test]
fn vif_ipv6_source_must_be_one_of_its_addresses_except_dad() {
    let mine = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let (mut sw, p) = policed(vec![], vec![mine]);
    let mut other = mine;
    other[15] = 2;

    let ok = eth(MacAddr::BROADCAST, mac(1), 0x86DD, &ipv6(mine, 6));
    let bad = eth(MacAddr::BROADCAST, mac(1), 0x86DD, &ipv6(other, 6));
    let dad = eth(MacAddr::BROADCAST, mac(1), 0x86DD, &ipv6([0; 16], 58));
    let unspecified_tcp = eth(MacAddr::BROADCAST, mac(1), 0x86DD, &ipv6([0; 16], 6));

    assert!(fwd(&mut sw, p, &ok, 0).is_ok());
    assert!(fwd(&mut sw, p, &dad, 0).is_ok());
    assert_eq!(fwd(&mut sw, p, &bad, 0), Err(DropReason::SpoofedIp));
    assert_eq!(
        fwd(&mut sw, p, &unspecified_tcp, 0),
        Err(DropReason::SpoofedIp)
    );
}

#[test]
fn vif_arp_must_name_its_own_mac_and_address() {
    let (mut sw, p) = policed(vec![[10, 0, 0, 1]], vec![]);
    let ok = eth(
        MacAddr::BROADCAST,
        mac(1),
        0x0806,
        &arp(mac(1), [10, 0, 0, 1]),
    );
    let probe = eth(MacAddr::BROADCAST, mac(1), 0x0806, &arp(mac(1), [0; 4]));
    let wrong_ip = eth(
        MacAddr::BROADCAST,
        mac(1),
        0x0806,
        &arp(mac(1), [10, 0, 0, 7]),
    );
    let wrong_mac = eth(
        MacAddr::BROADCAST,
        mac(1),
        0x0806,
        &arp(mac(5), [10, 0, 0, 1]),
    );
    let mut v6_arp = arp(mac(1), [10, 0, 0, 1]);
    v6_arp[2..4].copy_from_slice(&0x86DDu16.to_be_bytes());
    let not_ipv4 = eth(MacAddr::BROADCAST, mac(1), 0x0806, &v6_arp);
    let mut truncated = ok.clone();
    truncated.truncate(14 + 20);

    assert!(fwd(&mut sw, p, &ok, 0).is_ok());
    assert!(fwd(&mut sw, p, &probe, 0).is_ok());
    assert_eq!(fwd(&mut sw, p, &wrong_ip, 0), Err(DropReason::SpoofedArp));
    assert_eq!(fwd(&mut sw, p, &wrong_mac, 0), Err(DropReason::SpoofedArp));
    assert_eq!(fwd(&mut sw, p, &not_ipv4, 0), Err(DropReason::Malformed));
    assert_eq!(fwd(&mut sw, p, &truncated, 0), Err(DropReason::Malformed));
    assert_eq!(sw.counters(p).unwrap().drops(DropReason::SpoofedArp), 2);
}

#[test]
fn vif_tagged_and_truncated_frames_are_refused() {
    let (mut sw, p) = policed(vec![[10, 0, 0, 1]], vec![]);
    let tagged = eth(MacAddr::BROADCAST, mac(1), 0x8100, &[0, 5, 8, 0]);
    let mut runt = eth(MacAddr::BROADCAST, mac(1), 0x0800, &[]);
    runt.truncate(13);
    let mut short_ip = eth(MacAddr::BROADCAST, mac(1), 0x0800, &[]);
    short_ip.truncate(20);

    assert_eq!(fwd(&mut sw, p, &tagged, 0), Err(DropReason::VlanRefused));
    assert_eq!(fwd(&mut sw, p, &runt, 0), Err(DropReason::Malformed));
    assert_eq!(fwd(&mut sw, p, &short_ip, 0), Err(DropReason::Malformed));
}

#[test]
fn vif_rate_limit_drops_over_budget_and_refills_with_time() {
    let mut sw = Switch::new(SwitchConfig::default());
    let p = sw
        .add_port(PortKind::Vif(VifPolicy {
            mac: mac(1),
            ipv4: None,
            ipv6: None,
            rate: Some(TokenBucket::new(600, 180, 0)),
        }))
        .unwrap();
    sw.add_port(PortKind::Uplink).unwrap();
    let f = eth(MacAddr::BROADCAST, mac(1), 0x88B5, &[]); // 60 bytes

    let passed = (0..5).filter(|_| fwd(&mut sw, p, &f, 0).is_ok()).count();
    assert_eq!(passed, 3, "a 180-byte burst holds three 60-byte frames");
    assert_eq!(sw.counters(p).unwrap().drops(DropReason::RateLimited), 2);

    // 600 B/s: after 100 ms, 60 bytes of credit.
    assert!(fwd(&mut sw, p, &f, SEC / 10).is_ok());
    assert_eq!(fwd(&mut sw, p, &f, SEC / 10), Err(DropReason::RateLimited));
}

#[test]
fn token_bucket_keeps_fractional_credit_across_frequent_refills() {
    let mut b = TokenBucket::new(1000, 1000, 0);
    assert!(b.try_take(1000, 0));
    // 1000 B/s = one byte per ms; refill every 100 µs for 10 ms.
    for i in 1..=100u64 {
        b.available(i * 100_000);
    }
    assert_eq!(b.available(10_000_000), 10);
    // A clock going backwards adds nothing.
    assert_eq!(b.available(5_000_000), 10);
}

#[test]
fn xen_rate_string_maps_to_a_bucket_with_a_64k_minimum_burst() {
    let mut b = TokenBucket::from_xen_rate(1000, 20_000, 0).unwrap();
    assert_eq!(b.available(0), 65_536);
    assert!(TokenBucket::from_xen_rate(1, 0, 0).is_none());
}

#[test]
fn mac_flood_from_the_uplink_cannot_grow_the_table_past_its_bound() {
    let cfg = SwitchConfig {
        max_ports: 8,
        mac_capacity: 64,
        per_port_quota: 32,
        ageing_ns: 10 * SEC,
    };
    let mut sw = Switch::new(cfg);
    let a = sw.add_port(vif(mac(1))).unwrap();
    let up = sw.add_port(PortKind::Uplink).unwrap();

    for i in 0..10_000u32 {
        let b = i.to_be_bytes();
        let src = MacAddr([0x02, 0x77, b[0], b[1], b[2], b[3]]);
        fwd(&mut sw, up, &eth(mac(1), src, 0x88B5, &[]), u64::from(i)).unwrap();
    }

    assert!(sw.mac_table_len() <= 1 + 32, "{}", sw.mac_table_len());
    assert!(sw.learn_refused > 9_000);
    // Frames still flow (to the vif, whose MAC is pinned).
    assert_eq!(sw.counters(a).unwrap().tx_packets, 10_000);

    // Once the flood's entries age out, learning works again.
    let late = 100 * SEC;
    let x = MacAddr([0x02, 0, 0, 0, 0, 0x42]);
    fwd(&mut sw, up, &eth(mac(1), x, 0x88B5, &[]), late).unwrap();
    assert_eq!(sw.lookup(x, late), Some(up));
    assert_eq!(sw.mac_table_len(), 2);
}

#[test]
fn port_management_refuses_duplicates_bad_macs_and_overflow() {
    let mut sw = Switch::new(SwitchConfig {
        max_ports: 2,
        ..SwitchConfig::default()
    });
    let a = sw.add_port(vif(mac(1))).unwrap();
    assert_eq!(
        sw.add_port(vif(mac(1))),
        Err(SwitchError::DuplicateMac {
            mac: mac(1),
            owner: a
        })
    );
    assert!(matches!(
        sw.add_port(vif(MacAddr::BROADCAST)),
        Err(SwitchError::BadVifMac { .. })
    ));
    sw.add_port(PortKind::Uplink).unwrap();
    assert_eq!(
        sw.add_port(vif(mac(2))),
        Err(SwitchError::TooManyPorts { max: 2 })
    );

    sw.remove_port(a).unwrap();
    assert_eq!(sw.lookup(mac(1), 0), None);
    assert_eq!(sw.remove_port(a), Err(SwitchError::NoSuchPort(a)));
    // The freed slot is reused, and the MAC is free again.
    assert_eq!(sw.add_port(vif(mac(1))), Ok(a));
}

#[test]
fn egress_drops_are_counted_on_the_egress_port() {
    let mut n = net();
    n.sw.note_egress_drop(n.b);
    assert_eq!(n.sw.counters(n.b).unwrap().drops(DropReason::EgressFull), 1);
    assert_eq!(n.sw.counters(n.b).unwrap().total_drops(), 1);
}
