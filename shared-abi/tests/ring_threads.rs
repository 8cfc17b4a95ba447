//! Two real threads run a frontend and a backend over one shared page, using the full
//! notify / final-check protocol with a park/unpark "event channel", for a million requests
//! (fewer under Miri). Checks: every request arrives once, in order, with its payload; every
//! response likewise; and no side ever sleeps through work it was owed a notification for.
#![cfg(not(loom))]
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, Thread};
use std::time::Duration;

use shared_abi::ring::{BackRing, FrontRing, RingEntry, SharedRingMem};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
struct Req {
    id: u64,
    check: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
struct Rsp {
    id: u64,
}

fn put(out: &mut [u8], at: usize, v: u64) {
    out[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl RingEntry for Req {
    fn encode(&self, out: &mut [u8]) {
        put(out, 0, self.id);
        put(out, 8, self.check);
    }
    fn decode(b: &[u8]) -> Self {
        Req {
            id: get(b, 0),
            check: get(b, 8),
        }
    }
}

impl RingEntry for Rsp {
    fn encode(&self, out: &mut [u8]) {
        put(out, 0, self.id);
    }
    fn decode(b: &[u8]) -> Self {
        Rsp { id: get(b, 0) }
    }
}

const COUNT: u64 = if cfg!(miri) { 300 } else { 1_000_000 };
/// Liveness fallback only: a sleeper wakes after this long to look for work it was never told
/// about (which would be a lost wake-up: the test then fails rather than hangs).
const WATCHDOG: Duration = Duration::from_secs(20);

/// A one-bit event channel: `send` sets the pending bit and unparks the owner.
struct Event {
    pending: AtomicBool,
    owner: Thread,
}

impl Event {
    fn send(&self) {
        self.pending.store(true, Ordering::Release);
        self.owner.unpark();
    }

    /// Sleep until `send`. Returns false if the watchdog fired with no event.
    fn wait(&self) -> bool {
        loop {
            if self.pending.swap(false, Ordering::AcqRel) {
                return true;
            }
            let start = std::time::Instant::now();
            thread::park_timeout(WATCHDOG);
            if !self.pending.load(Ordering::Acquire) && start.elapsed() >= WATCHDOG {
                return false;
            }
        }
    }
}

#[test]
fn ring_two_threads_million_requests_in_order_no_loss_no_lost_wakeup() {
    let mem = SharedRingMem::new_owned(4096).unwrap();
    let mut front = FrontRing::<Req, Rsp>::new(mem.clone()).unwrap();
    let mut back = BackRing::<Req, Rsp>::new(mem).unwrap();
    assert_eq!(front.nr_ents(), 128);

    let front_event = Arc::new(Event {
        pending: AtomicBool::new(false),
        owner: thread::current(),
    });
    let sleeps = Arc::new(AtomicU64::new(0));
    let (back_event_tx, back_event_rx) = std::sync::mpsc::channel::<Arc<Event>>();

    let fe = front_event.clone();
    let back_sleeps = sleeps.clone();
    let backend = thread::spawn(move || {
        let my_event = Arc::new(Event {
            pending: AtomicBool::new(false),
            owner: thread::current(),
        });
        back_event_tx.send(my_event.clone()).unwrap();
        let mut expect = 0u64;
        while expect < COUNT {
            while let Some(req) = back.get_request().unwrap() {
                assert_eq!(req.id, expect, "request out of order or duplicated");
                assert_eq!(req.check, !expect, "request payload torn");
                back.push_response(&Rsp { id: req.id }).unwrap();
                expect += 1;
            }
            if back.push_responses_and_check_notify() {
                fe.send();
            }
            if expect == COUNT || back.final_check_for_requests().unwrap() {
                continue;
            }
            back_sleeps.fetch_add(1, Ordering::Relaxed);
            if !my_event.wait() {
                // Woke by the watchdog: work visible now means a notification was skipped.
                assert_eq!(
                    back.unconsumed_requests().unwrap(),
                    0,
                    "backend slept through published requests (lost wake-up)"
                );
            }
        }
    });

    let back_event = back_event_rx.recv().unwrap();
    let mut next_id = 0u64;
    let mut next_rsp = 0u64;
    while next_rsp < COUNT {
        while next_id < COUNT && !front.is_full() {
            front
                .push_request(&Req {
                    id: next_id,
                    check: !next_id,
                })
                .unwrap();
            next_id += 1;
        }
        if front.push_requests_and_check_notify() {
            back_event.send();
        }
        while let Some(rsp) = front.get_response().unwrap() {
            assert_eq!(rsp.id, next_rsp, "response out of order or duplicated");
            next_rsp += 1;
        }
        let can_push = next_id < COUNT && !front.is_full();
        if next_rsp == COUNT || can_push || front.final_check_for_responses().unwrap() {
            continue;
        }
        sleeps.fetch_add(1, Ordering::Relaxed);
        if !front_event.wait() {
            // A backend that panicked (its assertion failed) will never answer: stop waiting
            // and let the join below report its failure instead of hanging here.
            if backend.is_finished() {
                break;
            }
            assert_eq!(
                front.unconsumed_responses().unwrap(),
                0,
                "frontend slept through published responses (lost wake-up)"
            );
        }
    }
    backend.join().unwrap();
    assert_eq!(next_id, COUNT);
    eprintln!(
        "sleeps through the event channel: {}",
        sleeps.load(Ordering::Relaxed)
    );
}
