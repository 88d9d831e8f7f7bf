"""`vm.apply` per event against the memory system's limit, per strategy, and the cost of
the Python binding.

* ``apply-vs-numpy``: random single-page conversion of mapped private pages (attributes
  + stage-2 zap + the strategy's backing work) and random private guest reads of mapped
  pages, against numpy's scatter ``a[idx] = v`` and gather ``a[idx]`` over a ``uint64``
  table of one entry per page, for the same random pages, at `GUEST_PAGES` pages with
  10^5 and about 10^6 intervals present.
* ``apply-strategy``: every strategy x (convert, guest read, guest write), ns per event,
  over random pages of a populated working set.
* ``python-overhead``: one `vm.set_memory_attributes` call against the same call made in
  Rust, and `vm.apply` in batches of 1 … 10^5 events against the same events driven in
  one core call (``gmem_bench_baseline.CoreDriver``).

Every timed round of a conversion starts from mapped private pages (the setup converts
them back and reads them, untimed), so that each round zaps real stage-2 entries.
"""

from __future__ import annotations

import numpy as np
import pytest

import gmem
from benchutil import (
    GUEST_PAGES,
    PAGE,
    PRIVATE,
    Paired,
    Toggle,
    baseline_module,
    count,
    events,
    fragment_gfns,
    guest,
    populate,
    random_gfns,
    rounds,
    size,
)

Op = gmem.Op
PAGES = size(GUEST_PAGES)
BATCH = count(10**5)
#: Working set populated by the per-strategy benchmarks (2^20 pages = 4 GiB).
WORKING_SET = size(1 << 20)


class MappedGuest:
    """A ``strategy`` guest, all private, whose first ``populated`` pages were written by
    the guest (so that they are allocated and mapped in stage-2): in order, 512 pages per
    event (a fresh host hands out consecutive frames, so each 2 MiB of the guest maps a
    run of frames), or with ``scattered`` one page per event in random order (so frames
    follow no pattern and every 2 MiB slot of stage-2 keeps an array of frames)."""

    def __init__(self, strategy: str, pages: int, populated: int, scattered: bool = False):
        self.host, g = guest(pages, strategy)
        self.vm = g.vm
        self.pages = pages
        assert not self.vm.apply(events(Op.CONVERT_PRIVATE, [0], pages)).any()
        if scattered:
            order = np.random.default_rng(2).permutation(populated).astype(np.uint64)
            for part in np.array_split(order, max(1, populated >> 20)):
                ev = events(Op.GUEST_WRITE_PRIVATE, part, 1, part + np.uint64(1))
                assert not self.vm.apply(ev).any(), "populating writes failed"
        else:
            populate(self.vm, 0, populated)
        self.shared: np.ndarray = np.zeros(0, np.uint64)

    def fragment(self, intervals: int) -> None:
        """Convert pages spread over the guest to shared until about ``intervals`` runs
        exist (cumulative: earlier fragmenting pages stay shared)."""
        gfns = fragment_gfns(self.pages, count(intervals, 64))
        assert not self.vm.apply(events(Op.CONVERT_SHARED, gfns)).any()
        self.shared = np.union1d(self.shared, gfns)

    def targets(self, n: int, within: int, seed: int = 1) -> np.ndarray:
        """``n`` random private pages below ``within`` (none of the fragmenting ones)."""
        g = random_gfns(within, n, seed)
        return g[np.isin(g, self.shared, invert=True)]

    def remap(self, gfns_private: np.ndarray, gfns_read: np.ndarray):
        """A setup that makes ``gfns`` private again and maps them (guest reads)."""
        back = events(Op.CONVERT_PRIVATE, gfns_private)
        read = events(Op.GUEST_READ_PRIVATE, gfns_read)

        def setup():
            self.vm.apply(back)
            assert not self.vm.apply(read).any()

        return setup


_BIG_GUESTS: dict[str, MappedGuest] = {}


@pytest.fixture(scope="module")
def big_guest():
    """The 2^24-page ``dual`` guests of the goal benchmarks, every page populated: by
    frame layout (``runs`` / ``scattered``, see `MappedGuest`), built on first use."""

    def get(frames: str) -> MappedGuest:
        if frames not in _BIG_GUESTS:
            _BIG_GUESTS[frames] = MappedGuest("dual", PAGES, PAGES, frames == "scattered")
        return _BIG_GUESTS[frames]

    yield get
    _BIG_GUESTS.clear()


@pytest.mark.benchmark(group="apply-vs-numpy")
@pytest.mark.parametrize(
    ("frames", "impl"), [("runs", "gmem"), ("runs", "numpy"), ("scattered", "gmem")]
)
@pytest.mark.parametrize("op", ["convert", "read"])
@pytest.mark.parametrize("intervals", [10**5, 10**6])
def test_apply_vs_numpy(benchmark, big_guest, intervals, op, frames, impl):
    """Random single-page conversion (private -> shared, mapped) or private read (mapped)
    of `BATCH` pages: ``gmem`` one `vm.apply` batch, ``numpy`` one scatter / gather over a
    ``uint64`` table of `PAGES` entries. ns per event = median / ``ops``. ``frames``: how
    the guest was populated (`MappedGuest`); numpy's table has no such thing (measured
    once, under ``runs``). Every ``gmem`` round is also paired with numpy's scatter /
    gather of the same pages timed just before it (`Paired`): ``paired_ratio`` is the
    goal's figure, immune to the machine's drift between the two benchmarks."""
    g = big_guest(frames)
    g.fragment(intervals)
    gfns = g.targets(BATCH, PAGES)
    # The runs actually present in the attribute map (``intervals`` is the target).
    present = g.vm.stats()["attr_intervals"]
    assert present >= count(intervals, 64) // 2, f"fragmenting left {present} intervals"
    benchmark.extra_info.update(
        guest_pages=PAGES, intervals=intervals, attr_intervals=present, ops=int(gfns.size)
    )
    table = np.arange(PAGES, dtype=np.uint64)
    values = np.arange(gfns.size, dtype=np.uint64)

    def scatter():
        table[gfns] = values

    def gather():
        return table[gfns]

    numpy_op = scatter if op == "convert" else gather
    if impl == "numpy":
        benchmark.pedantic(numpy_op, rounds=rounds(20), iterations=1, warmup_rounds=2)
        return
    batch = events(Op.CONVERT_SHARED if op == "convert" else Op.GUEST_READ_PRIVATE, gfns)
    # numpy's scatter / gather of the same pages, timed just before every round; then the
    # remap, whose reads of the targets are gmem's untimed pass over its own data.
    _time_paired(benchmark, g, batch, Paired(numpy_op, g.remap(gfns, gfns)), "numpy", present)


def _time_paired(benchmark, g, batch, paired, name: str, present: int) -> None:
    """Time `vm.apply` of ``batch`` on the mapped guest ``g`` (15 rounds, each after
    ``paired``'s baselines and remap), record the baselines under ``name`` and the stage-2
    zaps per event, then leave the targets private and mapped, so that the next case finds
    the guest with the ``present`` intervals it asks for (not 2 more per page this one
    converted)."""
    before = g.vm.stats()
    status = benchmark.pedantic(g.vm.apply, args=(batch,), setup=paired, rounds=rounds(15))
    assert not status.any()
    paired.record(benchmark, name)
    after = g.vm.stats()
    runs = benchmark.stats.stats.rounds if benchmark.stats else 1
    benchmark.extra_info["stage2_zaps_per_event"] = (
        after["stage2_zaps"] - before["stage2_zaps"]
    ) / (runs * len(batch))
    paired.setup()
    assert g.vm.stats()["attr_intervals"] == present, "targets not restored"


@pytest.fixture(scope="module", params=gmem.STRATEGIES)
def design_guest(request):
    """A 2^24-page guest of each strategy, every page populated in order (`MappedGuest`),
    fragmented to 10^5 intervals: the guest of the per-design single-page goal."""
    g = MappedGuest(request.param, PAGES, PAGES)
    g.fragment(10**5)
    return g


@pytest.mark.benchmark(group="single-page-vs-numpy")
@pytest.mark.parametrize("op", ["convert", "read"])
def test_single_page_vs_numpy(benchmark, design_guest, op):
    """Every design: random single-page conversion (mapped private -> shared) or private
    read (mapped) of `BATCH` pages in one `vm.apply` batch, each round paired with numpy's
    scatter / gather of the same pages over a ``uint8`` table of `PAGES` entries
    (``paired_ratio``, the goal's figure: at most 4x) and over a ``uint64`` table
    (``paired_ratio_uint64``), both timed just before the round."""
    g = design_guest
    gfns = g.targets(BATCH, PAGES)
    present = g.vm.stats()["attr_intervals"]
    benchmark.extra_info.update(
        strategy=g.vm.strategy, guest_pages=PAGES, attr_intervals=present, ops=int(gfns.size)
    )
    t8, t64 = np.zeros(PAGES, np.uint8), np.arange(PAGES, dtype=np.uint64)
    v8, v64 = np.ones(gfns.size, np.uint8), np.arange(gfns.size, dtype=np.uint64)
    if op == "convert":

        def base8():
            t8[gfns] = v8

        def base64():
            t64[gfns] = v64

        batch = events(Op.CONVERT_SHARED, gfns)
    else:

        def base8():
            return t8[gfns]

        def base64():
            return t64[gfns]

        batch = events(Op.GUEST_READ_PRIVATE, gfns)
    paired = Paired(base8, g.remap(gfns, gfns), others={"uint64": base64})
    _time_paired(benchmark, g, batch, paired, "uint8", present)


@pytest.fixture(scope="module", params=gmem.STRATEGIES)
def strategy_guest(request):
    """A 2^24-page guest of each strategy with a populated `WORKING_SET`."""
    return MappedGuest(request.param, PAGES, WORKING_SET)


@pytest.mark.benchmark(group="apply-strategy")
@pytest.mark.parametrize("op", ["convert", "read", "write"])
def test_apply_strategy(benchmark, strategy_guest, op):
    """One `vm.apply` batch of random single-page events inside the populated working set:
    ``convert`` (mapped private -> shared), private guest ``read``, private guest ``write``."""
    g = strategy_guest
    gfns = g.targets(BATCH, WORKING_SET, seed=2)
    benchmark.extra_info.update(
        strategy=g.vm.strategy, guest_pages=PAGES, working_set=WORKING_SET, ops=int(gfns.size)
    )
    if op == "convert":
        batch, setup = events(Op.CONVERT_SHARED, gfns), g.remap(gfns, gfns)
    elif op == "read":
        batch, setup = events(Op.GUEST_READ_PRIVATE, gfns), g.remap(gfns, gfns)
    else:
        batch, setup = events(Op.GUEST_WRITE_PRIVATE, gfns, 1, 7), g.remap(gfns, gfns)
    before = g.vm.stats()
    status = benchmark.pedantic(g.vm.apply, args=(batch,), setup=setup, rounds=rounds(5))
    assert not status.any()
    after = g.vm.stats()
    n = (benchmark.stats.stats.rounds if benchmark.stats else 1) * gfns.size
    benchmark.extra_info.update(
        {k: (after[k] - before[k]) / n for k in ("modelled_ns", "stage2_zaps", "allocations")}
    )


@pytest.mark.benchmark(group="python-overhead-call")
@pytest.mark.parametrize("impl", ["python", "rust"])
def test_set_memory_attributes_call(benchmark, impl):
    """One 1-page `vm.set_memory_attributes` call on a uniform map (toggling), from
    Python (a loop of `CALL_PAIRS` pairs of calls in one timed function, as `timeit`
    does: the loop's own cost, one iteration per two calls, is included) or from Rust
    (``CoreDriver``: a loop of core calls, timed in Rust). Until 2026-12-03 the Python
    side timed one call per round through a `Toggle` and a lambda, two Python calls of
    harness around the one measured."""
    gpa = (PAGES // 2) * PAGE
    benchmark.extra_info.update(guest_pages=PAGES, ops=1)
    if impl == "python":
        _, g = guest(PAGES)
        set_attrs = g.vm.set_memory_attributes
        pairs = count(CALL_PAIRS, 8)

        def calls():
            for _ in range(pairs):
                set_attrs(gpa, PAGE, PRIVATE)
                set_attrs(gpa, PAGE, 0)

        benchmark.extra_info["ops"] = 2 * pairs
        benchmark.pedantic(calls, rounds=rounds(20), warmup_rounds=rounds(2))
        return
    driver = baseline_module().CoreDriver(PAGES)
    reps = count(10**5)
    benchmark.extra_info["ops"] = reps
    ns = benchmark.pedantic(
        driver.set_memory_attributes_loop, args=(gpa, PAGE, reps), rounds=rounds(10)
    )
    benchmark.extra_info["rust_ns_per_call"] = ns / reps


OVERHEAD_BATCHES = (1, 10, 1000, 10**5)
#: Pairs of calls per timed round of the one-call benchmark.
CALL_PAIRS = 1000


@pytest.mark.benchmark(group="python-overhead-apply")
@pytest.mark.parametrize(
    ("impl", "batch"),
    [*(("python", b) for b in OVERHEAD_BATCHES), ("rust", OVERHEAD_BATCHES[-1])],
)
def test_apply_batching(benchmark, impl, batch):
    """Random single-page conversions driven by `vm.apply` in batches of ``batch`` events
    (``python``) or by one core call over the same events (``rust``; ``CoreDriver.apply``
    calls ``Host::apply`` per ``batch`` in Rust, which costs nothing extra). Toggles
    private/shared; ns per event = median / ``ops``."""
    n = count(2 * 10**4 if batch == 1 else 10**5)
    gfns = random_gfns(PAGES, n, seed=3)
    ops_p = np.full(gfns.size, Op.CONVERT_PRIVATE, np.uint8)
    ops_s = np.full(gfns.size, Op.CONVERT_SHARED, np.uint8)
    benchmark.extra_info.update(guest_pages=PAGES, ops=int(gfns.size), batch=batch)

    def rust_toggle(baseline) -> Toggle:
        """The same events, one core call per direction, on a `CoreDriver` of its own."""
        driver = baseline.CoreDriver(PAGES)
        ones, zeros = np.ones(gfns.size, np.uint64), np.zeros(gfns.size, np.uint64)
        return Toggle(
            lambda: driver.apply(ops_p, gfns, ones, zeros),
            lambda: driver.apply(ops_s, gfns, ones, zeros),
        )

    if impl == "python":
        _, g = guest(PAGES)
        vm = g.vm
        to_p, to_s = events(ops_p, gfns), events(ops_s, gfns)
        parts_p = [to_p[i : i + batch] for i in range(0, to_p.size, batch)]
        parts_s = [to_s[i : i + batch] for i in range(0, to_s.size, batch)]

        def run(parts):
            for p in parts:
                vm.apply(p)

        fn = Toggle(lambda: run(parts_p), lambda: run(parts_s))
    else:
        fn = rust_toggle(baseline_module())
    # Many rounds: the machine is shared, and this ratio is a small difference of two
    # large numbers.
    n_rounds, warmup = rounds(8 if batch == 1 else 20), rounds(2)
    baseline = baseline_module(required=False)
    if impl == "python" and batch == OVERHEAD_BATCHES[-1] and baseline:
        # The goal's pair: the same events in one core call from Rust, timed just before
        # every round. Each side makes two calls per round, an untimed one (for Python,
        # ``fn`` as the setup) and a timed one, so both time the same direction right
        # after a pass over their own data.
        paired = Paired(rust_toggle(baseline), setup=fn)
        benchmark.pedantic(fn, setup=paired, rounds=n_rounds, warmup_rounds=warmup)
        paired.record(benchmark, "rust")
        return
    benchmark.pedantic(fn, rounds=n_rounds, warmup_rounds=warmup)
