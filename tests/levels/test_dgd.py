"""Delta gradient descent (HOPE's inner optimizer, NeurIPS Eqs. 25–29; nested-learning-math.md
§2.8, §4.2, §7.10): GD on an L2 regression of the local surprise u = −∇_y ℓ."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, initial_memories, run

from nlgraph.levels import build_memory, build_objective
from nlgraph.spec.loader import load_level

FORMS = st.sampled_from(["reference", "chunked"])


@given(SEEDS, st.integers(1, 16), st.integers(2, 5), st.integers(2, 5), st.sampled_from(["dot", "l2"]), FORMS)
def test_dgd_proximal_closed_form_is_exact_argmin(seed, t, dk, dv, objective, form):
    """W_{t+1} = argmin_W ½‖W k − u‖² + ‖W − W_t‖²_F / (2η), solved as a linear system, equals the
    Sherman–Morrison form W_t(I − η' k kᵀ) + η' u kᵀ with η' = η / (1 + η‖k‖²)."""
    d = Draw(seed)
    k, v, q = d.normal(1, t, 1, dk), d.normal(1, t, 1, dv), d.normal(1, t, 1, dk)
    eta = d.uniform(1, t, 1, lo=0.1, hi=2.0)
    w = d.normal(dv, dk)
    level = {"memory": {"kind": "linear"}, "objective": {"kind": objective},
             "optimizer": {"kind": "dgd", "form": "proximal", "lr": {"from": "input"}}}
    y, state = run(level, form, keys=k, values=v, queries=q, lr=eta, state={"memory.w0": w[None, None]}, chunk_size=3)
    ys = []
    for i in range(t):
        kk, e = k[0, i, 0], eta[0, i, 0]
        u = v[0, i, 0] - w @ kk if objective == "l2" else v[0, i, 0]  # −∇_y ℓ at W_t
        # normal equations: W (k kᵀ + I/η) = u kᵀ + W_t / η
        lhs = torch.outer(kk, kk) + torch.eye(dk) / e
        w = torch.linalg.solve(lhs, (torch.outer(u, kk) + w / e).T).T
        ys.append(w @ q[0, i, 0])
    assert_close(y[0, :, 0], torch.stack(ys), "outputs")
    assert_close(state["memory.w0"][0, 0], w, "argmin")


@given(SEEDS, st.integers(2, 4), st.sampled_from(["linear", "mlp", "residual_mlp"]), st.booleans())
def test_dgd_explicit_is_one_gd_step_on_surprise_regression(seed, dim, kind, bias):
    """Per affine layer with input x̂ and local error δ (held fixed), DGD is one GD step on
    ½‖[W b][x̂; 1] − u‖² with u = −δ: W ← W − η ([W b][x̂; 1] + δ)[x̂; 1]ᵀ."""
    d = Draw(seed)
    memory = {"kind": kind} if kind == "linear" else {"kind": kind, "hidden": 3, "bias": bias, "activation": "tanh"}
    level = {"memory": memory, "objective": {"kind": "l2"}, "optimizer": {"kind": "dgd", "lr": 0.3}}
    spec = load_level(level)
    k, v, q = d.normal(2, 1, 1, dim), d.normal(2, 1, 1, dim), d.normal(2, 1, 1, dim)
    state0 = initial_memories(level, d, 2, dim, noise=0.5)
    _, state = run(level, "reference", keys=k, values=v, queries=q, state=state0)
    mem, obj = build_memory(spec.memory, dim, dim), build_objective(spec.objective)
    params = {n.split(".", 1)[1]: x.clone().requires_grad_() for n, x in state0.items()}
    inputs, outs = {}, {}

    def apply(layer, h):
        inputs[layer.weight] = h.detach()
        z = h @ params[layer.weight].transpose(-1, -2)
        if layer.bias is not None:
            z = z + params[layer.bias].unsqueeze(-2)
        outs[layer.weight] = z
        return z

    loss = obj.loss(mem.forward_with(k.transpose(1, 2), apply), v.transpose(1, 2)).sum()
    deltas = dict(zip(outs, torch.autograd.grad(loss, list(outs.values()))))
    for layer in mem.layers:
        w = params[layer.weight].detach().clone().requires_grad_()
        b = params[layer.bias].detach().clone().requires_grad_() if layer.bias else None
        read = inputs[layer.weight] @ w.transpose(-1, -2) + (b.unsqueeze(-2) if b is not None else 0)
        surprise = -deltas[layer.weight]
        regression = 0.5 * (read - surprise).square().sum()
        gw = torch.autograd.grad(regression, [w] + ([b] if b is not None else []))
        assert_close(state[f"memory.{layer.weight}"], w - 0.3 * gw[0], layer.weight)
        if b is not None:
            assert_close(state[f"memory.{layer.bias}"], b - 0.3 * gw[1], layer.bias)


@given(SEEDS, st.integers(1, 16), st.integers(2, 5), FORMS)
def test_dgd_weight_decay_is_hope_form(seed, t, dim, form):
    """HOPE's rule on a matrix memory (arXiv Eq. 88, §4.2): M_t = M_{t−1}(α I − η k kᵀ) − η (M_{t−1} k − v) kᵀ
    = α M − 2η M k kᵀ + η v kᵀ (the erase along k applied twice)."""
    d = Draw(seed)
    k, v, q = d.unit(2, t, 1, dim), d.normal(2, t, 1, dim), d.normal(2, t, 1, dim)
    eta, alpha = d.uniform(2, t, 1, lo=0.05, hi=0.4), d.uniform(2, t, 1, lo=0.5, hi=1.0)
    m = d.normal(2, 1, dim, dim)
    level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "optimizer": {"kind": "dgd", "lr": {"from": "input"}},
             "retention": {"kind": "weight_decay", "gate": {"from": "input"}}}
    y, state = run(level, form, keys=k, values=v, queries=q, lr=eta, retention=alpha, state={"memory.w0": m}, chunk_size=4)
    ys = []
    for i in range(t):
        kk, vv = k[:, i], v[:, i]  # [B, H, D]
        a, e = alpha[:, i, :, None, None], eta[:, i, :, None, None]
        mk = m @ kk.unsqueeze(-1)
        m = a * m - 2 * e * mk * kk.unsqueeze(-2) + e * vv.unsqueeze(-1) * kk.unsqueeze(-2)
        ys.append((m @ q[:, i].unsqueeze(-1)).squeeze(-1))
    assert_close(y, torch.stack(ys, 1), "outputs")
    assert_close(state["memory.w0"], m, "final state")
