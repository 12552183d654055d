"""DeltaNet is one GD step with lr β_t on ½‖Mk − v‖² (nested-learning-math.md §2.3, §7.2)."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, run

DELTANET = """
memory: {kind: linear, heads: 2}
objective: {kind: l2}
optimizer: {kind: gd, lr: {from: input, act: sigmoid}}
"""


@given(SEEDS, st.integers(1, 2), st.integers(1, 24), st.integers(2, 6), st.integers(2, 6), st.integers(1, 9),
       st.sampled_from(["reference", "chunked"]))
def test_delta_rule_is_gd_lr_beta_on_l2(seed, b, t, dk, dv, chunk, form):
    d = Draw(seed)
    h = 2
    k, v, q = d.unit(b, t, h, dk), d.normal(b, t, h, dv), d.normal(b, t, h, dk)
    beta = d.uniform(b, t, h, lo=0.05, hi=0.95)
    s0 = d.normal(b, h, dv, dk)
    y, state = run(DELTANET, form, keys=k, values=v, queries=q, lr=beta, state={"memory.w0": s0}, chunk_size=chunk)
    # path A: the delta rule S_t = S_{t−1}(I − β k kᵀ) + β v kᵀ
    eye = torch.eye(dk)
    s, ys = s0, []
    for i in range(t):
        kk, bb = k[:, i], beta[:, i, :, None, None]
        s = s @ (eye - bb * kk.unsqueeze(-1) * kk.unsqueeze(-2)) + bb * v[:, i].unsqueeze(-1) * kk.unsqueeze(-2)
        ys.append((s @ q[:, i].unsqueeze(-1)).squeeze(-1))
    assert_close(y, torch.stack(ys, 1), "outputs")
    assert_close(state["memory.w0"], s, "final state")
    # path B: the same step by autograd on the L2 loss, token by token
    s = s0.clone()
    for i in range(t):
        w = s.clone().requires_grad_()
        loss = 0.5 * ((w @ k[:, i].unsqueeze(-1)).squeeze(-1) - v[:, i]).square().sum()
        (grad,) = torch.autograd.grad(loss, w)
        s = s - beta[:, i, :, None, None] * grad
    assert_close(state["memory.w0"], s, "autograd path")
