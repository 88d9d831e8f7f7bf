"""VMM policies and the runner that drives a VM with a workload.

A policy is what the VMM decides around the guest's requests: whether it discards the
side of a converted range that is no longer used, what it does when a vCPU exits with
``KVM_EXIT_MEMORY_FAULT``, whether it retries a conversion refused with ``EAGAIN``,
when huge pages merge back, whether it batches conversions. Policies act once per
batch — by rewriting the event array with numpy, by reacting to the status array, or by
setting an option of the core — never by a Python call per event.

Writing your own
----------------
Subclass `Policy` and override any of its hooks::

    import numpy as np
    import gmem
    from gmem.policies import Policy, run

    class ShareNothingAbove4G(Policy):
        '''Refuse (drop) conversions to shared above 4 GiB, as a paranoid VMM might.'''

        name = "no-shared-above-4g"

        def transform(self, events):
            high = (events["op"] == gmem.Op.CONVERT_SHARED) & (events["gfn"] >= 1 << 20)
            return events[~high]

    result = run(guest, gmem.workloads.dma_churn(1 << 21), ShareNothingAbove4G())

Hooks: ``configure(vm)`` once before the run (set core options); ``transform(events)``
before each batch is applied (return a new array); ``after_batch(vm, events, status,
round)`` after it — return extra events to apply now (``round`` counts these follow-up
rounds, 0 for a workload batch); ``finish(vm)`` at the end (return last events);
``counters()`` adds numbers to the run's summary. Combine policies with ``a + b`` or
`Compose`. See ``docs/policies.md``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gmem._events import CONVERSION_OPS, DETAIL_IMPLICIT_CONVERSION, EVENT_DTYPE, Op

_PAGE_SHIFT = 12
#: ``KVM_MEMORY_EXIT_FLAG_PRIVATE``: the faulting access was private.
_EXIT_PRIVATE = 1 << 3

__all__ = [
    "TWO_SIDED_STRATEGIES",
    "CoalesceConversions",
    "Compose",
    "DiscardDeferred",
    "DiscardEager",
    "DiscardNever",
    "FaultHandling",
    "MergePolicy",
    "Policy",
    "RetryEagain",
    "RunResult",
    "Runner",
    "final_discards",
    "make_policy",
    "run",
]

#: Strategies with a separate shared backing that a VMM can discard. Elsewhere the shared
#: view is the guest_memfd page itself and discarding it would destroy live data.
TWO_SIDED_STRATEGIES = frozenset({"dual", "two_offsets"})
_EAGAIN = -errno.EAGAIN
_EMPTY = np.empty(0, EVENT_DTYPE)


class Policy:
    """A VMM policy. The base class does nothing; subclass and override hooks."""

    name = "none"
    #: Whether the runner should apply batches with per-event details and call
    #: `after_details` (costs one details array per batch).
    wants_details = False

    def configure(self, vm) -> None:
        """Called once before the run: set core options with ``vm.set_options``."""

    def transform(self, events: np.ndarray) -> np.ndarray:
        """Rewrite a batch before it is applied (vectorised; return a new array)."""
        return events

    def after_batch(
        self, vm, events: np.ndarray, status: np.ndarray, round: int
    ) -> np.ndarray | None:
        """React to an applied batch; return events to apply next, or None."""
        return None

    def after_details(
        self, vm, events: np.ndarray, status: np.ndarray, details: np.ndarray
    ) -> np.ndarray | None:
        """With `wants_details`: react to the per-event details of an applied array;
        return events to apply next (before `after_batch`'s), or None."""
        return None

    def finish(self, vm) -> np.ndarray | None:
        """Called after the last batch; return final events, or None."""
        return None

    def counters(self) -> dict[str, int]:
        """Numbers this policy adds to the run summary."""
        return {}

    def describe(self) -> str:
        return self.name

    def __add__(self, other: Policy) -> Compose:
        return Compose([self, other])


def _concat(parts: Sequence[np.ndarray | None]) -> np.ndarray | None:
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class Compose(Policy):
    """Several policies in order: transforms chain, follow-up events concatenate."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        flat: list[Policy] = []
        for p in policies:
            flat.extend(p.policies if isinstance(p, Compose) else [p])
        self.policies = flat

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(p.name for p in self.policies) or "none"

    @property
    def wants_details(self) -> bool:  # type: ignore[override]
        return any(p.wants_details for p in self.policies)

    def after_details(self, vm, events, status, details):
        return _concat([p.after_details(vm, events, status, details) for p in self.policies])

    def configure(self, vm) -> None:
        for p in self.policies:
            p.configure(vm)

    def transform(self, events: np.ndarray) -> np.ndarray:
        for p in self.policies:
            events = p.transform(events)
        return events

    def after_batch(self, vm, events, status, round):
        return _concat([p.after_batch(vm, events, status, round) for p in self.policies])

    def finish(self, vm):
        return _concat([p.finish(vm) for p in self.policies])

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.policies:
            out.update(p.counters())
        return out

    def describe(self) -> str:
        return ", ".join(p.describe() for p in self.policies) or "none"


# --- discard ---------------------------------------------------------------------------


def _discard_ops(ops: np.ndarray) -> np.ndarray:
    """The discard that follows each conversion: shared side after to-private
    (``DISCARD_SHARED``), private side after to-shared (``PUNCH_HOLE``)."""
    return np.where(ops == Op.CONVERT_PRIVATE, Op.DISCARD_SHARED, Op.PUNCH_HOLE).astype(np.uint8)


def _strategy_of(vm) -> str:
    return str(getattr(vm, "strategy", ""))


def _huge_discard_ops(vm) -> np.ndarray:
    """Discard ops that must cover whole huge pages: HugeTLB guest_memfd punches only
    huge-aligned ranges (``EINVAL`` otherwise), so on a VM built with ``huge_order`` the
    private-side punch — and for `two_offsets` the shared-side one — is cut to whole
    huge pages, as a VMM discarding a HugeTLB-backed RAM block must."""
    if not getattr(vm, "huge_order", 0):
        return np.empty(0, np.uint8)
    if _strategy_of(vm) == "two_offsets":
        return np.array([Op.PUNCH_HOLE, Op.DISCARD_SHARED], np.uint8)
    return np.array([Op.PUNCH_HOLE], np.uint8)


def _align_to_huge(events: np.ndarray, ops: np.ndarray, order: int) -> np.ndarray:
    """Shrink the events with an op in ``ops`` to the whole huge pages they cover;
    drop those that cover none."""
    if not len(ops) or not len(events):
        return events
    sel = np.isin(events["op"], ops)
    if not sel.any():
        return events
    unit = np.uint64(1 << order)
    start = events["gfn"][sel]
    lo = (start + unit - np.uint64(1)) // unit * unit
    hi = (start + events["npages"][sel]) // unit * unit
    events = events.copy()
    events["gfn"][sel] = lo
    events["npages"][sel] = np.where(hi > lo, hi - lo, 0)
    return events[events["npages"] > 0]


class DiscardEager(Policy):
    """Discard the unused side right after each conversion, as QEMU does.

    QEMU ``accel/kvm/kvm-all.c: kvm_convert_memory()`` sets the attributes and then, going
    private, discards the shared backing with ``ram_block_discard_range()``
    (``MADV_DONTNEED``/punch), going shared, punches the private backing with
    ``ram_block_discard_guest_memfd_range()`` (``FALLOC_FL_PUNCH_HOLE``). Here a
    ``DISCARD_SHARED`` is inserted after each ``CONVERT_PRIVATE`` and a ``PUNCH_HOLE`` after
    each ``CONVERT_SHARED`` — only on strategies with two backings (`dual`,
    `two_offsets`): elsewhere the shared view is the private page itself. Unlike QEMU the
    discard is queued with the conversion, so it also runs if the conversion fails; on
    two-sided strategies a conversion fails only for input outside the guest or when the
    host is out of memory. Conversions the core makes implicitly on a memory-fault exit
    (``fault_policy="convert"``; QEMU runs the same ``kvm_convert_memory()`` for them) are
    followed by the same discard: the runner applies batches with details, where
    ``gmem.DETAIL_IMPLICIT_CONVERSION`` marks those accesses.
    """

    name = "discard=eager"

    def __init__(self) -> None:
        self.active = True
        self.huge_ops = np.empty(0, np.uint8)
        self.huge_order = 0

    def configure(self, vm) -> None:
        self.active = _strategy_of(vm) in TWO_SIDED_STRATEGIES
        self.wants_details = self.active
        self.huge_ops = _huge_discard_ops(vm)
        self.huge_order = int(getattr(vm, "huge_order", 0))

    def after_details(self, vm, events, status, details):
        implicit = (details["fault_flags"] & DETAIL_IMPLICIT_CONVERSION) != 0
        if not self.active or not implicit.any():
            return None
        flags = details["fault_flags"][implicit]
        out = np.zeros(int(implicit.sum()), EVENT_DTYPE)
        to_private = (flags & _EXIT_PRIVATE) != 0
        out["op"] = np.where(to_private, Op.DISCARD_SHARED, Op.PUNCH_HOLE)
        out["gfn"] = details["fault_gpa"][implicit] >> _PAGE_SHIFT
        out["npages"] = 1
        return _align_to_huge(out, self.huge_ops, self.huge_order)

    def transform(self, events: np.ndarray) -> np.ndarray:
        if not self.active or not len(events):
            return events
        conv = np.isin(events["op"], CONVERSION_OPS)
        if not conv.any():
            return events
        out = np.repeat(events, 1 + conv)
        at = np.cumsum(1 + conv)[conv] - 1
        out["op"][at] = _discard_ops(events["op"][conv])
        out["value"][at] = 0
        return _align_to_huge(out, self.huge_ops, self.huge_order)


class DiscardNever(Policy):
    """Never discard: the VMM leaves both backings allocated (double backing grows)."""

    name = "discard=never"


def _last_writer(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split the union of ``[start, end)`` ranges into elementary segments and find, for
    each, the index of the last range covering it (-1 if none).

    Exact and vectorised: every range is a range-max update of its own index on a segment
    tree over the segments, applied level by level for all ranges at once
    (O(n log n) numpy work), then pushed down to the leaves.
    """
    bounds = np.unique(np.concatenate([start, end]))
    nseg = max(len(bounds) - 1, 1)
    size = 1 << math.ceil(math.log2(nseg)) if nseg > 1 else 1
    tree = np.full(2 * size, -1, dtype=np.int64)
    lo = np.searchsorted(bounds, start).astype(np.int64) + size
    hi = np.searchsorted(bounds, end).astype(np.int64) + size
    idx = np.arange(len(start), dtype=np.int64)
    while True:
        live = lo < hi
        if not live.any():
            break
        take = live & (lo & 1 == 1)
        np.maximum.at(tree, lo[take], idx[take])
        lo[take] += 1
        take = (lo < hi) & (hi & 1 == 1)
        hi[take] -= 1
        np.maximum.at(tree, hi[take], idx[take])
        lo >>= 1
        hi >>= 1
    level = 1
    while level < size:
        nodes = np.arange(level, 2 * level)
        tree[2 * nodes] = np.maximum(tree[2 * nodes], tree[nodes])
        tree[2 * nodes + 1] = np.maximum(tree[2 * nodes + 1], tree[nodes])
        level *= 2
    return bounds, tree[size : size + len(bounds) - 1]


def _segment_runs(bounds: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, ...]:
    """Merge consecutive segments with equal ``key`` (>= 0; -1 = leave out) into runs:
    ``(gfn, npages, key)`` per run."""
    brk = np.ones(len(key), bool)
    brk[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], len(key))
    keep = key[starts] >= 0
    starts, ends = starts[keep], ends[keep]
    return bounds[starts], bounds[ends] - bounds[starts], key[starts]


def final_discards(conversions: np.ndarray) -> np.ndarray:
    """The discards a deferred pass issues for a sequence of applied conversions.

    Only the *last* conversion of each page decides which side is unused, so a range
    converted shared and back private before the pass loses its shared side, never its
    private data. Adjacent pages with the same final direction become one event.
    """
    if not len(conversions):
        return _EMPTY
    start = conversions["gfn"]
    bounds, last = _last_writer(start, start + conversions["npages"])
    key = np.full(len(last), -1, np.int64)
    covered = last >= 0
    key[covered] = conversions["op"][last[covered]] == Op.CONVERT_PRIVATE
    gfn, npages, private = _segment_runs(bounds, key)
    out = np.zeros(len(gfn), EVENT_DTYPE)
    out["op"] = np.where(private == 1, Op.DISCARD_SHARED, Op.PUNCH_HOLE)
    out["gfn"], out["npages"] = gfn, npages
    return out


class DiscardDeferred(Policy):
    """Discard later, in one pass: at the end of each batch, or once ``every`` conversion
    events have accumulated.

    Models a VMM that queues discards for a background thread (cheaper per conversion,
    but memory stays backed twice until the pass). The pass discards, per page, the side
    its *last* successful conversion left unused (see `final_discards`). Only on strategies
    with two backings; a final pass runs when the workload ends.
    """

    name = "discard=deferred"

    def __init__(self, every: int | None = None) -> None:
        if every is not None and every <= 0:
            raise ValueError(f"every must be positive, got {every}")
        self.every = every
        self.active = True
        self.pending: list[np.ndarray] = []
        self.npending = 0
        self.passes = 0
        self.huge_ops = np.empty(0, np.uint8)
        self.huge_order = 0

    def describe(self) -> str:
        return f"{self.name}(every={self.every})" if self.every else f"{self.name}(batch)"

    def configure(self, vm) -> None:
        self.active = _strategy_of(vm) in TWO_SIDED_STRATEGIES
        self.huge_ops = _huge_discard_ops(vm)
        self.huge_order = int(getattr(vm, "huge_order", 0))
        self.pending, self.npending, self.passes = [], 0, 0

    def _flush(self) -> np.ndarray | None:
        if not self.pending:
            return None
        conv = np.concatenate(self.pending)
        self.pending, self.npending = [], 0
        self.passes += 1
        return _align_to_huge(final_discards(conv), self.huge_ops, self.huge_order)

    def after_batch(self, vm, events, status, round):
        if not self.active:
            return None
        done = np.isin(events["op"], CONVERSION_OPS) & (status == 0)
        if done.any():
            self.pending.append(events[done])
            self.npending += int(done.sum())
        if self.every is None or self.npending >= self.every:
            return self._flush()
        return None

    def finish(self, vm):
        return self._flush() if self.active else None

    def counters(self) -> dict[str, int]:
        return {"discard_passes": self.passes}


# --- faults, EAGAIN, merge ------------------------------------------------------------


class FaultHandling(Policy):
    """What the VMM does when a vCPU exits with ``KVM_EXIT_MEMORY_FAULT``.

    ``"convert"``: convert the page to the kind of access that faulted and re-enter the
    guest — QEMU's ``kvm_cpu_exec()`` answers ``KVM_EXIT_MEMORY_FAULT`` with
    ``kvm_convert_memory(gpa, size, flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)``, which is also
    what an explicit ``MAP_GPA_RANGE`` request leads to. ``"exit"``: the access fails
    (status ``-EFAULT``) and is counted; nothing converts. Set in the core
    (``vm.set_options(fault_policy=…)``), so no Python runs per fault.
    """

    MODES = ("convert", "exit")

    def __init__(self, mode: str = "convert") -> None:
        if mode not in self.MODES:
            raise ValueError(f"fault mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.name = f"fault={mode}"

    def configure(self, vm) -> None:
        vm.set_options(fault_policy=self.mode)


class RetryEagain(Policy):
    """Retry conversions refused with ``EAGAIN`` at the end of the batch, up to
    ``max_rounds`` times.

    The in-place series refuses a to-private conversion while the host holds a reference
    (a pin) and leaves it to userspace to retry once the reference is gone; a VMM waits
    for the device to unpin and tries again. Retrying at the end of the batch must not
    undo what the guest did since: a page that a later conversion in the batch changed
    is not retried (``eagain_superseded``); the rest of each refused range is. Pages
    still refused after the last round are dropped and counted (``eagain_dropped``, in
    events).
    """

    def __init__(self, max_rounds: int = 3) -> None:
        if max_rounds < 0:
            raise ValueError(f"max_rounds must be non-negative, got {max_rounds}")
        self.max_rounds = max_rounds
        self.name = f"retry={max_rounds}"
        self.retried = self.dropped = self.superseded = 0

    def configure(self, vm) -> None:
        self.retried = self.dropped = self.superseded = 0

    def after_batch(self, vm, events, status, round):
        refused = status == _EAGAIN
        n = int(refused.sum())
        if not n:
            return None
        if round >= self.max_rounds:
            self.dropped += n
            return None
        conv = np.isin(events["op"], CONVERSION_OPS) & ((status == 0) | refused)
        cev, crefused = events[conv], refused[conv]
        bounds, last = _last_writer(cev["gfn"], cev["gfn"] + cev["npages"])
        key = np.full(len(last), -1, np.int64)
        retry = last >= 0
        retry[retry] = crefused[last[retry]]
        key[retry] = cev["op"][last[retry]]
        gfn, npages, op = _segment_runs(bounds, key)
        still = np.unique(last[retry])
        self.superseded += n - len(still)
        self.retried += len(still)
        out = np.zeros(len(gfn), EVENT_DTYPE)
        out["op"], out["gfn"], out["npages"] = op, gfn, npages
        return out

    def counters(self) -> dict[str, int]:
        return {
            "eagain_retried": self.retried,
            "eagain_superseded": self.superseded,
            "eagain_dropped": self.dropped,
        }


class MergePolicy(Policy):
    """When split huge folios merge back.

    ``"eager"``: the core merges a huge range as soon as it is uniform again
    (``vm.set_options(merge="eager")``), as the HugeTLB guest_memfd tree does on
    to-private conversion. ``"periodic"``: merging waits for a pass
    (``vm.merge_pass()``) run every ``every`` workload events, like a khugepaged-style
    background scan.
    """

    MODES = ("eager", "periodic")

    def __init__(self, mode: str = "eager", every: int = 1 << 20) -> None:
        if mode not in self.MODES:
            raise ValueError(f"merge mode must be one of {self.MODES}, got {mode!r}")
        if every <= 0:
            raise ValueError(f"every must be positive, got {every}")
        self.mode = mode
        self.every = every
        self.name = f"merge={mode}"
        self.since = 0
        self.passes = 0
        self.merged = 0

    def describe(self) -> str:
        return f"{self.name}(every={self.every})" if self.mode == "periodic" else self.name

    def configure(self, vm) -> None:
        vm.set_options(merge="eager" if self.mode == "eager" else "deferred")
        self.since = self.passes = self.merged = 0

    def after_batch(self, vm, events, status, round):
        if self.mode == "periodic" and round == 0:
            self.since += len(events)
            if self.since >= self.every:
                self.since = 0
                self.passes += 1
                self.merged += int(vm.merge_pass())
        return None

    def counters(self) -> dict[str, int]:
        if self.mode == "eager":
            return {}
        return {"merge_passes": self.passes, "merge_pass_merged": self.merged}


class CoalesceConversions(Policy):
    """Batch conversions: within each run of consecutive conversion events of the same
    direction, sort by gfn and merge overlapping or adjacent ranges into one event.

    Converting ranges one after another to the same side equals converting their union
    once, but costs one ``KVM_SET_MEMORY_ATTRIBUTES`` (one zap, one TLB flush) instead of
    several — what a VMM gains by collecting a guest's ``MAP_GPA_RANGE`` requests (Linux
    splits large ``set_memory_decrypted()`` calls into several hypercalls). One
    difference: a refused page now refuses the whole union (conversions are
    all-or-nothing).
    """

    name = "coalesce"

    def __init__(self) -> None:
        self.saved = 0

    def configure(self, vm) -> None:
        self.saved = 0

    def transform(self, events: np.ndarray) -> np.ndarray:
        n = len(events)
        if n < 2:
            return events
        op = events["op"]
        conv = np.isin(op, CONVERSION_OPS)
        newrun = np.ones(n, bool)
        newrun[1:] = ~(conv[1:] & conv[:-1] & (op[1:] == op[:-1]))
        if newrun.all():
            return events
        run_id = np.cumsum(newrun) - 1
        order = np.lexsort((events["gfn"], run_id))
        ev = events[order]
        rid = run_id[order]
        gfn = ev["gfn"]
        end = gfn + ev["npages"]
        reach = pd.Series(end).groupby(rid).cummax().to_numpy(dtype=np.uint64)
        first = np.ones(n, bool)
        first[1:] = rid[1:] != rid[:-1]
        starts_new = first.copy()
        starts_new[1:] |= gfn[1:] > reach[:-1]
        heads = np.flatnonzero(starts_new)
        out = ev[heads].copy()
        out["npages"] = np.maximum.reduceat(end, heads) - out["gfn"]
        self.saved += n - len(out)
        return out

    def counters(self) -> dict[str, int]:
        return {"coalesced_events": self.saved}


def make_policy(
    *,
    discard: str = "eager",
    discard_every: int | None = None,
    fault: str = "convert",
    retry: int = 3,
    merge: str = "eager",
    merge_every: int = 1 << 20,
    coalesce: bool = False,
) -> Compose:
    """The standard VMM policy from its knobs. The defaults are QEMU's behaviour:
    discard on conversion, convert on memory-fault exit, retry ``EAGAIN``, eager merge."""
    parts: list[Policy] = []
    if coalesce:
        parts.append(CoalesceConversions())
    if discard == "eager":
        parts.append(DiscardEager())
    elif discard == "deferred":
        parts.append(DiscardDeferred(discard_every))
    elif discard == "never":
        parts.append(DiscardNever())
    else:
        raise ValueError(f"discard must be eager, deferred or never, got {discard!r}")
    parts.append(FaultHandling(fault))
    parts.append(RetryEagain(retry))
    parts.append(MergePolicy(merge, merge_every))
    return Compose(parts)


# --- running ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a run produced: ``summary`` (a flat dict), ``series`` (a DataFrame with one
    row per sample: ``applied_events`` and ``workload_events`` so far, ``elapsed_s`` and
    every `vm.stats()`
    counter) and ``status_counts`` (events per status code)."""

    summary: dict[str, Any]
    series: pd.DataFrame
    status_counts: dict[int, int] = field(default_factory=dict)

    def to_csv(self, directory: str | os.PathLike[str], prefix: str = "") -> list[Path]:
        """Write ``{prefix}summary.csv`` and ``{prefix}series.csv``; return the paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = [d / f"{prefix}summary.csv", d / f"{prefix}series.csv"]
        pd.DataFrame([self.summary]).to_csv(paths[0], index=False)
        self.series.to_csv(paths[1], index=False)
        return paths

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write summary, status counts and series (column lists) as one JSON file."""
        doc = {
            "summary": self.summary,
            "status_counts": {str(k): v for k, v in self.status_counts.items()},
            "series": {c: self.series[c].tolist() for c in self.series.columns},
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
        return path

    def to_parquet(self, path: str | os.PathLike[str]) -> Path:
        """Write the series as Parquet (needs pyarrow: ``pip install gmem[parquet]``)."""
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "Parquet output needs pyarrow: pip install 'gmem[parquet]'"
            ) from None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.series.to_parquet(path, index=False)
        return path

    def write(
        self,
        directory: str | os.PathLike[str],
        prefix: str = "",
        formats: Iterable[str] = ("csv", "json", "parquet"),
    ) -> list[Path]:
        """Write every requested format into ``directory``; Parquet is skipped silently
        when pyarrow is not installed. Returns the paths written."""
        d = Path(directory)
        out: list[Path] = []
        for fmt in formats:
            if fmt == "csv":
                out += self.to_csv(d, prefix)
            elif fmt == "json":
                out.append(self.to_json(d / f"{prefix}run.json"))
            elif fmt == "parquet":
                if _have_pyarrow():
                    out.append(self.to_parquet(d / f"{prefix}series.parquet"))
            else:
                raise ValueError(f"unknown output format {fmt!r} (csv, json, parquet)")
        return out


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class _Samples:
    """Growable numpy store of stats snapshots (int64 counters, float seconds)."""

    def __init__(self) -> None:
        self.columns: list[str] | None = None
        self.counts = np.zeros((0, 0), np.int64)
        self.elapsed = np.zeros(0, np.float64)
        self.n = 0

    def add(self, applied: int, workload: int, elapsed: float, stats: dict[str, Any]) -> None:
        if self.columns is None:
            self.columns = ["applied_events", "workload_events", *stats]
            self.counts = np.zeros((64, len(self.columns)), np.int64)
            self.elapsed = np.zeros(64, np.float64)
        if self.n == len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])
            self.elapsed = np.concatenate([self.elapsed, np.zeros_like(self.elapsed)])
        self.counts[self.n] = [applied, workload, *(stats[c] for c in self.columns[2:])]
        self.elapsed[self.n] = elapsed
        self.n += 1

    def last_applied(self) -> int:
        return int(self.counts[self.n - 1, 0]) if self.n else -1

    def frame(self) -> pd.DataFrame:
        if self.columns is None:
            return pd.DataFrame()
        df = pd.DataFrame(self.counts[: self.n], columns=self.columns)
        df.insert(2, "elapsed_s", self.elapsed[: self.n])
        return df


def _as_batches(workload) -> Iterable[np.ndarray]:
    if isinstance(workload, np.ndarray):
        return [workload]
    return workload


class Runner:
    """Applies a workload to a VM under a policy, sampling `vm.stats()`.

    Every ``sample_every`` events (workload events plus those the policy adds), a row of
    the time series is taken; batches are cut at those points so samples land exactly.
    Each row also says how far through the workload the run is (``workload_events``,
    interpolated within a batch that the policy rewrote), so that strategies whose
    policies add different numbers of events can be plotted against one axis.
    Follow-up rounds per batch are bounded by ``max_rounds`` (a policy that keeps
    returning events cannot loop forever).
    """

    def __init__(
        self,
        vm,
        policy: Policy | None = None,
        *,
        sample_every: int = 1 << 16,
        progress: bool = False,
        max_rounds: int = 16,
        label: str | None = None,
    ) -> None:
        if sample_every <= 0:
            raise ValueError(f"sample_every must be positive, got {sample_every}")
        # a GuestVm stands in for its Vm and also tells policies its `huge_order`
        self.vm = vm
        self.policy = policy if policy is not None else make_policy()
        self.sample_every = sample_every
        self.progress = progress
        self.max_rounds = max_rounds
        self.label = label
        self._samples = _Samples()
        self._applied = 0
        self._next_sample = sample_every
        self._wl_done = 0  # workload events of the batches finished
        self._wl_len = 0  # workload events of the batch being applied
        self._tx_len = 0  # events of that batch after the policy's transform
        self._tx_applied = 0
        self._status_codes: dict[int, int] = {}
        self._t0 = 0.0

    def _workload_position(self) -> int:
        if self._tx_len == 0:
            return self._wl_done + self._wl_len
        return self._wl_done + self._wl_len * min(self._tx_applied, self._tx_len) // self._tx_len

    def _sample(self) -> None:
        self._samples.add(
            self._applied,
            self._workload_position(),
            time.perf_counter() - self._t0,
            self.vm.stats(),
        )

    def _count_status(self, status: np.ndarray) -> None:
        codes, counts = np.unique(status, return_counts=True)
        for c, k in zip(codes.tolist(), counts.tolist(), strict=True):
            self._status_codes[c] = self._status_codes.get(c, 0) + k

    def apply(self, events: np.ndarray) -> np.ndarray:
        """Apply one array, cutting it at sample points; return its statuses."""
        n = len(events)
        self._details = None
        if not n:
            return np.zeros(0, np.int32)
        events = np.ascontiguousarray(events, dtype=EVENT_DTYPE)
        parts = []
        details = []
        pos = 0
        while pos < n:
            take = min(n - pos, self._next_sample - self._applied)
            if self.policy.wants_details:
                st, det = self.vm.apply(events[pos : pos + take], details=True)
                parts.append(np.asarray(st))
                details.append(det)
            else:
                parts.append(np.asarray(self.vm.apply(events[pos : pos + take])))
            pos += take
            self._applied += take
            self._tx_applied += take
            if self._applied >= self._next_sample:
                self._sample()
                self._next_sample += self.sample_every
        status = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._details = np.concatenate(details) if details else None
        self._count_status(status)
        return status

    def _follow(self, events: np.ndarray, status: np.ndarray, round: int):
        """The policy's reaction to an applied array: detail-driven events first."""
        extra = None
        if self._details is not None:
            extra = self.policy.after_details(self.vm, events, status, self._details)
        return _concat([extra, self.policy.after_batch(self.vm, events, status, round)])

    def _apply_with_followups(self, events: np.ndarray, workload_len: int) -> None:
        self._wl_len, self._tx_len, self._tx_applied = workload_len, len(events), 0
        status = self.apply(events)
        self._tx_len = 0
        follow = self._follow(events, status, 0)
        rounds = 1
        while follow is not None and len(follow) and rounds <= self.max_rounds:
            status = self.apply(follow)
            follow = self._follow(follow, status, rounds)
            rounds += 1
        self._wl_done += workload_len
        self._wl_len = 0

    def run(self, workload, *, meta: dict[str, Any] | None = None) -> RunResult:
        """Run ``workload`` (an `EventStream`, an iterable of event arrays or one array)."""
        self.policy.configure(self.vm)
        total = getattr(workload, "total_events", None)
        self._t0 = time.perf_counter()
        self._sample()
        n_workload = 0
        batches = 0
        bar = None
        if self.progress:
            from gmem.reports import progress_bar

            bar = progress_bar(total, description=self.label or _strategy_of(self.vm))
            bar.__enter__()
        try:
            for batch in _as_batches(workload):
                n_workload += len(batch)
                batches += 1
                self._apply_with_followups(self.policy.transform(batch), len(batch))
                if bar is not None:
                    bar.advance(len(batch))
            last = self.policy.finish(self.vm)
            if last is not None and len(last):
                self._apply_with_followups(last, 0)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        if self._samples.last_applied() != self._applied:
            self._sample()
        wall = time.perf_counter() - self._t0
        return self._result(n_workload, batches, wall, meta or {})

    def _result(self, n_workload: int, batches: int, wall: float, meta) -> RunResult:
        series = self._samples.frame()
        final = self.vm.stats()
        summary: dict[str, Any] = {
            "strategy": _strategy_of(self.vm),
            "vm_type": str(getattr(self.vm, "vm_type", "")),
            **meta,
            "policy": self.policy.describe(),
            "workload_events": n_workload,
            "applied_events": self._applied,
            "batches": batches,
            "wall_s": round(wall, 6),
            "events_per_s": round(self._applied / wall) if wall > 0 else 0,
        }
        summary.update({k: int(v) for k, v in final.items()})
        if "pages_allocated" in series:
            summary["mean_pages_allocated"] = round(float(series["pages_allocated"].mean()), 1)
        if "double_backed_pages" in series:
            summary["peak_double_backed_pages"] = int(series["double_backed_pages"].max())
        ok = self._status_codes.get(0, 0)
        summary["failed_events"] = self._applied - ok
        for name in ("EFAULT", "EAGAIN", "ENOMEM", "EINVAL"):
            summary[f"status_{name.lower()}"] = self._status_codes.get(-getattr(errno, name), 0)
        summary.update(self.policy.counters())
        return RunResult(summary, series, dict(sorted(self._status_codes.items())))


def run(
    vm,
    workload,
    policy: Policy | None = None,
    *,
    sample_every: int = 1 << 16,
    progress: bool = False,
    meta: dict[str, Any] | None = None,
) -> RunResult:
    """Run ``workload`` on ``vm`` (a `gmem.Vm` or a `GuestVm` from `build_vm`) under
    ``policy`` (default: `make_policy()`, QEMU's behaviour), sampling `vm.stats()` every
    ``sample_every`` events; ``meta`` entries are copied into the summary."""
    runner = Runner(vm, policy, sample_every=sample_every, progress=progress)
    return runner.run(workload, meta=meta)
