//! `realloc`: one guest_memfd; each conversion frees the pages at the converted offsets
//! and the next access allocates fresh zeroed ones (Sean's "PUNCH_HOLE + realloc" in the
//! v13 review). Never double-backed; every conversion pays free + allocate + zero;
//! content is lost.

use super::{SharedSide, Strategy};
use crate::host::Host;

pub struct Realloc;

impl Strategy for Realloc {
    fn name(&self) -> &'static str {
        "realloc"
    }

    fn shared_side(&self) -> SharedSide {
        SharedSide::SameFile
    }

    fn after_convert(&self, host: &mut Host, vm: usize, start: u64, end: u64, private: bool) {
        host.count_lost_content(vm, start, end, private);
        host.free_gfn_range(vm, start, end);
    }
}
