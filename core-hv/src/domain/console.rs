//! Per-domain console output for `CONSOLEIO_write`: a token bucket that bounds how many bytes
//! a domain may put on the hypervisor console, and a line buffer so every line a domain
//! writes appears whole, prefixed with its name: `(name) text`.
//!
//! Bytes over the limit are dropped (as Xen rate-limits guest output) and counted; the count
//! is reported on the console once the domain may write again, so a flood is visible but
//! cannot drown other domains' output.
//!
//! Histories ([`HistoryRing`]): every domain keeps the last [`DOMAIN_HISTORY_BYTES`] of
//! what it wrote (sanitised as on the console, without the `(name)` prefix; allocated on its
//! first write, freed when the domain is reaped), and the arch layer keeps the hypervisor's
//! own log lines in one of [`DMESG_BYTES`] ([`ConsoleSink::read_log`]). Offsets are running
//! byte counts since the history began, so a reader resumes where it stopped and learns how
//! much it lost when it fell behind (`domctl CONSOLE_READ`).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;

use shared_abi::errno::XenError;

/// Bytes of console history kept per domain.
pub const DOMAIN_HISTORY_BYTES: usize = 16 * 1024;
/// Bytes of the hypervisor's log kept (dmesg).
pub const DMESG_BYTES: usize = 64 * 1024;

/// What one history read gave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingRead {
    /// Bytes copied.
    pub copied: usize,
    /// The offset to continue from.
    pub next: u64,
    /// Bytes between the requested offset and the oldest byte kept: overwritten.
    pub lost: u64,
}

/// A bounded byte history: the last `buf.len()` bytes written, with a running offset
/// (`end`: bytes ever written). Storage of length 0 keeps nothing (every byte is lost).
#[derive(Clone, Debug)]
pub struct HistoryRing<B> {
    buf: B,
    end: u64,
    /// Nothing before this offset is kept (bytes written while there was no storage).
    floor: u64,
}

impl<const N: usize> HistoryRing<[u8; N]> {
    /// An empty history in an array (no allocation: for statics).
    pub const fn new_array() -> Self {
        HistoryRing {
            buf: [0; N],
            end: 0,
            floor: 0,
        }
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> HistoryRing<B> {
    pub fn with_storage(buf: B) -> Self {
        HistoryRing {
            buf,
            end: 0,
            floor: 0,
        }
    }

    /// Bytes ever written (the offset the next byte gets).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The offset of the oldest byte kept.
    pub fn start(&self) -> u64 {
        self.end
            .saturating_sub(self.buf.as_ref().len() as u64)
            .max(self.floor)
    }

    pub fn capacity(&self) -> usize {
        self.buf.as_ref().len()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let cap = self.buf.as_ref().len();
        if cap == 0 {
            self.end = self.end.saturating_add(bytes.len() as u64);
            return;
        }
        // Only the last `cap` bytes can survive.
        let skip = bytes.len().saturating_sub(cap);
        self.end = self.end.saturating_add(skip as u64);
        let buf = self.buf.as_mut();
        for &b in &bytes[skip..] {
            buf[(self.end % cap as u64) as usize] = b;
            self.end = self.end.saturating_add(1);
        }
    }

    /// Copy bytes from offset `from` into `out`. A `from` older than what is kept reads from
    /// the oldest byte kept and reports the difference as lost; one beyond [`Self::end`]
    /// (never written) is `EINVAL`.
    pub fn read(&self, from: u64, out: &mut [u8]) -> Result<RingRead, XenError> {
        if from > self.end {
            return Err(XenError::EINVAL);
        }
        let start = self.start();
        let (lost, from) = if from < start {
            (start - from, start)
        } else {
            (0, from)
        };
        let n = (self.end - from).min(out.len() as u64) as usize;
        let buf = self.buf.as_ref();
        let cap = buf.len() as u64;
        let mut copied = 0;
        while copied < n {
            // `n > 0` implies `cap > 0` (with no storage, start == end).
            let at = ((from + copied as u64) % cap) as usize;
            let run = (n - copied).min(buf.len() - at);
            out[copied..copied + run].copy_from_slice(&buf[at..at + run]);
            copied += run;
        }
        Ok(RingRead {
            copied,
            next: from + copied as u64,
            lost,
        })
    }
}

impl HistoryRing<Box<[u8]>> {
    /// An empty history that has no storage yet.
    pub fn unallocated() -> Self {
        HistoryRing {
            buf: Box::default(),
            end: 0,
            floor: 0,
        }
    }

    /// Give up the storage (the offset stays: later readers see what they lost).
    pub fn release(&mut self) {
        self.buf = Box::default();
        self.floor = self.end;
    }

    /// Allocate `bytes` of storage if it has none (best effort: without memory the history
    /// keeps nothing and readers see bytes lost).
    fn ensure(&mut self, bytes: usize) {
        if !self.buf.is_empty() {
            return;
        }
        if let Some(b) = zeroed(bytes) {
            self.buf = b;
            // Whatever was "written" before there was storage is lost, not read as zeros.
            self.floor = self.end;
        }
    }
}

/// `bytes` zeroed bytes on the heap, or `None` without memory (never a panic).
fn zeroed(bytes: usize) -> Option<Box<[u8]>> {
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(bytes).ok()?;
    v.resize(bytes, 0);
    Some(v.into_boxed_slice())
}

/// Burst size, bytes.
pub const BUCKET_BYTES: u64 = 8192;
/// Refill rate, bytes per second.
pub const REFILL_BYTES_PER_S: u64 = 4096;
/// Longest line kept before it is flushed without a newline.
pub const MAX_LINE: usize = 256;

/// The management serial line (the machine's second UART): a byte pipe between the host's
/// `hvctl` and the control domain, moved by `domctl MGMT_IO`. Never blocks.
pub trait MgmtLine {
    /// Whether the machine has the line.
    fn present(&self) -> bool;
    /// Move up to `buf.len()` bytes already received into `buf`; how many.
    fn read(&mut self, buf: &mut [u8]) -> usize;
    /// Send `data`; how many bytes were taken.
    fn write(&mut self, data: &[u8]) -> usize;
}

/// A machine without the line.
#[derive(Debug, Default)]
pub struct NoMgmtLine;

impl MgmtLine for NoMgmtLine {
    fn present(&self) -> bool {
        false
    }
    fn read(&mut self, _buf: &mut [u8]) -> usize {
        0
    }
    fn write(&mut self, _data: &[u8]) -> usize {
        0
    }
}

/// Where finished console lines go (the arch layer's serial port).
pub trait ConsoleSink {
    /// One of the hypervisor's own lines (kept in its log history, read back as dmesg).
    fn write(&mut self, bytes: &[u8]);
    /// A domain's finished console line (already prefixed and sanitised): the console only,
    /// since each domain keeps its own history.
    fn domain_line(&mut self, bytes: &[u8]) {
        self.write(bytes);
    }
    /// Read the hypervisor's log history from offset `from` (see [`HistoryRing::read`]).
    /// `ENOSYS` where the platform keeps none.
    fn read_log(&mut self, _from: u64, _out: &mut [u8]) -> Result<RingRead, XenError> {
        Err(XenError::ENOSYS)
    }
}

/// One domain's console state.
#[derive(Clone, Debug)]
pub struct DomainConsole {
    tokens: u64,
    last_refill: u64,
    line: Vec<u8>,
    dropped: u64,
    history: HistoryRing<Box<[u8]>>,
    /// Console input the toolstack gave (`domctl CONSOLE_WRITE`) and the domain has not read
    /// yet (`console_io` read): at most [`CONSOLE_INPUT_BYTES`].
    input: VecDeque<u8>,
    /// Bytes ever given to the input.
    input_total: u64,
    /// Bytes the domain ever asked to write (before the rate limit).
    output_total: u64,
}

/// Bytes of console input kept per domain (writers get a short count, then `EAGAIN`).
pub const CONSOLE_INPUT_BYTES: usize = shared_abi::hypercall_args::domctl::CONSOLE_INPUT_BYTES;

impl DomainConsole {
    pub fn new(now: u64) -> Self {
        DomainConsole {
            tokens: BUCKET_BYTES,
            last_refill: now,
            line: Vec::new(),
            dropped: 0,
            history: HistoryRing::unallocated(),
            input: VecDeque::new(),
            input_total: 0,
            output_total: 0,
        }
    }

    /// Append what fits of `bytes` to the console input; how many were taken (0 when the
    /// buffer is full or there is no memory for it: never a panic, never a silent drop).
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let room = CONSOLE_INPUT_BYTES.saturating_sub(self.input.len());
        let n = bytes.len().min(room);
        if n == 0 || self.input.try_reserve(n).is_err() {
            return 0;
        }
        self.input.extend(&bytes[..n]);
        self.input_total = self.input_total.saturating_add(n as u64);
        n
    }

    /// Copy up to `out.len()` waiting input bytes into `out` without taking them.
    pub fn peek_input(&self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.input.len());
        for (o, b) in out.iter_mut().zip(self.input.iter()) {
            *o = *b;
        }
        n
    }

    /// Take `n` bytes (already copied with [`Self::peek_input`]) off the input.
    pub fn consume_input(&mut self, n: usize) {
        let n = n.min(self.input.len());
        self.input.drain(..n);
    }

    /// Input bytes waiting.
    pub fn input_len(&self) -> usize {
        self.input.len()
    }

    /// Bytes ever given to the input.
    pub fn input_total(&self) -> u64 {
        self.input_total
    }

    /// Count bytes the domain asked to write (rate-limited or not).
    pub fn count_output(&mut self, n: u64) {
        self.output_total = self.output_total.saturating_add(n);
    }

    /// Bytes the domain ever asked to write.
    pub fn output_total(&self) -> u64 {
        self.output_total
    }

    /// The domain's console history.
    pub fn history(&self) -> &HistoryRing<Box<[u8]>> {
        &self.history
    }

    /// Free the history's storage (the domain is being reaped).
    pub fn release_history(&mut self) {
        self.history.release();
        self.line = Vec::new();
        self.input = VecDeque::new();
    }

    /// Bytes the domain may write now (refills first).
    pub fn allowance(&mut self, now: u64) -> u64 {
        let elapsed = now.saturating_sub(self.last_refill);
        let add = (u128::from(elapsed) * u128::from(REFILL_BYTES_PER_S) / 1_000_000_000) as u64;
        if add > 0 {
            self.tokens = (self.tokens + add).min(BUCKET_BYTES);
            // Keep the remainder of a partial byte's worth of time.
            self.last_refill = now;
        }
        self.tokens
    }

    /// Count bytes refused for lack of tokens.
    pub fn drop_bytes(&mut self, n: u64) {
        self.dropped = self.dropped.saturating_add(n);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Accept bytes already checked against [`Self::allowance`]; complete lines go to `sink`.
    pub fn write(&mut self, name: &str, bytes: &[u8], sink: &mut dyn ConsoleSink) {
        self.tokens = self.tokens.saturating_sub(bytes.len() as u64);
        if !bytes.is_empty() {
            self.history.ensure(DOMAIN_HISTORY_BYTES);
        }
        if self.dropped > 0 {
            let mut msg = Vec::new();
            push_prefix(&mut msg, name);
            let at = msg.len();
            msg.extend_from_slice(b"[console: ");
            push_decimal(&mut msg, self.dropped);
            msg.extend_from_slice(b" bytes dropped by rate limit]\n");
            self.history.push(&msg[at..]);
            sink.domain_line(&msg);
            self.dropped = 0;
        }
        for &b in bytes {
            if b == b'\n' {
                self.history.push(b"\n");
                self.flush(name, sink);
                continue;
            }
            // Control characters other than tab would let a domain forge other lines or
            // drive the terminal.
            let b = if b == b'\t' || (0x20..0x7f).contains(&b) {
                b
            } else {
                b'?'
            };
            self.history.push(&[b]);
            self.line.push(b);
            if self.line.len() >= MAX_LINE {
                self.flush(name, sink);
            }
        }
    }

    /// Emit a partial line (at shutdown).
    pub fn flush(&mut self, name: &str, sink: &mut dyn ConsoleSink) {
        let mut msg = Vec::with_capacity(self.line.len() + name.len() + 4);
        push_prefix(&mut msg, name);
        msg.extend_from_slice(&self.line);
        msg.push(b'\n');
        sink.domain_line(&msg);
        self.line.clear();
    }

    pub fn has_partial_line(&self) -> bool {
        !self.line.is_empty()
    }
}

fn push_prefix(msg: &mut Vec<u8>, name: &str) {
    msg.push(b'(');
    msg.extend_from_slice(name.as_bytes());
    msg.extend_from_slice(b") ");
}

fn push_decimal(msg: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    msg.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    pub struct Lines(pub Vec<u8>);
    impl ConsoleSink for Lines {
        fn write(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
    }

    #[test]
    fn console_input_is_bounded_and_read_in_order() {
        let mut c = DomainConsole::new(0);
        assert_eq!(c.push_input(b"hello\n"), 6);
        let mut out = [0u8; 4];
        assert_eq!(c.peek_input(&mut out), 4);
        assert_eq!(&out, b"hell");
        c.consume_input(4);
        let mut out = [0u8; 16];
        assert_eq!(c.peek_input(&mut out), 2);
        c.consume_input(100);
        assert_eq!(c.input_len(), 0);
        // Full: a short count, then nothing.
        let big = [b'x'; CONSOLE_INPUT_BYTES + 10];
        assert_eq!(c.push_input(&big), CONSOLE_INPUT_BYTES);
        assert_eq!(c.push_input(b"y"), 0);
        assert_eq!(c.input_total(), 6 + CONSOLE_INPUT_BYTES as u64);
        c.release_history();
        assert_eq!(c.input_len(), 0);
    }

    #[test]
    fn lines_are_prefixed_with_the_domain_name_and_sanitised() {
        let mut c = DomainConsole::new(0);
        let mut out = Lines::default();
        c.write("dom1", b"hello\nwor", &mut out);
        c.write("dom1", b"ld\x1b[2J\n", &mut out);
        assert_eq!(out.0, b"(dom1) hello\n(dom1) world?[2J\n");
    }

    #[test]
    fn bucket_limits_bursts_and_refills_over_time() {
        let mut c = DomainConsole::new(0);
        assert_eq!(c.allowance(0), BUCKET_BYTES);
        let mut out = Lines::default();
        c.write("d", &[b'x'; BUCKET_BYTES as usize], &mut out);
        assert_eq!(c.allowance(0), 0);
        assert_eq!(c.allowance(500_000_000), REFILL_BYTES_PER_S / 2);
        assert_eq!(c.allowance(100_000_000_000), BUCKET_BYTES);
    }

    #[test]
    fn dropped_bytes_are_reported_once_writing_resumes() {
        let mut c = DomainConsole::new(0);
        let mut out = Lines::default();
        c.drop_bytes(42);
        c.write("d", b"x\n", &mut out);
        assert_eq!(
            out.0,
            b"(d) [console: 42 bytes dropped by rate limit]\n(d) x\n"
        );
        assert_eq!(c.dropped(), 0);
    }

    #[test]
    fn history_keeps_the_last_bytes_with_running_offsets() {
        let mut r = HistoryRing::<[u8; 8]>::new_array();
        let mut out = [0u8; 16];
        assert_eq!(
            r.read(0, &mut out),
            Ok(RingRead {
                copied: 0,
                next: 0,
                lost: 0
            })
        );
        r.push(b"abcde");
        let g = r.read(0, &mut out).unwrap();
        assert_eq!((&out[..g.copied], g.next, g.lost), (&b"abcde"[..], 5, 0));
        r.push(b"fghij");
        // Wrapped: "cdefghij" kept, a reader at 0 lost 2 bytes.
        let g = r.read(0, &mut out).unwrap();
        assert_eq!(
            (&out[..g.copied], g.next, g.lost),
            (&b"cdefghij"[..], 10, 2)
        );
        // Resuming where it stopped: nothing new, nothing lost.
        let g = r.read(10, &mut out).unwrap();
        assert_eq!((g.copied, g.next, g.lost), (0, 10, 0));
        // A short buffer: the rest comes on the next read.
        let mut small = [0u8; 3];
        let g = r.read(4, &mut small).unwrap();
        assert_eq!((&small[..], g.next, g.lost), (&b"efg"[..], 7, 0));
        let g = r.read(g.next, &mut small).unwrap();
        assert_eq!((&small[..g.copied], g.next), (&b"hij"[..], 10));
        // A push bigger than the ring keeps its tail.
        r.push(b"0123456789ABCDEFGHIJ");
        assert_eq!((r.start(), r.end()), (22, 30));
        let g = r.read(12, &mut out).unwrap();
        assert_eq!((&out[..g.copied], g.lost), (&b"CDEFGHIJ"[..], 10));
    }

    #[test]
    fn history_refuses_offsets_never_written_and_copes_with_hostile_values() {
        let mut r = HistoryRing::<[u8; 8]>::new_array();
        r.push(b"xyz");
        let mut out = [0u8; 4];
        assert_eq!(r.read(4, &mut out), Err(XenError::EINVAL));
        assert_eq!(r.read(u64::MAX, &mut out), Err(XenError::EINVAL));
        assert_eq!(r.read(3, &mut []).map(|g| g.copied), Ok(0));
        assert_eq!(r.read(0, &mut []).map(|g| (g.copied, g.next)), Ok((0, 0)));
    }

    #[test]
    fn a_domain_history_is_allocated_on_first_write_and_freed_on_release() {
        let mut c = DomainConsole::new(0);
        assert_eq!(c.history().capacity(), 0);
        let mut out = Lines::default();
        c.write("d", b"hi\x07\nthere", &mut out);
        assert_eq!(c.history().capacity(), DOMAIN_HISTORY_BYTES);
        let mut buf = [0u8; 64];
        let g = c.history().read(0, &mut buf).unwrap();
        assert_eq!(&buf[..g.copied], b"hi?\nthere", "sanitised, no prefix");
        assert_eq!(out.0, b"(d) hi?\n");
        c.release_history();
        assert_eq!(c.history().capacity(), 0);
        let g = c.history().read(0, &mut buf).unwrap();
        assert_eq!((g.copied, g.lost, g.next), (0, 9, 9));
    }

    #[test]
    fn a_domain_history_wraps_and_reports_drops() {
        let mut c = DomainConsole::new(0);
        let mut out = Lines::default();
        for _ in 0..(DOMAIN_HISTORY_BYTES / 4 + 10) {
            c.write("d", b"abc\n", &mut out);
        }
        c.drop_bytes(5);
        c.write("d", b"z\n", &mut out);
        let h = c.history();
        assert_eq!(h.end() - h.start(), DOMAIN_HISTORY_BYTES as u64);
        let mut buf = alloc::vec![0u8; 64];
        let g = h.read(h.end() - 43, &mut buf).unwrap();
        assert_eq!(
            &buf[..g.copied],
            b"[console: 5 bytes dropped by rate limit]\nz\n"
        );
        let g = h.read(0, &mut buf).unwrap();
        assert_eq!(g.lost, h.start());
    }

    #[test]
    fn overlong_lines_are_split() {
        let mut c = DomainConsole::new(0);
        let mut out = Lines::default();
        c.write("d", &[b'a'; MAX_LINE + 1], &mut out);
        assert_eq!(out.0.len(), 4 + MAX_LINE + 1);
        assert!(c.has_partial_line());
    }
}
