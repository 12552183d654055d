"""``kind: linear_attention``: the loop-free chunked form equals the per-token rule on outputs,
final state and gradients, for any chunk size, normalised or not, and continued from a state."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from nlgraph.compilers.linear_attention import EPS
from nlgraph.runtime import run_level
from nlgraph.spec.loader import load_level

PLAIN = load_level({"kind": "linear_attention", "heads": 2})
NORMALISED = load_level({"kind": "linear_attention", "heads": 2, "normalize": True})


def _inputs(seed, b, t, dk, dv):
    g = torch.Generator().manual_seed(seed)
    # positive features, as φ = 1 + ELU gives, so the normaliser stays away from 0
    k, q = torch.rand(b, t, 2, dk, generator=g) + 0.1, torch.rand(b, t, 2, dk, generator=g) + 0.1
    return k, torch.randn(b, t, 2, dv, generator=g), q


def _state(spec, b, dk, dv, seed=1):
    g = torch.Generator().manual_seed(seed)
    st_ = {"memory": torch.randn(b, 2, dv, dk, generator=g), "position": torch.zeros((), dtype=torch.int64)}
    if spec.normalize:
        st_["normalizer"] = torch.rand(b, 2, dk, generator=g)
    return st_


@given(st.integers(0, 2**31 - 1), st.integers(1, 2), st.integers(1, 40), st.integers(1, 5),
       st.integers(1, 5), st.integers(1, 17), st.booleans())
def test_chunked_equals_reference_and_attention_form(seed, b, t, dk, dv, chunk, normalize):
    spec = NORMALISED if normalize else PLAIN
    k, v, q = _inputs(seed, b, t, dk, dv)
    s0 = _state(spec, b, dk, dv)
    y_ref, st_ref = run_level(spec, keys=k, values=v, queries=q, state=s0, form="reference")
    # the attention form: y_t = S_0 q_t + Σ_{s≤t} (q_t·k_s) v_s  (over its normaliser)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    num = torch.einsum("bhts,bshd->bthd", scores, v) + torch.einsum("bhvk,bthk->bthv", s0["memory"], q)
    if normalize:
        den = scores.sum(-1).transpose(1, 2) + torch.einsum("bhk,bthk->bth", s0["normalizer"], q)
        num = num / (den.unsqueeze(-1) + EPS)
    torch.testing.assert_close(y_ref, num, rtol=1e-10, atol=1e-10)
    y, st_ch = run_level(spec, keys=k, values=v, queries=q, state=s0, form="chunked", chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for key in st_ref:
        torch.testing.assert_close(st_ch[key], st_ref[key], rtol=1e-10, atol=1e-10)


@given(st.integers(0, 2**31 - 1), st.integers(2, 30), st.integers(1, 9), st.booleans())
def test_gradients_match_the_reference(seed, t, chunk, normalize):
    spec = NORMALISED if normalize else PLAIN
    base = [*_inputs(seed, 2, t, 3, 4)]
    s0 = _state(spec, 2, 3, 4)
    grads = {}
    for form in ("reference", "chunked"):
        leaves = [x.clone().requires_grad_() for x in base]
        state = {n: (x.clone().requires_grad_() if x.is_floating_point() else x) for n, x in s0.items()}
        y, out = run_level(spec, keys=leaves[0], values=leaves[1], queries=leaves[2], state=state,
                           form=form, chunk_size=chunk)
        w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        ((y * w).sum() + out["memory"].square().sum()).backward()
        grads[form] = [x.grad for x in leaves] + [state["memory"].grad]
    for a, b in zip(grads["reference"], grads["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@given(st.integers(0, 2**31 - 1), st.integers(2, 30), st.data())
def test_segments_continue_one_pass(seed, t, data):
    split = data.draw(st.integers(1, t - 1))
    k, v, q = _inputs(seed, 1, t, 3, 3)
    full, st_full = run_level(NORMALISED, keys=k, values=v, queries=q, form="chunked", chunk_size=4)
    a, st_a = run_level(NORMALISED, keys=k[:, :split], values=v[:, :split], queries=q[:, :split],
                        form="chunked", chunk_size=4)
    b, st_b = run_level(NORMALISED, keys=k[:, split:], values=v[:, split:], queries=q[:, split:],
                        state=st_a, form="chunked", chunk_size=4)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st_b["memory"], st_full["memory"])
    torch.testing.assert_close(st_b["normalizer"], st_full["normalizer"])
