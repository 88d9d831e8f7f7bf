//! gmem-core: a model of Linux KVM guest_memfd memory for confidential VMs.
//!
//! Everything the kernel keeps is kept — memslots, guest_memfd files and their page cache,
//! the memory-attribute map, the stage-2 table, the host page allocator with huge pages —
//! so the model can count what each conversion design costs and check what each promises.
//! Pure Rust; the Python binding lives in `gmem-py`.
//!
//! # Module map
//!
//! All state lives in one [`Host`]; each kernel subsystem's operations are `impl Host`
//! blocks in the file of that subsystem.
//!
//! | module | holds |
//! |---|---|
//! | [`host`] | the `Host` struct, its constructor, accessors and capabilities |
//! | [`guest_memfd`] | the `Gmem` file and its operations, in the order of `virt/kvm/guest_memfd.c` (create, fallocate/punch, invalidate, release, mmap, get_pfn, populate) |
//! | [`memslot`] | memslots and `KVM_SET_USER_MEMORY_REGION2` |
//! | [`convert`] | `KVM_SET_MEMORY_ATTRIBUTES`, the conversion path every design shares, huge-folio split/merge |
//! | [`strategy`] | one file per conversion design (`dual`, `inplace`, `realloc`, `two_offsets`, `attr_hook`) |
//! | [`platform`] | one file per platform (`sw_protected`, `pkvm`, `tdx`, `snp`, `default`) behind arch hooks |
//! | [`access`] | guest accesses through stage-2, host accesses through mappings |
//! | [`mapping`] | the VMM's mappings and the host address space (`AddressSpace`: mappings, addresses, pins) |
//! | [`vm`] | a VM: memslots, attributes, stage-2, counters; the stage-2 zap |
//! | [`direct_map`] | the kernel direct map and `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` (series v12) |
//! | [`frames`] | host frames (`HostFrames`: allocator, content, stale-data tags, RMP) and what VMs are charged for them |
//! | [`numa`] | NUMA memory policies: `mbind` modes, the shared policy of an inode, each allocation's node choice |
//! | [`footprint`] | pages backing each VM, and double backing |
//! | [`events`] | the batch runner (`Host::apply`) behind the event arrays |
//! | [`check`] | the invariants (`Host::check`) |
//! | [`snapshot`] | save and load a whole host |
//! | [`stage2`], [`bit_attr_map`], [`attr_map`], [`sparse`], [`pagedir`], [`arena`], [`cover`], [`alloc`] | the data structures underneath |
//! | [`cost`], [`metrics`] | the cost model and the per-VM counters |
//! | [`uapi`], [`error`] | kernel constants, errors with their errno |
//!
//! # Example
//!
//! A `dual` VM with one 2 MiB memslot backed by a guest_memfd: convert a page to private,
//! write it as the guest, and read the counters.
//!
//! ```
//! use gmem_core::{GmemArg, Host, MemRegion, StrategyKind, VmType, uapi};
//!
//! let mut h = Host::new(64 << 20)?;
//! let vm = h.create_vm(VmType::Snp, StrategyKind::Dual);
//! let file = h.create_guest_memfd(vm, 2 << 20, 0, 0)?;
//! let anon = h.mmap_anonymous(2 << 20)?;
//! h.set_user_memory_region2(
//!     vm,
//!     MemRegion {
//!         slot: 0,
//!         flags: uapi::KVM_MEM_GUEST_MEMFD,
//!         guest_phys_addr: 0,
//!         memory_size: 2 << 20,
//!         userspace_addr: h.mapping(anon).addr,
//!         guest_memfd: GmemArg::Fd(i64::from(h.file(file).fd().expect("open"))),
//!         guest_memfd_offset: 0,
//!         shared_guest_memfd: GmemArg::None,
//!         shared_offset: None,
//!     },
//! )?;
//! h.set_memory_attributes(vm, 0x1000, 0x1000, uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)?;
//! assert_eq!(h.guest_access(vm, 0x1000, true, Some(7))?, 7);
//! // A shared access to a private page exits to the VMM as a memory fault.
//! assert!(h.guest_access(vm, 0x1000, false, None).is_err());
//! assert_eq!(h.stats(vm).conversions, 1);
//! h.check()?;
//! # Ok::<(), gmem_core::Error>(())
//! ```

pub mod access;
pub mod alloc;
pub mod arena;
pub mod attr_map;
pub mod bit_attr_map;
pub mod check;
pub mod convert;
pub mod cost;
pub mod cover;
pub mod direct_map;
pub mod error;
pub mod events;
pub mod footprint;
pub mod frames;
pub mod gmem_fops;
pub mod guest_memfd;
pub mod host;
pub mod mapping;
pub mod memslot;
pub mod memslot_v1;
pub mod metrics;
pub mod numa;
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
