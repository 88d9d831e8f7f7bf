"""Reports: the terminal comparison table, summary files, PNG plots, progress bars.

Everything takes `gmem.runner.RunResult` objects (one per strategy). Plots use
matplotlib's non-interactive Agg backend, so they work on machines without a display.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from gmem.runner import RunResult

__all__ = [
    "MAIN_COUNTERS",
    "comparison_frame",
    "comparison_table",
    "plot_counters",
    "plot_memory",
    "print_comparison",
    "progress_bar",
    "progress_bars",
    "write_summary",
]

PAGE_MIB = 4096 / (1 << 20)

#: (summary key, column title, scale) for the table and the bar plots.
MAIN_COUNTERS: tuple[tuple[str, str, float], ...] = (
    ("peak_pages_allocated", "peak MiB", PAGE_MIB),
    ("mean_pages_allocated", "mean MiB", PAGE_MIB),
    ("peak_double_backed_pages", "2x-backed MiB", PAGE_MIB),
    ("allocations", "allocs", 1),
    ("zeroed_pages", "zeroed", 1),
    ("splits", "splits", 1),
    ("merges", "merges", 1),
    ("stage2_zaps", "zaps", 1),
    ("tlb_flushes", "TLB flushes", 1),
    ("memory_faults", "mem faults", 1),
    ("eagain", "EAGAIN", 1),
    ("violations", "violations", 1),
    ("modelled_ns", "modelled ms", 1e-6),
)


def _prefaulted(s: dict[str, Any]) -> bool:
    return bool(s.get("prefaulted_pages"))


def _poisoned(s: dict[str, Any]) -> bool:
    return bool(s.get("hwpoisoned_pages"))


def _no_direct_map(s: dict[str, Any]) -> bool:
    return bool(s.get("direct_map_removals"))


#: Rows shown only when some run of the comparison needs them, each with the test a
#: summary passes to need it: (summary key, column title, scale, test). Stage-2 exits
#: (the faults the guest took) and the pages `KVM_PRE_FAULT_MEMORY` mapped ahead of it
#: when a run pre-faulted; the cost of memory failures when pages were poisoned; the
#: direct-map work of `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` files when pages left the direct map.
CONDITIONAL_COUNTERS: tuple[tuple[str, str, float, Callable[[dict[str, Any]], bool]], ...] = (
    ("stage2_faults", "stage-2 exits", 1, _prefaulted),
    ("prefaulted_pages", "pre-faulted", 1, _prefaulted),
    ("hwpoisoned_pages", "hwpoisoned", 1, _poisoned),
    ("hwpoison_lost_pages", "content lost", 1, _poisoned),
    ("hwpoison_refused", "EHWPOISON", 1, _poisoned),
    ("direct_map_removals", "direct-map removals", 1, _no_direct_map),
    ("direct_map_flushes", "direct-map flushes", 1, _no_direct_map),
    ("direct_map_splits", "direct-map splits", 1, _no_direct_map),
)


def _summaries(results: Sequence[RunResult | dict[str, Any]]) -> list[dict[str, Any]]:
    return [r if isinstance(r, dict) else r.summary for r in results]


def comparison_frame(results: Sequence[RunResult | dict[str, Any]]) -> pd.DataFrame:
    """The comparison as a DataFrame: one row per strategy, the `MAIN_COUNTERS` scaled,
    then those of `CONDITIONAL_COUNTERS` that some strategy's run needs."""
    summaries = _summaries(results)
    counters = [
        *MAIN_COUNTERS[:-1],
        *(
            (key, title, scale)
            for key, title, scale, needed in CONDITIONAL_COUNTERS
            if any(needed(s) for s in summaries)
        ),
        MAIN_COUNTERS[-1],
    ]
    rows = []
    for s in summaries:
        row: dict[str, Any] = {"strategy": s.get("strategy", "?")}
        for key, title, scale in counters:
            v = s.get(key)
            row[title] = None if v is None else v * scale
        row["wall s"] = s.get("wall_s")
        rows.append(row)
    # NUMA runs: each node's footprint at the end, and the events that found no memory
    # where the policy allowed (a node full while another has room under MPOL_BIND).
    summaries = _summaries(results)
    nodes = max((int(s.get("nodes", 1)) for s in summaries), default=1)
    numa = nodes > 1 or any("mempolicy" in s for s in summaries)
    for row, s in zip(rows, summaries, strict=True):
        if numa:
            for k in range(nodes):
                v = s.get(f"node{k}_pages_allocated")
                row[f"node {k} MiB"] = None if v is None else v * PAGE_MIB
        if numa or any(x.get("status_enomem") for x in summaries):
            row["ENOMEM events"] = s.get("status_enomem")
    return pd.DataFrame(rows)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100 or v == int(v):
            return f"{v:,.0f}"
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def comparison_table(results: Sequence[RunResult | dict[str, Any]], *, title: str | None = None):
    """A `rich.table.Table`: one column per strategy, one row per main counter (so five
    strategies fit an 80-column terminal). The best value of each row (lowest, except
    merges) is bold green."""
    from rich.table import Table

    df = comparison_frame(results)
    table = Table(title=title, header_style="bold", title_justify="left")
    table.add_column("")
    for name in df["strategy"]:
        table.add_column(str(name), justify="right")
    for col in df.columns[1:]:
        values = df[col].tolist()
        nums = pd.to_numeric(df[col], errors="coerce")
        best = None
        if nums.notna().sum() > 1 and nums.nunique() > 1 and col != "wall s":
            best = nums.max() if col == "merges" else nums.min()
        cells = [
            f"[bold green]{_fmt(v)}[/]" if best is not None and v == best else _fmt(v)
            for v in values
        ]
        table.add_row(col, *cells)
    return table


def print_comparison(
    results: Sequence[RunResult | dict[str, Any]], *, title: str | None = None, console=None
) -> None:
    """Print the comparison table to the terminal (or to ``console``)."""
    from rich.console import Console

    console = console or Console()
    console.print(comparison_table(results, title=title))


def write_summary(
    results: Sequence[RunResult | dict[str, Any]], directory: str | os.PathLike[str]
) -> list[Path]:
    """Write ``summary.csv`` and ``summary.json`` (one record per strategy)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    summaries = _summaries(results)
    csv_path, json_path = d / "summary.csv", d / "summary.json"
    pd.DataFrame(summaries).to_csv(csv_path, index=False)
    json_path.write_text(json.dumps(summaries, indent=1, default=_plain) + "\n")
    return [csv_path, json_path]


def _plain(obj):
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_memory(
    results: Sequence[RunResult], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """PNG of host memory backing the VM (MiB) against workload progress, one line per
    strategy (distinct dash patterns, so equal curves stay visible), with memory backed
    twice drawn thin and dotted where there is any."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    styles = ["-", "--", "-.", (0, (5, 2, 1, 2)), ":"]
    for i, r in enumerate(results):
        s = r.series
        if s.empty or "pages_allocated" not in s:
            continue
        x = s["workload_events"] if "workload_events" in s else s["applied_events"]
        label = r.summary.get("strategy", "?")
        (line,) = ax.plot(
            x,
            s["pages_allocated"] * PAGE_MIB,
            label=label,
            linestyle=styles[i % len(styles)],
            linewidth=2.6 - 0.35 * (i % 5),
        )
        if "double_backed_pages" in s and s["double_backed_pages"].any():
            ax.plot(
                x,
                s["double_backed_pages"] * PAGE_MIB,
                linestyle=":",
                linewidth=1.0,
                color=line.get_color(),
                label=f"{label}: backed twice",
            )
    ax.set_xlabel("workload events")
    ax.set_ylabel("host memory backing the guest (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Host memory over time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_counters(
    results: Sequence[RunResult | dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """PNG of per-strategy bars, one panel per main counter."""
    plt = _pyplot()
    df = comparison_frame(results)
    cols = [c for c in df.columns[1:] if c != "wall s" and df[c].notna().any()]
    ncols = 4
    nrows = max(1, -(-len(cols) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), dpi=110)
    flat = axes.ravel() if hasattr(axes, "ravel") else [axes]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, col in zip(flat, cols, strict=False):
        vals = pd.to_numeric(df[col], errors="coerce").fillna(0)
        ax.bar(df["strategy"], vals, color=colors[: len(df)])
        ax.set_title(col, fontsize="medium")
        if not vals.any():
            ax.set_ylim(0, 1)
            ax.text(0.5, 0.5, "0 for all", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.set_ylim(bottom=0)
        ax.tick_params(axis="x", labelrotation=35, labelsize="small")
        ax.tick_params(axis="y", labelsize="small")
    for ax in flat[len(cols) :]:
        ax.set_visible(False)
    fig.suptitle(title or "Strategies compared")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def rich_bar(*, transient: bool = False):
    """A `rich.progress.Progress` on stderr with gmem's columns: description, bar,
    done/total, elapsed, remaining (shared by runs and sweeps)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=transient,
    )


class _LazyProgress:
    """Rich progress bars on stderr, one per description, that appear only once the run
    has lasted ``delay`` seconds, so short runs print nothing. Runs in several threads
    may advance their own bars at once."""

    def __init__(self, total: int | None, descriptions: Sequence[str], delay: float) -> None:
        self.total = total
        self.descriptions = list(descriptions)
        self.delay = delay
        self.done = [0] * len(self.descriptions)
        self._lock = threading.Lock()
        self._progress = None
        self._tasks: list[Any] = []
        self._t0 = 0.0

    def __enter__(self) -> _LazyProgress:
        self._t0 = time.monotonic()
        return self

    def _start(self) -> None:
        self._progress = rich_bar(transient=True)
        self._progress.start()
        self._tasks = [
            self._progress.add_task(d, total=self.total, completed=done)
            for d, done in zip(self.descriptions, self.done, strict=True)
        ]

    def advance(self, n: int, bar: int = 0) -> None:
        """Count ``n`` more events on bar number ``bar`` (in the order of the
        descriptions)."""
        with self._lock:
            self.done[bar] += n
            if self._progress is None:
                if time.monotonic() - self._t0 < self.delay or not sys.stderr.isatty():
                    return
                self._start()
            else:
                self._progress.update(self._tasks[bar], completed=self.done[bar])

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def progress_bar(
    total: int | None, *, description: str = "events", delay: float = 1.0
) -> _LazyProgress:
    """A context manager with ``advance(n)``: a rich progress bar on stderr, shown when
    stderr is a terminal and the run has lasted ``delay`` seconds."""
    return _LazyProgress(total, [description], delay)


def progress_bars(
    total: int | None, descriptions: Sequence[str], *, delay: float = 1.0
) -> _LazyProgress:
    """`progress_bar` with one bar of ``total`` per description (one per strategy of a
    comparison): ``advance(n, i)`` advances bar ``i``, from any thread."""
    return _LazyProgress(total, descriptions, delay)
