//! dom-rt: the runtime every Rust Bulkhead domain links.
//!
//! A domain is a crate with a `main(&StartInfo)` and one line, `dom_rt::entry!(main);`.
//! The runtime provides, on bare metal (`x86_64-unknown-none`):
//!
//! - the entry point `_start` (the hypervisor enters in ring 3 with `RSP` = stack top and
//!   `RDI` = the start-info page, see `shared_abi::start_info`), which checks the start
//!   info, gives the heap to the allocator (talc), installs `log` → console, runs `main`
//!   and shuts the domain down with `poweroff` when `main` returns;
//! - a panic handler: the message on the console, then `shutdown(crash)`;
//! - typed hypercalls returning `Result<_, XenError>` ([`hypercall`]), console output
//!   ([`console`], `print!`/`println!`), monotonic time and sleep ([`time`]), an event
//!   loop that blocks in the hypervisor until there is work ([`event`]), typed event-channel
//!   calls ([`evtchn`]) and grant tables from both sides with shared-ring regions
//!   ([`gnttab`]);
//! - for driver domains, assigned PCI functions, BAR mappings, MSI-X interrupts as events,
//!   DMA buffers and `virtio-drivers` support ([`device`]);
//! - split-driver frontends ([`blkfront`], [`netfront`] on the seams of [`front`]) and
//!   device hotplug for them ([`hotplug`]: devices the toolstack attaches and detaches while
//!   the domain runs).
//!
//! `domain.ld` (next to this crate's manifest) is the linker script every domain uses; a
//! domain's `build.rs` passes it for `target_os = "none"` only, so domain crates still build
//! on the host (with a stub `main`) for `cargo test`/`clippy`.
//!
//! Unsafe code is limited to the `syscall` instruction, reading the hypervisor-mapped
//! start-info, shared-info and grant-table pages, making ring regions of shared pages, and
//! handing the heap window to the allocator.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod blkfront;
pub mod console;
pub mod control;
pub mod device;
pub mod domctl;
pub mod event;
pub mod evtchn;
pub mod front;
pub mod gnttab;
pub mod hotplug;
pub mod hypercall;
pub mod netfront;
pub mod time;
pub mod xenbus;
pub mod xs_service;

pub use shared_abi;
pub use shared_abi::errno::XenError;
pub use shared_abi::start_info::StartInfo;

static START_INFO: spin::Once<StartInfo> = spin::Once::new();

/// This domain's start info (after the runtime checked it).
pub fn start_info() -> Option<&'static StartInfo> {
    START_INFO.get()
}

/// The value of `key=value` among the command line's whitespace-separated words.
pub fn cmdline_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Stop the domain: `SCHEDOP_shutdown(reason)`; spins if the hypervisor refused.
pub fn exit(reason: u32) -> ! {
    loop {
        let _ = hypercall::shutdown(reason);
        core::hint::spin_loop();
    }
}

/// Runtime start, called by `_start` with the start-info address.
///
/// # Safety
/// Only `_start` calls this, once, with `RDI` as the hypervisor set it.
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub unsafe fn rt_start(start_info_va: u64, main: fn(&'static StartInfo)) -> ! {
    use shared_abi::hypercall::sched_op;
    use shared_abi::start_info::{HEAP_BASE, HEAP_END, START_INFO_SIZE, START_INFO_VA};
    if start_info_va != START_INFO_VA {
        println!("dom-rt: start info at {start_info_va:#x}, expected {START_INFO_VA:#x}");
        exit(sched_op::SHUTDOWN_CRASH);
    }
    // SAFETY: the entry contract maps the start-info page read-only at START_INFO_VA for the
    // domain's life; it is at least START_INFO_SIZE bytes.
    let raw = unsafe { core::slice::from_raw_parts(START_INFO_VA as *const u8, START_INFO_SIZE) };
    let si = match StartInfo::decode(raw) {
        Ok(si) => START_INFO.call_once(|| si),
        Err(e) => {
            println!("dom-rt: {e}");
            exit(sched_op::SHUTDOWN_CRASH);
        }
    };
    let heap_len = si.heap_pages.saturating_mul(4096);
    if si.heap_va != HEAP_BASE || heap_len > HEAP_END - HEAP_BASE {
        println!(
            "dom-rt: heap {:#x}+{heap_len:#x} outside the heap window",
            si.heap_va
        );
        exit(sched_op::SHUTDOWN_CRASH);
    }
    // SAFETY: the hypervisor mapped heap_pages RW pages at HEAP_BASE, used by nothing else.
    unsafe { heap::init(HEAP_BASE as *mut u8, heap_len as usize) };
    console::init_log(console::level_from_cmdline(si.cmdline()));
    main(si);
    exit(sched_op::SHUTDOWN_POWEROFF)
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod heap {
    use talc::TalcLock;
    use talc::source::Manual;

    #[global_allocator]
    static ALLOC: TalcLock<spinning_top::RawSpinlock, Manual> = TalcLock::new(Manual);

    /// # Safety
    /// `base..base+len` is mapped, writable and unused.
    pub unsafe fn init(base: *mut u8, len: usize) {
        if len > 0 {
            // SAFETY: forwarded from the caller.
            unsafe {
                ALLOC.lock().claim(base, len);
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("panic: {info}");
    exit(shared_abi::hypercall::sched_op::SHUTDOWN_CRASH)
}

/// Declare the domain's `main` (`fn(&'static StartInfo)`) and emit the entry point.
/// On the host this expands to nothing (the crate provides a stub `main` there).
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[cfg(all(target_arch = "x86_64", target_os = "none"))]
        #[unsafe(no_mangle)]
        extern "C" fn __dom_rt_enter(start_info_va: u64) -> ! {
            let f: fn(&'static $crate::StartInfo) = $main;
            // SAFETY: only `_start` below calls this, once, with the hypervisor's RDI.
            unsafe { $crate::rt_start(start_info_va, f) }
        }

        #[cfg(all(target_arch = "x86_64", target_os = "none"))]
        ::core::arch::global_asm!(
            ".section .text.entry,\"ax\"",
            ".global _start",
            "_start:",
            "xor ebp, ebp",
            // RSP is the 16-byte aligned stack top; `call` leaves it as the ABI expects.
            "and rsp, -16",
            "call {enter}",
            "ud2",
            enter = sym __dom_rt_enter,
        );
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn start_info_is_empty_until_the_runtime_sets_it() {
        assert!(super::start_info().is_none());
    }
}
