"""vm.apply over numpy event batches: statuses, details, equivalence with the per-call
API (and with the reference model), and robustness against bad arrays."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gmem
import refmodel
from util import PAGE, Guest

MiB = 1 << 20
SLOT_PAGES = 32  # gfns [0, 32) are backed (guest_memfd at offset 0 + anonymous memory)
GFN_LIMIT = 40  # gfns [32, 40) have no memslot

Op = gmem.Op
BACKED_OPS = ["PUNCH_HOLE", "ALLOCATE", "DISCARD_SHARED", "PIN", "UNPIN", "HOST_READ", "HOST_WRITE"]
GUEST_OPS = [
    "CONVERT_PRIVATE",
    "CONVERT_SHARED",
    "GUEST_READ_PRIVATE",
    "GUEST_READ_SHARED",
    "GUEST_WRITE_PRIVATE",
    "GUEST_WRITE_SHARED",
]
READ_OPS = {"GUEST_READ_PRIVATE", "GUEST_READ_SHARED", "HOST_READ"}
COMPARED = ("pages_allocated", "double_backed_pages", "allocations", "frees")


def batch(*rows):
    ev = np.zeros(len(rows), dtype=gmem.EVENT_DTYPE)
    for i, (op, gfn, npages, value) in enumerate(rows):
        ev[i] = (int(getattr(Op, op)), gfn, npages, value)
    return ev


def setup(api=gmem):
    host = api.Host(32 * MiB)
    vm = host.create_vm("sw_protected", "dual")
    return Guest(api, host, vm, npages=SLOT_PAGES)


def per_call(api, g, op, gfn, npages, value):
    """The per-call equivalent of one event: (status, last value read, fault gpa, flags)."""
    vm, priv = g.vm, api.KVM_MEMORY_ATTRIBUTE_PRIVATE
    last, fault = 0, (0, 0)
    try:
        if op in ("CONVERT_PRIVATE", "CONVERT_SHARED"):
            attrs = priv if op == "CONVERT_PRIVATE" else 0
            vm.set_memory_attributes(gfn * PAGE, npages * PAGE, attrs)
        elif op == "PUNCH_HOLE":
            g.gmem.fallocate(
                api.FALLOC_FL_PUNCH_HOLE | api.FALLOC_FL_KEEP_SIZE, gfn * PAGE, npages * PAGE
            )
        elif op == "ALLOCATE":
            g.gmem.fallocate(api.FALLOC_FL_KEEP_SIZE, gfn * PAGE, npages * PAGE)
        elif op == "DISCARD_SHARED":
            g.mem.discard(gfn * PAGE, npages * PAGE)
        else:
            for p in range(gfn, gfn + npages):
                if op == "GUEST_READ_PRIVATE":
                    last = vm.guest_read(p * PAGE, private=True)
                elif op == "GUEST_READ_SHARED":
                    last = vm.guest_read(p * PAGE, private=False)
                elif op == "GUEST_WRITE_PRIVATE":
                    vm.guest_write(p * PAGE, value, private=True)
                elif op == "GUEST_WRITE_SHARED":
                    vm.guest_write(p * PAGE, value, private=False)
                elif op == "HOST_READ":
                    last = g.mem.read(p * PAGE)
                elif op == "HOST_WRITE":
                    g.mem.write(p * PAGE, value)
                elif op == "PIN":
                    g.mem.pin(p * PAGE)
                elif op == "UNPIN":
                    g.mem.unpin(p * PAGE)
                else:
                    raise AssertionError(op)
    except api.MemoryFault as e:
        return -e.errno, last, (e.gpa, e.flags)
    except api.MmioExit as e:
        return gmem.KVM_EXIT_MMIO, last, (e.phys_addr, 0)
    except OSError as e:
        return -e.errno, last, fault
    return 0, last, fault


def event_strategy():
    backed = st.tuples(
        st.sampled_from(BACKED_OPS), st.integers(0, SLOT_PAGES - 1), st.integers(1, 8)
    ).filter(lambda t: t[1] + t[2] <= SLOT_PAGES)
    guest = st.tuples(st.sampled_from(GUEST_OPS), st.integers(0, GFN_LIMIT - 1), st.integers(1, 8))
    return st.tuples(st.one_of(backed, guest), st.integers(0, (1 << 64) - 1)).map(
        lambda t: (*t[0], t[1])
    )


# --------------------------------------------------------------------------- basics


def test_dtypes_and_ops_exist():
    assert list(np.dtype(gmem.EVENT_DTYPE).names) == ["op", "gfn", "npages", "value"]
    dt = np.dtype(gmem.EVENT_DTYPE)
    assert dt["op"] == np.uint8
    assert dt["gfn"] == np.uint64
    assert dt["npages"] == np.uint64
    assert dt["value"] == np.uint64
    dd = np.dtype(gmem.DETAIL_DTYPE)
    for field in ("value", "fault_gpa", "fault_flags", "allocated", "freed"):
        assert field in dd.names
    for name in BACKED_OPS + GUEST_OPS:
        assert 0 <= int(getattr(Op, name)) < 256
    assert len({int(getattr(Op, n)) for n in BACKED_OPS + GUEST_OPS}) == 13


def test_empty_batch():
    g = setup()
    out = g.vm.apply(np.zeros(0, dtype=gmem.EVENT_DTYPE))
    assert out.dtype == np.int32
    assert out.shape == (0,)


def test_statuses():
    g = setup()
    ev = batch(
        ("GUEST_WRITE_SHARED", 0, 4, 7),  # 0
        ("GUEST_READ_SHARED", 0, 4, 0),  # 1
        ("CONVERT_PRIVATE", 0, 2, 0),  # 2
        ("GUEST_READ_SHARED", 1, 1, 0),  # 3: mismatch -> memory fault
        ("GUEST_READ_PRIVATE", 0, 2, 0),  # 4: new guest_memfd pages read 0
        ("GUEST_WRITE_PRIVATE", 0, 2, 9),  # 5
        ("HOST_READ", 0, 1, 0),  # 6: the shared side still holds 7
        ("GUEST_READ_SHARED", 35, 1, 0),  # 7: no memslot
        ("CONVERT_SHARED", 0, 0, 0),  # 8: size 0
        ("UNPIN", 5, 1, 0),  # 9: not pinned
        ("PUNCH_HOLE", 0, 2, 0),  # 10
        ("GUEST_READ_PRIVATE", 1, 1, 0),  # 11: zeroed again
        ("DISCARD_SHARED", 0, 4, 0),  # 12
        ("HOST_READ", 2, 1, 0),  # 13: discarded -> 0
        ("GUEST_READ_PRIVATE", 2, 3, 0),  # 14: gfn 2 is shared -> fault on the first page
        ("GUEST_WRITE_PRIVATE", 30, 4, 1),  # 15: private access to a shared gfn
        ("CONVERT_PRIVATE", (1 << 52) - 1, 2, 0),  # 16: the range wraps
    )
    status, det = g.vm.apply(ev, details=True)
    assert status.dtype == np.int32
    assert det.dtype == np.dtype(gmem.DETAIL_DTYPE)
    expected = [
        0,
        0,
        0,
        -errno.EFAULT,
        0,
        0,
        0,
        gmem.KVM_EXIT_MMIO,  # no memslot: emulated MMIO, a positive exit reason
        -errno.EINVAL,
        -errno.EINVAL,
        0,
        0,
        0,
        0,
        -errno.EFAULT,
        -errno.EFAULT,
        -errno.EINVAL,
    ]
    assert status.tolist() == expected
    assert det["value"][1] == 7
    assert det["value"][4] == 0
    assert det["value"][6] == 7
    assert det["value"][11] == 0
    assert det["value"][13] == 0
    assert det["fault_gpa"][3] == PAGE
    assert det["fault_flags"][3] == 0
    assert det["fault_gpa"][14] == 2 * PAGE
    assert det["fault_flags"][14] == gmem.KVM_MEMORY_EXIT_FLAG_PRIVATE
    assert det["fault_gpa"][15] == 30 * PAGE
    assert det["fault_flags"][15] == gmem.KVM_MEMORY_EXIT_FLAG_PRIVATE
    assert det["allocated"][0] == 4
    assert det["allocated"][4] == 2
    assert det["freed"][10] == 2
    assert det["freed"][12] == 4
    g.vm.check()


def test_plain_apply_returns_status_only():
    g = setup()
    out = g.vm.apply(batch(("GUEST_WRITE_SHARED", 0, 1, 1), ("GUEST_READ_PRIVATE", 0, 1, 0)))
    assert isinstance(out, np.ndarray)
    assert out.tolist() == [0, -errno.EFAULT]


def test_conversion_event_is_all_or_nothing():
    g = setup()
    out = g.vm.apply(batch(("CONVERT_PRIVATE", (1 << 52) - 4, 8, 0)))
    assert out.tolist() == [-errno.EINVAL]
    assert g.vm.get_memory_attributes((1 << 52) - 4) == 0


def test_non_contiguous_input():
    ev = batch(*[("GUEST_WRITE_SHARED", i, 1, i + 1) for i in range(8)])
    a, b = setup(), setup()
    assert a.vm.apply(ev[::2]).tolist() == b.vm.apply(np.ascontiguousarray(ev[::2])).tolist()
    assert [a.host_read(i) for i in range(8)] == [b.host_read(i) for i in range(8)]
    assert a.host_read(2) == 3
    assert a.host_read(1) == 0


@pytest.mark.parametrize("details", [True, False])
@pytest.mark.parametrize("gap", range(0, 40))
def test_mapping_changed_between_events_is_seen(gap, details):
    """`apply` looks events up ahead of time; a mapping that changes in between (here a
    conversion zapping the page that a later event reads) must be seen by the later event,
    whatever the distance (up to beyond twice the look-ahead). Each batch is checked
    against the same events one call at a time, with and without details (without them,
    accesses to mapped pages take a shorter path)."""
    g0, filler = 3, 9
    rows = [("CONVERT_PRIVATE", 0, SLOT_PAGES, 0), ("GUEST_WRITE_PRIVATE", g0, 1, 7)]
    rows += [("GUEST_WRITE_PRIVATE", filler, 1, 1)] * 2
    rows += [("GUEST_READ_PRIVATE", filler, 1, 0)] * 12
    rows += [("CONVERT_SHARED", g0, 1, 0)]
    rows += [("GUEST_READ_PRIVATE", filler, 1, 0)] * gap
    stale = len(rows)
    rows += [("GUEST_READ_PRIVATE", g0, 1, 0), ("GUEST_READ_SHARED", g0, 1, 0)]
    rows += [("CONVERT_PRIVATE", g0, 1, 0)] + [("GUEST_READ_PRIVATE", filler, 1, 0)] * gap
    rows += [("GUEST_READ_PRIVATE", g0, 1, 0)]
    a, b = setup(), setup()
    if details:
        status, det = a.vm.apply(batch(*rows), details=True)
    else:
        status, det = a.vm.apply(batch(*rows)), None
    for i, row in enumerate(rows):
        sb, last, _ = per_call(gmem, b, *row)
        assert status[i] == sb, (i, row)
        if det is not None and row[0] in READ_OPS and sb == 0:
            assert det["value"][i] == last, (i, row)
    # The read right after the conversion to shared is a memory fault, not a stale hit.
    assert status[stale] == -errno.EFAULT
    a.vm.check()


@given(st.lists(event_strategy(), max_size=40))
def test_in_place_and_column_paths_agree(events):
    """An EVENT_DTYPE array in one piece is read in place; any other layout (here the
    same fields, aligned) column by column. Both must give the same statuses, details
    and end state."""
    packed = batch(*events)
    aligned_dtype = np.dtype(
        [(n, packed.dtype.fields[n][0]) for n in packed.dtype.names], align=True
    )
    assert aligned_dtype != packed.dtype
    aligned = np.zeros(packed.size, aligned_dtype)
    for n in packed.dtype.names:
        aligned[n] = packed[n]
    a, b = setup(), setup()
    sa, da = a.vm.apply(packed, details=True)
    sb, db = b.vm.apply(aligned, details=True)
    assert sa.tolist() == sb.tolist()
    assert da.tolist() == db.tolist()
    assert a.vm.stats() == b.vm.stats()
    for p in range(SLOT_PAGES):
        assert a.host_read(p) == b.host_read(p)


@given(st.lists(event_strategy(), max_size=60))
def test_plain_and_detailed_apply_agree(events):
    """Without details, guest accesses to mapped pages take a shorter path, counted apart
    and added to the VM's event count at the end, and only failing events get a status
    written. With details every event runs the generic path. Both must give the same
    statuses, stats (the event count included) and end state, whatever the mix."""
    rows = [("CONVERT_PRIVATE", 0, SLOT_PAGES // 2, 0), *events]
    # Then every page read twice (the second read of a page mapped by the first is a hit)
    # and written once.
    rows += [("GUEST_READ_PRIVATE", p, 1, 0) for p in range(SLOT_PAGES)] * 2
    rows += [("GUEST_WRITE_PRIVATE", p, 1, p + 100) for p in range(SLOT_PAGES)]
    a, b = setup(), setup()
    plain = a.vm.apply(batch(*rows))
    detailed, _ = b.vm.apply(batch(*rows), details=True)
    assert plain.tolist() == detailed.tolist()
    assert a.vm.stats() == b.vm.stats()
    assert a.vm.stats()["events"] == len(rows)
    for p in range(SLOT_PAGES):
        assert a.host_read(p) == b.host_read(p)
    a.vm.check()


# --------------------------------------------------------------------------- equivalence


def _run_equivalence(events):
    a = setup()
    b = setup()
    m = setup(refmodel)
    status, det = a.vm.apply(batch(*events), details=True)
    for i, (op, gfn, npages, value) in enumerate(events):
        before = b.vm.stats()
        sb, last_b, fault_b = per_call(gmem, b, op, gfn, npages, value)
        after = b.vm.stats()
        sm, last_m, fault_m = per_call(refmodel, m, op, gfn, npages, value)
        ctx = f"event {i} {(op, gfn, npages, value)}"
        assert status[i] == sb, ctx
        assert sb == sm, ctx + " (gmem per-call vs reference model)"
        if op in READ_OPS:
            assert last_b == last_m, ctx
            if sb == 0:
                assert det["value"][i] == last_b, ctx
        if fault_b != (0, 0):
            assert (det["fault_gpa"][i], det["fault_flags"][i]) == fault_b, ctx
        assert fault_b == fault_m, ctx
        assert det["allocated"][i] == after["allocations"] - before["allocations"], ctx
        assert det["freed"][i] == after["frees"] - before["frees"], ctx
    sa, sb, sm = a.vm.stats(), b.vm.stats(), m.vm.stats()
    for k in COMPARED:
        assert sa[k] == sb[k] == sm[k], k
    for gfn in range(GFN_LIMIT):
        assert a.vm.get_memory_attributes(gfn) == b.vm.get_memory_attributes(gfn)
        assert b.vm.get_memory_attributes(gfn) == m.vm.get_memory_attributes(gfn)
    for p in range(SLOT_PAGES):
        assert a.host_read(p) == b.host_read(p) == m.host_read(p)
    a.vm.check()
    b.vm.check()


@given(st.lists(event_strategy(), max_size=40))
def test_apply_equals_per_call(events):
    _run_equivalence(events)


def test_apply_equals_per_call_fixed():
    events = [
        ("GUEST_WRITE_SHARED", 0, 8, 1),
        ("CONVERT_PRIVATE", 2, 4, 0),
        ("GUEST_WRITE_PRIVATE", 2, 4, 5),
        ("PIN", 2, 2, 0),
        ("DISCARD_SHARED", 0, 8, 0),
        ("HOST_READ", 2, 2, 0),
        ("HOST_READ", 4, 2, 0),
        ("UNPIN", 2, 3, 0),
        ("PUNCH_HOLE", 3, 1, 0),
        ("ALLOCATE", 0, 16, 0),
        ("GUEST_READ_PRIVATE", 2, 4, 0),
        ("CONVERT_SHARED", 0, 40, 0),
        ("GUEST_READ_SHARED", 0, 40, 0),
        ("HOST_WRITE", 30, 2, 9),
        ("GUEST_READ_SHARED", 31, 1, 0),
    ]
    _run_equivalence(events)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros(4, dtype=np.float64),
        np.zeros(4, dtype=np.uint64),
        np.zeros(4, dtype=[("op", "u1"), ("gfn", "u8"), ("npages", "u8")]),
        np.zeros(4, dtype=[("a", "u1"), ("b", "u8"), ("c", "u8"), ("d", "u8")]),
        np.zeros(4, dtype=[("op", "u1"), ("gfn", "f8"), ("npages", "u8"), ("value", "u8")]),
    ],
    ids=["float", "uint64", "missing-field", "renamed", "float-gfn"],
)
def test_wrong_dtype(arr):
    g = setup()
    with pytest.raises((TypeError, ValueError)):
        g.vm.apply(arr)
    g.vm.check()


def test_not_an_array():
    g = setup()
    with pytest.raises((TypeError, ValueError)):
        g.vm.apply("GUEST_READ_SHARED 0 1")
    with pytest.raises((TypeError, ValueError)):
        g.vm.apply(None)


HUGE = [(1 << 52), (1 << 63), (1 << 64) - 1]


@pytest.mark.parametrize("op", BACKED_OPS + GUEST_OPS)
@pytest.mark.parametrize("npages", HUGE, ids=["2^52", "2^63", "2^64-1"])
@pytest.mark.parametrize("gfn", [0, (1 << 52) - 1, (1 << 64) - 1], ids=["0", "2^52-1", "max"])
def test_huge_npages_is_an_error_not_a_crash(op, npages, gfn):
    g = setup()
    try:
        status = g.vm.apply(batch((op, gfn, npages, 1)))
    except (OSError, ValueError, OverflowError):
        pass
    else:
        assert status[0] <= 0
        if op.startswith("CONVERT"):
            # address + size does not fit in u64: EINVAL, never a partial conversion.
            assert status[0] == -errno.EINVAL
        if op.startswith("GUEST"):
            # Fails on the first page that has no memslot (or wraps).
            assert status[0] < 0
    g.vm.check()
    g.host.check()
    assert g.vm.stats()["pages_allocated"] <= g.host.stats()["total_pages"]


def test_unknown_op():
    g = setup()
    known = {int(getattr(Op, n)) for n in BACKED_OPS + GUEST_OPS}
    bad = next(i for i in range(255, 0, -1) if i not in known)
    ev = np.zeros(1, dtype=gmem.EVENT_DTYPE)
    ev[0] = (bad, 0, 1, 0)
    try:
        status = g.vm.apply(ev)
    except ValueError:
        return
    assert status.tolist() == [-errno.EINVAL]
