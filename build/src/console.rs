//! The console judge: reads what `core-hv` printed on the serial console and pulls out the
//! structured lines (`shared_abi::console`: the ready line, `RESULT`, `METRIC`), the boot-image
//! refusal and the exception report.
//!
//! Lines may carry a log prefix (`[cpu0 INFO ] ...`); every finder looks for its marker anywhere
//! in the line. Nothing here trusts the console: a malformed line is simply not a match.

use shared_abi::console::{MetricLine, READY_PREFIX, ReadyLine, ResultLine, Verdict};

/// What `core-hv` prints, before powering off with `EXIT_FAILURE`, when it refuses the boot
/// image; the reason is `shared_abi::manifest::ImageError`'s `Display`.
pub const IMAGE_REFUSED_PREFIX: &str = "bulkhead: boot image refused: ";

/// The CPU exceptions `core-hv`'s `test_fault=` can raise, with what a report must name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// `ud`: invalid opcode, vector 6.
    InvalidOpcode,
    /// `pf`: page fault, vector 14.
    PageFault,
    /// `gp`: general protection, vector 13.
    GeneralProtection,
    /// `de`: divide error, vector 0.
    DivideError,
}

impl FaultKind {
    pub const ALL: [FaultKind; 4] = [
        FaultKind::InvalidOpcode,
        FaultKind::PageFault,
        FaultKind::GeneralProtection,
        FaultKind::DivideError,
    ];

    /// The `test_fault=` value.
    pub fn cmdline_value(self) -> &'static str {
        match self {
            FaultKind::InvalidOpcode => "ud",
            FaultKind::PageFault => "pf",
            FaultKind::GeneralProtection => "gp",
            FaultKind::DivideError => "de",
        }
    }

    pub fn vector(self) -> u8 {
        match self {
            FaultKind::InvalidOpcode => 6,
            FaultKind::PageFault => 14,
            FaultKind::GeneralProtection => 13,
            FaultKind::DivideError => 0,
        }
    }

    /// The architectural mnemonic (`#UD`).
    pub fn mnemonic(self) -> &'static str {
        match self {
            FaultKind::InvalidOpcode => "#UD",
            FaultKind::PageFault => "#PF",
            FaultKind::GeneralProtection => "#GP",
            FaultKind::DivideError => "#DE",
        }
    }
}

/// A console log, one entry per line, without line terminators.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Console {
    lines: Vec<String>,
}

/// The general-purpose registers a useful exception report shows.
pub const REPORT_REGISTERS: [&str; 6] = ["rax", "rbx", "rcx", "rdx", "rsp", "rbp"];

impl Console {
    pub fn new(lines: Vec<String>) -> Console {
        Console { lines }
    }

    /// Split raw console text into lines (`\r\n` and `\n`).
    pub fn from_text(text: &str) -> Console {
        Console::new(
            text.lines()
                .map(|l| l.trim_end_matches('\r').to_string())
                .collect(),
        )
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// The index and content of the first well-formed ready line.
    pub fn ready_at(&self) -> Option<(usize, ReadyLine)> {
        self.lines.iter().enumerate().find_map(|(i, l)| {
            let at = l.find(READY_PREFIX)?;
            ReadyLine::parse(&l[at..]).map(|r| (i, r))
        })
    }

    pub fn ready(&self) -> Option<ReadyLine> {
        self.ready_at().map(|(_, r)| r)
    }

    pub fn results(&self) -> Vec<ResultLine<'_>> {
        self.lines
            .iter()
            .filter_map(|l| ResultLine::parse(l))
            .collect()
    }

    pub fn metrics(&self) -> Vec<MetricLine<'_>> {
        self.lines
            .iter()
            .filter_map(|l| MetricLine::parse(l))
            .collect()
    }

    /// The value and unit of the first `METRIC <name>` line.
    pub fn metric(&self, name: &str) -> Option<(f64, String)> {
        self.metrics()
            .into_iter()
            .find(|m| m.name == name)
            .map(|m| (m.value, m.unit.to_string()))
    }

    /// The reason of the first boot-image refusal line.
    pub fn refusal(&self) -> Option<&str> {
        self.lines.iter().find_map(|l| {
            let at = l.find(IMAGE_REFUSED_PREFIX)?;
            Some(l[at + IMAGE_REFUSED_PREFIX.len()..].trim_end())
        })
    }

    /// The exception report: from the first line that mentions an exception to the end.
    pub fn exception_report(&self) -> Option<ExceptionReport> {
        self.exception_report_from(0)
    }

    /// The exception report that starts at or after line `first` (0-based).
    pub fn exception_report_from(&self, first: usize) -> Option<ExceptionReport> {
        let start = first
            + self
                .lines
                .get(first..)?
                .iter()
                .position(|l| l.to_ascii_lowercase().contains("exception"))?;
        Some(ExceptionReport {
            text: self.lines[start..].join("\n"),
        })
    }

    /// The last `n` lines, numbered, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let from = self.lines.len().saturating_sub(n);
        let mut s = String::new();
        for (i, l) in self.lines.iter().enumerate().skip(from) {
            s.push_str(&format!("  {:>5} | {l}\n", i + 1));
        }
        if s.is_empty() {
            s.push_str("  (the console printed nothing)\n");
        }
        s
    }

    /// Judge the `RESULT` lines: the name and details of each failed check, and how many
    /// passed.
    pub fn judge_results(&self) -> Judgement {
        let mut j = Judgement::default();
        for r in self.results() {
            match r.verdict {
                Verdict::Pass => j.passed.push(r.name.to_string()),
                Verdict::Fail => j.failed.push(format!("{}: {}", r.name, r.details)),
            }
        }
        j
    }
}

/// The verdicts of a console's `RESULT` lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    pub passed: Vec<String>,
    pub failed: Vec<String>,
}

/// The text of an exception report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExceptionReport {
    pub text: String,
}

impl ExceptionReport {
    /// What the report fails to name for an exception of `kind`: the vector (by mnemonic,
    /// name or number), RIP, the general registers, and CR2 for a page fault. Empty when the
    /// report is complete.
    pub fn missing(&self, kind: FaultKind) -> Vec<String> {
        let lower = self.text.to_ascii_lowercase();
        let mut missing = Vec::new();
        let vector = kind.vector();
        let names_vector = lower.contains(&kind.mnemonic().to_ascii_lowercase())
            || lower.contains(&format!("vector {vector}"))
            || lower.contains(&format!("vector={vector}"))
            || lower.contains(&format!("vector: {vector}"))
            || lower.contains(&format!("vector {vector:#x}"));
        if !names_vector {
            missing.push(format!(
                "the vector ({} / vector {vector})",
                kind.mnemonic()
            ));
        }
        if !has_register(&lower, "rip") {
            missing.push("RIP".to_string());
        }
        let regs: Vec<&str> = REPORT_REGISTERS
            .iter()
            .copied()
            .filter(|r| !has_register(&lower, r))
            .collect();
        if !regs.is_empty() {
            missing.push(format!("registers {}", regs.join(", ")));
        }
        if kind == FaultKind::PageFault && !has_register(&lower, "cr2") {
            missing.push("CR2 (the faulting address)".to_string());
        }
        missing
    }
}

/// `name` appears as a word followed, after `=`, `:` or spaces, by a hex number.
fn has_register(lower: &str, name: &str) -> bool {
    lower.match_indices(name).any(|(at, _)| {
        let before_ok = lower[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric());
        let rest = lower[at + name.len()..].trim_start_matches([' ', '=', ':']);
        let rest = rest.strip_prefix("0x").unwrap_or(rest);
        before_ok && rest.chars().next().is_some_and(|c| c.is_ascii_hexdigit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "\
[cpu0 INFO ] core-hv starting\r
[cpu0 INFO ] 2 CPUs online\r
METRIC boot_to_ready_ms 41.5 ms\r
bulkhead: ready: 2 CPUs, 250 MiB free, 0 boot domains\r
[cpu1 INFO ] RESULT smp pass 2 cpus\r
[cpu0 INFO ] RESULT evtchn fail port 3 lost\r
RESULT bogus maybe\r
";

    #[test]
    fn ready_line_is_found_with_or_without_prefix() {
        let c = Console::from_text(BOOT);
        let (at, r) = c.ready_at().unwrap();
        assert_eq!(at, 3);
        assert_eq!((r.cpus, r.free_mib, r.boot_domains), (2, 250, 0));
        let c =
            Console::from_text("[cpu0 INFO ] bulkhead: ready: 4 CPUs, 1 MiB free, 3 boot domains");
        assert_eq!(c.ready().unwrap().cpus, 4);
        assert_eq!(
            Console::from_text("bulkhead: ready: four CPUs").ready(),
            None
        );
    }

    #[test]
    fn results_are_judged_and_malformed_ones_ignored() {
        let j = Console::from_text(BOOT).judge_results();
        assert_eq!(j.passed, vec!["smp"]);
        assert_eq!(j.failed, vec!["evtchn: port 3 lost"]);
    }

    #[test]
    fn metric_is_read_by_name() {
        let c = Console::from_text(BOOT);
        assert_eq!(c.metric("boot_to_ready_ms"), Some((41.5, "ms".to_string())));
        assert_eq!(c.metric("nope"), None);
    }

    #[test]
    fn refusal_reason_is_extracted() {
        let c = Console::from_text(
            "[cpu0 ERROR] bulkhead: boot image refused: boot image version 9 is not supported\n",
        );
        assert_eq!(c.refusal(), Some("boot image version 9 is not supported"));
        assert_eq!(Console::from_text(BOOT).refusal(), None);
        assert!(Console::from_text(BOOT).exception_report().is_none());
    }

    const PF_REPORT: &str = "\
bulkhead: ready: 1 CPUs, 250 MiB free, 0 boot domains
[cpu0 ERROR] EXCEPTION #PF (vector 14) error code 0x2 on cpu 0
[cpu0 ERROR] rip=0xffffffff80101234 rsp=0xffff800000010000 rflags=0x0000000000000046
[cpu0 ERROR] rax=0x0 rbx=0x1 rcx=0x2 rdx=0x3 rbp=0xffff800000010100 cr2=0xdead0000
";

    #[test]
    fn complete_exception_report_misses_nothing() {
        let r = Console::from_text(PF_REPORT).exception_report().unwrap();
        assert!(r.text.starts_with("[cpu0 ERROR] EXCEPTION #PF"));
        let c = Console::from_text(PF_REPORT);
        assert_eq!(c.exception_report_from(1), Some(r.clone()));
        assert_eq!(c.exception_report_from(2), None);
        assert_eq!(c.exception_report_from(99), None);
        assert_eq!(r.missing(FaultKind::PageFault), Vec::<String>::new());
    }

    #[test]
    fn incomplete_exception_report_names_what_is_missing() {
        let r = ExceptionReport {
            text: "exception: vector 6\nrsp=0x10 rax:0 rbx: 1 rcx 2 rdx=3".into(),
        };
        let missing = r.missing(FaultKind::InvalidOpcode);
        assert_eq!(missing, vec!["RIP", "registers rbp"]);
        // The wrong vector is not accepted.
        let missing = r.missing(FaultKind::GeneralProtection);
        assert!(missing[0].contains("#GP"), "{missing:?}");
        // "prip=1" is not rip, and "rip=" with no value is not a register dump.
        assert!(!has_register("prip=1", "rip"));
        assert!(!has_register("rip= ", "rip"));
        assert!(has_register("rip: 0xffff", "rip"));
        assert!(PF_REPORT.contains("cr2"));
        let no_cr2 = ExceptionReport {
            text: PF_REPORT.replace("cr2", "xx2"),
        };
        assert_eq!(no_cr2.missing(FaultKind::PageFault).len(), 1);
    }

    #[test]
    fn tail_numbers_the_last_lines() {
        let c = Console::from_text("a\nb\nc\n");
        assert_eq!(c.tail(2), "      2 | b\n      3 | c\n");
        assert!(Console::default().tail(5).contains("printed nothing"));
    }

    #[test]
    fn fault_kinds_match_the_architecture() {
        let v: Vec<(&str, u8)> = FaultKind::ALL
            .iter()
            .map(|k| (k.cmdline_value(), k.vector()))
            .collect();
        assert_eq!(v, vec![("ud", 6), ("pf", 14), ("gp", 13), ("de", 0)]);
    }
}
