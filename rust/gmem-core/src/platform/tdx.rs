//! Intel TDX. Private pages enter the S-EPT by `TDH.MEM.PAGE.AUG` at fault and the guest's
//! `TDG.MEM.PAGE.ACCEPT`, or by `TDH.MEM.PAGE.ADD` when populated before the guest runs;
//! they leave by `TDH.MEM.PAGE.REMOVE`. A conversion in place re-keys (scrubs) the page.
//! No read-only memslots (x86 with protected state); private memory maps at most 2 MiB;
//! a memslot must stay below the shared-GPA bit (`kvm_is_gfn_alias()`).

use super::Platform;
use crate::cost::CostModel;
use crate::error::{Result, err, errno};
use crate::host::Host;
use crate::stage2::Level;
use crate::uapi;
use crate::vm::Vm;

pub struct Tdx;

impl Platform for Tdx {
    const NAME: &'static str = "tdx";
    const KEEPS_CONTENT: bool = false;
    const HAS_READONLY_MEM: bool = false;
    const MAX_PRIVATE_LEVEL: Level = Level::L2M;
    const NO_DIRECT_MAP: bool = false;
    const GPA_BITS: u32 = uapi::TDX_SHARED_GPA_BIT;

    fn gpa_limit(bits: u32) -> String {
        format!("TDX's shared-GPA bit {bits}")
    }

    fn map_private(h: &mut Host, vm: usize, _g0: u64, _n: u64, _p0: u32) -> u64 {
        // TDH.MEM.PAGE.AUG by KVM, then TDG.MEM.PAGE.ACCEPT by the guest.
        let s = &mut h.vms[vm].stats;
        s.tdx_page_augs += 1;
        s.tdx_accepts += 1;
        h.costs.tdx_page_aug + h.costs.tdx_accept
    }

    fn zap_private(v: &mut Vm, costs: &CostModel, leaves: u64) {
        // Private S-EPT leaves leave through TDH.MEM.PAGE.REMOVE (upper bound: the zap may
        // also have taken shared leaves when unfiltered).
        v.stats
            .tdx_pages_removed(leaves, costs.tdx_page_remove * leaves);
    }

    fn populate_refused(h: &Host, vm: usize, gfn: u64, _f: usize, _off: u64) -> Result<()> {
        // `tdx_gmem_post_populate()`: the TDP MMU's map of the page is not `RET_PF_FIXED`.
        if h.vms[vm]
            .s2
            .lookup(gfn, &h.files)
            .is_some_and(|l| l.private)
        {
            return Err(err(
                errno::EIO,
                format!("populate: gfn {gfn:#x} is already mapped in the S-EPT"),
            ));
        }
        Ok(())
    }

    fn populate(h: &mut Host, vm: usize, gfn: u64, f: usize, off: u64, pfn: u32) {
        // TDH.MEM.PAGE.ADD: mapped in the S-EPT, no later AUG/ACCEPT.
        let file = u32::try_from(f).expect("fewer than 2^32 files");
        h.vms[vm].s2.map_file(gfn, pfn, file, off, &h.files);
        let c = h.costs.tdx_page_add;
        h.vms[vm].stats.tdx_page_added(c);
    }
}
