"""The ``gmem`` command end to end, in a subprocess writing real files; reports; SimPy."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gmem import guest as gmem_guest
from gmem import reports
from gmem.constants import STRATEGIES
from gmem.policies import run
from gmem.workloads import make_workload

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--pages", "16384", "-p", "rounds=60", "--no-progress"]


def gmem_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100
    assert height > 100


def test_compare_writes_table_and_files(tmp_path):
    out = tmp_path / "out"
    r = gmem_cli("compare", *SMALL, "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in STRATEGIES:
        assert name in r.stdout
        assert (out / f"series-{name}.csv").is_file()
    assert "peak MiB" in r.stdout
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [row["strategy"] for row in summary] == list(STRATEGIES)
    assert all(row["workload"] == "dma-churn" for row in summary)
    data = json.loads((out / "summary.json").read_text())
    assert len(data) == 5
    assert data[0]["pages"] == 16384
    assert_png(out / "memory.png")
    assert_png(out / "counters.png")


def test_compare_options(tmp_path):
    costs = tmp_path / "c.toml"
    costs.write_text("[costs]\nzero_4k = 1\n")
    r = gmem_cli(
        "compare",
        *SMALL,
        "--strategies",
        "dual,inplace",
        "--workload",
        "hugepage-frag",
        "-p",
        "per_granule=2",
        "--huge-order",
        "9",
        "--discard",
        "deferred",
        "--merge",
        "periodic",
        "--coalesce",
        "--costs",
        str(costs),
        "--seed",
        "5",
        "--no-plots",
        "--out",
        "o",
        cwd=tmp_path,
    )
    # rounds is not a hugepage-frag parameter: a usage error, not a traceback
    assert r.returncode == 2
    assert "has no parameter 'rounds'" in r.stderr
    r = gmem_cli(
        "compare",
        "--pages",
        "16384",
        "--no-progress",
        "--strategies",
        "dual,inplace",
        "-w",
        "hugepage-frag",
        "-p",
        "per_granule=2",
        "--huge-order",
        "9",
        "--discard",
        "deferred",
        "--merge",
        "periodic",
        "--coalesce",
        "--costs",
        str(costs),
        "--seed",
        "5",
        "--no-plots",
        "--out",
        "o",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [d["strategy"] for d in data] == ["dual", "inplace"]
    assert data[0]["seed"] == 5
    assert data[0]["huge_order"] == 9
    assert "discard=deferred" in data[0]["policy"]
    assert "coalesce" in data[0]["policy"]
    assert not (tmp_path / "o" / "memory.png").exists()


def test_run_writes_time_series(tmp_path):
    r = gmem_cli("run", *SMALL, "--strategy", "inplace", "--out", "r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "r"
    for name in ("summary.csv", "series.csv", "run.json"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "run.json").read_text())
    assert doc["summary"]["strategy"] == "inplace"
    assert len(doc["series"]["applied_events"]) > 2
    assert_png(out / "memory.png")


def test_replay_ftrace(tmp_path):
    trace = tmp_path / "guest.trace"
    trace.write_text(
        " CPU 0/KVM-2345  [001] d..1.  147.000002: kvm_hypercall: nr 0xc a0 0x200000 a1 0x10"
        " a2 0x0 a3 0x0\n"
        " CPU 0/KVM-2345  [001] d..1.  147.000003: kvm_exit: reason HLT\n"
        " CPU 0/KVM-2345  [001] d..1.  147.000004: kvm_hypercall: nr 0xc a0 0x200000 a1 0x10"
        " a2 0x10 a3 0x0\n"
    )
    r = gmem_cli("replay", str(trace), "--no-progress", "--out", "p", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert len(data) == 5
    assert data[0]["pages"] == 1024  # the extent (gfn 0x200 + 16), rounded up to 2 MiB
    assert all(d["conversions"] >= 2 for d in data)


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["compare", "--workload", "nope"], 1, "unknown workload 'nope'"),
        (["compare", "--strategies", "dual,bogus"], 2, "unknown strategy 'bogus'"),
        (["compare", "--pages", "-3"], 2, "must be positive"),
        (["compare", "-p", "nokey"], 2, "expected KEY=VALUE"),
        (["compare", "-p", "frobnicate=1"], 2, "has no parameter 'frobnicate'"),
        (["run", "--strategy", "nope"], 2, "invalid choice"),
        (["replay", "absent.trace"], 2, "absent.trace: no such file"),
        (["compare", "--costs", "missing.toml"], 1, "missing.toml"),
        (["compare", "--jobs", "0"], 2, "jobs: must be >= 1, got 0"),
        (["replay", "absent.trace", "-j", "x"], 2, "--jobs/-j: not an integer: 'x'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, status, message):
    r = gmem_cli(*args, cwd=tmp_path)
    assert r.returncode == status, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_malformed_trace_reports_file_and_line(tmp_path):
    trace = tmp_path / "bad.trace"
    trace.write_text("# tracer: nop\nnot an event at all\n")
    r = gmem_cli("replay", str(trace), cwd=tmp_path)
    assert r.returncode == 1
    assert f"{trace}:2: not an ftrace event line" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = gmem_cli("replay", str(trace), "--skip-bad", "--no-plots", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", [[], ["compare"], ["run"], ["replay"], ["workloads"]])
def test_help_everywhere(tmp_path, command):
    r = gmem_cli(*command, "--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "usage: gmem" in r.stdout


def test_workloads_lists_all(tmp_path):
    r = gmem_cli("workloads", cwd=tmp_path)
    assert r.returncode == 0
    for name in ("boot", "swiotlb", "dma-churn", "hugepage-frag", "random", "trace:PATH"):
        assert name in r.stdout


def test_no_command_prints_usage(tmp_path):
    r = gmem_cli(cwd=tmp_path)
    assert r.returncode == 2
    assert "usage: gmem" in r.stderr


def test_reports_in_process(tmp_path):
    results = []
    for strategy in ("dual", "inplace"):
        host = gmem_guest.make_host(8192)
        guest = gmem_guest.build_vm(host, 8192, "sw_protected", strategy)
        results.append(run(guest, make_workload("dma-churn", 8192, rounds=20), sample_every=200))
    assert_png(reports.plot_memory(results, tmp_path / "m.png"))
    assert_png(reports.plot_counters(results, tmp_path / "c.png"))
    paths = reports.write_summary(results, tmp_path)
    assert {p.name for p in paths} == {"summary.csv", "summary.json"}
    frame = reports.comparison_frame(results)
    assert list(frame["strategy"]) == ["dual", "inplace"]
    table = reports.comparison_table(results)
    assert [c.header for c in table.columns] == ["", "dual", "inplace"]


def test_simpy_example_runs():
    pytest.importorskip("simpy")
    spec = importlib.util.spec_from_file_location(
        "simpy_backend", ROOT / "examples" / "simpy_backend.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for strategy in ("dual", "inplace"):
        out = mod.run_simulation(strategy=strategy, pages=1 << 14, vcpus=4, until_ns=5_000_000)
        assert out["dma_buffers"] > 10
        assert out["failed_events"] == 0
        assert out["modelled_ns"] > 0
    again = mod.run_simulation(strategy="inplace", pages=1 << 14, vcpus=4, until_ns=5_000_000)
    assert again == out  # deterministic under the seed
