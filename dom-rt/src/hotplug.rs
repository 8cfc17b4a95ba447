//! Device hotplug on the frontend side: learn about disks and network interfaces the
//! toolstack adds to or removes from a running domain, and about backends closing them.
//!
//! The toolstack attaches a device by writing its frontend directory
//! `/local/domain/<me>/device/{vbd,vif}/<devid>` (state Initialising) and the backend's
//! directory; it detaches one as libxl does, by writing the backend's `online` = 0 and
//! `state` = Closing, waiting for the backend to reach Closed and removing both directories.
//! A frontend follows that as Linux's xenbus does:
//!
//! - [`DeviceWatch::poll`] lists the class directory (`device/vbd` or `device/vif`) and
//!   compares it with what it saw before: a new device whose `state` reads Initialising is
//!   [`HotplugEvent::Added`] (connect it with [`crate::blkfront::Blkfront::connect`] or
//!   [`crate::netfront::Netfront::connect`]); for a device handed out, a backend whose state
//!   goes Closing or Closed, or whose directory disappears after it was seen, is
//!   [`HotplugEvent::BackendClosing`] (Linux's `blkback_changed` / `netback_changed` seeing
//!   Closing: release the device with `release`, which answers Closed, waits for the
//!   backend's Closed and ends the grants); a device directory that disappears is
//!   [`HotplugEvent::Removed`] (a forced detach: release it, nothing is written back).
//!   A device directory re-created with state Initialising after its device was released
//!   is announced again (re-attach of the same device id).
//! - [`DeviceWatch::released`] tells the watch the caller let a device go: no more events
//!   for it until it is attached again.
//! - [`abandon`] runs the close handshake for a device that never connected (its connect
//!   failed or was refused), so that the backend and the toolstack are not left waiting.
//!
//! Polling is cheap (one directory listing, one state read per device handed out); a
//! domain calls it on a xenstore watch event on [`DeviceWatch::base`] and on a short timer
//! as a backstop. Everything read is hostile input: device ids are strict decimals, at most
//! [`MAX_DEVICES`] are tracked, and nothing read here can panic.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;

use shared_abi::xenbus::{StoreError, XenbusState, parse_decimal, path, read_state};

use crate::front::{Released, XsStore, close_handshake};
use crate::println;
use crate::xenbus::{Transport, Xenbus};

/// Most devices of one class tracked (more are ignored).
pub const MAX_DEVICES: usize = 64;

/// A store that can also list a directory (xenstore's `DIRECTORY`).
pub trait DirStore: XsStore {
    /// The children of `path`; empty if it does not exist.
    fn directory(&mut self, path: &str) -> Result<Vec<String>, StoreError>;
}

/// The device classes a frontend hotplugs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceClass {
    /// Disks (`device/vbd`).
    Vbd,
    /// Network interfaces (`device/vif`).
    Vif,
}

impl DeviceClass {
    pub fn name(self) -> &'static str {
        match self {
            DeviceClass::Vbd => "vbd",
            DeviceClass::Vif => "vif",
        }
    }
}

/// What changed. `dir` is the device's frontend directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HotplugEvent {
    /// A device appeared (its `state` reads Initialising): connect it.
    Added { devid: u32, dir: String },
    /// The backend of a device handed out closes it (a toolstack detach) or went away:
    /// release the device.
    BackendClosing {
        devid: u32,
        dir: String,
        state: XenbusState,
    },
    /// The device's directory is gone (a forced detach): release the device.
    Removed { devid: u32, dir: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Seen, not Initialising yet.
    Waiting,
    /// Handed out as Added.
    Announced,
    /// BackendClosing handed out.
    Closing,
    /// The caller released it.
    Released,
}

#[derive(Clone, Debug)]
struct Entry {
    dir: String,
    phase: Phase,
    /// The backend directory, once read.
    backend: Option<String>,
    /// The backend's `state` was readable once (so its absence later means it went).
    backend_seen: bool,
}

/// Watches one device class under a domain's home. See the module doc.
#[derive(Clone, Debug)]
pub struct DeviceWatch {
    class: DeviceClass,
    base: String,
    devices: BTreeMap<u32, Entry>,
}

impl DeviceWatch {
    /// Watch `<home>/device/<class>` (`home` = `/local/domain/<me>`).
    pub fn new(home: &str, class: DeviceClass) -> Self {
        DeviceWatch {
            class,
            base: format!("{}/device/{}", home.trim_end_matches('/'), class.name()),
            devices: BTreeMap::new(),
        }
    }

    pub fn class(&self) -> DeviceClass {
        self.class
    }

    /// The class directory (watch it in xenstore to learn when to poll).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Have `xb` flag each xenstore event on [`base`](Self::base): poll when the flag is
    /// set (clearing it) and on a short backstop timer. The flag starts set (poll at once);
    /// a watch that cannot be placed leaves the timer alone (`who` names the domain in the
    /// message). Says `HOTPLUG <class> watching <base>`.
    pub fn subscribe<T: Transport>(&self, xb: &mut Xenbus<T>, who: &str) -> Rc<Cell<bool>> {
        let dirty = Rc::new(Cell::new(true));
        let d = dirty.clone();
        if let Err(e) = xb.watch(&self.base, move |_| d.set(true)) {
            println!("{who}: watch {}: {e:?} (polling only)", self.base);
        }
        println!("HOTPLUG {} watching {}", self.class.name(), self.base);
        dirty
    }

    /// Device ids currently tracked (present in the store, in any phase).
    pub fn devices(&self) -> Vec<u32> {
        self.devices.keys().copied().collect()
    }

    /// The caller let device `devid` go (released, or gave up connecting): no more events
    /// for it until its directory is re-created (state Initialising again) or removed and
    /// added again.
    pub fn released(&mut self, devid: u32) {
        if let Some(e) = self.devices.get_mut(&devid) {
            e.phase = Phase::Released;
        }
    }

    /// Look at the store: what changed since the last poll. A failing listing changes
    /// nothing (the store may be busy; the next poll looks again).
    pub fn poll<S: DirStore>(&mut self, store: &mut S) -> Vec<HotplugEvent> {
        let mut out = Vec::new();
        let Ok(names) = store.directory(&self.base) else {
            return out;
        };
        let mut present: Vec<u32> = names
            .iter()
            .filter_map(|n| parse_decimal(n).and_then(|v| u32::try_from(v).ok()))
            .collect();
        present.sort_unstable();
        present.dedup();
        present.truncate(MAX_DEVICES);
        let gone: Vec<u32> = self
            .devices
            .keys()
            .copied()
            .filter(|d| present.binary_search(d).is_err())
            .collect();
        for devid in gone {
            if let Some(e) = self.devices.remove(&devid)
                && matches!(e.phase, Phase::Announced | Phase::Closing)
            {
                out.push(HotplugEvent::Removed { devid, dir: e.dir });
            }
        }
        for devid in present {
            let e = self.devices.entry(devid).or_insert_with(|| Entry {
                dir: format!("{}/{devid}", self.base),
                phase: Phase::Waiting,
                backend: None,
                backend_seen: false,
            });
            match e.phase {
                Phase::Waiting | Phase::Released => {
                    // Probed once its state reads Initialising, as Linux's xenbus does; a
                    // released device whose state is Initialising again was re-created.
                    if read_state(store, &e.dir).ok() == Some(XenbusState::Initialising) {
                        e.phase = Phase::Announced;
                        e.backend = store.read(&path(&e.dir, "backend")).ok().flatten();
                        e.backend_seen = false;
                        out.push(HotplugEvent::Added {
                            devid,
                            dir: e.dir.clone(),
                        });
                    }
                }
                Phase::Announced => {
                    if e.backend.is_none() {
                        e.backend = store.read(&path(&e.dir, "backend")).ok().flatten();
                    }
                    let Some(be) = e.backend.as_deref() else {
                        continue;
                    };
                    let state = match store.read(&path(be, "state")) {
                        Ok(Some(v)) => {
                            e.backend_seen = true;
                            XenbusState::parse(&v).unwrap_or(XenbusState::Unknown)
                        }
                        // Gone after it was there: the backend (or the toolstack) removed it.
                        Ok(None) if e.backend_seen => XenbusState::Unknown,
                        _ => continue,
                    };
                    if matches!(
                        state,
                        XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown
                    ) {
                        e.phase = Phase::Closing;
                        out.push(HotplugEvent::BackendClosing {
                            devid,
                            dir: e.dir.clone(),
                            state,
                        });
                    }
                }
                Phase::Closing => {}
            }
        }
        out
    }
}

/// The close handshake for a device that is not connected (its connect failed, was
/// refused, or was never tried): go Closing/Closed with the backend named in `frontend_dir`
/// (bounded by `rounds` store waits each), so that the backend and the toolstack see it
/// closed. Nothing is written to a directory that is gone.
pub fn abandon<S: XsStore>(store: &mut S, frontend_dir: &str, rounds: u32) -> Released {
    match store.read(&path(frontend_dir, "backend")) {
        Ok(Some(be)) => close_handshake(store, frontend_dir, &be, rounds),
        // No backend named: nothing to wait for.
        _ => close_handshake(store, frontend_dir, "", 0),
    }
}

/// The line a guest prints for a device it released:
/// `HOTPLUG <class> <devid> released ended=<n> leaked=<n>`, then ` <dropped>=<n>` when
/// operations in flight were dropped (the caller names them: `failed_ops`, `tx_dropped`),
/// then ` timeout=<state>` when the backend did not answer in time (not said for a forced
/// detach, where nobody is waited for).
pub fn release_line(class: DeviceClass, devid: u32, r: &Released, dropped: &str) -> String {
    let mut s = format!(
        "HOTPLUG {} {devid} released ended={} leaked={}",
        class.name(),
        r.ended,
        r.leaked
    );
    if r.dropped > 0 {
        s.push_str(&format!(" {dropped}={}", r.dropped));
    }
    if let Err(crate::blkfront::BlkError::Timeout { waiting_for }) = r.result()
        && !r.frontend_gone
    {
        s.push_str(&format!(" timeout={waiting_for}"));
    }
    s
}

#[cfg(test)]
mod tests;
