//! `role=hotplug ip=a.b.c.d/nn [peer=a.b.c.d] [gw=..]`: a guest that starts without a
//! network interface and takes the vifs the toolstack attaches while it runs
//! (`hvctl network-attach`), through dom-rt's
//! [`DeviceWatch`](dom_rt::hotplug::DeviceWatch).
//!
//! For a vif that appears under `device/vif`: connect netfront, bring up smoltcp with `ip=`,
//! ping `peer` (up to 5 tries, 3 s each; a guest running `role=http` answers ICMP) and print
//! `HOTPLUG vif <devid> connected mac=<mac> ping <peer> ok rtt_ms=<ms>` (without `peer=`:
//! `HOTPLUG vif <devid> connected mac=<mac>`), or `HOTPLUG vif <devid> FAILED <why>`. The
//! stack keeps running (answering pings) until the backend closes the vif
//! (`hvctl network-detach`): then the vif is released (Closed, wait for the backend's
//! Closed, every grant ended) and `HOTPLUG vif <devid> released ended=<grants>
//! leaked=<grants>` printed. `refuse_detach`: the backend's Closing is ignored
//! (`HOTPLUG vif <devid> refusing detach`); a vif whose directory the toolstack removes is
//! `HOTPLUG vif <devid> removed`, then released without the handshake.
//!
//! One vif at a time: a second one attached meanwhile is connected once the first is
//! released. `wait_ms=<n>` (default 600000): how long to wait while no vif is attached
//! (`HOTPLUG vif timeout`, power off); `hotplug_rounds=<n>`: power off after n releases
//! (`HOTPLUG done rounds=<n>`). The first line is `HOTPLUG vif watching <dir>`. The guest
//! advertises `control/feature-poweroff` and `-reboot` ([`dom_rt::control`]): a
//! `control/shutdown` request (`hvctl shutdown`) closes the vif, prints `HOTPLUG shutdown
//! requested (<word>)` and stops with that request's reason; `hvctl shutdown --force` (the
//! hypervisor's `SCHEDOP_remote_shutdown`) stops the domain at once.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;

use dom_rt::control::{self, ShutdownRequest};
use dom_rt::front::{Released, XenbusStore};
use dom_rt::hotplug::{self, DeviceClass, DeviceWatch, HotplugEvent, abandon};
use dom_rt::{StartInfo, println, time};
use smoltcp::wire::Ipv4Address;

use crate::front::Front;
use crate::guest::{Bus, MS, num, param};
use crate::stack::Net;
use crate::wire::{fmt_mac, parse_cidr, parse_ip};

/// Backstop poll of the device directory without a watch event.
const POLL_NS: u64 = 50 * MS;

fn release_line(devid: u32, r: &Released) -> String {
    hotplug::release_line(DeviceClass::Vif, devid, r, "tx_dropped")
}

/// What the loop does next with the vif it holds.
enum Next {
    Keep,
    Release,
    Shutdown(ShutdownRequest),
}

pub fn run(si: &'static StartInfo, xb: &mut Bus, cmdline: &str) {
    let Some(ip) = param(cmdline, "ip").and_then(parse_cidr) else {
        println!("HOTPLUG vif FAILED role=hotplug needs ip=a.b.c.d/nn");
        return;
    };
    let peer = param(cmdline, "peer").and_then(parse_ip);
    let gw = param(cmdline, "gw").and_then(parse_ip);
    let seed: u64 = num(cmdline, "seed").unwrap_or(0x5EED);
    let home = format!("/local/domain/{}", si.domid);
    let wait_ns = num::<u64>(cmdline, "wait_ms").unwrap_or(600_000) * MS;
    let rounds: Option<u32> = num(cmdline, "hotplug_rounds");
    let refuse = cmdline.split_whitespace().any(|w| w == "refuse_detach");
    let mut watch = DeviceWatch::new(&home, DeviceClass::Vif);
    let dirty = watch.subscribe(xb, "net-guest");
    if let Err(e) = control::advertise(&mut XenbusStore { xb: &mut *xb }, &home) {
        println!("HOTPLUG vif cannot advertise shutdown support: {e}");
    }
    // Vifs attached and not yet connected (one at a time is served).
    let mut queue: VecDeque<(u32, String)> = VecDeque::new();
    let mut released = 0u32;
    let mut idle_since = time::now_ns();
    let mut next_poll = 0;
    loop {
        let _ = xb.poll();
        xb.dispatch();
        let now = time::now_ns();
        if dirty.replace(false) || now >= next_poll {
            next_poll = now + POLL_NS;
            for ev in watch.poll(&mut XenbusStore { xb: &mut *xb }) {
                match ev {
                    HotplugEvent::Added { devid, dir } => queue.push_back((devid, dir)),
                    HotplugEvent::BackendClosing { devid, dir, .. }
                    | HotplugEvent::Removed { devid, dir } => {
                        // Not connected yet: close it as it is.
                        if queue.iter().any(|(d, _)| *d == devid) {
                            queue.retain(|(d, _)| *d != devid);
                            let _ = abandon(&mut XenbusStore { xb: &mut *xb }, &dir, 2000);
                            watch.released(devid);
                            println!("HOTPLUG vif {devid} released ended=0 leaked=0");
                            released += 1;
                        }
                    }
                }
            }
            if let Ok(Some(request)) =
                control::take_request(&mut XenbusStore { xb: &mut *xb }, &home)
            {
                println!("HOTPLUG shutdown requested ({})", request.word());
                dom_rt::exit(request.reason());
            }
        }
        if let Some((devid, dir)) = queue.pop_front() {
            let nic = match crate::front::connect(xb, &dir, 1) {
                Ok(n) => n,
                Err(e) => {
                    println!("HOTPLUG vif {devid} FAILED connect: {e}");
                    let _ = abandon(&mut XenbusStore { xb: &mut *xb }, &dir, 2000);
                    watch.released(devid);
                    continue;
                }
            };
            let cx = Served {
                devid,
                ip,
                gw,
                peer,
                seed,
                refuse,
                home: &home,
            };
            let (nic, next) = serve(xb, &mut watch, &mut queue, nic, &cx);
            if let Next::Shutdown(request) = next {
                let r = nic.release(&mut XenbusStore { xb: &mut *xb });
                println!("{}", release_line(devid, &r));
                println!("HOTPLUG shutdown requested ({})", request.word());
                dom_rt::exit(request.reason());
            }
            let r = nic.release(&mut XenbusStore { xb: &mut *xb });
            println!("{}", release_line(devid, &r));
            watch.released(devid);
            released += 1;
            idle_since = time::now_ns();
            if rounds.is_some_and(|n| released >= n) {
                println!("HOTPLUG done rounds={released}");
                return;
            }
            continue;
        }
        if rounds.is_some_and(|n| released >= n) {
            println!("HOTPLUG done rounds={released}");
            return;
        }
        if time::now_ns().saturating_sub(idle_since) > wait_ns {
            println!(
                "HOTPLUG vif timeout: no vif attached within {} ms",
                wait_ns / MS
            );
            return;
        }
        let _ = time::sleep(5 * MS);
    }
}

/// What serving one vif needs to know.
struct Served<'a> {
    devid: u32,
    ip: ([u8; 4], u8),
    gw: Option<[u8; 4]>,
    peer: Option<[u8; 4]>,
    seed: u64,
    refuse: bool,
    /// `/local/domain/<me>`, where shutdown requests arrive.
    home: &'a str,
}

/// Run smoltcp over the connected vif: ping the peer, then keep answering until the backend
/// closes it, its directory goes, or a shutdown is asked for. Hands the vif back.
fn serve(
    xb: &mut Bus,
    watch: &mut DeviceWatch,
    queue: &mut VecDeque<(u32, String)>,
    nic: Front,
    cx: &Served<'_>,
) -> (Front, Next) {
    let devid = cx.devid;
    let mac = fmt_mac(&nic.mac());
    let mut net = Net::new(xb, nic, cx.ip, cx.gw, cx.seed ^ u64::from(devid));
    match cx.peer {
        Some(p) => {
            let peer = Ipv4Address::from(p);
            let mut got = (0u16, 0u64);
            for _ in 0..5 {
                got = crate::roles::ping(&mut net, peer, 1);
                if got.0 == 1 {
                    break;
                }
            }
            if got.0 == 1 {
                println!(
                    "HOTPLUG vif {devid} connected mac={mac} ping {peer} ok rtt_ms={:.3}",
                    got.1 as f64 / 1000.0
                );
            } else {
                println!(
                    "HOTPLUG vif {devid} FAILED ping {peer}: no echo reply in 5 tries (connected, mac={mac})"
                );
            }
        }
        None => println!("HOTPLUG vif {devid} connected mac={mac}"),
    }
    let mut refused = false;
    let mut next_poll = 0;
    let next = loop {
        net.poll();
        net.idle(10 * MS);
        let _ = net.xb.poll();
        net.xb.dispatch();
        let now = time::now_ns();
        if now < next_poll {
            continue;
        }
        next_poll = now + POLL_NS;
        let mut next = Next::Keep;
        for ev in watch.poll(&mut XenbusStore { xb: &mut *net.xb }) {
            match ev {
                HotplugEvent::Added { devid: d, dir } => queue.push_back((d, dir)),
                HotplugEvent::BackendClosing {
                    devid: d, state, ..
                } if d == devid => {
                    if cx.refuse {
                        if !refused {
                            refused = true;
                            println!("HOTPLUG vif {devid} refusing detach (backend {state:?})");
                        }
                    } else {
                        next = Next::Release;
                    }
                }
                HotplugEvent::Removed { devid: d, .. } if d == devid => {
                    println!("HOTPLUG vif {devid} removed");
                    next = Next::Release;
                }
                HotplugEvent::BackendClosing { devid: d, dir, .. }
                | HotplugEvent::Removed { devid: d, dir } => {
                    if queue.iter().any(|(q, _)| *q == d) {
                        queue.retain(|(q, _)| *q != d);
                        let _ = abandon(&mut XenbusStore { xb: &mut *net.xb }, &dir, 2000);
                        watch.released(d);
                    }
                }
            }
        }
        if !matches!(next, Next::Keep) {
            break next;
        }
        if let Ok(Some(request)) =
            control::take_request(&mut XenbusStore { xb: &mut *net.xb }, cx.home)
        {
            break Next::Shutdown(request);
        }
    };
    let Net { dev, .. } = net;
    (dev.nic, next)
}
