"""The `two_offsets` design: the shared side is a second guest_memfd range bound to the
memslot (or userspace memory when none is bound)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from design_env import (
    GPA,
    MEMFD,
    MMAP,
    PRIV,
    PUNCH,
    STRATEGIES,
    VM_TYPES,
    MiB,
    new_host,
    new_vm,
    run,
)

import gmem
from util import PAGE, raises_errno

# --------------------------------------------------------------------------- two_offsets


@pytest.mark.parametrize("same_file", [False, True], ids=["second_file", "same_file"])
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_two_offsets_attribute_picks_side(vm_type, same_file):
    host = new_host()
    vm = new_vm(host, vm_type, "two_offsets")
    if same_file:
        f = vm.create_guest_memfd(16 * PAGE, MMAP)
        f2, soff = f, 8 * PAGE
    else:
        f = vm.create_guest_memfd(8 * PAGE)
        f2, soff = vm.create_guest_memfd(8 * PAGE, MMAP), 0
    vm.set_user_memory_region2(
        0, MEMFD, GPA, 8 * PAGE, 0, f, 0, shared_guest_memfd=f2, shared_offset=soff
    )
    view = f2.mmap(soff, 8 * PAGE)
    for p in range(8):
        vm.guest_write(GPA + p * PAGE, 0x10 + p, private=False)
    assert [view.read(p * PAGE) for p in range(8)] == [0x10 + p for p in range(8)]
    vm.set_memory_attributes(GPA, 8 * PAGE, PRIV)
    for p in range(8):
        vm.guest_write(GPA + p * PAGE, 0x20 + p, private=True)
    # The shared side stays (double backed) and is still what the host sees.
    assert vm.stats()["double_backed_pages"] == 8
    assert [view.read(p * PAGE) for p in range(8)] == [0x10 + p for p in range(8)]
    vm.set_memory_attributes(GPA, 4 * PAGE, 0)
    assert [vm.guest_read(GPA + p * PAGE, private=False) for p in range(4)] == [
        0x10 + p for p in range(4)
    ]
    # Discard: the DISCARD_SHARED event on pages 4..7 (private now), punch for 0..1.
    out = run(vm, [(gmem.Op.DISCARD_SHARED, GPA // PAGE + 4, 4, 0)])
    assert out == [0]
    assert vm.stats()["double_backed_pages"] == 4
    f.fallocate(PUNCH, 0, 2 * PAGE)  # private side of the now-shared pages 0..1
    assert vm.stats()["double_backed_pages"] == 2
    assert [vm.guest_read(GPA + p * PAGE, private=True) for p in range(4, 8)] == [
        0x24,
        0x25,
        0x26,
        0x27,
    ]
    vm.set_memory_attributes(GPA + 4 * PAGE, PAGE, 0)
    assert vm.guest_read(GPA + 4 * PAGE, private=False) == 0  # discarded: zero page


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "two_offsets"])
def test_shared_offset_refused_elsewhere(strategy):
    host = new_host()
    vm = new_vm(host, "sw_protected", strategy)
    f = vm.create_guest_memfd(8 * PAGE, MMAP)
    f2 = vm.create_guest_memfd(8 * PAGE, MMAP)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(
            0, MEMFD, GPA, 4 * PAGE, 0, f, 0, shared_guest_memfd=f2, shared_offset=0
        )


def test_two_offsets_shared_range_overlap_refused():
    """The shared range must not be bound elsewhere (the private range of the same slot
    included): EEXIST, as any bound range since 7.2."""
    host = new_host()
    vm = new_vm(host, "sw_protected", "two_offsets")
    f = vm.create_guest_memfd(16 * PAGE, MMAP)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(
            0, MEMFD, GPA, 8 * PAGE, 0, f, 0, shared_guest_memfd=f, shared_offset=4 * PAGE
        )


def test_two_offsets_without_a_shared_range_uses_userspace_memory():
    """A two_offsets memslot bound without shared_offset/shared_guest_memfd keeps its
    shared side at userspace_addr, like dual; with only shared_guest_memfd the shared
    range starts at offset 0 of that file."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", "two_offsets")
    size = 16 * PAGE
    fd = vm.create_guest_memfd(size)
    anon = host.mmap_anonymous(size)
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, size, anon.addr, fd, 0)
    vm.set_memory_attributes(0, PAGE, PRIV)
    vm.guest_write(0, 5, private=True)
    vm.set_memory_attributes(0, PAGE, 0)
    vm.guest_write(0, 6, private=False)
    assert anon.read(0) == 6
    assert vm.stats()["double_backed_pages"] == 1
    ev = np.zeros(1, gmem.EVENT_DTYPE)
    ev[0] = (gmem.Op.DISCARD_SHARED, 0, 1, 0)
    assert vm.apply(ev).tolist() == [0]
    assert vm.stats()["double_backed_pages"] == 0
    assert anon.read(0) == 0
    private2, second = vm.create_guest_memfd(size), vm.create_guest_memfd(size)
    vm.set_user_memory_region2(
        1, gmem.KVM_MEM_GUEST_MEMFD, 1 << 30, size, 0, private2, 0, shared_guest_memfd=second
    )
    vm.guest_write((1 << 30) + PAGE, 7, private=False)
    assert second.nr_pages == 1
    vm.check()
