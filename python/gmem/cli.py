"""The ``gmem`` command: compare strategies on a workload, run one, replay a trace.

Errors in what the user typed (a bad name, a missing file, a malformed trace) print one
line on stderr and exit with status 2 (usage) or 1 (everything else); never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gmem.setup import STRATEGIES, VM_TYPES

DEFAULT_WORKLOAD = "dma-churn"
DEFAULT_PAGES = 1 << 21  # an 8 GiB guest
DEFAULT_OUT = "gmem-results"


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative: {text!r}")
    return value


def _strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no strategy given")
    bad = [s for s in names if s not in STRATEGIES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {bad[0]!r} (known: {', '.join(STRATEGIES)})"
        )
    return names


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip().replace("-", "_"), value


def _add_common(p: argparse.ArgumentParser, *, workload: bool = True) -> None:
    if workload:
        p.add_argument(
            "--workload",
            "-w",
            default=DEFAULT_WORKLOAD,
            help=f"workload name or trace:PATH (default {DEFAULT_WORKLOAD}; see `gmem workloads`)",
        )
        p.add_argument(
            "--param",
            "-p",
            type=_param,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a workload parameter, e.g. -p rounds=1000 -p pin=0 (repeatable)",
        )
        p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--pages",
        "-n",
        type=_positive_int,
        default=None,
        help=f"guest size in 4 KiB pages (default {DEFAULT_PAGES:,}; a trace's own extent)",
    )
    p.add_argument("--vm-type", "-t", choices=VM_TYPES, default="sw_protected")
    p.add_argument(
        "--huge-order",
        type=int,
        choices=(0, 9, 18),
        default=0,
        help="back guest_memfd with HugeTLB folios of 2 MiB (9) or 1 GiB (18)",
    )
    p.add_argument("--costs", metavar="TOML", help="cost-model overrides (docs/cost-model.md)")
    g = p.add_argument_group("VMM policy (docs/policies.md)")
    g.add_argument("--discard", choices=("eager", "deferred", "never"), default="eager")
    g.add_argument(
        "--discard-every",
        type=_positive_int,
        default=None,
        help="deferred discard: pass every N conversions (default: each batch)",
    )
    g.add_argument("--fault", choices=("convert", "exit"), default="convert")
    g.add_argument("--retry", type=_nonneg_int, default=3, help="EAGAIN retry rounds")
    g.add_argument("--merge", choices=("eager", "periodic"), default="eager")
    g.add_argument("--merge-every", type=_positive_int, default=1 << 20)
    g.add_argument("--coalesce", action="store_true", help="batch adjacent conversions")
    o = p.add_argument_group("output")
    o.add_argument("--out", "-o", default=DEFAULT_OUT, help=f"directory (default {DEFAULT_OUT})")
    o.add_argument("--sample-every", type=_positive_int, default=None, metavar="N")
    o.add_argument("--chunk", type=_positive_int, default=1 << 16, help="events per batch")
    o.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gmem")
    except Exception:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmem",
        description="Simulate KVM guest_memfd memory for confidential VMs and compare "
        "shared<->private conversion strategies.",
    )
    parser.add_argument("--version", action="version", version=f"gmem {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "compare",
        help="run a workload under each strategy and compare (the main command)",
        description="Run one workload under each strategy, print the comparison table and "
        "write DIR/summary.csv, DIR/summary.json, per-strategy series and PNG plots.",
    )
    _add_common(p)
    p.add_argument(
        "--strategies",
        "-s",
        type=_strategies,
        default=list(STRATEGIES),
        help=f"comma-separated (default: {','.join(STRATEGIES)})",
    )

    p = sub.add_parser(
        "run",
        help="run a workload under one strategy and write its time series",
        description="Run one workload under one strategy; write summary and time series "
        "(CSV, JSON, and Parquet if pyarrow is installed) into DIR.",
    )
    _add_common(p)
    p.add_argument("--strategy", "-s", choices=STRATEGIES, default="dual")

    p = sub.add_parser(
        "replay",
        help="replay a trace under each strategy",
        description="Replay a trace (gmem JSONL/CSV, or ftrace/trace-cmd text of "
        "kvm_hypercall with KVM_HC_MAP_GPA_RANGE; docs/trace-format.md) under each strategy.",
    )
    p.add_argument("trace", help="trace file (.jsonl, .csv, or ftrace text)")
    _add_common(p, workload=False)
    p.add_argument("--strategies", "-s", type=_strategies, default=list(STRATEGIES))
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines, count them")
    p.add_argument(
        "--no-touch",
        action="store_true",
        help="ftrace: replay bare conversions, without the guest's touch of each range",
    )

    p = sub.add_parser(
        "sweep",
        help="run a grid of parameters, one task per cell, locally or on Dask",
        description="Run the cartesian product of the axes in GRID.toml (docs/sweep.md), one "
        "cell per task, and aggregate one row per cell into DIR/results.csv (and .parquet). "
        "Cells already in DIR are skipped.",
    )
    p.add_argument("grid", help="grid file (TOML with a [grid] table of axes)")
    p.add_argument(
        "--executor",
        "-e",
        default="local",
        metavar="local|dask[=ADDRESS]",
        help="local process pool (default); dask: a LocalCluster; dask=tcp://HOST:PORT: "
        "an existing scheduler",
    )
    p.add_argument(
        "--workers", "-j", type=_positive_int, default=None, help="processes (default: CPUs)"
    )
    p.add_argument("--out", "-o", default="gmem-sweep", help="directory (default gmem-sweep)")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    sub.add_parser(
        "workloads",
        help="list the workloads",
        description="List the built-in workloads with their descriptions.",
    )
    return parser


def _policy(args):
    from gmem.policies import make_policy

    return make_policy(
        discard=args.discard,
        discard_every=args.discard_every,
        fault=args.fault,
        retry=args.retry,
        merge=args.merge,
        merge_every=args.merge_every,
        coalesce=args.coalesce,
    )


def _check_params(name: str, params: dict[str, Any]) -> None:
    from gmem.workloads import get_workload

    spec = get_workload(name)
    if name.startswith("trace:"):
        from gmem.traces import trace_workload as fn
    else:
        fn = spec.generator
    allowed = {
        k
        for k, v in inspect.signature(fn).parameters.items()
        if v.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("seed", "chunk", "pages")
    }
    for key in params:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise UsageError(f"workload {name!r} has no parameter {key!r} (parameters: {known})")


def _stream(args, workload: str, params: dict[str, Any]):
    from gmem.workloads import make_workload

    pages = args.pages
    if pages is None and not workload.startswith("trace:"):
        pages = DEFAULT_PAGES
    try:
        return make_workload(
            workload, pages, seed=getattr(args, "seed", 0), chunk=args.chunk, **params
        )
    except TypeError as e:  # a parameter of the wrong type
        raise UsageError(f"workload {workload!r}: {e}") from None


def _run_strategies(args, stream, strategies: Sequence[str], meta: dict[str, Any]):
    from gmem.costs import apply_costs, load_costs
    from gmem.policies import run
    from gmem.setup import build_vm, make_host

    # a TOML path from the command line, or a mapping from `gmem sweep`
    overrides = load_costs(args.costs) if isinstance(args.costs, (str, Path)) else args.costs
    sample_every = args.sample_every or max(1, (stream.total_events or 1 << 20) // 400)
    results = []
    for strategy in strategies:
        host = make_host(stream.pages, huge_order=args.huge_order)
        apply_costs(host, overrides)
        guest = build_vm(host, stream.pages, args.vm_type, strategy, args.huge_order)
        result = run(
            guest,
            stream,
            _policy(args),
            sample_every=sample_every,
            progress=not args.no_progress,
            meta={**meta, "pages": stream.pages, "huge_order": args.huge_order},
        )
        results.append(result)
        del guest, host
    return results


def _write_outputs(args, results, title: str) -> list[Path]:
    from gmem import reports

    out = Path(args.out)
    paths = reports.write_summary(results, out)
    for r in results:
        strategy = r.summary["strategy"]
        r.series.to_csv(out / f"series-{strategy}.csv", index=False)
        paths.append(out / f"series-{strategy}.csv")
    if not args.no_plots:
        paths.append(reports.plot_memory(results, out / "memory.png", title=title))
        paths.append(reports.plot_counters(results, out / "counters.png", title=title))
    return paths


def _title(args, stream) -> str:
    gib = stream.pages * 4096 / (1 << 30)
    return f"{stream.name} on a {gib:g} GiB {args.vm_type} guest"


def _compare_and_write(args, stream, meta) -> int:
    """Run every requested strategy, print the table, write the files."""
    from gmem import reports

    results = _run_strategies(args, stream, args.strategies, meta)
    title = _title(args, stream)
    reports.print_comparison(results, title=title)
    paths = _write_outputs(args, results, title)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_compare(args) -> int:

    params = dict(args.param)
    _check_params(args.workload, params)
    stream = _stream(args, args.workload, params)
    meta = {"workload": args.workload, "seed": args.seed}
    return _compare_and_write(args, stream, meta)


def cmd_run(args) -> int:
    from gmem import reports

    params = dict(args.param)
    _check_params(args.workload, params)
    stream = _stream(args, args.workload, params)
    meta = {"workload": args.workload, "seed": args.seed}
    (result,) = _run_strategies(args, stream, [args.strategy], meta)
    reports.print_comparison([result], title=_title(args, stream))
    paths = result.write(args.out)
    if not args.no_plots:
        paths.append(reports.plot_memory([result], Path(args.out) / "memory.png"))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_replay(args) -> int:
    from gmem.traces import trace_workload

    if not Path(args.trace).is_file():
        raise UsageError(f"{args.trace}: no such file")
    stream = trace_workload(
        args.trace,
        pages=args.pages,
        chunk=args.chunk,
        skip_bad=args.skip_bad,
        touch=not args.no_touch,
    )
    meta = {"workload": f"trace:{args.trace}"}
    return _compare_and_write(args, stream, meta)


def cmd_sweep(args) -> int:
    from gmem.sweep import GridError, parse_executor, sweep

    try:
        parse_executor(args.executor)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        df = sweep(
            args.grid,
            executor=args.executor,
            workers=args.workers,
            out=args.out,
            progress=not args.no_progress,
        )
    except GridError as e:
        raise UsageError(str(e)) from None
    except ImportError as e:
        if "gmem[dask]" not in str(e):
            raise
        print(f"gmem sweep: error: {e}", file=sys.stderr)  # not "the compiled core"
        return 1
    info = df.attrs
    print(
        f"{len(df)} cells: {info['run']} run, {info['skipped']} already in {args.out}, "
        f"{info['failed']} failed"
    )
    if info["failed"]:
        errors = df[df["error"] != ""]
        for index, error in zip(errors["index"][:5], errors["error"][:5], strict=True):
            print(f"cell {index}: {error}", file=sys.stderr)
        if len(errors) > 5:
            print(f"... and {len(errors) - 5} more (column 'error')", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in info['paths'])}")
    return 1 if info["failed"] else 0


def cmd_workloads(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from gmem.workloads import WORKLOADS

    table = Table(header_style="bold")
    table.add_column("workload")
    table.add_column("description")
    for name, spec in WORKLOADS.items():
        table.add_row(name, spec.description)
    table.add_row("trace:PATH", "replay a trace file (gmem JSONL/CSV or ftrace kvm_hypercall text)")
    Console().print(table)
    return 0


COMMANDS = {
    "compare": cmd_compare,
    "run": cmd_run,
    "replay": cmd_replay,
    "sweep": cmd_sweep,
    "workloads": cmd_workloads,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"gmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"gmem {args.command}: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(
            f"gmem {args.command}: error: the compiled core is not available ({e})", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print("gmem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
