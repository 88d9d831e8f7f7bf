"""The reference model's own data structures, checked against the obvious."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

import refmodel

RANGES = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 12), st.sampled_from([0, 8, 8, 1])),
    max_size=30,
)


@given(RANGES)
def test_attr_map_matches_a_dict(ops):
    am, naive = refmodel.AttrMap(), {}
    for start, n, attrs in ops:
        am.set(start, start + n, attrs)
        for g in range(start, start + n):
            naive[g] = attrs
        # Coalesced, sorted, no zero intervals.
        for (_, e1, a1), (s2, _, a2) in itertools.pairwise(am.iv):
            assert e1 <= s2
            assert not (e1 == s2 and a1 == a2)
        assert all(a for _, _, a in am.iv)
    for g in range(60):
        assert am.get(g) == naive.get(g, 0)
    for start in range(0, 56, 3):
        for n in (1, 2, 5):
            for attrs in (0, 8, 1):
                want = all(naive.get(g, 0) == attrs for g in range(start, start + n))
                assert am.has(start, start + n, attrs) == want
