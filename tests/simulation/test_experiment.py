"""`RunConfig` and `run_experiment`: one home for every knob's default and allowed values,
clear errors for bad values (from Python, the command line and grid files), and one
path from knobs to results."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re
import subprocess
import sys

import pandas as pd
import pytest

from gmem import policies
from gmem.cli import build_parser
from gmem.config import DEFAULT_PAGES, ConfigError, RunConfig, UsageError
from gmem.experiment import make_stream, run_experiment
from gmem.guest import build_vm, make_host
from gmem.sweep import AXES, cell_config, cell_key, expand_grid, load_grid, run_cell

PAGES = 1 << 12
TIMING = ("wall_s", "events_per_s")


def gmem_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args], cwd=cwd, capture_output=True, text=True
    )


def test_defaults_have_one_home():
    config = RunConfig()
    parser = build_parser()
    compare = parser._subparsers._group_actions[0].choices["compare"]
    cli = vars(compare.parse_args([]))
    for f in dataclasses.fields(RunConfig):
        if f.name == "params":
            continue
        if f.name in cli:
            assert cli[f.name] == getattr(config, f.name), f.name
        if f.name in AXES:
            assert AXES[f.name] == getattr(config, f.name), f.name
    signature = inspect.signature(policies.make_policy).parameters
    for name, value in config.policy_knobs().items():
        assert signature[name].default == value, name
    assert config.guest_pages == DEFAULT_PAGES
    assert RunConfig(workload="trace:x.jsonl").guest_pages is None


def test_config_is_frozen_and_holds_a_copy_of_its_params():
    params = {"rounds": 5}
    config = RunConfig(params=params)
    params["rounds"] = 6
    assert config.params == {"rounds": 5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.params["rounds"] = 7  # type: ignore[index]
    assert dataclasses.replace(config, seed=3).params == {"rounds": 5}
    costly = RunConfig(params={"rounds": 5}, costs={"zero_4k": 1})
    assert pickle.loads(pickle.dumps(costly)) == costly


@pytest.mark.parametrize(
    ("knobs", "knob", "words"),
    [
        ({"pages": 0}, "pages", ["0", ">= 1"]),
        ({"pages": "big"}, "pages", ["'big'", "integer"]),
        ({"seed": -1}, "seed", ["-1", ">= 0"]),
        ({"chunk": 2.5}, "chunk", ["2.5", "integer"]),
        ({"vm_type": "sev"}, "vm_type", ["'sev'", "sw_protected, pkvm, tdx, snp"]),
        ({"huge_order": 3}, "huge_order", ["3", "0, 9, 18"]),
        ({"huge_order": True}, "huge_order", ["True", "0, 9, 18"]),
        ({"discard": "sometimes"}, "discard", ["'sometimes'", "eager, deferred, never"]),
        ({"discard_every": 0}, "discard_every", ["0", ">= 1"]),
        ({"fault": "ignore"}, "fault", ["'ignore'", "convert, exit"]),
        ({"retry": "abc"}, "retry", ["'abc'", "integer"]),
        ({"merge_schedule": "deferred"}, "merge_schedule", ["'deferred'", "eager, periodic"]),
        ({"merge_every": -5}, "merge_every", ["-5", ">= 1"]),
        ({"coalesce": "yes"}, "coalesce", ["'yes'", "true or false"]),
        ({"sample_every": 0}, "sample_every", ["0", ">= 1"]),
        ({"params": {"rounds": "abc"}}, "params.rounds", ["'abc'", "an integer or None"]),
        ({"params": {"reuse": "most"}}, "params.reuse", ["'most'", "a number"]),
        (
            {"workload": "hugepage-frag", "params": {"granule": 2}},
            "params.granule",
            ["2", "a string"],
        ),
        ({"costs": {"zero_4k": -1}}, "costs", ["zero_4k", "-1", "non-negative"]),
        ({"costs": 5}, "costs", ["int", "mapping or a TOML path"]),
    ],
)
def test_bad_knob_names_the_knob_the_value_and_what_is_allowed(knobs, knob, words):
    with pytest.raises(ValueError, match=re.escape(knob)) as info:
        RunConfig(**knobs)
    message = str(info.value)
    if isinstance(info.value, ConfigError):
        assert info.value.knob == knob
        assert message.startswith(f"{knob}: ")
    else:  # the cost model's own check, which names the key
        assert knob == "costs"
    for word in words:
        assert word in message, (word, message)


def test_unknown_parameter_lists_the_workload_parameters():
    with pytest.raises(UsageError) as info:
        RunConfig(params={"frobnicate": 1})
    assert not isinstance(info.value, ConfigError)
    assert str(info.value) == (
        "workload 'dma-churn' has no parameter 'frobnicate' (parameters: channels, pin, "
        "reuse, rounds, touch_private, window)"
    )


def test_unknown_workload_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown workload 'nope' \(known: boot, "):
        RunConfig(workload="nope")


def test_numpy_integers_and_bool_flags_are_accepted():
    np = pytest.importorskip("numpy")
    config = RunConfig(pages=np.int64(64), seed=np.uint8(1), params={"rounds": np.int32(2)})
    assert config.pages == 64
    assert RunConfig(workload="hugepage-frag", params={"recover": 0}).params == {"recover": 0}


def test_run_experiment_is_the_manual_path():
    config = RunConfig(pages=PAGES, seed=2, params={"rounds": 30}, discard="deferred")
    (result,) = run_experiment(config, ["dual"])
    stream = make_stream(config)
    host = make_host(PAGES)
    manual = policies.run(
        build_vm(host, PAGES, "sw_protected", "dual"),
        stream,
        policies.make_policy(discard="deferred"),
        sample_every=max(1, stream.total_events // 400),
        meta={"workload": "dma-churn", "seed": 2, "pages": PAGES, "huge_order": 0},
    )
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMING}  # noqa: E731
    assert strip(result.summary) == strip(manual.summary)
    assert result.summary["strategy"] == "dual"
    assert list(result.summary)[:4] == ["strategy", "vm_type", "workload", "seed"]


def test_run_experiment_refuses_unknown_strategies():
    with pytest.raises(ConfigError, match=r"strategies: unknown strategy 'duel' \(known: dual"):
        run_experiment(RunConfig(pages=PAGES), ["duel"])
    with pytest.raises(ConfigError, match="strategies"):
        run_experiment(RunConfig(pages=PAGES), [])


def test_strategies_in_parallel_give_the_sequential_results():
    """Every field but the wall-clock ones is the same with the strategies run side by
    side as one after another, and the results keep the strategies' order."""
    config = RunConfig(pages=PAGES, seed=3, params={"rounds": 40}, discard="deferred")
    order = ["two_offsets", "dual", "attr_hook", "inplace", "realloc", "dual"]
    alone = run_experiment(config, order, jobs=1)
    side_by_side = run_experiment(config, order, jobs=3)
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMING}  # noqa: E731
    assert [r.summary["strategy"] for r in side_by_side] == order
    for a, b in zip(alone, side_by_side, strict=True):
        assert strip(a.summary) == strip(b.summary)
        assert a.status_counts == b.status_counts
        pd.testing.assert_frame_equal(
            a.series.drop(columns="elapsed_s"), b.series.drop(columns="elapsed_s")
        )
    assert alone[1].summary["applied_events"] > 0


@pytest.mark.parametrize("jobs", [0, -2, 1.5, True, "2"])
def test_bad_jobs_names_the_knob(jobs):
    with pytest.raises(ConfigError, match=r"^jobs: ") as err:
        run_experiment(RunConfig(pages=PAGES), ["dual", "inplace"], jobs=jobs)
    assert err.value.knob == "jobs"
    assert repr(jobs) in str(err.value)


def test_a_failing_strategy_fails_the_parallel_experiment(monkeypatch):
    """The error is the one a sequential run meets first; the other strategies stop."""
    import gmem.experiment as experiment

    def build_vm_failing(host, pages, vm_type, strategy, huge_order=0):
        if strategy in ("inplace", "attr_hook"):
            raise OSError(f"no room for {strategy}")
        return build_vm(host, pages, vm_type, strategy, huge_order)

    monkeypatch.setattr(experiment, "build_vm", build_vm_failing)
    config = RunConfig(pages=PAGES, params={"rounds": 20})
    with pytest.raises(OSError, match="no room for inplace"):
        run_experiment(config, ["dual", "inplace", "realloc", "attr_hook"], jobs=2)


def test_make_policy_former_merge_keyword_and_class_name():
    periodic = policies.make_policy(merge_schedule="periodic", merge_every=10)
    assert policies.make_policy(merge="periodic", merge_every=10).describe() == (
        periodic.describe()
    )
    assert policies.MergePolicy is policies.MergeSchedule
    with pytest.raises(ConfigError, match=r"merge_schedule: unknown value 'deferred'"):
        policies.make_policy(merge_schedule="deferred")
    with pytest.raises(ConfigError, match=r"retry: must be >= 0, got -1"):
        policies.make_policy(retry=-1)


def test_cell_config_and_the_former_merge_axis():
    (cell,) = expand_grid(
        load_grid(
            {"strategy": "dual", "pages": PAGES, "merge": "periodic", "params": {"rounds": 3}}
        )
    )
    assert cell["merge_schedule"] == "periodic"
    assert "merge" not in cell
    config = cell_config(cell)
    assert config.merge_schedule == "periodic"
    assert config.params == {"rounds": 3}
    # keys stay those of directories swept when the axis was called `merge`
    params = {k: v for k, v in cell.items() if k not in ("cell", "index")}
    old = {("merge" if k == "merge_schedule" else k): v for k, v in params.items()}
    assert cell_key(params) == cell_key(old) == cell["cell"]
    with pytest.raises(ValueError, match="merge_schedule given twice"):
        load_grid({"merge": "eager", "merge_schedule": "eager"})


def test_a_bad_parameter_type_fails_its_cell_with_a_clear_error():
    grid = {"strategy": "dual", "pages": PAGES, "params": {"rounds": "x"}}
    (cell,) = expand_grid(load_grid(grid))
    row = run_cell(cell)
    assert row["error"].startswith("ConfigError: params.rounds: expected an integer or None")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-p", "rounds=abc"], ["params.rounds", "'abc'", "an integer or None", "dma-churn"]),
        (["-p", "reuse=lots"], ["params.reuse", "'lots'", "a number"]),
        (["-w", "hugepage-frag", "-p", "granule=2"], ["params.granule", "2", "a string"]),
    ],
)
def test_cli_bad_parameter_type_is_a_usage_error(tmp_path, args, words):
    r = gmem_cli("compare", "--pages", str(PAGES), *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("gmem compare: error: ")
    assert len(r.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in r.stderr
    assert "can't multiply" not in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_merge_flag_keeps_its_former_name():
    parser = build_parser()
    old = parser.parse_args(["compare", "--merge", "periodic"])
    new = parser.parse_args(["compare", "--merge-schedule", "periodic"])
    assert old.merge_schedule == new.merge_schedule == "periodic"


def test_one_progress_bar_per_strategy_advanced_from_threads(monkeypatch):
    """The bars of strategies run side by side draw on a terminal, each with its own
    count, however their threads interleave."""
    import io
    import threading

    from gmem import reports

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    names = ["dual", "inplace", "realloc"]
    with reports.progress_bars(300, names, delay=0.0) as bars:
        threads = [
            threading.Thread(target=lambda i=i: [bars.advance(1, i) for _ in range(100 * i)])
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert bars.done == [0, 100, 200]
    out = term.getvalue()
    for shown in (*names, "100/300", "200/300"):
        assert shown in out, shown
