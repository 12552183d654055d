"""Helpers shared by the level tests: seeded tensors, drawn shapes, comparisons.

Hypothesis does not seed torch, so every test draws a seed and builds its tensors from a local
``torch.Generator``.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from nlgraph.runtime import run_level

SEEDS = st.integers(0, 2**31 - 1)
# Elementwise tolerances for float64 maths: |a − b| ≤ ATOL + TOL·|expected| at every entry. TOL bounds
# the relative round-off a long recurrence accumulates (float64 eps is 2.2e-16, so 1e-9 leaves
# ~10⁶ ulps); ATOL only absorbs entries that are zero up to cancellation of O(1) terms (errors of a
# few ulps of the operands), so an entry of size 1e-6 is still checked to ~1e-6 relative.
TOL = 1e-9
ATOL = 1e-12


class Draw:
    """Tensors from one seeded generator (float64)."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * scale

    def uniform(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=self.g)

    def unit(self, *shape: int) -> torch.Tensor:
        """Rows of unit L2 norm (the normalised keys DeltaNet assumes)."""
        return torch.nn.functional.normalize(self.normal(*shape), dim=-1)


def _excess(a: torch.Tensor, b: torch.Tensor, tol: float, atol: float) -> torch.Tensor:
    """``|a − b| − (atol + tol·|b|)`` per entry (positive where the entry fails); NaN counts as failing."""
    a, b = a.double(), b.double()
    excess = (a - b).abs() - (atol + tol * b.abs())
    return torch.where(torch.isnan(a) | torch.isnan(b), torch.full_like(a, float("inf")), excess)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL, atol: float = ATOL) -> bool:
    """``a`` equals the expected ``b`` entry by entry: ``|a − b| ≤ atol + tol·|b|`` everywhere."""
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or bool((_excess(a, b, tol, atol) <= 0).all())


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str = "", tol: float = TOL, atol: float = ATOL) -> None:
    """:func:`close`, with the worst entry (index, both values) in the message. ``b`` is the expected value."""
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes {list(a.shape)} vs {list(b.shape)}")
    if close(a, b, tol, atol):
        return
    excess = _excess(a, b, tol, atol)
    i = int(excess.flatten().argmax())
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), a.shape))
    x, y = a.double().flatten()[i].item(), b.double().flatten()[i].item()
    n_bad = int((excess > 0).sum())
    raise AssertionError(
        f"{what}: {n_bad} of {a.numel()} entries differ beyond {atol:.0e} + {tol:.0e}·|expected|; worst at "
        f"{list(idx)}: got {x:.12e}, expected {y:.12e} (|Δ| {abs(x - y):.3e})"
    )


def assert_states_close(s1: dict, s2: dict, tol: float = TOL, atol: float = ATOL) -> None:
    """Same entries, each :func:`assert_close` (``s2`` is the expected state)."""
    assert set(s1) == set(s2), f"state keys differ: {sorted(set(s1) ^ set(s2))}"
    for k in s1:
        assert_close(s1[k], s2[k], f"state[{k!r}]", tol, atol)


def run(level, form: str, **kw):
    """``run_level`` in one form."""
    return run_level(level, form=form, **kw)


def torch_trajectory(level, state0: dict, keys, values, queries, make_optimizer):
    """Run a ``torch.optim`` optimizer token by token on the memory's own loss, independently for
    every batch element and head, reading after each step: ``(outputs [B, T, H, D_v], params)``."""
    from nlgraph.levels import build_memory, build_objective
    from nlgraph.spec.loader import load_level

    spec = load_level(level)
    b, t, h, dk = keys.shape
    mem = build_memory(spec.memory, dk, values.shape[-1])
    obj = build_objective(spec.objective)
    outs = torch.zeros(b, t, h, values.shape[-1])
    final = {n: torch.zeros_like(state0[f"memory.{n}"]) for n in mem.shapes()}
    for i in range(b):
        for j in range(h):
            params = {n: torch.nn.Parameter(state0[f"memory.{n}"][i, j].clone()) for n in mem.shapes()}
            opt = make_optimizer(list(params.values()))
            view = lambda: {n: p[None, None] for n, p in params.items()}  # noqa: E731
            for s in range(t):
                opt.zero_grad()
                x = keys[i, s, j][None, None, None]
                obj.loss(mem.forward(view(), x), values[i, s, j][None, None, None]).sum().backward()
                opt.step()
                with torch.no_grad():
                    outs[i, s, j] = mem.forward(view(), queries[i, s, j][None, None, None])[0, 0, 0]
            for n, p in params.items():
                final[n][i, j] = p.detach()
    return outs, final


def initial_memories(level, d: Draw, batch: int, d_key: int, d_value: int | None = None, noise: float = 0.0) -> dict:
    """The memory entries (level and adaptive) of a fresh state drawn from ``d``, plus ``noise``
    times a standard normal: the meta-learned initial states a model would pass in."""
    from nlgraph.runtime import init_state
    from nlgraph.spec.loader import load_level

    state = init_state(load_level(level), batch=batch, d_key=d_key, d_value=d_value or d_key, generator=d.g)
    return {n: s + noise * d.normal(*s.shape) for n, s in state.items() if n.startswith(("memory.", "adaptive."))}
