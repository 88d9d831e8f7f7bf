//! guest_memfd files: size, flags, the page cache, bindings, attributes and host
//! references; and the file operations on them, in the order of
//! `virt/kvm/guest_memfd.c`: create, fallocate and punch, invalidate (stage-2 zap and
//! host unmap), release, mmap, get_pfn, populate, and the memory-failure handler
//! (`kvm_gmem_error_folio`). Binding is in `memslot.rs`.
//!
//! The page cache keeps huge folios whole (one entry per intact folio) and order-0 pages
//! (small files, or the pieces of a split huge folio) in a sparse array of
//! `pfn + 1 | UPTODATE`. "Uptodate" is the kernel's zero-on-first-use bit: a page allocated
//! by `fallocate` is zeroed when first handed to the guest (mainline `kvm_gmem_get_pfn`).

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::bit_attr_map::BitAttrMap;
use crate::error::{Result, einval, err, errno};
use crate::frames::Placement;
use crate::host::{Fd, Host, Loc};
use crate::mapping::{MapKind, mmap_length};
use crate::memslot::FilePage;
use crate::numa::SharedPolicy;
use crate::sparse::{Dense, SparseVec};
use crate::vm::ZeroPolicy;
use crate::{PAGE_SHIFT, PAGE_SIZE, uapi};

pub const UPTODATE: u32 = 1 << 31;

/// The frame a non-zero page cache entry (`pfn + 1 | UPTODATE`) names.
#[inline]
pub(crate) fn entry_frame(e: u32) -> u32 {
    (e & !UPTODATE) - 1
}

/// A page-cache lookup result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    pub pfn: u32,
    pub uptodate: bool,
    /// `Some(head)` when the page is part of an intact huge folio starting at file page
    /// `head`.
    pub folio_head: Option<u64>,
}

/// Which stage-2 entries of the gfns bound to a file range an invalidation zaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zap {
    /// Those the binding can back (`kvm_gmem_get_invalidate_filter()`): the pages leave.
    Backed,
    /// Private ones (`Some(true)`), shared ones (`Some(false)`) or all (`None`): the pages
    /// stay, their attribute or folio changed.
    Only(Option<bool>),
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
    pub(crate) vm: usize,
    pub(crate) fd: Option<i32>,
    pub(crate) inode: u64,
    pub(crate) size_pages: u64,
    pub(crate) flags: u64,
    /// Folio order: 0, or the HugeTLB page order (9, 18).
    pub(crate) order: u32,
    /// Intact huge folios: head file page -> (pfn, uptodate).
    pub(crate) folios: BTreeMap<u64, (u32, bool)>,
    /// Order-0 pages: file page -> `pfn + 1 | UPTODATE`.
    pub(crate) pages: SparseVec<u32, Dense<u32>>,
    /// Pages held by the page cache, in 4 KiB pages.
    pub(crate) nr_pages: u64,
    /// The content of the frames in the page cache, by file page. A frame's content lives
    /// here while the frame is in the page cache, and in the host's frame store before and
    /// after (`Host::content`), so a guest access to a guest_memfd-backed page finds it
    /// from the gfn by arithmetic, without loading the stage-2 frame entry first.
    pub(crate) content: SparseVec<u64, Dense<u64>>,
    pub(crate) bindings: BTreeMap<u64, FileBinding>,
    /// Per-offset attributes (`inplace`, `attr_hook`): the in-place series' maple tree.
    pub(crate) attrs: Option<BitAttrMap>,
    /// Host pins (GUP references) per file page.
    pub(crate) pins: BTreeMap<u64, u32>,
    /// Pinned pages removed from the page cache: alive until unpinned.
    pub(crate) orphans: FxHashMap<u64, Vec<(u32, u32)>>,
    /// Live mmaps of this file (host-wide mapping ids).
    pub(crate) mappings: Vec<usize>,
    /// The VMM's own mapping of the file, made on first use by event-driven host access.
    pub(crate) vmm_map: Option<usize>,
    /// Released: the fd is closed and no mapping is left; pages are gone.
    pub(crate) released: bool,
    /// The inode's NUMA policy over file pages (6.19: `struct gmem_inode.policy`, set by
    /// `mbind()` on a mapping of the file): it places every page allocated later.
    pub(crate) policy: SharedPolicy,
}

impl Gmem {
    /// The file's fd, `None` once closed.
    pub fn fd(&self) -> Option<i32> {
        self.fd
    }

    /// The VM that created the file.
    pub fn vm(&self) -> usize {
        self.vm
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn size_pages(&self) -> u64 {
        self.size_pages
    }

    /// Creation flags (`GUEST_MEMFD_FLAG_*`).
    pub fn flags(&self) -> u64 {
        self.flags
    }

    /// Folio order: 0, or the HugeTLB page order.
    pub fn order(&self) -> u32 {
        self.order
    }

    /// Pages held by the page cache, in 4 KiB pages.
    pub fn nr_pages(&self) -> u64 {
        self.nr_pages
    }

    pub fn folio_pages(&self) -> u64 {
        1 << self.order
    }

    /// The page at file page `off`, if present.
    #[inline]
    pub fn page(&self, off: u64) -> Option<PageRef> {
        let e = self.pages.get(off);
        if e != 0 {
            return Some(PageRef {
                pfn: entry_frame(e),
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
        let pfn0 = entry_frame(e0);
        if !u64::from(pfn0).is_multiple_of(n) {
            return None;
        }
        let mut fresh = Vec::new();
        for i in 0..n {
            let e = self.pages.get(head + i);
            if e == 0 || entry_frame(e) != pfn0 + i as u32 {
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

    /// The bindings intersecting `[start, end)`: (first file page, binding), in offset
    /// order.
    pub fn bindings_in(&self, start: u64, end: u64) -> SmallVec<[(u64, FileBinding); 2]> {
        self.bindings
            .range(..end)
            .filter(|(_, b)| b.end > start)
            .map(|(s, b)| (*s, *b))
            .collect()
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
        if start < end && end - start == 1 {
            // One page: one lookup, no scan.
            return match self.pages.get(start) {
                0 => Vec::new(),
                e => vec![(start, entry_frame(e))],
            };
        }
        self.pages
            .entries(start, end)
            .into_iter()
            .map(|(o, e)| (o, entry_frame(e)))
            .collect()
    }

    /// Runs `[a, b)` of pages present in `[start, end)`, in order: O(chunks + folios).
    pub fn present_runs(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut runs = self.pages.runs_in(start, end);
        if !self.folios.is_empty() {
            let n = self.folio_pages();
            runs.extend(
                self.folios_in(start, end)
                    .into_iter()
                    .map(|(h, _)| (h.max(start), (h + n).min(end))),
            );
            runs.sort_unstable();
        }
        runs
    }

    /// Pages present in `[start, end)`: O(chunks + folios).
    pub fn present_count(&self, start: u64, end: u64) -> u64 {
        let n = self.folio_pages();
        self.pages.count_in(start, end)
            + self
                .folios_in(start, end)
                .into_iter()
                .map(|(h, _)| (h + n).min(end) - h.max(start))
                .sum::<u64>()
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

// ---------------------------------------------------------------- operations

impl Host {
    /// `KVM_CREATE_GUEST_MEMFD`.
    pub fn create_guest_memfd(
        &mut self,
        vm: usize,
        size: u64,
        flags: u64,
        page_order: u32,
    ) -> Result<usize> {
        let supported = self.supported_gmem_flags(vm) | uapi::GUEST_MEMFD_FLAG_HUGETLB;
        if flags & !supported != 0 {
            return Err(einval(format!(
                "guest_memfd flags {flags:#x} include unsupported bits {:#x}",
                flags & !supported
            )));
        }
        if size == 0 || size > i64::MAX as u64 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "guest_memfd size {size:#x} is zero, negative or not page aligned"
            )));
        }
        let hugetlb = flags & uapi::GUEST_MEMFD_FLAG_HUGETLB != 0;
        if !hugetlb && page_order != 0 {
            return Err(einval(format!(
                "page_order {page_order} without GUEST_MEMFD_FLAG_HUGETLB"
            )));
        }
        if hugetlb {
            if page_order != 9 && page_order != 18 {
                return Err(einval(format!(
                    "HugeTLB page_order {page_order} is not 9 or 18"
                )));
            }
            if flags & uapi::GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
                return Err(einval("GUEST_MEMFD_FLAG_HUGETLB with INIT_SHARED"));
            }
            let huge = PAGE_SIZE << page_order;
            if !size.is_multiple_of(huge) {
                return Err(einval(format!(
                    "size {size:#x} is not a multiple of the huge page size {huge:#x}"
                )));
            }
        }
        if hugetlb && flags & uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0 {
            // The NO_DIRECT_MAP series (v12) zaps order-0 folios only; no tree has both.
            return Err(einval("GUEST_MEMFD_FLAG_HUGETLB with NO_DIRECT_MAP"));
        }
        // A VM without private memory keeps no attributes, whatever the design.
        let attrs = if self.vms[vm].vm_type.has_private_mem() {
            self.vms[vm]
                .strategy
                .initial_file_attr(flags)
                .map(BitAttrMap::new)
        } else {
            None
        };
        let id = self.files.len();
        let fd = self.new_fd(Fd::Gmem(id));
        let inode = self.next_inode;
        self.next_inode += 1;
        self.files.push(Gmem {
            vm,
            fd: Some(fd),
            inode,
            size_pages: size >> PAGE_SHIFT,
            flags,
            order: page_order,
            folios: BTreeMap::new(),
            pages: SparseVec::new(),
            nr_pages: 0,
            content: SparseVec::new(),
            bindings: BTreeMap::new(),
            attrs,
            pins: BTreeMap::new(),
            orphans: FxHashMap::default(),
            mappings: Vec::new(),
            vmm_map: None,
            released: false,
            policy: SharedPolicy::default(),
        });
        Ok(id)
    }

    /// Allocate the folio holding file page `off` (not zeroed: not uptodate).
    pub(crate) fn gmem_alloc_folio(&mut self, file: usize, off: u64) -> Result<()> {
        let (vm, mut order) = (self.files[file].vm, self.files[file].order);
        if order > 0 {
            // A huge range left partly populated by a split and a partial free is refilled
            // page by page: a folio cannot be laid over the remaining pages.
            let h = off & !((1u64 << order) - 1);
            if !self.files[file]
                .pages
                .entries(h, h + (1u64 << order))
                .is_empty()
            {
                order = 0;
            }
        }
        let n = 1u64 << order;
        let head = off & !(n - 1);
        // kvm_gmem_get_folio(): the shared policy at the folio's index.
        let pfn = self.take_frames(Some(vm), order, Placement::File(file, head))?;
        let f = &mut self.files[file];
        if order == 0 {
            f.set_page(off, pfn, false);
        } else {
            f.folios.insert(head, (pfn, false));
        }
        f.nr_pages += n;
        self.admit_content(file, head, pfn, n);
        self.double_update_file(file, head, head + n, true);
        Ok(())
    }

    /// `fallocate()` on a guest_memfd.
    pub fn gmem_fallocate(&mut self, file: usize, mode: u32, offset: u64, len: u64) -> Result<()> {
        self.file_open(file)?;
        let f = &self.files[file];
        let punch = mode & uapi::FALLOC_FL_PUNCH_HOLE != 0;
        // vfs_fallocate() first, then kvm_gmem_fallocate().
        if len == 0 || offset > i64::MAX as u64 || len > i64::MAX as u64 {
            return Err(einval(format!(
                "fallocate offset {offset:#x} / length {len:#x} invalid"
            )));
        }
        if mode & !(uapi::FALLOC_FL_KEEP_SIZE | uapi::FALLOC_FL_PUNCH_HOLE) != 0
            || mode == uapi::FALLOC_FL_PUNCH_HOLE
        {
            return Err(err(
                errno::EOPNOTSUPP,
                format!("fallocate mode {mode:#x} not supported"),
            ));
        }
        if offset + len > i64::MAX as u64 {
            return Err(err(
                errno::EFBIG,
                format!("fallocate range {offset:#x}+{len:#x} too large"),
            ));
        }
        if mode & uapi::FALLOC_FL_KEEP_SIZE == 0 {
            return Err(err(
                errno::EOPNOTSUPP,
                "guest_memfd cannot change size: FALLOC_FL_KEEP_SIZE is required",
            ));
        }
        let align = PAGE_SIZE << f.order;
        if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(einval(format!(
                "fallocate offset {offset:#x} / length {len:#x} not aligned to {align:#x}"
            )));
        }
        let size = f.size_pages << PAGE_SHIFT;
        let (start, end) = (offset >> PAGE_SHIFT, (offset + len) >> PAGE_SHIFT);
        if punch {
            let end = end.min(f.size_pages);
            if start < end {
                self.punch(file, start, end);
            }
            return Ok(());
        }
        if offset + len > size {
            return Err(einval(format!(
                "fallocate range {offset:#x}+{len:#x} beyond size {size:#x}"
            )));
        }
        // Allocate folio by folio; on ENOMEM the pages allocated so far stay, as in the kernel.
        let n = f.folio_pages();
        let mut off = start;
        while off < end {
            if self.files[file].page(off).is_none() {
                self.gmem_alloc_folio(file, off)?;
            }
            off += n;
        }
        Ok(())
    }

    /// Punch `[start, end)` out of a file: zap stage-2 in every bound slot, unmap host
    /// mappings, free the pages (pinned pages live on until unpinned).
    pub(crate) fn punch(&mut self, file: usize, start: u64, end: u64) {
        self.gmem_invalidate(file, start, end, Zap::Backed);
        self.unmap_file_range(file, start, end);
        self.double_update_file(file, start, end, false);
        let vm = self.files[file].vm;
        // Split folios straddling the range (HugeTLB ranges are huge aligned, so only
        // 4 KiB files or already split folios get here partially).
        for (head, pfn) in self.files[file].folios_in(start, end) {
            let n = self.files[file].folio_pages();
            if head >= start && head + n <= end {
                self.files[file].folios.remove(&head);
                self.files[file].nr_pages -= n;
                self.release_or_orphan(file, head, n, pfn, vm);
            } else if self.files[file].split(head) {
                let c = self.costs.split;
                self.vms[vm].stats.split(c);
            }
        }
        for (off, pfn) in self.files[file].small_pages_in(start, end) {
            self.files[file].pages.set(off, 0);
            self.files[file].nr_pages -= 1;
            self.release_or_orphan(file, off, 1, pfn, vm);
        }
    }

    /// Free `n` pages from file page `off` (frame `pfn`), keeping pinned ones as orphans.
    pub(crate) fn release_or_orphan(&mut self, file: usize, off: u64, n: u64, pfn: u32, vm: usize) {
        self.evict_content(file, off, pfn, n);
        let pinned: Vec<u64> = if self.files[file].pins.is_empty() {
            Vec::new()
        } else {
            self.files[file].pins_in(off, off + n)
        };
        if pinned.is_empty() {
            self.give_frames(Some(vm), pfn, n.trailing_zeros());
            return;
        }
        for i in 0..n {
            let p = pfn + i as u32;
            if let Some(c) = self.files[file].pins.remove(&(off + i)) {
                self.files[file]
                    .orphans
                    .entry(off + i)
                    .or_default()
                    .push((p, c));
            } else {
                self.give_frames(Some(vm), p, 0);
            }
        }
    }

    /// Invalidate file pages `[start, end)` for the VMs that map them, in the shape of
    /// `__kvm_gmem_invalidate_begin()`: walk the bindings of the range and zap the stage-2
    /// entries of the gfns bound there, of the types `zap` says.
    pub(crate) fn gmem_invalidate(&mut self, file: usize, start: u64, end: u64, zap: Zap) {
        for (bs, b) in self.files[file].bindings_in(start, end) {
            let base = self.vms[b.vm].slots[&b.slot].base_gfn;
            let (lo, hi) = (start.max(bs), end.min(b.end));
            let filter = match zap {
                Zap::Backed => self.binding_backs(b),
                Zap::Only(filter) => filter,
            };
            self.zap(b.vm, base + (lo - bs), base + (hi - bs), filter);
        }
    }

    /// Remove every host page-table mapping of `[start, end)` of `file`.
    pub(crate) fn unmap_file_range(&mut self, file: usize, start: u64, end: u64) -> u64 {
        let mut total = 0;
        let vm = self.files[file].vm;
        for i in 0..self.files[file].mappings.len() {
            let mid = self.files[file].mappings[i];
            if let MapKind::Gmem { pgoff, present, .. } = &mut self.space.maps[mid].kind {
                if present.is_empty() || end <= *pgoff {
                    continue;
                }
                let lo = start.saturating_sub(*pgoff);
                let hi = end - *pgoff;
                let before = present.len();
                present.remove_range(lo..hi);
                total += before - present.len();
            }
        }
        if total > 0 {
            let c = self.costs.host_unmap * total + self.costs.tlb_flush;
            self.vms[vm].stats.host_unmapped(total, c);
        }
        total
    }

    pub(crate) fn file_open(&self, file: usize) -> Result<()> {
        if self.files[file].fd.is_none() {
            return Err(err(errno::EBADF, "guest_memfd is closed"));
        }
        Ok(())
    }

    /// `close()` of a guest_memfd fd.
    pub fn gmem_close(&mut self, file: usize) -> Result<()> {
        let Some(fd) = self.files[file].fd.take() else {
            return Err(err(errno::EBADF, "guest_memfd already closed"));
        };
        self.fds.remove(&fd);
        self.free_fds.insert(fd);
        self.maybe_release(file);
        Ok(())
    }

    /// Release the file once neither the fd nor any mapping refers to it (mainline
    /// `kvm_gmem_release` followed by inode eviction): bound slots lose their file, their
    /// stage-2 entries are zapped, the pages are freed.
    pub(crate) fn maybe_release(&mut self, file: usize) {
        let f = &self.files[file];
        if f.fd.is_some() || !f.mappings.is_empty() || f.released {
            return;
        }
        let binds: Vec<FileBinding> = f.bindings.values().copied().collect();
        let size = f.size_pages;
        self.punch(file, 0, size);
        for b in &binds {
            let slot = self.vms[b.vm].slots.get_mut(&b.slot).expect("bound slot");
            let side = if b.shared_side {
                slot.shared.as_mut()
            } else {
                slot.gmem.as_mut()
            };
            if let Some(bd) = side {
                bd.live = false;
            }
            let (g0, g1) = (slot.base_gfn, slot.end_gfn());
            self.zap(b.vm, g0, g1, None);
        }
        let f = &mut self.files[file];
        f.bindings.clear();
        f.released = true;
        for b in binds {
            self.bindings_changed(b.vm);
        }
    }

    /// Remove the host mappings of the pages of `[start, end)` of `file` that the host may
    /// no longer fault (`host_may_access`).
    pub(crate) fn unmap_unreachable(&mut self, file: usize, start: u64, end: u64) {
        if !self.vms[self.files[file].vm].strategy.reach_by_binding() {
            return;
        }
        let mut gone = Vec::new();
        for &mid in &self.files[file].mappings {
            if let MapKind::Gmem { pgoff, present, .. } = &self.space.maps[mid].kind {
                let lo = start.saturating_sub(*pgoff);
                let hi = end.saturating_sub(*pgoff);
                gone.extend(
                    present
                        .iter()
                        .skip_while(|&i| i < lo)
                        .take_while(|&i| i < hi)
                        .map(|i| pgoff + i),
                );
            }
        }
        for off in gone {
            if !self.host_may_access(file, off) {
                self.unmap_file_range(file, off, off + 1);
            }
        }
    }

    /// `mmap()` of a guest_memfd.
    pub fn gmem_mmap(
        &mut self,
        file: usize,
        offset: u64,
        length: Option<u64>,
        shared: bool,
    ) -> Result<usize> {
        self.file_open(file)?;
        let f = &self.files[file];
        // do_mmap() checks its arguments (EINVAL) before the file's mmap handler runs
        // (kvm_gmem_mmap(): ENODEV without GUEST_MEMFD_FLAG_MMAP, then EINVAL for a
        // private mapping).
        let length = length.unwrap_or((f.size_pages << PAGE_SHIFT).saturating_sub(offset));
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!("mmap offset {offset:#x} not page aligned")));
        }
        let length = mmap_length(length)?;
        if f.flags & uapi::GUEST_MEMFD_FLAG_MMAP == 0 {
            return Err(err(
                errno::ENODEV,
                "guest_memfd was created without GUEST_MEMFD_FLAG_MMAP",
            ));
        }
        if !shared {
            return Err(einval("guest_memfd cannot be mapped MAP_PRIVATE"));
        }
        Ok(self.add_mapping(
            length >> PAGE_SHIFT,
            MapKind::Gmem {
                file,
                pgoff: offset >> PAGE_SHIFT,
                present: roaring::RoaringTreemap::new(),
            },
        ))
    }

    /// The VMM's own whole-file mapping, used by event-driven host access.
    pub(crate) fn vmm_mapping(&mut self, file: usize) -> usize {
        if let Some(m) = self.files[file].vmm_map {
            return m;
        }
        let pages = self.files[file].size_pages;
        let m = self.add_mapping(
            pages,
            MapKind::Gmem {
                file,
                pgoff: 0,
                present: roaring::RoaringTreemap::new(),
            },
        );
        self.files[file].vmm_map = Some(m);
        m
    }

    /// File pages present in `[start, end)`: O(pages present), never O(range).
    pub(crate) fn present_offsets(&self, file: usize, start: u64, end: u64) -> Vec<u64> {
        let f = &self.files[file];
        let mut offs: Vec<u64> = f
            .small_pages_in(start, end)
            .into_iter()
            .map(|p| p.0)
            .collect();
        for (h, _) in f.folios_in(start, end) {
            offs.extend(h.max(start)..(h + f.folio_pages()).min(end));
        }
        offs
    }

    /// `kvm_gmem_get_pfn`: allocate on demand, zero on first use; `EHWPOISON` for a
    /// poisoned page (the access returns to the VMM: an exit round trip).
    pub(crate) fn gmem_get_pfn(&mut self, vm: usize, f: usize, off: u64) -> Result<u32> {
        if self.files[f].page(off).is_none() {
            self.gmem_alloc_folio(f, off)?;
        }
        let r = self.files[f].page(off).expect("just allocated");
        if self.frames.poisoned_in(r.pfn, 0) {
            let c = self.costs.exit_roundtrip;
            self.vms[vm].stats.hwpoison_refusal(c);
            return Err(hwpoisoned(off));
        }
        if !r.uptodate {
            let order = self.files[f].order;
            if self.vms[vm].opts.zero == ZeroPolicy::OnUse {
                let (head, first, ord) = match r.folio_head {
                    Some(h) => (h, r.pfn - (off - h) as u32, order),
                    None => (off, r.pfn, 0),
                };
                let owner = self.files[f].vm;
                self.zero_file_pages(Some(owner), f, head, first, ord);
            }
            self.files[f].mark_uptodate(off, r);
        }
        // NO_DIRECT_MAP (series v12): cleared first, then out of the direct map before
        // anything maps it.
        self.gmem_zap_direct_map(f, off);
        Ok(r.pfn)
    }

    /// `kvm_gmem_get_pfn()` on each of the `n` pages `off..off + n` of order-0 file `f`,
    /// none of them present, in one step: the frames that `n` single allocations would take
    /// (as runs), their content admitted and (under [`ZeroPolicy::OnUse`]) cleared per run,
    /// the page cache and the double-backing counts updated once. Returns the frame runs
    /// `(file page, first frame, pages)`, or `None`, with nothing changed, when the host
    /// cannot supply all `n` frames (the caller then goes page by page, to fail where the
    /// kernel would) or has several NUMA nodes.
    pub(crate) fn gmem_get_pfn_run(
        &mut self,
        vm: usize,
        f: usize,
        off: u64,
        n: u64,
    ) -> Option<Vec<(u64, u32, u64)>> {
        // No frame carries another owner's data tag: nothing to forget when zeroing.
        debug_assert!(self.frames.stale.is_empty());
        debug_assert!(self.files[f].order == 0 && self.files[f].pages.is_default_in(off, off + n));
        let owner = self.files[f].vm;
        // One NUMA node: its allocator in one step. Several: each page's policy decides
        // its node, so the caller goes page by page.
        let [node] = &mut self.frames.nodes[..] else {
            return None;
        };
        let blocks = node.alloc_pages(n).ok()?;
        let cost = self.costs.alloc(0) * n;
        self.vms[owner].stats.allocated(n, cost);
        let zero = self.vms[vm].opts.zero == ZeroPolicy::OnUse;
        let mut runs = Vec::with_capacity(blocks.len());
        let mut o = off;
        for (pfn, len) in blocks {
            self.files[f]
                .pages
                .fill_counting(o, o + len, (pfn + 1) | UPTODATE);
            self.admit_content(f, o, pfn, len);
            if zero {
                self.files[f].content.clear_range(o, o + len);
            }
            self.gmem_zap_direct_map_run(f, pfn, len);
            runs.push((o, pfn, len));
            o += len;
        }
        self.files[f].nr_pages += n;
        self.double_update_file(f, off, off + n, true);
        if zero {
            let cost = self.costs.zero(0) * n;
            self.vms[owner].stats.zeroed(n, cost);
        }
        Some(runs)
    }

    /// `kvm_gmem_populate()` as SNP `LAUNCH_UPDATE` / TDX `INIT_MEM_REGION` use it: load the
    /// initial image into private guest_memfd pages from `gpa` on, before the guest runs.
    /// The pages are written, not zeroed (they become uptodate with the image). TDX adds
    /// each page with `TDH.MEM.PAGE.ADD` (mapped in the S-EPT, no later AUG/ACCEPT); SNP
    /// assigns it in the RMP.
    ///
    /// As mainline: the memslot of the first gfn must have guest_memfd (`EINVAL`; its file
    /// closed: `EFAULT`); the range is cut at that memslot's end; pages are populated in
    /// order up to the first gfn that is not private. Returns the pages populated, or the
    /// error when that is none (`EINVAL` for a first gfn that is not private).
    ///
    /// The copy goes through the kernel direct map: a page of a NO_DIRECT_MAP file that
    /// left it (mapped before) is refused with `EFAULT` (series v12: the pages of a
    /// populated folio leave the direct map at their first mapping, after population).
    ///
    /// The arch hooks refuse a page loaded before, and the loop stops there as for any
    /// error: SNP (`sev_gmem_post_populate()`) when the page is already assigned in the RMP
    /// (populated, or prepared by a private guest fault): `EINVAL`; TDX
    /// (`tdx_gmem_post_populate()`) when the gfn is already mapped in the S-EPT (the TDP
    /// MMU's map of the page is not `RET_PF_FIXED`): `EIO`. The page keeps its content.
    /// A hwpoisoned page stops it too, before the arch hook (`__kvm_gmem_get_pfn()`):
    /// `EHWPOISON`.
    pub fn populate(&mut self, vm: usize, gpa: u64, size: u64, value: u64) -> Result<u64> {
        if size == 0
            || !gpa.is_multiple_of(PAGE_SIZE)
            || !size.is_multiple_of(PAGE_SIZE)
            || gpa.checked_add(size).is_none()
        {
            return Err(einval(format!("populate range {gpa:#x}+{size:#x} invalid")));
        }
        let g0 = gpa >> PAGE_SHIFT;
        let Some(slot) = self.vms[vm].slot_at(g0) else {
            return Err(einval(format!("populate: no memslot at gpa {gpa:#x}")));
        };
        let Some(FilePage {
            file: f,
            off: off0,
            live,
        }) = slot.offset_of(g0)
        else {
            return Err(einval(format!(
                "populate: the memslot at gpa {gpa:#x} has no guest_memfd"
            )));
        };
        if !live {
            return Err(err(errno::EFAULT, "populate: the guest_memfd is closed"));
        }
        let g1 = (g0 + (size >> PAGE_SHIFT)).min(slot.end_gfn());
        let mut targets = Vec::new();
        for gfn in g0..g1 {
            if !self.gfn_private(vm, gfn) {
                if gfn == g0 {
                    return Err(einval(format!("populate: gfn {gfn:#x} is not private")));
                }
                break;
            }
            targets.push((gfn, f, off0 + (gfn - g0)));
        }
        let mut done = 0;
        for (gfn, f, off) in targets {
            let poisoned = self.files[f]
                .page(off)
                .is_some_and(|r| self.frames.poisoned_in(r.pfn, 0));
            let refused = if poisoned {
                Err(hwpoisoned(off))
            } else {
                self.vms[vm]
                    .vm_type
                    .populate_refused(self, vm, gfn, f, off)
                    .and_then(|()| self.kernel_copy_allowed(f, off))
            };
            if let Err(e) = refused {
                if done == 0 {
                    return Err(e);
                }
                break;
            }
            if self.files[f].page(off).is_none()
                && let Err(e) = self.gmem_alloc_folio(f, off)
            {
                // Out of host memory: the pages done so far stay populated.
                if done == 0 {
                    return Err(e);
                }
                break;
            }
            done += 1;
            let r = self.files[f].page(off).expect("just allocated");
            self.files[f].mark_uptodate(off, r);
            self.set_content_at(Loc::File(f, off), value);
            if !self.frames.stale.is_empty() {
                self.frames.stale.remove(&r.pfn);
            }
            let vt = self.vms[vm].vm_type;
            vt.populate(self, vm, gfn, f, off, r.pfn);
        }
        Ok(done)
    }

    /// `memory_failure()` on the page at byte `offset` of guest_memfd `file`, as mainline
    /// handles it for guest_memfd (`kvm_gmem_error_folio()`, unchanged since 6.8 apart
    /// from the folio conversion; followed here as of 7.3): the folio is marked
    /// hwpoisoned and its stage-2 mappings are zapped (invalidate, no truncate: it stays in
    /// the page cache); `memory_failure()` first unmaps it from every host page table
    /// (`hwpoison_user_mappings()`). Afterwards a guest access or any other
    /// `kvm_gmem_get_pfn()` user (pre-fault, populate) fails with `EHWPOISON`, a host access
    /// through a mapping gets SIGBUS, and punching the hole drops the page: the frame is
    /// retired, never reused, and the next access allocates a fresh page. A page of an
    /// intact huge folio poisons the whole folio (the hwpoison flag is the folio's, as for
    /// HugeTLB).
    ///
    /// Errors: `offset` unaligned or at or beyond the size → `EINVAL`; no page at
    /// `offset` → `ENOENT` (a memory failure is of a physical page, and the offset names
    /// none: the kernel would find the failing frame free, or in another owner's hands, and
    /// never reach this file); a page already poisoned → `EHWPOISON` (`memory_failure()`'s
    /// answer for a page already marked). The fd need not be open: hardware fails a page
    /// wherever it is, and a file kept alive by a mapping still has its pages (a released
    /// file has none: `ENOENT`).
    pub fn memory_failure(&mut self, file: usize, offset: u64) -> Result<()> {
        let f = &self.files[file];
        let size = f.size_pages << PAGE_SHIFT;
        if !offset.is_multiple_of(PAGE_SIZE) || offset >= size {
            return Err(einval(format!(
                "memory_failure: offset {offset:#x} unaligned or beyond size {size:#x}"
            )));
        }
        let off = offset >> PAGE_SHIFT;
        let Some(r) = f.page(off) else {
            return Err(err(
                errno::ENOENT,
                format!("memory_failure: no page at offset {offset:#x}"),
            ));
        };
        if self.frames.poisoned_in(r.pfn, 0) {
            return Err(hwpoisoned(off));
        }
        let (start, end) = match r.folio_head {
            Some(h) => (h, h + f.folio_pages()),
            None => (off, off + 1),
        };
        let pfn0 = r.pfn - (off - start) as u32;
        let lost = (start..end)
            .filter(|&o| self.holds_current_content(file, o))
            .count() as u64;
        self.frames
            .hwpoison
            .extend(pfn0..pfn0 + (end - start) as u32);
        self.unmap_file_range(file, start, end);
        self.gmem_invalidate(file, start, end, Zap::Backed);
        let vm = self.files[file].vm;
        self.vms[vm].stats.hwpoisoned(end - start, lost);
        Ok(())
    }

    /// Whether page `off` of `file` holds the current content of the gfn bound there: it is
    /// uptodate and is the page the gfn's present view (private or shared, as its
    /// attribute says) reads.
    fn holds_current_content(&self, file: usize, off: u64) -> bool {
        let f = &self.files[file];
        if !f.page(off).is_some_and(|r| r.uptodate) {
            return false;
        }
        let Some((bs, b)) = f.binding_at(off) else {
            return false;
        };
        let slot = &self.vms[b.vm].slots[&b.slot];
        let gfn = slot.base_gfn + (off - bs);
        let view = if self.gfn_private(b.vm, gfn) {
            slot.offset_of(gfn)
        } else {
            self.shared_file_page(b.vm, slot, gfn)
        };
        view.is_some_and(|p| p.live && p.file == file && p.off == off)
    }

    /// Whether any page of `[o0, o1)` of `file` sits on a hwpoisoned frame.
    pub(crate) fn file_range_poisoned(&self, file: usize, o0: u64, o1: u64) -> bool {
        !self.frames.hwpoison.is_empty()
            && (o0..o1).any(|o| {
                self.files[file]
                    .page(o)
                    .is_some_and(|r| self.frames.poisoned_in(r.pfn, 0))
            })
    }
}

/// `EHWPOISON` for the page at file page `off`.
fn hwpoisoned(off: u64) -> crate::error::Error {
    err(
        errno::EHWPOISON,
        format!("page at offset {:#x} is hwpoisoned", off << PAGE_SHIFT),
    )
}

#[cfg(test)]
mod hwpoison_tests {
    use crate::error::{Error, HostFaultKind, errno};
    use crate::host::Host;
    use crate::vm::ZeroPolicy;
    use crate::{HostOp, PAGE_SIZE, StrategyKind, VmType, uapi};

    const PUNCH: u32 = uapi::FALLOC_FL_PUNCH_HOLE | uapi::FALLOC_FL_KEEP_SIZE;

    fn errno_of<T: std::fmt::Debug>(r: crate::Result<T>) -> i32 {
        r.unwrap_err().errno()
    }

    /// A VM of `strategy` with a 2 MiB memslot at gpa 0 bound to a guest_memfd of
    /// `order` (MMAP-capable for `inplace`), its first 1 MiB private, the rest shared.
    fn vm_with(vt: VmType, strategy: StrategyKind, order: u32) -> (Host, usize, usize) {
        let mut h = Host::new(64 << 20).unwrap();
        let vm = h.create_vm(vt, strategy);
        let mut flags = 0;
        if strategy == StrategyKind::Inplace {
            flags |= uapi::GUEST_MEMFD_FLAG_MMAP;
        }
        if order > 0 {
            flags |= uapi::GUEST_MEMFD_FLAG_HUGETLB;
        }
        let f = h.create_guest_memfd(vm, 2 << 20, flags, order).unwrap();
        h.bind_at_zero(vm, f, 2 << 20);
        h.convert(vm, 256, 512, false).unwrap();
        h.convert(vm, 0, 256, true).unwrap();
        h.strict = true;
        (h, vm, f)
    }

    #[test]
    fn poisoned_page_stays_cached_unmapped_and_refuses_get_pfn() {
        let (mut h, vm, f) = crate::frames::tests::sample(ZeroPolicy::OnUse);
        let pfn = h.file(f).page(1).unwrap().pfn;
        let (faults, nr) = (h.stats(vm).stage2_faults, h.file(f).nr_pages());
        h.memory_failure(f, PAGE_SIZE).unwrap();
        // Invalidated, not truncated: the page stays in the page cache, unmapped.
        assert_eq!(h.file(f).nr_pages(), nr);
        assert_eq!(h.file(f).page(1).unwrap().pfn, pfn);
        assert_eq!(h.vm(vm).s2.lookup(1, &h.files), None);
        let s = h.stats(vm);
        assert_eq!((s.hwpoisoned_pages, s.hwpoison_lost_pages), (1, 1));
        h.check().unwrap();
        // Every kvm_gmem_get_pfn() user: a guest access, KVM_PRE_FAULT_MEMORY, populate.
        let e = h.guest_access(vm, PAGE_SIZE, true, None).unwrap_err();
        assert_eq!(e.errno(), errno::EHWPOISON);
        assert_eq!(
            errno_of(h.pre_fault_memory(vm, PAGE_SIZE, PAGE_SIZE)),
            errno::EHWPOISON
        );
        assert_eq!(
            errno_of(h.populate(vm, PAGE_SIZE, PAGE_SIZE, 9)),
            errno::EHWPOISON
        );
        assert_eq!(h.stats(vm).stage2_faults, faults);
        assert_eq!(h.stats(vm).hwpoison_refused, 2);
        // The other pages are untouched.
        assert_eq!(h.guest_access(vm, 2 * PAGE_SIZE, true, Some(3)).unwrap(), 3);
        h.check().unwrap();
    }

    #[test]
    fn punching_retires_the_frame_and_the_next_access_gets_a_fresh_zeroed_page() {
        let (mut h, vm, f) = crate::frames::tests::sample(ZeroPolicy::OnUse);
        let pfn = h.file(f).page(1).unwrap().pfn;
        h.memory_failure(f, PAGE_SIZE).unwrap();
        let (free, allocated) = (h.free_pages(), h.stats(vm).pages_allocated);
        let frees = h.stats(vm).frees;
        h.gmem_fallocate(f, PUNCH, PAGE_SIZE, PAGE_SIZE).unwrap();
        // Retired: gone from the VM, not back in the allocator, not counted as freed.
        assert_eq!(h.free_pages(), free);
        assert_eq!(h.stats(vm).pages_allocated, allocated - 1);
        assert_eq!(h.stats(vm).frees, frees);
        h.check().unwrap();
        assert_eq!(h.guest_access(vm, PAGE_SIZE, true, None).unwrap(), 0);
        assert_ne!(h.file(f).page(1).unwrap().pfn, pfn);
        assert!(h.frames.hwpoison.contains(&pfn));
        h.check().unwrap();
        // Through a snapshot, the retired frame stays retired.
        let g = Host::from_snapshot(&h.to_snapshot().unwrap()).unwrap();
        assert!(g.frames.hwpoison.contains(&pfn));
        assert_eq!(g.free_pages(), h.free_pages());
    }

    #[test]
    fn bad_input_gets_the_kernels_errno() {
        let (mut h, _, f) = crate::frames::tests::sample(ZeroPolicy::OnUse);
        let size = 4 << 20;
        assert_eq!(errno_of(h.memory_failure(f, 1)), errno::EINVAL);
        assert_eq!(errno_of(h.memory_failure(f, size)), errno::EINVAL);
        assert_eq!(errno_of(h.memory_failure(f, !0xfff)), errno::EINVAL);
        // No page at offset 8: nothing physical to fail.
        assert_eq!(errno_of(h.memory_failure(f, 8 * PAGE_SIZE)), errno::ENOENT);
        h.memory_failure(f, PAGE_SIZE).unwrap();
        assert_eq!(errno_of(h.memory_failure(f, PAGE_SIZE)), errno::EHWPOISON);
        assert_eq!(h.stats(0).hwpoisoned_pages, 1);
        // Released with its fd: no pages left.
        h.gmem_close(f).unwrap();
        assert_eq!(errno_of(h.memory_failure(f, 2 * PAGE_SIZE)), errno::ENOENT);
    }

    #[test]
    fn a_host_access_through_the_mmap_is_sigbus() {
        let (mut h, vm, f) = vm_with(VmType::Snp, StrategyKind::Inplace, 0);
        let m = h.gmem_mmap(f, 0, None, true).unwrap();
        // Page 300 is shared: the host maps and writes it, then it fails.
        let off = 300 * PAGE_SIZE;
        h.map_access(m, off, HostOp::Write(4)).unwrap();
        h.memory_failure(f, off).unwrap();
        h.check().unwrap();
        for op in [HostOp::Read, HostOp::Write(5), HostOp::Pin] {
            assert!(matches!(
                h.map_access(m, off, op),
                Err(Error::HostFault {
                    kind: HostFaultKind::Poisoned,
                    ..
                })
            ));
        }
        // Same page for the guest's shared view: EHWPOISON.
        assert_eq!(
            errno_of(h.guest_access(vm, off, false, None)),
            errno::EHWPOISON
        );
        assert_eq!(h.stats(vm).hwpoison_refused, 4);
    }

    #[test]
    fn two_sided_designs_lose_only_the_private_side() {
        // dual: gfn 300 is shared (its content in userspace memory); its private page,
        // allocated earlier and never discarded, fails: nothing current is lost.
        let (mut h, vm, f) = vm_with(VmType::Snp, StrategyKind::Dual, 0);
        h.guest_access(vm, 300 * PAGE_SIZE, false, Some(8)).unwrap();
        h.gmem_fallocate(f, uapi::FALLOC_FL_KEEP_SIZE, 300 * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        h.gmem_get_pfn(vm, f, 300).unwrap();
        h.memory_failure(f, 300 * PAGE_SIZE).unwrap();
        assert_eq!(h.stats(vm).hwpoison_lost_pages, 0);
        assert_eq!(h.guest_access(vm, 300 * PAGE_SIZE, false, None).unwrap(), 8);
        // Converting it private meets the poisoned page.
        h.convert(vm, 300, 301, true).unwrap();
        assert_eq!(
            errno_of(h.guest_access(vm, 300 * PAGE_SIZE, true, None)),
            errno::EHWPOISON
        );
        h.check().unwrap();
        // inplace: the one page of the shared gfn fails; its content is lost.
        let (mut h, vm, f) = vm_with(VmType::Snp, StrategyKind::Inplace, 0);
        h.guest_access(vm, 300 * PAGE_SIZE, false, Some(8)).unwrap();
        h.memory_failure(f, 300 * PAGE_SIZE).unwrap();
        assert_eq!(h.stats(vm).hwpoison_lost_pages, 1);
        assert_eq!(
            errno_of(h.guest_access(vm, 300 * PAGE_SIZE, false, None)),
            errno::EHWPOISON
        );
        h.check().unwrap();
    }

    #[test]
    fn a_page_of_an_intact_huge_folio_poisons_the_folio() {
        let (mut h, vm, f) = vm_with(VmType::Snp, StrategyKind::Dual, 9);
        h.convert(vm, 0, 512, true).unwrap();
        h.guest_access(vm, 0, true, Some(1)).unwrap();
        assert_eq!(h.stats(vm).stage2_2m, 1);
        h.memory_failure(f, 3 * PAGE_SIZE).unwrap();
        let s = h.stats(vm);
        assert_eq!(
            (s.hwpoisoned_pages, s.hwpoison_lost_pages, s.stage2_2m),
            (512, 512, 0)
        );
        assert_eq!(
            errno_of(h.guest_access(vm, 400 * PAGE_SIZE, true, None)),
            errno::EHWPOISON
        );
        let free = h.free_pages();
        h.gmem_fallocate(f, PUNCH, 0, 2 << 20).unwrap();
        assert_eq!(h.free_pages(), free);
        assert_eq!(h.frames.hwpoison.len(), 512);
        // A fresh folio backs the range again.
        assert_eq!(h.guest_access(vm, 3 * PAGE_SIZE, true, None).unwrap(), 0);
        h.check().unwrap();
    }

    #[test]
    fn check_finds_a_mapping_of_a_poisoned_frame() {
        let (mut h, _, f) = crate::frames::tests::sample(ZeroPolicy::OnUse);
        // Poisoned without the zap memory_failure() does: stage-2 still maps it.
        let pfn = h.file(f).page(1).unwrap().pfn;
        h.frames.hwpoison.insert(pfn);
        let e = h.check().unwrap_err().to_string();
        assert!(e.contains("hwpoisoned pfn"), "{e}");
    }
}
