//! Event channels: Xen's 2-level ABI, per-domain port tables and delivery.
//!
//! - [`port`]: the port table and the explicit state machine (free / reserved / unbound /
//!   interdomain / virq / ipi), bounded by a per-domain quota.
//! - [`delivery`]: the 2-level bit protocol into `shared_info`, behind the [`EventWords`]
//!   trait; reports which vCPU needs a kick.
//! - [`ops`]: every `EVTCHNOP_*` on a [`DomainEvtchn`], returning Xen's errno.
//! - this module: the locked entry points for operations that span two domains.
//!
//! **Lock order.** Each domain's [`DomainEvtchn`] sits behind its own `spin::Mutex`. An
//! operation that needs two domains locks the one with the *lower domid first*
//! ([`lock_pair`]); it never holds one domain's lock while waiting for a lower one. The
//! cross-domain entry points here first look at the local domain alone to learn the peer,
//! drop that lock, then take both in order and re-check (the op returns `NeedPeer` if the
//! peer changed meanwhile, and the loop retries).
//!
//! Invariant kept across domains: if port *p* of *A* is `Interdomain { B, q }`, then port *q*
//! of *B* is `Interdomain { A, p }`.

pub mod delivery;
pub mod ops;
pub mod port;

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::event_channel::EvtchnPort;
use spin::{Mutex, MutexGuard};

pub use delivery::{Delivery, EventWords, SharedInfoPage};
pub use ops::{AllowAll, DomainEvtchn, EvtchnPolicy, Sent, Step};
pub use port::{Channel, PortState, PortTable, VcpuId};

/// Finds a domain's event-channel state by domid (implemented by the domain table).
pub trait EvtchnRegistry {
    type Words: EventWords;
    fn evtchn(&self, dom: DomId) -> Option<&Mutex<DomainEvtchn<Self::Words>>>;
}

/// Lock two different domains in the documented order (lower domid first) and return the
/// guards as (`a`'s, `b`'s).
pub fn lock_pair<'m, S>(
    a: &'m Mutex<DomainEvtchn<S>>,
    a_id: DomId,
    b: &'m Mutex<DomainEvtchn<S>>,
    b_id: DomId,
) -> (
    MutexGuard<'m, DomainEvtchn<S>>,
    MutexGuard<'m, DomainEvtchn<S>>,
) {
    debug_assert_ne!(a_id, b_id, "lock_pair on one domain would deadlock");
    if a_id < b_id {
        let ga = a.lock();
        let gb = b.lock();
        (ga, gb)
    } else {
        let gb = b.lock();
        let ga = a.lock();
        (ga, gb)
    }
}

/// Re-lock attempts before giving up with `EAGAIN` (each retry means the peer changed
/// between two lock acquisitions; this bound only stops a pathological livelock).
const PEER_RETRIES: usize = 8;

/// Run `op` on `dom`, with the peer domain locked in order if the op asks for it.
fn with_peer<R, G: EvtchnRegistry>(
    reg: &G,
    dom: DomId,
    mut op: impl FnMut(
        &mut DomainEvtchn<G::Words>,
        Option<&mut DomainEvtchn<G::Words>>,
    ) -> Result<Step<R>, XenError>,
) -> Result<R, XenError> {
    let local = reg.evtchn(dom).ok_or(XenError::ESRCH)?;
    let mut need = match op(&mut local.lock(), None)? {
        Step::Done(r) => return Ok(r),
        Step::NeedPeer(p) => p,
    };
    for _ in 0..PEER_RETRIES {
        let step = match reg.evtchn(need) {
            Some(peer) if need != dom => {
                let (mut lg, mut pg) = lock_pair(local, dom, peer, need);
                op(&mut lg, Some(&mut pg))?
            }
            // The peer vanished (its teardown reverted our end) or is us: look again alone.
            _ => op(&mut local.lock(), None)?,
        };
        match step {
            Step::Done(r) => return Ok(r),
            Step::NeedPeer(p) => need = p,
        }
    }
    Err(XenError::EAGAIN)
}

/// `EVTCHNOP_bind_interdomain` for `dom` (errors: `ESRCH` no such remote domain, then as
/// [`DomainEvtchn::bind_interdomain`]).
pub fn bind_interdomain<G: EvtchnRegistry>(
    reg: &G,
    dom: DomId,
    remote_dom: DomId,
    remote_port: EvtchnPort,
    policy: &(impl EvtchnPolicy + ?Sized),
) -> Result<(EvtchnPort, Delivery), XenError> {
    if reg.evtchn(remote_dom).is_none() {
        return Err(XenError::ESRCH);
    }
    with_peer(reg, dom, |local, peer| {
        local.bind_interdomain(peer, remote_dom, remote_port, policy)
    })
}

/// `EVTCHNOP_close` for `dom`.
pub fn close<G: EvtchnRegistry>(reg: &G, dom: DomId, port: EvtchnPort) -> Result<(), XenError> {
    with_peer(reg, dom, |local, peer| local.close(peer, port))
}

/// `EVTCHNOP_send` from `dom`: where the event went, if anywhere.
pub fn send<G: EvtchnRegistry>(
    reg: &G,
    dom: DomId,
    port: EvtchnPort,
    policy: &(impl EvtchnPolicy + ?Sized),
) -> Result<Option<Sent>, XenError> {
    with_peer(reg, dom, |local, peer| local.send(peer, port, policy))
}

/// `EVTCHNOP_reset` (and domain teardown): close every port of `dom`; interdomain peers
/// revert to unbound.
pub fn reset<G: EvtchnRegistry>(reg: &G, dom: DomId) -> Result<(), XenError> {
    let ports: alloc::vec::Vec<EvtchnPort> = {
        let local = reg.evtchn(dom).ok_or(XenError::ESRCH)?;
        local
            .lock()
            .table()
            .ports_in_use()
            .map(|(p, _)| p)
            .collect()
    };
    for port in ports {
        match close(reg, dom, port) {
            // Closed meanwhile (by its peer's bind/close racing us): fine.
            Ok(()) | Err(XenError::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
