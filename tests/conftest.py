"""Shared test set-up: Hypothesis profiles (``ci`` is derandomized) and torch threads."""

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
