//! `event_channel_op` (hypercall 32): the `EVTCHNOP_*` sub-ops on the caller's event
//! channels, over [`crate::evtchn`] with the domain table as registry and
//! [`SharingPolicy`] as the policy.
//!
//! Each argument structure is copied in once through the checked accessor, decoded, acted
//! on, and (for ops with outputs) copied back. Acting on another domain's channels
//! (`alloc_unbound`, `status`, `reset` with `dom` ≠ `DOMID_SELF`) needs `DOMAIN_CONTROL`
//! (Xen's `XSM_TARGET`); that check comes before the lookup, so an unprivileged caller
//! learns nothing about which domains exist. `BIND_PIRQ` and the FIFO ABI (11–13) are
//! `-ENOSYS`: Bulkhead has no PIRQs and speaks only the 2-level ABI.
//!
//! Every port raised pending goes through [`Hypervisor::deliver`](crate::domain::Hypervisor::deliver),
//! which wakes the notified vCPU (and pollers) and returns the CPUs to kick.

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::event_channel::{
    EvtchnAllocUnbound, EvtchnBindInterdomain, EvtchnBindIpi, EvtchnBindPirq, EvtchnBindVcpu,
    EvtchnBindVirq, EvtchnClose, EvtchnReset, EvtchnSend, EvtchnStatus, EvtchnUnmask, op,
};

use super::{Call, HcResult};
use crate::domain::shared::EventPage;
use crate::evtchn::{self, DomainEvtchn};
use crate::policy;

/// Decode a little-endian ABI struct copied from `$va` (`from_bytes` of exactly `$n` bytes).
macro_rules! read_abi {
    ($call:expr, $ty:ty, $va:expr) => {{
        let b = $call.bytes_in::<{ <$ty>::WIRE_SIZE }>($va)?;
        <$ty>::from_bytes(&b).ok_or(XenError::EFAULT)?
    }};
}
pub(super) use read_abi;

impl Call<'_, '_> {
    /// Copy `N` bytes in from the caller.
    pub(super) fn bytes_in<const N: usize>(&self, va: u64) -> Result<[u8; N], XenError> {
        let mut b = [0u8; N];
        self.mem()?.copy_from_guest(va, &mut b)?;
        Ok(b)
    }

    /// Copy bytes out to the caller.
    pub(super) fn bytes_out(&self, va: u64, b: &[u8]) -> Result<(), XenError> {
        self.mem()?.copy_to_guest(va, b)
    }

    /// The capability lookup the sharing policy needs.
    pub(super) fn sharing_policy(
        &self,
    ) -> policy::SharingPolicy<impl Fn(DomId) -> shared_abi::capability::Capabilities + '_> {
        let domains = &self.hv.domains;
        policy::SharingPolicy {
            caps: move |d: DomId| domains.get(d).map(|x| x.caps).unwrap_or_default(),
        }
    }

    /// `dom` after `DOMID_SELF`, checked: oneself always, another domain with
    /// `DOMAIN_CONTROL` (`EPERM`), and then it must exist with event channels (`ESRCH`).
    fn evtchn_target(&self, dom: DomId) -> Result<DomId, XenError> {
        let target = self.resolve(dom);
        if target != self.dom {
            policy::control(self.caller(), target)?;
        }
        match self.hv.domains.get(target) {
            Some(d) if d.state().is_alive() && d.evtchn.is_some() => Ok(target),
            _ => Err(XenError::ESRCH),
        }
    }

    /// Run `f` on the caller's own event-channel state.
    fn own_evtchn<R>(
        &self,
        f: impl FnOnce(&mut DomainEvtchn<EventPage>) -> Result<R, XenError>,
    ) -> Result<R, XenError> {
        let d = self.hv.domains.get(self.dom).ok_or(XenError::ESRCH)?;
        let e = d.evtchn.as_ref().ok_or(XenError::ENOSYS)?;
        f(&mut e.lock())
    }

    pub(super) fn event_channel_op(&mut self, cmd: u64, arg: u64) -> HcResult {
        let Ok(cmd) = u32::try_from(cmd) else {
            return Err(XenError::ENOSYS);
        };
        if self
            .hv
            .domains
            .get(self.dom)
            .is_none_or(|d| d.evtchn.is_none())
        {
            return Err(XenError::ENOSYS);
        }
        match cmd {
            op::ALLOC_UNBOUND => {
                let mut a = read_abi!(self, EvtchnAllocUnbound, arg);
                let target = self.evtchn_target(a.dom)?;
                // DOMID_SELF as the remote means the caller, as in Xen.
                let remote = self.resolve(a.remote_dom);
                let port = {
                    let pol = self.sharing_policy();
                    let d = self.hv.domains.get(target).ok_or(XenError::ESRCH)?;
                    let e = d.evtchn.as_ref().ok_or(XenError::ESRCH)?;
                    e.lock().alloc_unbound(remote, &pol)?
                };
                a.port = port;
                self.bytes_out(arg, &a.to_bytes())?;
                Ok(0)
            }
            op::BIND_INTERDOMAIN => {
                let mut b = read_abi!(self, EvtchnBindInterdomain, arg);
                let remote = self.resolve(b.remote_dom);
                let (port, delivery) = {
                    let pol = self.sharing_policy();
                    evtchn::bind_interdomain(
                        &self.hv.domains,
                        self.dom,
                        remote,
                        b.remote_port,
                        &pol,
                    )?
                };
                let k = self.hv.deliver(self.p, self.dom, delivery);
                self.kick(k);
                b.local_port = port;
                self.bytes_out(arg, &b.to_bytes())?;
                Ok(0)
            }
            op::BIND_VIRQ => {
                let mut b = read_abi!(self, EvtchnBindVirq, arg);
                let port = {
                    let pol = self.sharing_policy();
                    self.own_evtchn(|e| e.bind_virq(b.virq, b.vcpu, &pol))?
                };
                b.port = port;
                self.bytes_out(arg, &b.to_bytes())?;
                Ok(0)
            }
            op::BIND_IPI => {
                let mut b = read_abi!(self, EvtchnBindIpi, arg);
                b.port = self.own_evtchn(|e| e.bind_ipi(b.vcpu))?;
                self.bytes_out(arg, &b.to_bytes())?;
                Ok(0)
            }
            op::CLOSE => {
                let c = read_abi!(self, EvtchnClose, arg);
                evtchn::close(&self.hv.domains, self.dom, c.port)?;
                Ok(0)
            }
            op::SEND => {
                let s = read_abi!(self, EvtchnSend, arg);
                let sent = {
                    let pol = self.sharing_policy();
                    evtchn::send(&self.hv.domains, self.dom, s.port, &pol)?
                };
                if let Some(d) = self.hv.domains.get_mut(self.dom) {
                    d.io.evtchn_sends = d.io.evtchn_sends.saturating_add(1);
                }
                if let Some(sent) = sent {
                    let k = self.hv.deliver(self.p, sent.dom, sent.delivery);
                    self.kick(k);
                }
                Ok(0)
            }
            op::STATUS => {
                let mut st = read_abi!(self, EvtchnStatus, arg);
                let target = self.evtchn_target(st.dom)?;
                let (info, vcpu) = {
                    let d = self.hv.domains.get(target).ok_or(XenError::ESRCH)?;
                    let e = d.evtchn.as_ref().ok_or(XenError::ESRCH)?;
                    e.lock().status(st.port)?
                };
                st.set_info(info);
                st.vcpu = vcpu;
                self.bytes_out(arg, &st.to_bytes())?;
                Ok(0)
            }
            op::UNMASK => {
                let u = read_abi!(self, EvtchnUnmask, arg);
                if let Some(vcpu) = self.own_evtchn(|e| e.unmask(u.port))? {
                    let k = self.hv.event_pending(self.p, self.dom, vcpu);
                    self.kick(k);
                }
                Ok(0)
            }
            op::BIND_VCPU => {
                let b = read_abi!(self, EvtchnBindVcpu, arg);
                self.own_evtchn(|e| e.bind_vcpu(b.port, b.vcpu))?;
                Ok(0)
            }
            op::RESET => {
                let r = read_abi!(self, EvtchnReset, arg);
                let target = self.evtchn_target(r.dom)?;
                evtchn::reset(&self.hv.domains, target)?;
                Ok(0)
            }
            op::BIND_PIRQ => {
                let mut b = read_abi!(self, EvtchnBindPirq, arg);
                // Only the domain that mapped the pirq (a device owner) may receive it.
                policy::device_owner(self.caller())?;
                self.hv.irqs.get(self.dom, b.pirq)?;
                let port = self.own_evtchn(|e| e.bind_pirq(b.pirq))?;
                if let Err(e) = self.hv.irqs.bind(self.dom, b.pirq, port) {
                    let _ = self.own_evtchn(|ev| {
                        ev.close_pirq_port(port, b.pirq);
                        Ok(())
                    });
                    return Err(e);
                }
                b.port = port;
                if let Err(e) = self.bytes_out(arg, &b.to_bytes()) {
                    let _ = self.own_evtchn(|ev| {
                        ev.close_pirq_port(port, b.pirq);
                        Ok(())
                    });
                    return Err(e);
                }
                Ok(0)
            }
            // INIT_CONTROL, EXPAND_ARRAY, SET_PRIORITY: the FIFO ABI is not offered (guests
            // fall back to 2-level).
            _ => Err(XenError::ENOSYS),
        }
    }
}
