"""Shared helpers of the gmem benchmarks (see BENCHMARKS.md for how to run them).

Imported by the benchmark modules as ``benchutil`` (a plain module next to them, so that
its name never clashes with ``tests/conftest.py``).

Every size goes through `size()`: with ``GMEM_BENCH_SMALL=1`` the whole suite shrinks to
guests of `SMALL_PAGES` pages, so that ``GMEM_BENCH_SMALL=1 pytest benches -q
--benchmark-disable`` runs as a smoke test in well under a minute on the dev build.
Benchmarks run the release build (a venv with ``pip install .``); the baselines written in
Rust come from the separate module ``gmem_bench_baseline`` (``benches/baseline``), and
benchmarks that need it are skipped when it is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gmem
from gmem.guest import build_vm

SMALL = os.environ.get("GMEM_BENCH_SMALL") == "1"
SMALL_PAGES = 1 << 12
PAGE = gmem.PAGE_SIZE
PRIVATE = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
MAX_HOST_PAGES = (1 << 31) - 1
#: Sizes of a range conversion, in pages: 1 page, 2 MiB, 1 GiB, 64 GiB.
RANGES = {"4K": 1, "2M": 512, "1G": 1 << 18, "64G": 1 << 24}
#: Interval counts of a fragmented attribute map.
INTERVALS = (10**3, 10**4, 10**5, 10**6)
#: The guest size of most benchmarks: 2^24 pages = 64 GiB.
GUEST_PAGES = 1 << 24


def size(n: int) -> int:
    """``n`` — or, in the smoke-test mode, at most `SMALL_PAGES`."""
    return min(int(n), SMALL_PAGES) if SMALL else int(n)


def count(n: int, small: int = 64) -> int:
    """An event or interval count: ``n``, or ``small`` in the smoke-test mode."""
    return min(int(n), small) if SMALL else int(n)


def rounds(n: int) -> int:
    """Rounds of a pedantic benchmark (1 in the smoke-test mode)."""
    return 1 if SMALL else n


def events(op, gfn, npages=1, value=0) -> np.ndarray:
    """An `EVENT_DTYPE` array; scalars broadcast against the array arguments."""
    gfn = np.asarray(gfn, dtype=np.uint64)
    n = np.broadcast(np.asarray(op), gfn, np.asarray(npages), np.asarray(value)).size
    ev = np.zeros(n, gmem.EVENT_DTYPE)
    ev["op"] = op
    ev["gfn"] = gfn
    ev["npages"] = npages
    ev["value"] = value
    return ev


def host_for(pages: int) -> gmem.Host:
    """A host that a guest of ``pages`` can never exhaust (every gfn backed twice)."""
    need = 2 * (-(-pages // 512) * 512) + 512
    return gmem.Host(min(need, MAX_HOST_PAGES) * PAGE)


def guest(pages: int, strategy: str = "dual", *, host_pages: int | None = None, huge_order=0):
    """A host and a VM laid out by `gmem.guest.build_vm`: one guest_memfd memslot of
    ``pages`` pages at gpa 0. Returns ``(host, guest_vm)``."""
    host = gmem.Host(host_pages * PAGE) if host_pages else host_for(pages)
    return host, build_vm(host, pages, "sw_protected", strategy, huge_order=huge_order)


def fragment_gfns(pages: int, intervals: int) -> np.ndarray:
    """Gfns whose conversion, one page each, leaves about ``intervals`` runs in a map that
    was uniform: every ``stride``-th page of the guest, spread over all of it."""
    n = max(1, intervals // 2)
    stride = max(2, pages // n)
    return np.arange(n, dtype=np.uint64)[: pages // stride] * np.uint64(stride) + np.uint64(1)


def fragment(vm, pages: int, intervals: int, *, private: bool = True) -> None:
    """Fragment ``vm``'s attribute map with one `vm.apply` batch of alternating 1-page
    conversions (to ``private`` on a map that holds the opposite everywhere)."""
    op = gmem.Op.CONVERT_PRIVATE if private else gmem.Op.CONVERT_SHARED
    status = vm.apply(events(op, fragment_gfns(pages, intervals)))
    assert not status.any(), "fragmenting conversions failed"


def populate(vm, start: int, npages: int, *, unit: int = 512) -> None:
    """Private guest writes of every page of ``[start, start + npages)`` in ``unit``-page
    events (the range must already be private)."""
    gfn = np.arange(start, start + npages, unit, dtype=np.uint64)
    n = np.minimum(np.uint64(unit), np.uint64(start + npages) - gfn)
    status = vm.apply(events(gmem.Op.GUEST_WRITE_PRIVATE, gfn, n, gfn + np.uint64(1)))
    assert not status.any(), "populating writes failed"


def random_gfns(pages: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct random gfns below ``pages`` (fewer if the guest is smaller)."""
    rng = np.random.default_rng(seed)
    n = min(n, pages)
    if n * 4 >= pages:
        return rng.permutation(pages)[:n].astype(np.uint64)
    return rng.choice(pages, size=n, replace=False).astype(np.uint64)


def rss_bytes() -> int:
    """The process's resident set size (``VmRSS`` of ``/proc/self/status``), in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def baseline_module(required: bool = True):
    """The Rust baselines (``benches/baseline``); when missing, skip (or ``None`` when not
    ``required``)."""
    if not required:
        try:
            return importlib.import_module("gmem_bench_baseline")
        except ImportError:
            return None
    return pytest.importorskip(
        "gmem_bench_baseline",
        reason="build benches/baseline with maturin (see BENCHMARKS.md)",
    )


def refmodel_module():
    """The pure-Python reference model ``tests/refmodel.py``, or skip."""
    path = Path(__file__).resolve().parent.parent / "tests" / "refmodel.py"
    if not path.exists():
        pytest.skip("tests/refmodel.py not present")
    if "gmem_bench_refmodel" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gmem_bench_refmodel", path)
        assert spec
        assert spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gmem_bench_refmodel"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["gmem_bench_refmodel"]


class Toggle:
    """A callable converting the same target back and forth, so that every call does the
    same amount of real work (a conversion to the value already held is a no-op)."""

    def __init__(self, forward, backward):
        self.calls = (forward, backward)
        self.n = 0

    def __call__(self):
        self.n += 1
        return self.calls[self.n & 1]()


class Paired:
    """A baseline timed in the same rounds as a benchmark, for a ratio that the machine's
    drift cannot skew.

    Pass an instance as ``setup=`` of ``benchmark.pedantic``: before each round it times
    one call of ``baseline`` (after an untimed one) and then runs the benchmark's own
    ``setup`` (untimed, if any), so every timed round of the benchmark has a baseline
    sample taken milliseconds before it. On a shared machine whose speed moves by 2-5x
    within minutes, two benchmarks run one after the other can see different machines; a
    pair cannot.
    `record` stores the baseline's median and the median of the per-round ratios.
    ``others`` are further baselines (by name), timed the same way before ``baseline``
    in each round; `record` stores their medians and ratios too."""

    def __init__(self, baseline, setup=None, others=None):
        self.baseline = baseline
        self.setup = setup
        self.samples: list[float] = []
        self.others = dict(others or {})
        self.other_samples: dict[str, list[float]] = {k: [] for k in self.others}

    @staticmethod
    def _time(fn) -> float:
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def __call__(self):
        # Untimed, timed, then the benchmark's own setup: each timed call comes right after
        # an untimed pass over its own data, with nothing else in between (a benchmark
        # whose setup does not touch its data should pass one that does).
        for name, fn in self.others.items():
            self.other_samples[name].append(self._time(fn))
        self.samples.append(self._time(self.baseline))
        if self.setup is not None:
            self.setup()

    def record(self, benchmark, name: str) -> None:
        """Put ``paired_<name>_s`` (the baseline's median, seconds per call) and
        ``paired_ratio`` (median over rounds of benchmark / baseline) into the benchmark's
        ``extra_info``. Nothing is recorded when the benchmark did not time (disabled)."""
        data = list(benchmark.stats.stats.data) if benchmark.stats else []
        if not data:
            return
        # Warm-up rounds call the setup too; the timed rounds are the last ones.
        base = self.samples[-len(data) :]
        assert len(base) == len(data), "one baseline sample per timed round"
        benchmark.extra_info[f"paired_{name}_s"] = statistics.median(base)
        benchmark.extra_info["paired_ratio"] = statistics.median(
            d / b for d, b in zip(data, base, strict=True)
        )
        for other, samples in self.other_samples.items():
            base = samples[-len(data) :]
            benchmark.extra_info[f"paired_{other}_s"] = statistics.median(base)
            benchmark.extra_info[f"paired_ratio_{other}"] = statistics.median(
                d / b for d, b in zip(data, base, strict=True)
            )


def machine_probe() -> dict[str, float]:
    """How fast this machine is right now, in the units a reader can compare across runs:
    a pure-Python loop (ns per iteration: the CPU) and numpy's scatter and gather of 2^20
    random entries of a 2^24-entry ``uint64`` table (ns per element: the memory system).
    Best of three each; about a second."""
    loop = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        acc = 0
        for i in range(10**6):
            acc += i
        loop = min(loop, (time.perf_counter() - t0) * 1e3)
    table = np.arange(1 << 24, dtype=np.uint64)
    idx = np.random.default_rng(7).integers(0, table.size, 1 << 20)
    vals = np.arange(idx.size, dtype=np.uint64)
    scatter = gather = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        table[idx] = vals
        t1 = time.perf_counter()
        table[idx].sum()
        t2 = time.perf_counter()
        scatter, gather = min(scatter, t1 - t0), min(gather, t2 - t1)
    per = 1e9 / idx.size
    return {
        "python_loop_ns": round(loop, 2),
        "numpy_scatter_ns": round(scatter * per, 2),
        "numpy_gather_ns": round(gather * per, 2),
    }
