//! `domctl` `CONSOLE_READ` (Bulkhead): the control domain reads a domain's console history
//! or the hypervisor's own log (dmesg, target `DOMID_XEN`) from a running byte offset (see
//! [`crate::domain::console::HistoryRing`]). Reading takes nothing away: several readers
//! may follow the same history, each with its own offset.

use shared_abi::domid::DOMID_XEN;
use shared_abi::errno::XenError;
use shared_abi::hypercall_args::Wire;
use shared_abi::hypercall_args::domctl::{self as dc, ConsoleRead};

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

#[cfg(test)]
mod tests {
    use alloc::string::String;
    use alloc::vec::Vec;

    use shared_abi::DomId;
    use shared_abi::capability::Capabilities;
    use shared_abi::domid::{DOMID_SELF, DOMID_XEN};
    use shared_abi::errno::XenError;
    use shared_abi::hypercall_args::Wire;
    use shared_abi::hypercall_args::domctl::{self as dc, ConsoleRead, MaxMem};
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
