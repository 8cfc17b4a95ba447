//! blk-driver-dom: the driver-domain scenarios' test domain. It drives an assigned virtio-blk
//! function with `virtio-drivers` on dom-rt's device layer (`dom_rt::device`): BARs mapped with
//! `MAP_BAR`, MSI-X entry 0 bound to an event channel, DMA buffers whose device address is
//! their virtual address. One binary; `role=<name>` on the command line picks what it does and
//! every role reports `RESULT <name> pass|fail <details>` (and `METRIC` lines).
//!
//! Roles:
//! - `read [n=200] [share=<domid>,..]`: read sectors 0 and 1 (reported as
//!   `sector0=<first 16 bytes hex> sector0_fnv=<FNV-1a of the 512 bytes>`, same for 1), then `n`
//!   more reads, each waited for on the event channel, timing
//!   `METRIC irq_to_event_cycles <median> cycles` (TSC in the event handler minus the
//!   hypervisor's `IrqStats.last_tsc`). With `share=`, each listed domain gets a read-only grant
//!   (refs 8, 9, ..) of a page describing the device (BAR, pirq) and an event channel; the
//!   driver waits for each to say it is done before it ends (see `snoop`).
//! - `snoop owner=<domid> ref=<gref>`: a domain that does not own the device maps the owner's
//!   description page and tries `MAP_BAR`, `MAP_PIRQ`, `IRQ_STATS`, `bind_pirq` and config
//!   reads on the owner's device: every one must be refused.
//! - `dma-escape victim=<domid>`: maps the victim's granted page (ref 8, writable) and points the
//!   device's data buffer at it, then at a never-mapped address; the IOMMU must block both (no
//!   completion; the device wants a reset). The driver resets the device, proves a good read
//!   still works, and tells the victim it is done.
//! - `victim peer=<domid>`: fills a page with a canary, grants it (ref 8, writable) to `peer`,
//!   offers an event channel, and once the driver says done checks the canary.
//! - `writer [n=]`: writes sectors 2.. continuously (each tagged with its sequence number),
//!   reporting progress; stops after `n` writes if given.
//! - `bench`: the passthrough reference figures `blk_direct_virtio_*` (see `bench.rs`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
dom_rt::entry!(main);

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod bench;
#[cfg(target_os = "none")]
mod driver;
#[cfg(target_os = "none")]
mod roles;

#[cfg(target_os = "none")]
fn main(si: &'static dom_rt::StartInfo) {
    roles::run(si);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("blk-driver-dom is a Bulkhead domain: build it with --target x86_64-unknown-none");
    std::process::exit(2);
}
