//! Constants of the KVM uAPI that the model reproduces.

pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
pub const KVM_MEM_READONLY: u32 = 1 << 1;
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;

pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
pub const KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;

pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// Remove the file's pages from the kernel direct map (posted series "Direct Map Removal
/// Support for guest_memfd", v12, April 2026; not merged).
pub const GUEST_MEMFD_FLAG_NO_DIRECT_MAP: u64 = 1 << 2;
/// HugeTLB-backed guest_memfd (dev tree), used with a page order.
pub const GUEST_MEMFD_FLAG_HUGETLB: u64 = 1 << 4;

pub const FALLOC_FL_KEEP_SIZE: u32 = 1;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 2;

pub const KVM_CAP_NR_MEMSLOTS: u64 = 10;
pub const KVM_CAP_READONLY_MEM: u64 = 81;
pub const KVM_CAP_USER_MEMORY2: u64 = 231;
pub const KVM_CAP_MEMORY_FAULT_INFO: u64 = 232;
pub const KVM_CAP_MEMORY_ATTRIBUTES: u64 = 233;
pub const KVM_CAP_GUEST_MEMFD: u64 = 234;
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
/// In-place series v13 (earlier revisions used 246, 248, 249, 250).
pub const KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: u64 = 252;

/// x86: `KVM_MEM_SLOTS_NUM` (`SHRT_MAX`) minus the three internal slots.
pub const KVM_USER_MEM_SLOTS: u32 = 32764;
/// `KVM_MEM_MAX_NR_PAGES`: `(1UL << 31) - 1`.
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;
/// Guest physical address bits a memslot may reach: x86 `kvm_mmu_max_gfn()` is
/// `(1 << (max_gpa_bits - PAGE_SHIFT)) - 1`, with `max_gpa_bits` the host's MAXPHYADDR
/// under TDP and 52 otherwise; 52 is the architectural maximum, so the model refuses only
/// what no x86 host accepts.
pub const MAX_GPA_BITS: u32 = 52;
/// The TDX shared-GPA bit with a 5-level S-EPT (GPAW 52): `tdx_td_init()` makes it the VM's
/// direct bits, and x86 `kvm_arch_prepare_memory_region()` refuses a memslot whose last
/// gfn carries it (`kvm_is_gfn_alias()`, EINVAL). (With a 4-level S-EPT it is bit 47.)
pub const TDX_SHARED_GPA_BIT: u32 = 51;
/// x86-64 user address space (`TASK_SIZE_MAX` with 4-level paging).
pub const TASK_SIZE: u64 = (1 << 47) - 4096;

/// `KVM_EXIT_MMIO`: the exit reason of an access KVM hands to the VMM to emulate.
pub const KVM_EXIT_MMIO: i32 = 6;
