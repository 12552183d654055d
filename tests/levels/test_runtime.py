"""The ``run_level`` contract: spec forms, form selection, fallback warning, clear errors, gate
broadcasting, state validation, dtypes and determinism."""

import warnings

import pytest
import torch

from nlgraph.runtime import init_state, level_form, run_level
from nlgraph.spec.loader import load_level

GDN_YAML = """
memory: {kind: linear, heads: 2}
objective: {kind: l2}
optimizer: {kind: gd, lr: {from: input, act: sigmoid}}
retention: {kind: decay, gate: {from: input, act: logsigmoid}}
"""


def _data(b=2, t=7, h=2, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(b, t, h, d, generator=g), dim=-1)
    return k, torch.randn(b, t, h, d, generator=g), torch.randn(b, t, h, d, generator=g), torch.rand(b, t, h, generator=g)


def test_spec_object_dict_and_yaml_agree():
    k, v, q, gate = _data()
    spec = load_level(GDN_YAML)
    outs = [run_level(s, keys=k, values=v, queries=q, lr=gate, retention=gate)[0]
            for s in (spec, spec.model_dump(by_alias=True), GDN_YAML)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_auto_picks_chunked_silently_when_it_exists():
    k, v, q, gate = _data()
    assert level_form(GDN_YAML) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_auto, _ = run_level(GDN_YAML, keys=k, values=v, queries=q, lr=gate, retention=gate)
    y_chunked, _ = run_level(GDN_YAML, keys=k, values=v, queries=q, lr=gate, retention=gate, form="chunked")
    assert torch.equal(y_auto, y_chunked)


def test_auto_falls_back_to_reference_with_one_warning():
    level = {"memory": {"kind": "mlp", "hidden": 4}, "objective": {"kind": "l2"}, "optimizer": {"kind": "gd", "lr": 0.1}}
    k, v, q, _ = _data(h=1)
    assert level_form(level) == "reference"
    with pytest.warns(UserWarning, match="no parallel form") as record:
        y, _ = run_level(level, keys=k, values=v, queries=q)
    assert len(record) == 1
    assert torch.equal(y, run_level(level, keys=k, values=v, queries=q, form="reference")[0])


def test_chunked_refuses_exact_online_deep_memory():
    level = {"memory": {"kind": "residual_mlp"}, "objective": {"kind": "l2"}}
    k, v, q, _ = _data(h=1)
    with pytest.raises(ValueError, match="exact-online residual_mlp memory .* no parallel form"):
        run_level(level, keys=k, values=v, queries=q, form="chunked")
    with pytest.raises(ValueError, match="exact-online adam memory .* sequential"):
        run_level({**level, "optimizer": {"kind": "adam"}}, keys=k, values=v, queries=q, form="chunked")
    with pytest.raises(ValueError, match="deep_momentum optimizer"):
        run_level({**level, "optimizer": {"kind": "deep_momentum", "level": {"memory": {"kind": "linear"}}},
                   "gradient_point": {"chunk": 4}}, keys=k, values=v, queries=q, form="chunked")


@pytest.mark.parametrize(
    ("level", "kwargs", "message"),
    [
        (GDN_YAML, {"retention": 0.9}, "lr: the level declares a data-dependent gate"),
        (GDN_YAML, {"lr": 0.5, "retention": 0.9, "momentum": 0.5}, "has no momentum gate"),
        (GDN_YAML, {"lr": 0.5, "retention": 0.9, "form": "fast"}, "form must be .auto. or a form registered"),
        (GDN_YAML, {"lr": torch.ones(2, 7, 3), "retention": 0.9}, r"expected \[B, T, H\]"),
        (GDN_YAML, {"lr": 0.5, "retention": 0.9, "state": {"memory.W": torch.zeros(2, 2, 3, 3)}}, "unknown entries"),
        (GDN_YAML, {"lr": 0.5, "retention": 0.9, "state": {"memory.w0": torch.zeros(2, 2, 3)}}, "expected shape"),
        ({"memory": {"kind": "mlp", "heads": 2}, "retention": {"kind": "decay"}},
         {"retention": torch.ones(2, 7, 2, 3)}, "per-channel gate decays the key channels"),
        ({"memory": {"kind": "linear", "heads": 3}}, {}, "3 heads but the tensors have H = 2"),
        ({"memory": {"kind": "mlp", "heads": 2, "bias": True}, "optimizer": {"kind": "muon"}}, {},
         "set the memory's bias: false"),
        ({"memory": {"kind": "linear", "heads": 2}}, {"retention": 0.5}, "has no retention"),
        ({"kind": "chain", "levels": [{"memory": {"kind": "mlp"}, "objective": {"kind": "outer"}}]}, {}, "one level"),
        ({"memory": {"kind": "linear", "heads": 2, "d_key": 4}}, {}, "d_key is 4"),
    ],
)
def test_clear_errors(level, kwargs, message):
    k, v, q, _ = _data()
    with pytest.raises(ValueError, match=message):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_level(level, keys=k, values=v, queries=q, **kwargs)


def test_adaptive_gate_needs_an_input():
    level = {"memory": {"kind": "linear", "heads": 2}, "adaptive": {"eta": {"kind": "linear"}},
             "optimizer": {"kind": "gd", "lr": {"from": "adaptive.eta"}}}
    k, v, q, _ = _data()
    with pytest.raises(ValueError, match="pass its input x"):
        run_level(level, keys=k, values=v, queries=q, form="reference")
    y, state = run_level(level, keys=k, values=v, queries=q, lr=k, form="reference")
    assert y.shape == v.shape and "adaptive.eta.w0" in state


def test_gates_broadcast_from_scalars_and_per_token_tensors():
    k, v, q, gate = _data()
    full = run_level(GDN_YAML, keys=k, values=v, queries=q, lr=torch.full((2, 7, 2), 0.4), retention=gate)[0]
    assert torch.equal(run_level(GDN_YAML, keys=k, values=v, queries=q, lr=0.4, retention=gate)[0], full)
    per_token = gate[..., :1]  # [B, T, 1]: one value for every head
    a = run_level(GDN_YAML, keys=k, values=v, queries=q, lr=0.4, retention=per_token)[0]
    b = run_level(GDN_YAML, keys=k, values=v, queries=q, lr=0.4, retention=per_token.expand(2, 7, 2))[0]
    assert torch.equal(a, b)


def test_default_state_is_deterministic_and_graph_free():
    level = {"memory": {"kind": "mlp", "hidden": 4}, "objective": {"kind": "l2"}, "gradient_point": {"chunk": 3}}
    k, v, q, _ = _data(h=1)
    y1, s1 = run_level(level, keys=k, values=v, queries=q)
    y2, s2 = run_level(level, keys=k, values=v, queries=q)
    assert torch.equal(y1, y2) and all(torch.equal(s1[n], s2[n]) for n in s1)
    assert not y1.requires_grad and not any(s.requires_grad for s in s1.values())
    y3, _ = run_level(level, keys=k.requires_grad_(), values=v, queries=q)
    assert y3.requires_grad


def test_dtype_follows_the_inputs():
    k, v, q, gate = (x.float() for x in _data())
    for form in ("reference", "chunked"):
        y, state = run_level(GDN_YAML, keys=k, values=v, queries=q, lr=gate, retention=gate, form=form)
        assert y.dtype == torch.float32 and state["memory.w0"].dtype == torch.float32


def test_static_level_reads_its_initial_state():
    """``frequency: never``: the output is the initial memory read at the queries, written out
    here as ``W1 gelu(W0 q)`` (exact GELU), for a given initial state and for the default one."""
    level = {"memory": {"kind": "mlp", "hidden": 4, "depth": 2, "activation": "gelu", "bias": False},
             "objective": {"kind": "l2"}, "frequency": "never"}
    k, v, q, _ = _data(h=1)
    g = torch.Generator().manual_seed(1)
    given = {"memory.w0": torch.randn(2, 1, 4, 3, generator=g), "memory.w1": torch.randn(2, 1, 3, 4, generator=g)}
    default = init_state(load_level(level), batch=2, d_key=3, d_value=3)
    for state in (given, None):
        params = given if state is not None else default
        z = torch.einsum("bhoi,bthi->btho", params["memory.w0"], q)
        expected = torch.einsum("bhoi,bthi->btho", params["memory.w1"], z * 0.5 * (1 + torch.erf(z / 2**0.5)))
        for form in ("reference", "chunked"):
            y, out = run_level(level, keys=k, values=v, queries=q, state=state, form=form)
            torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-14)
            for n in ("memory.w0", "memory.w1"):
                assert torch.equal(out[n], params[n])
            assert int(out["position"]) == 7


def test_queries_default_to_keys_for_an_outer_level():
    level = {"memory": {"kind": "mlp", "hidden": 4}, "objective": {"kind": "outer"}, "frequency": 4}
    k, u, _, _ = _data(h=1)
    assert torch.equal(run_level(level, keys=k, values=u, queries=None)[0],
                       run_level(level, keys=k, values=u, queries=k)[0])


def test_a_carried_state_is_taken_whole_not_rebuilt():
    """A level called segment after segment gets its whole state back: ``init_state`` takes the
    given anchor and optimizer buffers as they are (on a GPU each rebuilt entry would be a fill or
    copy launched per call, then thrown away), and builds only what is missing."""
    level = load_level({"memory": {"kind": "mlp", "hidden": 4}, "objective": {"kind": "l2"},
                        "optimizer": {"kind": "momentum", "lr": 0.1, "momentum": 0.9},
                        "gradient_point": {"chunk": 3}})
    full = init_state(level, batch=2, d_key=3, d_value=3)
    assert any(k.startswith("anchor.") for k in full) and any(k.startswith("optimizer.") for k in full)
    given = {k: v + 1 for k, v in full.items()}
    again = init_state(level, batch=2, d_key=3, d_value=3, given=given)
    assert all(again[k] is given[k] for k in full if k != "position")
    # without the buffers (a fresh sequence from given weights): zeros, and the anchor is rebuilt
    weights = {k: v for k, v in given.items() if k.startswith("memory.")}
    fresh = init_state(level, batch=2, d_key=3, d_value=3, given=weights)
    for k, v in fresh.items():
        if k.startswith("optimizer."):
            assert v is not given[k] and not v.any()
        elif k.startswith("anchor."):
            assert torch.equal(v, weights[k[len("anchor."):]]) and v is not given[k]


def test_a_given_entry_that_is_not_a_tensor_is_still_taken_as_before():
    """A caller may give a buffer as a number (an adam step count): ``init_state`` builds that
    slot's buffers and the state merge converts the number, as it did before entries were reused."""
    level = {"memory": {"kind": "mlp", "hidden": 4}, "objective": {"kind": "l2"},
             "optimizer": {"kind": "adam", "lr": 0.01}, "gradient_point": {"chunk": 3}}
    full = init_state(load_level(level), batch=2, d_key=3, d_value=3)
    given = {**full, "optimizer.memory.step": 3}
    built = init_state(load_level(level), batch=2, d_key=3, d_value=3, given=given)
    assert built["optimizer.memory.step"].dtype == torch.int64
    k, v, q, _ = _data(h=1)
    y, out = run_level(level, keys=k, values=v, queries=q, state=given)
    assert int(out["optimizer.memory.step"]) > 3 and torch.isfinite(y).all()
