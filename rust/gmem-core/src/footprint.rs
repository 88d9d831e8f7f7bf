//! Footprint and double-backing accounting: how many host pages back each VM (its
//! guest_memfd pages and the anonymous pages its memslots point at, each once), and how
//! many of its gfns are backed twice (a private page and a distinct shared one).

use crate::PAGE_SHIFT;
use crate::host::Host;
use crate::mapping::MapKind;
use crate::memslot::Memslot;

impl Host {
    /// Anonymous pages (and pinned orphans) of the VMM's mappings in `[a0, a1)`.
    pub(crate) fn anon_pages_in(&self, a0: u64, a1: u64) -> u64 {
        let mut n = 0;
        for (m, i0, i1) in self.maps_in(a0, a1) {
            if let MapKind::Anon { pages, orphans, .. } = &self.space.maps[m].kind {
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

    /// VMs whose memslots point at anonymous page `idx` of mapping `m` (each VM once): the
    /// page counts into their footprint. Slots of same-page strategies point nowhere that
    /// the guest uses, so they do not count.
    pub(crate) fn anon_vms(&self, m: usize, idx: u64) -> Vec<usize> {
        let hva = self.space.maps[m].addr + (idx << PAGE_SHIFT);
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
                s.allocated(1, ca);
            } else {
                s.freed(1, cf);
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
                if let MapKind::Anon { pages, orphans, .. } = &self.space.maps[m].kind {
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

    /// Whether a shared page distinct from the private one is allocated for `gfn`.
    pub(crate) fn shared_page_present(&self, vm: usize, slot: &Memslot, gfn: u64) -> bool {
        if self.slot_shared_in_userspace(vm, slot) {
            return self
                .mapping_at(slot.hva_of(gfn))
                .is_some_and(|(m, idx)| self.space.maps[m].anon_pfn(idx).is_some());
        }
        self.vms[vm].strategy.binds_second_range()
            && slot
                .shared_offset_of(gfn)
                .is_some_and(|p| p.live && self.files[p.file].page(p.off).is_some())
    }

    /// Shared pages distinct from the private ones allocated for the gfns `[g0, g1)` of
    /// `slot` (what [`Host::shared_page_present`] says of each), counted per mapping or
    /// file range: O(chunks), not O(pages).
    pub(crate) fn shared_pages_present_in(
        &self,
        vm: usize,
        slot: &Memslot,
        g0: u64,
        g1: u64,
    ) -> u64 {
        if self.slot_shared_in_userspace(vm, slot) {
            return self
                .maps_in(slot.hva_of(g0), slot.hva_of(g1))
                .map(|(m, i0, i1)| match &self.space.maps[m].kind {
                    MapKind::Anon { pages, .. } => pages.count_in(i0, i1),
                    MapKind::Gmem { .. } => 0,
                })
                .sum();
        }
        if !self.vms[vm].strategy.binds_second_range() {
            return 0;
        }
        match slot.shared_offset_of(g0) {
            Some(p) if p.live => self.files[p.file].present_count(p.off, p.off + (g1 - g0)),
            _ => 0,
        }
    }

    /// Private pages allocated for the gfns `[g0, g1)` of `slot`.
    fn private_pages_present_in(&self, slot: &Memslot, g0: u64, g1: u64) -> u64 {
        match slot.offset_of(g0) {
            Some(p) if p.live => self.files[p.file].present_count(p.off, p.off + (g1 - g0)),
            _ => 0,
        }
    }

    /// After allocating (or before freeing) file pages `[start, end)`, adjust the VMs'
    /// double-backing counts for the gfns bound there: per run of present pages.
    pub(crate) fn double_update_file(&mut self, file: usize, start: u64, end: u64, alloc: bool) {
        // A guest_memfd binds only to memslots of its own VM (`kvm_gmem_bind()`), whose
        // design says whether anything can be double-backed.
        if !self.vms[self.files[file].vm].strategy.may_double_back() {
            return;
        }
        for (bs, b) in self.files[file].bindings_in(start, end) {
            let vm = b.vm;
            debug_assert_eq!(vm, self.files[file].vm, "a binding of another VM");
            let slot = self.vms[vm].slots[&b.slot].clone();
            let (o0, o1) = (start.max(bs), end.min(b.end));
            let mut n = 0u64;
            if o1 - o0 == 1 {
                // One page (a single-page conversion): a lookup per side, no run walk.
                if self.files[file].page(o0).is_some() {
                    let gfn = slot.base_gfn + (o0 - bs);
                    n = u64::from(if b.shared_side {
                        slot.offset_of(gfn)
                            .is_some_and(|p| p.live && self.files[p.file].page(p.off).is_some())
                    } else {
                        self.shared_page_present(vm, &slot, gfn)
                    });
                }
            } else {
                for (r0, r1) in self.files[file].present_runs(o0, o1) {
                    let (g0, g1) = (slot.base_gfn + (r0 - bs), slot.base_gfn + (r1 - bs));
                    n += if b.shared_side {
                        self.private_pages_present_in(&slot, g0, g1)
                    } else {
                        self.shared_pages_present_in(vm, &slot, g0, g1)
                    };
                }
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
        let hva = self.space.maps[m].addr + (idx << PAGE_SHIFT);
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
                    .is_some_and(|p| p.live && self.files[p.file].page(p.off).is_some());
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
    pub(crate) fn bindings_changed(&mut self, vm: usize) {
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
        if !v.strategy.may_double_back() {
            return 0;
        }
        v.slots
            .values()
            .map(|slot| self.slot_double(vm, slot))
            .sum()
    }

    /// Pages of `slot` backed twice (its private page and a distinct shared one).
    pub(crate) fn slot_double(&self, vm: usize, slot: &Memslot) -> u64 {
        if !self.vms[vm].strategy.may_double_back() {
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
}
