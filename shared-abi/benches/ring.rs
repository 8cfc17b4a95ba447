//! Host ring throughput: request → response round trips between two threads.
//!
//! - `host_ring_ops_per_s`: our shared ring (one 4 KiB page, 16-byte entries → 128 slots):
//!   the frontend thread pushes requests and consumes responses, the backend thread consumes
//!   requests and pushes responses; both busy-poll (no event channel), publishing per batch.
//! - `host_ringbuf_spsc_ops_per_s`: the same workload over two `ringbuf` SPSC queues of 128
//!   (requests one way, responses back), the reference for an in-process lock-free queue.
//!
//! One element = one request and its response. Run: `cargo bench -p shared-abi --bench ring`.
// A benchmark harness, like a test: a failure here is a bug to see, not input to handle.
#![allow(clippy::unwrap_used)]

use std::hint::{black_box, spin_loop};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringbuf::HeapRb;
use ringbuf::traits::{Consumer, Producer, Split};
use shared_abi::ring::{BackRing, FrontRing, RingEntry, SharedRingMem};

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Msg {
    id: u64,
    data: u64,
}

impl RingEntry for Msg {
    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.id.to_le_bytes());
        out[8..16].copy_from_slice(&self.data.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        let mut id = [0u8; 8];
        let mut data = [0u8; 8];
        id.copy_from_slice(&b[..8]);
        data.copy_from_slice(&b[8..16]);
        Msg {
            id: u64::from_le_bytes(id),
            data: u64::from_le_bytes(data),
        }
    }
}

const SLOTS: usize = 128;

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        spin_loop();
    } else {
        // Two shared cores: let the peer run.
        thread::yield_now();
    }
}

fn shared_ring_round_trips(n: u64) -> Duration {
    let mem = SharedRingMem::new_owned(4096).unwrap();
    let mut front = FrontRing::<Msg, Msg>::new(mem.clone()).unwrap();
    let mut back = BackRing::<Msg, Msg>::new(mem).unwrap();
    assert_eq!(front.nr_ents() as usize, SLOTS);
    let start = Instant::now();
    let backend = thread::spawn(move || {
        let mut done = 0u64;
        let mut spins = 0;
        while done < n {
            let mut got = false;
            while let Some(req) = back.get_request().unwrap() {
                back.push_response(&Msg {
                    id: req.id,
                    data: req.data ^ 1,
                })
                .unwrap();
                done += 1;
                got = true;
            }
            back.push_responses_and_check_notify();
            if got {
                spins = 0;
            } else {
                backoff(&mut spins);
            }
        }
    });
    let (mut sent, mut received, mut spins) = (0u64, 0u64, 0);
    while received < n {
        while sent < n && !front.is_full() {
            front
                .push_request(&Msg {
                    id: sent,
                    data: sent,
                })
                .unwrap();
            sent += 1;
        }
        front.push_requests_and_check_notify();
        let mut got = false;
        while let Some(rsp) = front.get_response().unwrap() {
            black_box(rsp);
            received += 1;
            got = true;
        }
        if got {
            spins = 0;
        } else {
            backoff(&mut spins);
        }
    }
    backend.join().unwrap();
    start.elapsed()
}

fn ringbuf_round_trips(n: u64) -> Duration {
    let (mut req_tx, mut req_rx) = HeapRb::<Msg>::new(SLOTS).split();
    let (mut rsp_tx, mut rsp_rx) = HeapRb::<Msg>::new(SLOTS).split();
    let start = Instant::now();
    let backend = thread::spawn(move || {
        let mut done = 0u64;
        let mut spins = 0;
        while done < n {
            match req_rx.try_pop() {
                Some(req) => {
                    let mut rsp = Msg {
                        id: req.id,
                        data: req.data ^ 1,
                    };
                    // The response queue has as many slots as requests in flight.
                    while let Err(back) = rsp_tx.try_push(rsp) {
                        rsp = back;
                        spin_loop();
                    }
                    done += 1;
                    spins = 0;
                }
                None => backoff(&mut spins),
            }
        }
    });
    let (mut sent, mut received, mut spins) = (0u64, 0u64, 0);
    let mut in_flight = 0usize;
    while received < n {
        while sent < n && in_flight < SLOTS {
            if req_tx
                .try_push(Msg {
                    id: sent,
                    data: sent,
                })
                .is_err()
            {
                break;
            }
            sent += 1;
            in_flight += 1;
        }
        let mut got = false;
        while let Some(rsp) = rsp_rx.try_pop() {
            black_box(rsp);
            received += 1;
            in_flight -= 1;
            got = true;
        }
        if got {
            spins = 0;
        } else {
            backoff(&mut spins);
        }
    }
    backend.join().unwrap();
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_ring_ops_per_s");
    group.throughput(Throughput::Elements(1));
    group.bench_function("host_ring_ops_per_s", |b| {
        b.iter_custom(shared_ring_round_trips)
    });
    group.finish();

    let mut group = c.benchmark_group("host_ringbuf_spsc_ops_per_s");
    group.throughput(Throughput::Elements(1));
    group.bench_function("host_ringbuf_spsc_ops_per_s", |b| {
        b.iter_custom(ringbuf_round_trips)
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
