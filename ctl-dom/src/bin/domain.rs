//! `ctl-domain`: the control domain (a Bulkhead PV domain on dom-rt, holding
//! `domain_control` and `domain_death_events`). It applies the boot domains' `on_poweroff` /
//! `on_reboot` / `on_crash` policies ([`ctl_dom::boot_lifecycle`]):
//!
//! 1. bind `VIRQ_DOM_EXC`, then read every manifest entry (`domctl BOOT_DOMAIN_INFO`) and
//!    say what it follows;
//! 2. look at the domain list (a boot domain may have died before the VIRQ was bound), then
//!    on each `VIRQ_DOM_EXC` again: a boot domain that died gets its policy — restart
//!    (`domctl REBUILD_BOOT_DOMAIN`: the hypervisor's builder, new domain id; the xenstore
//!    domain finds the new domain by listing on the same VIRQ, as it finds boot domains),
//!    destroy, or preserve (left shut down, memory kept) — with a restart limit against
//!    crash loops.
//!
//! At boot it also writes the xenstore device entries of the disks its command line declares
//! (`disk=<frontend>:<backend>:<xvd…>:<r|rw>`, boot domain names; [`ctl_dom::boot_devices`]),
//! as a Xen toolstack does before the guests' frontends probe. When a backend (or a guest) of
//! such a disk is restarted as a new domain, it re-points the device: the frontend's
//! `backend`/`backend-id` name the new backend (its `state` back to Initialising), the new
//! backend directory is written from the same declaration and the dead one's removed, so
//! the guest's blkfront reconnects and re-issues what had no answer.
//!
//! Network interfaces the same way: `vif=<frontend>:<backend>:<devid>:<mac>[:<ip>[:<rate>]]`
//! (boot domain names, the MAC as `xx:xx:xx:xx:xx:xx`, the IPv4 address the backend polices,
//! the rate as `<bytes>,<usecs>`) writes the vif's frontend and backend directories at boot,
//! and re-points them when the network backend (or the guest) is restarted.
//!
//! Command line: `max_restarts=N` and `window_ms=M` (the limit: at most N restarts of one
//! domain within M ms; default 3 per 60000), and `exit_when_idle`: once no domain other than
//! this one and the xenstore domain is alive, destroy the preserved ones and power off (test
//! systems that must end).
//!
//! When the machine has the management line (COM2; `domctl MGMT_IO` answers), it also serves
//! `hvctl` there: the toolstack engine over the real platform (`domain/platform.rs`), its
//! byte transport and the policies of the domains it creates (`domain/mgmt.rs`).
//!
//! On the host this binary is a stub.
#![cfg_attr(all(target_arch = "x86_64", target_os = "none"), no_std, no_main)]

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
dom_rt::entry!(domain::main);

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
extern crate alloc;

// The toolstack serving `hvctl` on the management line (`domain/mgmt.rs`) over the real
// platform (`domain/platform.rs`).
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
#[path = "domain/mgmt.rs"]
mod mgmt;
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
#[path = "domain/platform.rs"]
mod platform;

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod domain {
    use alloc::vec::Vec;

    use ctl_dom::boot_devices::{BootDevice, DevicePlan, parse_disks, parse_vifs, restart_plans};
    use ctl_dom::boot_lifecycle::{BootLifecycle, BootPlatform, BootRecord, Outcome, RestartLimit};
    use dom_rt::event::Waiter;
    use dom_rt::{StartInfo, XenError, domctl, evtchn, println};
    use shared_abi::DomId;
    use shared_abi::event_channel::virq;
    use shared_abi::hypercall_args::domctl::DomainInfo;

    /// The hypervisor, through dom-rt's domctl wrappers.
    struct Hv;

    impl BootPlatform for Hv {
        fn list(&mut self) -> Result<Vec<DomainInfo>, XenError> {
            domctl::list_domains()
        }
        fn rebuild(&mut self, index: u32) -> Result<DomId, XenError> {
            domctl::rebuild_boot_domain(index)
        }
        fn destroy(&mut self, domid: DomId) -> Result<(), XenError> {
            domctl::destroy(domid)
        }
        fn now_ns(&mut self) -> u64 {
            dom_rt::time::now_ns()
        }
    }

    fn param(cmdline: &str, key: &str) -> Option<u64> {
        cmdline.split_whitespace().find_map(|w| {
            let (k, v) = w.split_once('=')?;
            (k == key).then(|| v.parse().ok()).flatten()
        })
    }

    /// Every manifest entry, in order (entry 0 says how many there are).
    fn records() -> Result<Vec<BootRecord>, XenError> {
        let first = domctl::boot_domain_info(0)?;
        let mut out = Vec::new();
        for i in 0..first.nr_boot_domains {
            let b = if i == 0 {
                first
            } else {
                domctl::boot_domain_info(i)?
            };
            match BootRecord::from_info(&b) {
                Some(r) => out.push(r),
                None => println!("ctl: boot domain {i}: garbled answer, not followed"),
            }
        }
        Ok(out)
    }

    type Bus = dom_rt::xenbus::DomainBus;

    /// Boot step of a toolstack: write the xenstore device entries of the devices declared
    /// on the command line (`disk=<frontend>:<backend>:<xvd…>:<r|rw>`, `vif=…`, boot domain
    /// names), so the backends and the guests' frontends find them
    /// ([`ctl_dom::boot_devices`]). Needs the xenstore domain to treat this domain as
    /// privileged (its `priv_domid=`).
    fn write_devices<D: BootDevice>(xb: &mut Bus, devices: &[D], recs: &[BootRecord]) {
        let id = |name: &str| {
            recs.iter()
                .find(|r| r.name == name)
                .map(|r| r.domid)
                .filter(|&d| d != shared_abi::hypercall_args::domctl::BOOT_NO_DOMAIN)
        };
        for d in devices {
            let what = d.describe();
            let (Some(fe), Some(be)) = (id(d.frontend()), id(d.backend())) else {
                println!(
                    "ctl: {what} of {}: {} or {} is not a running boot domain",
                    d.frontend(),
                    d.frontend(),
                    d.backend()
                );
                continue;
            };
            let Some(plan) = d.plan(fe, be) else {
                continue;
            };
            match write_plan(xb, &plan) {
                Ok(()) => println!(
                    "ctl: {what} of {} (domain {fe}) served by {} (domain {be}): device {} written",
                    d.frontend(),
                    d.backend(),
                    plan.devid
                ),
                Err(e) => println!("ctl: {what} of {}: xenstore: {e:?}", d.frontend()),
            }
        }
    }

    /// One transaction: a frontend or backend sees the whole device or none of it (the
    /// writer run-time devices use too, [`crate::platform::write_plan`]). Nodes already
    /// there (a re-pointed device's frontend state, ring keys…) get the frontend
    /// directory's permissions, so the new backend may read them.
    fn write_plan(xb: &mut Bus, plan: &DevicePlan) -> Result<(), XenError> {
        crate::platform::write_plan(xb, &plan.xs, true)
    }

    /// Boot domain `name` came back as domain `new` (it was `old`): re-point the devices it
    /// serves or uses ([`ctl_dom::boot_devices::restart_plans`]) — the frontend's
    /// `backend`/`backend-id` name the new backend, the new backend directory is written
    /// from the same declaration, the dead side's backend directory is removed — so the
    /// frontend reconnects and re-issues what was in flight.
    fn repoint_devices<D: BootDevice>(
        xb: &mut Bus,
        devices: &[D],
        ids: &[(alloc::string::String, DomId)],
        name: &str,
        old: DomId,
        new: DomId,
    ) {
        let id_of = |n: &str| ids.iter().find(|(m, _)| m == n).map(|&(_, d)| d);
        repoint(
            xb,
            restart_plans(devices, name, old, new, id_of),
            name,
            old,
            new,
        );
    }

    /// Write each new plan and remove the dead side's backend directory.
    fn repoint(
        xb: &mut Bus,
        plans: Vec<(DevicePlan, alloc::string::String)>,
        name: &str,
        old: DomId,
        new: DomId,
    ) {
        for (plan, stale) in plans {
            match write_plan(xb, &plan) {
                Ok(()) => println!(
                    "ctl: device {} re-pointed: {} (domain {old}) is now domain {new}",
                    plan.devid, name
                ),
                Err(e) => println!("ctl: device {}: xenstore: {e:?}", plan.devid),
            }
            // A dead domain's tree may be gone already.
            match xb.rm(dom_rt::xenbus::Tx::NONE, &stale) {
                Ok(()) | Err(XenError::ENOENT) => {}
                Err(e) => println!("ctl: removing {stale}: {e:?}"),
            }
        }
    }

    /// Apply the policies of every boot domain that died; print what was done; the
    /// restarted ones (name, old domid, new domid).
    fn scan(l: &mut BootLifecycle) -> Vec<(alloc::string::String, DomId, DomId)> {
        let mut restarted = Vec::new();
        match l.scan(&mut Hv) {
            Ok(outcomes) => {
                for o in outcomes {
                    println!("{o}");
                    if let Outcome::Restarted { name, old, new, .. } = o {
                        restarted.push((name, old, new));
                    }
                }
            }
            Err(e) => println!("ctl: cannot list domains: {e:?}"),
        }
        restarted
    }

    pub fn main(si: &'static StartInfo) {
        let cmd = si.cmdline();
        let exit_when_idle = cmd.split_whitespace().any(|w| w == "exit_when_idle");
        let d = RestartLimit::default();
        let limit = RestartLimit {
            max: param(cmd, "max_restarts").map_or(d.max, |v| v.min(u64::from(u32::MAX)) as u32),
            window_ns: param(cmd, "window_ms")
                .map_or(d.window_ns, |ms| ms.saturating_mul(1_000_000)),
        };
        let dom_exc = match evtchn::bind_virq(virq::DOM_EXC, 0) {
            Ok(p) => p,
            Err(e) => {
                println!("ctl: cannot bind VIRQ_DOM_EXC ({e:?}): no policies applied");
                return;
            }
        };
        let recs = match records() {
            Ok(r) => r,
            Err(e) => {
                println!("ctl: cannot read the boot domains ({e:?}): no policies applied");
                return;
            }
        };
        for r in &recs {
            println!(
                "ctl: boot domain {} {} (domain {}): on_poweroff={} on_reboot={} on_crash={}",
                r.index,
                r.name,
                r.domid,
                r.on_poweroff.name(),
                r.on_reboot.name(),
                r.on_crash.name()
            );
        }
        let disks = match parse_disks(cmd) {
            Ok(d) => d,
            Err(e) => {
                println!("ctl: no disks written: {e}");
                Vec::new()
            }
        };
        let vifs = match parse_vifs(cmd) {
            Ok(v) => v,
            Err(e) => {
                println!("ctl: no vifs written: {e}");
                Vec::new()
            }
        };
        let mut serve = crate::mgmt::open(cmd);
        let mut xb = if disks.is_empty() && vifs.is_empty() && serve.is_none() {
            None
        } else {
            let xb = dom_rt::xenbus::connect_own_store(si);
            if xb.is_none() {
                println!("ctl: no xenstore connection: no devices written");
            }
            xb
        };
        if let Some(xb) = xb.as_mut() {
            write_devices(xb, &disks, &recs);
            write_devices(xb, &vifs, &recs);
        }
        let mut ids: Vec<(alloc::string::String, DomId)> =
            recs.iter().map(|r| (r.name.clone(), r.domid)).collect();
        let mut l = BootLifecycle::new(recs, limit, si.domid);
        println!(
            "ctl: ready; restart limit {} per {} ms",
            limit.max,
            limit.window_ns / 1_000_000
        );
        let mut waiter = Waiter::new();
        loop {
            for (name, old, new) in scan(&mut l) {
                for e in ids.iter_mut().filter(|e| e.0 == name) {
                    e.1 = new;
                }
                if let Some(xb) = xb.as_mut() {
                    repoint_devices(xb, &disks, &ids, &name, old, new);
                    repoint_devices(xb, &vifs, &ids, &name, old, new);
                }
            }
            if exit_when_idle {
                match domctl::list_domains() {
                    // A boot domain died since the scan: handle it first.
                    Ok(list) if !l.settled(&list) => continue,
                    Ok(list) if !l.others_alive(&list) => {
                        for id in l.preserved() {
                            let st = list.iter().find(|d| d.domid == id).map(|d| d.state);
                            println!(
                                "ctl: destroying preserved domain {id} (state {st:?}) before powering off"
                            );
                            let _ = domctl::destroy(id);
                        }
                        println!("ctl: no other domain is alive; powering off");
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => println!("ctl: cannot list domains: {e:?}"),
                }
            }
            if let Err(e) = crate::mgmt::wait(&mut serve, &mut waiter, dom_exc, &mut xb) {
                println!("ctl: cannot wait for events ({e:?}); stopping");
                return;
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
fn main() {
    eprintln!("ctl-domain is a Bulkhead domain: build it with --target x86_64-unknown-none");
    std::process::exit(2);
}
