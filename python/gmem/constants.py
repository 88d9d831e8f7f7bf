"""Names and constants: the uAPI values, page sizes, the strategy and VM type names, and
what the core says about each strategy.

`gmem` re-exports everything here. Facts the core owns (where a strategy's shared view
lives, which strategies keep attributes per file) are read from it, not restated.
"""

from __future__ import annotations

from gmem._gmem import FILE_ATTRIBUTES, SHARED_SIDE

__all__ = [
    "ALL_VM_TYPES",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FILE_ATTRIBUTE_STRATEGIES",
    "GUEST_MEMFD_FLAG_HUGETLB",
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_MMAP",
    "GUEST_MEMFD_FLAG_NO_DIRECT_MAP",
    "HUGE_ORDERS",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_GUEST_MEMFD_FLAGS",
    "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES",
    "KVM_CAP_MEMORY_ATTRIBUTES",
    "KVM_CAP_MEMORY_FAULT_INFO",
    "KVM_CAP_NR_MEMSLOTS",
    "KVM_CAP_READONLY_MEM",
    "KVM_CAP_USER_MEMORY2",
    "KVM_EXIT_MMIO",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "KVM_USER_MEM_SLOTS",
    "MPOL_BIND",
    "MPOL_DEFAULT",
    "MPOL_INTERLEAVE",
    "MPOL_LOCAL",
    "MPOL_NAMES",
    "MPOL_PREFERRED",
    "MPOL_PREFERRED_MANY",
    "MPOL_WEIGHTED_INTERLEAVE",
    "PAGES_1G",
    "PAGES_2M",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "SAME_FILE_STRATEGIES",
    "SHARED_SIDE",
    "STRATEGIES",
    "TWO_SIDED_STRATEGIES",
    "VM_TYPES",
    "VM_TYPES_WITHOUT_PRIVATE_MEM",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: 4 KiB pages in a 2 MiB and in a 1 GiB huge page.
PAGES_2M = 1 << 9
PAGES_1G = 1 << 18
#: ``page_order`` values of a guest_memfd: 4 KiB pages, 2 MiB or 1 GiB HugeTLB folios.
HUGE_ORDERS = (0, 9, 18)

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
#: Exit reason of an emulated-MMIO access; ``vm.apply`` reports it as the (positive)
#: status of the event.
KVM_EXIT_MMIO = 6

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
#: Remove the file's pages from the kernel direct map: the posted series "Direct Map
#: Removal Support for guest_memfd" (v12, April 2026), **not merged**. Offered to every VM
#: type but TDX and SNP (``KVM_CAP_GUEST_MEMFD_FLAGS`` says where).
GUEST_MEMFD_FLAG_NO_DIRECT_MAP = 1 << 2
#: HugeTLB-backed guest_memfd (guest_memfd HugeTLB dev tree); pass ``page_order`` 9 or 18.
GUEST_MEMFD_FLAG_HUGETLB = 1 << 4

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

#: NUMA memory policy modes of ``mbind(2)`` / ``Mapping.mbind`` (``<linux/mempolicy.h>``).
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
MPOL_LOCAL = 4
MPOL_PREFERRED_MANY = 5
MPOL_WEIGHTED_INTERLEAVE = 6
#: Mode names (as ``--mempolicy`` takes them) to values.
MPOL_NAMES = {
    "default": MPOL_DEFAULT,
    "preferred": MPOL_PREFERRED,
    "bind": MPOL_BIND,
    "interleave": MPOL_INTERLEAVE,
    "local": MPOL_LOCAL,
    "preferred_many": MPOL_PREFERRED_MANY,
    "weighted_interleave": MPOL_WEIGHTED_INTERLEAVE,
}

KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_GUEST_MEMFD_FLAGS = 244
#: In-place series v13 (earlier revisions used 246, 248, 249, 250).
KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES = 252
KVM_USER_MEM_SLOTS = 32764

#: The confidential VM types: those with private memory, which the conversion designs
#: are compared on.
VM_TYPES = ("sw_protected", "pkvm", "tdx", "snp")
#: VM types without private memory: ``"default"`` is ``KVM_X86_DEFAULT_VM`` (mainline
#: 6.18 lets it back its RAM with guest_memfd). Nothing converts on it.
VM_TYPES_WITHOUT_PRIVATE_MEM = ("default",)
#: Every VM type `gmem.Host.create_vm` accepts.
ALL_VM_TYPES = VM_TYPES + VM_TYPES_WITHOUT_PRIVATE_MEM
#: Strategy names, in the core's order (the order reports show them).
STRATEGIES = tuple(SHARED_SIDE)
#: Strategies whose shared view is the guest_memfd page itself: the host maps the file,
#: and there is no separate shared backing to discard.
SAME_FILE_STRATEGIES = frozenset(s for s, side in SHARED_SIDE.items() if side == "same_file")
#: Strategies with a separate shared backing that a VMM can discard.
TWO_SIDED_STRATEGIES = frozenset(STRATEGIES) - SAME_FILE_STRATEGIES
#: Strategies whose memory attributes live at the guest_memfd's file offsets.
FILE_ATTRIBUTE_STRATEGIES = frozenset(FILE_ATTRIBUTES)
