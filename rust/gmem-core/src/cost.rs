//! The cost model: nanoseconds per modelled step. Defaults and their sources are in
//! `docs/cost-model.md`; every value can be overridden.

macro_rules! costs_struct {
    ($($name:ident = $v:expr),* $(,)?) => {
        /// Cost of each modelled step, in nanoseconds.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct CostModel { $(pub $name: u64,)* }

        impl Default for CostModel {
            fn default() -> Self { Self { $($name: $v,)* } }
        }

        impl CostModel {
            pub fn items(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name)),*]
            }

            /// Set one cost by name; `false` if the name is unknown.
            pub fn set(&mut self, name: &str, v: u64) -> bool {
                match name {
                    $(stringify!($name) => { self.$name = v; true })*
                    _ => false,
                }
            }
        }
    };
}

costs_struct! {
    alloc_4k = 771,
    alloc_2m = 2000,
    alloc_1g = 4000,
    free_4k = 383,
    free_2m = 2000,
    free_1g = 4000,
    zero_4k = 280,
    zero_2m = 165_000,
    zero_1g = 84_480_000,
    stage2_map = 1500,
    prefault_map = 700,
    stage2_zap = 500,
    stage2_zap_entry = 20,
    tlb_flush = 2000,
    split = 5000,
    merge = 5000,
    exit_roundtrip = 5000,
    attr_per_gfn = 100,
    attr_range = 300,
    rmpupdate = 1000,
    pvalidate = 1000,
    tdx_page_add = 5000,
    tdx_page_aug = 4000,
    tdx_accept = 6000,
    tdx_page_remove = 3000,
    host_fault = 2210,
    host_unmap = 287,
    host_mmap_fault = 1840,
    direct_map_remove = 250,
    direct_map_restore = 150,
    direct_map_flush = 2000,
    direct_map_split = 4000,
}

impl CostModel {
    /// Allocation cost of a folio of `order`.
    pub fn alloc(&self, order: u32) -> u64 {
        match order {
            0 => self.alloc_4k,
            9 => self.alloc_2m,
            18 => self.alloc_1g,
            o => self.alloc_4k << o,
        }
    }
    pub fn free(&self, order: u32) -> u64 {
        match order {
            0 => self.free_4k,
            9 => self.free_2m,
            18 => self.free_1g,
            o => self.free_4k << o,
        }
    }
    pub fn zero(&self, order: u32) -> u64 {
        match order {
            0 => self.zero_4k,
            9 => self.zero_2m,
            18 => self.zero_1g,
            o => self.zero_4k << o,
        }
    }
}
