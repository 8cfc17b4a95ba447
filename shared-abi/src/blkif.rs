//! Xen block protocol (`io/blkif.h`, XEN-ABI.md §5.1), native x86-64 layout: the request
//! variants that share a ring slot, the response, the segment descriptor, and the `BLKIF_OP_*`,
//! `BLKIF_RSP_*`, `VDISK_*` numbers and limits.
//!
//! Owns only the wire contract. Each struct is `#[repr(C)]` with its size and field offsets
//! asserted at compile time and a little-endian codec. The ring carries a
//! [`BlkifRequestSlot`]: the raw 112 bytes of the C `union` of request variants, copied out of
//! the shared page; [`BlkifRequestSlot::parse`] then reads the operation byte once and decodes
//! the variant it names into a [`BlkifRequestKind`]. Parsing never fails and never trusts a
//! count: whether the request makes sense (segment counts, sector ranges, grant refs) is the
//! backend's job.

use core::ops::Range;

use crate::PAGE_SIZE;
use crate::grant_table::GrantRef;
use crate::ring::{LeField, RingEntry, le_struct, ring_entries, slot_bytes};

/// Segments a direct (non-indirect) request can carry (`BLKIF_MAX_SEGMENTS_PER_REQUEST`).
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Indirect pages one indirect request may name (`BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`).
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segment descriptors in one indirect page (4096 / 8).
pub const BLKIF_SEGS_PER_INDIRECT_FRAME: usize = PAGE_SIZE / BlkifRequestSegment::WIRE_SIZE;
/// The most segments an indirect request can describe at all.
pub const BLKIF_MAX_INDIRECT_SEGMENTS: usize =
    BLKIF_SEGS_PER_INDIRECT_FRAME * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;
/// The protocol's sector unit: `sector_number`, `first_sect`, `last_sect` and `sectors` count
/// 512-byte units whatever the disk's `sector-size`.
pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;
/// 512-byte sectors in one page: `first_sect`/`last_sect` lie in `0..SECTORS_PER_PAGE`.
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE / 512) as u8;
/// Largest ring a frontend may ask for (`XENBUS_MAX_RING_GRANT_ORDER`): 16 pages.
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// `XEN_IO_PROTO_ABI_*`: the `protocol` key's values.
pub mod protocol {
    pub const X86_32: &str = "x86_32-abi";
    pub const X86_64: &str = "x86_64-abi";
    pub const ARM: &str = "arm-abi";
}

/// `BLKIF_OP_*`.
pub mod op {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const WRITE_BARRIER: u8 = 2;
    pub const FLUSH_DISKCACHE: u8 = 3;
    /// Used by SLES kernels; never valid here.
    pub const RESERVED_1: u8 = 4;
    pub const DISCARD: u8 = 5;
    pub const INDIRECT: u8 = 6;
}

/// `BLKIF_RSP_*`: a response's status.
pub mod rsp {
    pub const OKAY: i16 = 0;
    pub const ERROR: i16 = -1;
    pub const EOPNOTSUPP: i16 = -2;
}

/// `VDISK_*`: bits of the backend's `info` key.
pub mod vdisk {
    pub const CDROM: u32 = 0x1;
    pub const REMOVABLE: u32 = 0x2;
    pub const READONLY: u32 = 0x4;
}

/// `BLKIF_DISCARD_SECURE`: bit of [`BlkifRequestDiscard::flag`].
pub const BLKIF_DISCARD_SECURE: u8 = 1 << 0;

/// `blkif_request_segment`: one page of a read or write.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifRequestSegment {
    /// Grant of the frontend page holding (write) or receiving (read) the data.
    pub gref: GrantRef,
    /// First 512-byte sector of the page used, inclusive.
    pub first_sect: u8,
    /// Last 512-byte sector of the page used, inclusive.
    pub last_sect: u8,
}
le_struct!(BlkifRequestSegment, 8; gref: u32 @ 0, first_sect: u8 @ 4, last_sect: u8 @ 5);

impl BlkifRequestSegment {
    /// The bytes of the granted page this segment covers, if `first_sect <= last_sect <= 7`.
    pub fn byte_range(&self) -> Option<Range<usize>> {
        if self.first_sect > self.last_sect || self.last_sect >= SECTORS_PER_PAGE {
            return None;
        }
        Some(usize::from(self.first_sect) * 512..(usize::from(self.last_sect) + 1) * 512)
    }

    /// Number of 512-byte sectors covered, if the range is valid.
    pub fn sectors(&self) -> Option<u64> {
        self.byte_range().map(|r| (r.len() / 512) as u64)
    }
}

/// The eleven segment slots of a direct request (`seg[BLKIF_MAX_SEGMENTS_PER_REQUEST]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectSegments(pub [BlkifRequestSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST]);

impl LeField for DirectSegments {
    const LEN: usize = BLKIF_MAX_SEGMENTS_PER_REQUEST * BlkifRequestSegment::WIRE_SIZE;
    fn read_le(bytes: &[u8]) -> Option<Self> {
        let mut segs = [BlkifRequestSegment::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST];
        for (s, chunk) in segs.iter_mut().zip(bytes.get(..Self::LEN)?.chunks_exact(8)) {
            *s = BlkifRequestSegment::from_bytes(chunk)?;
        }
        Some(DirectSegments(segs))
    }
    fn write_le(&self, out: &mut [u8]) {
        if let Some(dst) = out.get_mut(..Self::LEN) {
            for (chunk, s) in dst.chunks_exact_mut(8).zip(self.0.iter()) {
                chunk.copy_from_slice(&s.to_bytes());
            }
        }
    }
}

/// The eight indirect page grants of an indirect request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndirectGrefs(pub [GrantRef; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST]);

impl LeField for IndirectGrefs {
    const LEN: usize = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * 4;
    fn read_le(bytes: &[u8]) -> Option<Self> {
        let mut g = [0u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
        for (w, c) in g.iter_mut().zip(bytes.get(..Self::LEN)?.chunks_exact(4)) {
            *w = u32::from_le_bytes(c.try_into().ok()?);
        }
        Some(IndirectGrefs(g))
    }
    fn write_le(&self, out: &mut [u8]) {
        if let Some(dst) = out.get_mut(..Self::LEN) {
            for (c, w) in dst.chunks_exact_mut(4).zip(self.0.iter()) {
                c.copy_from_slice(&w.to_le_bytes());
            }
        }
    }
}

/// `blkif_request`: read, write, write-barrier and flush-diskcache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifRequest {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Segments used (an allegation: may exceed 11 on a hostile ring).
    pub nr_segments: u8,
    /// The frontend's device id.
    pub handle: u16,
    /// Echoed in the response.
    pub id: u64,
    /// Start on disk, in 512-byte sectors.
    pub sector_number: u64,
    pub seg: DirectSegments,
}
le_struct!(BlkifRequest, 112; operation: u8 @ 0, nr_segments: u8 @ 1, handle: u16 @ 2,
    id: u64 @ 8, sector_number: u64 @ 16, seg: DirectSegments @ 24);

impl BlkifRequest {
    /// The used segments, or `None` if `nr_segments` exceeds the eleven slots.
    pub fn segments(&self) -> Option<&[BlkifRequestSegment]> {
        self.seg.0.get(..usize::from(self.nr_segments))
    }
}

/// `blkif_request_discard` (the slot is still 112 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifRequestDiscard {
    /// `BLKIF_OP_DISCARD`.
    pub operation: u8,
    /// `BLKIF_DISCARD_*`.
    pub flag: u8,
    pub handle: u16,
    pub id: u64,
    pub sector_number: u64,
    /// Length in 512-byte sectors.
    pub nr_sectors: u64,
}
le_struct!(BlkifRequestDiscard, 32; operation: u8 @ 0, flag: u8 @ 1, handle: u16 @ 2,
    id: u64 @ 8, sector_number: u64 @ 16, nr_sectors: u64 @ 24);

/// `blkif_request_indirect`: segments live in granted indirect pages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifRequestIndirect {
    /// `BLKIF_OP_INDIRECT`.
    pub operation: u8,
    /// The real operation (`READ` or `WRITE`); the response echoes it.
    pub indirect_op: u8,
    /// Segments described in the indirect pages.
    pub nr_segments: u16,
    pub id: u64,
    pub sector_number: u64,
    pub handle: u16,
    /// Grants of the pages holding the segment arrays; the first
    /// `ceil(nr_segments / 512)` are used.
    pub indirect_grefs: IndirectGrefs,
}
le_struct!(BlkifRequestIndirect, 64; operation: u8 @ 0, indirect_op: u8 @ 1,
    nr_segments: u16 @ 2, id: u64 @ 8, sector_number: u64 @ 16, handle: u16 @ 24,
    indirect_grefs: IndirectGrefs @ 28);

impl BlkifRequestIndirect {
    /// Indirect pages `nr_segments` needs (`INDIRECT_PAGES`).
    pub fn pages_needed(&self) -> usize {
        usize::from(self.nr_segments).div_ceil(BLKIF_SEGS_PER_INDIRECT_FRAME)
    }
}

/// `blkif_response`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifResponse {
    /// The request's `id`.
    pub id: u64,
    /// The request's operation (`indirect_op` for an indirect request).
    pub operation: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
}
le_struct!(BlkifResponse, 16; id: u64 @ 0, operation: u8 @ 8, status: i16 @ 10);

impl RingEntry for BlkifResponse {
    fn encode(&self, out: &mut [u8]) {
        if let Some(dst) = out.get_mut(..Self::WIRE_SIZE) {
            dst.copy_from_slice(&self.to_bytes());
        }
    }
    fn decode(bytes: &[u8]) -> Self {
        // The ring hands exactly WIRE_SIZE bytes; a default (never trusted) beats a panic.
        Self::from_bytes(bytes).unwrap_or_default()
    }
}

/// Bytes of one request slot: `sizeof(union blkif_request variants)`.
pub const REQUEST_SLOT_BYTES: usize = BlkifRequest::WIRE_SIZE;

/// One request slot as it sits in the ring: raw bytes, copied out before anything reads them.
/// Aligned like the C union (its `u64` fields), so the ring sizes slots as C does.
#[repr(C, align(8))]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BlkifRequestSlot(pub [u8; REQUEST_SLOT_BYTES]);
crate::assert_layout!(BlkifRequestSlot, 112);

impl Default for BlkifRequestSlot {
    fn default() -> Self {
        BlkifRequestSlot([0; REQUEST_SLOT_BYTES])
    }
}

impl core::fmt::Debug for BlkifRequestSlot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("BlkifRequestSlot")
            .field(&self.parse())
            .finish()
    }
}

impl RingEntry for BlkifRequestSlot {
    fn encode(&self, out: &mut [u8]) {
        if let Some(dst) = out.get_mut(..REQUEST_SLOT_BYTES) {
            dst.copy_from_slice(&self.0);
        }
    }
    fn decode(bytes: &[u8]) -> Self {
        let mut slot = BlkifRequestSlot::default();
        if let Some(src) = bytes.get(..REQUEST_SLOT_BYTES) {
            slot.0.copy_from_slice(src);
        }
        slot
    }
}

/// A request slot decoded by its operation byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkifRequestKind {
    Read(BlkifRequest),
    Write(BlkifRequest),
    /// `BLKIF_OP_WRITE_BARRIER` (with or without data segments).
    Barrier(BlkifRequest),
    /// `BLKIF_OP_FLUSH_DISKCACHE` (with or without data segments).
    Flush(BlkifRequest),
    Discard(BlkifRequestDiscard),
    Indirect(BlkifRequestIndirect),
    /// An operation this protocol does not define (or `RESERVED_1`); `id` sits at offset 8 in
    /// every variant, so it can still be answered.
    Unknown {
        operation: u8,
        id: u64,
    },
}

impl BlkifRequestKind {
    /// The request's `id` (every variant has it at offset 8).
    pub fn id(&self) -> u64 {
        match self {
            BlkifRequestKind::Read(r)
            | BlkifRequestKind::Write(r)
            | BlkifRequestKind::Barrier(r)
            | BlkifRequestKind::Flush(r) => r.id,
            BlkifRequestKind::Discard(d) => d.id,
            BlkifRequestKind::Indirect(i) => i.id,
            BlkifRequestKind::Unknown { id, .. } => *id,
        }
    }

    /// The operation a response must echo (`indirect_op` for an indirect request).
    pub fn response_operation(&self) -> u8 {
        match self {
            BlkifRequestKind::Read(_) => op::READ,
            BlkifRequestKind::Write(_) => op::WRITE,
            BlkifRequestKind::Barrier(_) => op::WRITE_BARRIER,
            BlkifRequestKind::Flush(_) => op::FLUSH_DISKCACHE,
            BlkifRequestKind::Discard(_) => op::DISCARD,
            BlkifRequestKind::Indirect(i) => i.indirect_op,
            BlkifRequestKind::Unknown { operation, .. } => *operation,
        }
    }
}

fn u64_at(bytes: &[u8; REQUEST_SLOT_BYTES], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[off..off + 8]);
    u64::from_le_bytes(b)
}

impl BlkifRequestSlot {
    /// Decode the variant the operation byte names. Reads only this private copy, so the
    /// operation cannot change between the check and the decode.
    pub fn parse(&self) -> BlkifRequestKind {
        let b = &self.0;
        let rw = || BlkifRequest::from_bytes(b).unwrap_or_default();
        match b[0] {
            op::READ => BlkifRequestKind::Read(rw()),
            op::WRITE => BlkifRequestKind::Write(rw()),
            op::WRITE_BARRIER => BlkifRequestKind::Barrier(rw()),
            op::FLUSH_DISKCACHE => BlkifRequestKind::Flush(rw()),
            op::DISCARD => BlkifRequestKind::Discard(
                BlkifRequestDiscard::from_bytes(&b[..BlkifRequestDiscard::WIRE_SIZE])
                    .unwrap_or_default(),
            ),
            op::INDIRECT => BlkifRequestKind::Indirect(
                BlkifRequestIndirect::from_bytes(&b[..BlkifRequestIndirect::WIRE_SIZE])
                    .unwrap_or_default(),
            ),
            operation => BlkifRequestKind::Unknown {
                operation,
                id: u64_at(b, 8),
            },
        }
    }

    /// The slot a frontend writes for a read/write/barrier/flush request.
    pub fn from_rw(req: &BlkifRequest) -> Self {
        BlkifRequestSlot(req.to_bytes())
    }

    /// The slot a frontend writes for a discard (trailing bytes zero).
    pub fn from_discard(req: &BlkifRequestDiscard) -> Self {
        let mut slot = BlkifRequestSlot::default();
        slot.0[..BlkifRequestDiscard::WIRE_SIZE].copy_from_slice(&req.to_bytes());
        slot
    }

    /// The slot a frontend writes for an indirect request (trailing bytes zero).
    pub fn from_indirect(req: &BlkifRequestIndirect) -> Self {
        let mut slot = BlkifRequestSlot::default();
        slot.0[..BlkifRequestIndirect::WIRE_SIZE].copy_from_slice(&req.to_bytes());
        slot
    }
}

/// Bytes of one ring slot (the C union of requests and response).
pub const SLOT_BYTES: usize = slot_bytes::<BlkifRequestSlot, BlkifResponse>();

/// Slots in a blkif ring of `2^order` pages (`__CONST_RING_SIZE(blkif, PAGE_SIZE << order)`).
pub const fn ring_size(order: u32) -> u32 {
    ring_entries(PAGE_SIZE << order, SLOT_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{BackRing, FrontRing, SharedRingMem};

    #[test]
    fn slot_is_112_bytes_and_ring_sizes_match_xen_for_orders_0_to_4() {
        assert_eq!(SLOT_BYTES, 112);
        assert_eq!(
            [0, 1, 2, 3, 4].map(ring_size),
            [32, 64, 128, 256, 512],
            "blkif ring entries for page orders 0..4"
        );
        let front = FrontRing::<BlkifRequestSlot, BlkifResponse>::new(
            SharedRingMem::new_owned(4 * PAGE_SIZE).unwrap(),
        )
        .unwrap();
        assert_eq!(front.nr_ents(), ring_size(2));
    }

    #[test]
    fn limits_match_blkif_h() {
        assert_eq!(BLKIF_MAX_SEGMENTS_PER_REQUEST, 11);
        assert_eq!(BLKIF_SEGS_PER_INDIRECT_FRAME, 512);
        assert_eq!(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, 8);
        assert_eq!(BLKIF_MAX_INDIRECT_SEGMENTS, 4096);
        assert_eq!(SECTORS_PER_PAGE, 8);
    }

    fn sample_rw(operation: u8) -> BlkifRequest {
        let mut seg = DirectSegments::default();
        for (i, s) in seg.0.iter_mut().enumerate() {
            *s = BlkifRequestSegment {
                gref: 100 + i as u32,
                first_sect: (i % 8) as u8,
                last_sect: 7,
            };
        }
        BlkifRequest {
            operation,
            nr_segments: 11,
            handle: 51712,
            id: 0x1122_3344_5566_7788,
            sector_number: 0xABCD,
            seg,
        }
    }

    #[test]
    fn rw_request_fields_at_xen_offsets() {
        let r = sample_rw(op::WRITE);
        let b = r.to_bytes();
        assert_eq!(b[0], op::WRITE);
        assert_eq!(b[1], 11);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 51712);
        assert_eq!(&b[4..8], &[0; 4], "padding is zero");
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), r.id);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0xABCD);
        // Segment 3 starts at 24 + 3 * 8.
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 103);
        assert_eq!(b[52], 3);
        assert_eq!(b[53], 7);
        assert_eq!(&b[54..56], &[0, 0]);
        assert_eq!(BlkifRequest::from_bytes(&b), Some(r));
    }

    #[test]
    fn discard_and_indirect_fields_at_xen_offsets() {
        let d = BlkifRequestDiscard {
            operation: op::DISCARD,
            flag: BLKIF_DISCARD_SECURE,
            handle: 3,
            id: 9,
            sector_number: 64,
            nr_sectors: 128,
        };
        let b = d.to_bytes();
        assert_eq!(b[1], 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 128);
        let i = BlkifRequestIndirect {
            operation: op::INDIRECT,
            indirect_op: op::READ,
            nr_segments: 600,
            id: 5,
            sector_number: 8,
            handle: 51712,
            indirect_grefs: IndirectGrefs([10, 11, 0, 0, 0, 0, 0, 0]),
        };
        let b = i.to_bytes();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 600);
        assert_eq!(u16::from_le_bytes([b[24], b[25]]), 51712);
        assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 10);
        assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 11);
        assert_eq!(i.pages_needed(), 2);
        let rsp = BlkifResponse {
            id: 7,
            operation: op::FLUSH_DISKCACHE,
            status: rsp::EOPNOTSUPP,
        };
        let b = rsp.to_bytes();
        assert_eq!(b[8], 3);
        assert_eq!(i16::from_le_bytes([b[10], b[11]]), -2);
    }

    #[test]
    fn parse_decodes_each_operation_and_keeps_id_of_unknown() {
        for (o, want) in [
            (op::READ, "Read"),
            (op::WRITE, "Write"),
            (op::WRITE_BARRIER, "Barrier"),
            (op::FLUSH_DISKCACHE, "Flush"),
        ] {
            let slot = BlkifRequestSlot::from_rw(&sample_rw(o));
            let kind = slot.parse();
            assert!(alloc::format!("{kind:?}").starts_with(want));
            assert_eq!(kind.id(), 0x1122_3344_5566_7788);
            assert_eq!(kind.response_operation(), o);
        }
        let d = BlkifRequestDiscard {
            operation: op::DISCARD,
            id: 4,
            nr_sectors: 8,
            ..Default::default()
        };
        assert_eq!(
            BlkifRequestSlot::from_discard(&d).parse(),
            BlkifRequestKind::Discard(d)
        );
        let i = BlkifRequestIndirect {
            operation: op::INDIRECT,
            indirect_op: op::WRITE,
            nr_segments: 12,
            id: 77,
            ..Default::default()
        };
        let k = BlkifRequestSlot::from_indirect(&i).parse();
        assert_eq!(k, BlkifRequestKind::Indirect(i));
        assert_eq!(k.response_operation(), op::WRITE);
        for garbage in [op::RESERVED_1, 7, 0xFF] {
            let mut slot = BlkifRequestSlot::from_rw(&sample_rw(op::READ));
            slot.0[0] = garbage;
            assert_eq!(
                slot.parse(),
                BlkifRequestKind::Unknown {
                    operation: garbage,
                    id: 0x1122_3344_5566_7788
                }
            );
        }
    }

    #[test]
    fn segment_byte_range_requires_first_le_last_le_7() {
        let s = |f, l| BlkifRequestSegment {
            gref: 8,
            first_sect: f,
            last_sect: l,
        };
        assert_eq!(s(0, 7).byte_range(), Some(0..4096));
        assert_eq!(s(3, 3).byte_range(), Some(1536..2048));
        assert_eq!(s(2, 5).sectors(), Some(4));
        assert_eq!(s(4, 3).byte_range(), None);
        assert_eq!(s(0, 8).byte_range(), None);
        assert_eq!(s(255, 255).byte_range(), None);
    }

    #[test]
    fn segments_refuses_counts_above_eleven() {
        let mut r = sample_rw(op::READ);
        r.nr_segments = 12;
        assert_eq!(r.segments(), None);
        r.nr_segments = 0;
        assert_eq!(r.segments(), Some(&[][..]));
    }

    #[test]
    fn request_slot_travels_the_ring_intact() {
        let mem = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
        let mut front = FrontRing::<BlkifRequestSlot, BlkifResponse>::new(mem.clone()).unwrap();
        let mut back = BackRing::<BlkifRequestSlot, BlkifResponse>::new(mem).unwrap();
        let req = sample_rw(op::READ);
        front
            .push_request(&BlkifRequestSlot::from_rw(&req))
            .unwrap();
        front.push_requests_and_check_notify();
        let got = back.get_request().unwrap().unwrap();
        assert_eq!(got.parse(), BlkifRequestKind::Read(req));
        let rsp = BlkifResponse {
            id: req.id,
            operation: op::READ,
            status: rsp::OKAY,
        };
        back.push_response(&rsp).unwrap();
        back.push_responses_and_check_notify();
        assert_eq!(front.get_response().unwrap(), Some(rsp));
    }
}
