//! The physical frame allocator: a bitmap over every frame from address 0 up to the end of the
//! highest usable range, one bit per 4 KiB frame (1 = not available).
//!
//! Invariants: a frame is handed out only if it lies in one of the usable ranges given at
//! construction (so never the hypervisor image, the boot module, the low 1 MiB or anything else
//! the memory map reserved) and is not currently allocated; [`FrameAllocator::free`] accepts
//! only frames that are inside those ranges and currently allocated, so a double free or a
//! stray free of a reserved frame is refused instead of corrupting the map. `free_frames` is
//! always the number of zero bits inside the usable ranges.
//!
//! The bitmap's storage is provided by the caller (on bare metal: frames carved out of the map
//! itself, then [`FrameAllocator::reserve`]d).

use heapless::Vec;

use super::FRAME_SIZE;
use super::memmap::{MAX_RANGES, PhysRange};

const BITS: u64 = 64;

/// Why a free or reserve was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The address is not frame-aligned.
    Misaligned { addr: u64 },
    /// The frame is not in any usable range (reserved memory, a hole, or past the end).
    NotUsable { addr: u64 },
    /// The frame is not currently allocated (double free).
    NotAllocated { addr: u64 },
    /// The storage given for the bitmap is too small for the ranges.
    StorageTooSmall {
        have_words: usize,
        need_words: usize,
    },
    /// More ranges than the allocator can record.
    TooManyRanges,
}

/// Bitmap frame allocator over caller-provided storage.
#[derive(Debug)]
pub struct FrameAllocator<'a> {
    bitmap: &'a mut [u64],
    usable: Vec<PhysRange, MAX_RANGES>,
    /// Frames covered by the bitmap (frame `i` is at `i * FRAME_SIZE`).
    frames: u64,
    free_frames: u64,
    /// Word index where the next search starts (next fit).
    cursor: usize,
}

impl<'a> FrameAllocator<'a> {
    /// Words of bitmap storage needed to cover memory up to `end` (exclusive).
    pub fn words_needed(end: u64) -> usize {
        end.div_ceil(FRAME_SIZE).div_ceil(BITS) as usize
    }

    /// An allocator whose free frames are exactly those inside `usable` (each range is shrunk
    /// to whole frames; overlapping ranges are allowed). `storage` must hold
    /// [`Self::words_needed`] words for the highest range end; it is overwritten.
    pub fn new(
        storage: &'a mut [u64],
        usable: &[PhysRange],
    ) -> Result<FrameAllocator<'a>, FrameError> {
        let mut ranges: Vec<PhysRange, MAX_RANGES> = Vec::new();
        for r in usable {
            let r = r.shrink_to_pages();
            if !r.is_empty() {
                ranges.push(r).map_err(|_| FrameError::TooManyRanges)?;
            }
        }
        let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
        let need_words = Self::words_needed(end);
        if storage.len() < need_words {
            return Err(FrameError::StorageTooSmall {
                have_words: storage.len(),
                need_words,
            });
        }
        let bitmap = &mut storage[..need_words];
        bitmap.fill(u64::MAX);
        let mut fa = FrameAllocator {
            bitmap,
            usable: ranges,
            frames: end / FRAME_SIZE,
            free_frames: 0,
            cursor: 0,
        };
        for i in 0..fa.usable.len() {
            let r = fa.usable[i];
            for f in r.start / FRAME_SIZE..r.end / FRAME_SIZE {
                if fa.bit(f) {
                    fa.set_bit(f, false);
                    fa.free_frames += 1;
                }
            }
        }
        Ok(fa)
    }

    fn bit(&self, frame: u64) -> bool {
        self.bitmap[(frame / BITS) as usize] & (1 << (frame % BITS)) != 0
    }

    fn set_bit(&mut self, frame: u64, used: bool) {
        let w = &mut self.bitmap[(frame / BITS) as usize];
        if used {
            *w |= 1 << (frame % BITS);
        } else {
            *w &= !(1 << (frame % BITS));
        }
    }

    fn is_usable(&self, addr: u64) -> bool {
        self.usable.iter().any(|r| r.contains(addr))
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> u64 {
        self.free_frames
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> u64 {
        self.free_frames * FRAME_SIZE
    }

    /// The usable ranges the allocator manages.
    pub fn usable(&self) -> &[PhysRange] {
        &self.usable
    }

    /// Allocate one frame anywhere; returns its physical address.
    pub fn alloc(&mut self) -> Option<u64> {
        self.alloc_below(u64::MAX)
    }

    /// Allocate one frame that ends at or below `limit`.
    pub fn alloc_below(&mut self, limit: u64) -> Option<u64> {
        let max_frame = (limit / FRAME_SIZE).min(self.frames);
        if max_frame == 0 || self.free_frames == 0 {
            return None;
        }
        let words = max_frame.div_ceil(BITS) as usize;
        let start = if self.cursor < words { self.cursor } else { 0 };
        for k in 0..words {
            let wi = (start + k) % words;
            let w = self.bitmap[wi];
            if w == u64::MAX {
                continue;
            }
            let bit = (!w).trailing_zeros() as u64;
            let frame = wi as u64 * BITS + bit;
            if frame >= max_frame {
                continue;
            }
            self.set_bit(frame, true);
            self.free_frames -= 1;
            self.cursor = wi;
            return Some(frame * FRAME_SIZE);
        }
        None
    }

    /// Allocate `count` physically contiguous frames whose first address is a multiple of
    /// `align` (a power of two, at least one frame) and that end at or below `limit`.
    pub fn alloc_contiguous(&mut self, count: u64, align: u64, limit: u64) -> Option<u64> {
        if count == 0 || !align.is_power_of_two() || align < FRAME_SIZE {
            return None;
        }
        let step = align / FRAME_SIZE;
        for i in 0..self.usable.len() {
            let r = self.usable[i];
            let mut first = super::align_up(r.start, align)? / FRAME_SIZE;
            let end = (r.end.min(limit)) / FRAME_SIZE;
            while first.checked_add(count).is_some_and(|e| e <= end) {
                match (first..first + count).rev().find(|&f| self.bit(f)) {
                    None => {
                        for f in first..first + count {
                            self.set_bit(f, true);
                        }
                        self.free_frames -= count;
                        return Some(first * FRAME_SIZE);
                    }
                    // Skip past the used frame, keeping the alignment.
                    Some(used) => first = (used + 1).div_ceil(step) * step,
                }
            }
        }
        None
    }

    /// Return a frame obtained from this allocator.
    pub fn free(&mut self, addr: u64) -> Result<(), FrameError> {
        if !addr.is_multiple_of(FRAME_SIZE) {
            return Err(FrameError::Misaligned { addr });
        }
        if !self.is_usable(addr) {
            return Err(FrameError::NotUsable { addr });
        }
        let f = addr / FRAME_SIZE;
        if !self.bit(f) {
            return Err(FrameError::NotAllocated { addr });
        }
        self.set_bit(f, false);
        self.free_frames += 1;
        Ok(())
    }

    /// Mark every free frame overlapping `range` as used (for memory taken before the
    /// allocator existed, such as its own bitmap). Frames outside the usable ranges are
    /// ignored; already-used frames stay used.
    pub fn reserve(&mut self, range: PhysRange) {
        let r = range.grow_to_pages();
        let end = r.end.min(self.frames * FRAME_SIZE);
        let mut a = r.start;
        while a < end {
            let f = a / FRAME_SIZE;
            if !self.bit(f) {
                self.set_bit(f, true);
                self.free_frames -= 1;
            }
            a += FRAME_SIZE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const MIB: u64 = 1 << 20;

    fn storage_for(ranges: &[PhysRange]) -> std::vec::Vec<u64> {
        let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
        vec![0; FrameAllocator::words_needed(end)]
    }

    #[test]
    fn hands_out_every_usable_frame_once_then_none() {
        let ranges = [PhysRange::new(MIB, MIB + 0x5000)];
        let mut st = storage_for(&ranges);
        let mut fa = FrameAllocator::new(&mut st, &ranges).unwrap();
        assert_eq!(fa.free_frames(), 5);
        let mut got: std::vec::Vec<u64> = (0..5).map(|_| fa.alloc().unwrap()).collect();
        got.sort();
        assert_eq!(
            got,
            (0..5)
                .map(|i| MIB + i * 0x1000)
                .collect::<std::vec::Vec<_>>()
        );
        assert_eq!(fa.alloc(), None);
        assert_eq!(fa.free_frames(), 0);
    }

    #[test]
    fn double_free_and_reserved_free_are_refused() {
        let ranges = [PhysRange::new(0x10000, 0x20000)];
        let mut st = storage_for(&ranges);
        let mut fa = FrameAllocator::new(&mut st, &ranges).unwrap();
        let f = fa.alloc().unwrap();
        assert_eq!(fa.free(f), Ok(()));
        assert_eq!(fa.free(f), Err(FrameError::NotAllocated { addr: f }));
        assert_eq!(fa.free(0x1000), Err(FrameError::NotUsable { addr: 0x1000 }));
        assert_eq!(
            fa.free(0x10001),
            Err(FrameError::Misaligned { addr: 0x10001 })
        );
        assert_eq!(
            fa.free(0x20000),
            Err(FrameError::NotUsable { addr: 0x20000 })
        );
    }

    #[test]
    fn too_small_storage_is_refused() {
        let ranges = [PhysRange::new(0, 65 * 0x1000)];
        let mut st = vec![0u64; 1];
        assert_eq!(
            FrameAllocator::new(&mut st, &ranges).unwrap_err(),
            FrameError::StorageTooSmall {
                have_words: 1,
                need_words: 2
            }
        );
    }

    #[test]
    fn alloc_below_respects_the_limit() {
        let ranges = [
            PhysRange::new(0x1000, 0x3000),
            PhysRange::new(8 * MIB, 9 * MIB),
        ];
        let mut st = storage_for(&ranges);
        let mut fa = FrameAllocator::new(&mut st, &ranges).unwrap();
        assert!(fa.alloc_below(0x3000).unwrap() < 0x3000);
        assert!(fa.alloc_below(0x3000).unwrap() < 0x3000);
        assert_eq!(fa.alloc_below(0x3000), None);
        assert!(fa.alloc().unwrap() >= 8 * MIB);
    }

    #[test]
    fn contiguous_allocation_is_aligned_and_skips_used_frames() {
        let ranges = [PhysRange::new(0x1000, 4 * MIB)];
        let mut st = storage_for(&ranges);
        let mut fa = FrameAllocator::new(&mut st, &ranges).unwrap();
        fa.reserve(PhysRange::new(2 * MIB, 2 * MIB + 1));
        let a = fa.alloc_contiguous(256, 2 * MIB, u64::MAX);
        assert_eq!(
            a, None,
            "the only 2 MiB-aligned run is cut by a reserved frame"
        );
        let b = fa.alloc_contiguous(16, 0x10000, u64::MAX).unwrap();
        assert_eq!(b % 0x10000, 0);
        assert_eq!(b, 0x10000);
        let before = fa.free_frames();
        let c = fa.alloc_contiguous(4, 0x1000, u64::MAX).unwrap();
        assert_eq!(fa.free_frames(), before - 4);
        for i in 0..4 {
            assert_eq!(
                fa.free(c + i * 0x1000),
                Ok(()),
                "every frame of the run was allocated"
            );
        }
    }

    fn arb_ranges() -> impl Strategy<Value = std::vec::Vec<PhysRange>> {
        prop::collection::vec((0u64..2048, 1u64..256), 1..8).prop_map(|v| {
            v.into_iter()
                .map(|(s, l)| PhysRange::new(s * 0x1000 + 0x800 * (s % 2), (s + l) * 0x1000))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn never_hands_out_a_frame_twice_or_outside_usable(
            usable in arb_ranges(),
            reserved in arb_ranges(),
            frees in prop::collection::vec(any::<prop::sample::Index>(), 0..64),
        ) {
            let mut st = storage_for(&usable);
            let mut fa = FrameAllocator::new(&mut st, &usable).unwrap();
            for r in &reserved {
                fa.reserve(*r);
            }
            let ok = |a: u64| {
                usable.iter().any(|r| r.shrink_to_pages().contains(a))
                    && !reserved.iter().any(|r| r.grow_to_pages().contains(a))
            };
            let initial_free = fa.free_frames();
            let mut held = HashSet::new();
            while let Some(a) = fa.alloc() {
                prop_assert!(ok(a), "frame {a:#x} is not usable");
                prop_assert!(held.insert(a), "frame {a:#x} handed out twice");
            }
            prop_assert_eq!(held.len() as u64, initial_free);
            // Free a random subset, then allocate again: still unique and usable.
            let list: std::vec::Vec<u64> = held.iter().copied().collect();
            let mut freed = HashSet::new();
            for ix in &frees {
                if list.is_empty() { break; }
                let a = list[ix.index(list.len())];
                if freed.insert(a) {
                    prop_assert_eq!(fa.free(a), Ok(()));
                    held.remove(&a);
                } else {
                    prop_assert_eq!(fa.free(a), Err(FrameError::NotAllocated { addr: a }));
                }
            }
            while let Some(a) = fa.alloc_below(u64::MAX) {
                prop_assert!(ok(a));
                prop_assert!(held.insert(a), "frame {a:#x} handed out twice after free");
            }
            prop_assert_eq!(fa.free_frames(), 0);
        }

        #[test]
        fn contiguous_runs_are_disjoint_aligned_and_usable(
            usable in arb_ranges(),
            runs in prop::collection::vec((1u64..16, 0u32..4), 1..16),
        ) {
            let mut st = storage_for(&usable);
            let mut fa = FrameAllocator::new(&mut st, &usable).unwrap();
            let mut held = HashSet::new();
            for (count, align_log) in runs {
                let align = 0x1000u64 << align_log;
                if let Some(a) = fa.alloc_contiguous(count, align, u64::MAX) {
                    prop_assert_eq!(a % align, 0);
                    for i in 0..count {
                        let f = a + i * 0x1000;
                        prop_assert!(usable.iter().any(|r| r.shrink_to_pages().contains(f)));
                        prop_assert!(held.insert(f), "frame {f:#x} handed out twice");
                    }
                }
                if let Some(a) = fa.alloc() {
                    prop_assert!(held.insert(a));
                }
            }
        }
    }
}
