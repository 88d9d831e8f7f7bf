"""One experiment: a workload run under each strategy, from a `RunConfig`.

The one path from knobs to results: ``gmem compare``/``run``/``replay`` build a
`RunConfig` from their arguments, ``gmem sweep`` from each grid cell, a notebook from
keywords::

    from gmem.experiment import RunConfig, run_experiment
    results = run_experiment(RunConfig(pages=1 << 16, discard="deferred"), ["dual", "inplace"])
    results[0].summary["peak_pages_allocated"]

Each strategy gets a fresh host and VM (`gmem.guest`), the same workload stream and the
policy of the config's knobs (`gmem.policies.make_policy`). The strategies run
side by side on the CPUs (``jobs``), their results identical to one after another.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gmem.config import ConfigError, RunConfig, check_knob, default_jobs, parse_mempolicy
from gmem.constants import STRATEGIES
from gmem.costs import apply_costs, load_costs
from gmem.guest import build_vm, make_host
from gmem.policies import make_policy
from gmem.reports import progress_bars
from gmem.runner import Runner, RunResult
from gmem.streams import EventStream
from gmem.workloads import make_workload

__all__ = ["ConfigError", "RunConfig", "make_stream", "run_experiment"]

#: Samples a run takes when ``sample_every`` is not given.
_SAMPLES_PER_RUN = 400


def make_stream(config: RunConfig) -> EventStream:
    """The workload stream of ``config`` (re-iterable: every strategy replays it)."""
    return make_workload(
        config.workload,
        config.guest_pages,
        seed=config.seed,
        chunk=config.chunk,
        **config.params,
    )


def run_experiment(
    config: RunConfig,
    strategies: Sequence[str] = STRATEGIES,
    *,
    stream: EventStream | None = None,
    progress: bool = False,
    meta: Mapping[str, Any] | None = None,
    jobs: int | None = None,
) -> list[RunResult]:
    """Run ``config``'s workload under each of ``strategies``; one `RunResult` each, in
    order. ``stream`` reuses a stream already made with `make_stream`; ``progress`` shows
    a bar per strategy on a terminal; ``meta`` replaces the entries copied into every
    summary (default: ``workload`` and ``seed``); ``pages`` and ``huge_order`` follow.

    ``jobs`` strategies run at once, each in a thread of its own (default: one per CPU,
    `gmem.config.default_jobs`; 1 runs them one after another in the calling thread).
    The core releases the GIL while it applies a batch, so the threads share the CPUs;
    the results are those of a sequential run, except the wall-clock fields."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        known = ", ".join(STRATEGIES)
        shown = repr(unknown[0]) if unknown else "none"
        raise ConfigError("strategies", f"unknown strategy {shown} (known: {known})")
    if jobs is None:
        jobs = default_jobs()
    problem = check_knob("jobs", jobs)
    if problem is not None:
        raise ConfigError("jobs", problem)
    if stream is None:
        stream = make_stream(config)
    costs = config.costs
    if isinstance(costs, (str, os.PathLike)):
        costs = load_costs(costs)
    sample_every = config.sample_every or max(
        1, (stream.total_events or 1 << 20) // _SAMPLES_PER_RUN
    )
    if meta is None:
        meta = {"workload": config.workload, "seed": config.seed}
    meta = {**meta, "pages": stream.pages, "huge_order": config.huge_order}
    stop = threading.Event()

    def run_one(index: int, strategy: str, bars) -> RunResult:
        host = make_host(
            stream.pages,
            huge_order=config.huge_order,
            nodes=config.nodes,
            host_pages=config.host_pages,
        )
        apply_costs(host, costs)
        if config.mempolicy is not None:
            host.set_mempolicy(*parse_mempolicy(config.mempolicy, config.nodes))
        guest = build_vm(host, stream.pages, config.vm_type, strategy, config.huge_order)
        runner = Runner(guest, make_policy(**config.policy_knobs()), sample_every=sample_every)

        def advance(n: int) -> None:
            if stop.is_set():  # another strategy failed, or the user interrupted
                raise _Stopped
            if bars is not None:
                bars.advance(n, index)

        result = runner.run(stream, meta=meta, progress=advance)
        if config.nodes > 1 or config.mempolicy is not None:
            result.summary.update(node_summary(host, config))
        return result

    bars = progress_bars(stream.total_events, strategies) if progress else None
    with bars or contextlib.nullcontext():
        if jobs == 1 or len(strategies) == 1:
            return [run_one(i, s, bars) for i, s in enumerate(strategies)]
        with ThreadPoolExecutor(min(jobs, len(strategies)), "gmem-strategy") as pool:
            futures = [pool.submit(run_one, i, s, bars) for i, s in enumerate(strategies)]
            try:
                # in strategy order: the error raised is the one a sequential run meets
                return [f.result() for f in futures]
            finally:
                stop.set()  # after an error or an interrupt, the others stop at a batch end
                for f in futures:
                    f.cancel()


def node_summary(host, config: RunConfig) -> dict[str, Any]:
    """The host's NUMA layout at the end of a run, for its summary (of a run with
    several nodes or a memory policy): ``nodes``,
    ``mempolicy``, and per node its pages allocated (``node{K}_pages_allocated``, the
    run's footprint there) and free (``node{K}_free_pages``). A node that ran out while
    another had room shows as ``node{K}_free_pages`` 0 with ``status_enomem`` > 0."""
    out: dict[str, Any] = {"nodes": host.nodes, "mempolicy": config.mempolicy or "default"}
    for n in host.node_stats():
        out[f"node{n['node']}_pages_allocated"] = n["allocated_pages"]
        out[f"node{n['node']}_free_pages"] = n["free_pages"]
    return out


class _Stopped(Exception):
    """Ends a strategy's run early once its experiment has failed or been interrupted."""
