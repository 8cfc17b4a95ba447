//! The frontend side of the vif xenbus handshake (XEN-ABI.md §6.2, §6.3): Initialising →
//! (backend InitWait) → rings and keys → rx rings filled → Connected → (backend Connected).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::GrantRef;
use shared_abi::netif::{NetifRxRequest, NetifRxResponse, NetifTxRequest, NetifTxResponse};
use shared_abi::ring::FrontRing;
use shared_abi::xenbus::{
    XenbusError, XenbusState, parse_decimal, path, read_bool, read_other_end, read_required,
    read_state, read_u64_in, record_error,
};

use super::{Events, Grants, MAX_QUEUES, NetConfig, NetError, RING_SLOTS, XsStore};
use crate::front::{set_state, wait_backend};

/// The device as negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetInfo {
    pub backend_id: DomId,
    /// The backend's directory.
    pub backend: String,
    /// The device id (the frontend directory's last component).
    pub devid: u32,
    /// `mac` from the frontend directory.
    pub mac: [u8; 6],
    /// `mtu` from the frontend directory, if the toolstack wrote one.
    pub mtu: Option<u32>,
    pub queues: u32,
    /// One event channel per ring direction.
    pub split_event_channels: bool,
    /// Frames larger than a page are sent as several slots (we and the backend offer sg).
    pub tx_sg: bool,
    /// We accept multi-slot rx frames (`feature-sg` written as 1).
    pub rx_sg: bool,
    /// We accept blank checksums (`feature-no-csum-offload` = 0).
    pub csum_offload: bool,
    /// What the backend offered (read strictly; GSO is not used).
    pub backend_sg: bool,
    pub backend_gso_tcpv4: bool,
    pub backend_ipv6_csum_offload: bool,
}

/// One queue as set up: its rings, our port(s), and the two ring pages with their grants.
pub(crate) struct QueueSetup<P> {
    pub tx: FrontRing<NetifTxRequest, NetifTxResponse>,
    pub rx: FrontRing<NetifRxRequest, NetifRxResponse>,
    pub tx_port: EvtchnPort,
    /// The same as `tx_port` without split event channels.
    pub rx_port: EvtchnPort,
    pub ring_pages: Vec<(GrantRef, P)>,
}

pub(crate) struct Negotiated<P> {
    pub info: NetInfo,
    pub queues: Vec<QueueSetup<P>>,
}

/// `xenbus_dev_fatal`: record the error and go Closing (best effort), then hand it back.
fn fatal<S: XsStore>(store: &mut S, dir: &str, e: NetError) -> NetError {
    if let NetError::Xenbus(x) = &e {
        let _ = record_error(store, dir, x);
    }
    let _ = set_state(store, dir, XenbusState::Closing);
    e
}

/// The device id: the last component of the frontend directory, a strict decimal.
fn devid_of(dir: &str) -> Result<u32, NetError> {
    let last = dir.rsplit('/').next().unwrap_or("");
    parse_decimal(last)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            NetError::Xenbus(XenbusError::invalid(
                dir,
                last,
                "a frontend directory ending in a decimal device id",
            ))
        })
}

/// `xx:xx:xx:xx:xx:xx`, six two-digit hex octets, unicast and not all zero.
pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || out[0] & 1 != 0 || out == [0; 6] {
        return None;
    }
    Some(out)
}

/// Run the handshake up to the keys written (frontend still Initialising). The caller
/// fills the rx rings, then calls [`finish`].
pub(crate) fn negotiate<S: XsStore, G: Grants, E: Events>(
    store: &mut S,
    grants: &mut G,
    events: &mut E,
    fe: &str,
    cfg: &NetConfig,
) -> Result<Negotiated<G::Page>, NetError> {
    let devid = devid_of(fe)?;
    let (backend_id, backend) = read_other_end(store, fe, "backend-id", "backend")?;
    let own = (|| -> Result<([u8; 6], Option<u32>), NetError> {
        let mac_s = read_required(store, fe, "mac")?;
        let mac = parse_mac(&mac_s).ok_or_else(|| {
            XenbusError::invalid(path(fe, "mac"), &mac_s, "a unicast xx:xx:xx:xx:xx:xx")
        })?;
        let mtu = read_u64_in(store, fe, "mtu", 68..=65_535 - 14)?.map(|v| v as u32);
        Ok((mac, mtu))
    })();
    let (mac, mtu) = own.map_err(|e| fatal(store, fe, e))?;
    // A device left in another state by an earlier incarnation starts over.
    if read_state(store, fe)? != XenbusState::Initialising {
        set_state(store, fe, XenbusState::Initialising)?;
    }
    wait_backend(store, &backend, cfg.wait_rounds, "InitWait", |s| {
        s == XenbusState::InitWait
    })?;
    let mut info = NetInfo {
        backend_id,
        backend,
        devid,
        mac,
        mtu,
        queues: 1,
        split_event_channels: false,
        tx_sg: false,
        rx_sg: cfg.sg,
        csum_offload: cfg.csum_offload,
        backend_sg: false,
        backend_gso_tcpv4: false,
        backend_ipv6_csum_offload: false,
    };
    let mut queues = Vec::new();
    let r = talk_to_backend(store, grants, events, fe, cfg, &mut info, &mut queues);
    match r {
        Ok(()) => Ok(Negotiated { info, queues }),
        Err(e) => {
            release(grants, events, queues);
            Err(fatal(store, fe, e))
        }
    }
}

/// Undo a partial setup: end the ring grants, close the ports (ring memory is not reused).
pub(crate) fn release<G: Grants, E: Events>(
    grants: &mut G,
    events: &mut E,
    queues: Vec<QueueSetup<G::Page>>,
) {
    for q in queues {
        for (gref, _) in q.ring_pages {
            let _ = grants.end_access(gref);
        }
        events.close(q.tx_port);
        if q.rx_port != q.tx_port {
            events.close(q.rx_port);
        }
    }
}

fn talk_to_backend<S: XsStore, G: Grants, E: Events>(
    store: &mut S,
    grants: &mut G,
    events: &mut E,
    fe: &str,
    cfg: &NetConfig,
    info: &mut NetInfo,
    queues: &mut Vec<QueueSetup<G::Page>>,
) -> Result<(), NetError> {
    let be = info.backend.clone();
    let be = be.as_str();
    // Every backend key is read (and checked) before anything is written.
    if !read_bool(store, be, "feature-rx-copy", false)? {
        return Err(XenbusError::invalid(
            path(be, "feature-rx-copy"),
            &store
                .read(&path(be, "feature-rx-copy"))?
                .unwrap_or_else(|| "(absent)".to_string()),
            "1 (netfront needs the copying receive path)",
        )
        .into());
    }
    let max_queues = read_u64_in(store, be, "multi-queue-max-queues", 1..=65535)?.unwrap_or(1);
    let split = read_bool(store, be, "feature-split-event-channels", false)?;
    info.backend_sg = read_bool(store, be, "feature-sg", false)?;
    info.backend_gso_tcpv4 = read_bool(store, be, "feature-gso-tcpv4", false)?;
    info.backend_ipv6_csum_offload = read_bool(store, be, "feature-ipv6-csum-offload", false)?;
    info.tx_sg = cfg.sg && info.backend_sg;
    info.split_event_channels = split && cfg.split_event_channels;
    let nq = u64::from(cfg.queues.clamp(1, MAX_QUEUES)).min(max_queues) as u32;
    info.queues = nq;
    let backend_id = info.backend_id;

    for _ in 0..nq {
        let mut ring_pages = Vec::new();
        let tx = {
            let (mem, pages) = grants.alloc_ring(0)?;
            if mem.len() != PAGE_SIZE || pages.len() != 1 {
                return Err(NetError::NoResources("ring pages"));
            }
            for p in pages {
                ring_pages.push((grants.grant(backend_id, &p, false)?, p));
            }
            FrontRing::new(mem).map_err(|_| NetError::NoResources("ring pages"))?
        };
        let rx = {
            let (mem, pages) = grants.alloc_ring(0)?;
            if mem.len() != PAGE_SIZE || pages.len() != 1 {
                return Err(NetError::NoResources("ring pages"));
            }
            for p in pages {
                ring_pages.push((grants.grant(backend_id, &p, false)?, p));
            }
            FrontRing::<NetifRxRequest, NetifRxResponse>::new(mem)
                .map_err(|_| NetError::NoResources("ring pages"))?
        };
        if tx.nr_ents() as usize != RING_SLOTS || rx.nr_ents() as usize != RING_SLOTS {
            return Err(NetError::NoResources("ring pages"));
        }
        let tx_port = events.alloc_unbound(backend_id)?;
        let rx_port = if info.split_event_channels {
            match events.alloc_unbound(backend_id) {
                Ok(p) => p,
                Err(e) => {
                    events.close(tx_port);
                    return Err(e.into());
                }
            }
        } else {
            tx_port
        };
        queues.push(QueueSetup {
            tx,
            rx,
            tx_port,
            rx_port,
            ring_pages,
        });
    }

    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    let mut keys: Vec<(String, String)> = Vec::new();
    if nq > 1 {
        keys.push((path(fe, "multi-queue-num-queues"), nq.to_string()));
    }
    for (i, q) in queues.iter().enumerate() {
        let dir = if nq > 1 {
            format!("{fe}/queue-{i}")
        } else {
            fe.to_string()
        };
        keys.push((path(&dir, "tx-ring-ref"), q.ring_pages[0].0.to_string()));
        keys.push((path(&dir, "rx-ring-ref"), q.ring_pages[1].0.to_string()));
        if info.split_event_channels {
            keys.push((path(&dir, "event-channel-tx"), q.tx_port.to_string()));
            keys.push((path(&dir, "event-channel-rx"), q.rx_port.to_string()));
        } else {
            keys.push((path(&dir, "event-channel"), q.tx_port.to_string()));
        }
    }
    keys.push((path(fe, "request-rx-copy"), flag(true)));
    keys.push((path(fe, "feature-rx-notify"), flag(true)));
    keys.push((path(fe, "feature-sg"), flag(cfg.sg)));
    keys.push((path(fe, "feature-gso-tcpv4"), flag(false)));
    keys.push((path(fe, "feature-gso-tcpv6"), flag(false)));
    keys.push((path(fe, "feature-no-csum-offload"), flag(!cfg.csum_offload)));
    keys.push((
        path(fe, "feature-ipv6-csum-offload"),
        flag(cfg.csum_offload),
    ));
    store.write_all(&keys)?;
    Ok(())
}

/// Go Connected (the rx rings are filled) and wait for the backend to connect.
pub(crate) fn finish<S: XsStore>(
    store: &mut S,
    fe: &str,
    backend: &str,
    cfg: &NetConfig,
) -> Result<(), NetError> {
    set_state(store, fe, XenbusState::Connected)?;
    wait_backend(store, backend, cfg.wait_rounds, "Connected", |s| {
        s == XenbusState::Connected
    })
    .map(drop)
    .map_err(|e| fatal(store, fe, e.into()))
}
