//! Tests of the event-channel operations, their error paths, and a property test of random
//! operation sequences over three domains against a model.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;

use proptest::prelude::*;
use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::event_channel::{StatusInfo, virq};
use spin::Mutex;

use super::*;

type Words = Arc<SharedInfoPage>;

struct Registry {
    doms: BTreeMap<DomId, Mutex<DomainEvtchn<Words>>>,
    pages: BTreeMap<DomId, Words>,
}

impl EvtchnRegistry for Registry {
    type Words = Words;
    fn evtchn(&self, dom: DomId) -> Option<&Mutex<DomainEvtchn<Words>>> {
        self.doms.get(&dom)
    }
}

impl Registry {
    fn new(doms: &[(DomId, u32, u32)]) -> Self {
        let mut r = Registry {
            doms: BTreeMap::new(),
            pages: BTreeMap::new(),
        };
        for &(id, vcpus, ports) in doms {
            let page: Words = Arc::from(SharedInfoPage::new_boxed());
            r.pages.insert(id, page.clone());
            r.doms.insert(
                id,
                Mutex::new(DomainEvtchn::new(id, vcpus, ports, page).unwrap()),
            );
        }
        r
    }

    fn dom(&self, id: DomId) -> spin::MutexGuard<'_, DomainEvtchn<Words>> {
        self.doms[&id].lock()
    }

    fn page(&self, id: DomId) -> &SharedInfoPage {
        &self.pages[&id]
    }
}

/// Denies everything, to reach every `EPERM` path.
struct DenyAll;
impl EvtchnPolicy for DenyAll {
    fn may_alloc_unbound(&self, _: DomId, _: DomId) -> bool {
        false
    }
    fn may_bind_interdomain(&self, _: DomId, _: DomId) -> bool {
        false
    }
    fn may_send(&self, _: DomId, _: DomId) -> bool {
        false
    }
    fn may_bind_virq(&self, _: DomId, _: u32) -> bool {
        false
    }
}

fn two() -> Registry {
    Registry::new(&[(1, 2, 64), (2, 1, 64)])
}

#[test]
fn frontend_backend_connect_send_both_ways_and_kick() {
    let reg = two();
    // Frontend (dom 1) offers a port to the backend (dom 2); the backend binds it.
    let fport = reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    assert_eq!(fport, 1);
    let (bport, d) = bind_interdomain(&reg, 2, 1, fport, &AllowAll).unwrap();
    assert_eq!(bport, 1);
    // Binding marks the new local port pending (vCPU 0 of the backend gets an upcall).
    assert_eq!(d.kick, Some(0));
    assert_eq!(reg.page(2).guest_take_events(0), alloc::vec![bport]);
    assert_eq!(
        reg.dom(1).status(fport).unwrap(),
        (
            StatusInfo::Interdomain {
                dom: 2,
                port: bport
            },
            0
        )
    );
    // Backend → frontend.
    let sent = send(&reg, 2, bport, &AllowAll).unwrap().unwrap();
    assert_eq!(
        (sent.dom, sent.port, sent.delivery.kick),
        (1, fport, Some(0))
    );
    // Frontend moves its port to vCPU 1; the next event kicks vCPU 1.
    reg.dom(1).bind_vcpu(fport, 1).unwrap();
    reg.page(1).guest_take_events(0);
    let sent = send(&reg, 2, bport, &AllowAll).unwrap().unwrap();
    assert_eq!(sent.delivery.kick, Some(1));
    // Frontend → backend.
    let sent = send(&reg, 1, fport, &AllowAll).unwrap().unwrap();
    assert_eq!((sent.dom, sent.port), (2, bport));
    assert!(sent.delivery.newly_pending);
}

#[test]
fn close_reverts_peer_to_unbound_and_it_can_be_rebound() {
    let reg = two();
    let fport = reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    let (bport, _) = bind_interdomain(&reg, 2, 1, fport, &AllowAll).unwrap();
    close(&reg, 2, bport).unwrap();
    assert_eq!(
        reg.dom(1).status(fport).unwrap().0,
        StatusInfo::Unbound { remote_dom: 2 }
    );
    assert_eq!(reg.dom(2).status(bport).unwrap().0, StatusInfo::Closed);
    // Sending on the now-unbound frontend port is silently dropped.
    assert_eq!(send(&reg, 1, fport, &AllowAll), Ok(None));
    // A restarted backend binds again.
    let (again, _) = bind_interdomain(&reg, 2, 1, fport, &AllowAll).unwrap();
    assert_eq!(again, bport);
}

#[test]
fn close_clears_pending_bit() {
    let reg = two();
    let ipi = reg.dom(1).bind_ipi(0).unwrap();
    send(&reg, 1, ipi, &AllowAll).unwrap();
    assert!(reg.page(1).test_pending(ipi));
    close(&reg, 1, ipi).unwrap();
    assert!(!reg.page(1).test_pending(ipi));
}

#[test]
fn loopback_channel_within_one_domain() {
    let reg = two();
    let a = reg.dom(1).alloc_unbound(1, &AllowAll).unwrap();
    let (b, _) = bind_interdomain(&reg, 1, 1, a, &AllowAll).unwrap();
    assert_ne!(a, b);
    let sent = send(&reg, 1, a, &AllowAll).unwrap().unwrap();
    assert_eq!((sent.dom, sent.port), (1, b));
    close(&reg, 1, a).unwrap();
    assert_eq!(
        reg.dom(1).status(b).unwrap().0,
        StatusInfo::Unbound { remote_dom: 1 }
    );
}

#[test]
fn bind_interdomain_error_paths() {
    let reg = Registry::new(&[(1, 1, 64), (2, 1, 2), (3, 1, 64)]);
    let offered_to_3 = reg.dom(1).alloc_unbound(3, &AllowAll).unwrap();
    let offered_to_2 = reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    // No such remote domain.
    assert_eq!(
        bind_interdomain(&reg, 2, 9, 1, &AllowAll),
        Err(XenError::ESRCH)
    );
    // Port offered to someone else, invalid, reserved, or free.
    assert_eq!(
        bind_interdomain(&reg, 2, 1, offered_to_3, &AllowAll),
        Err(XenError::EINVAL)
    );
    for bad in [0, 5000, 60] {
        assert_eq!(
            bind_interdomain(&reg, 2, 1, bad, &AllowAll),
            Err(XenError::EINVAL)
        );
    }
    // Policy.
    assert_eq!(
        bind_interdomain(&reg, 2, 1, offered_to_2, &DenyAll),
        Err(XenError::EPERM)
    );
    // Local quota (2 ports: 0 reserved + 1) is checked first, as Xen does.
    bind_interdomain(&reg, 2, 1, offered_to_2, &AllowAll).unwrap();
    assert_eq!(
        bind_interdomain(&reg, 2, 1, offered_to_3, &AllowAll),
        Err(XenError::ENOSPC)
    );
    // An already-connected port cannot be bound twice.
    assert_eq!(
        bind_interdomain(&reg, 3, 1, offered_to_2, &AllowAll),
        Err(XenError::EINVAL)
    );
}

#[test]
fn alloc_unbound_errors() {
    let reg = Registry::new(&[(1, 1, 3)]);
    assert_eq!(reg.dom(1).alloc_unbound(2, &DenyAll), Err(XenError::EPERM));
    reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    assert_eq!(
        reg.dom(1).alloc_unbound(2, &AllowAll),
        Err(XenError::ENOSPC)
    );
}

#[test]
fn bind_virq_rules_and_errors() {
    let reg = Registry::new(&[(1, 2, 4)]);
    let mut d = reg.dom(1);
    assert_eq!(
        d.bind_virq(virq::NR_VIRQS, 0, &AllowAll),
        Err(XenError::EINVAL)
    );
    // Global and per-domain VIRQs only on vCPU 0.
    assert_eq!(
        d.bind_virq(virq::DOM_EXC, 1, &AllowAll),
        Err(XenError::EINVAL)
    );
    assert_eq!(d.bind_virq(virq::ARGO, 1, &AllowAll), Err(XenError::EINVAL));
    assert_eq!(
        d.bind_virq(virq::TIMER, 2, &AllowAll),
        Err(XenError::ENOENT)
    );
    assert_eq!(
        d.bind_virq(virq::DOM_EXC, 0, &DenyAll),
        Err(XenError::EPERM)
    );
    let t1 = d.bind_virq(virq::TIMER, 1, &AllowAll).unwrap();
    assert_eq!(
        d.bind_virq(virq::TIMER, 1, &AllowAll),
        Err(XenError::EEXIST)
    );
    let t0 = d.bind_virq(virq::TIMER, 0, &AllowAll).unwrap();
    let exc = d.bind_virq(virq::DOM_EXC, 0, &AllowAll).unwrap();
    assert_eq!(
        d.bind_virq(virq::DEBUG, 0, &AllowAll),
        Err(XenError::ENOSPC)
    );
    assert_eq!(d.status(t1).unwrap(), (StatusInfo::Virq(virq::TIMER), 1));
    // Raising: per-vCPU TIMER goes to the vCPU it was bound on.
    assert_eq!(d.raise_virq(virq::TIMER, 1).unwrap().kick, Some(1));
    assert_eq!(d.raise_virq(virq::TIMER, 0).unwrap().kick, Some(0));
    assert!(d.raise_virq(virq::DEBUG, 0).is_none());
    // Sending on a VIRQ port is refused; a global VIRQ may move vCPU, a per-vCPU one not.
    drop(d);
    assert_eq!(send(&reg, 1, t0, &AllowAll), Err(XenError::EINVAL));
    let mut d = reg.dom(1);
    assert_eq!(d.bind_vcpu(t0, 1), Err(XenError::EINVAL));
    d.bind_vcpu(exc, 1).unwrap();
    assert_eq!(d.status(exc).unwrap().1, 1);
    // Closing frees the VIRQ for binding again.
    drop(d);
    close(&reg, 1, t1).unwrap();
    assert_eq!(reg.dom(1).bind_virq(virq::TIMER, 1, &AllowAll), Ok(t1));
}

#[test]
fn bind_ipi_and_send_raise_own_vcpu() {
    let reg = Registry::new(&[(1, 2, 64)]);
    assert_eq!(reg.dom(1).bind_ipi(2), Err(XenError::ENOENT));
    let p = reg.dom(1).bind_ipi(1).unwrap();
    assert_eq!(reg.dom(1).status(p).unwrap(), (StatusInfo::Ipi, 1));
    let s = send(&reg, 1, p, &AllowAll).unwrap().unwrap();
    assert_eq!((s.dom, s.port, s.delivery.kick), (1, p, Some(1)));
    assert_eq!(reg.dom(1).bind_vcpu(p, 0), Err(XenError::EINVAL));
}

#[test]
fn send_close_status_unmask_refuse_bad_ports() {
    let reg = two();
    for port in [0u32, 63, 64, 10_000, u32::MAX] {
        assert_eq!(
            send(&reg, 1, port, &AllowAll),
            Err(XenError::EINVAL),
            "send {port}"
        );
        assert_eq!(close(&reg, 1, port), Err(XenError::EINVAL), "close {port}");
    }
    // Status of a free or reserved but valid port is "closed"; beyond the table EINVAL.
    assert_eq!(reg.dom(1).status(0).unwrap().0, StatusInfo::Closed);
    assert_eq!(reg.dom(1).status(63).unwrap().0, StatusInfo::Closed);
    assert_eq!(reg.dom(1).status(64), Err(XenError::EINVAL));
    assert_eq!(reg.dom(1).unmask(64), Err(XenError::EINVAL));
    assert_eq!(reg.dom(1).bind_vcpu(64, 0), Err(XenError::EINVAL));
    assert_eq!(reg.dom(1).bind_vcpu(1, 5), Err(XenError::ENOENT));
    assert_eq!(reg.dom(1).bind_vcpu(1, 0), Err(XenError::EINVAL)); // free port
    assert_eq!(send(&reg, 7, 1, &AllowAll), Err(XenError::ESRCH));
}

#[test]
fn send_policy_refusal_is_eperm() {
    let reg = two();
    let f = reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    let (b, _) = bind_interdomain(&reg, 2, 1, f, &AllowAll).unwrap();
    assert_eq!(send(&reg, 2, b, &DenyAll), Err(XenError::EPERM));
}

#[test]
fn masked_event_is_delivered_on_unmask() {
    let reg = two();
    let f = reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    let (b, _) = bind_interdomain(&reg, 2, 1, f, &AllowAll).unwrap();
    reg.page(1).guest_mask(f);
    let s = send(&reg, 2, b, &AllowAll).unwrap().unwrap();
    assert!(s.delivery.newly_pending && s.delivery.kick.is_none());
    assert_eq!(reg.dom(1).unmask(f), Ok(Some(0)));
    assert_eq!(reg.page(1).guest_take_events(0), alloc::vec![f]);
}

#[test]
fn reset_closes_everything_and_peers_revert() {
    let reg = two();
    let f = reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    let (b, _) = bind_interdomain(&reg, 2, 1, f, &AllowAll).unwrap();
    reg.dom(2).bind_ipi(0).unwrap();
    reg.dom(2).bind_virq(virq::TIMER, 0, &AllowAll).unwrap();
    reset(&reg, 2).unwrap();
    assert_eq!(reg.dom(2).table().ports_in_use().count(), 0);
    assert_eq!(
        reg.dom(1).status(f).unwrap().0,
        StatusInfo::Unbound { remote_dom: 2 }
    );
    assert_eq!(reg.dom(2).status(b).unwrap().0, StatusInfo::Closed);
    assert_eq!(reset(&reg, 9), Err(XenError::ESRCH));
}

#[test]
fn ops_report_need_peer_without_changing_state() {
    let reg = two();
    let f = reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    let mut d2 = reg.dom(2);
    assert_eq!(
        d2.bind_interdomain(None, 1, f, &AllowAll),
        Ok(Step::NeedPeer(1))
    );
    assert_eq!(d2.table().ports_in_use().count(), 0);
}

#[test]
fn lock_pair_takes_lower_domid_first_from_both_sides_without_deadlock() {
    let reg = Arc::new(two());
    let f = reg.dom(1).alloc_unbound(2, &AllowAll).unwrap();
    let (b, _) = bind_interdomain(&*reg, 2, 1, f, &AllowAll).unwrap();
    let r2 = reg.clone();
    let t = std::thread::spawn(move || {
        for _ in 0..2000 {
            send(&*r2, 2, b, &AllowAll).unwrap();
        }
    });
    for _ in 0..2000 {
        send(&*reg, 1, f, &AllowAll).unwrap();
    }
    t.join().unwrap();
}

// ---- property test against a model ----

#[derive(Clone, Copy, Debug)]
enum Op {
    AllocUnbound { dom: u8, remote: u8 },
    BindInterdomain { dom: u8, remote: u8, port: u32 },
    BindVirq { dom: u8, virq: u32, vcpu: u32 },
    BindIpi { dom: u8, vcpu: u32 },
    Close { dom: u8, port: u32 },
    Send { dom: u8, port: u32 },
    BindVcpu { dom: u8, port: u32, vcpu: u32 },
    Reset { dom: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    let dom = 1u8..4;
    let port = 0u32..10;
    prop_oneof![
        (dom.clone(), 1u8..4).prop_map(|(dom, remote)| Op::AllocUnbound { dom, remote }),
        (dom.clone(), 1u8..4, port.clone()).prop_map(|(dom, remote, port)| Op::BindInterdomain {
            dom,
            remote,
            port
        }),
        (dom.clone(), 0u32..5, 0u32..3).prop_map(|(dom, virq, vcpu)| Op::BindVirq {
            dom,
            virq,
            vcpu
        }),
        (dom.clone(), 0u32..3).prop_map(|(dom, vcpu)| Op::BindIpi { dom, vcpu }),
        (dom.clone(), port.clone()).prop_map(|(dom, port)| Op::Close { dom, port }),
        (dom.clone(), port.clone()).prop_map(|(dom, port)| Op::Send { dom, port }),
        (dom.clone(), port, 0u32..3).prop_map(|(dom, port, vcpu)| Op::BindVcpu { dom, port, vcpu }),
        dom.prop_map(|dom| Op::Reset { dom }),
    ]
}

/// The model: each domain's ports as a plain map, with the rules restated simply.
#[derive(Clone, Debug, Default)]
struct Model {
    /// (dom, port) -> state; absent = free.
    ports: BTreeMap<(DomId, u32), PortState>,
}

const QUOTA: u32 = 6;
const VCPUS: u32 = 2;

impl Model {
    fn free_port(&self, dom: DomId) -> Option<u32> {
        (1..QUOTA).find(|p| !self.ports.contains_key(&(dom, *p)))
    }

    fn apply(&mut self, op: Op) -> Result<(), XenError> {
        match op {
            Op::AllocUnbound { dom, remote } => {
                let p = self.free_port(dom.into()).ok_or(XenError::ENOSPC)?;
                self.ports.insert(
                    (dom.into(), p),
                    PortState::Unbound {
                        remote: remote.into(),
                    },
                );
            }
            Op::BindInterdomain { dom, remote, port } => {
                let (dom, remote): (DomId, DomId) = (dom.into(), remote.into());
                let lp = self.free_port(dom).ok_or(XenError::ENOSPC)?;
                if self.ports.get(&(remote, port)) != Some(&PortState::Unbound { remote: dom }) {
                    return Err(XenError::EINVAL);
                }
                self.ports.insert(
                    (dom, lp),
                    PortState::Interdomain {
                        remote_dom: remote,
                        remote_port: port,
                    },
                );
                self.ports.insert(
                    (remote, port),
                    PortState::Interdomain {
                        remote_dom: dom,
                        remote_port: lp,
                    },
                );
            }
            Op::BindVirq { dom, virq: v, vcpu } => {
                let dom: DomId = dom.into();
                if virq::kind(v) != virq::VirqKind::PerVcpu && vcpu != 0 {
                    return Err(XenError::EINVAL);
                }
                if vcpu >= VCPUS {
                    return Err(XenError::ENOENT);
                }
                let bound = self
                    .ports
                    .iter()
                    .any(|(&(d, _), s)| d == dom && *s == PortState::Virq { virq: v, vcpu });
                if bound {
                    return Err(XenError::EEXIST);
                }
                let p = self.free_port(dom).ok_or(XenError::ENOSPC)?;
                self.ports
                    .insert((dom, p), PortState::Virq { virq: v, vcpu });
            }
            Op::BindIpi { dom, vcpu } => {
                if vcpu >= VCPUS {
                    return Err(XenError::ENOENT);
                }
                let p = self.free_port(dom.into()).ok_or(XenError::ENOSPC)?;
                self.ports.insert((dom.into(), p), PortState::Ipi { vcpu });
            }
            Op::Close { dom, port } => self.close(dom.into(), port)?,
            Op::Send { dom, port } => match self.ports.get(&(dom.into(), port)) {
                Some(
                    PortState::Interdomain { .. }
                    | PortState::Ipi { .. }
                    | PortState::Unbound { .. },
                ) => {}
                _ => return Err(XenError::EINVAL),
            },
            Op::BindVcpu { dom, port, vcpu } => {
                if vcpu >= VCPUS {
                    return Err(XenError::ENOENT);
                }
                if port >= 64 {
                    return Err(XenError::EINVAL);
                }
                match self.ports.get(&(dom.into(), port)) {
                    Some(PortState::Unbound { .. } | PortState::Interdomain { .. }) => {}
                    Some(PortState::Virq { virq: v, .. })
                        if virq::kind(*v) != virq::VirqKind::PerVcpu => {}
                    _ => return Err(XenError::EINVAL),
                }
            }
            Op::Reset { dom } => {
                let dom: DomId = dom.into();
                let mine: Vec<u32> = self
                    .ports
                    .keys()
                    .filter(|(d, _)| *d == dom)
                    .map(|(_, p)| *p)
                    .collect();
                for p in mine {
                    let _ = self.close(dom, p);
                }
            }
        }
        Ok(())
    }

    fn close(&mut self, dom: DomId, port: u32) -> Result<(), XenError> {
        let st = self.ports.remove(&(dom, port)).ok_or(XenError::EINVAL)?;
        if let PortState::Interdomain {
            remote_dom,
            remote_port,
        } = st
        {
            self.ports.insert(
                (remote_dom, remote_port),
                PortState::Unbound { remote: dom },
            );
        }
        Ok(())
    }
}

fn run_op(reg: &Registry, op: Op) -> Result<(), XenError> {
    match op {
        Op::AllocUnbound { dom, remote } => reg
            .dom(dom.into())
            .alloc_unbound(remote.into(), &AllowAll)
            .map(drop),
        Op::BindInterdomain { dom, remote, port } => {
            bind_interdomain(reg, dom.into(), remote.into(), port, &AllowAll).map(drop)
        }
        Op::BindVirq { dom, virq, vcpu } => reg
            .dom(dom.into())
            .bind_virq(virq, vcpu, &AllowAll)
            .map(drop),
        Op::BindIpi { dom, vcpu } => reg.dom(dom.into()).bind_ipi(vcpu).map(drop),
        Op::Close { dom, port } => close(reg, dom.into(), port),
        Op::Send { dom, port } => send(reg, dom.into(), port, &AllowAll).map(drop),
        Op::BindVcpu { dom, port, vcpu } => reg.dom(dom.into()).bind_vcpu(port, vcpu),
        Op::Reset { dom } => reset(reg, dom.into()),
    }
}

proptest! {
    #[test]
    fn evtchn_ops_match_model_and_keep_cross_domain_invariants(
        ops in prop::collection::vec(op(), 1..120)
    ) {
        let reg = Registry::new(&[(1, VCPUS, QUOTA), (2, VCPUS, QUOTA), (3, VCPUS, QUOTA)]);
        let mut model = Model::default();
        for op in ops {
            let got = run_op(&reg, op);
            let want = model.apply(op);
            // Ports ≥ the quota are invalid in the table: the model says EINVAL for them too
            // (close/send of an absent port), so results compare directly.
            prop_assert_eq!(got, want, "op {:?}", op);
            for dom in 1..4u16 {
                let d = reg.dom(dom);
                let table = d.table();
                prop_assert_eq!(table.get(0).unwrap().state, PortState::Reserved);
                prop_assert!(table.valid_ports() <= QUOTA);
                for p in 1..table.valid_ports() {
                    let st = table.get(p).unwrap().state;
                    let want = model.ports.get(&(dom, p)).copied().unwrap_or(PortState::Free);
                    prop_assert_eq!(st, want, "dom {} port {}", dom, p);
                    if st == PortState::Free {
                        prop_assert!(!reg.page(dom).test_pending(p), "free port left pending");
                    }
                }
            }
            // Symmetry: both ends of every interdomain channel name each other.
            for (&(dom, port), st) in &model.ports {
                if let PortState::Interdomain { remote_dom, remote_port } = *st {
                    prop_assert_eq!(
                        model.ports.get(&(remote_dom, remote_port)),
                        Some(&PortState::Interdomain { remote_dom: dom, remote_port: port })
                    );
                }
            }
        }
    }
}
