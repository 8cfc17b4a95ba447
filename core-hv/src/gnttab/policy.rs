//! Who may use whose grants: a hook called at every grant operation (Xen's `xsm_grant_*`),
//! never compiled out. The grant entry itself already names the one grantee; the policy
//! adds Bulkhead's capability rule on top.

use shared_abi::DomId;
use shared_abi::capability::Capabilities;

/// Checked before a map or a copy touches the granter's table; refusal is
/// `GNTST_permission_denied`.
pub trait GrantPolicy {
    /// May `mapper` map grants made by `granter`?
    fn may_map(&self, mapper: DomId, granter: DomId) -> bool;
    /// May `caller` copy to or from grants made by `granter`?
    fn may_copy(&self, caller: DomId, granter: DomId) -> bool;
}

/// The default rule: mapping needs the `GRANT_MAP` capability (backends hold it); copying is
/// allowed to any grantee (the entry's domid check decides). `caps` looks a domain's
/// capabilities up.
#[derive(Clone, Copy, Debug)]
pub struct CapabilityPolicy<F> {
    pub caps: F,
}

impl<F: Fn(DomId) -> Capabilities> GrantPolicy for CapabilityPolicy<F> {
    fn may_map(&self, mapper: DomId, _granter: DomId) -> bool {
        (self.caps)(mapper).contains(Capabilities::GRANT_MAP)
    }
    fn may_copy(&self, _caller: DomId, _granter: DomId) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_needs_grant_map_capability_copy_does_not() {
        let p = CapabilityPolicy {
            caps: |d: DomId| {
                if d == 2 {
                    Capabilities::GRANT_MAP
                } else {
                    Capabilities::empty()
                }
            },
        };
        assert!(p.may_map(2, 1));
        assert!(!p.may_map(3, 1));
        assert!(p.may_copy(3, 1));
    }
}
