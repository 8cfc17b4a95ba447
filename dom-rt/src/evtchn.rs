//! Typed `event_channel_op` calls (2-level ABI): allocate, bind, send, unmask, close, query.
//!
//! Each wrapper copies its argument structure onto the stack, passes its address, and decodes
//! what the hypervisor wrote back; every failure is the hypervisor's `XenError`.

use shared_abi::DomId;
use shared_abi::domid::DOMID_SELF;
use shared_abi::errno::XenError;
use shared_abi::event_channel::{
    EvtchnAllocUnbound, EvtchnBindInterdomain, EvtchnBindIpi, EvtchnBindVcpu, EvtchnBindVirq,
    EvtchnClose, EvtchnPort, EvtchnReset, EvtchnSend, EvtchnStatus, EvtchnUnmask, StatusInfo, op,
};
use shared_abi::hypercall as hc;

use crate::hypercall::call;

fn evtchn_op(cmd: u32, arg: &mut [u8]) -> Result<(), XenError> {
    call(
        hc::EVENT_CHANNEL_OP,
        [u64::from(cmd), arg.as_mut_ptr() as u64, 0, 0, 0],
    )
    .map(|_| ())
}

/// `EVTCHNOP_alloc_unbound`: a new port of ours that `remote` may bind.
pub fn alloc_unbound(remote: DomId) -> Result<EvtchnPort, XenError> {
    let mut b = EvtchnAllocUnbound {
        dom: DOMID_SELF,
        remote_dom: remote,
        port: 0,
    }
    .to_bytes();
    evtchn_op(op::ALLOC_UNBOUND, &mut b)?;
    EvtchnAllocUnbound::from_bytes(&b)
        .map(|a| a.port)
        .ok_or(XenError::EFAULT)
}

/// `EVTCHNOP_bind_interdomain`: connect to `remote_port` that `remote` offered us; our port.
pub fn bind_interdomain(remote: DomId, remote_port: EvtchnPort) -> Result<EvtchnPort, XenError> {
    let mut b = EvtchnBindInterdomain {
        remote_dom: remote,
        remote_port,
        local_port: 0,
    }
    .to_bytes();
    evtchn_op(op::BIND_INTERDOMAIN, &mut b)?;
    EvtchnBindInterdomain::from_bytes(&b)
        .map(|a| a.local_port)
        .ok_or(XenError::EFAULT)
}

/// `EVTCHNOP_bind_virq` on `vcpu`.
pub fn bind_virq(virq: u32, vcpu: u32) -> Result<EvtchnPort, XenError> {
    let mut b = EvtchnBindVirq {
        virq,
        vcpu,
        port: 0,
    }
    .to_bytes();
    evtchn_op(op::BIND_VIRQ, &mut b)?;
    EvtchnBindVirq::from_bytes(&b)
        .map(|a| a.port)
        .ok_or(XenError::EFAULT)
}

/// `EVTCHNOP_bind_ipi` to `vcpu`.
pub fn bind_ipi(vcpu: u32) -> Result<EvtchnPort, XenError> {
    let mut b = EvtchnBindIpi { vcpu, port: 0 }.to_bytes();
    evtchn_op(op::BIND_IPI, &mut b)?;
    EvtchnBindIpi::from_bytes(&b)
        .map(|a| a.port)
        .ok_or(XenError::EFAULT)
}

/// `EVTCHNOP_send`.
pub fn send(port: EvtchnPort) -> Result<(), XenError> {
    evtchn_op(op::SEND, &mut EvtchnSend { port }.to_bytes())
}

/// `EVTCHNOP_close`.
pub fn close(port: EvtchnPort) -> Result<(), XenError> {
    evtchn_op(op::CLOSE, &mut EvtchnClose { port }.to_bytes())
}

/// `EVTCHNOP_unmask`: clear the mask bit and deliver the event if it is pending.
pub fn unmask(port: EvtchnPort) -> Result<(), XenError> {
    evtchn_op(op::UNMASK, &mut EvtchnUnmask { port }.to_bytes())
}

/// `EVTCHNOP_bind_vcpu`.
pub fn bind_vcpu(port: EvtchnPort, vcpu: u32) -> Result<(), XenError> {
    evtchn_op(op::BIND_VCPU, &mut EvtchnBindVcpu { port, vcpu }.to_bytes())
}

/// `EVTCHNOP_reset` of this domain: close every port.
pub fn reset() -> Result<(), XenError> {
    evtchn_op(op::RESET, &mut EvtchnReset { dom: DOMID_SELF }.to_bytes())
}

/// `EVTCHNOP_status` of one of `dom`'s ports: what it is and the vCPU it notifies.
pub fn status(dom: DomId, port: EvtchnPort) -> Result<(StatusInfo, u32), XenError> {
    let mut b = EvtchnStatus {
        dom,
        port,
        ..Default::default()
    }
    .to_bytes();
    evtchn_op(op::STATUS, &mut b)?;
    let s = EvtchnStatus::from_bytes(&b).ok_or(XenError::EFAULT)?;
    Ok((s.info().ok_or(XenError::EINVAL)?, s.vcpu))
}

/// Raw `event_channel_op` with an arbitrary sub-op and argument bytes (for tests of the
/// hypervisor's refusals): the result and the bytes after the call.
pub fn raw_op(cmd: u32, arg: &mut [u8]) -> Result<(), XenError> {
    evtchn_op(cmd, arg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::MOCK;

    fn fake(nr: u64, a: [u64; 5]) -> i64 {
        if nr != hc::EVENT_CHANNEL_OP {
            return XenError::ENOSYS.as_ret();
        }
        // SAFETY: the wrappers pass a pointer to a live stack buffer of the op's size.
        unsafe {
            match a[0] as u32 {
                op::ALLOC_UNBOUND => {
                    let p = (a[1] + 4) as *mut u32;
                    p.write_unaligned(7);
                    0
                }
                op::SEND => {
                    if (a[1] as *const u32).read_unaligned() == 7 {
                        0
                    } else {
                        XenError::EINVAL.as_ret()
                    }
                }
                _ => XenError::ENOSYS.as_ret(),
            }
        }
    }

    #[test]
    fn wrappers_pass_the_argument_and_decode_the_reply() {
        let _g = crate::hypercall::TEST_LOCK.lock();
        *MOCK.lock() = Some(fake);
        assert_eq!(alloc_unbound(3), Ok(7));
        assert_eq!(send(7), Ok(()));
        assert_eq!(send(8), Err(XenError::EINVAL));
        assert_eq!(close(7), Err(XenError::ENOSYS));
        *MOCK.lock() = None;
    }
}
