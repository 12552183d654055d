"""A batched unit lower-triangular solve (``a⁻¹ r`` or ``a⁻ᵀ r``) as a differentiable custom op in Triton.

HOPE's chunks solve ``(I + diag(b) ((U Xᵀ) ⊙ Ω)) E = rhs`` for every chunk, head and memory
(:mod:`nlgraph.compilers.chunked`): hundreds of ``[n, n]`` systems of ``n`` = 256 with 32–64
right-hand columns each. ``torch.linalg.solve_triangular`` hands them to cuBLAS's batched ``trsm``,
which took 12–16 % of ``hope_large_chunk``'s step on an H100 and copies its operands into the
layout it wants (a broadcast ``a`` once per right-hand side). This op reads ``a`` in place (also
broadcast, or transposed through its strides) and the right-hand sides as they are, and solves by
blocks of 16 rows (:data:`ROWS`: 32 or 64 on request) in float32 (:mod:`._solve_lower_triton`). Registered as
``nlgraph::solve_unit_lower`` with a fake implementation and autograd written with itself, so it
traces under ``torch.compile(fullgraph=True)`` and differentiates to any order. The chunked form's
default for float32 solves on CUDA (``NLGRAPH_CHUNK_SOLVE`` unset): on an H100 it solved the larger
of ``hope_large_chunk``'s calls 1.51x / 1.39x faster than cuBLAS forward / forward + backward and
took the model's step 1.21x faster (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import os

import torch

from ._load import cdiv, load_kernels, pow2, run_precompiled

__all__ = ["solve_unit_lower"]

#: ``NLGRAPH_SOLVE_ROWS``: the rows of a block the solve walks (``16``, default, ``32`` or ``64``),
#: read once a process. At 16 each diagonal block is inverted by substitution and a system of 256
#: rows takes 16 sequential block steps (``hope_large_chunk``'s solves took 190 µs a call, 14 % of
#: its step on an H100); at 32 or 64 the diagonal blocks go through the delta-rule kernels' UT
#: inverse and the steps are 8 or 4, with larger products (at 64 on 8 warps). Compiled for sm_90 on
#: CPU (``benchmarks/kernel_resources.py --cases solve_lower``): 106–108 registers a thread at 16,
#: 184–186 at 32, no spills; 255 and 280–304 bytes of stack at 64 (1,592–1,864 on 4 warps).
#: Checked in Triton's interpreter, not yet timed on a GPU (an earlier 32-row walk that inverted its
#: blocks by substitution was slower than 16 on an H100). Any other value is an error at the first
#: solve.
ROWS = os.environ.get("NLGRAPH_SOLVE_ROWS", "").strip() or "16"


def _rows() -> int:
    if ROWS not in ("16", "32", "64"):
        from nlgraph.errors import NLGraphError

        raise NLGraphError(f"unknown value {ROWS!r}; set it to 16, 32 or 64, or unset it", path="NLGRAPH_SOLVE_ROWS")
    return int(ROWS)


_PREC = "ieee"  # tl.dot's float32 products: exact, as cuBLAS's; tf32x3 was slower on an H100 (chunk_solve.py)


def _kernels(t: torch.Tensor):
    def importer():
        from . import _solve_lower_triton
        return _solve_lower_triton

    return load_kernels(importer, t, "solve_unit_lower", "triangular-solve")


def _broadcast_index(a_batch: tuple[int, ...], batch: tuple[int, ...]) -> tuple[int, int] | None:
    """``(MOD, DIV)`` with ``a``'s flattened batch index ``(b // DIV) % MOD`` for the flattened
    index ``b`` of ``batch`` (the broadcast shape), when ``a``'s dims other than 1 are one run of
    ``batch``'s dims; else ``None`` (``a`` is then expanded and copied)."""
    a_batch = (1,) * (len(batch) - len(a_batch)) + tuple(a_batch)
    real = [i for i, s in enumerate(a_batch) if s != 1]
    if not real:
        return 1, 1
    lo, hi = real[0], real[-1] + 1
    if any(a_batch[i] != batch[i] for i in range(lo, hi)):
        return None
    return math.prod(batch[lo:hi]), math.prod(batch[hi:])


def _solve(a: torch.Tensor, r: torch.Tensor, transpose: bool) -> torch.Tensor:
    n, o = r.shape[-2], r.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], r.shape[:-2])
    rr = r.expand(*batch, n, o).reshape(-1, n, o)
    if rr.stride(-1) != 1:
        rr = rr.contiguous()
    index = _broadcast_index(tuple(a.shape[:-2]), tuple(batch))
    if index is None:
        aa, (mod, div) = a.expand(*batch, n, n).reshape(-1, n, n), (math.prod(batch), 1)
    else:
        aa, (mod, div) = a.reshape(-1, n, n), index
    bt = rr.shape[0]
    x = torch.empty(bt, n, o, dtype=torch.float32, device=r.device)
    if bt and n and o:
        bo = min(64, pow2(o))
        bs = min(_rows(), max(16, pow2(n)))  # no block wider than the system (n = 16 stays 16)
        s_r, s_c = (aa.stride(2), aa.stride(1)) if transpose else (aa.stride(1), aa.stride(2))
        _kernels(r).solve[(bt, cdiv(o, bo))](
            aa, rr, x, n, o, mod, div, aa.stride(0), s_r, s_c, rr.stride(0), rr.stride(1), x.stride(0), x.stride(1),
            NB=cdiv(n, bs), BS=bs, BO=bo, REVERSE=transpose, PREC=_PREC, num_warps=8 if bs == 64 else 4)
    return x.reshape(*batch, n, o)


@torch.library.custom_op("nlgraph::solve_unit_lower", mutates_args=())
def _solve_op(a: torch.Tensor, r: torch.Tensor, transpose: bool) -> torch.Tensor:
    return run_precompiled("solve_unit_lower", "solve", _solve, (a, r, transpose), r.device)


@_solve_op.register_fake
def _(a, r, transpose):
    batch = torch.broadcast_shapes(a.shape[:-2], r.shape[:-2])
    return r.new_empty(*batch, *r.shape[-2:], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    a, r, transpose = inputs
    ctx.save_for_backward(a, output)
    ctx.transpose = transpose
    ctx.shapes = (a.shape, a.dtype, r.shape, r.dtype)


def _backward(ctx, g):
    a, x = ctx.saved_tensors
    a_shape, a_dtype, r_shape, r_dtype = ctx.shapes
    # x = a⁻¹ r: ∂r = a⁻ᵀ g, ∂a = −tril₋₁(∂r xᵀ); x = a⁻ᵀ r: ∂r = a⁻¹ g, ∂a = −tril₋₁(x ∂rᵀ)
    gr = _solve_op(a, g, not ctx.transpose)
    ga = None
    if ctx.needs_input_grad[0]:
        outer = x @ gr.mT if ctx.transpose else gr @ x.mT
        ga = (-outer).tril(-1).sum_to_size(a_shape).to(a_dtype)
    return ga, gr.sum_to_size(r_shape).to(r_dtype), None


_solve_op.register_autograd(_backward, setup_context=_setup_context)


def solve_unit_lower(a: torch.Tensor, rhs: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``a⁻¹ rhs`` (``a⁻ᵀ rhs`` with ``transpose``) for unit lower-triangular ``a``, in Triton.

    Args:
        a: ``[..., n, n]``; only its strict lower triangle is read (the diagonal is taken as ones).
        rhs: ``[..., n, o]``; the batch dimensions of the two broadcast against each other.
        transpose: solve with ``aᵀ`` (unit upper) instead.

    Returns:
        ``[..., n, o]`` in float32 (float32 arithmetic whatever the inputs' dtype).
    """
    if a.dim() < 2 or rhs.dim() < 2 or a.shape[-1] != a.shape[-2] or rhs.shape[-2] != a.shape[-1]:
        from nlgraph.errors import NLGraphError
        raise NLGraphError(f"expected a [..., n, n] and rhs [..., n, o], got {tuple(a.shape)} and {tuple(rhs.shape)}",
                           path="solve_unit_lower")
    return _solve_op(a, rhs, transpose)
