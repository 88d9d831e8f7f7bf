"""The cost model: keys and defaults, TOML overrides, documentation of every default."""

from __future__ import annotations

from pathlib import Path

import pytest

import gmem
from gmem.costs import DEFAULT_COSTS, apply_costs, load_costs, validate_costs

DOC = Path(__file__).resolve().parents[2] / "docs" / "cost-model.md"


def test_defaults_match_the_core():
    assert gmem.Host(1 << 30).costs() == DEFAULT_COSTS


def test_every_default_is_documented_with_its_value():
    text = DOC.read_text()
    for key, value in DEFAULT_COSTS.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert f"{value:,}" in row, (key, row)
        assert any(w in row for w in ("measured", "derived", "estimate", "published")), key


def test_load_top_level_and_table(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text("zero_4k = 105\ntdx_accept = 8000\n")
    assert load_costs(a) == {"zero_4k": 105, "tdx_accept": 8000}
    b = tmp_path / "b.toml"
    b.write_text("[costs]\nsplit = 1\n")
    assert load_costs(b) == {"split": 1}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("zero_5k = 1\n", "unknown cost key 'zero_5k'"),
        ("zero_4k = -1\n", "non-negative integer"),
        ("zero_4k = 1.5\n", "non-negative integer"),
        ("zero_4k = true\n", "non-negative integer"),
        ("zero_4k = \n", "not valid TOML"),
        ("[costs]\nsplit = 1\n[other]\nx = 1\n", r"only a \[costs\] table"),
    ],
)
def test_bad_files_name_the_problem_and_the_file(tmp_path, text, match):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_costs(path)
    assert str(path) in str(info.value)


def test_validate_mapping():
    assert validate_costs({"merge": 0}) == {"merge": 0}
    with pytest.raises(ValueError, match="'bogus'"):
        validate_costs({"bogus": 1})


def test_apply_to_host(tmp_path):
    host = gmem.Host(1 << 30)
    path = tmp_path / "c.toml"
    path.write_text("[costs]\nzero_4k = 1\n")
    costs = apply_costs(host, path)
    assert costs["zero_4k"] == 1
    assert host.costs()["zero_4k"] == 1
    assert apply_costs(host, {"split": 7})["split"] == 7
    assert apply_costs(host, None) == host.costs()
    with pytest.raises(ValueError, match="unknown cost key 'nope'"):
        apply_costs(host, {"nope": 1})


def test_costs_drive_modelled_time():
    """Doubling every cost doubles modelled_ns for the same events."""
    from gmem import guest as gmem_guest
    from gmem.workloads import make_events

    ev = make_events("dma-churn", 1 << 14, seed=1, rounds=20, pin=0.0)
    totals = []
    for scale in (1, 2):
        host = gmem_guest.make_host(1 << 14)
        apply_costs(host, {k: v * scale for k, v in DEFAULT_COSTS.items()})
        guest = gmem_guest.build_vm(host, 1 << 14, "sw_protected", "dual")
        guest.vm.apply(ev)
        totals.append(guest.vm.stats()["modelled_ns"])
    assert totals[0] > 0
    assert totals[1] == 2 * totals[0]
