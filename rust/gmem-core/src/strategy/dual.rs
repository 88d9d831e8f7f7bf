//! `dual`: private memory from guest_memfd, shared memory from the memslot's userspace
//! address (mainline TDX/SNP). KVM never discards the side no longer used: the VMM does,
//! with `fallocate(PUNCH_HOLE)` or `madvise(MADV_DONTNEED)`. A HugeTLB private folio
//! splits when one of its pages turns shared and merges back once its whole range is
//! private again.

use super::{SharedSide, Strategy};
use crate::host::Host;

pub struct Dual;

impl Strategy for Dual {
    fn name(&self) -> &'static str {
        "dual"
    }

    fn shared_side(&self) -> SharedSide {
        SharedSide::Userspace
    }

    fn after_convert(&self, host: &mut Host, vm: usize, start: u64, end: u64, private: bool) {
        // The page changes under the guest: where the platform promises in-place content,
        // each page with content the other side does not hold is a broken promise.
        host.count_lost_content(vm, start, end, private);
        host.huge_private_side(vm, start, end, private);
    }
}
