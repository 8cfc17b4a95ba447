//! ctl-dom: the toolstack domain.
//!
//! Not built yet: this crate holds no code until the toolstack issue lands. It exists so the
//! workspace layout is the architecture from day one.
#![forbid(unsafe_code)]
#![no_std]
