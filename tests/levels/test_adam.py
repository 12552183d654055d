"""The inner ``adam`` optimizer is ``torch.optim.Adam`` step for step (bias-corrected moments),
token by token on the memory's own loss; Adam's moments are optimal memories of the gradients
(nested-learning-math.md §2.7, §7.13)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, initial_memories, run, torch_trajectory


@settings(max_examples=10)
@given(SEEDS, st.integers(1, 10), st.sampled_from(["linear", "mlp", "residual_mlp"]), st.floats(0.0, 0.95),
       st.floats(0.5, 0.999), st.sampled_from([1e-8, 1e-3]), st.sampled_from(["l2", "huber", "dot"]))
def test_inner_adam_is_torch_adam(seed, t, kind, beta1, beta2, eps, objective):
    d = Draw(seed)
    b, h, dim = 2, 1, 3
    memory = {"kind": kind} if kind == "linear" else {"kind": kind, "hidden": 4, "bias": True}
    level = {"memory": memory, "objective": {"kind": objective},
             "optimizer": {"kind": "adam", "lr": 0.01, "betas": [beta1, beta2], "eps": eps}}
    k, v, q = d.normal(b, t, h, dim), d.normal(b, t, h, dim), d.normal(b, t, h, dim)
    state0 = initial_memories(level, d, b, dim, noise=0.3)
    y, state = run(level, "reference", keys=k, values=v, queries=q, state=state0)
    ys, final = torch_trajectory(level, state0, k, v, q, lambda p: torch.optim.Adam(p, lr=0.01, betas=(beta1, beta2), eps=eps))
    assert_close(y, ys, "outputs")
    for n, p in final.items():
        assert_close(state[f"memory.{n}"], p, n)
    assert int(state["optimizer.memory.step"]) == t


@given(SEEDS, st.integers(1, 30), st.floats(0.0, 0.99))
def test_adam_first_moment_is_weighted_argmin(seed, t, beta):
    """m̂_t = m_t / (1 − β^t) is argmin_m Σ_i β^{t−i} (g_i − m)²: the bias-corrected EMA is the
    optimal memory of the gradients under exponential weights."""
    d = Draw(seed)
    g = d.normal(t, 3)
    m = torch.zeros(3)
    for i in range(t):
        m = torch.lerp(m, g[i], 1 - beta)
    w = beta ** torch.arange(t - 1, -1, -1, dtype=torch.float64)
    argmin = (w[:, None] * g).sum(0) / w.sum()  # the zero of the weighted L2 gradient
    assert_close(m / (1 - beta**t), argmin, "bias-corrected EMA")
