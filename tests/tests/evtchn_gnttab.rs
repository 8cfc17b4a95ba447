//! Event-channel, grant-table and shared-ring scenarios: `tests/domains/evtchn-test-dom` in
//! pairs (roles on the command line, domain ids in manifest order from 1), booted under QEMU
//! and judged on their `RESULT` lines, the hypervisor's lines and the exit status.

use std::time::Duration;

use bulkhead_build::outcome::Outcome;
use tests::{Boot, Scenario};

/// One `evtchn-test-dom` domain; `caps` is a TOML list body (`"grant_map"`).
fn dom(name: &str, cmdline: &str, caps: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"{name}\"\ncrate = \"evtchn-test-dom\"\nmemory_mib = 4\ncmdline = \"{cmdline}\"\ncapabilities = [{caps}]\n"
    )
}

fn boot(name: &str, smp: u32, doms: &[String]) -> Boot {
    let toml = format!("[system]\ndescription = \"{name}\"\n{}", doms.concat());
    let img = tests::system_image("ev", name, &toml);
    Scenario::new(name)
        .smp(smp)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .timeout(Duration::from_secs(120))
        .boot()
}

fn expect_clean(b: &Boot) {
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    let balanced = b
        .console()
        .lines()
        .iter()
        .any(|l| l.starts_with("bulkhead: all ") && l.ends_with(": balanced"));
    if !balanced {
        b.fail("no `bulkhead: all N domains stopped ... balanced` line (frames leaked?)");
    }
}

fn index_of(b: &Boot, pred: impl Fn(&str) -> bool, what: &str) -> usize {
    match b.console().lines().iter().position(|l| pred(l)) {
        Some(i) => i,
        None => b.fail(&format!("no line {what}")),
    }
}

/// The number after `(free frames ` in a line.
fn free_frames(line: &str) -> Option<u64> {
    let rest = line.split("(free frames ").nth(1)?;
    rest.trim_end_matches(')').parse().ok()
}

fn pingpong(name: &str, smp: u32, metric: &str) {
    let n = 3000;
    let b = boot(
        name,
        smp,
        &[
            dom(
                "ping",
                &format!("role=ping peer=2 n={n} metric={metric}"),
                "",
            ),
            dom("pong", &format!("role=pong peer=1 n={n}"), ""),
        ],
    );
    expect_clean(&b);
    b.expect_result_pass("ping");
    b.expect_result_pass("pong");
    match b.console().metric(metric) {
        Some((v, _)) if v > 0.0 => {}
        _ => b.fail(&format!("no positive METRIC {metric}")),
    }
}

#[test]
fn pingpong_over_an_interdomain_channel_on_one_cpu() {
    pingpong("ev_pingpong_1cpu", 1, "evtchn_pingpong_same_cpu_cycles");
}

#[test]
fn pingpong_over_an_interdomain_channel_on_two_cpus() {
    pingpong("ev_pingpong_2cpu", 2, "evtchn_pingpong_cross_cpu_cycles");
}

#[test]
fn grant_map_round_trip_and_a_write_to_a_readonly_mapping_kills_only_the_mapper() {
    let b = boot(
        "ev_grant_map",
        2,
        &[
            dom("granter", "role=granter peer=2", ""),
            dom("mapper", "role=mapper peer=1", "\"grant_map\""),
        ],
    );
    expect_clean(&b);
    b.expect_result_pass("granter");
    b.expect_result_pass("mapper");
    b.expect_domain_exit("mapper", "fault");
    b.expect_domain_exit("granter", "poweroff");
    index_of(
        &b,
        |l| l.contains("(mapper) fault: vector 14"),
        "reporting the mapper's #PF",
    );
}

#[test]
fn grant_copies_of_random_lengths_and_offsets_both_ways() {
    let b = boot(
        "ev_grant_copy",
        1,
        &[
            dom("cgranter", "role=copy-granter peer=2", ""),
            dom("copier", "role=copier peer=1 n=3000 seed=4242", ""),
        ],
    );
    expect_clean(&b);
    b.expect_result_pass("cgranter");
    b.expect_result_pass("copier");
}

#[test]
fn a_dead_granters_page_stays_valid_and_out_of_the_pool_until_unmapped() {
    let b = boot(
        "ev_dying_granter",
        2,
        &[
            dom("dier", "role=dier peer=2", ""),
            dom("keeper", "role=keeper peer=1", "\"grant_map\""),
        ],
    );
    expect_clean(&b);
    b.expect_result_pass("keeper");
    b.expect_domain_exit("dier", "crash");
    let lines = b.console().lines();
    let died = index_of(
        &b,
        |l| l.contains("(dier) died with 1 page(s) mapped by other domains"),
        "saying the dead granter's page was kept",
    );
    let read = index_of(
        &b,
        |l| l.contains("granter is dead; reading its page"),
        "from the keeper reading after the death",
    );
    let back = index_of(
        &b,
        |l| l.contains("1 orphaned frame(s) back in the pool"),
        "saying the frame went back to the pool",
    );
    let unmapping = index_of(
        &b,
        |l| l.contains("unmapping the dead granter's page now"),
        "from the keeper before its unmap",
    );
    if !(died < read && read < unmapping && unmapping < back) {
        b.fail("expected: death (page kept), reads, unmap, then the frame back in the pool");
    }
    let (Some(before), Some(after)) = (free_frames(&lines[died]), free_frames(&lines[back])) else {
        b.fail("free-frame counts missing from the hypervisor's lines");
    };
    println!("free frames after the granter died: {before}; after the unmap: {after}");
    if after != before + 1 {
        b.fail(&format!(
            "free frames {before} after the death, {after} after the unmap: expected exactly one more"
        ));
    }
}

#[test]
fn hostile_sharing_calls_get_xen_errors_and_others_go_on() {
    let b = boot(
        "ev_hostile",
        2,
        &[
            dom("ping", "role=ping peer=2 n=3000", ""),
            dom("pong", "role=pong peer=1 n=3000", ""),
            dom("hostile", "role=hostile victim=1", "\"grant_map\""),
        ],
    );
    expect_clean(&b);
    b.expect_result_pass("hostile");
    b.expect_result_pass("ping");
    b.expect_result_pass("pong");
    b.expect_domain_exit("hostile", "poweroff");
}

/// Requests over the ring. A million takes about TCG-dependent seconds; see the report.
const RING_REQUESTS: u64 = 1_000_000;

#[test]
fn a_million_requests_over_a_shared_ring_arrive_in_order() {
    let b = boot(
        "ev_ring",
        2,
        &[
            dom(
                "front",
                &format!("role=ring-front peer=2 n={RING_REQUESTS} metric=ring_requests_per_s"),
                "",
            ),
            dom(
                "back",
                &format!("role=ring-back peer=1 n={RING_REQUESTS}"),
                "\"grant_map\"",
            ),
        ],
    );
    expect_clean(&b);
    println!("front: {}", b.expect_result_pass("front"));
    b.expect_result_pass("back");
}

#[test]
fn bench_domains_print_the_sharing_metrics() {
    let b = boot(
        "ev_bench",
        1,
        &[
            dom(
                "ping",
                "role=ping peer=2 n=2001 metric=evtchn_pingpong_same_cpu_cycles",
                "",
            ),
            dom("pong", "role=pong peer=1 n=2001", ""),
            dom("bgranter", "role=bench-granter peer=4", ""),
            dom(
                "bmapper",
                "role=bench-mapper peer=3 n=1001",
                "\"grant_map\"",
            ),
            dom(
                "front",
                "role=ring-front peer=6 n=200000 metric=ring_requests_per_s",
                "",
            ),
            dom("back", "role=ring-back peer=5 n=200000", "\"grant_map\""),
        ],
    );
    expect_clean(&b);
    for m in [
        "evtchn_pingpong_same_cpu_cycles",
        "gnttab_map_unmap_cycles",
        "gnttab_copy_4k_cycles_batch1",
        "gnttab_copy_4k_cycles_batch16",
        "gnttab_copy_4k_cycles_batch64",
        "ring_requests_per_s",
    ] {
        match b.console().metric(m) {
            Some((v, unit)) if v > 0.0 => println!("METRIC {m} {v} {unit}"),
            _ => b.fail(&format!("no positive METRIC {m}")),
        }
    }
}
