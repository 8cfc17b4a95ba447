//! Hardware-specific code: the only part of core-hv that touches the machine. Built only for
//! bare metal (`target_os = "none"`).

pub mod x86_64;
