//! The xenstore service domain in a running system: `xenstore-dom`'s `xenstore-domain`
//! binary first (domain 1), then `tests/domains/xs-client-dom` clients (domains 2.., manifest
//! order) speaking xenbus over their ring pages, judged on their `RESULT` lines, the service
//! domain's log and the exit status. The service domain powers off once no other domain is
//! alive (`exit_when_alone`), so the system ends by itself.

use std::time::Duration;

use bulkhead_build::outcome::Outcome;
use bulkhead_build::workspace::Workspace;
use bulkhead_build::{image, system};
use tests::{Boot, Scenario, scenario_dir};

const XENSTORE: &str = "\n[[domain]]\nname = \"xenstore\"\ncrate = \"xenstore-dom\"\nbinary = \"xenstore-domain\"\nmemory_mib = 16\ncmdline = \"exit_when_alone\"\ncapabilities = [\"xenstore_service\", \"grant_map\", \"domain_death_events\"]\n";

fn client(name: &str, cmdline: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"{name}\"\ncrate = \"xs-client-dom\"\nmemory_mib = 4\ncmdline = \"{cmdline}\"\ncapabilities = []\n"
    )
}

fn boot(name: &str, clients: &[String]) -> Boot {
    let toml = format!(
        "[system]\ndescription = \"{name}\"\n{XENSTORE}{}",
        clients.concat()
    );
    let ws = Workspace::locate();
    let dir = scenario_dir().join(format!("xs-{name}"));
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, &toml).expect("writing the system description");
    let sys = system::parse(&path, &toml).unwrap_or_else(|e| panic!("system {name}: {e}"));
    let built = image::write(&ws, &sys, &dir).unwrap_or_else(|e| panic!("image {name}: {e:#}"));
    let img = std::fs::read(&built.image).expect("reading the built image");
    Scenario::new(name)
        .smp(2)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .timeout(Duration::from_secs(120))
        .boot()
}

fn expect_line(b: &Boot, needle: &str) {
    if !b.console().lines().iter().any(|l| l.contains(needle)) {
        b.fail(&format!("no console line containing {needle:?}"));
    }
}

#[test]
fn two_clients_share_the_store_and_a_corrupting_third_is_dropped_alone() {
    let b = boot(
        "xs_domain",
        &[
            client("xs-a", "role=a peer=3 corrupter=4"),
            client("xs-b", "role=b peer=2"),
            client("xs-c", "role=corrupt watcher=2"),
        ],
    );
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    for r in [
        "xs_write",
        "xs_read",
        "xs_directory",
        "xs_watch_fires_for_peer_write",
        "xs_txn_conflict_retried",
        "xs_ring_throughput",
        "xs_peer_ping_written",
        "xs_txn_peer_committed",
        "xs_corrupt_client_connected",
        "xs_corrupt_dropped",
        "xs_corrupt_reconnected",
        "xs_others_go_on_after_corrupt_client",
    ] {
        b.expect_result_pass(r);
    }
    for m in ["xs_ring_read_ops", "xs_ring_write_ops"] {
        match b.console().metric(m) {
            Some((v, unit)) if v > 0.0 => println!("METRIC {m} {v} {unit}"),
            _ => b.fail(&format!("no positive METRIC {m}")),
        }
    }
    for d in 2..=4 {
        expect_line(&b, &format!("xenstored: serving domain {d}"));
        expect_line(&b, &format!("xenstored: domain {d} released"));
    }
}
