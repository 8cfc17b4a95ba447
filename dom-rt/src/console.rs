//! Console output: `print!`-style formatting and the `log` backend, both through
//! `CONSOLEIO_write` (the hypervisor prefixes each line with the domain's name and rate-limits
//! it).

use core::fmt::{self, Write};

use shared_abi::errno::XenError;
use shared_abi::event_channel::virq;
use shared_abi::hypercall::{self as hc, console_io};

use crate::hypercall;

/// Formats into a fixed buffer and writes it out when full and when dropped.
pub struct ConsoleWriter {
    buf: [u8; 256],
    len: usize,
}

impl ConsoleWriter {
    pub const fn new() -> Self {
        ConsoleWriter {
            buf: [0; 256],
            len: 0,
        }
    }

    pub fn flush(&mut self) {
        if self.len > 0 {
            // Console output is best effort: nothing useful can be done if it is refused.
            let _ = hypercall::console_write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for ConsoleWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for ConsoleWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Read console input (what `hvctl console` typed, given by the toolstack) into `buf`:
/// `console_io(CONSOLEIO_read)`; how many bytes, 0 when none is waiting. Never waits.
pub fn read(buf: &mut [u8]) -> Result<usize, XenError> {
    let n = hypercall::call(
        hc::CONSOLE_IO,
        [
            console_io::READ,
            buf.len() as u64,
            buf.as_mut_ptr() as u64,
            0,
            0,
        ],
    )?;
    // Never more than asked: anything else is refused, not trusted.
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= buf.len())
        .ok_or(XenError::EIO)
}

/// Console input with a way to wait for it: `VIRQ_CONSOLE`, which the hypervisor raises
/// in this domain when input arrives.
#[derive(Debug)]
pub struct Input {
    port: u32,
}

impl Input {
    /// Bind `VIRQ_CONSOLE` (once per domain).
    pub fn new() -> Result<Self, XenError> {
        let port = crate::evtchn::bind_virq(virq::CONSOLE, 0)?;
        Ok(Input { port })
    }

    /// The `VIRQ_CONSOLE` port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Read at least one byte of input into `buf`, blocking until some arrives.
    pub fn read_blocking(
        &mut self,
        waiter: &mut crate::event::Waiter,
        buf: &mut [u8],
    ) -> Result<usize, XenError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            // Read first: input given before the VIRQ was bound raised nothing.
            let n = read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            waiter.wait(self.port)?;
        }
    }
}

/// Splits console input into lines (`\n` or `\r` ends one; a lone `\n` after `\r` is
/// skipped, so CRLF is one end). Lines longer than `N` bytes are cut at `N`.
#[derive(Debug)]
pub struct LineBuffer<const N: usize> {
    buf: [u8; N],
    len: usize,
    after_cr: bool,
}

impl<const N: usize> Default for LineBuffer<N> {
    fn default() -> Self {
        LineBuffer {
            buf: [0; N],
            len: 0,
            after_cr: false,
        }
    }
}

impl<const N: usize> LineBuffer<N> {
    /// Feed input bytes; `f` gets each finished line (without its end).
    pub fn feed(&mut self, bytes: &[u8], mut f: impl FnMut(&[u8])) {
        for &b in bytes {
            let after_cr = core::mem::replace(&mut self.after_cr, b == b'\r');
            if b == b'\n' && after_cr {
                continue;
            }
            if b == b'\n' || b == b'\r' || self.len == N {
                f(&self.buf[..self.len]);
                self.len = 0;
                if b == b'\n' || b == b'\r' {
                    continue;
                }
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }
}

/// Write formatted text to the console.
pub fn print(args: fmt::Arguments<'_>) {
    let mut w = ConsoleWriter::new();
    let _ = w.write_fmt(args);
}

/// `print!` to the hypervisor console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// `println!` to the hypervisor console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// The `log` backend: `LEVEL target: message`.
pub struct ConsoleLogger;

impl log::Log for ConsoleLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            print(format_args!("{} {}: {}\n", r.level(), r.target(), r.args()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: ConsoleLogger = ConsoleLogger;

/// Install the console as the `log` backend (idempotent).
pub fn init_log(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// The log level a command line asks for (`loglevel=<error|warn|info|debug|trace>`).
pub fn level_from_cmdline(cmdline: &str) -> log::LevelFilter {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("loglevel="))
        .filter_map(|l| l.parse().ok())
        .next_back()
        .unwrap_or(log::LevelFilter::Info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_on_lf_cr_and_crlf_and_long_lines_are_cut() {
        let mut l = LineBuffer::<4>::default();
        let mut got = alloc::vec::Vec::new();
        l.feed(b"ab\ncd\r\nef", |x| got.push(x.to_vec()));
        l.feed(b"\rabcdefg\n\n", |x| got.push(x.to_vec()));
        let want: [&[u8]; 6] = [b"ab", b"cd", b"ef", b"abcd", b"efg", b""];
        assert_eq!(got, want);
    }

    #[test]
    fn read_takes_what_is_waiting_and_refuses_impossible_counts() {
        use crate::hypercall::MOCK;
        fn fake(nr: u64, a: [u64; 5]) -> i64 {
            if nr != hc::CONSOLE_IO || a[0] != console_io::READ {
                return XenError::ENOSYS.as_ret();
            }
            if a[1] == 99 {
                return 100;
            }
            let n = a[1].min(3) as usize;
            // SAFETY: `read` passes a live buffer of `a[1]` bytes.
            unsafe { core::slice::from_raw_parts_mut(a[2] as *mut u8, n) }
                .copy_from_slice(&b"hey"[..n]);
            n as i64
        }
        let _g = crate::hypercall::TEST_LOCK.lock();
        *MOCK.lock() = Some(fake);
        let mut b = [0u8; 8];
        let r = read(&mut b);
        let mut b99 = [0u8; 99];
        let liar = read(&mut b99);
        *MOCK.lock() = None;
        assert_eq!((r, &b[..3]), (Ok(3), &b"hey"[..]));
        assert_eq!(liar, Err(XenError::EIO));
    }

    #[test]
    fn loglevel_is_read_from_the_command_line() {
        assert_eq!(
            level_from_cmdline("a=1 loglevel=debug"),
            log::LevelFilter::Debug
        );
        assert_eq!(level_from_cmdline("loglevel=bogus"), log::LevelFilter::Info);
        assert_eq!(level_from_cmdline(""), log::LevelFilter::Info);
    }
}
