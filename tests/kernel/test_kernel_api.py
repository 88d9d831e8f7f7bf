"""Constants, capabilities, the Host, and "a failed call changes nothing".

KERNEL.md §1 (uAPI) and docs/api.md (Constants, Host, Vm.check_extension).
"""

from __future__ import annotations

import errno

import pytest

import gmem
from util import PAGE, Guest, raises_errno, snapshot

MiB = 1 << 20
STRATEGIES = ["dual", "inplace", "realloc", "two_offsets", "attr_hook"]
VM_TYPES = ["sw_protected", "pkvm", "tdx", "snp"]


def test_constants_match_the_uapi():
    assert gmem.PAGE_SIZE == 4096
    assert gmem.KVM_MEM_LOG_DIRTY_PAGES == 1 << 0
    assert gmem.KVM_MEM_READONLY == 1 << 1
    assert gmem.KVM_MEM_GUEST_MEMFD == 1 << 2
    assert gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE == 1 << 3
    assert gmem.KVM_MEMORY_EXIT_FLAG_PRIVATE == 1 << 3
    assert gmem.GUEST_MEMFD_FLAG_MMAP == 1 << 0
    assert gmem.GUEST_MEMFD_FLAG_INIT_SHARED == 1 << 1
    assert gmem.GUEST_MEMFD_FLAG_HUGETLB == 1 << 4
    assert gmem.FALLOC_FL_KEEP_SIZE == 1
    assert gmem.FALLOC_FL_PUNCH_HOLE == 2
    assert gmem.KVM_CAP_USER_MEMORY2 == 231
    assert gmem.KVM_CAP_MEMORY_ATTRIBUTES == 233
    assert gmem.KVM_CAP_GUEST_MEMFD == 234
    assert gmem.KVM_CAP_NR_MEMSLOTS == 10
    assert gmem.KVM_CAP_GUEST_MEMFD_FLAGS == 244
    assert gmem.KVM_USER_MEM_SLOTS == 32764


def test_error_classes():
    assert issubclass(gmem.GmemError, OSError)
    for cls in (gmem.MemoryFault, gmem.HostFault, gmem.ConversionBusy):
        assert issubclass(cls, gmem.GmemError)
    assert issubclass(gmem.InvariantError, AssertionError)


# --------------------------------------------------------------------------- Host


@pytest.mark.parametrize("memory", [0, 1, PAGE - 1, PAGE + 1, ((1 << 31) + 1) * PAGE])
def test_host_memory_must_be_page_aligned_and_bounded(api, memory):
    with pytest.raises(ValueError, match=r"."):
        api.Host(memory)


def test_host_smallest_and_stats(api):
    h = api.Host(PAGE)
    assert h.stats()["total_pages"] == 1
    h = api.Host(8 * MiB)
    st = h.stats()
    assert st["total_pages"] == 2048
    assert st["free_pages"] == 2048
    assert st["pages_allocated"] == 0
    h.check()


@pytest.mark.parametrize(("vm_type", "strategy"), [("sgx", "dual"), ("tdx", "nope"), ("", "")])
def test_create_vm_unknown_names(api, vm_type, strategy):
    h = api.Host(8 * MiB)
    with pytest.raises(ValueError, match=r"."):
        h.create_vm(vm_type, strategy)


def test_create_vm_defaults_and_attributes(host):
    vm = host.create_vm()
    assert vm.vm_type == "sw_protected"
    assert vm.strategy == "dual"
    assert isinstance(vm.fd, int)
    assert vm.fd != host.fd
    other = host.create_vm("sw_protected", "dual")
    assert other.fd != vm.fd


def test_mmap_anonymous_bad_length(api, host):
    with raises_errno(errno.EINVAL):
        host.mmap_anonymous(0)


@pytest.mark.parametrize(("length", "pages"), [(1, 1), (PAGE - 1, 1), (PAGE + 1, 2)])
def test_mmap_anonymous_rounds_length_up(api, host, length, pages):
    """mmap(2) takes any nonzero length and maps whole pages."""
    assert host.mmap_anonymous(length).length == pages * PAGE


def test_anonymous_pages_allocate_on_first_write_only(host):
    m = host.mmap_anonymous(4 * PAGE)
    assert m.kind == "anonymous"
    assert m.length == 4 * PAGE
    assert m.addr % PAGE == 0
    before = host.stats()["pages_allocated"]
    assert m.read(0) == 0
    assert m.read(3 * PAGE) == 0
    assert host.stats()["pages_allocated"] == before
    m.write(PAGE, 7)
    assert m.read(PAGE) == 7
    assert host.stats()["pages_allocated"] == before + 1
    m.write(PAGE, 8)
    assert host.stats()["pages_allocated"] == before + 1
    host.check()


def test_anonymous_mapping_offsets_out_of_range(host):
    m = host.mmap_anonymous(2 * PAGE)
    with raises_errno(errno.EINVAL):
        m.read(2 * PAGE)
    with raises_errno(errno.EINVAL):
        m.write(2 * PAGE, 1)
    with raises_errno(errno.EINVAL):
        m.pin(5 * PAGE)


def test_anonymous_pin_discard_unpin(host):
    m = host.mmap_anonymous(4 * PAGE)
    m.write(0, 1)
    m.write(PAGE, 2)
    m.pin(PAGE)
    used = host.stats()["pages_allocated"]
    m.discard(0, 4 * PAGE)
    # The unpinned page is freed; the pinned one leaves the mapping (MADV_DONTNEED zaps
    # the PTE) but its frame stays allocated until the last unpin.
    assert host.stats()["pages_allocated"] == used - 1
    assert m.read(0) == 0
    assert m.read(PAGE) == 0
    m.unpin(PAGE)
    assert host.stats()["pages_allocated"] == used - 2
    with raises_errno(errno.EINVAL):
        m.unpin(PAGE)
    with raises_errno(errno.EINVAL):
        m.unpin(2 * PAGE)
    host.check()


def test_pinned_page_survives_discard_until_unpin(host):
    m = host.mmap_anonymous(2 * PAGE)
    m.pin(0)
    m.pin(0)
    used = host.stats()["pages_allocated"]
    m.discard(0, 2 * PAGE)
    assert host.stats()["pages_allocated"] == used
    m.unpin(0)
    assert host.stats()["pages_allocated"] == used
    m.unpin(0)
    assert host.stats()["pages_allocated"] == used - 1
    host.check()


def test_orphaned_pinned_page_counts_when_mapping_joins_a_vm(api, host, vm):
    """A pinned page discarded before any memslot points into its mapping is still
    allocated; once a memslot points into the mapping it is the VM's, and unpinning it
    frees it."""
    m = host.mmap_anonymous(8 * PAGE)
    m.pin(0)
    m.discard(0, PAGE)
    vm.set_user_memory_region2(0, 0, 0, 8 * PAGE, m.addr)
    assert vm.stats()["pages_allocated"] == 1
    vm.check()
    host.check()
    m.unpin(0)
    assert vm.stats()["pages_allocated"] == 0
    assert host.stats()["pages_allocated"] == 0
    vm.check()
    host.check()


def test_same_page_pinned_and_discarded_twice(api, host, vm):
    """Two different frames end up pinned behind the same mapping offset; both stay
    allocated until their pins go, and each unpin releases one."""
    m = host.mmap_anonymous(4 * PAGE)
    vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, m.addr)
    m.pin(0)
    m.discard(0, PAGE)
    m.pin(0)
    m.discard(0, PAGE)
    assert vm.stats()["pages_allocated"] == 2
    vm.check()
    host.check()
    m.unpin(0)
    assert vm.stats()["pages_allocated"] == 1
    m.unpin(0)
    assert vm.stats()["pages_allocated"] == 0
    assert vm.stats()["frees"] == 2
    with raises_errno(errno.EINVAL):
        m.unpin(0)
    vm.check()
    host.check()


def test_pin_allocates(host):
    m = host.mmap_anonymous(2 * PAGE)
    used = host.stats()["pages_allocated"]
    m.pin(0)
    assert host.stats()["pages_allocated"] == used + 1
    assert m.read(0) == 0
    m.unpin(0)


# --------------------------------------------------------------------------- capabilities


def test_check_extension_dual_sw_protected(api, vm):
    assert vm.check_extension(api.KVM_CAP_GUEST_MEMFD) == 1
    assert vm.check_extension(api.KVM_CAP_USER_MEMORY2) == 1
    assert vm.check_extension(api.KVM_CAP_NR_MEMSLOTS) == 32764
    assert vm.check_extension(api.KVM_CAP_MEMORY_ATTRIBUTES) == api.KVM_MEMORY_ATTRIBUTE_PRIVATE
    flags = vm.check_extension(api.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert flags & api.GUEST_MEMFD_FLAG_MMAP
    # Mainline refuses INIT_SHARED for every VM with private memory.
    assert not flags & api.GUEST_MEMFD_FLAG_INIT_SHARED
    assert vm.check_extension(api.KVM_CAP_MEMORY_FAULT_INFO) == 1
    assert vm.check_extension(api.KVM_CAP_READONLY_MEM) == 1
    for unknown in (0, 1, 9999, 230, 245):
        assert vm.check_extension(unknown) == 0


@pytest.mark.parametrize("strategy", ["realloc", "two_offsets", "attr_hook"])
def test_check_extension_mainline_strategies(strategy):
    vm = gmem.Host(8 * MiB).create_vm("sw_protected", strategy)
    assert vm.check_extension(gmem.KVM_CAP_MEMORY_ATTRIBUTES) == gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
    flags = vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert flags & gmem.GUEST_MEMFD_FLAG_MMAP
    assert not flags & gmem.GUEST_MEMFD_FLAG_INIT_SHARED


def test_check_extension_inplace():
    vm = gmem.Host(8 * MiB).create_vm("sw_protected", "inplace")
    flags = vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert flags & gmem.GUEST_MEMFD_FLAG_MMAP
    assert flags & gmem.GUEST_MEMFD_FLAG_INIT_SHARED
    assert vm.check_extension(gmem.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD) == 1


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_check_extension_every_vm_type(vm_type):
    vm = gmem.Host(8 * MiB).create_vm(vm_type, "dual")
    assert vm.vm_type == vm_type
    assert vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD) == 1
    assert vm.check_extension(gmem.KVM_CAP_NR_MEMSLOTS) == gmem.KVM_USER_MEM_SLOTS


# --------------------------------------------------------------------------- wrong types


def test_wrong_python_types(api, vm):
    with pytest.raises(TypeError):
        vm.create_guest_memfd("4096")
    with pytest.raises(TypeError):
        vm.set_memory_attributes(0.0, PAGE, 0)
    with pytest.raises(OverflowError):
        vm.create_guest_memfd(-PAGE)
    with pytest.raises(OverflowError):
        vm.create_guest_memfd(1 << 64)
    with pytest.raises(OverflowError):
        vm.set_memory_attributes(0, 1 << 64, 0)


# --------------------------------------------------------------------------- failed calls


def _populated(api, host, vm):
    g = Guest(api, host, vm, npages=64, file_pages=128)
    g.convert(0, 8, private=True)
    for p in range(8):
        g.write(p, 100 + p, private=True)
    for p in range(8, 16):
        g.write(p, 200 + p, private=False)
    g.host_write(20, 5)
    g.gmem.fallocate(api.FALLOC_FL_KEEP_SIZE, 100 * PAGE, 4 * PAGE)
    other_vm = host.create_vm("sw_protected", "dual")
    other = other_vm.create_guest_memfd(64 * PAGE)
    nommap = vm.create_guest_memfd(4 * PAGE)
    return g, other, nommap


FAILING_CALLS = {
    "gmem_bad_size": (errno.EINVAL, lambda a, g, o, n: g.vm.create_guest_memfd(PAGE - 1)),
    "gmem_bad_flags": (errno.EINVAL, lambda a, g, o, n: g.vm.create_guest_memfd(PAGE, 1 << 10)),
    "slot_overlap": (
        errno.EEXIST,
        lambda a, g, o, n: g.vm.set_user_memory_region2(
            1, a.KVM_MEM_GUEST_MEMFD, 32 * PAGE, 64 * PAGE, g.mem.addr, g.gmem, 64 * PAGE
        ),
    ),
    "slot_bad_fd": (
        errno.EBADF,
        lambda a, g, o, n: g.vm.set_user_memory_region2(
            1, a.KVM_MEM_GUEST_MEMFD, 1 << 30, 4 * PAGE, g.mem.addr, 987654, 0
        ),
    ),
    "slot_other_vm_gmem": (
        errno.EINVAL,
        lambda a, g, o, n: g.vm.set_user_memory_region2(
            1, a.KVM_MEM_GUEST_MEMFD, 1 << 30, 4 * PAGE, g.mem.addr, o, 0
        ),
    ),
    "slot_range_already_bound": (
        errno.EEXIST,
        lambda a, g, o, n: g.vm.set_user_memory_region2(
            1, a.KVM_MEM_GUEST_MEMFD, 1 << 30, 4 * PAGE, g.mem.addr, g.gmem, 60 * PAGE
        ),
    ),
    "slot_unaligned_offset": (
        errno.EINVAL,
        lambda a, g, o, n: g.vm.set_user_memory_region2(
            1, a.KVM_MEM_GUEST_MEMFD, 1 << 30, 4 * PAGE, g.mem.addr, g.gmem, 64 * PAGE + 8
        ),
    ),
    "slot_modify_gmem": (
        errno.EINVAL,
        lambda a, g, o, n: g.vm.set_user_memory_region2(
            0, a.KVM_MEM_GUEST_MEMFD, 0, 64 * PAGE, g.mem.addr, g.gmem, 0
        ),
    ),
    "slot_delete_missing": (
        errno.EINVAL,
        lambda a, g, o, n: g.vm.set_user_memory_region2(7, 0, 0, 0),
    ),
    "attr_flags": (errno.EINVAL, lambda a, g, o, n: g.vm.set_memory_attributes(0, PAGE, 0, 1)),
    "attr_bits": (errno.EINVAL, lambda a, g, o, n: g.vm.set_memory_attributes(0, PAGE, 1)),
    "attr_unaligned": (
        errno.EINVAL,
        lambda a, g, o, n: g.vm.set_memory_attributes(8 * PAGE + 1, PAGE, 0),
    ),
    "attr_size_zero": (errno.EINVAL, lambda a, g, o, n: g.vm.set_memory_attributes(0, 0, 0)),
    "punch_no_keep_size": (
        errno.EOPNOTSUPP,
        lambda a, g, o, n: g.gmem.fallocate(a.FALLOC_FL_PUNCH_HOLE, 0, 8 * PAGE),
    ),
    "punch_unaligned": (
        errno.EINVAL,
        lambda a, g, o, n: g.gmem.fallocate(
            a.FALLOC_FL_PUNCH_HOLE | a.FALLOC_FL_KEEP_SIZE, 1, 8 * PAGE
        ),
    ),
    "allocate_beyond_eof": (
        errno.EINVAL,
        lambda a, g, o, n: g.gmem.fallocate(a.FALLOC_FL_KEEP_SIZE, 120 * PAGE, 16 * PAGE),
    ),
    "gmem_read": (errno.EINVAL, lambda a, g, o, n: g.gmem.read(8)),
    "gmem_write": (errno.EINVAL, lambda a, g, o, n: g.gmem.write(b"x")),
    "gmem_truncate": (errno.EINVAL, lambda a, g, o, n: g.gmem.truncate(PAGE)),
    "gmem_mmap_no_flag": (errno.ENODEV, lambda a, g, o, n: n.mmap()),
    "unpin_unpinned": (errno.EINVAL, lambda a, g, o, n: g.mem.unpin(20 * PAGE)),
    "attributes2_on_dual": (
        errno.ENOTTY,
        lambda a, g, o, n: g.gmem.set_memory_attributes2(0, PAGE, 0),
    ),
}


@pytest.mark.parametrize("name", sorted(FAILING_CALLS))
def test_failed_call_changes_nothing(api, host, vm, name):
    err, call = FAILING_CALLS[name]
    g, other, nommap = _populated(api, host, vm)
    before = snapshot(vm, host, range(80))
    with raises_errno(err):
        call(api, g, other, nommap)
    assert snapshot(vm, host, range(80)) == before
    vm.check()
    host.check()
    # The guest still sees exactly what it wrote.
    assert [g.read(p, True) for p in range(8)] == [100 + p for p in range(8)]
    assert [g.read(p, False) for p in range(8, 16)] == [200 + p for p in range(8, 16)]
