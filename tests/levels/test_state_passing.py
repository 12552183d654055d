"""Continuing a sequence: running [0, t) and then [t, T) with the returned state equals running
[0, T) at once, for any split t — mid-chunk and mid-period splits included — and across forms."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, assert_states_close, initial_memories, run

from nlgraph.runtime import level_form
from nlgraph.spec.loader import load_level

LEVELS = {
    "gated_delta_momentum": {"memory": {"kind": "linear"}, "objective": {"kind": "l2"},
                             "optimizer": {"kind": "momentum", "lr": {"from": "input"}, "momentum": 0.6},
                             "retention": {"kind": "decay", "gate": {"from": "input"}}},
    "hope_form_dgd": {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "read": "before_write",
                      "optimizer": {"kind": "dgd", "form": "proximal", "lr": {"from": "input"}},
                      "retention": {"kind": "weight_decay", "gate": {"from": "input", "per": "channel"}}},
    "ttt_mlp": {"memory": {"kind": "mlp", "hidden": 4, "bias": True}, "objective": {"kind": "l2"},
                "optimizer": {"kind": "gd", "lr": {"from": "input"}}, "gradient_point": {"chunk": 4}},
    "titans_momentum": {"memory": {"kind": "residual_mlp", "hidden": 3}, "objective": {"kind": "huber", "delta": 0.5},
                        "optimizer": {"kind": "momentum", "lr": {"from": "input"}, "momentum": 0.8},
                        "retention": {"kind": "weight_decay", "gate": {"from": "input"}}, "gradient_point": {"chunk": 3}},
    "cms": {"memory": {"kind": "mlp", "hidden": "2x", "activation": "swiglu"}, "objective": {"kind": "l2"},
            "optimizer": {"kind": "gd", "lr": {"from": "input"}}, "frequency": 3},
    "cms_long_chunk": {"memory": {"kind": "mlp", "hidden": 3}, "objective": {"kind": "l2"},
                       "optimizer": {"kind": "momentum", "lr": {"from": "input"}, "momentum": 0.5},
                       "frequency": 2, "gradient_point": {"chunk": 6}},
    "adam": {"memory": {"kind": "mlp", "hidden": 3}, "objective": {"kind": "l2"}, "optimizer": {"kind": "adam", "lr": 0.02}},
    "self_modifying": {"memory": {"kind": "residual_mlp", "hidden": "2x"}, "objective": {"kind": "l2"},
                       "optimizer": {"kind": "dgd", "lr": {"from": "adaptive.eta", "scale": 0.1}, "momentum": 0.5},
                       "retention": {"kind": "weight_decay", "gate": {"from": "adaptive.alpha", "bias": 3.0}},
                       "adaptive": {"k": {"kind": "linear"}, "v": {"kind": "linear"},
                                    "eta": {"kind": "linear"}, "alpha": {"kind": "linear"}},
                       "keys": {"from": "adaptive.k", "norm": "l2"}, "values": {"from": "adaptive.v", "self_target": True},
                       "read": "before_write", "gradient_point": {"chunk": 4}},
}


def _forms(level) -> list[str]:
    return ["reference", "chunked"] if level_form(level) == "chunked" else ["reference"]


@given(SEEDS, st.sampled_from(sorted(LEVELS)), st.integers(1, 18), st.data())
def test_state_passing_splits(seed, name, t, data):
    level = LEVELS[name]
    d = Draw(seed)
    b, h, dim = 2, 1, 3
    spec = load_level(level)
    x = {"keys": d.unit(b, t, h, dim), "values": d.normal(b, t, h, dim), "queries": d.unit(b, t, h, dim)}
    if spec.adaptive:
        x["values"] = x["keys"]
    else:
        x["lr"] = d.uniform(b, t, h, lo=0.05, hi=0.3)
        if spec.retention is not None:
            per = spec.retention.gate.per
            x["retention"] = d.uniform(b, t, h, *([dim] if per == "channel" else []), lo=0.5, hi=1.0)
    state0 = initial_memories(level, d, b, dim, noise=0.1)
    forms = _forms(level)
    whole, final = run(level, "reference", **x, state=state0)
    # two or three segments, each in a drawn form
    cuts = sorted(data.draw(st.lists(st.integers(0, t), min_size=1, max_size=2)))
    bounds = [0, *cuts, t]
    state, outs = state0, []
    for s, e in zip(bounds, bounds[1:]):
        form = data.draw(st.sampled_from(forms))
        y, state = run(level, form, **{k: v[:, s:e] for k, v in x.items()}, state=state)
        outs.append(y)
    assert_close(torch.cat(outs, 1), whole, "outputs")
    assert_states_close(state, final)
    assert int(state["position"]) == t
