//! The QEMU scenarios. Each test boots the real hypervisor once and judges its console and
//! exit status (see the harness in `src/lib.rs`). Run them with `cargo hv test` (which builds
//! the image once and limits parallelism) or directly with `cargo test -p tests` (which builds
//! what it needs first).
//!
//! To add one: write a `#[test]` here that builds a [`Scenario`], boots it, and calls the
//! `expect_*` checks (or judges `boot.console()` itself and calls `boot.fail(..)`).

use bulkhead_build::console::FaultKind;
use bulkhead_build::outcome::Outcome;
use shared_abi::manifest::{IMAGE_VERSION, parse_image};
use tests::{Scenario, artifacts, corrupt};

/// The domains the default system's image holds.
fn default_domain_count() -> u32 {
    let bytes = std::fs::read(&artifacts().image).expect("reading the default image");
    let image = parse_image(&bytes).expect("the default image must be valid");
    image.manifest.domains.len() as u32
}

mod boot {
    use super::*;

    fn boots_to_ready_with(cpus: u32) {
        let boot = Scenario::new(&format!("boot_smp{cpus}"))
            .smp(cpus)
            .exit_when_done()
            .boot();
        boot.expect_outcome(Outcome::CleanPoweroff)
            .expect_no_failed_results();
        let ready = boot.expect_ready();
        if ready.cpus != cpus {
            boot.fail(&format!(
                "ready line reports {} CPUs, QEMU has {cpus}",
                ready.cpus
            ));
        }
        if ready.boot_domains != default_domain_count() {
            boot.fail(&format!(
                "ready line reports {} boot domains, the image has {}",
                ready.boot_domains,
                default_domain_count()
            ));
        }
        if ready.free_mib == 0 || ready.free_mib >= 256 {
            boot.fail(&format!(
                "ready line reports {} MiB free of a 256 MiB machine",
                ready.free_mib
            ));
        }
        if boot.console().metric("boot_to_ready_ms").is_none() {
            boot.fail("no `METRIC boot_to_ready_ms` line");
        }
    }

    #[test]
    fn boot_with_1_cpu_reaches_ready_and_powers_off_cleanly() {
        boots_to_ready_with(1);
    }

    #[test]
    fn boot_with_2_cpus_reaches_ready_and_powers_off_cleanly() {
        boots_to_ready_with(2);
    }

    #[test]
    fn boot_with_4_cpus_reaches_ready_and_powers_off_cleanly() {
        boots_to_ready_with(4);
    }
}

mod fault {
    use super::*;

    fn fault_is_reported_and_fails(kind: FaultKind) {
        let word = format!(
            "{}={}",
            shared_abi::console::cmdline::TEST_FAULT,
            kind.cmdline_value()
        );
        let boot = Scenario::new(&format!("fault_{}", kind.cmdline_value()))
            .append(&word)
            .boot();
        boot.expect_outcome(Outcome::FailurePoweroff)
            .expect_exception_report(kind);
    }

    #[test]
    fn fault_invalid_opcode_is_reported_and_powers_off_with_failure() {
        fault_is_reported_and_fails(FaultKind::InvalidOpcode);
    }

    #[test]
    fn fault_page_fault_is_reported_with_cr2_and_powers_off_with_failure() {
        fault_is_reported_and_fails(FaultKind::PageFault);
    }

    #[test]
    fn fault_general_protection_is_reported_and_powers_off_with_failure() {
        fault_is_reported_and_fails(FaultKind::GeneralProtection);
    }

    #[test]
    fn fault_divide_error_is_reported_and_powers_off_with_failure() {
        fault_is_reported_and_fails(FaultKind::DivideError);
    }
}

mod manifest {
    use super::*;

    /// Boot `image` and expect exactly the refusal the host-side parser gives for it.
    fn refused(name: &str, image: Vec<u8>) {
        let reason = match parse_image(&image) {
            Ok(_) => panic!("scenario {name}: the corrupted image is valid; the test is wrong"),
            Err(e) => e.to_string(),
        };
        Scenario::new(name)
            .exit_when_done()
            .image(image)
            .boot()
            .expect_outcome(Outcome::FailurePoweroff)
            .expect_refusal(&reason);
    }

    #[test]
    fn boot_without_an_image_is_refused() {
        Scenario::new("manifest_no_image")
            .exit_when_done()
            .no_image()
            .boot()
            .expect_outcome(Outcome::FailurePoweroff)
            .expect_refusal("no boot module was passed (QEMU: -initrd <image>)");
    }

    #[test]
    fn manifest_with_wrong_magic_is_refused() {
        refused(
            "manifest_wrong_magic",
            corrupt::wrong_magic(corrupt::image_with_two_domains()),
        );
    }

    #[test]
    fn manifest_with_wrong_version_is_refused() {
        refused(
            "manifest_wrong_version",
            corrupt::wrong_version(corrupt::image_with_two_domains(), IMAGE_VERSION + 1),
        );
    }

    #[test]
    fn manifest_with_bad_checksum_is_refused() {
        refused(
            "manifest_bad_checksum",
            corrupt::bad_checksum(corrupt::image_with_two_domains()),
        );
    }

    #[test]
    fn manifest_of_truncated_image_is_refused() {
        let img = corrupt::image_with_two_domains();
        let len = img.len() - 1000;
        refused("manifest_truncated", corrupt::truncated(img, len));
    }

    #[test]
    fn manifest_shorter_than_its_header_is_refused() {
        refused(
            "manifest_truncated_header",
            corrupt::truncated(corrupt::image_with_two_domains(), 40),
        );
    }

    #[test]
    fn manifest_that_does_not_decode_is_refused() {
        refused(
            "manifest_undecodable",
            corrupt::with_manifest_bytes(&corrupt::image_with_two_domains(), &[0xff; 8]),
        );
    }

    #[test]
    fn manifest_naming_an_elf_outside_the_image_is_refused() {
        refused(
            "manifest_elf_out_of_range",
            corrupt::elf_out_of_range(&corrupt::image_with_two_domains()),
        );
    }

    #[test]
    fn manifest_naming_overlapping_elves_is_refused() {
        refused(
            "manifest_elf_overlap",
            corrupt::elf_overlapping(&corrupt::image_with_two_domains()),
        );
    }
}
