//! Per-domain console output for `CONSOLEIO_write`: a token bucket that bounds how many bytes
//! a domain may put on the hypervisor console, and a line buffer so every line a domain
//! writes appears whole, prefixed with its name: `(name) text`.
//!
//! Bytes over the limit are dropped (as Xen rate-limits guest output) and counted; the count
//! is reported on the console once the domain may write again, so a flood is visible but
//! cannot drown other domains' output.

use alloc::vec::Vec;

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
    fn write(&mut self, bytes: &[u8]);
}

/// One domain's console state.
#[derive(Clone, Debug)]
pub struct DomainConsole {
    tokens: u64,
    last_refill: u64,
    line: Vec<u8>,
    dropped: u64,
}

impl DomainConsole {
    pub fn new(now: u64) -> Self {
        DomainConsole {
            tokens: BUCKET_BYTES,
            last_refill: now,
            line: Vec::new(),
            dropped: 0,
        }
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
        if self.dropped > 0 {
            let mut msg = Vec::new();
            push_prefix(&mut msg, name);
            msg.extend_from_slice(b"[console: ");
            push_decimal(&mut msg, self.dropped);
            msg.extend_from_slice(b" bytes dropped by rate limit]\n");
            sink.write(&msg);
            self.dropped = 0;
        }
        for &b in bytes {
            if b == b'\n' {
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
        sink.write(&msg);
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
    fn overlong_lines_are_split() {
        let mut c = DomainConsole::new(0);
        let mut out = Lines::default();
        c.write("d", &[b'a'; MAX_LINE + 1], &mut out);
        assert_eq!(out.0.len(), 4 + MAX_LINE + 1);
        assert!(c.has_partial_line());
    }
}
