//! Devices of run-time domains: hotplug (`block-attach`, `network-attach`) and detach
//! through the xenbus close handshake (`block-detach`, `network-detach`).
//!
//! Attach checks the device on its own (its fields named `disk.<field>` / `vif.<field>`),
//! against the domain (a vdev or MAC it already has, the per-domain limits), against the
//! system (the backend is a running domain other than the guest, the MAC is not another
//! run-time domain's) and against xenstore (neither directory exists), then writes the one
//! device plan boot devices get too ([`crate::xenstore_layout::device_plan`]: the frontend
//! directory owned by the guest, so its frontend can write its `state`). A write that fails
//! halfway is removed again: nothing half-written stays.
//!
//! Detach, as libxl's `libxl__initiate_device_generic_remove`:
//! 1. the backend's `online` = 0 and `state` = 5 (Closing), in one plan (a transaction on
//!    the real platform); a backend directory already gone or Closed needs no handshake;
//! 2. poll the backend's `state` until it reads 6 (Closed) or the directory is gone (the
//!    backend tore the device down), or the guest is no longer running (nothing holds it);
//! 3. remove both directories (and the parents this domain no longer needs) and forget
//!    the device.
//!
//! A guest that does not release it within `timeout_ms` gets
//! [`MgmtError::DetachTimedOut`] with both states; the device stays attached and recorded,
//! and the backend is put back as it was (`online` = 1, its `state` back to what it was
//! unless it moved on by itself) so the device keeps working and a retry starts from the
//! same point. (xl leaves `online` = 0 and forces the removal instead; here that is the
//! caller's choice: `force`.) `force` skips the handshake and removes both directories at
//! once: backends tear a device down when its directories vanish.
//!
//! ctl serves one request at a time, so the management line waits with the detach (at most
//! [`MAX_DETACH_TIMEOUT_MS`]); deaths that happen meanwhile are found by the re-scan after
//! the answer (ctl-domain's `mgmt.rs` lists the domains after every request).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::domain_config::{ConfigError, DiskSpec, DomainConfig, MacFmt, VifSpec};
use shared_abi::errno::XenError;
use shared_abi::mgmt::{DeviceInfo, DomainRef, MAX_DETACH_TIMEOUT_MS, MgmtError, Reply, RunState};

use crate::xenstore_layout::{self, XsPlan, device_paths, device_plan, kind_name};
use crate::{
    DEFAULT_BLOCK_BACKEND, DEFAULT_NET_BACKEND, Device, HvDomain, Managed, Platform, Toolstack, hv,
};

/// Poll period of the detach wait.
pub const POLL_MS: u64 = 10;

/// The device a detach names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Which {
    /// By vdev (`xvdb`).
    Disk(String),
    /// By device id.
    Vif(u32),
}

impl Which {
    fn matches(&self, d: &DeviceInfo) -> bool {
        match (self, d) {
            (Which::Disk(v), DeviceInfo::Disk { spec, .. }) => spec.vdev == *v,
            (Which::Vif(id), DeviceInfo::Vif { devid, .. }) => devid == id,
            _ => false,
        }
    }
    fn shown(&self) -> String {
        match self {
            Which::Disk(v) => v.clone(),
            Which::Vif(id) => format!("vif {id}"),
        }
    }
    fn operation(&self) -> &'static str {
        match self {
            Which::Disk(_) => "block-detach",
            Which::Vif(_) => "network-detach",
        }
    }
}

/// The backend's directory of one frontend (`/local/domain/<be>/backend/<type>/<fe>`), the
/// parent of that frontend's device directories there.
pub fn backend_frontend_dir(fe: DomId, be: DomId, dev: &DeviceInfo) -> String {
    format!("/local/domain/{be}/backend/{}/{fe}", kind_name(dev))
}

/// A field of a whole-config check renamed for a single device: `disk[0].vdev` → `disk.vdev`.
fn single(mut e: ConfigError, indexed: &str, plain: &str) -> MgmtError {
    if let Some(rest) = e.field.strip_prefix(indexed) {
        e.field = format!("{plain}{rest}");
    }
    e.into()
}

fn refused(operation: &str) -> MgmtError {
    MgmtError::RefusedByPolicy {
        operation: operation.to_string(),
        reason: "boot domains' devices are fixed by the manifest".to_string(),
    }
}

fn state_of(s: &Result<String, XenError>) -> Option<u32> {
    s.as_ref().ok().and_then(|v| v.trim().parse().ok())
}

impl<P: Platform> Toolstack<P> {
    fn managed_for(&self, domid: DomId, operation: &str) -> Result<&Managed, MgmtError> {
        self.managed.get(&domid).ok_or_else(|| refused(operation))
    }

    pub(crate) fn attach_disk(
        &mut self,
        dom: &DomainRef,
        disk: DiskSpec,
    ) -> Result<Reply, MgmtError> {
        const OP: &str = "block-attach";
        let d = self.find(dom)?;
        let all = self.domains()?;
        let m = self.managed_for(d.domid, OP)?;
        // The disk on its own first, so errors name `disk.<field>`.
        let mut one = m.config.clone();
        one.disks = vec![disk.clone()];
        one.validate().map_err(|e| single(e, "disk[0]", "disk"))?;
        if m.config.disks.iter().any(|o| o.vdev == disk.vdev) {
            let used: Vec<&str> = m.config.disks.iter().map(|o| o.vdev.as_str()).collect();
            return Err(ConfigError::new(
                "disk.vdev",
                format!("{:?}", disk.vdev),
                format!(
                    "a vdev domain {dom} does not use yet (in use: {})",
                    used.join(", ")
                ),
            )
            .into());
        }
        let mut cfg = m.config.clone();
        cfg.disks.push(disk.clone());
        cfg.validate()?;
        let b = self.new_backend(
            &all,
            d.domid,
            disk.backend.as_ref(),
            DEFAULT_BLOCK_BACKEND,
            "disk.backend",
        )?;
        let devid = xenstore_layout::vbd_devid(&disk.vdev).ok_or_else(|| {
            MgmtError::from(ConfigError::new(
                "disk.vdev",
                format!("{:?}", disk.vdev),
                "xvd followed by 1..=3 lowercase letters",
            ))
        })?;
        let shown = format!("{:?}", disk.vdev);
        let dev = Device {
            info: DeviceInfo::Disk { devid, spec: disk },
            backend: b,
        };
        self.plug(d.domid, dev, cfg, OP, "disk.vdev", &shown)?;
        Ok(Reply::Attached { devid })
    }

    pub(crate) fn attach_vif(
        &mut self,
        dom: &DomainRef,
        mut vif: VifSpec,
    ) -> Result<Reply, MgmtError> {
        const OP: &str = "network-attach";
        let d = self.find(dom)?;
        let all = self.domains()?;
        let m = self.managed_for(d.domid, OP)?;
        let devid = m
            .devices
            .iter()
            .filter_map(|x| match x.info {
                DeviceInfo::Vif { devid, .. } => Some(devid + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let mut one = m.config.clone();
        one.vifs = vec![vif.clone()];
        one.validate().map_err(|e| single(e, "vif[0]", "vif"))?;
        vif.mac
            .get_or_insert(xenstore_layout::default_mac(d.domid, devid));
        // Unique among this domain's vifs and every other run-time domain's.
        let holder = self.managed.iter().find_map(|(id, o)| {
            o.devices
                .iter()
                .any(|x| matches!(&x.info, DeviceInfo::Vif { spec, .. } if spec.mac == vif.mac))
                .then_some(*id)
        });
        if let (Some(holder), Some(mac)) = (holder, vif.mac) {
            return Err(ConfigError::new(
                "vif.mac",
                MacFmt(mac),
                format!("an address no other vif uses (domain {holder} has it)"),
            )
            .into());
        }
        let mut cfg = m.config.clone();
        cfg.vifs.push(vif.clone());
        cfg.validate()?;
        let b = self.new_backend(
            &all,
            d.domid,
            vif.backend.as_ref(),
            DEFAULT_NET_BACKEND,
            "vif.backend",
        )?;
        let dev = Device {
            info: DeviceInfo::Vif { devid, spec: vif },
            backend: b,
        };
        self.plug(d.domid, dev, cfg, OP, "vif.devid", &devid.to_string())?;
        Ok(Reply::Attached { devid })
    }

    /// The backend of a device attached to `guest`: the running domain `named` (else
    /// `default`), and not the guest itself; errors name `field`.
    fn new_backend(
        &self,
        all: &[HvDomain],
        guest: DomId,
        named: Option<&String>,
        default: &str,
        field: &str,
    ) -> Result<DomId, MgmtError> {
        let b = self.backend_id(all, named, default, field.into())?;
        if b == guest {
            return Err(ConfigError::new(
                field,
                format!("{:?}", named.map_or(default, String::as_str)),
                "a backend domain other than the guest",
            )
            .into());
        }
        Ok(b)
    }

    /// Write a new device of `domid` (neither directory may exist yet) and record it with
    /// the domain's config `cfg` that includes it; on a failed write remove whatever was
    /// written and keep the old config.
    fn plug(
        &mut self,
        domid: DomId,
        dev: Device,
        cfg: DomainConfig,
        operation: &str,
        field: &str,
        value: &str,
    ) -> Result<(), MgmtError> {
        let plan = device_plan(domid, dev.backend, &dev.info);
        for dir in [plan.frontend_dir(), plan.backend_dir()] {
            match self.platform.xs_read(dir) {
                Err(XenError::ENOENT) => {}
                Ok(_) => {
                    return Err(ConfigError::new(
                        field,
                        value,
                        format!("a device not in xenstore yet ({dir} exists)"),
                    )
                    .into());
                }
                Err(e) => return Err(hv(operation)(e)),
            }
        }
        if let Err(e) = self.platform.xs_write_plan(&plan.xs) {
            self.unplug(domid, &dev);
            self.platform.log(&format!(
                "domain {domid}: {operation} {value}: xenstore {e:?}, nothing left written"
            ));
            return Err(hv(operation)(e));
        }
        self.platform.log(&format!(
            "domain {domid}: {operation}: device {} written ({} / {})",
            plan.devid,
            plan.frontend_dir(),
            plan.backend_dir()
        ));
        if let Some(m) = self.managed.get_mut(&domid) {
            m.devices.push(dev);
            m.config = cfg;
        }
        Ok(())
    }

    /// Remove a device's two directories, and the parents no recorded device of `domid`
    /// needs any more (`device/<type>` in the guest's home, `backend/<type>/<fe>` in the
    /// backend's). Best effort: a node already gone is not an error.
    fn unplug(&mut self, domid: DomId, dev: &Device) {
        for p in device_paths(domid, dev.backend, &dev.info) {
            let _ = self.platform.xs_rm(&p);
        }
        let kind = kind_name(&dev.info);
        let (same_kind, same_backend) = self.managed.get(&domid).map_or((false, false), |m| {
            let same: Vec<&Device> = m
                .devices
                .iter()
                .filter(|x| kind_name(&x.info) == kind)
                .collect();
            (
                !same.is_empty(),
                same.iter().any(|x| x.backend == dev.backend),
            )
        });
        if !same_backend {
            let _ = self
                .platform
                .xs_rm(&backend_frontend_dir(domid, dev.backend, &dev.info));
        }
        if !same_kind {
            let _ = self
                .platform
                .xs_rm(&format!("/local/domain/{domid}/device/{kind}"));
        }
    }

    pub(crate) fn detach(
        &mut self,
        dom: &DomainRef,
        which: Which,
        timeout_ms: u32,
        force: bool,
    ) -> Result<Reply, MgmtError> {
        let op = which.operation();
        let d = self.find(dom)?;
        if !force && !(1..=MAX_DETACH_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(ConfigError::new(
                "timeout",
                format!("{timeout_ms} ms"),
                format!("1..={MAX_DETACH_TIMEOUT_MS} ms (at most 300 s)"),
            )
            .into());
        }
        let m = self.managed_for(d.domid, op)?;
        let dev = m
            .devices
            .iter()
            .find(|x| which.matches(&x.info))
            .cloned()
            .ok_or_else(|| MgmtError::NoSuchDevice {
                dom: dom.clone(),
                device: which.shown(),
            })?;
        let start = self.platform.now_ms();
        let how = if force {
            "removed (forced)".to_string()
        } else {
            match self.close_handshake(d.domid, dom, &dev, &which, timeout_ms) {
                Ok(how) => how,
                Err(e) => {
                    self.platform.log(&format!("domain {}: {op}: {e}", d.domid));
                    return Err(e);
                }
            }
        };
        if let Some(m) = self.managed.get_mut(&d.domid) {
            m.devices.retain(|x| *x != dev);
            match &dev.info {
                DeviceInfo::Disk { spec, .. } => m.config.disks.retain(|x| x.vdev != spec.vdev),
                DeviceInfo::Vif { spec, .. } => m.config.vifs.retain(|x| x.mac != spec.mac),
            }
        }
        self.unplug(d.domid, &dev);
        let ms = self.platform.now_ms().saturating_sub(start);
        self.platform.log(&format!(
            "domain {}: {} {how} after {ms} ms",
            d.domid,
            which.shown()
        ));
        Ok(Reply::Done)
    }

    /// Whether `domid` still runs (a guest that can answer the handshake).
    fn running(&mut self, domid: DomId) -> bool {
        match self.platform.list() {
            Ok(l) => l.iter().any(|x| {
                x.domid == domid
                    && matches!(
                        x.state,
                        RunState::Running | RunState::Blocked | RunState::Paused
                    )
                    && !self.managed.get(&domid).is_some_and(|m| m.preserved)
            }),
            // Cannot tell: keep waiting (the timeout bounds it).
            Err(_) => true,
        }
    }

    /// Ask the backend to close and wait until it did (module docs); how it ended.
    fn close_handshake(
        &mut self,
        domid: DomId,
        dom: &DomainRef,
        dev: &Device,
        which: &Which,
        timeout_ms: u32,
    ) -> Result<String, MgmtError> {
        let op = which.operation();
        let [f, b] = device_paths(domid, dev.backend, &dev.info);
        let (b_state, b_online) = (format!("{b}/state"), format!("{b}/online"));
        let before = match self.platform.xs_read(&b_state) {
            // The backend already tore it down.
            Err(XenError::ENOENT) => return Ok("removed (backend already gone)".to_string()),
            Err(e) => return Err(hv(op)(e)),
            Ok(s) if s.trim() == "6" => return Ok("removed (already closed)".to_string()),
            Ok(s) => s,
        };
        if !self.running(domid) {
            return Ok("removed (the guest is not running)".to_string());
        }
        self.platform
            .xs_write_plan(&XsPlan {
                dirs: Vec::new(),
                entries: vec![
                    (b_online.clone(), "0".to_string()),
                    (b_state.clone(), "5".to_string()),
                ],
            })
            .map_err(hv(op))?;
        let start = self.platform.now_ms();
        let timeout = u64::from(timeout_ms);
        loop {
            let now_b = self.platform.xs_read(&b_state);
            match &now_b {
                Err(XenError::ENOENT) => {
                    return Ok("released (the backend removed it)".to_string());
                }
                Ok(s) if s.trim() == "6" => return Ok("released (backend Closed)".to_string()),
                _ => {}
            }
            if !self.running(domid) {
                return Ok("removed (the guest stopped running)".to_string());
            }
            let waited = self.platform.now_ms().saturating_sub(start);
            if waited >= timeout {
                let fs = self.platform.xs_read(&format!("{f}/state"));
                let (fs, bs) = (state_of(&fs), state_of(&now_b));
                // Put the backend back as it was: the device keeps working and a retry
                // starts over.
                let mut entries = vec![(b_online, "1".to_string())];
                if bs == Some(5) {
                    entries.push((b_state, before));
                }
                let _ = self.platform.xs_write_plan(&XsPlan {
                    dirs: Vec::new(),
                    entries,
                });
                return Err(MgmtError::DetachTimedOut {
                    dom: dom.clone(),
                    device: which.shown(),
                    waited_ms: waited,
                    frontend_state: fs,
                    backend_state: bs,
                });
            }
            self.platform.sleep_ms(POLL_MS.min(timeout - waited));
        }
    }
}
