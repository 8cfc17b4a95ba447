//! Grant table v1 ABI (`grant_table.h`, XEN-ABI.md §3): the 8-byte entry, `GTF_*` flags,
//! `GNTTABOP_*` numbers and argument structs (layouts asserted at compile time), `GNTMAP_*`,
//! `GNTCOPY_*` and the `GNTST_*` status codes.
//!
//! Each op struct has `from_bytes` (exactly its size, little-endian, `None` otherwise) and
//! `to_bytes`; values are unchecked allegations that `core-hv`'s grant code validates.

use crate::DomId;
use crate::PAGE_SIZE;
use crate::ring::le_struct;

/// `grant_ref_t`.
pub type GrantRef = u32;
/// `grant_handle_t`.
pub type GrantHandle = u32;

/// Grant references reserved for the toolstack (`GNTTAB_NR_RESERVED_ENTRIES`); guests
/// allocate from 8 upwards.
pub const NR_RESERVED_ENTRIES: u32 = 8;
/// Grant mappings one Bulkhead domain may hold at once (its maptrack quota); a map beyond it
/// fails with `GNTST_no_space`. Backends divide it among their frontends.
pub const DEFAULT_MAPTRACK_QUOTA: u32 = 1024;
/// Reserved ref: the console ring page.
pub const RESERVED_CONSOLE: GrantRef = 0;
/// Reserved ref: the xenstore ring page.
pub const RESERVED_XENSTORE: GrantRef = 1;
/// v1 entries in one grant-table frame.
pub const ENTRIES_PER_FRAME: u32 = (PAGE_SIZE / GrantEntryV1::WIRE_SIZE) as u32;
/// Xen's default maximum number of grant-table frames per domain (`gnttab_max_frames`).
pub const DEFAULT_MAX_FRAMES: u32 = 64;

/// `GNTTABOP_*` numbers (argument 1 of `grant_table_op`).
pub mod op {
    pub const MAP_GRANT_REF: u32 = 0;
    pub const UNMAP_GRANT_REF: u32 = 1;
    pub const SETUP_TABLE: u32 = 2;
    pub const DUMP_TABLE: u32 = 3;
    pub const TRANSFER: u32 = 4;
    pub const COPY: u32 = 5;
    pub const QUERY_SIZE: u32 = 6;
    pub const UNMAP_AND_REPLACE: u32 = 7;
    pub const SET_VERSION: u32 = 8;
    pub const GET_STATUS_FRAMES: u32 = 9;
    pub const GET_VERSION: u32 = 10;
    pub const SWAP_GRANT_REF: u32 = 11;
    pub const CACHE_FLUSH: u32 = 12;
}

/// `GTF_*` bits of a v1 entry's `flags` word.
pub mod gtf {
    pub const INVALID: u16 = 0;
    pub const PERMIT_ACCESS: u16 = 1;
    pub const ACCEPT_TRANSFER: u16 = 2;
    pub const TRANSITIVE: u16 = 3;
    pub const TYPE_MASK: u16 = 0x3;
    pub const READONLY: u16 = 1 << 2;
    pub const READING: u16 = 1 << 3;
    pub const WRITING: u16 = 1 << 4;
    pub const PWT: u16 = 1 << 5;
    pub const PCD: u16 = 1 << 6;
    pub const PAT: u16 = 1 << 7;
    pub const SUB_PAGE: u16 = 1 << 8;
    /// `accept_transfer` entries only.
    pub const TRANSFER_COMMITTED: u16 = 1 << 2;
    /// `accept_transfer` entries only.
    pub const TRANSFER_COMPLETED: u16 = 1 << 3;
}

/// `GNTMAP_*` flags of `map_grant_ref` / `unmap_grant_ref`.
pub mod gntmap {
    pub const DEVICE_MAP: u32 = 1 << 0;
    pub const HOST_MAP: u32 = 1 << 1;
    pub const READONLY: u32 = 1 << 2;
    pub const APPLICATION_MAP: u32 = 1 << 3;
    pub const CONTAINS_PTE: u32 = 1 << 4;
    /// Bits 16..31 are the guest's to use.
    pub const GUEST_AVAIL_MASK: u32 = 0xFFFF_0000;
}

/// `GNTCOPY_*` flags of [`GnttabCopy::flags`].
pub mod gntcopy {
    /// `source.u` is a grant ref in `source.domid`'s table (else a frame of the caller).
    pub const SOURCE_GREF: u16 = 1 << 0;
    /// `dest.u` is a grant ref in `dest.domid`'s table.
    pub const DEST_GREF: u16 = 1 << 1;
}

/// `GNTTAB_CACHE_*` bits of [`GnttabCacheFlush::op`].
pub mod cache_flush {
    pub const CLEAN: u32 = 1 << 0;
    pub const INVAL: u32 = 1 << 1;
    pub const SOURCE_GREF: u32 = 1 << 31;
}

/// `GNTST_*` status codes (an `i16` in every op struct).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum GntStatus {
    Okay = 0,
    GeneralError = -1,
    BadDomain = -2,
    BadGntref = -3,
    BadHandle = -4,
    BadVirtAddr = -5,
    BadDevAddr = -6,
    NoDeviceSpace = -7,
    PermissionDenied = -8,
    BadPage = -9,
    BadCopyArg = -10,
    AddressTooBig = -11,
    Eagain = -12,
    NoSpace = -13,
}

impl GntStatus {
    /// Every status, in numeric order from 0 down.
    pub const ALL: &'static [GntStatus] = &[
        GntStatus::Okay,
        GntStatus::GeneralError,
        GntStatus::BadDomain,
        GntStatus::BadGntref,
        GntStatus::BadHandle,
        GntStatus::BadVirtAddr,
        GntStatus::BadDevAddr,
        GntStatus::NoDeviceSpace,
        GntStatus::PermissionDenied,
        GntStatus::BadPage,
        GntStatus::BadCopyArg,
        GntStatus::AddressTooBig,
        GntStatus::Eagain,
        GntStatus::NoSpace,
    ];

    /// The wire value.
    pub const fn as_i16(self) -> i16 {
        self as i16
    }

    /// The status for a wire value, if Xen defines it.
    pub fn from_i16(v: i16) -> Option<Self> {
        GntStatus::ALL.iter().copied().find(|s| s.as_i16() == v)
    }
}

/// `grant_entry_v1`: what a granting domain writes in its table for each ref.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantEntryV1 {
    /// `GTF_*`; written last by the granter, after `domid` and `frame`.
    pub flags: u16,
    /// The grantee.
    pub domid: DomId,
    /// The granted frame (GFN).
    pub frame: u32,
}
le_struct!(GrantEntryV1, 8; flags: u16 @ 0, domid: u16 @ 2, frame: u32 @ 4);

/// `gnttab_map_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabMapGrantRef {
    pub host_addr: u64,
    pub flags: u32,
    pub gref: GrantRef,
    pub dom: DomId,
    /// Out: `GNTST_*`.
    pub status: i16,
    /// Out.
    pub handle: GrantHandle,
    /// Out.
    pub dev_bus_addr: u64,
}
le_struct!(GnttabMapGrantRef, 32; host_addr: u64 @ 0, flags: u32 @ 8, gref: u32 @ 12,
    dom: u16 @ 16, status: i16 @ 18, handle: u32 @ 20, dev_bus_addr: u64 @ 24);

/// `gnttab_unmap_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabUnmapGrantRef {
    pub host_addr: u64,
    pub dev_bus_addr: u64,
    pub handle: GrantHandle,
    /// Out.
    pub status: i16,
}
le_struct!(GnttabUnmapGrantRef, 24; host_addr: u64 @ 0, dev_bus_addr: u64 @ 8,
    handle: u32 @ 16, status: i16 @ 20);

/// `gnttab_setup_table`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabSetupTable {
    pub dom: DomId,
    pub nr_frames: u32,
    /// Out.
    pub status: i16,
    /// Guest handle (address) of a `xen_pfn_t[nr_frames]` array (out).
    pub frame_list: u64,
}
le_struct!(GnttabSetupTable, 24; dom: u16 @ 0, nr_frames: u32 @ 4, status: i16 @ 8,
    frame_list: u64 @ 16);

/// `gnttab_dump_table`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabDumpTable {
    pub dom: DomId,
    /// Out.
    pub status: i16,
}
le_struct!(GnttabDumpTable, 4; dom: u16 @ 0, status: i16 @ 2);

/// `gnttab_transfer`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabTransfer {
    pub mfn: u64,
    pub domid: DomId,
    pub gref: GrantRef,
    /// Out.
    pub status: i16,
}
le_struct!(GnttabTransfer, 24; mfn: u64 @ 0, domid: u16 @ 8, gref: u32 @ 12, status: i16 @ 16);

/// One side of a [`GnttabCopy`]: a grant ref or a frame of the caller's, a domain and an
/// offset into the page.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabCopyPtr {
    /// A grant ref (`GNTCOPY_*_gref` set) or a GFN.
    pub u: u64,
    pub domid: DomId,
    pub offset: u16,
}
le_struct!(GnttabCopyPtr, 16; u: u64 @ 0, domid: u16 @ 8, offset: u16 @ 10);

/// `gnttab_copy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabCopy {
    pub source: GnttabCopyPtr,
    pub dest: GnttabCopyPtr,
    pub len: u16,
    /// `GNTCOPY_*`.
    pub flags: u16,
    /// Out.
    pub status: i16,
}
le_struct!(GnttabCopy, 40; source: GnttabCopyPtr @ 0, dest: GnttabCopyPtr @ 16, len: u16 @ 32,
    flags: u16 @ 34, status: i16 @ 36);

/// `gnttab_query_size`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabQuerySize {
    pub dom: DomId,
    /// Out.
    pub nr_frames: u32,
    /// Out.
    pub max_nr_frames: u32,
    /// Out.
    pub status: i16,
}
le_struct!(GnttabQuerySize, 16; dom: u16 @ 0, nr_frames: u32 @ 4, max_nr_frames: u32 @ 8,
    status: i16 @ 12);

/// `gnttab_unmap_and_replace`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabUnmapAndReplace {
    pub host_addr: u64,
    pub new_addr: u64,
    pub handle: GrantHandle,
    /// Out.
    pub status: i16,
}
le_struct!(GnttabUnmapAndReplace, 24; host_addr: u64 @ 0, new_addr: u64 @ 8, handle: u32 @ 16,
    status: i16 @ 20);

/// `gnttab_set_version`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabSetVersion {
    /// In/out.
    pub version: u32,
}
le_struct!(GnttabSetVersion, 4; version: u32 @ 0);

/// `gnttab_get_status_frames` (v2 only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabGetStatusFrames {
    pub nr_frames: u32,
    pub dom: DomId,
    /// Out.
    pub status: i16,
    /// Guest handle of a `u64[nr_frames]` array (out).
    pub frame_list: u64,
}
le_struct!(GnttabGetStatusFrames, 16; nr_frames: u32 @ 0, dom: u16 @ 4, status: i16 @ 6,
    frame_list: u64 @ 8);

/// `gnttab_get_version`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabGetVersion {
    pub dom: DomId,
    pub pad: u16,
    /// Out.
    pub version: u32,
}
le_struct!(GnttabGetVersion, 8; dom: u16 @ 0, pad: u16 @ 2, version: u32 @ 4);

/// `gnttab_swap_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabSwapGrantRef {
    pub ref_a: GrantRef,
    pub ref_b: GrantRef,
    /// Out.
    pub status: i16,
}
le_struct!(GnttabSwapGrantRef, 12; ref_a: u32 @ 0, ref_b: u32 @ 4, status: i16 @ 8);

/// `gnttab_cache_flush`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GnttabCacheFlush {
    /// `dev_bus_addr` or a grant ref (`GNTTAB_CACHE_SOURCE_GREF`).
    pub a: u64,
    pub offset: u16,
    pub length: u16,
    /// `GNTTAB_CACHE_*`.
    pub op: u32,
}
le_struct!(GnttabCacheFlush, 16; a: u64 @ 0, offset: u16 @ 8, length: u16 @ 10, op: u32 @ 12);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_per_frame_is_512() {
        assert_eq!(ENTRIES_PER_FRAME, 512);
    }

    #[test]
    fn grant_entry_wire_layout() {
        let e = GrantEntryV1 {
            flags: gtf::PERMIT_ACCESS | gtf::READONLY,
            domid: 3,
            frame: 0x1234_5678,
        };
        assert_eq!(e.to_bytes(), [0x05, 0, 3, 0, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!(GrantEntryV1::from_bytes(&e.to_bytes()), Some(e));
        assert_eq!(GrantEntryV1::from_bytes(&[0; 7]), None);
    }

    #[test]
    fn status_codes_match_xen_values_and_round_trip() {
        assert_eq!(GntStatus::Okay.as_i16(), 0);
        assert_eq!(GntStatus::BadGntref.as_i16(), -3);
        assert_eq!(GntStatus::PermissionDenied.as_i16(), -8);
        assert_eq!(GntStatus::BadCopyArg.as_i16(), -10);
        assert_eq!(GntStatus::NoSpace.as_i16(), -13);
        for (i, s) in GntStatus::ALL.iter().enumerate() {
            assert_eq!(s.as_i16(), -(i as i16));
            assert_eq!(GntStatus::from_i16(s.as_i16()), Some(*s));
        }
        assert_eq!(GntStatus::from_i16(-14), None);
        assert_eq!(GntStatus::from_i16(1), None);
    }

    #[test]
    fn map_grant_ref_fields_at_xen_offsets() {
        let m = GnttabMapGrantRef {
            host_addr: 0x1000,
            flags: gntmap::HOST_MAP | gntmap::READONLY,
            gref: 9,
            dom: 2,
            status: GntStatus::BadGntref.as_i16(),
            handle: 77,
            dev_bus_addr: 0xABCD,
        };
        let b = m.to_bytes();
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 6);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 9);
        assert_eq!(i16::from_le_bytes(b[18..20].try_into().unwrap()), -3);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 77);
        assert_eq!(GnttabMapGrantRef::from_bytes(&b), Some(m));
    }

    #[test]
    fn copy_nests_both_sides_at_xen_offsets() {
        let c = GnttabCopy {
            source: GnttabCopyPtr {
                u: 5,
                domid: 1,
                offset: 100,
            },
            dest: GnttabCopyPtr {
                u: 0x55,
                domid: 0x7FF0,
                offset: 8,
            },
            len: 64,
            flags: gntcopy::SOURCE_GREF,
            status: 0,
        };
        let b = c.to_bytes();
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0x55);
        assert_eq!(u16::from_le_bytes(b[24..26].try_into().unwrap()), 0x7FF0);
        assert_eq!(u16::from_le_bytes(b[26..28].try_into().unwrap()), 8);
        assert_eq!(u16::from_le_bytes(b[32..34].try_into().unwrap()), 64);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 1);
        assert_eq!(GnttabCopy::from_bytes(&b), Some(c));
    }

    #[test]
    fn other_op_structs_round_trip() {
        let u = GnttabUnmapGrantRef {
            host_addr: 1,
            dev_bus_addr: 2,
            handle: 3,
            status: -4,
        };
        assert_eq!(GnttabUnmapGrantRef::from_bytes(&u.to_bytes()), Some(u));
        let s = GnttabSetupTable {
            dom: 1,
            nr_frames: 4,
            status: 0,
            frame_list: 0x9000,
        };
        assert_eq!(GnttabSetupTable::from_bytes(&s.to_bytes()), Some(s));
        let q = GnttabQuerySize {
            dom: 1,
            nr_frames: 1,
            max_nr_frames: 64,
            status: 0,
        };
        assert_eq!(GnttabQuerySize::from_bytes(&q.to_bytes()), Some(q));
        let t = GnttabTransfer {
            mfn: 7,
            domid: 2,
            gref: 9,
            status: -1,
        };
        assert_eq!(GnttabTransfer::from_bytes(&t.to_bytes()), Some(t));
        let d = GnttabDumpTable { dom: 3, status: -2 };
        assert_eq!(GnttabDumpTable::from_bytes(&d.to_bytes()), Some(d));
        let r = GnttabUnmapAndReplace {
            host_addr: 1,
            new_addr: 2,
            handle: 3,
            status: 0,
        };
        assert_eq!(GnttabUnmapAndReplace::from_bytes(&r.to_bytes()), Some(r));
        let v = GnttabSetVersion { version: 1 };
        assert_eq!(GnttabSetVersion::from_bytes(&v.to_bytes()), Some(v));
        let g = GnttabGetStatusFrames {
            nr_frames: 1,
            dom: 2,
            status: 0,
            frame_list: 8,
        };
        assert_eq!(GnttabGetStatusFrames::from_bytes(&g.to_bytes()), Some(g));
        let gv = GnttabGetVersion {
            dom: 1,
            pad: 0,
            version: 1,
        };
        assert_eq!(GnttabGetVersion::from_bytes(&gv.to_bytes()), Some(gv));
        let sw = GnttabSwapGrantRef {
            ref_a: 8,
            ref_b: 9,
            status: 0,
        };
        assert_eq!(GnttabSwapGrantRef::from_bytes(&sw.to_bytes()), Some(sw));
        let cf = GnttabCacheFlush {
            a: 8,
            offset: 0,
            length: 4096,
            op: cache_flush::CLEAN,
        };
        assert_eq!(GnttabCacheFlush::from_bytes(&cf.to_bytes()), Some(cf));
    }
}
