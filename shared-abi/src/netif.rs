//! Xen network protocol (`io/netif.h`, XEN-ABI.md §6.1): the tx/rx ring entries, the extra-info
//! slot, the optional control ring, and their flag and status numbers.
//!
//! Owns only the wire contract. Every struct is `#[repr(C)]` with its size and field offsets
//! asserted at compile time, a little-endian codec (`from_bytes`/`to_bytes`) and, for ring
//! entries, a [`RingEntry`] impl so it travels on [`crate::ring`]'s generic ring. Decoding never
//! fails on content (every byte pattern is *some* value): deciding whether a request makes sense
//! is the backend's job, after the copy out of the shared page.
//!
//! An extra-info slot is not an entry type of its own: the frontend writes a
//! [`NetifExtraInfo`] into a tx *request* slot (after a request flagged
//! [`nettxf::EXTRA_INFO`]) and the backend writes one into an rx *response* slot, so it converts
//! from and to those two entry types byte for byte.

use crate::grant_table::GrantRef;
use crate::ring::{LeField, RingEntry, le_struct, ring_entries, slot_bytes};

/// A backend must accept tx packets that use up to this many data slots
/// (`XEN_NETIF_NR_SLOTS_MIN`).
pub const XEN_NETIF_NR_SLOTS_MIN: usize = 18;
/// Largest tx packet, the first request's `size` field being a `u16` (`XEN_NETIF_MAX_TX_SIZE`).
pub const XEN_NETIF_MAX_TX_SIZE: usize = 0xFFFF;

/// `NETTXF_*`: flags of [`NetifTxRequest::flags`].
pub mod nettxf {
    /// The protocol checksum is not computed yet (partial checksum offload).
    pub const CSUM_BLANK: u16 = 1 << 0;
    /// The packet's checksum was already validated.
    pub const DATA_VALIDATED: u16 = 1 << 1;
    /// The packet continues in the next request.
    pub const MORE_DATA: u16 = 1 << 2;
    /// The next slot holds a [`super::NetifExtraInfo`].
    pub const EXTRA_INFO: u16 = 1 << 3;
    /// Every defined bit; anything else is garbage.
    pub const ALL: u16 = CSUM_BLANK | DATA_VALIDATED | MORE_DATA | EXTRA_INFO;
}

/// `NETRXF_*`: flags of [`NetifRxResponse::flags`].
pub mod netrxf {
    pub const DATA_VALIDATED: u16 = 1 << 0;
    pub const CSUM_BLANK: u16 = 1 << 1;
    pub const MORE_DATA: u16 = 1 << 2;
    pub const EXTRA_INFO: u16 = 1 << 3;
    /// Deprecated GSO-prefix scheme; never produced by Bulkhead.
    pub const GSO_PREFIX: u16 = 1 << 4;
}

/// `NETIF_RSP_*`: status of a tx response (an rx response's status is a byte count when ≥ 0).
pub mod rsp {
    pub const OKAY: i16 = 0;
    pub const ERROR: i16 = -1;
    pub const DROPPED: i16 = -2;
    /// The slot held an extra-info, not data.
    pub const NULL: i16 = 1;
}

/// `XEN_NETIF_EXTRA_TYPE_*`.
pub mod extra_type {
    pub const NONE: u8 = 0;
    pub const GSO: u8 = 1;
    pub const MCAST_ADD: u8 = 2;
    pub const MCAST_DEL: u8 = 3;
    pub const HASH: u8 = 4;
    /// One past the last defined type.
    pub const MAX: u8 = 5;
}

/// `XEN_NETIF_EXTRA_FLAG_MORE`: another extra-info slot follows.
pub const XEN_NETIF_EXTRA_FLAG_MORE: u8 = 1 << 0;

/// `XEN_NETIF_GSO_TYPE_*`.
pub mod gso_type {
    pub const NONE: u8 = 0;
    pub const TCPV4: u8 = 1;
    pub const TCPV6: u8 = 2;
}

/// `netif_tx_request`: one slot of a packet the frontend sends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifTxRequest {
    /// Grant of the page holding this fragment.
    pub gref: GrantRef,
    /// Offset of the fragment in that page.
    pub offset: u16,
    /// `NETTXF_*`.
    pub flags: u16,
    /// Echoed in the response.
    pub id: u16,
    /// First slot: the whole packet's length; later slots: this fragment's length.
    pub size: u16,
}
le_struct!(NetifTxRequest, 12; gref: u32 @ 0, offset: u16 @ 4, flags: u16 @ 6, id: u16 @ 8,
    size: u16 @ 10);

/// `netif_tx_response`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifTxResponse {
    pub id: u16,
    /// `NETIF_RSP_*`.
    pub status: i16,
}
le_struct!(NetifTxResponse, 4; id: u16 @ 0, status: i16 @ 2);

/// `netif_rx_request`: an empty page the frontend posts for the backend to fill.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifRxRequest {
    pub id: u16,
    pub pad: u16,
    pub gref: GrantRef,
}
le_struct!(NetifRxRequest, 8; id: u16 @ 0, pad: u16 @ 2, gref: u32 @ 4);

/// `netif_rx_response`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifRxResponse {
    pub id: u16,
    /// Where the data starts in the posted page.
    pub offset: u16,
    /// `NETRXF_*`.
    pub flags: u16,
    /// Bytes in this slot when ≥ 0, else an error (`NETIF_RSP_*`).
    pub status: i16,
}
le_struct!(NetifRxResponse, 8; id: u16 @ 0, offset: u16 @ 2, flags: u16 @ 4, status: i16 @ 6);

/// The 6-byte union of `netif_extra_info`, kept as raw bytes; [`NetifExtraInfo`] gives typed
/// views.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtraPayload(pub [u8; 6]);

impl LeField for ExtraPayload {
    const LEN: usize = 6;
    fn read_le(bytes: &[u8]) -> Option<Self> {
        Some(ExtraPayload(bytes.get(..6)?.try_into().ok()?))
    }
    fn write_le(&self, out: &mut [u8]) {
        if let Some(dst) = out.get_mut(..6) {
            dst.copy_from_slice(&self.0);
        }
    }
}

/// `netif_extra_info`: an extra slot after a tx request flagged `EXTRA_INFO`, or after the
/// first rx response flagged `EXTRA_INFO`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifExtraInfo {
    /// `XEN_NETIF_EXTRA_TYPE_*`.
    pub kind: u8,
    /// `XEN_NETIF_EXTRA_FLAG_*`.
    pub flags: u8,
    /// The type-dependent union.
    pub payload: ExtraPayload,
}
le_struct!(NetifExtraInfo, 8; kind: u8 @ 0, flags: u8 @ 1, payload: ExtraPayload @ 2);

/// The GSO view of an extra-info (`u.gso`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GsoInfo {
    /// Maximum segment size.
    pub size: u16,
    /// `XEN_NETIF_GSO_TYPE_*`.
    pub kind: u8,
    /// `XEN_NETIF_GSO_FEAT_*` (none are defined).
    pub features: u16,
}

/// The hash view of an extra-info (`u.hash`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashInfo {
    pub kind: u8,
    pub algorithm: u8,
    pub value: [u8; 4],
}

impl NetifExtraInfo {
    /// A GSO extra.
    pub fn gso(info: GsoInfo, flags: u8) -> Self {
        let s = info.size.to_le_bytes();
        let f = info.features.to_le_bytes();
        NetifExtraInfo {
            kind: extra_type::GSO,
            flags,
            payload: ExtraPayload([s[0], s[1], info.kind, 0, f[0], f[1]]),
        }
    }

    /// A multicast add (`add == true`) or delete extra.
    pub fn mcast(add: bool, addr: [u8; 6], flags: u8) -> Self {
        NetifExtraInfo {
            kind: if add {
                extra_type::MCAST_ADD
            } else {
                extra_type::MCAST_DEL
            },
            flags,
            payload: ExtraPayload(addr),
        }
    }

    /// A hash extra.
    pub fn hash(info: HashInfo, flags: u8) -> Self {
        let v = info.value;
        NetifExtraInfo {
            kind: extra_type::HASH,
            flags,
            payload: ExtraPayload([info.kind, info.algorithm, v[0], v[1], v[2], v[3]]),
        }
    }

    /// The payload read as `u.gso` (meaningful when `kind == GSO`).
    pub fn as_gso(&self) -> GsoInfo {
        let p = self.payload.0;
        GsoInfo {
            size: u16::from_le_bytes([p[0], p[1]]),
            kind: p[2],
            features: u16::from_le_bytes([p[4], p[5]]),
        }
    }

    /// The payload read as `u.mcast.addr` (meaningful for MCAST_ADD/DEL).
    pub fn as_mcast_addr(&self) -> [u8; 6] {
        self.payload.0
    }

    /// The payload read as `u.hash` (meaningful when `kind == HASH`).
    pub fn as_hash(&self) -> HashInfo {
        let p = self.payload.0;
        HashInfo {
            kind: p[0],
            algorithm: p[1],
            value: [p[2], p[3], p[4], p[5]],
        }
    }

    /// True if another extra-info slot follows this one.
    pub fn has_more(&self) -> bool {
        self.flags & XEN_NETIF_EXTRA_FLAG_MORE != 0
    }

    /// Reinterpret a tx request slot as the extra-info the frontend wrote there (its first 8
    /// bytes).
    pub fn from_tx_slot(slot: &NetifTxRequest) -> Self {
        let bytes = slot.to_bytes();
        let mut e = [0u8; 8];
        e.copy_from_slice(&bytes[..8]);
        Self::from_wire(e)
    }

    /// The tx request slot a frontend writes to carry this extra-info (trailing bytes zero).
    pub fn to_tx_slot(&self) -> NetifTxRequest {
        let mut bytes = [0u8; 12];
        bytes[..8].copy_from_slice(&self.to_bytes());
        NetifTxRequest::decode(&bytes)
    }

    /// The rx response slot a backend writes to carry this extra-info.
    pub fn to_rx_slot(&self) -> NetifRxResponse {
        NetifRxResponse::decode(&self.to_bytes())
    }

    /// Reinterpret an rx response slot as an extra-info.
    pub fn from_rx_slot(slot: &NetifRxResponse) -> Self {
        Self::from_wire(slot.to_bytes())
    }

    fn from_wire(bytes: [u8; 8]) -> Self {
        let mut p = [0u8; 6];
        p.copy_from_slice(&bytes[2..]);
        NetifExtraInfo {
            kind: bytes[0],
            flags: bytes[1],
            payload: ExtraPayload(p),
        }
    }
}

/// Control ring (`netif_ctrl_*`, optional): request/response types.
pub mod ctrl_type {
    pub const INVALID: u16 = 0;
    pub const GET_HASH_FLAGS: u16 = 1;
    pub const SET_HASH_FLAGS: u16 = 2;
    pub const SET_HASH_KEY: u16 = 3;
    pub const GET_HASH_MAPPING_SIZE: u16 = 4;
    pub const SET_HASH_MAPPING_SIZE: u16 = 5;
    pub const SET_HASH_MAPPING: u16 = 6;
    pub const SET_HASH_ALGORITHM: u16 = 7;
    pub const GET_GREF_MAPPING_SIZE: u16 = 8;
    pub const ADD_GREF_MAPPING: u16 = 9;
    pub const DEL_GREF_MAPPING: u16 = 10;
}

/// Control ring response status values (`XEN_NETIF_CTRL_STATUS_*`).
pub mod ctrl_status {
    pub const SUCCESS: u32 = 0;
    pub const NOT_SUPPORTED: u32 = 1;
    pub const INVALID_PARAMETER: u32 = 2;
    pub const BUFFER_OVERFLOW: u32 = 3;
}

/// The three data words of a control request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlData(pub [u32; 3]);

impl LeField for CtrlData {
    const LEN: usize = 12;
    fn read_le(bytes: &[u8]) -> Option<Self> {
        let mut d = [0u32; 3];
        for (w, c) in d.iter_mut().zip(bytes.get(..12)?.chunks_exact(4)) {
            *w = u32::from_le_bytes(c.try_into().ok()?);
        }
        Some(CtrlData(d))
    }
    fn write_le(&self, out: &mut [u8]) {
        if let Some(dst) = out.get_mut(..12) {
            for (c, w) in dst.chunks_exact_mut(4).zip(self.0.iter()) {
                c.copy_from_slice(&w.to_le_bytes());
            }
        }
    }
}

/// `xen_netif_ctrl_request`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifCtrlRequest {
    pub id: u16,
    /// `XEN_NETIF_CTRL_TYPE_*`.
    pub kind: u16,
    pub data: CtrlData,
}
le_struct!(NetifCtrlRequest, 16; id: u16 @ 0, kind: u16 @ 2, data: CtrlData @ 4);

/// `xen_netif_ctrl_response`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifCtrlResponse {
    pub id: u16,
    pub kind: u16,
    /// `XEN_NETIF_CTRL_STATUS_*`.
    pub status: u32,
    pub data: u32,
}
le_struct!(NetifCtrlResponse, 12; id: u16 @ 0, kind: u16 @ 2, status: u32 @ 4, data: u32 @ 8);

macro_rules! ring_entry {
    ($($ty:ident),*) => {$(
        impl RingEntry for $ty {
            fn encode(&self, out: &mut [u8]) {
                if let Some(dst) = out.get_mut(..Self::WIRE_SIZE) {
                    dst.copy_from_slice(&self.to_bytes());
                }
            }
            fn decode(bytes: &[u8]) -> Self {
                // The ring hands exactly WIRE_SIZE bytes; any other length is its bug, and a
                // default value (never trusted anyway) is safer than a panic.
                Self::from_bytes(bytes).unwrap_or_default()
            }
        }
    )*};
}
ring_entry!(
    NetifTxRequest,
    NetifTxResponse,
    NetifRxRequest,
    NetifRxResponse,
    NetifCtrlRequest,
    NetifCtrlResponse
);

/// Slots of a one-page tx ring (XEN-ABI.md §4.1: 256).
pub const TX_RING_ENTRIES: u32 = ring_entries(
    crate::PAGE_SIZE,
    slot_bytes::<NetifTxRequest, NetifTxResponse>(),
);
/// Slots of a one-page rx ring (256).
pub const RX_RING_ENTRIES: u32 = ring_entries(
    crate::PAGE_SIZE,
    slot_bytes::<NetifRxRequest, NetifRxResponse>(),
);
/// Slots of a one-page control ring (128).
pub const CTRL_RING_ENTRIES: u32 = ring_entries(
    crate::PAGE_SIZE,
    slot_bytes::<NetifCtrlRequest, NetifCtrlResponse>(),
);

const _: () = {
    assert!(TX_RING_ENTRIES == 256);
    assert!(RX_RING_ENTRIES == 256);
    assert!(CTRL_RING_ENTRIES == 128);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use crate::ring::{BackRing, FrontRing, SharedRingMem};

    #[test]
    fn one_page_rings_hold_xen_entry_counts() {
        let page = || SharedRingMem::new_owned(PAGE_SIZE).unwrap();
        let tx = FrontRing::<NetifTxRequest, NetifTxResponse>::new(page()).unwrap();
        let rx = FrontRing::<NetifRxRequest, NetifRxResponse>::new(page()).unwrap();
        let ctrl = FrontRing::<NetifCtrlRequest, NetifCtrlResponse>::new(page()).unwrap();
        assert_eq!(tx.nr_ents(), 256);
        assert_eq!(rx.nr_ents(), 256);
        assert_eq!(ctrl.nr_ents(), 128);
        assert_eq!(slot_bytes::<NetifTxRequest, NetifTxResponse>(), 12);
        assert_eq!(slot_bytes::<NetifRxRequest, NetifRxResponse>(), 8);
    }

    #[test]
    fn tx_request_fields_at_xen_offsets() {
        let r = NetifTxRequest {
            gref: 0x0102_0304,
            offset: 0x0506,
            flags: nettxf::MORE_DATA | nettxf::CSUM_BLANK,
            id: 0x0708,
            size: 0x090A,
        };
        let b = r.to_bytes();
        assert_eq!(b, [4, 3, 2, 1, 6, 5, 5, 0, 8, 7, 0xA, 9]);
        assert_eq!(NetifTxRequest::from_bytes(&b), Some(r));
        assert_eq!(NetifTxRequest::from_bytes(&b[..11]), None);
    }

    #[test]
    fn rx_structs_and_tx_response_fields_at_xen_offsets() {
        let q = NetifRxRequest {
            id: 3,
            pad: 0,
            gref: 0xAABB_CCDD,
        };
        assert_eq!(q.to_bytes(), [3, 0, 0, 0, 0xDD, 0xCC, 0xBB, 0xAA]);
        let p = NetifRxResponse {
            id: 1,
            offset: 2,
            flags: netrxf::MORE_DATA,
            status: -1,
        };
        assert_eq!(p.to_bytes(), [1, 0, 2, 0, 4, 0, 0xFF, 0xFF]);
        let t = NetifTxResponse {
            id: 9,
            status: rsp::DROPPED,
        };
        assert_eq!(t.to_bytes(), [9, 0, 0xFE, 0xFF]);
    }

    #[test]
    fn extra_info_gso_view_at_xen_offsets() {
        let e = NetifExtraInfo::gso(
            GsoInfo {
                size: 1448,
                kind: gso_type::TCPV6,
                features: 0,
            },
            XEN_NETIF_EXTRA_FLAG_MORE,
        );
        let b = e.to_bytes();
        assert_eq!(b[0], extra_type::GSO);
        assert_eq!(b[1], 1);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 1448);
        assert_eq!(b[4], gso_type::TCPV6);
        assert_eq!(e.as_gso().size, 1448);
        assert!(e.has_more());
    }

    #[test]
    fn extra_info_round_trips_through_tx_and_rx_slots() {
        let m = NetifExtraInfo::mcast(true, [1, 0x00, 0x5e, 0, 0, 1], 0);
        let tx = m.to_tx_slot();
        assert_eq!(NetifExtraInfo::from_tx_slot(&tx), m);
        assert_eq!(m.as_mcast_addr(), [1, 0, 0x5e, 0, 0, 1]);
        let h = NetifExtraInfo::hash(
            HashInfo {
                kind: 1,
                algorithm: 1,
                value: [1, 2, 3, 4],
            },
            0,
        );
        let rx = h.to_rx_slot();
        assert_eq!(NetifExtraInfo::from_rx_slot(&rx), h);
        assert_eq!(h.as_hash().value, [1, 2, 3, 4]);
        assert_eq!(h.to_bytes()[2..], [1, 1, 1, 2, 3, 4]);
    }

    #[test]
    fn ctrl_structs_at_xen_offsets() {
        let q = NetifCtrlRequest {
            id: 1,
            kind: ctrl_type::SET_HASH_KEY,
            data: CtrlData([8, 40, 0]),
        };
        let b = q.to_bytes();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 3);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 40);
        assert_eq!(NetifCtrlRequest::from_bytes(&b), Some(q));
        let p = NetifCtrlResponse {
            id: 1,
            kind: 3,
            status: ctrl_status::INVALID_PARAMETER,
            data: 7,
        };
        assert_eq!(NetifCtrlResponse::from_bytes(&p.to_bytes()), Some(p));
    }

    #[test]
    fn tx_requests_travel_the_generic_ring() {
        let mem = SharedRingMem::new_owned(PAGE_SIZE).unwrap();
        let mut front = FrontRing::<NetifTxRequest, NetifTxResponse>::new(mem.clone()).unwrap();
        let mut back = BackRing::<NetifTxRequest, NetifTxResponse>::new(mem).unwrap();
        let req = NetifTxRequest {
            gref: 8,
            offset: 100,
            flags: nettxf::DATA_VALIDATED,
            id: 5,
            size: 60,
        };
        front.push_request(&req).unwrap();
        front.push_requests_and_check_notify();
        assert_eq!(back.get_request().unwrap(), Some(req));
        back.push_response(&NetifTxResponse {
            id: 5,
            status: rsp::OKAY,
        })
        .unwrap();
        back.push_responses_and_check_notify();
        assert_eq!(
            front.get_response().unwrap(),
            Some(NetifTxResponse {
                id: 5,
                status: rsp::OKAY
            })
        );
    }
}
