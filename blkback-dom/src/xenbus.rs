//! The backend side of the vbd xenbus handshake (XEN-ABI.md §5.2, §5.3, §8) as pure logic over
//! a small key/value [`Store`], so it is tested without xenstore.
//!
//! Owns: the backend's [`XenbusState`] for one vbd and the legal transitions (all in
//! [`legal`]); the keys the backend writes (at probe: `feature-max-indirect-segments`,
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
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::blkif::{MAX_RING_PAGE_ORDER, protocol, vdisk};
use shared_abi::domid;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::{GrantRef, NR_RESERVED_ENTRIES};

use crate::engine::{Advertised, MAX_QUEUES, VbdConfig};

/// Event channel ports of the 2-level ABI on x86-64: 64 × 64 (port 0 is never valid).
pub const NR_EVENT_CHANNELS_2L: u32 = 4096;

/// `XenbusState` (`io/xenbus.h`), stored as decimal text in `<dir>/state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// The state for its number, if defined.
    pub fn from_number(n: u64) -> Option<Self> {
        use XenbusState::*;
        Some(match n {
            0 => Unknown,
            1 => Initialising,
            2 => InitWait,
            3 => Initialised,
            4 => Connected,
            5 => Closing,
            6 => Closed,
            7 => Reconfiguring,
            8 => Reconfigured,
            _ => return None,
        })
    }

    /// The decimal text written to xenstore.
    pub fn as_str(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

/// The legal backend transitions (the one place they are listed): probe → InitWait; connect
/// only from InitWait; close from anywhere open; reconnect from Closed back to InitWait.
pub fn legal(from: XenbusState, to: XenbusState) -> bool {
    use XenbusState::*;
    matches!(
        (from, to),
        (Initialising, InitWait)
            | (Initialising | InitWait | Connected, Closing)
            | (Initialising | InitWait | Connected | Closing, Closed)
            | (InitWait, Connected)
            | (Closed, InitWait)
    )
}

/// A failure of the store itself (transport, permission).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("xenstore {op} {path}: {reason}")]
pub struct StoreError {
    pub op: &'static str,
    pub path: String,
    pub reason: String,
}

/// The few xenstore operations the handshake needs.
pub trait Store {
    /// The value at `path`, `None` if the node does not exist.
    fn read(&mut self, path: &str) -> Result<Option<String>, StoreError>;
    /// Create or replace the value at `path`.
    fn write(&mut self, path: &str, value: &str) -> Result<(), StoreError>;
}

/// An in-memory [`Store`] (host tests, tools).
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    pub nodes: BTreeMap<String, String>,
}

impl MemStore {
    /// The value at `path` (test convenience).
    pub fn get(&self, path: &str) -> Option<&str> {
        self.nodes.get(path).map(String::as_str)
    }

    /// Set `path` (test convenience).
    pub fn set(&mut self, path: &str, value: &str) {
        self.nodes.insert(path.to_string(), value.to_string());
    }
}

impl Store for MemStore {
    fn read(&mut self, path: &str) -> Result<Option<String>, StoreError> {
        Ok(self.nodes.get(path).cloned())
    }
    fn write(&mut self, path: &str, value: &str) -> Result<(), StoreError> {
        self.nodes.insert(path.to_string(), value.to_string());
        Ok(())
    }
}

/// Why the handshake failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XenbusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key}: missing")]
    Missing { key: String },
    #[error("{key}: {value:?} is invalid: expected {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: String,
    },
    #[error("illegal xenbus transition {from:?} -> {to:?}")]
    IllegalTransition { from: XenbusState, to: XenbusState },
}

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
    backend: String,
    frontend: String,
    frontend_id: DomId,
    offer: BackendOffer,
    settings: ToolstackSettings,
    state: XenbusState,
    /// A Connect was handed out and neither `connected` nor `fail` followed yet.
    connecting: bool,
}

fn key(dir: &str, k: &str) -> String {
    format!("{dir}/{k}")
}

fn invalid(key: String, value: &str, expected: impl Into<String>) -> XenbusError {
    XenbusError::Invalid {
        key,
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// Strict decimal `u64`: digits only, no sign, no spaces, no leading zeros except "0".
fn parse_dec(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

fn read_u64_in<S: Store>(
    store: &mut S,
    dir: &str,
    k: &str,
    lo: u64,
    hi: u64,
) -> Result<Option<u64>, XenbusError> {
    let path = key(dir, k);
    let Some(v) = store.read(&path)? else {
        return Ok(None);
    };
    match parse_dec(&v) {
        Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
        _ => Err(invalid(
            path,
            &v,
            format!("a decimal integer in {lo}..={hi}"),
        )),
    }
}

fn read_bool<S: Store>(
    store: &mut S,
    dir: &str,
    k: &str,
    default: bool,
) -> Result<bool, XenbusError> {
    let path = key(dir, k);
    match store.read(&path)?.as_deref() {
        None => Ok(default),
        Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(v) => Err(invalid(path, v, "0 or 1")),
    }
}

fn read_required<S: Store>(store: &mut S, dir: &str, k: &str) -> Result<String, XenbusError> {
    let path = key(dir, k);
    store.read(&path)?.ok_or(XenbusError::Missing { key: path })
}

fn read_gref<S: Store>(store: &mut S, dir: &str, k: &str) -> Result<GrantRef, XenbusError> {
    match read_u64_in(
        store,
        dir,
        k,
        u64::from(NR_RESERVED_ENTRIES),
        u64::from(u32::MAX),
    )? {
        Some(v) => Ok(v as GrantRef),
        None => Err(XenbusError::Missing { key: key(dir, k) }),
    }
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
            return Err(invalid(
                key(backend_dir, "multi-queue-max-queues"),
                &offer.max_queues.to_string(),
                format!("1..={MAX_QUEUES}"),
            ));
        }
        if offer.max_ring_page_order > MAX_RING_PAGE_ORDER {
            return Err(invalid(
                key(backend_dir, "max-ring-page-order"),
                &offer.max_ring_page_order.to_string(),
                format!("0..={MAX_RING_PAGE_ORDER}"),
            ));
        }
        let fid_key = key(backend_dir, "frontend-id");
        let fid = read_u64_in(
            store,
            backend_dir,
            "frontend-id",
            0,
            u64::from(domid::DOMID_FIRST_RESERVED - 1),
        )?
        .ok_or(XenbusError::Missing { key: fid_key })? as DomId;
        let frontend = read_required(store, backend_dir, "frontend")?;
        let prefix = format!("/local/domain/{fid}/");
        if !frontend.starts_with(&prefix)
            || frontend.len() == prefix.len()
            || frontend.ends_with('/')
            || frontend.contains("//")
        {
            return Err(invalid(
                key(backend_dir, "frontend"),
                &frontend,
                format!("a path under {prefix}"),
            ));
        }
        let settings = Self::read_settings(store, backend_dir)?;
        let mut dev = BlkbackXenbus {
            backend: backend_dir.to_string(),
            frontend,
            frontend_id: fid,
            offer,
            settings,
            state: XenbusState::Initialising,
            connecting: false,
        };
        dev.advertise(store)?;
        dev.switch(store, XenbusState::InitWait)?;
        Ok(dev)
    }

    fn read_settings<S: Store>(store: &mut S, dir: &str) -> Result<ToolstackSettings, XenbusError> {
        let read_only = match store.read(&key(dir, "mode"))?.as_deref() {
            None | Some("w") => false,
            Some("r") => true,
            Some(v) => return Err(invalid(key(dir, "mode"), v, "r or w")),
        };
        let cdrom = match store.read(&key(dir, "device-type"))?.as_deref() {
            None | Some("disk") => false,
            Some("cdrom") => true,
            Some(v) => return Err(invalid(key(dir, "device-type"), v, "disk or cdrom")),
        };
        Ok(ToolstackSettings {
            read_only,
            cdrom,
            removable: read_bool(store, dir, "removable", false)?,
            discard_enable: read_bool(store, dir, "discard-enable", true)?,
        })
    }

    pub fn state(&self) -> XenbusState {
        self.state
    }

    pub fn frontend_path(&self) -> &str {
        &self.frontend
    }

    pub fn backend_path(&self) -> &str {
        &self.backend
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
            store.write(&key(&self.backend, k), v)?;
        }
        Ok(())
    }

    fn switch<S: Store>(&mut self, store: &mut S, to: XenbusState) -> Result<(), XenbusError> {
        if self.state == to {
            return Ok(());
        }
        if !legal(self.state, to) {
            return Err(XenbusError::IllegalTransition {
                from: self.state,
                to,
            });
        }
        store.write(&key(&self.backend, "state"), to.as_str())?;
        self.state = to;
        Ok(())
    }

    /// React to a change of the frontend's `state` node.
    pub fn frontend_changed<S: Store>(&mut self, store: &mut S) -> Result<Action, XenbusError> {
        let path = key(&self.frontend, "state");
        let fstate = match store.read(&path)? {
            None => XenbusState::Unknown,
            Some(v) => match parse_dec(&v).and_then(XenbusState::from_number) {
                Some(s) => s,
                None => {
                    let e = invalid(path, &v, "a XenbusState number 0..=8");
                    self.fail(store, &e)?;
                    return Err(e);
                }
            },
        };
        use XenbusState::*;
        Ok(match fstate {
            Unknown => Action::Remove,
            Initialising => {
                if self.state == Closed {
                    // The frontend came back: offer the device again.
                    self.advertise(store)?;
                    self.switch(store, InitWait)?;
                }
                Action::None
            }
            // A frontend may go Initialised (or be Connected after a backend restart) before
            // seeing InitWait; either way, connect once.
            Initialised | Connected => {
                if self.state != InitWait || self.connecting {
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
                if matches!(self.state, InitWait | Connected) {
                    self.switch(store, Closing)?;
                }
                Action::None
            }
            Closed => {
                let online = read_bool(store, &self.backend, "online", false).unwrap_or(false);
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
        if !self.connecting || self.state != XenbusState::InitWait {
            return Err(XenbusError::IllegalTransition {
                from: self.state,
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
            store.write(&key(&self.backend, k), v)?;
        }
        self.connecting = false;
        self.switch(store, XenbusState::Connected)
    }

    /// The caller tore the engine down after [`Action::Disconnect`]: go Closed.
    pub fn disconnected<S: Store>(&mut self, store: &mut S) -> Result<(), XenbusError> {
        self.connecting = false;
        self.switch(store, XenbusState::Closed)
    }

    /// Record `err` under `error/<backend>/error` (as `xenbus_dev_fatal`) and go to Closing.
    pub fn fail<S: Store>(&mut self, store: &mut S, err: &XenbusError) -> Result<(), XenbusError> {
        self.connecting = false;
        let node = format!("error/{}/error", self.backend.trim_start_matches('/'));
        store.write(&node, &err.to_string())?;
        if !matches!(self.state, XenbusState::Closed | XenbusState::Closing) {
            self.switch(store, XenbusState::Closing)?;
        }
        Ok(())
    }

    /// Toolstack-initiated close, or the engine disconnected the frontend: go to Closing (the
    /// frontend answers Closed, then [`frontend_changed`](Self::frontend_changed) finishes).
    pub fn close<S: Store>(&mut self, store: &mut S) -> Result<(), XenbusError> {
        self.connecting = false;
        if !matches!(self.state, XenbusState::Closed | XenbusState::Closing) {
            self.switch(store, XenbusState::Closing)?;
        }
        Ok(())
    }

    fn read_queue<S: Store>(
        &self,
        store: &mut S,
        dir: &str,
        order: u32,
    ) -> Result<QueueRing, XenbusError> {
        let ring_refs = if order == 0 {
            Vec::from([read_gref(store, dir, "ring-ref")?])
        } else {
            (0..1u32 << order)
                .map(|i| read_gref(store, dir, &format!("ring-ref{i}")))
                .collect::<Result<Vec<_>, _>>()?
        };
        let event_channel = read_u64_in(
            store,
            dir,
            "event-channel",
            1,
            u64::from(NR_EVENT_CHANNELS_2L - 1),
        )?
        .ok_or(XenbusError::Missing {
            key: key(dir, "event-channel"),
        })? as EvtchnPort;
        Ok(QueueRing {
            ring_refs,
            event_channel,
        })
    }

    /// Read and validate everything connecting needs from the frontend's directory.
    fn read_connection<S: Store>(&self, store: &mut S) -> Result<Connection, XenbusError> {
        let fe = self.frontend.clone();
        if let Some(p) = store.read(&key(&fe, "protocol"))?
            && p != protocol::X86_64
        {
            return Err(invalid(
                key(&fe, "protocol"),
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
            1,
            u64::from(self.offer.max_queues),
        )?
        .unwrap_or(1);
        let order = read_u64_in(
            store,
            &fe,
            "ring-page-order",
            0,
            u64::from(self.offer.max_ring_page_order),
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
            frontend_id: self.frontend_id,
            persistent,
            ring_page_order: order,
            queues,
            settings: self.settings,
        })
    }
}
