//! hvctl: the host command that talks to ctl-dom over the management channel, with xl's
//! verbs. The binary is a thin `main` around [`run`]; everything here is testable against a
//! fake server on a socket pair.
//!
//! Output: human tables by default, `--json` for machines. Every failure prints one line
//! `hvctl: <what>` on stderr and exits with a status from [`exit`].
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod console;
pub mod elf;
pub mod top;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::json;
use shared_abi::capability::Capabilities;
use shared_abi::domain_config::{ConfigError, DiskAccess, DomainConfig, MacFmt};
use shared_abi::mgmt::{
    DeviceInfo, DomainRef, DomainSummary, MgmtError, Reply, RequestBody, RunState, ShutdownPath,
};

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
    /// Seconds to wait for each answer; for block-detach and network-detach, how long the
    /// guest has to release the device (1..=300); for shutdown/reboot --wait, how long the
    /// domain has to stop.
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout: u64,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// List domains: name, id, memory and its limit (MiB), vCPUs, state, CPU time.
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
    /// Shut a domain down; its on_poweroff action follows when it has stopped.
    ///
    /// A guest that advertises control/feature-poweroff (as Linux does) is asked through its
    /// control/shutdown node and stops itself after closing its devices; any other is
    /// stopped by the hypervisor at once.
    Shutdown {
        domain: String,
        /// Stop it through the hypervisor without asking (for a guest that does not answer).
        #[arg(short, long)]
        force: bool,
        /// Return only once the domain has stopped (at most --timeout seconds).
        #[arg(short, long)]
        wait: bool,
    },
    /// Reboot a domain (control/feature-reboot, as shutdown); its on_reboot action follows.
    Reboot {
        domain: String,
        /// Stop it through the hypervisor without asking.
        #[arg(short, long)]
        force: bool,
        /// Return only once the domain has stopped (at most --timeout seconds).
        #[arg(short, long)]
        wait: bool,
    },
    /// Stop scheduling a domain.
    Pause { domain: String },
    /// Resume a paused domain.
    Unpause { domain: String },
    /// Attach to a domain's console: its history, then live output and your input.
    ///
    /// On a terminal: raw mode, keystrokes go to the domain, Ctrl-] detaches (the terminal is
    /// restored). Not a terminal (pipe, file): the input is sent as it is and the command
    /// detaches at its end, once the domain's output has been quiet for a moment. Ends when
    /// the domain is gone.
    Console {
        domain: String,
        /// Print the history only: no input, no following.
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
    /// Detach a virtual disk by vdev (e.g. xvdb), through the xenbus close handshake.
    ///
    /// The backend is asked to close the device; the guest's frontend has --timeout seconds
    /// (default 10, at most 300) to release it, while a progress line counts. A guest that
    /// does not keeps the disk (nothing changes; exit status 1 names both sides' states);
    /// --force removes it anyway.
    BlockDetach {
        /// The domain, by id or name.
        domain: String,
        /// The disk as the guest names it (xvdb).
        vdev: String,
        /// Remove the disk at once without asking the guest (its backend tears it down; a
        /// guest still using it sees it vanish).
        #[arg(long)]
        force: bool,
    },
    /// Attach a virtual network interface: "mac=..,ip=..,rate=..,backend=.." (all optional).
    NetworkAttach {
        domain: String,
        #[arg(default_value = "")]
        vif: String,
    },
    /// Detach a virtual network interface by device id, through the xenbus close handshake.
    ///
    /// The backend is asked to close the interface; the guest's frontend has --timeout
    /// seconds (default 10, at most 300) to release it, while a progress line counts. A
    /// guest that does not keeps it (nothing changes; exit status 1 names both sides'
    /// states); --force removes it anyway.
    NetworkDetach {
        /// The domain, by id or name.
        domain: String,
        /// The vif's device id (`info` lists them).
        devid: u32,
        /// Remove the interface at once without asking the guest (its backend tears it
        /// down).
        #[arg(long)]
        force: bool,
    },
    /// Live CPU, memory and I/O per domain (xentop), refreshed every --delay seconds.
    ///
    /// On a terminal: a full-screen display until q or Ctrl-C. Otherwise (or with -n or
    /// --json): -n iterations (default 1), as tables or one JSON object per iteration and line.
    /// CPU(%) is summed over vCPUs; EVT/s event-channel sends, GNT(k/s) KiB copied through
    /// the domain's grants (its I/O), COPY/s grant copies it did, MAPS/s maps of its grants,
    /// CON(B/s) console output.
    Top {
        /// Seconds between refreshes (fractions allowed).
        #[arg(short = 'd', long, default_value_t = 1.0)]
        delay: f64,
        /// Stop after N refreshes.
        #[arg(short = 'n', long, short_alias = 'i')]
        iterations: Option<u32>,
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
    run_with_input(cli, connect, console::Input::Stdin, out, err)
}

/// [`run`] with `console`'s input taken from `input` instead of stdin (tests, scripts).
pub fn run_with_input(
    cli: Cli,
    connect: &mut Connect<'_>,
    input: console::Input,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    match execute(cli, connect, input, out, err) {
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
    input: console::Input,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Failure> {
    let json = cli.json;
    let timeout = Duration::from_secs(cli.timeout.max(1));
    // Local checks first: a bad config or argument never reaches the system.
    let top_delay = match &cli.cmd {
        Cmd::Top { delay, .. } => Some(top::parse_delay(*delay)?),
        _ => None,
    };
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
            Some(create_request(loaded.config, kernel))
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
        Cmd::BlockDetach {
            domain,
            vdev,
            force,
        } => Some(RequestBody::BlockDetach {
            dom: dom(domain),
            vdev: vdev.clone(),
            timeout_ms: detach_timeout_ms(cli.timeout, *force)?,
            force: *force,
        }),
        Cmd::NetworkDetach {
            domain,
            devid,
            force,
        } => Some(RequestBody::NetworkDetach {
            dom: dom(domain),
            devid: *devid,
            timeout_ms: detach_timeout_ms(cli.timeout, *force)?,
            force: *force,
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
        Cmd::Shutdown {
            domain,
            force,
            wait,
        } => {
            let body = RequestBody::Shutdown {
                dom: dom(&domain),
                force,
            };
            let stop = Stop {
                domain: &domain,
                what: "power off",
                wait: wait.then_some(timeout),
            };
            shutdown_sent(&mut c, body, &stop, out, err, json)
        }
        Cmd::Reboot {
            domain,
            force,
            wait,
        } => {
            let body = RequestBody::Reboot {
                dom: dom(&domain),
                force,
            };
            let stop = Stop {
                domain: &domain,
                what: "reboot",
                wait: wait.then_some(timeout),
            };
            shutdown_sent(&mut c, body, &stop, out, err, json)
        }
        Cmd::Pause { domain } => done(&mut c, RequestBody::Pause(dom(&domain)), out, json),
        Cmd::Unpause { domain } => done(&mut c, RequestBody::Unpause(dom(&domain)), out, json),
        Cmd::Console { domain, no_follow } => {
            console::console(&mut c, dom(&domain), !no_follow, input, out, err)
        }
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
        Cmd::BlockDetach { domain, vdev, .. } => {
            let body = body.ok_or_else(|| Failure::usage("internal: no request"))?;
            detach(&mut c, body, &domain, &vdev, cli.timeout, out, err, json)
        }
        Cmd::NetworkDetach { domain, devid, .. } => {
            let body = body.ok_or_else(|| Failure::usage("internal: no request"))?;
            let what = format!("vif {devid}");
            detach(&mut c, body, &domain, &what, cli.timeout, out, err, json)
        }
        Cmd::Top { iterations, .. } => {
            let delay = top_delay.ok_or_else(|| Failure::usage("internal: no delay"))?;
            top::top(&mut c, delay, iterations, out, json)
        }
        Cmd::Dmesg => dmesg(&mut c, out, json),
    }
}

/// The longest detach wait, in seconds.
pub const MAX_DETACH_SECS: u64 = shared_abi::mgmt::MAX_DETACH_TIMEOUT_MS as u64 / 1000;

/// How long ctl-dom's answer to a detach may take beyond the guest's time (its polling and
/// the serial line).
const DETACH_ANSWER_MARGIN: Duration = Duration::from_secs(15);

/// `--timeout` of a detach in ms: 1..=300 s (not looked at with `--force`).
fn detach_timeout_ms(secs: u64, force: bool) -> Result<u32, Failure> {
    if !force && !(1..=MAX_DETACH_SECS).contains(&secs) {
        return Err(Failure::usage(format!(
            "timeout: {secs} s is not allowed; allowed: 1..={MAX_DETACH_SECS} s (how long the guest has to release the device)"
        )));
    }
    Ok((secs.min(MAX_DETACH_SECS) * 1000) as u32)
}

/// Send a detach and wait for its answer, counting the seconds on stderr while the guest
/// is given time to release the device.
#[allow(clippy::too_many_arguments)]
fn detach(
    c: &mut Client,
    body: RequestBody,
    domain: &str,
    what: &str,
    secs: u64,
    out: &mut dyn Write,
    err: &mut dyn Write,
    json: bool,
) -> Result<(), Failure> {
    let mut shown = false;
    let mut tick = |elapsed: Duration| {
        shown = true;
        let _ = write!(
            err,
            "\rhvctl: waiting for domain {domain} to release {what}: {} s of {secs}",
            elapsed.as_secs()
        );
        let _ = err.flush();
    };
    let wait = Duration::from_secs(secs.clamp(1, MAX_DETACH_SECS)) + DETACH_ANSWER_MARGIN;
    let r = c.call_waiting(body, wait, &mut tick);
    if shown {
        let _ = writeln!(err);
    }
    match r? {
        Reply::Done => done_msg(out, json),
        r => Err(unexpected(&r)),
    }
}

/// The create request for `kernel`: compressed (raw DEFLATE) when that makes it smaller —
/// code and data of a kernel about halve, and the line's time is most of a create.
pub fn create_request(config: DomainConfig, kernel: Vec<u8>) -> RequestBody {
    let deflated = miniz_oxide::deflate::compress_to_vec(&kernel, 6);
    match u32::try_from(kernel.len()) {
        Ok(kernel_len) if deflated.len() < kernel.len() => RequestBody::CreateDeflated {
            config,
            kernel_deflated: deflated,
            kernel_len,
        },
        _ => RequestBody::Create { config, kernel },
    }
}

/// A shutdown or reboot as the user asked for it.
struct Stop<'a> {
    /// As named on the command line.
    domain: &'a str,
    /// "power off" or "reboot", for messages.
    what: &'a str,
    /// `--wait`: how long the domain has to stop.
    wait: Option<Duration>,
}

/// Send a shutdown or reboot, say how it reached the domain and, with `--wait`, wait until
/// that domain (by id: a restarted one comes back under another) has stopped.
fn shutdown_sent(
    c: &mut Client,
    body: RequestBody,
    stop: &Stop<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
    json: bool,
) -> Result<(), Failure> {
    let (domain, what) = (stop.domain, stop.what);
    let target = match stop.wait {
        Some(_) => Some(domid_of(c, domain)?),
        None => None,
    };
    let path = match c.call(body)? {
        Reply::ShutdownSent(p) => p,
        r => return Err(unexpected(&r)),
    };
    if let (Some(domid), Some(limit)) = (target, stop.wait) {
        wait_stopped(c, domain, domid, limit, err)?;
    }
    let (via, line) = match path {
        ShutdownPath::Xenstore => (
            "xenstore",
            format!("asked {domain} to {what} through control/shutdown; it stops itself"),
        ),
        ShutdownPath::Hypervisor => (
            "hypervisor",
            format!("{domain} stopped by the hypervisor ({what})"),
        ),
    };
    if json {
        writeln!(out, "{}", json!({ "ok": true, "via": via }))?;
    } else {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The id of the domain named `domain` (a name or an id) now.
fn domid_of(c: &mut Client, domain: &str) -> Result<shared_abi::DomId, Failure> {
    match c.call(RequestBody::Info(dom(domain)))? {
        Reply::Info(d) => Ok(d.summary.domid),
        r => Err(unexpected(&r)),
    }
}

/// Poll until domain `domid` is gone or stopped (shut down, preserved, dying), at most
/// `limit`; a progress line on `err` while it takes more than a second.
fn wait_stopped(
    c: &mut Client,
    domain: &str,
    domid: shared_abi::DomId,
    limit: Duration,
    err: &mut dyn Write,
) -> Result<(), Failure> {
    let start = std::time::Instant::now();
    let mut shown = false;
    loop {
        let state = domains(c.call(RequestBody::List)?)?
            .iter()
            .find(|d| d.domid == domid)
            .map(|d| d.state);
        let stopped = match state {
            None => true,
            Some(s) => matches!(
                s,
                RunState::Shutdown(_) | RunState::Preserved | RunState::Dying
            ),
        };
        let waited = start.elapsed();
        if stopped {
            if shown {
                writeln!(err, "; stopped")?;
            }
            return Ok(());
        }
        if waited >= limit {
            if shown {
                writeln!(err)?;
            }
            return Err(Failure {
                status: exit::FAILED,
                message: format!(
                    "{domain} (domain {domid}) did not stop within {} s (state {}); hvctl shutdown --force stops it",
                    limit.as_secs(),
                    state.map_or('?', RunState::letter)
                ),
            });
        }
        if waited >= Duration::from_secs(1) {
            write!(
                err,
                "\rhvctl: waiting for {domain} to stop: {:.1} s",
                waited.as_secs_f64()
            )?;
            shown = true;
        }
        std::thread::sleep(Duration::from_millis(100));
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
        "{:<32} {:>5} {:>7} {:>7} {:>5} {:>6} {:>9}",
        "Name", "ID", "Mem", "MaxMem", "VCPUs", "State", "Time(s)"
    )?;
    for d in ds {
        writeln!(
            out,
            "{:<32} {:>5} {:>7} {:>7} {:>5} {:>6} {:>9.1}",
            d.name,
            d.domid,
            d.memory_kib / 1024,
            d.maxmem_kib / 1024,
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
