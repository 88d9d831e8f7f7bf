"""Event streams: the re-iterable, re-chunked batches that workloads generate and traces
replay, and the helpers that build them.

`gmem.workloads` and `gmem.traces` both produce `EventStream` objects; this module is
what they share (and re-export).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from gmem._events import EVENT_DTYPE

__all__ = ["DEFAULT_CHUNK", "EventStream", "chunked", "events"]

#: Events per batch unless a workload is asked for another ``chunk``.
DEFAULT_CHUNK = 1 << 16


class EventStream:
    """A re-iterable stream of event batches.

    ``factory`` returns a fresh iterator of `EVENT_DTYPE` arrays each time; the stream
    re-chunks them to at most ``chunk`` events. ``total_events`` is the number of events
    (an estimate where the workload draws it at random; progress bars use it), or
    ``None`` when unknown.
    """

    def __init__(
        self,
        factory: Callable[[], Iterable[np.ndarray]],
        *,
        name: str,
        pages: int,
        chunk: int = DEFAULT_CHUNK,
        total_events: int | None = None,
    ) -> None:
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self._factory = factory
        self.name = name
        self.pages = pages
        self.chunk = chunk
        self.total_events = total_events

    def __iter__(self) -> Iterator[np.ndarray]:
        return chunked(self._factory(), self.chunk)

    def to_array(self) -> np.ndarray:
        """All events in one array (for tests and small guests)."""
        parts = list(self)
        return np.concatenate(parts) if parts else np.empty(0, EVENT_DTYPE)

    def __repr__(self) -> str:
        return (
            f"EventStream({self.name!r}, pages={self.pages}, chunk={self.chunk}, "
            f"total_events={self.total_events})"
        )


def chunked(pieces: Iterable[np.ndarray], chunk: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of event arrays into arrays of exactly ``chunk`` events (the
    last may be shorter), splitting large pieces and joining small ones."""
    pending: list[np.ndarray] = []
    held = 0
    for piece in pieces:
        if piece.dtype != EVENT_DTYPE:
            piece = piece.astype(EVENT_DTYPE)
        start = 0
        while start < len(piece):
            take = min(chunk - held, len(piece) - start)
            pending.append(piece[start : start + take])
            held += take
            start += take
            if held == chunk:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0].copy()
                pending, held = [], 0
    if held:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0].copy()


def events(op, gfn, npages, value=0) -> np.ndarray:
    """Build an event array from broadcastable columns."""
    op, gfn, npages, value = np.broadcast_arrays(
        np.asarray(op, np.uint8),
        np.asarray(gfn, np.uint64),
        np.asarray(npages, np.uint64),
        np.asarray(value, np.uint64),
    )
    out = np.empty(op.shape, EVENT_DTYPE)
    out["op"], out["gfn"], out["npages"], out["value"] = op, gfn, npages, value
    return out.reshape(-1)
