//! The host: page allocator, frame contents, and every VM, guest_memfd file and mapping.
//!
//! All state of one simulated host lives in one `Host` value; VMs, files and mappings are
//! addressed by index. Callers that share a host between threads wrap it in one lock.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;

use crate::alloc::{BuddyAllocator, MAX_PAGES};
use crate::bit_attr_map::BitAttrMap;
use crate::cost::CostModel;
use crate::error::{Result, einval, err, errno};
use crate::guest_memfd::{FileBinding, Gmem};
use crate::mapping::{MapKind, Mapping};
use crate::memslot::{Binding, Memslot};
use crate::metrics::Stats;
use crate::platform::VmType;
use crate::sparse::{Dense, SparseVec};
use crate::strategy::{SharedSide, StrategyKind};
use crate::vm::{Vm, ZeroPolicy};
use crate::{PAGE_SHIFT, PAGE_SIZE, uapi};

/// Where the content of a frame lives: the host's frame store, or the page of a
/// guest_memfd whose page cache holds the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    Frame(u32),
    File(usize, u64),
}

/// Writer tag of a page last written by the host (the VMM).
pub const HOST_WRITER: u16 = u16::MAX;

/// What an fd number refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Fd {
    Kvm,
    Vm(usize),
    Gmem(usize),
}

/// The guest_memfd argument of `KVM_SET_USER_MEMORY_REGION2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GmemArg {
    None,
    Fd(i64),
    /// A file object of another `Host`: to the kernel, a guest_memfd of another VM.
    Foreign,
}

/// `struct kvm_userspace_memory_region2`, plus the `two_offsets` shared range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub guest_memfd: GmemArg,
    pub guest_memfd_offset: u64,
    pub shared_guest_memfd: GmemArg,
    pub shared_offset: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Host {
    pub(crate) alloc: BuddyAllocator,
    /// Content value per frame (what a read of the page returns), for frames in no
    /// guest_memfd page cache; a frame in one keeps its content in the file
    /// ([`Gmem::content`]) until it leaves the page cache. Each frame's content is in exactly
    /// one of the two places (`check()` verifies it).
    pub(crate) content: SparseVec<u64, Dense<u64>>,
    /// Frames freed with data still in them: frame -> owner tag of that data (`vm + 1`,
    /// or `HOST_WRITER` for VMM memory). Empty unless zeroing is skipped; a guest that
    /// reads such data of another owner is an isolation violation.
    pub(crate) stale: FxHashMap<u32, u16>,
    /// Live mmaps of guest_memfd files: while there are none, a shared stage-2 page of a
    /// userspace-backed memslot is ordinary memory, whose content is at its frame.
    pub(crate) gmem_mmaps: u32,
    pub(crate) costs: CostModel,
    pub(crate) vms: Vec<Vm>,
    pub(crate) files: Vec<Gmem>,
    pub(crate) maps: Vec<Mapping>,
    /// Live mappings by start address.
    pub(crate) va: BTreeMap<u64, usize>,
    pub(crate) next_va: u64,
    pub(crate) fds: BTreeMap<i32, Fd>,
    /// Every number below `next_fd` is open (in `fds`) or free (here): a new fd is the
    /// lowest free number, as `get_unused_fd_flags()` gives.
    pub(crate) free_fds: BTreeSet<i32>,
    pub(crate) next_fd: i32,
    pub(crate) next_inode: u64,
    /// SEV-SNP reverse map: private frame -> (vm, gfn) it is assigned to.
    pub(crate) rmp: FxHashMap<u32, (usize, u64)>,
    /// The last memory-fault exit the VMM answered by converting (fault policy
    /// `Convert`): `(gpa, flags)`, reported in event details.
    #[serde(skip)]
    pub(crate) implicit: Option<(u64, u64)>,
    /// Check every invariant after each operation (`GMEM_STRICT=1`).
    pub strict: bool,
}

/// Mappings are placed upward from 16 TiB, leaving room for guests of tens of TiB below
/// the 128 TiB user limit (`TASK_SIZE`).
pub(crate) const VA_BASE: u64 = 0x1000_0000_0000;
const VA_ALIGN: u64 = 1 << 21;

impl Host {
    /// A host with `memory` bytes of RAM.
    pub fn new(memory: u64) -> Result<Self> {
        if memory == 0 || !memory.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "host memory {memory:#x} must be a positive multiple of the page size"
            )));
        }
        let pages = memory >> PAGE_SHIFT;
        if pages > MAX_PAGES {
            return Err(einval(format!(
                "host memory {memory:#x} exceeds {MAX_PAGES} pages"
            )));
        }
        let mut h = Self {
            alloc: BuddyAllocator::new(pages),
            content: SparseVec::new(),
            stale: FxHashMap::default(),
            gmem_mmaps: 0,
            costs: CostModel::default(),
            vms: Vec::new(),
            files: Vec::new(),
            maps: Vec::new(),
            va: BTreeMap::new(),
            next_va: VA_BASE,
            fds: BTreeMap::new(),
            free_fds: BTreeSet::new(),
            next_fd: 3,
            next_inode: 1,
            rmp: FxHashMap::default(),
            implicit: None,
            strict: false,
        };
        h.new_fd(Fd::Kvm);
        Ok(h)
    }

    pub fn kvm_fd(&self) -> i32 {
        3
    }

    /// The lowest fd number not open (POSIX `open(2)`; the kernel's
    /// `get_unused_fd_flags()`), numbers 0-2 being the VMM's standard streams.
    fn new_fd(&mut self, f: Fd) -> i32 {
        let fd = self.free_fds.pop_first().unwrap_or_else(|| {
            self.next_fd += 1;
            self.next_fd - 1
        });
        self.fds.insert(fd, f);
        fd
    }

    pub fn total_pages(&self) -> u64 {
        self.alloc.total_pages()
    }

    pub fn free_pages(&self) -> u64 {
        self.alloc.free_pages()
    }

    pub fn costs(&self) -> &CostModel {
        &self.costs
    }

    pub fn costs_mut(&mut self) -> &mut CostModel {
        &mut self.costs
    }

    pub fn nr_vms(&self) -> usize {
        self.vms.len()
    }

    pub fn nr_files(&self) -> usize {
        self.files.len()
    }

    pub fn nr_mappings(&self) -> usize {
        self.maps.len()
    }

    pub fn vm(&self, id: usize) -> &Vm {
        &self.vms[id]
    }

    pub fn vm_mut(&mut self, id: usize) -> &mut Vm {
        &mut self.vms[id]
    }

    pub fn file(&self, id: usize) -> &Gmem {
        &self.files[id]
    }

    pub fn mapping(&self, id: usize) -> &Mapping {
        &self.maps[id]
    }

    /// Heap bytes held by the model's per-page structures (for footprint benchmarks).
    pub fn heap_bytes(&self) -> usize {
        let mut b = self.content.heap_bytes() + self.stale.len() * 16 + self.alloc.heap_bytes();
        for f in &self.files {
            b += f.pages.heap_bytes() + f.content.heap_bytes() + f.folios.len() * 48;
        }
        for m in &self.maps {
            if let MapKind::Anon { pages, .. } = &m.kind {
                b += pages.heap_bytes();
            }
        }
        b
    }

    // ---------------------------------------------------------------- VMs

    pub fn create_vm(&mut self, vm_type: VmType, strategy: StrategyKind) -> usize {
        let id = self.vms.len();
        let fd = self.new_fd(Fd::Vm(id));
        self.vms.push(Vm::new(fd, vm_type, strategy));
        id
    }

    /// guest_memfd creation flags this VM accepts (`KVM_CAP_GUEST_MEMFD_FLAGS`).
    ///
    /// Mainline always offers MMAP; INIT_SHARED only where
    /// `kvm_arch_supports_gmem_init_shared()` — on x86 never for a VM with private memory.
    /// The in-place series enables INIT_SHARED for CoCo VMs, so `inplace` VMs offer it.
    pub fn supported_gmem_flags(&self, vm: usize) -> u64 {
        let mut f = uapi::GUEST_MEMFD_FLAG_MMAP;
        if self.vms[vm].strategy == StrategyKind::Inplace {
            f |= uapi::GUEST_MEMFD_FLAG_INIT_SHARED;
        }
        f
    }

    /// Attributes `KVM_SET_MEMORY_ATTRIBUTES` accepts (`KVM_CAP_MEMORY_ATTRIBUTES`): PRIVATE
    /// on a VM with private memory, none in in-place mode, where the series deprecates
    /// VM-scoped PRIVATE tracking (v13).
    pub fn supported_memory_attributes(&self, vm: usize) -> u64 {
        if self.vms[vm].strategy == StrategyKind::Inplace {
            0
        } else {
            uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
        }
    }

    /// `KVM_CHECK_EXTENSION` on the VM fd.
    pub fn check_extension(&self, vm: usize, cap: u64) -> u64 {
        let v = &self.vms[vm];
        match cap {
            // Memory-fault exits fill `kvm_run.memory_fault` (x86 and arm64 report 1).
            uapi::KVM_CAP_USER_MEMORY2
            | uapi::KVM_CAP_GUEST_MEMFD
            | uapi::KVM_CAP_MEMORY_FAULT_INFO => 1,
            uapi::KVM_CAP_MEMORY_ATTRIBUTES => self.supported_memory_attributes(vm),
            // In-place series v13: PRIVATE on a VM with private memory in in-place mode.
            uapi::KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES => {
                u64::from(v.strategy == StrategyKind::Inplace) * uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
            }
            uapi::KVM_CAP_GUEST_MEMFD_FLAGS => self.supported_gmem_flags(vm),
            uapi::KVM_CAP_NR_MEMSLOTS => u64::from(uapi::KVM_USER_MEM_SLOTS),
            uapi::KVM_CAP_READONLY_MEM => u64::from(v.vm_type.has_readonly_mem()),
            _ => 0,
        }
    }

    // ---------------------------------------------------------------- accounting

    #[inline]
    pub(crate) fn charge(&mut self, vm: usize, ns: u64) {
        let s = &mut self.vms[vm].stats;
        s.modelled_ns = s.modelled_ns.saturating_add(ns);
    }

    /// The content at `loc`.
    #[allow(clippy::inline_always)] // on every read; left to the inliner it stays a call
    #[inline(always)]
    pub(crate) fn content_at(&self, loc: Loc) -> u64 {
        match loc {
            Loc::Frame(p) => self.content.get(u64::from(p)),
            Loc::File(f, off) => self.files[f].content.get(off),
        }
    }

    /// Store `v` at `loc`.
    #[inline]
    pub(crate) fn set_content_at(&mut self, loc: Loc, v: u64) {
        match loc {
            Loc::Frame(p) => self.content.set(u64::from(p), v),
            Loc::File(f, off) => self.files[f].content.set(off, v),
        };
    }

    /// Whether a freed frame's data can reach its next user: only when some VM skips
    /// zeroing.
    fn frames_may_leak(&self) -> bool {
        self.vms.iter().any(|v| v.opts.zero == ZeroPolicy::Never)
    }

    /// Frames `pfn..pfn + n` enter `file`'s page cache at `off..off + n`: their content
    /// (left by a previous owner, if any) moves with them.
    fn admit_content(&mut self, file: usize, off: u64, pfn: u32, n: u64) {
        let c = &mut self.files[file].content;
        move_content(&mut self.content, u64::from(pfn), c, off, n);
    }

    /// Pages `off..off + n` of `file` (frames `pfn..pfn + n`) leave its page cache: their
    /// content goes back to the frames.
    pub(crate) fn evict_content(&mut self, file: usize, off: u64, pfn: u32, n: u64) {
        if !self.frames_may_leak() {
            // Unobservable from here on (see `give_frames`): dropped in O(chunks).
            self.files[file].content.clear_range(off, off + n);
            return;
        }
        let c = &mut self.files[file].content;
        move_content(c, off, &mut self.content, u64::from(pfn), n);
    }

    /// Allocate a block of `2^order` frames for `vm` (None: a mapping no VM owns yet).
    pub(crate) fn take_frames(&mut self, vm: Option<usize>, order: u32) -> Result<u32> {
        let pfn = self.alloc.alloc(order)?;
        if let Some(v) = vm {
            let cost = self.costs.alloc(order);
            let s = &mut self.vms[v].stats;
            let n = 1u64 << order;
            s.allocations += n;
            s.pages_allocated += n;
            s.peak_pages_allocated = s.peak_pages_allocated.max(s.pages_allocated);
            s.modelled_ns += cost;
        }
        Ok(pfn)
    }

    /// Return a block of frames. Under `ZeroPolicy::OnFree` they are cleared first; otherwise
    /// their content stays in RAM, as on real hardware, until someone clears it.
    pub(crate) fn give_frames(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        if let Some(v) = vm {
            if self.vms[v].opts.zero == ZeroPolicy::OnFree {
                self.zero_frames(Some(v), pfn, order);
            }
            let cost = self.costs.free(order);
            let s = &mut self.vms[v].stats;
            let n = 1u64 << order;
            s.frees += n;
            s.pages_allocated -= n;
            s.modelled_ns += cost;
        }
        let (a, b) = (u64::from(pfn), u64::from(pfn) + (1u64 << order));
        if self.frames_may_leak() {
            // Someone may hand these frames out unzeroed: remember whose data they hold.
            let tag = vm.map_or(HOST_WRITER, |v| v as u16 + 1);
            for (p, _) in self.content.entries(a, b) {
                self.stale.insert(p as u32, tag);
            }
        } else {
            // Every later user clears the frames before reading them (guest_memfd zeroes on
            // first use, anonymous memory is zero-filled): the leftover data is unobservable,
            // so the model stops carrying it.
            self.content.clear_range(a, b);
        }
        if let Some(owner) = self.rmp_release(pfn, order) {
            // kvm_arch_gmem_invalidate: the frames go back to the hypervisor state.
            self.vms[owner].stats.rmpupdates += 1;
            let c = self.costs.rmpupdate;
            self.charge(owner, c);
        }
        self.alloc.free(pfn, order);
    }

    /// Clear the pages `off..off + 2^order` of `file`'s page cache (frames from `pfn`),
    /// counted as zeroing.
    pub(crate) fn zero_file_pages(
        &mut self,
        vm: Option<usize>,
        file: usize,
        off: u64,
        pfn: u32,
        order: u32,
    ) {
        self.files[file]
            .content
            .clear_range(off, off + (1u64 << order));
        self.count_zeroed(vm, pfn, order);
    }

    /// Clear a block of frames in no page cache, counted as zeroing.
    pub(crate) fn zero_frames(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        let (a, b) = (u64::from(pfn), u64::from(pfn) + (1u64 << order));
        self.content.clear_range(a, b);
        self.count_zeroed(vm, pfn, order);
    }

    /// A block of frames was just cleared: nobody's data is left in it; count the zeroing.
    fn count_zeroed(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        let (a, b) = (u64::from(pfn), u64::from(pfn) + (1u64 << order));
        if !self.stale.is_empty() {
            if b - a <= self.stale.len() as u64 {
                for p in a..b {
                    self.stale.remove(&(p as u32));
                }
            } else {
                self.stale
                    .retain(|&p, _| u64::from(p) < a || u64::from(p) >= b);
            }
        }
        if let Some(v) = vm {
            let cost = self.costs.zero(order);
            let s = &mut self.vms[v].stats;
            s.zeroed_pages += 1u64 << order;
            s.modelled_ns += cost;
        }
    }

    /// Drop RMP assignments of a block being freed; the VM that owned them, if any.
    fn rmp_release(&mut self, pfn: u32, order: u32) -> Option<usize> {
        if self.rmp.is_empty() {
            return None;
        }
        let mut owner = None;
        for p in pfn..pfn + (1u32 << order) {
            if let Some((v, _)) = self.rmp.remove(&p) {
                owner = Some(v);
            }
        }
        owner
    }

    // ---------------------------------------------------------------- guest_memfd

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
        let strategy = self.vms[vm].strategy;
        let attrs = strategy.file_attrs().then(|| {
            let init_shared = flags & uapi::GUEST_MEMFD_FLAG_INIT_SHARED != 0;
            // In-place series: a file starts private unless INIT_SHARED. attr_hook keeps
            // mainline's VM semantics, where every gfn starts shared.
            BitAttrMap::new(if init_shared || strategy != StrategyKind::Inplace {
                0
            } else {
                uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
            })
        });
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
        let pfn = self.take_frames(Some(vm), order)?;
        let f = &mut self.files[file];
        let n = 1u64 << order;
        let head = off & !(n - 1);
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
        self.zap_file_range(file, start, end);
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
                self.vms[vm].stats.splits += 1;
                let c = self.costs.split;
                self.charge(vm, c);
            }
        }
        for (off, pfn) in self.files[file].small_pages_in(start, end) {
            self.files[file].pages.set(off, 0);
            self.files[file].nr_pages -= 1;
            self.release_or_orphan(file, off, 1, pfn, vm);
        }
    }

    /// Free `n` pages from file page `off` (frame `pfn`), keeping pinned ones as orphans.
    fn release_or_orphan(&mut self, file: usize, off: u64, n: u64, pfn: u32, vm: usize) {
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

    /// Zap the stage-2 entries of every gfn bound to `[start, end)` of `file`.
    pub(crate) fn zap_file_range(&mut self, file: usize, start: u64, end: u64) {
        let binds: Vec<(u64, FileBinding)> = self.files[file]
            .bindings
            .iter()
            .filter(|(s, b)| **s < end && b.end > start)
            .map(|(s, b)| (*s, *b))
            .collect();
        for (bs, b) in binds {
            let slot = &self.vms[b.vm].slots[&b.slot];
            let pgoff = if b.shared_side {
                slot.shared.expect("bound").pgoff
            } else {
                slot.gmem.expect("bound").pgoff
            };
            debug_assert_eq!(pgoff, bs);
            let g0 = slot.base_gfn + (start.max(bs) - pgoff);
            let g1 = slot.base_gfn + (end.min(b.end) - pgoff);
            // A private-side file of a mainline `dual` slot only backs private mappings.
            let filter = match (self.vms[b.vm].strategy.shared_side(), b.shared_side) {
                (SharedSide::Userspace, _) if !self.slot_gmem_only(b.vm, b.slot) => Some(true),
                (SharedSide::SecondRange, false) => Some(true),
                (SharedSide::SecondRange, true) => Some(false),
                _ => None,
            };
            self.zap(b.vm, g0, g1, filter);
        }
    }

    /// Zap stage-2 `[g0, g1)` of `vm`, counting one zap and one TLB flush if anything went.
    pub(crate) fn zap(&mut self, vm: usize, g0: u64, g1: u64, filter: Option<bool>) -> u64 {
        let v = &mut self.vms[vm];
        let z = v.s2.zap(g0, g1, filter);
        if z.leaves == 0 {
            return 0;
        }
        v.refresh_stage2_counts();
        v.stats.stage2_zaps += 1;
        v.stats.tlb_flushes += 1;
        let c = &self.costs;
        let ns = c.stage2_zap + c.stage2_zap_entry * z.leaves + c.tlb_flush;
        v.stats.modelled_ns += ns;
        if filter != Some(false) && v.vm_type == VmType::Tdx {
            // Private S-EPT leaves leave through TDH.MEM.PAGE.REMOVE (upper bound: the
            // zap may also have taken shared leaves when unfiltered).
            v.stats.tdx_page_removes += z.leaves;
            v.stats.modelled_ns += self.costs.tdx_page_remove * z.leaves;
        }
        z.leaves
    }

    /// Remove every host page-table mapping of `[start, end)` of `file`.
    pub(crate) fn unmap_file_range(&mut self, file: usize, start: u64, end: u64) -> u64 {
        let mut total = 0;
        let vm = self.files[file].vm;
        for i in 0..self.files[file].mappings.len() {
            let mid = self.files[file].mappings[i];
            if let MapKind::Gmem { pgoff, present, .. } = &mut self.maps[mid].kind {
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
            let s = &mut self.vms[vm].stats;
            s.host_unmaps += total;
            s.modelled_ns += c;
        }
        total
    }

    /// Remove the host mappings of the pages of `[start, end)` of `file` that the host may
    /// no longer fault (`host_may_access`).
    fn unmap_unreachable(&mut self, file: usize, start: u64, end: u64) {
        let mut gone = Vec::new();
        for &mid in &self.files[file].mappings {
            if let MapKind::Gmem { pgoff, present, .. } = &self.maps[mid].kind {
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

    fn file_open(&self, file: usize) -> Result<()> {
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

    fn add_mapping(&mut self, pages: u64, kind: MapKind) -> usize {
        let id = self.maps.len();
        let addr = self.next_va;
        self.next_va = (addr + (pages << PAGE_SHIFT) + PAGE_SIZE).div_ceil(VA_ALIGN) * VA_ALIGN;
        if let MapKind::Gmem { file, .. } = &kind {
            self.files[*file].mappings.push(id);
            self.gmem_mmaps += 1;
        }
        self.maps.push(Mapping {
            addr,
            pages,
            kind,
            unmapped: false,
        });
        self.va.insert(addr, id);
        id
    }

    /// Anonymous `MAP_SHARED` memory of the VMM.
    pub fn mmap_anonymous(&mut self, length: u64) -> Result<usize> {
        let length = mmap_length(length)?;
        Ok(self.add_mapping(
            length >> PAGE_SHIFT,
            MapKind::Anon {
                pages: SparseVec::new(),
                pins: FxHashMap::default(),
                orphans: FxHashMap::default(),
            },
        ))
    }

    /// The live mapping containing `addr` and the page index in it.
    pub(crate) fn mapping_at(&self, addr: u64) -> Option<(usize, u64)> {
        let (_, &id) = self.va.range(..=addr).next_back()?;
        let m = &self.maps[id];
        (addr < m.end()).then(|| (id, (addr - m.addr) >> PAGE_SHIFT))
    }

    // ---------------------------------------------------------------- memslots

    /// Resolve an fd argument to a guest_memfd of `vm` (mainline `kvm_gmem_bind` checks).
    fn resolve_gmem(&self, vm: usize, arg: GmemArg) -> Result<usize> {
        let fd = match arg {
            GmemArg::None => return Err(err(errno::EBADF, "no guest_memfd given")),
            GmemArg::Foreign => {
                return Err(einval("the guest_memfd belongs to another host's VM"));
            }
            GmemArg::Fd(fd) => fd,
        };
        // fds 0-2 are the VMM's standard streams: open, but not guest_memfds (the
        // kernel's `fget()` succeeds, `kvm_gmem_bind()` then fails with EINVAL).
        if (0..3).contains(&fd) {
            return Err(einval(format!("fd {fd} is not a guest_memfd")));
        }
        let Some(kind) = i32::try_from(fd).ok().and_then(|f| self.fds.get(&f)) else {
            return Err(err(errno::EBADF, format!("fd {fd} is not open")));
        };
        match *kind {
            Fd::Gmem(f) if self.files[f].vm == vm => Ok(f),
            Fd::Gmem(_) => Err(einval(format!("fd {fd} is a guest_memfd of another VM"))),
            _ => Err(einval(format!("fd {fd} is not a guest_memfd"))),
        }
    }

    /// Whether a memslot's guest faults, shared ones too, are served from guest_memfd
    /// (internal `KVM_MEMSLOT_GMEM_ONLY`: the bound file supports mmap).
    pub(crate) fn slot_gmem_only(&self, vm: usize, slot: u32) -> bool {
        self.vms[vm].slots[&slot]
            .gmem
            .is_some_and(|b| self.files[b.file].flags & uapi::GUEST_MEMFD_FLAG_MMAP != 0)
    }

    /// `KVM_SET_USER_MEMORY_REGION2`, checks in the order of mainline
    /// `kvm_set_memory_region()` and `kvm_gmem_bind()`.
    pub fn set_user_memory_region2(&mut self, vm: usize, r: MemRegion) -> Result<()> {
        let valid =
            uapi::KVM_MEM_LOG_DIRTY_PAGES | uapi::KVM_MEM_READONLY | uapi::KVM_MEM_GUEST_MEMFD;
        let gm = r.flags & uapi::KVM_MEM_GUEST_MEMFD != 0;
        if r.flags & !valid != 0 {
            return Err(einval(format!("memslot flags {:#x} unknown", r.flags)));
        }
        if gm && r.flags & (uapi::KVM_MEM_LOG_DIRTY_PAGES | uapi::KVM_MEM_READONLY) != 0 {
            return Err(einval(
                "KVM_MEM_GUEST_MEMFD cannot be combined with dirty logging or read-only",
            ));
        }
        if r.flags & uapi::KVM_MEM_READONLY != 0 && !self.vms[vm].vm_type.has_readonly_mem() {
            return Err(einval(format!(
                "{} VMs have no read-only memslots",
                self.vms[vm].vm_type.name()
            )));
        }
        if !r.memory_size.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "memory_size {:#x} not page aligned",
                r.memory_size
            )));
        }
        if !r.guest_phys_addr.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "guest_phys_addr {:#x} not page aligned",
                r.guest_phys_addr
            )));
        }
        if !r.userspace_addr.is_multiple_of(PAGE_SIZE)
            || r.userspace_addr
                .checked_add(r.memory_size)
                .is_none_or(|e| e > uapi::TASK_SIZE)
        {
            return Err(einval(format!(
                "userspace_addr {:#x} not page aligned or not user memory",
                r.userspace_addr
            )));
        }
        if gm
            && (!r.guest_memfd_offset.is_multiple_of(PAGE_SIZE)
                || r.guest_memfd_offset.checked_add(r.memory_size).is_none())
        {
            return Err(einval(format!(
                "guest_memfd_offset {:#x} not page aligned or overflows",
                r.guest_memfd_offset
            )));
        }
        let (as_id, id) = (r.slot >> 16, r.slot & 0xffff);
        if as_id != 0 || id >= uapi::KVM_USER_MEM_SLOTS {
            return Err(einval(format!("slot {:#x} out of range", r.slot)));
        }
        if r.guest_phys_addr.checked_add(r.memory_size).is_none() {
            return Err(einval("guest physical range wraps"));
        }
        let npages = r.memory_size >> PAGE_SHIFT;
        if npages > uapi::KVM_MEM_MAX_NR_PAGES {
            return Err(einval(format!(
                "memory_size {:#x} too large",
                r.memory_size
            )));
        }
        let base_gfn = r.guest_phys_addr >> PAGE_SHIFT;
        if r.memory_size == 0 {
            if !self.vms[vm].slots.contains_key(&r.slot) {
                return Err(einval(format!("slot {} does not exist", r.slot)));
            }
            self.delete_slot(vm, r.slot);
            return Ok(());
        }
        if let Some(old) = self.vms[vm].slots.get(&r.slot) {
            // Private memslots are immutable: they can only be deleted.
            if gm || old.gmem.is_some() {
                return Err(einval("memslots with guest_memfd can only be deleted"));
            }
            if r.userspace_addr != old.userspace_addr
                || npages != old.npages
                || (r.flags ^ old.flags) & uapi::KVM_MEM_READONLY != 0
            {
                return Err(einval(
                    "a memslot's size, address and READONLY flag cannot change",
                ));
            }
            if base_gfn == old.base_gfn {
                self.vms[vm].slots.get_mut(&r.slot).expect("exists").flags = r.flags;
                return Ok(());
            }
            if self.overlaps(vm, r.slot, base_gfn, npages) {
                return Err(err(errno::EEXIST, "memslot overlaps another memslot"));
            }
            check_max_gfn(self.vms[vm].vm_type, base_gfn, npages)?;
            // MOVE: delete and recreate at the new base.
            let mut moved = old.clone();
            self.delete_slot(vm, r.slot);
            moved.base_gfn = base_gfn;
            moved.flags = r.flags;
            self.insert_slot(vm, moved);
            return Ok(());
        }
        if self.overlaps(vm, r.slot, base_gfn, npages) {
            return Err(err(
                errno::EEXIST,
                format!(
                    "gpa range {:#x}+{:#x} overlaps another memslot",
                    r.guest_phys_addr, r.memory_size
                ),
            ));
        }
        let strategy = self.vms[vm].strategy;
        let mut gmem = None;
        let mut shared = None;
        if gm {
            let f = self.resolve_gmem(vm, r.guest_memfd)?;
            let pgoff = r.guest_memfd_offset >> PAGE_SHIFT;
            self.check_bind(f, pgoff, npages, r.guest_memfd_offset, r.memory_size)?;
            gmem = Some(Binding {
                file: f,
                pgoff,
                live: true,
            });
            let wants_shared = r.shared_offset.is_some() || r.shared_guest_memfd != GmemArg::None;
            if strategy == StrategyKind::TwoOffsets && wants_shared {
                // Without a shared range the slot's shared side stays at userspace_addr.
                let soff = r.shared_offset.unwrap_or(0);
                let sf = match r.shared_guest_memfd {
                    GmemArg::None => f,
                    a => self.resolve_gmem(vm, a)?,
                };
                if !soff.is_multiple_of(PAGE_SIZE) || soff.checked_add(r.memory_size).is_none() {
                    return Err(einval(format!(
                        "shared_offset {soff:#x} not page aligned or overflows"
                    )));
                }
                let spg = soff >> PAGE_SHIFT;
                self.check_bind(sf, spg, npages, soff, r.memory_size)?;
                if sf == f && spg < pgoff + npages && pgoff < spg + npages {
                    // The same offsets bound twice: EEXIST, as any range already bound.
                    return Err(err(
                        errno::EEXIST,
                        "shared range overlaps the private range",
                    ));
                }
                shared = Some(Binding {
                    file: sf,
                    pgoff: spg,
                    live: true,
                });
            } else if wants_shared {
                return Err(einval(
                    "shared_guest_memfd/shared_offset are only for two_offsets",
                ));
            }
        } else if r.shared_offset.is_some() || r.shared_guest_memfd != GmemArg::None {
            return Err(einval(
                "shared_guest_memfd/shared_offset need KVM_MEM_GUEST_MEMFD",
            ));
        }
        // x86 `kvm_arch_prepare_memory_region()`, after the bind (which it undoes).
        check_max_gfn(self.vms[vm].vm_type, base_gfn, npages)?;
        let slot = Memslot {
            id: r.slot,
            base_gfn,
            npages,
            flags: r.flags,
            userspace_addr: r.userspace_addr,
            gmem,
            shared,
        };
        self.insert_slot(vm, slot);
        Ok(())
    }

    fn check_bind(&self, f: usize, pgoff: u64, npages: u64, off: u64, size: u64) -> Result<()> {
        let file = &self.files[f];
        // Offsets are unsigned since 7.2 (the `offset < 0` check is gone); the caller has
        // checked that offset + size does not wrap.
        if pgoff + npages > file.size_pages {
            return Err(einval(format!(
                "guest_memfd range {off:#x}+{size:#x} beyond file size {:#x}",
                file.size_pages << PAGE_SHIFT
            )));
        }
        if file.range_bound(pgoff, pgoff + npages) {
            // kvm_gmem_bind() since 7.2: EEXIST when xa_find() finds a binding (EINVAL up
            // to 7.1).
            return Err(err(
                errno::EEXIST,
                format!("guest_memfd range {off:#x}+{size:#x} is already bound"),
            ));
        }
        Ok(())
    }

    fn overlaps(&self, vm: usize, slot: u32, base: u64, npages: u64) -> bool {
        self.vms[vm]
            .slots_in(base, base + npages)
            .iter()
            .any(|&s| s != slot)
    }

    fn insert_slot(&mut self, vm: usize, slot: Memslot) {
        let (id, base, n) = (slot.id, slot.base_gfn, slot.npages);
        for (b, shared_side) in [(slot.gmem, false), (slot.shared, true)] {
            if let Some(b) = b {
                self.files[b.file].bindings.insert(
                    b.pgoff,
                    FileBinding {
                        end: b.pgoff + n,
                        vm,
                        slot: id,
                        shared_side,
                    },
                );
            }
        }
        let v = &mut self.vms[vm];
        v.by_gfn.insert(base, id);
        v.slots.insert(id, slot);
        // What a new slot changes, found from the slot alone (adding the kernel's 32764
        // memslots one by one stays linear): the footprint only if it points at
        // anonymous pages that exist, the double backing by its own pages, `huge_bound`
        // only towards true.
        let slot = &self.vms[vm].slots[&id];
        let dbl = self.slot_double(vm, slot);
        let huge = self.slot_huge(slot);
        let ro = slot.flags & uapi::KVM_MEM_READONLY != 0;
        let newly = self.cover_slot(vm, id, true);
        let v = &mut self.vms[vm];
        v.stats.pages_allocated += newly;
        v.stats.peak_pages_allocated = v.stats.peak_pages_allocated.max(v.stats.pages_allocated);
        v.stats.double_backed_pages += dbl;
        v.huge_bound |= huge;
        v.readonly_slots += u32::from(ro);
    }

    /// Count memslot `id` of `vm` into (`add`) or out of the VM's cover of host addresses,
    /// if its shared view is userspace memory; returns the anonymous pages (and pinned
    /// orphans) that the change brings into or takes out of the VM's footprint.
    fn cover_slot(&mut self, vm: usize, id: u32, add: bool) -> u64 {
        let slot = &self.vms[vm].slots[&id];
        if !self.slot_shared_in_userspace(vm, slot) {
            return 0;
        }
        let a0 = slot.userspace_addr;
        let a1 = a0 + (slot.npages << PAGE_SHIFT);
        let edges = self.vms[vm].anon_cover.change(a0, a1, add);
        edges
            .into_iter()
            .map(|(s, e)| self.anon_pages_in(s, e))
            .sum()
    }

    /// The VMM's mappings overlapping `[a0, a1)`, with the page indices of the overlap in
    /// each: `(mapping, i0, i1)`. Mappings never overlap and are keyed by start: walks down
    /// from the last one starting below `a1` until one ends at or below `a0`.
    pub(crate) fn maps_in(&self, a0: u64, a1: u64) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        self.va
            .range(..a1)
            .rev()
            .map(|(_, &m)| (m, &self.maps[m]))
            .take_while(move |(_, map)| map.end() > a0)
            .map(move |(m, map)| {
                let i0 = (a0.max(map.addr) - map.addr) >> PAGE_SHIFT;
                let i1 = (a1.min(map.end()) - map.addr) >> PAGE_SHIFT;
                (m, i0, i1)
            })
    }

    /// Anonymous pages (and pinned orphans) of the VMM's mappings in `[a0, a1)`.
    fn anon_pages_in(&self, a0: u64, a1: u64) -> u64 {
        let mut n = 0;
        for (m, i0, i1) in self.maps_in(a0, a1) {
            if let MapKind::Anon { pages, orphans, .. } = &self.maps[m].kind {
                if !pages.is_empty() {
                    n += pages.entries(i0, i1).len() as u64;
                }
                n += orphans
                    .iter()
                    .filter(|&(&i, _)| i >= i0 && i < i1)
                    .map(|(_, l)| l.len() as u64)
                    .sum::<u64>();
            }
        }
        n
    }

    /// Whether `slot` binds a live private side of huge (HugeTLB) folios.
    fn slot_huge(&self, slot: &Memslot) -> bool {
        slot.gmem
            .is_some_and(|b| b.live && self.files[b.file].order > 0)
    }

    /// VMs whose memslots point at anonymous page `idx` of mapping `m` (each VM once): the
    /// page counts into their footprint. Slots of same-page strategies point nowhere that
    /// the guest uses, so they do not count.
    pub(crate) fn anon_vms(&self, m: usize, idx: u64) -> Vec<usize> {
        let hva = self.maps[m].addr + (idx << PAGE_SHIFT);
        (0..self.vms.len())
            .filter(|&v| self.vms[v].anon_cover.at(hva) > 0)
            .collect()
    }

    /// Count an anonymous page allocated (or freed) into every VM it backs; returns the
    /// first such VM (which pays the fault and the zeroing).
    pub(crate) fn anon_pages_account(&mut self, m: usize, idx: u64, alloc: bool) -> Option<usize> {
        let vms = self.anon_vms(m, idx);
        for &v in &vms {
            let (ca, cf) = (self.costs.alloc_4k, self.costs.free_4k);
            let s = &mut self.vms[v].stats;
            if alloc {
                s.allocations += 1;
                s.pages_allocated += 1;
                s.peak_pages_allocated = s.peak_pages_allocated.max(s.pages_allocated);
                s.modelled_ns += ca;
            } else {
                s.frees += 1;
                s.pages_allocated -= 1;
                s.modelled_ns += cf;
            }
        }
        vms.first().copied()
    }

    /// Host pages backing `vm` now: its guest_memfd pages (pinned orphans included) and
    /// the anonymous pages (and pinned orphans) its memslots point at, each once.
    pub(crate) fn count_pages(&self, vm: usize) -> u64 {
        let mut n = 0;
        for f in self.files.iter().filter(|f| f.vm == vm) {
            n += f.nr_pages + f.orphans.values().map(|l| l.len() as u64).sum::<u64>();
        }
        // (mapping, page index, pages): orphans get a tag bit so they never merge with the
        // live page at the same index.
        let mut anon: Vec<(usize, u64, u64)> = Vec::new();
        let v = &self.vms[vm];
        for s in v.slots.values() {
            if !self.slot_shared_in_userspace(vm, s) {
                continue;
            }
            let (a0, a1) = (
                s.userspace_addr,
                s.userspace_addr + (s.npages << PAGE_SHIFT),
            );
            for (m, i0, i1) in self.maps_in(a0, a1) {
                if let MapKind::Anon { pages, orphans, .. } = &self.maps[m].kind {
                    anon.extend(pages.entries(i0, i1).into_iter().map(|(i, _)| (m, i, 1)));
                    for (&i, l) in orphans {
                        if i >= i0 && i < i1 {
                            anon.push((m, i | (1 << 62), l.len() as u64));
                        }
                    }
                }
            }
        }
        anon.sort_unstable();
        anon.dedup();
        n + anon.iter().map(|a| a.2).sum::<u64>()
    }

    fn delete_slot(&mut self, vm: usize, id: u32) {
        // As for `insert_slot`: only what this slot contributed changes.
        let slot = &self.vms[vm].slots[&id];
        let dbl = self.slot_double(vm, slot);
        let huge = self.slot_huge(slot);
        let gone = self.cover_slot(vm, id, false);
        self.vms[vm].stats.pages_allocated -= gone;
        let slot = self.vms[vm].slots.remove(&id).expect("exists");
        self.vms[vm].by_gfn.remove(&slot.base_gfn);
        for b in [slot.gmem, slot.shared].into_iter().flatten() {
            if b.live {
                self.files[b.file].bindings.remove(&b.pgoff);
                // An offset no gfn reaches has no attribute that makes it shared any more
                // (see `host_may_access`): the host loses the mappings it took through one.
                self.unmap_unreachable(b.file, b.pgoff, b.pgoff + slot.npages);
            }
        }
        self.zap(vm, slot.base_gfn, slot.end_gfn(), None);
        self.vms[vm].stats.double_backed_pages -= dbl;
        self.vms[vm].readonly_slots -= u32::from(slot.flags & uapi::KVM_MEM_READONLY != 0);
        if huge {
            self.vms[vm].huge_bound = self.has_huge_binding(vm);
        }
    }

    // ---------------------------------------------------------------- double backing

    /// Whether `slot`'s shared view is the VMM's userspace memory at `userspace_addr`:
    /// always for `dual` (unless the slot is guest_memfd-only), for `two_offsets` slots
    /// bound without a shared range, and for any memslot without guest_memfd.
    pub(crate) fn slot_shared_in_userspace(&self, vm: usize, slot: &Memslot) -> bool {
        match self.vms[vm].strategy.shared_side() {
            SharedSide::Userspace => !self.slot_gmem_only(vm, slot.id),
            SharedSide::SecondRange => slot.shared.is_none(),
            SharedSide::SameFile => slot.gmem.is_none(),
        }
    }

    /// Whether a shared page distinct from the private one is allocated for `gfn`.
    fn shared_page_present(&self, vm: usize, slot: &Memslot, gfn: u64) -> bool {
        if self.slot_shared_in_userspace(vm, slot) {
            return self
                .mapping_at(slot.hva_of(gfn))
                .is_some_and(|(m, idx)| self.maps[m].anon_pfn(idx).is_some());
        }
        self.vms[vm].strategy.shared_side() == SharedSide::SecondRange
            && slot
                .shared_offset_of(gfn)
                .is_some_and(|(f, o, live)| live && self.files[f].page(o).is_some())
    }

    /// After allocating (or before freeing) file pages `[start, end)`, adjust the VMs'
    /// double-backing counts for the gfns bound there.
    pub(crate) fn double_update_file(&mut self, file: usize, start: u64, end: u64, alloc: bool) {
        let binds: Vec<(u64, FileBinding)> = self.files[file]
            .bindings
            .range(..end)
            .filter(|(_, b)| b.end > start)
            .map(|(s, b)| (*s, *b))
            .collect();
        for (bs, b) in binds {
            let vm = b.vm;
            if self.vms[vm].strategy.shared_side() == SharedSide::SameFile {
                continue;
            }
            let slot = self.vms[vm].slots[&b.slot].clone();
            let (o0, o1) = (start.max(bs), end.min(b.end));
            let mut n = 0u64;
            for off in self.present_offsets(file, o0, o1) {
                let gfn = slot.base_gfn + (off - bs);
                let other = if b.shared_side {
                    slot.offset_of(gfn)
                        .is_some_and(|(f, o, live)| live && self.files[f].page(o).is_some())
                } else {
                    self.shared_page_present(vm, &slot, gfn)
                };
                n += u64::from(other);
            }
            let s = &mut self.vms[vm].stats;
            if alloc {
                s.double_backed_pages += n;
            } else {
                s.double_backed_pages -= n;
            }
        }
    }

    /// After allocating (or before freeing) anonymous page `idx` of mapping `m`.
    pub(crate) fn double_update_anon(&mut self, m: usize, idx: u64, alloc: bool) {
        let hva = self.maps[m].addr + (idx << PAGE_SHIFT);
        for vm in 0..self.vms.len() {
            // Only memslots whose shared view is userspace memory count (`anon_cover`).
            if self.vms[vm].anon_cover.at(hva) == 0 {
                continue;
            }
            let hits: Vec<(u32, u64)> = self.vms[vm]
                .slots
                .values()
                .filter(|s| {
                    hva >= s.userspace_addr && hva < s.userspace_addr + (s.npages << PAGE_SHIFT)
                })
                .map(|s| (s.id, s.base_gfn + ((hva - s.userspace_addr) >> PAGE_SHIFT)))
                .collect();
            for (sid, gfn) in hits {
                let slot = &self.vms[vm].slots[&sid];
                if !self.slot_shared_in_userspace(vm, slot) {
                    continue;
                }
                let private = slot
                    .offset_of(gfn)
                    .is_some_and(|(f, o, live)| live && self.files[f].page(o).is_some());
                if private {
                    let s = &mut self.vms[vm].stats;
                    if alloc {
                        s.double_backed_pages += 1;
                    } else {
                        s.double_backed_pages -= 1;
                    }
                }
            }
        }
    }

    /// Recount double backing of a VM from scratch: O(populated private pages).
    /// A memslot of `vm` was made or deleted, or one of its files released: refresh what
    /// depends on the live bindings.
    fn bindings_changed(&mut self, vm: usize) {
        self.recount_double(vm);
        self.vms[vm].huge_bound = self.has_huge_binding(vm);
    }

    /// Whether a live private-side binding of `vm` is a huge-folio (HugeTLB) file.
    pub(crate) fn has_huge_binding(&self, vm: usize) -> bool {
        self.vms[vm].slots.values().any(|s| {
            s.gmem
                .is_some_and(|b| b.live && self.files[b.file].order > 0)
        })
    }

    pub(crate) fn recount_double(&mut self, vm: usize) {
        let n = self.count_double(vm);
        self.vms[vm].stats.double_backed_pages = n;
    }

    pub(crate) fn count_double(&self, vm: usize) -> u64 {
        let v = &self.vms[vm];
        if v.strategy.shared_side() == SharedSide::SameFile {
            return 0;
        }
        v.slots
            .values()
            .map(|slot| self.slot_double(vm, slot))
            .sum()
    }

    /// Pages of `slot` backed twice (its private page and a distinct shared one).
    fn slot_double(&self, vm: usize, slot: &Memslot) -> u64 {
        if self.vms[vm].strategy.shared_side() == SharedSide::SameFile {
            return 0;
        }
        let Some(b) = slot.gmem.filter(|b| b.live) else {
            return 0;
        };
        let offs = self.present_offsets(b.file, b.pgoff, b.pgoff + slot.npages);
        offs.into_iter()
            .map(|off| {
                u64::from(self.shared_page_present(vm, slot, slot.base_gfn + (off - b.pgoff)))
            })
            .sum()
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

    /// Runs in the attribute maps that decide the VM's gfns: the VM map, plus the
    /// per-offset maps of its files for strategies that keep attributes there.
    pub fn attr_intervals(&self, vm: usize) -> u64 {
        let v = &self.vms[vm];
        let mut n = v.attrs.intervals() as u64;
        if v.strategy.file_attrs() {
            for f in self.files.iter().filter(|f| f.vm == vm && !f.released) {
                n += f.attrs.as_ref().map_or(0, |a| a.intervals() as u64);
            }
        }
        n
    }

    /// Snapshot of a VM's counters with the stage-2 counts refreshed.
    pub fn stats(&self, vm: usize) -> Stats {
        self.vms[vm].stats
    }
}

/// A memslot created or moved must end at or below the largest gfn the MMU maps
/// (`kvm_mmu_max_gfn()`, see `uapi::MAX_GPA_BITS`); on TDX its last gfn must not carry the
/// shared-GPA bit either (`kvm_is_gfn_alias()`, see `uapi::TDX_SHARED_GPA_BIT`).
fn check_max_gfn(vm_type: VmType, base_gfn: u64, npages: u64) -> Result<()> {
    let bits = match vm_type {
        VmType::Tdx => uapi::TDX_SHARED_GPA_BIT,
        VmType::SwProtected | VmType::Snp | VmType::Pkvm => uapi::MAX_GPA_BITS,
    };
    let max_gfn = (1u64 << (bits - PAGE_SHIFT)) - 1;
    if base_gfn + npages - 1 > max_gfn {
        let limit = if vm_type == VmType::Tdx {
            format!("TDX's shared-GPA bit {bits}")
        } else {
            format!("the {bits}-bit guest physical space")
        };
        return Err(einval(format!(
            "memslot ends at gpa {:#x}, beyond {limit}",
            (base_gfn + npages) << PAGE_SHIFT
        )));
    }
    Ok(())
}

/// An `mmap(2)` length as the kernel takes it: 0 is `EINVAL`; anything else is rounded up
/// to whole pages, and more than the 47-bit user address space is `ENOMEM`.
fn mmap_length(length: u64) -> Result<u64> {
    if length == 0 {
        return Err(einval("mmap length 0"));
    }
    match length.checked_next_multiple_of(PAGE_SIZE) {
        Some(l) if l <= 1 << 47 => Ok(l),
        _ => Err(err(
            errno::ENOMEM,
            format!("mmap length {length:#x} exceeds the user address space"),
        )),
    }
}

/// Move the entries of `src` at `s0..s0 + n` to `dst` at `d0..d0 + n`, leaving `src`
/// empty there (a page's content follows it into or out of a page cache).
fn move_content(
    src: &mut SparseVec<u64, Dense<u64>>,
    s0: u64,
    dst: &mut SparseVec<u64, Dense<u64>>,
    d0: u64,
    n: u64,
) {
    let moved = src.entries(s0, s0 + n);
    if moved.is_empty() {
        return;
    }
    src.clear_range(s0, s0 + n);
    for (k, v) in moved {
        dst.set(d0 + (k - s0), v);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A VM with one 4 MiB memslot bound to a guest_memfd, its first MiB private, and
    /// page 1 written by the guest (7).
    pub(crate) fn sample(zero: ZeroPolicy) -> (Host, usize, usize) {
        let mut h = Host::new(64 << 20).unwrap();
        let vm = h.create_vm(VmType::Snp, StrategyKind::Dual);
        h.vms[vm].opts.zero = zero;
        let f = h.create_guest_memfd(vm, 4 << 20, 0, 0).unwrap();
        let m = h.mmap_anonymous(4 << 20).unwrap();
        let fd = i64::from(h.file(f).fd.unwrap());
        let addr = h.mapping(m).addr;
        h.set_user_memory_region2(
            vm,
            MemRegion {
                slot: 0,
                flags: uapi::KVM_MEM_GUEST_MEMFD,
                guest_phys_addr: 0,
                memory_size: 4 << 20,
                userspace_addr: addr,
                guest_memfd: GmemArg::Fd(fd),
                guest_memfd_offset: 0,
                shared_guest_memfd: GmemArg::None,
                shared_offset: None,
            },
        )
        .unwrap();
        h.set_memory_attributes(vm, 0, 1 << 20, uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)
            .unwrap();
        h.guest_access(vm, 0x1000, true, Some(7)).unwrap();
        (h, vm, f)
    }

    #[test]
    fn content_lives_in_the_file_while_the_frame_is_cached() {
        let (mut h, vm, f) = sample(ZeroPolicy::Never);
        let pfn = h.file(f).page(1).unwrap().pfn;
        assert_eq!(h.files[f].content.get(1), 7);
        assert_eq!(h.content.get(u64::from(pfn)), 0);
        h.check().unwrap();
        // Punched, the frame leaves the page cache with its data (nothing clears it under
        // ZeroPolicy::Never): the data goes back to the frame.
        h.gmem_fallocate(
            f,
            uapi::FALLOC_FL_PUNCH_HOLE | uapi::FALLOC_FL_KEEP_SIZE,
            0x1000,
            0x1000,
        )
        .unwrap();
        assert_eq!(h.files[f].content.get(1), 0);
        assert_eq!(h.content.get(u64::from(pfn)), 7);
        assert_eq!(h.stale.get(&pfn), Some(&(vm as u16 + 1)));
        h.check().unwrap();
        // The next allocation reuses the frame: its data enters the file with it, and the
        // guest, never zeroing, reads it back at another page.
        assert_eq!(h.guest_access(vm, 0x2000, true, None).unwrap(), 7);
        assert_eq!(h.file(f).page(2).unwrap().pfn, pfn);
        assert_eq!(h.files[f].content.get(2), 7);
        assert_eq!(h.content.get(u64::from(pfn)), 0);
        h.check().unwrap();
    }

    #[test]
    fn punched_content_is_dropped_when_every_user_zeroes() {
        let (mut h, vm, f) = sample(ZeroPolicy::OnUse);
        let pfn = h.file(f).page(1).unwrap().pfn;
        h.gmem_fallocate(
            f,
            uapi::FALLOC_FL_PUNCH_HOLE | uapi::FALLOC_FL_KEEP_SIZE,
            0x1000,
            0x1000,
        )
        .unwrap();
        assert_eq!(h.content.get(u64::from(pfn)), 0);
        assert_eq!(h.guest_access(vm, 0x1000, true, None).unwrap(), 0);
        h.check().unwrap();
    }

    #[test]
    fn check_finds_misplaced_content() {
        let (h, _, f) = sample(ZeroPolicy::OnUse);
        let pfn = h.file(f).page(1).unwrap().pfn;
        // The frame's own store holds content while the frame is in the page cache.
        let mut both = h.clone();
        both.content.set(u64::from(pfn), 9);
        assert!(both.check().is_err());
        // Content at a file page the page cache does not hold.
        let mut absent = h.clone();
        absent.files[f].content.set(5, 9);
        assert!(absent.check().is_err());
        // A miscounted guest_memfd mmap.
        let mut counted = h;
        counted.gmem_mmaps = 1;
        assert!(counted.check().is_err());
    }

    /// Private 4 KiB leaves faulted from a guest_memfd in scattered order keep no frame
    /// table: their frames are read from the page cache. A shared leaf in the same 2 MiB
    /// turns the slot into a table holding the same frames. A page that leaves the page
    /// cache under a live leaf (no zap) is caught by `check()`.
    #[test]
    fn stage2_file_slots() {
        let (mut h, vm, f) = sample(ZeroPolicy::OnUse);
        let frame = |h: &Host, g: u64| h.vms[vm].s2.lookup(g, &h.files).map(|l| l.pfn);
        for i in 0..256u64 {
            let g = i * 97 % 256;
            h.guest_access(vm, g << 12, true, Some(g + 1)).unwrap();
        }
        assert_eq!(h.vms[vm].s2.frame_tables(), 0);
        let frames: Vec<Option<u32>> = (0..256).map(|g| frame(&h, g)).collect();
        for (g, p) in frames.iter().enumerate() {
            assert_eq!(*p, h.file(f).page(g as u64).map(|r| r.pfn));
        }
        // Faulted in scattered order: not a run.
        assert!((1..256).any(|g| frames[g] != frames[0].map(|p| p + g as u32)));
        h.check().unwrap();
        // Gfn 300 is shared: ordinary memory, in the same 2 MiB slot.
        h.guest_access(vm, 300 << 12, false, Some(5)).unwrap();
        assert_eq!(h.vms[vm].s2.frame_tables(), 1);
        assert!(!h.vms[vm].s2.lookup(300, &h.files).unwrap().private);
        assert_eq!((0..256).map(|g| frame(&h, g)).collect::<Vec<_>>(), frames);
        assert_eq!(h.guest_access(vm, 37 << 12, true, None).unwrap(), 38);
        h.check().unwrap();
        // A file slot again (the second 2 MiB), whose page 1 leaves the page cache with
        // the leaf still mapped, as no path of the host allows.
        h.set_memory_attributes(vm, 2 << 20, 4096 * 4, uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)
            .unwrap();
        for g in [515u64, 513, 512, 514] {
            h.guest_access(vm, g << 12, true, Some(g)).unwrap();
        }
        assert_eq!(h.vms[vm].s2.frame_tables(), 1);
        h.check().unwrap();
        let mut broken = h.clone();
        broken.files[f].pages.set(513, 0);
        let e = broken.check().unwrap_err().to_string();
        assert!(e.contains("stage-2 maps gfn 0x201"), "{e}");
    }

    /// `apply`'s fast path finds a private page's content through the memslot it last
    /// used: reads alternating between two memslots (two files, the second bound at an
    /// offset) return each page's own value.
    #[test]
    fn batched_private_reads_across_memslots() {
        let (mut h, vm, _) = sample(ZeroPolicy::OnUse);
        let g = h.create_guest_memfd(vm, 8 << 20, 0, 0).unwrap();
        let fd = i64::from(h.file(g).fd.unwrap());
        let m = h.mmap_anonymous(4 << 20).unwrap();
        let addr = h.mapping(m).addr;
        h.set_user_memory_region2(
            vm,
            MemRegion {
                slot: 1,
                flags: uapi::KVM_MEM_GUEST_MEMFD,
                guest_phys_addr: 16 << 20,
                memory_size: 4 << 20,
                userspace_addr: addr,
                guest_memfd: GmemArg::Fd(fd),
                guest_memfd_offset: 2 << 20,
                shared_guest_memfd: GmemArg::None,
                shared_offset: None,
            },
        )
        .unwrap();
        h.set_memory_attributes(vm, 16 << 20, 1 << 20, uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)
            .unwrap();
        // Pages 0..64 of each slot, value = gfn + 100.
        let gfns: Vec<u64> = (0..64u64).flat_map(|i| [i, 4096 + i]).collect();
        let n = gfns.len();
        let vals: Vec<u64> = gfns.iter().map(|g| g + 100).collect();
        let ones = vec![1; n];
        let st = h.apply(vm, &vec![4; n], &gfns, &ones, &vals, None).unwrap();
        assert!(st.iter().all(|&s| s == 0));
        // Written through the file pages the bindings give (slot 1 at offset 512 + i).
        assert_eq!(h.files[g].content.get(512 + 3), 4096 + 3 + 100);
        // Reads through the checked path, which reports each value.
        let read_all = |h: &mut Host| -> Vec<u64> {
            let mut details = Vec::new();
            h.apply(
                vm,
                &vec![2; n],
                &gfns,
                &ones,
                &vec![0; n],
                Some(&mut details),
            )
            .unwrap();
            details.iter().map(|d| d.value).collect()
        };
        assert_eq!(read_all(&mut h), vals);
        // Mapped now: a second round of writes takes the fast path (no details), and
        // the checked path reads what it wrote, page by page.
        let again: Vec<u64> = gfns.iter().map(|g| g * 3 + 1).collect();
        h.apply(vm, &vec![4; n], &gfns, &ones, &again, None)
            .unwrap();
        assert_eq!(read_all(&mut h), again);
        h.check().unwrap();
    }
}
