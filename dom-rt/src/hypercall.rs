//! Typed hypercalls. The instruction is `syscall` (Xen's x86-64 PV convention): number in
//! RAX, arguments in RDI, RSI, RDX, R10, R8, result or negative errno in RAX. The CPU
//! clobbers RCX and R11; the hypervisor may clobber the argument registers.
//!
//! Every wrapper returns `Result<_, XenError>`. On the host (tests, `cargo check`) there is
//! no hypervisor: calls go to a replaceable mock that answers `-ENOSYS` by default.

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::hypercall::memory_op;
use shared_abi::hypercall::{self as hc, console_io, sched_op, vcpu_op, xen_version};
use shared_abi::hypercall_args::{
    SchedPoll, SchedRemoteShutdown, SchedShutdown, VcpuRunstateInfo, VcpuSetSingleshotTimer, Wire,
    XenFeatureInfo, XenMemoryReservation,
};

/// Issue hypercall `nr`.
///
/// # Safety
/// Pointer arguments must point to memory valid for what the hypercall reads or writes.
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub unsafe fn raw(nr: u64, args: [u64; 5]) -> i64 {
    let ret: i64;
    // SAFETY: `syscall` enters the hypervisor, which validates every argument and touches
    // only memory the arguments name (the caller vouches for it); RCX/R11 and the argument
    // registers are declared clobbered.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            inlateout("rdi") args[0] => _,
            inlateout("rsi") args[1] => _,
            inlateout("rdx") args[2] => _,
            inlateout("r10") args[3] => _,
            inlateout("r8") args[4] => _,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Host stand-in for the hypervisor (tests install a mock).
#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
pub static MOCK: spin::Mutex<Option<MockHypervisor>> = spin::Mutex::new(None);

/// Host tests that install a [`MOCK`] hold this, so they do not replace each other's.
#[cfg(test)]
pub(crate) static TEST_LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// A host stand-in for the hypervisor: `(number, arguments) -> RAX`.
#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
pub type MockHypervisor = fn(u64, [u64; 5]) -> i64;

/// Issue hypercall `nr` (host: ask [`MOCK`]).
///
/// # Safety
/// As on the target: pointer arguments must be valid.
#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
pub unsafe fn raw(nr: u64, args: [u64; 5]) -> i64 {
    match *MOCK.lock() {
        Some(f) => f(nr, args),
        None => XenError::ENOSYS.as_ret(),
    }
}

pub(crate) fn call(nr: u64, args: [u64; 5]) -> Result<u64, XenError> {
    // SAFETY: every wrapper below passes pointers to live locals or slices of the right size.
    XenError::from_ret(unsafe { raw(nr, args) })
}

fn ptr<T>(v: &T) -> u64 {
    v as *const T as u64
}

/// `CONSOLEIO_write`.
pub fn console_write(bytes: &[u8]) -> Result<(), XenError> {
    call(
        hc::CONSOLE_IO,
        [
            console_io::WRITE,
            bytes.len() as u64,
            bytes.as_ptr() as u64,
            0,
            0,
        ],
    )
    .map(|_| ())
}

/// `XENVER_version`: (major, minor).
pub fn xen_version() -> Result<(u16, u16), XenError> {
    let v = call(hc::XEN_VERSION, [xen_version::VERSION, 0, 0, 0, 0])?;
    Ok(((v >> 16) as u16, v as u16))
}

/// `XENVER_extraversion`.
pub fn xen_extraversion() -> Result<[u8; xen_version::EXTRAVERSION_LEN], XenError> {
    let mut b = [0u8; xen_version::EXTRAVERSION_LEN];
    call(
        hc::XEN_VERSION,
        [xen_version::EXTRAVERSION, b.as_mut_ptr() as u64, 0, 0, 0],
    )?;
    Ok(b)
}

/// `XENVER_get_features` for submap `idx`.
pub fn xen_features(idx: u32) -> Result<u32, XenError> {
    let mut b = [0u8; 8];
    XenFeatureInfo {
        submap_idx: idx,
        submap: 0,
    }
    .encode(&mut b);
    call(
        hc::XEN_VERSION,
        [xen_version::GET_FEATURES, b.as_mut_ptr() as u64, 0, 0, 0],
    )?;
    XenFeatureInfo::decode(&b)
        .map(|f| f.submap)
        .ok_or(XenError::EFAULT)
}

/// `SCHEDOP_yield`.
pub fn sched_yield() -> Result<(), XenError> {
    call(hc::SCHED_OP, [sched_op::YIELD, 0, 0, 0, 0]).map(|_| ())
}

/// `SCHEDOP_block`: enable event delivery and wait for an event or a timer.
pub fn sched_block() -> Result<(), XenError> {
    call(hc::SCHED_OP, [sched_op::BLOCK, 0, 0, 0, 0]).map(|_| ())
}

/// `SCHEDOP_poll`: wait until one of `ports` is pending or system time `timeout_ns`
/// (0 = none).
pub fn sched_poll(ports: &[u32], timeout_ns: u64) -> Result<(), XenError> {
    let mut b = [0u8; 24];
    SchedPoll {
        ports: ports.as_ptr() as u64,
        nr_ports: u32::try_from(ports.len()).map_err(|_| XenError::EINVAL)?,
        pad: 0,
        timeout: timeout_ns,
    }
    .encode(&mut b);
    call(hc::SCHED_OP, [sched_op::POLL, b.as_ptr() as u64, 0, 0, 0]).map(|_| ())
}

/// `SCHEDOP_shutdown`. Returns only if the hypervisor refused.
pub fn shutdown(reason: u32) -> XenError {
    let mut b = [0u8; 4];
    SchedShutdown { reason }.encode(&mut b);
    match call(
        hc::SCHED_OP,
        [sched_op::SHUTDOWN, b.as_ptr() as u64, 0, 0, 0],
    ) {
        Ok(_) => XenError::EINVAL,
        Err(e) => e,
    }
}

/// `SCHEDOP_remote_shutdown` (needs the `remote_shutdown` capability).
pub fn remote_shutdown(domid: DomId, reason: u32) -> Result<(), XenError> {
    let mut b = [0u8; 8];
    SchedRemoteShutdown {
        domain_id: domid,
        pad: 0,
        reason,
    }
    .encode(&mut b);
    call(
        hc::SCHED_OP,
        [sched_op::REMOTE_SHUTDOWN, b.as_ptr() as u64, 0, 0, 0],
    )
    .map(|_| ())
}

/// `VCPUOP_set_singleshot_timer` on vCPU `vcpu` (must be the caller) at system time
/// `deadline_ns`.
pub fn set_timer(vcpu: u32, deadline_ns: u64) -> Result<(), XenError> {
    let mut b = [0u8; 16];
    VcpuSetSingleshotTimer {
        timeout_abs_ns: deadline_ns,
        flags: 0,
        pad: 0,
    }
    .encode(&mut b);
    call(
        hc::VCPU_OP,
        [
            vcpu_op::SET_SINGLESHOT_TIMER,
            u64::from(vcpu),
            b.as_ptr() as u64,
            0,
            0,
        ],
    )
    .map(|_| ())
}

/// `VCPUOP_stop_singleshot_timer`.
pub fn stop_timer(vcpu: u32) -> Result<(), XenError> {
    call(
        hc::VCPU_OP,
        [vcpu_op::STOP_SINGLESHOT_TIMER, u64::from(vcpu), 0, 0, 0],
    )
    .map(|_| ())
}

/// `VCPUOP_get_runstate_info`.
pub fn runstate(vcpu: u32) -> Result<VcpuRunstateInfo, XenError> {
    let mut b = [0u8; 48];
    call(
        hc::VCPU_OP,
        [
            vcpu_op::GET_RUNSTATE_INFO,
            u64::from(vcpu),
            b.as_mut_ptr() as u64,
            0,
            0,
        ],
    )?;
    VcpuRunstateInfo::decode(&b).ok_or(XenError::EFAULT)
}

/// `XENMEM_current_reservation` / `XENMEM_maximum_reservation` of `domid` (pages).
pub fn reservation(domid: DomId, maximum: bool) -> Result<u64, XenError> {
    let cmd = if maximum {
        shared_abi::hypercall::memory_op::MAXIMUM_RESERVATION
    } else {
        shared_abi::hypercall::memory_op::CURRENT_RESERVATION
    };
    call(hc::MEMORY_OP, [cmd, ptr(&domid), 0, 0, 0])
}

/// Issue `XENMEM_increase_reservation` / `decrease_reservation` for single pages at `gpfns`
/// (page numbers of this domain's own address space). Xen's ABI answers with the number of
/// extents done, which may be short.
fn change_reservation(cmd: u64, gpfns: &[u64]) -> Result<usize, XenError> {
    let mut b = [0u8; 32];
    XenMemoryReservation {
        extent_start: gpfns.as_ptr() as u64,
        nr_extents: gpfns.len() as u64,
        extent_order: 0,
        mem_flags: 0,
        domid: shared_abi::domid::DOMID_SELF,
        pad: [0; 3],
    }
    .encode(&mut b);
    call(hc::MEMORY_OP, [cmd, b.as_ptr() as u64, 0, 0, 0]).map(|done| done as usize)
}

/// Grow this domain by one zeroed page at each of `gpfns` (inside the heap window). Returns
/// how many pages were added, in order: a short count means the rest did not fit. When not
/// even the first page fits (the domain is at its memory limit) the answer is
/// `Err(ENOMEM)`, so callers cannot mistake "nothing added" for success.
pub fn increase_reservation(gpfns: &[u64]) -> Result<usize, XenError> {
    match change_reservation(memory_op::INCREASE_RESERVATION, gpfns)? {
        0 if !gpfns.is_empty() => Err(XenError::ENOMEM),
        done => Ok(done),
    }
}

/// Give back the pages at `gpfns`; returns how many were released.
pub fn decrease_reservation(gpfns: &[u64]) -> Result<usize, XenError> {
    change_reservation(memory_op::DECREASE_RESERVATION, gpfns)
}

/// A PCI function address as the start info lists it (`shared_abi::start_info::PciAddress`).
fn config_op(
    dev: shared_abi::start_info::PciAddress,
    offset: u16,
    size: u8,
    value: u32,
) -> [u8; 12] {
    let mut b = [0u8; 12];
    shared_abi::pci::PciConfigOp {
        segment: dev.segment,
        bus: dev.bus,
        devfn: dev.devfn,
        offset,
        size,
        pad: 0,
        value,
    }
    .encode(&mut b);
    b
}

/// Read `size` (1, 2, 4) bytes of an assigned function's configuration space
/// (`physdev_op` `PCI_CONFIG_READ`, needs the `device_owner` capability).
pub fn pci_config_read(
    dev: shared_abi::start_info::PciAddress,
    offset: u16,
    size: u8,
) -> Result<u32, XenError> {
    let mut b = config_op(dev, offset, size, 0);
    call(
        hc::PHYSDEV_OP,
        [
            shared_abi::pci::physdev::PCI_CONFIG_READ,
            b.as_mut_ptr() as u64,
            0,
            0,
            0,
        ],
    )?;
    shared_abi::pci::PciConfigOp::decode(&b)
        .map(|op| op.value)
        .ok_or(XenError::EFAULT)
}

/// Write `size` bytes of an assigned function's configuration space (`PCI_CONFIG_WRITE`).
pub fn pci_config_write(
    dev: shared_abi::start_info::PciAddress,
    offset: u16,
    size: u8,
    value: u32,
) -> Result<(), XenError> {
    let b = config_op(dev, offset, size, value);
    call(
        hc::PHYSDEV_OP,
        [
            shared_abi::pci::physdev::PCI_CONFIG_WRITE,
            b.as_ptr() as u64,
            0,
            0,
            0,
        ],
    )
    .map(|_| ())
}

fn physdev(cmd: u64, arg: &mut [u8]) -> Result<u64, XenError> {
    call(hc::PHYSDEV_OP, [cmd, arg.as_mut_ptr() as u64, 0, 0, 0])
}

/// Map host-physical `[phys, phys + len)` of one of this domain's BARs uncached into its
/// device window (`physdev_op` `MAP_BAR`): the domain address of `phys`. Mapping a range again
/// answers the same address.
pub fn map_bar(phys: u64, len: u64) -> Result<u64, XenError> {
    use shared_abi::pci::BarMapOp;
    let mut b = BarMapOp { phys, len, va: 0 }.to_bytes();
    physdev(shared_abi::pci::physdev::MAP_BAR, &mut b)?;
    BarMapOp::from_bytes(&b)
        .map(|op| op.va)
        .ok_or(XenError::EFAULT)
}

/// Statistics of one of this domain's pirqs (`physdev_op` `IRQ_STATS`).
pub fn irq_stats(pirq: u32) -> Result<shared_abi::pci::IrqStatsOp, XenError> {
    use shared_abi::pci::IrqStatsOp;
    let mut b = IrqStatsOp {
        pirq,
        ..Default::default()
    }
    .to_bytes();
    physdev(shared_abi::pci::physdev::IRQ_STATS, &mut b)?;
    IrqStatsOp::from_bytes(&b).ok_or(XenError::EFAULT)
}

/// `PHYSDEVOP_map_pirq` for MSI-X table entry `entry` of function `dev` (this domain's own):
/// the pirq to bind with `EVTCHNOP_bind_pirq`.
pub fn map_pirq(dev: shared_abi::start_info::PciAddress, entry: u16) -> Result<u32, XenError> {
    use shared_abi::pci::{PhysdevMapPirq, physdev};
    let mut b = PhysdevMapPirq {
        domid: shared_abi::domid::DOMID_SELF,
        pad: 0,
        map_type: physdev::MAP_PIRQ_TYPE_MSI_SEG,
        index: -1,
        pirq: -1,
        bus: (i32::from(dev.segment) << 16) | i32::from(dev.bus),
        devfn: i32::from(dev.devfn),
        entry_nr: i32::from(entry),
        table_base: 0,
    }
    .to_bytes();
    physdev(physdev::MAP_PIRQ, &mut b)?;
    let out = PhysdevMapPirq::from_bytes(&b).ok_or(XenError::EFAULT)?;
    u32::try_from(out.pirq).map_err(|_| XenError::EINVAL)
}

/// `PHYSDEVOP_unmap_pirq`: mask the entry, close a bound port, free the vector.
pub fn unmap_pirq(pirq: u32) -> Result<(), XenError> {
    use shared_abi::pci::PhysdevUnmapPirq;
    let mut b = PhysdevUnmapPirq {
        domid: shared_abi::domid::DOMID_SELF,
        pad: 0,
        pirq: i32::try_from(pirq).map_err(|_| XenError::EINVAL)?,
    }
    .to_bytes();
    physdev(shared_abi::pci::physdev::UNMAP_PIRQ, &mut b).map(|_| ())
}

/// `PHYSDEVOP_eoi`: unmask an entry the storm limiter masked, once it may be.
pub fn eoi(pirq: u32) -> Result<(), XenError> {
    let mut b = shared_abi::pci::PhysdevEoi { irq: pirq }.to_bytes();
    physdev(shared_abi::pci::physdev::EOI, &mut b).map(|_| ())
}

/// `EVTCHNOP_bind_pirq`: an event-channel port that fires when `pirq` does.
pub fn bind_pirq(pirq: u32) -> Result<u32, XenError> {
    use shared_abi::event_channel::{EvtchnBindPirq, op};
    let mut b = EvtchnBindPirq {
        pirq,
        flags: 0,
        port: 0,
    }
    .to_bytes();
    call(
        hc::EVENT_CHANNEL_OP,
        [u64::from(op::BIND_PIRQ), b.as_mut_ptr() as u64, 0, 0, 0],
    )?;
    EvtchnBindPirq::from_bytes(&b)
        .map(|a| a.port)
        .ok_or(XenError::EFAULT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reservation_mock(nr: u64, a: [u64; 5]) -> i64 {
        // Grants at most 2 pages per call, as a hypervisor near its limit would.
        if nr == hc::MEMORY_OP && a[0] == memory_op::INCREASE_RESERVATION {
            // SAFETY: the wrapper under test passes a pointer to its live 32-byte request.
            let b = unsafe { core::slice::from_raw_parts(a[1] as *const u8, 32) };
            let n = u64::from_le_bytes(b[8..16].try_into().unwrap_or([0; 8]));
            n.min(2) as i64
        } else {
            XenError::ENOSYS.as_ret()
        }
    }

    fn full_mock(nr: u64, a: [u64; 5]) -> i64 {
        if nr == hc::MEMORY_OP && a[0] == memory_op::INCREASE_RESERVATION {
            0
        } else {
            XenError::ENOSYS.as_ret()
        }
    }

    #[test]
    fn increase_reservation_short_count_is_ok_and_nothing_added_is_enomem() {
        let _g = TEST_LOCK.lock();
        *MOCK.lock() = Some(reservation_mock);
        assert_eq!(increase_reservation(&[10, 11, 12]), Ok(2));
        assert_eq!(increase_reservation(&[]), Ok(0));
        *MOCK.lock() = Some(full_mock);
        assert_eq!(increase_reservation(&[10]), Err(XenError::ENOMEM));
        *MOCK.lock() = None;
    }

    fn echo(nr: u64, a: [u64; 5]) -> i64 {
        if nr == hc::XEN_VERSION && a[0] == xen_version::VERSION {
            (4 << 16) | 17
        } else if nr == hc::SCHED_OP {
            XenError::EPERM.as_ret()
        } else {
            0
        }
    }

    #[test]
    fn wrappers_decode_results_and_errors() {
        let _g = TEST_LOCK.lock();
        *MOCK.lock() = Some(echo);
        assert_eq!(xen_version(), Ok((4, 17)));
        assert_eq!(sched_yield(), Err(XenError::EPERM));
        assert_eq!(shutdown(0), XenError::EPERM);
        assert_eq!(console_write(b"x"), Ok(()));
        *MOCK.lock() = None;
        assert_eq!(xen_version(), Err(XenError::ENOSYS));
    }
}
