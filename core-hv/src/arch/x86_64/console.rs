//! The console: COM1 behind one lock, the `log` backend (`[cpuN LEVEL] message`), and raw lines
//! for the harness contract (ready, METRIC, refusal), which carry no prefix. The hypervisor's
//! own lines (not domains' console lines) are also kept in a bounded history, read back by
//! `domctl CONSOLE_READ` as dmesg ([`read_dmesg`]).
//!
//! Each line is written whole under the lock, with interrupts off, so lines from several CPUs
//! never interleave. The fatal path ([`fatal_lines`]) takes the lock by force after a bounded
//! wait: the CPU that faulted may itself have held it.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use log::{LevelFilter, Log, Metadata, Record};
use spin::Mutex;

use super::cpu;
use super::percpu;
use super::serial::Serial;
use crate::domain::console::{DMESG_BYTES, HistoryRing, RingRead};

static PORT: Mutex<Serial> = Mutex::new(
    // SAFETY: the only Serial outside this lock is the fatal path's, which runs once the lock
    // was taken or given up on.
    unsafe { Serial::new() },
);
static READY: AtomicBool = AtomicBool::new(false);

/// The hypervisor's own lines (log records, harness lines, `(hv)` lines; not domains'
/// console lines), kept for `domctl CONSOLE_READ` of `DOMID_XEN` (dmesg). Taken after
/// [`PORT`] and with interrupts off; nothing is taken while it is held.
static DMESG: Mutex<HistoryRing<[u8; DMESG_BYTES]>> = Mutex::new(HistoryRing::new_array());

/// A writer to the port that also keeps what it wrote in [`DMESG`].
struct Tee<'a>(&'a mut Serial);

impl Write for Tee<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        DMESG.lock().push(s.as_bytes());
        self.0.write_str(s)
    }
}

/// Set up the UART and install the logger at `level`.
pub fn init(level: LevelFilter) {
    PORT.lock().init();
    READY.store(true, Ordering::Release);
    // Only fails if a logger is already set, i.e. on a second call: nothing to do then.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Change the log level (from the command line).
pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}

fn with_port<R>(f: impl FnOnce(&mut Serial) -> R) -> R {
    let was = cpu::disable_interrupts();
    let r = f(&mut PORT.lock());
    cpu::restore_interrupts(was);
    r
}

/// Print one line exactly as given (no prefix): the harness-facing lines (kept in dmesg).
pub fn raw_line(args: fmt::Arguments<'_>) {
    with_port(|p| {
        let mut t = Tee(p);
        let _ = t.write_fmt(args);
        let _ = t.write_str("\n");
    });
}

/// Print bytes exactly as given (a domain's finished console line, already sanitised).
pub fn raw_bytes(bytes: &[u8]) {
    with_port(|p| {
        for &b in bytes {
            p.write_byte(b);
        }
    });
}

/// Print one of the hypervisor's own lines given as bytes (`(hv) ...`), kept in dmesg.
pub fn hv_bytes(bytes: &[u8]) {
    with_port(|p| {
        DMESG.lock().push(bytes);
        for &b in bytes {
            p.write_byte(b);
        }
    });
}

/// Read the hypervisor's log history (dmesg) from offset `from`.
pub fn read_dmesg(from: u64, out: &mut [u8]) -> Result<RingRead, shared_abi::errno::XenError> {
    let was = cpu::disable_interrupts();
    let r = DMESG.lock().read(from, out);
    cpu::restore_interrupts(was);
    r
}

/// `raw_line` with `format!` syntax.
#[macro_export]
macro_rules! raw_println {
    ($($arg:tt)*) => { $crate::arch::x86_64::console::raw_line(format_args!($($arg)*)) };
}

struct Logger;
static LOGGER: Logger = Logger;

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let cpu = percpu::current_index();
        with_port(|p| {
            let _ = writeln!(Tee(p), "[cpu{cpu} {:<5}] {}", r.level(), r.args());
        });
    }

    fn flush(&self) {}
}

/// Write lines on the fatal path: waits a bounded time for the lock, then takes it anyway
/// (the holder may be the faulting CPU itself, which will never release it).
pub fn fatal_lines(f: impl FnOnce(&mut dyn Write)) {
    cpu::disable_interrupts();
    let mut guard = None;
    for _ in 0..10_000_000u32 {
        if let Some(g) = PORT.try_lock() {
            guard = Some(g);
            break;
        }
        core::hint::spin_loop();
    }
    match guard {
        Some(mut g) => f(&mut *g),
        None => {
            // SAFETY: the holder has not released the lock for a long time; the system is
            // going down and this CPU is the only one still printing on purpose. A garbled
            // line is the worst outcome.
            let mut s = unsafe { Serial::new() };
            f(&mut s)
        }
    }
}
