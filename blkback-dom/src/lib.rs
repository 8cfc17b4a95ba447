//! blkback-dom: the block backend driver domain (Xen `blkif`).
//!
//! Not built yet: this crate holds no code until the blkback issue lands. It exists so the
//! workspace layout is the architecture from day one.
#![forbid(unsafe_code)]
#![no_std]
