"""KVM_SET_USER_MEMORY_REGION(2): flag checks, binding errors, overlaps, slot limits.

KERNEL.md §1 (check order of kvm_set_memory_region() and kvm_gmem_bind()) and the
set_memory_region_test.c items of §5 (16-19).
"""

from __future__ import annotations

import errno

import pytest

from util import PAGE, Guest, raises_errno

MiB = 1 << 20
REGION_GPA = 0xC000_0000
REGION_SIZE = 2 * MiB


def _gm(api):
    return api.KVM_MEM_GUEST_MEMFD


# --------------------------------------------------------------------------- 16 flags


def test_invalid_flags(api, vm, host):
    mem = host.mmap_anonymous(REGION_SIZE)
    supported = api.KVM_MEM_LOG_DIRTY_PAGES | api.KVM_MEM_READONLY | api.KVM_MEM_GUEST_MEMFD
    v2_only = api.KVM_MEM_GUEST_MEMFD
    for i in range(32):
        bit = 1 << i
        if supported & bit and not v2_only & bit:
            continue
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region(0, bit, REGION_GPA, REGION_SIZE, mem.addr)
        if supported & bit:
            continue
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region2(0, bit, REGION_GPA, REGION_SIZE, mem.addr)
    f = vm.create_guest_memfd(REGION_SIZE)
    for bad in (api.KVM_MEM_LOG_DIRTY_PAGES, api.KVM_MEM_READONLY):
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region2(
                0, api.KVM_MEM_GUEST_MEMFD | bad, REGION_GPA, REGION_SIZE, mem.addr, f, 0
            )
    vm.check()


def test_v1_creates_plain_slot(api, vm, host):
    mem = host.mmap_anonymous(4 * PAGE)
    vm.set_user_memory_region(0, 0, REGION_GPA, 4 * PAGE, mem.addr)
    vm.guest_write(REGION_GPA + PAGE, 42, private=False)
    assert mem.read(PAGE) == 42
    # v1 delete works as well.
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region(0, 0, 0, 0, 0)


def test_log_dirty_slot_is_fine(api, vm, host):
    mem = host.mmap_anonymous(4 * PAGE)
    vm.set_user_memory_region2(0, api.KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * PAGE, mem.addr)
    vm.guest_write(0, 1, private=False)
    assert mem.read(0) == 1


# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize(
    ("gpa", "size", "uaddr_off", "gm_off"),
    [
        (0, PAGE + 1, 0, 0),
        (0, PAGE - 1, 0, 0),
        (1, PAGE, 0, 0),
        (PAGE + 8, PAGE, 0, 0),
        (0, PAGE, 1, 0),
        (0, PAGE, PAGE - 1, 0),
        (0, PAGE, 0, 1),
        (0, PAGE, 0, PAGE + 1),
    ],
)
def test_unaligned_region(api, vm, host, gpa, size, uaddr_off, gm_off):
    mem = host.mmap_anonymous(4 * PAGE)
    f = vm.create_guest_memfd(8 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, _gm(api), gpa, size, mem.addr + uaddr_off, f, gm_off)
    if gm_off == 0:
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region2(0, 0, gpa, size, mem.addr + uaddr_off)


def test_userspace_addr_must_pass_access_ok(api, vm, host):
    """x86-64 TASK_SIZE_MAX (4-level paging) bounds [userspace_addr, +memory_size)."""
    task_size = (1 << 47) - PAGE
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, task_size - 2 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, (1 << 64) - 4 * PAGE)
    vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, task_size - 4 * PAGE)


def test_guest_memfd_flag_without_fd(api, vm, host):
    mem = host.mmap_anonymous(4 * PAGE)
    with raises_errno(errno.EBADF):
        vm.set_user_memory_region2(0, _gm(api), 0, 4 * PAGE, mem.addr, None, 0)


def test_gpa_wrap(api, vm, host):
    mem = host.mmap_anonymous(4 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, 0, (1 << 64) - 2 * PAGE, 4 * PAGE, mem.addr)


def test_gmem_offset_overflow(api, vm, host):
    mem = host.mmap_anonymous(4 * PAGE)
    f = vm.create_guest_memfd(8 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, _gm(api), 0, 4 * PAGE, mem.addr, f, (1 << 64) - 2 * PAGE)


# --------------------------------------------------------------------------- 17 add_private


def test_add_private_bad_guest_memfd(api, vm, host):
    mem = host.mmap_anonymous(REGION_SIZE)
    other_vm = host.create_vm("sw_protected", "dual")
    other = other_vm.create_guest_memfd(REGION_SIZE)
    for bad in (host.fd, vm.fd, other_vm.fd, host, vm, other_vm, other, other.fd):
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region2(0, _gm(api), REGION_GPA, REGION_SIZE, mem.addr, bad, 0)
    f = vm.create_guest_memfd(REGION_SIZE)
    for off in range(1, PAGE):
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region2(0, _gm(api), REGION_GPA, REGION_SIZE, mem.addr, f, off)
    vm.set_user_memory_region2(0, _gm(api), REGION_GPA, REGION_SIZE, mem.addr, f, 0)
    vm.check()


def test_add_private_by_fd_number(api, vm, host):
    mem = host.mmap_anonymous(4 * PAGE)
    f = vm.create_guest_memfd(4 * PAGE)
    vm.set_user_memory_region2(0, _gm(api), 0, 4 * PAGE, mem.addr, f.fd, 0)
    vm.set_memory_attributes(0, PAGE, api.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.guest_write(0, 9, private=True)
    assert vm.guest_read(0, private=True) == 9
    assert vm.stats()["pages_allocated"] == 1


def test_add_private_fd_not_open(api, vm, host):
    mem = host.mmap_anonymous(4 * PAGE)
    f = vm.create_guest_memfd(4 * PAGE)
    fd = f.fd
    f.close()
    with raises_errno(errno.EBADF):
        vm.set_user_memory_region2(0, _gm(api), 0, 4 * PAGE, mem.addr, f, 0)
    with raises_errno(errno.EBADF):
        vm.set_user_memory_region2(0, _gm(api), 0, 4 * PAGE, mem.addr, fd, 0)
    with raises_errno(errno.EBADF):
        vm.set_user_memory_region2(0, _gm(api), 0, 4 * PAGE, mem.addr, 1_000_000, 0)
    vm.check()


def test_add_private_beyond_file(api, vm, host):
    mem = host.mmap_anonymous(8 * PAGE)
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, _gm(api), 0, 8 * PAGE, mem.addr, f, 0)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, _gm(api), 0, 2 * PAGE, mem.addr, f, 3 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, _gm(api), 0, PAGE, mem.addr, f, 4 * PAGE)
    vm.set_user_memory_region2(0, _gm(api), 0, PAGE, mem.addr, f, 3 * PAGE)


def test_gmem_range_already_bound_is_eexist(api, vm, host):
    """kvm_gmem_bind() since 7.2: a bound range is EEXIST (EINVAL up to 7.1)."""
    mem = host.mmap_anonymous(8 * PAGE)
    f = vm.create_guest_memfd(8 * PAGE)
    vm.set_user_memory_region2(0, _gm(api), 0, 4 * PAGE, mem.addr, f, 0)
    for off in (0, PAGE, 3 * PAGE):
        with raises_errno(errno.EEXIST):
            vm.set_user_memory_region2(1, _gm(api), 1 << 30, 4 * PAGE, mem.addr, f, off)
    # The other half is free.
    vm.set_user_memory_region2(1, _gm(api), 1 << 30, 4 * PAGE, mem.addr + 4 * PAGE, f, 4 * PAGE)
    vm.check()


def test_gmem_range_rebindable_after_delete(api, vm, host):
    mem = host.mmap_anonymous(8 * PAGE)
    f = vm.create_guest_memfd(8 * PAGE)
    vm.set_user_memory_region2(0, _gm(api), 0, 4 * PAGE, mem.addr, f, 0)
    vm.set_user_memory_region2(0, _gm(api), 0, 0, 0, None, 0)
    vm.set_user_memory_region2(1, _gm(api), 1 << 30, 4 * PAGE, mem.addr, f, 0)
    vm.check()


def test_shared_guest_memfd_only_for_two_offsets(api, vm, host):
    mem = host.mmap_anonymous(4 * PAGE)
    f = vm.create_guest_memfd(8 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(
            0, _gm(api), 0, 4 * PAGE, mem.addr, f, 0, shared_guest_memfd=f, shared_offset=4 * PAGE
        )


# --------------------------------------------------------------------------- 18 overlap


def test_add_overlapping_private_regions(api, vm, host):
    mem = host.mmap_anonymous(2 * REGION_SIZE)
    f = vm.create_guest_memfd(4 * REGION_SIZE)
    vm.set_user_memory_region2(0, _gm(api), REGION_GPA, 2 * REGION_SIZE, mem.addr, f, 0)
    vm.set_user_memory_region2(
        1, _gm(api), REGION_GPA * 2, 2 * REGION_SIZE, mem.addr, f, 2 * REGION_SIZE
    )
    # Delete the first slot (flags may still say GUEST_MEMFD, fd is irrelevant).
    vm.set_user_memory_region2(0, _gm(api), REGION_GPA, 0, 0, None, 0)
    # Recreate it over the front half of the other slot, then over its back half.
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(
            0, _gm(api), REGION_GPA * 2 - REGION_SIZE, 2 * REGION_SIZE, mem.addr, f, 0
        )
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(
            0, _gm(api), REGION_GPA * 2 + REGION_SIZE, 2 * REGION_SIZE, mem.addr, f, 0
        )
    vm.check()


def test_overlap_check_order(api, vm, host):
    mem = host.mmap_anonymous(8 * PAGE)
    f = vm.create_guest_memfd(16 * PAGE)
    vm.set_user_memory_region2(0, _gm(api), 0, 8 * PAGE, mem.addr, f, 0)
    # GPA overlap (EEXIST) comes before kvm_gmem_bind() (EBADF, EEXIST for a bound range).
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(1, _gm(api), 4 * PAGE, 8 * PAGE, mem.addr, 1_000_000, 0)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(1, _gm(api), 4 * PAGE, 8 * PAGE, mem.addr, f, 0)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(1, 0, 7 * PAGE, PAGE, mem.addr)
    # ...but after the sanity checks (EINVAL).
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(1, _gm(api), 4 * PAGE, 8 * PAGE, mem.addr, f, 8 * PAGE + 1)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(1, _gm(api) | 1 << 9, 4 * PAGE, 8 * PAGE, mem.addr, f, 0)
    # Flags are checked before the slot's existence on delete.
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, _gm(api) | api.KVM_MEM_LOG_DIRTY_PAGES, 0, 0, 0)
    vm.check()


def test_adjacent_slots_do_not_overlap(api, vm, host):
    mem = host.mmap_anonymous(8 * PAGE)
    vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, mem.addr)
    vm.set_user_memory_region2(1, 0, 4 * PAGE, 4 * PAGE, mem.addr + 4 * PAGE)
    vm.check()


# --------------------------------------------------------------------------- 19 max slots


def test_max_slots(api, vm, host):
    nr = vm.check_extension(api.KVM_CAP_NR_MEMSLOTS)
    assert nr == api.KVM_USER_MEM_SLOTS
    mem = host.mmap_anonymous(PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(nr, 0, 0, PAGE, mem.addr)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(nr + 3, 0, 0, PAGE, mem.addr)
    # Address space 1 (SMM) does not exist for VMs with private memory.
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(1 << 16, 0, 0, PAGE, mem.addr)
    vm.set_user_memory_region2(nr - 1, 0, 0, PAGE, mem.addr)
    vm.guest_write(0, 3, private=False)
    assert mem.read(0) == 3


# --------------------------------------------------------------------------- modify / delete


def test_delete_missing_slot(api, vm):
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, 0, 0, 0)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(5, _gm(api), 0, 0, 0, None, 0)


def test_private_memslots_are_immutable(api, vm, host):
    g = Guest(api, host, vm, npages=8)
    gm = _gm(api)
    # The very same region again, a move, a flag change: all EINVAL.
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, gm, 0, 8 * PAGE, g.mem.addr, g.gmem, 0)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, gm, 1 << 30, 8 * PAGE, g.mem.addr, g.gmem, 0)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, 0, 0, 8 * PAGE, g.mem.addr)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, api.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 * PAGE, g.mem.addr)
    # Even where the new range would overlap: the immutability check comes first.
    vm.set_user_memory_region2(1, 0, 1 << 30, PAGE, g.mem.addr)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, gm, 1 << 30, 8 * PAGE, g.mem.addr, g.gmem, 0)
    # Deleting works.
    vm.set_user_memory_region2(0, gm, 0, 0, 0, None, 0)
    vm.check()


def test_modify_plain_memslot(api, vm, host):
    mem = host.mmap_anonymous(4 * PAGE)
    vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, mem.addr)
    vm.guest_write(PAGE, 11, private=False)
    # Nothing to change.
    vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, mem.addr)
    # FLAGS_ONLY: dirty logging on and off.
    vm.set_user_memory_region2(0, api.KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * PAGE, mem.addr)
    vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, mem.addr)
    # READONLY may not change, nor userspace_addr or size.
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, api.KVM_MEM_READONLY, 0, 4 * PAGE, mem.addr)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, mem.addr + PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, 0, 0, 2 * PAGE, mem.addr)
    # Nor may the GUEST_MEMFD bit be added.
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, _gm(api), 0, 4 * PAGE, mem.addr, f, 0)
    # MOVE: the same host memory now appears at the new gpa.
    vm.set_user_memory_region2(0, 0, 1 << 30, 4 * PAGE, mem.addr)
    assert vm.guest_read((1 << 30) + PAGE, private=False) == 11
    with pytest.raises(api.MmioExit):
        vm.guest_read(PAGE, private=False)
    # MOVE onto another slot is EEXIST.
    vm.set_user_memory_region2(1, 0, 0, PAGE, mem.addr)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, mem.addr)
    vm.check()


def test_delete_zaps_and_unbinds(api, vm, host):
    g = Guest(api, host, vm, npages=8)
    g.convert(0, 8, private=True)
    g.write(0, 5, private=True)
    vm.set_user_memory_region2(0, 0, 0, 0)
    # The guest_memfd page stays allocated (the file owns it)...
    assert vm.stats()["pages_allocated"] == 1
    # ...and comes back when the range is bound again.
    vm.set_user_memory_region2(3, _gm(api), 1 << 30, 8 * PAGE, g.mem.addr, g.gmem, 0)
    vm.set_memory_attributes(1 << 30, 8 * PAGE, api.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert vm.guest_read(1 << 30, private=True) == 5
    vm.check()
