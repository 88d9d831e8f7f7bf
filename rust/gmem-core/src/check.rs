//! Invariants: `check_vm` verifies every structural rule and names the one broken.

use crate::cover::Cover;
use crate::error::{Error, Result};
use crate::host::{Fd, Host};
use crate::mapping::MapKind;
use crate::memslot::FilePage;
use crate::stage2::Level;
use crate::{PAGE_SHIFT, uapi};

fn broken(msg: String) -> Error {
    Error::Invariant(msg)
}

impl Host {
    /// Every invariant touching `vm`, plus the host-wide frame ownership rules.
    pub fn check_vm(&self, vm: usize) -> Result<()> {
        let v = &self.vms[vm];
        v.attrs
            .check()
            .map_err(|e| broken(format!("vm attributes: {e}")))?;
        v.s2.check().map_err(broken)?;
        // Memslots and bindings agree.
        for s in v.slots.values() {
            if v.by_gfn.get(s.base_gfn) != Some(s.id) {
                return Err(broken(format!(
                    "memslot {} missing from the gfn index",
                    s.id
                )));
            }
            for (bd, shared) in [(s.gmem, false), (s.shared, true)] {
                let Some(bd) = bd.filter(|b| b.live) else {
                    continue;
                };
                let f = &self.files[bd.file];
                // `kvm_gmem_bind()`: a guest_memfd binds only to memslots of its own VM.
                if f.vm != vm {
                    return Err(broken(format!(
                        "memslot {} bound to a guest_memfd of VM {}",
                        s.id, f.vm
                    )));
                }
                match f.bindings.get(&bd.pgoff) {
                    Some(fb)
                        if fb.vm == vm
                            && fb.slot == s.id
                            && fb.shared_side == shared
                            && fb.end == bd.pgoff + s.npages => {}
                    _ => {
                        return Err(broken(format!(
                            "memslot {} binding not recorded in its guest_memfd",
                            s.id
                        )));
                    }
                }
            }
        }
        // Every stage-2 leaf agrees with attributes and backing.
        for l in v.s2.leaves(&self.files) {
            let n = l.level.pages();
            let slot = v.slot_at(l.gfn).ok_or_else(|| {
                broken(format!("stage-2 maps gfn {:#x} outside any memslot", l.gfn))
            })?;
            if l.gfn + n > slot.end_gfn() {
                return Err(broken(format!(
                    "stage-2 leaf at gfn {:#x} crosses its memslot",
                    l.gfn
                )));
            }
            for i in 0..n {
                let gfn = l.gfn + i;
                if self.gfn_private(vm, gfn) != l.private {
                    return Err(broken(format!(
                        "stage-2 entry for gfn {gfn:#x} disagrees with its attribute"
                    )));
                }
                let pfn = l.pfn + i as u32;
                let backing = if l.private {
                    slot.offset_of(gfn)
                        .filter(|p| p.live)
                        .and_then(|p| self.files[p.file].page(p.off))
                        .map(|r| r.pfn)
                } else {
                    self.shared_pfn_now(vm, slot.id, gfn)
                };
                if self.frames.hwpoison.contains(&pfn) {
                    return Err(broken(format!(
                        "stage-2 maps gfn {gfn:#x} to hwpoisoned pfn {pfn:#x}"
                    )));
                }
                if backing != Some(pfn) {
                    return Err(broken(format!(
                        "stage-2 maps gfn {gfn:#x} to pfn {pfn:#x} but its backing is {backing:?}"
                    )));
                }
                if l.private {
                    v.vm_type.check_private(self, vm, gfn, pfn)?;
                }
            }
            if l.level != Level::L4K && l.level > v.vm_type.max_private_level() {
                return Err(broken(format!(
                    "stage-2 leaf at {:#x} larger than the platform allows",
                    l.gfn
                )));
            }
        }
        // Accounting.
        for f in self.files.iter().filter(|f| f.vm == vm) {
            let recount = f.pages.len() + f.folios.len() as u64 * f.folio_pages();
            if recount != f.nr_pages {
                return Err(broken(format!(
                    "guest_memfd inode {} page count {} != recount {recount}",
                    f.inode, f.nr_pages
                )));
            }
            // A frame's content is in the file while the frame is in its page cache, and
            // at the frame otherwise: never in both, never in the file for an absent page.
            for (off, _) in f.content.all() {
                if f.page(off).is_none() {
                    return Err(broken(format!(
                        "content at absent page {off:#x} of inode {}",
                        f.inode
                    )));
                }
            }
            let cached = f
                .small_pages_in(0, u64::MAX)
                .into_iter()
                .map(|(_, pfn)| (pfn, 1));
            let folios = f.folios.values().map(|&(pfn, _)| (pfn, f.folio_pages()));
            for (pfn, n) in cached.chain(folios) {
                if !self
                    .frames
                    .content
                    .entries(u64::from(pfn), u64::from(pfn) + n)
                    .is_empty()
                {
                    return Err(broken(format!(
                        "frame {pfn:#x} in inode {}'s page cache holds content of its own",
                        f.inode
                    )));
                }
            }
            for &off in f.pins.keys() {
                if f.page(off).is_none() {
                    return Err(broken(format!(
                        "pin on absent page {off:#x} of inode {}",
                        f.inode
                    )));
                }
            }
            if let Some(a) = &f.attrs {
                a.check()
                    .map_err(|e| broken(format!("inode {} attributes: {e}", f.inode)))?;
            }
        }
        let pages = self.count_pages(vm);
        if pages != v.stats.pages_allocated {
            return Err(broken(format!(
                "pages_allocated {} != recount {pages}",
                v.stats.pages_allocated
            )));
        }
        if v.stats.peak_pages_allocated < pages {
            return Err(broken("peak_pages_allocated below pages_allocated".into()));
        }
        let dbl = self.count_double(vm);
        if dbl != v.stats.double_backed_pages {
            return Err(broken(format!(
                "double_backed_pages {} != recount {dbl}",
                v.stats.double_backed_pages
            )));
        }
        if v.huge_bound != self.has_huge_binding(vm) {
            return Err(broken(format!(
                "huge_bound {} disagrees with the live bindings",
                v.huge_bound
            )));
        }
        let cover = Cover::of(
            v.slots
                .values()
                .filter(|s| self.slot_shared_in_userspace(vm, s))
                .map(|s| {
                    (
                        s.userspace_addr,
                        s.userspace_addr + (s.npages << PAGE_SHIFT),
                    )
                }),
        );
        if cover != v.anon_cover {
            return Err(broken("anon_cover disagrees with the memslots".into()));
        }
        let ro = v
            .slots
            .values()
            .filter(|s| s.flags & uapi::KVM_MEM_READONLY != 0)
            .count();
        if ro != v.readonly_slots as usize {
            return Err(broken(format!(
                "readonly_slots {} != {ro} read-only memslots",
                v.readonly_slots
            )));
        }
        self.check_frames()
    }

    /// The frame currently backing `gfn`'s shared view, without faulting.
    fn shared_pfn_now(&self, vm: usize, slot_id: u32, gfn: u64) -> Option<u32> {
        let slot = &self.vms[vm].slots[&slot_id];
        let fp = self.shared_file_page(vm, slot, gfn);
        // A slot without guest_memfd is served from userspace memory whatever the strategy.
        let Some(FilePage {
            file: f,
            off: o,
            live,
        }) = fp
        else {
            let (m, idx) = self.mapping_at(slot.hva_of(gfn))?;
            return match &self.space.maps[m].kind {
                MapKind::Anon { .. } => self.space.maps[m].anon_pfn(idx),
                MapKind::Gmem { file, pgoff, .. } => {
                    self.files[*file].page(pgoff + idx).map(|r| r.pfn)
                }
            };
        };
        if !live {
            return None;
        }
        self.files[f].page(o).map(|r| r.pfn)
    }

    /// Every allocated block with an owner: `(pfn, pages)` of file pages and folios,
    /// anonymous pages, and pinned orphans, unsorted.
    pub(crate) fn owned_blocks(&self) -> Vec<(u32, u32)> {
        let mut owned: Vec<(u32, u32)> = Vec::new(); // (pfn, count)
        for f in &self.files {
            for (_, pfn) in f.small_pages_in(0, u64::MAX) {
                owned.push((pfn, 1));
            }
            for &(pfn, _) in f.folios.values() {
                owned.push((pfn, 1 << f.order));
            }
            owned.extend(f.orphans.values().flatten().map(|&(p, _)| (p, 1)));
        }
        for m in &self.space.maps {
            if let MapKind::Anon { pages, orphans, .. } = &m.kind {
                owned.extend(pages.all().into_iter().map(|(_, e)| (e - 1, 1)));
                owned.extend(orphans.values().flatten().map(|&(p, _)| (p, 1)));
            }
        }
        owned
    }

    /// Host-wide: each frame has at most one owner and no owned frame is free; on each
    /// NUMA node, owned and free frames make up the node; NUMA policies well formed.
    pub fn check_frames(&self) -> Result<()> {
        self.frames.check().map_err(broken)?;
        self.check_fds()?;
        let mut owned = self.owned_blocks();
        owned.sort_unstable();
        // Retired frames: poisoned, and in no page cache or orphan list.
        let held = |p: u32| {
            let i = owned.partition_point(|&(q, _)| q <= p);
            i > 0 && u64::from(owned[i - 1].0) + u64::from(owned[i - 1].1) > u64::from(p)
        };
        let mut end = 0u64;
        let mut per_node = vec![0u64; self.frames.nodes.len()];
        for &p in self.frames.hwpoison.iter().filter(|&&p| !held(p)) {
            if u64::from(p) < self.frames.total_pages() {
                per_node[self.frames.node_of(p) as usize] += 1;
            }
        }
        for &(p, n) in &owned {
            if u64::from(p) < end {
                return Err(broken(format!("pfn {p:#x} has more than one owner")));
            }
            if self.frames.is_free(p) {
                return Err(broken(format!(
                    "pfn {p:#x} is owned but free in the allocator"
                )));
            }
            let node = self.frames.node_of(p);
            let last = p + (n - 1);
            if self.frames.node_of(last) != node {
                return Err(broken(format!(
                    "block {p:#x}+{n} straddles NUMA nodes {node} and {}",
                    self.frames.node_of(last)
                )));
            }
            per_node[node as usize] += u64::from(n);
            end = u64::from(p) + u64::from(n);
        }
        let total: u64 = per_node.iter().sum();
        if total + self.frames.free_pages() != self.frames.total_pages() {
            return Err(broken(format!(
                "frames: {} owned + {} free != {} total",
                total,
                self.frames.free_pages(),
                self.frames.total_pages()
            )));
        }
        for (k, (&used, a)) in per_node.iter().zip(&self.frames.nodes).enumerate() {
            if used + a.free_pages() != self.frames.node_pages {
                return Err(broken(format!(
                    "node {k}: {used} owned + {} free != {} pages",
                    a.free_pages(),
                    self.frames.node_pages
                )));
            }
        }
        let nr = self.frames.nr_nodes();
        if let Some(p) = self.frames.task_policy {
            p.check(nr)
                .map_err(|e| broken(format!("task memory policy: {e}")))?;
        }
        for f in &self.files {
            f.policy
                .check(nr)
                .map_err(|e| broken(format!("guest_memfd {}: {e}", f.inode)))?;
        }
        for (i, m) in self.space.maps.iter().enumerate() {
            if matches!(m.kind, MapKind::Gmem { .. }) && !m.policy.is_empty() {
                return Err(broken(format!(
                    "guest_memfd mapping {i} holds a policy of its own"
                )));
            }
            m.policy
                .check(nr)
                .map_err(|e| broken(format!("mapping {i}: {e}")))?;
        }
        Ok(())
    }

    /// The fd table: numbers from 3 below `next_fd` are each open or free, never both; an
    /// open guest_memfd fd is its file's, a VM fd its VM's.
    fn check_fds(&self) -> Result<()> {
        let open = self.fds.len() + self.free_fds.len();
        if self.free_fds.iter().any(|fd| self.fds.contains_key(fd))
            || self
                .fds
                .keys()
                .chain(&self.free_fds)
                .any(|&fd| fd < 3 || fd >= self.next_fd)
            || i64::try_from(open).ok() != Some(i64::from(self.next_fd) - 3)
        {
            return Err(broken(format!(
                "fd table: {} open and {} free numbers do not make up 3..{}",
                self.fds.len(),
                self.free_fds.len(),
                self.next_fd
            )));
        }
        for (&fd, kind) in &self.fds {
            let ok = match *kind {
                Fd::Kvm => fd == self.kvm_fd(),
                Fd::Vm(v) => self.vms.get(v).is_some_and(|vm| vm.fd == fd),
                Fd::Gmem(f) => self.files.get(f).is_some_and(|g| g.fd == Some(fd)),
            };
            if !ok {
                return Err(broken(format!("fd {fd} does not belong to what it names")));
            }
        }
        for (i, g) in self.files.iter().enumerate() {
            if let Some(fd) = g.fd
                && !matches!(self.fds.get(&fd), Some(&Fd::Gmem(f)) if f == i)
            {
                return Err(broken(format!(
                    "guest_memfd {i}'s fd {fd} is not in the table"
                )));
            }
        }
        Ok(())
    }

    /// Every VM's invariants.
    pub fn check(&self) -> Result<()> {
        for vm in 0..self.vms.len() {
            self.check_vm(vm)?;
        }
        let live = self
            .space
            .maps
            .iter()
            .filter(|m| !m.unmapped && matches!(m.kind, MapKind::Gmem { .. }))
            .count();
        // No host page table reaches a page the host may not fault, nor a hwpoisoned page
        // (memory_failure() unmapped it, and no fault maps it again).
        for m in &self.space.maps {
            let MapKind::Gmem {
                file,
                pgoff,
                present,
            } = &m.kind
            else {
                continue;
            };
            for i in present {
                let what = if !self.host_may_access(*file, pgoff + i) {
                    "private"
                } else if self.files[*file]
                    .page(pgoff + i)
                    .is_some_and(|r| self.frames.hwpoison.contains(&r.pfn))
                {
                    "hwpoisoned"
                } else {
                    continue;
                };
                return Err(broken(format!(
                    "host mapping at {:#x} reaches {what} page {:#x} of guest_memfd {file}",
                    m.addr + (i << PAGE_SHIFT),
                    pgoff + i
                )));
            }
        }
        if live != self.space.gmem_mmaps as usize {
            return Err(broken(format!(
                "{} guest_memfd mmaps counted, {live} live",
                self.space.gmem_mmaps
            )));
        }
        self.check_frames()
    }
}

#[cfg(test)]
mod tests {
    use crate::host::Host;
    use crate::mapping::MapKind;
    use crate::{GmemArg, MemRegion, StrategyKind, VmType, uapi};

    #[test]
    fn check_finds_a_host_mapping_of_a_private_page() {
        let mut h = Host::new(64 << 20).unwrap();
        let vm = h.create_vm(VmType::Snp, StrategyKind::Realloc);
        let f = h
            .create_guest_memfd(vm, 1 << 20, uapi::GUEST_MEMFD_FLAG_MMAP, 0)
            .unwrap();
        let m = h.gmem_mmap(f, 0, None, true).unwrap();
        h.check().unwrap();
        // A page-table entry no fault could have installed: no gfn makes page 1 shared.
        if let MapKind::Gmem { present, .. } = &mut h.space.maps[m].kind {
            present.insert(1);
        }
        let e = h.check().unwrap_err().to_string();
        assert!(e.contains("reaches private page 0x1"), "{e}");
    }

    #[test]
    fn check_finds_a_memslot_bound_to_another_vms_guest_memfd() {
        let mut h = Host::new(64 << 20).unwrap();
        let vm = h.create_vm(VmType::Tdx, StrategyKind::Dual);
        let other = h.create_vm(VmType::Tdx, StrategyKind::Dual);
        let f = h.create_guest_memfd(vm, 1 << 20, 0, 0).unwrap();
        let g = h.create_guest_memfd(other, 1 << 20, 0, 0).unwrap();
        let m = h.mmap_anonymous(1 << 20).unwrap();
        let r = MemRegion {
            slot: 0,
            flags: uapi::KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: h.mapping(m).addr,
            guest_memfd: GmemArg::Fd(i64::from(h.file(f).fd.unwrap())),
            guest_memfd_offset: 0,
            shared_guest_memfd: GmemArg::None,
            shared_offset: None,
        };
        h.set_user_memory_region2(vm, r).unwrap();
        h.check().unwrap();
        // State no ioctl makes (`kvm_gmem_bind()` refuses another VM's guest_memfd), as a
        // crafted snapshot could hold it: the file is VM `other`'s.
        h.files[f].vm = other;
        h.files[g].vm = vm;
        let e = h.check().unwrap_err().to_string();
        assert!(e.contains("bound to a guest_memfd of VM"), "{e}");
    }
}
