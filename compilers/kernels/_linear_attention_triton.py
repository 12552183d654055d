"""Triton kernels of chunked linear attention with an optional decay per token and head, or per token,
head and key channel (GLA's).

Per token (the state ``h [K, V]``, ``α_t = exp(g_t)``, or 1 without ``g``)::

    h_t = α_t h_{t−1} + k_t v_tᵀ,     o_t = scale · h_tᵀ q_t

Per chunk of ``C`` tokens from ``h`` (``b = cumsum(g)`` inside the chunk, ``b_C`` its last value,
``Γ[r, j] = exp(b_r − b_j)`` for ``j ≤ r``)::

    O  = scale (diag(e^b) Q h + (Q Kᵀ ⊙ Γ) V)
    h' = e^{b_C} h + (diag(e^{b_C − b}) K)ᵀ V

Forward: ``_chunk_cumsum`` (``b``) → ``_state_fwd`` (the chunk recurrence, one program per (V block,
K block, batch·head), the state in registers, the chunk-start states stored in bf16 for bf16 inputs)
→ ``_output`` (parallel over chunks). Backward: ``_state_bwd`` (the reverse recurrence of ``dh``, the
gradient of the state at each chunk's end) → ``_grads`` (dq, dk, dv and ``db``, the gradient of
``b``) → ``_chunk_cumsum`` reversed (``dg``, db's reverse cumulative sum inside each chunk). The
chunk-start states are recomputed in the backward instead of kept.

With a decay per key channel (``GK``; ``g, b [C, K]``, ``h_t = diag(α_t) h_{t−1} + k_t v_tᵀ``) the
chunk is::

    O  = scale ((Q ⊙ e^b) h + A V),   A[r, j] = Σ_c q_rc k_jc e^{b_rc − b_jc}  (j ≤ r)
    h' = diag(e^{b_C}) h + (K ⊙ e^{b_C − b})ᵀ V

``A`` is not a product of two matrices that stays bounded (``K ⊙ e^{−b}`` overflows once a chunk
decays by e^{−88}), so ``_output_channel`` and ``_grads_channel`` build it, and its adjoints, in two
parts (:func:`_intra_channel`): against the keys of earlier 16-row sub-blocks, one ``tl.dot``
per sub-block through a reference row between them (both factors ≤ 1); against the keys of
a row's own sub-block, one key offset at a time with every exponent ``b_r − b_j ≤ 0``, on the CUDA
cores (16 steps). Exact at any decay. With ``CHANNEL_TREE`` (the default; ``NLGRAPH_CHANNEL_TREE=0``
takes the offsets) the whole of ``A`` is a tree of reference rows instead: halves of the chunk, of
each half, … down to single rows, one masked ``tl.dot`` a level (:func:`_tree_factors`), also with
both factors ≤ 1; on an H100 it ran GLA's forward + backward 1.58x and KDA's 1.57x faster than the
offsets.
Every kernel masks the rows past T with the future tokens: they read ``b = 0``, so ``b_r − b_j``
would be ``−b_j > 0`` there, which overflows (and ``inf · 0`` is NaN in the sums over rows).
The state recurrences are the scalar kernels with the decays per channel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._delta_rule_triton import INTERPRETED, _channel_decays, _rows
from ._load import switch

__all__ = ["CHANNEL_TREE", "INTERPRETED", "kernels"]

# How :func:`_intra_channel` and its adjoint score a row against the keys of its own chunk: a tree of
# masked products (on, :func:`_tree_factors`: log2(C) tensor-core products and as many exponentials
# of a [C, BK] tile), or the keys of its own 16-row sub-block one offset at a time on the CUDA cores
# (off: 16 exponentials, loads and row sums of a [C, BK] tile). Both are exact at any decay and
# checked on the GPU; the tree is the faster there (docs/benchmarks.md), so the default. Read when this
# module is imported (``NLGRAPH_CHANNEL_TREE=0`` for the offsets); the kernel tests, under Triton's
# interpreter, set it per case.
CHANNEL_TREE = tl.constexpr(switch("NLGRAPH_CHANNEL_TREE", True))


@triton.jit
def _chunk_cumsum(x, y, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  REVERSE: tl.constexpr):
    """``y`` (float32): the cumulative sum of ``x [B, T, H, K]`` along T restarted at every chunk of
    ``C`` tokens, or with ``REVERSE`` its reverse (the adjoint); a program per chunk and batch·head.
    (In PyTorch, a pad, a cumsum over a view and a copy, and two flips for the reverse, took 0.20
    and 0.42 ms at B=4, T=4096, H=16, K=128 on an H100.)"""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    t = i_t * C + tl.arange(0, C)
    c = tl.arange(0, BK)
    at = ((i_b * T + t)[:, None] * H + i_h) * K + c[None, :]
    ok = (t < T)[:, None] & (c < K)[None, :]
    xs = tl.load(x + at, mask=ok, other=0.).to(tl.float32)
    tl.store(y + at, tl.cumsum(xs, axis=0, reverse=REVERSE), mask=ok)


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
               STORE_HT: tl.constexpr, PREC: tl.constexpr, GK: tl.constexpr = False):
    """The chunk-start states ``hs``: a program per (value block, key block, batch·head). The rows of
    the state are independent (a decay per head or per key row), so the keys split into blocks too:
    more programs walk the chunks at once, each with a smaller state."""
    i_v, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = k.dtype.element_ty
    h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p0 = tl.make_block_ptr(h0 + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        h += tl.load(p0, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    for i_t in range(NT):
        p_h = tl.make_block_ptr(hs + ((i_b * NT + i_t) * H + i_h) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV),
                                (BK, BV), (1, 0))
        tl.store(p_h, h.to(hs.dtype.element_ty), boundary_check=(0, 1))
        kb = tl.load(_rows(k, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        vb = tl.load(_rows(v, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1), padding_option="zero")
        if GK:
            bk, blk, valid = _channel_decays(bcum, tok, i_t, T, H, K, C, BK, i_k * BK)
            kb = (kb.to(tl.float32) * tl.where(valid[:, None], tl.exp(blk[None, :] - bk), 0.)).to(dt)
            h = h * tl.exp(blk)[:, None]
        elif USE_G:
            b, bl, valid = _decays(bcum, i_b, i_h, i_t, T, H, C, USE_G)
            kb = (kb.to(tl.float32) * tl.where(valid, tl.exp(bl - b), 0.)[:, None]).to(dt)
            h = h * tl.exp(bl)
        h += tl.dot(tl.trans(kb), vb, input_precision=PREC)
    if STORE_HT:
        pt = tl.make_block_ptr(ht + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
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
    # rows past T read b = 0, so their exponent b_r − b_j = −b_j may overflow: masked with them
    causal = (r[:, None] >= r[None, :]) & valid[:, None]
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
               STORE_DH0: tl.constexpr, PREC: tl.constexpr, GK: tl.constexpr = False):
    """The reverse recurrence of ``dh``, blocked as :func:`_state_fwd`."""
    i_v, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        pt = tl.make_block_ptr(dht + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        dh += tl.load(pt, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    for j in range(NT):
        i_t = NT - 1 - j
        p_dh = tl.make_block_ptr(dhs + ((i_b * NT + i_t) * H + i_h) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV),
                                 (BK, BV), (1, 0))
        tl.store(p_dh, dh.to(dhs.dtype.element_ty), boundary_check=(0, 1))
        qb = tl.load(_rows(q, tok, T, H, K, i_t * C, i_k * BK, C, BK), boundary_check=(0, 1), padding_option="zero")
        dob = tl.load(_rows(do, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                      padding_option="zero")
        if GK:
            bk, blk, valid = _channel_decays(bcum, tok, i_t, T, H, K, C, BK, i_k * BK)
            qb = (qb.to(tl.float32) * tl.exp(bk)).to(dt)
            dh = dh * tl.exp(blk)[:, None]
        elif USE_G:
            b, bl, valid = _decays(bcum, i_b, i_h, i_t, T, H, C, USE_G)
            qb = (qb.to(tl.float32) * tl.exp(b)[:, None]).to(dt)
            dh = dh * tl.exp(bl)
        dh += tl.dot(tl.trans(qb), dob, input_precision=PREC) * scale
    if STORE_DH0:
        p0 = tl.make_block_ptr(dh0 + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p0, dh.to(dh0.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _value_blocks(v, hs, dhs, do, dv, a, kd, i_b, i_h, i_t, tok, T, NT, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                  A_T: tl.constexpr = False):
    """The backward's walk over value blocks of one chunk (both decays): stores ``dv = K_d dh +
    Aᵀ dO`` (``a`` the scaled scores, or with ``A_T`` already their transpose; ``kd`` the keys times
    their decay to the chunk's end) and returns ``(dO hᵀ [C, BK], V dhᵀ [C, BK], dO Vᵀ [C, C], Σ_v h ⊙ dh per key row [BK])``."""
    dt = v.dtype.element_ty
    ds = tl.zeros([C, C], dtype=tl.float32)
    dq_acc = tl.zeros([C, BK], dtype=tl.float32)
    dks = tl.zeros([C, BK], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
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
        at = a.to(dt) if A_T else tl.trans(a.to(dt))
        dvb = tl.dot(kd, dhb.to(dt), input_precision=PREC) + tl.dot(at, dob, input_precision=PREC)
        tl.store(_rows(dv, tok, T, H, V, i_t * C, i_v * BV, C, BV), dvb.to(dv.dtype.element_ty),
                 boundary_check=(0, 1))
        hdh += tl.sum(hb.to(tl.float32) * dhb.to(tl.float32), axis=1)
    return dq_acc, dks, ds, hdh


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
    # rows past T read b = 0: their exponent −b_j may overflow to inf, and inf · 0 is NaN in the
    # sums over rows below (dv, dk), so they are masked with the future tokens
    causal = (r[:, None] >= r[None, :]) & valid[:, None]
    gam = tl.exp(tl.where(causal, b[:, None] - b[None, :], 0.))
    qb = tl.load(_rows(q, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
    kb = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
    eb = tl.exp(b)
    ek = tl.where(valid, tl.exp(bl - b), 0.)
    a = tl.where(causal, tl.dot(qb, tl.trans(kb), input_precision=PREC) * gam, 0.) * scale  # [C, C]
    kd = (kb.to(tl.float32) * ek[:, None]).to(dt)
    dq_acc, dks, ds, hdh_rows = _value_blocks(v, hs, dhs, do, dv, a, kd, i_b, i_h, i_t, tok, T, NT, H, K, V, C, BK,
                                              BV, PREC)
    hdh = tl.sum(hdh_rows, axis=0)
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


@triton.jit
def _sub_block_factors(b, r, valid, s, live, C: tl.constexpr):
    """``(e^{b − b_ref}`` on the rows of 16-row sub-block ``s``, ``e^{b_ref − b}`` on the rows before
    it``)`` as ``[C, BK]``, 0 elsewhere, with ``b_ref`` the row just before the sub-block: every
    exponent is ≤ 0, so the product of the two factors is bounded, and ``(X e_x)(K e_k)ᵀ`` is the
    sub-block's scores against all earlier keys in one ``tl.dot`` (on the tensor cores for 16-bit
    inputs; float32 inputs multiply in IEEE float32). ``live``: the reference
    row is a real token (else the sub-block has none, and its keys' factor is 0)."""
    ref = s * 16 - 1
    bref = tl.sum(tl.where(r[:, None] == ref, b, 0.), axis=0)
    rows = ((r // 16) == s) & valid
    before = (r < s * 16) & live
    ex = tl.where(rows[:, None], tl.exp(tl.where(rows[:, None], b - bref[None, :], 0.)), 0.)
    ek = tl.where(before[:, None], tl.exp(tl.where(before[:, None], bref[None, :] - b, 0.)), 0.)
    return ex, ek


@triton.jit
def _same_block_keys(k, bcum, tok, i_t, i, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr):
    """``(j [C], k_j [C, BK], b_j [C, BK])``: for every row r, the key ``j`` at offset ``i`` of r's own
    16-row sub-block, with its key and cumulative log decays (0 past T)."""
    r = tl.arange(0, C)
    c = tl.arange(0, BK)
    j = (r // 16) * 16 + i
    at = (tok + (i_t * C + j)[:, None] * H) * K + c[None, :]
    ok = ((i_t * C + j) < T)[:, None] & (c < K)[None, :]
    return j, tl.load(k + at, mask=ok, other=0.).to(tl.float32), tl.load(bcum + at, mask=ok, other=0.)


@triton.jit
def _tree_factors(b, bcum, tok, i_t, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, h):
    """``(e_x, e_k, pair)`` of one level of the tree that splits the chunk into blocks of ``2h`` rows and
    each block into halves of ``h``: the rows of an upper half against the keys of the lower half of the
    same block, through the lower half's last row ``ref`` (``e_x = e^{b − b_ref}`` on upper-half rows,
    ``e_k = e^{b_ref − b}`` on lower-half rows, 0 elsewhere; ``[C, BK]``). Both exponents are ≤ 0, so
    ``((X e_x)(K e_k)ᵀ)[r, j]`` is ``Σ_c x_rc k_jc e^{b_rc − b_jc}`` exactly, at any decay, wherever
    ``pair [C, C]`` holds (r and j in the same block; elsewhere the product pairs a row with the wrong
    block's reference and is dropped). The levels ``h = C/2, C/4, …, 1`` cover every ``j < r`` once."""
    tl.static_assert(C <= 128, "the tree's levels cover chunks up to 128")
    r = tl.arange(0, C)
    c = tl.arange(0, BK)
    valid = i_t * C + r < T
    ref = (r // (2 * h)) * (2 * h) + h - 1
    live = i_t * C + ref < T  # the block's reference row is a real token (else its upper half has none)
    upper = ((r // h) % 2) == 1
    rows = upper & valid
    keys = (r // h) % 2 == 0
    keys = keys & live
    bref = tl.load(bcum + (tok + (i_t * C + ref)[:, None] * H) * K + c[None, :],
                   mask=live[:, None] & (c < K)[None, :], other=0.)
    d = tl.where(rows[:, None], b - bref, tl.where(keys[:, None], bref - b, 0.))
    e = tl.exp(d)
    ex = tl.where(rows[:, None], e, 0.)
    ek = tl.where(keys[:, None], e, 0.)
    pair = (r[:, None] // (2 * h)) == (r[None, :] // (2 * h))
    return ex, ek, pair


@triton.jit
def _intra_channel(xf, b, k, bcum, tok, i_t, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, PREC: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """``A [C, C]`` of a chunk with per-channel decays, ``A[r, j] = Σ_c x_rc k_jc e^{b_rc − b_jc}`` for
    ``j ≤ r`` (0 above the diagonal and on rows past T); ``xf, b [C, BK]`` float32. ``TRANSPOSED``
    builds ``Aᵀ`` instead, for a caller that multiplies by it: ``tl.trans`` of a tile holding a
    ``tl.dot`` result, fed to another ``tl.dot``, is what triton 3.4–3.7 miscompiles on Hopper (fla
    issue 640).

    With ``CHANNEL_TREE`` (the default) the whole of ``A`` is a tree of masked products
    (:func:`_tree_factors`). Otherwise: keys of earlier 16-row sub-blocks, one ``tl.dot`` per
    sub-block through its reference row (:func:`_sub_block_factors`); keys of a row's own
    sub-block, one key offset at a time (16
    steps of ``[C, BK]`` elementwise work), every exponent ``b_r − b_j ≤ 0``, exact at any decay.
    (A factorisation inside a sub-block would need ``e^{b_ref − b_j} ≥ 1``, which overflows once
    16 tokens decay past e^−88.)"""
    r = tl.arange(0, C)
    valid = i_t * C + r < T
    a = tl.zeros([C, C], dtype=tl.float32)
    if CHANNEL_TREE:
        kf = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1),
                     padding_option="zero").to(tl.float32)
        # h = C/2, C/4, …, 1 (chunks up to 128). A loop, not unrolled: the levels' [C, BK] factors are
        # not live at once (unrolled, KDA's backward spilled 5,512 bytes a thread at sm_90, against
        # 2,000 for the offsets' form)
        for lvl in range(0, 7):
            h = tl.full([], C, tl.int32) >> (lvl + 1)
            if h >= 1:
                ex, ek, pair = _tree_factors(b, bcum, tok, i_t, T, H, K, C, BK, h)
                if TRANSPOSED:
                    a += tl.where(pair, tl.dot(kf * ek, tl.trans(xf * ex), input_precision=PREC), 0.)
                else:
                    a += tl.where(pair, tl.dot(xf * ex, tl.trans(kf * ek), input_precision=PREC), 0.)
        # the diagonal: every exponent is 0
        a += tl.where((r[:, None] == r[None, :]) & valid[:, None], tl.sum(xf * kf, axis=1)[:, None], 0.)
    else:
        if C > 16:
            kf = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1),
                         padding_option="zero").to(tl.float32)
            for s in tl.static_range(1, C // 16):
                ex, ek = _sub_block_factors(b, r, valid, s, i_t * C + s * 16 - 1 < T, C)
                if TRANSPOSED:
                    a += tl.dot(kf * ek, tl.trans(xf * ex), input_precision=PREC)
                else:
                    a += tl.dot(xf * ex, tl.trans(kf * ek), input_precision=PREC)
        for i in range(16):
            j, kj, bj = _same_block_keys(k, bcum, tok, i_t, i, T, H, K, C, BK)
            below = ((r % 16) >= i) & valid
            col = tl.where(below, tl.sum(xf * kj * tl.exp(tl.where(below[:, None], b - bj, 0.)), axis=1), 0.)
            if TRANSPOSED:  # Aᵀ[j_r, r] = col[r]
                a += tl.where(r[:, None] == j[None, :], col[None, :], 0.)
            else:
                a += tl.where(r[None, :] == j[:, None], col[:, None], 0.)
    return a


@triton.jit
def _intra_channel_adjoint(xf, b, k, bcum, ds, tok, i_t, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                           BK: tl.constexpr, PREC: tl.constexpr):
    """The adjoints of ``A[r, j] = Σ_c x_rc k_jc e^{b_rc − b_jc}`` (``j ≤ r``, as :func:`_intra_channel`)
    given ``ds = ∂L/∂A [C, C]`` (used on and below the diagonal, valid rows only), in the same two
    parts: ``(∂L/∂x [C, BK], ∂L/∂k [C, BK])`` through A alone. The gradient of ``b`` is
    ``x ⊙ ∂L/∂x − k ⊙ ∂L/∂k``. The one ``tl.trans`` of a product here feeds no other product (fla
    issue 640's Hopper pattern is a transposed product fed to a ``tl.dot``)."""
    r = tl.arange(0, C)
    valid = i_t * C + r < T
    dx = tl.zeros([C, BK], dtype=tl.float32)
    dk = tl.zeros([C, BK], dtype=tl.float32)
    if CHANNEL_TREE:
        kf = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1),
                     padding_option="zero").to(tl.float32)
        dsv = tl.where(valid[:, None], ds, 0.)
        for lvl in range(0, 7):  # not unrolled, as in _intra_channel
            h = tl.full([], C, tl.int32) >> (lvl + 1)
            if h >= 1:
                ex, ek, pair = _tree_factors(b, bcum, tok, i_t, T, H, K, C, BK, h)
                dss = tl.where(pair, dsv, 0.)
                dx += tl.dot(dss, kf * ek, input_precision=PREC) * ex
                dk += tl.trans(tl.dot(tl.trans(xf * ex), dss, input_precision=PREC)) * ek
        dd = tl.sum(tl.where(r[:, None] == r[None, :], dsv, 0.), axis=1)  # ds on the diagonal
        dx += dd[:, None] * kf
        dk += dd[:, None] * xf
    else:
        if C > 16:
            kf = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1),
                         padding_option="zero").to(tl.float32)
            for s in tl.static_range(1, C // 16):
                ex, ek = _sub_block_factors(b, r, valid, s, i_t * C + s * 16 - 1 < T, C)
                dss = tl.where(((r // 16) == s)[:, None] & valid[:, None] & (r[None, :] < s * 16), ds, 0.)
                dx += tl.dot(dss, kf * ek, input_precision=PREC) * ex
                dk += tl.trans(tl.dot(tl.trans(xf * ex), dss, input_precision=PREC)) * ek
        for i in range(16):
            j, kj, bj = _same_block_keys(k, bcum, tok, i_t, i, T, H, K, C, BK)
            below = ((r % 16) >= i) & valid
            dsj = tl.where(below, tl.sum(tl.where(r[None, :] == j[:, None], ds, 0.), axis=1), 0.)
            e = tl.exp(tl.where(below[:, None], b - bj, 0.)) * dsj[:, None]  # [C, BK]
            dx += e * kj
            # key j = 16 s + i gathers the rows of its sub-block s
            red = tl.sum(tl.reshape(e * xf, [C // 16, 16, BK]), axis=1)
            dk += tl.where(((r % 16) == i)[:, None], tl.reshape(tl.broadcast_to(red[:, None, :], [C // 16, 16, BK]),
                                                                  [C, BK]), 0.)
    return dx, dk


@triton.jit
def _output_channel(q, k, v, bcum, hs, pm, o, scale, T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                    STORE_P: tl.constexpr):
    """One chunk's output, all value blocks: ``A`` is built once and used for each block (a program
    per value block built it once per block, 2x the work at Dv = 128, BV = 64). ``STORE_P`` also
    writes ``A`` (float32, before its cast) into columns ``C .. 2C`` of ``pm [B, T, H, 2C]``, for the
    per-channel delta rule's backward (``_dv_local`` reads it instead of building it again)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    b, bl, valid = _channel_decays(bcum, tok, i_t, T, H, K, C, BK)
    qb = tl.load(_rows(q, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
    qf = qb.to(tl.float32)
    af = _intra_channel(qf, b, k, bcum, tok, i_t, T, H, K, C, BK, PREC)
    if STORE_P:
        tl.store(_rows(pm, tok, T, H, 2 * C, i_t * C, C, C, C), af, boundary_check=(0, 1))
    a = af.to(dt)
    qe = (qf * tl.exp(b)).to(dt)
    for i_v in range(tl.cdiv(V, BV)):
        p_h = tl.make_block_ptr(hs + ((i_b * NT + i_t) * H + i_h) * K * V, (K, V), (V, 1), (0, i_v * BV),
                                (BK, BV), (1, 0))
        hb = tl.load(p_h, boundary_check=(0, 1), padding_option="zero")
        vb = tl.load(_rows(v, tok, T, H, V, i_t * C, i_v * BV, C, BV), boundary_check=(0, 1),
                     padding_option="zero")
        ob = (tl.dot(qe, hb.to(dt), input_precision=PREC) + tl.dot(a, vb, input_precision=PREC)) * scale
        tl.store(_rows(o, tok, T, H, V, i_t * C, i_v * BV, C, BV), ob.to(o.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _grads_channel(q, k, v, bcum, hs, dhs, do, dq, dk, dv, db, scale, T, NT, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dq, dk, dv and ``db [C, K]`` (the gradient of the chunk's cumulative log decays) of one chunk."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    tok = i_b * T * H + i_h
    dt = q.dtype.element_ty
    r = tl.arange(0, C)
    b, bl, valid = _channel_decays(bcum, tok, i_t, T, H, K, C, BK)
    qb = tl.load(_rows(q, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
    kb = tl.load(_rows(k, tok, T, H, K, i_t * C, 0, C, BK), boundary_check=(0, 1), padding_option="zero")
    qf, kf = qb.to(tl.float32), kb.to(tl.float32)
    ek = tl.where(valid[:, None], tl.exp(bl[None, :] - b), 0.)  # [C, BK]
    kd = (kf * ek).to(dt)
    at = _intra_channel(qf, b, k, bcum, tok, i_t, T, H, K, C, BK, PREC, TRANSPOSED=True) * scale  # Aᵀ [C, C]
    dq_acc, dks, ds, hdh = _value_blocks(v, hs, dhs, do, dv, at, kd, i_b, i_h, i_t, tok, T, NT, H, K, V, C, BK, BV,
                                         PREC, A_T=True)
    # the adjoints of A: dA = scale · dO Vᵀ below the diagonal
    dqa, dka = _intra_channel_adjoint(qf, b, k, bcum, ds * scale, tok, i_t, T, H, K, C, BK, PREC)
    dqb = dq_acc * tl.exp(b) * scale + dqa
    dks = dks * ek
    dkb = dks + dka
    tl.store(_rows(dq, tok, T, H, K, i_t * C, 0, C, BK), dqb.to(dq.dtype.element_ty), boundary_check=(0, 1))
    tl.store(_rows(dk, tok, T, H, K, i_t * C, 0, C, BK), dkb.to(dk.dtype.element_ty), boundary_check=(0, 1))
    dbr = qf * dqb - kf * dkb
    # b_C, the chunk's last value, also scales the carried state and every key's write
    last = tl.minimum(i_t * C + C - 1, T - 1) - i_t * C
    extra = tl.exp(bl) * hdh + tl.sum(kf * dks, axis=0)  # [BK]
    dbr += tl.where((r == last)[:, None], extra[None, :], 0.)
    tl.store(_rows(db, tok, T, H, K, i_t * C, 0, C, BK), dbr, boundary_check=(0, 1))


class _Kernels:
    chunk_cumsum = _chunk_cumsum
    state_fwd = _state_fwd
    output = _output
    state_bwd = _state_bwd
    grads = _grads
    output_channel = _output_channel
    grads_channel = _grads_channel


def kernels() -> type[_Kernels]:
    """The kernels (compiled on the GPU; interpreted when ``TRITON_INTERPRET=1`` was set before triton
    was first imported)."""
    return _Kernels
