//! Links the bare-metal binary with `linker.ld`, and only when building for bare metal: the host
//! build of the same binary is a stub `main` and must use the host's default link.
fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bin=core-hv=-T{dir}/linker.ld");
    }
}
