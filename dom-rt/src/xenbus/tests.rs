//! Xenbus against a scripted server (what it accepts from the wire) and against the real
//! store engine behind the real ring transport (`xenstore-dom`), over shared pages.
#![allow(clippy::unwrap_used)]

use alloc::rc::Rc;
use alloc::string::ToString;
use core::cell::{Cell, RefCell};
use std::vec;

use shared_abi::ring::SharedRingMem;
use shared_abi::xenstore::{Header, Message, PAYLOAD_MAX};
use xenstore_dom::Engine;
use xenstore_dom::ring::{RingConfig, RingServer};

use super::*;

// ---------------------------------------------------------------- scripted server

type Responder = Box<dyn FnMut(&Message) -> Vec<u8>>;

/// A transport whose server is a closure from request to raw reply bytes.
struct Scripted {
    dec: MessageDecoder,
    inbound: VecDeque<u8>,
    respond: Responder,
    requests: Vec<Message>,
}

impl Scripted {
    fn new(respond: impl FnMut(&Message) -> Vec<u8> + 'static) -> Self {
        Scripted {
            dec: MessageDecoder::new(),
            inbound: VecDeque::new(),
            respond: Box::new(respond),
            requests: Vec::new(),
        }
    }
}

impl Transport for Scripted {
    fn write(&mut self, data: &[u8]) -> Result<usize, XenError> {
        for m in self.dec.feed(data).unwrap() {
            let out = (self.respond)(&m);
            self.inbound.extend(out);
            self.requests.push(m);
        }
        Ok(data.len())
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, XenError> {
        let n = buf.len().min(self.inbound.len());
        for (b, v) in buf.iter_mut().zip(self.inbound.drain(..n)) {
            *b = v;
        }
        Ok(n)
    }

    fn wait(&mut self) -> Result<(), XenError> {
        Err(XenError::ETIMEDOUT)
    }
}

fn reply(req: &Message, ty: MsgType, payload: &[u8]) -> Vec<u8> {
    xenstore::encode(ty.as_u32(), req.header.req_id, req.header.tx_id, payload).unwrap()
}

fn event(path: &str, token: &str) -> Vec<u8> {
    let mut p = z(path);
    p.extend(z(token));
    xenstore::encode(MsgType::WatchEvent.as_u32(), 0, 0, &p).unwrap()
}

#[test]
fn request_ids_increase_and_replies_return_payloads() {
    let mut xb = Xenbus::new(Scripted::new(|m| reply(m, MsgType::Read, b"v")));
    assert_eq!(xb.read(Tx::NONE, "/a").unwrap(), b"v");
    assert_eq!(xb.read(Tx(7), "/b").unwrap(), b"v");
    let ids: Vec<(u32, u32)> = xb
        .transport()
        .requests
        .iter()
        .map(|m| (m.header.req_id, m.header.tx_id))
        .collect();
    assert_eq!(ids, vec![(1, 0), (2, 7)]);
    assert_eq!(xb.transport().requests[0].payload, b"/a\0");
}

#[test]
fn error_replies_become_xen_errors_by_name() {
    let mut xb = Xenbus::new(Scripted::new(|m| reply(m, MsgType::Error, b"ENOENT\0")));
    assert_eq!(xb.read(Tx::NONE, "/x"), Err(XenError::ENOENT));
    let mut xb = Xenbus::new(Scripted::new(|m| reply(m, MsgType::Error, b"EAGAIN\0")));
    assert_eq!(xb.transaction_end(Tx(3), true), Err(XenError::EAGAIN));
    // Still usable after a server-reported error.
    assert_eq!(xb.transaction_end(Tx(3), true), Err(XenError::EAGAIN));
    let mut xb = Xenbus::new(Scripted::new(|m| reply(m, MsgType::Error, b"EWHATEVER\0")));
    assert_eq!(xb.read(Tx::NONE, "/x"), Err(XenError::EIO));
}

#[test]
fn reply_with_the_wrong_id_type_or_transaction_breaks_the_stream() {
    let mut xb = Xenbus::new(Scripted::new(|m| {
        let mut r = reply(m, MsgType::Read, b"v");
        r[4] ^= 1; // req_id
        r
    }));
    assert_eq!(xb.read(Tx::NONE, "/a"), Err(XenError::EIO));
    assert_eq!(xb.read(Tx::NONE, "/a"), Err(XenError::EIO), "stays broken");

    let mut xb = Xenbus::new(Scripted::new(|m| reply(m, MsgType::Write, b"OK\0")));
    assert_eq!(xb.read(Tx::NONE, "/a"), Err(XenError::EIO));

    let mut xb = Xenbus::new(Scripted::new(|m| {
        xenstore::encode(m.header.msg_type, m.header.req_id, 9, b"v").unwrap()
    }));
    assert_eq!(xb.read(Tx(1), "/a"), Err(XenError::EIO));
}

#[test]
fn a_batch_is_sent_whole_and_answers_its_first_error_in_sync() {
    // Writes answer OK, SET_PERMS is refused: the batch says so, every request was sent
    // and answered, and the next request gets its own answer.
    let mut xb = Xenbus::new(Scripted::new(|m| {
        if m.header.msg_type == MsgType::SetPerms.as_u32() {
            reply(m, MsgType::Error, b"EACCES\0")
        } else if m.header.msg_type == MsgType::Read.as_u32() {
            reply(m, MsgType::Read, b"v")
        } else {
            reply(m, MsgType::from_u32(m.header.msg_type).unwrap(), b"OK\0")
        }
    }));
    let mut b = Batch::default();
    b.mkdir("/d");
    b.set_perms("/d", &["n1", "r2"]);
    b.write("/d/k", b"value");
    assert_eq!(b.len(), 3);
    assert_eq!(xb.send_batch(Tx(5), &b), Err(XenError::EACCES));
    let sent: Vec<(u32, u32)> = xb
        .transport()
        .requests
        .iter()
        .map(|m| (m.header.msg_type, m.header.tx_id))
        .collect();
    assert_eq!(
        sent,
        vec![
            (MsgType::Mkdir.as_u32(), 5),
            (MsgType::SetPerms.as_u32(), 5),
            (MsgType::Write.as_u32(), 5)
        ]
    );
    assert_eq!(xb.transport().requests[1].payload, b"/d\0n1\0r2\0");
    assert_eq!(xb.transport().requests[2].payload, b"/d/k\0value");
    assert_eq!(xb.read(Tx::NONE, "/x").unwrap(), b"v");
    assert_eq!(xb.send_batch(Tx::NONE, &Batch::default()), Ok(()), "empty");
}

#[test]
fn a_batch_answered_out_of_order_breaks_the_stream() {
    let mut n = 0u32;
    let mut xb = Xenbus::new(Scripted::new(move |m| {
        n += 1;
        // The second answer claims to be the third's.
        let id = if n == 2 {
            m.header.req_id + 1
        } else {
            m.header.req_id
        };
        xenstore::encode(MsgType::Write.as_u32(), id, 0, b"OK\0").unwrap()
    }));
    let mut b = Batch::default();
    for k in ["/a", "/b", "/c"] {
        b.write(k, b"1");
    }
    assert_eq!(xb.send_batch(Tx::NONE, &b), Err(XenError::EIO));
    assert_eq!(
        xb.write(Tx::NONE, "/a", b"1"),
        Err(XenError::EIO),
        "stays broken"
    );
    let mut big = Batch::default();
    big.write("/a", &vec![0u8; PAYLOAD_MAX + 1]);
    let mut fresh = Xenbus::new(Scripted::new(|m| reply(m, MsgType::Write, b"OK\0")));
    assert_eq!(fresh.send_batch(Tx::NONE, &big), Err(XenError::E2BIG));
    assert!(fresh.transport().requests.is_empty(), "nothing sent");
}

#[test]
fn oversized_reply_header_breaks_the_stream() {
    let mut xb = Xenbus::new(Scripted::new(|m| {
        Header {
            msg_type: MsgType::Read.as_u32(),
            req_id: m.header.req_id,
            tx_id: 0,
            len: PAYLOAD_MAX as u32 + 1,
        }
        .to_bytes()
        .to_vec()
    }));
    assert_eq!(xb.read(Tx::NONE, "/a"), Err(XenError::EIO));
}

#[test]
fn silent_server_is_an_error_not_a_hang() {
    let mut xb = Xenbus::new(Scripted::new(|_| Vec::new()));
    assert_eq!(xb.read(Tx::NONE, "/a"), Err(XenError::EIO));
}

#[test]
fn malformed_lists_and_transaction_ids_are_refused() {
    let mut xb = Xenbus::new(Scripted::new(|m| reply(m, MsgType::Directory, b"a\0b")));
    assert_eq!(xb.directory(Tx::NONE, "/"), Err(XenError::EIO));
    let mut xb = Xenbus::new(Scripted::new(|m| reply(m, MsgType::Directory, b"")));
    assert_eq!(xb.directory(Tx::NONE, "/"), Ok(Vec::new()));
    for bad in [&b"0\0"[..], b"x\0", b"12", b"99999999999\0"] {
        let bad = bad.to_vec();
        let mut xb = Xenbus::new(Scripted::new(move |m| {
            reply(m, MsgType::TransactionStart, &bad)
        }));
        assert_eq!(xb.transaction_start(), Err(XenError::EIO));
    }
}

#[test]
fn oversized_request_is_refused_before_sending() {
    let mut xb = Xenbus::new(Scripted::new(|m| reply(m, MsgType::Write, b"OK\0")));
    assert_eq!(
        xb.write(Tx::NONE, "/a", &[0; PAYLOAD_MAX]),
        Err(XenError::E2BIG)
    );
    assert!(xb.transport().requests.is_empty());
}

#[test]
fn events_arriving_before_a_reply_are_routed_by_token_on_dispatch() {
    let mut xb = Xenbus::new(Scripted::new(|m| {
        if m.header.msg_type == MsgType::Watch.as_u32() {
            let p: Vec<&[u8]> = m.payload.split(|&b| b == 0).collect();
            let (path, tok) = (
                core::str::from_utf8(p[0]).unwrap(),
                core::str::from_utf8(p[1]).unwrap(),
            );
            let mut out = reply(m, MsgType::Watch, b"OK\0");
            out.extend(event(path, tok));
            return out;
        }
        // Events for both watches and a malformed one, then the reply.
        let mut out = event("/b/x", "2");
        out.extend(event("/a/y", "1"));
        out.extend(xenstore::encode(MsgType::WatchEvent.as_u32(), 0, 0, b"junk").unwrap());
        out.extend(event("/gone", "77"));
        out.extend(reply(m, MsgType::Read, b"v"));
        out
    }));
    let seen_a = Rc::new(RefCell::new(Vec::new()));
    let seen_b = Rc::new(RefCell::new(Vec::new()));
    let (a, b) = (seen_a.clone(), seen_b.clone());
    xb.watch("/a", move |p| a.borrow_mut().push(p.to_string()))
        .unwrap();
    xb.watch("/b", move |p| b.borrow_mut().push(p.to_string()))
        .unwrap();
    assert!(
        seen_a.borrow().is_empty(),
        "callbacks run only from dispatch"
    );
    xb.read(Tx::NONE, "/r").unwrap();
    assert_eq!(xb.dispatch(), 4);
    assert_eq!(*seen_a.borrow(), vec!["/a", "/a/y"]);
    assert_eq!(*seen_b.borrow(), vec!["/b", "/b/x"]);
    assert_eq!(xb.bad_events(), 1);
}

#[test]
fn transaction_gives_up_after_the_tries_and_aborts_on_other_errors() {
    let mut xb = Xenbus::new(Scripted::new(|m| {
        match MsgType::from_u32(m.header.msg_type) {
            Some(MsgType::TransactionStart) => reply(m, MsgType::TransactionStart, b"5\0"),
            Some(MsgType::TransactionEnd) if m.payload == b"T\0" => {
                reply(m, MsgType::Error, b"EAGAIN\0")
            }
            _ => reply(m, MsgType::from_u32(m.header.msg_type).unwrap(), b"OK\0"),
        }
    }));
    let mut runs = 0;
    let r = xb.transaction(3, |_, tx| {
        runs += 1;
        assert_eq!(tx, Tx(5));
        Ok(())
    });
    assert_eq!((r, runs), (Err(XenError::EAGAIN), 3));
    let r: Result<(), XenError> = xb.transaction(3, |_, _| Err(XenError::EACCES));
    assert_eq!(r, Err(XenError::EACCES));
    let last = xb.transport().requests.last().unwrap();
    assert_eq!(
        (last.header.msg_type, &last.payload[..]),
        (MsgType::TransactionEnd.as_u32(), &b"F\0"[..]),
        "aborted"
    );
}

// ---------------------------------------------------------------- the real server

type Server = Rc<RefCell<RingServer<SharedRingMem>>>;

/// The event channel between a domain and the ring server: notifying runs the server for
/// that domain, as the service domain does when its port fires.
struct EngineSignal {
    server: Server,
    domid: DomId,
    waits: u32,
}

impl Signal for EngineSignal {
    fn notify(&mut self) -> Result<(), XenError> {
        self.server.borrow_mut().service(self.domid);
        Ok(())
    }

    fn wait(&mut self) -> Result<(), XenError> {
        self.waits += 1;
        if self.waits > 10_000 {
            return Err(XenError::ETIMEDOUT);
        }
        self.server.borrow_mut().service_all();
        Ok(())
    }
}

type Client = Xenbus<RingTransport<SharedRingMem, EngineSignal>>;

fn server() -> Server {
    Rc::new(RefCell::new(RingServer::new(
        Engine::default(),
        RingConfig::default(),
    )))
}

fn connect(server: &Server, domid: DomId) -> Client {
    let page = SharedRingMem::new_owned(4096).unwrap();
    server.borrow_mut().attach(domid, page.clone()).unwrap();
    let ring = ClientRing::new(page).unwrap();
    let signal = EngineSignal {
        server: server.clone(),
        domid,
        waits: 0,
    };
    Xenbus::new(RingTransport::new(ring, signal))
}

/// Domains 1 and 2 with homes; 1's `shared` directory readable and writable by 2.
fn two_domains() -> (Server, Client, Client, Client) {
    let s = server();
    let mut tools = connect(&s, 0);
    for d in [1u16, 2] {
        let home = format!("/local/domain/{d}");
        tools.mkdir(Tx::NONE, &home).unwrap();
        tools
            .set_perms(Tx::NONE, &home, &[&format!("n{d}")])
            .unwrap();
    }
    tools.mkdir(Tx::NONE, "/local/domain/1/shared").unwrap();
    tools
        .set_perms(Tx::NONE, "/local/domain/1/shared", &["n1", "b2"])
        .unwrap();
    let d1 = connect(&s, 1);
    let d2 = connect(&s, 2);
    (s, tools, d1, d2)
}

#[test]
fn engine_write_read_mkdir_rm_directory() {
    let s = server();
    let mut xb = connect(&s, 0);
    xb.write(Tx::NONE, "/a/b", b"hello").unwrap();
    assert_eq!(xb.read(Tx::NONE, "/a/b").unwrap(), b"hello");
    assert_eq!(xb.read_string(Tx::NONE, "/a").unwrap(), "");
    xb.mkdir(Tx::NONE, "/a/c").unwrap();
    assert_eq!(xb.directory(Tx::NONE, "/a").unwrap(), vec!["b", "c"]);
    xb.rm(Tx::NONE, "/a/b").unwrap();
    assert_eq!(xb.read(Tx::NONE, "/a/b"), Err(XenError::ENOENT));
    assert_eq!(xb.domain_path(3).unwrap(), "/local/domain/3");
    let stats = xb.transport().stats();
    assert!(stats.writes >= 7 && stats.reads >= 7);
}

#[test]
fn engine_large_values_cross_the_ring_wrap_both_ways() {
    let s = server();
    let mut xb = connect(&s, 0);
    for i in 0..6u8 {
        let val = vec![b'a' + i; 3000];
        xb.write(Tx::NONE, "/big", &val).unwrap();
        assert_eq!(xb.read(Tx::NONE, "/big").unwrap(), val);
    }
}

#[test]
fn engine_relative_paths_and_permissions_between_domains() {
    let (_s, _tools, mut d1, mut d2) = two_domains();
    d1.write(Tx::NONE, "private", b"1").unwrap();
    d1.write(Tx::NONE, "shared/k", b"2").unwrap();
    assert_eq!(
        d2.read(Tx::NONE, "/local/domain/1/private"),
        Err(XenError::EACCES)
    );
    assert_eq!(d2.read(Tx::NONE, "/local/domain/1/shared/k").unwrap(), b"2");
}

#[test]
fn engine_watch_callback_sees_another_domains_writes() {
    let (_s, _tools, mut d1, mut d2) = two_domains();
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    let w = d2
        .watch("/local/domain/1/shared", move |p| {
            log.borrow_mut().push(p.to_string())
        })
        .unwrap();
    d1.write(Tx::NONE, "shared/x", b"1").unwrap();
    d1.write(Tx::NONE, "shared/y", b"2").unwrap();
    d2.poll().unwrap();
    assert_eq!(d2.dispatch(), 3);
    assert_eq!(
        *seen.borrow(),
        vec![
            "/local/domain/1/shared",
            "/local/domain/1/shared/x",
            "/local/domain/1/shared/y"
        ]
    );
    d2.unwatch(w).unwrap();
    d1.write(Tx::NONE, "shared/z", b"3").unwrap();
    d2.poll().unwrap();
    assert_eq!(d2.dispatch(), 0);
}

#[test]
fn engine_wait_event_blocks_until_an_event_arrives() {
    let (_s, _tools, mut d1, mut d2) = two_domains();
    let hits = Rc::new(Cell::new(0));
    let h = hits.clone();
    d2.watch("/local/domain/1/shared/flag", move |_| h.set(h.get() + 1))
        .unwrap();
    d2.wait_event().unwrap();
    d2.dispatch();
    d1.write(Tx::NONE, "shared/flag", b"1").unwrap();
    d2.wait_event().unwrap();
    d2.dispatch();
    assert_eq!(hits.get(), 2);
}

#[test]
fn engine_transaction_conflict_is_resolved_by_retry() {
    let (_s, _tools, mut d1, mut d2) = two_domains();
    d1.write(Tx::NONE, "shared/counter", b"0").unwrap();
    let mut attempts = 0;
    let v = d1
        .transaction(TRANSACTION_TRIES, |xb, tx| {
            attempts += 1;
            let n: u32 = xb
                .read_string(tx, "shared/counter")?
                .parse()
                .map_err(|_| XenError::EINVAL)?;
            if attempts == 1 {
                // Another domain bumps the counter between our read and our commit.
                d2.write(Tx::NONE, "/local/domain/1/shared/counter", b"10")
                    .unwrap();
            }
            xb.write(tx, "shared/counter", (n + 1).to_string().as_bytes())?;
            Ok(n + 1)
        })
        .unwrap();
    assert_eq!((attempts, v), (2, 11));
    assert_eq!(
        d2.read(Tx::NONE, "/local/domain/1/shared/counter").unwrap(),
        b"11"
    );
}

#[test]
fn engine_transaction_without_conflict_commits_once() {
    let (_s, _tools, mut d1, _d2) = two_domains();
    let mut attempts = 0;
    d1.transaction(TRANSACTION_TRIES, |xb, tx| {
        attempts += 1;
        xb.write(tx, "a", b"1")?;
        xb.write(tx, "b", b"2")
    })
    .unwrap();
    assert_eq!(attempts, 1);
    let mut names = d1.directory(Tx::NONE, "/local/domain/1").unwrap();
    names.sort();
    assert_eq!(names, vec!["a", "b", "shared"]);
}

#[test]
fn engine_takes_a_batch_larger_than_the_ring_and_the_reply_quota_in_one_transaction() {
    let (_s, mut tools, mut d1, _d2) = two_domains();
    // 300 writes of ~40 bytes: several times the 1 KiB request ring, and more answers than
    // a connection may have outstanding.
    let mut b = Batch::default();
    b.mkdir("/local/domain/1/plan");
    b.set_perms("/local/domain/1/plan", &["n1", "r2"]);
    for i in 0..300 {
        b.write(
            &format!("/local/domain/1/plan/key-{i:03}"),
            format!("{i}").as_bytes(),
        );
    }
    tools
        .transaction(TRANSACTION_TRIES, |xb, tx| xb.send_batch(tx, &b))
        .unwrap();
    let keys = d1.directory(Tx::NONE, "/local/domain/1/plan").unwrap();
    assert_eq!(keys.len(), 300);
    assert_eq!(
        d1.read(Tx::NONE, "/local/domain/1/plan/key-299").unwrap(),
        b"299"
    );
    // A batch the domain may not write fails as a whole inside its transaction.
    let mut denied = Batch::default();
    denied.write("/local/domain/1/mine", b"1");
    denied.write("/local/domain/2/not-mine", b"1");
    assert_eq!(
        d1.transaction(TRANSACTION_TRIES, |xb, tx| xb.send_batch(tx, &denied)),
        Err(XenError::EACCES)
    );
    assert_eq!(
        d1.read(Tx::NONE, "/local/domain/1/mine"),
        Err(XenError::ENOENT),
        "aborted with the rest"
    );
    // The connection still answers one request at a time afterwards.
    d1.write(Tx::NONE, "/local/domain/1/after", b"ok").unwrap();
}

#[test]
fn engine_quota_errors_reach_the_client_as_xen_errors() {
    let (_s, _tools, mut d1, _d2) = two_domains();
    let mut err = None;
    for i in 0..200 {
        if let Err(e) = d1.watch(&format!("w{i}"), |_| {}) {
            err = Some((i, e));
            break;
        }
    }
    assert_eq!(err, Some((128, XenError::E2BIG)));
}
