//! Devices and memory limits of run-time domains (`block-detach` / `network-detach`,
//! `list`'s MaxMem) against ctl-dom's engine over the fake platform: one system shared by
//! several hvctl runs, so a domain created first can be detached from.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use clap::Parser;
use ctl_dom::Server;
use ctl_dom::fake::{FakePlatform, Release, guest_config};
use hvctl::console::Input;
use hvctl::{Cli, exit};
use shared_abi::DomId;
use shared_abi::domain_config::DomainConfig;
use shared_abi::mgmt::{DeviceInfo, Reply, RequestBody};

#[derive(Clone)]
struct Sys(Arc<Mutex<Server<FakePlatform>>>);

impl Sys {
    fn new() -> Self {
        Sys(Arc::new(Mutex::new(Server::new(
            FakePlatform::with_boot_domains(),
        ))))
    }

    fn handle(&self, body: RequestBody) -> Reply {
        self.0.lock().unwrap().toolstack.handle(body).unwrap()
    }

    /// A guest `web` with disk xvda and vif 0.
    fn guest(&self) -> DomId {
        let mut server = self.0.lock().unwrap();
        server.toolstack.create_fake(guest_config("web")).unwrap()
    }

    fn devices(&self, id: DomId) -> Vec<DeviceInfo> {
        self.0.lock().unwrap().toolstack.devices_of(id)
    }

    fn set_release(&self, r: Release) {
        self.0.lock().unwrap().toolstack.platform.release = r;
    }

    /// Run hvctl with `args` against this system, each answer sent after `delay`;
    /// (status, stdout, stderr).
    fn hv_slow(&self, args: &[&str], delay: Duration) -> (i32, String, String) {
        let me = self.clone();
        common::hv_over(args, Input::Stdin, move |s| {
            common::serve(s, |req| {
                let out = me.0.lock().unwrap().receive(req);
                if !out.is_empty() {
                    thread::sleep(delay);
                }
                out
            })
        })
    }

    fn hv(&self, args: &[&str]) -> (i32, String, String) {
        self.hv_slow(args, Duration::ZERO)
    }
}

#[test]
fn attach_then_detach_a_disk_and_a_vif() {
    let s = Sys::new();
    let id = s.guest();
    let (st, out, err) = s.hv(&["block-attach", "web", "vol1,xvdb,r", "--json"]);
    assert_eq!(st, exit::OK, "{err}");
    assert!(out.contains("51728"), "{out}");
    let (st, out, err) = s.hv(&["network-attach", "web", "--json"]);
    assert_eq!(st, exit::OK, "{err}");
    assert!(out.contains("\"devid\":1"), "{out}");
    assert_eq!(s.devices(id).len(), 4);
    let (st, _, err) = s.hv(&["block-detach", "web", "xvdb", "--timeout", "3"]);
    assert_eq!(st, exit::OK, "{err}");
    let (st, out, err) = s.hv(&["network-detach", &id.to_string(), "1", "--json"]);
    assert_eq!(st, exit::OK, "{err}");
    assert!(out.contains("\"ok\":true"), "{out}");
    assert_eq!(s.devices(id).len(), 2);
    // Gone: a second detach names the device.
    let (st, _, err) = s.hv(&["block-detach", "web", "xvdb"]);
    assert_eq!(st, exit::NOT_FOUND, "{err}");
    assert!(err.contains("has no device xvdb"), "{err}");
}

#[test]
fn a_guest_that_does_not_release_keeps_the_device_until_force() {
    let s = Sys::new();
    let id = s.guest();
    s.set_release(Release::Refuse);
    let (st, _, err) = s.hv(&["block-detach", "web", "xvda", "--timeout", "2"]);
    assert_eq!(st, exit::FAILED, "{err}");
    assert!(
        err.contains(
            "domain web did not release xvda within 2 s (frontend state 1 Initialising, backend 5 Closing)"
        ) && err.contains("--force removes it anyway"),
        "{err}"
    );
    assert_eq!(s.devices(id).len(), 2);
    let (st, _, err) = s.hv(&["network-detach", "web", "0", "--timeout", "1"]);
    assert_eq!(st, exit::FAILED, "{err}");
    assert!(err.contains("did not release vif 0 within 1 s"), "{err}");
    let (st, _, err) = s.hv(&["block-detach", "web", "xvda", "--force"]);
    assert_eq!(st, exit::OK, "{err}");
    let (st, _, err) = s.hv(&["network-detach", "web", "0", "--force"]);
    assert_eq!(st, exit::OK, "{err}");
    assert!(s.devices(id).is_empty());
}

#[test]
fn detach_bad_inputs_say_what_is_wrong() {
    let s = Sys::new();
    s.guest();
    // A boot domain's devices: refused by policy.
    let (st, _, err) = s.hv(&["block-detach", "blkback", "xvda"]);
    assert_eq!(st, exit::FAILED, "{err}");
    assert!(err.contains("refused by policy"), "{err}");
    let (st, _, err) = s.hv(&["network-detach", "web", "9"]);
    assert_eq!(st, exit::NOT_FOUND, "{err}");
    assert!(err.contains("has no device vif 9"), "{err}");
    let (st, _, err) = s.hv(&["block-detach", "ghost", "xvda"]);
    assert_eq!(st, exit::NOT_FOUND, "{err}");
    // A vdev used twice, a bad one: named.
    let (st, _, err) = s.hv(&["block-attach", "web", "vol9,xvda,r"]);
    assert_eq!(st, exit::USAGE, "{err}");
    assert!(
        err.contains("disk.vdev") && err.contains("in use: xvda"),
        "{err}"
    );
}

#[test]
fn a_timeout_out_of_range_exits_2_before_connecting() {
    for args in [
        &["block-detach", "x", "xvdb", "--timeout", "0"][..],
        &["block-detach", "x", "xvdb", "--timeout", "301"],
        &["network-detach", "x", "0", "--timeout", "0"],
    ] {
        let (st, err) = common::hv_offline(args, "must not connect");
        assert_eq!(st, exit::USAGE, "{args:?}");
        assert!(err.contains("timeout") && err.contains("1..=300"), "{err}");
    }
}

#[test]
fn a_slow_detach_shows_progress() {
    let s = Sys::new();
    s.guest();
    let (st, _, err) = s.hv_slow(
        &["block-detach", "web", "xvda", "--timeout", "5"],
        Duration::from_millis(1300),
    );
    assert_eq!(st, exit::OK, "{err}");
    assert!(
        err.contains("hvctl: waiting for domain web to release xvda: 1 s of 5"),
        "{err}"
    );
}

#[test]
fn detach_help_documents_the_handshake_timeout_and_force() {
    for verb in ["block-detach", "network-detach"] {
        let help = Cli::try_parse_from(["hvctl", verb, "--help"])
            .unwrap_err()
            .to_string();
        for want in ["--timeout", "--force", "close handshake", "at most 300"] {
            assert!(help.contains(want), "{verb}: {want} missing from\n{help}");
        }
    }
}

#[test]
fn list_shows_the_memory_limit_a_domain_was_given() {
    let s = Sys::new();
    let mut c = DomainConfig::new("big", 16384);
    c.maxmem_kib = 65536;
    let domid = s.0.lock().unwrap().toolstack.create_fake(c).unwrap();
    let (st, out, _) = s.hv(&["list"]);
    assert_eq!(st, exit::OK);
    assert!(out.lines().next().unwrap().contains("MaxMem"), "{out}");
    let row = out.lines().find(|l| l.starts_with("big")).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols[1..4],
        [domid.to_string().as_str(), "16", "64"],
        "{row}"
    );
    let (_, out, _) = s.hv(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let big = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "big")
        .unwrap();
    assert_eq!(
        (big["memory_kib"].as_u64(), big["maxmem_kib"].as_u64()),
        (Some(16384), Some(65536))
    );
}

/// `create_request` compresses a kernel that shrinks (the engine inflates the same bytes
/// back) and sends one that does not as it is.
#[test]
fn kernels_travel_deflated_when_that_is_smaller() {
    let sys = Sys::new();
    let kernel: Vec<u8> = b"\x7fELF"
        .iter()
        .copied()
        .chain((0..20_000u32).map(|i| (i % 13) as u8))
        .collect();
    let body = hvctl::create_request(DomainConfig::new("packed", 16384), kernel.clone());
    let RequestBody::CreateDeflated {
        kernel_deflated, ..
    } = &body
    else {
        panic!("not deflated: {body:?}")
    };
    assert!(kernel_deflated.len() < kernel.len() / 4);
    let Reply::Created { domid } = sys.handle(body) else {
        panic!("create failed")
    };
    assert!(
        sys.0
            .lock()
            .unwrap()
            .toolstack
            .managed_ids()
            .contains(&domid)
    );

    // Incompressible (a xorshift stream): sent raw.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let body = hvctl::create_request(DomainConfig::new("noise", 16384), noise);
    assert!(matches!(body, RequestBody::Create { .. }), "{body:?}");
}
