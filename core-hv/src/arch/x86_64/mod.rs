//! x86-64 bare-metal support: PVH entry, paging, descriptors, exceptions, console, APIC timer
//! and SMP bring-up.
//!
//! # Virtual memory layout (one address space shared by every CPU)
//!
//! | range | what | permissions |
//! |---|---|---|
//! | `0x0000_0000_0000_0000..0x0000_8000_0000_0000` | empty in the hypervisor's own tables; in each PV domain's tables, that domain's pages (see `pv::mmu`) | user |
//! | [`DIRECT_MAP_BASE`] + phys (PML4 slot 262, inside the range Xen's PV ABI reserves for the hypervisor) | direct map of all RAM (plus on-demand ACPI/MMIO pages) | RW, NX; MMIO uncached |
//! | [`STACK_REGION_BASE`] + slot × [`STACK_SLOT_SIZE`] (PML4 slot 264) | kernel and IST stacks, each at the top of its own slot with unmapped pages below (guards) | RW, NX |
//! | [`KERNEL_VMA`] + phys (top 2 GiB, where the target's `kernel` code model wants code) | the hypervisor image, loaded at 1 MiB physical | .text R-X, .rodata R NX, .data/.bss RW NX |
//!
//! The low identity map and the 0..4 GiB direct map that the 32-bit boot stub builds are used
//! only until the hypervisor's own tables are loaded (and by APs on their way to long mode).
//!
//! Lock order: page tables → frame allocator; heap → frame allocator; console last (it
//! takes no other lock).

pub mod apic;
pub mod boot;
pub mod console;
pub mod cpu;
pub mod devices;
pub mod gdt;
pub mod heap;
pub mod idt;
pub mod iommu;
pub mod memory;
pub mod pci;
pub mod percpu;
pub mod pv;
pub mod serial;
pub mod smp;

/// Where the image is linked: virtual = `KERNEL_VMA` + physical (see `linker.ld`).
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;
/// Base of the direct map of physical memory.
pub const DIRECT_MAP_BASE: u64 = 0xffff_8300_0000_0000;
/// Largest physical address the direct map covers (one PML4 slot).
pub const DIRECT_MAP_LIMIT: u64 = 512 << 30;
/// Base of the stack region.
pub const STACK_REGION_BASE: u64 = 0xffff_8400_0000_0000;
/// Each stack gets its own slot; the unmapped rest of the slot below it is its guard.
pub const STACK_SLOT_SIZE: u64 = 256 << 10;

/// Most CPUs brought up.
pub const MAX_CPUS: usize = 64;

/// The direct-map address of physical address `phys`.
pub const fn phys_to_virt(phys: u64) -> u64 {
    DIRECT_MAP_BASE + phys
}

/// A panic in the hypervisor is fatal: report it and power off with failure.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    boot::fatal(format_args!("panic: {info}"))
}
