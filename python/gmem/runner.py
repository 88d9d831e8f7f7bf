"""The runner: applies a workload to a VM under a policy, sampling `vm.stats()`.

`Runner` drives any object with the `gmem.policies.Policy` hooks; it reports progress
through a callback (``progress(n)`` after each workload batch of ``n`` events), so it
needs no terminal code. `RunResult` is what a run produced, with its writers.
`gmem.policies.run` is the usual way in.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gmem._events import CONVERSION_OPS, EVENT_DTYPE
from gmem._ranges import concat_events
from gmem.constants import VM_TYPES, VM_TYPES_WITHOUT_PRIVATE_MEM

__all__ = ["RunResult", "Runner", "strategy_of"]


def strategy_of(vm) -> str:
    """The strategy name of a `gmem.Vm` or `GuestVm` ("" for an object without one)."""
    return str(getattr(vm, "strategy", ""))


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

    def __init__(self, vm, policy, *, sample_every: int = 1 << 16, max_rounds: int = 16) -> None:
        if sample_every <= 0:
            raise ValueError(f"sample_every must be positive, got {sample_every}")
        # a GuestVm stands in for its Vm and also tells policies its `huge_order`
        self.vm = vm
        self.policy = policy
        self.sample_every = sample_every
        self.max_rounds = max_rounds
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
        failed = status[status != 0]
        if len(failed) < len(status):
            self._status_codes[0] = self._status_codes.get(0, 0) + len(status) - len(failed)
        codes, counts = np.unique(failed, return_counts=True)
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
        return concat_events([extra, self.policy.after_batch(self.vm, events, status, round)])

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

    def run(
        self,
        workload,
        *,
        meta: dict[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> RunResult:
        """Run ``workload`` (an `EventStream`, an iterable of event arrays or one array);
        ``progress(n)`` is called after each workload batch of ``n`` events."""
        self.policy.configure(self.vm)
        self._t0 = time.perf_counter()
        self._sample()
        n_workload = 0
        batches = 0
        no_private = str(getattr(self.vm, "vm_type", "")) in VM_TYPES_WITHOUT_PRIVATE_MEM
        for batch in _as_batches(workload):
            if no_private:
                self._refuse_conversions(workload, batch)
            n_workload += len(batch)
            batches += 1
            self._apply_with_followups(self.policy.transform(batch), len(batch))
            if progress is not None:
                progress(len(batch))
        last = self.policy.finish(self.vm)
        if last is not None and len(last):
            self._apply_with_followups(last, 0)
        if self._samples.last_applied() != self._applied:
            self._sample()
        wall = time.perf_counter() - self._t0
        return self._result(n_workload, batches, wall, meta or {})

    def _refuse_conversions(self, workload, batch: np.ndarray) -> None:
        """A VM without private memory cannot convert: refuse a batch that asks to, before
        any of it runs (`ValueError`)."""
        if np.isin(np.asarray(batch)["op"], CONVERSION_OPS).any():
            name = getattr(workload, "name", "this workload")
            raise ValueError(
                f"workload {name!r} converts memory, but a {self.vm.vm_type!r} VM has no "
                "private memory (KVM_CAP_MEMORY_ATTRIBUTES is 0): run it on "
                f"{', '.join(VM_TYPES)}"
            )

    def _result(self, n_workload: int, batches: int, wall: float, meta) -> RunResult:
        series = self._samples.frame()
        final = self.vm.stats()
        summary: dict[str, Any] = {
            "strategy": strategy_of(self.vm),
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
