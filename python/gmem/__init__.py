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
    Vm,
    __version__,
    _set_strict_default,
    load,
)

# The compiled `Vm._apply` reads one layout; `Vm.apply` converts the caller's events to it.
Vm.apply = _events.apply  # type: ignore[method-assign]
# Strict mode (`Host.strict`) of every host made or loaded, read once.
_set_strict_default(os.environ.get("GMEM_STRICT") == "1")

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
#: HugeTLB-backed guest_memfd (guest_memfd HugeTLB dev tree); pass ``page_order`` 9 or 18.
GUEST_MEMFD_FLAG_HUGETLB = 1 << 4

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_GUEST_MEMFD_FLAGS = 244
KVM_USER_MEM_SLOTS = 32764

VM_TYPES = ("sw_protected", "pkvm", "tdx", "snp")
STRATEGIES = ("dual", "inplace", "realloc", "two_offsets", "attr_hook")


def __getattr__(name: str):
    # `gmem.sweep(...)` without importing the sweep machinery (and Dask) up front.
    if name == "sweep":
        import importlib

        return importlib.import_module("gmem.sweep")
    raise AttributeError(f"module 'gmem' has no attribute {name!r}")


__all__ = [
    "DETAIL_DTYPE",
    "DETAIL_IMPLICIT_CONVERSION",
    "EVENT_DTYPE",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "GUEST_MEMFD_FLAG_HUGETLB",
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_MMAP",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_GUEST_MEMFD_FLAGS",
    "KVM_CAP_MEMORY_ATTRIBUTES",
    "KVM_CAP_MEMORY_FAULT_INFO",
    "KVM_CAP_NR_MEMSLOTS",
    "KVM_CAP_READONLY_MEM",
    "KVM_CAP_USER_MEMORY2",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "KVM_USER_MEM_SLOTS",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "STRATEGIES",
    "VM_TYPES",
    "ConversionBusy",
    "GmemError",
    "GuestMemfd",
    "Host",
    "HostFault",
    "InvariantError",
    "Mapping",
    "MemoryFault",
    "Op",
    "Vm",
    "__version__",
    "load",
]
