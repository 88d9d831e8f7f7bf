"""The `prefault` policy knob (QEMU's KVM_PRE_FAULT_MEMORY after an SNP page state change)
and the `hwpoison_rate` workload parameter (memory failures injected into a run)."""

from __future__ import annotations

import numpy as np
import pytest

from gmem import Op
from gmem import guest as gmem_guest
from gmem.config import ConfigError, RunConfig
from gmem.experiment import run_experiment
from gmem.policies import PrefaultOnConvert, make_policy, run
from gmem.reports import comparison_frame
from gmem.workloads import inject_memory_failures, make_workload

CHUNK = 1024  # MAX_PAGE_ORDER: the 4 MiB the page allocator accepts at once
PAGES = 8 * CHUNK


def boot_run(vm_type: str, prefault: bool, strategy: str = "dual"):
    host = gmem_guest.make_host(PAGES)
    guest = gmem_guest.build_vm(host, PAGES, vm_type, strategy)
    stream = make_workload("boot", PAGES, unit=CHUNK, psc=True, read_fraction=0.0)
    result = run(guest, stream, make_policy(prefault=prefault), sample_every=1 << 20)
    host.check()
    return result.summary


@pytest.mark.parametrize("strategy", ["dual", "inplace"])
def test_prefault_saves_1024_stage2_exits_per_4m_chunk_on_snp(strategy):
    off = boot_run("snp", False, strategy)
    on = boot_run("snp", True, strategy)
    chunks = PAGES // CHUNK
    # Without: every page of every accepted chunk is a guest stage-2 fault (an exit).
    assert off["stage2_faults"] == PAGES
    assert off["prefaulted_pages"] == 0
    # With: KVM_PRE_FAULT_MEMORY maps the chunk after its page state change; the guest's
    # PVALIDATE touches take no exit. The same pages get mapped, ahead of the guest.
    assert off["stage2_faults"] - on["stage2_faults"] == chunks * 1024
    assert on["prefaulted_pages"] == chunks * 1024
    assert on["stage2_faults"] + on["prefaulted_pages"] == off["stage2_faults"]
    assert on["prefault_calls"] == chunks
    costs = gmem_guest.make_host(1).costs()
    saved = chunks * 1024 * (costs["stage2_map"] - costs["prefault_map"])
    assert off["modelled_ns"] - on["modelled_ns"] == saved
    assert on["failed_events"] == off["failed_events"] == 0


def test_prefault_leaves_other_vm_types_alone():
    off, on = boot_run("tdx", False), boot_run("tdx", True)
    assert on["stage2_faults"] == off["stage2_faults"] == PAGES
    assert on["prefaulted_pages"] == 0
    assert "prefault_calls" not in on


def test_prefault_skips_the_whole_guest_setup_conversion():
    p = PrefaultOnConvert()

    class Vm:
        vm_type = "snp"
        pages = 64

    p.configure(Vm())
    ev = np.zeros(3, dtype=[("op", "u1"), ("gfn", "u8"), ("npages", "u8"), ("value", "u8")])
    ev["op"] = [Op.CONVERT_PRIVATE, Op.CONVERT_PRIVATE, Op.CONVERT_SHARED]
    ev["gfn"], ev["npages"] = [0, 8, 8], [64, 4, 4]
    out = p.transform(ev)
    expected = [Op.CONVERT_PRIVATE, Op.CONVERT_PRIVATE, Op.PRE_FAULT, Op.CONVERT_SHARED]
    assert out["op"].tolist() == expected
    assert (out["gfn"][2], out["npages"][2]) == (8, 4)
    assert p.counters() == {"prefault_calls": 1}


def test_prefault_is_a_checked_knob():
    assert RunConfig().prefault is False
    assert RunConfig(prefault=True).policy_knobs()["prefault"] is True
    with pytest.raises(ConfigError, match="prefault: expected true or false"):
        RunConfig(prefault="yes")
    assert "prefault" in make_policy(prefault=True).describe()


def test_compare_shows_stage2_exits_when_prefaulting():
    params = {"unit": CHUNK, "psc": True}
    config = RunConfig(workload="boot", params=params, pages=PAGES, vm_type="snp", prefault=True)
    frame = comparison_frame(run_experiment(config, ["dual", "inplace"], jobs=1))
    assert (frame["stage-2 exits"] == 0).all()
    assert (frame["pre-faulted"] == PAGES).all()
    plain = comparison_frame(run_experiment(RunConfig(pages=1024), ["dual"], jobs=1))
    assert "stage-2 exits" not in plain.columns
    assert "hwpoisoned" not in plain.columns


# --- memory failures -------------------------------------------------------------------


def test_injected_failures_are_deterministic_and_at_the_rate():
    stream = make_workload("dma-churn", 1 << 14, rounds=200, hwpoison_rate=0.01)
    a, b = stream.to_array(), stream.to_array()
    assert np.array_equal(a, b)
    plain = make_workload("dma-churn", 1 << 14, rounds=200).to_array()
    fail = a["op"] == Op.MEMORY_FAILURE
    assert np.array_equal(a[~fail], plain)
    assert 0.5 * 0.01 * len(plain) < fail.sum() < 1.5 * 0.01 * len(plain)
    assert (a["gfn"][fail] < 1 << 14).all()
    assert (a["npages"][fail] == 1).all()
    # Another seed, other failures.
    other = make_workload("dma-churn", 1 << 14, rounds=200, hwpoison_rate=0.01, seed=1)
    assert not np.array_equal(other.to_array()["op"], a["op"])


def test_rate_zero_is_the_plain_stream_and_bad_rates_are_refused():
    stream = make_workload("boot", 4096)
    assert inject_memory_failures(stream, 0.0) is stream
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="hwpoison_rate must be in"):
            make_workload("boot", 4096, hwpoison_rate=bad)
    assert RunConfig(params={"hwpoison_rate": 0.5}).params["hwpoison_rate"] == 0.5
    with pytest.raises(ConfigError, match=r"params\.hwpoison_rate"):
        RunConfig(params={"hwpoison_rate": "often"})


def test_failures_cost_each_design_what_it_keeps():
    """dma-churn under injected failures: every design meets the same failures; the
    in-place one keeps a page behind every touched gfn, so more failures hit and each
    hit loses the gfn's content; dual's discarded pages are no target."""
    config = RunConfig(
        workload="dma-churn",
        pages=1 << 14,
        params={"rounds": 300, "hwpoison_rate": 0.002, "pin": 0.0},
        vm_type="snp",
    )
    runs = run_experiment(config, ["dual", "inplace"], jobs=1)
    results = {r.summary["strategy"]: r.summary for r in runs}
    dual, inplace = results["dual"], results["inplace"]
    for s in (dual, inplace):
        assert s["hwpoisoned_pages"] > 0
        assert s["hwpoison_lost_pages"] <= s["hwpoisoned_pages"]
    assert inplace["hwpoison_lost_pages"] >= dual["hwpoison_lost_pages"]
    frame = comparison_frame(list(results.values()))
    assert {"hwpoisoned", "content lost", "EHWPOISON"} <= set(frame.columns)
