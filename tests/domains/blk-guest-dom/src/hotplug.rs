//! `role=hotplug`: a guest that starts without a disk and takes the disks the toolstack
//! attaches while it runs (`hvctl block-attach`), through dom-rt's
//! [`DeviceWatch`](dom_rt::hotplug::DeviceWatch).
//!
//! For each disk that appears under `device/vbd`: connect, write a seeded pattern over a
//! few places (the first 4 KiB, 64 KiB in the middle, the last 4 KiB), read it back and
//! compare, and print
//! `HOTPLUG vbd <devid> connected sectors=<n> verified=<bytes>` (or
//! `HOTPLUG vbd <devid> FAILED <why>`). When the backend closes it (`hvctl block-detach`):
//! release it (Closed, wait for the backend's Closed, end every grant) and print
//! `HOTPLUG vbd <devid> released ended=<grants> leaked=<grants>` (`leaked` > 0 only if the
//! backend never let go; then `timeout=<state>` follows). With `refuse_detach` the guest
//! ignores the backend's Closing and prints `HOTPLUG vbd <devid> refusing detach` (the
//! toolstack's detach then times out); a device whose directory the toolstack removes is
//! `HOTPLUG vbd <devid> removed`, then released without the handshake.
//!
//! Words: `wait_ms=<n>` (default 600000): how long to wait while no disk is attached before
//! giving up (`HOTPLUG vbd timeout`, power off); `hotplug_rounds=<n>`: power off after n
//! releases (`HOTPLUG done rounds=<n>`; default: never); `seed=<n>` seeds the pattern.
//! The first line is `HOTPLUG vbd watching <dir>`. Shutdown: the guest advertises
//! `control/feature-poweroff` and `-reboot` ([`dom_rt::control`]), so `hvctl shutdown`
//! asks it through `control/shutdown`: it closes every disk (each `released` line), prints
//! `HOTPLUG shutdown requested (<word>)` and stops with that request's reason.
//! `hvctl shutdown --force` (the hypervisor's `SCHEDOP_remote_shutdown`) stops it at once.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use dom_rt::blkfront::domain::{DomainEvents, DomainGrants, XenbusStore};
use dom_rt::blkfront::{Blkfront, FrontConfig, Tag};
use dom_rt::control;
use dom_rt::front::Released;
use dom_rt::hotplug::{self, DeviceClass, DeviceWatch, HotplugEvent, abandon};
use dom_rt::{StartInfo, println, time};

type Bus = dom_rt::xenbus::DomainBus;
type Front = Blkfront<DomainGrants, DomainEvents>;

const MS: u64 = 1_000_000;
/// Store waits (1 ms each) a handshake step or a close waits at most.
const CONNECT_ROUNDS: u32 = 20_000;
const CLOSE_ROUNDS: u32 = 10_000;
/// Backstop poll of the device directory without a watch event.
const POLL_NS: u64 = 50 * MS;
/// Longest one I/O of the pattern may take.
const IO_NS: u64 = 10_000 * MS;

fn num<T: core::str::FromStr>(cmdline: &str, key: &str) -> Option<T> {
    dom_rt::cmdline_param(cmdline, key).and_then(|v| v.parse().ok())
}

/// Wait (bounded) for operation `tag`.
fn finish(f: &mut Front, tag: Tag) -> Result<Vec<u8>, String> {
    let end = time::now_ns() + IO_NS;
    loop {
        match f.wait_once() {
            Some(c) if c.tag == tag => return c.result.map_err(|e| format!("{e}")),
            Some(_) => {}
            None if f.pending() == 0 => return Err(String::from("operation lost")),
            None => {}
        }
        if time::now_ns() > end {
            return Err(String::from("no answer from the backend within 10 s"));
        }
    }
}

/// The pattern: seeded data written at three places, read back, compared; bytes verified.
fn verify(f: &mut Front, seed: u64) -> Result<usize, String> {
    let ss = f.info().sector_size as u64;
    let sectors = f.info().logical_sectors();
    let per4k = (4096 / ss).max(1);
    let per64k = (65536 / ss).max(1);
    if f.info().read_only {
        return Err(String::from("read-only disk"));
    }
    let mut spots: Vec<(u64, usize)> = Vec::new();
    if sectors >= per4k {
        spots.push((0, 4096));
    }
    if sectors >= 2 * per64k + per4k {
        spots.push((sectors / 2 / per4k * per4k, 65536));
    }
    if sectors >= 2 * per4k {
        spots.push((sectors - per4k, 4096));
    }
    if spots.is_empty() {
        return Err(format!("disk of {sectors} sectors is too small"));
    }
    let mut verified = 0;
    for (i, &(sector, len)) in spots.iter().enumerate() {
        let mut data = vec![0u8; len];
        crate::guest::fill(&mut data, seed.wrapping_add(i as u64 + 1));
        let t = f
            .submit_write(sector, &data)
            .map_err(|e| format!("write at sector {sector}: {e}"))?;
        finish(f, t).map_err(|e| format!("write at sector {sector}: {e}"))?;
        let t = f
            .submit_read(sector, len)
            .map_err(|e| format!("read at sector {sector}: {e}"))?;
        let back = finish(f, t).map_err(|e| format!("read at sector {sector}: {e}"))?;
        if back != data {
            let at = (0..len).find(|&j| back.get(j) != data.get(j)).unwrap_or(0);
            return Err(format!("mismatch at byte {at} of sector {sector}"));
        }
        verified += len;
    }
    Ok(verified)
}

fn release_line(devid: u32, r: &Released) -> String {
    hotplug::release_line(DeviceClass::Vbd, devid, r, "failed_ops")
}

pub fn run(si: &'static StartInfo, xb: &mut Bus, cmdline: &str) {
    let home = format!("/local/domain/{}", si.domid);
    let wait_ns = num::<u64>(cmdline, "wait_ms").unwrap_or(600_000) * MS;
    let rounds: Option<u32> = num(cmdline, "hotplug_rounds");
    let refuse = cmdline.split_whitespace().any(|w| w == "refuse_detach");
    let seed: u64 = num(cmdline, "seed").unwrap_or(0x407_9106);
    let mut watch = DeviceWatch::new(&home, DeviceClass::Vbd);
    let dirty = watch.subscribe(xb, "blk-guest");
    let mut fronts: BTreeMap<u32, (Front, String)> = BTreeMap::new();
    let mut refused: Vec<u32> = Vec::new();
    let mut released = 0u32;
    let mut attached = 0u32;
    let mut idle_since = time::now_ns();
    let mut next_poll = 0;
    if let Err(e) = control::advertise(&mut XenbusStore { xb: &mut *xb }, &home) {
        println!("HOTPLUG vbd cannot advertise shutdown support: {e}");
    }
    loop {
        let _ = xb.poll();
        xb.dispatch();
        let now = time::now_ns();
        if dirty.replace(false) || now >= next_poll {
            next_poll = now + POLL_NS;
            let events = watch.poll(&mut XenbusStore { xb: &mut *xb });
            for ev in events {
                match ev {
                    HotplugEvent::Added { devid, dir } => {
                        attached += 1;
                        let mut cfg = FrontConfig::new(&dir);
                        cfg.wait_rounds = CONNECT_ROUNDS;
                        let connected = Blkfront::connect(
                            &mut XenbusStore { xb: &mut *xb },
                            DomainGrants::all(),
                            DomainEvents::default(),
                            &cfg,
                        );
                        match connected {
                            Ok(mut f) => {
                                let sectors = f.info().logical_sectors();
                                let s = seed ^ u64::from(devid) ^ (u64::from(attached) << 32);
                                match verify(&mut f, s) {
                                    Ok(bytes) => println!(
                                        "HOTPLUG vbd {devid} connected sectors={sectors} verified={bytes}"
                                    ),
                                    Err(e) => println!(
                                        "HOTPLUG vbd {devid} FAILED pattern: {e} (connected, sectors={sectors})"
                                    ),
                                }
                                fronts.insert(devid, (f, dir));
                            }
                            Err(e) => {
                                println!("HOTPLUG vbd {devid} FAILED connect: {e}");
                                let _ = abandon(&mut XenbusStore { xb: &mut *xb }, &dir, 2000);
                                watch.released(devid);
                            }
                        }
                    }
                    HotplugEvent::BackendClosing { devid, state, .. } => {
                        if refuse {
                            if !refused.contains(&devid) {
                                refused.push(devid);
                                println!("HOTPLUG vbd {devid} refusing detach (backend {state:?})");
                            }
                            continue;
                        }
                        if let Some((f, dir)) = fronts.remove(&devid) {
                            let r =
                                f.release(&mut XenbusStore { xb: &mut *xb }, &dir, CLOSE_ROUNDS);
                            println!("{}", release_line(devid, &r));
                            released += 1;
                        }
                        watch.released(devid);
                    }
                    HotplugEvent::Removed { devid, .. } => {
                        println!("HOTPLUG vbd {devid} removed");
                        refused.retain(|&d| d != devid);
                        if let Some((f, dir)) = fronts.remove(&devid) {
                            let r = f.release(&mut XenbusStore { xb: &mut *xb }, &dir, 2000);
                            println!("{}", release_line(devid, &r));
                            released += 1;
                        }
                        watch.released(devid);
                    }
                }
            }
            if fronts.is_empty() {
                if rounds.is_some_and(|n| released >= n) {
                    println!("HOTPLUG done rounds={released}");
                    return;
                }
            } else {
                idle_since = time::now_ns();
            }
            // A shutdown request through the store: close the disks, then stop as asked.
            if let Ok(Some(request)) =
                control::take_request(&mut XenbusStore { xb: &mut *xb }, &home)
            {
                for (devid, (f, dir)) in core::mem::take(&mut fronts) {
                    let r = f.release(&mut XenbusStore { xb: &mut *xb }, &dir, 2000);
                    println!("{}", release_line(devid, &r));
                }
                println!("HOTPLUG shutdown requested ({})", request.word());
                dom_rt::exit(request.reason());
            }
        }
        if fronts.is_empty() && time::now_ns().saturating_sub(idle_since) > wait_ns {
            println!(
                "HOTPLUG vbd timeout: no disk attached within {} ms",
                wait_ns / MS
            );
            return;
        }
        let _ = time::sleep(5 * MS);
    }
}
