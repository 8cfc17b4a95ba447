//! The ring transport against in-memory pages, each driven by a test client that plays the
//! domain's side of `xenstore_domain_interface` (sometimes a hostile one).
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;

use proptest::prelude::*;
use shared_abi::ring::SharedRingMem;
use shared_abi::xenstore::{
    self, CONNECTED, Header, Message, MessageDecoder, MsgType, PAYLOAD_MAX, RECONNECT, RING_SIZE,
    ring_error, ring_mask,
};
use xenstore_dom::engine::Config;
use xenstore_dom::ring::{
    AttachError, Fault, RingConfig, RingPage, RingServer, RingState, SERVER_FEATURES, Serviced,
    offsets,
};
use xenstore_dom::{ConnId, Engine};

/// The domain's side of a ring page, written the way a well-behaved client does, with
/// knobs for misbehaving.
struct Client {
    page: SharedRingMem,
    req_prod: u32,
    rsp_cons: u32,
    pending: VecDeque<u8>,
    dec: MessageDecoder,
    next_req: u32,
}

impl Client {
    fn new() -> Self {
        Self::at(0, 0)
    }

    /// A page whose indices start at `req` and `rsp` (a ring that was used before).
    fn at(req: u32, rsp: u32) -> Self {
        let page = SharedRingMem::new_owned(4096).unwrap();
        for (off, v) in [
            (offsets::REQ_CONS, req),
            (offsets::REQ_PROD, req),
            (offsets::RSP_CONS, rsp),
            (offsets::RSP_PROD, rsp),
        ] {
            page.store_u32(off, v);
        }
        Client {
            page,
            req_prod: req,
            rsp_cons: rsp,
            pending: VecDeque::new(),
            dec: MessageDecoder::new(),
            next_req: 1,
        }
    }

    /// Queue a request; returns its id.
    fn send(&mut self, ty: MsgType, tx: u32, payload: &[u8]) -> u32 {
        let id = self.next_req;
        self.next_req += 1;
        self.pending
            .extend(xenstore::encode(ty.as_u32(), id, tx, payload).unwrap());
        id
    }

    /// Move up to `max` queued bytes into the request ring (as many as fit).
    fn pump(&mut self, max: usize) -> usize {
        let cons = self.page.load_u32(offsets::REQ_CONS);
        let space = RING_SIZE - self.req_prod.wrapping_sub(cons) as usize;
        let n = space.min(max).min(self.pending.len());
        let bytes: Vec<u8> = self.pending.drain(..n).collect();
        let at = ring_mask(self.req_prod);
        let first = n.min(RING_SIZE - at);
        self.page.write_bytes(offsets::REQ + at, &bytes[..first]);
        self.page.write_bytes(offsets::REQ, &bytes[first..]);
        self.req_prod = self.req_prod.wrapping_add(n as u32);
        self.page.store_u32(offsets::REQ_PROD, self.req_prod);
        n
    }

    /// Take up to `max` bytes from the response ring; whole messages completed.
    fn drain(&mut self, max: usize) -> Vec<Message> {
        let prod = self.page.load_u32(offsets::RSP_PROD);
        let avail = prod.wrapping_sub(self.rsp_cons) as usize;
        assert!(avail <= RING_SIZE, "server published a bad rsp_prod");
        let n = avail.min(max);
        let mut buf = vec![0u8; n];
        let at = ring_mask(self.rsp_cons);
        let first = n.min(RING_SIZE - at);
        self.page.read_bytes(offsets::RSP + at, &mut buf[..first]);
        self.page.read_bytes(offsets::RSP, &mut buf[first..]);
        self.rsp_cons = self.rsp_cons.wrapping_add(n as u32);
        self.page.store_u32(offsets::RSP_CONS, self.rsp_cons);
        self.dec.feed(&buf).unwrap()
    }

    fn error(&self) -> u32 {
        self.page.load_u32(offsets::ERROR)
    }
}

fn z(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn wr(path: &str, val: &str) -> Vec<u8> {
    let mut p = z(path);
    p.extend_from_slice(val.as_bytes());
    p
}

fn server() -> RingServer<SharedRingMem> {
    RingServer::new(Engine::default(), RingConfig::default())
}

fn attach(s: &mut RingServer<SharedRingMem>, domid: u16, c: &Client) -> Serviced {
    s.attach(domid, c.page.clone()).unwrap().1
}

/// Run a request from a privileged local connection (the socket-free path) and route what
/// it produced.
fn local(s: &mut RingServer<SharedRingMem>, conn: ConnId, ty: MsgType, payload: &[u8]) -> Message {
    let msg = Message {
        header: Header {
            msg_type: ty.as_u32(),
            req_id: 99,
            tx_id: 0,
            len: payload.len() as u32,
        },
        payload: payload.to_vec(),
    };
    let mut out = s.engine_mut().handle(conn, &msg);
    let reply = out.sends.iter().position(|o| o.conn == conn).unwrap();
    let bytes = out.sends.remove(reply).bytes;
    let mut sv = Serviced::default();
    s.route(out, &mut sv);
    MessageDecoder::new().feed(&bytes).unwrap().pop().unwrap()
}

/// Give domain `d` its home directory (owned by it), as a toolstack would.
fn make_home(s: &mut RingServer<SharedRingMem>, d: u16) {
    let tools = s.engine_mut().connect_socket();
    let home = format!("/local/domain/{d}");
    local(s, tools, MsgType::Mkdir, &z(&home));
    let mut p = z(&home);
    p.extend(z(&format!("n{d}")));
    let r = local(s, tools, MsgType::SetPerms, &p);
    assert_eq!(r.payload, b"OK\0");
}

fn is_ok(m: &Message) -> bool {
    m.header.msg_type != MsgType::Error.as_u32()
}

#[test]
fn attach_advertises_features_and_serves_a_request() {
    let mut s = server();
    let mut c = Client::new();
    attach(&mut s, 0, &c);
    assert_eq!(c.page.load_u32(offsets::SERVER_FEATURES), SERVER_FEATURES);
    let id = c.send(MsgType::Write, 0, &wr("/a", "1"));
    c.pump(usize::MAX);
    let sv = s.service(0);
    assert!(sv.notify.contains(&0));
    let got = c.drain(usize::MAX);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header.req_id, id);
    assert_eq!(got[0].payload, b"OK\0");
    let id = c.send(MsgType::Read, 0, &z("/a"));
    c.pump(usize::MAX);
    s.service(0);
    let got = c.drain(usize::MAX);
    assert_eq!((got[0].header.req_id, &got[0].payload[..]), (id, &b"1"[..]));
}

#[test]
fn requests_waiting_before_attach_are_served_at_attach() {
    let mut s = server();
    let mut c = Client::new();
    c.send(MsgType::GetDomainPath, 0, &z("3"));
    c.pump(usize::MAX);
    let sv = attach(&mut s, 3, &c);
    assert!(sv.notify.contains(&3));
    assert_eq!(c.drain(usize::MAX)[0].payload, b"/local/domain/3\0");
}

#[test]
fn page_shorter_than_the_interface_is_refused() {
    let mut s = server();
    let small = SharedRingMem::new_owned(2048).unwrap();
    assert_eq!(
        s.attach(1, small).err(),
        Some(AttachError::PageTooSmall(2048))
    );
    assert_eq!(s.engine().connection_count(), 0);
}

#[test]
fn messages_wrapping_the_ring_and_the_u32_indices_are_reassembled() {
    let mut s = server();
    // Both streams start 7 bytes before the end of the ring array and of the u32 range.
    let start = u32::MAX - 6;
    let mut c = Client::at(start, start);
    attach(&mut s, 0, &c);
    let val = "x".repeat(300);
    for i in 0..12 {
        let id = c.send(MsgType::Write, 0, &wr(&format!("/w/{i}"), &val));
        c.pump(usize::MAX);
        s.service(0);
        let got = c.drain(usize::MAX);
        assert_eq!(got.len(), 1, "request {i}");
        assert_eq!(
            (got[0].header.req_id, &got[0].payload[..]),
            (id, &b"OK\0"[..])
        );
        let id = c.send(MsgType::Read, 0, &z(&format!("/w/{i}")));
        c.pump(usize::MAX);
        s.service(0);
        let got = c.drain(usize::MAX);
        assert_eq!(got[0].header.req_id, id);
        assert_eq!(got[0].payload, val.as_bytes());
    }
    assert!(c.req_prod < start, "the request index wrapped");
    assert!(c.rsp_cons < start, "the response index wrapped");
}

#[test]
fn a_request_arriving_one_byte_at_a_time_is_answered_once_whole() {
    let mut s = server();
    let mut c = Client::new();
    attach(&mut s, 0, &c);
    let id = c.send(MsgType::Write, 0, &wr("/slow", "value"));
    let total = c.pending.len();
    for i in 0..total {
        c.pump(1);
        s.service(0);
        let got = c.drain(usize::MAX);
        if i + 1 < total {
            assert!(got.is_empty(), "no reply before the last byte");
        } else {
            assert_eq!(got[0].header.req_id, id);
        }
    }
}

#[test]
fn replies_read_in_small_pieces_come_out_whole() {
    let mut s = server();
    let mut c = Client::new();
    attach(&mut s, 0, &c);
    c.send(MsgType::Write, 0, &wr("/v", &"y".repeat(3000)));
    let id = c.send(MsgType::Read, 0, &z("/v"));
    let mut got = Vec::new();
    while got.len() < 2 {
        c.pump(100);
        s.service(0);
        got.extend(c.drain(37));
    }
    assert_eq!(got[1].header.req_id, id);
    assert_eq!(got[1].payload.len(), 3000);
}

#[test]
fn many_requests_in_flight_are_answered_in_order() {
    let mut s = server();
    let mut c = Client::new();
    attach(&mut s, 0, &c);
    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(c.send(MsgType::Write, 0, &wr(&format!("/m/{i}"), &i.to_string())));
        ids.push(c.send(MsgType::Read, 0, &z(&format!("/m/{i}"))));
    }
    let mut got = Vec::new();
    for _ in 0..10_000 {
        c.pump(usize::MAX);
        s.service(0);
        got.extend(c.drain(usize::MAX));
        if got.len() == ids.len() {
            break;
        }
    }
    let rids: Vec<u32> = got.iter().map(|m| m.header.req_id).collect();
    assert_eq!(rids, ids);
    for (i, pair) in got.chunks(2).enumerate() {
        assert_eq!(pair[0].payload, b"OK\0");
        assert_eq!(pair[1].payload, i.to_string().as_bytes());
    }
}

#[test]
fn requests_beyond_the_outstanding_quota_wait_in_the_domain_ring() {
    let mut s = server();
    let outstanding = s.engine().config().quotas.outstanding as usize;
    let mut c = Client::new();
    attach(&mut s, 1, &c);
    // GET_DOMAIN_PATH "1": 18-byte requests, 32-byte replies.
    for _ in 0..56 {
        c.send(MsgType::GetDomainPath, 0, &z("1"));
    }
    c.pump(usize::MAX);
    for _ in 0..5 {
        s.service(1);
    }
    // 32 replies fill the response ring, `outstanding` more wait; the rest stay unread.
    let taken = c.page.load_u32(offsets::REQ_CONS) as usize / 18;
    assert_eq!(taken, RING_SIZE / 32 + outstanding);
    let mut got = Vec::new();
    for _ in 0..100 {
        got.extend(c.drain(usize::MAX));
        c.pump(usize::MAX);
        s.service(1);
    }
    assert_eq!(got.len(), 56);
    assert!(got.iter().all(|m| m.payload == b"/local/domain/1\0"));
}

#[test]
fn watch_events_while_the_response_ring_is_full_are_kept_in_order() {
    let mut s = server();
    let mut watcher = Client::new();
    attach(&mut s, 0, &watcher);
    watcher.send(MsgType::Watch, 0, &wr("/ev", "tok\0"));
    watcher.pump(usize::MAX);
    s.service(0);
    // OK, then the registration event.
    assert_eq!(watcher.drain(usize::MAX).len(), 2);
    let tools = s.engine_mut().connect_socket();
    // ~60-byte events: the 1024-byte ring fills after 17; the rest must wait, not vanish.
    let n = 200;
    for i in 0..n {
        local(
            &mut s,
            tools,
            MsgType::Write,
            &wr(&format!("/ev/{i:04}"), "v"),
        );
    }
    let mut paths = Vec::new();
    for _ in 0..1000 {
        for m in watcher.drain(usize::MAX) {
            assert_eq!(m.header.msg_type, MsgType::WatchEvent.as_u32());
            let p: Vec<&[u8]> = m.payload.split(|&b| b == 0).collect();
            assert_eq!(p[1], b"tok");
            paths.push(String::from_utf8(p[0].to_vec()).unwrap());
        }
        s.service(0);
        if paths.len() >= n {
            break;
        }
    }
    let want: Vec<String> = (0..n).map(|i| format!("/ev/{i:04}")).collect();
    assert_eq!(paths, want);
}

#[test]
fn events_and_replies_keep_the_engines_order_on_one_ring() {
    let mut s = server();
    let mut c = Client::new();
    attach(&mut s, 0, &c);
    c.send(MsgType::Watch, 0, &wr("/o", "t\0"));
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(c.send(MsgType::Write, 0, &wr(&format!("/o/{i}"), "v")));
    }
    c.pump(usize::MAX);
    let mut got = Vec::new();
    for _ in 0..200 {
        s.service(0);
        got.extend(c.drain(50));
        c.pump(usize::MAX);
    }
    // Watch reply, registration event, then per write: its event, then its reply (Xen).
    assert_eq!(got.len(), 2 + 2 * 40);
    for (i, pair) in got[2..].chunks(2).enumerate() {
        assert_eq!(pair[0].header.msg_type, MsgType::WatchEvent.as_u32());
        assert!(pair[0].payload.starts_with(format!("/o/{i}\0").as_bytes()));
        assert_eq!(pair[1].header.req_id, ids[i]);
    }
}

#[test]
fn bad_request_producer_faults_only_that_domain_and_drops_its_session() {
    let mut s = server();
    make_home(&mut s, 1);
    let mut bad = Client::new();
    let mut good = Client::new();
    attach(&mut s, 1, &bad);
    attach(&mut s, 2, &good);
    bad.send(MsgType::Watch, 0, &wr("/local/domain/1", "t\0"));
    bad.send(MsgType::TransactionStart, 0, b"\0");
    bad.pump(usize::MAX);
    s.service(1);
    assert_eq!(bad.drain(usize::MAX).len(), 3);
    let before = s.engine().connection_count();

    bad.page
        .store_u32(offsets::REQ_PROD, bad.req_prod.wrapping_add(1025));
    let sv = s.service(1);
    assert!(sv.notify.contains(&1));
    assert_eq!(bad.error(), ring_error::RINGIDX);
    assert_eq!(s.state(1), Some(RingState::Faulted(Fault::RingIndex)));
    assert_eq!(
        s.engine().connection_count(),
        before - 1,
        "the connection, its watch and transaction went"
    );
    // A faulted ring stays quiet whatever the domain does next.
    bad.page.store_u32(offsets::REQ_PROD, bad.req_prod);
    bad.send(MsgType::Read, 0, &z("/local/domain/1"));
    bad.pump(usize::MAX);
    s.service(1);
    assert!(bad.drain(usize::MAX).is_empty());

    good.send(MsgType::GetDomainPath, 0, &z("2"));
    good.pump(usize::MAX);
    s.service(2);
    assert_eq!(good.drain(usize::MAX)[0].payload, b"/local/domain/2\0");
}

#[test]
fn response_consumer_ahead_of_the_producer_is_a_ring_index_fault() {
    let mut s = server();
    let mut c = Client::new();
    attach(&mut s, 1, &c);
    c.send(MsgType::GetDomainPath, 0, &z("1"));
    c.pump(usize::MAX);
    c.page.store_u32(offsets::RSP_CONS, 5);
    s.service(1);
    assert_eq!(c.error(), ring_error::RINGIDX);
    assert_eq!(s.engine().connection_count(), 0);
}

#[test]
fn oversized_payload_length_is_a_protocol_fault() {
    let mut s = server();
    let mut c = Client::new();
    attach(&mut s, 4, &c);
    let hdr = Header {
        msg_type: MsgType::Read.as_u32(),
        req_id: 1,
        tx_id: 0,
        len: PAYLOAD_MAX as u32 + 1,
    };
    c.pending.extend(hdr.to_bytes());
    c.pump(usize::MAX);
    s.service(4);
    assert_eq!(c.error(), ring_error::PROTO);
    assert_eq!(s.state(4), Some(RingState::Faulted(Fault::Protocol)));
}

#[test]
fn impossible_indices_at_attach_fault_at_once() {
    let mut s = server();
    let c = Client::new();
    c.page.store_u32(offsets::REQ_PROD, 5000);
    let sv = attach(&mut s, 1, &c);
    assert!(sv.notify.contains(&1));
    assert_eq!(c.error(), ring_error::RINGIDX);
    assert_eq!(s.engine().connection_count(), 0);
}

#[test]
fn reconnect_clears_the_fault_and_starts_a_fresh_session() {
    let mut s = server();
    let mut c = Client::at(500, 700);
    attach(&mut s, 0, &c);
    c.send(MsgType::Watch, 0, &wr("/r", "t\0"));
    c.pump(usize::MAX);
    s.service(0);
    c.drain(usize::MAX);
    c.page
        .store_u32(offsets::REQ_PROD, c.req_prod.wrapping_add(4000));
    s.service(0);
    assert_eq!(c.error(), ring_error::RINGIDX);

    c.page.store_u32(offsets::CONNECTION, RECONNECT);
    let sv = s.service(0);
    assert!(sv.notify.contains(&0));
    assert_eq!(c.page.load_u32(offsets::CONNECTION), CONNECTED);
    assert_eq!(c.error(), ring_error::NONE);
    for off in [
        offsets::REQ_CONS,
        offsets::REQ_PROD,
        offsets::RSP_CONS,
        offsets::RSP_PROD,
    ] {
        assert_eq!(c.page.load_u32(off), 0);
    }
    c.req_prod = 0;
    c.rsp_cons = 0;
    c.dec = MessageDecoder::new();
    // The old watch is gone: a write under /r produces only the reply.
    c.send(MsgType::Write, 0, &wr("/r/x", "1"));
    c.pump(usize::MAX);
    s.service(0);
    let got = c.drain(usize::MAX);
    assert_eq!(got.len(), 1);
    assert!(is_ok(&got[0]));
}

#[test]
fn reconnect_of_a_healthy_ring_discards_half_messages_and_queued_replies() {
    let mut s = server();
    let mut c = Client::new();
    attach(&mut s, 0, &c);
    c.send(MsgType::Write, 0, &wr("/h", &"z".repeat(2000)));
    c.send(MsgType::Read, 0, &z("/h"));
    c.pump(usize::MAX);
    s.service(0);
    c.pump(usize::MAX);
    s.service(0);
    c.pending.extend(&[1, 2, 3]); // half a header
    c.pump(usize::MAX);
    s.service(0);
    c.page.store_u32(offsets::CONNECTION, RECONNECT);
    s.service(0);
    let mut fresh = Client::new();
    fresh.page = c.page.clone();
    let id = fresh.send(MsgType::GetDomainPath, 0, &z("0"));
    fresh.pump(usize::MAX);
    s.service(0);
    let got = fresh.drain(usize::MAX);
    assert_eq!(got.len(), 1, "nothing left over from the old session");
    assert_eq!(got[0].header.req_id, id);
}

#[test]
fn a_watcher_that_never_reads_is_dropped_past_the_event_cap_alone() {
    let cfg = RingConfig {
        max_event_bytes: 4096,
        ..RingConfig::default()
    };
    let mut s = RingServer::new(Engine::new(Config::default()), cfg);
    let mut lazy = Client::new();
    let mut busy = Client::new();
    attach(&mut s, 0, &lazy);
    attach(&mut s, 7, &busy);
    lazy.send(MsgType::Watch, 0, &wr("/s", "t\0"));
    lazy.pump(usize::MAX);
    s.service(0);
    let tools = s.engine_mut().connect_socket();
    for i in 0..400 {
        local(&mut s, tools, MsgType::Write, &wr(&format!("/s/{i}"), "v"));
    }
    assert_eq!(lazy.error(), ring_error::COMM);
    assert_eq!(s.state(0), Some(RingState::Faulted(Fault::Stalled)));
    busy.send(MsgType::GetDomainPath, 0, &z("7"));
    busy.pump(usize::MAX);
    s.service(7);
    assert_eq!(busy.drain(usize::MAX).len(), 1);
}

#[test]
fn release_closes_the_ring_and_detach_returns_the_page() {
    let mut s = server();
    let mut tools = Client::new();
    let guest = Client::new();
    attach(&mut s, 0, &tools);
    attach(&mut s, 5, &guest);
    tools.send(MsgType::Release, 0, &z("5"));
    tools.pump(usize::MAX);
    let sv = s.service(0);
    assert!(
        sv.effects
            .iter()
            .any(|e| matches!(e, xenstore_dom::Effect::Release { domid: 5 }))
    );
    assert_eq!(s.state(5), Some(RingState::Closed));
    assert!(s.detach(5).is_some());
    assert_eq!(s.state(5), None);
    assert_eq!(s.engine().connection_count(), 1);
}

#[test]
fn budget_limits_requests_per_call_and_asks_to_be_called_again() {
    let cfg = RingConfig {
        budget: 4,
        ..RingConfig::default()
    };
    let mut s = RingServer::new(Engine::default(), cfg);
    let mut c = Client::new();
    attach(&mut s, 0, &c);
    for _ in 0..10 {
        c.send(MsgType::GetDomainPath, 0, &z("0"));
    }
    c.pump(usize::MAX);
    assert!(s.service(0).again);
    assert_eq!(c.drain(usize::MAX).len(), 4);
    assert!(s.service(0).again);
    assert!(!s.service(0).again);
    assert_eq!(c.drain(usize::MAX).len(), 6);
}

/// One step of a client: a request, or moving bytes.
#[derive(Clone, Debug)]
enum Step {
    Req(u8, u8, u8),
    Pump(usize),
    Service,
    Drain(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..9, 0u8..6, 0u8..4).prop_map(|(k, p, v)| Step::Req(k, p, v)),
        3 => (1usize..1500).prop_map(Step::Pump),
        3 => Just(Step::Service),
        3 => (1usize..1500).prop_map(Step::Drain),
    ]
}

/// A request built from small numbers so operations collide on the same few nodes.
fn request(k: u8, p: u8, v: u8, txs: &[u32]) -> (MsgType, u32, Vec<u8>) {
    let path = format!("/local/domain/1/n{}", p % 3) + if p >= 3 { "/c" } else { "" };
    let tx = txs.last().copied().unwrap_or(0);
    match k {
        0 => (MsgType::Write, tx, wr(&path, &"v".repeat(v as usize * 300))),
        1 => (MsgType::Read, tx, z(&path)),
        2 => (MsgType::Mkdir, tx, z(&path)),
        3 => (MsgType::Rm, tx, z(&path)),
        4 => (MsgType::Directory, tx, z("/local/domain/1")),
        5 => (MsgType::Watch, 0, wr(&path, &format!("t{v}\0"))),
        6 => (MsgType::Unwatch, 0, wr(&path, &format!("t{v}\0"))),
        7 => (MsgType::TransactionStart, 0, b"\0".to_vec()),
        _ => (
            MsgType::TransactionEnd,
            tx,
            if v.is_multiple_of(2) { b"T\0" } else { b"F\0" }.to_vec(),
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever pieces the client writes and reads in, the bytes it receives are exactly
    /// what the engine says to that connection when fed the same requests directly.
    #[test]
    fn ring_delivers_exactly_the_engines_output(steps in proptest::collection::vec(step(), 1..120)) {
        let mut s = server();
        make_home(&mut s, 1);
        let mut reference = Engine::default();
        let tools = reference.connect_socket();
        for m in [
            Message { header: Header { msg_type: MsgType::Mkdir.as_u32(), req_id: 0, tx_id: 0, len: 16 }, payload: z("/local/domain/1") },
            Message { header: Header { msg_type: MsgType::SetPerms.as_u32(), req_id: 0, tx_id: 0, len: 19 }, payload: [z("/local/domain/1"), z("n1")].concat() },
        ] {
            reference.handle(tools, &m);
        }
        let (rconn, _) = reference.connect_domain(1);
        let mut c = Client::new();
        attach(&mut s, 1, &c);
        let mut expected: Vec<u8> = Vec::new();
        let mut txs: Vec<u32> = Vec::new();
        let mut received: Vec<Message> = Vec::new();
        // Requests are handed to the reference as the client queues them; the ring must give
        // the same answers in the same order, however it is pumped.
        for st in steps {
            match st {
                Step::Req(k, p, v) => {
                    let (ty, tx, payload) = request(k, p, v, &txs);
                    let id = c.send(ty, tx, &payload);
                    let msg = Message {
                        header: Header { msg_type: ty.as_u32(), req_id: id, tx_id: tx, len: payload.len() as u32 },
                        payload,
                    };
                    for o in reference.handle(rconn, &msg).sends {
                        prop_assert_eq!(o.conn, rconn);
                        let m = MessageDecoder::new().feed(&o.bytes).unwrap().pop().unwrap();
                        if m.header.req_id == id && ty == MsgType::TransactionStart && is_ok(&m) {
                            let n = std::str::from_utf8(&m.payload[..m.payload.len() - 1]).unwrap();
                            txs.push(n.parse().unwrap());
                        }
                        if m.header.req_id == id && ty == MsgType::TransactionEnd {
                            txs.pop();
                        }
                        expected.extend(o.bytes);
                    }
                }
                Step::Pump(n) => { c.pump(n); }
                Step::Service => { s.service(1); }
                Step::Drain(n) => received.extend(c.drain(n)),
            }
        }
        for _ in 0..10_000 {
            c.pump(usize::MAX);
            s.service(1);
            received.extend(c.drain(usize::MAX));
            if c.pending.is_empty() && s.service(1) == Serviced::default() {
                received.extend(c.drain(usize::MAX));
                break;
            }
        }
        let got: Vec<u8> = received
            .iter()
            .flat_map(|m| xenstore::encode(m.header.msg_type, m.header.req_id, m.header.tx_id, &m.payload).unwrap())
            .collect();
        prop_assert_eq!(got, expected);
        prop_assert_eq!(c.error(), ring_error::NONE);
        prop_assert!(s.engine().check().is_ok());
    }

    /// A domain writing arbitrary bytes and indices never panics the server and never
    /// disturbs another domain's session.
    #[test]
    fn hostile_ring_never_disturbs_a_neighbour(
        writes in proptest::collection::vec((0usize..2080, any::<u32>()), 0..40),
        garbage in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut s = server();
        let mut good = Client::new();
        let evil = Client::new();
        attach(&mut s, 2, &good);
        attach(&mut s, 3, &evil);
        evil.page.write_bytes(offsets::REQ, &garbage);
        evil.page.store_u32(offsets::REQ_PROD, garbage.len() as u32);
        s.service(3);
        for (off, v) in writes {
            evil.page.store_u32(off & !3, v);
            s.service(3);
            good.send(MsgType::Write, 0, &wr("/local/domain/2/k", "v"));
            let id = good.send(MsgType::GetDomainPath, 0, &z("2"));
            good.pump(usize::MAX);
            s.service(2);
            let got = good.drain(usize::MAX);
            prop_assert_eq!(got.len(), 2);
            prop_assert_eq!(got[1].header.req_id, id);
        }
        prop_assert_eq!(good.error(), ring_error::NONE);
        prop_assert!(s.engine().check().is_ok());
    }
}
