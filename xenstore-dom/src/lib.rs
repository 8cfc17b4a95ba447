//! xenstore-dom: the xenstore engine, service domain and host daemon.
//!
//! - [`engine`]: the store itself — Xen's message semantics, permissions, transactions,
//!   watches, domains and quotas — as a library without I/O, so the host daemon and the
//!   domain's ring transport drive the same code.
//! - [`store`], [`path`], [`perms`], [`quota`]: its parts.
//! - [`ring`]: the ring-page transport of the service domain (xenstored's side of each
//!   domain's `xenstore_domain_interface`).
//! - [`host`] (unix, `std` feature only): the daemon that serves the engine on unix sockets for Xen's stock
//!   `xenstore-*` tools, as C `xenstored` does for local tools.
//!
//! The engine and the ring transport are `no_std + alloc`, so the service domain links them
//! on bare metal; the default `std` feature adds the host daemon (and its CLI binary).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(any(test, all(feature = "std", not(target_os = "none"))))]
extern crate std;

pub mod engine;
#[cfg(all(feature = "std", unix))]
pub mod host;
pub mod path;
pub mod perms;
pub mod quota;
pub mod ring;
pub mod store;

pub use engine::{Config, ConnId, ConnKind, Effect, Engine, Outgoing, Output};
