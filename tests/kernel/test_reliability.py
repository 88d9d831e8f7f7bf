"""Reliability: snapshots, exhaustion, threads, strict mode, hostile input."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gmem
from gmem.guest import build_vm, make_host
from gmem.workloads import make_events

PAGE = gmem.PAGE_SIZE
MiB = 1 << 20
PRIVATE = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
STRATEGIES = gmem.STRATEGIES


def _guest(strategy="dual", vm_type="sw_protected", pages=4096, huge_order=0):
    host = make_host(pages, huge_order=huge_order)
    return host, build_vm(host, pages, vm_type, strategy, huge_order=huge_order)


def _batches(events, n):
    step = -(-len(events) // n)
    return [events[i : i + step] for i in range(0, len(events), step)]


# --------------------------------------------------------------------------- snapshots


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("vm_type", ["sw_protected", "snp"])
def test_snapshot_resume_is_identical(tmp_path, strategy, vm_type):
    """Stopping half way, saving, loading and continuing gives exactly the results of the
    uninterrupted run."""
    events = make_events("dma-churn", 4096, seed=3)[:20000]
    first, second = events[:10000], events[10000:]

    host_a, g_a = _guest(strategy, vm_type)
    s_a = np.concatenate([g_a.vm.apply(first), g_a.vm.apply(second)])

    host_b, g_b = _guest(strategy, vm_type)
    s_b1 = g_b.vm.apply(first)
    path = tmp_path / "host.gmem"
    host_b.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["host.gmem"]  # no temporary left over
    loaded = gmem.load(path)
    vm_c = loaded.vms()[0]
    assert vm_c.stats() == g_b.vm.stats()
    s_c2 = vm_c.apply(second)

    np.testing.assert_array_equal(s_a, np.concatenate([s_b1, s_c2]))
    assert vm_c.stats() == g_a.vm.stats()
    assert loaded.stats() == host_a.stats()
    vm_c.check()
    loaded.check()


def test_snapshot_keeps_objects_usable(tmp_path):
    host = gmem.Host(64 * MiB)
    vm = host.create_vm("sw_protected", "inplace")
    fd = vm.create_guest_memfd(4 * MiB, gmem.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, 0, fd, 0)
    vm.guest_write(0, 99, private=True)
    m = fd.mmap()
    host.save(tmp_path / "s")
    h2 = gmem.load(tmp_path / "s")
    (vm2,), (fd2,), maps = h2.vms(), h2.guest_memfds(), h2.mappings()
    assert vm2.guest_read(0, private=True) == 99
    assert (fd2.size, fd2.inode, fd2.fd) == (fd.size, fd.inode, fd.fd)
    assert [x.addr for x in maps] == [m.addr]
    fd2.set_memory_attributes2(0, PAGE, 0)
    assert maps[0].read(0) == 99  # sw_protected keeps content in place
    vm2.check()


@pytest.mark.parametrize(
    "damage",
    ["truncate_header", "truncate_payload", "flip_payload", "newer_version", "bad_magic"],
)
def test_damaged_snapshot_loads_nothing(tmp_path, damage):
    host, g = _guest()
    g.vm.apply(make_events("dma-churn", 4096, seed=1)[:2000])
    path = tmp_path / "s"
    host.save(path)
    data = bytearray(path.read_bytes())
    if damage == "truncate_header":
        data = data[:10]
    elif damage == "truncate_payload":
        data = data[:-1]
    elif damage == "flip_payload":
        data[len(data) // 2] ^= 0x40
    elif damage == "newer_version":
        data[8] += 1
    else:
        data[0:8] = b"NOTGMEM!"
    path.write_bytes(bytes(data))
    with pytest.raises(gmem.GmemError) as ei:
        gmem.load(path)
    assert ei.value.errno == errno.EINVAL


def test_missing_snapshot_is_enoent(tmp_path):
    with pytest.raises(OSError, match="nope") as ei:
        gmem.load(tmp_path / "nope")
    assert ei.value.errno == errno.ENOENT


# --------------------------------------------------------------------------- exhaustion


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_enomem_mid_batch_then_continue(strategy):
    """A host too small for the guest: the events that need a page get -ENOMEM, every
    structure stays consistent, and the run continues once memory is given back."""
    host = gmem.Host(64 * PAGE)
    vm = host.create_vm("sw_protected", strategy)
    size = 256 * PAGE
    fd = vm.create_guest_memfd(size, gmem.GUEST_MEMFD_FLAG_MMAP)
    anon = host.mmap_anonymous(size)
    kw = {}
    if strategy == "two_offsets":
        kw = {"shared_guest_memfd": vm.create_guest_memfd(size), "shared_offset": 0}
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, size, anon.addr, fd, 0, **kw)
    if strategy == "inplace":  # v13: the guest_memfd ioctl converts
        fd.set_memory_attributes2(0, size, PRIVATE)
    else:
        vm.set_memory_attributes(0, size, PRIVATE)
    ev = np.zeros(256, gmem.EVENT_DTYPE)
    ev["op"] = gmem.Op.GUEST_WRITE_PRIVATE
    ev["gfn"] = np.arange(256)
    ev["npages"] = 1
    ev["value"] = 7
    status = vm.apply(ev)
    assert (status == 0).sum() == 64
    assert set(status.tolist()) == {0, -errno.ENOMEM}
    assert host.stats()["free_pages"] == 0
    vm.check()
    host.check()
    fd.fallocate(gmem.FALLOC_FL_PUNCH_HOLE | gmem.FALLOC_FL_KEEP_SIZE, 0, 32 * PAGE)
    status = vm.apply(ev[64:96])
    assert (status == 0).all()
    vm.check()


# --------------------------------------------------------------------------- threads


def test_threads_share_a_vm():
    """Several Python threads applying batches to one VM: no corruption, no deadlock, and
    the same totals as one thread applying the same batches."""
    events = make_events("dma-churn", 1 << 14, seed=5)[:40000]
    parts = _batches(events, 8)

    _, g_ref = _guest(pages=1 << 14)
    for p in parts:
        g_ref.vm.apply(p)

    _, g = _guest(pages=1 << 14)
    errors = []

    def worker(chunks):
        try:
            for c in chunks:
                g.vm.apply(c)
                g.vm.stats()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(parts[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    g.vm.check()
    st, ref = g.vm.stats(), g_ref.vm.stats()
    assert st["events"] == ref["events"] == len(events)


def test_gil_released_during_apply():
    """While one thread is inside a long vm.apply, another thread keeps running Python."""
    _, g = _guest(pages=1 << 16)
    events = make_events("random", 1 << 16, seed=1, ops=200000)
    ticks = 0
    done = threading.Event()

    def spin():
        nonlocal ticks
        while not done.is_set():
            ticks += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        while ticks == 0:  # the spinner is running before the measured call starts
            time.sleep(0.001)
        before = ticks
        g.vm.apply(events)
        during = ticks - before
    finally:
        done.set()
        t.join()
    assert during > 0


# --------------------------------------------------------------------------- strict mode


def test_strict_mode_checks_every_operation():
    code = (
        "import gmem\n"
        "from gmem.guest import build_vm, make_host\n"
        "from gmem.workloads import make_events\n"
        "h = make_host(2048)\n"
        "assert h.strict\n"
        "g = build_vm(h, 2048, 'sw_protected', 'inplace')\n"
        "s = g.vm.apply(make_events('dma-churn', 2048, seed=2)[:3000])\n"
        "print(int((s == 0).sum()))\n"
    )
    env = dict(os.environ, GMEM_STRICT="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout) > 0


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "call",
    [
        lambda vm, fd, m: vm.set_memory_attributes(-1, PAGE, 0),
        lambda vm, fd, m: vm.set_memory_attributes(0, 1 << 64, 0),
        lambda vm, fd, m: vm.guest_read(-PAGE, private=False),
        lambda vm, fd, m: fd.fallocate(3, -PAGE, PAGE),
        lambda vm, fd, m: m.write(0, -1),
        lambda vm, fd, m: m.write(0, 1 << 64),
        lambda vm, fd, m: vm.create_guest_memfd(1 << 64),
    ],
)
def test_out_of_range_integers_raise_overflow(call):
    host = gmem.Host(16 * MiB)
    vm = host.create_vm()
    fd = vm.create_guest_memfd(MiB)
    m = host.mmap_anonymous(MiB)
    before = vm.stats()
    with pytest.raises(OverflowError):
        call(vm, fd, m)
    assert vm.stats() == before


@pytest.mark.parametrize(
    "events",
    [
        [1, 2, 3],
        np.zeros(4, dtype=np.int64),
        np.zeros(4, dtype=[("op", "u1"), ("gfn", "u8")]),
        np.zeros((2, 2), dtype=gmem.EVENT_DTYPE),
        np.zeros(4, dtype=[("op", "f8"), ("gfn", "u8"), ("npages", "u8"), ("value", "u8")]),
    ],
)
def test_bad_event_arrays_are_rejected(events):
    _, g = _guest()
    before = g.vm.stats()
    with pytest.raises((TypeError, ValueError)):
        g.vm.apply(events)
    assert g.vm.stats() == before


def test_hostile_event_values_never_crash():
    """Random op codes, gfns and page counts over the whole u64 range: every status is 0
    or a negative errno, and the model stays consistent."""
    rng = np.random.default_rng(11)
    host, g = _guest(strategy="inplace", pages=1024)
    ev = np.zeros(5000, gmem.EVENT_DTYPE)
    ev["op"] = rng.integers(0, 256, 5000)
    gfns = np.array([0, 5, 1023, 1024, 2**52 - 1, 2**63, 2**64 - 1], dtype=np.uint64)
    counts = np.array([0, 1, 16, 2**40, 2**64 - 1], dtype=np.uint64)
    ev["gfn"] = gfns[rng.integers(0, len(gfns), 5000)]
    ev["npages"] = counts[rng.integers(0, len(counts), 5000)]
    ev["value"] = rng.integers(0, 2**63, 5000)
    status = g.vm.apply(ev)
    assert ((status <= 0) | (status == gmem.KVM_EXIT_MMIO)).all()
    g.vm.check()
    host.check()


# --------------------------------------------------------------------------- isolation


@pytest.mark.parametrize(("zero", "leaks"), [("on_use", 0), ("on_free", 0), ("never", 1)])
def test_unzeroed_reuse_across_vms_is_a_violation(zero, leaks):
    """A frame freed by one VM and handed to another without clearing leaks data: the
    reader's `violations` counts it; mainline zero-on-first-use and init_on_free do not."""
    host = gmem.Host(PAGE)  # one frame: the second VM must get the first VM's frame
    a, b = host.create_vm(), host.create_vm()
    b.set_options(zero=zero)
    a.set_options(zero=zero)
    fa, fb = a.create_guest_memfd(PAGE), b.create_guest_memfd(PAGE)
    for vm, f in ((a, fa), (b, fb)):
        vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, PAGE, 0, f, 0)
        vm.set_memory_attributes(0, PAGE, PRIVATE)
    a.guest_write(0, 0x5EC7E7, private=True)
    fa.fallocate(gmem.FALLOC_FL_PUNCH_HOLE | gmem.FALLOC_FL_KEEP_SIZE, 0, PAGE)
    value = b.guest_read(0, private=True)
    assert b.stats()["violations"] == leaks
    assert value == (0x5EC7E7 if leaks else 0)
    b.guest_write(0, 1, private=True)
    b.guest_read(0, private=True)
    assert b.stats()["violations"] == leaks  # its own data now
    host.check()


def test_details_flag_implicit_conversions():
    """With fault_policy="convert" a mismatched access converts the page and goes
    through; its detail row says so (the bit and the exit's gpa/flags)."""
    _, g = _guest(pages=64)
    g.vm.set_options(fault_policy="convert")
    ev = np.zeros(2, gmem.EVENT_DTYPE)
    ev[0] = (gmem.Op.GUEST_WRITE_PRIVATE, 3, 1, 9)
    ev[1] = (gmem.Op.GUEST_READ_PRIVATE, 3, 1, 0)
    status, det = g.vm.apply(ev, details=True)
    assert status.tolist() == [0, 0]
    assert det["fault_gpa"][0] == 3 * PAGE
    flags = int(det["fault_flags"][0])
    assert flags == gmem.DETAIL_IMPLICIT_CONVERSION | gmem.KVM_MEMORY_EXIT_FLAG_PRIVATE
    assert det["fault_flags"][1] == 0
    assert det["value"][1] == 9


def test_event_fields_of_other_integer_types():
    """int64 (or narrower) fields are accepted when every value fits; a negative or too
    large value is a ValueError naming the field, and nothing runs."""
    _, g = _guest(pages=64)
    dt = np.dtype([("op", "i8"), ("gfn", "i8"), ("npages", "i4"), ("value", "u2")])
    ev = np.zeros(2, dt)
    ev["op"] = int(gmem.Op.CONVERT_PRIVATE)
    ev["gfn"] = [1, 2]
    ev["npages"] = 1
    assert g.vm.apply(ev).tolist() == [0, 0]
    before = g.vm.stats()
    ev["gfn"][1] = -1
    with pytest.raises(ValueError, match="gfn"):
        g.vm.apply(ev)
    ev["gfn"][1] = 2
    ev["op"][0] = 256
    with pytest.raises(ValueError, match="op"):
        g.vm.apply(ev)
    assert g.vm.stats() == before


def test_attr_intervals_and_a_whole_tib_of_shared_memory():
    """A 1 TiB (2^28-page) guest can have its shared side in one anonymous mapping, and
    stats report the attribute map's runs."""
    tib = 1 << 40
    host = gmem.Host(16 * MiB)
    vm = host.create_vm()
    fd = vm.create_guest_memfd(tib)
    shared = host.mmap_anonymous(tib)
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, tib, shared.addr, fd, 0)
    assert vm.stats()["attr_intervals"] == 1
    vm.set_memory_attributes(PAGE, PAGE, PRIVATE)
    vm.set_memory_attributes(tib - PAGE, PAGE, PRIVATE)
    # shared, private, shared, private, and shared again beyond the guest
    assert vm.stats()["attr_intervals"] == 5
    vm.guest_write(tib - 2 * PAGE, 1, private=False)
    assert shared.read(tib - 2 * PAGE) == 1
    vm.check()


@pytest.mark.parametrize(
    "kw", [{"fault_policy": "retry"}, {"merge": "later"}, {"zero": "sometimes"}]
)
def test_unknown_option_values_change_nothing(kw):
    _, g = _guest(pages=64)
    g.vm.set_options(fault_policy="convert", merge="deferred", zero="on_free")
    with pytest.raises(ValueError, match=next(iter(kw.values()))):
        g.vm.set_options(**{"fault_policy": "exit", "merge": "eager", "zero": "on_use", **kw})
    # The valid settings given alongside were not applied either: still "convert".
    ev = np.zeros(1, gmem.EVENT_DTYPE)
    ev[0] = (gmem.Op.GUEST_WRITE_PRIVATE, 1, 1, 4)
    assert g.vm.apply(ev).tolist() == [0]
