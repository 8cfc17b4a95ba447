//! `role=bench`: the passthrough reference for issue 7's block figures. The same workload the
//! blk guest runs through blkfront and blkback (`blk-guest-dom`'s benchmarks: random 4 KiB
//! reads at queue depth 1 and 32, random 4 KiB writes at depth 32, sequential 1 MiB reads, each
//! for about 0.5 s, same random sequence) run by this driver domain straight on its assigned
//! virtio-blk function, polled like blkback's virtio path (no interrupt). Prints
//! `METRIC blk_direct_virtio_randread_4k_iops_qd1`, `..._qd32`,
//! `blk_direct_virtio_randwrite_4k_iops_qd32` (ops/s) and `blk_direct_virtio_seq_1m_mbps`
//! (MB/s).
//!
//! Queue depth: `virtio-drivers` gives its block queue 16 descriptors and uses indirect
//! descriptors when offered (QEMU does), so at most 16 requests are in flight: "qd32" keeps
//! as many as the queue takes, up to 32 (the count is in the RESULT line).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use dom_rt::device::virtio::{DomHal, VirtioPci, VirtioTransport};
use dom_rt::{StartInfo, println, time};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};

type Blk = VirtIOBlk<DomHal, VirtioTransport>;

const BENCH_NS: u64 = 500_000_000;
/// A request the device has not completed after this long is lost.
const STUCK_NS: u64 = 5_000_000_000;

/// xorshift64* (the blk guest's generator, same seed: the same block sequence).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// One request's buffers; boxed so they stay put while the device holds them.
struct Slot {
    req: BlkReq,
    resp: BlkResp,
    buf: Vec<u8>,
    token: Option<u16>,
}

fn verr(what: &str) -> impl Fn(VirtioError) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

/// System time, never going backwards (a reading below the last one repeats the last one).
fn now() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let t = time::now_ns();
    LAST.fetch_max(t, Ordering::Relaxed).max(t)
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Random 4 KiB operations with up to `qd` in flight for about BENCH_NS: (ops/s, most in
/// flight at once).
fn rand_iops(blk: &mut Blk, write: bool, qd: usize) -> Result<(f64, usize), String> {
    let blocks = (blk.capacity() * 512 / 4096).max(1);
    let mut slots: Vec<Box<Slot>> = (0..qd)
        .map(|_| {
            Box::new(Slot {
                req: BlkReq::default(),
                resp: BlkResp::default(),
                buf: vec![0xA5u8; 4096],
                token: None,
            })
        })
        .collect();
    let mut rng = Rng(0xBE9C);
    // A drawn block the queue had no room for yet (keeps the guest's sequence).
    let mut pending: Option<u64> = None;
    let (mut done, mut inflight, mut most) = (0u64, 0usize, 0usize);
    let t0 = now();
    let mut last_progress = t0;
    loop {
        let t_now = now();
        let elapsed = t_now.saturating_sub(t0);
        // Fill every free slot the queue takes.
        if elapsed < BENCH_NS {
            for s in slots.iter_mut().filter(|s| s.token.is_none()) {
                let sector = *pending.get_or_insert_with(|| (rng.next() % blocks) * 8) as usize;
                let Slot { req, resp, buf, .. } = &mut **s;
                // SAFETY: the slot's req, buf and resp are boxed and neither touched nor
                // freed until `complete_*` for this token below (or the function fails, and
                // the device is never used again: the domain ends).
                let r = unsafe {
                    if write {
                        blk.write_blocks_nb(sector, req, buf, resp)
                    } else {
                        blk.read_blocks_nb(sector, req, buf, resp)
                    }
                };
                match r {
                    Ok(t) => {
                        pending = None;
                        s.token = Some(t);
                        inflight += 1;
                    }
                    Err(VirtioError::QueueFull) => break,
                    Err(e) => return Err(format!("submit: {e:?}")),
                }
            }
            most = most.max(inflight);
        }
        if inflight == 0 {
            break;
        }
        let Some(t) = blk.peek_used() else {
            if t_now.saturating_sub(last_progress) > STUCK_NS {
                return Err(format!("{inflight} request(s) not completed in 5 s"));
            }
            core::hint::spin_loop();
            continue;
        };
        let Some(s) = slots.iter_mut().find(|s| s.token == Some(t)) else {
            return Err(format!("the device completed unknown token {t}"));
        };
        let Slot { req, resp, buf, .. } = &mut **s;
        // SAFETY: the same buffers were passed for this token in `*_blocks_nb`.
        unsafe {
            if write {
                blk.complete_write_blocks(t, req, buf, resp)
            } else {
                blk.complete_read_blocks(t, req, buf, resp)
            }
        }
        .map_err(verr("completion"))?;
        s.token = None;
        inflight -= 1;
        done += 1;
        last_progress = now();
    }
    Ok((done as f64 / secs(now() - t0), most))
}

/// Sequential 1 MiB reads over the disk for about BENCH_NS: MB/s.
fn seq_mbps(blk: &mut Blk) -> Result<f64, String> {
    let chunk = 1usize << 20;
    let per = (chunk / 512) as u64;
    let n = (blk.capacity() / per).max(1);
    let mut buf = vec![0u8; chunk];
    let mut bytes = 0u64;
    let t0 = now();
    let mut i = 0;
    while now() - t0 < BENCH_NS {
        blk.read_blocks(((i % n) * per) as usize, &mut buf)
            .map_err(verr("1 MiB read"))?;
        bytes += chunk as u64;
        i += 1;
    }
    Ok(bytes as f64 / 1e6 / secs(now() - t0))
}

pub fn run(_si: &StartInfo) -> Result<String, String> {
    let dev = dom_rt::device::find(0x1af4, &[0x1001, 0x1042]).ok_or("no virtio-blk assigned")?;
    let pci = VirtioPci::open(dev).map_err(|e| format!("virtio-pci setup: {e}"))?;
    let t = pci.transport().map_err(|e| format!("transport: {e}"))?;
    // Let the domain's clock settle first: the first boot of this system once measured with
    // a clock that jumped at the start (every loop ended at once).
    let _ = time::sleep(100_000_000);
    let mut blk = Blk::new(t).map_err(verr("virtio-blk init"))?;
    let sectors = blk.capacity();
    let mut said = Vec::new();
    for (name, write, qd) in [
        ("randread_4k_iops_qd1", false, 1),
        ("randread_4k_iops_qd32", false, 32),
        ("randwrite_4k_iops_qd32", true, 32),
    ] {
        let (v, most) = rand_iops(&mut blk, write, qd).map_err(|e| format!("{name}: {e}"))?;
        println!("METRIC blk_direct_virtio_{name} {v:.0} ops/s");
        said.push(format!("{name} {most} in flight"));
    }
    let v = seq_mbps(&mut blk)?;
    println!("METRIC blk_direct_virtio_seq_1m_mbps {v:.1} MB/s");
    drop(blk);
    Ok(format!(
        "bench: {sectors} sectors, polled; {}",
        said.join(", ")
    ))
}
