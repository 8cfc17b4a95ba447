//! Device entries of boot domains: what a Xen toolstack writes in xenstore before a guest's
//! frontends and the backends probe, here written by the control domain at boot for the disks
//! its command line declares.
//!
//! A declaration is one command-line word `disk=<frontend>:<backend>:<vdev>:<r|rw>` (boot
//! domain names, the guest's device name `xvd…`, the access). [`parse_disks`] checks every
//! word strictly; [`disk_plan`] turns one disk, once the names are resolved to domain ids,
//! into the nodes of [`crate::xenstore_layout::device_entries`] plus `device-type` = `disk` on
//! both sides, and the permissions libxl gives the two directories (XEN-ABI.md §7.5):
//! frontend dir `[n<frontend>, r<backend>]`, backend dir `[n<backend>, r<frontend>]`.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::domain_config::{DiskAccess, DiskSpec};
use shared_abi::mgmt::DeviceInfo;

use crate::xenstore_layout::{device_entries, device_paths, vbd_devid};

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

/// What writing one disk takes: the directories with their permissions (create and set
/// these first, so every node written below them inherits them), then the nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskPlan {
    pub devid: u32,
    /// (directory, permissions in Xen's string form).
    pub dirs: [(String, [String; 2]); 2],
    pub entries: Vec<(String, String)>,
}

/// The plan for `d` served by domain `be` to domain `fe`.
pub fn disk_plan(fe: DomId, be: DomId, d: &BootDisk) -> Option<DiskPlan> {
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
    let [f, b] = device_paths(fe, be, &dev);
    let mut entries = device_entries(fe, be, &dev);
    entries.push((format!("{f}/device-type"), "disk".to_string()));
    entries.push((format!("{b}/device-type"), "disk".to_string()));
    entries.push((format!("{b}/type"), "phy".to_string()));
    Some(DiskPlan {
        devid,
        dirs: [
            (f, [format!("n{fe}"), format!("r{be}")]),
            (b, [format!("n{be}"), format!("r{fe}")]),
        ],
        entries,
    })
}

/// The disks to write again after boot domain `name` came back as a new domain (its
/// `on_crash = "restart"` / `on_poweroff = "restart"` policy): every disk it serves or uses,
/// with the domain ids the others have now (`id_of`). For each: the new plan (frontend
/// `backend`/`backend-id` re-pointed at the new backend, the frontend `state` back to
/// Initialising so that neither side connects through stale ring keys, the new backend
/// directory from the same declaration) and the directory of the device's old backend side,
/// to remove.
pub fn restart_plans(
    disks: &[BootDisk],
    name: &str,
    old: DomId,
    new: DomId,
    id_of: impl Fn(&str) -> Option<DomId>,
) -> Vec<(DiskPlan, String)> {
    let mut out = Vec::new();
    for d in disks {
        let (fe, be, old_fe, old_be) = if d.backend == name {
            let Some(fe) = id_of(&d.frontend) else {
                continue;
            };
            (fe, new, fe, old)
        } else if d.frontend == name {
            let Some(be) = id_of(&d.backend) else {
                continue;
            };
            (new, be, old, be)
        } else {
            continue;
        };
        let (Some(plan), Some(stale)) = (disk_plan(fe, be, d), disk_plan(old_fe, old_be, d)) else {
            continue;
        };
        let [_, old_dir] = stale.dirs;
        out.push((plan, old_dir.0));
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
        assert_eq!(p.dirs[0].0, "/local/domain/4/device/vbd/51712");
        assert_eq!(p.dirs[0].1, ["n4".to_string(), "r3".to_string()]);
        assert_eq!(p.dirs[1].0, "/local/domain/3/backend/vbd/4/51712");
        assert_eq!(p.dirs[1].1, ["n3".to_string(), "r4".to_string()]);
        let get = |k: &str| {
            p.entries
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
            p.entries
                .iter()
                .all(|(k, _)| k.starts_with(&p.dirs[0].0) || k.starts_with(&p.dirs[1].0))
        );
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
        assert_eq!(p.dirs[1].0, "/local/domain/7/backend/vbd/4/51712");
        assert_eq!(p.dirs[0].1, ["n4".to_string(), "r7".to_string()]);
        let get = |k: &str| {
            p.entries
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
        assert_eq!(plans[0].0.dirs[0].0, "/local/domain/9/device/vbd/51712");
        // Unrelated names, unknown peers: nothing.
        assert!(restart_plans(&d, "nobody", 1, 2, ids).is_empty());
        assert!(restart_plans(&d, "blk2", 5, 8, |_| None).is_empty());
    }
}
