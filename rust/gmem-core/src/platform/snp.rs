//! AMD SEV-SNP. The RMP (`Host::rmp`) assigns each private frame to exactly one gpa: a
//! frame is assigned (`RMPUPDATE`, then the guest's `PVALIDATE`) when first mapped private
//! or populated, and returns to the hypervisor (`RMPUPDATE`) when it converts to shared in
//! place or is freed (`kvm_arch_gmem_invalidate`, in `Host::give_frames`). A conversion in
//! place scrubs the page. No read-only memslots; private memory maps at most 2 MiB.

use super::Platform;
use crate::error::{Error, Result, einval};
use crate::host::Host;
use crate::stage2::Level;

pub struct Snp;

impl Platform for Snp {
    const NAME: &'static str = "snp";
    const KEEPS_CONTENT: bool = false;
    const HAS_READONLY_MEM: bool = false;
    const MAX_PRIVATE_LEVEL: Level = Level::L2M;
    const NO_DIRECT_MAP: bool = false;

    fn map_private(h: &mut Host, vm: usize, g0: u64, n: u64, p0: u32) -> u64 {
        let mut fresh = false;
        for i in 0..n {
            let p = p0 + i as u32;
            match h.frames.rmp.insert(p, (vm, g0 + i)) {
                None => fresh = true,
                Some(prev) if prev != (vm, g0 + i) => h.vms[vm].stats.violations += 1,
                Some(_) => {}
            }
        }
        if !fresh {
            return 0;
        }
        // RMPUPDATE to guest-owned, then the guest's PVALIDATE.
        let s = &mut h.vms[vm].stats;
        s.rmpupdates += 1;
        s.pvalidates += 1;
        h.costs.rmpupdate + h.costs.pvalidate
    }

    fn convert_in_place(h: &mut Host, vm: usize, f: usize, o0: u64, o1: u64, private: bool) {
        if private || h.frames.rmp.is_empty() {
            return;
        }
        // To shared: the frames return to the hypervisor.
        let mut n = 0;
        for off in h.present_offsets(f, o0, o1) {
            if let Some(r) = h.files[f].page(off) {
                n += u64::from(h.frames.rmp.remove(&r.pfn).is_some());
            }
        }
        let c = h.costs.rmpupdate * n;
        h.vms[vm].stats.rmp_updated(n, c);
    }

    fn populate_refused(h: &Host, _vm: usize, gfn: u64, f: usize, off: u64) -> Result<()> {
        // `sev_gmem_post_populate()`: the page is already assigned in the RMP.
        if let Some(r) = h.files[f].page(off)
            && h.frames.rmp.contains_key(&r.pfn)
        {
            return Err(einval(format!(
                "populate: gfn {gfn:#x}: its page is already assigned in the RMP"
            )));
        }
        Ok(())
    }

    fn populate(h: &mut Host, vm: usize, gfn: u64, _f: usize, _off: u64, pfn: u32) {
        if h.frames.rmp.insert(pfn, (vm, gfn)).is_none() {
            let c = h.costs.rmpupdate;
            h.vms[vm].stats.rmp_updated(1, c);
        }
    }

    fn check_private(h: &Host, vm: usize, gfn: u64, pfn: u32) -> Result<()> {
        if h.frames.rmp.get(&pfn) != Some(&(vm, gfn)) {
            return Err(Error::Invariant(format!(
                "SNP RMP: private pfn {pfn:#x} not assigned to gfn {gfn:#x} alone"
            )));
        }
        Ok(())
    }
}
