//! Declares the `loom` cfg (the ring's concurrency models run under `--cfg loom`), which the
//! workspace lint table cannot do per crate.
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(loom)");
}
