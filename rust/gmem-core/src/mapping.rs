//! Host (VMM) mappings: anonymous memory, or an mmap of a guest_memfd; and the host
//! address space that places them (`AddressSpace`).

use std::collections::BTreeMap;

use roaring::RoaringTreemap;
use rustc_hash::FxHashMap;

use crate::error::{Result, einval, err, errno};
use crate::host::Host;
use crate::numa::SharedPolicy;
use crate::sparse::SparseVec;
use crate::{PAGE_SHIFT, PAGE_SIZE};

/// Mappings are placed upward from 16 TiB, leaving room for guests of tens of TiB below
/// the 128 TiB user limit (`TASK_SIZE`).
pub(crate) const VA_BASE: u64 = 0x1000_0000_0000;
pub(crate) const VA_ALIGN: u64 = 1 << 21;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum MapKind {
    /// Anonymous shared memory: page index -> `pfn + 1`.
    Anon {
        pages: SparseVec<u32>,
        pins: FxHashMap<u64, u32>,
        /// Pinned pages discarded from the mapping: index -> (pfn, pins). Alive until
        /// unpinned, as a GUP reference keeps a page after `MADV_DONTNEED`.
        orphans: FxHashMap<u64, Vec<(u32, u32)>>,
    },
    /// `mmap(MAP_SHARED)` of a guest_memfd from file page `pgoff`; `present` holds the
    /// page indices currently mapped in the host page table.
    Gmem {
        file: usize,
        pgoff: u64,
        present: RoaringTreemap,
    },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    pub addr: u64,
    pub pages: u64,
    pub kind: MapKind,
    /// Unmapped: gone from the address space; kept only while pinned pages remain.
    pub unmapped: bool,
    /// NUMA policy of an anonymous mapping's pages, by page index: the shared policy of
    /// the shmem inode the kernel makes for `MAP_SHARED | MAP_ANONYMOUS`. Empty for a
    /// guest_memfd mapping, whose policy is the file's (`Gmem::policy`).
    pub(crate) policy: SharedPolicy,
}

impl Mapping {
    pub fn end(&self) -> u64 {
        self.addr + (self.pages << crate::PAGE_SHIFT)
    }

    pub fn anon_pfn(&self, idx: u64) -> Option<u32> {
        match &self.kind {
            MapKind::Anon { pages, .. } => {
                let e = pages.get(idx);
                (e != 0).then(|| e - 1)
            }
            MapKind::Gmem { .. } => None,
        }
    }
}

// ---------------------------------------------------------------- the host address space

/// The VMM's address space: every mapping it made (live, or unmapped and kept while
/// pinned pages remain), the live ones by start address, the next free address, and how
/// many live mappings are of guest_memfd files.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct AddressSpace {
    pub(crate) maps: Vec<Mapping>,
    /// Live mappings by start address.
    pub(crate) va: BTreeMap<u64, usize>,
    pub(crate) next_va: u64,
    /// Live mmaps of guest_memfd files: while there are none, a shared stage-2 page of a
    /// userspace-backed memslot is ordinary memory, whose content is at its frame.
    pub(crate) gmem_mmaps: u32,
}

impl AddressSpace {
    pub(crate) fn new() -> Self {
        Self {
            maps: Vec::new(),
            va: BTreeMap::new(),
            next_va: VA_BASE,
            gmem_mmaps: 0,
        }
    }

    /// Place a mapping of `pages` pages at the next free 2 MiB-aligned address, with a
    /// guard page before the next one.
    pub(crate) fn place(&mut self, pages: u64, kind: MapKind) -> usize {
        let id = self.maps.len();
        let addr = self.next_va;
        self.next_va = (addr + (pages << PAGE_SHIFT) + PAGE_SIZE).div_ceil(VA_ALIGN) * VA_ALIGN;
        if matches!(kind, MapKind::Gmem { .. }) {
            self.gmem_mmaps += 1;
        }
        self.maps.push(Mapping {
            addr,
            pages,
            kind,
            unmapped: false,
            policy: SharedPolicy::default(),
        });
        self.va.insert(addr, id);
        id
    }

    /// The live mapping containing `addr` and the page index in it.
    pub(crate) fn at(&self, addr: u64) -> Option<(usize, u64)> {
        let (_, &id) = self.va.range(..=addr).next_back()?;
        let m = &self.maps[id];
        (addr < m.end()).then(|| (id, (addr - m.addr) >> PAGE_SHIFT))
    }

    /// The live mappings overlapping `[a0, a1)`, with the page indices of the overlap in
    /// each: `(mapping, i0, i1)`. Mappings never overlap and are keyed by start: walks down
    /// from the last one starting below `a1` until one ends at or below `a0`.
    pub(crate) fn overlapping(
        &self,
        a0: u64,
        a1: u64,
    ) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
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
}

impl Host {
    pub(crate) fn add_mapping(&mut self, pages: u64, kind: MapKind) -> usize {
        let file = match &kind {
            MapKind::Gmem { file, .. } => Some(*file),
            MapKind::Anon { .. } => None,
        };
        let id = self.space.place(pages, kind);
        if let Some(f) = file {
            self.files[f].mappings.push(id);
        }
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
    #[inline]
    pub(crate) fn mapping_at(&self, addr: u64) -> Option<(usize, u64)> {
        self.space.at(addr)
    }

    /// The VMM's mappings overlapping `[a0, a1)` (see [`AddressSpace::overlapping`]).
    pub(crate) fn maps_in(&self, a0: u64, a1: u64) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        self.space.overlapping(a0, a1)
    }
}

/// An `mmap(2)` length as the kernel takes it: 0 is `EINVAL`; anything else is rounded up
/// to whole pages, and more than the 47-bit user address space is `ENOMEM`.
pub(crate) fn mmap_length(length: u64) -> Result<u64> {
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

#[cfg(test)]
mod tests {
    use roaring::RoaringTreemap;

    use super::{AddressSpace, MapKind, VA_ALIGN, VA_BASE};
    use crate::PAGE_SHIFT;

    fn gmem(file: usize) -> MapKind {
        MapKind::Gmem {
            file,
            pgoff: 0,
            present: RoaringTreemap::new(),
        }
    }

    /// Mappings are placed 2 MiB-aligned, upward, never touching (a guard page at least);
    /// lookups and overlap walks find exactly the live ones.
    #[test]
    fn placement_and_lookup() {
        let mut s = AddressSpace::new();
        let sizes = [1u64, 512, 513, 3];
        let ids: Vec<usize> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| s.place(n, gmem(i)))
            .collect();
        assert_eq!(s.gmem_mmaps, 4);
        assert_eq!(s.maps[ids[0]].addr, VA_BASE);
        for w in ids.windows(2) {
            let (a, b) = (&s.maps[w[0]], &s.maps[w[1]]);
            assert_eq!(b.addr % VA_ALIGN, 0);
            assert!(b.addr > a.end(), "a guard page between mappings");
        }
        let m2 = &s.maps[ids[2]];
        assert_eq!(s.at(m2.addr + (7 << PAGE_SHIFT) + 5), Some((ids[2], 7)));
        assert_eq!(s.at(m2.end()), None);
        assert_eq!(s.at(VA_BASE - 1), None);
        let (lo, hi) = (s.maps[ids[1]].addr + 4096, s.maps[ids[3]].addr + 4096);
        let mut got: Vec<_> = s.overlapping(lo, hi).collect();
        got.sort_unstable();
        assert_eq!(
            got,
            vec![(ids[1], 1, 512), (ids[2], 0, 513), (ids[3], 0, 1)]
        );
        assert_eq!(s.overlapping(VA_BASE + 4096, VA_BASE + 8192).count(), 0);
    }
}
