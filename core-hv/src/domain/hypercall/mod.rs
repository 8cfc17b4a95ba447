//! The portable hypercall dispatcher.
//!
//! The arch layer's `syscall` handler saves the domain's registers and calls
//! [`Hypervisor::hypercall`] with the number (RAX) and the five arguments (RDI, RSI, RDX,
//! R10, R8); it puts [`Exit::ret`] into the saved RAX, calls `schedule` if
//! [`Exit::resched`], interrupts [`Exit::kicks`], and returns to the domain.
//!
//! Each handler decodes its arguments, copies any structure in through the one checked
//! accessor ([`GuestMemory`]), asks the policy module when the operation is privileged,
//! performs it on the domain table or the scheduler, and answers a non-negative result or
//! the negative errno Xen gives for the same refusal. Unknown numbers and sub-commands are
//! `-ENOSYS`. Nothing here panics on domain input (the dispatcher proptest checks it).

mod boot_domctl;
mod console_domctl;
mod create_domctl;
mod domctl;
mod evtchn_op;
mod gnttab_op;
mod memory_op;
mod mgmt_domctl;
mod physdev_op;
mod sched_op;
#[cfg(test)]
mod sharing_tests;
#[cfg(test)]
mod tests;
mod xs_domctl;

use shared_abi::DomId;
use shared_abi::domid::DOMID_SELF;
use shared_abi::errno::XenError;
use shared_abi::hypercall::{self as hc, console_io, vcpu_op, xen_version};
use shared_abi::hypercall_args::{VcpuSetSingleshotTimer, Wire, XenFeatureInfo};

use super::DomainState;
use super::guest_memory::GuestMemory;
use super::hypervisor::{Exit, Hypervisor, Platform};
use crate::policy::{self, Caller};
use crate::sched::{CpuId, CpuSet, VcpuId};

/// The Xen version Bulkhead reports (the ABI it follows).
pub const XEN_MAJOR: u64 = 4;
pub const XEN_MINOR: u64 = 17;
/// `XENVER_extraversion`.
pub const EXTRAVERSION: &str = ".0-bulkhead";
/// `XENVER_capabilities`: 64-bit PV domains only.
pub const CAPABILITIES: &str = "xen-3.0-x86_64";
/// `XENVER_get_features` submap 0: frame numbers are the domain's own page numbers
/// (auto-translated), never machine frames.
pub const FEATURES_SUBMAP0: u32 = 1 << shared_abi::hypercall::features::AUTO_TRANSLATED_PHYSMAP;
/// Bytes copied per chunk by `console_io` write.
const CONSOLE_CHUNK: usize = 128;

/// One hypercall in progress.
pub(crate) struct Call<'a, 'p> {
    hv: &'a mut Hypervisor,
    p: &'a mut Platform<'p>,
    cpu: CpuId,
    vcpu: VcpuId,
    dom: DomId,
    vidx: u32,
    now: u64,
    exit: Exit,
}

type HcResult = Result<i64, XenError>;

impl Call<'_, '_> {
    fn caller(&self) -> Caller {
        Caller {
            domid: self.dom,
            caps: self
                .hv
                .domains
                .get(self.dom)
                .map(|d| d.caps)
                .unwrap_or_default(),
        }
    }

    /// The caller's memory, through the checked accessor.
    fn mem(&self) -> Result<GuestMemory<'_>, XenError> {
        let d = self.hv.domains.get(self.dom).ok_or(XenError::ESRCH)?;
        let a = d.aspace.as_deref().ok_or(XenError::ESRCH)?;
        Ok(GuestMemory::new(a, self.p.phys))
    }

    fn read<T: Wire>(&self, va: u64) -> Result<T, XenError> {
        self.mem()?.read(va)
    }

    fn write<T: Wire>(&self, va: u64, v: &T) -> Result<(), XenError> {
        self.mem()?.write(va, v)
    }

    fn kick(&mut self, k: CpuSet) {
        if k.contains(self.cpu) {
            self.exit.resched = true;
        }
        self.exit.kicks = self
            .exit
            .kicks
            .union(CpuSet(k.0 & !(1u64 << self.cpu.min(63))));
    }

    /// `DOMID_SELF` means the caller.
    fn resolve(&self, domid: DomId) -> DomId {
        if domid == DOMID_SELF { self.dom } else { domid }
    }

    fn console_io(&mut self, cmd: u64, count: u64, buf: u64) -> HcResult {
        match cmd {
            console_io::WRITE => {
                let Some(d) = self.hv.domains.get_mut(self.dom) else {
                    return Err(XenError::ESRCH);
                };
                d.console.count_output(count);
                let allowed = d.console.allowance(self.now);
                let take = count.min(allowed);
                if take < count {
                    d.console.drop_bytes(count - take);
                }
                let mut done = 0u64;
                while done < take {
                    let n = (take - done).min(CONSOLE_CHUNK as u64) as usize;
                    let mut chunk = [0u8; CONSOLE_CHUNK];
                    let at = buf.checked_add(done).ok_or(XenError::EFAULT)?;
                    self.mem()?.copy_from_guest(at, &mut chunk[..n])?;
                    let Some(d) = self.hv.domains.get_mut(self.dom) else {
                        return Err(XenError::ESRCH);
                    };
                    let name = core::mem::take(&mut d.name);
                    d.console.write(&name, &chunk[..n], self.p.console);
                    d.name = name;
                    done += n as u64;
                }
                Ok(0)
            }
            console_io::READ => {
                // The caller's own console input (given by the toolstack, `domctl
                // CONSOLE_WRITE`): up to `count` bytes, the number read; never waits.
                policy::console_read(self.caller())?;
                let mut tmp = [0u8; super::console::CONSOLE_INPUT_BYTES];
                let want = usize::try_from(count).unwrap_or(usize::MAX).min(tmp.len());
                let d = self.hv.domains.get(self.dom).ok_or(XenError::ESRCH)?;
                let n = d.console.peek_input(&mut tmp[..want]);
                if n > 0 {
                    self.mem()?.copy_to_guest(buf, &tmp[..n])?;
                    if let Some(d) = self.hv.domains.get_mut(self.dom) {
                        d.console.consume_input(n);
                    }
                }
                Ok(n as i64)
            }
            _ => Err(XenError::ENOSYS),
        }
    }

    fn xen_version(&mut self, cmd: u64, arg: u64) -> HcResult {
        match cmd {
            xen_version::VERSION => Ok(((XEN_MAJOR << 16) | XEN_MINOR) as i64),
            xen_version::EXTRAVERSION => {
                let mut b = [0u8; xen_version::EXTRAVERSION_LEN];
                b[..EXTRAVERSION.len()].copy_from_slice(EXTRAVERSION.as_bytes());
                self.mem()?.copy_to_guest(arg, &b)?;
                Ok(0)
            }
            xen_version::CAPABILITIES => {
                let mut b = [0u8; xen_version::CAPABILITIES_LEN];
                b[..CAPABILITIES.len()].copy_from_slice(CAPABILITIES.as_bytes());
                self.mem()?.copy_to_guest(arg, &b)?;
                Ok(0)
            }
            xen_version::GET_FEATURES => {
                let mut fi: XenFeatureInfo = self.read(arg)?;
                fi.submap = match fi.submap_idx {
                    0 => FEATURES_SUBMAP0,
                    _ => return Err(XenError::EINVAL),
                };
                self.write(arg, &fi)?;
                Ok(0)
            }
            xen_version::PAGESIZE => Ok(shared_abi::PAGE_SIZE as i64),
            _ => Err(XenError::ENOSYS),
        }
    }

    fn vcpu_op(&mut self, cmd: u64, vcpuid: u64, arg: u64) -> HcResult {
        let d = self.hv.domains.get(self.dom).ok_or(XenError::ESRCH)?;
        let target = usize::try_from(vcpuid)
            .ok()
            .and_then(|i| d.vcpus.get(i).copied())
            .ok_or(XenError::ENOENT)?;
        match cmd {
            vcpu_op::SET_SINGLESHOT_TIMER => {
                if target != self.vcpu {
                    return Err(XenError::EINVAL);
                }
                let t: VcpuSetSingleshotTimer = self.read(arg)?;
                if t.flags & vcpu_op::SSHOTTMR_FUTURE != 0 && t.timeout_abs_ns < self.now {
                    return Err(XenError::ETIME);
                }
                self.hv.sched.set_timer(target, Some(t.timeout_abs_ns));
                Ok(0)
            }
            vcpu_op::STOP_SINGLESHOT_TIMER => {
                if target != self.vcpu {
                    return Err(XenError::EINVAL);
                }
                self.hv.sched.set_timer(target, None);
                Ok(0)
            }
            vcpu_op::GET_RUNSTATE_INFO => {
                let r = self
                    .hv
                    .sched
                    .runstate(target, self.now)
                    .ok_or(XenError::ENOENT)?;
                self.write(arg, &r)?;
                Ok(0)
            }
            vcpu_op::IS_UP => {
                let off = self
                    .hv
                    .sched
                    .runstate(target, self.now)
                    .is_none_or(|r| r.state == vcpu_op::RUNSTATE_OFFLINE);
                Ok(i64::from(!off))
            }
            _ => Err(XenError::ENOSYS),
        }
    }
}

impl Hypervisor {
    /// A hypercall from the vCPU current on `cpu`: `nr` from RAX, `args` from RDI, RSI,
    /// RDX, R10, R8.
    pub fn hypercall(&mut self, p: &mut Platform<'_>, cpu: CpuId, nr: u64, args: [u64; 5]) -> Exit {
        let now = p.clock.now_ns();
        let Some((vcpu, dom, vidx)) = self
            .sched
            .current(cpu)
            .and_then(|v| self.sched.owner(v).map(|(d, i)| (v, d, i)))
        else {
            // No domain vCPU on this CPU: nothing to answer to.
            return Exit {
                ret: XenError::ESRCH.as_ret(),
                resched: true,
                kicks: CpuSet::EMPTY,
            };
        };
        if self.domains.get(dom).map(|d| d.state()) != Some(DomainState::Running) {
            // Paused or stopped by another CPU while this vCPU was running: it stops here.
            return Exit {
                ret: XenError::EINVAL.as_ret(),
                resched: true,
                kicks: CpuSet::EMPTY,
            };
        }
        let mut c = Call {
            hv: self,
            p,
            cpu,
            vcpu,
            dom,
            vidx,
            now,
            exit: Exit::default(),
        };
        let [a0, a1, a2, _a3, _a4] = args;
        let r = match nr {
            hc::CONSOLE_IO => c.console_io(a0, a1, a2),
            hc::XEN_VERSION => c.xen_version(a0, a1),
            hc::SCHED_OP => c.sched_op(a0, a1),
            hc::VCPU_OP => c.vcpu_op(a0, a1, a2),
            hc::MEMORY_OP => c.memory_op(a0, a1),
            hc::DOMCTL => c.domctl(a0),
            hc::EVENT_CHANNEL_OP => c.event_channel_op(a0, a1),
            hc::GRANT_TABLE_OP => c.grant_table_op(a0, a1, a2),
            hc::PHYSDEV_OP => c.physdev_op(a0, a1),
            _ => Err(XenError::ENOSYS),
        };
        let mut exit = c.exit;
        exit.ret = match r {
            Ok(v) => v,
            Err(e) => e.as_ret(),
        };
        exit
    }
}
