//! `role=restart`: the guest side of the restart-without-loss scenario
//! (`tests/tests/blk.rs`). Writes a seeded pattern continuously (queue depth 8, mixed
//! sizes, a flush every 16 writes) while the backend domain is killed and restarted; when
//! the backend has been silent for a while it asks the store whether the toolstack
//! re-pointed the device ([`Blkfront::follow_backend`]), reconnects and has every request
//! without a response re-issued. It goes on until [`AFTER`] more writes were acknowledged by
//! the new backend, reads the whole disk back, and prints:
//!
//! - `blk_restart: N writes acknowledged, K before the backend went away, …, checksum H`
//!   (H: FNV-1a 64 over the expected disk, 64-bit little-endian words);
//! - `METRIC blk_restart_silence_ms`: from the last completion on the old backend (the kill
//!   lies within one request's time after it) to the first completion on the new one;
//! - `RESULT blk_restart pass|fail`.
//!
//! Write `i` (from 0): `(1 + r % 128) * 512` bytes (whole logical sectors) where `r` is the
//! i-th draw of xorshift64* from [`SEED`], at the next position of a log that starts over at
//! sector 0 when the write would not fit; its data is [`fill`] with `seed_of(i)`. The test
//! re-derives this on the host to check the disk image.
//!
//! Once [`MARK`] writes are acknowledged the guest writes `data/blk-restart` (readable by
//! everyone) under its xenstore home; `role=killer target=<domid> watch=<domid>` (another
//! instance of this binary, with `remote_shutdown`) waits for that node and then crashes
//! the backend (`SCHEDOP_remote_shutdown`, reason crash), so the kill is mid-run however
//! slowly the system boots. Both print the hypervisor's clock (`… at <ns> ns`) so the test
//! can report the time from the kill to the first completion on the new backend.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;

use dom_rt::blkfront::domain::{DomainEvents, DomainGrants, XenbusStore};
use dom_rt::blkfront::{Blkfront, BlockDevice, FrontConfig};
use dom_rt::xenbus::{Transport, Tx};
use dom_rt::{hypercall, println, time};
use shared_abi::DomId;

use crate::guest::{Rng, fill};

type Front = Blkfront<DomainGrants, DomainEvents>;

pub const SEED: u64 = 0x0B10_C4E5_7A47;
const QD: usize = 8;
const FLUSH_EVERY: u64 = 16;
/// Writes the new backend must acknowledge before the guest stops.
const AFTER: u64 = 300;
/// Silence after which the store is asked about the backend.
const STALL_NS: u64 = 20_000_000;
/// Acknowledged writes before the guest tells the killer to go.
const MARK: u64 = 200;
/// Give up waiting for a restart after this long.
const MAX_NS: u64 = 90_000_000_000;

fn seed_of(i: u64) -> u64 {
    SEED.wrapping_add(i).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn fnv(buf: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in buf.chunks(8) {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        h ^= u64::from_le_bytes(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn result(ok: bool, details: impl core::fmt::Display) {
    let v = if ok { "pass" } else { "fail" };
    println!("RESULT blk_restart {v} {details}");
}

/// Run the scenario on the connected device `f`.
pub fn run<T: Transport>(
    xb: &mut dom_rt::xenbus::Xenbus<T>,
    me: DomId,
    f: &mut Front,
    cfg: &FrontConfig,
) {
    match write_through_restart(xb, me, f, cfg) {
        Ok(d) => result(true, d),
        Err(e) => result(false, e),
    }
}

fn write_through_restart<T: Transport>(
    xb: &mut dom_rt::xenbus::Xenbus<T>,
    me: DomId,
    f: &mut Front,
    cfg: &FrontConfig,
) -> Result<String, String> {
    let ss = f.sector_size() as usize;
    let disk = f.sectors() as usize * ss;
    let mut model = vec![0u8; disk];
    let mut rng = Rng(SEED);
    // tag → the write's sequence number (None: a flush).
    let mut inflight: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    let (mut next, mut pos, mut acked, mut flushes) = (0u64, 0usize, 0u64, 0u64);
    let mut acked_before: Option<u64> = None;
    let (mut after, mut stalls) = (0u64, 0u64);
    let t0 = time::now_ns();
    let mut last_done = t0;
    let mut reconnected: Option<(u64, u64)> = None; // (silent since, reconnected at)
    let mut first_new: Option<u64> = None;
    let mut last_check = 0u64;
    let mut marked = false;
    loop {
        let now = time::now_ns();
        let submitting = !(reconnected.is_some() && after >= AFTER) && now - t0 < MAX_NS;
        while submitting && inflight.len() < QD {
            if next > 0
                && next.is_multiple_of(FLUSH_EVERY)
                && !inflight.values().any(Option::is_none)
            {
                let t = f.submit_flush().map_err(|e| format!("flush: {e}"))?;
                inflight.insert(t, None);
                flushes += 1;
                if inflight.len() >= QD {
                    break;
                }
            }
            let size = ((1 + (rng.next() % 128) as usize) * 512).max(ss) / ss * ss;
            if pos + size > disk {
                pos = 0;
            }
            fill(&mut model[pos..pos + size], seed_of(next));
            let t = f
                .submit_write((pos / ss) as u64, &model[pos..pos + size])
                .map_err(|e| format!("write {next}: {e}"))?;
            inflight.insert(t, Some(next));
            next += 1;
            pos += size;
        }
        if inflight.is_empty() {
            break;
        }
        if acked >= MARK && !marked {
            marked = true;
            let node = format!("/local/domain/{me}/data/blk-restart");
            let w = xb
                .write(Tx::NONE, &node, format!("{acked}").as_bytes())
                .and_then(|()| xb.set_perms(Tx::NONE, &node, &[&format!("r{me}")]));
            if let Err(e) = w {
                return Err(format!("writing {node}: {e:?}"));
            }
        }
        match f.wait_once() {
            Some(c) => {
                let kind = inflight.remove(&c.tag);
                c.result
                    .map_err(|e| format!("operation {kind:?} (tag {}): {e}", c.tag))?;
                let now = time::now_ns();
                last_done = now;
                if reconnected.is_some() && first_new.is_none() {
                    first_new = Some(now);
                    println!("blk_restart: first completion on the new backend at {now} ns");
                }
                if let Some(Some(_)) = kind {
                    acked += 1;
                    if reconnected.is_some() {
                        after += 1;
                    }
                }
            }
            None => {
                let now = time::now_ns();
                if now - last_done > STALL_NS && now - last_check > STALL_NS {
                    last_check = now;
                    stalls += 1;
                    let mut s = XenbusStore { xb: &mut *xb };
                    let asked = time::now_ns();
                    match f.follow_backend(&mut s, cfg) {
                        Ok(true) => {
                            if acked_before.is_none() {
                                acked_before = Some(acked);
                            }
                            let st = f.stats();
                            println!(
                                "blk_restart: reconnected to backend {} ({} ms after the last completion, seen re-pointed after {} ms, handshake {} ms; {acked} writes acknowledged before, {} in flight), {} requests re-issued",
                                f.info().backend_id,
                                (time::now_ns() - last_done) / 1_000_000,
                                (asked - last_done) / 1_000_000,
                                (time::now_ns() - asked) / 1_000_000,
                                inflight.len(),
                                st.reissued
                            );
                            reconnected = Some((last_done, time::now_ns()));
                        }
                        Ok(false) => {}
                        Err(e) => return Err(format!("reconnecting: {e}")),
                    }
                }
                if now - t0 > MAX_NS && reconnected.is_none() {
                    return Err(format!(
                        "the backend was never restarted ({acked} writes acknowledged)"
                    ));
                }
            }
        }
    }
    let Some((silent_since, _)) = reconnected else {
        return Err(format!(
            "the backend was never restarted ({acked} writes acknowledged)"
        ));
    };
    f.flush().map_err(|e| format!("final flush: {e}"))?;
    let chunk = (1 << 20).min(disk);
    let mut buf = vec![0u8; chunk];
    let mut off = 0;
    while off < disk {
        let len = chunk.min(disk - off);
        f.read((off / ss) as u64, &mut buf[..len])
            .map_err(|e| format!("read at {off}: {e}"))?;
        if buf[..len] != model[off..off + len] {
            let bad = (0..len).find(|&i| buf[i] != model[off + i]).unwrap_or(0);
            return Err(format!("read back: mismatch at byte {}", off + bad));
        }
        off += len;
    }
    if let Some(t) = first_new {
        let gap = (t - silent_since) as f64 / 1e6;
        println!("METRIC blk_restart_silence_ms {gap:.1} ms");
    }
    let st = f.stats();
    println!(
        "blk_restart: {acked} writes acknowledged, {} before the backend went away, {flushes} flushes, {stalls} silent checks, {} reconnect(s), {} re-issued, checksum {:016x}",
        acked_before.unwrap_or(0),
        st.reconnects,
        st.reissued,
        fnv(&model)
    );
    Ok(format!(
        "{acked} writes (seq 0..{}) acknowledged and read back over {disk} bytes after {} reconnect(s)",
        next.saturating_sub(1),
        st.reconnects
    ))
}

/// `role=killer target=<domid> watch=<domid>`: wait (up to 10 minutes) until domain
/// `watch` wrote `data/blk-restart`, then crash domain `target`.
pub fn killer<T: Transport>(xb: &mut dom_rt::xenbus::Xenbus<T>, cmdline: &str) {
    let num = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse::<DomId>().ok())
    };
    let (Some(target), Some(watch)) = (num("target"), num("watch")) else {
        println!("RESULT killer fail expected target=<domid> watch=<domid>");
        return;
    };
    let node = format!("/local/domain/{watch}/data/blk-restart");
    let end = time::now_ns() + 600_000_000_000;
    loop {
        if xb.read(Tx::NONE, &node).is_ok() {
            break;
        }
        if time::now_ns() > end {
            println!("RESULT killer fail {node} never appeared");
            return;
        }
        let _ = time::sleep(2_000_000);
    }
    match hypercall::remote_shutdown(target, 3) {
        Ok(()) => {
            println!(
                "blk_restart: killed domain {target} at {} ns",
                time::now_ns()
            );
            println!("RESULT killer pass shut domain {target} down: crash");
        }
        Err(e) => println!("RESULT killer fail remote_shutdown of domain {target}: {e:?}"),
    }
}
