"""The `inplace` design: the guest_memfd page is both views; attributes per file offset;
KERNEL.md §5 items 26-27 (init private/shared), 33 (elevated refcount, EAGAIN) and 34
(``set_memory_attributes2``)."""

from __future__ import annotations

import errno

import pytest
from design_env import (
    GPA,
    INIT_SHARED,
    KEEPS,
    MEMFD,
    MMAP,
    PRIV,
    STRATEGIES,
    VM_TYPES,
    Env,
    new_host,
    new_vm,
    run,
    vmm_convert,
)

import gmem
from util import PAGE, raises_errno

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
    """Item 33 through the VMM's conversion events on an inplace VM (each stands for
    KVM_SET_MEMORY_ATTRIBUTES2 on the bound range): refused with -EAGAIN and nothing
    changed while a page is pinned, converted once it is unpinned. The VM ioctl itself
    takes no PRIVATE in in-place mode (v13): EINVAL, nothing changed."""
    _, vm, f, m = _inplace_pinned(vm_type, slot_offset=2)
    gpa, size = (GPA, 4 * PAGE) if bulk else (GPA + PAGE, PAGE)
    before = _refusal_state(vm, f, range(6))
    before_vm = [vm.get_memory_attributes(GPA // PAGE + p) for p in range(4)]
    with raises_errno(errno.EINVAL):
        vm.set_memory_attributes(gpa, size, PRIV)
    assert _refusal_state(vm, f, range(6)) == before
    with raises_errno(errno.EAGAIN):
        vmm_convert(vm, gpa, size, PRIV)
    after, attrs = _refusal_state(vm, f, range(6))
    assert after["events"] == before[0]["events"] + 1  # the event, refused
    assert ({**after, "events": before[0]["events"]}, attrs) == before
    assert [vm.get_memory_attributes(GPA // PAGE + p) for p in range(4)] == before_vm
    assert vm.stats()["eagain"] == 1
    for p in (0, 2, 3):
        vmm_convert(vm, GPA + p * PAGE, PAGE, PRIV)
    m.unpin(3 * PAGE)
    vmm_convert(vm, gpa, size, PRIV)
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


# --------------------------------------------------------------------------- inplace routing


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_inplace_vm_attributes_route_to_file_offsets(vm_type):
    """A conversion event on an inplace VM converts the bound file offsets; the part of
    the range that no memslot covers keeps no attribute (v13: the VM's array no longer
    tracks PRIVATE), so a shared access there stays an MMIO exit."""
    host = new_host()
    vm = new_vm(host, vm_type, "inplace")
    f = vm.create_guest_memfd(16 * PAGE, MMAP | INIT_SHARED)
    vm.set_user_memory_region2(0, MEMFD, GPA, 4 * PAGE, 0, f, 8 * PAGE)
    vmm_convert(vm, GPA + PAGE, 2 * PAGE, PRIV)
    assert [f.get_memory_attributes2(p * PAGE) for p in range(16)] == [
        PRIV if p in (9, 10) else 0 for p in range(16)
    ]
    # Beyond the memslot: nothing is stored.
    vmm_convert(vm, GPA + 4 * PAGE, 2 * PAGE, PRIV)
    assert vm.get_memory_attributes(GPA // PAGE + 4) == 0
    assert f.get_memory_attributes2(12 * PAGE) == 0
    with pytest.raises(gmem.MmioExit):
        vm.guest_read(GPA + 4 * PAGE, private=False)
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
