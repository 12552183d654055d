"""Helpers shared by the level tests: seeded tensors, drawn shapes, comparisons.

Hypothesis does not seed torch, so every test draws a seed and builds its tensors from a local
``torch.Generator``.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from nlgraph.runtime import run_level

SEEDS = st.integers(0, 2**31 - 1)
TOL = 1e-9


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


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    """Equal up to ``tol`` relative to the larger magnitude (float64 round-off on long recurrences)."""
    a, b = a.double(), b.double()
    scale = max(1.0, b.abs().max().item() if b.numel() else 1.0)
    return a.shape == b.shape and bool(((a - b).abs() <= tol * scale).all())


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str = "", tol: float = TOL) -> None:
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert close(a, b, tol), f"{what}: max |a - b| = {err:.3e} (shapes {list(a.shape)} vs {list(b.shape)})"


def assert_states_close(s1: dict, s2: dict, tol: float = TOL) -> None:
    assert set(s1) == set(s2), f"state keys differ: {sorted(set(s1) ^ set(s2))}"
    for k in s1:
        assert_close(s1[k], s2[k], f"state[{k!r}]", tol)


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
