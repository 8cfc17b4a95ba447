//! The console protocol between `core-hv` (and its domains) and the host harness.
//!
//! Humans read the serial console; the scenario harness (`tests`) and `cargo hv` read a few
//! structured lines from it. Their format is defined here, once, for both sides:
//!
//! - the ready line: `bulkhead: ready: <cpus> CPUs, <MiB> MiB free, <n> boot domains`
//! - a scenario result: `RESULT <name> pass|fail <details>`
//! - a measured figure: `METRIC <name> <value> <unit>`
//!
//! and the `isa-debug-exit` status codes a test-mode boot powers off with. QEMU exits with
//! `(code << 1) | 1`, so the process status is odd and never collides with QEMU's own 0/1.

use core::fmt;

/// I/O port of QEMU's `isa-debug-exit` device (`-device isa-debug-exit,iobase=0xf4,iosize=4`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Debug-exit code: the system ran to completion and every check passed.
pub const EXIT_SUCCESS: u32 = 0x10;
/// Debug-exit code: the system stopped on a failure (bad manifest, exception, failed check).
pub const EXIT_FAILURE: u32 = 0x11;

/// The QEMU process status that a debug-exit `code` produces.
pub const fn qemu_status_for(code: u32) -> i32 {
    ((code << 1) | 1) as i32
}

/// The prefix of the ready line.
pub const READY_PREFIX: &str = "bulkhead: ready: ";

/// Kernel command-line words understood by `core-hv` (QEMU `-append`).
pub mod cmdline {
    /// Power off with [`super::EXIT_SUCCESS`] once the system is ready and every boot domain has
    /// stopped (or at once, with no domains), instead of idling forever.
    pub const EXIT_WHEN_DONE: &str = "exit_when_done";
    /// `test_fault=<kind>`: raise a deliberate exception after boot, to test the report
    /// (`ud`, `pf`, `gp`, `de`).
    pub const TEST_FAULT: &str = "test_fault";
    /// `loglevel=<error|warn|info|debug|trace>`.
    pub const LOG_LEVEL: &str = "loglevel";
}

/// The ready line's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadyLine {
    pub cpus: u32,
    pub free_mib: u64,
    pub boot_domains: u32,
}

impl fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{READY_PREFIX}{} CPUs, {} MiB free, {} boot domains",
            self.cpus, self.free_mib, self.boot_domains
        )
    }
}

impl ReadyLine {
    /// Parse a console line; `None` if it is not a well-formed ready line.
    pub fn parse(line: &str) -> Option<ReadyLine> {
        let rest = line.trim_end().strip_prefix(READY_PREFIX)?;
        let (cpus, rest) = rest.split_once(" CPUs, ")?;
        let (free, rest) = rest.split_once(" MiB free, ")?;
        let doms = rest.strip_suffix(" boot domains")?;
        Some(ReadyLine {
            cpus: cpus.parse().ok()?,
            free_mib: free.parse().ok()?,
            boot_domains: doms.parse().ok()?,
        })
    }
}

/// Outcome of one scenario check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
}

/// `RESULT <name> pass|fail <details>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResultLine<'a> {
    pub name: &'a str,
    pub verdict: Verdict,
    pub details: &'a str,
}

impl fmt::Display for ResultLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = match self.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
        };
        write!(f, "RESULT {} {v} {}", self.name, self.details)
    }
}

impl<'a> ResultLine<'a> {
    /// Parse a console line (a `[cpuN]`-style prefix before `RESULT` is allowed).
    pub fn parse(line: &'a str) -> Option<ResultLine<'a>> {
        let at = line.find("RESULT ")?;
        let mut parts = line[at + 7..].trim_end().splitn(3, ' ');
        let name = parts.next().filter(|n| !n.is_empty())?;
        let verdict = match parts.next()? {
            "pass" => Verdict::Pass,
            "fail" => Verdict::Fail,
            _ => return None,
        };
        Some(ResultLine {
            name,
            verdict,
            details: parts.next().unwrap_or(""),
        })
    }
}

/// `METRIC <name> <value> <unit>`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricLine<'a> {
    pub name: &'a str,
    pub value: f64,
    pub unit: &'a str,
}

impl fmt::Display for MetricLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "METRIC {} {} {}", self.name, self.value, self.unit)
    }
}

impl<'a> MetricLine<'a> {
    /// Parse a console line (a prefix before `METRIC` is allowed).
    pub fn parse(line: &'a str) -> Option<MetricLine<'a>> {
        let at = line.find("METRIC ")?;
        let mut parts = line[at + 7..].split_whitespace();
        let name = parts.next()?;
        let value = parts.next()?.parse().ok()?;
        let unit = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        Some(MetricLine { name, value, unit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn ready_line_round_trips() {
        let r = ReadyLine {
            cpus: 4,
            free_mib: 220,
            boot_domains: 0,
        };
        let s = r.to_string();
        assert_eq!(s, "bulkhead: ready: 4 CPUs, 220 MiB free, 0 boot domains");
        assert_eq!(ReadyLine::parse(&s), Some(r));
        assert_eq!(
            ReadyLine::parse("bulkhead: ready: x CPUs, 1 MiB free, 0 boot domains"),
            None
        );
    }

    #[test]
    fn result_line_parses_with_prefix_and_rejects_bad_verdict() {
        let r = ResultLine::parse("[cpu0 INFO ] RESULT boot pass 4 cpus up").unwrap();
        assert_eq!(r.name, "boot");
        assert_eq!(r.verdict, Verdict::Pass);
        assert_eq!(r.details, "4 cpus up");
        assert_eq!(ResultLine::parse("RESULT boot maybe"), None);
        assert_eq!(ResultLine::parse("RESULT x fail").unwrap().details, "");
    }

    #[test]
    fn metric_line_round_trips() {
        let m = MetricLine {
            name: "boot_to_ready_ms",
            value: 12.5,
            unit: "ms",
        };
        assert_eq!(MetricLine::parse(&m.to_string()), Some(m));
        assert_eq!(MetricLine::parse("METRIC a notanumber ms"), None);
    }

    #[test]
    fn qemu_status_matches_debug_exit_formula() {
        assert_eq!(qemu_status_for(EXIT_SUCCESS), 33);
        assert_eq!(qemu_status_for(EXIT_FAILURE), 35);
    }
}
