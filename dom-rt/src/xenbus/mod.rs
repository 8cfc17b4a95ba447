//! Xenbus: the domain's xenstore client.
//!
//! [`Xenbus`] speaks the xenstore wire protocol (XEN-ABI.md §7) over a [`Transport`]: each
//! request has a fresh request id and is answered by the reply carrying the same id; a
//! caller waits for each answer, or sends a [`Batch`] and waits once for all of them
//! (xenstore answers a connection's requests in order). Watch events that arrive meanwhile are queued and handed to the callbacks registered
//! with [`Xenbus::watch`] (routed by token) when the domain calls [`Xenbus::dispatch`], never
//! from inside another request. Transactions: [`Xenbus::transaction`] runs a closure and
//! commits, retrying the whole closure when the commit (or anything in it) fails with
//! `EAGAIN`, as Xen's clients do.
//!
//! What the server sends is checked like any other input: a reply must echo the request's id,
//! type (or be `XS_ERROR` with a known error name) and transaction id; payloads are at most
//! `PAYLOAD_MAX`; lists must be NUL-terminated. A reply that breaks these rules is `EIO`,
//! and a broken stream (bad header, ring fault) makes every later call fail with `EIO`.
//!
//! [`ring`] is the ring page itself; [`RingTransport`] puts it together with a [`Signal`]
//! (the event channel on bare metal, anything in tests).

pub mod ring;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::xenstore::{self, MessageDecoder, MsgType, PAYLOAD_MAX};

pub use ring::{ClientRing, RingFault, RingPage};

/// A domain's own connection to xenstore: the ring page the hypervisor maps at
/// `XENSTORE_RING_VA` and the port in its start info (bare metal).
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub type DomainBus = Xenbus<RingTransport<shared_abi::ring::SharedRingMem, EvtchnSignal>>;

/// Connect to xenstore over this domain's own ring (`None` without a xenstore port or if the
/// ring page is not usable).
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub fn connect_own_store(si: &shared_abi::start_info::StartInfo) -> Option<DomainBus> {
    if si.xenstore_evtchn == 0 {
        return None;
    }
    // SAFETY: the hypervisor maps this domain's xenstore ring page RW at XENSTORE_RING_VA for
    // its whole life; it is touched only through SharedRingMem.
    let ring = unsafe { crate::gnttab::ring_mem(shared_abi::start_info::XENSTORE_RING_VA) }.ok()?;
    let ring = ClientRing::new(ring).ok()?;
    Some(Xenbus::new(RingTransport::new(
        ring,
        EvtchnSignal::new(si.xenstore_evtchn),
    )))
}

/// A byte pipe to the xenstore server.
pub trait Transport {
    /// Send some of `data`; how many bytes were taken (0: no room yet).
    fn write(&mut self, data: &[u8]) -> Result<usize, XenError>;
    /// Receive what has arrived into `buf`; how many bytes (0: nothing yet).
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, XenError>;
    /// Wait until the server may have made progress (after a `write`/`read` that moved
    /// nothing).
    fn wait(&mut self) -> Result<(), XenError>;
}

/// How the domain and the server tell each other the ring moved: an event channel.
pub trait Signal {
    /// Tell the server.
    fn notify(&mut self) -> Result<(), XenError>;
    /// Block until the server told us.
    fn wait(&mut self) -> Result<(), XenError>;
}

/// Counters of ring traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// `write` calls that moved bytes into the request ring.
    pub writes: u64,
    /// `read` calls that took bytes from the response ring.
    pub reads: u64,
    /// Bytes sent and received.
    pub bytes_out: u64,
    pub bytes_in: u64,
}

/// A [`ClientRing`] and its [`Signal`]: notify after every move, wait when stuck.
pub struct RingTransport<P, S> {
    ring: ClientRing<P>,
    signal: S,
    stats: RingStats,
}

impl<P: RingPage, S: Signal> RingTransport<P, S> {
    pub fn new(ring: ClientRing<P>, signal: S) -> Self {
        RingTransport {
            ring,
            signal,
            stats: RingStats::default(),
        }
    }

    pub fn ring(&mut self) -> &mut ClientRing<P> {
        &mut self.ring
    }

    pub fn signal(&mut self) -> &mut S {
        &mut self.signal
    }

    pub fn stats(&self) -> RingStats {
        self.stats
    }
}

fn ring_err(_: RingFault) -> XenError {
    XenError::EIO
}

impl<P: RingPage, S: Signal> Transport for RingTransport<P, S> {
    fn write(&mut self, data: &[u8]) -> Result<usize, XenError> {
        let n = self.ring.write(data).map_err(ring_err)?;
        if n > 0 {
            self.stats.writes += 1;
            self.stats.bytes_out += n as u64;
            self.signal.notify()?;
        }
        Ok(n)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, XenError> {
        let n = self.ring.read(buf).map_err(ring_err)?;
        if n > 0 {
            self.stats.reads += 1;
            self.stats.bytes_in += n as u64;
            // The server may be waiting for room to write more.
            self.signal.notify()?;
        }
        Ok(n)
    }

    fn wait(&mut self) -> Result<(), XenError> {
        self.signal.wait()
    }
}

/// The event channel to the xenstore domain (bare metal).
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub struct EvtchnSignal {
    port: shared_abi::event_channel::EvtchnPort,
    waiter: crate::event::Waiter,
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
impl EvtchnSignal {
    /// Signal and wait on `port` (bound to the xenstore domain).
    pub fn new(port: shared_abi::event_channel::EvtchnPort) -> Self {
        EvtchnSignal {
            port,
            waiter: crate::event::Waiter::new(),
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
impl Signal for EvtchnSignal {
    fn notify(&mut self) -> Result<(), XenError> {
        crate::evtchn::send(self.port)
    }

    fn wait(&mut self) -> Result<(), XenError> {
        self.waiter.wait(self.port)
    }
}

/// A transaction handle (`Tx::NONE`: outside any transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tx(pub u32);

impl Tx {
    pub const NONE: Tx = Tx(0);
}

/// Requests to send together with [`Xenbus::send_batch`] (writes that need no answer but
/// "OK", such as a toolstack's plan of directories, permissions and nodes).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    requests: Vec<(MsgType, Vec<u8>)>,
}

impl Batch {
    /// MKDIR `path`.
    pub fn mkdir(&mut self, path: &str) {
        self.requests.push((MsgType::Mkdir, z(path)));
    }

    /// SET_PERMS on `path` (as [`Xenbus::set_perms`]).
    pub fn set_perms(&mut self, path: &str, perms: &[&str]) {
        self.requests
            .push((MsgType::SetPerms, perms_payload(path, perms)));
    }

    /// WRITE `value` at `path`.
    pub fn write(&mut self, path: &str, value: &[u8]) {
        self.requests
            .push((MsgType::Write, write_payload(path, value)));
    }

    /// Requests queued.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

/// A registered watch, to pass back to [`Xenbus::unwatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchHandle {
    path: String,
    token: String,
}

impl WatchHandle {
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Called with the event path (relative if the watch was).
pub type WatchFn = Box<dyn FnMut(&str)>;

/// Default number of attempts of [`Xenbus::transaction`].
pub const TRANSACTION_TRIES: u32 = 16;

/// The xenstore client. See the module doc.
pub struct Xenbus<T> {
    t: T,
    next_id: u32,
    dec: MessageDecoder,
    /// Whole messages received and not yet looked at.
    inbox: VecDeque<xenstore::Message>,
    events: VecDeque<(String, String)>,
    watches: BTreeMap<String, WatchFn>,
    next_token: u64,
    broken: bool,
    /// Watch events dropped because their payload was malformed.
    bad_events: u64,
}

fn z(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// WRITE's payload: the path, NUL, the value (not terminated).
fn write_payload(path: &str, value: &[u8]) -> Vec<u8> {
    let mut p = z(path);
    p.extend_from_slice(value);
    p
}

/// SET_PERMS's payload: the path and each permission, NUL-terminated.
fn perms_payload(path: &str, perms: &[&str]) -> Vec<u8> {
    let mut p = z(path);
    for s in perms {
        p.extend(z(s));
    }
    p
}

/// Split a NUL-terminated list of UTF-8 strings (empty payload: empty list).
fn split_list(p: &[u8]) -> Result<Vec<String>, XenError> {
    if p.is_empty() {
        return Ok(Vec::new());
    }
    let body = p.strip_suffix(&[0]).ok_or(XenError::EIO)?;
    body.split(|&b| b == 0)
        .map(|s| {
            core::str::from_utf8(s)
                .map(String::from)
                .map_err(|_| XenError::EIO)
        })
        .collect()
}

/// A single NUL-terminated string.
fn one_string(p: &[u8]) -> Result<String, XenError> {
    let body = p.strip_suffix(&[0]).ok_or(XenError::EIO)?;
    if body.contains(&0) {
        return Err(XenError::EIO);
    }
    core::str::from_utf8(body)
        .map(String::from)
        .map_err(|_| XenError::EIO)
}

impl<T: Transport> Xenbus<T> {
    pub fn new(t: T) -> Self {
        Xenbus {
            t,
            next_id: 1,
            dec: MessageDecoder::new(),
            inbox: VecDeque::new(),
            events: VecDeque::new(),
            watches: BTreeMap::new(),
            next_token: 1,
            broken: false,
            bad_events: 0,
        }
    }

    pub fn transport(&mut self) -> &mut T {
        &mut self.t
    }

    /// Watch events dropped as malformed so far.
    pub fn bad_events(&self) -> u64 {
        self.bad_events
    }

    fn broken(&mut self) -> XenError {
        self.broken = true;
        XenError::EIO
    }

    /// Send one request and wait for its reply: the payload, or the server's error.
    pub fn request(&mut self, ty: MsgType, tx: Tx, payload: &[u8]) -> Result<Vec<u8>, XenError> {
        let mut answers = self.pipeline(tx, &[(ty, payload)])?;
        answers.pop().unwrap_or(Err(XenError::EIO))
    }

    /// Send every request of `batch` in transaction `tx` without waiting for each answer,
    /// then wait for all of them (one round trip instead of one per request: xenstore
    /// answers a connection's requests in order). The first error the server answered, if
    /// any; every request was answered either way, so the stream stays usable.
    pub fn send_batch(&mut self, tx: Tx, batch: &Batch) -> Result<(), XenError> {
        let requests: Vec<(MsgType, &[u8])> = batch
            .requests
            .iter()
            .map(|(ty, p)| (*ty, p.as_slice()))
            .collect();
        for answer in self.pipeline(tx, &requests)? {
            answer?;
        }
        Ok(())
    }

    /// Send `requests` (as the ring has room, reading answers meanwhile so a server whose
    /// response ring is full, or that holds back until replies are read, keeps going) and
    /// collect their answers in order: the payload or the server's error for each. The outer
    /// error is a broken stream or a request too large to send (nothing sent then).
    fn pipeline(
        &mut self,
        tx: Tx,
        requests: &[(MsgType, &[u8])],
    ) -> Result<Vec<Result<Vec<u8>, XenError>>, XenError> {
        if self.broken {
            return Err(XenError::EIO);
        }
        if requests.iter().any(|(_, p)| p.len() > PAYLOAD_MAX) {
            return Err(XenError::E2BIG);
        }
        let mut bytes = Vec::new();
        let mut expected = VecDeque::with_capacity(requests.len());
        for (ty, payload) in requests {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            bytes.extend(xenstore::encode(ty.as_u32(), id, tx.0, payload)?);
            expected.push_back((id, *ty));
        }
        let mut answers = Vec::with_capacity(requests.len());
        let mut sent = 0;
        loop {
            let mut moved = false;
            while sent < bytes.len() {
                let n = self.t.write(&bytes[sent..]).map_err(|_| self.broken())?;
                if n == 0 {
                    break;
                }
                sent += n;
                moved = true;
            }
            moved |= self.pump()?;
            while let Some(m) = self.inbox.pop_front() {
                if m.header.msg_type == MsgType::WatchEvent.as_u32() {
                    self.queue_event(&m.payload);
                    continue;
                }
                let Some((id, ty)) = expected.pop_front() else {
                    // An answer to nothing we asked: the stream cannot be trusted.
                    return Err(self.broken());
                };
                if m.header.req_id != id || m.header.tx_id != tx.0 {
                    return Err(self.broken());
                }
                if m.header.msg_type == MsgType::Error.as_u32() {
                    answers.push(Err(
                        xenstore::parse_error_payload(&m.payload).unwrap_or(XenError::EIO)
                    ));
                } else if m.header.msg_type != ty.as_u32() {
                    return Err(self.broken());
                } else {
                    answers.push(Ok(m.payload));
                }
            }
            if expected.is_empty() {
                return Ok(answers);
            }
            if !moved {
                self.t.wait().map_err(|_| self.broken())?;
            }
        }
    }

    /// Take whatever bytes have arrived into the decoder; whether any did.
    fn pump(&mut self) -> Result<bool, XenError> {
        let mut buf = [0u8; 1024];
        let n = self.t.read(&mut buf).map_err(|_| self.broken())?;
        if n == 0 {
            return Ok(false);
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let (used, got) = self.dec.push(rest);
            rest = &rest[used..];
            match got {
                Err(_) => return Err(self.broken()),
                Ok(Some(m)) => self.inbox.push_back(m),
                Ok(None) if used == 0 => break,
                Ok(None) => {}
            }
        }
        Ok(true)
    }

    fn queue_event(&mut self, p: &[u8]) {
        match split_list(p) {
            Ok(v) if v.len() == 2 => {
                let mut it = v.into_iter();
                if let (Some(path), Some(token)) = (it.next(), it.next()) {
                    self.events.push_back((path, token));
                }
            }
            _ => self.bad_events += 1,
        }
    }

    /// Take events that have arrived, without waiting; how many are queued now.
    pub fn poll(&mut self) -> Result<usize, XenError> {
        while self.pump()? {}
        while let Some(m) = self.inbox.pop_front() {
            if m.header.msg_type == MsgType::WatchEvent.as_u32() {
                self.queue_event(&m.payload);
            } else {
                // A reply nobody asked for.
                return Err(self.broken());
            }
        }
        Ok(self.events.len())
    }

    /// Block until at least one watch event is queued.
    pub fn wait_event(&mut self) -> Result<(), XenError> {
        while self.poll()? == 0 {
            self.t.wait().map_err(|_| self.broken())?;
        }
        Ok(())
    }

    /// Run the callbacks of queued events (events for unknown tokens, e.g. just after an
    /// unwatch, are dropped as Xen allows); how many callbacks ran.
    pub fn dispatch(&mut self) -> usize {
        let mut ran = 0;
        while let Some((path, token)) = self.events.pop_front() {
            if let Some(cb) = self.watches.get_mut(&token) {
                cb(&path);
                ran += 1;
            }
        }
        ran
    }

    /// READ: the value (raw bytes).
    pub fn read(&mut self, tx: Tx, path: &str) -> Result<Vec<u8>, XenError> {
        self.request(MsgType::Read, tx, &z(path))
    }

    /// READ as UTF-8 (`EINVAL` if the value is not).
    pub fn read_string(&mut self, tx: Tx, path: &str) -> Result<String, XenError> {
        String::from_utf8(self.read(tx, path)?).map_err(|_| XenError::EINVAL)
    }

    /// WRITE `value` (creating missing parents).
    pub fn write(&mut self, tx: Tx, path: &str, value: &[u8]) -> Result<(), XenError> {
        self.request(MsgType::Write, tx, &write_payload(path, value))
            .map(drop)
    }

    /// MKDIR (no error if it exists).
    pub fn mkdir(&mut self, tx: Tx, path: &str) -> Result<(), XenError> {
        self.request(MsgType::Mkdir, tx, &z(path)).map(drop)
    }

    /// RM, recursive (no error if absent but the parent exists).
    pub fn rm(&mut self, tx: Tx, path: &str) -> Result<(), XenError> {
        self.request(MsgType::Rm, tx, &z(path)).map(drop)
    }

    /// DIRECTORY: the children's names.
    pub fn directory(&mut self, tx: Tx, path: &str) -> Result<Vec<String>, XenError> {
        split_list(&self.request(MsgType::Directory, tx, &z(path))?)
    }

    /// A backend's devices: every `<base>/<frontend-id>/<devid>` directory the toolstack
    /// wrote under its backend directory `base` (`/local/domain/<me>/backend/<type>`).
    /// Unreadable levels count as empty: the toolstack may be writing them.
    pub fn backend_devices(&mut self, base: &str) -> Vec<String> {
        let mut out = Vec::new();
        for fe in self.directory(Tx::NONE, base).unwrap_or_default() {
            let d = format!("{base}/{fe}");
            for dev in self.directory(Tx::NONE, &d).unwrap_or_default() {
                out.push(format!("{d}/{dev}"));
            }
        }
        out
    }

    /// For a backend device directory `dir`: the path of its frontend's `state` once that
    /// is readable (the frontend directory exists: the device can be probed), else `None`.
    pub fn frontend_state_path(&mut self, dir: &str) -> Option<String> {
        let fe = self
            .read_string(Tx::NONE, &format!("{dir}/frontend"))
            .ok()?;
        let state = format!("{fe}/state");
        self.read(Tx::NONE, &state).ok().map(|_| state)
    }

    /// GET_DOMAIN_PATH: `/local/domain/<domid>`.
    pub fn domain_path(&mut self, domid: DomId) -> Result<String, XenError> {
        one_string(&self.request(MsgType::GetDomainPath, Tx::NONE, &z(&format!("{domid}")))?)
    }

    /// IS_DOMAIN_INTRODUCED: whether the store serves `domid` yet.
    pub fn is_domain_introduced(&mut self, domid: DomId) -> Result<bool, XenError> {
        let r = self.request(
            MsgType::IsDomainIntroduced,
            Tx::NONE,
            &z(&format!("{domid}")),
        )?;
        Ok(one_string(&r)? == "T")
    }

    /// SET_PERMS: `perms` in Xen's string form (`n1`, `r2`, `w3`, `b4`; the first names
    /// the owner and the default).
    pub fn set_perms(&mut self, tx: Tx, path: &str, perms: &[&str]) -> Result<(), XenError> {
        self.request(MsgType::SetPerms, tx, &perms_payload(path, perms))
            .map(drop)
    }

    /// WATCH `path`; `cb` runs (from [`Xenbus::dispatch`]) for each event, starting with the
    /// one the server sends at registration.
    pub fn watch(
        &mut self,
        path: &str,
        cb: impl FnMut(&str) + 'static,
    ) -> Result<WatchHandle, XenError> {
        let token = format!("{:X}", self.next_token);
        self.next_token += 1;
        let mut p = z(path);
        p.extend(z(&token));
        self.request(MsgType::Watch, Tx::NONE, &p)?;
        self.watches.insert(token.clone(), Box::new(cb));
        Ok(WatchHandle {
            path: String::from(path),
            token,
        })
    }

    /// UNWATCH; queued events of this watch are dropped.
    pub fn unwatch(&mut self, w: WatchHandle) -> Result<(), XenError> {
        self.watches.remove(&w.token);
        self.events.retain(|(_, t)| *t != w.token);
        let mut p = z(&w.path);
        p.extend(z(&w.token));
        self.request(MsgType::Unwatch, Tx::NONE, &p).map(drop)
    }

    /// TRANSACTION_START.
    pub fn transaction_start(&mut self) -> Result<Tx, XenError> {
        let p = self.request(MsgType::TransactionStart, Tx::NONE, b"\0")?;
        let id: u32 = one_string(&p)?.parse().map_err(|_| self.broken())?;
        if id == 0 {
            return Err(self.broken());
        }
        Ok(Tx(id))
    }

    /// TRANSACTION_END: commit (`EAGAIN` if a node it used changed meanwhile) or abort.
    pub fn transaction_end(&mut self, tx: Tx, commit: bool) -> Result<(), XenError> {
        let arg: &[u8] = if commit { b"T\0" } else { b"F\0" };
        self.request(MsgType::TransactionEnd, tx, arg).map(drop)
    }

    /// Run `f` in a transaction and commit; on `EAGAIN` (from the commit or from `f`) start
    /// over, at most `tries` times in all. Any other error from `f` aborts the transaction.
    pub fn transaction<R>(
        &mut self,
        tries: u32,
        mut f: impl FnMut(&mut Self, Tx) -> Result<R, XenError>,
    ) -> Result<R, XenError> {
        let mut last = XenError::EAGAIN;
        for _ in 0..tries {
            let tx = self.transaction_start()?;
            match f(self, tx) {
                Ok(r) => match self.transaction_end(tx, true) {
                    Ok(()) => return Ok(r),
                    Err(XenError::EAGAIN) => last = XenError::EAGAIN,
                    Err(e) => return Err(e),
                },
                Err(e) => {
                    // The transaction may be gone already; its abort result adds nothing.
                    let _ = self.transaction_end(tx, false);
                    if e != XenError::EAGAIN {
                        return Err(e);
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests;
