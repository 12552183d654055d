"""Triton kernels of the causal depthwise short convolution with a fused activation.

``x [B, T, C]`` token-major (the layout the projections produce, so no transpose is copied), the
weight ``w [C, K]`` in float32, an optional state ``s [B, K−1, C]`` (the previous segment's last
inputs). With ``x̃`` the concatenation of ``s`` (zeros without one) and ``x``::

    a[t, c] = Σ_j w[c, j] · x̃[t + j, c],      y = act(a)        (act: identity or SiLU)

Forward: one program per (token block, channel block, batch). Backward: ``_conv_da`` recomputes
``a``, forms ``da = dy · act'(a)`` and each program's partial sums of ``dw`` (summed in PyTorch, so
the result does not depend on scheduling); ``_conv_dx`` then gives ``dx[t] = Σ_j w[c, j] da[t + K−1−j]``.
Or both in one pass (``_conv_bwd``, ``NLGRAPH_CONV_BWD=fused``), ``da`` made again for the ``K−1``
rows after a block instead of written and read back.
Accumulation is float32 whatever the input dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._delta_rule_triton import INTERPRETED

__all__ = ["INTERPRETED", "kernels"]


@triton.jit
def _shifted(x, s, i_b, t, c, cm, T, C, K: tl.constexpr, j: tl.constexpr, USE_S: tl.constexpr):
    """``x̃[t + j]`` for a block of rows ``t`` and channels ``c``, in float32 (zeros before the start)."""
    src = t - (K - 1 - j)
    inside = (src >= 0) & (src < T)
    v = tl.load(x + (i_b * T + src)[:, None] * C + c[None, :], mask=inside[:, None] & cm[None, :], other=0.)
    v = v.to(tl.float32)
    if USE_S:
        si = src + (K - 1)
        early = (src < 0) & (si >= 0)
        v += tl.load(s + (i_b * (K - 1) + si)[:, None] * C + c[None, :], mask=early[:, None] & cm[None, :],
                     other=0.).to(tl.float32)
    return v


@triton.jit
def _pre(x, w, s, i_b, t, c, cm, T, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
         USE_S: tl.constexpr):
    a = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        wj = tl.load(w + c * K + j, mask=cm, other=0.).to(tl.float32)
        a += _shifted(x, s, i_b, t, c, cm, T, C, K, j, USE_S) * wj[None, :]
    return a


@triton.jit
def _conv_fwd(x, w, s, y, T, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr,
              USE_S: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    cm = c < C
    a = _pre(x, w, s, i_b, t, c, cm, T, C, K, BT, BC, USE_S)
    if SILU:
        a = a * tl.sigmoid(a)
    tl.store(y + (i_b * T + t)[:, None] * C + c[None, :], a.to(y.dtype.element_ty),
             mask=(t < T)[:, None] & cm[None, :])


@triton.jit
def _conv_da(x, w, s, dy, da, dwp, T, C, NT, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
             SILU: tl.constexpr, USE_S: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    cm = c < C
    m = (t < T)[:, None] & cm[None, :]
    g = tl.load(dy + (i_b * T + t)[:, None] * C + c[None, :], mask=m, other=0.).to(tl.float32)
    if SILU:
        a = _pre(x, w, s, i_b, t, c, cm, T, C, K, BT, BC, USE_S)
        sg = tl.sigmoid(a)
        g = g * sg * (1. + a * (1. - sg))
    tl.store(da + (i_b * T + t)[:, None] * C + c[None, :], g, mask=m)
    part = (i_b * NT + i_t) * C * K
    for j in tl.static_range(K):
        xj = _shifted(x, s, i_b, t, c, cm, T, C, K, j, USE_S)
        tl.store(dwp + part + c * K + j, tl.sum(g * xj, axis=0), mask=cm)


@triton.jit
def _conv_bwd(x, w, s, dy, dx, dwp, dah, T, C, NT, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
              SILU: tl.constexpr, USE_S: tl.constexpr):
    """``_conv_da`` and ``_conv_dx`` in one pass, ``da`` never written: a block's ``dx`` needs
    ``da`` at its rows and the ``K−1`` after them, which it makes again from ``dy`` and ``x`` (each
    shift's ``a`` recomputed: ``K²`` tile loads of ``x``, meant to come from the cache, against a float32
    ``[B, T, C]`` written and read back). ``dah [B, K−1, C]``: ``da`` of the first ``K−1`` rows,
    for the state's gradient."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    cm = c < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for sh in tl.static_range(K):
        ts = t + sh
        g = tl.load(dy + (i_b * T + ts)[:, None] * C + c[None, :], mask=(ts < T)[:, None] & cm[None, :],
                    other=0.).to(tl.float32)
        if SILU:
            a = _pre(x, w, s, i_b, ts, c, cm, T, C, K, BT, BC, USE_S)
            sg = tl.sigmoid(a)
            g = g * sg * (1. + a * (1. - sg))
        if sh == 0:
            part = (i_b * NT + i_t) * C * K
            for j in tl.static_range(K):
                xj = _shifted(x, s, i_b, t, c, cm, T, C, K, j, USE_S)
                tl.store(dwp + part + c * K + j, tl.sum(g * xj, axis=0), mask=cm)
            if USE_S:
                tl.store(dah + (i_b * (K - 1) + t)[:, None] * C + c[None, :], g,
                         mask=(t < K - 1)[:, None] & cm[None, :])
        # dx[t] = Σ_j w[c, j] · da[t + K−1−j], here j = K−1−sh
        wj = tl.load(w + c * K + (K - 1 - sh), mask=cm, other=0.).to(tl.float32)
        acc += g * wj[None, :]
    tl.store(dx + (i_b * T + t)[:, None] * C + c[None, :], acc.to(dx.dtype.element_ty),
             mask=(t < T)[:, None] & cm[None, :])


@triton.jit
def _conv_dx(da, w, dx, T, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    cm = c < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        wj = tl.load(w + c * K + j, mask=cm, other=0.).to(tl.float32)
        dst = t + (K - 1 - j)
        g = tl.load(da + (i_b * T + dst)[:, None] * C + c[None, :], mask=(dst < T)[:, None] & cm[None, :], other=0.)
        acc += g * wj[None, :]
    tl.store(dx + (i_b * T + t)[:, None] * C + c[None, :], acc.to(dx.dtype.element_ty),
             mask=(t < T)[:, None] & cm[None, :])


class _Kernels:
    fwd = _conv_fwd
    da = _conv_da
    dx = _conv_dx
    bwd = _conv_bwd


def kernels() -> type[_Kernels]:
    """The kernels (compiled on the GPU; interpreted when ``TRITON_INTERPRET=1`` was set before triton
    was first imported)."""
    return _Kernels
