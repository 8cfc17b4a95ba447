//! Host daemon throughput over the unix socket (1 and 64 clients) and store memory per node.
//!
//! Ids are the metric names: `xs_host_{read,write,directory,txn_commit}_ops[_64clients]`
//! (one element = one request, or one committed transaction), and
//! `METRIC xs_host_bytes_per_node <v> bytes` at 100k nodes, measured with a counting
//! allocator around the engine.
// A benchmark harness: any failure should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shared_abi::xenstore::{self, Message, MessageDecoder, MsgType};
use xenstore_dom::host::{Daemon, DaemonConfig, Role};
use xenstore_dom::{Engine, Output};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Client {
    s: UnixStream,
    dec: MessageDecoder,
    buf: Vec<u8>,
    req: u32,
}

impl Client {
    fn connect(path: &Path) -> Client {
        Client {
            s: UnixStream::connect(path).unwrap(),
            dec: MessageDecoder::new(),
            buf: vec![0; 8192],
            req: 0,
        }
    }

    fn call(&mut self, ty: MsgType, tx: u32, payload: &[u8]) -> Message {
        self.req = self.req.wrapping_add(1);
        self.s
            .write_all(&xenstore::encode(ty.as_u32(), self.req, tx, payload).unwrap())
            .unwrap();
        loop {
            let n = self.s.read(&mut self.buf).unwrap();
            assert!(n > 0, "daemon closed the connection");
            let msgs = self.dec.feed(&self.buf[..n]).unwrap();
            if let Some(m) = msgs
                .into_iter()
                .find(|m| m.header.msg_type != MsgType::WatchEvent.as_u32())
            {
                return m;
            }
        }
    }

    fn ok(&mut self, ty: MsgType, tx: u32, payload: &[u8]) -> Message {
        let m = self.call(ty, tx, payload);
        assert_ne!(
            m.header.msg_type,
            MsgType::Error.as_u32(),
            "{:?}",
            String::from_utf8_lossy(&m.payload)
        );
        m
    }
}

fn z(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

type OpFn = fn(&mut Client, usize, u64);

fn op_read(c: &mut Client, _id: usize, _i: u64) {
    c.ok(MsgType::Read, 0, b"/bench/dir/k7\0");
}

fn op_write(c: &mut Client, id: usize, i: u64) {
    let mut p = z(&format!("/bench/w/{id}/k{}", i % 64));
    p.extend_from_slice(b"some-value");
    c.ok(MsgType::Write, 0, &p);
}

fn op_directory(c: &mut Client, _id: usize, _i: u64) {
    c.ok(MsgType::Directory, 0, b"/bench/dir\0");
}

fn op_txn(c: &mut Client, id: usize, i: u64) {
    loop {
        let m = c.ok(MsgType::TransactionStart, 0, b"\0");
        let tx: u32 = String::from_utf8_lossy(m.payload.strip_suffix(&[0]).unwrap())
            .parse()
            .unwrap();
        c.ok(MsgType::Read, tx, &z(&format!("/bench/t/{id}")));
        let mut p = z(&format!("/bench/t/{id}"));
        p.extend_from_slice(i.to_string().as_bytes());
        c.ok(MsgType::Write, tx, &p);
        let end = c.call(MsgType::TransactionEnd, tx, b"T\0");
        if end.header.msg_type != MsgType::Error.as_u32() {
            return;
        }
        assert_eq!(end.payload, b"EAGAIN\0");
    }
}

fn setup() -> (PathBuf, Daemon) {
    let dir = std::env::temp_dir().join(format!("xsdom-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let sock = dir.join("socket");
    let d = Daemon::new(DaemonConfig::default());
    d.listen(&sock, Role::Tools).unwrap();
    let mut c = Client::connect(&sock);
    for i in 0..20 {
        let mut p = z(&format!("/bench/dir/k{i}"));
        p.extend_from_slice(b"value");
        c.ok(MsgType::Write, 0, &p);
    }
    for id in 0..64 {
        let mut p = z(&format!("/bench/t/{id}"));
        p.push(b'0');
        c.ok(MsgType::Write, 0, &p);
    }
    (sock, d)
}

/// Run `iters` operations spread over `n` clients; wall time.
fn run_clients(sock: &Path, n: usize, iters: u64, op: OpFn) -> Duration {
    let barrier = Arc::new(Barrier::new(n + 1));
    let per = iters.div_ceil(n as u64);
    let mut handles = Vec::new();
    for id in 0..n {
        let sock = sock.to_path_buf();
        let b = barrier.clone();
        handles.push(std::thread::spawn(move || {
            let mut c = Client::connect(&sock);
            b.wait();
            for i in 0..per {
                op(&mut c, id, i);
            }
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    t0.elapsed()
}

fn bench_ops(c: &mut Criterion) {
    let (sock, _daemon) = setup();
    let ops: [(&str, OpFn); 4] = [
        ("xs_host_read_ops", op_read),
        ("xs_host_write_ops", op_write),
        ("xs_host_directory_ops", op_directory),
        ("xs_host_txn_commit_ops", op_txn),
    ];
    for (name, op) in ops {
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(1));
        let mut one = Client::connect(&sock);
        g.bench_function(name, |b| {
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                op(&mut one, 0, i)
            })
        });
        g.finish();
        let name64 = format!("{name}_64clients");
        let mut g = c.benchmark_group(&name64);
        g.throughput(Throughput::Elements(1));
        g.bench_function(&name64, |b| {
            b.iter_custom(|iters| run_clients(&sock, 64, iters.max(64), op))
        });
        g.finish();
    }
}

fn bytes_per_node(_c: &mut Criterion) {
    const N: usize = 100_000;
    let before = LIVE.load(Ordering::Relaxed);
    let mut e = Engine::default();
    let conn = e.connect_socket();
    let mut sink: Output = Output::default();
    for i in 0..N {
        let mut p = z(&format!("/local/domain/{}/data/key{}", i / 1000, i % 1000));
        p.push(b'4');
        let msg = Message {
            header: xenstore::Header {
                msg_type: MsgType::Write.as_u32(),
                req_id: 1,
                tx_id: 0,
                len: p.len() as u32,
            },
            payload: p,
        };
        sink = e.handle(conn, &msg);
    }
    drop(sink);
    let nodes = e.node_count();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "METRIC xs_host_bytes_per_node {:.1} bytes",
        bytes as f64 / nodes as f64
    );
    println!("(store of {nodes} nodes, {bytes} bytes live)");
    drop(e);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = bytes_per_node, bench_ops
}
criterion_main!(benches);
