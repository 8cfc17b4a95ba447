//! Device entries of boot domains: what a Xen toolstack writes in xenstore before a guest's
//! frontends and the backends probe, here written by the control domain at boot for the disks
//! its command line declares.
//!
//! A declaration is one command-line word `disk=<frontend>:<backend>:<vdev>:<r|rw>` (boot
//! domain names, the guest's device name `xvd…`, the access). [`parse_disks`] checks every
//! word strictly; [`disk_plan`] turns one disk, once the names are resolved to domain ids,
//! into [`crate::xenstore_layout::device_plan`] (the same plan run-time devices get): the
//! nodes of [`crate::xenstore_layout::device_entries`] plus `device-type` = `disk` on both
//! sides, and the permissions libxl gives the two directories (XEN-ABI.md §7.5): frontend
//! dir `[n<frontend>, r<backend>]`, backend dir `[n<backend>, r<frontend>]`.
//!
//! Network interfaces likewise: `vif=<frontend>:<backend>:<devid>:<mac>[:<ip>[:<rate>]]`
//! ([`parse_vifs`], [`vif_plan`], [`restart_plans`]): the MAC as `xx:xx:xx:xx:xx:xx`, the
//! optional IPv4 address the backend lets the vif use (empty to give a rate without one), the
//! optional rate in libxl's xenstore form `<bytes>,<usecs>`. The frontend dir gets `backend`,
//! `backend-id`, `state` = 1, `handle`, `mac`; the backend dir `frontend`, `frontend-id`,
//! `online` = 1, `state` = 1, `handle`, `mac`, `ip`, `rate`, `type` = `vif`.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::domain_config::{DiskAccess, DiskSpec, MacFmt, VifSpec};
use shared_abi::mgmt::DeviceInfo;

pub use crate::xenstore_layout::DevicePlan;
use crate::xenstore_layout::{device_plan, vbd_devid};

/// One declared disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootDisk {
    /// The guest (frontend) boot domain's name.
    pub frontend: String,
    /// The backend boot domain's name.
    pub backend: String,
    /// `xvd…`.
    pub vdev: String,
    pub access: DiskAccess,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Every `disk=` word of `cmdline`; the first malformed one is an error naming it and the
/// expected form.
pub fn parse_disks(cmdline: &str) -> Result<Vec<BootDisk>, String> {
    let mut out = Vec::new();
    for w in cmdline.split_whitespace() {
        let Some(v) = w.strip_prefix("disk=") else {
            continue;
        };
        let parts: Vec<&str> = v.split(':').collect();
        let bad = || {
            format!("{w:?}: expected disk=<frontend>:<backend>:<xvd…>:<r|rw> (boot domain names)")
        };
        let [fe, be, vdev, access] = parts.as_slice() else {
            return Err(bad());
        };
        let access = match *access {
            "r" => DiskAccess::ReadOnly,
            "rw" => DiskAccess::ReadWrite,
            _ => return Err(bad()),
        };
        if !valid_name(fe) || !valid_name(be) || fe == be || vbd_devid(vdev).is_none() {
            return Err(bad());
        }
        let d = BootDisk {
            frontend: fe.to_string(),
            backend: be.to_string(),
            vdev: vdev.to_string(),
            access,
        };
        if out
            .iter()
            .any(|o: &BootDisk| o.frontend == d.frontend && o.vdev == d.vdev)
        {
            return Err(format!(
                "{w:?}: {} declared twice for {}",
                d.vdev, d.frontend
            ));
        }
        out.push(d);
    }
    Ok(out)
}

/// The plan for `d` served by domain `be` to domain `fe`.
pub fn disk_plan(fe: DomId, be: DomId, d: &BootDisk) -> Option<DevicePlan> {
    let devid = vbd_devid(&d.vdev)?;
    let dev = DeviceInfo::Disk {
        devid,
        spec: DiskSpec {
            target: format!("ram:{}", d.vdev),
            vdev: d.vdev.clone(),
            access: d.access,
            backend: Some(d.backend.clone()),
        },
    };
    Some(device_plan(fe, be, &dev))
}

/// One declared network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootVif {
    /// The guest (frontend) boot domain's name.
    pub frontend: String,
    /// The backend boot domain's name.
    pub backend: String,
    pub devid: u32,
    pub mac: [u8; 6],
    pub ip: Option<[u8; 4]>,
    /// `(bytes, usecs)`: `bytes` of credit every `usecs` microseconds.
    pub rate: Option<(u64, u64)>,
}

fn parse_mac(parts: &[&str]) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return None;
    }
    for (o, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    // Unicast and non-zero.
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut it = s.split('.');
    for o in ip.iter_mut() {
        let p = it.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if p.len() > 1 && p.starts_with('0') {
            return None;
        }
        *o = p.parse().ok()?;
    }
    it.next().is_none().then_some(ip)
}

fn parse_rate(s: &str) -> Option<(u64, u64)> {
    let (b, u) = s.split_once(',')?;
    let num = |x: &str| {
        (!x.is_empty() && x.len() <= 19 && x.bytes().all(|c| c.is_ascii_digit()))
            .then(|| x.parse::<u64>().ok())
            .flatten()
            .filter(|&n| n > 0)
    };
    Some((num(b)?, num(u)?))
}

/// Every `vif=` word of `cmdline`; the first malformed one is an error naming it and the
/// expected form. A frontend's devid and a MAC may each be declared once.
pub fn parse_vifs(cmdline: &str) -> Result<Vec<BootVif>, String> {
    let mut out: Vec<BootVif> = Vec::new();
    for w in cmdline.split_whitespace() {
        let Some(v) = w.strip_prefix("vif=") else {
            continue;
        };
        let bad = || {
            format!(
                "{w:?}: expected vif=<frontend>:<backend>:<devid>:<xx:xx:xx:xx:xx:xx>[:<ip>[:<bytes>,<usecs>]] (boot domain names, a unicast MAC)"
            )
        };
        let parts: Vec<&str> = v.split(':').collect();
        if !(9..=11).contains(&parts.len()) {
            return Err(bad());
        }
        let (fe, be) = (parts[0], parts[1]);
        let devid = (!parts[2].is_empty() && parts[2].bytes().all(|b| b.is_ascii_digit()))
            .then(|| parts[2].parse::<u32>().ok())
            .flatten()
            .filter(|&d| d < (1 << 16))
            .ok_or_else(bad)?;
        let mac = parse_mac(&parts[3..9]).ok_or_else(bad)?;
        let ip = match parts.get(9) {
            None | Some(&"") => None,
            Some(s) => Some(parse_ip(s).ok_or_else(bad)?),
        };
        let rate = match parts.get(10) {
            None => None,
            Some(s) => Some(parse_rate(s).ok_or_else(bad)?),
        };
        if !valid_name(fe) || !valid_name(be) || fe == be {
            return Err(bad());
        }
        if out
            .iter()
            .any(|o| (o.frontend == fe && o.devid == devid) || o.mac == mac)
        {
            return Err(format!("{w:?}: vif {devid} of {fe} or MAC declared twice"));
        }
        out.push(BootVif {
            frontend: fe.to_string(),
            backend: be.to_string(),
            devid,
            mac,
            ip,
            rate,
        });
    }
    Ok(out)
}

/// The plan for vif `v` served by domain `be` to domain `fe`.
pub fn vif_plan(fe: DomId, be: DomId, v: &BootVif) -> DevicePlan {
    let dev = DeviceInfo::Vif {
        devid: v.devid,
        spec: VifSpec {
            mac: Some(v.mac),
            ip: v.ip,
            // Written below in the declared form.
            rate_bytes_per_sec: None,
            backend: Some(v.backend.clone()),
        },
    };
    let mut plan = device_plan(fe, be, &dev);
    if let Some((bytes, usecs)) = v.rate {
        let b = plan.backend_dir().to_string();
        plan.xs
            .entries
            .push((format!("{b}/rate"), format!("{bytes},{usecs}")));
    }
    plan
}

/// A vif's MAC as xenstore writes it.
pub fn mac_text(mac: [u8; 6]) -> String {
    format!("{}", MacFmt(mac))
}

/// A device a boot domain's command line declares (a disk or a vif): which boot domains it
/// joins, and the xenstore plan that wires it once their domain ids are known.
pub trait BootDevice {
    /// The guest's (frontend's) boot domain name.
    fn frontend(&self) -> &str;
    /// The backend's boot domain name.
    fn backend(&self) -> &str;
    /// The plan for frontend domain `fe` and backend domain `be` (`None`: nothing to write).
    fn plan(&self, fe: DomId, be: DomId) -> Option<DevicePlan>;
    /// How the log names it: `disk xvda`, `vif 0 (mac 00:16:3e:…)`.
    fn describe(&self) -> String;
}

impl BootDevice for BootDisk {
    fn frontend(&self) -> &str {
        &self.frontend
    }
    fn backend(&self) -> &str {
        &self.backend
    }
    fn plan(&self, fe: DomId, be: DomId) -> Option<DevicePlan> {
        disk_plan(fe, be, self)
    }
    fn describe(&self) -> String {
        format!("disk {}", self.vdev)
    }
}

impl BootDevice for BootVif {
    fn frontend(&self) -> &str {
        &self.frontend
    }
    fn backend(&self) -> &str {
        &self.backend
    }
    fn plan(&self, fe: DomId, be: DomId) -> Option<DevicePlan> {
        Some(vif_plan(fe, be, self))
    }
    fn describe(&self) -> String {
        format!("vif {} (mac {})", self.devid, mac_text(self.mac))
    }
}

/// The devices to write again after boot domain `name` came back as a new domain (its
/// `on_crash = "restart"` / `on_poweroff = "restart"` policy): every device it serves or uses,
/// with the domain ids the others have now (`id_of`). For each: the new plan (frontend
/// `backend`/`backend-id` re-pointed at the new backend, the frontend `state` back to
/// Initialising so that neither side connects through stale ring keys, the new backend
/// directory from the same declaration) and the directory of the device's old backend side,
/// to remove.
pub fn restart_plans<D: BootDevice>(
    devices: &[D],
    name: &str,
    old: DomId,
    new: DomId,
    id_of: impl Fn(&str) -> Option<DomId>,
) -> Vec<(DevicePlan, String)> {
    let mut out = Vec::new();
    for d in devices {
        let (fe, be, old_fe, old_be) = if d.backend() == name {
            let Some(fe) = id_of(d.frontend()) else {
                continue;
            };
            (fe, new, fe, old)
        } else if d.frontend() == name {
            let Some(be) = id_of(d.backend()) else {
                continue;
            };
            (new, be, old, be)
        } else {
            continue;
        };
        let (Some(plan), Some(stale)) = (d.plan(fe, be), d.plan(old_fe, old_be)) else {
            continue;
        };
        out.push((plan, stale.backend_dir().to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_words_are_parsed_strictly() {
        let d = parse_disks("exit_when_idle disk=guest:blkback:xvda:rw disk=g2:blkback:xvdb:r")
            .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].frontend, "guest");
        assert_eq!(d[0].access, DiskAccess::ReadWrite);
        assert_eq!(
            (d[1].vdev.as_str(), d[1].access),
            ("xvdb", DiskAccess::ReadOnly)
        );
        for bad in [
            "disk=guest:blkback:xvda",
            "disk=guest:blkback:sda:rw",
            "disk=guest:blkback:xvda:w",
            "disk=:blkback:xvda:rw",
            "disk=guest:guest:xvda:rw",
            "disk=gu/est:blkback:xvda:rw",
            "disk=guest:blkback:xvda:rw:x",
            "disk=guest:blkback:xvda:rw disk=guest:other:xvda:r",
        ] {
            assert!(parse_disks(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_disks("nothing here").unwrap(), Vec::new());
    }

    #[test]
    fn plan_gives_each_side_read_access_to_the_other() {
        let d = parse_disks("disk=guest:blkback:xvda:r").unwrap();
        let p = disk_plan(4, 3, &d[0]).unwrap();
        assert_eq!(p.devid, 51712);
        assert_eq!(p.xs.dirs[0].0, "/local/domain/4/device/vbd/51712");
        assert_eq!(p.xs.dirs[0].1, ["n4".to_string(), "r3".to_string()]);
        assert_eq!(p.xs.dirs[1].0, "/local/domain/3/backend/vbd/4/51712");
        assert_eq!(p.xs.dirs[1].1, ["n3".to_string(), "r4".to_string()]);
        let get = |k: &str| {
            p.xs.entries
                .iter()
                .find(|(p, _)| p == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get("/local/domain/4/device/vbd/51712/backend-id"),
            Some("3")
        );
        assert_eq!(get("/local/domain/4/device/vbd/51712/state"), Some("1"));
        assert_eq!(
            get("/local/domain/4/device/vbd/51712/device-type"),
            Some("disk")
        );
        assert_eq!(
            get("/local/domain/3/backend/vbd/4/51712/frontend-id"),
            Some("4")
        );
        assert_eq!(get("/local/domain/3/backend/vbd/4/51712/mode"), Some("r"));
        assert_eq!(get("/local/domain/3/backend/vbd/4/51712/online"), Some("1"));
        // Every node lies under one of the two directories.
        assert!(
            p.xs.entries
                .iter()
                .all(|(k, _)| k.starts_with(&p.xs.dirs[0].0) || k.starts_with(&p.xs.dirs[1].0))
        );
    }

    #[test]
    fn vif_words_are_parsed_strictly() {
        let v = parse_vifs(
            "disk=guest:blkback:xvda:rw vif=guest:netback:0:00:16:3e:00:00:03 vif=g2:netback:1:00:16:3e:00:00:04:10.0.2.16:125000,50000 vif=g3:nb:0:00:16:3e:00:00:05::1000,1000",
        )
        .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(
            v[0],
            BootVif {
                frontend: "guest".into(),
                backend: "netback".into(),
                devid: 0,
                mac: [0, 0x16, 0x3e, 0, 0, 3],
                ip: None,
                rate: None,
            }
        );
        assert_eq!(v[1].ip, Some([10, 0, 2, 16]));
        assert_eq!(v[1].rate, Some((125_000, 50_000)));
        assert_eq!((v[2].ip, v[2].rate), (None, Some((1000, 1000))));
        for bad in [
            "vif=guest:netback:0",
            "vif=guest:netback:0:00:16:3e:00:00",
            "vif=guest:netback:x:00:16:3e:00:00:03",
            "vif=guest:netback:-1:00:16:3e:00:00:03",
            "vif=guest:netback:65536:00:16:3e:00:00:03",
            "vif=guest:netback:0:01:16:3e:00:00:03",
            "vif=guest:netback:0:00:00:00:00:00:00",
            "vif=guest:netback:0:00:16:3e:00:00:3",
            "vif=guest:netback:0:00:16:3e:00:00:0g",
            "vif=guest:netback:0:00:16:3e:00:00:03:10.0.2",
            "vif=guest:netback:0:00:16:3e:00:00:03:10.0.2.256",
            "vif=guest:netback:0:00:16:3e:00:00:03:10.0.2.1:100",
            "vif=guest:netback:0:00:16:3e:00:00:03:10.0.2.1:100,0",
            "vif=guest:netback:0:00:16:3e:00:00:03:10.0.2.1:100,50:x",
            "vif=guest:guest:0:00:16:3e:00:00:03",
            "vif=gu/est:netback:0:00:16:3e:00:00:03",
            "vif=guest:netback:0:00:16:3e:00:00:03 vif=guest:netback:0:00:16:3e:00:00:04",
            "vif=guest:netback:0:00:16:3e:00:00:03 vif=other:netback:0:00:16:3e:00:00:03",
        ] {
            assert!(parse_vifs(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_vifs("disk=a:b:xvda:r").unwrap(), Vec::new());
    }

    #[test]
    fn vif_plan_writes_libxls_keys_with_its_permissions() {
        let v = parse_vifs("vif=guest:netback:0:00:16:3e:00:00:03:10.0.2.15:125000,50000").unwrap();
        let p = vif_plan(4, 2, &v[0]);
        assert_eq!(p.devid, 0);
        assert_eq!(p.xs.dirs[0].0, "/local/domain/4/device/vif/0");
        assert_eq!(p.xs.dirs[0].1, ["n4".to_string(), "r2".to_string()]);
        assert_eq!(p.xs.dirs[1].0, "/local/domain/2/backend/vif/4/0");
        assert_eq!(p.xs.dirs[1].1, ["n2".to_string(), "r4".to_string()]);
        let get = |k: &str| {
            p.xs.entries
                .iter()
                .find(|(p, _)| p == k)
                .map(|(_, v)| v.as_str())
        };
        let f = "/local/domain/4/device/vif/0";
        let b = "/local/domain/2/backend/vif/4/0";
        for (k, v) in [
            (format!("{f}/backend"), b),
            (format!("{f}/backend-id"), "2"),
            (format!("{f}/state"), "1"),
            (format!("{f}/handle"), "0"),
            (format!("{f}/mac"), "00:16:3e:00:00:03"),
            (format!("{b}/frontend"), f),
            (format!("{b}/frontend-id"), "4"),
            (format!("{b}/online"), "1"),
            (format!("{b}/state"), "1"),
            (format!("{b}/handle"), "0"),
            (format!("{b}/mac"), "00:16:3e:00:00:03"),
            (format!("{b}/ip"), "10.0.2.15"),
            (format!("{b}/rate"), "125000,50000"),
            (format!("{b}/type"), "vif"),
        ] {
            assert_eq!(get(&k), Some(v), "{k}");
        }
        assert_eq!(
            p.xs.entries
                .iter()
                .filter(|(k, _)| k.ends_with("/rate"))
                .count(),
            1
        );
        assert!(
            p.xs.entries
                .iter()
                .all(|(k, _)| k.starts_with(&p.xs.dirs[0].0) || k.starts_with(&p.xs.dirs[1].0))
        );
        // Without ip and rate, neither key.
        let v = parse_vifs("vif=guest:netback:1:00:16:3e:00:00:04").unwrap();
        let p = vif_plan(4, 2, &v[0]);
        assert!(
            !p.xs
                .entries
                .iter()
                .any(|(k, _)| k.ends_with("/ip") || k.ends_with("/rate"))
        );
        assert_eq!(mac_text(v[0].mac), "00:16:3e:00:00:04");
    }

    #[test]
    fn a_restarted_netback_gets_its_vifs_again() {
        let v =
            parse_vifs("vif=guest:netback:0:00:16:3e:00:00:03 vif=other:nb2:0:00:16:3e:00:00:04")
                .unwrap();
        let ids = |n: &str| match n {
            "guest" => Some(4),
            "other" => Some(6),
            _ => None,
        };
        let plans = restart_plans(&v, "netback", 2, 7, ids);
        assert_eq!(plans.len(), 1);
        let (p, old) = &plans[0];
        assert_eq!(old, "/local/domain/2/backend/vif/4/0");
        assert_eq!(p.xs.dirs[1].0, "/local/domain/7/backend/vif/4/0");
        assert_eq!(p.xs.dirs[0].1, ["n4".to_string(), "r7".to_string()]);
        assert!(p.xs.entries.contains(&(
            "/local/domain/4/device/vif/0/backend-id".to_string(),
            "7".to_string()
        )));
        assert!(p.xs.entries.contains(&(
            "/local/domain/4/device/vif/0/state".to_string(),
            "1".to_string()
        )));
        let plans = restart_plans(&v, "guest", 4, 9, |n| (n == "netback").then_some(2));
        assert_eq!(plans[0].1, "/local/domain/2/backend/vif/4/0");
        assert_eq!(plans[0].0.xs.dirs[0].0, "/local/domain/9/device/vif/0");
        assert!(restart_plans(&v, "nobody", 1, 2, ids).is_empty());
        assert!(restart_plans(&v, "nb2", 5, 8, |_| None).is_empty());
    }

    #[test]
    fn a_restarted_backend_gets_its_devices_again() {
        let d = parse_disks("disk=guest:blkback:xvda:rw disk=other:blk2:xvdb:r").unwrap();
        let ids = |n: &str| match n {
            "guest" => Some(4),
            "other" => Some(6),
            _ => None,
        };
        let plans = restart_plans(&d, "blkback", 3, 7, ids);
        assert_eq!(plans.len(), 1);
        let (p, old) = &plans[0];
        assert_eq!(old, "/local/domain/3/backend/vbd/4/51712");
        assert_eq!(p.xs.dirs[1].0, "/local/domain/7/backend/vbd/4/51712");
        assert_eq!(p.xs.dirs[0].1, ["n4".to_string(), "r7".to_string()]);
        let get = |k: &str| {
            p.xs.entries
                .iter()
                .find(|(p, _)| p == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get("/local/domain/4/device/vbd/51712/backend-id"),
            Some("7")
        );
        assert_eq!(
            get("/local/domain/4/device/vbd/51712/backend"),
            Some("/local/domain/7/backend/vbd/4/51712")
        );
        assert_eq!(get("/local/domain/4/device/vbd/51712/state"), Some("1"));
        // A restarted guest: its new frontend dir, the backend's entry for the old domain
        // removed.
        let plans = restart_plans(&d, "guest", 4, 9, |n| (n == "blkback").then_some(3));
        assert_eq!(plans[0].1, "/local/domain/3/backend/vbd/4/51712");
        assert_eq!(plans[0].0.xs.dirs[0].0, "/local/domain/9/device/vbd/51712");
        // Unrelated names, unknown peers: nothing.
        assert!(restart_plans(&d, "nobody", 1, 2, ids).is_empty());
        assert!(restart_plans(&d, "blk2", 5, 8, |_| None).is_empty());
    }
}
