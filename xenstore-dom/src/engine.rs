//! The xenstore engine: connections, requests, transactions, watches and domains.
//!
//! No I/O happens here. A transport (unix socket on the host, ring page in the domain)
//! registers a connection, hands in each whole request ([`Engine::handle`]) and gets back
//! an [`Output`]: the bytes to send, each addressed to a connection and in the order Xen
//! queues them (watch events caused by a write precede its reply; the event a WATCH fires
//! follows it), plus [`Effect`]s for the transport (map a newly introduced domain's ring,
//! close a released domain's connections).
//!
//! Every request runs against an O(1) copy of the tree (see [`crate::store`]) and is kept
//! only if it succeeds, so a failed request changes nothing. A transaction holds its own
//! snapshot and the list of nodes it touched, each with the generation it saw first; the
//! commit fails with `EAGAIN` exactly when one of those nodes changed in the store since.
//!
//! Xen semantics follow C xenstored (`tools/xenstored`); the places where Bulkhead differs
//! are marked "Bulkhead:".

use alloc::borrow::ToOwned;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::domid::{DOMID_FIRST_RESERVED, DOMID_SELF};
use shared_abi::errno::XenError;
use shared_abi::xenstore::{self, Header, Message, MsgType, PAYLOAD_MAX};

use crate::path::{self, Canonical};
use crate::perms::{self, Perm, Perms, Who};
use crate::quota::{NAMES as QUOTA_NAMES, PrivilegedLimits, Quotas};
use crate::store::{Node, Tree};

/// Engine-assigned connection handle; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// What is on the other end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnKind {
    /// A local tool on the daemon's socket: domain 0, privileged (as in Xen).
    Socket,
    /// A domain (its ring page, or a host socket standing in for one).
    Domain(DomId),
}

/// Engine configuration.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Quotas binding unprivileged domains.
    pub quotas: Quotas,
    /// Bulkhead's caps on privileged connections.
    pub privileged: PrivilegedLimits,
    /// A domain other than 0 that is privileged too (Xen's `--priv-domid`).
    pub priv_domid: Option<DomId>,
}

/// Bytes for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub conn: ConnId,
    pub bytes: Vec<u8>,
}

/// Something the transport must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// INTRODUCE accepted: connect to the domain's ring (`gfn`, unbound `port`).
    Introduce { domid: DomId, gfn: i64, port: u32 },
    /// RELEASE accepted: the domain's ring is to be unmapped.
    Release { domid: DomId },
    /// Drop this connection (the engine has forgotten it already).
    Close(ConnId),
    /// CONTROL `print`: a line for the log.
    Log(String),
}

/// Result of one engine call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub sends: Vec<Outgoing>,
    pub effects: Vec<Effect>,
}

struct Watch {
    path: Arc<str>,
    token: Vec<u8>,
    /// Bytes of the event path to skip for a relative watch (home + `/`).
    prefix: usize,
}

/// A node a transaction touched.
#[derive(Clone)]
struct Access {
    /// Generation when first touched (`None`: absent); compared at commit.
    generation: Option<u64>,
    /// Permissions when first touched, for watch permission of deleted nodes.
    perms: Option<Perms>,
    modified: bool,
    /// Fire watches on commit; `Some(exact)`.
    fire: Option<bool>,
}

struct Txn {
    tree: Tree,
    index: BTreeMap<Arc<str>, usize>,
    list: Vec<(Arc<str>, Access)>,
    /// Change in nodes owned, per domain.
    delta: BTreeMap<DomId, i64>,
}

struct Conn {
    kind: ConnKind,
    domid: DomId,
    watches: Vec<Watch>,
    txns: BTreeMap<u32, Txn>,
    next_tx: u32,
}

#[derive(Default)]
struct Domain {
    introduced: bool,
    target: Option<DomId>,
}

/// A watch event to deliver: the node changed and who may learn of it (any of `perms`
/// granting read permits the event, as Xen's `watch_permitted`).
struct Fire {
    path: Arc<str>,
    exact: bool,
    perms: Vec<Perms>,
}

/// The store engine. See the module doc.
pub struct Engine {
    cfg: Config,
    tree: Tree,
    generation: u64,
    owned: BTreeMap<DomId, i64>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: u64,
    domains: BTreeMap<DomId, Domain>,
}

const OK: &[u8] = b"OK\0";

fn strings(p: &[u8]) -> Vec<&[u8]> {
    // Only NUL-terminated strings count; trailing bytes without a NUL are ignored (Xen).
    let mut v: Vec<&[u8]> = p.split(|&b| b == 0).collect();
    v.pop();
    v
}

fn onearg(p: &[u8]) -> Result<&[u8], XenError> {
    match p.iter().position(|&b| b == 0) {
        Some(i) if i + 1 == p.len() => Ok(&p[..i]),
        _ => Err(XenError::EINVAL),
    }
}

fn parse_num<T: core::str::FromStr>(s: &[u8]) -> Result<T, XenError> {
    if s.is_empty() || s.len() > 20 {
        return Err(XenError::EINVAL);
    }
    core::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(XenError::EINVAL)
}

fn parse_domid(s: &[u8]) -> Result<DomId, XenError> {
    let d: u32 = parse_num(s)?;
    DomId::try_from(d).map_err(|_| XenError::EINVAL)
}

fn with_nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// What a request's scratch copy produced, applied only on success.
struct Done {
    tree: Tree,
    generation: u64,
    new_acc: Vec<(Arc<str>, Access)>,
    /// Marks on nodes the transaction had touched before this request.
    updates: Vec<(Arc<str>, bool, Option<bool>)>,
    fires: Vec<Fire>,
    delta: BTreeMap<DomId, i64>,
}

/// One request's view of the tree: records transaction accesses, enforces quotas, and
/// collects watch firings.
struct Work<'a> {
    tree: Tree,
    who: Who,
    generation: u64,
    prior: Option<&'a Txn>,
    new_acc: Vec<(Arc<str>, Access)>,
    new_idx: BTreeMap<Arc<str>, usize>,
    updates: Vec<(Arc<str>, bool, Option<bool>)>,
    fires: Vec<Fire>,
    delta: BTreeMap<DomId, i64>,
    /// Nodes owned by the requester before this request (store + transaction).
    owned_base: i64,
    /// Quotas for unprivileged requesters.
    q: Option<Quotas>,
}

impl<'a> Work<'a> {
    fn finish(self) -> Done {
        Done {
            tree: self.tree,
            generation: self.generation,
            new_acc: self.new_acc,
            updates: self.updates,
            fires: self.fires,
            delta: self.delta,
        }
    }

    /// Record a transaction's access to `path` (whose current node is `cur`).
    fn note(&mut self, path: &str, cur: Option<&Arc<Node>>, modify: bool) -> Result<(), XenError> {
        let Some(prior) = self.prior else {
            return Ok(());
        };
        if let Some(&i) = self.new_idx.get(path) {
            self.new_acc[i].1.modified |= modify;
            return Ok(());
        }
        if prior.index.contains_key(path) {
            if modify {
                self.updates.push((Arc::from(path), true, None));
            }
            return Ok(());
        }
        if let Some(q) = self.q
            && prior.list.len() + self.new_acc.len() + 1 > q.transaction_nodes as usize
        {
            return Err(XenError::ENOSPC);
        }
        let key: Arc<str> = Arc::from(path);
        let acc = Access {
            generation: cur.map(|n| n.generation),
            perms: cur.map(|n| n.perms.clone()),
            modified: modify,
            fire: None,
        };
        self.new_idx.insert(key.clone(), self.new_acc.len());
        self.new_acc.push((key, acc));
        Ok(())
    }

    fn get(&mut self, path: &str) -> Result<Option<Arc<Node>>, XenError> {
        let n = self.tree.get(path);
        self.note(path, n.as_ref(), false)?;
        Ok(n)
    }

    fn add_owned(&mut self, domid: DomId, d: i64) {
        *self.delta.entry(domid).or_insert(0) += d;
    }

    fn put(&mut self, path: &str, mut node: Node) -> Result<(), XenError> {
        let cur = self.tree.get(path);
        self.note(path, cur.as_ref(), true)?;
        if let Some(q) = self.q
            && node.acc_size() > q.node_size as usize
        {
            return Err(XenError::ENOSPC);
        }
        if let Some(c) = &cur {
            self.add_owned(c.owner(), -1);
        }
        self.add_owned(node.owner(), 1);
        self.generation += 1;
        node.generation = self.generation;
        self.tree.insert(path, node);
        Ok(())
    }

    fn del(&mut self, path: &str) -> Result<(), XenError> {
        let cur = self.tree.get(path);
        self.note(path, cur.as_ref(), true)?;
        if let Some(c) = self.tree.remove(path) {
            self.add_owned(c.owner(), -1);
        }
        Ok(())
    }

    /// Fire watches for a change of `path` (`node_perms`: the node's permissions now, or
    /// before deletion; `old`: its permissions before a SET_PERMS).
    fn fire(&mut self, path: &str, exact: bool, node_perms: Option<Perms>, old: Option<Perms>) {
        if self.prior.is_some() {
            self.updates.push((Arc::from(path), false, Some(exact)));
            return;
        }
        let mut ps: Vec<Perms> = old.into_iter().collect();
        if let Some(np) = node_perms {
            ps.push(np);
            if let Some(parent) = self.tree.get(path::parent(path)) {
                ps.push(parent.perms.clone());
            }
        }
        self.fires.push(Fire {
            path: Arc::from(path),
            exact,
            perms: ps,
        });
    }

    /// `get_node`: the node if `who` has all of `perm` on it; else EACCES, or ENOENT when
    /// it is missing and the nearest existing ancestor grants any of `perm` (so a refused
    /// domain learns nothing about what exists).
    fn get_node(&mut self, path: &str, perm: u8) -> Result<Arc<Node>, XenError> {
        match self.get(path)? {
            Some(n) if perms::access(&self.who, &n.perms) & perm == perm => Ok(n),
            Some(_) => Err(XenError::EACCES),
            None => Err(self.errno_from_parents(path, perm)?),
        }
    }

    fn errno_from_parents(&mut self, path: &str, perm: u8) -> Result<XenError, XenError> {
        let mut p = path.to_owned();
        loop {
            if p == "/" {
                return Ok(XenError::EACCES);
            }
            p = path::parent(&p).to_owned();
            if let Some(n) = self.get(&p)? {
                let ok = perms::access(&self.who, &n.perms) & perm != 0;
                return Ok(if ok {
                    XenError::ENOENT
                } else {
                    XenError::EACCES
                });
            }
        }
    }

    fn check_node_quota(&self) -> Result<(), XenError> {
        if let Some(q) = self.q {
            let now = self.owned_base + self.delta.get(&self.who.domid).copied().unwrap_or(0);
            if now >= i64::from(q.nodes) {
                return Err(XenError::ENOSPC);
            }
        }
        Ok(())
    }

    /// Create `path` and any missing ancestors (empty), inheriting permissions; an
    /// unprivileged creator owns what it creates.
    fn create(&mut self, path: &str, value: &[u8]) -> Result<Perms, XenError> {
        let mut missing = vec![path.to_owned()];
        let mut top = path::parent(path).to_owned();
        let mut parent = loop {
            if let Some(n) = self.get(&top)? {
                break (*n).clone();
            }
            if top == "/" {
                return Err(XenError::EIO);
            }
            missing.push(top.clone());
            top = path::parent(&top).to_owned();
        };
        let mut parent_path = top;
        let mut perms = parent.perms.clone();
        for name in missing.iter().rev() {
            let base = path::basename(name);
            parent.children.insert_mut(Arc::from(base));
            parent.children_bytes += base.len() as u32 + 1;
            self.put(&parent_path, parent)?;
            self.check_node_quota()?;
            if !self.who.privileged && perms.first().is_some_and(|p| p.id != self.who.domid) {
                let mut v: Vec<Perm> = perms.to_vec();
                v[0].id = self.who.domid;
                perms = Arc::from(v);
            }
            let val: &[u8] = if name == path { value } else { b"" };
            let node = Node::new(perms.clone(), val, 0);
            parent = node.clone();
            self.put(name, node)?;
            parent_path = name.clone();
        }
        Ok(perms)
    }

    /// Remove `root` (which exists, not `/`) and everything below; children go first and
    /// fire exact-match watches, the root fires watches on itself and above.
    fn remove_tree(&mut self, root: &str) -> Result<(), XenError> {
        let mut post: Vec<(String, Perms)> = Vec::new();
        let mut stack: Vec<(String, bool)> = vec![(root.to_owned(), false)];
        let mut nodes: BTreeMap<String, Arc<Node>> = BTreeMap::new();
        while let Some((p, expanded)) = stack.pop() {
            if expanded {
                if let Some(n) = nodes.remove(&p) {
                    post.push((p, n.perms.clone()));
                }
                continue;
            }
            let Some(n) = self.get(&p)? else { continue };
            stack.push((p.clone(), true));
            for c in n.children.iter().rev() {
                stack.push((path::child(&p, c), false));
            }
            nodes.insert(p, n);
        }
        for (p, perms) in post {
            self.fire(&p, p != root, Some(perms), None);
            self.del(&p)?;
        }
        let parent_path = path::parent(root).to_owned();
        if let Some(parent) = self.get(&parent_path)? {
            let mut parent = (*parent).clone();
            let base = path::basename(root);
            if parent.children.remove_mut(base) {
                parent.children_bytes -= base.len() as u32 + 1;
            }
            self.put(&parent_path, parent)?;
        }
        Ok(())
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

impl Engine {
    pub fn new(cfg: Config) -> Self {
        let generation = 1;
        let tree = Tree::initial(generation);
        let mut owned = BTreeMap::new();
        owned.insert(0, tree.len() as i64);
        let mut domains = BTreeMap::new();
        domains.insert(
            0,
            Domain {
                introduced: true,
                target: None,
            },
        );
        Engine {
            cfg,
            tree,
            generation,
            owned,
            conns: BTreeMap::new(),
            next_conn: 1,
            domains,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Number of nodes in the store (including the two special watch nodes).
    pub fn node_count(&self) -> usize {
        self.tree.len()
    }

    /// Nodes owned by `domid`.
    pub fn nodes_owned(&self, domid: DomId) -> i64 {
        self.owned.get(&domid).copied().unwrap_or(0)
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Quotas that apply to a connection's requests (`None`: privileged).
    pub fn quotas_for(&self, conn: ConnId) -> Option<Quotas> {
        self.conns.get(&conn).and_then(|c| {
            if self.is_privileged(c) {
                None
            } else {
                Some(self.cfg.quotas)
            }
        })
    }

    fn new_conn(&mut self, kind: ConnKind, domid: DomId) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        let conn = Conn {
            kind,
            domid,
            watches: Vec::new(),
            txns: BTreeMap::new(),
            next_tx: 1,
        };
        self.conns.insert(id, conn);
        id
    }

    /// A local tool connected to the socket (privileged, domain 0).
    pub fn connect_socket(&mut self) -> ConnId {
        self.new_conn(ConnKind::Socket, 0)
    }

    /// A domain's connection. If the domain was not introduced yet it is now (the host
    /// daemon's stand-in for a ring), firing `@introduceDomain`.
    pub fn connect_domain(&mut self, domid: DomId) -> (ConnId, Output) {
        let mut out = Output::default();
        let d = self.domains.entry(domid).or_default();
        if !d.introduced {
            d.introduced = true;
            self.fire_special("@introduceDomain", &mut out);
        }
        (self.new_conn(ConnKind::Domain(domid), domid), out)
    }

    /// The domain died (the service domain learnt it from the hypervisor): as `RELEASE`
    /// from a privileged tool — its connections close, the nodes it owns go (firing their
    /// watches), `@releaseDomain` fires. A domain the engine does not know changes nothing.
    pub fn release_domain(&mut self, domid: DomId) -> Output {
        let mut out = Output::default();
        if domid != 0 && self.domains.contains_key(&domid) {
            self.release(domid, &mut out);
        }
        out
    }

    /// The transport lost the connection: its watches and transactions go.
    pub fn disconnect(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    fn is_privileged(&self, c: &Conn) -> bool {
        c.kind == ConnKind::Socket || c.domid == 0 || self.cfg.priv_domid == Some(c.domid)
    }

    fn who(&self, c: &Conn) -> Who {
        Who {
            domid: c.domid,
            privileged: self.is_privileged(c),
            target: self.domains.get(&c.domid).and_then(|d| d.target),
        }
    }

    fn home(c: &Conn) -> String {
        path::domain_path(u32::from(c.domid))
    }

    /// Handle one whole request from `conn`. Unknown connections get nothing.
    pub fn handle(&mut self, conn: ConnId, msg: &Message) -> Output {
        let mut out = Output::default();
        if !self.conns.contains_key(&conn) {
            return out;
        }
        let h = msg.header;
        let mut after = Vec::new();
        let reply = self.dispatch(conn, &h, &msg.payload, &mut out, &mut after);
        let (ty, payload) = match reply {
            Ok(p) if p.len() <= PAYLOAD_MAX => (h.msg_type, p),
            Ok(_) => (
                MsgType::Error.as_u32(),
                xenstore::error_payload(XenError::E2BIG),
            ),
            Err(e) => (MsgType::Error.as_u32(), xenstore::error_payload(e)),
        };
        if let Ok(bytes) = xenstore::encode(ty, h.req_id, h.tx_id, &payload) {
            // A released connection gets no reply (it is closed).
            if self.conns.contains_key(&conn) {
                out.sends.push(Outgoing { conn, bytes });
            }
        }
        out.sends.extend(after);
        out
    }

    fn dispatch(
        &mut self,
        cid: ConnId,
        h: &Header,
        p: &[u8],
        out: &mut Output,
        after: &mut Vec<Outgoing>,
    ) -> Result<Vec<u8>, XenError> {
        use MsgType as T;
        // Unknown and server-only types are ENOSYS before anything else (Xen's order:
        // ENOSYS, then EACCES for privileged-only types, then the transaction id).
        let t = match h.kind() {
            Some(
                T::WatchEvent
                | T::Error
                | T::Restrict
                | T::GetFeature
                | T::SetFeature
                | T::GetQuota
                | T::SetQuota,
            )
            | None => return Err(XenError::ENOSYS),
            Some(t) => t,
        };
        let conn = self.conns.get(&cid).ok_or(XenError::EINVAL)?;
        let who = self.who(conn);
        let priv_only = matches!(
            t,
            T::Control
                | T::Introduce
                | T::Release
                | T::IsDomainIntroduced
                | T::Resume
                | T::SetTarget
        );
        if priv_only && !who.privileged {
            return Err(XenError::EACCES);
        }
        let txid = if matches!(t, T::Watch | T::Unwatch) {
            0
        } else {
            h.tx_id
        };
        if txid != 0 && !conn.txns.contains_key(&txid) {
            return Err(XenError::ENOENT);
        }
        match t {
            T::Read => self.run(cid, txid, out, |w, home| {
                let c = canon(w, home, onearg(p)?, false)?;
                Ok(w.get_node(&c.path, perms::READ)?.value.to_vec())
            }),
            T::Directory => self.run(cid, txid, out, |w, home| {
                let c = canon(w, home, onearg(p)?, false)?;
                Ok(w.get_node(&c.path, perms::READ)?.children_blob())
            }),
            T::DirectoryPart => self.run(cid, txid, out, |w, home| {
                if p.iter().filter(|&&b| b == 0).count() != 2 {
                    return Err(XenError::EINVAL);
                }
                let args = strings(p);
                let c = canon(w, home, args[0], false)?;
                let node = w.get_node(&c.path, perms::READ)?;
                let off: usize = parse_num(args[1])?;
                Ok(directory_part(&node, off))
            }),
            T::GetPerms => self.run(cid, txid, out, |w, home| {
                let c = canon(w, home, onearg(p)?, true)?;
                Ok(perms::to_payload(&w.get_node(&c.path, perms::READ)?.perms))
            }),
            T::Write => self.run(cid, txid, out, |w, home| {
                let nul = p.iter().position(|&b| b == 0).ok_or(XenError::EINVAL)?;
                let (name, value) = (&p[..nul], &p[nul + 1..]);
                let c = canon(w, home, name, false)?;
                let perms = match w.get_node(&c.path, perms::WRITE) {
                    Ok(n) => {
                        let mut n = (*n).clone();
                        n.value = Arc::from(value);
                        let perms = n.perms.clone();
                        w.put(&c.path, n)?;
                        perms
                    }
                    Err(XenError::ENOENT) => w.create(&c.path, value)?,
                    Err(e) => return Err(e),
                };
                w.fire(&c.path, false, Some(perms), None);
                Ok(OK.to_vec())
            }),
            T::Mkdir => self.run(cid, txid, out, |w, home| {
                let c = canon(w, home, onearg(p)?, false)?;
                match w.get_node(&c.path, perms::WRITE) {
                    Ok(_) => {}
                    Err(XenError::ENOENT) => {
                        let perms = w.create(&c.path, b"")?;
                        w.fire(&c.path, false, Some(perms), None);
                    }
                    Err(e) => return Err(e),
                }
                Ok(OK.to_vec())
            }),
            T::Rm => self.run(cid, txid, out, |w, home| {
                let c = canon(w, home, onearg(p)?, false)?;
                match w.get_node(&c.path, perms::WRITE) {
                    Ok(_) if c.path == "/" => Err(XenError::EINVAL),
                    Ok(_) => {
                        w.remove_tree(&c.path)?;
                        Ok(OK.to_vec())
                    }
                    Err(XenError::ENOENT) => match w.get(path::parent(&c.path))? {
                        Some(_) => Ok(OK.to_vec()),
                        None => Err(XenError::ENOENT),
                    },
                    Err(e) => Err(e),
                }
            }),
            T::SetPerms => self.run(cid, txid, out, |w, home| {
                let args = strings(p);
                if args.len() < 2 {
                    return Err(XenError::EINVAL);
                }
                if let Some(q) = w.q
                    && args.len() - 1 > q.node_permissions as usize
                {
                    return Err(XenError::ENOSPC);
                }
                let new: Vec<Perm> = args[1..]
                    .iter()
                    .map(|s| perms::parse_one(s))
                    .collect::<Result<_, _>>()?;
                let c = canon(w, home, args[0], true)?;
                let node = w.get_node(&c.path, perms::WRITE | perms::OWNER)?;
                if !w.who.privileged && new[0].id != node.owner() {
                    return Err(XenError::EPERM);
                }
                let old = node.perms.clone();
                let mut n = (*node).clone();
                n.perms = Arc::from(new);
                let np = n.perms.clone();
                w.put(&c.path, n)?;
                w.fire(&c.path, false, Some(np), Some(old));
                Ok(OK.to_vec())
            }),
            T::Watch => self.do_watch(cid, p, after),
            T::Unwatch => {
                let args = strings(p);
                if args.len() != 2 {
                    return Err(XenError::EINVAL);
                }
                let conn = self.conns.get_mut(&cid).ok_or(XenError::EINVAL)?;
                let path_max = (!who.privileged).then_some(self.cfg.quotas.path_max as usize);
                let c = path::canonicalize(args[0], &Self::home(conn), true, path_max)?;
                let pos = conn
                    .watches
                    .iter()
                    .position(|w| *w.path == *c.path && w.token == args[1])
                    .ok_or(XenError::ENOENT)?;
                conn.watches.remove(pos);
                Ok(OK.to_vec())
            }
            T::TransactionStart => {
                if txid != 0 {
                    return Err(XenError::EBUSY);
                }
                let open = self.open_transactions(cid, &who);
                let limit = if who.privileged {
                    self.cfg.privileged.transactions
                } else {
                    self.cfg.quotas.transactions
                };
                if open >= limit as usize {
                    return Err(XenError::ENOSPC);
                }
                let tree = self.tree.clone();
                let conn = self.conns.get_mut(&cid).ok_or(XenError::EINVAL)?;
                let mut id = conn.next_tx;
                while id == 0 || conn.txns.contains_key(&id) {
                    id = id.wrapping_add(1);
                }
                conn.next_tx = id.wrapping_add(1);
                let txn = Txn {
                    tree,
                    index: BTreeMap::new(),
                    list: Vec::new(),
                    delta: BTreeMap::new(),
                };
                conn.txns.insert(id, txn);
                Ok(with_nul(&id.to_string()))
            }
            T::TransactionEnd => {
                let arg = onearg(p)?;
                if arg != b"T" && arg != b"F" {
                    return Err(XenError::EINVAL);
                }
                if txid == 0 {
                    return Err(XenError::ENOENT);
                }
                let conn = self.conns.get_mut(&cid).ok_or(XenError::EINVAL)?;
                let txn = conn.txns.remove(&txid).ok_or(XenError::ENOENT)?;
                if arg == b"T" {
                    self.commit(&who, txn, out)?;
                }
                Ok(OK.to_vec())
            }
            T::Introduce => self.do_introduce(p, out),
            T::Release => {
                let domid = self.onearg_domain(p)?;
                self.release(domid, out);
                Ok(OK.to_vec())
            }
            T::Resume => {
                self.onearg_domain(p)?;
                Ok(OK.to_vec())
            }
            T::GetDomainPath => {
                let domid = parse_domid(onearg(p)?)?;
                Ok(with_nul(&path::domain_path(u32::from(domid))))
            }
            T::IsDomainIntroduced => {
                let domid = parse_domid(onearg(p)?)?;
                let yes =
                    domid == DOMID_SELF || self.domains.get(&domid).is_some_and(|d| d.introduced);
                Ok(if yes {
                    b"T\0".to_vec()
                } else {
                    b"F\0".to_vec()
                })
            }
            T::SetTarget => {
                let args = strings(p);
                if args.len() < 2 {
                    return Err(XenError::EINVAL);
                }
                let domid = parse_domid(args[0])?;
                let tdomid = parse_domid(args[1])?;
                for d in [domid, tdomid] {
                    if !self.domains.get(&d).is_some_and(|d| d.introduced) {
                        return Err(XenError::ENOENT);
                    }
                }
                if let Some(d) = self.domains.get_mut(&domid) {
                    d.target = Some(tdomid);
                }
                Ok(OK.to_vec())
            }
            T::ResetWatches => {
                let conn = self.conns.get_mut(&cid).ok_or(XenError::EINVAL)?;
                conn.watches.clear();
                conn.txns.clear();
                Ok(OK.to_vec())
            }
            T::Control => self.do_control(p, out),
            T::WatchEvent
            | T::Error
            | T::Restrict
            | T::GetFeature
            | T::SetFeature
            | T::GetQuota
            | T::SetQuota => Err(XenError::ENOSYS),
        }
    }

    /// Run a tree operation for `cid` (in transaction `txid` if non-zero) on a scratch copy;
    /// keep the result only on success.
    fn run<F>(
        &mut self,
        cid: ConnId,
        txid: u32,
        out: &mut Output,
        f: F,
    ) -> Result<Vec<u8>, XenError>
    where
        F: FnOnce(&mut Work<'_>, &str) -> Result<Vec<u8>, XenError>,
    {
        let conn = self.conns.get(&cid).ok_or(XenError::EINVAL)?;
        let who = self.who(conn);
        let home = Self::home(conn);
        let prior = if txid != 0 {
            conn.txns.get(&txid)
        } else {
            None
        };
        let tree = prior.map_or_else(|| self.tree.clone(), |t| t.tree.clone());
        let owned_base = self.nodes_owned(who.domid)
            + prior
                .and_then(|t| t.delta.get(&who.domid))
                .copied()
                .unwrap_or(0);
        let mut w = Work {
            tree,
            who,
            generation: self.generation,
            prior,
            new_acc: Vec::new(),
            new_idx: BTreeMap::new(),
            updates: Vec::new(),
            fires: Vec::new(),
            delta: BTreeMap::new(),
            owned_base,
            q: (!who.privileged).then_some(self.cfg.quotas),
        };
        let result = f(&mut w, &home);
        let mut done = w.finish();
        if result.is_err() {
            if txid == 0 {
                return result;
            }
            // A failed request changes nothing, but what it read still counts for the
            // transaction's conflict check (a missing node it saw may appear later).
            let Some(txn) = self.conns.get(&cid).and_then(|c| c.txns.get(&txid)) else {
                return result;
            };
            done.tree = txn.tree.clone();
            done.generation = self.generation;
            for (_, acc) in &mut done.new_acc {
                acc.modified = false;
            }
            done.updates.clear();
            done.delta.clear();
        }
        self.apply(cid, txid, done, out);
        result
    }

    fn apply(&mut self, cid: ConnId, txid: u32, done: Done, out: &mut Output) {
        self.generation = done.generation;
        if txid == 0 {
            self.tree = done.tree;
            for (d, n) in done.delta {
                *self.owned.entry(d).or_insert(0) += n;
            }
            self.deliver(&done.fires, out);
            return;
        }
        let Some(txn) = self.conns.get_mut(&cid).and_then(|c| c.txns.get_mut(&txid)) else {
            return;
        };
        txn.tree = done.tree;
        for (path, acc) in done.new_acc {
            txn.index.insert(path.clone(), txn.list.len());
            txn.list.push((path, acc));
        }
        for (path, modified, fire) in done.updates {
            if let Some(&i) = txn.index.get(&path) {
                let acc = &mut txn.list[i].1;
                acc.modified |= modified;
                if let Some(exact) = fire {
                    // A subtree event replaces an exact one, not the other way round.
                    acc.fire = Some(acc.fire.map_or(exact, |e| e && exact));
                }
            }
        }
        for (d, n) in done.delta {
            *txn.delta.entry(d).or_insert(0) += n;
        }
    }

    fn open_transactions(&self, cid: ConnId, who: &Who) -> usize {
        if who.privileged {
            return self.conns.get(&cid).map_or(0, |c| c.txns.len());
        }
        self.conns
            .values()
            .filter(|c| c.domid == who.domid)
            .map(|c| c.txns.len())
            .sum()
    }

    fn commit(&mut self, who: &Who, txn: Txn, out: &mut Output) -> Result<(), XenError> {
        if !who.privileged {
            let d = txn.delta.get(&who.domid).copied().unwrap_or(0);
            if d > 0 && self.nodes_owned(who.domid) + d > i64::from(self.cfg.quotas.nodes) {
                return Err(XenError::ENOSPC);
            }
        }
        for (path, acc) in &txn.list {
            if self.tree.get(path).map(|n| n.generation) != acc.generation {
                return Err(XenError::EAGAIN);
            }
        }
        for (path, acc) in &txn.list {
            if !acc.modified {
                continue;
            }
            match txn.tree.get(path) {
                Some(n) => {
                    self.generation += 1;
                    let mut n = (*n).clone();
                    n.generation = self.generation;
                    self.tree.insert_arc(path.clone(), Arc::new(n));
                }
                None => {
                    self.tree.remove(path);
                }
            }
        }
        for (d, n) in &txn.delta {
            *self.owned.entry(*d).or_insert(0) += n;
        }
        let mut fires = Vec::new();
        for (path, acc) in &txn.list {
            let Some(exact) = acc.fire else { continue };
            let mut ps: Vec<Perms> = acc.perms.iter().cloned().collect();
            if let Some(n) = self.tree.get(path) {
                ps.push(n.perms.clone());
                if let Some(parent) = self.tree.get(path::parent(path)) {
                    ps.push(parent.perms.clone());
                }
            }
            fires.push(Fire {
                path: path.clone(),
                exact,
                perms: ps,
            });
        }
        self.deliver(&fires, out);
        Ok(())
    }

    /// Queue watch events for `fires` to every connection with a matching, permitted watch.
    fn deliver(&self, fires: &[Fire], out: &mut Output) {
        for f in fires {
            for (&cid, conn) in &self.conns {
                if conn.watches.is_empty() {
                    continue;
                }
                let who = self.who(conn);
                if !f
                    .perms
                    .iter()
                    .any(|p| perms::access(&who, p) & perms::READ != 0)
                {
                    continue;
                }
                for w in &conn.watches {
                    let hit = if f.exact {
                        *w.path == *f.path
                    } else {
                        path::is_child(&f.path, &w.path)
                    };
                    if hit {
                        push_event(out, cid, &f.path, w);
                    }
                }
            }
        }
    }

    fn fire_special(&self, name: &str, out: &mut Output) {
        let mut ps = Vec::new();
        for p in [name, "/"] {
            if let Some(n) = self.tree.get(p) {
                ps.push(n.perms.clone());
            }
        }
        self.deliver(
            &[Fire {
                path: Arc::from(name),
                exact: true,
                perms: ps,
            }],
            out,
        );
    }

    fn do_watch(
        &mut self,
        cid: ConnId,
        p: &[u8],
        after: &mut Vec<Outgoing>,
    ) -> Result<Vec<u8>, XenError> {
        let args = strings(p);
        if args.len() != 2 {
            return Err(XenError::EINVAL);
        }
        let conn = self.conns.get(&cid).ok_or(XenError::EINVAL)?;
        let who = self.who(conn);
        let home = Self::home(conn);
        let path_max = (!who.privileged).then_some(self.cfg.quotas.path_max as usize);
        let c: Canonical = path::canonicalize(args[0], &home, true, path_max)?;
        if conn
            .watches
            .iter()
            .any(|w| *w.path == *c.path && w.token == args[1])
        {
            return Err(XenError::EEXIST);
        }
        let (count, limit) = if who.privileged {
            (conn.watches.len(), self.cfg.privileged.watches)
        } else {
            let n = self
                .conns
                .values()
                .filter(|c| c.domid == who.domid)
                .map(|c| c.watches.len())
                .sum();
            (n, self.cfg.quotas.watches)
        };
        if count >= limit as usize {
            return Err(XenError::E2BIG);
        }
        let prefix = if c.relative { home.len() + 1 } else { 0 };
        let watch = Watch {
            path: Arc::from(c.path.as_str()),
            token: args[1].to_vec(),
            prefix,
        };
        let mut tmp = Output::default();
        push_event(&mut tmp, cid, &watch.path, &watch);
        after.extend(tmp.sends);
        if let Some(conn) = self.conns.get_mut(&cid) {
            conn.watches.push(watch);
        }
        Ok(OK.to_vec())
    }

    fn onearg_domain(&self, p: &[u8]) -> Result<DomId, XenError> {
        let domid = parse_domid(onearg(p)?)?;
        if domid == 0 {
            return Err(XenError::EINVAL);
        }
        if !self.domains.get(&domid).is_some_and(|d| d.introduced) {
            return Err(XenError::ENOENT);
        }
        Ok(domid)
    }

    fn do_introduce(&mut self, p: &[u8], out: &mut Output) -> Result<Vec<u8>, XenError> {
        let args = strings(p);
        if args.len() < 3 {
            return Err(XenError::EINVAL);
        }
        let domid = parse_domid(args[0])?;
        let gfn: i64 = parse_num(args[1])?;
        let port: u32 = parse_num(args[2])?;
        if port == 0 || domid >= DOMID_FIRST_RESERVED {
            return Err(XenError::EINVAL);
        }
        let d = self.domains.entry(domid).or_default();
        let fresh = !d.introduced;
        d.introduced = true;
        // The domain starts over: its connections lose watches and transactions.
        for c in self
            .conns
            .values_mut()
            .filter(|c| c.kind == ConnKind::Domain(domid))
        {
            c.watches.clear();
            c.txns.clear();
        }
        out.effects.push(Effect::Introduce { domid, gfn, port });
        if fresh && domid != 0 {
            self.fire_special("@introduceDomain", out);
        }
        Ok(OK.to_vec())
    }

    /// Forget a domain: close its connections, remove the nodes it owns (firing watches),
    /// then fire `@releaseDomain`.
    fn release(&mut self, domid: DomId, out: &mut Output) {
        let gone: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.kind == ConnKind::Domain(domid))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.conns.remove(&id);
            out.effects.push(Effect::Close(id));
        }
        self.domains.remove(&domid);
        for d in self.domains.values_mut() {
            if d.target == Some(domid) {
                d.target = None;
            }
        }
        // Find the top-most nodes the domain owns (pre-order; skip below a match).
        let mut roots = Vec::new();
        let mut stack = vec!["/".to_owned()];
        while let Some(p) = stack.pop() {
            let Some(n) = self.tree.get(&p) else { continue };
            if n.owner() == domid && p != "/" {
                roots.push(p);
                continue;
            }
            for c in n.children.iter().rev() {
                stack.push(path::child(&p, c));
            }
        }
        for root in roots {
            let who = Who {
                domid: 0,
                privileged: true,
                target: None,
            };
            let mut w = Work {
                tree: self.tree.clone(),
                who,
                generation: self.generation,
                prior: None,
                new_acc: Vec::new(),
                new_idx: BTreeMap::new(),
                updates: Vec::new(),
                fires: Vec::new(),
                delta: BTreeMap::new(),
                owned_base: 0,
                q: None,
            };
            if w.remove_tree(&root).is_ok() {
                let done = w.finish();
                self.generation = done.generation;
                self.tree = done.tree;
                for (d, n) in done.delta {
                    *self.owned.entry(d).or_insert(0) += n;
                }
                self.deliver(&done.fires, out);
            }
        }
        self.owned.remove(&domid);
        out.effects.push(Effect::Release { domid });
        self.fire_special("@releaseDomain", out);
    }

    fn do_control(&mut self, p: &[u8], out: &mut Output) -> Result<Vec<u8>, XenError> {
        let args = strings(p);
        let (&cmd, rest) = args.split_first().ok_or(XenError::EINVAL)?;
        match (cmd, rest) {
            (b"check", []) => {
                self.check().map_err(|_| XenError::EIO)?;
                Ok(OK.to_vec())
            }
            (b"print", [s]) => {
                out.effects
                    .push(Effect::Log(String::from_utf8_lossy(s).into_owned()));
                Ok(OK.to_vec())
            }
            (b"help", []) => Ok(with_nul(
                "check           \nprint           <string>\nquota           [set <name> <val>|<domid>]\nhelp            \n",
            )),
            (b"quota", []) => {
                let mut s = String::from("Quota settings:\n");
                for (name, descr) in QUOTA_NAMES {
                    let v = self.cfg.quotas.get(name).unwrap_or(0);
                    s.push_str(&format!("{name:<17}: {v:>8} {descr}\n"));
                }
                Ok(with_nul(&s))
            }
            (b"quota", [set, name, val]) if *set == b"set" => {
                let v: u32 = parse_num(val)?;
                let name = core::str::from_utf8(name).map_err(|_| XenError::EINVAL)?;
                if v < 1 || !self.cfg.quotas.set(name, v) {
                    return Err(XenError::EINVAL);
                }
                Ok(OK.to_vec())
            }
            (b"quota", [domid]) => {
                let domid = parse_domid(domid)?;
                if !self.domains.contains_key(&domid) {
                    return Err(XenError::ENOENT);
                }
                let conns = || self.conns.values().filter(|c| c.domid == domid);
                let watches: usize = conns().map(|c| c.watches.len()).sum();
                let txns: usize = conns().map(|c| c.txns.len()).sum();
                let s = format!(
                    "Domain {domid}:\n{:<17}: {:>8}\n{:<17}: {:>8}\n{:<17}: {:>8}\n",
                    "nodes",
                    self.nodes_owned(domid),
                    "watches",
                    watches,
                    "transactions",
                    txns
                );
                Ok(with_nul(&s))
            }
            _ => Err(XenError::EINVAL),
        }
    }

    /// Internal consistency: every listed child exists, every node but `/` and specials is
    /// listed by its parent, child byte counts and ownership counts agree.
    pub fn check(&self) -> Result<(), String> {
        let mut owned: BTreeMap<DomId, i64> = BTreeMap::new();
        for (p, n) in self.tree.iter() {
            *owned.entry(n.owner()).or_insert(0) += 1;
            let bytes: usize = n.children.iter().map(|c| c.len() + 1).sum();
            if bytes != n.children_bytes as usize {
                return Err(format!("{p}: child bytes {} != {bytes}", n.children_bytes));
            }
            for c in &n.children {
                if !self.tree.contains(&path::child(p, c)) {
                    return Err(format!("{p}: missing child {c}"));
                }
            }
            if p.starts_with('/') && &**p != "/" {
                let listed = self
                    .tree
                    .get(path::parent(p))
                    .is_some_and(|par| par.children.contains(path::basename(p)));
                if !listed {
                    return Err(format!("{p}: not listed by its parent"));
                }
            }
        }
        for (d, n) in &self.owned {
            if owned.get(d).copied().unwrap_or(0) != *n {
                return Err(format!("domain {d}: owns {:?}, counted {n}", owned.get(d)));
            }
        }
        Ok(())
    }
}

fn canon(w: &Work<'_>, home: &str, input: &[u8], special: bool) -> Result<Canonical, XenError> {
    let path_max = w.q.map(|q| q.path_max as usize);
    path::canonicalize(input, home, special, path_max)
}

fn push_event(out: &mut Output, conn: ConnId, event_path: &str, w: &Watch) {
    let rel = event_path.get(w.prefix..).unwrap_or(event_path);
    let mut payload = Vec::with_capacity(rel.len() + w.token.len() + 2);
    payload.extend_from_slice(rel.as_bytes());
    payload.push(0);
    payload.extend_from_slice(&w.token);
    payload.push(0);
    // Xen does not send over-long events.
    if let Ok(bytes) = xenstore::encode(MsgType::WatchEvent.as_u32(), 0, 0, &payload) {
        out.sends.push(Outgoing { conn, bytes });
    }
}

/// DIRECTORY_PART reply: generation, then as many child names from byte offset `off` as fit;
/// an extra NUL marks the end of the list.
fn directory_part(node: &Node, off: usize) -> Vec<u8> {
    let blob = node.children_blob();
    let mut out = with_nul(&node.generation.to_string());
    if off >= blob.len() {
        out.push(0);
        return out;
    }
    let maxlen = PAYLOAD_MAX - out.len() - 1;
    let mut len = 0;
    loop {
        let rest = &blob[off + len..];
        let name_len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if len + name_len >= maxlen {
            break;
        }
        len += name_len + 1;
        if off + len >= blob.len() {
            break;
        }
    }
    out.extend_from_slice(&blob[off..(off + len).min(blob.len())]);
    if off + len >= blob.len() {
        out.push(0);
    }
    out
}
