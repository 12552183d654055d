"""The inner ``muon`` optimizer is ``torch.optim.Muon`` step for step (momentum, nesterov,
Newton–Schulz coefficients and steps, weight decay, learning-rate adjustment), token by token on
the memory's own loss — Atlas' inner optimizer (nested-learning-math.md §2.6)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, initial_memories, run, torch_trajectory


@settings(max_examples=10)
@given(SEEDS, st.integers(1, 8), st.sampled_from(["linear", "mlp"]), st.integers(2, 5), st.integers(2, 5),
       st.floats(0.0, 0.95), st.booleans(), st.integers(1, 5), st.sampled_from(["original", "match_rms_adamw"]),
       st.sampled_from([0.0, 0.1]))
def test_inner_muon_is_torch_muon(seed, t, kind, dk, dv, mu, nesterov, steps, adjust, wd):
    d = Draw(seed)
    b, h = 1, 2
    memory = {"kind": "linear"} if kind == "linear" else {"kind": "mlp", "hidden": 3, "activation": "silu"}
    memory["heads"] = h
    level = {"memory": memory, "objective": {"kind": "l2"},
             "optimizer": {"kind": "muon", "lr": 0.05, "momentum": mu, "nesterov": nesterov, "ns_steps": steps,
                           "adjust_lr": adjust, "weight_decay": wd}}
    k, v, q = d.normal(b, t, h, dk), d.normal(b, t, h, dv), d.normal(b, t, h, dk)
    state0 = initial_memories(level, d, b, dk, dv, noise=0.3)
    y, state = run(level, "reference", keys=k, values=v, queries=q, state=state0)
    ys, final = torch_trajectory(level, state0, k, v, q, lambda p: torch.optim.Muon(
        p, lr=0.05, momentum=mu, nesterov=nesterov, ns_steps=steps, adjust_lr_fn=adjust, weight_decay=wd))
    assert_close(y, ys, "outputs")
    for n, p in final.items():
        assert_close(state[f"memory.{n}"], p, n)
