//! The backend side of the vif xenbus handshake (XEN-ABI.md §6.2, §6.3, §8) as pure logic over
//! a small key/value [`Store`], so it is tested without xenstore.
//!
//! Owns: the backend's [`XenbusState`] for one vif and the legal transitions between states
//! (all in [`legal`]); the feature keys the backend advertises; reading and validating every
//! key the frontend (and the toolstack) wrote. A value that is missing or malformed yields an
//! [`XenbusError`] naming the full key path and the allowed values; the backend then writes the
//! message under `error/…/error` (as Linux's `xenbus_dev_fatal`) and goes to Closing.
//!
//! The frontend's directory is hostile input: it is read only at the moments the protocol
//! says (frontend Connected while the backend waits in InitWait), each value parsed strictly.
//! The `frontend` path itself comes from the toolstack's backend directory and must lie under
//! `/local/domain/<frontend-id>/`.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::domid;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::{GrantRef, NR_RESERVED_ENTRIES};

use crate::backend::MAX_QUEUES;
use crate::packet::MacAddr;

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
    pub fn from_number(n: u32) -> Option<Self> {
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
            | (Initialising, Closing)
            | (Initialising, Closed)
            | (InitWait, Connected)
            | (InitWait, Closing)
            | (InitWait, Closed)
            | (Connected, Closing)
            | (Connected, Closed)
            | (Closing, Closed)
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

/// What the backend offers; written to its directory at probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendFeatures {
    pub sg: bool,
    pub gso_tcpv4: bool,
    pub gso_tcpv6: bool,
    pub ipv6_csum_offload: bool,
    pub multicast_control: bool,
    pub split_event_channels: bool,
    /// `multi-queue-max-queues`, 1..=[`MAX_QUEUES`].
    pub max_queues: u32,
}

impl Default for BackendFeatures {
    fn default() -> Self {
        BackendFeatures {
            sg: true,
            gso_tcpv4: true,
            gso_tcpv6: true,
            ipv6_csum_offload: true,
            multicast_control: true,
            split_event_channels: true,
            max_queues: 4,
        }
    }
}

/// Event channel(s) of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventChannels {
    /// `event-channel`: one port for tx and rx.
    Single(EvtchnPort),
    /// `event-channel-tx` + `event-channel-rx`.
    Split { tx: EvtchnPort, rx: EvtchnPort },
}

/// The rings of one queue, as the frontend granted them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueRings {
    pub tx_ring_ref: GrantRef,
    pub rx_ring_ref: GrantRef,
    pub event: EventChannels,
}

/// Everything validated at connect time: the frontend's rings and capabilities and the
/// toolstack's settings for the vif.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub frontend_id: DomId,
    pub queues: Vec<QueueRings>,
    /// Frontend accepts multi-slot rx packets.
    pub sg: bool,
    /// Frontend accepts GSO rx packets of each kind (only with sg).
    pub gso_tcpv4: bool,
    pub gso_tcpv6: bool,
    /// Frontend accepts partial IPv4 / IPv6 checksums on rx.
    pub csum_ipv4: bool,
    pub csum_ipv6: bool,
    /// Multicast control negotiated (offered and requested).
    pub multicast_control: bool,
    /// The vif's MAC (backend directory, from the toolstack).
    pub mac: MacAddr,
    /// `rate` = bytes per interval of usec (backend directory, optional).
    pub rate: Option<(u64, u64)>,
    /// `mtu` (frontend directory, optional).
    pub mtu: Option<u32>,
}

/// What the caller must do after a state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Map these rings, bind these channels, build the vif, then call
    /// [`NetbackXenbus::connected`] (or [`NetbackXenbus::fail`] if that fails).
    Connect(Box<Connection>),
    /// Tear the vif down (unmap rings, unbind channels); the device stays.
    Disconnect,
    /// Tear down and forget the device (frontend gone or toolstack unplug).
    Remove,
}

/// The backend half of one vif's xenbus device.
#[derive(Clone, Debug)]
pub struct NetbackXenbus {
    backend: String,
    frontend: String,
    frontend_id: DomId,
    features: BackendFeatures,
    state: XenbusState,
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

fn read_bool<S: Store>(store: &mut S, dir: &str, k: &str) -> Result<bool, XenbusError> {
    let path = key(dir, k);
    match store.read(&path)?.as_deref() {
        None | Some("0") => Ok(false),
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

fn read_port<S: Store>(store: &mut S, dir: &str, k: &str) -> Result<Option<u32>, XenbusError> {
    Ok(read_u64_in(store, dir, k, 1, u64::from(NR_EVENT_CHANNELS_2L - 1))?.map(|v| v as u32))
}

impl NetbackXenbus {
    /// Probe the device at `backend_dir`: read and check `frontend-id` and `frontend`,
    /// advertise the features, go to InitWait.
    pub fn probe<S: Store>(
        store: &mut S,
        backend_dir: &str,
        features: BackendFeatures,
    ) -> Result<Self, XenbusError> {
        if features.max_queues == 0 || features.max_queues as usize > MAX_QUEUES {
            return Err(invalid(
                key(backend_dir, "multi-queue-max-queues"),
                &features.max_queues.to_string(),
                format!("1..={MAX_QUEUES}"),
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
        let mut dev = NetbackXenbus {
            backend: backend_dir.to_string(),
            frontend,
            frontend_id: fid,
            features,
            state: XenbusState::Initialising,
        };
        dev.advertise(store)?;
        dev.switch(store, XenbusState::InitWait)?;
        Ok(dev)
    }

    pub fn state(&self) -> XenbusState {
        self.state
    }

    pub fn frontend_path(&self) -> &str {
        &self.frontend
    }

    fn advertise<S: Store>(&self, store: &mut S) -> Result<(), XenbusError> {
        let f = self.features;
        let b = |v: bool| if v { "1" } else { "0" };
        let max_queues = f.max_queues.to_string();
        let keys: [(&str, &str); 10] = [
            ("feature-sg", b(f.sg)),
            ("feature-gso-tcpv4", b(f.gso_tcpv4)),
            ("feature-gso-tcpv6", b(f.gso_tcpv6)),
            ("feature-ipv6-csum-offload", b(f.ipv6_csum_offload)),
            // netfront refuses to connect without rx-copy; page flipping is long gone.
            ("feature-rx-copy", "1"),
            ("feature-rx-flip", "0"),
            ("feature-multicast-control", b(f.multicast_control)),
            ("feature-dynamic-multicast-control", b(f.multicast_control)),
            ("feature-split-event-channels", b(f.split_event_channels)),
            ("multi-queue-max-queues", &max_queues),
        ];
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
            Some(v) => match parse_dec(&v).and_then(|n| XenbusState::from_number(n as u32)) {
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
            // The frontend's directory is gone.
            Unknown => {
                if self.state != Closed {
                    self.switch(store, Closed)?;
                }
                Action::Remove
            }
            Initialising | InitWait | Initialised => {
                if self.state == Closed {
                    // The frontend came back: offer the device again.
                    self.advertise(store)?;
                    self.switch(store, InitWait)?;
                }
                Action::None
            }
            Connected => {
                if self.state != InitWait {
                    return Ok(Action::None);
                }
                match self.read_connection(store) {
                    Ok(c) => Action::Connect(Box::new(c)),
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
                Action::Disconnect
            }
            Closed => {
                if self.state != Closed {
                    self.switch(store, Closed)?;
                }
                if read_bool(store, &self.backend, "online").unwrap_or(false) {
                    Action::Disconnect
                } else {
                    Action::Remove
                }
            }
            // XDP headroom renegotiation is not offered.
            Reconfiguring | Reconfigured => Action::None,
        })
    }

    /// The caller mapped the rings and bound the channels: go Connected.
    pub fn connected<S: Store>(&mut self, store: &mut S) -> Result<(), XenbusError> {
        self.switch(store, XenbusState::Connected)
    }

    /// Record `err` under `error/<backend>/error` (as `xenbus_dev_fatal`) and go to Closing.
    pub fn fail<S: Store>(&mut self, store: &mut S, err: &XenbusError) -> Result<(), XenbusError> {
        let node = format!("error/{}/error", self.backend.trim_start_matches('/'));
        store.write(&node, &err.to_string())?;
        if self.state != XenbusState::Closed {
            self.switch(store, XenbusState::Closing)?;
        }
        Ok(())
    }

    /// Toolstack-initiated close: go to Closing (the frontend answers Closed, then
    /// [`frontend_changed`](Self::frontend_changed) finishes).
    pub fn close<S: Store>(&mut self, store: &mut S) -> Result<(), XenbusError> {
        if self.state != XenbusState::Closed {
            self.switch(store, XenbusState::Closing)?;
        }
        Ok(())
    }

    fn read_queue<S: Store>(&self, store: &mut S, dir: &str) -> Result<QueueRings, XenbusError> {
        let tx_ring_ref = read_gref(store, dir, "tx-ring-ref")?;
        let rx_ring_ref = read_gref(store, dir, "rx-ring-ref")?;
        let single = read_port(store, dir, "event-channel")?;
        let tx = read_port(store, dir, "event-channel-tx")?;
        let rx = read_port(store, dir, "event-channel-rx")?;
        let event = match (single, tx, rx) {
            (Some(p), None, None) => EventChannels::Single(p),
            (None, Some(tx), Some(rx)) if self.features.split_event_channels => {
                EventChannels::Split { tx, rx }
            }
            (None, None, None) => {
                return Err(XenbusError::Missing {
                    key: key(dir, "event-channel"),
                });
            }
            _ => {
                let expected = if self.features.split_event_channels {
                    "either event-channel alone or both event-channel-tx and event-channel-rx"
                } else {
                    "event-channel alone (split event channels are not offered)"
                };
                return Err(invalid(
                    key(dir, "event-channel-tx"),
                    &format!("{tx:?}/{rx:?} with event-channel {single:?}"),
                    expected,
                ));
            }
        };
        Ok(QueueRings {
            tx_ring_ref,
            rx_ring_ref,
            event,
        })
    }

    /// Read and validate everything connecting needs.
    fn read_connection<S: Store>(&self, store: &mut S) -> Result<Connection, XenbusError> {
        let fe = self.frontend.clone();
        let f = self.features;
        let n = read_u64_in(
            store,
            &fe,
            "multi-queue-num-queues",
            1,
            u64::from(f.max_queues),
        )?
        .unwrap_or(1);
        let mut queues = Vec::new();
        if n == 1 {
            queues.push(self.read_queue(store, &fe)?);
        } else {
            for i in 0..n {
                queues.push(self.read_queue(store, &format!("{fe}/queue-{i}"))?);
            }
        }
        if !read_bool(store, &fe, "request-rx-copy")? {
            return Err(invalid(
                key(&fe, "request-rx-copy"),
                "0 or absent",
                "1 (page flipping is not supported)",
            ));
        }
        if !read_bool(store, &fe, "feature-rx-notify")? {
            return Err(invalid(
                key(&fe, "feature-rx-notify"),
                "0 or absent",
                "1 (the backend relies on rx notifications)",
            ));
        }
        let sg = read_bool(store, &fe, "feature-sg")?;
        // GSO needs scatter-gather: a GSO packet does not fit one page.
        let gso_tcpv4 = read_bool(store, &fe, "feature-gso-tcpv4")? && sg;
        let gso_tcpv6 = read_bool(store, &fe, "feature-gso-tcpv6")? && sg;
        let csum_ipv4 = !read_bool(store, &fe, "feature-no-csum-offload")?;
        let csum_ipv6 = read_bool(store, &fe, "feature-ipv6-csum-offload")?;
        let mcast = read_bool(store, &fe, "request-multicast-control")?
            || read_bool(store, &fe, "feature-multicast-control")?;
        let mac_key = key(&self.backend, "mac");
        let mac_s = read_required(store, &self.backend, "mac")?;
        let mac = match MacAddr::parse(&mac_s) {
            Some(m) if !m.is_multicast() && !m.is_zero() => m,
            _ => return Err(invalid(mac_key, &mac_s, "a unicast xx:xx:xx:xx:xx:xx")),
        };
        let rate = match store.read(&key(&self.backend, "rate"))? {
            None => None,
            Some(v) => {
                let parsed = v.split_once(',').and_then(|(b, u)| {
                    let (b, u) = (parse_dec(b)?, parse_dec(u)?);
                    (b > 0 && u > 0).then_some((b, u))
                });
                match parsed {
                    Some(r) => Some(r),
                    None => {
                        return Err(invalid(
                            key(&self.backend, "rate"),
                            &v,
                            "\"bytes,usec\" with both positive decimal integers",
                        ));
                    }
                }
            }
        };
        let mtu = read_u64_in(store, &fe, "mtu", 68, 65_535 - 14)?.map(|v| v as u32);
        Ok(Connection {
            frontend_id: self.frontend_id,
            queues,
            sg,
            gso_tcpv4,
            gso_tcpv6,
            csum_ipv4,
            csum_ipv6,
            multicast_control: mcast && f.multicast_control,
            mac,
            rate,
            mtu,
        })
    }
}
