"""Level maths is checked in float64: every test here runs with float64 as the default dtype."""

import pytest


@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test in this folder runs in float64."""
