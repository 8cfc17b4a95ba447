//! hvctl: the host command that talks to ctl-dom over the management channel, with xl's
//! verbs. The binary is a thin `main` around [`run`]; everything here is testable against a
//! fake server on a socket pair.
//!
//! Output: human tables by default, `--json` for machines. Every failure prints one line
//! `hvctl: <what>` on stderr and exits with a status from [`exit`].
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod elf;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::json;
use shared_abi::capability::Capabilities;
use shared_abi::domain_config::{ConfigError, DiskAccess, DomainConfig, MacFmt};
use shared_abi::mgmt::{DeviceInfo, DomainRef, DomainSummary, MgmtError, Reply, RequestBody};

use client::{Client, ClientError};

/// Exit statuses (also in `--help`).
pub mod exit {
    pub const OK: i32 = 0;
    /// ctl-dom refused or failed the request (policy, hypervisor error, wrong state).
    pub const FAILED: i32 = 1;
    /// Bad command line or invalid domain config (nothing was sent or built).
    pub const USAGE: i32 = 2;
    /// The system is not reachable (no socket, no answer, protocol error).
    pub const UNREACHABLE: i32 = 3;
    /// The named domain (or device) does not exist.
    pub const NOT_FOUND: i32 = 4;
}

const AFTER_HELP: &str = "\
Domains are named by id or by name.

The channel: `cargo hv run` prints the unix socket of the management serial line; pass it
with --socket or the HVCTL_SOCKET environment variable.

Exit status:
  0  success
  1  ctl-dom refused or failed the request (policy, hypervisor error, wrong state)
  2  bad command line or invalid domain config (nothing was built)
  3  system not reachable (no socket, no answer in time, protocol error)
  4  no such domain or device";

#[derive(Debug, Parser)]
#[command(name = "hvctl", version, about = "Manage Bulkhead domains (xl's verbs, talking to ctl-dom)", after_help = AFTER_HELP)]
pub struct Cli {
    /// Unix socket of the management channel (printed by `cargo hv run`).
    #[arg(long, global = true, env = "HVCTL_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for each answer.
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout: u64,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// List domains: name, id, memory, vCPUs, state, CPU time.
    List,
    /// Show one domain in detail: limits, lifecycle actions, devices.
    Info { domain: String },
    /// Build a domain from a TOML config (xl.cfg vocabulary); the kernel travels with it.
    Create {
        config: PathBuf,
        /// Only parse and validate the config, print it, send nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
    },
    /// Destroy a domain at once (no shutdown request to it).
    Destroy { domain: String },
    /// Ask a domain to shut down; its on_poweroff action follows.
    Shutdown { domain: String },
    /// Ask a domain to reboot; its on_reboot action follows.
    Reboot { domain: String },
    /// Stop scheduling a domain.
    Pause { domain: String },
    /// Resume a paused domain.
    Unpause { domain: String },
    /// Print a domain's console output; follows it until the domain is gone unless --no-follow.
    Console {
        domain: String,
        #[arg(long)]
        no_follow: bool,
    },
    /// Set a domain's memory target (default unit MiB; suffixes k, m, g).
    MemSet { domain: String, memory: String },
    /// Show or set credit-scheduler weight and cap.
    SchedCredit {
        #[arg(short = 'd', long)]
        domain: String,
        /// Relative weight, 1..=65535.
        #[arg(short = 'w', long)]
        weight: Option<u32>,
        /// Cap in percent of one CPU, 0 = uncapped.
        #[arg(short = 'c', long)]
        cap: Option<u32>,
    },
    /// Attach a virtual disk: "target,vdev[,access]" or "target=..,vdev=..,access=..,backend=..".
    BlockAttach { domain: String, disk: String },
    /// Detach a virtual disk by vdev (e.g. xvdb).
    BlockDetach { domain: String, vdev: String },
    /// Attach a virtual network interface: "mac=..,ip=..,rate=..,backend=.." (all optional).
    NetworkAttach {
        domain: String,
        #[arg(default_value = "")]
        vif: String,
    },
    /// Detach a virtual network interface by device id.
    NetworkDetach { domain: String, devid: u32 },
    /// CPU usage per domain, sampled over --delay seconds.
    Top {
        #[arg(short = 'd', long, default_value_t = 1)]
        delay: u64,
        #[arg(short = 'i', long, default_value_t = 1)]
        iterations: u32,
    },
    /// Print the hypervisor's log.
    Dmesg,
}

/// A failure and its exit status.
#[derive(Debug)]
pub struct Failure {
    pub status: i32,
    pub message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            status: exit::USAGE,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let status = match &e {
            ClientError::Server(MgmtError::UnknownDomain(_) | MgmtError::NoSuchDevice { .. }) => {
                exit::NOT_FOUND
            }
            ClientError::Server(MgmtError::InvalidConfig(_)) => exit::USAGE,
            ClientError::Server(MgmtError::VersionMismatch { .. } | MgmtError::BadRequest(_)) => {
                exit::UNREACHABLE
            }
            ClientError::Server(_) => exit::FAILED,
            _ => exit::UNREACHABLE,
        };
        Failure {
            status,
            message: e.to_string(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::usage(e.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure {
            status: exit::FAILED,
            message: format!("writing output: {e}"),
        }
    }
}

/// How [`run`] reaches ctl-dom: given the `--socket` path and timeout, a client.
pub type Connect<'a> =
    dyn FnMut(Option<&std::path::Path>, Duration) -> Result<Client, ClientError> + 'a;

/// The real connector: the unix socket.
pub fn connect_socket(
    path: Option<&std::path::Path>,
    timeout: Duration,
) -> Result<Client, ClientError> {
    match path {
        Some(p) => Client::connect(p, timeout),
        None => Err(ClientError::Connect {
            path: "(none)".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no socket given: pass --socket or set HVCTL_SOCKET (cargo hv run prints it)",
            ),
        }),
    }
}

/// Run one command; writes results to `out` and returns the exit status (errors go to `err`).
pub fn run(cli: Cli, connect: &mut Connect<'_>, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match execute(cli, connect, out, err) {
        Ok(()) => exit::OK,
        Err(f) => {
            let _ = writeln!(err, "hvctl: {}", f.message);
            f.status
        }
    }
}

fn dom(s: &str) -> DomainRef {
    DomainRef::parse(s)
}

fn execute(
    cli: Cli,
    connect: &mut Connect<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Failure> {
    let json = cli.json;
    let timeout = Duration::from_secs(cli.timeout.max(1));
    // Local checks first: a bad config or argument never reaches the system.
    let body = match &cli.cmd {
        Cmd::Create { config, dry_run } => {
            let loaded = config::load(config).map_err(|e| Failure::usage(e.to_string()))?;
            // Only what the builder loads travels (the serial line is slow).
            let kernel = elf::loadable(&loaded.kernel).map_err(|e| {
                Failure::from(ConfigError::new(
                    "kernel",
                    loaded.kernel_path.display().to_string(),
                    format!("a static x86-64 ELF executable ({e})"),
                ))
            })?;
            if *dry_run {
                return print_config(out, &loaded.config, json);
            }
            Some(RequestBody::Create {
                config: loaded.config,
                kernel,
            })
        }
        Cmd::MemSet { domain, memory } => Some(RequestBody::MemSet {
            dom: dom(domain),
            kib: parse_mem(memory)?,
        }),
        Cmd::BlockAttach { domain, disk } => Some(RequestBody::BlockAttach {
            dom: dom(domain),
            disk: config::disk(&toml::Value::String(disk.clone()), "disk")?,
        }),
        Cmd::NetworkAttach { domain, vif } => Some(RequestBody::NetworkAttach {
            dom: dom(domain),
            vif: config::vif(&toml::Value::String(vif.clone()), "vif")?,
        }),
        _ => None,
    };
    let mut c = connect(cli.socket.as_deref(), timeout)?;
    match cli.cmd {
        Cmd::List => {
            let ds = domains(c.call(RequestBody::List)?)?;
            print_list(out, &ds, json)
        }
        Cmd::Info { domain } => match c.call(RequestBody::Info(dom(&domain)))? {
            Reply::Info(d) => print_info(out, &d, json),
            r => Err(unexpected(&r)),
        },
        Cmd::Create { .. } => {
            let body = body.ok_or_else(|| Failure::usage("internal: no request"))?;
            let mut last = 0;
            let mut progress = |sent: usize, total: usize| {
                // Long transfers only; one line, redrawn at most every 5%.
                if total < PROGRESS_MIN || (sent - last < total / 20 && sent != total) {
                    return;
                }
                last = sent;
                let _ = write!(
                    err,
                    "\rhvctl: sending the kernel: {} of {} KiB",
                    sent / 1024,
                    total / 1024
                );
                if sent == total {
                    let _ = writeln!(err, "; building");
                }
            };
            match c.call_with_progress(body, &mut progress)? {
                Reply::Created { domid } => {
                    if json {
                        writeln!(out, "{}", json!({ "domid": domid }))?;
                    } else {
                        writeln!(out, "created domain {domid}")?;
                    }
                    Ok(())
                }
                r => Err(unexpected(&r)),
            }
        }
        Cmd::Destroy { domain } => done(&mut c, RequestBody::Destroy(dom(&domain)), out, json),
        Cmd::Shutdown { domain } => done(&mut c, RequestBody::Shutdown(dom(&domain)), out, json),
        Cmd::Reboot { domain } => done(&mut c, RequestBody::Reboot(dom(&domain)), out, json),
        Cmd::Pause { domain } => done(&mut c, RequestBody::Pause(dom(&domain)), out, json),
        Cmd::Unpause { domain } => done(&mut c, RequestBody::Unpause(dom(&domain)), out, json),
        Cmd::Console { domain, no_follow } => console(&mut c, dom(&domain), !no_follow, out),
        Cmd::MemSet { .. } | Cmd::BlockAttach { .. } | Cmd::NetworkAttach { .. } => {
            let body = body.ok_or_else(|| Failure::usage("internal: no request"))?;
            match c.call(body)? {
                Reply::Done => done_msg(out, json),
                Reply::Attached { devid } => {
                    if json {
                        writeln!(out, "{}", json!({ "devid": devid }))?;
                    } else {
                        writeln!(out, "attached device {devid}")?;
                    }
                    Ok(())
                }
                r => Err(unexpected(&r)),
            }
        }
        Cmd::SchedCredit {
            domain,
            weight,
            cap,
        } => match c.call(RequestBody::SchedCredit {
            dom: dom(&domain),
            weight,
            cap_percent: cap,
        })? {
            Reply::Sched {
                weight,
                cap_percent,
            } => {
                if json {
                    writeln!(out, "{}", json!({ "weight": weight, "cap": cap_percent }))?;
                } else {
                    writeln!(out, "{:<20} {:>6} {:>4}", "Name", "Weight", "Cap")?;
                    writeln!(out, "{:<20} {:>6} {:>4}", domain, weight, cap_percent)?;
                }
                Ok(())
            }
            r => Err(unexpected(&r)),
        },
        Cmd::BlockDetach { domain, vdev } => done(
            &mut c,
            RequestBody::BlockDetach {
                dom: dom(&domain),
                vdev,
            },
            out,
            json,
        ),
        Cmd::NetworkDetach { domain, devid } => done(
            &mut c,
            RequestBody::NetworkDetach {
                dom: dom(&domain),
                devid,
            },
            out,
            json,
        ),
        Cmd::Top { delay, iterations } => top(&mut c, delay, iterations, out, json),
        Cmd::Dmesg => dmesg(&mut c, out, json),
    }
}

fn unexpected(r: &Reply) -> Failure {
    Failure {
        status: exit::UNREACHABLE,
        message: format!("protocol error: unexpected reply {r:?}"),
    }
}

fn domains(r: Reply) -> Result<Vec<DomainSummary>, Failure> {
    match r {
        Reply::Domains(d) => Ok(d),
        r => Err(unexpected(&r)),
    }
}

fn done_msg(out: &mut dyn Write, json: bool) -> Result<(), Failure> {
    if json {
        writeln!(out, "{}", json!({ "ok": true }))?;
    }
    Ok(())
}

fn done(c: &mut Client, body: RequestBody, out: &mut dyn Write, json: bool) -> Result<(), Failure> {
    match c.call(body)? {
        Reply::Done => done_msg(out, json),
        r => Err(unexpected(&r)),
    }
}

/// xl's memory argument: a number with an optional k/m/g suffix, default MiB; in KiB.
pub fn parse_mem(s: &str) -> Result<u64, Failure> {
    let bad = || {
        Failure::usage(format!(
            "memory: {s:?} is not allowed; allowed: a whole number with optional suffix k, m or g (default m)"
        ))
    };
    let lower = s.trim().to_ascii_lowercase();
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64),
        Some('m') => (&lower[..lower.len() - 1], 1024),
        Some('g') => (&lower[..lower.len() - 1], 1024 * 1024),
        _ => (lower.as_str(), 1024),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

fn cap_names(c: Capabilities) -> Vec<&'static str> {
    Capabilities::NAMES
        .iter()
        .filter(|(_, b)| c.contains(*b))
        .map(|(n, _)| *n)
        .collect()
}

#[derive(Serialize)]
struct SummaryJson<'a> {
    domid: u16,
    name: &'a str,
    state: String,
    memory_kib: u64,
    maxmem_kib: u64,
    vcpus: u32,
    cpu_time_ns: u64,
    weight: u32,
    cap: u32,
    capabilities: Vec<&'static str>,
}

fn summary_json(d: &DomainSummary) -> SummaryJson<'_> {
    SummaryJson {
        domid: d.domid,
        name: &d.name,
        state: format!("{:?}", d.state).to_lowercase(),
        memory_kib: d.memory_kib,
        maxmem_kib: d.maxmem_kib,
        vcpus: d.vcpus,
        cpu_time_ns: d.cpu_time_ns,
        weight: d.weight,
        cap: d.cap_percent,
        capabilities: cap_names(d.capabilities),
    }
}

/// xl's six-column state string, e.g. `-b----`.
fn state_column(d: &DomainSummary) -> String {
    let l = d.state.letter();
    "rbpscd"
        .chars()
        .map(|c| if c == l { c } else { '-' })
        .collect()
}

fn print_list(out: &mut dyn Write, ds: &[DomainSummary], json: bool) -> Result<(), Failure> {
    if json {
        let v: Vec<_> = ds.iter().map(summary_json).collect();
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<32} {:>5} {:>7} {:>5} {:>6} {:>9}",
        "Name", "ID", "Mem", "VCPUs", "State", "Time(s)"
    )?;
    for d in ds {
        writeln!(
            out,
            "{:<32} {:>5} {:>7} {:>5} {:>6} {:>9.1}",
            d.name,
            d.domid,
            d.memory_kib / 1024,
            d.vcpus,
            state_column(d),
            d.cpu_time_ns as f64 / 1e9
        )?;
    }
    Ok(())
}

fn print_info(
    out: &mut dyn Write,
    d: &shared_abi::mgmt::DomainDetail,
    json: bool,
) -> Result<(), Failure> {
    if json {
        let devices: Vec<_> = d
            .devices
            .iter()
            .map(|dev| match dev {
                DeviceInfo::Disk { devid, spec } => json!({
                    "kind": "disk", "devid": devid, "target": spec.target, "vdev": spec.vdev,
                    "access": if spec.access == DiskAccess::ReadOnly { "ro" } else { "rw" },
                    "backend": spec.backend,
                }),
                DeviceInfo::Vif { devid, spec } => json!({
                    "kind": "vif", "devid": devid,
                    "mac": spec.mac.map(|m| MacFmt(m).to_string()),
                    "ip": spec.ip.map(|i| std::net::Ipv4Addr::from(i).to_string()),
                    "rate_bytes_per_sec": spec.rate_bytes_per_sec,
                    "backend": spec.backend,
                }),
            })
            .collect();
        let v = json!({
            "domain": summary_json(&d.summary),
            "on_poweroff": d.on_poweroff.name(),
            "on_reboot": d.on_reboot.name(),
            "on_crash": d.on_crash.name(),
            "restarts": d.restarts,
            "boot_domain": d.boot_domain,
            "devices": devices,
        });
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        )?;
        return Ok(());
    }
    let s = &d.summary;
    writeln!(out, "name:         {}", s.name)?;
    writeln!(out, "domid:        {}", s.domid)?;
    writeln!(out, "state:        {:?}", s.state)?;
    writeln!(
        out,
        "memory:       {} MiB (max {} MiB)",
        s.memory_kib / 1024,
        s.maxmem_kib / 1024
    )?;
    writeln!(out, "vcpus:        {}", s.vcpus)?;
    writeln!(out, "weight/cap:   {} / {}", s.weight, s.cap_percent)?;
    writeln!(out, "cpu time:     {:.3} s", s.cpu_time_ns as f64 / 1e9)?;
    writeln!(
        out,
        "capabilities: {}",
        cap_names(s.capabilities).join(", ")
    )?;
    writeln!(
        out,
        "on_poweroff:  {}\non_reboot:    {}\non_crash:     {}",
        d.on_poweroff.name(),
        d.on_reboot.name(),
        d.on_crash.name()
    )?;
    writeln!(out, "restarts:     {}", d.restarts)?;
    writeln!(
        out,
        "built:        {}",
        if d.boot_domain {
            "at boot"
        } else {
            "by create"
        }
    )?;
    for dev in &d.devices {
        match dev {
            DeviceInfo::Disk { devid, spec } => writeln!(
                out,
                "disk {devid}:       {} as {} ({})",
                spec.target,
                spec.vdev,
                if spec.access == DiskAccess::ReadOnly {
                    "ro"
                } else {
                    "rw"
                }
            )?,
            DeviceInfo::Vif { devid, spec } => writeln!(
                out,
                "vif {devid}:        mac {} ip {}",
                spec.mac
                    .map(|m| MacFmt(m).to_string())
                    .unwrap_or_else(|| "auto".into()),
                spec.ip
                    .map(|i| std::net::Ipv4Addr::from(i).to_string())
                    .unwrap_or_else(|| "-".into())
            )?,
        }
    }
    Ok(())
}

fn print_config(out: &mut dyn Write, c: &DomainConfig, json: bool) -> Result<(), Failure> {
    if json {
        let v = json!({
            "name": c.name, "memory_kib": c.memory_kib, "maxmem_kib": c.maxmem_kib,
            "vcpus": c.vcpus, "weight": c.weight, "cap": c.cap_percent, "cmdline": c.cmdline,
            "disks": c.disks.len(), "vifs": c.vifs.len(),
            "on_poweroff": c.on_poweroff.name(), "on_reboot": c.on_reboot.name(),
            "on_crash": c.on_crash.name(), "capabilities": cap_names(c.capabilities),
        });
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        )?;
    } else {
        writeln!(
            out,
            "config ok: {} ({} MiB, {} vcpus, {} disks, {} vifs, on_crash {})",
            c.name,
            c.memory_kib / 1024,
            c.vcpus,
            c.disks.len(),
            c.vifs.len(),
            c.on_crash.name()
        )?;
    }
    Ok(())
}

/// Requests smaller than this go without a progress line.
const PROGRESS_MIN: usize = 64 * 1024;

/// Poll interval while following a console.
const CONSOLE_POLL: Duration = Duration::from_millis(100);

fn console(c: &mut Client, d: DomainRef, follow: bool, out: &mut dyn Write) -> Result<(), Failure> {
    let mut from = 0u64;
    loop {
        let r = c.call(RequestBody::ConsoleRead {
            dom: d.clone(),
            from,
        });
        match r {
            Ok(Reply::Chunk { next, lost, data }) => {
                if lost > 0 {
                    writeln!(out, "[{lost} bytes of console output were lost]")?;
                }
                out.write_all(&data)?;
                out.flush()?;
                let empty = data.is_empty();
                from = next;
                if empty {
                    if !follow {
                        return Ok(());
                    }
                    std::thread::sleep(CONSOLE_POLL);
                }
            }
            // Following a domain until it is gone is the normal end of `console`.
            Err(ClientError::Server(MgmtError::UnknownDomain(_))) if follow && from > 0 => {
                return Ok(());
            }
            Ok(r) => return Err(unexpected(&r)),
            Err(e) => return Err(e.into()),
        }
    }
}

fn dmesg(c: &mut Client, out: &mut dyn Write, json: bool) -> Result<(), Failure> {
    let mut from = 0u64;
    let mut all = Vec::new();
    let mut lost_total = 0;
    loop {
        match c.call(RequestBody::Dmesg { from })? {
            Reply::Chunk { next, lost, data } => {
                lost_total += lost;
                if data.is_empty() {
                    break;
                }
                all.extend_from_slice(&data);
                from = next;
            }
            r => return Err(unexpected(&r)),
        }
    }
    if json {
        let v = json!({ "lost": lost_total, "log": String::from_utf8_lossy(&all) });
        writeln!(out, "{v}")?;
    } else {
        out.write_all(&all)?;
    }
    Ok(())
}

fn top(
    c: &mut Client,
    delay: u64,
    iterations: u32,
    out: &mut dyn Write,
    json: bool,
) -> Result<(), Failure> {
    let mut before = domains(c.call(RequestBody::List)?)?;
    for _ in 0..iterations.max(1) {
        let t0 = std::time::Instant::now();
        std::thread::sleep(Duration::from_secs(delay));
        let after = domains(c.call(RequestBody::List)?)?;
        let wall = t0.elapsed().as_nanos().max(1) as f64;
        let rows: Vec<(&DomainSummary, f64)> = after
            .iter()
            .map(|d| {
                let prev = before
                    .iter()
                    .find(|b| b.domid == d.domid)
                    .map_or(0, |b| b.cpu_time_ns);
                (d, d.cpu_time_ns.saturating_sub(prev) as f64 * 100.0 / wall)
            })
            .collect();
        if json {
            let v: Vec<_> = rows
                .iter()
                .map(|(d, pct)| json!({ "domid": d.domid, "name": d.name, "cpu_percent": pct, "memory_kib": d.memory_kib, "vcpus": d.vcpus }))
                .collect();
            writeln!(out, "{}", serde_json::Value::Array(v))?;
        } else {
            writeln!(
                out,
                "{:<32} {:>5} {:>6} {:>7} {:>7} {:>5}",
                "NAME", "ID", "STATE", "CPU(%)", "MEM(M)", "VCPUS"
            )?;
            for (d, pct) in &rows {
                writeln!(
                    out,
                    "{:<32} {:>5} {:>6} {:>7.1} {:>7} {:>5}",
                    d.name,
                    d.domid,
                    state_column(d),
                    pct,
                    d.memory_kib / 1024,
                    d.vcpus
                )?;
            }
        }
        before = after;
    }
    Ok(())
}
