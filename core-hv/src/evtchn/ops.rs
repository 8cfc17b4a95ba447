//! The `EVTCHNOP_*` operations on one domain's event-channel state, with Xen's error codes
//! and check order (`event_channel.c`).
//!
//! Operations that touch a second domain (bind_interdomain, close and send on an interdomain
//! port) take it as `peer: Option<&mut DomainEvtchn>`: the caller holds both domains' locks
//! (lower domid first, see [`super::lock_pair`]). When the peer is needed but not supplied
//! (or another domain was supplied) they return [`Step::NeedPeer`] with the domid to lock,
//! having changed nothing, so a caller can look the peer up under its own lock first and then
//! retry with both locks held. Loopback channels (peer = this domain) need no second lock.

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::event_channel::{EvtchnPort, StatusInfo, virq};

use super::delivery::{self, Delivery, EventWords};
use super::port::{PortState, PortTable, VcpuId};

/// Who may connect to whom. Called at every cross-domain and VIRQ operation (Xen's
/// `xsm_evtchn_*` hooks); refusal is `EPERM`.
pub trait EvtchnPolicy {
    /// May `dom` offer an unbound port to `remote`?
    fn may_alloc_unbound(&self, dom: DomId, remote: DomId) -> bool;
    /// May `local` connect to a port `remote` offered it?
    fn may_bind_interdomain(&self, local: DomId, remote: DomId) -> bool;
    /// May `from` raise an event in `to` over an established channel?
    fn may_send(&self, from: DomId, to: DomId) -> bool;
    /// May `dom` receive `virq`? (Bulkhead: e.g. `VIRQ_DOM_EXC` needs a capability.)
    fn may_bind_virq(&self, dom: DomId, virq: u32) -> bool;
}

/// Allows everything: Xen's behaviour without XSM. For tests and for callers that have
/// already applied their policy.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl EvtchnPolicy for AllowAll {
    fn may_alloc_unbound(&self, _: DomId, _: DomId) -> bool {
        true
    }
    fn may_bind_interdomain(&self, _: DomId, _: DomId) -> bool {
        true
    }
    fn may_send(&self, _: DomId, _: DomId) -> bool {
        true
    }
    fn may_bind_virq(&self, _: DomId, _: u32) -> bool {
        true
    }
}

/// Result of an operation that may need the peer domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step<T> {
    Done(T),
    /// Lock this domain too (in order) and call again; nothing was changed.
    NeedPeer(DomId),
}

/// Where an event raised by `send` went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    pub dom: DomId,
    pub port: EvtchnPort,
    pub delivery: Delivery,
}

/// One domain's event channels: its port table and its `shared_info` event words.
#[derive(Debug)]
pub struct DomainEvtchn<S> {
    domid: DomId,
    table: PortTable,
    words: S,
}

impl<S: EventWords> DomainEvtchn<S> {
    /// State for domain `domid` (see [`PortTable::new`] for the limits).
    pub fn new(domid: DomId, nr_vcpus: u32, max_ports: u32, words: S) -> Result<Self, XenError> {
        Ok(DomainEvtchn {
            domid,
            table: PortTable::new(nr_vcpus, max_ports)?,
            words,
        })
    }

    pub fn domid(&self) -> DomId {
        self.domid
    }

    pub fn table(&self) -> &PortTable {
        &self.table
    }

    pub fn words(&self) -> &S {
        &self.words
    }

    /// `EVTCHNOP_alloc_unbound`: a new port waiting for `remote` (already resolved from
    /// `DOMID_SELF` by the caller). Errors: `EPERM` (policy), `ENOSPC` (quota).
    pub fn alloc_unbound(
        &mut self,
        remote: DomId,
        policy: &(impl EvtchnPolicy + ?Sized),
    ) -> Result<EvtchnPort, XenError> {
        if !policy.may_alloc_unbound(self.domid, remote) {
            return Err(XenError::EPERM);
        }
        let port = self.table.find_free()?;
        self.table.transition(port, PortState::Unbound { remote })?;
        Ok(port)
    }

    /// `EVTCHNOP_bind_interdomain` to `remote_port` of `remote_dom` (resolved from
    /// `DOMID_SELF`; the caller returns `ESRCH` if it does not exist). The new local port is
    /// marked pending, as in Xen. Errors in Xen's order: `ENOSPC` (local quota), `EINVAL`
    /// (remote port invalid, not unbound, or not offered to us), `EPERM` (policy).
    pub fn bind_interdomain(
        &mut self,
        peer: Option<&mut Self>,
        remote_dom: DomId,
        remote_port: EvtchnPort,
        policy: &(impl EvtchnPolicy + ?Sized),
    ) -> Result<Step<(EvtchnPort, Delivery)>, XenError> {
        let local_dom = self.domid;
        let mut peer = match self.peer_for(peer, remote_dom) {
            Ok(p) => p,
            Err(need) => return Ok(Step::NeedPeer(need)),
        };
        let lport = self.table.find_free()?;
        let remote_table = match peer.as_deref_mut() {
            Some(p) => &p.table,
            None => &self.table,
        };
        match remote_table.get(remote_port).map(|c| c.state) {
            Some(PortState::Unbound { remote }) if remote == local_dom => {}
            _ => return Err(XenError::EINVAL),
        }
        if !policy.may_bind_interdomain(local_dom, remote_dom) {
            return Err(XenError::EPERM);
        }
        self.table.transition(
            lport,
            PortState::Interdomain {
                remote_dom,
                remote_port,
            },
        )?;
        let remote_table = match peer {
            Some(p) => &mut p.table,
            None => &mut self.table,
        };
        remote_table.transition(
            remote_port,
            PortState::Interdomain {
                remote_dom: local_dom,
                remote_port: lport,
            },
        )?;
        let vcpu = self.table.get(lport).map_or(0, |c| c.notify_vcpu);
        let delivery = delivery::set_pending(&self.words, lport, vcpu);
        Ok(Step::Done((lport, delivery)))
    }

    /// `EVTCHNOP_bind_virq`. Errors in Xen's order: `EINVAL` (no such VIRQ, or a global /
    /// per-domain VIRQ on a vCPU other than 0), `ENOENT` (no such vCPU), `EPERM` (policy),
    /// `EEXIST` (already bound on that vCPU), `ENOSPC` (quota).
    pub fn bind_virq(
        &mut self,
        virq_nr: u32,
        vcpu: VcpuId,
        policy: &(impl EvtchnPolicy + ?Sized),
    ) -> Result<EvtchnPort, XenError> {
        if virq_nr >= virq::NR_VIRQS {
            return Err(XenError::EINVAL);
        }
        if virq::kind(virq_nr) != virq::VirqKind::PerVcpu && vcpu != 0 {
            return Err(XenError::EINVAL);
        }
        if !self.table.vcpu_exists(vcpu) {
            return Err(XenError::ENOENT);
        }
        if !policy.may_bind_virq(self.domid, virq_nr) {
            return Err(XenError::EPERM);
        }
        if self.table.virq_port(vcpu, virq_nr).is_some() {
            return Err(XenError::EEXIST);
        }
        let port = self.table.find_free()?;
        self.table.transition(
            port,
            PortState::Virq {
                virq: virq_nr,
                vcpu,
            },
        )?;
        Ok(port)
    }

    /// `EVTCHNOP_bind_pirq` (the caller checked that this domain holds `pirq`). Errors:
    /// `EEXIST` (a port already receives it), `ENOSPC`.
    pub fn bind_pirq(&mut self, pirq: u32) -> Result<EvtchnPort, XenError> {
        if self
            .table
            .ports_in_use()
            .any(|(_, c)| c.state == PortState::Pirq { pirq })
        {
            return Err(XenError::EEXIST);
        }
        let port = self.table.find_free()?;
        self.table.transition(port, PortState::Pirq { pirq })?;
        Ok(port)
    }

    /// A device interrupt for `pirq` on `port`: set it pending if the port still receives
    /// that pirq (a port closed and reused since is left alone).
    pub fn raise_pirq(&mut self, port: EvtchnPort, pirq: u32) -> Option<Delivery> {
        let chan = self.table.get(port)?;
        if chan.state != (PortState::Pirq { pirq }) {
            return None;
        }
        Some(delivery::set_pending(&self.words, port, chan.notify_vcpu))
    }

    /// The pirq behind `port` went away (`unmap_pirq`): free the port if it still receives
    /// that pirq.
    pub fn close_pirq_port(&mut self, port: EvtchnPort, pirq: u32) {
        if self
            .table
            .get(port)
            .is_some_and(|c| c.state == PortState::Pirq { pirq })
        {
            self.words.clear_pending(port);
            let _ = self.table.transition(port, PortState::Free);
        }
    }

    /// `EVTCHNOP_bind_ipi`. Errors: `ENOENT` (no such vCPU), `ENOSPC`.
    pub fn bind_ipi(&mut self, vcpu: VcpuId) -> Result<EvtchnPort, XenError> {
        if !self.table.vcpu_exists(vcpu) {
            return Err(XenError::ENOENT);
        }
        let port = self.table.find_free()?;
        self.table.transition(port, PortState::Ipi { vcpu })?;
        Ok(port)
    }

    /// `EVTCHNOP_close`. An interdomain peer's end reverts to unbound-to-us (it can be bound
    /// again). The port's pending bit is cleared. Errors: `EINVAL` (invalid, free or
    /// reserved port).
    pub fn close(
        &mut self,
        peer: Option<&mut Self>,
        port: EvtchnPort,
    ) -> Result<Step<()>, XenError> {
        let chan = self.table.get(port).ok_or(XenError::EINVAL)?;
        match chan.state {
            PortState::Free | PortState::Reserved => return Err(XenError::EINVAL),
            PortState::Interdomain {
                remote_dom,
                remote_port,
            } => {
                let local_dom = self.domid;
                let peer = match self.peer_for(peer, remote_dom) {
                    Ok(p) => p,
                    Err(need) => return Ok(Step::NeedPeer(need)),
                };
                let remote_table = match peer {
                    Some(p) => &mut p.table,
                    None => &mut self.table,
                };
                // The other end names us (kept by bind/close); revert it only if so.
                let names_us = matches!(
                    remote_table.get(remote_port).map(|c| c.state),
                    Some(PortState::Interdomain { remote_dom: d, remote_port: p })
                        if d == local_dom && p == port
                );
                if names_us {
                    remote_table
                        .transition(remote_port, PortState::Unbound { remote: local_dom })?;
                }
            }
            PortState::Unbound { .. }
            | PortState::Virq { .. }
            | PortState::Ipi { .. }
            | PortState::Pirq { .. } => {}
        }
        self.words.clear_pending(port);
        self.table.transition(port, PortState::Free)?;
        Ok(Step::Done(()))
    }

    /// `EVTCHNOP_send`: raise the other end (interdomain), or this port (IPI). Sending on an
    /// unbound port is silently dropped (`Done(None)`), as in Xen. Errors: `EINVAL` (invalid
    /// port, or a free / reserved / VIRQ port), `EPERM` (policy).
    pub fn send(
        &mut self,
        peer: Option<&mut Self>,
        port: EvtchnPort,
        policy: &(impl EvtchnPolicy + ?Sized),
    ) -> Result<Step<Option<Sent>>, XenError> {
        let chan = self.table.get(port).ok_or(XenError::EINVAL)?;
        match chan.state {
            PortState::Interdomain {
                remote_dom,
                remote_port,
            } => {
                let peer = match self.peer_for(peer, remote_dom) {
                    Ok(p) => p,
                    Err(need) => return Ok(Step::NeedPeer(need)),
                };
                if !policy.may_send(self.domid, remote_dom) {
                    return Err(XenError::EPERM);
                }
                let target = match peer {
                    Some(p) => p,
                    None => self,
                };
                let vcpu = target.table.get(remote_port).map_or(0, |c| c.notify_vcpu);
                let delivery = delivery::set_pending(&target.words, remote_port, vcpu);
                Ok(Step::Done(Some(Sent {
                    dom: remote_dom,
                    port: remote_port,
                    delivery,
                })))
            }
            PortState::Ipi { .. } => {
                let delivery = delivery::set_pending(&self.words, port, chan.notify_vcpu);
                Ok(Step::Done(Some(Sent {
                    dom: self.domid,
                    port,
                    delivery,
                })))
            }
            PortState::Unbound { .. } => Ok(Step::Done(None)),
            PortState::Free
            | PortState::Reserved
            | PortState::Virq { .. }
            | PortState::Pirq { .. } => Err(XenError::EINVAL),
        }
    }

    /// Raise a VIRQ in this domain (the hypervisor's side of a bound VIRQ). `None` if the
    /// domain has not bound it (per-vCPU VIRQs on `vcpu`, others on vCPU 0).
    pub fn raise_virq(&mut self, virq_nr: u32, vcpu: VcpuId) -> Option<Delivery> {
        let slot_vcpu = if virq::kind(virq_nr) == virq::VirqKind::PerVcpu {
            vcpu
        } else {
            0
        };
        let port = self.table.virq_port(slot_vcpu, virq_nr)?;
        let notify = self.table.get(port)?.notify_vcpu;
        Some(delivery::set_pending(&self.words, port, notify))
    }

    /// `EVTCHNOP_status` of one of this domain's ports: what it is and the vCPU it notifies.
    /// A free or reserved port is `Closed`. Errors: `EINVAL` (invalid port).
    pub fn status(&self, port: EvtchnPort) -> Result<(StatusInfo, VcpuId), XenError> {
        let chan = self.table.get(port).ok_or(XenError::EINVAL)?;
        let info = match chan.state {
            PortState::Free | PortState::Reserved => StatusInfo::Closed,
            PortState::Unbound { remote } => StatusInfo::Unbound { remote_dom: remote },
            PortState::Interdomain {
                remote_dom,
                remote_port,
            } => StatusInfo::Interdomain {
                dom: remote_dom,
                port: remote_port,
            },
            PortState::Virq { virq, .. } => StatusInfo::Virq(virq),
            PortState::Pirq { pirq } => StatusInfo::Pirq(pirq),
            PortState::Ipi { .. } => StatusInfo::Ipi,
        };
        Ok((info, chan.notify_vcpu))
    }

    /// `EVTCHNOP_unmask`: returns the vCPU to kick if a pending event is now delivered.
    /// Errors: `EINVAL` (invalid port).
    pub fn unmask(&mut self, port: EvtchnPort) -> Result<Option<VcpuId>, XenError> {
        let chan = self.table.get(port).ok_or(XenError::EINVAL)?;
        Ok(delivery::unmask(&self.words, port, chan.notify_vcpu))
    }

    /// `EVTCHNOP_bind_vcpu`: deliver `port`'s events to `vcpu`. Allowed for unbound and
    /// interdomain ports and global / per-domain VIRQs. Errors in Xen's order: `ENOENT` (no
    /// such vCPU), `EINVAL` (invalid port, or a state that cannot move).
    pub fn bind_vcpu(&mut self, port: EvtchnPort, vcpu: VcpuId) -> Result<(), XenError> {
        if !self.table.vcpu_exists(vcpu) {
            return Err(XenError::ENOENT);
        }
        let chan = self.table.get(port).ok_or(XenError::EINVAL)?;
        match chan.state {
            PortState::Virq { virq, .. } if virq::kind(virq) != virq::VirqKind::PerVcpu => {}
            PortState::Unbound { .. } | PortState::Interdomain { .. } | PortState::Pirq { .. } => {}
            _ => return Err(XenError::EINVAL),
        }
        self.table.set_notify_vcpu(port, vcpu)
    }

    /// Resolve the peer argument: `Ok(None)` for loopback, `Ok(Some(p))` when the right peer
    /// was supplied, `Err(domid)` when it must be locked first.
    fn peer_for<'p>(
        &self,
        peer: Option<&'p mut Self>,
        remote_dom: DomId,
    ) -> Result<Option<&'p mut Self>, DomId> {
        if remote_dom == self.domid {
            return Ok(None);
        }
        match peer {
            Some(p) if p.domid == remote_dom => Ok(Some(p)),
            _ => Err(remote_dom),
        }
    }
}
