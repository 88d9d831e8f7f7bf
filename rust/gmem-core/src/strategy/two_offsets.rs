//! `two_offsets`: each memslot binds a private and a shared guest_memfd range (a second
//! fd+offset pair, as proposed for non-in-place TDX/SNP in the v13 review). The attribute
//! picks the side; the unused side stays allocated until discarded.

use super::{SharedSide, Strategy};
use crate::host::Host;

pub struct TwoOffsets;

impl Strategy for TwoOffsets {
    fn name(&self) -> &'static str {
        "two_offsets"
    }

    fn shared_side(&self) -> SharedSide {
        SharedSide::SecondRange
    }

    fn after_convert(&self, host: &mut Host, vm: usize, start: u64, end: u64, private: bool) {
        host.count_lost_content(vm, start, end, private);
        host.huge_private_side(vm, start, end, private);
    }
}
