//! hello-dom: the smallest real Bulkhead domain. It logs through `console_io`, reports what
//! its start info says, asks the hypervisor its version and time, sleeps briefly, uses the
//! heap, and exits with `shutdown(poweroff)` by returning from `main`. With `stay_ms=<n>` on
//! its command line it stays (blocked) that long before powering off: a live guest for the
//! toolstack's create benchmarks.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
dom_rt::entry!(hello);

#[cfg(target_os = "none")]
fn hello(si: &'static dom_rt::StartInfo) {
    use alloc::vec::Vec;
    use dom_rt::hypercall;

    log::info!(
        "hello from domain {} ({}), {} vCPU(s), {} of {} pages as heap",
        si.domid,
        si.name(),
        si.nr_vcpus,
        si.heap_pages,
        si.max_pages
    );
    match hypercall::xen_version() {
        Ok((major, minor)) => log::info!("hypervisor speaks Xen {major}.{minor}"),
        Err(e) => log::warn!("xen_version refused: {e}"),
    }
    let squares: Vec<u64> = (0..1000).map(|i| i * i).collect();
    log::info!(
        "heap works: sum of squares below 1000 = {}",
        squares.iter().sum::<u64>()
    );
    let stay_ms = dom_rt::cmdline_param(si.cmdline(), "stay_ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1)
        .min(24 * 3600 * 1000);
    let t0 = dom_rt::time::now_ns();
    if let Err(e) = dom_rt::time::sleep(stay_ms * 1_000_000) {
        log::warn!("sleep failed: {e}");
    }
    log::info!(
        "slept {} ns; cmdline {:?}; powering off",
        dom_rt::time::now_ns() - t0,
        si.cmdline()
    );
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("hello-dom is a Bulkhead domain: build it with --target x86_64-unknown-none");
    std::process::exit(2);
}
