//! The blkif backend engine for one virtual block device ([`Vbd`]): its queues (one shared
//! ring each), the requests in flight on the device, and the grant mappings they hold.
//!
//! **Flow.** [`Vbd::process_queue`] takes requests off a ring, each copied out of the shared
//! page and checked completely ([`crate::request`]) before anything is done for it; a refused
//! request is answered at once (`BLKIF_RSP_ERROR`, or `EOPNOTSUPP` for an operation not
//! offered), logged with rate limiting, and the ring goes on. An accepted request has its
//! grants mapped (a map failure refuses it; nothing reaches the device), is submitted to the
//! [`BlockIo`] under a fresh tag, and is answered only when [`Vbd::process_completions`]
//! collects its completion, in whatever order the device finishes. A write's data is copied
//! out of the frontend's pages before submission (its mappings are released then); a read's
//! data is copied into them after completion. A response is `OKAY` only if the device
//! reported success for the whole request, so writes are acknowledged once the device has them
//! and flushes once the device has flushed.
//!
//! **Ordering.** A barrier (`WRITE_BARRIER`) waits until every earlier request of its queue
//! has completed, and no later request of that queue is started until it completes. Each
//! queue also bounds the data bytes in flight; a request that would exceed the bound waits
//! (parked, already checked) until completions make room, but one request is always allowed.
//!
//! **Mapping quota.** Every grant mapping counts against the backend domain's maptrack quota,
//! which all its frontends share. A map refused for want of space (`GNTST_no_space`) is not the
//! frontend's fault and never costs it its request: the device first gives up its idle
//! persistent mappings and retries; if the quota is still used up the request waits (parked,
//! [`QueuePass::stalled`]) and is retried on the next pass, after completions (here or on
//! another device of the domain) have given mappings back. The domain keeps persistent pools
//! within a budget below the quota ([`Vbd::set_persistent_limit`]), so a request always fits
//! once nothing else is in flight.
//!
//! **Blame.** A bad request costs the frontend that request. A frontend that corrupts its
//! ring's producer index has broken the protocol: the whole device is disconnected
//! ([`Disconnect::RingCorrupted`]), every mapping it held is unmapped, completions still
//! arriving for it are dropped. Nothing here panics on ring content.
//!
//! Invariants: every live mapping is held by exactly one of: an in-flight read, a queue's
//! persistent pool; each consumed request gets exactly one response while connected.
//! Single-threaded: driven through `&mut self`, no locks.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::blkif::{
    BLKIF_MAX_INDIRECT_SEGMENTS, BLKIF_SEGS_PER_INDIRECT_FRAME, BlkifRequestSegment,
    BlkifRequestSlot, BlkifResponse, rsp,
};
use shared_abi::grant_table::{GntStatus, GrantRef};
use shared_abi::ring::{BackRing, RingError, SharedRingMem};

use crate::device::{BlockIo, DeviceError, DeviceInfo, IoOp, IoRequest};
use crate::grant::{GrantMapper, MapRequest, Mapping};
use crate::persistent::PersistentGrants;
use crate::request::{
    Action, Checked, Fault, FaultKind, IndirectHeader, Limits, Plan, Rejection, check_request,
    check_segments,
};

/// Most queues (rings) one device may have.
pub const MAX_QUEUES: usize = 16;
/// Linux blkback's default for persistent grants per ring (`xen_blkif_max_pgrants`).
pub const DEFAULT_MAX_PERSISTENT_GRANTS: usize = 1056;
/// Linux blkback's advertised `feature-max-indirect-segments`.
pub const DEFAULT_MAX_INDIRECT_SEGMENTS: usize = 256;

/// The share of a domain's persistent-grant budget each connected queue may keep: the
/// budget divided evenly (a frontend's legitimate pool then never starves another's I/O).
/// Linux blkback keeps up to 1056 per ring; with a maptrack quota of 1024 for the whole
/// domain the budget has to be shared.
pub fn persistent_share(budget: usize, connected_queues: usize) -> usize {
    budget.checked_div(connected_queues).unwrap_or(budget)
}

/// The persistent-grant budget for a domain with `maptrack_quota` mappings: half of it, so
/// that the other half is left for per-request mappings (one maximal indirect request needs
/// 256 segment pages and an indirect page).
pub fn persistent_budget(maptrack_quota: usize) -> usize {
    maptrack_quota / 2
}

/// The event-channel seam: tell the frontend that queue `queue` has new responses.
pub trait Notify {
    fn notify(&mut self, queue: u16);
}

/// What a device offers and enforces; the xenbus layer advertises exactly these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VbdConfig {
    /// The frontend domain (owner of every grant ref on the rings).
    pub frontend: DomId,
    /// Persistent grants negotiated (both sides said `feature-persistent`).
    pub persistent: bool,
    /// Most persistent mappings per queue.
    pub max_persistent_grants: usize,
    /// `feature-max-indirect-segments` (0 = no indirect requests; at most 4096).
    pub max_indirect_segments: usize,
    /// Offer `feature-flush-cache`.
    pub flush: bool,
    /// Offer `feature-barrier`.
    pub barrier: bool,
    /// Offer `feature-discard` (only if the device can discard).
    pub discard: bool,
    /// Refuse writes (toolstack `mode` = `r`), whatever the device allows.
    pub read_only: bool,
    /// Most data bytes in flight per queue (one request is always allowed).
    pub max_inflight_bytes: usize,
    /// Most requests taken from one ring per [`Vbd::process_queue`] call (fairness).
    pub budget: usize,
}

impl VbdConfig {
    /// Defaults for a device of `frontend`: everything offered, Linux's limits.
    pub fn new(frontend: DomId) -> Self {
        VbdConfig {
            frontend,
            persistent: true,
            max_persistent_grants: DEFAULT_MAX_PERSISTENT_GRANTS,
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
            flush: true,
            barrier: true,
            discard: true,
            read_only: false,
            max_inflight_bytes: 16 << 20,
            budget: 64,
        }
    }
}

/// Why a device cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VbdError {
    #[error("{0} queues requested, allowed 1..={MAX_QUEUES}")]
    Queues(usize),
    #[error("max_indirect_segments {0}, allowed 0 or 12..={BLKIF_MAX_INDIRECT_SEGMENTS}")]
    IndirectSegments(usize),
    #[error("budget must be at least 1")]
    Budget,
    #[error("ring {queue}: {error}")]
    Ring { queue: usize, error: RingError },
    #[error("device: {0}")]
    Device(DeviceError),
}

/// Why a device stopped serving its frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disconnect {
    /// The frontend published a bogus producer index on `queue`.
    RingCorrupted { queue: u16, error: RingError },
    /// [`Vbd::shutdown`] was called (xenbus close).
    Closed,
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disconnect::RingCorrupted { queue, error } => {
                write!(f, "frontend corrupted ring {queue}: {error}")
            }
            Disconnect::Closed => write!(f, "device closed"),
        }
    }
}

/// What the features negotiated amount to, as the frontend is told at connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advertised {
    /// Size in 512-byte units (`sectors`).
    pub sectors: u64,
    pub sector_size: u32,
    pub physical_sector_size: u32,
    pub read_only: bool,
    pub flush: bool,
    pub barrier: bool,
    pub persistent: bool,
    pub max_indirect_segments: usize,
    /// `feature-discard` and its parameters.
    pub discard: Option<crate::device::DiscardInfo>,
}

/// Counters of one device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VbdStats {
    /// Requests consumed from the rings.
    pub requests: u64,
    /// Responses by status.
    pub okay: u64,
    pub error: u64,
    pub eopnotsupp: u64,
    /// Refused requests by reason (indexed by [`FaultKind`]).
    pub faults: [u64; FaultKind::COUNT],
    /// Device operations that failed.
    pub device_errors: u64,
    /// Reads whose data could not be copied into the frontend's pages.
    pub copy_errors: u64,
    /// Segment grants found in a persistent pool.
    pub persistent_hits: u64,
    /// Grants mapped (persistent or not).
    pub grants_mapped: u64,
    /// Requests that had to wait (barrier drain or in-flight bound).
    pub parked: u64,
    /// Times a request waited because the domain's mapping quota was used up.
    pub map_waits: u64,
    /// Persistent mappings given up (limit lowered, or map pressure).
    pub persistent_evictions: u64,
    /// Completions dropped because their device was disconnected.
    pub stale_completions: u64,
}

impl VbdStats {
    /// Refused requests of one kind.
    pub fn fault(&self, kind: FaultKind) -> u64 {
        self.faults[kind as usize]
    }
}

/// One call's work on one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueuePass {
    /// Requests taken off the ring.
    pub consumed: usize,
    /// Of those, refused at once.
    pub rejected: usize,
    /// The budget ran out with requests left: call again.
    pub more: bool,
    /// A request waits for completions (barrier or in-flight bound).
    pub stalled: bool,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    mapping: Mapping,
    persistent: bool,
}

/// A request on the device.
struct InFlight {
    queue: u16,
    id: u64,
    rsp_op: u8,
    /// Mappings of a read's pages, and where each segment's bytes go.
    held: Vec<Held>,
    scatter: Vec<(usize, Range<usize>)>,
    bytes: usize,
    drain: bool,
}

/// A request taken off the ring and waiting.
enum Parked {
    /// Checked, waiting for room, a drain, or mapping quota.
    Plan(Plan),
    /// An indirect request whose segment pages could not be mapped yet (quota).
    Slot(BlkifRequestSlot),
}

/// Why grants could not be mapped.
enum MapFailure {
    /// The frontend's doing (bad ref, permissions): the request is refused.
    Fault(Fault),
    /// The domain's mapping quota is used up: the request waits.
    NoSpace,
}

/// What checking a request came to.
enum Prepared {
    Ready(Plan),
    Rejected(Rejection),
    NoSpace,
}

struct Queue {
    ring: BackRing<BlkifRequestSlot, BlkifResponse>,
    inflight: u32,
    inflight_bytes: usize,
    /// A request waiting for room, a drain or mapping quota.
    parked: Option<Parked>,
    /// A barrier is on the device: start nothing else.
    draining: bool,
    persistent: PersistentGrants,
    /// Responses written but not yet published.
    unpublished: bool,
}

/// One virtual block device served to one frontend.
pub struct Vbd<D> {
    cfg: VbdConfig,
    limits: Limits,
    info: DeviceInfo,
    io: D,
    queues: Vec<Queue>,
    inflight: BTreeMap<u64, InFlight>,
    next_tag: u64,
    stopped: Option<Disconnect>,
    stats: VbdStats,
    scratch: Vec<Result<Mapping, GntStatus>>,
}

impl<D> fmt::Debug for Vbd<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vbd")
            .field("frontend", &self.cfg.frontend)
            .field("queues", &self.queues.len())
            .field("inflight", &self.inflight.len())
            .field("stopped", &self.stopped)
            .finish()
    }
}

impl<D: BlockIo> Vbd<D> {
    /// Serve `io` to `cfg.frontend` over `rings` (already mapped, one per queue).
    pub fn new(cfg: VbdConfig, io: D, rings: Vec<SharedRingMem>) -> Result<Self, VbdError> {
        if rings.is_empty() || rings.len() > MAX_QUEUES {
            return Err(VbdError::Queues(rings.len()));
        }
        let n = cfg.max_indirect_segments;
        if n != 0 && !(12..=BLKIF_MAX_INDIRECT_SEGMENTS).contains(&n) {
            return Err(VbdError::IndirectSegments(n));
        }
        if cfg.budget == 0 {
            return Err(VbdError::Budget);
        }
        let info = io.info();
        info.validate().map_err(VbdError::Device)?;
        let read_only = cfg.read_only || info.read_only;
        let discard = info.discard.filter(|_| cfg.discard && !read_only);
        let limits = Limits {
            read_only,
            flush: cfg.flush && !read_only,
            barrier: cfg.barrier && !read_only,
            discard: discard.is_some(),
            discard_secure: discard.is_some_and(|d| d.secure),
            max_indirect_segments: n,
            ..Limits::for_device(&info)
        };
        let pgrants = if cfg.persistent {
            cfg.max_persistent_grants
        } else {
            0
        };
        let queues = rings
            .into_iter()
            .enumerate()
            .map(|(queue, mem)| {
                Ok(Queue {
                    ring: BackRing::new(mem).map_err(|error| VbdError::Ring { queue, error })?,
                    inflight: 0,
                    inflight_bytes: 0,
                    parked: None,
                    draining: false,
                    persistent: PersistentGrants::new(pgrants),
                    unpublished: false,
                })
            })
            .collect::<Result<Vec<_>, VbdError>>()?;
        Ok(Vbd {
            cfg,
            limits,
            info,
            io,
            queues,
            inflight: BTreeMap::new(),
            next_tag: 1,
            stopped: None,
            stats: VbdStats::default(),
            scratch: Vec::new(),
        })
    }

    /// What the frontend must be told at connect (the xenbus `sectors`, `info`, feature keys).
    pub fn advertised(&self) -> Advertised {
        Advertised {
            sectors: self.limits.capacity_512,
            sector_size: self.info.sector_size,
            physical_sector_size: self.info.physical_sector_size,
            read_only: self.limits.read_only,
            flush: self.limits.flush,
            barrier: self.limits.barrier,
            persistent: self.cfg.persistent,
            max_indirect_segments: self.limits.max_indirect_segments,
            discard: if self.limits.discard {
                self.info.discard
            } else {
                None
            },
        }
    }

    pub fn config(&self) -> &VbdConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &VbdStats {
        &self.stats
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Requests on the device.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Persistent mappings kept by `queue`.
    pub fn persistent_grants(&self, queue: usize) -> usize {
        self.queues.get(queue).map_or(0, |q| q.persistent.len())
    }

    /// Persistent mappings kept by all queues.
    pub fn persistent_total(&self) -> usize {
        self.queues.iter().map(|q| q.persistent.len()).sum()
    }

    /// Set each queue's persistent-pool limit (the domain's budget divided among the
    /// connected queues), unmapping idle mappings over it now; busy ones go when released.
    /// Never above the negotiated [`VbdConfig::max_persistent_grants`].
    pub fn set_persistent_limit<G: GrantMapper>(&mut self, per_queue: usize, grants: &mut G) {
        if !self.cfg.persistent || self.stopped.is_some() {
            return;
        }
        let limit = per_queue.min(self.cfg.max_persistent_grants);
        let mut gone = Vec::new();
        for q in &mut self.queues {
            gone.extend(q.persistent.set_max(limit));
        }
        self.unmap_evicted(&gone, grants);
    }

    fn unmap_evicted<G: GrantMapper>(&mut self, gone: &[Mapping], grants: &mut G) {
        if !gone.is_empty() {
            self.stats.persistent_evictions += gone.len() as u64;
            grants.unmap(gone);
        }
    }

    /// Give up every idle persistent mapping of every queue (map pressure). True if any went.
    fn evict_idle<G: GrantMapper>(&mut self, grants: &mut G) -> bool {
        let mut gone = Vec::new();
        for q in &mut self.queues {
            gone.extend(q.persistent.evict_idle());
        }
        self.unmap_evicted(&gone, grants);
        !gone.is_empty()
    }

    /// Why the device stopped, if it did.
    pub fn stopped(&self) -> Option<Disconnect> {
        self.stopped
    }

    pub fn io(&self) -> &D {
        &self.io
    }

    pub fn io_mut(&mut self) -> &mut D {
        &mut self.io
    }

    /// Take up to `budget` requests off queue `queue`'s ring; refuse the bad ones, submit the
    /// good ones; publish responses (notifying if the frontend asked). An unknown queue index
    /// has nothing to do.
    pub fn process_queue<G: GrantMapper, N: Notify>(
        &mut self,
        queue: usize,
        grants: &mut G,
        notify: &mut N,
    ) -> Result<QueuePass, Disconnect> {
        if let Some(d) = self.stopped {
            return Err(d);
        }
        let mut pass = QueuePass::default();
        if queue >= self.queues.len() {
            return Ok(pass);
        }
        loop {
            match self.queues[queue].parked.take() {
                Some(Parked::Plan(plan)) => {
                    if self.must_wait(queue, &plan) {
                        self.queues[queue].parked = Some(Parked::Plan(plan));
                        pass.stalled = true;
                        break;
                    }
                    if !self.dispatch(queue, plan, grants) {
                        pass.stalled = true;
                        break;
                    }
                    continue;
                }
                Some(Parked::Slot(slot)) => {
                    if !self.take_prepared(queue, slot, grants, &mut pass) {
                        break;
                    }
                    continue;
                }
                None => {}
            }
            if self.queues[queue].draining {
                pass.stalled = true;
                break;
            }
            if pass.consumed >= self.cfg.budget {
                pass.more = true;
                break;
            }
            let q = &mut self.queues[queue];
            let slot = match q.ring.get_request() {
                Ok(Some(slot)) => slot,
                Ok(None) => match q.ring.final_check_for_requests() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(error) => return Err(self.corrupted(queue, error, grants)),
                },
                Err(error) => return Err(self.corrupted(queue, error, grants)),
            };
            pass.consumed += 1;
            self.stats.requests += 1;
            if !self.take_prepared(queue, slot, grants, &mut pass) {
                break;
            }
        }
        self.publish(queue, notify);
        Ok(pass)
    }

    /// Check a consumed request and refuse, park or dispatch it. False when it waits for
    /// mapping quota (the pass should stop).
    fn take_prepared<G: GrantMapper>(
        &mut self,
        queue: usize,
        slot: BlkifRequestSlot,
        grants: &mut G,
        pass: &mut QueuePass,
    ) -> bool {
        match self.prepare(queue, &slot, grants) {
            Prepared::Rejected(rej) => {
                pass.rejected += 1;
                self.reject(queue, rej);
                true
            }
            Prepared::NoSpace => {
                self.stats.map_waits += 1;
                self.queues[queue].parked = Some(Parked::Slot(slot));
                pass.stalled = true;
                false
            }
            Prepared::Ready(plan) => {
                if self.must_wait(queue, &plan) {
                    self.stats.parked += 1;
                    self.queues[queue].parked = Some(Parked::Plan(plan));
                    true
                } else if self.dispatch(queue, plan, grants) {
                    true
                } else {
                    pass.stalled = true;
                    false
                }
            }
        }
    }

    /// Collect every finished device operation and answer its request. Returns the number
    /// of requests answered.
    pub fn process_completions<G: GrantMapper, N: Notify>(
        &mut self,
        grants: &mut G,
        notify: &mut N,
    ) -> usize {
        let mut answered = 0;
        while let Some(c) = self.io.poll() {
            let Some(inf) = self.inflight.remove(&c.tag) else {
                self.stats.stale_completions += 1;
                continue;
            };
            let qi = usize::from(inf.queue);
            let mut status = rsp::OKAY;
            if let Err(e) = c.result {
                self.stats.device_errors += 1;
                if self.stats.device_errors.is_power_of_two() {
                    log::error!(
                        "blkback: frontend {} request {:#x}: device error: {e} ({} so far)",
                        self.cfg.frontend,
                        inf.id,
                        self.stats.device_errors
                    );
                }
                status = rsp::ERROR;
            } else {
                let mut pos = 0usize;
                for (hi, range) in &inf.scatter {
                    let len = range.len();
                    let ok = match (inf.held.get(*hi), c.buf.get(pos..pos + len)) {
                        (Some(h), Some(data)) => {
                            grants.write(&h.mapping, range.start, data).is_ok()
                        }
                        _ => false,
                    };
                    if !ok {
                        self.stats.copy_errors += 1;
                        status = rsp::ERROR;
                        break;
                    }
                    pos += len;
                }
            }
            self.release(qi, &inf.held, grants);
            if let Some(q) = self.queues.get_mut(qi) {
                q.inflight = q.inflight.saturating_sub(1);
                q.inflight_bytes = q.inflight_bytes.saturating_sub(inf.bytes);
                if inf.drain {
                    q.draining = false;
                }
            }
            self.respond(qi, inf.id, inf.rsp_op, status);
            answered += 1;
        }
        for qi in 0..self.queues.len() {
            self.publish(qi, notify);
        }
        answered
    }

    /// Run until there is nothing more to do now: completions, then every queue, repeated
    /// while either made progress. The event loop calls this on any event.
    pub fn service<G: GrantMapper, N: Notify>(
        &mut self,
        grants: &mut G,
        notify: &mut N,
    ) -> Result<(), Disconnect> {
        loop {
            let mut progress = self.process_completions(grants, notify) > 0;
            for qi in 0..self.queues.len() {
                let pass = self.process_queue(qi, grants, notify)?;
                progress |= pass.consumed > 0 || pass.more;
            }
            if !progress {
                return Ok(());
            }
        }
    }

    /// Stop serving (xenbus close): unmap every grant this device holds. Operations still
    /// on the device complete into private buffers and are dropped.
    pub fn shutdown<G: GrantMapper>(&mut self, grants: &mut G) {
        self.stop(Disconnect::Closed, grants);
    }

    fn corrupted<G: GrantMapper>(
        &mut self,
        queue: usize,
        error: RingError,
        grants: &mut G,
    ) -> Disconnect {
        let d = Disconnect::RingCorrupted {
            queue: queue as u16,
            error,
        };
        log::error!(
            "blkback: frontend {}: {d}; disconnecting",
            self.cfg.frontend
        );
        self.stop(d, grants);
        d
    }

    fn stop<G: GrantMapper>(&mut self, why: Disconnect, grants: &mut G) {
        if self.stopped.is_some() {
            return;
        }
        self.stopped = Some(why);
        let mut maps: Vec<Mapping> = Vec::new();
        for inf in core::mem::take(&mut self.inflight).into_values() {
            maps.extend(inf.held.iter().filter(|h| !h.persistent).map(|h| h.mapping));
        }
        for q in &mut self.queues {
            maps.extend(q.persistent.drain());
            q.parked = None;
            q.draining = false;
            q.inflight = 0;
            q.inflight_bytes = 0;
        }
        if !maps.is_empty() {
            grants.unmap(&maps);
        }
    }

    /// Check a request and, for an indirect one, read its segment pages.
    fn prepare<G: GrantMapper>(
        &mut self,
        queue: usize,
        slot: &BlkifRequestSlot,
        grants: &mut G,
    ) -> Prepared {
        let kind = slot.parse();
        let h = match check_request(&kind, &self.limits) {
            Err(rej) => return Prepared::Rejected(rej),
            Ok(Checked::Ready(plan)) => return Prepared::Ready(plan),
            Ok(Checked::NeedIndirect(h)) => h,
        };
        let rsp_op = kind.response_operation();
        let reject = |fault| {
            Prepared::Rejected(Rejection {
                id: h.id,
                rsp_op,
                fault,
            })
        };
        let segs = match self.read_indirect(queue, &h, grants) {
            Ok(segs) => segs,
            Err(MapFailure::NoSpace) => return Prepared::NoSpace,
            Err(MapFailure::Fault(f)) => return reject(f),
        };
        match check_segments(h.write, h.sector, &segs, &self.limits) {
            Ok(action) => Prepared::Ready(Plan {
                id: h.id,
                rsp_op,
                action,
            }),
            Err(f) => reject(f),
        }
    }

    fn read_indirect<G: GrantMapper>(
        &mut self,
        queue: usize,
        h: &IndirectHeader,
        grants: &mut G,
    ) -> Result<Vec<BlkifRequestSegment>, MapFailure> {
        let refs: Vec<(GrantRef, bool)> = h.pages.iter().map(|&g| (g, false)).collect();
        let held = self.acquire(queue, &refs, grants)?;
        let mut segs = Vec::with_capacity(h.nr_segments);
        let mut page = vec![0u8; PAGE_SIZE];
        let mut result = Ok(());
        for (i, hold) in held.iter().enumerate() {
            let n = (h.nr_segments - i * BLKIF_SEGS_PER_INDIRECT_FRAME)
                .min(BLKIF_SEGS_PER_INDIRECT_FRAME);
            let bytes = &mut page[..n * BlkifRequestSegment::WIRE_SIZE];
            if let Err(status) = grants.read(&hold.mapping, 0, bytes) {
                result = Err(MapFailure::Fault(Fault::GrantMap {
                    gref: hold.mapping.gref,
                    status,
                }));
                break;
            }
            segs.extend(
                bytes
                    .chunks_exact(BlkifRequestSegment::WIRE_SIZE)
                    .map(|c| BlkifRequestSegment::from_bytes(c).unwrap_or_default()),
            );
        }
        self.release(queue, &held, grants);
        result.map(|()| segs)
    }

    fn must_wait(&self, queue: usize, plan: &Plan) -> bool {
        let q = &self.queues[queue];
        if q.draining {
            return true;
        }
        if q.inflight == 0 {
            return false;
        }
        plan.drains() || q.inflight_bytes.saturating_add(plan.bytes()) > self.cfg.max_inflight_bytes
    }

    /// Map the grants of `refs` (ref, needs write access), through the persistent pool when
    /// negotiated. On failure nothing stays mapped. Out of mapping quota, idle persistent
    /// mappings are given up and the map tried once more.
    fn acquire<G: GrantMapper>(
        &mut self,
        queue: usize,
        refs: &[(GrantRef, bool)],
        grants: &mut G,
    ) -> Result<Vec<Held>, MapFailure> {
        // The backend's own limits (maptrack quota, its mapping window): not the frontend's
        // fault.
        let out_of_space = |r: &Result<Vec<Held>, Fault>| {
            matches!(
                r,
                Err(Fault::GrantMap {
                    status: GntStatus::NoSpace | GntStatus::NoDeviceSpace,
                    ..
                })
            )
        };
        let mut r = self.try_acquire(queue, refs, grants);
        if out_of_space(&r) && self.evict_idle(grants) {
            r = self.try_acquire(queue, refs, grants);
        }
        if out_of_space(&r) {
            return Err(MapFailure::NoSpace);
        }
        r.map_err(MapFailure::Fault)
    }

    fn try_acquire<G: GrantMapper>(
        &mut self,
        queue: usize,
        refs: &[(GrantRef, bool)],
        grants: &mut G,
    ) -> Result<Vec<Held>, Fault> {
        let domid = self.cfg.frontend;
        let persistent = self.cfg.persistent;
        let q = &mut self.queues[queue];
        let mut held: Vec<Option<Held>> = vec![None; refs.len()];
        let mut to_map: Vec<MapRequest> = Vec::new();
        let mut slots: Vec<(usize, bool)> = Vec::new();
        let mut room = q.persistent.room();
        let mut pending: BTreeSet<GrantRef> = BTreeSet::new();
        for (i, &(gref, need_write)) in refs.iter().enumerate() {
            if persistent && let Some(m) = q.persistent.get(gref) {
                self.stats.persistent_hits += 1;
                held[i] = Some(Held {
                    mapping: m,
                    persistent: true,
                });
                continue;
            }
            // Persistent mappings are writable: a later request may read into the page.
            let keep = persistent && room > 0 && !pending.contains(&gref);
            if keep {
                room -= 1;
                pending.insert(gref);
            }
            to_map.push(MapRequest {
                gref,
                writable: keep || need_write,
            });
            slots.push((i, keep));
        }
        let mut failure = None;
        // Grants a frontend gave read-only cannot be kept (persistent mappings are writable);
        // those only read from are mapped again read-only, for this request alone.
        let mut retry: Vec<MapRequest> = Vec::new();
        let mut retry_slots: Vec<usize> = Vec::new();
        if !to_map.is_empty() {
            grants.map(domid, &to_map, &mut self.scratch);
            for (j, &(i, keep)) in slots.iter().enumerate() {
                match self.scratch.get(j).copied() {
                    Some(Ok(m)) => {
                        self.stats.grants_mapped += 1;
                        let kept = keep && q.persistent.insert(m);
                        held[i] = Some(Held {
                            mapping: m,
                            persistent: kept,
                        });
                    }
                    Some(Err(GntStatus::PermissionDenied)) if keep && !refs[i].1 => {
                        retry.push(MapRequest {
                            gref: refs[i].0,
                            writable: false,
                        });
                        retry_slots.push(i);
                    }
                    Some(Err(status)) => {
                        failure.get_or_insert(Fault::GrantMap {
                            gref: to_map[j].gref,
                            status,
                        });
                    }
                    None => {
                        failure.get_or_insert(Fault::GrantMap {
                            gref: to_map[j].gref,
                            status: GntStatus::GeneralError,
                        });
                    }
                }
            }
        }
        if failure.is_none() && !retry.is_empty() {
            grants.map(domid, &retry, &mut self.scratch);
            for (j, &i) in retry_slots.iter().enumerate() {
                match self.scratch.get(j).copied() {
                    Some(Ok(m)) => {
                        self.stats.grants_mapped += 1;
                        held[i] = Some(Held {
                            mapping: m,
                            persistent: false,
                        });
                    }
                    other => {
                        let status = match other {
                            Some(Err(s)) => s,
                            _ => GntStatus::GeneralError,
                        };
                        failure.get_or_insert(Fault::GrantMap {
                            gref: retry[j].gref,
                            status,
                        });
                    }
                }
            }
        }
        let held: Vec<Held> = held.into_iter().flatten().collect();
        if let Some(f) = failure {
            self.release(queue, &held, grants);
            return Err(f);
        }
        Ok(held)
    }

    /// Give back mappings: persistent ones stay mapped, the rest are unmapped now.
    fn release<G: GrantMapper>(&mut self, queue: usize, held: &[Held], grants: &mut G) {
        let mut unmap: Vec<Mapping> = Vec::new();
        for h in held {
            if h.persistent {
                // Over a lowered limit, the last user's release gives the mapping up.
                if let Some(gone) = self
                    .queues
                    .get_mut(queue)
                    .and_then(|q| q.persistent.put(h.mapping.gref))
                {
                    self.stats.persistent_evictions += 1;
                    unmap.push(gone);
                }
            } else {
                unmap.push(h.mapping);
            }
        }
        if !unmap.is_empty() {
            grants.unmap(&unmap);
        }
    }

    /// Map, copy and submit a checked request (or refuse it). False if it waits for mapping
    /// quota: it is parked again, untouched.
    fn dispatch<G: GrantMapper>(&mut self, queue: usize, plan: Plan, grants: &mut G) -> bool {
        let refs: Vec<(GrantRef, bool)> = match &plan.action {
            Action::Read { segs, .. } => segs.iter().map(|s| (s.gref, true)).collect(),
            Action::Write { segs, .. } => segs.iter().map(|s| (s.gref, false)).collect(),
            _ => Vec::new(),
        };
        let pages = if refs.is_empty() {
            Vec::new()
        } else {
            match self.acquire(queue, &refs, grants) {
                Ok(h) => h,
                Err(MapFailure::NoSpace) => {
                    self.stats.map_waits += 1;
                    self.queues[queue].parked = Some(Parked::Plan(plan));
                    return false;
                }
                Err(MapFailure::Fault(fault)) => {
                    let (id, rsp_op) = (plan.id, plan.rsp_op);
                    self.reject(queue, Rejection { id, rsp_op, fault });
                    return true;
                }
            }
        };
        self.submit(queue, plan, pages, grants);
        true
    }

    /// Copy a write's data out, set up a read's scatter, and put the request on the device.
    fn submit<G: GrantMapper>(
        &mut self,
        queue: usize,
        plan: Plan,
        pages: Vec<Held>,
        grants: &mut G,
    ) {
        let Plan { id, rsp_op, action } = plan;
        let drain = matches!(
            action,
            Action::Write { drain: true, .. } | Action::Flush { drain: true }
        );
        let mut held = Vec::new();
        let mut scatter = Vec::new();
        let mut bytes = 0;
        let op = match action {
            Action::Flush { .. } => IoOp::Flush,
            Action::Discard {
                offset,
                len,
                secure,
            } => IoOp::Discard {
                offset,
                len,
                secure,
            },
            Action::Read {
                offset,
                segs,
                bytes: n,
            } => {
                held = pages;
                scatter = segs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.byte_range().map(|r| (i, r)))
                    .collect();
                bytes = n;
                IoOp::Read {
                    offset,
                    buf: vec![0; n],
                }
            }
            Action::Write {
                offset,
                segs,
                bytes: n,
                preflush,
                fua,
                ..
            } => {
                let mut data = vec![0u8; n];
                let mut pos = 0;
                let mut copy_fault = None;
                for (s, h) in segs.iter().zip(&pages) {
                    let Some(r) = s.byte_range() else { continue };
                    let len = r.len();
                    if let Err(status) = grants.read(&h.mapping, r.start, &mut data[pos..pos + len])
                    {
                        copy_fault = Some(Fault::GrantMap {
                            gref: s.gref,
                            status,
                        });
                        break;
                    }
                    pos += len;
                }
                // The data is private now: the pages are not needed any more.
                self.release(queue, &pages, grants);
                if let Some(fault) = copy_fault {
                    return self.reject(queue, Rejection { id, rsp_op, fault });
                }
                bytes = n;
                IoOp::Write {
                    offset,
                    data,
                    preflush,
                    fua,
                }
            }
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        let q = &mut self.queues[queue];
        q.inflight += 1;
        q.inflight_bytes += bytes;
        if drain {
            q.draining = true;
        }
        self.inflight.insert(
            tag,
            InFlight {
                queue: queue as u16,
                id,
                rsp_op,
                held,
                scatter,
                bytes,
                drain,
            },
        );
        self.io.submit(IoRequest { tag, op });
    }

    fn reject(&mut self, queue: usize, rej: Rejection) {
        let kind = rej.fault.kind();
        let n = &mut self.stats.faults[kind as usize];
        *n += 1;
        // Rate limit without a clock: log the 1st, 2nd, 4th, 8th, ... of each kind.
        if n.is_power_of_two() {
            log::warn!(
                "blkback: frontend {} request {:#x}: {} ({} of this kind)",
                self.cfg.frontend,
                rej.id,
                rej.fault,
                n
            );
        }
        self.respond(queue, rej.id, rej.rsp_op, rej.fault.status());
    }

    fn respond(&mut self, queue: usize, id: u64, operation: u8, status: i16) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        let r = BlkifResponse {
            id,
            operation,
            status,
        };
        // A consumed request always has its slot to answer in; failure means a bug here, and
        // a missing response is then the safe outcome.
        if q.ring.push_response(&r).is_ok() {
            q.unpublished = true;
            match status {
                rsp::OKAY => self.stats.okay += 1,
                rsp::EOPNOTSUPP => self.stats.eopnotsupp += 1,
                _ => self.stats.error += 1,
            }
        }
    }

    fn publish<N: Notify>(&mut self, queue: usize, notify: &mut N) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        if q.unpublished {
            q.unpublished = false;
            if q.ring.push_responses_and_check_notify() {
                notify.notify(queue as u16);
            }
        }
    }
}
