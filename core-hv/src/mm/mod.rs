//! Physical memory management: the memory map, the physical frame allocator and the page-table
//! editor. All of it is portable logic (host-tested); `arch::x86_64` supplies the memory it runs
//! on and installs the tables.
//!
//! Lock order (bare metal): page tables → frame allocator; heap → frame allocator. The frame
//! allocator never takes another lock and never allocates from the heap.

pub mod frame;
pub mod memmap;
pub mod paging;

pub use memmap::PhysRange;

/// Size of a physical frame / small page.
pub const FRAME_SIZE: u64 = shared_abi::PAGE_SIZE as u64;
/// Size of a large (2 MiB) page.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// Round `x` down to a multiple of `align` (a power of two).
pub const fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}

/// Round `x` up to a multiple of `align` (a power of two); `None` on overflow.
pub const fn align_up(x: u64, align: u64) -> Option<u64> {
    match x.checked_add(align - 1) {
        Some(v) => Some(v & !(align - 1)),
        None => None,
    }
}
