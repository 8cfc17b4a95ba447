//! The roles (see the crate documentation).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use dom_rt::event::Waiter;
use dom_rt::gnttab::{self, GrantError, GrantTable, MapWindow};
use dom_rt::{StartInfo, XenError, evtchn, hypercall, println};
use shared_abi::DomId;
use shared_abi::domid::DOMID_SELF;
use shared_abi::event_channel::{StatusInfo, virq};
use shared_abi::grant_table::{GntStatus, GnttabCopy, GnttabCopyPtr, gntcopy};
use shared_abi::ring::{BackRing, FrontRing, RingEntry};

const GREF_A: u32 = 8;
const GREF_B: u32 = 9;
const JOIN_TIMEOUT_NS: u64 = 20_000_000_000;

/// A page-aligned page in this domain's data segment (frame number `va >> 12`).
#[repr(C, align(4096))]
struct Page([AtomicU64; 512]);

static PAGE1: Page = Page([const { AtomicU64::new(0) }; 512]);
static PAGE2: Page = Page([const { AtomicU64::new(0) }; 512]);

fn va(p: &Page) -> u64 {
    p as *const Page as u64
}

fn page_write(p: &Page, off: usize, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        let at = off + i;
        let w = &p.0[at / 8];
        let shift = 8 * (at % 8);
        let old = w.load(Ordering::Relaxed);
        w.store(
            (old & !(0xFF << shift)) | (u64::from(b) << shift),
            Ordering::Relaxed,
        );
    }
}

fn page_read(p: &Page, off: usize, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let at = off + i;
        *b = (p.0[at / 8].load(Ordering::Relaxed) >> (8 * (at % 8))) as u8;
    }
}

/// Read `len` bytes at a mapped address (volatile: another domain owns the page).
fn mapped_read(addr: u64, len: usize) -> Vec<u8> {
    (0..len)
        // SAFETY: `addr..addr+len` lies in a page this domain mapped with map_grant_ref.
        .map(|i| unsafe { core::ptr::read_volatile((addr + i as u64) as *const u8) })
        .collect()
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i.wrapping_mul(31) as u8) ^ seed)
        .collect()
}

pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find_map(|w| {
        let (k, v) = w.split_once('=')?;
        (k == key).then_some(v)
    })
}

fn num(si: &StartInfo, key: &str, default: u64) -> u64 {
    param(si.cmdline(), key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Checks collected by a role; reported as one RESULT line.
struct Report {
    name: String,
    failures: Vec<String>,
    checks: u32,
}

impl Report {
    fn new(si: &StartInfo) -> Self {
        Report {
            name: si.name().into(),
            failures: Vec::new(),
            checks: 0,
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            let w = what();
            println!("{}: check failed: {w}", self.name);
            self.failures.push(w);
        }
    }

    fn eq<T: PartialEq + core::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        let ok = got == want;
        self.check(ok, || format!("{what}: got {got:?}, want {want:?}"));
    }

    fn finish(self, details: &str) {
        if self.failures.is_empty() {
            println!(
                "RESULT {} pass {} checks; {details}",
                self.name, self.checks
            );
        } else {
            println!(
                "RESULT {} fail {} of {} checks failed: {}",
                self.name,
                self.failures.len(),
                self.checks,
                self.failures.join("; ")
            );
        }
    }
}

/// An interdomain channel and the events taken on it.
struct Link {
    port: u32,
    w: Waiter,
}

impl Link {
    /// Offer port 1 to `peer` and wait for its hello.
    fn offer(peer: DomId) -> Result<Link, XenError> {
        let port = evtchn::alloc_unbound(peer)?;
        let mut w = Waiter::new();
        w.wait(port)?;
        Ok(Link { port, w })
    }

    /// Bind `peer`'s port `rport` (retrying until it is offered) and say hello.
    fn join(peer: DomId, rport: u32) -> Result<Link, XenError> {
        let deadline = dom_rt::time::now_ns() + JOIN_TIMEOUT_NS;
        let port = loop {
            match evtchn::bind_interdomain(peer, rport) {
                Ok(p) => break p,
                Err(XenError::EINVAL | XenError::ESRCH) if dom_rt::time::now_ns() < deadline => {
                    dom_rt::time::sleep(1_000_000)?;
                }
                Err(e) => return Err(e),
            }
        };
        let mut w = Waiter::new();
        // Binding marks our new port pending (as Xen does): that is not the peer speaking.
        w.collect();
        w.take(port);
        evtchn::send(port)?;
        Ok(Link { port, w })
    }

    fn send(&self) -> Result<(), XenError> {
        evtchn::send(self.port)
    }

    fn wait(&mut self) -> Result<(), XenError> {
        self.w.wait(self.port)
    }
}

fn peer(si: &StartInfo) -> DomId {
    num(si, "peer", 0) as DomId
}

fn fail(si: &StartInfo, why: impl core::fmt::Display) {
    println!("RESULT {} fail {why}", si.name());
}

pub fn run(si: &'static StartInfo) {
    let role = param(si.cmdline(), "role").unwrap_or("");
    let r = match role {
        "ping" => ping(si),
        "pong" => pong(si),
        "granter" => granter(si),
        "mapper" => mapper(si),
        "copy-granter" => copy_granter(si),
        "copier" => copier(si),
        "dier" => dier(si),
        "keeper" => keeper(si),
        "hostile" => {
            hostile(si);
            Ok(())
        }
        "ring-front" => ring_front(si),
        "ring-back" => ring_back(si),
        "raw-ring-tx" => raw_ring_tx(si),
        "raw-ring-rx" => raw_ring_rx(si),
        "bench-granter" => bench_granter(si),
        "bench-mapper" => bench_mapper(si),
        other => {
            fail(si, format_args!("unknown role {other:?}"));
            Ok(())
        }
    };
    if let Err(e) = r {
        fail(si, format_args!("{role}: hypercall refused: {e}"));
    }
}

// ---- ping-pong ----

fn ping(si: &StartInfo) -> Result<(), XenError> {
    let n = num(si, "n", 1000) as usize;
    let mut l = Link::offer(peer(si))?;
    let mut rt = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = rdtsc();
        l.send()?;
        l.wait()?;
        rt.push(rdtsc() - t0);
    }
    let m = median(&mut rt);
    if let Some(metric) = param(si.cmdline(), "metric") {
        println!("METRIC {metric} {m} cycles");
    }
    println!(
        "RESULT {} pass {n} round trips, median {m} cycles",
        si.name()
    );
    Ok(())
}

fn pong(si: &StartInfo) -> Result<(), XenError> {
    let n = num(si, "n", 1000);
    let mut l = Link::join(peer(si), 1)?;
    for _ in 0..n {
        l.wait()?;
        l.send()?;
    }
    println!("RESULT {} pass answered {n} pings", si.name());
    Ok(())
}

// ---- grant map round trip ----

fn granter(si: &StartInfo) -> Result<(), XenError> {
    let b = peer(si);
    let mut rep = Report::new(si);
    let gt = GrantTable::own();
    let mut l = Link::offer(b)?;
    page_write(&PAGE1, 0, &pattern(0xA5));
    gt.grant_access(GREF_A, b, va(&PAGE1), true)?;
    l.send()?;
    l.wait()?; // B mapped it
    rep.eq(
        "end access while mapped",
        gt.end_access(GREF_A),
        Err(gnttab::InUse),
    );
    l.send()?;
    l.wait()?; // B unmapped it
    rep.eq("end access after unmap", gt.end_access(GREF_A), Ok(()));
    // Reuse the page for something new.
    page_write(&PAGE1, 0, &pattern(0x3C));
    let mut back = alloc::vec![0u8; 4096];
    page_read(&PAGE1, 0, &mut back);
    rep.check(back == pattern(0x3C), || "reused page reads back".into());
    gt.grant_access(GREF_B, b, va(&PAGE1), true)?;
    l.send()?;
    l.wait()?; // B mapped ref 9; it now writes to it and dies
    rep.eq(
        "end access of ref 9 while mapped",
        gt.end_access(GREF_B),
        Err(gnttab::InUse),
    );
    // The mapper's death must tear its mapping down, releasing the grant.
    let deadline = dom_rt::time::now_ns() + JOIN_TIMEOUT_NS;
    let mut ended = false;
    while dom_rt::time::now_ns() < deadline {
        if gt.end_access(GREF_B).is_ok() {
            ended = true;
            break;
        }
        dom_rt::time::sleep(1_000_000)?;
    }
    rep.check(ended, || {
        "grant of the dead mapper was never released (mapping not torn down)".into()
    });
    page_read(&PAGE1, 0, &mut back);
    rep.check(back == pattern(0x3C), || {
        "a read-only mapper changed the page".into()
    });
    rep.finish(
        "mapped read-only, busy while mapped, reused after unmap, released after the mapper died",
    );
    Ok(())
}

fn mapper(si: &StartInfo) -> Result<(), XenError> {
    let a = peer(si);
    let mut rep = Report::new(si);
    let mut win = MapWindow::new();
    let mut l = Link::join(a, 1)?;
    l.wait()?; // granted
    let w = win.alloc().ok_or(XenError::ENOMEM)?;
    let h = gnttab::map(a, GREF_A, w, true);
    rep.check(h.is_ok(), || format!("read-only map: {h:?}"));
    rep.check(mapped_read(w, 4096) == pattern(0xA5), || {
        "mapped page does not hold the granter's data".into()
    });
    let w2 = win.alloc().ok_or(XenError::ENOMEM)?;
    rep.eq(
        "writable map of a read-only grant",
        gnttab::map(a, GREF_A, w2, false),
        Err(GrantError::Status(GntStatus::GeneralError)),
    );
    l.send()?;
    l.wait()?; // A tried to end access
    if let Ok(h) = h {
        rep.eq("unmap", gnttab::unmap(h, w), Ok(()));
    }
    l.send()?;
    l.wait()?; // A ended access, reused the page, granted ref 9
    rep.eq(
        "map of an ended grant",
        gnttab::map(a, GREF_A, w, true),
        Err(GrantError::Status(GntStatus::GeneralError)),
    );
    let h9 = gnttab::map(a, GREF_B, w, true);
    rep.check(h9.is_ok(), || format!("map of ref 9: {h9:?}"));
    rep.check(mapped_read(w, 4096) == pattern(0x3C), || {
        "ref 9 does not show the reused page's new data".into()
    });
    rep.finish("read-only map round trip; now writing the read-only mapping (must fault)");
    l.send()?;
    // Give A time to see the grant busy before this domain dies.
    dom_rt::time::sleep(50_000_000)?;
    // SAFETY: deliberately invalid: the page is mapped read-only, the write must fault.
    unsafe { core::ptr::write_volatile(w as *mut u8, 0xEE) };
    println!(
        "RESULT {}-write fail wrote a read-only grant mapping",
        si.name()
    );
    Ok(())
}

// ---- grant copy ----

fn copy_granter(si: &StartInfo) -> Result<(), XenError> {
    let b = peer(si);
    let gt = GrantTable::own();
    let mut l = Link::offer(b)?;
    page_write(&PAGE1, 0, &pattern(0x11));
    gt.grant_access(GREF_A, b, va(&PAGE1), false)?;
    l.send()?;
    l.wait()?; // copier done
    let mut rep = Report::new(si);
    rep.eq("end access after copies", gt.end_access(GREF_A), Ok(()));
    rep.finish("granted a writable page for copies; no pin left behind");
    Ok(())
}

fn copier(si: &StartInfo) -> Result<(), XenError> {
    let a = peer(si);
    let n = num(si, "n", 2000);
    let mut rng = XorShift(num(si, "seed", 0xC0FFEE).max(1));
    let mut rep = Report::new(si);
    let mut l = Link::join(a, 1)?;
    l.wait()?; // granted
    let mut shadow = pattern(0x11);
    let local = va(&PAGE2) >> 12;
    let op = |src: GnttabCopyPtr, dst: GnttabCopyPtr, len: u16, flags: u16| GnttabCopy {
        source: src,
        dest: dst,
        len,
        flags,
        status: 0,
    };
    let remote = |off: u64| GnttabCopyPtr {
        u: u64::from(GREF_A),
        domid: a,
        offset: off as u16,
    };
    let mine = |off: u64| GnttabCopyPtr {
        u: local,
        domid: DOMID_SELF,
        offset: off as u16,
    };
    let (mut to_a, mut from_a, mut bytes) = (0u64, 0u64, 0u64);
    let mut buf = alloc::vec![0u8; 4096];
    for i in 0..n {
        let len = 1 + rng.below(4096);
        let a_off = rng.below(4097 - len);
        let b_off = rng.below(4097 - len);
        bytes += len;
        if rng.next() & 1 == 0 {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            page_write(&PAGE2, b_off as usize, &data);
            let mut ops = [op(
                mine(b_off),
                remote(a_off),
                len as u16,
                gntcopy::DEST_GREF,
            )];
            gnttab::copy(&mut ops)?;
            rep.eq("copy to the granter", ops[0].status, 0);
            shadow[a_off as usize..(a_off + len) as usize].copy_from_slice(&data);
            to_a += 1;
        } else {
            let mut ops = [op(
                remote(a_off),
                mine(b_off),
                len as u16,
                gntcopy::SOURCE_GREF,
            )];
            gnttab::copy(&mut ops)?;
            rep.eq("copy from the granter", ops[0].status, 0);
            page_read(&PAGE2, b_off as usize, &mut buf[..len as usize]);
            let ok = buf[..len as usize] == shadow[a_off as usize..(a_off + len) as usize];
            rep.check(ok, || {
                format!("copy {i}: {len} bytes from offset {a_off} differ")
            });
            from_a += 1;
        }
    }
    // A batch of 16 copies in one call, then the whole page back to compare with the model.
    let mut ops: Vec<GnttabCopy> = (0..16u64)
        .map(|k| {
            page_write(&PAGE2, (k * 256) as usize, &[k as u8 ^ 0x5A; 256]);
            op(mine(k * 256), remote(k * 256), 256, gntcopy::DEST_GREF)
        })
        .collect();
    gnttab::copy(&mut ops)?;
    for (k, o) in ops.iter().enumerate() {
        rep.eq("batched copy status", o.status, 0);
        shadow[k * 256..(k + 1) * 256].fill(k as u8 ^ 0x5A);
    }
    let mut whole = [op(remote(0), mine(0), 4096, gntcopy::SOURCE_GREF)];
    gnttab::copy(&mut whole)?;
    rep.eq("whole-page copy", whole[0].status, 0);
    page_read(&PAGE2, 0, &mut buf);
    rep.check(buf == shadow, || {
        "granter's page differs from the model".into()
    });
    l.send()?;
    rep.finish(&format!(
        "{n} random copies ({to_a} to the granter, {from_a} from it, {bytes} bytes) and a batch of 16, contents checked"
    ));
    Ok(())
}

// ---- a granter that dies while mapped ----

fn dier(si: &StartInfo) -> Result<(), XenError> {
    let b = peer(si);
    let gt = GrantTable::own();
    let mut l = Link::offer(b)?;
    page_write(&PAGE1, 0, &pattern(0x77));
    gt.grant_access(GREF_A, b, va(&PAGE1), true)?;
    l.send()?;
    l.wait()?; // mapped
    println!("{}: dying with my page mapped by domain {b}", si.name());
    dom_rt::exit(shared_abi::hypercall::sched_op::SHUTDOWN_CRASH)
}

fn keeper(si: &StartInfo) -> Result<(), XenError> {
    let a = peer(si);
    let mut rep = Report::new(si);
    let mut l = Link::join(a, 1)?;
    l.wait()?;
    let w = MapWindow::new().alloc().ok_or(XenError::ENOMEM)?;
    let h = gnttab::map(a, GREF_A, w, true);
    rep.check(h.is_ok(), || format!("map: {h:?}"));
    rep.check(mapped_read(w, 4096) == pattern(0x77), || {
        "initial read".into()
    });
    l.send()?;
    // The granter's death closes its end: our port reverts to unbound.
    let deadline = dom_rt::time::now_ns() + JOIN_TIMEOUT_NS;
    let mut dead = false;
    while dom_rt::time::now_ns() < deadline {
        if matches!(
            evtchn::status(DOMID_SELF, l.port),
            Ok((StatusInfo::Unbound { .. }, _))
        ) {
            dead = true;
            break;
        }
        dom_rt::time::sleep(1_000_000)?;
    }
    rep.check(dead, || "the granter never died".into());
    println!(
        "{}: granter is dead; reading its page through my mapping",
        si.name()
    );
    let mut good = 0;
    for _ in 0..20 {
        if mapped_read(w, 4096) == pattern(0x77) {
            good += 1;
        }
        dom_rt::time::sleep(2_000_000)?;
    }
    rep.eq(
        "reads of the dead granter's page that were intact",
        good,
        20,
    );
    if let Ok(h) = h {
        println!("{}: unmapping the dead granter's page now", si.name());
        rep.eq("unmap after the granter died", gnttab::unmap(h, w), Ok(()));
    }
    rep.finish("mapping outlived its granter with valid data; unmapped");
    Ok(())
}

// ---- hostile use ----

fn hostile(si: &StartInfo) {
    let mut rep = Report::new(si);
    let victim = num(si, "victim", 0) as DomId;
    let me = si.domid;
    use XenError::*;
    // Ports.
    rep.eq("send on an invalid port", evtchn::send(4095), Err(EINVAL));
    rep.eq("send on port u32::MAX", evtchn::send(u32::MAX), Err(EINVAL));
    rep.eq("send on reserved port 0", evtchn::send(0), Err(EINVAL));
    rep.eq("close an invalid port", evtchn::close(3000), Err(EINVAL));
    rep.eq("unmask beyond the table", evtchn::unmask(5000), Err(EINVAL));
    rep.eq(
        "status of an invalid port",
        evtchn::status(DOMID_SELF, 99_999).map(|_| ()),
        Err(EINVAL),
    );
    rep.eq(
        "bind a port offered to another domain",
        evtchn::bind_interdomain(victim, 1),
        Err(EINVAL),
    );
    rep.eq(
        "bind to a domain that does not exist",
        evtchn::bind_interdomain(999, 1),
        Err(ESRCH),
    );
    rep.eq(
        "bind to DOMID_INVALID",
        evtchn::bind_interdomain(shared_abi::domid::DOMID_INVALID, 1),
        Err(ESRCH),
    );
    let mut b = shared_abi::event_channel::EvtchnAllocUnbound {
        dom: victim,
        remote_dom: me,
        port: 0,
    }
    .to_bytes();
    rep.eq(
        "alloc_unbound on behalf of another domain",
        evtchn::raw_op(shared_abi::event_channel::op::ALLOC_UNBOUND, &mut b),
        Err(EPERM),
    );
    rep.eq(
        "status of another domain's port",
        evtchn::status(victim, 1).map(|_| ()),
        Err(EPERM),
    );
    let mut b = shared_abi::event_channel::EvtchnReset { dom: victim }.to_bytes();
    rep.eq(
        "reset another domain",
        evtchn::raw_op(shared_abi::event_channel::op::RESET, &mut b),
        Err(EPERM),
    );
    rep.eq(
        "bind the domain-death VIRQ without the capability",
        evtchn::bind_virq(virq::DOM_EXC, 0),
        Err(EPERM),
    );
    rep.eq(
        "bind an unknown VIRQ",
        evtchn::bind_virq(99, 0),
        Err(EINVAL),
    );
    rep.eq(
        "bind VIRQ_TIMER on vCPU 3",
        evtchn::bind_virq(virq::TIMER, 3),
        Err(ENOENT),
    );
    let t = evtchn::bind_virq(virq::TIMER, 0);
    rep.check(t.is_ok(), || format!("bind VIRQ_TIMER: {t:?}"));
    rep.eq(
        "bind VIRQ_TIMER twice",
        evtchn::bind_virq(virq::TIMER, 0),
        Err(EEXIST),
    );
    if let Ok(p) = t {
        rep.eq(
            "bind_vcpu to a missing vCPU",
            evtchn::bind_vcpu(p, 7),
            Err(ENOENT),
        );
        rep.eq("send on a VIRQ port", evtchn::send(p), Err(EINVAL));
    }
    for op in [11u32, 12, 13, 77] {
        let mut b = [0u8; 24];
        rep.eq(
            "FIFO / unknown sub-op",
            evtchn::raw_op(op, &mut b),
            Err(ENOSYS),
        );
    }
    // PIRQs are for device owners (and only the pirqs they mapped).
    let mut b = [0u8; 24];
    rep.eq(
        "bind_pirq without device_owner",
        evtchn::raw_op(2, &mut b),
        Err(EPERM),
    );
    // SAFETY: a null argument pointer: the hypervisor must refuse it, touching nothing.
    let r = unsafe {
        hypercall::raw(
            shared_abi::hypercall::EVENT_CHANNEL_OP,
            [u64::from(shared_abi::event_channel::op::SEND), 0, 0, 0, 0],
        )
    };
    rep.eq("null argument pointer", r, EFAULT.as_ret());
    // Exhaust the port quota, then give everything back.
    let mut ports = Vec::new();
    let err = loop {
        match evtchn::alloc_unbound(victim) {
            Ok(p) => ports.push(p),
            Err(e) => break e,
        }
        if ports.len() > 5000 {
            break EINVAL;
        }
    };
    rep.eq("port quota refusal", err, ENOSPC);
    let got = ports.len();
    println!(
        "{}: port quota reached after {got} ports (+1 VIRQ)",
        si.name()
    );
    rep.eq("ports before the quota (1023 usable, 1 VIRQ)", got, 1022);
    for p in &ports {
        let _ = evtchn::close(*p);
    }
    rep.check(evtchn::alloc_unbound(victim).is_ok(), || {
        "alloc after closing all".into()
    });

    // Grants.
    let st = |s| Err(GrantError::Status(s));
    let mut win = MapWindow::new();
    let w = win.alloc().unwrap_or(0);
    rep.eq(
        "map from a missing domain",
        gnttab::map(999, 8, w, true),
        st(GntStatus::BadDomain),
    );
    rep.eq(
        "map a ref never granted to us",
        gnttab::map(victim, 8, w, true),
        st(GntStatus::GeneralError),
    );
    rep.eq(
        "map a ref beyond the table",
        gnttab::map(me, 5000, w, true),
        st(GntStatus::BadGntref),
    );
    let gt = GrantTable::own();
    let _ = gt.grant_access(10, me, va(&PAGE1), true);
    rep.eq(
        "map at a misaligned address",
        gnttab::map(me, 10, w + 1, true),
        st(GntStatus::BadVirtAddr),
    );
    rep.eq(
        "map over the heap",
        gnttab::map(me, 10, shared_abi::start_info::HEAP_BASE, true),
        st(GntStatus::BadVirtAddr),
    );
    rep.eq(
        "map writable from a read-only grant",
        gnttab::map(me, 10, w, false),
        st(GntStatus::GeneralError),
    );
    let flags_map = |flags: u32| {
        let mut b = shared_abi::grant_table::GnttabMapGrantRef {
            host_addr: w,
            flags,
            gref: 10,
            dom: me,
            ..Default::default()
        }
        .to_bytes();
        let r = gnttab::raw_op(shared_abi::grant_table::op::MAP_GRANT_REF, &mut b, 1);
        (r, i16::from_le_bytes([b[18], b[19]]))
    };
    rep.eq(
        "map with no mapping flags",
        flags_map(0),
        (Ok(()), GntStatus::BadGntref.as_i16()),
    );
    rep.eq(
        "device map",
        flags_map(shared_abi::grant_table::gntmap::DEVICE_MAP),
        (Ok(()), GntStatus::GeneralError.as_i16()),
    );
    rep.eq(
        "unmap a bad handle",
        gnttab::unmap(12345, w).map(|_| 0u32),
        st(GntStatus::BadHandle),
    );
    let local = va(&PAGE2) >> 12;
    let cp = |src: GnttabCopyPtr, dst: GnttabCopyPtr, len: u16, flags: u16| {
        let mut ops = [GnttabCopy {
            source: src,
            dest: dst,
            len,
            flags,
            status: 0,
        }];
        gnttab::copy(&mut ops).map(|_| ops[0].status)
    };
    let mine = |off: u16| GnttabCopyPtr {
        u: local,
        domid: DOMID_SELF,
        offset: off,
    };
    let gref_of = |dom: DomId, r: u32| GnttabCopyPtr {
        u: u64::from(r),
        domid: dom,
        offset: 0,
    };
    rep.eq(
        "copy past the end of a page",
        cp(mine(200), mine(0), 4000, 0),
        Ok(GntStatus::BadCopyArg.as_i16()),
    );
    rep.eq(
        "copy naming a frame of another domain",
        cp(
            mine(0),
            GnttabCopyPtr {
                domid: victim,
                ..mine(0)
            },
            16,
            0,
        ),
        Ok(GntStatus::PermissionDenied.as_i16()),
    );
    rep.eq(
        "copy from a frame we do not hold",
        cp(GnttabCopyPtr { u: 1, ..mine(0) }, mine(0), 16, 0),
        Ok(GntStatus::BadPage.as_i16()),
    );
    rep.eq(
        "copy from a ref not granted to us",
        cp(gref_of(victim, 8), mine(0), 16, gntcopy::SOURCE_GREF),
        Ok(GntStatus::GeneralError.as_i16()),
    );
    rep.eq(
        "copy into a read-only grant",
        cp(mine(0), gref_of(me, 10), 16, gntcopy::DEST_GREF),
        Ok(GntStatus::GeneralError.as_i16()),
    );
    rep.eq(
        "copy batch beyond the limit",
        gnttab::raw_op(shared_abi::grant_table::op::COPY, &mut [0u8; 64], 5000),
        Err(EINVAL),
    );
    rep.eq("set_version(2)", gnttab::set_version(2), Err(ENOSYS));
    rep.eq("set_version(7)", gnttab::set_version(7), Err(EINVAL));
    rep.eq("set_version(1)", gnttab::set_version(1), Ok(1));
    // Exhaust maptrack with mappings of our own read-only grant.
    let mut maps = Vec::new();
    let err = loop {
        let Some(a) = win.alloc() else {
            break GrantError::Hypercall(ENOMEM);
        };
        match gnttab::map(me, 10, a, true) {
            Ok(h) => maps.push((h, a)),
            Err(e) => break e,
        }
        if maps.len() > 4000 {
            break GrantError::Hypercall(EINVAL);
        }
    };
    rep.eq(
        "maptrack quota refusal",
        err,
        GrantError::Status(GntStatus::NoSpace),
    );
    rep.eq("mappings before the maptrack quota", maps.len(), 1024);
    println!(
        "{}: maptrack quota reached after {} mappings",
        si.name(),
        maps.len()
    );
    let mut unmapped = 0;
    for (h, a) in maps {
        if gnttab::unmap(h, a).is_ok() {
            unmapped += 1;
        }
    }
    rep.eq("unmapped all", unmapped, 1024);
    rep.eq("end our self-grant", gt.end_access(10), Ok(()));
    rep.finish("every refusal carried Xen's code");
}

// ---- shared ring ----

#[derive(Clone, Copy, Default, Debug)]
struct Req {
    seq: u64,
}

#[derive(Clone, Copy, Default, Debug)]
struct Rsp {
    seq: u64,
    check: u64,
}

impl RingEntry for Req {
    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.seq.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[..8]);
        Req {
            seq: u64::from_le_bytes(s),
        }
    }
}

impl RingEntry for Rsp {
    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..16].copy_from_slice(&self.check.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        let (mut s, mut c) = ([0u8; 8], [0u8; 8]);
        s.copy_from_slice(&b[..8]);
        c.copy_from_slice(&b[8..16]);
        Rsp {
            seq: u64::from_le_bytes(s),
            check: u64::from_le_bytes(c),
        }
    }
}

fn check_of(seq: u64) -> u64 {
    seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5
}

fn ring_front(si: &StartInfo) -> Result<(), XenError> {
    let b = peer(si);
    let n = num(si, "n", 1_000_000);
    let gt = GrantTable::own();
    let mut l = Link::offer(b)?;
    // SAFETY: PAGE1 is ours for the domain's life, granted to the backend, and touched here
    // only through the ring.
    let mem = unsafe { gnttab::ring_mem(va(&PAGE1)) }.map_err(|_| XenError::EINVAL)?;
    let mut ring: FrontRing<Req, Rsp> = FrontRing::new(mem).map_err(|_| XenError::EINVAL)?;
    gt.grant_access(GREF_A, b, va(&PAGE1), false)?;
    l.send()?;
    l.wait()?; // backend attached
    let t0 = dom_rt::time::now_ns();
    let (mut sent, mut got, mut bad) = (0u64, 0u64, 0u64);
    let mut first_bad = None;
    while got < n {
        while sent < n && !ring.is_full() {
            if ring.push_request(&Req { seq: sent }).is_err() {
                break;
            }
            sent += 1;
        }
        if ring.push_requests_and_check_notify() {
            l.send()?;
        }
        let mut progressed = false;
        loop {
            match ring.get_response() {
                Ok(Some(r)) => {
                    progressed = true;
                    if r.seq != got || r.check != check_of(got) {
                        bad += 1;
                        first_bad.get_or_insert((got, r.seq));
                    }
                    got += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    println!("RESULT {} fail ring error {e}", si.name());
                    return Ok(());
                }
            }
        }
        if !progressed && got < n {
            match ring.final_check_for_responses() {
                Ok(true) => {}
                Ok(false) => l.wait()?,
                Err(e) => {
                    println!("RESULT {} fail ring error {e}", si.name());
                    return Ok(());
                }
            }
        }
    }
    let ns = dom_rt::time::now_ns().saturating_sub(t0).max(1);
    let per_s = n as u128 * 1_000_000_000 / ns as u128;
    if let Some(metric) = param(si.cmdline(), "metric") {
        println!("METRIC {metric} {per_s} requests/s");
    }
    // Tell the backend we are done (it stops at n) and take the page back.
    l.send()?;
    let deadline = dom_rt::time::now_ns() + JOIN_TIMEOUT_NS;
    while gt.end_access(GREF_A).is_err() && dom_rt::time::now_ns() < deadline {
        dom_rt::time::sleep(1_000_000)?;
    }
    if bad == 0 {
        println!(
            "RESULT {} pass {n} requests answered in order, none lost or duplicated, in {} ms ({per_s} requests/s)",
            si.name(),
            ns / 1_000_000
        );
    } else {
        println!(
            "RESULT {} fail {bad} responses out of order or wrong (first: expected {:?})",
            si.name(),
            first_bad
        );
    }
    Ok(())
}

fn ring_back(si: &StartInfo) -> Result<(), XenError> {
    let a = peer(si);
    let n = num(si, "n", 1_000_000);
    let mut l = Link::join(a, 1)?;
    l.wait()?; // granted
    let w = MapWindow::new().alloc().ok_or(XenError::ENOMEM)?;
    let h = gnttab::map(a, GREF_A, w, false).map_err(|_| XenError::EINVAL)?;
    // SAFETY: `w` is mapped writable to the frontend's ring page until the unmap below, and
    // touched only through the ring.
    let mem = unsafe { gnttab::ring_mem(w) }.map_err(|_| XenError::EINVAL)?;
    let mut ring: BackRing<Req, Rsp> = BackRing::new(mem).map_err(|_| XenError::EINVAL)?;
    l.send()?;
    let (mut seen, mut bad) = (0u64, 0u64);
    while seen < n {
        let mut progressed = false;
        loop {
            match ring.get_request() {
                Ok(Some(r)) => {
                    progressed = true;
                    if r.seq != seen {
                        bad += 1;
                    }
                    seen += 1;
                    if ring
                        .push_response(&Rsp {
                            seq: r.seq,
                            check: check_of(r.seq),
                        })
                        .is_err()
                    {
                        bad += 1;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    println!("RESULT {} fail ring error {e}", si.name());
                    return Ok(());
                }
            }
        }
        if ring.push_responses_and_check_notify() {
            l.send()?;
        }
        if !progressed && seen < n {
            match ring.final_check_for_requests() {
                Ok(true) => {}
                Ok(false) => l.wait()?,
                Err(e) => {
                    println!("RESULT {} fail ring error {e}", si.name());
                    return Ok(());
                }
            }
        }
    }
    l.wait()?; // front finished
    let u = gnttab::unmap(h, w);
    if bad == 0 && u.is_ok() {
        println!("RESULT {} pass served {n} requests in order", si.name());
    } else {
        println!(
            "RESULT {} fail {bad} requests out of order; unmap {u:?}",
            si.name()
        );
    }
    Ok(())
}

// ---- the bare-ring packet reference (net_raw_ring_64b_pps) ----

/// A 64-byte packet carried inline in a ring slot: word 0 is its sequence number
/// ([`RAW_END`] ends the stream), words 1..8 a pattern of it the consumer checks.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
struct Pkt64 {
    words: [u64; 8],
}

/// The consumer's answer: the sequence number it took (frees the slot).
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
struct PktAck {
    seq: u64,
}

const RAW_END: u64 = u64::MAX;
/// Pages of the ring: 256 slots of 64 bytes (as many as a netif tx ring has), granted as
/// refs `RAW_GREF..RAW_GREF + RAW_PAGES`.
const RAW_PAGES: usize = 5;
const RAW_GREF: u32 = 16;
/// The consumer publishes its responses at least every this many requests, so the producer
/// can refill the ring while the consumer still works through it.
const RAW_ACK_EVERY: u64 = 32;

/// The producer's ring pages, contiguous.
static RAW_RING: [Page; RAW_PAGES] =
    [const { Page([const { AtomicU64::new(0) }; 512]) }; RAW_PAGES];
/// Longest a side waits for the other before it gives up.
const RAW_STALL_NS: u64 = 5_000_000_000;

fn pkt_word(seq: u64, i: usize) -> u64 {
    seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(i as u32 * 8)
        ^ i as u64
}

fn pkt_of(seq: u64) -> Pkt64 {
    let mut p = Pkt64::default();
    p.words[0] = seq;
    for i in 1..8 {
        p.words[i] = pkt_word(seq, i);
    }
    p
}

impl RingEntry for Pkt64 {
    fn encode(&self, out: &mut [u8]) {
        for (o, w) in out.chunks_exact_mut(8).zip(self.words) {
            o.copy_from_slice(&w.to_le_bytes());
        }
    }
    fn decode(b: &[u8]) -> Self {
        let mut p = Pkt64::default();
        for (w, c) in p.words.iter_mut().zip(b.chunks_exact(8)) {
            let mut x = [0u8; 8];
            x.copy_from_slice(c);
            *w = u64::from_le_bytes(x);
        }
        p
    }
}

impl RingEntry for PktAck {
    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.seq.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[..8]);
        PktAck {
            seq: u64::from_le_bytes(s),
        }
    }
}

/// `raw-ring-tx peer= ms=`: the producer. Grants a ring of 64-byte slots
/// (`FrontRing<Pkt64, PktAck>` over [`RAW_PAGES`] pages: 256 slots, as a netif tx ring) and
/// pushes packets for `ms` (default 1000) as fast as slots free up, notifying only when the
/// consumer asked (`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`), then an end marker.
fn raw_ring_tx(si: &StartInfo) -> Result<(), XenError> {
    let b = peer(si);
    let run_ns = num(si, "ms", 1000).saturating_mul(1_000_000);
    let gt = GrantTable::own();
    let mut l = Link::offer(b)?;
    let base = va(&RAW_RING[0]);
    // SAFETY: RAW_RING is RAW_PAGES contiguous pages of ours for the domain's life, granted
    // to the consumer, and touched here only through the ring.
    let mem =
        unsafe { shared_abi::ring::SharedRingMem::from_raw(base as *mut u8, RAW_PAGES * 4096) }
            .map_err(|_| XenError::EINVAL)?;
    let mut ring: FrontRing<Pkt64, PktAck> = FrontRing::new(mem).map_err(|_| XenError::EINVAL)?;
    for (i, p) in RAW_RING.iter().enumerate() {
        gt.grant_access(RAW_GREF + i as u32, b, va(p), false)?;
    }
    l.send()?;
    l.wait()?; // consumer attached
    let (mut sent, mut acked, mut bad) = (0u64, 0u64, 0u64);
    let (mut notifies, mut waits) = (0u64, 0u64);
    let t0 = dom_rt::time::now_ns();
    let (mut ended, mut end_pushed) = (false, false);
    let mut blast_ns = 0;
    loop {
        if !ended {
            let now = dom_rt::time::now_ns();
            if now - t0 >= run_ns {
                blast_ns = now - t0;
                ended = true;
            }
        }
        while !ring.is_full() && !end_pushed {
            let p = if ended { pkt_of(RAW_END) } else { pkt_of(sent) };
            if ring.push_request(&p).is_err() {
                break;
            }
            if ended {
                end_pushed = true;
            } else {
                sent += 1;
            }
        }
        if ring.push_requests_and_check_notify() {
            notifies += 1;
            l.send()?;
        }
        let mut progressed = false;
        loop {
            match ring.get_response() {
                Ok(Some(r)) => {
                    progressed = true;
                    if r.seq == RAW_END {
                        acked = sent + 1;
                    } else {
                        if r.seq != acked {
                            bad += 1;
                        }
                        acked += 1;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    println!("RESULT {} fail ring error {e}", si.name());
                    return Ok(());
                }
            }
        }
        if ended && acked > sent {
            break;
        }
        // Wait only when there is nothing to do: the ring is full (or the end marker is out)
        // and no response came.
        if !progressed && (ring.is_full() || ended) {
            match ring.final_check_for_responses() {
                Ok(true) => {}
                Ok(false) => {
                    waits += 1;
                    let deadline = dom_rt::time::now_ns() + RAW_STALL_NS;
                    if !l.w.wait_until(l.port, deadline)? {
                        println!(
                            "RESULT {} fail the consumer stalled: {acked} of {sent} packets answered",
                            si.name()
                        );
                        return Ok(());
                    }
                }
                Err(e) => {
                    println!("RESULT {} fail ring error {e}", si.name());
                    return Ok(());
                }
            }
        }
    }
    // The consumer unmaps after the end marker; then the pages are ours again.
    let deadline = dom_rt::time::now_ns() + JOIN_TIMEOUT_NS;
    for i in 0..RAW_PAGES as u32 {
        while gt.end_access(RAW_GREF + i).is_err() && dom_rt::time::now_ns() < deadline {
            dom_rt::time::sleep(1_000_000)?;
        }
    }
    let per_s = sent as u128 * 1_000_000_000 / u128::from(blast_ns.max(1));
    let ok = bad == 0;
    println!(
        "RESULT {} {} pushed {sent} 64-byte packets in {} ms ({per_s} packets/s offered), {notifies} notifications, {waits} waits for room, {bad} answered out of order",
        si.name(),
        if ok { "pass" } else { "fail" },
        blast_ns / 1_000_000
    );
    Ok(())
}

/// `raw-ring-rx peer= metric=`: the consumer. Maps the producer's ring, checks every
/// packet's sequence number and content, answers it, and prints `METRIC <metric>` (packets
/// per second from the first batch taken to the last).
fn raw_ring_rx(si: &StartInfo) -> Result<(), XenError> {
    let a = peer(si);
    let mut l = Link::join(a, 1)?;
    l.wait()?; // granted
    // A fresh window hands out consecutive addresses: the pages map contiguously.
    let mut window = MapWindow::new();
    let mut maps: Vec<(shared_abi::grant_table::GrantHandle, u64)> = Vec::new();
    let mut base = None;
    for i in 0..RAW_PAGES {
        let w = window.alloc().ok_or(XenError::ENOMEM)?;
        let b = *base.get_or_insert(w);
        if w != b + i as u64 * 4096 {
            fail(si, "the map window is not contiguous");
            return Ok(());
        }
        let h = gnttab::map(a, RAW_GREF + i as u32, w, false).map_err(|_| XenError::EINVAL)?;
        maps.push((h, w));
    }
    let base = base.ok_or(XenError::EINVAL)?;
    // SAFETY: `base..base + RAW_PAGES pages` is mapped writable to the producer's ring pages
    // until the unmaps below, and touched only through the ring.
    let mem =
        unsafe { shared_abi::ring::SharedRingMem::from_raw(base as *mut u8, RAW_PAGES * 4096) }
            .map_err(|_| XenError::EINVAL)?;
    let mut ring: BackRing<Pkt64, PktAck> = BackRing::new(mem).map_err(|_| XenError::EINVAL)?;
    l.send()?;
    let (mut count, mut bad, mut waits, mut notifies) = (0u64, 0u64, 0u64, 0u64);
    // (time, packets counted by then) of the first and the last batch.
    let (mut first, mut last) = (None::<(u64, u64)>, (0u64, 0u64));
    let mut done = false;
    let mut failed = None;
    while !done {
        let mut batch = 0u64;
        loop {
            match ring.get_request() {
                Ok(Some(p)) => {
                    let seq = p.words[0];
                    if seq == RAW_END {
                        done = true;
                    } else {
                        if seq != count || (1..8).any(|i| p.words[i] != pkt_word(seq, i)) {
                            bad += 1;
                        }
                        count += 1;
                        batch += 1;
                    }
                    if ring.push_response(&PktAck { seq }).is_err() {
                        bad += 1;
                    }
                    if batch.is_multiple_of(RAW_ACK_EVERY) && ring.push_responses_and_check_notify()
                    {
                        notifies += 1;
                        l.send()?;
                    }
                    if done {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(format!("ring error {e}"));
                    done = true;
                    break;
                }
            }
        }
        if batch > 0 {
            let now = dom_rt::time::now_ns();
            first.get_or_insert((now, count));
            last = (now, count);
        }
        if ring.push_responses_and_check_notify() {
            notifies += 1;
            l.send()?;
        }
        if batch == 0 && !done {
            match ring.final_check_for_requests() {
                Ok(true) => {}
                Ok(false) => {
                    waits += 1;
                    let deadline = dom_rt::time::now_ns() + RAW_STALL_NS;
                    if !l.w.wait_until(l.port, deadline)? {
                        failed = Some(format!("the producer stalled after {count} packets"));
                        done = true;
                    }
                }
                Err(e) => {
                    failed = Some(format!("ring error {e}"));
                    done = true;
                }
            }
        }
    }
    drop(ring);
    let u = maps
        .iter()
        .map(|&(h, w)| gnttab::unmap(h, w))
        .find(|r| r.is_err())
        .unwrap_or(Ok(()));
    let (f0, n0) = first.unwrap_or((0, 0));
    let pps = (last.1 - n0) as u128 * 1_000_000_000 / u128::from((last.0 - f0).max(1));
    if failed.is_none() && bad == 0 && u.is_ok() && last.1 > n0 {
        if let Some(metric) = param(si.cmdline(), "metric") {
            println!("METRIC {metric} {pps} packets/s");
        }
        println!(
            "RESULT {} pass {count} 64-byte packets in order and intact, {pps} packets/s, {notifies} notifications, {waits} waits",
            si.name()
        );
    } else {
        println!(
            "RESULT {} fail {}; {count} packets, {bad} out of order or corrupt; unmap {u:?}",
            si.name(),
            failed.as_deref().unwrap_or("no error"),
        );
    }
    Ok(())
}

// ---- benchmarks ----

fn bench_granter(si: &StartInfo) -> Result<(), XenError> {
    let b = peer(si);
    let gt = GrantTable::own();
    let mut l = Link::offer(b)?;
    gt.grant_access(GREF_A, b, va(&PAGE1), false)?;
    l.send()?;
    l.wait()?;
    let ok = gt.end_access(GREF_A).is_ok();
    println!(
        "RESULT {} {} granted a page for the grant benchmarks",
        si.name(),
        if ok { "pass" } else { "fail" }
    );
    Ok(())
}

fn bench_mapper(si: &StartInfo) -> Result<(), XenError> {
    let a = peer(si);
    let reps = num(si, "n", 1001) as usize;
    let mut l = Link::join(a, 1)?;
    l.wait()?;
    let w = MapWindow::new().alloc().ok_or(XenError::ENOMEM)?;
    let mut v = Vec::with_capacity(reps);
    let mut errors = 0u32;
    for _ in 0..reps {
        let t0 = rdtsc();
        match gnttab::map(a, GREF_A, w, false) {
            Ok(h) => {
                if gnttab::unmap(h, w).is_err() {
                    errors += 1;
                }
            }
            Err(_) => errors += 1,
        }
        v.push(rdtsc() - t0);
    }
    println!("METRIC gnttab_map_unmap_cycles {} cycles", median(&mut v));
    let local = va(&PAGE2) >> 12;
    for batch in [1usize, 16, 64] {
        let mut ops: Vec<GnttabCopy> = (0..batch)
            .map(|_| GnttabCopy {
                source: GnttabCopyPtr {
                    u: local,
                    domid: DOMID_SELF,
                    offset: 0,
                },
                dest: GnttabCopyPtr {
                    u: u64::from(GREF_A),
                    domid: a,
                    offset: 0,
                },
                len: 4096,
                flags: gntcopy::DEST_GREF,
                status: 0,
            })
            .collect();
        let rounds = (reps / batch).max(31);
        let mut v = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t0 = rdtsc();
            gnttab::copy(&mut ops)?;
            v.push((rdtsc() - t0) / batch as u64);
            errors += ops.iter().filter(|o| o.status != 0).count() as u32;
        }
        println!(
            "METRIC gnttab_copy_4k_cycles_batch{batch} {} cycles",
            median(&mut v)
        );
    }
    l.send()?;
    println!(
        "RESULT {} {} grant benchmarks printed ({errors} errors)",
        si.name(),
        if errors == 0 { "pass" } else { "fail" }
    );
    Ok(())
}
