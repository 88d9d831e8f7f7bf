//! Host frames: the page allocator's blocks handed to VMs and the VMM, where each
//! frame's content lives (the frame store or a guest_memfd page cache), the owner tags of
//! stale data left in freed frames, and the SEV-SNP RMP entries released with a frame.
//!
//! `HostFrames` holds the physical side on its own (allocator, frame store, stale tags,
//! RMP) and keeps its own invariants; the `impl Host` below adds what a VM sees of it:
//! the counters and modelled cost of each allocation, free and clear, and the zeroing
//! policy that decides whether a freed frame's data may reach its next user.
//!
//! A frame that `memory_failure()` poisoned (`PageHWPoison`) stays poisoned for good: it
//! stays in its page cache until punched, and is then retired instead of freed, as the
//! kernel's `free_pages_prepare()` keeps poisoned pages out of the buddy lists.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use crate::alloc::{BuddyAllocator, MAX_ORDER};
use crate::direct_map::DirectMap;
use crate::error::Result;
use crate::host::{HOST_WRITER, Host, Loc};
use crate::numa::{self, Interleave, MAX_NUMNODES, MemPolicy};
use crate::sparse::{Dense, SparseVec};
use crate::vm::ZeroPolicy;

/// The host's physical memory: which frames are free, what each frame in no page cache
/// holds, whose data freed frames still hold, and (SEV-SNP) which VM and gfn each
/// assigned frame belongs to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct HostFrames {
    /// One buddy allocator per NUMA node. Node `k` owns frames `k * node_pages ..
    /// (k + 1) * node_pages`; its allocator spans frames `0..(k + 1) * node_pages` with only
    /// its own free, so its blocks are aligned as physical frames are, and nothing merges
    /// across a node boundary (the buddy below is never free in it), as zones do.
    pub(crate) nodes: Vec<BuddyAllocator>,
    /// Frames per node.
    pub(crate) node_pages: u64,
    /// The allocating task's interleave cursor (`current->il_prev`): the node its last
    /// round-robin interleaved allocation targeted; `MAX_NUMNODES - 1` as
    /// `set_mempolicy()` leaves it, so the first pick is the set's first node.
    pub(crate) il_prev: u32,
    /// The VMM's own policy (`set_mempolicy(2)`, `current->mempolicy`), the one task of
    /// the model: it places pages where no shared policy is set.
    pub(crate) task_policy: Option<MemPolicy>,
    /// Content value per frame (what a read of the page returns), for frames in no
    /// guest_memfd page cache; a frame in one keeps its content in the file
    /// ([`crate::guest_memfd::Gmem::content`]) until it leaves the page cache. Each
    /// frame's content is in exactly one of the two places (`check()` verifies it).
    pub(crate) content: SparseVec<u64, Dense<u64>>,
    /// Frames freed with data still in them: frame -> owner tag of that data (`vm + 1`,
    /// or `HOST_WRITER` for VMM memory). Empty unless zeroing is skipped; a guest that
    /// reads such data of another owner is an isolation violation.
    pub(crate) stale: FxHashMap<u32, u16>,
    /// SEV-SNP reverse map: private frame -> (vm, gfn) it is assigned to.
    pub(crate) rmp: FxHashMap<u32, (usize, u64)>,
    /// The kernel direct map: frames removed from it, blocks split.
    pub(crate) direct_map: DirectMap,
    /// Hardware-poisoned frames (`PageHWPoison`): in a page cache until punched, then
    /// retired — allocated for good, owned by nobody.
    pub(crate) hwpoison: BTreeSet<u32>,
}

/// What an allocation is for: the memory policy of that page decides its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Page `off` of guest_memfd `file`.
    File(usize, u64),
    /// Page `idx` of anonymous mapping `m`.
    Anon(usize, u64),
}

impl HostFrames {
    /// `pages` frames split evenly over `nodes` nodes (`pages` a multiple of `nodes`).
    pub(crate) fn new(pages: u64, nodes: u32) -> Self {
        debug_assert!(nodes >= 1 && pages.is_multiple_of(u64::from(nodes)));
        let per = pages / u64::from(nodes);
        let nodes = if nodes == 1 {
            vec![BuddyAllocator::new(pages)]
        } else {
            (0..u64::from(nodes))
                .map(|k| node_allocator(k * per, (k + 1) * per))
                .collect()
        };
        Self {
            nodes,
            node_pages: per,
            il_prev: MAX_NUMNODES - 1,
            task_policy: None,
            content: SparseVec::new(),
            stale: FxHashMap::default(),
            rmp: FxHashMap::default(),
            direct_map: DirectMap::default(),
            hwpoison: BTreeSet::new(),
        }
    }

    /// Whether any frame of `pfn..pfn + 2^order` is hwpoisoned.
    #[inline]
    pub(crate) fn poisoned_in(&self, pfn: u32, order: u32) -> bool {
        !self.hwpoison.is_empty()
            && self
                .hwpoison
                .range(pfn..pfn.saturating_add(1 << order))
                .next()
                .is_some()
    }

    /// Frames `pfn..pfn + 2^order` freed. `leak`: the owner tag of their data when a later
    /// user may read it unzeroed (the data stays and is tagged); otherwise the data is
    /// unobservable and dropped. Returns the VM whose RMP entries the block held, if any.
    pub(crate) fn free(&mut self, pfn: u32, order: u32, leak: Option<u16>) -> Option<usize> {
        let (a, b) = block(pfn, order);
        if let Some(tag) = leak {
            for (p, _) in self.content.entries(a, b) {
                self.stale.insert(p as u32, tag);
            }
        } else {
            self.content.clear_range(a, b);
        }
        let owner = self.rmp_release(pfn, order);
        self.node_alloc(pfn).free(pfn, order);
        owner
    }

    /// Number of NUMA nodes.
    #[inline]
    pub(crate) fn nr_nodes(&self) -> u32 {
        self.nodes.len() as u32
    }

    /// The node of frame `pfn`.
    #[inline]
    pub(crate) fn node_of(&self, pfn: u32) -> u32 {
        if self.nodes.len() == 1 {
            0
        } else {
            (u64::from(pfn) / self.node_pages) as u32
        }
    }

    /// The allocator of the node holding `pfn`.
    #[inline]
    fn node_alloc(&mut self, pfn: u32) -> &mut BuddyAllocator {
        let n = self.node_of(pfn) as usize;
        &mut self.nodes[n]
    }

    pub(crate) fn total_pages(&self) -> u64 {
        self.node_pages * self.nodes.len() as u64
    }

    pub(crate) fn free_pages(&self) -> u64 {
        self.nodes.iter().map(BuddyAllocator::free_pages).sum()
    }

    /// Whether `pfn` lies inside a free block (of its node).
    pub(crate) fn is_free(&self, pfn: u32) -> bool {
        u64::from(pfn) < self.total_pages() && self.nodes[self.node_of(pfn) as usize].is_free(pfn)
    }

    /// Allocate a block of `2^order` frames, trying `nodes` in order; `ENOMEM` when none
    /// of them has one.
    pub(crate) fn alloc_from(&mut self, nodes: &[u32], order: u32) -> Result<u32> {
        for &n in nodes {
            if let Ok(pfn) = self.nodes[n as usize].alloc(order) {
                return Ok(pfn);
            }
        }
        Err(numa::exhausted(order, nodes))
    }

    /// Frames `pfn..pfn + 2^order` hold zeroes now: no content, nobody's stale data.
    pub(crate) fn clear(&mut self, pfn: u32, order: u32) {
        let (a, b) = block(pfn, order);
        self.content.clear_range(a, b);
        self.forget_stale(pfn, order);
    }

    /// Frames `pfn..pfn + 2^order` no longer hold anyone's stale data (cleared, or written
    /// over by their new owner).
    pub(crate) fn forget_stale(&mut self, pfn: u32, order: u32) {
        if self.stale.is_empty() {
            return;
        }
        let (a, b) = block(pfn, order);
        if b - a <= self.stale.len() as u64 {
            for p in a..b {
                self.stale.remove(&(p as u32));
            }
        } else {
            self.stale
                .retain(|&p, _| u64::from(p) < a || u64::from(p) >= b);
        }
    }

    /// Drop RMP assignments of a block being freed; the VM that owned them, if any.
    pub(crate) fn rmp_release(&mut self, pfn: u32, order: u32) -> Option<usize> {
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

    /// Heap bytes of the per-frame structures.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.content.heap_bytes()
            + self.stale.len() * 16
            + self.direct_map.heap_bytes()
            + self
                .nodes
                .iter()
                .map(BuddyAllocator::heap_bytes)
                .sum::<usize>()
    }

    /// The invariants that need nothing outside the frames: the allocator's own, and
    /// content, stale tags and RMP entries only on frames that exist, RMP entries only on
    /// allocated frames, stale tags only where data is.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if self.nodes.is_empty()
            || self.nodes.len() as u32 > MAX_NUMNODES
            || self.node_pages == 0
            || self.total_pages() > crate::alloc::MAX_PAGES
        {
            return Err(format!(
                "{} NUMA nodes of {} pages",
                self.nodes.len(),
                self.node_pages
            ));
        }
        for (k, a) in self.nodes.iter().enumerate() {
            a.check().map_err(|e| format!("node {k}: {e}"))?;
            let (lo, hi) = (k as u64 * self.node_pages, (k as u64 + 1) * self.node_pages);
            if a.total_pages() != hi {
                return Err(format!(
                    "node {k}'s allocator spans {} frames, not {hi}",
                    a.total_pages()
                ));
            }
            if let Some((o, p)) = a.blocks().find(|&(_, p)| u64::from(p) < lo) {
                return Err(format!(
                    "node {k} holds free block {p:#x} of order {o} below its first frame {lo:#x}"
                ));
            }
        }
        let total = self.total_pages();
        if let Some((p, _)) = self.content.entries(total, u64::MAX).first() {
            return Err(format!(
                "content stored for frame {p:#x} beyond the host's {total} pages"
            ));
        }
        if let Some(p) = self.rmp.keys().find(|&&p| self.is_free(p)) {
            return Err(format!("RMP entry for free frame {p:#x}"));
        }
        if let Some(p) = self.direct_map.removed().find(|&p| self.is_free(p)) {
            return Err(format!("free frame {p:#x} is out of the direct map"));
        }
        if let Some(&p) = self
            .hwpoison
            .iter()
            .find(|&&p| u64::from(p) >= total || self.is_free(p))
        {
            return Err(format!(
                "hwpoisoned frame {p:#x} is free or beyond the host"
            ));
        }
        if let Some(p) = self.stale.keys().find(|&&p| u64::from(p) >= total) {
            return Err(format!(
                "stale tag on frame {p:#x} beyond the host's {total} pages"
            ));
        }
        Ok(())
    }
}

/// The allocator of a node owning frames `[lo, hi)`: an allocator over `0..hi` holding only
/// those free, as the largest aligned blocks that fit.
fn node_allocator(lo: u64, hi: u64) -> BuddyAllocator {
    let mut blocks = Vec::new();
    let mut pfn = lo;
    while pfn < hi {
        let mut order = MAX_ORDER;
        while order > 0 && (!pfn.is_multiple_of(1 << order) || pfn + (1 << order) > hi) {
            order -= 1;
        }
        blocks.push((order, pfn as u32));
        pfn += 1 << order;
    }
    BuddyAllocator::from_blocks(hi, &blocks).expect("aligned disjoint blocks")
}

/// The frame numbers of a block, as `u64` bounds.
fn block(pfn: u32, order: u32) -> (u64, u64) {
    (u64::from(pfn), u64::from(pfn) + (1u64 << order))
}

impl Host {
    /// The content at `loc`.
    #[allow(clippy::inline_always)] // on every read; left to the inliner it stays a call
    #[inline(always)]
    pub(crate) fn content_at(&self, loc: Loc) -> u64 {
        match loc {
            Loc::Frame(p) => self.frames.content.get(u64::from(p)),
            Loc::File(f, off) => self.files[f].content.get(off),
        }
    }

    /// Store `v` at `loc`.
    #[inline]
    pub(crate) fn set_content_at(&mut self, loc: Loc, v: u64) {
        match loc {
            Loc::Frame(p) => self.frames.content.set(u64::from(p), v),
            Loc::File(f, off) => self.files[f].content.set(off, v),
        };
    }

    /// Whether a freed frame's data can reach its next user: only when some VM skips
    /// zeroing.
    pub(crate) fn frames_may_leak(&self) -> bool {
        self.vms.iter().any(|v| v.opts.zero == ZeroPolicy::Never)
    }

    /// Frames `pfn..pfn + n` enter `file`'s page cache at `off..off + n`: their content
    /// (left by a previous owner, if any) moves with them.
    pub(crate) fn admit_content(&mut self, file: usize, off: u64, pfn: u32, n: u64) {
        let c = &mut self.files[file].content;
        move_content(&mut self.frames.content, u64::from(pfn), c, off, n);
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
        move_content(c, off, &mut self.frames.content, u64::from(pfn), n);
    }

    /// Allocate a block of `2^order` frames for `vm` (None: a mapping no VM owns yet).
    /// The memory policy in force at `at` decides the node (on a host of one node there
    /// is nothing to decide, and no policy is looked up).
    #[inline]
    pub(crate) fn take_frames(
        &mut self,
        vm: Option<usize>,
        order: u32,
        at: Placement,
    ) -> Result<u32> {
        let pfn = if self.frames.nodes.len() == 1 {
            self.frames.nodes[0].alloc(order)?
        } else {
            self.alloc_by_policy(order, at)?
        };
        if let Some(v) = vm {
            let cost = self.costs.alloc(order);
            self.vms[v].stats.allocated(1u64 << order, cost);
        }
        Ok(pfn)
    }

    /// A block for `at` on a host of several nodes: the nodes its policy allows, in the
    /// policy's order (see [`numa`]).
    #[cold]
    #[inline(never)]
    fn alloc_by_policy(&mut self, order: u32, at: Placement) -> Result<u32> {
        let (policy, il) = match at {
            // guest_memfd: the inode's shared policy, interleaving in allocation order.
            Placement::File(f, off) => (self.files[f].policy.lookup(off), Interleave::RoundRobin),
            // Anonymous MAP_SHARED memory is shmem: its inode's shared policy, interleaving
            // by page offset.
            Placement::Anon(m, idx) => (
                self.space.maps[m].policy.lookup(idx),
                Interleave::Index(idx),
            ),
        };
        // No shared policy: the task's (kvm_gmem_get_folio_policy(),
        // shmem_get_pgoff_policy(), which keeps its interleave index either way).
        let policy = policy.or(self.frames.task_policy);
        let nr = self.frames.nr_nodes();
        let nodes = numa::candidates(policy, il, &mut self.frames.il_prev, nr);
        self.frames.alloc_from(&nodes, order)
    }

    /// Return a block of frames. Under `ZeroPolicy::OnFree` they are cleared first; otherwise
    /// their content stays in RAM, as on real hardware, until someone clears it. Poisoned
    /// frames of the block are retired instead.
    pub(crate) fn give_frames(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        if self.frames.poisoned_in(pfn, order) {
            self.give_poisoned_block(vm, pfn, order);
            return;
        }
        // kvm_gmem_free_folio(): a NO_DIRECT_MAP folio returns to the direct map.
        self.restore_direct_map(vm, pfn, order);
        if let Some(v) = vm {
            if self.vms[v].opts.zero == ZeroPolicy::OnFree {
                self.zero_frames(Some(v), pfn, order);
            }
            let cost = self.costs.free(order);
            self.vms[v].stats.freed(1u64 << order, cost);
        }
        // Someone may hand these frames out unzeroed: remember whose data they hold.
        // Otherwise every later user clears the frames before reading them (guest_memfd
        // zeroes on first use, anonymous memory is zero-filled): the leftover data is
        // unobservable, so the model stops carrying it.
        let leak = self
            .frames_may_leak()
            .then(|| vm.map_or(HOST_WRITER, |v| v as u16 + 1));
        if let Some(owner) = self.frames.free(pfn, order, leak) {
            // kvm_arch_gmem_invalidate: the frames go back to the hypervisor state.
            let c = self.costs.rmpupdate;
            self.vms[owner].stats.rmp_updated(1, c);
        }
    }

    /// A block with hwpoisoned frames leaves its page cache: its healthy frames are freed
    /// one by one, its poisoned ones retired (their data and RMP entry dropped, as
    /// `kvm_gmem_free_folio()` still runs, but never returned to the allocator).
    #[cold]
    fn give_poisoned_block(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        for p in pfn..pfn + (1u32 << order) {
            if !self.frames.hwpoison.contains(&p) {
                self.give_frames(vm, p, 0);
                continue;
            }
            self.frames.clear(p, 0);
            if let Some(owner) = self.frames.rmp_release(p, 0) {
                let c = self.costs.rmpupdate;
                self.vms[owner].stats.rmp_updated(1, c);
            }
            if let Some(v) = vm {
                self.vms[v].stats.retired(1);
            }
        }
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
        self.frames.clear(pfn, order);
        self.count_vm_zeroing(vm, order);
    }

    /// A block of frames was just cleared: nobody's data is left in it; count the zeroing.
    pub(crate) fn count_zeroed(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        self.frames.forget_stale(pfn, order);
        self.count_vm_zeroing(vm, order);
    }

    fn count_vm_zeroing(&mut self, vm: Option<usize>, order: u32) {
        if let Some(v) = vm {
            let cost = self.costs.zero(order);
            self.vms[v].stats.zeroed(1u64 << order, cost);
        }
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
    if n == 1 {
        // One page (a single-page conversion's punch): no list to build.
        let v = src.set(s0, 0);
        if v != 0 {
            dst.set(d0, v);
        }
        return;
    }
    let moved = src.entries(s0, s0 + n);
    if moved.is_empty() {
        return;
    }
    src.clear_range(s0, s0 + n);
    for (k, v) in moved {
        dst.set(d0 + (k - s0), v);
    }
}

/// Property tests of [`HostFrames`] on its own, against a plain model: which blocks are
/// allocated, what each frame holds, whose stale data is where, and the RMP.
#[cfg(test)]
mod prop {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::{HostFrames, block};

    #[derive(Debug, Clone)]
    enum Op {
        /// Allocate a block of this order, trying the nodes from this one on.
        Alloc(u32, u32),
        /// Free the `i`-th live block (mod their number), its data tagged with `leak`.
        Free(usize, Option<u16>),
        /// Write `v` to frame `j` of the `i`-th live block.
        Write(usize, u64, u64),
        Clear(usize),
        /// Assign the `i`-th live block's first frame to VM `vm` in the RMP.
        Assign(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..4, 0u32..4).prop_map(|(o, n)| Op::Alloc(o, n)),
            (any::<usize>(), proptest::option::of(1u16..4)).prop_map(|(i, l)| Op::Free(i, l)),
            (any::<usize>(), any::<u64>(), 1u64..100).prop_map(|(i, j, v)| Op::Write(i, j, v)),
            any::<usize>().prop_map(Op::Clear),
            (any::<usize>(), 0usize..3).prop_map(|(i, vm)| Op::Assign(i, vm)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn frames_follow_the_model(
            nodes in prop_oneof![Just(1u32), Just(2), Just(4)],
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            const PAGES: u64 = 64;
            let mut f = HostFrames::new(PAGES, nodes);
            let per = PAGES / u64::from(nodes);
            // Live blocks: pfn -> order; content and stale tags per frame; RMP per frame.
            let mut live: BTreeMap<u32, u32> = BTreeMap::new();
            let mut content: BTreeMap<u64, u64> = BTreeMap::new();
            let mut stale: BTreeMap<u64, u16> = BTreeMap::new();
            let mut rmp: BTreeMap<u32, usize> = BTreeMap::new();
            let nth = |live: &BTreeMap<u32, u32>, i: usize| {
                live.iter().nth(i % live.len()).map(|(&p, &o)| (p, o))
            };
            for op in ops {
                match op {
                    Op::Alloc(order, first) => {
                        let free = f.free_pages();
                        let first = first % nodes;
                        let order_of: Vec<u32> = (0..nodes).map(|i| (first + i) % nodes).collect();
                        // The node each allocator could serve, before the call.
                        let could: Vec<bool> = order_of.iter()
                            .map(|&n| f.nodes[n as usize].free_blocks()[order as usize..].iter().any(|&b| b > 0))
                            .collect();
                        if let Ok(pfn) = f.alloc_from(&order_of, order) {
                            // Aligned, from the first node that had a block, and
                            // overlapping no live block.
                            prop_assert_eq!(pfn % (1 << order), 0);
                            let node = f.node_of(pfn);
                            prop_assert_eq!(u64::from(pfn) / per, u64::from(node));
                            prop_assert_eq!(Some(node), order_of.iter().zip(&could).find(|c| *c.1).map(|c| *c.0));
                            prop_assert!(live.range(..pfn + (1 << order)).next_back()
                                .is_none_or(|(&p, &o)| p + (1 << o) <= pfn));
                            live.insert(pfn, order);
                        } else {
                            prop_assert!(could.iter().all(|c| !c));
                            prop_assert_eq!(f.free_pages(), free);
                        }
                    }
                    Op::Free(i, leak) if !live.is_empty() => {
                        let (pfn, order) = nth(&live, i).unwrap();
                        live.remove(&pfn);
                        let (a, b) = block(pfn, order);
                        let owner = rmp.range(pfn..pfn + (1 << order)).map(|(_, &v)| v).next_back();
                        prop_assert_eq!(f.free(pfn, order, leak), owner);
                        rmp.retain(|&p, _| u64::from(p) < a || u64::from(p) >= b);
                        match leak {
                            Some(tag) => {
                                for p in a..b {
                                    if content.contains_key(&p) {
                                        stale.insert(p, tag);
                                    }
                                }
                            }
                            None => content.retain(|&p, _| p < a || p >= b),
                        }
                    }
                    Op::Write(i, j, v) if !live.is_empty() => {
                        let (pfn, order) = nth(&live, i).unwrap();
                        let p = u64::from(pfn) + j % (1 << order);
                        f.content.set(p, v);
                        content.insert(p, v);
                    }
                    Op::Clear(i) if !live.is_empty() => {
                        let (pfn, order) = nth(&live, i).unwrap();
                        f.clear(pfn, order);
                        let (a, b) = block(pfn, order);
                        content.retain(|&p, _| p < a || p >= b);
                        stale.retain(|&p, _| p < a || p >= b);
                    }
                    Op::Assign(i, vm) if !live.is_empty() => {
                        let (pfn, _) = nth(&live, i).unwrap();
                        f.rmp.insert(pfn, (vm, 0));
                        rmp.insert(pfn, vm);
                    }
                    _ => {}
                }
                prop_assert_eq!(f.check(), Ok(()));
                let used: u64 = live.values().map(|&o| 1u64 << o).sum();
                prop_assert_eq!(f.free_pages() + used, PAGES);
                for k in 0..nodes {
                    let on: u64 = live.iter().filter(|(p, _)| u64::from(**p) / per == u64::from(k))
                        .map(|(_, &o)| 1u64 << o).sum();
                    prop_assert_eq!(f.nodes[k as usize].free_pages() + on, per);
                }
                prop_assert_eq!(f.content.entries(0, PAGES), content.iter().map(|(&p, &v)| (p, v)).collect::<Vec<_>>());
                let tags: BTreeMap<u64, u16> = f.stale.iter().map(|(&p, &t)| (u64::from(p), t)).collect();
                prop_assert_eq!(&tags, &stale);
                let assigned: BTreeMap<u32, usize> = f.rmp.iter().map(|(&p, &(v, _))| (p, v)).collect();
                prop_assert_eq!(&assigned, &rmp);
            }
        }
    }

    /// `check()` refuses an RMP entry on a free frame and content beyond the host.
    #[test]
    fn check_finds_broken_frames() {
        let mut f = HostFrames::new(16, 1);
        let pfn = f.alloc_from(&[0], 0).unwrap();
        f.rmp.insert(pfn, (0, 0));
        assert_eq!(f.check(), Ok(()));
        let mut freed = f.clone();
        freed.nodes[0].free(pfn, 0);
        assert!(
            freed
                .check()
                .unwrap_err()
                .contains("RMP entry for free frame")
        );
        let mut beyond = f.clone();
        beyond.content.set(16, 1);
        assert!(beyond.check().unwrap_err().contains("beyond the host"));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::host::{GmemArg, MemRegion};
    use crate::platform::VmType;
    use crate::strategy::StrategyKind;
    use crate::uapi;

    /// A VM with one 4 MiB memslot bound to a guest_memfd, its first MiB private, and
    /// page 1 written by the guest (7).
    pub(crate) fn sample(zero: ZeroPolicy) -> (Host, usize, usize) {
        let mut h = Host::new(64 << 20).unwrap();
        let vm = h.create_vm(VmType::Snp, StrategyKind::Dual);
        h.vms[vm].opts.zero = zero;
        let f = h.create_guest_memfd(vm, 4 << 20, 0, 0).unwrap();
        h.bind_at_zero(vm, f, 4 << 20);
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
        assert_eq!(h.frames.content.get(u64::from(pfn)), 0);
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
        assert_eq!(h.frames.content.get(u64::from(pfn)), 7);
        assert_eq!(h.frames.stale.get(&pfn), Some(&(vm as u16 + 1)));
        h.check().unwrap();
        // The next allocation reuses the frame: its data enters the file with it, and the
        // guest, never zeroing, reads it back at another page.
        assert_eq!(h.guest_access(vm, 0x2000, true, None).unwrap(), 7);
        assert_eq!(h.file(f).page(2).unwrap().pfn, pfn);
        assert_eq!(h.files[f].content.get(2), 7);
        assert_eq!(h.frames.content.get(u64::from(pfn)), 0);
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
        assert_eq!(h.frames.content.get(u64::from(pfn)), 0);
        assert_eq!(h.guest_access(vm, 0x1000, true, None).unwrap(), 0);
        h.check().unwrap();
    }

    #[test]
    fn check_finds_misplaced_content() {
        let (h, _, f) = sample(ZeroPolicy::OnUse);
        let pfn = h.file(f).page(1).unwrap().pfn;
        // The frame's own store holds content while the frame is in the page cache.
        let mut both = h.clone();
        both.frames.content.set(u64::from(pfn), 9);
        assert!(both.check().is_err());
        // Content at a file page the page cache does not hold.
        let mut absent = h.clone();
        absent.files[f].content.set(5, 9);
        assert!(absent.check().is_err());
        // A miscounted guest_memfd mmap.
        let mut counted = h;
        counted.space.gmem_mmaps = 1;
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
