//! QEMU scenarios.
