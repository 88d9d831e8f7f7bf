"""Workloads: statistical shape, bounds, streaming and determinism under a seed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gmem import EVENT_DTYPE, Op, workloads
from gmem.workloads import WORKLOADS, chunked, make_events, make_workload, swiotlb_pages

PAGES = 1 << 16
SMALL = {
    "boot": {},
    "swiotlb": {"ios": 5000},
    "dma-churn": {"rounds": 200},
    "hugepage-frag": {},
    "random": {"ops": 20000},
}


def ops_of(ev, op):
    return ev[ev["op"] == op]


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_shape_bounds_and_chunks(name):
    stream = make_workload(name, PAGES, seed=3, chunk=1000, **SMALL[name])
    total = 0
    for batch in stream:
        assert batch.dtype == EVENT_DTYPE
        assert 0 < len(batch) <= 1000
        assert (batch["npages"] >= 1).all()
        assert (batch["gfn"] + batch["npages"] <= PAGES).all()
        assert (batch["op"] < len(Op)).all()
        total += len(batch)
    ev = stream.to_array()
    assert len(ev) == total
    # every workload sets up through events: QEMU makes all guest RAM private first
    assert ev[0]["op"] == Op.CONVERT_PRIVATE
    assert (ev[0]["gfn"], ev[0]["npages"]) == (0, PAGES)
    if name in ("boot", "swiotlb", "hugepage-frag", "random"):
        assert stream.total_events == total


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_deterministic_under_seed(name):
    a = make_events(name, PAGES, seed=11, **SMALL[name])
    b = make_events(name, PAGES, seed=11, **SMALL[name])
    c = make_events(name, PAGES, seed=12, **SMALL[name])
    assert np.array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)
    # a stream is re-iterable and yields the same events each time
    s = make_workload(name, PAGES, seed=11, **SMALL[name])
    assert np.array_equal(s.to_array(), s.to_array())


def test_chunk_size_does_not_change_events():
    a = make_workload("dma-churn", PAGES, seed=1, chunk=777, rounds=50).to_array()
    b = make_workload("dma-churn", PAGES, seed=1, chunk=1 << 16, rounds=50).to_array()
    assert np.array_equal(a, b)


@given(
    sizes=st.lists(st.integers(0, 50), max_size=20),
    chunk=st.integers(1, 30),
)
def test_chunked_recuts_exactly(sizes, chunk):
    pieces = [workloads.events(Op.PIN, np.arange(n), 1) for n in sizes]
    out = list(chunked(pieces, chunk))
    assert all(len(o) == chunk for o in out[:-1])
    assert not out or 0 < len(out[-1]) <= chunk
    joined = np.concatenate(out) if out else np.empty(0, EVENT_DTYPE)
    expect = np.concatenate(pieces) if pieces else np.empty(0, EVENT_DTYPE)
    assert np.array_equal(joined, expect)


def test_swiotlb_sizing_follows_linux():
    mib = 256  # pages per MiB
    # 6% of memory, clamped to [64 MiB, 1 GiB] (mem_encrypt_setup_arch)
    assert swiotlb_pages(8 * 1024 * mib) == 8 * 1024 * mib * 6 // 100
    assert swiotlb_pages(1024 * mib) == 64 * mib  # 6% = 61 MiB -> 64 MiB floor
    assert swiotlb_pages(1 << 28) == 1024 * mib  # 1 TiB -> capped at 1 GiB
    assert swiotlb_pages(64 * mib) == 16 * mib  # toy guest: a quarter of it


def test_boot_lazy_accept_then_swiotlb_shared():
    pages = 1 << 21
    ev = make_events("boot", pages, seed=0)
    touch = ev[1:-1]
    assert np.isin(touch["op"], [Op.GUEST_WRITE_PRIVATE, Op.GUEST_READ_PRIVATE]).all()
    assert (touch["npages"] == 512).all()  # 2 MiB accept units
    assert np.array_equal(touch["gfn"], np.arange(len(touch)) * 512)  # in address order
    assert touch["npages"].sum() == pages
    reads = (touch["op"] == Op.GUEST_READ_PRIVATE).mean()
    assert 0.05 < reads < 0.15
    last = ev[-1]
    assert last["op"] == Op.CONVERT_SHARED
    assert last["npages"] == swiotlb_pages(pages)
    assert last["gfn"] % 512 == 0
    assert last["gfn"] + last["npages"] <= 1 << 20  # low memory, below 4 GiB


def test_boot_partial_touch():
    ev = make_events("boot", 4096, touch=0.25, unit=100)
    touched = ev[1:-1]
    assert touched["npages"].sum() == 1024
    assert touched["npages"].max() == 100


def test_boot_of_a_1tib_guest_streams_in_bounded_chunks():
    stream = workloads.boot(1 << 28, chunk=1 << 15)
    n = 0
    for batch in stream:
        assert len(batch) <= 1 << 15
        n += len(batch)
    assert n == (1 << 28) // 512 + 2


def test_swiotlb_traffic_stays_in_the_pool():
    pages = 1 << 18
    ev = make_events("swiotlb", pages, seed=2, ios=20000)
    pool = ev[1]
    assert pool["op"] == Op.CONVERT_SHARED
    lo, hi = int(pool["gfn"]), int(pool["gfn"] + pool["npages"])
    body = ev[2:]
    assert not np.isin(body["op"], [Op.CONVERT_PRIVATE, Op.CONVERT_SHARED]).any()
    shared = body[np.isin(body["op"], [Op.GUEST_WRITE_SHARED, Op.GUEST_READ_SHARED])]
    host = body[np.isin(body["op"], [Op.HOST_READ, Op.HOST_WRITE])]
    for part in (shared, host):
        assert (part["gfn"] >= lo).all()
        assert (part["gfn"] + part["npages"] <= hi).all()
    private = body[np.isin(body["op"], [Op.GUEST_WRITE_PRIVATE, Op.GUEST_READ_PRIVATE])]
    inside = (private["gfn"] + private["npages"] > lo) & (private["gfn"] < hi)
    assert not inside.any()
    sizes = shared["npages"]
    assert set(np.unique(sizes)) <= {1, 2, 4, 8, 16, 32, 64}  # <= IO_TLB_SEGSIZE slots
    assert 0.45 < (sizes == 1).mean() < 0.55
    tx = (body["op"] == Op.GUEST_WRITE_SHARED).sum() / 20000
    assert 0.45 < tx < 0.55


def test_dma_churn_sizes_alignment_and_locality():
    ev = make_events("dma-churn", 1 << 20, seed=5, rounds=400, pin=0.0)
    shared = ops_of(ev, Op.CONVERT_SHARED)
    private = ops_of(ev, Op.CONVERT_PRIVATE)[1:]  # after the setup conversion
    assert len(shared) == 400 * 64
    assert len(private) == len(shared)  # every buffer is freed again
    sizes = shared["npages"]
    assert set(np.unique(sizes)) == {1, 2, 4, 8, 16}
    freq = np.array([(sizes == s).mean() for s in (1, 2, 4, 8, 16)])
    assert np.allclose(freq, [0.40, 0.25, 0.15, 0.12, 0.08], atol=0.02)
    assert (shared["gfn"] % sizes == 0).all()  # buddy alignment
    # the multiset of freed buffers is the multiset of allocated ones
    key = lambda e: sorted(zip(e["gfn"].tolist(), e["npages"].tolist(), strict=True))  # noqa: E731
    assert key(shared) == key(private)
    # locality: buffers come back to few places (reuse of the page just freed)
    assert len(np.unique(shared["gfn"])) < 0.5 * len(shared)
    assert not np.isin(ev["op"], [Op.PIN, Op.UNPIN]).any()


def test_dma_churn_pins_are_balanced_and_late():
    ev = make_events("dma-churn", 1 << 18, seed=1, rounds=300, pin=0.1)
    pins, unpins = ops_of(ev, Op.PIN), ops_of(ev, Op.UNPIN)
    assert 0.07 < len(pins) / (300 * 64) < 0.13
    key = lambda e: sorted(zip(e["gfn"].tolist(), e["npages"].tolist(), strict=True))  # noqa: E731
    assert key(pins) == key(unpins)
    # the unpin comes right after the conversion back to private (late completion)
    at = np.flatnonzero(ev["op"] == Op.UNPIN)
    at = at[at < np.flatnonzero(ev["op"] == Op.CONVERT_SHARED).max()]  # not the final frees
    assert len(at)
    before = ev[at - 1]
    assert (before["op"] == Op.CONVERT_PRIVATE).all()
    assert np.array_equal(before["gfn"], ev[at]["gfn"])


@pytest.mark.parametrize(("granule", "gsize"), [("2m", 512), ("1g", 512 * 512)])
def test_hugepage_frag_scatters_then_recovers(granule, gsize):
    pages = 1 << 20
    ev = make_events("hugepage-frag", pages, seed=4, granule=granule, per_granule=8)
    touch = ev[1 : 1 + (pages // gsize) // 2]
    assert (touch["op"] == Op.GUEST_WRITE_PRIVATE).all()
    assert (touch["npages"] == gsize).all()
    bases = set(touch["gfn"].tolist())
    shared = ops_of(ev, Op.CONVERT_SHARED)
    back = ops_of(ev, Op.CONVERT_PRIVATE)[1:]
    assert len(shared) == len(bases) * 8
    assert (shared["npages"] == 1).all()
    assert {g // gsize * gsize for g in shared["gfn"].tolist()} <= bases
    assert sorted(shared["gfn"].tolist()) == sorted(back["gfn"].tolist())
    # scattered in time: not sorted
    assert not (np.diff(shared["gfn"].astype(np.int64)) >= 0).all()
    # every shared conversion comes before every recovery
    assert (
        np.flatnonzero(ev["op"] == Op.CONVERT_SHARED).max()
        < np.flatnonzero(ev["op"] == Op.CONVERT_PRIVATE)[1:].min()
    )
    if granule == "1g":  # the pages of one 1 GiB range fall in many 2 MiB ranges
        per = shared["gfn"][shared["gfn"] // gsize == shared["gfn"][0] // gsize]
        assert len(np.unique(per // 512)) > 1


def test_hugepage_frag_without_recovery():
    ev = make_events("hugepage-frag", 1 << 14, recover=False)
    assert len(ops_of(ev, Op.CONVERT_PRIVATE)) == 1


def test_random_mix_and_sizes():
    ev = make_events("random", 1 << 20, seed=9, ops=60000, max_npages=32)[1:]
    assert ev["npages"].min() == 1
    assert ev["npages"].max() == 32
    conv = np.isin(ev["op"], [Op.CONVERT_PRIVATE, Op.CONVERT_SHARED]).mean()
    assert abs(conv - 1 / 3) < 0.02
    # uniform start positions: every eighth of the guest gets about its share
    hist = np.bincount((ev["gfn"] * 8 // (1 << 20)).astype(np.int64), minlength=8) / len(ev)
    assert np.allclose(hist, 1 / 8, atol=0.01)


def test_registry_and_errors():
    assert set(WORKLOADS) == {"boot", "swiotlb", "dma-churn", "hugepage-frag", "random"}
    for name, (gen, description) in WORKLOADS.items():
        assert callable(gen), name
        assert description, name
        assert len(gen.__doc__ or "") > 200, name  # documents and cites what it imitates
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.get_workload("nope")
    with pytest.raises(ValueError, match="needs a path"):
        workloads.get_workload("trace:")
    with pytest.raises(ValueError, match="pages must be positive"):
        make_events("random", 0)
    with pytest.raises(ValueError, match="granule"):
        make_events("hugepage-frag", 4096, granule="4m")
    with pytest.raises(ValueError, match="needs a guest size"):
        make_workload("boot", None)
