"""VMM policies, and `run`: a workload on a VM under a policy (see `gmem.runner`).

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
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from gmem._events import CONVERSION_OPS, DETAIL_IMPLICIT_CONVERSION, EVENT_DTYPE, Op
from gmem._ranges import align_to_huge, concat_events, last_writer, segment_runs
from gmem.config import FAULT_MODES, MERGE_SCHEDULES, ConfigError, RunConfig, check_knob
from gmem.constants import (
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
    SHARED_SIDE,
    TWO_SIDED_STRATEGIES,
)
from gmem.runner import Runner, RunResult, strategy_of

__all__ = [
    "TWO_SIDED_STRATEGIES",
    "CoalesceConversions",
    "Compose",
    "DiscardDeferred",
    "DiscardEager",
    "DiscardNever",
    "FaultHandling",
    "MergePolicy",
    "MergeSchedule",
    "Policy",
    "PrefaultOnConvert",
    "RetryEagain",
    "RunResult",
    "Runner",
    "final_discards",
    "make_policy",
    "run",
]

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
        return concat_events([p.after_details(vm, events, status, details) for p in self.policies])

    def configure(self, vm) -> None:
        for p in self.policies:
            p.configure(vm)

    def transform(self, events: np.ndarray) -> np.ndarray:
        for p in self.policies:
            events = p.transform(events)
        return events

    def after_batch(self, vm, events, status, round):
        return concat_events([p.after_batch(vm, events, status, round) for p in self.policies])

    def finish(self, vm):
        return concat_events([p.finish(vm) for p in self.policies])

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


def _huge_discard_ops(vm) -> np.ndarray:
    """Discard ops that must cover whole huge pages: HugeTLB guest_memfd punches only
    huge-aligned ranges (``EINVAL`` otherwise), so on a VM built with ``huge_order`` the
    private-side punch — and for `two_offsets` the shared-side one — is cut to whole
    huge pages, as a VMM discarding a HugeTLB-backed RAM block must."""
    if not getattr(vm, "huge_order", 0):
        return np.empty(0, np.uint8)
    if SHARED_SIDE.get(strategy_of(vm)) == "second_range":
        return np.array([Op.PUNCH_HOLE, Op.DISCARD_SHARED], np.uint8)
    return np.array([Op.PUNCH_HOLE], np.uint8)


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
        self.active = strategy_of(vm) in TWO_SIDED_STRATEGIES
        self.wants_details = self.active
        self.huge_ops = _huge_discard_ops(vm)
        self.huge_order = int(getattr(vm, "huge_order", 0))

    def after_details(self, vm, events, status, details):
        implicit = (details["fault_flags"] & DETAIL_IMPLICIT_CONVERSION) != 0
        if not self.active or not implicit.any():
            return None
        flags = details["fault_flags"][implicit]
        out = np.zeros(int(implicit.sum()), EVENT_DTYPE)
        to_private = (flags & KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0
        out["op"] = np.where(to_private, Op.DISCARD_SHARED, Op.PUNCH_HOLE)
        out["gfn"] = details["fault_gpa"][implicit] >> PAGE_SHIFT
        out["npages"] = 1
        return align_to_huge(out, self.huge_ops, self.huge_order)

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
        return align_to_huge(out, self.huge_ops, self.huge_order)


class DiscardNever(Policy):
    """Never discard: the VMM leaves both backings allocated (double backing grows)."""

    name = "discard=never"


def final_discards(conversions: np.ndarray) -> np.ndarray:
    """The discards a deferred pass issues for a sequence of applied conversions.

    Only the *last* conversion of each page decides which side is unused, so a range
    converted shared and back private before the pass loses its shared side, never its
    private data. Adjacent pages with the same final direction become one event.
    """
    if not len(conversions):
        return _EMPTY
    start = conversions["gfn"]
    bounds, last = last_writer(start, start + conversions["npages"])
    key = np.full(len(last), -1, np.int64)
    covered = last >= 0
    key[covered] = conversions["op"][last[covered]] == Op.CONVERT_PRIVATE
    gfn, npages, private = segment_runs(bounds, key)
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

    def __init__(self, every: int | None = RunConfig.discard_every) -> None:
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
        self.active = strategy_of(vm) in TWO_SIDED_STRATEGIES
        self.huge_ops = _huge_discard_ops(vm)
        self.huge_order = int(getattr(vm, "huge_order", 0))
        self.pending, self.npending, self.passes = [], 0, 0

    def _flush(self) -> np.ndarray | None:
        if not self.pending:
            return None
        conv = np.concatenate(self.pending)
        self.pending, self.npending = [], 0
        self.passes += 1
        return align_to_huge(final_discards(conv), self.huge_ops, self.huge_order)

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

    MODES = FAULT_MODES

    def __init__(self, mode: str = RunConfig.fault) -> None:
        if mode not in self.MODES:
            raise ValueError(f"fault mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.name = f"fault={mode}"

    def configure(self, vm) -> None:
        vm.set_options(fault_policy=self.mode)


def _overlaps_any(events: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Whether each event's range ``[gfn, gfn + npages)`` overlaps the range of some event
    selected by ``mask``: O(n log m) for m selected."""
    gfn, end = events["gfn"], events["gfn"] + events["npages"]
    order = np.argsort(gfn[mask], kind="stable")
    starts = gfn[mask][order]
    # The furthest end among the selected ranges starting at or before each start.
    reach = np.maximum.accumulate(end[mask][order])
    k = np.searchsorted(starts, end, side="left")  # selected ranges starting before `end`
    hit = k > 0
    hit[hit] = reach[k[hit] - 1] > gfn[hit]
    return hit


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

    def __init__(self, max_rounds: int = RunConfig.retry) -> None:
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
        # Only conversions overlapping a refused range can be the last writer of a refused
        # page: the rest of the batch (most of it) stays out of the segment tree.
        conv &= _overlaps_any(events, refused)
        cev, crefused = events[conv], refused[conv]
        bounds, last = last_writer(cev["gfn"], cev["gfn"] + cev["npages"])
        key = np.full(len(last), -1, np.int64)
        retry = last >= 0
        retry[retry] = crefused[last[retry]]
        key[retry] = cev["op"][last[retry]]
        gfn, npages, op = segment_runs(bounds, key)
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


class MergeSchedule(Policy):
    """When split huge folios merge back (the ``merge_schedule`` knob).

    ``"eager"``: the core merges a huge range as soon as it is uniform again
    (``vm.set_options(merge="eager")``), as the HugeTLB guest_memfd tree does on
    to-private conversion. ``"periodic"``: the core defers merging
    (``vm.set_options(merge="deferred")``) and a pass (``vm.merge_pass()``) runs every
    ``every`` workload events, like a khugepaged-style background scan.
    """

    MODES = MERGE_SCHEDULES

    def __init__(
        self, mode: str = RunConfig.merge_schedule, every: int = RunConfig.merge_every
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"merge schedule must be one of {self.MODES}, got {mode!r}")
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


#: The former name of `MergeSchedule`.
MergePolicy = MergeSchedule


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


class PrefaultOnConvert(Policy):
    """On SNP, pre-fault each range converted to private (the ``prefault`` knob).

    QEMU "i386/kvm: Prefault memory on page state change" (Tom Lendacky, 2025): a page
    state change is followed by the guest touching the pages — on SNP, ``PVALIDATE`` of
    each page of a lazily accepted 4 MiB chunk — and with 4 KiB guest_memfd pages each
    touch exits to map one page, 1,024 exits per chunk; calling ``KVM_PRE_FAULT_MEMORY``
    over the range right after the conversion maps it without exits. Here a
    ``PRE_FAULT`` event follows each ``CONVERT_PRIVATE`` on an SNP VM (other VM types are
    left alone, as QEMU's motivation and this knob are SNP's). The conversion of the
    whole guest that starts every workload is QEMU's own at memslot creation, not a page
    state change, and is not pre-faulted. As with `DiscardEager`, the pre-fault is queued
    with the conversion, so it also runs if the conversion fails (it then maps the pages
    as their unchanged attribute says). Pages it maps count in ``prefaulted_pages``,
    not in ``stage2_faults`` (no exit: the guest's touches find them mapped), and cost
    ``prefault_map`` instead of ``stage2_map``; ``prefault_calls`` counts the events
    added.
    """

    name = "prefault"

    def __init__(self) -> None:
        self.active = True
        self.whole: int | None = None
        self.calls = 0

    def configure(self, vm) -> None:
        self.active = str(getattr(vm, "vm_type", "")) == "snp"
        self.whole = getattr(vm, "pages", None)
        self.calls = 0

    def transform(self, events: np.ndarray) -> np.ndarray:
        if not self.active or not len(events):
            return events
        conv = events["op"] == Op.CONVERT_PRIVATE
        if self.whole is not None:
            conv &= ~((events["gfn"] == 0) & (events["npages"] >= self.whole))
        if not conv.any():
            return events
        out = np.repeat(events, 1 + conv)
        at = np.cumsum(1 + conv)[conv] - 1
        out["op"][at] = Op.PRE_FAULT
        out["value"][at] = 0
        self.calls += int(conv.sum())
        return out

    def counters(self) -> dict[str, int]:
        return {"prefault_calls": self.calls} if self.active else {}


def make_policy(
    *,
    discard: str = RunConfig.discard,
    discard_every: int | None = RunConfig.discard_every,
    fault: str = RunConfig.fault,
    retry: int = RunConfig.retry,
    merge_schedule: str = RunConfig.merge_schedule,
    merge_every: int = RunConfig.merge_every,
    coalesce: bool = RunConfig.coalesce,
    prefault: bool = RunConfig.prefault,
    merge: str | None = None,
) -> Compose:
    """The standard VMM policy from its knobs (those of `gmem.config.RunConfig`, with its
    defaults: QEMU's behaviour — discard on conversion, convert on memory-fault exit,
    retry ``EAGAIN``, eager merge, no pre-fault). ``merge`` is the former name of
    ``merge_schedule``.
    A bad value raises `gmem.config.ConfigError` naming the knob."""
    if merge is not None:
        merge_schedule = merge
    knobs: dict[str, Any] = {
        "discard": discard,
        "discard_every": discard_every,
        "fault": fault,
        "retry": retry,
        "merge_schedule": merge_schedule,
        "merge_every": merge_every,
        "coalesce": coalesce,
        "prefault": prefault,
    }
    for name, value in knobs.items():
        problem = None if value is None and name == "discard_every" else check_knob(name, value)
        if problem is not None:
            raise ConfigError(name, problem)
    parts: list[Policy] = []
    if coalesce:
        parts.append(CoalesceConversions())
    if prefault:
        # before the discard policy: its discard lands between conversion and pre-fault,
        # as QEMU pre-faults once kvm_convert_memory() has discarded
        parts.append(PrefaultOnConvert())
    if discard == "eager":
        parts.append(DiscardEager())
    elif discard == "deferred":
        parts.append(DiscardDeferred(discard_every))
    else:
        parts.append(DiscardNever())
    parts.append(FaultHandling(fault))
    parts.append(RetryEagain(retry))
    parts.append(MergeSchedule(merge_schedule, merge_every))
    return Compose(parts)


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
    ``sample_every`` events; ``meta`` entries are copied into the summary. ``progress``
    shows a progress bar on a terminal (see `gmem.reports.progress_bar`)."""
    runner = Runner(vm, policy if policy is not None else make_policy(), sample_every=sample_every)
    if not progress:
        return runner.run(workload, meta=meta)
    from gmem.reports import progress_bar

    total = getattr(workload, "total_events", None)
    with progress_bar(total, description=strategy_of(vm)) as bar:
        return runner.run(workload, meta=meta, progress=bar.advance)
