//! `inplace`: the 2026 in-place conversion series (v8). Attributes live per guest_memfd
//! offset; shared pages are mapped by the host from guest_memfd itself. Converting to
//! private unmaps the range from every host page table and then refuses with `EAGAIN`
//! (`error_offset` = first offending page) if any page still has an elevated reference —
//! before anything changes. HugeTLB folios split when any page turns shared and merge back
//! once the whole huge range is private again.

use super::{SharedSide, Strategy};
use crate::error::Result;
use crate::host::Host;

pub struct Inplace;

impl Strategy for Inplace {
    fn name(&self) -> &'static str {
        "inplace"
    }

    fn shared_side(&self) -> SharedSide {
        SharedSide::SameFile
    }

    fn gate(&self, host: &mut Host, vm: usize, start: u64, end: u64, private: bool) -> Result<()> {
        if private {
            host.refuse_if_pinned(vm, start, end)?;
        }
        Ok(())
    }

    fn after_convert(&self, host: &mut Host, vm: usize, start: u64, end: u64, private: bool) {
        host.convert_same_page(vm, start, end, private);
    }
}
