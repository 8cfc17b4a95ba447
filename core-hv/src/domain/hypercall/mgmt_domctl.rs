//! `domctl` `MGMT_IO` (Bulkhead): the control domain moves bytes on the management serial
//! line, the one channel between the host's `hvctl` and the toolstack. The hypervisor only
//! carries bytes (framing, versions and checks are the management protocol's, in ctl-dom);
//! it never waits: a read takes what has arrived, a write what the line accepts now.

use shared_abi::errno::XenError;
use shared_abi::hypercall_args::Wire;
use shared_abi::hypercall_args::domctl::{self as dc, MgmtIo};

use super::{Call, HcResult};
use crate::policy;

impl Call<'_, '_> {
    /// `buf` is the whole domctl (header + payload) already copied in from `arg`.
    pub(super) fn mgmt_io(&mut self, arg: u64, buf: &mut [u8]) -> HcResult {
        policy::toolstack(self.caller())?;
        let mut req =
            MgmtIo::decode(buf.get(16..).ok_or(XenError::EFAULT)?).ok_or(XenError::EFAULT)?;
        if req.len > dc::MGMT_IO_MAX || req.pad != 0 {
            return Err(XenError::EINVAL);
        }
        if !self.p.mgmt.present() {
            return Err(XenError::ENODEV);
        }
        let mut data = alloc::vec![0u8; req.len as usize];
        let done = match req.op {
            dc::MGMT_READ => {
                // Check the buffer first: bytes taken off the line must not be lost to a bad
                // address.
                self.mem()?.copy_to_guest(req.buffer, &data)?;
                let n = self.p.mgmt.read(&mut data);
                self.mem()?.copy_to_guest(req.buffer, &data[..n])?;
                n
            }
            dc::MGMT_WRITE => {
                self.mem()?.copy_from_guest(req.buffer, &mut data)?;
                self.p.mgmt.write(&data)
            }
            _ => return Err(XenError::EINVAL),
        };
        req.done = done as u32;
        if let Some(dst) = buf.get_mut(16..) {
            req.encode(dst);
        }
        self.mem()?.copy_to_guest(arg, buf)?;
        Ok(done as i64)
    }
}

#[cfg(test)]
mod tests {

    use shared_abi::DomId;
    use shared_abi::capability::Capabilities;
    use shared_abi::errno::XenError;
    use shared_abi::hypercall_args::Wire;
    use shared_abi::hypercall_args::domctl::{self as dc, MgmtIo};
    use shared_abi::start_info::HEAP_BASE;

    use crate::domain::elf::testelf;
    use crate::domain::fake::{self, Env};
    use crate::domain::guest_memory::GuestMemory;
    use crate::domain::hypervisor::{HvConfig, Hypervisor};

    const ARG: u64 = HEAP_BASE;
    const BUF: u64 = HEAP_BASE + 0x1000;

    /// Domain 1 with DOMAIN_CONTROL, alone on one CPU.
    fn system(caps: Capabilities) -> (Env, Hypervisor) {
        let mut env = Env::new(4096);
        env.mgmt.present = true;
        let mut hv = Hypervisor::new(1, HvConfig::default(), 0);
        let c = crate::domain::fake::test_config("ctl", 1024, caps);
        hv.build_domain(&mut env.platform(), &c, &testelf::good())
            .unwrap();
        hv.schedule(&mut env.platform(), 0);
        (env, hv)
    }

    fn mem<'a>(env: &'a Env, hv: &'a Hypervisor, d: DomId) -> GuestMemory<'a> {
        GuestMemory::new(
            hv.domains.get(d).unwrap().aspace.as_deref().unwrap(),
            &env.phys,
        )
    }

    fn io(env: &mut Env, hv: &mut Hypervisor, req: MgmtIo) -> i64 {
        let mut p = [0u8; MgmtIo::SIZE];
        req.encode(&mut p);
        fake::domctl(env, hv, 1, 0, ARG, dc::MGMT_IO, 0, &p).0
    }

    fn req(op: u32, len: u32) -> MgmtIo {
        MgmtIo {
            buffer: BUF,
            len,
            op,
            ..MgmtIo::default()
        }
    }

    #[test]
    fn bytes_go_both_ways_and_a_read_never_waits() {
        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        env.mgmt.rx.extend(b"BHMC hello");
        assert_eq!(io(&mut env, &mut hv, req(dc::MGMT_READ, 4)), 4);
        let mut got = [0u8; 4];
        mem(&env, &hv, 1).copy_from_guest(BUF, &mut got).unwrap();
        assert_eq!(&got, b"BHMC");
        assert_eq!(io(&mut env, &mut hv, req(dc::MGMT_READ, 100)), 6);
        assert_eq!(
            io(&mut env, &mut hv, req(dc::MGMT_READ, 100)),
            0,
            "nothing left"
        );
        mem(&env, &hv, 1).copy_to_guest(BUF, b"reply").unwrap();
        assert_eq!(io(&mut env, &mut hv, req(dc::MGMT_WRITE, 5)), 5);
        assert_eq!(env.mgmt.tx, b"reply");
    }

    #[test]
    fn refusals() {
        let (mut env, mut hv) = system(Capabilities::empty());
        env.mgmt.rx.extend(b"secret");
        assert_eq!(
            io(&mut env, &mut hv, req(dc::MGMT_READ, 6)),
            XenError::EPERM.as_ret()
        );
        assert_eq!(env.mgmt.rx.len(), 6, "nothing taken");

        let (mut env, mut hv) = system(Capabilities::DOMAIN_CONTROL);
        env.mgmt.rx.extend(b"keep");
        for (r, want) in [
            (req(dc::MGMT_READ, dc::MGMT_IO_MAX + 1), XenError::EINVAL),
            (req(7, 4), XenError::EINVAL),
            (
                MgmtIo {
                    pad: 1,
                    ..req(dc::MGMT_READ, 4)
                },
                XenError::EINVAL,
            ),
            (
                MgmtIo {
                    buffer: 0x1000,
                    ..req(dc::MGMT_READ, 4)
                },
                XenError::EFAULT,
            ),
            (
                MgmtIo {
                    buffer: 0x1000,
                    ..req(dc::MGMT_WRITE, 4)
                },
                XenError::EFAULT,
            ),
        ] {
            assert_eq!(io(&mut env, &mut hv, r), want.as_ret(), "{r:?}");
        }
        assert_eq!(env.mgmt.rx.len(), 4, "a bad buffer loses no received byte");
        assert!(env.mgmt.tx.is_empty());
        env.mgmt.present = false;
        assert_eq!(
            io(&mut env, &mut hv, req(dc::MGMT_READ, 4)),
            XenError::ENODEV.as_ret()
        );
    }
}
