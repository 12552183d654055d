"""Level maths is checked in float64: every test here runs with float64 as the default dtype."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
