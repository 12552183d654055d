"""Triton kernels of the chunked delta rule with a decay per key channel (Kimi Delta Attention's
gate), forward and backward.

Per token (fla's conventions: the state ``h [K, V]``, ``α_t = exp(g_t)`` with ``g_t [K]``)::

    h_t = diag(α_t) h_{t−1} + β_t k_t (v_t − (diag(α_t) h_{t−1})ᵀ k_t)ᵀ,   o_t = scale · h_tᵀ q_t

Per chunk of ``C`` tokens from ``h0`` (``b = cumsum(g)`` inside the chunk, ``b [C, K]``, ``b_C`` its
last row; ``S`` and ``P`` built as in the GLA kernels, by the tree of products or 16-row sub-blocks,
since ``K ⊙ e^{−b}`` overflows once a chunk decays past e^−88: ``_intra_channel``)::

    S[r, j] = Σ_c k_rc k_jc e^{b_rc − b_jc}   (j < r),     T = (I + diag(β) S)⁻¹
    W  = T diag(β) (K ⊙ e^b),   U = T diag(β) V,   Vn = U − W h0
    O  = scale ((Q ⊙ e^b) h0 + P Vn),   P[r, j] = Σ_c q_rc k_jc e^{b_rc − b_jc}   (j ≤ r)
    h1 = diag(e^{b_C}) h0 + (K ⊙ e^{b_C − b})ᵀ Vn

Forward: linear attention's ``_chunk_cumsum`` (b) → ``_prepare`` (T, W, U; parallel over chunks;
T kept in the first C columns of ``tm [B, T, H, 2C]`` float32) → the delta rule's ``_state_fwd``
with ``GK`` → linear attention's ``_output_channel`` on ``Vn``, which keeps P in ``tm``'s last C
columns. Backward: W and U and the chunk states recomputed from the saved T and b → ``_dv_local``
(``scale Pᵀ dO``, from the kept P) → the delta rule's ``_state_bwd`` with ``GK`` (``dh``, and
``dVn``) → ``_grads`` (everything else, one program per chunk: dq, dk, dv, dβ and ``db [C, K]``; dg
is db's reverse cumulative sum inside each chunk, linear attention's ``_chunk_cumsum``).

The keys of a row's own sub-block run on the CUDA cores (16 steps of ``[C, K]`` elementwise work
per product), and ``_grads`` holds a dozen ``[C, K]`` float32 tiles: correct first, not tuned. Rows
past T read ``b = 0`` and are masked wherever an exponent meets them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._delta_rule_triton import INTERPRETED, _channel_decays, _rows, _unit_lower_inverse
from ._linear_attention_triton import CHANNEL_TREE, _intra_channel, _intra_channel_adjoint, _tree_factors

__all__ = ["INTERPRETED", "kernels"]


@triton.jit
def _prepare(k, v, beta, bcum, tm, w, u, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, SOLVE: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
             NB: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    r = tl.arange(0, C)
    row = (i_b * T + i_t * C + r) * H + i_h
    b, _, valid = _channel_decays(bcum, tok, i_t, T, H, K, C, BK)
    bt = tl.load(beta + row, mask=valid, other=0.).to(tl.float32)
    kf = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1),
                 padding_option="zero").to(tl.float32)
    p_tm = _rows(tm, tok, T, H, 2 * C, i_t * C, 0, C, C)  # T in the first C columns (P after it)
    if SOLVE:
        strict = r[:, None] > r[None, :]
        a = tl.where(strict, _intra_channel(kf, b, k, bcum, tok, i_t, T, H, K, C, BK, PREC), 0.) * bt[:, None]
        tmf = _unit_lower_inverse(a, C, NB, SPREC)
        tl.store(p_tm, tmf, boundary_check=(0, 1))
    else:
        tmf = tl.load(p_tm, boundary_check=(0, 1), padding_option="zero")
    kg = kf * tl.where(valid[:, None], tl.exp(b), 0.) * bt[:, None]
    wb = tl.dot(tmf, kg, input_precision=PREC)
    tl.store(_rows(w, tok, T, H, K, i_t * C, 0, C, BK), wb.to(w.dtype.element_ty), boundary_check=(0, 1))
    for i_v in range(tl.cdiv(V, BV)):
        vb = tl.load(_rows(v, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                     padding_option="zero").to(tl.float32)
        ub = tl.dot(tmf, vb * bt[:, None], input_precision=PREC)
        tl.store(_rows(u, tok, T, H, V, i_t * C, i_v * BV, C, BV), ub.to(u.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _dv_local(tm, do, dvl, scale, T, H: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
              PREC: tl.constexpr):
    # dVn from the intra-chunk read: scale Pᵀ dO, one program a chunk for every value block; Pᵀ read
    # by address from the P the forward's output kept in tm's last C columns (a transposed block
    # pointer, not tl.trans of a tile: fla issue 640), not built again
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    pt = tl.load(tl.make_block_ptr(tm + tok * 2 * C + C, (C, T), (1, H * 2 * C), (0, i_t * C), (C, C), (0, 1)),
                 boundary_check=(0, 1), padding_option="zero") * scale
    for i_v in range(tl.cdiv(V, BV)):
        dob = tl.load(_rows(do, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                      padding_option="zero").to(tl.float32)
        dvb = tl.dot(pt, dob, input_precision=PREC)
        tl.store(_rows(dvl, tok, T, H, V, i_t * C, i_v * BV, C, BV), dvb.to(dvl.dtype.element_ty),
                 boundary_check=(0, 1))


@triton.jit
def _tree_adjoints(kf, qf, b, bcum, da, bt, dpm, tok, i_t, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, PREC: tl.constexpr):
    """The three uses of the chunk's scores in ``_grads`` in one walk of the tree of products
    (:func:`_tree_factors`; each level's factors built once, not once per use): with ``S`` the keys'
    scores (strictly below the diagonal) and ``P`` the queries' (on and below it),

    - ``Σ_j da[r, j] S[r, j]`` per row ``[C]`` (dβ's part through ``diag(β) S``),
    - the adjoint of ``diag(β) S`` given ``da``: its rows' part ``[C, BK]``,
    - the adjoint of ``P`` given ``dpm``: its rows' (the queries') part ``[C, BK]``,
    - and the keys' (columns') part of both adjoints, summed ``[C, BK]`` (``_grads`` uses only the sum).

    Equal to :func:`_intra_channel` and two :func:`_intra_channel_adjoint` calls (whose three walks
    each built every level's exponentials and loaded its reference rows)."""
    r = tl.arange(0, C)
    valid = i_t * C + r < T
    dav = tl.where(valid[:, None], da, 0.)
    dsb = dav * bt[:, None]
    dpv = tl.where(valid[:, None], dpm, 0.)
    dbs = tl.zeros([C], dtype=tl.float32)
    dkr = tl.zeros([C, BK], dtype=tl.float32)
    dqa = tl.zeros([C, BK], dtype=tl.float32)
    dkc = tl.zeros([C, BK], dtype=tl.float32)
    for lvl in range(0, 7):  # not unrolled, as in _intra_channel
        h = tl.full([], C, tl.int32) >> (lvl + 1)
        if h >= 1:
            ex, ek, pair = _tree_factors(b, bcum, tok, i_t, T, H, K, C, BK, h)
            kek = kf * ek
            kex = kf * ex
            d1 = tl.where(pair, dsb, 0.)
            d2 = tl.where(pair, dpv, 0.)
            dbs += tl.sum(tl.where(pair, dav, 0.) * tl.dot(kex, tl.trans(kek), input_precision=PREC), axis=1)
            dkr += tl.dot(d1, kek, input_precision=PREC) * ex
            dqa += tl.dot(d2, kek, input_precision=PREC) * ex
            dkc += tl.trans(tl.dot(tl.trans(kex), d1, input_precision=PREC)
                            + tl.dot(tl.trans(qf * ex), d2, input_precision=PREC)) * ek
    # the diagonal: S has none; P's is Σ_c q_rc k_rc
    dd = tl.sum(tl.where(r[:, None] == r[None, :], dpv, 0.), axis=1)
    dqa += dd[:, None] * kf
    dkc += dd[:, None] * qf
    return dbs, dkr, dqa, dkc


@triton.jit
def _grads(q, k, v, beta, bcum, tm, hs, dhs, vn, dvn, do, dq, dk, dv, dbeta, db, scale, T, NT, H: tl.constexpr,
           K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           PREC: tl.constexpr):
    """dq, dk, dv, dβ and ``db`` (the gradient of ``bcum``) of one chunk, from the chunk-start state
    ``h0``, the gradient of the chunk-end state ``dh1`` and the total gradient of the values written
    ``dVn``. Shapes: q, k, dq, dk, bcum, db ``[B, T, H, K]`` (bcum, db float32); v, vn, dvn, do, dv
    ``[B, T, H, V]``; beta, dbeta ``[B, T, H]``; tm ``[B, T, H, 2C]`` float32 (T of each chunk, by
    rows, in its first C columns); hs, dhs ``[B, NT, H, K, V]`` (the state at each chunk's start,
    the gradient at its end)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    r = tl.arange(0, C)
    row = (i_b * T + i_t * C + r) * H + i_h
    b, bl, valid = _channel_decays(bcum, tok, i_t, T, H, K, C, BK)
    bt = tl.load(beta + row, mask=valid, other=0.).to(tl.float32)
    qf = tl.load(_rows(q, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1),
                 padding_option="zero").to(tl.float32)
    kf = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1),
                 padding_option="zero").to(tl.float32)
    eb = tl.where(valid[:, None], tl.exp(b), 0.)
    kg = kf * eb  # K ⊙ e^b
    ek = tl.where(valid[:, None], tl.exp(bl[None, :] - b), 0.)  # e^{b_C − b}
    # Tᵀ loaded by address (a transposed block pointer), not by tl.trans of a tile (fla issue 640)
    tmt = tl.load(tl.make_block_ptr(tm + tok * 2 * C, (C, T), (1, H * 2 * C), (0, i_t * C), (C, C), (0, 1)),
                  boundary_check=(0, 1), padding_option="zero")
    dqh = tl.zeros([C, BK], dtype=tl.float32)   # dO h0ᵀ
    dkd = tl.zeros([C, BK], dtype=tl.float32)   # Vn dh1ᵀ
    dw = tl.zeros([C, BK], dtype=tl.float32)    # dW = −dVn h0ᵀ
    dp = tl.zeros([C, C], dtype=tl.float32)     # dO Vnᵀ
    dtm = tl.zeros([C, C], dtype=tl.float32)    # dT
    hdh = tl.zeros([BK], dtype=tl.float32)      # Σ_v h0 ⊙ dh1 per key channel
    dbt = tl.zeros([C], dtype=tl.float32)
    base = ((i_b * NT + i_t) * H + i_h) * K * V
    # the four products of stored tiles take them as stored (bf16 operands for bf16 inputs): the same
    # products as float32 operands, since bf16 values are exact in TF32, at half the registers
    dt = vn.dtype.element_ty
    for i_v in range(tl.cdiv(V, BV)):
        hb = tl.load(tl.make_block_ptr(hs + base, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0)),
                     boundary_check=(0, 1), padding_option="zero").to(dt)
        dhb = tl.load(tl.make_block_ptr(dhs + base, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0)),
                      boundary_check=(0, 1), padding_option="zero").to(dt)
        vf = tl.load(_rows(v, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                     padding_option="zero").to(tl.float32)
        vnb = tl.load(_rows(vn, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                      padding_option="zero")
        dvnb = tl.load(_rows(dvn, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                       padding_option="zero").to(dt)
        dob = tl.load(_rows(do, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                      padding_option="zero").to(dt)
        dqh += tl.dot(dob, tl.trans(hb), input_precision=PREC)
        dkd += tl.dot(vnb, tl.trans(dhb), input_precision=PREC)
        dw -= tl.dot(dvnb, tl.trans(hb), input_precision=PREC)
        dp += tl.dot(dob, tl.trans(vnb), input_precision=PREC)
        hdh += tl.sum(hb.to(tl.float32) * dhb.to(tl.float32), axis=1)
        # U = T diag(β) V, and Vn = U − W h0: dU = dVn
        dvnf = dvnb.to(tl.float32)
        dtm += tl.dot(dvnf, tl.trans(vf * bt[:, None]), input_precision=PREC)
        dvu = tl.dot(tmt, dvnf, input_precision=PREC)  # Tᵀ dU
        tl.store(_rows(dv, tok, T, H, V, i_t * C, i_v * BV, C, BV), (dvu * bt[:, None]).to(dv.dtype.element_ty),
                 boundary_check=(0, 1))
        dbt += tl.sum(dvu * vf, axis=1)
    # W = T diag(β) (K ⊙ e^b)
    dtm += tl.dot(dw, tl.trans(kg * bt[:, None]), input_precision=PREC)
    dkg = tl.dot(tmt, dw, input_precision=PREC)  # Tᵀ dW
    dbt += tl.sum(dkg * kg, axis=1)
    dkg = dkg * bt[:, None]
    dkb = dkg * eb
    dbb = dkg * kg
    # T = (I + diag(β) S)⁻¹  ⇒  d(diag(β) S) = −Tᵀ dT Tᵀ, kept strictly below the diagonal
    strict = r[:, None] > r[None, :]
    da = tl.where(strict, -tl.dot(tl.dot(tmt, dtm, input_precision=PREC), tmt, input_precision=PREC), 0.)
    # O = scale ((Q ⊙ e^b) h0 + P Vn)
    incl = (r[:, None] >= r[None, :]) & valid[:, None]
    if CHANNEL_TREE:
        dbs, dkr, dqa, dkc = _tree_adjoints(kf, qf, b, bcum, da, bt, tl.where(incl, dp, 0.) * scale, tok, i_t, T,
                                            H, K, C, BK, PREC)
        dbt += dbs
        dkb += dkr + dkc
        dqb = dqh * eb * scale + dqa
        dbb += kf * (dkr - dkc) + qf * dqb
    else:
        s = tl.where(strict, _intra_channel(kf, b, k, bcum, tok, i_t, T, H, K, C, BK, PREC), 0.)
        dbt += tl.sum(da * s, axis=1)
        dkr, dkc = _intra_channel_adjoint(kf, b, k, bcum, da * bt[:, None], tok, i_t, T, H, K, C, BK, PREC)
        dkb += dkr + dkc
        dbb += kf * (dkr - dkc)
        dqa, dka = _intra_channel_adjoint(qf, b, k, bcum, tl.where(incl, dp, 0.) * scale, tok, i_t, T, H, K, C, BK,
                                          PREC)
        dqb = dqh * eb * scale + dqa
        dkb += dka
        dbb += qf * dqb - kf * dka
    # h1 = diag(e^{b_C}) h0 + (K ⊙ e^{b_C − b})ᵀ Vn: b_C also scales the carried state and every write
    dks = dkd * ek
    dkb += dks
    dbb -= kf * dks
    last = tl.minimum(i_t * C + C - 1, T - 1) - i_t * C
    extra = tl.exp(bl) * hdh + tl.sum(kf * dks, axis=0)
    dbb += tl.where((r == last)[:, None], extra[None, :], 0.)
    tl.store(_rows(dq, tok, T, H, K, i_t * C, 0, C, BK), dqb.to(dq.dtype.element_ty), boundary_check=(0, 1))
    tl.store(_rows(dk, tok, T, H, K, i_t * C, 0, C, BK), dkb.to(dk.dtype.element_ty), boundary_check=(0, 1))
    tl.store(dbeta + row, dbt.to(dbeta.dtype.element_ty), mask=valid)
    tl.store(_rows(db, tok, T, H, K, i_t * C, 0, C, BK), dbb, boundary_check=(0, 1))


class _Kernels:
    prepare = _prepare
    dv_local = _dv_local
    grads = _grads


def kernels() -> type[_Kernels]:
    """The kernels (compiled on the GPU; interpreted when ``TRITON_INTERPRET=1`` was set before triton
    was first imported)."""
    return _Kernels
