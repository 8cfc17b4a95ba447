//! The management channel's transport in the control domain: bytes from `hvctl` arrive on
//! the management serial line (COM2, relayed by the hypervisor's `domctl MGMT_IO`), go
//! through the frame decoder into the toolstack ([`ctl_dom::Server`]), and the replies go
//! back the same way.
//!
//! `MGMT_IO` never waits and the line has no interrupt, so the line is polled: at once again
//! while bytes arrive and, yielding the CPU between polls, for 20 ms after the last one (the
//! UART holds only 16 bytes and QEMU refills it within microseconds: sleeping between
//! refills cut a kernel transfer's speed by four), then every millisecond for a while, every
//! 10 ms when idle. `VIRQ_DOM_EXC` is waited on between polls: a
//! domain this toolstack built that died gets its `on_poweroff` / `on_reboot` / `on_crash`
//! policy ([`ctl_dom::Toolstack::domain_died`]), then control returns to the main loop so
//! the boot domains' policies are applied too. Restarts obey the same limit as boot
//! domains' (`max_restarts=`, `window_ms=`; default 3 per 60 s): one more death within the
//! window leaves the domain destroyed.
//!
//! Serving needs the line: `MGMT_IO` answering `ENODEV` means the machine has none (the
//! `mgmt` command-line word only makes ctl say so).
//!
//! Requests are answered one at a time, so a detach holds the line while the guest is given
//! time to release the device (its `timeout_ms`, at most 300 s; `ctl_dom::devices`). The
//! platform's sleep between polls consumes whatever event ports fire, `VIRQ_DOM_EXC`
//! included; nothing is lost: once the answer is out, the run-time domains are looked at
//! again by listing them (`Mgmt::deaths`) and the main loop lists the boot domains.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use ctl_dom::boot_lifecycle::RestartLimit;
use ctl_dom::{DeathOutcome, Server, shutdown};
use dom_rt::event::Waiter;
use dom_rt::xenbus::DomainBus;
use dom_rt::{XenError, domctl, hypercall, println, time};
use shared_abi::DomId;
use shared_abi::hypercall_args::domctl::{MGMT_IO_MAX, state as st};

use crate::platform::Hv;

/// Poll period while idle.
const IDLE_NS: u64 = 10_000_000;
/// Poll period shortly after bytes moved.
const FLOWING_NS: u64 = 1_000_000;
/// How long after the last byte the line counts as flowing.
const FLOW_WINDOW_NS: u64 = 50_000_000;
/// Spin (yielding) this long after the last byte before sleeping: a transfer refills the
/// UART's FIFO within microseconds, and a loaded host pauses it for milliseconds.
const SPIN_NS: u64 = 20_000_000;
/// Return to the main loop at least this often (its boot-domain scan), in case a
/// `VIRQ_DOM_EXC` was consumed by a xenstore wait.
const RESCAN_NS: u64 = 250_000_000;

/// The toolstack serving the management line.
pub struct Mgmt {
    server: Server<Hv>,
    /// Run-time domains already kept by `preserve`: not handled again.
    preserved: BTreeSet<DomId>,
    /// Restarted domains: current id → (restarts in the window, when the window began).
    restarts: BTreeMap<DomId, (u32, u64)>,
    limit: RestartLimit,
    /// Reply bytes the line has not taken yet.
    out: Vec<u8>,
    last_byte_ns: u64,
    /// The request bytes read since the last answer, when the first came, and the time
    /// spent handling them (for the line that reports long transfers).
    burst: (usize, u64, u64),
}

/// Requests at least this long get a line saying how long the line and the work took.
const REPORT_BYTES: usize = 8 * 1024;

fn param(cmdline: &str, key: &str) -> Option<u64> {
    cmdline.split_whitespace().find_map(|w| {
        let (k, v) = w.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// Serve if the machine has a management line.
pub fn open(cmdline: &str) -> Option<Mgmt> {
    let asked = cmdline.split_whitespace().any(|w| w == "mgmt");
    let d = RestartLimit::default();
    let limit = RestartLimit {
        max: param(cmdline, "max_restarts").map_or(d.max, |v| v.min(u64::from(u32::MAX)) as u32),
        window_ns: param(cmdline, "window_ms")
            .map_or(d.window_ns, |ms| ms.saturating_mul(1_000_000)),
    };
    match domctl::mgmt_read(&mut []) {
        Ok(_) => {
            println!("ctl: serving hvctl on the management line (COM2)");
            Some(Mgmt {
                server: Server::new(Hv {
                    xb: None,
                    create_times: Default::default(),
                }),
                preserved: BTreeSet::new(),
                restarts: BTreeMap::new(),
                limit,
                out: Vec::new(),
                last_byte_ns: 0,
                burst: (0, 0, 0),
            })
        }
        Err(XenError::ENODEV) => {
            if asked {
                println!("ctl: mgmt asked for, but the machine has no management line (COM2)");
            }
            None
        }
        Err(e) => {
            println!("ctl: management line refused ({e:?}): not serving hvctl");
            None
        }
    }
}

/// The main loop's wait: without a line, block for `VIRQ_DOM_EXC`; with one, serve requests
/// until the VIRQ fires, a request was answered, or [`RESCAN_NS`] passed. `xb` (this domain's
/// xenstore connection) is lent to the toolstack meanwhile.
pub fn wait(
    serve: &mut Option<Mgmt>,
    waiter: &mut Waiter,
    dom_exc: u32,
    xb: &mut Option<DomainBus>,
) -> Result<(), XenError> {
    let Some(m) = serve.as_mut() else {
        return waiter.wait(dom_exc);
    };
    core::mem::swap(&mut m.server.toolstack.platform.xb, xb);
    let r = m.serve(waiter, dom_exc);
    // Teardowns remove xenstore nodes: still with the connection.
    m.deaths();
    core::mem::swap(&mut m.server.toolstack.platform.xb, xb);
    r
}

impl Mgmt {
    fn serve(&mut self, waiter: &mut Waiter, dom_exc: u32) -> Result<(), XenError> {
        let start = time::now_ns();
        loop {
            let (moved, answered) = self.pump()?;
            let now = time::now_ns();
            if moved {
                self.last_byte_ns = now;
            }
            if answered || now.saturating_sub(start) >= RESCAN_NS {
                return Ok(());
            }
            let since = now.saturating_sub(self.last_byte_ns);
            if moved || since < SPIN_NS || !self.out.is_empty() {
                waiter.collect();
                if waiter.take(dom_exc) {
                    return Ok(());
                }
                hypercall::sched_yield()?;
                continue;
            }
            let period = if since < FLOW_WINDOW_NS {
                FLOWING_NS
            } else {
                IDLE_NS
            };
            if waiter.wait_until(dom_exc, now.saturating_add(period))? {
                return Ok(());
            }
        }
    }

    /// Move what the line has: read everything received, answer every whole request,
    /// write what the line takes. (bytes moved, a request answered).
    fn pump(&mut self) -> Result<(bool, bool), XenError> {
        let mut moved = false;
        let mut answered = false;
        let mut buf = [0u8; MGMT_IO_MAX as usize];
        loop {
            let n = domctl::mgmt_read(&mut buf)?;
            if n == 0 {
                break;
            }
            moved = true;
            let t0 = time::now_ns();
            if self.burst.0 == 0 {
                self.burst.1 = t0;
            }
            self.burst.0 += n;
            let reply = self.server.receive(&buf[..n]);
            let t1 = time::now_ns();
            self.burst.2 += t1.saturating_sub(t0);
            if !reply.is_empty() {
                answered = true;
                self.out.extend_from_slice(&reply);
                let (bytes, first, work) = core::mem::take(&mut self.burst);
                if bytes >= REPORT_BYTES {
                    let total = t1.saturating_sub(first);
                    println!(
                        "ctl: request of {bytes} bytes: {} us on the line, {} us handling it",
                        total.saturating_sub(work) / 1000,
                        work / 1000
                    );
                }
            }
        }
        while !self.out.is_empty() {
            let take = self.out.len().min(MGMT_IO_MAX as usize);
            let n = domctl::mgmt_write(&self.out[..take])?;
            if n == 0 {
                break;
            }
            moved = true;
            self.out.drain(..n);
        }
        Ok((moved, answered))
    }

    /// Apply the policies of the run-time domains that died (shut down, dying, dead or
    /// gone). The reason is the hypervisor's; a domain gone without one counts as crashed.
    fn deaths(&mut self) {
        let managed = self.server.toolstack.managed_ids();
        self.preserved.retain(|id| managed.contains(id));
        self.restarts.retain(|id, _| managed.contains(id));
        if managed.iter().all(|id| self.preserved.contains(id)) {
            return;
        }
        let list = match domctl::list_domains() {
            Ok(l) => l,
            Err(e) => {
                println!("ctl: cannot list domains: {e:?}");
                return;
            }
        };
        for id in managed {
            if self.preserved.contains(&id) {
                continue;
            }
            let reason = match list.iter().find(|d| d.domid == id) {
                Some(d) if matches!(d.state, st::SHUTDOWN | st::DYING | st::DEAD) => {
                    d.shutdown_reason
                }
                Some(_) => continue,
                None => shutdown::CRASH,
            };
            let why = match reason {
                shutdown::POWEROFF => "poweroff",
                shutdown::REBOOT => "reboot",
                shutdown::SUSPEND => "suspend (counts as crash)",
                _ => "crash",
            };
            let now = time::now_ns();
            let (n, since) = match self.restarts.remove(&id) {
                Some((n, since)) if now.saturating_sub(since) < self.limit.window_ns => (n, since),
                _ => (0, now),
            };
            if n >= self.limit.max {
                // Only a domain restarted before gets here: its policy says restart again.
                if let Err(e) = self.server.toolstack.give_up(id) {
                    println!("ctl: destroying domain {id}: {e:?}");
                }
                println!(
                    "ctl: domain {id} died again ({why}) after {n} restarts within {} ms: restart limit reached; leaving it destroyed",
                    self.limit.window_ns / 1_000_000
                );
                continue;
            }
            match self.server.toolstack.domain_died(id, reason) {
                DeathOutcome::Destroyed => {
                    println!("ctl: domain {id} died: {why}; destroyed, as its policy says")
                }
                DeathOutcome::Restarted { new_domid } => {
                    self.restarts.insert(new_domid, (n + 1, since));
                    println!(
                        "ctl: domain {id} died: {why}; restarted as domain {new_domid} (restart #{})",
                        n + 1
                    )
                }
                DeathOutcome::Preserved => {
                    self.preserved.insert(id);
                    println!("ctl: domain {id} died: {why}; preserved for inspection")
                }
                DeathOutcome::RestartFailed(e) => {
                    println!("ctl: domain {id} died: {why}; restart failed ({e:?}), destroyed")
                }
                DeathOutcome::NotManaged => {}
            }
        }
    }
}
