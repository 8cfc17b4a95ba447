//! The one checked accessor through which the hypervisor reads or writes memory a domain
//! names: every pointer a hypercall carries goes through [`GuestMemory`].
//!
//! A domain address is an allegation until checked (cf. Hubris `USlice`). A copy is refused
//! with `-EFAULT` if any byte of the range is non-canonical, in the hypervisor half or above
//! the domain window (`DOMAIN_VA_END`), wraps around, lies on an unmapped page, on a page
//! without `USER`, or (for writes) on a read-only page. Every page of the range is checked
//! before the first byte moves, so a refused copy has no partial effect.
//!
//! The accessor copies; it never hands out references into guest pages, so a domain changing
//! the bytes during or after the copy cannot make the hypervisor read them twice (no double
//! fetch: callers decode the copy).

use shared_abi::errno::XenError;
use shared_abi::hypercall_args::Wire;
use shared_abi::start_info::DOMAIN_VA_END;

use super::memory::{AddressSpace, Mfn, PAGE_SIZE, PagePerms, PhysMem};

/// Largest single copy (bounds the hypervisor's work per hypercall argument).
pub const MAX_COPY: usize = 1 << 20;

/// A domain's memory as the hypervisor may touch it on the domain's behalf.
pub struct GuestMemory<'a> {
    aspace: &'a dyn AddressSpace,
    phys: &'a dyn PhysMem,
}

impl<'a> GuestMemory<'a> {
    pub fn new(aspace: &'a dyn AddressSpace, phys: &'a dyn PhysMem) -> Self {
        GuestMemory { aspace, phys }
    }

    /// Check `va .. va + len` page by page and call `f(frame, offset_in_page, range_in_buf)`
    /// for each chunk, but only after every page passed.
    fn walk(
        &self,
        va: u64,
        len: usize,
        need: PagePerms,
        mut f: impl FnMut(Mfn, usize, core::ops::Range<usize>),
    ) -> Result<(), XenError> {
        if len == 0 {
            return Ok(());
        }
        if len > MAX_COPY {
            return Err(XenError::EFAULT);
        }
        let end = va.checked_add(len as u64).ok_or(XenError::EFAULT)?;
        if end > DOMAIN_VA_END {
            return Err(XenError::EFAULT);
        }
        let need = need | PagePerms::USER;
        let first = va & !(PAGE_SIZE - 1);
        let mut page = first;
        while page < end {
            match self.aspace.translate(page) {
                // Device pages are not memory: an argument there is refused, not copied.
                Some((_, perms))
                    if perms.contains(need) && !perms.contains(PagePerms::UNCACHED) => {}
                _ => return Err(XenError::EFAULT),
            }
            page += PAGE_SIZE;
        }
        let mut at = va;
        let mut done = 0usize;
        while at < end {
            let page = at & !(PAGE_SIZE - 1);
            let off = (at - page) as usize;
            let chunk = ((PAGE_SIZE as usize) - off).min((end - at) as usize);
            // Checked above; the big hypervisor lock keeps the mapping from changing between.
            let (frame, _) = self.aspace.translate(page).ok_or(XenError::EFAULT)?;
            f(frame, off, done..done + chunk);
            done += chunk;
            at += chunk as u64;
        }
        Ok(())
    }

    /// Copy `buf.len()` bytes from domain address `va`.
    pub fn copy_from_guest(&self, va: u64, buf: &mut [u8]) -> Result<(), XenError> {
        let phys = self.phys;
        self.walk(va, buf.len(), PagePerms::empty(), |frame, off, r| {
            phys.read(frame, off, &mut buf[r])
        })
    }

    /// Copy `data` to domain address `va` (every page must be writable by the domain).
    pub fn copy_to_guest(&self, va: u64, data: &[u8]) -> Result<(), XenError> {
        let phys = self.phys;
        self.walk(va, data.len(), PagePerms::WRITE, |frame, off, r| {
            phys.write(frame, off, &data[r])
        })
    }

    /// Read and decode one argument structure.
    pub fn read<T: Wire>(&self, va: u64) -> Result<T, XenError> {
        let mut buf = [0u8; 256];
        let b = buf.get_mut(..T::SIZE).ok_or(XenError::EINVAL)?;
        self.copy_from_guest(va, b)?;
        T::decode(b).ok_or(XenError::EFAULT)
    }

    /// Encode and write one argument structure.
    pub fn write<T: Wire>(&self, va: u64, value: &T) -> Result<(), XenError> {
        let mut buf = [0u8; 256];
        let b = buf.get_mut(..T::SIZE).ok_or(XenError::EINVAL)?;
        if !value.encode(b) {
            return Err(XenError::EINVAL);
        }
        self.copy_to_guest(va, b)
    }

    /// Read the `index`th little-endian `u64` of an array at `va`.
    pub fn read_u64_at(&self, va: u64, index: u64) -> Result<u64, XenError> {
        let at = index
            .checked_mul(8)
            .and_then(|o| va.checked_add(o))
            .ok_or(XenError::EFAULT)?;
        let mut b = [0u8; 8];
        self.copy_from_guest(at, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Read the `index`th little-endian `u32` of an array at `va`.
    pub fn read_u32_at(&self, va: u64, index: u64) -> Result<u32, XenError> {
        let at = index
            .checked_mul(4)
            .and_then(|o| va.checked_add(o))
            .ok_or(XenError::EFAULT)?;
        let mut b = [0u8; 4];
        self.copy_from_guest(at, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::fake::{FakeAddressSpace, FakeFrames, FakePhys};
    use crate::domain::memory::FrameSource;
    use proptest::prelude::*;

    struct Setup {
        aspace: FakeAddressSpace,
        phys: FakePhys,
    }

    /// Pages: 0x40_0000 RX, 0x40_1000 RW, 0x40_2000 RW, 0x40_3000 unmapped, 0x40_4000 RO,
    /// 0x40_5000 RW without USER.
    fn setup() -> Setup {
        let mut frames = FakeFrames::new(64);
        let mut aspace = FakeAddressSpace::new();
        let phys = FakePhys::default();
        for (va, perms) in [
            (0x40_0000, PagePerms::USER_RX),
            (0x40_1000, PagePerms::USER_RW),
            (0x40_2000, PagePerms::USER_RW),
            (0x40_4000, PagePerms::USER_RO),
            (0x40_5000, PagePerms::WRITE),
        ] {
            let f = frames.alloc_frame().unwrap();
            aspace.map(va, f, perms, &mut frames).unwrap();
        }
        Setup { aspace, phys }
    }

    #[test]
    fn copy_round_trips_across_a_page_boundary() {
        let s = setup();
        let g = GuestMemory::new(&s.aspace, &s.phys);
        let data: alloc::vec::Vec<u8> = (0..100u8).collect();
        g.copy_to_guest(0x40_1fd0, &data).unwrap();
        let mut back = [0u8; 100];
        g.copy_from_guest(0x40_1fd0, &mut back).unwrap();
        assert_eq!(&back[..], &data[..]);
    }

    #[test]
    fn copy_refuses_unmapped_readonly_supervisor_and_out_of_window_ranges() {
        let s = setup();
        let g = GuestMemory::new(&s.aspace, &s.phys);
        let mut b = [0u8; 16];
        // Crossing from a mapped page into an unmapped one.
        assert_eq!(g.copy_from_guest(0x40_2ff8, &mut b), Err(XenError::EFAULT));
        // Writing read-only and executable pages.
        assert_eq!(g.copy_to_guest(0x40_4000, &b), Err(XenError::EFAULT));
        assert_eq!(g.copy_to_guest(0x40_0000, &b), Err(XenError::EFAULT));
        // Reading them is fine.
        g.copy_from_guest(0x40_4000, &mut b).unwrap();
        // A page without USER is the hypervisor's.
        assert_eq!(g.copy_from_guest(0x40_5000, &mut b), Err(XenError::EFAULT));
        // Upper half, non-canonical, end of address space, wrap-around.
        for va in [
            0xffff_8000_0000_0000u64,
            0x0000_8000_0000_0000,
            DOMAIN_VA_END,
            u64::MAX - 4,
        ] {
            assert_eq!(
                g.copy_from_guest(va, &mut b),
                Err(XenError::EFAULT),
                "{va:#x}"
            );
        }
        // Null page.
        assert_eq!(g.copy_from_guest(0, &mut b), Err(XenError::EFAULT));
    }

    #[test]
    fn refused_write_has_no_partial_effect() {
        let s = setup();
        let g = GuestMemory::new(&s.aspace, &s.phys);
        // 0x40_2000 is writable, 0x40_3000 is not mapped: nothing may be written.
        assert_eq!(
            g.copy_to_guest(0x40_2ff0, &[0xAA; 32]),
            Err(XenError::EFAULT)
        );
        let mut b = [0u8; 16];
        g.copy_from_guest(0x40_2ff0, &mut b).unwrap();
        assert_eq!(b, [0u8; 16]);
    }

    #[test]
    fn zero_length_copy_touches_nothing_and_succeeds() {
        let s = setup();
        let g = GuestMemory::new(&s.aspace, &s.phys);
        assert_eq!(g.copy_from_guest(u64::MAX, &mut []), Ok(()));
    }

    #[test]
    fn array_reads_refuse_overflowing_indices() {
        let s = setup();
        let g = GuestMemory::new(&s.aspace, &s.phys);
        assert_eq!(g.read_u64_at(0x40_1000, u64::MAX), Err(XenError::EFAULT));
        assert_eq!(g.read_u32_at(0x40_1000, 1 << 62), Err(XenError::EFAULT));
        assert_eq!(g.read_u64_at(0x40_1000, 3), Ok(0));
    }

    proptest! {
        #[test]
        fn accessor_never_panics_and_only_succeeds_on_user_pages(va in any::<u64>(), len in 0usize..9000) {
            let s = setup();
            let g = GuestMemory::new(&s.aspace, &s.phys);
            let mut buf = alloc::vec![0u8; len];
            let r = g.copy_from_guest(va, &mut buf);
            if r.is_ok() && len > 0 {
                let mut p = va & !0xfff;
                while p < va + len as u64 {
                    let (_, perms) = s.aspace.translate(p).unwrap();
                    prop_assert!(perms.contains(PagePerms::USER));
                    p += 0x1000;
                }
            }
        }
    }
}
