"""Ports of the selftests of KERNEL.md §7 (mainline 7.x and the in-place series v13),
for every design where they apply.

Each test names the selftest and the kernel version whose rule it follows.
"""

from __future__ import annotations

import errno

import pytest

import gmem
from util import PAGE, raises_errno

MiB = 1 << 20
MEMFD = gmem.KVM_MEM_GUEST_MEMFD
STRATEGIES = ("dual", "inplace", "realloc", "two_offsets", "attr_hook")
VM_TYPES = ("sw_protected", "pkvm", "tdx", "snp")
ALL = [(vt, s) for s in STRATEGIES for vt in VM_TYPES]


@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_add_overlapping_private_memory_regions(vm_type, strategy):
    """set_memory_region_test.c (kvm-x86, 7.2): a guest_memfd range already bound is
    EEXIST, also when only the offsets overlap."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, strategy)
    size = 2 * MiB
    g = 1 << 30
    f = vm.create_guest_memfd(5 * size)
    vm.set_user_memory_region2(10, MEMFD, g, 2 * size, 0, f, 0)
    vm.set_user_memory_region2(11, MEMFD, 2 * g, 2 * size, 0, f, 2 * size)
    vm.set_user_memory_region2(10, MEMFD, g, 0, 0, f, 0)  # delete slot 10
    for gpa, off in ((g, size), (g, 3 * size), (2 * g - size, 0), (2 * g + size, 0)):
        with raises_errno(errno.EEXIST, msg=f"gpa {gpa:#x} offset {off:#x}"):
            vm.set_user_memory_region2(10, MEMFD, gpa, 2 * size, 0, f, off)
    # The free offsets still bind.
    vm.set_user_memory_region2(10, MEMFD, g, 2 * size, 0, f, 0)
    vm.check()
    host.check()


def test_bind_offset_is_unsigned():
    """7.2: guest_memfd offsets are unsigned; an offset at or above 2^63 is beyond the file
    (EINVAL), not a negative offset."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, MEMFD, 0, PAGE, 0, f, 1 << 63)
    vm.set_user_memory_region2(0, MEMFD, 0, PAGE, 0, f, 3 * PAGE)
    vm.check()
