//! Where a Xen toolstack puts things in xenstore: the per-domain nodes and the frontend /
//! backend pairs of each device (`/local/domain/<fe>/device/<type>/<devid>` and
//! `/local/domain/<be>/backend/<type>/<fe>/<devid>`), both starting in xenbus state 1
//! (Initialising). Pure functions, so the layout is tested without a store.

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

fn kind(dev: &DeviceInfo) -> (&'static str, u32) {
    match dev {
        DeviceInfo::Disk { devid, .. } => ("vbd", *devid),
        DeviceInfo::Vif { devid, .. } => ("vif", *devid),
    }
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
