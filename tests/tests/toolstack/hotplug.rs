//! Devices of run-time domains: a disk given at create, disks and a vif attached to running
//! guests and used, detached through the xenbus close handshake (the guest releases them),
//! re-attached; a guest that refuses to release (the detach times out with its message and
//! the device stays, until `--force`); bad hotplug requests (each its error, nothing changed).
//!
//! The guests (`role=hotplug` of blk-guest-dom and net-guest-dom) print a `HOTPLUG` line per
//! device they connect (the disk written and read back, the vif used to ping the boot guest
//! `peer`) and per device they release.

use std::path::Path;
use std::time::{Duration, Instant};

use tests::toolstack::{Lines, config, created, destroyed_on_poweroff, hvctl, wait_line_after};

use super::{Guests, check};

/// xvda and xvdb as Xen numbers them.
const XVDA: u32 = 51712;
const XVDB: u32 = 51728;

/// Wait for `(<guest>) HOTPLUG <what>` after `since`.
fn hotplug_line(
    lines: &Lines,
    since: Instant,
    guest: &str,
    what: &str,
    within: Duration,
) -> Result<String, String> {
    let prefix = format!("({guest}) HOTPLUG {what}");
    let found = wait_line_after(lines, Some(since), within, |l| l.starts_with(&prefix))
        .ok_or_else(|| format!("{guest} never printed `HOTPLUG {what}`"))?;
    Ok(lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(t, l)| *t >= found && l.starts_with(&prefix))
        .map(|(_, l)| l.clone())
        .unwrap_or_default())
}

/// Write `<cfgs>/<name>.toml` (domain `name`, `kernel`, then `rest`) and create it.
fn create(sock: &Path, cfgs: &Path, name: &str, kernel: &Path, rest: &str) -> Result<u16, String> {
    let body = format!(
        "name = {name:?}\nkernel = {:?}\n{rest}",
        kernel.display().to_string()
    );
    let path = config(cfgs, name, &body)?;
    created(&hvctl(sock, &["create", path.to_str().unwrap_or("?")]))
}

/// The devices `hvctl info <dom> --json` lists, as `(kind, devid)`.
fn devices(sock: &Path, dom: &str) -> Result<Vec<(String, u64)>, String> {
    let r = hvctl(sock, &["info", dom, "--json"]).ok(&format!("info {dom}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&r.out).map_err(|e| format!("info --json: {e}: {}", r.out))?;
    let list = v["devices"].as_array().cloned().unwrap_or_default();
    Ok(list
        .iter()
        .filter_map(|d| Some((d["kind"].as_str()?.to_string(), d["devid"].as_u64()?)))
        .collect())
}

pub fn drive(sock: &Path, cfgs: &Path, g: &Guests, lines: &Lines) -> Result<(), String> {
    let quick = Duration::from_secs(30);

    // 7. A disk at create, a second attached while the guest runs, both written and read
    //    back; xvdb detached (released by the guest) and attached again.
    let t = Instant::now();
    let hotdisk = create(
        sock,
        cfgs,
        "hotdisk",
        &g.blk,
        "memory = 16\ncmdline = \"role=hotplug\"\ndisk = [\"ram:a,xvda,w\"]\n",
    )?;
    let l = hotplug_line(lines, t, "hotdisk", &format!("vbd {XVDA} connected"), quick)?;
    check(l.contains("verified="), || format!("xvda: {l}"))?;
    let t = Instant::now();
    let r = hvctl(sock, &["block-attach", "hotdisk", "ram:b,xvdb,w"]).ok("block-attach")?;
    check(r.out.contains(&XVDB.to_string()), || {
        format!("block-attach said {:?}", r.out)
    })?;
    let l = hotplug_line(lines, t, "hotdisk", &format!("vbd {XVDB} connected"), quick)?;
    check(l.contains("verified="), || format!("xvdb: {l}"))?;
    let devs = devices(sock, "hotdisk")?;
    check(devs.len() == 2, || format!("hotdisk's devices: {devs:?}"))?;
    let t = Instant::now();
    hvctl(sock, &["block-detach", "hotdisk", "xvdb"]).ok("block-detach xvdb")?;
    hotplug_line(lines, t, "hotdisk", &format!("vbd {XVDB} released"), quick)?;
    let devs = devices(sock, "hotdisk")?;
    check(devs.iter().map(|d| d.1).eq([u64::from(XVDA)]), || {
        format!("after detaching xvdb: {devs:?}")
    })?;
    let t = Instant::now();
    hvctl(sock, &["block-attach", "hotdisk", "ram:c,xvdb,w"]).ok("block-attach again")?;
    hotplug_line(lines, t, "hotdisk", &format!("vbd {XVDB} connected"), quick)?;

    // 8. A guest that does not release its disk: the detach times out, says so and leaves
    //    the disk attached; --force removes it.
    let t = Instant::now();
    create(
        sock,
        cfgs,
        "stubborn",
        &g.blk,
        "memory = 16\ncmdline = \"role=hotplug refuse_detach\"\ndisk = [\"ram:s,xvda,w\"]\n",
    )?;
    hotplug_line(
        lines,
        t,
        "stubborn",
        &format!("vbd {XVDA} connected"),
        quick,
    )?;
    let t = Instant::now();
    let r = hvctl(
        sock,
        &["block-detach", "stubborn", "xvda", "--timeout", "2"],
    );
    check(r.status == 1 && r.err.contains("did not release"), || {
        format!("refused detach: status {}: {}", r.status, r.err)
    })?;
    println!(
        "refused detach: {}",
        r.err.trim().lines().last().unwrap_or_default()
    );
    hotplug_line(lines, t, "stubborn", &format!("vbd {XVDA} refusing"), quick)?;
    let devs = devices(sock, "stubborn")?;
    check(devs.len() == 1, || {
        format!("after the refused detach: {devs:?}")
    })?;
    hvctl(sock, &["block-detach", "stubborn", "xvda", "--force"]).ok("block-detach --force")?;
    let devs = devices(sock, "stubborn")?;
    check(devs.is_empty(), || format!("after --force: {devs:?}"))?;
    hvctl(sock, &["destroy", "stubborn"]).ok("destroy stubborn")?;

    // 9. A vif attached to a running guest, used (ping the peer), detached.
    let t = Instant::now();
    let hotnet = create(
        sock,
        cfgs,
        "hotnet",
        &g.net,
        "memory = 32\ncmdline = \"role=hotplug ip=10.0.0.9/24 peer=10.0.0.2\"\n",
    )?;
    hvctl(
        sock,
        &[
            "network-attach",
            "hotnet",
            "mac=00:16:3e:00:00:09,ip=10.0.0.9",
        ],
    )
    .ok("network-attach")?;
    let l = hotplug_line(lines, t, "hotnet", "vif 0 connected", quick)?;
    check(l.contains("ok"), || format!("vif 0: {l}"))?;
    let t = Instant::now();
    hvctl(sock, &["network-detach", "hotnet", "0"]).ok("network-detach")?;
    hotplug_line(lines, t, "hotnet", "vif 0 released", quick)?;
    let devs = devices(sock, "hotnet")?;
    check(devs.is_empty(), || format!("hotnet after detach: {devs:?}"))?;

    // 10. Bad hotplug requests: each its error and status, nothing changed.
    let before = devices(sock, "hotdisk")?;
    for (args, status, says) in [
        (
            &["block-attach", "keeper", "ram:k,xvdb,w"][..],
            1,
            "refused by policy",
        ),
        (
            &["block-attach", "nosuch", "ram:k,xvdb,w"],
            4,
            "unknown domain",
        ),
        (&["block-attach", "hotdisk", "ram:k,sda,w"], 2, "vdev"),
        (&["block-attach", "hotdisk", "ram:k,xvdb,w"], 2, "xvdb"),
        (&["block-detach", "hotdisk", "xvdz"], 4, "no device"),
        (&["network-detach", "hotnet", "7"], 4, "no device"),
    ] {
        let r = hvctl(sock, args);
        check(r.status == status && r.err.contains(says), || {
            format!(
                "{args:?}: status {} (want {status}): {} (want {says:?})",
                r.status, r.err
            )
        })?;
    }
    let after = devices(sock, "hotdisk")?;
    check(before == after, || {
        format!("bad requests changed hotdisk's devices: {before:?} -> {after:?}")
    })?;

    // 11. `shutdown --wait` a guest with two disks: it advertised PV shutdown, so ctl asks
    //     it through control/shutdown; it releases both disks and powers off (hvctl returns
    //     once it has stopped); its policy (destroy) applies, ctl removes its home and
    //     devices, it is gone from `list`.
    let t = Instant::now();
    let r = hvctl(sock, &["shutdown", "--wait", "hotdisk"]).ok("shutdown --wait hotdisk")?;
    check(r.out.contains("through control/shutdown"), || {
        format!("shutdown hotdisk said {:?}", r.out)
    })?;
    for devid in [XVDA, XVDB] {
        let l = hotplug_line(lines, t, "hotdisk", &format!("vbd {devid} released"), quick)?;
        check(l.contains("leaked=0"), || format!("at shutdown: {l}"))?;
    }
    hotplug_line(lines, t, "hotdisk", "shutdown requested (poweroff)", quick)?;
    destroyed_on_poweroff(sock, lines, Some(t), quick, hotdisk, "hotdisk")?;

    // 12. `shutdown --force`: the hypervisor stops hotnet without asking it.
    let t = Instant::now();
    let r = hvctl(sock, &["shutdown", "--force", "hotnet"]).ok("shutdown --force hotnet")?;
    check(r.out.contains("stopped by the hypervisor"), || {
        format!("shutdown --force hotnet said {:?}", r.out)
    })?;
    destroyed_on_poweroff(sock, lines, Some(t), quick, hotnet, "hotnet")?;
    let asked = wait_line_after(lines, Some(t), Duration::ZERO, |l| {
        l.starts_with("(hotnet) HOTPLUG shutdown requested")
    });
    check(asked.is_none(), || {
        "hotnet was asked, not stopped, by shutdown --force".to_string()
    })?;
    Ok(())
}
