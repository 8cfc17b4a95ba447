//! The default system (`systems/default.toml`, what `cargo hv run` boots) does what the README
//! promises: a web guest answers the host through the forwarded port, across the whole split
//! network path (QEMU's user network, netback's virtio-net uplink and switch, netif rings,
//! netfront, smoltcp).
//!
//! The shipped file serves forever; here the same file is booted with four words appended so
//! that the system ends by itself once the page was served (`requests=1` for the guest,
//! `exit_when_idle` for the backend and the control domain). Everything else — domains,
//! capabilities, devices, the `[machine]` NIC and its forward — is the file's own.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bulkhead_build::outcome::Outcome;
use bulkhead_build::workspace::Workspace;
use tests::Scenario;

/// `text` with `extra` appended to the `cmdline` of the `[[domain]]` named `name`.
fn append_cmdline(text: &str, name: &str, extra: &str) -> String {
    let mut out = String::new();
    let mut in_domain = false;
    let mut done = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("name = ") {
            in_domain = t == format!("name = \"{name}\"");
        }
        if in_domain && !done && t.starts_with("cmdline = \"") && t.ends_with('"') {
            out.push_str(&format!("{} {extra}\"\n", &t[..t.len() - 1]));
            done = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(
        done,
        "systems/default.toml: domain {name:?} has no cmdline to extend"
    );
    out
}

#[test]
fn the_default_system_serves_its_web_page_to_the_host() {
    let root = Workspace::locate().root;
    let path = root.join("systems/default.toml");
    let shipped = std::fs::read_to_string(&path).expect("reading systems/default.toml");
    let mut text = append_cmdline(&shipped, "web", "requests=1");
    text = append_cmdline(&text, "netback", "exit_when_idle");
    text = append_cmdline(&text, "ctl", "exit_when_idle");
    let sys = bulkhead_build::system::parse(Path::new("systems/default.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    let (args, forwards) = sys.machine.qemu_args();
    let fwd = forwards
        .iter()
        .find(|f| f.guest.port() == 80)
        .copied()
        .expect("systems/default.toml forwards a host port to the web guest's port 80");
    let img = tests::system_image("default", "default_served", &text);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (tx, rx) = mpsc::channel();
    let mut asked = false;
    let b = Scenario::new("default_system_serves")
        .smp(2)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .qemu_args(&args)
        .timeout(Duration::from_secs(240))
        .boot_watching(|line| {
            if !asked && line.contains("READY http ") {
                asked = true;
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let r =
                        tests::http_get(fwd.host_port, Instant::now() + Duration::from_secs(60));
                    let _ = tx.send(r);
                });
            }
        });
    let Ok(answer) = rx.recv_timeout(Duration::from_secs(5)) else {
        b.fail("the web guest never printed READY http (or the request never finished)");
    };
    let answer = answer.unwrap_or_else(|e| b.fail(&format!("GET / failed: {e}")));
    println!(
        "host: GET http://127.0.0.1:{}/ answered:\n{answer}",
        fwd.host_port
    );
    if !answer.starts_with("HTTP/1.0 200 OK") || !answer.contains("Bulkhead") {
        b.fail(&format!("unexpected answer to GET /: {answer:?}"));
    }
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    b.expect_result_pass("net_http");
    // The toolstack wrote the vif with the one IP the guest may use, and the switch saw it.
    let lines = b.console().lines();
    if !lines
        .iter()
        .any(|l| l.contains("netback:") && l.contains("connected") && l.contains("10.0.2.15"))
    {
        b.fail("netback never connected the web guest's vif with its address 10.0.2.15");
    }
}

#[test]
fn append_cmdline_extends_only_the_named_domain() {
    let t =
        "[[domain]]\nname = \"a\"\ncmdline = \"x\"\n[[domain]]\nname = \"b\"\ncmdline = \"y\"\n";
    let out = append_cmdline(t, "b", "z=1");
    assert!(out.contains("cmdline = \"x\"\n"));
    assert!(out.contains("cmdline = \"y z=1\"\n"));
}
