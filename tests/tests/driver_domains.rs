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

// ---- blk-driver-dom: a virtio-blk driver domain on dom-rt's device layer ----
//
// The device is created with `iommu_platform=on`: without it QEMU's virtio DMA bypasses the
// emulated IOMMU altogether (it would go to raw guest-physical addresses), so neither the
// driver's reads nor the confinement could work. QEMU allows it only on a modern-only device
// (`disable-legacy=on`, id 1af4:1042). The driver accepts VIRTIO_F_ACCESS_PLATFORM for it
// (dom_rt::device::virtio::VirtioTransport).

/// Sector `s` of the test disk: a 16-byte tag, then a pattern.
fn sector_contents(s: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..512u64)
        .map(|i| (((s * 131 + i * 7) ^ 0x5a) & 0xff) as u8)
        .collect();
    v[..16].copy_from_slice(format!("BULKHEAD-SECTOR{}", s % 10).as_bytes());
    v
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A 1 MiB disk whose sectors hold `sector_contents`.
fn patterned_disk(name: &str) -> String {
    let dir = scenario_dir().join(format!("drv-{name}"));
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let path = dir.join("disk.raw");
    let img: Vec<u8> = (0..2048u64).flat_map(sector_contents).collect();
    std::fs::write(&path, img).expect("writing the disk");
    path.display().to_string()
}

fn blk_domain(name: &str, cmdline: &str, caps: &[&str], devices: bool) -> String {
    let caps: Vec<String> = caps.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "\n[[domain]]\nname = \"{name}\"\ncrate = \"blk-driver-dom\"\nmemory_mib = 8\n\
         cmdline = \"{cmdline}\"\ncapabilities = [{}]\n{}\n",
        caps.join(", "),
        if devices {
            "devices = [{ id = \"1af4:1042\" }]"
        } else {
            ""
        }
    )
}

fn blk_boot(name: &str, domains: &[String]) -> Boot {
    let toml = format!(
        "[system]\ndescription = \"driver domains: {name}\"\n{}",
        domains.concat()
    );
    let img = tests::system_image("drv", name, &toml);
    let drive = format!("file={},if=none,id=d0,format=raw", patterned_disk(name));
    Scenario::new(name)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .qemu_args(&[
            "-device",
            "intel-iommu",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,addr=03.0,disable-legacy=on,iommu_platform=on",
        ])
        .timeout(Duration::from_secs(240))
        .boot()
}

/// The value of `key=` in a RESULT's details.
fn field<'a>(details: &'a str, key: &str) -> Option<&'a str> {
    details
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn virtio_blk_driver_domain_reads_its_disk_with_interrupts_as_events_and_others_are_refused() {
    let b = blk_boot(
        "blk-read",
        &[
            blk_domain("blk", "role=read n=200 share=2,3", &["device_owner"], true),
            blk_domain(
                "snoop",
                "role=snoop owner=1 ref=8",
                &["device_owner", "grant_map"],
                false,
            ),
            blk_domain("guest", "role=snoop owner=1 ref=9", &["grant_map"], false),
        ],
    );
    let details = b.expect_result_pass("blk");
    for s in 0..2 {
        let want = sector_contents(s);
        assert_eq!(
            field(&details, &format!("sector{s}")),
            Some(hex(&want[..16]).as_str()),
            "{details}"
        );
        assert_eq!(
            field(&details, &format!("sector{s}_fnv")),
            Some(format!("{:016x}", fnv1a(&want)).as_str()),
            "{details}"
        );
    }
    let delivered: u64 = field(&details, "delivered")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        delivered >= 202,
        "interrupts delivered as events: {details}"
    );
    match b.console().metric("irq_to_event_cycles") {
        Some((v, unit)) if v > 0.0 => println!("METRIC irq_to_event_cycles {v} {unit}"),
        _ => b.fail("no METRIC irq_to_event_cycles line"),
    }
    // A device_owner that was not given the device, and a domain without the right.
    let snoop = b.expect_result_pass("snoop");
    let guest = b.expect_result_pass("guest");
    for d in [&snoop, &guest] {
        for op in [
            "map_bar=",
            "map_pirq=",
            "irq_stats=",
            "bind_pirq=",
            "config_read=",
        ] {
            assert!(d.contains(op), "{op} not refused: {d}");
        }
    }
    assert!(guest.contains("map_bar=EPERM"), "{guest}");
    // Last: the memory balance (every frame back after the domains died).
    b.expect_outcome(Outcome::CleanPoweroff);
}

#[test]
fn a_dma_outside_the_driver_domain_faults_in_the_iommu_and_the_victim_is_unchanged() {
    let b = blk_boot(
        "blk-escape",
        &[
            blk_domain(
                "drv",
                "role=dma-escape victim=2",
                &["device_owner", "grant_map"],
                true,
            ),
            blk_domain("victim", "role=victim peer=1", &[], false),
        ],
    );
    let victim = b.expect_result_pass("victim");
    assert!(victim.contains("canary intact"), "{victim}");
    let drv = b.expect_result_pass("drv");
    // Both attempts were stopped, and the device worked again after the reset.
    assert!(drv.contains("0x1000:"), "{drv}");
    let want = sector_contents(0);
    assert_eq!(
        field(&drv, "sector0_fnv"),
        Some(format!("{:016x}", fnv1a(&want)).as_str()),
        "{drv}"
    );
    let faults = b
        .console()
        .lines()
        .iter()
        .filter(|l| l.contains("iommu: unit ") && l.contains("fault"))
        .count();
    if faults == 0 {
        b.fail("no IOMMU fault reported on the console");
    }
    println!("{faults} IOMMU fault line(s); driver: {drv}");
    b.expect_outcome(Outcome::CleanPoweroff);
}

#[test]
fn a_virtio_blk_driver_domain_alone_gives_back_every_frame() {
    // BAR mappings, a bound MSI-X entry and IOMMU-mapped DMA buffers, then poweroff: the
    // hypervisor's memory balance must come out even.
    let b = blk_boot(
        "blk-alone",
        &[blk_domain("blk", "role=read n=0", &["device_owner"], true)],
    );
    b.expect_result_pass("blk");
    b.expect_outcome(Outcome::CleanPoweroff);
}

/// The xenstore and control domains (1 and 2) that apply `on_crash = "restart"`; ctl's
/// `exit_when_idle` ends the boot once only the two of them are left.
const LIFECYCLE_PRELUDE: &str = r#"
[[domain]]
name = "xenstore"
crate = "xenstore-dom"
binary = "xenstore-domain"
memory_mib = 16
cmdline = "exit_when_alone"
capabilities = ["xenstore_service", "grant_map", "domain_death_events"]

[[domain]]
name = "ctl"
crate = "ctl-dom"
binary = "ctl-domain"
memory_mib = 8
cmdline = "exit_when_idle"
capabilities = ["domain_control", "domain_death_events"]
"#;

#[test]
fn a_driver_domain_killed_mid_io_restarts_on_the_same_device_and_works() {
    let drv = blk_domain(
        "drv",
        "role=writer first=3 n_after=20",
        &["device_owner"],
        true,
    ) + "on_crash = \"restart\"\n";
    let killer = "\n[[domain]]\nname = \"killer\"\ncrate = \"pv-test-dom\"\nmemory_mib = 4\n\
                  cmdline = \"role=killer target=3 after_ms=400 reason=crash\"\n\
                  capabilities = [\"remote_shutdown\"]\n"
        .to_string();
    let b = blk_boot("blk-restart", &[LIFECYCLE_PRELUDE.to_string(), drv, killer]);
    let lines = b.console().lines();
    if !lines
        .iter()
        .any(|l| l == "bulkhead: domain 3 (drv) exited: crash")
    {
        b.fail("the writer was not killed (no crash exit for domain 3)");
    }
    if !lines.iter().any(|l| l.contains("writer: domain 3 writing")) {
        b.fail("the first writer never started writing");
    }
    let details = b.expect_result_pass("drv");
    assert!(details.contains("restarted as domain"), "{details}");
    assert!(details.contains("20 writes, last read back"), "{details}");
    b.expect_no_failed_results();
    b.expect_outcome(Outcome::CleanPoweroff);
}
