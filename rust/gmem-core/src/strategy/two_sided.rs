//! The private side's HugeTLB work that `dual` and `two_offsets` share: each gfn has a
//! private page and a distinct shared one, so only the private folio splits and merges.

use crate::host::Host;
use crate::vm::MergePolicy;

impl Host {
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
}
