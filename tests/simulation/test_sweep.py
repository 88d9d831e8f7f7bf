"""`gmem sweep`: grids, the local process pool, Dask, resume, failing cells, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from gmem.constants import STRATEGIES
from gmem.sweep import (
    TIMING_COLUMNS,
    GridError,
    expand_grid,
    load_grid,
    parse_executor,
    run_cell,
    sweep,
)

ROOT = Path(__file__).resolve().parents[2]
PAGES = 1 << 12

GRID = f"""
[grid]
strategy = ["dual", "inplace"]
pages = {PAGES}
seed = [0, 1]

[grid.params]
rounds = 40
"""


def importlib_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def write_grid(tmp_path: Path, text: str = GRID, name: str = "grid.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def metrics(df: pd.DataFrame) -> pd.DataFrame:
    """What must not depend on the executor: every column but the timings."""
    return df.drop(columns=[c for c in TIMING_COLUMNS if c in df]).reset_index(drop=True)


def gmem_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def local_result(tmp_path_factory):
    """The small grid run once on the local process pool (shared by several tests)."""
    tmp = tmp_path_factory.mktemp("local")
    out = tmp / "out"
    df = sweep(write_grid(tmp), executor="local", workers=2, out=out, progress=False)
    return df, out


# --- the grid ----------------------------------------------------------------------------


def test_grid_is_the_cartesian_product(tmp_path):
    cells = expand_grid(load_grid(write_grid(tmp_path)))
    assert [(c["strategy"], c["seed"]) for c in cells] == [
        ("dual", 0),
        ("dual", 1),
        ("inplace", 0),
        ("inplace", 1),
    ]
    assert [c["index"] for c in cells] == [0, 1, 2, 3]
    assert len({c["cell"] for c in cells}) == 4
    first = cells[0]
    # defaults filled in, parameters of the workload and of the cost model kept apart
    assert first["workload"] == "dma-churn"
    assert first["vm_type"] == "sw_protected"
    assert first["discard"] == "eager"
    assert first["params.rounds"] == 40
    # keys depend on the parameters only: spelling a default out changes nothing
    explicit = expand_grid(
        load_grid(
            {
                "strategy": ["dual", "inplace"],
                "seed": [0, 1],
                "pages": PAGES,
                "discard": "eager",
                "params": {"rounds": 40},
            }
        )
    )
    assert [c["cell"] for c in explicit] == [c["cell"] for c in cells]


def test_grid_defaults_to_every_strategy():
    cells = expand_grid(load_grid({"seed": [0, 1], "costs": {"zero_4k": 1}}))
    assert [c["strategy"] for c in cells] == list(STRATEGIES) * 2
    assert all(c["costs.zero_4k"] == 1 for c in cells)


def test_example_grid_is_valid():
    cells = expand_grid(load_grid(ROOT / "examples" / "grid.toml"))
    assert len(cells) == 240


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ('[grid]\nstrategy = ["dual", "inplac"]\n', "grid.strategy", "'inplac'"),
        ('[grid]\nstrategies = ["dual"]\n', "grid.strategies", "did you mean 'strategy'"),
        ("[grid]\npages = []\n", "grid.pages", "empty list"),
        ("[grid]\npages = [0]\n", "grid.pages", "must be >= 1"),
        ('[grid]\nseed = ["one"]\n', "grid.seed", "expected an integer"),
        ("[grid]\nseed = [1, 1]\n", "grid.seed", "duplicate value 1"),
        ("[grid]\nhuge_order = 3\n", "grid.huge_order", "unknown value 3"),
        ("[grid]\ncoalesce = 1\n", "grid.coalesce", "expected true or false"),
        ('[grid]\nworkload = "nope"\n', "grid.workload", "unknown workload 'nope'"),
        ("[grid]\n[grid.costs]\nzero4k = 1\n", "grid.costs.zero4k", "did you mean 'zero_4k'"),
        ("[grid]\n[grid.costs]\nzero_4k = -1\n", "grid.costs.zero_4k", "non-negative"),
        ("[grid]\nparams = 3\n", "grid.params", "expected a table"),
        ("[grid]\n[grid.params]\nrounds = [[1]]\n", "grid.params.rounds", "scalars"),
        ("strategy = 'dual'\n[grid]\nseed = 0\n", "strategy", "top-level"),
        ("[grid\n", "grid", "not valid TOML"),
    ],
)
def test_malformed_grid_names_the_key(tmp_path, text, key, message):
    path = write_grid(tmp_path, text)
    with pytest.raises(GridError) as info:
        sweep(path, out=tmp_path / "out", progress=False)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.key == key
    assert str(err).startswith(f"{path}: {key}: ")
    assert message in str(err)
    assert "\n" not in str(err)
    assert not (tmp_path / "out" / "results.csv").exists()


def test_cli_malformed_grid_is_one_line_exit_2(tmp_path):
    write_grid(tmp_path, '[grid]\nvm_type = ["tdx", "sev"]\n')
    r = gmem_cli("sweep", "grid.toml", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gmem sweep: error: grid.toml: grid.vm_type: unknown value 'sev' "
        "(known: sw_protected, pkvm, tdx, snp)"
    ]
    assert r.stdout == ""
    r = gmem_cli("sweep", "grid.toml", "--executor", "spark", cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown executor 'spark'" in r.stderr


def test_parse_executor():
    assert parse_executor("local") == ("local", None)
    assert parse_executor("dask") == ("dask", None)
    assert parse_executor("dask=tcp://10.0.0.1:8786") == ("dask", "tcp://10.0.0.1:8786")
    for bad in ("dask=", "local=x", "threads", ""):
        with pytest.raises(ValueError, match="unknown executor"):
            parse_executor(bad)


def test_core_does_not_import_dask():
    code = (
        "import sys, gmem, gmem.sweep, gmem.cli\n"
        "assert not any(m == 'dask' or m.startswith(('dask.', 'distributed')) "
        "for m in sys.modules), sorted(m for m in sys.modules if 'dask' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- running ---------------------------------------------------------------------------------


def test_local_sweep_rows(local_result):
    df, out = local_result
    assert len(df) == 4
    assert df.attrs["run"] == 4
    assert df.attrs["skipped"] == 0
    assert df.attrs["failed"] == 0
    assert (df["error"] == "").all()
    assert list(df["index"]) == [0, 1, 2, 3]
    for col in ("strategy", "seed", "pages", "params.rounds", "policy", "gmem_version"):
        assert col in df
    for col in ("peak_pages_allocated", "modelled_ns", "conversions", "cell_wall_s", "wall_s"):
        assert (df[col] > 0).all(), col
    assert (df["pages"] == PAGES).all()
    # seeds give different runs
    assert df.loc[0, "modelled_ns"] != df.loc[1, "modelled_ns"]
    csv = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert list(csv["cell"]) == list(df["cell"])
    assert list(csv["modelled_ns"]) == list(df["modelled_ns"])
    if importlib_available("pyarrow"):
        pq = pd.read_parquet(out / "results.parquet")
        assert list(pq["modelled_ns"]) == list(df["modelled_ns"])
    assert len((out / "cells.jsonl").read_text().splitlines()) == 4


def test_cell_in_process_equals_pool(local_result, tmp_path):
    df, _ = local_result
    cells = expand_grid(load_grid(write_grid(tmp_path)))
    row = run_cell(cells[2])
    expect = df.iloc[2].to_dict()
    for key, value in row.items():
        if key not in TIMING_COLUMNS:
            assert expect[key] == value or (value is None and expect[key] != expect[key]), key


def test_resume_skips_done_cells(local_result, tmp_path):
    df, out = local_result
    again = sweep(write_grid(tmp_path), out=out, workers=2, progress=False)
    assert again.attrs["run"] == 0
    assert again.attrs["skipped"] == 4
    pd.testing.assert_frame_equal(metrics(again), metrics(df))
    # a grown grid runs only its new cells; the old rows keep their timings
    bigger = GRID.replace("seed = [0, 1]", "seed = [0, 1, 2]")
    grown = sweep(write_grid(tmp_path, bigger), out=out, workers=2, progress=False)
    assert grown.attrs["run"] == 2
    assert grown.attrs["skipped"] == 4
    assert list(grown["seed"]) == [0, 1, 2, 0, 1, 2]
    kept = grown[grown["seed"] < 2].reset_index(drop=True)
    assert list(kept["cell_wall_s"]) == list(df["cell_wall_s"])
    # with the journal gone, the aggregated CSV is enough to resume
    (out / "cells.jsonl").unlink()
    last = sweep(write_grid(tmp_path, bigger), out=out, workers=2, progress=False)
    assert last.attrs["run"] == 0


def test_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    grid = f"""
[grid]
strategy = "dual"
pages = {PAGES}
workload = ["dma-churn", "boot", "swiotlb"]
[grid.params]
rounds = 40      # a dma-churn parameter: boot and swiotlb cells raise
"""
    out = tmp_path / "out"
    df = sweep(write_grid(tmp_path, grid), out=out, workers=2, progress=False)
    assert df.attrs["failed"] == 2
    assert list(df["workload"]) == ["dma-churn", "boot", "swiotlb"]
    assert df.loc[0, "error"] == ""
    assert df.loc[0, "modelled_ns"] > 0
    assert df.loc[1, "error"].startswith("UsageError: workload 'boot' has no parameter 'rounds'")
    assert "swiotlb" in df.loc[2, "error"]
    assert df.loc[1:, "modelled_ns"].isna().all()
    csv = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert list(csv["error"] != "") == [False, True, True]
    # a re-run retries the failed cells only
    again = sweep(write_grid(tmp_path, grid), out=out, workers=2, progress=False)
    assert again.attrs["run"] == 2
    assert again.attrs["skipped"] == 1
    assert again.attrs["failed"] == 2


def test_cli_sweep_and_resume(tmp_path):
    write_grid(tmp_path, GRID.replace('["dual", "inplace"]', '"realloc"'))
    r = gmem_cli("sweep", "grid.toml", "-j", "2", "--out", "o", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 cells: 2 run, 0 already in o, 0 failed" in r.stdout
    assert (tmp_path / "o" / "results.csv").is_file()
    r = gmem_cli("sweep", "grid.toml", "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 cells: 0 run, 2 already in o, 0 failed" in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "o" / "cells.jsonl").read_text().splitlines()]
    assert {row["strategy"] for row in rows} == {"realloc"}
    # a failing cell: exit status 1, its error on stderr, the other rows written
    write_grid(tmp_path, GRID.replace("rounds = 40", "rounds = 40\nbogus = 1"), "bad.toml")
    r = gmem_cli("sweep", "bad.toml", "--out", "o2", "--no-progress", cwd=tmp_path)
    assert r.returncode == 1
    assert "4 cells: 4 run, 0 already in o2, 4 failed" in r.stdout
    assert "has no parameter 'bogus'" in r.stderr
    assert "Traceback" not in r.stderr


# --- Dask ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        processes=True,
        n_workers=2,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        # the scheduler's HTTP endpoint on a free port: 8787 may be taken on this machine
        scheduler_kwargs={"dashboard_address": ":0"},
    )
    try:
        yield cluster
    finally:
        cluster.close()


def test_dask_cluster_gives_the_same_metrics(local_result, dask_cluster, tmp_path):
    df, _ = local_result
    address = dask_cluster.scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    got = sweep(
        write_grid(tmp_path), executor=f"dask={address}", out=tmp_path / "o", progress=False
    )
    assert got.attrs["run"] == 4
    assert (got["error"] == "").all()
    pd.testing.assert_frame_equal(metrics(got), metrics(df))
    # and resume works the same way there
    again = sweep(
        write_grid(tmp_path), executor=f"dask={address}", out=tmp_path / "o", progress=False
    )
    assert again.attrs["run"] == 0


def test_dask_records_failing_cells(dask_cluster, tmp_path):
    address = dask_cluster.scheduler_address
    grid = GRID.replace("rounds = 40", "rounds = 40\nbogus = 1").replace(
        '["dual", "inplace"]', '"dual"'
    )
    got = sweep(write_grid(tmp_path, grid), executor=f"dask={address}", out=tmp_path / "o")
    assert got.attrs["failed"] == 2
    assert got["error"].str.contains("has no parameter 'bogus'").all()


def test_dask_local_cluster_of_its_own(local_result, tmp_path):
    pytest.importorskip("distributed")
    df, _ = local_result
    got = sweep(write_grid(tmp_path), executor="dask", workers=2, out=tmp_path / "o")
    pd.testing.assert_frame_equal(metrics(got), metrics(df))


def test_module_is_callable(local_result, tmp_path):
    import gmem.sweep

    _, out = local_result
    got = gmem.sweep(write_grid(tmp_path), out=out, progress=False)
    assert got.attrs["skipped"] == 4


def test_dask_executor_without_dask_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    with pytest.raises(ImportError, match=r"pip install 'gmem\[dask\]'"):
        sweep(write_grid(tmp_path), executor="dask", out=tmp_path / "o", progress=False)


def test_progress_bars_render_on_a_terminal(monkeypatch):
    """The sweep's cell bar and the runs' lazy event bar (one shared rich layout) draw on
    a terminal: description, done/total and, for cells, the failure count."""
    import io

    from gmem import reports
    from gmem import sweep as sweep_mod

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with sweep_mod._Progress(3, True) as cells:
        cells.advance(True)
        cells.advance(False)
        cells.advance(True)
    with reports.progress_bar(10, description="events", delay=0.0) as events:
        events.advance(4)
        events.advance(6)
    out = term.getvalue()
    for shown in ("cells", "1 failed", "3/3", "events"):
        assert shown in out, shown
