//! The hypervisor's heap (`#[global_allocator]`): talc over runs of frames from the frame
//! allocator, reached through the direct map. It grows on demand: when talc runs out it asks
//! [`FrameSource`] for another run of at least [`GROW_BYTES`].
//!
//! Lock order: heap → frame allocator (the source runs under talc's lock).

use core::alloc::Layout;

use spinning_top::RawSpinlock;
use talc::TalcLock;
use talc::base::Talc;
use talc::base::binning::Binning;
use talc::source::Source;

use super::{memory, phys_to_virt};
use crate::mm::FRAME_SIZE;

/// Frames the heap has taken from the frame allocator so far (it never gives them back):
/// lets a boot compare free frames before and after domains while allowing for heap growth.
pub static HEAP_FRAMES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Smallest run claimed at a time.
pub const GROW_BYTES: u64 = 1 << 20;

/// Frames for talc, straight from the frame allocator.
#[derive(Debug)]
pub struct FrameSource;

// SAFETY: `acquire` never uses the global allocator (the frame allocator does not allocate).
unsafe impl Source for FrameSource {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        let want = (layout.size() as u64)
            .saturating_add(layout.align() as u64)
            .saturating_add(4 * FRAME_SIZE)
            .max(GROW_BYTES);
        let frames = want.div_ceil(FRAME_SIZE);
        let phys = memory::alloc_contiguous(frames, FRAME_SIZE).ok_or(())?;
        HEAP_FRAMES.fetch_add(frames, core::sync::atomic::Ordering::Relaxed);
        // SAFETY: the frames were just allocated for the heap alone and are direct-mapped
        // read-write; they are never freed back.
        unsafe {
            talc.claim(
                phys_to_virt(phys) as *mut u8,
                (frames * FRAME_SIZE) as usize,
            )
        }
        .map(|_| ())
        .ok_or(())
    }
}

#[global_allocator]
static HEAP: TalcLock<RawSpinlock, FrameSource> = TalcLock::new(FrameSource);
