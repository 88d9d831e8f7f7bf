"""Build a host and a VM laid out as a VMM lays out a confidential guest.

One guest_memfd the size of the guest, one memslot at gpa 0 with `KVM_MEM_GUEST_MEMFD`
whose `userspace_addr` points at anonymous VMM memory (the shared side of `dual`), and
for `two_offsets` a second guest_memfd bound as the shared side. This is what QEMU does
for a guest_memfd-backed RAM block (`kvm_set_user_memory_region()` with
`KVM_SET_USER_MEMORY_REGION2`), reduced to one slot.

A VM without private memory (``vm_type`` ``"default"``) is laid out as Firecracker's
secret hiding lays it out: one guest_memfd with ``MMAP | INIT_SHARED | NO_DIRECT_MAP``
(the flags the VM offers of those), mapped by the VMM, that mapping being the memslot's
``userspace_addr``; no anonymous memory, no second range, whatever the design.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gmem._gmem import Host
from gmem.constants import (
    ALL_VM_TYPES,
    GUEST_MEMFD_FLAG_HUGETLB,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    HUGE_ORDERS,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_MEM_GUEST_MEMFD,
    PAGE_SIZE,
    SAME_FILE_STRATEGIES,
    SHARED_SIDE,
    STRATEGIES,
    VM_TYPES_WITHOUT_PRIVATE_MEM,
)

__all__ = ["GuestVm", "build_vm", "host_pages_for", "make_host"]

_MAX_HOST_PAGES = 1 << 31


@dataclass
class GuestVm:
    """A VM and the objects that back it (kept alive as long as the VM is used)."""

    vm: Any
    gmem: Any
    shared_gmem: Any
    mapping: Any
    pages: int
    huge_order: int

    def __getattr__(self, name: str) -> Any:
        # a GuestVm stands in for its Vm: policies call vm.set_options(), vm.apply(), …
        # and also read `huge_order`
        if name == "vm":
            raise AttributeError(name)
        return getattr(self.vm, name)


def host_pages_for(pages: int, huge_order: int = 0) -> int:
    """Host RAM (in pages) that a guest of ``pages`` can never exhaust: room for every
    gfn backed twice (the worst case of `dual` and `two_offsets` without discard), rounded
    up to the huge size, plus one huge unit of slack."""
    unit = 1 << max(huge_order, 9)
    need = 2 * (-(-pages // unit) * unit) + unit
    if need > _MAX_HOST_PAGES:
        need = _MAX_HOST_PAGES
    return need


def make_host(
    pages: int,
    *,
    huge_order: int = 0,
    costs: dict | None = None,
    nodes: int = 1,
    host_pages: int | None = None,
):
    """A `gmem.Host` of ``host_pages`` (default: sized by `host_pages_for`) split over
    ``nodes`` NUMA nodes, its size rounded up to a multiple of ``nodes`` pages (each node
    the same size, as `gmem.Host` wants)."""
    total = host_pages_for(pages, huge_order) if host_pages is None else int(host_pages)
    total = -(-total // nodes) * nodes
    return Host(total * PAGE_SIZE, nodes=nodes, costs=costs)


def build_vm(host, pages: int, vm_type: str, strategy: str, huge_order: int = 0) -> GuestVm:
    """Create a VM of ``vm_type`` using ``strategy`` with ``pages`` of guest memory.

    ``huge_order`` 9 or 18 backs the guest with HugeTLB guest_memfd folios of 2 MiB or
    1 GiB (``GUEST_MEMFD_FLAG_HUGETLB``, dev tree); the file is rounded up to the huge size.
    Raises `ValueError` for unknown names, and whatever the core raises otherwise.
    """
    pages = int(pages)
    if pages <= 0:
        raise ValueError(f"pages must be positive, got {pages}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if vm_type not in ALL_VM_TYPES:
        raise ValueError(f"unknown vm type {vm_type!r} (known: {', '.join(ALL_VM_TYPES)})")
    if huge_order not in HUGE_ORDERS:
        raise ValueError(f"huge_order must be 0, 9 or 18, got {huge_order}")
    if vm_type in VM_TYPES_WITHOUT_PRIVATE_MEM:
        return _build_secret_vm(host, pages, vm_type, strategy, huge_order)

    vm = host.create_vm(vm_type=vm_type, strategy=strategy)
    supported = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
    mmap_flag = GUEST_MEMFD_FLAG_MMAP & supported
    unit = 1 << huge_order
    size = -(-pages // unit) * unit * PAGE_SIZE
    flags, order_kw = 0, {}
    if huge_order:
        flags |= GUEST_MEMFD_FLAG_HUGETLB
        order_kw = {"page_order": huge_order}
    private_flags = flags | (mmap_flag if strategy in SAME_FILE_STRATEGIES else 0)
    gmemfd = vm.create_guest_memfd(size, private_flags, **order_kw)

    mapping = host.mmap_anonymous(pages * PAGE_SIZE)
    extra: dict[str, Any] = {}
    shared = None
    if SHARED_SIDE[strategy] == "second_range":
        shared = vm.create_guest_memfd(size, flags | mmap_flag, **order_kw)
        extra = {"shared_guest_memfd": shared, "shared_offset": 0}
    vm.set_user_memory_region2(
        0,
        KVM_MEM_GUEST_MEMFD,
        0,
        pages * PAGE_SIZE,
        mapping.addr,
        guest_memfd=gmemfd,
        guest_memfd_offset=0,
        **extra,
    )
    return GuestVm(vm, gmemfd, shared, mapping, pages, huge_order)


def _build_secret_vm(host, pages: int, vm_type: str, strategy: str, huge_order: int) -> GuestVm:
    """`build_vm` for a VM without private memory: guest memory in one guest_memfd the VMM
    maps and passes as ``userspace_addr``."""
    if huge_order:
        raise ValueError(
            f"a {vm_type!r} VM's guest_memfd is INIT_SHARED, which HugeTLB guest_memfd "
            f"refuses: huge_order must be 0, got {huge_order}"
        )
    vm = host.create_vm(vm_type=vm_type, strategy=strategy)
    wanted = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
    flags = wanted & vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
    gmemfd = vm.create_guest_memfd(pages * PAGE_SIZE, flags)
    mapping = gmemfd.mmap()
    vm.set_user_memory_region2(
        0,
        KVM_MEM_GUEST_MEMFD,
        0,
        pages * PAGE_SIZE,
        mapping.addr,
        guest_memfd=gmemfd,
        guest_memfd_offset=0,
    )
    return GuestVm(vm, gmemfd, None, mapping, pages, 0)
