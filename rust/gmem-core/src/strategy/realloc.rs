//! `realloc`: one guest_memfd; each conversion frees the pages at the converted offsets
//! and the next access allocates fresh zeroed ones (Sean's "PUNCH_HOLE + realloc" in the
//! v13 review). Never double-backed; every conversion pays free + allocate + zero;
//! content is lost. The host may map a page while the gfn bound there is shared.

use super::{SharedSide, Strategy, shared_by_bound_gfn};
use crate::convert::Parts;
use crate::host::Host;

pub struct Realloc;

impl Strategy for Realloc {
    const NAME: &'static str = "realloc";
    const REACH_BY_BINDING: bool = true;
    const SHARED_SIDE: SharedSide = SharedSide::SameFile;
    const FREES_ON_CONVERT: bool = true;

    #[inline]
    fn after_convert(h: &mut Host, private: bool, parts: &Parts) {
        let Parts { vm, start, end, .. } = *parts;
        // The side entered is a fresh page: any content of the side left is lost.
        h.count_lost_content(vm, start, end, private, false);
        h.free_gfn_range(parts);
    }

    fn host_may_map(h: &Host, file: usize, off: u64) -> bool {
        shared_by_bound_gfn(h, file, off)
    }
}

impl Host {
    /// Free the pages behind the converted gfns; the next access allocates anew.
    pub(crate) fn free_gfn_range(&mut self, parts: &Parts) {
        for p in parts.get(self) {
            self.punch(p.file, p.o0, p.o1());
        }
    }
}
