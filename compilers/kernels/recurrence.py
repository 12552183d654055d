"""The online chunked form's state recurrence as a differentiable custom op over Triton.

``online_recurrence(w0, s0, u, xt, ge, p1, yt, ze, ye, p2)`` walks, per (batch, head), the chunks of
``compilers/chunked.py``'s ``_online_full`` (every other part of a chunk is computed for all chunks
at once there)::

    E_c = U_c + P1_c W_cᵀ + P2_c S_cᵀ,   W_{c+1} = ge_c W_c + ze_c S_c − E_cᵀ X̃_c,   S_{c+1} = ye_c S_c − E_cᵀ Ỹ_c

and returns every chunk's start state and ``E_c`` (for the reads) and the final state, in one
kernel launch instead of a few PyTorch operators a chunk. Forward and backward in Triton
(``_recurrence_triton``), float32 state; registered as ``nlgraph::online_recurrence_fwd`` /
``_bwd`` with fake implementations and autograd, so ``torch.compile(fullgraph=True)`` traces it.
:func:`loop` is the same function in PyTorch (the tests' reference, and the fallback).

The rest of a chunk's work has kernels of its own, each a custom op with its PyTorch form in
``compilers/chunked.py`` and a switch (off until a GPU has timed it, unless said otherwise):
:func:`online_reads` (``NLGRAPH_RECURRENCE_READS``), :func:`online_prepare` (the chunk systems,
``NLGRAPH_RECURRENCE_PREPARE``; ``solve_chunks``) and :func:`online_gates` (a momentum level's
transfer products, ``NLGRAPH_RECURRENCE_GATES``; ``gate_pieces``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._load import pow2 as _pow2, products

__all__ = ["fits", "gates_fit", "gates_in_kernel", "loop", "online_gates", "online_prepare", "online_reads",
           "online_recurrence", "operand_dtype", "prepare_in_kernel", "reads_fit", "reads_in_kernel", "states_dtype"]

_OP = "online_recurrence"


def _checked(value: str, choices: tuple[str, ...], var: str) -> str:
    """``value`` of the environment variable ``var`` if it is one of ``choices``, else one clear error."""
    if value not in choices:
        from nlgraph.errors import NLGraphError

        raise NLGraphError(f"unknown value {value!r}; set it to {', '.join(choices)}, or unset it", path=var)
    return value


def _autocast(device: torch.device) -> torch.dtype | None:
    from ..chunked import autocast_dtype

    return autocast_dtype(device.type)

#: ``NLGRAPH_RECURRENCE_PRODUCTS``: the dtype of the kernel's ``[n, ·]`` operands (``X̃``, ``P₁``,
#: ``Ỹ``, ``P₂``) under autocast, read once a process. ``input`` (default): rounded to autocast's
#: 16-bit dtype, one tensor-core product each, as the delta-rule kernels take their ``W = T diag(β) K``
#: (the errors ``E`` and the state stay float32, the state cast to 16 bits for its products as
#: there). ``wide``: the promoted dtype of the four, float32 under autocast (the solve's ``P₁`` /
#: ``P₂`` come out in float32), multiplied with ``NLGRAPH_FP32_PRODUCTS``' mode (``tf32x3``: three
#: tensor-core products each). On an H100 the two ran at the same speed (a momentum layer 18.19
#: against 18.23 ms; its model 786,557 against 784,879 tokens/s), ``input`` keeping half the bytes
#: for the backward (the model's peak 3.94 against 4.06 GiB), and the kernel's bf16 checks pass
#: (docs/benchmarks.md). Outside autocast the operands keep their promoted dtype either way. Any
#: other value is an error at the first call.
PRODUCTS = os.environ.get("NLGRAPH_RECURRENCE_PRODUCTS", "").strip().lower() or "input"

#: ``NLGRAPH_RECURRENCE_STATES``: the dtype every chunk's start state ``W_c`` / ``S_c`` is written in
#: for the reads and the backward, under autocast, read once a process. ``float32`` (default): as the
#: walk carries them (at B=4, T=4096, 16 heads of 128, chunk 64: 268 MB each for ``W`` and ``S``,
#: cast again to 16 bits for the reads' products). ``input``: autocast's 16-bit dtype, as the
#: delta-rule kernels keep their chunk states; the walk itself stays float32 and the backward widens
#: what it reads. Outside autocast they stay float32. Any other value is an error at the first call.
STATES = os.environ.get("NLGRAPH_RECURRENCE_STATES", "").strip().lower() or "float32"


def states_dtype(device: torch.device) -> torch.dtype:
    """The dtype :func:`online_recurrence` keeps the chunk starts in on ``device`` (:data:`STATES`)."""
    if _checked(STATES, ("float32", "input"), "NLGRAPH_RECURRENCE_STATES") == "input":
        return _autocast(device) or torch.float32
    return torch.float32


#: ``NLGRAPH_RECURRENCE_SUMS``: how the backward sums, over the state's row blocks, the gradients of
#: the per-chunk inputs ``X̃``, ``P₁``, ``Ỹ``, ``P₂`` and the three scalars, read once a process.
#: ``atomic`` (default): every row block's program adds into one zeroed buffer (as the short
#: convolution's weight gradient; under ``torch.use_deterministic_algorithms(True)`` it takes
#: ``rows``); ``rows``: each row block writes its own partial sums, summed by PyTorch after (bit for
#: bit the same from run to run, at four times the bytes written at a [128, 128] state). Any other
#: value is an error at the first backward.
SUMS = os.environ.get("NLGRAPH_RECURRENCE_SUMS", "").strip().lower() or "atomic"


def _atomic_sums(row_blocks: int) -> bool:
    atomic = _checked(SUMS, ("atomic", "rows"), "NLGRAPH_RECURRENCE_SUMS") == "atomic"
    return row_blocks > 1 and atomic and not torch.are_deterministic_algorithms_enabled()


def operand_dtype(work: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype :func:`online_recurrence`'s ``[n, ·]`` operands are cast to, given their promoted
    dtype ``work`` on ``device`` (:data:`PRODUCTS`)."""
    if _checked(PRODUCTS, ("input", "wide"), "NLGRAPH_RECURRENCE_PRODUCTS") == "input" and work == torch.float32:
        return _autocast(device) or work
    return work


def _kernels(x: torch.Tensor):
    from ._load import load_kernels

    def importer():
        from . import _recurrence_triton as mod

        return mod

    return load_kernels(importer, x, _OP, "recurrence")


def fits(n: int, o: int, i: int) -> bool:
    """Whether the kernel takes chunks of ``n`` tokens and ``[o, i]`` states (``tl.dot`` needs
    blocks of at least 16; the state's rows are blocked, its columns held whole)."""
    return n in (16, 32, 64) and 1 <= o <= 256 and 1 <= i <= 128


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


#: ``NLGRAPH_RECURRENCE_ROWS``: the state rows one program holds (16, 32 or 64; default 32), read
#: once a process. The walk over the chunks is sequential in each program, so fewer rows a program
#: means more programs walking side by side (and more partial sums for the backward to add); on an
#: H100 at a momentum layer's [128, 128] states 16 rows were slower than 32 (backward 2.20 against
#: 2.07 ms, forward 0.52 against 0.42; docs/benchmarks.md).
ROWS = os.environ.get("NLGRAPH_RECURRENCE_ROWS", "").strip() or "32"


#: ``NLGRAPH_RECURRENCE_STAGES``: the backward kernel's pipeline stages (1 or 2; default 1), read once
#: a process. Compiled for sm_90 at a [128, 128] state, chunk 64, bfloat16 operands, 32 rows a
#: program: 176 KiB of shared memory at 2 (one program an SM), 48 KiB at 1
#: (``benchmarks/kernel_resources.py --cases recurrence``). On an H100 the backward took 2.07 ms at 1
#: against 2.36 at 2 (a momentum layer at B=4, T=4096, H=16, D=128, compiled), and the kernel's
#: float32 and bfloat16 checks passed at either (docs/benchmarks.md).
STAGES = os.environ.get("NLGRAPH_RECURRENCE_STAGES", "").strip() or "1"


def _stages() -> int:
    return int(_checked(STAGES, ("1", "2"), "NLGRAPH_RECURRENCE_STAGES"))


#: ``NLGRAPH_RECURRENCE_BWD_WARPS``: the backward kernel's warps (``4``, default, or ``8``), read
#: once a process. Compiled for sm_90 at a [128, 128] state, chunk 64, bfloat16, 32 rows a program
#: (``benchmarks/kernel_resources.py --cases recurrence``): 496 bytes of stack a thread at 4 warps,
#: 80 at 8, but 8 warps at 255 registers fill an SM's register file, so one program an SM instead
#: of two (B=4, H=16's 256 programs then run in two waves on 132 SMs, not one). Not yet timed.
BWD_WARPS = os.environ.get("NLGRAPH_RECURRENCE_BWD_WARPS", "").strip() or "4"


def _bwd_warps() -> int:
    return int(_checked(BWD_WARPS, ("4", "8"), "NLGRAPH_RECURRENCE_BWD_WARPS"))


def _blocks(o: int, i: int) -> tuple[int, int]:
    return min(_pow2(o), int(_checked(ROWS, ("16", "32", "64"), "NLGRAPH_RECURRENCE_ROWS"))), _pow2(i)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


@torch.library.custom_op("nlgraph::online_recurrence_fwd", mutates_args=())
def _fwd_op(w0: torch.Tensor, s0: Optional[torch.Tensor], u: torch.Tensor, xt: torch.Tensor, ge: torch.Tensor,
            p1: Optional[torch.Tensor], yt: Optional[torch.Tensor], ze: Optional[torch.Tensor],
            ye: Optional[torch.Tensor], p2: Optional[torch.Tensor], states: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(starts_w [B,H,C,O,I], starts_s or empty, es [B,H,C,n,O] fp32, w_end, s_end or empty)``,
    the chunk starts in ``states``, the rest float32."""
    b, h, nc, n, o = u.shape
    i = xt.shape[-1]
    mom = s0 is not None
    bo, bi = _blocks(o, i)
    ws = w0.new_empty(b, h, nc, o, i, dtype=states)
    ss = w0.new_empty(b, h, nc, o, i, dtype=states) if mom else _empty(w0)
    es = u.new_empty(b, h, nc, n, o, dtype=torch.float32)
    wt = w0.new_empty(b, h, o, i, dtype=torch.float32)
    st = w0.new_empty(b, h, o, i, dtype=torch.float32) if mom else _empty(w0)
    e = _empty(w0)
    # every product takes xt's dtype (P1, Ỹ, P2 share it; E and the state are cast to it); float32
    # takes tf32x3 unless told: on an H100 its checks stayed within 2.2e-6 of float64, and the
    # forward + backward ran 1.8–2.5x faster than the PyTorch form in the same run, where with ieee
    # it had been slower for two of three levels (docs/benchmarks.md)
    prec = products(xt.dtype, unset="tf32x3")
    # two pipeline stages: its first GPU check (H100, float32, a [128, 128] state, chunk 64) failed
    # at launch with Triton's three asking 278,528 bytes of shared memory (232,448 there);
    # benchmarks/kernel_resources.py --cases recurrence --dtype float32 shows it on CPU
    _kernels(u).fwd[(-(-o // bo), b * h)](
        w0.float().contiguous(), s0.float().contiguous() if mom else e, u, xt, ge, p1 if p1 is not None else e,
        yt if mom else e, ze if mom else e, ye if mom else e, p2 if p2 is not None else e, ws, ss, es, wt, st, nc,
        N=n, O=o, I=i, BO=bo, BI=bi, HAS_P1=p1 is not None, MOM=mom, HAS_P2=p2 is not None, PREC=prec,
        num_stages=2)
    return ws, ss, es, wt, st


@_fwd_op.register_fake
def _(w0, s0, u, xt, ge, p1, yt, ze, ye, p2, states):
    b, h, nc, n, o = u.shape
    i = xt.shape[-1]
    mom = s0 is not None
    return (w0.new_empty(b, h, nc, o, i, dtype=states),
            w0.new_empty(b, h, nc, o, i, dtype=states) if mom else w0.new_empty(0),
            u.new_empty(b, h, nc, n, o, dtype=torch.float32), w0.new_empty(b, h, o, i, dtype=torch.float32),
            w0.new_empty(b, h, o, i, dtype=torch.float32) if mom else w0.new_empty(0))


@torch.library.custom_op("nlgraph::online_recurrence_bwd", mutates_args=())
def _bwd_op(ws: torch.Tensor, ss: Optional[torch.Tensor], es: torch.Tensor, xt: torch.Tensor, ge: torch.Tensor,
            p1: Optional[torch.Tensor], yt: Optional[torch.Tensor], ze: Optional[torch.Tensor],
            ye: Optional[torch.Tensor], p2: Optional[torch.Tensor], dws: torch.Tensor, dss: Optional[torch.Tensor],
            des: torch.Tensor, dwt: torch.Tensor, dst: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """Returns ``[dw0, ds0, du, dxt, dge, dp1, dyt, dze, dye, dp2]`` (empty where there is no input)."""
    b, h, nc, o, i = ws.shape
    n = es.shape[-2]
    mom = ss is not None
    bo, bi = _blocks(o, i)
    nob = -(-o // bo)
    e = _empty(ws)
    atomic = _atomic_sums(nob)

    def part(*shape):
        if atomic:  # every row block adds into one zeroed buffer
            return ws.new_zeros(1, b, h, nc, *shape, dtype=torch.float32)
        # per row block, summed below (the kernel writes every element)
        return ws.new_empty(nob, b, h, nc, *shape, dtype=torch.float32)

    # distinct empties: a custom op's outputs may not alias each other
    dw0 = ws.new_empty(b, h, o, i, dtype=torch.float32)
    ds0 = ws.new_empty(b, h, o, i, dtype=torch.float32) if mom else _empty(ws)
    du = es.new_empty(b, h, nc, n, o, dtype=torch.float32)
    dxt, dge = part(n, i), part()
    dp1 = part(n, i) if p1 is not None else _empty(ws)
    dyt, dze, dye = (part(n, i), part(), part()) if mom else (_empty(ws), _empty(ws), _empty(ws))
    dp2 = part(n, i) if p2 is not None else _empty(ws)
    prec = products(xt.dtype, unset="tf32x3")
    # STAGES pipeline stages (1 by default), never Triton's three: compiled for sm_90 at a [128, 128]
    # state, chunk 64 and bfloat16, three asked for 294,912 bytes of shared memory (the H200 has
    # 232,448), two for 180,224, one for 49,152 (benchmarks/kernel_resources.py --cases recurrence)
    _kernels(ws).bwd[(nob, b * h)](
        ws, ss if mom else e, es, xt, ge, p1 if p1 is not None else e, yt if mom else e, ze if mom else e,
        ye if mom else e, p2 if p2 is not None else e, dws.contiguous(), dss.contiguous() if mom else e,
        des.contiguous(), dwt.contiguous(), dst.contiguous() if mom else e, dw0, ds0, du, dxt, dge, dp1, dyt, dze,
        dye, dp2, nc, b * h, N=n, O=o, I=i, BO=bo, BI=bi, HAS_P1=p1 is not None, MOM=mom, HAS_P2=p2 is not None,
        PREC=prec, ATOMIC=atomic, num_stages=_stages(), num_warps=_bwd_warps())

    def total(t):
        if not t.numel():
            return t
        return t[0] if t.shape[0] == 1 else t.sum(0)

    return [dw0, ds0, du, total(dxt), total(dge), total(dp1), total(dyt), total(dze), total(dye), total(dp2)]


@_bwd_op.register_fake
def _(ws, ss, es, xt, ge, p1, yt, ze, ye, p2, dws, dss, des, dwt, dst):
    b, h, nc, o, i = ws.shape
    n = es.shape[-2]
    mom = ss is not None

    def f32(*shape):
        return ws.new_empty(*shape, dtype=torch.float32)

    def e():
        return ws.new_empty(0)

    return [f32(b, h, o, i), f32(b, h, o, i) if mom else e(), f32(b, h, nc, n, o), f32(b, h, nc, n, i),
            f32(b, h, nc), f32(b, h, nc, n, i) if p1 is not None else e(), f32(b, h, nc, n, i) if mom else e(),
            f32(b, h, nc) if mom else e(), f32(b, h, nc) if mom else e(),
            f32(b, h, nc, n, i) if p2 is not None else e()]


def _setup_context(ctx, inputs, output):
    w0, s0, u, xt, ge, p1, yt, ze, ye, p2, _ = inputs
    ws, ss, es, _, _ = output
    ctx.save_for_backward(ws, ss if s0 is not None else None, es, xt, ge, p1, yt, ze, ye, p2)
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:-1]]


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _autograd_backward(ctx, dws, dss, des, dwt, dst):
    ws, ss, es, xt, ge, p1, yt, ze, ye, p2 = ctx.saved_tensors
    mom = ss is not None
    dws, des = _zeros_if_none(dws, ws), _zeros_if_none(des, es)
    dwt = _zeros_if_none(dwt, ws[:, :, 0])
    if mom:
        dss, dst = _zeros_if_none(dss, ss), _zeros_if_none(dst, ss[:, :, 0])
    else:
        dss = dst = None
    grads = _bwd_op(ws, ss, es, xt, ge, p1, yt, ze, ye, p2, dws, dss, des, dwt, dst)
    out = []
    for g, dtype in zip(grads, ctx.dtypes):
        out.append(None if dtype is None else g.to(dtype))
    return (*out, None)  # no gradient for the states' dtype


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def online_recurrence(w0, s0, u, xt, ge, p1=None, yt=None, ze=None, ye=None, p2=None, states=torch.float32):
    """The recurrence in the module docstring through the kernel.

    Args:
        w0, s0: ``[B, H, O, I]`` the state at the first chunk's start (``s0``: momentum, or ``None``).
        u: ``[B, H, C, n, O]``; xt, p1, yt, p2: ``[B, H, C, n, I]`` (one dtype); ge, ze, ye: ``[B, H, C]``.
        ``p1`` / ``p2`` are ``None`` when the update does not read the state; ``yt``, ``ze``, ``ye``,
        ``p2`` are ``None`` without momentum.
        states: the dtype every chunk's start state is kept in (float32, bfloat16 or float16; the
            walk itself stays float32, the backward reads them back).

    Returns:
        ``(starts_w [B, H, C, O, I], starts_s or None, es [B, H, C, n, O], w_end, s_end or None)``,
        the chunk starts in ``states``, the rest float32.

    Raises:
        NLGraphError: a chunk or state size :func:`fits` refuses, or ``[n, ·]`` operands that are not
        float32 / bfloat16 / float16 of one dtype (float64 is :func:`loop`'s).
    """
    from nlgraph.errors import NLGraphError

    mats = [t for t in (xt, p1, yt, p2) if t is not None]
    if any(t.dtype not in _DTYPES or t.dtype != xt.dtype for t in mats):
        raise NLGraphError(f"xt, p1, yt and p2 must share one dtype among float32, bfloat16 and float16, got "
                           f"{sorted({str(t.dtype) for t in mats})}; run recurrence.loop for float64", path=_OP)
    if not fits(u.shape[3], u.shape[4], xt.shape[4]):
        raise NLGraphError(f"chunk {u.shape[3]} with a [{u.shape[4]}, {xt.shape[4]}] state: the kernel takes chunks "
                           "of 16, 32 or 64 and states up to [256, 128]; run recurrence.loop", path=_OP)
    if states not in _DTYPES:
        raise NLGraphError(f"states {states} must be one of float32, bfloat16 and float16", path=_OP)
    mom = s0 is not None
    args = [t.contiguous() if t is not None else None for t in (u, xt, ge, p1, yt, ze, ye, p2)]
    ws, ss, es, wt, st = _fwd_op(w0, s0, *args, states)
    return ws, (ss if mom else None), es, wt, (st if mom else None)


def loop(w0, s0, u, xt, ge, p1=None, yt=None, ze=None, ye=None, p2=None):
    """:func:`online_recurrence` in PyTorch, a chunk at a time (same arguments and results, in float32
    or, given float64, float64)."""
    from ..chunked import recurrence_step

    dt = torch.promote_types(u.dtype, torch.float32)

    def at(t, c):
        return None if t is None else t[:, :, c].to(dt)

    ws, ss, es = [], [], []
    w, s = w0.to(dt), (s0.to(dt) if s0 is not None else None)
    for c in range(u.shape[2]):
        ws.append(w)
        ss.append(s)
        w, s, e = recurrence_step(w, s, at(u, c), at(xt, c), at(ge, c), at(p1, c), at(yt, c), at(ze, c), at(ye, c),
                                  at(p2, c))
        es.append(e)
    return (torch.stack(ws, 2), torch.stack(ss, 2) if s is not None else None, torch.stack(es, 2), w, s)


# --------------------------------------------------------------------------- the reads

#: ``NLGRAPH_RECURRENCE_READS``: who computes the online form's reads from the recurrence's chunk
#: starts, read once a process. ``pytorch`` (default): three batched products (six backward) and
#: their elementwise work in PyTorch. ``kernel``: :func:`online_reads`, one Triton program a chunk,
#: forward and backward. Checked in Triton's interpreter only, not yet on a GPU or timed. Any other
#: value is an error at the first call.
READS = os.environ.get("NLGRAPH_RECURRENCE_READS", "").strip().lower() or "pytorch"
# compiled for sm_90 at a [128, 128] state, chunk 64, bfloat16 (benchmarks/kernel_resources.py
# --cases recurrence): the backward spilled 1,120 bytes of stack on 4 warps, 512 on 8
READS_BWD_WARPS = 8
#: ``NLGRAPH_RECURRENCE_READS_ROWS``: the state rows (output columns) the reads kernels take a loop
#: step, ``0`` (default: all at once, as timed on an H100: the backward 0.99 ms at B=4, T=4096, 16
#: heads of 128) or ``32``: the backward then holds one block of ``W``, ``S`` and their gradients at
#: a time instead of the whole ``[128, 128]`` tiles, and sums ``dO W``, ``dO S`` and ``dA`` over
#: the blocks. Compiled for sm_90 on CPU at that shape (bf16, chunk 64): the backward's stack 568 →
#: 232 bytes a thread, the forward's registers 255 → 110; 64 rows a step asked for 245,760 bytes of
#: shared memory, over the H100's 232,448, so it is not offered. Read once a process.
READS_ROWS = os.environ.get("NLGRAPH_RECURRENCE_READS_ROWS", "").strip() or "0"


def _reads_rows(o: int) -> int:
    """The reads kernels' ``OB``: :data:`READS_ROWS`, checked, 0 where it would cover every row."""
    rows = int(_checked(READS_ROWS, ("0", "32"), "NLGRAPH_RECURRENCE_READS_ROWS"))
    return 0 if rows >= _pow2(o) else rows


def _check_chunk_kernel(op: str, a: tuple[str, torch.Tensor], b: tuple[str, torch.Tensor], n: int, o: int) -> None:
    """One clear error unless the two ``[B, H, C, n, I]`` operands ``a``, ``b`` (name, tensor) share a
    dtype the kernels take and the chunk ``n`` and the ``[o, I]`` state fit one program a chunk
    (:func:`reads_fit`)."""
    from nlgraph.errors import NLGraphError

    (na, ta), (nb, tb) = a, b
    if ta.dtype not in _DTYPES or tb.dtype != ta.dtype:
        raise NLGraphError(f"{na} and {nb} must share one dtype among float32, bfloat16 and float16, got {ta.dtype} "
                           f"and {tb.dtype}", path=op)
    if not reads_fit(n, o, ta.shape[-1]):
        raise NLGraphError(f"chunk {n} with a [{o}, {ta.shape[-1]}] state: the kernel takes chunks of 16, 32 or 64 "
                           "and states up to [128, 128]", path=op)


def reads_fit(n: int, o: int, i: int) -> bool:
    """Whether :func:`online_reads` takes chunks of ``n`` tokens and ``[o, i]`` states (one program
    holds a chunk's whole ``[n, O]`` output and ``[O, I]`` state)."""
    return n in (16, 32, 64) and 1 <= o <= 128 and 1 <= i <= 128


def reads_in_kernel(n: int, o: int, i: int) -> bool:
    """Whether the online form's reads go through :func:`online_reads` (:data:`READS`, and a chunk
    and state it takes)."""
    return _checked(READS, ("pytorch", "kernel"), "NLGRAPH_RECURRENCE_READS") == "kernel" and reads_fit(n, o, i)


@torch.library.custom_op("nlgraph::online_reads_fwd", mutates_args=())
def _reads_fwd_op(q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, bz: Optional[torch.Tensor], m: torch.Tensor,
                  ws: torch.Tensor, ss: Optional[torch.Tensor], es: torch.Tensor) -> torch.Tensor:
    b, h, nc, n, i = q.shape
    o = ws.shape[-2]
    out = es.new_empty(b, h, nc, n, o, dtype=torch.float32)
    e = _empty(q)
    mom = ss is not None
    _kernels(q).reads_fwd[(b * h * nc,)](
        q, k, a, bz if mom else e, m, ws, ss if mom else e, es, out, N=n, O=o, I=i, BO=_pow2(o), BI=_pow2(i),
        MOM=mom, PREC=products(q.dtype, unset="tf32x3"), OB=_reads_rows(o))
    return out


@_reads_fwd_op.register_fake
def _(q, k, a, bz, m, ws, ss, es):
    return es.new_empty(*q.shape[:-1], ws.shape[-2], dtype=torch.float32)


@torch.library.custom_op("nlgraph::online_reads_bwd", mutates_args=())
def _reads_bwd_op(q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, bz: Optional[torch.Tensor], m: torch.Tensor,
                  ws: torch.Tensor, ss: Optional[torch.Tensor], es: torch.Tensor, do: torch.Tensor
                  ) -> list[torch.Tensor]:
    """Returns ``[dq, dk, da, dbz, dm, dws, dss, des]``, float32 (``dbz`` / ``dss`` empty without momentum)."""
    b, h, nc, n, i = q.shape
    o = ws.shape[-2]
    mom = ss is not None

    def f32(*shape):
        return q.new_empty(*shape, dtype=torch.float32)

    dq, dk, da, dm = f32(b, h, nc, n, i), f32(b, h, nc, n, i), f32(b, h, nc, n), f32(b, h, nc, n, n)
    dws, des = f32(b, h, nc, o, i), f32(b, h, nc, n, o)
    dbz, dss = (f32(b, h, nc, n), f32(b, h, nc, o, i)) if mom else (_empty(q), _empty(q))
    e = _empty(q)
    _kernels(q).reads_bwd[(b * h * nc,)](
        q, k, a, bz if mom else e, m, ws, ss if mom else e, es, do.contiguous(), dq, dk, da, dbz, dm, dws, dss, des,
        N=n, O=o, I=i, BO=_pow2(o), BI=_pow2(i), MOM=mom, PREC=products(q.dtype, unset="tf32x3"),
        OB=_reads_rows(o), num_warps=READS_BWD_WARPS)
    return [dq, dk, da, dbz, dm, dws, dss, des]


@_reads_bwd_op.register_fake
def _(q, k, a, bz, m, ws, ss, es, do):
    b, h, nc, n, i = q.shape
    o = ws.shape[-2]
    mom = ss is not None

    def f32(*shape):
        return q.new_empty(*shape, dtype=torch.float32)

    return [f32(b, h, nc, n, i), f32(b, h, nc, n, i), f32(b, h, nc, n), f32(b, h, nc, n) if mom else q.new_empty(0),
            f32(b, h, nc, n, n), f32(b, h, nc, o, i), f32(b, h, nc, o, i) if mom else q.new_empty(0),
            f32(b, h, nc, n, o)]


def _reads_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.dtypes = [None if t is None else t.dtype for t in inputs]


def _reads_backward(ctx, do):
    grads = _reads_bwd_op(*ctx.saved_tensors, do)
    return tuple(None if dt is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes))


_reads_fwd_op.register_autograd(_reads_backward, setup_context=_reads_setup)


def online_reads(q, k, a, bz, m, ws, ss, es):
    """The online form's reads of every chunk from its start state, in one kernel::

        out = diag(a) q Wᵀ + diag(bz) q Sᵀ − (q kᵀ ⊙ M) E

    Args:
        q, k: ``[B, H, C, n, I]``, one dtype (the products' operands; ``W``, ``S``, ``E`` are cast to it).
        a, bz: ``[B, H, C, n]`` the rows' weights of ``W`` and ``S`` (``bz`` ``None`` without momentum).
        m: ``[B, H, C, n, n]`` the mask of the chunk's own writes (float32).
        ws, ss: ``[B, H, C, O, I]`` every chunk's start state and momentum (``ss`` ``None`` without).
        es: ``[B, H, C, n, O]`` the chunk's written errors.

    Returns:
        ``[B, H, C, n, O]`` float32, differentiable in every input.
    """
    _check_chunk_kernel("online_reads", ("q", q), ("k", k), q.shape[3], ws.shape[-2])
    args = [t.contiguous() if t is not None else None for t in (q, k, a, bz, m, ws, ss, es)]
    return _reads_fwd_op(*args)


# --------------------------------------------------------------------------- the chunks' systems

#: ``NLGRAPH_RECURRENCE_PREPARE``: who forms the online form's chunk systems and their solutions
#: ``P₁``, ``P₂``, ``U`` (``compilers/chunked.py``, :func:`~compilers.chunked.solve_chunks`) where the
#: recurrence runs in the kernel, read once a process. ``pytorch`` (default): the erase products,
#: the triangular inverse (``solve_lower``) and three batched products, and their backward, as
#: separate operators. ``kernel``: :func:`online_prepare`, one Triton program a chunk, forward and
#: backward. Checked in Triton's interpreter; not yet on a GPU or timed. Any other value is an error
#: at the first call.
PREPARE = os.environ.get("NLGRAPH_RECURRENCE_PREPARE", "").strip().lower() or "pytorch"
# the backward holds a chunk's [n, n] and [n, I] tiles at once: 8 warps halve what each thread keeps
PREPARE_BWD_WARPS = 8


def prepare_in_kernel(n: int, o: int, i: int) -> bool:
    """Whether the chunk systems go through :func:`online_prepare` (:data:`PREPARE`, and a chunk and
    state :func:`reads_fit` takes: one program holds a chunk's ``[n, O]`` and ``[n, I]`` tiles)."""
    return _checked(PREPARE, ("pytorch", "kernel"), "NLGRAPH_RECURRENCE_PREPARE") == "kernel" and reads_fit(n, o, i)


def _prep_prec(k: torch.Tensor) -> str:
    return products(k.dtype, unset="tf32x3")


@torch.library.custom_op("nlgraph::online_prepare_fwd", mutates_args=())
def _prep_fwd_op(k: torch.Tensor, er: torch.Tensor, cf: torch.Tensor, m: torch.Tensor, g0: torch.Tensor,
                 z: Optional[torch.Tensor], f: torch.Tensor, out: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(p1, p2 or empty, u float32, T float32)``, ``p1`` / ``p2`` in ``out``."""
    b, h, nc, n, i = k.shape
    o = f.shape[-1]
    mom = z is not None
    p1 = k.new_empty(b, h, nc, n, i, dtype=out)
    p2 = k.new_empty(b, h, nc, n, i, dtype=out) if mom else _empty(k)
    u = k.new_empty(b, h, nc, n, o, dtype=torch.float32)
    tm = k.new_empty(b, h, nc, n, n, dtype=torch.float32)
    prec = _prep_prec(k)
    _kernels(k).prepare_fwd[(b * h * nc,)](
        k, er, cf, m, g0, z if mom else _empty(k), f, tm, p1, p2, u, N=n, O=o, I=i, BO=_pow2(o), BI=_pow2(i),
        MOM=mom, PREC=prec, SPREC=prec, NB=n // 16)
    return p1, p2, u, tm


@_prep_fwd_op.register_fake
def _(k, er, cf, m, g0, z, f, out):
    b, h, nc, n, i = k.shape
    return (k.new_empty(b, h, nc, n, i, dtype=out), k.new_empty(b, h, nc, n, i, dtype=out) if z is not None
            else k.new_empty(0), k.new_empty(b, h, nc, n, f.shape[-1], dtype=torch.float32),
            k.new_empty(b, h, nc, n, n, dtype=torch.float32))


@torch.library.custom_op("nlgraph::online_prepare_bwd", mutates_args=())
def _prep_bwd_op(k: torch.Tensor, er: torch.Tensor, cf: torch.Tensor, m: torch.Tensor, g0: torch.Tensor,
                 z: Optional[torch.Tensor], f: torch.Tensor, tm: torch.Tensor, dp1: torch.Tensor,
                 dp2: Optional[torch.Tensor], du: torch.Tensor) -> list[torch.Tensor]:
    """Returns ``[dk, d erase, d coef, dm, dg0, dz, df]``, float32 (``dz`` empty without momentum)."""
    b, h, nc, n, i = k.shape
    o = f.shape[-1]
    mom = z is not None

    def f32(*shape):
        return k.new_empty(*shape, dtype=torch.float32)

    dk, der, dcf, dm, dg0, df = (f32(b, h, nc, n, i), f32(b, h, nc, n, i), f32(b, h, nc, n), f32(b, h, nc, n, n),
                                 f32(b, h, nc, n), f32(b, h, nc, n, o))
    dz = f32(b, h, nc, n) if mom else _empty(k)
    e = _empty(k)
    _kernels(k).prepare_bwd[(b * h * nc,)](
        k, er, cf, m, g0, z if mom else e, f, tm, dp1.contiguous(), dp2.contiguous() if mom else e,
        du.contiguous(), dk, der, dcf, dm, dg0, dz, df, N=n, O=o, I=i, BO=_pow2(o), BI=_pow2(i), MOM=mom,
        PREC=_prep_prec(k), num_warps=PREPARE_BWD_WARPS)
    return [dk, der, dcf, dm, dg0, dz, df]


@_prep_bwd_op.register_fake
def _(k, er, cf, m, g0, z, f, tm, dp1, dp2, du):
    b, h, nc, n, i = k.shape

    def f32(*shape):
        return k.new_empty(*shape, dtype=torch.float32)

    return [f32(b, h, nc, n, i), f32(b, h, nc, n, i), f32(b, h, nc, n), f32(b, h, nc, n, n), f32(b, h, nc, n),
            f32(b, h, nc, n) if z is not None else k.new_empty(0), f32(b, h, nc, n, f.shape[-1])]


def _prep_setup(ctx, inputs, output):
    k, er, cf, m, g0, z, f, _ = inputs
    ctx.save_for_backward(k, er, cf, m, g0, z, f, output[3])
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:-1]]


def _prep_backward(ctx, dp1, dp2, du, _dtm):
    k, er, cf, m, g0, z, f, tm = ctx.saved_tensors
    mom = z is not None
    p_shape = k.shape
    dp1 = torch.zeros(p_shape, dtype=torch.float32, device=k.device) if dp1 is None else dp1
    if mom:
        dp2 = torch.zeros(p_shape, dtype=torch.float32, device=k.device) if dp2 is None else dp2
    else:
        dp2 = None
    du = torch.zeros(*k.shape[:-1], f.shape[-1], dtype=torch.float32, device=k.device) if du is None else du
    grads = _prep_bwd_op(k, er, cf, m, g0, z, f, tm, dp1, dp2, du)
    return (*(None if dt is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None)


_prep_fwd_op.register_autograd(_prep_backward, setup_context=_prep_setup)


def online_prepare(k, erase, coef, m, g0, z, f, out=None):
    """Every chunk's system and its solutions in one kernel (``compilers/chunked.py``,
    :func:`~compilers.chunked.solve_chunks` is the same in PyTorch)::

        T = (I + strict(diag(coef) (erase kᵀ ⊙ M)))⁻¹,
        P₁ = T diag(coef g0) erase,   P₂ = T diag(coef z) erase,   U = T f

    Args:
        k, erase: ``[B, H, C, n, I]``, one dtype among float32, bfloat16 and float16 (the products'
            operands: ``T`` and ``f`` are cast to it; float32 multiplies in ``NLGRAPH_FP32_PRODUCTS``'
            mode, three TF32 products unless told).
        coef, g0, z: ``[B, H, C, n]`` the rows' write strength and the state terms' weights (``z``
            ``None`` without momentum).
        m: ``[B, H, C, n, n]`` the chunk's transfer mask (only its strictly lower part is read).
        f: ``[B, H, C, n, O]`` the forcing.
        out: the dtype of ``P₁`` / ``P₂`` (default ``k``'s).

    Returns:
        ``(P₁, P₂ or None, U)``: ``[B, H, C, n, I]`` in ``out``, and ``U`` ``[B, H, C, n, O]`` float32,
        differentiable in every input.
    """
    _check_chunk_kernel("online_prepare", ("k", k), ("erase", erase), k.shape[3], f.shape[-1])
    args = [t.contiguous() if t is not None else None for t in (k, erase, coef, m, g0, z, f)]
    p1, p2, u, _ = _prep_fwd_op(*args, out or k.dtype)
    return p1, (p2 if z is not None else None), u


# --------------------------------------------------------------------------- the chunks' gates

#: ``NLGRAPH_RECURRENCE_GATES``: who forms a momentum level's transfer products (``Ω = G Y`` and
#: the rows and columns the system, the reads and the recurrence take: :func:`~compilers.chunked.gate_pieces`)
#: where the recurrence runs in the kernel, read once a process. ``pytorch`` (default): two
#: ``[n+1, n+1]`` cumulative products, a batched product and a dozen slices (each a zero-filled
#: buffer and a copy backward, eagerly). ``kernel``: :func:`online_gates`, one Triton program a chunk
#: each way, products only (exact at gates of 0), float32. Checked in Triton's interpreter; not yet
#: on a GPU. Any other value is an error at the first call.
GATES = os.environ.get("NLGRAPH_RECURRENCE_GATES", "").strip().lower() or "pytorch"


def gates_in_kernel(n: int) -> bool:
    """Whether a momentum level's transfer products go through :func:`online_gates` (:data:`GATES`,
    and a chunk of 16, 32 or 64 tokens)."""
    return _checked(GATES, ("pytorch", "kernel"), "NLGRAPH_RECURRENCE_GATES") == "kernel" and gates_fit(n)


# compiled for sm_90 at n = 64 (benchmarks/kernel_resources.py), forward / backward: 824 / 1,968 bytes of
# stack a thread at 8 warps, 984 / 3,544 at 4, 632 / 2,344 at 16 (128 registers there)
GATES_WARPS = 8
_GATES_PREC = "tf32x3"  # [n, n] float32 products of the gates: three TF32 products, float32-close


@torch.library.custom_op("nlgraph::online_gates_fwd", mutates_args=())
def _gates_fwd_op(a: torch.Tensor, u: torch.Tensor, after: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(omp [B,H,C,n,n], om [B,H,C,n,n] or empty, vec [B,H,C,7,n])``, float32."""
    b, h, nc, n = a.shape
    omp = a.new_empty(b, h, nc, n, n, dtype=torch.float32)
    om = a.new_empty(b, h, nc, n, n, dtype=torch.float32) if after else _empty(a)
    vec = a.new_empty(b, h, nc, 7, n, dtype=torch.float32)
    _kernels(a).gates_fwd[(b * h * nc,)](a, u, omp, om, vec, N=n, OM=after, PREC=_GATES_PREC, num_warps=GATES_WARPS)
    return omp, om, vec


@_gates_fwd_op.register_fake
def _(a, u, after):
    b, h, nc, n = a.shape
    return (a.new_empty(b, h, nc, n, n, dtype=torch.float32),
            a.new_empty(b, h, nc, n, n, dtype=torch.float32) if after else a.new_empty(0),
            a.new_empty(b, h, nc, 7, n, dtype=torch.float32))


@torch.library.custom_op("nlgraph::online_gates_bwd", mutates_args=())
def _gates_bwd_op(a: torch.Tensor, u: torch.Tensor, domp: torch.Tensor, dom: torch.Tensor, dvec: torch.Tensor,
                  after: bool) -> tuple[torch.Tensor, torch.Tensor]:
    da, du = torch.empty_like(a, dtype=torch.float32), torch.empty_like(u, dtype=torch.float32)
    n = a.shape[-1]
    _kernels(a).gates_bwd[(a.numel() // n,)](a, u, domp.contiguous(), dom.contiguous() if after else _empty(a),
                                             dvec.contiguous(), da, du, N=n, OM=after, PREC=_GATES_PREC,
                                             num_warps=GATES_WARPS)
    return da, du


@_gates_bwd_op.register_fake
def _(a, u, domp, dom, dvec, after):
    return torch.empty_like(a, dtype=torch.float32), torch.empty_like(u, dtype=torch.float32)


def _gates_setup(ctx, inputs, output):
    a, u, after = inputs
    ctx.save_for_backward(a, u)
    ctx.after = after


def _gates_backward(ctx, domp, dom, dvec):
    a, u = ctx.saved_tensors
    b, h, nc, n = a.shape

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float32, device=a.device)

    domp = zeros(b, h, nc, n, n) if domp is None else domp
    dom = (zeros(b, h, nc, n, n) if dom is None else dom) if ctx.after else _empty(a)
    dvec = zeros(b, h, nc, 7, n) if dvec is None else dvec
    da, du = _gates_bwd_op(a, u, domp, dom, dvec, ctx.after)
    return da.to(a.dtype), du.to(u.dtype), None


_gates_fwd_op.register_autograd(_gates_backward, setup_context=_gates_setup)


def online_gates(a: torch.Tensor, u: torch.Tensor, after: bool) -> dict[str, torch.Tensor]:
    """A momentum level's transfer products of every chunk in one kernel: the same pieces as
    :func:`compilers.chunked.gate_pieces` (its docstring names them), float32, differentiable in ``a``
    and ``u``.

    Args:
        a, u: ``[B, H, C, n]`` the retention and momentum factors (float32 or 16 bits; ones for
            ``a`` without retention).
        after: whether the reads come after the write (then ``om``, ``ga`` and ``z`` are their rows).
    """
    from nlgraph.errors import NLGraphError

    if a.shape != u.shape or a.dim() != 4 or not gates_fit(a.shape[-1]):
        raise NLGraphError(f"expected a and u [B, H, C, n] with n 16, 32 or 64, got {tuple(a.shape)} and "
                           f"{tuple(u.shape)}", path="online_gates")
    omp, om, vec = _gates_fwd_op(a.contiguous(), u.contiguous(), after)
    gp, zp, ga, z, yu, yend, oml = vec.unbind(-2)
    return dict(omp=omp, om=om if after else None, gp=gp, zp=zp, ga=ga, z=z, yu=yu, yend=yend, oml=oml)


def gates_fit(n: int) -> bool:
    """Whether :func:`online_gates` takes chunks of ``n`` tokens."""
    return n in (16, 32, 64)
