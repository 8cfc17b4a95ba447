//! Test harness: frontends played by the test (real rings in page buffers, pages in a fake
//! grant memory) against one or more backend devices sharing one grant mapper.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::VecDeque;

use blkback_dom::device::{
    BlockDevice, BlockIo, DeviceError, DeviceInfo, IoCompletion, IoRequest, RamDisk, SyncIo,
};
use blkback_dom::engine::{Disconnect, Notify, Vbd, VbdConfig};
use blkback_dom::grant::FakeGrantMemory;
use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::blkif::{
    BLKIF_SEGS_PER_INDIRECT_FRAME, BlkifRequest, BlkifRequestIndirect, BlkifRequestSegment,
    BlkifRequestSlot, BlkifResponse, DirectSegments, IndirectGrefs,
};
use shared_abi::grant_table::GrantRef;
use shared_abi::ring::{FrontRing, SharedRingMem};

pub const FRONT: DomId = 7;

/// Counts notifications per queue.
#[derive(Default, Debug)]
pub struct CountNotify {
    pub per_queue: Vec<u32>,
}

impl Notify for CountNotify {
    fn notify(&mut self, queue: u16) {
        let q = usize::from(queue);
        if self.per_queue.len() <= q {
            self.per_queue.resize(q + 1, 0);
        }
        self.per_queue[q] += 1;
    }
}

/// A recognisable byte pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn seg(gref: GrantRef, first: u8, last: u8) -> BlkifRequestSegment {
    BlkifRequestSegment {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

/// One frontend: its domain, its rings (one per queue) and counters for refs and ids.
pub struct Frontend {
    pub domid: DomId,
    pub mems: Vec<SharedRingMem>,
    pub rings: Vec<FrontRing<BlkifRequestSlot, BlkifResponse>>,
    next_gref: GrantRef,
    next_id: u64,
}

/// A device served to a frontend.
pub struct Disk<D> {
    pub front: Frontend,
    pub vbd: Vbd<D>,
}

pub struct Harness<D> {
    pub grants: FakeGrantMemory,
    pub notify: CountNotify,
    pub disks: Vec<Disk<D>>,
}

pub fn ram(sectors: u64) -> SyncIo<RamDisk> {
    SyncIo::new(RamDisk::new(sectors, 512).unwrap())
}

impl<D: BlockIo> Harness<D> {
    pub fn new(cfg: VbdConfig, io: D, queues: usize, order: u32) -> Self {
        let mut h = Harness {
            grants: FakeGrantMemory::new(),
            notify: CountNotify::default(),
            disks: Vec::new(),
        };
        h.add_disk(cfg, io, queues, order);
        h
    }

    /// Another device, for frontend `cfg.frontend`.
    pub fn add_disk(&mut self, cfg: VbdConfig, io: D, queues: usize, order: u32) -> usize {
        let mems: Vec<SharedRingMem> = (0..queues)
            .map(|_| SharedRingMem::new_owned(PAGE_SIZE << order).unwrap())
            .collect();
        let rings = mems
            .iter()
            .map(|m| FrontRing::new(m.clone()).unwrap())
            .collect();
        let domid = cfg.frontend;
        let vbd = Vbd::new(cfg, io, mems.clone()).unwrap();
        self.disks.push(Disk {
            front: Frontend {
                domid,
                mems,
                rings,
                next_gref: 8,
                next_id: 1000,
            },
            vbd,
        });
        self.disks.len() - 1
    }

    pub fn vbd(&self) -> &Vbd<D> {
        &self.disks[0].vbd
    }

    pub fn vbd_mut(&mut self) -> &mut Vbd<D> {
        &mut self.disks[0].vbd
    }

    /// Disk `d`'s frontend grants a fresh page holding `data` (zero-padded).
    pub fn grant(&mut self, d: usize, data: &[u8], readonly: bool) -> GrantRef {
        let f = &mut self.disks[d].front;
        let gref = f.next_gref;
        f.next_gref += 1;
        assert!(self.grants.grant(f.domid, gref, readonly));
        self.grants.page_mut(f.domid, gref).unwrap()[..data.len()].copy_from_slice(data);
        gref
    }

    pub fn page(&self, d: usize, gref: GrantRef) -> &[u8; PAGE_SIZE] {
        self.grants.page(self.disks[d].front.domid, gref).unwrap()
    }

    pub fn next_id(&mut self, d: usize) -> u64 {
        let f = &mut self.disks[d].front;
        f.next_id += 1;
        f.next_id
    }

    /// Put a raw slot on queue `q` of disk `d` and publish it.
    pub fn push(&mut self, d: usize, q: usize, slot: BlkifRequestSlot) {
        let ring = &mut self.disks[d].front.rings[q];
        ring.push_request(&slot).unwrap();
        ring.push_requests_and_check_notify();
    }

    /// A direct request; returns its id.
    pub fn rw(
        &mut self,
        d: usize,
        q: usize,
        operation: u8,
        sector: u64,
        segs: &[BlkifRequestSegment],
    ) -> u64 {
        let id = self.next_id(d);
        let mut s = DirectSegments::default();
        s.0[..segs.len()].copy_from_slice(segs);
        let req = BlkifRequest {
            operation,
            nr_segments: segs.len() as u8,
            handle: 51712,
            id,
            sector_number: sector,
            seg: s,
        };
        self.push(d, q, BlkifRequestSlot::from_rw(&req));
        id
    }

    /// An indirect request over `segs` (descriptor pages granted here); returns its id.
    pub fn indirect(
        &mut self,
        d: usize,
        q: usize,
        indirect_op: u8,
        sector: u64,
        segs: &[BlkifRequestSegment],
    ) -> u64 {
        let (id, slot) = self.indirect_slot(d, indirect_op, sector, segs);
        self.push(d, q, slot);
        id
    }

    /// Grant the descriptor pages of an indirect request and build its slot (not pushed).
    pub fn indirect_slot(
        &mut self,
        d: usize,
        indirect_op: u8,
        sector: u64,
        segs: &[BlkifRequestSegment],
    ) -> (u64, BlkifRequestSlot) {
        let mut grefs = [0u32; 8];
        for (i, chunk) in segs.chunks(BLKIF_SEGS_PER_INDIRECT_FRAME).enumerate() {
            let mut page = vec![0u8; PAGE_SIZE];
            for (j, s) in chunk.iter().enumerate() {
                page[j * 8..j * 8 + 8].copy_from_slice(&s.to_bytes());
            }
            grefs[i] = self.grant(d, &page, true);
        }
        let id = self.next_id(d);
        let req = BlkifRequestIndirect {
            operation: shared_abi::blkif::op::INDIRECT,
            indirect_op,
            nr_segments: segs.len() as u16,
            id,
            sector_number: sector,
            handle: 51712,
            indirect_grefs: IndirectGrefs(grefs),
        };
        (id, BlkifRequestSlot::from_indirect(&req))
    }

    /// Write `data` (a multiple of 512 bytes, ≤ 11 pages) at `sector` in full-page segments.
    pub fn write(&mut self, d: usize, q: usize, sector: u64, data: &[u8]) -> u64 {
        let segs = self.data_segments(d, data);
        self.rw(d, q, shared_abi::blkif::op::WRITE, sector, &segs)
    }

    /// Grant pages holding `data`, one segment per page (the last may be partial).
    pub fn data_segments(&mut self, d: usize, data: &[u8]) -> Vec<BlkifRequestSegment> {
        assert_eq!(data.len() % 512, 0);
        data.chunks(PAGE_SIZE)
            .map(|c| {
                let g = self.grant(d, c, true);
                seg(g, 0, (c.len() / 512 - 1) as u8)
            })
            .collect()
    }

    /// Grant zeroed writable pages for `sectors` sectors, one segment per page.
    pub fn read_segments(&mut self, d: usize, sectors: usize) -> Vec<BlkifRequestSegment> {
        let mut left = sectors;
        let mut out = Vec::new();
        while left > 0 {
            let n = left.min(8);
            let g = self.grant(d, &[], false);
            out.push(seg(g, 0, (n - 1) as u8));
            left -= n;
        }
        out
    }

    /// The bytes that `segs` cover in the frontend's pages, concatenated.
    pub fn gather(&self, d: usize, segs: &[BlkifRequestSegment]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in segs {
            let r = s.byte_range().unwrap();
            out.extend_from_slice(&self.page(d, s.gref)[r]);
        }
        out
    }

    pub fn service(&mut self, d: usize) -> Result<(), Disconnect> {
        let disk = &mut self.disks[d];
        disk.vbd.service(&mut self.grants, &mut self.notify)
    }

    /// Every response now on queue `q` of disk `d`.
    pub fn responses(&mut self, d: usize, q: usize) -> Vec<BlkifResponse> {
        let ring = &mut self.disks[d].front.rings[q];
        let mut out = Vec::new();
        while let Some(r) = ring.get_response().unwrap() {
            out.push(r);
        }
        out
    }

    /// Service disk `d` and return the single response on queue `q`.
    pub fn one_response(&mut self, d: usize, q: usize) -> BlkifResponse {
        self.service(d).unwrap();
        let r = self.responses(d, q);
        assert_eq!(r.len(), 1, "{r:?}");
        r[0]
    }
}

/// A device whose operations complete only when the test says, in the order it says; the
/// operation takes effect at completion, as with a real asynchronous device.
pub struct DeferredIo<D> {
    pub device: D,
    pub pending: Vec<IoRequest>,
    done: VecDeque<IoCompletion>,
    /// Tags of operations to fail with an I/O error when completed.
    pub fail: Vec<u64>,
}

impl<D: BlockDevice> DeferredIo<D> {
    pub fn new(device: D) -> Self {
        DeferredIo {
            device,
            pending: Vec::new(),
            done: VecDeque::new(),
            fail: Vec::new(),
        }
    }

    /// Complete the pending operation at index `i` of `pending`.
    pub fn complete(&mut self, i: usize) {
        let req = self.pending.remove(i);
        let (mut result, buf) = SyncIo::execute(&mut self.device, req.op);
        if self.fail.contains(&req.tag) {
            result = Err(DeviceError::Io { errno: 5 });
        }
        self.done.push_back(IoCompletion {
            tag: req.tag,
            result,
            buf,
        });
    }

    /// Complete every pending operation, newest first.
    pub fn complete_all_reversed(&mut self) {
        while !self.pending.is_empty() {
            self.complete(self.pending.len() - 1);
        }
    }
}

impl<D: BlockDevice> BlockIo for DeferredIo<D> {
    fn info(&self) -> DeviceInfo {
        self.device.info()
    }
    fn submit(&mut self, req: IoRequest) {
        self.pending.push(req);
    }
    fn poll(&mut self) -> Option<IoCompletion> {
        self.done.pop_front()
    }
}
