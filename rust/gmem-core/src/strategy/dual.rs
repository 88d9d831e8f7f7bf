//! `dual`: private memory from guest_memfd, shared memory from the memslot's userspace
//! address (mainline TDX/SNP). KVM never discards the side no longer used: the VMM does,
//! with `fallocate(PUNCH_HOLE)` or `madvise(MADV_DONTNEED)` ([`Host::discard_shared`]). A
//! HugeTLB private folio splits when one of its pages turns shared and merges back once
//! its whole range is private again (`two_sided.rs`). The host maps a guest_memfd only
//! where mainline lets it: files created `INIT_SHARED`. A file created with `MMAP` makes
//! its memslots guest_memfd-only (`KVM_MEMSLOT_GMEM_ONLY`): their shared view is then the
//! file itself ([`Host::shared_file_page`]).

use super::{SharedSide, Strategy};
use crate::convert::Parts;
use crate::host::Host;

pub struct Dual;

impl Strategy for Dual {
    const NAME: &'static str = "dual";
    const SHARED_SIDE: SharedSide = SharedSide::Userspace;

    #[inline]
    fn after_convert(h: &mut Host, private: bool, parts: &Parts) {
        let Parts { vm, start, end, .. } = *parts;
        // The page changes under the guest: where the platform promises in-place content,
        // each page with content the other side does not hold is a broken promise.
        h.count_lost_content(vm, start, end, private, true);
        h.huge_private_side(vm, start, end, private);
    }
}
