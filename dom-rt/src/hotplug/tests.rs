//! Hotplug against backends a test plays: a vbd backend by hand (handshake, ring mapped while
//! connected, unmapped on the frontend's Closed), the real netback engine for vifs.

#![allow(clippy::unwrap_used)]

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use shared_abi::xenbus::MemStore;

use super::*;
use crate::blkfront::fake::{FakeEvents, FakeGrants, FakeStore, FakeXen, Peer, SharedXen};
use crate::blkfront::{Blkfront, FrontConfig};
use crate::netfront::fake::{Backend, Backends, NetEvents, backends_peer};
use crate::netfront::{NetConfig, Netfront};

const HOME: &str = "/local/domain/7";
const FE: &str = "/local/domain/7/device/vbd/51712";
const BE: &str = "/local/domain/1/backend/vbd/7/51712";

/// What ctl writes at `block-attach`/`network-attach` for frontend domain 7 and backend
/// domain 1: both directories pointing at each other, Initialising, plus each side's
/// class-specific keys.
fn ctl_attach(s: &mut MemStore, fe: &str, be: &str, front: &[(&str, &str)], back: &[(&str, &str)]) {
    s.set(&format!("{fe}/backend"), be);
    s.set(&format!("{fe}/backend-id"), "1");
    s.set(&format!("{fe}/state"), "1");
    s.set(&format!("{be}/frontend"), fe);
    s.set(&format!("{be}/frontend-id"), "7");
    s.set(&format!("{be}/online"), "1");
    s.set(&format!("{be}/state"), "1");
    for (k, v) in front {
        s.set(&format!("{fe}/{k}"), v);
    }
    for (k, v) in back {
        s.set(&format!("{be}/{k}"), v);
    }
}

/// What ctl writes at `block-attach`.
fn attach_vbd(s: &mut MemStore) {
    let front = [("virtual-device", "51712"), ("device-type", "disk")];
    ctl_attach(s, FE, BE, &front, &[]);
}

/// What ctl writes first at a detach (as libxl does it).
fn ctl_detach(s: &mut MemStore, be: &str) {
    s.set(&format!("{be}/online"), "0");
    s.set(&format!("{be}/state"), "5");
}

/// What ctl does last at a detach (or all at once at a forced one): both directories go.
fn ctl_remove(s: &mut MemStore, fe: &str, be: &str) {
    remove_dir(s, fe);
    remove_dir(s, be);
}

fn remove_dir(s: &mut MemStore, dir: &str) {
    let prefix = format!("{dir}/");
    s.nodes.retain(|k, _| !k.starts_with(&prefix) && k != dir);
}

fn added(devid: u32, dir: &str) -> Vec<HotplugEvent> {
    vec![HotplugEvent::Added {
        devid,
        dir: String::from(dir),
    }]
}

fn backend_closing(devid: u32, dir: &str, state: XenbusState) -> Vec<HotplugEvent> {
    vec![HotplugEvent::BackendClosing {
        devid,
        dir: String::from(dir),
        state,
    }]
}

/// The vbd backend as blkback behaves at the xenbus level: InitWait, Connected once the
/// frontend is Initialised (mapping its ring), and on the frontend's Closed (or its
/// directory vanishing) unmap, then Closed. `answer_close = false`: a hung backend.
struct BlkBack {
    xen: SharedXen,
    store: Rc<RefCell<MemStore>>,
    ring: Option<u32>,
    answer_close: bool,
}

impl BlkBack {
    fn round(&mut self) {
        let mut s = self.store.borrow_mut();
        let be = s.get(&format!("{BE}/state")).map(String::from);
        let fe = s.get(&format!("{FE}/state")).map(String::from);
        match (be.as_deref(), fe.as_deref()) {
            (Some("1"), Some("1")) => s.set(&format!("{BE}/state"), "2"),
            (Some("2"), Some("3")) => {
                let gref: u32 = s.get(&format!("{FE}/ring-ref")).unwrap().parse().unwrap();
                self.xen.borrow_mut().map_ring(1, 7, &[gref]).unwrap();
                self.ring = Some(gref);
                for (k, v) in [("sectors", "2048"), ("sector-size", "512"), ("info", "0")] {
                    s.set(&format!("{BE}/{k}"), v);
                }
                s.set(&format!("{BE}/state"), "4");
            }
            // Forced detach: the directories are gone; tear down.
            (None, _) | (_, None) => {
                if let Some(g) = self.ring.take() {
                    self.xen.borrow_mut().unmap(7, g);
                }
            }
            (Some(b), Some("6")) if b != "6" && self.answer_close => {
                if let Some(g) = self.ring.take() {
                    self.xen.borrow_mut().unmap(7, g);
                }
                s.set(&format!("{BE}/state"), "6");
            }
            _ => {}
        }
    }
}

struct BlkWorld {
    xen: SharedXen,
    store: Rc<RefCell<MemStore>>,
    back: Rc<RefCell<BlkBack>>,
    peer: Peer,
}

impl BlkWorld {
    fn new() -> Self {
        let xen: SharedXen = Rc::new(RefCell::new(FakeXen::new()));
        let store = Rc::new(RefCell::new(MemStore::default()));
        let back = Rc::new(RefCell::new(BlkBack {
            xen: xen.clone(),
            store: store.clone(),
            ring: None,
            answer_close: true,
        }));
        let b = back.clone();
        let peer: Peer = Rc::new(RefCell::new(move || b.borrow_mut().round()));
        BlkWorld {
            xen,
            store,
            back,
            peer,
        }
    }

    fn fs(&self) -> FakeStore {
        FakeStore::new(self.store.clone(), self.peer.clone())
    }

    fn connect(&self, dir: &str) -> Blkfront<FakeGrants, FakeEvents> {
        let mut cfg = FrontConfig::new(dir);
        cfg.wait_rounds = 50;
        Blkfront::connect(
            &mut self.fs(),
            FakeGrants::new(self.xen.clone(), 7),
            FakeEvents::new(self.xen.clone(), self.peer.clone()),
            &cfg,
        )
        .unwrap()
    }

    fn get(&self, k: &str) -> Option<String> {
        self.store.borrow().get(k).map(String::from)
    }

    /// The `state` node under `dir`.
    fn state(&self, dir: &str) -> Option<String> {
        self.get(&format!("{dir}/state"))
    }

    fn attach(&self) {
        attach_vbd(&mut self.store.borrow_mut());
    }

    fn detach(&self) {
        ctl_detach(&mut self.store.borrow_mut(), BE);
    }

    fn remove(&self) {
        ctl_remove(&mut self.store.borrow_mut(), FE, BE);
    }

    /// A watch on the vbds that has seen the disk attached, and its frontend connected.
    fn attached(&self) -> (DeviceWatch, Blkfront<FakeGrants, FakeEvents>) {
        let mut watch = DeviceWatch::new(HOME, DeviceClass::Vbd);
        self.attach();
        assert_eq!(watch.poll(&mut self.fs()), added(51712, FE));
        (watch, self.connect(FE))
    }
}

#[test]
fn a_disk_attached_while_running_is_announced_once_and_connects() {
    let w = BlkWorld::new();
    let mut watch = DeviceWatch::new(HOME, DeviceClass::Vbd);
    assert_eq!(watch.base(), "/local/domain/7/device/vbd");
    assert!(watch.poll(&mut w.fs()).is_empty());
    // A directory still being written (no state yet) is not announced.
    w.store.borrow_mut().set(&format!("{FE}/backend"), BE);
    assert!(watch.poll(&mut w.fs()).is_empty());
    w.attach();
    let ev = watch.poll(&mut w.fs());
    assert_eq!(ev, added(51712, FE));
    let f = w.connect(FE);
    assert_eq!(f.info().devid, 51712);
    assert_eq!(w.state(FE).as_deref(), Some("4"));
    // Connected and running: nothing more to say.
    assert!(watch.poll(&mut w.fs()).is_empty());
    assert!(watch.poll(&mut w.fs()).is_empty());
}

#[test]
fn a_toolstack_detach_releases_every_grant_and_the_backend_closes() {
    let w = BlkWorld::new();
    let (mut watch, mut f) = w.attached();
    // One write answered, one left in flight (its pages still granted).
    let t = f.submit_write(0, &[0xAB; 4096]).unwrap();
    let _ = t;
    assert!(w.xen.borrow().live_grants(7) >= 2);

    w.detach();
    let ev = watch.poll(&mut w.fs());
    assert_eq!(ev, backend_closing(51712, FE, XenbusState::Closing));
    // Only once.
    assert!(watch.poll(&mut w.fs()).is_empty());

    let mut fs = w.fs();
    let r = f.release(&mut fs, FE, 50);
    assert!(r.backend_closing && r.backend_closed, "{r:?}");
    assert_eq!(r.leaked, 0);
    assert_eq!(r.dropped, 1);
    assert!(r.ended >= 2);
    assert_eq!(r.result(), Ok(()));
    // Linux's xenbus_frontend_closed: straight to Closed, no Closing written (the backend
    // already closes).
    let writes: Vec<&str> = fs
        .log
        .iter()
        .filter(|(k, _)| *k == format!("{FE}/state"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(writes, ["6"]);
    assert_eq!(w.state(BE).as_deref(), Some("6"));
    assert_eq!(w.xen.borrow().live_grants(7), 0);
    watch.released(51712);

    // The toolstack removes both directories: nothing more for a released device.
    w.remove();
    assert!(watch.poll(&mut w.fs()).is_empty());
    assert!(watch.devices().is_empty());

    // Attached again with the same device id: announced and connected again.
    w.attach();
    assert_eq!(watch.poll(&mut w.fs()), added(51712, FE));
    let f = w.connect(FE);
    assert_eq!(w.state(FE).as_deref(), Some("4"));
    drop(f);
}

#[test]
fn a_device_recreated_between_two_polls_is_announced_again() {
    let w = BlkWorld::new();
    let (mut watch, f) = w.attached();
    w.detach();
    assert_eq!(watch.poll(&mut w.fs()).len(), 1);
    assert_eq!(f.release(&mut w.fs(), FE, 50).result(), Ok(()));
    watch.released(51712);
    // Removed and written again before the next poll.
    w.remove();
    w.attach();
    assert_eq!(watch.poll(&mut w.fs()), added(51712, FE));
}

#[test]
fn a_backend_that_never_closes_times_out_and_leaks_only_what_it_maps() {
    let w = BlkWorld::new();
    let (mut watch, f) = w.attached();
    w.back.borrow_mut().answer_close = false;
    w.detach();
    assert_eq!(watch.poll(&mut w.fs()).len(), 1);
    let r = f.release(&mut w.fs(), FE, 30);
    assert!(r.backend_closing && !r.backend_closed, "{r:?}");
    assert_eq!(
        r.result(),
        Err(crate::blkfront::BlkError::Timeout {
            waiting_for: "Closed"
        })
    );
    // The ring is still mapped by the hung backend: its grant stays (its page leaked).
    assert_eq!(r.leaked, 1);
    assert_eq!(w.xen.borrow().live_grants(7), 1);
    assert_eq!(w.state(FE).as_deref(), Some("6"));
}

#[test]
fn a_guest_close_of_a_silent_backend_times_out_waiting_for_closing() {
    let w = BlkWorld::new();
    w.attach();
    let f = w.connect(FE);
    w.back.borrow_mut().answer_close = false;
    let r = f.release(&mut w.fs(), FE, 20);
    assert!(!r.backend_closing && !r.backend_closed);
    assert_eq!(
        r.result(),
        Err(crate::blkfront::BlkError::Timeout {
            waiting_for: "Closing"
        })
    );
    assert_eq!(w.state(FE).as_deref(), Some("6"));
}

#[test]
fn a_device_directory_removed_under_the_frontend_is_released_without_writing_to_it() {
    let w = BlkWorld::new();
    let (mut watch, f) = w.attached();
    // Forced detach: both directories go at once; the backend tears down on its own.
    w.remove();
    w.back.borrow_mut().round();
    assert_eq!(
        watch.poll(&mut w.fs()),
        vec![HotplugEvent::Removed {
            devid: 51712,
            dir: String::from(FE)
        }]
    );
    let mut fs = w.fs();
    let r = f.release(&mut fs, FE, 20);
    assert!(r.frontend_gone && r.backend_closed, "{r:?}");
    assert_eq!(r.leaked, 0);
    assert!(fs.log.is_empty(), "wrote {:?}", fs.log);
    assert!(w.store.borrow().nodes.keys().all(|k| !k.starts_with(FE)));
    assert_eq!(w.xen.borrow().live_grants(7), 0);
}

#[test]
fn a_backend_directory_that_vanishes_is_a_backend_closing() {
    let w = BlkWorld::new();
    let (mut watch, _f) = w.attached();
    assert!(watch.poll(&mut w.fs()).is_empty());
    remove_dir(&mut w.store.borrow_mut(), BE);
    assert_eq!(
        watch.poll(&mut w.fs()),
        backend_closing(51712, FE, XenbusState::Unknown)
    );
}

#[test]
fn a_connect_that_fails_is_abandoned_cleanly() {
    let w = BlkWorld::new();
    w.attach();
    // The toolstack detaches before the guest connected: the backend sits in Closing.
    w.detach();
    let mut fs = w.fs();
    let r = abandon(&mut fs, FE, 20);
    assert!(r.backend_closing && r.backend_closed, "{r:?}");
    assert_eq!(w.state(FE).as_deref(), Some("6"));
    assert_eq!(w.state(BE).as_deref(), Some("6"));
}

#[test]
fn hostile_device_names_are_ignored() {
    let w = BlkWorld::new();
    let mut watch = DeviceWatch::new(HOME, DeviceClass::Vbd);
    {
        let mut s = w.store.borrow_mut();
        for name in ["abc", "-1", "007", "99999999999999999999", "4294967296"] {
            s.set(&format!("{HOME}/device/vbd/{name}/state"), "1");
        }
        for i in 0..(MAX_DEVICES + 10) {
            s.set(&format!("{HOME}/device/vbd/{i}/state"), "1");
        }
        s.set(&format!("{HOME}/device/vbd/5/backend"), "not a path");
        s.set(&format!("{HOME}/device/vbd/6/state"), "junk");
    }
    let ev = watch.poll(&mut w.fs());
    assert!(ev.len() < MAX_DEVICES, "{}", ev.len());
    assert!(watch.devices().len() <= MAX_DEVICES);
    // A bogus backend path reads as absent: no event, no panic.
    for _ in 0..3 {
        let _ = watch.poll(&mut w.fs());
    }
}

// ------------------------------------------------------------------ vif, real netback

const VFE: &str = "/local/domain/7/device/vif/0";
const VBE: &str = "/local/domain/1/backend/vif/7/0";

/// What ctl writes at `network-attach`.
fn attach_vif(s: &mut MemStore) {
    let mac = ("mac", "00:16:3e:00:07:00");
    ctl_attach(s, VFE, VBE, &[("handle", "0"), mac], &[mac]);
}

#[test]
fn a_vif_attached_while_running_connects_and_a_detach_releases_it() {
    let xen: SharedXen = Rc::new(RefCell::new(FakeXen::new()));
    let store = Rc::new(RefCell::new(MemStore::default()));
    let backends: Backends = Rc::new(RefCell::new(Vec::new()));
    let peer = backends_peer(backends.clone());
    let fs = || FakeStore::new(store.clone(), peer.clone());
    let mut watch = DeviceWatch::new(HOME, DeviceClass::Vif);
    assert!(watch.poll(&mut fs()).is_empty());

    attach_vif(&mut store.borrow_mut());
    backends
        .borrow_mut()
        .push(Backend::new(xen.clone(), store.clone(), 1, 7, VBE, VFE));
    let ev = watch.poll(&mut fs());
    assert_eq!(ev, added(0, VFE));
    let cfg = NetConfig {
        wait_rounds: 50,
        ..NetConfig::default()
    };
    let mut f = Netfront::connect(
        FakeGrants::new(xen.clone(), 7),
        NetEvents::new(xen.clone(), peer.clone()),
        &mut fs(),
        VFE,
        cfg,
    )
    .unwrap();
    assert!(backends.borrow()[0].connected());
    let mut frame = vec![0u8; 60];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&f.mac());
    frame[12..14].copy_from_slice(&[0x88, 0xB5]);
    f.send(&frame).unwrap();
    assert!(watch.poll(&mut fs()).is_empty());

    // network-detach as libxl does it.
    ctl_detach(&mut store.borrow_mut(), VBE);
    assert_eq!(
        watch.poll(&mut fs()),
        backend_closing(0, VFE, XenbusState::Closing)
    );
    let r = f.release(&mut fs());
    assert!(r.backend_closing && r.backend_closed, "{r:?}");
    assert_eq!(r.leaked, 0, "{r:?}");
    assert!(r.ended > 2, "{r:?}");
    assert_eq!(xen.borrow().live_grants(7), 0);
    assert_eq!(
        store.borrow().get(&format!("{VFE}/state")),
        Some("6"),
        "frontend Closed"
    );
    assert_eq!(store.borrow().get(&format!("{VBE}/state")), Some("6"));
    assert!(backends.borrow()[0].vif.is_none());
    watch.released(0);
    assert!(watch.poll(&mut fs()).is_empty());
}

#[test]
fn release_lines_are_what_the_scenarios_match() {
    let done = Released {
        backend_closing: true,
        backend_closed: true,
        ended: 3,
        ..Released::default()
    };
    assert_eq!(
        release_line(DeviceClass::Vbd, 51712, &done, "failed_ops"),
        "HOTPLUG vbd 51712 released ended=3 leaked=0"
    );
    let hung = Released {
        backend_closing: true,
        ended: 2,
        leaked: 1,
        dropped: 4,
        ..Released::default()
    };
    assert_eq!(
        release_line(DeviceClass::Vif, 0, &hung, "tx_dropped"),
        "HOTPLUG vif 0 released ended=2 leaked=1 tx_dropped=4 timeout=Closed"
    );
    let forced = Released {
        frontend_gone: true,
        ..hung
    };
    assert_eq!(
        release_line(DeviceClass::Vbd, 1, &forced, "failed_ops"),
        "HOTPLUG vbd 1 released ended=2 leaked=1 failed_ops=4"
    );
}
