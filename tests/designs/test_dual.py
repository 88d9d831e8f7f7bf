"""The `dual` design: shared memory at the memslot's userspace_addr, private memory in
guest_memfd; double backing until the VMM discards (and `vm.populate` on it)."""

from __future__ import annotations

import errno

import pytest
from design_env import (
    GPA,
    MEMFD,
    PRIV,
    PUNCH,
    VM_TYPES,
    Env,
    MiB,
    new_host,
    new_vm,
    run,
)

import gmem
from util import PAGE, raises_errno

# --------------------------------------------------------------------------- dual


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_dual_double_backing_without_discard(vm_type):
    e = Env(vm_type, "dual", 8)
    for p in range(8):
        e.write(p, 0x10 + p, private=False)
    e.convert(0, 8, private=True)
    for p in range(8):
        e.write(p, 0x20 + p, private=True)
    assert e.stats("double_backed_pages", "pages_allocated") == {
        "double_backed_pages": 8,
        "pages_allocated": 16,
    }
    e.convert(0, 4, private=False)  # nothing discarded implicitly
    assert e.stats("double_backed_pages")["double_backed_pages"] == 8
    # Old shared content is still there.
    assert [e.read(p, private=False) for p in range(4)] == [0x10 + p for p in range(4)]


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_dual_discard_keeps_single_backing(vm_type):
    """The VMM discards the side no longer used: mapping.discard after ->private,
    fallocate(PUNCH_HOLE) of the private side after ->shared."""
    e = Env(vm_type, "dual", 8)
    for p in range(8):
        e.write(p, 0x10 + p, private=False)
    e.convert(0, 8, private=True)
    e.mem.discard(0, 8 * PAGE)
    for p in range(8):
        e.write(p, 0x20 + p, private=True)
    assert e.stats("double_backed_pages", "pages_allocated") == {
        "double_backed_pages": 0,
        "pages_allocated": 8,
    }
    e.convert(0, 8, private=False)
    e.gmem.fallocate(PUNCH, 0, 8 * PAGE)
    for p in range(8):
        e.write(p, 0x30 + p, private=False)
    assert e.stats("double_backed_pages", "pages_allocated") == {
        "double_backed_pages": 0,
        "pages_allocated": 8,
    }
    # Discarded private side: fresh zeroed page on the next private use.
    e.convert(0, 1, private=True)
    assert e.read(0, private=True) == 0


def test_dual_discard_shared_event():
    e = Env("sw_protected", "dual", 8)
    gfn = GPA // PAGE
    out = run(
        e.vm,
        [
            (gmem.Op.GUEST_WRITE_SHARED, gfn, 8, 1),
            (gmem.Op.CONVERT_PRIVATE, gfn, 8, 0),
            (gmem.Op.GUEST_WRITE_PRIVATE, gfn, 8, 2),
        ],
    )
    assert out == [0, 0, 0]
    assert e.stats("double_backed_pages")["double_backed_pages"] == 8
    assert run(e.vm, [(gmem.Op.DISCARD_SHARED, gfn, 8, 0)]) == [0]
    assert e.stats("double_backed_pages")["double_backed_pages"] == 0
    assert e.host_read(0) == 0


def test_snp_two_memslots_distinct_frames():
    """Two gfns, two file offsets: each private frame has its own gpa."""
    host = new_host()
    vm = new_vm(host, "snp", "dual")
    f = vm.create_guest_memfd(8 * PAGE)
    vm.set_user_memory_region2(0, MEMFD, GPA, 4 * PAGE, 0, f, 0)
    vm.set_user_memory_region2(1, MEMFD, GPA + MiB, 4 * PAGE, 0, f, 4 * PAGE)
    vm.set_memory_attributes(GPA, MiB + 4 * PAGE, PRIV)
    for base in (GPA, GPA + MiB):
        for p in range(4):
            vm.guest_write(base + p * PAGE, 1, private=True)
    assert vm.stats()["rmpupdates"] == 8
    # Deleting a slot and rebinding the range at another gpa: the old frames were
    # unmapped; after a punch they return to the hypervisor and a new gpa may own them.
    vm.set_user_memory_region2(1, MEMFD, GPA + MiB, 0, 0)
    f.fallocate(PUNCH, 4 * PAGE, 4 * PAGE)
    vm.set_user_memory_region2(2, MEMFD, GPA + 2 * MiB, 4 * PAGE, 0, f, 4 * PAGE)
    vm.set_memory_attributes(GPA + 2 * MiB, 4 * PAGE, PRIV)
    vm.guest_write(GPA + 2 * MiB, 2, private=True)
    assert vm.stats()["violations"] == 0


@pytest.mark.parametrize("vm_type", ["sw_protected", "tdx", "snp"])
def test_populate_loads_the_initial_image(vm_type):
    """kvm_gmem_populate(): private, guest_memfd-backed gfns only (EINVAL when the first
    is not, and nothing changes); it stops at the first shared gfn and returns the pages
    done; the image is what the guest reads, not zeros; TDX adds each page (no later
    AUG/ACCEPT), SNP assigns it in the RMP."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, "dual")
    size = 8 * PAGE
    fd = vm.create_guest_memfd(size)
    anon = host.mmap_anonymous(size)
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, size, anon.addr, fd, 0)
    vm.set_memory_attributes(0, 4 * PAGE, PRIV)
    before = vm.stats()
    with raises_errno(errno.EINVAL):
        vm.populate(4 * PAGE, PAGE, 0xC0DE)  # page 4 is shared
    assert vm.stats() == before
    assert vm.populate(0, 5 * PAGE, 0xC0DE) == 4  # stops before page 4
    assert vm.guest_read(PAGE, private=True) == 0xC0DE
    s = vm.stats()
    assert s["zeroed_pages"] == 0
    if vm_type == "tdx":
        assert (s["tdx_page_adds"], s["tdx_page_augs"], s["tdx_accepts"]) == (4, 0, 0)
    if vm_type == "snp":
        assert s["rmpupdates"] == 4
        assert s["pvalidates"] == 0
