//! Grant-table tests over a fake physical memory: every status code, the map lifecycle,
//! granter and mapper deaths, copies, and guests racing on the entry.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::domid::DOMID_SELF;
use shared_abi::grant_table::{
    GntStatus, GnttabCopy, GnttabCopyPtr, GnttabMapGrantRef, GrantRef, gntcopy, gntmap, gtf,
};
use spin::Mutex;

use super::map::{map_grant_ref, teardown_mapper, unmap_grant_ref};
use super::*;

// ---- fake physical memory ----

#[derive(Debug)]
struct Frame {
    data: Vec<u8>,
    refs: u32,
    owner_alive: bool,
    freed: bool,
}

#[derive(Default)]
struct FakeMem {
    frames: Mutex<BTreeMap<Mfn, Frame>>,
    p2m: Mutex<BTreeMap<(DomId, u64), Mfn>>,
}

impl FakeMem {
    fn give(&self, dom: DomId, gfn: u64, mfn: Mfn) {
        self.frames.lock().insert(
            mfn,
            Frame {
                data: vec![0; 4096],
                refs: 0,
                owner_alive: true,
                freed: false,
            },
        );
        self.p2m.lock().insert((dom, gfn), mfn);
    }

    fn kill(&self, dom: DomId) {
        let mut p2m = self.p2m.lock();
        let mine: Vec<Mfn> = p2m
            .iter()
            .filter(|((d, _), _)| *d == dom)
            .map(|(_, m)| *m)
            .collect();
        p2m.retain(|(d, _), _| *d != dom);
        let mut frames = self.frames.lock();
        for m in mine {
            if let Some(f) = frames.get_mut(&m) {
                f.owner_alive = false;
                f.freed = f.refs == 0;
            }
        }
    }

    fn freed(&self, mfn: Mfn) -> bool {
        self.frames.lock()[&mfn].freed
    }

    fn refs(&self, mfn: Mfn) -> u32 {
        self.frames.lock()[&mfn].refs
    }

    fn write(&self, mfn: Mfn, off: usize, data: &[u8]) {
        self.frames.lock().get_mut(&mfn).unwrap().data[off..off + data.len()].copy_from_slice(data);
    }

    fn read(&self, mfn: Mfn, off: usize, len: usize) -> Vec<u8> {
        self.frames.lock()[&mfn].data[off..off + len].to_vec()
    }
}

impl GrantMemory for FakeMem {
    fn frame_of(&self, dom: DomId, gfn: u64) -> Option<Mfn> {
        self.p2m.lock().get(&(dom, gfn)).copied()
    }
    fn pin(&self, frame: Mfn) -> bool {
        match self.frames.lock().get_mut(&frame) {
            Some(f) if !f.freed => {
                f.refs += 1;
                true
            }
            _ => false,
        }
    }
    fn unpin(&self, frame: Mfn) {
        if let Some(f) = self.frames.lock().get_mut(&frame) {
            f.refs -= 1;
            if f.refs == 0 && !f.owner_alive {
                f.freed = true;
            }
        }
    }
    fn copy(&self, src: Mfn, src_off: usize, dst: Mfn, dst_off: usize, len: usize) -> bool {
        let mut frames = self.frames.lock();
        let Some(data) = frames
            .get(&src)
            .map(|f| f.data[src_off..src_off + len].to_vec())
        else {
            return false;
        };
        match frames.get_mut(&dst) {
            Some(f) => {
                f.data[dst_off..dst_off + len].copy_from_slice(&data);
                true
            }
            None => false,
        }
    }
}

// ---- registry ----

struct Reg {
    doms: BTreeMap<DomId, Mutex<DomainGrants<Arc<InMemoryEntries>>>>,
    entries: BTreeMap<DomId, Arc<InMemoryEntries>>,
}

impl GrantRegistry for Reg {
    type Entries = Arc<InMemoryEntries>;
    fn grants(&self, dom: DomId) -> Option<&Mutex<DomainGrants<Arc<InMemoryEntries>>>> {
        self.doms.get(&dom)
    }
}

impl Reg {
    fn new(doms: &[DomId]) -> Self {
        let mut r = Reg {
            doms: BTreeMap::new(),
            entries: BTreeMap::new(),
        };
        for &d in doms {
            r.add(d, 0, 4);
        }
        r
    }

    fn add(&mut self, d: DomId, instance: u64, max_maps: u32) {
        let e = Arc::new(InMemoryEntries::new(32));
        self.entries.insert(d, e.clone());
        self.doms
            .insert(d, Mutex::new(DomainGrants::new(d, instance, e, max_maps)));
    }

    fn e(&self, d: DomId) -> &InMemoryEntries {
        &self.entries[&d]
    }
}

/// Granter 1 (guest, frames gfn 0x10.. → mfn 100..), mapper 2 (backend with GRANT_MAP),
/// 3 (another guest without it).
fn setup() -> (Reg, FakeMem) {
    let reg = Reg::new(&[1, 2, 3]);
    let mem = FakeMem::default();
    for i in 0..4u64 {
        mem.give(1, 0x10 + i, 100 + i);
        mem.give(2, 0x20 + i, 200 + i);
        mem.give(3, 0x30 + i, 300 + i);
    }
    (reg, mem)
}

fn caps(d: DomId) -> Capabilities {
    if d == 2 {
        Capabilities::GRANT_MAP
    } else {
        Capabilities::empty()
    }
}

fn policy() -> CapabilityPolicy<fn(DomId) -> Capabilities> {
    CapabilityPolicy { caps }
}

fn map_op(dom: DomId, gref: GrantRef, readonly: bool) -> GnttabMapGrantRef {
    GnttabMapGrantRef {
        host_addr: 0x9000,
        flags: gntmap::HOST_MAP | if readonly { gntmap::READONLY } else { 0 },
        gref,
        dom,
        ..Default::default()
    }
}

#[test]
fn grant_readonly_map_refuse_write_revoke_busy_unmap_then_revoke() {
    let (reg, mem) = setup();
    reg.e(1).grant(8, 2, 0x10, true);
    let m = map_grant_ref(&reg, 2, &map_op(1, 8, true), &mem, &policy()).unwrap();
    assert_eq!((m.frame, m.readonly, m.host_addr), (100, true, 0x9000));
    assert_eq!(reg.e(1).flags(8) & gtf::READING, gtf::READING);
    assert_eq!(mem.refs(100), 1);
    // A writable map of a read-only grant is refused (Xen: general error).
    assert_eq!(
        map_grant_ref(&reg, 2, &map_op(1, 8, false), &mem, &policy()),
        Err(GntStatus::GeneralError)
    );
    // The granter tries to revoke: busy.
    assert!(!reg.e(1).end_access(8));
    unmap_grant_ref(&reg, 2, m.handle, 0x9000, &mem).unwrap();
    assert_eq!(reg.e(1).flags(8) & (gtf::READING | gtf::WRITING), 0);
    assert_eq!(mem.refs(100), 0);
    assert!(reg.e(1).end_access(8));
    // Revoked: mapping again fails.
    assert_eq!(
        map_grant_ref(&reg, 2, &map_op(1, 8, true), &mem, &policy()),
        Err(GntStatus::GeneralError)
    );
}

#[test]
fn writable_map_sets_writing_and_pins_count() {
    let (reg, mem) = setup();
    reg.e(1).grant(9, 2, 0x11, false);
    let ro = map_grant_ref(&reg, 2, &map_op(1, 9, true), &mem, &policy()).unwrap();
    let rw = map_grant_ref(&reg, 2, &map_op(1, 9, false), &mem, &policy()).unwrap();
    assert_ne!(ro.handle, rw.handle);
    assert_eq!(
        reg.e(1).flags(9) & (gtf::READING | gtf::WRITING),
        gtf::READING | gtf::WRITING
    );
    assert_eq!(mem.refs(101), 2);
    unmap_grant_ref(&reg, 2, rw.handle, 0, &mem).unwrap();
    assert_eq!(
        reg.e(1).flags(9) & (gtf::READING | gtf::WRITING),
        gtf::READING
    );
    unmap_grant_ref(&reg, 2, ro.handle, 0, &mem).unwrap();
    assert_eq!(reg.e(1).flags(9) & (gtf::READING | gtf::WRITING), 0);
    assert_eq!(reg.doms[&1].lock().table.nr_active(), 0);
}

#[test]
fn granter_dies_while_mapped_frame_stays_pinned_until_unmap() {
    let (mut reg, mem) = setup();
    reg.e(1).grant(8, 2, 0x10, false);
    let m = map_grant_ref(&reg, 2, &map_op(1, 8, false), &mem, &policy()).unwrap();
    // Granter 1 dies: its grant state goes, its memory is released.
    reg.doms.remove(&1);
    mem.kill(1);
    assert!(!mem.freed(100), "mapped frame freed while still mapped");
    // A new domain reuses domid 1 and grants ref 8 too; the stale unmap must not touch it.
    reg.add(1, 1, 4);
    mem.give(1, 0x10, 150);
    reg.e(1).grant(8, 2, 0x10, true);
    let fresh = map_grant_ref(&reg, 2, &map_op(1, 8, true), &mem, &policy()).unwrap();
    unmap_grant_ref(&reg, 2, m.handle, 0, &mem).unwrap();
    assert!(mem.freed(100), "frame not freed after the last unmap");
    assert_eq!(reg.e(1).flags(8) & gtf::READING, gtf::READING);
    unmap_grant_ref(&reg, 2, fresh.handle, 0, &mem).unwrap();
    assert_eq!(reg.e(1).flags(8) & gtf::READING, 0);
}

#[test]
fn mapper_dies_its_mappings_are_torn_down() {
    let (reg, mem) = setup();
    reg.e(1).grant(8, 2, 0x10, false);
    reg.e(1).grant(10, 2, 0x12, true);
    map_grant_ref(&reg, 2, &map_op(1, 8, false), &mem, &policy()).unwrap();
    map_grant_ref(&reg, 2, &map_op(1, 10, true), &mem, &policy()).unwrap();
    let gone = teardown_mapper(&reg, 2, &mem);
    assert_eq!(gone.len(), 2);
    assert_eq!(mem.refs(100) + mem.refs(102), 0);
    assert!(reg.e(1).end_access(8) && reg.e(1).end_access(10));
    assert_eq!(reg.doms[&2].lock().maptrack.in_use(), 0);
    assert!(teardown_mapper(&reg, 9, &mem).is_empty());
}

#[test]
fn map_status_codes() {
    let (reg, mem) = setup();
    reg.e(1).grant(8, 2, 0x10, false);
    reg.e(1).grant(11, 3, 0x10, false);
    reg.e(1).grant(12, 2, 0x99, false); // not the granter's memory
    let p = policy();
    let mut op = map_op(1, 8, false);
    op.flags = gntmap::READONLY;
    assert_eq!(
        map_grant_ref(&reg, 2, &op, &mem, &p),
        Err(GntStatus::BadGntref)
    );
    assert_eq!(
        map_grant_ref(&reg, 2, &map_op(7, 8, false), &mem, &p),
        Err(GntStatus::BadDomain)
    );
    // Domain 3 lacks GRANT_MAP.
    assert_eq!(
        map_grant_ref(&reg, 3, &map_op(1, 11, false), &mem, &p),
        Err(GntStatus::PermissionDenied)
    );
    assert_eq!(
        map_grant_ref(&reg, 2, &map_op(1, 32, false), &mem, &p),
        Err(GntStatus::BadGntref)
    );
    assert_eq!(
        map_grant_ref(&reg, 2, &map_op(1, u32::MAX, false), &mem, &p),
        Err(GntStatus::BadGntref)
    );
    // Granted to someone else, or not granted at all.
    assert_eq!(
        map_grant_ref(&reg, 2, &map_op(1, 11, false), &mem, &p),
        Err(GntStatus::GeneralError)
    );
    assert_eq!(
        map_grant_ref(&reg, 2, &map_op(1, 13, false), &mem, &p),
        Err(GntStatus::GeneralError)
    );
    assert_eq!(
        map_grant_ref(&reg, 2, &map_op(1, 12, false), &mem, &p),
        Err(GntStatus::BadPage)
    );
    // The failed BadPage map left no pin behind.
    assert_eq!(reg.e(1).flags(12) & gtf::READING, 0);
    // Maptrack quota of 4.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            map_grant_ref(&reg, 2, &map_op(1, 8, true), &mem, &p)
                .unwrap()
                .handle
        })
        .collect();
    assert_eq!(
        map_grant_ref(&reg, 2, &map_op(1, 8, true), &mem, &p),
        Err(GntStatus::NoSpace)
    );
    // Unmap errors: unknown handle, wrong address.
    assert_eq!(
        unmap_grant_ref(&reg, 2, 77, 0, &mem),
        Err(GntStatus::BadHandle)
    );
    assert_eq!(
        unmap_grant_ref(&reg, 2, handles[0], 0x1234_5000, &mem),
        Err(GntStatus::GeneralError)
    );
    unmap_grant_ref(&reg, 2, handles[0], 0x9000, &mem).unwrap();
    assert_eq!(
        unmap_grant_ref(&reg, 2, handles[0], 0, &mem),
        Err(GntStatus::BadHandle)
    );
}

#[test]
fn map_own_grant_with_domid_self() {
    let (reg, mem) = setup();
    reg.e(2).grant(8, 2, 0x20, false);
    let m = map_grant_ref(&reg, 2, &map_op(DOMID_SELF, 8, false), &mem, &policy()).unwrap();
    assert_eq!(m.frame, 200);
}

fn copy_op(source: GnttabCopyPtr, dest: GnttabCopyPtr, len: u16, flags: u16) -> GnttabCopy {
    GnttabCopy {
        source,
        dest,
        len,
        flags,
        status: 0,
    }
}

fn gref(dom: DomId, r: u64, offset: u16) -> GnttabCopyPtr {
    GnttabCopyPtr {
        u: r,
        domid: dom,
        offset,
    }
}

#[test]
fn copy_from_guest_grant_to_own_frame_and_back() {
    let (reg, mem) = setup();
    let p = policy();
    // netback tx: frontend (1) grants a read-only packet page to the backend (2).
    reg.e(1).grant(8, 2, 0x10, true);
    mem.write(100, 100, b"packet");
    let op = copy_op(
        gref(1, 8, 100),
        gref(DOMID_SELF, 0x20, 4),
        6,
        gntcopy::SOURCE_GREF,
    );
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::Okay);
    assert_eq!(mem.read(200, 4, 6), b"packet");
    // Pins are released after the copy.
    assert_eq!(reg.e(1).flags(8) & gtf::READING, 0);
    assert_eq!(mem.refs(100) + mem.refs(200), 0);
    // netback rx: own frame → a writable grant.
    reg.e(1).grant(9, 2, 0x11, false);
    let op = copy_op(
        gref(DOMID_SELF, 0x20, 4),
        gref(1, 9, 0),
        6,
        gntcopy::DEST_GREF,
    );
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::Okay);
    assert_eq!(mem.read(101, 0, 6), b"packet");
    // Copy between two grants; domain 3 (no GRANT_MAP) may copy what it was granted.
    reg.e(1).grant(14, 3, 0x10, true);
    reg.e(2).grant(15, 3, 0x21, false);
    let op = copy_op(
        gref(1, 14, 100),
        gref(2, 15, 0),
        6,
        gntcopy::SOURCE_GREF | gntcopy::DEST_GREF,
    );
    assert_eq!(copy::copy(&reg, 3, &op, &mem, &p), GntStatus::Okay);
    assert_eq!(mem.read(201, 0, 6), b"packet");
}

#[test]
fn copy_status_codes() {
    let (reg, mem) = setup();
    let p = policy();
    reg.e(1).grant(8, 2, 0x10, true);
    let own = gref(DOMID_SELF, 0x20, 0);
    let src = |r: u64| gref(1, r, 0);
    let sg = gntcopy::SOURCE_GREF;
    // Beyond the page on either side.
    let mut op = copy_op(gref(1, 8, 4000), own, 200, sg);
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::BadCopyArg);
    op = copy_op(src(8), gref(DOMID_SELF, 0x20, 4096), 1, sg);
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::BadCopyArg);
    // A whole page at offset 0 is fine.
    op = copy_op(src(8), own, 4096, sg);
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::Okay);
    // Frame side not DOMID_SELF (even the caller's own numeric id).
    op = copy_op(src(8), gref(2, 0x20, 0), 8, sg);
    assert_eq!(
        copy::copy(&reg, 2, &op, &mem, &p),
        GntStatus::PermissionDenied
    );
    // Unknown granter, ref out of range / beyond u32, not granted to us.
    op = copy_op(gref(9, 8, 0), own, 8, sg);
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::BadDomain);
    op = copy_op(src(40), own, 8, sg);
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::BadGntref);
    op = copy_op(src(1 << 40), own, 8, sg);
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::BadGntref);
    op = copy_op(src(8), own, 8, sg);
    assert_eq!(copy::copy(&reg, 3, &op, &mem, &p), GntStatus::GeneralError);
    // Destination grant is read-only.
    reg.e(1).grant(9, 2, 0x11, true);
    op = copy_op(own, gref(1, 9, 0), 8, gntcopy::DEST_GREF);
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::GeneralError);
    // Own frame that does not exist.
    op = copy_op(src(8), gref(DOMID_SELF, 0x999, 0), 8, sg);
    assert_eq!(copy::copy(&reg, 2, &op, &mem, &p), GntStatus::BadPage);
    // A failed destination released the source pin.
    assert_eq!(reg.e(1).flags(8) & gtf::READING, 0);
    assert_eq!(mem.refs(100), 0);
    // Policy refusal.
    struct NoCopy;
    impl GrantPolicy for NoCopy {
        fn may_map(&self, _: DomId, _: DomId) -> bool {
            true
        }
        fn may_copy(&self, _: DomId, _: DomId) -> bool {
            false
        }
    }
    op = copy_op(src(8), own, 8, sg);
    assert_eq!(
        copy::copy(&reg, 2, &op, &mem, &NoCopy),
        GntStatus::PermissionDenied
    );
}

/// Entries whose guest rewrites the header word between our read and our compare-exchange,
/// `races` times.
struct Racing {
    inner: InMemoryEntries,
    races: Cell<u32>,
}

impl GrantEntries for Racing {
    fn nr_entries(&self) -> u32 {
        self.inner.nr_entries()
    }
    fn load_header(&self, gref: GrantRef) -> u32 {
        self.inner.load_header(gref)
    }
    fn compare_exchange_header(&self, gref: GrantRef, current: u32, new: u32) -> Result<u32, u32> {
        if self.races.get() > 0 {
            self.races.set(self.races.get() - 1);
            // The guest flips a cache-attribute bit: same grant, different word.
            let flipped = self.inner.load_header(gref) ^ u32::from(gtf::PWT);
            let _ = self
                .inner
                .compare_exchange_header(gref, self.inner.load_header(gref), flipped);
            return self.inner.compare_exchange_header(gref, !flipped, new);
        }
        self.inner.compare_exchange_header(gref, current, new)
    }
    fn clear_flags(&self, gref: GrantRef, bits: u16) {
        self.inner.clear_flags(gref, bits)
    }
    fn load_frame(&self, gref: GrantRef) -> u32 {
        self.inner.load_frame(gref)
    }
}

#[test]
fn racing_guest_entry_is_retried_then_declared_unstable() {
    let racing = Racing {
        inner: InMemoryEntries::new(16),
        races: Cell::new(2),
    };
    racing.inner.grant(8, 2, 0x10, false);
    let mut t = GrantTable::new(1, racing);
    // Two races, then success: the flags the guest set survive, plus READING|WRITING.
    assert_eq!(t.pin(8, 2, false), Ok(0x10));
    assert_eq!(
        t.entries().inner.flags(8) & (gtf::READING | gtf::WRITING),
        gtf::READING | gtf::WRITING
    );
    // A guest that never stops: general error, nothing pinned.
    t.entries().inner.grant(9, 2, 0x11, true);
    t.entries().races.set(100);
    assert_eq!(t.pin(9, 2, true), Err(GntStatus::GeneralError));
    assert!(t.active(9).is_none());
}

#[test]
fn revoke_racing_with_map_never_loses_the_busy_bits() {
    // The guest's revoke (cmpxchg flags → 0 when idle) against our pin (cmpxchg adding
    // READING): whichever wins, either the map fails or the revoke does.
    let (reg, mem) = setup();
    for gref in 8..16 {
        reg.e(1).grant(gref, 2, 0x10, true);
        let entries = reg.entries[&1].clone();
        let t = std::thread::spawn(move || entries.end_access(gref));
        let mapped = map_grant_ref(&reg, 2, &map_op(1, gref, true), &mem, &policy());
        let revoked = t.join().unwrap();
        assert!(
            mapped.is_ok() != revoked,
            "ref {gref}: mapped {mapped:?}, revoked {revoked}"
        );
        if let Ok(m) = mapped {
            unmap_grant_ref(&reg, 2, m.handle, 0, &mem).unwrap();
        }
    }
}
