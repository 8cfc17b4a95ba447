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
use std::time::Duration;

use bulkhead_build::outcome::Outcome;
use tests::Scenario;
use tests::toolstack::{Lines, config, created, hvctl, hvctl_in, on_toolstack_system, wait_line};

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

#[test]
fn console_input_and_top_against_the_running_system() {
    let pv = tests::toolstack::bare_metal_elves(&["pv-test-dom"])
        .pop()
        .expect("pv-test-dom");
    let (b, r) = on_toolstack_system(
        "console-top",
        Scenario::new("console-top")
            .memory_mib(512)
            .timeout(Duration::from_secs(180)),
        vec!["echo".to_string()],
        move |sock, dir, lines| drive_steps(sock, dir, &pv, lines),
    );
    if let Err(e) = r {
        b.fail(&format!("console/top scenario: {e}"));
    }
    b.expect_outcome(Outcome::CleanPoweroff);
}
