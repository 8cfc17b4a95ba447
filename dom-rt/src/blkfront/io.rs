//! The data path: operations split into requests, pages granted (persistently or per
//! request), responses checked and matched by id, completions by tag.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec;
use alloc::vec::Vec;

use shared_abi::PAGE_SIZE;
use shared_abi::blkif::{
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_SEGS_PER_INDIRECT_FRAME, BlkifRequest, BlkifRequestIndirect, BlkifRequestSegment,
    BlkifRequestSlot, BlkifResponse, DirectSegments, IndirectGrefs, op, rsp,
};
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::GrantRef;
use shared_abi::ring::FrontRing;

use super::negotiate::{DiskInfo, FrontConfig, QueueSetup, negotiate};
use super::{BlkError, BlockDevice, Broken, Events, Grants, XsStore};
use crate::front::{GRANT_RETRY_ROUNDS, Released, close_handshake};

/// Names one submitted operation.
pub type Tag = u64;

/// A finished operation: a read's data, or an empty buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: Tag,
    pub result: Result<Vec<u8>, BlkError>,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests put on the rings (of which indirect).
    pub requests: u64,
    pub indirect_requests: u64,
    /// Responses accepted.
    pub responses: u64,
    /// Grants issued (persistent pool fills plus per-request grants).
    pub grants: u64,
    /// Grants the backend still held when we ended them (pages set aside).
    pub busy_grants: u64,
    /// Notifications sent.
    pub notifies: u64,
    /// Times the frontend blocked waiting for the backend.
    pub waits: u64,
    /// Reconnections to a new backend ([`Blkfront::reconnect`]).
    pub reconnects: u64,
    /// Requests re-issued to a new backend (they had no response from the old one).
    pub reissued: u64,
}

struct Granted<P> {
    gref: GrantRef,
    page: P,
}

/// A request in flight.
struct Shadow<P> {
    queue: usize,
    /// Submission order (re-issue order after a backend restart).
    seq: u64,
    /// The operation (`indirect_op` for indirect requests) and the start in 512-byte units.
    rsp_op: u8,
    sector_512: u64,
    tag: Tag,
    /// Data pages and the bytes of each used (from offset 0).
    data: Vec<(Granted<P>, usize)>,
    indirect: Vec<Granted<P>>,
    /// Where this request's data sits in its operation's buffer.
    offset: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

struct Op {
    kind: Kind,
    /// Requests on the rings.
    outstanding: u32,
    /// Every request is on a ring.
    submitted: bool,
    buf: Vec<u8>,
    error: Option<BlkError>,
}

struct Queue<P> {
    ring: FrontRing<BlkifRequestSlot, BlkifResponse>,
    port: EvtchnPort,
    /// Requests pushed since the last publish.
    unpublished: bool,
    ring_pages: Vec<(GrantRef, P)>,
}

/// A connected block frontend. See the module doc.
pub struct Blkfront<G: Grants, E: Events> {
    grants: G,
    events: E,
    info: DiskInfo,
    max_pages: usize,
    queues: Vec<Queue<G::Page>>,
    ports: Vec<EvtchnPort>,
    shadows: Vec<Option<Shadow<G::Page>>>,
    free_ids: Vec<usize>,
    ops: BTreeMap<Tag, Op>,
    /// Finished operations, in completion order.
    done: VecDeque<(Tag, Result<Vec<u8>, BlkError>)>,
    next_tag: Tag,
    /// Persistent mode: granted pages ready for reuse. Otherwise: ungranted pages.
    free_granted: Vec<Granted<G::Page>>,
    free_pages: Vec<G::Page>,
    /// Data pages owned (in flight, free or set aside).
    pages: usize,
    /// Grants the backend still held when we ended them.
    busy: Vec<Granted<G::Page>>,
    broken: Option<Broken>,
    next_seq: u64,
    stats: Stats,
}

impl<G: Grants, E: Events> core::fmt::Debug for Blkfront<G, E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Blkfront")
            .field("info", &self.info)
            .field("ops", &self.ops.len())
            .field("broken", &self.broken)
            .finish()
    }
}

impl<G: Grants, E: Events> Blkfront<G, E> {
    /// Run the xenbus handshake for `cfg.frontend_dir` and return the connected device.
    pub fn connect<S: XsStore>(
        store: &mut S,
        mut grants: G,
        mut events: E,
        cfg: &FrontConfig,
    ) -> Result<Self, BlkError> {
        let n = negotiate(store, &mut grants, &mut events, cfg)?;
        let mut queues = Vec::new();
        let mut slots = 0usize;
        for QueueSetup {
            ring,
            port,
            ring_pages,
        } in n.queues
        {
            slots += ring.nr_ents() as usize;
            queues.push(Queue {
                ring,
                port,
                unpublished: false,
                ring_pages,
            });
        }
        let ports = queues.iter().map(|q| q.port).collect();
        Ok(Blkfront {
            grants,
            events,
            info: n.info,
            max_pages: cfg
                .max_pages
                .max(n.info.max_segments + BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST),
            queues,
            ports,
            shadows: (0..slots).map(|_| None).collect(),
            free_ids: (0..slots).rev().collect(),
            ops: BTreeMap::new(),
            done: VecDeque::new(),
            next_tag: 1,
            free_granted: Vec::new(),
            free_pages: Vec::new(),
            pages: 0,
            busy: Vec::new(),
            broken: None,
            next_seq: 0,
            stats: Stats::default(),
        })
    }

    /// Close the device as Linux's blkfront does on unplug: Closing, wait for the backend
    /// to close (it unmaps everything), Closed; then end every grant and close the ports.
    /// Operations still pending fail. `frontend_dir` is the directory connected to;
    /// `wait_rounds` bounds each wait. A timeout names the state the backend never reached
    /// (the device is released all the same: see [`release`](Self::release)).
    pub fn close<S: XsStore>(
        self,
        store: &mut S,
        frontend_dir: &str,
        wait_rounds: u32,
    ) -> Result<(), BlkError> {
        self.release(store, frontend_dir, wait_rounds).result()
    }

    /// Release the device, whoever started the close: the guest (unplug), or the toolstack
    /// (a detach: the backend went Closing, as Linux's `blkback_changed` sees it), or the
    /// device directory vanished (a forced detach). Runs the close handshake
    /// (the one in `crate::front`: bounded waits, nothing written to a directory
    /// that is gone), fails every pending operation, then ends every grant (ring, in-flight,
    /// persistent and set-aside pages) and closes the ports. A grant the backend still maps
    /// cannot end: it stays, its page is never reused (counted in [`Released::leaked`]).
    /// Pages whose grants ended go back to [`Grants::free_page`]; the ring memory is kept
    /// (as rings always are).
    pub fn release<S: XsStore>(
        mut self,
        store: &mut S,
        frontend_dir: &str,
        wait_rounds: u32,
    ) -> Released {
        let backend =
            shared_abi::xenbus::read_other_end(store, frontend_dir, "backend-id", "backend")
                .map(|(_, b)| b)
                .unwrap_or_else(|_| {
                    alloc::format!(
                        "/local/domain/{}/backend/vbd/{}/{}",
                        self.info.backend_id,
                        frontend_dir.split('/').nth(3).unwrap_or("?"),
                        self.info.devid
                    )
                });
        let mut r = close_handshake(store, frontend_dir, &backend, wait_rounds);
        // Nothing more will be answered: take what was, then fail the rest.
        self.reap();
        r.dropped = self.ops.len();
        for (tag, _) in core::mem::take(&mut self.ops) {
            self.done.push_back((tag, Err(BlkError::Io)));
        }
        let mut pages: Vec<Granted<G::Page>> = core::mem::take(&mut self.free_granted);
        pages.append(&mut self.busy);
        for sh in self.shadows.iter_mut().filter_map(Option::take) {
            pages.extend(sh.data.into_iter().map(|(g, _)| g));
            pages.extend(sh.indirect);
        }
        for p in core::mem::take(&mut self.free_pages) {
            self.grants.free_page(p);
        }
        // Ring memory is never freed (it may be one multi-page allocation): only its grants.
        let mut rings: Vec<GrantRef> = Vec::new();
        for q in core::mem::take(&mut self.queues) {
            rings.extend(q.ring_pages.into_iter().map(|(g, _)| g));
        }
        // A backend tearing down on its own (a forced detach) may still be unmapping:
        // retry for a bounded time; what it never lets go stays granted, its page unused.
        let retries = wait_rounds.min(GRANT_RETRY_ROUNDS);
        for round in 0..=retries {
            let mut still = Vec::new();
            for g in pages {
                if self.grants.end_access(g.gref) {
                    r.ended += 1;
                    self.grants.free_page(g.page);
                } else {
                    still.push(g);
                }
            }
            pages = still;
            let before = rings.len();
            rings.retain(|&g| !self.grants.end_access(g));
            r.ended += before - rings.len();
            if (pages.is_empty() && rings.is_empty()) || round == retries {
                break;
            }
            store.wait();
        }
        r.leaked = pages.len() + rings.len();
        for p in core::mem::take(&mut self.ports) {
            self.events.close(p);
        }
        r
    }

    /// The disk as negotiated.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Why the device is dead, if it is.
    pub fn broken(&self) -> Option<Broken> {
        self.broken
    }

    /// Operations submitted and not yet collected.
    pub fn pending(&self) -> usize {
        self.ops.len()
    }

    /// Our event-channel ports (one per queue).
    pub fn ports(&self) -> &[EvtchnPort] {
        &self.ports
    }

    pub fn grants_mut(&mut self) -> &mut G {
        &mut self.grants
    }

    pub fn events_mut(&mut self) -> &mut E {
        &mut self.events
    }

    fn check_alive(&self) -> Result<(), BlkError> {
        match self.broken {
            Some(b) => Err(BlkError::Broken(b)),
            None => Ok(()),
        }
    }

    /// Check a logical-sector range and return its start in 512-byte units.
    fn range(&self, sector: u64, bytes: usize) -> Result<u64, BlkError> {
        let bad = BlkError::BadRange { sector, bytes };
        let ss = u64::from(self.info.sector_size);
        let per = ss / 512;
        if bytes == 0 || !(bytes as u64).is_multiple_of(ss) {
            return Err(bad);
        }
        let start = sector.checked_mul(per).ok_or(bad.clone())?;
        let end = start.checked_add(bytes as u64 / 512).ok_or(bad.clone())?;
        if end > self.info.sectors_512 {
            return Err(bad);
        }
        Ok(start)
    }

    fn new_op(&mut self, kind: Kind, buf: Vec<u8>) -> Tag {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.ops.insert(
            tag,
            Op {
                kind,
                outstanding: 0,
                submitted: false,
                buf,
                error: None,
            },
        );
        tag
    }

    /// Start reading `bytes` bytes from logical `sector`; the data comes with the completion.
    pub fn submit_read(&mut self, sector: u64, bytes: usize) -> Result<Tag, BlkError> {
        self.check_alive()?;
        let start = self.range(sector, bytes)?;
        let tag = self.new_op(Kind::Read, vec![0; bytes]);
        self.submit_rw(tag, op::READ, start, None, bytes)?;
        Ok(tag)
    }

    /// Start writing `data` at logical `sector`.
    pub fn submit_write(&mut self, sector: u64, data: &[u8]) -> Result<Tag, BlkError> {
        self.check_alive()?;
        if self.info.read_only {
            return Err(BlkError::ReadOnly);
        }
        let start = self.range(sector, data.len())?;
        let tag = self.new_op(Kind::Write, Vec::new());
        self.submit_rw(tag, op::WRITE, start, Some(data), data.len())?;
        Ok(tag)
    }

    /// Start a cache flush (`FLUSH_DISKCACHE`, or an empty `WRITE_BARRIER` if that is what
    /// the backend offers; without either, writes are durable once acknowledged and the
    /// flush completes at once).
    pub fn submit_flush(&mut self) -> Result<Tag, BlkError> {
        self.check_alive()?;
        let tag = self.new_op(Kind::Flush, Vec::new());
        let operation = if self.info.flush {
            Some(op::FLUSH_DISKCACHE)
        } else if self.info.barrier {
            Some(op::WRITE_BARRIER)
        } else {
            None
        };
        if let Some(operation) = operation {
            let req = BlkifRequest {
                operation,
                nr_segments: 0,
                handle: self.info.devid as u16,
                ..Default::default()
            };
            let slot = BlkifRequestSlot::from_rw(&req);
            if let Err(e) = self.push(tag, operation, 0, slot, Vec::new(), Vec::new(), 0)
                && let Some(o) = self.ops.get_mut(&tag)
            {
                o.error.get_or_insert(e);
            }
        }
        self.finish_submit(tag);
        Ok(tag)
    }

    fn submit_rw(
        &mut self,
        tag: Tag,
        operation: u8,
        start_512: u64,
        data: Option<&[u8]>,
        bytes: usize,
    ) -> Result<(), BlkError> {
        let per_req = self.info.max_segments * PAGE_SIZE;
        let mut off = 0usize;
        while off < bytes {
            let len = per_req.min(bytes - off);
            if let Err(e) = self.submit_one(
                tag,
                operation,
                start_512 + (off / 512) as u64,
                data,
                off,
                len,
            ) {
                // Requests already on the ring still complete; the operation fails.
                if let Some(o) = self.ops.get_mut(&tag) {
                    o.error.get_or_insert(e.clone());
                }
                self.finish_submit(tag);
                return Ok(());
            }
            off += len;
        }
        self.finish_submit(tag);
        Ok(())
    }

    /// One request covering `len` bytes of the operation at `off`.
    fn submit_one(
        &mut self,
        tag: Tag,
        operation: u8,
        sector_512: u64,
        data: Option<&[u8]>,
        off: usize,
        len: usize,
    ) -> Result<(), BlkError> {
        let nsegs = len.div_ceil(PAGE_SIZE);
        let write = operation == op::WRITE;
        let mut pages: Vec<(Granted<G::Page>, usize)> = Vec::with_capacity(nsegs);
        for i in 0..nsegs {
            let seg_len = PAGE_SIZE.min(len - i * PAGE_SIZE);
            let g = match self.get_page(write) {
                Ok(g) => g,
                Err(e) => {
                    for (g, _) in pages {
                        self.put_page(g);
                    }
                    return Err(e);
                }
            };
            if let Some(d) = data {
                let src = off + i * PAGE_SIZE;
                self.grants.write(&g.page, 0, &d[src..src + seg_len]);
            }
            pages.push((g, seg_len));
        }
        let ind = if nsegs <= BLKIF_MAX_SEGMENTS_PER_REQUEST {
            Vec::new()
        } else {
            let npages = nsegs.div_ceil(BLKIF_SEGS_PER_INDIRECT_FRAME);
            let mut ind: Vec<Granted<G::Page>> = Vec::with_capacity(npages);
            for _ in 0..npages {
                match self.get_page(true) {
                    Ok(g) => ind.push(g),
                    Err(e) => {
                        for (g, _) in pages {
                            self.put_page(g);
                        }
                        for g in ind {
                            self.put_page(g);
                        }
                        return Err(e);
                    }
                }
            }
            ind
        };
        let slot = self.build_slot(operation, sector_512, &pages, &ind);
        self.push(tag, operation, sector_512, slot, pages, ind, off)
    }

    /// The request for `data` (and, when not empty, its indirect pages, which get the
    /// segment arrays written).
    fn build_slot(
        &mut self,
        operation: u8,
        sector_512: u64,
        data: &[(Granted<G::Page>, usize)],
        ind: &[Granted<G::Page>],
    ) -> BlkifRequestSlot {
        let segs: Vec<BlkifRequestSegment> = data
            .iter()
            .map(|(g, l)| BlkifRequestSegment {
                gref: g.gref,
                first_sect: 0,
                last_sect: (l / 512 - 1) as u8,
            })
            .collect();
        let handle = self.info.devid as u16;
        if ind.is_empty() {
            let mut seg = DirectSegments::default();
            let n = segs.len().min(BLKIF_MAX_SEGMENTS_PER_REQUEST);
            seg.0[..n].copy_from_slice(&segs[..n]);
            let req = BlkifRequest {
                operation,
                nr_segments: n as u8,
                handle,
                id: 0,
                sector_number: sector_512,
                seg,
            };
            BlkifRequestSlot::from_rw(&req)
        } else {
            for (chunk, g) in segs.chunks(BLKIF_SEGS_PER_INDIRECT_FRAME).zip(ind) {
                let mut bytes = vec![0u8; chunk.len() * BlkifRequestSegment::WIRE_SIZE];
                for (dst, s) in bytes
                    .chunks_exact_mut(BlkifRequestSegment::WIRE_SIZE)
                    .zip(chunk)
                {
                    dst.copy_from_slice(&s.to_bytes());
                }
                self.grants.write(&g.page, 0, &bytes);
            }
            let mut grefs = IndirectGrefs::default();
            for (dst, g) in grefs.0.iter_mut().zip(ind) {
                *dst = g.gref;
            }
            let req = BlkifRequestIndirect {
                operation: op::INDIRECT,
                indirect_op: operation,
                nr_segments: segs.len() as u16,
                id: 0,
                sector_number: sector_512,
                handle,
                indirect_grefs: grefs,
            };
            self.stats.indirect_requests += 1;
            BlkifRequestSlot::from_indirect(&req)
        }
    }

    /// A granted page for one request: from the persistent pool, or a page granted now
    /// (`readonly` for data the backend only reads). Waits for completions when the page
    /// budget is used up.
    fn get_page(&mut self, readonly: bool) -> Result<Granted<G::Page>, BlkError> {
        loop {
            self.check_alive()?;
            if self.info.persistent {
                if let Some(g) = self.free_granted.pop() {
                    return Ok(g);
                }
                // Pages whose grants ended at a reconnect: granted again, writable.
                if let Some(p) = self.free_pages.pop() {
                    return self.grant_page(p, false);
                }
            } else if let Some(p) = self.free_pages.pop() {
                return self.grant_page(p, readonly);
            }
            if self.pages < self.max_pages {
                let p = self.grants.alloc_page()?;
                self.pages += 1;
                // Persistent pages are granted writable once: they serve reads and writes.
                return self.grant_page(p, readonly && !self.info.persistent);
            }
            if self.in_flight() == 0 {
                return Err(BlkError::NoResources("data pages"));
            }
            self.wait_progress();
        }
    }

    fn grant_page(&mut self, page: G::Page, readonly: bool) -> Result<Granted<G::Page>, BlkError> {
        match self.grants.grant(self.info.backend_id, &page, readonly) {
            Ok(gref) => {
                self.stats.grants += 1;
                Ok(Granted { gref, page })
            }
            Err(e) => {
                self.free_pages.push(page);
                Err(e)
            }
        }
    }

    /// Give a page back after its request: to the persistent pool, or end its grant (a page
    /// the backend still maps is set aside, never reused while it does).
    fn put_page(&mut self, g: Granted<G::Page>) {
        if self.broken.is_some() {
            // The backend may still write any page it was given: keep them all out of use.
            self.busy.push(g);
            return;
        }
        if self.info.persistent {
            self.free_granted.push(g);
        } else if self.grants.end_access(g.gref) {
            self.free_pages.push(g.page);
        } else {
            self.stats.busy_grants += 1;
            self.busy.push(g);
        }
    }

    fn in_flight(&self) -> usize {
        self.shadows.len() - self.free_ids.len()
    }

    /// Put one request on the queue with the most room (waiting for room if every ring is
    /// full).
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        tag: Tag,
        rsp_op: u8,
        sector_512: u64,
        mut slot: BlkifRequestSlot,
        data: Vec<(Granted<G::Page>, usize)>,
        indirect: Vec<Granted<G::Page>>,
        offset: usize,
    ) -> Result<(), BlkError> {
        let (qi, id) = loop {
            if let Err(e) = self.check_alive() {
                for (g, _) in data {
                    self.put_page(g);
                }
                for g in indirect {
                    self.put_page(g);
                }
                return Err(e);
            }
            let best = (0..self.queues.len())
                .max_by_key(|&i| self.queues[i].ring.free_slots())
                .filter(|&i| self.queues[i].ring.free_slots() > 0);
            if let (Some(qi), Some(&id)) = (best, self.free_ids.last()) {
                self.free_ids.pop();
                break (qi, id);
            }
            self.wait_progress();
        };
        // The id sits at offset 8 in every request variant.
        slot.0[8..16].copy_from_slice(&(id as u64).to_le_bytes());
        let q = &mut self.queues[qi];
        if q.ring.push_request(&slot).is_err() {
            // Cannot happen (room was checked); fail the request rather than panic.
            self.free_ids.push(id);
            for (g, _) in data {
                self.put_page(g);
            }
            for g in indirect {
                self.put_page(g);
            }
            return Err(BlkError::NoResources("ring slots"));
        }
        q.unpublished = true;
        self.shadows[id] = Some(Shadow {
            queue: qi,
            seq: self.next_seq,
            rsp_op,
            sector_512,
            tag,
            data,
            indirect,
            offset,
        });
        self.next_seq += 1;
        if let Some(o) = self.ops.get_mut(&tag) {
            o.outstanding += 1;
        }
        self.stats.requests += 1;
        Ok(())
    }

    /// Publish pushed requests, notifying where the backend asked.
    fn publish(&mut self) {
        for q in &mut self.queues {
            if q.unpublished {
                q.unpublished = false;
                if q.ring.push_requests_and_check_notify() {
                    self.stats.notifies += 1;
                    // A failed send shows as a stall; the next publish tries again.
                    let _ = self.events.notify(q.port);
                }
            }
        }
    }

    fn finish_submit(&mut self, tag: Tag) {
        if let Some(o) = self.ops.get_mut(&tag) {
            o.submitted = true;
        }
        self.maybe_complete(tag);
        self.publish();
    }

    fn maybe_complete(&mut self, tag: Tag) {
        let ready = self
            .ops
            .get(&tag)
            .is_some_and(|o| o.submitted && o.outstanding == 0);
        if ready && let Some(o) = self.ops.remove(&tag) {
            let r = match o.error {
                Some(e) => Err(e),
                None => Ok(o.buf),
            };
            self.done.push_back((tag, r));
        }
    }

    /// Take every response off every ring; how many.
    pub fn reap(&mut self) -> usize {
        if self.broken.is_some() {
            return 0;
        }
        let mut n = 0;
        for qi in 0..self.queues.len() {
            loop {
                match self.queues[qi].ring.get_response() {
                    Ok(Some(r)) => {
                        n += 1;
                        if let Err(b) = self.on_response(qi, r) {
                            self.break_down(b);
                            return n;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.break_down(Broken::Ring(e));
                        return n;
                    }
                }
            }
        }
        if !self.busy.is_empty() {
            self.retry_busy();
        }
        n
    }

    fn retry_busy(&mut self) {
        let busy = core::mem::take(&mut self.busy);
        for g in busy {
            if self.grants.end_access(g.gref) {
                self.free_pages.push(g.page);
            } else {
                self.busy.push(g);
            }
        }
    }

    fn on_response(&mut self, qi: usize, r: BlkifResponse) -> Result<(), Broken> {
        let unknown = Broken::UnknownId {
            queue: qi as u16,
            id: r.id,
        };
        let id = usize::try_from(r.id).map_err(|_| unknown)?;
        let sh = match self.shadows.get(id) {
            Some(Some(s)) if s.queue == qi => s,
            _ => return Err(unknown),
        };
        if r.operation != sh.rsp_op {
            return Err(Broken::OperationMismatch {
                id: r.id,
                expected: sh.rsp_op,
                got: r.operation,
            });
        }
        let result = match r.status {
            rsp::OKAY => Ok(()),
            rsp::ERROR => Err(BlkError::Io),
            rsp::EOPNOTSUPP => Err(BlkError::Unsupported),
            status => return Err(Broken::BadStatus { id: r.id, status }),
        };
        let Some(sh) = self.shadows.get_mut(id).and_then(Option::take) else {
            return Err(unknown);
        };
        self.free_ids.push(id);
        self.stats.responses += 1;
        if result == Err(BlkError::Unsupported) && sh.rsp_op == op::FLUSH_DISKCACHE {
            self.info.flush = false;
        }
        if result == Err(BlkError::Unsupported) && sh.rsp_op == op::WRITE_BARRIER {
            self.info.barrier = false;
        }
        if let Some(o) = self.ops.get_mut(&sh.tag) {
            o.outstanding = o.outstanding.saturating_sub(1);
            match &result {
                Err(e) => {
                    o.error.get_or_insert(e.clone());
                }
                Ok(()) if o.kind == Kind::Read => {
                    let mut pos = sh.offset;
                    for (g, len) in &sh.data {
                        if let Some(dst) = o.buf.get_mut(pos..pos + len) {
                            self.grants.read(&g.page, 0, dst);
                        }
                        pos += len;
                    }
                }
                Ok(()) => {}
            }
        }
        let tag = sh.tag;
        for (g, _) in sh.data {
            self.put_page(g);
        }
        for g in sh.indirect {
            self.put_page(g);
        }
        self.maybe_complete(tag);
        Ok(())
    }

    /// The backend broke the protocol: fail everything, keep every page it was given out
    /// of use, refuse further work.
    fn break_down(&mut self, why: Broken) {
        if self.broken.is_some() {
            return;
        }
        self.broken = Some(why);
        log::error!("blkfront: device {}: {why}; disconnecting", self.info.devid);
        for s in &mut self.shadows {
            if let Some(sh) = s.take() {
                self.busy.extend(sh.data.into_iter().map(|(g, _)| g));
                self.busy.extend(sh.indirect);
            }
        }
        self.busy.append(&mut self.free_granted);
        for (tag, _) in core::mem::take(&mut self.ops) {
            self.done.push_back((tag, Err(BlkError::Broken(why))));
        }
    }

    /// Make progress: take responses, or (when none are ready) arm the rings' response
    /// events and block until the backend may have answered.
    fn wait_progress(&mut self) {
        self.publish();
        if self.reap() > 0 || self.broken.is_some() {
            return;
        }
        for qi in 0..self.queues.len() {
            match self.queues[qi].ring.final_check_for_responses() {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    self.break_down(Broken::Ring(e));
                    return;
                }
            }
        }
        self.stats.waits += 1;
        self.events.wait(&self.ports);
    }

    /// Follow the toolstack when it re-points this device at another backend (the old one
    /// died and was restarted as a new domain): if the frontend directory's `backend-id`
    /// no longer names the backend connected to, [`reconnect`](Self::reconnect) and say so.
    /// Cheap enough to call whenever the backend has been silent for a while.
    pub fn follow_backend<S: XsStore>(
        &mut self,
        store: &mut S,
        cfg: &FrontConfig,
    ) -> Result<bool, BlkError> {
        use shared_abi::xenbus::{XenbusError, read_other_end};
        let id = match read_other_end(store, &cfg.frontend_dir, "backend-id", "backend") {
            Ok((id, _)) => id,
            // The two keys were read apart, and the toolstack changed them in between (they
            // disagree for that moment): look again next time.
            Err(XenbusError::Invalid { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if id == self.info.backend_id {
            return Ok(false);
        }
        self.reconnect(store, cfg)?;
        Ok(true)
    }

    /// Reconnect to the backend the frontend directory now names, as Linux's blkfront does
    /// after a backend restart (`blkif_recover`): take the responses the old backend still
    /// posted, end the old rings' grants and close their channels (a dead backend's
    /// mappings were torn down by the hypervisor, so the grants end; a page still mapped is
    /// set aside and its data copied), run the handshake again, then re-issue every request
    /// that had no response, in submission order, with its pages granted to the new
    /// backend. Operations keep their tags and complete as usual. Re-applying a write the
    /// old backend may already have done writes the same data again, so nothing
    /// acknowledged is lost and nothing changes twice.
    ///
    /// If the handshake fails, every pending operation fails and the device is dead.
    pub fn reconnect<S: XsStore>(
        &mut self,
        store: &mut S,
        cfg: &FrontConfig,
    ) -> Result<(), BlkError> {
        self.reap();
        let mut old: Vec<Shadow<G::Page>> =
            self.shadows.iter_mut().filter_map(Option::take).collect();
        old.sort_by_key(|s| s.seq);
        for sh in &old {
            if let Some(o) = self.ops.get_mut(&sh.tag) {
                o.outstanding = o.outstanding.saturating_sub(1);
            }
        }
        // The old rings: their grants ended (the ring memory is never reused), ports closed.
        for q in core::mem::take(&mut self.queues) {
            for (gref, _) in q.ring_pages {
                let _ = self.grants.end_access(gref);
            }
            self.events.close(q.port);
        }
        self.ports.clear();
        // Free pages: ungranted, granted again on use (to the new backend).
        for g in core::mem::take(&mut self.free_granted) {
            if self.grants.end_access(g.gref) {
                self.free_pages.push(g.page);
            } else {
                self.busy.push(g);
            }
        }
        // In-flight pages: ungranted now, keeping their data; granted again below.
        let mut pending = Vec::with_capacity(old.len());
        for sh in old {
            let mut data = Vec::with_capacity(sh.data.len());
            for (g, len) in sh.data {
                data.push((self.release_page(g)?, len));
            }
            let mut ind = Vec::with_capacity(sh.indirect.len());
            for g in sh.indirect {
                ind.push(self.release_page(g)?);
            }
            pending.push((sh.tag, sh.rsp_op, sh.sector_512, sh.offset, data, ind));
        }
        self.broken = None;
        let n = match negotiate(store, &mut self.grants, &mut self.events, cfg) {
            Ok(n) => n,
            Err(e) => {
                let why = Broken::Lost;
                self.broken = Some(why);
                for (_, _, _, _, data, ind) in pending {
                    self.free_pages.extend(data.into_iter().map(|(p, _)| p));
                    self.free_pages.extend(ind);
                }
                for (tag, _) in core::mem::take(&mut self.ops) {
                    self.done.push_back((tag, Err(BlkError::Broken(why))));
                }
                return Err(e);
            }
        };
        let mut slots = 0usize;
        for QueueSetup {
            ring,
            port,
            ring_pages,
        } in n.queues
        {
            slots += ring.nr_ents() as usize;
            self.queues.push(Queue {
                ring,
                port,
                unpublished: false,
                ring_pages,
            });
        }
        self.ports = self.queues.iter().map(|q| q.port).collect();
        self.info = n.info;
        self.max_pages = cfg
            .max_pages
            .max(n.info.max_segments + BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
            .max(self.pages);
        self.shadows = (0..slots).map(|_| None).collect();
        self.free_ids = (0..slots).rev().collect();
        self.stats.reconnects += 1;
        for (tag, operation, sector_512, offset, data, ind) in pending {
            let fits = if ind.is_empty() {
                data.len() <= BLKIF_MAX_SEGMENTS_PER_REQUEST
            } else {
                self.info.indirect && data.len() <= self.info.max_segments
            };
            let regranted = if fits {
                self.regrant(operation, data, ind)
            } else {
                // The new backend takes fewer segments than the old one did: not re-issued.
                self.free_pages.extend(data.into_iter().map(|(p, _)| p));
                self.free_pages.extend(ind);
                Err(BlkError::Io)
            };
            let pushed = regranted.and_then(|(data, ind)| {
                let slot = self.build_slot(operation, sector_512, &data, &ind);
                self.push(tag, operation, sector_512, slot, data, ind, offset)
            });
            match pushed {
                Ok(()) => self.stats.reissued += 1,
                Err(e) => {
                    if let Some(o) = self.ops.get_mut(&tag) {
                        o.error.get_or_insert(e);
                    }
                }
            }
            self.maybe_complete(tag);
        }
        self.publish();
        Ok(())
    }

    /// End the grant of an in-flight page, keeping its data: the page itself, or (if the
    /// grantee still maps it) a copy, the original set aside.
    fn release_page(&mut self, g: Granted<G::Page>) -> Result<G::Page, BlkError> {
        if self.grants.end_access(g.gref) {
            return Ok(g.page);
        }
        let copy = self.grants.alloc_page()?;
        self.pages += 1;
        let mut buf = vec![0u8; PAGE_SIZE];
        self.grants.read(&g.page, 0, &mut buf);
        self.grants.write(&copy, 0, &buf);
        self.stats.busy_grants += 1;
        self.busy.push(g);
        Ok(copy)
    }

    /// Grant a re-issued request's pages to the (new) backend.
    #[allow(clippy::type_complexity)]
    fn regrant(
        &mut self,
        operation: u8,
        data: Vec<(G::Page, usize)>,
        ind: Vec<G::Page>,
    ) -> Result<(Vec<(Granted<G::Page>, usize)>, Vec<Granted<G::Page>>), BlkError> {
        let readonly = operation == op::WRITE && !self.info.persistent;
        let mut gd = Vec::with_capacity(data.len());
        let mut gi = Vec::with_capacity(ind.len());
        let mut err = None;
        for (p, len) in data {
            if err.is_some() {
                self.free_pages.push(p);
                continue;
            }
            match self.grant_page(p, readonly) {
                Ok(g) => gd.push((g, len)),
                Err(e) => err = Some(e),
            }
        }
        for p in ind {
            if err.is_some() {
                self.free_pages.push(p);
                continue;
            }
            match self.grant_page(p, !self.info.persistent) {
                Ok(g) => gi.push(g),
                Err(e) => err = Some(e),
            }
        }
        match err {
            None => Ok((gd, gi)),
            Some(e) => {
                for (g, _) in gd {
                    self.put_page(g);
                }
                for g in gi {
                    self.put_page(g);
                }
                Err(e)
            }
        }
    }

    /// Make progress once: a finished operation if one is ready, else publish, take
    /// responses or block for a bounded time ([`Events::wait`]) and look again. `None`
    /// when nothing finished (the caller may look at the clock, or at the store with
    /// [`follow_backend`](Self::follow_backend)).
    pub fn wait_once(&mut self) -> Option<Completion> {
        if self.done.is_empty() && !self.ops.is_empty() {
            self.wait_progress();
        }
        self.done
            .pop_front()
            .map(|(tag, result)| Completion { tag, result })
    }

    /// A finished operation without waiting, if there is one.
    pub fn poll(&mut self) -> Option<Completion> {
        self.reap();
        self.done
            .pop_front()
            .map(|(tag, result)| Completion { tag, result })
    }

    /// Wait for any operation to finish; `None` if none is pending.
    pub fn wait_any(&mut self) -> Option<Completion> {
        loop {
            if let Some((tag, result)) = self.done.pop_front() {
                return Some(Completion { tag, result });
            }
            if self.ops.is_empty() {
                return None;
            }
            self.wait_progress();
        }
    }

    /// Wait for operation `tag`: a read's data, or an empty buffer.
    pub fn wait(&mut self, tag: Tag) -> Result<Vec<u8>, BlkError> {
        loop {
            if let Some(i) = self.done.iter().position(|(t, _)| *t == tag)
                && let Some((_, r)) = self.done.remove(i)
            {
                return r;
            }
            if !self.ops.contains_key(&tag) {
                return Err(BlkError::UnknownTag(tag));
            }
            self.wait_progress();
        }
    }
}

impl<G: Grants, E: Events> BlockDevice for Blkfront<G, E> {
    fn sector_size(&self) -> u32 {
        self.info.sector_size
    }

    fn sectors(&self) -> u64 {
        self.info.logical_sectors()
    }

    fn read_only(&self) -> bool {
        self.info.read_only
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        let tag = self.submit_read(sector, buf.len())?;
        let data = self.wait(tag)?;
        if data.len() != buf.len() {
            return Err(BlkError::Io);
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), BlkError> {
        let tag = self.submit_write(sector, data)?;
        self.wait(tag).map(drop)
    }

    fn flush(&mut self) -> Result<(), BlkError> {
        let tag = self.submit_flush()?;
        self.wait(tag).map(drop)
    }
}
