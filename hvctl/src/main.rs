//! hvctl: manage Bulkhead domains from the host (see `hvctl --help`).
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let cli = hvctl::Cli::parse();
    let status = hvctl::run(
        cli,
        &mut hvctl::connect_socket,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    std::process::exit(status);
}
