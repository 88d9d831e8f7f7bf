"""`benches/report.py`: a benchmark JSON becomes BENCHMARKS.md's tables and goal verdicts;
the plot is written only when asked for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benches" / "report.py")
    assert spec
    assert spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(op: str, impl: str, frames: str, median: float, **extra) -> dict:
    return {
        "group": "apply-vs-numpy",
        "params": {"intervals": 10**5, "op": op, "frames": frames, "impl": impl},
        "stats": {"median": median},
        "extra_info": {"ops": 1000, **extra},
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Reads: gmem 55 us and numpy 5 us per 1000 events (11x, over the goal); conversions:
    gmem 40 us and numpy 5 us (8x, within it)."""
    benches = [
        _bench("read", "gmem", "scattered", 55e-6, attr_intervals=100_002),
        _bench("read", "numpy", "runs", 5e-6, attr_intervals=100_002),
        _bench("convert", "gmem", "scattered", 40e-6, attr_intervals=99_999),
        _bench("convert", "numpy", "runs", 5e-6, attr_intervals=99_999),
    ]
    p = tmp_path / "bench.json"
    p.write_text(json.dumps({"benchmarks": benches}))
    return p


def _report(report, path: Path, capsys) -> tuple[str, dict[str, str]]:
    """The report of ``path``: all of it, and its table rows by first cell."""
    report.main([str(path)])
    out = capsys.readouterr().out
    return out, {line.split(" | ")[0].strip("| "): line for line in out.splitlines()}


def test_goal_rows_and_present_intervals(report, results, capsys, monkeypatch):
    plots = []
    monkeypatch.setattr(report, "plot", lambda r, path: plots.append(path))
    out, rows = _report(report, results, capsys)
    read = rows["vm.apply random read / numpy gather (1e+05 intervals, frames scattered)"]
    assert "11x" in read
    assert "**missed**" in read
    conv = rows["vm.apply random convert / numpy scatter (1e+05 intervals, frames scattered)"]
    assert "8x" in conv
    assert "| met |" in conv
    # The per-event table shows the intervals the run found beside the target count.
    assert "| 1e+05 | 100,002 | read | scattered | 55 ns | numpy gather 5 ns | 11x |" in out
    assert "| 1e+05 | 99,999 | convert | scattered | 40 ns |" in out
    assert plots == [], "no plot without --png"


def test_plot_only_where_asked(report, results, tmp_path, monkeypatch):
    plots = []
    monkeypatch.setattr(report, "plot", lambda r, path: plots.append(path))
    report.main([str(results), "--png", str(tmp_path / "p.png")])
    assert plots == [tmp_path / "p.png"]


def test_paired_ratio_decides_the_verdict(report, tmp_path, capsys):
    """A gmem benchmark that carries a baseline timed in its own rounds is judged by the
    paired ratio; the ratio against the separate numpy benchmark is shown beside it."""
    benches = [
        _bench("read", "gmem", "scattered", 55e-6, paired_numpy_s=6.0e-6, paired_ratio=9.5),
        _bench("read", "numpy", "runs", 5e-6),
        _bench("convert", "gmem", "runs", 40e-6, paired_numpy_s=3.0e-6, paired_ratio=13.0),
        _bench("convert", "numpy", "runs", 5e-6),
    ]
    p = tmp_path / "bench.json"
    machine = {"python_loop_ns": 30.0, "numpy_scatter_ns": 5.5, "numpy_gather_ns": 4.5}
    p.write_text(json.dumps({"benchmarks": benches, "machine_info": {"probe_start": machine}}))
    out, rows = _report(report, p, capsys)
    read = rows["vm.apply random read / numpy gather (1e+05 intervals, frames scattered)"]
    assert "9.5x paired (11x apart)" in read
    assert "| met |" in read
    assert "numpy 6 ns/elem paired, 5 ns/elem apart" in read
    conv = rows["vm.apply random convert / numpy scatter (1e+05 intervals, frames runs)"]
    assert "13x paired (8x apart)" in conv
    assert "**missed**" in conv
    assert "| 1e+05 | - | read | scattered | 55 ns | numpy gather 5 ns | 11x | 6 ns | 9.5x |" in out
    assert "start: Python loop 30.0 ns/iter, numpy scatter 5.5 ns, gather 4.5 ns" in out
    assert "end:" not in out


def test_machine_probe_absent(report, results, capsys):
    report.main([str(results)])
    assert "Machine speed probe — not recorded." in capsys.readouterr().out


def test_one_call_is_per_call(report, tmp_path, capsys):
    """The one-call goal divides the timed loop by its calls (``ops``)."""
    benches = [
        {
            "group": "python-overhead-call",
            "params": {"impl": "python"},
            "stats": {"median": 1.2e-3},
            "extra_info": {"ops": 2000},
        }
    ]
    p = tmp_path / "bench.json"
    p.write_text(json.dumps({"benchmarks": benches}))
    _, rows = _report(report, p, capsys)
    call = rows["one vm.set_memory_attributes call"]
    assert "| 600 ns |" in call
    assert "| met |" in call
