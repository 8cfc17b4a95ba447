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

use alloc::string::String;
use alloc::vec::Vec;

use ctl_dom::{Chunk, HvDomain, Platform};
use dom_rt::domctl::{self, NewDomain};
use dom_rt::xenbus::{DomainBus, Tx};
use dom_rt::{XenError, hypercall, println};
use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::domain_config::{DomainConfig, LifecycleAction};
use shared_abi::domid::DOMID_XEN;
use shared_abi::hypercall_args::domctl::{
    self as dc, DOMINF_BLOCKED, DOMINF_PAUSED, DomainInfo, state as st,
};
use shared_abi::mgmt::RunState;

/// KiB per page.
const PAGE_KIB: u64 = 4;

/// The hypervisor and xenstore as the toolstack sees them.
pub struct Hv {
    /// This domain's xenstore connection, lent by the main loop while requests are served
    /// (the one ring is shared with the boot device code).
    pub xb: Option<DomainBus>,
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

impl Hv {
    fn xs(&mut self) -> Result<&mut DomainBus, XenError> {
        // No connection: the store cannot be reached (the caller reports it).
        self.xb.as_mut().ok_or(XenError::EIO)
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
        domctl::create_domain(&NewDomain {
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
        })
    }

    fn start(&mut self, domid: DomId) -> Result<(), XenError> {
        domctl::unpause(domid)
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

    fn console_read(&mut self, domid: DomId, from: u64, max: usize) -> Result<Chunk, XenError> {
        history(domid, from, max)
    }

    fn dmesg(&mut self, from: u64, max: usize) -> Result<Chunk, XenError> {
        history(DOMID_XEN, from, max)
    }

    fn xs_introduce(&mut self, _domid: DomId) -> Result<(), XenError> {
        // The xenstore domain finds it by listing domains on VIRQ_DOM_EXC (CREATE_DOMAIN
        // raised it); it must only be reachable.
        self.xs().map(|_| ())
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
