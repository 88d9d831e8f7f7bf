"""Fixtures of the gmem benchmarks; the helpers live in ``benchutil``."""

from __future__ import annotations

import gc

import pytest

from benchutil import SMALL, machine_probe

#: `machine_probe` at the start of a full-size run (stored in the JSON's machine_info).
_PROBE_AT_START: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _collect_between_benchmarks():
    """Free the previous benchmark's hosts before the next one allocates (the large
    guests hold hundreds of MiB) and keep the collector out of the timed code."""
    gc.collect()
    yield
    gc.collect()


def pytest_report_header(config):
    return f"gmem benchmarks: {'SMALL (GMEM_BENCH_SMALL=1)' if SMALL else 'full size'}"


def pytest_configure(config):
    # The benchmark modules are named bench_*.py so that a plain test run never picks
    # them up; collect them when pytest is pointed at benches/.
    if "bench_*.py" not in config.getini("python_files"):
        config.addinivalue_line("python_files", "bench_*.py")


def pytest_sessionstart(session):
    if not SMALL:
        _PROBE_AT_START.update(machine_probe())


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record how fast the machine was at the start and at the end of the run, so that a
    reader can tell a quiet run from a slow one (see BENCHMARKS.md)."""
    if not SMALL:
        machine_info["probe_start"] = dict(_PROBE_AT_START)
        machine_info["probe_end"] = machine_probe()
