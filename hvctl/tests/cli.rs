//! hvctl against a fake server: ctl-dom's engine over the in-memory platform, on one end of
//! a unix socket pair, speaking the real framed protocol.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use clap::Parser;
use ctl_dom::Server;
use ctl_dom::fake::FakePlatform;
use hvctl::client::{Client, ClientError};
use hvctl::console::Input;
use hvctl::{Cli, exit, run};

/// Run hvctl with `args` against a fresh fake system; (status, stdout, stderr).
fn hv(args: &[&str]) -> (i32, String, String) {
    common::hv_over(args, Input::Stdin, |s| {
        let mut server = Server::new(FakePlatform::with_boot_domains());
        common::serve(s, |req| server.receive(req));
    })
}

/// [`hv`] with domain 2 advertising the PV shutdown protocol (`control/feature-poweroff`).
fn hv_advertising(args: &[&str]) -> (i32, String, String) {
    common::hv_over(args, Input::Stdin, |s| {
        let mut p = FakePlatform::with_boot_domains();
        p.store.insert(
            "/local/domain/2/control/feature-poweroff".into(),
            "1".into(),
        );
        let mut server = Server::new(p);
        common::serve(s, |req| server.receive(req));
    })
}

/// The smallest x86-64 executable hvctl sends: a header, one PT_LOAD of 4 bytes, and a
/// trailing "section" that stripping drops.
fn tiny_elf() -> Vec<u8> {
    let mut b = vec![0u8; 64 + 56];
    b[..4].copy_from_slice(b"\x7fELF");
    (b[4], b[5], b[6]) = (2, 1, 1);
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[24..32].copy_from_slice(&0x40_0000u64.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let p = 64;
    b[p..p + 4].copy_from_slice(&1u32.to_le_bytes());
    b[p + 8..p + 16].copy_from_slice(&120u64.to_le_bytes());
    b[p + 16..p + 24].copy_from_slice(&0x40_0000u64.to_le_bytes());
    b[p + 32..p + 40].copy_from_slice(&4u64.to_le_bytes());
    b[p + 40..p + 48].copy_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&[0x90, 0x90, 0xeb, 0xfe]);
    b.extend_from_slice(&[0xee; 512]);
    b
}

fn config_dir(body: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("g.elf"), tiny_elf()).unwrap();
    std::fs::write(
        dir.path().join("g.toml"),
        format!("name = \"guest\"\nkernel = \"g.elf\"\nmemory = 32\n{body}"),
    )
    .unwrap();
    dir
}

#[test]
fn list_prints_a_table_with_every_domain() {
    let (st, out, _) = hv(&["list"]);
    assert_eq!(st, exit::OK);
    assert!(out.starts_with("Name"));
    for n in ["xenstore", "ctl-dom", "blkback", "netback"] {
        assert!(out.contains(n), "{out}");
    }
}

#[test]
fn list_json_is_parseable_with_capability_names() {
    let (st, out, _) = hv(&["list", "--json"]);
    assert_eq!(st, exit::OK);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 4);
    assert_eq!(v[1]["name"], "ctl-dom");
    assert_eq!(v[1]["capabilities"][0], "domain_control");
}

#[test]
fn create_from_config_prints_the_new_domid() {
    let dir = config_dir("disk = [\"vol0,xvda,w\"]\non_crash = \"restart\"\n");
    let cfg = dir.path().join("g.toml");
    let (st, out, err) = hv(&["create", cfg.to_str().unwrap(), "--json"]);
    assert_eq!(st, exit::OK, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["domid"], 4);
}

#[test]
fn bad_config_exits_2_naming_the_field_and_sends_nothing() {
    let dir = config_dir("vcpus = 64\n");
    let cfg = dir.path().join("g.toml");
    let (st, err) = common::hv_offline(
        &["create", cfg.to_str().unwrap()],
        "a bad config must not reach the system",
    );
    assert_eq!(st, exit::USAGE);
    assert!(
        err.contains("vcpus") && err.contains("64") && err.contains("1..=32"),
        "{err}"
    );
}

#[test]
fn a_long_kernel_transfer_shows_progress_and_sends_only_the_loadable_bytes() {
    let dir = config_dir("");
    // One 200 KiB PT_LOAD (incompressible: a xorshift stream, so it travels as it is), then
    // 1 MiB of "debug sections" that must not travel.
    let mut k = tiny_elf();
    k.truncate(64 + 56);
    let seg = 200 * 1024u64;
    k[64 + 32..64 + 40].copy_from_slice(&seg.to_le_bytes());
    k[64 + 40..64 + 48].copy_from_slice(&seg.to_le_bytes());
    let mut x = 0x2545_f491_4f6c_dd1du64;
    k.extend((0..seg).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    k.extend(std::iter::repeat_n(0xee, 1 << 20));
    std::fs::write(dir.path().join("g.elf"), &k).unwrap();
    let cfg = dir.path().join("g.toml");
    let (st, out, err) = hv(&["create", cfg.to_str().unwrap()]);
    assert_eq!(st, exit::OK, "{err}");
    assert!(out.contains("created domain"), "{out}");
    assert!(
        err.contains("sending the kernel") && err.contains("building"),
        "{err}"
    );
    // The last progress report names the whole frame: the segment and headers, not the file.
    let total: usize = err
        .rsplit(" of ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!((200..260).contains(&total), "{total} KiB sent: {err}");
}

#[test]
fn a_kernel_that_is_not_a_loadable_elf_exits_2_and_sends_nothing() {
    let dir = config_dir("");
    // ELF magic, then nonsense: the program header table points outside the file.
    let mut k = tiny_elf();
    k[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(dir.path().join("g.elf"), k).unwrap();
    let cfg = dir.path().join("g.toml");
    let (st, err) = common::hv_offline(
        &["create", cfg.to_str().unwrap()],
        "a bad kernel must not reach the system",
    );
    assert_eq!(st, exit::USAGE);
    assert!(
        err.contains("kernel") && err.contains("program header table"),
        "{err}"
    );
}

#[test]
fn policy_refusal_exits_1_with_the_reason() {
    let dir = config_dir("capabilities = [\"domain_control\"]\n");
    let cfg = dir.path().join("g.toml");
    let (st, _, err) = hv(&["create", cfg.to_str().unwrap()]);
    assert_eq!(st, exit::FAILED);
    assert!(
        err.contains("refused by policy") && err.contains("domain_control"),
        "{err}"
    );
}

#[test]
fn unknown_domain_exits_4_for_every_verb() {
    for args in [
        &["info", "ghost"][..],
        &["destroy", "ghost"],
        &["shutdown", "99"],
        &["reboot", "ghost"],
        &["pause", "ghost"],
        &["unpause", "ghost"],
        &["console", "ghost"],
        &["mem-set", "ghost", "64"],
        &["sched-credit", "-d", "ghost"],
        &["block-attach", "ghost", "vol,xvdb,r"],
        &["block-detach", "ghost", "xvdb"],
        &["network-attach", "ghost"],
        &["network-detach", "ghost", "0"],
    ] {
        let (st, _, err) = hv(args);
        assert_eq!(st, exit::NOT_FOUND, "{args:?}: {err}");
        assert!(err.contains("unknown domain"), "{args:?}: {err}");
    }
}

#[test]
fn shutdown_says_whether_the_guest_was_asked_or_stopped() {
    let (st, out, err) = hv_advertising(&["shutdown", "2"]);
    assert_eq!(st, exit::OK, "{err}");
    assert_eq!(
        out,
        "asked 2 to power off through control/shutdown; it stops itself\n"
    );
    let (st, out, err) = hv_advertising(&["shutdown", "2", "--force", "--json"]);
    assert_eq!(st, exit::OK, "{err}");
    assert_eq!(out.trim(), r#"{"ok":true,"via":"hypervisor"}"#);
    let (st, out, err) = hv(&["reboot", "blkback"]);
    assert_eq!(st, exit::OK, "{err}");
    assert_eq!(out, "blkback stopped by the hypervisor (reboot)\n");
}

#[test]
fn shutdown_wait_returns_once_stopped_and_fails_for_a_guest_that_stays() {
    // Stopped by the hypervisor: stopped at once.
    let (st, _, err) = hv(&["shutdown", "blkback", "--wait"]);
    assert_eq!(st, exit::OK, "{err}");
    // Asked, and the (fake) guest never acts on it: the wait ends at --timeout.
    let t0 = std::time::Instant::now();
    let (st, _, err) = hv_advertising(&["shutdown", "2", "--wait", "--timeout", "1"]);
    assert_eq!(st, exit::FAILED, "{err}");
    assert!(err.contains("did not stop within 1 s"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    let (st, _, err) = hv(&["reboot", "ghost", "--wait"]);
    assert_eq!(st, exit::NOT_FOUND, "{err}");
}

#[test]
fn verbs_on_a_boot_domain_succeed_or_say_why() {
    assert_eq!(hv(&["pause", "blkback"]).0, exit::OK);
    let (st, _, err) = hv(&["unpause", "blkback"]);
    assert_eq!(
        st,
        exit::FAILED,
        "unpause of a running domain is a wrong-state error"
    );
    assert!(err.contains("cannot unpause"), "{err}");
    assert_eq!(hv(&["shutdown", "2"]).0, exit::OK);
    assert_eq!(hv(&["reboot", "2"]).0, exit::OK);
    let (st, out, _) = hv(&["sched-credit", "-d", "2", "-w", "512", "--json"]);
    assert_eq!(st, exit::OK);
    assert!(out.contains("512"));
    let (st, _, err) = hv(&["block-attach", "2", "vol,xvdb,r"]);
    assert_eq!(st, exit::FAILED, "{err}");
    assert_eq!(hv(&["destroy", "netback"]).0, exit::OK);
}

#[test]
fn info_dmesg_console_and_top_print_something_real() {
    let (st, out, _) = hv(&["info", "ctl-dom"]);
    assert_eq!(st, exit::OK);
    assert!(
        out.contains("domain_control") && out.contains("at boot"),
        "{out}"
    );
    let (st, out, _) = hv(&["dmesg"]);
    assert_eq!(st, exit::OK);
    assert!(out.contains("core-hv booted"));
    let (st, out, _) = hv(&["console", "--no-follow", "1"]);
    assert_eq!((st, out.as_str()), (exit::OK, ""));
    let (st, out, _) = hv(&["top", "--delay", "0", "--json"]);
    assert_eq!(st, exit::OK);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["domains"].as_array().unwrap().len(), 4);
}

#[test]
fn bad_arguments_exit_2_before_connecting() {
    for args in [
        &["mem-set", "x", "lots"][..],
        &["block-attach", "x", "vol"],
        &["network-attach", "x", "mac=zz"],
    ] {
        let (st, _) = common::hv_offline(args, "must not connect");
        assert_eq!(st, exit::USAGE, "{args:?}");
    }
}

#[test]
fn unreachable_system_exits_3() {
    let cli = Cli::try_parse_from(["hvctl", "list", "--socket", "/nonexistent/mgmt.sock"]).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let st = run(cli, &mut hvctl::connect_socket, &mut out, &mut err);
    assert_eq!(st, exit::UNREACHABLE);
    assert!(String::from_utf8(err).unwrap().contains("not reachable"));
}

#[test]
fn silent_server_times_out_with_exit_3() {
    let (a, _b) = UnixStream::pair().unwrap();
    let mut c = Client::over(a, Duration::from_millis(50));
    let e = c.call(shared_abi::mgmt::RequestBody::List).unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)));
    assert_eq!(hvctl::Failure::from(e).status, exit::UNREACHABLE);
}

#[test]
fn help_documents_every_verb_and_exit_statuses() {
    let help = Cli::try_parse_from(["hvctl", "--help"])
        .unwrap_err()
        .to_string();
    for verb in [
        "list",
        "info",
        "create",
        "destroy",
        "shutdown",
        "reboot",
        "pause",
        "unpause",
        "console",
        "mem-set",
        "sched-credit",
        "block-attach",
        "block-detach",
        "network-attach",
        "network-detach",
        "top",
        "dmesg",
    ] {
        assert!(help.contains(verb), "{verb} missing from --help");
    }
    assert!(help.contains("Exit status"));
}
