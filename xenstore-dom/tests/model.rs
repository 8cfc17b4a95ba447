//! Property test: random operation sequences from several clients (two privileged sockets
//! and an unprivileged domain), with transactions, run against the engine and against a
//! deliberately naive model (a `BTreeMap` of full paths, deep-copied snapshots, linear
//! scans). Every reply and every watch event must agree.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use proptest::prelude::*;
use shared_abi::xenstore::MsgType;

const PATHS: &[&str] = &["/", "/a", "/a/b", "/a/b/c", "/a/d", "/e", "/e/f"];
const NCONN: usize = 3;
const DOM: u16 = 2; // connection 2 is this unprivileged domain

#[derive(Clone, Debug)]
enum Op {
    Read(usize),
    Write(usize, u8),
    Mkdir(usize),
    Rm(usize),
    Dir(usize),
    GetPerms(usize),
    SetPerms(usize, Vec<(u8, u16)>),
    Watch(usize, u8),
    Unwatch(usize, u8),
    Start,
    End(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    let perm = (0u8..4, prop_oneof![Just(0u16), Just(DOM), Just(3u16)]);
    prop_oneof![
        3 => p.clone().prop_map(Op::Read),
        4 => (p.clone(), 0u8..3).prop_map(|(p, v)| Op::Write(p, v)),
        1 => p.clone().prop_map(Op::Mkdir),
        2 => p.clone().prop_map(Op::Rm),
        1 => p.clone().prop_map(Op::Dir),
        1 => p.clone().prop_map(Op::GetPerms),
        2 => (p.clone(), proptest::collection::vec(perm, 1..4)).prop_map(|(p, v)| Op::SetPerms(p, v)),
        2 => (p.clone(), 0u8..2).prop_map(|(p, t)| Op::Watch(p, t)),
        1 => (p.clone(), 0u8..2).prop_map(|(p, t)| Op::Unwatch(p, t)),
        2 => Just(Op::Start),
        2 => any::<bool>().prop_map(Op::End),
    ]
}

// ---- the model --------------------------------------------------------------------------

type Perms = Vec<(u8, u16)>; // (access bits R=1 W=2, domid)

#[derive(Clone, Debug)]
struct MNode {
    value: Vec<u8>,
    perms: Perms,
    ver: u64,
}

type Store = BTreeMap<String, MNode>;
/// (connection index, path, token).
type MEvent = (usize, String, String);

#[derive(Clone, Default)]
struct Acc {
    order: Vec<String>,
    seen: BTreeMap<String, Option<u64>>,
    seen_perms: BTreeMap<String, Option<Perms>>,
    modified: BTreeSet<String>,
    fire: BTreeMap<String, bool>,
}

struct MTxn {
    id: u32,
    view: Store,
    acc: Acc,
}

struct MConn {
    privileged: bool,
    domid: u16,
    watches: Vec<(String, String)>,
    txns: Vec<MTxn>,
    next_tx: u32,
}

struct Model {
    main: Store,
    ver: u64,
    conns: Vec<MConn>,
}

fn parent(p: &str) -> String {
    match p[1..].rfind('/') {
        Some(i) => p[..i + 1].to_owned(),
        None => "/".to_owned(),
    }
}

fn is_child(p: &str, w: &str) -> bool {
    w == "/" || p == w || p.starts_with(&format!("{w}/"))
}

fn access(privileged: bool, domid: u16, perms: &Perms) -> u8 {
    if privileged || perms[0].1 == domid {
        return 1 | 2 | 8;
    }
    perms[1..]
        .iter()
        .find(|p| p.1 == domid)
        .unwrap_or(&perms[0])
        .0
}

fn children(s: &Store, p: &str) -> Vec<String> {
    s.keys()
        .filter(|k| k.starts_with('/') && k.as_str() != "/" && parent(k) == p)
        .map(|k| k.rsplit('/').next().unwrap().to_owned())
        .collect()
}

/// One operation's context: the store it runs on and, in a transaction, its access log.
struct Ctx<'a> {
    s: &'a mut Store,
    acc: Option<&'a mut Acc>,
    ver: &'a mut u64,
    privileged: bool,
    domid: u16,
    fires: Vec<(String, bool, Vec<Perms>)>,
}

impl Ctx<'_> {
    fn touch(&mut self, p: &str, modify: bool) {
        if let Some(acc) = self.acc.as_deref_mut() {
            if !acc.seen.contains_key(p) {
                acc.order.push(p.to_owned());
                acc.seen.insert(p.to_owned(), self.s.get(p).map(|n| n.ver));
                acc.seen_perms
                    .insert(p.to_owned(), self.s.get(p).map(|n| n.perms.clone()));
            }
            if modify {
                acc.modified.insert(p.to_owned());
            }
        }
    }
    fn get(&mut self, p: &str) -> Option<MNode> {
        self.touch(p, false);
        self.s.get(p).cloned()
    }
    fn put(&mut self, p: &str, mut n: MNode) {
        self.touch(p, true);
        *self.ver += 1;
        n.ver = *self.ver;
        self.s.insert(p.to_owned(), n);
    }
    fn del(&mut self, p: &str) {
        self.touch(p, true);
        self.s.remove(p);
    }
    fn fire(&mut self, p: &str, exact: bool, perms: Vec<Perms>) {
        if let Some(acc) = self.acc.as_deref_mut() {
            let e = acc.fire.entry(p.to_owned()).or_insert(exact);
            *e = *e && exact;
        } else {
            self.fires.push((p.to_owned(), exact, perms));
        }
    }
    fn get_node(&mut self, p: &str, perm: u8) -> Result<MNode, String> {
        match self.get(p) {
            Some(n) if access(self.privileged, self.domid, &n.perms) & perm == perm => Ok(n),
            Some(_) => Err("EACCES".into()),
            None => {
                let mut q = p.to_owned();
                loop {
                    if q == "/" {
                        return Err("EACCES".into());
                    }
                    q = parent(&q);
                    if let Some(n) = self.get(&q) {
                        let ok = access(self.privileged, self.domid, &n.perms) & perm != 0;
                        return Err(if ok { "ENOENT" } else { "EACCES" }.into());
                    }
                }
            }
        }
    }
    fn parent_perms(&self, p: &str) -> Option<Perms> {
        self.s.get(&parent(p)).map(|n| n.perms.clone())
    }
    fn create(&mut self, p: &str, value: &[u8]) -> Perms {
        let mut missing = vec![p.to_owned()];
        let mut top = parent(p);
        let mut perms = loop {
            if let Some(n) = self.get(&top) {
                break n.perms;
            }
            missing.push(top.clone());
            top = parent(&top);
        };
        let mut parent_path = top;
        for name in missing.iter().rev() {
            let pn = self.s[&parent_path].clone();
            self.put(&parent_path, pn);
            if !self.privileged {
                perms[0].1 = self.domid;
            }
            let v = if name == p { value.to_vec() } else { vec![] };
            self.put(
                name,
                MNode {
                    value: v,
                    perms: perms.clone(),
                    ver: 0,
                },
            );
            parent_path = name.clone();
        }
        perms
    }
    fn run(&mut self, op: &Op) -> Result<Vec<u8>, String> {
        match op {
            Op::Read(i) => Ok(self.get_node(PATHS[*i], 1)?.value),
            Op::Dir(i) => {
                self.get_node(PATHS[*i], 1)?;
                Ok(children(self.s, PATHS[*i])
                    .iter()
                    .flat_map(|c| z(c))
                    .collect())
            }
            Op::GetPerms(i) => {
                let n = self.get_node(PATHS[*i], 1)?;
                Ok(n.perms.iter().flat_map(|p| z(&fmt_perm(p))).collect())
            }
            Op::Write(i, v) => {
                let p = PATHS[*i];
                let value = vec![b'0' + v];
                let perms = match self.get_node(p, 2) {
                    Ok(mut n) => {
                        n.value = value;
                        let perms = n.perms.clone();
                        self.put(p, n);
                        perms
                    }
                    Err(e) if e == "ENOENT" => self.create(p, &value),
                    Err(e) => return Err(e),
                };
                let pp = self.parent_perms(p);
                self.fire(p, false, [Some(perms), pp].into_iter().flatten().collect());
                Ok(b"OK\0".to_vec())
            }
            Op::Mkdir(i) => {
                let p = PATHS[*i];
                match self.get_node(p, 2) {
                    Ok(_) => {}
                    Err(e) if e == "ENOENT" => {
                        let perms = self.create(p, b"");
                        let pp = self.parent_perms(p);
                        self.fire(p, false, [Some(perms), pp].into_iter().flatten().collect());
                    }
                    Err(e) => return Err(e),
                }
                Ok(b"OK\0".to_vec())
            }
            Op::Rm(i) => {
                let p = PATHS[*i];
                match self.get_node(p, 2) {
                    Ok(_) if p == "/" => Err("EINVAL".into()),
                    Ok(_) => {
                        // Post-order over the subtree, children in name order.
                        fn walk(c: &mut Ctx<'_>, p: &str, out: &mut Vec<String>) {
                            if c.get(p).is_none() {
                                return;
                            }
                            for ch in children(c.s, p) {
                                let cp = if p == "/" {
                                    format!("/{ch}")
                                } else {
                                    format!("{p}/{ch}")
                                };
                                walk(c, &cp, out);
                            }
                            out.push(p.to_owned());
                        }
                        let mut post = Vec::new();
                        walk(self, p, &mut post);
                        for q in post {
                            let np = self.s[&q].perms.clone();
                            let pp = self.parent_perms(&q);
                            self.fire(&q, q != p, [Some(np), pp].into_iter().flatten().collect());
                            self.del(&q);
                        }
                        let par = parent(p);
                        let pn = self.get(&par).unwrap();
                        self.put(&par, pn);
                        Ok(b"OK\0".to_vec())
                    }
                    Err(e) if e == "ENOENT" => {
                        if self.get(&parent(p)).is_some() {
                            Ok(b"OK\0".to_vec())
                        } else {
                            Err(e)
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            Op::SetPerms(i, new) => {
                let p = PATHS[*i];
                let new: Perms = new.iter().map(|&(a, d)| (a & 3, d)).collect();
                let n = self.get_node(p, 2 | 8)?;
                if !self.privileged && new[0].1 != n.perms[0].1 {
                    return Err("EPERM".into());
                }
                let old = n.perms.clone();
                let mut n2 = n;
                n2.perms = new.clone();
                self.put(p, n2);
                let pp = self.parent_perms(p);
                self.fire(
                    p,
                    false,
                    [Some(old), Some(new), pp].into_iter().flatten().collect(),
                );
                Ok(b"OK\0".to_vec())
            }
            _ => unreachable!(),
        }
    }
}

fn fmt_perm(p: &(u8, u16)) -> String {
    let l = ['n', 'r', 'w', 'b'][(p.0 & 3) as usize];
    format!("{l}{}", p.1)
}

impl Model {
    fn new() -> Self {
        let mut main = Store::new();
        for p in [
            "/",
            "/tool",
            "/tool/xenstored",
            "@releaseDomain",
            "@introduceDomain",
        ] {
            main.insert(
                p.into(),
                MNode {
                    value: vec![],
                    perms: vec![(0, 0)],
                    ver: 0,
                },
            );
        }
        let conns = (0..NCONN)
            .map(|i| MConn {
                privileged: i < 2,
                domid: if i < 2 { 0 } else { DOM },
                watches: vec![],
                txns: vec![],
                next_tx: 1,
            })
            .collect();
        Model {
            main,
            ver: 0,
            conns,
        }
    }

    /// Deliver fires as (conn, path, token).
    fn deliver(&self, fires: &[(String, bool, Vec<Perms>)]) -> Vec<(usize, String, String)> {
        let mut out = Vec::new();
        for (p, exact, perms) in fires {
            for (ci, c) in self.conns.iter().enumerate() {
                if !perms
                    .iter()
                    .any(|ps| access(c.privileged, c.domid, ps) & 1 != 0)
                {
                    continue;
                }
                for (w, t) in &c.watches {
                    if if *exact { w == p } else { is_child(p, w) } {
                        out.push((ci, p.clone(), t.clone()));
                    }
                }
            }
        }
        out
    }

    fn step(&mut self, ci: usize, tx: u32, op: &Op) -> (Result<Vec<u8>, String>, Vec<MEvent>) {
        if tx != 0
            && !matches!(op, Op::Watch(..) | Op::Unwatch(..))
            && !self.conns[ci].txns.iter().any(|t| t.id == tx)
        {
            return (Err("ENOENT".into()), vec![]);
        }
        match op {
            Op::Watch(i, t) => {
                let (p, t) = (PATHS[*i].to_owned(), t.to_string());
                let c = &mut self.conns[ci];
                if c.watches.contains(&(p.clone(), t.clone())) {
                    return (Err("EEXIST".into()), vec![]);
                }
                c.watches.push((p.clone(), t.clone()));
                (Ok(b"OK\0".to_vec()), vec![(ci, p, t)])
            }
            Op::Unwatch(i, t) => {
                let key = (PATHS[*i].to_owned(), t.to_string());
                let c = &mut self.conns[ci];
                match c.watches.iter().position(|w| *w == key) {
                    Some(pos) => {
                        c.watches.remove(pos);
                        (Ok(b"OK\0".to_vec()), vec![])
                    }
                    None => (Err("ENOENT".into()), vec![]),
                }
            }
            Op::Start => {
                if tx != 0 {
                    return (Err("EBUSY".into()), vec![]);
                }
                let c = &self.conns[ci];
                let open: usize = if c.privileged {
                    c.txns.len()
                } else {
                    self.conns
                        .iter()
                        .filter(|o| o.domid == c.domid)
                        .map(|o| o.txns.len())
                        .sum()
                };
                if open >= if c.privileged { 256 } else { 10 } {
                    return (Err("ENOSPC".into()), vec![]);
                }
                let view = self.main.clone();
                let c = &mut self.conns[ci];
                let id = c.next_tx;
                c.next_tx += 1;
                c.txns.push(MTxn {
                    id,
                    view,
                    acc: Acc::default(),
                });
                (Ok(z(&id.to_string())), vec![])
            }
            Op::End(commit) => {
                if tx == 0 {
                    return (Err("ENOENT".into()), vec![]);
                }
                let c = &mut self.conns[ci];
                let pos = c.txns.iter().position(|t| t.id == tx).unwrap();
                let t = c.txns.remove(pos);
                if !commit {
                    return (Ok(b"OK\0".to_vec()), vec![]);
                }
                for p in &t.acc.order {
                    if self.main.get(p).map(|n| n.ver) != t.acc.seen[p] {
                        return (Err("EAGAIN".into()), vec![]);
                    }
                }
                for p in &t.acc.order {
                    if !t.acc.modified.contains(p) {
                        continue;
                    }
                    match t.view.get(p) {
                        Some(n) => {
                            self.ver += 1;
                            let mut n = n.clone();
                            n.ver = self.ver;
                            self.main.insert(p.clone(), n);
                        }
                        None => {
                            self.main.remove(p);
                        }
                    }
                }
                let mut fires = Vec::new();
                for p in &t.acc.order {
                    let Some(&exact) = t.acc.fire.get(p) else {
                        continue;
                    };
                    let mut ps: Vec<Perms> = t.acc.seen_perms[p].iter().cloned().collect();
                    if let Some(n) = self.main.get(p) {
                        ps.push(n.perms.clone());
                        if let Some(par) = self.main.get(&parent(p)) {
                            ps.push(par.perms.clone());
                        }
                    }
                    fires.push((p.clone(), exact, ps));
                }
                (Ok(b"OK\0".to_vec()), self.deliver(&fires))
            }
            _ => {
                let (privileged, domid) = (self.conns[ci].privileged, self.conns[ci].domid);
                if tx == 0 {
                    let mut scratch = self.main.clone();
                    let mut ver = self.ver;
                    let mut ctx = Ctx {
                        s: &mut scratch,
                        acc: None,
                        ver: &mut ver,
                        privileged,
                        domid,
                        fires: vec![],
                    };
                    let r = ctx.run(op);
                    let fires = std::mem::take(&mut ctx.fires);
                    if r.is_ok() {
                        self.main = scratch;
                        self.ver = ver;
                        return (r, self.deliver(&fires));
                    }
                    (r, vec![])
                } else {
                    let mut ver = self.ver;
                    let c = &mut self.conns[ci];
                    let t = c.txns.iter_mut().find(|t| t.id == tx).unwrap();
                    let mut scratch = t.view.clone();
                    let mut acc = t.acc.clone();
                    let mut ctx = Ctx {
                        s: &mut scratch,
                        acc: Some(&mut acc),
                        ver: &mut ver,
                        privileged,
                        domid,
                        fires: vec![],
                    };
                    let r = ctx.run(op);
                    if r.is_ok() {
                        t.view = scratch;
                        t.acc = acc;
                        self.ver = ver;
                    } else {
                        // Failed: keep only what was read, as the engine does.
                        for p in &acc.order {
                            if !t.acc.seen.contains_key(p) {
                                t.acc.order.push(p.clone());
                                t.acc.seen.insert(p.clone(), acc.seen[p]);
                                t.acc
                                    .seen_perms
                                    .insert(p.clone(), acc.seen_perms[p].clone());
                            }
                        }
                    }
                    (r, vec![])
                }
            }
        }
    }
}

fn wire(op: &Op) -> (MsgType, Vec<u8>) {
    let zp = |i: &usize| z(PATHS[*i]);
    match op {
        Op::Read(i) => (MsgType::Read, zp(i)),
        Op::Write(i, v) => (MsgType::Write, [zp(i), vec![b'0' + v]].concat()),
        Op::Mkdir(i) => (MsgType::Mkdir, zp(i)),
        Op::Rm(i) => (MsgType::Rm, zp(i)),
        Op::Dir(i) => (MsgType::Directory, zp(i)),
        Op::GetPerms(i) => (MsgType::GetPerms, zp(i)),
        Op::SetPerms(i, ps) => {
            let mut p = zp(i);
            for x in ps {
                p.extend(z(&fmt_perm(&(x.0 & 3, x.1))));
            }
            (MsgType::SetPerms, p)
        }
        Op::Watch(i, t) => (MsgType::Watch, [zp(i), z(&t.to_string())].concat()),
        Op::Unwatch(i, t) => (MsgType::Unwatch, [zp(i), z(&t.to_string())].concat()),
        Op::Start => (MsgType::TransactionStart, z("")),
        Op::End(c) => (MsgType::TransactionEnd, z(if *c { "T" } else { "F" })),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(steps in proptest::collection::vec((0..NCONN, any::<prop::sample::Index>(), op()), 1..60)) {
        let mut rig = Rig::new();
        let ids = [rig.sock(), rig.sock(), rig.dom(DOM)];
        let mut model = Model::new();
        for (ci, pick, op) in &steps {
            // Use one of the connection's open transactions (or none) for tree operations.
            let open: Vec<u32> = model.conns[*ci].txns.iter().map(|t| t.id).collect();
            let tx = match op {
                Op::Start | Op::Watch(..) | Op::Unwatch(..) => 0,
                Op::End(_) if open.is_empty() => 0,
                _ if open.is_empty() || pick.index(3) == 0 => 0,
                _ => open[pick.index(open.len())],
            };
            let (ty, payload) = wire(op);
            let (got, evs) = rig.req(ids[*ci], ty, tx, &payload);
            let (want, wevs) = model.step(*ci, tx, op);
            prop_assert_eq!(&got, &want, "reply to {:?} on conn {} tx {}", op, ci, tx);
            let mut got_evs: Vec<(usize, String, String)> = evs
                .iter()
                .map(|(c, p, t)| (ids.iter().position(|x| x == c).unwrap(), p.clone(), t.clone()))
                .collect();
            let mut wevs = wevs;
            got_evs.sort();
            wevs.sort();
            prop_assert_eq!(got_evs, wevs, "events of {:?} on conn {} tx {}", op, ci, tx);
        }
        prop_assert!(rig.e.check().is_ok(), "{:?}", rig.e.check());
    }
}
