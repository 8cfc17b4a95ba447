//! The real [`Platform`]: the hypervisor through dom-rt's domctl wrappers, xenstore through
//! this domain's own xenstore connection.
//!
//! - `create`: `domctl CREATE_DOMAIN` with `CREATE_PAUSED` (the one builder, from the ELF that
//!   came with the request); the toolstack writes the domain's xenstore entries and devices,
//!   then [`Platform::start`] unpauses it, as `xl create` does. The xenstore domain learns of
//!   the new domain (and its offered ring port) by listing domains on `VIRQ_DOM_EXC`, so
//!   `xs_introduce` has nothing to send.
//! - `shutdown`: `SCHEDOP_remote_shutdown`, which needs this domain's `remote_shutdown`
//!   capability; without it the hypervisor's `EPERM` is the answer (no silent fallback to
//!   destroy: a destroy skips the guest's own shutdown and reports no reason).
//! - `set_sched`: `domctl SCHEDULER_OP` (credit putinfo).
//! - `create` passes the config's `preserve` policies as `CREATE_PRESERVE_*` flags, so the
//!   hypervisor keeps (does not free) a domain that shuts down for such a reason.
//! - `console_read`, `dmesg`: `domctl CONSOLE_READ` of the domain's console history, or of
//!   `DOMID_XEN` (the hypervisor's log), from the reader's offset.
//! - `set_memory`: `XEN_DOMCTL_max_mem` (xl's `mem-set` with its default `enforce`: the
//!   limit follows the target). As in Xen, below what the domain holds nothing is taken
//!   away; it only gets no new page until it gives some back.
//! - `set_max_memory`: `XEN_DOMCTL_max_mem` too: after `create` built the domain with
//!   `memory`, its limit becomes the config's `maxmem` (what `list` shows as max).
//! - `xs_write_plan`: [`write_plan`], one transaction (the writer boot devices use too).
//! - `sleep_ms`: blocks on a timer; the event ports that fire meanwhile are consumed (the
//!   management loop lists the domains after every request, so a `VIRQ_DOM_EXC` taken here
//!   is not lost).

use alloc::string::String;
use alloc::vec::Vec;

use ctl_dom::xenstore_layout::XsPlan;
use ctl_dom::{Chunk, HvDomain, Platform};
use dom_rt::domctl::{self, NewDomain};
use dom_rt::event::Waiter;
use dom_rt::xenbus::{Batch, DomainBus, TRANSACTION_TRIES, Tx};
use dom_rt::{XenError, hypercall, println, time};
use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::domain_config::{DomainConfig, LifecycleAction};
use shared_abi::domid::DOMID_XEN;
use shared_abi::hypercall_args::domctl::{
    self as dc, DOMINF_BLOCKED, DOMINF_PAUSED, DomainInfo, state as st,
};
use shared_abi::mgmt::RunState;

/// How long `xs_introduce` waits for the xenstore domain to serve a new domain.
const INTRODUCE_WAIT_NS: u64 = 5_000_000_000;

/// KiB per page.
const PAGE_KIB: u64 = 4;

/// The hypervisor and xenstore as the toolstack sees them.
pub struct Hv {
    /// This domain's xenstore connection, lent by the main loop while requests are served
    /// (the one ring is shared with the boot device code).
    pub xb: Option<DomainBus>,
    /// Where the time of the create under way goes (reported when it is unpaused).
    pub create_times: CreateTimes,
}

/// The phases of building a domain, in µs: the figure LightVM's 2.3 ms compares with, split
/// so that the cost of the hypervisor's build and of xenstore can be told apart.
#[derive(Debug, Default)]
pub struct CreateTimes {
    build_us: u64,
    introduce_us: u64,
    /// Every plan written since the build: the home, then each device.
    entries_us: u64,
    entries_written: u32,
}

/// Run `f` and add the µs it took to `into`.
fn timed<T>(into: &mut u64, f: impl FnOnce() -> T) -> T {
    let t0 = time::now_ns();
    let r = f();
    *into += time::now_ns().saturating_sub(t0) / 1000;
    r
}

/// What `LIST_DOMAINS` says, in the protocol's terms.
pub fn hv_domain(d: &DomainInfo) -> HvDomain {
    let state = match d.state {
        st::PAUSED => RunState::Paused,
        st::SHUTDOWN => RunState::Shutdown(d.shutdown_reason),
        st::DYING | st::DEAD => RunState::Dying,
        _ if d.flags & DOMINF_PAUSED != 0 => RunState::Paused,
        _ if d.flags & DOMINF_BLOCKED != 0 => RunState::Blocked,
        _ => RunState::Running,
    };
    HvDomain {
        domid: d.domid,
        name: String::from(d.name()),
        state,
        memory_kib: d.tot_pages.saturating_mul(PAGE_KIB),
        maxmem_kib: d.max_pages.saturating_mul(PAGE_KIB),
        vcpus: d.nr_vcpus,
        cpu_time_ns: d.cpu_time,
        weight: d.weight,
        cap_percent: d.cap_percent,
        capabilities: Capabilities::from_bits_truncate(d.capabilities),
    }
}

/// The `CREATE_PRESERVE_*` flags for a config's `preserve` policies.
fn preserve_flags(c: &DomainConfig) -> u32 {
    [
        (c.on_poweroff, dc::CREATE_PRESERVE_POWEROFF),
        (c.on_reboot, dc::CREATE_PRESERVE_REBOOT),
        (c.on_crash, dc::CREATE_PRESERVE_CRASH),
    ]
    .iter()
    .filter(|(a, _)| *a == LifecycleAction::Preserve)
    .fold(0, |f, (_, bit)| f | bit)
}

/// One chunk of a console history (`DOMID_XEN`: the hypervisor's log), at most `max` bytes.
fn history(domid: DomId, from: u64, max: usize) -> Result<Chunk, XenError> {
    let mut buf = alloc::vec![0u8; max.min(dc::CONSOLE_READ_MAX as usize)];
    let c = domctl::console_read(domid, from, &mut buf)?;
    buf.truncate(c.len);
    Ok((c.next, c.lost, buf))
}

/// Write `plan` in one transaction: a frontend or backend sees all of it or none. Each
/// directory is made and given its permissions before the nodes below it are written, so
/// they inherit them (xenstore answers in order, so the plan goes as one batch: one round
/// trip to the xenstore domain instead of one per node). With `reperm_first`, every node
/// already below the first directory (up to 3 levels) gets its permissions too: a
/// re-pointed device's frontend nodes (its state, ring keys…) keep the ones they were
/// created with otherwise, which the new backend may not read.
pub fn write_plan(xb: &mut DomainBus, plan: &XsPlan, reperm_first: bool) -> Result<(), XenError> {
    let mut batch = Batch::default();
    for (dir, perms) in &plan.dirs {
        let perms: Vec<&str> = perms.iter().map(String::as_str).collect();
        batch.mkdir(dir);
        batch.set_perms(dir, &perms);
    }
    for (k, v) in &plan.entries {
        batch.write(k, v.as_bytes());
    }
    xb.transaction(TRANSACTION_TRIES, |xb, tx| {
        xb.send_batch(tx, &batch)?;
        match plan.dirs.first() {
            Some((dir, perms)) if reperm_first => {
                let perms: Vec<&str> = perms.iter().map(String::as_str).collect();
                set_perms_below(xb, tx, dir, &perms, 3)
            }
            _ => Ok(()),
        }
    })
}

/// `set_perms` on every node below `dir`, `depth` levels down.
fn set_perms_below(
    xb: &mut DomainBus,
    tx: Tx,
    dir: &str,
    perms: &[&str],
    depth: u32,
) -> Result<(), XenError> {
    if depth == 0 {
        return Ok(());
    }
    for child in xb.directory(tx, dir)? {
        let p = alloc::format!("{dir}/{child}");
        xb.set_perms(tx, &p, perms)?;
        set_perms_below(xb, tx, &p, perms, depth - 1)?;
    }
    Ok(())
}

impl Hv {
    fn xs(&mut self) -> Result<&mut DomainBus, XenError> {
        // No connection: the store cannot be reached (the caller reports it).
        self.xb.as_mut().ok_or(XenError::EIO)
    }

    /// Ask xenstore until it serves `domid` (or `deadline`, in `time::now_ns`, passes).
    fn wait_introduced(&mut self, domid: DomId, deadline: u64) -> Result<(), XenError> {
        loop {
            if self.xs()?.is_domain_introduced(domid)? {
                return Ok(());
            }
            if time::now_ns() >= deadline {
                println!("ctl: xenstore did not introduce domain {domid} within 5 s");
                return Err(XenError::ETIMEDOUT);
            }
            let _ = hypercall::sched_yield();
        }
    }
}

impl Platform for Hv {
    fn list(&mut self) -> Result<Vec<HvDomain>, XenError> {
        Ok(domctl::list_domains()?
            .iter()
            // A dead domain whose entry the hypervisor still keeps is not listed.
            .filter(|d| d.state != st::DEAD)
            .map(hv_domain)
            .collect())
    }

    fn create(&mut self, c: &DomainConfig, kernel: &[u8]) -> Result<DomId, XenError> {
        self.create_times = CreateTimes::default();
        let new = NewDomain {
            name: &c.name,
            elf: kernel,
            memory_kib: c.memory_kib,
            vcpus: c.vcpus,
            weight: c.weight,
            cap_percent: c.cap_percent,
            capabilities: c.capabilities,
            cmdline: &c.cmdline,
            paused: true,
            preserve: preserve_flags(c),
        };
        timed(&mut self.create_times.build_us, || {
            domctl::create_domain(&new)
        })
    }

    fn start(&mut self, domid: DomId) -> Result<(), XenError> {
        let mut unpause_us = 0;
        let r = timed(&mut unpause_us, || domctl::unpause(domid));
        let t = core::mem::take(&mut self.create_times);
        println!(
            "ctl: domain {domid} built in {} us, introduced to xenstore in {} us, {} xenstore plans written in {} us, unpaused in {unpause_us} us",
            t.build_us, t.introduce_us, t.entries_written, t.entries_us
        );
        r
    }

    fn destroy(&mut self, domid: DomId) -> Result<(), XenError> {
        domctl::destroy(domid)
    }

    fn pause(&mut self, domid: DomId) -> Result<(), XenError> {
        domctl::pause(domid)
    }

    fn unpause(&mut self, domid: DomId) -> Result<(), XenError> {
        domctl::unpause(domid)
    }

    fn shutdown(&mut self, domid: DomId, reason: u32) -> Result<(), XenError> {
        hypercall::remote_shutdown(domid, reason)
    }

    fn set_sched(&mut self, domid: DomId, weight: u32, cap_percent: u32) -> Result<(), XenError> {
        domctl::set_sched(domid, weight, cap_percent)
    }

    fn set_memory(&mut self, domid: DomId, kib: u64) -> Result<(), XenError> {
        domctl::set_max_mem(domid, kib)
    }

    fn set_max_memory(&mut self, domid: DomId, kib: u64) -> Result<(), XenError> {
        domctl::set_max_mem(domid, kib)
    }

    fn xs_write_plan(&mut self, plan: &XsPlan) -> Result<(), XenError> {
        let mut us = 0;
        let r = timed(&mut us, || write_plan(self.xs()?, plan, false));
        self.create_times.entries_us += us;
        self.create_times.entries_written += 1;
        r
    }

    fn xs_read(&mut self, path: &str) -> Result<String, XenError> {
        self.xs()?.read_string(Tx::NONE, path)
    }

    fn now_ms(&mut self) -> u64 {
        time::now_ns() / 1_000_000
    }

    fn log(&mut self, line: &str) {
        println!("ctl: {line}");
    }

    fn sleep_ms(&mut self, ms: u64) {
        let deadline = time::now_ns().saturating_add(ms.saturating_mul(1_000_000));
        // No port is waited for (u32::MAX is none): the timer ends it.
        let _ = Waiter::new().wait_until(u32::MAX, deadline);
    }

    fn console_read(&mut self, domid: DomId, from: u64, max: usize) -> Result<Chunk, XenError> {
        history(domid, from, max)
    }

    fn dmesg(&mut self, from: u64, max: usize) -> Result<Chunk, XenError> {
        history(DOMID_XEN, from, max)
    }

    fn console_write(&mut self, domid: DomId, data: &[u8]) -> Result<usize, XenError> {
        domctl::console_write(domid, data)
    }

    fn domain_stats(&mut self, domid: DomId) -> Result<shared_abi::mgmt::DomainIoStats, XenError> {
        let s = domctl::domain_stats(domid)?;
        Ok(shared_abi::mgmt::DomainIoStats::from_hypervisor(domid, &s))
    }

    fn xs_introduce(&mut self, domid: DomId) -> Result<(), XenError> {
        // The xenstore domain finds it by listing domains on VIRQ_DOM_EXC (CREATE_DOMAIN
        // raised it) and then gives it a home of its own (as for a boot domain). Wait until
        // it has (IS_DOMAIN_INTRODUCED), so that the home written next, with libxl's
        // permissions, is the one that stays: `introduce` done means done, as in Xen.
        let deadline = time::now_ns().saturating_add(INTRODUCE_WAIT_NS);
        let mut us = 0;
        let r = timed(&mut us, || self.wait_introduced(domid, deadline));
        self.create_times.introduce_us += us;
        r
    }

    fn xs_release(&mut self, _domid: DomId) -> Result<(), XenError> {
        // Likewise: the xenstore domain releases a domain it sees gone.
        Ok(())
    }

    fn xs_write(&mut self, path: &str, value: &str) -> Result<(), XenError> {
        self.xs()?.write(Tx::NONE, path, value.as_bytes())
    }

    fn xs_rm(&mut self, path: &str) -> Result<(), XenError> {
        let xb = self.xs()?;
        match xb.rm(Tx::NONE, path) {
            Ok(()) | Err(XenError::ENOENT) => {}
            Err(e) => return Err(e),
        }
        // A domain's home: say so once it is really gone (read back from the store).
        let home = path
            .strip_prefix("/local/domain/")
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|c| c.is_ascii_digit()));
        if home {
            match xb.read(Tx::NONE, path) {
                Err(XenError::ENOENT) => println!("ctl: xenstore {path} removed"),
                r => println!("ctl: xenstore {path} still there after rm ({:?})", r.err()),
            }
        }
        Ok(())
    }
}
