//! `role=hostile backend=<domid>`: a frontend that breaks the blkif protocol on purpose, to
//! check that the backend answers every bad request and disconnects a frontend that corrupts
//! its ring, while other frontends of the same backend go on.
//!
//! It does the xenbus handshake by hand (one order-0 ring, one event channel, no persistent
//! grants), drives the raw ring ([`FrontRing`]) and sends, one at a time, each waited for:
//! a good read (`OKAY`), reads past the end of the disk and with an overflowing sector
//! number, reserved / never-granted / absurd grant refs, `last_sect` beyond the page and
//! `first_sect > last_sect`, 0 and 12 direct segments, an indirect request with 4096
//! segments, `BLKIF_OP_RESERVED_1` and an undefined operation code (`EOPNOTSUPP`), an
//! indirect request with an undefined `indirect_op` (all `ERROR` unless said), then a good
//! read again (the ring goes on). Each prints `RESULT blk_hostile_<case> pass|fail`.
//! Finally it publishes a request producer index far beyond the ring and expects the backend
//! to go to Closing (`RESULT blk_hostile_disconnected`), answers Closed and waits for the
//! backend's Closed (`RESULT blk_hostile_closed`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use dom_rt::blkfront::domain::{DomPage, DomainEvents, DomainGrants};
use dom_rt::blkfront::{Events, Grants};
use dom_rt::xenbus::{TRANSACTION_TRIES, Tx};
use dom_rt::{StartInfo, XenError, println, time};
use shared_abi::DomId;
use shared_abi::blkif::{
    BlkifRequest, BlkifRequestIndirect, BlkifRequestSegment, BlkifRequestSlot, BlkifResponse,
    DirectSegments, IndirectGrefs, op, rsp,
};
use shared_abi::event_channel::EvtchnPort;
use shared_abi::ring::{FrontRing, header};

type Bus = dom_rt::xenbus::DomainBus;
type Ring = FrontRing<BlkifRequestSlot, BlkifResponse>;

const DEVID: u32 = 51712;
const MS: u64 = 1_000_000;

fn result(name: &str, ok: bool, details: impl core::fmt::Display) {
    let v = if ok { "pass" } else { "fail" };
    println!("RESULT blk_hostile_{name} {v} {details}");
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

/// The hostile frontend's connection: its ring, port and pages.
struct Conn {
    ring: Ring,
    port: EvtchnPort,
    ev: DomainEvents,
    data_ref: u32,
    sectors: u64,
    max_indirect: u64,
    next_id: u64,
}

fn handshake(xb: &mut Bus, me: DomId, backend: DomId) -> Result<(Conn, String, String), String> {
    let dir = format!("/local/domain/{me}/device/vbd/{DEVID}");
    let be = format!("/local/domain/{backend}/backend/vbd/{me}/{DEVID}");
    let (be_id, devid) = (format!("{backend}"), format!("{DEVID}"));
    xb.transaction(TRANSACTION_TRIES, |xb, tx| {
        xb.mkdir(tx, &dir)?;
        xb.set_perms(tx, &dir, &[&format!("n{me}"), &format!("r{backend}")])?;
        for (k, v) in [
            ("backend", be.as_str()),
            ("backend-id", &be_id),
            ("virtual-device", &devid),
            ("device-type", "disk"),
            ("state", "1"),
        ] {
            xb.write(tx, &format!("{dir}/{k}"), v.as_bytes())?;
        }
        Ok(())
    })
    .map_err(|e: XenError| format!("writing {dir}: {e:?}"))?;
    wait_state(xb, &format!("{be}/state"), &["2"], 20_000)?;
    let mut g = DomainGrants::all();
    let mut ev = DomainEvents::default();
    let (mem, pages) = g.alloc_ring(0).map_err(|e| format!("ring: {e}"))?;
    let page0: &DomPage = pages.first().ok_or("no ring page")?;
    let ring_ref = g
        .grant(backend, page0, false)
        .map_err(|e| format!("grant ring: {e}"))?;
    let data = g.alloc_page().map_err(|e| format!("data page: {e}"))?;
    let data_ref = g
        .grant(backend, &data, false)
        .map_err(|e| format!("grant data: {e}"))?;
    // The data page stays granted for the domain's life (a `DomPage` is only an address;
    // the page is freed only through `Grants::free_page`).
    let ring = Ring::new(mem).map_err(|e| format!("ring init: {e}"))?;
    let port = ev
        .alloc_unbound(backend)
        .map_err(|e| format!("event channel: {e}"))?;
    let (rr, pp) = (format!("{ring_ref}"), format!("{port}"));
    xb.transaction(TRANSACTION_TRIES, |xb, tx| {
        for (k, v) in [
            ("ring-ref", rr.as_str()),
            ("event-channel", &pp),
            ("protocol", "x86_64-abi"),
            ("state", "3"),
        ] {
            xb.write(tx, &format!("{dir}/{k}"), v.as_bytes())?;
        }
        Ok(())
    })
    .map_err(|e: XenError| format!("writing the ring keys: {e:?}"))?;
    wait_state(xb, &format!("{be}/state"), &["4"], 20_000)?;
    let num = |xb: &mut Bus, k: &str| -> u64 {
        xb.read_string(Tx::NONE, &format!("{be}/{k}"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let sectors = num(xb, "sectors");
    let max_indirect = num(xb, "feature-max-indirect-segments");
    xb.write(Tx::NONE, &format!("{dir}/state"), b"4")
        .map_err(|e| format!("state 4: {e:?}"))?;
    Ok((
        Conn {
            ring,
            port,
            ev,
            data_ref,
            sectors,
            max_indirect,
            next_id: 0x4057_0000,
        },
        dir,
        be,
    ))
}

fn seg(gref: u32, first: u8, last: u8) -> BlkifRequestSegment {
    BlkifRequestSegment {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

/// A read/write-layout request with `segs` in its first slots and `nr` claimed.
fn rw(operation: u8, nr: u8, sector: u64, segs: &[BlkifRequestSegment]) -> BlkifRequest {
    let mut s = DirectSegments::default();
    for (d, x) in s.0.iter_mut().zip(segs) {
        *d = *x;
    }
    BlkifRequest {
        operation,
        nr_segments: nr,
        handle: 0,
        id: 0,
        sector_number: sector,
        seg: s,
    }
}

impl Conn {
    /// Send one request slot (its id set to a fresh one) and wait up to 5 s for its answer:
    /// the response status.
    fn send(&mut self, mut slot: BlkifRequestSlot) -> Result<i16, String> {
        let id = self.next_id;
        self.next_id += 1;
        slot.0[8..16].copy_from_slice(&id.to_le_bytes());
        self.ring
            .push_request(&slot)
            .map_err(|e| format!("push: {e}"))?;
        if self.ring.push_requests_and_check_notify() {
            let _ = self.ev.notify(self.port);
        }
        let end = time::now_ns() + 5000 * MS;
        while time::now_ns() < end {
            match self.ring.get_response() {
                Ok(Some(r)) if r.id == id => return Ok(r.status),
                Ok(Some(r)) => return Err(format!("response for id {:#x}, want {id:#x}", r.id)),
                Ok(None) => self.ev.wait(&[self.port]),
                Err(e) => return Err(format!("ring: {e}")),
            }
        }
        Err(String::from("no response within 5 s"))
    }

    fn case(&mut self, name: &str, slot: BlkifRequestSlot, want: i16) -> bool {
        let got = self.send(slot);
        let ok = got == Ok(want);
        let say = |s: i16| match s {
            rsp::OKAY => "OKAY",
            rsp::ERROR => "ERROR",
            rsp::EOPNOTSUPP => "EOPNOTSUPP",
            _ => "undefined",
        };
        match got {
            Ok(s) => result(
                name,
                ok,
                format!("status {s} {} (want {})", say(s), say(want)),
            ),
            Err(e) => result(name, false, e),
        }
        ok
    }
}

pub fn main(si: &'static StartInfo) {
    let cmdline = si.cmdline();
    let Some(backend) =
        dom_rt::cmdline_param(cmdline, "backend").and_then(|b| b.parse::<DomId>().ok())
    else {
        result("connect", false, "role=hostile needs backend=<domid>");
        return;
    };
    let Some(mut xb) = dom_rt::xenbus::connect_own_store(si) else {
        result("connect", false, "no xenstore connection");
        return;
    };
    let (mut c, dir, be) = match handshake(&mut xb, si.domid, backend) {
        Ok(x) => x,
        Err(e) => {
            result("connect", false, e);
            return;
        }
    };
    result(
        "connect",
        c.sectors > 0,
        format!(
            "{dir}: {} sectors, feature-max-indirect-segments {}",
            c.sectors, c.max_indirect
        ),
    );
    let d = c.data_ref;
    let good = BlkifRequestSlot::from_rw(&rw(op::READ, 1, 0, &[seg(d, 0, 7)]));
    let indirect = |indirect_op: u8, nr: u16| {
        BlkifRequestSlot::from_indirect(&BlkifRequestIndirect {
            operation: op::INDIRECT,
            indirect_op,
            nr_segments: nr,
            id: 0,
            sector_number: 0,
            handle: 0,
            indirect_grefs: IndirectGrefs([d; 8]),
        })
    };
    let mut slot_op = BlkifRequestSlot::from_rw(&rw(op::READ, 1, 0, &[seg(d, 0, 7)]));
    slot_op.0[0] = 0xEE;
    let reserved = BlkifRequestSlot::from_rw(&rw(op::RESERVED_1, 1, 0, &[seg(d, 0, 7)]));
    let end = c.sectors;
    let cases: Vec<(&str, BlkifRequestSlot, i16)> = Vec::from([
        ("good_read", good, rsp::OKAY),
        (
            "sector_past_end",
            BlkifRequestSlot::from_rw(&rw(op::READ, 1, end, &[seg(d, 0, 7)])),
            rsp::ERROR,
        ),
        (
            "range_straddles_end",
            BlkifRequestSlot::from_rw(&rw(op::WRITE, 1, end.saturating_sub(4), &[seg(d, 0, 7)])),
            rsp::ERROR,
        ),
        (
            "sector_overflow",
            BlkifRequestSlot::from_rw(&rw(op::READ, 1, u64::MAX - 2, &[seg(d, 0, 7)])),
            rsp::ERROR,
        ),
        (
            "reserved_gref",
            BlkifRequestSlot::from_rw(&rw(op::READ, 1, 0, &[seg(5, 0, 7)])),
            rsp::ERROR,
        ),
        (
            "ungranted_gref",
            BlkifRequestSlot::from_rw(&rw(op::READ, 1, 0, &[seg(1999, 0, 7)])),
            rsp::ERROR,
        ),
        (
            "absurd_gref",
            BlkifRequestSlot::from_rw(&rw(op::WRITE, 1, 0, &[seg(u32::MAX, 0, 7)])),
            rsp::ERROR,
        ),
        (
            "last_sect_outside_page",
            BlkifRequestSlot::from_rw(&rw(op::READ, 1, 0, &[seg(d, 0, 8)])),
            rsp::ERROR,
        ),
        (
            "sects_reversed",
            BlkifRequestSlot::from_rw(&rw(op::READ, 1, 0, &[seg(d, 5, 2)])),
            rsp::ERROR,
        ),
        (
            "zero_segments",
            BlkifRequestSlot::from_rw(&rw(op::READ, 0, 0, &[])),
            rsp::ERROR,
        ),
        (
            "twelve_direct_segments",
            BlkifRequestSlot::from_rw(&rw(op::READ, 12, 0, &[seg(d, 0, 7); 11])),
            rsp::ERROR,
        ),
        (
            "indirect_4096_segments",
            indirect(op::READ, 4096),
            if c.max_indirect > 0 {
                rsp::ERROR
            } else {
                rsp::EOPNOTSUPP
            },
        ),
        ("reserved_operation", reserved, rsp::EOPNOTSUPP),
        ("garbage_operation", slot_op, rsp::EOPNOTSUPP),
        (
            "garbage_indirect_op",
            indirect(7, 1),
            if c.max_indirect > 0 {
                rsp::ERROR
            } else {
                rsp::EOPNOTSUPP
            },
        ),
        ("good_read_after", good, rsp::OKAY),
    ]);
    let mut passed = 0;
    let n = cases.len();
    for (name, slot, want) in cases {
        passed += usize::from(c.case(name, slot, want));
    }
    println!("hostile: {passed} of {n} bad-request cases answered as expected");
    // Corrupt the ring: a request producer far beyond anything the ring can hold.
    let mem = c.ring.mem();
    let prod = mem.read_u32(header::REQ_PROD).unwrap_or(0);
    let bogus = prod.wrapping_add(1000);
    let _ = mem.write_u32(header::REQ_PROD, bogus);
    let _ = c.ev.notify(c.port);
    println!("hostile: req_prod {prod} -> {bogus}, backend notified");
    match wait_state(&mut xb, &format!("{be}/state"), &["5", "6"], 10_000) {
        Ok(s) => result(
            "disconnected",
            true,
            format!("backend state {s} after req_prod {prod} -> {bogus}"),
        ),
        Err(e) => result("disconnected", false, e),
    }
    if let Err(e) = xb.write(Tx::NONE, &format!("{dir}/state"), b"6") {
        result("closed", false, format!("writing state 6: {e:?}"));
        return;
    }
    match wait_state(&mut xb, &format!("{be}/state"), &["6"], 10_000) {
        Ok(_) => result("closed", true, "backend Closed"),
        Err(e) => result("closed", false, e),
    }
}
