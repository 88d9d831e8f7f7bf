//! Conversion strategies: one file per design argued over in the guest_memfd review (see
//! `docs/strategies.md`), and the pieces two designs share in named files beside them.
//!
//! | file | holds |
//! |---|---|
//! | `dual.rs` | mainline: private side in guest_memfd, shared side at `userspace_addr` |
//! | `inplace.rs` | the in-place series: the refcount gate, `KVM_SET_MEMORY_ATTRIBUTES2`, `INIT_SHARED` |
//! | `realloc.rs` | free the converted pages, reallocate on next access |
//! | `two_offsets.rs` | a second guest_memfd range per memslot for the shared side |
//! | `attr_hook.rs` | attributes per offset, no gate: surviving pins are violations |
//! | `same_page.rs` | the in-place backing work of `inplace` and `attr_hook` |
//! | `two_sided.rs` | the HugeTLB work of the private side of `dual` and `two_offsets` |
//! | `lost_content.rs` | pKVM's content promise, broken by the designs that move pages |
//!
//! Each design is a unit type implementing `Strategy`: constants for what it offers and
//! associated functions for the work it does. [`StrategyKind`] dispatches with a `match`
//! (`with_design!`), so every call is static and the constants fold: the conversion path
//! gets no virtual call per event.
//!
//! The shared conversion path (`Host::convert`) validates, asks the design's
//! `Strategy::gate` whether the conversion may proceed (before anything changes), stores
//! the attributes, zaps stage-2 mappings of the old type, then lets the design do its
//! backing work in `Strategy::after_convert`. Where a gfn's shared view lives
//! (`Host::shared_file_page`, `Host::slot_shared_in_userspace`) and how the VMM discards
//! it ([`Host::discard_shared`]) follow from `Strategy::SHARED_SIDE`, here too.

mod attr_hook;
mod dual;
mod inplace;
mod lost_content;
mod realloc;
mod same_page;
mod two_offsets;
mod two_sided;

use crate::convert::Parts;
use crate::error::{Result, einval, err, errno};
use crate::events::Events;
use crate::guest_memfd::FileBinding;
use crate::host::Host;
use crate::memslot::{FilePage, Memslot};
use crate::uapi;

/// Where the shared view of a gfn lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedSide {
    /// Ordinary host memory at the memslot's `userspace_addr` (mainline TDX/SNP).
    Userspace,
    /// The same guest_memfd page as the private view (in place).
    SameFile,
    /// A second guest_memfd range bound to the memslot.
    SecondRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum StrategyKind {
    Dual,
    Inplace,
    Realloc,
    TwoOffsets,
    AttrHook,
}

/// Run `$body` with `$D` naming the unit type of `$kind`'s design (a static dispatch).
macro_rules! with_design {
    ($kind:expr, $D:ident => $body:expr) => {
        match $kind {
            StrategyKind::Dual => {
                type $D = dual::Dual;
                $body
            }
            StrategyKind::Inplace => {
                type $D = inplace::Inplace;
                $body
            }
            StrategyKind::Realloc => {
                type $D = realloc::Realloc;
                $body
            }
            StrategyKind::TwoOffsets => {
                type $D = two_offsets::TwoOffsets;
                $body
            }
            StrategyKind::AttrHook => {
                type $D = attr_hook::AttrHook;
                $body
            }
        }
    };
}

impl StrategyKind {
    pub const ALL: [StrategyKind; 5] = [
        StrategyKind::Dual,
        StrategyKind::Inplace,
        StrategyKind::Realloc,
        StrategyKind::TwoOffsets,
        StrategyKind::AttrHook,
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                einval(format!(
                    "unknown strategy {s:?} (expected dual, inplace, realloc, two_offsets or attr_hook)"
                ))
            })
    }

    pub fn name(self) -> &'static str {
        with_design!(self, D => D::NAME)
    }

    /// Attributes of gfns bound to a guest_memfd live at the file's offsets (the same-page
    /// designs).
    #[inline]
    pub fn file_attrs(self) -> bool {
        with_design!(self, D => D::FILE_ATTRS)
    }

    #[inline]
    pub fn shared_side(self) -> SharedSide {
        with_design!(self, D => D::SHARED_SIDE)
    }

    /// What a single-page conversion of the design reads besides stage-2 (what `apply`
    /// prefetches ahead of it).
    #[inline]
    pub(crate) fn convert_touches(self) -> ConvertTouches {
        with_design!(self, D => ConvertTouches::of::<D>())
    }

    /// `apply`'s loop for a batch of single-page conversions on a VM of this design with
    /// private memory: one dispatch for the whole batch.
    pub(crate) fn convert_pages(
        self,
        h: &mut Host,
        vm: usize,
        events: &impl Events,
        private: bool,
        out: &mut [i32],
    ) {
        with_design!(self, D => h.convert_pages_as::<D>(vm, events, private, out));
    }

    /// Whether a gfn can be backed twice (a private page and a distinct shared one).
    #[inline]
    pub(crate) fn may_double_back(self) -> bool {
        self.shared_side() != SharedSide::SameFile
    }

    /// guest_memfd creation flags a VM of this design accepts (`KVM_CAP_GUEST_MEMFD_FLAGS`).
    pub(crate) fn gmem_flags(self) -> u64 {
        with_design!(self, D => D::GMEM_FLAGS)
    }

    /// `KVM_CAP_MEMORY_ATTRIBUTES`: the VM-scoped attributes offered.
    pub(crate) fn vm_attributes(self) -> u64 {
        with_design!(self, D => D::VM_ATTRIBUTES)
    }

    /// `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES`: the per-file attributes offered.
    pub(crate) fn gmem_attributes(self) -> u64 {
        with_design!(self, D => D::GMEM_ATTRIBUTES)
    }

    /// In-place mode (v13): conversions go to the bound files only.
    #[inline]
    pub(crate) fn in_place_mode(self) -> bool {
        self.gmem_attributes() != 0
    }

    /// The per-offset attribute value a new guest_memfd starts with, or `None` when the
    /// design keeps no attributes in the file.
    pub(crate) fn initial_file_attr(self, flags: u64) -> Option<u64> {
        with_design!(self, D => D::initial_file_attr(flags))
    }

    /// Whether memslots may bind a second guest_memfd range for the shared side.
    pub(crate) fn binds_second_range(self) -> bool {
        self.shared_side() == SharedSide::SecondRange
    }

    /// [`Host::convert`] on a VM of this design with private memory: one dispatch for
    /// the whole conversion.
    #[inline]
    pub(crate) fn convert(self, h: &mut Host, parts: &Parts, private: bool) -> Result<()> {
        with_design!(self, D => h.convert_as::<D>(parts, private))
    }

    /// [`Strategy::host_may_map`] of the design; on a VM without private memory, whatever
    /// the design, mainline's rule (`kvm_gmem_fault_user_mapping()`: INIT_SHARED files
    /// only), as nothing can make an offset shared later.
    pub(crate) fn host_may_map(self, h: &Host, file: usize, off: u64) -> bool {
        if !h.vms[h.files[file].vm].vm_type.has_private_mem() {
            return h.files[file].flags & uapi::GUEST_MEMFD_FLAG_INIT_SHARED != 0;
        }
        with_design!(self, D => D::host_may_map(h, file, off))
    }

    /// [`Strategy::REACH_BY_BINDING`] of the design.
    pub(crate) fn reach_by_binding(self) -> bool {
        with_design!(self, D => D::REACH_BY_BINDING)
    }
}

/// What a single-page conversion reads besides stage-2 ([`StrategyKind::convert_touches`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConvertTouches {
    /// The VM's attribute map.
    VmAttrs,
    /// The bound file's attribute map.
    FileAttrs,
    /// The VM's attribute map, and the page cache entry and content of the page freed.
    VmAttrsAndPage,
}

impl ConvertTouches {
    /// What design `D`'s single-page conversion reads.
    #[inline]
    pub(crate) const fn of<D: Strategy>() -> Self {
        if D::FILE_ATTRS {
            Self::FileAttrs
        } else if D::FREES_ON_CONVERT {
            Self::VmAttrsAndPage
        } else {
            Self::VmAttrs
        }
    }
}

/// One conversion design. Implemented by a unit type per design and called through
/// [`StrategyKind`]'s static dispatch.
pub(crate) trait Strategy {
    const NAME: &'static str;

    const SHARED_SIDE: SharedSide;

    /// Attributes of bound gfns live at the file's offsets.
    const FILE_ATTRS: bool = false;

    /// Whether `Strategy::gate` can refuse.
    const HAS_GATE: bool = false;

    /// guest_memfd creation flags offered (`KVM_CAP_GUEST_MEMFD_FLAGS`). Mainline always
    /// offers MMAP; INIT_SHARED only where `kvm_arch_supports_gmem_init_shared()`, on x86
    /// never for a VM with private memory.
    const GMEM_FLAGS: u64 = uapi::GUEST_MEMFD_FLAG_MMAP;

    /// `KVM_CAP_MEMORY_ATTRIBUTES`: the attributes `KVM_SET_MEMORY_ATTRIBUTES` accepts.
    const VM_ATTRIBUTES: u64 = uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;

    /// `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES` (in-place series v13): the attributes the
    /// guest_memfd's `KVM_SET_MEMORY_ATTRIBUTES2` accepts; nonzero means in-place mode is
    /// on: a conversion is that ioctl on the bound files, and a gfn no memslot binds has
    /// no attribute at all.
    const GMEM_ATTRIBUTES: u64 = 0;

    /// The attribute every offset of a new guest_memfd created with `flags` starts with,
    /// for designs that keep attributes per offset.
    fn initial_file_attr(_flags: u64) -> Option<u64> {
        None
    }

    /// Decide, before any state changes, whether converting the range of `parts` (its VM,
    /// its gfns, its bound parts found once for the whole conversion) may go ahead (only
    /// designs with [`Strategy::HAS_GATE`] ever refuse).
    fn gate(_h: &mut Host, _private: bool, _parts: &Parts) -> Result<()> {
        Ok(())
    }

    /// Whether [`Strategy::gate`] can refuse a conversion this way (to private when
    /// `private`): where it cannot, a one-page conversion tests and stores the attribute
    /// in one step. Any gate, either way, unless the design says otherwise.
    #[inline]
    fn gate_may_refuse(_private: bool) -> bool {
        Self::HAS_GATE
    }

    /// The design's backing work over the range of `parts` once attributes are stored and
    /// stale stage-2 entries are zapped.
    fn after_convert(h: &mut Host, private: bool, parts: &Parts);

    /// Whether a conversion frees the pages it converts (their page cache entries and
    /// content are touched by every conversion).
    const FREES_ON_CONVERT: bool = false;

    /// Whether [`Strategy::host_may_map`] depends on the memslots bound to the file, so
    /// that deleting one can take pages out of the host's reach.
    const REACH_BY_BINDING: bool = false;

    /// Whether the host may map page `off` of `file` (a guest_memfd of a VM of this
    /// design). Mainline: user faults are allowed only on INIT_SHARED files.
    fn host_may_map(h: &Host, file: usize, _off: u64) -> bool {
        h.files[file].flags & uapi::GUEST_MEMFD_FLAG_INIT_SHARED != 0
    }
}

/// Whether the host may map page `off` of a file that keeps its attributes per offset.
fn shared_by_file_attr(h: &Host, file: usize, off: u64) -> bool {
    h.files[file]
        .attrs
        .as_ref()
        .is_some_and(|a| a.get(off) & uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE == 0)
}

/// Whether the host may map page `off` of a file whose pages are shared exactly where the
/// gfn bound there is: pages of a shared-side binding always, pages of a private-side
/// binding while their gfn is shared. An offset that no memslot binds has no attribute
/// that could make it shared: private, as mainline's files without INIT_SHARED
/// (`kvm_gmem_fault_user_mapping()`: SIGBUS) and the in-place series' offsets.
fn shared_by_bound_gfn(h: &Host, file: usize, off: u64) -> bool {
    if h.files[file].flags & uapi::GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
        return true;
    }
    match h.files[file].binding_at(off) {
        Some((_, b)) if b.shared_side => true,
        Some((bs, b)) => {
            let slot = &h.vms[b.vm].slots[&b.slot];
            let gfn = slot.base_gfn + (off - bs);
            h.vms[b.vm].attrs.get(gfn) & uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE == 0
        }
        None => false,
    }
}

// ------------------------------------------------------------------ the shared view

/// Where a gfn's shared view lives ([`Host::shared_view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SharedView {
    /// Page `off` of guest_memfd `file`.
    File(usize, u64),
    /// The VMM's memory at this host virtual address.
    Hva(u64),
}

impl Host {
    /// Where the shared view of `vm`'s gfns lives: the design's side, or mainline's
    /// (`userspace_addr`, unless the memslot is guest_memfd-only) on a VM without private
    /// memory, where no design's conversion ever runs.
    #[inline]
    pub(crate) fn shared_side(&self, vm: usize) -> SharedSide {
        let v = &self.vms[vm];
        if v.vm_type.has_private_mem() {
            v.strategy.shared_side()
        } else {
            SharedSide::Userspace
        }
    }

    /// The guest_memfd page holding `gfn`'s shared view, or `None` when that view is
    /// userspace memory (mainline `dual`, or a memslot without guest_memfd).
    pub(crate) fn shared_file_page(&self, vm: usize, slot: &Memslot, gfn: u64) -> Option<FilePage> {
        match self.shared_side(vm) {
            SharedSide::Userspace if !self.slot_gmem_only(vm, slot.id) => None,
            SharedSide::SecondRange => slot.shared_offset_of(gfn),
            _ => slot.offset_of(gfn),
        }
    }

    /// The stage-2 entries that the file range bound by `b` backs, as a zap filter: a
    /// private-side file of a mainline `dual` slot only backs private mappings, the two
    /// ranges of a `two_offsets` slot one type each, a same-page file both.
    pub(crate) fn binding_backs(&self, b: FileBinding) -> Option<bool> {
        match (self.shared_side(b.vm), b.shared_side) {
            (SharedSide::Userspace, _) if !self.slot_gmem_only(b.vm, b.slot) => Some(true),
            (SharedSide::SecondRange, false) => Some(true),
            (SharedSide::SecondRange, true) => Some(false),
            _ => None,
        }
    }

    /// Where `gfn`'s shared view lives, for an access to it: a page of a live guest_memfd,
    /// or the VMM's address at `userspace_addr`. `EFAULT` when it is a page of a released
    /// guest_memfd.
    pub(crate) fn shared_view(&self, vm: usize, slot: &Memslot, gfn: u64) -> Result<SharedView> {
        match self.shared_file_page(vm, slot, gfn) {
            Some(FilePage {
                file,
                off,
                live: true,
            }) => Ok(SharedView::File(file, off)),
            Some(FilePage { live: false, .. }) => Err(err(
                errno::EFAULT,
                format!("gfn {gfn:#x}: guest_memfd closed"),
            )),
            None => Ok(SharedView::Hva(slot.hva_of(gfn))),
        }
    }

    /// Whether `slot`'s shared view is the VMM's userspace memory at `userspace_addr`:
    /// always for `dual` (unless the slot is guest_memfd-only), for `two_offsets` slots
    /// bound without a shared range, and for any memslot without guest_memfd.
    pub(crate) fn slot_shared_in_userspace(&self, vm: usize, slot: &Memslot) -> bool {
        match self.shared_side(vm) {
            SharedSide::Userspace => !self.slot_gmem_only(vm, slot.id),
            SharedSide::SecondRange => slot.shared.is_none(),
            SharedSide::SameFile => slot.gmem.is_none(),
        }
    }

    /// The VMM discards the shared side of `[start, end)`: `MADV_DONTNEED` on userspace
    /// memory, or punching the shared range of a `two_offsets` slot. Nothing to do where
    /// the shared view is the private page itself.
    pub fn discard_shared(&mut self, vm: usize, start: u64, end: u64) {
        let side = self.shared_side(vm);
        for id in self.vms[vm].slots_in(start, end) {
            let slot = self.vms[vm].slots[&id].clone();
            let (g0, g1) = (start.max(slot.base_gfn), end.min(slot.end_gfn()));
            if self.slot_shared_in_userspace(vm, &slot) {
                let (a0, a1) = (slot.hva_of(g0), slot.hva_of(g1));
                let maps: Vec<(usize, u64, u64)> = self.maps_in(a0, a1).collect();
                for (m, i0, i1) in maps.into_iter().rev() {
                    self.discard_pages(m, i0, i1);
                }
            } else if side == SharedSide::SecondRange
                && let Some(b) = slot.shared.filter(|b| b.live)
            {
                let o0 = b.pgoff + (g0 - slot.base_gfn);
                self.punch(b.file, o0, o0 + (g1 - g0));
            }
        }
    }
}
