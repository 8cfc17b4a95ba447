//! The backend side of the vbd xenbus handshake (XEN-ABI.md §5.2, §5.3, §8) as pure logic over
//! the key/value [`Store`] of [`shared_abi::xenbus`], so it is tested without xenstore.
//!
//! Owns: the backend's [`XenbusState`] for one vbd (the states, the legal transitions and the
//! strict value readers are the shared xenbus contract, in `shared_abi::xenbus`); the keys the backend writes (at probe: `feature-max-indirect-segments`,
//! `multi-queue-max-queues`, `max-ring-page-order`; at connect: `sectors`, `info`,
//! `sector-size`, `physical-sector-size`, `feature-flush-cache`, `feature-barrier`,
//! `feature-discard` with `discard-granularity`/`-alignment`/`-secure`,
//! `feature-persistent`); reading and validating every key the toolstack (`frontend-id`,
//! `frontend`, `mode`, `device-type`, `removable`, `discard-enable`) and the frontend
//! (`protocol`, `feature-persistent`, `multi-queue-num-queues`, `ring-page-order`,
//! `ring-ref` / `ring-ref<i>`, `event-channel`, per queue under `queue-<n>/` when there are
//! several) wrote. A missing or malformed value is an [`XenbusError`] naming the full key path
//! and the allowed values; the backend records it under `error/<backend>/error` (as Linux's
//! `xenbus_dev_fatal`) and goes to Closing.
//!
//! Teardown order matters for grants: on frontend Closed the caller first disconnects (unmaps
//! every grant) and only then calls [`BlkbackXenbus::disconnected`], which writes Closed; the
//! frontend frees its pages when it sees Closed, and cannot revoke grants still mapped.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::blkif::{MAX_RING_PAGE_ORDER, protocol, vdisk};
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::GrantRef;
use shared_abi::xenbus::{
    BackendDevice, BackendDir, Store, XenbusError, XenbusState, path, read_bool,
    read_event_channel, read_grant_ref, read_u64_in,
};

use crate::engine::{Advertised, MAX_QUEUES, VbdConfig};

/// What the backend offers for a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendOffer {
    /// `multi-queue-max-queues`, 1..=[`MAX_QUEUES`].
    pub max_queues: u32,
    /// `max-ring-page-order`, 0..=4.
    pub max_ring_page_order: u32,
    /// Engine settings (features offered, limits); `frontend` is filled in at connect.
    pub vbd: VbdConfig,
}

impl Default for BackendOffer {
    fn default() -> Self {
        BackendOffer {
            max_queues: 4,
            max_ring_page_order: MAX_RING_PAGE_ORDER,
            vbd: VbdConfig::new(0),
        }
    }
}

/// The toolstack's settings for the device (backend directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolstackSettings {
    /// `mode` = `r`.
    pub read_only: bool,
    /// `device-type` = `cdrom`.
    pub cdrom: bool,
    /// `removable` = 1.
    pub removable: bool,
    /// `discard-enable` (default 1).
    pub discard_enable: bool,
}

/// One queue's ring, as the frontend granted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueRing {
    /// `2^ring_page_order` grant refs, page 0 first.
    pub ring_refs: Vec<GrantRef>,
    pub event_channel: EvtchnPort,
}

/// Everything validated at connect time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub frontend_id: DomId,
    /// Persistent grants: offered by the backend and requested by the frontend.
    pub persistent: bool,
    pub ring_page_order: u32,
    pub queues: Vec<QueueRing>,
    pub settings: ToolstackSettings,
}

impl Connection {
    /// The engine configuration this connection amounts to.
    pub fn vbd_config(&self, offer: &BackendOffer) -> VbdConfig {
        VbdConfig {
            frontend: self.frontend_id,
            persistent: self.persistent,
            read_only: offer.vbd.read_only || self.settings.read_only,
            discard: offer.vbd.discard && self.settings.discard_enable,
            ..offer.vbd.clone()
        }
    }
}

/// What the caller must do after a frontend state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Map these rings, bind these channels, build the engine, then call
    /// [`BlkbackXenbus::connected`] (or [`BlkbackXenbus::fail`] if that fails).
    Connect(Box<Connection>),
    /// Tear the engine down (unmap everything, unbind channels), then call
    /// [`BlkbackXenbus::disconnected`]; `remove`: afterwards forget the device too (the
    /// toolstack set `online` = 0).
    Disconnect { remove: bool },
    /// The frontend's directory is gone: tear down and forget the device.
    Remove,
}

/// The backend half of one vbd's xenbus device.
#[derive(Clone, Debug)]
pub struct BlkbackXenbus {
    dev: BackendDevice,
    offer: BackendOffer,
    settings: ToolstackSettings,
    /// A Connect was handed out and neither `connected` nor `fail` followed yet.
    connecting: bool,
}

fn bit(v: bool) -> &'static str {
    if v { "1" } else { "0" }
}

impl BlkbackXenbus {
    /// Probe the device at `backend_dir`: read and check the toolstack's keys, advertise the
    /// probe-time features, go to InitWait.
    pub fn probe<S: Store>(
        store: &mut S,
        backend_dir: &str,
        offer: BackendOffer,
    ) -> Result<Self, XenbusError> {
        if offer.max_queues == 0 || offer.max_queues as usize > MAX_QUEUES {
            return Err(XenbusError::invalid(
                path(backend_dir, "multi-queue-max-queues"),
                &offer.max_queues.to_string(),
                format!("1..={MAX_QUEUES}"),
            ));
        }
        if offer.max_ring_page_order > MAX_RING_PAGE_ORDER {
            return Err(XenbusError::invalid(
                path(backend_dir, "max-ring-page-order"),
                &offer.max_ring_page_order.to_string(),
                format!("0..={MAX_RING_PAGE_ORDER}"),
            ));
        }
        let dev = BackendDevice::attach(store, backend_dir)?;
        let settings = Self::read_settings(store, backend_dir)?;
        let mut vbd = BlkbackXenbus {
            dev,
            offer,
            settings,
            connecting: false,
        };
        vbd.advertise(store)?;
        vbd.dev.switch(store, XenbusState::InitWait)?;
        Ok(vbd)
    }

    fn read_settings<S: Store>(store: &mut S, dir: &str) -> Result<ToolstackSettings, XenbusError> {
        let read_only = match store.read(&path(dir, "mode"))?.as_deref() {
            None | Some("w") => false,
            Some("r") => true,
            Some(v) => return Err(XenbusError::invalid(path(dir, "mode"), v, "r or w")),
        };
        let cdrom = match store.read(&path(dir, "device-type"))?.as_deref() {
            None | Some("disk") => false,
            Some("cdrom") => true,
            Some(v) => {
                return Err(XenbusError::invalid(
                    path(dir, "device-type"),
                    v,
                    "disk or cdrom",
                ));
            }
        };
        Ok(ToolstackSettings {
            read_only,
            cdrom,
            removable: read_bool(store, dir, "removable", false)?,
            discard_enable: read_bool(store, dir, "discard-enable", true)?,
        })
    }

    pub fn state(&self) -> XenbusState {
        self.dev.state()
    }

    pub fn frontend_path(&self) -> &str {
        self.dev.frontend_path()
    }

    pub fn backend_path(&self) -> &str {
        self.dev.backend_path()
    }

    pub fn settings(&self) -> ToolstackSettings {
        self.settings
    }

    fn advertise<S: Store>(&self, store: &mut S) -> Result<(), XenbusError> {
        let o = &self.offer;
        let indirect = o.vbd.max_indirect_segments.to_string();
        let queues = o.max_queues.to_string();
        let order = o.max_ring_page_order.to_string();
        let mut keys: Vec<(&str, &str)> = Vec::with_capacity(3);
        // Absent means "no indirect requests" to blkfront.
        if o.vbd.max_indirect_segments > 0 {
            keys.push(("feature-max-indirect-segments", &indirect));
        }
        keys.push(("multi-queue-max-queues", &queues));
        keys.push(("max-ring-page-order", &order));
        for (k, v) in keys {
            store.write(&path(self.dev.backend_path(), k), v)?;
        }
        Ok(())
    }

    /// React to a change of the frontend's `state` node.
    pub fn frontend_changed<S: Store>(&mut self, store: &mut S) -> Result<Action, XenbusError> {
        let fstate = self.dev.frontend_state(store).inspect_err(|e| {
            if matches!(e, XenbusError::Invalid { .. }) {
                // The bad value failed the device (as `fail`): no connect is pending any more.
                self.connecting = false;
            }
        })?;
        use XenbusState::*;
        Ok(match fstate {
            Unknown => Action::Remove,
            Initialising => {
                if self.dev.state() == Closed {
                    // The frontend came back: offer the device again.
                    self.advertise(store)?;
                    self.dev.switch(store, InitWait)?;
                }
                Action::None
            }
            // A frontend may go Initialised (or be Connected after a backend restart) before
            // seeing InitWait; either way, connect once.
            Initialised | Connected => {
                if self.dev.state() != InitWait || self.connecting {
                    return Ok(Action::None);
                }
                match self.read_connection(store) {
                    Ok(c) => {
                        self.connecting = true;
                        Action::Connect(Box::new(c))
                    }
                    Err(e) => {
                        self.fail(store, &e)?;
                        return Err(e);
                    }
                }
            }
            Closing => {
                if matches!(self.dev.state(), InitWait | Connected) {
                    self.dev.switch(store, Closing)?;
                }
                Action::None
            }
            Closed => {
                let online =
                    read_bool(store, self.dev.backend_path(), "online", false).unwrap_or(false);
                Action::Disconnect { remove: !online }
            }
            InitWait | Reconfiguring | Reconfigured => Action::None,
        })
    }

    /// The caller mapped the rings, bound the channels and built the engine: tell the
    /// frontend about the disk (`adv`, from [`crate::engine::Vbd::advertised`]) and go
    /// Connected.
    pub fn connected<S: Store>(
        &mut self,
        store: &mut S,
        adv: &Advertised,
    ) -> Result<(), XenbusError> {
        if !self.connecting || self.dev.state() != XenbusState::InitWait {
            return Err(XenbusError::IllegalTransition {
                from: self.dev.state(),
                to: XenbusState::Connected,
            });
        }
        let mut info = 0;
        if adv.read_only {
            info |= vdisk::READONLY;
        }
        if self.settings.cdrom {
            info |= vdisk::CDROM;
        }
        if self.settings.removable {
            info |= vdisk::REMOVABLE;
        }
        let sectors = adv.sectors.to_string();
        let info = info.to_string();
        let ss = adv.sector_size.to_string();
        let pss = adv.physical_sector_size.to_string();
        let mut keys: Vec<(&str, String)> = Vec::from([
            ("feature-flush-cache", bit(adv.flush).to_string()),
            ("feature-barrier", bit(adv.barrier).to_string()),
            ("feature-persistent", bit(adv.persistent).to_string()),
            ("feature-discard", bit(adv.discard.is_some()).to_string()),
        ]);
        if let Some(d) = adv.discard {
            keys.push(("discard-granularity", d.granularity.to_string()));
            keys.push(("discard-alignment", d.alignment.to_string()));
            keys.push(("discard-secure", bit(d.secure).to_string()));
        }
        keys.push(("sectors", sectors));
        keys.push(("info", info));
        keys.push(("sector-size", ss));
        keys.push(("physical-sector-size", pss));
        for (k, v) in &keys {
            store.write(&path(self.dev.backend_path(), k), v)?;
        }
        self.connecting = false;
        self.dev.switch(store, XenbusState::Connected)
    }

    /// The caller tore the engine down after [`Action::Disconnect`]: go Closed, unless the
    /// backend directory is gone (a forced detach: writing `state` would re-create it).
    pub fn disconnected<S: Store>(&mut self, store: &mut S) -> Result<(), XenbusError> {
        self.connecting = false;
        self.dev.closed_unless_removed(store)
    }

    /// What became of the backend directory since the probe (the toolstack removed it, or
    /// wrote it again for a new device with the same id).
    pub fn backend_dir<S: Store>(&self, store: &mut S) -> BackendDir {
        self.dev.backend_dir(store)
    }

    /// Record `err` under `error/<backend>/error` (as `xenbus_dev_fatal`) and go to Closing.
    pub fn fail<S: Store>(&mut self, store: &mut S, err: &XenbusError) -> Result<(), XenbusError> {
        self.connecting = false;
        self.dev.fail(store, err)
    }

    /// Toolstack-initiated close, or the engine disconnected the frontend: go to Closing (the
    /// frontend answers Closed, then [`frontend_changed`](Self::frontend_changed) finishes).
    pub fn close<S: Store>(&mut self, store: &mut S) -> Result<(), XenbusError> {
        self.connecting = false;
        self.dev.close(store)
    }

    fn read_queue<S: Store>(
        &self,
        store: &mut S,
        dir: &str,
        order: u32,
    ) -> Result<QueueRing, XenbusError> {
        let ring_refs = if order == 0 {
            Vec::from([read_grant_ref(store, dir, "ring-ref")?])
        } else {
            (0..1u32 << order)
                .map(|i| read_grant_ref(store, dir, &format!("ring-ref{i}")))
                .collect::<Result<Vec<_>, _>>()?
        };
        let event_channel: EvtchnPort =
            read_event_channel(store, dir, "event-channel")?.ok_or(XenbusError::Missing {
                key: path(dir, "event-channel"),
            })?;
        Ok(QueueRing {
            ring_refs,
            event_channel,
        })
    }

    /// Read and validate everything connecting needs from the frontend's directory.
    fn read_connection<S: Store>(&self, store: &mut S) -> Result<Connection, XenbusError> {
        let fe = self.dev.frontend_path().to_string();
        if let Some(p) = store.read(&path(&fe, "protocol"))?
            && p != protocol::X86_64
        {
            return Err(XenbusError::invalid(
                path(&fe, "protocol"),
                &p,
                format!("{} (the only layout served)", protocol::X86_64),
            ));
        }
        let persistent =
            self.offer.vbd.persistent && read_bool(store, &fe, "feature-persistent", false)?;
        let n = read_u64_in(
            store,
            &fe,
            "multi-queue-num-queues",
            1..=u64::from(self.offer.max_queues),
        )?
        .unwrap_or(1);
        let order = read_u64_in(
            store,
            &fe,
            "ring-page-order",
            0..=u64::from(self.offer.max_ring_page_order),
        )?
        .unwrap_or(0) as u32;
        let mut queues = Vec::new();
        if n == 1 {
            queues.push(self.read_queue(store, &fe, order)?);
        } else {
            for i in 0..n {
                queues.push(self.read_queue(store, &format!("{fe}/queue-{i}"), order)?);
            }
        }
        Ok(Connection {
            frontend_id: self.dev.frontend_id(),
            persistent,
            ring_page_order: order,
            queues,
            settings: self.settings,
        })
    }
}
