"""The host never reaches private memory, and a conversion changes only the pages that
change hands — for every design on every VM type.

- `guest_memfd_test.c` `test_fault_private` (KERNEL.md §7): with `GUEST_MEMFD_FLAG_MMAP` and
  without `GUEST_MEMFD_FLAG_INIT_SHARED` every host access to the mapping is SIGBUS
  (mainline `kvm_gmem_fault_user_mapping()`; in the in-place series v13 offsets start
  private).
- TDX/SNP scrub a page only when it changes attribute: SNP's invalidate skips pfns that are
  not assigned, TDX removes only the private S-EPT leaves it had.
"""

from __future__ import annotations

import pytest

import gmem
from util import PAGE

MiB = 1 << 20
GPA = 1 << 32
PRIV = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
MMAP = gmem.GUEST_MEMFD_FLAG_MMAP
MEMFD = gmem.KVM_MEM_GUEST_MEMFD
STRATEGIES = ("dual", "inplace", "realloc", "two_offsets", "attr_hook")
VM_TYPES = ("sw_protected", "pkvm", "tdx", "snp")
ALL = [(vt, s) for s in STRATEGIES for vt in VM_TYPES]


def _host_faults(m, offsets):
    for off in offsets:
        with pytest.raises(gmem.HostFault) as info:
            m.read(off)
        assert info.value.signal == "SIGBUS"
        with pytest.raises(gmem.HostFault):
            m.write(off, 0x41)
        with pytest.raises(gmem.HostFault):
            m.pin(off)


@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_fault_private_unbound(vm_type, strategy):
    """A fresh MMAP file: every host access faults, and each fault is counted."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, strategy)
    f = vm.create_guest_memfd(MiB, MMAP)
    m = f.mmap(0, MiB)
    offsets = (0, PAGE, MiB - PAGE)
    _host_faults(m, offsets)
    assert vm.stats()["host_faults"] == 3 * len(offsets)
    assert vm.stats()["pages_allocated"] == 0
    host.check()


@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_fault_private_bound_and_private(vm_type, strategy):
    """Bound to a memslot whose gfns are private, the file's pages stay out of reach of the
    host; where a design lets the host map a shared gfn's page, converting it back to
    private takes the mapping away."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, strategy)
    f = vm.create_guest_memfd(16 * PAGE, MMAP)
    mem = host.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region2(0, MEMFD, GPA, 16 * PAGE, mem.addr, f, 0)
    if strategy == "inplace":
        f.set_memory_attributes2(0, 16 * PAGE, PRIV)
    else:
        vm.set_memory_attributes(GPA, 16 * PAGE, PRIV)
    vm.guest_write(GPA, 0x77, private=True)
    m = f.mmap(0, 16 * PAGE)
    _host_faults(m, (0, PAGE, 15 * PAGE))
    host.check()


@pytest.mark.parametrize("strategy", ["realloc", "attr_hook", "inplace"])
def test_host_reaches_shared_then_loses_it(strategy):
    """A design whose shared view is the guest_memfd page: the host maps a shared gfn's
    page; after the gfn turns private, and after its memslot is deleted, it faults."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", strategy)
    f = vm.create_guest_memfd(16 * PAGE, MMAP)
    mem = host.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region2(0, MEMFD, GPA, 16 * PAGE, mem.addr, f, 0)
    if strategy == "inplace":
        f.set_memory_attributes2(0, 16 * PAGE, 0)
    m = f.mmap(0, 16 * PAGE)
    m.write(0, 5)
    m.write(PAGE, 6)
    assert m.read(PAGE) == 6
    if strategy == "inplace":
        f.set_memory_attributes2(PAGE, PAGE, PRIV)
    else:
        vm.set_memory_attributes(GPA + PAGE, PAGE, PRIV)
    _host_faults(m, (PAGE,))
    assert m.read(0) == 5
    host.check()
    vm.set_user_memory_region2(0, MEMFD, GPA, 0, mem.addr, f, 0)
    host.check()
    if strategy == "inplace":
        # In-place: the offset's own attribute decides, bound or not.
        assert m.read(0) == 5
    else:
        _host_faults(m, (0,))
    host.check()


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_two_offsets_shared_range_is_the_hosts(vm_type):
    """two_offsets: the host maps the second range's pages of a bound memslot, not its
    unbound pages nor the private range."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, "two_offsets")
    priv = vm.create_guest_memfd(16 * PAGE, MMAP)
    shared = vm.create_guest_memfd(32 * PAGE, MMAP)
    mem = host.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region2(
        0, MEMFD, GPA, 16 * PAGE, mem.addr, priv, 0, shared_guest_memfd=shared, shared_offset=0
    )
    vm.set_memory_attributes(GPA, 16 * PAGE, PRIV)
    s = shared.mmap()
    s.write(0, 9)
    assert s.read(0) == 9
    _host_faults(s, (16 * PAGE, 31 * PAGE))
    _host_faults(priv.mmap(), (0, 15 * PAGE))
    host.check()


@pytest.mark.parametrize("vm_type", ["tdx", "snp"])
def test_inplace_conversion_scrubs_only_pages_that_change(vm_type):
    """Page 0 private with the guest's data, page 1 shared: converting both to private
    scrubs page 1 only."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, "inplace")
    f = vm.create_guest_memfd(16 * PAGE, MMAP)
    mem = host.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region2(0, MEMFD, GPA, 16 * PAGE, mem.addr, f, 0)
    vm.guest_write(GPA, 77, private=True)
    f.set_memory_attributes2(PAGE, PAGE, 0)
    vm.guest_write(GPA + PAGE, 5, private=False)
    before = vm.stats()["zeroed_pages"]
    f.set_memory_attributes2(0, 2 * PAGE, PRIV)
    assert vm.stats()["zeroed_pages"] - before == 1
    assert vm.guest_read(GPA, private=True) == 77
    assert vm.guest_read(GPA + PAGE, private=True) == 0
    # And back: only the pages that were private are scrubbed.
    f.set_memory_attributes2(2 * PAGE, PAGE, 0)
    vm.guest_write(GPA + 2 * PAGE, 3, private=False)
    before = vm.stats()["zeroed_pages"]
    f.set_memory_attributes2(0, 3 * PAGE, 0)
    assert vm.stats()["zeroed_pages"] - before == 2
    assert vm.guest_read(GPA + 2 * PAGE, private=False) == 3
    host.check()


@pytest.mark.parametrize("vm_type", ["tdx", "snp"])
def test_attr_hook_conversion_scrubs_only_pages_that_change(vm_type):
    """The same rule on the VM ioctl path of a same-page design."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, "attr_hook")
    f = vm.create_guest_memfd(16 * PAGE, MMAP)
    mem = host.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region2(0, MEMFD, GPA, 16 * PAGE, mem.addr, f, 0)
    vm.set_memory_attributes(GPA, PAGE, PRIV)
    vm.guest_write(GPA, 77, private=True)
    vm.guest_write(GPA + PAGE, 5, private=False)
    before = vm.stats()["zeroed_pages"]
    vm.set_memory_attributes(GPA, 2 * PAGE, PRIV)
    assert vm.stats()["zeroed_pages"] - before == 1
    assert vm.guest_read(GPA, private=True) == 77
    host.check()


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_two_offsets_private_range_leaves_the_host_with_its_gfn(vm_type):
    """two_offsets: the host may map a private-range page while its gfn is shared; the
    conversion to private takes that mapping away (check() would see it otherwise)."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, "two_offsets")
    priv = vm.create_guest_memfd(16 * PAGE, MMAP)
    shared = vm.create_guest_memfd(16 * PAGE, MMAP)
    mem = host.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region2(
        0, MEMFD, GPA, 16 * PAGE, mem.addr, priv, 0, shared_guest_memfd=shared, shared_offset=0
    )
    m = priv.mmap()
    m.write(0, 5)
    unmaps = vm.stats()["host_unmaps"]
    vm.set_memory_attributes(GPA, PAGE, PRIV)
    assert vm.stats()["host_unmaps"] == unmaps + 1
    host.check()
    _host_faults(m, (0,))
    host.check()
