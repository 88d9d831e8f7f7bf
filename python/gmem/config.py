"""The knobs of a run: `RunConfig`, with the one copy of every default and allowed value.

A `RunConfig` is frozen and checked when it is made: a bad value raises `ConfigError`
(a `ValueError`) whose message names the knob, the value and what is allowed, as in
``retry: must be >= 0, got -1``. The command line, a sweep's grid cells and notebooks
all build one; `gmem.experiment.run_experiment` runs it::

    from gmem.experiment import RunConfig, run_experiment
    config = RunConfig(workload="hugepage-frag", pages=1 << 15, huge_order=9,
                       params={"per_granule": 4}, merge_schedule="periodic")
    results = run_experiment(config, ["dual", "inplace"])

`check_knob` is the per-knob check itself, for readers of other inputs (a grid file).
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from gmem.constants import HUGE_ORDERS, MPOL_NAMES, VM_TYPES, VM_TYPES_WITHOUT_PRIVATE_MEM
from gmem.costs import validate_costs
from gmem.streams import DEFAULT_CHUNK
from gmem.workloads import (
    COMMON_PARAMETERS,
    get_workload,
    workload_converts,
    workload_parameters,
    workload_vm_type,
)

__all__ = [
    "DEFAULT_PAGES",
    "DISCARD_MODES",
    "FAULT_MODES",
    "KNOB_CHOICES",
    "KNOB_MINIMUM",
    "MERGE_SCHEDULES",
    "ConfigError",
    "RunConfig",
    "UsageError",
    "check_knob",
    "check_params",
    "check_vm_type",
    "default_jobs",
    "parse_mempolicy",
]

#: The guest size of a built-in workload when none is given: an 8 GiB guest.
DEFAULT_PAGES = 1 << 21
#: What the VMM does with the side of a converted range that is no longer used.
DISCARD_MODES = ("eager", "deferred", "never")
#: What the VMM does on a memory-fault exit.
FAULT_MODES = ("convert", "exit")
#: When split huge folios merge back: at once (the core's ``merge="eager"``), or by a
#: pass every ``merge_every`` events (the core's ``merge="deferred"`` plus
#: ``vm.merge_pass()``). Not to be confused with the core's merge policy names.
MERGE_SCHEDULES = ("eager", "periodic")

#: The knobs that take one of a few values. ``vm_type`` also takes the VM types without
#: private memory (`gmem.constants.VM_TYPES_WITHOUT_PRIVATE_MEM`, ``"default"``), for the
#: workloads that convert nothing (`gmem.workloads.DEFAULT_VM_WORKLOADS`).
KNOB_CHOICES: dict[str, tuple[Any, ...]] = {
    "vm_type": VM_TYPES,
    "huge_order": HUGE_ORDERS,
    "discard": DISCARD_MODES,
    "fault": FAULT_MODES,
    "merge_schedule": MERGE_SCHEDULES,
}
#: The integer knobs and their smallest value.
KNOB_MINIMUM: dict[str, int] = {
    "pages": 1,
    "seed": 0,
    "chunk": 1,
    "retry": 0,
    "discard_every": 1,
    "merge_every": 1,
    "sample_every": 1,
    "nodes": 1,
    "host_pages": 1,
    # not a `RunConfig` field: how many strategies run at once changes how long a run
    # takes, never what it computes (`gmem.experiment.run_experiment` takes it)
    "jobs": 1,
}
_BOOL_KNOBS = ("coalesce", "prefault")
#: Knobs whose None means "derived": a trace's own extent, a pass per batch, ~400 samples.
_OPTIONAL = ("pages", "discard_every", "sample_every", "host_pages", "mempolicy")
#: Modes that take no node list (``local``, ``default``) and those that need one.
_NO_NODES = ("default", "local")


def parse_mempolicy(text: str, nodes: int = 64) -> tuple[int, list[int]]:
    """``MODE[:N,N-M,...]`` as ``(MPOL_* value, node ids)``: ``bind:0``,
    ``interleave:0,1``, ``preferred:1``, ``preferred_many:0-2``, ``local``. Raises
    `ValueError` naming what is wrong, including a node the host (of ``nodes`` nodes)
    lacks."""
    if not isinstance(text, str):
        raise ValueError(f"expected MODE[:NODES], got {text!r}")
    name, _, spec = text.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in MPOL_NAMES:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(MPOL_NAMES)})")
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"bad node {part!r} in {text!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"bad node range {part!r} in {text!r}")
        ids.extend(range(first, last + 1))
    if name in _NO_NODES and ids:
        raise ValueError(f"policy {name!r} takes no nodes, got {text!r}")
    if name not in _NO_NODES and name != "preferred" and not ids:
        raise ValueError(f"policy {name!r} needs nodes, as in {name}:0,1")
    bad = [n for n in ids if n >= nodes]
    if bad:
        raise ValueError(f"node {bad[0]} is not on a host of {nodes} node(s)")
    return MPOL_NAMES[name], sorted(set(ids))


def check_vm_type(workload: str, vm_type: str) -> str | None:
    """What is wrong with running ``workload`` on a VM of ``vm_type`` (both known), or
    None: a workload that converts needs private memory, one that converts nothing runs
    on the VM type it was written for."""
    wants = workload_vm_type(workload)
    if workload_converts(workload) and vm_type in VM_TYPES_WITHOUT_PRIVATE_MEM:
        return (
            f"a {vm_type!r} VM has no private memory (KVM_CAP_MEMORY_ATTRIBUTES is 0) and "
            f"workload {workload!r} converts memory; use {', '.join(VM_TYPES)}"
        )
    if not workload_converts(workload) and vm_type != wants:
        return (
            f"workload {workload!r} runs a VM without private memory: vm_type must be "
            f"{wants!r}, got {vm_type!r}"
        )
    return None


class UsageError(ValueError):
    """Bad input to a run as a user gave it: an unknown workload parameter, a bad knob
    (`ConfigError`), a bad command-line argument. ``gmem`` exits with status 2."""


class ConfigError(UsageError):
    """A knob with a bad value; ``knob`` is its name (``params.X`` for a workload
    parameter), and the message names it, the value and what is allowed."""

    def __init__(self, knob: str, problem: str) -> None:
        self.knob = knob
        super().__init__(f"{knob}: {problem}")


def default_jobs() -> int:
    """The CPUs this process may run on: how many strategies ``gmem compare`` runs at
    once, and how many cells ``gmem sweep`` runs at once, unless told."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_knob(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the knob ``name`` (a phrase naming the value and
    what is allowed), or None if it is fine. Only the knobs with a fixed domain:
    `KNOB_CHOICES`, `KNOB_MINIMUM` and ``coalesce``."""
    if name in KNOB_MINIMUM:
        if not _is_int(value):
            return f"expected an integer, got {value!r}"
        if value < KNOB_MINIMUM[name]:
            return f"must be >= {KNOB_MINIMUM[name]}, got {value!r}"
    elif name in _BOOL_KNOBS and not isinstance(value, bool):
        return f"expected true or false, got {value!r}"
    if name == "vm_type" and value in VM_TYPES_WITHOUT_PRIVATE_MEM:
        return None
    if name in KNOB_CHOICES and (
        isinstance(value, bool)
        or not any(type(value) is type(c) and value == c for c in KNOB_CHOICES[name])
    ):
        known = ", ".join(map(str, KNOB_CHOICES[name]))
        return f"unknown value {value!r} (known: {known})"
    return None


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _fits(value: Any, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind == "bool":  # 0/1 as well, as a command line gives them
        return isinstance(value, bool) or (_is_int(value) and value in (0, 1))
    if kind == "int":
        return _is_int(value)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return True  # an annotation this check does not know: left to the workload


def check_params(workload: str, params: Mapping[str, Any]) -> None:
    """Check workload parameters against the workload's signature: an unknown name raises
    `UsageError` (listing the workload's parameters), a value of the wrong type
    `ConfigError` (``knob`` = ``params.X``); an unknown workload raises `ValueError`.
    Every workload also takes `gmem.workloads.COMMON_PARAMETERS` (not listed in the
    message, which names the workload's own)."""
    own = workload_parameters(workload)
    allowed = {**own, **COMMON_PARAMETERS}
    for key, value in params.items():
        if key not in allowed:
            known = ", ".join(sorted(own)) or "none"
            raise UsageError(
                f"workload {workload!r} has no parameter {key!r} (parameters: {known})"
            )
        kinds = [k.strip() for k in allowed[key].split("|")]
        if not any(_fits(value, k) for k in kinds):
            expected = " or ".join(_TYPE_NAMES.get(k, k) for k in kinds)
            raise ConfigError(
                f"params.{key}",
                f"expected {expected}, got {value!r} (a parameter of workload {workload!r})",
            )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every knob of a run, checked on construction (`ConfigError` names a bad one).

    ``workload`` is a name from `gmem.workloads.WORKLOADS`,
    `gmem.workloads.DEFAULT_VM_WORKLOADS` or ``trace:PATH``, ``params`` its parameters.
    ``vm_type`` must suit the workload (`check_vm_type`): a workload that converts needs
    private memory, one of `gmem.workloads.DEFAULT_VM_WORKLOADS` runs on ``"default"``
    (`gmem.workloads.workload_vm_type`; the command line and grids pick it when not
    told). ``pages`` is the guest size (None: `DEFAULT_PAGES`, or a trace's own
    extent); ``chunk`` the events per batch; ``costs`` cost-model overrides (a mapping,
    or a TOML path read when the run starts). The VMM policy knobs are those of
    `gmem.policies.make_policy`; ``sample_every`` None samples about 400 times a run.
    ``nodes`` splits host memory over that many NUMA nodes, ``mempolicy`` (``MODE[:NODES]``,
    `parse_mempolicy`) is the VMM's memory policy (``set_mempolicy``), placing every page
    of the run; ``host_pages`` sizes host RAM (None: room for every gfn backed twice).
    """

    workload: str = "dma-churn"
    params: Mapping[str, Any] = field(default_factory=dict)
    pages: int | None = None
    seed: int = 0
    chunk: int = DEFAULT_CHUNK
    vm_type: str = "sw_protected"
    huge_order: int = 0
    costs: Mapping[str, int] | str | os.PathLike[str] | None = None
    discard: str = "eager"
    discard_every: int | None = None
    fault: str = "convert"
    retry: int = 3
    merge_schedule: str = "eager"
    merge_every: int = 1 << 20
    coalesce: bool = False
    prefault: bool = False
    sample_every: int | None = None
    nodes: int = 1
    mempolicy: str | None = None
    host_pages: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            problem = check_knob(f.name, value)
            if problem is not None:
                raise ConfigError(f.name, problem)
        if not isinstance(self.workload, str):
            raise ConfigError("workload", f"expected a workload name, got {self.workload!r}")
        get_workload(self.workload)  # an unknown name: ValueError listing the known ones
        problem = check_vm_type(self.workload, str(self.vm_type))
        if problem is not None:
            raise ConfigError("vm_type", problem)
        if self.vm_type in VM_TYPES_WITHOUT_PRIVATE_MEM and self.huge_order:
            raise ConfigError(
                "huge_order",
                f"a {self.vm_type!r} VM's guest_memfd is INIT_SHARED, which HugeTLB "
                f"guest_memfd refuses: must be 0, got {self.huge_order}",
            )
        if not isinstance(self.params, Mapping):
            raise ConfigError("params", f"expected a mapping, got {self.params!r}")
        params = {str(k).replace("-", "_"): v for k, v in self.params.items()}
        check_params(self.workload, params)
        object.__setattr__(self, "params", MappingProxyType(params))
        if self.mempolicy is not None:
            try:
                parse_mempolicy(self.mempolicy, self.nodes)
            except ValueError as e:
                raise ConfigError("mempolicy", str(e)) from None
        costs = self.costs
        if isinstance(costs, Mapping):
            object.__setattr__(self, "costs", MappingProxyType(validate_costs(costs)))
        elif costs is not None and not isinstance(costs, (str, os.PathLike)):
            raise ConfigError(
                "costs", f"expected a mapping or a TOML path, got {type(costs).__name__}"
            )

    def __reduce__(self):
        # the read-only views of params and costs do not pickle; their contents do
        knobs = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("params", "costs"):
            if isinstance(knobs[name], Mapping):
                knobs[name] = dict(knobs[name])
        return (functools.partial(RunConfig, **knobs), ())

    @property
    def is_trace(self) -> bool:
        return self.workload.startswith("trace:")

    @property
    def guest_pages(self) -> int | None:
        """``pages``, or `DEFAULT_PAGES` for a built-in workload (None: a trace's extent)."""
        if self.pages is None and not self.is_trace:
            return DEFAULT_PAGES
        return self.pages

    def policy_knobs(self) -> dict[str, Any]:
        """The keyword arguments of `gmem.policies.make_policy` for this run."""
        return {
            "discard": self.discard,
            "discard_every": self.discard_every,
            "fault": self.fault,
            "retry": self.retry,
            "merge_schedule": self.merge_schedule,
            "merge_every": self.merge_every,
            "coalesce": self.coalesce,
            "prefault": self.prefault,
        }
