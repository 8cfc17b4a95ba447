//! `domctl`: the domain-control subset (get info, list, pause, unpause, destroy, credit
//! scheduler parameters, memory limit (`max_mem`), console histories). Every command needs `DOMAIN_CONTROL`, asked of the policy module
//! before the target is looked up. A header with another interface version is `-EACCES`
//! (Xen's answer to a version mismatch).

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::hypercall_args::Wire;
use shared_abi::hypercall_args::domctl::{
    self as dc, DomainInfo, DomctlHeader, ListDomains, MaxMem, SchedulerOp,
};

use super::{Call, HcResult};
use crate::domain::{Domain, DomainState, ExitReason};
use crate::policy;

/// Most records one `LIST_DOMAINS` returns.
const MAX_LIST: u32 = 256;

fn info(d: &Domain, cpu_time: u64, running: bool, blocked: bool) -> DomainInfo {
    let mut flags = 0;
    let mut shutdown_reason = 0;
    match d.state() {
        DomainState::Paused => flags |= dc::DOMINF_PAUSED,
        DomainState::Shutdown(r) => {
            flags |= dc::DOMINF_SHUTDOWN;
            shutdown_reason = r.code();
        }
        DomainState::Dying | DomainState::Dead => flags |= dc::DOMINF_DYING,
        DomainState::Running | DomainState::Building => {}
    }
    if let Some(e) = d.exit {
        shutdown_reason = e.shutdown_reason().code();
        flags |= dc::DOMINF_SHUTDOWN;
    }
    if running {
        flags |= dc::DOMINF_RUNNING;
    }
    if blocked {
        flags |= dc::DOMINF_BLOCKED;
    }
    flags |= (shutdown_reason & 0xff) << dc::DOMINF_SHUTDOWN_SHIFT;
    let mut name = [0u8; 32];
    let n = d.name.len().min(32);
    name[..n].copy_from_slice(&d.name.as_bytes()[..n]);
    DomainInfo {
        domid: d.id,
        pad0: 0,
        state: d.state().code(),
        flags,
        shutdown_reason,
        tot_pages: d.reservation.used(),
        max_pages: d.reservation.limit(),
        cpu_time,
        nr_vcpus: d.vcpus.len() as u32,
        weight: d.weight,
        cap_percent: d.cap_percent,
        pad1: 0,
        capabilities: d.caps.bits(),
        name,
    }
}

impl Call<'_, '_> {
    fn domain_info(&self, id: DomId) -> Option<DomainInfo> {
        let d = self.hv.domains.get(id)?;
        let mut running = false;
        let mut blocked = false;
        for &v in &d.vcpus {
            if let Some(r) = self.hv.sched.runstate(v, self.now)
                && self.hv.sched.owner(v).is_some_and(|(o, _)| o == id)
            {
                running |= r.state == 0;
                blocked |= r.state == 2;
            }
        }
        Some(info(d, self.hv.sched.cpu_time(id), running, blocked))
    }

    pub(super) fn domctl(&mut self, arg: u64) -> HcResult {
        let mut buf = [0u8; dc::DOMCTL_LEN];
        self.mem()?.copy_from_guest(arg, &mut buf)?;
        let h = DomctlHeader::decode(&buf).ok_or(XenError::EFAULT)?;
        if h.interface_version != dc::INTERFACE_VERSION {
            return Err(XenError::EACCES);
        }
        let target = self.resolve(h.domain);
        match h.cmd {
            dc::LIST_DOMAINS => {
                policy::list(self.caller())?;
                let l = ListDomains::decode(&buf[16..]).ok_or(XenError::EFAULT)?;
                let max = l.max_domains.min(MAX_LIST) as usize;
                let ids: alloc::vec::Vec<DomId> = self
                    .hv
                    .domains
                    .ids()
                    .into_iter()
                    .filter(|&i| i >= l.first_domain)
                    .take(max)
                    .collect();
                let mut n = 0u64;
                for id in ids {
                    let Some(inf) = self.domain_info(id) else {
                        continue;
                    };
                    let at = n
                        .checked_mul(DomainInfo::SIZE as u64)
                        .and_then(|o| l.buffer.checked_add(o))
                        .ok_or(XenError::EFAULT)?;
                    self.write(at, &inf)?;
                    n += 1;
                }
                Ok(n as i64)
            }
            dc::GETDOMAININFO => {
                let token = policy::control(self.caller(), target)?;
                let inf = self.domain_info(token.target()).ok_or(XenError::ESRCH)?;
                inf.encode(&mut buf[16..]);
                self.mem()?.copy_to_guest(arg, &buf)?;
                Ok(0)
            }
            dc::PAUSEDOMAIN | dc::UNPAUSEDOMAIN | dc::DESTROYDOMAIN => {
                let token = policy::control(self.caller(), target)?;
                let t = token.target();
                let state = self
                    .hv
                    .domains
                    .get(t)
                    .map(|d| d.state())
                    .filter(|s| *s != DomainState::Dead)
                    .ok_or(XenError::ESRCH)?;
                if t == self.dom {
                    return Err(XenError::EINVAL);
                }
                let k = match (h.cmd, state) {
                    (dc::PAUSEDOMAIN, DomainState::Running | DomainState::Paused) => {
                        if let Some(d) = self.hv.domains.get_mut(t) {
                            d.set_state(DomainState::Paused);
                        }
                        self.hv.sched.pause_domain(t, self.now)
                    }
                    (dc::UNPAUSEDOMAIN, DomainState::Paused) => {
                        if let Some(d) = self.hv.domains.get_mut(t) {
                            d.set_state(DomainState::Running);
                        }
                        self.hv.sched.unpause_domain(t, self.now)
                    }
                    (dc::DESTROYDOMAIN, DomainState::Dying) => crate::sched::CpuSet::EMPTY,
                    (dc::DESTROYDOMAIN, _) => {
                        if let Some(d) = self.hv.domains.get_mut(t)
                            && d.exit.is_none()
                        {
                            d.exit = Some(ExitReason::Destroyed { by: self.dom });
                        }
                        self.hv.destroy_domain(self.p, t)
                    }
                    _ => return Err(XenError::EINVAL),
                };
                self.kick(k);
                Ok(0)
            }
            dc::SCHEDULER_OP => {
                let token = policy::control(self.caller(), target)?;
                let t = token.target();
                if !self.hv.domains.get(t).is_some_and(|d| d.state().is_alive()) {
                    return Err(XenError::ESRCH);
                }
                let mut op = SchedulerOp::decode(&buf[16..]).ok_or(XenError::EFAULT)?;
                if op.sched_id != dc::SCHEDULER_CREDIT {
                    return Err(XenError::EINVAL);
                }
                let (w, c) = self.hv.sched.params(t).ok_or(XenError::ESRCH)?;
                match op.cmd {
                    dc::SCHEDOP_GETINFO => {
                        op.weight = u16::try_from(w).unwrap_or(u16::MAX);
                        op.cap = u16::try_from(c).unwrap_or(u16::MAX);
                        op.encode(&mut buf[16..]);
                        self.mem()?.copy_to_guest(arg, &buf)?;
                        Ok(0)
                    }
                    dc::SCHEDOP_PUTINFO => {
                        let weight = if op.weight == 0 {
                            w
                        } else {
                            u32::from(op.weight)
                        };
                        let cap = if op.cap == dc::CAP_UNCHANGED {
                            c
                        } else {
                            u32::from(op.cap)
                        };
                        self.hv.sched.set_params(t, weight, cap)?;
                        if let Some(d) = self.hv.domains.get_mut(t) {
                            d.weight = weight;
                            d.cap_percent = cap;
                        }
                        Ok(0)
                    }
                    _ => Err(XenError::EINVAL),
                }
            }
            dc::XENSTORE_DOMAINS => self.xenstore_domains(&buf[16..]),
            dc::BOOT_DOMAIN_INFO | dc::REBUILD_BOOT_DOMAIN => {
                self.boot_domain(h.cmd, arg, &mut buf)
            }
            dc::CREATE_DOMAIN => self.create_domain(arg, &mut buf),
            dc::MGMT_IO => self.mgmt_io(arg, &mut buf),
            dc::CONSOLE_READ => self.console_read(arg, target, &mut buf),
            dc::CONSOLE_WRITE => self.console_write(arg, target, &mut buf),
            dc::DOMAIN_STATS => self.domain_stats(arg, target, &mut buf),
            dc::MAX_MEM => {
                let token = policy::control(self.caller(), target)?;
                let m = MaxMem::decode(&buf[16..]).ok_or(XenError::EFAULT)?;
                if m.max_memkb > shared_abi::manifest::MAX_MEMORY_KIB {
                    return Err(XenError::EINVAL);
                }
                let d = self
                    .hv
                    .domains
                    .get_mut(token.target())
                    .filter(|d| d.state().is_alive())
                    .ok_or(XenError::ESRCH)?;
                // As Xen: below what the domain holds, nothing is taken away; it only gets
                // no new page until it gives some back.
                d.reservation.set_limit(m.max_memkb / 4);
                Ok(0)
            }
            _ => Err(XenError::ENOSYS),
        }
    }
}
