"""The default VM type (``KVM_X86_DEFAULT_VM``, mainline 6.18) and
``GUEST_MEMFD_FLAG_NO_DIRECT_MAP`` (posted series v12, not merged): KERNEL.md §7."""

from __future__ import annotations

import errno

import pytest

import gmem
from gmem.costs import DEFAULT_COSTS
from gmem.streams import events
from util import PAGE, raises_errno

MiB = 1 << 20
MMAP_SHARED = gmem.GUEST_MEMFD_FLAG_MMAP | gmem.GUEST_MEMFD_FLAG_INIT_SHARED
NDM = gmem.GUEST_MEMFD_FLAG_NO_DIRECT_MAP
PRIV = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = gmem.FALLOC_FL_PUNCH_HOLE | gmem.FALLOC_FL_KEEP_SIZE


def guest(strategy="dual", flags=MMAP_SHARED | NDM, pages=256, vm_type="default"):
    """A VM with one guest_memfd of ``flags`` bound at gpa 0; ``userspace_addr`` is the
    VMM's mapping of the guest_memfd where it has MMAP, else anonymous memory."""
    host = gmem.Host(16 * MiB)
    vm = host.create_vm(vm_type, strategy)
    f = vm.create_guest_memfd(pages * PAGE, flags)
    m = f.mmap() if flags & gmem.GUEST_MEMFD_FLAG_MMAP else host.mmap_anonymous(pages * PAGE)
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, pages * PAGE, m.addr, guest_memfd=f)
    return host, vm, f, m


# --------------------------------------------------------------------------- the VM type


def test_constants():
    assert gmem.GUEST_MEMFD_FLAG_NO_DIRECT_MAP == 1 << 2
    assert gmem.VM_TYPES_WITHOUT_PRIVATE_MEM == ("default",)
    assert (*gmem.VM_TYPES, "default") == gmem.ALL_VM_TYPES


@pytest.mark.parametrize("strategy", gmem.STRATEGIES)
def test_capabilities(strategy):
    vm = gmem.Host(MiB).create_vm("default", strategy)
    assert vm.vm_type == "default"
    assert vm.check_extension(gmem.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) == 0
    assert vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD) == 1
    assert vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP_SHARED | NDM
    assert vm.check_extension(gmem.KVM_CAP_READONLY_MEM) == 1


@pytest.mark.parametrize("strategy", gmem.STRATEGIES)
def test_flags_offered_are_accepted_others_einval(strategy):
    vm = gmem.Host(4 * MiB).create_vm("default", strategy)
    supported = vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert vm.create_guest_memfd(PAGE, supported).flags == supported
    for bit in range(8):
        if not supported & (1 << bit):
            with raises_errno(errno.EINVAL, msg=f"bit {bit}"):
                vm.create_guest_memfd(PAGE, 1 << bit)


@pytest.mark.parametrize("strategy", gmem.STRATEGIES)
def test_private_attribute_is_einval(strategy):
    host, vm, _, _ = guest(strategy)
    with raises_errno(errno.EINVAL):
        vm.set_memory_attributes(0, PAGE, PRIV)
    vm.set_memory_attributes(0, PAGE, 0)  # everything is shared already
    assert vm.get_memory_attributes(0) == 0
    assert vm.stats()["conversions"] == 0
    host.check()


def test_guest_memfd_attribute_ioctl_is_einval():
    _, _, f, _ = guest("inplace")
    with raises_errno(errno.EINVAL):
        f.set_memory_attributes2(0, PAGE, PRIV)


def test_conversion_events_fail_with_einval():
    _, vm, _, _ = guest()
    ev = events([gmem.Op.CONVERT_PRIVATE, gmem.Op.CONVERT_SHARED], 0, 4)
    assert vm.apply(ev).tolist() == [-errno.EINVAL, 0]


def test_populate_is_einval():
    _, vm, _, _ = guest()
    with raises_errno(errno.EINVAL):
        vm.populate(0, PAGE, 1)


@pytest.mark.parametrize("strategy", gmem.STRATEGIES)
def test_guest_faults_are_served_from_guest_memfd(strategy):
    host, vm, f, m = guest(strategy, MMAP_SHARED)
    vm.guest_write(0, 7, private=False)
    assert f.nr_pages == 1
    assert m.read(0) == 7  # the host sees the guest_memfd page through its mapping
    m.write(PAGE, 8)
    assert vm.guest_read(PAGE, private=False) == 8
    # nothing is private: a private access is a memory-fault exit
    with pytest.raises(gmem.MemoryFault):
        vm.guest_read(2 * PAGE, private=True)
    host.check()


@pytest.mark.parametrize("strategy", gmem.STRATEGIES)
def test_host_mapping_needs_init_shared(strategy):
    _, vm, f, m = guest(strategy, gmem.GUEST_MEMFD_FLAG_MMAP)
    with pytest.raises(gmem.HostFault):
        m.read(0)
    vm.guest_write(0, 3, private=False)  # the guest still reaches it
    assert f.nr_pages == 1


def test_without_mmap_shared_faults_use_userspace_addr():
    _, vm, f, _ = guest("dual", 0)
    vm.guest_write(0, 1, private=False)
    assert f.nr_pages == 0


# --------------------------------------------------------------------------- NO_DIRECT_MAP


@pytest.mark.parametrize("vm_type", gmem.ALL_VM_TYPES)
def test_no_direct_map_offered_except_tdx_snp(vm_type):
    vm = gmem.Host(MiB).create_vm(vm_type, "dual")
    offered = bool(vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD_FLAGS) & NDM)
    assert offered == (vm_type not in ("tdx", "snp"))
    if offered:
        assert vm.create_guest_memfd(PAGE, NDM).flags == NDM
    else:
        with raises_errno(errno.EINVAL):
            vm.create_guest_memfd(PAGE, NDM)


def test_hugetlb_with_no_direct_map_is_einval():
    vm = gmem.Host(8 * MiB).create_vm("sw_protected", "dual")
    with raises_errno(errno.EINVAL):
        vm.create_guest_memfd(2 * MiB, gmem.GUEST_MEMFD_FLAG_HUGETLB | NDM, page_order=9)


def test_counters_and_costs_exist():
    stats = gmem.Host(MiB).create_vm("default").stats()
    for key in ("removals", "restores", "flushes", "splits"):
        assert stats[f"direct_map_{key}"] == 0
    costs = gmem.Host(MiB).costs()
    for key in ("remove", "restore", "flush", "split"):
        assert costs[f"direct_map_{key}"] == DEFAULT_COSTS[f"direct_map_{key}"]


def dm(vm):
    s = vm.stats()
    return tuple(s[f"direct_map_{k}"] for k in ("removals", "flushes", "splits", "restores"))


def test_first_mapping_removes_with_one_flush_free_restores_without():
    host, vm, f, m = guest()
    f.fallocate(gmem.FALLOC_FL_KEEP_SIZE, 0, 8 * PAGE)
    assert dm(vm) == (0, 0, 0, 0)  # allocated, not yet mapped: still in the direct map
    for i in range(4):
        vm.guest_write(i * PAGE, i + 1, private=False)
    assert dm(vm) == (4, 4, 1, 0)  # one flush per fault, one split for the 2 MiB block
    vm.guest_read(0, private=False)
    assert m.read(0) == 1  # mapped already: nothing more
    m.write(5 * PAGE, 9)  # a host fault on a page only allocated removes it
    assert dm(vm) == (5, 5, 1, 0)
    host.check()
    before = vm.stats()["modelled_ns"]
    f.fallocate(PUNCH, 0, 8 * PAGE)
    assert dm(vm) == (5, 5, 1, 5)  # restored, no flush
    c = host.costs()
    spent = vm.stats()["modelled_ns"] - before
    assert spent >= 5 * c["direct_map_restore"]
    vm.guest_write(0, 1, private=False)
    assert dm(vm)[:2] == (6, 6)  # a new page leaves again
    host.check()


def test_modelled_cost_of_a_removal():
    host, vm, _, _ = guest()
    c = host.costs()
    host.set_costs({"direct_map_remove": 1000, "direct_map_flush": 10_000})
    vm.guest_write(0, 1, private=False)
    first = vm.stats()["modelled_ns"]
    vm.guest_write(PAGE, 1, private=False)
    second = vm.stats()["modelled_ns"] - first
    host.set_costs({"direct_map_remove": 0, "direct_map_flush": 0})
    vm.guest_write(2 * PAGE, 1, private=False)
    third = vm.stats()["modelled_ns"] - first - second
    assert second - third == 11_000
    assert c["direct_map_split"] > 0


def test_without_the_flag_nothing_leaves():
    _, vm, _, _ = guest(flags=MMAP_SHARED)
    for i in range(4):
        vm.guest_write(i * PAGE, 1, private=False)
    assert dm(vm) == (0, 0, 0, 0)


def test_pin_is_efault_loads_and_stores_work():
    _, vm, _, m = guest()
    m.write(0, 5)
    assert vm.guest_read(0, private=False) == 5
    with raises_errno(errno.EFAULT):
        m.pin(0)
    ev = events([gmem.Op.PIN, gmem.Op.HOST_READ], 0, 1)
    assert vm.apply(ev).tolist() == [-errno.EFAULT, 0]


def test_read_write_syscalls_fail():
    _, _, f, _ = guest()
    with raises_errno(errno.EINVAL):
        f.read(8)
    with raises_errno(errno.EINVAL):
        f.write(b"x")


def test_populate_of_a_page_out_of_the_direct_map_is_efault():
    host, vm, _, _ = guest(flags=NDM, vm_type="sw_protected")
    vm.set_memory_attributes(0, 256 * PAGE, PRIV)
    assert vm.populate(0, PAGE, 4) == 1  # still in the direct map: copied
    assert dm(vm)[0] == 0
    assert vm.guest_read(0, private=True) == 4
    assert dm(vm)[0] == 1
    with raises_errno(errno.EFAULT):
        vm.populate(0, PAGE, 4)
    host.check()


def test_close_restores_every_page():
    host, vm, f, m = guest()
    for i in range(8):
        vm.guest_write(i * PAGE, 1, private=False)
    m.unmap()
    f.close()
    assert dm(vm) == (8, 8, 1, 8)
    host.check()


def test_snapshot_keeps_the_direct_map(tmp_path):
    host, vm, _, _ = guest()
    vm.guest_write(0, 1, private=False)
    host.save(tmp_path / "h.snap")
    loaded = gmem.load(tmp_path / "h.snap")
    (lvm,) = loaded.vms()
    assert lvm.vm_type == "default"
    assert lvm.stats()["direct_map_removals"] == 1
    loaded.check()
    (lf,) = loaded.guest_memfds()
    lf.fallocate(PUNCH, 0, PAGE)
    assert lvm.stats()["direct_map_restores"] == 1
    loaded.check()
