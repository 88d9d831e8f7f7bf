//! Confidential-computing platforms (`vm_type`): one file per platform, behind hooks shaped
//! like the kernel's arch hooks of guest_memfd.
//!
//! | file | platform |
//! |---|---|
//! | `sw_protected.rs` | `KVM_X86_SW_PROTECTED_VM`: software only, content kept in place |
//! | `pkvm.rs` | pKVM: content kept, and promised to the guest |
//! | `tdx.rs` | Intel TDX: S-EPT `AUG`/`ACCEPT`, `PAGE.ADD` at populate, `PAGE.REMOVE` at zap |
//! | `snp.rs` | AMD SEV-SNP: the RMP assigns each private frame to one gpa |
//! | `default.rs` | `KVM_X86_DEFAULT_VM`: no private memory; guest_memfd with `MMAP` / `INIT_SHARED` |
//!
//! The hooks (`Platform`): a private page is mapped (`kvm_arch_gmem_prepare` and the
//! fault's map: `Platform::map_private`), private leaves are zapped
//! (`Platform::zap_private`), a page converts in place (`Platform::convert_in_place`),
//! a page is populated (`kvm_gmem_populate`'s post-populate hook:
//! `Platform::populate_refused`, `Platform::populate`), and the platform's invariants
//! (`Platform::check_private`). A frame freed back to the hypervisor
//! (`kvm_arch_gmem_invalidate`) leaves the RMP in `Host::give_frames`: the RMP is keyed by
//! frame, whichever VM owned it. Two constants say what the VM type offers:
//! `Platform::HAS_PRIVATE_MEM` (`kvm_arch_has_private_mem()`) and
//! `Platform::NO_DIRECT_MAP` (`kvm_arch_gmem_supports_no_direct_map()`, NO_DIRECT_MAP
//! series v12). [`VmType`] dispatches with a `match` over unit types, as
//! `StrategyKind` does: no call is virtual.

mod default;
mod pkvm;
mod snp;
mod sw_protected;
mod tdx;

use crate::cost::CostModel;
use crate::error::{Result, einval};
use crate::host::Host;
use crate::stage2::Level;
use crate::vm::Vm;
use crate::{PAGE_SHIFT, uapi};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum VmType {
    /// `KVM_X86_SW_PROTECTED_VM`: software-only protection, content kept in place.
    SwProtected,
    /// pKVM: the hypervisor keeps content across share/unshare (in place).
    Pkvm,
    /// Intel TDX: private pages are added/augmented and accepted; removal scrubs.
    Tdx,
    /// AMD SEV-SNP: RMP assigns each private pfn to exactly one gpa; conversion scrubs.
    Snp,
    /// `KVM_X86_DEFAULT_VM`: no private memory; guest_memfd may back all of its RAM.
    Default,
}

/// Run `$body` with `$P` naming the unit type of `$vt`'s platform (a static dispatch).
macro_rules! with_platform {
    ($vt:expr, $P:ident => $body:expr) => {
        match $vt {
            VmType::SwProtected => {
                type $P = sw_protected::SwProtected;
                $body
            }
            VmType::Pkvm => {
                type $P = pkvm::Pkvm;
                $body
            }
            VmType::Tdx => {
                type $P = tdx::Tdx;
                $body
            }
            VmType::Snp => {
                type $P = snp::Snp;
                $body
            }
            VmType::Default => {
                type $P = default::DefaultVm;
                $body
            }
        }
    };
}

impl VmType {
    /// The confidential VM types: those with private memory, which conversions run on.
    pub const ALL: [VmType; 4] = [VmType::SwProtected, VmType::Pkvm, VmType::Tdx, VmType::Snp];

    /// The VM types without private memory.
    pub const WITHOUT_PRIVATE_MEM: [VmType; 1] = [VmType::Default];

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .chain(Self::WITHOUT_PRIVATE_MEM)
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                einval(format!(
                    "unknown vm_type {s:?} (expected sw_protected, pkvm, tdx, snp or default)"
                ))
            })
    }

    pub fn name(self) -> &'static str {
        with_platform!(self, P => P::NAME)
    }

    /// Whether an in-place conversion keeps the page's content (pKVM and software
    /// protection) or scrubs it (TDX, SNP: the memory is re-keyed / re-assigned).
    pub fn keeps_content(self) -> bool {
        with_platform!(self, P => P::KEEPS_CONTENT)
    }

    /// Whether the platform promises the guest that a page it shares keeps its content —
    /// pKVM's share/unshare ABI. A strategy that loses content breaks the promise.
    #[inline]
    pub fn promises_content(self) -> bool {
        with_platform!(self, P => P::PROMISES_CONTENT)
    }

    /// `kvm_arch_has_private_mem()`: the VM has private memory. Without it nothing
    /// converts: `KVM_CAP_MEMORY_ATTRIBUTES` is 0, PRIVATE is refused, and the strategy's
    /// attribute storage is never used.
    #[inline]
    pub fn has_private_mem(self) -> bool {
        with_platform!(self, P => P::HAS_PRIVATE_MEM)
    }

    /// `kvm_arch_gmem_supports_no_direct_map()` (NO_DIRECT_MAP series v12): whether
    /// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` is offered.
    pub fn supports_no_direct_map(self) -> bool {
        with_platform!(self, P => P::NO_DIRECT_MAP)
    }

    /// Whether memslots may be `KVM_MEM_READONLY` (`kvm_arch_has_readonly_mem()`).
    pub fn has_readonly_mem(self) -> bool {
        with_platform!(self, P => P::HAS_READONLY_MEM)
    }

    /// Largest stage-2 level for private memory.
    pub fn max_private_level(self) -> Level {
        with_platform!(self, P => P::MAX_PRIVATE_LEVEL)
    }

    /// A memslot created or moved must end at or below the largest gfn the MMU maps
    /// (`kvm_mmu_max_gfn()`, see `uapi::MAX_GPA_BITS`), or below the platform's own limit.
    pub(crate) fn check_max_gfn(self, base_gfn: u64, npages: u64) -> Result<()> {
        let bits = with_platform!(self, P => P::GPA_BITS);
        let max_gfn = (1u64 << (bits - PAGE_SHIFT)) - 1;
        if base_gfn + npages - 1 > max_gfn {
            let limit = with_platform!(self, P => P::gpa_limit(bits));
            return Err(einval(format!(
                "memslot ends at gpa {:#x}, beyond {limit}",
                (base_gfn + npages) << PAGE_SHIFT
            )));
        }
        Ok(())
    }

    /// `Platform::map_private`.
    #[inline]
    pub(crate) fn map_private(self, h: &mut Host, vm: usize, g0: u64, n: u64, p0: u32) -> u64 {
        with_platform!(self, P => P::map_private(h, vm, g0, n, p0))
    }

    /// `Platform::zap_private`.
    #[inline]
    pub(crate) fn zap_private(self, v: &mut Vm, costs: &CostModel, leaves: u64) {
        with_platform!(self, P => P::zap_private(v, costs, leaves));
    }

    /// `Platform::convert_in_place`.
    pub(crate) fn convert_in_place(
        self,
        h: &mut Host,
        vm: usize,
        f: usize,
        o0: u64,
        o1: u64,
        private: bool,
    ) {
        with_platform!(self, P => P::convert_in_place(h, vm, f, o0, o1, private));
    }

    /// `Platform::populate_refused`.
    pub(crate) fn populate_refused(
        self,
        h: &Host,
        vm: usize,
        gfn: u64,
        f: usize,
        off: u64,
    ) -> Result<()> {
        with_platform!(self, P => P::populate_refused(h, vm, gfn, f, off))
    }

    /// `Platform::populate`.
    pub(crate) fn populate(self, h: &mut Host, vm: usize, gfn: u64, f: usize, off: u64, pfn: u32) {
        with_platform!(self, P => P::populate(h, vm, gfn, f, off, pfn));
    }

    /// `Platform::check_private`.
    pub(crate) fn check_private(self, h: &Host, vm: usize, gfn: u64, pfn: u32) -> Result<()> {
        with_platform!(self, P => P::check_private(h, vm, gfn, pfn))
    }
}

/// One platform: its constants and its arch hooks. Implemented by a unit type per
/// platform and called through [`VmType`]'s static dispatch.
pub(crate) trait Platform {
    const NAME: &'static str;

    /// An in-place conversion keeps the page's content.
    const KEEPS_CONTENT: bool;

    /// The guest is promised that a page it shares or unshares keeps its content.
    const PROMISES_CONTENT: bool = false;

    /// `kvm_arch_has_readonly_mem()`.
    const HAS_READONLY_MEM: bool;

    /// `kvm_arch_has_private_mem()`.
    const HAS_PRIVATE_MEM: bool = true;

    /// `kvm_arch_gmem_supports_no_direct_map()` (NO_DIRECT_MAP series v12): x86 offers the
    /// flag to every VM type but TDX and SNP ("they access pages via direct map in certain
    /// operations, such as population"), arm64 wherever the direct map has 4 KiB
    /// granularity and stage 2 has FWB (assumed of a pKVM host).
    const NO_DIRECT_MAP: bool = true;

    const MAX_PRIVATE_LEVEL: Level;

    /// Guest physical address bits a memslot may reach.
    const GPA_BITS: u32 = uapi::MAX_GPA_BITS;

    /// The limit of [`Platform::GPA_BITS`] in words, for the error.
    fn gpa_limit(bits: u32) -> String {
        format!("the {bits}-bit guest physical space")
    }

    /// A private leaf of `n` pages at `g0` (frames from `p0`) was just mapped by a guest
    /// fault: the platform's steps; returns their modelled cost.
    fn map_private(_h: &mut Host, _vm: usize, _g0: u64, _n: u64, _p0: u32) -> u64 {
        0
    }

    /// `leaves` stage-2 leaves, private ones among them, were zapped.
    fn zap_private(_v: &mut Vm, _costs: &CostModel, _leaves: u64) {}

    /// Pages `[o0, o1)` of file `f` converted in place (their attributes changed, their
    /// host and stage-2 mappings of the old type are gone).
    fn convert_in_place(_h: &mut Host, _vm: usize, _f: usize, _o0: u64, _o1: u64, _private: bool) {}

    /// The post-populate hook's refusal of page `off` of `f` (gfn `gfn`) loaded before.
    fn populate_refused(_h: &Host, _vm: usize, _gfn: u64, _f: usize, _off: u64) -> Result<()> {
        Ok(())
    }

    /// Page `off` of `f` (frame `pfn`) was populated for `gfn`.
    fn populate(_h: &mut Host, _vm: usize, _gfn: u64, _f: usize, _off: u64, _pfn: u32) {}

    /// The platform's invariant over a private stage-2 entry mapping `gfn` to `pfn`.
    fn check_private(_h: &Host, _vm: usize, _gfn: u64, _pfn: u32) -> Result<()> {
        Ok(())
    }
}

impl Host {
    /// Clear the present, uptodate pages of `[o0, o1)` of file `f` whose attribute is not
    /// yet `value`, where the platform re-keys a page that changes hands (TDX removes the
    /// private S-EPT leaves it had, SNP's invalidate skips pfns that are not assigned): a
    /// page already at the target attribute keeps its content. Runs before the conversion
    /// stores the attributes, while the pages that change hands are still known.
    pub(crate) fn scrub_changing(&mut self, vm: usize, f: usize, o0: u64, o1: u64, value: u64) {
        if self.vms[vm].vm_type.keeps_content() {
            return;
        }
        // Per run of pages to clear: one content clear and one count for the run.
        let mut zeroed = 0;
        for (r0, r1) in self.files[f].present_runs(o0, o1) {
            let mut off = r0;
            while off < r1 {
                let file = &self.files[f];
                let a = file.attrs.as_ref().expect("file attrs");
                let changes = |o: u64| a.get(o) != value && file.page(o).expect("present").uptodate;
                if !changes(off) {
                    off += 1;
                    continue;
                }
                let end = (off + 1..r1).find(|&o| !changes(o)).unwrap_or(r1);
                self.scrub_run(f, off, end);
                zeroed += end - off;
                off = end;
            }
        }
        self.count_scrubbed(vm, zeroed);
    }

    /// [`Host::scrub_changing`] of page `off` of `f`, known to change hands (a
    /// single-page conversion that is not a no-op): one page cache lookup.
    #[allow(clippy::inline_always)] // once per conversion; left to the inliner it stays a call
    #[inline(always)]
    pub(crate) fn scrub_changing_page(&mut self, vm: usize, f: usize, off: u64) {
        if self.vms[vm].vm_type.keeps_content()
            || !self.files[f].page(off).is_some_and(|p| p.uptodate)
        {
            return;
        }
        self.scrub_run(f, off, off + 1);
        self.count_scrubbed(vm, 1);
    }

    /// Clear the content of present pages `[o0, o1)` of `f`, forgetting their frames'
    /// stale data tags.
    fn scrub_run(&mut self, f: usize, o0: u64, o1: u64) {
        if !self.frames.stale.is_empty() {
            for o in o0..o1 {
                let pfn = self.files[f].page(o).expect("present").pfn;
                self.frames.forget_stale(pfn, 0);
            }
        }
        self.files[f].content.clear_range(o0, o1);
    }

    /// Count `zeroed` pages cleared by a scrub.
    fn count_scrubbed(&mut self, vm: usize, zeroed: u64) {
        if zeroed > 0 {
            let c = self.costs.zero(0) * zeroed;
            self.vms[vm].stats.zeroed(zeroed, c);
        }
    }
}
