"""The design tests' fixture: every VM and host a test creates is checked (``vm.check()``,
``host.check()``) when the test ends."""

from __future__ import annotations

import pytest
from design_env import _LIVE


@pytest.fixture(autouse=True)
def _check_everything():
    """vm.check() and host.check() on everything the test built."""
    _LIVE.clear()
    yield
    live = list(_LIVE)
    _LIVE.clear()
    for host, vms in live:
        for vm in vms:
            vm.check()
        host.check()
