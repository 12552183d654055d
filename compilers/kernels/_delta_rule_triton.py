"""Triton kernels of the chunked (gated) delta rule, forward and backward.

Conventions (fla's): the state ``h [K, V]`` is the transpose of nlgraph's ``memory [V, K]``; per token,
with ``α_t = exp(g_t)``::

    h_t = α_t h_{t−1} + β_t k_t (v_t − α_t h_{t−1}ᵀ k_t)ᵀ,   o_t = scale · h_tᵀ q_t

Per chunk of ``C`` tokens starting from ``h0`` (``b = cumsum(g)`` inside the chunk, ``γ = exp(b)``,
``Γ[r, j] = exp(b_r − b_j)`` for ``j ≤ r``)::

    A   = strict_lower(diag(β) (Γ ⊙ K Kᵀ)),   T = (I + A)⁻¹           (the UT transform)
    W   = T diag(βγ) K,   U = T diag(β) V                               (WY representation)
    Vn  = U − W h0                                                      (the values written)
    O   = scale (diag(γ) Q h0 + (Q Kᵀ ⊙ Γ) Vn)
    h1  = γ_C h0 + (diag(γ_C / γ) K)ᵀ Vn

Forward: ``_prepare`` (T, W, U; parallel over chunks) → ``_state_fwd`` (the chunk recurrence, the
state ``h`` held in registers, one program per (batch·head, V-block)) → ``_output`` (parallel).
Backward recomputes W, U and the chunk states from the saved ``T`` and ``b``, then ``_dv_local`` →
``_state_bwd`` (reverse recurrence of ``dh``) → ``_qkw_bwd`` (dq, the direct dk, dW, d b) →
``_wy_bwd`` (through the UT transform: dk, dv, dβ, and dg as the reverse cumsum of d b).

The two state recurrences also take a decay per key channel (``GK``: ``bcum [B, T, H, K]``, the state's
key rows decayed by ``e^{b_C}``, the keys' writes by ``e^{b_C − b}``, the queries' reads by ``e^b``);
the rest of that case is in ``_delta_rule_channel_triton``.

With ``TRITON_INTERPRET=1`` set before triton is first imported, the same kernels run under Triton's
interpreter on CPU tensors (tests at small shapes, debugging).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from ._load import switch

__all__ = ["kernels"]


@triton.jit
def _rows(x, tok, T, H: tl.constexpr, D: tl.constexpr, t0, d0, BT: tl.constexpr, BD: tl.constexpr):
    """Block pointer to tokens ``t0 …`` / channels ``d0 …`` of one (batch, head) of ``x [B, T, H, D]``.
    Block pointers (not tiles of per-element pointers) keep the address arithmetic out of registers."""
    return tl.make_block_ptr(x + tok * D, (T, D), (H * D, 1), (t0, d0), (BT, BD), (1, 0))


@triton.jit
def _channel_decays(bcum, tok, i_t, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, k0=0):
    """``(b [C, BK], b_C [BK], valid [C])`` of chunk ``i_t`` with a decay per key channel (``bcum``
    laid out as the keys), key channels ``k0 …``; rows past T are invalid (and read 0)."""
    r = tl.arange(0, C)
    valid = i_t * C + r < T
    b = tl.load(_rows(bcum, tok, T, H, K, i_t * C, k0, C, BK), boundary_check=(0, 1), padding_option="zero")
    c = k0 + tl.arange(0, BK)
    last = tl.minimum(i_t * C + C - 1, T - 1)
    bl = tl.load(bcum + (tok + last * H) * K + c, mask=c < K, other=0.)
    return b, bl, valid


@triton.jit
def _unit_lower_inverse(a, C: tl.constexpr, NB: tl.constexpr, SPREC: tl.constexpr):
    """``(I + A)⁻¹ [C, C]`` float32 of a strictly lower triangular ``a [C, C]`` (the UT transform)."""
    r = tl.arange(0, C)
    # T = (I + A)⁻¹ by blocks of 16 rows: with D the block-diagonal part of A and L the rest,
    # I + A = (I + D)(I + N), N = (I + D)⁻¹ L, so T = (I + N)⁻¹ (I + D)⁻¹. (I + D)⁻¹ is forward
    # substitution on the NB = C / 16 diagonal blocks at once, as an [NB, 16, 16] batch (15 cheap
    # vector steps, no wasted products on the zero blocks); N is nilpotent of order NB, so
    # (I + N)⁻¹ = I − N + N² − … exactly, in Horner form (NB − 1 products).
    i16 = tl.arange(0, 16)
    nb = tl.arange(0, NB)
    same = nb[:, None, None, None] == nb[None, None, :, None]  # [NB, 1, NB, 1]
    d3 = tl.sum(tl.where(same, tl.reshape(a, [NB, 16, NB, 16]), 0.), axis=2)  # [NB, 16, 16]
    t3 = tl.zeros([NB, 16, 16], dtype=tl.float32) + tl.where(i16[:, None] == i16[None, :], 1., 0.)[None, :, :]
    for i in range(1, 16):
        at = i16[None, :, None] == i
        ai = tl.sum(tl.where(at, d3, 0.), axis=1)  # [NB, 16]: row i of each block
        upd = tl.sum(ai[:, :, None] * t3, axis=1)  # [NB, 16]: Σ_j A[i, j] T[j, :] per block
        t3 = tl.where(at, t3 - upd[:, None, :], t3)
    td = tl.reshape(tl.where(same, t3[:, :, None, :], 0.), [C, C])
    d = tl.where((r // 16)[:, None] == (r // 16)[None, :], a, 0.)
    eye = tl.where(r[:, None] == r[None, :], 1., 0.)
    n = tl.dot(td, a - d, input_precision=SPREC)
    x = eye
    for _ in range(1, NB):
        x = eye - tl.dot(n, x, input_precision=SPREC)
    tmf = tl.dot(x, td, input_precision=SPREC)
    return tmf


def _prepare(k, v, beta, bval, g, bcum, tm, w, u, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
             C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
             SOLVE: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr, NB: tl.constexpr,
             VB: tl.constexpr = False):
    # VB: the values have a write strength of their own, bval (``U = T diag(β_v) V``; Titans' order
    # writes β = b / α with β_v = b, instead of a pass scaling the values by α outside)
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    r = tl.arange(0, C)
    t = i_t * C + r
    valid = t < T
    row = (i_b * T + t) * H + i_h
    dt = k.dtype.element_ty
    bt = tl.load(beta + row, mask=valid, other=0.).to(tl.float32)
    if VB:
        bvt = tl.load(bval + row, mask=valid, other=0.).to(tl.float32)
    else:
        bvt = bt
    bg = bt
    if USE_G:
        if SOLVE:
            # padded tokens load g = 0, so b stays at its last real value past the end of T
            bc = tl.cumsum(tl.load(g + row, mask=valid, other=0.).to(tl.float32), axis=0)
            tl.store(bcum + row, bc, mask=valid)
        else:
            bc = tl.load(bcum + (i_b * T + tl.minimum(t, T - 1)) * H + i_h)
        bg = bt * tl.exp(bc)
    p_tm = _rows(tm, tok, T, H, C, i_t * C, 0, C, C)
    if SOLVE:
        kk = tl.zeros([C, C], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            kb = tl.load(_rows(k, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1),
                         padding_option="zero")
            kk += tl.dot(kb, tl.trans(kb), input_precision=PREC)
        strict = r[:, None] > r[None, :]
        a = kk * bt[:, None]
        if USE_G:
            # exponent masked first: above the diagonal b_r − b_j > 0 could overflow
            a = a * tl.exp(tl.where(strict, bc[:, None] - bc[None, :], 0.))
        a = tl.where(strict, a, 0.)
        tmf = _unit_lower_inverse(a, C, NB, SPREC)
        tl.store(p_tm, tmf.to(tm.dtype.element_ty), boundary_check=(0, 1))
    else:
        tmf = tl.load(p_tm, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    tmd = tmf.to(dt)
    for i_k in range(tl.cdiv(K, BK)):
        kb = tl.load(_rows(k, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        wb = tl.dot(tmd, (kb * bg[:, None]).to(dt), input_precision=PREC)
        tl.store(_rows(w, tok, T, H, K, i_t * C, i_k * BK, C, BK), wb.to(w.dtype.element_ty), boundary_check=(0, 1))
    for i_v in range(tl.cdiv(V, BV)):
        vb = tl.load(_rows(v, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
        ub = tl.dot(tmd, (vb * bvt[:, None]).to(dt), input_precision=PREC)
        tl.store(_rows(u, tok, T, H, V, i_t * C, i_v * BV, C, BV), ub.to(u.dtype.element_ty), boundary_check=(0, 1))


def _state_fwd(k, w, u, bcum, h0, hs, vn, ht, T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
               USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, GK: tl.constexpr = False):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = k.dtype.element_ty
    h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p0 = tl.make_block_ptr(h0 + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        h += tl.load(p0, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    r = tl.arange(0, C)
    for i_t in range(NT):
        t = i_t * C + r
        p_h = tl.make_block_ptr(hs + ((i_b * NT + i_t) * H + i_h) * K * V, (K, V), (V, 1), (0, i_v * BV),
                                (BK, BV), (1, 0))
        tl.store(p_h, h.to(hs.dtype.element_ty), boundary_check=(0, 1))
        wb = tl.load(_rows(w, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
        ub = tl.load(_rows(u, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
        vnb = ub.to(tl.float32) - tl.dot(wb, h.to(dt), input_precision=PREC)
        tl.store(_rows(vn, tok, T, H, V, i_t * C, i_v * BV, C, BV), vnb.to(vn.dtype.element_ty),
                 boundary_check=(0, 1))
        kb = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
        if GK:
            # a decay per key channel (b [C, BK]); rows past T read b = 0 and are masked
            bk, blk, valid = _channel_decays(bcum, tok, i_t, T, H, K, C, BK)
            h = h * tl.exp(blk)[:, None]
            kb = (kb.to(tl.float32) * tl.where(valid[:, None], tl.exp(blk[None, :] - bk), 0.)).to(dt)
        elif USE_G:
            last = tl.minimum(i_t * C + C, T) - 1
            bl = tl.load(bcum + (i_b * T + last) * H + i_h)
            bb = tl.load(bcum + (i_b * T + tl.minimum(t, T - 1)) * H + i_h)
            h = h * tl.exp(bl)
            kb = (kb * tl.exp(bl - bb)[:, None]).to(dt)
        h += tl.dot(tl.trans(kb), vnb.to(dt), input_precision=PREC)
    if STORE_HT:
        pt = tl.make_block_ptr(ht + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        tl.store(pt, h, boundary_check=(0, 1))


def _output(q, k, vn, hs, bcum, o, scale, T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    r = tl.arange(0, C)
    t = i_t * C + r
    acc = tl.zeros([C, BV], dtype=tl.float32)
    qk = tl.zeros([C, C], dtype=tl.float32)
    hbase = hs + ((i_b * NT + i_t) * H + i_h) * K * V
    for i_k in range(tl.cdiv(K, BK)):
        qb = tl.load(_rows(q, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        kb = tl.load(_rows(k, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        p_h = tl.make_block_ptr(hbase, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        hb = tl.load(p_h, boundary_check=(0, 1), padding_option="zero")
        acc += tl.dot(qb, hb.to(dt), input_precision=PREC)
        qk += tl.dot(qb, tl.trans(kb), input_precision=PREC)
    incl = r[:, None] >= r[None, :]
    if USE_G:
        bb = tl.load(bcum + (i_b * T + tl.minimum(t, T - 1)) * H + i_h)
        acc = acc * tl.exp(bb)[:, None]
        qk = qk * tl.exp(tl.where(incl, bb[:, None] - bb[None, :], 0.))
    qk = tl.where(incl, qk, 0.)
    vnb = tl.load(_rows(vn, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
    acc += tl.dot(qk.to(dt), vnb, input_precision=PREC)
    tl.store(_rows(o, tok, T, H, V, i_t * C, i_v * BV, C, BV), (acc * scale).to(o.dtype.element_ty),
             boundary_check=(0, 1))


def _dv_local(q, k, do, bcum, dvl, scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr):
    # dVn from the intra-chunk read: scale (Q Kᵀ ⊙ Γ)ᵀ dO
    i_v = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    r = tl.arange(0, C)
    t = i_t * C + r
    kq = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        qb = tl.load(_rows(q, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        kb = tl.load(_rows(k, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        kq += tl.dot(kb, tl.trans(qb), input_precision=PREC)
    upper = r[:, None] <= r[None, :]  # kq[j, r] is used for r ≥ j
    if USE_G:
        bb = tl.load(bcum + (i_b * T + tl.minimum(t, T - 1)) * H + i_h)
        kq = kq * tl.exp(tl.where(upper, bb[None, :] - bb[:, None], 0.))
    kq = tl.where(upper, kq * scale, 0.).to(dt)
    dob = tl.load(_rows(do, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
    dvb = tl.dot(kq, dob, input_precision=PREC)
    tl.store(_rows(dvl, tok, T, H, V, i_t * C, i_v * BV, C, BV), dvb.to(dvl.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _dh_add(dh, qb, wb, dob, dvb, PREC: tl.constexpr):
    """``dh + qᵀ dO − wᵀ dv`` for one chunk's key rows (``dO``'s dtype is the inputs')."""
    dt = dob.dtype
    dh += tl.dot(tl.trans(qb.to(dt)), dob, input_precision=PREC)
    dh -= tl.dot(tl.trans(wb), dvb.to(dt), input_precision=PREC)
    return dh


def _state_bwd(q, k, w, bcum, do, dvl, dht, dhs, dvn, dh0, scale, T, NT, H: tl.constexpr, K: tl.constexpr,
               V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
               USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr, GK: tl.constexpr = False,
               SPLIT: tl.constexpr = False):
    # SPLIT holds dh's BK key rows as two accumulators of BK / 2 (fla's `blockdim64` recurrence keeps
    # 64-row ones; NLGRAPH_STATE_BWD_SPLIT), the second half's loads and products under `if SPLIT`
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    KB: tl.constexpr = BK // 2 if SPLIT else BK
    dh = tl.zeros([KB, BV], dtype=tl.float32)
    dh2 = tl.zeros([KB, BV], dtype=tl.float32)
    if USE_DHT:
        pt = tl.make_block_ptr(dht + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV), (KB, BV), (1, 0))
        dh += tl.load(pt, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
        if SPLIT:
            dh2 += tl.load(tl.advance(pt, (KB, 0)), boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    r = tl.arange(0, C)
    for i_t in range(NT - 1, -1, -1):
        t = i_t * C + r
        # dhs[n] is the gradient of the state at the END of chunk n
        p_dh = tl.make_block_ptr(dhs + ((i_b * NT + i_t) * H + i_h) * K * V, (K, V), (V, 1), (0, i_v * BV),
                                 (KB, BV), (1, 0))
        tl.store(p_dh, dh.to(dhs.dtype.element_ty), boundary_check=(0, 1))
        kb = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, KB), boundary_check=(0, 1), padding_option="zero")
        qb = tl.load(_rows(q, tok, T, H, K, i_t * C, 0, C, KB), boundary_check=(0, 1),
                     padding_option="zero").to(tl.float32) * scale
        if SPLIT:
            tl.store(tl.advance(p_dh, (KB, 0)), dh2.to(dhs.dtype.element_ty), boundary_check=(0, 1))
            kb2 = tl.load(_rows(k, tok, T, H, K, i_t * C, KB, C, KB), boundary_check=(0, 1), padding_option="zero")
            qb2 = tl.load(_rows(q, tok, T, H, K, i_t * C, KB, C, KB), boundary_check=(0, 1),
                          padding_option="zero").to(tl.float32) * scale
        if GK:
            bk, blk, valid = _channel_decays(bcum, tok, i_t, T, H, K, C, KB)
            kb = (kb.to(tl.float32) * tl.where(valid[:, None], tl.exp(blk[None, :] - bk), 0.)).to(dt)
            qb = qb * tl.exp(bk)
            if SPLIT:
                bk2, blk2, _ = _channel_decays(bcum, tok, i_t, T, H, K, C, KB, KB)
                kb2 = (kb2.to(tl.float32) * tl.where(valid[:, None], tl.exp(blk2[None, :] - bk2), 0.)).to(dt)
                qb2 = qb2 * tl.exp(bk2)
        elif USE_G:
            last = tl.minimum(i_t * C + C, T) - 1
            bl = tl.load(bcum + (i_b * T + last) * H + i_h)
            bb = tl.load(bcum + (i_b * T + tl.minimum(t, T - 1)) * H + i_h)
            kb = (kb * tl.exp(bl - bb)[:, None]).to(dt)
            qb = qb * tl.exp(bb)[:, None]
            if SPLIT:
                kb2 = (kb2 * tl.exp(bl - bb)[:, None]).to(dt)
                qb2 = qb2 * tl.exp(bb)[:, None]
        dvb = tl.load(_rows(dvl, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                      padding_option="zero").to(tl.float32)
        dvb += tl.dot(kb, dh.to(dt), input_precision=PREC)
        if SPLIT:
            dvb += tl.dot(kb2, dh2.to(dt), input_precision=PREC)
        tl.store(_rows(dvn, tok, T, H, V, i_t * C, i_v * BV, C, BV), dvb.to(dvn.dtype.element_ty),
                 boundary_check=(0, 1))
        dob = tl.load(_rows(do, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
        wb = tl.load(_rows(w, tok, T, H, K, i_t * C, 0, C, KB), boundary_check=(0, 1), padding_option="zero")
        if GK:
            dh = dh * tl.exp(blk)[:, None]
        elif USE_G:
            dh = dh * tl.exp(bl)
        dh = _dh_add(dh, qb, wb, dob, dvb, PREC)
        if SPLIT:
            wb2 = tl.load(_rows(w, tok, T, H, K, i_t * C, KB, C, KB), boundary_check=(0, 1), padding_option="zero")
            if GK:
                dh2 = dh2 * tl.exp(blk2)[:, None]
            elif USE_G:
                dh2 = dh2 * tl.exp(bl)
            dh2 = _dh_add(dh2, qb2, wb2, dob, dvb, PREC)
    if STORE_DH0:
        p0 = tl.make_block_ptr(dh0 + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV), (KB, BV), (1, 0))
        tl.store(p0, dh, boundary_check=(0, 1))
        if SPLIT:
            tl.store(tl.advance(p0, (KB, 0)), dh2, boundary_check=(0, 1))


def _qkw_bwd(q, k, vn, dvn, do, hs, dhs, bcum, dq, dk, dw, db, scale, T, NT, B, H: tl.constexpr,
             K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             USE_G: tl.constexpr, PREC: tl.constexpr):
    i_k = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    r = tl.arange(0, C)
    t = i_t * C + r
    valid = t < T
    row = (i_b * T + t) * H + i_h
    dqg = tl.zeros([C, BK], dtype=tl.float32)   # dO h0ᵀ
    dkd = tl.zeros([C, BK], dtype=tl.float32)   # Vn dh1ᵀ
    dwv = tl.zeros([C, BK], dtype=tl.float32)   # dVn h0ᵀ
    dav = tl.zeros([C, C], dtype=tl.float32)    # dO Vnᵀ
    davt = tl.zeros([C, C], dtype=tl.float32)   # Vn dOᵀ: its transpose, formed directly (see below)
    hdh = tl.zeros([BK], dtype=tl.float32)      # Σ h0 ⊙ dh1 (for the chunk's total decay)
    sbase = ((i_b * NT + i_t) * H + i_h) * K * V
    for i_v in range(tl.cdiv(V, BV)):
        p_h = tl.make_block_ptr(hs + sbase, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        p_dh = tl.make_block_ptr(dhs + sbase, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        hb = tl.load(p_h, boundary_check=(0, 1), padding_option="zero")
        dhb = tl.load(p_dh, boundary_check=(0, 1), padding_option="zero")
        vnb = tl.load(_rows(vn, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
        dvb = tl.load(_rows(dvn, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
        dob = tl.load(_rows(do, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
        dqg += tl.dot(dob, tl.trans(hb.to(dt)), input_precision=PREC)
        dkd += tl.dot(vnb, tl.trans(dhb.to(dt)), input_precision=PREC)
        dwv += tl.dot(dvb, tl.trans(hb.to(dt)), input_precision=PREC)
        dav += tl.dot(dob, tl.trans(vnb), input_precision=PREC)
        davt += tl.dot(vnb, tl.trans(dob), input_precision=PREC)
        hdh += tl.sum(hb.to(tl.float32) * dhb.to(tl.float32), axis=1)
    qb = tl.load(_rows(q, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
    kb = tl.load(_rows(k, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
    incl = r[:, None] >= r[None, :]
    # dk needs (dO Vnᵀ ⊙ Γ)ᵀ. It is built from its own product instead of tl.trans of a product:
    # transposing an MMA result that feeds another dot is what triton 3.4-3.7 miscompiles on Hopper
    # (fla issue 640), and the extra C×C×V product is cheap.
    upper = r[:, None] <= r[None, :]
    dqg = dqg * scale
    if USE_G:
        last = tl.minimum(i_t * C + C, T) - 1
        bl = tl.load(bcum + (i_b * T + last) * H + i_h)
        bb = tl.load(bcum + (i_b * T + tl.minimum(t, T - 1)) * H + i_h)
        gam = tl.exp(bb)
        e = tl.exp(bl - bb)
        da = tl.where(incl, dav * scale * tl.exp(tl.where(incl, bb[:, None] - bb[None, :], 0.)), 0.)
        dat = tl.where(upper, davt * scale * tl.exp(tl.where(upper, bb[None, :] - bb[:, None], 0.)), 0.)
        dqb = dqg * gam[:, None]
        dkb = dkd * e[:, None]
    else:
        da = tl.where(incl, dav * scale, 0.)
        dat = tl.where(upper, davt * scale, 0.)
        dqb = dqg
        dkb = dkd
    dqb += tl.dot(da.to(dt), kb, input_precision=PREC)
    dkb += tl.dot(dat.to(dt), qb, input_precision=PREC)
    tl.store(_rows(dq, tok, T, H, K, i_t * C, i_k * BK, C, BK), dqb.to(dq.dtype.element_ty), boundary_check=(0, 1))
    tl.store(_rows(dk, tok, T, H, K, i_t * C, i_k * BK, C, BK), dkb, boundary_check=(0, 1))
    tl.store(_rows(dw, tok, T, H, K, i_t * C, i_k * BK, C, BK), (-dwv).to(dw.dtype.element_ty), boundary_check=(0, 1))
    if USE_G:
        x = da * tl.dot(qb, tl.trans(kb), input_precision=PREC)
        kd_dot = e * tl.sum(dkd * kb.to(tl.float32), axis=1)
        dbv = gam * tl.sum(dqg * qb.to(tl.float32), axis=1) - kd_dot + tl.sum(x, axis=1) - tl.sum(x, axis=0)
        dbv += tl.where(t == last, tl.sum(kd_dot, axis=0) + tl.exp(bl) * tl.sum(hdh, axis=0), 0.)
        tl.store(db + i_k * B * T * H + row, dbv, mask=valid)


def _wy_bwd(k, v, beta, bval, bcum, tm, dw, dvn, dkp, db, dk, dv, dbeta, dbval, dg, T, H: tl.constexpr,
            K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            USE_G: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, VB: tl.constexpr = False):
    # VB: the values' own write strength bval (see _prepare), whose gradient goes to dbval
    # LOWP (16-bit inputs only): 1 multiplies the products with a token operand in the input dtype
    # (β- and decay-scaled k and v rounded to it, dW stored in it by _qkw_bwd) instead of tf32 on
    # float32 copies; 2 also the C×C products through T. Accumulation stays float32 either way.
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = k.dtype.element_ty
    r = tl.arange(0, C)
    t = i_t * C + r
    valid = t < T
    row = (i_b * T + t) * H + i_h
    bt = tl.load(beta + row, mask=valid, other=0.).to(tl.float32)
    if VB:
        bvt = tl.load(bval + row, mask=valid, other=0.).to(tl.float32)
        dbvt = tl.zeros([C], dtype=tl.float32)
    else:
        bvt = bt
    # Tᵀ loaded by address (a transposed block pointer), not by tl.trans of a tile: see _qkw_bwd
    p_tmt = tl.make_block_ptr(tm + tok * C, (C, T), (1, H * C), (0, i_t * C), (C, C), (0, 1))
    tmt = tl.load(p_tmt, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    if USE_G:
        bb = tl.load(bcum + (i_b * T + tl.minimum(t, T - 1)) * H + i_h)
        gam = tl.exp(bb)
        dbv = tl.load(db + row, mask=valid, other=0.)
    else:
        gam = tl.full([C], 1., tl.float32)
    bg = bt * gam
    dtm = tl.zeros([C, C], dtype=tl.float32)
    dtmt = tl.zeros([C, C], dtype=tl.float32)
    dbt = tl.zeros([C], dtype=tl.float32)
    if LOWP > 0:
        tmtl = tmt.to(dt)
    for i_k in range(tl.cdiv(K, BK)):
        kb = tl.load(_rows(k, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        kf = kb.to(tl.float32)
        dwb = tl.load(_rows(dw, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        if LOWP > 0:
            kg = (kf * bg[:, None]).to(dt)
            dwl = dwb.to(dt)
            dtm += tl.dot(dwl, tl.trans(kg))
            dtmt += tl.dot(kg, tl.trans(dwl))
            dkw = tl.dot(tmtl, dwl)  # Tᵀ dW
        else:
            dtm += tl.dot(dwb, tl.trans(kf * bg[:, None]), input_precision=PREC)
            dtmt += tl.dot(kf * bg[:, None], tl.trans(dwb), input_precision=PREC)
            dkw = tl.dot(tmt, dwb, input_precision=PREC)  # Tᵀ dW
        rs = tl.sum(dkw * kf, axis=1)
        dbt += rs * gam
        if USE_G:
            dbv += rs * bg
        p_dkp = _rows(dkp, tok, T, H, K, i_t * C, i_k * BK, C, BK)
        acc = tl.load(p_dkp, boundary_check=(0, 1), padding_option="zero") + dkw * bg[:, None]
        tl.store(p_dkp, acc, boundary_check=(0, 1))
    for i_v in range(tl.cdiv(V, BV)):
        vf = tl.load(_rows(v, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                     padding_option="zero").to(tl.float32)
        dub = tl.load(_rows(dvn, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                      padding_option="zero")
        if LOWP > 0:
            vb = (vf * bvt[:, None]).to(dt)
            dul = dub.to(dt)
            dtm += tl.dot(dul, tl.trans(vb))
            dtmt += tl.dot(vb, tl.trans(dul))
            dvu = tl.dot(tmtl, dul)  # Tᵀ dU
        else:
            duf = dub.to(tl.float32)
            dtm += tl.dot(duf, tl.trans(vf * bvt[:, None]), input_precision=PREC)
            dtmt += tl.dot(vf * bvt[:, None], tl.trans(duf), input_precision=PREC)
            dvu = tl.dot(tmt, duf, input_precision=PREC)  # Tᵀ dU
        tl.store(_rows(dv, tok, T, H, V, i_t * C, i_v * BV, C, BV), (dvu * bvt[:, None]).to(dv.dtype.element_ty),
                 boundary_check=(0, 1))
        if VB:
            dbvt += tl.sum(dvu * vf, axis=1)
        else:
            dbt += tl.sum(dvu * vf, axis=1)
    # T = (I + A)⁻¹  ⇒  dA = −Tᵀ dT Tᵀ (and dAᵀ = −T dTᵀ T), kept strictly below (above) the diagonal
    # T itself is loaded only after the loops, so it does not hold registers through them
    if LOWP > 1:
        da = -tl.dot(tl.dot(tmtl, dtm.to(dt)).to(dt), tmtl)
        tml = tl.load(_rows(tm, tok, T, H, C, i_t * C, 0, C, C), boundary_check=(0, 1), padding_option="zero")
        dat = -tl.dot(tl.dot(tml, dtmt.to(dt)).to(dt), tml)
    else:
        da = -tl.dot(tl.dot(tmt, dtm, input_precision=PREC), tmt, input_precision=PREC)
        tmf = tl.load(_rows(tm, tok, T, H, C, i_t * C, 0, C, C), boundary_check=(0, 1),
                      padding_option="zero").to(tl.float32)
        dat = -tl.dot(tl.dot(tmf, dtmt, input_precision=PREC), tmf, input_precision=PREC)
    strict = r[:, None] > r[None, :]
    supper = r[:, None] < r[None, :]
    if USE_G:
        da = da * tl.exp(tl.where(strict, bb[:, None] - bb[None, :], 0.))
        dat = dat * tl.exp(tl.where(supper, bb[None, :] - bb[:, None], 0.))
    da = tl.where(strict, da, 0.)
    dat = tl.where(supper, dat, 0.)
    yy = da * bt[:, None] + dat * bt[None, :]  # Y + Yᵀ, Y = diag(β) (dA ⊙ Γ)
    kk = tl.zeros([C, C], dtype=tl.float32)  # K Kᵀ, formed here so it holds no registers above
    for i_k in range(tl.cdiv(K, BK)):
        kb = tl.load(_rows(k, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        kk += tl.dot(kb, tl.trans(kb), input_precision=PREC)
        acc = tl.load(_rows(dkp, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1),
                      padding_option="zero")
        if LOWP > 0:
            acc += tl.dot(yy.to(dt), kb)
        else:
            acc += tl.dot(yy, kb.to(tl.float32), input_precision=PREC)
        tl.store(_rows(dk, tok, T, H, K, i_t * C, i_k * BK, C, BK), acc.to(dk.dtype.element_ty),
                 boundary_check=(0, 1))
    gm = da * kk
    dbt += tl.sum(gm, axis=1)
    tl.store(dbeta + row, dbt.to(dbeta.dtype.element_ty), mask=valid)
    if VB:
        tl.store(dbval + row, dbvt.to(dbval.dtype.element_ty), mask=valid)
    if USE_G:
        x = gm * bt[:, None]
        dbv += tl.sum(x, axis=1) - tl.sum(x, axis=0)
        # b = cumsum(g) inside the chunk, so dg is the reverse cumulative sum of db
        dgv = tl.sum(dbv, axis=0) - tl.cumsum(dbv, axis=0) + dbv
        tl.store(dg + row, dgv.to(dg.dtype.element_ty), mask=valid)


_SOURCES = {f.__name__.lstrip("_"): f for f in (_prepare, _state_fwd, _output, _dv_local, _state_bwd,
                                                 _qkw_bwd, _wy_bwd)}

# Triton decides at import time whether ``@triton.jit`` compiles or interprets (its own library
# functions, tl.sum and tl.cumsum included, are decorated then), so the mode is fixed per process.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def _numpy_index_shim() -> None:
    """triton 3.6's interpreter turns a kernel's integer argument into a 1-element array and gives
    it ``__index__ = int(array)``, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted"), so ``range(n)`` over a run-time bound fails. Re-patch ``__index__`` to read the one
    element; it is undone with the interpreter's own patches after each launch."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_nlgraph_shim", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch._nlgraph_shim = True
    interpreter._patch_lang_tensor = patch


if INTERPRETED:
    _numpy_index_shim()


# Warps the autotuner may pick from. With 4 warps the backward's recurrence and its two per-chunk
# kernels spill hundreds of registers on sm_90 (benchmarks/kernels.py --resources), so they try 8
# only; fewer configs also keep the first call's tuning short. triton 3.4-3.7 has miscompiled some
# backward kernels on Hopper at particular warp counts (fla pins num_warps=2 for one), so when
# benchmarks/kernels.py reports a FAIL, rerun it with NLGRAPH_TRITON_WARPS=2 (or 4, 8, "4,8"):
# that list then applies to every kernel.
STATE_KERNELS = ("state_fwd", "state_bwd")
_WARPS_ENV = os.environ.get("NLGRAPH_TRITON_WARPS")
_WARPS = tuple(int(w) for w in (_WARPS_ENV or "4,8").split(","))
_HEAVY = ("state_bwd", "qkw_bwd", "wy_bwd")


def _warps(name: str) -> tuple[int, ...]:
    return (8,) if name in _HEAVY and _WARPS_ENV is None else _WARPS


# The autotuner's own choices on sm_90 (H200, triton 3.6; benchmarks/autotune_sm90.tar.gz holds the
# timings): (kernel, V, 16-bit inputs) -> (BV or None, warps). They did not change with the chunk
# (32, 64), the length (60 to 4096) or a decay per key channel, so on sm_90 a kernel of a class in
# this table compiles that one config; timing every config on a fresh machine compiled twice as many
# (a cold compile is mostly Triton compiling these kernels, one after another in the main process).
# NLGRAPH_TRITON_AUTOTUNE=1 times them all again, as on other GPUs and shapes not listed.
SM90_CHOICES = {
    **{(n, v, True): (None, 4) for n in ("prepare", "output", "dv_local") for v in (64, 128)},
    ("state_fwd", 64, True): (32, 4), ("state_fwd", 128, True): (64, 4),
    ("state_fwd", 64, False): (32, 8), ("state_fwd", 128, False): (32, 8),
    ("state_bwd", 64, True): (32, 8), ("state_bwd", 128, True): (64, 8),
    ("state_bwd", 64, False): (32, 8), ("state_bwd", 128, False): (32, 8),
}
# bfloat16 heads time otherwise on sm_90: (head width K = V, a decay per key channel) -> kernel ->
# (BV or None, warps) or (BV or None, warps, pipelining depth; 2 when not given). Measured by the
# autotuner on an H100 (triton 3.6; NLGRAPH_TRITON_AUTOTUNE=1, docs/benchmarks.md "Whole layers: where
# the GPU time goes" and "Pipelining depth"; the timings in benchmarks/results/autotune_*_h100.json):
# at heads of 64 over 2, 4 and 8 warps at depth 2, then over depths 2 to 4 and value blocks of 16 to
# 64 on 4 warps only (NLGRAPH_TRITON_WARPS=4); at heads of 128 over every combination of the warps
# offered, value blocks and depths:
# - heads of 64 (a d_model-512 layer's 8 heads; B=8, T=2048, H=8): 2 warps for _prepare (0.096
#   against 0.113 ms on 4) and 4 for the heavy backward kernels, whose registers fit at this width
#   (_wy_bwd 0.151 against 0.210 ms on 8, _qkw_bwd 0.072 against 0.108); the recurrences pipelined 4
#   deep (_state_fwd 0.044 ms at value blocks of 32 against 0.063 at depth 2, _state_bwd 0.080 at 16
#   against 0.094 for the 2-deep (32, 4)), as fla's own recurrence is at this width (0.039 ms at 4
#   stages against 0.064 at 2);
# - heads of 128 (B=4, T=4096, H=16): 2 warps 3 deep for _prepare (0.212 against 0.269 ms), 4 warps
#   for _wy_bwd (0.635 against 0.829 ms on 8) and _qkw_bwd (0.438 against 0.561), _state_fwd 4 deep
#   (0.156 against 0.193 ms) and _output 3 deep (0.157 against 0.166);
# - KDA's recurrences at heads of 128 (its chunk of 32): _state_fwd 3 deep (0.246 against 0.341 ms),
#   _state_bwd on (32, 4) 3 deep (0.407 against 0.460 for (64, 8)).
# bfloat16 only, K = V: the checks' cases (benchmarks/kernels.py, benchmarks/delta_rule_channel_kernel.py).
# These configs join the kernels' lists (offered_configs) and only the matching shape compiles them.
SM90_BF16 = {
    (64, False): {"prepare": (None, 2), "wy_bwd": (None, 4), "qkw_bwd": (None, 4), "state_bwd": (16, 4, 4),
                  "state_fwd": (32, 4, 4)},
    (128, False): {"prepare": (None, 2, 3), "wy_bwd": (None, 4), "qkw_bwd": (None, 4), "state_fwd": (64, 4, 4),
                   "output": (None, 4, 3)},
    (128, True): {"state_fwd": (64, 4, 3), "state_bwd": (32, 4, 3)},
}
_FULL_TUNING = switch("NLGRAPH_TRITON_AUTOTUNE", False)


def _capability(device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def choose_configs(name: str, configs: list, nargs: dict, **kwargs) -> list:
    """``early_config_prune`` of every autotuned kernel: on sm_90, the one config ``SM90_BF16`` names for
    the call's bfloat16 head width (K = V) and decay, or else ``SM90_CHOICES``'s for the call's
    (kernel, V, input dtype) when there is one and none of ``NLGRAPH_TRITON_WARPS`` /
    ``NLGRAPH_TRITON_AUTOTUNE`` is set; otherwise the configs of the kernel's own warps (``_warps``),
    value blocks and depth, or with either variable set every config."""
    if _FULL_TUNING or _WARPS_ENV is not None:
        return configs
    k = nargs.get("k", kwargs.get("k"))
    v = kwargs.get("V", nargs.get("V"))
    if k is None or v is None or getattr(k, "device", None) is None or k.device.type != "cuda":
        return configs
    # the configs SM90_BF16 added are compiled only where chosen: elsewhere the kernel's own
    usual = [c for c in configs if own_config(name, c.kwargs.get("BV"), c.num_warps, c.num_stages)] or configs
    if _capability(k.device) != (9, 0):
        return usual
    choice = None
    if k.dtype == torch.bfloat16:
        choice = bf16_choice(name, kwargs.get("K", nargs.get("K", 0)), v, kwargs.get("GK", nargs.get("GK", False)))
    if choice is None:
        choice = SM90_CHOICES.get((name, int(v), k.element_size() == 2))
    if choice is None:
        return usual
    bv, warps, depth = (*choice, 2)[:3]
    chosen = [c for c in configs if c.num_warps == warps and c.kwargs.get("BV") == bv and c.num_stages == depth]
    return chosen or usual


def own_config(name: str, bv: int | None, warps: int, depth: int) -> bool:
    """Whether a config is one of the kernel's own (``_warps``, value blocks of 32 or 64 for the
    recurrences, depth 2), not one a table or full tuning added."""
    return warps in _warps(name) and bv in (None, 32, 64) and depth == 2


def bf16_choice(name: str, k: int, v: int, gk: bool) -> tuple | None:
    """``SM90_BF16``'s config for the kernel at bfloat16 keys and values of widths ``k``, ``v`` with
    or without a decay per key channel, as ``(BV or None, warps, depth)``; ``None`` where the table
    names none or NLGRAPH_TRITON_WARPS is set."""
    if _WARPS_ENV is not None or int(k) != int(v):
        return None
    choice = SM90_BF16.get((int(v), bool(gk)), {}).get(name)
    return None if choice is None else (*choice, 2)[:3]


def _table_configs(name: str) -> set[tuple]:
    """The configs ``SM90_BF16`` names for the kernel, as ``(BV or None, warps, depth)``; none with
    NLGRAPH_TRITON_WARPS set (its warps replace the table's)."""
    if _WARPS_ENV is not None:
        return set()
    return {(*row[name], 2)[:3] for row in SM90_BF16.values() if name in row}


def offered_configs(name: str) -> list[tuple]:
    """The configs a kernel's autotuner is offered, as ``(BV or None, warps, depth)``: its own warps
    (``_warps``) with value blocks of 32 and 64 (the recurrences) at depth 2, and those ``SM90_BF16``
    names; with NLGRAPH_TRITON_AUTOTUNE=1 every combination of those warps, value blocks of 16, 32 and
    64 and depths 2, 3 and 4 (fla's recurrence at heads of 64 took 0.064 ms at 2 stages and 0.039 at
    4 on an H100, docs/benchmarks.md "Whole layers")."""
    state = name in STATE_KERNELS
    table = _table_configs(name)
    out = {(bv, w, 2) for bv in ((32, 64) if state else (None,)) for w in _warps(name)} | table
    if _FULL_TUNING:
        warps = {*_warps(name), *(c[1] for c in table)}
        out |= {(bv, w, n) for bv in ((16, 32, 64) if state else (None,)) for w in warps for n in (2, 3, 4)}
    return sorted(out, key=lambda c: (c[0] or 0, c[1], c[2]))


def _tuned(name: str, fn):
    """On the GPU each kernel picks its warps and pipelining depth from a few configs, keyed on the
    head dims and chunk (seconds of tuning on the first call per shape family; on sm_90 the one
    config ``choose_configs`` names, where it names one)."""
    jitted = triton.jit(fn)
    if INTERPRETED:
        return jitted
    # the chunk recurrences: one program per (batch·head, V block), so the V block sets both the
    # parallelism (B·H·V/BV programs) and the registers each holds; pipelined across chunks
    configs = [triton.Config({} if bv is None else {"BV": bv}, num_warps=w, num_stages=n)
               for bv, w, n in offered_configs(name)]
    # _wy_bwd adds into its dk buffer: every trial must start from the same values
    restore = ["dkp"] if name == "wy_bwd" else None
    # keyed on the head dims, the chunk, the sequence length and the variant flags (a kernel ignores
    # those it lacks). cache_results: the winner is kept in triton's cache, so a later process (the
    # next `nlgraph train`) compiles only that config instead of timing every one again; T in the key
    # keeps a choice made at a test's or a sample's length from deciding a training run's. B and H
    # are not in it: a run at another batch but the same length reuses the choice
    # PREC: float32's products follow NLGRAPH_FP32_PRODUCTS, not the dtype alone, and a config that
    # fits with one mode's tiles may not with the other's (shared memory grows with tf32x3)
    return triton.autotune(configs=configs, key=["K", "V", "C", "T", "USE_G", "GK", "LOWP", "VB", "PREC", "SPLIT"],
                           restore_value=restore,
                           cache_results=True,
                           prune_configs_by={"early_config_prune": functools.partial(choose_configs, name)})(jitted)


_KERNELS = SimpleNamespace(**{n: _tuned(n, f) for n, f in _SOURCES.items()})


def kernels() -> SimpleNamespace:
    """The kernels: compiled and autotuned, or interpreted when ``TRITON_INTERPRET=1`` was set before
    triton was first imported (then CPU tensors work, slowly)."""
    return _KERNELS
