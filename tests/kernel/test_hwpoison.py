"""Memory failure on guest_memfd pages (mainline `kvm_gmem_error_folio()`, 6.8 onwards,
followed as of 7.3): `fd.memory_failure(offset)` and the `MEMORY_FAILURE` event."""

from __future__ import annotations

import errno

import numpy as np
import pytest

import gmem
from util import PAGE, raises_errno

MiB = 1 << 20
MEMFD = gmem.KVM_MEM_GUEST_MEMFD
PRIVATE = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = gmem.FALLOC_FL_PUNCH_HOLE | gmem.FALLOC_FL_KEEP_SIZE
STRATEGIES = ("dual", "inplace", "realloc", "two_offsets", "attr_hook")
#: Linux x86-64 `EHWPOISON` (Python's `errno` module lacks it on some versions).
EHWPOISON = 133


def setup(strategy, vm_type="snp", flags=0):
    """16 pages at gpa 0, pages 0-7 private, 8-15 shared."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, strategy)
    f = vm.create_guest_memfd(16 * PAGE, flags)
    mem = host.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region2(0, MEMFD, 0, 16 * PAGE, mem.addr, f, 0)
    if strategy == "inplace":
        f.set_memory_attributes2(0, 8 * PAGE, PRIVATE)
        f.set_memory_attributes2(8 * PAGE, 8 * PAGE, 0)
    else:
        vm.set_memory_attributes(0, 8 * PAGE, PRIVATE)
    return host, vm, f


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_poisoned_private_page_refuses_the_guest_until_punched(strategy):
    host, vm, f = setup(strategy)
    vm.guest_write(0, 5, private=True)
    nr = f.nr_pages
    f.memory_failure(0)
    # Invalidated, not truncated.
    assert f.nr_pages == nr
    assert vm.stats()["stage2_4k"] == 0
    for call in (
        lambda: vm.guest_read(0, private=True),
        lambda: vm.guest_write(0, 1, private=True),
        lambda: vm.pre_fault_memory(0, PAGE),
        lambda: vm.populate(0, PAGE),
    ):
        with raises_errno(EHWPOISON, gmem.GmemError):
            call()
    s = vm.stats()
    assert (s["hwpoisoned_pages"], s["hwpoison_lost_pages"], s["hwpoison_refused"]) == (1, 1, 3)
    host.check()
    # The hole drops the page; the next access gets a fresh zeroed one. The poisoned
    # frame never returns to the allocator.
    free = host.stats()["free_pages"]
    f.fallocate(PUNCH, 0, PAGE)
    assert host.stats()["free_pages"] == free
    assert vm.guest_read(0, private=True) == 0
    host.check()


def test_bad_input():
    host, vm, f = setup("dual")
    vm.guest_write(0, 5, private=True)
    for offset in (1, PAGE + 7, 16 * PAGE, 1 << 40):
        with raises_errno(errno.EINVAL, gmem.GmemError, msg=hex(offset)):
            f.memory_failure(offset)
    # No page at offset 3: no physical page to fail.
    with raises_errno(errno.ENOENT, gmem.GmemError):
        f.memory_failure(3 * PAGE)
    f.memory_failure(0)
    with raises_errno(EHWPOISON, gmem.GmemError):
        f.memory_failure(0)
    assert vm.stats()["hwpoisoned_pages"] == 1
    with pytest.raises(TypeError):
        f.memory_failure("0")
    host.check()


def test_host_access_through_the_mmap_is_sigbus():
    host, vm, f = setup("inplace", flags=gmem.GUEST_MEMFD_FLAG_MMAP)
    m = f.mmap()
    m.write(8 * PAGE, 3)
    f.memory_failure(8 * PAGE)
    host.check()  # the host mapping went with memory_failure()
    for call in (lambda: m.read(8 * PAGE), lambda: m.write(8 * PAGE, 1), lambda: m.pin(8 * PAGE)):
        with pytest.raises(gmem.HostFault) as info:
            call()
        assert info.value.errno == errno.EFAULT
        assert info.value.reason == "hwpoison"
        assert info.value.signal == "SIGBUS"
    with raises_errno(EHWPOISON, gmem.GmemError):
        vm.guest_read(8 * PAGE, private=False)
    assert vm.stats()["hwpoison_refused"] == 4


@pytest.mark.parametrize("strategy", ["dual", "two_offsets"])
def test_two_sided_designs_keep_the_shared_side(strategy):
    """A shared gfn whose (undiscarded) private page fails keeps its content: only the
    private side is lost; converting it private then meets the poison."""
    host, vm, f = setup(strategy)
    vm.guest_write(8 * PAGE, 8, private=False)
    f.fallocate(gmem.FALLOC_FL_KEEP_SIZE, 8 * PAGE, PAGE)
    vm.pre_fault_memory(0, PAGE)  # something else mapped, untouched by the failure
    f.memory_failure(8 * PAGE)
    s = vm.stats()
    assert (s["hwpoisoned_pages"], s["hwpoison_lost_pages"]) == (1, 0)
    assert vm.guest_read(8 * PAGE, private=False) == 8
    vm.set_memory_attributes(8 * PAGE, PAGE, PRIVATE)
    with raises_errno(EHWPOISON, gmem.GmemError):
        vm.guest_read(8 * PAGE, private=True)
    host.check()


def test_in_place_loses_a_shared_gfns_content():
    host, vm, f = setup("inplace")
    vm.guest_write(8 * PAGE, 8, private=False)
    f.memory_failure(8 * PAGE)
    assert vm.stats()["hwpoison_lost_pages"] == 1
    with raises_errno(EHWPOISON, gmem.GmemError):
        vm.guest_read(8 * PAGE, private=False)
    host.check()


def test_snapshot_keeps_the_poison(tmp_path):
    host, vm, f = setup("dual")
    vm.guest_write(0, 5, private=True)
    f.memory_failure(0)
    f.fallocate(PUNCH, 0, PAGE)
    vm.guest_write(PAGE, 6, private=True)
    f.memory_failure(PAGE)
    host.save(tmp_path / "h.snap")
    loaded = gmem.load(tmp_path / "h.snap")
    assert loaded.stats()["free_pages"] == host.stats()["free_pages"]
    vm2 = loaded.vms()[0]
    with raises_errno(EHWPOISON, gmem.GmemError):
        vm2.guest_read(PAGE, private=True)
    loaded.check()


def test_memory_failure_event():
    host, vm, _ = setup("dual")
    ev = np.zeros(5, gmem.EVENT_DTYPE)
    ev["op"] = [
        gmem.Op.GUEST_WRITE_PRIVATE,
        gmem.Op.MEMORY_FAILURE,
        gmem.Op.GUEST_READ_PRIVATE,
        gmem.Op.MEMORY_FAILURE,
        gmem.Op.MEMORY_FAILURE,
    ]
    ev["gfn"] = [2, 2, 2, 2, 5]
    ev["npages"] = 1
    ev["value"] = [9, 0, 0, 0, 0]
    status = vm.apply(ev)
    assert status.tolist() == [0, 0, -EHWPOISON, -EHWPOISON, -errno.ENOENT]
    assert vm.stats()["hwpoisoned_pages"] == 1
    host.check()
