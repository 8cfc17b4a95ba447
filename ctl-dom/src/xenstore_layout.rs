//! Where a Xen toolstack puts things in xenstore: the per-domain nodes and the frontend /
//! backend pairs of each device (`/local/domain/<fe>/device/<type>/<devid>` and
//! `/local/domain/<be>/backend/<type>/<fe>/<devid>`), both starting in xenbus state 1
//! (Initialising). Pure functions, so the layout is tested without a store.
//!
//! What is written comes as an [`XsPlan`]: directories with the permissions libxl gives them
//! (created and given their permissions first, so every node a privileged writer creates
//! below inherits them — xenstore-dom's rule, as Xen's), then the nodes.
//!
//! - A device ([`device_plan`], the one plan for boot devices and run-time ones): frontend
//!   dir `[n<fe>, r<be>]` (the guest owns it: it writes its `state`, ring refs, event
//!   channels), backend dir `[n<be>, r<fe>]`; `device-type` on both sides of a disk, the
//!   backend's `type` (`phy`, `vif`).
//! - A domain's home ([`home_plan`], libxl's `libxl__domain_make`): `/local/domain/<id>`,
//!   `device` and `control` `[n0, r<id>]` (the domain reads what the toolstack says, cannot
//!   rewrite it), and owned by the domain: `control/shutdown` and `control/feature-*`,
//!   `data`, `drivers`, `feature`, `attr`, `error` (where a guest writes).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::domain_config::{DiskAccess, DomainConfig, MacFmt};
use shared_abi::mgmt::DeviceInfo;

/// xenbus `XenbusStateInitialising`.
const INITIALISING: &str = "1";

/// Xen's virtual-device number for `xvd<letters>`: the 202 major with 16 minors per disk for
/// the first 16 disks, the extended form `1<<28 | index<<8` beyond.
pub fn vbd_devid(vdev: &str) -> Option<u32> {
    let letters = vdev.strip_prefix("xvd")?;
    if letters.is_empty() || letters.len() > 3 || !letters.bytes().all(|c| c.is_ascii_lowercase()) {
        return None;
    }
    // Bijective base 26: a=0, z=25, aa=26.
    let mut index: u32 = 0;
    for c in letters.bytes() {
        index = index * 26 + u32::from(c - b'a') + 1;
    }
    let index = index - 1;
    Some(if index < 16 {
        (202 << 8) | (index << 4)
    } else {
        (1 << 28) | (index << 8)
    })
}

/// A locally administered-looking MAC in Xen's OUI 00:16:3e, unique per (domain, vif).
pub fn default_mac(domid: DomId, devid: u32) -> [u8; 6] {
    let [hi, lo] = domid.to_be_bytes();
    [0x00, 0x16, 0x3e, hi & 0x7f, lo, devid as u8]
}

/// The domain's own nodes.
pub fn domain_entries(domid: DomId, c: &DomainConfig) -> Vec<(String, String)> {
    let base = format!("/local/domain/{domid}");
    vec![
        (format!("{base}/name"), c.name.clone()),
        (format!("{base}/domid"), domid.to_string()),
        (format!("{base}/memory/target"), c.memory_kib.to_string()),
        (
            format!("{base}/memory/static-max"),
            c.maxmem_kib.to_string(),
        ),
        (format!("{base}/cpu/nr"), c.vcpus.to_string()),
    ]
}

/// Directories to create with their permissions (Xen's string form, owner first), in order,
/// then nodes to write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XsPlan {
    pub dirs: Vec<(String, Vec<String>)>,
    pub entries: Vec<(String, String)>,
}

/// What writing one device (a disk or a vif) takes: `xs.dirs` are the frontend directory
/// then the backend directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    pub devid: u32,
    pub xs: XsPlan,
}

impl DevicePlan {
    /// The frontend directory.
    pub fn frontend_dir(&self) -> &str {
        self.xs.dirs.first().map_or("", |d| d.0.as_str())
    }
    /// The backend directory.
    pub fn backend_dir(&self) -> &str {
        self.xs.dirs.get(1).map_or("", |d| d.0.as_str())
    }
}

/// The plan for device `dev` of domain `fe` served by domain `be`: its two directories with
/// libxl's permissions and every node ([`device_entries`] plus `device-type` / `type`).
pub fn device_plan(fe: DomId, be: DomId, dev: &DeviceInfo) -> DevicePlan {
    let [f, b] = device_paths(fe, be, dev);
    let mut entries = device_entries(fe, be, dev);
    let devid = match dev {
        DeviceInfo::Disk { devid, .. } => {
            entries.push((format!("{f}/device-type"), "disk".to_string()));
            entries.push((format!("{b}/device-type"), "disk".to_string()));
            entries.push((format!("{b}/type"), "phy".to_string()));
            *devid
        }
        DeviceInfo::Vif { devid, .. } => {
            entries.push((format!("{b}/type"), "vif".to_string()));
            *devid
        }
    };
    DevicePlan {
        devid,
        xs: XsPlan {
            dirs: vec![
                (f, vec![format!("n{fe}"), format!("r{be}")]),
                (b, vec![format!("n{be}"), format!("r{fe}")]),
            ],
            entries,
        },
    }
}

/// The directories under a domain's home that the domain itself owns (libxl's `rwperm`).
pub const GUEST_WRITABLE: [&str; 9] = [
    "control/shutdown",
    "control/feature-poweroff",
    "control/feature-reboot",
    "control/feature-suspend",
    "data",
    "drivers",
    "feature",
    "attr",
    "error",
];

/// A domain's home (`libxl__domain_make`): readable by the domain, its writable corners
/// owned by it, and its own nodes ([`domain_entries`]).
pub fn home_plan(domid: DomId, c: &DomainConfig) -> XsPlan {
    let base = format!("/local/domain/{domid}");
    let ro = || vec!["n0".to_string(), format!("r{domid}")];
    let mut dirs = vec![
        (base.clone(), ro()),
        (format!("{base}/device"), ro()),
        (format!("{base}/control"), ro()),
    ];
    for d in GUEST_WRITABLE {
        dirs.push((format!("{base}/{d}"), vec![format!("n{domid}")]));
    }
    XsPlan {
        dirs,
        entries: domain_entries(domid, c),
    }
}

fn kind(dev: &DeviceInfo) -> (&'static str, u32) {
    match dev {
        DeviceInfo::Disk { devid, .. } => ("vbd", *devid),
        DeviceInfo::Vif { devid, .. } => ("vif", *devid),
    }
}

/// The xenstore name of a device's kind: `vbd` or `vif`.
pub fn kind_name(dev: &DeviceInfo) -> &'static str {
    kind(dev).0
}

/// Frontend directory and backend directory of a device.
pub fn device_paths(fe: DomId, be: DomId, dev: &DeviceInfo) -> [String; 2] {
    let (k, id) = kind(dev);
    [
        format!("/local/domain/{fe}/device/{k}/{id}"),
        format!("/local/domain/{be}/backend/{k}/{fe}/{id}"),
    ]
}

/// Every node a device needs, frontend side then backend side.
pub fn device_entries(fe: DomId, be: DomId, dev: &DeviceInfo) -> Vec<(String, String)> {
    let [f, b] = device_paths(fe, be, dev);
    let mut out = vec![
        (format!("{f}/backend"), b.clone()),
        (format!("{f}/backend-id"), be.to_string()),
        (format!("{f}/state"), INITIALISING.to_string()),
        (format!("{b}/frontend"), f.clone()),
        (format!("{b}/frontend-id"), fe.to_string()),
        (format!("{b}/online"), "1".to_string()),
        (format!("{b}/state"), INITIALISING.to_string()),
    ];
    match dev {
        DeviceInfo::Disk { devid, spec } => {
            out.push((format!("{f}/virtual-device"), devid.to_string()));
            out.push((format!("{b}/params"), spec.target.clone()));
            out.push((format!("{b}/dev"), spec.vdev.clone()));
            let mode = if spec.access == DiskAccess::ReadOnly {
                "r"
            } else {
                "w"
            };
            out.push((format!("{b}/mode"), mode.to_string()));
        }
        DeviceInfo::Vif { devid, spec } => {
            out.push((format!("{f}/handle"), devid.to_string()));
            out.push((format!("{b}/handle"), devid.to_string()));
            if let Some(m) = spec.mac {
                let mac = format!("{}", MacFmt(m));
                out.push((format!("{f}/mac"), mac.clone()));
                out.push((format!("{b}/mac"), mac));
            }
            if let Some(ip) = spec.ip {
                out.push((
                    format!("{b}/ip"),
                    format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]),
                ));
            }
            if let Some(r) = spec.rate_bytes_per_sec {
                // Xen's netback reads "bytes,usec": credit per 50 ms window.
                out.push((format!("{b}/rate"), format!("{},50000", r / 20)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vbd_devid_matches_xens_numbering() {
        assert_eq!(vbd_devid("xvda"), Some(51712));
        assert_eq!(vbd_devid("xvdb"), Some(51728));
        assert_eq!(vbd_devid("xvdp"), Some(51712 + 15 * 16));
        assert_eq!(vbd_devid("xvdq"), Some((1 << 28) | (16 << 8)));
        assert_eq!(vbd_devid("xvdaa"), Some((1 << 28) | (26 << 8)));
        assert_eq!(vbd_devid("sda"), None);
        assert_eq!(vbd_devid("xvd"), None);
    }

    #[test]
    fn device_entries_point_frontend_and_backend_at_each_other() {
        let dev = DeviceInfo::Disk {
            devid: 51712,
            spec: shared_abi::domain_config::DiskSpec {
                target: "vol".into(),
                vdev: "xvda".into(),
                access: DiskAccess::ReadOnly,
                backend: None,
            },
        };
        let e = device_entries(5, 2, &dev);
        let get = |k: &str| e.iter().find(|(p, _)| p == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("/local/domain/5/device/vbd/51712/backend"),
            Some("/local/domain/2/backend/vbd/5/51712")
        );
        assert_eq!(
            get("/local/domain/2/backend/vbd/5/51712/frontend"),
            Some("/local/domain/5/device/vbd/51712")
        );
        assert_eq!(get("/local/domain/2/backend/vbd/5/51712/mode"), Some("r"));
        assert_eq!(get("/local/domain/5/device/vbd/51712/state"), Some("1"));
    }
}
