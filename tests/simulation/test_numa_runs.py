"""Runs on a NUMA host: ``RunConfig(nodes=, mempolicy=, host_pages=)``, ``gmem compare
--nodes N --mempolicy MODE:NODES``, per-node footprint in the results, and a node running
out while another has room reported as ENOMEM events, not a crash."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

import gmem
from gmem import reports
from gmem.config import ConfigError, RunConfig, parse_mempolicy
from gmem.experiment import run_experiment

SMALL = {"pages": 4096, "params": {"rounds": 40}}


def run(strategies=("dual", "inplace"), **knobs):
    return run_experiment(RunConfig(**SMALL, **knobs), list(strategies), jobs=1)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("bind:0", (gmem.MPOL_BIND, [0])),
        ("interleave:1,0", (gmem.MPOL_INTERLEAVE, [0, 1])),
        ("preferred_many:0-2", (gmem.MPOL_PREFERRED_MANY, [0, 1, 2])),
        ("weighted-interleave:2", (gmem.MPOL_WEIGHTED_INTERLEAVE, [2])),
        ("preferred:1", (gmem.MPOL_PREFERRED, [1])),
        ("preferred", (gmem.MPOL_PREFERRED, [])),
        ("local", (gmem.MPOL_LOCAL, [])),
        ("default", (gmem.MPOL_DEFAULT, [])),
    ],
)
def test_parse_mempolicy(text, want):
    assert parse_mempolicy(text, 4) == want


@pytest.mark.parametrize(
    ("knobs", "knob"),
    [
        ({"nodes": 0}, "nodes"),
        ({"nodes": 2, "mempolicy": "bogus:0"}, "mempolicy"),
        ({"nodes": 2, "mempolicy": "bind"}, "mempolicy"),
        ({"nodes": 2, "mempolicy": "bind:2"}, "mempolicy"),
        ({"nodes": 2, "mempolicy": "bind:x"}, "mempolicy"),
        ({"nodes": 2, "mempolicy": "bind:1-0"}, "mempolicy"),
        ({"nodes": 2, "mempolicy": "local:0"}, "mempolicy"),
        ({"host_pages": 0}, "host_pages"),
    ],
)
def test_bad_numa_knobs(knobs, knob):
    with pytest.raises(ConfigError) as e:
        RunConfig(**SMALL, **knobs)
    assert e.value.knob == knob


def test_one_node_runs_are_unchanged():
    """No NUMA keys in a plain run's summary, no NUMA rows in its table."""
    (r,) = run(["dual"])
    assert not any(k.startswith("node") for k in r.summary)
    assert "mempolicy" not in r.summary
    assert not any(c.startswith("node ") for c in reports.comparison_frame([r]).columns)


def test_bind_places_every_page_on_its_node():
    for r in run(nodes=2, mempolicy="bind:1"):
        s = r.summary
        assert s["nodes"] == 2
        assert s["mempolicy"] == "bind:1"
        assert s["node0_pages_allocated"] == 0
        assert s["node1_pages_allocated"] == s["pages_allocated"] > 0
        assert s["status_enomem"] == 0


def test_interleave_spreads_the_footprint():
    for r in run(nodes=2, mempolicy="interleave:0,1"):
        s = r.summary
        a, b = s["node0_pages_allocated"], s["node1_pages_allocated"]
        assert a + b == s["pages_allocated"]
        assert abs(a - b) <= max(2, (a + b) // 50), (a, b)
    frame = reports.comparison_frame(run(nodes=2, mempolicy="interleave:0,1"))
    assert {"node 0 MiB", "node 1 MiB", "ENOMEM events"} <= set(frame.columns)


def test_default_policy_fills_the_local_node_first():
    """No policy: node 0 (the local node) while it has room, then the next ones."""
    (r,) = run(["dual"], nodes=4, host_pages=40000)
    s = r.summary
    assert s["mempolicy"] == "default"
    assert s["node0_pages_allocated"] == s["pages_allocated"]
    assert [s[f"node{k}_pages_allocated"] for k in (1, 2, 3)] == [0, 0, 0]
    (r,) = run(["dual"], nodes=4)  # 2,176 pages a node: node 0 fills, node 1 takes over
    s = r.summary
    assert s["node1_pages_allocated"] == s["pages_allocated"] - s["node0_pages_allocated"] > 0
    assert s["node0_free_pages"] < 100  # what was freed after node 0 filled up


def test_a_full_bound_node_is_a_finding_not_a_crash():
    """Bound to node 0 of a host too small for the guest: events fail with ENOMEM and
    are counted, node 0 is full, node 1 still has room."""
    (r,) = run(["dual"], nodes=2, mempolicy="bind:0", host_pages=4096)
    s = r.summary
    assert s["status_enomem"] > 0
    assert s["failed_events"] >= s["status_enomem"]
    assert s["node0_free_pages"] < 100  # full when it failed; some pages freed since
    assert s["node1_free_pages"] == 2048
    frame = reports.comparison_frame([r])
    assert frame["ENOMEM events"].tolist() == [s["status_enomem"]]
    # The same host without the binding falls back to node 1: no ENOMEM.
    (r,) = run(["dual"], nodes=2, host_pages=4096)
    assert r.summary["status_enomem"] == 0
    assert r.summary["node1_pages_allocated"] > 0


def gmem_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_compare_cli_numa(tmp_path):
    out = tmp_path / "out"
    args = ["--pages", "4096", "-p", "rounds=40", "--no-progress", "--no-plots"]
    r = gmem_cli(
        "compare",
        *args,
        "-s",
        "dual,inplace",
        "--nodes",
        "2",
        "--mempolicy",
        "interleave:0,1",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "node 1 MiB" in r.stdout
    assert "ENOMEM events" in r.stdout
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["mempolicy"] for row in rows] == ["interleave:0,1"] * 2
    assert all(int(row["node1_pages_allocated"]) > 0 for row in rows)
    # A full bound node: reported, exit 0.
    r = gmem_cli(
        "run",
        *args,
        "--nodes",
        "2",
        "--mempolicy",
        "bind:0",
        "--host-pages",
        "4096",
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "ENOMEM events" in r.stdout


@pytest.mark.parametrize(
    "extra",
    [["--nodes", "0"], ["--nodes", "2", "--mempolicy", "bind:5"], ["--mempolicy", "nope"]],
)
def test_compare_cli_bad_numa_flags(tmp_path, extra):
    r = gmem_cli("compare", "--pages", "64", "--no-progress", *extra, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("gmem compare: error:"), r.stderr
