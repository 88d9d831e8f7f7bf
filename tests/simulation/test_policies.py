"""Policies: the vectorised transforms against brute force, and their effects on runs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gmem import Op, policies
from gmem import guest as gmem_guest
from gmem.constants import STRATEGIES
from gmem.policies import (
    CoalesceConversions,
    Compose,
    DiscardDeferred,
    DiscardEager,
    Policy,
    RetryEagain,
    final_discards,
    make_policy,
    run,
)
from gmem.workloads import events, make_events, make_workload, swiotlb_pages

EAGAIN = -11


class Named:
    """A stand-in VM for the pure transforms: only what policies read."""

    def __init__(self, strategy, huge_order=0):
        self.strategy = strategy
        self.huge_order = huge_order

    def set_options(self, **kw):
        pass


def paint(ev):
    """Brute force: final attribute per page after the conversions (0 private, 1 shared)."""
    state = {}
    for o, g, n in zip(ev["op"].tolist(), ev["gfn"].tolist(), ev["npages"].tolist(), strict=True):
        if o in (Op.CONVERT_PRIVATE, Op.CONVERT_SHARED):
            for x in range(g, g + n):
                state[x] = o
    return state


ranges = st.lists(
    st.tuples(st.sampled_from([0, 1]), st.integers(0, 200), st.integers(1, 40)),
    min_size=1,
    max_size=60,
)


@given(ranges)
def test_final_discards_match_brute_force(spec):
    ops, gfn, n = zip(*spec, strict=True)
    ev = events(ops, gfn, n)
    out = final_discards(ev)
    got = {}
    for o, g, k in zip(
        out["op"].tolist(), out["gfn"].tolist(), out["npages"].tolist(), strict=True
    ):
        for x in range(g, g + k):
            assert x not in got
            got[x] = Op.CONVERT_PRIVATE if o == Op.DISCARD_SHARED else Op.CONVERT_SHARED
    assert got == paint(ev)
    # maximal runs: no two adjacent outputs of one kind
    touching = out["gfn"][1:] == out["gfn"][:-1] + out["npages"][:-1]
    assert not (touching & (out["op"][1:] == out["op"][:-1])).any()


@given(
    st.lists(
        st.tuples(st.sampled_from([0, 1, 4, 10]), st.integers(0, 200), st.integers(1, 40)),
        min_size=1,
        max_size=60,
    )
)
def test_coalesce_keeps_meaning(spec):
    ops, gfn, n = zip(*spec, strict=True)
    ev = events(ops, gfn, n)
    out = CoalesceConversions().transform(ev)
    assert paint(out) == paint(ev)
    other = ~np.isin(ev["op"], [0, 1])
    assert np.array_equal(out[~np.isin(out["op"], [0, 1])], ev[other])  # order kept
    assert len(out) <= len(ev)


def test_coalesce_merges_adjacent_runs():
    ev = events([1, 1, 1, 4, 1, 1], [10, 0, 5, 0, 100, 102], [5, 5, 5, 1, 2, 2])
    c = CoalesceConversions()
    out = c.transform(ev)
    assert [tuple(x) for x in out[["op", "gfn", "npages"]].tolist()] == [
        (1, 0, 15),
        (4, 0, 1),
        (1, 100, 4),
    ]
    assert c.counters() == {"coalesced_events": 3}


def test_eager_discard_inserts_after_each_conversion():
    ev = events([0, 4, 1], [0, 3, 10], [5, 1, 5])
    p = DiscardEager()
    p.configure(Named("dual"))
    out = p.transform(ev)
    assert out[["op", "gfn", "npages"]].tolist() == [
        (Op.CONVERT_PRIVATE, 0, 5),
        (Op.DISCARD_SHARED, 0, 5),
        (Op.GUEST_WRITE_PRIVATE, 3, 1),
        (Op.CONVERT_SHARED, 10, 5),
        (Op.PUNCH_HOLE, 10, 5),
    ]
    for strategy in ("inplace", "realloc", "attr_hook"):  # one backing: nothing to discard
        p.configure(Named(strategy))
        assert np.array_equal(p.transform(ev), ev)


def test_discards_cover_whole_huge_pages_on_hugetlb():
    ev = events([1, 1, 0], [0, 1000, 0], [1, 1100, 2048])
    p = DiscardEager()
    p.configure(Named("two_offsets", huge_order=9))
    punches = p.transform(ev)
    punches = punches[np.isin(punches["op"], [Op.PUNCH_HOLE, Op.DISCARD_SHARED])]
    # [0,1) covers no huge page; [1000,2100) covers [1024,2048); [0,2048) stays whole
    assert punches[["op", "gfn", "npages"]].tolist() == [
        (Op.PUNCH_HOLE, 1024, 1024),
        (Op.DISCARD_SHARED, 0, 2048),
    ]
    p.configure(Named("dual", huge_order=9))  # dual's shared side is 4 KiB anon memory
    out = p.transform(ev)
    assert (Op.DISCARD_SHARED, 0, 2048) in out[["op", "gfn", "npages"]].tolist()


def test_deferred_discard_uses_last_conversion_and_only_successes():
    p = DiscardDeferred()
    p.configure(Named("dual"))
    ev = events([1, 0, 1], [0, 0, 100], [4, 2, 1])
    out = p.after_batch(None, ev, np.array([0, 0, EAGAIN], np.int32), 0)
    assert out[["op", "gfn", "npages"]].tolist() == [
        (Op.DISCARD_SHARED, 0, 2),
        (Op.PUNCH_HOLE, 2, 2),
    ]
    q = DiscardDeferred(every=5)
    q.configure(Named("dual"))
    assert q.after_batch(None, ev, np.zeros(3, np.int32), 0) is None  # 3 < 5 pending
    assert len(q.finish(None)) == 3  # all three succeeded here
    assert q.counters() == {"discard_passes": 1}


def test_retry_eagain_skips_pages_changed_later():
    ev = events([0, 4, 1, 0, 1], [0, 0, 2, 10, 20], [4, 1, 4, 2, 1])
    st_ = np.array([EAGAIN, 0, 0, EAGAIN, EAGAIN], np.int32)
    r = RetryEagain(max_rounds=1)
    out = r.after_batch(None, ev, st_, 0)
    # [0,4) private was refused, then [2,6) went shared: only [0,2) is retried
    assert out[["op", "gfn", "npages"]].tolist() == [(0, 0, 2), (0, 10, 2), (1, 20, 1)]
    assert r.after_batch(None, out, np.full(3, EAGAIN, np.int32), 1) is None
    assert r.counters() == {"eagain_retried": 3, "eagain_superseded": 0, "eagain_dropped": 3}


retry_batches = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2, 4]),  # conversions, a read and a write among them
        st.integers(0, 300),
        st.integers(1, 30),
        st.sampled_from([0, 0, EAGAIN, -14]),
    ),
    min_size=1,
    max_size=80,
)


@given(retry_batches)
def test_retry_eagain_matches_brute_force(spec):
    """What a retry round asks for, page by page: every page whose last conversion in the
    batch (of those that succeeded or were refused) was refused, with that conversion's
    op; and the counters: refused conversions retried (some page still theirs) or
    superseded."""
    ops, gfn, n, status = zip(*spec, strict=True)
    ev = events(ops, gfn, n)
    st_ = np.array(status, np.int32)
    last: dict[int, int] = {}
    for i, (o, g, k, s_) in enumerate(spec):
        if o in (0, 1) and s_ in (0, EAGAIN):
            for x in range(g, g + k):
                last[x] = i
    want = {x: spec[i][0] for x, i in last.items() if spec[i][3] == EAGAIN}
    r = RetryEagain(max_rounds=2)
    out = r.after_batch(None, ev, st_, 0)
    got: dict[int, int] = {}
    if out is not None:
        for o, g, k in out[["op", "gfn", "npages"]].tolist():
            for x in range(g, g + k):
                assert x not in got, "runs overlap"
                got[x] = o
        # Runs are maximal: two adjacent runs differ in op.
        for a, b in zip(out[:-1].tolist(), out[1:].tolist(), strict=True):
            assert a[1] + a[2] < b[1] or a[0] != b[0]
    assert got == want
    refused = sum(1 for o, *_, s_ in spec if s_ == EAGAIN)
    kept = len({i for i in last.values() if spec[i][3] == EAGAIN})
    if refused:
        assert r.counters()["eagain_retried"] == kept
        assert r.counters()["eagain_superseded"] == refused - kept


def test_compose_and_validation():
    p = DiscardEager() + CoalesceConversions() + Policy()
    assert isinstance(p, Compose)
    assert len(p.policies) == 3
    with pytest.raises(ValueError, match="discard"):
        make_policy(discard="sometimes")
    with pytest.raises(ValueError, match="fault"):
        make_policy(fault="ignore")
    with pytest.raises(ValueError, match="merge"):
        make_policy(merge="never")


# --- effects on real runs (need the core) ------------------------------------------------

PAGES = 1 << 15


def churn(**kw):
    kw.setdefault("rounds", 300)
    return make_workload("dma-churn", PAGES, seed=7, **kw)


def guest(strategy="dual", huge_order=0, pages=PAGES):
    host = gmem_guest.make_host(pages, huge_order=huge_order)
    return gmem_guest.build_vm(host, pages, "sw_protected", strategy, huge_order)


def test_eager_discard_never_backs_twice():
    r = run(guest(), churn(pin=0.0), make_policy(discard="eager"), sample_every=500)
    assert r.series["double_backed_pages"].max() == 0
    assert r.summary["failed_events"] == 0


def test_never_discard_grows_double_backing():
    r = run(guest(), churn(pin=0.0), make_policy(discard="never"), sample_every=500)
    d = r.series["double_backed_pages"].to_numpy()
    assert d[-1] > 0
    assert d[len(d) // 2] < d[-1]  # still growing in the second half
    assert r.summary["peak_double_backed_pages"] == d.max()


def test_deferred_discard_catches_up():
    never = run(guest(), churn(pin=0.0), make_policy(discard="never"))
    deferred = run(guest(), churn(pin=0.0), make_policy(discard="deferred"))
    assert deferred.summary["double_backed_pages"] == 0
    assert deferred.summary["discard_passes"] > 0
    assert deferred.summary["peak_pages_allocated"] <= never.summary["peak_pages_allocated"]


def test_pins_refuse_inplace_and_break_attr_hook():
    inplace = run(guest("inplace"), churn(pin=0.2))
    assert inplace.summary["eagain"] > 0
    assert inplace.summary["eagain_retried"] + inplace.summary["eagain_superseded"] > 0
    assert inplace.summary["violations"] == 0
    hook = run(guest("attr_hook"), churn(pin=0.2))
    assert hook.summary["violations"] > 0
    assert hook.summary["eagain"] == 0


def test_fault_policy_exit_versus_convert():
    ev = make_events("random", PAGES, seed=3, ops=3000)
    exit_ = run(guest(), ev, make_policy(fault="exit"))
    conv = run(guest(), ev, make_policy(fault="convert"))
    assert exit_.summary["memory_faults"] > 0
    assert exit_.summary["status_efault"] > conv.summary["status_efault"]


def test_coalescing_saves_conversions():
    ev = events([0] + [1] * 64, [0, *range(0, 64 * 8, 8)], [PAGES] + [8] * 64)
    plain = run(guest(), ev, make_policy())
    merged = run(guest(), ev, make_policy(coalesce=True))
    assert merged.summary["coalesced_events"] == 63
    assert merged.summary["conversions"] < plain.summary["conversions"]
    assert merged.summary["converted_pages"] == plain.summary["converted_pages"]


def test_merge_eager_versus_periodic_on_hugetlb():
    pages = 1 << 14
    wl = make_workload("hugepage-frag", pages, seed=1, per_granule=4, chunk=64)
    eager = run(guest("inplace", 9, pages), wl, make_policy(merge="eager"))
    periodic = run(guest("inplace", 9, pages), wl, make_policy(merge="periodic", merge_every=100))
    assert eager.summary["splits"] > 0
    assert eager.summary["merges"] > 0
    assert periodic.summary["merge_passes"] >= 2
    assert periodic.summary["merges"] == periodic.summary["merge_pass_merged"] > 0


def test_series_and_summary_shape(tmp_path):
    r = run(guest(), churn(rounds=100), sample_every=1000, meta={"workload": "dma-churn"})
    s = r.series
    assert list(s.columns[:3]) == ["applied_events", "workload_events", "elapsed_s"]
    for col in ("pages_allocated", "double_backed_pages", "modelled_ns", "events"):
        assert col in s.columns
    assert s["applied_events"].iloc[0] == 0
    assert (np.diff(s["applied_events"]) > 0).all()
    assert (np.diff(s["applied_events"])[:-1] == 1000).all()
    assert (np.diff(s["workload_events"]) >= 0).all()
    assert s["applied_events"].iloc[-1] == r.summary["applied_events"]
    assert s["workload_events"].iloc[-1] == r.summary["workload_events"]
    assert s["events"].iloc[-1] == r.summary["applied_events"]  # the core counted them all
    assert r.summary["workload"] == "dma-churn"
    assert r.summary["strategy"] == "dual"
    written = r.write(tmp_path)
    names = {p.name for p in written}
    assert {"summary.csv", "series.csv", "run.json"} <= names
    pytest.importorskip("pyarrow")
    assert "series.parquet" in names


def test_runs_are_deterministic():
    a = run(guest("inplace"), churn(pin=0.1)).summary
    b = run(guest("inplace"), churn(pin=0.1)).summary
    drop = {"wall_s", "events_per_s"}
    assert {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_boots_cleanly(strategy):
    r = run(guest(strategy), make_workload("boot", PAGES))
    assert r.summary["failed_events"] == 0
    assert r.summary["double_backed_pages"] == 0
    pool = swiotlb_pages(PAGES)
    if strategy in ("inplace", "attr_hook"):  # the shared view is the accepted page itself
        assert r.summary["pages_allocated"] == PAGES
    else:  # the pool's private pages were punched when it went shared
        assert r.summary["pages_allocated"] == PAGES - pool


def test_custom_policy_subclass():
    class DropShared(Policy):
        name = "drop-shared"

        def transform(self, events):
            return events[events["op"] != Op.CONVERT_SHARED]

    r = run(guest(), churn(rounds=50), DropShared() + policies.FaultHandling("exit"))
    assert r.summary["policy"] == "drop-shared, fault=exit"
    assert r.summary["status_efault"] > 0  # the guest's shared writes now fault


def test_eager_discard_follows_implicit_conversions():
    """With fault_policy="convert", an access that converts implicitly is followed by the
    same discard an explicit conversion gets (QEMU's kvm_convert_memory), so dual never
    ends up backed twice."""
    import gmem
    from gmem import guest as gmem_guest
    from gmem import policies

    host = gmem_guest.make_host(64)
    guest = gmem_guest.build_vm(host, 64, "sw_protected", "dual")
    ev = np.zeros(4, gmem.EVENT_DTYPE)
    ev[0] = (gmem.Op.GUEST_WRITE_SHARED, 5, 1, 1)  # shared page allocated
    ev[1] = (gmem.Op.GUEST_WRITE_PRIVATE, 5, 1, 2)  # implicit conversion to private
    ev[2] = (gmem.Op.GUEST_WRITE_SHARED, 5, 1, 3)  # and back to shared
    ev[3] = (gmem.Op.GUEST_READ_SHARED, 5, 1, 0)
    eager = policies.run(
        guest, ev, policies.DiscardEager() + policies.FaultHandling("convert"), sample_every=1
    )
    assert eager.summary["double_backed_pages"] == 0
    host2 = gmem_guest.make_host(64)
    guest2 = gmem_guest.build_vm(host2, 64, "sw_protected", "dual")
    never = policies.run(
        guest2, ev, policies.DiscardNever() + policies.FaultHandling("convert"), sample_every=1
    )
    assert never.summary["double_backed_pages"] == 1
    guest.vm.check()
