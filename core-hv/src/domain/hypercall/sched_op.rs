//! `sched_op`: yield, block, poll, shutdown, remote_shutdown.

use shared_abi::errno::XenError;
use shared_abi::hypercall::sched_op;
use shared_abi::hypercall_args::{
    SCHED_POLL_MAX_PORTS, SchedPoll, SchedRemoteShutdown, SchedShutdown,
};
use shared_abi::shared_info::{EVTCHN_2L_NR_CHANNELS, LEGACY_MAX_VCPUS};

use super::{Call, HcResult};
use crate::domain::{ExitReason, ShutdownReason};
use crate::policy;

/// `shared_info.evtchn_pending` offset.
const EVTCHN_PENDING: usize = 0x800;

impl Call<'_, '_> {
    pub(super) fn sched_op(&mut self, cmd: u64, arg: u64) -> HcResult {
        match cmd {
            sched_op::YIELD => {
                let k = self.hv.sched.yield_now(self.vcpu);
                self.kick(k);
                Ok(0)
            }
            sched_op::BLOCK => self.block(),
            sched_op::SHUTDOWN => {
                let s: SchedShutdown = self.read(arg)?;
                let reason = ShutdownReason::from_code(s.reason).ok_or(XenError::EINVAL)?;
                let k = self
                    .hv
                    .shutdown_domain(self.p, self.dom, ExitReason::Shutdown(reason));
                self.kick(k);
                self.exit.resched = true;
                Ok(0)
            }
            sched_op::POLL => self.poll(arg),
            sched_op::REMOTE_SHUTDOWN => {
                let r: SchedRemoteShutdown = self.read(arg)?;
                let target = self.resolve(r.domain_id);
                let token = policy::remote_shutdown(self.caller(), target)?;
                if !self
                    .hv
                    .domains
                    .get(token.target())
                    .is_some_and(|d| d.state().is_alive())
                {
                    return Err(XenError::ESRCH);
                }
                let reason = ShutdownReason::from_code(r.reason).ok_or(XenError::EINVAL)?;
                let k = self.hv.shutdown_domain(
                    self.p,
                    token.target(),
                    ExitReason::RemoteShutdown {
                        by: self.dom,
                        reason,
                    },
                );
                self.kick(k);
                Ok(0)
            }
            _ => Err(XenError::ENOSYS),
        }
    }

    fn shared_info(&self) -> Result<crate::domain::memory::Mfn, XenError> {
        self.hv
            .domains
            .get(self.dom)
            .map(|d| d.shared_info)
            .ok_or(XenError::ESRCH)
    }

    /// Unmask event delivery and block unless an event is already pending (Xen's
    /// `vcpu_block_enable_events`).
    fn block(&mut self) -> HcResult {
        let si = self.shared_info()?;
        if (self.vidx as usize) < LEGACY_MAX_VCPUS {
            let at = self.vidx as usize * 64;
            self.p.phys.write(si, at + 1, &[0]);
            let mut pending = [0u8; 1];
            self.p.phys.read(si, at, &mut pending);
            if pending[0] != 0 {
                return Ok(0);
            }
        }
        let k = self.hv.sched.block(self.vcpu, self.now);
        self.kick(k);
        self.exit.resched = true;
        Ok(0)
    }

    fn port_pending(&self, port: u32) -> Result<bool, XenError> {
        let si = self.shared_info()?;
        let mut w = [0u8; 8];
        self.p
            .phys
            .read(si, EVTCHN_PENDING + (port as usize / 64) * 8, &mut w);
        Ok(u64::from_le_bytes(w) & (1 << (port % 64)) != 0)
    }

    /// Block until one of the ports is pending or the timeout passes.
    fn poll(&mut self, arg: u64) -> HcResult {
        let sp: SchedPoll = self.read(arg)?;
        if sp.nr_ports > SCHED_POLL_MAX_PORTS {
            return Err(XenError::EINVAL);
        }
        for i in 0..u64::from(sp.nr_ports) {
            let port = self.mem()?.read_u32_at(sp.ports, i)?;
            if port as usize >= EVTCHN_2L_NR_CHANNELS {
                return Err(XenError::EINVAL);
            }
            if self.port_pending(port)? {
                return Ok(0);
            }
        }
        if sp.timeout != 0 && sp.timeout <= self.now {
            return Ok(0);
        }
        if let Some(d) = self.hv.domains.get_mut(self.dom)
            && let Some(f) = d.polling.get_mut(self.vidx as usize)
        {
            *f = true;
        }
        self.hv
            .sched
            .set_poll_timer(self.vcpu, (sp.timeout != 0).then_some(sp.timeout));
        let k = self.hv.sched.block(self.vcpu, self.now);
        self.kick(k);
        self.exit.resched = true;
        Ok(0)
    }
}
