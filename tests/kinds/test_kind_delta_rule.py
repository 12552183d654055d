"""``kind: delta_rule``: the chunked WY / UT form equals the per-token rule on outputs, final state
and gradients, for any chunk size, with and without decay, and continued from a state."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nlgraph.runtime import level_form, run_level
from nlgraph.spec.loader import load_level
from nlgraph.errors import SpecError

RULE = load_level({"kind": "delta_rule", "heads": 2})
GATED = load_level({"kind": "delta_rule", "heads": 2, "decay": {"act": "logsigmoid"}})


def _inputs(seed, b, t, h, dk, dv, gated):
    g = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(b, t, h, dk, generator=g), dim=-1)
    v, q = torch.randn(b, t, h, dv, generator=g), torch.randn(b, t, h, dk, generator=g)
    beta = 0.05 + 0.9 * torch.rand(b, t, h, generator=g)
    alpha = (0.5 + 0.5 * torch.rand(b, t, h, generator=g)) if gated else None
    s0 = torch.randn(b, h, dv, dk, generator=g) * 0.5
    return k, v, q, beta, alpha, s0


def _rule_by_hand(k, v, q, beta, alpha, s0):
    """S_t = α_t S_{t−1}(I − β_t k kᵀ) + β_t v kᵀ as a product with the (I − β k kᵀ) matrix."""
    eye = torch.eye(k.shape[-1])
    s, ys = s0, []
    for t in range(k.shape[1]):
        kk, bb = k[:, t], beta[:, t, :, None, None]
        a = alpha[:, t, :, None, None] if alpha is not None else 1.0
        s = a * s @ (eye - bb * kk.unsqueeze(-1) * kk.unsqueeze(-2)) + bb * v[:, t].unsqueeze(-1) * kk.unsqueeze(-2)
        ys.append((s @ q[:, t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys, 1), s


def _state(s0):
    return {"memory": s0, "position": torch.zeros((), dtype=torch.int64)}


@given(st.integers(0, 2**31 - 1), st.integers(1, 2), st.integers(1, 40), st.integers(2, 5),
       st.integers(2, 5), st.integers(1, 17), st.booleans())
def test_chunked_equals_reference_and_the_rule(seed, b, t, dk, dv, chunk, gated):
    spec = GATED if gated else RULE
    k, v, q, beta, alpha, s0 = _inputs(seed, b, t, 2, dk, dv, gated)
    y_ref, st_ref = run_level(spec, keys=k, values=v, queries=q, lr=beta, retention=alpha,
                              state=_state(s0), form="reference")
    y_hand, s_hand = _rule_by_hand(k, v, q, beta, alpha, s0)
    torch.testing.assert_close(y_ref, y_hand, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st_ref["memory"], s_hand, rtol=1e-10, atol=1e-10)
    y, st_ch = run_level(spec, keys=k, values=v, queries=q, lr=beta, retention=alpha,
                         state=_state(s0), form="chunked", chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(st_ch["memory"], st_ref["memory"], rtol=1e-9, atol=1e-9)
    assert int(st_ch["position"]) == t


@given(st.integers(0, 2**31 - 1), st.integers(2, 30), st.integers(1, 9), st.booleans())
def test_gradients_match_the_reference(seed, t, chunk, gated):
    spec = GATED if gated else RULE
    tensors = [x for x in _inputs(seed, 2, t, 2, 3, 4, gated) if x is not None]
    grads = {}
    for form in ("reference", "chunked"):
        leaves = [x.clone().requires_grad_() for x in tensors]
        k, v, q, beta = leaves[:4]
        alpha = leaves[4] if gated else None
        s0 = leaves[-1]
        y, st_out = run_level(spec, keys=k, values=v, queries=q, lr=beta, retention=alpha,
                              state=_state(s0), form=form, chunk_size=chunk)
        w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        ((y * w).sum() + st_out["memory"].square().sum()).backward()
        grads[form] = [x.grad for x in leaves]
    for a, b in zip(grads["reference"], grads["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@given(st.integers(0, 2**31 - 1), st.integers(2, 30), st.data())
def test_segments_continue_one_pass(seed, t, data):
    split = data.draw(st.integers(1, t - 1))
    k, v, q, beta, alpha, s0 = _inputs(seed, 1, t, 2, 3, 3, True)
    full, st_full = run_level(GATED, keys=k, values=v, queries=q, lr=beta, retention=alpha, form="chunked",
                              chunk_size=4)
    a, st_a = run_level(GATED, keys=k[:, :split], values=v[:, :split], queries=q[:, :split],
                        lr=beta[:, :split], retention=alpha[:, :split], form="chunked", chunk_size=4)
    b, st_b = run_level(GATED, keys=k[:, split:], values=v[:, split:], queries=q[:, split:],
                        lr=beta[:, split:], retention=alpha[:, split:], state=st_a, form="chunked",
                        chunk_size=4)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st_b["memory"], st_full["memory"], rtol=1e-10, atol=1e-10)


def test_constant_rates_and_form_choice():
    spec = load_level({"kind": "delta_rule", "heads": 1, "beta": 0.5, "decay": 0.9})
    k, v, q, _, _, s0 = _inputs(0, 1, 5, 1, 2, 2, False)
    y, _ = run_level(spec, keys=k, values=v, queries=q, state=_state(s0), form="chunked", chunk_size=2)
    y_hand, _ = _rule_by_hand(k, v, q, torch.full((1, 5, 1), 0.5), torch.full((1, 5, 1), 0.9), s0)
    torch.testing.assert_close(y, y_hand)
    assert level_form(spec) == "chunked"
    with pytest.raises(ValueError, match="beta is a data-dependent gate"):
        run_level(RULE, keys=k, values=v, queries=q, form="chunked")


def test_per_channel_rates_are_refused_with_the_fix():
    with pytest.raises(SpecError, match="per head or scalar"):
        load_level({"kind": "delta_rule", "decay": {"per": "channel"}})
