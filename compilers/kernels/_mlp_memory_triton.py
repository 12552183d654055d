"""Triton kernels of the mini-batch MLP memory (Titans' form), forward and backward: see ``mlp_memory.py``.

Kept apart from the wrapper so that importing the package never imports Triton; the wrapper builds
these kernels on first use. One program per (batch, head) walks the chunks in order; the memory's
weights and momentum (fp32) live in the state buffers, which one program owns, and each chunk reads
them in blocks of ``BF`` hidden units, twice:

* pass 1: the memory's output at the chunk's keys, ``Y = W1 σ(W0 K)`` (the gradient point), so the
  output errors ``E1 = η (Y − V)`` are known;
* pass 2, per hidden block: the hidden errors ``E0 = (E1 W1) ⊙ σ'(Z)``, the reads through the
  per-token weights (``Zq = g·Q W0ᵀ + z·Q S0ᵀ − (QKᵀ ⊙ Ω) E0``, ``Aq = σ(Zq)``, the output's
  block terms), and the block's end state, written over the old one.

The output's last term, ``(Aq Aᵀ ⊙ Ω) E1``, sums over all hidden blocks, so ``Aq Aᵀ`` is
accumulated and applied after pass 2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._delta_rule_triton import INTERPRETED  # noqa: F401  (read by the loader: one interpreter flag)


@triton.jit
def _silu(z):
    return z * tl.sigmoid(z)


@triton.jit
def _silu_grad(z):
    s = tl.sigmoid(z)
    return s + z * s * (1.0 - s)


@triton.jit
def _silu_grad2(z):
    s = tl.sigmoid(z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """``a @ b`` in float32: through ``tl.dot``'s ``PREC`` (``ieee``, ``tf32``), or with both
    operands rounded to 16 bits first (``bf16``, ``fp16``: half the tensor-core instructions of TF32)."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _block_reads(qb, qk, e0, w0b, s0b, w1b, s1b, ab, g0, z0, PREC: tl.constexpr):
    """One hidden block's part of the chunk's reads: ``(g0 ⊙ (Aq W1ᵀ) + z0 ⊙ (Aq S1ᵀ), Aq Aᵀ)``
    with ``Aq = σ(g0 ⊙ Q W0ᵀ + z0 ⊙ Q S0ᵀ − ((Q Kᵀ) ⊙ Ω) E0)``."""
    zq = (g0[:, None] * _mm(qb, tl.trans(w0b), PREC)
          + z0[:, None] * _mm(qb, tl.trans(s0b), PREC)
          - _mm(qk, e0, PREC))
    aq = _silu(zq)
    out = g0[:, None] * _mm(aq, tl.trans(w1b), PREC) + z0[:, None] * _mm(aq, tl.trans(s1b), PREC)
    return out, _mm(aq, tl.trans(ab), PREC)


@triton.jit
def _end_state(w0b, s0b, w1b, s1b, e0, e1, kb, ab, gl, zl, yl, oml, yll, PREC: tl.constexpr):
    """One hidden block's state at the chunk's last token L: ``(W0, S0, W1, S1)``."""
    w0n = gl * w0b + zl * s0b - _mm(tl.trans(e0), kb * oml[:, None], PREC)
    s0n = yl * s0b - _mm(tl.trans(e0), kb * yll[:, None], PREC)
    w1n = gl * w1b + zl * s1b - _mm(tl.trans(e1), ab * oml[:, None], PREC)
    s1n = yl * s1b - _mm(tl.trans(e1), ab * yll[:, None], PREC)
    return w0n, s0n, w1n, s1n


@triton.jit
def _tokens(i_b, i_h, i_t, T, H: tl.constexpr, C: tl.constexpr, md):
    """Chunk ``i_t``'s token rows in a ``[B, T, H, ...]`` tensor, their mask, and the mask of a
    ``[C, D]`` tile of them."""
    tok = i_t * C + tl.arange(0, C)
    mt = tok < T
    return (i_b * T + tok).to(tl.int64) * H + i_h, mt, mt[:, None] & md[None, :]


@triton.jit
def _load_tokens(x, row, rd, D: tl.constexpr, mtd):
    """A ``[C, D]`` tile of ``x [B, T, H, D]`` at the chunk's rows, in float32 (zeros past ``T``)."""
    return tl.load(x + row[:, None] * D + rd[None, :], mask=mtd, other=0.).to(tl.float32)


@triton.jit
def _block(i_f, rf, rd, md, F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr):
    """Hidden block ``i_f``: its units ``f``, their mask, the masks of a ``[BF, D]`` (W0-shaped) and
    a ``[D, BF]`` (W1-shaped) tile, and those tiles' offsets in one ``[F, D]`` / ``[D, F]`` matrix."""
    f = i_f * BF + rf
    mf = f < F
    return (mf[:, None] & md[None, :], md[:, None] & mf[None, :], f[:, None] * D + rd[None, :],
            rd[:, None] * F + f[None, :], f, mf)


@triton.jit
def _coefficients(cg0, cz0, com, cend, coml, cyll, i_bh, i_t, NT, C: tl.constexpr):
    """The chunk's transfer coefficients: per token row r, ``G[r, 0]``, ``Ω[r, 0] − G[r, 0]``, the
    ``[C, C]`` block ``Ω[r, j]`` (r, j ≥ 1), and at the chunk's last token L: ``G[L, 0]``,
    ``Ω[L, 0] − G[L, 0]``, ``Y[L, 0]``, ``Ω[L, j]``, ``Y[L, j]``."""
    rc = tl.arange(0, C)
    row = i_bh.to(tl.int64) * NT + i_t
    g0 = tl.load(cg0 + row * C + rc)
    z0 = tl.load(cz0 + row * C + rc)
    omr = tl.load(com + row * C * C + rc[:, None] * C + rc[None, :])
    gl = tl.load(cend + row * 3)
    zl = tl.load(cend + row * 3 + 1)
    yl = tl.load(cend + row * 3 + 2)
    oml = tl.load(coml + row * C + rc)
    yll = tl.load(cyll + row * C + rc)
    return g0, z0, omr, gl, zl, yl, oml, yll


@triton.jit
def _mlp_memory_fwd(q, k, v, eta, cg0, cz0, com, cend, coml, cyll, w0, w1, s0, s1, hw0, hw1, hs0, hs1, o,
                    T, NT, C0, C1, R, NH, H: tl.constexpr, D: tl.constexpr, F: tl.constexpr, C: tl.constexpr,
                    BD: tl.constexpr, BF: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    md = rd < D
    st = i_bh.to(tl.int64) * F * D  # one matrix of the state
    for i_t in range(C0, C1):
        row, mt, mtd = _tokens(i_b, i_h, i_t, T, H, C, md)
        kb = _load_tokens(k, row, rd, D, mtd)
        vb = _load_tokens(v, row, rd, D, mtd)
        qb = _load_tokens(q, row, rd, D, mtd)
        et = tl.load(eta + row, mask=mt, other=0.).to(tl.float32)
        g0, z0, omr, gl, zl, yl, oml, yll = _coefficients(cg0, cz0, com, cend, coml, cyll, i_bh, i_t, NT, C)
        qk = _mm(qb, tl.trans(kb), PREC) * omr  # (Q Kᵀ) ⊙ Ω
        # pass 1: Y = W1 σ(W0 k) at the chunk-start weights
        yacc = tl.zeros([C, BD], dtype=tl.float32)
        for i_f in range(tl.cdiv(F, BF)):
            mfd, mdf, p0, p1, f, mf = _block(i_f, rf, rd, md, F, D, BF)
            w0b = tl.load(w0 + st + p0, mask=mfd, other=0.)        # [BF, D]
            w1b = tl.load(w1 + st + p1, mask=mdf, other=0.)        # [D, BF]
            zb = _mm(kb, tl.trans(w0b), PREC)  # [C, BF]
            yacc += _mm(_silu(zb), tl.trans(w1b), PREC)
        e1 = et[:, None] * (yacc - vb)                                                        # [C, D]
        # pass 2: hidden errors, reads, end state, block by block
        oacc = tl.zeros([C, BD], dtype=tl.float32)
        pacc = tl.zeros([C, C], dtype=tl.float32)
        for i_f in range(tl.cdiv(F, BF)):
            mfd, mdf, o0, o1, f, mf = _block(i_f, rf, rd, md, F, D, BF)
            p0, p1 = st + o0, st + o1
            w0b = tl.load(w0 + p0, mask=mfd, other=0.)
            s0b = tl.load(s0 + p0, mask=mfd, other=0.)
            w1b = tl.load(w1 + p1, mask=mdf, other=0.)
            s1b = tl.load(s1 + p1, mask=mdf, other=0.)
            if SAVE:  # every R-th chunk-start state, for the backward (slot (i_t − C0) / R of NH)
                if (i_t - C0) % R == 0:
                    hs = (i_bh.to(tl.int64) * NH + (i_t - C0) // R) * F * D
                    tl.store(hw0 + hs + o0, w0b, mask=mfd)
                    tl.store(hs0 + hs + o0, s0b, mask=mfd)
                    tl.store(hw1 + hs + o1, w1b, mask=mdf)
                    tl.store(hs1 + hs + o1, s1b, mask=mdf)
            zb = _mm(kb, tl.trans(w0b), PREC)
            ab = _silu(zb)
            e0 = _mm(e1, w1b, PREC) * _silu_grad(zb)  # [C, BF]
            read_o, read_p = _block_reads(qb, qk, e0, w0b, s0b, w1b, s1b, ab, g0, z0, PREC)
            oacc += read_o
            pacc += read_p
            # the block's end state (token L, the chunk's last)
            w0n, s0n, w1n, s1n = _end_state(w0b, s0b, w1b, s1b, e0, e1, kb, ab, gl, zl, yl, oml, yll, PREC)
            tl.store(w0 + p0, w0n, mask=mfd)
            tl.store(s0 + p0, s0n, mask=mfd)
            tl.store(w1 + p1, w1n, mask=mdf)
            tl.store(s1 + p1, s1n, mask=mdf)
        ob = oacc - _mm(pacc * omr, e1, PREC)
        tl.store(o + row[:, None] * D + rd[None, :], ob.to(o.dtype.element_ty), mask=mtd)
        # the next chunk reads the state this one wrote, from other threads of the program
        tl.debug_barrier()


@triton.jit
def _mlp_memory_bwd(q, k, v, eta, cg0, cz0, com, cend, coml, cyll, hw0, hw1, hs0, hs1, do,
                    dw0, dw1, ds0, ds1, scr, dq, dk, dv, deta, dg0, dz0, dom, dend, doml, dyll,
                    T, NT, C0, C1, H: tl.constexpr, D: tl.constexpr, F: tl.constexpr, C: tl.constexpr,
                    BD: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr):
    """Chunks ``C1 − 1`` down to ``C0`` in reverse, their start states in slots ``i_t − C0`` of
    ``hw0 .. hs1`` (saved by the forward, or recomputed from a checkpoint). ``dw0 .. ds1`` hold the
    gradient of the state after the chunk (the final state's gradient at first) and are overwritten
    with that of the state before it. Three passes over the hidden blocks:
    the memory's output at the keys (``Yk``, so ``E1``), then every block-local gradient with
    ``dE1`` accumulated, then the terms that need the whole ``dE1`` (through ``Yk = A W1ᵀ``); ``scr``
    carries each block's partial ``dZ`` from the second pass to the third."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    rc = tl.arange(0, C)
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    md = rd < D
    st = i_bh.to(tl.int64) * F * D
    causal = rc[:, None] >= rc[None, :]
    for i_r in range(C1 - C0):
        i_t = C1 - 1 - i_r
        row, mt, mtd = _tokens(i_b, i_h, i_t, T, H, C, md)
        kb = _load_tokens(k, row, rd, D, mtd)
        vb = _load_tokens(v, row, rd, D, mtd)
        qb = _load_tokens(q, row, rd, D, mtd)
        dob = _load_tokens(do, row, rd, D, mtd)
        et = tl.load(eta + row, mask=mt, other=0.).to(tl.float32)
        g0, z0, omr, gl, zl, yl, oml, yll = _coefficients(cg0, cz0, com, cend, coml, cyll, i_bh, i_t, NT, C)
        hs = (i_bh.to(tl.int64) * (C1 - C0) + (i_t - C0)) * F * D
        qk_raw = _mm(qb, tl.trans(kb), PREC)
        qk = qk_raw * omr
        # pass 1: Yk and E1 at the chunk-start weights
        yk = tl.zeros([C, BD], dtype=tl.float32)
        for i_f in range(tl.cdiv(F, BF)):
            mfd, mdf, p0, p1, f, mf = _block(i_f, rf, rd, md, F, D, BF)
            w0b = tl.load(hw0 + hs + p0, mask=mfd, other=0.)
            w1b = tl.load(hw1 + hs + p1, mask=mdf, other=0.)
            yk += _mm(_silu(_mm(kb, tl.trans(w0b), PREC)), tl.trans(w1b), PREC)
        r1 = yk - vb
        e1 = et[:, None] * r1
        dpm = -_mm(dob, tl.trans(e1), PREC) * omr  # dP ⊙ Ω, [C, C]
        de1 = tl.zeros([C, BD], dtype=tl.float32)
        dqb = tl.zeros([C, BD], dtype=tl.float32)
        dkb = tl.zeros([C, BD], dtype=tl.float32)
        dqk = tl.zeros([C, C], dtype=tl.float32)                                   # ∂/∂(QKᵀ ⊙ Ω)
        pr = tl.zeros([C, C], dtype=tl.float32)                                    # Aq Aᵀ
        d_g0 = tl.zeros([C], dtype=tl.float32)
        d_z0 = tl.zeros([C], dtype=tl.float32)
        d_oml = tl.zeros([C], dtype=tl.float32)
        d_yll = tl.zeros([C], dtype=tl.float32)
        d_gl = 0.
        d_zl = 0.
        d_yl = 0.
        # pass 2: block-local gradients
        for i_f in range(tl.cdiv(F, BF)):
            mfd, mdf, p0, p1, f, mf = _block(i_f, rf, rd, md, F, D, BF)
            w0b = tl.load(hw0 + hs + p0, mask=mfd, other=0.)
            s0b = tl.load(hs0 + hs + p0, mask=mfd, other=0.)
            w1b = tl.load(hw1 + hs + p1, mask=mdf, other=0.)
            s1b = tl.load(hs1 + hs + p1, mask=mdf, other=0.)
            gw0 = tl.load(dw0 + st + p0, mask=mfd, other=0.)                        # ∂/∂W0 after the chunk
            gs0 = tl.load(ds0 + st + p0, mask=mfd, other=0.)
            gw1 = tl.load(dw1 + st + p1, mask=mdf, other=0.)
            gs1 = tl.load(ds1 + st + p1, mask=mdf, other=0.)
            zb = _mm(kb, tl.trans(w0b), PREC)
            ab = _silu(zb)
            sg = _silu_grad(zb)
            ub = _mm(e1, w1b, PREC)  # E1 W1, [C, BF]
            e0 = ub * sg
            qw0 = _mm(qb, tl.trans(w0b), PREC)
            qs0 = _mm(qb, tl.trans(s0b), PREC)
            zq = g0[:, None] * qw0 + z0[:, None] * qs0 - _mm(qk, e0, PREC)
            aq = _silu(zq)
            pr += _mm(aq, tl.trans(ab), PREC)
            # the output's block terms: O += g0 ⊙ (Aq W1ᵀ) + z0 ⊙ (Aq S1ᵀ)
            dow1 = _mm(dob, w1b, PREC)
            dos1 = _mm(dob, s1b, PREC)
            d_g0 += tl.sum(dow1 * aq, axis=1)
            d_z0 += tl.sum(dos1 * aq, axis=1)
            daq = g0[:, None] * dow1 + z0[:, None] * dos1 + _mm(dpm, ab, PREC)
            dzq = daq * _silu_grad(zq)
            d_g0 += tl.sum(dzq * qw0, axis=1)
            d_z0 += tl.sum(dzq * qs0, axis=1)
            dqb += _mm(g0[:, None] * dzq, w0b, PREC) + _mm(z0[:, None] * dzq, s0b, PREC)
            dqk -= _mm(dzq, tl.trans(e0), PREC)
            # the end state's terms
            e0gw = _mm(e0, gw0, PREC)  # E0 dW0', [C, D]
            e0gs = _mm(e0, gs0, PREC)
            e1gw = _mm(e1, gw1, PREC)  # E1 dW1', [C, BF]
            e1gs = _mm(e1, gs1, PREC)
            dkb -= oml[:, None] * e0gw + yll[:, None] * e0gs
            d_oml -= tl.sum(kb * e0gw, axis=1) + tl.sum(ab * e1gw, axis=1)
            d_yll -= tl.sum(kb * e0gs, axis=1) + tl.sum(ab * e1gs, axis=1)
            d_gl += tl.sum(tl.sum(gw0 * w0b, axis=1), axis=0) + tl.sum(tl.sum(gw1 * w1b, axis=1), axis=0)
            d_zl += tl.sum(tl.sum(gw0 * s0b, axis=1), axis=0) + tl.sum(tl.sum(gw1 * s1b, axis=1), axis=0)
            d_yl += tl.sum(tl.sum(gs0 * s0b, axis=1), axis=0) + tl.sum(tl.sum(gs1 * s1b, axis=1), axis=0)
            de0 = (-_mm(kb * oml[:, None], tl.trans(gw0), PREC)
                   - _mm(kb * yll[:, None], tl.trans(gs0), PREC)
                   - _mm(tl.trans(qk), dzq, PREC))  # [C, BF]
            dub = de0 * sg
            de1 += (_mm(dub, tl.trans(w1b), PREC)
                    - _mm(ab * oml[:, None], tl.trans(gw1), PREC)
                    - _mm(ab * yll[:, None], tl.trans(gs1), PREC))
            da = _mm(tl.trans(dpm), aq, PREC) - oml[:, None] * e1gw - yll[:, None] * e1gs
            dzpart = de0 * ub * _silu_grad2(zb) + da * sg
            tl.store(scr + i_bh.to(tl.int64) * C * F + rc[:, None] * F + f[None, :], dzpart, mask=mf[None, :])
            # the state before the chunk, but for the terms through Yk (pass 3)
            nw0 = gl * gw0 + _mm(tl.trans(g0[:, None] * dzq), qb, PREC)
            ns0 = zl * gw0 + yl * gs0 + _mm(tl.trans(z0[:, None] * dzq), qb, PREC)
            nw1 = (gl * gw1 + _mm(tl.trans(g0[:, None] * dob), aq, PREC)
                   + _mm(tl.trans(e1), dub, PREC))
            ns1 = zl * gw1 + yl * gs1 + _mm(tl.trans(z0[:, None] * dob), aq, PREC)
            tl.store(dw0 + st + p0, nw0, mask=mfd)
            tl.store(ds0 + st + p0, ns0, mask=mfd)
            tl.store(dw1 + st + p1, nw1, mask=mdf)
            tl.store(ds1 + st + p1, ns1, mask=mdf)
        de1 -= _mm(tl.trans(pr * omr), dob, PREC)
        d_om = tl.where(causal, -_mm(dob, tl.trans(e1), PREC) * pr + dqk * qk_raw, 0.)
        dyk = et[:, None] * de1
        tl.store(dv + row[:, None] * D + rd[None, :], (-dyk).to(dv.dtype.element_ty), mask=mtd)
        tl.store(deta + row, tl.sum(de1 * r1, axis=1), mask=mt)
        tl.debug_barrier()
        # pass 3: the terms through Yk = A W1ᵀ, with the whole dE1
        for i_f in range(tl.cdiv(F, BF)):
            mfd, mdf, p0, p1, f, mf = _block(i_f, rf, rd, md, F, D, BF)
            w0b = tl.load(hw0 + hs + p0, mask=mfd, other=0.)
            w1b = tl.load(hw1 + hs + p1, mask=mdf, other=0.)
            zb = _mm(kb, tl.trans(w0b), PREC)
            ab = _silu(zb)
            dzb = tl.load(scr + i_bh.to(tl.int64) * C * F + rc[:, None] * F + f[None, :], mask=mf[None, :], other=0.)
            dzb += _mm(dyk, w1b, PREC) * _silu_grad(zb)
            dkb += _mm(dzb, w0b, PREC)
            nw0 = tl.load(dw0 + st + p0, mask=mfd, other=0.) + _mm(tl.trans(dzb), kb, PREC)
            nw1 = tl.load(dw1 + st + p1, mask=mdf, other=0.) + _mm(tl.trans(dyk), ab, PREC)
            tl.store(dw0 + st + p0, nw0, mask=mfd)
            tl.store(dw1 + st + p1, nw1, mask=mdf)
        dqkm = dqk * omr
        dqb += _mm(dqkm, kb, PREC)
        dkb += _mm(tl.trans(dqkm), qb, PREC)
        tl.store(dq + row[:, None] * D + rd[None, :], dqb.to(dq.dtype.element_ty), mask=mtd)
        tl.store(dk + row[:, None] * D + rd[None, :], dkb.to(dk.dtype.element_ty), mask=mtd)
        crow = i_bh.to(tl.int64) * NT + i_t
        tl.store(dg0 + crow * C + rc, d_g0)
        tl.store(dz0 + crow * C + rc, d_z0)
        tl.store(dom + crow * C * C + rc[:, None] * C + rc[None, :], d_om)
        tl.store(doml + crow * C + rc, d_oml)
        tl.store(dyll + crow * C + rc, d_yll)
        tl.store(dend + crow * 3, d_gl)
        tl.store(dend + crow * 3 + 1, d_zl)
        tl.store(dend + crow * 3 + 2, d_yl)
        tl.debug_barrier()


# --------------------------------------------------------------------------- one launch per chunk
#
# The kernels above run one program per (batch, head): 64 programs on a GPU of 132 SMs at the
# d_model-512 Titans model's shape, each walking its chunks through a chain of small products. The
# step kernels below split a chunk's hidden units over programs, grid ``(B·H, ⌈F / (BF·NB)⌉)``,
# ``NB`` hidden blocks per program, and run one launch per chunk: what sums over all hidden units
# (the memory's output at the keys, ``E1``'s gradient) is added across programs with atomics into a
# small buffer that the next launch reads. Three slots rotate (launch ``i`` reads slot ``i % 3``,
# adds into the next chunk's slot and zeroes the one after), so no launch waits on another's zeroing.
# The outputs that sum over hidden units (``o``; ``dq``, ``dk`` and the gates' gradients) are added
# with atomics into zeroed float32 buffers.


@triton.jit(do_not_specialize=["i_t", "C0", "C1"])
def _mlp_memory_fwd_step(q, k, v, eta, cg0, cz0, com, cend, coml, cyll, w0, w1, s0, s1, hw0, hw1, hs0, hs1, hr1,
                         ybuf, o, i_t, C0, C1, T, NT, R, NH, H: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                         C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, NB: tl.constexpr,
                         SAVE: tl.constexpr, OUT: tl.constexpr, PREC: tl.constexpr):
    """Chunk ``i_t`` (``C0 ≤ i_t < C1``), then the next chunk's output at its keys from this
    program's blocks of the new state, added into the next slot of ``ybuf [3, B·H, C, BD]``;
    ``i_t = C0 − 1`` computes only chunk ``C0``'s (its read of ``ybuf`` is unused while other
    programs add into that slot). ``SAVE`` keeps every ``R``-th chunk-start state and its
    ``R1 = Yk − V`` (``hr1``; the backward reads R1 only when every chunk's start is kept);
    ``OUT`` adds the chunk's reads into ``o`` (float32, zeroed), and without it ``o`` is never
    touched."""
    i_bh = tl.program_id(0)
    i_p = tl.program_id(1)
    nbh = tl.num_programs(0)
    i_b, i_h = i_bh // H, i_bh % H
    rc = tl.arange(0, C)
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    md = rd < D
    st = i_bh.to(tl.int64) * F * D
    tile = rc[:, None] * BD + rd[None, :]
    work = i_t >= C0
    tc = tl.maximum(i_t, C0)  # the chunk's loads stay in bounds when there is no chunk to run
    row, mt, mtd = _tokens(i_b, i_h, tc, T, H, C, md)
    kb = _load_tokens(k, row, rd, D, mtd)
    vb = _load_tokens(v, row, rd, D, mtd)
    qb = _load_tokens(q, row, rd, D, mtd)
    et = tl.load(eta + row, mask=mt, other=0.).to(tl.float32)
    g0, z0, omr, gl, zl, yl, oml, yll = _coefficients(cg0, cz0, com, cend, coml, cyll, i_bh, tc, NT, C)
    r1 = tl.load(ybuf + ((tc % 3) * nbh + i_bh).to(tl.int64) * C * BD + tile) - vb
    e1 = et[:, None] * r1
    keep = work & ((tc - C0) % R == 0)
    hs = (i_bh.to(tl.int64) * NH + (tc - C0) // R) * F * D
    if SAVE:
        if keep & (i_p == 0):
            tl.store(hr1 + (i_bh.to(tl.int64) * NH + (tc - C0) // R) * C * BD + tile, r1)
    rown, mtn, mtdn = _tokens(i_b, i_h, i_t + 1, T, H, C, md)
    kn = _load_tokens(k, rown, rd, D, mtdn)                                     # zeros past T
    oacc = tl.zeros([C, BD], dtype=tl.float32)
    pacc = tl.zeros([C, C], dtype=tl.float32)
    yn = tl.zeros([C, BD], dtype=tl.float32)
    for j in range(NB):
        mfd, mdf, o0, o1, f, mf = _block(i_p * NB + j, rf, rd, md, F, D, BF)
        p0, p1 = st + o0, st + o1
        w0n = tl.load(w0 + p0, mask=mfd, other=0.)
        w1n = tl.load(w1 + p1, mask=mdf, other=0.)
        if work:
            w0b = w0n
            w1b = w1n
            s0b = tl.load(s0 + p0, mask=mfd, other=0.)
            s1b = tl.load(s1 + p1, mask=mdf, other=0.)
            if SAVE:
                if keep:
                    tl.store(hw0 + hs + o0, w0b, mask=mfd)
                    tl.store(hs0 + hs + o0, s0b, mask=mfd)
                    tl.store(hw1 + hs + o1, w1b, mask=mdf)
                    tl.store(hs1 + hs + o1, s1b, mask=mdf)
            zb = _mm(kb, tl.trans(w0b), PREC)
            ab = _silu(zb)
            e0 = _mm(e1, w1b, PREC) * _silu_grad(zb)  # [C, BF]
            if OUT:
                qk = _mm(qb, tl.trans(kb), PREC) * omr
                read_o, read_p = _block_reads(qb, qk, e0, w0b, s0b, w1b, s1b, ab, g0, z0, PREC)
                oacc += read_o
                pacc += read_p
            w0n, s0n, w1n, s1n = _end_state(w0b, s0b, w1b, s1b, e0, e1, kb, ab, gl, zl, yl, oml, yll, PREC)
            tl.store(w0 + p0, w0n, mask=mfd)
            tl.store(s0 + p0, s0n, mask=mfd)
            tl.store(w1 + p1, w1n, mask=mdf)
            tl.store(s1 + p1, s1n, mask=mdf)
        yn += _mm(_silu(_mm(kn, tl.trans(w0n), PREC)), tl.trans(w1n), PREC)
    if OUT:
        if work:
            ob = oacc - _mm(pacc * omr, e1, PREC)
            tl.atomic_add(o + row[:, None] * D + rd[None, :], ob, mask=mtd, sem="relaxed")
    if i_t + 1 < C1:
        tl.atomic_add(ybuf + (((i_t + 1) % 3) * nbh + i_bh).to(tl.int64) * C * BD + tile, yn, sem="relaxed")
    if i_p == 0:
        tl.store(ybuf + (((i_t + 2) % 3) * nbh + i_bh).to(tl.int64) * C * BD + tile,
                 tl.zeros([C, BD], dtype=tl.float32))


@triton.jit(do_not_specialize=["i_t", "C0", "C1"])
def _mlp_memory_bwd_step(q, k, eta, cg0, cz0, com, cend, coml, cyll, hw0, hw1, hs0, hs1, hr1, do,
                         dw0, dw1, ds0, ds1, scr, ebuf, dq, dk, dv, deta, dg0, dz0, dom, dend, doml, dyll,
                         i_t, C0, C1, T, NT, H: tl.constexpr, D: tl.constexpr, F: tl.constexpr, C: tl.constexpr,
                         BD: tl.constexpr, BF: tl.constexpr, NB: tl.constexpr, PREC: tl.constexpr):
    """The launch for chunk ``i_t`` (``C0 − 1 ≤ i_t < C1``, run from ``C1 − 1`` down): first the
    terms of chunk ``u = i_t + 1`` through its keys' output (the fused backward's pass 3), with the
    whole ``dE1`` of ``u`` from ``ebuf``; then chunk ``i_t``'s block-local gradients (its pass 2),
    with ``dE1``'s part added into ``ebuf``'s slot ``i_t % 3``. ``hw0 .. hs1`` and ``hr1`` hold the
    segment's chunk-start states and ``R1`` in slots ``i − C0``; ``dw0 .. ds1`` the state's
    gradient, each program its own hidden blocks; ``scr`` a block's partial ``dZ`` between the two
    halves. ``dq``, ``dk`` and the gates' gradients are float32 and zeroed: parts are added."""
    i_bh = tl.program_id(0)
    i_p = tl.program_id(1)
    nbh = tl.num_programs(0)
    i_b, i_h = i_bh // H, i_bh % H
    rc = tl.arange(0, C)
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    md = rd < D
    st = i_bh.to(tl.int64) * F * D
    tile = rc[:, None] * BD + rd[None, :]
    causal = rc[:, None] >= rc[None, :]
    ns = C1 - C0
    # chunk u's data (the loads clamped into the segment when there is no u)
    pa = i_t + 1 < C1
    u = tl.minimum(i_t + 1, C1 - 1)
    row_u, mt_u, mtd_u = _tokens(i_b, i_h, u, T, H, C, md)
    ku = _load_tokens(k, row_u, rd, D, mtd_u)
    et_u = tl.load(eta + row_u, mask=mt_u, other=0.).to(tl.float32)
    de1u = tl.load(ebuf + (((i_t + 1) % 3) * nbh + i_bh).to(tl.int64) * C * BD + tile)
    hu = i_bh.to(tl.int64) * ns + (u - C0)
    dyk = et_u[:, None] * de1u
    if pa & (i_p == 0):
        r1u = tl.load(hr1 + hu * C * BD + tile)
        tl.store(dv + row_u[:, None] * D + rd[None, :], (-dyk).to(dv.dtype.element_ty), mask=mtd_u)
        tl.store(deta + row_u, tl.sum(de1u * r1u, axis=1), mask=mt_u)
    # chunk i_t's data
    pb = i_t >= C0
    tb = tl.maximum(i_t, C0)
    row, mt, mtd = _tokens(i_b, i_h, tb, T, H, C, md)
    kb = _load_tokens(k, row, rd, D, mtd)
    qb = _load_tokens(q, row, rd, D, mtd)
    dob = _load_tokens(do, row, rd, D, mtd)
    et = tl.load(eta + row, mask=mt, other=0.).to(tl.float32)
    g0, z0, omr, gl, zl, yl, oml, yll = _coefficients(cg0, cz0, com, cend, coml, cyll, i_bh, tb, NT, C)
    hb = i_bh.to(tl.int64) * ns + (tb - C0)
    e1 = et[:, None] * tl.load(hr1 + hb * C * BD + tile)
    qk_raw = _mm(qb, tl.trans(kb), PREC)
    qk = qk_raw * omr
    dpm = -_mm(dob, tl.trans(e1), PREC) * omr  # dP ⊙ Ω, [C, C]
    dku = tl.zeros([C, BD], dtype=tl.float32)
    de1 = tl.zeros([C, BD], dtype=tl.float32)
    dqb = tl.zeros([C, BD], dtype=tl.float32)
    dkb = tl.zeros([C, BD], dtype=tl.float32)
    dqk = tl.zeros([C, C], dtype=tl.float32)                                   # ∂/∂(QKᵀ ⊙ Ω)
    pr = tl.zeros([C, C], dtype=tl.float32)                                    # Aq Aᵀ
    d_g0 = tl.zeros([C], dtype=tl.float32)
    d_z0 = tl.zeros([C], dtype=tl.float32)
    d_oml = tl.zeros([C], dtype=tl.float32)
    d_yll = tl.zeros([C], dtype=tl.float32)
    d_gl = tl.sum(d_g0, axis=0)
    d_zl = tl.sum(d_g0, axis=0)
    d_yl = tl.sum(d_g0, axis=0)
    for j in range(NB):
        mfd, mdf, p0, p1, f, mf = _block(i_p * NB + j, rf, rd, md, F, D, BF)
        sp = i_bh.to(tl.int64) * C * F + rc[:, None] * F + f[None, :]
        gw0 = tl.load(dw0 + st + p0, mask=mfd, other=0.)                        # ∂/∂W0 after chunk u
        gs0 = tl.load(ds0 + st + p0, mask=mfd, other=0.)
        gw1 = tl.load(dw1 + st + p1, mask=mdf, other=0.)
        gs1 = tl.load(ds1 + st + p1, mask=mdf, other=0.)
        if pa:  # the terms through Yk = A W1ᵀ of chunk u: the gradient after chunk i_t
            w0u = tl.load(hw0 + hu * F * D + p0, mask=mfd, other=0.)
            w1u = tl.load(hw1 + hu * F * D + p1, mask=mdf, other=0.)
            zu = _mm(ku, tl.trans(w0u), PREC)
            dzu = tl.load(scr + sp, mask=mf[None, :], other=0.)
            dzu += _mm(dyk, w1u, PREC) * _silu_grad(zu)
            dku += _mm(dzu, w0u, PREC)
            gw0 += _mm(tl.trans(dzu), ku, PREC)
            gw1 += _mm(tl.trans(dyk), _silu(zu), PREC)
        if pb:
            tl.debug_barrier()  # this program read scr and the gradient above; it overwrites them below
            w0b = tl.load(hw0 + hb * F * D + p0, mask=mfd, other=0.)
            s0b = tl.load(hs0 + hb * F * D + p0, mask=mfd, other=0.)
            w1b = tl.load(hw1 + hb * F * D + p1, mask=mdf, other=0.)
            s1b = tl.load(hs1 + hb * F * D + p1, mask=mdf, other=0.)
            zb = _mm(kb, tl.trans(w0b), PREC)
            ab = _silu(zb)
            sg = _silu_grad(zb)
            ub = _mm(e1, w1b, PREC)  # E1 W1, [C, BF]
            e0 = ub * sg
            qw0 = _mm(qb, tl.trans(w0b), PREC)
            qs0 = _mm(qb, tl.trans(s0b), PREC)
            zq = g0[:, None] * qw0 + z0[:, None] * qs0 - _mm(qk, e0, PREC)
            aq = _silu(zq)
            pr += _mm(aq, tl.trans(ab), PREC)
            dow1 = _mm(dob, w1b, PREC)
            dos1 = _mm(dob, s1b, PREC)
            d_g0 += tl.sum(dow1 * aq, axis=1)
            d_z0 += tl.sum(dos1 * aq, axis=1)
            daq = g0[:, None] * dow1 + z0[:, None] * dos1 + _mm(dpm, ab, PREC)
            dzq = daq * _silu_grad(zq)
            d_g0 += tl.sum(dzq * qw0, axis=1)
            d_z0 += tl.sum(dzq * qs0, axis=1)
            dqb += _mm(g0[:, None] * dzq, w0b, PREC) + _mm(z0[:, None] * dzq, s0b, PREC)
            dqk -= _mm(dzq, tl.trans(e0), PREC)
            e0gw = _mm(e0, gw0, PREC)  # E0 dW0', [C, D]
            e0gs = _mm(e0, gs0, PREC)
            e1gw = _mm(e1, gw1, PREC)  # E1 dW1', [C, BF]
            e1gs = _mm(e1, gs1, PREC)
            dkb -= oml[:, None] * e0gw + yll[:, None] * e0gs
            d_oml -= tl.sum(kb * e0gw, axis=1) + tl.sum(ab * e1gw, axis=1)
            d_yll -= tl.sum(kb * e0gs, axis=1) + tl.sum(ab * e1gs, axis=1)
            d_gl += tl.sum(tl.sum(gw0 * w0b, axis=1), axis=0) + tl.sum(tl.sum(gw1 * w1b, axis=1), axis=0)
            d_zl += tl.sum(tl.sum(gw0 * s0b, axis=1), axis=0) + tl.sum(tl.sum(gw1 * s1b, axis=1), axis=0)
            d_yl += tl.sum(tl.sum(gs0 * s0b, axis=1), axis=0) + tl.sum(tl.sum(gs1 * s1b, axis=1), axis=0)
            de0 = (-_mm(kb * oml[:, None], tl.trans(gw0), PREC)
                   - _mm(kb * yll[:, None], tl.trans(gs0), PREC)
                   - _mm(tl.trans(qk), dzq, PREC))  # [C, BF]
            dub = de0 * sg
            de1 += (_mm(dub, tl.trans(w1b), PREC)
                    - _mm(ab * oml[:, None], tl.trans(gw1), PREC)
                    - _mm(ab * yll[:, None], tl.trans(gs1), PREC))
            da = _mm(tl.trans(dpm), aq, PREC) - oml[:, None] * e1gw - yll[:, None] * e1gs
            tl.store(scr + sp, de0 * ub * _silu_grad2(zb) + da * sg, mask=mf[None, :])
            # the state before the chunk, but for the terms through Yk (the next launch adds them)
            gw0n = gl * gw0 + _mm(tl.trans(g0[:, None] * dzq), qb, PREC)
            gs0 = zl * gw0 + yl * gs0 + _mm(tl.trans(z0[:, None] * dzq), qb, PREC)
            gw1n = (gl * gw1 + _mm(tl.trans(g0[:, None] * dob), aq, PREC)
                    + _mm(tl.trans(e1), dub, PREC))
            gs1 = zl * gw1 + yl * gs1 + _mm(tl.trans(z0[:, None] * dob), aq, PREC)
            gw0 = gw0n
            gw1 = gw1n
            tl.store(ds0 + st + p0, gs0, mask=mfd)
            tl.store(ds1 + st + p1, gs1, mask=mdf)
        tl.store(dw0 + st + p0, gw0, mask=mfd)
        tl.store(dw1 + st + p1, gw1, mask=mdf)
    if pa:
        tl.atomic_add(dk + row_u[:, None] * D + rd[None, :], dku, mask=mtd_u, sem="relaxed")
    if pb:
        de1 -= _mm(tl.trans(pr * omr), dob, PREC)
        d_om = tl.where(causal, -_mm(dob, tl.trans(e1), PREC) * pr + dqk * qk_raw, 0.)
        dqkm = dqk * omr
        dqb += _mm(dqkm, kb, PREC)
        dkb += _mm(tl.trans(dqkm), qb, PREC)
        tl.atomic_add(ebuf + ((tb % 3) * nbh + i_bh).to(tl.int64) * C * BD + tile, de1, sem="relaxed")
        tl.atomic_add(dq + row[:, None] * D + rd[None, :], dqb, mask=mtd, sem="relaxed")
        tl.atomic_add(dk + row[:, None] * D + rd[None, :], dkb, mask=mtd, sem="relaxed")
        crow = i_bh.to(tl.int64) * NT + tb
        tl.atomic_add(dg0 + crow * C + rc, d_g0, sem="relaxed")
        tl.atomic_add(dz0 + crow * C + rc, d_z0, sem="relaxed")
        tl.atomic_add(dom + crow * C * C + rc[:, None] * C + rc[None, :], d_om, sem="relaxed")
        tl.atomic_add(doml + crow * C + rc, d_oml, sem="relaxed")
        tl.atomic_add(dyll + crow * C + rc, d_yll, sem="relaxed")
        tl.atomic_add(dend + crow * 3, d_gl, sem="relaxed")
        tl.atomic_add(dend + crow * 3 + 1, d_zl, sem="relaxed")
        tl.atomic_add(dend + crow * 3 + 2, d_yl, sem="relaxed")
    if i_p == 0:
        tl.store(ebuf + (((i_t + 2) % 3) * nbh + i_bh).to(tl.int64) * C * BD + tile,
                 tl.zeros([C, BD], dtype=tl.float32))


class _Kernels:
    fwd = _mlp_memory_fwd
    bwd = _mlp_memory_bwd
    fwd_step = _mlp_memory_fwd_step
    bwd_step = _mlp_memory_bwd_step


def kernels() -> type[_Kernels]:
    return _Kernels
