//! Test rig: drive an [`Engine`] with raw wire messages and decode what comes back.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, dead_code)]

use shared_abi::xenstore::{self, Header, Message, MsgType};
use xenstore_dom::{ConnId, Effect, Engine};

/// A reply: payload, or the error name.
pub type Reply = Result<Vec<u8>, String>;

pub struct Rig {
    pub e: Engine,
    next_req: u32,
}

/// One watch event: (receiving connection, path, token).
pub type Ev = (ConnId, String, String);

impl Rig {
    pub fn new() -> Self {
        Rig {
            e: Engine::default(),
            next_req: 1,
        }
    }

    pub fn with(e: Engine) -> Self {
        Rig { e, next_req: 1 }
    }

    pub fn sock(&mut self) -> ConnId {
        self.e.connect_socket()
    }

    pub fn dom(&mut self, d: u16) -> ConnId {
        self.e.connect_domain(d).0
    }

    /// Send a raw request; the reply to `c` and all watch events and effects.
    pub fn raw(
        &mut self,
        c: ConnId,
        ty: u32,
        tx: u32,
        payload: &[u8],
    ) -> (Reply, Vec<Ev>, Vec<Effect>) {
        let req_id = self.next_req;
        self.next_req += 1;
        let msg = Message {
            header: Header {
                msg_type: ty,
                req_id,
                tx_id: tx,
                len: payload.len() as u32,
            },
            payload: payload.to_vec(),
        };
        let out = self.e.handle(c, &msg);
        let mut reply = None;
        let mut evs = Vec::new();
        for s in out.sends {
            let mut d = xenstore::MessageDecoder::new();
            let m = d.feed(&s.bytes).unwrap().pop().unwrap();
            if m.header.msg_type == MsgType::WatchEvent.as_u32() {
                assert_eq!((m.header.req_id, m.header.tx_id), (0, 0));
                let parts: Vec<&[u8]> = m.payload.split(|&b| b == 0).collect();
                evs.push((
                    s.conn,
                    String::from_utf8(parts[0].to_vec()).unwrap(),
                    String::from_utf8(parts[1].to_vec()).unwrap(),
                ));
            } else {
                assert_eq!(s.conn, c, "only the requester gets a reply");
                assert_eq!(m.header.req_id, req_id);
                assert_eq!(m.header.tx_id, tx);
                assert!(reply.is_none(), "one reply per request");
                reply = Some(if m.header.msg_type == MsgType::Error.as_u32() {
                    Err(String::from_utf8(m.payload.strip_suffix(&[0]).unwrap().to_vec()).unwrap())
                } else {
                    assert_eq!(m.header.msg_type, ty);
                    Ok(m.payload)
                });
            }
        }
        (reply.expect("a reply"), evs, out.effects)
    }

    pub fn req(&mut self, c: ConnId, ty: MsgType, tx: u32, payload: &[u8]) -> (Reply, Vec<Ev>) {
        let (r, e, _) = self.raw(c, ty.as_u32(), tx, payload);
        (r, e)
    }

    pub fn read(&mut self, c: ConnId, tx: u32, path: &str) -> Reply {
        self.req(c, MsgType::Read, tx, &z(path)).0
    }

    pub fn write(&mut self, c: ConnId, tx: u32, path: &str, val: &str) -> (Reply, Vec<Ev>) {
        let mut p = z(path);
        p.extend_from_slice(val.as_bytes());
        self.req(c, MsgType::Write, tx, &p)
    }

    pub fn ok_write(&mut self, c: ConnId, path: &str, val: &str) {
        assert_eq!(self.write(c, 0, path, val).0, ok(), "write {path}");
    }

    pub fn mkdir(&mut self, c: ConnId, tx: u32, path: &str) -> (Reply, Vec<Ev>) {
        self.req(c, MsgType::Mkdir, tx, &z(path))
    }

    pub fn rm(&mut self, c: ConnId, tx: u32, path: &str) -> (Reply, Vec<Ev>) {
        self.req(c, MsgType::Rm, tx, &z(path))
    }

    pub fn dir(&mut self, c: ConnId, tx: u32, path: &str) -> Result<Vec<String>, String> {
        self.req(c, MsgType::Directory, tx, &z(path))
            .0
            .map(|p| split(&p))
    }

    pub fn get_perms(&mut self, c: ConnId, tx: u32, path: &str) -> Result<Vec<String>, String> {
        self.req(c, MsgType::GetPerms, tx, &z(path))
            .0
            .map(|p| split(&p))
    }

    pub fn set_perms(
        &mut self,
        c: ConnId,
        tx: u32,
        path: &str,
        perms: &[&str],
    ) -> (Reply, Vec<Ev>) {
        let mut p = z(path);
        for x in perms {
            p.extend(z(x));
        }
        self.req(c, MsgType::SetPerms, tx, &p)
    }

    pub fn ok_perms(&mut self, c: ConnId, path: &str, perms: &[&str]) {
        assert_eq!(
            self.set_perms(c, 0, path, perms).0,
            ok(),
            "set_perms {path}"
        );
    }

    pub fn ok_watch(&mut self, c: ConnId, path: &str, token: &str) {
        assert_eq!(self.watch(c, path, token).0, ok(), "watch {path}");
    }

    pub fn watch(&mut self, c: ConnId, path: &str, token: &str) -> (Reply, Vec<Ev>) {
        let mut p = z(path);
        p.extend(z(token));
        self.req(c, MsgType::Watch, 0, &p)
    }

    pub fn unwatch(&mut self, c: ConnId, path: &str, token: &str) -> Reply {
        let mut p = z(path);
        p.extend(z(token));
        self.req(c, MsgType::Unwatch, 0, &p).0
    }

    pub fn start(&mut self, c: ConnId) -> u32 {
        let r = self.req(c, MsgType::TransactionStart, 0, b"\0").0.unwrap();
        String::from_utf8(r.strip_suffix(&[0]).unwrap().to_vec())
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn end(&mut self, c: ConnId, tx: u32, commit: bool) -> (Reply, Vec<Ev>) {
        self.req(
            c,
            MsgType::TransactionEnd,
            tx,
            if commit { b"T\0" } else { b"F\0" },
        )
    }
}

/// NUL-terminated.
pub fn z(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

pub fn ok() -> Reply {
    Ok(b"OK\0".to_vec())
}

pub fn err(name: &str) -> Reply {
    Err(name.to_owned())
}

pub fn val(s: &str) -> Reply {
    Ok(s.as_bytes().to_vec())
}

/// Split a NUL-terminated string list.
pub fn split(p: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = p
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.pop();
    v
}

/// (path, token) of events for one connection.
pub fn evs_for(evs: &[Ev], c: ConnId) -> Vec<(String, String)> {
    evs.iter()
        .filter(|e| e.0 == c)
        .map(|e| (e.1.clone(), e.2.clone()))
        .collect()
}

pub fn pt(p: &str, t: &str) -> (String, String) {
    (p.to_owned(), t.to_owned())
}
