"""Triton kernels of the causal depthwise short convolution with a fused activation.

``x [B, T, C]`` token-major (the layout the projections produce, so no transpose is copied), the
weight ``w [C, K]`` in float32, an optional state ``s [B, K−1, C]`` (the previous segment's last
inputs). With ``x̃`` the concatenation of ``s`` (zeros without one) and ``x``::

    a[t, c] = Σ_j w[c, j] · x̃[t + j, c],      y = act(a)        (act: identity or SiLU)

and, with ``L2 = D > 0``, each head's ``D`` channels of ``y`` divided by their norm as
``F.normalize(y, dim=-1, eps=1e-6)`` does (``y / max(‖y‖, eps)``; a channel block holds whole heads),
so a stream's key or query normalisation costs no pass of its own, forward or backward.

Forward: one program per (token block, channel block, batch). Backward: ``_conv_da`` recomputes
``a``, forms ``da = dy · act'(a)`` (``dy`` taken back through the norm first, with ``L2``) and each
program's partial sums of ``dw`` from it in float32 (added with atomics, or stored for PyTorch to
sum so the result does not depend on scheduling: ``short_conv._DW``), and stores ``da`` in the 16-bit input dtype (float32 for float32 inputs): it
is written once and read once, by ``_conv_dx``, which gives ``dx[t] = Σ_j w[c, j] da[t + K−1−j]``.
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
def _l2(y, BT: tl.constexpr, BC: tl.constexpr, D: tl.constexpr):
    """``y [BT, BC]`` as ``[BT, BC/D, D]`` heads: (the heads, ``1 / max(‖y‖, eps)`` a head,
    whether ``‖y‖ ≥ eps``)."""
    y3 = tl.reshape(y, (BT, BC // D, D))
    nrm = tl.sqrt(tl.sum(y3 * y3, axis=2))
    return y3, 1. / tl.maximum(nrm, 1e-6), nrm >= 1e-6


@triton.jit
def _conv_fwd(x, w, s, y, T, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr,
              USE_S: tl.constexpr, L2: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    cm = c < C
    a = _pre(x, w, s, i_b, t, c, cm, T, C, K, BT, BC, USE_S)
    if SILU:
        a = a * tl.sigmoid(a)
    if L2 > 0:
        a3, r, _ = _l2(a, BT, BC, L2)
        a = tl.reshape(a3 * r[:, :, None], (BT, BC))
    tl.store(y + (i_b * T + t)[:, None] * C + c[None, :], a.to(y.dtype.element_ty),
             mask=(t < T)[:, None] & cm[None, :])


@triton.jit
def _conv_da(x, w, s, dy, da, dwp, sp, sc, T, C, NT, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
             SILU: tl.constexpr, USE_S: tl.constexpr, L2: tl.constexpr, ATOMIC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    cm = c < C
    m = (t < T)[:, None] & cm[None, :]
    g = tl.load(dy + (i_b * T + t)[:, None] * C + c[None, :], mask=m, other=0.).to(tl.float32)
    if SILU or L2 > 0:
        a = _pre(x, w, s, i_b, t, c, cm, T, C, K, BT, BC, USE_S)
        y = a
        if SILU:
            sg = tl.sigmoid(a)
            y = a * sg
        if L2 > 0:
            # dy is the normalised output's gradient: through y / max(‖y‖, eps) first,
            # r (g − n (g·n)) while ‖y‖ ≥ eps (clamp_min's gradient mask), r g below
            y3, r, big = _l2(y, BT, BC, L2)
            n3 = y3 * r[:, :, None]
            g3 = tl.reshape(g, (BT, BC // L2, L2))
            dot = tl.where(big, tl.sum(g3 * n3, axis=2), 0.)
            g = tl.reshape((g3 - n3 * dot[:, :, None]) * r[:, :, None], (BT, BC))
        if SILU:
            g = g * sg * (1. + a * (1. - sg))
    tl.store(da + (i_b * T + t)[:, None] * C + c[None, :], g.to(da.dtype.element_ty), mask=m)
    part = (i_b * NT + i_t) * sp  # the partial sums' strides: sp a program, sc a (channel, tap)
    for j in tl.static_range(K):
        xj = _shifted(x, s, i_b, t, c, cm, T, C, K, j, USE_S)
        if ATOMIC:  # every program adds into the one zeroed [C, K]
            tl.atomic_add(dwp + c * K + j, tl.sum(g * xj, axis=0), mask=cm, sem="relaxed")
        else:
            tl.store(dwp + part + (c * K + j) * sc, tl.sum(g * xj, axis=0), mask=cm)


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
        acc += g.to(tl.float32) * wj[None, :]
    tl.store(dx + (i_b * T + t)[:, None] * C + c[None, :], acc.to(dx.dtype.element_ty),
             mask=(t < T)[:, None] & cm[None, :])


class _Kernels:
    fwd = _conv_fwd
    da = _conv_da
    dx = _conv_dx


def kernels() -> type[_Kernels]:
    """The kernels (compiled on the GPU; interpreted when ``TRITON_INTERPRET=1`` was set before triton
    was first imported)."""
    return _Kernels
