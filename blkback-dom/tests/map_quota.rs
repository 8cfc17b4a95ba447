//! The backend domain's one maptrack quota shared by its frontends: a frontend's persistent
//! pool never starves another's I/O, and a map refused for quota makes a request wait, never
//! fail.
#![allow(clippy::unwrap_used)]

mod common;

use blkback_dom::device::RamDisk;
use blkback_dom::engine::{VbdConfig, persistent_budget, persistent_share};
use common::*;
use shared_abi::blkif::{op, rsp};

const OTHER: shared_abi::DomId = FRONT + 1;

fn cfg(frontend: shared_abi::DomId) -> VbdConfig {
    let mut c = VbdConfig::new(frontend);
    c.max_indirect_segments = 256;
    c
}

#[test]
fn budget_is_half_the_quota_shared_evenly() {
    assert_eq!(persistent_budget(1024), 512);
    assert_eq!(persistent_share(512, 2), 256);
    assert_eq!(persistent_share(512, 0), 512);
}

/// The bug this fixes: two frontends with Linux's persistent pools (1056 per ring) against a
/// quota of 1024 mappings. Frontend A fills a large pool; B's writes used to get
/// `BLKIF_RSP_ERROR`. With the domain's budget shared, every request of both succeeds.
#[test]
fn a_full_persistent_pool_of_one_frontend_does_not_starve_another() {
    let quota = 96;
    let mut h = Harness::new(cfg(FRONT), common::ram(4096), 1, 0);
    h.grants.set_quota(quota);
    // A reads 1 MiB-ish through 80 distinct pages, twice: all kept persistent.
    let a_segs = h.read_segments(0, 80 * 8);
    for chunk in a_segs.chunks(11) {
        h.rw(0, 0, op::READ, 0, chunk);
    }
    h.service(0).unwrap();
    assert!(h.responses(0, 0).iter().all(|r| r.status == rsp::OKAY));
    assert_eq!(h.disks[0].vbd.persistent_total(), 80);

    // B connects: the domain rebalances the budget over both devices' queues.
    let b = h.add_disk(cfg(OTHER), common::ram(4096), 1, 0);
    let share = persistent_share(persistent_budget(quota), 2);
    for d in 0..2 {
        let disk = &mut h.disks[d];
        disk.vbd.set_persistent_limit(share, &mut h.grants);
    }
    assert!(h.disks[0].vbd.persistent_total() <= share);
    let evicted = h.disks[0].vbd.stats().persistent_evictions;
    assert_eq!(evicted, 80 - share as u64);

    // B writes 40 pages of pattern in 11-segment requests; every one OKAY, data on its disk.
    let data = pattern(40 * 4096, 7);
    let mut ids = Vec::new();
    for (i, chunk) in data.chunks(11 * 4096).enumerate() {
        ids.push(h.write(b, 0, (i * 11 * 8) as u64, chunk));
    }
    h.service(b).unwrap();
    let rsps = h.responses(b, 0);
    assert_eq!(rsps.len(), ids.len());
    assert!(rsps.iter().all(|r| r.status == rsp::OKAY), "{rsps:?}");
    assert_eq!(
        &h.disks[b].vbd.io().device().bytes()[..data.len()],
        &data[..]
    );
    // A goes on, too.
    h.rw(0, 0, op::READ, 0, &a_segs[..11]);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    assert!(h.grants.live_mappings() <= quota);
}

/// Quota used up by requests in flight: a further request is parked (no response, no
/// error) and goes through once completions give mappings back.
#[test]
fn a_request_out_of_quota_waits_for_completions_instead_of_failing() {
    let mut c = cfg(FRONT);
    c.persistent = false;
    let mut h = Harness::new(c, DeferredIo::new(RamDisk::new(1024, 512).unwrap()), 1, 0);
    h.grants.set_quota(11);
    // A read holds its 11 mappings until the device completes it.
    let first = h.read_segments(0, 88);
    let id1 = h.rw(0, 0, op::READ, 0, &first);
    let second = h.read_segments(0, 16);
    let id2 = h.rw(0, 0, op::READ, 88, &second);
    h.service(0).unwrap();
    assert!(
        h.responses(0, 0).is_empty(),
        "nothing answered yet, nothing refused"
    );
    assert_eq!(h.vbd().inflight(), 1);
    assert!(h.vbd().stats().map_waits >= 1);
    assert!(h.grants.no_space >= 1);

    h.disks[0].vbd.io_mut().complete(0);
    h.service(0).unwrap();
    let r = h.responses(0, 0);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].id, r[0].status), (id1, rsp::OKAY));
    assert_eq!(
        h.vbd().inflight(),
        1,
        "the parked read is on the device now"
    );
    h.disks[0].vbd.io_mut().complete(0);
    h.service(0).unwrap();
    let r = h.responses(0, 0);
    assert_eq!((r[0].id, r[0].status), (id2, rsp::OKAY));
    assert_eq!(h.grants.live_mappings(), 0);
}

/// An indirect request whose indirect page cannot be mapped yet waits as well.
#[test]
fn an_indirect_request_out_of_quota_waits_too() {
    let mut c = cfg(FRONT);
    c.persistent = false;
    let mut h = Harness::new(c, DeferredIo::new(RamDisk::new(1024, 512).unwrap()), 1, 0);
    h.grants.set_quota(11);
    let first = h.read_segments(0, 88);
    let id1 = h.rw(0, 0, op::READ, 0, &first);
    let segs = h.read_segments(0, 64);
    let id2 = h.indirect(0, 0, op::READ, 100, &segs);
    h.service(0).unwrap();
    assert!(h.responses(0, 0).is_empty());
    h.disks[0].vbd.io_mut().complete(0);
    h.service(0).unwrap();
    h.disks[0].vbd.io_mut().complete(0);
    h.service(0).unwrap();
    let r = h.responses(0, 0);
    let got: Vec<_> = r.iter().map(|r| (r.id, r.status)).collect();
    assert_eq!(got, [(id1, rsp::OKAY), (id2, rsp::OKAY)]);
}

/// Under pressure a device gives up its own idle persistent mappings before waiting.
#[test]
fn map_pressure_evicts_idle_persistent_mappings_of_the_same_device() {
    let mut h = Harness::new(cfg(FRONT), common::ram(1024), 1, 0);
    h.grants.set_quota(16);
    let a = h.read_segments(0, 80);
    h.rw(0, 0, op::READ, 0, &a);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    assert_eq!(h.vbd().persistent_total(), 10);
    let b = h.read_segments(0, 80);
    h.rw(0, 0, op::READ, 0, &b);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    assert!(h.vbd().stats().persistent_evictions >= 4);
    assert!(h.grants.live_mappings() <= 16);
}
