//! The per-domain port table and the event-channel state machine.
//!
//! Owns every port's state and the only code that changes it ([`PortTable::transition`]), so
//! the legal transitions are listed once:
//!
//! ```text
//!   Reserved (port 0)         never changes
//!   Free        -> Unbound | Interdomain | Virq | Ipi | Pirq   (alloc_unbound / bind_*)
//!   Unbound     -> Interdomain                             (the remote bound to it)
//!   Interdomain -> Unbound                                 (the remote closed its end)
//!   any but Reserved/Free -> Free                          (close / reset)
//! ```
//!
//! Invariants: port 0 is `Reserved`; the table never grows beyond the domain's quota
//! (`max_ports` ≤ 4096, the 2-level limit); `virq_ports[v][n]` is non-zero iff that port is
//! `Virq { virq: n, vcpu: v }`. Cross-domain invariants (both ends of an interdomain channel
//! name each other) are kept by `ops`.

use alloc::vec;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::event_channel::{EvtchnPort, virq};
use shared_abi::shared_info::{EVTCHN_2L_NR_CHANNELS, LEGACY_MAX_VCPUS};

/// A vCPU index within its domain.
pub type VcpuId = u32;

/// Ports are added in buckets like Xen's, so `port_is_valid` covers a whole bucket.
const BUCKET: u32 = 64;

/// The state of one port (`ECS_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    /// Allocatable.
    Free,
    /// Port 0: never allocated.
    Reserved,
    /// Waiting for `remote` to bind to it.
    Unbound { remote: DomId },
    /// Connected to `remote_port` in `remote_dom` (possibly this domain: loopback).
    Interdomain {
        remote_dom: DomId,
        remote_port: EvtchnPort,
    },
    /// Receives `virq`; bound in `vcpu`'s VIRQ table (vCPU 0 for global and per-domain ones).
    Virq { virq: u32, vcpu: VcpuId },
    /// Inter-processor interrupt to `vcpu` of this domain.
    Ipi { vcpu: VcpuId },
    /// Receives a device interrupt (`crate::irq`): the pirq it was bound to.
    Pirq { pirq: u32 },
}

impl PortState {
    fn may_become(self, to: PortState) -> bool {
        use PortState::*;
        matches!(
            (self, to),
            (
                Free,
                Unbound { .. } | Interdomain { .. } | Virq { .. } | Ipi { .. } | Pirq { .. }
            ) | (Unbound { .. }, Interdomain { .. })
                | (Interdomain { .. }, Unbound { .. })
                | (
                    Unbound { .. } | Interdomain { .. } | Virq { .. } | Ipi { .. } | Pirq { .. },
                    Free
                )
        )
    }
}

/// One port: its state and the vCPU its events are delivered to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel {
    pub state: PortState,
    pub notify_vcpu: VcpuId,
}

/// A domain's ports.
#[derive(Clone, Debug)]
pub struct PortTable {
    ports: Vec<Channel>,
    max_ports: u32,
    nr_vcpus: u32,
    /// Per vCPU, the port bound to each VIRQ (0 = none).
    virq_ports: Vec<[EvtchnPort; virq::NR_VIRQS as usize]>,
}

impl PortTable {
    /// A table for a domain with `nr_vcpus` vCPUs and a quota of `max_ports` ports (port 0
    /// included). Refuses `nr_vcpus` outside 1..=32 (the `shared_info` vCPU slots) and
    /// `max_ports` outside 2..=4096 (the 2-level limit) with `EINVAL`.
    pub fn new(nr_vcpus: u32, max_ports: u32) -> Result<Self, XenError> {
        if nr_vcpus == 0 || nr_vcpus as usize > LEGACY_MAX_VCPUS {
            return Err(XenError::EINVAL);
        }
        if max_ports < 2 || max_ports as usize > EVTCHN_2L_NR_CHANNELS {
            return Err(XenError::EINVAL);
        }
        let mut table = PortTable {
            ports: Vec::new(),
            max_ports,
            nr_vcpus,
            virq_ports: vec![[0; virq::NR_VIRQS as usize]; nr_vcpus as usize],
        };
        table.grow();
        table.ports[0].state = PortState::Reserved;
        Ok(table)
    }

    /// Number of vCPUs.
    pub fn nr_vcpus(&self) -> u32 {
        self.nr_vcpus
    }

    /// The quota.
    pub fn max_ports(&self) -> u32 {
        self.max_ports
    }

    /// Ports currently addressable (`port_is_valid`): allocated buckets.
    pub fn valid_ports(&self) -> u32 {
        self.ports.len() as u32
    }

    /// The port, if valid.
    pub fn get(&self, port: EvtchnPort) -> Option<Channel> {
        self.ports.get(port as usize).copied()
    }

    /// True if `vcpu` exists in this domain.
    pub fn vcpu_exists(&self, vcpu: VcpuId) -> bool {
        vcpu < self.nr_vcpus
    }

    /// The port bound to `virq` on `vcpu`, if any.
    pub fn virq_port(&self, vcpu: VcpuId, virq_nr: u32) -> Option<EvtchnPort> {
        let p = *self.virq_ports.get(vcpu as usize)?.get(virq_nr as usize)?;
        (p != 0).then_some(p)
    }

    /// Ports not `Free` or `Reserved`, in order.
    pub fn ports_in_use(&self) -> impl Iterator<Item = (EvtchnPort, Channel)> + '_ {
        self.ports
            .iter()
            .enumerate()
            .filter(|(_, c)| !matches!(c.state, PortState::Free | PortState::Reserved))
            .map(|(p, c)| (p as EvtchnPort, *c))
    }

    fn grow(&mut self) -> bool {
        let len = self.ports.len() as u32;
        if len >= self.max_ports {
            return false;
        }
        let new_len = (len + BUCKET).min(self.max_ports);
        self.ports.resize(
            new_len as usize,
            Channel {
                state: PortState::Free,
                notify_vcpu: 0,
            },
        );
        true
    }

    /// The lowest free port, growing the table within the quota (`get_free_port`);
    /// `ENOSPC` when the quota is used up. Nothing is allocated until a transition.
    pub fn find_free(&mut self) -> Result<EvtchnPort, XenError> {
        loop {
            if let Some(p) = self.ports.iter().position(|c| c.state == PortState::Free) {
                return Ok(p as EvtchnPort);
            }
            if !self.grow() {
                return Err(XenError::ENOSPC);
            }
        }
    }

    /// Move `port` to `to`, the one place states change. Keeps the VIRQ map in step and
    /// resets the notify vCPU when a port is freed. An illegal transition is a bug in this
    /// module's callers; it is refused with `EINVAL` rather than corrupting the table.
    pub fn transition(&mut self, port: EvtchnPort, to: PortState) -> Result<(), XenError> {
        let chan = self.ports.get(port as usize).ok_or(XenError::EINVAL)?;
        let from = chan.state;
        let legal = from.may_become(to);
        debug_assert!(legal, "illegal event channel transition {from:?} -> {to:?}");
        if !legal {
            return Err(XenError::EINVAL);
        }
        if let PortState::Virq { virq, vcpu } = from
            && let Some(slot) = self
                .virq_ports
                .get_mut(vcpu as usize)
                .and_then(|t| t.get_mut(virq as usize))
        {
            *slot = 0;
        }
        if let PortState::Virq { virq, vcpu } = to {
            let slot = self
                .virq_ports
                .get_mut(vcpu as usize)
                .and_then(|t| t.get_mut(virq as usize))
                .ok_or(XenError::EINVAL)?;
            *slot = port;
        }
        let chan = &mut self.ports[port as usize];
        chan.state = to;
        match to {
            PortState::Free => chan.notify_vcpu = 0,
            PortState::Virq { vcpu, .. } | PortState::Ipi { vcpu } => chan.notify_vcpu = vcpu,
            _ => {}
        }
        Ok(())
    }

    /// Change the vCPU a port notifies (`bind_vcpu`); the caller checked it is allowed.
    pub fn set_notify_vcpu(&mut self, port: EvtchnPort, vcpu: VcpuId) -> Result<(), XenError> {
        let chan = self.ports.get_mut(port as usize).ok_or(XenError::EINVAL)?;
        chan.notify_vcpu = vcpu;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_is_reserved_and_first_free_is_one() {
        let mut t = PortTable::new(1, 128).unwrap();
        assert_eq!(t.get(0).unwrap().state, PortState::Reserved);
        assert_eq!(t.find_free(), Ok(1));
    }

    #[test]
    fn table_new_refuses_bad_geometry() {
        assert_eq!(PortTable::new(0, 64).unwrap_err(), XenError::EINVAL);
        assert_eq!(PortTable::new(33, 64).unwrap_err(), XenError::EINVAL);
        assert_eq!(PortTable::new(1, 1).unwrap_err(), XenError::EINVAL);
        assert_eq!(PortTable::new(1, 4097).unwrap_err(), XenError::EINVAL);
        assert!(PortTable::new(32, 4096).is_ok());
    }

    #[test]
    fn table_grows_in_buckets_up_to_quota_then_enospc() {
        let mut t = PortTable::new(1, 100).unwrap();
        assert_eq!(t.valid_ports(), 64);
        for expect in 1..100 {
            let p = t.find_free().unwrap();
            assert_eq!(p, expect);
            t.transition(p, PortState::Ipi { vcpu: 0 }).unwrap();
        }
        assert_eq!(t.valid_ports(), 100);
        assert_eq!(t.find_free(), Err(XenError::ENOSPC));
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let mut t = PortTable::new(1, 64).unwrap();
        // Reserved never changes; Free -> Free and Virq -> Ipi are not transitions.
        assert!(
            !PortState::Reserved.may_become(PortState::Free)
                && !PortState::Free.may_become(PortState::Free)
                && !PortState::Virq { virq: 0, vcpu: 0 }.may_become(PortState::Ipi { vcpu: 0 })
        );
        assert_eq!(t.transition(4096, PortState::Free), Err(XenError::EINVAL));
        t.transition(1, PortState::Unbound { remote: 2 }).unwrap();
        t.transition(
            1,
            PortState::Interdomain {
                remote_dom: 2,
                remote_port: 5,
            },
        )
        .unwrap();
        t.transition(1, PortState::Unbound { remote: 2 }).unwrap();
        t.transition(1, PortState::Free).unwrap();
    }

    #[test]
    fn virq_map_follows_transitions() {
        let mut t = PortTable::new(2, 64).unwrap();
        t.transition(3, PortState::Virq { virq: 0, vcpu: 1 })
            .unwrap();
        assert_eq!(t.virq_port(1, 0), Some(3));
        assert_eq!(t.get(3).unwrap().notify_vcpu, 1);
        t.transition(3, PortState::Free).unwrap();
        assert_eq!(t.virq_port(1, 0), None);
        assert_eq!(t.get(3).unwrap().notify_vcpu, 0);
    }
}
