//! NUMA memory policy: the modes of `mbind(2)`, the shared policy of a shmem-like inode
//! (a range map over page offsets), and the node choice of each allocation.
//!
//! Follows Linux 6.19, where guest_memfd gained `vm_ops.set_policy/get_policy` and keeps
//! one shared policy per inode (`struct gmem_inode.policy`); the same shape serves the
//! VMM's anonymous `MAP_SHARED` memory, which the kernel backs with a shmem inode
//! (`shmem_zero_setup()`), one per mapping.
//!
//! What an allocation does under each mode (`mm/mempolicy.c`, `alloc_pages_mpol()` and
//! `policy_nodemask()`), with node 0 the local node of every allocating task and each
//! node's fallback order its own id then the next ids, wrapping (uniform distances):
//!
//! - no policy / `MPOL_DEFAULT` / `MPOL_LOCAL`: the local node, falling back to the others;
//! - `MPOL_PREFERRED`: its one node, falling back to the others;
//! - `MPOL_BIND`: the bound nodes only, from the local node's order; all full is `ENOMEM`
//!   even when another node has room;
//! - `MPOL_PREFERRED_MANY`: the preferred nodes first, then any node;
//! - `MPOL_INTERLEAVE` / `MPOL_WEIGHTED_INTERLEAVE`: one target node of the set (falling
//!   back to the others when it is full), chosen by the interleave index when the
//!   allocation has one, else round-robin by the allocating task (see [`Interleave`]).
//!   Every node's weight is 1 (no HMAT data for simulated nodes), so the weighted mode
//!   places pages as the plain one does.

use std::collections::BTreeMap;

use crate::alloc::MAX_ORDER;
use crate::error::{Result, einval, err, errno};
use crate::host::Host;
use crate::mapping::MapKind;
use crate::{PAGE_SHIFT, PAGE_SIZE};

pub const MPOL_DEFAULT: u32 = 0;
pub const MPOL_PREFERRED: u32 = 1;
pub const MPOL_BIND: u32 = 2;
pub const MPOL_INTERLEAVE: u32 = 3;
pub const MPOL_LOCAL: u32 = 4;
pub const MPOL_PREFERRED_MANY: u32 = 5;
pub const MPOL_WEIGHTED_INTERLEAVE: u32 = 6;
/// `MPOL_MAX`: modes at or above it are `EINVAL`.
pub const MPOL_MAX: u32 = 7;

/// `MAX_NUMNODES` of an x86-64 defconfig (`NODES_SHIFT` 6): node sets are one `u64`.
pub const MAX_NUMNODES: u32 = 64;

/// The node every allocating task runs on (`numa_node_id()`).
pub const LOCAL_NODE: u32 = 0;

/// A memory policy as `mpol_new()` leaves it: never `MPOL_DEFAULT` (that is the absence
/// of a policy), `nodes` empty only for `MPOL_LOCAL`, one node for `MPOL_PREFERRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemPolicy {
    pub mode: u32,
    /// Bit `n`: node `n`.
    pub nodes: u64,
}

impl MemPolicy {
    /// The policy `mbind(mode, nodes)` installs on a host of `nr_nodes` nodes (`None`:
    /// `MPOL_DEFAULT`, which removes any policy), with `mpol_new()` and
    /// `mpol_set_nodemask()`'s checks: an unknown mode, a node id at or above
    /// `MAX_NUMNODES`, a node set for `MPOL_DEFAULT` or `MPOL_LOCAL`, or no node of the
    /// host left in the set of a mode that needs one is `EINVAL`. Nodes the host lacks are
    /// dropped (the set is masked with the nodes that have memory); an empty set for
    /// `MPOL_PREFERRED` means `MPOL_LOCAL`; `MPOL_PREFERRED` keeps the first node only.
    pub fn new(mode: u32, nodes: &[u32], nr_nodes: u32) -> Result<Option<Self>> {
        if mode >= MPOL_MAX {
            return Err(einval(format!("unknown memory policy mode {mode}")));
        }
        let mut mask = 0u64;
        for &n in nodes {
            if n >= MAX_NUMNODES {
                return Err(einval(format!(
                    "node {n} is beyond MAX_NUMNODES ({MAX_NUMNODES})"
                )));
            }
            mask |= 1 << n;
        }
        match mode {
            MPOL_DEFAULT if mask != 0 => {
                return Err(einval("MPOL_DEFAULT takes no nodes"));
            }
            MPOL_DEFAULT => return Ok(None),
            MPOL_LOCAL if mask != 0 => return Err(einval("MPOL_LOCAL takes no nodes")),
            MPOL_LOCAL => return Ok(Some(Self { mode, nodes: 0 })),
            MPOL_PREFERRED if mask == 0 => {
                return Ok(Some(Self {
                    mode: MPOL_LOCAL,
                    nodes: 0,
                }));
            }
            _ if mask == 0 => {
                return Err(einval(format!("memory policy mode {mode} needs a node")));
            }
            _ => {}
        }
        let present = node_mask(nr_nodes);
        let mask = mask & present;
        if mask == 0 {
            return Err(einval(format!(
                "no node of the set is on the host (nodes 0..{nr_nodes})"
            )));
        }
        let nodes = if mode == MPOL_PREFERRED {
            mask & mask.wrapping_neg()
        } else {
            mask
        };
        Ok(Some(Self { mode, nodes }))
    }

    /// The node ids of the set, ascending.
    pub fn node_list(&self) -> Vec<u32> {
        nodes_of(self.nodes)
    }
}

/// The set of nodes `0..n`.
pub fn node_mask(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// The node ids of a set, ascending.
pub fn nodes_of(mask: u64) -> Vec<u32> {
    (0..64).filter(|n| mask & (1 << n) != 0).collect()
}

/// `(mode, nodes)` as `get_mempolicy(MPOL_F_ADDR)` reports a policy (`None`: no policy,
/// `MPOL_DEFAULT` and no nodes).
pub fn report(p: Option<MemPolicy>) -> (u32, Vec<u32>) {
    p.map_or((MPOL_DEFAULT, Vec::new()), |p| (p.mode, p.node_list()))
}

/// A shared policy (`struct shared_policy`): disjoint page ranges of one inode, each with
/// its policy. `mpol_set_shared_policy()` replaces whatever the new range overlaps,
/// splitting ranges that straddle its ends; `MPOL_DEFAULT` only removes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedPolicy {
    /// start -> (end, policy).
    ranges: BTreeMap<u64, (u64, MemPolicy)>,
}

impl SharedPolicy {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Set `[start, end)` to `p` (`None`: no policy).
    pub fn set(&mut self, start: u64, end: u64, p: Option<MemPolicy>) {
        if start >= end {
            return;
        }
        // A range starting before `start` that reaches into it keeps its head (and its
        // tail if it also reaches past `end`).
        if let Some((&s, &(e, q))) = self.ranges.range(..start).next_back()
            && e > start
        {
            self.ranges.insert(s, (start, q));
            if e > end {
                self.ranges.insert(end, (e, q));
            }
        }
        let inside: Vec<u64> = self.ranges.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let (e, q) = self.ranges.remove(&s).expect("listed");
            if e > end {
                self.ranges.insert(end, (e, q));
            }
        }
        if let Some(p) = p {
            self.ranges.insert(start, (end, p));
        }
    }

    /// The policy of page `off` (`mpol_shared_policy_lookup()`).
    #[inline]
    pub fn lookup(&self, off: u64) -> Option<MemPolicy> {
        let (_, &(e, p)) = self.ranges.range(..=off).next_back()?;
        (off < e).then_some(p)
    }

    /// The ranges, ascending: `(start, end, policy)`.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, MemPolicy)> + '_ {
        self.ranges.iter().map(|(&s, &(e, p))| (s, e, p))
    }

    /// Ranges non-empty, disjoint, ascending; policies well formed for `nr_nodes` nodes.
    pub fn check(&self, nr_nodes: u32) -> std::result::Result<(), String> {
        let mut prev = 0u64;
        for (s, e, p) in self.ranges() {
            if s >= e || s < prev {
                return Err(format!(
                    "shared policy range {s:#x}..{e:#x} empty or overlapping"
                ));
            }
            prev = e;
            p.check(nr_nodes)
                .map_err(|e| format!("shared policy at {s:#x}: {e}"))?;
        }
        Ok(())
    }
}

impl MemPolicy {
    /// Well formed as `mpol_new()` leaves a policy, on a host of `nr_nodes` nodes.
    pub fn check(&self, nr_nodes: u32) -> std::result::Result<(), String> {
        let ok = match self.mode {
            MPOL_LOCAL => self.nodes == 0,
            MPOL_PREFERRED => self.nodes.is_power_of_two(),
            MPOL_BIND | MPOL_INTERLEAVE | MPOL_PREFERRED_MANY | MPOL_WEIGHTED_INTERLEAVE => {
                self.nodes != 0
            }
            _ => false,
        };
        if !ok || self.nodes & !node_mask(nr_nodes) != 0 {
            return Err(format!(
                "mode {} with nodes {:#x} on a host of {nr_nodes} nodes",
                self.mode, self.nodes
            ));
        }
        Ok(())
    }
}

/// How an interleaving allocation picks its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interleave {
    /// By an interleave index (`interleave_nid()`): shmem passes the inode number plus
    /// the page offset (`shmem_get_pgoff_policy()`); the model's bias is 0, so the node
    /// is the `(offset % n)`-th of the set.
    Index(u64),
    /// `NO_INTERLEAVE_INDEX` (`interleave_nodes()`): the task's next node after the one it
    /// last used (`current->il_prev`). guest_memfd allocates this way in 6.19:
    /// `kvm_gmem_get_folio()` → `__filemap_get_folio_mpol()` → `filemap_alloc_folio()`
    /// passes `NO_INTERLEAVE_INDEX`, so interleaved pages follow allocation order, not
    /// file offset.
    RoundRobin,
}

/// The nodes to try for one allocation under policy `p` on a host of `nr` nodes, in
/// order. `il_prev` is the task's interleave cursor (`current->il_prev`), advanced here by
/// a round-robin pick whether or not the target node then has room.
pub fn candidates(p: Option<MemPolicy>, il: Interleave, il_prev: &mut u32, nr: u32) -> Vec<u32> {
    let from = |start: u32| (0..nr).map(move |i| (start + i) % nr);
    let Some(p) = p else {
        return from(LOCAL_NODE).collect();
    };
    match p.mode {
        MPOL_PREFERRED => from(p.nodes.trailing_zeros()).collect(),
        MPOL_BIND => from(LOCAL_NODE)
            .filter(|n| p.nodes & (1 << n) != 0)
            .collect(),
        MPOL_PREFERRED_MANY => {
            let (mut first, rest): (Vec<u32>, Vec<u32>) =
                from(LOCAL_NODE).partition(|n| p.nodes & (1 << n) != 0);
            first.extend(rest);
            first
        }
        MPOL_INTERLEAVE | MPOL_WEIGHTED_INTERLEAVE => {
            let target = match il {
                Interleave::Index(i) => {
                    let set = p.node_list();
                    set[(i % set.len() as u64) as usize]
                }
                Interleave::RoundRobin => {
                    let n = next_node_in(*il_prev, p.nodes);
                    *il_prev = n;
                    n
                }
            };
            from(target).collect()
        }
        _ => from(LOCAL_NODE).collect(),
    }
}

/// `next_node_in()`: the first node of `mask` after `prev`, wrapping.
fn next_node_in(prev: u32, mask: u64) -> u32 {
    let after = if prev >= 63 {
        0
    } else {
        mask & !((2u64 << prev) - 1)
    };
    if after != 0 {
        after.trailing_zeros()
    } else {
        mask.trailing_zeros()
    }
}

/// `ENOMEM` for an allocation no allowed node could serve.
pub(crate) fn exhausted(order: u32, nodes: &[u32]) -> crate::error::Error {
    err(
        errno::ENOMEM,
        format!("host memory exhausted: no free block of order {order} on nodes {nodes:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(mode: u32, nodes: &[u32]) -> Option<MemPolicy> {
        MemPolicy::new(mode, nodes, 4).unwrap()
    }

    #[test]
    fn mpol_new_rules() {
        let e = |mode, nodes: &[u32]| MemPolicy::new(mode, nodes, 4).unwrap_err().errno();
        assert_eq!(e(7, &[0]), errno::EINVAL);
        assert_eq!(e(999, &[]), errno::EINVAL);
        assert_eq!(e(MPOL_DEFAULT, &[0]), errno::EINVAL);
        assert_eq!(e(MPOL_LOCAL, &[1]), errno::EINVAL);
        for m in [
            MPOL_BIND,
            MPOL_INTERLEAVE,
            MPOL_PREFERRED_MANY,
            MPOL_WEIGHTED_INTERLEAVE,
        ] {
            assert_eq!(e(m, &[]), errno::EINVAL);
            // Only nodes the host lacks: nothing left.
            assert_eq!(e(m, &[5, 9]), errno::EINVAL);
        }
        assert_eq!(e(MPOL_BIND, &[64]), errno::EINVAL);
        assert_eq!(pol(MPOL_DEFAULT, &[]), None);
        assert_eq!(pol(MPOL_PREFERRED, &[]).unwrap().mode, MPOL_LOCAL);
        assert_eq!(pol(MPOL_PREFERRED, &[3, 1]).unwrap().node_list(), vec![1]);
        // Nodes the host lacks are dropped.
        assert_eq!(pol(MPOL_BIND, &[1, 7]).unwrap().node_list(), vec![1]);
    }

    #[test]
    fn shared_policy_splits_and_replaces() {
        let mut sp = SharedPolicy::default();
        let a = pol(MPOL_BIND, &[0]).unwrap();
        let b = pol(MPOL_BIND, &[1]).unwrap();
        sp.set(0, 10, Some(a));
        sp.set(4, 6, Some(b));
        assert_eq!(sp.lookup(3), Some(a));
        assert_eq!(sp.lookup(4), Some(b));
        assert_eq!(sp.lookup(6), Some(a));
        assert_eq!(sp.lookup(10), None);
        sp.set(2, 8, None);
        let r: Vec<_> = sp.ranges().map(|(s, e, _)| (s, e)).collect();
        assert_eq!(r, vec![(0, 2), (8, 10)]);
        sp.check(4).unwrap();
        sp.set(0, 100, None);
        assert!(sp.is_empty());
    }

    /// The range map against a per-page model.
    #[test]
    fn shared_policy_matches_a_page_model() {
        use proptest::prelude::*;
        proptest!(|(ops in proptest::collection::vec((0u64..40, 1u64..20, 0u32..3), 1..30))| {
            let mut sp = SharedPolicy::default();
            let mut model = [None; 64];
            let ps = [None, pol(MPOL_BIND, &[1]), pol(MPOL_INTERLEAVE, &[0, 2])];
            for (s, n, k) in ops {
                let p = ps[k as usize];
                sp.set(s, s + n, p);
                for slot in &mut model[s as usize..(s + n) as usize] {
                    *slot = p;
                }
                prop_assert!(sp.check(4).is_ok());
                for (i, m) in model.iter().enumerate() {
                    prop_assert_eq!(sp.lookup(i as u64), *m);
                }
            }
        });
    }

    #[test]
    fn candidate_orders() {
        let mut il = 63;
        let c = |p, il: &mut u32| candidates(p, Interleave::RoundRobin, il, 4);
        assert_eq!(c(None, &mut il), vec![0, 1, 2, 3]);
        assert_eq!(c(pol(MPOL_PREFERRED, &[2]), &mut il), vec![2, 3, 0, 1]);
        assert_eq!(c(pol(MPOL_BIND, &[3, 1]), &mut il), vec![1, 3]);
        assert_eq!(c(pol(MPOL_PREFERRED_MANY, &[2]), &mut il), vec![2, 0, 1, 3]);
        let i = pol(MPOL_INTERLEAVE, &[1, 3]);
        let firsts: Vec<u32> = (0..5).map(|_| c(i, &mut il)[0]).collect();
        assert_eq!(firsts, vec![1, 3, 1, 3, 1]);
        assert_eq!(il, 1);
        let by_index: Vec<u32> = (0..4)
            .map(|k| candidates(i, Interleave::Index(k), &mut il, 4)[0])
            .collect();
        assert_eq!(by_index, vec![1, 3, 1, 3]);
        // An indexed pick leaves the task's cursor alone.
        assert_eq!(il, 1);
        assert_eq!(next_node_in(63, 0b1010), 1);
        assert_eq!(next_node_in(3, 0b1010), 1);
    }
}

// ---------------------------------------------------------------- the host's side

/// One node's counters (`host.node_stats()`): its frames, free and allocated, and its
/// blocks by order (free as `/proc/buddyinfo` shows them; allocated as handed out, a
/// split huge folio counting as its small pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    pub node: u32,
    pub total_pages: u64,
    pub free_pages: u64,
    pub allocated_pages: u64,
    /// Free blocks per order `0..=MAX_ORDER`.
    pub free_blocks: Vec<u64>,
    /// Allocated blocks per order `0..=MAX_ORDER`.
    pub allocated_blocks: Vec<u64>,
}

impl Host {
    /// Number of NUMA nodes.
    pub fn nr_nodes(&self) -> u32 {
        self.frames.nr_nodes()
    }

    /// The node holding frame `pfn`.
    pub fn node_of(&self, pfn: u32) -> u32 {
        self.frames.node_of(pfn)
    }

    /// Per-node counters, node 0 first.
    pub fn node_stats(&self) -> Vec<NodeStats> {
        let orders = MAX_ORDER as usize + 1;
        let mut allocated = vec![vec![0u64; orders]; self.frames.nodes.len()];
        for (pfn, n) in self.owned_blocks() {
            let node = self.frames.node_of(pfn) as usize;
            allocated[node][n.trailing_zeros() as usize] += 1;
        }
        self.frames
            .nodes
            .iter()
            .zip(allocated)
            .enumerate()
            .map(|(k, (a, allocated_blocks))| NodeStats {
                node: k as u32,
                total_pages: self.frames.node_pages,
                free_pages: a.free_pages(),
                allocated_pages: self.frames.node_pages - a.free_pages(),
                free_blocks: a.free_blocks(),
                allocated_blocks,
            })
            .collect()
    }

    /// `mbind(addr + offset, length, mode, nodes, maxnode, 0)` on mapping `m`, in the
    /// order of `kernel_mbind()` / `do_mbind()`: an unknown mode or a node at or above
    /// `MAX_NUMNODES` is `EINVAL`; an unaligned offset is `EINVAL`; the length is rounded up
    /// to whole pages and 0 does nothing; then `mpol_new()`'s checks (see
    /// [`MemPolicy::new`]); a range reaching past the mapping (a hole) is `EFAULT`, with
    /// nothing changed. The policy lands in the shared policy of the mapping's inode: the
    /// guest_memfd's (file pages `pgoff + offset / 4096 ..`) or the anonymous mapping's.
    /// Pages already allocated stay where they are (no `MPOL_MF_MOVE`: guest_memfd pages
    /// are unmovable).
    pub fn map_mbind(
        &mut self,
        m: usize,
        offset: u64,
        length: u64,
        mode: u32,
        nodes: &[u32],
    ) -> Result<()> {
        if mode >= MPOL_MAX {
            return Err(einval(format!("unknown memory policy mode {mode}")));
        }
        if let Some(n) = nodes.iter().find(|&&n| n >= MAX_NUMNODES) {
            return Err(einval(format!(
                "node {n} is beyond MAX_NUMNODES ({MAX_NUMNODES})"
            )));
        }
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!("mbind offset {offset:#x} not page aligned")));
        }
        let Some(len) = length.checked_next_multiple_of(PAGE_SIZE) else {
            return Err(einval(format!("mbind length {length:#x} wraps")));
        };
        if offset.checked_add(len).is_none() {
            return Err(einval(format!("mbind range {offset:#x}+{length:#x} wraps")));
        }
        if len == 0 {
            return Ok(());
        }
        let policy = MemPolicy::new(mode, nodes, self.nr_nodes())?;
        let map = &self.space.maps[m];
        let map_len = map.pages << PAGE_SHIFT;
        if map.unmapped || offset + len > map_len {
            return Err(err(
                errno::EFAULT,
                format!(
                    "mbind range {offset:#x}+{len:#x} is not all mapped (mapping of {map_len:#x})"
                ),
            ));
        }
        let (i0, i1) = (offset >> PAGE_SHIFT, (offset + len) >> PAGE_SHIFT);
        match map.kind {
            MapKind::Gmem { file, pgoff, .. } => {
                self.files[file].policy.set(pgoff + i0, pgoff + i1, policy);
            }
            MapKind::Anon { .. } => self.space.maps[m].policy.set(i0, i1, policy),
        }
        Ok(())
    }

    /// `set_mempolicy(mode, nodes)` for the VMM (the model's one task, whose threads also
    /// run the vCPUs): it places every page allocated where no shared policy is set, on
    /// guest_memfd and anonymous memory alike. Checks as [`MemPolicy::new`] (`EINVAL`);
    /// `MPOL_DEFAULT` removes it. Like the kernel's, it resets the interleave cursor
    /// when the new policy interleaves.
    pub fn set_mempolicy(&mut self, mode: u32, nodes: &[u32]) -> Result<()> {
        let p = MemPolicy::new(mode, nodes, self.nr_nodes())?;
        if p.is_some_and(|p| matches!(p.mode, MPOL_INTERLEAVE | MPOL_WEIGHTED_INTERLEAVE)) {
            self.frames.il_prev = MAX_NUMNODES - 1;
        }
        self.frames.task_policy = p;
        Ok(())
    }

    /// `get_mempolicy(&mode, nodemask, maxnode, 0, 0)`: the VMM's own policy.
    pub fn get_task_mempolicy(&self) -> (u32, Vec<u32>) {
        report(self.frames.task_policy)
    }

    /// `get_mempolicy(&mode, nodemask, maxnode, addr + offset, MPOL_F_ADDR)`: the policy of
    /// the page at `offset` of mapping `m` as `(mode, nodes)`; `(MPOL_DEFAULT, [])` where
    /// none is set (6.19 `kvm_gmem_get_policy()` returns the lookup as is, never the task's
    /// policy). Outside the mapping: `EFAULT`.
    pub fn map_get_mempolicy(&self, m: usize, offset: u64) -> Result<(u32, Vec<u32>)> {
        let idx = self.numa_map_index(m, offset)?;
        let map = &self.space.maps[m];
        Ok(report(match map.kind {
            MapKind::Gmem { file, pgoff, .. } => self.files[file].policy.lookup(pgoff + idx),
            MapKind::Anon { .. } => map.policy.lookup(idx),
        }))
    }

    /// `move_pages(0, 1, &addr, NULL, &status, 0)` for the page at `offset` of mapping `m`:
    /// the node of the page mapped there, `ENOENT` when the host page table maps none (a
    /// guest_memfd page the host never faulted in, or a private one, is not present
    /// there), `EFAULT` outside the mapping.
    pub fn map_page_node(&self, m: usize, offset: u64) -> Result<u32> {
        let idx = self.numa_map_index(m, offset)?;
        let map = &self.space.maps[m];
        let pfn = match &map.kind {
            MapKind::Anon { .. } => map.anon_pfn(idx),
            MapKind::Gmem {
                file,
                pgoff,
                present,
            } => present
                .contains(idx)
                .then(|| self.files[*file].page(pgoff + idx).map(|r| r.pfn))
                .flatten(),
        };
        pfn.map(|p| self.frames.node_of(p)).ok_or_else(|| {
            err(
                errno::ENOENT,
                format!("no page present at offset {offset:#x}"),
            )
        })
    }

    fn numa_map_index(&self, m: usize, offset: u64) -> Result<u64> {
        let map = &self.space.maps[m];
        if map.unmapped || offset >= map.pages << PAGE_SHIFT {
            return Err(err(
                errno::EFAULT,
                format!("offset {offset:#x} is not mapped"),
            ));
        }
        Ok(offset >> PAGE_SHIFT)
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;
    use crate::access::HostOp;
    use crate::{StrategyKind, VmType, uapi};

    const MIB: u64 = 1 << 20;

    /// A 2-node host of `mib` MiB, and a 1 MiB shared guest_memfd mapped whole.
    fn setup(mib: u64) -> (Host, usize, usize) {
        let mut h = Host::with_nodes(mib * MIB, 2).unwrap();
        let vm = h.create_vm(VmType::SwProtected, StrategyKind::Inplace);
        let flags = uapi::GUEST_MEMFD_FLAG_MMAP | uapi::GUEST_MEMFD_FLAG_INIT_SHARED;
        let f = h.create_guest_memfd(vm, MIB, flags, 0).unwrap();
        let m = h.gmem_mmap(f, 0, None, true).unwrap();
        (h, f, m)
    }

    fn touch(h: &mut Host, m: usize, pages: std::ops::Range<u64>) {
        for i in pages {
            h.map_access(m, i << PAGE_SHIFT, HostOp::Write(i + 1))
                .unwrap();
        }
    }

    fn nodes(h: &Host, m: usize, pages: std::ops::Range<u64>) -> Vec<u32> {
        pages
            .map(|i| h.map_page_node(m, i << PAGE_SHIFT).unwrap())
            .collect()
    }

    #[test]
    fn host_node_rules() {
        assert_eq!(Host::with_nodes(MIB, 0).unwrap_err().errno(), errno::EINVAL);
        assert_eq!(
            Host::with_nodes(MIB, 65).unwrap_err().errno(),
            errno::EINVAL
        );
        // 256 pages do not split into 3 nodes.
        assert_eq!(Host::with_nodes(MIB, 3).unwrap_err().errno(), errno::EINVAL);
        let h = Host::with_nodes(3 * 4096 * 5, 3).unwrap();
        assert_eq!(h.nr_nodes(), 3);
        let s = h.node_stats();
        assert_eq!(
            s.iter().map(|n| n.total_pages).collect::<Vec<_>>(),
            vec![5, 5, 5]
        );
        // Node blocks are aligned as physical frames: node 1 (frames 5..10) is 5, 6-7, 8-9.
        assert_eq!(s[1].free_blocks[..3], [1, 2, 0]);
        h.check().unwrap();
    }

    /// `test_numa_allocation`: the policy in force when a page is allocated decides its
    /// node; a policy set later leaves allocated pages alone; punching and re-touching
    /// re-allocates under the new one.
    #[test]
    fn policy_places_new_pages_only() {
        let (mut h, f, m) = setup(16);
        touch(&mut h, m, 0..1);
        assert_eq!(nodes(&h, m, 0..1), vec![0]);
        h.map_mbind(m, 0, 4096, MPOL_BIND, &[1]).unwrap();
        assert_eq!(nodes(&h, m, 0..1), vec![0]);
        let punch = uapi::FALLOC_FL_PUNCH_HOLE | uapi::FALLOC_FL_KEEP_SIZE;
        h.gmem_fallocate(f, punch, 0, MIB).unwrap();
        assert_eq!(h.map_page_node(m, 0).unwrap_err().errno(), errno::ENOENT);
        h.map_mbind(m, 0, 2 * 4096, MPOL_BIND, &[1]).unwrap();
        h.map_mbind(m, 2 * 4096, 2 * 4096, MPOL_BIND, &[0]).unwrap();
        touch(&mut h, m, 0..4);
        assert_eq!(nodes(&h, m, 0..4), vec![1, 1, 0, 0]);
        h.gmem_fallocate(f, punch, 0, MIB).unwrap();
        h.map_mbind(m, 0, 2 * 4096, MPOL_BIND, &[0]).unwrap();
        h.map_mbind(m, 2 * 4096, 2 * 4096, MPOL_BIND, &[1]).unwrap();
        touch(&mut h, m, 0..4);
        assert_eq!(nodes(&h, m, 0..4), vec![0, 0, 1, 1]);
        // fallocate allocates under the policy too.
        h.map_mbind(m, 8 * 4096, 4096, MPOL_PREFERRED, &[1])
            .unwrap();
        h.gmem_fallocate(f, uapi::FALLOC_FL_KEEP_SIZE, 8 * 4096, 4096)
            .unwrap();
        let pfn = h.file(f).page(8).unwrap().pfn;
        assert_eq!(h.node_of(pfn), 1);
        h.check().unwrap();
        let s = h.node_stats();
        assert_eq!(s[0].allocated_pages + s[1].allocated_pages, 5);
        assert_eq!((s[0].allocated_blocks[0], s[1].allocated_blocks[0]), (2, 3));
    }

    /// The policy belongs to the inode: a second mapping of the file sees it, at the
    /// file offsets the first one set.
    #[test]
    fn policy_is_the_inodes() {
        let (mut h, f, m) = setup(16);
        h.map_mbind(m, 4 * 4096, 4096, MPOL_INTERLEAVE, &[0, 1])
            .unwrap();
        let m2 = h.gmem_mmap(f, 2 * 4096, Some(8 * 4096), true).unwrap();
        assert_eq!(
            h.map_get_mempolicy(m2, 2 * 4096 + 5).unwrap(),
            (MPOL_INTERLEAVE, vec![0, 1])
        );
        assert_eq!(h.map_get_mempolicy(m2, 0).unwrap(), (MPOL_DEFAULT, vec![]));
        h.map_unmap(m).unwrap();
        assert_eq!(
            h.map_get_mempolicy(m2, 2 * 4096).unwrap().0,
            MPOL_INTERLEAVE
        );
        assert_eq!(
            h.map_get_mempolicy(m, 0).unwrap_err().errno(),
            errno::EFAULT
        );
        h.map_mbind(m2, 0, 8 * 4096, MPOL_DEFAULT, &[]).unwrap();
        assert!(h.file(f).policy.is_empty());
        h.check().unwrap();
    }

    /// guest_memfd interleaves in allocation order (`NO_INTERLEAVE_INDEX`); anonymous
    /// shared memory by page offset.
    #[test]
    fn interleave_orders() {
        let (mut h, _, m) = setup(16);
        h.map_mbind(m, 0, 8 * 4096, MPOL_INTERLEAVE, &[0, 1])
            .unwrap();
        for i in [5u64, 2, 7, 0] {
            touch(&mut h, m, i..i + 1);
        }
        let got: Vec<u32> = [5u64, 2, 7, 0]
            .iter()
            .map(|&i| nodes(&h, m, i..i + 1)[0])
            .collect();
        assert_eq!(got, vec![0, 1, 0, 1]);
        let a = h.mmap_anonymous(8 * 4096).unwrap();
        h.map_mbind(a, 0, 8 * 4096, MPOL_WEIGHTED_INTERLEAVE, &[0, 1])
            .unwrap();
        for i in [5u64, 2, 7, 0] {
            touch(&mut h, a, i..i + 1);
        }
        let got: Vec<u32> = [5u64, 2, 7, 0]
            .iter()
            .map(|&i| nodes(&h, a, i..i + 1)[0])
            .collect();
        assert_eq!(got, vec![1, 0, 1, 0]);
        h.check().unwrap();
    }

    /// BIND with its nodes full is ENOMEM though another node has room; PREFERRED and
    /// no policy fall back.
    #[test]
    fn bind_exhaustion_and_fallback() {
        // 2 MiB host: 256 pages per node; the file is 1 MiB = 256 pages.
        let (mut h, _, m) = setup(2);
        let a = h.mmap_anonymous(MIB).unwrap();
        h.map_mbind(a, 0, MIB, MPOL_BIND, &[1]).unwrap();
        touch(&mut h, a, 0..256);
        assert_eq!(h.node_stats()[1].free_pages, 0);
        h.map_mbind(m, 0, MIB, MPOL_BIND, &[1]).unwrap();
        let e = h.map_access(m, 0, HostOp::Write(1)).unwrap_err();
        assert_eq!(e.errno(), errno::ENOMEM);
        assert_eq!(h.node_stats()[0].free_pages, 256);
        h.map_mbind(m, 0, 4096, MPOL_PREFERRED, &[1]).unwrap();
        touch(&mut h, m, 0..1);
        assert_eq!(nodes(&h, m, 0..1), vec![0]);
        h.map_mbind(m, 4096, 4096, MPOL_PREFERRED_MANY, &[1])
            .unwrap();
        touch(&mut h, m, 1..2);
        assert_eq!(nodes(&h, m, 1..2), vec![0]);
        h.check().unwrap();
    }

    #[test]
    fn mbind_errors() {
        let (mut h, _, m) = setup(16);
        let e = |h: &mut Host, off, len, mode, nodes: &[u32]| {
            h.map_mbind(m, off, len, mode, nodes).unwrap_err().errno()
        };
        assert_eq!(e(&mut h, 0, 4096, 999, &[0]), errno::EINVAL);
        assert_eq!(e(&mut h, 0, 4096, MPOL_BIND, &[]), errno::EINVAL);
        assert_eq!(e(&mut h, 0, 4096, MPOL_BIND, &[2]), errno::EINVAL);
        assert_eq!(e(&mut h, 0, 4096, MPOL_BIND, &[64]), errno::EINVAL);
        assert_eq!(e(&mut h, 1, 4096, MPOL_BIND, &[0]), errno::EINVAL);
        assert_eq!(e(&mut h, 0, MIB + 4096, MPOL_BIND, &[0]), errno::EFAULT);
        // Length rounds up to a page; 0 does nothing.
        h.map_mbind(m, 0, 1, MPOL_BIND, &[1]).unwrap();
        assert_eq!(h.map_get_mempolicy(m, 4095).unwrap(), (MPOL_BIND, vec![1]));
        assert_eq!(h.map_get_mempolicy(m, 4096).unwrap().0, MPOL_DEFAULT);
        h.map_mbind(m, 4096, 0, MPOL_BIND, &[]).unwrap();
        // Nodes the host lacks are dropped.
        h.map_mbind(m, 0, 4096, MPOL_INTERLEAVE, &[0, 1, 5])
            .unwrap();
        assert_eq!(
            h.map_get_mempolicy(m, 0).unwrap(),
            (MPOL_INTERLEAVE, vec![0, 1])
        );
        assert_eq!(
            h.map_get_mempolicy(m, MIB).unwrap_err().errno(),
            errno::EFAULT
        );
        assert_eq!(h.map_page_node(m, MIB).unwrap_err().errno(), errno::EFAULT);
    }

    #[test]
    fn policies_survive_a_snapshot() {
        let (mut h, f, m) = setup(16);
        h.map_mbind(m, 0, 8 * 4096, MPOL_INTERLEAVE, &[0, 1])
            .unwrap();
        touch(&mut h, m, 0..3);
        let a = h.mmap_anonymous(4 * 4096).unwrap();
        h.map_mbind(a, 0, 4096, MPOL_BIND, &[1]).unwrap();
        let back = Host::from_snapshot(&h.to_snapshot().unwrap()).unwrap();
        assert_eq!(back.nr_nodes(), 2);
        assert_eq!(back.file(f).policy, h.file(f).policy);
        assert_eq!(back.map_get_mempolicy(a, 0).unwrap(), (MPOL_BIND, vec![1]));
        assert_eq!(back.frames.il_prev, h.frames.il_prev);
        assert_eq!(back.node_stats(), h.node_stats());
    }

    /// The task policy places pages where no shared policy is set, guest faults included.
    #[test]
    fn task_policy_is_the_fallback() {
        let (mut h, _, m) = setup(16);
        assert_eq!(
            h.set_mempolicy(MPOL_BIND, &[]).unwrap_err().errno(),
            errno::EINVAL
        );
        h.set_mempolicy(MPOL_BIND, &[1]).unwrap();
        assert_eq!(h.get_task_mempolicy(), (MPOL_BIND, vec![1]));
        h.map_mbind(m, 0, 4096, MPOL_BIND, &[0]).unwrap();
        touch(&mut h, m, 0..3);
        assert_eq!(nodes(&h, m, 0..3), vec![0, 1, 1]);
        // get_mempolicy(MPOL_F_ADDR) reports the shared policy only.
        assert_eq!(
            h.map_get_mempolicy(m, 4096).unwrap(),
            (MPOL_DEFAULT, vec![])
        );
        let a = h.mmap_anonymous(4 * 4096).unwrap();
        h.set_mempolicy(MPOL_INTERLEAVE, &[0, 1]).unwrap();
        // shmem keeps its interleave index under the task policy too.
        for i in [3u64, 2] {
            touch(&mut h, a, i..i + 1);
        }
        assert_eq!(nodes(&h, a, 2..4), vec![0, 1]);
        // guest_memfd: the task's cursor (reset by set_mempolicy).
        touch(&mut h, m, 5..7);
        assert_eq!(nodes(&h, m, 5..7), vec![0, 1]);
        h.set_mempolicy(MPOL_DEFAULT, &[]).unwrap();
        assert_eq!(h.get_task_mempolicy(), (MPOL_DEFAULT, vec![]));
        h.check().unwrap();
    }

    /// `check()` catches per-node miscounts and ill-formed policies.
    #[test]
    fn check_finds_broken_nodes() {
        let (mut h, f, m) = setup(16);
        touch(&mut h, m, 0..2);
        h.check().unwrap();
        let mut bad = h.clone();
        bad.files[f].policy.set(
            0,
            1,
            Some(MemPolicy {
                mode: MPOL_BIND,
                nodes: 0b100,
            }),
        );
        assert!(bad.check().unwrap_err().to_string().contains("nodes"));
        let mut bad = h.clone();
        bad.space.maps[m].policy.set(
            0,
            1,
            Some(MemPolicy {
                mode: MPOL_LOCAL,
                nodes: 0,
            }),
        );
        assert!(
            bad.check()
                .unwrap_err()
                .to_string()
                .contains("policy of its own")
        );
        // A frame of node 1 taken out of its allocator with no owner.
        let mut bad = h;
        bad.frames.alloc_from(&[1], 0).unwrap();
        assert!(bad.check().is_err());
    }
}
