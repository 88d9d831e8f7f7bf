//! gmem-core: a model of Linux KVM guest_memfd memory for confidential VMs.
//!
//! Everything the kernel keeps is kept — memslots, guest_memfd files and their page cache,
//! the memory-attribute map, the stage-2 table, the host page allocator with huge pages —
//! so the model can count what each conversion design costs and check what each promises.
//! Pure Rust; the Python binding lives in `gmem-py`.

pub mod access;
pub mod alloc;
pub mod arena;
pub mod attr_map;
pub mod bit_attr_map;
pub mod check;
pub mod convert;
pub mod cost;
pub mod cover;
pub mod error;
pub mod events;
pub mod gmem_fops;
pub mod guest_memfd;
pub mod host;
pub mod mapping;
pub mod memslot;
pub mod memslot_v1;
pub mod metrics;
pub mod pagedir;
pub mod platform;
pub mod snapshot;
pub mod sparse;
pub mod stage2;
pub mod strategy;
pub mod strict;
pub mod uapi;
pub mod vm;

pub use access::HostOp;
pub use error::{Error, Result};
pub use events::{Columns, Detail, Events, Op, Packed};
pub use host::{GmemArg, Host, MemRegion};
pub use platform::VmType;
pub use strategy::StrategyKind;

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
