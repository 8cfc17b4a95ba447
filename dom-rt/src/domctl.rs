//! Typed `domctl` calls for a control domain (ctl-dom): list domains, get one's info,
//! create (`CREATE_DOMAIN`), pause, unpause, destroy, and the boot-domain operations
//! (`BOOT_DOMAIN_INFO`, `REBUILD_BOOT_DOMAIN`), console histories (`CONSOLE_READ`: a
//! domain's console output, the hypervisor's log) and memory limits (`MAX_MEM`).
//! Every one needs `DOMAIN_CONTROL`; anyone else gets `EPERM`.

use alloc::vec;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::errno::XenError;
use shared_abi::hypercall as hc;
use shared_abi::hypercall_args::Wire;
use shared_abi::hypercall_args::domctl::{
    self as dc, BootDomain, CreateDomain, DomainInfo, DomctlHeader, ListDomains,
};

use crate::hypercall::call;

/// Most records asked for per `LIST_DOMAINS` call.
pub const BATCH: u32 = 64;

fn header(cmd: u32, domain: DomId) -> [u8; dc::DOMCTL_LEN] {
    let mut b = [0u8; dc::DOMCTL_LEN];
    DomctlHeader {
        cmd,
        interface_version: dc::INTERFACE_VERSION,
        domain,
        pad: [0; 3],
    }
    .encode(&mut b);
    b
}

/// Every domain (dead ones included, while the hypervisor keeps their entries), in id order.
pub fn list_domains() -> Result<Vec<DomainInfo>, XenError> {
    list_paged(dc::LIST_DOMAINS, |r: &DomainInfo| r.domid)
}

/// Page through a domctl that fills a [`ListDomains`] buffer with `T` records in domain-id
/// order (`LIST_DOMAINS`, `XENSTORE_DOMAINS`), [`BATCH`] at a time, until a short batch.
pub(crate) fn list_paged<T: Wire>(cmd: u32, domid_of: fn(&T) -> DomId) -> Result<Vec<T>, XenError> {
    let mut all = Vec::new();
    let mut first: DomId = 0;
    loop {
        let mut out = vec![0u8; BATCH as usize * T::SIZE];
        let mut b = header(cmd, 0);
        ListDomains {
            first_domain: first,
            pad: 0,
            max_domains: BATCH,
            buffer: out.as_mut_ptr() as u64,
        }
        .encode(&mut b[16..]);
        let n = call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0])?;
        // Never more than asked: a larger count is refused, not trusted.
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= BATCH as usize)
            .ok_or(XenError::EIO)?;
        let recs: Vec<T> = out.chunks(T::SIZE).take(n).filter_map(T::decode).collect();
        let last = recs.last().map(domid_of);
        all.extend(recs);
        match last {
            Some(l) if n == BATCH as usize && l < DomId::MAX => first = l + 1,
            _ => return Ok(all),
        }
    }
}

/// `GETDOMAININFO` for `domid`.
pub fn domain_info(domid: DomId) -> Result<DomainInfo, XenError> {
    let mut b = header(dc::GETDOMAININFO, domid);
    call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0])?;
    DomainInfo::decode(&b[16..]).ok_or(XenError::EIO)
}

/// `DESTROYDOMAIN` for `domid`.
pub fn destroy(domid: DomId) -> Result<(), XenError> {
    let mut b = header(dc::DESTROYDOMAIN, domid);
    call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0]).map(|_| ())
}

/// `PAUSEDOMAIN` for `domid`.
pub fn pause(domid: DomId) -> Result<(), XenError> {
    let mut b = header(dc::PAUSEDOMAIN, domid);
    call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0]).map(|_| ())
}

/// `UNPAUSEDOMAIN` for `domid`.
pub fn unpause(domid: DomId) -> Result<(), XenError> {
    let mut b = header(dc::UNPAUSEDOMAIN, domid);
    call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0]).map(|_| ())
}

/// What `CREATE_DOMAIN` is asked to build.
#[derive(Clone, Copy, Debug)]
pub struct NewDomain<'a> {
    pub name: &'a str,
    /// The kernel: an ELF image in this domain's memory (copied by the hypervisor).
    pub elf: &'a [u8],
    pub memory_kib: u64,
    pub vcpus: u32,
    pub weight: u32,
    pub cap_percent: u32,
    pub capabilities: Capabilities,
    pub cmdline: &'a str,
    /// Leave it paused (unpause once its xenstore entries are written).
    pub paused: bool,
    /// Keep it on shutdown for these reasons: `CREATE_PRESERVE_*` bits (its `preserve`
    /// lifecycle policies).
    pub preserve: u32,
}

/// Build a domain at run time through the hypervisor's one builder; its id.
pub fn create_domain(d: &NewDomain<'_>) -> Result<DomId, XenError> {
    let mut req = CreateDomain {
        elf_va: d.elf.as_ptr() as u64,
        elf_len: d.elf.len() as u64,
        memory_kib: d.memory_kib,
        cmdline_va: d.cmdline.as_ptr() as u64,
        cmdline_len: u32::try_from(d.cmdline.len()).map_err(|_| XenError::EINVAL)?,
        vcpus: d.vcpus,
        weight: d.weight,
        cap_percent: d.cap_percent,
        capabilities: d.capabilities.bits(),
        flags: if d.paused { dc::CREATE_PAUSED } else { 0 }
            | (d.preserve & (dc::CREATE_FLAGS & !dc::CREATE_PAUSED)),
        ..CreateDomain::default()
    };
    req.set_name(d.name);
    let mut b = header(dc::CREATE_DOMAIN, 0);
    req.encode(&mut b[16..]);
    let r = call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0])?;
    DomId::try_from(r).map_err(|_| XenError::EIO)
}

fn boot_op(cmd: u32, req: BootDomain) -> Result<(u64, BootDomain), XenError> {
    let mut b = header(cmd, 0);
    req.encode(&mut b[16..]);
    let r = call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0])?;
    Ok((r, BootDomain::decode(&b[16..]).ok_or(XenError::EIO)?))
}

/// Boot domain (manifest entry) `index`: its name, current domain and policies.
pub fn boot_domain_info(index: u32) -> Result<BootDomain, XenError> {
    boot_op(
        dc::BOOT_DOMAIN_INFO,
        BootDomain {
            index,
            ..BootDomain::default()
        },
    )
    .map(|(_, b)| b)
}

/// Rebuild boot domain `index` (its previous domain destroyed first); the new domain id.
pub fn rebuild_boot_domain(index: u32) -> Result<DomId, XenError> {
    let (r, _) = boot_op(
        dc::REBUILD_BOOT_DOMAIN,
        BootDomain {
            index,
            ..BootDomain::default()
        },
    )?;
    DomId::try_from(r).map_err(|_| XenError::EIO)
}

/// Rebuild the boot domain named `name`; the new domain id.
pub fn rebuild_boot_domain_named(name: &str) -> Result<DomId, XenError> {
    let mut req = BootDomain {
        index: dc::BOOT_BY_NAME,
        ..BootDomain::default()
    };
    req.set_name(name);
    let (r, _) = boot_op(dc::REBUILD_BOOT_DOMAIN, req)?;
    DomId::try_from(r).map_err(|_| XenError::EIO)
}

/// `MGMT_IO`: move up to [`dc::MGMT_IO_MAX`] bytes on the management line (`op` is
/// [`dc::MGMT_READ`] or [`dc::MGMT_WRITE`]); the count moved. Never waits.
fn mgmt_io(op: u32, ptr: *mut u8, len: usize) -> Result<usize, XenError> {
    let len = len.min(dc::MGMT_IO_MAX as usize);
    let mut b = header(dc::MGMT_IO, 0);
    dc::MgmtIo {
        buffer: ptr as u64,
        len: len as u32,
        op,
        ..dc::MgmtIo::default()
    }
    .encode(&mut b[16..]);
    let n = call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0])?;
    // Never more than asked: a larger count is refused, not trusted.
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= len)
        .ok_or(XenError::EIO)
}

/// Take the bytes the management line has received (at most `buf.len()` and
/// [`dc::MGMT_IO_MAX`]); 0 when none. `ENODEV`: the machine has no management line;
/// `EPERM`: no `DOMAIN_CONTROL`.
pub fn mgmt_read(buf: &mut [u8]) -> Result<usize, XenError> {
    mgmt_io(dc::MGMT_READ, buf.as_mut_ptr(), buf.len())
}

/// Send what the management line accepts now of `data` (at most [`dc::MGMT_IO_MAX`]
/// bytes); the count sent, possibly 0.
pub fn mgmt_write(data: &[u8]) -> Result<usize, XenError> {
    // The hypervisor only reads from a MGMT_WRITE buffer.
    mgmt_io(dc::MGMT_WRITE, data.as_ptr().cast_mut(), data.len())
}

/// `SCHEDULER_OP` putinfo (credit scheduler): `weight` (1..=65535) and `cap_percent`
/// (0 = uncapped) of `domid`.
pub fn set_sched(domid: DomId, weight: u32, cap_percent: u32) -> Result<(), XenError> {
    let mut b = header(dc::SCHEDULER_OP, domid);
    dc::SchedulerOp {
        sched_id: dc::SCHEDULER_CREDIT,
        cmd: dc::SCHEDOP_PUTINFO,
        weight: u16::try_from(weight).map_err(|_| XenError::EINVAL)?,
        cap: u16::try_from(cap_percent)
            .ok()
            .filter(|&c| c != dc::CAP_UNCHANGED)
            .ok_or(XenError::EINVAL)?,
        pad: 0,
    }
    .encode(&mut b[16..]);
    call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0]).map(|_| ())
}

/// What one console-history read gave (`CONSOLE_READ`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryChunk {
    /// Bytes copied into the buffer.
    pub len: usize,
    /// The offset to read from next.
    pub next: u64,
    /// Bytes dropped between the asked offset and the oldest byte the hypervisor kept.
    pub lost: u64,
}

/// `CONSOLE_READ` of `domid`'s console history (or [`shared_abi::domid::DOMID_XEN`]: the
/// hypervisor's log) from offset `from` into `buf` (at most [`dc::CONSOLE_READ_MAX`]
/// bytes). Never waits; 0 bytes when nothing is new.
pub fn console_read(domid: DomId, from: u64, buf: &mut [u8]) -> Result<HistoryChunk, XenError> {
    let len = buf.len().min(dc::CONSOLE_READ_MAX as usize);
    let mut b = header(dc::CONSOLE_READ, domid);
    dc::ConsoleRead {
        from,
        buffer: buf.as_mut_ptr() as u64,
        len: len as u32,
        ..dc::ConsoleRead::default()
    }
    .encode(&mut b[16..]);
    let n = call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0])?;
    let out = dc::ConsoleRead::decode(&b[16..]).ok_or(XenError::EIO)?;
    // Never more than asked, and an offset that moved by exactly the count: anything else
    // is refused, not trusted.
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n <= len && out.done as usize == n)
        .ok_or(XenError::EIO)?;
    let start = from.checked_add(out.lost).ok_or(XenError::EIO)?;
    if start.checked_add(n as u64) != Some(out.next) {
        return Err(XenError::EIO);
    }
    Ok(HistoryChunk {
        len: n,
        next: out.next,
        lost: out.lost,
    })
}

/// The hypervisor's log (dmesg) from offset `from`: [`console_read`] of `DOMID_XEN`.
pub fn dmesg_read(from: u64, buf: &mut [u8]) -> Result<HistoryChunk, XenError> {
    console_read(shared_abi::domid::DOMID_XEN, from, buf)
}

/// `XEN_DOMCTL_max_mem`: set `domid`'s memory limit to `kib` KiB. As in Xen, a limit below
/// what it holds takes nothing away (it gets no new page until it gives some back).
pub fn set_max_mem(domid: DomId, kib: u64) -> Result<(), XenError> {
    let mut b = header(dc::MAX_MEM, domid);
    dc::MaxMem { max_memkb: kib }.encode(&mut b[16..]);
    call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0]).map(|_| ())
}

/// `CONSOLE_WRITE`: give `data` (at most [`dc::CONSOLE_WRITE_MAX`] bytes are offered) to
/// `domid`'s console input; how many bytes it took (fewer when its buffer is nearly full).
/// A full buffer is `EAGAIN`: try again once the domain has read some.
pub fn console_write(domid: DomId, data: &[u8]) -> Result<usize, XenError> {
    let len = data.len().min(dc::CONSOLE_WRITE_MAX as usize);
    let mut b = header(dc::CONSOLE_WRITE, domid);
    dc::ConsoleWrite {
        // The hypervisor only reads from the buffer.
        buffer: data.as_ptr() as u64,
        len: len as u32,
        ..dc::ConsoleWrite::default()
    }
    .encode(&mut b[16..]);
    let n = call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0])?;
    // Never more than offered: anything else is refused, not trusted.
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= len)
        .ok_or(XenError::EIO)
}

/// `DOMAIN_STATS`: `domid`'s I/O counters.
pub fn domain_stats(domid: DomId) -> Result<dc::DomainStats, XenError> {
    let mut b = header(dc::DOMAIN_STATS, domid);
    call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0])?;
    dc::DomainStats::decode(&b[16..]).ok_or(XenError::EIO)
}

/// Test-only: what the hypercall mocks of the test modules below share.
#[cfg(test)]
mod mock {
    use super::*;

    /// A mocked `hypercall(nr, a)`: a DOMCTL hands `answer` the decoded header, the payload
    /// after it (to read, and to answer in place) and a [`Guest`] to reach the buffers the
    /// payload points at; anything else is `ENOSYS`.
    pub(super) fn domctl(
        nr: u64,
        a: [u64; 5],
        answer: impl FnOnce(DomctlHeader, &mut [u8], &mut Guest) -> i64,
    ) -> i64 {
        if nr != hc::DOMCTL {
            return XenError::ENOSYS.as_ret();
        }
        let mut call = Guest(());
        let b = call.bytes(a[0], dc::DOMCTL_LEN);
        let h = DomctlHeader::decode(b).unwrap();
        answer(h, &mut b[16..], &mut Guest(()))
    }

    /// The caller's memory as a mock sees it; made only by [`domctl`], for one call.
    pub(super) struct Guest(());

    impl Guest {
        /// `len` bytes at `addr`, an address the wrapper under test passed in this call.
        pub(super) fn bytes(&mut self, addr: u64, len: usize) -> &mut [u8] {
            // SAFETY: a Guest lives only inside one mocked hypercall and is given addresses
            // from that call: the wrappers pass a live DOMCTL_LEN buffer, and live data or
            // record buffers of the lengths their payloads say, all outliving the call.
            unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
        }
    }
}

#[cfg(test)]
mod console_input_tests {
    use super::*;
    use crate::hypercall::MOCK;

    /// Takes at most 5 bytes for domain 3, ESRCH for others; stats for domain 3.
    fn fake(nr: u64, a: [u64; 5]) -> i64 {
        mock::domctl(nr, a, |h, p, guest| match (h.cmd, h.domain) {
            (dc::CONSOLE_WRITE, 3) => {
                let r = dc::ConsoleWrite::decode(p).unwrap();
                assert!(r.len <= dc::CONSOLE_WRITE_MAX);
                let data = guest.bytes(r.buffer, r.len as usize);
                assert!(data.starts_with(b"a"));
                data.len().min(5) as i64
            }
            (dc::CONSOLE_WRITE, 4) => 9999,
            (dc::DOMAIN_STATS, 3) => {
                dc::DomainStats {
                    evtchn_sends: 7,
                    grant_copy_bytes: 4096,
                    ..Default::default()
                }
                .encode(p);
                0
            }
            _ => XenError::ESRCH.as_ret(),
        })
    }

    #[test]
    fn console_write_and_stats_decode_and_refuse_impossible_counts() {
        let _g = crate::hypercall::TEST_LOCK.lock();
        *MOCK.lock() = Some(fake);
        let short = console_write(3, b"abcdefgh");
        let all = console_write(3, b"abc");
        let big = console_write(3, &[b'a'; 5000]);
        let liar = console_write(4, b"ab");
        let missing = console_write(9, b"ab");
        let stats = domain_stats(3);
        let no_stats = domain_stats(9);
        *MOCK.lock() = None;
        assert_eq!((short, all, big), (Ok(5), Ok(3), Ok(5)));
        assert_eq!((liar, missing), (Err(XenError::EIO), Err(XenError::ESRCH)));
        let s = stats.unwrap();
        assert_eq!((s.evtchn_sends, s.grant_copy_bytes), (7, 4096));
        assert_eq!(no_stats, Err(XenError::ESRCH));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::MOCK;

    fn fake(nr: u64, a: [u64; 5]) -> i64 {
        mock::domctl(nr, a, |h, p, guest| match h.cmd {
            dc::LIST_DOMAINS => {
                let l = ListDomains::decode(p).unwrap();
                let out = guest.bytes(l.buffer, l.max_domains as usize * DomainInfo::SIZE);
                let ids: Vec<u16> = (l.first_domain.max(1)..=70)
                    .take(l.max_domains as usize)
                    .collect();
                for (i, id) in ids.iter().enumerate() {
                    DomainInfo {
                        domid: *id,
                        ..Default::default()
                    }
                    .encode(&mut out[i * DomainInfo::SIZE..]);
                }
                ids.len() as i64
            }
            dc::REBUILD_BOOT_DOMAIN => {
                let mut r = BootDomain::decode(p).unwrap();
                if r.index == dc::BOOT_BY_NAME && r.name() != Some("blk") {
                    return XenError::ESRCH.as_ret();
                }
                if r.index == 9 {
                    return XenError::ESRCH.as_ret();
                }
                r.domid = 12;
                r.encode(p);
                12
            }
            dc::BOOT_DOMAIN_INFO => {
                let mut r = BootDomain::decode(p).unwrap();
                r.on_crash = 1;
                r.nr_boot_domains = 3;
                r.encode(p);
                0
            }
            _ => XenError::ENOSYS.as_ret(),
        })
    }

    #[test]
    fn list_pages_through_batches_and_boot_ops_decode() {
        let _g = crate::hypercall::TEST_LOCK.lock();
        *MOCK.lock() = Some(fake);
        let all = list_domains().unwrap();
        let info = boot_domain_info(1).unwrap();
        let r = rebuild_boot_domain(1);
        let by_name = rebuild_boot_domain_named("blk");
        let missing = rebuild_boot_domain_named("nobody");
        let bad = rebuild_boot_domain(9);
        *MOCK.lock() = None;
        assert_eq!(all.len(), 70);
        assert_eq!((all[0].domid, all[69].domid), (1, 70));
        assert_eq!((info.index, info.on_crash, info.nr_boot_domains), (1, 1, 3));
        assert_eq!((r, by_name), (Ok(12), Ok(12)));
        assert_eq!((missing, bad), (Err(XenError::ESRCH), Err(XenError::ESRCH)));
    }
}

#[cfg(test)]
mod mgmt_tests {
    use super::*;
    use crate::hypercall::MOCK;

    /// A line holding "hello" to read; writes accept at most 3 bytes; sched ops recorded.
    fn fake(nr: u64, a: [u64; 5]) -> i64 {
        mock::domctl(nr, a, |h, p, guest| match h.cmd {
            dc::MGMT_IO => {
                let r = dc::MgmtIo::decode(p).unwrap();
                assert!(r.len <= dc::MGMT_IO_MAX);
                let data = guest.bytes(r.buffer, r.len as usize);
                match r.op {
                    dc::MGMT_READ => {
                        let n = data.len().min(5);
                        data[..n].copy_from_slice(&b"hello"[..n]);
                        n as i64
                    }
                    dc::MGMT_WRITE if h.domain == 0 => data.len().min(3) as i64,
                    _ => XenError::EINVAL.as_ret(),
                }
            }
            dc::SCHEDULER_OP => {
                let op = dc::SchedulerOp::decode(p).unwrap();
                if h.domain == 7 && op.weight == 512 && op.cap == 50 {
                    0
                } else {
                    XenError::ESRCH.as_ret()
                }
            }
            _ => XenError::ENOSYS.as_ret(),
        })
    }

    /// Claims more bytes than asked.
    fn liar(_nr: u64, _a: [u64; 5]) -> i64 {
        9999
    }

    #[test]
    fn mgmt_io_moves_bytes_and_refuses_impossible_counts() {
        let _g = crate::hypercall::TEST_LOCK.lock();
        *MOCK.lock() = Some(fake);
        let mut buf = [0u8; 16];
        let r = mgmt_read(&mut buf);
        let mut big = alloc::vec![0u8; 10_000];
        let w = mgmt_write(b"abcdef");
        let w_big = mgmt_write(&big);
        let r_big = mgmt_read(&mut big);
        let s = set_sched(7, 512, 50);
        let s_bad = set_sched(7, 70_000, 0);
        *MOCK.lock() = Some(liar);
        let lie = mgmt_read(&mut buf);
        *MOCK.lock() = None;
        assert_eq!(r, Ok(5));
        assert_eq!(&buf[..5], b"hello");
        assert_eq!((w, w_big, r_big), (Ok(3), Ok(3), Ok(5)));
        assert_eq!((s, s_bad), (Ok(()), Err(XenError::EINVAL)));
        assert_eq!(lie, Err(XenError::EIO));
    }
}

#[cfg(test)]
mod history_tests {
    use super::*;
    use crate::hypercall::MOCK;

    /// Domain 5's history is "hello" with 3 bytes lost before it; dmesg is "log"; max_mem
    /// accepted for domain 5 only.
    fn fake(nr: u64, a: [u64; 5]) -> i64 {
        mock::domctl(nr, a, |h, p, guest| match h.cmd {
            dc::CONSOLE_READ => {
                let mut r = dc::ConsoleRead::decode(p).unwrap();
                assert!(r.len <= dc::CONSOLE_READ_MAX);
                let text: &[u8] = match h.domain {
                    5 => b"hello",
                    shared_abi::domid::DOMID_XEN => b"log",
                    _ => return XenError::ESRCH.as_ret(),
                };
                let lost = if h.domain == 5 {
                    3u64.saturating_sub(r.from)
                } else {
                    0
                };
                let at = (r.from + lost - if h.domain == 5 { 3 } else { 0 }) as usize;
                let n = (r.len as usize).min(text.len().saturating_sub(at));
                let data = guest.bytes(r.buffer, n);
                data.copy_from_slice(&text[at..at + n]);
                r.done = n as u32;
                r.lost = lost;
                r.next = r.from + lost + n as u64;
                r.encode(p);
                n as i64
            }
            dc::MAX_MEM if h.domain == 5 => {
                assert_eq!(dc::MaxMem::decode(p).unwrap().max_memkb, 2048);
                0
            }
            dc::MAX_MEM => XenError::ESRCH.as_ret(),
            _ => XenError::ENOSYS.as_ret(),
        })
    }

    /// Claims a count that does not match its offsets.
    fn liar(nr: u64, a: [u64; 5]) -> i64 {
        let r = fake(nr, a);
        if r > 0 { r - 1 } else { r }
    }

    #[test]
    fn history_reads_decode_and_impossible_answers_are_refused() {
        let _g = crate::hypercall::TEST_LOCK.lock();
        *MOCK.lock() = Some(fake);
        let mut buf = [0u8; 16];
        let first = console_read(5, 0, &mut buf);
        let text = buf;
        let again = console_read(5, 8, &mut buf);
        let mut big = alloc::vec![0u8; 10_000];
        let log = dmesg_read(0, &mut big);
        let unknown = console_read(9, 0, &mut buf);
        let mm = set_max_mem(5, 2048);
        let mm_bad = set_max_mem(6, 2048);
        *MOCK.lock() = Some(liar);
        let lie = console_read(5, 0, &mut buf);
        *MOCK.lock() = None;
        assert_eq!(
            first,
            Ok(HistoryChunk {
                len: 5,
                next: 8,
                lost: 3
            })
        );
        assert_eq!(&text[..5], b"hello");
        assert_eq!(again.map(|c| (c.len, c.next)), Ok((0, 8)));
        assert_eq!(log.map(|c| c.len), Ok(3));
        assert_eq!(&big[..3], b"log");
        assert_eq!(unknown, Err(XenError::ESRCH));
        assert_eq!((mm, mm_bad), (Ok(()), Err(XenError::ESRCH)));
        assert_eq!(lie, Err(XenError::EIO));
    }
}
