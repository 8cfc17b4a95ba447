//! `cargo hv`: the developer front door (see `cargo hv --help`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use bulkhead_build::{cli::Cli, commands};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(commands::dispatch(cli))
}
