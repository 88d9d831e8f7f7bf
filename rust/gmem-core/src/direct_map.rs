//! The kernel direct map and `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` (posted series "Direct Map
//! Removal Support for guest_memfd", v12, April 2026; not merged).
//!
//! What the series does, and the model with it:
//! - A folio of a NO_DIRECT_MAP file leaves the direct map right before it is first mapped
//!   anywhere: in `kvm_gmem_get_pfn()` (a guest fault, after the page is cleared) and in
//!   `kvm_gmem_fault_user_mapping()` (a host fault through the file's mmap). A page only
//!   allocated (`fallocate`) or populated stays in the direct map until then. Each removal
//!   is `folio_zap_direct_map()`: `set_direct_map_valid_noflush(..., false)` and one
//!   `flush_tlb_kernel_range()` over the folio — one direct-map flush per call that
//!   removed a page (the model's calls map one folio each).
//! - The folio returns to the direct map when it is freed (`kvm_gmem_free_folio()` →
//!   `folio_restore_direct_map()`), after `kvm_arch_gmem_invalidate()`. Making entries
//!   present again needs no TLB flush (the series' restore does none).
//! - The direct map is modelled at 2 MiB granularity: the first removal in a 2 MiB-aligned
//!   block of frames splits its PMD into 4 KiB PTEs (x86 CPA `__split_large_page()`, which
//!   also flushes the whole TLB). Restoring does **not** merge the block back: the series
//!   states that restoring "only updates prot bits" because the split already happened,
//!   and x86 CPA re-collapses only executable mappings. A block stays split for the
//!   host's life, so a later removal in it costs no split.
//! - The file's mapping is `AS_NO_DIRECT_MAP`, rejected wherever secretmem is: GUP (a host
//!   pin through the file's mmap) fails with `EFAULT`. Plain host loads and stores through
//!   the mmap work (the userspace mapping is separate from the direct map).
//! - Only order-0 folios are supported (`folio_zap_direct_map()` refuses large folios), so
//!   a HugeTLB guest_memfd cannot be NO_DIRECT_MAP (gmem's `EINVAL` at creation: no tree
//!   has both).

use roaring::RoaringBitmap;

use crate::error::{Result, err, errno};
use crate::host::Host;
use crate::uapi;

/// Frames per 2 MiB direct-map block.
const BLOCK_SHIFT: u32 = 9;

/// The direct map's state: frames whose entry is not present, and 2 MiB blocks mapped by
/// 4 KiB entries since a removal split them.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct DirectMap {
    removed: RoaringBitmap,
    split: RoaringBitmap,
}

impl DirectMap {
    /// Remove frames `pfn..pfn + n`; returns (frames removed, blocks split).
    pub(crate) fn remove(&mut self, pfn: u32, n: u32) -> (u64, u64) {
        let mut removed = 0;
        let mut splits = 0;
        for p in pfn..pfn + n {
            if self.removed.insert(p) {
                removed += 1;
                if self.split.insert(p >> BLOCK_SHIFT) {
                    splits += 1;
                }
            }
        }
        (removed, splits)
    }

    /// Restore frames `pfn..pfn + n`; returns the frames restored.
    pub(crate) fn restore(&mut self, pfn: u32, n: u32) -> u64 {
        if self.removed.is_empty() {
            return 0;
        }
        let r = u64::from(pfn)..u64::from(pfn) + u64::from(n);
        let before = self.removed.len();
        self.removed
            .remove_range(r.start as u32..=(r.end - 1) as u32);
        before - self.removed.len()
    }

    /// Whether frame `pfn` is out of the direct map.
    pub(crate) fn is_removed(&self, pfn: u32) -> bool {
        self.removed.contains(pfn)
    }

    /// Frames out of the direct map.
    pub(crate) fn removed(&self) -> impl Iterator<Item = u32> + '_ {
        self.removed.iter()
    }

    /// 2 MiB blocks split so far.
    pub(crate) fn nr_split(&self) -> u64 {
        self.split.len()
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.removed.serialized_size() + self.split.serialized_size()
    }
}

impl Host {
    /// `kvm_gmem_folio_zap_direct_map()` for the folio holding page `off` of `file`, about
    /// to be mapped (by a guest fault or a host fault): nothing unless the file is
    /// NO_DIRECT_MAP and the folio is still in the direct map.
    pub(crate) fn gmem_zap_direct_map(&mut self, file: usize, off: u64) {
        let f = &self.files[file];
        if f.flags & uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP == 0 {
            return;
        }
        let Some(r) = f.page(off) else { return };
        let (vm, n) = (f.vm, f.folio_pages() as u32);
        let head_pfn = match r.folio_head {
            Some(h) => r.pfn - (off - h) as u32,
            None => r.pfn,
        };
        let (removed, splits) = self.frames.direct_map.remove(head_pfn, n);
        if removed == 0 {
            return;
        }
        let c = &self.costs;
        let ns = c.direct_map_remove * removed + c.direct_map_split * splits + c.direct_map_flush;
        self.vms[vm]
            .stats
            .direct_map_removed(removed, splits, 1, ns);
    }

    /// [`Host::gmem_zap_direct_map`] for each page of frames `pfn..pfn + n`, fresh order-0
    /// pages of `file` each mapped by its own fault: one flush per page removed.
    pub(crate) fn gmem_zap_direct_map_run(&mut self, file: usize, pfn: u32, n: u64) {
        let f = &self.files[file];
        if f.flags & uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP == 0 {
            return;
        }
        let vm = f.vm;
        let n = u32::try_from(n).expect("a run of host frames");
        let (removed, splits) = self.frames.direct_map.remove(pfn, n);
        if removed == 0 {
            return;
        }
        let c = &self.costs;
        let ns = (c.direct_map_remove + c.direct_map_flush) * removed + c.direct_map_split * splits;
        self.vms[vm]
            .stats
            .direct_map_removed(removed, splits, removed, ns);
    }

    /// `folio_restore_direct_map()` of frames `pfn..pfn + 2^order` being freed, charged to
    /// `vm`: no flush.
    pub(crate) fn restore_direct_map(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        let n = self.frames.direct_map.restore(pfn, 1 << order);
        if n > 0
            && let Some(v) = vm
        {
            let ns = self.costs.direct_map_restore * n;
            self.vms[v].stats.direct_map_restored(n, ns);
        }
    }

    /// GUP through a mapping of `file`: refused (`EFAULT`) for an `AS_NO_DIRECT_MAP`
    /// mapping, as for secretmem (`check_vma_flags()`).
    pub(crate) fn gup_allowed(&self, file: usize) -> Result<()> {
        if self.files[file].flags & uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0 {
            return Err(err(
                errno::EFAULT,
                "cannot pin a page of a GUEST_MEMFD_FLAG_NO_DIRECT_MAP guest_memfd (GUP refuses AS_NO_DIRECT_MAP mappings)",
            ));
        }
        Ok(())
    }

    /// A kernel copy into page `off` of `file` (populate): `EFAULT` once the page has left
    /// the direct map.
    pub(crate) fn kernel_copy_allowed(&self, file: usize, off: u64) -> Result<()> {
        if let Some(r) = self.files[file].page(off)
            && self.frames.direct_map.is_removed(r.pfn)
        {
            return Err(err(
                errno::EFAULT,
                format!("page {off:#x} of the guest_memfd is not in the direct map"),
            ));
        }
        Ok(())
    }

    /// Whether frame `pfn` is out of the kernel direct map.
    pub fn frame_in_direct_map(&self, pfn: u32) -> bool {
        !self.frames.direct_map.is_removed(pfn)
    }

    /// 2 MiB direct-map blocks split so far (they never merge back).
    pub fn direct_map_split_blocks(&self) -> u64 {
        self.frames.direct_map.nr_split()
    }
}

#[cfg(test)]
mod tests {
    use super::DirectMap;

    #[test]
    fn first_removal_in_a_block_splits_it_once() {
        let mut d = DirectMap::default();
        assert_eq!(d.remove(0, 1), (1, 1));
        assert_eq!(d.remove(1, 1), (1, 0));
        assert_eq!(d.remove(1, 1), (0, 0), "already removed");
        assert_eq!(d.remove(511, 2), (2, 1), "the second frame is in block 1");
        assert_eq!(d.nr_split(), 2);
    }

    #[test]
    fn restore_does_not_merge_back() {
        let mut d = DirectMap::default();
        d.remove(512, 4);
        assert_eq!(d.restore(512, 4), 4);
        assert_eq!(d.restore(512, 4), 0);
        assert!(!d.is_removed(513));
        assert_eq!(d.nr_split(), 1);
        assert_eq!(d.remove(515, 1), (1, 0), "the block is still split");
    }

    #[test]
    fn restore_counts_only_removed_frames() {
        let mut d = DirectMap::default();
        d.remove(10, 1);
        assert_eq!(d.restore(8, 4), 1);
        assert_eq!(d.removed().count(), 0);
    }
}

#[cfg(test)]
mod host_tests {
    use crate::error::{Error, errno};
    use crate::{Host, HostOp, PAGE_SIZE, StrategyKind, VmType, uapi};

    const SECRET: u64 = uapi::GUEST_MEMFD_FLAG_MMAP
        | uapi::GUEST_MEMFD_FLAG_INIT_SHARED
        | uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP;

    fn errno_of<T: std::fmt::Debug>(r: crate::Result<T>) -> i32 {
        match r {
            Err(Error::Errno(e, _)) => e,
            other => panic!("expected an errno, got {other:?}"),
        }
    }

    fn secret_guest() -> (Host, usize, usize) {
        let mut h = Host::new(16 << 20).unwrap();
        let vm = h.create_vm(VmType::Default, StrategyKind::Dual);
        let f = h.create_guest_memfd(vm, 4 << 20, SECRET, 0).unwrap();
        h.bind_at_zero(vm, f, 4 << 20);
        (h, vm, f)
    }

    #[test]
    fn offered_except_on_tdx_and_snp() {
        let mut h = Host::new(1 << 20).unwrap();
        for t in VmType::ALL.into_iter().chain(VmType::WITHOUT_PRIVATE_MEM) {
            let vm = h.create_vm(t, StrategyKind::Dual);
            let offered = h.supported_gmem_flags(vm) & uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0;
            assert_eq!(offered, !matches!(t, VmType::Tdx | VmType::Snp), "{t:?}");
            let r = h.create_guest_memfd(vm, PAGE_SIZE, uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP, 0);
            assert_eq!(r.is_ok(), offered, "{t:?}");
        }
    }

    #[test]
    fn hugetlb_with_no_direct_map_is_einval() {
        let mut h = Host::new(8 << 20).unwrap();
        let vm = h.create_vm(VmType::SwProtected, StrategyKind::Dual);
        let flags = uapi::GUEST_MEMFD_FLAG_HUGETLB | uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
        assert_eq!(
            errno_of(h.create_guest_memfd(vm, 2 << 20, flags, 9)),
            errno::EINVAL
        );
    }

    #[test]
    fn first_mapping_removes_free_restores() {
        let (mut h, vm, f) = secret_guest();
        // fallocate alone leaves the pages in the direct map.
        h.gmem_fallocate(f, uapi::FALLOC_FL_KEEP_SIZE, 0, 4 * PAGE_SIZE)
            .unwrap();
        assert_eq!(h.stats(vm).direct_map_removals, 0);
        // Each guest fault removes its page with one flush; the first splits the block.
        for i in 0..3 {
            h.guest_access(vm, i * PAGE_SIZE, false, Some(i + 1))
                .unwrap();
        }
        let s = h.stats(vm);
        assert_eq!(
            (
                s.direct_map_removals,
                s.direct_map_flushes,
                s.direct_map_splits
            ),
            (3, 3, 1)
        );
        // Mapped again (the stage-2 entry exists, or a host fault): nothing more.
        h.guest_access(vm, 0, false, None).unwrap();
        let m = h.gmem_mmap(f, 0, None, true).unwrap();
        assert_eq!(h.map_access(m, 0, HostOp::Read).unwrap(), 1);
        assert_eq!(h.stats(vm).direct_map_flushes, 3);
        // A host fault on a page only allocated removes it too.
        h.map_access(m, 3 * PAGE_SIZE, HostOp::Write(9)).unwrap();
        assert_eq!(h.stats(vm).direct_map_removals, 4);
        let pfn = h.file(f).page(0).unwrap().pfn;
        assert!(!h.frame_in_direct_map(pfn));
        h.check().unwrap();
        // Punching frees and restores without a flush; the block stays split.
        h.map_unmap(m).unwrap();
        h.gmem_fallocate(
            f,
            uapi::FALLOC_FL_KEEP_SIZE | uapi::FALLOC_FL_PUNCH_HOLE,
            0,
            4 * PAGE_SIZE,
        )
        .unwrap();
        let s = h.stats(vm);
        assert_eq!((s.direct_map_restores, s.direct_map_flushes), (4, 4));
        assert!(h.frame_in_direct_map(pfn));
        assert_eq!(h.direct_map_split_blocks(), 1);
        let c = h.costs();
        let want = 4 * (c.direct_map_remove + c.direct_map_flush + c.direct_map_restore)
            + c.direct_map_split;
        assert!(s.modelled_ns >= want);
        h.check().unwrap();
    }

    #[test]
    fn without_the_flag_nothing_leaves() {
        let mut h = Host::new(16 << 20).unwrap();
        let vm = h.create_vm(VmType::Default, StrategyKind::Dual);
        let flags = uapi::GUEST_MEMFD_FLAG_MMAP | uapi::GUEST_MEMFD_FLAG_INIT_SHARED;
        let f = h.create_guest_memfd(vm, 1 << 20, flags, 0).unwrap();
        h.bind_at_zero(vm, f, 1 << 20);
        h.guest_access(vm, 0, false, Some(1)).unwrap();
        let s = h.stats(vm);
        assert_eq!(s.direct_map_removals + s.direct_map_flushes, 0);
    }

    #[test]
    fn pin_is_efault_reads_and_writes_work() {
        let (mut h, vm, f) = secret_guest();
        let m = h.gmem_mmap(f, 0, None, true).unwrap();
        h.map_access(m, 0, HostOp::Write(5)).unwrap();
        assert_eq!(h.guest_access(vm, 0, false, None).unwrap(), 5);
        assert_eq!(errno_of(h.map_access(m, 0, HostOp::Pin)), errno::EFAULT);
        assert_eq!(
            errno_of(h.host_gfn_access(vm, 1, HostOp::Pin)),
            errno::EFAULT
        );
        assert_eq!(h.host_gfn_access(vm, 0, HostOp::Read).unwrap(), 5);
    }

    #[test]
    fn populate_refuses_a_page_out_of_the_direct_map() {
        let mut h = Host::new(16 << 20).unwrap();
        let vm = h.create_vm(VmType::SwProtected, StrategyKind::Dual);
        let f = h
            .create_guest_memfd(vm, 1 << 20, uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP, 0)
            .unwrap();
        h.bind_at_zero(vm, f, 1 << 20);
        let p = uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;
        h.set_memory_attributes(vm, 0, 1 << 20, p, 0).unwrap();
        // Still in the direct map: populated, then removed at the first mapping.
        assert_eq!(h.populate(vm, 0, PAGE_SIZE, 4).unwrap(), 1);
        assert_eq!(h.stats(vm).direct_map_removals, 0);
        assert_eq!(h.guest_access(vm, 0, true, None).unwrap(), 4);
        assert_eq!(h.stats(vm).direct_map_removals, 1);
        assert_eq!(errno_of(h.populate(vm, 0, PAGE_SIZE, 4)), errno::EFAULT);
        h.check().unwrap();
    }

    #[test]
    fn release_restores_every_page() {
        let (mut h, vm, f) = secret_guest();
        for i in 0..8 {
            h.guest_access(vm, i * PAGE_SIZE, false, Some(1)).unwrap();
        }
        h.gmem_close(f).unwrap();
        let s = h.stats(vm);
        assert_eq!((s.direct_map_removals, s.direct_map_restores), (8, 8));
        h.check().unwrap();
    }
}
