//! The ring transport: xenstored's side of each domain's `xenstore_domain_interface` page.
//!
//! A [`RingServer`] owns the [`Engine`] and one [`RingPage`] per attached domain. The service
//! domain calls [`RingServer::service`] when a domain's event channel fires; it reads whole
//! requests out of the request ring, hands them to the engine, and writes replies and watch
//! events into the response rings of whichever domains they are for, returning the set of
//! domains whose event channel must be signalled ([`Serviced::notify`]).
//!
//! **Threat model.** The domain writes the page whenever it likes. So:
//! - indices are read once per pass into locals and validated before use: the request window
//!   `req_prod − req_cons` and the response window `rsp_prod − rsp_cons` must each be at most
//!   [`RING_SIZE`]; our own indices (`req_cons`, `rsp_prod`) are private copies, so a domain
//!   scribbling over them cannot make us skip or repeat bytes;
//! - ring bytes are copied out before they are parsed (never used in place);
//! - a broken stream (bad indices, a header announcing more than `PAYLOAD_MAX` bytes) marks
//!   the connection faulted: the `error` field says why, the engine forgets the connection
//!   (its watches and transactions go), and nothing else is affected. A faulted domain may
//!   start over through the reconnection handshake (`connection` = `RECONNECT`), which
//!   [`SERVER_FEATURES`] advertises;
//! - memory is bounded per domain: replies awaiting room in the ring are capped by the
//!   engine's `outstanding` quota (when reached, further requests stay in the domain's ring
//!   until it reads its replies), and watch events awaiting room by
//!   [`RingConfig::max_event_bytes`] (past it the domain is dropped as stalled).
//!
//! **Ordering** (XEN-ABI.md §7.4). Reader: load `req_prod` (acquire), copy the bytes, store
//! `req_cons` (release, so the copies complete before the domain may reuse the space).
//! Writer: load `rsp_cons` (acquire), copy the bytes, store `rsp_prod` (release, so the domain
//! sees the bytes before the index). Every pass that moves an index asks for a notification.
//!
//! Replies and events leave a connection in the order the engine produced them; a message may
//! be split across passes (the client reassembles, as Xen's do).
//!
//! No locks: a `RingServer` is used through `&mut self` by the service domain's one loop.
//!
//! **Driving it** (the service domain's loop): for each domain to serve, map its page (grant
//! ref `GNTTAB_RESERVED_XENSTORE` from that domain), bind an event channel to the domain's
//! port (`bind_interdomain`), and [`RingServer::attach`]; when a port fires, call
//! [`RingServer::service`] for its domain; signal the port of every domain in
//! [`Serviced::notify`]; on [`Effect::Introduce`] do the same for the new domain, on
//! [`Effect::Release`] [`RingServer::detach`], unbind and unmap; call again while
//! [`Serviced::again`].

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::xenstore::{
    CONNECTED, MessageDecoder, MsgType, RECONNECT, RING_SIZE, features, ring_error, ring_mask,
};

use crate::engine::{ConnId, Effect, Engine, Output};

/// Features this server offers in `server_features`: reconnection and the error field.
pub const SERVER_FEATURES: u32 = features::RECONNECTION | features::ERROR;

pub use shared_abi::xenstore::page::{RingPage, offsets};

/// Why a connection was dropped; each maps to an `error` field value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// An index pair outside the ring (`XENSTORE_ERROR_RINGIDX`).
    RingIndex,
    /// A header announcing more than `PAYLOAD_MAX` bytes (`XENSTORE_ERROR_PROTO`).
    Protocol,
    /// Watch events piled up past [`RingConfig::max_event_bytes`] (`XENSTORE_ERROR_COMM`).
    Stalled,
}

impl Fault {
    /// The `error` field value.
    pub const fn code(self) -> u32 {
        match self {
            Fault::RingIndex => ring_error::RINGIDX,
            Fault::Protocol => ring_error::PROTO,
            Fault::Stalled => ring_error::COMM,
        }
    }
}

/// Why [`RingServer::attach`] refused a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// The page is shorter than the interface (`offsets::END` bytes).
    PageTooSmall(usize),
}

/// Transport limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Replies that may wait for ring space for a privileged domain (the engine's
    /// `outstanding` quota binds the others).
    pub priv_outstanding: u32,
    /// Bytes of watch events that may wait for ring space before the domain is dropped.
    pub max_event_bytes: usize,
    /// Requests handled per [`RingServer::service`] call, so one busy domain cannot starve
    /// the rest; [`Serviced::again`] says when it stopped for this reason.
    pub budget: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            priv_outstanding: 256,
            max_event_bytes: 256 * 1024,
            budget: 64,
        }
    }
}

/// A connection's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingState {
    /// Serving through this engine connection.
    Connected(ConnId),
    /// Dropped for a fault; waits for a reconnection request.
    Faulted(Fault),
    /// The engine released the domain; only [`RingServer::detach`] is left.
    Closed,
}

/// What a call did that the caller must act on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Serviced {
    /// Domains whose event channel must be signalled.
    pub notify: BTreeSet<DomId>,
    /// Engine effects (introduce: map and [`RingServer::attach`]; release:
    /// [`RingServer::detach`] and unmap; log lines).
    pub effects: Vec<Effect>,
    /// The serviced domain still has requests waiting (budget spent): call again soon.
    pub again: bool,
}

/// One queued outgoing message.
struct Queued {
    bytes: Vec<u8>,
    reply: bool,
}

/// One domain's ring.
struct Ring<P> {
    page: P,
    state: RingState,
    /// Private copies of the indices this side owns.
    req_cons: u32,
    rsp_prod: u32,
    decoder: MessageDecoder,
    queue: VecDeque<Queued>,
    /// Bytes of `queue.front()` already in the ring.
    head_sent: usize,
    replies_queued: usize,
    event_bytes: usize,
}

impl<P: RingPage> Ring<P> {
    fn conn(&self) -> Option<ConnId> {
        match self.state {
            RingState::Connected(c) => Some(c),
            _ => None,
        }
    }

    fn clear_queue(&mut self) {
        self.queue.clear();
        self.head_sent = 0;
        self.replies_queued = 0;
        self.event_bytes = 0;
        self.decoder = MessageDecoder::new();
    }

    /// Copy `out.len()` bytes of the request stream at `idx`, across the wrap.
    fn read_req(&self, idx: u32, out: &mut [u8]) {
        let at = ring_mask(idx);
        let first = out.len().min(RING_SIZE - at);
        let (a, b) = out.split_at_mut(first);
        self.page.read_bytes(offsets::REQ + at, a);
        self.page.read_bytes(offsets::REQ, b);
    }

    fn write_rsp(&self, idx: u32, data: &[u8]) {
        let at = ring_mask(idx);
        let first = data.len().min(RING_SIZE - at);
        self.page.write_bytes(offsets::RSP + at, &data[..first]);
        self.page.write_bytes(offsets::RSP, &data[first..]);
    }

    /// Move queued bytes into the response ring. `Ok(true)` if any were written.
    fn flush(&mut self) -> Result<bool, Fault> {
        if self.queue.is_empty() {
            return Ok(false);
        }
        let cons = self.page.load_u32(offsets::RSP_CONS);
        let used = self.rsp_prod.wrapping_sub(cons) as usize;
        if used > RING_SIZE {
            return Err(Fault::RingIndex);
        }
        let mut space = RING_SIZE - used;
        let mut prod = self.rsp_prod;
        while space > 0 {
            let Some(head) = self.queue.front() else {
                break;
            };
            let rest = &head.bytes[self.head_sent..];
            let n = rest.len().min(space);
            self.write_rsp(prod, &rest[..n]);
            prod = prod.wrapping_add(n as u32);
            space -= n;
            self.head_sent += n;
            if self.head_sent == head.bytes.len() {
                if head.reply {
                    self.replies_queued -= 1;
                } else {
                    self.event_bytes -= head.bytes.len();
                }
                self.queue.pop_front();
                self.head_sent = 0;
            }
        }
        if prod == self.rsp_prod {
            return Ok(false);
        }
        self.rsp_prod = prod;
        self.page.store_u32(offsets::RSP_PROD, prod);
        Ok(true)
    }
}

/// The ring side of xenstored. See the module doc.
pub struct RingServer<P> {
    engine: Engine,
    cfg: RingConfig,
    rings: BTreeMap<DomId, Ring<P>>,
    owners: BTreeMap<ConnId, DomId>,
}

impl<P: RingPage> RingServer<P> {
    pub fn new(engine: Engine, cfg: RingConfig) -> Self {
        RingServer {
            engine,
            cfg,
            rings: BTreeMap::new(),
            owners: BTreeMap::new(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, e.g. for a local privileged connection of the service domain itself.
    /// Output of requests made this way goes through [`RingServer::route`].
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Domains with an attached page.
    pub fn domains(&self) -> impl Iterator<Item = DomId> + '_ {
        self.rings.keys().copied()
    }

    /// A domain's connection state.
    pub fn state(&self, domid: DomId) -> Option<RingState> {
        self.rings.get(&domid).map(|r| r.state)
    }

    /// Start serving `domid` through `page` (after INTRODUCE, or for a boot domain whose
    /// page the service domain mapped through the reserved grant). The indices the domain
    /// left there are taken as they are (they need not start at 0); an impossible pair makes
    /// the connection faulted at once. Replaces (and returns) a page already attached.
    /// Requests already waiting are served.
    pub fn attach(&mut self, domid: DomId, page: P) -> Result<(Option<P>, Serviced), AttachError> {
        if page.size() < offsets::END {
            return Err(AttachError::PageTooSmall(page.size()));
        }
        let old = self.detach(domid);
        let req_cons = page.load_u32(offsets::REQ_CONS);
        let req_prod = page.load_u32(offsets::REQ_PROD);
        let rsp_cons = page.load_u32(offsets::RSP_CONS);
        let rsp_prod = page.load_u32(offsets::RSP_PROD);
        page.store_u32(offsets::SERVER_FEATURES, SERVER_FEATURES);
        let ok = req_prod.wrapping_sub(req_cons) as usize <= RING_SIZE
            && rsp_prod.wrapping_sub(rsp_cons) as usize <= RING_SIZE;
        let mut sv = Serviced::default();
        let state = if ok {
            page.store_u32(offsets::ERROR, ring_error::NONE);
            let (conn, out) = self.engine.connect_domain(domid);
            self.owners.insert(conn, domid);
            self.route(out, &mut sv);
            RingState::Connected(conn)
        } else {
            page.store_u32(offsets::ERROR, Fault::RingIndex.code());
            sv.notify.insert(domid);
            RingState::Faulted(Fault::RingIndex)
        };
        self.rings.insert(
            domid,
            Ring {
                page,
                state,
                req_cons,
                rsp_prod,
                decoder: MessageDecoder::new(),
                queue: VecDeque::new(),
                head_sent: 0,
                replies_queued: 0,
                event_bytes: 0,
            },
        );
        let more = self.service(domid);
        merge(&mut sv, more);
        Ok((old, sv))
    }

    /// Stop serving `domid` and give its page back (to unmap). The engine forgets the
    /// connection if it had not already.
    pub fn detach(&mut self, domid: DomId) -> Option<P> {
        let ring = self.rings.remove(&domid)?;
        if let Some(c) = ring.conn() {
            self.engine.disconnect(c);
            self.owners.remove(&c);
        }
        Some(ring.page)
    }

    /// Serve every attached domain once (when the caller does not know which port fired).
    pub fn service_all(&mut self) -> Serviced {
        let mut sv = Serviced::default();
        let doms: Vec<DomId> = self.rings.keys().copied().collect();
        for d in doms {
            let one = self.service(d);
            sv.again |= one.again;
            merge(&mut sv, one);
        }
        sv
    }

    /// Serve `domid` after its event channel fired: handle a reconnection request, move
    /// waiting replies and events into its response ring, then read and handle requests
    /// (up to the budget, while its outstanding replies are under quota).
    pub fn service(&mut self, domid: DomId) -> Serviced {
        let mut sv = Serviced::default();
        let Some(ring) = self.rings.get_mut(&domid) else {
            return sv;
        };
        if ring.state == RingState::Closed {
            return sv;
        }
        if ring.page.load_u32(offsets::CONNECTION) == RECONNECT {
            self.reconnect(domid, &mut sv);
            return sv;
        }
        if self.flush_one(domid, &mut sv).is_err() {
            return sv;
        }
        let Some(ring) = self.rings.get_mut(&domid) else {
            return sv;
        };
        let Some(conn) = ring.conn() else {
            return sv;
        };
        let limit = self
            .engine
            .quotas_for(conn)
            .map_or(self.cfg.priv_outstanding, |q| q.outstanding) as usize;
        let prod = ring.page.load_u32(offsets::REQ_PROD);
        let avail = prod.wrapping_sub(ring.req_cons) as usize;
        if avail > RING_SIZE {
            self.fail(domid, Fault::RingIndex, &mut sv);
            return sv;
        }
        let mut buf = [0u8; RING_SIZE];
        ring.read_req(ring.req_cons, &mut buf[..avail]);
        let mut used = 0;
        let mut handled = 0;
        loop {
            let Some(ring) = self.rings.get_mut(&domid) else {
                return sv;
            };
            if used == avail || ring.replies_queued >= limit || handled >= self.cfg.budget {
                break;
            }
            let (n, got) = ring.decoder.push(&buf[used..avail]);
            used += n;
            match got {
                Err(_) => {
                    self.fail(domid, Fault::Protocol, &mut sv);
                    return sv;
                }
                Ok(Some(msg)) => {
                    handled += 1;
                    let out = self.engine.handle(conn, &msg);
                    self.route(out, &mut sv);
                    // The request may have closed this very connection (RELEASE of itself).
                    if self.rings.get(&domid).and_then(|r| r.conn()) != Some(conn) {
                        return sv;
                    }
                }
                Ok(None) if n == 0 => break,
                Ok(None) => {}
            }
        }
        if let Some(ring) = self.rings.get_mut(&domid)
            && used > 0
        {
            ring.req_cons = ring.req_cons.wrapping_add(used as u32);
            ring.page.store_u32(offsets::REQ_CONS, ring.req_cons);
            // The domain may be waiting for room to write more.
            sv.notify.insert(domid);
            sv.again = used < avail && handled >= self.cfg.budget;
        }
        sv
    }

    /// Deliver an engine [`Output`] (from [`RingServer::service`]'s own requests, or from
    /// requests made through [`RingServer::engine_mut`]): queue each send on its domain's
    /// ring, flush, and collect notifications and effects.
    pub fn route(&mut self, out: Output, sv: &mut Serviced) {
        let mut touched = BTreeSet::new();
        for s in out.sends {
            let Some(&domid) = self.owners.get(&s.conn) else {
                continue;
            };
            let Some(ring) = self.rings.get_mut(&domid) else {
                continue;
            };
            let reply = s.bytes.get(..4) != Some(&MsgType::WatchEvent.as_u32().to_le_bytes()[..]);
            if reply {
                ring.replies_queued += 1;
            } else {
                ring.event_bytes += s.bytes.len();
                if ring.event_bytes > self.cfg.max_event_bytes {
                    self.fail(domid, Fault::Stalled, sv);
                    continue;
                }
            }
            ring.queue.push_back(Queued {
                bytes: s.bytes,
                reply,
            });
            touched.insert(domid);
        }
        for domid in touched {
            let _ = self.flush_one(domid, sv);
        }
        for e in out.effects {
            if let Effect::Close(c) = e
                && let Some(domid) = self.owners.remove(&c)
                && let Some(ring) = self.rings.get_mut(&domid)
            {
                ring.state = RingState::Closed;
                ring.clear_queue();
            }
            sv.effects.push(e);
        }
    }

    fn flush_one(&mut self, domid: DomId, sv: &mut Serviced) -> Result<(), Fault> {
        let Some(ring) = self.rings.get_mut(&domid) else {
            return Ok(());
        };
        if ring.conn().is_none() {
            return Ok(());
        }
        match ring.flush() {
            Ok(true) => {
                sv.notify.insert(domid);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(f) => {
                self.fail(domid, f, sv);
                Err(f)
            }
        }
    }

    /// Drop `domid`'s connection for `fault`: the engine forgets it (watches, transactions),
    /// the page's `error` says why, and the domain is told.
    fn fail(&mut self, domid: DomId, fault: Fault, sv: &mut Serviced) {
        let Some(ring) = self.rings.get_mut(&domid) else {
            return;
        };
        if let Some(c) = ring.conn() {
            self.engine.disconnect(c);
            self.owners.remove(&c);
        }
        ring.state = RingState::Faulted(fault);
        ring.clear_queue();
        ring.page.store_u32(offsets::ERROR, fault.code());
        sv.notify.insert(domid);
    }

    /// The domain asked to start over: forget its session, empty both rings, clear the error
    /// and report `CONNECTED` (last, so the domain sees clean indices once it sees that).
    fn reconnect(&mut self, domid: DomId, sv: &mut Serviced) {
        let Some(ring) = self.rings.get_mut(&domid) else {
            return;
        };
        if let Some(c) = ring.conn() {
            self.engine.disconnect(c);
            self.owners.remove(&c);
        }
        ring.clear_queue();
        ring.req_cons = 0;
        ring.rsp_prod = 0;
        for off in [
            offsets::REQ_CONS,
            offsets::REQ_PROD,
            offsets::RSP_CONS,
            offsets::RSP_PROD,
        ] {
            ring.page.store_u32(off, 0);
        }
        ring.page.store_u32(offsets::ERROR, ring_error::NONE);
        let (conn, out) = self.engine.connect_domain(domid);
        ring.state = RingState::Connected(conn);
        ring.page.store_u32(offsets::CONNECTION, CONNECTED);
        self.owners.insert(conn, domid);
        sv.notify.insert(domid);
        self.route(out, sv);
    }
}

fn merge(into: &mut Serviced, from: Serviced) {
    into.notify.extend(from.notify);
    into.effects.extend(from.effects);
    into.again |= from.again;
}
