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

/// A disk image for the virtio-blk function, holding `bytes`, in the scenario's own folder.
fn virtio_disk(scenario: &str, bytes: Vec<u8>) -> std::path::PathBuf {
    let dir = tests::scenario_dir().join(scenario);
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, bytes).expect("writing the disk");
    disk
}

/// blkback owning the virtio-blk function (`disk=virtio ...`); `extra` TOML lines follow.
fn virtio_blkback(cmdline: &str, extra: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"blkback\"\ncrate = \"blkback-dom\"\nbinary = \"blkback-domain\"\nmemory_mib = 32\ncmdline = \"disk=virtio {cmdline}\"\ncapabilities = [\"grant_map\", \"device_owner\"]\ndevices = [{{ id = \"1af4:1042\" }}]\n{extra}"
    )
}

/// [`boot_qemu`] with `disk` as a virtio-blk function at 00:03.0 behind QEMU's VT-d
/// (`iommu_platform=on`, which needs `disable-legacy=on`: device id 1af4:1042).
fn boot_virtio(name: &str, xenstore: &str, domains: &[String], disk: &std::path::Path) -> Boot {
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    boot_qemu(
        name,
        xenstore,
        domains,
        &[
            "-device",
            "intel-iommu",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,addr=03.0,disable-legacy=on,iommu_platform=on",
        ],
    )
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
    let disk = virtio_disk("blk-virtio-disk", vec![0u8; 8 << 20]);
    let b = boot_virtio(
        "blk_virtio",
        XENSTORE,
        &[
            virtio_blkback("serve=3:51712 exit_when_idle", ""),
            guest("backend=2 tag=virtio"),
        ],
        &disk,
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

/// Two guests on two partitions of one virtio-blk disk (`part=3:8192+16384,4:24576+8192`:
/// 8 MiB from 4 MiB, 4 MiB from 12 MiB), each served as that guest's whole disk. Each guest
/// writes its seeded pattern with no benchmark after it (`bench=0`); after QEMU exits each
/// window holds exactly its guest's pattern and every byte outside both still holds the fill
/// byte the test put there.
#[test]
fn two_guests_on_two_partitions_of_the_virtio_blk_disk() {
    const FILL: u8 = 0x5a;
    const A: (usize, usize) = (8192 * 512, 16384 * 512);
    const B: (usize, usize) = (24576 * 512, 8192 * 512);
    // The guests' models of their disks start zeroed: the windows are zero, the rest FILL.
    let mut bytes = vec![FILL; 20 << 20];
    for (start, len) in [A, B] {
        bytes[start..start + len].fill(0);
    }
    let disk = virtio_disk("blk-virtio-part", bytes);
    let backend = virtio_blkback(
        "part=3:8192+16384,4:24576+8192 serve=3:51712,4:51712 exit_when_idle",
        "",
    );
    // Both guests negotiate persistent grants: each would keep up to 1056 mappings, the
    // backend's quota is 1024 for both together; the backend shares its budget between them
    // (this used to fail the second guest's 1 MiB writes with BLKIF_RSP_ERROR).
    let guest_named = |name: &str| {
        format!(
            "\n[[domain]]\nname = \"{name}\"\ncrate = \"blk-guest-dom\"\nmemory_mib = 32\ncmdline = \"backend=2 bench=0\"\ncapabilities = []\n"
        )
    };
    let b = boot_virtio(
        "blk_virtio_parts",
        XENSTORE,
        &[
            backend,
            guest_named("blk-guest-a"),
            guest_named("blk-guest-b"),
        ],
        &disk,
    );
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    let passes = |r: &str| {
        b.console()
            .lines()
            .iter()
            .filter(|l| l.contains(&format!("RESULT {r} pass")))
            .count()
    };
    let persistent = b
        .console()
        .lines()
        .iter()
        .filter(|l| l.contains("blkback:") && l.contains("persistent true"))
        .count();
    if persistent != 2 {
        b.fail(&format!(
            "{persistent} device(s) connected with persistent grants, want both"
        ));
    }
    for r in ["blk_connect", "blk_pattern", "blk_close"] {
        if passes(r) != 2 {
            b.fail(&format!(
                "{r} passed {} time(s), want once per guest",
                passes(r)
            ));
        }
    }
    let img = std::fs::read(&disk).expect("reading the disk image");
    for (name, (start, len)) in [("a", A), ("b", B)] {
        let model = pattern_model(len);
        if let Some(i) = (0..len).find(|&i| img[start + i] != model[i]) {
            b.fail(&format!(
                "guest {name}'s partition differs from its pattern at byte {i} of the window"
            ));
        }
    }
    let outside = img
        .iter()
        .enumerate()
        .filter(|&(i, _)| !(A.0..B.0 + B.1).contains(&i))
        .filter(|&(_, &x)| x != FILL)
        .count();
    if outside != 0 {
        b.fail(&format!("{outside} byte(s) outside the partitions changed"));
    }
}

/// blk-guest-dom's `blk_pattern` disk (its `pattern()`: 120 writes cycling through these
/// sizes at seeded sectors, each filled from its own seed), re-derived on the host.
fn pattern_model(disk: usize) -> Vec<u8> {
    const SIZES: [usize; 9] = [512, 4096, 1536, 45056, 45568, 131_072, 1 << 20, 3584, 65536];
    let mut model = vec![0u8; disk];
    let mut rng = Xorshift(0x5EED_B10C);
    for (i, &size) in SIZES.iter().cycle().take(120).enumerate() {
        let size = size.max(512) / 512 * 512;
        if size > disk {
            continue;
        }
        let sector = rng.next() % ((disk - size) / 512 + 1) as u64;
        let off = sector as usize * 512;
        let mut data = Xorshift((i as u64 + 1) | 1);
        for c in model[off..off + size].chunks_mut(8) {
            c.copy_from_slice(&data.next().to_le_bytes()[..c.len()]);
        }
    }
    model
}

/// The guest writes its seeded pattern (mixed sizes and offsets, flushes) on the virtio-blk
/// disk with no benchmark afterwards (`bench=0`); after QEMU exits the image must hold exactly
/// that pattern, byte for byte.
#[test]
fn the_disk_image_holds_exactly_the_pattern_after_qemu_exits() {
    let disk = virtio_disk("blk-virtio-exact", vec![0u8; 8 << 20]);
    let b = boot_virtio(
        "blk_virtio_exact",
        XENSTORE,
        &[
            virtio_blkback("serve=3:51712 exit_when_idle", ""),
            guest("backend=2 bench=0"),
        ],
        &disk,
    );
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    for r in ["blk_connect", "blk_pattern", "blk_close"] {
        b.expect_result_pass(r);
    }
    let img = std::fs::read(&disk).expect("reading the disk image");
    let model = pattern_model(img.len());
    if let Some(i) = (0..img.len()).find(|&i| img[i] != model[i]) {
        b.fail(&format!(
            "the disk image differs from the pattern at byte {i}: {:#04x}, want {:#04x}",
            img[i], model[i]
        ));
    }
}

/// xorshift64*, as blk-guest-dom's `restart.rs` draws it.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The disk blk-guest-dom's `role=restart` leaves after `writes` writes (see its
/// `restart.rs`: sizes, log positions and data all from the seed).
fn restart_model(disk: usize, writes: u64) -> Vec<u8> {
    const SEED: u64 = 0x0B10_C4E5_7A47;
    let mut model = vec![0u8; disk];
    let mut rng = Xorshift(SEED);
    let mut pos = 0usize;
    for i in 0..writes {
        let size = (1 + (rng.next() % 128) as usize) * 512;
        if pos + size > disk {
            pos = 0;
        }
        let mut data = Xorshift(SEED.wrapping_add(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for c in model[pos..pos + size].chunks_mut(8) {
            c.copy_from_slice(&data.next().to_le_bytes()[..c.len()]);
        }
        pos += size;
    }
    model
}

fn fnv64_words(buf: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in buf.chunks(8) {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        h ^= u64::from_le_bytes(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Restart without loss: the guest writes a seeded pattern continuously (queue depth 8,
/// flushes) on a virtio-blk disk served by blkback (domain 3, `on_crash = "restart"`); a
/// killer crashes blkback mid-run; ctl (domain 2) rebuilds it as domain 6 and re-points the
/// device (the guest's `backend`/`backend-id`, the new backend directory from the same
/// `disk=` declaration, the dead one's removed); the guest's blkfront notices, tears the old
/// rings and grants down, reconnects and re-issues every request without a response, in
/// order; the guest goes on, reads everything back and closes. After QEMU exits the disk
/// image must hold exactly the pattern of every acknowledged write (re-derived here).
#[test]
fn a_backend_restart_loses_no_acknowledged_write() {
    const DISK: usize = 16 << 20;
    let disk = virtio_disk("blk-restart", vec![0u8; DISK]);
    let xenstore = XENSTORE.replace("exit_when_alone", "exit_when_alone priv_domid=2");
    let ctl = "\n[[domain]]\nname = \"ctl\"\ncrate = \"ctl-dom\"\nbinary = \"ctl-domain\"\nmemory_mib = 8\ncmdline = \"exit_when_idle disk=blk-guest:blkback:xvda:rw\"\ncapabilities = [\"domain_control\", \"domain_death_events\"]\n";
    let backend = virtio_blkback("exit_when_idle", "on_crash = \"restart\"\n");
    let guest = "\n[[domain]]\nname = \"blk-guest\"\ncrate = \"blk-guest-dom\"\nmemory_mib = 64\ncmdline = \"role=restart\"\ncapabilities = []\n";
    let killer = "\n[[domain]]\nname = \"killer\"\ncrate = \"blk-guest-dom\"\nmemory_mib = 8\ncmdline = \"role=killer target=3 watch=4\"\ncapabilities = [\"remote_shutdown\"]\n";
    let b = boot_virtio(
        "blk_restart",
        &xenstore,
        &[
            ctl.to_string(),
            backend,
            guest.to_string(),
            killer.to_string(),
        ],
        &disk,
    );
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    for r in ["blk_connect", "killer", "blk_restart", "blk_close"] {
        b.expect_result_pass(r);
    }
    let lines = b.console().lines();
    let has = |what: &str, p: &dyn Fn(&str) -> bool| {
        if !lines.iter().any(|l| p(l)) {
            b.fail(&format!("no line {what}"));
        }
    };
    has("from ctl restarting blkback", &|l| {
        l.contains("ctl: restarted blkback as domain 6 (restart #1; domain 3 died: crash)")
    });
    has("from ctl re-pointing the device", &|l| {
        l.contains("ctl: device 51712 re-pointed: blkback (domain 3) is now domain 6")
    });
    has("from the guest reconnecting to domain 6", &|l| {
        l.contains("blk_restart: reconnected to backend 6")
    });
    for l in lines.iter().filter(|l| {
        [
            "blk_restart:",
            "ctl: restarted",
            "re-pointed",
            "rebuilt as",
            "shut 3",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        println!("{l}");
    }
    // "blk_restart: N writes acknowledged, K before …, checksum H"
    let summary = lines
        .iter()
        .find_map(|l| {
            let s = &l[l.find("blk_restart: ")? + "blk_restart: ".len()..];
            s.contains(" writes acknowledged, ").then(|| s.to_string())
        })
        .unwrap_or_else(|| b.fail("no blk_restart summary line"));
    let writes: u64 = summary
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| b.fail(&format!("summary without a write count: {summary}")));
    let before: u64 = summary
        .split(", ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| b.fail(&format!("summary without the count before: {summary}")));
    let checksum = summary
        .rsplit_once("checksum ")
        .and_then(|(_, h)| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| b.fail(&format!("summary without a checksum: {summary}")));
    if before == 0 || before >= writes {
        b.fail(&format!(
            "the kill was not mid-run: {before} of {writes} writes acknowledged before it"
        ));
    }
    let model = restart_model(DISK, writes);
    if fnv64_words(&model) != checksum {
        b.fail(&format!(
            "the guest's checksum {checksum:016x} is not the pattern's {:016x} for {writes} writes",
            fnv64_words(&model)
        ));
    }
    let img = std::fs::read(&disk).expect("reading the disk image");
    if img.len() != DISK {
        b.fail(&format!("the disk image is {} bytes", img.len()));
    }
    if let Some(bad) = (0..DISK).find(|&i| img[i] != model[i]) {
        b.fail(&format!(
            "the disk image differs from the pattern of the {writes} acknowledged writes at byte {bad}"
        ));
    }
    println!(
        "blk_restart: {summary}; image checked against {writes} writes ({before} before the kill)"
    );
    // From the kill to the first completion on the new backend (one clock for all domains).
    let at = |what: &str| {
        lines.iter().find_map(|l| {
            let s = &l[l.find(what)? + what.len()..];
            s.strip_suffix(" ns")?.trim().parse::<u64>().ok()
        })
    };
    match (
        at("blk_restart: killed domain 3 at "),
        at("blk_restart: first completion on the new backend at "),
    ) {
        (Some(k), Some(f)) if f > k => {
            println!("METRIC blk_restart_gap_ms {:.1} ms", (f - k) as f64 / 1e6)
        }
        (k, f) => b.fail(&format!(
            "no kill time and later first completion on the new backend: {k:?} {f:?}"
        )),
    }
    if let Some((v, unit)) = b.console().metric("blk_restart_silence_ms") {
        println!("METRIC blk_restart_silence_ms {v} {unit}");
    }
}
