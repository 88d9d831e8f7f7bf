//! The conversion path shared by every strategy, and the backing work strategies call.

use smallvec::SmallVec;

use crate::error::{Error, Result, einval, err, errno};
use crate::host::{Host, Loc};
use crate::mapping::MapKind;
use crate::memslot::Memslot;
use crate::strategy::{SharedSide, StrategyKind};
use crate::vm::MergePolicy;
use crate::{PAGE_SHIFT, PAGE_SIZE, uapi};

/// A gfn range of one memslot and the private-side file range behind it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BoundPart {
    pub g0: u64,
    pub g1: u64,
    pub file: usize,
    pub o0: u64,
}

impl BoundPart {
    pub fn o1(&self) -> u64 {
        self.o0 + (self.g1 - self.g0)
    }
}

impl Host {
    /// The live private-side bindings covering `[start, end)`, in gfn order.
    pub(crate) fn bound_parts(&self, vm: usize, start: u64, end: u64) -> SmallVec<[BoundPart; 2]> {
        let v = &self.vms[vm];
        v.slots_in(start, end)
            .into_iter()
            .filter_map(|id| {
                let s = &v.slots[&id];
                let b = s.gmem?;
                if !b.live {
                    return None;
                }
                let (g0, g1) = (start.max(s.base_gfn), end.min(s.end_gfn()));
                Some(BoundPart {
                    g0,
                    g1,
                    file: b.file,
                    o0: b.pgoff + (g0 - s.base_gfn),
                })
            })
            .collect()
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES`: checks in the order of mainline
    /// `kvm_vm_ioctl_set_mem_attributes()`, then an all-or-nothing conversion.
    pub fn set_memory_attributes(
        &mut self,
        vm: usize,
        address: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> Result<()> {
        if flags != 0 {
            return Err(einval(format!("flags {flags:#x} must be 0")));
        }
        if attributes & !self.supported_memory_attributes(vm) != 0 {
            return Err(einval(format!(
                "unsupported attributes {attributes:#x} (supported: {:#x})",
                self.supported_memory_attributes(vm)
            )));
        }
        if size == 0 || address.checked_add(size).is_none() {
            return Err(einval(format!(
                "range {address:#x}+{size:#x} is empty or wraps"
            )));
        }
        if !address.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "range {address:#x}+{size:#x} not page aligned"
            )));
        }
        let (start, end) = (address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT);
        if self.vms[vm].strategy == StrategyKind::Inplace {
            // In-place mode (v13): the VM's array no longer tracks PRIVATE (the supported
            // mask is empty, so only 0 gets here) and the guest_memfd ioctl converts; 0
            // stores 0 in the VM's own array, which never holds anything else.
            self.vms[vm].attrs.set(start, end, 0);
            return Ok(());
        }
        self.convert(vm, start, end, attributes != 0)
    }

    /// Convert gfns `[start, end)` of `vm`.
    pub fn convert(&mut self, vm: usize, start: u64, end: u64, private: bool) -> Result<()> {
        let value = if private {
            uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        };
        let strategy = self.vms[vm].strategy;
        let parts = if strategy.file_attrs() {
            self.bound_parts(vm, start, end)
        } else {
            SmallVec::new()
        };
        if parts.is_empty() && !strategy.has_gate() {
            // One walk stores the value and says whether anything changed.
            let changed = self.vms[vm].attrs.set_count(start, end, value);
            if changed == 0 {
                return Ok(());
            }
            return self.finish_convert(vm, start, end, private, changed);
        }
        // The VM map holds what no bound file holds: the gaps between bound parts. In
        // in-place mode a conversion is the guest_memfd ioctl on the bound files: the gaps
        // keep no attribute.
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        let mut at = start;
        if strategy != StrategyKind::Inplace {
            for p in &parts {
                if p.g0 > at {
                    gaps.push((at, p.g0));
                }
                at = p.g1;
            }
            if at < end {
                gaps.push((at, end));
            }
        }
        // kvm_range_has_memory_attributes(): nothing to do when the range already holds the
        // value.
        let unchanged = gaps
            .iter()
            .all(|&(a, b)| self.vms[vm].attrs.uniform(a, b) == Some(value))
            && parts.iter().all(|p| {
                let a = self.files[p.file].attrs.as_ref().expect("file attrs");
                a.uniform(p.o0, p.o1()) == Some(value)
            });
        if unchanged {
            return Ok(());
        }
        strategy.imp().gate(self, vm, start, end, private)?;
        let mut changed = 0;
        for &(a, b) in &gaps {
            changed += self.vms[vm].attrs.set_count(a, b, value);
        }
        for p in &parts {
            self.scrub_changing(vm, p.file, p.o0, p.o1(), value);
            let f = self.files[p.file].attrs.as_mut().expect("file attrs");
            changed += f.set_count(p.o0, p.o1(), value);
        }
        self.finish_convert(vm, start, end, private, changed)
    }

    /// Zap stale mappings, do the strategy's backing work, count.
    fn finish_convert(
        &mut self,
        vm: usize,
        start: u64,
        end: u64,
        private: bool,
        changed: u64,
    ) -> Result<()> {
        let strategy = self.vms[vm].strategy;
        self.zap(vm, start, end, Some(!private));
        strategy.imp().after_convert(self, vm, start, end, private);
        let c = if strategy.file_attrs() {
            // The in-place series' maple tree: one range store.
            self.costs.attr_range
        } else {
            // Mainline: one xarray entry reserved and stored per gfn.
            self.costs.attr_per_gfn.saturating_mul(end - start)
        };
        let s = &mut self.vms[vm].stats;
        s.conversions += 1;
        s.converted_pages += changed;
        s.modelled_ns = s.modelled_ns.saturating_add(c);
        self.strict_check(vm)
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd (in-place series).
    pub fn set_memory_attributes2(
        &mut self,
        file: usize,
        offset: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> Result<()> {
        let f = &self.files[file];
        if f.fd.is_none() {
            return Err(err(errno::EBADF, "guest_memfd is closed"));
        }
        // Checks in the order of the in-place series v13 (KERNEL.md §7); whether in-place
        // mode is on comes last.
        if flags != 0 {
            return Err(einval(format!("flags {flags:#x} must be 0")));
        }
        if attributes & !uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            return Err(einval(format!("unsupported attributes {attributes:#x}")));
        }
        if size == 0 || offset.checked_add(size).is_none() {
            return Err(einval(format!(
                "range {offset:#x}+{size:#x} is empty or overflows"
            )));
        }
        if !offset.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "range {offset:#x}+{size:#x} not page aligned"
            )));
        }
        let isize = f.size_pages << PAGE_SHIFT;
        if offset >= isize || offset + size > isize {
            return Err(einval(format!(
                "range {offset:#x}+{size:#x} beyond file size {isize:#x}"
            )));
        }
        if self.vms[f.vm].strategy != StrategyKind::Inplace {
            return Err(err(
                errno::ENOTTY,
                "KVM_SET_MEMORY_ATTRIBUTES2 needs in-place conversion (strategy inplace)",
            ));
        }
        let (o0, o1) = (offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT);
        let private = attributes != 0;
        let vm = f.vm;
        let a = f.attrs.as_ref().expect("inplace files keep attributes");
        let changed = o1 - o0 - a.count(o0, o1, attributes);
        if changed == 0 {
            return Ok(());
        }
        if private {
            self.unmap_file_range(file, o0, o1);
            if let Some(&first) = self.files[file].pins_in(o0, o1).first() {
                self.vms[vm].stats.eagain += 1;
                return Err(Error::Busy {
                    error_offset: first << PAGE_SHIFT,
                });
            }
        }
        self.scrub_changing(vm, file, o0, o1, attributes);
        self.files[file]
            .attrs
            .as_mut()
            .expect("checked")
            .set(o0, o1, attributes);
        self.zap_bound_gfns(file, o0, o1, Some(!private));
        self.same_page_work(vm, file, o0, o1, private);
        let c = self.costs.attr_range;
        let s = &mut self.vms[vm].stats;
        s.conversions += 1;
        s.converted_pages += changed;
        s.modelled_ns += c;
        self.strict_check(vm)
    }

    pub fn get_memory_attributes2(&self, file: usize, offset: u64) -> Result<u64> {
        let f = &self.files[file];
        let Some(a) = &f.attrs else {
            return Err(err(
                errno::ENOTTY,
                "this guest_memfd keeps no per-offset attributes",
            ));
        };
        if !offset.is_multiple_of(PAGE_SIZE) || offset >= f.size_pages << PAGE_SHIFT {
            return Err(einval(format!(
                "offset {offset:#x} unaligned or beyond the file"
            )));
        }
        Ok(a.get(offset >> PAGE_SHIFT))
    }

    /// Zap stage-2 entries (of the given type) of gfns bound to file pages `[o0, o1)`.
    fn zap_bound_gfns(&mut self, file: usize, o0: u64, o1: u64, filter: Option<bool>) {
        let binds: Vec<(u64, crate::guest_memfd::FileBinding)> = self.files[file]
            .bindings
            .range(..o1)
            .filter(|(_, b)| b.end > o0)
            .map(|(s, b)| (*s, *b))
            .collect();
        for (bs, b) in binds {
            let base = self.vms[b.vm].slots[&b.slot].base_gfn;
            let (lo, hi) = (o0.max(bs), o1.min(b.end));
            self.zap(b.vm, base + (lo - bs), base + (hi - bs), filter);
        }
    }

    // ---------------------------------------------------------------- strategy work

    /// `inplace` gate: unmap the range from host page tables, then refuse with `EAGAIN` if
    /// a page is still referenced (pinned) — before any attribute changes.
    pub(crate) fn refuse_if_pinned(&mut self, vm: usize, start: u64, end: u64) -> Result<()> {
        let parts = self.bound_parts(vm, start, end);
        for p in &parts {
            self.unmap_file_range(p.file, p.o0, p.o1());
        }
        for p in &parts {
            if let Some(&first) = self.files[p.file].pins_in(p.o0, p.o1()).first() {
                self.vms[vm].stats.eagain += 1;
                let gfn = p.g0 + (first - p.o0);
                return Err(Error::Busy {
                    error_offset: gfn << PAGE_SHIFT,
                });
            }
        }
        Ok(())
    }

    /// `attr_hook`: a pin taken before the conversion survives it; each such page is a
    /// page the host still reaches while private.
    pub(crate) fn count_surviving_pins(&mut self, vm: usize, start: u64, end: u64) {
        let mut n = 0;
        for p in self.bound_parts(vm, start, end) {
            n += self.files[p.file].pins_in(p.o0, p.o1()).len() as u64;
        }
        self.vms[vm].stats.violations += n;
    }

    /// In-place work for `inplace` and `attr_hook` over every bound part.
    pub(crate) fn convert_same_page(&mut self, vm: usize, start: u64, end: u64, private: bool) {
        for p in self.bound_parts(vm, start, end) {
            self.same_page_work(vm, p.file, p.o0, p.o1(), private);
        }
    }

    /// The page stays; what changes is who may reach it. To private: unmap it from the
    /// host, merge huge folios that became wholly private. To shared: split huge folios,
    /// return SNP frames to the hypervisor. (Scrubbing happens before the attributes are
    /// stored, in `scrub_changing`, where the pages that change hands are still known.)
    pub(crate) fn same_page_work(&mut self, vm: usize, f: usize, o0: u64, o1: u64, private: bool) {
        if private {
            self.unmap_file_range(f, o0, o1);
        } else {
            self.split_range(vm, f, o0, o1);
        }
        if !private && !self.rmp.is_empty() {
            let mut n = 0;
            for off in self.present_offsets(f, o0, o1) {
                if let Some(r) = self.files[f].page(off) {
                    n += u64::from(self.rmp.remove(&r.pfn).is_some());
                }
            }
            let c = self.costs.rmpupdate * n;
            let s = &mut self.vms[vm].stats;
            s.rmpupdates += n;
            s.modelled_ns += c;
        }
        if private && self.vms[vm].opts.merge == MergePolicy::Eager {
            self.merge_range(f, o0, o1);
        }
    }

    /// Clear the present pages of `[o0, o1)` whose attribute is not yet `value`, where the
    /// platform re-keys a page that changes hands (TDX removes the private S-EPT leaves it
    /// had, SNP's invalidate skips pfns that are not assigned): a page already at the
    /// target attribute keeps its content. Runs before the attributes are stored.
    fn scrub_changing(&mut self, vm: usize, f: usize, o0: u64, o1: u64, value: u64) {
        if self.vms[vm].vm_type.keeps_content() {
            return;
        }
        let offs = self.present_offsets(f, o0, o1);
        for off in offs {
            let a = self.files[f].attrs.as_ref().expect("file attrs");
            if a.get(off) == value {
                continue;
            }
            let r = self.files[f].page(off).expect("present");
            if r.uptodate {
                self.zero_file_pages(Some(vm), f, off, r.pfn, 0);
            }
        }
    }

    /// Merge back split huge folios of `file` intersecting `[o0, o1)` whose whole range is
    /// private, zapping their small stage-2 mappings so the next fault maps them huge.
    /// Returns the number merged.
    pub(crate) fn merge_range(&mut self, f: usize, o0: u64, o1: u64) -> u64 {
        let file = &self.files[f];
        if file.order == 0 {
            return 0;
        }
        let n = file.folio_pages();
        let mut merged = 0;
        let mut h = o0 & !(n - 1);
        while h < o1 {
            let all_private = self.huge_range_private(f, h, n);
            let fresh = if all_private && self.files[f].pins_in(h, h + n).is_empty() {
                self.files[f].try_merge(h)
            } else {
                None
            };
            if let Some(fresh) = fresh {
                merged += 1;
                let vm = self.files[f].vm;
                let pfn0 = self.files[f].page(h).expect("merged").pfn;
                for p in fresh {
                    self.zero_file_pages(Some(vm), f, h + u64::from(p - pfn0), p, 0);
                }
                self.vms[vm].stats.merges += 1;
                let c = self.costs.merge;
                self.charge(vm, c);
                self.zap_bound_gfns(f, h, h + n, None);
            }
            h += n;
        }
        merged
    }

    /// Split the intact huge folios of `f` intersecting `[o0, o1)` (a page of them turns
    /// shared).
    pub(crate) fn split_range(&mut self, vm: usize, f: usize, o0: u64, o1: u64) {
        if self.files[f].order == 0 {
            return;
        }
        for (h, _) in self.files[f].folios_in(o0, o1) {
            if self.files[f].split(h) {
                self.vms[vm].stats.splits += 1;
                let c = self.costs.split;
                self.charge(vm, c);
            }
        }
    }

    /// Whether every page of the huge range `[h, h + n)` of `f` is private: by the file's
    /// own attributes where it keeps them, else by the attributes of the gfns bound there.
    fn huge_range_private(&self, f: usize, h: u64, n: u64) -> bool {
        let p = uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;
        let file = &self.files[f];
        if let Some(a) = &file.attrs {
            return a.uniform(h, h + n).is_some_and(|v| v & p != 0);
        }
        let Some((bs, b)) = file.binding_at(h) else {
            return false;
        };
        if b.shared_side || h + n > b.end {
            return false;
        }
        let g0 = self.vms[b.vm].slots[&b.slot].base_gfn + (h - bs);
        self.vms[b.vm]
            .attrs
            .uniform(g0, g0 + n)
            .is_some_and(|v| v & p != 0)
    }

    /// The HugeTLB work of a conversion on a two-backing strategy: the private folio of a
    /// page turning shared splits, and merges back once its whole range is private again
    /// (the VMM may then punch the shared gfns' private pages one by one).
    // A flag test on every conversion: left to the inliner it can become a call.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(crate) fn huge_private_side(&mut self, vm: usize, start: u64, end: u64, private: bool) {
        if self.vms[vm].huge_bound {
            self.huge_private_side_bound(vm, start, end, private);
        }
    }

    fn huge_private_side_bound(&mut self, vm: usize, start: u64, end: u64, private: bool) {
        for id in self.vms[vm].slots_in(start, end) {
            let slot = &self.vms[vm].slots[&id];
            let Some(b) = slot.gmem.filter(|b| b.live) else {
                continue;
            };
            if self.files[b.file].order == 0 {
                continue;
            }
            let (g0, g1) = (start.max(slot.base_gfn), end.min(slot.end_gfn()));
            let o0 = b.pgoff + (g0 - slot.base_gfn);
            let o1 = o0 + (g1 - g0);
            if !private {
                self.split_range(vm, b.file, o0, o1);
            } else if self.vms[vm].opts.merge == MergePolicy::Eager {
                self.merge_range(b.file, o0, o1);
            }
        }
    }

    /// A background pass merging every mergeable huge folio of the VM's files.
    pub fn merge_pass(&mut self, vm: usize) -> u64 {
        let files: Vec<usize> = (0..self.files.len())
            .filter(|&f| self.files[f].vm == vm && !self.files[f].released)
            .collect();
        files
            .into_iter()
            .map(|f| self.merge_range(f, 0, self.files[f].size_pages))
            .sum()
    }

    /// `realloc`: free the pages behind the converted gfns; the next access allocates anew.
    pub(crate) fn free_gfn_range(&mut self, vm: usize, start: u64, end: u64) {
        for p in self.bound_parts(vm, start, end) {
            self.punch(p.file, p.o0, p.o1());
        }
    }

    /// Where the platform promises in-place content (pKVM), count each page whose content
    /// the conversion loses: the side the guest leaves held data the side it enters lacks.
    // A flag test on every conversion: left to the inliner it can become a call.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(crate) fn count_lost_content(&mut self, vm: usize, start: u64, end: u64, private: bool) {
        if self.vms[vm].vm_type.promises_content() {
            self.count_lost_content_promised(vm, start, end, private);
        }
    }

    fn count_lost_content_promised(&mut self, vm: usize, start: u64, end: u64, private: bool) {
        let strategy = self.vms[vm].strategy;
        let mut lost = 0;
        for id in self.vms[vm].slots_in(start, end) {
            let slot = self.vms[vm].slots[&id].clone();
            let (g0, g1) = (start.max(slot.base_gfn), end.min(slot.end_gfn()));
            for gfn in self.old_side_gfns(vm, &slot, g0, g1, private) {
                let old = self.side_loc(vm, &slot, gfn, !private);
                let new = if strategy == StrategyKind::Realloc {
                    None
                } else {
                    self.side_loc(vm, &slot, gfn, private)
                };
                let Some(old) = old else { continue };
                let v = self.content_at(old);
                if v != 0 && new.map(|l| self.content_at(l)) != Some(v) {
                    lost += 1;
                }
            }
        }
        self.vms[vm].stats.violations += lost;
    }

    /// Gfns of `[g0, g1)` whose side being left (`!private`) has a page (in no particular
    /// order).
    fn old_side_gfns(
        &self,
        vm: usize,
        slot: &Memslot,
        g0: u64,
        g1: u64,
        private: bool,
    ) -> Vec<u64> {
        let file_side = if !private {
            slot.gmem
        } else if self.slot_shared_in_userspace(vm, slot) {
            None
        } else if self.vms[vm].strategy.shared_side() == SharedSide::SecondRange {
            slot.shared
        } else {
            slot.gmem
        };
        if let Some(b) = file_side {
            if !b.live {
                return Vec::new();
            }
            let o0 = b.pgoff + (g0 - slot.base_gfn);
            return self
                .present_offsets(b.file, o0, o0 + (g1 - g0))
                .into_iter()
                .map(|o| slot.base_gfn + (o - b.pgoff))
                .collect();
        }
        let (a0, a1) = (slot.hva_of(g0), slot.hva_of(g1));
        let mut out = Vec::new();
        for (m, i0, i1) in self.maps_in(a0, a1) {
            let map = &self.maps[m];
            if let MapKind::Anon { pages, .. } = &map.kind {
                for (idx, _) in pages.entries(i0, i1) {
                    let hva = map.addr + (idx << PAGE_SHIFT);
                    out.push(slot.base_gfn + ((hva - slot.userspace_addr) >> PAGE_SHIFT));
                }
            }
        }
        out
    }

    /// Where the content of the page backing `gfn` on the private or shared side lives,
    /// without faulting.
    fn side_loc(&self, vm: usize, slot: &Memslot, gfn: u64, private: bool) -> Option<Loc> {
        let fp = if private {
            slot.offset_of(gfn)
        } else if let Some(fp) = self.shared_file_page(vm, slot, gfn) {
            Some(fp)
        } else {
            let (m, idx) = self.mapping_at(slot.hva_of(gfn))?;
            return self.maps[m].anon_pfn(idx).map(Loc::Frame);
        };
        let (f, off, live) = fp?;
        if !live {
            return None;
        }
        self.files[f].page(off).map(|_| Loc::File(f, off))
    }
}
