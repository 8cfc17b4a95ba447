//! Per-domain quotas: Xen's names, defaults and the errors they produce.
//!
//! Quotas bind unprivileged domains exactly as C xenstored's hard quotas do. Xen exempts
//! privileged connections entirely; Bulkhead also caps privileged connections' watches and
//! transactions (per connection, generous defaults) so one host socket client cannot grow
//! the daemon without bound.

use shared_abi::xenstore::REL_PATH_MAX;

/// Quota values (Xen's `hard_quotas[]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// `nodes`: nodes a domain may own (ENOSPC).
    pub nodes: u32,
    /// `watches`: watches per domain (E2BIG).
    pub watches: u32,
    /// `outstanding`: requests a transport accepts before the replies are taken.
    pub outstanding: u32,
    /// `transactions`: open transactions per domain (ENOSPC).
    pub transactions: u32,
    /// `transaction-nodes`: nodes a transaction may touch (ENOSPC).
    pub transaction_nodes: u32,
    /// `node-permissions`: entries in one permission list (ENOSPC).
    pub node_permissions: u32,
    /// `path-max`: path length below the domain's home (EINVAL).
    pub path_max: u32,
    /// `node-size`: header + permissions + value + child names (ENOSPC).
    pub node_size: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            nodes: 1000,
            watches: 128,
            outstanding: 20,
            transactions: 10,
            transaction_nodes: 1024,
            node_permissions: 5,
            path_max: REL_PATH_MAX as u32,
            node_size: 2048,
        }
    }
}

/// Name, description and accessor of each quota, in Xen's order (CONTROL `quota`, CLI).
pub const NAMES: &[(&str, &str)] = &[
    ("nodes", "Nodes per domain"),
    ("watches", "Watches per domain"),
    ("outstanding", "Outstanding requests per domain"),
    ("transactions", "Active transactions per domain"),
    (
        "transaction-nodes",
        "Max. number of accessed nodes per transaction",
    ),
    ("node-permissions", "Max. number of permissions per node"),
    ("path-max", "Max. length of a node path"),
    ("node-size", "Max. size of a node"),
];

impl Quotas {
    /// Value of the quota called `name`.
    pub fn get(&self, name: &str) -> Option<u32> {
        Some(match name {
            "nodes" => self.nodes,
            "watches" => self.watches,
            "outstanding" => self.outstanding,
            "transactions" => self.transactions,
            "transaction-nodes" => self.transaction_nodes,
            "node-permissions" => self.node_permissions,
            "path-max" => self.path_max,
            "node-size" => self.node_size,
            _ => return None,
        })
    }

    /// Set the quota called `name`; `false` if there is none. `path-max` is capped at
    /// Xen's protocol limit.
    pub fn set(&mut self, name: &str, val: u32) -> bool {
        let slot = match name {
            "nodes" => &mut self.nodes,
            "watches" => &mut self.watches,
            "outstanding" => &mut self.outstanding,
            "transactions" => &mut self.transactions,
            "transaction-nodes" => &mut self.transaction_nodes,
            "node-permissions" => &mut self.node_permissions,
            "path-max" => &mut self.path_max,
            "node-size" => &mut self.node_size,
            _ => return false,
        };
        *slot = if name == "path-max" {
            val.min(REL_PATH_MAX as u32)
        } else {
            val
        };
        true
    }
}

/// Limits on privileged connections (not in Xen; see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrivilegedLimits {
    /// Watches per privileged connection (E2BIG).
    pub watches: u32,
    /// Open transactions per privileged connection (ENOSPC).
    pub transactions: u32,
}

impl Default for PrivilegedLimits {
    fn default() -> Self {
        PrivilegedLimits {
            watches: 1024,
            transactions: 256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_xens_and_names_round_trip() {
        let mut q = Quotas::default();
        assert_eq!(q.get("nodes"), Some(1000));
        assert_eq!(q.get("watches"), Some(128));
        assert_eq!(q.get("node-size"), Some(2048));
        for (name, _) in NAMES {
            assert!(q.set(name, 7));
            assert_eq!(q.get(name), Some(7));
        }
        assert!(!q.set("bogus", 1));
        q.set("path-max", 99999);
        assert_eq!(q.path_max, 2048);
    }
}
