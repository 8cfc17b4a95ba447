//! pv-test-dom: the PV-domain scenarios' test domain. One binary; its command line picks the
//! role (`role=<name>`, plus `key=value` parameters) and every role reports on the console
//! with `RESULT <name> pass|fail <details>` or `METRIC <name> <value> <unit>` lines:
//!
//! - `survivor`: keeps working while other domains misbehave and die, then checks its own
//!   memory is intact (`RESULT survivor pass`).
//! - `read-hv`, `write-text`, `exec-data`, `read-unmapped`: do one forbidden access; the
//!   hypervisor must stop this domain (if it comes back, it reports `fail`).
//! - `spin until=<ms>`: CPU-bound until hypervisor time `until`, then reports its runstate
//!   (running / runnable ns) for the fairness, cap and parallelism scenarios.
//! - `block ms=<n>`: sleeps `n` ms in one block and reports how much CPU it used.
//! - `hostile n=<calls> seed=<s>`: random hypercall numbers, arguments and pointers.
//! - `memlimit`: asks for pages beyond its limit and must be refused.
//! - `bench` / `yielder`: hypercall round trip and domain switch cost.
//! - `pci expect=owner|refused`: config-space access to assigned PCI functions (see `pci.rs`).
//! - `killer`, `rebuild`: the lifecycle scenarios' killer and rebuild-op checks (see
//!   `lifecycle.rs`).
//! - `echo`: prints `echo: <line>` for each line of console input until `quit`, then powers
//!   off (the `hvctl console` input scenario; see `echo.rs`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
dom_rt::entry!(main);

#[cfg(target_os = "none")]
mod echo;
#[cfg(target_os = "none")]
mod lifecycle;
#[cfg(target_os = "none")]
mod pci;

#[cfg(target_os = "none")]
mod roles {
    use dom_rt::hypercall;
    use dom_rt::{StartInfo, println};
    use shared_abi::hypercall as hc;

    /// `key=value` from the command line.
    pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
        cmdline.split_whitespace().find_map(|w| {
            let (k, v) = w.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    pub fn num(cmdline: &str, key: &str, default: u64) -> u64 {
        param(cmdline, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn rdtsc() -> u64 {
        // SAFETY: rdtsc only reads the time-stamp counter (CR4.TSD is clear).
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    fn runstate() -> (u64, u64, u64) {
        match hypercall::runstate(0) {
            Ok(r) => (r.time[0], r.time[1], r.time[2]),
            Err(_) => (0, 0, 0),
        }
    }

    static mut SCRATCH: [u64; 512] = [0; 512];
    /// Where the hostile role's "valid" pointers point: twice what they can reach, so no
    /// hypercall writing through them can spill into other statics.
    static mut HOSTILE_BUF: [u8; 8192] = [0; 8192];

    pub fn survivor(si: &StartInfo) {
        let name = si.name();
        let rounds = num(si.cmdline(), "rounds", 20);
        // Fill a private pattern, then keep sleeping and checking it while others die.
        let mut sum = 0u64;
        for i in 0..512u64 {
            // SAFETY: single-threaded domain; only this function touches SCRATCH.
            unsafe {
                (&raw mut SCRATCH as *mut u64)
                    .add(i as usize)
                    .write_volatile(i * 0x9e37_79b9)
            };
        }
        for r in 0..rounds {
            let _ = dom_rt::time::sleep(10_000_000);
            for i in 0..512u64 {
                // SAFETY: as above.
                let v = unsafe {
                    (&raw const SCRATCH as *const u64)
                        .add(i as usize)
                        .read_volatile()
                };
                if v != i * 0x9e37_79b9 {
                    println!("RESULT {name} fail scratch word {i} changed in round {r}");
                    return;
                }
                sum = sum.wrapping_add(v);
            }
        }
        println!("RESULT {name} pass {rounds} rounds of 10 ms, memory intact (sum {sum:#x})");
    }

    pub fn forbidden(si: &StartInfo, role: &str) {
        let name = si.name();
        println!("{name}: about to {role}; the hypervisor must stop this domain");
        match role {
            "read-hv" => {
                // The hypervisor's direct map (kernel-only pages).
                let p = 0xffff_8300_0010_0000u64 as *const u64;
                // SAFETY: deliberately invalid: the test is that this faults.
                let v = unsafe { core::ptr::read_volatile(p) };
                println!("RESULT {name} fail read hypervisor memory: {v:#x}");
            }
            "read-unmapped" => {
                // Where another domain's heap would be if address spaces were shared.
                let p = (255u64 << 30) as *const u64;
                // SAFETY: deliberately invalid.
                let v = unsafe { core::ptr::read_volatile(p) };
                println!("RESULT {name} fail read unmapped memory: {v:#x}");
            }
            "write-text" => {
                let p = main_addr() as *mut u8;
                // SAFETY: deliberately invalid: text is read-only.
                unsafe { core::ptr::write_volatile(p, 0xc3) };
                println!("RESULT {name} fail wrote its own text");
            }
            "exec-data" => {
                // SAFETY: SCRATCH is a data page (NX); deliberately invalid.
                unsafe {
                    let p = &raw mut SCRATCH as *mut u8;
                    core::ptr::write_volatile(p, 0xc3); // ret
                    let f: extern "C" fn() = core::mem::transmute(p);
                    f();
                }
                println!("RESULT {name} fail executed a data page");
            }
            _ => println!("RESULT {name} fail unknown forbidden role {role}"),
        }
    }

    fn main_addr() -> u64 {
        super::main as *const () as u64
    }

    pub fn spin(si: &StartInfo) {
        let name = si.name();
        let until = num(si.cmdline(), "until", 3000) * 1_000_000;
        let start = dom_rt::time::now_ns();
        let (r0, q0, b0) = runstate();
        let mut x = 1u64;
        while dom_rt::time::now_ns() < until {
            for _ in 0..1000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        let end = dom_rt::time::now_ns();
        let (r1, q1, b1) = runstate();
        println!(
            "RESULT {name} pass running_ns={} runnable_ns={} blocked_ns={} wall_ns={} x={:#x}",
            r1 - r0,
            q1 - q0,
            b1 - b0,
            end.saturating_sub(start),
            x & 0xff
        );
    }

    pub fn block(si: &StartInfo) {
        let name = si.name();
        let ms = num(si.cmdline(), "ms", 1000);
        let (r0, _, b0) = runstate();
        let t0 = dom_rt::time::now_ns();
        let r = dom_rt::time::sleep(ms * 1_000_000);
        let t1 = dom_rt::time::now_ns();
        let (r1, _, b1) = runstate();
        let ok = r.is_ok() && t1 - t0 >= ms * 1_000_000;
        println!(
            "RESULT {name} {} running_ns={} blocked_ns={} wall_ns={}",
            if ok { "pass" } else { "fail" },
            r1 - r0,
            b1 - b0,
            t1 - t0
        );
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    pub fn hostile(si: &StartInfo) {
        // Random calls may legitimately overwrite this domain's own memory (the start-info
        // copy included): keep the name on the stack.
        let mut name_buf = [0u8; 32];
        let n_len = si.name().len().min(32);
        name_buf[..n_len].copy_from_slice(&si.name().as_bytes()[..n_len]);
        let name = core::str::from_utf8(&name_buf[..n_len]).unwrap_or("hostile");
        let n = num(si.cmdline(), "n", 200_000);
        let seed = num(si.cmdline(), "seed", 0x5eed).max(1);
        println!("{name}: {n} random hypercalls, seed {seed:#x}");
        let mut rng = XorShift(seed);
        let valid = &raw mut HOSTILE_BUF as u64;
        let mut errors = 0u64;
        let mut oks = 0u64;
        for i in 0..n {
            let pick = |rng: &mut XorShift| -> u64 {
                match rng.next() % 8 {
                    0 => 0,
                    1 => rng.next() % 64,
                    2 => rng.next(),
                    3 => 0xffff_8300_0000_0000 + (rng.next() % (1 << 30)),
                    4 => 0xffff_ffff_8010_0000 + (rng.next() % (1 << 20)),
                    5 => valid + (rng.next() % 4096),
                    6 => (1u64 << 47) - (rng.next() % 64),
                    _ => rng.next() % (512u64 << 30),
                }
            };
            let mut nr = if rng.next().is_multiple_of(4) {
                rng.next() % 64
            } else {
                [
                    hc::CONSOLE_IO,
                    hc::XEN_VERSION,
                    hc::SCHED_OP,
                    hc::VCPU_OP,
                    hc::MEMORY_OP,
                    hc::DOMCTL,
                ][(rng.next() % 6) as usize]
            };
            let mut args = [
                pick(&mut rng),
                pick(&mut rng),
                pick(&mut rng),
                pick(&mut rng),
                pick(&mut rng),
            ];
            // Calls that would end or stall this domain on purpose are not what is tested:
            // sched_op other than yield, memory_op decrease_reservation (it could take the
            // heap back), domctl on valid memory (it could pause itself).
            if nr == hc::SCHED_OP {
                args[0] = shared_abi::hypercall::sched_op::YIELD;
            }
            if nr == hc::MEMORY_OP && args[0] & 0x3f == 1 {
                args[0] = 0x3f;
            }
            if nr == hc::DOMCTL {
                args[0] = 0xffff_8300_0000_0000;
            }
            if nr == hc::CONSOLE_IO && args[0] == 0 {
                // Keep writes short so the rate limiter, not the log, absorbs them.
                args[1] %= 8;
            }
            if nr == hc::VCPU_OP && args[0] == 0 {
                nr = hc::XEN_VERSION;
            }
            // SAFETY: the hypervisor must treat every argument as hostile; the only memory
            // it may write is this domain's (SCRATCH or wherever a valid pointer points).
            let r = unsafe { hypercall::raw(nr, args) };
            if r < 0 {
                errors += 1;
            } else {
                oks += 1;
            }
            if i % 50_000 == 0 {
                println!("{name}: {i} calls");
            }
        }
        // End whatever partial line random console writes left open.
        println!();
        println!(
            "RESULT {name} pass {n} random hypercalls (seed {seed:#x}): {oks} ok, {errors} refused"
        );
    }

    /// `XENMEM_increase_reservation` of 16 single pages from `gpfn` on, through dom-rt's
    /// typed wrapper: pages added, or the error.
    fn increase(gpfn: u64) -> Result<usize, shared_abi::errno::XenError> {
        let mut gpfns = [0u64; 16];
        for (i, g) in gpfns.iter_mut().enumerate() {
            *g = gpfn + i as u64;
        }
        hypercall::increase_reservation(&gpfns)
    }

    pub fn memlimit(si: &StartInfo) {
        let name = si.name();
        let self_id = shared_abi::domid::DOMID_SELF;
        let max = hypercall::reservation(self_id, true).unwrap_or(0);
        // Grow past the heap, 16 pages a call, until the hypervisor refuses.
        let mut gpfn = (si.heap_va + si.heap_pages * 4096) >> 12;
        let mut grown = 0usize;
        let mut last = Ok(0);
        for _ in 0..64 {
            last = increase(gpfn);
            match last {
                Ok(16) => {
                    grown += 16;
                    gpfn += 16;
                }
                Ok(n) => {
                    grown += n;
                    gpfn += n as u64;
                }
                Err(_) => break,
            }
        }
        let again = increase(gpfn);
        let cur = hypercall::reservation(self_id, false).unwrap_or(u64::MAX);
        let enomem = Err(shared_abi::errno::XenError::ENOMEM);
        let refused = last == enomem && again == enomem;
        println!(
            "RESULT {name} {} grew {grown} pages, then {last:?}; past the limit again: {again:?}; reservation {cur} of {max} pages",
            if refused && cur <= max && grown > 0 {
                "pass"
            } else {
                "fail"
            },
        );
    }

    pub fn bench(si: &StartInfo) {
        let name = si.name();
        let n = 2001usize;
        let mut v = alloc::vec::Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = rdtsc();
            let _ = hypercall::xen_version();
            v.push(rdtsc() - t0);
        }
        v.sort_unstable();
        println!("METRIC hypercall_null_cycles {} cycles", v[n / 2]);
        // Yield to the `yielder` domain and back: two domain switches per round.
        let mut w = alloc::vec::Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = rdtsc();
            let _ = hypercall::sched_yield();
            w.push(rdtsc() - t0);
        }
        w.sort_unstable();
        println!("METRIC domain_switch_cycles {} cycles", w[n / 2] / 2);
        println!("RESULT {name} pass benchmarks printed");
    }

    pub fn yielder(si: &StartInfo) {
        let until = num(si.cmdline(), "until", 3000) * 1_000_000;
        while dom_rt::time::now_ns() < until {
            let _ = hypercall::sched_yield();
        }
    }
}

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
fn main(si: &'static dom_rt::StartInfo) {
    let cmd = si.cmdline();
    match roles::param(cmd, "role").unwrap_or("survivor") {
        "survivor" => roles::survivor(si),
        r @ ("read-hv" | "read-unmapped" | "write-text" | "exec-data") => roles::forbidden(si, r),
        "spin" => roles::spin(si),
        "block" => roles::block(si),
        "hostile" => roles::hostile(si),
        "memlimit" => roles::memlimit(si),
        "bench" => roles::bench(si),
        "yielder" => roles::yielder(si),
        "pci" => pci::run(si),
        "killer" => lifecycle::killer(si),
        "rebuild" => lifecycle::rebuild(si),
        "echo" => echo::run(si),
        other => dom_rt::println!("RESULT {} fail unknown role {other}", si.name()),
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("pv-test-dom is a Bulkhead domain: build it with --target x86_64-unknown-none");
    std::process::exit(2);
}
