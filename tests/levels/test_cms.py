"""Continuum Memory System period semantics (NeurIPS Eqs. 30–31; nested-learning-math.md §3.1,
§7.16): a level with period C takes every gradient of a chunk at the chunk-start parameters, sums
them (not averages), commits every C tokens, and reads only committed parameters. C = 1 is online
GD, C > T a static MLP (a Transformer FFN); a partial last chunk is not committed."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, initial_memories, run

from nlgraph.levels import build_memory, build_objective
from nlgraph.spec.loader import load_level

FORMS = st.sampled_from(["reference", "chunked"])


def _setup(seed, t, dim, period, objective="l2", read="after_write", activation="gelu"):
    d = Draw(seed)
    level = {"memory": {"kind": "mlp", "hidden": "2x", "activation": activation, "bias": True},
             "objective": {"kind": objective}, "optimizer": {"kind": "gd", "lr": 0.1}, "frequency": period, "read": read}
    spec = load_level(level)
    x, v = d.unit(2, t, 1, dim), d.normal(2, t, 1, dim)
    state0 = initial_memories(level, d, 2, dim)
    mem, obj = build_memory(spec.memory, dim, dim), build_objective(spec.objective)
    theta = {n.split(".", 1)[1]: s for n, s in state0.items()}
    return level, x, v, state0, mem, obj, theta


def _grad(mem, obj, theta, x, v):
    p = {n: s.clone().requires_grad_() for n, s in theta.items()}
    loss = obj.loss(mem.forward(p, x.transpose(1, 2)), v.transpose(1, 2)).sum()
    return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


@given(SEEDS, st.integers(1, 16), st.integers(2, 4), st.sampled_from(["l2", "outer"]))
def test_cms_period_one_is_online(seed, t, dim, objective):
    level, x, v, state0, mem, obj, theta = _setup(seed, t, dim, 1, objective)
    y, state = run(level, "reference", keys=x, values=v, queries=x, state=state0)
    ys = []
    for i in range(t):
        g = _grad(mem, obj, theta, x[:, i:i + 1], v[:, i:i + 1])
        theta = {n: s - 0.1 * g[n] for n, s in theta.items()}
        ys.append(mem.forward(theta, x[:, i:i + 1].transpose(1, 2)).transpose(1, 2))
    assert_close(y, torch.cat(ys, 1), "outputs")
    for n, s in theta.items():
        assert_close(state[f"memory.{n}"], s, n)


@given(SEEDS, st.integers(1, 16), st.integers(2, 4), FORMS)
def test_cms_period_beyond_sequence_is_static(seed, t, dim, form):
    """C > T: every read is the initial MLP, nothing is committed, and the pending update is
    −η Σ_t ∇ℓ_t(θ_0). With the ``outer`` objective and values u_t = ∂L/∂y_t, that sum is exactly
    the outer loss's gradient."""
    level, x, target, state0, mem, obj, theta = _setup(seed, t, dim, 64, "outer")
    # the outer loss L = Σ_t ½‖M_θ0(x_t) − target_t‖², and its gradient at every output
    y0 = mem.forward(theta, x.transpose(1, 2)).transpose(1, 2)
    u = y0 - target
    y, state = run(level, form, keys=x, values=u, queries=x, state=state0)
    assert_close(y, y0, "static reads")
    for n, s in theta.items():
        assert_close(state[f"memory.{n}"], s, f"{n} unchanged")
    p = {n: s.clone().requires_grad_() for n, s in theta.items()}
    outer = 0.5 * (mem.forward(p, x.transpose(1, 2)).transpose(1, 2) - target).square().sum()
    for n, g in zip(p, torch.autograd.grad(outer, list(p.values()))):
        assert_close(state[f"pending.memory.{n}"], -0.1 * g, f"pending {n}")


@given(SEEDS, st.integers(1, 20), st.integers(2, 4), st.integers(2, 6), st.sampled_from(["after_write", "before_write"]),
       FORMS)
def test_cms_commits_chunk_sum_at_frozen_parameters(seed, t, dim, period, read, form):
    level, x, v, state0, mem, obj, theta = _setup(seed, t, dim, period, "l2", read, "silu")
    y, state = run(level, form, keys=x, values=v, queries=x, state=state0)
    ys, pending = [], {n: torch.zeros_like(s) for n, s in theta.items()}
    for i in range(t):
        if read == "before_write":
            ys.append(mem.forward(theta, x[:, i:i + 1].transpose(1, 2)))
        g = _grad(mem, obj, theta, x[:, i:i + 1], v[:, i:i + 1])  # at the frozen chunk-start θ
        pending = {n: s - 0.1 * g[n] for n, s in pending.items()}  # summed, not averaged
        if (i + 1) % period == 0:
            theta = {n: s + pending[n] for n, s in theta.items()}
            pending = {n: torch.zeros_like(s) for n, s in pending.items()}
        if read == "after_write":
            ys.append(mem.forward(theta, x[:, i:i + 1].transpose(1, 2)))
    assert_close(y, torch.cat(ys, 2).transpose(1, 2), "outputs")
    for n, s in theta.items():
        assert_close(state[f"memory.{n}"], s, f"committed {n}")
        assert_close(state[f"pending.memory.{n}"], pending[n], f"pending {n} (partial chunk not committed)")
