"""Ports of the selftests of KERNEL.md §7 (mainline 7.x and the in-place series v13),
for every design where they apply.

Each test names the selftest and the kernel version whose rule it follows.
"""

from __future__ import annotations

import errno

import numpy as np
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


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_inplace_access_after_memslot_deleted_is_mmio(vm_type):
    """private_mem_kvm_exits_test.c as of the in-place series v13: with in-place mode a
    guest access after its memslot is deleted exits with KVM_EXIT_MMIO (phys_addr = gpa,
    len 8), private or shared."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, "inplace")
    f = vm.create_guest_memfd(4 * PAGE, gmem.GUEST_MEMFD_FLAG_MMAP)
    gpa = 1 << 32
    vm.set_user_memory_region2(0, MEMFD, gpa, 4 * PAGE, 0, f, 0)
    vm.guest_write(gpa, 5, private=True)
    vm.set_user_memory_region2(0, MEMFD, gpa, 0, 0, f, 0)
    for private in (True, False):
        with pytest.raises(gmem.MmioExit) as info:
            vm.guest_read(gpa, private=private)
        assert (info.value.phys_addr, info.value.len, info.value.is_write) == (gpa, 8, False)
    with pytest.raises(gmem.MmioExit) as info:
        vm.guest_write(gpa + PAGE, 1, private=True)
    assert info.value.is_write
    assert vm.stats()["mmio_exits"] == 3
    assert vm.stats()["memory_faults"] == 0
    host.check()


@pytest.mark.parametrize(("vm_type", "strategy"), [(vt, s) for vt, s in ALL if s != "inplace"])
def test_private_access_after_memslot_deleted_is_a_memory_fault(vm_type, strategy):
    """private_mem_kvm_exits_test.c (mainline): the attribute lives in the VM, so a
    private access after the memslot is deleted is a memory fault with the PRIVATE flag."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, strategy)
    f = vm.create_guest_memfd(4 * PAGE, gmem.GUEST_MEMFD_FLAG_MMAP)
    gpa = 1 << 32
    vm.set_user_memory_region2(0, MEMFD, gpa, 4 * PAGE, 0, f, 0)
    vm.set_memory_attributes(gpa, 4 * PAGE, gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.set_user_memory_region2(0, MEMFD, gpa, 0, 0, f, 0)
    with pytest.raises(gmem.MemoryFault) as info:
        vm.guest_read(gpa, private=True)
    assert (info.value.gpa, info.value.size) == (gpa, PAGE)
    assert info.value.flags == gmem.KVM_MEMORY_EXIT_FLAG_PRIVATE
    host.check()


def test_mmio_exit_in_event_batches():
    """vm.apply reports an MMIO exit as the status KVM_EXIT_MMIO, its gpa in the details,
    and counts it."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("snp", "dual")
    ev = np.zeros(2, dtype=gmem.EVENT_DTYPE)
    ev[0] = (gmem.Op.GUEST_READ_SHARED, 0x100, 1, 0)
    ev[1] = (gmem.Op.GUEST_WRITE_SHARED, 0x200, 1, 3)
    status, det = vm.apply(ev, details=True)
    assert status.tolist() == [gmem.KVM_EXIT_MMIO] * 2
    assert det["fault_gpa"].tolist() == [0x100 * PAGE, 0x200 * PAGE]
    assert vm.stats()["mmio_exits"] == 2


@pytest.mark.parametrize("strategy", ["inplace", "realloc", "attr_hook"])
def test_shared_access_after_release_is_a_memory_fault(strategy):
    """A shared access served from a released guest_memfd: kvm_gmem_get_pfn() fails and
    the guest exits with a memory fault (gpa, 4096, flags 0), not an error."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", strategy)
    flags = gmem.GUEST_MEMFD_FLAG_MMAP
    f = vm.create_guest_memfd(4 * PAGE, flags)
    gpa = 1 << 32
    vm.set_user_memory_region2(0, MEMFD, gpa, 4 * PAGE, 0, f, 0)
    if strategy == "inplace":
        f.set_memory_attributes2(0, 4 * PAGE, 0)
    f.close()
    del f
    with pytest.raises(gmem.MemoryFault) as info:
        vm.guest_read(gpa + PAGE, private=False)
    assert (info.value.gpa, info.value.size, info.value.flags) == (gpa + PAGE, PAGE, 0)
    host.check()


def test_mmap_checks_its_arguments_before_the_flag():
    """do_mmap() refuses an unaligned offset or a zero length (EINVAL) before
    kvm_gmem_mmap() can say ENODEV for a file without GUEST_MEMFD_FLAG_MMAP."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EINVAL):
        f.mmap(1, PAGE)
    with raises_errno(errno.EINVAL):
        f.mmap(0, 0)
    with raises_errno(errno.ENODEV):
        f.mmap(0, PAGE)
    with raises_errno(errno.ENODEV):
        f.mmap(0, PAGE, shared=False)


@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_in_place_capabilities_v13(vm_type, strategy):
    """In-place series v13: KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES (252) reports PRIVATE on
    a VM with private memory in in-place mode, else 0; KVM_CAP_MEMORY_ATTRIBUTES reports 0
    in in-place mode (VM-scoped PRIVATE tracking is deprecated)."""
    vm = gmem.Host(8 * MiB).create_vm(vm_type, strategy)
    priv = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
    assert gmem.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES == 252
    in_place = strategy == "inplace"
    assert vm.check_extension(252) == (priv if in_place else 0)
    assert vm.check_extension(gmem.KVM_CAP_MEMORY_ATTRIBUTES) == (0 if in_place else priv)


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_vm_ioctl_in_place_mode(vm_type):
    """v13: KVM_SET_MEMORY_ATTRIBUTES with PRIVATE is EINVAL in in-place mode (the supported
    mask is empty); with 0 it touches only the VM's own array: the bound guest_memfd's
    offsets keep their attributes and content, nothing is scrubbed."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, "inplace")
    f = vm.create_guest_memfd(8 * PAGE, gmem.GUEST_MEMFD_FLAG_MMAP)
    gpa = 1 << 32
    vm.set_user_memory_region2(0, MEMFD, gpa, 8 * PAGE, 0, f, 0)
    vm.guest_write(gpa, 0x77, private=True)
    before = vm.stats()
    with raises_errno(errno.EINVAL):
        vm.set_memory_attributes(gpa, 8 * PAGE, gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.set_memory_attributes(gpa, 8 * PAGE, 0)
    vm.set_memory_attributes(gpa + MiB, 8 * PAGE, 0)
    assert vm.stats() == before
    assert f.get_memory_attributes2(0) == gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
    assert vm.guest_read(gpa, private=True) == 0x77
    host.check()


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "inplace"])
def test_set_memory_attributes2_checks_arguments_before_in_place_mode(strategy):
    """v13's check order: flags, attributes, size, alignment and the file's size are
    checked (EINVAL) before the ioctl says in-place mode is off (ENOTTY)."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", strategy)
    f = vm.create_guest_memfd(4 * PAGE)
    priv = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
    for args in ((0, PAGE, priv, 1), (0, PAGE, 1 << 0), (0, 0, priv), (1, PAGE, priv)):
        with raises_errno(errno.EINVAL, msg=repr(args)):
            f.set_memory_attributes2(*args)
    with raises_errno(errno.EINVAL):
        f.set_memory_attributes2(4 * PAGE, PAGE, priv)
    with raises_errno(errno.ENOTTY):
        f.set_memory_attributes2(0, PAGE, priv)


def test_set_memory_attributes2_flags_before_range():
    """In in-place mode: flags != 0 is EINVAL whatever the range."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("snp", "inplace")
    f = vm.create_guest_memfd(4 * PAGE)
    with raises_errno(errno.EINVAL):
        f.set_memory_attributes2(0, 0, gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE, 1)


@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_pre_fault_memory(vm_type, strategy):
    """KVM_PRE_FAULT_MEMORY (6.11, api.rst 4.143): maps the range into stage-2 as the
    current attributes say and returns the bytes processed; a pre-faulted page costs no
    stage-2 fault later; bad ranges are EINVAL, a gpa no memslot covers ENOENT."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, strategy)
    f = vm.create_guest_memfd(16 * PAGE, gmem.GUEST_MEMFD_FLAG_MMAP)
    mem = host.mmap_anonymous(16 * PAGE)
    gpa = 1 << 32
    vm.set_user_memory_region2(0, MEMFD, gpa, 16 * PAGE, mem.addr, f, 0)
    priv = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
    if strategy == "inplace":
        f.set_memory_attributes2(0, 8 * PAGE, priv)
        f.set_memory_attributes2(8 * PAGE, 8 * PAGE, 0)
    else:
        vm.set_memory_attributes(gpa, 8 * PAGE, priv)
    for bad in ((gpa, 0), (gpa + 1, PAGE), (gpa, PAGE + 1), (gpa, (1 << 64) - gpa)):
        with raises_errno(errno.EINVAL, msg=repr(bad)):
            vm.pre_fault_memory(*bad)
    with raises_errno(errno.ENOENT):
        vm.pre_fault_memory(0, PAGE)
    assert vm.stats()["stage2_faults"] == 0
    assert vm.pre_fault_memory(gpa, 16 * PAGE) == 16 * PAGE
    s = vm.stats()
    # Mapped ahead of the guest: no exit taken (KVM's pf_taken skips prefetch faults).
    assert s["prefaulted_pages"] == 16
    assert s["stage2_faults"] == 0
    assert s["stage2_4k"] == 16
    # Already mapped: nothing more to do, and the guest's accesses fault no more.
    assert vm.pre_fault_memory(gpa, 16 * PAGE) == 16 * PAGE
    vm.guest_write(gpa, 1, private=True)
    vm.guest_write(gpa + 8 * PAGE, 2, private=False)
    assert vm.stats()["prefaulted_pages"] == 16
    assert vm.stats()["stage2_faults"] == 0
    assert vm.stats()["memory_faults"] == 0
    # A range that runs past the memslot: the pages before the gap.
    assert vm.pre_fault_memory(gpa + 12 * PAGE, 8 * PAGE) == 4 * PAGE
    host.check()


def test_stage2_faults_count_guest_faults():
    """Each guest fault that installs a mapping counts once; a mapped page faults no more."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("snp", "dual")
    f = vm.create_guest_memfd(16 * PAGE)
    mem = host.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region2(0, MEMFD, 0, 16 * PAGE, mem.addr, f, 0)
    vm.set_memory_attributes(0, 4 * PAGE, gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    for p in range(4):
        vm.guest_write(p * PAGE, p, private=True)
        vm.guest_read(p * PAGE, private=True)
    vm.guest_read(8 * PAGE, private=False)
    assert vm.stats()["stage2_faults"] == 5
    host.check()


def test_snp_prepare_on_every_get_pfn_is_idempotent():
    """7.0: kvm_arch_gmem_prepare() runs on every kvm_gmem_get_pfn() (no preparation
    tracking); SNP's RMP makes it idempotent. A private page faulted again after its
    stage-2 entry went away (memslot deleted and recreated: the RMP state belongs to the
    inode) is mapped again without a second RMPUPDATE or PVALIDATE, its content kept."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("snp", "dual")
    f = vm.create_guest_memfd(16 * PAGE)
    mem = host.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region2(0, MEMFD, 0, 16 * PAGE, mem.addr, f, 0)
    vm.set_memory_attributes(0, 16 * PAGE, gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.guest_write(0, 7, private=True)
    before = vm.stats()
    assert (before["rmpupdates"], before["pvalidates"], before["stage2_faults"]) == (1, 1, 1)
    vm.set_user_memory_region2(0, MEMFD, 0, 0, mem.addr, f, 0)
    vm.set_user_memory_region2(0, MEMFD, 0, 16 * PAGE, mem.addr, f, 0)
    assert vm.guest_read(0, private=True) == 7
    after = vm.stats()
    assert (after["rmpupdates"], after["pvalidates"], after["stage2_faults"]) == (1, 1, 2)
    host.check()
