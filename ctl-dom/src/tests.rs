//! Engine tests against the fake platform.

use super::*;
use crate::fake::{FakePlatform, guest_config};
use shared_abi::domain_config::{DiskAccess, DiskSpec};
use shared_abi::mgmt::{self, Request, Response};

#[test]
fn create_builds_introduces_and_wires_devices() {
    let mut t = Toolstack::fake();
    let id = t.create_fake(guest_config("web")).unwrap();
    let p = &t.platform;
    assert!(p.domains.contains_key(&id));
    assert_eq!(p.introduced, vec![id]);
    assert_eq!(
        p.store.get(&format!("/local/domain/{id}/name")).unwrap(),
        "web"
    );
    assert_eq!(
        p.store
            .get(&format!("/local/domain/{id}/device/vbd/51712/backend-id"))
            .unwrap(),
        "2"
    );
    assert_eq!(
        p.store
            .get(&format!("/local/domain/3/backend/vif/{id}/0/frontend-id"))
            .unwrap(),
        &id.to_string()
    );
    assert!(
        p.store
            .contains_key(&format!("/local/domain/{id}/device/vif/0/mac"))
    );
}

#[test]
fn destroy_removes_domain_and_every_xenstore_entry() {
    let mut t = Toolstack::fake();
    let id = t.create_fake(guest_config("web")).unwrap();
    t.handle(RequestBody::Destroy(DomainRef::Name("web".into())))
        .unwrap();
    assert!(!t.platform.domains.contains_key(&id));
    let me = format!("/{id}");
    assert!(
        t.platform.store.keys().all(|k| !k.contains(&me)),
        "{:?}",
        t.platform.store
    );
    assert!(t.platform.introduced.is_empty());
}

#[test]
fn forbidden_capability_is_refused_by_policy_and_nothing_built() {
    let mut t = Toolstack::fake();
    let before = t.platform.store.clone();
    let mut c = guest_config("evil");
    c.capabilities = Capabilities::DOMAIN_CONTROL;
    let e = t.create_fake(c).unwrap_err();
    assert!(matches!(e, MgmtError::RefusedByPolicy { .. }), "{e:?}");
    assert_eq!(t.platform.domains.len(), 4);
    assert_eq!(t.platform.store, before);
}

#[test]
fn invalid_config_is_revalidated_and_refused_before_building() {
    let mut t = Toolstack::fake();
    let mut c = guest_config("x");
    c.vcpus = 0;
    let e = t.create_fake(c).unwrap_err();
    assert!(
        matches!(&e, MgmtError::InvalidConfig(ce) if ce.field == "vcpus"),
        "{e:?}"
    );
    assert_eq!(t.platform.domains.len(), 4);
}

#[test]
fn missing_backend_is_named_and_nothing_built() {
    let mut t = Toolstack::fake();
    let mut c = guest_config("x");
    c.disks[0].backend = Some("nosuch".into());
    let e = t.create_fake(c).unwrap_err();
    assert!(
        matches!(&e, MgmtError::InvalidConfig(ce) if ce.field == "disk[0].backend"),
        "{e:?}"
    );
    assert_eq!(t.platform.domains.len(), 4);
}

#[test]
fn duplicate_name_is_refused() {
    let mut t = Toolstack::fake();
    t.create_fake(guest_config("web")).unwrap();
    assert_eq!(
        t.create_fake(guest_config("web")),
        Err(MgmtError::NameInUse("web".into()))
    );
}

#[test]
fn builder_refusal_is_a_hypervisor_error_with_errno() {
    let mut t = Toolstack::fake();
    let e = t
        .handle(RequestBody::Create {
            config: guest_config("x"),
            kernel: b"MZ".to_vec(),
        })
        .unwrap_err();
    assert_eq!(
        e,
        MgmtError::Hypervisor {
            operation: "create".into(),
            errno: XenError::ENOEXEC.errno()
        }
    );
}

#[test]
fn failed_xenstore_wiring_destroys_the_half_built_domain() {
    let mut t = Toolstack::fake();
    t.platform.fail_xs_write = Some(XenError::ENOSPC);
    let e = t.create_fake(guest_config("x")).unwrap_err();
    assert!(matches!(e, MgmtError::Hypervisor { .. }));
    assert_eq!(t.platform.domains.len(), 4, "half-built domain destroyed");
    assert!(t.managed_ids().is_empty());
    assert!(t.platform.introduced.is_empty());
}

#[test]
fn unknown_domain_is_typed() {
    let mut t = Toolstack::fake();
    for body in [
        RequestBody::Destroy(DomainRef::Id(99)),
        RequestBody::Info(DomainRef::Name("ghost".into())),
        RequestBody::Pause(DomainRef::Id(99)),
    ] {
        assert!(matches!(t.handle(body), Err(MgmtError::UnknownDomain(_))));
    }
}

#[test]
fn shutdown_asks_a_guest_that_advertises_it_and_stops_any_other_through_the_hypervisor() {
    let mut t = Toolstack::fake();
    let asks = t.create_fake(guest_config("pv")).unwrap();
    let mute = t.create_fake(guest_config("mute")).unwrap();
    let control = |id: DomId| format!("/local/domain/{id}/control");
    t.platform
        .store
        .insert(format!("{}/feature-poweroff", control(asks)), "1".into());
    // Only exactly "1" counts: the guest owns the node.
    t.platform
        .store
        .insert(format!("{}/feature-reboot", control(asks)), "yes".into());
    t.platform
        .store
        .insert(format!("{}/feature-poweroff", control(mute)), "0".into());
    let shut = |dom: DomId, force| RequestBody::Shutdown {
        dom: DomainRef::Id(dom),
        force,
    };

    assert_eq!(
        t.handle(shut(asks, false)),
        Ok(Reply::ShutdownSent(ShutdownPath::Xenstore))
    );
    assert_eq!(
        t.platform.store.get(&format!("{}/shutdown", control(asks))),
        Some(&"poweroff".to_string())
    );
    assert!(t.platform.shutdowns.is_empty(), "asked, not stopped");
    assert!(
        !matches!(t.platform.domains[&asks].state, RunState::Shutdown(_)),
        "it stops itself"
    );

    assert_eq!(
        t.handle(shut(mute, false)),
        Ok(Reply::ShutdownSent(ShutdownPath::Hypervisor))
    );
    // Its control/shutdown stays as the home plan made it (empty).
    assert_eq!(
        t.platform
            .store
            .get(&format!("{}/shutdown", control(mute)))
            .map(String::as_str),
        Some("")
    );
    // Reboot is its own feature; force skips the question.
    assert_eq!(
        t.handle(RequestBody::Reboot {
            dom: DomainRef::Name("pv".into()),
            force: false,
        }),
        Ok(Reply::ShutdownSent(ShutdownPath::Hypervisor))
    );
    assert_eq!(
        t.platform.shutdowns,
        vec![(mute, shutdown::POWEROFF), (asks, shutdown::REBOOT)]
    );
    let other = t.create_fake(guest_config("other")).unwrap();
    t.platform
        .store
        .insert(format!("{}/feature-poweroff", control(other)), "1".into());
    assert_eq!(
        t.handle(shut(other, true)),
        Ok(Reply::ShutdownSent(ShutdownPath::Hypervisor))
    );
    assert_eq!(
        t.platform.shutdowns.last(),
        Some(&(other, shutdown::POWEROFF))
    );
}

#[test]
fn shutdown_of_a_stopped_domain_or_through_a_failing_store_is_an_error() {
    let mut t = Toolstack::fake();
    let mut c = guest_config("kept");
    c.on_crash = LifecycleAction::Preserve;
    let kept = t.create_fake(c).unwrap();
    assert_eq!(
        t.domain_died(kept, shutdown::CRASH),
        DeathOutcome::Preserved
    );
    let e = t.handle(RequestBody::Shutdown {
        dom: DomainRef::Id(kept),
        force: false,
    });
    assert!(matches!(e, Err(MgmtError::WrongState { .. })), "{e:?}");

    let pv = t.create_fake(guest_config("pv")).unwrap();
    t.platform.store.insert(
        format!("/local/domain/{pv}/control/feature-poweroff"),
        "1".into(),
    );
    t.platform.fail_xs_write = Some(XenError::EACCES);
    let e = t.handle(RequestBody::Shutdown {
        dom: DomainRef::Id(pv),
        force: false,
    });
    assert!(matches!(e, Err(MgmtError::Hypervisor { .. })), "{e:?}");
    assert!(t.platform.shutdowns.is_empty());
}

#[test]
fn on_crash_restart_rebuilds_with_same_config_and_counts() {
    let mut t = Toolstack::fake();
    let mut c = guest_config("svc");
    c.on_crash = LifecycleAction::Restart;
    let id = t.create_fake(c).unwrap();
    let out = t.domain_died(id, shutdown::CRASH);
    let DeathOutcome::Restarted { new_domid } = out else {
        panic!("{out:?}")
    };
    assert_ne!(new_domid, id);
    assert!(!t.platform.domains.contains_key(&id));
    match t
        .handle(RequestBody::Info(DomainRef::Name("svc".into())))
        .unwrap()
    {
        Reply::Info(d) => {
            assert_eq!(d.summary.domid, new_domid);
            assert_eq!(d.restarts, 1);
            assert_eq!(d.devices.len(), 2);
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn on_crash_destroy_and_preserve() {
    let mut t = Toolstack::fake();
    let mut c = guest_config("a");
    c.on_crash = LifecycleAction::Destroy;
    let a = t.create_fake(c).unwrap();
    assert_eq!(t.domain_died(a, shutdown::CRASH), DeathOutcome::Destroyed);
    assert!(!t.platform.domains.contains_key(&a));

    let mut c = guest_config("b");
    c.on_crash = LifecycleAction::Preserve;
    let b = t.create_fake(c).unwrap();
    assert_eq!(t.domain_died(b, shutdown::CRASH), DeathOutcome::Preserved);
    match t.handle(RequestBody::List).unwrap() {
        Reply::Domains(ds) => {
            let d = ds.iter().find(|d| d.domid == b).unwrap();
            assert_eq!(d.state, RunState::Preserved);
        }
        r => panic!("{r:?}"),
    }
    t.handle(RequestBody::Destroy(DomainRef::Id(b))).unwrap();
    assert!(!t.platform.domains.contains_key(&b));
}

#[test]
fn poweroff_uses_on_poweroff_not_on_crash() {
    let mut t = Toolstack::fake();
    let mut c = guest_config("a");
    c.on_crash = LifecycleAction::Restart;
    let a = t.create_fake(c).unwrap();
    assert_eq!(
        t.domain_died(a, shutdown::POWEROFF),
        DeathOutcome::Destroyed
    );
    assert_eq!(t.domain_died(1, shutdown::CRASH), DeathOutcome::NotManaged);
}

#[test]
fn restart_that_fails_leaves_nothing_behind() {
    let mut t = Toolstack::fake();
    let mut c = guest_config("a");
    c.on_crash = LifecycleAction::Restart;
    let a = t.create_fake(c).unwrap();
    t.platform.fail_create = Some(XenError::ENOMEM);
    assert_eq!(
        t.domain_died(a, shutdown::CRASH),
        DeathOutcome::RestartFailed(XenError::ENOMEM)
    );
    assert_eq!(t.platform.domains.len(), 4);
}

#[test]
fn sched_credit_and_mem_set_check_ranges() {
    let mut t = Toolstack::fake();
    let id = t.create_fake(guest_config("a")).unwrap();
    let r = t.handle(RequestBody::SchedCredit {
        dom: DomainRef::Id(id),
        weight: Some(512),
        cap_percent: None,
    });
    assert_eq!(
        r,
        Ok(Reply::Sched {
            weight: 512,
            cap_percent: 0
        })
    );
    let e = t
        .handle(RequestBody::SchedCredit {
            dom: DomainRef::Id(id),
            weight: None,
            cap_percent: Some(200),
        })
        .unwrap_err();
    assert!(matches!(&e, MgmtError::InvalidConfig(c) if c.field == "cap"));
    let e = t
        .handle(RequestBody::MemSet {
            dom: DomainRef::Id(id),
            kib: 1 << 30,
        })
        .unwrap_err();
    assert!(matches!(&e, MgmtError::InvalidConfig(c) if c.field == "memory"));
}

#[test]
fn block_attach_and_detach_round_trip() {
    let mut t = Toolstack::fake();
    let id = t.create_fake(guest_config("a")).unwrap();
    let disk = DiskSpec {
        target: "vol1".into(),
        vdev: "xvdb".into(),
        access: DiskAccess::ReadOnly,
        backend: None,
    };
    let r = t.handle(RequestBody::BlockAttach {
        dom: DomainRef::Id(id),
        disk: disk.clone(),
    });
    assert_eq!(r, Ok(Reply::Attached { devid: 51728 }));
    let again = t.handle(RequestBody::BlockAttach {
        dom: DomainRef::Id(id),
        disk,
    });
    assert!(
        matches!(again, Err(MgmtError::InvalidConfig(_))),
        "duplicate vdev"
    );
    t.handle(RequestBody::BlockDetach {
        dom: DomainRef::Id(id),
        vdev: "xvdb".into(),
        timeout_ms: mgmt::DEFAULT_DETACH_TIMEOUT_MS,
        force: false,
    })
    .unwrap();
    assert!(
        !t.platform
            .store
            .contains_key(&format!("/local/domain/{id}/device/vbd/51728/state"))
    );
    let e = t.handle(RequestBody::BlockDetach {
        dom: DomainRef::Id(id),
        vdev: "xvdb".into(),
        timeout_ms: mgmt::DEFAULT_DETACH_TIMEOUT_MS,
        force: false,
    });
    assert!(matches!(e, Err(MgmtError::NoSuchDevice { .. })));
}

#[test]
fn server_answers_each_request_with_its_id_and_bad_frames_with_id_zero() {
    let mut s = Server::new(FakePlatform::with_boot_domains());
    let mut input = mgmt::encode_request(&Request {
        id: 41,
        body: RequestBody::List,
    })
    .unwrap();
    let mut bad = mgmt::encode_request(&Request {
        id: 42,
        body: RequestBody::List,
    })
    .unwrap();
    bad[4] = 9; // another protocol version
    input.extend(bad);
    let out = s.receive(&input);
    let mut d = mgmt::FrameDecoder::new();
    d.push(&out);
    let mut resps: Vec<Response> = Vec::new();
    while let Some(f) = d.next_frame() {
        resps.push(mgmt::decode_response(&f.unwrap()).unwrap());
    }
    assert_eq!(resps.len(), 2);
    assert_eq!(resps[0].id, 41);
    assert!(matches!(resps[0].result, Ok(Reply::Domains(ref v)) if v.len() == 4));
    assert_eq!(resps[1].id, 0);
    assert!(matches!(
        resps[1].result,
        Err(MgmtError::VersionMismatch { got: 9, .. })
    ));
}

/// `CreateDeflated`: the kernel inflated to exactly its declared length reaches the builder;
/// anything else is a bad request and builds nothing.
#[test]
fn a_deflated_kernel_is_inflated_and_checked_before_the_build() {
    let kernel: Vec<u8> = b"\x7fELF"
        .iter()
        .copied()
        .chain((0..5000u32).map(|i| (i % 7) as u8))
        .collect();
    let deflated = miniz_oxide::deflate::compress_to_vec(&kernel, 6);
    assert!(deflated.len() < kernel.len());
    let len = kernel.len() as u32;
    let mut t = Toolstack::fake();
    let r = t.handle(RequestBody::CreateDeflated {
        config: DomainConfig::new("packed", 16384),
        kernel_deflated: deflated.clone(),
        kernel_len: len,
    });
    let Ok(Reply::Created { domid }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        t.managed.get(&domid).map(|m| m.kernel.clone()),
        Some(kernel)
    );

    let mut corrupt = deflated.clone();
    corrupt.truncate(deflated.len() / 2);
    let mut garbage = deflated.clone();
    garbage[0] ^= 0xff;
    for (data, kernel_len) in [
        (corrupt, len),
        (garbage, len),
        (deflated.clone(), len - 1),
        (deflated.clone(), len + 1),
        (deflated.clone(), 0),
        (deflated, (mgmt::MAX_PAYLOAD + 1) as u32),
    ] {
        let before = t.platform.domains.len();
        let r = t.handle(RequestBody::CreateDeflated {
            config: DomainConfig::new("bad", 16384),
            kernel_deflated: data,
            kernel_len,
        });
        assert!(
            matches!(r, Err(MgmtError::BadRequest(_))),
            "{kernel_len}: {r:?}"
        );
        assert_eq!(t.platform.domains.len(), before, "nothing built");
    }
}
