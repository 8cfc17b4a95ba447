//! netback-dom: the network backend driver domain (Xen `netif`) and its layer-2 switch, as a
//! host-tested library. The domain binary (`src/bin/netback-domain.rs`: xenstore, grant
//! copies, event channels, the virtio-net uplink, the event loop) is a thin shell around it.
//!
//! - [`packet`]: frames with their offload metadata, MAC addresses, the flow hash.
//! - [`switch`]: the L2 switch (MAC learning with ageing, flooding, anti-spoofing, rate limits,
//!   counters, a bounded MAC table).
//! - [`grant`]: the grant-copy seam ([`grant::GrantCopier`]), the local page pool, and a fake
//!   frontend grant table for host tests and benches.
//! - [`backend`]: the netif backend engine per queue, and a multi-queue [`backend::Vif`].
//! - [`xenbus`]: the backend side of the xenbus handshake over a key/value store.
//! - [`config`]: the domain's glue (`serve=` list, a vif's switch policy, what the uplink
//!   carries, the per-port counter line).
//!
//! No locks anywhere: each engine is driven by one thread at a time (`&mut self`).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod backend;
pub mod config;
pub mod grant;
pub mod packet;
pub mod switch;
pub mod xenbus;
