//! The hypervisor's command line (QEMU `-append`): space-separated words, the ones it knows
//! named in `shared_abi::console::cmdline`. Unknown words and bad values are reported back as
//! warnings and otherwise ignored, so a typo never stops a boot.

use heapless::Vec;
use log::LevelFilter;
use shared_abi::console::cmdline::{EXIT_WHEN_DONE, LOG_LEVEL, TEST_FAULT};

/// A deliberate exception raised after boot (`test_fault=...`), to test the fault report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestFault {
    /// `ud`: invalid opcode (`ud2`).
    InvalidOpcode,
    /// `pf`: a read from an unmapped address.
    PageFault,
    /// `gp`: a read from a non-canonical address.
    GeneralProtection,
    /// `de`: a division by zero.
    DivideError,
    /// `stack`: runaway recursion into the guard page, which must end in #DF on its IST stack.
    StackOverflow,
}

impl TestFault {
    fn parse(v: &str) -> Option<TestFault> {
        Some(match v {
            "ud" => TestFault::InvalidOpcode,
            "pf" => TestFault::PageFault,
            "gp" => TestFault::GeneralProtection,
            "de" => TestFault::DivideError,
            "stack" => TestFault::StackOverflow,
            _ => return None,
        })
    }
}

/// What the command line asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub exit_when_done: bool,
    pub test_fault: Option<TestFault>,
    pub log_level: Option<LevelFilter>,
}

/// Something on the command line that was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warning<'a> {
    UnknownWord(&'a str),
    BadValue {
        key: &'static str,
        value: &'a str,
        allowed: &'static str,
    },
}

impl core::fmt::Display for Warning<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Warning::UnknownWord(w) => write!(f, "unknown command-line word {w:?} ignored"),
            Warning::BadValue {
                key,
                value,
                allowed,
            } => write!(f, "{key}={value:?} ignored: allowed {allowed}"),
        }
    }
}

/// Most warnings kept; further ones are counted in [`Parsed::dropped_warnings`].
pub const MAX_WARNINGS: usize = 16;

/// The parsed options and what was ignored.
#[derive(Clone, Debug, Default)]
pub struct Parsed<'a> {
    pub options: Options,
    pub warnings: Vec<Warning<'a>, MAX_WARNINGS>,
    pub dropped_warnings: usize,
}

impl<'a> Parsed<'a> {
    fn warn(&mut self, w: Warning<'a>) {
        if self.warnings.push(w).is_err() {
            self.dropped_warnings += 1;
        }
    }
}

fn parse_level(v: &str) -> Option<LevelFilter> {
    Some(match v {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Parse a command line; later words override earlier ones.
pub fn parse(line: &str) -> Parsed<'_> {
    let mut p = Parsed::default();
    for word in line.split_ascii_whitespace() {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        match (key, value) {
            (EXIT_WHEN_DONE, None) => p.options.exit_when_done = true,
            (TEST_FAULT, Some(v)) => match TestFault::parse(v) {
                Some(f) => p.options.test_fault = Some(f),
                None => p.warn(Warning::BadValue {
                    key: TEST_FAULT,
                    value: v,
                    allowed: "ud|pf|gp|de|stack",
                }),
            },
            (LOG_LEVEL, Some(v)) => match parse_level(v) {
                Some(l) => p.options.log_level = Some(l),
                None => p.warn(Warning::BadValue {
                    key: LOG_LEVEL,
                    value: v,
                    allowed: "off|error|warn|info|debug|trace",
                }),
            },
            _ => p.warn(Warning::UnknownWord(word)),
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_words_set_options() {
        let p = parse("  exit_when_done test_fault=pf   loglevel=debug ");
        assert_eq!(
            p.options,
            Options {
                exit_when_done: true,
                test_fault: Some(TestFault::PageFault),
                log_level: Some(LevelFilter::Debug),
            }
        );
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn every_fault_kind_parses() {
        for (w, f) in [
            ("ud", TestFault::InvalidOpcode),
            ("pf", TestFault::PageFault),
            ("gp", TestFault::GeneralProtection),
            ("de", TestFault::DivideError),
            ("stack", TestFault::StackOverflow),
        ] {
            let line = format!("test_fault={w}");
            assert_eq!(parse(&line).options.test_fault, Some(f));
        }
    }

    #[test]
    fn unknown_words_and_bad_values_warn_and_are_ignored() {
        let p = parse("quiet exit_when_done=1 test_fault=xx loglevel=loud test_fault");
        assert_eq!(p.options, Options::default());
        assert_eq!(
            p.warnings.as_slice(),
            &[
                Warning::UnknownWord("quiet"),
                Warning::UnknownWord("exit_when_done=1"),
                Warning::BadValue {
                    key: "test_fault",
                    value: "xx",
                    allowed: "ud|pf|gp|de|stack"
                },
                Warning::BadValue {
                    key: "loglevel",
                    value: "loud",
                    allowed: "off|error|warn|info|debug|trace"
                },
                Warning::UnknownWord("test_fault"),
            ]
        );
    }

    #[test]
    fn warnings_beyond_the_limit_are_counted() {
        let line = "x ".repeat(MAX_WARNINGS + 5);
        let p = parse(&line);
        assert_eq!(p.warnings.len(), MAX_WARNINGS);
        assert_eq!(p.dropped_warnings, 5);
    }

    #[test]
    fn empty_line_gives_defaults() {
        let p = parse("");
        assert_eq!(p.options, Options::default());
        assert!(p.warnings.is_empty());
    }
}
