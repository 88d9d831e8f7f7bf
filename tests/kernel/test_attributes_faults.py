"""KVM_SET_MEMORY_ATTRIBUTES and KVM_EXIT_MEMORY_FAULT.

KERNEL.md §1/§2 and private_mem_kvm_exits_test.c (§5 items 20, 21).
"""

from __future__ import annotations

import errno

import pytest

from util import PAGE, Guest, raises_errno

MiB = 1 << 20
GiB = 1 << 30


def _priv(api):
    return api.KVM_MEMORY_ATTRIBUTE_PRIVATE


# --------------------------------------------------------------------------- attributes


def test_default_shared(api, vm):
    for gfn in (0, 1, 511, 1 << 20, (1 << 40) - 1):
        assert vm.get_memory_attributes(gfn) == 0


def test_set_and_get(api, vm):
    vm.set_memory_attributes(4 * PAGE, 4 * PAGE, _priv(api))
    assert [vm.get_memory_attributes(g) for g in range(10)] == [0] * 4 + [_priv(api)] * 4 + [0] * 2
    vm.set_memory_attributes(5 * PAGE, PAGE, 0)
    assert [vm.get_memory_attributes(g) for g in range(3, 9)] == [0, 8, 0, 8, 8, 0]
    # Setting what is already there is fine (the kernel's early-out).
    vm.set_memory_attributes(6 * PAGE, 2 * PAGE, _priv(api))
    vm.set_memory_attributes(100 * PAGE, 2 * PAGE, 0)
    vm.check()


def test_range_need_not_be_covered_by_memslots(api, vm, host):
    Guest(api, host, vm, npages=4)
    vm.set_memory_attributes(2 * PAGE, 1 * MiB, _priv(api))
    assert vm.get_memory_attributes(2) == _priv(api)
    assert vm.get_memory_attributes(255) == _priv(api)
    assert vm.get_memory_attributes(256 + 2) == 0
    vm.check()


def test_attributes_survive_slot_deletion(api, vm, host):
    g = Guest(api, host, vm, npages=4)
    g.convert(0, 2, private=True)
    vm.set_user_memory_region2(0, 0, 0, 0)
    assert vm.get_memory_attributes(0) == _priv(api)
    assert vm.get_memory_attributes(2) == 0


@pytest.mark.parametrize("flags", [1, 2, 1 << 3, 1 << 63])
def test_attributes_flags_must_be_zero(api, vm, flags):
    with raises_errno(errno.EINVAL):
        vm.set_memory_attributes(0, PAGE, _priv(api), flags)


def test_attributes_unsupported_bits(api, vm):
    supported = vm.check_extension(api.KVM_CAP_MEMORY_ATTRIBUTES)
    for i in range(64):
        bit = 1 << i
        if supported & bit:
            vm.set_memory_attributes(0, PAGE, bit)
        else:
            with raises_errno(errno.EINVAL):
                vm.set_memory_attributes(0, PAGE, bit)
    with raises_errno(errno.EINVAL):
        vm.set_memory_attributes(0, PAGE, _priv(api) | 1)


@pytest.mark.parametrize(
    ("address", "size"),
    [
        (0, 0),
        (PAGE, 0),
        (1, PAGE),
        (PAGE - 1, PAGE),
        (0, 1),
        (0, PAGE + 1),
        (PAGE, 3 * PAGE - 2048),
        ((1 << 64) - PAGE, 2 * PAGE),  # wraps
        ((1 << 64) - PAGE, PAGE),  # ends exactly at 2^64: address + size wraps to 0
        (1 << 63, 1 << 63),
    ],
)
def test_attributes_bad_ranges(api, vm, address, size):
    with raises_errno(errno.EINVAL):
        vm.set_memory_attributes(address, size, _priv(api))
    with raises_errno(errno.EINVAL):
        vm.set_memory_attributes(address, size, 0)


def test_attributes_last_page_below_wrap(api, vm):
    vm.set_memory_attributes((1 << 64) - 2 * PAGE, PAGE, _priv(api))
    assert vm.get_memory_attributes(((1 << 64) - 2 * PAGE) >> 12) == _priv(api)


def test_attributes_huge_ranges(api, vm):
    """Converting 1 TiB at once (the kernel would walk 2^28 gfns; speed is measured in
    benches/, not here)."""
    vm.set_memory_attributes(0, 1 << 40, _priv(api))
    vm.set_memory_attributes(GiB, 2 * GiB, 0)
    vm.set_memory_attributes(0, 1 << 40, 0)
    vm.set_memory_attributes(4 * PAGE, (1 << 40) - 8 * PAGE, _priv(api))
    assert vm.get_memory_attributes(3) == 0
    assert vm.get_memory_attributes(4) == _priv(api)
    assert vm.get_memory_attributes(((1 << 40) >> 12) - 5) == _priv(api)
    assert vm.get_memory_attributes(((1 << 40) >> 12) - 4) == 0
    vm.check()


def test_conversion_allocates_and_frees_nothing(api, vm, host):
    """dual (mainline): a conversion flips attributes and zaps stage-2; KVM never
    discards the side no longer used."""
    g = Guest(api, host, vm, npages=16)
    for p in range(16):
        g.write(p, p, private=False)
    g.convert(0, 16, private=True)
    for p in range(16):
        g.write(p, 100 + p, private=True)
    before = vm.stats()
    g.convert(0, 16, private=False)
    g.convert(0, 8, private=True)
    after = vm.stats()
    for key in ("pages_allocated", "allocations", "frees", "double_backed_pages"):
        assert after[key] == before[key], key
    assert after["double_backed_pages"] == 16
    vm.check()


# --------------------------------------------------------------------------- memory faults


def _assert_fault(api, info, gpa, private):
    e = info.value
    assert isinstance(e, api.GmemError)
    assert isinstance(e, OSError)
    assert e.errno == errno.EFAULT
    assert e.gpa == gpa
    assert e.size == PAGE
    assert e.flags == (api.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0)


def test_exit_on_deleted_gmem_slot(api, vm, host):
    """Item 20: private attribute set, the guest_memfd slot deleted: a private access is
    a memory-fault exit with flags=PRIVATE, the gpa, size PAGE_SIZE."""
    g = Guest(api, host, vm, npages=8, gpa=GiB)
    g.convert(0, 8, private=True)
    g.write(1, 7, private=True)
    vm.set_user_memory_region2(0, 0, 0, 0)
    with pytest.raises(api.MemoryFault) as info:
        vm.guest_read(GiB + PAGE, private=True)
    _assert_fault(api, info, GiB + PAGE, True)
    with pytest.raises(api.MemoryFault) as info:
        vm.guest_write(GiB + PAGE, 1, private=True)
    _assert_fault(api, info, GiB + PAGE, True)
    vm.check()


def test_exit_on_private_access_to_plain_slot(api, vm, host):
    """Item 21: private attribute on a memslot without guest_memfd."""
    mem = host.mmap_anonymous(8 * PAGE)
    vm.set_user_memory_region2(0, 0, GiB, 8 * PAGE, mem.addr)
    vm.set_memory_attributes(GiB, 8 * PAGE, _priv(api))
    with pytest.raises(api.MemoryFault) as info:
        vm.guest_read(GiB + 3 * PAGE, private=True)
    _assert_fault(api, info, GiB + 3 * PAGE, True)
    with pytest.raises(api.MemoryFault) as info:
        vm.guest_write(GiB, 1, private=True)
    _assert_fault(api, info, GiB, True)
    assert vm.stats()["memory_faults"] == 2
    assert vm.stats()["pages_allocated"] == 0


def test_exit_on_attribute_mismatch(api, vm, host):
    g = Guest(api, host, vm, npages=8)
    # Private access to a shared gfn.
    with pytest.raises(api.MemoryFault) as info:
        g.read(2, private=True)
    _assert_fault(api, info, 2 * PAGE, True)
    # Shared access to a private gfn.
    g.convert(3, 1, private=True)
    with pytest.raises(api.MemoryFault) as info:
        g.write(3, 1, private=False)
    _assert_fault(api, info, 3 * PAGE, False)
    with pytest.raises(api.MemoryFault) as info:
        g.read(3, private=False)
    _assert_fault(api, info, 3 * PAGE, False)
    # A faulting access allocates nothing.
    st = vm.stats()
    assert st["pages_allocated"] == 0
    assert st["allocations"] == 0
    assert st["memory_faults"] == 3


def test_fault_gpa_is_page_aligned(api, vm, host):
    Guest(api, host, vm, npages=8)
    with pytest.raises(api.MemoryFault) as info:
        vm.guest_read(5 * PAGE + 123, private=True)
    _assert_fault(api, info, 5 * PAGE, True)


def test_unaligned_gpa_accesses_the_page(api, vm, host):
    g = Guest(api, host, vm, npages=8)
    vm.guest_write(2 * PAGE + 8, 77, private=False)
    assert g.host_read(2) == 77
    assert vm.guest_read(2 * PAGE + PAGE - 1, private=False) == 77


def test_private_access_without_slot(api, vm):
    # Attribute private, no memslot at all: a memory-fault exit, flags PRIVATE.
    vm.set_memory_attributes(GiB, PAGE, _priv(api))
    with pytest.raises(api.MemoryFault) as info:
        vm.guest_read(GiB, private=True)
    _assert_fault(api, info, GiB, True)
    # Attribute shared, private access, no memslot: the mismatch exit.
    with pytest.raises(api.MemoryFault) as info:
        vm.guest_write(2 * GiB, 1, private=True)
    _assert_fault(api, info, 2 * GiB, True)
    # Attribute private, shared access, no memslot: the mismatch exit (flags 0).
    with pytest.raises(api.MemoryFault) as info:
        vm.guest_read(GiB, private=False)
    _assert_fault(api, info, GiB, False)


def test_shared_access_without_slot_is_an_mmio_exit(api, vm):
    """A shared access no memslot backs is emulated MMIO (KVM_EXIT_MMIO, 8 bytes), not a
    memory fault."""
    for call, is_write in (
        (lambda: vm.guest_read(GiB, private=False), False),
        (lambda: vm.guest_write(GiB + 8 * PAGE, 1, private=False), True),
    ):
        with pytest.raises(api.MmioExit) as info:
            call()
        assert info.value.phys_addr == (GiB + 8 * PAGE if is_write else GiB)
        assert info.value.len == 8
        assert info.value.is_write is is_write
        assert not isinstance(info.value, OSError)
    assert vm.stats()["memory_faults"] == 0
    assert vm.stats()["mmio_exits"] == 2


def test_close_while_bound(api, vm, host):
    g = Guest(api, host, vm, npages=8)
    g.convert(0, 4, private=True)
    for p in range(4):
        g.write(p, 10 + p, private=True)
    g.write(6, 66, private=False)
    assert vm.stats()["pages_allocated"] == 5
    g.gmem.close()
    assert g.gmem.closed
    # The file is gone: its pages are freed, private accesses exit.
    st = vm.stats()
    assert st["pages_allocated"] == 1
    assert st["frees"] == 4
    for p in range(4):
        with pytest.raises(api.MemoryFault) as info:
            g.read(p, private=True)
        _assert_fault(api, info, p * PAGE, True)
    # Shared accesses still go to the anonymous memory.
    assert g.read(6, private=False) == 66
    g.write(7, 77, private=False)
    assert g.host_read(7) == 77
    # The memslot can still be deleted.
    vm.set_user_memory_region2(0, 0, 0, 0)
    vm.check()
    host.check()


def test_close_with_live_mmap_keeps_file(api, vm, host):
    """The fd goes away but an mmap keeps the file (and its bindings) alive."""
    mem = host.mmap_anonymous(4 * PAGE)
    f = vm.create_guest_memfd(4 * PAGE, api.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, api.KVM_MEM_GUEST_MEMFD, 0, 4 * PAGE, mem.addr, f, 0)
    vm.set_memory_attributes(0, 4 * PAGE, _priv(api))
    vm.guest_write(0, 5, private=True)
    m = f.mmap(0, 4 * PAGE)
    f.close()
    assert vm.guest_read(0, private=True) == 5
    assert vm.stats()["pages_allocated"] == 1
    m.unmap()
    with pytest.raises(api.MemoryFault):
        vm.guest_read(0, private=True)
    assert vm.stats()["pages_allocated"] == 0
    vm.check()
    host.check()
