//! The generic Xen shared I/O ring (`io/ring.h`).
