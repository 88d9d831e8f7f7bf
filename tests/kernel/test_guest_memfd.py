"""KVM_CREATE_GUEST_MEMFD, fallocate, read/write, mmap.

KERNEL.md §1 and the guest_memfd_test.c items of §5 (1-9, 11-15 as far as the API can
express them).  Written from the rule text, not from the kernel's code.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

import gmem
from util import PAGE, raises_errno

MiB = 1 << 20
KEEP = 1  # FALLOC_FL_KEEP_SIZE
PUNCH = 2  # FALLOC_FL_PUNCH_HOLE

VM_COMBOS = [
    ("sw_protected", s) for s in ("dual", "inplace", "realloc", "two_offsets", "attr_hook")
] + [(t, "dual") for t in ("pkvm", "tdx", "snp")]


# --------------------------------------------------------------------------- 1. flags


def _create_with_flag(vm, api, bit):
    """Creating with one flag bit, as the mainline selftest probes it (no page order).

    GUEST_MEMFD_FLAG_HUGETLB is a dev-tree flag: KVM_CAP_GUEST_MEMFD_FLAGS (mainline)
    does not report it, and alone (without a page order) it is EINVAL; with page_order
    9 or 18 it works (test_hugetlb_rules)."""
    return vm.create_guest_memfd(2 * MiB, bit)


def _check_flag_bits(api, vm):
    supported = vm.check_extension(api.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert supported & api.GUEST_MEMFD_FLAG_MMAP  # MMAP is always supported (mainline)
    for i in range(64):
        bit = 1 << i
        if supported & bit:
            f = _create_with_flag(vm, api, bit)
            assert f.flags == bit
            assert f.fd >= 0
        else:
            with raises_errno(errno.EINVAL, msg=f"flag bit {i} (supported {supported:#x})"):
                _create_with_flag(vm, api, bit)


def test_flags_sw_protected_dual(api, vm):
    _check_flag_bits(api, vm)


@pytest.mark.parametrize(("vm_type", "strategy"), VM_COMBOS)
def test_flags_every_vm(vm_type, strategy):
    vm = gmem.Host(64 * MiB).create_vm(vm_type, strategy)
    _check_flag_bits(gmem, vm)


def test_flags_all_supported_at_once(api, vm):
    supported = vm.check_extension(api.KVM_CAP_GUEST_MEMFD_FLAGS)
    supported &= ~api.GUEST_MEMFD_FLAG_HUGETLB
    f = vm.create_guest_memfd(PAGE, supported)
    assert f.flags == supported


def test_init_shared_refused_without_inplace(api, vm):
    with raises_errno(errno.EINVAL):
        vm.create_guest_memfd(PAGE, api.GUEST_MEMFD_FLAG_MMAP | api.GUEST_MEMFD_FLAG_INIT_SHARED)


# --------------------------------------------------------------------------- 2, 3, 12 sizes


def test_create_multiple(api, vm):
    a = vm.create_guest_memfd(PAGE)
    b = vm.create_guest_memfd(2 * PAGE)
    assert a.size == PAGE
    assert b.size == 2 * PAGE
    assert a.inode != b.inode
    assert a.fd != b.fd
    assert a.flags == 0
    assert a.page_order == 0
    assert not a.closed


def test_file_size(api, vm):
    f = vm.create_guest_memfd(1 * MiB)
    assert f.size == 1 * MiB


@pytest.mark.parametrize("size", [1, 2, 511, 2048, PAGE - 1])
def test_invalid_sizes_sample(api, vm, size):
    with raises_errno(errno.EINVAL):
        vm.create_guest_memfd(size)


def test_invalid_sizes_all(api, vm):
    for size in range(1, PAGE):
        with raises_errno(errno.EINVAL):
            vm.create_guest_memfd(size)


@pytest.mark.parametrize("size", [0, PAGE + 1, 3 * PAGE - 8, 1 << 63, (1 << 64) - PAGE])
def test_invalid_sizes_other(api, vm, size):
    # 0 is refused in mainline (v13 allowed it); >= 2^63 is a negative loff_t.
    with raises_errno(errno.EINVAL):
        vm.create_guest_memfd(size)


def test_flags_checked_before_size(api, vm):
    with raises_errno(errno.EINVAL):
        vm.create_guest_memfd(1, 1 << 40)


def test_page_order_without_hugetlb(api, vm):
    for order in (9, 18, 1):
        with raises_errno(errno.EINVAL):
            vm.create_guest_memfd(2 * MiB, 0, page_order=order)


def test_hugetlb_rules():
    """docs/api.md's HugeTLB rules (dev tree).  Whether the flag is advertised in
    KVM_CAP_GUEST_MEMFD_FLAGS is test_flags_*'s business."""
    vm = gmem.Host(64 * MiB).create_vm("sw_protected", "dual")
    h = gmem.GUEST_MEMFD_FLAG_HUGETLB
    f = vm.create_guest_memfd(4 * MiB, h, page_order=9)
    assert f.page_order == 9
    for order in (0, 1, 8, 10, 17, 19):
        with raises_errno(errno.EINVAL):
            vm.create_guest_memfd(4 * MiB, h, page_order=order)
    with raises_errno(errno.EINVAL):
        vm.create_guest_memfd(2 * MiB + PAGE, h, page_order=9)
    with raises_errno(errno.EINVAL):
        vm.create_guest_memfd(2 * MiB, h | gmem.GUEST_MEMFD_FLAG_INIT_SHARED, page_order=9)
    # Fallocate on HugeTLB gmem needs huge-page alignment.
    with raises_errno(errno.EINVAL):
        f.fallocate(KEEP, PAGE, 2 * MiB)
    f.fallocate(KEEP, 0, 2 * MiB)
    vm.check()


# --------------------------------------------------------------------------- 4 read/write


def test_file_read_write(api, vm):
    f = vm.create_guest_memfd(PAGE)
    with raises_errno(errno.EINVAL):
        f.read(PAGE)
    with raises_errno(errno.EINVAL):
        f.read(1)
    with raises_errno(errno.EINVAL):
        f.write(b"\xaa" * PAGE)
    with raises_errno(errno.EINVAL):
        f.write(b"")


def test_truncate_refused(api, vm):
    f = vm.create_guest_memfd(4 * PAGE)
    for size in (0, PAGE, 4 * PAGE, 8 * PAGE):
        with raises_errno(errno.EINVAL):
            f.truncate(size)
    assert f.size == 4 * PAGE


# --------------------------------------------------------------------------- 5-9 mmap


def test_mmap_not_supported(api, vm):
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.ENODEV):
        f.mmap(0, PAGE)
    with raises_errno(errno.ENODEV):
        f.mmap(0, 4 * PAGE)
    with raises_errno(errno.ENODEV):
        f.mmap()
    # ENODEV is checked before the MAP_SHARED requirement.
    with raises_errno(errno.ENODEV):
        f.mmap(0, PAGE, shared=False)


def test_mmap_cow_refused(api, vm):
    f = vm.create_guest_memfd(4 * PAGE, api.GUEST_MEMFD_FLAG_MMAP)
    with raises_errno(errno.EINVAL):
        f.mmap(0, 4 * PAGE, shared=False)


def test_fault_private(api, vm):
    """MMAP without INIT_SHARED: mmap succeeds, every access is SIGBUS."""
    f = vm.create_guest_memfd(4 * PAGE, api.GUEST_MEMFD_FLAG_MMAP)
    m = f.mmap(0, 4 * PAGE)
    assert m.kind == "guest_memfd"
    assert m.length == 4 * PAGE
    for off in (0, PAGE, 3 * PAGE):
        with pytest.raises(api.HostFault) as info:
            m.read(off)
        assert info.value.errno == errno.EFAULT
        assert info.value.signal == "SIGBUS"
        with pytest.raises(api.HostFault):
            m.write(off, 0xAA)
    vm.check()


def _inplace_shared_gmem(size):
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", "inplace")
    flags = gmem.GUEST_MEMFD_FLAG_MMAP | gmem.GUEST_MEMFD_FLAG_INIT_SHARED
    assert vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD_FLAGS) & flags == flags
    return host, vm, vm.create_guest_memfd(size, flags)


def test_mmap_supported_inplace():
    """Item 6 on the VM type that offers INIT_SHARED (the in-place series)."""
    npages = 8
    _, vm, f = _inplace_shared_gmem(npages * PAGE)
    m = f.mmap(0, npages * PAGE)
    for p in range(npages):
        m.write(p * PAGE, 0xAA)
    assert [m.read(p * PAGE) for p in range(npages)] == [0xAA] * npages
    f.fallocate(PUNCH | KEEP, 0, PAGE)
    assert m.read(0) == 0
    assert [m.read(p * PAGE) for p in range(1, npages)] == [0xAA] * (npages - 1)
    m.write(0, 0xAA)
    assert m.read(0) == 0xAA
    vm.check()


def test_fault_overflow_inplace():
    """Item 7: map 4x the file; touching beyond EOF is SIGBUS, in-range data intact."""
    npages = 4
    _, vm, f = _inplace_shared_gmem(npages * PAGE)
    m = f.mmap(0, 4 * npages * PAGE)
    for p in range(npages):
        m.write(p * PAGE, 0x55 + p)
    for p in range(npages, 4 * npages):
        with pytest.raises(gmem.HostFault) as info:
            m.read(p * PAGE)
        assert info.value.signal == "SIGBUS"
        with pytest.raises(gmem.HostFault):
            m.write(p * PAGE, 1)
    assert [m.read(p * PAGE) for p in range(npages)] == [0x55 + p for p in range(npages)]
    with raises_errno(errno.EINVAL):
        m.read(4 * npages * PAGE)  # outside the mapping itself
    vm.check()


def test_guest_and_host_share_inplace():
    """Item 15: MMAP|INIT_SHARED gmem bound via REGION2; the host writes 0xaa, the guest
    reads it and writes 0xff, the host sees 0xff."""
    npages = 4
    _, vm, f = _inplace_shared_gmem(npages * PAGE)
    m = f.mmap(0, npages * PAGE)
    gpa = 1 << 30
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, gpa, npages * PAGE, 0, f, 0)
    for p in range(npages):
        m.write(p * PAGE, 0xAA)
    for p in range(npages):
        assert vm.guest_read(gpa + p * PAGE, private=False) == 0xAA
        vm.guest_write(gpa + p * PAGE, 0xFF, private=False)
    assert [m.read(p * PAGE) for p in range(npages)] == [0xFF] * npages
    vm.check()


def test_userspace_memory_from_a_guest_memfd_mmap():
    """A plain memslot (no KVM_MEM_GUEST_MEMFD) whose userspace memory is an mmap of a
    guest_memfd: the guest's shared accesses reach the file's pages, singly and in a
    batch of accesses to mapped pages (apply's fast path), and the host sees them."""
    npages = 64
    _, vm, f = _inplace_shared_gmem(npages * PAGE)
    m = f.mmap(0, npages * PAGE)
    gpa = 1 << 30
    vm.set_user_memory_region(0, 0, gpa, npages * PAGE, m.addr)
    for p in range(npages):
        m.write(p * PAGE, 0xAA + p)
    assert [vm.guest_read(gpa + p * PAGE, private=False) for p in range(npages)] == [
        0xAA + p for p in range(npages)
    ]
    ev = np.zeros(npages, gmem.EVENT_DTYPE)
    ev["op"], ev["gfn"], ev["npages"] = (
        gmem.Op.GUEST_WRITE_SHARED,
        (gpa >> 12) + np.arange(npages),
        1,
    )
    ev["value"] = 0xB00 + np.arange(npages)
    before = vm.stats()["memory_faults"]
    assert not vm.apply(ev).any()
    assert vm.stats()["memory_faults"] == before
    assert [m.read(p * PAGE) for p in range(npages)] == [0xB00 + p for p in range(npages)]
    vm.check()


# --------------------------------------------------------------------------- 13, 14 fallocate


def test_fallocate_selftest_sequence(api, vm):
    total = 4 * PAGE
    f = vm.create_guest_memfd(total)
    f.fallocate(KEEP, 0, total)
    with raises_errno(errno.EINVAL):
        f.fallocate(PUNCH | KEEP, PAGE - 1, PAGE)
    with raises_errno(errno.EINVAL):
        f.fallocate(KEEP, total, PAGE)
    with raises_errno(errno.EINVAL):
        f.fallocate(KEEP, total + PAGE, PAGE)
    f.fallocate(PUNCH | KEEP, total, PAGE)
    f.fallocate(PUNCH | KEEP, total + PAGE, PAGE)
    with raises_errno(errno.EINVAL):
        f.fallocate(KEEP, PAGE, PAGE - 1)
    f.fallocate(PUNCH | KEEP, PAGE, PAGE)
    f.fallocate(KEEP, PAGE, PAGE)
    vm.check()


INVALID_RANGES = [
    (0, 1),
    (0, PAGE - 1),
    (0, PAGE + 1),
    (1, 1),
    (1, PAGE - 1),
    (1, PAGE),
    (1, PAGE + 1),
    (PAGE, 1),
    (PAGE, PAGE - 1),
    (PAGE, PAGE + 1),
]


@pytest.mark.parametrize("mode", [PUNCH | KEEP, KEEP])
def test_invalid_punch_hole_and_allocate(api, vm, mode):
    f = vm.create_guest_memfd(4 * PAGE)
    for offset, length in INVALID_RANGES:
        with raises_errno(errno.EINVAL):
            f.fallocate(mode, offset, length)
    assert vm.stats()["pages_allocated"] == 0


@pytest.mark.parametrize(
    "mode",
    [
        PUNCH,  # PUNCH_HOLE without KEEP_SIZE
        0x4,  # COLLAPSE_RANGE... every bit but KEEP_SIZE|PUNCH_HOLE
        0x8,
        0x10,
        0x20,
        0x40,
        0x4 | KEEP,
        0x8 | KEEP,
        0x10 | KEEP,  # ZERO_RANGE
        0x20 | KEEP,
        0x40 | KEEP,
        0x10 | PUNCH | KEEP,
        1 << 20,
        (1 << 20) | KEEP,
    ],
)
def test_fallocate_unsupported_modes(api, vm, mode):
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EOPNOTSUPP):
        f.fallocate(mode, 0, PAGE)


def test_fallocate_mode_checked_before_alignment(api, vm):
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EOPNOTSUPP):
        f.fallocate(PUNCH, 1, 1)


def test_fallocate_zero_length(api, vm):
    """vfs_fallocate() refuses len <= 0 with EINVAL before the filesystem sees it."""
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EINVAL):
        f.fallocate(KEEP, 0, 0)
    with raises_errno(errno.EINVAL):
        f.fallocate(PUNCH | KEEP, 0, 0)


def test_fallocate_mode_zero_refused(api, vm):
    """kvm_gmem_fallocate(): a mode without KEEP_SIZE is EOPNOTSUPP (guest_memfd cannot
    grow), mode 0 included."""
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EOPNOTSUPP):
        f.fallocate(0, 0, 2 * PAGE)
    # After the vfs checks: a zero length is still EINVAL first.
    with raises_errno(errno.EINVAL):
        f.fallocate(0, 0, 0)
    # ...but before the alignment checks.
    with raises_errno(errno.EOPNOTSUPP):
        f.fallocate(0, 1, 1)
    assert vm.stats()["pages_allocated"] == 0


@pytest.mark.parametrize("mode", [KEEP, PUNCH | KEEP])
def test_fallocate_offsets_past_2_63(api, vm, mode):
    """vfs_fallocate(): a negative offset is EINVAL; offset+len past the largest file
    size (2^63 - 1) is EFBIG, before the mode and alignment checks of guest_memfd."""
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EINVAL):
        f.fallocate(mode, 1 << 63, PAGE)
    with raises_errno(errno.EINVAL):
        f.fallocate(mode, 0, 1 << 63)
    with raises_errno(errno.EFBIG):
        f.fallocate(mode, 1 << 62, 1 << 62)
    with raises_errno(errno.EFBIG):
        f.fallocate(mode, (1 << 63) - PAGE, 2 * PAGE)
    with raises_errno(errno.EFBIG):
        f.fallocate(mode, (1 << 62) + 1, 1 << 62)
    if mode & PUNCH:
        f.fallocate(mode, (1 << 63) - 2 * PAGE, PAGE)  # far beyond EOF: nothing to do


def test_fallocate_accounting(api, vm):
    f = vm.create_guest_memfd(16 * PAGE)
    f.fallocate(KEEP, 0, 8 * PAGE)
    st = vm.stats()
    assert st["pages_allocated"] == 8
    assert st["allocations"] == 8
    f.fallocate(KEEP, 4 * PAGE, 8 * PAGE)  # 4 already there
    st = vm.stats()
    assert st["pages_allocated"] == 12
    assert st["allocations"] == 12
    f.fallocate(PUNCH | KEEP, 2 * PAGE, 4 * PAGE)
    st = vm.stats()
    assert st["pages_allocated"] == 8
    assert st["frees"] == 4
    f.fallocate(PUNCH | KEEP, 0, 64 * PAGE)  # beyond EOF is fine
    st = vm.stats()
    assert st["pages_allocated"] == 0
    assert st["frees"] == 12
    assert st["peak_pages_allocated"] == 12
    vm.check()


def test_allocate_straddling_eof(api, vm):
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EINVAL):
        f.fallocate(KEEP, 2 * PAGE, 3 * PAGE)
    assert vm.stats()["pages_allocated"] == 0  # all-or-nothing


def test_fallocate_enomem(api):
    host = api.Host(16 * PAGE)
    vm = host.create_vm("sw_protected", "dual")
    f = vm.create_guest_memfd(64 * PAGE)
    with raises_errno(errno.ENOMEM):
        f.fallocate(KEEP, 0, 64 * PAGE)
    vm.check()
    host.check()
    f.fallocate(PUNCH | KEEP, 0, 64 * PAGE)
    f.fallocate(KEEP, 0, 8 * PAGE)
    assert vm.stats()["pages_allocated"] == 8
    host.check()


def test_calls_after_close(api, vm):
    f = vm.create_guest_memfd(4 * PAGE, api.GUEST_MEMFD_FLAG_MMAP)
    f.close()
    assert f.closed
    with raises_errno(errno.EBADF):
        f.fallocate(KEEP, 0, PAGE)
    with raises_errno(errno.EBADF):
        f.read(1)
    with raises_errno(errno.EBADF):
        f.write(b"x")
    with raises_errno(errno.EBADF):
        f.truncate(PAGE)
    with raises_errno(errno.EBADF):
        f.mmap()
    with raises_errno(errno.EBADF):
        f.close()


def test_close_frees_pages(api, vm):
    f = vm.create_guest_memfd(8 * PAGE)
    f.fallocate(KEEP, 0, 8 * PAGE)
    f.close()
    st = vm.stats()
    assert st["pages_allocated"] == 0
    assert st["frees"] == 8
    vm.check()


def test_gmem_pins_the_vm(api, host):
    """Item 25's tail: the guest_memfd keeps the VM alive; fallocate works after the VM
    object is dropped."""
    import gc

    vm = host.create_vm("sw_protected", "dual")
    f = vm.create_guest_memfd(8 * PAGE)
    del vm
    gc.collect()
    f.fallocate(KEEP, 0, 8 * PAGE)
    f.fallocate(PUNCH | KEEP, 0, 4 * PAGE)
    f.fallocate(KEEP, 0, PAGE)
    host.check()
