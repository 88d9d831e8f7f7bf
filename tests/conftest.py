"""Shared fixtures and the hypothesis profiles.

Profiles: ``ci`` (default; bounded so the whole suite stays well under a minute) and
``long`` (select with ``HYPOTHESIS_PROFILE=long``).
"""

from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=2000,
    stateful_step_count=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MiB = 1 << 20


def pytest_configure(config):
    # When a hypothesis test fails, its reporting touches every loaded module's
    # attributes; mypy_extensions (installed with mypy) warns on its deprecated TypedDict,
    # which filterwarnings=error turns into a pytest INTERNALERROR hiding the real failure.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )


@pytest.fixture(params=["gmem", "refmodel"])
def api(request):
    """The implementation under test: gmem itself, or the pure-Python reference model.

    Tests that take this fixture use only what both provide, so every scenario is
    checked twice: once against the core, once against the model (which keeps the
    model honest and the expectations in the tests explicit).
    """
    return importlib.import_module(request.param)


@pytest.fixture
def host(api):
    return api.Host(64 * MiB)


@pytest.fixture
def vm(host):
    return host.create_vm("sw_protected", "dual")
