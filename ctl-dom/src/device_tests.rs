//! Devices of run-time domains against the fake platform: xenstore permissions (what the
//! guest and its backends may read and write), attach validation with nothing half-written,
//! the detach handshake (a cooperating guest, a refusing one, `force`), and `maxmem`.

use alloc::collections::BTreeMap;

use super::*;
use crate::boot_devices::{disk_plan, parse_disks};
use crate::fake::{FAKE_KERNEL, FakePlatform, Release, guest_config};
use crate::xenstore_layout::device_plan;
use shared_abi::domain_config::{DiskAccess, DiskSpec, VifSpec};
use shared_abi::mgmt::{DEFAULT_DETACH_TIMEOUT_MS, MAX_DETACH_TIMEOUT_MS};

/// Boot domains of the fake: blkback and netback.
const BLKBACK: DomId = 2;
const NETBACK: DomId = 3;

type Ts = Toolstack<FakePlatform>;

fn disk(vdev: &str) -> DiskSpec {
    DiskSpec {
        target: format!("vol-{vdev}"),
        vdev: vdev.into(),
        access: DiskAccess::ReadWrite,
        backend: None,
    }
}

fn vif() -> VifSpec {
    VifSpec {
        mac: None,
        ip: None,
        rate_bytes_per_sec: None,
        backend: None,
    }
}

/// A guest with one disk (xvda) and one vif.
fn guest(t: &mut Ts, name: &str) -> DomId {
    t.create_fake(guest_config(name)).unwrap()
}

type Snapshot = (BTreeMap<String, String>, BTreeMap<String, Vec<String>>);

fn snapshot(t: &Ts) -> Snapshot {
    (t.platform.store.clone(), t.platform.perms.clone())
}

fn attach_disk(t: &mut Ts, dom: DomainRef, d: DiskSpec) -> Result<Reply, MgmtError> {
    t.handle(RequestBody::BlockAttach { dom, disk: d })
}

fn detach_disk(
    t: &mut Ts,
    id: DomId,
    vdev: &str,
    timeout_ms: u32,
    force: bool,
) -> Result<Reply, MgmtError> {
    t.handle(RequestBody::BlockDetach {
        dom: DomainRef::Id(id),
        vdev: vdev.into(),
        timeout_ms,
        force,
    })
}

fn field(r: &Result<Reply, MgmtError>) -> &str {
    match r {
        Err(MgmtError::InvalidConfig(e)) => &e.field,
        r => panic!("expected an invalid-config error, got {r:?}"),
    }
}

fn perms(t: &Ts, path: &str) -> Vec<String> {
    t.platform
        .perms_of(path)
        .unwrap_or_else(|| panic!("no node {path}"))
}

#[test]
fn a_created_guest_reads_its_home_and_writes_only_its_own_corners() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    let home = format!("/local/domain/{id}");
    let p = &mut t.platform;
    assert_eq!(perms_of(p, &home), ["n0".to_string(), format!("r{id}")]);
    assert_eq!(
        p.guest_read(id, &format!("{home}/name")).as_deref(),
        Ok("web")
    );
    assert_eq!(
        p.guest_read(id, &format!("{home}/memory/target"))
            .as_deref(),
        Ok("16384")
    );
    // What the toolstack says is not the guest's to rewrite.
    assert_eq!(
        p.guest_write(id, &format!("{home}/name"), "evil"),
        Err(XenError::EACCES)
    );
    assert_eq!(
        p.guest_write(id, &format!("{home}/new"), "x"),
        Err(XenError::EACCES)
    );
    // Its writable corners (libxl's rwperm).
    for w in [
        "data/x",
        "control/shutdown",
        "control/feature-poweroff",
        "error/device/vbd/51712/error",
    ] {
        assert_eq!(
            p.guest_write(id, &format!("{home}/{w}"), "1"),
            Ok(()),
            "{w}"
        );
    }
    // Another domain sees none of it.
    assert_eq!(
        p.guest_read(NETBACK, &format!("{home}/name")),
        Err(XenError::EACCES)
    );
    assert_eq!(
        p.guest_read(NETBACK, &format!("{home}/data/x")),
        Err(XenError::EACCES)
    );
}

#[test]
fn a_guest_writes_its_frontend_state_and_its_backend_reads_it() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    let f = format!("/local/domain/{id}/device/vbd/51712");
    let b = format!("/local/domain/{BLKBACK}/backend/vbd/{id}/51712");
    assert_eq!(perms(&t, &f), [format!("n{id}"), format!("r{BLKBACK}")]);
    assert_eq!(perms(&t, &b), [format!("n{BLKBACK}"), format!("r{id}")]);
    let p = &mut t.platform;
    // The frontend enumerates its devices, connects, writes its ring keys.
    assert_eq!(
        p.guest_read(id, &format!("/local/domain/{id}/device/vbd")),
        Ok(String::new())
    );
    assert_eq!(p.guest_write(id, &format!("{f}/state"), "3"), Ok(()));
    assert_eq!(p.guest_write(id, &format!("{f}/ring-ref"), "8"), Ok(()));
    assert_eq!(
        p.guest_read(id, &format!("{b}/params")).as_deref(),
        Ok("vol0")
    );
    assert_eq!(
        p.guest_write(id, &format!("{b}/state"), "4"),
        Err(XenError::EACCES)
    );
    // The backend reads what the frontend wrote, answers in its own directory.
    assert_eq!(
        p.guest_read(BLKBACK, &format!("{f}/ring-ref")).as_deref(),
        Ok("8")
    );
    assert_eq!(p.guest_write(BLKBACK, &format!("{b}/state"), "4"), Ok(()));
    assert_eq!(
        p.guest_write(BLKBACK, &format!("{f}/state"), "6"),
        Err(XenError::EACCES)
    );
    assert_eq!(
        p.guest_read(BLKBACK, &format!("/local/domain/{id}/name")),
        Err(XenError::EACCES)
    );
    // Each side's type marker.
    assert_eq!(
        p.store.get(&format!("{f}/device-type")).map(String::as_str),
        Some("disk")
    );
    assert_eq!(
        p.store.get(&format!("{b}/type")).map(String::as_str),
        Some("phy")
    );
    let v = format!("/local/domain/{NETBACK}/backend/vif/{id}/0");
    assert_eq!(
        p.store.get(&format!("{v}/type")).map(String::as_str),
        Some("vif")
    );
    assert_eq!(
        p.guest_write(id, &format!("/local/domain/{id}/device/vif/0/state"), "4"),
        Ok(())
    );
}

#[test]
fn boot_and_run_time_devices_share_one_plan() {
    let d = parse_disks("disk=guest:blkback:xvdb:rw").unwrap();
    let info = DeviceInfo::Disk {
        devid: 51728,
        spec: DiskSpec {
            target: "ram:xvdb".into(),
            vdev: "xvdb".into(),
            access: DiskAccess::ReadWrite,
            backend: Some("blkback".into()),
        },
    };
    assert_eq!(disk_plan(5, 2, &d[0]), Some(device_plan(5, 2, &info)));
}

#[test]
fn hotplugged_disk_is_writable_by_its_guest_and_detach_leaves_nothing() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    let before = snapshot(&t);
    let r = attach_disk(&mut t, DomainRef::Name("web".into()), disk("xvdb"));
    assert_eq!(r, Ok(Reply::Attached { devid: 51728 }));
    let f = format!("/local/domain/{id}/device/vbd/51728");
    assert_eq!(
        t.platform.guest_write(id, &format!("{f}/state"), "4"),
        Ok(())
    );
    assert_eq!(
        t.platform
            .guest_read(BLKBACK, &format!("{f}/state"))
            .as_deref(),
        Ok("4")
    );
    assert_eq!(t.devices_of(id).len(), 3);
    // The guest and its backend close when asked.
    assert_eq!(
        detach_disk(&mut t, id, "xvdb", 3000, false),
        Ok(Reply::Done)
    );
    assert!(t.platform.clock_ms > 0, "the handshake was waited for");
    let said = t.platform.logged.last().cloned().unwrap_or_default();
    assert_eq!(
        said,
        format!("domain {id}: xvdb released (backend Closed) after 10 ms")
    );
    assert_eq!(snapshot(&t), before);
    assert_eq!(t.devices_of(id).len(), 2);
    // Again: a retry of an attach after a detach works.
    assert_eq!(
        attach_disk(&mut t, DomainRef::Id(id), disk("xvdb")),
        Ok(Reply::Attached { devid: 51728 })
    );
}

#[test]
fn a_backend_that_removes_its_directory_completes_the_detach() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    let before = snapshot(&t);
    attach_disk(&mut t, DomainRef::Id(id), disk("xvdc")).unwrap();
    t.platform.release = Release::BackendRemoves;
    assert_eq!(
        detach_disk(&mut t, id, "xvdc", 1000, false),
        Ok(Reply::Done)
    );
    assert_eq!(snapshot(&t), before);
}

#[test]
fn a_guest_that_does_not_release_times_out_and_keeps_the_device() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    attach_disk(&mut t, DomainRef::Id(id), disk("xvdb")).unwrap();
    let f = format!("/local/domain/{id}/device/vbd/51728");
    let b = format!("/local/domain/{BLKBACK}/backend/vbd/{id}/51728");
    t.platform
        .guest_write(id, &format!("{f}/state"), "4")
        .unwrap();
    t.platform
        .guest_write(BLKBACK, &format!("{b}/state"), "4")
        .unwrap();
    t.platform.release = Release::Refuse;
    let attached = snapshot(&t);
    let r = detach_disk(&mut t, id, "xvdb", 3000, false);
    let Err(e @ MgmtError::DetachTimedOut { .. }) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(
        *e,
        MgmtError::DetachTimedOut {
            dom: DomainRef::Id(id),
            device: "xvdb".into(),
            waited_ms: 3000,
            frontend_state: Some(4),
            backend_state: Some(5),
        }
    );
    assert_eq!(
        e.to_string(),
        format!(
            "domain {id} did not release xvdb within 3 s (frontend state 4 Connected, backend 5 Closing); it stays attached; --force removes it anyway"
        )
    );
    assert_eq!(t.platform.clock_ms, 3000, "waited the timeout, no longer");
    assert!(
        t.platform
            .logged
            .last()
            .is_some_and(|l| l.contains("block-detach: domain") && l.contains("did not release")),
        "{:?}",
        t.platform.logged
    );
    // Still attached, recorded, and the backend as it was (online, Connected).
    assert_eq!(snapshot(&t), attached);
    assert_eq!(t.devices_of(id).len(), 3);
    // A retry once the guest cooperates succeeds; so would --force.
    t.platform.release = Release::Cooperate;
    assert_eq!(
        detach_disk(&mut t, id, "xvdb", 3000, false),
        Ok(Reply::Done)
    );
    assert_eq!(t.devices_of(id).len(), 2);
}

#[test]
fn force_removes_at_once_without_asking() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    let before = snapshot(&t);
    attach_disk(&mut t, DomainRef::Id(id), disk("xvdb")).unwrap();
    t.platform.release = Release::Refuse;
    // A timeout is not looked at with force.
    assert_eq!(detach_disk(&mut t, id, "xvdb", 0, true), Ok(Reply::Done));
    assert_eq!(t.platform.clock_ms, 0, "no wait");
    assert_eq!(snapshot(&t), before);
    // The last disk and the vif: their parents in the guest's home go too.
    assert_eq!(detach_disk(&mut t, id, "xvda", 0, true), Ok(Reply::Done));
    let r = t.handle(RequestBody::NetworkDetach {
        dom: DomainRef::Id(id),
        devid: 0,
        timeout_ms: 0,
        force: true,
    });
    assert_eq!(r, Ok(Reply::Done));
    let me = format!("/{id}/");
    let left: Vec<&String> = t
        .platform
        .store
        .keys()
        .filter(|k| k.contains("/backend/") && k.contains(&me))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        !t.platform
            .store
            .contains_key(&format!("/local/domain/{id}/device/vbd"))
    );
    assert!(
        t.platform
            .store
            .contains_key(&format!("/local/domain/{id}/device"))
    );
}

#[test]
fn a_guest_that_died_meanwhile_does_not_hold_its_device() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    t.platform.release = Release::Refuse;
    t.platform.shutdown(id, shutdown::CRASH).unwrap();
    assert_eq!(
        detach_disk(&mut t, id, "xvda", 3000, false),
        Ok(Reply::Done)
    );
    assert_eq!(t.platform.clock_ms, 0);
}

#[test]
fn detach_refuses_bad_requests_and_changes_nothing() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    let before = snapshot(&t);
    let r = detach_disk(&mut t, 99, "xvda", 1000, false);
    assert!(
        matches!(r, Err(MgmtError::UnknownDomain(DomainRef::Id(99)))),
        "{r:?}"
    );
    let r = detach_disk(&mut t, id, "xvdz", 1000, false);
    assert_eq!(
        r,
        Err(MgmtError::NoSuchDevice {
            dom: DomainRef::Id(id),
            device: "xvdz".into()
        })
    );
    let r = t.handle(RequestBody::NetworkDetach {
        dom: DomainRef::Id(id),
        devid: 7,
        timeout_ms: 1000,
        force: false,
    });
    assert!(
        matches!(&r, Err(MgmtError::NoSuchDevice { device, .. }) if device == "vif 7"),
        "{r:?}"
    );
    // A boot domain's devices are the manifest's.
    let r = detach_disk(&mut t, BLKBACK, "xvda", 1000, true);
    assert!(
        matches!(&r, Err(MgmtError::RefusedByPolicy { operation, .. }) if operation == "block-detach"),
        "{r:?}"
    );
    for bad in [0, MAX_DETACH_TIMEOUT_MS + 1] {
        let r = detach_disk(&mut t, id, "xvda", bad, false);
        assert_eq!(field(&r), "timeout", "{bad}");
    }
    assert_eq!(snapshot(&t), before);
    assert_eq!(t.devices_of(id).len(), 2);
    assert_eq!(t.platform.clock_ms, 0);
}

#[test]
fn attach_validates_each_field_and_writes_nothing_when_refused() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    let _other = guest(&mut t, "other");
    let before = snapshot(&t);
    let web = || DomainRef::Name("web".into());
    let r = attach_disk(&mut t, DomainRef::Name("ghost".into()), disk("xvdb"));
    assert!(matches!(r, Err(MgmtError::UnknownDomain(_))), "{r:?}");
    let r = attach_disk(&mut t, DomainRef::Id(BLKBACK), disk("xvdb"));
    assert!(matches!(r, Err(MgmtError::RefusedByPolicy { .. })), "{r:?}");
    assert_eq!(field(&attach_disk(&mut t, web(), disk("sda"))), "disk.vdev");
    let r = attach_disk(&mut t, web(), disk("xvda"));
    assert_eq!(field(&r), "disk.vdev");
    assert!(format!("{:?}", r).contains("in use: xvda"), "{r:?}");
    let mut d = disk("xvdb");
    d.target = String::new();
    assert_eq!(field(&attach_disk(&mut t, web(), d)), "disk.target");
    let mut d = disk("xvdb");
    d.backend = Some("nosuch".into());
    assert_eq!(field(&attach_disk(&mut t, web(), d)), "disk.backend");
    let mut d = disk("xvdb");
    d.backend = Some("web".into());
    assert_eq!(field(&attach_disk(&mut t, web(), d)), "disk.backend");
    // Someone else's nodes already there: not overwritten.
    t.platform
        .xs_write(&format!("/local/domain/{id}/device/vbd/51728/state"), "4")
        .unwrap();
    let taken = snapshot(&t);
    assert_eq!(
        field(&attach_disk(&mut t, web(), disk("xvdb"))),
        "disk.vdev"
    );
    assert_eq!(snapshot(&t), taken);
    t.platform
        .xs_rm(&format!("/local/domain/{id}/device/vbd/51728"))
        .unwrap();
    // Vifs: a multicast MAC, another domain's MAC.
    let mut v = vif();
    v.mac = Some([0x01, 0, 0, 0, 0, 1]);
    let r = t.handle(RequestBody::NetworkAttach { dom: web(), vif: v });
    assert_eq!(field(&r), "vif.mac");
    let mut v = vif();
    v.mac = Some(xenstore_layout::default_mac(_other, 0));
    let r = t.handle(RequestBody::NetworkAttach { dom: web(), vif: v });
    assert_eq!(field(&r), "vif.mac");
    assert!(
        format!("{r:?}").contains(&format!("domain {_other} has it")),
        "{r:?}"
    );
    let mut v = vif();
    v.backend = Some("blkback-typo".into());
    let r = t.handle(RequestBody::NetworkAttach { dom: web(), vif: v });
    assert_eq!(field(&r), "vif.backend");
    assert_eq!(snapshot(&t), before);
    assert_eq!(t.devices_of(id).len(), 2);
}

#[test]
fn an_attach_that_fails_halfway_is_removed_again() {
    let mut t = Ts::fake();
    let id = guest(&mut t, "web");
    let before = snapshot(&t);
    t.platform.fail_xs_write_after = Some(4);
    let r = attach_disk(&mut t, DomainRef::Id(id), disk("xvdb"));
    assert!(matches!(r, Err(MgmtError::Hypervisor { .. })), "{r:?}");
    t.platform.fail_xs_write_after = None;
    assert_eq!(snapshot(&t), before);
    assert_eq!(t.devices_of(id).len(), 2);
    // The vif's next devid and its default MAC.
    let r = t.handle(RequestBody::NetworkAttach {
        dom: DomainRef::Id(id),
        vif: vif(),
    });
    assert_eq!(r, Ok(Reply::Attached { devid: 1 }));
    let mac = t
        .platform
        .store
        .get(&format!("/local/domain/{NETBACK}/backend/vif/{id}/1/mac"))
        .cloned();
    assert_eq!(
        mac,
        Some(crate::boot_devices::mac_text(xenstore_layout::default_mac(
            id, 1
        )))
    );
    let r = t.handle(RequestBody::NetworkDetach {
        dom: DomainRef::Id(id),
        devid: 1,
        timeout_ms: DEFAULT_DETACH_TIMEOUT_MS,
        force: false,
    });
    assert_eq!(r, Ok(Reply::Done));
    assert_eq!(snapshot(&t), before);
}

#[test]
fn destroy_after_hotplug_leaves_no_node_of_the_domain() {
    let mut t = Ts::fake();
    let before = snapshot(&t);
    let id = guest(&mut t, "web");
    attach_disk(&mut t, DomainRef::Id(id), disk("xvdb")).unwrap();
    t.handle(RequestBody::NetworkAttach {
        dom: DomainRef::Id(id),
        vif: vif(),
    })
    .unwrap();
    t.handle(RequestBody::Destroy(DomainRef::Id(id))).unwrap();
    // Only the backends' base directories (`backend`, `backend/<type>`) stay.
    let (store, perms) = snapshot(&t);
    let new: Vec<&String> = store
        .keys()
        .filter(|k| !before.0.contains_key(*k))
        .collect();
    for k in &new {
        assert!(
            k.ends_with("/backend") || k.ends_with("/backend/vbd") || k.ends_with("/backend/vif"),
            "{k}"
        );
    }
    assert_eq!(perms.len(), store.len());
}

#[test]
fn maxmem_is_the_hypervisor_limit_after_building_with_memory() {
    let mut t = Ts::fake();
    let mut c = DomainConfig::new("big", 16384);
    c.maxmem_kib = 65536;
    let domid = t.create_fake(c.clone()).unwrap();
    let Ok(Reply::Domains(ds)) = t.handle(RequestBody::List) else {
        panic!()
    };
    let d = ds.iter().find(|d| d.domid == domid).unwrap();
    assert_eq!((d.memory_kib, d.maxmem_kib), (16384, 65536));
    assert_eq!(
        t.platform
            .store
            .get(&format!("/local/domain/{domid}/memory/static-max"))
            .map(String::as_str),
        Some("65536")
    );
    // mem-set may go up to maxmem, not beyond.
    let r = t.handle(RequestBody::MemSet {
        dom: DomainRef::Id(domid),
        kib: 65536,
    });
    assert_eq!(r, Ok(Reply::Done));
    let r = t.handle(RequestBody::MemSet {
        dom: DomainRef::Id(domid),
        kib: 65540,
    });
    assert_eq!(field(&r), "memory");
    // Below memory: refused before building.
    let mut small = c.clone();
    small.name = "small".into();
    small.maxmem_kib = 8192;
    let r = t.handle(RequestBody::Create {
        config: small,
        kernel: FAKE_KERNEL.to_vec(),
    });
    assert_eq!(field(&r), "maxmem");
    // The hypervisor refusing the limit: nothing built.
    let before = snapshot(&t);
    let n = t.platform.domains.len();
    t.platform.fail_max_memory = Some(XenError::EINVAL);
    let mut other = c;
    other.name = "other".into();
    let r = t.handle(RequestBody::Create {
        config: other,
        kernel: FAKE_KERNEL.to_vec(),
    });
    assert!(
        matches!(&r, Err(MgmtError::Hypervisor { operation, .. }) if operation == "create: maxmem"),
        "{r:?}"
    );
    assert_eq!(t.platform.domains.len(), n);
    assert_eq!(snapshot(&t), before);
}

fn perms_of(p: &FakePlatform, path: &str) -> Vec<String> {
    p.perms_of(path).unwrap_or_default()
}

#[test]
fn a_detached_device_does_not_come_back_on_restart() {
    let mut t = Ts::fake();
    let mut c = DomainConfig::new("svc", 16384);
    c.disks.push(disk("xvda"));
    c.vifs.push(vif());
    c.vifs.push(vif());
    c.on_crash = LifecycleAction::Restart;
    let domid = t.create_fake(c).unwrap();
    attach_disk(&mut t, DomainRef::Id(domid), disk("xvdb")).unwrap();
    for devid in [0, 1] {
        let r = t.handle(RequestBody::NetworkDetach {
            dom: DomainRef::Id(domid),
            devid,
            timeout_ms: 1000,
            force: false,
        });
        assert_eq!(r, Ok(Reply::Done), "vif {devid}");
    }
    assert_eq!(
        detach_disk(&mut t, domid, "xvda", 1000, false),
        Ok(Reply::Done)
    );
    let DeathOutcome::Restarted { new_domid } = t.domain_died(domid, shutdown::CRASH) else {
        panic!()
    };
    // Only the hot-plugged xvdb, on the new domain.
    let devs = t.devices_of(new_domid);
    assert!(
        matches!(devs.as_slice(), [DeviceInfo::Disk { devid: 51728, .. }]),
        "{devs:?}"
    );
}
