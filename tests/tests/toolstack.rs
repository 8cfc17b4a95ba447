//! The toolstack end to end: the real `hvctl` (its library: the same code as the command)
//! drives the control domain over the management line (QEMU's COM2 on a unix socket, relayed
//! by the hypervisor's `domctl MGMT_IO`) while the system runs (`systems/toolstack.toml`).
//!
//! One boot: once ctl says it serves, a driver thread lists the boot domains, creates a
//! hello-dom guest from a config (its console line measured as `domain_create_ms`), sees it
//! power off and be torn down by its policy (xenstore home removed), creates a sleeping
//! guest and destroys it, sees a faulting guest with `on_crash = "restart"` come back under
//! new ids until the restart limit, tries bad configs, a kernel the builder refuses, a taken name and
//! unknown domains (each its error and exit status, nothing left behind), lowers a guest's
//! memory limit with `mem-set` (seen in `info`), has a killer guest crash it while its
//! `on_crash = "preserve"` keeps it (listed, preserved, until `destroy`), reads a preserved
//! hello-dom's greeting back with `console --no-follow` and the hypervisor's lines with
//! `dmesg`, and finally shuts the keeper down so ctl (`exit_when_idle`) and then xenstore
//! power the machine off.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_build::outcome::Outcome;
use tests::Scenario;
use tests::toolstack::{
    Lines, created, destroyed_on_poweroff, hvctl, names, on_toolstack_system, wait_line,
};

#[path = "toolstack/hotplug.rs"]
mod hotplug;

/// A 64-bit x86 executable with one 4-byte PT_LOAD at `vaddr` (the builder refuses one
/// outside its load window).
fn elf_at(vaddr: u64) -> Vec<u8> {
    let mut b = vec![0u8; 64 + 56];
    b[..4].copy_from_slice(b"\x7fELF");
    (b[4], b[5], b[6]) = (2, 1, 1);
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&vaddr.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let p = 64;
    b[p..p + 4].copy_from_slice(&1u32.to_le_bytes());
    b[p + 4..p + 8].copy_from_slice(&5u32.to_le_bytes());
    b[p + 8..p + 16].copy_from_slice(&120u64.to_le_bytes());
    b[p + 16..p + 24].copy_from_slice(&vaddr.to_le_bytes());
    b[p + 32..p + 40].copy_from_slice(&4u64.to_le_bytes());
    b[p + 40..p + 48].copy_from_slice(&4u64.to_le_bytes());
    b[p + 48..p + 56].copy_from_slice(&8u64.to_le_bytes());
    b.extend_from_slice(&[0xeb, 0xfe, 0x90, 0x90]);
    b
}

/// The bare-metal guests `hvctl create` sends.
#[derive(Clone, Debug)]
struct Guests {
    hello: PathBuf,
    pv: PathBuf,
    blk: PathBuf,
    net: PathBuf,
}

impl Guests {
    fn build() -> Guests {
        let [hello, pv, blk, net]: [PathBuf; 4] = tests::toolstack::bare_metal_elves(&[
            "hello-dom",
            "pv-test-dom",
            "blk-guest-dom",
            "net-guest-dom",
        ])
        .try_into()
        .expect("four guests");
        Guests {
            hello,
            pv,
            blk,
            net,
        }
    }
}

/// What the driver measured.
#[derive(Debug, Default)]
struct Figures {
    create_ms: f64,
    create_reply_ms: f64,
    destroy_ms: f64,
    kernel_file_bytes: u64,
    kernel_sent_bytes: usize,
}

/// The run-time domains the conversation may leave behind.
const LEFTOVERS: &[&str] = &[
    "hello-rt",
    "sleeper",
    "crasher",
    "victim",
    "killer",
    "hello-keep",
    "hotdisk",
    "stubborn",
    "hotnet",
];

/// The whole conversation; `Err` says which step failed.
fn drive(sock: &Path, cfgs: &Path, guests: &Guests, lines: &Lines) -> Result<Figures, String> {
    drive_steps(sock, cfgs, &guests.hello, &guests.pv, lines)
        .and_then(|f| hotplug::drive(sock, cfgs, guests, lines).map(|()| f))
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn drive_steps(
    sock: &Path,
    cfgs: &Path,
    kernel: &Path,
    pv: &Path,
    lines: &Lines,
) -> Result<Figures, String> {
    let mut fig = Figures::default();
    // 1. The boot domains.
    let boot = names(sock)?;
    check(
        ["xenstore", "ctl", "blkback", "netback", "peer", "keeper"]
            .iter()
            .all(|n| boot.iter().any(|b| b == n)),
        || format!("list does not show the boot domains: {boot:?}"),
    )?;
    let table = hvctl(sock, &["list"]);
    println!("hvctl list:\n{}", table.out);

    // 2. Create hello-dom; its greeting is the end of domain_create_ms.
    let hello = cfgs.join("hello.toml");
    fig.kernel_file_bytes = std::fs::metadata(kernel).map(|m| m.len()).unwrap_or(0);
    // What travels: the loadable part, compressed when that is smaller.
    fig.kernel_sent_bytes = std::fs::read(kernel)
        .ok()
        .and_then(|b| hvctl::elf::loadable(&b).ok())
        .map_or(0, |k| {
            match hvctl::create_request(shared_abi::domain_config::DomainConfig::new("x", 4096), k)
            {
                shared_abi::mgmt::RequestBody::CreateDeflated {
                    kernel_deflated, ..
                } => kernel_deflated.len(),
                shared_abi::mgmt::RequestBody::Create { kernel, .. } => kernel.len(),
                _ => 0,
            }
        });
    std::fs::write(
        &hello,
        format!(
            "name = \"hello-rt\"\nkernel = {:?}\nmemory = 4\ncmdline = \"from hvctl\"\n",
            kernel.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let r = hvctl(sock, &["create", hello.to_str().unwrap_or("?")]);
    fig.create_reply_ms = t0.elapsed().as_secs_f64() * 1e3;
    check(r.status == 0, || {
        format!("create hello-rt: status {}: {}", r.status, r.err)
    })?;
    let id: u16 = r
        .out
        .trim()
        .strip_prefix("created domain ")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("create said {:?}", r.out))?;
    let greeted = wait_line(lines, Duration::from_secs(20), |l| {
        l.starts_with("(hello-rt) ") && l.contains(&format!("hello from domain {id} "))
    })
    .ok_or("no greeting from the created hello-rt")?;
    fig.create_ms = greeted.saturating_duration_since(t0).as_secs_f64() * 1e3;
    // It powers off on its own: ctl applies on_poweroff = destroy and removes its home.
    destroyed_on_poweroff(sock, lines, None, Duration::from_secs(20), id, "hello-rt")?;

    // 3. A guest that stays: listed, then destroyed by hvctl.
    let sleeper = cfgs.join("sleeper.toml");
    std::fs::write(
        &sleeper,
        format!(
            "name = \"sleeper\"\nkernel = {:?}\nmemory = 4\ncmdline = \"role=block ms=600000\"\n",
            pv.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    let r = hvctl(sock, &["create", sleeper.to_str().unwrap_or("?")]);
    check(r.status == 0, || {
        format!("create sleeper: status {}: {}", r.status, r.err)
    })?;
    let sid: u16 = r
        .out
        .trim()
        .strip_prefix("created domain ")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("create said {:?}", r.out))?;
    let now = names(sock)?;
    check(now.iter().any(|n| n == "sleeper"), || {
        format!("sleeper not listed: {now:?}")
    })?;
    let info = hvctl(sock, &["info", "sleeper"]);
    check(info.status == 0 && info.out.contains("by create"), || {
        format!("info sleeper: {} {}", info.out, info.err)
    })?;
    let t1 = Instant::now();
    let r = hvctl(sock, &["destroy", "sleeper"]);
    fig.destroy_ms = t1.elapsed().as_secs_f64() * 1e3;
    check(r.status == 0, || {
        format!("destroy sleeper: status {}: {}", r.status, r.err)
    })?;
    let now = names(sock)?;
    check(!now.iter().any(|n| n == "sleeper"), || {
        format!("sleeper still listed after destroy: {now:?}")
    })?;
    wait_line(lines, Duration::from_secs(5), |l| {
        l.contains(&format!("ctl: xenstore /local/domain/{sid} removed"))
    })
    .ok_or("sleeper's xenstore home was not removed")?;

    // 4. on_crash = "restart": a guest that faults comes back under a new domain id, until
    //    the restart limit (ctl's max_restarts=2) leaves it destroyed.
    let crasher = cfgs.join("crasher.toml");
    std::fs::write(
        &crasher,
        format!(
            "name = \"crasher\"\nkernel = {:?}\nmemory = 4\ncmdline = \"role=read-hv\"\non_crash = \"restart\"\n",
            pv.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    let r = hvctl(sock, &["create", crasher.to_str().unwrap_or("?")]);
    check(r.status == 0, || {
        format!("create crasher: status {}: {}", r.status, r.err)
    })?;
    for n in 1..=2 {
        wait_line(lines, Duration::from_secs(30), |l| {
            l.contains("ctl: domain ")
                && l.contains("died: crash; restarted as domain ")
                && l.contains(&format!("(restart #{n})"))
        })
        .ok_or_else(|| format!("crasher was not restarted a {n}. time"))?;
    }
    wait_line(lines, Duration::from_secs(30), |l| {
        l.contains("after 2 restarts within 60000 ms: restart limit reached")
    })
    .ok_or("crasher's restarts did not stop at the limit")?;
    let now = names(sock)?;
    check(!now.iter().any(|n| n == "crasher"), || {
        format!("crasher still listed after the limit: {now:?}")
    })?;

    // 5. Bad requests: each its error and status; nothing built.
    let before = names(sock)?;
    let bad_local = cfgs.join("bad-vcpus.toml");
    std::fs::write(
        &bad_local,
        format!(
            "name = \"bad\"\nkernel = {:?}\nmemory = 4\nvcpus = 64\n",
            kernel.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    let r = hvctl(sock, &["create", bad_local.to_str().unwrap_or("?")]);
    check(r.status == 2 && r.err.contains("vcpus"), || {
        format!("vcpus = 64: status {} {}", r.status, r.err)
    })?;
    let refused = cfgs.join("bad-caps.toml");
    std::fs::write(
        &refused,
        format!(
            "name = \"bad\"\nkernel = {:?}\nmemory = 4\ncapabilities = [\"domain_control\"]\n",
            kernel.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    let r = hvctl(sock, &["create", refused.to_str().unwrap_or("?")]);
    check(r.status == 1 && r.err.contains("refused by policy"), || {
        format!("domain_control grant: status {} {}", r.status, r.err)
    })?;
    let low = cfgs.join("low.elf");
    std::fs::write(&low, elf_at(0x1000)).map_err(|e| e.to_string())?;
    let builder_refuses = cfgs.join("bad-kernel.toml");
    std::fs::write(
        &builder_refuses,
        "name = \"bad\"\nkernel = \"low.elf\"\nmemory = 4\n",
    )
    .map_err(|e| e.to_string())?;
    let r = hvctl(sock, &["create", builder_refuses.to_str().unwrap_or("?")]);
    check(r.status == 1 && r.err.contains("create"), || {
        format!(
            "kernel outside the load window: status {} {}",
            r.status, r.err
        )
    })?;
    let taken = cfgs.join("taken.toml");
    std::fs::write(
        &taken,
        format!(
            "name = \"keeper\"\nkernel = {:?}\nmemory = 4\n",
            kernel.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    let r = hvctl(sock, &["create", taken.to_str().unwrap_or("?")]);
    check(r.status == 1 && r.err.contains("already exists"), || {
        format!("name in use: status {} {}", r.status, r.err)
    })?;
    for args in [
        &["destroy", "nosuch"][..],
        &["info", "999"],
        &["pause", "nosuch"],
    ] {
        let r = hvctl(sock, args);
        check(r.status == 4 && r.err.contains("unknown domain"), || {
            format!("{args:?}: status {} {}", r.status, r.err)
        })?;
    }
    let after = names(sock)?;
    check(after == before, || {
        format!("bad requests changed the domain list: {before:?} -> {after:?}")
    })?;

    // 6. mem-set, `preserve`, console history and dmesg.
    //    a. A sleeping victim (on_crash = "preserve"): mem-set lowers its limit (as Xen's
    //       max_mem: nothing taken away) and info says so.
    let victim = cfgs.join("victim.toml");
    std::fs::write(
        &victim,
        format!(
            "name = \"victim\"\nkernel = {:?}\nmemory = 4\ncmdline = \"role=block ms=600000\"\non_crash = \"preserve\"\n",
            pv.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    let vid = created(&hvctl(sock, &["create", victim.to_str().unwrap_or("?")]))?;
    let info = hvctl(sock, &["info", "victim"]);
    check(info.status == 0 && info.out.contains("(max 4 MiB)"), || {
        format!("info victim before mem-set: {} {}", info.out, info.err)
    })?;
    let r = hvctl(sock, &["mem-set", "victim", "2"]);
    check(r.status == 0, || {
        format!("mem-set victim 2: status {}: {}", r.status, r.err)
    })?;
    let info = hvctl(sock, &["info", "victim"]);
    check(info.status == 0 && info.out.contains("(max 2 MiB)"), || {
        format!("info victim after mem-set 2: {} {}", info.out, info.err)
    })?;
    let r = hvctl(sock, &["mem-set", "victim", "64"]);
    check(r.status == 2 && r.err.contains("memory"), || {
        format!("mem-set above maxmem: status {}: {}", r.status, r.err)
    })?;
    //    b. A killer crashes it (SCHEDOP_remote_shutdown, reason crash): the hypervisor keeps
    //       it (CREATE_PRESERVE_CRASH) and ctl lists it as preserved until destroyed.
    let killer = cfgs.join("killer.toml");
    std::fs::write(
        &killer,
        format!(
            "name = \"killer\"\nkernel = {:?}\nmemory = 4\ncmdline = \"role=killer target={vid} reason=crash after_ms=20\"\ncapabilities = [\"remote_shutdown\"]\n",
            pv.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    created(&hvctl(sock, &["create", killer.to_str().unwrap_or("?")]))?;
    wait_line(lines, Duration::from_secs(30), |l| {
        l.contains(&format!("ctl: domain {vid} died: crash; preserved"))
    })
    .ok_or("ctl did not preserve the crashed victim")?;
    let info = hvctl(sock, &["info", "victim"]);
    check(info.status == 0 && info.out.contains("Preserved"), || {
        format!("info of the preserved victim: {} {}", info.out, info.err)
    })?;
    //    c. hello-dom with on_poweroff = "preserve": its console history (kept with it) shows
    //       its greeting (`hvctl console --no-follow`: a read of the history).
    let keep = cfgs.join("hello-keep.toml");
    std::fs::write(
        &keep,
        format!(
            "name = \"hello-keep\"\nkernel = {:?}\nmemory = 4\non_poweroff = \"preserve\"\n",
            kernel.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    let kid = created(&hvctl(sock, &["create", keep.to_str().unwrap_or("?")]))?;
    wait_line(lines, Duration::from_secs(30), |l| {
        l.contains(&format!("ctl: domain {kid} died: poweroff; preserved"))
    })
    .ok_or("ctl did not preserve hello-keep")?;
    let r = hvctl(sock, &["console", "hello-keep", "--no-follow"]);
    check(
        r.status == 0
            && r.out
                .contains(&format!("hello from domain {kid} (hello-keep)")),
        || {
            format!(
                "console hello-keep: status {}: {} {}",
                r.status, r.out, r.err
            )
        },
    )?;
    println!("hvctl console hello-keep:\n{}", r.out);
    //    d. dmesg: the hypervisor's own lines.
    let r = hvctl(sock, &["dmesg"]);
    check(
        r.status == 0
            && r.out
                .contains(&format!("(hv) domain {vid} (victim) created by domain"))
            && r.out
                .contains(&format!("(hv) domain {kid} (hello-keep) stopped")),
        || format!("dmesg: status {}: {} {}", r.status, r.out, r.err),
    )?;
    println!(
        "hvctl dmesg: {} bytes, last lines:\n{}",
        r.out.len(),
        r.out
            .lines()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    //    e. Both preserved domains stay listed until destroyed.
    let now = names(sock)?;
    check(
        now.iter().any(|n| n == "victim") && now.iter().any(|n| n == "hello-keep"),
        || format!("preserved domains not listed: {now:?}"),
    )?;
    for n in ["victim", "hello-keep"] {
        let r = hvctl(sock, &["destroy", n]);
        check(r.status == 0, || {
            format!("destroy {n}: status {}: {}", r.status, r.err)
        })?;
    }
    let now = names(sock)?;
    check(
        !now.iter()
            .any(|n| ["victim", "hello-keep", "killer"].contains(&n.as_str())),
        || format!("still listed after destroy: {now:?}"),
    )?;
    Ok(fig)
}

#[test]
fn hvctl_drives_the_running_system() {
    let guests = Guests::build();
    let (b, r) = on_toolstack_system(
        "toolstack",
        Scenario::new("toolstack")
            .memory_mib(512)
            .timeout(Duration::from_secs(180)),
        LEFTOVERS.iter().map(|s| s.to_string()).collect(),
        move |sock, dir, lines| drive(sock, dir, &guests, lines),
    );
    let fig = r.unwrap_or_else(|e| b.fail(&format!("hvctl scenario: {e}")));
    b.expect_outcome(Outcome::CleanPoweroff);
    // The crasher: exactly two restarts, then the limit, and nothing after it.
    let count = |pat: &str| {
        b.console()
            .lines()
            .iter()
            .filter(|l| l.contains("ctl: domain ") && l.contains(pat))
            .count()
    };
    let (restarts, limits) = (
        count("died: crash; restarted as domain "),
        count("restart limit reached"),
    );
    if (restarts, limits) != (2, 1) {
        b.fail(&format!(
            "crasher: {restarts} restarts and {limits} limit lines; want 2 and 1"
        ));
    }
    for l in b.console().lines() {
        if l.contains("ctl: ")
            || l.contains("created by domain")
            || l.starts_with("(hello-rt)")
            || l.starts_with("bulkhead: all ")
        {
            println!("console: {l}");
        }
    }
    println!(
        "METRIC domain_create_ms={:.1} (hvctl create sent -> the guest's first console line; kernel {} bytes on disk, {} sent)",
        fig.create_ms, fig.kernel_file_bytes, fig.kernel_sent_bytes
    );
    println!(
        "METRIC domain_create_reply_ms={:.1} (hvctl create sent -> its answer)",
        fig.create_reply_ms
    );
    println!(
        "METRIC domain_destroy_ms={:.1} (hvctl destroy sent -> its answer)",
        fig.destroy_ms
    );
}
