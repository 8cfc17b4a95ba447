//! core-hv: the Bulkhead hypervisor core.
//!
//! `arch/x86_64` is the only place that touches hardware and builds only for bare metal. Every
//! other module is portable logic that also builds and is tested on the host.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(target_os = "none")]
pub mod arch;
pub mod boot;
pub mod domain;
pub mod evtchn;
pub mod gnttab;
pub mod irq;
pub mod mm;
pub mod pci;
pub mod policy;
pub mod sched;
