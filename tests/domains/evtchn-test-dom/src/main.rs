//! evtchn-test-dom: the event-channel, grant-table and shared-ring scenarios' test domain.
//! One binary; `role=<name>` on the command line picks what it does, `peer=<domid>` names
//! the domain it works with. Every role reports `RESULT <name> pass|fail <details>` (and
//! benchmark roles `METRIC <name> <value> <unit>`).
//!
//! Rendezvous without xenstore: the *offering* side allocates the first port of its life
//! (port 1) for `peer` and waits; the *joining* side binds `(peer, port=1)`, retrying while
//! the offer is not there yet, and sends a hello. Grant refs are fixed: 8 for the first
//! page, 9 for the second.
//!
//! Roles (offering side first in each pair):
//! - `ping n= metric=` / `pong n=`: `n` round trips over an interdomain channel; the median
//!   round trip in cycles (printed as `METRIC <metric>` when given).
//! - `granter` / `mapper`: the grant map round trip (read-only map, end-access refused while
//!   mapped, reuse after unmap, a write to the read-only mapping kills the mapper only).
//! - `copy-granter` / `copier n= seed=`: grant copies of random lengths and offsets both ways
//!   against a shadow model.
//! - `dier` / `keeper`: the granter dies while its page is mapped; the mapper keeps reading.
//! - `hostile victim=`: invalid ports, refs, domids, lengths, offsets, flags; binding another
//!   domain's port; exhausting ports and maptrack. Each refusal must carry Xen's code.
//! - `ring-front n= metric=` / `ring-back`: `n` requests over a `shared_abi::ring` in a
//!   granted page, responses checked in order.
//! - `bench-granter` / `bench-mapper`: grant map/unmap and 4 KiB copy costs.
//! - `raw-ring-tx ms=` / `raw-ring-rx metric=`: the bare-ring packet reference of the
//!   network benchmarks: 64-byte packets inline in the slots of a granted one-page ring for
//!   `ms` (default 1000), every one checked; the consumer prints the packets per second.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
dom_rt::entry!(main);

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod roles;

#[cfg(target_os = "none")]
fn main(si: &'static dom_rt::StartInfo) {
    roles::run(si);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("evtchn-test-dom is a Bulkhead domain: build it with --target x86_64-unknown-none");
    std::process::exit(2);
}
