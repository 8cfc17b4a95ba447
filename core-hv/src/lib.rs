//! core-hv: the Bulkhead hypervisor core.
#![cfg_attr(not(test), no_std)]
