//! For the xenstore service domain: `domctl XENSTORE_DOMAINS`, the domains it serves and
//! the port each offered it (needs `XENSTORE_SERVICE`; anyone else gets `EPERM`).

use alloc::vec::Vec;

use shared_abi::errno::XenError;
use shared_abi::hypercall_args::domctl::{self as dc, XenstoreDomain};

/// Every domain but this one, in id order, with its state and offered xenstore port.
pub fn xenstore_domains() -> Result<Vec<XenstoreDomain>, XenError> {
    crate::domctl::list_paged(dc::XENSTORE_DOMAINS, |r: &XenstoreDomain| r.domid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::MOCK;
    use alloc::vec::Vec;
    use shared_abi::hypercall as hc;
    use shared_abi::hypercall_args::Wire;
    use shared_abi::hypercall_args::domctl::{DomctlHeader, ListDomains};

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
