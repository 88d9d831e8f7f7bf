//! Proptest strategies shared by the property tests over a whole `Host` (not by the fuzz
//! target, which builds its input from raw bytes).

use crate::common::{MAX_PAGES, VmSpec};
use gmem_core::vm::{FaultPolicy, MergePolicy, Options, ZeroPolicy};
use proptest::prelude::*;

/// A VM of the standard layout (`common::build`) with random size, folios and options.
pub fn vm_spec() -> impl Strategy<Value = VmSpec> {
    let opts = (
        prop_oneof![3 => Just(FaultPolicy::Exit), 1 => Just(FaultPolicy::Convert)],
        prop_oneof![Just(MergePolicy::Eager), Just(MergePolicy::Deferred)],
        prop_oneof![
            3 => Just(ZeroPolicy::OnUse),
            1 => Just(ZeroPolicy::OnFree),
            1 => Just(ZeroPolicy::Never)
        ],
    )
        .prop_map(|(fault, merge, zero)| Options { fault, merge, zero });
    (
        1u64..=MAX_PAGES,
        prop::bool::weighted(0.25),
        any::<bool>(),
        prop::bool::weighted(0.25),
        opts,
    )
        .prop_map(|(pages, huge, mmap, plain_slot, opts)| VmSpec {
            pages,
            huge,
            mmap,
            plain_slot,
            opts,
        })
}
