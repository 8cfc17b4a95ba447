//! An in-memory [`Platform`]: a domain table, a key/value xenstore and console logs, with
//! switches to make operations fail. Host tests here and hvctl's tests (as a fake server)
//! use it; it enforces what the real hypervisor would (unique ids, ESRCH for unknown ids,
//! an ELF magic check standing in for the builder's validation).
//!
//! The store keeps Xen's permissions: every node (`store` holds values, `perms` the list in
//! Xen's string form, owner first) is created with its parent's list when the toolstack (a
//! privileged writer) creates it, `/` being `[n0]`. [`FakePlatform::guest_write`] and
//! [`FakePlatform::guest_read`] apply xenstore's access rule for an unprivileged domain, so a
//! test sees what a guest may do. [`Release`] says how the devices' other ends answer a
//! detach (the backend told to close, polled while [`Platform::sleep_ms`] passes fake time).

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::domain_config::{DiskAccess, DiskSpec, DomainConfig, VifSpec};
use shared_abi::errno::XenError;
use shared_abi::mgmt::{DeviceInfo, DomainRef, MgmtError, Reply, RequestBody, RunState};

use crate::xenstore_layout::XsPlan;
use crate::{Chunk, HvDomain, Platform, Toolstack};

/// How a device's frontend and backend answer the toolstack's close request (a backend
/// directory with `online` = 0 and `state` = 5), each time fake time passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Release {
    /// The frontend closes (state 6), then the backend goes Closed (6).
    #[default]
    Cooperate,
    /// The backend tears the device down and removes its directory.
    BackendRemoves,
    /// The frontend ignores it (a guest without hotplug support, or a hung one).
    Refuse,
}

#[derive(Debug, Default)]
pub struct FakePlatform {
    pub domains: BTreeMap<DomId, HvDomain>,
    pub store: BTreeMap<String, String>,
    pub consoles: BTreeMap<DomId, Vec<u8>>,
    pub log: Vec<u8>,
    pub introduced: Vec<DomId>,
    pub next_id: DomId,
    /// Make `create` fail with this error.
    pub fail_create: Option<XenError>,
    /// Make every `xs_write` fail with this error (after the domain is built).
    pub fail_xs_write: Option<XenError>,
    /// Let this many more nodes be written (plans count each dir and entry), then fail
    /// with `EIO`: a store failing halfway through.
    pub fail_xs_write_after: Option<usize>,
    /// Every node's permissions (Xen's string form), for every key of `store`.
    pub perms: BTreeMap<String, Vec<String>>,
    /// How devices answer a detach.
    pub release: Release,
    /// Fake time, advanced by `sleep_ms`.
    pub clock_ms: u64,
    /// Make `set_max_memory` fail with this error.
    pub fail_max_memory: Option<XenError>,
    /// The lines the engine logged.
    pub logged: Vec<String>,
    /// Shutdown requests seen: (domid, reason).
    pub shutdowns: Vec<(DomId, u32)>,
    /// Console input given to each domain and not yet "read" (at most
    /// [`FAKE_CONSOLE_INPUT_BYTES`] each, as the hypervisor bounds it).
    pub console_input: BTreeMap<DomId, Vec<u8>>,
    /// I/O counters `domain_stats` reports (zero for domains not in here).
    pub io: BTreeMap<DomId, shared_abi::mgmt::DomainIoStats>,
}

impl FakePlatform {
    /// A system with boot domains xenstore (0), ctl-dom (1), blkback (2) and netback (3),
    /// each with its home `/local/domain/<id>` owned by it (xenstore-dom makes the homes of
    /// the domains it serves).
    pub fn with_boot_domains() -> Self {
        let mut p = FakePlatform {
            next_id: 4,
            log: b"(XEN) Bulkhead core-hv booted\n".to_vec(),
            ..Default::default()
        };
        for (id, name, caps) in [
            (0, "xenstore", Capabilities::XENSTORE_SERVICE),
            (1, "ctl-dom", Capabilities::DOMAIN_CONTROL),
            (2, "blkback", Capabilities::GRANT_MAP),
            (3, "netback", Capabilities::GRANT_MAP),
        ] {
            p.domains.insert(id, dom(id, name, 16384, caps));
            let home = format!("/local/domain/{id}");
            p.create_missing(&home, None);
            p.perms.insert(home, vec![format!("n{id}")]);
        }
        p
    }

    fn get(&mut self, id: DomId) -> Result<&mut HvDomain, XenError> {
        self.domains.get_mut(&id).ok_or(XenError::ESRCH)
    }
}

/// A kernel the fake builds (it checks only the ELF magic).
pub const FAKE_KERNEL: &[u8] = b"\x7fELF-kernel";

/// The run-time guest tests create: 16 MiB, disk xvda (target `vol0`, read-write) and vif 0
/// (default MAC), both on the default backends.
pub fn guest_config(name: &str) -> DomainConfig {
    let mut c = DomainConfig::new(name, 16384);
    c.disks.push(DiskSpec {
        target: "vol0".into(),
        vdev: "xvda".into(),
        access: DiskAccess::ReadWrite,
        backend: None,
    });
    c.vifs.push(VifSpec {
        mac: None,
        ip: None,
        rate_bytes_per_sec: None,
        backend: None,
    });
    c
}

/// Test helpers: the engine over the fake, and the requests tests make most.
impl Toolstack<FakePlatform> {
    /// The engine over [`FakePlatform::with_boot_domains`].
    pub fn fake() -> Self {
        Toolstack::new(FakePlatform::with_boot_domains())
    }

    /// `create` with [`FAKE_KERNEL`]: the new domain's id, or the engine's refusal.
    pub fn create_fake(&mut self, config: DomainConfig) -> Result<DomId, MgmtError> {
        match self.handle(RequestBody::Create {
            config,
            kernel: FAKE_KERNEL.to_vec(),
        })? {
            Reply::Created { domid } => Ok(domid),
            r => panic!("create answered {r:?}"),
        }
    }

    /// The devices `info` lists for domain `id` (which must exist).
    pub fn devices_of(&mut self, id: DomId) -> Vec<DeviceInfo> {
        match self.handle(RequestBody::Info(DomainRef::Id(id))) {
            Ok(Reply::Info(d)) => d.devices,
            r => panic!("info {id}: {r:?}"),
        }
    }
}

/// The fake's per-domain console input bound (the hypervisor's `CONSOLE_INPUT_BYTES`).
pub const FAKE_CONSOLE_INPUT_BYTES: usize = shared_abi::hypercall_args::domctl::CONSOLE_INPUT_BYTES;

fn dom(domid: DomId, name: &str, kib: u64, caps: Capabilities) -> HvDomain {
    HvDomain {
        domid,
        name: name.to_string(),
        state: RunState::Blocked,
        memory_kib: kib,
        maxmem_kib: kib,
        vcpus: 1,
        cpu_time_ns: 1_000_000 * u64::from(domid + 1),
        weight: 256,
        cap_percent: 0,
        capabilities: caps,
    }
}

fn chunk(buf: &[u8], from: u64, max: usize) -> Chunk {
    let start = (from as usize).min(buf.len());
    let end = (start + max).min(buf.len());
    (end as u64, 0, buf[start..end].to_vec())
}

impl Platform for FakePlatform {
    fn list(&mut self) -> Result<Vec<HvDomain>, XenError> {
        Ok(self.domains.values().cloned().collect())
    }
    fn create(&mut self, c: &DomainConfig, kernel: &[u8]) -> Result<DomId, XenError> {
        if let Some(e) = self.fail_create {
            return Err(e);
        }
        if !kernel.starts_with(b"\x7fELF") {
            return Err(XenError::ENOEXEC);
        }
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).ok_or(XenError::ENOSPC)?;
        // The builder's limit is what it gave; `maxmem` is the toolstack's next step.
        let mut d = dom(id, &c.name, c.memory_kib, c.capabilities);
        d.vcpus = c.vcpus;
        d.weight = c.weight;
        d.cap_percent = c.cap_percent;
        self.domains.insert(id, d);
        self.consoles
            .insert(id, alloc::format!("hello from {}\n", c.name).into_bytes());
        Ok(id)
    }
    fn destroy(&mut self, id: DomId) -> Result<(), XenError> {
        self.domains.remove(&id).map(|_| ()).ok_or(XenError::ESRCH)
    }
    fn pause(&mut self, id: DomId) -> Result<(), XenError> {
        self.get(id)?.state = RunState::Paused;
        Ok(())
    }
    fn unpause(&mut self, id: DomId) -> Result<(), XenError> {
        self.get(id)?.state = RunState::Running;
        Ok(())
    }
    fn shutdown(&mut self, id: DomId, reason: u32) -> Result<(), XenError> {
        self.get(id)?.state = RunState::Shutdown(reason);
        self.shutdowns.push((id, reason));
        Ok(())
    }
    fn set_sched(&mut self, id: DomId, w: u32, c: u32) -> Result<(), XenError> {
        let d = self.get(id)?;
        d.weight = w;
        d.cap_percent = c;
        Ok(())
    }
    fn set_memory(&mut self, id: DomId, kib: u64) -> Result<(), XenError> {
        self.get(id)?.memory_kib = kib;
        Ok(())
    }
    fn console_read(&mut self, id: DomId, from: u64, max: usize) -> Result<Chunk, XenError> {
        self.get(id)?;
        Ok(chunk(
            self.consoles.get(&id).map_or(&[][..], |v| v),
            from,
            max,
        ))
    }
    fn dmesg(&mut self, from: u64, max: usize) -> Result<Chunk, XenError> {
        Ok(chunk(&self.log, from, max))
    }
    fn console_write(&mut self, id: DomId, data: &[u8]) -> Result<usize, XenError> {
        self.get(id)?;
        let buf = self.console_input.entry(id).or_default();
        let n = data
            .len()
            .min(FAKE_CONSOLE_INPUT_BYTES.saturating_sub(buf.len()));
        if n == 0 && !data.is_empty() {
            return Err(XenError::EAGAIN);
        }
        buf.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn domain_stats(&mut self, id: DomId) -> Result<shared_abi::mgmt::DomainIoStats, XenError> {
        self.get(id)?;
        Ok(self.io.get(&id).cloned().unwrap_or_default())
    }
    fn xs_introduce(&mut self, id: DomId) -> Result<(), XenError> {
        self.introduced.push(id);
        Ok(())
    }
    fn xs_release(&mut self, id: DomId) -> Result<(), XenError> {
        self.introduced.retain(|&x| x != id);
        Ok(())
    }
    fn xs_write(&mut self, path: &str, value: &str) -> Result<(), XenError> {
        if let Some(e) = self.fail_xs_write {
            return Err(e);
        }
        self.node(path, Some(value))
    }
    fn xs_rm(&mut self, path: &str) -> Result<(), XenError> {
        let prefix = alloc::format!("{path}/");
        self.store
            .retain(|k, _| k != path && !k.starts_with(&prefix));
        self.perms
            .retain(|k, _| k != path && !k.starts_with(&prefix));
        Ok(())
    }
    /// Not a transaction: a failure halfway leaves what was written (the engine cleans up).
    fn xs_write_plan(&mut self, plan: &XsPlan) -> Result<(), XenError> {
        if let Some(e) = self.fail_xs_write {
            return Err(e);
        }
        for (dir, perms) in &plan.dirs {
            self.node(dir, None)?;
            self.perms.insert(dir.clone(), perms.clone());
        }
        for (k, v) in &plan.entries {
            self.node(k, Some(v))?;
        }
        Ok(())
    }
    fn xs_read(&mut self, path: &str) -> Result<String, XenError> {
        self.store.get(path).cloned().ok_or(XenError::ENOENT)
    }
    fn now_ms(&mut self) -> u64 {
        self.clock_ms
    }
    fn sleep_ms(&mut self, ms: u64) {
        self.clock_ms += ms;
        self.answer_close_requests();
    }
    fn log(&mut self, line: &str) {
        self.logged.push(line.to_string());
    }
    fn set_max_memory(&mut self, id: DomId, kib: u64) -> Result<(), XenError> {
        if let Some(e) = self.fail_max_memory {
            return Err(e);
        }
        self.get(id)?.maxmem_kib = kib;
        Ok(())
    }
}

/// `perm_for_conn` for an unprivileged domain: (read, write).
fn access(who: DomId, perms: &[String]) -> (bool, bool) {
    let parse = |p: &String| -> Option<(char, DomId)> {
        let mut c = p.chars();
        let l = c.next()?;
        Some((l, c.as_str().parse().ok()?))
    };
    let list: Vec<(char, DomId)> = perms.iter().filter_map(parse).collect();
    let Some(&(first, owner)) = list.first() else {
        return (false, false);
    };
    if owner == who {
        return (true, true);
    }
    let l = list[1..]
        .iter()
        .find(|(_, id)| *id == who)
        .map_or(first, |&(l, _)| l);
    (matches!(l, 'r' | 'b'), matches!(l, 'w' | 'b'))
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

impl FakePlatform {
    /// A node's permissions (`[n0]` for `/`).
    pub fn perms_of(&self, path: &str) -> Option<Vec<String>> {
        if path == "/" {
            return Some(vec!["n0".to_string()]);
        }
        self.perms.get(path).cloned()
    }

    /// Create `path` (and missing parents) as a privileged writer does: each new node gets
    /// its parent's permissions. `value` = `None`: leave an existing node's value.
    fn node(&mut self, path: &str, value: Option<&str>) -> Result<(), XenError> {
        if let Some(n) = self.fail_xs_write_after {
            if n == 0 {
                return Err(XenError::EIO);
            }
            self.fail_xs_write_after = Some(n - 1);
        }
        self.create_missing(path, None);
        if let Some(v) = value {
            self.store.insert(path.to_string(), v.to_string());
        }
        Ok(())
    }

    /// Create `path` and missing ancestors; `owner` (an unprivileged creator) owns what it
    /// creates, as xenstore-dom does.
    fn create_missing(&mut self, path: &str, owner: Option<DomId>) {
        if path == "/" || self.store.contains_key(path) {
            return;
        }
        let up = parent(path).to_string();
        self.create_missing(&up, owner);
        let mut perms = self.perms_of(&up).unwrap_or_else(|| vec!["n0".to_string()]);
        if let (Some(o), Some(first)) = (owner, perms.first_mut()) {
            *first = format!("{}{o}", first.chars().next().unwrap_or('n'));
        }
        self.store.insert(path.to_string(), String::new());
        self.perms.insert(path.to_string(), perms);
    }

    /// What xenstore answers domain `who` (unprivileged) reading `path`.
    pub fn guest_read(&self, who: DomId, path: &str) -> Result<String, XenError> {
        let v = self.store.get(path).ok_or(XenError::ENOENT)?;
        let perms = self.perms_of(path).unwrap_or_default();
        if access(who, &perms).0 {
            Ok(v.clone())
        } else {
            Err(XenError::EACCES)
        }
    }

    /// What xenstore answers domain `who` (unprivileged) writing `path`: an existing node
    /// needs write access; a new one, write access on its nearest existing ancestor, and
    /// then belongs to `who`.
    pub fn guest_write(&mut self, who: DomId, path: &str, value: &str) -> Result<(), XenError> {
        let mut at = path;
        while at != "/" && !self.store.contains_key(at) {
            at = parent(at);
        }
        let perms = self.perms_of(at).unwrap_or_default();
        if !access(who, &perms).1 {
            return Err(XenError::EACCES);
        }
        self.create_missing(path, Some(who));
        self.store.insert(path.to_string(), value.to_string());
        Ok(())
    }

    /// Every backend directory the toolstack asked to close (`online` 0, `state` 5) gets
    /// the answer [`FakePlatform::release`] says.
    fn answer_close_requests(&mut self) {
        let closing: Vec<String> = self
            .store
            .iter()
            .filter(|(k, v)| k.contains("/backend/") && k.ends_with("/state") && *v == "5")
            .map(|(k, _)| parent(k).to_string())
            .filter(|b| self.store.get(&format!("{b}/online")).map(String::as_str) == Some("0"))
            .collect();
        for b in closing {
            match self.release {
                Release::Refuse => {}
                Release::BackendRemoves => {
                    let _ = self.xs_rm(&b);
                }
                Release::Cooperate => {
                    if let Some(f) = self.store.get(&format!("{b}/frontend")).cloned() {
                        let s = format!("{f}/state");
                        if self.store.contains_key(&s) {
                            self.store.insert(s, "6".to_string());
                        }
                    }
                    self.store.insert(format!("{b}/state"), "6".to_string());
                }
            }
        }
    }
}
