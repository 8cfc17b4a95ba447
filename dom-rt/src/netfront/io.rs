//! The data path: tx frames copied into granted pages, rx buffers posted and collected,
//! every response checked; backend restart; closing.

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use shared_abi::PAGE_SIZE;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::grant_table::GrantRef;
use shared_abi::netif::{
    NetifExtraInfo, NetifRxRequest, NetifRxResponse, NetifTxRequest, NetifTxResponse, extra_type,
    netrxf, nettxf, rsp,
};
use shared_abi::ring::FrontRing;
use shared_abi::xenbus::{XenbusError, XenbusState, read_other_end, read_state};

use super::negotiate::{NetInfo, QueueSetup, finish, negotiate};
use super::{
    Broken, Events, Grants, MAX_FRAME, MAX_SLOTS_PER_FRAME, MIN_FRAME, NetConfig, NetError,
    RING_SLOTS, Ring, XsStore,
};
use crate::front::{GRANT_RETRY_ROUNDS, Released, close_handshake};

/// A received frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFrame {
    /// The Ethernet frame (no FCS).
    pub data: Vec<u8>,
    /// `NETRXF_data_validated`: the backend (or the sender) already checked the checksum.
    pub data_validated: bool,
    /// `NETRXF_csum_blank`: the protocol checksum is not filled in (only with
    /// [`NetConfig::csum_offload`]); the data is known good.
    pub csum_blank: bool,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames put on the tx rings, and their bytes.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames the backend answered ERROR.
    pub tx_errors: u64,
    /// Frames the backend answered DROPPED, or that had no response when the backend went
    /// away ([`super::Netfront::reconnect`]).
    pub tx_dropped: u64,
    /// Frames received, and their bytes.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Rx slots the backend answered with an error, and frames that were malformed (too
    /// many slots, too long, empty, a bad extra-info).
    pub rx_errors: u64,
    /// Frames dropped because [`NetConfig::rx_queue`] frames were waiting already, or a
    /// partial frame lost at a reconnect.
    pub rx_dropped: u64,
    /// Notifications sent.
    pub notifies: u64,
    /// Times [`super::Netfront::wait_event`] blocked.
    pub waits: u64,
    /// Reconnections to a new backend.
    pub reconnects: u64,
    /// Grants the backend still held when we ended them (pages set aside).
    pub busy_grants: u64,
}

struct Granted<P> {
    gref: GrantRef,
    page: P,
}

/// A tx slot in flight: its page, and whether it is a frame's first slot.
struct TxSlot<P> {
    g: Granted<P>,
    head: bool,
}

/// An rx frame being reassembled over several responses.
struct Partial {
    data: Vec<u8>,
    validated: bool,
    csum_blank: bool,
    /// Extra-info slots follow.
    extras: bool,
    /// Data slots follow.
    more: bool,
    slots: usize,
    /// Extra-info slots so far.
    extra_slots: usize,
    /// A slot was answered with an error status (counted per slot).
    error: bool,
    /// Too many slots, too long, or a bad extra-info.
    malformed: bool,
}

struct Queue<P> {
    tx: FrontRing<NetifTxRequest, NetifTxResponse>,
    rx: FrontRing<NetifRxRequest, NetifRxResponse>,
    tx_port: EvtchnPort,
    rx_port: EvtchnPort,
    ring_pages: Vec<(GrantRef, P)>,
    /// By tx id.
    tx_slots: Vec<Option<TxSlot<P>>>,
    tx_free: Vec<u16>,
    /// By rx id = ring index mod 256 (the slot the request went in).
    rx_bufs: Vec<Option<Granted<P>>>,
    /// Rx requests posted and responses consumed (free-running, as the ring's indices).
    rx_prod: u32,
    rx_cons: u32,
    partial: Option<Partial>,
}

/// Pages not in use: ungranted and ready, or still held by the backend.
struct Pool<P> {
    free: Vec<P>,
    busy: Vec<Granted<P>>,
    /// Most free pages kept for reuse; more go back to [`Grants::free_page`].
    keep: usize,
}

/// A connected network frontend. See the module doc.
pub struct Netfront<G: Grants, E: Events> {
    grants: G,
    events: E,
    frontend_dir: String,
    cfg: NetConfig,
    info: NetInfo,
    queues: Vec<Queue<G::Page>>,
    ports: Vec<EvtchnPort>,
    pool: Pool<G::Page>,
    rx_ready: VecDeque<RxFrame>,
    broken: Option<Broken>,
    stats: NetStats,
}

impl<G: Grants, E: Events> core::fmt::Debug for Netfront<G, E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Netfront")
            .field("info", &self.info)
            .field("broken", &self.broken)
            .field("stats", &self.stats)
            .finish()
    }
}

/// End a grant and keep the page: ready for reuse, or set aside while the grantee maps it.
fn end_grant<G: Grants>(
    grants: &mut G,
    pool: &mut Pool<G::Page>,
    stats: &mut NetStats,
    g: Granted<G::Page>,
) {
    if !grants.end_access(g.gref) {
        stats.busy_grants += 1;
        pool.busy.push(g);
    } else if pool.free.len() < pool.keep {
        pool.free.push(g.page);
    } else {
        grants.free_page(g.page);
    }
}

/// The queue a frame goes out on: a hash of its flow (IPv4/IPv6 addresses and TCP/UDP
/// ports, else the MAC pair), so that one flow stays in order on one queue.
fn flow_queue(frame: &[u8], n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    let mut add = |b: &[u8]| {
        for &x in b {
            h = (h ^ u32::from(x)).wrapping_mul(0x0100_0193);
        }
    };
    let l3 = frame.get(14..).unwrap_or(&[]);
    match frame.get(12..14) {
        Some([0x08, 0x00]) if l3.len() >= 20 => {
            let ihl = usize::from(l3[0] & 0xF) * 4;
            add(&l3[12..20]);
            add(&l3[9..10]);
            if matches!(l3[9], 6 | 17)
                && let Some(p) = l3.get(ihl..ihl + 4)
            {
                add(p);
            }
        }
        Some([0x86, 0xDD]) if l3.len() >= 40 => {
            add(&l3[8..40]);
            add(&l3[6..7]);
            if matches!(l3[6], 6 | 17)
                && let Some(p) = l3.get(40..44)
            {
                add(p);
            }
        }
        _ => add(frame.get(..12).unwrap_or(frame)),
    }
    h as usize % n
}

impl<G: Grants, E: Events> Netfront<G, E> {
    /// Run the xenbus handshake for the device at `frontend_dir` and return it connected,
    /// with its rx rings filled.
    pub fn connect<S: XsStore>(
        mut grants: G,
        mut events: E,
        store: &mut S,
        frontend_dir: &str,
        cfg: NetConfig,
    ) -> Result<Self, NetError> {
        let n = negotiate(store, &mut grants, &mut events, frontend_dir, &cfg)?;
        let mut f = Netfront {
            grants,
            events,
            frontend_dir: frontend_dir.to_string(),
            cfg,
            info: n.info,
            queues: Vec::new(),
            ports: Vec::new(),
            pool: Pool {
                free: Vec::new(),
                busy: Vec::new(),
                keep: 0,
            },
            rx_ready: VecDeque::new(),
            broken: None,
            stats: NetStats::default(),
        };
        f.install(n.queues);
        if let Err(e) = finish(store, frontend_dir, &f.info.backend, &f.cfg) {
            f.teardown();
            for p in core::mem::take(&mut f.pool.free) {
                f.grants.free_page(p);
            }
            return Err(e);
        }
        f.kick();
        Ok(f)
    }

    /// Take the negotiated rings and fill the rx rings.
    fn install(&mut self, queues: Vec<QueueSetup<G::Page>>) {
        for s in queues {
            self.queues.push(Queue {
                tx: s.tx,
                rx: s.rx,
                tx_port: s.tx_port,
                rx_port: s.rx_port,
                ring_pages: s.ring_pages,
                tx_slots: (0..RING_SLOTS).map(|_| None).collect(),
                tx_free: (0..RING_SLOTS as u16).rev().collect(),
                rx_bufs: (0..RING_SLOTS).map(|_| None).collect(),
                rx_prod: 0,
                rx_cons: 0,
                partial: None,
            });
        }
        // Enough for the rx rings and a burst of tx frames.
        self.pool.keep = self.queues.len() * self.cfg.rx_buffers.clamp(1, RING_SLOTS) + 64;
        self.ports = Vec::new();
        for q in &self.queues {
            self.ports.push(q.tx_port);
            if q.rx_port != q.tx_port {
                self.ports.push(q.rx_port);
            }
        }
        for qi in 0..self.queues.len() {
            self.refill(qi);
        }
    }

    /// Drop every queue: tx frames in flight are lost (counted dropped), posted rx buffers
    /// and the rings' grants end, the ports close. The ring grants that could not end (the
    /// backend still maps them).
    fn teardown(&mut self) -> Vec<GrantRef> {
        let mut rings_mapped = Vec::new();
        for q in core::mem::take(&mut self.queues) {
            for s in q.tx_slots.into_iter().flatten() {
                if s.head {
                    self.stats.tx_dropped += 1;
                }
                end_grant(&mut self.grants, &mut self.pool, &mut self.stats, s.g);
            }
            for b in q.rx_bufs.into_iter().flatten() {
                end_grant(&mut self.grants, &mut self.pool, &mut self.stats, b);
            }
            if q.partial.is_some() {
                self.stats.rx_dropped += 1;
            }
            // Ring memory is never reused (the backend may have it mapped until it goes).
            for (gref, _) in q.ring_pages {
                if !self.grants.end_access(gref) {
                    rings_mapped.push(gref);
                }
            }
            self.events.close(q.tx_port);
            if q.rx_port != q.tx_port {
                self.events.close(q.rx_port);
            }
        }
        self.ports.clear();
        rings_mapped
    }

    /// Signal every port once the backend is connected (as Linux's `xennet_connect`
    /// does): a backend that bound its channels after our rx buffers were published looks
    /// at the rings now.
    fn kick(&mut self) {
        for &p in &self.ports {
            let _ = self.events.notify(p);
        }
    }

    /// The MAC address the toolstack gave this interface.
    pub fn mac(&self) -> [u8; 6] {
        self.info.mac
    }

    /// The device as negotiated.
    pub fn info(&self) -> &NetInfo {
        &self.info
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Why the device is dead, if it is.
    pub fn broken(&self) -> Option<Broken> {
        self.broken
    }

    /// Our event-channel ports (per queue: one, or tx then rx with split channels).
    pub fn ports(&self) -> &[EvtchnPort] {
        &self.ports
    }

    pub fn grants_mut(&mut self) -> &mut G {
        &mut self.grants
    }

    pub fn events_mut(&mut self) -> &mut E {
        &mut self.events
    }

    fn alive(&self) -> Result<(), NetError> {
        match self.broken {
            Some(b) => Err(NetError::Broken(b)),
            None => Ok(()),
        }
    }

    fn break_down(&mut self, why: Broken) {
        if self.broken.is_none() {
            log::error!("netfront: device {}: {why}; disconnecting", self.info.devid);
            self.broken = Some(why);
        }
    }

    /// A page for a tx or rx buffer.
    fn page(&mut self) -> Result<G::Page, NetError> {
        match self.pool.free.pop() {
            Some(p) => Ok(p),
            None => Ok(self.grants.alloc_page()?),
        }
    }

    /// Send one Ethernet frame (without FCS): copied into pages of ours granted read-only
    /// to the backend, one slot per page. [`NetError::Busy`] when the tx ring has no room
    /// even after taking the backend's responses.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        self.alive()?;
        let len = frame.len();
        let max = if self.info.tx_sg {
            MAX_FRAME
        } else {
            PAGE_SIZE
        };
        if !(MIN_FRAME..=max).contains(&len) {
            return Err(NetError::BadFrame { len });
        }
        let nslots = len.div_ceil(PAGE_SIZE);
        let qi = flow_queue(frame, self.queues.len());
        self.reap_tx(qi);
        self.alive()?;
        {
            let q = &self.queues[qi];
            if (q.tx.free_slots() as usize) < nslots || q.tx_free.len() < nslots {
                return Err(NetError::Busy);
            }
        }
        let backend = self.info.backend_id;
        let mut granted: Vec<(Granted<G::Page>, usize)> = Vec::with_capacity(nslots);
        for chunk in frame.chunks(PAGE_SIZE) {
            let r = self.page().and_then(|page| {
                self.grants.write(&page, 0, chunk);
                match self.grants.grant(backend, &page, true) {
                    Ok(gref) => Ok(Granted { gref, page }),
                    Err(e) => {
                        self.pool.free.push(page);
                        Err(e.into())
                    }
                }
            });
            match r {
                Ok(g) => granted.push((g, chunk.len())),
                Err(e) => {
                    // Not on the ring yet: the backend never saw these grants.
                    for (g, _) in granted {
                        end_grant(&mut self.grants, &mut self.pool, &mut self.stats, g);
                    }
                    return Err(e);
                }
            }
        }
        let q = &mut self.queues[qi];
        for (i, (g, clen)) in granted.into_iter().enumerate() {
            let Some(id) = q.tx_free.pop() else {
                // Cannot happen (room was checked).
                end_grant(&mut self.grants, &mut self.pool, &mut self.stats, g);
                continue;
            };
            let req = NetifTxRequest {
                gref: g.gref,
                offset: 0,
                flags: if i + 1 < nslots { nettxf::MORE_DATA } else { 0 },
                id,
                // The first slot carries the whole frame's length (≤ 65535, checked).
                size: if i == 0 { len as u16 } else { clen as u16 },
            };
            if q.tx.push_request(&req).is_err() {
                q.tx_free.push(id);
                end_grant(&mut self.grants, &mut self.pool, &mut self.stats, g);
                continue;
            }
            q.tx_slots[usize::from(id)] = Some(TxSlot { g, head: i == 0 });
        }
        if q.tx.push_requests_and_check_notify() {
            self.stats.notifies += 1;
            // A failed send shows as a stall; the next frame notifies again.
            let _ = self.events.notify(q.tx_port);
        }
        self.stats.tx_packets += 1;
        self.stats.tx_bytes += len as u64;
        Ok(())
    }

    /// Take the tx responses of queue `qi`, ending their grants.
    fn reap_tx(&mut self, qi: usize) {
        while self.broken.is_none() {
            let q = &mut self.queues[qi];
            let r = match q.tx.get_response() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(err) => {
                    self.break_down(Broken::Ring {
                        queue: qi as u16,
                        ring: Ring::Tx,
                        err,
                    });
                    break;
                }
            };
            let unknown = Broken::UnknownId {
                queue: qi as u16,
                ring: Ring::Tx,
                id: r.id,
            };
            if !matches!(q.tx_slots.get(usize::from(r.id)), Some(Some(_))) {
                self.break_down(unknown);
                break;
            }
            if !matches!(r.status, rsp::OKAY | rsp::ERROR | rsp::DROPPED) {
                self.break_down(Broken::BadStatus {
                    queue: qi as u16,
                    ring: Ring::Tx,
                    id: r.id,
                    status: r.status,
                });
                break;
            }
            let Some(slot) = q.tx_slots[usize::from(r.id)].take() else {
                self.break_down(unknown);
                break;
            };
            q.tx_free.push(r.id);
            if slot.head {
                match r.status {
                    rsp::ERROR => self.stats.tx_errors += 1,
                    rsp::DROPPED => self.stats.tx_dropped += 1,
                    _ => {}
                }
            }
            end_grant(&mut self.grants, &mut self.pool, &mut self.stats, slot.g);
        }
    }

    /// Take the rx responses of queue `qi`: reassemble frames, end the buffers' grants.
    fn collect_rx(&mut self, qi: usize) {
        while self.broken.is_none() {
            let q = &mut self.queues[qi];
            let r = match q.rx.get_response() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(err) => {
                    self.break_down(Broken::Ring {
                        queue: qi as u16,
                        ring: Ring::Rx,
                        err,
                    });
                    break;
                }
            };
            let slot = q.rx_cons as usize % RING_SLOTS;
            q.rx_cons = q.rx_cons.wrapping_add(1);
            // The ring checked that this slot held a request; its buffer is ours to take.
            let Some(buf) = q.rx_bufs[slot].take() else {
                self.break_down(Broken::UnknownId {
                    queue: qi as u16,
                    ring: Ring::Rx,
                    id: r.id,
                });
                break;
            };
            if let Some(p) = q.partial.as_mut().filter(|p| p.extras) {
                // An extra-info slot (GSO, hash, ...): it carries no data and no id; the
                // buffer posted there is simply given back.
                let e = NetifExtraInfo::from_rx_slot(&r);
                p.extra_slots += 1;
                // At most one extra of each type.
                if e.kind == extra_type::NONE
                    || e.kind >= extra_type::MAX
                    || p.extra_slots >= usize::from(extra_type::MAX)
                {
                    p.malformed = true;
                }
                p.extras = e.has_more();
                end_grant(&mut self.grants, &mut self.pool, &mut self.stats, buf);
                self.maybe_deliver(qi);
                continue;
            }
            if usize::from(r.id) != slot {
                // Not the id of the request in this slot. The buffer may still be written:
                // keep it out of use.
                self.pool.busy.push(buf);
                self.break_down(Broken::UnknownId {
                    queue: qi as u16,
                    ring: Ring::Rx,
                    id: r.id,
                });
                break;
            }
            let mut bytes = Vec::new();
            let error = if r.status >= 0 {
                let (off, n) = (usize::from(r.offset), r.status as usize);
                if off + n > PAGE_SIZE {
                    self.pool.busy.push(buf);
                    self.break_down(Broken::BadOffset {
                        queue: qi as u16,
                        id: r.id,
                        offset: r.offset,
                        status: r.status,
                    });
                    break;
                }
                bytes = vec![0u8; n];
                self.grants.read(&buf.page, off, &mut bytes);
                false
            } else if r.status == rsp::ERROR || r.status == rsp::DROPPED {
                true
            } else {
                self.pool.busy.push(buf);
                self.break_down(Broken::BadStatus {
                    queue: qi as u16,
                    ring: Ring::Rx,
                    id: r.id,
                    status: r.status,
                });
                break;
            };
            end_grant(&mut self.grants, &mut self.pool, &mut self.stats, buf);
            let q = &mut self.queues[qi];
            let first = q.partial.is_none();
            let p = q.partial.get_or_insert_with(|| Partial {
                data: Vec::new(),
                validated: r.flags & netrxf::DATA_VALIDATED != 0,
                csum_blank: r.flags & netrxf::CSUM_BLANK != 0,
                extras: false,
                more: false,
                slots: 0,
                extra_slots: 0,
                error: false,
                malformed: false,
            });
            p.slots += 1;
            if error {
                self.stats.rx_errors += 1;
                p.error = true;
            } else if p.slots > MAX_SLOTS_PER_FRAME || p.data.len() + bytes.len() > MAX_FRAME {
                p.malformed = true;
            } else if !p.error && !p.malformed {
                p.data.extend_from_slice(&bytes);
            }
            p.more = r.flags & netrxf::MORE_DATA != 0;
            p.extras = first && r.flags & netrxf::EXTRA_INFO != 0;
            self.maybe_deliver(qi);
        }
    }

    /// Hand up queue `qi`'s frame if it is complete.
    fn maybe_deliver(&mut self, qi: usize) {
        let q = &mut self.queues[qi];
        if q.partial.as_ref().is_none_or(|p| p.extras || p.more) {
            return;
        }
        let Some(p) = q.partial.take() else {
            return;
        };
        if p.malformed || (p.data.is_empty() && !p.error) {
            // Error slots were counted one by one; a malformed (or empty) frame once.
            self.stats.rx_errors += 1;
        }
        if p.error || p.malformed || p.data.is_empty() {
            return;
        }
        if self.rx_ready.len() >= self.cfg.rx_queue.max(1) {
            self.stats.rx_dropped += 1;
            return;
        }
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += p.data.len() as u64;
        self.rx_ready.push_back(RxFrame {
            data: p.data,
            data_validated: p.validated,
            csum_blank: p.csum_blank,
        });
    }

    /// Keep queue `qi`'s rx ring posted with [`NetConfig::rx_buffers`] granted pages.
    fn refill(&mut self, qi: usize) {
        if self.broken.is_some() {
            return;
        }
        let target = self.cfg.rx_buffers.clamp(1, RING_SLOTS) as u32;
        let backend = self.info.backend_id;
        let mut pushed = false;
        loop {
            let q = &self.queues[qi];
            if q.rx_prod.wrapping_sub(q.rx_cons) >= target || q.rx.free_slots() == 0 {
                break;
            }
            let id = q.rx_prod as usize % RING_SLOTS;
            if q.rx_bufs[id].is_some() {
                break;
            }
            let page = match self.page() {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("netfront: cannot post an rx buffer: {e}");
                    break;
                }
            };
            let gref = match self.grants.grant(backend, &page, false) {
                Ok(g) => g,
                Err(e) => {
                    self.pool.free.push(page);
                    log::warn!("netfront: cannot grant an rx buffer: {e}");
                    break;
                }
            };
            let q = &mut self.queues[qi];
            let req = NetifRxRequest {
                id: id as u16,
                pad: 0,
                gref,
            };
            if q.rx.push_request(&req).is_err() {
                end_grant(
                    &mut self.grants,
                    &mut self.pool,
                    &mut self.stats,
                    Granted { gref, page },
                );
                break;
            }
            q.rx_bufs[id] = Some(Granted { gref, page });
            q.rx_prod = q.rx_prod.wrapping_add(1);
            pushed = true;
        }
        let q = &mut self.queues[qi];
        if pushed && q.rx.push_requests_and_check_notify() {
            self.stats.notifies += 1;
            let _ = self.events.notify(q.rx_port);
        }
    }

    /// Pages set aside because the backend still held them: reuse those it let go.
    fn retry_busy(&mut self) {
        if self.broken.is_some() || self.pool.busy.is_empty() {
            return;
        }
        for g in core::mem::take(&mut self.pool.busy) {
            if self.grants.end_access(g.gref) {
                self.pool.free.push(g.page);
            } else {
                self.pool.busy.push(g);
            }
        }
    }

    /// Make progress without blocking: take tx responses (ending their grants), collect
    /// received frames, refill the rx rings.
    pub fn poll(&mut self) -> Result<(), NetError> {
        for qi in 0..self.queues.len() {
            self.reap_tx(qi);
            self.collect_rx(qi);
            self.refill(qi);
        }
        self.retry_busy();
        self.alive()
    }

    /// The next received frame, if there is one (never blocks; collects from the rings
    /// when nothing is waiting). Frames received before the device broke are still handed
    /// out.
    pub fn recv(&mut self) -> Option<RxFrame> {
        if self.rx_ready.is_empty() {
            for qi in 0..self.queues.len() {
                self.collect_rx(qi);
                self.refill(qi);
            }
        }
        self.rx_ready.pop_front()
    }

    /// Block until the backend signals (a response is ready on some ring), a received
    /// frame is waiting, the device is broken, or `deadline_ns` (system time, the clock of
    /// [`crate::time::now_ns`] / [`Events::now_ns`]) has passed. With `None`, waits for the
    /// backend only. On a domain each underlying wait is `DomainEvents::max_wait_ns` at
    /// most (10 ms by default), so a deadline is met to within that. Call
    /// [`poll`](Self::poll) afterwards.
    pub fn wait_event(&mut self, deadline_ns: Option<u64>) {
        loop {
            if self.broken.is_some() || !self.rx_ready.is_empty() {
                return;
            }
            for qi in 0..self.queues.len() {
                let q = &mut self.queues[qi];
                // Arms the response events, then looks once more (no lost wake-up).
                let rx = q.rx.final_check_for_responses().map_err(|e| (Ring::Rx, e));
                let tx = q.tx.final_check_for_responses().map_err(|e| (Ring::Tx, e));
                match rx.and_then(|a| tx.map(|b| a || b)) {
                    Ok(false) => {}
                    Ok(true) => return,
                    Err((ring, err)) => {
                        self.break_down(Broken::Ring {
                            queue: qi as u16,
                            ring,
                            err,
                        });
                        return;
                    }
                }
            }
            if deadline_ns.is_some_and(|d| self.events.now_ns() >= d) {
                return;
            }
            self.stats.waits += 1;
            self.events.wait(&self.ports);
        }
    }

    /// Follow the toolstack when it re-points this device at another backend (the old one
    /// died and was restarted as a new domain), or when the backend offers the device again
    /// (its state is back to InitWait): [`reconnect`](Self::reconnect) and say so. Cheap
    /// enough to call whenever the backend has been silent for a while.
    pub fn follow_backend<S: XsStore>(&mut self, store: &mut S) -> Result<bool, NetError> {
        let (id, be) = match read_other_end(store, &self.frontend_dir, "backend-id", "backend") {
            Ok(x) => x,
            // The two keys were read apart while the toolstack changed them: look again
            // next time.
            Err(XenbusError::Invalid { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let again = id == self.info.backend_id
            && be == self.info.backend
            && read_state(store, &be) == Ok(XenbusState::InitWait);
        if id == self.info.backend_id && be == self.info.backend && !again {
            return Ok(false);
        }
        self.reconnect(store)?;
        Ok(true)
    }

    /// Reconnect to the backend the frontend directory now names, as Linux's netfront does
    /// after a backend restart (`netfront_resume`): take the frames the old backend still
    /// delivered, drop the old rings (their grants end, their channels close; **tx frames
    /// without a response are dropped** and counted in [`NetStats::tx_dropped`]), run the
    /// handshake again and refill the rx rings. Frames already received stay readable.
    ///
    /// If the handshake fails the device is dead ([`Broken::Lost`]).
    pub fn reconnect<S: XsStore>(&mut self, store: &mut S) -> Result<(), NetError> {
        if self.broken.is_none() {
            for qi in 0..self.queues.len() {
                self.reap_tx(qi);
                self.collect_rx(qi);
            }
        }
        // Whatever the old backend did, it is gone: its grants end (a dead domain's
        // mappings were torn down by the hypervisor).
        self.broken = None;
        self.teardown();
        self.retry_busy();
        let fe = self.frontend_dir.clone();
        let n = match negotiate(store, &mut self.grants, &mut self.events, &fe, &self.cfg) {
            Ok(n) => n,
            Err(e) => {
                self.broken = Some(Broken::Lost);
                return Err(e);
            }
        };
        self.info = n.info;
        self.install(n.queues);
        if let Err(e) = finish(store, &fe, &self.info.backend, &self.cfg) {
            self.teardown();
            self.broken = Some(Broken::Lost);
            return Err(e);
        }
        self.kick();
        self.stats.reconnects += 1;
        Ok(())
    }

    /// Close the device as Linux's netfront does on unplug: Closing, wait for the backend
    /// to close (it unmaps everything), Closed; then end every grant, free the pages it let
    /// go and close the ports. Tx frames without a response are dropped. A timeout names
    /// the state the backend never reached (the device is released all the same: see
    /// [`release`](Self::release)).
    pub fn close<S: XsStore>(self, store: &mut S) -> Result<(), NetError> {
        self.release(store).result().map_err(NetError::from)
    }

    /// Release the device, whoever started the close: the guest (unplug), the toolstack (a
    /// detach: the backend went Closing, as Linux's `netback_changed` sees it) or a vanished
    /// device directory (forced detach). The close handshake is
    /// `crate::front::close_handshake` (bounded waits, nothing written to a directory that
    /// is gone); then every grant ends (rings, posted rx buffers, tx slots in flight, pages
    /// set aside), pages whose grants ended are freed and the ports close. A grant the
    /// backend still maps stays and its page is never reused ([`Released::leaked`]).
    pub fn release<S: XsStore>(mut self, store: &mut S) -> Released {
        let fe = self.frontend_dir.clone();
        let backend = self.info.backend.clone();
        let mut r = close_handshake(store, &fe, &backend, self.cfg.wait_rounds);
        let dropped0 = self.stats.tx_dropped;
        let mut total = self.pool.busy.len();
        for q in &self.queues {
            total += q.ring_pages.len();
            total += q.tx_slots.iter().flatten().count();
            total += q.rx_bufs.iter().flatten().count();
        }
        self.broken = None;
        let mut rings = self.teardown();
        r.dropped = (self.stats.tx_dropped - dropped0) as usize;
        // Pages set aside before, or just now because the backend still maps them: a
        // backend tearing down on its own (a forced detach) may still be unmapping, so retry
        // for a bounded time; what it never lets go stays granted, its page unused.
        let retries = self.cfg.wait_rounds.min(GRANT_RETRY_ROUNDS);
        let mut busy = core::mem::take(&mut self.pool.busy);
        for round in 0..=retries {
            let mut still = Vec::new();
            for g in busy {
                if self.grants.end_access(g.gref) {
                    self.grants.free_page(g.page);
                } else {
                    still.push(g);
                }
            }
            busy = still;
            rings.retain(|&g| !self.grants.end_access(g));
            if (busy.is_empty() && rings.is_empty()) || round == retries {
                break;
            }
            store.wait();
        }
        r.leaked = busy.len() + rings.len();
        r.ended = total.saturating_sub(r.leaked);
        for p in core::mem::take(&mut self.pool.free) {
            self.grants.free_page(p);
        }
        r
    }
}
