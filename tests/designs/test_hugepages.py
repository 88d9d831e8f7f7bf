"""HugeTLB guest_memfd (dev tree) under the conversion strategies (issue 3): creation
and fallocate alignment rules, stage-2 mapping levels (folio order, memslot alignment,
the mixed rule, the platform limit), split on to-shared and merge back on to-private.

Every VM and host a test creates is checked when the test ends (``conftest.py``).
"""

from __future__ import annotations

import errno

import pytest
from design_env import (
    GPA,
    MEMFD,
    MMAP,
    PRIV,
    PUNCH,
    VM_TYPES,
    new_host,
    new_vm,
    st,
    vmm_convert,
)

import gmem
from util import PAGE, raises_errno

MiB = 1 << 20
GiB = 1 << 30
HUGETLB = gmem.GUEST_MEMFD_FLAG_HUGETLB
KEEP = gmem.FALLOC_FL_KEEP_SIZE
LEVELS = ("stage2_4k", "stage2_2m", "stage2_1g")
G2 = GPA  # 4 GiB: 1 GiB aligned


def levels(vm):
    return tuple(st(vm, *LEVELS)[k] for k in LEVELS)


def huge_vm(
    vm_type, strategy, size=4 * MiB, order=9, *, gpa=G2, offset=0, slot_size=None, host=None
):
    host = host or new_host(2 * GiB)
    vm = new_vm(host, vm_type, strategy)
    f = vm.create_guest_memfd(size, HUGETLB | (0 if strategy == "dual" else MMAP), page_order=order)
    mem = host.mmap_anonymous(slot_size or size)
    kw = {}
    if strategy == "two_offsets":
        kw = {
            "shared_guest_memfd": vm.create_guest_memfd(slot_size or size, MMAP),
            "shared_offset": 0,
        }
    vm.set_user_memory_region2(0, MEMFD, gpa, slot_size or size, mem.addr, f, offset, **kw)
    return host, vm, f, mem


# --------------------------------------------------------------------------- creation rules


@pytest.mark.parametrize("strategy", gmem.STRATEGIES)
def test_create_rules(strategy):
    vm = new_vm(new_host(2 * GiB), "sw_protected", strategy)
    for size, flags, order in [
        (2 * MiB, 0, 9),  # page_order without the flag
        (2 * MiB, HUGETLB, 0),
        (2 * MiB, HUGETLB, 10),
        (2 * MiB, HUGETLB, 12),
        (MiB, HUGETLB, 9),  # size not aligned to the huge size
        (2 * MiB + PAGE, HUGETLB, 9),
        (2 * MiB, HUGETLB, 18),
        (GiB + 2 * MiB, HUGETLB, 18),
    ]:
        with raises_errno(errno.EINVAL, msg=f"size={size:#x} flags={flags:#x} order={order}"):
            vm.create_guest_memfd(size, flags, page_order=order)
    f = vm.create_guest_memfd(2 * MiB, HUGETLB, page_order=9)
    assert (f.size, f.page_order) == (2 * MiB, 9)
    assert f.flags & HUGETLB
    g = vm.create_guest_memfd(GiB, HUGETLB | MMAP, page_order=18)
    assert (g.size, g.page_order) == (GiB, 18)


def test_hugetlb_init_shared_refused():
    vm = new_vm(new_host(), "sw_protected", "inplace")
    with raises_errno(errno.EINVAL):
        vm.create_guest_memfd(2 * MiB, HUGETLB | gmem.GUEST_MEMFD_FLAG_INIT_SHARED, page_order=9)


def test_fallocate_alignment():
    vm = new_vm(new_host(), "sw_protected", "dual")
    f = vm.create_guest_memfd(4 * MiB, HUGETLB, page_order=9)
    for mode, off, length in [
        (KEEP, 0, PAGE),
        (KEEP, PAGE, 2 * MiB),
        (PUNCH, 0, PAGE),
        (PUNCH, PAGE, 2 * MiB),
        (KEEP, 4 * MiB, 2 * MiB),  # allocate at i_size
    ]:
        with raises_errno(errno.EINVAL, msg=f"mode={mode} {off:#x}+{length:#x}"):
            f.fallocate(mode, off, length)
    assert vm.stats()["pages_allocated"] == 0
    f.fallocate(KEEP, 0, 2 * MiB)
    assert vm.stats()["pages_allocated"] == 512  # one order-9 folio
    f.fallocate(PUNCH, 4 * MiB, 2 * MiB)  # beyond i_size: nothing to do
    f.fallocate(PUNCH, 0, 2 * MiB)
    assert vm.stats()["pages_allocated"] == 0


# --------------------------------------------------------------------------- mapping levels


@pytest.mark.parametrize("strategy", gmem.STRATEGIES)
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_private_fault_maps_2m(vm_type, strategy):
    """Private faults over a uniform, aligned, intact 2M folio map one 2M leaf."""
    _, vm, _, _ = huge_vm(vm_type, strategy)
    vmm_convert(vm, G2, 4 * MiB, PRIV)
    vm.guest_write(G2, 1, private=True)
    vm.guest_write(G2 + PAGE, 2, private=True)
    assert levels(vm) == (0, 1, 0)
    vm.guest_read(G2 + 3 * MiB, private=True)
    assert levels(vm) == (0, 2, 0)
    assert vm.guest_read(G2 + PAGE, private=True) == 2
    s = st(vm, "tdx_page_augs", "rmpupdates", "pvalidates")
    if vm_type == "tdx":
        assert s["tdx_page_augs"] == 2
    if vm_type == "snp":
        assert s["rmpupdates"] >= 2
        assert s["pvalidates"] >= 2


@pytest.mark.parametrize("strategy", ["inplace", "attr_hook", "dual"])
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_private_fault_1g_limited_by_platform(vm_type, strategy):
    """An order-18 folio maps 1G on sw_protected/pkvm; TDX and SNP map private memory at
    most at 2M (stage2_1g stays 0)."""
    _, vm, _, _ = huge_vm(vm_type, strategy, size=GiB, order=18)
    vmm_convert(vm, G2, GiB, PRIV)
    vm.guest_write(G2, 1, private=True)
    vm.guest_write(G2 + 5 * MiB, 1, private=True)
    if vm_type in ("sw_protected", "pkvm"):
        assert levels(vm) == (0, 0, 1)
    else:
        assert levels(vm) == (0, 2, 0)
    assert st(vm, "pages_allocated")["pages_allocated"] == GiB // PAGE


@pytest.mark.parametrize(("offset", "gpa"), [(PAGE, G2), (2 * MiB + PAGE, G2)])
def test_memslot_alignment_prevents_huge(offset, gpa):
    """gfn and guest_memfd offset not congruent modulo the huge size: 4K only."""
    _, vm, _, _ = huge_vm(
        "sw_protected", "inplace", size=8 * MiB, gpa=gpa, offset=offset, slot_size=4 * MiB
    )
    for x in range(0, 4 * MiB, MiB):
        vm.guest_read(gpa + x, private=True)
    assert levels(vm) == (4, 0, 0)


def test_memslot_congruent_offset_allows_huge():
    _, vm, _, _ = huge_vm(
        "sw_protected", "inplace", size=8 * MiB, gpa=G2 + 2 * MiB, offset=2 * MiB, slot_size=4 * MiB
    )
    vm.guest_read(G2 + 2 * MiB, private=True)
    vm.guest_read(G2 + 5 * MiB, private=True)
    assert levels(vm) == (0, 2, 0)


def test_unaligned_memslot_gpa_maps_4k():
    """A memslot at a gpa one page past a 2M boundary over a huge file at offset 0:
    nothing is congruent, every private fault maps 4K."""
    host = gmem.Host(GiB)  # not checked at teardown: the core panics mid-call
    vm = host.create_vm("sw_protected", "inplace")
    f = vm.create_guest_memfd(4 * MiB, HUGETLB | MMAP, page_order=9)
    vm.set_user_memory_region2(0, MEMFD, G2 + PAGE, 2 * MiB, 0, f, 0)
    vm.guest_read(G2 + PAGE, private=True)
    assert levels(vm) == (1, 0, 0)
    vm.check()


# --------------------------------------------------------------------------- split / merge


@pytest.mark.parametrize("strategy", ["inplace", "attr_hook"])
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_split_merge_round_trip(vm_type, strategy):
    _, vm, _, _ = huge_vm(vm_type, strategy)
    vmm_convert(vm, G2, 4 * MiB, PRIV)
    vm.guest_write(G2, 1, private=True)
    vm.guest_write(G2 + PAGE, 2, private=True)
    assert levels(vm) == (0, 1, 0)
    # One page shared: the folio splits, the 2M leaf goes, faults map 4K.
    vmm_convert(vm, G2 + 5 * PAGE, PAGE, 0)
    assert st(vm, "splits", "merges") == {"splits": 1, "merges": 0}
    assert levels(vm) == (0, 0, 0)
    assert vm.guest_read(G2 + PAGE, private=True) == 2  # only the converted page scrubs
    vm.guest_write(G2 + 5 * PAGE, 7, private=False)
    assert levels(vm) == (2, 0, 0)
    # The other 2M folio is untouched.
    vm.guest_read(G2 + 2 * MiB, private=True)
    assert levels(vm) == (2, 1, 0)
    # All private again: merge, the small mappings are zapped, the next fault maps 2M.
    vmm_convert(vm, G2 + 5 * PAGE, PAGE, PRIV)
    assert st(vm, "splits", "merges") == {"splits": 1, "merges": 1}
    assert levels(vm) == (0, 1, 0)
    assert vm.guest_read(G2, private=True) == 1
    assert levels(vm) == (0, 2, 0)
    if vm_type == "tdx":
        assert st(vm, "stage2_1g")["stage2_1g"] == 0


def test_split_merge_via_fd_api():
    _, vm, f, _ = huge_vm("pkvm", "inplace")
    vm.guest_read(G2 + 2 * MiB, private=True)  # an intact (zeroed) folio to split
    f.set_memory_attributes2(2 * MiB + 3 * PAGE, 2 * PAGE, 0)
    assert st(vm, "splits")["splits"] == 1
    m = f.mmap()
    m.write(2 * MiB + 3 * PAGE, 0x33)
    f.set_memory_attributes2(2 * MiB, 2 * MiB, PRIV)
    assert st(vm, "merges")["merges"] == 1
    assert vm.guest_read(G2 + 2 * MiB + 3 * PAGE, private=True) == 0x33  # pKVM keeps
    assert levels(vm) == (0, 1, 0)


def test_merge_refused_while_pinned():
    """A pinned page blocks the to-private conversion itself (EAGAIN), so no merge."""
    _, vm, f, _ = huge_vm("sw_protected", "inplace")
    vm.guest_read(G2, private=True)
    f.set_memory_attributes2(PAGE, PAGE, 0)
    m = f.mmap()
    m.pin(PAGE)
    with raises_errno(errno.EAGAIN, gmem.ConversionBusy) as r:
        f.set_memory_attributes2(0, 2 * MiB, PRIV)
    assert r.value.error_offset == PAGE
    assert st(vm, "splits", "merges") == {"splits": 1, "merges": 0}
    m.unpin(PAGE)
    f.set_memory_attributes2(0, 2 * MiB, PRIV)
    assert st(vm, "merges")["merges"] == 1


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_dual_huge_keeps_folio_mixed_rule_maps_4k(vm_type):
    """dual: conversions never split the private folio; a mixed range maps 4K; once the
    range is uniform again a fault may map 2M."""
    _, vm, _, _ = huge_vm(vm_type, "dual")
    vmm_convert(vm, G2, 4 * MiB, PRIV)
    vmm_convert(vm, G2 + PAGE, PAGE, 0)
    vm.guest_write(G2, 1, private=True)
    vm.guest_write(G2 + 2 * PAGE, 3, private=True)
    vm.guest_write(G2 + PAGE, 2, private=False)
    assert levels(vm) == (3, 0, 0)
    assert st(vm, "splits", "merges") == {"splits": 0, "merges": 0}
    assert st(vm, "pages_allocated")["pages_allocated"] == 512 + 1  # folio + shared page
    # The other (uniform) 2M range maps huge.
    vm.guest_read(G2 + 2 * MiB, private=True)
    assert levels(vm)[1] == 1
    vmm_convert(vm, G2 + PAGE, PAGE, PRIV)
    assert vm.guest_read(G2 + PAGE, private=True) == 0  # the private page of that gfn
    assert st(vm, "splits", "merges") == {"splits": 0, "merges": 0}
    assert vm.guest_read(G2, private=True) == 1
    assert vm.guest_read(G2 + 2 * PAGE, private=True) == 3


def test_deferred_merge():
    _, vm, _, _ = huge_vm("sw_protected", "inplace")
    vm.set_options(merge="deferred")
    vmm_convert(vm, G2, 4 * MiB, PRIV)
    vm.guest_read(G2 + 9 * PAGE, private=True)
    vmm_convert(vm, G2 + PAGE, PAGE, 0)
    vmm_convert(vm, G2 + PAGE, PAGE, PRIV)
    assert st(vm, "splits", "merges") == {"splits": 1, "merges": 0}
    vm.guest_read(G2, private=True)
    assert levels(vm) == (1, 0, 0)  # the folio is still split: 4K
    assert vm.merge_pass() == 1
    assert st(vm, "merges")["merges"] == 1
    assert levels(vm) == (0, 0, 0)  # merge zapped the small mapping
    vm.guest_read(G2 + 7 * PAGE, private=True)
    assert levels(vm) == (0, 1, 0)
    assert vm.merge_pass() == 0


def test_punch_huge_frees_whole_folio():
    _, vm, f, _ = huge_vm("snp", "inplace")
    vm.guest_write(G2, 1, private=True)
    assert st(vm, "pages_allocated")["pages_allocated"] == 512
    r0 = st(vm, "rmpupdates")["rmpupdates"]
    f.fallocate(PUNCH, 0, 2 * MiB)
    s = st(vm, "pages_allocated", "rmpupdates")
    assert s["pages_allocated"] == 0
    assert s["rmpupdates"] > r0
    assert levels(vm) == (0, 0, 0)
    assert vm.guest_read(G2, private=True) == 0


def test_folio_allocated_under_mixed_attributes_is_split():
    _, vm, f, _ = huge_vm("sw_protected", "inplace")
    f.set_memory_attributes2(PAGE, PAGE, 0)  # before any folio exists
    vm.guest_read(G2, private=True)  # allocates the folio
    f.mmap().write(PAGE, 5)  # the host maps the shared page
    assert st(vm, "splits")["splits"] == 1
    f.set_memory_attributes2(PAGE, PAGE, PRIV)
    assert st(vm, "merges")["merges"] == 1


@pytest.mark.parametrize("merge", ["eager", "deferred"])
def test_merge_after_fallocate_allocation(merge):
    _, vm, f, _ = huge_vm("sw_protected", "inplace")
    vm.set_options(merge=merge)
    f.fallocate(KEEP, 0, 2 * MiB)
    f.set_memory_attributes2(PAGE, PAGE, 0)
    assert st(vm, "splits")["splits"] == 1
    f.mmap().write(PAGE, 5)
    f.set_memory_attributes2(PAGE, PAGE, PRIV)
    if merge == "deferred":
        assert vm.merge_pass() == 1
    assert st(vm, "merges")["merges"] == 1
    vm.guest_read(G2, private=True)
    assert levels(vm) == (0, 1, 0)


@pytest.mark.parametrize("strategy", ["dual", "two_offsets"])
def test_two_backings_split_and_merge_the_private_folio(strategy):
    """dual/two_offsets: once a private folio exists, a page of it turning shared splits
    it (the VMM may punch that page); the whole range private again merges it back and
    the next fault maps 2M."""
    _, vm, f, _ = huge_vm("sw_protected", strategy)
    vmm_convert(vm, G2, 2 * MiB, PRIV)
    vm.guest_write(G2, 1, private=True)
    assert levels(vm) == (0, 1, 0)
    vmm_convert(vm, G2 + 5 * PAGE, PAGE, 0)
    assert st(vm, "splits", "merges") == {"splits": 1, "merges": 0}
    assert levels(vm) == (0, 0, 0)
    vm.guest_write(G2 + 5 * PAGE, 2, private=False)
    assert vm.guest_read(G2, private=True) == 1
    assert levels(vm)[1] == 0
    vmm_convert(vm, G2 + 5 * PAGE, PAGE, PRIV)
    assert st(vm, "splits", "merges") == {"splits": 1, "merges": 1}
    assert vm.guest_read(G2, private=True) == 1
    assert levels(vm) == (0, 1, 0)
    assert f.nr_pages == 512
