//! Grant copy as the backend uses it: the [`GrantCopier`] seam (one batched `GNTTABOP_copy`),
//! the [`PagePool`] of backend-local pages the copies read and write, and [`FakeGrantTable`],
//! a host model of a frontend's granted pages with the hypervisor's per-element checks, used
//! by the tests and benches.
//!
//! Invariants: every copy element the backend builds stays within one 4 KiB page on both sides
//! (the hypervisor refuses anything else with `GNTST_bad_copy_arg`); the local side of an
//! element is always a pool frame addressed with `DOMID_SELF`; the remote side is always a
//! grant ref of the frontend. The backend never sees the frontend's frames.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Range;

use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::domid::DOMID_SELF;
use shared_abi::grant_table::{GntStatus, GnttabCopy, GrantRef, gntcopy};

/// The hypercall seam: perform a batch of grant copies.
pub trait GrantCopier {
    /// Execute every element of `ops` as one `GNTTABOP_copy` would, setting each element's
    /// `status` (`GNTST_*`). Local frames named in the elements are `pool`'s pages: the real
    /// implementation passes the batch to the hypervisor (which writes those frames while the
    /// pool is exclusively borrowed); the fake copies through `pool`. `Err` means the call as a
    /// whole failed (e.g. `-EFAULT`); the caller then treats every element as failed.
    fn copy(&mut self, ops: &mut [GnttabCopy], pool: &mut PagePool) -> Result<(), GntStatus>;
}

/// One page-aligned page of memory: a pool page is exactly one frame of the domain, so an
/// element at offset `o` of the page is at offset `o` of the frame the hypervisor copies.
#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE_SIZE]);

impl Page {
    /// A zeroed page on the heap.
    pub fn zeroed() -> Box<Page> {
        Box::new(Page([0; PAGE_SIZE]))
    }
}

/// Backend-local pages that grant copies fill (tx) or drain (rx), each with the frame number
/// the hypervisor knows it by. Seen as one byte arena: byte `i` is at page `i / 4096`.
pub struct PagePool {
    pages: Vec<Box<Page>>,
    gfns: Vec<u64>,
    by_gfn: BTreeMap<u64, usize>,
}

impl core::fmt::Debug for PagePool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PagePool")
            .field("pages", &self.pages.len())
            .finish()
    }
}

/// Why a pool could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("page pool needs at least {min} pages, got {got}")]
    TooSmall { min: usize, got: usize },
    #[error("frame {gfn:#x} appears twice in the page pool")]
    DuplicateFrame { gfn: u64 },
}

impl PagePool {
    /// `n` zeroed pages from the heap, each named by `frame_of` (in a Bulkhead domain: its
    /// address `>> 12`, auto-translated frame numbers).
    pub fn allocate(n: usize, frame_of: impl Fn(&Page) -> u64) -> Result<Self, PoolError> {
        let pages = (0..n)
            .map(|_| {
                let p = Page::zeroed();
                (frame_of(&p), p)
            })
            .collect();
        PagePool::new(pages)
    }

    /// A pool over pages the domain allocated, each with its frame number.
    pub fn new(pages: Vec<(u64, Box<Page>)>) -> Result<Self, PoolError> {
        let mut pool = PagePool {
            pages: Vec::with_capacity(pages.len()),
            gfns: Vec::with_capacity(pages.len()),
            by_gfn: BTreeMap::new(),
        };
        for (gfn, page) in pages {
            if pool.by_gfn.insert(gfn, pool.pages.len()).is_some() {
                return Err(PoolError::DuplicateFrame { gfn });
            }
            pool.gfns.push(gfn);
            pool.pages.push(page);
        }
        Ok(pool)
    }

    /// A pool of `n` zeroed pages with made-up, consecutive frame numbers from `first_gfn`
    /// (host use: only a fake copier resolves them).
    pub fn with_fake_frames(n: usize, first_gfn: u64) -> Self {
        let pages = (0..n)
            .map(|i| (first_gfn + i as u64, Page::zeroed()))
            .collect();
        // Consecutive numbers are distinct, so this cannot fail.
        PagePool::new(pages).unwrap_or(PagePool {
            pages: Vec::new(),
            gfns: Vec::new(),
            by_gfn: BTreeMap::new(),
        })
    }

    /// Pages in the pool.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Bytes in the arena.
    pub fn capacity(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    /// Frame number of page `i`.
    pub fn gfn(&self, i: usize) -> Option<u64> {
        self.gfns.get(i).copied()
    }

    /// The page known by frame `gfn`.
    pub fn page_by_gfn(&self, gfn: u64) -> Option<&[u8; PAGE_SIZE]> {
        let i = *self.by_gfn.get(&gfn)?;
        self.pages.get(i).map(|p| &p.0)
    }

    /// The page known by frame `gfn`, writable.
    pub fn page_by_gfn_mut(&mut self, gfn: u64) -> Option<&mut [u8; PAGE_SIZE]> {
        let i = *self.by_gfn.get(&gfn)?;
        self.pages.get_mut(i).map(|p| &mut p.0)
    }

    /// Append arena bytes `range` to `out`; false (nothing appended) if out of the arena.
    pub fn read_into(&self, range: Range<usize>, out: &mut Vec<u8>) -> bool {
        if range.start > range.end || range.end > self.capacity() {
            return false;
        }
        let mut pos = range.start;
        while pos < range.end {
            let (page, off) = (pos / PAGE_SIZE, pos % PAGE_SIZE);
            let n = (PAGE_SIZE - off).min(range.end - pos);
            out.extend_from_slice(&self.pages[page].0[off..off + n]);
            pos += n;
        }
        true
    }

    /// Write `data` into the arena at byte `at`; false (nothing written) if it does not fit.
    pub fn write_at(&mut self, at: usize, data: &[u8]) -> bool {
        let Some(end) = at.checked_add(data.len()) else {
            return false;
        };
        if end > self.capacity() {
            return false;
        }
        let mut pos = at;
        let mut rest = data;
        while !rest.is_empty() {
            let (page, off) = (pos / PAGE_SIZE, pos % PAGE_SIZE);
            let n = (PAGE_SIZE - off).min(rest.len());
            self.pages[page].0[off..off + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            pos += n;
        }
        true
    }
}

/// One granted page of the fake frontend.
struct FakeGrant {
    page: Box<[u8; PAGE_SIZE]>,
    readonly: bool,
}

/// A host model of one frontend domain's grant table and granted pages, answering copies
/// with the hypervisor's checks: a gref side must name this domain (`GNTST_bad_domain`) and
/// a ref it granted (`GNTST_bad_gntref`); a frame side must use `DOMID_SELF`
/// (`GNTST_permission_denied`) and a pool frame (`GNTST_bad_page`); offset + len must stay in
/// the page (`GNTST_bad_copy_arg`); writing a read-only grant is `GNTST_permission_denied`.
pub struct FakeGrantTable {
    domid: DomId,
    grants: BTreeMap<GrantRef, FakeGrant>,
    /// Elements copied successfully so far.
    pub copies_done: u64,
    /// Copier calls so far (batches).
    pub batches: u64,
}

impl core::fmt::Debug for FakeGrantTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FakeGrantTable")
            .field("domid", &self.domid)
            .field("grants", &self.grants.len())
            .finish()
    }
}

impl FakeGrantTable {
    /// An empty table of frontend domain `domid`.
    pub fn new(domid: DomId) -> Self {
        FakeGrantTable {
            domid,
            grants: BTreeMap::new(),
            copies_done: 0,
            batches: 0,
        }
    }

    /// Grant a fresh zeroed page as `gref` (replacing any earlier grant of that ref).
    pub fn grant(&mut self, gref: GrantRef, readonly: bool) {
        self.grants.insert(
            gref,
            FakeGrant {
                page: Box::new([0; PAGE_SIZE]),
                readonly,
            },
        );
    }

    /// End the grant `gref`.
    pub fn revoke(&mut self, gref: GrantRef) {
        self.grants.remove(&gref);
    }

    /// The granted page's bytes.
    pub fn page(&self, gref: GrantRef) -> Option<&[u8; PAGE_SIZE]> {
        self.grants.get(&gref).map(|g| &*g.page)
    }

    /// The granted page's bytes, writable (the frontend filling its own page).
    pub fn page_mut(&mut self, gref: GrantRef) -> Option<&mut [u8; PAGE_SIZE]> {
        self.grants.get_mut(&gref).map(|g| &mut *g.page)
    }

    fn copy_one(&mut self, op: &GnttabCopy, pool: &mut PagePool) -> GntStatus {
        let len = usize::from(op.len);
        let (so, doff) = (usize::from(op.source.offset), usize::from(op.dest.offset));
        if so + len > PAGE_SIZE || doff + len > PAGE_SIZE {
            return GntStatus::BadCopyArg;
        }
        let mut tmp = [0u8; PAGE_SIZE];
        // Read the source.
        if op.flags & gntcopy::SOURCE_GREF != 0 {
            if op.source.domid != self.domid {
                return GntStatus::BadDomain;
            }
            let Ok(gref) = GrantRef::try_from(op.source.u) else {
                return GntStatus::BadGntref;
            };
            let Some(g) = self.grants.get(&gref) else {
                return GntStatus::BadGntref;
            };
            tmp[..len].copy_from_slice(&g.page[so..so + len]);
        } else {
            if op.source.domid != DOMID_SELF {
                return GntStatus::PermissionDenied;
            }
            let Some(p) = pool.page_by_gfn(op.source.u) else {
                return GntStatus::BadPage;
            };
            tmp[..len].copy_from_slice(&p[so..so + len]);
        }
        // Write the destination.
        if op.flags & gntcopy::DEST_GREF != 0 {
            if op.dest.domid != self.domid {
                return GntStatus::BadDomain;
            }
            let Ok(gref) = GrantRef::try_from(op.dest.u) else {
                return GntStatus::BadGntref;
            };
            let Some(g) = self.grants.get_mut(&gref) else {
                return GntStatus::BadGntref;
            };
            if g.readonly {
                return GntStatus::PermissionDenied;
            }
            g.page[doff..doff + len].copy_from_slice(&tmp[..len]);
        } else {
            if op.dest.domid != DOMID_SELF {
                return GntStatus::PermissionDenied;
            }
            let Some(p) = pool.page_by_gfn_mut(op.dest.u) else {
                return GntStatus::BadPage;
            };
            p[doff..doff + len].copy_from_slice(&tmp[..len]);
        }
        GntStatus::Okay
    }
}

impl GrantCopier for FakeGrantTable {
    fn copy(&mut self, ops: &mut [GnttabCopy], pool: &mut PagePool) -> Result<(), GntStatus> {
        self.batches += 1;
        for op in ops.iter_mut() {
            let st = self.copy_one(op, pool);
            if st == GntStatus::Okay {
                self.copies_done += 1;
            }
            op.status = st.as_i16();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_abi::grant_table::GnttabCopyPtr;

    fn from_gref(gref: u32, dom: DomId, off: u16, gfn: u64, doff: u16, len: u16) -> GnttabCopy {
        GnttabCopy {
            source: GnttabCopyPtr {
                u: u64::from(gref),
                domid: dom,
                offset: off,
            },
            dest: GnttabCopyPtr {
                u: gfn,
                domid: DOMID_SELF,
                offset: doff,
            },
            len,
            flags: gntcopy::SOURCE_GREF,
            status: 0,
        }
    }

    #[test]
    fn fake_copy_moves_bytes_and_reports_xen_errors() {
        let mut t = FakeGrantTable::new(5);
        t.grant(8, true);
        t.page_mut(8).unwrap()[10..14].copy_from_slice(b"abcd");
        let mut pool = PagePool::with_fake_frames(2, 100);
        let mut ops = [
            from_gref(8, 5, 10, 101, 4094, 2),
            from_gref(9, 5, 0, 100, 0, 1),
            from_gref(8, 6, 0, 100, 0, 1),
            from_gref(8, 5, 4095, 100, 0, 2),
            from_gref(8, 5, 0, 999, 0, 1),
        ];
        t.copy(&mut ops, &mut pool).unwrap();
        let st: Vec<i16> = ops.iter().map(|o| o.status).collect();
        assert_eq!(st, [0, -3, -2, -10, -9]);
        assert_eq!(&pool.page_by_gfn(101).unwrap()[4094..], b"ab");
        // Read-only grant refuses writes.
        let mut w = [GnttabCopy {
            source: GnttabCopyPtr {
                u: 100,
                domid: DOMID_SELF,
                offset: 0,
            },
            dest: GnttabCopyPtr {
                u: 8,
                domid: 5,
                offset: 0,
            },
            len: 4,
            flags: gntcopy::DEST_GREF,
            status: 0,
        }];
        t.copy(&mut w, &mut pool).unwrap();
        assert_eq!(w[0].status, GntStatus::PermissionDenied.as_i16());
    }

    #[test]
    fn allocated_pages_are_page_aligned_and_named_by_address() {
        let pool = PagePool::allocate(3, |p| p as *const Page as u64 >> 12).unwrap();
        assert_eq!(pool.pages(), 3);
        for i in 0..3 {
            let gfn = pool.gfn(i).unwrap();
            let page = pool.page_by_gfn(gfn).unwrap();
            assert_eq!(page.as_ptr() as u64, gfn << 12);
        }
    }

    #[test]
    fn pool_arena_reads_and_writes_across_pages() {
        let mut pool = PagePool::with_fake_frames(2, 0);
        let data: Vec<u8> = (0..100u8).collect();
        assert!(pool.write_at(4050, &data));
        let mut out = Vec::new();
        assert!(pool.read_into(4050..4150, &mut out));
        assert_eq!(out, data);
        assert!(!pool.write_at(8190, &data));
        assert!(!pool.read_into(8000..8193, &mut out));
        assert_eq!(
            PagePool::new(alloc::vec![(1, Page::zeroed()), (1, Page::zeroed())]).unwrap_err(),
            PoolError::DuplicateFrame { gfn: 1 }
        );
    }
}
