//! `hvctl console` with input and `hvctl top` against ctl-dom's engine over the fake
//! platform, on a unix socket pair. The fake "guest" of domain 2 echoes each line of console
//! input it is given as `echo: <line>` on its console, as pv-test-dom's `role=echo` does.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctl_dom::Server;
use ctl_dom::fake::FakePlatform;
use hvctl::console::Input;
use hvctl::exit;

/// What the fake guests saw, for the test to check afterwards.
#[derive(Default)]
struct Seen {
    input: Vec<u8>,
}

/// Serve until the client hangs up; domain 2 echoes its input lines; `tick` runs on the
/// platform before each batch (counters that move).
fn serve(s: UnixStream, seen: Arc<Mutex<Seen>>, tick: fn(&mut FakePlatform)) {
    let mut server = Server::new(FakePlatform::with_boot_domains());
    server
        .toolstack
        .platform
        .consoles
        .insert(2, b"blkback booted\n".to_vec());
    // Batches left before a domain that powered off is gone (its last words stay readable
    // for a moment, as until the hypervisor reaps it).
    let mut dying: Option<u32> = None;
    common::serve(s, |req| {
        tick(&mut server.toolstack.platform);
        match dying {
            Some(0) => {
                server.toolstack.platform.domains.remove(&2);
            }
            Some(k) => dying = Some(k - 1),
            None => {}
        }
        let out = server.receive(req);
        if dying.is_some() {
            // A domain powering off reads nothing more.
            return out;
        }
        // The "guest" reads whole lines of its input and answers them.
        let p = &mut server.toolstack.platform;
        let input = p.console_input.entry(2).or_default();
        while let Some(i) = input.iter().position(|&b| b == b'\n') {
            if dying.is_some() {
                break;
            }
            let line: Vec<u8> = input.drain(..=i).collect();
            seen.lock().unwrap().input.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line[..i]).into_owned();
            let con = p.consoles.entry(2).or_default();
            con.extend_from_slice(format!("echo: {text}\n").as_bytes());
            if text == "quit" {
                // It powers off: gone from the domain table soon.
                dying = Some(2);
            }
        }
        out
    });
}

fn no_tick(_: &mut FakePlatform) {}

/// Run hvctl with `args` and console `input`; (status, stdout, stderr, what the guest saw).
fn hv_in(
    args: &[&str],
    input: Input,
    tick: fn(&mut FakePlatform),
) -> (i32, String, String, Vec<u8>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    let (status, out, err) = common::hv_over(args, input, move |s| serve(s, s2, tick));
    let input = seen.lock().unwrap().input.clone();
    (status, out, err, input)
}

fn reader(b: &'static [u8]) -> Input {
    Input::Reader(Box::new(b))
}

#[test]
fn piped_input_reaches_the_guest_and_its_answers_are_shown() {
    let t0 = Instant::now();
    let (st, out, err, seen) = hv_in(
        &["console", "blkback"],
        reader(b"hello\nsecond line\n"),
        no_tick,
    );
    assert_eq!(st, exit::OK, "{err}");
    assert_eq!(seen, b"hello\nsecond line\n");
    assert_eq!(
        out, "blkback booted\necho: hello\necho: second line\n",
        "history, then the answers (drained after the end of input)"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "detached after a short drain"
    );
}

#[test]
fn the_guest_powering_off_ends_the_console() {
    let (st, out, err, seen) = hv_in(&["console", "2"], reader(b"a\nquit\nnever\n"), no_tick);
    assert_eq!(st, exit::OK, "{err}");
    assert!(out.ends_with("echo: a\necho: quit\n"), "{out}");
    // "never" may or may not have been sent before the domain was seen gone, but the
    // guest never answered it.
    assert!(!out.contains("never"), "{out}");
    assert!(seen.starts_with(b"a\nquit\n"));
}

#[test]
fn ctrl_close_bracket_detaches_and_is_not_sent() {
    let t0 = Instant::now();
    let (st, out, _, seen) = hv_in(
        &["console", "2"],
        reader(b"typed\n\x1dafter the key\n"),
        no_tick,
    );
    assert_eq!(st, exit::OK);
    assert_eq!(seen, b"typed\n");
    assert!(!out.contains("after the key"));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "no drain wait on detach"
    );
}

/// More input than the domain's buffer holds: it is resent until taken, nothing lost.
#[test]
fn input_larger_than_the_domain_buffer_is_delivered_whole() {
    let mut text = String::new();
    for i in 0..400 {
        text.push_str(&format!("line {i:04} of the long input\n"));
    }
    let text: &'static str = Box::leak(text.into_boxed_str());
    assert!(text.len() > 3 * ctl_dom::fake::FAKE_CONSOLE_INPUT_BYTES);
    let (st, out, err, seen) = hv_in(&["console", "2"], reader(text.as_bytes()), no_tick);
    assert_eq!(st, exit::OK, "{err}");
    assert_eq!(seen, text.as_bytes());
    assert!(out.contains("echo: line 0399 of the long input\n"));
}

#[test]
fn console_of_an_unknown_domain_fails_before_reading_input() {
    let (st, _, err, _) = hv_in(&["console", "ghost"], reader(b"x\n"), no_tick);
    assert_eq!(st, exit::NOT_FOUND, "{err}");
    assert!(err.contains("unknown domain"));
}

/// Counters that move by a fixed amount per request batch.
fn busy(p: &mut FakePlatform) {
    let s = p.io.entry(2).or_default();
    s.evtchn_sends += 10;
    s.grant_copy_bytes += 4096;
    if let Some(d) = p.domains.get_mut(&2) {
        d.cpu_time_ns += 50_000_000;
    }
}

#[test]
fn top_json_has_one_object_per_iteration_with_rates() {
    let (st, out, err, _) = hv_in(
        &["top", "-n", "3", "--delay", "0.2", "--json"],
        reader(b""),
        busy,
    );
    assert_eq!(st, exit::OK, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (i, l) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["iteration"], i);
        assert!(v["interval_s"].as_f64().unwrap() >= 0.2);
        let ds = v["domains"].as_array().unwrap();
        assert_eq!(ds.len(), 4);
        let blk = &ds[2];
        assert_eq!(blk["name"], "blkback");
        // Two request batches (List, DomainStats) per sample: 20 sends, 8 KiB, 100 ms of
        // CPU per sample, over at least 0.2 s.
        let evt = blk["evtchn_sends_per_s"].as_f64().unwrap();
        let kib = blk["grant_copy_kib_per_s"].as_f64().unwrap();
        let cpu = blk["cpu_percent"].as_f64().unwrap();
        assert!(evt > 0.0 && evt <= 100.0, "{evt}");
        assert!(kib > 0.0 && kib <= 40.0, "{kib}");
        assert!(cpu > 0.0 && cpu <= 50.0, "{cpu}");
        assert_eq!(ds[0]["evtchn_sends_per_s"], 0.0, "xenstore: idle");
        assert_eq!(blk["memory_kib"], 16384);
    }
}

#[test]
fn top_prints_tables_for_scripts_and_checks_its_delay() {
    let (st, out, _, _) = hv_in(&["top", "-n", "2", "-d", "0"], reader(b""), busy);
    assert_eq!(st, exit::OK);
    assert_eq!(out.matches("NAME").count(), 2, "{out}");
    assert!(out.contains("blkback") && out.contains("GNT(k/s)"), "{out}");
    // The old spelling of the iterations flag still works.
    assert_eq!(
        hv_in(&["top", "-i", "1", "-d", "0"], reader(b""), busy).0,
        exit::OK
    );
    let (st, _, err, _) = hv_in(&["top", "--delay=-1"], reader(b""), busy);
    assert_eq!(st, exit::USAGE, "{err}");
}
