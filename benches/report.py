"""Turn a ``pytest benches --benchmark-json=FILE`` result into the tables of BENCHMARKS.md
and the log-log scaling plot.

    python benches/report.py benches/results/bench-YYYY-MM-DD.json [--png benches/scaling.png]

The plot is written only with ``--png``.

Prints markdown to stdout: one table per benchmark group (medians, per-operation costs
where a benchmark does many operations — ``extra_info["ops"]`` — and ratios against the
baseline measured in the same run), then the issue-5 goals with their measured ratios.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

SPANS = ("4K", "2M", "1G", "64G")
SPAN_PAGES = {"4K": 1, "2M": 512, "1G": 1 << 18, "64G": 1 << 24}
STRATEGIES = ("dual", "inplace", "realloc", "two_offsets", "attr_hook")
FRAMES = ("runs", "scattered")


def fmt_time(s: float | None) -> str:
    """Seconds as ns / us / ms / s with three significant digits."""
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if s >= scale or unit == "ns":
            v = s / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:,.0f} {unit}"
    raise AssertionError


def fmt_ratio(r: float | None) -> str:
    if r is None or math.isnan(r):
        return "-"
    if r >= 100:
        return f"{r:,.0f}x"
    return f"{r:.3g}x"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


class Results:
    def __init__(self, path: Path):
        data = json.loads(path.read_text())
        self.meta = {k: data.get(k) for k in ("datetime", "machine_info", "commit_info")}
        self.by_group: dict[str, list[dict]] = defaultdict(list)
        for b in data["benchmarks"]:
            self.by_group[b["group"]].append(b)

    def find(self, group: str, **params) -> dict | None:
        for b in self.by_group.get(group, []):
            p = b.get("params") or {}
            if all(p.get(k) == v for k, v in params.items()):
                return b
        return None

    def median(self, group: str, **params) -> float | None:
        b = self.find(group, **params)
        return b["stats"]["median"] if b else None

    def per_op(self, group: str, **params) -> float | None:
        b = self.find(group, **params)
        if not b:
            return None
        return b["stats"]["median"] / max(1, int(b["extra_info"].get("ops", 1)))

    def extra(self, group: str, key: str, **params):
        b = self.find(group, **params)
        return b["extra_info"].get(key) if b else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _paired_per_op(r: Results, group: str, name: str, **params) -> float | None:
    """The per-operation median of the baseline timed in the same rounds as a benchmark
    (``extra_info["paired_<name>_s"]``, see ``benchutil.Paired``), or None."""
    b = r.find(group, **params)
    if not b or f"paired_{name}_s" not in b["extra_info"]:
        return None
    return b["extra_info"][f"paired_{name}_s"] / max(1, int(b["extra_info"].get("ops", 1)))


def attr_tables(r: Results) -> list[str]:
    out = []
    impls = ("gmem", "xa-rust", "numpy", "refmodel")
    rows = []
    g = "attr-range-uniform"
    base = r.median(g, impl="gmem", span="4K")
    for span in SPANS:
        ms = {i: r.median(g, impl=i, span=span) for i in impls}
        row = [span, *(fmt_time(ms[i]) for i in impls)]
        row += [fmt_ratio(_ratio(ms["gmem"], base))]
        row += [fmt_ratio(_ratio(ms[i], ms["gmem"])) for i in impls[1:]]
        rows.append(row)
    out.append(
        "### Range conversion, uniform map (one call, median)\n\n"
        + table(
            [
                "range",
                *impls,
                "gmem / gmem 4K",
                "xa-rust / gmem",
                "numpy / gmem",
                "refmodel / gmem",
            ],
            rows,
        )
    )
    g = "attr-range-fragmented"
    rows = []
    for span in SPANS:
        for n in (10**3, 10**4, 10**5, 10**6):
            ms = {i: r.median(g, impl=i, span=span, intervals=n) for i in impls}
            if not any(ms.values()):
                continue
            touched = r.extra(g, "touched", impl="gmem", span=span, intervals=n)
            row = [span, f"{n:.0e}", str(touched or "-"), *(fmt_time(ms[i]) for i in impls)]
            row += [fmt_ratio(_ratio(ms[i], ms["gmem"])) for i in impls[1:]]
            rows.append(row)
    out.append(
        "### Range conversion to private, fragmented map (median per call)\n\n"
        "`touched` = runs inside the range (what gmem's work grows with).\n\n"
        + table(
            ["range", "intervals", "touched", *impls, "xa / gmem", "numpy / gmem", "ref / gmem"],
            rows,
        )
    )
    g = "attr-random-convert"
    rows = []
    for n in (10**5, 10**6):
        ps = {i: r.per_op(g, impl=i, intervals=n) for i in ("gmem", "xa-rust", "numpy")}
        rows.append(
            [
                f"{n:.0e}",
                *(fmt_time(ps[i]) for i in ps),
                fmt_ratio(_ratio(ps["gmem"], ps["numpy"])),
                fmt_ratio(_ratio(ps["gmem"], ps["xa-rust"])),
            ]
        )
    out.append(
        "### Random single-page conversion, 10^5 pages per batch (per page; no page mapped)\n\n"
        + table(
            ["intervals", "gmem (vm.apply)", "xa-rust", "numpy u8", "gmem / numpy", "gmem / xa"],
            rows,
        )
    )
    g = "attr-lookup"
    rows = []
    for n in (1, 10**3, 10**4, 10**5, 10**6):
        ms = {i: r.median(g, impl=i, intervals=n) for i in impls}
        rows.append([str(n), *(fmt_time(ms[i]) for i in impls)])
    out.append(
        "### Point lookup from Python (one call, median)\n\n"
        + table(["intervals", *(f"{i}" for i in impls)], rows)
    )
    return out


def apply_tables(r: Results) -> list[str]:
    out = []
    g = "apply-vs-numpy"
    rows = []
    for n in (10**5, 10**6):
        for op, np_name in (("convert", "scatter"), ("read", "gather")):
            for frames in FRAMES:
                a, b = (
                    r.per_op(g, intervals=n, op=op, frames=frames, impl="gmem"),
                    r.per_op(g, intervals=n, op=op, impl="numpy"),
                )
                if a is None:
                    continue
                zaps = r.extra(
                    g, "stage2_zaps_per_event", intervals=n, op=op, frames=frames, impl="gmem"
                )
                present = r.extra(
                    g, "attr_intervals", intervals=n, op=op, frames=frames, impl="gmem"
                )
                params = dict(intervals=n, op=op, frames=frames, impl="gmem")
                rows.append(
                    [
                        f"{n:.0e}",
                        "-" if present is None else f"{present:,}",
                        op,
                        frames,
                        fmt_time(a),
                        f"numpy {np_name} {fmt_time(b)}",
                        fmt_ratio(_ratio(a, b)),
                        fmt_time(_paired_per_op(r, g, "numpy", **params)),
                        fmt_ratio(r.extra(g, "paired_ratio", **params)),
                        "-" if zaps is None else f"{zaps:.2f}",
                    ]
                )
    out.append(
        "### vm.apply vs numpy, 2^24 pages, 10^5 random mapped private pages (per event)\n\n"
        + table(
            [
                "intervals",
                "present",
                "op",
                "frames",
                "gmem",
                "numpy (apart)",
                "gmem / numpy",
                "numpy (paired)",
                "paired ratio",
                "zaps/event",
            ],
            rows,
        )
    )
    g = "apply-strategy"
    rows = []
    for s in STRATEGIES:
        row = [s]
        for op in ("convert", "read", "write"):
            b = next(
                (
                    x
                    for x in r.by_group.get(g, [])
                    if x["extra_info"].get("strategy") == s and x["params"]["op"] == op
                ),
                None,
            )
            if b is None:
                row += ["-", "-"]
                continue
            per = b["stats"]["median"] / b["extra_info"]["ops"]
            row += [fmt_time(per), f"{b['extra_info'].get('modelled_ns', 0):,.0f} ns"]
        rows.append(row)
    out.append(
        "### Every strategy x op: ns per event (random pages of a populated 2^20-page working "
        "set in a 2^24-page guest), and the simulated (modelled) cost per event\n\n"
        + table(
            [
                "strategy",
                "convert",
                "convert modelled",
                "read",
                "read modelled",
                "write",
                "write modelled",
            ],
            rows,
        )
    )
    g = "python-overhead-call"
    py = r.per_op(g, impl="python")
    rust = r.extra(g, "rust_ns_per_call", impl="rust")
    rust_s = rust * 1e-9 if rust is not None else None
    out.append(
        "### Python overhead of one call (1-page vm.set_memory_attributes, uniform map)\n\n"
        + table(
            ["from Python", "same call from Rust", "binding overhead", "ratio"],
            [
                [
                    fmt_time(py),
                    fmt_time(rust_s),
                    fmt_time(py - rust_s if py and rust_s else None),
                    fmt_ratio(_ratio(py, rust_s)),
                ]
            ],
        )
    )
    g = "python-overhead-apply"
    rust_ev = r.per_op(g, impl="rust")
    rows = [
        [
            str(b),
            fmt_time(r.per_op(g, impl="python", batch=b)),
            fmt_time(rust_ev),
            fmt_ratio(_ratio(r.per_op(g, impl="python", batch=b), rust_ev)),
            fmt_time(_paired_per_op(r, g, "rust", impl="python", batch=b)),
            fmt_ratio(r.extra(g, "paired_ratio", impl="python", batch=b)),
        ]
        for b in (1, 10, 1000, 10**5)
    ]
    out.append(
        "### vm.apply batch size vs one core call (random single-page conversions, per event)"
        "\n\n"
        + table(
            [
                "batch",
                "vm.apply",
                "Rust (one core call, apart)",
                "ratio",
                "Rust (paired)",
                "paired ratio",
            ],
            rows,
        )
    )
    return out


def scale_tables(r: Results) -> list[str]:
    out = []
    g = "scale-strategy"
    items = r.by_group.get(g, [])
    rows = []
    for size in ("2^20", "2^24", "2^28"):
        for w in ("boot", "swiotlb", "dma-churn", "hugepage-frag", "random"):
            row = [size, w]
            n = None
            for s in STRATEGIES:
                b = r.find(g, guest_size=size, workload=w, strategy=s)
                if b is None:
                    row.append("-")
                    continue
                n = b["extra_info"]["ops"]
                rate = n / b["stats"]["median"]
                row.append(f"{rate / 1e6:.3g} M" if rate >= 1e5 else f"{rate / 1e3:.3g} k")
            if n is None:
                continue
            rows.insert(len(rows), [*row[:2], f"{n:,}", *row[2:]])
    if items:
        out.append(
            "### Strategy comparison: events/s (one fresh VM per run; each workload touches at "
            "most ~1 GiB)\n\n" + table(["guest pages", "workload", "events", *STRATEGIES], rows)
        )
        rows = []
        for w in ("boot", "swiotlb", "dma-churn", "hugepage-frag", "random"):
            for s in STRATEGIES:
                b = r.find(g, guest_size="2^24", workload=w, strategy=s)
                if b is None:
                    continue
                e = b["extra_info"]
                rows.append(
                    [
                        w,
                        s,
                        f"{e['modelled_ns'] / 1e6:,.1f} ms",
                        f"{e['peak_pages_allocated']:,}",
                        f"{e['double_backed_pages']:,}",
                        f"{e['zeroed_pages']:,}",
                        f"{e['stage2_zaps']:,}",
                        f"{e['splits']:,}/{e['merges']:,}",
                        f"{e['memory_faults']:,}",
                        f"{e['eagain']:,}",
                        f"{e['violations']:,}",
                        f"{e['failed_events']:,}",
                    ]
                )
        out.append(
            "### Simulated metrics at 2^24 pages (vm.stats() after the run)\n\n"
            + table(
                [
                    "workload",
                    "strategy",
                    "modelled",
                    "peak pages",
                    "double-backed",
                    "zeroed",
                    "zaps",
                    "splits/merges",
                    "mem faults",
                    "EAGAIN",
                    "violations",
                    "failed events",
                ],
                rows,
            )
        )
    g = "memory-per-page"
    rows = []
    for s, frames in ((s, f) for f in FRAMES for s in STRATEGIES):
        b = r.find(g, strategy=s, frames=frames)
        if b:
            e = b["extra_info"]
            rows.append(
                [
                    s,
                    frames,
                    f"{e['populated']:,}",
                    f"{e['bytes_per_page']:.2f} B",
                    f"{e['populate_ns_per_page']:.0f} ns",
                ]
            )
    out.append(
        "### RSS per populated 4 KiB page (2^24-page guest; fresh interpreter)\n\n"
        + table(
            [
                "strategy",
                "frames",
                "pages populated",
                "RSS / page",
                "populate / page",
            ],
            rows,
        )
    )
    g = "memory-1tib"
    rows = []
    for size in ("2^20", "2^28"):
        b = r.find(g, guest_size=size)
        if b:
            e = b["extra_info"]
            rows.append(
                [
                    size,
                    f"{e['touched_pages']:,}",
                    f"{e['rss_empty_guest_mib']:.2f} MiB",
                    f"{e['rss_model_mib']:.1f} MiB",
                    f"{e['rss_total_mib']:.1f} MiB",
                ]
            )
    out.append(
        "### RSS of a large sparse guest (1 GiB touched in 512 random 2 MiB runs)\n\n"
        + table(
            [
                "guest pages",
                "touched pages",
                "empty guest (host+VM+slot)",
                "after touching (minus interpreter)",
                "process total",
            ],
            rows,
        )
    )
    g = "stage2-zap"
    rows = []
    for span in ("2M", "1G"):
        for how in ("convert", "punch"):
            b = r.find(g, span=span, how=how)
            if b:
                n = b["extra_info"]["pages"]
                rows.append(
                    [
                        span,
                        how,
                        fmt_time(b["stats"]["median"]),
                        fmt_time(b["stats"]["median"] / n),
                        f"{b['extra_info']['zaps_per_round']:.0f}",
                    ]
                )
    out.append(
        "### Stage-2 zap of a mapped range (4 KiB leaves)\n\n"
        + table(["range", "via", "median", "per page", "zaps per call"], rows)
    )
    g = "alloc-order"
    rows = []
    for order in (0, 9, 18):
        row = [str(order)]
        for op in ("alloc", "free"):
            b = r.find(g, order=order, op=op)
            if b is None:
                row += ["-", "-"]
                continue
            row += [
                fmt_time(b["stats"]["median"] / b["extra_info"]["ops"]),
                fmt_time(b["stats"]["median"] / b["extra_info"]["pages"]),
            ]
        rows.append(row)
    out.append(
        "### Allocator by order: guest_memfd fallocate / punch of 1 GiB in one call\n\n"
        + table(["order", "alloc / folio", "alloc / 4 KiB", "free / folio", "free / 4 KiB"], rows)
    )
    return out


def goals(r: Results) -> str:
    rows = []

    def add(goal, measured, limit, ok, baseline):
        verdict = "-" if ok is None else ("met" if ok else "**missed**")
        rows.append([goal, measured, limit, verdict, baseline])

    g = "attr-range-uniform"
    one = r.median(g, impl="gmem", span="4K")
    for span, lim in (("1G", 10), ("64G", 20)):
        x = _ratio(r.median(g, impl="gmem", span=span), one)
        xa = _ratio(r.median(g, impl="xa-rust", span=span), r.median(g, impl="xa-rust", span="4K"))
        add(
            f"uniform {span} conversion / 1-page conversion",
            fmt_ratio(x),
            f"<= {lim}x",
            None if x is None else x <= lim,
            f"per-gfn xa-rust: {fmt_ratio(xa)}",
        )
    g = "apply-vs-numpy"
    for op, name in (("convert", "scatter"), ("read", "gather")):
        for n, frames in ((n, f) for f in FRAMES for n in (10**5, 10**6)):
            params = dict(intervals=n, op=op, frames=frames, impl="gmem")
            separate = _ratio(r.per_op(g, **params), r.per_op(g, intervals=n, op=op, impl="numpy"))
            paired = r.extra(g, "paired_ratio", **params)
            x = separate if paired is None else paired
            add(
                f"vm.apply random {op} / numpy {name} ({n:.0e} intervals, frames {frames})",
                fmt_ratio(x) + ("" if paired is None else f" paired ({fmt_ratio(separate)} apart)"),
                "<= 10x",
                None if x is None else x <= 10,
                f"numpy {fmt_time(_paired_per_op(r, g, 'numpy', **params))}/elem paired, "
                f"{fmt_time(r.per_op(g, intervals=n, op=op, impl='numpy'))}/elem apart",
            )
    for frames in FRAMES:
        worst = None
        for s in STRATEGIES:
            v = r.extra("memory-per-page", "bytes_per_page", strategy=s, frames=frames)
            if v is not None and (worst is None or v > worst[1]):
                worst = (s, v)
        if worst:
            add(
                f"RSS per populated 4 KiB page (worst strategy, frames {frames})",
                f"{worst[1]:.2f} B ({worst[0]})",
                "<= 16 B",
                worst[1] <= 16,
                "kernel ≈ 80 B",
            )
    tib = r.find("memory-1tib", guest_size="2^28")
    if tib:
        e = tib["extra_info"]
        add(
            "RSS of a 1 TiB guest with 1 GiB touched (process total)",
            f"{e['rss_total_mib']:.1f} MiB (model {e['rss_model_mib']:.1f} MiB)",
            "< 100 MiB",
            e["rss_total_mib"] < 100,
            "-",
        )
        small = r.extra("memory-1tib", "rss_empty_guest_mib", guest_size="2^20")
        add(
            "empty guest RSS, 2^28 vs 2^20 pages",
            f"{e['rss_empty_guest_mib']:.2f} vs {small:.2f} MiB" if small is not None else "-",
            "no growth",
            None if small is None else e["rss_empty_guest_mib"] <= small + 1,
            "-",
        )
    py = r.per_op("python-overhead-call", impl="python")
    add(
        "one vm.set_memory_attributes call",
        fmt_time(py),
        "< 1 us",
        None if py is None else py < 1e-6,
        "Rust: "
        + fmt_time(
            (r.extra("python-overhead-call", "rust_ns_per_call", impl="rust") or math.nan) * 1e-9
        ),
    )
    g = "python-overhead-apply"
    separate = _ratio(r.per_op(g, impl="python", batch=10**5), r.per_op(g, impl="rust"))
    paired = r.extra(g, "paired_ratio", impl="python", batch=10**5)
    x = separate if paired is None else paired
    add(
        "vm.apply (batch 10^5) / same events in one core call",
        fmt_ratio(x) + ("" if paired is None else f" paired ({fmt_ratio(separate)} apart)"),
        "<= 1.2x",
        None if x is None else x <= 1.2,
        f"Rust {fmt_time(_paired_per_op(r, g, 'rust', impl='python', batch=10**5))}/event "
        f"paired, {fmt_time(r.per_op(g, impl='rust'))}/event apart",
    )
    return "### Issue-5 goals\n\n" + table(
        ["goal", "measured", "target", "verdict", "baseline"], rows
    )


def machine(r: Results) -> str:
    """One line on the machine's speed at the start and end of the run (from
    ``benches/conftest.py``'s probe), or a note that the run has none."""
    info = r.meta.get("machine_info") or {}
    parts = []
    for when in ("start", "end"):
        p = info.get(f"probe_{when}")
        if p:
            parts.append(
                f"{when}: Python loop {p['python_loop_ns']:.1f} ns/iter, numpy scatter "
                f"{p['numpy_scatter_ns']:.1f} ns, gather {p['numpy_gather_ns']:.1f} ns per element"
            )
    return "Machine speed probe — " + ("; ".join(parts) if parts else "not recorded") + "."


def _log_axes(ax, xlabel: str, ylabel: str, title: str, **legend) -> None:
    """Log-log axes with their labels, and a legend if anything was plotted."""
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**legend)


def plot(r: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    for impl in ("gmem", "xa-rust", "numpy", "refmodel"):
        pts = [(SPAN_PAGES[s], r.median("attr-range-uniform", impl=impl, span=s)) for s in SPANS]
        pts = [(x, y) for x, y in pts if y]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
    _log_axes(
        ax,
        "pages converted (uniform map, 2^24-page guest)",
        "seconds per conversion",
        "Range conversion vs range size",
    )
    ax = axes[1]
    ns = (10**3, 10**4, 10**5, 10**6)
    series = {
        "range 64 GiB (gmem)": [
            r.median("attr-range-fragmented", impl="gmem", span="64G", intervals=n) for n in ns
        ],
        "range 1 GiB (gmem)": [
            r.median("attr-range-fragmented", impl="gmem", span="1G", intervals=n) for n in ns
        ],
        "range 1 page (gmem)": [
            r.median("attr-range-fragmented", impl="gmem", span="4K", intervals=n) for n in ns
        ],
        "range 64 GiB (xa-rust)": [
            r.median("attr-range-fragmented", impl="xa-rust", span="64G", intervals=n) for n in ns
        ],
        "lookup (gmem)": [r.median("attr-lookup", impl="gmem", intervals=n) for n in ns],
        "random 1-page, per page (gmem)": [
            r.per_op("attr-random-convert", impl="gmem", intervals=n) if n >= 10**5 else None
            for n in ns
        ],
    }
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(ns, ys, strict=True) if y]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    _log_axes(
        ax,
        "intervals in the attribute map",
        "seconds per operation",
        "Cost vs number of intervals",
        fontsize=8,
    )
    ax = axes[2]
    sizes = {"2^20": 1 << 20, "2^24": 1 << 24, "2^28": 1 << 28}
    for s in STRATEGIES:
        pts = []
        for label, pages in sizes.items():
            tot_t = tot_n = 0.0
            for b in r.by_group.get("scale-strategy", []):
                p = b["params"]
                if p["strategy"] == s and p["guest_size"] == label:
                    tot_t += b["stats"]["median"]
                    tot_n += b["extra_info"]["ops"]
            if tot_n:
                pts.append((pages, tot_t / tot_n))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=s)
    _log_axes(
        ax,
        "guest size (pages)",
        "seconds per event (all workloads)",
        "vm.apply cost per event vs guest size",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    # No default: the committed plot is written only when asked for.
    ap.add_argument("--png", type=Path, help="write the scaling plot here")
    args = ap.parse_args(argv)
    r = Results(args.json)
    parts = [machine(r), goals(r), *attr_tables(r), *apply_tables(r), *scale_tables(r)]
    print("\n\n".join(parts))
    if args.png is not None:
        plot(r, args.png)


if __name__ == "__main__":
    main()
