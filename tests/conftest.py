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


@pytest.fixture
def hope_level_copies(monkeypatch):
    """``run(form, device)``: HOPE's self-modifying level (toy widths, chunks of 4) called twice on 16
    tokens, the state carried; how many slot stacks each call copied, ``[first, second]`` (a copy:
    ``chunked._unbound_from`` found no tensor the slots are views of, so ``torch.stack`` ran)."""
    from nlgraph.compilers import chunked
    from nlgraph.runtime import init_state, run_level
    from nlgraph.spec.loader import load_spec

    copies = {"n": 0}
    real = chunked._unbound_from

    def counting(parts):
        found = real(parts)
        copies["n"] += found is None
        return found

    monkeypatch.setattr(chunked, "_unbound_from", counting)

    def run(form: str, device: str = "cpu") -> list[int]:
        spec = load_spec("hope", ["vars.d_model=16", "vars.heads=2", "vars.chunk=4"]).levels["titans"]
        gen = torch.Generator().manual_seed(0)
        x, q = (torch.randn(2, 16, 2, 8, generator=gen).to(device) for _ in range(2))
        mu = torch.full(x.shape[:3], 0.12, device=device)
        state = init_state(spec, batch=2, d_key=8, d_value=8, generator=gen)
        state = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in state.items()}
        counts = []
        for _ in range(2):
            before = copies["n"]
            _, state = run_level(spec, keys=x, values=x, queries=q, momentum=mu, state=state, form=form)
            counts.append(copies["n"] - before)
        return counts

    return run
