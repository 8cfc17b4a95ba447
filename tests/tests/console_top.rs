//! `hvctl console` with input and `hvctl top` against the running toolstack system
//! (`systems/toolstack.toml`): the real hvctl library drives ctl-dom over the management line.
//!
//! One boot: create pv-test-dom with `role=echo` (`on_poweroff = "preserve"`, so its last
//! words stay readable), pipe two lines into `hvctl console` (not a terminal: forwarded until
//! the end of input, then a short drain) and see both echoed in hvctl's output and on the
//! machine console; `top -n 2 --json` shows every domain with CPU, memory and I/O rates;
//! `quit` powers the guest off; then the system is shut down (the keeper's death lets ctl
//! power off).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use bulkhead_build::outcome::Outcome;
use bulkhead_build::workspace::Workspace;
use clap::Parser;
use tests::toolstack::{Lines, Ran, config, created, hvctl, record, wait_line};
use tests::{Scenario, scenario_dir};

/// `hvctl --socket <sock> --timeout 30 <args>` with console input from `input`.
fn hvctl_in(sock: &Path, args: &[&str], input: &'static [u8]) -> Ran {
    let mut argv = vec![
        "hvctl",
        "--socket",
        sock.to_str().unwrap_or("?"),
        "--timeout",
        "30",
    ];
    argv.extend_from_slice(args);
    let cli = match hvctl::Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            return Ran {
                status: -1,
                out: String::new(),
                err: e.to_string(),
            };
        }
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = hvctl::run_with_input(
        cli,
        &mut hvctl::connect_socket,
        hvctl::console::Input::Reader(Box::new(input)),
        &mut out,
        &mut err,
    );
    Ran {
        status,
        out: String::from_utf8_lossy(&out).into_owned(),
        err: String::from_utf8_lossy(&err).into_owned(),
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn drive_steps(sock: &Path, cfgs: &Path, pv: &Path, lines: &Lines) -> Result<(), String> {
    let quick = Duration::from_secs(60);
    let cfg = config(
        cfgs,
        "echo",
        &format!(
            "name = \"echo\"\nkernel = {:?}\nmemory = 4\ncmdline = \"role=echo\"\non_poweroff = \"preserve\"\n",
            pv.display().to_string()
        ),
    )?;
    created(&hvctl(sock, &["create", cfg.to_str().unwrap_or("?")]))?;
    wait_line(lines, quick, |l| l == "(echo) echo: ready")
        .ok_or("the echo guest never said it was ready")?;

    // 1. Input through hvctl console, answers in its output.
    let r = hvctl_in(sock, &["console", "echo"], b"hello bulkhead\nsecond line\n")
        .ok("console echo")?;
    println!("hvctl console echo:\n{}", r.out);
    for want in [
        "echo: ready\n",
        "echo: hello bulkhead\n",
        "echo: second line\n",
    ] {
        check(r.out.contains(want), || {
            format!("console output lacks {want:?}: {:?}", r.out)
        })?;
    }
    wait_line(lines, quick, |l| l == "(echo) echo: second line")
        .ok_or("the machine console never showed the second echo")?;

    // 2. top: one JSON object per iteration, every domain with its rates.
    let r = hvctl(sock, &["top", "-n", "2", "-d", "0.5", "--json"]).ok("top")?;
    let objs: Vec<serde_json::Value> = r
        .out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("top --json: {e}: {}", r.out))?;
    check(objs.len() == 2, || format!("top -n 2 printed {objs:?}"))?;
    let names = |o: &serde_json::Value| -> Vec<String> {
        o["domains"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    for o in &objs {
        let n = names(o);
        check(
            ["xenstore", "ctl", "blkback", "netback", "echo"]
                .iter()
                .all(|w| n.iter().any(|x| x == w)),
            || format!("top lacks domains: {n:?}"),
        )?;
    }
    let ds = objs[1]["domains"].as_array().cloned().unwrap_or_default();
    check(
        ds.iter().all(|d| {
            d["cpu_percent"].is_number()
                && d["memory_kib"].as_u64().is_some_and(|m| m > 0)
                && d["evtchn_sends_per_s"].is_number()
                && d["grant_copy_kib_per_s"].is_number()
        }),
        || format!("top rows without rates: {ds:?}"),
    )?;
    check(
        ds.iter()
            .any(|d| d["evtchn_sends_per_s"].as_f64().is_some_and(|r| r > 0.0)),
        || format!("no domain sent an event in top's interval: {ds:?}"),
    )?;
    let table = hvctl(sock, &["top", "-n", "1", "-d", "0.5"]).ok("top table")?;
    println!("hvctl top:\n{}", table.out);

    // 3. quit: the guest powers off (preserved: listed until destroyed).
    let r = hvctl_in(sock, &["console", "echo"], b"quit\n").ok("console quit")?;
    check(r.out.contains("echo: second line\n"), || {
        format!("history lost: {:?}", r.out)
    })?;
    wait_line(lines, quick, |l| {
        l == "(echo) RESULT echo pass echoed 2 lines"
    })
    .ok_or("the echo guest never reported its result")?;
    Ok(())
}

/// The whole conversation; `Err` says which step failed. Always ends the system.
fn drive(sock: &Path, cfgs: &Path, pv: &Path, lines: &Lines) -> Result<(), String> {
    let r = drive_steps(sock, cfgs, pv, lines);
    let _ = hvctl(sock, &["destroy", "echo"]);
    for n in ["peer", "netback", "blkback"] {
        let _ = hvctl(sock, &["shutdown", n]);
    }
    let end = hvctl(sock, &["shutdown", "keeper"]);
    match r {
        Ok(()) if end.status == 0 => Ok(()),
        Ok(()) => Err(format!(
            "shutdown keeper: status {}: {}",
            end.status, end.err
        )),
        Err(e) => Err(e),
    }
}

#[test]
fn console_input_and_top_against_the_running_system() {
    let ws = Workspace::locate();
    let toml = std::fs::read_to_string(ws.root.join("systems/toolstack.toml"))
        .expect("reading systems/toolstack.toml");
    let img = tests::system_image("toolstack", "toolstack", &toml);
    let pv = tests::toolstack::bare_metal_elves(&["pv-test-dom"])
        .pop()
        .expect("pv-test-dom");
    let dir = scenario_dir().join("console-top-run");
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let sock = dir.join("hvctl.sock");
    let _ = std::fs::remove_file(&sock);
    let qemu: Vec<String> = bulkhead_build::qemu::mgmt_socket_args(&sock);
    let qemu: Vec<&str> = qemu.iter().map(String::as_str).collect();

    let lines: Lines = Arc::new(Mutex::new(Vec::new()));
    let mut driver: Option<thread::JoinHandle<Result<(), String>>> = None;
    let b = Scenario::new("console-top")
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .qemu_args(&qemu)
        .timeout(Duration::from_secs(180))
        .boot_watching(|line| {
            record(&lines, line);
            if driver.is_none() && line.contains("ctl: serving hvctl") {
                let (sock, dir, pv, lines) = (sock.clone(), dir.clone(), pv.clone(), lines.clone());
                driver = Some(thread::spawn(move || drive(&sock, &dir, &pv, &lines)));
            }
        });
    let Some(driver) = driver else {
        b.fail("ctl never said it serves hvctl");
    };
    match driver.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => b.fail(&format!("console/top scenario: {e}")),
        Err(_) => b.fail("the driver thread panicked"),
    }
    b.expect_outcome(Outcome::CleanPoweroff);
}
