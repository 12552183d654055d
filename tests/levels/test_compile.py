"""``run_level`` traces whole under ``torch.compile(fullgraph=True)`` — the chunked forms and the
reference form alike — and the compiled level equals the eager one, forward and backward."""

import pytest
import torch
from levelcheck import Draw, assert_close, initial_memories

from nlgraph.runtime import run_level
from nlgraph.spec.loader import load_level

CASES = {
    "gated_delta_rule": ({"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                          "optimizer": {"kind": "gd", "lr": {"from": "input"}},
                          "retention": {"kind": "decay", "gate": {"from": "input"}}}, "chunked"),
    "ttt_mlp": ({"memory": {"kind": "mlp", "heads": 2, "hidden": 4, "bias": True}, "objective": {"kind": "l2"},
                 "optimizer": {"kind": "momentum", "lr": {"from": "input"}, "momentum": 0.5},
                 "gradient_point": {"chunk": 3}}, "chunked"),
    "adam_memory": ({"memory": {"kind": "residual_mlp", "heads": 2, "hidden": 3}, "objective": {"kind": "l2"},
                     "optimizer": {"kind": "adam", "lr": {"from": "input"}}}, "reference"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_run_level_compiles_fullgraph(name):
    level, form = CASES[name]
    spec = load_level(level)  # validation (pydantic) happens outside the compiled region
    d = Draw(0)
    b, t, h, dim = 2, 7, 2, 3
    k, v, q = d.unit(b, t, h, dim), d.normal(b, t, h, dim), d.normal(b, t, h, dim)
    gate = d.uniform(b, t, h, lo=0.1, hi=0.9)
    rates = {"lr": gate * 0.3, **({"retention": gate} if "retention" in level else {})}
    state = initial_memories(level, d, b, dim, noise=0.1)

    def step(k, v, q, rates, state):
        y, new = run_level(spec, keys=k, values=v, queries=q, state=state, form=form, **rates)
        return y, new["memory.w0"]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        leaves = [x.clone().requires_grad_() for x in (k, v, q)]
        lr = {n: x.clone().requires_grad_() for n, x in rates.items()}
        st = {n: x.clone().requires_grad_() for n, x in state.items()}
        y, w = fn(*leaves, lr, st)
        grads = torch.autograd.grad(y.square().sum() + w.sum(), [*leaves, *lr.values(), *st.values()])
        results.append((y, w, grads))
    (y1, w1, g1), (y2, w2, g2) = results
    assert_close(y2, y1, "outputs")
    assert_close(w2, w1, "state")
    for a, b_ in zip(g1, g2):
        assert_close(b_, a, "gradient")
