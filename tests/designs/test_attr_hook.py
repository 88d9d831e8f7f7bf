"""The `attr_hook` design: the same guest_memfd page, attributes per file, and no gate:
a pin taken before a to-private conversion survives it as a violation."""

from __future__ import annotations

import errno

import pytest
from design_env import (
    GPA,
    KEEPS,
    MEMFD,
    MMAP,
    PRIV,
    VM_TYPES,
    Env,
    MiB,
    new_host,
    new_vm,
)

import gmem
from util import PAGE, raises_errno


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_attr_hook_default_shared(vm_type):
    """Item 22 on attr_hook: mainline VM creation default is all shared, and creating a
    memslot does not change attributes."""
    host = new_host()
    e = Env(vm_type, "attr_hook", 8, host=host, gpa=GPA)
    vm2 = new_vm(host, vm_type, "attr_hook")
    assert vm2.get_memory_attributes(GPA // PAGE) == 0
    f2 = vm2.create_guest_memfd(4 * PAGE, MMAP)
    vm2.set_user_memory_region2(0, MEMFD, GPA, 4 * PAGE, 0, f2, 0)
    assert vm2.get_memory_attributes(GPA // PAGE) == 0
    assert [e.attr(p) for p in range(8)] == [0] * 8
    assert e.gmem.get_memory_attributes2(0) == 0
    e.write(0, 0xAA, private=False)
    assert e.host_read(0) == 0xAA


# --------------------------------------------------------------------------- attr_hook


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_attr_hook_pin_survives_as_violation(vm_type):
    """attr_hook has no refcount gate: the conversion succeeds, each page pinned across
    it is a violation; the unpinned mapping is still zapped."""
    e = Env(vm_type, "attr_hook", 8, shared=True)
    for p in range(8):
        e.host_write(p, 0x60 + p)
    for p in (1, 5):
        e.view.pin(p * PAGE)
    v0 = e.stats("violations", "eagain")
    e.convert(0, 8, private=True)
    s = e.stats("violations", "eagain", "conversions")
    assert s["violations"] == v0["violations"] + 2
    assert s["eagain"] == 0
    assert [e.attr(p) for p in range(8)] == [PRIV] * 8
    with raises_errno(errno.EFAULT, gmem.HostFault):
        e.host_read(0)
    for p in (1, 5):
        e.view.unpin(p * PAGE)
    kept = vm_type in KEEPS
    assert e.read(1, private=True) == (0x61 if kept else 0)


def test_attr_hook_one_gfn_per_offset():
    """Binding one offset to two gfns is refused (EEXIST since 7.2, mainline's bound-range
    check)."""
    host = new_host()
    vm = new_vm(host, "sw_protected", "attr_hook")
    f = vm.create_guest_memfd(8 * PAGE, MMAP)
    vm.set_user_memory_region2(0, MEMFD, GPA, 4 * PAGE, 0, f, 0)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(1, MEMFD, GPA + MiB, 4 * PAGE, 0, f, 2 * PAGE)
