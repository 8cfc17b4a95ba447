//! Host figures of the blkback engine over the RAM disk (the in-QEMU metrics come later).
//!
//! - `host_blk_ram_randread_4k_ops`: random 4 KiB reads on a 64 MiB RAM disk through a real
//!   one-page ring (32 requests per iteration, the ring's depth), persistent grants on (the
//!   frontend reuses its 32 pages, as blkfront does), fake grant memory. Throughput in
//!   requests.
//! - `host_blk_ram_seq_1m_mbps`: sequential 1 MiB reads, each one indirect request of 256
//!   4 KiB segments, 8 per iteration (2056 pages in use, more than the persistent pool's
//!   1056, so part of each pass maps and unmaps). Throughput in bytes.
//!
//! Run: `cargo bench -p blkback-dom --bench blkback`.
#![allow(clippy::unwrap_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use blkback_dom::engine::VbdConfig;
use common::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shared_abi::blkif::{BlkifRequestSegment, op, rsp};

const DISK_SECTORS: u64 = 64 << 11; // 64 MiB
const DEPTH: usize = 32;
const SEQ_REQS: usize = 8;

fn bench_randread(c: &mut Criterion) {
    let mut h = Harness::new(VbdConfig::new(FRONT), ram(DISK_SECTORS), 1, 0);
    let pages: Vec<BlkifRequestSegment> = (0..DEPTH)
        .map(|_| seg(h.grant(0, &[], false), 0, 7))
        .collect();
    let mut x = 0x1234_5678_u64;
    let mut g = c.benchmark_group("host_blk_ram_randread_4k_ops");
    g.throughput(Throughput::Elements(DEPTH as u64));
    g.bench_function("host_blk_ram_randread_4k_ops", |b| {
        b.iter(|| {
            for p in &pages {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let sector = (x % (DISK_SECTORS / 8)) * 8;
                h.rw(0, 0, op::READ, sector, std::slice::from_ref(p));
            }
            h.service(0).unwrap();
            let rs = h.responses(0, 0);
            debug_assert!(rs.iter().all(|r| r.status == rsp::OKAY));
            black_box(rs.len())
        })
    });
    g.finish();
    assert_eq!(h.vbd().stats().error, 0);
}

fn bench_seq(c: &mut Criterion) {
    let mut cfg = VbdConfig::new(FRONT);
    cfg.max_indirect_segments = 256;
    let mut h = Harness::new(cfg, ram(DISK_SECTORS), 1, 0);
    // Eight consecutive 1 MiB requests, built once and replayed: the frontend reuses its
    // pages, of which the first 1056 stay persistently mapped and the rest are mapped per
    // request.
    let slots: Vec<_> = (0..SEQ_REQS)
        .map(|i| {
            let segs = h.read_segments(0, 2048);
            h.indirect_slot(0, op::READ, i as u64 * 2048, &segs).1
        })
        .collect();
    let mut g = c.benchmark_group("host_blk_ram_seq_1m_mbps");
    g.throughput(Throughput::Bytes((SEQ_REQS << 20) as u64));
    g.bench_function("host_blk_ram_seq_1m_mbps", |b| {
        b.iter(|| {
            for slot in &slots {
                h.push(0, 0, *slot);
            }
            h.service(0).unwrap();
            black_box(h.responses(0, 0).len())
        })
    });
    g.finish();
    assert_eq!(h.vbd().stats().error, 0);
}

criterion_group!(benches, bench_randread, bench_seq);
criterion_main!(benches);
