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

struct Queue {
    ring: BackRing<BlkifRequestSlot, BlkifResponse>,
    inflight: u32,
    inflight_bytes: usize,
    /// A checked request waiting for room or for a drain.
    parked: Option<Plan>,
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
            if let Some(plan) = self.queues[queue].parked.take() {
                if self.must_wait(queue, &plan) {
                    self.queues[queue].parked = Some(plan);
                    pass.stalled = true;
                    break;
                }
                self.dispatch(queue, plan, grants);
                continue;
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
            match self.prepare(queue, &slot, grants) {
                Err(rej) => {
                    pass.rejected += 1;
                    self.reject(queue, rej);
                }
                Ok(plan) => {
                    if self.must_wait(queue, &plan) {
                        self.stats.parked += 1;
                        self.queues[queue].parked = Some(plan);
                    } else {
                        self.dispatch(queue, plan, grants);
                    }
                }
            }
        }
        self.publish(queue, notify);
        Ok(pass)
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
    ) -> Result<Plan, Rejection> {
        let kind = slot.parse();
        match check_request(&kind, &self.limits)? {
            Checked::Ready(plan) => Ok(plan),
            Checked::NeedIndirect(h) => {
                let rsp_op = kind.response_operation();
                let reject = |fault| Rejection {
                    id: h.id,
                    rsp_op,
                    fault,
                };
                let segs = self.read_indirect(queue, &h, grants).map_err(reject)?;
                let action =
                    check_segments(h.write, h.sector, &segs, &self.limits).map_err(reject)?;
                Ok(Plan {
                    id: h.id,
                    rsp_op,
                    action,
                })
            }
        }
    }

    fn read_indirect<G: GrantMapper>(
        &mut self,
        queue: usize,
        h: &IndirectHeader,
        grants: &mut G,
    ) -> Result<Vec<BlkifRequestSegment>, Fault> {
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
                result = Err(Fault::GrantMap {
                    gref: hold.mapping.gref,
                    status,
                });
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
    /// negotiated. On failure nothing stays mapped.
    fn acquire<G: GrantMapper>(
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
                if let Some(q) = self.queues.get_mut(queue) {
                    q.persistent.put(h.mapping.gref);
                }
            } else {
                unmap.push(h.mapping);
            }
        }
        if !unmap.is_empty() {
            grants.unmap(&unmap);
        }
    }

    /// Map, copy and submit a checked request.
    fn dispatch<G: GrantMapper>(&mut self, queue: usize, plan: Plan, grants: &mut G) {
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
                let refs: Vec<(GrantRef, bool)> = segs.iter().map(|s| (s.gref, true)).collect();
                held = match self.acquire(queue, &refs, grants) {
                    Ok(h) => h,
                    Err(fault) => return self.reject(queue, Rejection { id, rsp_op, fault }),
                };
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
                let refs: Vec<(GrantRef, bool)> = segs.iter().map(|s| (s.gref, false)).collect();
                let pages = match self.acquire(queue, &refs, grants) {
                    Ok(h) => h,
                    Err(fault) => return self.reject(queue, Rejection { id, rsp_op, fault }),
                };
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
