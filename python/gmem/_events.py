"""Event codes and the structured dtypes of `vm.apply`.

Pure numpy, so that workloads, traces and policies work (and can be tested) without the
compiled core. `gmem` re-exports these names; the core reads `EVENT_DTYPE` arrays and
writes `DETAIL_DTYPE` arrays with exactly these layouts. `apply` is `gmem.Vm.apply`: it
converts what the caller gives to the one layout the compiled `Vm._apply` reads.
"""

from __future__ import annotations

import enum
from typing import Any

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
    #: ``memory_failure()`` on the guest_memfd page behind each gfn's private view
    #: (`gmem.GuestMemfd.memory_failure`); not part of trace format 1.
    MEMORY_FAILURE = 13
    #: ``KVM_PRE_FAULT_MEMORY`` over the range (`gmem.Vm.pre_fault_memory`); not part of
    #: trace format 1.
    PRE_FAULT = 14


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

#: What the compiled `Vm._apply` reads in place: `EVENT_DTYPE` with little-endian fields
#: (`EVENT_DTYPE` itself on a little-endian machine).
_PACKED_EVENT_DTYPE = EVENT_DTYPE.newbyteorder("<")


def as_events(events: Any) -> np.ndarray:
    """`events`, a one-dimensional structured array with (at least) the fields of
    `EVENT_DTYPE`, as a C-contiguous `_PACKED_EVENT_DTYPE` array: itself when it already
    is one, else a copy whose fields are cast from the caller's. A field of another
    integer type is accepted when every value fits (`ValueError` naming the field
    otherwise); a field that does not hold integers is a `TypeError`."""
    try:
        names = events.dtype.names
    except AttributeError:
        raise TypeError("events must be a numpy array of gmem.EVENT_DTYPE") from None
    if names is None:
        raise TypeError("events must be a structured array of gmem.EVENT_DTYPE")
    if events.ndim != 1:
        raise ValueError("events must be one-dimensional")
    if events.dtype == _PACKED_EVENT_DTYPE and events.flags.c_contiguous:
        return events
    columns = [_column(events, name, code) for name, code in _FIELD_CODES]
    out = np.empty(len(events), _PACKED_EVENT_DTYPE)
    for (name, _), column in zip(_FIELD_CODES, columns, strict=True):
        out[name] = column
    return out


#: Each field of `EVENT_DTYPE` and the type code its values must fit.
_FIELD_CODES = (("op", "u1"), ("gfn", "u8"), ("npages", "u8"), ("value", "u8"))


def _column(events: np.ndarray, name: str, code: str) -> np.ndarray:
    """The field `name` of `events`, once its values are known to fit `code` (the caller
    assigns it into the packed array, which casts it there)."""
    try:
        field = events[name]
    except (KeyError, ValueError):
        raise TypeError(f'events lack the field "{name}"') from None
    if np.can_cast(field.dtype, code, casting="safe"):
        return field
    # Integers of another width or signedness are fine when every value fits.
    if field.dtype.kind not in "iu":
        raise TypeError(f'events field "{name}" must hold integers, not {field.dtype}')
    if field.size > 0:
        lo, hi = field.min(), field.max()
        info = np.iinfo(code)
        if lo < info.min or hi > info.max:
            raise ValueError(
                f'events field "{name}" holds values from {lo} to {hi}, outside {code}'
            )
    return field


def apply(self: Any, events: Any, *, details: bool = False) -> Any:
    """apply(events, *, details=False): run an `EVENT_DTYPE` batch on this VM; int32 status
    per event (0, -errno, or `KVM_EXIT_MMIO` for an emulated-MMIO exit), and with
    ``details=True`` a `DETAIL_DTYPE` array too.

    ``events`` is a one-dimensional structured array with the fields of `EVENT_DTYPE`
    (see `as_events`); an `EVENT_DTYPE` array in one piece is read in place."""
    packed = as_events(events)
    if not details:
        return self._apply(packed, False)
    status, records = self._apply(packed, True)
    return status, records.view(DETAIL_DTYPE)
