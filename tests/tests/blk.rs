//! The block split driver in a running system: the xenstore service domain (domain 1), the
//! block backend domain `blkback-dom`'s `blkback-domain` serving a RAM disk (domain 2), and
//! the test guest `blk-guest-dom` using dom-rt's blkfront (domain 3): the xenbus handshake
//! through xenstore, a seeded pattern written and read back through the rings, the RAM-disk
//! benchmarks, and a clean close. The backend powers off once its device is closed
//! (`exit_when_idle`) and the store once it is alone, so the system ends by itself.
//!
//! No toolstack writes device entries here yet: the backend writes its backend directory
//! (`serve=3:51712`) and the guest its frontend directory (`backend=2`), with the
//! permissions a Xen toolstack gives them.

use std::time::Duration;

use bulkhead_build::outcome::Outcome;
use tests::{Boot, Scenario};

const XENSTORE: &str = "\n[[domain]]\nname = \"xenstore\"\ncrate = \"xenstore-dom\"\nbinary = \"xenstore-domain\"\nmemory_mib = 16\ncmdline = \"exit_when_alone\"\ncapabilities = [\"xenstore_service\", \"grant_map\", \"domain_death_events\"]\n";

fn blkback(cmdline: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"blkback\"\ncrate = \"blkback-dom\"\nbinary = \"blkback-domain\"\nmemory_mib = 32\ncmdline = \"{cmdline}\"\ncapabilities = [\"grant_map\"]\n"
    )
}

fn guest(cmdline: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"blk-guest\"\ncrate = \"blk-guest-dom\"\nmemory_mib = 32\ncmdline = \"{cmdline}\"\ncapabilities = []\n"
    )
}

fn boot(name: &str, domains: &[String]) -> Boot {
    boot_with(name, XENSTORE, domains)
}

fn boot_with(name: &str, xenstore: &str, domains: &[String]) -> Boot {
    boot_qemu(name, xenstore, domains, &[])
}

fn boot_qemu(name: &str, xenstore: &str, domains: &[String], qemu: &[&str]) -> Boot {
    let toml = format!(
        "[system]\ndescription = \"blk: {name}\"\n{xenstore}{}",
        domains.concat()
    );
    let img = tests::system_image("blk", name, &toml);
    Scenario::new(name)
        .smp(2)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .qemu_args(qemu)
        .timeout(Duration::from_secs(240))
        .boot()
}

fn check(b: &Boot) {
    check_tag(b, "ram");
}

fn check_tag(b: &Boot, tag: &str) {
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    for r in ["blk_connect", "blk_pattern", "blk_close"] {
        b.expect_result_pass(r);
    }
    for m in [
        "randread_4k_iops_qd1",
        "randread_4k_iops_qd32",
        "randwrite_4k_iops_qd32",
        "seq_1m_mbps",
    ] {
        let m = &format!("blk_{tag}_{m}");
        match b.console().metric(m) {
            Some((v, unit)) if v > 0.0 => println!("METRIC {m} {v} {unit}"),
            _ => b.fail(&format!("no positive METRIC {m}")),
        }
    }
}

#[test]
fn guest_writes_and_reads_back_a_pattern_through_blkback() {
    let b = boot(
        "blk_ram",
        &[
            blkback("ramdisk_mib=8 serve=3:51712 exit_when_idle"),
            guest("backend=2"),
        ],
    );
    check(&b);
}

#[test]
fn every_feature_negotiated_on() {
    let b = boot(
        "blk_ram_features",
        &[
            blkback("ramdisk_mib=8 serve=3:51712 exit_when_idle"),
            guest("backend=2 queues=4 order=2"),
        ],
    );
    check(&b);
    if !b
        .console()
        .lines()
        .iter()
        .any(|l| l.contains("4 queue(s), ring order 2, persistent true"))
    {
        b.fail("backend did not connect 4 queues with order-2 rings and persistent grants");
    }
}

#[test]
fn an_old_frontend_without_persistent_grants_or_indirect() {
    let b = boot(
        "blk_ram_old",
        &[
            blkback("ramdisk_mib=8 serve=3:51712 exit_when_idle"),
            guest("backend=2 persistent=0 indirect=0"),
        ],
    );
    check(&b);
}

/// The toolstack's part: the control domain (domain 2, privileged in xenstore through the
/// store's `priv_domid=2`) writes the frontend and backend entries of the disk its command
/// line declares, with libxl's permissions, before the backend probes and the guest's
/// frontend finds `device/vbd/51712`; neither writes any device entry itself.
#[test]
fn the_control_domain_writes_the_device_entries() {
    let xenstore = XENSTORE.replace("exit_when_alone", "exit_when_alone priv_domid=2");
    let ctl = "\n[[domain]]\nname = \"ctl\"\ncrate = \"ctl-dom\"\nbinary = \"ctl-domain\"\nmemory_mib = 8\ncmdline = \"exit_when_idle disk=blk-guest:blkback:xvda:rw\"\ncapabilities = [\"domain_control\", \"domain_death_events\"]\n";
    let b = boot_with(
        "blk_ram_ctl",
        &xenstore,
        &[
            ctl.to_string(),
            blkback("ramdisk_mib=8 exit_when_idle"),
            guest(""),
        ],
    );
    check(&b);
    if !b.console().lines().iter().any(|l| {
        l.contains("ctl: disk xvda of blk-guest (domain 4) served by blkback (domain 3): device 51712 written")
    }) {
        b.fail("the control domain did not write the disk entries");
    }
}

/// The backend serves the assigned virtio-blk function (`disk=virtio`, dom-rt's device
/// layer, DMA confined by VT-d; QEMU needs `iommu_platform=on` on a modern-only device for
/// that) instead of a RAM disk; after QEMU exits the disk image holds what the guest wrote.
#[test]
fn guest_on_a_virtio_blk_disk() {
    let dir = tests::scenario_dir().join("blk-virtio-disk");
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("writing the disk");
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    let backend = "\n[[domain]]\nname = \"blkback\"\ncrate = \"blkback-dom\"\nbinary = \"blkback-domain\"\nmemory_mib = 32\ncmdline = \"disk=virtio serve=3:51712 exit_when_idle\"\ncapabilities = [\"grant_map\", \"device_owner\"]\ndevices = [{ id = \"1af4:1042\" }]\n";
    let b = boot_qemu(
        "blk_virtio",
        XENSTORE,
        &[backend.to_string(), guest("backend=2 tag=virtio")],
        &[
            "-device",
            "intel-iommu",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,addr=03.0,disable-legacy=on,iommu_platform=on",
        ],
    );
    check_tag(&b, "virtio");
    let img = std::fs::read(&disk).expect("reading the disk image");
    let nonzero = img.iter().filter(|&&x| x != 0).count();
    if nonzero < img.len() / 2 {
        b.fail(&format!(
            "the disk image holds {nonzero} non-zero bytes of {}: the writes did not reach it",
            img.len()
        ));
    }
}
