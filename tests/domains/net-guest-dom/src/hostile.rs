//! `role=hostile backend=<domid> mac=<mac>`: a frontend that breaks the netif protocol on
//! purpose, to check that the backend answers every bad tx request with `ERROR` (each slot of
//! a bad packet too) and disconnects a frontend that corrupts its ring, while the other vifs
//! of the same backend go on.
//!
//! It does the xenbus handshake by hand (one queue, order-0 tx and rx rings, one event
//! channel, rx-copy; no rx buffers are ever posted), drives the raw tx ring ([`FrontRing`])
//! and sends, one packet at a time, each waited for: a good 60-byte frame (`OKAY`, or
//! `DROPPED` if the switch had no use for it), reserved / never-granted / absurd grant refs,
//! an offset that runs the frame past its page and one beyond the page, a frame shorter than
//! an Ethernet header, a 65535-byte single-slot frame, fragments adding up to more than the
//! packet's size, 24 data slots (over the slot limit), undefined flag bits, then a good frame
//! again (the ring goes on); with `secs=<n>` it repeats the whole list until n seconds have
//! passed, so that the abuse overlaps other guests' traffic. Each prints `RESULT net_hostile_<case> pass|fail`. Finally it
//! publishes a request producer index far beyond the ring and expects the backend to leave
//! Connected (`RESULT net_hostile_disconnected`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use dom_rt::front::{DomainEvents, DomainGrants, Events, Grants};
use dom_rt::xenbus::{TRANSACTION_TRIES, Tx};
use dom_rt::{StartInfo, XenError, println, time};
use shared_abi::DomId;
use shared_abi::event_channel::EvtchnPort;
use shared_abi::netif::{NetifTxRequest, NetifTxResponse, nettxf, rsp};
use shared_abi::ring::{FrontRing, header};

use crate::guest::{Bus, MS, num, param, write_frontend_dir};
use crate::wire::{parse_mac, test_frame};

type Ring = FrontRing<NetifTxRequest, NetifTxResponse>;

fn result(name: &str, ok: bool, details: impl core::fmt::Display) {
    let v = if ok { "pass" } else { "fail" };
    println!("RESULT net_hostile_{name} {v} {details}");
}

/// Wait up to `ms` for `path` to read one of `want`; the last value read.
fn wait_state(xb: &mut Bus, path: &str, want: &[&str], ms: u64) -> Result<String, String> {
    let end = time::now_ns() + ms * MS;
    let mut last = String::from("(unread)");
    while time::now_ns() < end {
        if let Ok(v) = xb.read_string(Tx::NONE, path) {
            if want.contains(&v.as_str()) {
                return Ok(v);
            }
            last = v;
        }
        let _ = time::sleep(5 * MS);
    }
    Err(format!("{path} reads {last}, want one of {want:?}"))
}

struct Conn {
    ring: Ring,
    port: EvtchnPort,
    ev: DomainEvents,
    data_ref: u32,
    next_id: u16,
}

fn handshake(
    xb: &mut Bus,
    me: DomId,
    backend: DomId,
    mac: &str,
) -> Result<(Conn, String, String), String> {
    let dir = write_frontend_dir(xb, me, backend, mac)
        .map_err(|e| format!("writing the frontend dir: {e:?}"))?;
    let be = format!("/local/domain/{backend}/backend/vif/{me}/0");
    wait_state(xb, &format!("{be}/state"), &["2"], 30_000)?;
    let mut g = DomainGrants::all();
    let mut ev = DomainEvents::default();
    let ring_ref = |g: &mut DomainGrants| {
        let (mem, pages) = g.alloc_ring(0).map_err(|e| format!("ring: {e}"))?;
        let page0 = pages.first().ok_or("no ring page")?;
        let r = g
            .grant(backend, page0, false)
            .map_err(|e| format!("grant ring: {e}"))?;
        Ok::<_, String>((mem, r))
    };
    let (tx_mem, tx_ref) = ring_ref(&mut g)?;
    let (_rx_mem, rx_ref) = ring_ref(&mut g)?;
    let data = g.alloc_page().map_err(|e| format!("data page: {e}"))?;
    let own = parse_mac(mac).unwrap_or([0, 0x16, 0x3e, 0, 0, 0x66]);
    g.write(&data, 0, &test_frame([0x02, 0, 0, 0, 0, 0x99], own, 60));
    // The page stays granted (read-only) for the domain's life.
    let data_ref = g
        .grant(backend, &data, true)
        .map_err(|e| format!("grant data: {e}"))?;
    let ring = Ring::new(tx_mem).map_err(|e| format!("ring init: {e}"))?;
    let port = ev
        .alloc_unbound(backend)
        .map_err(|e| format!("event channel: {e}"))?;
    let (t, r, p) = (format!("{tx_ref}"), format!("{rx_ref}"), format!("{port}"));
    xb.transaction(TRANSACTION_TRIES, |xb, tx| {
        for (k, v) in [
            ("tx-ring-ref", t.as_str()),
            ("rx-ring-ref", &r),
            ("event-channel", &p),
            ("request-rx-copy", "1"),
            ("feature-rx-notify", "1"),
            ("state", "4"),
        ] {
            xb.write(tx, &format!("{dir}/{k}"), v.as_bytes())?;
        }
        Ok(())
    })
    .map_err(|e: XenError| format!("writing the ring keys: {e:?}"))?;
    wait_state(xb, &format!("{be}/state"), &["4"], 30_000)?;
    Ok((
        Conn {
            ring,
            port,
            ev,
            data_ref,
            next_id: 0x100,
        },
        dir,
        be,
    ))
}

fn req(gref: u32, offset: u16, flags: u16, size: u16) -> NetifTxRequest {
    NetifTxRequest {
        gref,
        offset,
        flags,
        id: 0,
        size,
    }
}

fn say(s: i16) -> &'static str {
    match s {
        rsp::OKAY => "OKAY",
        rsp::ERROR => "ERROR",
        rsp::DROPPED => "DROPPED",
        rsp::NULL => "NULL",
        _ => "undefined",
    }
}

impl Conn {
    /// Push one packet's slots (fresh ids) and wait up to 5 s for a response to each: the
    /// statuses in slot order.
    fn send(&mut self, slots: &[NetifTxRequest]) -> Result<Vec<i16>, String> {
        let mut ids = Vec::new();
        for s in slots {
            let mut s = *s;
            s.id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            ids.push(s.id);
            self.ring
                .push_request(&s)
                .map_err(|e| format!("push: {e}"))?;
        }
        if self.ring.push_requests_and_check_notify() {
            let _ = self.ev.notify(self.port);
        }
        let mut out: Vec<Option<i16>> = alloc::vec![None; ids.len()];
        let end = time::now_ns() + 5000 * MS;
        while out.iter().any(Option::is_none) {
            if time::now_ns() > end {
                return Err(format!(
                    "{} of {} responses within 5 s",
                    out.iter().flatten().count(),
                    ids.len()
                ));
            }
            match self.ring.get_response() {
                Ok(Some(r)) => match ids.iter().position(|&i| i == r.id) {
                    Some(i) if out[i].is_none() => out[i] = Some(r.status),
                    _ => return Err(format!("response for unexpected id {:#x}", r.id)),
                },
                Ok(None) => self.ev.wait(&[self.port]),
                Err(e) => return Err(format!("ring: {e}")),
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Send one case: whether every slot was answered with one of `want`, and what came.
    fn case(&mut self, slots: &[NetifTxRequest], want: &[i16]) -> (bool, String) {
        match self.send(slots) {
            Ok(got) => {
                let ok = got.iter().all(|s| want.contains(s));
                let names: Vec<&str> = got.iter().map(|&s| say(s)).collect();
                let wants: Vec<&str> = want.iter().map(|&s| say(s)).collect();
                (
                    ok,
                    format!(
                        "{} slot(s) answered {} (want each of {})",
                        got.len(),
                        names.join(","),
                        wants.join("|")
                    ),
                )
            }
            Err(e) => (false, e),
        }
    }
}

pub fn main(si: &'static StartInfo, xb: &mut Bus) {
    let cmdline = si.cmdline();
    let Some(backend) = num::<DomId>(cmdline, "backend") else {
        result("connect", false, "role=hostile needs backend=<domid>");
        return;
    };
    let mac = param(cmdline, "mac").unwrap_or("00:16:3e:00:00:66");
    let (mut c, dir, be) = match handshake(xb, si.domid, backend, mac) {
        Ok(x) => x,
        Err(e) => {
            result("connect", false, e);
            return;
        }
    };
    result("connect", true, format!("{dir}: backend {be} Connected"));
    let d = c.data_ref;
    let good: &[i16] = &[rsp::OKAY, rsp::DROPPED];
    let err: &[i16] = &[rsp::ERROR];
    let more = nettxf::MORE_DATA;
    let mut many = Vec::from([req(d, 0, more, 24 * 60)]);
    for i in 1..24 {
        many.push(req(d, 0, if i == 23 { 0 } else { more }, 60));
    }
    let cases: Vec<(&str, Vec<NetifTxRequest>, &[i16])> = Vec::from([
        ("good_frame", Vec::from([req(d, 0, 0, 60)]), good),
        ("reserved_gref", Vec::from([req(3, 0, 0, 60)]), err),
        ("ungranted_gref", Vec::from([req(1999, 0, 0, 60)]), err),
        ("absurd_gref", Vec::from([req(u32::MAX, 0, 0, 60)]), err),
        ("frame_crosses_page", Vec::from([req(d, 4090, 0, 60)]), err),
        ("offset_beyond_page", Vec::from([req(d, 5000, 0, 60)]), err),
        ("shorter_than_header", Vec::from([req(d, 0, 0, 10)]), err),
        ("huge_single_slot", Vec::from([req(d, 0, 0, 0xFFFF)]), err),
        (
            "fragments_exceed_size",
            Vec::from([req(d, 0, more, 60), req(d, 0, 0, 100)]),
            err,
        ),
        ("slots_over_limit", many, err),
        ("undefined_flags", Vec::from([req(d, 0, 0x80, 60)]), err),
        ("good_frame_after", Vec::from([req(d, 0, 0, 60)]), good),
    ]);
    // Rounds of every case until `secs=` have passed (at least one), so the abuse overlaps
    // the other guests' traffic; a case passes if it was answered as wanted every time.
    let secs: u64 = num(cmdline, "secs").unwrap_or(0);
    let end = time::now_ns() + secs * 1000 * MS;
    let mut verdicts: Vec<(bool, String)> = cases.iter().map(|_| (true, String::new())).collect();
    let mut rounds = 0u64;
    loop {
        for ((_, slots, want), v) in cases.iter().zip(verdicts.iter_mut()) {
            let (ok, d) = c.case(slots, want);
            if v.0 {
                *v = (ok, d);
            }
        }
        rounds += 1;
        if time::now_ns() >= end || verdicts.iter().any(|v| !v.0) {
            break;
        }
    }
    let n = cases.len();
    let mut passed = 0;
    for ((name, _, _), (ok, d)) in cases.iter().zip(verdicts) {
        passed += usize::from(ok);
        result(name, ok, format!("{d}; {rounds} round(s)"));
    }
    println!(
        "net-guest: hostile: {passed} of {n} bad-request cases answered as expected in each of {rounds} round(s)"
    );
    let mem = c.ring.mem();
    let prod = mem.read_u32(header::REQ_PROD).unwrap_or(0);
    let bogus = prod.wrapping_add(1000);
    let _ = mem.write_u32(header::REQ_PROD, bogus);
    let _ = c.ev.notify(c.port);
    println!("net-guest: hostile: req_prod {prod} -> {bogus}, backend notified");
    match wait_state(xb, &format!("{be}/state"), &["5", "6"], 10_000) {
        Ok(s) => result(
            "disconnected",
            true,
            format!("backend state {s} after req_prod {prod} -> {bogus}"),
        ),
        Err(e) => result("disconnected", false, e),
    }
    let _ = xb.write(Tx::NONE, &format!("{dir}/state"), b"6");
}
