//! The backend side of the vif xenbus handshake (XEN-ABI.md §6.2, §6.3, §8) as pure logic over
//! the key/value [`Store`] of [`shared_abi::xenbus`], so it is tested without xenstore.
//!
//! Owns: the backend's [`XenbusState`] for one vif (the states, the legal transitions and the
//! strict value readers are the shared xenbus contract, in `shared_abi::xenbus`); the feature
//! keys the backend advertises; reading and validating every key the frontend (and the
//! toolstack) wrote. A value that is missing or malformed yields an [`XenbusError`] naming the
//! full key path and the allowed values; the backend then writes the message under
//! `error/…/error` (as Linux's `xenbus_dev_fatal`) and goes to Closing.
//!
//! The frontend's directory is hostile input: it is read only at the moments the protocol
//! says (frontend Connected while the backend waits in InitWait), each value parsed strictly.
//! The `frontend` path itself comes from the toolstack's backend directory and must lie under
//! `/local/domain/<frontend-id>/`.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::GrantRef;
use shared_abi::xenbus::{
    BackendDevice, BackendDir, Store, XenbusError, XenbusState, parse_decimal, path, read_bool,
    read_event_channel, read_grant_ref, read_required, read_u64_in,
};

use crate::backend::MAX_QUEUES;
use crate::packet::MacAddr;

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
    /// `ip` (backend directory, optional): the IPv4 addresses the vif may send from, libxl's
    /// space-separated list. `None`: any source address (only the MAC is policed).
    pub ipv4: Option<Vec<[u8; 4]>>,
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
    /// The frontend is Closing: tear the vif down (unmap rings, unbind channels); the
    /// device stays (Closing).
    Disconnect,
    /// The frontend is Closed and the device stays online: tear the vif down, then call
    /// [`NetbackXenbus::disconnected`] (Closed; the frontend may come back).
    Close,
    /// Tear down, call [`NetbackXenbus::disconnected`], and forget the device (the frontend
    /// closed after the toolstack set `online` = 0, or its directory is gone).
    Remove,
}

/// The backend half of one vif's xenbus device.
#[derive(Clone, Debug)]
pub struct NetbackXenbus {
    dev: BackendDevice,
    features: BackendFeatures,
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
            return Err(XenbusError::invalid(
                path(backend_dir, "multi-queue-max-queues"),
                &features.max_queues.to_string(),
                format!("1..={MAX_QUEUES}"),
            ));
        }
        let mut vif = NetbackXenbus {
            dev: BackendDevice::attach(store, backend_dir)?,
            features,
        };
        vif.advertise(store)?;
        vif.dev.switch(store, XenbusState::InitWait)?;
        Ok(vif)
    }

    pub fn state(&self) -> XenbusState {
        self.dev.state()
    }

    pub fn frontend_path(&self) -> &str {
        self.dev.frontend_path()
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
            store.write(&path(self.dev.backend_path(), k), v)?;
        }
        Ok(())
    }

    /// React to a change of the frontend's `state` node.
    pub fn frontend_changed<S: Store>(&mut self, store: &mut S) -> Result<Action, XenbusError> {
        let fstate = self.dev.frontend_state(store)?;
        use XenbusState::*;
        Ok(match fstate {
            // The frontend's directory is gone.
            Unknown => Action::Remove,
            Initialising | InitWait | Initialised => {
                if self.dev.state() == Closed {
                    // The frontend came back: offer the device again.
                    self.advertise(store)?;
                    self.dev.switch(store, InitWait)?;
                }
                Action::None
            }
            Connected => {
                if self.dev.state() != InitWait {
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
                if matches!(self.dev.state(), InitWait | Connected) {
                    self.dev.switch(store, Closing)?;
                }
                Action::Disconnect
            }
            // Closed is written only after the caller unmapped everything
            // (`disconnected`): the frontend ends its grants when it sees it.
            Closed => {
                if read_bool(store, self.dev.backend_path(), "online", false).unwrap_or(false) {
                    Action::Close
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
        self.dev.switch(store, XenbusState::Connected)
    }

    /// The caller tore the vif down after [`Action::Close`] or [`Action::Remove`]: go
    /// Closed, unless the backend directory is gone (a forced detach: writing `state` would
    /// re-create it).
    pub fn disconnected<S: Store>(&mut self, store: &mut S) -> Result<(), XenbusError> {
        self.dev.closed_unless_removed(store)
    }

    /// What became of the backend directory since the probe (the toolstack removed it, or
    /// wrote it again for a new device with the same id).
    pub fn backend_dir<S: Store>(&self, store: &mut S) -> BackendDir {
        self.dev.backend_dir(store)
    }

    /// Record `err` under `error/<backend>/error` (as `xenbus_dev_fatal`) and go to Closing.
    pub fn fail<S: Store>(&mut self, store: &mut S, err: &XenbusError) -> Result<(), XenbusError> {
        self.dev.fail(store, err)
    }

    /// Toolstack-initiated close: go to Closing (the frontend answers Closed, then
    /// [`frontend_changed`](Self::frontend_changed) finishes).
    pub fn close<S: Store>(&mut self, store: &mut S) -> Result<(), XenbusError> {
        self.dev.close(store)
    }

    fn read_queue<S: Store>(&self, store: &mut S, dir: &str) -> Result<QueueRings, XenbusError> {
        let tx_ring_ref = read_grant_ref(store, dir, "tx-ring-ref")?;
        let rx_ring_ref = read_grant_ref(store, dir, "rx-ring-ref")?;
        let single = read_event_channel(store, dir, "event-channel")?;
        let tx = read_event_channel(store, dir, "event-channel-tx")?;
        let rx = read_event_channel(store, dir, "event-channel-rx")?;
        let event = match (single, tx, rx) {
            (Some(p), None, None) => EventChannels::Single(p),
            (None, Some(tx), Some(rx)) if self.features.split_event_channels => {
                EventChannels::Split { tx, rx }
            }
            (None, None, None) => {
                return Err(XenbusError::Missing {
                    key: path(dir, "event-channel"),
                });
            }
            _ => {
                let expected = if self.features.split_event_channels {
                    "either event-channel alone or both event-channel-tx and event-channel-rx"
                } else {
                    "event-channel alone (split event channels are not offered)"
                };
                return Err(XenbusError::invalid(
                    path(dir, "event-channel-tx"),
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
        let fe = self.dev.frontend_path().to_string();
        let be = self.dev.backend_path();
        let f = self.features;
        let n = read_u64_in(
            store,
            &fe,
            "multi-queue-num-queues",
            1..=u64::from(f.max_queues),
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
        if !read_bool(store, &fe, "request-rx-copy", false)? {
            return Err(XenbusError::invalid(
                path(&fe, "request-rx-copy"),
                "0 or absent",
                "1 (page flipping is not supported)",
            ));
        }
        if !read_bool(store, &fe, "feature-rx-notify", false)? {
            return Err(XenbusError::invalid(
                path(&fe, "feature-rx-notify"),
                "0 or absent",
                "1 (the backend relies on rx notifications)",
            ));
        }
        let sg = read_bool(store, &fe, "feature-sg", false)?;
        // GSO needs scatter-gather: a GSO packet does not fit one page.
        let gso_tcpv4 = read_bool(store, &fe, "feature-gso-tcpv4", false)? && sg;
        let gso_tcpv6 = read_bool(store, &fe, "feature-gso-tcpv6", false)? && sg;
        let csum_ipv4 = !read_bool(store, &fe, "feature-no-csum-offload", false)?;
        let csum_ipv6 = read_bool(store, &fe, "feature-ipv6-csum-offload", false)?;
        let mcast = read_bool(store, &fe, "request-multicast-control", false)?
            || read_bool(store, &fe, "feature-multicast-control", false)?;
        let mac_key = path(be, "mac");
        let mac_s = read_required(store, be, "mac")?;
        let mac = match MacAddr::parse(&mac_s) {
            Some(m) if !m.is_multicast() && !m.is_zero() => m,
            _ => {
                return Err(XenbusError::invalid(
                    mac_key,
                    &mac_s,
                    "a unicast xx:xx:xx:xx:xx:xx",
                ));
            }
        };
        let rate = match store.read(&path(be, "rate"))? {
            None => None,
            Some(v) => {
                let parsed = v.split_once(',').and_then(|(b, u)| {
                    let (b, u) = (parse_decimal(b)?, parse_decimal(u)?);
                    (b > 0 && u > 0).then_some((b, u))
                });
                match parsed {
                    Some(r) => Some(r),
                    None => {
                        return Err(XenbusError::invalid(
                            path(be, "rate"),
                            &v,
                            "\"bytes,usec\" with both positive decimal integers",
                        ));
                    }
                }
            }
        };
        let ipv4 = match store.read(&path(be, "ip"))? {
            None => None,
            Some(v) => match parse_ipv4_list(&v) {
                Some(l) => Some(l),
                None => {
                    return Err(XenbusError::invalid(
                        path(be, "ip"),
                        &v,
                        "space-separated dotted-quad IPv4 addresses",
                    ));
                }
            },
        };
        let mtu = read_u64_in(store, &fe, "mtu", 68..=65_535 - 14)?.map(|v| v as u32);
        Ok(Connection {
            frontend_id: self.dev.frontend_id(),
            queues,
            sg,
            gso_tcpv4,
            gso_tcpv6,
            csum_ipv4,
            csum_ipv6,
            multicast_control: mcast && f.multicast_control,
            mac,
            rate,
            ipv4,
            mtu,
        })
    }
}

/// One dotted-quad IPv4 address, strictly: four decimal octets 0..=255, no signs, no
/// leading zeros beyond a lone `0`.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if p.len() > 1 && p.starts_with('0') {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// libxl's `ip` value: one or more addresses separated by spaces; `None` if empty or any is
/// malformed.
pub fn parse_ipv4_list(s: &str) -> Option<Vec<[u8; 4]>> {
    let l: Option<Vec<[u8; 4]>> = s.split_whitespace().map(parse_ipv4).collect();
    l.filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_lists_are_parsed_strictly() {
        assert_eq!(parse_ipv4("10.0.2.15"), Some([10, 0, 2, 15]));
        assert_eq!(
            parse_ipv4_list("10.0.0.2 192.168.1.255"),
            Some(alloc::vec![[10, 0, 0, 2], [192, 168, 1, 255]])
        );
        for bad in [
            "",
            " ",
            "10.0.0",
            "10.0.0.2.1",
            "256.0.0.1",
            "+1.0.0.1",
            "01.0.0.1",
            "a.b.c.d",
            "10..0.1",
            "10.0.0.2,10.0.0.3",
        ] {
            assert_eq!(parse_ipv4_list(bad), None, "{bad:?}");
        }
    }
}
