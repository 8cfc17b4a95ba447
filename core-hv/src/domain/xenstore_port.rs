//! Each domain's xenstore event channel, set up by the builder.
//!
//! When a domain is built while a domain holding `XENSTORE_SERVICE` is alive, the builder
//! allocates a port in the new domain, unbound and offered to that service domain, and
//! writes it into the new domain's start info (`xenstore_evtchn`), next to the ring page
//! that grant ref 1 already offers the same domain. The service domain finds the pair through
//! `domctl XENSTORE_DOMAINS` and binds it with `bind_interdomain`; the offer is the consent,
//! as for any unbound port. A config that names a port already (`xenstore_evtchn` ≠ 0), a
//! domain without event channels, or a system without a xenstore domain keeps 0.

use core::mem::offset_of;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::start_info::StartInfo;

use super::hypervisor::{Hypervisor, Platform};
use super::memory::Mfn;
use crate::evtchn::DomainEvtchn;
use crate::policy::SharingPolicy;

impl Hypervisor {
    /// Offer a port of the domain being built (`evtchn`, its start info at `start_info`) to
    /// the xenstore service domain; the port, or `None` if none was offered (a full port
    /// table is not a build failure: the domain just has no xenstore channel).
    pub(super) fn offer_xenstore_port<S: crate::evtchn::EventWords>(
        &self,
        p: &mut Platform<'_>,
        cfg_port: u32,
        evtchn: Option<&spin::Mutex<DomainEvtchn<S>>>,
        start_info: Mfn,
    ) -> Option<u32> {
        if cfg_port != 0 {
            return None;
        }
        let server: DomId = self
            .domains
            .iter()
            .find(|d| d.state().is_alive() && d.caps.contains(Capabilities::XENSTORE_SERVICE))
            .map(|d| d.id)?;
        let domains = &self.domains;
        let policy = SharingPolicy {
            caps: move |d: DomId| domains.get(d).map(|x| x.caps).unwrap_or_default(),
        };
        let port = evtchn?.lock().alloc_unbound(server, &policy).ok()?;
        p.phys.write(
            start_info,
            offset_of!(StartInfo, xenstore_evtchn),
            &port.to_le_bytes(),
        );
        Some(port)
    }
}
