//! Monotonic time from `shared_info`'s per-vCPU time info (Xen's pvclock: system time at
//! the last update plus the scaled TSC delta), and sleeping by blocking on a one-shot timer.

use shared_abi::errno::XenError;
use shared_abi::shared_info::VcpuTimeInfo;

use crate::hypercall;

/// Read a seqlock-protected value: retry while the version is odd (an update is under way)
/// or changed during the read.
pub fn seqlock_read<T>(mut version: impl FnMut() -> u32, mut body: impl FnMut() -> T) -> T {
    loop {
        let v1 = version();
        if v1 & 1 != 0 {
            core::hint::spin_loop();
            continue;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        let b = body();
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        if version() == v1 {
            return b;
        }
    }
}

/// Hypervisor system time in ns from a time-info snapshot and a TSC reading.
pub fn now_from(info: &VcpuTimeInfo, tsc: u64) -> u64 {
    info.system_time_at(tsc)
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod imp {
    use super::*;
    use shared_abi::start_info::SHARED_INFO_VA;

    const TIME: u64 = SHARED_INFO_VA + 32; // vcpu_info[0].time

    fn rd<T: Copy>(off: u64) -> T {
        // SAFETY: the hypervisor maps shared_info at SHARED_INFO_VA for the domain's whole
        // life (entry contract); the field is naturally aligned; volatile because the
        // hypervisor updates it concurrently.
        unsafe { core::ptr::read_volatile((TIME + off) as *const T) }
    }

    pub fn time_info() -> VcpuTimeInfo {
        seqlock_read(
            || rd::<u32>(0),
            || VcpuTimeInfo {
                version: 0,
                pad0: 0,
                tsc_timestamp: rd(8),
                system_time: rd(16),
                tsc_to_system_mul: rd(24),
                tsc_shift: rd(28),
                flags: rd(29),
                pad1: [0; 2],
            },
        )
    }

    pub fn rdtsc() -> u64 {
        // SAFETY: RDTSC has no side effects (CR4.TSD is clear for domains).
        unsafe { core::arch::x86_64::_rdtsc() }
    }
}

/// Monotonic system time in ns (the clock `VCPUOP_set_singleshot_timer` uses).
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub fn now_ns() -> u64 {
    let info = imp::time_info();
    now_from(&info, imp::rdtsc())
}

/// Host stand-in: there is no hypervisor clock; time stands still.
#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
pub fn now_ns() -> u64 {
    0
}

/// Sleep until system time `deadline_ns`, blocking in the hypervisor.
pub fn sleep_until(deadline_ns: u64) -> Result<(), XenError> {
    while now_ns() < deadline_ns {
        hypercall::set_timer(0, deadline_ns)?;
        hypercall::sched_block()?;
    }
    Ok(())
}

/// Sleep for `ns` nanoseconds.
pub fn sleep(ns: u64) -> Result<(), XenError> {
    sleep_until(now_ns().saturating_add(ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    #[test]
    fn seqlock_retries_odd_and_changed_versions() {
        let versions = [1u32, 2, 4, 4, 4];
        let i = Cell::new(0);
        let reads = Cell::new(0);
        let got = seqlock_read(
            || {
                let v = versions[i.get()];
                i.set(i.get() + 1);
                v
            },
            || {
                reads.set(reads.get() + 1);
                reads.get()
            },
        );
        // 1 (odd, skipped), 2 then 4 (changed: retry), 4 then 4: second body read wins.
        assert_eq!(got, 2);
    }

    #[test]
    fn time_advances_with_the_tsc() {
        let (mul, shift) = VcpuTimeInfo::scale_for_tsc_hz(2_000_000_000);
        let info = VcpuTimeInfo {
            tsc_timestamp: 1000,
            system_time: 5_000,
            tsc_to_system_mul: mul,
            tsc_shift: shift,
            ..Default::default()
        };
        let t = now_from(&info, 1000 + 2_000_000_000);
        assert!(t.abs_diff(5_000 + 1_000_000_000) < 10);
    }
}
