//! hvctl: the host command that will talk to ctl-dom over the management channel.
//!
//! Not built yet (toolstack issue). It says so instead of pretending.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("hvctl: the management channel to ctl-dom does not exist yet; nothing to talk to");
    std::process::exit(2);
}
