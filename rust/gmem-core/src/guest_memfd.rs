//! guest_memfd files: size, flags, the page cache, bindings, attributes and host
//! references.
//!
//! The page cache keeps huge folios whole (one entry per intact folio) and order-0 pages
//! (small files, or the pieces of a split huge folio) in a sparse array of
//! `pfn + 1 | UPTODATE`. "Uptodate" is the kernel's zero-on-first-use bit: a page allocated
//! by `fallocate` is zeroed when first handed to the guest (mainline `kvm_gmem_get_pfn`).

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use crate::bit_attr_map::BitAttrMap;
use crate::sparse::{Dense, SparseVec};

pub const UPTODATE: u32 = 1 << 31;

/// A page-cache lookup result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    pub pfn: u32,
    pub uptodate: bool,
    /// `Some(head)` when the page is part of an intact huge folio starting at file page
    /// `head`.
    pub folio_head: Option<u64>,
}

/// A binding of a file range to a memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileBinding {
    pub end: u64,
    pub vm: usize,
    pub slot: u32,
    /// The shared side of a `two_offsets` slot.
    pub shared_side: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Gmem {
    pub vm: usize,
    pub fd: Option<i32>,
    pub inode: u64,
    pub size_pages: u64,
    pub flags: u64,
    /// Folio order: 0, or the HugeTLB page order (9, 18).
    pub order: u32,
    /// Intact huge folios: head file page -> (pfn, uptodate).
    pub folios: BTreeMap<u64, (u32, bool)>,
    /// Order-0 pages: file page -> `pfn + 1 | UPTODATE`.
    pub pages: SparseVec<u32>,
    /// Pages held by the page cache, in 4 KiB pages.
    pub nr_pages: u64,
    /// The content of the frames in the page cache, by file page. A frame's content lives
    /// here while the frame is in the page cache, and in the host's frame store before and
    /// after (`Host::content`), so a guest access to a guest_memfd-backed page finds it
    /// from the gfn by arithmetic, without loading the stage-2 frame entry first.
    pub content: SparseVec<u64, Dense<u64>>,
    pub bindings: BTreeMap<u64, FileBinding>,
    /// Per-offset attributes (`inplace`, `attr_hook`): the in-place series' maple tree.
    pub attrs: Option<BitAttrMap>,
    /// Host pins (GUP references) per file page.
    pub pins: BTreeMap<u64, u32>,
    /// Pinned pages removed from the page cache: alive until unpinned.
    pub orphans: FxHashMap<u64, Vec<(u32, u32)>>,
    /// Live mmaps of this file (host-wide mapping ids).
    pub mappings: Vec<usize>,
    /// The VMM's own mapping of the file, made on first use by event-driven host access.
    pub vmm_map: Option<usize>,
    /// Released: the fd is closed and no mapping is left; pages are gone.
    pub released: bool,
}

impl Gmem {
    pub fn folio_pages(&self) -> u64 {
        1 << self.order
    }

    /// The page at file page `off`, if present.
    #[inline]
    pub fn page(&self, off: u64) -> Option<PageRef> {
        let e = self.pages.get(off);
        if e != 0 {
            return Some(PageRef {
                pfn: (e & !UPTODATE) - 1,
                uptodate: e & UPTODATE != 0,
                folio_head: None,
            });
        }
        if self.order == 0 {
            return None;
        }
        let head = off & !(self.folio_pages() - 1);
        self.folios.get(&head).map(|&(pfn, up)| PageRef {
            pfn: pfn + (off - head) as u32,
            uptodate: up,
            folio_head: Some(head),
        })
    }

    pub fn set_page(&mut self, off: u64, pfn: u32, uptodate: bool) {
        self.pages
            .set(off, (pfn + 1) | if uptodate { UPTODATE } else { 0 });
    }

    pub fn mark_uptodate(&mut self, off: u64, r: PageRef) {
        match r.folio_head {
            Some(h) => {
                if let Some(f) = self.folios.get_mut(&h) {
                    f.1 = true;
                }
            }
            None => self.set_page(off, r.pfn, true),
        }
    }

    /// Split the intact huge folio at `head` into order-0 pages (O(folio pages), as the
    /// kernel's split). Returns whether a folio was split.
    pub fn split(&mut self, head: u64) -> bool {
        let Some((pfn, up)) = self.folios.remove(&head) else {
            return false;
        };
        for i in 0..self.folio_pages() {
            self.set_page(head + i, pfn + i as u32, up);
        }
        true
    }

    /// Merge the order-0 pages of `[head, head + folio)` back into one folio if they are all
    /// present and physically contiguous from an aligned frame. Returns `None` if they
    /// cannot merge, else the frames the caller must clear first: when some pages were
    /// already handed out (uptodate) and others not, the folio becomes uptodate and the
    /// untouched pages must be zeroed now, not skipped.
    pub fn try_merge(&mut self, head: u64) -> Option<Vec<u32>> {
        if self.order == 0 || self.folios.contains_key(&head) {
            return None;
        }
        let n = self.folio_pages();
        let e0 = self.pages.get(head);
        if e0 == 0 {
            return None;
        }
        let pfn0 = (e0 & !UPTODATE) - 1;
        if !u64::from(pfn0).is_multiple_of(n) {
            return None;
        }
        let mut fresh = Vec::new();
        for i in 0..n {
            let e = self.pages.get(head + i);
            if e == 0 || (e & !UPTODATE) - 1 != pfn0 + i as u32 {
                return None;
            }
            if e & UPTODATE == 0 {
                fresh.push(pfn0 + i as u32);
            }
        }
        let uptodate = fresh.len() as u64 != n;
        if !uptodate {
            fresh.clear();
        }
        self.pages.clear_range(head, head + n);
        self.folios.insert(head, (pfn0, uptodate));
        Some(fresh)
    }

    /// The binding covering file page `off`.
    pub fn binding_at(&self, off: u64) -> Option<(u64, FileBinding)> {
        let (&s, &b) = self.bindings.range(..=off).next_back()?;
        (off < b.end).then_some((s, b))
    }

    /// Whether any page of `[start, end)` is bound.
    pub fn range_bound(&self, start: u64, end: u64) -> bool {
        if let Some((_, b)) = self.bindings.range(..start).next_back()
            && b.end > start
        {
            return true;
        }
        self.bindings.range(start..end).next().is_some()
    }

    /// Present pages in `[start, end)` as `(file page, pfn)`, intact folios expanded
    /// lazily by the caller through `folios_in`.
    pub fn small_pages_in(&self, start: u64, end: u64) -> Vec<(u64, u32)> {
        self.pages
            .entries(start, end)
            .into_iter()
            .map(|(o, e)| (o, (e & !UPTODATE) - 1))
            .collect()
    }

    /// Intact folios intersecting `[start, end)` as `(head, pfn)`.
    pub fn folios_in(&self, start: u64, end: u64) -> Vec<(u64, u32)> {
        if self.folios.is_empty() || start >= end {
            return Vec::new();
        }
        let lo = start & !(self.folio_pages() - 1);
        self.folios
            .range(lo..end)
            .map(|(&h, &(p, _))| (h, p))
            .collect()
    }

    /// Pinned file pages in `[start, end)`, sorted.
    pub fn pins_in(&self, start: u64, end: u64) -> Vec<u64> {
        if start >= end {
            return Vec::new();
        }
        self.pins.range(start..end).map(|(&o, _)| o).collect()
    }
}

/// File slots of stage-2 read their frames from the page caches of the host's files.
impl crate::stage2::Frames for Vec<Gmem> {
    fn frame(&self, file: u32, off: u64) -> u32 {
        self.get(file as usize)
            .and_then(|f| f.page(off))
            .map_or(crate::stage2::NO_FRAME, |r| r.pfn)
    }
}
