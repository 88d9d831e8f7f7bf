"""The `realloc` design: one guest_memfd page per gfn, freed and reallocated (zeroed) on
every conversion."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from design_env import (
    VM_TYPES,
    Env,
)

import gmem
from util import raises_errno

# --------------------------------------------------------------------------- realloc


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_realloc_frees_zeroes_and_loses_content(vm_type):
    e = Env(vm_type, "realloc", 4)
    e.write(0, 0x77, private=False)
    assert e.host_read(0) == 0x77
    s0 = e.stats("frees", "allocations", "zeroed_pages", "pages_allocated")
    e.convert(0, 1, private=True)
    s1 = e.stats("frees", "allocations", "zeroed_pages", "pages_allocated")
    assert s1["frees"] == s0["frees"] + 1
    assert s1["pages_allocated"] == s0["pages_allocated"] - 1
    assert e.read(0, private=True) == 0  # content lost
    s2 = e.stats("allocations", "zeroed_pages")
    assert s2["allocations"] == s1["allocations"] + 1
    assert s2["zeroed_pages"] >= s1["zeroed_pages"] + 1
    e.write(0, 0x78, private=True)
    e.convert(0, 1, private=False)
    assert e.read(0, private=False) == 0  # lost again on the round trip
    assert e.host_read(0) == 0
    assert e.stats("double_backed_pages", "pages_allocated") == {
        "double_backed_pages": 0,
        "pages_allocated": 1,
    }
    with raises_errno(errno.EFAULT, gmem.MemoryFault):
        e.read(0, private=True)


def test_realloc_never_double_backed():
    e = Env("sw_protected", "realloc", 64)
    rng = np.random.default_rng(3)
    for _ in range(200):
        p = int(rng.integers(64))
        priv = bool(rng.integers(2))
        e.convert(p, 1, private=priv)
        e.write(p, 5, private=priv)
        assert e.stats("double_backed_pages")["double_backed_pages"] == 0
    assert e.stats("pages_allocated")["pages_allocated"] <= 64
