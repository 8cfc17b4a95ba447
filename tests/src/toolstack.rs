//! Driving the running system with the real `hvctl` (its library: the same code as the
//! command) over the management line, for the toolstack scenario and benchmark: run a verb
//! and keep its status and output ([`hvctl`]), watch the console for a line ([`Lines`],
//! [`wait_line`]), write configs, and build the bare-metal guests `hvctl create` sends.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_build::workspace::Workspace;
use clap::Parser;

/// Console lines with the time each arrived.
pub type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// Record `line` (from a [`crate::Scenario::boot_watching`] callback).
pub fn record(lines: &Lines, line: &str) {
    lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((Instant::now(), line.to_string()));
}

/// What one hvctl run gave.
#[derive(Debug)]
pub struct Ran {
    pub status: i32,
    pub out: String,
    pub err: String,
}

impl Ran {
    /// `Err` naming the verb unless it succeeded.
    pub fn ok(self, what: &str) -> Result<Ran, String> {
        if self.status == 0 {
            Ok(self)
        } else {
            Err(format!("{what}: status {}: {}", self.status, self.err))
        }
    }
}

/// Run `hvctl --socket <sock> --timeout 30 <args>`.
pub fn hvctl(sock: &Path, args: &[&str]) -> Ran {
    hvctl_with(sock, args, None)
}

/// [`hvctl`] with `input` as the console's input (`hvctl console`: forwarded, then a
/// detach at its end).
pub fn hvctl_in(sock: &Path, args: &[&str], input: &'static [u8]) -> Ran {
    hvctl_with(sock, args, Some(input))
}

fn hvctl_with(sock: &Path, args: &[&str], input: Option<&'static [u8]>) -> Ran {
    let mut argv = vec![
        "hvctl",
        "--socket",
        sock.to_str().unwrap_or("?"),
        "--timeout",
        "30",
    ];
    argv.extend_from_slice(args);
    let cli = match hvctl::Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            return Ran {
                status: -1,
                out: String::new(),
                err: e.to_string(),
            };
        }
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let connect = &mut hvctl::connect_socket;
    let status = match input {
        Some(i) => hvctl::run_with_input(
            cli,
            connect,
            hvctl::console::Input::Reader(Box::new(i)),
            &mut out,
            &mut err,
        ),
        None => hvctl::run(cli, connect, &mut out, &mut err),
    };
    Ran {
        status,
        out: String::from_utf8_lossy(&out).into_owned(),
        err: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// The names `hvctl list --json` shows.
pub fn names(sock: &Path) -> Result<Vec<String>, String> {
    let r = hvctl(sock, &["list", "--json"]).ok("list")?;
    let v: serde_json::Value =
        serde_json::from_str(&r.out).map_err(|e| format!("list --json: {e}: {}", r.out))?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// The domain id `hvctl create` answered.
pub fn created(r: &Ran) -> Result<u16, String> {
    if r.status != 0 {
        return Err(format!("create: status {}: {}", r.status, r.err));
    }
    r.out
        .trim()
        .strip_prefix("created domain ")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("create said {:?}", r.out))
}

/// Wait (up to `within`) for a console line matching `pred`; when it arrived.
pub fn wait_line(lines: &Lines, within: Duration, pred: impl Fn(&str) -> bool) -> Option<Instant> {
    wait_line_after(lines, None, within, pred)
}

/// [`wait_line`] for a line that arrived at or after `since`.
pub fn wait_line_after(
    lines: &Lines,
    since: Option<Instant>,
    within: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<Instant> {
    let end = Instant::now() + within;
    loop {
        if let Some((t, _)) = lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(t, l)| since.is_none_or(|s| *t >= s) && pred(l))
        {
            return Some(*t);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Domain `id` (`name`) powered off (at or after `since`, within `within`) and ctl applied
/// `on_poweroff = "destroy"`: the death logged, its xenstore home removed (that line may come
/// first), and it is gone from `list`.
pub fn destroyed_on_poweroff(
    sock: &Path,
    lines: &Lines,
    since: Option<Instant>,
    within: Duration,
    id: u16,
    name: &str,
) -> Result<(), String> {
    wait_line_after(lines, since, within, |l| {
        l.contains(&format!("ctl: domain {id} died: poweroff; destroyed"))
    })
    .ok_or_else(|| format!("ctl did not apply {name}'s on_poweroff"))?;
    wait_line_after(lines, since, Duration::from_secs(5), |l| {
        l.contains(&format!("ctl: xenstore /local/domain/{id} removed"))
    })
    .ok_or_else(|| format!("{name}'s xenstore home was not removed"))?;
    let now = names(sock)?;
    if now.iter().any(|n| n == name) {
        return Err(format!("{name} still listed after it powered off: {now:?}"));
    }
    Ok(())
}

/// Write a domain config `<dir>/<name>.toml` and return its path.
pub fn config(dir: &Path, name: &str, body: &str) -> Result<PathBuf, String> {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

/// Build the named domain crates for bare metal (release) in one cargo run; their ELF paths.
/// System images carry only their boot domains: `hvctl create` sends the others.
pub fn bare_metal_elves(crates: &[&str]) -> Vec<PathBuf> {
    let ws = Workspace::locate();
    let mut cmd = ws.cargo_command();
    cmd.args(["build", "--release", "--target", "x86_64-unknown-none"]);
    for c in crates {
        cmd.args(["-p", c]);
    }
    let st = cmd.status().expect("running cargo build for the guests");
    assert!(st.success(), "building {crates:?} for bare metal failed");
    crates
        .iter()
        .map(|c| ws.bare_metal_release_dir().join(c))
        .collect()
}

/// The boot domains of `systems/toolstack.toml` besides xenstore and ctl, in the order they
/// are shut down at the end (the guest first, the backends, the keeper last: ctl powers off
/// once no other domain is left).
pub const TOOLSTACK_BOOT_DOMAINS: &[&str] = &["peer", "netback", "blkback", "keeper"];

/// Boot `systems/toolstack.toml` with the management line on a socket; once ctl serves,
/// run `drive(socket, scratch dir, console lines)` on a thread. Whatever it gives, the system
/// is then ended: the run-time domains named in `leftovers` destroyed, the boot domains shut
/// down. Returns the finished boot and the driver's result (`Err`: the step that failed).
pub fn on_toolstack_system<T: Send + 'static>(
    tag: &str,
    qemu: crate::Scenario,
    leftovers: Vec<String>,
    drive: impl FnOnce(&Path, &Path, &Lines) -> Result<T, String> + Send + 'static,
) -> (crate::Boot, Result<T, String>) {
    let ws = Workspace::locate();
    let toml = std::fs::read_to_string(ws.root.join("systems/toolstack.toml"))
        .expect("reading systems/toolstack.toml");
    let img = crate::system_image(tag, "toolstack", &toml);
    let dir = crate::scenario_dir().join(format!("{tag}-run"));
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let sock = dir.join("hvctl.sock");
    let _ = std::fs::remove_file(&sock);
    let args: Vec<String> = bulkhead_build::qemu::mgmt_socket_args(&sock);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lines: Lines = Arc::new(Mutex::new(Vec::new()));
    let mut drive = Some((drive, leftovers));
    let mut driver: Option<thread::JoinHandle<Result<T, String>>> = None;
    let b = qemu
        .exit_when_done()
        .image(img)
        .qemu_args(&args)
        .boot_watching(|line| {
            record(&lines, line);
            if line.contains("ctl: serving hvctl")
                && let Some((drive, leftovers)) = drive.take()
            {
                let (sock, dir, lines) = (sock.clone(), dir.clone(), lines.clone());
                driver = Some(thread::spawn(move || {
                    let r = drive(&sock, &dir, &lines);
                    for n in &leftovers {
                        let _ = hvctl(&sock, &["destroy", n]);
                    }
                    let mut end = Ok(());
                    for n in TOOLSTACK_BOOT_DOMAINS {
                        let s = hvctl(&sock, &["shutdown", n]);
                        if s.status != 0 && end.is_ok() {
                            end = Err(format!("shutdown {n}: status {}: {}", s.status, s.err));
                        }
                    }
                    r.and_then(|v| end.map(|()| v))
                }));
            }
        });
    let r = match driver {
        None => Err("ctl never said it serves hvctl".to_string()),
        Some(d) => d
            .join()
            .unwrap_or_else(|_| Err("the driver thread panicked".to_string())),
    };
    (b, r)
}
