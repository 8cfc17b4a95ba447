//! The `cargo hv` command line (clap derive). What each subcommand does is in
//! [`crate::commands`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, value_parser};

/// Printed under `cargo hv run --help`.
pub const RUN_EXIT_STATUS: &str = "\
Exit status:
  0    the system powered off cleanly (core-hv debug-exit EXIT_SUCCESS, QEMU status 33)
  1    the system powered off on a failure (EXIT_FAILURE, QEMU status 35: an exception, a
       refused boot image, a failed check), triple-faulted or reset (QEMU status 0 with
       -no-reboot), or QEMU itself failed
  2    nothing was booted: bad arguments, a bad system file, a failed build, a missing tool
  124  the --timeout passed; QEMU was killed
  130  interrupted (Ctrl-C, SIGTERM, SIGHUP); QEMU was killed

QEMU runs in its own process group and is killed with it on every path.";

const TEST_ABOUT: &str = "\
Steps, in order (each runs even if an earlier one failed, except that the scenarios need
the image):
  1. host tests:     cargo test --workspace --exclude tests [-- FILTER]
  2. loom models:    RUSTFLAGS='--cfg loom' cargo test -p shared-abi --release
                     --target-dir target/loom -- loom   (FILTER instead of `loom` if given;
                     only when shared-abi has a cfg(loom) module)
  3. boot image:     build core-hv and the base system's domains (systems/base.toml)
  4. QEMU scenarios: cargo test -p tests [-- FILTER] with BULKHEAD_CORE_HV and BULKHEAD_IMAGE
                     set to the image just built

A step still running after --step-timeout is killed with everything it started, and fails.

Exit status: 0 all steps passed, 1 a step failed, 2 a tool is missing, 130 interrupted.";

/// Bulkhead's developer front door: build, boot, test and benchmark the hypervisor.
#[derive(Debug, Parser)]
#[command(name = "cargo hv", bin_name = "cargo hv", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build core-hv and every domain of a system for x86_64-unknown-none and write the boot
    /// image (manifest + domain ELFs) with a copy of core-hv beside it.
    Image(ImageArgs),
    /// Build and boot a system under QEMU, streaming its serial console.
    #[command(after_help = RUN_EXIT_STATUS)]
    Run(RunArgs),
    /// Run every crate's host tests, then the QEMU scenarios.
    #[command(after_help = TEST_ABOUT)]
    Test(TestArgs),
    /// Run the benchmarks (boot time under QEMU, the in-QEMU benchmark systems
    /// systems/*bench*.toml, every crate's criterion benches) and print a table.
    Bench(BenchArgs),
}

#[derive(Debug, Args, PartialEq, Eq)]
pub struct ImageArgs {
    /// Where to write `<system>.img` and `core-hv` [default: target/bulkhead]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The system description [default: systems/default.toml]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args, PartialEq, Eq)]
pub struct RunArgs {
    /// Number of CPUs
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = value_parser!(u32).range(1..=64))]
    pub smp: u32,
    /// Machine memory in MiB
    #[arg(long, value_name = "MiB", default_value_t = 256, value_parser = value_parser!(u32).range(32..=65536))]
    pub memory: u32,
    /// Stop QEMU after this many seconds [default: no limit]
    #[arg(long, value_name = "SECS", value_parser = value_parser!(u64).range(1..=86400))]
    pub timeout: Option<u64>,
    /// The system description [default: systems/default.toml]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Power off when the system is done (core-hv's `exit_when_done`) instead of idling
    #[arg(long)]
    pub exit_when_done: bool,
    /// Extra core-hv command-line words, e.g. `--append loglevel=debug` (repeatable)
    #[arg(long, value_name = "WORDS")]
    pub append: Vec<String>,
}

#[derive(Debug, Args, PartialEq, Eq)]
pub struct TestArgs {
    /// Run only the tests and scenarios whose name contains FILTER
    pub filter: Option<String>,
    /// Kill a step (and fail it) that runs longer than this: a hung test must not hang CI
    #[arg(long, value_name = "SECS", default_value_t = 1200, value_parser = value_parser!(u64).range(1..))]
    pub step_timeout: u64,
}

#[derive(Debug, Args, PartialEq, Eq)]
pub struct BenchArgs {
    /// Also write the results as one JSON object: name -> { value, unit, samples, note }
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Run only the benchmarks whose name contains FILTER
    pub filter: Option<String>,
    /// Boots measured for the boot figures, and at most this many of each benchmark system
    /// (the median is reported)
    #[arg(long, value_name = "N", default_value_t = 7, value_parser = value_parser!(u32).range(1..=101))]
    pub boots: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hv").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_has_documented_defaults() {
        let Command::Run(r) = parse(&["run"]).unwrap().command else {
            panic!("not run");
        };
        assert_eq!(
            r,
            RunArgs {
                smp: 2,
                memory: 256,
                timeout: None,
                config: None,
                exit_when_done: false,
                append: vec![],
            }
        );
    }

    #[test]
    fn run_takes_all_options() {
        let Command::Run(r) = parse(&[
            "run",
            "--smp",
            "4",
            "--memory",
            "512",
            "--timeout",
            "30",
            "--config",
            "systems/x.toml",
            "--exit-when-done",
            "--append",
            "test_fault=ud",
            "--append",
            "loglevel=debug",
        ])
        .unwrap()
        .command
        else {
            panic!("not run");
        };
        assert_eq!(r.smp, 4);
        assert_eq!(r.memory, 512);
        assert_eq!(r.timeout, Some(30));
        assert_eq!(r.config, Some(PathBuf::from("systems/x.toml")));
        assert!(r.exit_when_done);
        assert_eq!(r.append, ["test_fault=ud", "loglevel=debug"]);
    }

    #[test]
    fn run_refuses_out_of_range_values() {
        for bad in [
            &["run", "--smp", "0"][..],
            &["run", "--smp", "65"],
            &["run", "--memory", "16"],
            &["run", "--timeout", "0"],
            &["run", "--smp", "two"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
        }
    }

    #[test]
    fn test_bench_and_image_parse() {
        let Command::Test(t) = parse(&["test", "boot"]).unwrap().command else {
            panic!("not test");
        };
        assert_eq!(t.filter.as_deref(), Some("boot"));
        assert_eq!(t.step_timeout, 1200);
        let Command::Bench(b) = parse(&["bench", "--json", "out.json", "boot"])
            .unwrap()
            .command
        else {
            panic!("not bench");
        };
        assert_eq!(b.json, Some(PathBuf::from("out.json")));
        assert_eq!(b.filter.as_deref(), Some("boot"));
        assert_eq!(b.boots, 7);
        let Command::Image(i) = parse(&["image", "--out", "/tmp/x"]).unwrap().command else {
            panic!("not image");
        };
        assert_eq!(i.out, Some(PathBuf::from("/tmp/x")));
        assert!(parse(&[]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn run_help_documents_exit_statuses() {
        let help = Cli::command()
            .find_subcommand_mut("run")
            .unwrap()
            .render_help()
            .to_string();
        for code in ["0 ", "1 ", "124", "130"] {
            assert!(help.contains(code), "{help}");
        }
    }
}
