//! Event channel ABI (`event_channel.h`, XEN-ABI.md §2): `EVTCHNOP_*` numbers, the argument
//! struct of every sub-op (layouts asserted at compile time), `EVTCHNSTAT_*` and VIRQ numbers.
//!
//! Each struct has `from_bytes` (exactly its size, little-endian, `None` otherwise) and
//! `to_bytes`, so the hypervisor copies a guest's argument out once and never holds a
//! reference into guest memory. Field values are not validated here: they are allegations
//! that `core-hv`'s event-channel code checks.

use crate::DomId;
use crate::ring::le_struct;

/// `evtchn_port_t`.
pub type EvtchnPort = u32;

/// `EVTCHNOP_*` sub-op numbers (argument 1 of `event_channel_op`).
pub mod op {
    pub const BIND_INTERDOMAIN: u32 = 0;
    pub const BIND_VIRQ: u32 = 1;
    pub const BIND_PIRQ: u32 = 2;
    pub const CLOSE: u32 = 3;
    pub const SEND: u32 = 4;
    pub const STATUS: u32 = 5;
    pub const ALLOC_UNBOUND: u32 = 6;
    pub const BIND_IPI: u32 = 7;
    pub const BIND_VCPU: u32 = 8;
    pub const UNMASK: u32 = 9;
    pub const RESET: u32 = 10;
    pub const INIT_CONTROL: u32 = 11;
    pub const EXPAND_ARRAY: u32 = 12;
    pub const SET_PRIORITY: u32 = 13;
}

/// `EVTCHNSTAT_*`: the `status` field of [`EvtchnStatus`].
pub mod stat {
    pub const CLOSED: u32 = 0;
    pub const UNBOUND: u32 = 1;
    pub const INTERDOMAIN: u32 = 2;
    pub const PIRQ: u32 = 3;
    pub const VIRQ: u32 = 4;
    pub const IPI: u32 = 5;
}

/// `BIND_PIRQ__WILL_SHARE`.
pub const BIND_PIRQ_WILL_SHARE: u32 = 1;

/// VIRQ numbers (`xen.h`) and their binding class.
pub mod virq {
    pub const TIMER: u32 = 0;
    pub const DEBUG: u32 = 1;
    pub const CONSOLE: u32 = 2;
    pub const DOM_EXC: u32 = 3;
    pub const TBUF: u32 = 4;
    pub const DEBUGGER: u32 = 6;
    pub const XENOPROF: u32 = 7;
    pub const CON_RING: u32 = 8;
    pub const PCPU_STATE: u32 = 9;
    pub const MEM_EVENT: u32 = 10;
    pub const ARGO: u32 = 11;
    pub const ENOMEM: u32 = 12;
    pub const XENPMU: u32 = 13;
    pub const ARCH_0: u32 = 16;
    /// x86: machine check (`VIRQ_MCA` = `VIRQ_ARCH_0`).
    pub const MCA: u32 = ARCH_0;
    /// Number of VIRQs (`NR_VIRQS`); valid numbers are `0..NR_VIRQS`.
    pub const NR_VIRQS: u32 = 24;

    /// How a VIRQ binds: per vCPU, per domain, or global (one handler domain).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum VirqKind {
        PerVcpu,
        PerDomain,
        Global,
    }

    /// The binding class of `virq` (unknown numbers count as global, as in Xen, which
    /// therefore only accepts them on vCPU 0).
    pub const fn kind(virq: u32) -> VirqKind {
        match virq {
            TIMER | DEBUG | XENOPROF | XENPMU => VirqKind::PerVcpu,
            ARGO => VirqKind::PerDomain,
            _ => VirqKind::Global,
        }
    }
}

/// `EVTCHNOP_bind_interdomain`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnBindInterdomain {
    pub remote_dom: DomId,
    pub remote_port: EvtchnPort,
    /// Out.
    pub local_port: EvtchnPort,
}
le_struct!(EvtchnBindInterdomain, 12; remote_dom: u16 @ 0, remote_port: u32 @ 4,
    local_port: u32 @ 8);

/// `EVTCHNOP_bind_virq`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnBindVirq {
    pub virq: u32,
    pub vcpu: u32,
    /// Out.
    pub port: EvtchnPort,
}
le_struct!(EvtchnBindVirq, 12; virq: u32 @ 0, vcpu: u32 @ 4, port: u32 @ 8);

/// `EVTCHNOP_bind_pirq`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnBindPirq {
    pub pirq: u32,
    pub flags: u32,
    /// Out.
    pub port: EvtchnPort,
}
le_struct!(EvtchnBindPirq, 12; pirq: u32 @ 0, flags: u32 @ 4, port: u32 @ 8);

/// `EVTCHNOP_close`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnClose {
    pub port: EvtchnPort,
}
le_struct!(EvtchnClose, 4; port: u32 @ 0);

/// `EVTCHNOP_send`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnSend {
    pub port: EvtchnPort,
}
le_struct!(EvtchnSend, 4; port: u32 @ 0);

/// `EVTCHNOP_status`. The 8-byte union at offset 16 is kept as its two raw words
/// (`u_lo`, `u_hi`); use [`EvtchnStatus::info`] / [`EvtchnStatus::set_info`] to read and
/// write it by meaning.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnStatus {
    pub dom: DomId,
    pub port: EvtchnPort,
    /// Out: `EVTCHNSTAT_*`.
    pub status: u32,
    /// Out: the vCPU notified.
    pub vcpu: u32,
    /// Out: union word at offset 16 (`unbound.dom`, `interdomain.dom`, `pirq`, `virq`).
    pub u_lo: u32,
    /// Out: union word at offset 20 (`interdomain.port`).
    pub u_hi: u32,
}
le_struct!(EvtchnStatus, 24; dom: u16 @ 0, port: u32 @ 4, status: u32 @ 8, vcpu: u32 @ 12,
    u_lo: u32 @ 16, u_hi: u32 @ 20);

/// The meaning of an [`EvtchnStatus`] reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusInfo {
    Closed,
    Unbound { remote_dom: DomId },
    Interdomain { dom: DomId, port: EvtchnPort },
    Pirq(u32),
    Virq(u32),
    Ipi,
}

impl EvtchnStatus {
    /// Fill `status` and the union from `info` (union words not used are zeroed).
    pub fn set_info(&mut self, info: StatusInfo) {
        let (status, lo, hi) = match info {
            StatusInfo::Closed => (stat::CLOSED, 0, 0),
            StatusInfo::Unbound { remote_dom } => (stat::UNBOUND, u32::from(remote_dom), 0),
            StatusInfo::Interdomain { dom, port } => (stat::INTERDOMAIN, u32::from(dom), port),
            StatusInfo::Pirq(p) => (stat::PIRQ, p, 0),
            StatusInfo::Virq(v) => (stat::VIRQ, v, 0),
            StatusInfo::Ipi => (stat::IPI, 0, 0),
        };
        self.status = status;
        self.u_lo = lo;
        self.u_hi = hi;
    }

    /// Decode `status` and the union; `None` for an unknown status value.
    pub fn info(&self) -> Option<StatusInfo> {
        // domid_t occupies the low 16 bits of the first union word.
        let dom = (self.u_lo & 0xFFFF) as DomId;
        Some(match self.status {
            stat::CLOSED => StatusInfo::Closed,
            stat::UNBOUND => StatusInfo::Unbound { remote_dom: dom },
            stat::INTERDOMAIN => StatusInfo::Interdomain {
                dom,
                port: self.u_hi,
            },
            stat::PIRQ => StatusInfo::Pirq(self.u_lo),
            stat::VIRQ => StatusInfo::Virq(self.u_lo),
            stat::IPI => StatusInfo::Ipi,
            _ => return None,
        })
    }
}

/// `EVTCHNOP_alloc_unbound`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnAllocUnbound {
    pub dom: DomId,
    pub remote_dom: DomId,
    /// Out.
    pub port: EvtchnPort,
}
le_struct!(EvtchnAllocUnbound, 8; dom: u16 @ 0, remote_dom: u16 @ 2, port: u32 @ 4);

/// `EVTCHNOP_bind_ipi`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnBindIpi {
    pub vcpu: u32,
    /// Out.
    pub port: EvtchnPort,
}
le_struct!(EvtchnBindIpi, 8; vcpu: u32 @ 0, port: u32 @ 4);

/// `EVTCHNOP_bind_vcpu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnBindVcpu {
    pub port: EvtchnPort,
    pub vcpu: u32,
}
le_struct!(EvtchnBindVcpu, 8; port: u32 @ 0, vcpu: u32 @ 4);

/// `EVTCHNOP_unmask`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnUnmask {
    pub port: EvtchnPort,
}
le_struct!(EvtchnUnmask, 4; port: u32 @ 0);

/// `EVTCHNOP_reset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnReset {
    pub dom: DomId,
}
le_struct!(EvtchnReset, 2; dom: u16 @ 0);

/// `EVTCHNOP_init_control` (FIFO ABI; Bulkhead answers `-ENOSYS` so guests use 2-level).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnInitControl {
    pub control_gfn: u64,
    pub offset: u32,
    pub vcpu: u32,
    /// Out.
    pub link_bits: u8,
}
le_struct!(EvtchnInitControl, 24; control_gfn: u64 @ 0, offset: u32 @ 8, vcpu: u32 @ 12,
    link_bits: u8 @ 16);

/// `EVTCHNOP_expand_array` (FIFO).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnExpandArray {
    pub array_gfn: u64,
}
le_struct!(EvtchnExpandArray, 8; array_gfn: u64 @ 0);

/// `EVTCHNOP_set_priority` (FIFO).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvtchnSetPriority {
    pub port: EvtchnPort,
    pub priority: u32,
}
le_struct!(EvtchnSetPriority, 8; port: u32 @ 0, priority: u32 @ 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_interdomain_decodes_fields_at_xen_offsets() {
        let mut b = [0u8; 12];
        b[0..2].copy_from_slice(&7u16.to_le_bytes());
        b[2..4].copy_from_slice(&[0xAA, 0xBB]); // padding: ignored
        b[4..8].copy_from_slice(&42u32.to_le_bytes());
        let a = EvtchnBindInterdomain::from_bytes(&b).unwrap();
        assert_eq!(a.remote_dom, 7);
        assert_eq!(a.remote_port, 42);
        assert_eq!(a.local_port, 0);
        // Padding goes back out as zero.
        assert_eq!(&a.to_bytes()[2..4], &[0, 0]);
    }

    #[test]
    fn every_struct_round_trips_and_refuses_short_input() {
        fn check<T: PartialEq + core::fmt::Debug>(
            v: T,
            enc: impl Fn(&T) -> alloc::vec::Vec<u8>,
            dec: impl Fn(&[u8]) -> Option<T>,
        ) {
            let bytes = enc(&v);
            assert_eq!(dec(&bytes).as_ref(), Some(&v));
            assert_eq!(dec(&bytes[..bytes.len() - 1]), None);
        }
        check(
            EvtchnBindVirq {
                virq: 3,
                vcpu: 1,
                port: 9,
            },
            |v| v.to_bytes().to_vec(),
            EvtchnBindVirq::from_bytes,
        );
        check(
            EvtchnBindPirq {
                pirq: 5,
                flags: BIND_PIRQ_WILL_SHARE,
                port: 2,
            },
            |v| v.to_bytes().to_vec(),
            EvtchnBindPirq::from_bytes,
        );
        check(
            EvtchnClose { port: 3 },
            |v| v.to_bytes().to_vec(),
            EvtchnClose::from_bytes,
        );
        check(
            EvtchnSend { port: 3 },
            |v| v.to_bytes().to_vec(),
            EvtchnSend::from_bytes,
        );
        check(
            EvtchnAllocUnbound {
                dom: 0x7FF0,
                remote_dom: 1,
                port: 4,
            },
            |v| v.to_bytes().to_vec(),
            EvtchnAllocUnbound::from_bytes,
        );
        check(
            EvtchnBindIpi { vcpu: 2, port: 8 },
            |v| v.to_bytes().to_vec(),
            EvtchnBindIpi::from_bytes,
        );
        check(
            EvtchnBindVcpu { port: 2, vcpu: 8 },
            |v| v.to_bytes().to_vec(),
            EvtchnBindVcpu::from_bytes,
        );
        check(
            EvtchnUnmask { port: 1 },
            |v| v.to_bytes().to_vec(),
            EvtchnUnmask::from_bytes,
        );
        check(
            EvtchnReset { dom: 3 },
            |v| v.to_bytes().to_vec(),
            EvtchnReset::from_bytes,
        );
        check(
            EvtchnInitControl {
                control_gfn: 1 << 40,
                offset: 8,
                vcpu: 1,
                link_bits: 17,
            },
            |v| v.to_bytes().to_vec(),
            EvtchnInitControl::from_bytes,
        );
        check(
            EvtchnExpandArray { array_gfn: 99 },
            |v| v.to_bytes().to_vec(),
            EvtchnExpandArray::from_bytes,
        );
        check(
            EvtchnSetPriority {
                port: 1,
                priority: 7,
            },
            |v| v.to_bytes().to_vec(),
            EvtchnSetPriority::from_bytes,
        );
    }

    #[test]
    fn status_union_encodes_each_kind_at_xen_offsets() {
        let mut s = EvtchnStatus {
            dom: 1,
            port: 5,
            ..Default::default()
        };
        s.set_info(StatusInfo::Interdomain { dom: 3, port: 77 });
        let b = s.to_bytes();
        assert_eq!(
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            stat::INTERDOMAIN
        );
        assert_eq!(u16::from_le_bytes(b[16..18].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 77);
        let back = EvtchnStatus::from_bytes(&b).unwrap();
        assert_eq!(
            back.info(),
            Some(StatusInfo::Interdomain { dom: 3, port: 77 })
        );
        for info in [
            StatusInfo::Closed,
            StatusInfo::Unbound { remote_dom: 9 },
            StatusInfo::Pirq(4),
            StatusInfo::Virq(3),
            StatusInfo::Ipi,
        ] {
            s.set_info(info);
            assert_eq!(
                EvtchnStatus::from_bytes(&s.to_bytes()).unwrap().info(),
                Some(info)
            );
        }
        s.status = 6;
        assert_eq!(s.info(), None);
    }

    #[test]
    fn virq_classes_match_xen() {
        use virq::{VirqKind, kind};
        assert_eq!(kind(virq::TIMER), VirqKind::PerVcpu);
        assert_eq!(kind(virq::DEBUG), VirqKind::PerVcpu);
        assert_eq!(kind(virq::XENOPROF), VirqKind::PerVcpu);
        assert_eq!(kind(virq::XENPMU), VirqKind::PerVcpu);
        assert_eq!(kind(virq::ARGO), VirqKind::PerDomain);
        assert_eq!(kind(virq::DOM_EXC), VirqKind::Global);
        assert_eq!(kind(virq::MCA), VirqKind::Global);
        assert_eq!(virq::MCA, 16);
    }
}
