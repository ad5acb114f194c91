"""Shared test set-up: Hypothesis profiles (``ci`` is derandomized), torch threads, and
``--defer-refinements``: every tracker takes the accelerator's path (a refinement's Ritz step
at the next call, `laser_fx._decisions.defers`), so a machine without a GPU tests it too
(tests run in a subprocess keep the CPU's path)."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--defer-refinements", action="store_true",
                     help="run every tracker as on an accelerator (refinements finished one "
                          "call late)")


@pytest.fixture(scope="session", autouse=True)
def _deferred_refinements(request: pytest.FixtureRequest):
    """The accelerator's refinement path everywhere, with ``--defer-refinements``."""
    if not request.config.getoption("--defer-refinements"):
        yield
        return
    from laser_fx.testing import deferred_refinements

    with deferred_refinements():
        yield


# One thread: on 2 shared cores, intra-op threads make the many tiny test ops ~50x slower.
torch.set_num_threads(1)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches reset around the test, its logs and warnings quiet."""
    torch._dynamo.reset()
    torch._logging.set_logs(dynamo=logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()
