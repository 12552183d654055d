"""Chunked linear attention with an optional decay per head or per key channel, as a differentiable
custom op over Triton.

``chunk_linear_attention(q, k, v, g, initial_state, output_final_state, scale, chunk)`` computes, token
by token (``α_t = exp(g_t)``, or 1 without ``g``; the state ``h [Dk, Dv]``)::

    h_t = α_t h_{t−1} + k_t v_tᵀ,     o_t = scale · h_tᵀ q_t

with ``g [B, T, H]`` a scalar per token and head (fla's ``chunk_simple_gla``; nlgraph's
``linear_attention`` kind without ``normalize`` when ``g`` is ``None``, and the memory levels on the
``dot`` objective with a per-head decay: RetNet, Mamba2) or ``g [B, T, H, Dk]`` one per key channel,
``h_t = diag(α_t) h_{t−1} + k_t v_tᵀ`` (fla's ``chunk_gla``; levels with a ``per: channel`` decay) in
the chunkwise form of ``_linear_attention_triton``, forward and backward in Triton with fp32
accumulation, an fp32 state carried across chunks (the chunk-start states the output reads, and the
backward recomputes, stored in bf16 for bf16 inputs, as the backward's dh states). Registered as ``nlgraph::chunk_linear_attention_fwd`` / ``_bwd`` with
fake implementations and autograd, so ``torch.compile(fullgraph=True)`` traces through it.

The per-head and per-channel kernels are the memory family's ``triton`` form on CUDA since they
passed on the H200 (``benchmarks/linear_attention_kernel.py``, with ``--channel``): the Hopper backward
miscompiles of triton 3.4–3.7 (reference/anchors.md §1b) can only be ruled out there
(``dispatch.LINEAR_ATTENTION_ON_GPU``, ``dispatch.LINEAR_ATTENTION_CHANNEL_ON_GPU``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from nlgraph.errors import NLGraphError

from ._load import CHANNEL_BACKWARD_WARPS, cdiv as _cdiv, kernel_chunk, pad_heads, pow2 as _pow2, products, run_precompiled

__all__ = ["chunk_linear_attention", "token_loop"]

_OP = "chunk_linear_attention"


def _kernels(q: torch.Tensor):
    from ._load import load_kernels

    def importer():
        from . import _linear_attention_triton as mod

        return mod

    return load_kernels(importer, q, _OP, "linear-attention")


def _plan(q: torch.Tensor, v: torch.Tensor, chunk: int) -> dict:
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    bk = _pow2(dk)
    return dict(B=b, T=t, H=h, K=dk, V=dv, C=chunk, NT=_cdiv(t, chunk), BK=bk, BV=min(_pow2(dv), 64),
                # the state recurrences' key blocks: at Dk = 128 two, so 4 programs a head walk the chunks
                BKS=min(bk, 64),
                # tf32x3 unset: checked on an H100 with and without a decay per key channel at key
                # widths up to 128 (float32 within 2.3e-6 of float64; docs/benchmarks.md); wider
                # keys stay exact (_load.products)
                PREC=products(q.dtype, unset="tf32x3", key=dk))


def _chunk_cumsum(g: torch.Tensor, chunk: int, reverse: bool = False) -> torch.Tensor:
    """``b``: the cumulative sum of ``g [B, T, H]`` or ``[B, T, H, K]`` along T, restarted at every
    chunk, float32; with ``reverse`` the reverse cumulative sum inside every chunk (its adjoint)."""
    assert g.dim() in (3, 4), f"expected [B, T, H] or [B, T, H, K], got {tuple(g.shape)}"
    b, t, h = g.shape[:3]
    kw = g.shape[3] if g.dim() == 4 else 1
    g = g.contiguous()
    out = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    _kernels(g).chunk_cumsum[(_cdiv(t, chunk), b * h)](
        g, out, t, H=h, K=kw, C=chunk, BK=1 << (kw - 1).bit_length(), REVERSE=reverse)
    return out


def _states(kn, p, k, v, bcum, h0, store_ht: bool):
    b, h, nt = p["B"], p["H"], p["NT"]
    # the chunk-start states in bf16 for bf16 inputs (as the delta rule keeps them), and the backward's
    # dh states with them (empty_like): the states are the kernels' largest traffic (512 MiB a pass in
    # float32 at B=4, T=4096, H=16, D=128, chunk 32). Every use of a state but one is a product in the
    # input dtype, which rounded the float32 states to bf16 anyway; the one, Σ h ⊙ dh (the chunk's last
    # decay's term of dg), now takes bf16-rounded factors (the GPU's bf16 checks pass: docs/benchmarks.md).
    # float16 keeps float32: a state without decay grows with T past float16's range
    hs = k.new_empty(b, nt, h, p["K"], p["V"], dtype=torch.bfloat16 if k.dtype == torch.bfloat16 else torch.float32)
    ht = k.new_empty(b, h, p["K"], p["V"], dtype=torch.float32) if store_ht else k.new_empty(0)
    e = k.new_empty(0)
    kn.state_fwd[(_cdiv(p["V"], p["BV"]), _cdiv(p["K"], p["BKS"]), b * h)](
        k, v, bcum if bcum is not None else e, h0 if h0 is not None else e, hs, ht, p["T"], nt, H=h, K=p["K"],
        V=p["V"], C=p["C"], BK=p["BKS"], BV=p["BV"], USE_G=bcum is not None, USE_H0=h0 is not None,
        STORE_HT=store_ht, PREC=p["PREC"], GK=_per_channel(bcum))
    return hs, ht


def _per_channel(g: torch.Tensor | None) -> bool:
    return g is not None and g.dim() == 4


@torch.library.custom_op("nlgraph::chunk_linear_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
            h0: Optional[torch.Tensor], scale: float, chunk: int, output_final_state: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(o [B, T, H, Dv], final state [B, H, Dk, Dv] fp32 or empty, b (g's shape) fp32 or empty)``."""
    args = (q, k, v, g, h0, scale, chunk, output_final_state)
    return run_precompiled(_OP, "fwd", _forward, args, q.device)


def _forward(q, k, v, g, h0, scale, chunk, output_final_state):
    kn = _kernels(q)
    p = _plan(q, v, chunk)
    bcum = _chunk_cumsum(g, chunk) if g is not None else None
    hs, ht = _states(kn, p, k, v, bcum, h0, output_final_state)
    o = torch.empty_like(v)
    grid = (_cdiv(p["V"], p["BV"]), p["NT"], p["B"] * p["H"])
    if _per_channel(bcum):  # one program a chunk, for all value blocks (its A built once)
        kn.output_channel[grid[1:]](q, k, v, bcum, hs, q.new_empty(0), o, scale, p["T"], p["NT"], H=p["H"], K=p["K"],
                                    V=p["V"], C=chunk, BK=p["BK"], BV=p["BV"], PREC=p["PREC"], STORE_P=False)
    else:
        kn.output[grid](
            q, k, v, bcum if bcum is not None else q.new_empty(0), hs, o, scale, p["T"], p["NT"], H=p["H"],
            K=p["K"], V=p["V"], C=chunk, BK=p["BK"], BV=p["BV"], USE_G=bcum is not None, PREC=p["PREC"])
    return o, ht, bcum if bcum is not None else q.new_empty(0)


@_fwd_op.register_fake
def _(q, k, v, g, h0, scale, chunk, output_final_state):
    b, t, h, dk = q.shape
    ht = q.new_empty(b, h, dk, v.shape[-1], dtype=torch.float32) if output_final_state else q.new_empty(0)
    return torch.empty_like(v), ht, (g.new_empty(g.shape, dtype=torch.float32) if g is not None else q.new_empty(0))


@torch.library.custom_op("nlgraph::chunk_linear_attention_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bcum: Optional[torch.Tensor],
            h0: Optional[torch.Tensor], do: torch.Tensor, dht: Optional[torch.Tensor], scale: float, chunk: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, dg or empty, dh0 or empty)``."""
    args = (q, k, v, bcum, h0, do, dht, scale, chunk)
    return run_precompiled(_OP, "bwd", _backward, args, q.device)


def _backward(q, k, v, bcum, h0, do, dht, scale, chunk):
    kn = _kernels(q)
    p = _plan(q, v, chunk)
    b, h, nt = p["B"], p["H"], p["NT"]
    e = q.new_empty(0)
    use_g = bcum is not None
    hs, _ = _states(kn, p, k, v, bcum, h0, False)
    do = do.contiguous()
    dhs = torch.empty_like(hs)
    dh0 = q.new_empty(b, h, p["K"], p["V"], dtype=torch.float32) if h0 is not None else e
    kn.state_bwd[(_cdiv(p["V"], p["BV"]), _cdiv(p["K"], p["BKS"]), b * h)](
        q, do, bcum if use_g else e, dht.contiguous() if dht is not None else e, dhs, dh0, scale, p["T"], nt,
        H=h, K=p["K"], V=p["V"], C=chunk, BK=p["BKS"], BV=p["BV"], USE_G=use_g, USE_DHT=dht is not None,
        STORE_DH0=h0 is not None, PREC=p["PREC"], GK=_per_channel(bcum))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    db = torch.empty_like(bcum) if use_g else e
    # one stage: pipelining the loop over value blocks keeps two fp32 [Dk, BV] states per stage in
    # shared memory, 312 KiB at Dk = 128 against the H200's 227 KiB
    if _per_channel(bcum):
        kn.grads_channel[(nt, b * h)](
            q, k, v, bcum, hs, dhs, do, dq, dk, dv, db, scale, p["T"], nt, H=h, K=p["K"], V=p["V"], C=chunk,
            BK=p["BK"], BV=p["BV"], PREC=p["PREC"], num_stages=1, num_warps=CHANNEL_BACKWARD_WARPS)
    else:
        kn.grads[(nt, b * h)](
            q, k, v, bcum if use_g else e, hs, dhs, do, dq, dk, dv, db, scale, p["T"], nt, H=h, K=p["K"], V=p["V"],
            C=chunk, BK=p["BK"], BV=p["BV"], USE_G=use_g, PREC=p["PREC"], num_stages=1)
    dg = _chunk_cumsum(db, chunk, reverse=True) if use_g else q.new_empty(0)
    # distinct empties: a custom op's outputs may not alias each other
    return dq, dk, dv, dg, (dh0.to(h0.dtype) if h0 is not None else q.new_empty(0))


@_bwd_op.register_fake
def _(q, k, v, bcum, h0, do, dht, scale, chunk):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(bcum) if bcum is not None else q.new_empty(0),
            torch.empty_like(h0) if h0 is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, g, h0, scale, chunk, _ = inputs
    _, _, bcum = output
    ctx.save_for_backward(q, k, v, bcum if g is not None else None, h0)
    ctx.scale, ctx.chunk, ctx.g_dtype = scale, chunk, (g.dtype if g is not None else None)


def _autograd_backward(ctx, do, dht, _dbcum):
    q, k, v, bcum, h0 = ctx.saved_tensors
    if dht is not None and dht.numel() == 0:
        dht = None
    dq, dk, dv, dg, dh0 = _bwd_op(q, k, v, bcum, h0, do, dht, ctx.scale, ctx.chunk)
    return (dq, dk, dv, dg.to(ctx.g_dtype) if ctx.g_dtype is not None else None,
            dh0 if h0 is not None else None, None, None, None)


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                           initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                           scale: float | None = None, chunk: int = 64
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention with an optional decay per head or per key channel, chunked, in Triton.

    Args:
        q, k: ``[B, T, H, Dk]`` (float32 / bfloat16 / float16); v: ``[B, T, H, Dv]``, same dtype.
        g: log decays (``α = exp(g)``, applied before each write): ``[B, T, H]`` one per head,
            ``[B, T, H, Dk]`` one per key channel (the state's rows), or ``None``.
        initial_state: ``[B, H, Dk, Dv]`` (fp32 recommended), or ``None`` (zeros).
        output_final_state: also return the state after the last token, ``[B, H, Dk, Dv]`` fp32.
        scale: output scale; ``None`` means ``Dk ** -0.5`` (fla's default; nlgraph's levels use 1).
        chunk: tokens per chunk (16, 32 or 64; 32 with ``g`` per key channel, see
            ``_load.CHANNEL_CHUNK``).

    Returns:
        ``(o [B, T, H, Dv] in v's dtype, final state or None)``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise NLGraphError("expected a float32 / bfloat16 / float16 [B, T, H, D] tensor", path=f"{_OP}.{name}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NLGraphError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, T, H] "
                           "(q and k also on Dk) and share one dtype", path=f"{_OP}.k")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        raise NLGraphError(f"head dims Dk={q.shape[-1]}, Dv={v.shape[-1]} exceed 256; split the heads", path=f"{_OP}.q")
    if g is not None and tuple(g.shape) not in (tuple(q.shape[:3]), tuple(q.shape)):
        raise NLGraphError(f"expected a [B, T, H] = {tuple(q.shape[:3])} or [B, T, H, Dk] = {tuple(q.shape)} "
                           f"tensor, got {tuple(g.shape)}", path=f"{_OP}.g")
    want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise NLGraphError(f"expected [B, H, Dk, Dv] = {want}, got {tuple(initial_state.shape)}",
                           path=f"{_OP}.initial_state")
    if chunk not in (16, 32, 64):
        raise NLGraphError(f"chunk {chunk} must be 16, 32 or 64", path=f"{_OP}.chunk")
    chunk = kernel_chunk(g, chunk)
    _kernels(q)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not math.isfinite(scale):
        raise NLGraphError(f"scale {scale} is not finite", path=f"{_OP}.scale")
    if q.shape[1] == 0:
        final = None
        if output_final_state:
            final = initial_state.float() if initial_state is not None else q.new_zeros(want, dtype=torch.float32)
        return v.new_zeros(v.shape), final
    (q, k, v, g, initial_state), widths = pad_heads(q, k, v, g, initial_state)
    o, ht, _ = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous() if g is not None else None,
                       initial_state.contiguous() if initial_state is not None else None, scale, chunk,
                       output_final_state)
    if widths is not None:
        o = o[..., :widths[1]]
        ht = ht[..., :widths[0], :widths[1]] if output_final_state else ht
    return o, (ht if output_final_state else None)


def token_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, h0: torch.Tensor | None,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function token by token in PyTorch (the kernel's tests and GPU check use it in
    float64): ``(o [B, T, H, Dv], final state [B, H, Dk, Dv])``."""
    b, t, h, dk = q.shape
    s = h0.clone() if h0 is not None else q.new_zeros(b, h, dk, v.shape[-1])
    out = []
    for i in range(t):
        if g is not None:  # [B, H] per head, [B, H, Dk] per key channel (the state's rows)
            s = s * (torch.exp(g[:, i])[:, :, None, None] if g.dim() == 3 else torch.exp(g[:, i])[..., None])
        s = s + k[:, i, :, :, None] * v[:, i, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, i], s))
    return torch.stack(out, 1), s
