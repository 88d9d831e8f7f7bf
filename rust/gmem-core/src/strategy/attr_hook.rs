//! `attr_hook`: `KVM_SET_MEMORY_ATTRIBUTES` calls into guest_memfd, which stores the
//! attribute per offset and zaps host mappings of the now-private range (Paolo's proposal
//! in the v13 review). One gfn per offset is enforced at binding. There is no refcount
//! gate: a pin taken before the conversion survives it, and the model counts each such
//! page as a violation — the host still reaches a private page.

use super::{SharedSide, Strategy};
use crate::host::Host;

pub struct AttrHook;

impl Strategy for AttrHook {
    fn name(&self) -> &'static str {
        "attr_hook"
    }

    fn shared_side(&self) -> SharedSide {
        SharedSide::SameFile
    }

    fn after_convert(&self, host: &mut Host, vm: usize, start: u64, end: u64, private: bool) {
        if private {
            host.count_surviving_pins(vm, start, end);
        }
        host.convert_same_page(vm, start, end, private);
    }
}
