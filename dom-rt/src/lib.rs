//! dom-rt: the runtime every Rust Bulkhead domain links (entry, allocator, hypercalls, console,
//! event loop, xenbus client, frontends). Built with the PV domains issue.
#![no_std]
