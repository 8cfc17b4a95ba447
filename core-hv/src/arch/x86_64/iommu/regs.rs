//! A VT-d unit's register page, behind a safe interface: every offset is checked against the
//! mapped length, so no register access can leave the mapping.

use super::super::memory;

/// A mapped register window.
pub struct Regs {
    virt: u64,
    len: usize,
}

impl Regs {
    /// Map `len` bytes of registers at physical `phys` (uncached).
    pub fn map(phys: u64, len: usize) -> Result<Regs, memory::MemError> {
        let virt = memory::map_mmio(phys, len as u64)?;
        Ok(Regs { virt, len })
    }

    fn at(&self, off: usize, size: usize) -> Option<u64> {
        (off.is_multiple_of(size) && off.checked_add(size)? <= self.len)
            .then_some(self.virt + off as u64)
    }

    /// 32-bit read; all ones outside the window.
    pub fn read32(&self, off: usize) -> u32 {
        match self.at(off, 4) {
            // SAFETY: inside the uncached register mapping, 4-byte aligned.
            Some(v) => unsafe { core::ptr::read_volatile(v as *const u32) },
            None => u32::MAX,
        }
    }

    /// 64-bit read; all ones outside the window.
    pub fn read64(&self, off: usize) -> u64 {
        match self.at(off, 8) {
            // SAFETY: inside the uncached register mapping, 8-byte aligned.
            Some(v) => unsafe { core::ptr::read_volatile(v as *const u64) },
            None => u64::MAX,
        }
    }

    /// 32-bit write; dropped outside the window.
    pub fn write32(&self, off: usize, value: u32) {
        if let Some(v) = self.at(off, 4) {
            // SAFETY: inside the uncached register mapping, 4-byte aligned.
            unsafe { core::ptr::write_volatile(v as *mut u32, value) }
        }
    }

    /// 64-bit write; dropped outside the window.
    pub fn write64(&self, off: usize, value: u64) {
        if let Some(v) = self.at(off, 8) {
            // SAFETY: inside the uncached register mapping, 8-byte aligned.
            unsafe { core::ptr::write_volatile(v as *mut u64, value) }
        }
    }
}
