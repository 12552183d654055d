"""One mini-batch chunk's weight recurrence, walked token by token, as a differentiable custom op over
Triton.

``chunk_walk(w0, s0, x, erase, b, f, alpha, mu, u, read)`` runs, per leading index ``n`` (slots,
batch and heads flattened), the engine of ``compilers/chunked.py`` over one chunk::

    e_r = b_r W_{r−1} ḱ_r + f_r
    S_r = μ_r S_{r−1} − e_r x_rᵀ,   W_r = α_r W_{r−1} + S_r      (momentum; without: W_r = α_r W_{r−1} − e_r x_rᵀ)
    o_r = W_{r−1} u_r (``read="before"``) or W_r u_r (``"after"``)

and returns the reads and the end state. The chunked form solves the same chunk with the
``[n+1, n+1]`` transfer products and a triangular solve, a few hundred operators a layer and chunk
for HOPE's DGD memories; here it is one launch forward and one backward
(``_chunk_walk_triton``), the state in float32 on chip. Registered as ``nlgraph::chunk_walk_fwd`` /
``_bwd`` with fake implementations and autograd, so ``torch.compile(fullgraph=True)`` traces it.
:func:`loop` is the same function in PyTorch (the tests' reference, in float64).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from nlgraph.errors import NLGraphError

from ._load import pow2 as _pow2

__all__ = ["READS", "fits", "chunk_walk", "loop"]

_OP = "chunk_walk"
#: the ``read`` argument: no read, the state before the token's write, or after it
READS = ("none", "before", "after")
#: the widest state row the kernel holds whole (its registers: six ``[BO, I]`` float32 tiles)
MAX_IN = 256


def _kernels(x: torch.Tensor):
    from ._load import load_kernels

    def importer():
        from . import _chunk_walk_triton as mod

        return mod

    return load_kernels(importer, x, _OP, "chunk walk")


def fits(o: int, i: int) -> bool:
    """Whether the kernel takes ``[o, i]`` states (a row of ``i`` is held whole)."""
    return 1 <= o and 1 <= i <= MAX_IN


def _env_pow2(name: str, default: int, top: int) -> int:
    value = os.environ.get(name, "").strip() or str(default)
    if not value.isdigit() or not 1 <= int(value) <= top or int(value) & (int(value) - 1):
        raise NLGraphError(f"must be a power of two up to {top}, got {value!r}; or unset it", path=name)
    return int(value)


def _settings() -> tuple[int, int, int, bool]:
    """``(TILE, WARPS, CHECKPOINT, PREFETCH)`` from the environment, read once at import (a bad value
    is one error naming its variable; a process that times variants sets them before importing)."""
    pf = os.environ.get("NLGRAPH_WALK_PREFETCH", "").strip() or "1"
    if pf not in ("0", "1"):
        raise NLGraphError(f"must be 0 or 1, got {pf!r}; or unset it", path="NLGRAPH_WALK_PREFETCH")
    return (_env_pow2("NLGRAPH_WALK_TILE", 1024, 8192), _env_pow2("NLGRAPH_WALK_WARPS", 1, 16),
            _env_pow2("NLGRAPH_WALK_CHECKPOINT", 16, 4096), pf == "1")


#: float32 elements of a program's state tile (``BO`` rows × the row's width) and the warps that hold
#: it (``NLGRAPH_WALK_TILE``, ``NLGRAPH_WALK_WARPS``), passed to the ops as arguments: the
#: backward's per-row-block partials are sized from the tile, and a traced graph records the values
#: it was traced with, so a graph cached under one setting stays whole when a process with another
#: replays it. Six tiles (state, momentum, their adjoints, two scratch reads) live in the backward's
#: registers, 32 floats of each a thread at 1,024 on one warp. One warp: the token step's sums over
#: rows and columns stay within the warp (no shared memory, no barrier), and there are more
#: programs. On an H100 at HOPE's shapes (80 rows, 16-token chunks, bf16) the backward took 74.2 /
#: 72.1 µs for the two DGD layers at 1,024 on one warp, 91.4 / 87.6 at 512 on one, 138.3 / 188.0 at
#: 2,048 on four, the forward the same; all three layouts passed the GPU check (docs/benchmarks.md).
#:
#: ``CHECKPOINT``: the backward's checkpoint stride (tokens; ``NLGRAPH_WALK_CHECKPOINT``): it keeps
#: ``⌈n / K⌉ − 1`` states a row and ``K + 1`` of scratch; at 16-token chunks strides of 4 and 8 were
#: up to 10 % slower than 16. ``PREFETCH`` (``NLGRAPH_WALK_PREFETCH``): both kernels load the next
#: token's inputs before this token's step, so their latency hides behind it; at HOPE's shapes the
#: forward took 14.6 and 17.3 µs with it against 19.3 and 22.3 without, the backward faster in seven
#: of eight cases. Plain values read by the ops' bodies, which are opaque to Dynamo.
TILE, WARPS, CHECKPOINT, PREFETCH = _settings()


def _blocks(o: int, i: int, tile: int) -> tuple[int, int]:
    bi = _pow2(i)
    return max(1, min(_pow2(o), tile // bi)), bi


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


@torch.library.custom_op("nlgraph::chunk_walk_fwd", mutates_args=())
def _fwd_op(w0: torch.Tensor, s0: Optional[torch.Tensor], x: torch.Tensor, k: torch.Tensor, b: torch.Tensor,
            f: torch.Tensor, a: Optional[torch.Tensor], m: Optional[torch.Tensor], u: Optional[torch.Tensor],
            read: int, lo: int, hi: int, tile: int, warps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(reads [hi − lo, n, O] fp32 or empty, w_end [NN, O, I] fp32, s_end fp32 or empty)``."""
    nn, n, i = x.shape
    o = f.shape[-1]
    mom = s0 is not None
    bo, bi = _blocks(o, i, tile)
    rd = f.new_empty(hi - lo, n, o, dtype=torch.float32) if read else _empty(f)
    wt = w0.new_empty(nn, o, i, dtype=torch.float32)
    st = w0.new_empty(nn, o, i, dtype=torch.float32) if mom else _empty(w0)
    e = _empty(w0)
    if nn and n:
        _kernels(x).fwd[(-(-o // bo), nn)](
            w0, s0 if mom else e, x, k, b, f, a if a is not None else e, m if mom else e, u if read else e, rd, wt,
            st, n, lo, hi, O=o, I=i, BO=bo, BI=bi, MOM=mom, DECAY=a is not None, READ=read, PREFETCH=PREFETCH,
            num_warps=warps)
    else:
        wt.copy_(w0)
        if mom:
            st.copy_(s0)
    return rd, wt, st


@_fwd_op.register_fake
def _(w0, s0, x, k, b, f, a, m, u, read, lo, hi, tile, warps):
    nn, n, i = x.shape
    o = f.shape[-1]
    return (f.new_empty(hi - lo, n, o, dtype=torch.float32) if read else f.new_empty(0),
            w0.new_empty(nn, o, i, dtype=torch.float32),
            w0.new_empty(nn, o, i, dtype=torch.float32) if s0 is not None else w0.new_empty(0))


@torch.library.custom_op("nlgraph::chunk_walk_bwd", mutates_args=())
def _bwd_op(w0: torch.Tensor, s0: Optional[torch.Tensor], x: torch.Tensor, k: torch.Tensor, b: torch.Tensor,
            f: torch.Tensor, a: Optional[torch.Tensor], m: Optional[torch.Tensor], u: Optional[torch.Tensor],
            read: int, lo: int, hi: int, drd: Optional[torch.Tensor], dwt: torch.Tensor,
            dst: Optional[torch.Tensor], tile: int, warps: int) -> list[torch.Tensor]:
    """Returns ``[dw0, ds0, dx, dk, db, df, da, dm, du]`` in float32 (empty where there is no input);
    ``dx``, ``dk``, ``db``, ``da``, ``dm`` and ``du`` as per-row-block partials ``[nob, ...]``, which
    the autograd formula sums: there the sums fuse with the casts to the inputs' dtypes in a
    compiled backward (six reductions a call launched from inside the op before: by count 3,744 of
    the 5,000 ATen reductions of a compiled HOPE step at T=512 on an H100, docs/benchmarks.md)."""
    nn, n, i = x.shape
    o = f.shape[-1]
    mom = s0 is not None
    bo, bi = _blocks(o, i, tile)
    nob = -(-o // bo)
    kk = min(CHECKPOINT, max(n, 1))
    nb = -(-n // kk)
    e = _empty(w0)

    def f32(*shape):
        return w0.new_empty(*shape, dtype=torch.float32)

    def part(*shape):  # per row block, summed below (the kernel writes every element)
        return w0.new_empty(nob, nn, *shape, dtype=torch.float32)

    # distinct buffers: a custom op's outputs may not alias each other
    dw0 = f32(nn, o, i)
    ds0 = f32(nn, o, i) if mom else _empty(w0)
    dx, dk, db, df = part(n, i), part(n, i), part(n), f32(nn, n, o)
    da = part(n) if a is not None else _empty(w0)
    dm = part(n) if mom else _empty(w0)
    du = w0.new_empty(nob, hi - lo, n, i, dtype=torch.float32) if read else _empty(w0)
    if nn and n:
        # the checkpoints of the blocks after the first (the first starts at w0, s0)
        ckw, scw = f32(nn, nb - 1, o, i), f32(nn, kk + 1, o, i)
        cks, scs = (f32(nn, nb - 1, o, i), f32(nn, kk + 1, o, i)) if mom else (e, e)
        _kernels(x).bwd[(nob, nn)](
            w0, s0 if mom else e, x, k, b, f, a if a is not None else e, m if mom else e, u if read else e,
            drd if read else e, dwt, dst if mom else e, ckw, cks, scw, scs, dw0, ds0, dx, dk, db, df, da, dm, du,
            n, nn, lo, hi, O=o, I=i, BO=bo, BI=bi, K=kk, MOM=mom, DECAY=a is not None, READ=read, PREFETCH=PREFETCH,
            num_warps=warps)
    else:
        dw0.copy_(dwt)
        if mom:
            ds0.copy_(dst)
        for t in (dx, dk, db, df, da, dm, du):
            t.zero_()

    return [dw0, ds0, dx, dk, db, df, da, dm, du]


@_bwd_op.register_fake
def _(w0, s0, x, k, b, f, a, m, u, read, lo, hi, drd, dwt, dst, tile, warps):
    nn, n, i = x.shape
    o = f.shape[-1]
    nob = -(-o // _blocks(o, i, tile)[0])

    def f32(*shape):
        return w0.new_empty(*shape, dtype=torch.float32)

    def e():
        return w0.new_empty(0)

    return [f32(nn, o, i), f32(nn, o, i) if s0 is not None else e(), f32(nob, nn, n, i), f32(nob, nn, n, i),
            f32(nob, nn, n), f32(nn, n, o), f32(nob, nn, n) if a is not None else e(),
            f32(nob, nn, n) if s0 is not None else e(), f32(nob, hi - lo, n, i) if read else e()]


#: the outputs of the backward op that are per-row-block partials (summed by the autograd formula)
_PARTIAL = (False, False, True, True, True, False, True, True, True)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.read, ctx.lo, ctx.hi, ctx.tile, ctx.warps = inputs[9:14]
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:9]]


def _autograd_backward(ctx, drd, dwt, dst):
    w0, s0, x, k, b, f, a, m, u = ctx.saved_tensors
    mom = s0 is not None
    if ctx.read:
        drd = torch.zeros((ctx.hi - ctx.lo, x.shape[1], f.shape[-1]), dtype=torch.float32,
                          device=x.device) if drd is None else drd
    else:
        drd = None
    dwt = torch.zeros(w0.shape, dtype=torch.float32, device=w0.device) if dwt is None else dwt
    if mom:
        dst = torch.zeros(w0.shape, dtype=torch.float32, device=w0.device) if dst is None else dst
    else:
        dst = None
    grads = _bwd_op(w0, s0, x, k, b, f, a, m, u, ctx.read, ctx.lo, ctx.hi,
                    drd.contiguous() if drd is not None else None, dwt.contiguous(),
                    dst.contiguous() if dst is not None else None, ctx.tile, ctx.warps)
    out = [None if dtype is None else (g.sum(0) if part else g).to(dtype)
           for g, dtype, part in zip(grads, ctx.dtypes, _PARTIAL)]
    return (*out, None, None, None, None, None)


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def chunk_walk(w0: torch.Tensor, s0: torch.Tensor | None, x: torch.Tensor, erase: torch.Tensor, b: torch.Tensor,
               f: torch.Tensor, alpha: torch.Tensor | None = None, mu: torch.Tensor | None = None,
               u: torch.Tensor | None = None, read: str = "none", rows: tuple[int, int] | None = None):
    """The recurrence in the module docstring through the kernel.

    Args:
        w0, s0: ``[NN, O, I]`` the state at the chunk's start (``s0``: the momentum buffer, or ``None``
            without momentum).
        x, erase: ``[NN, n, I]`` the layer inputs and the erase keys ``ḱ``; b: ``[NN, n]``; f: ``[NN, n, O]``.
        alpha: ``[NN, n]`` the retention (``None``: 1); mu: ``[NN, n]``, with ``s0``.
        u: ``[R, n, I]`` the queries of the rows that read, unless ``read`` is ``"none"``.
        rows: ``(lo, hi)``: only the leading indices ``lo ≤ n < hi`` read (``R = hi − lo``: one
            slot of a stack); ``None``: all of them.

    Returns:
        ``(reads [R, n, O] or None, w_end [NN, O, I], s_end or None)``, float32.

    Raises:
        NLGraphError: a state wider than :data:`MAX_IN`, a dtype the kernel does not take (float64 is
        :func:`loop`'s), momentum without ``mu``, a read without queries.
    """
    if read not in READS:
        raise NLGraphError(f"read must be one of {', '.join(READS)}, got {read!r}", path=_OP)
    if (s0 is None) != (mu is None):
        raise NLGraphError("momentum needs both s0 and mu (or neither)", path=_OP)
    if (read == "none") != (u is None):
        raise NLGraphError(f"read={read!r} with{'' if u is not None else 'out'} queries u", path=_OP)
    ins = [t for t in (w0, s0, x, erase, b, f, alpha, mu, u) if t is not None]
    if any(t.dtype not in _DTYPES for t in ins):
        raise NLGraphError(f"the kernel takes float32, bfloat16 and float16, got {sorted({str(t.dtype) for t in ins})}; "
                           "run chunk_walk.loop for float64", path=_OP)
    lo, hi = rows if rows is not None else (0, x.shape[0])
    if not 0 <= lo <= hi <= x.shape[0] or (u is not None and u.shape[0] != hi - lo):
        raise NLGraphError(f"rows {lo}..{hi} of {x.shape[0]} with queries for {None if u is None else u.shape[0]}: "
                           "the reading rows must lie in the leading axis and match the queries", path=_OP)
    if not fits(f.shape[-1], x.shape[-1]):
        raise NLGraphError(f"a [{f.shape[-1]}, {x.shape[-1]}] state: the kernel holds rows up to {MAX_IN} wide; "
                           "run chunk_walk.loop", path=_OP)
    c = [t.contiguous() if t is not None else None for t in (w0, s0, x, erase, b, f, alpha, mu, u)]
    rd, wt, st = _fwd_op(*c, READS.index(read), lo, hi, TILE, WARPS)
    return (rd if read != "none" else None), wt, (st if s0 is not None else None)


def loop(w0, s0, x, erase, b, f, alpha=None, mu=None, u=None, read="none", rows=None):
    """:func:`chunk_walk` in PyTorch, a token at a time (same arguments and results, in float32 or,
    given float64, float64)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    lo, hi = rows if rows is not None else (0, x.shape[0])
    w = w0.to(dt)
    s = s0.to(dt) if s0 is not None else None
    reads = []
    for r in range(x.shape[1]):
        if read == "before":
            reads.append(w[lo:hi] @ u[:, r].to(dt).unsqueeze(-1))
        e = b[:, r, None].to(dt) * (w @ erase[:, r].to(dt).unsqueeze(-1)).squeeze(-1) + f[:, r].to(dt)
        step = e.unsqueeze(-1) * x[:, r].to(dt).unsqueeze(-2)
        a = alpha[:, r, None, None].to(dt) if alpha is not None else 1.0
        if s is not None:
            s = mu[:, r, None, None].to(dt) * s - step
            w = a * w + s
        else:
            w = a * w - step
        if read == "after":
            reads.append(w[lo:hi] @ u[:, r].to(dt).unsqueeze(-1))
    out = torch.cat(reads, -1).transpose(-1, -2) if reads else None
    return out, w, s
