//! The contract between Bulkhead's pieces.
//!
//! Everything that crosses a boundary between two of Bulkhead's parts (hypervisor, domains,
//! host tools) is defined here once: Xen's public ABI where Xen has the interface (numbers and
//! byte layouts, each struct with compile-time size and offset assertions taken from Xen's
//! headers), and Bulkhead's own formats where it does not (boot image manifest, capabilities,
//! console protocol), serialised with `postcard`.
//!
//! The crate is `no_std` + `alloc` so the hypervisor and domains link it; it is tested on the
//! host.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

extern crate alloc;

pub mod blkif;
pub mod capability;
pub mod console;
pub mod domain_config;
pub mod errno;
pub mod event_channel;
pub mod grant_table;
pub mod hvm_start_info;
pub mod hypercall;
pub mod hypercall_args;
pub mod manifest;
pub mod mgmt;
pub mod netif;
pub mod pci;
pub mod ring;
pub mod shared_info;
pub mod start_info;
pub mod xenbus;
pub mod xenstore;

/// Xen domain id (`domid_t`).
pub type DomId = u16;

/// Special domain ids (`xen.h`).
pub mod domid {
    use super::DomId;
    pub const DOMID_FIRST_RESERVED: DomId = 0x7FF0;
    pub const DOMID_SELF: DomId = 0x7FF0;
    pub const DOMID_IO: DomId = 0x7FF1;
    pub const DOMID_XEN: DomId = 0x7FF2;
    pub const DOMID_COW: DomId = 0x7FF3;
    pub const DOMID_INVALID: DomId = 0x7FF4;
    pub const DOMID_ANY: DomId = 0x7FF5;
    pub const DOMID_IDLE: DomId = 0x7FFF;
    pub const DOMID_MASK: DomId = 0x7FFF;

    /// True for ids that name a real domain rather than a special meaning.
    pub const fn is_regular(id: DomId) -> bool {
        id < DOMID_FIRST_RESERVED
    }
}

/// Size of a page, the unit of every frame, grant and ring.
pub const PAGE_SIZE: usize = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// Compile-time layout assertion: `assert_layout!(Type, size; field @ offset, ...)`.
#[macro_export]
macro_rules! assert_layout {
    ($ty:ty, $size:expr $(; $($field:ident @ $off:expr),* $(,)?)?) => {
        const _: () = {
            assert!(::core::mem::size_of::<$ty>() == $size);
            $($(assert!(::core::mem::offset_of!($ty, $field) == $off);)*)?
        };
    };
}
