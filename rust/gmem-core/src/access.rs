//! Access paths: guest accesses through stage-2 (mapping on demand, or a memory-fault
//! exit), and host (VMM) accesses through its mappings.

use crate::error::{Error, HostFaultKind, Result, einval, err, errno};
use crate::frames::Placement;
use crate::host::{Host, Loc};
use crate::mapping::MapKind;
use crate::memslot::{FilePage, Memslot};
use crate::stage2::{Leaf, Level};
use crate::strategy::SharedView;
use crate::vm::FaultPolicy;
use crate::{PAGE_SHIFT, PAGE_SIZE, uapi};

/// A host access through a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostOp {
    Read,
    Write(u64),
    Pin,
    Unpin,
}

impl Host {
    /// Whether `gfn` is private for `vm`: at the bound file offset for strategies that keep
    /// attributes per offset, else in the VM's attribute map.
    #[inline]
    pub fn gfn_private(&self, vm: usize, gfn: u64) -> bool {
        let v = &self.vms[vm];
        if v.strategy.file_attrs()
            && let Some(FilePage {
                file: f,
                off,
                live: true,
            }) = v.slot_at(gfn).and_then(|s| s.offset_of(gfn))
            && let Some(a) = &self.files[f].attrs
        {
            return a.get(off) & uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE != 0;
        }
        v.attrs.get(gfn) & uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE != 0
    }

    /// A guest access to `gpa`: returns the page's value (after writing `write`, if given).
    pub fn guest_access(
        &mut self,
        vm: usize,
        gpa: u64,
        private: bool,
        write: Option<u64>,
    ) -> Result<u64> {
        let leaf = self.vms[vm].s2.lookup(gpa >> PAGE_SHIFT, &self.files);
        self.guest_access_at(vm, gpa, private, write, leaf)
    }

    /// `guest_access` given the stage-2 lookup of the gfn, made by the caller while the
    /// table's generation was what it is now.
    pub(crate) fn guest_access_at(
        &mut self,
        vm: usize,
        gpa: u64,
        private: bool,
        write: Option<u64>,
        leaf: Option<Leaf>,
    ) -> Result<u64> {
        let gfn = gpa >> PAGE_SHIFT;
        // A shared write to a read-only memslot; a private access, or one whose
        // private-ness differs from the gfn's, exits as a memory fault first (mainline
        // `kvm_mmu_faultin_pfn()`), which the path below reports.
        if write.is_some() && !private && self.vms[vm].readonly_slots != 0 {
            self.check_writable(vm, gfn)?;
        }
        // Mapped as asked: `access_mapped` without its read-only refusal, checked above.
        if let Some(l) = leaf
            && l.private == private
        {
            let pfn = l.pfn + (gfn - l.gfn) as u32;
            let loc = self.guest_loc(vm, gfn, private, pfn);
            return Ok(self.touch(vm, pfn, loc, write));
        }
        let pfn = match self.guest_fault(vm, gfn, private, write.is_some(), true) {
            Err(Error::MemoryFault { .. }) if self.vms[vm].opts.fault == FaultPolicy::Convert => {
                // The VMM answers the exit by converting the page and re-entering the guest.
                self.implicit = Some((
                    gfn << PAGE_SHIFT,
                    if private {
                        uapi::KVM_MEMORY_EXIT_FLAG_PRIVATE
                    } else {
                        0
                    },
                ));
                self.convert(vm, gfn, gfn + 1, private)?;
                self.guest_fault(vm, gfn, private, write.is_some(), true)?
            }
            r => r?,
        };
        let loc = self.guest_loc(vm, gfn, private, pfn);
        Ok(self.touch(vm, pfn, loc, write))
    }

    /// Where the content of the page that a guest access to `gfn` reaches lives (frame
    /// `pfn`, mapped private or shared as `private` says): in the guest_memfd page behind
    /// the gfn, or at the frame for ordinary memory.
    pub(crate) fn guest_loc(&self, vm: usize, gfn: u64, private: bool, pfn: u32) -> Loc {
        let Some(slot) = self.vms[vm].slot_at(gfn) else {
            return Loc::Frame(pfn);
        };
        let fp = if private {
            slot.offset_of(gfn)
        } else {
            self.shared_file_page(vm, slot, gfn)
        };
        if let Some(FilePage {
            file: f,
            off,
            live: true,
        }) = fp
        {
            debug_assert_eq!(self.files[f].page(off).map(|r| r.pfn), Some(pfn));
            return Loc::File(f, off);
        }
        if !private
            && self.space.gmem_mmaps != 0
            && let Some((m, idx)) = self.mapping_at(slot.hva_of(gfn))
            && let MapKind::Gmem { file, pgoff, .. } = self.space.maps[m].kind
        {
            debug_assert_eq!(self.files[file].page(pgoff + idx).map(|r| r.pfn), Some(pfn));
            return Loc::File(file, pgoff + idx);
        }
        Loc::Frame(pfn)
    }

    /// The access to a gfn whose stage-2 entry maps it as the access asks (private or
    /// shared), its content at `loc`: no fault, just the page's value; `None` for a shared
    /// write while the VM has read-only memslots, and while frames hold stale data (the
    /// caller's checked path decides).
    #[inline]
    pub(crate) fn access_mapped(
        &mut self,
        vm: usize,
        private: bool,
        write: Option<u64>,
        loc: Loc,
    ) -> Option<u64> {
        if (write.is_some() && !private && self.vms[vm].readonly_slots != 0)
            || !self.frames.stale.is_empty()
        {
            return None;
        }
        Some(match write {
            Some(v) => {
                self.set_content_at(loc, v);
                v
            }
            None => self.content_at(loc),
        })
    }

    /// A guest write to a `KVM_MEM_READONLY` memslot is emulated MMIO: `KVM_RUN` returns to
    /// userspace with `KVM_EXIT_MMIO` (api.rst, `KVM_SET_USER_MEMORY_REGION`); the page is
    /// not written. Out of line and cold: only VMs with read-only memslots come here.
    #[cold]
    #[inline(never)]
    fn check_writable(&mut self, vm: usize, gfn: u64) -> Result<()> {
        if self.gfn_private(vm, gfn) {
            return Ok(());
        }
        match self.vms[vm].slot_at(gfn) {
            Some(s) if s.flags & uapi::KVM_MEM_READONLY != 0 => Err(self.mmio_exit(vm, gfn, true)),
            _ => Ok(()),
        }
    }

    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn touch(&mut self, vm: usize, pfn: u32, loc: Loc, write: Option<u64>) -> u64 {
        if let Some(v) = write {
            self.set_content_at(loc, v);
            if !self.frames.stale.is_empty() {
                self.frames.stale.remove(&pfn);
            }
            return v;
        }
        if !self.frames.stale.is_empty()
            && let Some(&w) = self.frames.stale.get(&pfn)
            && w != vm as u16 + 1
        {
            // The guest received data another owner left in the frame.
            self.vms[vm].stats.violations += 1;
        }
        self.content_at(loc)
    }

    /// `KVM_EXIT_MMIO` for an 8-byte access at `gfn`'s first byte.
    fn mmio_exit(&mut self, vm: usize, gfn: u64, is_write: bool) -> Error {
        let c = self.costs.exit_roundtrip;
        self.vms[vm].stats.mmio_exit(c);
        Error::Mmio {
            phys_addr: gfn << PAGE_SHIFT,
            len: 8,
            is_write,
        }
    }

    fn memory_fault(&mut self, vm: usize, gfn: u64, private: bool) -> Error {
        let c = self.costs.exit_roundtrip;
        self.vms[vm].stats.memory_fault(c);
        Error::MemoryFault {
            gpa: gfn << PAGE_SHIFT,
            size: PAGE_SIZE,
            flags: if private {
                uapi::KVM_MEMORY_EXIT_FLAG_PRIVATE
            } else {
                0
            },
        }
    }

    /// A stage-2 fault: resolve the backing page and install a mapping, or exit. `guest`:
    /// the guest's own access faulted (a stage-2 exit, `stage2_map`), rather than
    /// `KVM_PRE_FAULT_MEMORY` mapping ahead of it (no exit, `prefault_map`).
    ///
    /// Without a memslot: a shared access is emulated MMIO; a private one is a memory
    /// fault in mainline (its attribute lives in the VM), and emulated MMIO too in in-place
    /// mode (v13), where a gfn no memslot binds has no attribute at all.
    fn guest_fault(
        &mut self,
        vm: usize,
        gfn: u64,
        private: bool,
        write: bool,
        guest: bool,
    ) -> Result<u32> {
        if self.vms[vm].strategy.in_place_mode() && self.vms[vm].slot_at(gfn).is_none() {
            return Err(self.mmio_exit(vm, gfn, write));
        }
        if self.gfn_private(vm, gfn) != private {
            return Err(self.memory_fault(vm, gfn, private));
        }
        let Some(slot) = self.vms[vm].slot_at(gfn).cloned() else {
            if private {
                return Err(self.memory_fault(vm, gfn, private));
            }
            return Err(self.mmio_exit(vm, gfn, write));
        };
        if private {
            let Some(FilePage {
                file: f,
                off,
                live: true,
            }) = slot.offset_of(gfn)
            else {
                return Err(self.memory_fault(vm, gfn, private));
            };
            let pfn = self.gmem_get_pfn(vm, f, off)?;
            self.map_private(vm, &slot, gfn, f, off, pfn, guest);
            return Ok(pfn);
        }
        let pfn = self.shared_backing(vm, &slot, gfn)?;
        self.vms[vm]
            .s2
            .map(gfn, Level::L4K, pfn, false, &self.files);
        let c = self.map_cost(guest);
        self.vms[vm].stats.stage2_fault(guest, c);
        Ok(pfn)
    }

    /// Guest accesses, in order, to the private gfns `g0..g1` (cut at the memslot's end)
    /// when every one of them faults in a fresh page: what [`Host::guest_access`] on each
    /// does, done per run of frames rather than per page. The conditions: the gfns are
    /// private and bound live to an order-0 guest_memfd, none is mapped in stage 2, none
    /// of their file pages is present, and no frame carries another owner's data tag.
    /// Returns the gfn it stopped at and the last access's value, or `None`, with nothing
    /// changed, when a condition fails (the caller goes page by page).
    pub(crate) fn fault_private_run(
        &mut self,
        vm: usize,
        g0: u64,
        g1: u64,
        write: Option<u64>,
    ) -> Option<(u64, u64)> {
        if !self.frames.stale.is_empty() {
            return None;
        }
        let v = &self.vms[vm];
        let slot = v.slot_at(g0)?;
        let Some(FilePage {
            file: f,
            off: o0,
            live: true,
        }) = slot.offset_of(g0)
        else {
            return None;
        };
        let g1 = g1.min(slot.end_gfn());
        let n = g1 - g0;
        if n < 2
            || self.files[f].order != 0
            || v.s2.mapped_in(g0, g1)
            || !self.files[f].pages.is_default_in(o0, o0 + n)
            || !self.range_uniform_private(vm, f, g0, o0, n)
        {
            return None;
        }
        let runs = self.gmem_get_pfn_run(vm, f, o0, n)?;
        let file = u32::try_from(f).expect("fewer than 2^32 files");
        self.vms[vm].s2.map_file_run(g0, n, file, o0, &self.files);
        // The platform's work per page, as each fault does it.
        let vt = self.vms[vm].vm_type;
        let mut ns = self.costs.stage2_map * n;
        for (o, pfn, len) in runs {
            for i in 0..len {
                ns += vt.map_private(self, vm, g0 + (o - o0) + i, 1, pfn + i as u32);
            }
        }
        self.vms[vm].stats.stage2_faulted(n, ns);
        let c = &mut self.files[f].content;
        let last = match write {
            Some(x) => {
                c.fill(o0, o0 + n, x);
                x
            }
            None => c.get(o0 + n - 1),
        };
        Some((g1, last))
    }

    /// `KVM_PRE_FAULT_MEMORY` (6.11, api.rst 4.143): map `[gpa, gpa + size)` into stage-2
    /// ahead of the guest, each page as its current attribute says; returns the bytes
    /// processed. A page already mapped costs nothing; a huge leaf covers the pages after
    /// it. Stops at the first page that cannot be mapped: its error when it is the first
    /// page (ENOENT where no memslot covers it), else the bytes processed so far.
    pub fn pre_fault_memory(&mut self, vm: usize, gpa: u64, size: u64) -> Result<u64> {
        if size == 0 {
            return Err(einval("KVM_PRE_FAULT_MEMORY: size 0"));
        }
        if !gpa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "KVM_PRE_FAULT_MEMORY: range {gpa:#x}+{size:#x} not page aligned"
            )));
        }
        let Some(end) = gpa.checked_add(size) else {
            return Err(einval(format!(
                "KVM_PRE_FAULT_MEMORY: range {gpa:#x}+{size:#x} wraps"
            )));
        };
        let (g0, g1) = (gpa >> PAGE_SHIFT, end >> PAGE_SHIFT);
        let mut gfn = g0;
        while gfn < g1 {
            let r = if self.vms[vm].slot_at(gfn).is_none() {
                Err(err(
                    errno::ENOENT,
                    format!(
                        "KVM_PRE_FAULT_MEMORY: no memslot at gpa {:#x}",
                        gfn << PAGE_SHIFT
                    ),
                ))
            } else if let Some(l) = self.vms[vm].s2.lookup(gfn, &self.files) {
                // Mapped already (as a huge leaf, maybe): skip to the leaf's end.
                gfn = l.gfn + l.level.pages();
                continue;
            } else {
                let private = self.gfn_private(vm, gfn);
                self.guest_fault(vm, gfn, private, false, false).map(drop)
            };
            match r {
                Ok(()) => gfn += 1,
                Err(e) if gfn == g0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok((gfn.min(g1) - g0) << PAGE_SHIFT)
    }

    /// The frame backing `gfn`'s shared view, faulted in if needed.
    fn shared_backing(&mut self, vm: usize, slot: &Memslot, gfn: u64) -> Result<u32> {
        // kvm_gmem_get_pfn() fails on a released file: a memory-fault exit.
        if self
            .shared_file_page(vm, slot, gfn)
            .is_some_and(|p| !p.live)
        {
            return Err(self.memory_fault(vm, gfn, false));
        }
        match self.shared_view(vm, slot, gfn)? {
            SharedView::File(f, off) => {
                let pfn = self.gmem_get_pfn(vm, f, off)?;
                self.split_for_shared(f, off);
                Ok(pfn)
            }
            SharedView::Hva(hva) => {
                let Some((m, idx)) = self.mapping_at(hva) else {
                    return Err(err(
                        errno::EFAULT,
                        format!("gfn {gfn:#x}: nothing mapped at hva {hva:#x}"),
                    ));
                };
                match self.space.maps[m].kind {
                    MapKind::Anon { .. } => self.anon_fault(m, idx),
                    MapKind::Gmem { .. } => self.gmem_map_fault(m, idx).map(|(_, _, pfn)| pfn),
                }
            }
        }
    }

    /// Install a private mapping for `gfn` at the largest level the folio, the memslot's
    /// alignment, the attributes (the kernel's "mixed" rule) and the platform allow.
    #[allow(clippy::too_many_arguments)]
    fn map_private(
        &mut self,
        vm: usize,
        slot: &Memslot,
        gfn: u64,
        f: usize,
        off: u64,
        pfn: u32,
        guest: bool,
    ) {
        let max = self.vms[vm].vm_type.max_private_level();
        let mut level = Level::L4K;
        for l in [Level::L1G, Level::L2M] {
            if l > max || self.files[f].order < l.order() {
                continue;
            }
            let n = l.pages();
            let g0 = gfn & !(n - 1);
            if g0 < slot.base_gfn || g0 + n > slot.end_gfn() {
                continue;
            }
            // g0 lies in the slot, so its file page is off - (gfn - g0) >= the slot's pgoff.
            let o0 = off - (gfn - g0);
            if !o0.is_multiple_of(n) {
                continue;
            }
            if self.files[f].page(off).and_then(|r| r.folio_head).is_none() {
                continue;
            }
            if self.range_uniform_private(vm, f, g0, o0, n) {
                level = l;
                break;
            }
        }
        let n = level.pages();
        let g0 = gfn & !(n - 1);
        let p0 = pfn - (gfn - g0) as u32;
        if level == Level::L4K {
            let file = u32::try_from(f).expect("fewer than 2^32 files");
            self.vms[vm].s2.map_file(gfn, pfn, file, off, &self.files);
        } else {
            self.vms[vm].s2.map(g0, level, p0, true, &self.files);
        }
        let mut ns = self.map_cost(guest);
        let vt = self.vms[vm].vm_type;
        ns += vt.map_private(self, vm, g0, n, p0);
        self.vms[vm].stats.stage2_fault(guest, ns);
    }

    /// What installing one stage-2 mapping costs: with the guest's exit and re-entry for a
    /// guest fault, without for `KVM_PRE_FAULT_MEMORY`.
    fn map_cost(&self, guest: bool) -> u64 {
        if guest {
            self.costs.stage2_map
        } else {
            self.costs.prefault_map
        }
    }

    /// A shared page of a same-page file lives in an order-0 folio (HugeTLB dev tree):
    /// split the huge folio around it first, whenever the folio was allocated whole.
    fn split_for_shared(&mut self, f: usize, off: u64) {
        let file = &self.files[f];
        if file.order == 0 || file.attrs.is_none() {
            return;
        }
        if let Some(h) = file.page(off).and_then(|r| r.folio_head)
            && self.files[f].split(h)
        {
            let vm = self.files[f].vm;
            let c = self.costs.split;
            self.vms[vm].stats.split(c);
        }
    }

    fn range_uniform_private(&self, vm: usize, f: usize, g0: u64, o0: u64, n: u64) -> bool {
        let p = uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;
        if self.vms[vm].strategy.file_attrs()
            && let Some(a) = &self.files[f].attrs
        {
            return a.uniform(o0, o0 + n).is_some_and(|v| v & p != 0);
        }
        self.vms[vm]
            .attrs
            .uniform(g0, g0 + n)
            .is_some_and(|v| v & p != 0)
    }

    // ---------------------------------------------------------------- host side

    /// Fault in anonymous page `idx` of mapping `m` (zero-filled).
    fn anon_fault(&mut self, m: usize, idx: u64) -> Result<u32> {
        if let Some(p) = self.space.maps[m].anon_pfn(idx) {
            return Ok(p);
        }
        let pfn = self.take_frames(None, 0, Placement::Anon(m, idx))?;
        let vm = self.anon_pages_account(m, idx, true);
        self.zero_frames(vm, pfn, 0);
        if let Some(v) = vm {
            let c = self.costs.host_fault;
            self.charge(v, c);
        }
        if let MapKind::Anon { pages, .. } = &mut self.space.maps[m].kind {
            pages.set(idx, pfn + 1);
        }
        self.double_update_anon(m, idx, true);
        Ok(pfn)
    }

    /// Whether the host may map file page `off`.
    pub(crate) fn host_may_access(&self, f: usize, off: u64) -> bool {
        let file = &self.files[f];
        self.vms[file.vm].strategy.host_may_map(self, f, off)
    }

    fn host_fault(&mut self, f: usize, addr: u64, kind: HostFaultKind) -> Error {
        let vm = self.files[f].vm;
        self.vms[vm].stats.host_faults += 1;
        Error::HostFault { addr, kind }
    }

    /// A host fault on page `idx` of guest_memfd mapping `m`: returns (file, offset, pfn).
    fn gmem_map_fault(&mut self, m: usize, idx: u64) -> Result<(usize, u64, u32)> {
        let (f, pgoff, newly) = match &self.space.maps[m].kind {
            MapKind::Gmem {
                file,
                pgoff,
                present,
            } => (*file, *pgoff, !present.contains(idx)),
            MapKind::Anon { .. } => unreachable!("gmem mapping expected"),
        };
        let off = pgoff + idx;
        let addr = self.space.maps[m].addr + (idx << PAGE_SHIFT);
        if off >= self.files[f].size_pages {
            return Err(self.host_fault(f, addr, HostFaultKind::BeyondEof));
        }
        if !self.host_may_access(f, off) {
            return Err(self.host_fault(f, addr, HostFaultKind::Private));
        }
        // kvm_gmem_fault_user_mapping(): a poisoned folio is VM_FAULT_HWPOISON.
        if let Some(r) = self.files[f].page(off)
            && self.frames.poisoned_in(r.pfn, 0)
        {
            let vm = self.files[f].vm;
            self.vms[vm].stats.hwpoison_refusal(0);
            return Err(self.host_fault(f, addr, HostFaultKind::Poisoned));
        }
        let vm = self.files[f].vm;
        let pfn = self.gmem_get_pfn(vm, f, off)?;
        self.split_for_shared(f, off);
        if newly {
            if let MapKind::Gmem { present, .. } = &mut self.space.maps[m].kind {
                present.insert(idx);
            }
            let c = self.costs.host_mmap_fault;
            self.charge(vm, c);
        }
        Ok((f, off, pfn))
    }

    fn check_map_offset(&self, m: usize, offset: u64) -> Result<u64> {
        let map = &self.space.maps[m];
        if map.unmapped {
            return Err(einval("mapping was unmapped"));
        }
        if offset >= map.pages << PAGE_SHIFT {
            return Err(einval(format!(
                "offset {offset:#x} beyond mapping length {:#x}",
                map.pages << PAGE_SHIFT
            )));
        }
        Ok(offset >> PAGE_SHIFT)
    }

    /// A host access at `offset` of mapping `m`.
    pub fn map_access(&mut self, m: usize, offset: u64, op: HostOp) -> Result<u64> {
        let idx = self.check_map_offset(m, offset)?;
        if matches!(self.space.maps[m].kind, MapKind::Anon { .. }) {
            return self.anon_access(m, idx, op);
        }
        if op == HostOp::Unpin {
            let MapKind::Gmem { file, pgoff, .. } = self.space.maps[m].kind else {
                unreachable!()
            };
            return self.gmem_unpin(file, pgoff + idx).map(|()| 0);
        }
        if op == HostOp::Pin
            && let MapKind::Gmem { file, .. } = self.space.maps[m].kind
        {
            self.gup_allowed(file)?;
        }
        let (f, off, pfn) = self.gmem_map_fault(m, idx)?;
        Ok(match op {
            HostOp::Read => self.content_at(Loc::File(f, off)),
            HostOp::Write(v) => {
                self.set_content_at(Loc::File(f, off), v);
                if !self.frames.stale.is_empty() {
                    self.frames.stale.remove(&pfn);
                }
                v
            }
            HostOp::Pin => {
                *self.files[f].pins.entry(off).or_insert(0) += 1;
                0
            }
            HostOp::Unpin => unreachable!("handled above"),
        })
    }

    fn gmem_unpin(&mut self, f: usize, off: u64) -> Result<()> {
        let file = &mut self.files[f];
        if let Some(pfn) = drop_pin(&mut file.pins, &mut file.orphans, off)? {
            let vm = file.vm;
            self.give_frames(Some(vm), pfn, 0);
        }
        Ok(())
    }

    fn anon_access(&mut self, m: usize, idx: u64, op: HostOp) -> Result<u64> {
        match op {
            HostOp::Read => Ok(self.space.maps[m]
                .anon_pfn(idx)
                .map_or(0, |p| self.frames.content.get(u64::from(p)))),
            HostOp::Write(v) => {
                let pfn = self.anon_fault(m, idx)?;
                self.frames.content.set(u64::from(pfn), v);
                if !self.frames.stale.is_empty() {
                    self.frames.stale.remove(&pfn);
                }
                Ok(v)
            }
            HostOp::Pin => {
                self.anon_fault(m, idx)?;
                if let MapKind::Anon { pins, .. } = &mut self.space.maps[m].kind {
                    *pins.entry(idx).or_insert(0) += 1;
                }
                Ok(0)
            }
            HostOp::Unpin => {
                let MapKind::Anon { pins, orphans, .. } = &mut self.space.maps[m].kind else {
                    unreachable!()
                };
                if let Some(pfn) = drop_pin(pins, orphans, idx)? {
                    self.anon_pages_account(m, idx, false);
                    self.give_frames(None, pfn, 0);
                }
                Ok(0)
            }
        }
    }

    /// `madvise(MADV_DONTNEED)`: anonymous pages are freed (pinned ones live on until
    /// unpinned); guest_memfd pages are only unmapped from the host page table.
    pub fn map_discard(&mut self, m: usize, offset: u64, length: u64) -> Result<()> {
        let map = &self.space.maps[m];
        if map.unmapped {
            return Err(einval("mapping was unmapped"));
        }
        let len_b = map.pages << PAGE_SHIFT;
        if !offset.is_multiple_of(PAGE_SIZE)
            || !length.is_multiple_of(PAGE_SIZE)
            || offset.checked_add(length).is_none_or(|e| e > len_b)
        {
            return Err(einval(format!(
                "discard range {offset:#x}+{length:#x} invalid for a mapping of {len_b:#x}"
            )));
        }
        let (i0, i1) = (offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT);
        self.discard_pages(m, i0, i1);
        Ok(())
    }

    pub(crate) fn discard_pages(&mut self, m: usize, i0: u64, i1: u64) {
        match &mut self.space.maps[m].kind {
            MapKind::Gmem { present, .. } => {
                present.remove_range(i0..i1);
            }
            MapKind::Anon { pages, .. } => {
                let victims = pages.entries(i0, i1);
                if victims.is_empty() {
                    return;
                }
                self.anon_invalidate(m, i0, i1);
                for (idx, e) in victims {
                    self.double_update_anon(m, idx, false);
                    let MapKind::Anon {
                        pages,
                        pins,
                        orphans,
                    } = &mut self.space.maps[m].kind
                    else {
                        unreachable!()
                    };
                    pages.set(idx, 0);
                    let vm = if let Some(c) = pins.remove(&idx) {
                        orphans.entry(idx).or_default().push((e - 1, c));
                        self.anon_vms(m, idx).first().copied()
                    } else {
                        let vm = self.anon_pages_account(m, idx, false);
                        self.give_frames(None, e - 1, 0);
                        vm
                    };
                    if let Some(v) = vm {
                        let c = self.costs.host_unmap;
                        self.charge(v, c);
                    }
                }
            }
        }
    }

    /// The MMU notifier: zap shared stage-2 entries that map anonymous pages `[i0, i1)`.
    fn anon_invalidate(&mut self, m: usize, i0: u64, i1: u64) {
        let (a0, a1) = (
            self.space.maps[m].addr + (i0 << PAGE_SHIFT),
            self.space.maps[m].addr + (i1 << PAGE_SHIFT),
        );
        for vm in 0..self.vms.len() {
            let ranges: Vec<(u64, u64)> = self.vms[vm]
                .slots
                .values()
                .filter_map(|s| {
                    let (s0, s1) = (
                        s.userspace_addr,
                        s.userspace_addr + (s.npages << PAGE_SHIFT),
                    );
                    let (lo, hi) = (a0.max(s0), a1.min(s1));
                    (lo < hi).then(|| {
                        (
                            s.base_gfn + ((lo - s0) >> PAGE_SHIFT),
                            s.base_gfn + ((hi - s0) >> PAGE_SHIFT),
                        )
                    })
                })
                .collect();
            for (g0, g1) in ranges {
                self.zap(vm, g0, g1, Some(false));
            }
        }
    }

    /// `munmap()` of a whole mapping.
    pub fn map_unmap(&mut self, m: usize) -> Result<()> {
        if self.space.maps[m].unmapped {
            return Err(einval("mapping already unmapped"));
        }
        let pages = self.space.maps[m].pages;
        self.discard_pages(m, 0, pages);
        let addr = self.space.maps[m].addr;
        self.space.va.remove(&addr);
        self.space.maps[m].unmapped = true;
        if let MapKind::Gmem { file, .. } = self.space.maps[m].kind {
            self.space.gmem_mmaps -= 1;
            self.files[file].mappings.retain(|&x| x != m);
            if self.files[file].vmm_map == Some(m) {
                self.files[file].vmm_map = None;
            }
            self.maybe_release(file);
        }
        Ok(())
    }

    /// A host access to the shared view of `gfn` (event-driven: the VMM touching guest
    /// memory through the memslot's userspace view).
    pub fn host_gfn_access(&mut self, vm: usize, gfn: u64, op: HostOp) -> Result<u64> {
        let Some(slot) = self.vms[vm].slot_at(gfn).cloned() else {
            return Err(err(errno::EFAULT, format!("no memslot at gfn {gfn:#x}")));
        };
        match self.shared_view(vm, &slot, gfn)? {
            SharedView::File(f, off) => {
                let m = self.vmm_mapping(f);
                self.map_access(m, off << PAGE_SHIFT, op)
            }
            SharedView::Hva(hva) => {
                let Some((m, idx)) = self.mapping_at(hva) else {
                    return Err(err(
                        errno::EFAULT,
                        format!("nothing mapped at hva {hva:#x}"),
                    ));
                };
                self.map_access(m, idx << PAGE_SHIFT, op)
            }
        }
    }
}

/// Live pin counts of a page cache (ordered: conversions ask for ranges) or of an
/// anonymous mapping.
trait PinCounts {
    fn count_mut(&mut self, key: u64) -> Option<&mut u32>;
    fn forget(&mut self, key: u64);

    /// Drop one pin of `key`; `false` if it holds none.
    fn unpin(&mut self, key: u64) -> bool {
        let Some(c) = self.count_mut(key) else {
            return false;
        };
        *c -= 1;
        if *c == 0 {
            self.forget(key);
        }
        true
    }
}

impl PinCounts for std::collections::BTreeMap<u64, u32> {
    fn count_mut(&mut self, key: u64) -> Option<&mut u32> {
        self.get_mut(&key)
    }
    fn forget(&mut self, key: u64) {
        self.remove(&key);
    }
}

impl PinCounts for rustc_hash::FxHashMap<u64, u32> {
    fn count_mut(&mut self, key: u64) -> Option<&mut u32> {
        self.get_mut(&key)
    }
    fn forget(&mut self, key: u64) {
        self.remove(&key);
    }
}

/// Drop one pin of page `key`: from its live count, or else from the newest frame
/// orphaned under it (punched or discarded while pinned). `Ok(Some(pfn))` when that was
/// the orphan's last pin: the caller frees the frame. `EINVAL` if the page holds no pin.
fn drop_pin(
    pins: &mut impl PinCounts,
    orphans: &mut rustc_hash::FxHashMap<u64, Vec<(u32, u32)>>,
    key: u64,
) -> Result<Option<u32>> {
    if pins.unpin(key) {
        return Ok(None);
    }
    let Some(list) = orphans.get_mut(&key) else {
        return Err(einval(format!(
            "page at offset {:#x} is not pinned",
            key << PAGE_SHIFT
        )));
    };
    let last = list.last_mut().expect("orphan lists are never empty");
    last.1 -= 1;
    if last.1 > 0 {
        return Ok(None);
    }
    let pfn = last.0;
    list.pop();
    if list.is_empty() {
        orphans.remove(&key);
    }
    Ok(Some(pfn))
}
