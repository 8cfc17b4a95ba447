//! Test harness: a frontend played by the test (real rings in page buffers, a fake grant
//! table) against one backend queue.
#![allow(clippy::unwrap_used, dead_code)]

use netback_dom::backend::{Disconnect, Notify, PassSummary, Queue, QueueConfig, RingKind};
use netback_dom::grant::{FakeGrantTable, PagePool};
use netback_dom::packet::Packet;
use shared_abi::PAGE_SIZE;
use shared_abi::grant_table::GrantRef;
use shared_abi::netif::{NetifRxRequest, NetifRxResponse, NetifTxRequest, NetifTxResponse};
use shared_abi::ring::{FrontRing, SharedRingMem};

pub const FRONT: u16 = 7;

#[derive(Default)]
pub struct CountNotify {
    pub tx: u32,
    pub rx: u32,
}

impl Notify for CountNotify {
    fn notify(&mut self, _queue: u16, ring: RingKind) {
        match ring {
            RingKind::Tx => self.tx += 1,
            RingKind::Rx => self.rx += 1,
        }
    }
}

pub struct Harness {
    pub tx_mem: SharedRingMem,
    pub rx_mem: SharedRingMem,
    pub tx_front: FrontRing<NetifTxRequest, NetifTxResponse>,
    pub rx_front: FrontRing<NetifRxRequest, NetifRxResponse>,
    pub grants: FakeGrantTable,
    pub queue: Queue,
    pub notify: CountNotify,
    next_gref: GrantRef,
    rx_posted: u16,
    /// Whether the last `post_rx` had to notify the backend (its req_event was crossed).
    pub rx_post_notified: bool,
}

/// A frame of `len` bytes with a recognisable pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

impl Harness {
    pub fn new(cfg: QueueConfig) -> Self {
        let tx_mem = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
        let rx_mem = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
        let tx_front = FrontRing::new(tx_mem.clone()).unwrap();
        let rx_front = FrontRing::new(rx_mem.clone()).unwrap();
        let queue = Queue::new(
            cfg,
            tx_mem.clone(),
            rx_mem.clone(),
            PagePool::with_fake_frames(16, 0x5000),
        )
        .unwrap();
        Harness {
            tx_mem,
            rx_mem,
            tx_front,
            rx_front,
            grants: FakeGrantTable::new(FRONT),
            queue,
            notify: CountNotify::default(),
            next_gref: 8,
            rx_posted: 0,
            rx_post_notified: false,
        }
    }

    pub fn default_cfg() -> QueueConfig {
        QueueConfig::new(FRONT, 0)
    }

    /// Grant a fresh read-only page holding `data` at `offset`.
    pub fn grant_data(&mut self, data: &[u8], offset: usize) -> GrantRef {
        let g = self.next_gref;
        self.next_gref += 1;
        self.grants.grant(g, true);
        self.grants.page_mut(g).unwrap()[offset..offset + data.len()].copy_from_slice(data);
        g
    }

    pub fn push_tx(&mut self, reqs: &[NetifTxRequest]) {
        for r in reqs {
            self.tx_front.push_request(r).unwrap();
        }
        self.tx_front.push_requests_and_check_notify();
    }

    pub fn run_tx(&mut self) -> (Result<PassSummary, Disconnect>, Vec<Packet>) {
        let mut out = Vec::new();
        let r = self
            .queue
            .process_tx(&mut self.grants, &mut self.notify, |p| {
                out.push(p);
                true
            });
        (r, out)
    }

    pub fn tx_responses(&mut self) -> Vec<NetifTxResponse> {
        let mut v = Vec::new();
        while let Some(r) = self.tx_front.get_response().unwrap() {
            v.push(r);
        }
        v
    }

    /// Post `n` fresh writable rx buffers; returns their grefs in posting order.
    pub fn post_rx(&mut self, n: usize) -> Vec<GrantRef> {
        let mut grefs = Vec::new();
        for _ in 0..n {
            let g = self.next_gref;
            self.next_gref += 1;
            self.grants.grant(g, false);
            self.rx_front
                .push_request(&NetifRxRequest {
                    id: self.rx_posted & 255,
                    pad: 0,
                    gref: g,
                })
                .unwrap();
            self.rx_posted = self.rx_posted.wrapping_add(1);
            grefs.push(g);
        }
        self.rx_post_notified = self.rx_front.push_requests_and_check_notify();
        grefs
    }

    pub fn run_rx(&mut self) -> Result<PassSummary, Disconnect> {
        self.queue.deliver_rx(&mut self.grants, &mut self.notify)
    }

    pub fn rx_responses(&mut self) -> Vec<NetifRxResponse> {
        let mut v = Vec::new();
        while let Some(r) = self.rx_front.get_response().unwrap() {
            v.push(r);
        }
        v
    }
}
