//! The block backend under a hostile frontend, and each blkif feature negotiated alone.
//!
//! - `a_hostile_frontend_is_answered_then_disconnected_and_its_neighbour_goes_on`: one
//!   `blkback-domain` (domain 2) serves two guests from two RAM disks (`serve=3:51712,4:51712`):
//!   the well-behaved `blk-guest-dom` (domain 3) writes and reads back its pattern while
//!   `blk-guest-dom role=hostile` (domain 4) sends out-of-range sectors, bad grant refs, bad
//!   segment bounds, too many segments and garbage operations, each of which must be answered
//!   (`BLKIF_RSP_ERROR` / `EOPNOTSUPP`, checked by the hostile guest per case), then corrupts
//!   its request producer index: the backend must disconnect it (Closing, then Closed) and the
//!   good guest's pattern, benchmarks and close must pass.
//! - `each_feature_alone`: one backend, four guests, each with exactly one of indirect
//!   descriptors, a multi-page ring (order 2), persistent grants and multi-queue (4) on and the
//!   others off; the backend's connect line and the guest's `blk_connect` line must show what
//!   was negotiated, and every guest's pattern passes.
//!
//! No toolstack: the backend writes its backend directories, each guest its frontend one.

use std::time::Duration;

use bulkhead_build::outcome::Outcome;
use tests::{Boot, Scenario};

const XENSTORE: &str = "\n[[domain]]\nname = \"xenstore\"\ncrate = \"xenstore-dom\"\nbinary = \"xenstore-domain\"\nmemory_mib = 16\ncmdline = \"exit_when_alone\"\ncapabilities = [\"xenstore_service\", \"grant_map\", \"domain_death_events\"]\n";

fn blkback(cmdline: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"blkback\"\ncrate = \"blkback-dom\"\nbinary = \"blkback-domain\"\nmemory_mib = 48\ncmdline = \"{cmdline}\"\ncapabilities = [\"grant_map\"]\n"
    )
}

fn guest(name: &str, cmdline: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"{name}\"\ncrate = \"blk-guest-dom\"\nmemory_mib = 32\ncmdline = \"{cmdline}\"\ncapabilities = []\n"
    )
}

fn boot(name: &str, domains: &[String]) -> Boot {
    let toml = format!(
        "[system]\ndescription = \"blk_hostile: {name}\"\n{XENSTORE}{}",
        domains.concat()
    );
    let img = tests::system_image("blk-hostile", name, &toml);
    Scenario::new(name)
        .smp(2)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .timeout(Duration::from_secs(300))
        .boot()
}

fn has_line(b: &Boot, parts: &[&str]) -> bool {
    b.console()
        .lines()
        .iter()
        .any(|l| parts.iter().all(|p| l.contains(p)))
}

/// The first console line holding every one of `parts` (printed for the log).
fn expect_line(b: &Boot, parts: &[&str], what: &str) {
    match b
        .console()
        .lines()
        .iter()
        .find(|l| parts.iter().all(|p| l.contains(p)))
    {
        Some(l) => println!("{what}: {l}"),
        None => b.fail(&format!("{what}: no console line with {parts:?}")),
    }
}

/// Every `RESULT <name>` line passed and there are exactly `n` of them.
fn expect_passes(b: &Boot, name: &str, n: usize) {
    let got = b
        .console()
        .results()
        .iter()
        .filter(|r| r.name == name && r.verdict == shared_abi::console::Verdict::Pass)
        .count();
    if got != n {
        b.fail(&format!("{got} passing RESULT {name} lines, want {n}"));
    }
}

#[test]
fn a_hostile_frontend_is_answered_then_disconnected_and_its_neighbour_goes_on() {
    let b = boot(
        "blk_hostile",
        &[
            blkback("ramdisk_mib=8 serve=3:51712,4:51712 exit_when_idle"),
            guest("blk-guest", "backend=2"),
            guest("blk-hostile", "role=hostile backend=2"),
        ],
    );
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    for r in ["blk_connect", "blk_pattern", "blk_close"] {
        b.expect_result_pass(r);
    }
    for case in [
        "connect",
        "good_read",
        "sector_past_end",
        "range_straddles_end",
        "sector_overflow",
        "reserved_gref",
        "ungranted_gref",
        "absurd_gref",
        "last_sect_outside_page",
        "sects_reversed",
        "zero_segments",
        "twelve_direct_segments",
        "indirect_4096_segments",
        "reserved_operation",
        "garbage_operation",
        "garbage_indirect_op",
        "good_read_after",
        "disconnected",
        "closed",
    ] {
        let d = b.expect_result_pass(&format!("blk_hostile_{case}"));
        println!("blk_hostile_{case}: {d}");
    }
    // The backend itself says why it dropped the hostile frontend, and only that one.
    expect_line(
        &b,
        &["backend/vbd/4/51712", "frontend corrupted ring 0"],
        "backend disconnect",
    );
    // ... while the good guest was connected and doing I/O (between its connect and close).
    let at = |parts: &[&str]| {
        b.console()
            .lines()
            .iter()
            .position(|l| parts.iter().all(|p| l.contains(p)))
    };
    let order = (
        at(&["RESULT blk_connect pass"]),
        at(&["backend/vbd/4/51712", "frontend corrupted ring 0"]),
        at(&["RESULT blk_close "]),
    );
    match order {
        (Some(c), Some(x), Some(e)) if c < x && x < e => {}
        _ => b.fail(&format!(
            "the corruption did not fall inside the good guest's I/O (connect, corruption, close line numbers: {order:?})"
        )),
    }
    if has_line(&b, &["backend/vbd/3/51712", "frontend corrupted ring"]) {
        b.fail("the backend blamed the good guest's ring");
    }
    // Refusals are logged (rate-limited) with the frontend's id.
    expect_line(
        &b,
        &["blkback: frontend 4 request", "beyond the disk"],
        "backend refusal log",
    );
    for m in [
        "randread_4k_iops_qd1",
        "randread_4k_iops_qd32",
        "randwrite_4k_iops_qd32",
        "seq_1m_mbps",
    ] {
        let m = &format!("blk_ram_{m}");
        match b.console().metric(m) {
            Some((v, unit)) if v > 0.0 => {
                println!("METRIC {m} {v} {unit} (next to a hostile frontend)")
            }
            _ => b.fail(&format!("no positive METRIC {m}")),
        }
    }
}

#[test]
fn each_feature_alone() {
    let b = boot(
        "blk_features_alone",
        &[
            blkback("ramdisk_mib=4 serve=3:51712,4:51712,5:51712,6:51712 exit_when_idle"),
            // Indirect descriptors only: one queue, order 0, no persistent grants.
            guest("blk-indirect", "backend=2 persistent=0"),
            // A multi-page ring only.
            guest("blk-order", "backend=2 order=2 persistent=0 indirect=0"),
            // Persistent grants only.
            guest("blk-persistent", "backend=2 indirect=0"),
            // Multi-queue only.
            guest(
                "blk-multiqueue",
                "backend=2 queues=4 persistent=0 indirect=0",
            ),
        ],
    );
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    for r in ["blk_connect", "blk_pattern", "blk_close"] {
        expect_passes(&b, r, 4);
    }
    let cases: [(u16, &str, &str, &str); 4] = [
        (
            3,
            "indirect",
            "1 queue(s), ring order 0, persistent false",
            "queues 1, ring order 0, persistent false, segments 32",
        ),
        (
            4,
            "multi-page ring",
            "1 queue(s), ring order 2, persistent false",
            "queues 1, ring order 2, persistent false, segments 11",
        ),
        (
            5,
            "persistent grants",
            "1 queue(s), ring order 0, persistent true",
            "queues 1, ring order 0, persistent true, segments 11",
        ),
        (
            6,
            "multi-queue",
            "4 queue(s), ring order 0, persistent false",
            "queues 4, ring order 0, persistent false, segments 11",
        ),
    ];
    for (dom, what, backend_says, guest_says) in cases {
        expect_line(
            &b,
            &[
                &format!("blkback: /local/domain/2/backend/vbd/{dom}/51712: connected: "),
                backend_says,
            ],
            &format!("{what}: the backend's connect line"),
        );
        expect_line(
            &b,
            &[
                &format!("/local/domain/{dom}/device/vbd/51712: backend 2 "),
                guest_says,
            ],
            &format!("{what}: the guest's blk_connect line"),
        );
    }
    // Only the indirect guest sent indirect requests.
    let indirect: Vec<&String> = b
        .console()
        .lines()
        .iter()
        .filter(|l| l.contains("blkfront: ") && l.contains(" indirect)"))
        .collect();
    let used = indirect
        .iter()
        .filter(|l| !l.contains("(0 indirect)"))
        .count();
    if indirect.len() != 4 || used != 1 {
        b.fail(&format!(
            "want 4 blkfront stats lines, exactly one with indirect requests: {indirect:?}"
        ));
    }
}
