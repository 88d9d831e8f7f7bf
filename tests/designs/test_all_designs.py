"""What every design must do, strategies x platforms (issue 3): KERNEL.md §5 items
22-25, 28-32 and 34 where they apply, the content promises, SNP and TDX accounting,
and `vm.apply` against the per-call API. One file per design holds what is its own."""

from __future__ import annotations

import errno
import gc

import numpy as np
import pytest
from design_env import (
    ALL,
    GPA,
    INIT_SHARED,
    KEEP,
    KEEPS,
    MEMFD,
    MMAP,
    PRIV,
    PUNCH,
    SAME_PAGE,
    SEPARATE,
    STRATEGIES,
    VM_TYPES,
    Env,
    MiB,
    after_to_private,
    after_to_shared,
    new_host,
    new_vm,
    vmm_convert,
)

import gmem
from util import PAGE, raises_errno

# --------------------------------------------------------------------------- item 22


@pytest.mark.parametrize(("vm_type", "strategy"), [c for c in ALL if c[1] != "attr_hook"])
def test_default_attributes_and_shared_writes(vm_type, strategy):
    """Item 22 (mainline strategies: default shared), item 26/27 (inplace: default
    private, INIT_SHARED -> shared); the host sees the guest's shared writes."""
    e = Env(vm_type, strategy, 8)
    want = PRIV if strategy == "inplace" else 0
    assert [e.attr(p) for p in range(8)] == [want] * 8
    if strategy == "inplace":
        assert [e.gmem.get_memory_attributes2(p * PAGE) for p in range(8)] == [PRIV] * 8
        e = Env(vm_type, strategy, 8, shared=True)
        assert [e.gmem.get_memory_attributes2(p * PAGE) for p in range(8)] == [0] * 8
        assert [e.attr(p) for p in range(8)] == [0] * 8
    for p in range(8):
        e.write(p, 0xAA + p, private=False)
    assert [e.host_read(p) for p in range(8)] == [0xAA + p for p in range(8)]
    for p in range(8):
        e.host_write(p, 0xC0 + p)
    assert [e.read(p, private=False) for p in range(8)] == [0xC0 + p for p in range(8)]
    assert e.stats("double_backed_pages", "violations", "memory_faults") == {
        "double_backed_pages": 0,
        "violations": 0,
        "memory_faults": 0,
    }


# --------------------------------------------------------------------------- item 23


RANGES = [(0, 1), (0, 512), (1, 1), (1, 512), (512, 1)]  # (first page, npages)


NP23 = 514


@pytest.mark.parametrize(("first", "n"), RANGES, ids=lambda v: str(v))
@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_explicit_conversion(vm_type, strategy, first, n):
    """Item 23 without fallocate: private data is the guest's; holes converted back to
    shared work; back to shared the host's writes are visible.  Content across each
    conversion follows the strategy/platform."""
    e = Env(vm_type, strategy, NP23, shared=True)
    P1, P2, P3, P4 = 0x11, 0x22, 0x33, 0x44
    rng = range(first, first + n)
    for p in rng:
        e.write(p, P1, private=False)
    e.convert(first, n, private=True)
    want = after_to_private(vm_type, strategy, P1)
    assert {e.read(p, private=True) for p in rng} == {want}
    for p in rng:
        e.write(p, P2, private=True)
    # The host still sees the old shared data (separate sides) or cannot reach the page.
    for p in (first, first + n - 1):
        if strategy in SEPARATE:
            assert e.host_read(p) == P1
        else:
            with raises_errno(errno.EFAULT, gmem.HostFault):
                e.host_read(p)
    # A shared access to a private page exits.
    with raises_errno(errno.EFAULT, gmem.MemoryFault) as r:
        e.read(first, private=False)
    assert r.value.gpa == e.g(first)
    assert r.value.flags == 0
    # Odd pages back to shared: holes inside the private range.
    odd = [p for p in rng if p % 2]
    for p in odd:
        e.convert(p, 1, private=False)
        assert e.read(p, private=False) == after_to_shared(vm_type, strategy, P2, P1)
        e.write(p, P3, private=False)
        assert e.host_read(p) == P3
    for p in rng:
        if p % 2 == 0:
            assert e.read(p, private=True) == P2
    # Everything back to shared; host writes are visible to the guest.
    e.convert(first, n, private=False)
    for p in rng:
        e.host_write(p, P4)
        assert e.read(p, private=False) == P4
    outside = [p for p in (first - 1, first + n) if 0 <= p < NP23]
    for p in outside:
        assert e.attr(p) == 0
    s = e.stats("double_backed_pages", "violations")
    if strategy not in SEPARATE:
        assert s["double_backed_pages"] == 0
    if vm_type != "pkvm" or strategy in SAME_PAGE:
        assert s["violations"] == 0


@pytest.mark.parametrize(("first", "n"), RANGES, ids=lambda v: str(v))
@pytest.mark.parametrize(("vm_type", "strategy"), [c for c in ALL if c[1] != "inplace"])
def test_explicit_conversion_with_fallocate(vm_type, strategy, first, n):
    """Item 23 with fallocate: the VMM punches the private side on ->shared and
    allocates it on ->private.  (Not for inplace, whose private side is the shared
    page: punching it before ->shared would drop the guest's data by design.)"""
    e = Env(vm_type, strategy, NP23, shared=True)
    rng = range(first, first + n)
    for p in rng:
        e.write(p, 0x11, private=False)
    e.gmem.fallocate(KEEP, first * PAGE, n * PAGE)
    e.convert(first, n, private=True)
    for p in rng:
        e.write(p, 0x22, private=True)
    assert {e.read(p, private=True) for p in rng} == {0x22}
    if strategy != "attr_hook":  # attr_hook's private side is the shared page
        e.gmem.fallocate(PUNCH, first * PAGE, n * PAGE)
    e.convert(first, n, private=False)
    want = (
        0x11
        if strategy in SEPARATE
        else (0x22 if vm_type in KEEPS and strategy in SAME_PAGE else 0)
    )
    assert {e.read(p, private=False) for p in rng} == {want}
    for p in rng:
        e.host_write(p, 0x44)
    assert {e.read(p, private=False) for p in rng} == {0x44}
    assert e.stats("double_backed_pages")["double_backed_pages"] == 0


# --------------------------------------------------------------------------- item 24


@pytest.mark.parametrize("precise", [True, False], ids=["precise", "full"])
@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_punch_hole_private_reads_zero(vm_type, strategy, precise):
    """Item 24: private range, PUNCH_HOLE, guest reads zeros (SPTEs zapped, the new
    page is zeroed); attributes are not changed by the punch (item 31)."""
    e = Env(vm_type, strategy, 8)
    e.convert(0, 8, private=True)
    for p in range(8):
        e.write(p, 0x5A, private=True)
    before = e.stats("stage2_zaps", "frees")
    if precise:
        e.gmem.fallocate(PUNCH, 2 * PAGE, PAGE)
        punched = [2]
    else:
        e.gmem.fallocate(PUNCH, 0, 8 * PAGE)
        punched = list(range(8))
    after = e.stats("stage2_zaps", "frees")
    assert after["stage2_zaps"] > before["stage2_zaps"]
    assert after["frees"] >= before["frees"] + len(punched)
    assert [e.attr(p) for p in range(8)] == [PRIV] * 8
    if strategy in SAME_PAGE:
        assert [e.gmem.get_memory_attributes2(p * PAGE) for p in range(8)] == [PRIV] * 8
    for p in range(8):
        assert e.read(p, private=True) == (0 if p in punched else 0x5A)


# --------------------------------------------------------------------------- item 25


@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_two_memslots_one_gmem_and_fd_outlives_vm(vm_type, strategy):
    """Item 25: two memslots over one guest_memfd; after the VM object is dropped the
    guest_memfd (which pins the VM) still punches and allocates."""
    host = new_host()
    vm = host.create_vm(vm_type, strategy)  # not tracked: dropped below
    flags = 0 if strategy in SEPARATE else MMAP
    f = vm.create_guest_memfd(16 * PAGE, flags)
    mem = host.mmap_anonymous(16 * PAGE)
    sh = vm.create_guest_memfd(16 * PAGE, MMAP) if strategy == "two_offsets" else None
    for slot in range(2):
        kw = {"shared_guest_memfd": sh, "shared_offset": slot * 8 * PAGE} if sh else {}
        vm.set_user_memory_region2(
            slot,
            MEMFD,
            GPA + slot * MiB,
            8 * PAGE,
            mem.addr + slot * 8 * PAGE,
            f,
            slot * 8 * PAGE,
            **kw,
        )
    for slot in range(2):
        vmm_convert(vm, GPA + slot * MiB, 8 * PAGE, PRIV)
        vm.guest_write(GPA + slot * MiB, 0x70 + slot, private=True)
    for slot in range(2):
        assert vm.guest_read(GPA + slot * MiB, private=True) == 0x70 + slot
    vm.check()
    del vm
    gc.collect()
    f.fallocate(PUNCH, 0, 16 * PAGE)
    f.fallocate(KEEP, 0, 16 * PAGE)
    f.fallocate(PUNCH, 0, 16 * PAGE)
    host.check()


# --------------------------------------------------------------------------- items 28-31


@pytest.mark.parametrize(("vm_type", "strategy"), [(vt, s) for vt in VM_TYPES for s in SAME_PAGE])
def test_indexing(vm_type, strategy):
    """Item 28: converting page i affects only page i (file offsets for inplace and
    attr_hook)."""
    e = Env(vm_type, strategy, 4, shared=True)
    for i in range(4):
        e.convert(i, 1, private=True)
        assert [e.gmem.get_memory_attributes2(p * PAGE) for p in range(4)] == [
            PRIV if p == i else 0 for p in range(4)
        ]
        assert [e.attr(p) for p in range(4)] == [PRIV if p == i else 0 for p in range(4)]
        e.convert(i, 1, private=False)


@pytest.mark.parametrize("to_private", [True, False], ids=["private", "shared"])
@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_conversion_before_allocation(vm_type, strategy, to_private):
    """Item 29: a conversion is recorded without any page allocated."""
    e = Env(vm_type, strategy, 4, shared=to_private)
    if not to_private:
        e.convert(0, 4, private=True)
    assert e.stats("pages_allocated")["pages_allocated"] == 0
    e.convert(1, 2, private=to_private)
    want = [PRIV if (p in (1, 2)) == to_private else 0 for p in range(4)]
    assert [e.attr(p) for p in range(4)] == want
    assert e.stats("pages_allocated")["pages_allocated"] == 0
    assert e.read(1, private=to_private) == 0
    assert e.read(0, private=not to_private) == 0


@pytest.mark.parametrize(("vm_type", "strategy"), [(vt, s) for vt in VM_TYPES for s in SAME_PAGE])
def test_truncate_keeps_attributes(vm_type, strategy):
    """Item 31: PUNCH_HOLE does not change shared/private state; a private page after
    the punch reads 0 in the guest, a shared one 0 in the host."""
    e = Env(vm_type, strategy, 4, shared=True)
    e.convert(0, 2, private=True)
    e.write(0, 1, private=True)
    e.write(2, 2, private=False)
    e.gmem.fallocate(PUNCH, 0, 4 * PAGE)
    assert [e.gmem.get_memory_attributes2(p * PAGE) for p in range(4)] == [PRIV, PRIV, 0, 0]
    assert e.read(0, private=True) == 0
    assert e.host_read(2) == 0


# --------------------------------------------------------------------------- item 32


@pytest.mark.parametrize(("vm_type", "strategy"), [(vt, s) for vt in VM_TYPES for s in SAME_PAGE])
def test_conversion_unmaps_every_host_mapping(vm_type, strategy):
    """Item 32: a second mapping (the forked child's) is unmapped too, and then faults."""
    e = Env(vm_type, strategy, 4, shared=True)
    child = e.gmem.mmap()
    e.host_write(0, 0x99)
    assert child.read(0) == 0x99
    unmaps = e.stats("host_unmaps")["host_unmaps"]
    e.convert(0, 1, private=True)
    assert e.stats("host_unmaps")["host_unmaps"] >= unmaps + 2
    for m in (e.view, child):
        with raises_errno(errno.EFAULT, gmem.HostFault):
            m.read(0)
    assert child.read(PAGE) == 0  # the other pages stay reachable


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capabilities(strategy):
    vm = new_vm(new_host(), "sw_protected", strategy)
    want = 0 if strategy == "inplace" else PRIV
    assert vm.check_extension(gmem.KVM_CAP_MEMORY_ATTRIBUTES) == want
    flags = vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert bool(flags & INIT_SHARED) == (strategy == "inplace")


# --------------------------------------------------------------------------- pkvm promise


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pkvm_content_promise(strategy):
    """pKVM promises content across share/unshare: strategies losing a written page's
    content count a violation per page; the same-page strategies keep it."""
    e = Env("pkvm", strategy, 4, shared=True)
    for p in range(4):
        e.write(p, 0x50 + p, private=False)
    e.convert(0, 4, private=True)
    assert [e.read(p, private=True) for p in range(4)] == [
        after_to_private("pkvm", strategy, 0x50 + p) for p in range(4)
    ]
    lost = e.stats("violations")["violations"]
    if strategy in SAME_PAGE:
        assert lost == 0
    else:
        assert lost == 4
    for p in range(4):
        e.write(p, 0x60 + p, private=True)
    e.convert(0, 2, private=False)
    v = e.stats("violations")["violations"]
    assert v == (0 if strategy in SAME_PAGE else lost + 2)


@pytest.mark.parametrize("vm_type", ["sw_protected", "tdx", "snp"])
@pytest.mark.parametrize("strategy", ["dual", "realloc", "two_offsets"])
def test_no_content_promise_elsewhere(vm_type, strategy):
    e = Env(vm_type, strategy, 4)
    e.write(0, 1, private=False)
    e.convert(0, 1, private=True)
    e.write(0, 2, private=True)
    e.convert(0, 1, private=False)
    assert e.stats("violations")["violations"] == 0


# --------------------------------------------------------------------------- snp


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_snp_rmp_accounting(strategy):
    """RMPUPDATE + PVALIDATE when a private page is first mapped; not again on a
    re-fault of the same frame; punching frees it with an RMPUPDATE; vm.check()
    verifies one gpa per private frame."""
    e = Env("snp", strategy, 8)
    e.convert(0, 8, private=True)
    assert e.stats("rmpupdates", "pvalidates") == {"rmpupdates": 0, "pvalidates": 0}
    for p in range(4):
        e.write(p, p + 1, private=True)
    assert e.stats("rmpupdates", "pvalidates") == {"rmpupdates": 4, "pvalidates": 4}
    e.vm.check()
    # Zap (a conversion of other pages does not touch these) and re-fault: same frames.
    e.gmem.fallocate(PUNCH, 0, PAGE)
    s = e.stats("rmpupdates", "pvalidates")
    assert s["rmpupdates"] == 5
    assert s["pvalidates"] == 4
    assert e.read(0, private=True) == 0
    assert e.stats("rmpupdates", "pvalidates") == {"rmpupdates": 6, "pvalidates": 5}
    assert e.read(1, private=True) == 2
    assert e.stats("rmpupdates", "pvalidates") == {"rmpupdates": 6, "pvalidates": 5}


# --------------------------------------------------------------------------- tdx


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tdx_aug_accept_remove(strategy):
    e = Env("tdx", strategy, 8)
    e.convert(0, 8, private=True)
    for p in range(4):
        e.write(p, 1, private=True)
    assert e.stats("tdx_page_augs", "tdx_accepts", "tdx_page_removes", "tdx_page_adds") == {
        "tdx_page_augs": 4,
        "tdx_accepts": 4,
        "tdx_page_removes": 0,
        "tdx_page_adds": 0,
    }
    for p in range(4):  # mapped: no new AUG
        e.read(p, private=True)
    assert e.stats("tdx_page_augs")["tdx_page_augs"] == 4
    e.convert(0, 2, private=False)  # zaps two private leaves
    assert e.stats("tdx_page_removes")["tdx_page_removes"] == 2
    e.gmem.fallocate(PUNCH, 2 * PAGE, PAGE)  # zaps one more
    assert e.stats("tdx_page_removes")["tdx_page_removes"] == 3
    e.write(0, 1, private=False)  # shared faults are not TDX steps
    assert e.stats("tdx_page_augs", "tdx_page_removes") == {
        "tdx_page_augs": 4,
        "tdx_page_removes": 3,
    }


# --------------------------------------------------------------------------- vm.apply


def _scenario(gfn):
    o = gmem.Op
    return [
        (o.GUEST_WRITE_SHARED, gfn, 8, 0x11),
        (o.HOST_READ, gfn + 1, 1, 0),
        (o.HOST_WRITE, gfn + 2, 2, 0x12),
        (o.PIN, gfn + 3, 1, 0),
        (o.CONVERT_PRIVATE, gfn, 8, 0),
        (o.GUEST_READ_SHARED, gfn + 1, 1, 0),
        (o.UNPIN, gfn + 3, 1, 0),
        (o.CONVERT_PRIVATE, gfn, 8, 0),
        (o.GUEST_WRITE_PRIVATE, gfn, 4, 0x21),
        (o.GUEST_READ_PRIVATE, gfn + 2, 1, 0),
        (o.HOST_READ, gfn, 1, 0),
        (o.DISCARD_SHARED, gfn, 8, 0),
        (o.CONVERT_SHARED, gfn + 1, 2, 0),
        (o.GUEST_READ_SHARED, gfn + 1, 2, 0),
        (o.PUNCH_HOLE, gfn + 4, 2, 0),
        (o.ALLOCATE, gfn + 4, 4, 0),
        (o.GUEST_READ_PRIVATE, gfn + 4, 1, 0),
        (o.CONVERT_SHARED, gfn, 8, 0),
        (o.HOST_WRITE, gfn, 8, 0x31),
        (o.GUEST_READ_SHARED, gfn + 7, 1, 0),
    ]


def _per_call(e, op, gfn, n, value):
    """The per-call API equivalent of one event; returns 0 or -errno and the value."""
    o = gmem.Op
    p0 = gfn - e.gpa // PAGE
    last = 0
    try:
        if op in (o.CONVERT_PRIVATE, o.CONVERT_SHARED):
            e.convert(p0, n, private=op == o.CONVERT_PRIVATE)
        elif op in (o.GUEST_WRITE_SHARED, o.GUEST_WRITE_PRIVATE):
            for p in range(p0, p0 + n):
                e.write(p, value, private=op == o.GUEST_WRITE_PRIVATE)
            last = value
        elif op in (o.GUEST_READ_SHARED, o.GUEST_READ_PRIVATE):
            for p in range(p0, p0 + n):
                last = e.read(p, private=op == o.GUEST_READ_PRIVATE)
        elif op == o.HOST_READ:
            for p in range(p0, p0 + n):
                last = e.host_read(p)
        elif op == o.HOST_WRITE:
            for p in range(p0, p0 + n):
                e.host_write(p, value)
            last = value
        elif op == o.PIN:
            for p in range(p0, p0 + n):
                e.view.pin(p * PAGE)
        elif op == o.UNPIN:
            for p in range(p0, p0 + n):
                e.view.unpin(p * PAGE)
        elif op == o.PUNCH_HOLE:
            e.gmem.fallocate(PUNCH, p0 * PAGE, n * PAGE)
        elif op == o.ALLOCATE:
            e.gmem.fallocate(KEEP, p0 * PAGE, n * PAGE)
        elif op == o.DISCARD_SHARED:
            if e.strategy == "dual":
                e.mem.discard(p0 * PAGE, n * PAGE)
            elif e.strategy == "two_offsets":
                e.shared_gmem.fallocate(PUNCH, p0 * PAGE, n * PAGE)
    except OSError as err:
        return -err.errno, None
    return 0, last


IGNORE_EQ = ("modelled_ns", "events", "host_unmaps")


@pytest.mark.parametrize(("vm_type", "strategy"), ALL)
def test_apply_matches_per_call_api(vm_type, strategy):
    """vm.apply runs the same sequence as the per-call API: same statuses, values and
    stats (except the per-event counters and modelled time)."""
    a = Env(vm_type, strategy, 8, shared=True)
    b = Env(vm_type, strategy, 8, shared=True)
    gfn = GPA // PAGE
    events = _scenario(gfn)
    arr = np.array(events, dtype=gmem.EVENT_DTYPE)
    status, det = a.vm.apply(arr, details=True)
    per_call = [_per_call(b, *ev) for ev in events]
    assert [int(x) for x in status] == [c for c, _ in per_call], list(
        zip(events, status, strict=True)
    )
    for (code, val), d in zip(per_call, det, strict=True):
        if code == 0 and val is not None:
            assert int(d["value"]) == val
    sa = {k: v for k, v in a.vm.stats().items() if k not in IGNORE_EQ}
    sb = {k: v for k, v in b.vm.stats().items() if k not in IGNORE_EQ}
    assert sa == sb
    assert a.vm.stats()["events"] == len(events)
    if strategy == "inplace":
        assert int(status[4]) == -errno.EAGAIN
    else:
        assert int(status[4]) == 0
