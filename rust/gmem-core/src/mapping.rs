//! Host (VMM) mappings: anonymous memory, or an mmap of a guest_memfd.

use roaring::RoaringTreemap;
use rustc_hash::FxHashMap;

use crate::sparse::SparseVec;

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
