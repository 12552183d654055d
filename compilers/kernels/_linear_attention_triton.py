"""Triton kernels of chunked linear attention with an optional scalar decay per token and head.

Per token (the state ``h [K, V]``, ``α_t = exp(g_t)``, or 1 without ``g``)::

    h_t = α_t h_{t−1} + k_t v_tᵀ,     o_t = scale · h_tᵀ q_t

Per chunk of ``C`` tokens from ``h`` (``b = cumsum(g)`` inside the chunk, ``b_C`` its last value,
``Γ[r, j] = exp(b_r − b_j)`` for ``j ≤ r``)::

    O  = scale (diag(e^b) Q h + (Q Kᵀ ⊙ Γ) V)
    h' = e^{b_C} h + (diag(e^{b_C − b}) K)ᵀ V

Forward: ``_state_fwd`` (the chunk recurrence, one program per (V block, batch·head), the state in
registers) → ``_output`` (parallel over chunks). Backward: ``_state_bwd`` (the reverse recurrence of
``dh``, the gradient of the state at each chunk's end) → ``_grads`` (dq, dk, dv and ``db``, the
gradient of ``b``; ``dg`` is its reverse cumulative sum inside each chunk, taken in PyTorch). The
chunk-start states are recomputed in the backward instead of kept.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._delta_rule_triton import INTERPRETED, _rows

__all__ = ["INTERPRETED", "kernels"]


@triton.jit
def _decays(bcum, i_b, i_h, i_t, T, H: tl.constexpr, C: tl.constexpr, USE_G: tl.constexpr):
    """``(b [C], b_C, valid [C])`` of chunk ``i_t``: b = 0 without decay; rows past T are invalid."""
    r = tl.arange(0, C)
    t = i_t * C + r
    valid = t < T
    if USE_G:
        b = tl.load(bcum + (i_b * T + t) * H + i_h, mask=valid, other=0.)
        bl = tl.load(bcum + (i_b * T + tl.minimum(i_t * C + C - 1, T - 1)) * H + i_h)
    else:
        b = tl.zeros([C], dtype=tl.float32)
        bl = 0.
    return b, bl, valid


@triton.jit
def _state_fwd(k, v, bcum, h0, hs, ht, T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, USE_H0: tl.constexpr,
               STORE_HT: tl.constexpr, PREC: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = k.dtype.element_ty
    h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p0 = tl.make_block_ptr(h0 + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        h += tl.load(p0, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    for i_t in range(NT):
        p_h = tl.make_block_ptr(hs + ((i_b * NT + i_t) * H + i_h) * K * V, (K, V), (V, 1), (0, i_v * BV),
                                (BK, BV), (1, 0))
        tl.store(p_h, h.to(hs.dtype.element_ty), boundary_check=(0, 1))
        b, bl, valid = _decays(bcum, i_b, i_h, i_t, T, H, C, USE_G)
        kb = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
        vb = tl.load(_rows(v, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
        if USE_G:
            kb = (kb.to(tl.float32) * tl.where(valid, tl.exp(bl - b), 0.)[:, None]).to(dt)
            h = h * tl.exp(bl)
        h += tl.dot(tl.trans(kb), vb, input_precision=PREC)
    if STORE_HT:
        pt = tl.make_block_ptr(ht + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        tl.store(pt, h.to(ht.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _output(q, k, v, bcum, hs, o, scale, T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    r = tl.arange(0, C)
    b, bl, valid = _decays(bcum, i_b, i_h, i_t, T, H, C, USE_G)
    p_h = tl.make_block_ptr(hs + ((i_b * NT + i_t) * H + i_h) * K * V, (K, V), (V, 1), (0, i_v * BV),
                            (BK, BV), (1, 0))
    hb = tl.load(p_h, boundary_check=(0, 1), padding_option="zero")
    qb = tl.load(_rows(q, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
    kb = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
    vb = tl.load(_rows(v, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
    causal = r[:, None] >= r[None, :]
    a = tl.dot(qb, tl.trans(kb), input_precision=PREC)
    inter = tl.dot(qb, hb.to(dt), input_precision=PREC)
    if USE_G:
        # the exponent is masked first: above the diagonal b_r − b_j > 0 could overflow
        a = a * tl.exp(tl.where(causal, b[:, None] - b[None, :], 0.))
        inter = inter * tl.exp(b)[:, None]
    a = tl.where(causal, a, 0.)
    ob = (inter + tl.dot(a.to(dt), vb, input_precision=PREC)) * scale
    tl.store(_rows(o, tok, T, H, V, i_t * C, i_v * BV, C, BV), ob.to(o.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _state_bwd(q, do, bcum, dht, dhs, dh0, scale, T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, USE_DHT: tl.constexpr,
               STORE_DH0: tl.constexpr, PREC: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        pt = tl.make_block_ptr(dht + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        dh += tl.load(pt, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    for j in range(NT):
        i_t = NT - 1 - j
        p_dh = tl.make_block_ptr(dhs + ((i_b * NT + i_t) * H + i_h) * K * V, (K, V), (V, 1), (0, i_v * BV),
                                 (BK, BV), (1, 0))
        tl.store(p_dh, dh.to(dhs.dtype.element_ty), boundary_check=(0, 1))
        b, bl, valid = _decays(bcum, i_b, i_h, i_t, T, H, C, USE_G)
        qb = tl.load(_rows(q, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
        dob = tl.load(_rows(do, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                      padding_option="zero")
        if USE_G:
            qb = (qb.to(tl.float32) * tl.exp(b)[:, None]).to(dt)
            dh = dh * tl.exp(bl)
        dh += tl.dot(tl.trans(qb), dob, input_precision=PREC) * scale
    if STORE_DH0:
        p0 = tl.make_block_ptr(dh0 + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        tl.store(p0, dh.to(dh0.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _grads(q, k, v, bcum, hs, dhs, do, dq, dk, dv, db, scale, T, NT, H: tl.constexpr, K: tl.constexpr,
           V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
           PREC: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    r = tl.arange(0, C)
    b, bl, valid = _decays(bcum, i_b, i_h, i_t, T, H, C, USE_G)
    causal = r[:, None] >= r[None, :]
    gam = tl.exp(tl.where(causal, b[:, None] - b[None, :], 0.))
    qb = tl.load(_rows(q, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
    kb = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
    eb = tl.exp(b)
    ek = tl.where(valid, tl.exp(bl - b), 0.)
    a = tl.where(causal, tl.dot(qb, tl.trans(kb), input_precision=PREC) * gam, 0.) * scale  # [C, C]
    ds = tl.zeros([C, C], dtype=tl.float32)
    dq_acc = tl.zeros([C, BK], dtype=tl.float32)
    dks = tl.zeros([C, BK], dtype=tl.float32)
    hdh = tl.sum(tl.zeros([C], dtype=tl.float32), axis=0)
    kd = (kb.to(tl.float32) * ek[:, None]).to(dt)
    for i_v in range(tl.cdiv(V, BV)):
        base = ((i_b * NT + i_t) * H + i_h) * K * V
        hb = tl.load(tl.make_block_ptr(hs + base, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0)),
                     boundary_check=(0, 1), padding_option="zero")
        dhb = tl.load(tl.make_block_ptr(dhs + base, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0)),
                      boundary_check=(0, 1), padding_option="zero")
        vb = tl.load(_rows(v, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
        dob = tl.load(_rows(do, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                      padding_option="zero")
        dq_acc += tl.dot(dob, tl.trans(hb.to(dt)), input_precision=PREC)
        dks += tl.dot(vb, tl.trans(dhb.to(dt)), input_precision=PREC)
        ds += tl.dot(dob, tl.trans(vb), input_precision=PREC)
        dvb = tl.dot(kd, dhb.to(dt), input_precision=PREC) + tl.dot(tl.trans(a.to(dt)), dob, input_precision=PREC)
        tl.store(_rows(dv, tok, T, H, V, i_t * C, i_v * BV, C, BV), dvb.to(dv.dtype.element_ty),
                 boundary_check=(0, 1))
        if USE_G:
            hdh += tl.sum(hb.to(tl.float32) * dhb.to(tl.float32))
    dsm = (tl.where(causal, ds * gam, 0.) * scale).to(dt)
    dqb = dq_acc * (eb * scale)[:, None] + tl.dot(dsm, kb, input_precision=PREC)
    dks = dks * ek[:, None]
    dkb = dks + tl.dot(tl.trans(dsm), qb, input_precision=PREC)
    tl.store(_rows(dq, tok, T, H, K, i_t * C, 0, C, BK), dqb.to(dq.dtype.element_ty), boundary_check=(0, 1))
    tl.store(_rows(dk, tok, T, H, K, i_t * C, 0, C, BK), dkb.to(dk.dtype.element_ty), boundary_check=(0, 1))
    if USE_G:
        dbr = tl.sum(qb.to(tl.float32) * dqb, axis=1) - tl.sum(kb.to(tl.float32) * dkb, axis=1)
        # b_C, the chunk's last value, also scales the carried state and every key's write
        last = tl.minimum(i_t * C + C - 1, T - 1) - i_t * C
        extra = tl.exp(bl) * hdh + tl.sum(tl.sum(kb.to(tl.float32) * dks, axis=1), axis=0)
        dbr += tl.where(r == last, extra, 0.)
        tl.store(db + (i_b * T + i_t * C + r) * H + i_h, dbr, mask=valid)


class _Kernels:
    state_fwd = _state_fwd
    output = _output
    state_bwd = _state_bwd
    grads = _grads


def kernels() -> type[_Kernels]:
    """The kernels (compiled on the GPU; interpreted when ``TRITON_INTERPRET=1`` was set before triton
    was first imported)."""
    return _Kernels
