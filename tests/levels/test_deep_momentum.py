"""Deep momentum GD (DMGD, NeurIPS Eqs. 23–24): the momentum is itself a level — a memory m over
the stream of gradients with its own objective, optimizer and retention — and the memory moves by
W ← W − η m(∇ℓ) (nested-learning-math.md §2.6)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, run

from nlgraph.levels import build_memory
from nlgraph.spec.loader import load_level


@given(SEEDS, st.integers(1, 12), st.integers(2, 4), st.integers(2, 4), st.floats(0.3, 1.0))
def test_linear_dot_momentum_memory_accumulates_gradient_outer_products(seed, t, dk, dv, alpha):
    """A linear momentum memory from zero with the dot objective (−⟨m(g), g⟩), GD lr η_m and decay
    α stores M ← α M + η_m Σ_r g_r g_rᵀ over the gradient's rows, and the update is −η G Mᵀ."""
    d = Draw(seed)
    level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"},
             "optimizer": {"kind": "deep_momentum", "lr": 0.1,
                           "level": {"memory": {"kind": "linear"}, "objective": {"kind": "dot"},
                                     "optimizer": {"kind": "gd", "lr": 0.2},
                                     "retention": {"kind": "decay", "gate": alpha}}}}
    k, v, q = d.unit(1, t, 1, dk), d.normal(1, t, 1, dv), d.normal(1, t, 1, dk)
    w0 = d.normal(1, 1, dv, dk)
    y, state = run(level, "reference", keys=k, values=v, queries=q, state={"memory.w0": w0})
    w, m, ys = w0[0, 0], torch.zeros(dk, dk), []
    for i in range(t):
        g = torch.outer(w @ k[0, i, 0] - v[0, i, 0], k[0, i, 0])  # ∇_W ½‖W k − v‖², rows g_r
        m = alpha * m + 0.2 * g.T @ g
        w = w - 0.1 * g @ m.T
        ys.append(w @ q[0, i, 0])
    assert_close(y[0, :, 0], torch.stack(ys), "outputs")
    assert_close(state["memory.w0"][0, 0], w, "memory")
    assert_close(state["optimizer.memory.w0.memory.w0"][0, 0], m, "momentum memory")


@settings(max_examples=10)
@given(SEEDS, st.integers(1, 8), st.integers(2, 4), st.sampled_from(["l2", "dot"]), st.sampled_from(["gd", "momentum"]))
def test_mlp_momentum_memory_follows_dmgd(seed, t, dim, objective, inner):
    """An MLP momentum memory, written out with autograd: per token, g = ∇ℓ(W); m takes one step of
    its optimizer on Σ_r ℓ_m(m(g_r), g_r); then W ← W − η m(g)."""
    d = Draw(seed)
    mlevel = {"memory": {"kind": "mlp", "hidden": 3, "activation": "tanh"}, "objective": {"kind": objective},
              "optimizer": {"kind": inner, "lr": 0.05, **({"momentum": 0.5} if inner == "momentum" else {})}}
    level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"},
             "optimizer": {"kind": "deep_momentum", "lr": 0.1, "level": mlevel}}
    k, v, q = d.unit(1, t, 1, dim), d.normal(1, t, 1, dim), d.normal(1, t, 1, dim)
    w0 = d.normal(1, 1, dim, dim)
    mspec = load_level({**mlevel, "memory": {**mlevel["memory"]}}).memory
    mem = build_memory(mspec, dim, dim)
    m = {n: (0.5 * d.normal(1, 1, *s)) for n, s in mem.shapes().items()}
    state0 = {"memory.w0": w0, **{f"optimizer.memory.w0.memory.{n}": x for n, x in m.items()}}
    y, state = run(level, "reference", keys=k, values=v, queries=q, state=state0)
    w, buf, ys = w0, {n: torch.zeros_like(x) for n, x in m.items()}, []
    for i in range(t):
        g = (w @ k[:, i].unsqueeze(-1) - v[:, i].unsqueeze(-1)) * k[:, i].unsqueeze(-2)  # [1, 1, d, d]
        p = {n: x.clone().requires_grad_() for n, x in m.items()}
        out = mem.forward(p, g)
        loss = -(out * g).sum() if objective == "dot" else 0.5 * (out - g).square().sum()
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        if inner == "momentum":
            buf = {n: 0.5 * buf[n] - 0.05 * grads[n] for n in m}
            m = {n: m[n] + buf[n] for n in m}
        else:
            m = {n: m[n] - 0.05 * grads[n] for n in m}
        w = w - 0.1 * mem.forward(m, g)
        ys.append(w @ q[:, i].unsqueeze(-1))
    assert_close(y, torch.cat(ys, -1).permute(0, 3, 1, 2), "outputs")
    assert_close(state["memory.w0"], w, "memory")
