//! The frontend side of the vbd xenbus handshake (XEN-ABI.md §5.2, §5.3): Initialising →
//! (backend InitWait) → rings and keys → Initialised → (backend Connected) → disk
//! parameters → Connected.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::blkif::{
    BLKIF_MAX_INDIRECT_SEGMENTS, BLKIF_MAX_SEGMENTS_PER_REQUEST, BlkifRequestSlot, BlkifResponse,
    MAX_RING_PAGE_ORDER, protocol, vdisk,
};
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::GrantRef;
use shared_abi::ring::FrontRing;
use shared_abi::xenbus::{
    XenbusError, XenbusState, parse_decimal, path, read_bool, read_other_end, read_state,
    read_u64_in, record_error,
};

use super::{BlkError, Events, Grants, XsStore};
use crate::front::{set_state, wait_backend};

/// Linux blkfront's default cap on indirect segments (`max_indirect_segments` = 32).
pub const DEFAULT_MAX_INDIRECT_SEGMENTS: usize = 32;
/// Queues used when the backend offers several (Linux: one per vCPU).
pub const DEFAULT_MAX_QUEUES: u32 = 1;

/// What the frontend asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontConfig {
    /// The device directory the toolstack wrote (`/local/domain/<me>/device/vbd/<devid>`).
    pub frontend_dir: String,
    /// Most queues to use (capped by the backend's `multi-queue-max-queues`).
    pub max_queues: u32,
    /// Ring page order to use (capped by the backend's `max-ring-page-order`).
    pub ring_page_order: u32,
    /// Offer `feature-persistent`.
    pub persistent: bool,
    /// Most segments per indirect request (0: never use indirect requests).
    pub max_indirect_segments: usize,
    /// Most data pages the frontend keeps (persistent pool or bounce pages).
    pub max_pages: usize,
    /// How many [`XsStore::wait`] rounds to wait for each backend state before giving up.
    pub wait_rounds: u32,
}

impl FrontConfig {
    /// Linux's defaults for the device at `frontend_dir`.
    pub fn new(frontend_dir: &str) -> Self {
        FrontConfig {
            frontend_dir: frontend_dir.to_string(),
            max_queues: DEFAULT_MAX_QUEUES,
            ring_page_order: 0,
            persistent: true,
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
            max_pages: 1024,
            wait_rounds: 20_000,
        }
    }
}

/// The disk as negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    pub backend_id: DomId,
    /// The device id (`handle` in requests).
    pub devid: u32,
    /// Capacity in 512-byte units (`sectors`).
    pub sectors_512: u64,
    /// Logical sector size (`sector-size`).
    pub sector_size: u32,
    pub physical_sector_size: u32,
    /// `info` (`VDISK_*` bits).
    pub info: u32,
    pub read_only: bool,
    pub flush: bool,
    pub barrier: bool,
    pub discard: bool,
    /// Persistent grants in use (both sides offered them).
    pub persistent: bool,
    /// Segments per request: 11, or the negotiated indirect maximum.
    pub max_segments: usize,
    /// Indirect requests in use.
    pub indirect: bool,
    pub queues: u32,
    pub ring_page_order: u32,
}

impl DiskInfo {
    /// Capacity in logical sectors.
    pub fn logical_sectors(&self) -> u64 {
        self.sectors_512 / (u64::from(self.sector_size) / 512)
    }
}

/// One queue as set up: its ring, our port, and the ring pages with their grants.
pub(crate) struct QueueSetup<P> {
    pub ring: FrontRing<BlkifRequestSlot, BlkifResponse>,
    pub port: EvtchnPort,
    pub ring_pages: Vec<(GrantRef, P)>,
}

pub(crate) struct Negotiated<P> {
    pub info: DiskInfo,
    pub queues: Vec<QueueSetup<P>>,
}

/// `xenbus_dev_fatal`: record the error and go Closing (best effort), then hand it back.
fn fatal<S: XsStore>(store: &mut S, dir: &str, e: BlkError) -> BlkError {
    if let BlkError::Xenbus(x) = &e {
        let _ = record_error(store, dir, x);
    }
    let _ = set_state(store, dir, XenbusState::Closing);
    e
}

/// The device id: the last component of the frontend directory, a strict decimal.
fn devid_of(dir: &str) -> Result<u32, BlkError> {
    let last = dir.rsplit('/').next().unwrap_or("");
    parse_decimal(last)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            BlkError::Xenbus(XenbusError::invalid(
                dir,
                last,
                "a frontend directory ending in a decimal device id",
            ))
        })
}

/// Run the handshake up to Connected.
pub(crate) fn negotiate<S: XsStore, G: Grants, E: Events>(
    store: &mut S,
    grants: &mut G,
    events: &mut E,
    cfg: &FrontConfig,
) -> Result<Negotiated<G::Page>, BlkError> {
    let fe = cfg.frontend_dir.as_str();
    let devid = devid_of(fe)?;
    let (backend_id, backend) = read_other_end(store, fe, "backend-id", "backend")?;
    match store.read(&path(fe, "device-type"))?.as_deref() {
        None | Some("disk") => {}
        Some(v) => {
            let e = XenbusError::invalid(path(fe, "device-type"), v, "disk");
            return Err(fatal(store, fe, e.into()));
        }
    }
    // A device left in another state by an earlier incarnation starts over.
    if read_state(store, fe)? != XenbusState::Initialising {
        set_state(store, fe, XenbusState::Initialising)?;
    }
    wait_backend(store, &backend, cfg.wait_rounds, "InitWait", |s| {
        s == XenbusState::InitWait
    })?;
    let r = talk_to_backend(store, grants, events, cfg, backend_id, &backend, devid);
    r.map_err(|e| fatal(store, fe, e))
}

fn talk_to_backend<S: XsStore, G: Grants, E: Events>(
    store: &mut S,
    grants: &mut G,
    events: &mut E,
    cfg: &FrontConfig,
    backend_id: DomId,
    backend: &str,
    devid: u32,
) -> Result<Negotiated<G::Page>, BlkError> {
    let fe = cfg.frontend_dir.as_str();
    // Linux accepts any order the backend names and caps it by its own maximum.
    let max_order = read_u64_in(
        store,
        backend,
        "max-ring-page-order",
        0..=u64::from(u32::MAX),
    )?
    .unwrap_or(0);
    let order = (cfg.ring_page_order.min(MAX_RING_PAGE_ORDER) as u64).min(max_order) as u32;
    let max_queues = read_u64_in(store, backend, "multi-queue-max-queues", 1..=65535)?.unwrap_or(1);
    let nq = u64::from(cfg.max_queues.max(1)).min(max_queues) as u32;

    let mut queues = Vec::new();
    for _ in 0..nq {
        let (mem, pages) = grants.alloc_ring(order)?;
        if mem.len() != PAGE_SIZE << order || pages.len() != 1 << order {
            return Err(BlkError::NoResources("ring pages"));
        }
        let ring = FrontRing::new(mem).map_err(|_| BlkError::NoResources("ring pages"))?;
        let mut ring_pages = Vec::new();
        for p in pages {
            let gref = grants.grant(backend_id, &p, false)?;
            ring_pages.push((gref, p));
        }
        let port = events.alloc_unbound(backend_id)?;
        queues.push(QueueSetup {
            ring,
            port,
            ring_pages,
        });
    }

    let mut keys: Vec<(String, String)> = Vec::new();
    if order > 0 {
        keys.push((path(fe, "ring-page-order"), order.to_string()));
    }
    if nq > 1 {
        keys.push((path(fe, "multi-queue-num-queues"), nq.to_string()));
    }
    for (i, q) in queues.iter().enumerate() {
        let dir = if nq > 1 {
            format!("{fe}/queue-{i}")
        } else {
            fe.to_string()
        };
        if order == 0 {
            keys.push((path(&dir, "ring-ref"), q.ring_pages[0].0.to_string()));
        } else {
            for (j, (gref, _)) in q.ring_pages.iter().enumerate() {
                keys.push((path(&dir, &format!("ring-ref{j}")), gref.to_string()));
            }
        }
        keys.push((path(&dir, "event-channel"), q.port.to_string()));
    }
    keys.push((path(fe, "protocol"), protocol::X86_64.to_string()));
    keys.push((
        path(fe, "feature-persistent"),
        if cfg.persistent { "1" } else { "0" }.to_string(),
    ));
    store.write_all(&keys)?;
    set_state(store, fe, XenbusState::Initialised)?;

    wait_backend(store, backend, cfg.wait_rounds, "Connected", |s| {
        s == XenbusState::Connected
    })?;
    let info = read_disk(store, cfg, backend, backend_id, devid, order, nq)?;
    set_state(store, fe, XenbusState::Connected)?;
    Ok(Negotiated { info, queues })
}

/// What the backend wrote at Connected, checked.
fn read_disk<S: XsStore>(
    store: &mut S,
    cfg: &FrontConfig,
    be: &str,
    backend_id: DomId,
    devid: u32,
    order: u32,
    queues: u32,
) -> Result<DiskInfo, BlkError> {
    let required = |store: &mut S, name: &str, max: u64| -> Result<u64, BlkError> {
        read_u64_in(store, be, name, 0..=max)?.ok_or_else(|| {
            BlkError::Xenbus(XenbusError::Missing {
                key: path(be, name),
            })
        })
    };
    // Capacity in bytes must fit a u64.
    let sectors_512 = required(store, "sectors", u64::MAX >> 9)?;
    let sector_size = required(store, "sector-size", 4096)? as u32;
    if !sector_size.is_power_of_two() || sector_size < 512 {
        return Err(XenbusError::invalid(
            path(be, "sector-size"),
            &sector_size.to_string(),
            "a power of two in 512..=4096",
        )
        .into());
    }
    if sectors_512 % u64::from(sector_size / 512) != 0 {
        return Err(XenbusError::invalid(
            path(be, "sectors"),
            &sectors_512.to_string(),
            "a whole number of logical sectors",
        )
        .into());
    }
    let info = required(store, "info", u64::from(u32::MAX))? as u32;
    let physical_sector_size = read_u64_in(store, be, "physical-sector-size", 512..=(1 << 20))?
        .map_or(sector_size, |v| v as u32);
    let flush = read_bool(store, be, "feature-flush-cache", false)?;
    let barrier = read_bool(store, be, "feature-barrier", false)?;
    let discard = read_bool(store, be, "feature-discard", false)?;
    let persistent = cfg.persistent && read_bool(store, be, "feature-persistent", false)?;
    let indirect_offer = read_u64_in(
        store,
        be,
        "feature-max-indirect-segments",
        0..=u64::from(u32::MAX),
    )?
    .unwrap_or(0) as usize;
    // Linux ignores offers of 11 or fewer (direct requests carry that many).
    let max_indirect = indirect_offer
        .min(cfg.max_indirect_segments)
        .min(BLKIF_MAX_INDIRECT_SEGMENTS);
    let indirect = max_indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST;
    Ok(DiskInfo {
        backend_id,
        devid,
        sectors_512,
        sector_size,
        physical_sector_size,
        info,
        read_only: info & vdisk::READONLY != 0,
        flush,
        barrier,
        discard,
        persistent,
        max_segments: if indirect {
            max_indirect
        } else {
            BLKIF_MAX_SEGMENTS_PER_REQUEST
        },
        indirect,
        queues,
        ring_page_order: order,
    })
}
