"""The Python layer's cost: `gmem.policies.run` (runner, policy, sampling) against the
time its own `vm.apply` calls spend in the core, for the same events.

* ``python-layer``: a workload's pre-generated batches run by `run` under the default
  policy (QEMU's behaviour) on a fresh VM each round; ``core_s`` is the time inside
  `vm.apply` (the core, GIL released), ``layer_ratio`` the median over rounds of the
  whole run's time ÷ ``core_s`` (goal: at most 1.3).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import pytest

from benchutil import count, guest, rounds, size
from gmem.policies import run
from gmem.workloads import make_workload

#: Guest size: 8 GiB, the default of `gmem compare`.
PAGES = 1 << 21


class _TimedVm:
    """A `gmem.Vm` whose `apply` adds the time it spends to ``core_s``."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.core_s = 0.0

    def apply(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._inner.apply(*args, **kwargs)
        finally:
            self.core_s += time.perf_counter() - t0

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _params(workload: str) -> dict:
    if workload == "dma-churn":
        return {"rounds": count(300, 4)}
    if workload == "swiotlb":
        return {"ios": count(20_000)}
    return {}


@pytest.mark.benchmark(group="python-layer")
@pytest.mark.parametrize("strategy", ["dual", "inplace"])
@pytest.mark.parametrize("workload", ["dma-churn", "swiotlb", "boot"])
def test_python_layer(benchmark, workload, strategy):
    pages = size(PAGES)
    batches = list(make_workload(workload, pages, seed=0, **_params(workload)))
    state: dict = {}
    ratios: list[float] = []
    cores: list[float] = []

    def fresh():
        state.clear()
        state["host"], g = guest(pages, strategy)
        state["timed"] = _TimedVm(g.vm)
        state["g"] = dataclasses.replace(g, vm=state["timed"])

    def go():
        t0 = time.perf_counter()
        result = run(state["g"], batches)
        total = time.perf_counter() - t0
        core = state["timed"].core_s
        cores.append(core)
        ratios.append(total / core if core > 0 else float("nan"))
        return result

    result = benchmark.pedantic(go, setup=fresh, rounds=rounds(5), iterations=1)
    # (in-place designs refuse some conversions of pinned pages: EAGAIN, counted)
    assert state["timed"].core_s > 0
    benchmark.extra_info.update(
        guest_pages=pages,
        events=int(sum(len(b) for b in batches)),
        failed_events=result.summary["failed_events"],
        core_s=statistics.median(cores),
        layer_ratio=statistics.median(ratios),
    )
