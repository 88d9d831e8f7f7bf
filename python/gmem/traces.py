"""Event traces: gmem's own JSONL and CSV formats, and an importer for KVM ftrace text.

The formats are specified in ``docs/trace-format.md``. In short:

* JSONL: an optional header object ``{"gmem_trace": 1, "pages": N}``, then one event
  object per line, ``{"op": "CONVERT_SHARED", "gfn": 512, "npages": 16, "value": 0}``.
* CSV: the header ``op,gfn,npages,value`` (``value`` optional), one event per row;
  lines starting with ``#`` are comments (``# pages=N`` records the guest size).
* ftrace / trace-cmd text of the ``kvm_hypercall`` tracepoint: each
  ``KVM_HC_MAP_GPA_RANGE`` (nr ``0xc``) becomes a conversion of ``a1`` 4 KiB pages at
  gpa ``a0``, private when ``a2`` has ``KVM_MAP_GPA_RANGE_ENCRYPTED`` (bit 4). Other
  events and other hypercalls are skipped and counted.

A malformed line raises `TraceError` (a `ValueError`) naming the file and the line
number; ``skip_bad=True`` skips such lines instead and counts them. Readers stream in
chunks, so traces larger than memory replay fine.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gmem._events import EVENT_DTYPE, Op
from gmem.constants import PAGE_SHIFT, PAGES_2M
from gmem.streams import DEFAULT_CHUNK, EventStream, chunked, events

__all__ = [
    "KVM_HC_MAP_GPA_RANGE",
    "FtraceReader",
    "TraceError",
    "import_ftrace",
    "read_events",
    "read_trace",
    "trace_extent",
    "trace_format",
    "trace_workload",
    "write_csv",
    "write_jsonl",
    "write_trace",
]

#: ``include/uapi/linux/kvm_para.h``
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = 0xF  # bits 3:0, a preferred page size (hypercalls.rst)
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_RESERVED = ~0x1F & 0xFFFF_FFFF_FFFF_FFFF
_U64_MAX = (1 << 64) - 1
_PAGE_SIZE_NAMES = {0: "4k", 1: "2m", 2: "1g"}
_CSV_HEADER = ("op", "gfn", "npages", "value")
#: The ops of trace format 1: what a guest and its VMM did. Memory failures and
#: pre-faults (`Op.MEMORY_FAILURE`, `Op.PRE_FAULT`) are injected by a run (the
#: ``hwpoison_rate`` workload parameter, the ``prefault`` policy knob), not replayed.
_TRACE_OPS = [op for op in Op if op < Op.MEMORY_FAILURE]
_OP_NAMES = np.array([op.name for op in _TRACE_OPS])
_OP_NAME_SET = frozenset(_OP_NAMES.tolist())


class TraceError(ValueError):
    """A malformed trace line; ``path`` and ``lineno`` (1-based) say where."""

    def __init__(self, path: str | os.PathLike[str], lineno: int, message: str) -> None:
        self.path = os.fspath(path)
        self.lineno = lineno
        self.reason = message
        super().__init__(f"{self.path}:{lineno}: {message}")


def trace_format(path: str | os.PathLike[str]) -> str:
    """``"jsonl"``, ``"csv"`` or ``"ftrace"``, by the file name's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "ftrace"


# --- writing -------------------------------------------------------------------------


def _batches(events_: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(events_, np.ndarray):
        yield events_
    else:
        yield from events_


def _columns(batch: np.ndarray) -> tuple[np.ndarray, ...]:
    if batch.dtype != EVENT_DTYPE:
        batch = batch.astype(EVENT_DTYPE)
    if batch.size and batch["op"].max() >= len(_OP_NAMES):
        bad = int(batch["op"][batch["op"] >= len(_OP_NAMES)][0])
        raise ValueError(f"event op {bad} is not an op of trace format 1")
    return _OP_NAMES[batch["op"]], batch["gfn"], batch["npages"], batch["value"]


def write_jsonl(
    path: str | os.PathLike[str],
    events_: np.ndarray | Iterable[np.ndarray],
    *,
    pages: int | None = None,
) -> int:
    """Write events (an array or an iterable of arrays) as JSONL; return the count."""
    header: dict[str, int] = {"gmem_trace": 1}
    if pages is not None:
        header["pages"] = int(pages)
    return _write_rows(
        path,
        [json.dumps(header)],
        events_,
        '{{"op": "{}", "gfn": {}, "npages": {}, "value": {}}}\n',
    )


def write_csv(
    path: str | os.PathLike[str],
    events_: np.ndarray | Iterable[np.ndarray],
    *,
    pages: int | None = None,
) -> int:
    """Write events as CSV (header ``op,gfn,npages,value``); return the count."""
    head = ["# gmem_trace 1"]
    if pages is not None:
        head.append(f"# pages={int(pages)}")
    head.append(",".join(_CSV_HEADER))
    return _write_rows(path, head, events_, "{},{},{},{}\n")


def _write_rows(
    path: str | os.PathLike[str],
    head: list[str],
    events_: np.ndarray | Iterable[np.ndarray],
    row: str,
) -> int:
    """Write the header lines, then one ``row.format(op, gfn, npages, value)`` per event."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in head)
        for batch in _batches(events_):
            names, gfn, npages, value = _columns(batch)
            f.writelines(
                row.format(o, g, p, v)
                for o, g, p, v in zip(
                    names.tolist(), gfn.tolist(), npages.tolist(), value.tolist(), strict=True
                )
            )
            n += len(batch)
    return n


def write_trace(
    path: str | os.PathLike[str],
    events_: np.ndarray | Iterable[np.ndarray],
    *,
    pages: int | None = None,
) -> int:
    """Write JSONL or CSV by the suffix of ``path``."""
    fmt = trace_format(path)
    if fmt == "jsonl":
        return write_jsonl(path, events_, pages=pages)
    if fmt == "csv":
        return write_csv(path, events_, pages=pages)
    raise ValueError(f"{os.fspath(path)}: write .jsonl or .csv (ftrace text is input only)")


# --- reading gmem's formats ----------------------------------------------------------


def _parse_op(raw: object, path, lineno: int) -> int:
    if isinstance(raw, str):
        name = raw.strip()
        if name in _OP_NAME_SET:
            return int(Op[name])
        try:
            raw = int(name, 0)
        except ValueError:
            raise TraceError(path, lineno, f"unknown op {name!r}") from None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < len(_TRACE_OPS):
        raise TraceError(path, lineno, f"unknown op {raw!r}")
    return raw


def _parse_u64(raw: object, field: str, path, lineno: int) -> int:
    if isinstance(raw, str):
        try:
            raw = int(raw.strip(), 0)
        except ValueError:
            raise TraceError(path, lineno, f"{field} {raw!r} is not an integer") from None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TraceError(path, lineno, f"{field} {raw!r} is not an integer")
    if not 0 <= raw <= _U64_MAX:
        raise TraceError(path, lineno, f"{field} {raw} does not fit in u64")
    return raw


class _Rows:
    """Accumulates parsed rows and hands them out as event arrays."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.rows: list[tuple[int, int, int, int]] = []

    def add(self, op: int, gfn: int, npages: int, value: int) -> np.ndarray | None:
        self.rows.append((op, gfn, npages, value))
        if len(self.rows) >= self.chunk:
            return self.flush()
        return None

    def flush(self) -> np.ndarray | None:
        if not self.rows:
            return None
        out = np.array(self.rows, dtype=np.uint64)
        self.rows = []
        return events(out[:, 0], out[:, 1], out[:, 2], out[:, 3])


def _check_event(op: int, gfn: int, npages: int, path, lineno: int) -> None:
    if npages == 0:
        raise TraceError(path, lineno, "npages must be at least 1")
    if gfn + npages > _U64_MAX:
        raise TraceError(path, lineno, f"range gfn {gfn} + npages {npages} overflows")


def _read_jsonl(path, chunk: int, skip_bad: bool, stats: Counter) -> Iterator[np.ndarray]:
    rows = _Rows(chunk)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            try:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise TraceError(path, lineno, f"not valid JSON: {e.msg}") from None
                if not isinstance(obj, dict):
                    raise TraceError(path, lineno, "expected a JSON object")
                if "gmem_trace" in obj:
                    if obj["gmem_trace"] != 1:
                        raise TraceError(
                            path, lineno, f"unsupported gmem_trace version {obj['gmem_trace']!r}"
                        )
                    if "pages" in obj:
                        stats["pages"] = _parse_u64(obj["pages"], "pages", path, lineno)
                    continue
                missing = [k for k in ("op", "gfn", "npages") if k not in obj]
                if missing:
                    raise TraceError(path, lineno, f"missing field(s) {', '.join(missing)}")
                op = _parse_op(obj["op"], path, lineno)
                gfn = _parse_u64(obj["gfn"], "gfn", path, lineno)
                npages = _parse_u64(obj["npages"], "npages", path, lineno)
                value = _parse_u64(obj.get("value", 0), "value", path, lineno)
                _check_event(op, gfn, npages, path, lineno)
            except TraceError:
                if not skip_bad:
                    raise
                stats["bad_lines"] += 1
                continue
            stats["events"] += 1
            out = rows.add(op, gfn, npages, value)
            if out is not None:
                yield out
    out = rows.flush()
    if out is not None:
        yield out


def _read_csv(path, chunk: int, skip_bad: bool, stats: Counter) -> Iterator[np.ndarray]:
    rows = _Rows(chunk)
    header_seen = False
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            if text.startswith("#"):
                m = re.match(r"#\s*pages\s*=\s*(\d+)\s*$", text)
                if m:
                    stats["pages"] = int(m.group(1))
                continue
            fields = [x.strip() for x in text.split(",")]
            if not header_seen:
                if tuple(fields) not in (_CSV_HEADER, _CSV_HEADER[:3]):
                    raise TraceError(
                        path, lineno, f"expected the header 'op,gfn,npages,value', got {text!r}"
                    )
                header_seen = True
                ncols = len(fields)
                continue
            try:
                if len(fields) != ncols:
                    raise TraceError(path, lineno, f"expected {ncols} fields, got {len(fields)}")
                op = _parse_op(fields[0], path, lineno)
                gfn = _parse_u64(fields[1], "gfn", path, lineno)
                npages = _parse_u64(fields[2], "npages", path, lineno)
                value = _parse_u64(fields[3], "value", path, lineno) if ncols == 4 else 0
                _check_event(op, gfn, npages, path, lineno)
            except TraceError:
                if not skip_bad:
                    raise
                stats["bad_lines"] += 1
                continue
            stats["events"] += 1
            out = rows.add(op, gfn, npages, value)
            if out is not None:
                yield out
    if not header_seen:
        raise TraceError(path, 1, "empty CSV trace: no 'op,gfn,npages,value' header")
    out = rows.flush()
    if out is not None:
        yield out


# --- ftrace / trace-cmd text ---------------------------------------------------------

# One event line of ftrace's `trace`/`trace_pipe` or of `trace-cmd report`:
#   comm-pid [(tgid)] [[cpu]] [irq-flags] [timestamp]: event: fields
# e.g. "     kvm_pv_test-54285: kvm_hypercall: nr 0x5 a0 0x0 a1 0x0 a2 0x0 a3 0x0"
#      " CPU 0/KVM-11419   [056] d..2.   146.771179: kvm_hypercall: nr 0x2c ..."
_EVENT_LINE = re.compile(
    r"^\s*(?P<task>.*?)-(?P<pid>\d+)"
    r"(?:\s+\(\s*(?:\d+|-+)\))?"
    r"(?:\s+\[(?P<cpu>\d+)\])?"
    r"(?:\s+(?P<flags>[^\s\[\]:]{4,6}))?"
    r"(?:\s+(?P<ts>\d+\.\d+))?"
    r":\s+(?P<event>[A-Za-z_][\w]*):\s*(?P<fields>.*?)\s*$"
)
# TP_printk("nr 0x%lx a0 0x%lx a1 0x%lx a2 0x%lx a3 0x%lx") in arch/x86/kvm/trace.h
_HYPERCALL_FIELDS = re.compile(
    r"^nr\s+0x(?P<nr>[0-9a-fA-F]+)\s+a0\s+0x(?P<a0>[0-9a-fA-F]+)\s+a1\s+0x(?P<a1>[0-9a-fA-F]+)"
    r"\s+a2\s+0x(?P<a2>[0-9a-fA-F]+)\s+a3\s+0x(?P<a3>[0-9a-fA-F]+)$"
)
# Lines of trace files that carry no event: headers, trace-cmd notices.
_NON_EVENT = re.compile(
    r"^\s*(?:$|#|cpus=\d+\s*$|version\s*=|CPU\s*\d+ is empty|CPU:\d+ \[LOST \d+ EVENTS\])"
)


class FtraceReader:
    """Stream ``KVM_HC_MAP_GPA_RANGE`` conversions out of ftrace / trace-cmd text.

    Iterating yields `EVENT_DTYPE` arrays. ``stats`` counts, as reading goes: ``lines``,
    ``hypercalls`` (``kvm_hypercall`` events), ``conversions``, ``other_events``,
    ``other_hypercalls`` (nr other than 0xc), ``rejected`` (requests KVM or the VMM
    refuse: unaligned gpa, zero or overflowing npages, reserved attribute bits — the guest
    gets an error and nothing converts, so nothing is replayed), ``bad_lines`` (with
    ``skip_bad``) and ``page_size_<4k|2m|1g|other>`` (the preferred-size hint).

    With ``touch`` (default) each conversion is followed by a guest write of the
    converted range on its new side — a guest converts memory in order to use it (the
    bounce buffer it fills, the page it accepts) — so that the replay allocates what the
    guest would have touched. ``touch=False`` replays the bare conversions.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        skip_bad: bool = False,
        touch: bool = True,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self.path = os.fspath(path)
        self.skip_bad = skip_bad
        self.touch = touch
        self.chunk = chunk
        self.stats: Counter[str] = Counter()

    def _decode(self, lineno: int, line: str) -> tuple[int, int, bool] | None:
        """The conversion on this line, or None; raises TraceError if malformed."""
        if _NON_EVENT.match(line):
            return None
        m = _EVENT_LINE.match(line)
        if m is None:
            raise TraceError(self.path, lineno, f"not an ftrace event line: {line.strip()!r}")
        if m.group("event") != "kvm_hypercall":
            self.stats["other_events"] += 1
            return None
        self.stats["hypercalls"] += 1
        f = _HYPERCALL_FIELDS.match(m.group("fields"))
        if f is None:
            raise TraceError(
                self.path,
                lineno,
                "kvm_hypercall fields are not 'nr 0x… a0 0x… a1 0x… a2 0x… a3 0x…': "
                f"{m.group('fields')!r}",
            )
        nr, gpa, npages, attrs = (int(f.group(k), 16) for k in ("nr", "a0", "a1", "a2"))
        if max(nr, gpa, npages, attrs) > _U64_MAX:
            raise TraceError(self.path, lineno, "hypercall argument does not fit in 64 bits")
        if nr != KVM_HC_MAP_GPA_RANGE:
            self.stats["other_hypercalls"] += 1
            return None
        gfn = gpa >> PAGE_SHIFT
        # arch/x86/kvm/x86.c (KVM_HC_MAP_GPA_RANGE): !PAGE_ALIGNED(gpa) || !npages ||
        # gfn + npages <= gfn -> -KVM_EINVAL; reserved attribute bits must be zero.
        if (
            gpa & ((1 << PAGE_SHIFT) - 1)
            or npages == 0
            or gfn + npages > _U64_MAX
            or attrs & KVM_MAP_GPA_RANGE_RESERVED
        ):
            self.stats["rejected"] += 1
            return None
        size = _PAGE_SIZE_NAMES.get(attrs & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK, "other")
        self.stats[f"page_size_{size}"] += 1
        self.stats["conversions"] += 1
        return gfn, npages, bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)

    def __iter__(self) -> Iterator[np.ndarray]:
        self.stats.clear()
        rows = _Rows(self.chunk)
        try:
            # opened outside `with` so that only the open's OSError becomes a TraceError
            f = open(self.path, encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as e:
            raise TraceError(self.path, 0, f"cannot open: {e.strerror}") from None
        with f:
            for lineno, line in enumerate(f, 1):
                self.stats["lines"] += 1
                try:
                    conv = self._decode(lineno, line)
                except TraceError:
                    if not self.skip_bad:
                        raise
                    self.stats["bad_lines"] += 1
                    continue
                if conv is None:
                    continue
                gfn, npages, private = conv
                op = Op.CONVERT_PRIVATE if private else Op.CONVERT_SHARED
                out = rows.add(op, gfn, npages, 0)
                if out is not None:
                    yield out
                if self.touch:
                    op = Op.GUEST_WRITE_PRIVATE if private else Op.GUEST_WRITE_SHARED
                    out = rows.add(op, gfn, npages, lineno)
                    if out is not None:
                        yield out
        out = rows.flush()
        if out is not None:
            yield out


def import_ftrace(
    path: str | os.PathLike[str], *, skip_bad: bool = False, touch: bool = True
) -> tuple[np.ndarray, dict[str, int]]:
    """Read a whole ftrace file: ``(events, stats)`` (see `FtraceReader`)."""
    reader = FtraceReader(path, skip_bad=skip_bad, touch=touch)
    parts = list(reader)
    ev = np.concatenate(parts) if parts else np.empty(0, EVENT_DTYPE)
    return ev, dict(reader.stats)


# --- common entry points -------------------------------------------------------------


def read_trace(
    path: str | os.PathLike[str],
    *,
    chunk: int = DEFAULT_CHUNK,
    skip_bad: bool = False,
    touch: bool = True,
    stats: Counter | None = None,
) -> Iterator[np.ndarray]:
    """Stream the events of a trace file of any supported format (by suffix).

    ``touch`` applies to ftrace imports only. Pass a `collections.Counter` as ``stats``
    to receive the reader's counters.
    """
    if not os.path.exists(path):
        raise TraceError(path, 0, "no such file")
    stats = Counter() if stats is None else stats
    fmt = trace_format(path)
    if fmt == "jsonl":
        yield from _read_jsonl(path, chunk, skip_bad, stats)
    elif fmt == "csv":
        yield from _read_csv(path, chunk, skip_bad, stats)
    else:
        reader = FtraceReader(path, skip_bad=skip_bad, touch=touch, chunk=chunk)
        yield from reader
        stats.update(reader.stats)


def read_events(path: str | os.PathLike[str], **kwargs) -> np.ndarray:
    """All events of a trace file in one array."""
    parts = list(read_trace(path, **kwargs))
    return np.concatenate(parts) if parts else np.empty(0, EVENT_DTYPE)


def trace_extent(path: str | os.PathLike[str], *, skip_bad: bool = False) -> tuple[int, int]:
    """``(events, pages)``: how many events, and the guest size the trace needs — the
    recorded ``pages`` if the file has one, else the end of its highest range."""
    stats: Counter = Counter()
    n, end = 0, 0
    for batch in read_trace(path, skip_bad=skip_bad, touch=False, stats=stats):
        n += len(batch)
        if len(batch):
            end = max(end, int((batch["gfn"] + batch["npages"]).max()))
    if stats.get("pages"):
        return n, max(int(stats["pages"]), end)
    return n, end


def trace_workload(
    path: str | os.PathLike[str],
    *,
    pages: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    skip_bad: bool = False,
    touch: bool = True,
    private_start: bool | None = None,
) -> EventStream:
    """A trace as a workload (``trace:PATH``).

    gmem JSONL/CSV traces replay exactly as recorded. An ftrace import is preceded by one
    ``CONVERT_PRIVATE`` of the whole guest (``private_start``, default on for ftrace), as
    QEMU makes guest_memfd RAM private before the guest runs, so the guest's
    ``MAP_GPA_RANGE`` requests start from the state they did on the real host. The guest
    size defaults to the trace's extent rounded up to 2 MiB; a trace reaching beyond an
    explicit ``pages`` is a `ValueError`.
    """
    fmt = trace_format(path)
    if private_start is None:
        private_start = fmt == "ftrace"
    nevents, extent = trace_extent(path, skip_bad=skip_bad)
    if pages is None:
        pages = max(PAGES_2M, -(-extent // PAGES_2M) * PAGES_2M)
    elif extent > pages:
        raise ValueError(
            f"{os.fspath(path)}: the trace reaches gfn {extent - 1:#x}, beyond a guest of "
            f"{pages} pages"
        )
    if fmt == "ftrace" and touch:
        nevents *= 2

    def gen() -> Iterator[np.ndarray]:
        if private_start:
            yield events(Op.CONVERT_PRIVATE, 0, pages)
        yield from read_trace(path, chunk=chunk, skip_bad=skip_bad, touch=touch)

    return EventStream(
        lambda: chunked(gen(), chunk),
        name=f"trace:{os.fspath(path)}",
        pages=pages,
        chunk=chunk,
        total_events=nevents + int(private_start),
    )
