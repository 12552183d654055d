"""Triton kernels of one mini-batch chunk's weight recurrence, walked token by token
(``compilers/chunked.py``'s engine, which solves the same chunk with a triangular solve)::

    e_r = b_r W_{r−1} ḱ_r + f_r                                  [O]
    S_r = μ_r S_{r−1} − e_r x_rᵀ,   W_r = α_r W_{r−1} + S_r      (momentum)
    W_r = α_r W_{r−1} − e_r x_rᵀ                                 (without)
    o_r = W_{r−1} u_r (read before the write) or W_r u_r (after)

The rows of ``W`` and ``S`` evolve independently, so one program holds ``BO`` rows of both in
registers (float32) and walks the tokens; every product is a row reduction, no ``tl.dot``, so any
input dtype gives the same float32 arithmetic. What depends on the whole chunk (the layer inputs
``x``, the errors behind ``f``) was computed at the chunk's start outside, which is what makes a
token step this cheap.

Backward: the states are not kept. The backward walks the chunk forward once more up to its last
block of ``K`` tokens, storing the state every ``K`` tokens (the first block starts from the chunk's
start state, which is an input); then, a block of ``K`` tokens at a time from the last, it walks the block forward
from its checkpoint into a scratch buffer and back through it with the adjoints ``W̄``, ``S̄`` in
registers. The gradients that sum over the rows (``x``, ``ḱ``, ``u``, ``b``, ``α``, ``μ``) are
written per row block and summed in PyTorch, so the result does not depend on scheduling.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._delta_rule_triton import INTERPRETED

__all__ = ["INTERPRETED", "kernels"]


@triton.jit
def _row(p, base, cols, mask):
    """A length-``BI`` row vector at ``p + base`` (masked to the real width), in float32."""
    return tl.load(p + base + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _token(x, k, b, f, a, m, t, rows, cols, rmask, cmask, O: tl.constexpr, I: tl.constexpr, DECAY: tl.constexpr,
           MOM: tl.constexpr):
    """Token ``t``'s inputs in float32: ``(x, ḱ, b, f rows, α, μ)`` (α = 1, μ = 0 when absent)."""
    ar = 1.0
    if DECAY:
        ar = tl.load(a + t).to(tl.float32)
    mr = 0.0
    if MOM:
        mr = tl.load(m + t).to(tl.float32)
    return (_row(x, t * I, cols, cmask), _row(k, t * I, cols, cmask), tl.load(b + t).to(tl.float32),
            tl.load(f + t * O + rows, mask=rmask, other=0.0).to(tl.float32), ar, mr)


@triton.jit
def _step(w, s, xr, kr, br, fr, ar, mr, MOM: tl.constexpr):
    """One token: ``(W_r, S_r, e_r)`` from ``(W_{r−1}, S_{r−1})``."""
    e = br * tl.sum(w * kr[None, :], 1) + fr
    if MOM:
        s = mr * s - e[:, None] * xr[None, :]
        w = ar * w + s
    else:
        w = ar * w - e[:, None] * xr[None, :]
    return w, s, e


@triton.jit
def _advance(w, s, x, k, b, f, a, m, t, rows, cols, rmask, cmask, O: tl.constexpr, I: tl.constexpr,
             DECAY: tl.constexpr, MOM: tl.constexpr):
    """:func:`_step` on token ``t``'s inputs: ``(W_r, S_r)``."""
    xr, kr, br, fr, ar, mr = _token(x, k, b, f, a, m, t, rows, cols, rmask, cmask, O, I, DECAY, MOM)
    w, s, e = _step(w, s, xr, kr, br, fr, ar, mr, MOM)
    return w, s


@triton.jit
def _load_pair(pw, ps, base, tile, tmask, BO: tl.constexpr, BI: tl.constexpr, MOM: tl.constexpr):
    """A state and its momentum (zeros without) at ``base``, in float32."""
    w = tl.load(pw + base + tile, mask=tmask, other=0.0).to(tl.float32)
    s = tl.zeros([BO, BI], dtype=tl.float32)
    if MOM:
        s = tl.load(ps + base + tile, mask=tmask, other=0.0).to(tl.float32)
    return w, s


@triton.jit
def _store_pair(pw, ps, base, tile, tmask, w, s, MOM: tl.constexpr):
    tl.store(pw + base + tile, w, mask=tmask)
    if MOM:
        tl.store(ps + base + tile, s, mask=tmask)


@triton.jit
def _fwd(w0, s0, x, k, b, f, a, m, u, rd, wt, st, N, LO, HI, O: tl.constexpr, I: tl.constexpr, BO: tl.constexpr,
         BI: tl.constexpr, MOM: tl.constexpr, DECAY: tl.constexpr, READ: tl.constexpr, PREFETCH: tl.constexpr):
    i_o, i_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    # only the rows LO <= i_n < HI read (one slot of a stack); their queries and reads are [HI − LO, N, ·]
    reads = (i_n >= LO) & (i_n < HI)
    t_rd = (i_n - LO) * N
    rows = i_o * BO + tl.arange(0, BO)
    cols = tl.arange(0, BI)
    rmask, cmask = rows < O, cols < I
    tile = rows[:, None] * I + cols[None, :]
    tmask = rmask[:, None] & cmask[None, :]
    w, s = _load_pair(w0, s0, i_n * O * I, tile, tmask, BO, BI, MOM)
    # PREFETCH: token r + 1's inputs are loaded before token r's step, so their latency hides behind
    # it (the step waits only on the state); the last token loads itself again
    if PREFETCH:
        xr, kr, br, fr, ar, mr = _token(x, k, b, f, a, m, i_n * N, rows, cols, rmask, cmask, O, I, DECAY, MOM)
    for r in range(N):
        t = i_n * N + r
        if PREFETCH:
            tn = i_n * N + tl.minimum(r + 1, N - 1)
            xn, kn, bn, fn, an, mn = _token(x, k, b, f, a, m, tn, rows, cols, rmask, cmask, O, I, DECAY, MOM)
        else:
            xr, kr, br, fr, ar, mr = _token(x, k, b, f, a, m, t, rows, cols, rmask, cmask, O, I, DECAY, MOM)
        if READ == 1:
            if reads:
                ur = _row(u, (t_rd + r) * I, cols, cmask)
                tl.store(rd + (t_rd + r) * O + rows, tl.sum(w * ur[None, :], 1), mask=rmask)
        w, s, e = _step(w, s, xr, kr, br, fr, ar, mr, MOM)
        if PREFETCH:
            xr, kr, br, fr, ar, mr = xn, kn, bn, fn, an, mn
        if READ == 2:
            if reads:
                ur = _row(u, (t_rd + r) * I, cols, cmask)
                tl.store(rd + (t_rd + r) * O + rows, tl.sum(w * ur[None, :], 1), mask=rmask)
    _store_pair(wt, st, i_n * O * I, tile, tmask, w, s, MOM)


@triton.jit
def _bwd(w0, s0, x, k, b, f, a, m, u, drd, dwt, dst, ckw, cks, scw, scs, dw0, ds0, dx, dk, db, df, da, dm, du,
         N, NN, LO, HI, O: tl.constexpr, I: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, K: tl.constexpr,
         MOM: tl.constexpr, DECAY: tl.constexpr, READ: tl.constexpr, PREFETCH: tl.constexpr):
    i_o, i_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = i_o * BO + tl.arange(0, BO)
    cols = tl.arange(0, BI)
    rmask, cmask = rows < O, cols < I
    tile = rows[:, None] * I + cols[None, :]
    tmask = rmask[:, None] & cmask[None, :]
    nb = (N + K - 1) // K
    # the per-row-block partial sums: slot [i_o, i_n, ...] of [nob, NN, ...] ([nob, HI − LO, ...] for du)
    part = i_o * NN + i_n
    reads = (i_n >= LO) & (i_n < HI)
    t_rd = (i_n - LO) * N
    p_rd = (i_o * (HI - LO) + i_n - LO) * N
    # 1. forward again, keeping the state before every K-th token: the first block's is the chunk's
    # start, and the last block's tokens are walked in step 2, so this walks only the tokens before the
    # last block (none when the chunk is one block: HOPE's 16-token chunks)
    w, s = _load_pair(w0, s0, i_n * O * I, tile, tmask, BO, BI, MOM)
    for r in range((nb - 1) * K):
        if r % K == 0:
            if r > 0:
                _store_pair(ckw, cks, (i_n * (nb - 1) + r // K - 1) * O * I, tile, tmask, w, s, MOM)
        w, s = _advance(w, s, x, k, b, f, a, m, i_n * N + r, rows, cols, rmask, cmask, O, I, DECAY, MOM)
    if nb > 1:
        _store_pair(ckw, cks, (i_n * (nb - 1) + nb - 2) * O * I, tile, tmask, w, s, MOM)
    # a tile smaller than the program's threads is stored by one thread and loaded by all of them,
    # so every store to the checkpoints and the scratch is fenced from the loads that follow
    tl.debug_barrier()
    # 2. the blocks from the last: the block's states into the scratch, then back through them
    wb, sb = _load_pair(dwt, dst, i_n * O * I, tile, tmask, BO, BI, MOM)
    sc = i_n * (K + 1) * O * I  # this row of programs' scratch: K + 1 states
    for j in range(nb):
        blk = nb - 1 - j
        r0 = blk * K
        r1 = tl.minimum(r0 + K, N)
        if blk == 0:
            w, s = _load_pair(w0, s0, i_n * O * I, tile, tmask, BO, BI, MOM)
        else:
            w, s = _load_pair(ckw, cks, (i_n * (nb - 1) + blk - 1) * O * I, tile, tmask, BO, BI, MOM)
        _store_pair(scw, scs, sc, tile, tmask, w, s, MOM)
        for r in range(r0, r1):
            w, s = _advance(w, s, x, k, b, f, a, m, i_n * N + r, rows, cols, rmask, cmask, O, I, DECAY, MOM)
            _store_pair(scw, scs, sc + (r - r0 + 1) * O * I, tile, tmask, w, s, MOM)
        tl.debug_barrier()
        # PREFETCH: the previous token's state (from the scratch) and inputs are loaded before this
        # token's adjoint step; the block's first token loads itself again
        if PREFETCH:
            wp, sp = _load_pair(scw, scs, sc + (r1 - 1 - r0) * O * I, tile, tmask, BO, BI, MOM)
            xr, kr, br, fr, ar, mr = _token(x, k, b, f, a, m, i_n * N + r1 - 1, rows, cols, rmask, cmask, O, I,
                                            DECAY, MOM)
        for q in range(r1 - r0):
            r = r1 - 1 - q
            t = i_n * N + r
            if PREFETCH:
                rn = tl.maximum(r - 1, r0)
                wpn, spn = _load_pair(scw, scs, sc + (rn - r0) * O * I, tile, tmask, BO, BI, MOM)
                xn, kn, bn, fn, an, mn = _token(x, k, b, f, a, m, i_n * N + rn, rows, cols, rmask, cmask, O, I,
                                                DECAY, MOM)
            else:
                wp, sp = _load_pair(scw, scs, sc + (r - r0) * O * I, tile, tmask, BO, BI, MOM)  # W_{r−1}, S_{r−1}
                xr, kr, br, fr, ar, mr = _token(x, k, b, f, a, m, t, rows, cols, rmask, cmask, O, I, DECAY, MOM)
            if READ != 0:  # zeros on the rows that do not read
                ur = _row(u, (t_rd + r) * I, cols, cmask & reads)
                dor = tl.load(drd + (t_rd + r) * O + rows, mask=rmask & reads, other=0.0).to(tl.float32)
            if READ == 2:  # o_r = W_r u_r
                if reads:
                    wn = tl.load(scw + sc + (r - r0 + 1) * O * I + tile, mask=tmask, other=0.0)
                    wb += dor[:, None] * ur[None, :]
                    tl.store(du + (p_rd + r) * I + cols, tl.sum(wn * dor[:, None], 0), mask=cmask)
            wk = tl.sum(wp * kr[None, :], 1)
            e = br * wk + fr
            if DECAY:
                tl.store(da + part * N + r, tl.sum(tl.sum(wb * wp, 1), 0))
            if MOM:
                stot = sb + wb  # S_r feeds W_r and S_{r+1}
                tl.store(dm + part * N + r, tl.sum(tl.sum(stot * sp, 1), 0))
                de = -tl.sum(stot * xr[None, :], 1)
                tl.store(dx + (part * N + r) * I + cols, -tl.sum(stot * e[:, None], 0), mask=cmask)
                sb = mr * stot
            else:
                de = -tl.sum(wb * xr[None, :], 1)
                tl.store(dx + (part * N + r) * I + cols, -tl.sum(wb * e[:, None], 0), mask=cmask)
            wb = ar * wb
            tl.store(df + t * O + rows, de, mask=rmask)
            tl.store(db + part * N + r, tl.sum(de * wk, 0))
            wb += br * de[:, None] * kr[None, :]
            tl.store(dk + (part * N + r) * I + cols, br * tl.sum(wp * de[:, None], 0), mask=cmask)
            if READ == 1:  # o_r = W_{r−1} u_r
                if reads:
                    wb += dor[:, None] * ur[None, :]
                    tl.store(du + (p_rd + r) * I + cols, tl.sum(wp * dor[:, None], 0), mask=cmask)
            if PREFETCH:
                wp, sp = wpn, spn
                xr, kr, br, fr, ar, mr = xn, kn, bn, fn, an, mn
        tl.debug_barrier()
    _store_pair(dw0, ds0, i_n * O * I, tile, tmask, wb, sb, MOM)


class _Kernels:
    fwd = _fwd
    bwd = _bwd


def kernels() -> type[_Kernels]:
    """The kernels (compiled on the GPU; interpreted when ``TRITON_INTERPRET=1`` was set before triton
    was first imported)."""
    return _Kernels
