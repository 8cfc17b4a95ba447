//! Host packet-rate benchmarks of the netback library.
//!
//! - `host_switch_64b_pps`: the L2 switch forwarding 64-byte unicast frames between vif ports
//!   whose MACs are known (anti-spoofing on, no rate limit), 1024 frames per iteration.
//! - `host_netback_tx_64b_pps`: the netif tx path for 64-byte single-slot packets: the
//!   frontend queues 128 requests on a real one-page ring, the engine validates them, copies
//!   them with the fake grant table (one batched copy per pass), hands them to a sink and
//!   answers them; the frontend consumes the responses. 128 packets per iteration.
//!
//! Run: `cargo bench -p netback-dom --bench netback`.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use netback_dom::backend::{Notify, Queue, QueueConfig, RingKind};
use netback_dom::grant::{FakeGrantTable, PagePool};
use netback_dom::packet::MacAddr;
use netback_dom::switch::{PortKind, Switch, SwitchConfig, VifPolicy};
use shared_abi::PAGE_SIZE;
use shared_abi::netif::{NetifTxRequest, NetifTxResponse};
use shared_abi::ring::{FrontRing, SharedRingMem};

const SWITCH_BATCH: usize = 1024;
const TX_BATCH: u16 = 128;

fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&0x88B5u16.to_be_bytes()); // local experimental EtherType
    f
}

fn bench_switch(c: &mut Criterion) {
    let mut sw = Switch::new(SwitchConfig::default());
    let macs: Vec<MacAddr> = (0..4u8).map(|i| MacAddr([2, 0, 0, 0, 0, i + 1])).collect();
    let ports: Vec<_> = macs
        .iter()
        .map(|m| {
            sw.add_port(PortKind::Vif(VifPolicy {
                mac: *m,
                ipv4: None,
                ipv6: None,
                rate: None,
            }))
            .unwrap()
        })
        .collect();
    let frames: Vec<(usize, Vec<u8>)> = (0..SWITCH_BATCH)
        .map(|i| {
            let from = i % 4;
            let to = (i + 1 + i / 4 % 3) % 4;
            (from, frame(macs[to], macs[from]))
        })
        .collect();
    let mut out = Vec::with_capacity(8);
    let mut now = 0u64;
    let mut g = c.benchmark_group("host_switch_64b_pps");
    g.throughput(Throughput::Elements(SWITCH_BATCH as u64));
    g.bench_function("host_switch_64b_pps", |b| {
        b.iter(|| {
            now += 1_000;
            for (from, f) in &frames {
                sw.forward(ports[*from], black_box(f), now, &mut out)
                    .unwrap();
                black_box(&out);
            }
        })
    });
    g.finish();
}

struct NoNotify(u64);
impl Notify for NoNotify {
    fn notify(&mut self, _q: u16, _r: RingKind) {
        self.0 += 1;
    }
}

fn bench_tx(c: &mut Criterion) {
    let tx_mem = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
    let rx_mem = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
    let mut front = FrontRing::<NetifTxRequest, NetifTxResponse>::new(tx_mem.clone()).unwrap();
    let _rx_front = FrontRing::<
        shared_abi::netif::NetifRxRequest,
        shared_abi::netif::NetifRxResponse,
    >::new(rx_mem.clone())
    .unwrap();
    let mut cfg = QueueConfig::new(1, 0);
    cfg.tx_budget = 256;
    let mut q = Queue::new(cfg, tx_mem, rx_mem, PagePool::with_fake_frames(32, 0x1000)).unwrap();
    let mut grants = FakeGrantTable::new(1);
    for i in 0..u32::from(TX_BATCH) {
        grants.grant(8 + i, true);
        let f = frame(MacAddr([2, 0, 0, 0, 0, 2]), MacAddr([2, 0, 0, 0, 0, 1]));
        grants.page_mut(8 + i).unwrap()[..64].copy_from_slice(&f);
    }
    let mut notify = NoNotify(0);
    let mut g = c.benchmark_group("host_netback_tx_64b_pps");
    g.throughput(Throughput::Elements(u64::from(TX_BATCH)));
    g.bench_function("host_netback_tx_64b_pps", |b| {
        b.iter(|| {
            for i in 0..TX_BATCH {
                front
                    .push_request(&NetifTxRequest {
                        gref: 8 + u32::from(i),
                        offset: 0,
                        flags: 0,
                        id: i,
                        size: 64,
                    })
                    .unwrap();
            }
            front.push_requests_and_check_notify();
            let mut bytes = 0usize;
            q.process_tx(&mut grants, &mut notify, |p| {
                bytes += p.len();
                true
            })
            .unwrap();
            assert_eq!(bytes, 64 * usize::from(TX_BATCH));
            while let Some(r) = front.get_response().unwrap() {
                black_box(r);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench_switch, bench_tx);
criterion_main!(benches);
