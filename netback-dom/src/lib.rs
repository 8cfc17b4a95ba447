//! netback-dom: the network backend driver domain (Xen `netif`) and its layer-2 switch.
//!
//! Not built yet: this crate holds no code until the netback issue lands. It exists so the
//! workspace layout is the architecture from day one.
#![forbid(unsafe_code)]
#![no_std]
