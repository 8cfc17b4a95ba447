//! The boot sequence's portable parts: reading and validating what the PVH loader hands over
//! (`hvm_start_info`, memory map, module list, command line) and checking the boot image.
//! `arch::x86_64::boot` drives them on bare metal.

pub mod cmdline;
pub mod image;
pub mod start_info;
