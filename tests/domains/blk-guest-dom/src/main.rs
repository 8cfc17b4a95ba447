//! blk-guest-dom: a guest with a disk behind the block backend domain, through dom-rt's
//! [`Blkfront`](dom_rt::blkfront::Blkfront). Prints `RESULT <name> pass|fail <details>` per
//! check and `METRIC` lines for the benchmarks, then closes the device and powers off.
//!
//! - `blk_connect`: the xenbus handshake with the backend;
//! - `blk_pattern`: a seeded pattern written over the disk (mixed sizes and offsets, with
//!   flushes), read back and compared with the model;
//! - benchmarks (`METRIC blk_<tag>_randread_4k_iops_qd1`, `..._qd32`,
//!   `blk_<tag>_randwrite_4k_iops_qd32`, `blk_<tag>_seq_1m_mbps`; `tag=` on the command line,
//!   default `ram`);
//! - `blk_close`: Closing/Closed with the backend.
//!
//! `role=restart` replaces the pattern and benchmarks with the restart-without-loss
//! scenario (`restart.rs`); `role=hotplug` starts without a disk and takes the disks
//! attached and detached while it runs (`hotplug.rs`).
//!
//! The device is the first under `device/vbd` (written by the toolstack), or, with
//! `backend=<domid>` on the command line, device 51712 whose frontend directory this guest
//! writes itself (systems without a toolstack writing device entries). `queues=`,
//! `order=`, `persistent=0`, `indirect=0` shape the negotiation.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
dom_rt::entry!(guest::main);

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod restart;

#[cfg(target_os = "none")]
mod hostile;

#[cfg(target_os = "none")]
mod hotplug;

#[cfg(target_os = "none")]
mod guest {
    use alloc::format;
    use alloc::string::String;
    use alloc::vec;
    use core::fmt::Display;

    use dom_rt::blkfront::domain::{DomainEvents, DomainGrants, XenbusStore};
    use dom_rt::blkfront::{BlkError, Blkfront, BlockDevice, FrontConfig};
    use dom_rt::xenbus::Tx;
    use dom_rt::{StartInfo, XenError, println, time};
    use shared_abi::DomId;

    type Bus = dom_rt::xenbus::DomainBus;
    type Front = Blkfront<DomainGrants, DomainEvents>;

    const DEVID: u32 = 51712;
    const BENCH_NS: u64 = 500_000_000;

    fn result(name: &str, ok: bool, details: impl Display) {
        let v = if ok { "pass" } else { "fail" };
        println!("RESULT {name} {v} {details}");
    }

    /// Self-layout: the frontend directory a toolstack would write, readable by `backend`.
    fn write_frontend_dir(xb: &mut Bus, me: DomId, backend: DomId) -> Result<String, XenError> {
        let dir = format!("/local/domain/{me}/device/vbd/{DEVID}");
        let be = format!("/local/domain/{backend}/backend/vbd/{me}/{DEVID}");
        let (be_id, devid) = (format!("{backend}"), format!("{DEVID}"));
        // One transaction: the backend sees the whole directory or none of it.
        xb.transaction(dom_rt::xenbus::TRANSACTION_TRIES, |xb, tx| {
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
        })?;
        Ok(dir)
    }

    /// The first device under `device/vbd` (the toolstack may still be writing it: waits up
    /// to 10 s).
    fn find_device(xb: &mut Bus, me: DomId) -> Result<String, String> {
        let base = format!("/local/domain/{me}/device/vbd");
        let end = time::now_ns() + 60_000_000_000;
        let mut last = Err(XenError::ENOENT);
        while time::now_ns() < end {
            last = xb.directory(Tx::NONE, &base);
            // Probed once its state reads Initialising, as Linux's xenbus does.
            if let Ok(v) = &last
                && let Some(d) = v.first()
                && xb.read(Tx::NONE, &format!("{base}/{d}/state")).as_deref() == Ok(b"1")
            {
                return Ok(format!("{base}/{d}"));
            }
            let _ = time::sleep(5_000_000);
        }
        // Say what the store shows this domain on the way down.
        let mut seen = String::new();
        let mut p = base.clone();
        while p.len() > "/local/domain".len() {
            let perms = xb.request(
                shared_abi::xenstore::MsgType::GetPerms,
                Tx::NONE,
                format!("{p}\0").as_bytes(),
            );
            seen.push_str(&format!(
                " {p}: {:?}",
                perms.map(|v| String::from_utf8_lossy(&v).into_owned())
            ));
            p = String::from(p.rsplit_once('/').map_or("", |x| x.0));
        }
        Err(format!("no device under {base}: {last:?};{seen}"))
    }

    /// xorshift64* (the pattern's generator; `restart` draws from it too).
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    pub(crate) fn fill(buf: &mut [u8], seed: u64) {
        let mut r = Rng(seed | 1);
        for c in buf.chunks_mut(8) {
            let v = r.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    fn pattern(f: &mut Front) -> Result<String, String> {
        let ss = f.sector_size() as usize;
        let disk = f.sectors() as usize * ss;
        let mut model = vec![0u8; disk];
        let sizes = [
            512usize,
            4096,
            1536,
            45056,
            45568,
            131_072,
            1 << 20,
            3584,
            65536,
        ];
        let mut rng = Rng(0x5EED_B10C);
        let mut writes = 0;
        let mut flushes = 0;
        for (i, &size) in sizes.iter().cycle().take(120).enumerate() {
            let size = size.max(ss) / ss * ss;
            if size > disk {
                continue;
            }
            let sector = rng.next() % ((disk - size) / ss + 1) as u64;
            let off = sector as usize * ss;
            fill(&mut model[off..off + size], i as u64 + 1);
            f.write(sector, &model[off..off + size])
                .map_err(|e| format!("write {size} at sector {sector}: {e}"))?;
            writes += 1;
            if i % 9 == 0 {
                f.flush().map_err(|e| format!("flush: {e}"))?;
                flushes += 1;
            }
        }
        f.flush().map_err(|e| format!("flush: {e}"))?;
        let chunk = (1 << 20).min(disk);
        let mut buf = vec![0u8; chunk];
        let mut off = 0;
        while off < disk {
            let len = chunk.min(disk - off);
            f.read((off / ss) as u64, &mut buf[..len])
                .map_err(|e| format!("read at {off}: {e}"))?;
            if buf[..len] != model[off..off + len] {
                let bad = (0..len).find(|&i| buf[i] != model[off + i]).unwrap_or(0);
                return Err(format!("mismatch at byte {}", off + bad));
            }
            off += len;
        }
        Ok(format!(
            "{writes} writes, {flushes} flushes, {disk} bytes verified"
        ))
    }

    fn secs(ns: u64) -> f64 {
        ns as f64 / 1e9
    }

    /// Random 4 KiB operations at queue depth `qd` for about BENCH_NS: operations per second.
    fn rand_iops(f: &mut Front, write: bool, qd: usize) -> Result<f64, BlkError> {
        let blocks = f.sectors() * u64::from(f.sector_size()) / 4096;
        let per = 4096 / u64::from(f.sector_size());
        let data = vec![0xA5u8; 4096];
        let mut rng = Rng(0xBE9C);
        let mut done = 0u64;
        let mut inflight = 0;
        let t0 = time::now_ns();
        loop {
            let elapsed = time::now_ns() - t0;
            while inflight < qd && elapsed < BENCH_NS {
                let sector = (rng.next() % blocks) * per;
                if write {
                    f.submit_write(sector, &data)?;
                } else {
                    f.submit_read(sector, 4096)?;
                }
                inflight += 1;
            }
            match f.wait_any() {
                Some(c) => {
                    c.result?;
                    inflight -= 1;
                    done += 1;
                }
                None => break,
            }
        }
        Ok(done as f64 / secs(time::now_ns() - t0))
    }

    /// Sequential 1 MiB reads over the disk for about BENCH_NS: MB/s.
    fn seq_mbps(f: &mut Front) -> Result<f64, BlkError> {
        let chunk = 1usize << 20;
        let per = (chunk / f.sector_size() as usize) as u64;
        let n = (f.sectors() / per).max(1);
        let mut buf = vec![0u8; chunk];
        let mut bytes = 0u64;
        let t0 = time::now_ns();
        let mut i = 0;
        while time::now_ns() - t0 < BENCH_NS {
            f.read((i % n) * per, &mut buf)?;
            bytes += chunk as u64;
            i += 1;
        }
        Ok(bytes as f64 / 1e6 / secs(time::now_ns() - t0))
    }

    fn bench(f: &mut Front, tag: &str) {
        let runs: [(&str, bool, usize); 3] = [
            ("randread_4k_iops_qd1", false, 1),
            ("randread_4k_iops_qd32", false, 32),
            ("randwrite_4k_iops_qd32", true, 32),
        ];
        for (name, write, qd) in runs {
            match rand_iops(f, write, qd) {
                Ok(v) => println!("METRIC blk_{tag}_{name} {v:.0} ops/s"),
                Err(e) => result(&format!("blk_{tag}_{name}"), false, e),
            }
        }
        match seq_mbps(f) {
            Ok(v) => println!("METRIC blk_{tag}_seq_1m_mbps {v:.1} MB/s"),
            Err(e) => result(&format!("blk_{tag}_seq_1m_mbps"), false, e),
        }
    }

    pub fn main(si: &'static StartInfo) {
        let cmdline = si.cmdline();
        if dom_rt::cmdline_param(cmdline, "role") == Some("hostile") {
            return crate::hostile::main(si);
        }
        let Some(mut xb) = dom_rt::xenbus::connect_own_store(si) else {
            result("blk_connect", false, "no xenstore connection");
            return;
        };
        let me = si.domid;
        if dom_rt::cmdline_param(cmdline, "role") == Some("killer") {
            crate::restart::killer(&mut xb, cmdline);
            return;
        }
        if dom_rt::cmdline_param(cmdline, "role") == Some("hotplug") {
            crate::hotplug::run(si, &mut xb, cmdline);
            return;
        }
        let dir =
            match dom_rt::cmdline_param(cmdline, "backend").and_then(|b| b.parse::<DomId>().ok()) {
                Some(b) => write_frontend_dir(&mut xb, me, b)
                    .map_err(|e| format!("writing the frontend dir: {e:?}")),
                None => find_device(&mut xb, me),
            };
        let dir = match dir {
            Ok(d) => d,
            Err(e) => {
                result("blk_connect", false, e);
                return;
            }
        };
        let mut cfg = FrontConfig::new(&dir);
        cfg.max_queues = dom_rt::cmdline_param(cmdline, "queues")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        cfg.ring_page_order = dom_rt::cmdline_param(cmdline, "order")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        cfg.persistent = dom_rt::cmdline_param(cmdline, "persistent") != Some("0");
        if dom_rt::cmdline_param(cmdline, "indirect") == Some("0") {
            cfg.max_indirect_segments = 0;
        }
        cfg.wait_rounds = 20_000;
        let connected = {
            let mut s = XenbusStore { xb: &mut xb };
            Blkfront::connect(&mut s, DomainGrants::all(), DomainEvents::default(), &cfg)
        };
        let mut f = match connected {
            Ok(f) => f,
            Err(e) => {
                result("blk_connect", false, format!("{dir}: {e}"));
                return;
            }
        };
        let i = *f.info();
        result(
            "blk_connect",
            true,
            format!(
                "{dir}: backend {} {} sectors of {} B, queues {}, ring order {}, persistent {}, segments {}, flush {}",
                i.backend_id,
                i.sectors_512,
                i.sector_size,
                i.queues,
                i.ring_page_order,
                i.persistent,
                i.max_segments,
                i.flush
            ),
        );
        if dom_rt::cmdline_param(cmdline, "role") == Some("restart") {
            crate::restart::run(&mut xb, me, &mut f, &cfg);
        } else {
            match pattern(&mut f) {
                Ok(d) => result("blk_pattern", true, d),
                Err(e) => result("blk_pattern", false, e),
            }
            // `bench=0`: leave the disk holding exactly the pattern (a host-side check).
            if dom_rt::cmdline_param(cmdline, "bench") != Some("0") {
                let tag = dom_rt::cmdline_param(cmdline, "tag").unwrap_or("ram");
                bench(&mut f, tag);
            }
        }
        let s = f.stats();
        println!(
            "blkfront: {} requests ({} indirect), {} grants, {} notifies, {} waits",
            s.requests, s.indirect_requests, s.grants, s.notifies, s.waits
        );
        let mut st = XenbusStore { xb: &mut xb };
        match f.close(&mut st, &dir, 5000) {
            Ok(()) => result("blk_close", true, "Closed"),
            Err(e) => result("blk_close", false, e),
        }
    }
}

#[cfg(not(target_os = "none"))]
fn main() {}
