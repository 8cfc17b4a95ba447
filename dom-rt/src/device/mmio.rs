//! Mapped BAR ranges: bounds-checked volatile access to device registers.
//!
//! [`Mmio::map`] asks the hypervisor (`physdev_op` `MAP_BAR`) to map host-physical BAR pages
//! uncached into this domain's device window (`DEVICE_MMIO_BASE .. DEVICE_MMIO_END`). The
//! window holds no Rust objects and its mappings last for the domain's life, so a register
//! access is sound whenever the offset lies inside the mapped range and is aligned: that is
//! what every accessor checks.

use shared_abi::errno::XenError;
use shared_abi::start_info::{DEVICE_MMIO_BASE, DEVICE_MMIO_END};

use crate::hypercall;

/// A mapped range of device registers. Clones access the same registers (every access is a
/// single volatile load or store, so handles may coexist).
#[derive(Clone, Debug)]
pub struct Mmio {
    va: u64,
    len: u64,
}

/// Values a register can hold.
pub trait Register: Copy {
    const SIZE: u64;
}
impl Register for u8 {
    const SIZE: u64 = 1;
}
impl Register for u16 {
    const SIZE: u64 = 2;
}
impl Register for u32 {
    const SIZE: u64 = 4;
}
impl Register for u64 {
    const SIZE: u64 = 8;
}

impl Mmio {
    /// Map `[phys, phys + len)` of one of this domain's memory BARs. The hypervisor checks the
    /// range; the answer is checked here too (it must lie in the device window).
    pub fn map(phys: u64, len: u64) -> Result<Mmio, XenError> {
        if len == 0 {
            return Err(XenError::EINVAL);
        }
        let va = hypercall::map_bar(phys, len)?;
        let end = va.checked_add(len).ok_or(XenError::EFAULT)?;
        if va < DEVICE_MMIO_BASE || end > DEVICE_MMIO_END {
            return Err(XenError::EFAULT);
        }
        Ok(Mmio { va, len })
    }

    /// A register window over memory the caller provides (host tests, or a mapping made
    /// elsewhere).
    ///
    /// # Safety
    /// `[va, va + len)` must stay mapped readable and writable for the life of the value and
    /// must not be accessed through Rust references meanwhile.
    pub unsafe fn from_raw(va: u64, len: u64) -> Mmio {
        Mmio { va, len }
    }

    /// The domain address of the first byte.
    pub fn va(&self) -> u64 {
        self.va
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at<T: Register>(&self, offset: u64) -> Result<u64, XenError> {
        let end = offset.checked_add(T::SIZE).ok_or(XenError::EINVAL)?;
        if end > self.len || !(self.va + offset).is_multiple_of(T::SIZE) {
            return Err(XenError::EINVAL);
        }
        Ok(self.va + offset)
    }

    /// Volatile read of the register at `offset` (`EINVAL` if outside or misaligned).
    pub fn read<T: Register>(&self, offset: u64) -> Result<T, XenError> {
        let a = self.at::<T>(offset)?;
        // SAFETY: `a .. a + size_of::<T>()` lies inside the mapped range and is aligned (checked
        // above); the mapping lives as long as the domain and no reference points into it.
        Ok(unsafe { core::ptr::read_volatile(a as *const T) })
    }

    /// Volatile write of the register at `offset` (`EINVAL` if outside or misaligned).
    pub fn write<T: Register>(&self, offset: u64, value: T) -> Result<(), XenError> {
        let a = self.at::<T>(offset)?;
        // SAFETY: as in `read`; the mapping is writable.
        unsafe { core::ptr::write_volatile(a as *mut T, value) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_and_alignment_checked() {
        let mut backing = [0u64; 4];
        {
            // SAFETY: `backing` outlives `m` and is only accessed through `m` meanwhile.
            let m = unsafe { Mmio::from_raw(backing.as_mut_ptr() as u64, 32) };
            m.write::<u16>(0x1a, 0xbeef).unwrap();
            assert_eq!(m.read::<u16>(0x1a), Ok(0xbeef));
            m.write::<u64>(8, 0x1122_3344_5566_7788).unwrap();
            assert_eq!(m.read::<u32>(12), Ok(0x1122_3344));
            assert_eq!(m.read::<u8>(32), Err(XenError::EINVAL));
            assert_eq!(m.read::<u32>(30), Err(XenError::EINVAL));
            assert_eq!(m.read::<u32>(2), Err(XenError::EINVAL));
            assert_eq!(m.write::<u64>(u64::MAX, 0), Err(XenError::EINVAL));
        }
        assert_eq!(backing[1], 0x1122_3344_5566_7788);
    }

    #[test]
    fn map_refuses_an_empty_range_and_an_answer_outside_the_device_window() {
        let _g = crate::hypercall::TEST_LOCK.lock();
        fn outside(_nr: u64, a: [u64; 5]) -> i64 {
            // SAFETY: map_bar passes its live 24-byte argument.
            let b = unsafe { core::slice::from_raw_parts_mut(a[1] as *mut u8, 24) };
            b[16..24].copy_from_slice(&0x1000u64.to_le_bytes());
            0
        }
        *crate::hypercall::MOCK.lock() = Some(outside);
        assert_eq!(Mmio::map(0xfe00_0000, 0).map(|_| ()), Err(XenError::EINVAL));
        assert_eq!(
            Mmio::map(0xfe00_0000, 4096).map(|_| ()),
            Err(XenError::EFAULT)
        );
        *crate::hypercall::MOCK.lock() = None;
        assert_eq!(
            Mmio::map(0xfe00_0000, 4096).map(|_| ()),
            Err(XenError::ENOSYS)
        );
    }
}
