//! Host daemon: serves the engine on unix sockets, like C `xenstored` for local tools.
//!
//! Each connection has a reader thread (decode, call the engine, route the output) and a
//! writer thread fed by a bounded queue, so a client that does not read its replies only
//! fills its own queue; when that is full the client is dropped and nobody else waits.
//! A client that sends an oversized length, or starts a message and stalls longer than
//! `partial_timeout`, loses its connection. Lock order: the one `Shared` mutex only; it is
//! never held across socket I/O (queues are `try_send`).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::prelude::rust_2024::*;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};
use std::{eprintln, format};

use shared_abi::DomId;
use shared_abi::xenstore::MessageDecoder;

use crate::engine::{Config, ConnId, Effect, Engine, Output};

/// Daemon settings.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub engine: Config,
    /// Messages queued for one client before it is dropped as too slow.
    pub max_queued: usize,
    /// How long a client may sit on half a message.
    pub partial_timeout: Duration,
    /// Log requests and effects to stderr.
    pub verbose: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            engine: Config::default(),
            max_queued: 4096,
            partial_timeout: Duration::from_secs(5),
            verbose: false,
        }
    }
}

/// Who a listening socket's clients are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Local tools: privileged domain 0.
    Tools,
    /// Stand-ins for a domain's ring (unprivileged unless domain 0 / priv domid).
    Domain(DomId),
}

struct Shared {
    engine: Engine,
    writers: HashMap<ConnId, SyncSender<Vec<u8>>>,
}

/// A running daemon; clone to share. Dropping it does not stop the threads.
#[derive(Clone)]
pub struct Daemon {
    shared: Arc<Mutex<Shared>>,
    cfg: Arc<DaemonConfig>,
}

impl Daemon {
    pub fn new(cfg: DaemonConfig) -> Self {
        let engine = Engine::new(cfg.engine.clone());
        Daemon {
            shared: Arc::new(Mutex::new(Shared {
                engine,
                writers: HashMap::new(),
            })),
            cfg: Arc::new(cfg),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic elsewhere must not take the store down with it.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the engine (tests, statistics).
    pub fn with_engine<R>(&self, f: impl FnOnce(&mut Engine) -> R) -> R {
        f(&mut self.lock().engine)
    }

    /// Bind `path` (replacing a stale socket file) and accept clients on a thread.
    pub fn listen(&self, path: &Path, role: Role) -> std::io::Result<thread::JoinHandle<()>> {
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && meta.file_type().is_socket()
        {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let me = self.clone();
        thread::Builder::new()
            .name(format!("xs-accept-{}", path.display()))
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => me.spawn_client(s, role),
                        Err(e) => eprintln!("xenstore-dom: accept: {e}"),
                    }
                }
            })
    }

    fn spawn_client(&self, stream: UnixStream, role: Role) {
        let (tx, rx) = sync_channel::<Vec<u8>>(self.cfg.max_queued);
        let conn = {
            let mut sh = self.lock();
            let (conn, out) = match role {
                Role::Tools => (sh.engine.connect_socket(), Output::default()),
                Role::Domain(d) => sh.engine.connect_domain(d),
            };
            sh.writers.insert(conn, tx);
            route(&mut sh, out, self.cfg.verbose);
            conn
        };
        let Ok(wstream) = stream.try_clone() else {
            self.drop_conn(conn);
            return;
        };
        let spawned = thread::Builder::new()
            .name(format!("xs-write-{}", conn.0))
            .spawn(move || writer(wstream, rx));
        if spawned.is_err() {
            self.drop_conn(conn);
            return;
        }
        let me = self.clone();
        let spawned = thread::Builder::new()
            .name(format!("xs-read-{}", conn.0))
            .spawn(move || me.reader(stream, conn));
        if spawned.is_err() {
            self.drop_conn(conn);
        }
    }

    fn drop_conn(&self, conn: ConnId) {
        let mut sh = self.lock();
        sh.engine.disconnect(conn);
        sh.writers.remove(&conn);
    }

    fn reader(&self, mut stream: UnixStream, conn: ConnId) {
        let mut dec = MessageDecoder::new();
        let mut buf = [0u8; 8192];
        let mut partial_since: Option<Instant> = None;
        let _ = stream.set_read_timeout(Some(Duration::from_millis(250)));
        loop {
            if !self.lock().writers.contains_key(&conn) {
                break; // dropped (slow, released)
            }
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if partial_since.is_some_and(|t| t.elapsed() > self.cfg.partial_timeout) {
                        self.log(conn, "half a message for too long; dropping");
                        break;
                    }
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let msgs = match dec.feed(&buf[..n]) {
                Ok(m) => m,
                Err(e) => {
                    self.log(conn, &format!("protocol error {e:?}; dropping"));
                    break;
                }
            };
            partial_since = if dec.in_progress() {
                partial_since.or(Some(Instant::now()))
            } else {
                None
            };
            let mut sh = self.lock();
            for m in msgs {
                if !sh.writers.contains_key(&conn) {
                    break;
                }
                let out = sh.engine.handle(conn, &m);
                route(&mut sh, out, self.cfg.verbose);
            }
        }
        self.drop_conn(conn);
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }

    fn log(&self, conn: ConnId, what: &str) {
        if self.cfg.verbose {
            eprintln!("xenstore-dom: connection {}: {what}", conn.0);
        }
    }
}

/// Queue every send; a full queue drops that client; carry out effects.
fn route(sh: &mut Shared, out: Output, verbose: bool) {
    for s in out.sends {
        let full = match sh.writers.get(&s.conn) {
            Some(tx) => matches!(tx.try_send(s.bytes), Err(TrySendError::Full(_))),
            None => false,
        };
        if full {
            if verbose {
                eprintln!("xenstore-dom: connection {} too slow; dropping", s.conn.0);
            }
            sh.writers.remove(&s.conn);
            sh.engine.disconnect(s.conn);
        }
    }
    for e in out.effects {
        match e {
            Effect::Close(c) => {
                sh.writers.remove(&c);
            }
            Effect::Log(line) => eprintln!("xenstore-dom: control: {line}"),
            other => {
                if verbose {
                    eprintln!("xenstore-dom: {other:?}");
                }
            }
        }
    }
}

fn writer(mut stream: UnixStream, rx: Receiver<Vec<u8>>) {
    while let Ok(bytes) = rx.recv() {
        if stream.write_all(&bytes).is_err() {
            break;
        }
    }
    // Sender gone (client dropped) or the peer went away: wake the reader too.
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Parse `DOMID:PATH` for `--domain-socket`.
pub fn parse_domain_socket(s: &str) -> Result<(DomId, PathBuf), String> {
    let (d, p) = s
        .split_once(':')
        .ok_or_else(|| format!("expected DOMID:PATH, got {s:?}"))?;
    let d: DomId = d
        .parse()
        .map_err(|_| format!("domain id {d:?} is not a number in 0..=65535"))?;
    if p.is_empty() {
        return Err("empty socket path".into());
    }
    Ok((d, PathBuf::from(p)))
}
