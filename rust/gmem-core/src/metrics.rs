//! Per-VM counters. Page counts are in 4 KiB pages.

macro_rules! stats_struct {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        /// Counters of one VM (see `docs/api.md` for each meaning).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct Stats { $($(#[$m])* pub $name: u64,)* }

        impl Stats {
            /// Every counter as `(name, value)`, in a fixed order.
            pub fn items(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name)),*]
            }

            /// Set a counter by name (for snapshots); `false` if unknown.
            pub fn set(&mut self, name: &str, v: u64) -> bool {
                match name {
                    $(stringify!($name) => { self.$name = v; true })*
                    _ => false,
                }
            }
        }
    };
}

stats_struct! {
    /// Host pages backing the VM now: its guest_memfd pages and the anonymous memory its
    /// memslots point into.
    pages_allocated,
    peak_pages_allocated,
    /// Gfns whose private and shared backings are both allocated.
    double_backed_pages,
    allocations,
    frees,
    zeroed_pages,
    conversions,
    converted_pages,
    memory_faults,
    /// Emulated-MMIO exits: guest accesses that no memslot backs.
    mmio_exits,
    host_faults,
    violations,
    stage2_zaps,
    tlb_flushes,
    /// Stage-2 leaves by level (4 KiB, 2 MiB, 1 GiB): read from the table when the
    /// counters are taken (`Host::stats`), not kept in a VM's stored counters.
    stage2_4k,
    stage2_2m,
    stage2_1g,
    /// Stage-2 faults a guest access took that installed a mapping (each an exit to KVM;
    /// KVM's `pf_taken`, which `KVM_PRE_FAULT_MEMORY`'s prefetch faults do not count).
    stage2_faults,
    /// Pages mapped ahead of the guest by `KVM_PRE_FAULT_MEMORY` (no exit taken).
    prefaulted_pages,
    splits,
    merges,
    eagain,
    rmpupdates,
    pvalidates,
    tdx_page_adds,
    tdx_page_augs,
    tdx_accepts,
    tdx_page_removes,
    host_unmaps,
    /// Pages removed from the kernel direct map (`GUEST_MEMFD_FLAG_NO_DIRECT_MAP`).
    direct_map_removals,
    /// Pages returned to the kernel direct map when freed.
    direct_map_restores,
    /// Direct-map TLB flushes (one per call that removed pages).
    direct_map_flushes,
    /// 2 MiB direct-map blocks split to 4 KiB by a first removal.
    direct_map_splits,
    /// guest_memfd pages hardware-poisoned by `memory_failure()` (a huge folio counts all
    /// its pages).
    hwpoisoned_pages,
    /// Of `hwpoisoned_pages`, those that held the current content of a gfn (the page the
    /// gfn's present view reads): content the guest lost.
    hwpoison_lost_pages,
    /// Guest and host accesses refused because their page is hwpoisoned (`EHWPOISON`,
    /// or SIGBUS through a mapping).
    hwpoison_refused,
    events,
    modelled_ns,
}

/// Counter updates that pair each count with its modelled cost (`ns`), so a step is never
/// counted without being charged or charged without being counted.
impl Stats {
    /// Modelled time for a step counted elsewhere (or not counted).
    #[inline]
    pub(crate) fn charge(&mut self, ns: u64) {
        self.modelled_ns = self.modelled_ns.saturating_add(ns);
    }

    /// `n` pages allocated to the VM.
    #[inline]
    pub(crate) fn allocated(&mut self, n: u64, ns: u64) {
        self.allocations += n;
        self.pages_allocated += n;
        self.peak_pages_allocated = self.peak_pages_allocated.max(self.pages_allocated);
        self.modelled_ns += ns;
    }

    /// `n` pages of the VM freed.
    #[inline]
    pub(crate) fn freed(&mut self, n: u64, ns: u64) {
        self.frees += n;
        self.pages_allocated -= n;
        self.modelled_ns += ns;
    }

    /// `n` pages zeroed.
    #[inline]
    pub(crate) fn zeroed(&mut self, n: u64, ns: u64) {
        self.zeroed_pages += n;
        self.modelled_ns += ns;
    }

    /// One stage-2 zap that removed something, with its TLB flush.
    #[inline]
    pub(crate) fn stage2_zapped(&mut self, ns: u64) {
        self.stage2_zaps += 1;
        self.tlb_flushes += 1;
        self.modelled_ns += ns;
    }

    /// `n` host page-table entries removed (one TLB flush included in `ns`).
    #[inline]
    pub(crate) fn host_unmapped(&mut self, n: u64, ns: u64) {
        self.host_unmaps += n;
        self.modelled_ns += ns;
    }

    /// A memory-fault exit to the VMM.
    #[inline]
    pub(crate) fn memory_fault(&mut self, ns: u64) {
        self.memory_faults += 1;
        self.modelled_ns += ns;
    }

    /// A stage-2 fault installed a mapping: a guest access's (`guest`), or
    /// `KVM_PRE_FAULT_MEMORY`'s ahead of the guest.
    #[inline]
    pub(crate) fn stage2_fault(&mut self, guest: bool, ns: u64) {
        if guest {
            self.stage2_faults += 1;
        } else {
            self.prefaulted_pages += 1;
        }
        self.modelled_ns += ns;
    }

    /// `n` stage-2 faults taken by guest accesses, each mapping one page, costing `ns`
    /// together.
    #[inline]
    pub(crate) fn stage2_faulted(&mut self, n: u64, ns: u64) {
        self.stage2_faults += n;
        self.modelled_ns += ns;
    }

    /// `n` pages hardware-poisoned, `lost` of them holding a gfn's current content. The
    /// machine check and `memory_failure()` itself are not charged: no design changes
    /// them; the zaps and unmaps that follow are charged where they happen.
    #[inline]
    pub(crate) fn hwpoisoned(&mut self, n: u64, lost: u64) {
        self.hwpoisoned_pages += n;
        self.hwpoison_lost_pages += lost;
    }

    /// An access refused for a hwpoisoned page; it costs what a refused access costs
    /// (`ns`: the exit to the VMM for a guest access, nothing modelled for a host one).
    #[inline]
    pub(crate) fn hwpoison_refusal(&mut self, ns: u64) {
        self.hwpoison_refused += 1;
        self.modelled_ns += ns;
    }

    /// `n` pages leave the VM for good: hwpoisoned frames dropped from its page cache are
    /// not returned to the allocator (`free_pages_prepare()` keeps `PageHWPoison` pages
    /// out of the buddy lists), so nothing is freed or charged.
    #[inline]
    pub(crate) fn retired(&mut self, n: u64) {
        self.pages_allocated -= n;
    }

    /// An emulated-MMIO exit to the VMM.
    #[inline]
    pub(crate) fn mmio_exit(&mut self, ns: u64) {
        self.mmio_exits += 1;
        self.modelled_ns += ns;
    }

    /// One conversion that changed `pages` pages.
    #[inline]
    pub(crate) fn converted(&mut self, pages: u64, ns: u64) {
        self.conversions += 1;
        self.converted_pages += pages;
        self.charge(ns);
    }

    /// `n` SEV-SNP RMP entries updated.
    #[inline]
    pub(crate) fn rmp_updated(&mut self, n: u64, ns: u64) {
        self.rmpupdates += n;
        self.charge(ns);
    }

    /// `n` private S-EPT leaves removed (TDH.MEM.PAGE.REMOVE).
    #[inline]
    pub(crate) fn tdx_pages_removed(&mut self, n: u64, ns: u64) {
        self.tdx_page_removes += n;
        self.charge(ns);
    }

    /// A page added to a TD before it runs (TDH.MEM.PAGE.ADD).
    #[inline]
    pub(crate) fn tdx_page_added(&mut self, ns: u64) {
        self.tdx_page_adds += 1;
        self.charge(ns);
    }

    /// `n` pages left the direct map in one call, splitting `splits` 2 MiB blocks; one
    /// direct-map TLB flush.
    #[inline]
    pub(crate) fn direct_map_removed(&mut self, n: u64, splits: u64, flushes: u64, ns: u64) {
        self.direct_map_removals += n;
        self.direct_map_splits += splits;
        self.direct_map_flushes += flushes;
        self.charge(ns);
    }

    /// `n` pages returned to the direct map.
    #[inline]
    pub(crate) fn direct_map_restored(&mut self, n: u64, ns: u64) {
        self.direct_map_restores += n;
        self.charge(ns);
    }

    /// A huge folio split.
    #[inline]
    pub(crate) fn split(&mut self, ns: u64) {
        self.splits += 1;
        self.charge(ns);
    }

    /// A huge folio merged back.
    #[inline]
    pub(crate) fn merged(&mut self, ns: u64) {
        self.merges += 1;
        self.charge(ns);
    }
}
