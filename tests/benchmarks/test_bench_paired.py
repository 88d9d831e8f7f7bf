"""`benches/benchutil.py`'s `Paired`: a baseline timed in the rounds of a benchmark, and
the per-round ratios it records."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def benchutil():
    spec = importlib.util.spec_from_file_location(
        "gmem_benchutil", ROOT / "benches" / "benchutil.py"
    )
    assert spec
    assert spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gmem_benchutil", mod)
    spec.loader.exec_module(mod)
    return mod


def _bench(data):
    stats = SimpleNamespace(stats=SimpleNamespace(data=data)) if data is not None else None
    return SimpleNamespace(stats=stats, extra_info={})


def test_order_of_calls(benchutil):
    """Untimed baseline, timed baseline, then the benchmark's own setup, every round."""
    calls = []
    p = benchutil.Paired(lambda: calls.append("base"), setup=lambda: calls.append("setup"))
    p()
    p()
    assert calls == ["base", "base", "setup"] * 2
    assert len(p.samples) == 2


def test_record_pairs_rounds_and_skips_warmup(benchutil):
    p = benchutil.Paired(lambda: None)
    # Two warm-up samples, then three rounds whose baseline drifts 1 -> 4 -> 2 s.
    p.samples = [100.0, 100.0, 1.0, 4.0, 2.0]
    b = _bench([3.0, 8.0, 10.0])
    p.record(b, "numpy")
    # Per-round ratios 3, 2, 5: median 3. (The ratio of the medians, 8 / 2, would be 4.)
    assert b.extra_info["paired_ratio"] == 3.0
    assert b.extra_info["paired_numpy_s"] == 2.0


def test_record_nothing_when_disabled(benchutil):
    p = benchutil.Paired(lambda: None)
    p()
    for b in (_bench(None), _bench([])):
        p.record(b, "numpy")
        assert b.extra_info == {}


def test_record_refuses_missing_samples(benchutil):
    p = benchutil.Paired(lambda: None)
    p.samples = [1.0]
    with pytest.raises(AssertionError, match="one baseline sample per timed round"):
        p.record(_bench([1.0, 2.0]), "numpy")
