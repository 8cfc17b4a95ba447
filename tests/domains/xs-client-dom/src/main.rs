//! xs-client-dom: a client of the xenstore service domain, speaking xenbus (dom-rt's
//! [`Xenbus`](dom_rt::xenbus::Xenbus)) over its ring page and the event channel in its start
//! info. `role=` on the command line picks what it does; `peer=` / `watcher=` name other
//! clients by domain id (manifest order). Every check prints `RESULT <name> pass|fail
//! <details>`.
//!
//! - `role=a peer=B [corrupter=C]`: write, read, directory; a watch on B's `ping` node that
//!   must fire for B's write; a transaction on its `counter` that B changes in between, so
//!   the commit fails with `EAGAIN` and the retry succeeds; read/write throughput
//!   (`METRIC xs_ring_read_ops`, `METRIC xs_ring_write_ops`); with `corrupter`, once C is
//!   back, that the store still serves A.
//! - `role=b peer=A`: its own write/read, then the peer side of the watch and the
//!   transaction.
//! - `role=corrupt watcher=A`: writes a node, then corrupts its ring indices; the server
//!   must drop it (the `error` field set), then let it reconnect and serve it again.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
dom_rt::entry!(client::main);

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod client {
    use alloc::format;
    use alloc::rc::Rc;
    use alloc::string::String;
    use alloc::vec::Vec;
    use core::cell::Cell;
    use core::fmt::Display;

    use dom_rt::event::Waiter;
    use dom_rt::xenbus::ring::offsets;
    use dom_rt::xenbus::{ClientRing, EvtchnSignal, RingPage, RingTransport, Tx, Xenbus};
    use dom_rt::{StartInfo, XenError, evtchn, gnttab, println, time};
    use shared_abi::DomId;
    use shared_abi::ring::SharedRingMem;
    use shared_abi::start_info::XENSTORE_RING_VA;
    use shared_abi::xenstore::RING_SIZE;

    type Bus = Xenbus<RingTransport<SharedRingMem, EvtchnSignal>>;

    const MS: u64 = 1_000_000;
    /// How long a client waits for a peer's step before reporting failure.
    const PEER_WAIT_NS: u64 = 20_000 * MS;

    fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    fn result(name: &str, ok: bool, details: impl Display) {
        let v = if ok { "pass" } else { "fail" };
        println!("RESULT {name} {v} {details}");
    }

    fn page() -> Option<SharedRingMem> {
        // SAFETY: the hypervisor maps this domain's xenstore ring page RW at XENSTORE_RING_VA
        // for its whole life; it is touched only through SharedRingMem handles.
        unsafe { gnttab::ring_mem(XENSTORE_RING_VA) }.ok()
    }

    fn connect(si: &StartInfo) -> Option<Bus> {
        if si.xenstore_evtchn == 0 {
            result(
                "xs_connect",
                false,
                "no xenstore event channel in the start info",
            );
            return None;
        }
        let ring = match page().map(ClientRing::new) {
            Some(Ok(r)) => r,
            _ => {
                result("xs_connect", false, "ring page unusable");
                return None;
            }
        };
        let t = RingTransport::new(ring, EvtchnSignal::new(si.xenstore_evtchn));
        Some(Xenbus::new(t))
    }

    /// Poll `path` until `f(value)` or the deadline.
    fn wait_for(xb: &mut Bus, path: &str, f: impl Fn(&[u8]) -> bool) -> Result<(), XenError> {
        let end = time::now_ns() + PEER_WAIT_NS;
        loop {
            if let Ok(v) = xb.read(Tx::NONE, path)
                && f(&v)
            {
                return Ok(());
            }
            if time::now_ns() > end {
                return Err(XenError::ETIMEDOUT);
            }
            time::sleep(5 * MS)?;
        }
    }

    /// Write `path` = `value` readable (or, with `rw`, writable too) by `peer`.
    fn share(
        xb: &mut Bus,
        me: DomId,
        peer: DomId,
        path: &str,
        value: &[u8],
        rw: bool,
    ) -> Result<(), XenError> {
        xb.write(Tx::NONE, path, value)?;
        let owner = format!("n{me}");
        let other = format!("{}{peer}", if rw { 'b' } else { 'r' });
        xb.set_perms(Tx::NONE, path, &[&owner, &other])
    }

    fn basics(xb: &mut Bus, home: &str) {
        let x = format!("{home}/data/x");
        let w = xb.write(Tx::NONE, &x, b"hello");
        result("xs_write", w.is_ok(), format!("{w:?}"));
        let r = xb.read(Tx::NONE, &x);
        result(
            "xs_read",
            r.as_deref() == Ok(b"hello".as_slice()),
            format!("{:?}", r.map(|v| String::from_utf8_lossy(&v).into_owned())),
        );
        let _ = xb.write(Tx::NONE, &format!("{home}/data/y"), b"2");
        let d = xb.directory(Tx::NONE, &format!("{home}/data"));
        let want: Vec<String> = ["x", "y"].iter().map(|s| String::from(*s)).collect();
        result("xs_directory", d.as_ref() == Ok(&want), format!("{d:?}"));
    }

    fn role_a(xb: &mut Bus, me: DomId, peer: DomId, corrupter: Option<DomId>) {
        let home = format!("/local/domain/{me}");
        let phome = format!("/local/domain/{peer}");
        basics(xb, &home);
        // Shared nodes first, so the peer's polls see them with their permissions.
        let setup = share(xb, me, peer, &format!("{home}/counter"), b"0", true)
            .and_then(|_| share(xb, me, peer, &format!("{home}/go"), b"0", false))
            .and_then(|_| share(xb, me, peer, &format!("{home}/ready"), b"0", false))
            .and_then(|_| match corrupter {
                Some(c) => share(xb, me, c, &format!("{home}/seen"), b"0", false),
                None => Ok(()),
            });
        if let Err(e) = setup {
            result("xs_setup", false, format!("{e:?}"));
            return;
        }
        // Watch: B writes `pong` to its ping node once it sees `ready`.
        let events = Rc::new(Cell::new(0u32));
        let ev = events.clone();
        let ping = format!("{phome}/ping");
        let watched = xb.watch(&ping, move |_| ev.set(ev.get() + 1));
        let _ = xb.write(Tx::NONE, &format!("{home}/ready"), b"1");
        let fired = watched.is_ok()
            && (|| -> Result<bool, XenError> {
                let end = time::now_ns() + PEER_WAIT_NS;
                while time::now_ns() < end {
                    xb.wait_event()?;
                    xb.dispatch();
                    if xb.read(Tx::NONE, &ping).as_deref() == Ok(b"pong".as_slice()) {
                        // The store queued the write's watch event before the read's reply;
                        // the read stashed it: run it before counting.
                        xb.dispatch();
                        return Ok(true);
                    }
                }
                Ok(false)
            })()
            .unwrap_or(false);
        result(
            "xs_watch_fires_for_peer_write",
            fired && events.get() >= 2,
            format!("{} event(s) on {ping}", events.get()),
        );
        // Transaction conflict: B increments the counter between our read and our commit.
        let counter = format!("{home}/counter");
        let go = format!("{home}/go");
        let done = format!("{phome}/done");
        let mut attempts = 0u32;
        let r = xb.transaction(5, |xb, tx| {
            attempts += 1;
            let v: u32 = core::str::from_utf8(&xb.read(tx, &counter)?)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(XenError::EINVAL)?;
            if attempts == 1 {
                xb.write(Tx::NONE, &go, b"1")?;
                wait_for(xb, &done, |v| v == b"1")?;
            }
            xb.write(tx, &counter, format!("{}", v + 1).as_bytes())
        });
        let fin = xb.read(Tx::NONE, &counter);
        result(
            "xs_txn_conflict_retried",
            r.is_ok() && attempts == 2 && fin.as_deref() == Ok(b"2".as_slice()),
            format!(
                "commit {r:?} after {attempts} attempt(s); counter {:?}",
                fin.map(|v| String::from_utf8_lossy(&v).into_owned())
            ),
        );
        // The peer may go now (its nodes go with it).
        let _ = xb.write(Tx::NONE, &go, b"2");
        throughput(xb, &home);
        if let Some(c) = corrupter {
            let back = format!("/local/domain/{c}/back");
            let seen = wait_for(xb, &back, |v| v == b"1");
            let _ = xb.write(Tx::NONE, &format!("{home}/seen"), b"1");
            let x = format!("{home}/data/after");
            let ok = seen.is_ok()
                && xb.write(Tx::NONE, &x, b"still").is_ok()
                && xb.read(Tx::NONE, &x).as_deref() == Ok(b"still".as_slice());
            result(
                "xs_others_go_on_after_corrupt_client",
                ok,
                format!("corrupter back: {seen:?}"),
            );
        }
    }

    fn throughput(xb: &mut Bus, home: &str) {
        const N: u64 = 500;
        let x = format!("{home}/data/x");
        let t0 = time::now_ns();
        let mut ok = true;
        for _ in 0..N {
            ok &= xb.read(Tx::NONE, &x).is_ok();
        }
        let t1 = time::now_ns();
        for i in 0..N {
            ok &= xb.write(Tx::NONE, &x, format!("{i}").as_bytes()).is_ok();
        }
        let t2 = time::now_ns();
        let rate = |ns: u64| N * 1_000_000_000 / ns.max(1);
        result("xs_ring_throughput", ok, format!("{N} reads, {N} writes"));
        println!("METRIC xs_ring_read_ops {} ops/s", rate(t1 - t0));
        println!("METRIC xs_ring_write_ops {} ops/s", rate(t2 - t1));
    }

    fn role_b(xb: &mut Bus, me: DomId, peer: DomId) {
        let home = format!("/local/domain/{me}");
        let phome = format!("/local/domain/{peer}");
        basics(xb, &home);
        let setup = share(xb, me, peer, &format!("{home}/ping"), b"wait", false)
            .and_then(|_| share(xb, me, peer, &format!("{home}/done"), b"0", false));
        if let Err(e) = setup {
            result("xs_setup", false, format!("{e:?}"));
            return;
        }
        let r = wait_for(xb, &format!("{phome}/ready"), |v| v == b"1")
            .and_then(|_| xb.write(Tx::NONE, &format!("{home}/ping"), b"pong"));
        result("xs_peer_ping_written", r.is_ok(), format!("{r:?}"));
        let counter = format!("{phome}/counter");
        let r = wait_for(xb, &format!("{phome}/go"), |v| v == b"1").and_then(|_| {
            xb.transaction(5, |xb, tx| {
                let v: u32 = core::str::from_utf8(&xb.read(tx, &counter)?)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(XenError::EINVAL)?;
                xb.write(tx, &counter, format!("{}", v + 1).as_bytes())
            })
        });
        let d = xb.write(Tx::NONE, &format!("{home}/done"), b"1");
        result(
            "xs_txn_peer_committed",
            r.is_ok() && d.is_ok(),
            format!("{r:?} {d:?}"),
        );
        // Stay until A has seen `done` (our nodes go when we do).
        let _ = wait_for(xb, &format!("{phome}/go"), |v| v == b"2");
    }

    fn role_corrupt(si: &StartInfo, watcher: DomId) {
        let me = si.domid;
        let port = si.xenstore_evtchn;
        let home = format!("/local/domain/{me}");
        let Some(mut xb) = connect(si) else { return };
        let w = share(&mut xb, me, watcher, &format!("{home}/back"), b"0", false);
        result("xs_corrupt_client_connected", w.is_ok(), format!("{w:?}"));
        drop(xb);
        let Some(mem) = page() else { return };
        let Ok(mut ring) = ClientRing::new(mem) else {
            result("xs_corrupt_dropped", false, "ring page unusable");
            return;
        };
        // An index pair no ring can hold: the server must give up on us.
        let cons = ring.page().load_u32(offsets::REQ_CONS);
        ring.page()
            .store_u32(offsets::REQ_PROD, cons.wrapping_add(RING_SIZE as u32 + 100));
        let _ = evtchn::send(port);
        let mut waiter = Waiter::new();
        let end = time::now_ns() + PEER_WAIT_NS;
        let mut err = 0;
        while err == 0 && time::now_ns() < end {
            let _ = waiter.wait_until(port, time::now_ns() + 10 * MS);
            err = ring.page().load_u32(offsets::ERROR);
        }
        result("xs_corrupt_dropped", err != 0, format!("error field {err}"));
        // The way back: the reconnection handshake, then a fresh client.
        let asked = ring.request_reconnect();
        let _ = evtchn::send(port);
        let mut back = false;
        while asked && !back && time::now_ns() < end {
            let _ = waiter.wait_until(port, time::now_ns() + 10 * MS);
            back = ring.reconnected();
        }
        if !back {
            result("xs_corrupt_reconnected", false, "no reconnection");
            return;
        }
        let mut xb = Xenbus::new(RingTransport::new(ring, EvtchnSignal::new(port)));
        let r = xb.write(Tx::NONE, &format!("{home}/back"), b"1");
        result("xs_corrupt_reconnected", r.is_ok(), format!("{r:?}"));
        // Stay until the watcher has seen `back` (our nodes go when we do).
        let _ = wait_for(&mut xb, &format!("/local/domain/{watcher}/seen"), |v| {
            v == b"1"
        });
    }

    pub fn main(si: &'static StartInfo) {
        let cmd = si.cmdline();
        let id = |k| param(cmd, k).and_then(|v| v.parse::<DomId>().ok());
        match (param(cmd, "role"), id("peer"), id("watcher")) {
            (Some("a"), Some(peer), _) => {
                if let Some(mut xb) = connect(si) {
                    role_a(&mut xb, si.domid, peer, id("corrupter"));
                }
            }
            (Some("b"), Some(peer), _) => {
                if let Some(mut xb) = connect(si) {
                    role_b(&mut xb, si.domid, peer);
                }
            }
            (Some("corrupt"), _, Some(w)) => role_corrupt(si, w),
            _ => result("xs_client_args", false, format!("bad command line {cmd:?}")),
        }
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("xs-client-dom is a Bulkhead domain: build it with --target x86_64-unknown-none");
    std::process::exit(2);
}
