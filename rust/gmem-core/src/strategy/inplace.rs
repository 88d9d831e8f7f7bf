//! `inplace`: the 2026 in-place conversion series (as applied at v13; v8 before). Attributes live
//! per guest_memfd offset; shared pages are mapped by the host from guest_memfd itself. Converting
//! to private unmaps the range from every host page table and then refuses with `EAGAIN`
//! (`error_offset` = first offending page) if any page still has an elevated reference — before
//! anything changes. HugeTLB folios split when any page turns shared and merge back once the whole
//! huge range is private again (`same_page.rs`).
//!
//! The series also adds a second conversion ioctl, `KVM_SET_MEMORY_ATTRIBUTES2` on the
//! guest_memfd itself ([`Host::set_memory_attributes2`]), enables `INIT_SHARED` for CoCo
//! VMs (a file starts private unless created with it) and deprecates VM-scoped PRIVATE
//! tracking (`KVM_CAP_MEMORY_ATTRIBUTES` reports 0).

use super::{SharedSide, Strategy, shared_by_file_attr};
use crate::convert::Parts;
use crate::error::{Error, Result, einval, err, errno};
use crate::guest_memfd::Zap;
use crate::host::Host;
use crate::{PAGE_SHIFT, PAGE_SIZE, uapi};

pub struct Inplace;

impl Strategy for Inplace {
    const NAME: &'static str = "inplace";
    const SHARED_SIDE: SharedSide = SharedSide::SameFile;
    const FILE_ATTRS: bool = true;
    const HAS_GATE: bool = true;
    const GMEM_FLAGS: u64 = uapi::GUEST_MEMFD_FLAG_MMAP | uapi::GUEST_MEMFD_FLAG_INIT_SHARED;
    const VM_ATTRIBUTES: u64 = 0;
    const GMEM_ATTRIBUTES: u64 = uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;

    fn initial_file_attr(flags: u64) -> Option<u64> {
        Some(if flags & uapi::GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
            0
        } else {
            uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
        })
    }

    // In line: the conversion calls it once per page (Callgrind, goal 20 40000 1
    // scattered: inplace 32,782,158 -> 31,622,158; dual and two_offsets +3 per conversion
    // from the inliner's new layout of `apply`).
    #[inline]
    fn gate(h: &mut Host, private: bool, parts: &Parts) -> Result<()> {
        if private {
            h.refuse_if_pinned(parts)?;
        }
        Ok(())
    }

    /// Only a conversion to private meets the reference check.
    #[inline]
    fn gate_may_refuse(private: bool) -> bool {
        private
    }

    #[inline]
    fn after_convert(h: &mut Host, private: bool, parts: &Parts) {
        h.convert_same_page(private, parts);
    }

    fn host_may_map(h: &Host, file: usize, off: u64) -> bool {
        shared_by_file_attr(h, file, off)
    }
}

impl Host {
    /// The gate: unmap the range from host page tables, then refuse with `EAGAIN` if a
    /// page is still referenced (pinned) — before any attribute changes.
    fn refuse_if_pinned(&mut self, parts: &Parts) -> Result<()> {
        let vm = parts.vm;
        let parts = parts.get(self);
        self.unmap_parts(parts);
        for p in parts {
            if let Some(first) = self.first_pinned(p.file, p.o0, p.o1()) {
                return Err(self.busy(vm, p.g0 + (first - p.o0)));
            }
        }
        Ok(())
    }

    /// The first pinned page of `[o0, o1)` of `file`.
    fn first_pinned(&self, file: usize, o0: u64, o1: u64) -> Option<u64> {
        self.files[file].pins_in(o0, o1).first().copied()
    }

    /// `EAGAIN` at page `page` (a gfn, or a file page for the guest_memfd ioctl).
    fn busy(&mut self, vm: usize, page: u64) -> Error {
        self.vms[vm].stats.eagain += 1;
        Error::Busy {
            error_offset: page << PAGE_SHIFT,
        }
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd (in-place series).
    pub fn set_memory_attributes2(
        &mut self,
        file: usize,
        offset: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> Result<()> {
        let f = &self.files[file];
        if f.fd.is_none() {
            return Err(err(errno::EBADF, "guest_memfd is closed"));
        }
        // Checks in the order of the in-place series v13 (KERNEL.md §7); whether in-place
        // mode is on comes last.
        if flags != 0 {
            return Err(einval(format!("flags {flags:#x} must be 0")));
        }
        let v = &self.vms[f.vm];
        if !v.vm_type.has_private_mem() && v.strategy.in_place_mode() {
            return Err(einval(format!(
                "{} VMs have no private memory",
                v.vm_type.name()
            )));
        }
        if attributes & !uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            return Err(einval(format!("unsupported attributes {attributes:#x}")));
        }
        if size == 0 || offset.checked_add(size).is_none() {
            return Err(einval(format!(
                "range {offset:#x}+{size:#x} is empty or overflows"
            )));
        }
        if !offset.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "range {offset:#x}+{size:#x} not page aligned"
            )));
        }
        let isize = f.size_pages << PAGE_SHIFT;
        if offset >= isize || offset + size > isize {
            return Err(einval(format!(
                "range {offset:#x}+{size:#x} beyond file size {isize:#x}"
            )));
        }
        if !self.vms[f.vm].strategy.in_place_mode() {
            return Err(err(
                errno::ENOTTY,
                "KVM_SET_MEMORY_ATTRIBUTES2 needs in-place conversion (strategy inplace)",
            ));
        }
        let (o0, o1) = (offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT);
        let private = attributes != 0;
        let vm = f.vm;
        let a = f.attrs.as_ref().expect("inplace files keep attributes");
        let changed = o1 - o0 - a.count(o0, o1, attributes);
        if changed == 0 {
            return Ok(());
        }
        if private {
            // The gate, by file offset.
            self.unmap_file_range(file, o0, o1);
            if let Some(first) = self.first_pinned(file, o0, o1) {
                return Err(self.busy(vm, first));
            }
        }
        self.scrub_changing(vm, file, o0, o1, attributes);
        self.files[file]
            .attrs
            .as_mut()
            .expect("checked")
            .set(o0, o1, attributes);
        self.gmem_invalidate(file, o0, o1, Zap::Only(Some(!private)));
        self.same_page_work(vm, file, o0, o1, private);
        let c = self.costs.attr_range;
        self.vms[vm].stats.converted(changed, c);
        Ok(())
    }

    /// `KVM_GET_MEMORY_ATTRIBUTES2`: the attribute at `offset` of a guest_memfd that keeps
    /// attributes per offset.
    pub fn get_memory_attributes2(&self, file: usize, offset: u64) -> Result<u64> {
        let f = &self.files[file];
        let Some(a) = &f.attrs else {
            return Err(err(
                errno::ENOTTY,
                "this guest_memfd keeps no per-offset attributes",
            ));
        };
        if !offset.is_multiple_of(PAGE_SIZE) || offset >= f.size_pages << PAGE_SHIFT {
            return Err(einval(format!(
                "offset {offset:#x} unaligned or beyond the file"
            )));
        }
        Ok(a.get(offset >> PAGE_SHIFT))
    }
}
