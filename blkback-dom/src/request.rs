//! Checking one blkif request before anything is done for it: a request slot (already copied
//! out of the ring and parsed) becomes a [`Plan`] (what to do, in bytes on the device) or a
//! [`Fault`] (why it is refused, and so which status answers it).
//!
//! Every check the protocol allows is here, in one place: the operation and whether it was
//! negotiated, the segment count (direct ≤ 11, indirect ≤ the advertised maximum, reads and
//! writes need ≥ 1), each segment's `first_sect ≤ last_sect ≤ 7` and grant ref (refs below 8
//! are the toolstack's), the sector range against the disk (overflow-safe) and its alignment
//! to the logical sector size, and writes to a read-only disk. Nothing here touches a grant
//! or the device; indirect segment pages are read by the engine and handed to
//! [`check_segments`]. The `handle` field is not checked (Linux blkback ignores it too: a
//! ring belongs to one device).

use alloc::vec::Vec;
use core::fmt;

use shared_abi::blkif::{
    BLKIF_DISCARD_SECURE, BLKIF_MAX_SEGMENTS_PER_REQUEST, BlkifRequest, BlkifRequestKind,
    BlkifRequestSegment, SECTOR_SHIFT, op, rsp,
};
use shared_abi::grant_table::{GntStatus, GrantRef, NR_RESERVED_ENTRIES};

use crate::device::DeviceInfo;

/// What the engine enforces, derived from the device and what was negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Logical sector size in bytes.
    pub sector_size: u32,
    /// Disk size in 512-byte units.
    pub capacity_512: u64,
    pub read_only: bool,
    /// `feature-flush-cache` offered.
    pub flush: bool,
    /// `feature-barrier` offered.
    pub barrier: bool,
    /// `feature-discard` offered.
    pub discard: bool,
    /// `discard-secure` offered.
    pub discard_secure: bool,
    /// `feature-max-indirect-segments` offered (0: indirect requests not offered).
    pub max_indirect_segments: usize,
}

impl Limits {
    /// Limits for `info` with every optional feature off.
    pub fn for_device(info: &DeviceInfo) -> Self {
        Limits {
            sector_size: info.sector_size,
            capacity_512: info.capacity_bytes().unwrap_or(0) >> SECTOR_SHIFT,
            read_only: info.read_only,
            flush: false,
            barrier: false,
            discard: false,
            discard_secure: false,
            max_indirect_segments: 0,
        }
    }

    fn sectors_per_block(&self) -> u64 {
        u64::from(self.sector_size >> SECTOR_SHIFT).max(1)
    }
}

/// Counting categories of [`Fault`] (for statistics and rate-limited logging).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum FaultKind {
    UnknownOperation,
    NotNegotiated,
    ReadOnly,
    NoSegments,
    TooManySegments,
    BadIndirectOp,
    BadSegment,
    ReservedGref,
    OutOfRange,
    Misaligned,
    GrantMap,
}

impl FaultKind {
    pub const COUNT: usize = 11;
    pub const ALL: [FaultKind; Self::COUNT] = [
        FaultKind::UnknownOperation,
        FaultKind::NotNegotiated,
        FaultKind::ReadOnly,
        FaultKind::NoSegments,
        FaultKind::TooManySegments,
        FaultKind::BadIndirectOp,
        FaultKind::BadSegment,
        FaultKind::ReservedGref,
        FaultKind::OutOfRange,
        FaultKind::Misaligned,
        FaultKind::GrantMap,
    ];
}

/// Why a request is refused. Each is the frontend's doing and costs it only that request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// An operation blkif does not define.
    UnknownOperation(u8),
    /// A defined operation (or discard flag) the backend did not offer.
    NotNegotiated(u8),
    /// A write, discard or data-carrying flush to a read-only disk.
    ReadOnly,
    /// A read or write with no segments.
    NoSegments,
    /// More segments than allowed.
    TooManySegments { count: usize, max: usize },
    /// An indirect request whose `indirect_op` is neither read nor write.
    BadIndirectOp(u8),
    /// A segment with `first_sect > last_sect` or `last_sect > 7`.
    BadSegment { index: usize, first: u8, last: u8 },
    /// A grant ref below 8 (segment or indirect page).
    ReservedGref { gref: GrantRef },
    /// The sectors lie (partly) beyond the disk, or their end overflows.
    OutOfRange { sector: u64, sectors: u64 },
    /// Start or length not a multiple of the logical sector size.
    Misaligned { sector: u64, sectors: u64 },
    /// The hypervisor refused to map a grant.
    GrantMap { gref: GrantRef, status: GntStatus },
}

impl Fault {
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::UnknownOperation(_) => FaultKind::UnknownOperation,
            Fault::NotNegotiated(_) => FaultKind::NotNegotiated,
            Fault::ReadOnly => FaultKind::ReadOnly,
            Fault::NoSegments => FaultKind::NoSegments,
            Fault::TooManySegments { .. } => FaultKind::TooManySegments,
            Fault::BadIndirectOp(_) => FaultKind::BadIndirectOp,
            Fault::BadSegment { .. } => FaultKind::BadSegment,
            Fault::ReservedGref { .. } => FaultKind::ReservedGref,
            Fault::OutOfRange { .. } => FaultKind::OutOfRange,
            Fault::Misaligned { .. } => FaultKind::Misaligned,
            Fault::GrantMap { .. } => FaultKind::GrantMap,
        }
    }

    /// The response status (`BLKIF_RSP_*`): unsupported operations get `EOPNOTSUPP` (blkfront
    /// then stops using them), everything else `ERROR`.
    pub fn status(&self) -> i16 {
        match self {
            Fault::UnknownOperation(_) | Fault::NotNegotiated(_) => rsp::EOPNOTSUPP,
            _ => rsp::ERROR,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Fault::UnknownOperation(o) => write!(f, "unknown operation {o}"),
            Fault::NotNegotiated(o) => write!(f, "operation {o} was not negotiated"),
            Fault::ReadOnly => write!(f, "write to a read-only disk"),
            Fault::NoSegments => write!(f, "read or write with 0 segments"),
            Fault::TooManySegments { count, max } => {
                write!(f, "{count} segments, allowed 1..={max}")
            }
            Fault::BadIndirectOp(o) => {
                write!(f, "indirect_op {o}, allowed 0 (read) or 1 (write)")
            }
            Fault::BadSegment { index, first, last } => write!(
                f,
                "segment {index}: first_sect {first}, last_sect {last}; need first <= last <= 7"
            ),
            Fault::ReservedGref { gref } => {
                write!(f, "grant ref {gref} is reserved (refs below 8)")
            }
            Fault::OutOfRange { sector, sectors } => {
                write!(f, "sectors {sector}+{sectors} beyond the disk")
            }
            Fault::Misaligned { sector, sectors } => write!(
                f,
                "sectors {sector}+{sectors} not aligned to the logical sector size"
            ),
            Fault::GrantMap { gref, status } => {
                write!(f, "grant ref {gref} could not be mapped: {status:?}")
            }
        }
    }
}

/// What a checked request asks of the device. Offsets and lengths are bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Read {
        offset: u64,
        segs: Vec<BlkifRequestSegment>,
        bytes: usize,
    },
    Write {
        offset: u64,
        segs: Vec<BlkifRequestSegment>,
        bytes: usize,
        /// Flush before writing (flush/barrier requests carrying data).
        preflush: bool,
        /// Durable on completion.
        fua: bool,
        /// Barrier: wait for everything earlier, hold everything later.
        drain: bool,
    },
    Flush {
        drain: bool,
    },
    Discard {
        offset: u64,
        len: u64,
        secure: bool,
    },
}

/// A checked request: answer `id` with operation `rsp_op` once `action` is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub id: u64,
    pub rsp_op: u8,
    pub action: Action,
}

impl Plan {
    /// Data bytes the request moves (its share of the in-flight budget).
    pub fn bytes(&self) -> usize {
        match &self.action {
            Action::Read { bytes, .. } | Action::Write { bytes, .. } => *bytes,
            Action::Flush { .. } | Action::Discard { .. } => 0,
        }
    }

    /// True for a barrier (it must run alone).
    pub fn drains(&self) -> bool {
        matches!(
            self.action,
            Action::Write { drain: true, .. } | Action::Flush { drain: true }
        )
    }
}

/// An indirect request whose header passed: its segments must be read from `pages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndirectHeader {
    pub id: u64,
    pub write: bool,
    pub sector: u64,
    pub nr_segments: usize,
    pub pages: Vec<GrantRef>,
}

/// The outcome of the first check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    Ready(Plan),
    NeedIndirect(IndirectHeader),
}

/// A refused request, with what its response must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub id: u64,
    pub rsp_op: u8,
    pub fault: Fault,
}

/// Check everything the ring slot itself says.
pub fn check_request(kind: &BlkifRequestKind, lim: &Limits) -> Result<Checked, Rejection> {
    let id = kind.id();
    let rsp_op = kind.response_operation();
    let reject = |fault| Rejection { id, rsp_op, fault };
    match kind {
        BlkifRequestKind::Unknown { operation, .. } => {
            Err(reject(Fault::UnknownOperation(*operation)))
        }
        BlkifRequestKind::Read(r) => direct(r, false, false, false, lim, rsp_op),
        BlkifRequestKind::Write(r) => direct(r, true, false, false, lim, rsp_op),
        BlkifRequestKind::Flush(r) => {
            if !lim.flush {
                return Err(reject(Fault::NotNegotiated(op::FLUSH_DISKCACHE)));
            }
            if r.nr_segments == 0 {
                return Ok(Checked::Ready(Plan {
                    id,
                    rsp_op,
                    action: Action::Flush { drain: false },
                }));
            }
            direct(r, true, true, false, lim, rsp_op)
        }
        BlkifRequestKind::Barrier(r) => {
            if !lim.barrier {
                return Err(reject(Fault::NotNegotiated(op::WRITE_BARRIER)));
            }
            if r.nr_segments == 0 {
                return Ok(Checked::Ready(Plan {
                    id,
                    rsp_op,
                    action: Action::Flush { drain: true },
                }));
            }
            direct(r, true, true, true, lim, rsp_op)
        }
        BlkifRequestKind::Discard(d) => {
            if !lim.discard {
                return Err(reject(Fault::NotNegotiated(op::DISCARD)));
            }
            let secure = d.flag & BLKIF_DISCARD_SECURE != 0;
            if secure && !lim.discard_secure {
                return Err(reject(Fault::NotNegotiated(op::DISCARD)));
            }
            if lim.read_only {
                return Err(reject(Fault::ReadOnly));
            }
            let (offset, len) = check_range(d.sector_number, d.nr_sectors, lim).map_err(reject)?;
            Ok(Checked::Ready(Plan {
                id,
                rsp_op,
                action: Action::Discard {
                    offset,
                    len,
                    secure,
                },
            }))
        }
        BlkifRequestKind::Indirect(i) => {
            if lim.max_indirect_segments == 0 {
                return Err(reject(Fault::NotNegotiated(op::INDIRECT)));
            }
            let write = match i.indirect_op {
                op::READ => false,
                op::WRITE => true,
                other => return Err(reject(Fault::BadIndirectOp(other))),
            };
            let n = usize::from(i.nr_segments);
            if n == 0 {
                return Err(reject(Fault::NoSegments));
            }
            if n > lim.max_indirect_segments {
                return Err(reject(Fault::TooManySegments {
                    count: n,
                    max: lim.max_indirect_segments,
                }));
            }
            if write && lim.read_only {
                return Err(reject(Fault::ReadOnly));
            }
            let pages: Vec<GrantRef> = i
                .indirect_grefs
                .0
                .iter()
                .copied()
                .take(i.pages_needed())
                .collect();
            if let Some(&gref) = pages.iter().find(|&&g| g < NR_RESERVED_ENTRIES) {
                return Err(reject(Fault::ReservedGref { gref }));
            }
            Ok(Checked::NeedIndirect(IndirectHeader {
                id,
                write,
                sector: i.sector_number,
                nr_segments: n,
                pages,
            }))
        }
    }
}

fn direct(
    r: &BlkifRequest,
    write: bool,
    preflush: bool,
    drain: bool,
    lim: &Limits,
    rsp_op: u8,
) -> Result<Checked, Rejection> {
    let reject = |fault| Rejection {
        id: r.id,
        rsp_op,
        fault,
    };
    if write && lim.read_only {
        return Err(reject(Fault::ReadOnly));
    }
    let Some(segs) = r.segments() else {
        return Err(reject(Fault::TooManySegments {
            count: usize::from(r.nr_segments),
            max: BLKIF_MAX_SEGMENTS_PER_REQUEST,
        }));
    };
    let action = check_segments(write, r.sector_number, segs, lim).map_err(reject)?;
    let action = match action {
        Action::Write {
            offset,
            segs,
            bytes,
            ..
        } => Action::Write {
            offset,
            segs,
            bytes,
            preflush,
            // A flush or barrier carrying data is the frontend's FUA write: make it durable.
            fua: preflush,
            drain,
        },
        other => other,
    };
    Ok(Checked::Ready(Plan {
        id: r.id,
        rsp_op,
        action,
    }))
}

/// Check a request's segments (direct, or read from indirect pages) and its sector range.
pub fn check_segments(
    write: bool,
    sector: u64,
    segs: &[BlkifRequestSegment],
    lim: &Limits,
) -> Result<Action, Fault> {
    if segs.is_empty() {
        return Err(Fault::NoSegments);
    }
    let mut sectors = 0u64;
    for (index, s) in segs.iter().enumerate() {
        let Some(n) = s.sectors() else {
            return Err(Fault::BadSegment {
                index,
                first: s.first_sect,
                last: s.last_sect,
            });
        };
        if s.gref < NR_RESERVED_ENTRIES {
            return Err(Fault::ReservedGref { gref: s.gref });
        }
        sectors += n;
    }
    let (offset, len) = check_range(sector, sectors, lim)?;
    // At most 4096 segments of 4 KiB: 16 MiB, which fits usize.
    let bytes = len as usize;
    let segs = segs.to_vec();
    Ok(if write {
        Action::Write {
            offset,
            segs,
            bytes,
            preflush: false,
            fua: false,
            drain: false,
        }
    } else {
        Action::Read {
            offset,
            segs,
            bytes,
        }
    })
}

/// `sector .. sector + sectors` (512-byte units) must lie within the disk and be aligned to
/// its logical sector size; returns the byte offset and length.
fn check_range(sector: u64, sectors: u64, lim: &Limits) -> Result<(u64, u64), Fault> {
    match sector.checked_add(sectors) {
        Some(end) if end <= lim.capacity_512 => {}
        _ => return Err(Fault::OutOfRange { sector, sectors }),
    }
    let k = lim.sectors_per_block();
    if !sector.is_multiple_of(k) || !sectors.is_multiple_of(k) {
        return Err(Fault::Misaligned { sector, sectors });
    }
    // end <= capacity_512 = capacity_bytes / 512, so neither product overflows.
    Ok((sector << SECTOR_SHIFT, sectors << SECTOR_SHIFT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_abi::blkif::{
        BlkifRequestDiscard, BlkifRequestIndirect, BlkifRequestSlot, DirectSegments, IndirectGrefs,
    };

    fn lim() -> Limits {
        Limits {
            sector_size: 512,
            capacity_512: 1024,
            read_only: false,
            flush: true,
            barrier: true,
            discard: true,
            discard_secure: false,
            max_indirect_segments: 1024,
        }
    }

    fn seg(gref: u32, first: u8, last: u8) -> BlkifRequestSegment {
        BlkifRequestSegment {
            gref,
            first_sect: first,
            last_sect: last,
        }
    }

    fn rw(operation: u8, sector: u64, segs: &[BlkifRequestSegment]) -> BlkifRequestKind {
        let mut s = DirectSegments::default();
        s.0[..segs.len()].copy_from_slice(segs);
        let r = BlkifRequest {
            operation,
            nr_segments: segs.len() as u8,
            handle: 0,
            id: 42,
            sector_number: sector,
            seg: s,
        };
        BlkifRequestSlot::from_rw(&r).parse()
    }

    fn fault(r: Result<Checked, Rejection>) -> Fault {
        let rej = r.unwrap_err();
        assert_eq!(rej.id, 42);
        rej.fault
    }

    #[test]
    fn read_of_two_segments_becomes_byte_plan() {
        let k = rw(op::READ, 8, &[seg(8, 2, 7), seg(9, 0, 0)]);
        let Checked::Ready(p) = check_request(&k, &lim()).unwrap() else {
            panic!()
        };
        assert_eq!(p.rsp_op, op::READ);
        assert_eq!(p.bytes(), 7 * 512);
        assert!(matches!(p.action, Action::Read { offset: 4096, .. }));
    }

    #[test]
    fn sector_ranges_beyond_disk_or_overflowing_are_refused() {
        let full = [seg(8, 0, 7)];
        assert!(check_request(&rw(op::READ, 1016, &full), &lim()).is_ok());
        assert_eq!(
            fault(check_request(&rw(op::READ, 1017, &full), &lim())),
            Fault::OutOfRange {
                sector: 1017,
                sectors: 8
            }
        );
        assert_eq!(
            fault(check_request(&rw(op::WRITE, u64::MAX - 3, &full), &lim())),
            Fault::OutOfRange {
                sector: u64::MAX - 3,
                sectors: 8
            }
        );
        let d = BlkifRequestDiscard {
            operation: op::DISCARD,
            id: 42,
            sector_number: 1,
            nr_sectors: u64::MAX,
            ..Default::default()
        };
        let k = BlkifRequestSlot::from_discard(&d).parse();
        assert!(matches!(
            fault(check_request(&k, &lim())),
            Fault::OutOfRange { .. }
        ));
    }

    #[test]
    fn bad_segments_counts_and_refs_are_refused_with_error() {
        let l = lim();
        let f = fault(check_request(&rw(op::READ, 0, &[seg(8, 5, 4)]), &l));
        assert_eq!(
            f,
            Fault::BadSegment {
                index: 0,
                first: 5,
                last: 4
            }
        );
        assert_eq!(f.status(), rsp::ERROR);
        assert!(matches!(
            fault(check_request(
                &rw(op::READ, 0, &[seg(8, 0, 7), seg(9, 0, 8)]),
                &l
            )),
            Fault::BadSegment { index: 1, .. }
        ));
        assert_eq!(
            fault(check_request(&rw(op::READ, 0, &[]), &l)),
            Fault::NoSegments
        );
        assert_eq!(
            fault(check_request(&rw(op::WRITE, 0, &[seg(7, 0, 7)]), &l)),
            Fault::ReservedGref { gref: 7 }
        );
        let mut r = BlkifRequest {
            operation: op::READ,
            nr_segments: 12,
            id: 42,
            ..Default::default()
        };
        let k = BlkifRequestSlot::from_rw(&r).parse();
        assert_eq!(
            fault(check_request(&k, &l)),
            Fault::TooManySegments { count: 12, max: 11 }
        );
        r.operation = 9;
        let f = fault(check_request(&BlkifRequestSlot::from_rw(&r).parse(), &l));
        assert_eq!(f, Fault::UnknownOperation(9));
        assert_eq!(f.status(), rsp::EOPNOTSUPP);
    }

    #[test]
    fn unnegotiated_features_answer_eopnotsupp_and_read_only_refuses_writes() {
        let mut l = lim();
        l.flush = false;
        l.barrier = false;
        l.discard = false;
        l.max_indirect_segments = 0;
        for o in [op::FLUSH_DISKCACHE, op::WRITE_BARRIER] {
            let f = fault(check_request(&rw(o, 0, &[]), &l));
            assert_eq!(f, Fault::NotNegotiated(o));
            assert_eq!(f.status(), rsp::EOPNOTSUPP);
        }
        let i = BlkifRequestIndirect {
            operation: op::INDIRECT,
            indirect_op: op::READ,
            nr_segments: 20,
            id: 42,
            ..Default::default()
        };
        let k = BlkifRequestSlot::from_indirect(&i).parse();
        assert_eq!(
            fault(check_request(&k, &l)),
            Fault::NotNegotiated(op::INDIRECT)
        );
        let mut l = lim();
        l.read_only = true;
        assert_eq!(
            fault(check_request(&rw(op::WRITE, 0, &[seg(8, 0, 7)]), &l)),
            Fault::ReadOnly
        );
        assert!(check_request(&rw(op::READ, 0, &[seg(8, 0, 7)]), &l).is_ok());
    }

    #[test]
    fn flush_and_barrier_without_data_are_flushes_with_data_fua_writes() {
        let Checked::Ready(p) = check_request(&rw(op::WRITE_BARRIER, 0, &[]), &lim()).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.action, Action::Flush { drain: true });
        assert!(p.drains());
        let Checked::Ready(p) =
            check_request(&rw(op::FLUSH_DISKCACHE, 8, &[seg(8, 0, 7)]), &lim()).unwrap()
        else {
            panic!()
        };
        assert!(matches!(
            p.action,
            Action::Write {
                preflush: true,
                fua: true,
                drain: false,
                ..
            }
        ));
    }

    #[test]
    fn indirect_header_limits() {
        let mut i = BlkifRequestIndirect {
            operation: op::INDIRECT,
            indirect_op: op::WRITE,
            nr_segments: 600,
            id: 42,
            indirect_grefs: IndirectGrefs([20, 21, 3, 0, 0, 0, 0, 0]),
            ..Default::default()
        };
        let c = check_request(&BlkifRequestSlot::from_indirect(&i).parse(), &lim()).unwrap();
        let Checked::NeedIndirect(h) = c else {
            panic!()
        };
        assert_eq!(h.pages, [20, 21]);
        assert!(h.write);
        i.nr_segments = 1025;
        assert_eq!(
            fault(check_request(
                &BlkifRequestSlot::from_indirect(&i).parse(),
                &lim()
            )),
            Fault::TooManySegments {
                count: 1025,
                max: 1024
            }
        );
        i.nr_segments = 0;
        assert_eq!(
            fault(check_request(
                &BlkifRequestSlot::from_indirect(&i).parse(),
                &lim()
            )),
            Fault::NoSegments
        );
        i.nr_segments = 1;
        i.indirect_op = op::DISCARD;
        let rej = check_request(&BlkifRequestSlot::from_indirect(&i).parse(), &lim()).unwrap_err();
        assert_eq!(rej.fault, Fault::BadIndirectOp(op::DISCARD));
        assert_eq!(rej.rsp_op, op::DISCARD);
    }

    #[test]
    fn large_logical_sectors_require_aligned_ranges() {
        let mut l = lim();
        l.sector_size = 4096;
        assert!(check_request(&rw(op::READ, 8, &[seg(8, 0, 7)]), &l).is_ok());
        assert_eq!(
            fault(check_request(&rw(op::READ, 4, &[seg(8, 0, 7)]), &l)),
            Fault::Misaligned {
                sector: 4,
                sectors: 8
            }
        );
        assert_eq!(
            fault(check_request(&rw(op::READ, 8, &[seg(8, 0, 3)]), &l)),
            Fault::Misaligned {
                sector: 8,
                sectors: 4
            }
        );
    }
}
