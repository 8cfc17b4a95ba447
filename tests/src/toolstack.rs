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
    let status = hvctl::run(cli, &mut hvctl::connect_socket, &mut out, &mut err);
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
