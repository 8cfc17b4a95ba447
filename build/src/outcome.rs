//! What a QEMU run's ending means, and the exit status `cargo hv run` answers with.
//!
//! `core-hv` powers off through `isa-debug-exit`, so QEMU's status carries its verdict:
//! `(code << 1) | 1` (`shared_abi::console::qemu_status_for`). With `-no-reboot`, a triple
//! fault or reset makes QEMU exit 0, which no debug-exit code can produce.

use std::fmt;

use shared_abi::console::{EXIT_FAILURE, EXIT_SUCCESS, qemu_status_for};

/// How the QEMU process ended, as the runner saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The process exited with this status.
    Exited(i32),
    /// The process was killed by this signal (not by us).
    Signalled(i32),
    /// The time limit passed; we killed it.
    TimedOut,
    /// Ctrl-C (or SIGTERM/SIGHUP) reached us; we killed it.
    Interrupted,
}

/// What the ending means for the system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `core-hv` powered off with `EXIT_SUCCESS`.
    CleanPoweroff,
    /// `core-hv` powered off with `EXIT_FAILURE` (exception, refused image, failed check).
    FailurePoweroff,
    /// QEMU exited 0: with `-no-reboot` that is a triple fault or a reset request.
    Reset,
    /// QEMU itself failed (bad arguments, missing file) or exited with an unknown status.
    QemuError(i32),
    /// QEMU was killed by a signal we did not send.
    QemuKilled(i32),
    TimedOut,
    Interrupted,
}

/// `cargo hv run` exit statuses (also listed in its `--help`).
pub mod exit_code {
    pub const CLEAN_POWEROFF: u8 = 0;
    pub const FAILURE: u8 = 1;
    /// Bad usage, a bad system file, a failed build, or a missing tool: nothing was booted.
    pub const NOT_BOOTED: u8 = 2;
    pub const TIMEOUT: u8 = 124;
    pub const INTERRUPTED: u8 = 130;
}

impl Outcome {
    pub fn classify(ending: Ending) -> Outcome {
        match ending {
            Ending::Exited(s) if s == qemu_status_for(EXIT_SUCCESS) => Outcome::CleanPoweroff,
            Ending::Exited(s) if s == qemu_status_for(EXIT_FAILURE) => Outcome::FailurePoweroff,
            Ending::Exited(0) => Outcome::Reset,
            Ending::Exited(s) => Outcome::QemuError(s),
            Ending::Signalled(sig) => Outcome::QemuKilled(sig),
            Ending::TimedOut => Outcome::TimedOut,
            Ending::Interrupted => Outcome::Interrupted,
        }
    }

    /// The exit status `cargo hv run` ends with.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::CleanPoweroff => exit_code::CLEAN_POWEROFF,
            Outcome::FailurePoweroff
            | Outcome::Reset
            | Outcome::QemuError(_)
            | Outcome::QemuKilled(_) => exit_code::FAILURE,
            Outcome::TimedOut => exit_code::TIMEOUT,
            Outcome::Interrupted => exit_code::INTERRUPTED,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::CleanPoweroff => write!(
                f,
                "clean poweroff (QEMU status {})",
                qemu_status_for(EXIT_SUCCESS)
            ),
            Outcome::FailurePoweroff => write!(
                f,
                "failure poweroff (QEMU status {})",
                qemu_status_for(EXIT_FAILURE)
            ),
            Outcome::Reset => write!(f, "triple fault or reset (QEMU status 0 with -no-reboot)"),
            Outcome::QemuError(s) => write!(f, "QEMU error (status {s})"),
            Outcome::QemuKilled(sig) => write!(f, "QEMU killed by signal {sig}"),
            Outcome::TimedOut => write!(f, "time limit reached; QEMU killed"),
            Outcome::Interrupted => write!(f, "interrupted; QEMU killed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_statuses_map_to_poweroff_outcomes() {
        assert_eq!(
            Outcome::classify(Ending::Exited(33)),
            Outcome::CleanPoweroff
        );
        assert_eq!(
            Outcome::classify(Ending::Exited(35)),
            Outcome::FailurePoweroff
        );
        assert_eq!(Outcome::classify(Ending::Exited(0)), Outcome::Reset);
        assert_eq!(Outcome::classify(Ending::Exited(1)), Outcome::QemuError(1));
        assert_eq!(
            Outcome::classify(Ending::Signalled(9)),
            Outcome::QemuKilled(9)
        );
        assert_eq!(Outcome::classify(Ending::TimedOut), Outcome::TimedOut);
        assert_eq!(Outcome::classify(Ending::Interrupted), Outcome::Interrupted);
    }

    #[test]
    fn outcomes_map_to_documented_exit_codes() {
        let code = |e| Outcome::classify(e).exit_code();
        assert_eq!(code(Ending::Exited(33)), 0);
        assert_eq!(code(Ending::Exited(35)), 1);
        assert_eq!(code(Ending::Exited(0)), 1);
        assert_eq!(code(Ending::Exited(1)), 1);
        assert_eq!(code(Ending::Signalled(11)), 1);
        assert_eq!(code(Ending::TimedOut), 124);
        assert_eq!(code(Ending::Interrupted), 130);
    }

    #[test]
    fn outcome_descriptions_name_the_qemu_status() {
        assert!(Outcome::CleanPoweroff.to_string().contains("33"));
        assert!(Outcome::FailurePoweroff.to_string().contains("35"));
        assert!(Outcome::QemuError(7).to_string().contains("7"));
    }
}
