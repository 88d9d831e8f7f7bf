"""Private <-> shared conversions on sw_protected with the dual strategy (mainline).

private_mem_conversions_test.c (KERNEL.md §5 items 22-25), written from the rule text:
the guest's MAP_GPA_RANGE hypercall is the VMM's KVM_SET_MEMORY_ATTRIBUTES (plus
optionally fallocate: PUNCH_HOLE when converting to shared, allocate when converting
to private).  Also the accounting that dual implies: both sides stay allocated.
"""

from __future__ import annotations

import gc

import pytest

from util import PAGE, Guest

MiB = 1 << 20
KEEP = 1
PUNCH = 2

DEF_P, INIT_P, P1, P2, P3, P4 = 0xAA, 0xCC, 0x11, 0x22, 0x33, 0x44


def test_default_shared_host_sees_guest_writes(api, vm, host):
    """Item 22."""
    g = Guest(api, host, vm, npages=64, gpa=1 << 32)
    for p in range(64):
        g.write(p, DEF_P, private=False)
    assert [g.read(p, private=False) for p in range(64)] == [DEF_P] * 64
    assert [g.host_read(p) for p in range(64)] == [DEF_P] * 64
    for p in range(64):
        g.host_write(p, INIT_P + p)
    assert [g.read(p, private=False) for p in range(64)] == [INIT_P + p for p in range(64)]
    st = vm.stats()
    assert st["pages_allocated"] == 64
    assert st["double_backed_pages"] == 0
    vm.check()


TEST_RANGES = [
    (0, PAGE),
    (0, 2 * MiB),
    (PAGE, PAGE),
    (PAGE, 2 * MiB),
    (2 * MiB, PAGE),
]
NPAGES = (2 * MiB + 2 * PAGE) // PAGE  # covers the largest range plus a margin


class ConversionGuest(Guest):
    """The VMM's side of MAP_GPA_RANGE, with or without fallocate."""

    def __init__(self, api, host, vm, do_fallocate):
        super().__init__(api, host, vm, npages=NPAGES + 2, gpa=1 << 32)
        self.do_fallocate = do_fallocate

    def map_private(self, page, npages):
        if self.do_fallocate:
            self.gmem.fallocate(KEEP, page * PAGE, npages * PAGE)
        self.convert(page, npages, private=True)

    def map_shared(self, page, npages):
        if self.do_fallocate:
            self.gmem.fallocate(PUNCH | KEEP, page * PAGE, npages * PAGE)
        self.convert(page, npages, private=False)


@pytest.mark.parametrize("do_fallocate", [False, True], ids=["attrs", "fallocate"])
@pytest.mark.parametrize(("offset", "size"), TEST_RANGES, ids=lambda v: hex(v))
def test_explicit_conversion(api, vm, host, offset, size, do_fallocate):
    """Item 23."""
    g = ConversionGuest(api, host, vm, do_fallocate)
    for p in range(NPAGES):
        g.write(p, INIT_P, private=False)
    first, n = offset // PAGE, size // PAGE
    rng = range(first, first + n)
    outside = [p for p in range(NPAGES) if p not in rng]
    for p in rng:
        g.write(p, P1, private=False)

    # To private: the guest's private data is its own; the host still sees P1.
    g.map_private(first, n)
    for p in rng:
        assert g.read(p, private=True) == 0  # a new guest_memfd page reads 0
        g.write(p, P2, private=True)
    assert all(g.read(p, private=True) == P2 for p in rng)
    assert all(g.host_read(p) == P1 for p in rng)
    assert all(g.host_read(p) == INIT_P for p in outside)
    assert all(g.read(p, private=False) == INIT_P for p in outside[:8])
    st = vm.stats()
    assert st["double_backed_pages"] == n  # dual: nothing was discarded
    assert st["pages_allocated"] == NPAGES + n

    # Holes: every odd page back to shared.
    odd = [p for p in rng if (p - first) % 2]
    for p in odd:
        g.map_shared(p, 1)
    for p in odd:
        assert g.read(p, private=False) == P1  # the shared side was never discarded
        g.write(p, P3, private=False)
        assert g.host_read(p) == P3
    even = [p for p in rng if not (p - first) % 2]
    assert all(g.read(p, private=True) == P2 for p in even)

    # Everything back to shared; the host's writes are what the guest sees.
    g.map_shared(first, n)
    assert all(g.read(p, private=False) == (P3 if p in odd else P1) for p in rng)
    for p in rng:
        g.host_write(p, P4)
    assert all(g.read(p, private=False) == P4 for p in rng)
    st = vm.stats()
    assert st["double_backed_pages"] == (0 if do_fallocate else n)

    # Back to private without writing: mainline keeps the private pages unless the VMM
    # punched them.
    g.convert(first, n, private=True)
    assert all(g.read(p, private=True) == (0 if do_fallocate else P2) for p in rng)
    assert all(g.host_read(p) == P4 for p in rng)
    vm.check()
    host.check()


@pytest.mark.parametrize("precise", [True, False], ids=["precise", "full"])
def test_punch_hole(api, vm, host, precise):
    """Item 24: punching private memory zaps it; the guest then reads zeroes."""
    g = Guest(api, host, vm, npages=64, file_pages=64)
    first, n = 8, 16
    g.convert(first, n, private=True)
    for p in range(first, first + n):
        g.write(p, 0x5A, private=True)
    allocated = vm.stats()["pages_allocated"]
    if precise:
        g.gmem.fallocate(PUNCH | KEEP, first * PAGE, n * PAGE)
    else:
        g.gmem.fallocate(PUNCH | KEEP, 0, 64 * PAGE)
    st = vm.stats()
    assert st["pages_allocated"] == allocated - n
    assert st["frees"] == n
    assert all(g.read(p, private=True) == 0 for p in range(first, first + n))
    assert vm.stats()["allocations"] == 2 * n
    vm.check()


def test_punch_hole_only_private_side(api, vm, host):
    g = Guest(api, host, vm, npages=8)
    g.write(0, 1, private=False)
    g.convert(0, 1, private=True)
    g.write(0, 2, private=True)
    g.gmem.fallocate(PUNCH | KEEP, 0, 8 * PAGE)
    assert g.host_read(0) == 1
    g.convert(0, 1, private=False)
    assert g.read(0, private=False) == 1


def test_multiple_memslots_one_gmem(api, host):
    """Item 25: several memslots over one guest_memfd, then the VM goes away and the
    guest_memfd still accepts PUNCH_HOLE and allocation."""
    vm = host.create_vm("sw_protected", "dual")
    nslots, per = 4, 16
    f = vm.create_guest_memfd(nslots * per * PAGE)
    mems = []
    for i in range(nslots):
        mem = host.mmap_anonymous(per * PAGE)
        mems.append(mem)
        vm.set_user_memory_region2(
            i, api.KVM_MEM_GUEST_MEMFD, (i + 1) << 32, per * PAGE, mem.addr, f, i * per * PAGE
        )
    priv = api.KVM_MEMORY_ATTRIBUTE_PRIVATE
    for i in range(nslots):
        base = (i + 1) << 32
        vm.set_memory_attributes(base, per * PAGE, priv)
        for p in range(per):
            vm.guest_write(base + p * PAGE, i * 1000 + p, private=True)
    for i in range(nslots):
        base = (i + 1) << 32
        assert [vm.guest_read(base + p * PAGE, private=True) for p in range(per)] == [
            i * 1000 + p for p in range(per)
        ]
        assert all(mems[i].read(p * PAGE) == 0 for p in range(per))
    st = vm.stats()
    assert st["pages_allocated"] == nslots * per
    # Punching the second slot's part of the file only affects that slot.
    f.fallocate(PUNCH | KEEP, per * PAGE, per * PAGE)
    assert vm.guest_read((2 << 32) + 3 * PAGE, private=True) == 0
    assert vm.guest_read((1 << 32) + 3 * PAGE, private=True) == 3
    assert vm.guest_read((3 << 32) + 3 * PAGE, private=True) == 2003
    vm.check()
    del vm
    gc.collect()
    f.fallocate(PUNCH | KEEP, 0, nslots * per * PAGE)
    f.fallocate(KEEP, 0, nslots * per * PAGE)
    host.check()


# --------------------------------------------------------------------------- accounting


def test_double_backing_and_discard(api, vm, host):
    g = Guest(api, host, vm, npages=16)
    for p in range(16):
        g.write(p, p, private=False)
    g.convert(0, 16, private=True)
    for p in range(8):
        g.write(p, 100 + p, private=True)
    st = vm.stats()
    assert st["pages_allocated"] == 24
    assert st["double_backed_pages"] == 8
    assert st["allocations"] == 24
    # The VMM discards the shared side of pages 0..3 (QEMU's ram_block_discard_range).
    g.mem.discard(0, 4 * PAGE)
    st = vm.stats()
    assert st["pages_allocated"] == 20
    assert st["double_backed_pages"] == 4
    assert st["frees"] == 4
    assert all(g.host_read(p) == 0 for p in range(4))
    # ...and punches the private side of pages 4..5.
    g.gmem.fallocate(PUNCH | KEEP, 4 * PAGE, 2 * PAGE)
    st = vm.stats()
    assert st["pages_allocated"] == 18
    assert st["double_backed_pages"] == 2
    assert st["frees"] == 6
    assert st["peak_pages_allocated"] == 24
    vm.check()
    host.check()


def test_shared_read_of_untouched_page_allocates(api, vm, host):
    """The guest's stage-2 fault populates the host page (hva_to_pfn), unlike a host
    read through the mapping."""
    g = Guest(api, host, vm, npages=4)
    assert g.host_read(1) == 0
    assert vm.stats()["pages_allocated"] == 0
    assert g.read(1, private=False) == 0
    st = vm.stats()
    assert st["pages_allocated"] == 1
    assert st["allocations"] == 1


def test_private_read_of_new_page_allocates_zeroed(api, vm, host):
    g = Guest(api, host, vm, npages=4)
    g.convert(0, 4, private=True)
    assert g.read(2, private=True) == 0
    st = vm.stats()
    assert st["pages_allocated"] == 1
    assert st["allocations"] == 1
    g.gmem.fallocate(KEEP, 0, 4 * PAGE)
    assert vm.stats()["allocations"] == 4
    assert g.read(2, private=True) == 0


def test_anonymous_pages_outside_memslots_are_not_the_vms(api, vm, host):
    g = Guest(api, host, vm, npages=4)
    stray = host.mmap_anonymous(4 * PAGE)
    stray.write(0, 1)
    assert vm.stats()["pages_allocated"] == 0
    assert host.stats()["pages_allocated"] >= 1
    g.host_write(0, 1)
    assert vm.stats()["pages_allocated"] == 1


def test_mapping_counts_only_while_a_memslot_points_into_it(api, vm, host):
    """pages_allocated counts the anonymous pages inside the VM's memslots' userspace
    ranges: once the last memslot covering a page is deleted, the page is no longer the
    VM's; when a memslot covers it again, it is again (pages outside every range never
    count)."""
    mem = host.mmap_anonymous(8 * PAGE)
    vm.set_user_memory_region2(0, 0, 0, 8 * PAGE, mem.addr)
    vm.guest_write(0, 1, private=False)
    mem.write(7 * PAGE, 2)
    assert vm.stats()["pages_allocated"] == 2
    vm.set_user_memory_region2(0, 0, 0, 0)
    assert vm.stats()["pages_allocated"] == 0
    mem.write(6 * PAGE, 3)  # not the VM's: no memslot points here
    assert vm.stats()["allocations"] == 2
    vm.set_user_memory_region2(1, 0, 1 << 30, 2 * PAGE, mem.addr + 6 * PAGE)
    assert vm.stats()["pages_allocated"] == 2  # pages 6 and 7; page 0 lies outside
    vm.check()
    host.check()


def test_mapping_pointed_into_by_two_vms(api, host):
    """Each VM counts the mapping its memslots point into."""
    mem = host.mmap_anonymous(4 * PAGE)
    a = host.create_vm("sw_protected", "dual")
    b = host.create_vm("sw_protected", "dual")
    a.set_user_memory_region2(0, 0, 0, 4 * PAGE, mem.addr)
    b.set_user_memory_region2(0, 0, 0, 4 * PAGE, mem.addr)
    a.guest_write(0, 1, private=False)
    assert b.guest_read(0, private=False) == 1
    assert a.stats()["pages_allocated"] == 1
    assert b.stats()["pages_allocated"] == 1
    host.check()


def test_two_vms_are_accounted_separately(api, host):
    a = Guest(api, host, host.create_vm("sw_protected", "dual"), npages=8)
    b = Guest(api, host, host.create_vm("sw_protected", "dual"), npages=8)
    a.convert(0, 8, private=True)
    a.write(0, 1, private=True)
    b.write(0, 1, private=False)
    b.write(1, 1, private=False)
    assert a.vm.stats()["pages_allocated"] == 1
    assert b.vm.stats()["pages_allocated"] == 2
    # Attributes are per VM.
    assert b.vm.get_memory_attributes(0) == 0
    host.check()
