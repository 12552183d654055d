"""Linear attention is one GD step (lr 1) on −⟨Mk, v⟩; decayed Hebbian memories (RetNet, Mamba2,
GLA) are decay-then-that-step (nested-learning-math.md §2.1–2.2, §7.1, §7.3)."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, assert_states_close, run

FORMS = st.sampled_from(["reference", "chunked"])


@given(SEEDS, st.integers(1, 2), st.integers(1, 24), st.integers(1, 2), st.integers(2, 6), st.integers(2, 6),
       st.integers(1, 9), FORMS)
def test_linear_attention_is_gd_lr1_on_dot(seed, b, t, h, dk, dv, chunk, form):
    d = Draw(seed)
    k, v, q = d.normal(b, t, h, dk), d.normal(b, t, h, dv), d.normal(b, t, h, dk)
    m0 = d.normal(b, h, dv, dk)
    level = {"memory": {"kind": "linear", "heads": h}, "objective": {"kind": "dot"}, "optimizer": {"kind": "gd", "lr": 1.0}}
    y, state = run(level, form, keys=k, values=v, queries=q, state={"memory.w0": m0}, chunk_size=chunk)
    # path A: the linear-attention recurrence M_t = M_{t−1} + v_t k_tᵀ, read y_t = M_t q_t
    m, ys = m0, []
    for i in range(t):
        m = m + v[:, i].unsqueeze(-1) * k[:, i].unsqueeze(-2)
        ys.append((m @ q[:, i].unsqueeze(-1)).squeeze(-1))
    assert_close(y, torch.stack(ys, 1), "outputs")
    assert_close(state["memory.w0"], m, "final memory")
    # and, with M_0 = 0, the unnormalised causal attention Σ_{s≤t} v_s (k_s·q_t)
    y0, _ = run(level, form, keys=k, values=v, queries=q, chunk_size=chunk)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    assert_close(y0, torch.einsum("bhts,bshd->bthd", scores, v), "attention form")


@given(SEEDS, st.integers(1, 24), st.integers(1, 2), st.integers(2, 5), st.booleans(), st.integers(1, 9), FORMS)
def test_decayed_hebbian_is_decay_then_dot_gd(seed, t, h, dim, channel, chunk, form):
    """RetNet (constant α), Mamba2 (α_t per head), GLA (α_t per key channel: M·Diag(a_t))."""
    d = Draw(seed)
    b = 2
    k, v, q = d.normal(b, t, h, dim), d.normal(b, t, h, dim), d.normal(b, t, h, dim)
    eta = d.uniform(b, t, h, lo=0.1, hi=1.0)
    alpha = d.uniform(b, t, h, dim, lo=0.3, hi=1.0) if channel else d.uniform(b, t, h, lo=0.3, hi=1.0)
    level = {"memory": {"kind": "linear", "heads": h}, "objective": {"kind": "dot"},
             "optimizer": {"kind": "gd", "lr": {"from": "input"}},
             "retention": {"kind": "decay", "gate": {"from": "input", "per": "channel" if channel else "head"}}}
    y, state = run(level, form, keys=k, values=v, queries=q, lr=eta, retention=alpha, chunk_size=chunk)
    m, ys = torch.zeros(b, h, dim, dim), []
    for i in range(t):
        a = alpha[:, i].unsqueeze(-2) if channel else alpha[:, i, :, None, None]
        m = m * a + eta[:, i, :, None, None] * v[:, i].unsqueeze(-1) * k[:, i].unsqueeze(-2)
        ys.append((m @ q[:, i].unsqueeze(-1)).squeeze(-1))
    assert_close(y, torch.stack(ys, 1), "outputs")
    assert_close(state["memory.w0"], m, "final memory")
    # a constant α (RetNet) given by the spec equals passing it as a tensor
    const = dict(level, retention={"kind": "decay", "gate": 0.9}, optimizer={"kind": "gd", "lr": 0.5})
    y1, s1 = run(const, form, keys=k, values=v, queries=q, chunk_size=chunk)
    y2, s2 = run(const, form, keys=k, values=v, queries=q, lr=0.5, retention=torch.full((b, t, h), 0.9), chunk_size=chunk)
    assert_close(y1, y2, "constant gate")
    assert_states_close(s1, s2)
