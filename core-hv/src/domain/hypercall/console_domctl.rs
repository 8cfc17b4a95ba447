//! `domctl` `CONSOLE_READ` (Bulkhead): the control domain reads a domain's console history
//! or the hypervisor's own log (dmesg, target `DOMID_XEN`) from a running byte offset (see
//! [`crate::domain::console::HistoryRing`]). Reading takes nothing away: several readers
//! may follow the same history, each with its own offset.

use shared_abi::domid::DOMID_XEN;
use shared_abi::errno::XenError;
use shared_abi::event_channel::virq;
use shared_abi::hypercall_args::Wire;
use shared_abi::hypercall_args::domctl::{self as dc, ConsoleRead, ConsoleWrite, DomainStats};

use super::{Call, HcResult};
use crate::domain::DomainState;
use crate::policy;

impl Call<'_, '_> {
    /// `buf` is the whole domctl (header + payload) already copied in from `arg`; `target`
    /// the header's domain (`DOMID_SELF` resolved).
    pub(super) fn console_read(&mut self, arg: u64, target: u16, buf: &mut [u8]) -> HcResult {
        policy::console_history(self.caller())?;
        let mut req =
            ConsoleRead::decode(buf.get(16..).ok_or(XenError::EFAULT)?).ok_or(XenError::EFAULT)?;
        if req.len > dc::CONSOLE_READ_MAX || req.pad != 0 || req.pad1 != 0 {
            return Err(XenError::EINVAL);
        }
        let mut data = alloc::vec![0u8; req.len as usize];
        let got = if target == DOMID_XEN {
            self.p.console.read_log(req.from, &mut data)?
        } else {
            let d = self
                .hv
                .domains
                .get(target)
                .filter(|d| d.state() != DomainState::Dead)
                .ok_or(XenError::ESRCH)?;
            d.console.history().read(req.from, &mut data)?
        };
        self.mem()?.copy_to_guest(req.buffer, &data[..got.copied])?;
        req.done = got.copied as u32;
        req.next = got.next;
        req.lost = got.lost;
        if let Some(dst) = buf.get_mut(16..) {
            req.encode(dst);
        }
        self.mem()?.copy_to_guest(arg, buf)?;
        Ok(got.copied as i64)
    }
}

impl Call<'_, '_> {
    /// `CONSOLE_WRITE`: console input for `target` (see [`dc::CONSOLE_WRITE`]).
    ///
    /// Why `console_io(CONSOLEIO_read)` + `VIRQ_CONSOLE` and not the Xen console ring:
    /// the builder maps a `xencons_interface` page in every domain and grants it (ref 0) to
    /// the console-service domain, but gives no console event channel (`console_evtchn` is
    /// 0), and the ring belongs to that service domain's backend when one runs: the
    /// hypervisor writing `in[]` behind its back would race it. So input stays in a bounded
    /// hypervisor buffer that the domain drains itself with `CONSOLEIO_read` (Xen's call,
    /// here reading the caller's own input), woken by `VIRQ_CONSOLE` if it bound it.
    pub(super) fn console_write(&mut self, arg: u64, target: u16, buf: &mut [u8]) -> HcResult {
        let token = policy::control(self.caller(), target)?;
        let mut req =
            ConsoleWrite::decode(buf.get(16..).ok_or(XenError::EFAULT)?).ok_or(XenError::EFAULT)?;
        if req.len > dc::CONSOLE_WRITE_MAX || req.pad != 0 {
            return Err(XenError::EINVAL);
        }
        let target = token.target();
        let room = {
            let d = self
                .hv
                .domains
                .get(target)
                .filter(|d| d.state().is_alive())
                .ok_or(XenError::ESRCH)?;
            dc::CONSOLE_INPUT_BYTES.saturating_sub(d.console.input_len())
        };
        let n = (req.len as usize).min(room);
        if req.len > 0 && n == 0 {
            return Err(XenError::EAGAIN);
        }
        let mut data = alloc::vec![0u8; n];
        self.mem()?.copy_from_guest(req.buffer, &mut data)?;
        let d = self.hv.domains.get_mut(target).ok_or(XenError::ESRCH)?;
        let taken = d.console.push_input(&data);
        if n > 0 && taken == 0 {
            // No memory for the buffer: the caller retries.
            return Err(XenError::EAGAIN);
        }
        req.done = taken as u32;
        if let Some(dst) = buf.get_mut(16..) {
            req.encode(dst);
        }
        self.mem()?.copy_to_guest(arg, buf)?;
        if taken > 0 {
            let k = self.hv.raise_virq(self.p, target, virq::CONSOLE, 0);
            self.kick(k);
        }
        Ok(taken as i64)
    }

    /// `DOMAIN_STATS`: `target`'s I/O counters (see [`dc::DOMAIN_STATS`]).
    pub(super) fn domain_stats(&mut self, arg: u64, target: u16, buf: &mut [u8]) -> HcResult {
        let token = policy::control(self.caller(), target)?;
        let d = self
            .hv
            .domains
            .get(token.target())
            .filter(|d| d.state() != DomainState::Dead)
            .ok_or(XenError::ESRCH)?;
        let s = DomainStats {
            evtchn_sends: d.io.evtchn_sends,
            grant_copy_bytes: d.io.grant_copy_bytes,
            grant_copies_done: d.io.grant_copies_done,
            grant_maps: d.io.grant_maps,
            console_out_bytes: d.console.output_total(),
            console_in_bytes: d.console.input_total(),
        };
        if let Some(dst) = buf.get_mut(16..) {
            s.encode(dst);
        }
        self.mem()?.copy_to_guest(arg, buf)?;
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use alloc::string::String;
    use alloc::vec::Vec;

    use shared_abi::DomId;
    use shared_abi::capability::Capabilities;
    use shared_abi::domid::{DOMID_SELF, DOMID_XEN};
    use shared_abi::errno::XenError;
    use shared_abi::event_channel::virq;
    use shared_abi::hypercall::{self as hc, console_io};
    use shared_abi::hypercall_args::Wire;
    use shared_abi::hypercall_args::domctl::{
        self as dc, ConsoleRead, ConsoleWrite, DomainStats, MaxMem,
    };
    use shared_abi::start_info::HEAP_BASE;

    use crate::domain::builder::DomainConfig;
    use crate::domain::console::DOMAIN_HISTORY_BYTES;
    use crate::domain::elf::testelf;
    use crate::domain::fake::{self, Env};
    use crate::domain::guest_memory::GuestMemory;
    use crate::domain::hypervisor::{HvConfig, Hypervisor};
    use crate::domain::{DomainState, ExitReason, ShutdownReason};

    const ARG: u64 = HEAP_BASE;
    const BUF: u64 = HEAP_BASE + 0x1000;

    fn cfg(name: &str, caps: Capabilities) -> DomainConfig {
        crate::domain::fake::test_config(name, 1024, caps)
    }

    /// Domain 1 "ctl" with `caps` (running on the one CPU), domain 2 "guest" (paused).
    fn system(caps: Capabilities) -> (Env, Hypervisor) {
        let mut env = Env::new(4096);
        let mut hv = Hypervisor::new(1, HvConfig::default(), 0);
        for (name, c) in [("ctl", caps), ("guest", Capabilities::empty())] {
            hv.build_domain(&mut env.platform(), &cfg(name, c), &testelf::good())
                .unwrap();
        }
        hv.sched.pause_domain(2, 0);
        hv.schedule(&mut env.platform(), 0);
        (env, hv)
    }

    fn mem<'a>(env: &'a Env, hv: &'a Hypervisor, d: DomId) -> GuestMemory<'a> {
        GuestMemory::new(
            hv.domains.get(d).unwrap().aspace.as_deref().unwrap(),
            &env.phys,
        )
    }

    fn domctl(env: &mut Env, hv: &mut Hypervisor, cmd: u32, dom: DomId, payload: &[u8]) -> i64 {
        fake::domctl(env, hv, 1, 0, ARG, cmd, dom, payload).0
    }

    /// `CONSOLE_READ` of `dom` from `from`, `len` bytes into BUF: (ret, payload out, data).
    fn read(
        env: &mut Env,
        hv: &mut Hypervisor,
        dom: DomId,
        req: ConsoleRead,
    ) -> (i64, ConsoleRead, Vec<u8>) {
        let mut p = [0u8; ConsoleRead::SIZE];
        req.encode(&mut p);
        let r = domctl(env, hv, dc::CONSOLE_READ, dom, &p);
        let mut out = [0u8; dc::DOMCTL_LEN];
        mem(env, hv, 1).copy_from_guest(ARG, &mut out).unwrap();
        let got = ConsoleRead::decode(&out[16..]).unwrap();
        let mut data = alloc::vec![0u8; usize::try_from(r).unwrap_or(0)];
        mem(env, hv, 1).copy_from_guest(BUF, &mut data).unwrap();
        (r, got, data)
    }

    fn req(from: u64, len: u32) -> ConsoleRead {
        ConsoleRead {
            from,
            buffer: BUF,
            len,
            ..ConsoleRead::default()
        }
    }

    /// The guest (domain 2) writes `text` on its console.
    fn guest_writes(env: &mut Env, hv: &mut Hypervisor, text: &[u8]) {
        let d = hv.domains.get_mut(2).unwrap();
        d.console.write("guest", text, &mut env.console);
    }

    #[test]
    fn a_domain_history_reads_from_offsets_and_resumes() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        guest_writes(&mut env, &mut hv, b"hello from domain 2\npartial");
        let (r, out, data) = read(&mut env, &mut hv, 2, req(0, 4096));
        assert_eq!(r, 27);
        assert_eq!(data, b"hello from domain 2\npartial");
        assert_eq!((out.next, out.lost, out.done), (27, 0, 27));
        let (r, out, _) = read(&mut env, &mut hv, 2, req(out.next, 4096));
        assert_eq!((r, out.next), (0, 27), "nothing new");
        let (r, out, data) = read(&mut env, &mut hv, 2, req(6, 4));
        assert_eq!((r, out.next, &data[..]), (4, 10, &b"from"[..]));
        // The caller's own console, through DOMID_SELF: empty so far.
        assert_eq!(read(&mut env, &mut hv, DOMID_SELF, req(0, 16)).0, 0);
    }

    #[test]
    fn a_reader_that_fell_behind_learns_how_much_it_lost() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        let line = [b'x'; 99];
        for _ in 0..(DOMAIN_HISTORY_BYTES / 100 + 20) {
            guest_writes(&mut env, &mut hv, &line);
            guest_writes(&mut env, &mut hv, b"\n");
        }
        let written = (DOMAIN_HISTORY_BYTES / 100 + 20) as u64 * 100;
        let (r, out, _) = read(&mut env, &mut hv, 2, req(0, 4096));
        assert_eq!(r, 4096);
        assert_eq!(out.lost, written - DOMAIN_HISTORY_BYTES as u64);
        assert_eq!(out.next, out.lost + 4096);
    }

    #[test]
    fn dmesg_reads_the_hypervisors_log() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        hv.crash(&mut env.platform(), 2);
        let (r, out, data) = read(&mut env, &mut hv, DOMID_XEN, req(0, 4096));
        assert!(r > 0);
        // The fake console keeps everything written to it (see `fake::Lines`).
        assert_eq!(data, env.console.0);
        assert!(
            String::from_utf8_lossy(&data).contains("(hv) domain 2 (guest) stopped"),
            "{}",
            String::from_utf8_lossy(&data)
        );
        let (r, _, _) = read(&mut env, &mut hv, DOMID_XEN, req(out.next, 4096));
        assert_eq!(r, 0);
    }

    #[test]
    fn hostile_reads_get_their_errno() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        guest_writes(&mut env, &mut hv, b"abc\n");
        for (what, dom, r, want) in [
            ("beyond the end", 2, req(5, 16), XenError::EINVAL),
            ("offset u64::MAX", 2, req(u64::MAX, 16), XenError::EINVAL),
            (
                "len over the max",
                2,
                req(0, dc::CONSOLE_READ_MAX + 1),
                XenError::EINVAL,
            ),
            ("len u32::MAX", 2, req(0, u32::MAX), XenError::EINVAL),
            (
                "pad",
                2,
                ConsoleRead {
                    pad: 1,
                    ..req(0, 4)
                },
                XenError::EINVAL,
            ),
            (
                "buffer unmapped",
                2,
                ConsoleRead {
                    buffer: 0x1000,
                    ..req(0, 4)
                },
                XenError::EFAULT,
            ),
            (
                "buffer in the hypervisor",
                2,
                ConsoleRead {
                    buffer: 0xffff_8000_0000_0000,
                    ..req(0, 4)
                },
                XenError::EFAULT,
            ),
            (
                "buffer wrapping the address space",
                2,
                ConsoleRead {
                    buffer: u64::MAX - 1,
                    ..req(0, 4)
                },
                XenError::EFAULT,
            ),
            ("unknown domain", 77, req(0, 4), XenError::ESRCH),
            (
                "dmesg beyond its end",
                DOMID_XEN,
                req(u64::MAX, 4),
                XenError::EINVAL,
            ),
        ] {
            assert_eq!(read(&mut env, &mut hv, dom, r).0, want.as_ret(), "{what}");
        }
        // An empty read of a good offset is fine.
        assert_eq!(read(&mut env, &mut hv, 2, req(4, 0)).0, 0);
    }

    #[test]
    fn without_domain_control_it_is_eperm() {
        let (mut env, mut hv) = system(Capabilities::all() - Capabilities::DOMAIN_CONTROL);
        guest_writes(&mut env, &mut hv, b"secret\n");
        for dom in [2, DOMID_XEN, 77] {
            assert_eq!(
                read(&mut env, &mut hv, dom, req(0, 16)).0,
                XenError::EPERM.as_ret()
            );
        }
    }

    #[test]
    fn a_preserved_domain_keeps_its_history_and_a_reaped_one_frees_it() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        guest_writes(&mut env, &mut hv, b"last words\n");
        hv.preserve.insert(2, dc::CREATE_PRESERVE_CRASH);
        hv.shutdown_domain(
            &mut env.platform(),
            2,
            ExitReason::Shutdown(ShutdownReason::Crash),
        );
        assert!(matches!(
            hv.domains.get(2).unwrap().state(),
            DomainState::Shutdown(_)
        ));
        let (r, _, data) = read(&mut env, &mut hv, 2, req(0, 64));
        assert_eq!((r, &data[..]), (11, &b"last words\n"[..]));
        hv.destroy_domain(&mut env.platform(), 2);
        let d = hv.domains.get(2).unwrap();
        assert_eq!(d.state(), DomainState::Dead);
        assert_eq!(d.console.history().capacity(), 0, "history freed");
        assert_eq!(
            read(&mut env, &mut hv, 2, req(0, 64)).0,
            XenError::ESRCH.as_ret()
        );
    }

    /// `CONSOLE_WRITE` of `data` (put at BUF) to `dom`: (ret, `done` out).
    fn cwrite(
        env: &mut Env,
        hv: &mut Hypervisor,
        dom: DomId,
        req: ConsoleWrite,
        data: &[u8],
    ) -> (i64, u32) {
        mem(env, hv, 1).copy_to_guest(BUF, data).unwrap();
        let mut p = [0u8; ConsoleWrite::SIZE];
        req.encode(&mut p);
        let r = domctl(env, hv, dc::CONSOLE_WRITE, dom, &p);
        let mut out = [0u8; dc::DOMCTL_LEN];
        mem(env, hv, 1).copy_from_guest(ARG, &mut out).unwrap();
        (r, ConsoleWrite::decode(&out[16..]).unwrap().done)
    }

    fn wreq(len: u32) -> ConsoleWrite {
        ConsoleWrite {
            buffer: BUF,
            len,
            ..ConsoleWrite::default()
        }
    }

    /// Domain 1 (current on CPU 0) calls `console_io(READ, count, BUF)`: (ret, bytes).
    fn guest_read(env: &mut Env, hv: &mut Hypervisor, count: u64) -> (i64, Vec<u8>) {
        let r = hv
            .hypercall(
                &mut env.platform(),
                0,
                hc::CONSOLE_IO,
                [console_io::READ, count, BUF, 0, 0],
            )
            .ret;
        let mut data = alloc::vec![0u8; usize::try_from(r).unwrap_or(0)];
        mem(env, hv, 1).copy_from_guest(BUF, &mut data).unwrap();
        (r, data)
    }

    #[test]
    fn console_input_reaches_the_domain_and_raises_virq_console() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        // Domain 1 is the one running here, so it plays the guest reading its own input.
        let port = fake::bind_virq(&mut env, &mut hv, 1, 0, ARG, virq::CONSOLE);
        assert!(!fake::event_pending(&env, &hv, 1, port));
        assert_eq!(
            guest_read(&mut env, &mut hv, 64),
            (0, Vec::new()),
            "none yet"
        );
        assert_eq!(
            cwrite(&mut env, &mut hv, DOMID_SELF, wreq(9), b"hi there\n"),
            (9, 9)
        );
        assert!(
            fake::event_pending(&env, &hv, 1, port),
            "VIRQ_CONSOLE raised"
        );
        assert_eq!(guest_read(&mut env, &mut hv, 3), (3, b"hi ".to_vec()));
        assert_eq!(
            guest_read(&mut env, &mut hv, u64::MAX),
            (6, b"there\n".to_vec())
        );
        assert_eq!(guest_read(&mut env, &mut hv, 64).0, 0);
        // A read into a bad buffer takes nothing away.
        assert_eq!(
            cwrite(&mut env, &mut hv, DOMID_SELF, wreq(2), b"ok"),
            (2, 2)
        );
        let r = hv
            .hypercall(
                &mut env.platform(),
                0,
                hc::CONSOLE_IO,
                [console_io::READ, 2, 0xffff_8000_0000_0000, 0, 0],
            )
            .ret;
        assert_eq!(r, XenError::EFAULT.as_ret());
        assert_eq!(guest_read(&mut env, &mut hv, 64), (2, b"ok".to_vec()));
        // The other domain's input is its own.
        assert_eq!(cwrite(&mut env, &mut hv, 2, wreq(4), b"dom2"), (4, 4));
        assert_eq!(guest_read(&mut env, &mut hv, 64).0, 0);
        assert_eq!(hv.domains.get(2).unwrap().console.input_len(), 4);
    }

    #[test]
    fn console_input_is_bounded_short_count_then_eagain() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        let data = [b'x'; dc::CONSOLE_WRITE_MAX as usize];
        assert_eq!(
            cwrite(&mut env, &mut hv, 2, wreq(1000), &data),
            (1000, 1000)
        );
        assert_eq!(
            cwrite(&mut env, &mut hv, 2, wreq(100), &data),
            (24, 24),
            "short"
        );
        assert_eq!(
            cwrite(&mut env, &mut hv, 2, wreq(1), &data).0,
            XenError::EAGAIN.as_ret(),
            "full"
        );
        assert_eq!(
            cwrite(&mut env, &mut hv, 2, wreq(0), &data),
            (0, 0),
            "empty is fine"
        );
        assert_eq!(
            hv.domains.get(2).unwrap().console.input_len(),
            dc::CONSOLE_INPUT_BYTES
        );
    }

    #[test]
    fn hostile_console_writes_get_their_errno() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        for (what, dom, req, want) in [
            ("unknown domain", 77, wreq(4), XenError::ESRCH),
            ("the hypervisor", DOMID_XEN, wreq(4), XenError::ESRCH),
            (
                "len over the max",
                2,
                wreq(dc::CONSOLE_WRITE_MAX + 1),
                XenError::EINVAL,
            ),
            ("len u32::MAX", 2, wreq(u32::MAX), XenError::EINVAL),
            (
                "pad",
                2,
                ConsoleWrite { pad: 1, ..wreq(4) },
                XenError::EINVAL,
            ),
            (
                "buffer unmapped",
                2,
                ConsoleWrite {
                    buffer: 0x1000,
                    ..wreq(4)
                },
                XenError::EFAULT,
            ),
            (
                "buffer in the hypervisor",
                2,
                ConsoleWrite {
                    buffer: 0xffff_8000_0000_0000,
                    ..wreq(4)
                },
                XenError::EFAULT,
            ),
            (
                "buffer wrapping",
                2,
                ConsoleWrite {
                    buffer: u64::MAX - 1,
                    ..wreq(4)
                },
                XenError::EFAULT,
            ),
        ] {
            assert_eq!(
                cwrite(&mut env, &mut hv, dom, req, b"abcd").0,
                want.as_ret(),
                "{what}"
            );
        }
        assert_eq!(
            hv.domains.get(2).unwrap().console.input_len(),
            0,
            "nothing taken"
        );
        // A dead domain.
        hv.destroy_domain(&mut env.platform(), 2);
        assert_eq!(
            cwrite(&mut env, &mut hv, 2, wreq(4), b"abcd").0,
            XenError::ESRCH.as_ret()
        );
        // Without domain control.
        let (mut env, mut hv) = system(Capabilities::all() - Capabilities::DOMAIN_CONTROL);
        for dom in [2, DOMID_SELF, 77] {
            assert_eq!(
                cwrite(&mut env, &mut hv, dom, wreq(4), b"abcd").0,
                XenError::EPERM.as_ret()
            );
        }
        assert_eq!(hv.domains.get(2).unwrap().console.input_len(), 0);
    }

    fn stats(env: &mut Env, hv: &mut Hypervisor, dom: DomId) -> (i64, DomainStats) {
        let (r, out) = fake::domctl(env, hv, 1, 0, ARG, dc::DOMAIN_STATS, dom, &[]);
        (r, DomainStats::decode(&out[16..]).unwrap())
    }

    #[test]
    fn domain_stats_report_the_counters() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        guest_writes(&mut env, &mut hv, b"ignored: counted by console_io\n");
        mem(&env, &hv, 1).copy_to_guest(BUF, b"hello\n").unwrap();
        let r = hv
            .hypercall(
                &mut env.platform(),
                0,
                hc::CONSOLE_IO,
                [console_io::WRITE, 6, BUF, 0, 0],
            )
            .ret;
        assert_eq!(r, 0);
        assert_eq!(cwrite(&mut env, &mut hv, 2, wreq(3), b"abc"), (3, 3));
        hv.domains.get_mut(2).unwrap().io.evtchn_sends = 5;
        let (r, s) = stats(&mut env, &mut hv, 2);
        assert_eq!(r, 0);
        assert_eq!(
            (s.console_in_bytes, s.evtchn_sends, s.console_out_bytes),
            (3, 5, 0)
        );
        let (r, s) = stats(&mut env, &mut hv, DOMID_SELF);
        assert_eq!((r, s.console_out_bytes, s.console_in_bytes), (0, 6, 0));
        assert_eq!(stats(&mut env, &mut hv, 77).0, XenError::ESRCH.as_ret());
        let (mut env, mut hv) = system(Capabilities::all() - Capabilities::DOMAIN_CONTROL);
        assert_eq!(stats(&mut env, &mut hv, 2).0, XenError::EPERM.as_ret());
    }

    fn max_mem(env: &mut Env, hv: &mut Hypervisor, dom: DomId, kib: u64) -> i64 {
        let mut p = [0u8; MaxMem::SIZE];
        MaxMem { max_memkb: kib }.encode(&mut p);
        domctl(env, hv, dc::MAX_MEM, dom, &p)
    }

    #[test]
    fn max_mem_sets_the_limit_and_takes_nothing_away() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        let used = hv.domains.get(2).unwrap().reservation.used();
        let held = env.frames.outstanding();
        assert_eq!(max_mem(&mut env, &mut hv, 2, 2048), 0);
        assert_eq!(hv.domains.get(2).unwrap().reservation.limit(), 512);
        // Below what it holds: set, nothing taken; new allocations are refused.
        assert_eq!(max_mem(&mut env, &mut hv, 2, 8 + 3), 0);
        let d = hv.domains.get(2).unwrap();
        assert_eq!((d.reservation.limit(), d.reservation.used()), (2, used));
        assert_eq!(d.reservation.available(), 0);
        assert_eq!(env.frames.outstanding(), held);
        assert_eq!(max_mem(&mut env, &mut hv, DOMID_SELF, 4096), 0);
        assert_eq!(hv.domains.get(1).unwrap().reservation.limit(), 1024);
        for (dom, kib, want) in [
            (77, 4096, XenError::ESRCH),
            (
                2,
                shared_abi::manifest::MAX_MEMORY_KIB + 4,
                XenError::EINVAL,
            ),
            (2, u64::MAX, XenError::EINVAL),
        ] {
            assert_eq!(max_mem(&mut env, &mut hv, dom, kib), want.as_ret());
        }
        let (mut env, mut hv) = system(Capabilities::all() - Capabilities::DOMAIN_CONTROL);
        let before = hv.domains.get(2).unwrap().reservation.limit();
        assert_eq!(
            max_mem(&mut env, &mut hv, 2, 4096),
            XenError::EPERM.as_ret()
        );
        assert_eq!(hv.domains.get(2).unwrap().reservation.limit(), before);
    }
}
