//! Capabilities: the rights a domain holds, declared in the boot manifest or a domain config
//! and checked by `core-hv`'s policy module at every privileged operation. There is no
//! "privileged domain": each right is granted on its own.

use bitflags::bitflags;
use serde::{Deserialize, Serialize};

bitflags! {
    /// The set of rights a domain holds.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct Capabilities: u64 {
        /// Create, destroy, pause, unpause, inspect and re-weight other domains (`domctl`).
        const DOMAIN_CONTROL = 1 << 0;
        /// Serve xenstore: map other domains' xenstore rings, be told of domain deaths.
        const XENSTORE_SERVICE = 1 << 1;
        /// Serve consoles: map other domains' console rings.
        const CONSOLE_SERVICE = 1 << 2;
        /// Own the PCI devices the manifest assigns to it (BARs, config space, interrupts).
        const DEVICE_OWNER = 1 << 3;
        /// Shut down other domains (`SCHEDOP_remote_shutdown`).
        const REMOTE_SHUTDOWN = 1 << 4;
        /// Map pages other domains granted to it (backends).
        const GRANT_MAP = 1 << 5;
        /// Receive the "domain died" VIRQ.
        const DOMAIN_DEATH_EVENTS = 1 << 6;
    }
}

impl Capabilities {
    /// Names used in configs and on the console, in bit order.
    pub const NAMES: &'static [(&'static str, Capabilities)] = &[
        ("domain_control", Capabilities::DOMAIN_CONTROL),
        ("xenstore_service", Capabilities::XENSTORE_SERVICE),
        ("console_service", Capabilities::CONSOLE_SERVICE),
        ("device_owner", Capabilities::DEVICE_OWNER),
        ("remote_shutdown", Capabilities::REMOTE_SHUTDOWN),
        ("grant_map", Capabilities::GRANT_MAP),
        ("domain_death_events", Capabilities::DOMAIN_DEATH_EVENTS),
    ];

    /// Parse one capability name as written in a config.
    pub fn from_config_name(name: &str) -> Option<Capabilities> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
    }
}
