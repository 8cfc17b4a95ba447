//! `shared_info` page and `vcpu_info` (`xen.h`, `arch-x86/xen.h`), x86-64 layout.
//!
//! These live in a page shared between the hypervisor and a domain; code touching a live page
//! must use atomic or volatile accesses. The structs here fix the layout.

use crate::assert_layout;

/// Number of vCPU slots in `shared_info` (`XEN_LEGACY_MAX_VCPUS`).
pub const LEGACY_MAX_VCPUS: usize = 32;
/// Ports in the 2-level event channel ABI on 64-bit (64 words of 64 bits).
pub const EVTCHN_2L_NR_CHANNELS: usize = 4096;

/// Per-vCPU time information (`vcpu_time_info`), read like a seqlock via `version`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuTimeInfo {
    pub version: u32,
    pub pad0: u32,
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub flags: u8,
    pub pad1: [u8; 2],
}
assert_layout!(VcpuTimeInfo, 32; version @ 0, tsc_timestamp @ 8, system_time @ 16,
    tsc_to_system_mul @ 24, tsc_shift @ 28, flags @ 29);

/// `XEN_PVCLOCK_TSC_STABLE_BIT`.
pub const PVCLOCK_TSC_STABLE: u8 = 1;

impl VcpuTimeInfo {
    /// System time in ns at `tsc`, by Xen's formula: scale (tsc - tsc_timestamp) by
    /// `tsc_shift` then multiply by `tsc_to_system_mul` as a 32.32 fixed-point fraction.
    pub fn system_time_at(&self, tsc: u64) -> u64 {
        let mut delta = tsc.wrapping_sub(self.tsc_timestamp);
        if self.tsc_shift >= 0 {
            delta <<= self.tsc_shift as u32;
        } else {
            delta >>= (-(self.tsc_shift as i32)) as u32;
        }
        let scaled = ((delta as u128 * self.tsc_to_system_mul as u128) >> 32) as u64;
        self.system_time.wrapping_add(scaled)
    }

    /// Choose `tsc_to_system_mul`/`tsc_shift` for a TSC frequency, as Xen does: shift so the
    /// multiplier lands in [2^31, 2^32).
    pub fn scale_for_tsc_hz(tsc_hz: u64) -> (u32, i8) {
        let ns_per_s: u64 = 1_000_000_000;
        let mut shift: i8 = 0;
        let mut tps = tsc_hz.max(1);
        // Bring scaled ticks-per-second within (ns_per_s, 2 * ns_per_s], so that the
        // multiplier (ns per scaled tick, as a 0.32 fraction) fits in 32 bits.
        while tps > 2 * ns_per_s {
            tps >>= 1;
            shift -= 1;
        }
        while tps <= ns_per_s {
            tps <<= 1;
            shift += 1;
        }
        let mul = ((ns_per_s as u128) << 32) / tps as u128;
        (mul.min(u32::MAX as u128) as u32, shift)
    }
}

/// x86 arch part of `vcpu_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ArchVcpuInfo {
    pub cr2: u64,
    pub pad: u64,
}

/// `vcpu_info`: the per-vCPU event upcall state and time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuInfo {
    pub evtchn_upcall_pending: u8,
    pub evtchn_upcall_mask: u8,
    pub pad0: [u8; 6],
    pub evtchn_pending_sel: u64,
    pub arch: ArchVcpuInfo,
    pub time: VcpuTimeInfo,
}
assert_layout!(VcpuInfo, 64; evtchn_upcall_pending @ 0, evtchn_upcall_mask @ 1,
    evtchn_pending_sel @ 8, arch @ 16, time @ 32);

/// x86 arch part of `shared_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ArchSharedInfo {
    pub max_pfn: u64,
    pub pfn_to_mfn_frame_list_list: u64,
    pub nmi_reason: u64,
    pub p2m_cr3: u64,
    pub p2m_vaddr: u64,
    pub p2m_generation: u64,
}

/// `shared_info` (3136 bytes used of its page).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SharedInfo {
    pub vcpu_info: [VcpuInfo; LEGACY_MAX_VCPUS],
    pub evtchn_pending: [u64; 64],
    pub evtchn_mask: [u64; 64],
    pub wc_version: u32,
    pub wc_sec: u32,
    pub wc_nsec: u32,
    pub wc_sec_hi: u32,
    pub arch: ArchSharedInfo,
}
assert_layout!(SharedInfo, 3136; vcpu_info @ 0, evtchn_pending @ 0x800, evtchn_mask @ 0xA00,
    wc_version @ 0xC00, wc_sec @ 0xC04, wc_nsec @ 0xC08, wc_sec_hi @ 0xC0C, arch @ 0xC10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_scale_converts_ticks_to_ns() {
        for hz in [1_000_000u64, 2_596_098_000, 3_000_000_000, 100_000_000_000] {
            let (mul, shift) = VcpuTimeInfo::scale_for_tsc_hz(hz);
            let t = VcpuTimeInfo {
                tsc_to_system_mul: mul,
                tsc_shift: shift,
                ..Default::default()
            };
            let one_second = t.system_time_at(hz);
            let err = one_second.abs_diff(1_000_000_000);
            assert!(err < 1_000, "hz={hz}: 1 s of ticks gave {one_second} ns");
        }
    }
}
