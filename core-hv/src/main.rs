//! The bare-metal hypervisor binary (built for x86_64-unknown-none by `cargo hv image`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("core-hv runs on bare metal: use `cargo hv run`");
    std::process::exit(2);
}
