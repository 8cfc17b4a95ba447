//! Xenbus, the device handshake both halves of a split driver follow over xenstore
//! (XEN-ABI.md §8, with the per-protocol keys in §5.2 and §6.2).
//!
//! Owns: [`XenbusState`] and its numbers; the backend's legal transitions, listed once in
//! [`legal_backend_transition`] and enforced by [`BackendDevice::switch`]; the mechanics every
//! backend device shares ([`BackendDevice`]: directories, state, failing); the [`Store`] trait
//! through which handshake logic reads and writes xenstore (so it is tested on the host with
//! [`MemStore`]); and the strict readers for xenbus values ([`read_u64_in`], [`read_bool`],
//! [`read_grant_ref`], [`read_event_channel`], [`read_other_end`], [`read_state`], ...).
//!
//! Invariants: every value read from the store is an allegation by whoever wrote it (a
//! frontend, the toolstack) and is parsed strictly, never trimmed or truncated: decimal digits
//! only, no sign, no leading zeros, checked against the allowed range. A missing or malformed
//! value yields an [`XenbusError`] that names the full key path and the allowed values or
//! range, which a driver records under `error/…/error` ([`record_error`], as Linux's
//! `xenbus_dev_fatal`). Nothing here panics on a stored value. No locks: callers hold the
//! store mutably for the duration of one step.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use core::fmt;
use core::ops::RangeInclusive;

use crate::DomId;
use crate::domid;
use crate::event_channel::EvtchnPort;
use crate::grant_table::{GrantRef, NR_RESERVED_ENTRIES};
use crate::shared_info::EVTCHN_2L_NR_CHANNELS;

/// `XenbusState` (`io/xenbus.h`), stored as decimal text in `<dir>/state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// Every state, in numeric order.
    pub const ALL: [XenbusState; 9] = [
        XenbusState::Unknown,
        XenbusState::Initialising,
        XenbusState::InitWait,
        XenbusState::Initialised,
        XenbusState::Connected,
        XenbusState::Closing,
        XenbusState::Closed,
        XenbusState::Reconfiguring,
        XenbusState::Reconfigured,
    ];

    /// What [`read_state`] tells a writer of a bad `state` value.
    pub const EXPECTED: &'static str = "a XenbusState number 0..=8";

    /// The state for its number, if defined. Takes the full parsed width so that a large
    /// number is refused rather than truncated onto a valid state.
    pub const fn from_number(n: u64) -> Option<Self> {
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

    /// The state's number.
    pub const fn number(self) -> u8 {
        self as u8
    }

    /// The decimal text written to xenstore.
    pub const fn as_str(self) -> &'static str {
        use XenbusState::*;
        match self {
            Unknown => "0",
            Initialising => "1",
            InitWait => "2",
            Initialised => "3",
            Connected => "4",
            Closing => "5",
            Closed => "6",
            Reconfiguring => "7",
            Reconfigured => "8",
        }
    }

    /// The state a stored value names, strictly ([`parse_decimal`]); `None` otherwise.
    pub fn parse(text: &str) -> Option<Self> {
        parse_decimal(text).and_then(Self::from_number)
    }
}

/// The legal backend transitions (the one place they are listed): probe → InitWait; connect
/// only from InitWait; close (Closing, Closed) from any open state; Closing → Closed; reconnect
/// from Closed back to InitWait. Staying in a state is not a transition (see
/// [`BackendDevice::switch`]). Reconfiguring/Reconfigured (XDP headroom) are not offered.
pub const fn legal_backend_transition(from: XenbusState, to: XenbusState) -> bool {
    use XenbusState::*;
    matches!(
        (from, to),
        (Initialising, InitWait)
            | (InitWait, Connected)
            | (Initialising | InitWait | Connected, Closing)
            | (Initialising | InitWait | Connected | Closing, Closed)
            | (Closed, InitWait)
    )
}

/// A failure of the store itself (transport, permission).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreError {
    /// The operation (`read`, `write`, ...).
    pub op: &'static str,
    pub path: String,
    pub reason: String,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "xenstore {} {}: {}", self.op, self.path, self.reason)
    }
}

impl core::error::Error for StoreError {}

/// The few xenstore operations a xenbus handshake needs.
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

/// Why a handshake step failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XenbusError {
    /// The store failed.
    Store(StoreError),
    /// A required key is absent (`key` is the full path).
    Missing { key: String },
    /// A key holds a value outside what is allowed (`expected` says what is).
    Invalid {
        key: String,
        value: String,
        expected: String,
    },
    /// This side was asked to make a transition the protocol does not allow.
    IllegalTransition { from: XenbusState, to: XenbusState },
}

impl XenbusError {
    /// An [`XenbusError::Invalid`] for `value` at `key`.
    pub fn invalid(key: impl Into<String>, value: &str, expected: impl Into<String>) -> Self {
        XenbusError::Invalid {
            key: key.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

impl From<StoreError> for XenbusError {
    fn from(e: StoreError) -> Self {
        XenbusError::Store(e)
    }
}

impl fmt::Display for XenbusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XenbusError::Store(e) => e.fmt(f),
            XenbusError::Missing { key } => write!(f, "{key}: missing"),
            XenbusError::Invalid {
                key,
                value,
                expected,
            } => write!(f, "{key}: {value:?} is invalid: expected {expected}"),
            XenbusError::IllegalTransition { from, to } => {
                write!(f, "illegal xenbus transition {from:?} -> {to:?}")
            }
        }
    }
}

impl core::error::Error for XenbusError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            XenbusError::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// The full path of node `name` in directory `dir`.
pub fn path(dir: &str, name: &str) -> String {
    format!("{dir}/{name}")
}

/// Strict decimal `u64`: ASCII digits only (no sign, no spaces), no leading zeros except
/// "0" itself, and no overflow.
pub fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if text.len() > 1 && text.starts_with('0') {
        return None;
    }
    text.parse().ok()
}

/// `<dir>/<name>` as a strict decimal in `range`; `None` if absent.
pub fn read_u64_in<S: Store + ?Sized>(
    store: &mut S,
    dir: &str,
    name: &str,
    range: RangeInclusive<u64>,
) -> Result<Option<u64>, XenbusError> {
    let key = path(dir, name);
    let Some(v) = store.read(&key)? else {
        return Ok(None);
    };
    match parse_decimal(&v) {
        Some(n) if range.contains(&n) => Ok(Some(n)),
        _ => Err(XenbusError::invalid(
            key,
            &v,
            format!("a decimal integer in {}..={}", range.start(), range.end()),
        )),
    }
}

/// `<dir>/<name>` as a flag: "0" or "1", `default` if absent.
pub fn read_bool<S: Store + ?Sized>(
    store: &mut S,
    dir: &str,
    name: &str,
    default: bool,
) -> Result<bool, XenbusError> {
    let key = path(dir, name);
    match store.read(&key)?.as_deref() {
        None => Ok(default),
        Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(v) => Err(XenbusError::invalid(key, v, "0 or 1")),
    }
}

/// `<dir>/<name>`, which must exist (any text).
pub fn read_required<S: Store + ?Sized>(
    store: &mut S,
    dir: &str,
    name: &str,
) -> Result<String, XenbusError> {
    let key = path(dir, name);
    store.read(&key)?.ok_or(XenbusError::Missing { key })
}

/// `<dir>/<name>` as a grant ref a guest may have granted: required, not one of the
/// toolstack's reserved refs.
pub fn read_grant_ref<S: Store + ?Sized>(
    store: &mut S,
    dir: &str,
    name: &str,
) -> Result<GrantRef, XenbusError> {
    let range = u64::from(NR_RESERVED_ENTRIES)..=u64::from(GrantRef::MAX);
    let v = read_u64_in(store, dir, name, range)?.ok_or_else(|| XenbusError::Missing {
        key: path(dir, name),
    })?;
    narrow(dir, name, v)
}

/// `v`, already checked against a range that fits `T`, as a `T`; an error naming the key
/// rather than a panic should the range and the type ever disagree.
fn narrow<T: TryFrom<u64>>(dir: &str, name: &str, v: u64) -> Result<T, XenbusError> {
    T::try_from(v).map_err(|_| {
        XenbusError::invalid(
            path(dir, name),
            &v.to_string(),
            format!("a value that fits {} bytes", size_of::<T>()),
        )
    })
}

/// Largest port of the 2-level event channel ABI (port 0 is never valid).
pub const MAX_EVENT_CHANNEL: EvtchnPort = (EVTCHN_2L_NR_CHANNELS - 1) as EvtchnPort;

/// `<dir>/<name>` as an event channel port in `1..=`[`MAX_EVENT_CHANNEL`]; `None` if absent.
pub fn read_event_channel<S: Store + ?Sized>(
    store: &mut S,
    dir: &str,
    name: &str,
) -> Result<Option<EvtchnPort>, XenbusError> {
    let range = 1..=u64::from(MAX_EVENT_CHANNEL);
    read_u64_in(store, dir, name, range)?
        .map(|v| narrow(dir, name, v))
        .transpose()
}

/// The other end of a device, as the toolstack recorded it in `dir`: `<dir>/<id_name>` (a
/// regular domain id) and `<dir>/<path_name>` (a directory under that domain's
/// `/local/domain/<id>/`). A backend reads `frontend-id`/`frontend`, a frontend
/// `backend-id`/`backend`.
pub fn read_other_end<S: Store + ?Sized>(
    store: &mut S,
    dir: &str,
    id_name: &str,
    path_name: &str,
) -> Result<(DomId, String), XenbusError> {
    let ids = 0..=u64::from(domid::DOMID_FIRST_RESERVED - 1);
    let id = read_u64_in(store, dir, id_name, ids)?.ok_or_else(|| XenbusError::Missing {
        key: path(dir, id_name),
    })?;
    let id: DomId = narrow(dir, id_name, id)?;
    let other = read_required(store, dir, path_name)?;
    let prefix = format!("/local/domain/{id}/");
    if !other.starts_with(&prefix)
        || other.len() == prefix.len()
        || other.ends_with('/')
        || other.contains("//")
    {
        return Err(XenbusError::invalid(
            path(dir, path_name),
            &other,
            format!("a path under {prefix}"),
        ));
    }
    Ok((id, other))
}

/// The state in `<dir>/state`: [`XenbusState::Unknown`] if the node is gone (the device
/// directory was removed), an error naming the key if it holds anything but a state number.
pub fn read_state<S: Store + ?Sized>(store: &mut S, dir: &str) -> Result<XenbusState, XenbusError> {
    let key = path(dir, "state");
    match store.read(&key)? {
        None => Ok(XenbusState::Unknown),
        Some(v) => XenbusState::parse(&v)
            .ok_or_else(|| XenbusError::invalid(key, &v, XenbusState::EXPECTED)),
    }
}

/// The backend half of one xenbus device, as every backend keeps it: its own directory, the
/// frontend's (checked once at [`attach`](Self::attach)), and its state, changed only through
/// [`switch`](Self::switch) so every change is one [`legal_backend_transition`] written to
/// `<backend>/state`. What a device offers and how it reacts to the frontend is the driver's
/// part; this is the mechanics they share.
#[derive(Clone, Debug)]
pub struct BackendDevice {
    backend: String,
    frontend: String,
    frontend_id: DomId,
    state: XenbusState,
}

impl BackendDevice {
    /// Read and check the toolstack's `frontend-id` and `frontend` in `backend_dir`
    /// ([`read_other_end`]). The device starts in Initialising; nothing is written.
    pub fn attach<S: Store + ?Sized>(
        store: &mut S,
        backend_dir: &str,
    ) -> Result<Self, XenbusError> {
        let (frontend_id, frontend) =
            read_other_end(store, backend_dir, "frontend-id", "frontend")?;
        Ok(BackendDevice {
            backend: backend_dir.to_string(),
            frontend,
            frontend_id,
            state: XenbusState::Initialising,
        })
    }

    pub fn state(&self) -> XenbusState {
        self.state
    }

    pub fn backend_path(&self) -> &str {
        &self.backend
    }

    pub fn frontend_path(&self) -> &str {
        &self.frontend
    }

    pub fn frontend_id(&self) -> DomId {
        self.frontend_id
    }

    /// Go to `to`, writing `<backend>/state`. Staying put writes nothing (as Linux skips
    /// unchanged state writes); a transition [`legal_backend_transition`] does not allow is
    /// refused, and a failed write leaves the state as it was.
    pub fn switch<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
        to: XenbusState,
    ) -> Result<(), XenbusError> {
        if self.state == to {
            return Ok(());
        }
        if !legal_backend_transition(self.state, to) {
            return Err(XenbusError::IllegalTransition {
                from: self.state,
                to,
            });
        }
        store.write(&path(&self.backend, "state"), to.as_str())?;
        self.state = to;
        Ok(())
    }

    /// The frontend's state ([`read_state`]). A value that is no state fails the device
    /// ([`fail`](Self::fail)) before the error is returned.
    pub fn frontend_state<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
    ) -> Result<XenbusState, XenbusError> {
        match read_state(store, &self.frontend) {
            Err(e @ XenbusError::Invalid { .. }) => {
                self.fail(store, &e)?;
                Err(e)
            }
            other => other,
        }
    }

    /// Record `err` under [`error_node`] (as `xenbus_dev_fatal`) and go to Closing, unless
    /// already Closed.
    pub fn fail<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
        err: &XenbusError,
    ) -> Result<(), XenbusError> {
        record_error(store, &self.backend, err)?;
        self.close(store)
    }

    /// What became of the backend directory: its `state` gone, or Initialising again while
    /// the device was probed. A store failure reads as unchanged.
    pub fn backend_dir<S: Store + ?Sized>(&self, store: &mut S) -> BackendDir {
        match store.read(&path(&self.backend, "state")) {
            Ok(None) => BackendDir::Gone,
            Ok(Some(v))
                if XenbusState::parse(&v) == Some(XenbusState::Initialising)
                    && self.state != XenbusState::Initialising =>
            {
                BackendDir::Recreated
            }
            _ => BackendDir::Unchanged,
        }
    }

    /// Go to Closing unless already Closing or Closed (toolstack unplug, or the driver gave
    /// up on the frontend).
    pub fn close<S: Store + ?Sized>(&mut self, store: &mut S) -> Result<(), XenbusError> {
        if self.state != XenbusState::Closed {
            self.switch(store, XenbusState::Closing)?;
        }
        Ok(())
    }

    /// The driver tore the device down: go Closed, unless already Closed or the backend
    /// directory is gone (a forced detach: writing `state` would re-create it).
    pub fn closed_unless_removed<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
    ) -> Result<(), XenbusError> {
        if self.state == XenbusState::Closed || store.read(&path(&self.backend, "state"))?.is_none()
        {
            return Ok(());
        }
        self.switch(store, XenbusState::Closed)
    }
}

/// Whether the toolstack's backend directory `dir` may be probed: its `state` reads
/// Initialising, as Linux's `xenbus_probe_node` requires. A directory a detached device left
/// Closed (the toolstack removes it next) is not probed again.
pub fn backend_ready_to_probe<S: Store + ?Sized>(store: &mut S, dir: &str) -> bool {
    matches!(read_state(store, dir), Ok(XenbusState::Initialising))
}

/// What became of a probed device's backend directory ([`BackendDevice::backend_dir`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendDir {
    /// Still there, as the backend left it.
    Unchanged,
    /// Removed by the toolstack (a detach, forced or not): tear down and forget the device.
    Gone,
    /// Written again by the toolstack (`state` Initialising, which a backend never writes
    /// itself): a new device with the same id; tear the old one down, forget it and probe
    /// again.
    Recreated,
}

/// Where a fatal device error for `dir` is recorded: `error/<dir>/error` (without `dir`'s
/// leading slash), as `xenbus_dev_fatal` does.
pub fn error_node(dir: &str) -> String {
    format!("error/{}/error", dir.trim_start_matches('/'))
}

/// Record `err` for the device at `dir` under [`error_node`]. Changing state is the
/// caller's part.
pub fn record_error<S: Store + ?Sized>(
    store: &mut S,
    dir: &str,
    err: &XenbusError,
) -> Result<(), XenbusError> {
    store.write(&error_node(dir), &err.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    const DIR: &str = "/local/domain/0/backend/vif/5/0";

    fn store_with(name: &str, value: &str) -> MemStore {
        let mut s = MemStore::default();
        s.set(&path(DIR, name), value);
        s
    }

    /// A store whose every operation fails.
    struct Broken;

    impl Store for Broken {
        fn read(&mut self, path: &str) -> Result<Option<String>, StoreError> {
            Err(StoreError {
                op: "read",
                path: path.to_string(),
                reason: "EACCES".to_string(),
            })
        }
        fn write(&mut self, path: &str, _value: &str) -> Result<(), StoreError> {
            Err(StoreError {
                op: "write",
                path: path.to_string(),
                reason: "EACCES".to_string(),
            })
        }
    }

    #[test]
    fn state_numbers_match_xen_abi_section_8() {
        use XenbusState::*;
        let expected = [
            (Unknown, 0),
            (Initialising, 1),
            (InitWait, 2),
            (Initialised, 3),
            (Connected, 4),
            (Closing, 5),
            (Closed, 6),
            (Reconfiguring, 7),
            (Reconfigured, 8),
        ];
        for (state, n) in expected {
            assert_eq!(state.number(), n);
            assert_eq!(XenbusState::from_number(u64::from(n)), Some(state));
            assert_eq!(state.as_str(), n.to_string());
            assert_eq!(XenbusState::parse(state.as_str()), Some(state));
        }
        assert_eq!(
            XenbusState::ALL.map(|s| s.number()),
            [0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(XenbusState::from_number(9), None);
    }

    #[test]
    fn state_parse_refuses_non_canonical_and_truncatable_numbers() {
        for bad in [
            "",
            "9",
            "04",
            "+4",
            "-4",
            " 4",
            "4 ",
            "4\n",
            "0x4",
            "4294967300",
        ] {
            assert_eq!(XenbusState::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn backend_transition_table_is_exactly_the_protocol() {
        use XenbusState::*;
        let legal_pairs = [
            (Initialising, InitWait),
            (InitWait, Connected),
            (Initialising, Closing),
            (InitWait, Closing),
            (Connected, Closing),
            (Initialising, Closed),
            (InitWait, Closed),
            (Connected, Closed),
            (Closing, Closed),
            (Closed, InitWait),
        ];
        for from in XenbusState::ALL {
            for to in XenbusState::ALL {
                assert_eq!(
                    legal_backend_transition(from, to),
                    legal_pairs.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    const FE: &str = "/local/domain/5/device/vif/0";

    fn toolstack() -> MemStore {
        let mut s = store_with("frontend-id", "5");
        s.set(&path(DIR, "frontend"), FE);
        s
    }

    #[test]
    fn attach_reads_the_other_end_and_writes_nothing() {
        let mut s = toolstack();
        let before = s.nodes.clone();

        let dev = BackendDevice::attach(&mut s, DIR).unwrap();

        assert_eq!(dev.state(), XenbusState::Initialising);
        assert_eq!(
            (dev.backend_path(), dev.frontend_path(), dev.frontend_id()),
            (DIR, FE, 5)
        );
        assert_eq!(s.nodes, before);
        s.set(&path(DIR, "frontend"), "/local/domain/6/device/vif/0");
        assert!(matches!(
            BackendDevice::attach(&mut s, DIR),
            Err(XenbusError::Invalid { key, .. }) if key == path(DIR, "frontend")
        ));
    }

    #[test]
    fn switch_writes_legal_changes_only() {
        let mut s = toolstack();
        let mut dev = BackendDevice::attach(&mut s, DIR).unwrap();

        dev.switch(&mut s, XenbusState::InitWait).unwrap();
        assert_eq!(dev.state(), XenbusState::InitWait);
        assert_eq!(s.get(&path(DIR, "state")), Some("2"));

        // Staying put writes nothing.
        s.nodes.clear();
        dev.switch(&mut s, XenbusState::InitWait).unwrap();
        assert!(s.nodes.is_empty());

        let e = dev.switch(&mut s, XenbusState::Reconfigured).unwrap_err();
        assert_eq!(
            e,
            XenbusError::IllegalTransition {
                from: XenbusState::InitWait,
                to: XenbusState::Reconfigured
            }
        );
        assert_eq!(dev.state(), XenbusState::InitWait);
        assert!(s.nodes.is_empty());
    }

    #[test]
    fn closed_after_teardown_unless_the_directory_is_gone() {
        let mut s = toolstack();
        let mut dev = BackendDevice::attach(&mut s, DIR).unwrap();
        dev.switch(&mut s, XenbusState::InitWait).unwrap();
        dev.closed_unless_removed(&mut s).unwrap();
        assert_eq!(dev.state(), XenbusState::Closed);
        assert_eq!(s.get(&path(DIR, "state")), Some("6"));
        // Already Closed: nothing more is read or written.
        dev.closed_unless_removed(&mut Broken).unwrap();

        // A forced detach removed the directory: not re-created.
        let mut s = toolstack();
        let mut dev = BackendDevice::attach(&mut s, DIR).unwrap();
        dev.switch(&mut s, XenbusState::InitWait).unwrap();
        s.nodes.retain(|k, _| !k.starts_with(DIR));
        dev.closed_unless_removed(&mut s).unwrap();
        assert!(s.nodes.is_empty());
        assert_eq!(dev.state(), XenbusState::InitWait);
    }

    #[test]
    fn switch_keeps_the_state_when_the_store_fails() {
        let mut dev = BackendDevice::attach(&mut toolstack(), DIR).unwrap();
        let e = dev.switch(&mut Broken, XenbusState::InitWait).unwrap_err();
        assert!(matches!(e, XenbusError::Store(_)), "{e}");
        assert_eq!(dev.state(), XenbusState::Initialising);
    }

    #[test]
    fn garbage_frontend_state_fails_the_device_and_names_the_key() {
        let mut s = toolstack();
        let mut dev = BackendDevice::attach(&mut s, DIR).unwrap();
        dev.switch(&mut s, XenbusState::InitWait).unwrap();
        assert_eq!(dev.frontend_state(&mut s), Ok(XenbusState::Unknown));
        s.set(&path(FE, "state"), "4");
        assert_eq!(dev.frontend_state(&mut s), Ok(XenbusState::Connected));
        s.set(&path(FE, "state"), "04");

        let e = dev.frontend_state(&mut s).unwrap_err();

        assert_eq!(
            e,
            XenbusError::invalid(path(FE, "state"), "04", XenbusState::EXPECTED)
        );
        assert_eq!(dev.state(), XenbusState::Closing);
        assert_eq!(s.get(&path(DIR, "state")), Some("5"));
        assert_eq!(s.get(&error_node(DIR)), Some(e.to_string().as_str()));
    }

    #[test]
    fn fail_and_close_go_closing_but_never_reopen_a_closed_device() {
        let mut s = toolstack();
        let mut dev = BackendDevice::attach(&mut s, DIR).unwrap();
        dev.switch(&mut s, XenbusState::InitWait).unwrap();
        dev.close(&mut s).unwrap();
        assert_eq!(dev.state(), XenbusState::Closing);
        dev.close(&mut s).unwrap();
        assert_eq!(dev.state(), XenbusState::Closing);
        dev.switch(&mut s, XenbusState::Closed).unwrap();

        let err = XenbusError::Missing { key: "k".into() };
        dev.fail(&mut s, &err).unwrap();
        dev.close(&mut s).unwrap();

        assert_eq!(dev.state(), XenbusState::Closed);
        assert_eq!(s.get(&path(DIR, "state")), Some("6"));
        assert_eq!(s.get(&error_node(DIR)), Some("k: missing"));
    }

    #[test]
    fn parse_decimal_is_strict() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("4096"), Some(4096));
        assert_eq!(parse_decimal("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "00",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1_000",
            "0x10",
            "1e3",
            "١",
            "18446744073709551616",
            "100000000000000000000",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn u64_out_of_range_names_key_and_range() {
        let mut s = store_with("mtu", "20");
        let e = read_u64_in(&mut s, DIR, "mtu", 68..=65_521).unwrap_err();
        assert_eq!(
            e,
            XenbusError::Invalid {
                key: path(DIR, "mtu"),
                value: "20".to_string(),
                expected: "a decimal integer in 68..=65521".to_string()
            }
        );
        assert_eq!(
            e.to_string(),
            format!("{DIR}/mtu: \"20\" is invalid: expected a decimal integer in 68..=65521")
        );
        let mut s = store_with("mtu", "9000");
        assert_eq!(read_u64_in(&mut s, DIR, "mtu", 68..=65_521), Ok(Some(9000)));
        assert_eq!(
            read_u64_in(&mut MemStore::default(), DIR, "mtu", 68..=65_521),
            Ok(None)
        );
    }

    #[test]
    fn bool_accepts_only_0_and_1_and_defaults_when_absent() {
        let mut empty = MemStore::default();
        assert_eq!(read_bool(&mut empty, DIR, "feature-sg", false), Ok(false));
        assert_eq!(read_bool(&mut empty, DIR, "feature-sg", true), Ok(true));
        assert_eq!(
            read_bool(&mut store_with("feature-sg", "1"), DIR, "feature-sg", false),
            Ok(true)
        );
        assert_eq!(
            read_bool(&mut store_with("feature-sg", "0"), DIR, "feature-sg", true),
            Ok(false)
        );
        for bad in ["yes", "true", "2", "01", ""] {
            let e = read_bool(&mut store_with("feature-sg", bad), DIR, "feature-sg", false)
                .unwrap_err();
            assert_eq!(
                e,
                XenbusError::invalid(path(DIR, "feature-sg"), bad, "0 or 1"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn required_value_missing_names_the_full_key() {
        let e = read_required(&mut MemStore::default(), DIR, "mac").unwrap_err();
        assert_eq!(
            e,
            XenbusError::Missing {
                key: path(DIR, "mac")
            }
        );
        assert_eq!(e.to_string(), format!("{DIR}/mac: missing"));
        assert_eq!(
            read_required(&mut store_with("mac", "x"), DIR, "mac"),
            Ok("x".to_string())
        );
    }

    #[test]
    fn grant_ref_must_be_present_unreserved_and_32_bit() {
        assert_eq!(
            read_grant_ref(&mut store_with("ring-ref", "8"), DIR, "ring-ref"),
            Ok(8)
        );
        assert_eq!(
            read_grant_ref(&mut store_with("ring-ref", "4294967295"), DIR, "ring-ref"),
            Ok(u32::MAX)
        );
        for bad in ["0", "7", "4294967296", "abc"] {
            let e = read_grant_ref(&mut store_with("ring-ref", bad), DIR, "ring-ref").unwrap_err();
            assert_eq!(
                e,
                XenbusError::invalid(
                    path(DIR, "ring-ref"),
                    bad,
                    "a decimal integer in 8..=4294967295"
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            read_grant_ref(&mut MemStore::default(), DIR, "ring-ref"),
            Err(XenbusError::Missing {
                key: path(DIR, "ring-ref")
            })
        );
    }

    #[test]
    fn event_channel_is_a_2_level_port_other_than_0() {
        let name = "event-channel";
        assert_eq!(
            read_event_channel(&mut store_with(name, "1"), DIR, name),
            Ok(Some(1))
        );
        assert_eq!(
            read_event_channel(&mut store_with(name, "4095"), DIR, name),
            Ok(Some(4095))
        );
        assert_eq!(
            read_event_channel(&mut MemStore::default(), DIR, name),
            Ok(None)
        );
        for bad in ["0", "4096", "-1"] {
            let e = read_event_channel(&mut store_with(name, bad), DIR, name).unwrap_err();
            assert_eq!(
                e,
                XenbusError::invalid(path(DIR, name), bad, "a decimal integer in 1..=4095"),
                "{bad:?}"
            );
        }
    }

    fn other_end(id: &str, fe: &str) -> Result<(DomId, String), XenbusError> {
        let mut s = store_with("frontend-id", id);
        s.set(&path(DIR, "frontend"), fe);
        read_other_end(&mut s, DIR, "frontend-id", "frontend")
    }

    #[test]
    fn other_end_must_be_a_regular_domain_and_a_path_under_it() {
        assert_eq!(
            other_end("5", "/local/domain/5/device/vif/0"),
            Ok((5, "/local/domain/5/device/vif/0".to_string()))
        );
        for bad_id in ["32752", "65535", "x", "05", ""] {
            let e = other_end(bad_id, "/local/domain/5/device/vif/0").unwrap_err();
            assert_eq!(
                e,
                XenbusError::invalid(
                    path(DIR, "frontend-id"),
                    bad_id,
                    "a decimal integer in 0..=32751"
                ),
                "{bad_id:?}"
            );
        }
        for bad_path in [
            "/local/domain/6/device/vif/0",
            "/local/domain/5/",
            "/local/domain/5",
            "/local/domain/5/device/",
            "/local/domain/5//device",
            "/local/domain/50/device/vif/0",
            "device/vif/0",
        ] {
            let e = other_end("5", bad_path).unwrap_err();
            assert_eq!(
                e,
                XenbusError::invalid(
                    path(DIR, "frontend"),
                    bad_path,
                    "a path under /local/domain/5/"
                ),
                "{bad_path:?}"
            );
        }
        let mut s = MemStore::default();
        assert_eq!(
            read_other_end(&mut s, DIR, "frontend-id", "frontend"),
            Err(XenbusError::Missing {
                key: path(DIR, "frontend-id")
            })
        );
        s.set(&path(DIR, "frontend-id"), "5");
        assert_eq!(
            read_other_end(&mut s, DIR, "frontend-id", "frontend"),
            Err(XenbusError::Missing {
                key: path(DIR, "frontend")
            })
        );
    }

    #[test]
    fn state_node_missing_is_unknown_and_garbage_is_named() {
        assert_eq!(
            read_state(&mut MemStore::default(), DIR),
            Ok(XenbusState::Unknown)
        );
        assert_eq!(
            read_state(&mut store_with("state", "4"), DIR),
            Ok(XenbusState::Connected)
        );
        let e = read_state(&mut store_with("state", "42"), DIR).unwrap_err();
        assert_eq!(
            e,
            XenbusError::invalid(path(DIR, "state"), "42", "a XenbusState number 0..=8")
        );
    }

    #[test]
    fn store_failures_propagate_with_op_and_path() {
        let e = read_bool(&mut Broken, DIR, "online", false).unwrap_err();
        assert_eq!(e.to_string(), format!("xenstore read {DIR}/online: EACCES"));
        assert!(core::error::Error::source(&e).is_some());
        let e =
            record_error(&mut Broken, DIR, &XenbusError::Missing { key: "k".into() }).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("xenstore write error{DIR}/error: EACCES")
        );
    }

    #[test]
    fn error_is_recorded_under_the_error_tree() {
        let mut s = MemStore::default();
        let err = XenbusError::Missing {
            key: path(DIR, "mac"),
        };
        record_error(&mut s, DIR, &err).unwrap();
        let nodes: Vec<(&str, &str)> = s
            .nodes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            nodes,
            [(
                "error/local/domain/0/backend/vif/5/0/error",
                "/local/domain/0/backend/vif/5/0/mac: missing"
            )]
        );
    }

    proptest! {
        #[test]
        fn parse_decimal_accepts_exactly_canonical_u64_text(n in any::<u64>(), s in "\\PC{0,24}") {
            prop_assert_eq!(parse_decimal(&n.to_string()), Some(n));
            if let Some(v) = parse_decimal(&s) {
                prop_assert_eq!(v.to_string(), s);
            }
        }
    }
}
