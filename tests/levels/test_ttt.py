"""TTT (Sun et al. 2024): the dual form equals the primal per-token form, and with batch GD from
W_0 = 0 a linear TTT layer is linear attention (Theorem 1) — nested-learning-math.md §5.2, §7.8–7.9."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, initial_memories, run


@given(SEEDS, st.integers(1, 24), st.integers(2, 6), st.integers(2, 8), st.sampled_from(["reference", "chunked"]))
def test_ttt_linear_dual_is_primal(seed, t, dim, chunk, form):
    """Either form of the library equals both independent formulas of TTT-linear: the primal
    per-token loop with gradients at the mini-batch start W_0, and the dual form per mini-batch:
    with E = W_0 K − V (columns) and the mask s ≤ r, Z = W_0 Q − (E diag(η)) (mask ⊙ KᵀQ),
    W_b = W_0 − E diag(η) Kᵀ."""
    d = Draw(seed)
    k, v, q = d.unit(1, t, 1, dim), d.normal(1, t, 1, dim), d.normal(1, t, 1, dim)
    eta = d.uniform(1, t, 1, lo=0.1, hi=1.0)
    w = d.normal(dim, dim)
    level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "optimizer": {"kind": "gd", "lr": {"from": "input"}},
             "gradient_point": {"chunk": chunk}}
    y, state = run(level, form, keys=k, values=v, queries=q, lr=eta, state={"memory.w0": w[None, None]})
    # the primal: per token, W_t = W_{t−1} − η_t (W_{t'} k_t − v_t) k_tᵀ, z_t = W_t q_t
    wp, zp = w.clone(), []
    for i in range(t):
        if i % chunk == 0:
            w0 = wp.clone()
        wp = wp - eta[0, i, 0] * torch.outer(w0 @ k[0, i, 0] - v[0, i, 0], k[0, i, 0])
        zp.append(wp @ q[0, i, 0])
    # the dual, written out (columns are tokens)
    wd, zd = w.clone(), []
    for s in range(0, t, chunk):
        kk, vv, qq, ee = (x[0, s:s + chunk, 0].T for x in (k, v, q, eta[..., None].expand(1, t, 1, 1)))
        err = wd @ kk - vv
        mask = torch.triu(torch.ones(kk.shape[1], kk.shape[1]))  # s ≤ r: token s updates reads r
        zd.append(wd @ qq - (err * ee) @ (mask * (kk.T @ qq)))
        wd = wd - (err * ee) @ kk.T
    assert_close(y[0, :, 0], torch.stack(zp), f"{form} outputs vs the primal loop")
    assert_close(y[0, :, 0], torch.cat(zd, 1).T, f"{form} outputs vs the dual form")
    assert_close(state["memory.w0"][0, 0], wp, f"{form} final W vs the primal loop")
    assert_close(state["memory.w0"][0, 0], wd, f"{form} final W vs the dual form")


def _ttt_mlp(p: dict, x: torch.Tensor, residual: bool) -> torch.Tensor:
    """TTT's inner model on ``x [B, H, D]``, written out: ``f(x) = W1 gelu(W0 x + b0) + b1`` (exact
    GELU, x·Φ(x)); the residual variant is ``x + LN(f(x))`` with a layer norm without scale (ε 1e-6).

    The layer norm is torch's primitive with its width and ε given here: at width 2 LN(f) is
    ±(1, −1)/√(1 + ε/c²) with c = (f₁ − f₂)/2, whose derivative grows like ε/c³, so a hand-written
    √ that rounds differently drifts ~1e-9 apart over a few steps for nearly equal f₁, f₂."""
    z = torch.einsum("bhoi,bhi->bho", p["w0"], x) + p["b0"]
    a = z * 0.5 * (1.0 + torch.erf(z / 2**0.5))
    f = torch.einsum("bhoi,bhi->bho", p["w1"], a) + p["b1"]
    if not residual:
        return f
    return x + torch.nn.functional.layer_norm(f, (f.shape[-1],), eps=1e-6)


@given(SEEDS, st.integers(1, 20), st.integers(2, 5), st.integers(2, 6), st.sampled_from(["mlp", "residual_mlp"]),
       st.sampled_from(["reference", "chunked"]))
def test_ttt_mlp_dual_is_primal(seed, t, dim, chunk, kind, form):
    """TTT-MLP (2 layers, GELU, biases) and TTT's ``x + LN(f(x))``: either form of the library equals
    the primal per-token loop with gradients at the mini-batch start, where the inner model is
    written out in the test (:func:`_ttt_mlp`) and its gradient of ½‖f(k) − v‖² taken by autograd."""
    d = Draw(seed)
    memory = {"kind": "mlp", "hidden": "2x", "activation": "gelu", "bias": True} if kind == "mlp" else \
             {"kind": "residual_mlp", "hidden": "2x", "activation": "gelu", "norm": "layer", "bias": True}
    level = {"memory": memory, "objective": {"kind": "l2"}, "optimizer": {"kind": "gd", "lr": {"from": "input", "scale": 0.1}},
             "gradient_point": {"chunk": chunk}}
    k, v, q = d.unit(2, t, 1, dim), d.normal(2, t, 1, dim), d.normal(2, t, 1, dim)
    eta = 0.1 * d.uniform(2, t, 1)
    state0 = initial_memories(level, d, 2, dim, noise=0.3)
    # biases away from zero, so their updates and their part in the read are checked too
    state0 = {n: x + (0.3 * d.normal(*x.shape) if ".b" in n else 0.0) for n, x in state0.items()}
    y, state = run(level, form, keys=k, values=v, queries=q, lr=eta, state=state0)
    m = {n.split(".", 1)[1]: x for n, x in state0.items()}
    assert set(m) == {"w0", "b0", "w1", "b1"}
    residual = kind == "residual_mlp"
    zs = []
    for i in range(t):
        if i % chunk == 0:
            start = {n: x.clone().requires_grad_() for n, x in m.items()}
        loss = 0.5 * (_ttt_mlp(start, k[:, i], residual) - v[:, i]).square().sum()
        grads = torch.autograd.grad(loss, list(start.values()))
        m = {n: x - eta[:, i, 0].reshape(2, 1, *[1] * (x.dim() - 2)) * g for (n, x), g in zip(m.items(), grads)}
        zs.append(_ttt_mlp(m, q[:, i], residual))
    assert_close(y, torch.stack(zs, 1), "outputs")
    for n, x in m.items():
        assert_close(state[f"memory.{n}"], x, n)


@given(SEEDS, st.integers(1, 24), st.integers(2, 6), st.sampled_from(["reference", "chunked"]))
def test_ttt_batch_gd_is_linear_attention(seed, t, dim, form):
    """Theorem 1: f(x) = W x, W_0 = 0, every gradient at W_0 (one batch), η = 1 on ½‖Wk − v‖²:
    z_t = Σ_{s≤t} v_s (k_s·q_t)."""
    d = Draw(seed)
    k, v, q = d.normal(2, t, 2, dim), d.normal(2, t, 2, dim), d.normal(2, t, 2, dim)
    level = {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"}, "optimizer": {"kind": "gd", "lr": 1.0},
             "gradient_point": {"chunk": 64}}
    y, _ = run(level, form, keys=k, values=v, queries=q)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    assert_close(y, torch.einsum("bhts,bshd->bthd", scores, v), "linear attention")
