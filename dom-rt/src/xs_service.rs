//! For the xenstore service domain: `domctl XENSTORE_DOMAINS`, the domains it serves and
//! the port each offered it (needs `XENSTORE_SERVICE`; anyone else gets `EPERM`).

use alloc::vec;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::hypercall as hc;
use shared_abi::hypercall_args::Wire;
use shared_abi::hypercall_args::domctl::{self as dc, DomctlHeader, ListDomains, XenstoreDomain};

use crate::hypercall::call;

/// Most records asked for per call (the hypervisor's own cap).
pub const BATCH: u32 = 64;

/// Every domain but this one, in id order, with its state and offered xenstore port.
pub fn xenstore_domains() -> Result<Vec<XenstoreDomain>, XenError> {
    let mut all = Vec::new();
    let mut first: DomId = 0;
    loop {
        let mut out = vec![0u8; BATCH as usize * XenstoreDomain::SIZE];
        let mut b = [0u8; dc::DOMCTL_LEN];
        DomctlHeader {
            cmd: dc::XENSTORE_DOMAINS,
            interface_version: dc::INTERFACE_VERSION,
            domain: 0,
            pad: [0; 3],
        }
        .encode(&mut b);
        ListDomains {
            first_domain: first,
            pad: 0,
            max_domains: BATCH,
            buffer: out.as_mut_ptr() as u64,
        }
        .encode(&mut b[16..]);
        let n = call(hc::DOMCTL, [b.as_mut_ptr() as u64, 0, 0, 0, 0])?;
        // The hypervisor never writes more than asked; a larger count is refused, not trusted.
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= BATCH as usize)
            .ok_or(XenError::EIO)?;
        let recs: Vec<XenstoreDomain> = out
            .chunks(XenstoreDomain::SIZE)
            .take(n)
            .filter_map(XenstoreDomain::decode)
            .collect();
        let last = recs.last().map(|r| r.domid);
        all.extend(recs);
        match last {
            Some(l) if n == BATCH as usize && l < DomId::MAX => first = l + 1,
            _ => return Ok(all),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::MOCK;

    fn fake(nr: u64, a: [u64; 5]) -> i64 {
        if nr != hc::DOMCTL {
            return XenError::ENOSYS.as_ret();
        }
        // SAFETY: the wrapper passes a live DOMCTL_LEN buffer whose ListDomains names a live
        // buffer of `max_domains` records.
        unsafe {
            let b = core::slice::from_raw_parts(a[0] as *const u8, dc::DOMCTL_LEN);
            let h = DomctlHeader::decode(b).unwrap();
            if h.cmd != dc::XENSTORE_DOMAINS {
                return XenError::ENOSYS.as_ret();
            }
            let l = ListDomains::decode(&b[16..]).unwrap();
            let out = core::slice::from_raw_parts_mut(
                l.buffer as *mut u8,
                l.max_domains as usize * XenstoreDomain::SIZE,
            );
            // Domains 1..=100, port = id + 10.
            let ids: Vec<u16> = (l.first_domain.max(1)..=100)
                .take(l.max_domains as usize)
                .collect();
            for (i, id) in ids.iter().enumerate() {
                XenstoreDomain {
                    domid: *id,
                    port: u32::from(*id) + 10,
                    ..Default::default()
                }
                .encode(&mut out[i * XenstoreDomain::SIZE..]);
            }
            ids.len() as i64
        }
    }

    #[test]
    fn xenstore_domains_pages_through_every_batch() {
        let _g = crate::hypercall::TEST_LOCK.lock();
        *MOCK.lock() = Some(fake);
        let all = xenstore_domains().unwrap();
        *MOCK.lock() = None;
        assert_eq!(all.len(), 100);
        assert_eq!((all[0].domid, all[0].port), (1, 11));
        assert_eq!((all[99].domid, all[99].port), (100, 110));
    }

    #[test]
    fn xenstore_domains_passes_refusals_on() {
        let _g = crate::hypercall::TEST_LOCK.lock();
        *MOCK.lock() = Some(|_, _| XenError::EPERM.as_ret());
        let r = xenstore_domains();
        *MOCK.lock() = None;
        assert_eq!(r, Err(XenError::EPERM));
    }
}
