//! PV-domain scenarios: real domains (`tests/domains/pv-test-dom`, `hello-dom`) built into
//! per-scenario boot images and run under QEMU. Each scenario's system is described inline
//! (the `systems/*.toml` format), built with `bulkhead_build::image::write`, and judged on
//! the console: domain state lines, `RESULT` lines from the domains, the hypervisor's
//! memory-balance line, and the exit status.

use std::time::Duration;

use bulkhead_build::outcome::Outcome;
use tests::{Boot, Scenario};

fn domain(name: &str, krate: &str, mib: u32, cmdline: &str, extra: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"{name}\"\ncrate = \"{krate}\"\nmemory_mib = {mib}\ncmdline = \"{cmdline}\"\n{extra}\n"
    )
}

fn system_of(desc: &str, domains: &[String]) -> String {
    format!("[system]\ndescription = \"{desc}\"\n{}", domains.concat())
}

fn boot(name: &str, smp: u32, toml: &str) -> Boot {
    let img = tests::system_image("pv", name, toml);
    Scenario::new(name)
        .smp(smp)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .timeout(Duration::from_secs(120))
        .boot()
}

/// The `key=value` numbers of domain `name`'s passing RESULT line.
fn result_numbers(b: &Boot, name: &str) -> std::collections::HashMap<String, f64> {
    let results = b.console().results();
    let Some(r) = results.iter().find(|r| r.name == name) else {
        b.fail(&format!("no RESULT line from {name}"))
    };
    if r.verdict != shared_abi::console::Verdict::Pass {
        b.fail(&format!("{name} reported fail: {}", r.details));
    }
    r.details
        .split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn expect_balanced(b: &Boot) {
    let ok = b
        .console()
        .lines()
        .iter()
        .any(|l| l.starts_with("bulkhead: all ") && l.ends_with(": balanced"));
    if !ok {
        b.fail("no `bulkhead: all N domains stopped ... balanced` line (frames leaked?)");
    }
}

#[test]
fn two_domains_print_and_exit_with_their_reasons() {
    let toml = system_of(
        "two hello domains",
        &[
            domain("hello", "hello-dom", 4, "", ""),
            domain("hello2", "hello-dom", 4, "", ""),
        ],
    );
    let b = boot("pv_two_domains", 2, &toml);
    b.expect_outcome(Outcome::CleanPoweroff);
    let ready = b.expect_ready();
    if ready.boot_domains != 2 {
        b.fail("ready line does not count 2 boot domains");
    }
    for n in ["hello", "hello2"] {
        let said_hello = b
            .console()
            .lines()
            .iter()
            .any(|l| l.starts_with(&format!("({n}) ")) && l.contains("hello from domain"));
        if !said_hello {
            b.fail(&format!("domain {n} printed nothing through console_io"));
        }
        b.expect_domain_exit(n, "poweroff");
    }
    expect_balanced(&b);
}

#[test]
fn faulting_domains_are_stopped_and_the_others_go_on() {
    let bad = ["read-hv", "read-unmapped", "write-text", "exec-data"];
    let mut doms = vec![domain(
        "survivor",
        "pv-test-dom",
        4,
        "role=survivor rounds=30",
        "",
    )];
    doms.extend(
        bad.iter()
            .map(|r| domain(r, "pv-test-dom", 2, &format!("role={r}"), "")),
    );
    let b = boot("pv_isolation", 2, &system_of("isolation", &doms));
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    for r in bad {
        b.expect_domain_exit(r, "fault");
        let reported = b.console().lines().iter().any(|l| {
            l.starts_with("bulkhead: domain ")
                && l.contains(&format!("({r}) fault: vector 14"))
                && l.contains(" rip ")
                && l.contains(" cr2 ")
        });
        if !reported {
            b.fail(&format!("no #PF fault report line for {r}"));
        }
    }
    result_numbers(&b, "survivor");
    b.expect_domain_exit("survivor", "poweroff");
    expect_balanced(&b);
}

#[test]
fn weights_two_to_one_share_one_cpu_two_to_one() {
    let toml = system_of(
        "fairness",
        &[
            domain(
                "heavy",
                "pv-test-dom",
                2,
                "role=spin until=3000",
                "weight = 512",
            ),
            domain(
                "light",
                "pv-test-dom",
                2,
                "role=spin until=3000",
                "weight = 256",
            ),
        ],
    );
    let b = boot("pv_fairness", 1, &toml);
    b.expect_outcome(Outcome::CleanPoweroff);
    let h = result_numbers(&b, "heavy")["running_ns"];
    let l = result_numbers(&b, "light")["running_ns"];
    let ratio = h / l.max(1.0);
    if !(1.8..=2.2).contains(&ratio) {
        b.fail(&format!(
            "running time ratio {ratio:.3} (heavy {h} ns, light {l} ns), expected 2 within 10%"
        ));
    }
}

#[test]
fn capped_domain_stays_under_its_cap_and_blocked_domain_uses_no_cpu() {
    let toml = system_of(
        "cap and block",
        &[
            domain(
                "capped",
                "pv-test-dom",
                2,
                "role=spin until=2000",
                "cap = 25",
            ),
            domain("blocker", "pv-test-dom", 2, "role=block ms=1500", ""),
        ],
    );
    let b = boot("pv_cap_block", 1, &toml);
    b.expect_outcome(Outcome::CleanPoweroff);
    let c = result_numbers(&b, "capped");
    let share = c["running_ns"] / c["wall_ns"].max(1.0);
    // The scheduler carries a slice's overrun (a late TCG timer interrupt) into the next
    // periods as debt, so the long-run share is the cap; the allowance covers the budget the
    // domain starts with and its last slice's overrun within a 2 s run (a few ms each).
    if share > 0.28 {
        b.fail(&format!(
            "capped domain used {:.1}% of a CPU, cap 25%",
            share * 100.0
        ));
    }
    // Debt is paid back, not kept for ever: the domain still gets close to its cap (measured
    // 24.7-25.3%, also next to two CPU hogs on the same 2 cores).
    if share < 0.20 {
        b.fail(&format!(
            "capped domain got only {:.1}% of a CPU, cap 25%",
            share * 100.0
        ));
    }
    let k = result_numbers(&b, "blocker");
    if k["running_ns"] > 0.02 * k["wall_ns"] {
        b.fail(&format!(
            "blocked domain ran {} ns of {} ns",
            k["running_ns"], k["wall_ns"]
        ));
    }
}

#[test]
fn four_cpu_bound_domains_run_in_parallel_on_four_cpus() {
    let doms: Vec<String> = (1..=4)
        .map(|i| {
            domain(
                &format!("spin{i}"),
                "pv-test-dom",
                2,
                "role=spin until=2000",
                "",
            )
        })
        .collect();
    let b = boot("pv_parallel", 4, &system_of("parallel", &doms));
    b.expect_outcome(Outcome::CleanPoweroff);
    for i in 1..=4 {
        let n = result_numbers(&b, &format!("spin{i}"));
        let share = n["running_ns"] / n["wall_ns"].max(1.0);
        if share < 0.7 {
            b.fail(&format!(
                "spin{i} ran {:.0}% of the wall time: not in parallel",
                share * 100.0
            ));
        }
    }
}

#[test]
fn hostile_hypercalls_never_hurt_the_hypervisor_and_memory_limits_hold() {
    let toml = system_of(
        "hostile",
        &[
            domain(
                "hostile",
                "pv-test-dom",
                4,
                "role=hostile n=300000 seed=12345",
                "",
            ),
            domain("memlimit", "pv-test-dom", 2, "role=memlimit", ""),
            domain("survivor", "pv-test-dom", 2, "role=survivor rounds=20", ""),
        ],
    );
    let b = boot("pv_hostile", 2, &toml);
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    let seeded = b
        .console()
        .lines()
        .iter()
        .any(|l| l.contains("random hypercalls, seed 0x3039"));
    if !seeded {
        b.fail("the hostile domain did not print its seed");
    }
    result_numbers(&b, "hostile");
    result_numbers(&b, "memlimit");
    let memlimit_saw_enomem = b
        .console()
        .results()
        .iter()
        .any(|r| r.name == "memlimit" && r.details.contains("Err(ENOMEM)"));
    if !memlimit_saw_enomem {
        b.fail("growing past the memory limit did not answer ENOMEM");
    }
    result_numbers(&b, "survivor");
    b.expect_domain_exit("hostile", "poweroff");
    expect_balanced(&b);
}

#[test]
fn bench_domain_prints_hypercall_and_switch_metrics() {
    let toml = system_of(
        "bench",
        &[
            domain("bench", "pv-test-dom", 4, "role=bench", ""),
            domain("yielder", "pv-test-dom", 2, "role=yielder until=3000", ""),
        ],
    );
    let b = boot("pv_bench", 1, &toml);
    b.expect_outcome(Outcome::CleanPoweroff);
    for m in [
        "hypercall_null_cycles",
        "domain_switch_cycles",
        "domain_build_ms",
    ] {
        match b.console().metric(m) {
            Some((v, _)) if v > 0.0 => {}
            _ => b.fail(&format!("no positive METRIC {m}")),
        }
    }
}
