//! DMA-able memory.
//!
//! Under Bulkhead's VT-d setup a driver domain's device sees exactly the domain's own pages
//! (ELF segments, heap — including pages `increase_reservation` added — and stack) at the
//! domain's own virtual addresses: **a device address is the virtual address**. Pages mapped
//! from other domains' grants and the device window are not in the device's address space; a
//! DMA there faults in the IOMMU and reaches nothing.
//!
//! [`DmaBuffer`] is the usual way to get device memory: whole zeroed pages from the heap,
//! page-aligned so a buffer never shares a page with unrelated data.

use core::alloc::Layout;
use core::ptr::NonNull;

use shared_abi::errno::XenError;
use shared_abi::start_info::{
    ELF_LOAD_BASE, ELF_LOAD_END, HEAP_BASE, HEAP_END, STACK_TOP, STACK_WINDOW_BASE,
};

/// Bytes per page.
pub const PAGE: usize = 4096;

/// The device address of memory at `va` (identity under Bulkhead's IOMMU setup).
pub fn device_addr(va: u64) -> u64 {
    va
}

/// The device address of a value of ours.
pub fn device_addr_of<T: ?Sized>(r: &T) -> u64 {
    device_addr(r as *const T as *const u8 as u64)
}

/// Whether `[va, va + len)` lies in the windows that hold this domain's own memory (ELF,
/// heap, stack), i.e. may be DMA-reachable. Grant mappings, the special pages and the device
/// window are not. (Whether each page is actually present is the hypervisor's to know.)
pub fn is_dma_window(va: u64, len: u64) -> bool {
    let Some(end) = va.checked_add(len) else {
        return false;
    };
    [
        (ELF_LOAD_BASE, ELF_LOAD_END),
        (HEAP_BASE, HEAP_END),
        (STACK_WINDOW_BASE, STACK_TOP),
    ]
    .iter()
    .any(|&(lo, hi)| va >= lo && end <= hi)
}

/// Zeroed, page-aligned pages from the heap that a device may read and write.
///
/// While the device may access the buffer (between handing its address to the device and
/// seeing the request complete), the driver must not rely on the contents; [`DmaBuffer::read`]
/// and [`DmaBuffer::write`] copy with volatile accesses so they are always sound.
#[derive(Debug)]
pub struct DmaBuffer {
    ptr: NonNull<u8>,
    pages: usize,
}

// SAFETY: the buffer is plain memory owned by this value; nothing ties it to a thread.
unsafe impl Send for DmaBuffer {}

impl DmaBuffer {
    /// `pages` zeroed pages (`EINVAL` for 0 or an overflowing size, `ENOMEM` when the heap is
    /// exhausted).
    pub fn new(pages: usize) -> Result<DmaBuffer, XenError> {
        let layout = layout(pages).ok_or(XenError::EINVAL)?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or(XenError::ENOMEM)?;
        Ok(DmaBuffer { ptr, pages })
    }

    /// The address to give the device.
    pub fn device_addr(&self) -> u64 {
        device_addr(self.ptr.as_ptr() as u64)
    }

    /// The domain address (the same number).
    pub fn va(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn len(&self) -> usize {
        self.pages * PAGE
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Copy `out.len()` bytes from offset `at` (`EINVAL` past the end).
    pub fn read(&self, at: usize, out: &mut [u8]) -> Result<(), XenError> {
        self.check(at, out.len())?;
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: `at + i` is inside the allocation (checked); volatile because a device
            // may write the memory behind the compiler's back.
            *b = unsafe { core::ptr::read_volatile(self.ptr.as_ptr().add(at + i)) };
        }
        Ok(())
    }

    /// Copy `data` to offset `at` (`EINVAL` past the end).
    pub fn write(&self, at: usize, data: &[u8]) -> Result<(), XenError> {
        self.check(at, data.len())?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { core::ptr::write_volatile(self.ptr.as_ptr().add(at + i), *b) };
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// The contents as a slice; only while the device does not access the buffer.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `len()` bytes, initialised (zeroed) and owned by `self`,
        // which is borrowed mutably for the slice's life.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    /// The contents as a slice; only while the device does not access the buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`, borrowed shared.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    fn check(&self, at: usize, len: usize) -> Result<(), XenError> {
        match at.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(XenError::EINVAL),
        }
    }

    /// Give up ownership without freeing (for `virtio_drivers::Hal::dma_alloc`).
    pub fn into_raw(self) -> (NonNull<u8>, usize) {
        let r = (self.ptr, self.pages);
        core::mem::forget(self);
        r
    }

    /// Take back ownership of a buffer made by [`DmaBuffer::into_raw`].
    ///
    /// # Safety
    /// `ptr` and `pages` must be exactly what `into_raw` returned, and not already taken back.
    pub unsafe fn from_raw(ptr: NonNull<u8>, pages: usize) -> DmaBuffer {
        DmaBuffer { ptr, pages }
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if let Some(layout) = layout(self.pages) {
            // SAFETY: allocated by `new` with this layout and not freed since.
            unsafe { alloc::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

fn layout(pages: usize) -> Option<Layout> {
    if pages == 0 {
        return None;
    }
    Layout::from_size_align(pages.checked_mul(PAGE)?, PAGE).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_abi::start_info::{GRANT_MAP_BASE, START_INFO_VA};

    #[test]
    fn buffers_are_zeroed_page_aligned_and_their_device_address_is_their_address() {
        let mut b = DmaBuffer::new(2).unwrap();
        assert_eq!(b.len(), 8192);
        assert_eq!(b.va() % 4096, 0);
        assert_eq!(b.device_addr(), b.va());
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.write(8190, &[1, 2]).unwrap();
        assert_eq!(b.write(8191, &[1, 2]), Err(XenError::EINVAL));
        assert_eq!(b.write(usize::MAX, &[1]), Err(XenError::EINVAL));
        let mut out = [0u8; 2];
        b.read(8190, &mut out).unwrap();
        assert_eq!(out, [1, 2]);
        b.as_mut_slice()[0] = 9;
        let (p, n) = b.into_raw();
        // SAFETY: exactly what into_raw returned.
        let b = unsafe { DmaBuffer::from_raw(p, n) };
        assert_eq!(b.as_slice()[0], 9);
        assert_eq!(DmaBuffer::new(0).map(|_| ()), Err(XenError::EINVAL));
        assert_eq!(
            DmaBuffer::new(usize::MAX).map(|_| ()),
            Err(XenError::EINVAL)
        );
    }

    #[test]
    fn only_the_domains_own_memory_windows_are_dma_windows() {
        assert!(is_dma_window(HEAP_BASE, 4096));
        assert!(is_dma_window(ELF_LOAD_BASE + 0x1000, 512));
        assert!(is_dma_window(STACK_TOP - 4096, 4096));
        assert!(!is_dma_window(GRANT_MAP_BASE, 4096));
        assert!(!is_dma_window(START_INFO_VA, 4096));
        assert!(!is_dma_window(0x1000, 4096));
        assert!(!is_dma_window(HEAP_END - 4096, 8192));
        assert!(!is_dma_window(u64::MAX, 2));
        let x = [0u8; 4];
        assert_eq!(device_addr_of(&x[1..]), x.as_ptr() as u64 + 1);
    }
}
