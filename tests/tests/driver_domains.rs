//! Driver-domain scenarios: PCI functions assigned to a domain by the boot manifest, its
//! config-space access through `physdev_op`, other domains refused, DMA confined by VT-d
//! (QEMU's `intel-iommu`) or, without an IOMMU, refused unless `insecure_dma`. The driver
//! domain is `pv-test-dom`'s `pci` role; the device is a virtio-blk disk at 00:03.0.

use std::time::Duration;

use bulkhead_build::outcome::Outcome;
use tests::{Boot, Scenario, scenario_dir};

fn domain(name: &str, cmdline: &str, extra: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"{name}\"\ncrate = \"pv-test-dom\"\nmemory_mib = 4\n\
         cmdline = \"{cmdline}\"\n{extra}\n"
    )
}

/// A 1 MiB raw disk for the virtio-blk function.
fn disk(name: &str) -> String {
    let dir = scenario_dir().join(format!("drv-{name}"));
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).expect("writing the disk");
    path.display().to_string()
}

fn boot(name: &str, iommu: bool, domains: &[String]) -> Boot {
    let toml = format!(
        "[system]\ndescription = \"driver domains: {name}\"\n{}",
        domains.concat()
    );
    let img = tests::system_image("drv", name, &toml);
    let drive = format!("file={},if=none,id=d0,format=raw", disk(name));
    let mut args: Vec<&str> = Vec::new();
    if iommu {
        args.extend(["-device", "intel-iommu"]);
    }
    args.extend([
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0,addr=03.0",
    ]);
    Scenario::new(name)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .qemu_args(&args)
        .timeout(Duration::from_secs(120))
        .boot()
}

fn has_line(b: &Boot, pred: impl Fn(&str) -> bool) -> bool {
    b.console().lines().iter().any(|l| pred(l))
}

fn expect_line(b: &Boot, what: &str, pred: impl Fn(&str) -> bool) {
    if !has_line(b, pred) {
        b.fail(&format!("no console line {what}"));
    }
}

#[test]
fn driver_domain_reads_its_device_with_dma_confined_and_others_are_refused() {
    let b = boot(
        "confined",
        true,
        &[
            domain(
                "blk",
                "role=pci expect=owner dma=confined probe=00:1f.2",
                "capabilities = [\"device_owner\"]\ndevices = [{ id = \"1af4:1001\" }]",
            ),
            domain(
                "snoop",
                "role=pci expect=refused want=enodev probe=00:03.0",
                "capabilities = [\"device_owner\"]",
            ),
            domain(
                "guest",
                "role=pci expect=refused want=eperm probe=00:03.0",
                "",
            ),
        ],
    );
    b.expect_outcome(Outcome::CleanPoweroff);
    expect_line(&b, "assigning 00:03.0 to blk under VT-d", |l| {
        l.starts_with("bulkhead: device 00:03.0 1af4:1001 assigned to domain ")
            && l.ends_with("(blk), DMA confined by VT-d")
    });
    let details = b.expect_result_pass("blk");
    assert!(details.contains("00:03.0 1af4:1001"), "{details}");
    b.expect_result_pass("snoop");
    b.expect_result_pass("guest");
}

#[test]
fn without_an_iommu_a_device_is_refused_unless_insecure_dma() {
    let b = boot(
        "no-iommu",
        false,
        &[
            domain(
                "blk",
                "role=pci expect=owner dma=insecure",
                "capabilities = [\"device_owner\"]\ndevices = [{ bdf = \"00:03.0\" }]",
            ),
            domain(
                "guest",
                "role=pci expect=refused want=eperm probe=00:03.0",
                "",
            ),
        ],
    );
    expect_line(&b, "refusing blk for lack of an IOMMU", |l| {
        l.starts_with(
            "bulkhead: domain \"blk\" refused: device 00:03.0 1af4:1001 is behind no IOMMU",
        )
    });
    if b.console().results().iter().any(|r| r.name == "blk") {
        b.fail("the refused driver domain ran");
    }
    b.expect_result_pass("guest");

    let b = boot(
        "insecure",
        false,
        &[domain(
            "blk",
            "role=pci expect=owner dma=insecure",
            "capabilities = [\"device_owner\"]\n\
             devices = [{ bdf = \"00:03.0\", insecure_dma = true }]",
        )],
    );
    b.expect_outcome(Outcome::CleanPoweroff);
    expect_line(&b, "warning that blk's DMA is not confined", |l| {
        l.starts_with("bulkhead: WARNING: device 00:03.0 1af4:1001 assigned to domain ")
            && l.contains("NO IOMMU")
    });
    b.expect_result_pass("blk");
}

#[test]
fn a_device_match_that_selects_nothing_refuses_the_driver_domain_only() {
    let b = boot(
        "no-match",
        true,
        &[
            domain(
                "blk",
                "role=pci expect=owner dma=confined",
                "capabilities = [\"device_owner\"]\ndevices = [{ id = \"dead:beef\" }]",
            ),
            domain(
                "guest",
                "role=pci expect=refused want=eperm probe=00:03.0",
                "",
            ),
        ],
    );
    expect_line(&b, "refusing the assignment", |l| {
        l.starts_with("bulkhead: device assignment refused: ")
            && l.contains("domain \"blk\": devices[0] matches no PCI function")
    });
    expect_line(&b, "refusing blk", |l| {
        l.starts_with("bulkhead: domain \"blk\" refused: its devices cannot be assigned")
    });
    b.expect_result_pass("guest");
}
