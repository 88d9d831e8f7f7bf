//! Memslots: a gfn range, its userspace address and its guest_memfd binding(s); and the
//! memslot ioctl, `KVM_SET_USER_MEMORY_REGION2` with `kvm_gmem_bind()`'s checks.

use crate::error::{Result, einval, err, errno};
use crate::guest_memfd::FileBinding;
use crate::host::{Fd, GmemArg, Host, MemRegion};
use crate::{PAGE_SHIFT, PAGE_SIZE, uapi};

/// A guest_memfd range bound to a memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Binding {
    /// Host-wide file id.
    pub file: usize,
    /// First file page of the binding.
    pub pgoff: u64,
    /// False once the file was released: the slot keeps existing but has no backing
    /// (mainline `kvm_gmem_release` sets `slot->gmem.file = NULL`).
    pub live: bool,
}

impl Binding {
    /// The file page bound to the `i`-th page of the memslot.
    #[inline]
    pub fn page(self, i: u64) -> FilePage {
        FilePage {
            file: self.file,
            off: self.pgoff + i,
            live: self.live,
        }
    }
}

/// The guest_memfd page a memslot binding gives a gfn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePage {
    /// Host-wide file id.
    pub file: usize,
    /// Page offset in the file.
    pub off: u64,
    /// The binding's file is not released.
    pub live: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Memslot {
    /// `as_id << 16 | slot`.
    pub id: u32,
    pub base_gfn: u64,
    pub npages: u64,
    pub flags: u32,
    pub userspace_addr: u64,
    /// The private side (`KVM_MEM_GUEST_MEMFD`).
    pub gmem: Option<Binding>,
    /// The shared side for `two_offsets`.
    pub shared: Option<Binding>,
}

impl Memslot {
    pub fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }

    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn < self.end_gfn()
    }

    /// File page backing `gfn` on the private side.
    #[inline]
    pub fn offset_of(&self, gfn: u64) -> Option<FilePage> {
        self.gmem.map(|b| b.page(gfn - self.base_gfn))
    }

    /// File page backing `gfn` on the `two_offsets` shared side.
    #[inline]
    pub fn shared_offset_of(&self, gfn: u64) -> Option<FilePage> {
        self.shared.map(|b| b.page(gfn - self.base_gfn))
    }

    /// Host virtual address of `gfn`'s userspace memory.
    pub fn hva_of(&self, gfn: u64) -> u64 {
        self.userspace_addr + ((gfn - self.base_gfn) << crate::PAGE_SHIFT)
    }
}

// ---------------------------------------------------------------- KVM_SET_USER_MEMORY_REGION2

impl Host {
    /// Resolve an fd argument to a guest_memfd of `vm` (mainline `kvm_gmem_bind` checks).
    pub(crate) fn resolve_gmem(&self, vm: usize, arg: GmemArg) -> Result<usize> {
        let fd = match arg {
            GmemArg::None => return Err(err(errno::EBADF, "no guest_memfd given")),
            GmemArg::Foreign => {
                return Err(einval("the guest_memfd belongs to another host's VM"));
            }
            GmemArg::Fd(fd) => fd,
        };
        // fds 0-2 are the VMM's standard streams: open, but not guest_memfds (the
        // kernel's `fget()` succeeds, `kvm_gmem_bind()` then fails with EINVAL).
        if (0..3).contains(&fd) {
            return Err(einval(format!("fd {fd} is not a guest_memfd")));
        }
        let Some(kind) = i32::try_from(fd).ok().and_then(|f| self.fds.get(&f)) else {
            return Err(err(errno::EBADF, format!("fd {fd} is not open")));
        };
        match *kind {
            Fd::Gmem(f) if self.files[f].vm == vm => Ok(f),
            Fd::Gmem(_) => Err(einval(format!("fd {fd} is a guest_memfd of another VM"))),
            _ => Err(einval(format!("fd {fd} is not a guest_memfd"))),
        }
    }

    /// Whether a memslot's guest faults, shared ones too, are served from guest_memfd
    /// (internal `KVM_MEMSLOT_GMEM_ONLY`: the bound file supports mmap).
    pub(crate) fn slot_gmem_only(&self, vm: usize, slot: u32) -> bool {
        self.vms[vm].slots[&slot]
            .gmem
            .is_some_and(|b| self.files[b.file].flags & uapi::GUEST_MEMFD_FLAG_MMAP != 0)
    }

    /// `KVM_SET_USER_MEMORY_REGION2`, checks in the order of mainline
    /// `kvm_set_memory_region()` and `kvm_gmem_bind()`.
    pub fn set_user_memory_region2(&mut self, vm: usize, r: MemRegion) -> Result<()> {
        let valid =
            uapi::KVM_MEM_LOG_DIRTY_PAGES | uapi::KVM_MEM_READONLY | uapi::KVM_MEM_GUEST_MEMFD;
        let gm = r.flags & uapi::KVM_MEM_GUEST_MEMFD != 0;
        if r.flags & !valid != 0 {
            return Err(einval(format!("memslot flags {:#x} unknown", r.flags)));
        }
        if gm && r.flags & (uapi::KVM_MEM_LOG_DIRTY_PAGES | uapi::KVM_MEM_READONLY) != 0 {
            return Err(einval(
                "KVM_MEM_GUEST_MEMFD cannot be combined with dirty logging or read-only",
            ));
        }
        if r.flags & uapi::KVM_MEM_READONLY != 0 && !self.vms[vm].vm_type.has_readonly_mem() {
            return Err(einval(format!(
                "{} VMs have no read-only memslots",
                self.vms[vm].vm_type.name()
            )));
        }
        if !r.memory_size.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "memory_size {:#x} not page aligned",
                r.memory_size
            )));
        }
        if !r.guest_phys_addr.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "guest_phys_addr {:#x} not page aligned",
                r.guest_phys_addr
            )));
        }
        if !r.userspace_addr.is_multiple_of(PAGE_SIZE)
            || r.userspace_addr
                .checked_add(r.memory_size)
                .is_none_or(|e| e > uapi::TASK_SIZE)
        {
            return Err(einval(format!(
                "userspace_addr {:#x} not page aligned or not user memory",
                r.userspace_addr
            )));
        }
        if gm
            && (!r.guest_memfd_offset.is_multiple_of(PAGE_SIZE)
                || r.guest_memfd_offset.checked_add(r.memory_size).is_none())
        {
            return Err(einval(format!(
                "guest_memfd_offset {:#x} not page aligned or overflows",
                r.guest_memfd_offset
            )));
        }
        let (as_id, id) = (r.slot >> 16, r.slot & 0xffff);
        if as_id != 0 || id >= uapi::KVM_USER_MEM_SLOTS {
            return Err(einval(format!("slot {:#x} out of range", r.slot)));
        }
        if r.guest_phys_addr.checked_add(r.memory_size).is_none() {
            return Err(einval("guest physical range wraps"));
        }
        let npages = r.memory_size >> PAGE_SHIFT;
        if npages > uapi::KVM_MEM_MAX_NR_PAGES {
            return Err(einval(format!(
                "memory_size {:#x} too large",
                r.memory_size
            )));
        }
        let base_gfn = r.guest_phys_addr >> PAGE_SHIFT;
        if r.memory_size == 0 {
            if !self.vms[vm].slots.contains_key(&r.slot) {
                return Err(einval(format!("slot {} does not exist", r.slot)));
            }
            self.delete_slot(vm, r.slot);
            return Ok(());
        }
        if let Some(old) = self.vms[vm].slots.get(&r.slot) {
            // Private memslots are immutable: they can only be deleted.
            if gm || old.gmem.is_some() {
                return Err(einval("memslots with guest_memfd can only be deleted"));
            }
            if r.userspace_addr != old.userspace_addr
                || npages != old.npages
                || (r.flags ^ old.flags) & uapi::KVM_MEM_READONLY != 0
            {
                return Err(einval(
                    "a memslot's size, address and READONLY flag cannot change",
                ));
            }
            if base_gfn == old.base_gfn {
                self.vms[vm].slots.get_mut(&r.slot).expect("exists").flags = r.flags;
                return Ok(());
            }
            if self.overlaps(vm, r.slot, base_gfn, npages) {
                return Err(err(errno::EEXIST, "memslot overlaps another memslot"));
            }
            self.vms[vm].vm_type.check_max_gfn(base_gfn, npages)?;
            // MOVE: delete and recreate at the new base.
            let mut moved = old.clone();
            self.delete_slot(vm, r.slot);
            moved.base_gfn = base_gfn;
            moved.flags = r.flags;
            self.insert_slot(vm, moved);
            return Ok(());
        }
        if self.overlaps(vm, r.slot, base_gfn, npages) {
            return Err(err(
                errno::EEXIST,
                format!(
                    "gpa range {:#x}+{:#x} overlaps another memslot",
                    r.guest_phys_addr, r.memory_size
                ),
            ));
        }
        let strategy = self.vms[vm].strategy;
        let mut gmem = None;
        let mut shared = None;
        if gm {
            let f = self.resolve_gmem(vm, r.guest_memfd)?;
            let pgoff = r.guest_memfd_offset >> PAGE_SHIFT;
            self.check_bind(f, pgoff, npages, r.guest_memfd_offset, r.memory_size)?;
            gmem = Some(Binding {
                file: f,
                pgoff,
                live: true,
            });
            let wants_shared = r.shared_offset.is_some() || r.shared_guest_memfd != GmemArg::None;
            if strategy.binds_second_range() && wants_shared {
                // Without a shared range the slot's shared side stays at userspace_addr.
                shared = Some(self.bind_second_range(
                    vm,
                    r.shared_guest_memfd,
                    r.shared_offset,
                    f,
                    pgoff,
                    npages,
                    r.memory_size,
                )?);
            } else if wants_shared {
                return Err(einval(
                    "shared_guest_memfd/shared_offset are only for two_offsets",
                ));
            }
        } else if r.shared_offset.is_some() || r.shared_guest_memfd != GmemArg::None {
            return Err(einval(
                "shared_guest_memfd/shared_offset need KVM_MEM_GUEST_MEMFD",
            ));
        }
        // x86 `kvm_arch_prepare_memory_region()`, after the bind (which it undoes).
        self.vms[vm].vm_type.check_max_gfn(base_gfn, npages)?;
        let slot = Memslot {
            id: r.slot,
            base_gfn,
            npages,
            flags: r.flags,
            userspace_addr: r.userspace_addr,
            gmem,
            shared,
        };
        self.insert_slot(vm, slot);
        Ok(())
    }

    pub(crate) fn check_bind(
        &self,
        f: usize,
        pgoff: u64,
        npages: u64,
        off: u64,
        size: u64,
    ) -> Result<()> {
        let file = &self.files[f];
        // Offsets are unsigned since 7.2 (the `offset < 0` check is gone); the caller has
        // checked that offset + size does not wrap.
        if pgoff + npages > file.size_pages {
            return Err(einval(format!(
                "guest_memfd range {off:#x}+{size:#x} beyond file size {:#x}",
                file.size_pages << PAGE_SHIFT
            )));
        }
        if file.range_bound(pgoff, pgoff + npages) {
            // kvm_gmem_bind() since 7.2: EEXIST when xa_find() finds a binding (EINVAL up
            // to 7.1).
            return Err(err(
                errno::EEXIST,
                format!("guest_memfd range {off:#x}+{size:#x} is already bound"),
            ));
        }
        Ok(())
    }

    pub(crate) fn overlaps(&self, vm: usize, slot: u32, base: u64, npages: u64) -> bool {
        self.vms[vm]
            .slots_in(base, base + npages)
            .iter()
            .any(|&s| s != slot)
    }

    pub(crate) fn insert_slot(&mut self, vm: usize, slot: Memslot) {
        let (id, base, n) = (slot.id, slot.base_gfn, slot.npages);
        for (b, shared_side) in [(slot.gmem, false), (slot.shared, true)] {
            if let Some(b) = b {
                self.files[b.file].bindings.insert(
                    b.pgoff,
                    FileBinding {
                        end: b.pgoff + n,
                        vm,
                        slot: id,
                        shared_side,
                    },
                );
            }
        }
        let v = &mut self.vms[vm];
        v.by_gfn.insert(base, id);
        v.slots.insert(id, slot);
        // What a new slot changes, found from the slot alone (adding the kernel's 32764
        // memslots one by one stays linear): the footprint only if it points at
        // anonymous pages that exist, the double backing by its own pages, `huge_bound`
        // only towards true.
        let slot = &self.vms[vm].slots[&id];
        let dbl = self.slot_double(vm, slot);
        let huge = self.slot_huge(slot);
        let ro = slot.flags & uapi::KVM_MEM_READONLY != 0;
        let newly = self.cover_slot(vm, id, true);
        let v = &mut self.vms[vm];
        v.stats.pages_allocated += newly;
        v.stats.peak_pages_allocated = v.stats.peak_pages_allocated.max(v.stats.pages_allocated);
        v.stats.double_backed_pages += dbl;
        v.huge_bound |= huge;
        v.readonly_slots += u32::from(ro);
    }

    /// Count memslot `id` of `vm` into (`add`) or out of the VM's cover of host addresses,
    /// if its shared view is userspace memory; returns the anonymous pages (and pinned
    /// orphans) that the change brings into or takes out of the VM's footprint.
    pub(crate) fn cover_slot(&mut self, vm: usize, id: u32, add: bool) -> u64 {
        let slot = &self.vms[vm].slots[&id];
        if !self.slot_shared_in_userspace(vm, slot) {
            return 0;
        }
        let a0 = slot.userspace_addr;
        let a1 = a0 + (slot.npages << PAGE_SHIFT);
        let edges = self.vms[vm].anon_cover.change(a0, a1, add);
        edges
            .into_iter()
            .map(|(s, e)| self.anon_pages_in(s, e))
            .sum()
    }

    /// Whether `slot` binds a live private side of huge (HugeTLB) folios.
    pub(crate) fn slot_huge(&self, slot: &Memslot) -> bool {
        slot.gmem
            .is_some_and(|b| b.live && self.files[b.file].order > 0)
    }

    pub(crate) fn delete_slot(&mut self, vm: usize, id: u32) {
        // As for `insert_slot`: only what this slot contributed changes.
        let slot = &self.vms[vm].slots[&id];
        let dbl = self.slot_double(vm, slot);
        let huge = self.slot_huge(slot);
        let gone = self.cover_slot(vm, id, false);
        self.vms[vm].stats.pages_allocated -= gone;
        let slot = self.vms[vm].slots.remove(&id).expect("exists");
        self.vms[vm].by_gfn.remove(slot.base_gfn);
        for b in [slot.gmem, slot.shared].into_iter().flatten() {
            if b.live {
                self.files[b.file].bindings.remove(&b.pgoff);
                // An offset no gfn reaches has no attribute that makes it shared any more
                // (see `host_may_access`): the host loses the mappings it took through one.
                self.unmap_unreachable(b.file, b.pgoff, b.pgoff + slot.npages);
            }
        }
        self.zap(vm, slot.base_gfn, slot.end_gfn(), None);
        self.vms[vm].stats.double_backed_pages -= dbl;
        self.vms[vm].readonly_slots -= u32::from(slot.flags & uapi::KVM_MEM_READONLY != 0);
        if huge {
            self.vms[vm].huge_bound = self.has_huge_binding(vm);
        }
    }
}

#[cfg(test)]
impl Host {
    /// Unit tests' layout: memslot 0 at gpa 0, `size` bytes, private side guest_memfd
    /// `f` from offset 0, `userspace_addr` new anonymous memory (returned: its mapping).
    pub(crate) fn bind_at_zero(&mut self, vm: usize, f: usize, size: u64) -> usize {
        let anon = self.mmap_anonymous(size).expect("mmap");
        let fd = i64::from(self.file(f).fd().expect("open guest_memfd"));
        self.set_user_memory_region2(
            vm,
            MemRegion {
                slot: 0,
                flags: uapi::KVM_MEM_GUEST_MEMFD,
                guest_phys_addr: 0,
                memory_size: size,
                userspace_addr: self.mapping(anon).addr,
                guest_memfd: GmemArg::Fd(fd),
                guest_memfd_offset: 0,
                shared_guest_memfd: GmemArg::None,
                shared_offset: None,
            },
        )
        .expect("guest_memfd memslot");
        anon
    }
}
