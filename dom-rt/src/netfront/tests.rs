//! netfront against the real netback engine (`netback_dom`, driven by [`super::fake`]) and
//! against a backend the test plays by hand (bad keys, hostile responses, extra-info
//! slots).

#![allow(clippy::unwrap_used)]

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use netback_dom::packet::{Checksum, Packet};
use shared_abi::netif::{
    GsoInfo, HashInfo, NetifExtraInfo, NetifRxRequest, NetifRxResponse, NetifTxRequest,
    NetifTxResponse, XEN_NETIF_EXTRA_FLAG_MORE, gso_type, netrxf, nettxf, rsp,
};
use shared_abi::ring::{BackRing, header};
use shared_abi::xenbus::MemStore;

use super::fake::{Backend, Backends, NetEvents, backends_peer};
use super::*;
use crate::blkfront::fake::{FakeGrants, FakeStore, FakeXen, Peer, SharedXen};

const FE: &str = "/local/domain/7/device/vif/0";
const BE: &str = "/local/domain/1/backend/vif/7/0";
const BE2: &str = "/local/domain/2/backend/vif/7/0";
const MAC: &str = "00:16:3e:00:07:00";

type Front = Netfront<FakeGrants, NetEvents>;

/// What the toolstack writes for a vif served by `backend_id` at `be`.
fn toolstack(s: &mut MemStore, be: &str, backend_id: u16) {
    s.set(&format!("{FE}/backend"), be);
    s.set(&format!("{FE}/backend-id"), &format!("{backend_id}"));
    s.set(&format!("{FE}/state"), "1");
    s.set(&format!("{FE}/handle"), "0");
    s.set(&format!("{FE}/mac"), MAC);
    s.set(&format!("{be}/frontend"), FE);
    s.set(&format!("{be}/frontend-id"), "7");
    s.set(&format!("{be}/state"), "1");
    s.set(&format!("{be}/mac"), "00:16:3e:00:00:01");
    s.set(&format!("{be}/online"), "1");
}

struct World {
    xen: SharedXen,
    store: Rc<RefCell<MemStore>>,
    backends: Backends,
    peer: Peer,
}

impl World {
    /// One engine backend (domain 1), adjusted by `setup`.
    fn new(setup: impl FnOnce(&mut Backend)) -> World {
        let xen: SharedXen = Rc::new(RefCell::new(FakeXen::new()));
        let store = Rc::new(RefCell::new(MemStore::default()));
        toolstack(&mut store.borrow_mut(), BE, 1);
        let mut b = Backend::new(xen.clone(), store.clone(), 1, 7, BE, FE);
        setup(&mut b);
        let backends: Backends = Rc::new(RefCell::new(vec![b]));
        let peer = backends_peer(backends.clone());
        World {
            xen,
            store,
            backends,
            peer,
        }
    }

    fn fs(&self) -> FakeStore {
        FakeStore::new(self.store.clone(), self.peer.clone())
    }

    fn connect(&self, cfg: NetConfig) -> Result<Front, NetError> {
        let mut fs = self.fs();
        Netfront::connect(
            FakeGrants::new(self.xen.clone(), 7),
            NetEvents::new(self.xen.clone(), self.peer.clone()),
            &mut fs,
            FE,
            cfg,
        )
    }

    fn round(&self) {
        for b in self.backends.borrow_mut().iter_mut() {
            b.round();
        }
    }

    fn be(&self, i: usize) -> core::cell::RefMut<'_, Backend> {
        core::cell::RefMut::map(self.backends.borrow_mut(), |v| &mut v[i])
    }

    fn get(&self, key: &str) -> Option<String> {
        self.store.borrow().get(key).map(String::from)
    }
}

/// A frame of `len` bytes: to our MAC, EtherType 0x88B5, a recognisable pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    f[0..6].copy_from_slice(&[0, 0x16, 0x3e, 0, 7, 0]);
    f[6..12].copy_from_slice(&[0, 0x16, 0x3e, 0, 0, 9]);
    f[12..14].copy_from_slice(&[0x88, 0xB5]);
    f
}

/// An IPv4/UDP frame of flow `port`.
fn udp_frame(port: u16, seq: u8) -> Vec<u8> {
    let mut f = frame(80, seq);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 0, 0, 7]);
    f[30..34].copy_from_slice(&[10, 0, 0, 1]);
    f[34..36].copy_from_slice(&port.to_be_bytes());
    f[36..38].copy_from_slice(&53u16.to_be_bytes());
    f[42] = seq;
    // Not a fragment (the pattern would say otherwise): the ports count in flow hashes.
    f[20..22].copy_from_slice(&[0, 0]);
    f
}

fn recv_all(f: &mut Front) -> Vec<RxFrame> {
    f.poll().unwrap();
    let mut v = Vec::new();
    while let Some(r) = f.recv() {
        v.push(r);
    }
    v
}

#[test]
fn handshake_writes_linux_keys_and_connects_to_the_engine() {
    let w = World::new(|_| {});
    let f = w.connect(NetConfig::default()).unwrap();
    for (k, v) in [
        ("state", "4"),
        ("request-rx-copy", "1"),
        ("feature-rx-notify", "1"),
        ("feature-sg", "1"),
        ("feature-gso-tcpv4", "0"),
        ("feature-gso-tcpv6", "0"),
        ("feature-no-csum-offload", "1"),
        ("feature-ipv6-csum-offload", "0"),
    ] {
        assert_eq!(w.get(&format!("{FE}/{k}")).as_deref(), Some(v), "{k}");
    }
    for k in [
        "tx-ring-ref",
        "rx-ring-ref",
        "event-channel-tx",
        "event-channel-rx",
    ] {
        assert!(w.get(&format!("{FE}/{k}")).is_some(), "{k}");
    }
    for k in [
        "event-channel",
        "multi-queue-num-queues",
        "queue-0/tx-ring-ref",
    ] {
        assert_eq!(w.get(&format!("{FE}/{k}")), None, "{k}");
    }
    assert_eq!(w.get(&format!("{BE}/state")).as_deref(), Some("4"));
    assert!(w.be(0).connected());
    assert_eq!(f.mac(), [0, 0x16, 0x3e, 0, 7, 0]);
    let i = f.info();
    assert_eq!((i.backend_id, i.devid, i.queues), (1, 0, 1));
    assert!(i.split_event_channels && i.tx_sg && i.rx_sg && !i.csum_offload);
    assert_eq!(f.ports().len(), 2);
    // Two ring pages and the 64 posted rx buffers are granted, all to the backend.
    assert_eq!(w.xen.borrow().live_grants(7), 66);
    assert_eq!(w.xen.borrow().grants_to(1), 66);
    assert!(f.broken().is_none());
}

#[test]
fn single_event_channel_and_checksum_offload_keys() {
    let w = World::new(|b| b.features.split_event_channels = false);
    let cfg = NetConfig {
        csum_offload: true,
        rx_buffers: 10,
        ..NetConfig::default()
    };
    let f = w.connect(cfg).unwrap();
    assert!(w.get(&format!("{FE}/event-channel")).is_some());
    assert_eq!(w.get(&format!("{FE}/event-channel-tx")), None);
    assert_eq!(
        w.get(&format!("{FE}/feature-no-csum-offload")).as_deref(),
        Some("0")
    );
    assert_eq!(
        w.get(&format!("{FE}/feature-ipv6-csum-offload")).as_deref(),
        Some("1")
    );
    assert_eq!(f.ports().len(), 1);
    assert_eq!(w.xen.borrow().live_grants(7), 12);
    assert!(w.be(0).connected());
}

/// A backend that only does the handshake: `probe` keys at InitWait, Connected once the
/// frontend is.
fn handshake_peer(store: Rc<RefCell<MemStore>>, probe: Vec<(&'static str, &'static str)>) -> Peer {
    let p: Peer = Rc::new(RefCell::new(move || {
        let mut s = store.borrow_mut();
        let be_state = s.get(&format!("{BE}/state")).map(String::from);
        let fe_state = s.get(&format!("{FE}/state")).map(String::from);
        if be_state.as_deref() == Some("1") {
            for (k, v) in &probe {
                s.set(&format!("{BE}/{k}"), v);
            }
            s.set(&format!("{BE}/state"), "2");
        } else if be_state.as_deref() == Some("2") && fe_state.as_deref() == Some("4") {
            s.set(&format!("{BE}/state"), "4");
        }
    }));
    p
}

fn default_probe() -> Vec<(&'static str, &'static str)> {
    Vec::from([
        ("feature-rx-copy", "1"),
        ("feature-sg", "1"),
        ("feature-gso-tcpv4", "1"),
        ("feature-split-event-channels", "0"),
        ("multi-queue-max-queues", "1"),
    ])
}

struct Hand {
    xen: SharedXen,
    store: Rc<RefCell<MemStore>>,
}

fn connect_by_hand(
    probe: Vec<(&'static str, &'static str)>,
    cfg: NetConfig,
    edit: impl FnOnce(&mut MemStore),
) -> (Hand, Result<Front, NetError>) {
    let xen: SharedXen = Rc::new(RefCell::new(FakeXen::new()));
    let store = Rc::new(RefCell::new(MemStore::default()));
    toolstack(&mut store.borrow_mut(), BE, 1);
    edit(&mut store.borrow_mut());
    let peer = handshake_peer(store.clone(), probe);
    let mut fs = FakeStore::new(store.clone(), peer.clone());
    let f = Netfront::connect(
        FakeGrants::new(xen.clone(), 7),
        NetEvents::new(xen.clone(), peer),
        &mut fs,
        FE,
        cfg,
    );
    (Hand { xen, store }, f)
}

#[test]
fn malformed_backend_and_toolstack_keys_fail_the_handshake_naming_the_key() {
    for (k, v) in [
        ("feature-rx-copy", "0"),
        ("feature-rx-copy", "yes"),
        ("multi-queue-max-queues", "0"),
        ("multi-queue-max-queues", "01"),
        ("multi-queue-max-queues", "x"),
        ("feature-sg", "2"),
        ("feature-split-event-channels", "true"),
        ("feature-gso-tcpv4", "-1"),
        ("feature-ipv6-csum-offload", " 1"),
    ] {
        let mut probe = default_probe();
        probe.retain(|(pk, _)| *pk != k);
        probe.push((k, v));
        let (h, f) = connect_by_hand(probe, NetConfig::default(), |_| {});
        assert!(matches!(f, Err(NetError::Xenbus(_))), "{k}={v}: {f:?}");
        let st = h.store.borrow();
        assert_eq!(st.get(&format!("{FE}/state")), Some("5"), "{k}={v}");
        let err = st.get(&format!("error{FE}/error")).unwrap_or("");
        assert!(err.contains(k), "{k}={v}: {err}");
        // Nothing stays granted or bound.
        assert_eq!(h.xen.borrow().live_grants(7), 0, "{k}={v}");
    }
    // feature-rx-copy is required.
    let mut probe = default_probe();
    probe.retain(|(pk, _)| *pk != "feature-rx-copy");
    let (_, f) = connect_by_hand(probe, NetConfig::default(), |_| {});
    let Err(NetError::Xenbus(e)) = f else {
        panic!("{f:?}")
    };
    assert!(format!("{e}").contains("feature-rx-copy"));
    // The toolstack's mac must be a unicast address.
    for mac in [
        "00:16:3e:00:07",
        "01:00:5e:00:00:01",
        "00:00:00:00:00:00",
        "0:16:3e:0:7:0",
    ] {
        let (h, f) = connect_by_hand(default_probe(), NetConfig::default(), |s| {
            s.set(&format!("{FE}/mac"), mac)
        });
        let Err(NetError::Xenbus(e)) = f else {
            panic!("{mac}: {f:?}")
        };
        assert!(format!("{e}").contains(&format!("{FE}/mac")), "{mac}: {e}");
        let st = h.store.borrow();
        assert!(st.get(&format!("error{FE}/error")).is_some());
    }
    let (_, f) = connect_by_hand(default_probe(), NetConfig::default(), |s| {
        s.nodes.remove(&format!("{FE}/mac"));
    });
    assert!(matches!(
        f,
        Err(NetError::Xenbus(
            shared_abi::xenbus::XenbusError::Missing { .. }
        ))
    ));
}

#[test]
fn a_silent_backend_times_out() {
    let xen: SharedXen = Rc::new(RefCell::new(FakeXen::new()));
    let store = Rc::new(RefCell::new(MemStore::default()));
    toolstack(&mut store.borrow_mut(), BE, 1);
    let peer = crate::blkfront::fake::idle_peer();
    let mut fs = FakeStore::new(store, peer.clone());
    let cfg = NetConfig {
        wait_rounds: 5,
        ..NetConfig::default()
    };
    let r = Netfront::connect(
        FakeGrants::new(xen.clone(), 7),
        NetEvents::new(xen, peer),
        &mut fs,
        FE,
        cfg,
    );
    assert_eq!(
        r.err(),
        Some(NetError::Timeout {
            waiting_for: "InitWait"
        })
    );
}

#[test]
fn frames_cross_both_ways_through_the_engine() {
    let w = World::new(|_| {});
    let mut f = w.connect(NetConfig::default()).unwrap();
    let small = frame(60, 1);
    let full = frame(1514, 2);
    f.send(&small).unwrap();
    f.send(&full).unwrap();
    w.round();
    {
        let b = w.be(0);
        let got: Vec<&[u8]> = b.received.iter().map(|p| p.data.as_slice()).collect();
        assert_eq!(got, [small.as_slice(), full.as_slice()]);
    }
    f.poll().unwrap();
    // Every tx grant ended once answered: only the rings and the rx buffers stay.
    assert_eq!(w.xen.borrow().live_grants(7), 66);
    {
        let mut b = w.be(0);
        b.to_front.push_back(Packet::new(frame(60, 3)));
        let mut p = Packet::new(frame(1514, 4));
        p.offload.checksum = Checksum::Validated;
        b.to_front.push_back(p);
    }
    w.round();
    let got = recv_all(&mut f);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].data, frame(60, 3));
    assert!(!got[0].data_validated && !got[0].csum_blank);
    assert_eq!(got[1].data, frame(1514, 4));
    assert!(got[1].data_validated && !got[1].csum_blank);
    let s = f.stats();
    assert_eq!((s.tx_packets, s.tx_bytes), (2, 60 + 1514));
    assert_eq!((s.rx_packets, s.rx_bytes), (2, 60 + 1514));
    assert_eq!(
        (s.tx_errors, s.tx_dropped, s.rx_errors, s.rx_dropped),
        (0, 0, 0, 0)
    );
    // The rx ring was refilled.
    assert_eq!(w.xen.borrow().live_grants(7), 66);
}

#[test]
fn frames_larger_than_a_page_use_several_slots_each_way() {
    let w = World::new(|b| b.mtu = 9000);
    let mut f = w.connect(NetConfig::default()).unwrap();
    let a = frame(9000, 5);
    let b = frame(4097, 6);
    f.send(&a).unwrap();
    f.send(&b).unwrap();
    w.round();
    {
        let be = w.be(0);
        assert_eq!(be.received.len(), 2);
        assert_eq!(be.received[0].data, a);
        assert_eq!(be.received[1].data, b);
        let q = be.vif.as_ref().unwrap().queue(0).unwrap();
        assert_eq!(q.stats().tx_slots, 3 + 2);
    }
    f.poll().unwrap();
    assert_eq!(w.xen.borrow().live_grants(7), 66);
    // Rx: 20000 bytes (5 slots, more_data), then 9000, then a small one.
    let sizes = [20_000usize, 9000, 60, 65_535];
    {
        let mut be = w.be(0);
        for (i, &n) in sizes.iter().enumerate() {
            be.to_front.push_back(Packet::new(frame(n, 10 + i as u8)));
        }
    }
    w.round();
    let got = recv_all(&mut f);
    assert_eq!(got.len(), sizes.len());
    for (i, (g, &n)) in got.iter().zip(&sizes).enumerate() {
        assert_eq!(g.data, frame(n, 10 + i as u8), "frame {i}");
    }
    assert_eq!(f.stats().rx_errors, 0);
}

#[test]
fn without_sg_frames_stay_within_a_page() {
    let w = World::new(|b| b.mtu = 9000);
    let cfg = NetConfig {
        sg: false,
        ..NetConfig::default()
    };
    let mut f = w.connect(cfg).unwrap();
    assert_eq!(w.get(&format!("{FE}/feature-sg")).as_deref(), Some("0"));
    assert_eq!(
        f.send(&frame(4097, 0)),
        Err(NetError::BadFrame { len: 4097 })
    );
    f.send(&frame(4096, 0)).unwrap();
    w.round();
    assert_eq!(w.be(0).received[0].data, frame(4096, 0));
}

#[test]
fn bad_frame_sizes_are_refused_before_the_ring() {
    let w = World::new(|_| {});
    let mut f = w.connect(NetConfig::default()).unwrap();
    assert_eq!(f.send(&[0; 13]), Err(NetError::BadFrame { len: 13 }));
    assert_eq!(f.send(&[]), Err(NetError::BadFrame { len: 0 }));
    assert_eq!(
        f.send(&vec![0; 65_536]),
        Err(NetError::BadFrame { len: 65_536 })
    );
    assert_eq!(f.stats().tx_packets, 0);
    // The engine refuses a frame over its MTU: counted as an error, the device lives.
    f.send(&frame(2000, 0)).unwrap();
    w.round();
    f.poll().unwrap();
    assert_eq!(f.stats().tx_errors, 1);
    assert!(w.be(0).received.is_empty());
}

#[test]
fn thousands_of_frames_wrap_both_rings() {
    let w = World::new(|_| {});
    let mut f = w.connect(NetConfig::default()).unwrap();
    let frames: Vec<Vec<u8>> = (0..3000)
        .map(|i| frame(60 + (i * 37) % 1455, i as u8))
        .collect();
    let mut busy = 0;
    for (i, fr) in frames.iter().enumerate() {
        loop {
            match f.send(fr) {
                Ok(()) => break,
                Err(NetError::Busy) => {
                    busy += 1;
                    w.round();
                }
                Err(e) => panic!("{e}"),
            }
        }
        if i % 97 == 0 {
            w.round();
        }
    }
    // The engine takes at most 64 frames per pass.
    for _ in 0..5 {
        w.round();
    }
    assert!(busy > 0, "the ring filled up at least once");
    {
        let b = w.be(0);
        assert_eq!(b.received.len(), frames.len());
        for (i, (p, fr)) in b.received.iter().zip(&frames).enumerate() {
            assert_eq!(&p.data, fr, "frame {i}");
        }
    }
    let mut got = Vec::new();
    for chunk in frames.chunks(100) {
        w.be(0)
            .to_front
            .extend(chunk.iter().map(|d| Packet::new(d.clone())));
        for _ in 0..4 {
            w.round();
            got.extend(recv_all(&mut f));
        }
    }
    assert_eq!(got.len(), frames.len());
    for (i, (g, fr)) in got.iter().zip(&frames).enumerate() {
        assert_eq!(&g.data, fr, "frame {i}");
    }
    f.poll().unwrap();
    let s = f.stats();
    assert_eq!((s.tx_packets, s.rx_packets), (3000, 3000));
    assert_eq!(w.xen.borrow().live_grants(7), 66);
}

#[test]
fn multi_queue_uses_per_queue_keys_and_spreads_flows() {
    let w = World::new(|_| {});
    let cfg = NetConfig {
        queues: 8,
        ..NetConfig::default()
    };
    let mut f = w.connect(cfg).unwrap();
    // The backend offers 4.
    assert_eq!(f.info().queues, 4);
    assert_eq!(
        w.get(&format!("{FE}/multi-queue-num-queues")).as_deref(),
        Some("4")
    );
    for q in 0..4 {
        for k in [
            "tx-ring-ref",
            "rx-ring-ref",
            "event-channel-tx",
            "event-channel-rx",
        ] {
            assert!(w.get(&format!("{FE}/queue-{q}/{k}")).is_some(), "{q} {k}");
        }
    }
    assert_eq!(w.get(&format!("{FE}/tx-ring-ref")), None);
    assert_eq!(f.ports().len(), 8);
    let sent: Vec<Vec<u8>> = (0..64u16).map(|p| udp_frame(1000 + p, p as u8)).collect();
    for s in &sent {
        f.send(s).unwrap();
    }
    w.round();
    {
        let b = w.be(0);
        let mut got: Vec<Vec<u8>> = b.received.iter().map(|p| p.data.clone()).collect();
        let mut want = sent.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let vif = b.vif.as_ref().unwrap();
        let used = (0..4)
            .filter(|&i| vif.queue(i).unwrap().stats().tx_packets > 0)
            .count();
        assert!(used >= 2, "flows spread over queues ({used})");
    }
    w.be(0)
        .to_front
        .extend(sent.iter().map(|d| Packet::new(d.clone())));
    w.round();
    let mut got: Vec<Vec<u8>> = recv_all(&mut f).into_iter().map(|r| r.data).collect();
    let mut want = sent.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    {
        let b = w.be(0);
        let vif = b.vif.as_ref().unwrap();
        let used = (0..4)
            .filter(|&i| vif.queue(i).unwrap().stats().rx_packets > 0)
            .count();
        assert!(used >= 2, "rx over several queues ({used})");
    }
}

#[test]
fn wait_event_returns_at_the_deadline_or_when_the_backend_signals() {
    let w = World::new(|_| {});
    let mut f = w.connect(NetConfig::default()).unwrap();
    let now = f.events_mut().now;
    f.wait_event(Some(now + 5_000_000));
    assert!(f.events_mut().now >= now + 5_000_000);
    assert!(f.stats().waits >= 5);
    // A frame for us: the backend's round (run while we wait) posts it and signals.
    w.be(0).to_front.push_back(Packet::new(frame(100, 7)));
    let before = f.stats().waits;
    f.wait_event(None);
    assert!(f.stats().waits > before);
    assert_eq!(f.recv().map(|r| r.data), Some(frame(100, 7)));
    // Nothing pending and a deadline in the past: returns at once.
    let waits = f.stats().waits;
    f.wait_event(Some(0));
    assert_eq!(f.stats().waits, waits);
}

#[test]
fn a_restarted_backend_gets_the_device_again_and_traffic_resumes() {
    let w = World::new(|_| {});
    let mut f = w.connect(NetConfig::default()).unwrap();
    f.send(&frame(100, 1)).unwrap();
    w.round();
    f.poll().unwrap();
    assert!(!f.follow_backend(&mut w.fs()).unwrap(), "nothing changed");
    // Two frames the old backend never answers, then it dies.
    f.send(&frame(100, 2)).unwrap();
    f.send(&frame(100, 3)).unwrap();
    w.be(0).kill();
    // Caught between the toolstack's two keys: not yet.
    w.store.borrow_mut().set(&format!("{FE}/backend"), BE2);
    assert!(!f.follow_backend(&mut w.fs()).unwrap(), "half re-pointed");
    {
        let mut s = w.store.borrow_mut();
        toolstack(&mut s, BE2, 2);
    }
    let b2 = Backend::new(w.xen.clone(), w.store.clone(), 2, 7, BE2, FE);
    w.backends.borrow_mut().push(b2);
    assert!(f.follow_backend(&mut w.fs()).unwrap());
    assert_eq!(f.info().backend_id, 2);
    assert_eq!(w.get(&format!("{FE}/state")).as_deref(), Some("4"));
    assert_eq!(w.get(&format!("{BE2}/state")).as_deref(), Some("4"));
    // Nothing is granted to the dead backend any more.
    assert_eq!(w.xen.borrow().grants_to(1), 0);
    assert_eq!(w.xen.borrow().live_grants(7), 66);
    let s = f.stats();
    assert_eq!((s.reconnects, s.tx_dropped), (1, 2));
    // Traffic resumes both ways.
    f.send(&frame(200, 4)).unwrap();
    w.be(1).to_front.push_back(Packet::new(frame(300, 5)));
    w.round();
    assert_eq!(w.be(1).received[0].data, frame(200, 4));
    let got = recv_all(&mut f);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, frame(300, 5));
}

#[test]
fn a_backend_offering_the_device_again_is_followed() {
    let w = World::new(|_| {});
    let mut f = w.connect(NetConfig::default()).unwrap();
    // Same domain, new generation: the backend is back in InitWait.
    w.be(0).kill();
    {
        let mut s = w.store.borrow_mut();
        s.set(&format!("{FE}/state"), "1");
        s.set(&format!("{BE}/state"), "1");
    }
    let b = Backend::new(w.xen.clone(), w.store.clone(), 1, 7, BE, FE);
    w.backends.borrow_mut()[0] = b;
    w.round();
    assert_eq!(w.get(&format!("{BE}/state")).as_deref(), Some("2"));
    assert!(f.follow_backend(&mut w.fs()).unwrap());
    assert_eq!(f.stats().reconnects, 1);
    f.send(&frame(64, 1)).unwrap();
    w.round();
    assert_eq!(w.be(0).received.len(), 1);
}

#[test]
fn a_failed_reconnect_leaves_the_device_lost() {
    let w = World::new(|_| {});
    let mut f = w
        .connect(NetConfig {
            wait_rounds: 3,
            ..NetConfig::default()
        })
        .unwrap();
    w.be(0).kill();
    {
        let mut s = w.store.borrow_mut();
        s.set(&format!("{FE}/backend"), BE2);
        s.set(&format!("{FE}/backend-id"), "2");
    }
    assert_eq!(
        f.follow_backend(&mut w.fs()),
        Err(NetError::Timeout {
            waiting_for: "InitWait"
        })
    );
    assert_eq!(f.broken(), Some(Broken::Lost));
    assert_eq!(f.send(&frame(60, 0)), Err(NetError::Broken(Broken::Lost)));
}

#[test]
fn close_ends_every_grant_and_the_backend_closes() {
    let w = World::new(|_| {});
    let mut f = w.connect(NetConfig::default()).unwrap();
    f.send(&frame(60, 0)).unwrap();
    w.round();
    f.poll().unwrap();
    f.close(&mut w.fs()).unwrap();
    assert_eq!(w.get(&format!("{FE}/state")).as_deref(), Some("6"));
    assert_eq!(w.get(&format!("{BE}/state")).as_deref(), Some("6"));
    assert_eq!(w.xen.borrow().live_grants(7), 0);
    assert!(w.be(0).vif.is_none());
}

// ------------------------------------------------------------------ hand-played backend

type TxBack = BackRing<NetifTxRequest, NetifTxResponse>;
type RxBack = BackRing<NetifRxRequest, NetifRxResponse>;

fn hand() -> (Hand, Front, TxBack, RxBack) {
    let (h, f) = connect_by_hand(default_probe(), NetConfig::default(), |_| {});
    let f = f.unwrap();
    let gref = |k: &str| -> u32 {
        h.store
            .borrow()
            .get(&format!("{FE}/{k}"))
            .unwrap()
            .parse()
            .unwrap()
    };
    let tx = h
        .xen
        .borrow_mut()
        .map_ring(1, 7, &[gref("tx-ring-ref")])
        .unwrap();
    let rx = h
        .xen
        .borrow_mut()
        .map_ring(1, 7, &[gref("rx-ring-ref")])
        .unwrap();
    (h, f, BackRing::new(tx).unwrap(), BackRing::new(rx).unwrap())
}

fn answer_tx(b: &mut TxBack, id: u16, status: i16) {
    b.push_response(&NetifTxResponse { id, status }).unwrap();
    b.push_responses_and_check_notify();
}

/// Broken, and stays so without panicking.
fn assert_dead(f: &mut Front) -> Broken {
    let Err(NetError::Broken(why)) = f.poll() else {
        panic!("accepted garbage");
    };
    assert_eq!(f.send(&frame(60, 0)), Err(NetError::Broken(why)));
    assert!(f.recv().is_none());
    f.wait_event(None);
    assert_eq!(f.broken(), Some(why));
    why
}

#[test]
fn a_tx_response_with_an_unknown_id_or_status_breaks_the_device() {
    for case in 0..4 {
        let (h, mut f, mut tx, _rx) = hand();
        f.send(&frame(60, 0)).unwrap();
        let req = tx.get_request().unwrap().unwrap();
        match case {
            0 => answer_tx(&mut tx, req.id + 1, rsp::OKAY),
            1 => answer_tx(&mut tx, req.id, 7),
            2 => answer_tx(&mut tx, req.id, rsp::NULL),
            _ => {
                answer_tx(&mut tx, req.id, rsp::OKAY);
                // A second answer to the same request.
                tx.mem().write_u32(header::RSP_PROD, 2).unwrap();
            }
        }
        let why = assert_dead(&mut f);
        match case {
            0 => assert!(matches!(why, Broken::UnknownId { ring: Ring::Tx, .. })),
            1 | 2 => assert!(matches!(why, Broken::BadStatus { ring: Ring::Tx, .. })),
            _ => assert!(matches!(why, Broken::Ring { ring: Ring::Tx, .. })),
        }
        // The pages the backend was given stay granted (it may still use them).
        assert!(h.xen.borrow().live_grants(7) >= 66, "case {case}");
    }
}

#[test]
fn a_corrupted_response_producer_breaks_the_device() {
    for ring in [Ring::Tx, Ring::Rx] {
        let (_h, mut f, tx, rx) = hand();
        f.send(&frame(60, 0)).unwrap();
        match ring {
            Ring::Tx => tx.mem().write_u32(header::RSP_PROD, 1000).unwrap(),
            Ring::Rx => rx.mem().write_u32(header::RSP_PROD, 1000).unwrap(),
        }
        let why = assert_dead(&mut f);
        assert!(matches!(why, Broken::Ring { ring: r, .. } if r == ring));
    }
}

/// Copy `data` into the rx buffer `gref` at `offset`, as the backend's grant copy would.
fn fill(h: &Hand, gref: u32, offset: usize, data: &[u8]) {
    let page = h.xen.borrow_mut().map(1, 7, gref, true).unwrap();
    assert!(page.write(offset, data));
    h.xen.borrow_mut().unmap(7, gref);
}

fn answer_rx(b: &mut RxBack, r: NetifRxResponse) {
    b.push_response(&r).unwrap();
    b.push_responses_and_check_notify();
}

#[test]
fn bad_rx_responses_break_the_device() {
    for case in 0..3 {
        let (_h, mut f, _tx, mut rx) = hand();
        let req = rx.get_request().unwrap().unwrap();
        let r = match case {
            0 => NetifRxResponse {
                id: req.id + 1,
                offset: 0,
                flags: 0,
                status: 60,
            },
            1 => NetifRxResponse {
                id: req.id,
                offset: 4000,
                flags: 0,
                status: 200,
            },
            _ => NetifRxResponse {
                id: req.id,
                offset: 0,
                flags: 0,
                status: -7,
            },
        };
        answer_rx(&mut rx, r);
        let why = assert_dead(&mut f);
        match case {
            0 => assert!(matches!(why, Broken::UnknownId { ring: Ring::Rx, .. })),
            1 => assert!(matches!(why, Broken::BadOffset { .. })),
            _ => assert!(matches!(
                why,
                Broken::BadStatus {
                    ring: Ring::Rx,
                    status: -7,
                    ..
                }
            )),
        }
    }
}

#[test]
fn rx_extra_info_slots_are_skipped_and_flags_handed_up() {
    let (h, mut f, _tx, mut rx) = hand();
    let reqs: Vec<NetifRxRequest> = (0..10)
        .map(|_| rx.get_request().unwrap().unwrap())
        .collect();
    let data = frame(4096 + 100, 9);
    // Slot 0: first 4096 bytes, with extra-info and more data; slots 1-2: a GSO and a
    // hash extra; slot 3: the last 100 bytes at offset 50.
    fill(&h, reqs[0].gref, 0, &data[..4096]);
    fill(&h, reqs[3].gref, 50, &data[4096..]);
    answer_rx(
        &mut rx,
        NetifRxResponse {
            id: reqs[0].id,
            offset: 0,
            flags: netrxf::DATA_VALIDATED
                | netrxf::CSUM_BLANK
                | netrxf::EXTRA_INFO
                | netrxf::MORE_DATA,
            status: 4096,
        },
    );
    let gso = GsoInfo {
        size: 1448,
        kind: gso_type::TCPV4,
        features: 0,
    };
    answer_rx(
        &mut rx,
        NetifExtraInfo::gso(gso, XEN_NETIF_EXTRA_FLAG_MORE).to_rx_slot(),
    );
    answer_rx(
        &mut rx,
        NetifExtraInfo::hash(HashInfo::default(), 0).to_rx_slot(),
    );
    answer_rx(
        &mut rx,
        NetifRxResponse {
            id: reqs[3].id,
            offset: 50,
            flags: 0,
            status: 100,
        },
    );
    // Slot 4: an error; slot 5 + 6: a frame whose extra-info is of no known type.
    answer_rx(
        &mut rx,
        NetifRxResponse {
            id: reqs[4].id,
            offset: 0,
            flags: 0,
            status: rsp::ERROR,
        },
    );
    fill(&h, reqs[5].gref, 0, &frame(60, 1));
    answer_rx(
        &mut rx,
        NetifRxResponse {
            id: reqs[5].id,
            offset: 0,
            flags: netrxf::EXTRA_INFO,
            status: 60,
        },
    );
    let mut bad = NetifExtraInfo::hash(HashInfo::default(), 0);
    bad.kind = 9;
    answer_rx(&mut rx, bad.to_rx_slot());
    // Slot 7: a plain frame.
    fill(&h, reqs[7].gref, 10, &frame(64, 2));
    answer_rx(
        &mut rx,
        NetifRxResponse {
            id: reqs[7].id,
            offset: 10,
            flags: netrxf::DATA_VALIDATED,
            status: 64,
        },
    );
    let got = recv_all(&mut f);
    assert!(f.broken().is_none());
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].data, data);
    assert!(got[0].data_validated && got[0].csum_blank);
    assert_eq!(got[1].data, frame(64, 2));
    assert!(got[1].data_validated && !got[1].csum_blank);
    let s = f.stats();
    assert_eq!((s.rx_packets, s.rx_errors), (2, 2));
    // Every answered buffer's grant ended and the ring was refilled: 2 rings + 64 posted.
    assert_eq!(h.xen.borrow().live_grants(7), 66);
}

#[test]
fn a_full_tx_ring_is_busy_until_the_backend_answers() {
    let (h, mut f, mut tx, _rx) = hand();
    for i in 0..256 {
        f.send(&frame(60, i as u8)).unwrap();
    }
    assert_eq!(f.send(&frame(60, 0)), Err(NetError::Busy));
    let mut n = 0;
    while let Some(r) = tx.get_request().unwrap() {
        assert_eq!(r.flags & nettxf::MORE_DATA, 0);
        assert_eq!(r.size, 60);
        // Tx pages are granted read-only.
        assert!(h.xen.borrow_mut().map(1, 7, r.gref, true).is_err());
        let status = if n % 3 == 0 { rsp::DROPPED } else { rsp::OKAY };
        tx.push_response(&NetifTxResponse { id: r.id, status })
            .unwrap();
        n += 1;
    }
    tx.push_responses_and_check_notify();
    assert_eq!(n, 256);
    f.send(&frame(60, 0)).unwrap();
    let s = f.stats();
    assert_eq!((s.tx_packets, s.tx_dropped), (257, 86));
    // 2 rings + 64 rx + the one frame in flight.
    assert_eq!(h.xen.borrow().live_grants(7), 67);
}

#[test]
fn multi_queue_with_one_channel_per_queue() {
    let w = World::new(|b| {
        b.features.split_event_channels = false;
        b.features.max_queues = 2;
    });
    let cfg = NetConfig {
        queues: 4,
        ..NetConfig::default()
    };
    let mut f = w.connect(cfg).unwrap();
    assert_eq!(f.info().queues, 2);
    for q in 0..2 {
        assert!(w.get(&format!("{FE}/queue-{q}/event-channel")).is_some());
        assert_eq!(w.get(&format!("{FE}/queue-{q}/event-channel-tx")), None);
    }
    assert_eq!(f.ports().len(), 2);
    let sent: Vec<Vec<u8>> = (0..16u16).map(|p| udp_frame(2000 + p, p as u8)).collect();
    for s in &sent {
        f.send(s).unwrap();
    }
    w.be(0)
        .to_front
        .extend(sent.iter().map(|d| Packet::new(d.clone())));
    w.round();
    assert_eq!(w.be(0).received.len(), 16);
    assert_eq!(recv_all(&mut f).len(), 16);
}

#[test]
fn frames_beyond_the_rx_queue_are_dropped_and_counted() {
    let w = World::new(|_| {});
    let cfg = NetConfig {
        rx_queue: 2,
        ..NetConfig::default()
    };
    let mut f = w.connect(cfg).unwrap();
    w.be(0)
        .to_front
        .extend((0..5).map(|i| Packet::new(frame(60, i))));
    w.round();
    let got = recv_all(&mut f);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].data, frame(60, 0));
    let s = f.stats();
    assert_eq!((s.rx_packets, s.rx_dropped), (2, 3));
    // The buffers were all given back and posted again.
    assert_eq!(w.xen.borrow().live_grants(7), 66);
}

#[test]
fn a_frame_with_too_many_extra_slots_is_dropped() {
    let (h, mut f, _tx, mut rx) = hand();
    let reqs: Vec<NetifRxRequest> = (0..8).map(|_| rx.get_request().unwrap().unwrap()).collect();
    fill(&h, reqs[0].gref, 0, &frame(60, 1));
    answer_rx(
        &mut rx,
        NetifRxResponse {
            id: reqs[0].id,
            offset: 0,
            flags: netrxf::EXTRA_INFO,
            status: 60,
        },
    );
    for _ in 0..6 {
        answer_rx(
            &mut rx,
            NetifExtraInfo::hash(HashInfo::default(), XEN_NETIF_EXTRA_FLAG_MORE).to_rx_slot(),
        );
    }
    answer_rx(
        &mut rx,
        NetifExtraInfo::hash(HashInfo::default(), 0).to_rx_slot(),
    );
    assert!(recv_all(&mut f).is_empty());
    assert!(f.broken().is_none());
    assert_eq!(f.stats().rx_errors, 1);
}
