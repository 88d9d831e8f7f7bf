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
    stage2_4k,
    stage2_2m,
    stage2_1g,
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
    events,
    modelled_ns,
}
