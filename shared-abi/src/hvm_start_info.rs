//! PVH boot information (`xen/include/public/arch-x86/hvm/start_info.h`): what QEMU's PVH
//! loader (or a Xen toolstack) hands to the 32-bit entry point in `%ebx`.
//!
//! These are read from memory the boot loader filled; the hypervisor copies them out before it
//! reuses low memory and validates every count and address against the memory map.

use crate::assert_layout;

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

/// `hvm_start_info` (version 1 layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HvmStartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}
assert_layout!(HvmStartInfo, 56; magic @ 0, version @ 4, flags @ 8, nr_modules @ 12,
    modlist_paddr @ 16, cmdline_paddr @ 24, rsdp_paddr @ 32, memmap_paddr @ 40,
    memmap_entries @ 48);

/// `hvm_modlist_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HvmModlistEntry {
    pub paddr: u64,
    pub size: u64,
    pub cmdline_paddr: u64,
    pub reserved: u64,
}
assert_layout!(HvmModlistEntry, 32; paddr @ 0, size @ 8, cmdline_paddr @ 16);

/// `hvm_memmap_table_entry` (e820-style).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HvmMemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}
assert_layout!(HvmMemmapEntry, 24; addr @ 0, size @ 8, kind @ 16);

/// e820 / memmap entry types.
pub mod memmap_type {
    pub const RAM: u32 = 1;
    pub const RESERVED: u32 = 2;
    pub const ACPI: u32 = 3;
    pub const NVS: u32 = 4;
    pub const UNUSABLE: u32 = 5;
    pub const DISABLED: u32 = 6;
    pub const PMEM: u32 = 7;
}
