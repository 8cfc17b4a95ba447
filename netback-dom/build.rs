//! The `netback-domain` binary links with dom-rt's domain linker script, static, only when
//! building for bare metal; the library and host tests are unaffected.
fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "none" {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dom-rt/domain.ld");
        for arg in [
            format!("-T{}", script.display()),
            "--no-pie".into(),
            "-static".into(),
        ] {
            println!("cargo:rustc-link-arg-bin=netback-domain={arg}");
        }
        println!("cargo:rerun-if-changed={}", script.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
}
