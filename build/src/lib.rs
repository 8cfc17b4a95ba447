//! `bulkhead-build`: everything behind `cargo hv`, as a library so the scenario harness
//! (`tests`) drives QEMU, packs images and judges consoles with the same code.
//!
//! - [`workspace`]: where the project, its target directory and `cargo` are.
//! - [`setup`]: finds (and, where allowed, installs) QEMU and the bare-metal Rust target.
//! - [`system`]: the system description (`systems/*.toml`), validated field by field.
//! - [`image`]: builds `core-hv` and the listed domains, packs the boot image.
//! - [`qemu`]: boots an image under QEMU with a time limit, streams the serial console, and
//!   never leaves a QEMU behind.
//! - [`outcome`]: what a QEMU exit means, and the exit status `cargo hv` answers with.
//! - [`process`]: children in their own process group, killed with it on a limit or interrupt.
//! - [`console`]: reads the structured lines of a console log (the judge).
//! - [`bench`]: boot figures and criterion results, as one table and one JSON object.
//! - [`cli`] and [`commands`]: the `cargo hv` command line and what each subcommand does.
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod commands;
pub mod console;
pub mod image;
pub mod machine;
pub mod outcome;
pub mod process;
pub mod qemu;
pub mod setup;
pub mod system;
pub mod workspace;
