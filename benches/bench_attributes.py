"""The attribute map against what a user would pick instead, in the same run.

Implementations (``impl``):

* ``gmem`` — `vm.set_memory_attributes` / `vm.apply` / `vm.get_memory_attributes` on a
  ``dual`` VM of `GUEST_PAGES` pages (one guest_memfd memslot over the whole guest);
* ``xa-rust`` — a per-gfn store loop in Rust shaped like the kernel's xarray
  (``gmem_bench_baseline.XaStore``: one root-to-leaf walk per gfn, as mainline
  ``KVM_SET_MEMORY_ATTRIBUTES`` does);
* ``numpy`` — a dense ``uint8`` array, one byte per gfn (slice assignment, scatter,
  scalar indexing);
* ``refmodel`` — the pure-Python reference model of ``tests/refmodel.py`` (sorted interval
  list; skipped where one call would take seconds).

Fragmented maps hold ``intervals`` runs spread over the whole guest, made by one
`vm.apply` batch of 1-page conversions (`benchutil.fragment`).
"""

from __future__ import annotations

import numpy as np
import pytest

import gmem
from benchutil import (
    GUEST_PAGES,
    INTERVALS,
    PAGE,
    PRIVATE,
    RANGES,
    Toggle,
    baseline_module,
    count,
    events,
    fragment_gfns,
    guest,
    random_gfns,
    refmodel_module,
    rounds,
    size,
)

IMPLS = ("gmem", "xa-rust", "numpy", "refmodel")
PAGES = size(GUEST_PAGES)
#: The refmodel rebuilds its interval list on every call: O(intervals) Python per call.
REFMODEL_MAX_INTERVALS = 10**5


def _range(label: str) -> tuple[int, int]:
    """``[start, end)`` of a conversion of ``label`` pages: 1 page and 2 MiB in the middle
    of the guest, 1 GiB and 64 GiB from gfn 0."""
    n = min(RANGES[label], PAGES)
    start = PAGES // 2 + 2 if n == 1 else (PAGES // 2 if n < PAGES // 2 else 0)
    return start, start + n


class Impl:
    """One implementation of a gfn -> attribute map: `set(start, end, value)`,
    `get(gfn)`, `set_points(gfns, value)`."""

    def __init__(self, name: str, pages: int, frag: np.ndarray | None):
        self.name = name
        self.frag = frag
        if name == "gmem":
            self.host, g = guest(pages)
            self.vm = g.vm
            if frag is not None:
                assert not self.vm.apply(events(gmem.Op.CONVERT_PRIVATE, frag)).any()
        elif name == "xa-rust":
            self.xa = baseline_module().XaStore(pages)
            if frag is not None:
                self.xa.set_points(frag, PRIVATE)
        elif name == "numpy":
            self.a = np.zeros(pages, np.uint8)
            if frag is not None:
                self.a[frag] = PRIVATE
        else:
            ref = refmodel_module()
            self.host = ref.Host(64 << 20)
            self.vm = self.host.create_vm("sw_protected", "dual")
            if frag is not None:
                self.vm.attrs.iv = [(int(g), int(g) + 1, PRIVATE) for g in frag]

    def set(self, start: int, end: int, value: int) -> None:
        if self.name in ("gmem", "refmodel"):
            self.vm.set_memory_attributes(start * PAGE, (end - start) * PAGE, value)
        elif self.name == "xa-rust":
            self.xa.set_range(start, end, value)
        else:
            self.a[start:end] = value

    def restore(self, start: int, end: int) -> None:
        """Put ``[start, end)`` back as it was before any conversion (shared, with the
        fragmenting private pages)."""
        self.set(start, end, 0)
        if self.frag is None:
            return
        inside = self.frag[(self.frag >= start) & (self.frag < end)]
        if inside.size == 0:
            return
        if self.name == "gmem":
            self.vm.apply(events(gmem.Op.CONVERT_PRIVATE, inside))
        elif self.name == "xa-rust":
            self.xa.set_points(inside, PRIVATE)
        elif self.name == "numpy":
            self.a[inside] = PRIVATE
        else:
            # The model's list is sorted and disjoint: re-insert the runs in one go.
            keep = [r for r in self.vm.attrs.iv if r[1] <= start or r[0] >= end]
            keep += [(int(g), int(g) + 1, PRIVATE) for g in inside]
            keep.sort()
            self.vm.attrs.iv = keep

    def get(self, gfn: int):
        if self.name in ("gmem", "refmodel"):
            return self.vm.get_memory_attributes
        if self.name == "xa-rust":
            return self.xa.get
        return self.a.__getitem__

    def intervals(self) -> int | None:
        if self.name == "refmodel":
            return len(self.vm.attrs.iv) * 2 + 1
        return None


def _frag(intervals: int | None) -> np.ndarray | None:
    return None if intervals is None else fragment_gfns(PAGES, count(intervals, 64))


def _skip_slow(impl: str, intervals: int | None) -> None:
    if impl == "refmodel" and intervals and intervals > REFMODEL_MAX_INTERVALS:
        pytest.skip("refmodel: O(intervals) Python per call, seconds at 10^6 intervals")


@pytest.mark.benchmark(group="attr-range-uniform")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("span", list(RANGES))
def test_range_uniform(benchmark, impl, span):
    """Convert a range of ``span`` on a uniform map, toggling private/shared."""
    im = Impl(impl, PAGES, None)
    start, end = _range(span)
    benchmark.extra_info.update(pages=end - start, guest_pages=PAGES, intervals=1, ops=1)
    benchmark(Toggle(lambda: im.set(start, end, PRIVATE), lambda: im.set(start, end, 0)))


@pytest.mark.benchmark(group="attr-range-fragmented")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("intervals", INTERVALS)
@pytest.mark.parametrize("span", list(RANGES))
def test_range_fragmented(benchmark, impl, intervals, span):
    """Convert a range of ``span`` to private on a map of ``intervals`` runs; every round
    starts from the fragmented state (restored untimed)."""
    _skip_slow(impl, intervals)
    frag = _frag(intervals)
    im = Impl(impl, PAGES, frag)
    start, end = _range(span)
    inside = int(((frag >= start) & (frag < end)).sum())
    benchmark.extra_info.update(
        pages=end - start, guest_pages=PAGES, intervals=intervals, touched=2 * inside + 1, ops=1
    )
    if end - start == 1 and impl != "refmodel":
        # One shared page between two fragmenting pages: toggling keeps the map as it is.
        benchmark(Toggle(lambda: im.set(start, end, PRIVATE), lambda: im.set(start, end, 0)))
        return
    heavy = end - start >= (1 << 18)
    benchmark.pedantic(
        im.set,
        args=(start, end, PRIVATE),
        setup=lambda: im.restore(start, end),
        rounds=rounds(5 if heavy or impl == "refmodel" else 50),
        iterations=1,
    )


@pytest.mark.benchmark(group="attr-random-convert")
@pytest.mark.parametrize("impl", ["gmem", "xa-rust", "numpy"])
@pytest.mark.parametrize("intervals", [10**5, 10**6])
def test_random_single_page(benchmark, impl, intervals):
    """Convert a batch of random single pages (10^5; ``gmem``: one `vm.apply` batch) on a
    map of ``intervals`` runs, toggling private/shared. Cost per page: divide by ``ops``.
    The refmodel is left out: 10^5 calls of O(intervals) Python each."""
    frag = _frag(intervals)
    im = Impl(impl, PAGES, frag)
    gfns = random_gfns(PAGES, count(10**5))
    gfns = gfns[np.isin(gfns, frag, invert=True)]
    benchmark.extra_info.update(guest_pages=PAGES, intervals=intervals, ops=int(gfns.size))
    if impl == "gmem":
        to_p = events(gmem.Op.CONVERT_PRIVATE, gfns)
        to_s = events(gmem.Op.CONVERT_SHARED, gfns)
        fwd, back = (lambda: im.vm.apply(to_p)), (lambda: im.vm.apply(to_s))
    elif impl == "xa-rust":
        fwd, back = (lambda: im.xa.set_points(gfns, PRIVATE)), (lambda: im.xa.set_points(gfns, 0))
    else:

        def fwd():
            im.a[gfns] = PRIVATE

        def back():
            im.a[gfns] = 0

    benchmark.pedantic(Toggle(fwd, back), rounds=rounds(10), iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="attr-lookup")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("intervals", [1, *INTERVALS])
def test_point_lookup(benchmark, impl, intervals):
    """One point lookup from Python (``vm.get_memory_attributes``) on a map of
    ``intervals`` runs (1: uniform)."""
    _skip_slow(impl, intervals if intervals > 1 else None)
    frag = _frag(intervals) if intervals > 1 else None
    im = Impl(impl, PAGES, frag)
    gfn = int(frag[len(frag) // 2]) if frag is not None else PAGES // 2
    benchmark.extra_info.update(guest_pages=PAGES, intervals=intervals, ops=1)
    fn = im.get(gfn)
    value = benchmark(fn, gfn)
    assert int(value) == (PRIVATE if frag is not None else 0)
