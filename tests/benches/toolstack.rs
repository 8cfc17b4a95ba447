//! The toolstack's figures (issue 9; LightVM's metrics), measured on the running system
//! (`systems/toolstack.toml` under QEMU) by the real `hvctl` over the management line. Run by
//! `cargo hv bench` (it runs `cargo bench --workspace`, which runs this program; its
//! `METRIC` lines become the figures). A filter argument that names none of the metrics
//! skips the boot.
//!
//! - `domain_create_ms`: `hvctl create` sent → the guest's first console line, for hello-dom
//!   (4 MiB, no device); median of [`ROUNDS`] guests created one after another, each gone
//!   (powered off, destroyed by its policy) before the next.
//! - `domain_create_devices_ms`: the same with one disk and one network interface in the
//!   config (ctl writes both devices' frontend and backend directories before it unpauses
//!   the guest; the backends probe them; hello-dom does not connect them).
//! - `domain_create_ctl_ms`, `domain_create_devices_ctl_ms`: of those, the time ctl spent
//!   handling the request once it had all its bytes (the build, the xenstore entries, the
//!   unpause: ctl's own report), i.e. without the management line's transfer and the guest's
//!   start — the part LightVM's 2.3 ms compares with.
//! - `domain_create_build_ms`, `domain_create_xenstore_ms`: of ctl's part for the plain
//!   guests, the hypervisor's build (`CREATE_DOMAIN`) and xenstore's share (waiting for the
//!   introduction, then every entry written), from ctl's per-create report.
//! - `domain_destroy_ms`: `hvctl destroy` sent → its answer, for those guests with devices
//!   (the devices' directories removed too); median.
//! - `domain_create_50th_ms`: 50 guests created in a row and kept alive (hello-dom with
//!   `stay_ms`); the 50th's create time. `domain_create_1st_of_50_ms` is the first's, for
//!   comparison (does time per guest grow with the number of domains?).

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use tests::Scenario;
use tests::toolstack::{
    Lines, bare_metal_elves, config, created, hvctl, on_toolstack_system, wait_line_after,
};

const METRICS: &[&str] = &[
    "domain_create_ms",
    "domain_create_ctl_ms",
    "domain_create_build_ms",
    "domain_create_xenstore_ms",
    "domain_create_devices_ms",
    "domain_create_devices_ctl_ms",
    "domain_destroy_ms",
    "domain_create_50th_ms",
    "domain_create_1st_of_50_ms",
];
/// Guests per median.
const ROUNDS: usize = 5;
/// Guests kept alive for the growth figure.
const IN_A_ROW: usize = 50;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// ctl's report of a large request: `ctl: request of <n> bytes: <a> us on the line, <b> us
/// handling it`; `b` in ms.
fn handling_ms(line: &str) -> Option<f64> {
    let us = line.strip_suffix(" us handling it")?.rsplit(' ').next()?;
    us.parse::<f64>().ok().map(|us| us / 1e3)
}

/// ctl's per-create report for domain `id`: `ctl: domain <id> built in <a> us, introduced
/// to xenstore in <b> us, <n> xenstore plans written in <c> us, unpaused in <d> us`; the
/// build and xenstore's share (b + c), in ms.
fn phases_ms(line: &str, id: u16) -> Option<(f64, f64)> {
    let rest = line.split_once(&format!("ctl: domain {id} built in "))?.1;
    let us: Vec<f64> = rest
        .split(" us")
        .filter_map(|part| part.rsplit(' ').next()?.parse().ok())
        .collect();
    match us[..] {
        [build, introduce, entries, _unpause] => Some((build / 1e3, (introduce + entries) / 1e3)),
        _ => None,
    }
}

/// One create: ms from the request to the guest's first console line, ms ctl spent
/// handling the request (build, xenstore, unpause: no transport), and of that the build
/// and xenstore's share.
struct Created {
    total: f64,
    ctl: f64,
    build: f64,
    xenstore: f64,
}

/// Create the guest of config `cfg` named `name` and time it.
fn create_ms(sock: &Path, lines: &Lines, cfg: &Path, name: &str) -> Result<Created, String> {
    let t0 = Instant::now();
    let id = created(&hvctl(sock, &["create", cfg.to_str().unwrap_or("?")]))?;
    let greeted = wait_line_after(lines, Some(t0), Duration::from_secs(60), |l| {
        l.starts_with(&format!("({name}) ")) && l.contains(&format!("hello from domain {id} "))
    })
    .ok_or_else(|| format!("no greeting from {name} (domain {id})"))?;
    let reported = wait_line_after(lines, Some(t0), Duration::from_secs(10), |l| {
        handling_ms(l).is_some()
    });
    let handled = lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(t, _)| reported.is_some_and(|r| *t >= r))
        .find_map(|(_, l)| handling_ms(l))
        .ok_or_else(|| format!("ctl did not report handling {name}'s create"))?;
    let (build, xenstore) = lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(t, _)| *t >= t0)
        .find_map(|(_, l)| phases_ms(l, id))
        .ok_or_else(|| format!("ctl did not report the phases of {name}'s create"))?;
    Ok(Created {
        total: greeted.saturating_duration_since(t0).as_secs_f64() * 1e3,
        ctl: handled,
        build,
        xenstore,
    })
}

fn destroy_ms(sock: &Path, name: &str) -> Result<f64, String> {
    let t0 = Instant::now();
    hvctl(sock, &["destroy", name]).ok(&format!("destroy {name}"))?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

fn hello(cfgs: &Path, kernel: &Path, name: &str, extra: &str) -> Result<PathBuf, String> {
    config(
        cfgs,
        name,
        &format!(
            "name = {name:?}\nkernel = {:?}\nmemory = 4\n{extra}",
            kernel.display().to_string()
        ),
    )
}

fn measure(
    sock: &Path,
    cfgs: &Path,
    kernel: &Path,
    lines: &Lines,
) -> Result<Vec<(&'static str, f64)>, String> {
    let (mut plain, mut plain_ctl) = (Vec::new(), Vec::new());
    let (mut plain_build, mut plain_xenstore) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let name = format!("plain-{i}");
        let cfg = hello(cfgs, kernel, &name, "")?;
        let c = create_ms(sock, lines, &cfg, &name)?;
        plain.push(c.total);
        plain_ctl.push(c.ctl);
        plain_build.push(c.build);
        plain_xenstore.push(c.xenstore);
        // It powers off at once; wait until ctl has torn it down.
        let end = Instant::now() + Duration::from_secs(30);
        while tests::toolstack::names(sock)?.contains(&name) {
            if Instant::now() > end {
                return Err(format!("{name} was not destroyed after powering off"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    let (mut devices, mut devices_ctl, mut destroy) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let name = format!("devs-{i}");
        let cfg = hello(
            cfgs,
            kernel,
            &name,
            &format!(
                "cmdline = \"stay_ms=600000\"\ndisk = [\"ram:{name},xvda,w\"]\nvif = [\"mac=00:16:3e:00:01:{i:02x},ip=10.0.1.{}\"]\n",
                i + 10
            ),
        )?;
        let c = create_ms(sock, lines, &cfg, &name)?;
        devices.push(c.total);
        devices_ctl.push(c.ctl);
        destroy.push(destroy_ms(sock, &name)?);
    }
    let (mut row, mut row_ctl) = (Vec::new(), Vec::new());
    for i in 0..IN_A_ROW {
        let name = format!("row-{i}");
        let cfg = hello(cfgs, kernel, &name, "cmdline = \"stay_ms=600000\"\n")?;
        let c = create_ms(sock, lines, &cfg, &name)?;
        row.push(c.total);
        row_ctl.push(c.ctl);
    }
    let joined = |v: &[f64]| {
        v.iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "toolstack bench: create ms, {IN_A_ROW} in a row: {}",
        joined(&row)
    );
    println!(
        "toolstack bench: of which ctl's handling, ms: {}",
        joined(&row_ctl)
    );
    for i in 0..IN_A_ROW {
        destroy.push(destroy_ms(sock, &format!("row-{i}"))?);
    }
    Ok(vec![
        ("domain_create_ms", median(plain)),
        ("domain_create_ctl_ms", median(plain_ctl)),
        ("domain_create_build_ms", median(plain_build)),
        ("domain_create_xenstore_ms", median(plain_xenstore)),
        ("domain_create_devices_ms", median(devices)),
        ("domain_create_devices_ctl_ms", median(devices_ctl)),
        ("domain_destroy_ms", median(destroy)),
        ("domain_create_1st_of_50_ms", row[0]),
        ("domain_create_50th_ms", row[IN_A_ROW - 1]),
    ])
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if let Some(f) = &filter
        && !METRICS.iter().any(|m| m.contains(f.as_str()))
    {
        println!("toolstack bench: no metric matches {f:?}; skipped");
        return;
    }
    let [kernel]: [PathBuf; 1] = bare_metal_elves(&["hello-dom"])
        .try_into()
        .expect("one guest");
    let (b, r) = on_toolstack_system(
        "toolstack-bench",
        Scenario::new("toolstack-bench")
            .smp(2)
            .memory_mib(1024)
            // QEMU backs guest RAM lazily: the first touch of each page costs the host a
            // page fault (~20 us nested), which made the build of a 4 MiB guest 21 ms
            // instead of 4. Preallocated, the figures are the hypervisor's, not the host's.
            .qemu_args(&["-mem-prealloc"])
            .timeout(Duration::from_secs(600)),
        (0..ROUNDS)
            .flat_map(|i| [format!("plain-{i}"), format!("devs-{i}")])
            .chain((0..IN_A_ROW).map(|i| format!("row-{i}")))
            .collect(),
        move |sock, dir, lines| measure(sock, dir, &kernel, lines),
    );
    let figures = r.unwrap_or_else(|e| b.fail(&format!("toolstack bench: {e}")));
    for (name, v) in figures {
        println!("METRIC {name} {v:.1} ms");
    }
}
