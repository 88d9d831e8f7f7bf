"""Kernel rules checked against set_memory_region_test.c, guest_memfd_test.c and api.rst
that the other suites do not cover: the memslot limit at full scale, read-only memslots,
guest_memfds of another VM or host, the guest physical address width, `mmap(2)` lengths,
capabilities, and `kvm_gmem_populate()`'s partial progress and the arch hooks' refusals.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

import gmem
from util import PAGE, raises_errno

MiB = 1 << 20
RO = gmem.KVM_MEM_READONLY
GM = gmem.KVM_MEM_GUEST_MEMFD
PRIV = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE


# --------------------------------------------------------------------------- memslots


def test_add_max_memory_regions():
    """set_memory_region_test.c `test_add_max_memory_regions`: KVM_CAP_NR_MEMSLOTS slots
    over one host buffer, then one more is EINVAL. (Each slot change updates the footprint
    from that slot alone; a recount over every slot made this minutes long.)"""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    n = vm.check_extension(gmem.KVM_CAP_NR_MEMSLOTS)
    assert n == 32764
    mem = host.mmap_anonymous(2 * MiB)
    for slot in range(n):
        vm.set_user_memory_region(slot, 0, slot * 2 * MiB, 2 * MiB, mem.addr)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region(n, 0, n * 2 * MiB, 2 * MiB, mem.addr)
    vm.check()
    # Every slot maps the same buffer: a page written once counts once.
    vm.guest_write(5 * 2 * MiB, 1, private=False)
    assert vm.guest_read(0, private=False) == 1
    assert vm.stats()["pages_allocated"] == 1
    for slot in range(0, n, 2):
        vm.set_user_memory_region(slot, 0, 0, 0, 0)
    vm.check()
    assert vm.stats()["pages_allocated"] == 1


def test_footprint_follows_slots_over_populated_memory(api):
    """A memslot made or deleted over anonymous pages that already exist changes the
    VM's footprint by the pages it newly covers or alone covered."""
    host = api.Host(16 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    mem = host.mmap_anonymous(8 * PAGE)
    for i in range(6):
        mem.write(i * PAGE, i + 1)
    vm.set_user_memory_region(0, 0, 0, 4 * PAGE, mem.addr)  # pages 0-3
    assert vm.stats()["pages_allocated"] == 4
    vm.set_user_memory_region(1, 0, 1 << 30, 4 * PAGE, mem.addr + 2 * PAGE)  # pages 2-5
    assert vm.stats()["pages_allocated"] == 6
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert vm.stats()["pages_allocated"] == 4
    vm.set_user_memory_region(1, 0, 0, 0, 0)
    assert vm.stats()["pages_allocated"] == 0
    vm.check()


def test_guest_memfd_of_another_host_is_einval():
    """kvm_gmem_bind(): a guest_memfd of another VM is EINVAL, also when that VM lives on
    another `Host` (whose fd numbers coincide with this one's)."""
    a, b = gmem.Host(16 * MiB), gmem.Host(16 * MiB)
    vma, vmb = a.create_vm("sw_protected", "dual"), b.create_vm("sw_protected", "dual")
    fa, fb = vma.create_guest_memfd(4 * PAGE), vmb.create_guest_memfd(4 * PAGE)
    assert fa.fd == fb.fd  # the numbers alone cannot tell them apart
    with raises_errno(errno.EINVAL):
        vma.set_user_memory_region2(0, GM, 0, 4 * PAGE, 0, fb, 0)
    for other in (vmb, b):
        with raises_errno(errno.EINVAL):
            vma.set_user_memory_region2(0, GM, 0, 4 * PAGE, 0, other, 0)
    # Nothing was bound: this host's own file still binds.
    vma.set_user_memory_region2(0, GM, 0, 4 * PAGE, 0, fa, 0)
    vma.check()


@pytest.mark.parametrize("fd", [0, 1, 2])
def test_standard_stream_fd_is_not_a_guest_memfd(api, fd):
    """fds 0-2 are open in every process but are no guest_memfd: EINVAL, not EBADF."""
    host = api.Host(16 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(0, api.KVM_MEM_GUEST_MEMFD, 0, 4 * PAGE, 0, fd, 0)


def test_memslot_beyond_the_guest_physical_width(api):
    """x86 kvm_arch_prepare_memory_region(): a slot created or moved past
    kvm_mmu_max_gfn() (52 address bits at most) is EINVAL; one ending at the limit is
    fine."""
    host = api.Host(16 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    mem = host.mmap_anonymous(2 * PAGE)
    top = 1 << 52
    vm.set_user_memory_region(0, 0, top - 2 * PAGE, 2 * PAGE, mem.addr)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region(1, 0, top, 2 * PAGE, mem.addr)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region(1, 0, 1 << 60, 2 * PAGE, mem.addr)
    with raises_errno(errno.EINVAL):  # a MOVE past the limit
        vm.set_user_memory_region(0, 0, top, 2 * PAGE, mem.addr)
    f = vm.create_guest_memfd(2 * PAGE)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(2, api.KVM_MEM_GUEST_MEMFD, top, 2 * PAGE, 0, f, 0)
    # The failed bind left the file unbound.
    vm.set_user_memory_region2(2, api.KVM_MEM_GUEST_MEMFD, 1 << 32, 2 * PAGE, 0, f, 0)
    vm.check()


def test_tdx_memslot_must_not_carry_the_shared_bit():
    """x86 kvm_arch_prepare_memory_region(): on TDX the shared-GPA bit (51, 5-level S-EPT)
    is the VM's direct bit, and a memslot whose last gfn carries it is an alias (EINVAL);
    other VM types take the full 52-bit space."""
    host = gmem.Host(16 * MiB)
    mem = host.mmap_anonymous(2 * PAGE)
    shared_bit = 1 << 51
    tdx = host.create_vm("tdx", "dual")
    tdx.set_user_memory_region(0, 0, shared_bit - 4 * PAGE, 2 * PAGE, mem.addr)
    tdx.set_user_memory_region(2, 0, shared_bit - 2 * PAGE, PAGE, mem.addr)  # below: fine
    with raises_errno(errno.EINVAL):
        tdx.set_user_memory_region(1, 0, shared_bit, 2 * PAGE, mem.addr)
    with raises_errno(errno.EINVAL):  # straddling the bit: the last gfn carries it
        tdx.set_user_memory_region(1, 0, shared_bit - PAGE, 2 * PAGE, mem.addr)
    with raises_errno(errno.EINVAL):  # a MOVE onto it
        tdx.set_user_memory_region(0, 0, shared_bit, 2 * PAGE, mem.addr)
    snp = host.create_vm("snp", "dual")
    snp.set_user_memory_region(0, 0, shared_bit, 2 * PAGE, mem.addr)
    tdx.check()
    snp.check()


def test_fd_numbers_are_reused_lowest_first(api):
    """__kvm_gmem_create() takes its number from get_unused_fd_flags(): the lowest one not
    open, so a closed guest_memfd's number goes to the next file. The raw number then names
    the new file; the closed file's object still refers to the closed file (EBADF)."""
    host = api.Host(16 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    f1, f2 = vm.create_guest_memfd(2 * PAGE), vm.create_guest_memfd(2 * PAGE)
    n1, n2 = f1.fd, f2.fd
    assert n1 not in (n2, host.fd, vm.fd)
    f1.close()
    f3 = vm.create_guest_memfd(4 * PAGE)
    assert f3.fd == n1
    f4 = vm.create_guest_memfd(2 * PAGE)
    assert f4.fd > max(n1, n2)
    with raises_errno(errno.EBADF):
        vm.set_user_memory_region2(0, GM, 0, 2 * PAGE, 0, f1, 0)
    vm.set_user_memory_region2(0, GM, 0, 4 * PAGE, 0, n1, 0)  # 4 pages: f3's size
    with raises_errno(errno.EEXIST):  # f3's range is bound now (7.2; EINVAL before)
        vm.set_user_memory_region2(1, GM, 1 << 30, PAGE, 0, f3, 0)
    f2.close()
    f3.close()
    assert vm.create_guest_memfd(PAGE).fd == min(n1, n2)
    vm.check()


# --------------------------------------------------------------------------- read-only


@pytest.mark.parametrize(
    ("vm_type", "allowed"), [("sw_protected", 1), ("pkvm", 1), ("tdx", 0), ("snp", 0)]
)
def test_readonly_memslots_by_vm_type(vm_type, allowed):
    """kvm_arch_has_readonly_mem(): x86 VMs with protected state (TDX, SEV-SNP) have no
    read-only memslots (KVM_CAP_READONLY_MEM 0, the flag EINVAL)."""
    host = gmem.Host(16 * MiB)
    vm = host.create_vm(vm_type, "dual")
    assert vm.check_extension(gmem.KVM_CAP_READONLY_MEM) == allowed
    assert vm.check_extension(gmem.KVM_CAP_MEMORY_FAULT_INFO) == 1
    mem = host.mmap_anonymous(4 * PAGE)
    if allowed:
        vm.set_user_memory_region(0, RO, 0, 4 * PAGE, mem.addr)
    else:
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region(0, RO, 0, 4 * PAGE, mem.addr)
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region2(0, RO, 0, 4 * PAGE, mem.addr)


def test_guest_write_to_readonly_memslot_is_mmio(api):
    """api.rst: writes to a KVM_MEM_READONLY slot exit to userspace (KVM_EXIT_MMIO) and
    leave memory as it was; reads work; the host's own mapping stays writable; a private
    access is still decided by the attributes first."""
    host = api.Host(16 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    mem = host.mmap_anonymous(4 * PAGE)
    mem.write(PAGE, 9)
    vm.set_user_memory_region(0, api.KVM_MEM_READONLY, 0, 4 * PAGE, mem.addr)
    assert vm.guest_read(PAGE, private=False) == 9
    with pytest.raises(api.MmioExit) as info:
        vm.guest_write(PAGE, 5, private=False)  # mapped by the read above
    assert (info.value.phys_addr, info.value.len, info.value.is_write) == (PAGE, 8, True)
    with pytest.raises(api.MmioExit):
        vm.guest_write(2 * PAGE, 5, private=False)  # not mapped yet
    assert vm.guest_read(PAGE, private=False) == 9
    assert mem.read(2 * PAGE) == 0
    mem.write(PAGE, 10)
    assert vm.guest_read(PAGE, private=False) == 10
    vm.set_memory_attributes(3 * PAGE, PAGE, api.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    with pytest.raises(api.MemoryFault):
        vm.guest_write(3 * PAGE, 5, private=False)
    # Other memslots stay writable; deleting the read-only one lifts the rule.
    other = host.mmap_anonymous(4 * PAGE)
    vm.set_user_memory_region(1, 0, 1 << 30, 4 * PAGE, other.addr)
    vm.guest_write(1 << 30, 3, private=False)
    assert other.read(0) == 3
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    vm.set_user_memory_region(0, 0, 0, 4 * PAGE, mem.addr)
    vm.guest_write(PAGE, 5, private=False)
    assert mem.read(PAGE) == 5
    vm.check()


def test_readonly_memslot_in_event_batches():
    """`vm.apply` gives the same answer as single calls: a shared write to a mapped page of
    a read-only slot is an MMIO exit (the batch's fast path for mapped pages must not write
    it), while writes elsewhere in the same batch go through."""
    host = gmem.Host(16 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    ro, rw = host.mmap_anonymous(4 * PAGE), host.mmap_anonymous(4 * PAGE)
    ro.write(0, 7)
    vm.set_user_memory_region(0, RO, 0, 4 * PAGE, ro.addr)
    vm.set_user_memory_region(1, 0, 4 * PAGE, 4 * PAGE, rw.addr)
    ev = np.zeros(5, dtype=gmem.EVENT_DTYPE)
    rows = [
        (gmem.Op.GUEST_READ_SHARED, 0, 0),
        (gmem.Op.GUEST_READ_SHARED, 4, 0),
        (gmem.Op.GUEST_WRITE_SHARED, 0, 1),
        (gmem.Op.GUEST_WRITE_SHARED, 4, 2),
        (gmem.Op.GUEST_READ_SHARED, 0, 0),
    ]
    for i, (op, gfn, value) in enumerate(rows):
        ev[i] = (int(op), gfn, 1, value)
    status = vm.apply(ev)
    assert list(status) == [0, 0, gmem.KVM_EXIT_MMIO, 0, 0]
    assert ro.read(0) == 7
    assert rw.read(0) == 2
    vm.check()


# --------------------------------------------------------------------------- mmap


def test_mmap_lengths_as_mmap2(api):
    """mmap(2): length 0 is EINVAL, any other length is rounded up to whole pages, more
    than the user address space is ENOMEM; a guest_memfd offset must be page aligned."""
    host = api.Host(16 * MiB)
    assert host.mmap_anonymous(PAGE + 1).length == 2 * PAGE
    with raises_errno(errno.EINVAL):
        host.mmap_anonymous(0)
    with raises_errno(errno.ENOMEM):
        host.mmap_anonymous((1 << 47) + 1)
    vm = host.create_vm("sw_protected", "dual")
    f = vm.create_guest_memfd(4 * PAGE, api.GUEST_MEMFD_FLAG_MMAP)
    assert f.mmap(0, PAGE + 1).length == 2 * PAGE
    with raises_errno(errno.EINVAL):
        f.mmap(0, 0)
    with raises_errno(errno.EINVAL):
        f.mmap(1, PAGE)


# --------------------------------------------------------------------------- populate


def test_populate_stops_at_the_memslot_end():
    """kvm_gmem_populate() cuts the range at the end of the first gfn's memslot and
    returns the pages done; a range starting outside a guest_memfd slot is EINVAL."""
    host = gmem.Host(16 * MiB)
    vm = host.create_vm("snp", "dual")
    f = vm.create_guest_memfd(8 * PAGE)
    anon = host.mmap_anonymous(8 * PAGE)
    vm.set_user_memory_region2(0, GM, 0, 4 * PAGE, anon.addr, f, 0)
    vm.set_user_memory_region2(1, GM, 4 * PAGE, 4 * PAGE, anon.addr, f, 4 * PAGE)
    vm.set_memory_attributes(0, 8 * PAGE, PRIV)
    assert vm.populate(2 * PAGE, 4 * PAGE, 0xAB) == 2  # gfns 2, 3: slot 0 ends there
    assert vm.stats()["rmpupdates"] == 2
    assert vm.guest_read(3 * PAGE, private=True) == 0xAB
    assert vm.guest_read(4 * PAGE, private=True) == 0  # not populated: zeroed on use
    with raises_errno(errno.EINVAL):
        vm.populate(1 << 30, PAGE, 1)  # no memslot
    vm.check()


@pytest.mark.parametrize(("vm_type", "code"), [("snp", errno.EINVAL), ("tdx", errno.EIO)])
def test_populate_refuses_a_page_loaded_before(vm_type, code):
    """The arch post-populate hooks refuse a page already loaded: SNP finds it assigned in
    the RMP (EINVAL), TDX finds the gfn mapped in the S-EPT (EIO). The page keeps its
    content; a range stops there, returning the pages done before it."""
    host = gmem.Host(16 * MiB)
    vm = host.create_vm(vm_type, "dual")
    f = vm.create_guest_memfd(8 * PAGE)
    anon = host.mmap_anonymous(8 * PAGE)
    vm.set_user_memory_region2(0, GM, 0, 8 * PAGE, anon.addr, f, 0)
    vm.set_memory_attributes(0, 8 * PAGE, PRIV)
    assert vm.populate(2 * PAGE, PAGE, 0x11) == 1
    with raises_errno(code):
        vm.populate(2 * PAGE, PAGE, 0x22)
    assert vm.guest_read(2 * PAGE, private=True) == 0x11
    # Pages 0 and 1 are new, page 2 was loaded: two done, then the stop.
    assert vm.populate(0, 4 * PAGE, 0x33) == 2
    assert [vm.guest_read(g * PAGE, private=True) for g in range(4)] == [0x33, 0x33, 0x11, 0]
    # A page the guest faulted in privately is prepared (SNP) / mapped (TDX) as well.
    vm.guest_write(5 * PAGE, 0x44, private=True)
    with raises_errno(code):
        vm.populate(5 * PAGE, PAGE, 0x55)
    assert vm.guest_read(5 * PAGE, private=True) == 0x44
    vm.check()
