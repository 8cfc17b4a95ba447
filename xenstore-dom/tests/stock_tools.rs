//! Debian's stock `xenstore-utils` against the host daemon, unchanged, over `XENSTORED_PATH`;
//! and hostile socket clients that must lose only their own connection.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use shared_abi::xenstore::{self, Header, MessageDecoder, MsgType};

static INSTALL: Once = Once::new();

/// Install `xenstore-utils` if missing (root on Debian), else fail naming the command.
fn ensure_tools() {
    INSTALL.call_once(|| {
        if Path::new("/usr/bin/xenstore-read").exists() {
            return;
        }
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let debian = Path::new("/etc/debian_version").exists();
        assert!(
            root && debian,
            "xenstore-utils missing: run `apt-get install -y xenstore-utils` (as root, on Debian)"
        );
        let _ = Command::new("apt-get").arg("update").status();
        let st = Command::new("apt-get")
            .args(["install", "-y", "xenstore-utils"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .expect("apt-get runs");
        assert!(st.success(), "`apt-get install -y xenstore-utils` failed");
    });
}

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start(name: &str, extra: &[&str]) -> Daemon {
        ensure_tools();
        let dir = std::env::temp_dir().join(format!("xsdom-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("socket");
        let dom5 = format!("5:{}", dir.join("dom5").display());
        let child = Command::new(env!("CARGO_BIN_EXE_xenstore-dom"))
            .arg("--socket")
            .arg(&sock)
            .args(["--domain-socket", &dom5])
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .expect("daemon starts");
        let d = Daemon { child, dir };
        let t0 = Instant::now();
        while !(sock.exists() && d.dir.join("dom5").exists()) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "daemon did not create its sockets"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("socket")
    }

    fn tool_at(&self, sock: &Path, tool: &str, args: &[&str]) -> Output {
        Command::new(format!("/usr/bin/{tool}"))
            .args(args)
            .env("XENSTORED_PATH", sock)
            .output()
            .expect("tool runs")
    }

    fn tool(&self, tool: &str, args: &[&str]) -> Output {
        self.tool_at(&self.sock(), tool, args)
    }

    fn ok(&self, tool: &str, args: &[&str]) -> String {
        let o = self.tool(tool, args);
        assert!(
            o.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn stock_tools_write_read_list_exists_rm() {
    let d = Daemon::start("basic", &[]);
    d.ok(
        "xenstore-write",
        &["/vm/a/name", "guest", "/vm/a/memory", "512"],
    );
    assert_eq!(d.ok("xenstore-read", &["/vm/a/name"]), "guest\n");
    assert_eq!(d.ok("xenstore-list", &["/vm/a"]), "memory\nname\n");
    let ls = d.ok("xenstore-ls", &["/vm"]);
    assert!(
        ls.contains("a = \"\"") && ls.contains(" name = \"guest\""),
        "{ls}"
    );
    assert!(d.tool("xenstore-exists", &["/vm/a/name"]).status.success());
    assert!(!d.tool("xenstore-exists", &["/vm/zz"]).status.success());
    // Errors for missing nodes.
    let o = d.tool("xenstore-read", &["/vm/missing"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("couldn't read path"));
    assert!(!d.tool("xenstore-list", &["/nothing/here"]).status.success());
    // Removal of a subtree.
    d.ok("xenstore-rm", &["/vm/a"]);
    assert!(!d.tool("xenstore-exists", &["/vm/a/name"]).status.success());
    assert_eq!(d.ok("xenstore-list", &["/vm"]), "");
    // Stock root content.
    assert!(d.ok("xenstore-ls", &["/"]).contains("tool = \"\""));
}

#[test]
fn stock_tools_permissions_refuse_another_domain() {
    let d = Daemon::start("perms", &[]);
    let dom5 = d.dir.join("dom5");
    d.ok(
        "xenstore-write",
        &["/data/open", "yes", "/data/closed", "no"],
    );
    d.ok("xenstore-chmod", &["/data/open", "n0", "r5"]);
    let perms = d.ok("xenstore-ls", &["-p", "/data"]);
    assert!(perms.contains("(n0,r5)"), "{perms}");
    // Domain 5 (the stand-in socket) reads what it may, is refused the rest.
    let o = d.tool_at(&dom5, "xenstore-read", &["/data/open"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "yes\n");
    let o = d.tool_at(&dom5, "xenstore-read", &["/data/closed"]);
    assert!(!o.status.success(), "domain 5 must not read /data/closed");
    let o = d.tool_at(&dom5, "xenstore-write", &["/data/open", "hacked"]);
    assert!(!o.status.success(), "r5 does not allow writing");
    assert_eq!(d.ok("xenstore-read", &["/data/open"]), "yes\n");
    // Relative paths of domain 5 land in its home once it may write there.
    d.ok("xenstore-write", &["/local/domain/5", ""]);
    d.ok("xenstore-chmod", &["/local/domain/5", "n5"]);
    let o = d.tool_at(&dom5, "xenstore-write", &["name", "five"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.ok("xenstore-read", &["/local/domain/5/name"]), "five\n");
    // chmod -r applies recursively.
    d.ok("xenstore-write", &["/rec/a/b", "1"]);
    d.ok("xenstore-chmod", &["-r", "/rec", "n0", "b5"]);
    let o = d.tool_at(&dom5, "xenstore-read", &["/rec/a/b"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "1\n");
}

#[test]
fn stock_xenstore_watch_sees_registration_and_changes() {
    let d = Daemon::start("watch", &[]);
    let mut w = Command::new("/usr/bin/xenstore-watch")
        .args(["-n", "3", "/w"])
        .env("XENSTORED_PATH", d.sock())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    d.ok("xenstore-write", &["/w/x", "1"]);
    d.ok("xenstore-rm", &["/w"]);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = w.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = w.kill();
            panic!("xenstore-watch did not see 3 events");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let mut out = String::new();
    w.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, vec!["/w", "/w/x", "/w"], "{out}");
}

fn send(s: &mut UnixStream, ty: MsgType, req: u32, payload: &[u8]) {
    s.write_all(&xenstore::encode(ty.as_u32(), req, 0, payload).unwrap())
        .unwrap();
}

fn recv(s: &mut UnixStream) -> Option<xenstore::Message> {
    let mut d = MessageDecoder::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {
                if let Some(m) = d.feed(&b).ok()?.pop() {
                    return Some(m);
                }
            }
        }
    }
}

fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

#[test]
fn hostile_clients_lose_only_their_own_connection() {
    let d = Daemon::start(
        "hostile",
        &["--partial-timeout-ms", "300", "--priv-watches", "100"],
    );
    d.ok("xenstore-write", &["/alive", "yes"]);

    // Garbage with a sane length: an error reply, the connection stays.
    let mut g = UnixStream::connect(d.sock()).unwrap();
    let hdr = Header {
        msg_type: 0xdead,
        req_id: 9,
        tx_id: 0,
        len: 3,
    };
    g.write_all(&hdr.to_bytes()).unwrap();
    g.write_all(b"\xff\x00\x01").unwrap();
    let m = recv(&mut g).unwrap();
    assert_eq!(m.header.msg_type, MsgType::Error.as_u32());
    assert_eq!(m.payload, b"ENOSYS\0");
    send(&mut g, MsgType::Read, 10, b"/alive\0");
    assert_eq!(recv(&mut g).unwrap().payload, b"yes");

    // Oversized length: dropped.
    let mut big = UnixStream::connect(d.sock()).unwrap();
    let hdr = Header {
        msg_type: 2,
        req_id: 1,
        tx_id: 0,
        len: 4097,
    };
    big.write_all(&hdr.to_bytes()).unwrap();
    assert!(
        closed(&mut big),
        "oversized header must cost the connection"
    );

    // Half a message, then silence: dropped after the partial timeout.
    let mut half = UnixStream::connect(d.sock()).unwrap();
    half.write_all(
        &Header {
            msg_type: 2,
            req_id: 1,
            tx_id: 0,
            len: 100,
        }
        .to_bytes(),
    )
    .unwrap();
    half.write_all(b"/al").unwrap();
    assert!(
        closed(&mut half),
        "half a message must not hold a connection forever"
    );

    // Thousands of watches: quota error once over the cap, connection kept.
    let mut w = UnixStream::connect(d.sock()).unwrap();
    let mut e2big = 0;
    for i in 0..2000u32 {
        send(&mut w, MsgType::Watch, i, format!("/x\0t{i}\0").as_bytes());
        let m = recv(&mut w).unwrap();
        if m.header.msg_type == MsgType::Error.as_u32() {
            assert_eq!(m.payload, b"E2BIG\0");
            e2big += 1;
        } else {
            assert_eq!(m.payload, b"OK\0");
            let ev = recv(&mut w).unwrap();
            assert_eq!(ev.header.msg_type, MsgType::WatchEvent.as_u32());
        }
    }
    assert_eq!(e2big, 1900);

    // A client that never reads its events is dropped when its queue fills; others go on.
    let mut lazy = UnixStream::connect(d.sock()).unwrap();
    send(&mut lazy, MsgType::Watch, 1, b"/flood\0t\0");
    for i in 0..50 {
        d.ok("xenstore-write", &[&format!("/flood/{i}"), "x"]);
    }

    // The daemon and other clients are fine.
    assert_eq!(d.ok("xenstore-read", &["/alive"]), "yes\n");
    send(&mut g, MsgType::Read, 11, b"/alive\0");
    assert_eq!(recv(&mut g).unwrap().payload, b"yes");
}

#[test]
fn slow_reader_is_dropped_when_its_queue_is_full() {
    let d = Daemon::start("slow", &["--max-queued", "8"]);
    let mut lazy = UnixStream::connect(d.sock()).unwrap();
    send(&mut lazy, MsgType::Watch, 1, b"/flood\0t\0");
    std::thread::sleep(Duration::from_millis(200));
    // Events pile up in the lazy client's socket buffer and then its queue.
    let mut writer = UnixStream::connect(d.sock()).unwrap();
    let value = vec![b'v'; 3000];
    for i in 0..400u32 {
        let mut p = format!("/flood/{i}\0").into_bytes();
        p.extend_from_slice(&value);
        send(&mut writer, MsgType::Write, i, &p);
        let m = recv(&mut writer).unwrap();
        assert_eq!(m.payload, b"OK\0");
    }
    // The lazy client was cut off; reading now ends in EOF after what was buffered.
    assert!(
        closed(&mut lazy),
        "a client that never reads must be dropped"
    );
    assert_eq!(d.ok("xenstore-read", &["/flood/0"]).len(), 3001);
}
