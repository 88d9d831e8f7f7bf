//! The conversion path shared by every strategy, and the backing work strategies call.

use std::cell::OnceCell;

use smallvec::SmallVec;

use crate::error::{Result, einval};
use crate::guest_memfd::Zap;
use crate::host::Host;
use crate::memslot::Memslot;
use crate::strategy::Strategy;
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

/// The bound parts of one conversion's range ([`Host::bound_parts`]), found once and
/// shared by the conversion's steps (the check, the gate, the backing work): `convert`
/// hands over the parts it found, and a step that needs them when it did not finds them
/// on first use. Memslots do not change during a conversion.
pub(crate) struct Parts {
    pub vm: usize,
    pub start: u64,
    pub end: u64,
    found: OnceCell<SmallVec<[BoundPart; 2]>>,
}

impl Parts {
    /// The parts of `[start, end)` of `vm`, not found yet.
    pub fn new(vm: usize, start: u64, end: u64) -> Self {
        Self {
            vm,
            start,
            end,
            found: OnceCell::new(),
        }
    }

    /// The parts of the one page `gfn` of `vm`, already known: `part`, or none.
    pub fn page(vm: usize, gfn: u64, part: Option<BoundPart>) -> Self {
        let found = match part {
            Some(p) => SmallVec::from_buf_and_len([p; 2], 1),
            None => SmallVec::new(),
        };
        Self {
            vm,
            start: gfn,
            end: gfn + 1,
            found: OnceCell::from(found),
        }
    }

    /// Find the parts now, in `h`.
    pub fn find(&self, h: &Host) {
        self.get(h);
    }

    /// The parts found so far: all of them once found, else none.
    pub fn known(&self) -> &[BoundPart] {
        self.found.get().map_or(&[], |p| p)
    }

    /// The parts, found in `h` on first use.
    pub fn get(&self, h: &Host) -> &[BoundPart] {
        self.found
            .get_or_init(|| h.bound_parts(self.vm, self.start, self.end))
    }
}

impl Host {
    /// The live private-side bindings covering `[start, end)`, in gfn order.
    pub(crate) fn bound_parts(&self, vm: usize, start: u64, end: u64) -> SmallVec<[BoundPart; 2]> {
        let v = &self.vms[vm];
        let part = |s: &Memslot| {
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
        };
        // The usual case, a range inside one memslot: one lookup.
        if let Some(s) = v.slot_at(start)
            && end <= s.end_gfn()
        {
            let mut one = SmallVec::new();
            if let Some(p) = part(s) {
                one.push(p);
            }
            return one;
        }
        v.slots_in(start, end)
            .into_iter()
            .filter_map(|id| part(&v.slots[&id]))
            .collect()
    }

    /// Remove from the host's page tables every file page of `parts`.
    pub(crate) fn unmap_parts(&mut self, parts: &[BoundPart]) {
        for p in parts {
            self.unmap_file_range(p.file, p.o0, p.o1());
        }
    }

    /// Whether `gfn` is private, as an attribute value.
    pub fn get_memory_attributes(&self, vm: usize, gfn: u64) -> u64 {
        if self.gfn_private(vm, gfn) {
            uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        }
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
        // `kvm_supported_mem_attributes()`: nothing on a VM without private memory.
        let supported = if self.vms[vm].vm_type.has_private_mem() {
            self.vms[vm].strategy.vm_attributes()
        } else {
            0
        };
        if attributes & !supported != 0 {
            return Err(einval(format!(
                "unsupported attributes {attributes:#x} (supported: {supported:#x})"
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
        if self.vms[vm].strategy.in_place_mode() {
            // In-place mode (v13): the VM's array no longer tracks PRIVATE (the supported
            // mask is empty, so only 0 gets here) and the guest_memfd ioctl converts; 0
            // stores 0 in the VM's own array, which never holds anything else.
            self.vms[vm].attrs.set(start, end, 0);
            return Ok(());
        }
        self.convert(vm, start, end, attributes != 0)
    }

    /// Convert gfns `[start, end)` of `vm`. On a VM without private memory every gfn is
    /// shared: converting to shared changes nothing, to private is `EINVAL` (PRIVATE is
    /// not a supported attribute there).
    pub fn convert(&mut self, vm: usize, start: u64, end: u64, private: bool) -> Result<()> {
        self.convert_parts(&Parts::new(vm, start, end), private)
    }

    /// [`Host::convert`] of the range of `parts`, whose bound parts a caller (a batch
    /// converting one page) may have found already ([`Parts::page`]).
    #[inline]
    pub(crate) fn convert_parts(&mut self, parts: &Parts, private: bool) -> Result<()> {
        let vm = parts.vm;
        if !self.vms[vm].vm_type.has_private_mem() {
            if private {
                return Err(einval(format!(
                    "{} VMs have no private memory: PRIVATE is not a supported attribute",
                    self.vms[vm].vm_type.name()
                )));
            }
            return Ok(());
        }
        // One dispatch on the design: its steps and constants below are known at compile
        // time.
        let strategy = self.vms[vm].strategy;
        strategy.convert(self, parts, private)
    }

    /// [`Host::convert_parts`] on a VM with private memory, for design `D`.
    pub(crate) fn convert_as<D: Strategy>(&mut self, parts: &Parts, private: bool) -> Result<()> {
        let Parts { vm, start, end, .. } = *parts;
        let value = if private {
            uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        };
        // Designs with file attributes store them through the bound parts; the others find
        // them later only if a step asks (`Parts`).
        if D::FILE_ATTRS {
            parts.find(self);
        }
        // Only designs with file attributes store through the bound parts (a batch may
        // have handed them over for the others' backing work).
        let known = if D::FILE_ATTRS { parts.known() } else { &[] };
        if known.is_empty() && !D::HAS_GATE {
            // One walk stores the value and says whether anything changed.
            let changed = self.vms[vm].attrs.set_count(start, end, value);
            if changed == 0 {
                return Ok(());
            }
            self.finish_convert::<D>(private, changed, parts);
            return Ok(());
        }
        if let [p] = known
            && end - start == 1
        {
            // One page of one bound file (a random single-page conversion): its attribute
            // is one bit, and if it changes, the page changes hands.
            if D::gate_may_refuse(private) {
                // The gate refuses before anything changes: ask the bit first.
                let a = self.files[p.file].attrs.as_ref().expect("file attrs");
                if a.get(p.o0) == value {
                    return Ok(());
                }
                D::gate(self, private, parts)?;
            }
            // Test and store in one step (one word of a mixed leaf).
            let a = self.files[p.file].attrs.as_mut().expect("file attrs");
            let changed = match a.set_one(p.o0, value) {
                Some(changed) => u64::from(changed),
                None => a.set_count(p.o0, p.o0 + 1, value),
            };
            if changed == 0 {
                return Ok(());
            }
            self.scrub_changing_page(vm, p.file, p.o0);
            self.finish_convert::<D>(private, changed, parts);
            return Ok(());
        }
        // The VM map holds what no bound file holds: the gaps between bound parts. In
        // in-place mode a conversion is the guest_memfd ioctl on the bound files: the gaps
        // keep no attribute.
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        if D::GMEM_ATTRIBUTES == 0 {
            let mut at = start;
            for p in known {
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
            && known.iter().all(|p| {
                let a = self.files[p.file].attrs.as_ref().expect("file attrs");
                a.uniform(p.o0, p.o1()) == Some(value)
            });
        if unchanged {
            return Ok(());
        }
        D::gate(self, private, parts)?;
        let mut changed = 0;
        for &(a, b) in &gaps {
            changed += self.vms[vm].attrs.set_count(a, b, value);
        }
        for p in known {
            self.scrub_changing(vm, p.file, p.o0, p.o1(), value);
            let f = self.files[p.file].attrs.as_mut().expect("file attrs");
            changed += f.set_count(p.o0, p.o1(), value);
        }
        self.finish_convert::<D>(private, changed, parts);
        Ok(())
    }

    /// Zap stale mappings, do the strategy's backing work, count.
    #[allow(clippy::inline_always)] // once per conversion; left to the inliner it stays a call
    #[inline(always)]
    fn finish_convert<D: Strategy>(&mut self, private: bool, changed: u64, parts: &Parts) {
        let Parts { vm, start, end, .. } = *parts;
        self.zap(vm, start, end, Some(!private));
        D::after_convert(self, private, parts);
        let c = if D::FILE_ATTRS {
            // The in-place series' maple tree: one range store.
            self.costs.attr_range
        } else {
            // Mainline: one xarray entry reserved and stored per gfn.
            self.costs.attr_per_gfn.saturating_mul(end - start)
        };
        self.vms[vm].stats.converted(changed, c);
    }

    // ---------------------------------------------------------------- huge folios

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
            // A hwpoisoned page never joins a folio again.
            let fresh = if all_private
                && self.files[f].pins_in(h, h + n).is_empty()
                && !self.file_range_poisoned(f, h, h + n)
            {
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
                let c = self.costs.merge;
                self.vms[vm].stats.merged(c);
                self.gmem_invalidate(f, h, h + n, Zap::Only(None));
            }
            h += n;
        }
        merged
    }

    /// Split the intact huge folios of `f` intersecting `[o0, o1)` (a page of them turns
    /// shared).
    #[inline]
    pub(crate) fn split_range(&mut self, vm: usize, f: usize, o0: u64, o1: u64) {
        if self.files[f].order != 0 {
            self.split_folios(vm, f, o0, o1);
        }
    }

    /// [`Host::split_range`] on a file of huge folios (out of line: a file of small pages
    /// asks one compare of the conversion).
    #[inline(never)]
    fn split_folios(&mut self, vm: usize, f: usize, o0: u64, o1: u64) {
        for (h, _) in self.files[f].folios_in(o0, o1) {
            if self.files[f].split(h) {
                let c = self.costs.split;
                self.vms[vm].stats.split(c);
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
}
