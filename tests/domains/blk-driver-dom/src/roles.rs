//! The roles (see the crate documentation).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use dom_rt::device::virtio::DomHal;
use dom_rt::device::{Bar, fmt_address};
use dom_rt::event::Waiter;
use dom_rt::gnttab::{self, GrantTable, MapWindow};
use dom_rt::{StartInfo, XenError, evtchn, hypercall, println, time};
use shared_abi::DomId;
use shared_abi::start_info::PciAddress;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use crate::driver::{Driver, RequestError, SECTOR, fnv1a, hex, rdtsc, sector_buffer};

const GREF_BASE: u32 = 8;
const JOIN_TIMEOUT_NS: u64 = 30_000_000_000;
const PEER_TIMEOUT_NS: u64 = 60_000_000_000;

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

pub fn run(si: &'static StartInfo) {
    let role = param(si.cmdline(), "role").unwrap_or("");
    let r = match role {
        "read" => read(si),
        "snoop" => snoop(si),
        "dma-escape" => dma_escape(si),
        "victim" => victim(si),
        "writer" => writer(si),
        "bench" => crate::bench::run(si),
        other => Err(format!("unknown role {other:?}")),
    };
    match r {
        Ok(details) => println!("RESULT {} pass {details}", si.name()),
        Err(why) => println!("RESULT {} fail {role}: {why}", si.name()),
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn xen(what: &str) -> impl Fn(XenError) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

fn req(what: &str) -> impl Fn(RequestError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A page-aligned page in the data segment (frame `va >> 12`), accessed atomically.
#[repr(C, align(4096))]
struct Page([AtomicU64; 512]);

static PAGE: Page = Page([const { AtomicU64::new(0) }; 512]);

fn page_va() -> u64 {
    &PAGE as *const Page as u64
}

/// An interdomain channel: offered by one side, joined by the other. Events are taken with
/// the caller's one [`Waiter`] (a second waiter would swallow the first one's events).
struct Link {
    port: u32,
}

impl Link {
    fn offer(peer: DomId) -> Result<Link, String> {
        let port = evtchn::alloc_unbound(peer).map_err(xen("alloc_unbound"))?;
        Ok(Link { port })
    }

    /// Bind the first of `peer`'s ports 1..16 offered to us (retrying until one is) and say
    /// hello.
    fn join(peer: DomId, w: &mut Waiter) -> Result<Link, String> {
        let deadline = time::now_ns() + JOIN_TIMEOUT_NS;
        loop {
            for rport in 1..16 {
                if let Ok(port) = evtchn::bind_interdomain(peer, rport) {
                    // Binding marks our new port pending: that is not the peer speaking.
                    w.collect();
                    w.take(port);
                    evtchn::send(port).map_err(xen("hello"))?;
                    return Ok(Link { port });
                }
            }
            if time::now_ns() >= deadline {
                return Err(format!("no port of domain {peer} offered to us"));
            }
            time::sleep(2_000_000).map_err(xen("sleep"))?;
        }
    }

    fn send(&self) -> Result<(), String> {
        evtchn::send(self.port).map_err(xen("send"))
    }

    fn wait(&self, w: &mut Waiter, what: &str) -> Result<(), String> {
        match w.wait_until(self.port, time::now_ns() + PEER_TIMEOUT_NS) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("timed out waiting for {what}")),
            Err(e) => Err(format!("waiting for {what}: {e:?}")),
        }
    }
}

// ---- read ----

/// What the owner tells a snoop about its device (words of the shared page).
mod info {
    pub const MAGIC: u64 = 0x4f46_4e49_5645_4442; // "BDEVINFO"
    pub const W_MAGIC: usize = 0;
    pub const W_ADDR: usize = 1; // segment << 16 | bus << 8 | devfn
    pub const W_BAR_PHYS: usize = 2;
    pub const W_BAR_LEN: usize = 3;
    pub const W_PIRQ: usize = 4;
}

fn read(si: &StartInfo) -> Result<String, String> {
    let share: Vec<DomId> = param(si.cmdline(), "share")
        .map(|s| s.split(',').filter_map(|d| d.parse().ok()).collect())
        .unwrap_or_default();
    // Offer the snoops their channels first (ports 1, 2, ..).
    let mut links = Vec::new();
    for &d in &share {
        links.push(Link::offer(d)?);
    }

    let mut drv = Driver::open()?;
    let mut blk = drv.disk::<DomHal>()?;
    let capacity = blk.capacity();
    let mut buf = sector_buffer()?;
    let mut out = format!(
        "device {} capacity={capacity}",
        fmt_address(drv.pci.device().address)
    );
    for s in 0..2usize {
        drv.read(&mut blk, s, &mut buf.as_mut_slice()[..SECTOR])
            .map_err(req("read"))?;
        let data = &buf.as_slice()[..SECTOR];
        out.push_str(&format!(
            " sector{s}={} sector{s}_fnv={:016x}",
            hex(&data[..16]),
            fnv1a(data)
        ));
    }

    let n = num(si, "n", 200) as usize;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let done = drv
            .read(&mut blk, i % 2, &mut buf.as_mut_slice()[..SECTOR])
            .map_err(req("timed read"))?;
        let st = drv.irq.stats().map_err(xen("IRQ_STATS"))?;
        if st.last_tsc != 0 && st.last_tsc <= done.event_tsc {
            samples.push(done.event_tsc - st.last_tsc);
        }
    }
    let st = drv.irq.stats().map_err(xen("IRQ_STATS"))?;
    if st.delivered == 0 {
        return Err(format!("no interrupt delivered (raised {})", st.raised));
    }
    if !samples.is_empty() {
        println!("METRIC irq_to_event_cycles {} cycles", median(&mut samples));
    }
    out.push_str(&format!(
        " reads={} samples={} raised={} delivered={} storms={}",
        n + 2,
        samples.len(),
        st.raised,
        st.delivered,
        st.storms
    ));

    if !links.is_empty() {
        share_with_snoops(&mut drv, &share, &links)?;
        out.push_str(&format!(" snoops={}", share.len()));
    }
    drop(blk);
    Ok(out)
}

/// Describe the device in PAGE, grant it to each snoop, tell them, wait until they are done.
fn share_with_snoops(drv: &mut Driver, share: &[DomId], links: &[Link]) -> Result<(), String> {
    let dev = drv.pci.device();
    let (phys, len) = match dev.bar(4) {
        Ok(Some(Bar::Memory { address, .. })) => (address, 0x1000),
        _ => (0, 0),
    };
    let a = dev.address;
    let words = [
        info::MAGIC,
        (u64::from(a.segment) << 16) | (u64::from(a.bus) << 8) | u64::from(a.devfn),
        phys,
        len,
        u64::from(drv.irq.pirq()),
    ];
    for (i, w) in words.iter().enumerate() {
        PAGE.0[i].store(*w, Ordering::Release);
    }
    let gt = GrantTable::own();
    for (i, &d) in share.iter().enumerate() {
        gt.grant_access(GREF_BASE + i as u32, d, page_va(), true)
            .map_err(xen("grant"))?;
    }
    // The driver's one waiter: it also holds hellos that arrived during the reads.
    for l in links.iter() {
        l.wait(&mut drv.w, "a snoop's hello")?;
        l.send()?;
    }
    for l in links.iter() {
        l.wait(&mut drv.w, "a snoop to finish")?;
    }
    Ok(())
}

// ---- snoop ----

fn snoop(si: &StartInfo) -> Result<String, String> {
    let owner = num(si, "owner", 0) as DomId;
    let gref = num(si, "ref", u64::from(GREF_BASE)) as u32;
    let mut w = Waiter::new();
    let link = Link::join(owner, &mut w)?;
    link.wait(&mut w, "the owner's description")?;
    let mut win = MapWindow::new();
    let at = win.alloc().ok_or("grant window full")?;
    let h = gnttab::map(owner, gref, at, true).map_err(|e| format!("map: {e:?}"))?;
    let word = |i: usize| {
        // SAFETY: `at` is the page just mapped (read-only) from the owner; 8-aligned word.
        unsafe { core::ptr::read_volatile((at + 8 * i as u64) as *const u64) }
    };
    if word(info::W_MAGIC) != info::MAGIC {
        return Err("the owner's page holds no description".into());
    }
    let a = word(info::W_ADDR);
    let dev = PciAddress {
        segment: (a >> 16) as u16,
        bus: (a >> 8) as u8,
        devfn: a as u8,
    };
    let (phys, len, pirq) = (
        word(info::W_BAR_PHYS),
        word(info::W_BAR_LEN),
        word(info::W_PIRQ) as u32,
    );
    let _ = gnttab::unmap(h, at);

    let mut refused = Vec::new();
    let mut wrong = Vec::new();
    let mut expect = |what: &str, r: Result<u64, XenError>, ok: &[XenError]| match r {
        Err(e) if ok.contains(&e) => refused.push(format!("{what}={e:?}")),
        other => wrong.push(format!("{what} gave {other:?}")),
    };
    let perm = [XenError::EPERM, XenError::ENODEV];
    if phys != 0 {
        expect("map_bar", hypercall::map_bar(phys, len), &perm);
    } else {
        expect("map_bar", Err(XenError::ENOENT), &[]);
    }
    expect(
        "map_pirq",
        hypercall::map_pirq(dev, 0).map(u64::from),
        &perm,
    );
    expect(
        "irq_stats",
        hypercall::irq_stats(pirq).map(|s| s.raised),
        &[XenError::EINVAL, XenError::EPERM],
    );
    expect(
        "bind_pirq",
        hypercall::bind_pirq(pirq).map(u64::from),
        &[XenError::EINVAL, XenError::EPERM, XenError::ENOENT],
    );
    expect(
        "config_read",
        hypercall::pci_config_read(dev, 0, 4).map(u64::from),
        &perm,
    );
    link.send()?;
    if wrong.is_empty() {
        Ok(format!(
            "{} refused: {}",
            fmt_address(dev),
            refused.join(" ")
        ))
    } else {
        Err(wrong.join("; "))
    }
}

// ---- dma-escape / victim ----

/// Where [`EscapeHal`] points the device's data buffers (0: nowhere, behave).
static REDIRECT: AtomicU64 = AtomicU64::new(0);

/// dom-rt's HAL, except that while [`REDIRECT`] is set it gives the device a data buffer
/// address this domain does not own. This is the attack under test: the device is told to
/// write where the IOMMU must not let it.
struct EscapeHal;

// SAFETY: everything but `share` is DomHal's. `share` may answer an address that is not the
// buffer: the device then never touches the buffer (no aliasing in this domain), and whether it
// reaches the other address is exactly what the IOMMU must prevent.
unsafe impl Hal for EscapeHal {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        DomHal::dma_alloc(pages, direction)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: forwarded from the caller.
        unsafe { DomHal::dma_dealloc(paddr, vaddr, pages) }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: forwarded from the caller.
        unsafe { DomHal::mmio_phys_to_virt(paddr, size) }
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let target = REDIRECT.load(Ordering::Acquire);
        if target != 0 && direction == BufferDirection::DeviceToDriver && buffer.len() >= SECTOR {
            return target;
        }
        // SAFETY: forwarded from the caller.
        unsafe { DomHal::share(buffer, direction) }
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        // SAFETY: forwarded from the caller.
        unsafe { DomHal::unshare(paddr, buffer, direction) }
    }
}

const CANARY: u64 = 0xc0ff_ee00_dead_0000;

fn canary(i: usize) -> u64 {
    CANARY | i as u64
}

fn victim(si: &StartInfo) -> Result<String, String> {
    let peer = num(si, "peer", 0) as DomId;
    for (i, w) in PAGE.0.iter().enumerate() {
        w.store(canary(i), Ordering::Release);
    }
    let gt = GrantTable::own();
    gt.grant_access(GREF_BASE, peer, page_va(), false)
        .map_err(xen("grant"))?;
    let link = Link::offer(peer)?;
    let mut w = Waiter::new();
    link.wait(&mut w, "the driver's hello")?;
    link.wait(&mut w, "the driver to finish")?;
    let bad: Vec<usize> = (0..512)
        .filter(|&i| PAGE.0[i].load(Ordering::Acquire) != canary(i))
        .collect();
    let _ = gt.end_access(GREF_BASE);
    match bad.first() {
        None => Ok("canary intact (4096 bytes) after the driver's DMA attempts".into()),
        Some(&i) => Err(format!(
            "{} of 512 canary words changed, first at byte {:#x}: {:#x}",
            bad.len(),
            8 * i,
            PAGE.0[i].load(Ordering::Acquire)
        )),
    }
}

/// One escape attempt: a read whose data buffer the device is told is at `target`. The
/// IOMMU must stop the device's write (QEMU then drops the data and may still complete the
/// request, or flag the device broken); the domain's real buffer must stay untouched.
fn attempt(drv: &mut Driver, target: u64) -> Result<String, String> {
    let mut blk = drv.disk::<EscapeHal>()?;
    let mut buf = sector_buffer()?;
    REDIRECT.store(target, Ordering::Release);
    let r = drv.read(&mut blk, 0, &mut buf.as_mut_slice()[..SECTOR]);
    REDIRECT.store(0, Ordering::Release);
    let status = drv.pci.device_status().unwrap_or(0xff);
    // Dropping the driver resets the device (its transport's drop writes status 0).
    drop(blk);
    // Give the hypervisor time to collect and report the fault before the next attempt.
    let _ = time::sleep(300_000_000);
    if buf.as_slice().iter().any(|&b| b != 0) {
        return Err(format!(
            "the read to {target:#x} landed in the domain's own buffer"
        ));
    }
    match r {
        Ok(_) => Ok(format!(
            "{target:#x}:completed-data-dropped,status={status:#x}"
        )),
        Err(RequestError::Timeout { .. }) => {
            Ok(format!("{target:#x}:no-completion,status={status:#x}"))
        }
        Err(RequestError::Device(e)) => Ok(format!("{target:#x}:device-error({e:?})")),
        Err(e) => Err(format!("the read to {target:#x}: {e}")),
    }
}

fn dma_escape(si: &StartInfo) -> Result<String, String> {
    let victim = num(si, "victim", 0) as DomId;
    let mut drv = Driver::open()?;
    let mut buf = sector_buffer()?;

    // A good read first: the device works and gives the reference contents.
    let mut blk = drv.disk::<DomHal>()?;
    drv.read(&mut blk, 0, &mut buf.as_mut_slice()[..SECTOR])
        .map_err(req("first read"))?;
    let reference = fnv1a(&buf.as_slice()[..SECTOR]);
    drop(blk);

    let link = Link::join(victim, &mut drv.w)?;
    let mut win = MapWindow::new();
    let at = win.alloc().ok_or("grant window full")?;
    let h = gnttab::map(victim, GREF_BASE, at, false).map_err(|e| format!("map: {e:?}"))?;
    // SAFETY: `at` is the victim's page just mapped writable; an aligned word.
    let seen = unsafe { core::ptr::read_volatile(at as *const u64) };
    if seen != canary(0) {
        return Err(format!("the victim's page reads {seen:#x}, not its canary"));
    }

    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    // The victim's page as this domain maps it, then an address nothing maps.
    for target in [at, 0x1000] {
        match attempt(&mut drv, target) {
            Ok(o) => outcomes.push(o),
            Err(e) => failures.push(e),
        }
    }
    let _ = gnttab::unmap(h, at);

    // The device still works after the reset: the same contents as before.
    let mut blk = drv.disk::<DomHal>()?;
    buf.as_mut_slice().fill(0);
    drv.read(&mut blk, 0, &mut buf.as_mut_slice()[..SECTOR])
        .map_err(req("read after reset"))?;
    let after = fnv1a(&buf.as_slice()[..SECTOR]);
    if after != reference {
        failures.push(format!(
            "read after reset gave {after:016x}, first read {reference:016x}"
        ));
    }
    drop(blk);
    link.send()?;
    if failures.is_empty() {
        Ok(format!(
            "blocked {}; good read after reset sector0_fnv={after:016x} sector0={}",
            outcomes.join(" "),
            hex(&buf.as_slice()[..16])
        ))
    } else {
        Err(failures.join("; "))
    }
}

// ---- writer ----

/// Sector contents the writer writes: its tag, the sequence number, then a pattern.
fn written(seq: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(b"BHWRITE\0");
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in out[16..].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
}

/// The records a previous instance left in sectors 2..34: (records found, highest sequence).
/// Every sector must be empty or hold one whole, consistent record.
fn check_previous(
    drv: &mut Driver,
    blk: &mut crate::driver::Blk<DomHal>,
) -> Result<(u64, u64), String> {
    let mut buf = sector_buffer()?;
    let (mut found, mut max) = (0u64, 0u64);
    for sector in 2..34usize {
        buf.as_mut_slice().fill(0);
        drv.read(blk, sector, &mut buf.as_mut_slice()[..SECTOR])
            .map_err(req("reading back"))?;
        let data = &buf.as_slice()[..SECTOR];
        if data[..8] != *b"BHWRITE\0" {
            continue;
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&data[8..16]);
        let seq = u64::from_le_bytes(seq);
        let mut want = [0u8; SECTOR];
        written(seq, &mut want);
        if data != want || 2 + (seq % 32) as usize != sector {
            return Err(format!(
                "sector {sector} holds a damaged record (seq {seq})"
            ));
        }
        found += 1;
        max = max.max(seq);
    }
    Ok((found, max))
}

fn writer(si: &StartInfo) -> Result<String, String> {
    // `first=<domid>`: the id of the first instance; any other id means this is a restart.
    let first = num(si, "first", 0) as DomId;
    let restarted = first != 0 && si.domid != first;
    let mut limit = param(si.cmdline(), "n").and_then(|v| v.parse::<u64>().ok());
    let mut drv = Driver::open()?;
    let mut blk = drv.disk::<DomHal>()?;
    let mut prefix = String::new();
    if restarted {
        let (found, max) = check_previous(&mut drv, &mut blk)?;
        if found == 0 {
            return Err("restarted, but the first instance's writes are not on the disk".into());
        }
        prefix = format!(
            "restarted as domain {} (first {first}): {found} records of the first instance intact (last seq {max}); ",
            si.domid
        );
        limit = Some(num(si, "n_after", 20));
    } else {
        println!("writer: domain {} writing", si.domid);
    }
    let mut buf = sector_buffer()?;
    let start = rdtsc();
    let mut seq = 0u64;
    loop {
        if limit.is_some_and(|n| seq >= n) {
            break;
        }
        written(seq, &mut buf.as_mut_slice()[..SECTOR]);
        let sector = 2 + (seq % 32) as usize;
        drv.write(&mut blk, sector, &buf.as_slice()[..SECTOR])
            .map_err(req("write"))?;
        seq += 1;
        if seq.is_multiple_of(100) {
            println!("writer: {seq} writes");
        }
    }
    // Read back the last one.
    let last = seq.saturating_sub(1);
    let mut want = [0u8; SECTOR];
    written(last, &mut want);
    buf.as_mut_slice().fill(0);
    drv.read(
        &mut blk,
        2 + (last % 32) as usize,
        &mut buf.as_mut_slice()[..SECTOR],
    )
    .map_err(req("read back"))?;
    if seq > 0 && buf.as_slice()[..SECTOR] != want {
        return Err(format!(
            "sector {} does not hold write {last}",
            2 + last % 32
        ));
    }
    Ok(format!(
        "{prefix}{seq} writes, last read back, {} cycles",
        rdtsc() - start
    ))
}
