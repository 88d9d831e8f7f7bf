"""Event codes and the structured dtypes of `vm.apply`.

Pure numpy, so that workloads, traces and policies work (and can be tested) without the
compiled core. `gmem` re-exports these names; the core reads `EVENT_DTYPE` arrays and
writes `DETAIL_DTYPE` arrays with exactly these layouts.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["CONVERSION_OPS", "DETAIL_DTYPE", "DETAIL_IMPLICIT_CONVERSION", "EVENT_DTYPE", "Op"]


class Op(enum.IntEnum):
    """What one event does; see the table in ``docs/api.md`` (Events)."""

    CONVERT_PRIVATE = 0
    CONVERT_SHARED = 1
    GUEST_READ_PRIVATE = 2
    GUEST_READ_SHARED = 3
    GUEST_WRITE_PRIVATE = 4
    GUEST_WRITE_SHARED = 5
    PUNCH_HOLE = 6
    PIN = 7
    UNPIN = 8
    DISCARD_SHARED = 9
    HOST_READ = 10
    HOST_WRITE = 11
    ALLOCATE = 12


#: One event: ``op`` (an `Op`), first ``gfn``, ``npages`` (4 KiB pages) and ``value``
#: (written by writes; unused otherwise).
EVENT_DTYPE = np.dtype([("op", "u1"), ("gfn", "u8"), ("npages", "u8"), ("value", "u8")])

#: Per-event details of ``vm.apply(events, details=True)``.
DETAIL_DTYPE = np.dtype(
    [
        ("value", "u8"),
        ("fault_gpa", "u8"),
        ("fault_flags", "u4"),
        ("allocated", "u8"),
        ("freed", "u8"),
    ]
)

#: ``fault_flags`` bit of a detail: the memory-fault exit at ``fault_gpa`` was answered by
#: an implicit conversion (``vm.set_options(fault_policy="convert")``) and the access then
#: went through; the other bits are the exit's flags (``KVM_MEMORY_EXIT_FLAG_PRIVATE``).
DETAIL_IMPLICIT_CONVERSION = 1 << 31

#: The two conversion ops, as a numpy array for ``np.isin``.
CONVERSION_OPS = np.array([Op.CONVERT_PRIVATE, Op.CONVERT_SHARED], dtype=np.uint8)
