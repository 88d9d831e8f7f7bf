"""gmem: a fast, faithful simulator of Linux KVM guest_memfd memory for confidential VMs.

The kernel-shaped API (`Host`, `Vm`, `GuestMemfd`, `Mapping`, the uAPI constants and
errno-carrying errors) and the simulation API (`Vm.apply` over `EVENT_DTYPE` batches).
See ``docs/api.md``.
"""

from __future__ import annotations

import os

from gmem import _events
from gmem._events import DETAIL_DTYPE, DETAIL_IMPLICIT_CONVERSION, EVENT_DTYPE, Op
from gmem._gmem import (
    ConversionBusy,
    GmemError,
    GuestMemfd,
    Host,
    HostFault,
    InvariantError,
    Mapping,
    MemoryFault,
    MmioExit,
    Vm,
    __version__,
    _set_strict_default,
    load,
)
from gmem.constants import (
    ALL_VM_TYPES,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FILE_ATTRIBUTE_STRATEGIES,
    GUEST_MEMFD_FLAG_HUGETLB,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    HUGE_ORDERS,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_READONLY_MEM,
    KVM_CAP_USER_MEMORY2,
    KVM_EXIT_MMIO,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_USER_MEM_SLOTS,
    MPOL_BIND,
    MPOL_DEFAULT,
    MPOL_INTERLEAVE,
    MPOL_LOCAL,
    MPOL_NAMES,
    MPOL_PREFERRED,
    MPOL_PREFERRED_MANY,
    MPOL_WEIGHTED_INTERLEAVE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGES_1G,
    PAGES_2M,
    SAME_FILE_STRATEGIES,
    SHARED_SIDE,
    STRATEGIES,
    TWO_SIDED_STRATEGIES,
    VM_TYPES,
    VM_TYPES_WITHOUT_PRIVATE_MEM,
)

# The compiled `Vm._apply` reads one layout; `Vm.apply` converts the caller's events to it.
Vm.apply = _events.apply  # type: ignore[method-assign]
# Strict mode (`Host.strict`) of every host made or loaded, read once.
_set_strict_default(os.environ.get("GMEM_STRICT") == "1")


def __getattr__(name: str):
    # `gmem.sweep(...)` without importing the sweep machinery (and Dask) up front.
    if name == "sweep":
        import importlib

        return importlib.import_module("gmem.sweep")
    raise AttributeError(f"module 'gmem' has no attribute {name!r}")


__all__ = [
    "ALL_VM_TYPES",
    "DETAIL_DTYPE",
    "DETAIL_IMPLICIT_CONVERSION",
    "EVENT_DTYPE",
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
    "ConversionBusy",
    "GmemError",
    "GuestMemfd",
    "Host",
    "HostFault",
    "InvariantError",
    "Mapping",
    "MemoryFault",
    "MmioExit",
    "Op",
    "Vm",
    "__version__",
    "load",
]
