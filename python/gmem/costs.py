"""The cost model: nanoseconds per modelled step, with overrides from Python or TOML.

The defaults below are the core's built-in defaults; `docs/cost-model.md` gives the
source or the derivation of each. ``modelled_ns`` in `vm.stats()` is the sum, over every
step the simulation took, of that step's cost.

A TOML override file holds integer nanoseconds, either at top level or under a
``[costs]`` table::

    # costs.toml
    [costs]
    zero_4k = 105        # a faster memset than the default's streaming figure
    tdx_accept = 8000

Load it with `load_costs` and apply with `apply_costs` (or ``host.set_costs``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["DEFAULT_COSTS", "apply_costs", "load_costs", "validate_costs"]

#: Every cost key with its default in nanoseconds.
DEFAULT_COSTS: dict[str, int] = {
    "alloc_4k": 771,
    "alloc_2m": 2000,
    "alloc_1g": 4000,
    "free_4k": 383,
    "free_2m": 2000,
    "free_1g": 4000,
    "zero_4k": 280,
    "zero_2m": 165000,
    "zero_1g": 84480000,
    "stage2_map": 1500,
    "prefault_map": 700,
    "stage2_zap": 500,
    "stage2_zap_entry": 20,
    "tlb_flush": 2000,
    "split": 5000,
    "merge": 5000,
    "exit_roundtrip": 5000,
    "attr_per_gfn": 100,
    "attr_range": 300,
    "rmpupdate": 1000,
    "pvalidate": 1000,
    "tdx_page_add": 5000,
    "tdx_page_aug": 4000,
    "tdx_accept": 6000,
    "tdx_page_remove": 3000,
    "host_fault": 2210,
    "host_unmap": 287,
    "host_mmap_fault": 1840,
    "direct_map_remove": 250,
    "direct_map_restore": 150,
    "direct_map_flush": 2000,
    "direct_map_split": 4000,
}


def validate_costs(costs: Mapping[str, object], *, source: str = "costs") -> dict[str, int]:
    """Check names and values; return a plain ``{name: int}`` dict.

    An unknown key, or a value that is not a non-negative integer, raises `ValueError`
    naming it (and ``source``, e.g. the TOML file).
    """
    out: dict[str, int] = {}
    for key, value in costs.items():
        if key not in DEFAULT_COSTS:
            known = ", ".join(DEFAULT_COSTS)
            raise ValueError(f"{source}: unknown cost key {key!r} (known: {known})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{source}: cost {key!r} must be a non-negative integer (ns), got {value!r}"
            )
        out[key] = value
    return out


def load_costs(path: str | os.PathLike[str]) -> dict[str, int]:
    """Read cost overrides from a TOML file (top level or a ``[costs]`` table)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not valid TOML: {e}") from None
    if "costs" in data:
        if not isinstance(data["costs"], dict) or len(data) != 1:
            raise ValueError(f"{os.fspath(path)}: expected only a [costs] table")
        data = data["costs"]
    return validate_costs(data, source=os.fspath(path))


def apply_costs(host, costs: Mapping[str, int] | str | os.PathLike[str] | None) -> dict[str, int]:
    """Apply overrides (a mapping or a TOML path) to ``host``; return the full model."""
    if costs is not None:
        if isinstance(costs, (str, os.PathLike)):
            overrides = load_costs(costs)
        else:
            overrides = validate_costs(costs)
        if overrides:
            host.set_costs(overrides)
    return dict(host.costs())
