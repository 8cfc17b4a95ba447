//! Boot domains after boot: what the hypervisor keeps to rebuild one, and the rebuild.
//!
//! The boot image stays in memory for the whole run (it is reserved from the frame
//! allocator and nothing writes it), so each manifest entry keeps its [`DomainSpec`] (with
//! its `on_poweroff` / `on_reboot` / `on_crash` policies) and a view of its ELF bytes.
//! A domain holding `DOMAIN_CONTROL` (ctl-dom) asks, through `domctl REBUILD_BOOT_DOMAIN`,
//! for an entry to be built again: the dead domain is destroyed first (so its devices are
//! free), then [`Hypervisor::build_domain`], the one builder boot uses, builds it under a
//! new id with the same config, its PCI functions are assigned again through the arch
//! layer's [`BootDevices`] (the same resolution and confinement as at boot) and its
//! xenstore port is offered again by the builder; `VIRQ_DOM_EXC` then tells the xenstore
//! domain (which serves every domain with an offered port) and the control domain.
//!
//! Policies are the control domain's to apply; the hypervisor only honours `preserve` by
//! not freeing a boot domain that shuts down with a reason whose policy is `preserve`
//! (faults always free at once).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::domain_config::LifecycleAction;
use shared_abi::errno::XenError;
use shared_abi::manifest::DomainSpec;
use shared_abi::start_info::PciAddress;

use super::builder::{BuildError, DomainConfig};
use super::hypervisor::{Hypervisor, Platform};
use super::{Domain, DomainState, ExitReason, ShutdownReason};
use crate::sched::CpuSet;

/// The arch layer's device assignment for rebuilt boot domains (the boot plan, kept).
pub trait BootDevices: Send {
    /// The functions manifest entry `index` receives (for its start info), or why its
    /// devices cannot be assigned.
    fn devices_for(&self, index: usize) -> Result<Vec<PciAddress>, String>;
    /// Entry `index` was built as `dom`: hand its functions to it, confined as at boot.
    fn built(&mut self, index: usize, dom: &Domain);
}

/// One manifest entry.
pub struct BootEntry {
    pub spec: DomainSpec,
    pub elf: &'static [u8],
    /// The domain currently built from it (`None`: refused at boot, or its rebuild failed).
    pub domid: Option<DomId>,
    /// How many times it was rebuilt.
    pub rebuilds: u32,
}

/// Every boot domain's entry, in manifest order.
#[derive(Default)]
pub struct BootSet {
    pub entries: Vec<BootEntry>,
    pub devices: Option<Box<dyn BootDevices>>,
}

impl BootSet {
    /// The entry a domain was built from.
    pub fn entry_of(&self, dom: DomId) -> Option<&BootEntry> {
        self.entries.iter().find(|e| e.domid == Some(dom))
    }

    /// Index of the entry named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.spec.name == name)
    }

    /// Whether `dom`, shutting down for `reason`, is to be kept (policy `preserve`).
    pub fn preserves(&self, dom: DomId, reason: ShutdownReason) -> bool {
        self.entry_of(dom)
            .is_some_and(|e| e.spec.action_for(reason.code()) == LifecycleAction::Preserve)
    }
}

/// The errno for a refused build.
pub(crate) fn build_errno(e: &BuildError) -> XenError {
    match e {
        BuildError::OutOfMemory => XenError::ENOMEM,
        BuildError::NoDomainIds => XenError::ENOSPC,
        _ => XenError::EINVAL,
    }
}

impl Hypervisor {
    /// Rebuild boot domain `index` (see the module doc); its new id. `ESRCH` for no such
    /// entry (or no boot set), `EBUSY` while its current domain still runs or is paused,
    /// `ENODEV` when its devices cannot be assigned, `ENOMEM`/`ENOSPC`/`EINVAL` when the
    /// builder refuses. On a refusal after the old domain was destroyed, the entry has no
    /// domain until a later rebuild succeeds.
    pub fn rebuild_boot_domain(
        &mut self,
        p: &mut Platform<'_>,
        by: DomId,
        index: usize,
    ) -> Result<(DomId, CpuSet), XenError> {
        let (cfg_spec, elf, old) = {
            let boot = self.boot.as_ref().ok_or(XenError::ESRCH)?;
            let e = boot.entries.get(index).ok_or(XenError::ESRCH)?;
            (e.spec.clone(), e.elf, e.domid)
        };
        let mut kicks = CpuSet::EMPTY;
        if let Some(old) = old
            && let Some(d) = self.domains.get_mut(old)
        {
            match d.state() {
                DomainState::Running | DomainState::Paused | DomainState::Building => {
                    return Err(XenError::EBUSY);
                }
                DomainState::Shutdown(_) => {
                    if d.exit.is_none() {
                        d.exit = Some(ExitReason::Destroyed { by });
                    }
                    kicks = self.destroy_domain(p, old);
                }
                DomainState::Dying | DomainState::Dead => {}
            }
        }
        let mut cfg = DomainConfig::from_spec(&cfg_spec);
        if !cfg_spec.devices.is_empty() {
            let devs = self
                .boot
                .as_ref()
                .and_then(|b| b.devices.as_ref())
                .ok_or(XenError::ENODEV)?;
            cfg.devices = devs.devices_for(index).map_err(|why| {
                let line =
                    alloc::format!("(hv) boot domain {:?} not rebuilt: {why}\n", cfg_spec.name);
                p.console.write(line.as_bytes());
                XenError::ENODEV
            })?;
        }
        if let Some(e) = self.boot.as_mut().and_then(|b| b.entries.get_mut(index)) {
            e.domid = None;
        }
        let id = self.build_domain(p, &cfg, elf).map_err(|e| {
            let line = alloc::format!("(hv) boot domain {:?} not rebuilt: {e}\n", cfg_spec.name);
            p.console.write(line.as_bytes());
            build_errno(&e)
        })?;
        // The builder's kicks (the new boot vCPU) go out with this call's.
        kicks = kicks.union(self.take_kicks());
        if let Some(boot) = self.boot.as_mut() {
            if let (Some(devs), Some(d)) = (boot.devices.as_mut(), self.domains.get(id))
                && !cfg_spec.devices.is_empty()
            {
                devs.built(index, d);
            }
            if let Some(e) = boot.entries.get_mut(index) {
                e.domid = Some(id);
                e.rebuilds = e.rebuilds.saturating_add(1);
            }
        }
        let line = alloc::format!(
            "(hv) boot domain {:?} rebuilt as domain {id} (asked by domain {by})\n",
            cfg_spec.name
        );
        p.console.write(line.as_bytes());
        // The xenstore domain learns of the new domain (and its offered port) by listing
        // domains on this VIRQ, as it learns of boot domains; the control domain too.
        kicks = kicks.union(self.raise_dom_exc(p));
        Ok((id, kicks))
    }
}
