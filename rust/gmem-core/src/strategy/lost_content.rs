//! pKVM's content promise: a page the guest shares or unshares keeps its content. The
//! designs that move a gfn between two pages (`dual`, `two_offsets`) or free it on every
//! conversion (`realloc`) count each page whose content the conversion loses.

use crate::PAGE_SHIFT;
use crate::host::{Host, Loc};
use crate::mapping::MapKind;
use crate::memslot::{FilePage, Memslot};
use crate::strategy::SharedSide;

impl Host {
    /// Where the platform promises in-place content (pKVM), count each page whose content
    /// the conversion loses: the side the guest leaves held data the side it enters lacks
    /// (or `!new_side_kept`: the side entered is a fresh page).
    // A flag test on every conversion: left to the inliner it can become a call.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(crate) fn count_lost_content(
        &mut self,
        vm: usize,
        start: u64,
        end: u64,
        private: bool,
        new_side_kept: bool,
    ) {
        if self.vms[vm].vm_type.promises_content() {
            self.count_lost_content_promised(vm, start, end, private, new_side_kept);
        }
    }

    fn count_lost_content_promised(
        &mut self,
        vm: usize,
        start: u64,
        end: u64,
        private: bool,
        new_side_kept: bool,
    ) {
        let mut lost = 0;
        for id in self.vms[vm].slots_in(start, end) {
            let slot = self.vms[vm].slots[&id].clone();
            let (g0, g1) = (start.max(slot.base_gfn), end.min(slot.end_gfn()));
            for gfn in self.old_side_gfns(vm, &slot, g0, g1, private) {
                let old = self.side_loc(vm, &slot, gfn, !private);
                let new = if new_side_kept {
                    self.side_loc(vm, &slot, gfn, private)
                } else {
                    None
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
            let map = &self.space.maps[m];
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
            return self.space.maps[m].anon_pfn(idx).map(Loc::Frame);
        };
        let FilePage { file: f, off, live } = fp?;
        if !live {
            return None;
        }
        self.files[f].page(off).map(|_| Loc::File(f, off))
    }
}
