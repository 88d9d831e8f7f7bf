"""The ``gmem`` command: compare strategies on a workload, run one, replay a trace.

Errors in what the user typed (a bad name, a missing file, a malformed trace) print one
line on stderr and exit with status 2 (usage) or 1 (everything else); never a traceback.
Every run command builds a `gmem.config.RunConfig` from its arguments (its defaults are
the flags' defaults) and runs it with `gmem.experiment.run_experiment`.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gmem.config import DEFAULT_PAGES, KNOB_CHOICES, RunConfig, UsageError, default_jobs
from gmem.constants import ALL_VM_TYPES, STRATEGIES, VM_TYPES_WITHOUT_PRIVATE_MEM
from gmem.sweep import DEFAULT_OUT as SWEEP_OUT

DEFAULT_WORKLOAD = RunConfig.workload
DEFAULT_OUT = "gmem-results"


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


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _add_jobs(p: argparse.ArgumentParser) -> None:
    # the range is `run_experiment`'s to check, so the message is the config layer's
    p.add_argument(
        "--jobs",
        "-j",
        type=_int,
        default=None,
        metavar="N",
        help=f"strategies run at once (default: one per CPU, {default_jobs()} here; "
        "1: one after another)",
    )


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
        p.add_argument(
            "--seed",
            type=_nonneg_int,
            default=RunConfig.seed,
            help=f"random seed (default {RunConfig.seed})",
        )
    p.add_argument(
        "--pages",
        "-n",
        type=_positive_int,
        default=None,
        help=f"guest size in 4 KiB pages (default {DEFAULT_PAGES:,}; a trace's own extent)",
    )
    p.add_argument(
        "--vm-type",
        "-t",
        choices=ALL_VM_TYPES,
        default=RunConfig.vm_type,
        action=_GivenVmType,
        help="VM type (if not given: sw_protected, or default for a workload that "
        "converts nothing)",
    )
    p.add_argument(
        "--huge-order",
        type=int,
        choices=KNOB_CHOICES["huge_order"],
        default=RunConfig.huge_order,
        help="back guest_memfd with HugeTLB folios of 2 MiB (9) or 1 GiB (18)",
    )
    p.add_argument("--costs", metavar="TOML", help="cost-model overrides (docs/cost-model.md)")
    n = p.add_argument_group("NUMA (docs/api.md)")
    n.add_argument(
        "--nodes",
        type=_positive_int,
        default=RunConfig.nodes,
        help="split host memory evenly over N NUMA nodes (default 1)",
    )
    n.add_argument(
        "--mempolicy",
        metavar="MODE[:NODES]",
        default=None,
        help="the VMM's memory policy, placing every page: bind:0, interleave:0,1, "
        "preferred:1, preferred_many:0-1, weighted_interleave:0,1, local",
    )
    n.add_argument(
        "--host-pages",
        type=_positive_int,
        default=None,
        metavar="N",
        help="host RAM in 4 KiB pages (default: room for every guest page backed twice)",
    )
    g = p.add_argument_group("VMM policy (docs/policies.md)")
    g.add_argument("--discard", choices=KNOB_CHOICES["discard"], default=RunConfig.discard)
    g.add_argument(
        "--discard-every",
        type=_positive_int,
        default=RunConfig.discard_every,
        help="deferred discard: pass every N conversions (default: each batch)",
    )
    g.add_argument("--fault", choices=KNOB_CHOICES["fault"], default=RunConfig.fault)
    g.add_argument("--retry", type=_nonneg_int, default=RunConfig.retry, help="EAGAIN retry rounds")
    g.add_argument(
        "--merge-schedule",
        "--merge",
        dest="merge_schedule",
        choices=KNOB_CHOICES["merge_schedule"],
        default=RunConfig.merge_schedule,
        help="merge split huge folios at once, or by a pass every --merge-every events",
    )
    g.add_argument("--merge-every", type=_positive_int, default=RunConfig.merge_every)
    g.add_argument("--coalesce", action="store_true", help="batch adjacent conversions")
    g.add_argument(
        "--prefault",
        action="store_true",
        help="SNP: KVM_PRE_FAULT_MEMORY after each conversion to private (QEMU's prefault)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", "-o", default=DEFAULT_OUT, help=f"directory (default {DEFAULT_OUT})")
    o.add_argument(
        "--sample-every", type=_positive_int, default=RunConfig.sample_every, metavar="N"
    )
    o.add_argument("--chunk", type=_positive_int, default=RunConfig.chunk, help="events per batch")
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
    _add_jobs(p)

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
    _add_jobs(p)
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
    p.add_argument("--out", "-o", default=SWEEP_OUT, help=f"directory (default {SWEEP_OUT})")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    sub.add_parser(
        "workloads",
        help="list the workloads",
        description="List the built-in workloads with their descriptions.",
    )
    return parser


class _GivenVmType(argparse.Action):
    """Stores ``--vm-type`` and notes that it was given (else the workload picks)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.vm_type_given = True


def _config(args, workload: str, params: dict[str, Any]) -> RunConfig:
    """The run the arguments describe; a bad knob raises `ConfigError`, a usage error."""
    from gmem.workloads import workload_vm_type

    vm_type = args.vm_type
    if not getattr(args, "vm_type_given", False) and not workload.startswith("trace:"):
        vm_type = workload_vm_type(workload)
    return RunConfig(
        workload=workload,
        params=params,
        pages=args.pages,
        seed=getattr(args, "seed", RunConfig.seed),
        chunk=args.chunk,
        vm_type=vm_type,
        huge_order=args.huge_order,
        costs=args.costs,
        discard=args.discard,
        discard_every=args.discard_every,
        fault=args.fault,
        retry=args.retry,
        merge_schedule=args.merge_schedule,
        merge_every=args.merge_every,
        coalesce=args.coalesce,
        prefault=args.prefault,
        sample_every=args.sample_every,
        nodes=args.nodes,
        mempolicy=args.mempolicy,
        host_pages=args.host_pages,
    )


def _run(args, config: RunConfig, strategies: Sequence[str], meta=None):
    """The stream of ``config`` and its results under each strategy."""
    from gmem.experiment import make_stream, run_experiment

    stream = make_stream(config)
    results = run_experiment(
        config,
        strategies,
        stream=stream,
        progress=not args.no_progress,
        meta=meta,
        jobs=getattr(args, "jobs", 1),  # `gmem run` runs one strategy
    )
    return stream, results


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


def _title(config: RunConfig, stream) -> str:
    gib = stream.pages * 4096 / (1 << 30)
    return f"{stream.name} on a {gib:g} GiB {config.vm_type} guest"


def _compare_and_write(args, config: RunConfig, meta=None) -> int:
    """Run every requested strategy, print the table, write the files."""
    from gmem import reports

    stream, results = _run(args, config, args.strategies, meta)
    title = _title(config, stream)
    reports.print_comparison(results, title=title)
    if config.vm_type in VM_TYPES_WITHOUT_PRIVATE_MEM:
        print(
            f"note: a {config.vm_type!r} VM has no private memory, so no conversion design "
            "applies: every design runs mainline's paths (no conversion, no attributes), "
            "and the rows differ only by noise in the wall-clock columns"
        )
    paths = _write_outputs(args, results, title)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_compare(args) -> int:
    return _compare_and_write(args, _config(args, args.workload, dict(args.param)))


def cmd_run(args) -> int:
    from gmem import reports

    config = _config(args, args.workload, dict(args.param))
    stream, (result,) = _run(args, config, [args.strategy])
    reports.print_comparison([result], title=_title(config, stream))
    paths = result.write(args.out)
    if not args.no_plots:
        paths.append(reports.plot_memory([result], Path(args.out) / "memory.png"))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_replay(args) -> int:
    if not Path(args.trace).is_file():
        raise UsageError(f"{args.trace}: no such file")
    workload = f"trace:{args.trace}"
    config = _config(args, workload, {"skip_bad": args.skip_bad, "touch": not args.no_touch})
    return _compare_and_write(args, config, meta={"workload": workload})


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

    from gmem.workloads import DEFAULT_VM_WORKLOADS, WORKLOADS

    table = Table(header_style="bold")
    table.add_column("workload")
    table.add_column("description")
    for name, spec in WORKLOADS.items():
        table.add_row(name, spec.description)
    for name, spec in DEFAULT_VM_WORKLOADS.items():
        table.add_row(name, f"{spec.description} [vm_type default]")
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
