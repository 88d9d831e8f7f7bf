//! Host (VMM) mappings: anonymous memory, or an mmap of a guest_memfd; and the host
//! address space that places them (`Host::va`, `Host::next_va`).

use roaring::RoaringTreemap;
use rustc_hash::FxHashMap;

use crate::error::{Result, einval, err, errno};
use crate::host::Host;
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

impl Host {
    pub(crate) fn add_mapping(&mut self, pages: u64, kind: MapKind) -> usize {
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
