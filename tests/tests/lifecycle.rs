//! Boot-domain lifecycle scenarios: the manifest's `on_poweroff` / `on_reboot` / `on_crash`
//! applied by the real control domain (`ctl-dom`'s `ctl-domain` binary) through the
//! hypervisor's rebuild-boot-domain domctl. Victims are `pv-test-dom` survivors killed by a
//! `pv-test-dom` killer (`SCHEDOP_remote_shutdown`, reason crash) or faulting on purpose.
//!
//! Every system has the xenstore domain (1) and ctl (2) first; ctl's `exit_when_idle` ends
//! the boot once only the two of them are left, so each boot powers off on its own.

use std::time::Duration;

use bulkhead_build::outcome::Outcome;
use tests::{Boot, Scenario, scenario_dir};

const PRELUDE: &str = r#"
[[domain]]
name = "xenstore"
crate = "xenstore-dom"
binary = "xenstore-domain"
memory_mib = 16
cmdline = "exit_when_alone"
capabilities = ["xenstore_service", "grant_map", "domain_death_events"]
"#;

fn ctl(cmdline: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"ctl\"\ncrate = \"ctl-dom\"\nbinary = \"ctl-domain\"\n\
         memory_mib = 8\ncmdline = \"exit_when_idle {cmdline}\"\n\
         capabilities = [\"domain_control\", \"domain_death_events\"]\n"
    )
}

fn test_dom(name: &str, cmdline: &str, extra: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"{name}\"\ncrate = \"pv-test-dom\"\nmemory_mib = 4\n\
         cmdline = \"{cmdline}\"\n{extra}\n"
    )
}

fn killer(name: &str, target: u16, after_ms: u32) -> String {
    test_dom(
        name,
        &format!("role=killer target={target} after_ms={after_ms} reason=crash"),
        "capabilities = [\"remote_shutdown\"]",
    )
}

fn boot(name: &str, domains: &[String]) -> Boot {
    boot_with(name, domains, &[])
}

fn boot_with(name: &str, domains: &[String], qemu_args: &[&str]) -> Boot {
    let toml = format!(
        "[system]\ndescription = \"lifecycle: {name}\"\n{PRELUDE}{}",
        domains.concat()
    );
    let img = tests::system_image("life", name, &toml);
    Scenario::new(name)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .qemu_args(qemu_args)
        .timeout(Duration::from_secs(120))
        .boot()
}

fn lines<'a>(b: &'a Boot, pred: impl Fn(&str) -> bool + 'a) -> Vec<&'a str> {
    b.console()
        .lines()
        .iter()
        .map(|l| l.as_str())
        .filter(|l| pred(l))
        .collect()
}

fn expect_line(b: &Boot, what: &str, pred: impl Fn(&str) -> bool) -> String {
    match b.console().lines().iter().find(|l| pred(l)) {
        Some(l) => l.to_string(),
        None => b.fail(&format!("no console line {what}")),
    }
}

#[test]
fn a_crashed_domain_with_on_crash_restart_comes_back_with_a_new_id() {
    let b = boot(
        "restart",
        &[
            ctl(""),
            test_dom(
                "victim",
                "role=survivor rounds=60",
                "on_crash = \"restart\"",
            ),
            killer("killer", 3, 150),
        ],
    );
    b.expect_outcome(Outcome::CleanPoweroff);
    expect_line(&b, "from ctl naming victim's policies", |l| {
        l == "(ctl) ctl: boot domain 2 victim (domain 3): on_poweroff=destroy on_reboot=destroy \
              on_crash=restart"
    });
    b.expect_result_pass("killer");
    expect_line(&b, "saying domain 3 crashed", |l| {
        l == "bulkhead: domain 3 (victim) exited: crash"
    });
    expect_line(&b, "from ctl restarting victim as domain 5", |l| {
        l.starts_with("(ctl) ctl: restarted victim as domain 5 (restart #1")
    });
    // xenstore learns of the new domain the way it learns of boot domains.
    expect_line(&b, "from xenstore serving the rebuilt domain", |l| {
        l.starts_with("(xenstore) xenstored: serving domain 5 ")
    });
    // The second instance runs its whole course and powers off; only it reports.
    let details = b.expect_result_pass("victim");
    assert!(details.contains("60 rounds"), "{details}");
    expect_line(&b, "saying domain 5 powered off", |l| {
        l == "bulkhead: domain 5 (victim) exited: poweroff"
    });
    expect_line(&b, "from ctl destroying on poweroff", |l| {
        l.starts_with("(ctl) ctl: victim (domain 5) died: poweroff; destroyed")
    });
    b.expect_no_failed_results();
}

#[test]
fn destroy_stays_gone_preserve_stays_and_the_rebuild_op_checks_its_caller() {
    let with_ctl = "capabilities = [\"domain_control\"]";
    let b = boot(
        "destroy-preserve",
        &[
            ctl(""),
            // 3 and 4: killed at 150 ms.
            test_dom("gone", "role=survivor rounds=60", ""),
            test_dom("kept", "role=survivor rounds=60", "on_crash = \"preserve\""),
            killer("killer1", 3, 150),
            killer("killer2", 4, 150),
            // The domctl's refusals.
            test_dom("nocap", "role=rebuild index=2 want=eperm info=1", ""),
            test_dom(
                "badidx",
                "role=rebuild index=99 want=esrch info=1",
                with_ctl,
            ),
            test_dom("badname", "role=rebuild name=nobody want=esrch", with_ctl),
            test_dom("busy", "role=rebuild index=0 want=ebusy info=1", with_ctl),
        ],
    );
    b.expect_outcome(Outcome::CleanPoweroff);
    b.expect_no_failed_results();
    for r in ["killer1", "killer2", "nocap", "badidx", "badname", "busy"] {
        b.expect_result_pass(r);
    }
    expect_line(&b, "from ctl destroying gone", |l| {
        l == "(ctl) ctl: gone (domain 3) died: crash; destroyed, as its policy says"
    });
    expect_line(&b, "from ctl preserving kept", |l| {
        l.starts_with("(ctl) ctl: kept (domain 4) died: crash; preserved")
    });
    // Kept shut down (state 3) with its memory until ctl cleans up at the end.
    expect_line(
        &b,
        "from ctl destroying the preserved domain at the end",
        |l| l == "(ctl) ctl: destroying preserved domain 4 (state Some(3)) before powering off",
    );
    if !lines(&b, |l| l.starts_with("(ctl) ctl: restarted")).is_empty() {
        b.fail("a domain was restarted");
    }
    if !lines(&b, |l| l.contains("rebuilt as domain")).is_empty() {
        b.fail("the hypervisor rebuilt a domain");
    }
    // Neither victim reported: both died before their rounds ended.
    for v in ["gone", "kept"] {
        if b.console().results().iter().any(|r| r.name == v) {
            b.fail(&format!("{v} ran to its end"));
        }
    }
}

#[test]
fn a_crash_loop_is_stopped_by_the_restart_limit() {
    let b = boot(
        "crash-loop",
        &[
            ctl("max_restarts=2 window_ms=60000"),
            test_dom("looper", "role=write-text", "on_crash = \"restart\""),
        ],
    );
    b.expect_outcome(Outcome::CleanPoweroff);
    let restarts = lines(&b, |l| {
        l.starts_with("(ctl) ctl: restarted looper as domain ")
    });
    if restarts.len() != 2 {
        b.fail(&format!(
            "expected 2 restarts before the limit, saw {}",
            restarts.len()
        ));
    }
    assert!(restarts[0].contains("(restart #1"), "{}", restarts[0]);
    assert!(restarts[1].contains("(restart #2"), "{}", restarts[1]);
    let faults = lines(&b, |l| l.contains("(looper) exited: fault"));
    if faults.len() != 3 {
        b.fail(&format!("expected 3 faults, saw {}", faults.len()));
    }
    expect_line(&b, "from ctl giving up on the crash loop", |l| {
        l.starts_with("(ctl) ctl: looper (domain ")
            && l.contains("restart limit (2 per 60000 ms) reached; leaving it destroyed")
    });
}

#[test]
fn a_restarted_driver_domain_gets_its_device_back_confined() {
    // A 1 MiB raw disk for the virtio-blk function at 00:03.0.
    let dir = scenario_dir().join("life-driver");
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("writing the disk");
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    // The driver domain checks its device and powers off; on_poweroff = restart brings it
    // back once (max_restarts=1), on the same device, and it checks it again.
    let b = boot_with(
        "driver",
        &[
            ctl("max_restarts=1"),
            test_dom(
                "blk",
                "role=pci expect=owner dma=confined",
                "capabilities = [\"device_owner\"]\ndevices = [{ id = \"1af4:1001\" }]\n\
                 on_poweroff = \"restart\"",
            ),
        ],
        &[
            "-device",
            "intel-iommu",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,addr=03.0",
        ],
    );
    b.expect_outcome(Outcome::CleanPoweroff);
    b.expect_no_failed_results();
    let passes = b
        .console()
        .results()
        .iter()
        .filter(|r| r.name == "blk" && r.verdict == shared_abi::console::Verdict::Pass)
        .count();
    if passes != 2 {
        b.fail(&format!("expected 2 passing runs of blk, saw {passes}"));
    }
    for id in [3, 4] {
        expect_line(&b, &format!("assigning 00:03.0 to domain {id}"), |l| {
            l == format!(
                "bulkhead: device 00:03.0 1af4:1001 assigned to domain {id} (blk), DMA confined \
                 by VT-d"
            )
        });
    }
    expect_line(&b, "taking the device back from domain 3", |l| {
        l == "bulkhead: device 00:03.0 taken back from dying domain 3: quiesced, DMA blocked"
    });
    expect_line(&b, "from ctl restarting blk", |l| {
        l.starts_with("(ctl) ctl: restarted blk as domain 4 (restart #1; domain 3 died: poweroff)")
    });
    expect_line(&b, "from ctl stopping after one restart", |l| {
        l.starts_with("(ctl) ctl: blk (domain 4) died again after 1 restarts")
    });
}

#[test]
fn the_shipped_lifecycle_system_restarts_hello_until_the_limit() {
    let path = bulkhead_build::workspace::Workspace::locate()
        .root
        .join("systems/lifecycle.toml");
    let toml = std::fs::read_to_string(&path).expect("reading systems/lifecycle.toml");
    let img = tests::system_image("life", "shipped", &toml);
    let b = Scenario::new("lifecycle-shipped")
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .timeout(Duration::from_secs(120))
        .boot();
    b.expect_outcome(Outcome::CleanPoweroff);
    let restarts = lines(&b, |l| {
        l.starts_with("(ctl) ctl: restarted hello as domain ")
    });
    if restarts.len() != 2 {
        b.fail(&format!(
            "expected 2 restarts of hello, saw {}",
            restarts.len()
        ));
    }
    expect_line(&b, "from ctl stopping hello at the limit", |l| {
        l.starts_with("(ctl) ctl: hello (domain ") && l.contains("restart limit (2 per 60000 ms)")
    });
}
