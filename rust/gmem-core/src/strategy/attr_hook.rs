//! `attr_hook`: `KVM_SET_MEMORY_ATTRIBUTES` calls into guest_memfd, which stores the
//! attribute per offset and zaps host mappings of the now-private range (Paolo's proposal
//! in the v13 review). One gfn per offset is enforced at binding. There is no refcount
//! gate: a pin taken before the conversion survives it, and the model counts each such
//! page as a violation — the host still reaches a private page. Files keep mainline's VM
//! semantics: every offset starts shared. The backing work is `inplace`'s
//! (`same_page.rs`).

use super::{SharedSide, Strategy, shared_by_file_attr};
use crate::convert::Parts;
use crate::host::Host;
use crate::uapi;

pub struct AttrHook;

impl Strategy for AttrHook {
    const NAME: &'static str = "attr_hook";
    const REACH_BY_BINDING: bool = true;
    const SHARED_SIDE: SharedSide = SharedSide::SameFile;
    const FILE_ATTRS: bool = true;

    fn initial_file_attr(_flags: u64) -> Option<u64> {
        Some(0)
    }

    fn after_convert(h: &mut Host, private: bool, parts: &Parts) {
        if private {
            h.count_surviving_pins(parts);
        }
        h.convert_same_page(private, parts);
    }

    /// The file's attribute decides where a gfn binds the offset (its attributes start
    /// shared, as mainline's VM attributes do); an offset no gfn reaches stays private.
    fn host_may_map(h: &Host, file: usize, off: u64) -> bool {
        shared_by_file_attr(h, file, off)
            && (h.files[file].flags & uapi::GUEST_MEMFD_FLAG_INIT_SHARED != 0
                || h.files[file].binding_at(off).is_some())
    }
}

impl Host {
    /// A pin taken before the conversion survives it; each such page is a page the host
    /// still reaches while private.
    fn count_surviving_pins(&mut self, parts: &Parts) {
        let mut n = 0;
        for p in parts.get(self) {
            n += self.files[p.file].pins_in(p.o0, p.o1()).len() as u64;
        }
        self.vms[parts.vm].stats.violations += n;
    }
}
