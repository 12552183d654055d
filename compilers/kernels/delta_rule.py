"""The chunked (gated) delta rule as a differentiable custom op over Triton kernels.

``chunk_delta_rule(q, k, v, beta, g, initial_state, output_final_state, scale, chunk)`` computes,
token by token (``α_t = exp(g_t)``, or 1 without ``g``; the state ``h [Dk, Dv]``)::

    h_t = α_t h_{t−1} + β_t k_t (v_t − α_t h_{t−1}ᵀ k_t)ᵀ,    o_t = scale · h_tᵀ q_t

in the chunkwise WY / UT form (see ``_delta_rule_triton``), forward and backward in Triton, with
fp32 accumulation and an fp32 state. With ``g [B, T, H, Dk]``, one log decay per key channel
(Kimi Delta Attention's), the decay multiplies the state's key rows,
``h_t = diag(α_t) h_{t−1} + β_t k_t (v_t − (diag(α_t) h_{t−1})ᵀ k_t)ᵀ``, in the kernels of
``_delta_rule_channel_triton``. Both assume ``g ≤ 0`` (α ≤ 1: a decay): a growing state would
overflow the chunk's exponentials. It is registered as the custom ops
``nlgraph::chunk_delta_rule_fwd`` / ``nlgraph::chunk_delta_rule_bwd`` (with a fake implementation and
autograd), so ``torch.compile(fullgraph=True)`` traces through it without a graph break.

nlgraph's ``delta_rule`` level (``compilers/delta_rule.py``) is the same rule with ``memory = hᵀ``
(``[B, H, Dv, Dk]``), ``decay = α = exp(g)`` and ``scale = 1``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from nlgraph.errors import NLGraphError

from ._load import (CHANNEL_BACKWARD_WARPS, cdiv as _cdiv, kernel_chunk, pad_heads, pow2 as _pow2, products,
                    run_precompiled, switch)
from .linear_attention import _chunk_cumsum, _per_channel
from .linear_attention import _kernels as _la_kernels

__all__ = ["chunk_delta_rule"]

_OP = "chunk_delta_rule"


def _triton():
    try:
        from . import _delta_rule_triton
    except ImportError as e:  # pragma: no cover - exercised only without triton
        raise NLGraphError(f"the Triton delta-rule kernels need the 'triton' package ({e}); install "
                           "triton (it ships with torch's CUDA builds) or use the 'chunked' form",
                           path=_OP) from e
    return _delta_rule_triton


def _kernels(q: torch.Tensor, channel: bool = False):
    """The per-head kernels, or with ``channel`` those of a decay per key channel."""
    from ._load import load_kernels

    def importer():
        # each a literal ``from . import``: a traced caller reaches here too (Dynamo does not trace
        # importlib)
        if channel:
            from . import _delta_rule_channel_triton as mod
        else:
            from . import _delta_rule_triton as mod
        return mod

    return load_kernels(importer, q, _OP, "delta-rule")


def _plan(q: torch.Tensor, v: torch.Tensor, chunk: int, channel: bool = False) -> dict:
    """The launch constants; ``channel``: the per-key-channel kernels (Kimi Delta Attention), whose
    float32 products stay exact unless ``NLGRAPH_FP32_PRODUCTS`` says otherwise (the per-head ones
    passed their GPU check with three TF32 products; ``_load.products``, which keeps keys wider than
    128 exact)."""
    b, t, h, dk = q.shape
    prec = products(q.dtype, unset="ieee" if channel else "tf32x3", key=dk)
    dv = v.shape[-1]
    kp, vp = _pow2(dk), _pow2(dv)
    return dict(B=b, T=t, H=h, K=dk, V=dv, C=chunk, NT=-(-t // chunk), KP=kp, BK=min(kp, 64),
                BV=min(vp, 64), interpret=_triton().INTERPRETED,
                PREC=prec,
                # bf16 inputs: the inverse is rounded to bf16 before use, so tf32 products suffice
                SPREC=prec)


def _state_launch(p: dict):
    """Grid and block arguments of the two chunk recurrences: on the GPU the autotuner picks the V
    block (the grid follows it); the interpreter gets a fixed one."""
    bh = p["B"] * p["H"]
    if p["interpret"]:
        return (_cdiv(p["V"], p["BV"]), bh), {"BV": p["BV"]}
    return (lambda meta: (_cdiv(p["V"], meta["BV"]), bh)), {}


def _wu(kn, p, k, v, beta, g, bcum, tm, solve: bool, bval=None):
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    use_g = g is not None
    dummy = k.new_empty(0)
    kn.prepare[(p["NT"], p["B"] * p["H"])](
        k, v, beta, bval if bval is not None else dummy, g if use_g else dummy, bcum if use_g else dummy, tm, w, u,
        p["T"], H=p["H"], K=p["K"], V=p["V"], C=p["C"], BK=p["BK"], BV=p["BV"], USE_G=use_g, SOLVE=solve,
        PREC=p["PREC"], SPREC=p["SPREC"], NB=p["C"] // 16, VB=bval is not None)
    return w, u


def _states(kn, p, k, w, u, bcum, h0, store_ht: bool, gk: bool = False):
    b, t, h, nt = p["B"], p["T"], p["H"], p["NT"]
    hs = k.new_empty(b, nt, h, p["K"], p["V"])
    vn = torch.empty_like(u)
    ht = k.new_empty(b, h, p["K"], p["V"], dtype=torch.float32) if store_ht else k.new_empty(0)
    grid, blocks = _state_launch(p)
    kn.state_fwd[grid](
        k, w, u, bcum if bcum is not None else k.new_empty(0), h0 if h0 is not None else k.new_empty(0), hs, vn,
        ht, t, nt, H=h, K=p["K"], V=p["V"], C=p["C"], BK=p["KP"], USE_G=bcum is not None,
        USE_H0=h0 is not None, STORE_HT=store_ht, PREC=p["PREC"], GK=gk, **blocks)
    return hs, vn, ht


def _wu_channel(kc, p, k, v, beta, bcum, tm, solve: bool):
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    kc.prepare[(p["NT"], p["B"] * p["H"])](
        k, v, beta, bcum, tm, w, u, p["T"], H=p["H"], K=p["K"], V=p["V"], C=p["C"], BK=p["KP"], BV=p["BV"],
        SOLVE=solve, PREC=p["PREC"], SPREC=p["SPREC"], NB=p["C"] // 16)
    return w, u


def _forward_channel(q, k, v, beta, g, h0, scale, chunk, output_final_state):
    """The forward with a decay per key channel (``g [B, T, H, Dk]``): T is kept in float32."""
    kn, kc = _kernels(q), _kernels(q, channel=True)
    p = _plan(q, v, chunk, channel=True)
    b, t, h = p["B"], p["T"], p["H"]
    tm = q.new_empty(b, t, h, 2 * chunk, dtype=torch.float32)  # T, then the queries' scores P
    bcum = _chunk_cumsum(g, chunk)
    w, u = _wu_channel(kc, p, k, v, beta, bcum, tm, solve=True)
    hs, vn, ht = _states(kn, p, k, w, u, bcum, h0, output_final_state, gk=True)
    o = torch.empty_like(v)
    _la_kernels(q).output_channel[(p["NT"], b * h)](
        q, k, vn, bcum, hs, tm, o, scale, t, p["NT"], H=h, K=p["K"], V=p["V"], C=chunk, BK=p["KP"], BV=p["BV"],
        PREC=p["PREC"], STORE_P=True)
    return o, ht, tm, bcum


def _backward_channel(q, k, v, beta, g, h0, tm, bcum, do, dht, scale, chunk):
    kn, kc = _kernels(q), _kernels(q, channel=True)
    p = _plan(q, v, chunk, channel=True)
    b, t, h, nt = p["B"], p["T"], p["H"], p["NT"]
    dummy = q.new_empty(0)
    w, u = _wu_channel(kc, p, k, v, beta, bcum, tm, solve=False)
    hs, vn, _ = _states(kn, p, k, w, u, bcum, h0, False, gk=True)
    del u
    do = do.contiguous()
    dvl = torch.empty_like(v)
    # the backward's own kernels on 8 warps (timed together, not apart; _load.CHANNEL_BACKWARD_WARPS)
    kc.dv_local[(nt, b * h)](  # a program a chunk, for every value block
        tm, do, dvl, scale, t, H=h, V=p["V"], C=chunk, BV=p["BV"], PREC=p["PREC"], num_warps=CHANNEL_BACKWARD_WARPS)
    dhs = torch.empty_like(hs)
    dvn = torch.empty_like(v)
    dh0 = q.new_empty(b, h, p["K"], p["V"], dtype=torch.float32) if h0 is not None else dummy
    use_dht = dht is not None
    grid, blocks = _state_launch(p)
    kn.state_bwd[grid](
        q, k, w, bcum, do, dvl, dht.contiguous() if use_dht else dummy, dhs, dvn, dh0, scale, t, nt, H=h, K=p["K"],
        V=p["V"], C=chunk, BK=p["KP"], USE_G=True, USE_DHT=use_dht, STORE_DH0=h0 is not None, PREC=p["PREC"],
        GK=True, SPLIT=_state_bwd_split(p), **blocks)
    del dvl, w
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    db = torch.empty_like(bcum)
    kc.grads[(nt, b * h)](
        q, k, v, beta, bcum, tm, hs, dhs, vn, dvn, do, dq, dk, dv, dbeta, db, scale, t, nt, H=h, K=p["K"], V=p["V"],
        C=chunk, BK=p["KP"], BV=p["BV"], PREC=p["PREC"], num_warps=CHANNEL_BACKWARD_WARPS)
    dg = _chunk_cumsum(db, chunk, reverse=True).to(g.dtype)
    return dq, dk, dv, dbeta, dg, dh0.to(h0.dtype) if h0 is not None else q.new_empty(0)


def _forward(q, k, v, beta, g, h0, scale, chunk, output_final_state, bval=None):
    if _per_channel(g):  # never with bval: chunk_delta_rule refuses the pair
        return _forward_channel(q, k, v, beta, g, h0, scale, chunk, output_final_state)
    kn = _kernels(q)
    p = _plan(q, v, chunk)
    b, t, h = p["B"], p["T"], p["H"]
    tm = q.new_empty(b, t, h, chunk)
    bcum = q.new_empty(b, t, h, dtype=torch.float32) if g is not None else None
    w, u = _wu(kn, p, k, v, beta, g, bcum, tm, solve=True, bval=bval)
    hs, vn, ht = _states(kn, p, k, w, u, bcum, h0, output_final_state)
    o = torch.empty_like(v)
    kn.output[(_cdiv(p["V"], p["BV"]), p["NT"], b * h)](
        q, k, vn, hs, bcum if bcum is not None else q.new_empty(0), o, scale, t, p["NT"], H=h, K=p["K"], V=p["V"],
        C=chunk, BK=p["BK"], BV=p["BV"], USE_G=bcum is not None, PREC=p["PREC"])
    return o, ht, tm, bcum if bcum is not None else q.new_empty(0)


def _wy_lowp(dtype: torch.dtype) -> int:
    """How much of ``_wy_bwd`` multiplies in the 16-bit input dtype (see the kernel): read from
    ``NLGRAPH_WY_LOWP`` (0, 1, 2; default 2) at each call, so one process can time the variants;
    float32 inputs always get 0. Level 2 is the default because it timed fastest on the H200 in two
    runs (forward + backward 2.50 and 2.17 ms against 3.06 and 2.88 for 0, bf16, B=4, T=4096, H=16,
    D=128; docs/benchmarks.md), within the same error limits."""
    if dtype == torch.float32:
        return 0
    level = os.environ.get("NLGRAPH_WY_LOWP", "2")
    if level not in ("0", "1", "2"):
        raise ValueError(f"NLGRAPH_WY_LOWP must be 0, 1 or 2, got {level!r}")
    return int(level)


def _state_bwd_split(p: dict) -> bool:
    """Whether ``_state_bwd`` holds a 128-row key tile as two 64-row accumulators, as fla's
    ``blockdim64`` recurrence does (``NLGRAPH_STATE_BWD_SPLIT``, read at each call so one process can
    time both; off by default). At B=16, T=4096, 16 heads of 128 on an H100 nlgraph's one-tile
    ``_state_bwd`` took 1.189 ms against fla's 0.764 (docs/benchmarks.md, "Levels over T at fixed
    tokens"); the split is checked in Triton's interpreter and on an H200, where at B=4 it was no
    faster than the one tile (2.790 against 2.667 ms f+b; "Issue 10's targets on the H200"); its B=16
    timing beside fla is still to run."""
    return p["KP"] == 128 and bool(switch("NLGRAPH_STATE_BWD_SPLIT", False))


def _backward(q, k, v, beta, g, h0, tm, bcum, do, dht, scale, chunk, bval=None):
    """``(dq, dk, dv, dbeta, dg or empty, dh0 or empty, dbval or empty)``."""
    if _per_channel(g):  # never with bval: chunk_delta_rule refuses the pair
        return (*_backward_channel(q, k, v, beta, g, h0, tm, bcum, do, dht, scale, chunk), q.new_empty(0))
    kn = _kernels(q)
    p = _plan(q, v, chunk)
    b, t, h, nt = p["B"], p["T"], p["H"], p["NT"]
    use_g = g is not None
    bc = bcum if use_g else None
    dummy = q.new_empty(0)
    w, u = _wu(kn, p, k, v, beta, g, bc, tm, solve=False, bval=bval)
    hs, vn, _ = _states(kn, p, k, w, u, bc, h0, False)
    del u  # intermediates are dropped as soon as they are used up, to keep the peak down
    do = do.contiguous()
    dvl = torch.empty_like(v)
    kn.dv_local[(_cdiv(p["V"], p["BV"]), nt, b * h)](
        q, k, do, bcum if use_g else dummy, dvl, scale, t, H=h, K=p["K"], V=p["V"], C=chunk, BK=p["BK"],
        BV=p["BV"], USE_G=use_g, PREC=p["PREC"])
    dhs = torch.empty_like(hs)
    dvn = torch.empty_like(v)
    dh0 = q.new_empty(b, h, p["K"], p["V"], dtype=torch.float32) if h0 is not None else dummy
    use_dht = dht is not None
    grid, blocks = _state_launch(p)
    kn.state_bwd[grid](
        q, k, w, bcum if use_g else dummy, do, dvl, dht.contiguous() if use_dht else dummy, dhs, dvn, dh0, scale,
        t, nt, H=h, K=p["K"], V=p["V"], C=chunk, BK=p["KP"], USE_G=use_g, USE_DHT=use_dht,
        STORE_DH0=h0 is not None, PREC=p["PREC"], SPLIT=_state_bwd_split(p), **blocks)
    del dvl
    # K in blocks of 64: with one block of 128 the three [C, 128] fp32 accumulators spill heavily
    # (benchmarks/kernels.py --resources). fla's analogous kernel was miscompiled on Hopper at BK = 64
    # (fla issue 640), through tl.trans of a product feeding a dot, a pattern this kernel avoids.
    bk = p["BK"]
    nk = _cdiv(p["K"], bk)
    dq = torch.empty_like(q)
    dkp = q.new_empty(q.shape, dtype=torch.float32)
    lowp = _wy_lowp(q.dtype)
    dw = q.new_empty(q.shape, dtype=q.dtype if lowp else torch.float32)
    db = q.new_empty(nk, b, t, h, dtype=torch.float32) if use_g else dummy
    kn.qkw_bwd[(nk, nt, b * h)](
        q, k, vn, dvn, do, hs, dhs, bcum if use_g else dummy, dq, dkp, dw, db, scale, t, nt, b, H=h, K=p["K"],
        V=p["V"], C=chunk, BK=bk, BV=p["BV"], USE_G=use_g, PREC=p["PREC"])
    del hs, dhs, vn
    if use_g:
        db = db.sum(0)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dbval = torch.empty_like(bval) if bval is not None else q.new_empty(0)  # an output: not the shared dummy
    dg = torch.empty_like(g) if use_g else q.new_empty(0)
    kn.wy_bwd[(nt, b * h)](
        k, v, beta, bval if bval is not None else dummy, bcum if use_g else dummy, tm, dw, dvn, dkp, db, dk, dv,
        dbeta, dbval, dg, t, H=h, K=p["K"], V=p["V"], C=chunk, BK=p["BK"], BV=p["BV"], USE_G=use_g, PREC=p["PREC"],
        LOWP=lowp, VB=bval is not None)
    return dq, dk, dv, dbeta, dg, dh0.to(h0.dtype) if h0 is not None else q.new_empty(0), dbval


@torch.library.custom_op("nlgraph::chunk_delta_rule_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: Optional[torch.Tensor],
            h0: Optional[torch.Tensor], scale: float, chunk: int, output_final_state: bool,
            bval: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(o [B, T, H, Dv], final state [B, H, Dk, Dv] fp32 or empty, T [B, T, H, C],
    cumulative log decay (g's shape) fp32 or empty)``; the last two are saved for the backward. With
    ``g`` per key channel the third is ``[B, T, H, 2C]`` float32: T, then the queries' scores P.
    ``bval``: the values' own write strength ``[B, T, H]`` (``chunk_delta_rule``'s ``value_beta``)."""
    return run_precompiled(_OP, "fwd", _forward, (q, k, v, beta, g, h0, scale, chunk, output_final_state, bval),
                           q.device)


@_fwd_op.register_fake
def _(q, k, v, beta, g, h0, scale, chunk, output_final_state, bval=None):
    b, t, h, dk = q.shape
    ht = q.new_empty(b, h, dk, v.shape[-1], dtype=torch.float32) if output_final_state else q.new_empty(0)
    bcum = g.new_empty(g.shape, dtype=torch.float32) if g is not None else q.new_empty(0)
    tm = (q.new_empty(b, t, h, 2 * chunk, dtype=torch.float32) if _per_channel(g)  # T and P
          else q.new_empty(b, t, h, chunk))
    return torch.empty_like(v), ht, tm, bcum


@torch.library.custom_op("nlgraph::chunk_delta_rule_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: Optional[torch.Tensor],
            h0: Optional[torch.Tensor], tm: torch.Tensor, bcum: torch.Tensor, do: torch.Tensor,
            dht: Optional[torch.Tensor], scale: float, chunk: int, bval: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    """Returns ``(dq, dk, dv, dbeta, dg or empty, dh0 or empty, dbval or empty)``."""
    return run_precompiled(_OP, "bwd", _backward, (q, k, v, beta, g, h0, tm, bcum, do, dht, scale, chunk, bval),
                           q.device)


@_bwd_op.register_fake
def _(q, k, v, beta, g, h0, tm, bcum, do, dht, scale, chunk, bval=None):
    e = q.new_empty(0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta),
            torch.empty_like(g) if g is not None else e, torch.empty_like(h0) if h0 is not None else e,
            torch.empty_like(bval) if bval is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, beta, g, h0, scale, chunk, _, bval = inputs
    _, _, tm, bcum = output
    ctx.save_for_backward(q, k, v, beta, g, h0, tm, bcum, bval)
    ctx.scale, ctx.chunk = scale, chunk


def _autograd_backward(ctx, do, dht, _dtm, _dbcum):
    q, k, v, beta, g, h0, tm, bcum, bval = ctx.saved_tensors
    if dht is not None and dht.numel() == 0:
        dht = None
    dq, dk, dv, dbeta, dg, dh0, dbval = _bwd_op(q, k, v, beta, g, h0, tm, bcum, do, dht, ctx.scale, ctx.chunk, bval)
    return (dq, dk, dv, dbeta, dg if g is not None else None, dh0 if h0 is not None else None,
            None, None, None, dbval if bval is not None else None)


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check(q, k, v, beta, g, initial_state, chunk, value_beta=None) -> None:
    def bad(arg: str, what: str) -> NLGraphError:
        return NLGraphError(what, path=f"{_OP}.{arg}")

    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise bad(name, "expected a [B, T, H, D] tensor; pass queries, keys and values token-major")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise bad(name, f"dtype {x.dtype} is not supported; pass float32, bfloat16 or float16")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or k.dtype != q.dtype or v.dtype != q.dtype:
        raise bad("k", f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree on "
                       "[B, T, H] (q and k also on Dk) and share one dtype")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        raise bad("q", f"head dims Dk={q.shape[-1]}, Dv={v.shape[-1]} exceed 256; split the heads")
    if not isinstance(beta, torch.Tensor) or tuple(beta.shape) != tuple(q.shape[:3]):
        raise bad("beta", f"expected a [B, T, H] = {tuple(q.shape[:3])} tensor")
    if g is not None and (not isinstance(g, torch.Tensor) or tuple(g.shape) not in (tuple(q.shape[:3]), tuple(q.shape))):
        raise bad("g", f"expected a [B, T, H] = {tuple(q.shape[:3])} tensor (a decay per head) or a "
                       f"[B, T, H, Dk] = {tuple(q.shape)} one (per key channel)")
    if initial_state is not None and tuple(initial_state.shape) != (q.shape[0], q.shape[2], q.shape[3], v.shape[3]):
        raise bad("initial_state", f"expected [B, H, Dk, Dv] = {(q.shape[0], q.shape[2], q.shape[3], v.shape[3])}, "
                                   f"got {tuple(initial_state.shape)}")
    if chunk not in (16, 32, 64):
        raise bad("chunk", f"chunk {chunk} must be 16, 32 or 64")
    if value_beta is not None:
        if (not isinstance(value_beta, torch.Tensor) or tuple(value_beta.shape) != tuple(q.shape[:3])
                or not value_beta.is_floating_point()):
            raise bad("value_beta", f"expected a floating-point [B, T, H] = {tuple(q.shape[:3])} tensor")
        if g is not None and g.dim() == 4:
            raise bad("value_beta", "a write strength of the values' own is not supported with a decay per key "
                                    "channel; scale the values instead")
    devices = {x.device for x in (q, k, v, beta, g, initial_state, value_beta) if x is not None}
    if len(devices) != 1:
        raise bad("q", f"inputs are on several devices {sorted(map(str, devices))}; move them to one")


def chunk_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                     g: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, scale: float | None = None, chunk: int = 64,
                     value_beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (gated) delta rule, chunked, in Triton (CUDA tensors compiled; CPU tensors interpreted).

    Args:
        q, k: ``[B, T, H, Dk]`` queries and keys (float32 / bfloat16 / float16; keys are used as
            given: normalise them first if the model wants unit keys).
        v: ``[B, T, H, Dv]`` values, same dtype.
        beta: ``[B, T, H]`` write strengths β.
        g: ``[B, T, H]`` log decays (``α = exp(g)``, applied before the write), ``[B, T, H, Dk]`` for a
            decay per key channel (Kimi Delta Attention's: ``h_t = diag(α_t) h_{t−1} + …``), or
            ``None`` for the plain delta rule.
        initial_state: ``[B, H, Dk, Dv]`` starting state ``h`` (fp32 recommended), or ``None`` (zeros).
        output_final_state: also return the state after the last token, ``[B, H, Dk, Dv]`` fp32.
        scale: output scale; ``None`` means ``Dk ** -0.5`` (fla's default; nlgraph's levels use 1).
        chunk: tokens per chunk (16, 32 or 64; 32 with ``g`` per key channel, see
            ``_load.CHANNEL_CHUNK``); results do not depend on it beyond rounding.
        value_beta: ``[B, T, H]``, the values' own write strength ``β_v``: the rule becomes
            ``h_t = h_{t−1} + k_t (β_v,t v_t − β_t k_tᵀ h_{t−1})ᵀ`` (after the decay), the same as
            values ``β_v v / β`` without forming them (Titans' order: ``β = b / α``, ``β_v = b``).
            ``None``: ``β_v = β``. Not with ``g`` per key channel.

    Returns:
        ``(o [B, T, H, Dv] in v's dtype, final state or None)``.
    """
    _check(q, k, v, beta, g, initial_state, chunk, value_beta)
    chunk = kernel_chunk(g, chunk)
    _kernels(q)  # a missing triton or a CPU tensor without the interpreter fails here, in one line
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not math.isfinite(scale):
        raise NLGraphError(f"scale {scale} is not finite", path=f"{_OP}.scale")
    if q.shape[1] == 0:
        b, _, h, dk = q.shape
        final = None
        if output_final_state:
            final = initial_state.float() if initial_state is not None else q.new_zeros(
                b, h, dk, v.shape[-1], dtype=torch.float32)
        return v.new_zeros(v.shape), final
    (q, k, v, g, initial_state), widths = pad_heads(q, k, v, g, initial_state)
    o, ht, _, _ = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(),
                          g.contiguous() if g is not None else None,
                          initial_state.contiguous() if initial_state is not None else None, scale, chunk,
                          output_final_state, value_beta.contiguous() if value_beta is not None else None)
    if widths is not None:
        o = o[..., :widths[1]]
        ht = ht[..., :widths[0], :widths[1]] if output_final_state else ht
    return o, (ht if output_final_state else None)


def token_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
               h0: torch.Tensor | None, scale: float, value_beta: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function token by token in PyTorch (the kernels' tests and GPU checks use it in
    float64), with ``g`` per head ``[B, T, H]`` or per key channel ``[B, T, H, Dk]``, and the
    values' own write strength ``value_beta``: ``(o [B, T, H, Dv], final state [B, H, Dk, Dv])``."""
    b, t, h, dk = q.shape
    s = h0.clone() if h0 is not None else q.new_zeros(b, h, dk, v.shape[-1])
    out = []
    for i in range(t):
        if g is not None:  # the decay before the write: on the whole state, or on its key rows
            s = s * (torch.exp(g[:, i])[:, :, None, None] if g.dim() == 3 else torch.exp(g[:, i])[..., None])
        read = torch.einsum("bhk,bhkv->bhv", k[:, i], s)
        if value_beta is None:
            write = beta[:, i, :, None] * (v[:, i] - read)
        else:
            write = value_beta[:, i, :, None] * v[:, i] - beta[:, i, :, None] * read
        s = s + k[:, i, :, :, None] * write[:, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, i], s))
    return torch.stack(out, 1), s
