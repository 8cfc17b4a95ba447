//! The backend xenbus handshake over an in-memory store.
#![allow(clippy::unwrap_used)]

use netback_dom::packet::MacAddr;
use netback_dom::xenbus::{Action, BackendFeatures, EventChannels, NetbackXenbus};
use shared_abi::xenbus::{
    BackendDir, MemStore, Store, XenbusError, XenbusState, backend_ready_to_probe,
    legal_backend_transition,
};

const BE: &str = "/local/domain/1/backend/vif/5/0";
const FE: &str = "/local/domain/5/device/vif/0";

fn toolstack() -> MemStore {
    let mut s = MemStore::default();
    for (k, v) in [
        ("frontend-id", "5"),
        ("frontend", FE),
        ("mac", "00:16:3e:12:34:56"),
        ("online", "1"),
        ("state", "1"),
    ] {
        s.write(&format!("{BE}/{k}"), v).unwrap();
    }
    s.write(&format!("{FE}/state"), "1").unwrap();
    s
}

fn get(s: &mut MemStore, path: &str) -> Option<String> {
    s.read(path).unwrap()
}

/// What Linux netfront writes for one queue, then state Connected.
fn netfront_connects(s: &mut MemStore) {
    for (k, v) in [
        ("tx-ring-ref", "8"),
        ("rx-ring-ref", "9"),
        ("event-channel", "17"),
        ("request-rx-copy", "1"),
        ("feature-rx-notify", "1"),
        ("feature-sg", "1"),
        ("feature-gso-tcpv4", "1"),
        ("feature-gso-tcpv6", "1"),
        ("feature-ipv6-csum-offload", "1"),
    ] {
        s.write(&format!("{FE}/{k}"), v).unwrap();
    }
    s.write(&format!("{FE}/state"), "4").unwrap();
}

fn probed(s: &mut MemStore) -> NetbackXenbus {
    NetbackXenbus::probe(s, BE, BackendFeatures::default()).unwrap()
}

#[test]
fn probe_advertises_features_and_waits() {
    let mut s = toolstack();

    let dev = probed(&mut s);

    assert_eq!(dev.state(), XenbusState::InitWait);
    assert_eq!(get(&mut s, &format!("{BE}/state")).as_deref(), Some("2"));
    for (k, v) in [
        ("feature-rx-copy", "1"),
        ("feature-rx-flip", "0"),
        ("feature-sg", "1"),
        ("feature-gso-tcpv4", "1"),
        ("feature-gso-tcpv6", "1"),
        ("feature-multicast-control", "1"),
        ("feature-split-event-channels", "1"),
        ("multi-queue-max-queues", "4"),
    ] {
        assert_eq!(get(&mut s, &format!("{BE}/{k}")).as_deref(), Some(v), "{k}");
    }
}

#[test]
fn probe_refuses_a_frontend_path_outside_the_frontend_domain() {
    let mut s = toolstack();
    s.write(&format!("{BE}/frontend"), "/local/domain/6/device/vif/0")
        .unwrap();

    let e = NetbackXenbus::probe(&mut s, BE, BackendFeatures::default()).unwrap_err();

    assert!(
        matches!(&e, XenbusError::Invalid { key, .. } if key == &format!("{BE}/frontend")),
        "{e}"
    );
}

#[test]
fn probe_refuses_missing_or_bad_frontend_id() {
    let mut s = MemStore::default();
    let e = NetbackXenbus::probe(&mut s, BE, BackendFeatures::default()).unwrap_err();
    assert_eq!(
        e,
        XenbusError::Missing {
            key: format!("{BE}/frontend-id")
        }
    );
    for bad in ["x", "-1", "65535", "0x5", " 5", "05"] {
        let mut s = toolstack();
        s.write(&format!("{BE}/frontend-id"), bad).unwrap();
        let e = NetbackXenbus::probe(&mut s, BE, BackendFeatures::default()).unwrap_err();
        assert!(e.to_string().contains("frontend-id"), "{bad}: {e}");
    }
}

#[test]
fn frontend_connected_yields_validated_rings_and_features() {
    let mut s = toolstack();
    let mut dev = probed(&mut s);
    netfront_connects(&mut s);

    let Action::Connect(c) = dev.frontend_changed(&mut s).unwrap() else {
        panic!("expected Connect");
    };

    assert_eq!(c.frontend_id, 5);
    assert_eq!(c.queues.len(), 1);
    assert_eq!(c.queues[0].tx_ring_ref, 8);
    assert_eq!(c.queues[0].rx_ring_ref, 9);
    assert_eq!(c.queues[0].event, EventChannels::Single(17));
    assert!(c.sg && c.gso_tcpv4 && c.gso_tcpv6 && c.csum_ipv4 && c.csum_ipv6);
    assert!(!c.multicast_control);
    assert_eq!(c.mac, MacAddr::parse("00:16:3e:12:34:56").unwrap());
    assert_eq!(c.rate, None);
    assert_eq!(c.ipv4, None);
    // Still InitWait until the caller has mapped the rings.
    assert_eq!(dev.state(), XenbusState::InitWait);

    dev.connected(&mut s).unwrap();

    assert_eq!(get(&mut s, &format!("{BE}/state")).as_deref(), Some("4"));
    // A repeated Connected from the frontend is not a second connect.
    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::None);
}

#[test]
fn multi_queue_split_channels_and_rate_are_read() {
    let mut s = toolstack();
    let mut dev = probed(&mut s);
    netfront_connects(&mut s);
    s.write(&format!("{FE}/multi-queue-num-queues"), "2")
        .unwrap();
    for q in 0..2u32 {
        let d = format!("{FE}/queue-{q}");
        s.write(&format!("{d}/tx-ring-ref"), &(100 + q).to_string())
            .unwrap();
        s.write(&format!("{d}/rx-ring-ref"), &(200 + q).to_string())
            .unwrap();
        s.write(&format!("{d}/event-channel-tx"), &(10 + q).to_string())
            .unwrap();
        s.write(&format!("{d}/event-channel-rx"), &(20 + q).to_string())
            .unwrap();
    }
    s.write(&format!("{BE}/rate"), "125000,20000").unwrap();
    s.write(&format!("{BE}/ip"), "10.0.0.2 10.0.0.3").unwrap();
    s.write(&format!("{FE}/mtu"), "9000").unwrap();

    let Action::Connect(c) = dev.frontend_changed(&mut s).unwrap() else {
        panic!("expected Connect");
    };

    assert_eq!(c.queues.len(), 2);
    assert_eq!(c.queues[1].tx_ring_ref, 101);
    assert_eq!(c.queues[1].event, EventChannels::Split { tx: 11, rx: 21 });
    assert_eq!(c.rate, Some((125_000, 20_000)));
    assert_eq!(c.ipv4, Some(vec![[10, 0, 0, 2], [10, 0, 0, 3]]));
    assert_eq!(c.mtu, Some(9000));
}

/// Apply `edit` to a connecting frontend; the connect must fail naming `key`, with the
/// backend in Closing and the error recorded.
fn assert_connect_fails(edit: impl FnOnce(&mut MemStore), key: &str) {
    let mut s = toolstack();
    let mut dev = probed(&mut s);
    netfront_connects(&mut s);
    edit(&mut s);

    let e = dev.frontend_changed(&mut s).unwrap_err();

    assert!(e.to_string().contains(key), "{key}: {e}");
    assert_eq!(dev.state(), XenbusState::Closing, "{key}");
    assert_eq!(get(&mut s, &format!("{BE}/state")).as_deref(), Some("5"));
    let err_node = format!("error{BE}/error");
    assert_eq!(get(&mut s, &err_node), Some(e.to_string()));
}

fn set(k: &'static str, v: &'static str) -> impl FnOnce(&mut MemStore) {
    move |s| s.write(&format!("{FE}/{k}"), v).unwrap()
}

fn unset(k: &'static str) -> impl FnOnce(&mut MemStore) {
    move |s| {
        s.nodes.remove(&format!("{FE}/{k}"));
    }
}

#[test]
fn every_bad_frontend_value_fails_the_connect_naming_its_key() {
    assert_connect_fails(set("tx-ring-ref", "abc"), "tx-ring-ref");
    assert_connect_fails(set("tx-ring-ref", "1"), "tx-ring-ref");
    assert_connect_fails(set("rx-ring-ref", "4294967296"), "rx-ring-ref");
    assert_connect_fails(unset("rx-ring-ref"), "rx-ring-ref");
    assert_connect_fails(set("event-channel", "0"), "event-channel");
    assert_connect_fails(set("event-channel", "4096"), "event-channel");
    assert_connect_fails(unset("event-channel"), "event-channel");
    assert_connect_fails(set("event-channel-tx", "3"), "event-channel-tx");
    assert_connect_fails(set("multi-queue-num-queues", "0"), "multi-queue-num-queues");
    assert_connect_fails(set("multi-queue-num-queues", "5"), "multi-queue-num-queues");
    assert_connect_fails(set("request-rx-copy", "0"), "request-rx-copy");
    assert_connect_fails(unset("request-rx-copy"), "request-rx-copy");
    assert_connect_fails(unset("feature-rx-notify"), "feature-rx-notify");
    assert_connect_fails(set("feature-sg", "yes"), "feature-sg");
    assert_connect_fails(set("feature-gso-tcpv4", "2"), "feature-gso-tcpv4");
    assert_connect_fails(set("mtu", "20"), "mtu");
    assert_connect_fails(
        |s| s.write(&format!("{BE}/mac"), "01:00:5e:00:00:01").unwrap(),
        "mac",
    );
    assert_connect_fails(
        |s| {
            s.nodes.remove(&format!("{BE}/mac"));
        },
        "mac",
    );
    assert_connect_fails(|s| s.write(&format!("{BE}/rate"), "100").unwrap(), "rate");
    assert_connect_fails(|s| s.write(&format!("{BE}/rate"), "100,0").unwrap(), "rate");
    assert_connect_fails(|s| s.write(&format!("{BE}/ip"), "10.0.0").unwrap(), "ip");
    assert_connect_fails(|s| s.write(&format!("{BE}/ip"), "").unwrap(), "ip");
}

#[test]
fn split_channels_are_refused_when_not_offered() {
    let mut s = toolstack();
    let features = BackendFeatures {
        split_event_channels: false,
        ..BackendFeatures::default()
    };
    let mut dev = NetbackXenbus::probe(&mut s, BE, features).unwrap();
    netfront_connects(&mut s);
    s.nodes.remove(&format!("{FE}/event-channel"));
    s.write(&format!("{FE}/event-channel-tx"), "3").unwrap();
    s.write(&format!("{FE}/event-channel-rx"), "4").unwrap();

    let e = dev.frontend_changed(&mut s).unwrap_err();

    assert!(e.to_string().contains("not offered"), "{e}");
}

#[test]
fn gso_without_sg_is_not_used() {
    let mut s = toolstack();
    let mut dev = probed(&mut s);
    netfront_connects(&mut s);
    s.write(&format!("{FE}/feature-sg"), "0").unwrap();

    let Action::Connect(c) = dev.frontend_changed(&mut s).unwrap() else {
        panic!("expected Connect");
    };

    assert!(!c.sg && !c.gso_tcpv4 && !c.gso_tcpv6);
}

#[test]
fn garbage_frontend_state_closes_the_backend() {
    let mut s = toolstack();
    let mut dev = probed(&mut s);
    s.write(&format!("{FE}/state"), "42").unwrap();

    let e = dev.frontend_changed(&mut s).unwrap_err();

    assert!(e.to_string().contains(&format!("{FE}/state")), "{e}");
    assert_eq!(dev.state(), XenbusState::Closing);
}

#[test]
fn guest_initiated_close_then_reconnect() {
    let mut s = toolstack();
    let mut dev = probed(&mut s);
    netfront_connects(&mut s);
    assert!(matches!(
        dev.frontend_changed(&mut s).unwrap(),
        Action::Connect(_)
    ));
    dev.connected(&mut s).unwrap();

    s.write(&format!("{FE}/state"), "5").unwrap();
    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::Disconnect);
    assert_eq!(dev.state(), XenbusState::Closing);

    s.write(&format!("{FE}/state"), "6").unwrap();
    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::Close);
    // Closed only once the caller tore the vif down.
    assert_eq!(dev.state(), XenbusState::Closing);
    dev.disconnected(&mut s).unwrap();
    assert_eq!(dev.state(), XenbusState::Closed);
    assert_eq!(get(&mut s, &format!("{BE}/state")).as_deref(), Some("6"));

    // The frontend comes back (e.g. kexec): the backend offers the device again.
    s.write(&format!("{FE}/state"), "1").unwrap();
    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::None);
    assert_eq!(dev.state(), XenbusState::InitWait);
    s.write(&format!("{FE}/state"), "4").unwrap();
    assert!(matches!(
        dev.frontend_changed(&mut s).unwrap(),
        Action::Connect(_)
    ));
}

#[test]
fn toolstack_unplug_removes_the_device_once_the_frontend_closes() {
    let mut s = toolstack();
    let mut dev = probed(&mut s);
    s.write(&format!("{BE}/online"), "0").unwrap();
    dev.close(&mut s).unwrap();
    assert_eq!(get(&mut s, &format!("{BE}/state")).as_deref(), Some("5"));

    s.write(&format!("{FE}/state"), "6").unwrap();

    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::Remove);
    assert_eq!(dev.state(), XenbusState::Closing);
    dev.disconnected(&mut s).unwrap();
    assert_eq!(dev.state(), XenbusState::Closed);
    assert_eq!(get(&mut s, &format!("{BE}/state")).as_deref(), Some("6"));
}

#[test]
fn vanished_frontend_directory_removes_the_device() {
    let mut s = toolstack();
    let mut dev = probed(&mut s);
    s.nodes.remove(&format!("{FE}/state"));

    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::Remove);
    dev.disconnected(&mut s).unwrap();
    assert_eq!(dev.state(), XenbusState::Closed);
}

#[test]
fn connecting_from_a_closed_device_is_an_illegal_transition() {
    let mut s = toolstack();
    let mut dev = probed(&mut s);
    s.write(&format!("{FE}/state"), "6").unwrap();
    dev.frontend_changed(&mut s).unwrap();
    dev.disconnected(&mut s).unwrap();

    assert_eq!(
        dev.connected(&mut s),
        Err(XenbusError::IllegalTransition {
            from: XenbusState::Closed,
            to: XenbusState::Connected
        })
    );
}

#[test]
fn transition_table_matches_the_protocol() {
    use XenbusState::*;
    assert!(legal_backend_transition(Initialising, InitWait));
    assert!(legal_backend_transition(InitWait, Connected));
    assert!(legal_backend_transition(Connected, Closing));
    assert!(legal_backend_transition(Closing, Closed));
    assert!(legal_backend_transition(Closed, InitWait));
    assert!(!legal_backend_transition(Closed, Connected));
    assert!(!legal_backend_transition(Connected, InitWait));
    assert!(!legal_backend_transition(Initialising, Connected));
    for n in 0..=8 {
        assert_eq!(XenbusState::from_number(n).unwrap().as_str(), n.to_string());
    }
    assert_eq!(XenbusState::from_number(9), None);
}

// ------------------------------------------------------------------ hotplug (toolstack detach)

fn connected_dev(s: &mut MemStore) -> NetbackXenbus {
    let mut dev = probed(s);
    netfront_connects(s);
    assert!(matches!(
        dev.frontend_changed(s).unwrap(),
        Action::Connect(_)
    ));
    dev.connected(s).unwrap();
    dev
}

fn remove_dir(s: &mut MemStore, dir: &str) {
    let prefix = format!("{dir}/");
    s.nodes.retain(|k, _| !k.starts_with(&prefix));
}

/// The toolstack removes both directories (after a detach, or at once: a forced one).
fn remove_both(s: &mut MemStore) {
    remove_dir(s, BE);
    remove_dir(s, FE);
}

/// libxl's detach: online = 0 and the backend's state Closing, written by the toolstack.
fn toolstack_detach(s: &mut MemStore) {
    s.write(&format!("{BE}/online"), "0").unwrap();
    s.write(&format!("{BE}/state"), "5").unwrap();
}

#[test]
fn toolstack_detach_of_a_connected_vif_closes_after_the_teardown_and_forgets_it() {
    let mut s = toolstack();
    let mut dev = connected_dev(&mut s);
    toolstack_detach(&mut s);
    assert_eq!(dev.backend_dir(&mut s), BackendDir::Unchanged);
    // The frontend answers Closed straight away (Linux's xenbus_frontend_closed).
    s.write(&format!("{FE}/state"), "6").unwrap();
    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::Remove);
    // Not Closed before the caller unmapped: the frontend would end grants still mapped.
    assert_eq!(get(&mut s, &format!("{BE}/state")).as_deref(), Some("5"));
    dev.disconnected(&mut s).unwrap();
    assert_eq!(get(&mut s, &format!("{BE}/state")).as_deref(), Some("6"));
    // Left Closed until the toolstack removes it: not probed again.
    assert!(!backend_ready_to_probe(&mut s, BE));
}

#[test]
fn toolstack_detach_through_frontend_closing_then_closed() {
    let mut s = toolstack();
    let mut dev = connected_dev(&mut s);
    toolstack_detach(&mut s);
    s.write(&format!("{FE}/state"), "5").unwrap();
    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::Disconnect);
    s.write(&format!("{FE}/state"), "6").unwrap();
    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::Remove);
    dev.disconnected(&mut s).unwrap();
    assert_eq!(get(&mut s, &format!("{BE}/state")).as_deref(), Some("6"));
}

#[test]
fn forced_detach_removes_without_recreating_the_backend_directory() {
    let mut s = toolstack();
    let mut dev = connected_dev(&mut s);
    remove_both(&mut s);
    assert_eq!(dev.backend_dir(&mut s), BackendDir::Gone);
    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::Remove);
    dev.disconnected(&mut s).unwrap();
    assert!(s.nodes.keys().all(|k| !k.starts_with(BE)), "{:?}", s.nodes);
}

#[test]
fn a_reattached_device_is_seen_as_recreated_and_probed_again() {
    let mut s = toolstack();
    let mut dev = connected_dev(&mut s);
    assert!(!backend_ready_to_probe(&mut s, BE));
    // Detached and attached again (same devid) before the backend looked.
    remove_both(&mut s);
    let mut fresh = toolstack();
    for (k, v) in core::mem::take(&mut fresh.nodes) {
        s.write(&k, &v).unwrap();
    }
    assert_eq!(dev.backend_dir(&mut s), BackendDir::Recreated);
    assert!(backend_ready_to_probe(&mut s, BE));
    let again = probed(&mut s);
    assert_eq!(again.state(), XenbusState::InitWait);
    netfront_connects(&mut s);
    let mut again = again;
    assert!(matches!(
        again.frontend_changed(&mut s).unwrap(),
        Action::Connect(_)
    ));
    // The stale one is not asked anything more by a correct caller; if it were, it would
    // see the frontend Connected and do nothing.
    assert_eq!(dev.frontend_changed(&mut s).unwrap(), Action::None);
}
