//! The in-place backing work that `inplace` and `attr_hook` share: the page stays where
//! it is; a conversion changes who may reach it.

use crate::host::Host;
use crate::vm::MergePolicy;

impl Host {
    /// In-place work for `inplace` and `attr_hook` over every bound part.
    pub(crate) fn convert_same_page(&mut self, vm: usize, start: u64, end: u64, private: bool) {
        for p in self.bound_parts(vm, start, end) {
            self.same_page_work(vm, p.file, p.o0, p.o1(), private);
        }
    }

    /// The page stays; what changes is who may reach it. To private: unmap it from the
    /// host, scrub where the platform re-keys, merge huge folios that became wholly
    /// private. To shared: split huge folios, scrub, return SNP frames to the hypervisor.
    pub(crate) fn same_page_work(&mut self, vm: usize, f: usize, o0: u64, o1: u64, private: bool) {
        let vt = self.vms[vm].vm_type;
        if private {
            self.unmap_file_range(f, o0, o1);
        } else {
            self.split_range(vm, f, o0, o1);
        }
        if !vt.keeps_content() {
            self.scrub(vm, f, o0, o1);
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

    /// Clear the present pages of `[o0, o1)` (TDX/SNP conversion re-keys the page).
    fn scrub(&mut self, vm: usize, f: usize, o0: u64, o1: u64) {
        let offs = self.present_offsets(f, o0, o1);
        for off in offs {
            let r = self.files[f].page(off).expect("present");
            if r.uptodate {
                self.zero_file_pages(Some(vm), f, off, r.pfn, 0);
            }
        }
    }
}
