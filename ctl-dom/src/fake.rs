//! An in-memory [`Platform`]: a domain table, a key/value xenstore and console logs, with
//! switches to make operations fail. Host tests here and hvctl's tests (as a fake server)
//! use it; it enforces what the real hypervisor would (unique ids, ESRCH for unknown ids,
//! an ELF magic check standing in for the builder's validation).

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::domain_config::DomainConfig;
use shared_abi::errno::XenError;
use shared_abi::mgmt::RunState;

use crate::{Chunk, HvDomain, Platform};

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
    /// Shutdown requests seen: (domid, reason).
    pub shutdowns: Vec<(DomId, u32)>,
}

impl FakePlatform {
    /// A system with boot domains xenstore (0), ctl-dom (1), blkback (2) and netback (3).
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
        }
        p
    }

    fn get(&mut self, id: DomId) -> Result<&mut HvDomain, XenError> {
        self.domains.get_mut(&id).ok_or(XenError::ESRCH)
    }
}

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
        let mut d = dom(id, &c.name, c.memory_kib, c.capabilities);
        d.maxmem_kib = c.maxmem_kib;
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
        self.store.insert(path.to_string(), value.to_string());
        Ok(())
    }
    fn xs_rm(&mut self, path: &str) -> Result<(), XenError> {
        let prefix = alloc::format!("{path}/");
        self.store
            .retain(|k, _| k != path && !k.starts_with(&prefix));
        Ok(())
    }
}
