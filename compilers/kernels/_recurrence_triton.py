"""Triton kernels of the online chunked form's state recurrence (``compilers/chunked.py``,
``_online_full``): everything of a chunk that does not depend on the state is computed for all
chunks at once in PyTorch; what is left walks the chunks in order, per (batch, head)::

    E_c = U_c + P1_c W_cᵀ + P2_c S_cᵀ                    [n, O]
    W_{c+1} = ge_c W_c + ze_c S_c − E_cᵀ X̃_c              [O, I]
    S_{c+1} = ye_c S_c − E_cᵀ Ỹ_c

(``P1``, ``P2``: the triangular solve's state terms, absent when the update does not read the
state; ``S``, ``P2``, ``Ỹ``, ``ze``, ``ye``: momentum). The rows of ``W`` and ``S`` evolve
independently, so one program holds a block of ``BO`` rows of both in registers (float32) and
walks the chunks; it stores every chunk's start state and ``E_c`` for the reads.

Backward: the reverse walk from the final state's gradient, adding at each chunk the gradients the
reads sent to its start state and to ``E_c``. The per-chunk inputs' gradients that sum over the
rows (``X̃``, ``Ỹ``, ``P1``, ``P2``, the three scalars) are added by every row block's program into
one zeroed buffer with atomics (``ATOMIC``), or written per row block and summed in PyTorch, so the
result does not depend on scheduling (``recurrence.SUMS``).

The per-chunk parts can run here too, one program a chunk each way (each behind its switch in
``recurrence``): the reads from the chunk starts (``_reads_*``), the chunk systems and their
solutions ``P1``, ``P2``, ``U`` (``_prepare_*``) and a momentum level's transfer products
(``_gates_*``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._delta_rule_triton import INTERPRETED, _unit_lower_inverse

__all__ = ["INTERPRETED", "kernels"]


@triton.jit
def _tile(x, base, R, D, r0, BR: tl.constexpr, BD: tl.constexpr):
    """Block pointer to rows ``r0 …`` (``BR``) and all columns (``BD`` ≥ D) of a row-major ``[R, D]``
    matrix at ``x + base``."""
    return tl.make_block_ptr(x + base, (R, D), (D, 1), (r0, 0), (BR, BD), (1, 0))


@triton.jit
def _cols(x, base, R, D, c0, BR: tl.constexpr, BC: tl.constexpr):
    """Block pointer to all rows (``BR`` ≥ R) and columns ``c0 …`` (``BC``) of a row-major ``[R, D]``
    matrix at ``x + base``."""
    return tl.make_block_ptr(x + base, (R, D), (D, 1), (0, c0), (BR, BC), (1, 0))


@triton.jit
def _put(x, base, val, N: tl.constexpr, I, BI: tl.constexpr, ATOMIC: tl.constexpr):
    """Stores ``val`` into the ``[N, I]`` tile at ``x + base``, or with ``ATOMIC`` adds it there (the
    row blocks' programs of one (batch, head) all add into one tile)."""
    if ATOMIC:
        r = tl.arange(0, N)[:, None]
        c = tl.arange(0, BI)[None, :]
        tl.atomic_add(x + base + r * I + c, val, mask=c < I, sem="relaxed")
    else:
        tl.store(_tile(x, base, N, I, 0, N, BI), val, boundary_check=(0, 1))


@triton.jit
def _put1(x, off, val, ATOMIC: tl.constexpr):
    """:func:`_put` of one scalar."""
    if ATOMIC:
        tl.atomic_add(x + off, val, sem="relaxed")
    else:
        tl.store(x + off, val)


@triton.jit
def _fwd(w0, s0, u, xt, ge, p1, yt, ze, ye, p2, ws, ss, es, wt, st, NC, N: tl.constexpr, O: tl.constexpr,
         I: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, HAS_P1: tl.constexpr, MOM: tl.constexpr,
         HAS_P2: tl.constexpr, PREC: tl.constexpr):
    i_o, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o0 = i_o * BO
    w = tl.load(_tile(w0, i_bh * O * I, O, I, o0, BO, BI), boundary_check=(0, 1), padding_option="zero")
    if MOM:
        s = tl.load(_tile(s0, i_bh * O * I, O, I, o0, BO, BI), boundary_check=(0, 1), padding_option="zero")
    for c in range(NC):
        cc = i_bh * NC + c
        tl.store(_tile(ws, cc * O * I, O, I, o0, BO, BI), w.to(ws.dtype.element_ty), boundary_check=(0, 1))
        e = tl.load(_cols(u, cc * N * O, N, O, o0, N, BO), boundary_check=(0, 1), padding_option="zero")
        e = e.to(tl.float32)
        if HAS_P1:
            pa = tl.load(_tile(p1, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
            e += tl.dot(pa, tl.trans(w.to(pa.dtype)), input_precision=PREC)
        if MOM:
            tl.store(_tile(ss, cc * O * I, O, I, o0, BO, BI), s.to(ss.dtype.element_ty), boundary_check=(0, 1))
            if HAS_P2:
                pb = tl.load(_tile(p2, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
                e += tl.dot(pb, tl.trans(s.to(pb.dtype)), input_precision=PREC)
        tl.store(_cols(es, cc * N * O, N, O, o0, N, BO), e, boundary_check=(0, 1))
        xa = tl.load(_tile(xt, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
        g = tl.load(ge + cc).to(tl.float32)
        new = g * w - tl.dot(tl.trans(e.to(xa.dtype)), xa, input_precision=PREC)
        if MOM:
            ya = tl.load(_tile(yt, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
            z = tl.load(ze + cc).to(tl.float32)
            y = tl.load(ye + cc).to(tl.float32)
            new += z * s
            s = y * s - tl.dot(tl.trans(e.to(ya.dtype)), ya, input_precision=PREC)
        w = new
    tl.store(_tile(wt, i_bh * O * I, O, I, o0, BO, BI), w, boundary_check=(0, 1))
    if MOM:
        tl.store(_tile(st, i_bh * O * I, O, I, o0, BO, BI), s, boundary_check=(0, 1))


@triton.jit
def _bwd(ws, ss, es, xt, ge, p1, yt, ze, ye, p2, dws, dss, des, dwt, dst, dw0, ds0, du, dxt, dge, dp1, dyt,
         dze, dye, dp2, NC, BH, N: tl.constexpr, O: tl.constexpr, I: tl.constexpr, BO: tl.constexpr,
         BI: tl.constexpr, HAS_P1: tl.constexpr, MOM: tl.constexpr, HAS_P2: tl.constexpr, PREC: tl.constexpr,
         ATOMIC: tl.constexpr = False):
    i_o, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o0 = i_o * BO
    # this row block's partial sums go to slot i_o of the [NOB, BH, NC, ...] buffers, or with ATOMIC
    # are added into the one slot of [1, BH, NC, ...] zeroed buffers
    part = 0 if ATOMIC else i_o * BH
    dw = tl.load(_tile(dwt, i_bh * O * I, O, I, o0, BO, BI), boundary_check=(0, 1), padding_option="zero")
    if MOM:
        ds = tl.load(_tile(dst, i_bh * O * I, O, I, o0, BO, BI), boundary_check=(0, 1), padding_option="zero")
    for j in range(NC):
        c = NC - 1 - j
        cc = i_bh * NC + c
        pc = (part + i_bh) * NC + c
        w = tl.load(_tile(ws, cc * O * I, O, I, o0, BO, BI), boundary_check=(0, 1), padding_option="zero")
        w = w.to(tl.float32)
        e = tl.load(_cols(es, cc * N * O, N, O, o0, N, BO), boundary_check=(0, 1), padding_option="zero")
        xa = tl.load(_tile(xt, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
        g = tl.load(ge + cc).to(tl.float32)
        # E's gradient: from the reads, and from the state after the chunk (W' = … − Eᵀ X̃)
        de = tl.load(_cols(des, cc * N * O, N, O, o0, N, BO), boundary_check=(0, 1), padding_option="zero")
        de = de.to(tl.float32) - tl.dot(xa, tl.trans(dw.to(xa.dtype)), input_precision=PREC)
        _put(dxt, pc * N * I, -tl.dot(e.to(xa.dtype), dw.to(xa.dtype), input_precision=PREC), N, I, BI, ATOMIC)
        _put1(dge, pc, tl.sum(tl.sum(w * dw, axis=1), axis=0), ATOMIC)
        dw_prev = g * dw
        if MOM:
            s = tl.load(_tile(ss, cc * O * I, O, I, o0, BO, BI), boundary_check=(0, 1), padding_option="zero")
            s = s.to(tl.float32)
            ya = tl.load(_tile(yt, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
            z = tl.load(ze + cc).to(tl.float32)
            y = tl.load(ye + cc).to(tl.float32)
            de -= tl.dot(ya, tl.trans(ds.to(ya.dtype)), input_precision=PREC)
            _put(dyt, pc * N * I, -tl.dot(e.to(ya.dtype), ds.to(ya.dtype), input_precision=PREC), N, I, BI,
                 ATOMIC)
            _put1(dze, pc, tl.sum(tl.sum(s * dw, axis=1), axis=0), ATOMIC)
            _put1(dye, pc, tl.sum(tl.sum(s * ds, axis=1), axis=0), ATOMIC)
            ds_prev = z * dw + y * ds
            if HAS_P2:
                pb = tl.load(_tile(p2, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
                _put(dp2, pc * N * I, tl.dot(de.to(pb.dtype), s.to(pb.dtype), input_precision=PREC), N, I, BI,
                     ATOMIC)
                ds_prev += tl.dot(tl.trans(de.to(pb.dtype)), pb, input_precision=PREC)
            ds_prev += tl.load(_tile(dss, cc * O * I, O, I, o0, BO, BI), boundary_check=(0, 1),
                               padding_option="zero").to(tl.float32)
            ds = ds_prev
        if HAS_P1:
            pa = tl.load(_tile(p1, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
            _put(dp1, pc * N * I, tl.dot(de.to(pa.dtype), w.to(pa.dtype), input_precision=PREC), N, I, BI, ATOMIC)
            dw_prev += tl.dot(tl.trans(de.to(pa.dtype)), pa, input_precision=PREC)
        tl.store(_cols(du, cc * N * O, N, O, o0, N, BO), de, boundary_check=(0, 1))
        dw = dw_prev + tl.load(_tile(dws, cc * O * I, O, I, o0, BO, BI), boundary_check=(0, 1),
                               padding_option="zero").to(tl.float32)
    tl.store(_tile(dw0, i_bh * O * I, O, I, o0, BO, BI), dw, boundary_check=(0, 1))
    if MOM:
        tl.store(_tile(ds0, i_bh * O * I, O, I, o0, BO, BI), ds, boundary_check=(0, 1))


@triton.jit
def _reads_chunk(q, k, a, bz, m, cc, N: tl.constexpr, I, BI: tl.constexpr, MOM: tl.constexpr):
    """Chunk ``cc``'s inputs of both reads kernels: ``(q, k [N, BI], a, bz [N] float32, M [N, N]
    float32)``; without momentum ``bz`` is ``a`` again (unused, ``bz`` is a dummy then)."""
    r = tl.arange(0, N)
    qa = tl.load(_tile(q, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
    ka = tl.load(_tile(k, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
    av = tl.load(a + cc * N + r).to(tl.float32)
    if MOM:
        bv = tl.load(bz + cc * N + r).to(tl.float32)
    else:
        bv = av
    mm = tl.load(_tile(m, cc * N * N, N, N, 0, N, N)).to(tl.float32)
    return qa, ka, av, bv, mm


@triton.jit
def _reads_fwd(q, k, a, bz, m, ws, ss, es, o, N: tl.constexpr, O: tl.constexpr, I: tl.constexpr,
               BO: tl.constexpr, BI: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr, OB: tl.constexpr = 0):
    """One chunk's reads, all ``O`` columns: ``o = diag(a) q Wᵀ + diag(bz) q Sᵀ − (q kᵀ ⊙ M) E``,
    ``OB`` state rows (output columns) a loop step (0: all ``BO`` at once)."""
    cc = tl.program_id(0).to(tl.int64)  # (batch, head, chunk), flattened
    dt = q.dtype.element_ty
    RB: tl.constexpr = BO if OB == 0 else OB
    qa, ka, av, bv, mm = _reads_chunk(q, k, a, bz, m, cc, N, I, BI, MOM)
    pm = (tl.dot(qa, tl.trans(ka), input_precision=PREC) * mm).to(dt)
    for o0 in range(0, O, RB):
        w = tl.load(_tile(ws, cc * O * I, O, I, o0, RB, BI), boundary_check=(0, 1), padding_option="zero")
        acc = av[:, None] * tl.dot(qa, tl.trans(w.to(dt)), input_precision=PREC)
        if MOM:
            sa = tl.load(_tile(ss, cc * O * I, O, I, o0, RB, BI), boundary_check=(0, 1), padding_option="zero")
            acc += bv[:, None] * tl.dot(qa, tl.trans(sa.to(dt)), input_precision=PREC)
        e = tl.load(_cols(es, cc * N * O, N, O, o0, N, RB), boundary_check=(0, 1), padding_option="zero")
        acc -= tl.dot(pm, e.to(dt), input_precision=PREC)
        tl.store(_cols(o, cc * N * O, N, O, o0, N, RB), acc, boundary_check=(0, 1))


@triton.jit
def _reads_bwd(q, k, a, bz, m, ws, ss, es, do, dq, dk, da, dbz, dm, dws, dss, des, N: tl.constexpr,
               O: tl.constexpr, I: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, MOM: tl.constexpr,
               PREC: tl.constexpr, OB: tl.constexpr = 0):
    """The gradients of :func:`_reads_fwd`'s chunk: with ``A = q kᵀ ⊙ M`` and ``dA = −dO Eᵀ``,
    ``dW = (a ⊙ dO)ᵀ q``, ``dS = (bz ⊙ dO)ᵀ q``, ``dE = −Aᵀ dO``, ``dM = dA ⊙ q kᵀ``,
    ``dq = a ⊙ dO W + bz ⊙ dO S + (dA ⊙ M) k``, ``dk = (dA ⊙ M)ᵀ q``, ``da = Σ q ⊙ dO W`` (rows),
    ``dbz = Σ q ⊙ dO S``. ``OB`` state rows a loop step (0: all at once): ``dW``, ``dS`` and ``dE``
    are per row block, ``dO W``, ``dO S`` and ``dA`` sums over them."""
    cc = tl.program_id(0).to(tl.int64)
    dt = q.dtype.element_ty
    r = tl.arange(0, N)
    RB: tl.constexpr = BO if OB == 0 else OB
    qa, ka, av, bv, mm = _reads_chunk(q, k, a, bz, m, cc, N, I, BI, MOM)
    p = tl.dot(qa, tl.trans(ka), input_precision=PREC)
    pmt = tl.trans(p * mm).to(dt)
    dow = tl.zeros([N, BI], dtype=tl.float32)  # dO W
    dos = tl.zeros([N, BI], dtype=tl.float32)  # dO S
    ga = tl.zeros([N, N], dtype=tl.float32)    # dA
    for o0 in range(0, O, RB):
        go = tl.load(_cols(do, cc * N * O, N, O, o0, N, RB), boundary_check=(0, 1), padding_option="zero")
        go = go.to(tl.float32)
        w = tl.load(_tile(ws, cc * O * I, O, I, o0, RB, BI), boundary_check=(0, 1), padding_option="zero")
        dow += tl.dot(go.to(dt), w.to(dt), input_precision=PREC)
        tl.store(_tile(dws, cc * O * I, O, I, o0, RB, BI),
                 tl.dot(tl.trans((go * av[:, None]).to(dt)), qa, input_precision=PREC), boundary_check=(0, 1))
        if MOM:
            sa = tl.load(_tile(ss, cc * O * I, O, I, o0, RB, BI), boundary_check=(0, 1), padding_option="zero")
            dos += tl.dot(go.to(dt), sa.to(dt), input_precision=PREC)
            tl.store(_tile(dss, cc * O * I, O, I, o0, RB, BI),
                     tl.dot(tl.trans((go * bv[:, None]).to(dt)), qa, input_precision=PREC), boundary_check=(0, 1))
        e = tl.load(_cols(es, cc * N * O, N, O, o0, N, RB), boundary_check=(0, 1), padding_option="zero")
        tl.store(_cols(des, cc * N * O, N, O, o0, N, RB), -tl.dot(pmt, go.to(dt), input_precision=PREC),
                 boundary_check=(0, 1))
        ga -= tl.dot(go.to(dt), tl.trans(e.to(dt)), input_precision=PREC)
    tl.store(da + cc * N + r, tl.sum(qa.to(tl.float32) * dow, axis=1))
    gq = av[:, None] * dow
    if MOM:
        tl.store(dbz + cc * N + r, tl.sum(qa.to(tl.float32) * dos, axis=1))
        gq += bv[:, None] * dos
    tl.store(_tile(dm, cc * N * N, N, N, 0, N, N), ga * p)
    gp = (ga * mm).to(dt)
    gq += tl.dot(gp, ka, input_precision=PREC)
    tl.store(_tile(dq, cc * N * I, N, I, 0, N, BI), gq, boundary_check=(0, 1))
    tl.store(_tile(dk, cc * N * I, N, I, 0, N, BI), tl.dot(tl.trans(gp), qa, input_precision=PREC),
             boundary_check=(0, 1))


# --------------------------------------------------------------------------- the chunks' systems


@triton.jit
def _prep_chunk(k, er, cf, m, cc, N: tl.constexpr, I, BI: tl.constexpr, PREC: tl.constexpr):
    """Chunk ``cc``'s inputs of :func:`_prepare_fwd`: ``(k, erase [N, BI], coef [N] float32,
    M [N, N] float32, erase kᵀ [N, N] float32)``."""
    r = tl.arange(0, N)
    ka = tl.load(_tile(k, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
    ea = tl.load(_tile(er, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
    cv = tl.load(cf + cc * N + r).to(tl.float32)
    mm = tl.load(_tile(m, cc * N * N, N, N, 0, N, N)).to(tl.float32)
    kk = tl.dot(ea, tl.trans(ka), input_precision=PREC)
    return ka, ea, cv, mm, kk


@triton.jit
def _prepare_fwd(k, er, cf, m, g0, z, f, tm, p1, p2, u, N: tl.constexpr, O: tl.constexpr, I: tl.constexpr,
                 BO: tl.constexpr, BI: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                 NB: tl.constexpr):
    """One chunk's system and its three solutions (the module docstring's ``P1``, ``P2``, ``U``)::

        A = I + strict(diag(coef) (erase kᵀ ⊙ M)),   T = A⁻¹                        [N, N]
        P1 = T diag(coef g0) erase,   P2 = T diag(coef z) erase,   U = T f

    ``T`` (float32) is kept for the backward."""
    cc = tl.program_id(0).to(tl.int64)  # (batch, head, chunk), flattened
    dt = k.dtype.element_ty
    r = tl.arange(0, N)
    ka, ea, cv, mm, kk = _prep_chunk(k, er, cf, m, cc, N, I, BI, PREC)
    a = tl.where(r[:, None] > r[None, :], kk * mm * cv[:, None], 0.)
    tmf = _unit_lower_inverse(a, N, NB, SPREC)
    tl.store(_tile(tm, cc * N * N, N, N, 0, N, N), tmf)
    tmd = tmf.to(dt)
    ef = ea.to(tl.float32)
    w1 = cv * tl.load(g0 + cc * N + r).to(tl.float32)
    tl.store(_tile(p1, cc * N * I, N, I, 0, N, BI),
             tl.dot(tmd, (ef * w1[:, None]).to(dt), input_precision=PREC).to(p1.dtype.element_ty),
             boundary_check=(0, 1))
    if MOM:
        w2 = cv * tl.load(z + cc * N + r).to(tl.float32)
        tl.store(_tile(p2, cc * N * I, N, I, 0, N, BI),
                 tl.dot(tmd, (ef * w2[:, None]).to(dt), input_precision=PREC).to(p2.dtype.element_ty),
                 boundary_check=(0, 1))
    fa = tl.load(_tile(f, cc * N * O, N, O, 0, N, BO), boundary_check=(0, 1), padding_option="zero")
    tl.store(_tile(u, cc * N * O, N, O, 0, N, BO), tl.dot(tmd, fa.to(dt), input_precision=PREC),
             boundary_check=(0, 1))


@triton.jit
def _prepare_bwd(k, er, cf, m, g0, z, f, tm, dp1, dp2, du, dk, der, dcf, dm, dg0, dz, df, N: tl.constexpr,
                 O: tl.constexpr, I: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, MOM: tl.constexpr,
                 PREC: tl.constexpr):
    """The gradients of :func:`_prepare_fwd`'s chunk. With ``R`` a right-hand side and ``P = T R``:
    ``dR = Tᵀ dP``, and ``A``'s strict part takes ``D = −strict(Σ dR Pᵀ)`` over the three; then
    ``dM = D ⊙ diag(coef) erase kᵀ``, ``d erase = (D ⊙ M ⊙ coef) k + diag(coef g0) dR1 + diag(coef z) dR2``,
    ``dk = (D ⊙ M ⊙ coef)ᵀ erase``, ``d coef = Σ_j D ⊙ erase kᵀ ⊙ M + g0 Σ dR1 ⊙ erase + z Σ dR2 ⊙ erase``
    (rows), ``dg0 = coef Σ dR1 ⊙ erase``, ``dz = coef Σ dR2 ⊙ erase``, ``df = dU``. Each right-hand
    side's ``dR`` and ``P`` are formed, used and dropped in turn (``dR1`` / ``dR2`` formed again at
    the end), so few ``[N, I]`` float32 tiles are alive at once: compiled for sm_90 at chunk 64 and
    128-wide heads, keeping them all spilled 976 bytes a thread."""
    cc = tl.program_id(0).to(tl.int64)
    dt = k.dtype.element_ty
    r = tl.arange(0, N)
    tmd = tl.load(_tile(tm, cc * N * N, N, N, 0, N, N)).to(dt)
    tmt = tl.trans(tmd)
    ea = tl.load(_tile(er, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
    cv = tl.load(cf + cc * N + r).to(tl.float32)
    gv = tl.load(g0 + cc * N + r).to(tl.float32)
    g1 = tl.load(_tile(dp1, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
    dr = tl.dot(tmt, g1.to(dt), input_precision=PREC)
    pv = tl.dot(tmd, (ea.to(tl.float32) * (cv * gv)[:, None]).to(dt), input_precision=PREC)
    ga = tl.dot(dr.to(dt), tl.trans(pv.to(dt)), input_precision=PREC)
    s1 = tl.sum(dr * ea.to(tl.float32), axis=1)
    tl.store(dg0 + cc * N + r, cv * s1)
    dcv = gv * s1
    if MOM:
        zv = tl.load(z + cc * N + r).to(tl.float32)
        g2 = tl.load(_tile(dp2, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
        dr = tl.dot(tmt, g2.to(dt), input_precision=PREC)
        pv = tl.dot(tmd, (ea.to(tl.float32) * (cv * zv)[:, None]).to(dt), input_precision=PREC)
        ga += tl.dot(dr.to(dt), tl.trans(pv.to(dt)), input_precision=PREC)
        s2 = tl.sum(dr * ea.to(tl.float32), axis=1)
        tl.store(dz + cc * N + r, cv * s2)
        dcv += zv * s2
    gu = tl.load(_tile(du, cc * N * O, N, O, 0, N, BO), boundary_check=(0, 1), padding_option="zero")
    dfv = tl.dot(tmt, gu.to(dt), input_precision=PREC)
    tl.store(_tile(df, cc * N * O, N, O, 0, N, BO), dfv, boundary_check=(0, 1))
    fa = tl.load(_tile(f, cc * N * O, N, O, 0, N, BO), boundary_check=(0, 1), padding_option="zero")
    uv = tl.dot(tmd, fa.to(dt), input_precision=PREC)
    ga += tl.dot(dfv.to(dt), tl.trans(uv.to(dt)), input_precision=PREC)
    d = tl.where(r[:, None] > r[None, :], -ga, 0.)
    ka = tl.load(_tile(k, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
    kk = tl.dot(ea, tl.trans(ka), input_precision=PREC)
    mm = tl.load(_tile(m, cc * N * N, N, N, 0, N, N)).to(tl.float32)
    tl.store(_tile(dm, cc * N * N, N, N, 0, N, N), d * kk * cv[:, None])
    dcv += tl.sum(d * kk * mm, axis=1)
    tl.store(dcf + cc * N + r, dcv)
    dmc = (d * mm * cv[:, None]).to(dt)
    tl.store(_tile(dk, cc * N * I, N, I, 0, N, BI), tl.dot(tl.trans(dmc), ea, input_precision=PREC),
             boundary_check=(0, 1))
    gerase = tl.dot(dmc, ka, input_precision=PREC)
    g1 = tl.load(_tile(dp1, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
    gerase += (cv * gv)[:, None] * tl.dot(tmt, g1.to(dt), input_precision=PREC)
    if MOM:
        g2 = tl.load(_tile(dp2, cc * N * I, N, I, 0, N, BI), boundary_check=(0, 1), padding_option="zero")
        gerase += (cv * zv)[:, None] * tl.dot(tmt, g2.to(dt), input_precision=PREC)
    tl.store(_tile(der, cc * N * I, N, I, 0, N, BI), gerase, boundary_check=(0, 1))

# --------------------------------------------------------------------------- the chunks' gates


@triton.jit
def _transfer_mats(f, cc, N: tl.constexpr):
    """A chunk's products of the factors ``f [N]`` (token ``t`` at row ``t``), float32:
    ``(P [N, N], Pp [N, N], p [N], pp [N])`` with ``P[r, m] = Π_{l=m+1..r} f_l`` (``r ≥ m``),
    ``Pp[r, m] = Π_{l=m+1..r−1} f_l`` (``r > m``: the previous row's), ``p[r] = Π_{l≤r} f_l`` and
    ``pp[r] = Π_{l<r} f_l``. The matrices come from the factors' cumulative log-magnitudes as
    ``± exp(L[r] − L[m])`` (no scan over a tile: a cumulative product down an [N, N] tile spilled
    tens of KiB a thread compiled for sm_90), with running counts of exact zeros (a product over
    one is exactly 0, one that skips it the product of the others) and of negative factors (the
    sign: gates need not be positive, ``act: tanh`` or ``identity``); the vectors are cumulative
    products."""
    r = tl.arange(0, N)
    fv = tl.load(f + cc * N + r).to(tl.float32)
    zero = fv == 0.
    neg = (fv < 0.).to(tl.int32)
    lf = tl.log(tl.where(zero, 1., tl.abs(fv)))
    lg = tl.cumsum(lf, axis=0)                            # L[r] = Σ_{l≤r} log |f_l| over nonzero f
    lgp = lg - lf                                         # L[r − 1]
    nz = tl.cumsum(zero.to(tl.int32), axis=0)             # zeros among f_0 … f_r
    nzp = nz - zero.to(tl.int32)
    ng = tl.cumsum(neg, axis=0)                           # negatives among f_0 … f_r
    ngp = ng - neg
    low = r[:, None] >= r[None, :]
    sign = tl.where(((ng[:, None] - ng[None, :]) % 2) == 1, -1., 1.)
    pm = tl.where(low & ((nz[:, None] - nz[None, :]) == 0),
                  sign * tl.exp(tl.where(low, lg[:, None] - lg[None, :], 0.)), 0.)
    strict = r[:, None] > r[None, :]
    signp = tl.where(((ngp[:, None] - ng[None, :]) % 2) == 1, -1., 1.)
    ppm = tl.where(strict & ((nzp[:, None] - nz[None, :]) == 0),
                   signp * tl.exp(tl.where(strict, lgp[:, None] - lg[None, :], 0.)), 0.)
    fp = tl.load(f + cc * N + r - 1, mask=r > 0, other=1.).to(tl.float32)  # f_{r−1}, 1 at r = 0
    return pm, ppm, tl.cumprod(fv, axis=0), tl.cumprod(fp, axis=0)


@triton.jit
def _gates_fwd(a, u, omp, om, vec, N: tl.constexpr, OM: tl.constexpr, PREC: tl.constexpr):
    """One chunk's transfer products with momentum, from the retention factors ``a`` and the
    momentum factors ``u`` (``[N]`` each), in the online form's ``(N+1)``-index terms (index 0 the
    chunk start): ``Ω = G Y``, ``z = Ω[:, 0] − G[:, 0]``. Stores ``Ω[0:N, 1:]`` (``omp``, the system's
    and a read-before-write's mask), ``Ω[1:, 1:]`` (``om``, with ``OM``: a read after the write's)
    and seven ``[N]`` rows in ``vec``: ``G[0:N, 0]``, ``z[0:N]``, ``G[1:, 0]``, ``z[1:]``,
    ``Y[1:, 0]``, ``Y[N, 1:]``, ``Ω[N, 1:]``."""
    cc = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, N)
    ga_m, gp_m, ga, gp = _transfer_mats(a, cc, N)
    yu_m, _, yu, _ = _transfer_mats(u, cc, N)
    o1 = tl.dot(ga_m, yu_m, input_precision=PREC)
    tl.store(_tile(omp, cc * N * N, N, N, 0, N, N), tl.dot(gp_m, yu_m, input_precision=PREC))
    if OM:
        tl.store(_tile(om, cc * N * N, N, N, 0, N, N), o1)
    last = (r == N - 1)[:, None]
    v = vec + cc * 7 * N + r
    tl.store(v, gp)
    tl.store(v + N, tl.sum(gp_m * yu[None, :], axis=1))
    tl.store(v + 2 * N, ga)
    tl.store(v + 3 * N, tl.sum(ga_m * yu[None, :], axis=1))
    tl.store(v + 4 * N, yu)
    tl.store(v + 5 * N, tl.sum(tl.where(last, yu_m, 0.), axis=0))
    tl.store(v + 6 * N, tl.sum(tl.where(last, o1, 0.), axis=0))


@triton.jit
def _gates_bwd(a, u, domp, dom, dvec, da, du, N: tl.constexpr, OM: tl.constexpr, PREC: tl.constexpr):
    """The factors' gradients of :func:`_gates_fwd`'s chunk. The products' gradients first
    (``dG = dΩ Yᵀ + dz yᵀ``, ``dY = Gᵀ dΩ + …`` for each of the two row ranges), then, with
    ``P[r, m] = Pp[k, m] f_k P[r, k]`` for ``m < k ≤ r``, a factor's gradient
    ``∂f_k = Σ_m Pp[k, m] (Pᵀ dP)[k, m]`` and ``pp[k] (Pᵀ dp)[k]`` for the column of products from
    the start: products only, so exact where a factor is 0."""
    cc = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, N)
    ga_m, gp_m, ga, gp = _transfer_mats(a, cc, N)
    yu_m, yp_m, yu, yp = _transfer_mats(u, cc, N)
    v = dvec + cc * 7 * N + r
    dgp, dzp, dga, dz = tl.load(v), tl.load(v + N), tl.load(v + 2 * N), tl.load(v + 3 * N)
    dyu, dyend, doml = tl.load(v + 4 * N), tl.load(v + 5 * N), tl.load(v + 6 * N)
    last = (r == N - 1)[:, None]
    d1 = tl.where(last, doml[None, :], 0.)
    if OM:
        d1 += tl.load(_tile(dom, cc * N * N, N, N, 0, N, N))
    d0 = tl.load(_tile(domp, cc * N * N, N, N, 0, N, N))
    yt = tl.trans(yu_m)
    dg1 = tl.dot(d1, yt, input_precision=PREC) + dz[:, None] * yu[None, :]
    dg0 = tl.dot(d0, yt, input_precision=PREC) + dzp[:, None] * yu[None, :]
    dym = (tl.dot(tl.trans(ga_m), d1, input_precision=PREC) + tl.dot(tl.trans(gp_m), d0, input_precision=PREC)
           + tl.where(last, dyend[None, :], 0.))
    dyv = dyu + tl.sum(ga_m * dz[:, None], axis=0) + tl.sum(gp_m * dzp[:, None], axis=0)
    inner = tl.dot(tl.trans(ga_m), dg1, input_precision=PREC) + tl.dot(tl.trans(gp_m), dg0, input_precision=PREC)
    col = tl.sum(ga_m * dga[:, None], axis=0) + tl.sum(gp_m * dgp[:, None], axis=0)  # (Gᵀ dg)[k] of both
    gda = tl.sum(gp_m * inner, axis=1) + gp * col
    tl.store(da + cc * N + r, gda)
    gdu = tl.sum(yp_m * tl.dot(yt, dym, input_precision=PREC), axis=1) + yp * tl.sum(yu_m * dyv[:, None], axis=0)
    tl.store(du + cc * N + r, gdu)


class _Kernels:
    fwd = _fwd
    bwd = _bwd
    reads_fwd = _reads_fwd
    reads_bwd = _reads_bwd
    prepare_fwd = _prepare_fwd
    prepare_bwd = _prepare_bwd
    gates_fwd = _gates_fwd
    gates_bwd = _gates_bwd


def kernels() -> type[_Kernels]:
    """The kernels (compiled on the GPU; interpreted when ``TRITON_INTERPRET=1`` was set before triton
    was first imported)."""
    return _Kernels
