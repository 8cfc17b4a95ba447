//! The management protocol between `hvctl` (host) and `ctl-dom` (the toolstack domain).
//!
//! A versioned request/response protocol over a byte stream (a serial line in practice, so
//! bytes may be lost, corrupted or arrive split anywhere). Each message is one frame:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `BHMC` |
//! | 4 | 2 | protocol version ([`VERSION`]), LE |
//! | 6 | 2 | reserved, zero |
//! | 8 | 4 | payload length, LE, at most [`MAX_PAYLOAD`] |
//! | 12 | 4 | CRC-32 (IEEE) of the payload, LE |
//! | 16 | len | postcard: a [`Request`] or a [`Response`] |
//!
//! Every request carries an id chosen by the client; the response repeats it, so a client
//! can drop late answers to requests it gave up on. Id 0 is reserved for answers to frames
//! whose id could not be read (bad version, undecodable payload).
//!
//! Invariants: the [`FrameDecoder`] never holds more than one header plus [`MAX_PAYLOAD`]
//! bytes, never panics on any input, and resynchronises on the next magic after garbage or
//! a corrupted frame. Failures are typed ([`MgmtError`]) so `hvctl` can tell "unknown domain"
//! from "refused by policy" from "the hypervisor said EINVAL".

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::DomId;
use crate::capability::Capabilities;
use crate::domain_config::{ConfigError, DiskSpec, DomainConfig, LifecycleAction, VifSpec};
use crate::errno::XenError;

pub const MAGIC: [u8; 4] = *b"BHMC";
/// Bumped on any incompatible change to the frame or the message types (2: detach requests
/// carry `timeout_ms` and `force`; console input and I/O stats; 3: shutdown and reboot ask
/// the guest first, `force` skips that, the answer says which way it went).
pub const VERSION: u16 = 3;
pub const HEADER_LEN: usize = 16;
/// Largest payload: room for a kernel image in a `Create` request.
pub const MAX_PAYLOAD: usize = 8 << 20;
/// Largest console or dmesg chunk one reply carries.
pub const MAX_CHUNK: usize = 4096;
/// Id reserved for replies that cannot name the request they answer.
pub const UNATTRIBUTED_ID: u32 = 0;
/// How long a detach waits for the guest to release the device unless told otherwise (xl's
/// `LIBXL_DESTROY_TIMEOUT`).
pub const DEFAULT_DETACH_TIMEOUT_MS: u32 = 10_000;
/// The longest wait a detach request may ask for (ctl serves one request at a time).
pub const MAX_DETACH_TIMEOUT_MS: u32 = 300_000;

/// A xenbus state's name (`xenbus.h`), for messages: `4` is `Connected`.
pub fn xenbus_state_name(state: u32) -> &'static str {
    match state {
        0 => "Unknown",
        1 => "Initialising",
        2 => "InitWait",
        3 => "Initialised",
        4 => "Connected",
        5 => "Closing",
        6 => "Closed",
        7 => "Reconfiguring",
        8 => "Reconfigured",
        _ => "invalid",
    }
}

/// A domain named on the command line: by id or by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DomainRef {
    Id(DomId),
    Name(String),
}

impl DomainRef {
    /// All digits is an id (must fit `domid_t`), anything else a name.
    pub fn parse(s: &str) -> Self {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            match s.parse::<DomId>() {
                Ok(id) => DomainRef::Id(id),
                Err(_) => DomainRef::Name(String::from(s)),
            }
        } else {
            DomainRef::Name(String::from(s))
        }
    }
}

impl fmt::Display for DomainRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainRef::Id(id) => write!(f, "{id}"),
            DomainRef::Name(n) => write!(f, "{n}"),
        }
    }
}

/// What a request asks for (xl's verbs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Version handshake; answered with [`Reply::Hello`].
    Hello,
    List,
    Info(DomainRef),
    /// Build a domain from `config` and the kernel ELF that came with the request.
    Create {
        config: DomainConfig,
        kernel: Vec<u8>,
    },
    Destroy(DomainRef),
    /// Shut the domain down (`on_poweroff` follows). A domain that advertises
    /// `control/feature-poweroff` = 1 (as Linux does) is asked through its
    /// `control/shutdown` and shuts down itself; any other, or with `force`, is stopped by the
    /// hypervisor (`SCHEDOP_remote_shutdown`). Answered with [`Reply::ShutdownSent`].
    Shutdown {
        dom: DomainRef,
        force: bool,
    },
    /// As [`RequestBody::Shutdown`], rebooting (`control/feature-reboot`; `on_reboot`).
    Reboot {
        dom: DomainRef,
        force: bool,
    },
    Pause(DomainRef),
    Unpause(DomainRef),
    /// Console output of a domain from byte offset `from` (of everything it ever wrote).
    ConsoleRead {
        dom: DomainRef,
        from: u64,
    },
    MemSet {
        dom: DomainRef,
        kib: u64,
    },
    /// Read (both `None`) or set credit-scheduler parameters.
    SchedCredit {
        dom: DomainRef,
        weight: Option<u32>,
        cap_percent: Option<u32>,
    },
    BlockAttach {
        dom: DomainRef,
        disk: DiskSpec,
    },
    /// Detach through the xenbus close handshake: the backend is asked to close (`online` =
    /// 0, `state` = Closing) and has `timeout_ms` (1..=[`MAX_DETACH_TIMEOUT_MS`]) to reach
    /// Closed; `force` removes the device's entries at once without asking.
    BlockDetach {
        dom: DomainRef,
        vdev: String,
        timeout_ms: u32,
        force: bool,
    },
    NetworkAttach {
        dom: DomainRef,
        vif: VifSpec,
    },
    /// As [`RequestBody::BlockDetach`], for a vif.
    NetworkDetach {
        dom: DomainRef,
        devid: u32,
        timeout_ms: u32,
        force: bool,
    },
    /// Hypervisor log from byte offset `from`.
    Dmesg {
        from: u64,
    },
    /// Give `data` (at most [`MAX_CHUNK`] bytes) to the domain's console input; answered
    /// with [`Reply::Written`] (how many were taken: the domain's input buffer is bounded,
    /// the client resends the rest later).
    ConsoleWrite {
        dom: DomainRef,
        data: Vec<u8>,
    },
    /// Every domain's I/O counters; answered with [`Reply::Stats`].
    DomainStats,
    /// [`RequestBody::Create`] with the kernel compressed as raw DEFLATE (RFC 1951): the
    /// management line is slow and code halves. `kernel_len` is the inflated length (at most
    /// [`MAX_PAYLOAD`]); a kernel that does not inflate to exactly that many bytes is
    /// refused as a bad request.
    CreateDeflated {
        config: DomainConfig,
        kernel_deflated: Vec<u8>,
        kernel_len: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u32,
    pub body: RequestBody,
}

/// A domain's run state as the toolstack reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Blocked,
    Paused,
    /// Shut down with a Xen `SHUTDOWN_*` reason, not yet torn down.
    Shutdown(u32),
    /// Crashed and kept by `on_crash = "preserve"`.
    Preserved,
    Dying,
}

impl RunState {
    /// xl's one-letter state column.
    pub fn letter(self) -> char {
        match self {
            RunState::Running => 'r',
            RunState::Blocked => 'b',
            RunState::Paused => 'p',
            RunState::Shutdown(_) => 's',
            RunState::Preserved => 'c',
            RunState::Dying => 'd',
        }
    }
}

/// One row of `list` / `top`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    pub domid: DomId,
    pub name: String,
    pub state: RunState,
    pub memory_kib: u64,
    pub maxmem_kib: u64,
    pub vcpus: u32,
    pub cpu_time_ns: u64,
    pub weight: u32,
    pub cap_percent: u32,
    pub capabilities: Capabilities,
}

/// One domain's I/O counters (`top`): running totals since it was built (see the
/// hypervisor's `DOMAIN_STATS`); `top` shows their rates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainIoStats {
    pub domid: DomId,
    /// Event-channel notifications it sent.
    pub evtchn_sends: u64,
    /// Bytes copied through its grants (by its backends: its disk and network I/O).
    pub grant_copy_bytes: u64,
    /// Grant copies it performed itself (a backend's work).
    pub grant_copies_done: u64,
    /// Mappings of its grants by other domains.
    pub grant_maps: u64,
    pub console_out_bytes: u64,
    pub console_in_bytes: u64,
}

impl DomainIoStats {
    /// Domain `domid`'s row from the hypervisor's answer to `DOMAIN_STATS` (the same
    /// counters, named by the domain asked about).
    pub fn from_hypervisor(domid: DomId, s: &crate::hypercall_args::domctl::DomainStats) -> Self {
        DomainIoStats {
            domid,
            evtchn_sends: s.evtchn_sends,
            grant_copy_bytes: s.grant_copy_bytes,
            grant_copies_done: s.grant_copies_done,
            grant_maps: s.grant_maps,
            console_out_bytes: s.console_out_bytes,
            console_in_bytes: s.console_in_bytes,
        }
    }
}

/// A device a domain has, as `info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceInfo {
    Disk { devid: u32, spec: DiskSpec },
    Vif { devid: u32, spec: VifSpec },
}

/// `info`: the summary plus what the toolstack knows of the domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainDetail {
    pub summary: DomainSummary,
    pub on_poweroff: LifecycleAction,
    pub on_reboot: LifecycleAction,
    pub on_crash: LifecycleAction,
    /// How often `restart` rebuilt it.
    pub restarts: u32,
    /// Built at boot from the manifest rather than by `create`.
    pub boot_domain: bool,
    pub devices: Vec<DeviceInfo>,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Hello {
        version: u16,
        server: String,
    },
    Done,
    Domains(Vec<DomainSummary>),
    Info(DomainDetail),
    Created {
        domid: DomId,
    },
    /// Bytes from `from` up to `next`; `lost` bytes before `from` were overwritten.
    Chunk {
        next: u64,
        lost: u64,
        data: Vec<u8>,
    },
    Sched {
        weight: u32,
        cap_percent: u32,
    },
    Attached {
        devid: u32,
    },
    /// `ConsoleWrite`: bytes taken from the front of `data` (0 = the input buffer is full).
    Written {
        accepted: u32,
    },
    /// `DomainStats`: one row per domain.
    Stats(Vec<DomainIoStats>),
    /// `Shutdown` / `Reboot`: how the domain was told.
    ShutdownSent(ShutdownPath),
}

/// How a shutdown or reboot reached a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShutdownPath {
    /// Written to its `control/shutdown`: the guest acknowledges it, closes its devices and
    /// stops itself (with the reason it was asked for, if it honours the request).
    Xenstore,
    /// Stopped by the hypervisor at once (`SCHEDOP_remote_shutdown`): it advertised no
    /// shutdown support, or `force` was set.
    Hypervisor,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MgmtError {
    UnknownDomain(DomainRef),
    /// A domain with this name already exists.
    NameInUse(String),
    InvalidConfig(ConfigError),
    /// The request is well formed but policy refuses it (e.g. granting `domain_control`).
    RefusedByPolicy {
        operation: String,
        reason: String,
    },
    /// The hypervisor answered a Xen errno.
    Hypervisor {
        operation: String,
        errno: i32,
    },
    /// The operation is not valid in the domain's current state.
    WrongState {
        dom: DomainRef,
        state: RunState,
        operation: String,
    },
    NoSuchDevice {
        dom: DomainRef,
        device: String,
    },
    /// The guest did not release the device within the detach timeout: it stays attached
    /// (the backend was told to stay online again) and recorded; a retry may succeed, and a
    /// forced detach removes it anyway. States are xenbus states, `None` when unreadable.
    DetachTimedOut {
        dom: DomainRef,
        device: String,
        waited_ms: u64,
        frontend_state: Option<u32>,
        backend_state: Option<u32>,
    },
    /// The server does not implement this operation (yet); nothing was changed.
    Unsupported(String),
    /// The frame's version is not ours; nothing was done.
    VersionMismatch {
        got: u16,
        supported: u16,
    },
    /// The frame or payload could not be read; nothing was done.
    BadRequest(String),
}

impl fmt::Display for MgmtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MgmtError::UnknownDomain(d) => write!(f, "unknown domain {d}"),
            MgmtError::NameInUse(n) => write!(f, "a domain named {n:?} already exists"),
            MgmtError::InvalidConfig(e) => write!(f, "invalid config: {e}"),
            MgmtError::RefusedByPolicy { operation, reason } => {
                write!(f, "{operation} refused by policy: {reason}")
            }
            MgmtError::Hypervisor { operation, errno } => match XenError::from_errno(*errno) {
                Some(e) => write!(f, "{operation}: hypervisor refused: {e}"),
                None => write!(f, "{operation}: hypervisor refused: errno {errno}"),
            },
            MgmtError::WrongState {
                dom,
                state,
                operation,
            } => write!(f, "cannot {operation} domain {dom} in state {state:?}"),
            MgmtError::NoSuchDevice { dom, device } => {
                write!(f, "domain {dom} has no device {device}")
            }
            MgmtError::DetachTimedOut {
                dom,
                device,
                waited_ms,
                frontend_state,
                backend_state,
            } => {
                let state = |s: &Option<u32>| match s {
                    Some(s) => alloc::format!("{s} {}", xenbus_state_name(*s)),
                    None => String::from("gone"),
                };
                // Tenths of a second, shown only when there are any (a wait just past the
                // timeout reads as the timeout).
                let secs = match waited_ms % 1000 / 100 {
                    0 => alloc::format!("{} s", waited_ms / 1000),
                    t => alloc::format!("{}.{t} s", waited_ms / 1000),
                };
                write!(
                    f,
                    "domain {dom} did not release {device} within {secs} (frontend state {}, backend {}); it stays attached; --force removes it anyway",
                    state(frontend_state),
                    state(backend_state)
                )
            }
            MgmtError::Unsupported(what) => write!(f, "not supported by this ctl-dom: {what}"),
            MgmtError::VersionMismatch { got, supported } => write!(
                f,
                "protocol version {got} not supported (server speaks {supported})"
            ),
            MgmtError::BadRequest(why) => write!(f, "bad request: {why}"),
        }
    }
}

impl From<ConfigError> for MgmtError {
    fn from(e: ConfigError) -> Self {
        MgmtError::InvalidConfig(e)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u32,
    pub result: Result<Reply, MgmtError>,
}

/// Why bytes from the stream did not make a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Bytes before a magic were skipped.
    Garbage {
        skipped: usize,
    },
    /// A frame of another protocol version (its payload was skipped).
    Version {
        got: u16,
    },
    ReservedNotZero {
        found: u16,
    },
    TooLarge {
        len: u32,
        max: usize,
    },
    Checksum {
        stored: u32,
        computed: u32,
    },
    /// The payload was not a message of the expected type.
    Undecodable,
    /// The payload decoded but left bytes over.
    TrailingBytes {
        extra: usize,
    },
    /// A message too large to encode in one frame.
    EncodeTooLarge {
        len: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Garbage { skipped } => write!(f, "skipped {skipped} bytes of garbage"),
            FrameError::Version { got } => {
                write!(f, "frame version {got}, this side speaks {VERSION}")
            }
            FrameError::ReservedNotZero { found } => {
                write!(f, "frame reserved field is {found:#x}, expected 0")
            }
            FrameError::TooLarge { len, max } => {
                write!(f, "frame length {len} exceeds the maximum {max}")
            }
            FrameError::Checksum { stored, computed } => write!(
                f,
                "frame checksum {stored:#010x} does not match payload ({computed:#010x})"
            ),
            FrameError::Undecodable => write!(f, "frame payload is not a valid message"),
            FrameError::TrailingBytes { extra } => {
                write!(f, "frame payload has {extra} bytes after the message")
            }
            FrameError::EncodeTooLarge { len } => {
                write!(
                    f,
                    "message of {len} bytes exceeds the frame maximum {MAX_PAYLOAD}"
                )
            }
        }
    }
}

fn frame(payload: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::EncodeTooLarge { len: payload.len() });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    // Serialising our own types into a Vec only fails on allocation, which aborts anyway.
    let payload = postcard::to_allocvec(msg).map_err(|_| FrameError::Undecodable)?;
    frame(payload)
}

fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|_| FrameError::Undecodable)?;
    if rest.is_empty() {
        Ok(msg)
    } else {
        Err(FrameError::TrailingBytes { extra: rest.len() })
    }
}

/// A request as one frame.
pub fn encode_request(r: &Request) -> Result<Vec<u8>, FrameError> {
    encode(r)
}

/// A response as one frame.
pub fn encode_response(r: &Response) -> Result<Vec<u8>, FrameError> {
    encode(r)
}

pub fn decode_request(payload: &[u8]) -> Result<Request, FrameError> {
    decode(payload)
}

pub fn decode_response(payload: &[u8]) -> Result<Response, FrameError> {
    decode(payload)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Splits a byte stream into frame payloads.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held, waiting for the rest of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Append bytes read from the stream. Call [`Self::next_frame`] until it says `None`
    /// before pushing more, so the buffer stays bounded.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's payload, an error for a bad one (already skipped), or
    /// `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        // Resynchronise: drop everything before the first possible magic.
        let start = find_magic(&self.buf);
        if start > 0 {
            self.buf.drain(..start);
            return Some(Err(FrameError::Garbage { skipped: start }));
        }
        if self.buf.len() < HEADER_LEN {
            return None;
        }
        let version = le16(&self.buf, 4);
        let reserved = le16(&self.buf, 6);
        let len = le32(&self.buf, 8);
        let stored = le32(&self.buf, 12);
        if len as usize > MAX_PAYLOAD {
            // A corrupted length must not make us wait for megabytes: skip the magic only.
            self.buf.drain(..1);
            return Some(Err(FrameError::TooLarge {
                len,
                max: MAX_PAYLOAD,
            }));
        }
        let total = HEADER_LEN + len as usize;
        if self.buf.len() < total {
            return None;
        }
        let computed = crc32fast::hash(&self.buf[HEADER_LEN..total]);
        if computed != stored {
            self.buf.drain(..1);
            return Some(Err(FrameError::Checksum { stored, computed }));
        }
        let payload: Vec<u8> = self.buf[HEADER_LEN..total].to_vec();
        self.buf.drain(..total);
        if version != VERSION {
            return Some(Err(FrameError::Version { got: version }));
        }
        if reserved != 0 {
            return Some(Err(FrameError::ReservedNotZero { found: reserved }));
        }
        Some(Ok(payload))
    }
}

/// Index of the first position that may start a magic (a full match, or a prefix of it at
/// the end of the buffer); the buffer length if none.
fn find_magic(buf: &[u8]) -> usize {
    for i in 0..buf.len() {
        let n = (buf.len() - i).min(MAGIC.len());
        if buf[i..i + n] == MAGIC[..n] {
            return i;
        }
    }
    buf.len()
}

/// The answer a server gives to a frame error: `None` when nothing should be said (garbage
/// and corrupted frames are not answered: the client times out and retries).
pub fn error_reply(e: &FrameError) -> Option<Response> {
    let err = match e {
        FrameError::Version { got } => MgmtError::VersionMismatch {
            got: *got,
            supported: VERSION,
        },
        FrameError::Undecodable | FrameError::TrailingBytes { .. } => {
            MgmtError::BadRequest(alloc::format!("{e}"))
        }
        FrameError::ReservedNotZero { .. } => MgmtError::BadRequest(alloc::format!("{e}")),
        _ => return None,
    };
    Some(Response {
        id: UNATTRIBUTED_ID,
        result: Err(err),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain_config::DiskAccess;
    use alloc::vec;
    use proptest::prelude::*;

    fn create_req() -> Request {
        let mut c = DomainConfig::new("guest", 65536);
        c.disks.push(DiskSpec {
            target: "vol".into(),
            vdev: "xvda".into(),
            access: DiskAccess::ReadOnly,
            backend: None,
        });
        Request {
            id: 7,
            body: RequestBody::Create {
                config: c,
                kernel: vec![0x7f, b'E', b'L', b'F', 1, 2, 3],
            },
        }
    }

    fn drain(d: &mut FrameDecoder) -> Vec<Result<Vec<u8>, FrameError>> {
        let mut out = Vec::new();
        while let Some(f) = d.next_frame() {
            out.push(f);
        }
        out
    }

    #[test]
    fn request_round_trips_through_a_frame() {
        let r = create_req();
        let bytes = encode_request(&r).unwrap();
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        let frames = drain(&mut d);
        assert_eq!(frames.len(), 1);
        let got = decode_request(frames[0].as_ref().unwrap()).unwrap();
        assert_eq!(got, r);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn response_with_typed_error_round_trips() {
        let r = Response {
            id: 9,
            result: Err(MgmtError::UnknownDomain(DomainRef::Name("nope".into()))),
        };
        let bytes = encode_response(&r).unwrap();
        let got = decode_response(&bytes[HEADER_LEN..]).unwrap();
        assert_eq!(got, r);
    }

    #[test]
    fn frame_split_byte_by_byte_still_decodes() {
        let bytes = encode_request(&create_req()).unwrap();
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            d.push(core::slice::from_ref(b));
            got.extend(drain(&mut d));
        }
        assert_eq!(got.len(), 1);
        assert!(got[0].is_ok());
    }

    #[test]
    fn garbage_before_a_frame_is_skipped_and_reported() {
        let mut bytes = b"noise\r\n".to_vec();
        bytes.extend(encode_request(&create_req()).unwrap());
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        let frames = drain(&mut d);
        assert_eq!(frames[0], Err(FrameError::Garbage { skipped: 7 }));
        assert!(frames[1].is_ok());
    }

    #[test]
    fn corrupted_payload_is_refused_and_next_frame_still_decodes() {
        let good = encode_request(&create_req()).unwrap();
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let mut d = FrameDecoder::new();
        d.push(&bad);
        d.push(&good);
        let frames = drain(&mut d);
        assert!(matches!(frames[0], Err(FrameError::Checksum { .. })));
        assert!(frames.last().unwrap().is_ok());
        assert_eq!(frames.iter().filter(|f| f.is_ok()).count(), 1);
    }

    #[test]
    fn oversized_length_is_refused_without_waiting() {
        let mut h = MAGIC.to_vec();
        h.extend(VERSION.to_le_bytes());
        h.extend(0u16.to_le_bytes());
        h.extend(u32::MAX.to_le_bytes());
        h.extend(0u32.to_le_bytes());
        let mut d = FrameDecoder::new();
        d.push(&h);
        assert!(matches!(
            d.next_frame(),
            Some(Err(FrameError::TooLarge { .. }))
        ));
    }

    #[test]
    fn other_version_is_skipped_and_answered_with_version_mismatch() {
        let mut bytes = encode_request(&create_req()).unwrap();
        let other = VERSION + 1;
        bytes[4..6].copy_from_slice(&other.to_le_bytes());
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        let e = d.next_frame().unwrap().unwrap_err();
        assert_eq!(e, FrameError::Version { got: other });
        assert_eq!(d.buffered(), 0);
        let reply = error_reply(&e).unwrap();
        assert_eq!(
            reply.result,
            Err(MgmtError::VersionMismatch {
                got: other,
                supported: VERSION
            })
        );
    }

    #[test]
    fn trailing_bytes_after_message_are_refused() {
        let mut p = postcard::to_allocvec(&create_req()).unwrap();
        p.push(0);
        assert_eq!(
            decode_request(&p),
            Err(FrameError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn detach_timeout_says_who_holds_the_device_and_what_to_do() {
        let e = MgmtError::DetachTimedOut {
            dom: DomainRef::Name("web".into()),
            device: "xvdb".into(),
            waited_ms: 3007,
            frontend_state: Some(4),
            backend_state: Some(5),
        };
        assert_eq!(
            e.to_string(),
            "domain web did not release xvdb within 3 s (frontend state 4 Connected, backend 5 Closing); it stays attached; --force removes it anyway"
        );
        let e = MgmtError::DetachTimedOut {
            dom: DomainRef::Id(7),
            device: "vif 1".into(),
            waited_ms: 1500,
            frontend_state: None,
            backend_state: Some(42),
        };
        assert!(
            e.to_string()
                .contains("within 1.5 s (frontend state gone, backend 42 invalid)")
        );
        let r = Response {
            id: 3,
            result: Err(e),
        };
        let bytes = encode_response(&r).unwrap();
        assert_eq!(decode_response(&bytes[HEADER_LEN..]).unwrap(), r);
    }

    #[test]
    fn domain_ref_parses_ids_and_names() {
        assert_eq!(DomainRef::parse("12"), DomainRef::Id(12));
        assert_eq!(DomainRef::parse("web"), DomainRef::Name("web".into()));
        assert_eq!(
            DomainRef::parse("99999"),
            DomainRef::Name("99999".into()),
            "too large for domid_t: treated as a name, which then is unknown"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Fuzz-style: any byte stream, pushed in any split, never panics, keeps the buffer
        /// bounded, and every payload it yields either decodes or is refused with an error.
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..32),
        ) {
            let mut d = FrameDecoder::new();
            for c in &chunks {
                d.push(c);
                while let Some(f) = d.next_frame() {
                    if let Ok(p) = f {
                        let _ = decode_request(&p);
                        let _ = decode_response(&p);
                    }
                }
                prop_assert!(d.buffered() <= HEADER_LEN + MAX_PAYLOAD);
            }
        }

        /// Valid frames with random noise spliced in: every frame not hit by the noise comes out.
        #[test]
        fn frames_survive_noise_between_them(
            ids in proptest::collection::vec(1u32..1000, 1..6),
            noise in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 6),
        ) {
            let mut stream = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                // Noise with no magic byte in it cannot be mistaken for a frame start.
                stream.extend(noise[i].iter().map(|b| if *b == b'B' { 0 } else { *b }));
                let r = Request { id: *id, body: RequestBody::Info(DomainRef::Id(*id as u16)) };
                stream.extend(encode_request(&r).unwrap());
            }
            let mut d = FrameDecoder::new();
            d.push(&stream);
            let got: Vec<u32> = drain(&mut d)
                .into_iter()
                .filter_map(|f| f.ok())
                .map(|p| decode_request(&p).unwrap().id)
                .collect();
            prop_assert_eq!(got, ids);
        }

        /// Payload-level fuzz: arbitrary bytes as a payload decode or fail, never panic.
        #[test]
        fn message_decoder_never_panics(p in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_request(&p);
            let _ = decode_response(&p);
        }
    }

    #[test]
    fn io_stats_carry_every_hypervisor_counter() {
        let mut s = crate::hypercall_args::domctl::DomainStats::default();
        (s.evtchn_sends, s.grant_copy_bytes, s.grant_copies_done) = (1, 2, 3);
        (s.grant_maps, s.console_out_bytes, s.console_in_bytes) = (4, 5, 6);
        let r = DomainIoStats::from_hypervisor(9, &s);
        let got = [
            r.evtchn_sends,
            r.grant_copy_bytes,
            r.grant_copies_done,
            r.grant_maps,
        ];
        assert_eq!((r.domid, got), (9, [1, 2, 3, 4]));
        assert_eq!((r.console_out_bytes, r.console_in_bytes), (5, 6));
    }
}
