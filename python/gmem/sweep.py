"""Parameter sweeps: the cartesian product of a grid of axes, one task per cell, run on a
local process pool or on a Dask cluster.

A grid is a TOML file with one ``[grid]`` table whose keys are axes; a value is a list
(one cell per element) or a scalar (a one-value axis)::

    [grid]
    strategy = ["dual", "inplace"]
    workload = "dma-churn"
    pages = 4096
    seed = [0, 1]
    discard = ["eager", "deferred"]

    [grid.params]        # workload parameters (also axes)
    rounds = [60, 120]

    [grid.costs]         # cost-model overrides in ns (also axes)
    zero_4k = [280, 105]

Each cell builds a fresh host and VM, runs the workload under the policy and returns one
row: the cell's parameters, every summary metric of `gmem.policies.run`, the wall time,
the gmem version and the host name. A cell is a `gmem.config.RunConfig` (`cell_config`),
run by `gmem.experiment.run_experiment` as ``gmem compare`` runs its arguments. A cell
that raises gives a row with its ``error``.
Rows are journalled as they arrive (``DIR/cells.jsonl``) and aggregated into
``DIR/results.csv`` (and ``DIR/results.parquet`` when pyarrow is importable); running
the same grid into the same directory again skips the cells that already succeeded.
Metrics do not depend on the executor: only `TIMING_COLUMNS` vary between runs.

Use it as ``gmem sweep GRID.toml`` or from Python::

    import gmem.sweep
    df = gmem.sweep("grid.toml", executor="dask=tcp://scheduler:8786", out="results")

Dask is imported only when a Dask executor is asked for (``pip install 'gmem[dask]'``).
See ``docs/sweep.md``.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import socket
import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from gmem.config import DEFAULT_PAGES, RunConfig, check_knob, default_jobs
from gmem.constants import STRATEGIES
from gmem.costs import DEFAULT_COSTS
from gmem.workloads import workload_vm_type

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "AXES",
    "TIMING_COLUMNS",
    "GridError",
    "cell_config",
    "expand_grid",
    "load_grid",
    "parse_executor",
    "run_cell",
    "sweep",
]

DEFAULT_OUT = "gmem-sweep"
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
JOURNAL = "cells.jsonl"

#: Columns that differ between two runs of the same cell; everything else is a pure
#: function of the cell's parameters (and of the gmem version).
TIMING_COLUMNS = ("wall_s", "events_per_s", "cell_wall_s", "hostname")

#: The `RunConfig` knobs a grid can vary, in the order of the result columns.
_KNOB_AXES = (
    "vm_type",
    "workload",
    "pages",
    "seed",
    "huge_order",
    "discard",
    "discard_every",
    "fault",
    "retry",
    "merge_schedule",
    "merge_every",
    "coalesce",
    "prefault",
    "chunk",
    "sample_every",
)
#: Every axis with its default (``...`` for "all strategies"): the defaults of
#: `RunConfig`. `costs` and `params` are sub-tables whose own keys are axes.
AXES: dict[str, Any] = {
    "strategy": list(STRATEGIES),
    **{name: getattr(RunConfig, name) for name in _KNOB_AXES},
}
_TABLES = ("costs", "params")
#: Former axis names, still accepted in grid files.
_ALIASES = {"merge": "merge_schedule"}


class GridError(ValueError):
    """A malformed grid. ``key`` is the dotted name of the offending entry
    (``grid.strategy``, ``grid.costs.zero_4k``, …); the message names it and the file."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source}: {key}: {' '.join(str(problem).split())}")


# --- the grid ----------------------------------------------------------------------------


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _values(source: str, key: str, raw: Any) -> list[Any]:
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise GridError(source, key, "empty list (give at least one value)")
    for v in values:
        if isinstance(v, (dict, list)):
            raise GridError(source, key, f"values must be scalars, got {v!r}")
    seen: list[Any] = []
    for v in values:
        if any(type(v) is type(s) and v == s for s in seen):
            raise GridError(source, key, f"duplicate value {v!r}")
        seen.append(v)
    return values


def _check_axis(source: str, key: str, name: str, values: list[Any]) -> None:
    for v in values:
        if name == "workload":
            _check_workload(source, key, v)
            continue
        if name == "strategy":
            problem = None
            if not isinstance(v, str) or v not in STRATEGIES:
                known = ", ".join(STRATEGIES)
                problem = f"unknown value {v!r} (known: {known})"
        else:
            problem = check_knob(name, v)
        if problem is not None:
            raise GridError(source, key, problem)


def _check_workload(source: str, key: str, name: Any) -> None:
    from gmem.workloads import DEFAULT_VM_WORKLOADS, WORKLOADS

    if not isinstance(name, str):
        raise GridError(source, key, f"expected a workload name, got {name!r}")
    if name.startswith("trace:"):
        if not name[len("trace:") :]:
            raise GridError(source, key, "trace: needs a path, as in trace:guest.jsonl")
        return
    if name not in WORKLOADS and name not in DEFAULT_VM_WORKLOADS:
        known = ", ".join([*WORKLOADS, *DEFAULT_VM_WORKLOADS, "trace:PATH"])
        raise GridError(source, key, f"unknown workload {name!r} (known: {known})")


def load_grid(grid: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, list[Any]]:
    """Read and check a grid (a TOML path, or an already parsed mapping); return its axes
    as ``{name: [values]}`` in file order, sub-table axes named ``costs.X``/``params.X``.

    Raises `GridError` naming the first malformed key.
    """
    if isinstance(grid, Mapping):
        source, data = "grid", dict(grid)
    else:
        source = os.fspath(grid)
        try:
            with open(grid, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise GridError(source, "grid", "no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise GridError(source, "grid", f"not valid TOML: {e}") from None
    if "grid" in data:
        extra = [k for k in data if k != "grid"]
        if extra:
            raise GridError(source, extra[0], "unexpected top-level key (axes go in [grid])")
        table = data["grid"]
        if not isinstance(table, Mapping):
            raise GridError(source, "grid", "expected a table of axes")
        prefix = "grid."
    else:
        table, prefix = data, ""
    axes: dict[str, list[Any]] = {}
    for name, raw in table.items():
        key = prefix + name
        if name in _TABLES:
            if not isinstance(raw, Mapping):
                raise GridError(source, key, f"expected a table ([{key}])")
            for sub, subraw in raw.items():
                subkey = f"{key}.{sub}"
                values = _values(source, subkey, subraw)
                if name == "costs":
                    _check_costs(source, subkey, sub, values)
                axes[f"{name}.{sub}"] = values
            continue
        if name in _ALIASES:
            former, name = name, _ALIASES[name]
            if name in table:
                raise GridError(source, key, f"{name} given twice (also as {former})")
        if name not in AXES:
            known = [*AXES, *_TABLES]
            raise GridError(
                source,
                key,
                f"unknown axis{_suggest(name, known)} (known: {', '.join(known)})",
            )
        values = _values(source, key, raw)
        _check_axis(source, key, name, values)
        axes[name] = values
    return axes


def _check_costs(source: str, key: str, name: str, values: list[Any]) -> None:
    if name not in DEFAULT_COSTS:
        raise GridError(source, key, f"unknown cost key{_suggest(name, DEFAULT_COSTS)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise GridError(source, key, f"cost must be a non-negative integer (ns), got {v!r}")


def cell_key(params: Mapping[str, Any]) -> str:
    """A stable identifier of a cell: a hash of its resolved parameters."""
    # hashed under the former axis names, so that a directory swept before a rename
    # still resumes
    former = {new: old for old, new in _ALIASES.items()}
    named = {former.get(k, k): v for k, v in params.items()}
    text = json.dumps(named, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand_grid(axes: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the axes (the first axis varies slowest): one dict per
    cell with ``cell`` (its key), ``index`` and every parameter, defaults filled in."""
    names = list(axes)
    cells = []
    for combo in itertools.product(*(axes[n] for n in names)):
        chosen = dict(zip(names, combo, strict=True))
        params: dict[str, Any] = {}
        for name, default in AXES.items():
            params[name] = chosen.get(name, default)
        if "vm_type" not in chosen:  # the workload's own: "default" if it converts nothing
            params["vm_type"] = workload_vm_type(str(params["workload"]))
        if isinstance(params["strategy"], list):  # not an axis: every strategy
            params["strategy"] = None
        if params["pages"] is None and not str(params["workload"]).startswith("trace:"):
            params["pages"] = DEFAULT_PAGES
        for name in names:
            if name.split(".", 1)[0] in _TABLES:
                params[name] = chosen[name]
        cells.append(params)
    if "strategy" not in axes:  # default: every strategy, as `gmem compare`
        cells = [{**c, "strategy": s} for c in cells for s in STRATEGIES]
    out = []
    for index, params in enumerate(cells):
        out.append({"cell": cell_key(params), "index": index, **params})
    return out


# --- one cell ------------------------------------------------------------------------------


def _version() -> str:
    try:
        from gmem._gmem import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - the core is not importable
        return "(unknown)"


def cell_config(cell: Mapping[str, Any]) -> RunConfig:
    """The `RunConfig` of a cell from `expand_grid` (raises `ConfigError` for a bad
    workload parameter, which the grid leaves to each cell)."""
    table = {
        t: {k.split(".", 1)[1]: v for k, v in cell.items() if k.startswith(t + ".")}
        for t in _TABLES
    }
    return RunConfig(
        **{name: cell[name] for name in _KNOB_AXES},
        params=table["params"],
        costs=table["costs"] or None,
    )


def run_cell(cell: Mapping[str, Any]) -> dict[str, Any]:
    """Run one cell (a dict from `expand_grid`) on a fresh host and VM; return its row.

    Never raises for a failure of the cell itself: the row then has ``error`` set to
    ``"ExceptionType: message"`` and no metrics.
    """
    from gmem.experiment import run_experiment

    t0 = time.perf_counter()
    row: dict[str, Any] = dict(cell)
    try:
        (result,) = run_experiment(cell_config(cell), [cell["strategy"]])
        for k, v in result.summary.items():
            if row.get(k) is None:
                row[k] = v
        row["error"] = ""
    except Exception as e:
        row["error"] = _error_text(e)
    row["cell_wall_s"] = round(time.perf_counter() - t0, 6)
    row["gmem_version"] = _version()
    row["hostname"] = socket.gethostname()
    return row


def _error_text(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _failed_row(cell: Mapping[str, Any], e: BaseException) -> dict[str, Any]:
    return {**cell, "error": _error_text(e), "gmem_version": "", "hostname": ""}


# --- executors ------------------------------------------------------------------------------


def parse_executor(text: str) -> tuple[str, str | None]:
    """``"local"`` → ``("local", None)``; ``"dask"`` → ``("dask", None)`` (a LocalCluster);
    ``"dask=tcp://HOST:PORT"`` → ``("dask", "tcp://HOST:PORT")``. Else `ValueError`."""
    kind, sep, address = text.partition("=")
    kind = kind.strip()
    address = address.strip()
    if kind == "local" and not sep:
        return "local", None
    if kind == "dask" and (not sep or address):
        return "dask", address or None
    raise ValueError(f"unknown executor {text!r} (expected local, dask or dask=tcp://HOST:PORT)")


def _run_local(cells: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    methods = multiprocessing.get_all_start_methods()
    # fork is unsafe in a threaded parent (a Dask client, a progress bar); forkserver
    # workers fork from a clean server that has gmem imported once
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["gmem.sweep", "gmem.experiment"])
    pool = ProcessPoolExecutor(max_workers=min(workers, len(cells)), mp_context=ctx)
    try:
        futures = {pool.submit(run_cell, c): c for c in cells}
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except Exception as e:  # the worker died (killed, out of memory)
                yield _failed_row(futures[fut], e)
    finally:  # on an interrupt, do not start the cells still queued
        pool.shutdown(wait=True, cancel_futures=True)


def _run_dask(
    cells: list[dict[str, Any]], workers: int | None, address: str | None
) -> Iterator[dict[str, Any]]:
    import uuid

    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ImportError(
            "the dask executor needs dask.distributed: pip install 'gmem[dask]'"
        ) from None
    cluster = None
    if address is None:
        cluster = LocalCluster(
            n_workers=workers or default_jobs(),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            # no dashboard; the scheduler's HTTP endpoint on a free port, not on 8787
            scheduler_kwargs={"dashboard_address": ":0"},
        )
        client = Client(cluster)
    else:
        try:
            client = Client(address)
        except (OSError, ValueError, TimeoutError) as e:
            raise OSError(f"cannot connect to the Dask scheduler at {address}: {e}") from None
    try:
        run = uuid.uuid4().hex[:8]
        futures = {
            client.submit(run_cell, c, key=f"gmem-cell-{c['cell']}-{run}", pure=False): c
            for c in cells
        }
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except Exception as e:  # the worker died, or the task could not run
                yield _failed_row(futures[fut], e)
            fut.release()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# --- results ---------------------------------------------------------------------------------


def _plain(obj):
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _read_journal(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(row, dict) and "cell" in row:
                rows[str(row["cell"])] = row
    return rows


def _read_previous(out: Path) -> dict[str, dict[str, Any]]:
    """Rows already in ``out``: the journal, else an aggregated CSV (journal deleted)."""
    rows = _read_journal(out / JOURNAL)
    if rows or not (out / RESULTS_CSV).is_file():
        return rows
    import pandas as pd

    df = pd.read_csv(out / RESULTS_CSV, keep_default_na=False, dtype={"cell": str})
    if "cell" not in df:
        return rows
    return {str(r["cell"]): r for r in df.to_dict("records")}


def _ok(row: Mapping[str, Any]) -> bool:
    err = row.get("error")
    return err is None or err == "" or (isinstance(err, float) and err != err)


def _frame(rows: Iterable[Mapping[str, Any]], order: Mapping[str, int]):
    import pandas as pd

    rows = sorted(rows, key=lambda r: (order.get(str(r["cell"]), len(order)), str(r["cell"])))
    df = pd.DataFrame(rows)
    if "error" in df:  # last, so the metrics sit next to the parameters
        df = df[[c for c in df.columns if c != "error"] + ["error"]]
        df["error"] = df["error"].fillna("")
    return df


def _write_results(df, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / RESULTS_CSV]
    tmp = out / (RESULTS_CSV + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(paths[0])
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return paths
    pq = df.copy()
    for col in pq.columns:  # a column mixing types (params of several workloads)
        if pq[col].dtype == object and pq[col].map(type).nunique() > 1:
            pq[col] = pq[col].map(lambda v: "" if v is None else str(v))
    pq.to_parquet(out / RESULTS_PARQUET, index=False)
    paths.append(out / RESULTS_PARQUET)
    return paths


class _Progress:
    """A rich progress bar over cells on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and total > 0 and sys.stderr.isatty()
        self.failed = 0
        self._bar = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from gmem.reports import rich_bar

            self._bar = rich_bar()
            self._bar.start()
            self._task = self._bar.add_task("cells", total=self.total)
        return self

    def advance(self, ok: bool) -> None:
        self.failed += not ok
        if self._bar is not None:
            desc = f"cells ([red]{self.failed} failed[/])" if self.failed else "cells"
            self._bar.update(self._task, advance=1, description=desc)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def sweep(
    grid: str | os.PathLike[str] | Mapping[str, Any],
    executor: str = "local",
    workers: int | None = None,
    out: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Run every cell of ``grid`` that ``out`` does not already hold, and aggregate.

    ``executor``: ``"local"`` (a process pool of ``workers`` processes, default one per
    CPU), ``"dask"`` (a `distributed.LocalCluster` of ``workers`` single-threaded worker
    processes) or ``"dask=tcp://HOST:PORT"`` (an existing scheduler; ``workers`` is
    ignored). Cells that already succeeded in ``out`` are skipped; failed ones are run
    again. Rows are appended to ``out/cells.jsonl`` as they arrive, then written to
    ``out/results.csv`` (and ``.parquet``). Raises `GridError` for a malformed grid,
    `ValueError` for a bad executor; a failing cell only sets its row's ``error``.

    Returns every row of the grid held in ``out`` (this run's and earlier ones), in grid
    order; ``df.attrs`` holds the counts ``run``, ``skipped`` (already in ``out``),
    ``failed`` (of this run) and the ``paths`` written.
    """
    kind, address = parse_executor(executor)
    if workers is not None and workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
    cells = expand_grid(load_grid(grid))
    order = {c["cell"]: c["index"] for c in cells}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_previous(out)
    done = {k for k, r in previous.items() if k in order and _ok(r)}
    todo = [c for c in cells if c["cell"] not in done]
    rows = {k: previous[k] for k in done}
    failed = 0
    try:
        if todo:
            if kind == "local":
                results = _run_local(todo, workers or default_jobs())
            else:
                results = _run_dask(todo, workers, address)
            with (
                open(out / JOURNAL, "a", encoding="utf-8") as journal,
                _Progress(len(todo), progress) as bar,
            ):
                for row in results:
                    journal.write(json.dumps(row, default=_plain) + "\n")
                    journal.flush()
                    rows[str(row["cell"])] = row
                    failed += not _ok(row)
                    bar.advance(_ok(row))
                    if on_row is not None:
                        on_row(row)
    finally:  # an interrupted sweep still leaves its results (and resumes from them)
        frame = _frame(rows.values(), order)
        paths = _write_results(frame, out) if rows else []
    frame.attrs.update(run=len(todo), skipped=len(done), failed=failed, paths=paths)
    return frame


class _CallableModule(types.ModuleType):
    """``import gmem.sweep; gmem.sweep("grid.toml")`` calls `sweep`."""

    def __call__(self, *args, **kwargs) -> pd.DataFrame:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
