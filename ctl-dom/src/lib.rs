//! ctl-dom: the toolstack engine. It answers management requests ([`Toolstack::handle`]),
//! builds and destroys domains through a [`Platform`] (the hypervisor's domctl and the
//! xenstore client in the domain; an in-memory fake on the host), writes the xenstore
//! entries that connect frontends to backends, and applies the `on_poweroff` / `on_reboot`
//! / `on_crash` policies when a domain dies ([`Toolstack::domain_died`]).
//!
//! Invariants:
//! - Every config is re-validated here ([`DomainConfig::validate`]) and checked against
//!   policy (no run-time grant of [`RUNTIME_FORBIDDEN_CAPS`]) and against the system
//!   (backends exist, name unused) before the builder runs: a refused create builds nothing.
//! - If the builder succeeds but a later step fails, the domain is destroyed again and its
//!   xenstore entries removed: nothing half-built remains.
//! - A domain's record (config, kernel, devices) lives here exactly as long as the domain,
//!   or until a restart replaces it.
//! - Xenstore entries are written as plans ([`xenstore_layout::XsPlan`]: directories with
//!   libxl's permissions, then nodes): the domain's home readable by it with its writable
//!   corners owned by it, each device's frontend directory owned by the guest and readable
//!   by the backend, and the reverse for the backend directory ([`devices`] for hotplug and
//!   the detach handshake).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod boot_devices;
pub mod boot_lifecycle;
pub mod devices;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod server;
pub mod xenstore_layout;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::domain_config::{
    ConfigError, DomainConfig, LifecycleAction, RUNTIME_FORBIDDEN_CAPS,
};
use shared_abi::errno::XenError;
use shared_abi::mgmt::{
    DeviceInfo, DomainDetail, DomainRef, DomainSummary, MAX_CHUNK, MgmtError, Reply, RequestBody,
    RunState, ShutdownPath,
};

pub use server::Server;

/// The backend domain a disk or vif uses when its config names none.
pub const DEFAULT_BLOCK_BACKEND: &str = "blkback";
pub const DEFAULT_NET_BACKEND: &str = "netback";

/// Xen `SHUTDOWN_*` reasons (`sched.h`).
pub mod shutdown {
    pub const POWEROFF: u32 = 0;
    pub const REBOOT: u32 = 1;
    pub const SUSPEND: u32 = 2;
    pub const CRASH: u32 = 3;
}

/// What the hypervisor reports about one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvDomain {
    pub domid: DomId,
    pub name: String,
    pub state: RunState,
    pub memory_kib: u64,
    pub maxmem_kib: u64,
    pub vcpus: u32,
    pub cpu_time_ns: u64,
    pub weight: u32,
    pub cap_percent: u32,
    pub capabilities: Capabilities,
}

/// A chunk of a byte log: `(next offset, bytes lost before from, data)`.
pub type Chunk = (u64, u64, Vec<u8>);

/// What ctl-dom needs from the hypervisor and from xenstore.
pub trait Platform {
    fn list(&mut self) -> Result<Vec<HvDomain>, XenError>;
    /// Build a domain with the one builder core-hv uses for boot domains. It may be left
    /// paused until [`Platform::start`] (the real platform does, as `xl create` does).
    fn create(&mut self, config: &DomainConfig, kernel: &[u8]) -> Result<DomId, XenError>;
    /// Run a domain [`Platform::create`] built, once its xenstore entries are written.
    fn start(&mut self, _domid: DomId) -> Result<(), XenError> {
        Ok(())
    }
    fn destroy(&mut self, domid: DomId) -> Result<(), XenError>;
    fn pause(&mut self, domid: DomId) -> Result<(), XenError>;
    fn unpause(&mut self, domid: DomId) -> Result<(), XenError>;
    /// Ask the domain to shut down with `reason` (`SCHEDOP_remote_shutdown`).
    fn shutdown(&mut self, domid: DomId, reason: u32) -> Result<(), XenError>;
    fn set_sched(&mut self, domid: DomId, weight: u32, cap_percent: u32) -> Result<(), XenError>;
    fn set_memory(&mut self, domid: DomId, kib: u64) -> Result<(), XenError>;
    fn console_read(&mut self, domid: DomId, from: u64, max: usize) -> Result<Chunk, XenError>;
    fn dmesg(&mut self, from: u64, max: usize) -> Result<Chunk, XenError>;
    /// Give `data` to a domain's console input (`domctl CONSOLE_WRITE`): how many bytes
    /// were taken (its input buffer is bounded); `EAGAIN` when it is full.
    fn console_write(&mut self, _domid: DomId, _data: &[u8]) -> Result<usize, XenError> {
        Err(XenError::ENOSYS)
    }
    /// A domain's I/O counters (`domctl DOMAIN_STATS`).
    fn domain_stats(&mut self, _domid: DomId) -> Result<shared_abi::mgmt::DomainIoStats, XenError> {
        Err(XenError::ENOSYS)
    }
    /// Tell xenstore a new domain exists (`XS_INTRODUCE`).
    fn xs_introduce(&mut self, domid: DomId) -> Result<(), XenError>;
    fn xs_release(&mut self, domid: DomId) -> Result<(), XenError>;
    fn xs_write(&mut self, path: &str, value: &str) -> Result<(), XenError>;
    fn xs_rm(&mut self, path: &str) -> Result<(), XenError>;
    /// Write `plan` all or nothing where the platform can (one transaction): each directory
    /// made (missing parents too) and given its permissions, in order, then the nodes.
    fn xs_write_plan(&mut self, plan: &xenstore_layout::XsPlan) -> Result<(), XenError>;
    /// A node's value; `ENOENT` when it does not exist.
    fn xs_read(&mut self, path: &str) -> Result<String, XenError>;
    /// Monotonic time in milliseconds (the detach wait).
    fn now_ms(&mut self) -> u64;
    /// Let `ms` milliseconds pass (between polls of a detach handshake).
    fn sleep_ms(&mut self, ms: u64);
    /// The hypervisor's memory limit of a domain (`XEN_DOMCTL_max_mem`): a domain is built
    /// with `memory`, then limited to `maxmem`.
    fn set_max_memory(&mut self, domid: DomId, kib: u64) -> Result<(), XenError>;
    /// A line for the system's log (what a hotplug did); the real platform prints it.
    fn log(&mut self, _line: &str) {}
}

/// A device the toolstack wired.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Device {
    info: DeviceInfo,
    backend: DomId,
}

/// What ctl-dom keeps about a domain it built.
#[derive(Clone, Debug)]
struct Managed {
    config: DomainConfig,
    kernel: Vec<u8>,
    devices: Vec<Device>,
    restarts: u32,
    preserved: bool,
}

/// What [`Toolstack::domain_died`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeathOutcome {
    Destroyed,
    Restarted {
        new_domid: DomId,
    },
    Preserved,
    /// Not a domain this toolstack built: left to whoever owns it.
    NotManaged,
    /// The action failed; the domain was destroyed so nothing is left half-alive.
    RestartFailed(XenError),
}

/// The toolstack engine.
pub struct Toolstack<P: Platform> {
    pub platform: P,
    managed: BTreeMap<DomId, Managed>,
}

/// The hypervisor's answer as a protocol error; `ENOSYS` (the platform has no such
/// operation) is the protocol's `Unsupported`.
fn hv(operation: &str) -> impl Fn(XenError) -> MgmtError + '_ {
    move |e| match e {
        XenError::ENOSYS => MgmtError::Unsupported(format!(
            "{operation}: the hypervisor offers no such operation yet"
        )),
        e => MgmtError::Hypervisor {
            operation: operation.to_string(),
            errno: e.errno(),
        },
    }
}

impl<P: Platform> Toolstack<P> {
    pub fn new(platform: P) -> Self {
        Toolstack {
            platform,
            managed: BTreeMap::new(),
        }
    }

    /// Domains this toolstack built and still tracks.
    pub fn managed_ids(&self) -> Vec<DomId> {
        self.managed.keys().copied().collect()
    }

    fn domains(&mut self) -> Result<Vec<HvDomain>, MgmtError> {
        self.platform.list().map_err(hv("list"))
    }

    fn find(&mut self, d: &DomainRef) -> Result<HvDomain, MgmtError> {
        self.domains()?
            .into_iter()
            .find(|x| match d {
                DomainRef::Id(id) => x.domid == *id,
                DomainRef::Name(n) => &x.name == n,
            })
            .ok_or_else(|| MgmtError::UnknownDomain(d.clone()))
    }

    fn summary(&self, d: HvDomain) -> DomainSummary {
        let state = match self.managed.get(&d.domid) {
            Some(m) if m.preserved => RunState::Preserved,
            _ => d.state,
        };
        DomainSummary {
            domid: d.domid,
            name: d.name,
            state,
            memory_kib: d.memory_kib,
            maxmem_kib: d.maxmem_kib,
            vcpus: d.vcpus,
            cpu_time_ns: d.cpu_time_ns,
            weight: d.weight,
            cap_percent: d.cap_percent,
            capabilities: d.capabilities,
        }
    }

    /// Answer one request.
    pub fn handle(&mut self, body: RequestBody) -> Result<Reply, MgmtError> {
        match body {
            RequestBody::Hello => Ok(Reply::Hello {
                version: shared_abi::mgmt::VERSION,
                server: "ctl-dom".to_string(),
            }),
            RequestBody::List => {
                let ds = self.domains()?;
                Ok(Reply::Domains(
                    ds.into_iter().map(|d| self.summary(d)).collect(),
                ))
            }
            RequestBody::Info(r) => {
                let d = self.find(&r)?;
                let m = self.managed.get(&d.domid);
                let detail = DomainDetail {
                    on_poweroff: m.map_or(LifecycleAction::Destroy, |m| m.config.on_poweroff),
                    on_reboot: m.map_or(LifecycleAction::Destroy, |m| m.config.on_reboot),
                    on_crash: m.map_or(LifecycleAction::Destroy, |m| m.config.on_crash),
                    restarts: m.map_or(0, |m| m.restarts),
                    boot_domain: m.is_none(),
                    devices: m.map_or(Vec::new(), |m| {
                        m.devices.iter().map(|d| d.info.clone()).collect()
                    }),
                    summary: self.summary(d),
                };
                Ok(Reply::Info(detail))
            }
            RequestBody::Create { config, kernel } => {
                let domid = self.create(config, kernel, 0)?;
                Ok(Reply::Created { domid })
            }
            RequestBody::Destroy(r) => {
                let d = self.find(&r)?;
                self.teardown(d.domid).map_err(hv("destroy"))?;
                Ok(Reply::Done)
            }
            RequestBody::Shutdown { dom, force } => self.shut_down(&dom, shutdown::POWEROFF, force),
            RequestBody::Reboot { dom, force } => self.shut_down(&dom, shutdown::REBOOT, force),
            RequestBody::Pause(r) => {
                let d = self.find(&r)?;
                if d.state == RunState::Paused {
                    return Err(MgmtError::WrongState {
                        dom: r,
                        state: d.state,
                        operation: "pause".to_string(),
                    });
                }
                self.platform.pause(d.domid).map_err(hv("pause"))?;
                Ok(Reply::Done)
            }
            RequestBody::Unpause(r) => {
                let d = self.find(&r)?;
                if d.state != RunState::Paused {
                    return Err(MgmtError::WrongState {
                        dom: r,
                        state: d.state,
                        operation: "unpause".to_string(),
                    });
                }
                self.platform.unpause(d.domid).map_err(hv("unpause"))?;
                Ok(Reply::Done)
            }
            RequestBody::ConsoleRead { dom, from } => {
                let d = self.find(&dom)?;
                let (next, lost, data) = self
                    .platform
                    .console_read(d.domid, from, MAX_CHUNK)
                    .map_err(hv("console"))?;
                Ok(Reply::Chunk { next, lost, data })
            }
            RequestBody::Dmesg { from } => {
                let (next, lost, data) =
                    self.platform.dmesg(from, MAX_CHUNK).map_err(hv("dmesg"))?;
                Ok(Reply::Chunk { next, lost, data })
            }
            RequestBody::MemSet { dom, kib } => {
                let d = self.find(&dom)?;
                // xl's bound is the static maximum: the config's `maxmem` for a domain built
                // here (the hypervisor's limit follows each mem-set, so it may be lower now),
                // the hypervisor's current limit for others.
                let max = self
                    .managed
                    .get(&d.domid)
                    .map_or(d.maxmem_kib, |m| m.config.maxmem_kib.max(d.maxmem_kib));
                if !(shared_abi::manifest::MIN_MEMORY_KIB..=max).contains(&kib) {
                    return Err(ConfigError::new(
                        "memory",
                        format!("{kib} KiB"),
                        format!(
                            "{}..={} KiB (the domain's maxmem)",
                            shared_abi::manifest::MIN_MEMORY_KIB,
                            max
                        ),
                    )
                    .into());
                }
                self.platform
                    .set_memory(d.domid, kib)
                    .map_err(hv("mem-set"))?;
                let path = format!("/local/domain/{}/memory/target", d.domid);
                self.platform
                    .xs_write(&path, &format!("{kib}"))
                    .map_err(hv("mem-set"))?;
                Ok(Reply::Done)
            }
            RequestBody::SchedCredit {
                dom,
                weight,
                cap_percent,
            } => {
                let d = self.find(&dom)?;
                let w = weight.unwrap_or(d.weight);
                let c = cap_percent.unwrap_or(d.cap_percent);
                if !(1..=shared_abi::manifest::MAX_WEIGHT).contains(&w) {
                    return Err(ConfigError::new("weight", w, "1..=65535").into());
                }
                if c > 100 * d.vcpus {
                    return Err(ConfigError::new(
                        "cap",
                        c,
                        format!("0..={} (100 per vcpu, 0 = uncapped)", 100 * d.vcpus),
                    )
                    .into());
                }
                if weight.is_some() || cap_percent.is_some() {
                    self.platform
                        .set_sched(d.domid, w, c)
                        .map_err(hv("sched-credit"))?;
                }
                Ok(Reply::Sched {
                    weight: w,
                    cap_percent: c,
                })
            }
            RequestBody::BlockAttach { dom, disk } => self.attach_disk(&dom, disk),
            RequestBody::BlockDetach {
                dom,
                vdev,
                timeout_ms,
                force,
            } => self.detach(&dom, devices::Which::Disk(vdev), timeout_ms, force),
            RequestBody::ConsoleWrite { dom, data } => self.console_write(&dom, &data),
            RequestBody::DomainStats => self.domain_stats(),
            RequestBody::CreateDeflated {
                config,
                kernel_deflated,
                kernel_len,
            } => {
                let kernel = inflate_kernel(&kernel_deflated, kernel_len)?;
                let domid = self.create(config, kernel, 0)?;
                Ok(Reply::Created { domid })
            }
            RequestBody::NetworkAttach { dom, vif } => self.attach_vif(&dom, vif),
            RequestBody::NetworkDetach {
                dom,
                devid,
                timeout_ms,
                force,
            } => self.detach(&dom, devices::Which::Vif(devid), timeout_ms, force),
        }
    }

    /// `ConsoleWrite`: as much of `data` as the domain's input buffer takes now (the client
    /// resends the rest); an error only when nothing was taken for a reason other than a
    /// full buffer.
    fn console_write(&mut self, dom: &DomainRef, data: &[u8]) -> Result<Reply, MgmtError> {
        if data.len() > MAX_CHUNK {
            return Err(MgmtError::BadRequest(format!(
                "console input of {} bytes exceeds the maximum {MAX_CHUNK}",
                data.len()
            )));
        }
        let d = self.find(dom)?;
        let mut done = 0usize;
        while done < data.len() {
            match self.platform.console_write(d.domid, &data[done..]) {
                Ok(0) | Err(XenError::EAGAIN) => break,
                // Never trust a count beyond what was offered.
                Ok(n) => done += n.min(data.len() - done),
                Err(e) if done == 0 => return Err(hv("console input")(e)),
                Err(_) => break,
            }
        }
        Ok(Reply::Written {
            accepted: done as u32,
        })
    }

    /// `DomainStats`: every listed domain's counters (a domain that went away in between is
    /// left out).
    fn domain_stats(&mut self) -> Result<Reply, MgmtError> {
        let mut out = Vec::new();
        for d in self.domains()? {
            match self.platform.domain_stats(d.domid) {
                Ok(mut s) => {
                    s.domid = d.domid;
                    out.push(s);
                }
                Err(XenError::ESRCH) => {}
                Err(e) => return Err(hv("domain stats")(e)),
            }
        }
        Ok(Reply::Stats(out))
    }

    fn backend_id(
        &self,
        all: &[HvDomain],
        name: Option<&String>,
        default: &str,
        field: String,
    ) -> Result<DomId, MgmtError> {
        let want = name.map_or(default, |s| s.as_str());
        all.iter()
            .find(|d| d.name == want && d.state != RunState::Dying)
            .map(|d| d.domid)
            .ok_or_else(|| {
                ConfigError::new(
                    field,
                    format!("{want:?}"),
                    "the name of a running backend domain",
                )
                .into()
            })
    }

    /// Check, build, introduce, wire. `restarts` carries over on a restart.
    fn create(
        &mut self,
        config: DomainConfig,
        kernel: Vec<u8>,
        restarts: u32,
    ) -> Result<DomId, MgmtError> {
        config.validate()?;
        let forbidden = config.capabilities & RUNTIME_FORBIDDEN_CAPS;
        if !forbidden.is_empty() {
            let names: Vec<&str> = Capabilities::NAMES
                .iter()
                .filter(|(_, c)| forbidden.contains(*c))
                .map(|(n, _)| *n)
                .collect();
            return Err(MgmtError::RefusedByPolicy {
                operation: "create".to_string(),
                reason: format!(
                    "capabilities {} cannot be granted to a domain built at run time",
                    names.join(", ")
                ),
            });
        }
        let all = self.domains()?;
        if all.iter().any(|d| d.name == config.name) {
            return Err(MgmtError::NameInUse(config.name));
        }
        // Resolve every backend before building, so a bad one builds nothing.
        let mut disk_backends = Vec::new();
        for (i, d) in config.disks.iter().enumerate() {
            disk_backends.push(self.backend_id(
                &all,
                d.backend.as_ref(),
                DEFAULT_BLOCK_BACKEND,
                format!("disk[{i}].backend"),
            )?);
        }
        let mut vif_backends = Vec::new();
        for (i, v) in config.vifs.iter().enumerate() {
            vif_backends.push(self.backend_id(
                &all,
                v.backend.as_ref(),
                DEFAULT_NET_BACKEND,
                format!("vif[{i}].backend"),
            )?);
        }
        let domid = self
            .platform
            .create(&config, &kernel)
            .map_err(hv("create"))?;
        // Built with `memory`; the limit it may balloon up to is `maxmem` (as libxl's
        // `xc_domain_setmaxmem` after the build).
        if config.maxmem_kib != config.memory_kib
            && let Err(e) = self.platform.set_max_memory(domid, config.maxmem_kib)
        {
            let _ = self.platform.destroy(domid);
            return Err(hv("create: maxmem")(e));
        }
        let mut m = Managed {
            config: config.clone(),
            kernel,
            devices: Vec::new(),
            restarts,
            preserved: false,
        };
        let wired = (|| -> Result<(), XenError> {
            self.platform.xs_introduce(domid)?;
            self.platform
                .xs_write_plan(&xenstore_layout::home_plan(domid, &config))?;
            for (d, b) in config.disks.iter().zip(&disk_backends) {
                let devid = xenstore_layout::vbd_devid(&d.vdev).ok_or(XenError::EINVAL)?;
                let info = DeviceInfo::Disk {
                    devid,
                    spec: d.clone(),
                };
                // Recorded first: a failure below removes whatever was written of it.
                m.devices.push(Device { info, backend: *b });
                if let Some(dev) = m.devices.last() {
                    wire(&mut self.platform, domid, dev)?;
                }
            }
            for (i, (v, b)) in config.vifs.iter().zip(&vif_backends).enumerate() {
                let mut spec = v.clone();
                spec.mac
                    .get_or_insert(xenstore_layout::default_mac(domid, i as u32));
                // The record keeps the MAC it got (as xl's stored config): a restart keeps
                // it, and a detach finds the vif's entry by it.
                if let Some(c) = m.config.vifs.get_mut(i) {
                    c.mac = spec.mac;
                }
                let info = DeviceInfo::Vif {
                    devid: i as u32,
                    spec,
                };
                m.devices.push(Device { info, backend: *b });
                if let Some(dev) = m.devices.last() {
                    wire(&mut self.platform, domid, dev)?;
                }
            }
            self.platform.start(domid)
        })();
        if let Err(e) = wired {
            self.managed.insert(domid, m);
            let _ = self.teardown(domid);
            return Err(hv("create: xenstore wiring")(e));
        }
        self.managed.insert(domid, m);
        Ok(domid)
    }

    /// Shut `dom` down or reboot it (`reason`): through its `control/shutdown` when it
    /// advertises `control/feature-<request>` = 1 (the PV protocol; it stops itself and its
    /// policy follows from the "domain died" event), else, or with `force`, by the
    /// hypervisor. A domain already stopped (shut down, preserved, dying) is refused.
    fn shut_down(&mut self, dom: &DomainRef, reason: u32, force: bool) -> Result<Reply, MgmtError> {
        let (request, operation) = if reason == shutdown::REBOOT {
            ("reboot", "reboot")
        } else {
            ("poweroff", "shutdown")
        };
        let d = self.find(dom)?;
        let state = self.summary(d.clone()).state;
        if matches!(
            state,
            RunState::Preserved | RunState::Dying | RunState::Shutdown(_)
        ) {
            return Err(MgmtError::WrongState {
                dom: dom.clone(),
                state,
                operation: "shut down".to_string(),
            });
        }
        let control = format!("/local/domain/{}/control", d.domid);
        // The guest owns its feature nodes: anything but exactly "1" means no support.
        let advertised = !force
            && self
                .platform
                .xs_read(&format!("{control}/feature-{request}"))
                .is_ok_and(|v| v == "1");
        if advertised {
            self.platform
                .xs_write(&format!("{control}/shutdown"), request)
                .map_err(hv("write control/shutdown"))?;
            self.platform.log(&format!(
                "domain {}: asked to {request} through control/shutdown",
                d.domid
            ));
            return Ok(Reply::ShutdownSent(ShutdownPath::Xenstore));
        }
        self.platform
            .shutdown(d.domid, reason)
            .map_err(hv(operation))?;
        Ok(Reply::ShutdownSent(ShutdownPath::Hypervisor))
    }

    /// Destroy the domain and remove everything the toolstack wrote for it. Best effort on
    /// xenstore (a missing node is not an error); the hypervisor's answer is returned.
    fn teardown(&mut self, domid: DomId) -> Result<(), XenError> {
        if let Some(m) = self.managed.remove(&domid) {
            for d in &m.devices {
                for p in xenstore_layout::device_paths(domid, d.backend, &d.info) {
                    let _ = self.platform.xs_rm(&p);
                }
                // The backend's directory of this frontend (`backend/<type>/<fe>`).
                let _ = self
                    .platform
                    .xs_rm(&devices::backend_frontend_dir(domid, d.backend, &d.info));
            }
        }
        let r = self.platform.destroy(domid);
        let _ = self.platform.xs_rm(&format!("/local/domain/{domid}"));
        let _ = self.platform.xs_release(domid);
        r
    }

    /// Tear down a domain this toolstack built whatever its policy says (a restart limit was
    /// reached): destroyed if still there, its xenstore nodes removed, its record dropped.
    pub fn give_up(&mut self, domid: DomId) -> Result<(), XenError> {
        match self.teardown(domid) {
            Err(XenError::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// The "domain died" event for `domid` with its `SHUTDOWN_*` reason: apply the policy.
    pub fn domain_died(&mut self, domid: DomId, reason: u32) -> DeathOutcome {
        let Some(m) = self.managed.get(&domid) else {
            return DeathOutcome::NotManaged;
        };
        let action = match reason {
            shutdown::POWEROFF => m.config.on_poweroff,
            shutdown::REBOOT => m.config.on_reboot,
            // Suspend has no resume path here; anything unknown counts as a crash.
            _ => m.config.on_crash,
        };
        match action {
            LifecycleAction::Destroy => {
                let _ = self.teardown(domid);
                DeathOutcome::Destroyed
            }
            LifecycleAction::Preserve => {
                if let Some(m) = self.managed.get_mut(&domid) {
                    m.preserved = true;
                }
                DeathOutcome::Preserved
            }
            LifecycleAction::Restart => {
                let (config, kernel, restarts) = (m.config.clone(), m.kernel.clone(), m.restarts);
                let _ = self.teardown(domid);
                match self.create(config, kernel, restarts.saturating_add(1)) {
                    Ok(new_domid) => DeathOutcome::Restarted { new_domid },
                    Err(MgmtError::Hypervisor { errno, .. }) => DeathOutcome::RestartFailed(
                        XenError::from_errno(errno).unwrap_or(XenError::EINVAL),
                    ),
                    Err(_) => DeathOutcome::RestartFailed(XenError::EINVAL),
                }
            }
        }
    }
}

/// The kernel of a [`RequestBody::CreateDeflated`]: inflated with a limit of the declared
/// length (never more than a frame could carry), which it must match exactly.
fn inflate_kernel(deflated: &[u8], declared: u32) -> Result<Vec<u8>, MgmtError> {
    let declared = declared as usize;
    if declared == 0 || declared > shared_abi::mgmt::MAX_PAYLOAD {
        return Err(MgmtError::BadRequest(format!(
            "kernel_len {declared}: allowed 1..={}",
            shared_abi::mgmt::MAX_PAYLOAD
        )));
    }
    let kernel =
        miniz_oxide::inflate::decompress_to_vec_with_limit(deflated, declared).map_err(|e| {
            MgmtError::BadRequest(format!(
                "kernel: not raw DEFLATE data inflating to at most {declared} bytes ({:?})",
                e.status
            ))
        })?;
    if kernel.len() != declared {
        return Err(MgmtError::BadRequest(format!(
            "kernel: inflated to {} bytes, kernel_len says {declared}",
            kernel.len()
        )));
    }
    Ok(kernel)
}

/// Write one device's plan (its directories with their permissions, its nodes in state
/// Initialising).
fn wire<P: Platform>(p: &mut P, domid: DomId, dev: &Device) -> Result<(), XenError> {
    p.xs_write_plan(&xenstore_layout::device_plan(domid, dev.backend, &dev.info).xs)
}

#[cfg(test)]
mod console_stats_tests;
#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod tests;

/// The platform hooks the real control domain relies on: `start` after wiring, `ENOSYS` as
/// `Unsupported`.
#[cfg(test)]
mod hook_tests {
    use super::*;
    use crate::fake::FakePlatform;

    /// The fake, building paused like the real platform; `start` records the entries it
    /// saw and may fail; console reads and dmesg are not offered.
    struct Paused {
        inner: FakePlatform,
        /// (domid, whether its xenstore name was written before start).
        started: Vec<(DomId, bool)>,
        fail_start: Option<XenError>,
    }

    impl Platform for Paused {
        fn list(&mut self) -> Result<Vec<HvDomain>, XenError> {
            self.inner.list()
        }
        fn create(&mut self, c: &DomainConfig, k: &[u8]) -> Result<DomId, XenError> {
            let id = self.inner.create(c, k)?;
            self.inner.pause(id)?;
            Ok(id)
        }
        fn start(&mut self, id: DomId) -> Result<(), XenError> {
            let named = self
                .inner
                .store
                .contains_key(&format!("/local/domain/{id}/name"));
            self.started.push((id, named));
            match self.fail_start {
                Some(e) => Err(e),
                None => self.inner.unpause(id),
            }
        }
        fn destroy(&mut self, id: DomId) -> Result<(), XenError> {
            self.inner.destroy(id)
        }
        fn pause(&mut self, id: DomId) -> Result<(), XenError> {
            self.inner.pause(id)
        }
        fn unpause(&mut self, id: DomId) -> Result<(), XenError> {
            self.inner.unpause(id)
        }
        fn shutdown(&mut self, id: DomId, r: u32) -> Result<(), XenError> {
            self.inner.shutdown(id, r)
        }
        fn set_sched(&mut self, id: DomId, w: u32, c: u32) -> Result<(), XenError> {
            self.inner.set_sched(id, w, c)
        }
        fn set_memory(&mut self, _: DomId, _: u64) -> Result<(), XenError> {
            Err(XenError::ENOSYS)
        }
        fn console_read(&mut self, _: DomId, _: u64, _: usize) -> Result<Chunk, XenError> {
            Err(XenError::ENOSYS)
        }
        fn dmesg(&mut self, _: u64, _: usize) -> Result<Chunk, XenError> {
            Err(XenError::ENOSYS)
        }
        fn xs_introduce(&mut self, id: DomId) -> Result<(), XenError> {
            self.inner.xs_introduce(id)
        }
        fn xs_release(&mut self, id: DomId) -> Result<(), XenError> {
            self.inner.xs_release(id)
        }
        fn xs_write(&mut self, p: &str, v: &str) -> Result<(), XenError> {
            self.inner.xs_write(p, v)
        }
        fn xs_rm(&mut self, p: &str) -> Result<(), XenError> {
            self.inner.xs_rm(p)
        }
        fn xs_write_plan(&mut self, p: &xenstore_layout::XsPlan) -> Result<(), XenError> {
            self.inner.xs_write_plan(p)
        }
        fn xs_read(&mut self, p: &str) -> Result<String, XenError> {
            self.inner.xs_read(p)
        }
        fn now_ms(&mut self) -> u64 {
            self.inner.now_ms()
        }
        fn sleep_ms(&mut self, ms: u64) {
            self.inner.sleep_ms(ms)
        }
        fn set_max_memory(&mut self, id: DomId, kib: u64) -> Result<(), XenError> {
            self.inner.set_max_memory(id, kib)
        }
    }

    fn ts(fail_start: Option<XenError>) -> Toolstack<Paused> {
        Toolstack::new(Paused {
            inner: FakePlatform::with_boot_domains(),
            started: Vec::new(),
            fail_start,
        })
    }

    fn create(t: &mut Toolstack<Paused>) -> Result<Reply, MgmtError> {
        t.handle(RequestBody::Create {
            config: DomainConfig::new("guest", 16384),
            kernel: b"\x7fELF-kernel".to_vec(),
        })
    }

    #[test]
    fn a_domain_is_started_only_once_its_entries_are_written() {
        let mut t = ts(None);
        let Ok(Reply::Created { domid }) = create(&mut t) else {
            panic!("create failed")
        };
        assert_eq!(t.platform.started, [(domid, true)]);
        let d = t.platform.inner.domains.get(&domid).cloned();
        assert_eq!(d.map(|d| d.state), Some(RunState::Running));
    }

    #[test]
    fn a_failed_start_leaves_nothing_behind() {
        let mut t = ts(Some(XenError::EINVAL));
        let r = create(&mut t);
        assert!(
            matches!(&r, Err(MgmtError::Hypervisor { errno, .. }) if *errno == XenError::EINVAL.errno()),
            "{r:?}"
        );
        assert!(t.platform.inner.domains.values().all(|d| d.name != "guest"));
        assert!(
            t.platform
                .inner
                .store
                .keys()
                .all(|k| !k.starts_with("/local/domain/4"))
        );
        assert!(t.managed_ids().is_empty());
    }

    #[test]
    fn give_up_forgets_a_domain_already_gone() {
        let mut t = ts(None);
        let Ok(Reply::Created { domid }) = create(&mut t) else {
            panic!("create failed")
        };
        t.platform.inner.domains.remove(&domid);
        assert_eq!(t.give_up(domid), Ok(()));
        assert!(t.managed_ids().is_empty());
        assert!(
            t.platform
                .inner
                .store
                .keys()
                .all(|k| !k.starts_with(&format!("/local/domain/{domid}/")))
        );
        assert_eq!(
            t.domain_died(domid, shutdown::CRASH),
            DeathOutcome::NotManaged
        );
    }

    #[test]
    fn operations_the_platform_lacks_are_unsupported_not_errno() {
        let mut t = ts(None);
        for body in [
            RequestBody::Dmesg { from: 0 },
            RequestBody::ConsoleRead {
                dom: DomainRef::Id(1),
                from: 0,
            },
            RequestBody::MemSet {
                dom: DomainRef::Id(1),
                kib: 8192,
            },
        ] {
            let r = t.handle(body.clone());
            assert!(
                matches!(r, Err(MgmtError::Unsupported(_))),
                "{body:?}: {r:?}"
            );
        }
        assert!(matches!(
            hv("pause")(XenError::EPERM),
            MgmtError::Hypervisor { .. }
        ));
    }
}
