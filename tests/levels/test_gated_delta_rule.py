"""Gated DeltaNet is retention by decay, then the delta GD step (nested-learning-math.md §2.4,
§7.3, §7.5), with a scalar, per-head or per-key-channel α."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, run


@given(SEEDS, st.integers(1, 24), st.integers(1, 2), st.integers(2, 6), st.sampled_from(["head", "channel"]),
       st.integers(1, 9), st.sampled_from(["reference", "chunked"]))
def test_gated_delta_rule_is_decay_then_gd(seed, t, h, dim, per, chunk, form):
    d = Draw(seed)
    b = 2
    k, v, q = d.unit(b, t, h, dim), d.normal(b, t, h, dim), d.normal(b, t, h, dim)
    beta = d.uniform(b, t, h, lo=0.1, hi=0.9)
    alpha = d.uniform(b, t, h, dim, lo=0.5, hi=1.0) if per == "channel" else d.uniform(b, t, h, lo=0.5, hi=1.0)
    s0 = d.normal(b, h, dim, dim, scale=0.3)
    level = {"memory": {"kind": "linear", "heads": h}, "objective": {"kind": "l2"},
             "optimizer": {"kind": "gd", "lr": {"from": "input"}},
             "retention": {"kind": "decay", "gate": {"from": "input", "act": "logsigmoid", "per": per}}}
    y, state = run(level, form, keys=k, values=v, queries=q, lr=beta, retention=alpha, state={"memory.w0": s0},
                   chunk_size=chunk)
    eye = torch.eye(dim)
    s, ys = s0, []
    for i in range(t):
        kk, bb = k[:, i], beta[:, i, :, None, None]
        a = alpha[:, i].unsqueeze(-2) if per == "channel" else alpha[:, i, :, None, None]
        if per == "channel":
            # S' = S·Diag(a), then the delta step on S'
            s = s * a
            s = s @ (eye - bb * kk.unsqueeze(-1) * kk.unsqueeze(-2)) + bb * v[:, i].unsqueeze(-1) * kk.unsqueeze(-2)
        else:
            # the GDN recurrence S_t = α S_{t−1}(I − β k kᵀ) + β v kᵀ
            s = a * s @ (eye - bb * kk.unsqueeze(-1) * kk.unsqueeze(-2)) + bb * v[:, i].unsqueeze(-1) * kk.unsqueeze(-2)
        ys.append((s @ q[:, i].unsqueeze(-1)).squeeze(-1))
    assert_close(y, torch.stack(ys, 1), "outputs")
    assert_close(state["memory.w0"], s, "final state")
