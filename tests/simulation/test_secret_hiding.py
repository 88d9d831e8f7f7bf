"""The ``secret-hiding`` workload (a Firecracker-style default VM in a NO_DIRECT_MAP
guest_memfd), and the refusal of converting workloads on a VM without private memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import gmem
from gmem import Op
from gmem.config import ConfigError, RunConfig, check_vm_type
from gmem.experiment import run_experiment
from gmem.guest import build_vm, make_host
from gmem.policies import run
from gmem.reports import comparison_frame
from gmem.streams import events
from gmem.sweep import expand_grid
from gmem.workloads import (
    DEFAULT_VM_WORKLOADS,
    WORKLOADS,
    get_workload,
    make_events,
    make_workload,
    workload_converts,
    workload_vm_type,
)

PAGES = 4096
SMALL = {"ios": 500, "balloon_every": 100}


def gmem_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args], cwd=cwd, capture_output=True, text=True
    )


def test_registry():
    assert set(DEFAULT_VM_WORKLOADS) == {"secret-hiding"}
    assert get_workload("secret-hiding").generator.__doc__.count("NO_DIRECT_MAP") >= 1
    assert not workload_converts("secret-hiding")
    assert all(workload_converts(n) for n in WORKLOADS)
    assert workload_converts("trace:x.jsonl")
    assert workload_vm_type("secret-hiding") == "default"
    assert workload_vm_type("dma-churn") == "sw_protected"


def test_events_never_convert_and_stay_in_bounds():
    stream = make_workload("secret-hiding", PAGES, seed=1, chunk=700, **SMALL)
    ev = stream.to_array()
    assert not np.isin(ev["op"], [Op.CONVERT_PRIVATE, Op.CONVERT_SHARED]).any()
    assert not np.isin(ev["op"], [Op.GUEST_READ_PRIVATE, Op.GUEST_WRITE_PRIVATE]).any()
    assert (ev["gfn"] + ev["npages"] <= PAGES).all()
    assert (ev["npages"] >= 1).all()
    assert len(ev) == stream.total_events
    assert (ev["op"] == Op.PUNCH_HOLE).sum() == 5
    assert all(len(b) <= 700 for b in stream)


def test_deterministic_under_seed():
    a = make_events("secret-hiding", PAGES, seed=3, **SMALL)
    b = make_events("secret-hiding", PAGES, seed=3, **SMALL)
    c = make_events("secret-hiding", PAGES, seed=4, **SMALL)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"touch": 2.0}, "touch"),
        ({"ios": -1}, "ios"),
        ({"tx_fraction": -0.1}, "tx_fraction"),
        ({"balloon_every": -1}, "balloon_every"),
    ],
)
def test_bad_parameters(params, word):
    with pytest.raises(ValueError, match=word):
        make_workload("secret-hiding", PAGES, **params)


def test_build_vm_lays_out_a_secret_guest():
    host = make_host(PAGES)
    g = build_vm(host, PAGES, "default", "dual")
    flags = gmem.GUEST_MEMFD_FLAG_MMAP | gmem.GUEST_MEMFD_FLAG_INIT_SHARED
    assert g.gmem.flags == flags | gmem.GUEST_MEMFD_FLAG_NO_DIRECT_MAP
    assert g.mapping.kind != "anonymous"
    assert g.shared_gmem is None
    with pytest.raises(ValueError, match="huge_order"):
        build_vm(make_host(PAGES), PAGES, "default", "dual", huge_order=9)


def test_run_counts_the_direct_map():
    host = make_host(PAGES)
    g = build_vm(host, PAGES, "default", "dual")
    result = run(g, make_workload("secret-hiding", PAGES, seed=0, **SMALL))
    s = result.summary
    assert s["vm_type"] == "default"
    assert s["failed_events"] == 0
    assert s["conversions"] == 0
    # boot touches every page once; each balloon cycle frees and re-touches 512 pages
    assert s["direct_map_removals"] == PAGES + 5 * 512
    assert s["direct_map_restores"] == 5 * 512
    assert s["direct_map_flushes"] == s["direct_map_removals"]
    assert s["direct_map_splits"] >= PAGES // 512
    assert s["host_faults"] == 0
    host.check()


def test_every_design_runs_it_alike():
    config = RunConfig(workload="secret-hiding", vm_type="default", pages=PAGES, params=SMALL)
    results = run_experiment(config, gmem.STRATEGIES, jobs=1)
    rows = [
        {k: v for k, v in r.summary.items() if k not in ("strategy", "wall_s", "events_per_s")}
        for r in results
    ]
    assert all(row == rows[0] for row in rows)


def test_compare_table_shows_the_direct_map_work():
    config = RunConfig(workload="secret-hiding", vm_type="default", pages=PAGES, params=SMALL)
    results = run_experiment(config, ["dual", "inplace"], jobs=1)
    frame = comparison_frame(results)
    for title, key in [
        ("direct-map removals", "direct_map_removals"),
        ("direct-map flushes", "direct_map_flushes"),
        ("direct-map splits", "direct_map_splits"),
    ]:
        assert frame[title].tolist() == [r.summary[key] for r in results]
        assert (frame[title] > 0).all()
    plain = comparison_frame(run_experiment(RunConfig(pages=1024), ["dual"], jobs=1))
    assert "direct-map removals" not in plain.columns


def test_config_refuses_mismatched_vm_types():
    with pytest.raises(ConfigError, match="no private memory") as e:
        RunConfig(workload="dma-churn", vm_type="default")
    assert e.value.knob == "vm_type"
    with pytest.raises(ConfigError, match="vm_type must be 'default'"):
        RunConfig(workload="secret-hiding")
    with pytest.raises(ConfigError, match="huge_order"):
        RunConfig(workload="secret-hiding", vm_type="default", huge_order=9)
    assert check_vm_type("secret-hiding", "default") is None
    assert check_vm_type("boot", "tdx") is None
    assert "converts" in check_vm_type("trace:t.jsonl", "default")


def test_runner_refuses_a_converting_workload_on_a_default_vm():
    host = make_host(PAGES)
    g = build_vm(host, PAGES, "default", "dual")
    before = g.stats()["events"]
    with pytest.raises(ValueError, match=r"'dma-churn' converts memory.*'default' VM"):
        run(g, make_workload("dma-churn", PAGES, rounds=5))
    assert g.stats()["events"] == before  # refused before anything ran
    with pytest.raises(ValueError, match="converts memory"):
        run(g.vm, events(Op.CONVERT_SHARED, 0, 1))


def test_grid_picks_the_workload_vm_type():
    cells = expand_grid({"workload": ["secret-hiding", "boot"], "strategy": ["dual"]})
    assert [c["vm_type"] for c in cells] == ["default", "sw_protected"]
    cells = expand_grid({"workload": ["boot"], "vm_type": ["tdx"], "strategy": ["dual"]})
    assert cells[0]["vm_type"] == "tdx"


def test_cli_compare_secret_hiding(tmp_path):
    r = gmem_cli(
        "compare", "--workload", "secret-hiding", "--pages", "2048", "-p", "ios=200",
        "--no-progress", "--no-plots", "--out", "o", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "no conversion design applies" in r.stdout
    data = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert {d["vm_type"] for d in data} == {"default"}
    assert all(d["direct_map_removals"] == 2048 for d in data)


def test_cli_refuses_a_converting_workload_on_a_default_vm(tmp_path):
    r = gmem_cli("compare", "--workload", "boot", "--vm-type", "default", cwd=tmp_path)
    assert r.returncode == 2
    assert "vm_type: a 'default' VM has no private memory" in r.stderr
    assert "Traceback" not in r.stderr
    r = gmem_cli("compare", "--workload", "secret-hiding", "--vm-type", "tdx", cwd=tmp_path)
    assert r.returncode == 2
    assert "vm_type must be 'default'" in r.stderr


def test_cli_lists_it(tmp_path):
    r = gmem_cli("workloads", cwd=tmp_path)
    assert r.returncode == 0
    assert "secret-hiding" in r.stdout
