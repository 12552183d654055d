"""Triton kernel of a batched unit-triangular solve with many right-hand sides, in float32.

``a [Ba, n, n]`` is read through two strides (``s_ar`` a row, ``s_ac`` a column), so the same kernel
solves with ``a`` (lower, blocks in order) or with ``aᵀ`` (its strides swapped: upper, blocks in
reverse order, ``REVERSE``); the diagonal is taken as ones and the other triangle is never read.
One program per (right-hand side, column block of ``BO``): the rows go in blocks of ``BS`` (16, or
32 / 64), each block's right-hand side minus the blocks solved before it times their solution
(``tl.dot``s, left-looking), then the diagonal block's inverse times that: at 16 rows built in
registers by substitution over its rows, at 32 or 64 by the delta-rule kernels' UT inverse (16-row
blocks by substitution, the rest in ``BS / 16 − 1`` products), so a system of 256 rows takes 4
sequential block steps of 64 instead of 16 of 16. A solved block is stored to ``x`` and read back
by the later blocks of the same program (a barrier between), so nothing of size ``n`` is held on
chip. ``a``'s batch index is
``(b // DIV) % MOD`` of the right-hand side's ``b``: one ``a`` broadcast over leading or trailing
batch dimensions is read in place, not copied.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._delta_rule_triton import INTERPRETED, _unit_lower_inverse

__all__ = ["INTERPRETED", "kernels"]


@triton.jit
def _diag_inverse(d, k, BS: tl.constexpr, REVERSE: tl.constexpr):
    """``inv(D) − I`` for the unit triangular ``D`` whose strict part is the lower (upper when
    ``REVERSE``) triangle of ``d [BS, BS]``: row r of the inverse is ``e_r − Σ_c D[r, c] inv[c, :]``
    over the rows solved before it, so the rows are built in that order."""
    if REVERSE:
        strict = tl.where(k[:, None] < k[None, :], d, 0.)
    else:
        strict = tl.where(k[:, None] > k[None, :], d, 0.)
    n = tl.zeros([BS, BS], dtype=tl.float32)
    for s in tl.static_range(BS):
        r = BS - 1 - s if REVERSE else s
        here = k == r
        row = tl.sum(tl.where(here[:, None], strict, 0.), axis=0)  # D[r, :] as a vector over c
        new = -row - tl.sum(row[:, None] * n, axis=0)
        n = tl.where(here[:, None], new[None, :], n)
    return n


@triton.jit
def _block_inverse(d, k, BS: tl.constexpr, REVERSE: tl.constexpr, PREC: tl.constexpr):
    """``inv(D)`` for the unit triangular ``D`` whose strict part is the lower (upper when
    ``REVERSE``) triangle of ``d [BS, BS]``, ``BS`` a multiple of 16: the delta-rule kernels' UT
    inverse by blocks of 16 (an upper ``D`` inverted as the transpose of its transpose's)."""
    if REVERSE:
        low = tl.where(k[:, None] > k[None, :], tl.trans(d), 0.)
        return tl.trans(_unit_lower_inverse(low, BS, BS // 16, PREC))
    return _unit_lower_inverse(tl.where(k[:, None] > k[None, :], d, 0.), BS, BS // 16, PREC)


@triton.jit
def _solve_unit(a, r, x, N, O, MOD, DIV, s_ab, s_ar, s_ac, s_rb, s_rr, s_xb, s_xr,
                NB: tl.constexpr, BS: tl.constexpr, BO: tl.constexpr, REVERSE: tl.constexpr,
                PREC: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    i_o = tl.program_id(1)
    a += ((i_b // DIV) % MOD) * s_ab
    r += i_b * s_rb
    x += i_b * s_xb
    k = tl.arange(0, BS)
    cols = i_o * BO + tl.arange(0, BO)
    cm = cols < O
    for step in range(NB):
        i = NB - 1 - step if REVERSE else step
        rows = i * BS + k
        rm = rows < N
        acc = tl.load(r + rows[:, None] * s_rr + cols[None, :], mask=rm[:, None] & cm[None, :],
                      other=0.).to(tl.float32)
        for t in range(step):
            j = NB - 1 - t if REVERSE else t
            js = j * BS + k
            jm = js < N
            blk = tl.load(a + rows[:, None] * s_ar + js[None, :] * s_ac, mask=rm[:, None] & jm[None, :],
                          other=0.).to(tl.float32)
            xj = tl.load(x + js[:, None] * s_xr + cols[None, :], mask=jm[:, None] & cm[None, :], other=0.)
            acc -= tl.dot(blk, xj, input_precision=PREC)
        d = tl.load(a + rows[:, None] * s_ar + rows[None, :] * s_ac, mask=rm[:, None] & rm[None, :],
                    other=0.).to(tl.float32)
        if BS == 16:
            acc += tl.dot(_diag_inverse(d, k, BS, REVERSE), acc, input_precision=PREC)
        else:
            acc = tl.dot(_block_inverse(d, k, BS, REVERSE, PREC), acc, input_precision=PREC)
        tl.store(x + rows[:, None] * s_xr + cols[None, :], acc, mask=rm[:, None] & cm[None, :])
        # the later blocks of this program read what its threads stored
        tl.debug_barrier()


class _Kernels:
    solve = _solve_unit


def kernels() -> type[_Kernels]:
    """The kernels (compiled on the GPU; interpreted when ``TRITON_INTERPRET=1`` was set before triton
    was first imported)."""
    return _Kernels
