"""Momentum is a second-level memory (NeurIPS Eqs. 17–18; nested-learning-math.md §2.5, §7.7,
§7.11), and the inner ``momentum`` optimizer is ``torch.optim.SGD(momentum=μ)`` step for step."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, initial_memories, run, torch_trajectory


@given(SEEDS, st.integers(1, 16), st.integers(1, 2), st.integers(2, 5), st.sampled_from(["reference", "chunked"]))
def test_momentum_is_a_memory(seed, t, h, dim, form):
    """The buffer S of ``S ← μ S − η ∇ℓ`` equals the memory of a level that takes one GD step
    (lr η) on ⟨m, ∇ℓ⟩ after decaying by μ: a linear memory with the dot objective whose keys are
    the memory's inputs and whose values are the local surprise −∇_y ℓ."""
    d = Draw(seed)
    b = 2
    k, v, q = d.unit(b, t, h, dim), d.normal(b, t, h, dim), d.normal(b, t, h, dim)
    eta, mu = d.uniform(b, t, h, lo=0.1, hi=0.5), d.uniform(b, t, h, lo=0.0, hi=0.9)
    learner = {"memory": {"kind": "linear", "heads": h}, "objective": {"kind": "l2"},
               "optimizer": {"kind": "momentum", "lr": {"from": "input"}, "momentum": {"from": "input"}}}
    # run the learner one token at a time to see M_{t−1}, hence each token's surprise
    state, surprise = None, []
    for i in range(t):
        m_prev = state["memory.w0"] if state else torch.zeros(b, h, dim, dim)
        surprise.append(v[:, i] - (m_prev @ k[:, i].unsqueeze(-1)).squeeze(-1))  # −∇_y ½‖Mk − v‖²
        _, state = run(learner, form, keys=k[:, i:i + 1], values=v[:, i:i + 1], queries=q[:, i:i + 1],
                       lr=eta[:, i:i + 1], momentum=mu[:, i:i + 1], state=state)
    momentum = {"memory": {"kind": "linear", "heads": h}, "objective": {"kind": "dot"},
                "optimizer": {"kind": "gd", "lr": {"from": "input"}},
                "retention": {"kind": "decay", "gate": {"from": "input"}}}
    _, mem = run(momentum, form, keys=k, values=torch.stack(surprise, 1), queries=q, lr=eta, retention=mu)
    assert_close(mem["memory.w0"], state["optimizer.memory.momentum.w0"], "momentum buffer vs memory")


@settings(max_examples=10)
@given(SEEDS, st.integers(1, 12), st.sampled_from(["linear", "mlp"]), st.booleans(), st.floats(0.0, 0.95))
def test_inner_momentum_is_torch_sgd(seed, t, kind, nesterov, mu):
    d = Draw(seed)
    b, h, dim = 2, 2, 3
    k, v, q = d.normal(b, t, h, dim), d.normal(b, t, h, dim), d.normal(b, t, h, dim)
    memory = {"kind": "linear", "heads": h} if kind == "linear" else {"kind": "mlp", "heads": h, "hidden": 4, "bias": True}
    level = {"memory": memory, "objective": {"kind": "l2"},
             "optimizer": {"kind": "momentum", "lr": 0.1, "momentum": mu, "nesterov": nesterov}}
    state0 = initial_memories(level, d, b, dim, noise=0.3)
    y, state = run(level, "reference", keys=k, values=v, queries=q, state=state0)
    # torch refuses nesterov without momentum; with μ = 0 the look-ahead step is plain SGD anyway
    ys, final = torch_trajectory(level, state0, k, v, q,
                                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=mu, nesterov=nesterov and mu > 0))
    assert_close(y, ys, "outputs")
    for n, p in final.items():
        assert_close(state[f"memory.{n}"], p, n)


@given(SEEDS, st.integers(1, 20), st.integers(2, 5), st.sampled_from(["reference", "chunked"]))
def test_momentum_scan_closed_form(seed, t, dim, form):
    """With every gradient at M_0 (one mini-batch over the whole sequence), the buffer is the
    closed form S_T = −Σ_i θ_i (Π_{j>i} μ_j) u_i and M_T = M_0 + Σ_t S_t (§7.7)."""
    d = Draw(seed)
    k, v, q = d.unit(1, t, 1, dim), d.normal(1, t, 1, dim), d.normal(1, t, 1, dim)
    theta, mu = d.uniform(1, t, 1, lo=0.1, hi=0.5), d.uniform(1, t, 1, lo=0.0, hi=1.0)
    m0 = d.normal(1, 1, dim, dim)
    level = {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "gradient_point": {"chunk": 64},
             "optimizer": {"kind": "momentum", "lr": {"from": "input"}, "momentum": {"from": "input"}}}
    _, state = run(level, form, keys=k, values=v, queries=q, lr=theta, momentum=mu, state={"memory.w0": m0})
    u = [torch.outer(m0[0, 0] @ k[0, i, 0] - v[0, i, 0], k[0, i, 0]) for i in range(t)]
    s_t = [-sum(theta[0, i, 0] * torch.prod(mu[0, i + 1:s + 1, 0]) * u[i] for i in range(s + 1)) for s in range(t)]
    assert_close(state["optimizer.memory.momentum.w0"][0, 0], s_t[-1], "buffer")
    assert_close(state["memory.w0"][0, 0], m0[0, 0] + sum(s_t), "memory")
