//! Console output: `print!`-style formatting and the `log` backend, both through
//! `CONSOLEIO_write` (the hypervisor prefixes each line with the domain's name and rate-limits
//! it).

use core::fmt::{self, Write};

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
    fn loglevel_is_read_from_the_command_line() {
        assert_eq!(
            level_from_cmdline("a=1 loglevel=debug"),
            log::LevelFilter::Debug
        );
        assert_eq!(level_from_cmdline("loglevel=bogus"), log::LevelFilter::Info);
        assert_eq!(level_from_cmdline(""), log::LevelFilter::Info);
    }
}
