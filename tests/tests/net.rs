//! The network split driver in a running system: the xenstore service domain (domain 1), the
//! network backend domain `netback-dom`'s `netback-domain` (an L2 switch joining the guests'
//! vifs and, where a scenario gives one, a virtio-net uplink to QEMU's user network), and
//! test guests `net-guest-dom` running smoltcp over dom-rt's netfront.
//!
//! Without a toolstack the backend writes its backend directories (`serve=`) and each guest
//! its frontend directory (`backend=2 mac=...`); with one, the control domain writes both from
//! its `vif=` declarations. The guests power off when their role is done, the backend once its
//! vifs are gone (`exit_when_idle`) and the store once it is alone, so the system ends by
//! itself.

use std::io::Read;
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bulkhead_build::outcome::Outcome;
use tests::{Boot, Scenario};

const XENSTORE: &str = "\n[[domain]]\nname = \"xenstore\"\ncrate = \"xenstore-dom\"\nbinary = \"xenstore-domain\"\nmemory_mib = 16\ncmdline = \"exit_when_alone\"\ncapabilities = [\"xenstore_service\", \"grant_map\", \"domain_death_events\"]\n";

/// Stream length and seed of the guest-to-guest transfers.
const BYTES: u64 = 4 << 20;
const SEED: u64 = 7;
/// The stream to the host's sink through the uplink.
const UPLINK_BYTES: u64 = 4 << 20;

fn mac(domid: u32) -> String {
    format!("00:16:3e:00:00:{domid:02x}")
}

fn netback(cmdline: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"netback\"\ncrate = \"netback-dom\"\nbinary = \"netback-domain\"\nmemory_mib = 64\ncmdline = \"{cmdline}\"\ncapabilities = [\"grant_map\"]\n"
    )
}

/// netback owning the virtio-net function (modern-only: 1af4:1041) as its uplink.
fn netback_uplink(cmdline: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"netback\"\ncrate = \"netback-dom\"\nbinary = \"netback-domain\"\nmemory_mib = 64\ncmdline = \"uplink=virtio {cmdline}\"\ncapabilities = [\"grant_map\", \"device_owner\"]\ndevices = [{{ id = \"1af4:1041\" }}]\n"
    )
}

fn guest(name: &str, cmdline: &str) -> String {
    format!(
        "\n[[domain]]\nname = \"{name}\"\ncrate = \"net-guest-dom\"\nmemory_mib = 32\ncmdline = \"{cmdline}\"\ncapabilities = []\n"
    )
}

/// A guest without a toolstack: vif 0 to backend domain 2, its MAC from its domain id.
fn serve_guest(name: &str, domid: u32, cmdline: &str) -> String {
    guest(name, &format!("backend=2 mac={} {cmdline}", mac(domid)))
}

fn image(name: &str, xenstore: &str, domains: &[String]) -> Vec<u8> {
    let toml = format!(
        "[system]\ndescription = \"net: {name}\"\n{xenstore}{}",
        domains.concat()
    );
    tests::system_image("net", name, &toml)
}

fn scenario(name: &str, img: Vec<u8>) -> Scenario {
    Scenario::new(name)
        .smp(2)
        .memory_mib(512)
        .exit_when_done()
        .image(img)
        .timeout(Duration::from_secs(300))
}

fn boot(name: &str, domains: &[String]) -> Boot {
    scenario(name, image(name, XENSTORE, domains)).boot()
}

/// The seeded stream's FNV-1a checksum (net-guest-dom's `wire::stream_fill`).
fn stream_checksum(seed: u64, bytes: u64) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let mut h = Fnv::default();
    let mut off = 0;
    while off < bytes {
        let w = splitmix(seed.wrapping_add(off / 8)).to_le_bytes();
        let n = (bytes - off).min(8) as usize;
        h.update(&w[..n]);
        off += 8;
    }
    h.0
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The `checksum <hex>` in a RESULT's details.
fn checksum_in(details: &str) -> Option<u64> {
    let s = details.split("checksum ").nth(1)?;
    u64::from_str_radix(s.split_whitespace().next()?, 16).ok()
}

fn show(b: &Boot, keys: &[&str]) {
    println!(
        "{}: {} after {:.1} s",
        b.name,
        b.outcome,
        b.run.wall.as_secs_f64()
    );
    for l in b
        .console()
        .lines()
        .iter()
        .filter(|l| keys.iter().any(|k| l.contains(k)))
    {
        println!("{l}");
    }
}

fn metric(b: &Boot, name: &str) -> f64 {
    match b.console().metric(name) {
        Some((v, unit)) if v > 0.0 => {
            println!("METRIC {name} {v} {unit}");
            v
        }
        _ => b.fail(&format!("no positive METRIC {name}")),
    }
}

/// The guest-to-guest checks: ping, the stream received intact (checked here too), the
/// benchmarks.
fn check_g2g(b: &Boot) {
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    show(b, &["RESULT net_", "net-guest:", "netback: port"]);
    b.expect_result_pass("net_ping");
    b.expect_result_pass("net_tcp_send");
    let d = b.expect_result_pass("net_tcp_stream");
    let want = stream_checksum(SEED, BYTES);
    if !d.starts_with(&format!("bytes {BYTES} ")) || checksum_in(&d) != Some(want) {
        b.fail(&format!(
            "net_tcp_stream says {d:?}; the host computes {BYTES} bytes, checksum {want:016x}"
        ));
    }
    metric(b, "net_g2g_tcp_mbps");
    metric(b, "net_g2g_64b_pps");
}

fn sender(domid: u32, peer: u32) -> String {
    format!("role=tcp-send ip=10.0.0.{domid}/24 peer=10.0.0.{peer} bytes={BYTES} seed={SEED}")
}

fn receiver(domid: u32) -> String {
    format!("role=tcp-recv ip=10.0.0.{domid}/24 bytes={BYTES} seed={SEED}")
}

fn serve(domids: &[u32], with_ip: bool) -> String {
    domids
        .iter()
        .map(|&d| {
            if with_ip {
                format!("{d}:0:{}:10.0.0.{d}", mac(d))
            } else {
                format!("{d}:0:{}", mac(d))
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Two guests on one backend: 5 pings, a 4 MiB seeded stream over TCP (every byte checked by
/// the receiver, its checksum re-derived here), then a second of 64-byte UDP frames.
#[test]
fn guest_to_guest_ping_and_tcp_stream() {
    let b = boot(
        "net_g2g",
        &[
            netback(&format!("serve={} exit_when_idle", serve(&[3, 4], true))),
            serve_guest("net-send", 3, &sender(3, 4)),
            serve_guest("net-recv", 4, &receiver(4)),
        ],
    );
    check_g2g(&b);
}

/// The same with the control domain as toolstack (domain 2, privileged in xenstore): it
/// writes both halves of each vif from its `vif=` declarations; neither guest nor backend
/// writes a device entry.
#[test]
fn guest_to_guest_with_the_control_domain_writing_the_vifs() {
    let xenstore = XENSTORE.replace("exit_when_alone", "exit_when_alone priv_domid=2");
    let ctl = format!(
        "\n[[domain]]\nname = \"ctl\"\ncrate = \"ctl-dom\"\nbinary = \"ctl-domain\"\nmemory_mib = 8\ncmdline = \"exit_when_idle vif=net-send:netback:0:{}:10.0.0.4 vif=net-recv:netback:0:{}:10.0.0.5\"\ncapabilities = [\"domain_control\", \"domain_death_events\"]\n",
        mac(4),
        mac(5)
    );
    let name = "net_g2g_ctl";
    let img = image(
        name,
        &xenstore,
        &[
            ctl,
            netback("exit_when_idle"),
            guest("net-send", &sender(4, 5)),
            guest("net-recv", &receiver(5)),
        ],
    );
    let b = scenario(name, img).boot();
    show(&b, &["ctl: "]);
    check_g2g(&b);
}

/// A free TCP port on the host's loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// The host's side of a guest's stream through QEMU's user network: bytes and checksum.
fn sink(listener: TcpListener, deadline: Instant) -> Result<(u64, u64, Duration), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("no connection to the sink".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let (mut n, mut h, mut buf) = (0u64, Fnv::default(), vec![0u8; 64 * 1024]);
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                n += k as u64;
                h.update(&buf[..k]);
            }
            Err(e) => return Err(format!("after {n} bytes: {e}")),
        }
    }
    Ok((n, h.0, t0.elapsed()))
}

/// The host reaches a guest's HTTP server: netback's uplink is QEMU's virtio-net function
/// (behind VT-d) on the user network, whose `hostfwd` forwards a host port to the guest's
/// 10.0.2.15:80. Once the guest prints `READY http`, the test sends `GET / HTTP/1.0` with
/// `std::net::TcpStream` and checks the answer; the guest answers one request, then streams
/// 4 MiB to a sink the test listens on (10.0.2.2 from the guest) and powers off.
#[test]
fn host_reaches_the_http_guest_through_the_uplink() {
    let port = free_port();
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the sink");
    let sink_port = listener.local_addr().expect("sink address").port();
    let name = "net_http";
    let img = image(
        name,
        XENSTORE,
        &[
            netback_uplink(&format!("serve=3:0:{}:10.0.2.15 exit_when_idle", mac(3))),
            serve_guest(
                "net-http",
                3,
                &format!(
                    "role=http ip=10.0.2.15/24 gw=10.0.2.2 requests=1 sink={sink_port} bytes={UPLINK_BYTES} seed={SEED}"
                ),
            ),
        ],
    );
    let hostfwd = format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:80");
    let sinker =
        std::thread::spawn(move || sink(listener, Instant::now() + Duration::from_secs(240)));
    let (tx, rx) = mpsc::channel();
    let mut asked = false;
    let b = scenario(name, img)
        .qemu_args(&[
            "-device",
            "intel-iommu",
            "-netdev",
            &hostfwd,
            "-device",
            "virtio-net-pci,netdev=n0,addr=04.0,disable-legacy=on,iommu_platform=on",
        ])
        .boot_watching(|line| {
            if !asked && line.contains("READY http ") {
                asked = true;
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let r = tests::http_get(port, t0 + Duration::from_secs(60));
                    let _ = tx.send((r, t0.elapsed()));
                });
            }
        });
    show(
        &b,
        &["RESULT net_", "net-guest:", "netback: ", "READY http"],
    );
    let Ok((answer, took)) = rx.recv_timeout(Duration::from_secs(5)) else {
        b.fail("the guest never printed READY http (or the request never finished)");
    };
    let answer = answer.unwrap_or_else(|e| b.fail(&format!("GET / failed: {e}")));
    println!("host: GET / answered in {took:?}:\n{answer}");
    if !answer.starts_with("HTTP/1.0 200 OK") || !answer.contains("Hello from Bulkhead: domain 3") {
        b.fail(&format!("unexpected answer to GET /: {answer:?}"));
    }
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    b.expect_result_pass("net_http");
    match sinker.join() {
        Ok(Ok((n, sum, t))) => {
            let want = stream_checksum(SEED, UPLINK_BYTES);
            println!(
                "host sink: {n} bytes, checksum {sum:016x} in {t:?} ({:.1} Mbit/s)",
                n as f64 * 8.0 / 1e6 / t.as_secs_f64()
            );
            if n != UPLINK_BYTES || sum != want {
                b.fail(&format!(
                    "the sink got {n} bytes, checksum {sum:016x}; want {UPLINK_BYTES}, {want:016x}"
                ));
            }
            b.expect_result_pass("net_uplink_stream");
            metric(&b, "net_g2uplink_tcp_mbps");
        }
        Ok(Err(e)) => b.fail(&format!("host sink: {e}")),
        Err(_) => b.fail("the sink thread panicked"),
    }
}

/// The `drop-spoof` count of netback's counter line for port `port` (`netback: port <name>
/// rx … drop-spoof <n> …`).
fn spoof_drops(b: &Boot, port: &str) -> Option<u64> {
    b.console().lines().iter().find_map(|l| {
        let s = l.split(&format!("netback: port {port} ")).nth(1)?;
        s.split("drop-spoof ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// A third guest forges frames for 10 s while the other two transfer: UDP from the sender's
/// MAC and IP, UDP from its own MAC with the sender's IP, ARP replies claiming the sender's
/// IP. The backend must drop them all (its spoof counters say so, and the receiver saw none
/// of the forged datagrams) and the stream must arrive intact.
#[test]
fn spoofed_frames_are_dropped_and_the_victim_is_unaffected() {
    let spoof = format!(
        "role=spoof ip=10.0.0.5/24 victim_mac={} victim_ip=10.0.0.3 peer=10.0.0.4 secs=10",
        mac(3)
    );
    let b = boot(
        "net_spoof",
        &[
            netback(&format!("serve={} exit_when_idle", serve(&[3, 4, 5], true))),
            serve_guest("net-send", 3, &sender(3, 4)),
            serve_guest("net-recv", 4, &format!("{} expect_no_spoof=1", receiver(4))),
            serve_guest("net-spoof", 5, &spoof),
        ],
    );
    check_g2g(&b);
    for r in [
        "net_spoof_mac",
        "net_spoof_ip",
        "net_spoof_arp",
        "net_no_spoof_seen",
    ] {
        b.expect_result_pass(r);
    }
    // Every forged frame counts: 3 per round, the rounds in the RESULT lines.
    let sent: u64 = ["net_spoof_mac", "net_spoof_ip", "net_spoof_arp"]
        .iter()
        .filter_map(|r| {
            b.expect_result_pass(r)
                .strip_prefix("sent ")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    match spoof_drops(&b, "vif5.0") {
        Some(d) if d >= sent && sent > 0 => {
            println!("netback: {d} spoofed frames dropped on the spoofer's port ({sent} sent)")
        }
        d => b.fail(&format!(
            "netback's vif5.0 counters show {d:?} spoof drops, {sent} forged frames were sent"
        )),
    }
    for victim in ["vif3.0", "vif4.0"] {
        if spoof_drops(&b, victim) != Some(0) {
            b.fail(&format!(
                "{victim}'s counters show spoof drops (or are missing)"
            ));
        }
    }
}

/// A frontend that breaks the tx protocol on purpose (bad grant refs, offsets past the page,
/// too many slots, huge sizes, undefined flags, then a corrupted producer index) while two
/// other guests transfer: every bad request is answered ERROR, the hostile vif is
/// disconnected, and the transfer is intact.
#[test]
fn hostile_frontend_while_guests_stream() {
    let b = boot(
        "net_hostile",
        &[
            netback(&format!(
                "serve={},5:0:{} exit_when_idle",
                serve(&[3, 4], true),
                mac(5)
            )),
            serve_guest("net-send", 3, &sender(3, 4)),
            serve_guest("net-recv", 4, &receiver(4)),
            serve_guest("net-hostile", 5, "role=hostile secs=6"),
        ],
    );
    check_g2g(&b);
    for r in [
        "connect",
        "good_frame",
        "reserved_gref",
        "ungranted_gref",
        "absurd_gref",
        "frame_crosses_page",
        "offset_beyond_page",
        "shorter_than_header",
        "huge_single_slot",
        "fragments_exceed_size",
        "slots_over_limit",
        "undefined_flags",
        "good_frame_after",
        "disconnected",
    ] {
        b.expect_result_pass(&format!("net_hostile_{r}"));
    }
}

/// Restart of the backend: the control domain (domain 2) writes the vifs of the sender
/// (domain 4) and the receiver (domain 5), served by netback (domain 3, `on_crash =
/// "restart"`); a killer (domain 6) crashes netback once the receiver has the first bytes of
/// a 32 MiB stream; ctl rebuilds it as domain 7 and re-points both vifs; each guest's
/// netfront notices (its receive side fell silent, the frontend directory names a new
/// backend), reconnects, and TCP retransmits what was lost. The stream must still arrive
/// intact; the longest receive gap is the traffic gap the restart cost.
#[test]
fn a_netback_restart_interrupts_the_stream_without_corrupting_it() {
    const RESTART_BYTES: u64 = 32 << 20;
    let xenstore = XENSTORE.replace("exit_when_alone", "exit_when_alone priv_domid=2");
    let ctl = format!(
        "\n[[domain]]\nname = \"ctl\"\ncrate = \"ctl-dom\"\nbinary = \"ctl-domain\"\nmemory_mib = 8\ncmdline = \"exit_when_idle vif=net-send:netback:0:{}:10.0.0.4 vif=net-recv:netback:0:{}:10.0.0.5\"\ncapabilities = [\"domain_control\", \"domain_death_events\"]\n",
        mac(4),
        mac(5)
    );
    let backend = netback("exit_when_idle") + "on_crash = \"restart\"\n";
    let killer = "\n[[domain]]\nname = \"killer\"\ncrate = \"net-guest-dom\"\nmemory_mib = 8\ncmdline = \"role=killer target=3 watch=5 delay_ms=500\"\ncapabilities = [\"remote_shutdown\"]\n";
    let name = "net_restart";
    let img = image(
        name,
        &xenstore,
        &[
            ctl,
            backend,
            guest(
                "net-send",
                &format!(
                    "role=tcp-send ip=10.0.0.4/24 peer=10.0.0.5 bytes={RESTART_BYTES} seed={SEED}"
                ),
            ),
            guest(
                "net-recv",
                &format!("role=tcp-recv ip=10.0.0.5/24 bytes={RESTART_BYTES} seed={SEED}"),
            ),
            killer.to_string(),
        ],
    );
    let b = scenario(name, img).boot();
    show(
        &b,
        &[
            "RESULT ",
            "net-guest: stream",
            "net-restart:",
            "ctl: restarted",
            "re-pointed",
            "netback: port",
        ],
    );
    b.expect_outcome(Outcome::CleanPoweroff)
        .expect_no_failed_results();
    b.expect_result_pass("killer");
    let d = b.expect_result_pass("net_tcp_stream");
    let want = stream_checksum(SEED, RESTART_BYTES);
    if !d.starts_with(&format!("bytes {RESTART_BYTES} ")) || checksum_in(&d) != Some(want) {
        b.fail(&format!(
            "net_tcp_stream says {d:?}; the host computes {RESTART_BYTES} bytes, checksum {want:016x}"
        ));
    }
    let lines = b.console().lines();
    if !lines
        .iter()
        .any(|l| l.contains("ctl: restarted netback as domain 7"))
    {
        b.fail("ctl did not restart netback as domain 7");
    }
    let reconnects = lines
        .iter()
        .filter(|l| l.contains("net-restart: reconnected to the restarted backend"))
        .count();
    if reconnects != 2 {
        b.fail(&format!("{reconnects} guest(s) reconnected, want both"));
    }
    let at = |what: &str| {
        lines.iter().find_map(|l| {
            let s = &l[l.find(what)? + what.len()..];
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    if let (Some(k), Some(r)) = (
        at("net-restart: killed domain 3 at "),
        at("net-restart: reconnected to the restarted backend at "),
    ) && r > k
    {
        println!(
            "METRIC net_restart_reconnect_ms {:.1} ms",
            (r - k) as f64 / 1e6
        );
    }
    match b.console().metric("net_tcp_max_gap_ms") {
        Some((v, unit)) => println!("METRIC net_restart_gap_ms {v} {unit}"),
        None => b.fail("no METRIC net_tcp_max_gap_ms from the receiver"),
    }
}
