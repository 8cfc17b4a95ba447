//! The policy module: every privileged operation asks here, never compiled out.
//!
//! Rights are the [`Capabilities`] the manifest (or the toolstack) gave a domain; there is no
//! privileged domain. Authority is a type: an operation on another domain takes a token
//! ([`ControlToken`], [`RemoteShutdownToken`]) whose fields are private to this module, so
//! the only way to hold one is to have been granted it here, for that caller and that
//! target. A refusal is `-EPERM`, as Xen's XSM answers.
//!
//! Checks come before any lookup of the target, so a domain without the right cannot learn
//! which domain ids exist (Xen looks the domain up first and may answer `-ESRCH`; the answer
//! to a permitted caller is the same as Xen's).

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::errno::XenError;

/// Who is asking: the calling domain and the rights it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub domid: DomId,
    pub caps: Capabilities,
}

/// Authority to inspect and control `target` (domctl: info, pause, unpause, destroy,
/// scheduler parameters; foreign reservation queries and changes).
#[derive(Debug, PartialEq, Eq)]
pub struct ControlToken {
    caller: DomId,
    target: DomId,
}

impl ControlToken {
    pub fn caller(&self) -> DomId {
        self.caller
    }
    pub fn target(&self) -> DomId {
        self.target
    }
}

/// Authority to shut `target` down (`SCHEDOP_remote_shutdown`).
#[derive(Debug, PartialEq, Eq)]
pub struct RemoteShutdownToken {
    target: DomId,
}

impl RemoteShutdownToken {
    pub fn target(&self) -> DomId {
        self.target
    }
}

/// Authority to enumerate every domain (`LIST_DOMAINS`).
#[derive(Debug, PartialEq, Eq)]
pub struct ListToken {
    _private: (),
}

/// May `caller` control `target`? Needs `DOMAIN_CONTROL`. A domain always may inspect
/// itself through this path too (a token for itself is minted without the capability only
/// by [`control_self`]).
pub fn control(caller: Caller, target: DomId) -> Result<ControlToken, XenError> {
    if caller.caps.contains(Capabilities::DOMAIN_CONTROL) {
        Ok(ControlToken {
            caller: caller.domid,
            target,
        })
    } else {
        Err(XenError::EPERM)
    }
}

/// Every domain controls its own reservation (`memory_op` on `DOMID_SELF`).
pub fn control_self(caller: Caller) -> ControlToken {
    ControlToken {
        caller: caller.domid,
        target: caller.domid,
    }
}

/// May `caller` list every domain? Needs `DOMAIN_CONTROL`.
pub fn list(caller: Caller) -> Result<ListToken, XenError> {
    if caller.caps.contains(Capabilities::DOMAIN_CONTROL) {
        Ok(ListToken { _private: () })
    } else {
        Err(XenError::EPERM)
    }
}

/// Authority to read the boot domains' manifest entries and rebuild them
/// (`BOOT_DOMAIN_INFO`, `REBUILD_BOOT_DOMAIN`).
#[derive(Debug, PartialEq, Eq)]
pub struct BootToken {
    caller: DomId,
}

impl BootToken {
    pub fn caller(&self) -> DomId {
        self.caller
    }
}

/// May `caller` inspect and rebuild boot domains? Needs `DOMAIN_CONTROL`.
pub fn boot_domains(caller: Caller) -> Result<BootToken, XenError> {
    if caller.caps.contains(Capabilities::DOMAIN_CONTROL) {
        Ok(BootToken {
            caller: caller.domid,
        })
    } else {
        Err(XenError::EPERM)
    }
}

/// The toolstack's authority: build domains at run time (`CREATE_DOMAIN`) and talk on the
/// management line (`MGMT_IO`).
#[derive(Debug, PartialEq, Eq)]
pub struct ToolstackToken {
    caller: DomId,
}

impl ToolstackToken {
    pub fn caller(&self) -> DomId {
        self.caller
    }
}

/// May `caller` act as the toolstack? Needs `DOMAIN_CONTROL`.
pub fn toolstack(caller: Caller) -> Result<ToolstackToken, XenError> {
    if caller.caps.contains(Capabilities::DOMAIN_CONTROL) {
        Ok(ToolstackToken {
            caller: caller.domid,
        })
    } else {
        Err(XenError::EPERM)
    }
}

/// Authority to learn which domains a xenstore service domain serves, and the port each
/// offered it (`XENSTORE_DOMAINS`).
#[derive(Debug, PartialEq, Eq)]
pub struct XenstoreToken {
    caller: DomId,
}

impl XenstoreToken {
    pub fn caller(&self) -> DomId {
        self.caller
    }
}

/// May `caller` enumerate the domains it serves as xenstore? Needs `XENSTORE_SERVICE`.
pub fn xenstore_service(caller: Caller) -> Result<XenstoreToken, XenError> {
    if caller.caps.contains(Capabilities::XENSTORE_SERVICE) {
        Ok(XenstoreToken {
            caller: caller.domid,
        })
    } else {
        Err(XenError::EPERM)
    }
}

/// May `caller` shut `target` down? Needs `REMOTE_SHUTDOWN`.
pub fn remote_shutdown(caller: Caller, target: DomId) -> Result<RemoteShutdownToken, XenError> {
    if caller.caps.contains(Capabilities::REMOTE_SHUTDOWN) {
        Ok(RemoteShutdownToken { target })
    } else {
        Err(XenError::EPERM)
    }
}

/// Authority to reach the configuration space of the PCI functions assigned to `caller`
/// (which ones is the config filter's business: this says only that the domain may own
/// devices at all).
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceToken {
    caller: DomId,
}

impl DeviceToken {
    pub fn caller(&self) -> DomId {
        self.caller
    }
}

/// May `caller` use the PCI config hypercalls? Needs `DEVICE_OWNER`.
pub fn device_owner(caller: Caller) -> Result<DeviceToken, XenError> {
    if caller.caps.contains(Capabilities::DEVICE_OWNER) {
        Ok(DeviceToken {
            caller: caller.domid,
        })
    } else {
        Err(XenError::EPERM)
    }
}

/// Authority to read console histories: any domain's console output and the hypervisor's
/// own log (`domctl CONSOLE_READ`).
#[derive(Debug, PartialEq, Eq)]
pub struct ConsoleHistoryToken {
    caller: DomId,
}

impl ConsoleHistoryToken {
    pub fn caller(&self) -> DomId {
        self.caller
    }
}

/// May `caller` read console histories? Needs `DOMAIN_CONTROL` (what a domain wrote on its
/// console and what the hypervisor logs about every domain are the toolstack's to see).
pub fn console_history(caller: Caller) -> Result<ConsoleHistoryToken, XenError> {
    if caller.caps.contains(Capabilities::DOMAIN_CONTROL) {
        Ok(ConsoleHistoryToken {
            caller: caller.domid,
        })
    } else {
        Err(XenError::EPERM)
    }
}

/// May `caller` read console input (`CONSOLEIO_read`)? Every domain reads its own input
/// (what the toolstack gave it with `domctl CONSOLE_WRITE`) and nothing else: the
/// hypervisor's serial input is not handed to domains through this call.
pub fn console_read(_caller: Caller) -> Result<(), XenError> {
    Ok(())
}

/// Bulkhead's rules for event channels and grants (the `xsm_evtchn_*` / `xsm_grant_*` hooks
/// of [`crate::evtchn`] and [`crate::gnttab`]), given a way to look a domain's capabilities up.
///
/// - Event channels: any domain may offer a port to any other and bind a port offered to it
///   (the offer is the consent; binding a port offered to someone else is `EINVAL` in the
///   ops) and send over channels it holds. VIRQs: `VIRQ_TIMER` and `VIRQ_DEBUG` for anyone,
///   `VIRQ_DOM_EXC` only with `DOMAIN_DEATH_EVENTS`, `VIRQ_CONSOLE` only with
///   `CONSOLE_SERVICE`; every other (global, hypervisor-wide) VIRQ for nobody (`EPERM`).
/// - Grants: mapping needs `GRANT_MAP`; copying needs nothing beyond the grant itself.
#[derive(Clone, Copy, Debug)]
pub struct SharingPolicy<F> {
    pub caps: F,
}

impl<F: Fn(DomId) -> Capabilities> crate::evtchn::EvtchnPolicy for SharingPolicy<F> {
    fn may_alloc_unbound(&self, _dom: DomId, _remote: DomId) -> bool {
        true
    }
    fn may_bind_interdomain(&self, _local: DomId, _remote: DomId) -> bool {
        true
    }
    fn may_send(&self, _from: DomId, _to: DomId) -> bool {
        true
    }
    fn may_bind_virq(&self, dom: DomId, virq: u32) -> bool {
        use shared_abi::event_channel::virq as v;
        match virq {
            v::TIMER | v::DEBUG => true,
            v::DOM_EXC => (self.caps)(dom).contains(Capabilities::DOMAIN_DEATH_EVENTS),
            // Per domain: "your console input is waiting" (`domctl CONSOLE_WRITE`); the
            // serial receive path raises it only in console-service domains.
            v::CONSOLE => true,
            _ => false,
        }
    }
}

impl<F: Fn(DomId) -> Capabilities> crate::gnttab::GrantPolicy for SharingPolicy<F> {
    fn may_map(&self, mapper: DomId, granter: DomId) -> bool {
        crate::gnttab::CapabilityPolicy { caps: &self.caps }.may_map(mapper, granter)
    }
    fn may_copy(&self, caller: DomId, granter: DomId) -> bool {
        crate::gnttab::CapabilityPolicy { caps: &self.caps }.may_copy(caller, granter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evtchn::EvtchnPolicy;
    use crate::gnttab::GrantPolicy;
    use shared_abi::event_channel::virq;

    #[test]
    fn sharing_policy_gates_virqs_and_maps_by_capability() {
        let p = SharingPolicy {
            caps: |d: DomId| match d {
                1 => Capabilities::DOMAIN_DEATH_EVENTS | Capabilities::GRANT_MAP,
                2 => Capabilities::CONSOLE_SERVICE,
                _ => Capabilities::empty(),
            },
        };
        assert!(p.may_bind_virq(3, virq::TIMER) && p.may_bind_virq(3, virq::DEBUG));
        assert!(p.may_bind_virq(1, virq::DOM_EXC) && !p.may_bind_virq(2, virq::DOM_EXC));
        assert!(p.may_bind_virq(2, virq::CONSOLE) && p.may_bind_virq(1, virq::CONSOLE));
        assert!(!p.may_bind_virq(1, virq::TBUF) && !p.may_bind_virq(1, virq::PCPU_STATE));
        assert!(p.may_map(1, 3) && !p.may_map(2, 1) && !p.may_map(3, 1));
        assert!(p.may_copy(3, 1));
        assert!(p.may_alloc_unbound(3, 1) && p.may_bind_interdomain(1, 3) && p.may_send(3, 1));
    }

    fn caller(caps: Capabilities) -> Caller {
        Caller { domid: 3, caps }
    }

    #[test]
    fn control_requires_domain_control_and_binds_the_target() {
        assert_eq!(
            control(caller(Capabilities::empty()), 5),
            Err(XenError::EPERM)
        );
        assert_eq!(
            control(caller(Capabilities::REMOTE_SHUTDOWN), 5),
            Err(XenError::EPERM)
        );
        let t = control(caller(Capabilities::DOMAIN_CONTROL), 5).unwrap();
        assert_eq!((t.caller(), t.target()), (3, 5));
    }

    #[test]
    fn remote_shutdown_requires_its_own_capability() {
        assert_eq!(
            remote_shutdown(caller(Capabilities::DOMAIN_CONTROL), 5),
            Err(XenError::EPERM)
        );
        assert_eq!(
            remote_shutdown(caller(Capabilities::REMOTE_SHUTDOWN), 5)
                .unwrap()
                .target(),
            5
        );
    }

    #[test]
    fn list_is_refused_without_rights_and_console_input_is_every_domains_own() {
        assert_eq!(
            list(caller(Capabilities::all() - Capabilities::DOMAIN_CONTROL)),
            Err(XenError::EPERM)
        );
        assert!(list(caller(Capabilities::DOMAIN_CONTROL)).is_ok());
        assert_eq!(console_read(caller(Capabilities::empty())), Ok(()));
    }

    #[test]
    fn console_history_requires_domain_control() {
        assert_eq!(
            console_history(caller(Capabilities::all() - Capabilities::DOMAIN_CONTROL)),
            Err(XenError::EPERM)
        );
        assert_eq!(
            console_history(caller(Capabilities::DOMAIN_CONTROL))
                .unwrap()
                .caller(),
            3
        );
    }

    #[test]
    fn self_control_is_bound_to_the_caller() {
        let t = control_self(caller(Capabilities::empty()));
        assert_eq!((t.caller(), t.target()), (3, 3));
    }
}
