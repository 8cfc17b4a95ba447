//! The xenbus handshake as Linux blkfront and libxl drive it, over an in-memory store.
#![allow(clippy::unwrap_used)]

use blkback_dom::device::{RamDisk, SyncIo};
use blkback_dom::engine::Vbd;
use blkback_dom::xenbus::{Action, BackendOffer, BlkbackXenbus};
use shared_abi::PAGE_SIZE;
use shared_abi::ring::SharedRingMem;
use shared_abi::xenbus::{
    BackendDir, MemStore, XenbusError, XenbusState, backend_ready_to_probe,
    legal_backend_transition,
};

const BE: &str = "/local/domain/0/backend/vbd/7/51712";
const FE: &str = "/local/domain/7/device/vbd/51712";

fn toolstack() -> MemStore {
    let mut s = MemStore::default();
    for (k, v) in [
        ("frontend-id", "7"),
        ("frontend", FE),
        ("online", "1"),
        ("state", "1"),
        ("mode", "w"),
        ("device-type", "disk"),
        ("removable", "0"),
    ] {
        s.set(&format!("{BE}/{k}"), v);
    }
    s.set(&format!("{FE}/state"), "1");
    s.set(&format!("{FE}/backend"), BE);
    s.set(&format!("{FE}/backend-id"), "0");
    s
}

/// What blkfront's talk_to_blkback writes for `queues` queues of `2^order` pages.
fn front_writes(s: &mut MemStore, queues: u32, order: u32) {
    if order > 0 {
        s.set(&format!("{FE}/ring-page-order"), &order.to_string());
    }
    if queues > 1 {
        s.set(&format!("{FE}/multi-queue-num-queues"), &queues.to_string());
    }
    for q in 0..queues {
        let dir = if queues > 1 {
            format!("{FE}/queue-{q}")
        } else {
            FE.to_string()
        };
        if order == 0 {
            s.set(&format!("{dir}/ring-ref"), &(100 + q * 16).to_string());
        } else {
            for i in 0..1u32 << order {
                s.set(
                    &format!("{dir}/ring-ref{i}"),
                    &(100 + q * 16 + i).to_string(),
                );
            }
        }
        s.set(&format!("{dir}/event-channel"), &(20 + q).to_string());
    }
    s.set(&format!("{FE}/protocol"), "x86_64-abi");
    s.set(&format!("{FE}/feature-persistent"), "1");
    s.set(&format!("{FE}/state"), "3");
}

fn be(s: &MemStore, k: &str) -> Option<String> {
    s.get(&format!("{BE}/{k}")).map(str::to_string)
}

fn probe(s: &mut MemStore) -> BlkbackXenbus {
    BlkbackXenbus::probe(s, BE, BackendOffer::default()).unwrap()
}

#[test]
fn probe_advertises_limits_and_waits() {
    let mut s = toolstack();
    let xb = probe(&mut s);
    assert_eq!(xb.state(), XenbusState::InitWait);
    assert_eq!(be(&s, "state").as_deref(), Some("2"));
    assert_eq!(
        be(&s, "feature-max-indirect-segments").as_deref(),
        Some("256")
    );
    assert_eq!(be(&s, "multi-queue-max-queues").as_deref(), Some("4"));
    assert_eq!(be(&s, "max-ring-page-order").as_deref(), Some("4"));
}

#[test]
fn full_connect_with_order_2_ring_writes_disk_keys() {
    let mut s = toolstack();
    let mut xb = probe(&mut s);
    front_writes(&mut s, 1, 2);
    let Action::Connect(c) = xb.frontend_changed(&mut s).unwrap() else {
        panic!("expected Connect")
    };
    assert_eq!(c.frontend_id, 7);
    assert_eq!(c.ring_page_order, 2);
    assert_eq!(c.queues.len(), 1);
    assert_eq!(c.queues[0].ring_refs, [100, 101, 102, 103]);
    assert_eq!(c.queues[0].event_channel, 20);
    assert!(c.persistent);
    // A second watch firing before connect completes must not connect twice.
    assert_eq!(xb.frontend_changed(&mut s).unwrap(), Action::None);

    // The caller maps the four ring pages and builds the engine.
    let offer = BackendOffer::default();
    let ring = SharedRingMem::new_owned(PAGE_SIZE << c.ring_page_order).unwrap();
    let io = SyncIo::new(RamDisk::new(2048, 512).unwrap());
    let vbd = Vbd::new(c.vbd_config(&offer), io, vec![ring]).unwrap();
    xb.connected(&mut s, &vbd.advertised()).unwrap();
    assert_eq!(xb.state(), XenbusState::Connected);
    for (k, v) in [
        ("state", "4"),
        ("sectors", "2048"),
        ("info", "0"),
        ("sector-size", "512"),
        ("physical-sector-size", "512"),
        ("feature-flush-cache", "1"),
        ("feature-barrier", "1"),
        ("feature-persistent", "1"),
        ("feature-discard", "1"),
        ("discard-granularity", "512"),
        ("discard-alignment", "0"),
        ("discard-secure", "1"),
    ] {
        assert_eq!(be(&s, k).as_deref(), Some(v), "{k}");
    }
    // The frontend's Connected changes nothing more.
    s.set(&format!("{FE}/state"), "4");
    assert_eq!(xb.frontend_changed(&mut s).unwrap(), Action::None);
}

#[test]
fn two_queues_are_read_from_queue_directories() {
    let mut s = toolstack();
    let mut xb = probe(&mut s);
    front_writes(&mut s, 2, 0);
    let Action::Connect(c) = xb.frontend_changed(&mut s).unwrap() else {
        panic!()
    };
    assert_eq!(c.queues.len(), 2);
    assert_eq!(c.queues[1].ring_refs, [116]);
    assert_eq!(c.queues[1].event_channel, 21);
}

#[test]
fn read_only_mode_reaches_the_engine_and_info() {
    let mut s = toolstack();
    s.set(&format!("{BE}/mode"), "r");
    s.set(&format!("{BE}/device-type"), "cdrom");
    let mut xb = probe(&mut s);
    front_writes(&mut s, 1, 0);
    let Action::Connect(c) = xb.frontend_changed(&mut s).unwrap() else {
        panic!()
    };
    let cfg = c.vbd_config(&BackendOffer::default());
    assert!(cfg.read_only);
    let vbd = Vbd::new(
        cfg,
        SyncIo::new(RamDisk::new(64, 512).unwrap()),
        vec![SharedRingMem::new_owned(PAGE_SIZE).unwrap()],
    )
    .unwrap();
    xb.connected(&mut s, &vbd.advertised()).unwrap();
    assert_eq!(be(&s, "info").as_deref(), Some("5"), "CDROM | READONLY");
    assert_eq!(be(&s, "feature-flush-cache").as_deref(), Some("0"));
    assert_eq!(be(&s, "feature-discard").as_deref(), Some("0"));
}

#[test]
fn frontend_without_persistent_gets_no_persistent_grants() {
    let mut s = toolstack();
    let mut xb = probe(&mut s);
    front_writes(&mut s, 1, 0);
    s.set(&format!("{FE}/feature-persistent"), "0");
    let Action::Connect(c) = xb.frontend_changed(&mut s).unwrap() else {
        panic!()
    };
    assert!(!c.persistent);
    assert!(!c.vbd_config(&BackendOffer::default()).persistent);
}

/// Each bad frontend value fails the device with an error naming the key.
#[test]
fn bad_frontend_values_fail_with_the_key_named() {
    let cases: [(&str, &str, &str); 10] = [
        ("ring-page-order", "5", "ring-page-order"),
        ("ring-page-order", "-1", "ring-page-order"),
        ("multi-queue-num-queues", "0", "multi-queue-num-queues"),
        ("multi-queue-num-queues", "9", "multi-queue-num-queues"),
        ("ring-ref", "abc", "ring-ref"),
        ("ring-ref", "3", "ring-ref"),
        ("event-channel", "0", "event-channel"),
        ("event-channel", "4096", "event-channel"),
        ("protocol", "x86_32-abi", "protocol"),
        ("feature-persistent", "yes", "feature-persistent"),
    ];
    for (k, v, named) in cases {
        let mut s = toolstack();
        let mut xb = probe(&mut s);
        front_writes(&mut s, 1, 0);
        s.set(&format!("{FE}/{k}"), v);
        let err = xb.frontend_changed(&mut s).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("{FE}/{named}")), "{k}={v}: {msg}");
        assert_eq!(xb.state(), XenbusState::Closing, "{k}={v}");
        let node = format!("error{BE}/error");
        assert_eq!(s.get(&node), Some(msg.as_str()));
    }
}

#[test]
fn missing_ring_ref_or_event_channel_is_named() {
    for k in ["ring-ref", "event-channel"] {
        let mut s = toolstack();
        let mut xb = probe(&mut s);
        front_writes(&mut s, 1, 0);
        s.nodes.remove(&format!("{FE}/{k}"));
        let err = xb.frontend_changed(&mut s).unwrap_err();
        assert_eq!(
            err,
            XenbusError::Missing {
                key: format!("{FE}/{k}")
            }
        );
    }
    // With order 1, ring-ref1 is required too.
    let mut s = toolstack();
    let mut xb = probe(&mut s);
    front_writes(&mut s, 1, 1);
    s.nodes.remove(&format!("{FE}/ring-ref1"));
    assert!(
        xb.frontend_changed(&mut s)
            .unwrap_err()
            .to_string()
            .contains("ring-ref1")
    );
}

#[test]
fn bad_toolstack_values_fail_probe_with_the_key_named() {
    for (k, v) in [
        ("frontend-id", "32752"),
        ("frontend-id", "x"),
        ("frontend", "/local/domain/8/device/vbd/51712"),
        ("mode", "rw"),
        ("device-type", "floppy"),
        ("removable", "2"),
        ("discard-enable", "true"),
    ] {
        let mut s = toolstack();
        s.set(&format!("{BE}/{k}"), v);
        let err = BlkbackXenbus::probe(&mut s, BE, BackendOffer::default()).unwrap_err();
        assert!(
            err.to_string().contains(&format!("{BE}/{k}")),
            "{k}={v}: {err}"
        );
    }
    let mut s = toolstack();
    let bad = BackendOffer {
        max_ring_page_order: 5,
        ..BackendOffer::default()
    };
    assert!(BlkbackXenbus::probe(&mut s, BE, bad).is_err());
}

#[test]
fn garbage_frontend_state_fails_the_device() {
    let mut s = toolstack();
    let mut xb = probe(&mut s);
    s.set(&format!("{FE}/state"), "9");
    assert!(xb.frontend_changed(&mut s).is_err());
    assert_eq!(be(&s, "state").as_deref(), Some("5"));
}

#[test]
fn close_disconnects_before_closed_then_reconnects() {
    let mut s = toolstack();
    let mut xb = connected(&mut s);
    // Guest shuts down: Closing, then Closed.
    s.set(&format!("{FE}/state"), "5");
    assert_eq!(xb.frontend_changed(&mut s).unwrap(), Action::None);
    assert_eq!(be(&s, "state").as_deref(), Some("5"));
    s.set(&format!("{FE}/state"), "6");
    assert_eq!(
        xb.frontend_changed(&mut s).unwrap(),
        Action::Disconnect { remove: false }
    );
    assert_eq!(
        be(&s, "state").as_deref(),
        Some("5"),
        "not Closed before the caller tore down"
    );
    xb.disconnected(&mut s).unwrap();
    assert_eq!(be(&s, "state").as_deref(), Some("6"));
    // The frontend comes back (reboot/kexec): offer the device again.
    s.set(&format!("{FE}/state"), "1");
    assert_eq!(xb.frontend_changed(&mut s).unwrap(), Action::None);
    assert_eq!(xb.state(), XenbusState::InitWait);
    front_writes(&mut s, 1, 0);
    assert!(matches!(
        xb.frontend_changed(&mut s).unwrap(),
        Action::Connect(_)
    ));
}

#[test]
fn toolstack_unplug_removes_after_frontend_closes() {
    let mut s = toolstack();
    let mut xb = probe(&mut s);
    s.set(&format!("{BE}/online"), "0");
    xb.close(&mut s).unwrap();
    assert_eq!(be(&s, "state").as_deref(), Some("5"));
    s.set(&format!("{FE}/state"), "6");
    assert_eq!(
        xb.frontend_changed(&mut s).unwrap(),
        Action::Disconnect { remove: true }
    );
    s.nodes.remove(&format!("{FE}/state"));
    assert_eq!(xb.frontend_changed(&mut s).unwrap(), Action::Remove);
}

#[test]
fn connected_without_a_connect_is_illegal() {
    let mut s = toolstack();
    let mut xb = probe(&mut s);
    let vbd = Vbd::new(
        blkback_dom::engine::VbdConfig::new(7),
        SyncIo::new(RamDisk::new(64, 512).unwrap()),
        vec![SharedRingMem::new_owned(PAGE_SIZE).unwrap()],
    )
    .unwrap();
    assert!(matches!(
        xb.connected(&mut s, &vbd.advertised()),
        Err(XenbusError::IllegalTransition { .. })
    ));
}

#[test]
fn transition_table_allows_only_the_protocol() {
    use XenbusState::*;
    assert!(legal_backend_transition(Initialising, InitWait));
    assert!(legal_backend_transition(InitWait, Connected));
    assert!(legal_backend_transition(Closed, InitWait));
    assert!(!legal_backend_transition(Initialising, Connected));
    assert!(!legal_backend_transition(Closed, Connected));
    assert!(!legal_backend_transition(Connected, InitWait));
    assert!(!legal_backend_transition(Closing, Connected));
}

// ------------------------------------------------------------------ hotplug (toolstack detach)

fn connected(s: &mut MemStore) -> BlkbackXenbus {
    let mut xb = probe(s);
    front_writes(s, 1, 0);
    let Action::Connect(c) = xb.frontend_changed(s).unwrap() else {
        panic!()
    };
    let vbd = Vbd::new(
        c.vbd_config(&BackendOffer::default()),
        SyncIo::new(RamDisk::new(64, 512).unwrap()),
        vec![SharedRingMem::new_owned(PAGE_SIZE).unwrap()],
    )
    .unwrap();
    xb.connected(s, &vbd.advertised()).unwrap();
    xb
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
    s.set(&format!("{BE}/online"), "0");
    s.set(&format!("{BE}/state"), "5");
}

#[test]
fn toolstack_detach_of_a_connected_disk_closes_after_teardown_and_is_not_probed_again() {
    let mut s = toolstack();
    let mut xb = connected(&mut s);
    toolstack_detach(&mut s);
    assert_eq!(xb.backend_dir(&mut s), BackendDir::Unchanged);
    // The frontend answers Closed directly (xenbus_frontend_closed).
    s.set(&format!("{FE}/state"), "6");
    assert_eq!(
        xb.frontend_changed(&mut s).unwrap(),
        Action::Disconnect { remove: true }
    );
    assert_eq!(be(&s, "state").as_deref(), Some("5"));
    xb.disconnected(&mut s).unwrap();
    assert_eq!(be(&s, "state").as_deref(), Some("6"));
    // The caller forgot the device; the directory, Closed, waits for the toolstack to
    // remove it and must not be probed again meanwhile (that would write InitWait over
    // the Closed the toolstack waits for).
    assert!(!backend_ready_to_probe(&mut s, BE));
}

#[test]
fn forced_detach_of_a_connected_disk_is_removed_without_writing() {
    let mut s = toolstack();
    let mut xb = connected(&mut s);
    remove_both(&mut s);
    assert_eq!(xb.backend_dir(&mut s), BackendDir::Gone);
    assert_eq!(xb.frontend_changed(&mut s).unwrap(), Action::Remove);
    // A caller that still calls disconnected does not re-create the directory.
    xb.disconnected(&mut s).unwrap();
    assert!(s.nodes.keys().all(|k| !k.starts_with(BE)), "{:?}", s.nodes);
}

#[test]
fn reattaching_the_same_device_is_seen_and_probed_again() {
    let mut s = toolstack();
    let mut xb = connected(&mut s);
    toolstack_detach(&mut s);
    s.set(&format!("{FE}/state"), "6");
    assert_eq!(
        xb.frontend_changed(&mut s).unwrap(),
        Action::Disconnect { remove: true }
    );
    xb.disconnected(&mut s).unwrap();
    // The toolstack removes both directories and attaches the same devid again.
    remove_both(&mut s);
    let fresh = toolstack();
    for (k, v) in fresh.nodes {
        s.set(&k, &v);
    }
    assert!(backend_ready_to_probe(&mut s, BE));
    // A backend that had not forgotten the old device sees it re-created.
    assert_eq!(xb.backend_dir(&mut s), BackendDir::Recreated);
    let mut again = probe(&mut s);
    front_writes(&mut s, 1, 0);
    assert!(matches!(
        again.frontend_changed(&mut s).unwrap(),
        Action::Connect(_)
    ));
}
