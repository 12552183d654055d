"""Shared test configuration: hypothesis profiles and a float64 default for maths checks.

Profiles (select with HYPOTHESIS_PROFILE): ``dev`` (default, 20 examples), ``ci`` (derandomised,
fixed budget so CI is deterministic and fast) and ``nightly`` (1000 examples).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("ci", settings.get_profile("ci"), max_examples=25, derandomize=True,
                          database=None, print_blob=True, **_common)
settings.register_profile("nightly", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype (the maths checks); restored after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
