"""Softmax attention is the non-parametric Nadaraya–Watson minimiser of a weighted L2 regression
over the stored pairs; a window restricts it to the last c tokens (arXiv Eqs. 62–63; TTT Theorem 2;
nested-learning-math.md §2.9, §7.14)."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close, assert_states_close, run


@given(SEEDS, st.integers(1, 16), st.integers(2, 6), st.one_of(st.none(), st.integers(1, 6)))
def test_softmax_attention_is_nadaraya_watson_minimiser(seed, t, dim, window):
    d = Draw(seed)
    level = {"kind": "attention", "heads": 2, "window": window}
    k, v, q = d.normal(1, t, 2, dim), d.normal(1, t, 2, dim), d.normal(1, t, 2, dim)
    y, _ = run(level, "chunked", keys=k, values=v, queries=q)
    for i in range(t):
        lo = 0 if window is None else max(0, i + 1 - window)
        for h in range(2):
            s = torch.exp(k[0, lo:i + 1, h] @ q[0, i, h] / math.sqrt(dim))  # kernel weights
            # argmin_m Σ s_j ‖v_j − m‖²: a weighted least-squares problem with a constant design
            design = s.sqrt()[:, None]
            m = torch.linalg.lstsq(design, s.sqrt()[:, None] * v[0, lo:i + 1, h]).solution[0]
            assert_close(y[0, i, h], m, f"token {i} head {h}")
            # and the output is a stationary point of the regression: Σ s_j (m − v_j) = 0
            assert_close((s[:, None] * (y[0, i, h] - v[0, lo:i + 1, h])).sum(0), torch.zeros(dim), "stationarity")


@given(SEEDS, st.integers(1, 20), st.integers(2, 5), st.one_of(st.none(), st.integers(1, 7)), st.sampled_from([1, 2]),
       st.integers(0, 20))
def test_attention_forms_agree_and_continue(seed, t, dim, window, kv_heads, cut):
    d = Draw(seed)
    cut = min(cut, t)
    level = {"kind": "attention", "heads": 2, "kv_heads": kv_heads, "window": window}
    k, v, q = d.normal(2, t, kv_heads, dim), d.normal(2, t, kv_heads, dim), d.normal(2, t, 2, dim)
    y_ref, s_ref = run(level, "reference", keys=k, values=v, queries=q)
    y_par, s_par = run(level, "chunked", keys=k, values=v, queries=q)
    assert_close(y_ref, y_par, "forms")
    assert_states_close(s_ref, s_par)
    y1, s1 = run(level, "chunked", keys=k[:, :cut], values=v[:, :cut], queries=q[:, :cut])
    y2, s2 = run(level, "reference", keys=k[:, cut:], values=v[:, cut:], queries=q[:, cut:], state=s1)
    assert_close(torch.cat([y1, y2], 1), y_ref, "split")
    assert_states_close(s2, s_ref)
