//! Property tests of the shared ring against a model queue, single-threaded: random
//! interleavings of produce / publish / consume / respond / final-check on both sides, and
//! the backend arming `req_event` several requests ahead (`arm_request_event`).
//!
//! Checked after every step: no request or response is lost, duplicated or reordered; the
//! notify decision equals the model's (peer's armed event index in the published window);
//! and, the property notification avoidance must keep, a side that went to sleep after its
//! final check is always notified by the next publish that passes its event index, and a
//! backend waiting for `n` requests is notified by the publish that makes `n` ready.
//! A second property plays a hostile peer scribbling the shared header: the ring never panics
//! and never hands out more than a ring's worth of requests.
#![cfg(not(loom))]
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;

use proptest::prelude::*;
use shared_abi::ring::{BackRing, FrontRing, RingEntry, SharedRingMem};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
struct Id(u32);

impl RingEntry for Id {
    fn encode(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.0.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        Id(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    FrontPush(u8),
    FrontPublish,
    FrontConsume(u8),
    FrontFinalCheck,
    BackConsume(u8),
    BackRespond(u8),
    BackPublish,
    BackFinalCheck,
    /// The backend wants this many requests (0 and more than a ring exercise the clamp).
    BackArm(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u8..6).prop_map(Step::FrontPush),
        Just(Step::FrontPublish),
        (1u8..6).prop_map(Step::FrontConsume),
        Just(Step::FrontFinalCheck),
        (1u8..6).prop_map(Step::BackConsume),
        (1u8..6).prop_map(Step::BackRespond),
        Just(Step::BackPublish),
        Just(Step::BackFinalCheck),
        (0u8..10).prop_map(Step::BackArm),
    ]
}

/// The model: queues of ids in each state, the event indices each side armed, and who sleeps.
#[derive(Default)]
struct Model {
    next_id: u32,
    /// Pushed by the front, not yet published.
    req_private: VecDeque<u32>,
    /// Published, not yet consumed by the back.
    req_published: VecDeque<u32>,
    /// Consumed by the back, not yet answered.
    unanswered: VecDeque<u32>,
    /// Answered, not yet published.
    rsp_private: VecDeque<u32>,
    /// Published responses, not yet consumed by the front.
    rsp_published: VecDeque<u32>,
    req_prod: u32,
    rsp_prod: u32,
    req_cons: u32,
    rsp_cons: u32,
    req_event: u32,
    rsp_event: u32,
    back_sleeping: bool,
    front_sleeping: bool,
    /// The backend armed for this many ready requests and is waiting for them.
    back_waiting_for: Option<usize>,
}

fn in_window(event: u32, old: u32, new: u32) -> bool {
    // Event in (old, new], computed independently of the ring's formula.
    let span = new.wrapping_sub(old);
    let pos = event.wrapping_sub(old);
    pos != 0 && pos <= span
}

fn run(nr_slots: usize, steps: &[Step]) -> Result<(), TestCaseError> {
    let mem = SharedRingMem::new_owned(64 + nr_slots * 4).unwrap();
    let mut front = FrontRing::<Id, Id>::new(mem.clone()).unwrap();
    let mut back = BackRing::<Id, Id>::new(mem).unwrap();
    let nr = front.nr_ents();
    let mut m = Model {
        req_event: 1,
        rsp_event: 1,
        ..Default::default()
    };
    for &s in steps {
        match s {
            Step::FrontPush(n) => {
                for _ in 0..n {
                    let in_flight = (m.req_private.len()
                        + m.req_published.len()
                        + m.unanswered.len()
                        + m.rsp_private.len()
                        + m.rsp_published.len()) as u32;
                    let r = front.push_request(&Id(m.next_id));
                    if in_flight == nr {
                        prop_assert!(r.is_err(), "push into a full ring succeeded");
                    } else {
                        prop_assert!(r.is_ok());
                        m.req_private.push_back(m.next_id);
                        m.next_id += 1;
                    }
                }
            }
            Step::FrontPublish => {
                let old = m.req_prod;
                let new = old.wrapping_add(m.req_private.len() as u32);
                let ready_before = m.req_published.len();
                m.req_published.extend(m.req_private.drain(..));
                m.req_prod = new;
                let notify = front.push_requests_and_check_notify();
                prop_assert_eq!(notify, in_window(m.req_event, old, new));
                if m.back_sleeping && new != old {
                    prop_assert!(
                        notify,
                        "back slept with req_event armed and was not notified"
                    );
                }
                if let Some(want) = m.back_waiting_for
                    && ready_before < want
                    && m.req_published.len() >= want
                {
                    prop_assert!(
                        notify,
                        "back waited for {} requests and was not notified",
                        want
                    );
                }
                if notify {
                    m.back_sleeping = false;
                    m.back_waiting_for = None;
                }
            }
            Step::BackConsume(n) => {
                // Consuming means the backend is awake: it no longer waits for a count.
                m.back_waiting_for = None;
                for _ in 0..n {
                    let got = back.get_request().unwrap();
                    prop_assert_eq!(got.map(|i| i.0), m.req_published.pop_front());
                    if let Some(id) = got {
                        m.unanswered.push_back(id.0);
                        m.req_cons = m.req_cons.wrapping_add(1);
                    }
                }
            }
            Step::BackRespond(n) => {
                for _ in 0..n {
                    let r = back.push_response(&Id(m.unanswered.front().copied().unwrap_or(0)));
                    match m.unanswered.pop_front() {
                        Some(id) => {
                            prop_assert!(r.is_ok());
                            m.rsp_private.push_back(id);
                        }
                        None => prop_assert!(r.is_err(), "response with no request accepted"),
                    }
                }
            }
            Step::BackPublish => {
                let old = m.rsp_prod;
                let new = old.wrapping_add(m.rsp_private.len() as u32);
                m.rsp_published.extend(m.rsp_private.drain(..));
                m.rsp_prod = new;
                let notify = back.push_responses_and_check_notify();
                prop_assert_eq!(notify, in_window(m.rsp_event, old, new));
                if m.front_sleeping && new != old {
                    prop_assert!(
                        notify,
                        "front slept with rsp_event armed and was not notified"
                    );
                }
                if notify {
                    m.front_sleeping = false;
                }
            }
            Step::FrontConsume(n) => {
                for _ in 0..n {
                    let got = front.get_response().unwrap();
                    prop_assert_eq!(got.map(|i| i.0), m.rsp_published.pop_front());
                    if got.is_some() {
                        m.rsp_cons = m.rsp_cons.wrapping_add(1);
                    }
                }
            }
            Step::BackFinalCheck => {
                let work = back.final_check_for_requests().unwrap();
                prop_assert_eq!(work, !m.req_published.is_empty());
                m.back_waiting_for = None;
                if !work {
                    m.req_event = m.req_cons.wrapping_add(1);
                    m.back_sleeping = true;
                }
            }
            Step::BackArm(n) => {
                let ahead = u32::from(n).clamp(1, nr);
                let ready = back.arm_request_event(u32::from(n)).unwrap();
                prop_assert_eq!(back.req_cons(), m.req_cons);
                prop_assert_eq!(ready as usize, m.req_published.len());
                m.req_event = m.req_cons.wrapping_add(ahead);
                m.back_sleeping = false;
                m.back_waiting_for = ((ready) < ahead).then_some(ahead as usize);
            }
            Step::FrontFinalCheck => {
                let work = front.final_check_for_responses().unwrap();
                prop_assert_eq!(work, !m.rsp_published.is_empty());
                if !work {
                    m.rsp_event = m.rsp_cons.wrapping_add(1);
                    m.front_sleeping = true;
                }
            }
        }
        prop_assert_eq!(front.free_slots(), nr - (m.req_prod_pvt_len() as u32));
    }
    Ok(())
}

impl Model {
    fn req_prod_pvt_len(&self) -> usize {
        self.req_private.len()
            + self.req_published.len()
            + self.unanswered.len()
            + self.rsp_private.len()
            + self.rsp_published.len()
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if cfg!(miri) { 4 } else { 512 },
        ..ProptestConfig::default()
    })]

    #[test]
    fn ring_matches_model_queue_and_never_skips_needed_notify(
        nr_slots in prop_oneof![Just(1usize), Just(2), Just(4), Just(7)],
        steps in prop::collection::vec(step(), 1..200),
    ) {
        run(nr_slots, &steps)?;
    }

    #[test]
    fn ring_hostile_header_never_panics_or_overdelivers(
        writes in prop::collection::vec((0usize..16, any::<u32>(), 0u8..9), 1..60),
    ) {
        let mem = SharedRingMem::new_owned(64 + 8 * 4).unwrap();
        let mut front = FrontRing::<Id, Id>::new(mem.clone()).unwrap();
        let mut back = BackRing::<Id, Id>::new(mem.clone()).unwrap();
        let nr = back.nr_ents();
        let mut taken_unanswered = 0u32;
        for (word, value, action) in writes {
            mem.write_u32(word * 4, value).unwrap();
            match action {
                0 => { let _ = front.push_request(&Id(value)); }
                1 => { let _ = front.push_requests_and_check_notify(); }
                2 => { let _ = front.get_response(); }
                3 => { let _ = front.final_check_for_responses(); }
                4 => {
                    if let Ok(Some(_)) = back.get_request() {
                        taken_unanswered += 1;
                    }
                }
                5 => {
                    if back.push_response(&Id(0)).is_ok() {
                        taken_unanswered -= 1;
                    }
                }
                6 => { let _ = back.push_responses_and_check_notify(); }
                7 => { let _ = back.final_check_for_requests(); }
                _ => { let _ = back.arm_request_event(value); }
            }
            // The backend never holds more unanswered requests than the ring has slots.
            prop_assert!(taken_unanswered <= nr);
            prop_assert_eq!(back.unanswered(), taken_unanswered);
            prop_assert!(front.free_slots() <= front.nr_ents());
        }
    }
}
