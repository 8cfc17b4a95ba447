//! `loom` models of the shared ring's lock-free protocol (run with `--cfg loom`):
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p shared-abi --release --target-dir target/loom -- loom`
//!
//! Entries live in loom atomics accessed relaxed, so loom explores stale reads: a missing
//! Release/Acquire on the producer index shows up as a wrong entry, and a missing SeqCst fence
//! in push-and-check / final-check shows up as a lost wake-up.
#![cfg(loom)]
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use shared_abi::ring::{BackRing, FrontRing, RingEntry, SharedRingMem};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
struct Item(u32);

impl RingEntry for Item {
    fn encode(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.0.to_le_bytes());
    }
    fn decode(bytes: &[u8]) -> Self {
        Item(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

/// A one-bit event channel: `send` sets pending and wakes the owner; `wait` blocks until
/// pending and clears it. A lost wake-up leaves both threads blocked, which loom reports as a
/// deadlock. (Mutex + Condvar rather than park/unpark: loom 0.7 loses an unpark issued to a
/// thread that is not yet parked.)
struct Event {
    pending: Mutex<bool>,
    wake: Condvar,
}

impl Event {
    fn new() -> Arc<Self> {
        Arc::new(Event {
            pending: Mutex::new(false),
            wake: Condvar::new(),
        })
    }

    fn send(&self) {
        *self.pending.lock().unwrap() = true;
        self.wake.notify_one();
    }

    fn wait(&self) {
        let mut pending = self.pending.lock().unwrap();
        while !*pending {
            pending = self.wake.wait(pending).unwrap();
        }
        *pending = false;
    }
}

/// A region with exactly two 4-byte slots after the header.
fn ring_of_two() -> (FrontRing<Item, Item>, BackRing<Item, Item>) {
    let mem = SharedRingMem::new_owned(64 + 2 * 4).unwrap();
    let front = FrontRing::new(mem.clone()).unwrap();
    let back = BackRing::new(mem).unwrap();
    assert_eq!(front.nr_ents(), 2);
    (front, back)
}

/// The consumer drains, runs the final check and, if it says "nothing", goes to sleep; the
/// producer publishes one item after the consumer may or may not have armed its event. If the
/// consumer slept, the producer must have been told to notify; whatever the interleaving, the
/// item is seen exactly once with the right value.
#[test]
fn loom_ring_no_lost_wakeup_single_item() {
    loom::model(|| {
        let (mut front, mut back) = ring_of_two();
        let notified = Arc::new(AtomicBool::new(false));
        let n2 = notified.clone();
        let producer = thread::spawn(move || {
            front.push_request(&Item(0xA5)).unwrap();
            if front.push_requests_and_check_notify() {
                n2.store(true, Ordering::Release);
            }
        });
        let mut got = Vec::new();
        while let Some(r) = back.get_request().unwrap() {
            got.push(r);
        }
        let work = back.final_check_for_requests().unwrap();
        // The consumer goes to sleep having seen nothing: the push came later and must notify.
        let slept_without_item = !work && got.is_empty();
        producer.join().unwrap();
        if slept_without_item {
            assert!(
                notified.load(Ordering::Acquire),
                "consumer slept but producer skipped the notification"
            );
        }
        while let Some(r) = back.get_request().unwrap() {
            got.push(r);
        }
        assert_eq!(got, vec![Item(0xA5)]);
    });
}

/// Three items through a ring of two, responses recycling the slots: both sides run the
/// notify/final-check protocol over blocking events and sleep only when their final check
/// says so. Checks order, no loss, no duplicates and correct values (relaxed entry words would
/// be stale without the Release/Acquire pairing); a lost wake-up is a loom deadlock.
#[test]
fn loom_ring_three_items_ring_of_two_no_loss_dup_or_hang() {
    let mut builder = loom::model::Builder::new();
    // Bounded preemptions keep the exploration tractable; 3 covers every interleaving of the
    // publish / fence / event-check windows on both sides.
    builder.preemption_bound = Some(3);
    builder.check(|| {
        const N: u32 = 3;
        let (mut front, mut back) = ring_of_two();
        let to_back = Event::new();
        let to_front = Event::new();
        let (tb, tf) = (to_back.clone(), to_front.clone());

        let backend = thread::spawn(move || {
            let mut seen = Vec::new();
            while seen.len() < N as usize {
                while let Some(req) = back.get_request().unwrap() {
                    seen.push(req.0);
                    back.push_response(&Item(req.0 + 100)).unwrap();
                }
                if back.push_responses_and_check_notify() {
                    tf.send();
                }
                if seen.len() == N as usize || back.final_check_for_requests().unwrap() {
                    continue;
                }
                tb.wait();
            }
            seen
        });

        let mut sent = 0u32;
        let mut responses = Vec::new();
        while responses.len() < N as usize {
            while sent < N && !front.is_full() {
                front.push_request(&Item(sent)).unwrap();
                sent += 1;
            }
            if front.push_requests_and_check_notify() {
                to_back.send();
            }
            while let Some(rsp) = front.get_response().unwrap() {
                responses.push(rsp.0);
            }
            let can_push = sent < N && !front.is_full();
            if responses.len() == N as usize
                || can_push
                || front.final_check_for_responses().unwrap()
            {
                continue;
            }
            to_front.wait();
        }
        let seen = backend.join().unwrap();
        assert_eq!(seen, vec![0, 1, 2]);
        assert_eq!(responses, vec![100, 101, 102]);
    });
}
