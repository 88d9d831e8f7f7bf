"""One experiment: a workload run under each strategy, from a `RunConfig`.

The one path from knobs to results: ``gmem compare``/``run``/``replay`` build a
`RunConfig` from their arguments, ``gmem sweep`` from each grid cell, a notebook from
keywords::

    from gmem.experiment import RunConfig, run_experiment
    results = run_experiment(RunConfig(pages=1 << 16, discard="deferred"), ["dual", "inplace"])
    results[0].summary["peak_pages_allocated"]

Each strategy gets a fresh host and VM (`gmem.guest`), the same workload stream and the
policy of the config's knobs (`gmem.policies.make_policy`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from gmem.config import ConfigError, RunConfig
from gmem.constants import STRATEGIES
from gmem.costs import apply_costs, load_costs
from gmem.guest import build_vm, make_host
from gmem.policies import make_policy, run
from gmem.runner import RunResult
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
) -> list[RunResult]:
    """Run ``config``'s workload under each of ``strategies``; one `RunResult` each, in
    order. ``stream`` reuses a stream already made with `make_stream`; ``progress`` shows
    a bar per strategy on a terminal; ``meta`` replaces the entries copied into every
    summary (default: ``workload`` and ``seed``); ``pages`` and ``huge_order`` follow."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        known = ", ".join(STRATEGIES)
        shown = repr(unknown[0]) if unknown else "none"
        raise ConfigError("strategies", f"unknown strategy {shown} (known: {known})")
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
    results = []
    for strategy in strategies:
        host = make_host(stream.pages, huge_order=config.huge_order)
        apply_costs(host, costs)
        guest = build_vm(host, stream.pages, config.vm_type, strategy, config.huge_order)
        result = run(
            guest,
            stream,
            make_policy(**config.policy_knobs()),
            sample_every=sample_every,
            progress=progress,
            meta={**meta, "pages": stream.pages, "huge_order": config.huge_order},
        )
        results.append(result)
        del guest, host
    return results
