"""Conversion strategies x platforms (issue 3): KERNEL.md §5 items 22-34 where they
apply, and the seed thread's design points made executable.

Strategies: dual, inplace, realloc, two_offsets, attr_hook.  Platforms: sw_protected,
pkvm, tdx, snp.  Only the gmem core is exercised here (the reference model covers
dual/sw_protected only).  Huge pages live in ``test_hugepages.py``.

Every VM and host a test creates is checked (``vm.check()``, ``host.check()``) when
the test ends.
"""

from __future__ import annotations

import errno
import gc

import numpy as np
import pytest

import gmem
from util import PAGE, raises_errno

MiB = 1 << 20
GPA = 1 << 32
PRIV = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
MMAP = gmem.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = gmem.GUEST_MEMFD_FLAG_INIT_SHARED
KEEP = gmem.FALLOC_FL_KEEP_SIZE
PUNCH = gmem.FALLOC_FL_PUNCH_HOLE | gmem.FALLOC_FL_KEEP_SIZE
MEMFD = gmem.KVM_MEM_GUEST_MEMFD

STRATEGIES = ("dual", "inplace", "realloc", "two_offsets", "attr_hook")
VM_TYPES = ("sw_protected", "pkvm", "tdx", "snp")
ALL = [(vt, s) for s in STRATEGIES for vt in VM_TYPES]
SAME_PAGE = ("inplace", "attr_hook")  # the shared view is the private page itself
SEPARATE = ("dual", "two_offsets")  # a distinct shared page per gfn
KEEPS = ("sw_protected", "pkvm")  # in-place content kept (TDX/SNP scrub)

assert set(STRATEGIES) == set(gmem.STRATEGIES)
assert set(VM_TYPES) == set(gmem.VM_TYPES)

# --------------------------------------------------------------------------- plumbing

_LIVE: list[tuple[gmem.Host, list[gmem.Vm]]] = []


@pytest.fixture(autouse=True)
def _check_everything():
    """vm.check() and host.check() on everything the test built."""
    _LIVE.clear()
    yield
    live = list(_LIVE)
    _LIVE.clear()
    for host, vms in live:
        for vm in vms:
            vm.check()
        host.check()


def new_host(memory=64 * MiB):
    host = gmem.Host(memory)
    _LIVE.append((host, []))
    return host


def new_vm(host, vm_type, strategy):
    vm = host.create_vm(vm_type, strategy)
    for h, vms in _LIVE:
        if h is host:
            vms.append(vm)
    return vm


def st(vm, *keys):
    s = vm.stats()
    return {k: s[k] for k in keys}


class Env:
    """One guest_memfd memslot of ``npages`` at ``gpa`` on a fresh VM.

    ``view`` is the VMM's mapping of the shared side: the anonymous memory for dual,
    the guest_memfd itself for the same-page strategies and realloc, the second
    guest_memfd range for two_offsets.  ``shared=True`` starts every page shared
    (INIT_SHARED for inplace, a conversion for attr_hook).
    """

    def __init__(
        self,
        vm_type="sw_protected",
        strategy="dual",
        npages=16,
        *,
        gpa=GPA,
        shared=False,
        flags=None,
        host=None,
    ):
        self.host = host or new_host()
        self.vm_type, self.strategy = vm_type, strategy
        self.vm = vm = new_vm(self.host, vm_type, strategy)
        self.npages, self.gpa = npages, gpa
        if flags is None:
            flags = 0 if strategy in SEPARATE else MMAP
            if strategy == "inplace" and shared:
                flags |= INIT_SHARED
        self.gmem = vm.create_guest_memfd(npages * PAGE, flags)
        self.mem = self.host.mmap_anonymous(npages * PAGE)
        kw = {}
        self.shared_gmem = None
        if strategy == "two_offsets":
            self.shared_gmem = vm.create_guest_memfd(npages * PAGE, MMAP)
            kw = {"shared_guest_memfd": self.shared_gmem, "shared_offset": 0}
        vm.set_user_memory_region2(0, MEMFD, gpa, npages * PAGE, self.mem.addr, self.gmem, 0, **kw)
        if strategy == "dual":
            self.view = self.mem
        elif strategy == "two_offsets":
            self.view = self.shared_gmem.mmap()
        else:
            self.view = self.gmem.mmap()
        if shared and strategy == "attr_hook":
            self.convert(0, npages, private=False)

    def g(self, page):
        return self.gpa + page * PAGE

    def convert(self, page, n, private):
        self.vm.set_memory_attributes(self.g(page), n * PAGE, PRIV if private else 0)

    def read(self, page, private):
        return self.vm.guest_read(self.g(page), private=private)

    def write(self, page, value, private):
        self.vm.guest_write(self.g(page), value, private=private)

    def host_read(self, page):
        return self.view.read(page * PAGE)

    def host_write(self, page, value):
        self.view.write(page * PAGE, value)

    def attr(self, page):
        return self.vm.get_memory_attributes(self.g(page) // PAGE)

    def stats(self, *keys):
        return st(self.vm, *keys)


def run(vm, events):
    arr = np.array(events, dtype=gmem.EVENT_DTYPE)
    return [int(x) for x in vm.apply(arr)]


def after_to_private(vm_type, strategy, shared_value, old_private=0):
    """What the guest reads privately from a page right after shared -> private."""
    if strategy in SEPARATE:
        return old_private
    if strategy in SAME_PAGE and vm_type in KEEPS:
        return shared_value
    return 0


def after_to_shared(vm_type, strategy, private_value, old_shared):
    """What the guest reads (shared) right after private -> shared."""
    if strategy in SEPARATE:
        return old_shared
    if strategy in SAME_PAGE and vm_type in KEEPS:
        return private_value
    return 0


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


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_attr_hook_default_shared(vm_type):
    """Item 22 on attr_hook: mainline VM creation default is all shared, and creating a
    memslot does not change attributes."""
    host = new_host()
    e = Env(vm_type, "attr_hook", 8, host=host, gpa=GPA)
    vm2 = new_vm(host, vm_type, "attr_hook")
    assert vm2.get_memory_attributes(GPA // PAGE) == 0
    f2 = vm2.create_guest_memfd(4 * PAGE, MMAP)
    vm2.set_user_memory_region2(0, MEMFD, GPA, 4 * PAGE, 0, f2, 0)
    assert vm2.get_memory_attributes(GPA // PAGE) == 0
    assert [e.attr(p) for p in range(8)] == [0] * 8
    assert e.gmem.get_memory_attributes2(0) == 0
    e.write(0, 0xAA, private=False)
    assert e.host_read(0) == 0xAA


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
        vm.set_memory_attributes(GPA + slot * MiB, 8 * PAGE, PRIV)
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


# --------------------------------------------------------------------------- items 26-27


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_inplace_init_private(vm_type):
    """Item 26: host access to a private page is a HostFault (SIGBUS); guest RMW;
    ->shared the host sees the guest's data (kept) or zeros (scrubbed); ->private the
    host faults again and the guest finds its data (kept) or zeros (scrubbed)."""
    e = Env(vm_type, "inplace", 4)
    faults0 = e.stats("host_faults")["host_faults"]
    for op in (lambda: e.host_read(0), lambda: e.host_write(0, 1)):
        with raises_errno(errno.EFAULT, gmem.HostFault) as r:
            op()
        assert r.value.signal == "SIGBUS"
    assert e.stats("host_faults")["host_faults"] == faults0 + 2
    e.write(0, 0x10, private=True)
    e.write(0, e.read(0, private=True) + 1, private=True)
    assert e.read(0, private=True) == 0x11
    e.gmem.set_memory_attributes2(0, PAGE, 0)
    kept = vm_type in KEEPS
    assert e.host_read(0) == (0x11 if kept else 0)
    e.host_write(0, 0x22)
    assert e.read(0, private=False) == 0x22
    e.gmem.set_memory_attributes2(0, PAGE, PRIV)
    with raises_errno(errno.EFAULT, gmem.HostFault):
        e.host_read(0)
    assert e.read(0, private=True) == (0x22 if kept else 0)
    assert e.stats("violations", "double_backed_pages") == {
        "violations": 0,
        "double_backed_pages": 0,
    }


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_inplace_init_shared(vm_type):
    """Item 27: mirror of 26 with INIT_SHARED."""
    e = Env(vm_type, "inplace", 4, shared=True)
    e.host_write(0, 0x30)
    assert e.read(0, private=False) == 0x30
    with raises_errno(errno.EFAULT, gmem.MemoryFault) as r:
        e.read(0, private=True)
    assert r.value.flags == gmem.KVM_MEMORY_EXIT_FLAG_PRIVATE
    e.gmem.set_memory_attributes2(0, PAGE, PRIV)
    kept = vm_type in KEEPS
    assert e.read(0, private=True) == (0x30 if kept else 0)
    with raises_errno(errno.EFAULT, gmem.HostFault):
        e.host_read(0)
    e.write(0, 0x31, private=True)
    e.gmem.set_memory_attributes2(0, PAGE, 0)
    assert e.host_read(0) == (0x31 if kept else 0)


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


@pytest.mark.parametrize("layout", range(0, 256, 37))
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_inplace_unallocated_folios(vm_type, layout):
    """Item 30: 8 pages, some allocated (by a host write while shared) and some not;
    converting the whole range both ways works and keeps/scrubs the allocated ones."""
    e = Env(vm_type, "inplace", 8, shared=True)
    allocated = [p for p in range(8) if layout >> p & 1]
    for p in allocated:
        e.host_write(p, 0x80 + p)
    e.gmem.set_memory_attributes2(0, 8 * PAGE, PRIV)
    kept = vm_type in KEEPS
    assert [e.read(p, private=True) for p in range(8)] == [
        (0x80 + p if kept and p in allocated else 0) for p in range(8)
    ]
    e.gmem.set_memory_attributes2(0, 8 * PAGE, 0)
    assert [e.host_read(p) for p in range(8)] == [
        (0x80 + p if kept and p in allocated else 0) for p in range(8)
    ]


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


# --------------------------------------------------------------------------- item 33


def _inplace_pinned(vm_type, npages=4, pin=1, slot_offset=0):
    """An inplace VM, all shared, the host holding a pin on page ``pin``."""
    host = new_host()
    vm = new_vm(host, vm_type, "inplace")
    f = vm.create_guest_memfd((npages + slot_offset) * PAGE, MMAP | INIT_SHARED)
    vm.set_user_memory_region2(0, MEMFD, GPA, npages * PAGE, 0, f, slot_offset * PAGE)
    m = f.mmap()
    for p in range(npages + slot_offset):
        m.write(p * PAGE, 0x40 + p)
    m.pin((pin + slot_offset) * PAGE)
    return host, vm, f, m


def _refusal_state(vm, f, pages):
    s = vm.stats()
    s = {k: v for k, v in s.items() if k not in ("eagain", "host_unmaps", "modelled_ns")}
    return s, [f.get_memory_attributes2(p * PAGE) for p in pages]


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "single"])
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_elevated_refcount_fd_api(vm_type, bulk):
    """Item 33 via fd.set_memory_attributes2: EAGAIN with error_offset = the pinned
    page's file offset, nothing changed (but eagain, host unmaps); other pages convert;
    after the unpin the conversion succeeds."""
    _, vm, f, m = _inplace_pinned(vm_type, slot_offset=2)
    pinned_off = 3 * PAGE  # page 1 of the slot, file page 3
    off, size = (0, 6 * PAGE) if bulk else (pinned_off, PAGE)
    before = _refusal_state(vm, f, range(6))
    eagain = vm.stats()["eagain"]
    with raises_errno(errno.EAGAIN, gmem.ConversionBusy) as r:
        f.set_memory_attributes2(off, size, PRIV)
    assert r.value.error_offset == pinned_off
    assert _refusal_state(vm, f, range(6)) == before
    assert vm.stats()["eagain"] == eagain + 1
    # The pinned page's mapping survives? No: to-private unmaps first; the pin stays.
    for p in (0, 1, 2, 4, 5):
        f.set_memory_attributes2(p * PAGE, PAGE, PRIV)
    assert [f.get_memory_attributes2(p * PAGE) for p in range(6)] == [PRIV] * 3 + [0] + [PRIV] * 2
    m.unpin(pinned_off)
    f.set_memory_attributes2(off, size, PRIV)
    assert [f.get_memory_attributes2(p * PAGE) for p in range(6)] == [PRIV] * 6
    assert vm.stats()["eagain"] == eagain + 1


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "single"])
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_elevated_refcount_vm_api(vm_type, bulk):
    """Item 33 via vm.set_memory_attributes on an inplace VM: error_offset is the gpa."""
    _, vm, f, m = _inplace_pinned(vm_type, slot_offset=2)
    gpa, size = (GPA, 4 * PAGE) if bulk else (GPA + PAGE, PAGE)
    before = _refusal_state(vm, f, range(6))
    before_vm = [vm.get_memory_attributes(GPA // PAGE + p) for p in range(4)]
    with raises_errno(errno.EAGAIN, gmem.ConversionBusy) as r:
        vm.set_memory_attributes(gpa, size, PRIV)
    assert r.value.error_offset == GPA + PAGE
    assert _refusal_state(vm, f, range(6)) == before
    assert [vm.get_memory_attributes(GPA // PAGE + p) for p in range(4)] == before_vm
    assert vm.stats()["eagain"] == 1
    for p in (0, 2, 3):
        vm.set_memory_attributes(GPA + p * PAGE, PAGE, PRIV)
    m.unpin(3 * PAGE)
    vm.set_memory_attributes(gpa, size, PRIV)
    assert [vm.get_memory_attributes(GPA // PAGE + p) for p in range(4)] == [PRIV] * 4
    # Routed to the file offsets: the file's pages 2..5 are private, 0..1 untouched.
    assert [f.get_memory_attributes2(p * PAGE) for p in range(6)] == [0, 0] + [PRIV] * 4
    kept = vm_type in KEEPS
    assert vm.guest_read(GPA + PAGE, private=True) == (0x43 if kept else 0)


def test_eagain_in_apply_and_stats():
    """The same refusal through vm.apply: -EAGAIN, eagain counted, nothing converted."""
    _, vm, f, m = _inplace_pinned("sw_protected")
    gfn = GPA // PAGE
    conv = vm.stats()["conversions"]
    out = run(vm, [(gmem.Op.CONVERT_PRIVATE, gfn, 4, 0)])
    assert out == [-errno.EAGAIN]
    assert vm.stats()["eagain"] == 1
    assert vm.stats()["conversions"] == conv
    assert [f.get_memory_attributes2(p * PAGE) for p in range(4)] == [0] * 4
    m.unpin(PAGE)
    assert run(vm, [(gmem.Op.CONVERT_PRIVATE, gfn, 4, 0)]) == [0]


def test_to_shared_is_not_gated_by_pins():
    """Only to-private checks references."""
    _, vm, f, m = _inplace_pinned("sw_protected")
    m.unpin(PAGE)
    f.set_memory_attributes2(0, 4 * PAGE, PRIV)
    f.set_memory_attributes2(0, 4 * PAGE, 0)
    m.pin(PAGE)
    f.set_memory_attributes2(0, 4 * PAGE, 0)  # already shared: no-op
    assert vm.stats()["eagain"] == 0
    m.unpin(PAGE)


# --------------------------------------------------------------------------- item 34


def test_set_memory_attributes2_flags_and_range_checks():
    """Item 34 (content-mode flags are not offered: any flag is EINVAL) and the other
    KVM_SET_MEMORY_ATTRIBUTES2 argument checks."""
    e = Env("sw_protected", "inplace", 4)
    f = e.gmem
    for flags in (1, 2, 1 << 63):
        with raises_errno(errno.EINVAL):
            f.set_memory_attributes2(0, PAGE, 0, flags)
    bad = [
        (0, PAGE, 1),
        (0, 0, 0),
        (1, PAGE, 0),
        (0, PAGE + 1, 0),
        (4 * PAGE, PAGE, 0),
        (3 * PAGE, 2 * PAGE, 0),
        ((1 << 64) - PAGE, PAGE, 0),
    ]
    for off, size, attrs in bad:
        with raises_errno(errno.EINVAL, msg=f"{off:#x}+{size:#x} attrs={attrs:#x}"):
            f.set_memory_attributes2(off, size, attrs)
    assert [f.get_memory_attributes2(p * PAGE) for p in range(4)] == [PRIV] * 4
    assert e.stats("conversions")["conversions"] == 0


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "inplace"])
def test_set_memory_attributes2_enotty_elsewhere(strategy):
    e = Env("sw_protected", strategy, 4)
    with raises_errno(errno.ENOTTY):
        e.gmem.set_memory_attributes2(0, PAGE, 0)
    with raises_errno(errno.ENOTTY):
        e.gmem.set_memory_attributes2(0, PAGE, PRIV)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capabilities(strategy):
    vm = new_vm(new_host(), "sw_protected", strategy)
    want = 0 if strategy == "inplace" else PRIV
    assert vm.check_extension(gmem.KVM_CAP_MEMORY_ATTRIBUTES) == want
    flags = vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert bool(flags & INIT_SHARED) == (strategy == "inplace")


# --------------------------------------------------------------------------- inplace routing


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_inplace_vm_attributes_route_to_file_offsets(vm_type):
    """vm.set_memory_attributes on an inplace VM converts the bound file offsets; the
    part of the range that no memslot covers is kept in the VM map."""
    host = new_host()
    vm = new_vm(host, vm_type, "inplace")
    f = vm.create_guest_memfd(16 * PAGE, MMAP | INIT_SHARED)
    vm.set_user_memory_region2(0, MEMFD, GPA, 4 * PAGE, 0, f, 8 * PAGE)
    vm.set_memory_attributes(GPA + PAGE, 2 * PAGE, PRIV)
    assert [f.get_memory_attributes2(p * PAGE) for p in range(16)] == [
        PRIV if p in (9, 10) else 0 for p in range(16)
    ]
    # Beyond the memslot: the VM-wide map.
    vm.set_memory_attributes(GPA + 4 * PAGE, 2 * PAGE, PRIV)
    assert vm.get_memory_attributes(GPA // PAGE + 4) == PRIV
    assert f.get_memory_attributes2(12 * PAGE) == 0
    # A file-side conversion shows through the gfn.
    f.set_memory_attributes2(8 * PAGE, PAGE, PRIV)
    assert vm.get_memory_attributes(GPA // PAGE) == PRIV


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_inplace_to_private_unmaps_and_counts(vm_type):
    e = Env(vm_type, "inplace", 4, shared=True)
    for p in range(4):
        e.host_write(p, p + 1)
    u = e.stats("host_unmaps")["host_unmaps"]
    e.gmem.set_memory_attributes2(0, 4 * PAGE, PRIV)
    assert e.stats("host_unmaps")["host_unmaps"] >= u + 1
    assert e.stats("host_faults")["host_faults"] == 0
    for p in range(4):
        with raises_errno(errno.EFAULT, gmem.HostFault):
            e.host_read(p)
    assert e.stats("host_faults")["host_faults"] == 4


# --------------------------------------------------------------------------- attr_hook


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_attr_hook_pin_survives_as_violation(vm_type):
    """attr_hook has no refcount gate: the conversion succeeds, each page pinned across
    it is a violation; the unpinned mapping is still zapped."""
    e = Env(vm_type, "attr_hook", 8, shared=True)
    for p in range(8):
        e.host_write(p, 0x60 + p)
    for p in (1, 5):
        e.view.pin(p * PAGE)
    v0 = e.stats("violations", "eagain")
    e.convert(0, 8, private=True)
    s = e.stats("violations", "eagain", "conversions")
    assert s["violations"] == v0["violations"] + 2
    assert s["eagain"] == 0
    assert [e.attr(p) for p in range(8)] == [PRIV] * 8
    with raises_errno(errno.EFAULT, gmem.HostFault):
        e.host_read(0)
    for p in (1, 5):
        e.view.unpin(p * PAGE)
    kept = vm_type in KEEPS
    assert e.read(1, private=True) == (0x61 if kept else 0)


def test_attr_hook_one_gfn_per_offset():
    """Binding one offset to two gfns is refused (EEXIST since 7.2, mainline's bound-range
    check)."""
    host = new_host()
    vm = new_vm(host, "sw_protected", "attr_hook")
    f = vm.create_guest_memfd(8 * PAGE, MMAP)
    vm.set_user_memory_region2(0, MEMFD, GPA, 4 * PAGE, 0, f, 0)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(1, MEMFD, GPA + MiB, 4 * PAGE, 0, f, 2 * PAGE)


# --------------------------------------------------------------------------- dual


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_dual_double_backing_without_discard(vm_type):
    e = Env(vm_type, "dual", 8)
    for p in range(8):
        e.write(p, 0x10 + p, private=False)
    e.convert(0, 8, private=True)
    for p in range(8):
        e.write(p, 0x20 + p, private=True)
    assert e.stats("double_backed_pages", "pages_allocated") == {
        "double_backed_pages": 8,
        "pages_allocated": 16,
    }
    e.convert(0, 4, private=False)  # nothing discarded implicitly
    assert e.stats("double_backed_pages")["double_backed_pages"] == 8
    # Old shared content is still there.
    assert [e.read(p, private=False) for p in range(4)] == [0x10 + p for p in range(4)]


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_dual_discard_keeps_single_backing(vm_type):
    """The VMM discards the side no longer used: mapping.discard after ->private,
    fallocate(PUNCH_HOLE) of the private side after ->shared."""
    e = Env(vm_type, "dual", 8)
    for p in range(8):
        e.write(p, 0x10 + p, private=False)
    e.convert(0, 8, private=True)
    e.mem.discard(0, 8 * PAGE)
    for p in range(8):
        e.write(p, 0x20 + p, private=True)
    assert e.stats("double_backed_pages", "pages_allocated") == {
        "double_backed_pages": 0,
        "pages_allocated": 8,
    }
    e.convert(0, 8, private=False)
    e.gmem.fallocate(PUNCH, 0, 8 * PAGE)
    for p in range(8):
        e.write(p, 0x30 + p, private=False)
    assert e.stats("double_backed_pages", "pages_allocated") == {
        "double_backed_pages": 0,
        "pages_allocated": 8,
    }
    # Discarded private side: fresh zeroed page on the next private use.
    e.convert(0, 1, private=True)
    assert e.read(0, private=True) == 0


def test_dual_discard_shared_event():
    e = Env("sw_protected", "dual", 8)
    gfn = GPA // PAGE
    out = run(
        e.vm,
        [
            (gmem.Op.GUEST_WRITE_SHARED, gfn, 8, 1),
            (gmem.Op.CONVERT_PRIVATE, gfn, 8, 0),
            (gmem.Op.GUEST_WRITE_PRIVATE, gfn, 8, 2),
        ],
    )
    assert out == [0, 0, 0]
    assert e.stats("double_backed_pages")["double_backed_pages"] == 8
    assert run(e.vm, [(gmem.Op.DISCARD_SHARED, gfn, 8, 0)]) == [0]
    assert e.stats("double_backed_pages")["double_backed_pages"] == 0
    assert e.host_read(0) == 0


# --------------------------------------------------------------------------- realloc


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_realloc_frees_zeroes_and_loses_content(vm_type):
    e = Env(vm_type, "realloc", 4)
    e.write(0, 0x77, private=False)
    assert e.host_read(0) == 0x77
    s0 = e.stats("frees", "allocations", "zeroed_pages", "pages_allocated")
    e.convert(0, 1, private=True)
    s1 = e.stats("frees", "allocations", "zeroed_pages", "pages_allocated")
    assert s1["frees"] == s0["frees"] + 1
    assert s1["pages_allocated"] == s0["pages_allocated"] - 1
    assert e.read(0, private=True) == 0  # content lost
    s2 = e.stats("allocations", "zeroed_pages")
    assert s2["allocations"] == s1["allocations"] + 1
    assert s2["zeroed_pages"] >= s1["zeroed_pages"] + 1
    e.write(0, 0x78, private=True)
    e.convert(0, 1, private=False)
    assert e.read(0, private=False) == 0  # lost again on the round trip
    assert e.host_read(0) == 0
    assert e.stats("double_backed_pages", "pages_allocated") == {
        "double_backed_pages": 0,
        "pages_allocated": 1,
    }
    with raises_errno(errno.EFAULT, gmem.MemoryFault):
        e.read(0, private=True)


def test_realloc_never_double_backed():
    e = Env("sw_protected", "realloc", 64)
    rng = np.random.default_rng(3)
    for _ in range(200):
        p = int(rng.integers(64))
        priv = bool(rng.integers(2))
        e.convert(p, 1, private=priv)
        e.write(p, 5, private=priv)
        assert e.stats("double_backed_pages")["double_backed_pages"] == 0
    assert e.stats("pages_allocated")["pages_allocated"] <= 64


# --------------------------------------------------------------------------- two_offsets


@pytest.mark.parametrize("same_file", [False, True], ids=["second_file", "same_file"])
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_two_offsets_attribute_picks_side(vm_type, same_file):
    host = new_host()
    vm = new_vm(host, vm_type, "two_offsets")
    if same_file:
        f = vm.create_guest_memfd(16 * PAGE, MMAP)
        f2, soff = f, 8 * PAGE
    else:
        f = vm.create_guest_memfd(8 * PAGE)
        f2, soff = vm.create_guest_memfd(8 * PAGE, MMAP), 0
    vm.set_user_memory_region2(
        0, MEMFD, GPA, 8 * PAGE, 0, f, 0, shared_guest_memfd=f2, shared_offset=soff
    )
    view = f2.mmap(soff, 8 * PAGE)
    for p in range(8):
        vm.guest_write(GPA + p * PAGE, 0x10 + p, private=False)
    assert [view.read(p * PAGE) for p in range(8)] == [0x10 + p for p in range(8)]
    vm.set_memory_attributes(GPA, 8 * PAGE, PRIV)
    for p in range(8):
        vm.guest_write(GPA + p * PAGE, 0x20 + p, private=True)
    # The shared side stays (double backed) and is still what the host sees.
    assert vm.stats()["double_backed_pages"] == 8
    assert [view.read(p * PAGE) for p in range(8)] == [0x10 + p for p in range(8)]
    vm.set_memory_attributes(GPA, 4 * PAGE, 0)
    assert [vm.guest_read(GPA + p * PAGE, private=False) for p in range(4)] == [
        0x10 + p for p in range(4)
    ]
    # Discard: the DISCARD_SHARED event on pages 4..7 (private now), punch for 0..1.
    out = run(vm, [(gmem.Op.DISCARD_SHARED, GPA // PAGE + 4, 4, 0)])
    assert out == [0]
    assert vm.stats()["double_backed_pages"] == 4
    f.fallocate(PUNCH, 0, 2 * PAGE)  # private side of the now-shared pages 0..1
    assert vm.stats()["double_backed_pages"] == 2
    assert [vm.guest_read(GPA + p * PAGE, private=True) for p in range(4, 8)] == [
        0x24,
        0x25,
        0x26,
        0x27,
    ]
    vm.set_memory_attributes(GPA + 4 * PAGE, PAGE, 0)
    assert vm.guest_read(GPA + 4 * PAGE, private=False) == 0  # discarded: zero page


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "two_offsets"])
def test_shared_offset_refused_elsewhere(strategy):
    host = new_host()
    vm = new_vm(host, "sw_protected", strategy)
    f = vm.create_guest_memfd(8 * PAGE, MMAP)
    f2 = vm.create_guest_memfd(8 * PAGE, MMAP)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(
            0, MEMFD, GPA, 4 * PAGE, 0, f, 0, shared_guest_memfd=f2, shared_offset=0
        )


def test_two_offsets_shared_range_overlap_refused():
    """The shared range must not be bound elsewhere (the private range of the same slot
    included): EEXIST, as any bound range since 7.2."""
    host = new_host()
    vm = new_vm(host, "sw_protected", "two_offsets")
    f = vm.create_guest_memfd(16 * PAGE, MMAP)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(
            0, MEMFD, GPA, 8 * PAGE, 0, f, 0, shared_guest_memfd=f, shared_offset=4 * PAGE
        )


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


def test_snp_inplace_to_shared_returns_frames():
    e = Env("snp", "inplace", 4)
    for p in range(4):
        e.write(p, 9, private=True)
    r0 = e.stats("rmpupdates")["rmpupdates"]
    e.gmem.set_memory_attributes2(0, 2 * PAGE, 0)
    assert e.stats("rmpupdates")["rmpupdates"] == r0 + 2
    assert e.host_read(0) == 0  # scrubbed
    e.gmem.set_memory_attributes2(0, 2 * PAGE, PRIV)
    assert e.read(0, private=True) == 0
    assert e.stats("rmpupdates")["rmpupdates"] == r0 + 3


def test_snp_two_memslots_distinct_frames():
    """Two gfns, two file offsets: each private frame has its own gpa."""
    host = new_host()
    vm = new_vm(host, "snp", "dual")
    f = vm.create_guest_memfd(8 * PAGE)
    vm.set_user_memory_region2(0, MEMFD, GPA, 4 * PAGE, 0, f, 0)
    vm.set_user_memory_region2(1, MEMFD, GPA + MiB, 4 * PAGE, 0, f, 4 * PAGE)
    vm.set_memory_attributes(GPA, MiB + 4 * PAGE, PRIV)
    for base in (GPA, GPA + MiB):
        for p in range(4):
            vm.guest_write(base + p * PAGE, 1, private=True)
    assert vm.stats()["rmpupdates"] == 8
    # Deleting a slot and rebinding the range at another gpa: the old frames were
    # unmapped; after a punch they return to the hypervisor and a new gpa may own them.
    vm.set_user_memory_region2(1, MEMFD, GPA + MiB, 0, 0)
    f.fallocate(PUNCH, 4 * PAGE, 4 * PAGE)
    vm.set_user_memory_region2(2, MEMFD, GPA + 2 * MiB, 4 * PAGE, 0, f, 4 * PAGE)
    vm.set_memory_attributes(GPA + 2 * MiB, 4 * PAGE, PRIV)
    vm.guest_write(GPA + 2 * MiB, 2, private=True)
    assert vm.stats()["violations"] == 0


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


def test_two_offsets_without_a_shared_range_uses_userspace_memory():
    """A two_offsets memslot bound without shared_offset/shared_guest_memfd keeps its
    shared side at userspace_addr, like dual; with only shared_guest_memfd the shared
    range starts at offset 0 of that file."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", "two_offsets")
    size = 16 * PAGE
    fd = vm.create_guest_memfd(size)
    anon = host.mmap_anonymous(size)
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, size, anon.addr, fd, 0)
    vm.set_memory_attributes(0, PAGE, PRIV)
    vm.guest_write(0, 5, private=True)
    vm.set_memory_attributes(0, PAGE, 0)
    vm.guest_write(0, 6, private=False)
    assert anon.read(0) == 6
    assert vm.stats()["double_backed_pages"] == 1
    ev = np.zeros(1, gmem.EVENT_DTYPE)
    ev[0] = (gmem.Op.DISCARD_SHARED, 0, 1, 0)
    assert vm.apply(ev).tolist() == [0]
    assert vm.stats()["double_backed_pages"] == 0
    assert anon.read(0) == 0
    private2, second = vm.create_guest_memfd(size), vm.create_guest_memfd(size)
    vm.set_user_memory_region2(
        1, gmem.KVM_MEM_GUEST_MEMFD, 1 << 30, size, 0, private2, 0, shared_guest_memfd=second
    )
    vm.guest_write((1 << 30) + PAGE, 7, private=False)
    assert second.nr_pages == 1
    vm.check()


@pytest.mark.parametrize("vm_type", ["sw_protected", "tdx", "snp"])
def test_populate_loads_the_initial_image(vm_type):
    """kvm_gmem_populate(): private, guest_memfd-backed gfns only (EINVAL when the first
    is not, and nothing changes); it stops at the first shared gfn and returns the pages
    done; the image is what the guest reads, not zeros; TDX adds each page (no later
    AUG/ACCEPT), SNP assigns it in the RMP."""
    host = gmem.Host(64 * MiB)
    vm = host.create_vm(vm_type, "dual")
    size = 8 * PAGE
    fd = vm.create_guest_memfd(size)
    anon = host.mmap_anonymous(size)
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, size, anon.addr, fd, 0)
    vm.set_memory_attributes(0, 4 * PAGE, PRIV)
    before = vm.stats()
    with raises_errno(errno.EINVAL):
        vm.populate(4 * PAGE, PAGE, 0xC0DE)  # page 4 is shared
    assert vm.stats() == before
    assert vm.populate(0, 5 * PAGE, 0xC0DE) == 4  # stops before page 4
    assert vm.guest_read(PAGE, private=True) == 0xC0DE
    s = vm.stats()
    assert s["zeroed_pages"] == 0
    if vm_type == "tdx":
        assert (s["tdx_page_adds"], s["tdx_page_augs"], s["tdx_accepts"]) == (4, 0, 0)
    if vm_type == "snp":
        assert s["rmpupdates"] == 4
        assert s["pvalidates"] == 0
