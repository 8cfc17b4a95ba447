//! `hvctl top`: live CPU, memory and I/O per domain (xentop's view).
//!
//! Each iteration samples `List` (CPU time, memory, state) and `DomainStats` (the
//! hypervisor's per-domain I/O counters), waits `--delay` seconds, samples again and shows
//! rates over the wall time between the two samples:
//!
//! - CPU(%): CPU time used / wall time, summed over the domain's vCPUs as xentop does (a
//!   domain with 2 busy vCPUs shows 200); `--json` also gives it per vCPU.
//! - MEM(k), MAXMEM(k): what it holds and its limit.
//! - EVT/s: event-channel notifications it sent; GNT(k/s): KiB copied through its grants
//!   (its disk and network traffic, as copied by its backends); COPY/s: grant copies it did
//!   itself (a backend's work); MAPS/s: mappings of its grants by others; CON(B/s): console
//!   bytes it wrote.
//!
//! A domain that appeared between two samples shows `-` for rates until the next one. With a
//! ctl-dom that has no `DomainStats`, the I/O columns show `-`.
//!
//! On a terminal (and without `--json` or `-n`) it is a full-screen display refreshed every
//! `--delay` seconds until `q` or Ctrl-C, the terminal restored afterwards. Otherwise (a
//! pipe, a script) it prints `-n` iterations (default 1) as tables, or one JSON object per
//! iteration and line with `--json`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::json;
use shared_abi::mgmt::{DomainIoStats, DomainSummary, MgmtError, Reply, RequestBody};

use crate::client::{Client, ClientError};
use crate::{Failure, domains, state_column, unexpected};

/// One look at the system.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub domains: Vec<DomainSummary>,
    /// `None` when ctl-dom has no `DomainStats`.
    pub stats: Option<Vec<DomainIoStats>>,
}

/// One line of the display.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub domid: u16,
    pub name: String,
    pub state: String,
    pub cpu_s: f64,
    /// Summed over vCPUs; `None` for a domain new since the last sample.
    pub cpu_pct: Option<f64>,
    pub vcpus: u32,
    pub memory_kib: u64,
    pub maxmem_kib: u64,
    pub evtchn_per_s: Option<f64>,
    pub grant_kib_per_s: Option<f64>,
    pub copies_per_s: Option<f64>,
    pub maps_per_s: Option<f64>,
    pub console_bytes_per_s: Option<f64>,
}

fn rate(now: u64, then: u64, secs: f64) -> f64 {
    now.saturating_sub(then) as f64 / secs
}

/// The rows for two samples taken `wall` apart (`after`'s domains, in its order).
pub fn rows(before: &Sample, after: &Sample, wall: Duration) -> Vec<Row> {
    let secs = wall.as_secs_f64().max(1e-9);
    let io = |s: &Sample, id: u16| -> Option<DomainIoStats> {
        s.stats
            .as_ref()
            .and_then(|v| v.iter().find(|x| x.domid == id).cloned())
    };
    after
        .domains
        .iter()
        .map(|d| {
            let prev = before.domains.iter().find(|b| b.domid == d.domid);
            let (now_io, then_io) = (io(after, d.domid), io(before, d.domid));
            let pair = now_io.zip(then_io.filter(|_| prev.is_some()));
            let per_s =
                |f: fn(&DomainIoStats) -> u64| pair.as_ref().map(|(n, t)| rate(f(n), f(t), secs));
            Row {
                domid: d.domid,
                name: d.name.clone(),
                state: state_column(d),
                cpu_s: d.cpu_time_ns as f64 / 1e9,
                cpu_pct: prev.map(|p| rate(d.cpu_time_ns, p.cpu_time_ns, secs) / 1e9 * 100.0),
                vcpus: d.vcpus,
                memory_kib: d.memory_kib,
                maxmem_kib: d.maxmem_kib,
                evtchn_per_s: per_s(|s| s.evtchn_sends),
                grant_kib_per_s: per_s(|s| s.grant_copy_bytes).map(|b| b / 1024.0),
                copies_per_s: per_s(|s| s.grant_copies_done),
                maps_per_s: per_s(|s| s.grant_maps),
                console_bytes_per_s: per_s(|s| s.console_out_bytes),
            }
        })
        .collect()
}

fn opt(v: Option<f64>, width: usize, prec: usize) -> String {
    match v {
        Some(v) => format!("{v:>width$.prec$}"),
        None => format!("{:>width$}", "-"),
    }
}

/// The table: a header line and one line per row.
pub fn render(rows: &[Row]) -> Vec<String> {
    let mut v = vec![format!(
        "{:<16} {:>5} {:>6} {:>9} {:>7} {:>5} {:>9} {:>9} {:>7} {:>9} {:>7} {:>7} {:>8}",
        "NAME",
        "ID",
        "STATE",
        "CPU(sec)",
        "CPU(%)",
        "VCPUS",
        "MEM(k)",
        "MAXMEM(k)",
        "EVT/s",
        "GNT(k/s)",
        "COPY/s",
        "MAPS/s",
        "CON(B/s)"
    )];
    for r in rows {
        let name: String = r.name.chars().take(16).collect();
        v.push(format!(
            "{:<16} {:>5} {:>6} {:>9.1} {} {:>5} {:>9} {:>9} {} {} {} {} {}",
            name,
            r.domid,
            r.state,
            r.cpu_s,
            opt(r.cpu_pct, 7, 1),
            r.vcpus,
            r.memory_kib,
            r.maxmem_kib,
            opt(r.evtchn_per_s, 7, 1),
            opt(r.grant_kib_per_s, 9, 1),
            opt(r.copies_per_s, 7, 1),
            opt(r.maps_per_s, 7, 1),
            opt(r.console_bytes_per_s, 8, 0),
        ));
    }
    v
}

/// One iteration as one JSON object.
pub fn to_json(iteration: u32, wall: Duration, rows: &[Row]) -> serde_json::Value {
    let ds: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "domid": r.domid,
                "name": r.name,
                "state": r.state,
                "cpu_seconds": r.cpu_s,
                "cpu_percent": r.cpu_pct,
                "cpu_percent_per_vcpu": r.cpu_pct.map(|p| p / f64::from(r.vcpus.max(1))),
                "vcpus": r.vcpus,
                "memory_kib": r.memory_kib,
                "maxmem_kib": r.maxmem_kib,
                "evtchn_sends_per_s": r.evtchn_per_s,
                "grant_copy_kib_per_s": r.grant_kib_per_s,
                "grant_copies_per_s": r.copies_per_s,
                "grant_maps_per_s": r.maps_per_s,
                "console_bytes_per_s": r.console_bytes_per_s,
            })
        })
        .collect();
    json!({
        "iteration": iteration,
        "interval_s": wall.as_secs_f64(),
        "domains": ds,
    })
}

fn sample(c: &mut Client) -> Result<Sample, Failure> {
    let ds = domains(c.call(RequestBody::List)?)?;
    let stats = match c.call(RequestBody::DomainStats) {
        Ok(Reply::Stats(s)) => Some(s),
        Ok(r) => return Err(unexpected(&r)),
        // An older ctl-dom (or a hypervisor without the counters): CPU and memory only.
        Err(ClientError::Server(MgmtError::Unsupported(_) | MgmtError::BadRequest(_))) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(Sample {
        at: Instant::now(),
        domains: ds,
        stats,
    })
}

/// The full-screen display for as long as it lives.
struct Screen;

impl Screen {
    fn enter(out: &mut dyn Write) -> std::io::Result<Self> {
        crossterm::terminal::enable_raw_mode()?;
        let s = Screen;
        let mut w = out;
        crossterm::execute!(
            &mut w,
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        Ok(s)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut o = std::io::stdout();
        let _ = crossterm::execute!(
            o,
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// Wait `d` for keys; whether to quit (q, Q, Esc or Ctrl-C).
fn wait_keys(d: Duration) -> std::io::Result<bool> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    let end = Instant::now() + d;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if !event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(k) = event::read()?
            && k.kind != KeyEventKind::Release
        {
            let ctrl_c =
                k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
            if ctrl_c || matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                return Ok(true);
            }
        }
        if Instant::now() >= end {
            return Ok(false);
        }
    }
}

fn draw(out: &mut dyn Write, lines: &[String], delay: Duration) -> std::io::Result<()> {
    use crossterm::{cursor, queue, terminal};
    let mut w = &mut *out;
    queue!(
        &mut w,
        cursor::MoveTo(0, 0),
        terminal::Clear(terminal::ClearType::All)
    )?;
    write!(
        out,
        "hvctl top: {} domains, every {:.1} s; q to quit\r\n\r\n",
        lines.len().saturating_sub(1),
        delay.as_secs_f64()
    )?;
    for l in lines {
        write!(out, "{l}\r\n")?;
    }
    out.flush()
}

/// `--delay` as a duration: a finite number of seconds, 0..=3600.
pub fn parse_delay(s: f64) -> Result<Duration, Failure> {
    if s.is_finite() && (0.0..=3600.0).contains(&s) {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(Failure::usage(format!(
            "delay: {s} is not allowed; allowed: seconds from 0 to 3600"
        )))
    }
}

/// `hvctl top`: see the module documentation.
pub(crate) fn top(
    c: &mut Client,
    delay: Duration,
    iterations: Option<u32>,
    out: &mut dyn Write,
    json: bool,
) -> Result<(), Failure> {
    let live = !json
        && iterations.is_none()
        && std::io::stdout().is_terminal()
        && std::io::stdin().is_terminal();
    let n = iterations.unwrap_or(if live { u32::MAX } else { 1 });
    let mut before = sample(c)?;
    let screen = if live {
        Some(Screen::enter(out).map_err(|e| Failure {
            status: crate::exit::FAILED,
            message: format!("top: cannot set up the terminal: {e}"),
        })?)
    } else {
        None
    };
    for i in 0..n {
        if screen.is_some() {
            if wait_keys(delay)? {
                break;
            }
        } else {
            std::thread::sleep(delay);
        }
        let after = sample(c)?;
        let wall = after.at.duration_since(before.at);
        let rs = rows(&before, &after, wall);
        if json {
            writeln!(out, "{}", to_json(i, wall, &rs))?;
        } else if screen.is_some() {
            draw(out, &render(&rs), delay)?;
        } else {
            if i > 0 {
                writeln!(out)?;
            }
            for l in render(&rs) {
                writeln!(out, "{l}")?;
            }
        }
        out.flush()?;
        before = after;
    }
    drop(screen);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_abi::capability::Capabilities;
    use shared_abi::mgmt::RunState;

    fn d(domid: u16, name: &str, cpu_ns: u64, vcpus: u32) -> DomainSummary {
        DomainSummary {
            domid,
            name: name.into(),
            state: RunState::Running,
            memory_kib: 16384,
            maxmem_kib: 32768,
            vcpus,
            cpu_time_ns: cpu_ns,
            weight: 256,
            cap_percent: 0,
            capabilities: Capabilities::empty(),
        }
    }

    fn io(domid: u16, evt: u64, bytes: u64) -> DomainIoStats {
        DomainIoStats {
            domid,
            evtchn_sends: evt,
            grant_copy_bytes: bytes,
            grant_copies_done: evt / 2,
            grant_maps: 1,
            console_out_bytes: bytes / 4,
            console_in_bytes: 0,
        }
    }

    fn pair() -> (Sample, Sample) {
        let t0 = Instant::now();
        let before = Sample {
            at: t0,
            domains: vec![d(1, "ctl-dom", 1_000_000_000, 1), d(5, "web", 0, 2)],
            stats: Some(vec![io(1, 10, 0), io(5, 100, 1 << 20)]),
        };
        let after = Sample {
            at: t0 + Duration::from_secs(2),
            domains: vec![
                d(1, "ctl-dom", 1_500_000_000, 1),
                d(5, "web", 3_000_000_000, 2),
                d(9, "new", 7_000_000_000, 1),
            ],
            stats: Some(vec![io(1, 30, 0), io(5, 300, 5 << 20), io(9, 5, 5)]),
        };
        (before, after)
    }

    #[test]
    fn rates_are_deltas_over_wall_time_summed_over_vcpus() {
        let (b, a) = pair();
        let r = rows(&b, &a, Duration::from_secs(2));
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].cpu_pct, Some(25.0));
        assert_eq!(r[1].cpu_pct, Some(150.0), "two vCPUs: up to 200");
        assert_eq!(r[1].evtchn_per_s, Some(100.0));
        assert_eq!(r[1].grant_kib_per_s, Some(2048.0));
        assert_eq!(r[1].copies_per_s, Some(50.0));
        assert_eq!(r[1].maps_per_s, Some(0.0));
        assert_eq!(r[1].console_bytes_per_s, Some(512.0 * 1024.0));
        // New since the last sample: no rates yet, but its totals.
        assert_eq!((r[2].cpu_pct, r[2].evtchn_per_s), (None, None));
        assert_eq!(r[2].cpu_s, 7.0);
        let j = to_json(3, Duration::from_secs(2), &r);
        assert_eq!(j["domains"][1]["cpu_percent_per_vcpu"], 75.0);
        assert_eq!(j["domains"][2]["cpu_percent"], serde_json::Value::Null);
        assert_eq!(j["iteration"], 3);
    }

    #[test]
    fn counters_that_go_backwards_or_a_zero_interval_do_not_break_it() {
        let (mut b, a) = pair();
        b.domains[0].cpu_time_ns = u64::MAX;
        b.stats = Some(vec![io(1, u64::MAX, u64::MAX)]);
        let r = rows(&b, &a, Duration::ZERO);
        assert_eq!(r[0].cpu_pct, Some(0.0));
        assert_eq!(r[0].evtchn_per_s, Some(0.0));
        assert_eq!(r[1].evtchn_per_s, None, "no counters in the first sample");
        assert!(r.iter().all(|x| x.cpu_pct.is_none_or(f64::is_finite)));
    }

    #[test]
    fn without_stats_the_io_columns_show_dashes() {
        let (mut b, mut a) = pair();
        b.stats = None;
        a.stats = None;
        let r = rows(&b, &a, Duration::from_secs(1));
        let t = render(&r);
        assert_eq!(t.len(), 4);
        assert!(t[0].starts_with("NAME") && t[0].contains("GNT(k/s)"));
        assert!(t[2].starts_with("web"), "{}", t[2]);
        assert!(t[2].trim_end().ends_with('-'), "{}", t[2]);
        assert!(t[2].contains("300.0"), "{}", t[2]);
        // Columns line up: every row as wide as the header.
        assert!(t.iter().all(|l| l.len() == t[0].len()), "{t:#?}");
    }

    #[test]
    fn rendered_rows_line_up_with_numbers_and_long_names_cut() {
        let (b, mut a) = pair();
        a.domains[1].name = "a-very-long-domain-name-indeed".into();
        let t = render(&rows(&b, &a, Duration::from_secs(2)));
        assert!(t.iter().all(|l| l.len() == t[0].len()), "{t:#?}");
        assert!(t[2].starts_with("a-very-long-doma "), "{}", t[2]);
        assert!(t[2].contains(" 150.0 "), "{}", t[2]);
    }

    #[test]
    fn delay_is_checked() {
        assert_eq!(parse_delay(0.5).unwrap(), Duration::from_millis(500));
        for bad in [-1.0, f64::NAN, f64::INFINITY, 4000.0] {
            assert!(parse_delay(bad).is_err(), "{bad}");
        }
    }
}
