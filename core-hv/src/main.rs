//! The bare-metal hypervisor binary (built for x86_64-unknown-none by `cargo hv image`).
//!
//! Everything lives in the library (`core_hv::arch::x86_64` for the hardware side); this file
//! only makes sure the linker pulls in the PVH entry point.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod entry {
    unsafe extern "C" {
        /// The PVH entry stub (`core_hv::arch::x86_64::boot`).
        fn pvh_start32();
    }

    /// Forces the archive member holding the entry stub (and with it the PVH note) into the
    /// link: the linker script names the entry, but nothing else refers to it.
    #[used]
    static ENTRY: unsafe extern "C" fn() = pvh_start32;

    // The library crate must be linked for its #[panic_handler] and #[global_allocator].
    use core_hv as _;
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("core-hv runs on bare metal: use `cargo hv run`");
    std::process::exit(2);
}
