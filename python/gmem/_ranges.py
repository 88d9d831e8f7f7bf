"""Range numerics shared by the policies and the runner, vectorised with numpy.

`last_writer` finds, for every elementary segment of a union of ranges, the last range
covering it (an exact segment tree over the segments, updated level by level for all
ranges at once); `segment_runs` merges equal neighbours back into ranges;
`align_to_huge` cuts ranges to whole huge pages; `concat_events` joins optional arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["align_to_huge", "concat_events", "last_writer", "segment_runs"]


def concat_events(parts: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The non-empty arrays of ``parts`` joined, or None if there are none."""
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def align_to_huge(events: np.ndarray, ops: np.ndarray, order: int) -> np.ndarray:
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


def last_writer(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def segment_runs(bounds: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, ...]:
    """Merge consecutive segments with equal ``key`` (>= 0; -1 = leave out) into runs:
    ``(gfn, npages, key)`` per run."""
    brk = np.ones(len(key), bool)
    brk[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], len(key))
    keep = key[starts] >= 0
    starts, ends = starts[keep], ends[keep]
    return bounds[starts], bounds[ends] - bounds[starts], key[starts]
