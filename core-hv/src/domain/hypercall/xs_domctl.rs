//! `domctl` `XENSTORE_DOMAINS` (Bulkhead): how a xenstore service domain learns whom it
//! serves. Each record names a domain, its lifecycle state and the unbound port the builder
//! offered the xenstore domain for that domain's ring (read back from the domain's start-info
//! page, which only the hypervisor writes). The service domain then binds the port with
//! `bind_interdomain` and maps the ring through the domain's reserved grant ref 1, both
//! checked by their own policy hooks; this call only tells, it grants nothing.
//!
//! Needs `XENSTORE_SERVICE`, asked before any domain is looked at.

use alloc::vec::Vec;

use shared_abi::errno::XenError;
use shared_abi::hypercall_args::Wire;
use shared_abi::hypercall_args::domctl::{ListDomains, XenstoreDomain};
use shared_abi::start_info::StartInfo;

use super::{Call, HcResult};
use crate::policy;

/// Most records one call returns.
const MAX_RECORDS: u32 = 256;

impl Call<'_, '_> {
    /// `payload` is the domctl's union (after the 16-byte header).
    pub(super) fn xenstore_domains(&mut self, payload: &[u8]) -> HcResult {
        let token = policy::xenstore_service(self.caller())?;
        let l = ListDomains::decode(payload).ok_or(XenError::EFAULT)?;
        let max = l.max_domains.min(MAX_RECORDS) as usize;
        let mut recs: Vec<XenstoreDomain> = Vec::new();
        for id in self.hv.domains.ids() {
            if recs.len() >= max {
                break;
            }
            if id < l.first_domain || id == token.caller() {
                continue;
            }
            let Some(d) = self.hv.domains.get(id) else {
                continue;
            };
            let mut port = [0u8; 4];
            self.p.phys.read(
                d.start_info,
                core::mem::offset_of!(StartInfo, xenstore_evtchn),
                &mut port,
            );
            recs.push(XenstoreDomain {
                domid: id,
                state: d.state().code(),
                port: u32::from_le_bytes(port),
                ..XenstoreDomain::default()
            });
        }
        for (i, r) in recs.iter().enumerate() {
            let at = (i as u64)
                .checked_mul(XenstoreDomain::SIZE as u64)
                .and_then(|o| l.buffer.checked_add(o))
                .ok_or(XenError::EFAULT)?;
            self.write(at, r)?;
        }
        Ok(recs.len() as i64)
    }
}

#[cfg(test)]
mod tests {
    use alloc::string::String;

    use shared_abi::DomId;
    use shared_abi::capability::Capabilities;
    use shared_abi::errno::XenError;
    use shared_abi::event_channel::{EvtchnBindInterdomain, op as eop};
    use shared_abi::hypercall as hc;
    use shared_abi::hypercall_args::Wire;
    use shared_abi::hypercall_args::domctl::{
        self as dc, DomctlHeader, ListDomains, XenstoreDomain, state,
    };
    use shared_abi::start_info::{HEAP_BASE, START_INFO_SIZE, StartInfo};

    use crate::domain::builder::DomainConfig;
    use crate::domain::elf::testelf;
    use crate::domain::fake::Env;
    use crate::domain::guest_memory::GuestMemory;
    use crate::domain::hypervisor::{HvConfig, Hypervisor};
    use crate::domain::memory::PhysMem;
    use crate::evtchn::PortState;

    const ARG: u64 = HEAP_BASE;
    const OUT: u64 = HEAP_BASE + 0x1000;

    fn cfg(name: &str, caps: Capabilities) -> DomainConfig {
        DomainConfig {
            name: name.into(),
            memory_kib: 1024,
            vcpus: 1,
            weight: 256,
            cap_percent: 0,
            capabilities: caps,
            cmdline: String::new(),
            devices: alloc::vec::Vec::new(),
            console_evtchn: 0,
            xenstore_evtchn: 0,
            stack_pages: 4,
        }
    }

    /// Domain 1 "plain" (built before any xenstore domain), 2 "xs" (the xenstore domain),
    /// 3 "a" and 4 "b" (built after it), each on its own CPU.
    fn system() -> (Env, Hypervisor) {
        let mut env = Env::new(4096);
        let mut hv = Hypervisor::new(4, HvConfig::default(), 0);
        let elf = testelf::good();
        for (n, caps) in [
            ("plain", Capabilities::empty()),
            (
                "xs",
                Capabilities::XENSTORE_SERVICE
                    | Capabilities::GRANT_MAP
                    | Capabilities::DOMAIN_DEATH_EVENTS,
            ),
            ("a", Capabilities::empty()),
            ("b", Capabilities::empty()),
        ] {
            hv.build_domain(&mut env.platform(), &cfg(n, caps), &elf)
                .unwrap();
        }
        for cpu in 0..4 {
            hv.schedule(&mut env.platform(), cpu);
        }
        (env, hv)
    }

    fn start_info(env: &Env, hv: &Hypervisor, dom: DomId) -> StartInfo {
        let mut b = alloc::vec![0u8; START_INFO_SIZE];
        env.phys
            .read(hv.domains.get(dom).unwrap().start_info, 0, &mut b);
        StartInfo::decode(&b).unwrap()
    }

    fn call(env: &mut Env, hv: &mut Hypervisor, dom: DomId, nr: u64, args: [u64; 5]) -> i64 {
        let cpu = (0..4)
            .find(|&c| {
                hv.sched
                    .current(c)
                    .and_then(|v| hv.sched.owner(v))
                    .is_some_and(|(d, _)| d == dom)
            })
            .unwrap();
        hv.hypercall(&mut env.platform(), cpu, nr, args).ret
    }

    fn put(env: &Env, hv: &Hypervisor, dom: DomId, va: u64, b: &[u8]) {
        let a = hv.domains.get(dom).unwrap().aspace.as_deref().unwrap();
        GuestMemory::new(a, &env.phys).copy_to_guest(va, b).unwrap();
    }

    fn get(env: &Env, hv: &Hypervisor, dom: DomId, va: u64, len: usize) -> alloc::vec::Vec<u8> {
        let a = hv.domains.get(dom).unwrap().aspace.as_deref().unwrap();
        let mut b = alloc::vec![0u8; len];
        GuestMemory::new(a, &env.phys)
            .copy_from_guest(va, &mut b)
            .unwrap();
        b
    }

    /// `XENSTORE_DOMAINS` from `dom`: the result and the records written.
    fn list(
        env: &mut Env,
        hv: &mut Hypervisor,
        dom: DomId,
        first: DomId,
        max: u32,
    ) -> (i64, alloc::vec::Vec<XenstoreDomain>) {
        let mut b = [0u8; dc::DOMCTL_LEN];
        DomctlHeader {
            cmd: dc::XENSTORE_DOMAINS,
            interface_version: dc::INTERFACE_VERSION,
            domain: 0,
            pad: [0; 3],
        }
        .encode(&mut b);
        ListDomains {
            first_domain: first,
            pad: 0,
            max_domains: max,
            buffer: OUT,
        }
        .encode(&mut b[16..]);
        put(env, hv, dom, ARG, &b);
        let r = call(env, hv, dom, hc::DOMCTL, [ARG, 0, 0, 0, 0]);
        let n = r.max(0) as usize;
        let raw = get(env, hv, dom, OUT, n * XenstoreDomain::SIZE);
        let recs = raw
            .chunks(XenstoreDomain::SIZE)
            .map(|c| XenstoreDomain::decode(c).unwrap())
            .collect();
        (r, recs)
    }

    #[test]
    fn domains_built_after_the_xenstore_domain_offer_it_a_port_in_their_start_info() {
        let (env, hv) = system();
        assert_eq!(start_info(&env, &hv, 1).xenstore_evtchn, 0);
        assert_eq!(start_info(&env, &hv, 2).xenstore_evtchn, 0);
        for dom in [3, 4] {
            let port = start_info(&env, &hv, dom).xenstore_evtchn;
            assert_ne!(port, 0);
            let ev = hv.domains.get(dom).unwrap().evtchn.as_ref().unwrap().lock();
            assert_eq!(
                ev.table().get(port).map(|c| c.state),
                Some(PortState::Unbound { remote: 2 })
            );
        }
    }

    #[test]
    fn xenstore_domains_lists_everyone_else_with_their_ports_and_the_port_binds() {
        let (mut env, mut hv) = system();
        let (n, recs) = list(&mut env, &mut hv, 2, 0, 16);
        assert_eq!(n, 3);
        let ids: alloc::vec::Vec<DomId> = recs.iter().map(|r| r.domid).collect();
        assert_eq!(ids, [1, 3, 4]);
        assert!(recs.iter().all(|r| r.state == state::RUNNING));
        assert_eq!(recs[0].port, 0);
        let pa = start_info(&env, &hv, 3).xenstore_evtchn;
        assert_eq!(recs[1].port, pa);
        // The first record and the cap are honoured.
        let (n, recs) = list(&mut env, &mut hv, 2, 4, 16);
        assert_eq!((n, recs[0].domid), (1, 4));
        let (n, _) = list(&mut env, &mut hv, 2, 0, 1);
        assert_eq!(n, 1);
        // The xenstore domain binds the offered port.
        let b = EvtchnBindInterdomain {
            remote_dom: 3,
            remote_port: pa,
            local_port: 0,
        }
        .to_bytes();
        put(&env, &hv, 2, ARG, &b);
        let r = call(
            &mut env,
            &mut hv,
            2,
            hc::EVENT_CHANNEL_OP,
            [u64::from(eop::BIND_INTERDOMAIN), ARG, 0, 0, 0],
        );
        assert_eq!(r, 0);
    }

    #[test]
    fn xenstore_domains_needs_the_xenstore_service_capability() {
        let (mut env, mut hv) = system();
        let (r, _) = list(&mut env, &mut hv, 3, 0, 16);
        assert_eq!(r, XenError::EPERM.as_ret());
    }

    #[test]
    fn xenstore_domains_with_a_bad_buffer_is_efault() {
        let (mut env, mut hv) = system();
        let mut b = [0u8; dc::DOMCTL_LEN];
        DomctlHeader {
            cmd: dc::XENSTORE_DOMAINS,
            interface_version: dc::INTERFACE_VERSION,
            domain: 0,
            pad: [0; 3],
        }
        .encode(&mut b);
        ListDomains {
            first_domain: 0,
            pad: 0,
            max_domains: 16,
            buffer: u64::MAX - 8,
        }
        .encode(&mut b[16..]);
        put(&env, &hv, 2, ARG, &b);
        let r = call(&mut env, &mut hv, 2, hc::DOMCTL, [ARG, 0, 0, 0, 0]);
        assert_eq!(r, XenError::EFAULT.as_ret());
    }
}
