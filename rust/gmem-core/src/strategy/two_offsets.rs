//! `two_offsets`: each memslot binds a private and a shared guest_memfd range (a second
//! fd+offset pair, as proposed for non-in-place TDX/SNP in the v13 review). The attribute
//! picks the side; the unused side stays allocated until discarded (punching the shared
//! range, [`Host::discard_shared`]). Slots bound without a shared range keep their shared
//! view at `userspace_addr`, as `dual`. The host may map a page of the shared range, and a
//! page of the private range while the gfn bound there is shared.

use super::{SharedSide, Strategy, shared_by_bound_gfn};
use crate::PAGE_SHIFT;
use crate::convert::Parts;
use crate::error::{Result, einval, err, errno};
use crate::host::{GmemArg, Host};
use crate::memslot::Binding;

pub struct TwoOffsets;

impl Strategy for TwoOffsets {
    const NAME: &'static str = "two_offsets";
    const REACH_BY_BINDING: bool = true;
    const SHARED_SIDE: SharedSide = SharedSide::SecondRange;

    #[inline]
    fn after_convert(h: &mut Host, private: bool, parts: &Parts) {
        let Parts { vm, start, end, .. } = *parts;
        h.count_lost_content(vm, start, end, private, true);
        h.huge_private_side(vm, start, end, private);
        if private {
            // The private range's pages leave the host's reach with their gfns.
            h.unmap_parts(parts.get(h));
        }
    }

    fn host_may_map(h: &Host, file: usize, off: u64) -> bool {
        shared_by_bound_gfn(h, file, off)
    }
}

impl Host {
    /// Bind the shared range of a new `two_offsets` memslot of `npages` pages (`size`
    /// bytes) whose private range is `pgoff..` of file `private_file`: `shared_guest_memfd`
    /// (by default the private file) at `shared_offset` (by default 0).
    pub(crate) fn bind_second_range(
        &self,
        vm: usize,
        shared_guest_memfd: GmemArg,
        shared_offset: Option<u64>,
        private_file: usize,
        pgoff: u64,
        npages: u64,
        size: u64,
    ) -> Result<Binding> {
        let soff = shared_offset.unwrap_or(0);
        let sf = match shared_guest_memfd {
            GmemArg::None => private_file,
            a => self.resolve_gmem(vm, a)?,
        };
        if !soff.is_multiple_of(crate::PAGE_SIZE) || soff.checked_add(size).is_none() {
            return Err(einval(format!(
                "shared_offset {soff:#x} not page aligned or overflows"
            )));
        }
        let spg = soff >> PAGE_SHIFT;
        self.check_bind(sf, spg, npages, soff, size)?;
        if sf == private_file && spg < pgoff + npages && pgoff < spg + npages {
            // The same offsets bound twice: EEXIST, as any range already bound.
            return Err(err(
                errno::EEXIST,
                "shared range overlaps the private range",
            ));
        }
        Ok(Binding {
            file: sf,
            pgoff: spg,
            live: true,
        })
    }
}
