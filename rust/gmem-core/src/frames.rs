//! Host frames: the page allocator's blocks handed to VMs and the VMM, where each
//! frame's content lives (the frame store or a guest_memfd page cache), the owner tags of
//! stale data left in freed frames, and the SEV-SNP RMP entries released with a frame.

use crate::error::Result;
use crate::host::{HOST_WRITER, Host, Loc};
use crate::sparse::{Dense, SparseVec};
use crate::vm::ZeroPolicy;

impl Host {
    /// The content at `loc`.
    #[allow(clippy::inline_always)] // on every read; left to the inliner it stays a call
    #[inline(always)]
    pub(crate) fn content_at(&self, loc: Loc) -> u64 {
        match loc {
            Loc::Frame(p) => self.content.get(u64::from(p)),
            Loc::File(f, off) => self.files[f].content.get(off),
        }
    }

    /// Store `v` at `loc`.
    #[inline]
    pub(crate) fn set_content_at(&mut self, loc: Loc, v: u64) {
        match loc {
            Loc::Frame(p) => self.content.set(u64::from(p), v),
            Loc::File(f, off) => self.files[f].content.set(off, v),
        };
    }

    /// Whether a freed frame's data can reach its next user: only when some VM skips
    /// zeroing.
    pub(crate) fn frames_may_leak(&self) -> bool {
        self.vms.iter().any(|v| v.opts.zero == ZeroPolicy::Never)
    }

    /// Frames `pfn..pfn + n` enter `file`'s page cache at `off..off + n`: their content
    /// (left by a previous owner, if any) moves with them.
    pub(crate) fn admit_content(&mut self, file: usize, off: u64, pfn: u32, n: u64) {
        let c = &mut self.files[file].content;
        move_content(&mut self.content, u64::from(pfn), c, off, n);
    }

    /// Pages `off..off + n` of `file` (frames `pfn..pfn + n`) leave its page cache: their
    /// content goes back to the frames.
    pub(crate) fn evict_content(&mut self, file: usize, off: u64, pfn: u32, n: u64) {
        if !self.frames_may_leak() {
            // Unobservable from here on (see `give_frames`): dropped in O(chunks).
            self.files[file].content.clear_range(off, off + n);
            return;
        }
        let c = &mut self.files[file].content;
        move_content(c, off, &mut self.content, u64::from(pfn), n);
    }

    /// Allocate a block of `2^order` frames for `vm` (None: a mapping no VM owns yet).
    pub(crate) fn take_frames(&mut self, vm: Option<usize>, order: u32) -> Result<u32> {
        let pfn = self.alloc.alloc(order)?;
        if let Some(v) = vm {
            let cost = self.costs.alloc(order);
            self.vms[v].stats.allocated(1u64 << order, cost);
        }
        Ok(pfn)
    }

    /// Return a block of frames. Under `ZeroPolicy::OnFree` they are cleared first; otherwise
    /// their content stays in RAM, as on real hardware, until someone clears it.
    pub(crate) fn give_frames(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        if let Some(v) = vm {
            if self.vms[v].opts.zero == ZeroPolicy::OnFree {
                self.zero_frames(Some(v), pfn, order);
            }
            let cost = self.costs.free(order);
            self.vms[v].stats.freed(1u64 << order, cost);
        }
        let (a, b) = (u64::from(pfn), u64::from(pfn) + (1u64 << order));
        if self.frames_may_leak() {
            // Someone may hand these frames out unzeroed: remember whose data they hold.
            let tag = vm.map_or(HOST_WRITER, |v| v as u16 + 1);
            for (p, _) in self.content.entries(a, b) {
                self.stale.insert(p as u32, tag);
            }
        } else {
            // Every later user clears the frames before reading them (guest_memfd zeroes on
            // first use, anonymous memory is zero-filled): the leftover data is unobservable,
            // so the model stops carrying it.
            self.content.clear_range(a, b);
        }
        if let Some(owner) = self.rmp_release(pfn, order) {
            // kvm_arch_gmem_invalidate: the frames go back to the hypervisor state.
            self.vms[owner].stats.rmpupdates += 1;
            let c = self.costs.rmpupdate;
            self.charge(owner, c);
        }
        self.alloc.free(pfn, order);
    }

    /// Clear the pages `off..off + 2^order` of `file`'s page cache (frames from `pfn`),
    /// counted as zeroing.
    pub(crate) fn zero_file_pages(
        &mut self,
        vm: Option<usize>,
        file: usize,
        off: u64,
        pfn: u32,
        order: u32,
    ) {
        self.files[file]
            .content
            .clear_range(off, off + (1u64 << order));
        self.count_zeroed(vm, pfn, order);
    }

    /// Clear a block of frames in no page cache, counted as zeroing.
    pub(crate) fn zero_frames(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        let (a, b) = (u64::from(pfn), u64::from(pfn) + (1u64 << order));
        self.content.clear_range(a, b);
        self.count_zeroed(vm, pfn, order);
    }

    /// A block of frames was just cleared: nobody's data is left in it; count the zeroing.
    pub(crate) fn count_zeroed(&mut self, vm: Option<usize>, pfn: u32, order: u32) {
        let (a, b) = (u64::from(pfn), u64::from(pfn) + (1u64 << order));
        if !self.stale.is_empty() {
            if b - a <= self.stale.len() as u64 {
                for p in a..b {
                    self.stale.remove(&(p as u32));
                }
            } else {
                self.stale
                    .retain(|&p, _| u64::from(p) < a || u64::from(p) >= b);
            }
        }
        if let Some(v) = vm {
            let cost = self.costs.zero(order);
            self.vms[v].stats.zeroed(1u64 << order, cost);
        }
    }

    /// Drop RMP assignments of a block being freed; the VM that owned them, if any.
    pub(crate) fn rmp_release(&mut self, pfn: u32, order: u32) -> Option<usize> {
        if self.rmp.is_empty() {
            return None;
        }
        let mut owner = None;
        for p in pfn..pfn + (1u32 << order) {
            if let Some((v, _)) = self.rmp.remove(&p) {
                owner = Some(v);
            }
        }
        owner
    }
}

/// Move the entries of `src` at `s0..s0 + n` to `dst` at `d0..d0 + n`, leaving `src`
/// empty there (a page's content follows it into or out of a page cache).
fn move_content(
    src: &mut SparseVec<u64, Dense<u64>>,
    s0: u64,
    dst: &mut SparseVec<u64, Dense<u64>>,
    d0: u64,
    n: u64,
) {
    let moved = src.entries(s0, s0 + n);
    if moved.is_empty() {
        return;
    }
    src.clear_range(s0, s0 + n);
    for (k, v) in moved {
        dst.set(d0 + (k - s0), v);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::host::{GmemArg, MemRegion};
    use crate::platform::VmType;
    use crate::strategy::StrategyKind;
    use crate::uapi;

    /// A VM with one 4 MiB memslot bound to a guest_memfd, its first MiB private, and
    /// page 1 written by the guest (7).
    pub(crate) fn sample(zero: ZeroPolicy) -> (Host, usize, usize) {
        let mut h = Host::new(64 << 20).unwrap();
        let vm = h.create_vm(VmType::Snp, StrategyKind::Dual);
        h.vms[vm].opts.zero = zero;
        let f = h.create_guest_memfd(vm, 4 << 20, 0, 0).unwrap();
        let m = h.mmap_anonymous(4 << 20).unwrap();
        let fd = i64::from(h.file(f).fd.unwrap());
        let addr = h.mapping(m).addr;
        h.set_user_memory_region2(
            vm,
            MemRegion {
                slot: 0,
                flags: uapi::KVM_MEM_GUEST_MEMFD,
                guest_phys_addr: 0,
                memory_size: 4 << 20,
                userspace_addr: addr,
                guest_memfd: GmemArg::Fd(fd),
                guest_memfd_offset: 0,
                shared_guest_memfd: GmemArg::None,
                shared_offset: None,
            },
        )
        .unwrap();
        h.set_memory_attributes(vm, 0, 1 << 20, uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)
            .unwrap();
        h.guest_access(vm, 0x1000, true, Some(7)).unwrap();
        (h, vm, f)
    }

    #[test]
    fn content_lives_in_the_file_while_the_frame_is_cached() {
        let (mut h, vm, f) = sample(ZeroPolicy::Never);
        let pfn = h.file(f).page(1).unwrap().pfn;
        assert_eq!(h.files[f].content.get(1), 7);
        assert_eq!(h.content.get(u64::from(pfn)), 0);
        h.check().unwrap();
        // Punched, the frame leaves the page cache with its data (nothing clears it under
        // ZeroPolicy::Never): the data goes back to the frame.
        h.gmem_fallocate(
            f,
            uapi::FALLOC_FL_PUNCH_HOLE | uapi::FALLOC_FL_KEEP_SIZE,
            0x1000,
            0x1000,
        )
        .unwrap();
        assert_eq!(h.files[f].content.get(1), 0);
        assert_eq!(h.content.get(u64::from(pfn)), 7);
        assert_eq!(h.stale.get(&pfn), Some(&(vm as u16 + 1)));
        h.check().unwrap();
        // The next allocation reuses the frame: its data enters the file with it, and the
        // guest, never zeroing, reads it back at another page.
        assert_eq!(h.guest_access(vm, 0x2000, true, None).unwrap(), 7);
        assert_eq!(h.file(f).page(2).unwrap().pfn, pfn);
        assert_eq!(h.files[f].content.get(2), 7);
        assert_eq!(h.content.get(u64::from(pfn)), 0);
        h.check().unwrap();
    }

    #[test]
    fn punched_content_is_dropped_when_every_user_zeroes() {
        let (mut h, vm, f) = sample(ZeroPolicy::OnUse);
        let pfn = h.file(f).page(1).unwrap().pfn;
        h.gmem_fallocate(
            f,
            uapi::FALLOC_FL_PUNCH_HOLE | uapi::FALLOC_FL_KEEP_SIZE,
            0x1000,
            0x1000,
        )
        .unwrap();
        assert_eq!(h.content.get(u64::from(pfn)), 0);
        assert_eq!(h.guest_access(vm, 0x1000, true, None).unwrap(), 0);
        h.check().unwrap();
    }

    #[test]
    fn check_finds_misplaced_content() {
        let (h, _, f) = sample(ZeroPolicy::OnUse);
        let pfn = h.file(f).page(1).unwrap().pfn;
        // The frame's own store holds content while the frame is in the page cache.
        let mut both = h.clone();
        both.content.set(u64::from(pfn), 9);
        assert!(both.check().is_err());
        // Content at a file page the page cache does not hold.
        let mut absent = h.clone();
        absent.files[f].content.set(5, 9);
        assert!(absent.check().is_err());
        // A miscounted guest_memfd mmap.
        let mut counted = h;
        counted.gmem_mmaps = 1;
        assert!(counted.check().is_err());
    }

    /// Private 4 KiB leaves faulted from a guest_memfd in scattered order keep no frame
    /// table: their frames are read from the page cache. A shared leaf in the same 2 MiB
    /// turns the slot into a table holding the same frames. A page that leaves the page
    /// cache under a live leaf (no zap) is caught by `check()`.
    #[test]
    fn stage2_file_slots() {
        let (mut h, vm, f) = sample(ZeroPolicy::OnUse);
        let frame = |h: &Host, g: u64| h.vms[vm].s2.lookup(g, &h.files).map(|l| l.pfn);
        for i in 0..256u64 {
            let g = i * 97 % 256;
            h.guest_access(vm, g << 12, true, Some(g + 1)).unwrap();
        }
        assert_eq!(h.vms[vm].s2.frame_tables(), 0);
        let frames: Vec<Option<u32>> = (0..256).map(|g| frame(&h, g)).collect();
        for (g, p) in frames.iter().enumerate() {
            assert_eq!(*p, h.file(f).page(g as u64).map(|r| r.pfn));
        }
        // Faulted in scattered order: not a run.
        assert!((1..256).any(|g| frames[g] != frames[0].map(|p| p + g as u32)));
        h.check().unwrap();
        // Gfn 300 is shared: ordinary memory, in the same 2 MiB slot.
        h.guest_access(vm, 300 << 12, false, Some(5)).unwrap();
        assert_eq!(h.vms[vm].s2.frame_tables(), 1);
        assert!(!h.vms[vm].s2.lookup(300, &h.files).unwrap().private);
        assert_eq!((0..256).map(|g| frame(&h, g)).collect::<Vec<_>>(), frames);
        assert_eq!(h.guest_access(vm, 37 << 12, true, None).unwrap(), 38);
        h.check().unwrap();
        // A file slot again (the second 2 MiB), whose page 1 leaves the page cache with
        // the leaf still mapped, as no path of the host allows.
        h.set_memory_attributes(vm, 2 << 20, 4096 * 4, uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)
            .unwrap();
        for g in [515u64, 513, 512, 514] {
            h.guest_access(vm, g << 12, true, Some(g)).unwrap();
        }
        assert_eq!(h.vms[vm].s2.frame_tables(), 1);
        h.check().unwrap();
        let mut broken = h.clone();
        broken.files[f].pages.set(513, 0);
        let e = broken.check().unwrap_err().to_string();
        assert!(e.contains("stage-2 maps gfn 0x201"), "{e}");
    }

    /// `apply`'s fast path finds a private page's content through the memslot it last
    /// used: reads alternating between two memslots (two files, the second bound at an
    /// offset) return each page's own value.
    #[test]
    fn batched_private_reads_across_memslots() {
        let (mut h, vm, _) = sample(ZeroPolicy::OnUse);
        let g = h.create_guest_memfd(vm, 8 << 20, 0, 0).unwrap();
        let fd = i64::from(h.file(g).fd.unwrap());
        let m = h.mmap_anonymous(4 << 20).unwrap();
        let addr = h.mapping(m).addr;
        h.set_user_memory_region2(
            vm,
            MemRegion {
                slot: 1,
                flags: uapi::KVM_MEM_GUEST_MEMFD,
                guest_phys_addr: 16 << 20,
                memory_size: 4 << 20,
                userspace_addr: addr,
                guest_memfd: GmemArg::Fd(fd),
                guest_memfd_offset: 2 << 20,
                shared_guest_memfd: GmemArg::None,
                shared_offset: None,
            },
        )
        .unwrap();
        h.set_memory_attributes(vm, 16 << 20, 1 << 20, uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)
            .unwrap();
        // Pages 0..64 of each slot, value = gfn + 100.
        let gfns: Vec<u64> = (0..64u64).flat_map(|i| [i, 4096 + i]).collect();
        let n = gfns.len();
        let vals: Vec<u64> = gfns.iter().map(|g| g + 100).collect();
        let ones = vec![1; n];
        let st = h.apply(vm, &vec![4; n], &gfns, &ones, &vals, None).unwrap();
        assert!(st.iter().all(|&s| s == 0));
        // Written through the file pages the bindings give (slot 1 at offset 512 + i).
        assert_eq!(h.files[g].content.get(512 + 3), 4096 + 3 + 100);
        // Reads through the checked path, which reports each value.
        let read_all = |h: &mut Host| -> Vec<u64> {
            let mut details = Vec::new();
            h.apply(
                vm,
                &vec![2; n],
                &gfns,
                &ones,
                &vec![0; n],
                Some(&mut details),
            )
            .unwrap();
            details.iter().map(|d| d.value).collect()
        };
        assert_eq!(read_all(&mut h), vals);
        // Mapped now: a second round of writes takes the fast path (no details), and
        // the checked path reads what it wrote, page by page.
        let again: Vec<u64> = gfns.iter().map(|g| g * 3 + 1).collect();
        h.apply(vm, &vec![4; n], &gfns, &ones, &again, None)
            .unwrap();
        assert_eq!(read_all(&mut h), again);
        h.check().unwrap();
    }
}
