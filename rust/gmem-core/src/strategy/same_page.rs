//! The in-place backing work that `inplace` and `attr_hook` share: the page stays where
//! it is; a conversion changes who may reach it.

use crate::convert::Parts;
use crate::host::Host;
use crate::vm::MergePolicy;

impl Host {
    /// The conversion's backing work over every bound part.
    #[allow(clippy::inline_always)] // once per conversion; left to the inliner it stays a call
    #[inline(always)]
    pub(crate) fn convert_same_page(&mut self, private: bool, parts: &Parts) {
        let vm = parts.vm;
        for p in parts.get(self) {
            self.same_page_work(vm, p.file, p.o0, p.o1(), private);
        }
    }

    /// The page stays; what changes is who may reach it. To private: unmap it from the
    /// host, merge huge folios that became wholly private. To shared: split huge folios,
    /// return SNP frames to the hypervisor. (Where the platform re-keys, the pages that
    /// change hands were scrubbed before the attributes were stored: `scrub_changing`.)
    #[allow(clippy::inline_always)] // once per conversion; left to the inliner it stays a call
    #[inline(always)]
    pub(crate) fn same_page_work(&mut self, vm: usize, f: usize, o0: u64, o1: u64, private: bool) {
        let vt = self.vms[vm].vm_type;
        if private {
            self.unmap_file_range(f, o0, o1);
        } else {
            self.split_range(vm, f, o0, o1);
        }
        // SNP frames turning shared return to the hypervisor.
        vt.convert_in_place(self, vm, f, o0, o1, private);
        if private && self.vms[vm].opts.merge == MergePolicy::Eager {
            self.merge_range(f, o0, o1);
        }
    }
}
