//! Xenstore wire protocol (`io/xs_wire.h`): header, message types, error names, ring page.
//!
//! Owns the byte-level contract shared by the store (`xenstore-dom`), its transports (unix
//! socket on the host, ring page in a domain) and clients (`dom-rt`'s xenbus): the 16-byte
//! header, the message type numbers, the payload limit, the error-name table and the
//! `xenstore_domain_interface` page layout. [`MessageDecoder`] turns an untrusted byte stream
//! into whole messages; it never panics and refuses a header whose length exceeds
//! [`PAYLOAD_MAX`] (Xen drops such a connection).

use alloc::vec::Vec;

use crate::assert_layout;
use crate::errno::XenError;

/// Largest payload in either direction (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// Longest absolute path (`XENSTORE_ABS_PATH_MAX`).
pub const ABS_PATH_MAX: usize = 3072;
/// Longest path relative to a domain's home (`XENSTORE_REL_PATH_MAX`).
pub const REL_PATH_MAX: usize = 2048;
/// Bytes in each direction of the ring page (`XENSTORE_RING_SIZE`).
pub const RING_SIZE: usize = 1024;
/// Size of the message header on the wire.
pub const HEADER_LEN: usize = 16;

/// Message types (`enum xsd_sockmsg_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    /// Removed from Xen; always invalid.
    Restrict = 20,
    ResetWatches = 21,
    DirectoryPart = 22,
    GetFeature = 23,
    SetFeature = 24,
    GetQuota = 25,
    SetQuota = 26,
}

/// `XS_TYPE_COUNT`: one past the last defined type.
pub const TYPE_COUNT: u32 = 27;
/// `XS_INVALID`: never a valid type.
pub const TYPE_INVALID: u32 = 0xFFFF;

impl MsgType {
    /// The type for a wire number, if Xen defines one.
    pub const fn from_u32(v: u32) -> Option<Self> {
        use MsgType::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            20 => Restrict,
            21 => ResetWatches,
            22 => DirectoryPart,
            23 => GetFeature,
            24 => SetFeature,
            25 => GetQuota,
            26 => SetQuota,
            _ => return None,
        })
    }

    /// Wire number.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }
}

/// `struct xsd_sockmsg`: the header in front of every message (native endian = LE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Header {
    /// `XS_*` type number (kept raw: unknown numbers must be answered, not dropped).
    pub msg_type: u32,
    /// Echoed in the reply.
    pub req_id: u32,
    /// Transaction id, 0 for none; echoed in the reply.
    pub tx_id: u32,
    /// Payload length in bytes.
    pub len: u32,
}
assert_layout!(Header, 16; msg_type @ 0, req_id @ 4, tx_id @ 8, len @ 12);

impl Header {
    /// Decode the 16 header bytes.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            msg_type: w(0),
            req_id: w(4),
            tx_id: w(8),
            len: w(12),
        }
    }

    /// Encode to the 16 wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.msg_type.to_le_bytes());
        out[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        out[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// The message type, if the number is a defined one.
    pub fn kind(&self) -> Option<MsgType> {
        MsgType::from_u32(self.msg_type)
    }
}

/// Encode one whole message (header + payload). The caller keeps `payload` ≤ [`PAYLOAD_MAX`];
/// a longer payload is refused rather than sent, because the peer would drop the connection.
pub fn encode(msg_type: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Result<Vec<u8>, XenError> {
    if payload.len() > PAYLOAD_MAX {
        return Err(XenError::E2BIG);
    }
    let hdr = Header {
        msg_type,
        req_id,
        tx_id,
        len: payload.len() as u32,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&hdr.to_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Error names in the order of Xen's `xsd_errors[]`; the first (EINVAL) is also what any
/// error without a wire name is sent as.
pub const WIRE_ERRORS: &[XenError] = &[
    XenError::EINVAL,
    XenError::EACCES,
    XenError::EEXIST,
    XenError::EISDIR,
    XenError::ENOENT,
    XenError::ENOMEM,
    XenError::ENOSPC,
    XenError::EIO,
    XenError::ENOTEMPTY,
    XenError::ENOSYS,
    XenError::EROFS,
    XenError::EBUSY,
    XenError::EAGAIN,
    XenError::EISCONN,
    XenError::E2BIG,
    XenError::EPERM,
];

/// The error as it goes on the wire: itself if Xen has a name for it, else `EINVAL`.
pub fn wire_error(e: XenError) -> XenError {
    if WIRE_ERRORS.contains(&e) {
        e
    } else {
        XenError::EINVAL
    }
}

/// Payload of an `XS_ERROR` reply: the name and a NUL.
pub fn error_payload(e: XenError) -> Vec<u8> {
    let mut v = Vec::from(wire_error(e).name().as_bytes());
    v.push(0);
    v
}

/// Parse an `XS_ERROR` payload back to the error (clients).
pub fn parse_error_payload(p: &[u8]) -> Option<XenError> {
    let name = p.strip_suffix(&[0]).unwrap_or(p);
    let name = core::str::from_utf8(name).ok()?;
    WIRE_ERRORS.iter().copied().find(|e| e.name() == name)
}

/// `server_features` bits of the ring page.
pub mod features {
    /// The guest may ask for a reconnection through `connection`.
    pub const RECONNECTION: u32 = 1 << 0;
    /// The server reports errors in the `error` field.
    pub const ERROR: u32 = 1 << 1;
    /// Watches may carry a depth.
    pub const WATCH_DEPTH: u32 = 1 << 2;
    /// Permissions may name `DOMID_ANY`.
    pub const DOMID_ANY_PERMS: u32 = 1 << 3;
}

/// `connection` field values.
pub const CONNECTED: u32 = 0;
pub const RECONNECT: u32 = 1;

/// `error` field values (`XENSTORE_ERROR_*`).
pub mod ring_error {
    pub const NONE: u32 = 0;
    pub const COMM: u32 = 1;
    pub const RINGIDX: u32 = 2;
    pub const PROTO: u32 = 3;
}

/// `struct xenstore_domain_interface`: the shared ring page. Never referenced as `&T` over
/// shared memory (see STYLE.md); transports copy fields through volatile accessors at these
/// offsets.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct DomainInterface {
    pub req: [u8; RING_SIZE],
    pub rsp: [u8; RING_SIZE],
    pub req_cons: u32,
    pub req_prod: u32,
    pub rsp_cons: u32,
    pub rsp_prod: u32,
    pub server_features: u32,
    pub connection: u32,
    pub error: u32,
    pub evtchn_port: u32,
}
assert_layout!(DomainInterface, 2080; req @ 0, rsp @ 1024, req_cons @ 2048, req_prod @ 2052,
    rsp_cons @ 2056, rsp_prod @ 2060, server_features @ 2064, connection @ 2068, error @ 2072,
    evtchn_port @ 2076);

/// Byte offset of stream position `idx` inside a ring array (`MASK_XENSTORE_IDX`).
pub const fn ring_mask(idx: u32) -> usize {
    (idx as usize) & (RING_SIZE - 1)
}

/// Why a byte stream was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The header announced more than [`PAYLOAD_MAX`] bytes (`XENSTORE_ERROR_PROTO`).
    PayloadTooLong(u32),
}

/// One whole message read from a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
}

/// Incremental decoder: feed bytes as they arrive (any split), take whole messages out.
/// Holds at most one header plus [`PAYLOAD_MAX`] bytes, whatever the peer sends.
#[derive(Debug, Default)]
pub struct MessageDecoder {
    hdr_buf: [u8; HEADER_LEN],
    hdr_used: usize,
    header: Option<Header>,
    payload: Vec<u8>,
    failed: Option<DecodeError>,
}

impl MessageDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when a message has been started but not finished (a peer that stops here is
    /// holding a half message).
    pub fn in_progress(&self) -> bool {
        self.hdr_used > 0 || self.header.is_some()
    }

    /// Consume bytes from `input`, returning how many were used and the message completed,
    /// if any. Call again with the rest until it uses nothing. After an error the decoder
    /// stays failed: the stream is out of sync and the connection must go.
    pub fn push(&mut self, input: &[u8]) -> (usize, Result<Option<Message>, DecodeError>) {
        if let Some(e) = self.failed {
            return (0, Err(e));
        }
        let mut used = 0;
        if self.header.is_none() {
            let take = (HEADER_LEN - self.hdr_used).min(input.len());
            self.hdr_buf[self.hdr_used..self.hdr_used + take].copy_from_slice(&input[..take]);
            self.hdr_used += take;
            used += take;
            if self.hdr_used < HEADER_LEN {
                return (used, Ok(None));
            }
            let h = Header::from_bytes(&self.hdr_buf);
            if h.len as usize > PAYLOAD_MAX {
                self.failed = Some(DecodeError::PayloadTooLong(h.len));
                return (used, Err(DecodeError::PayloadTooLong(h.len)));
            }
            self.header = Some(h);
            self.payload = Vec::with_capacity(h.len as usize);
        }
        let Some(h) = self.header else {
            return (used, Ok(None));
        };
        let want = h.len as usize - self.payload.len();
        let take = want.min(input.len() - used);
        self.payload.extend_from_slice(&input[used..used + take]);
        used += take;
        if self.payload.len() == h.len as usize {
            self.header = None;
            self.hdr_used = 0;
            let payload = core::mem::take(&mut self.payload);
            return (used, Ok(Some(Message { header: h, payload })));
        }
        (used, Ok(None))
    }

    /// Feed a whole buffer, collecting every completed message.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Vec<Message>, DecodeError> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (n, r) = self.push(input);
            let got = r?;
            let done = got.is_none() && n == 0;
            out.extend(got);
            input = &input[n..];
            if done {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trips_little_endian() {
        let h = Header {
            msg_type: 2,
            req_id: 0x01020304,
            tx_id: 7,
            len: 5,
        };
        let b = h.to_bytes();
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(h.kind(), Some(MsgType::Read));
    }

    #[test]
    fn message_type_numbers_match_xs_wire() {
        assert_eq!(MsgType::Write.as_u32(), 11);
        assert_eq!(MsgType::ResetWatches.as_u32(), 21);
        assert_eq!(MsgType::DirectoryPart.as_u32(), 22);
        for n in 0..TYPE_COUNT {
            assert_eq!(MsgType::from_u32(n).map(|t| t.as_u32()), Some(n));
        }
        assert_eq!(MsgType::from_u32(TYPE_COUNT), None);
        assert_eq!(MsgType::from_u32(TYPE_INVALID), None);
    }

    #[test]
    fn error_names_follow_xsd_errors_and_unknown_is_einval() {
        assert_eq!(error_payload(XenError::EAGAIN), b"EAGAIN\0");
        assert_eq!(error_payload(XenError::ETIMEDOUT), b"EINVAL\0");
        assert_eq!(parse_error_payload(b"ENOENT\0"), Some(XenError::ENOENT));
        assert_eq!(WIRE_ERRORS.len(), 16);
    }

    #[test]
    fn decoder_splits_and_joins_messages() {
        let mut bytes = encode(2, 1, 0, b"/a\0").unwrap();
        bytes.extend(encode(11, 2, 0, b"").unwrap());
        let mut d = MessageDecoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            got.extend(d.feed(core::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].payload, b"/a\0");
        assert_eq!(got[1].header.msg_type, 11);
        assert!(!d.in_progress());
    }

    #[test]
    fn decoder_refuses_oversized_length_and_stays_failed() {
        let hdr = Header {
            msg_type: 2,
            req_id: 0,
            tx_id: 0,
            len: PAYLOAD_MAX as u32 + 1,
        };
        let mut d = MessageDecoder::new();
        assert_eq!(
            d.feed(&hdr.to_bytes()),
            Err(DecodeError::PayloadTooLong(4097))
        );
        assert!(d.feed(b"x").is_err());
    }

    #[test]
    fn encode_refuses_oversized_payload() {
        assert_eq!(
            encode(2, 0, 0, &[0u8; PAYLOAD_MAX + 1]),
            Err(XenError::E2BIG)
        );
        assert!(encode(2, 0, 0, &[0u8; PAYLOAD_MAX]).is_ok());
    }

    proptest! {
        #[test]
        fn decoder_never_panics_and_bounds_payload(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..64), 0..32)) {
            let mut d = MessageDecoder::new();
            for c in chunks {
                match d.feed(&c) {
                    Ok(ms) => for m in ms {
                        prop_assert!(m.payload.len() <= PAYLOAD_MAX);
                        prop_assert_eq!(m.payload.len(), m.header.len as usize);
                    },
                    Err(_) => break,
                }
            }
        }
    }
}

/// Copy-based access to a xenstore ring page, shared by the server (`xenstore-dom`) and the
/// client (`dom-rt`'s xenbus): field offsets from the layout-asserted [`DomainInterface`] and
/// the accessor trait, implemented for the generic ring's [`SharedRingMem`](crate::ring::SharedRingMem).
pub mod page {
    use crate::ring::SharedRingMem;

    /// Byte offsets of the page's fields (from the layout-asserted struct).
    pub mod offsets {
        use crate::xenstore::DomainInterface;
        use core::mem::offset_of;
        pub const REQ: usize = offset_of!(DomainInterface, req);
        pub const RSP: usize = offset_of!(DomainInterface, rsp);
        pub const REQ_CONS: usize = offset_of!(DomainInterface, req_cons);
        pub const REQ_PROD: usize = offset_of!(DomainInterface, req_prod);
        pub const RSP_CONS: usize = offset_of!(DomainInterface, rsp_cons);
        pub const RSP_PROD: usize = offset_of!(DomainInterface, rsp_prod);
        pub const SERVER_FEATURES: usize = offset_of!(DomainInterface, server_features);
        pub const CONNECTION: usize = offset_of!(DomainInterface, connection);
        pub const ERROR: usize = offset_of!(DomainInterface, error);
        /// Bytes of the page the interface uses.
        pub const END: usize = core::mem::size_of::<DomainInterface>();
    }

    /// Copy-based access to a shared xenstore page. Offsets passed in are always inside
    /// `0..offsets::END` and 4-aligned for the `u32` calls (the transport computes them; a page
    /// shorter than [`offsets::END`] is refused at attach).
    pub trait RingPage {
        /// Bytes in the page.
        fn size(&self) -> usize;
        /// Load a 32-bit field with acquire ordering (later reads see what the writer published).
        fn load_u32(&self, offset: usize) -> u32;
        /// Store a 32-bit field with release ordering (earlier accesses complete first).
        fn store_u32(&self, offset: usize, value: u32);
        /// Copy bytes out of the page.
        fn read_bytes(&self, offset: usize, out: &mut [u8]);
        /// Copy bytes into the page.
        fn write_bytes(&self, offset: usize, data: &[u8]);
    }

    impl RingPage for SharedRingMem {
        fn size(&self) -> usize {
            self.len()
        }

        fn load_u32(&self, offset: usize) -> u32 {
            let v = self.read_u32(offset).unwrap_or(0);
            core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
            v
        }

        fn store_u32(&self, offset: usize, value: u32) {
            let _ = self.write_u32(offset, value);
        }

        fn read_bytes(&self, offset: usize, out: &mut [u8]) {
            for (i, b) in out.iter_mut().enumerate() {
                let at = offset + i;
                let w = self.read_u32(at & !3).unwrap_or(0);
                *b = w.to_le_bytes()[at & 3];
            }
        }

        fn write_bytes(&self, offset: usize, data: &[u8]) {
            // Word-wise read-modify-write: the bytes around a partial word belong to the same
            // ring array, which only this side writes.
            let mut i = 0;
            while i < data.len() {
                let at = offset + i;
                let word = at & !3;
                let mut bytes = self.read_u32(word).unwrap_or(0).to_le_bytes();
                let start = at & 3;
                let n = (4 - start).min(data.len() - i);
                bytes[start..start + n].copy_from_slice(&data[i..i + n]);
                let _ = self.write_u32(word, u32::from_le_bytes(bytes));
                i += n;
            }
        }
    }
}
