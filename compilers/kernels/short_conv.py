"""The causal depthwise short convolution of keys, queries and values as a differentiable custom op.

``short_conv(x [B, T, C], weight [C, K], state [B, K−1, C] | None, act, l2)`` returns
``act(a)`` with ``a[t, c] = Σ_j weight[c, j] · x̃[t + j, c]`` over ``x̃ = cat(state or zeros, x)``
(``act``: ``identity`` or ``silu``), each head of ``l2`` channels L2-normalised when ``l2`` is given:
the same function as :class:`nlgraph.layers.ShortConv` followed by the stream's feature map and
``norm: l2``. PyTorch's depthwise ``conv1d`` wants ``[B, C, T]``, so the layer's two
transposes were strided copies, and its depthwise kernel ran at a tenth of the memory bandwidth
(docs/benchmarks.md, "Where Gated DeltaNet's step went"); this op reads the token-major input as it
is, in one pass forward and two backward, with the activation (and the norm) fused. Registered as
``nlgraph::short_conv_fwd`` / ``nlgraph::short_conv_bwd`` (fake implementations and autograd), so
``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from nlgraph.errors import NLGraphError

from ._load import recording, run_precompiled

__all__ = ["ACTIVATIONS", "normalize_heads", "short_conv"]

ACTIVATIONS = ("identity", "silu")


#: The kernels' token × channel tile unless ``NLGRAPH_CONV_TILE`` says otherwise. 64 x 128 since it
#: timed fastest of eight tiles that all passed their checks on an H100 (forward 15.2 and backward
#: 87.9 µs a call at B=8, T=2048, 512 channels, bf16, against 19.4 and 94.6 for 64 x 64; Gated
#: DeltaNet's layer forward 0.432 against 0.444 ms of GPU time, fla's 0.554; docs/benchmarks.md).
#: Compiled for sm_90, its bf16 ``_conv_da`` spilled 152 bytes a thread (``benchmarks/
#: kernel_resources.py --cases short_conv``; 128 since ``da`` is stored in 16 bits, 112 with the L2
#: norm); timed with that, it was still the fastest backward.
DEFAULT_TILE = (64, 128)


def _tile(text: str | None) -> tuple[int, int] | str:
    """The kernels' token × channel tile from ``NLGRAPH_CONV_TILE`` (``TOKENSxCHANNELS``, default
    :data:`DEFAULT_TILE`): a pair, or the error message a call then raises (an import does not)."""
    if text is None or not text.strip():
        return DEFAULT_TILE
    try:
        bt, bc = (int(v) for v in text.lower().split("x"))
    except ValueError:
        bt = bc = 0
    if bt < 16 or bc < 16 or bt > 512 or bc > 512 or bt & (bt - 1) or bc & (bc - 1) or bt * bc > 32768:
        return (f"NLGRAPH_CONV_TILE={text!r} is not a tile: give TOKENSxCHANNELS, two powers of two from 16 "
                "to 512 with at most 32768 elements (e.g. 64x128, the default), or unset it")
    return bt, bc


# read once, at import: a process runs one tile (benchmarks/short_conv_kernel.py's `tile()` swaps it to measure)
_TILE = _tile(os.environ.get("NLGRAPH_CONV_TILE"))
_BT, _BC = _TILE if isinstance(_TILE, tuple) else DEFAULT_TILE

#: the backward stores ``da`` in the 16-bit input dtype (True) or in float32 (False, as before
#: 2026-12-07); a module switch so ``benchmarks/short_conv_kernel.py --da`` can check and time both
_DA16 = True

#: how the backward sums the weight's gradient over its programs: ``atomic`` (the default), each
#: program adds its sums into a zeroed float32 ``[C, K]`` (no reduction launch, but the order of
#: the additions, so the last bits, varies from run to run: under
#: ``torch.use_deterministic_algorithms(True)`` it takes ``rows``); ``rows``, partial sums laid out
#: ``[programs, C·K]`` and summed across rows by ATen (the default until 2026-12-07); ``inner``,
#: laid out ``[C·K, programs]`` and summed along contiguous rows. On an H100 (bf16, B=8, T=2048, 512
#: channels) the backward op took 0.0608 ms atomic, 0.0671 inner, 0.0742 rows, and DeltaNet's layer
#: f+b 1.128 / 1.153 / 1.167 ms (docs/benchmarks.md). ``NLGRAPH_CONV_DW`` sets it, read once a
#: process (an unknown value is an error at the first backward)
DW_LAYOUTS = ("rows", "inner", "atomic")
_DW = (os.environ.get("NLGRAPH_CONV_DW") or "atomic").strip()


def _kernels(x: torch.Tensor):
    try:
        from . import _short_conv_triton as mod
    except ImportError as e:  # pragma: no cover - exercised only without triton
        raise NLGraphError(f"the short-convolution kernel needs the 'triton' package ({e})", path="short_conv") from e
    if not x.is_cuda and not mod.INTERPRETED:
        raise NLGraphError(f"the Triton kernels need CUDA tensors, got {x.device}", path="short_conv.x")
    return recording(mod.kernels())


def _grid(b: int, t: int, c: int) -> tuple[int, int, int]:
    """(token blocks, channel blocks, batch)."""
    return (-(-t // _BT), -(-c // _BC), b)


@torch.library.custom_op("nlgraph::short_conv_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, w: torch.Tensor, s: Optional[torch.Tensor], silu: bool, l2: int) -> torch.Tensor:
    args = (x, w, s, silu, l2)
    return run_precompiled("short_conv", "fwd", _forward, args, x.device)


def _forward(x, w, s, silu, l2):
    b, t, c = x.shape
    y = torch.empty_like(x)
    _kernels(x).fwd[_grid(b, t, c)](x, w, s if s is not None else x.new_empty(0), y, t, c, K=w.shape[1], BT=_BT,
                                    BC=_BC, SILU=silu, USE_S=s is not None, L2=l2)
    return y


@_fwd_op.register_fake
def _(x, w, s, silu, l2):
    return torch.empty_like(x)


@torch.library.custom_op("nlgraph::short_conv_bwd", mutates_args=())
def _bwd_op(x: torch.Tensor, w: torch.Tensor, s: Optional[torch.Tensor], dy: torch.Tensor, silu: bool, l2: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx [B, T, C], dw [C, K] fp32, ds [B, K−1, C] or empty)``."""
    args = (x, w, s, dy, silu, l2)
    return run_precompiled("short_conv", "bwd", _backward, args, x.device)


def _backward(x, w, s, dy, silu, l2):
    b, t, c = x.shape
    k = w.shape[1]
    if _DW not in DW_LAYOUTS:
        raise NLGraphError(f"NLGRAPH_CONV_DW={_DW!r}: give one of {', '.join(DW_LAYOUTS)} (atomic, the default), "
                           "or unset it", path="NLGRAPH_CONV_DW")
    kn = _kernels(x)
    grid = _grid(b, t, c)
    # da in the 16-bit input dtype: written and read back once (at B=8, T=2048, 512 channels 16.8 MB
    # each way a convolution instead of 33.5 in float32); dw's partial sums use it in float32 first
    da = x.new_empty(b, t, c, dtype=x.dtype if _DA16 and x.dtype in (torch.bfloat16, torch.float16) else torch.float32)
    parts = b * grid[0]
    layout = "rows" if _DW == "atomic" and torch.are_deterministic_algorithms_enabled() else _DW
    atomic = layout == "atomic"
    inner = layout == "inner"
    # the weight's partial sums, one set a program ([C·K, programs] inner: each (channel, tap) sums
    # along contiguous memory; [programs, C·K] rows), or one zeroed set every program adds into
    dwp = (torch.zeros(c * k, dtype=torch.float32, device=x.device) if atomic
           else x.new_empty((c * k, parts) if inner else (parts, c * k), dtype=torch.float32))
    dummy = x.new_empty(0)
    sp, sc = (0, 1) if atomic else (dwp.stride(1 if inner else 0), dwp.stride(0 if inner else 1))
    kn.da[grid](x, w, s if s is not None else dummy, dy.contiguous(), da, dwp, sp, sc, t, c, grid[0], K=k,
                BT=_BT, BC=_BC, SILU=silu, USE_S=s is not None, L2=l2, ATOMIC=atomic)
    dx = torch.empty_like(x)
    kn.dx[grid](da, w, dx, t, c, K=k, BT=_BT, BC=_BC)
    ds = dummy
    if s is not None:
        # the state's rows are x̃[0 .. K−2]: ds[i] = Σ_{j ≤ i} w[:, j] · da[i − j] (at most K−1 terms)
        wf = w.float()
        ds = torch.zeros(b, k - 1, c, dtype=torch.float32, device=x.device)
        for i in range(k - 1):
            for j in range(i + 1):
                if i - j < t:
                    ds[:, i] += wf[:, j] * da[:, i - j]
        ds = ds.to(s.dtype)
    dw = dwp if atomic else dwp.sum(1 if inner else 0)
    return dx, dw.view(c, k).to(w.dtype), ds


@_bwd_op.register_fake
def _(x, w, s, dy, silu, l2):
    return torch.empty_like(x), torch.empty_like(w), (torch.empty_like(s) if s is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w, s, silu, l2 = inputs
    ctx.save_for_backward(x, w, s)
    ctx.silu, ctx.l2 = silu, l2


def _autograd_backward(ctx, dy):
    x, w, s = ctx.saved_tensors
    dx, dw, ds = _bwd_op(x, w, s, dy, ctx.silu, ctx.l2)
    return dx, dw, (ds if s is not None else None), None, None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def short_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None,
               act: str = "identity", l2: int | None = None) -> torch.Tensor:
    """Causal depthwise convolution with a fused activation (and per-head L2 norm), in Triton.

    Args:
        x: ``[B, T, C]`` inputs (float32 / bfloat16 / float16), token-major.
        weight: ``[C, K]`` taps (``weight[:, -1]`` multiplies the current token); float32 is kept.
        state: ``[B, K−1, C]`` the inputs before ``x`` (``None``: zeros), in ``x``'s dtype.
        act: ``identity`` or ``silu``, applied to the convolution's output.
        l2: ``D``, to divide each head's ``D`` channels (``C = H·D``) of the activated output by
            their norm, as ``F.normalize(y, dim=-1, eps=1e-6)`` on ``[B, T, H, D]`` does: in the
            kernels when ``D`` is a power of two dividing the tile's channel block (up to 128 at
            the default tile), after them in PyTorch otherwise.

    Returns:
        ``[B, T, C]`` in ``x``'s dtype (float32 accumulation).
    """
    if isinstance(_TILE, str):
        raise NLGraphError(_TILE, path="NLGRAPH_CONV_TILE")
    if act not in ACTIVATIONS:
        raise NLGraphError(f"activation {act!r} is not fused; use one of {', '.join(ACTIVATIONS)}", path="short_conv.act")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise NLGraphError(f"expected x [B, T, C] and weight [C, K], got {tuple(x.shape)} and {tuple(weight.shape)}",
                           path="short_conv")
    k = weight.shape[1]
    if state is not None and tuple(state.shape) != (x.shape[0], k - 1, x.shape[2]):
        raise NLGraphError(f"state: expected [B, K-1, C] = {(x.shape[0], k - 1, x.shape[2])}, got {tuple(state.shape)}",
                           path="short_conv.state")
    c = x.shape[2]
    if l2 is not None and (l2 < 1 or c % l2):
        raise NLGraphError(f"l2: the head size {l2} does not divide the {c} channels", path="short_conv.l2")
    fused = l2 is not None and (l2 & (l2 - 1)) == 0 and _BC % l2 == 0
    s = state.to(x.dtype).contiguous() if state is not None else None
    y = _fwd_op(x.contiguous(), weight.contiguous(), s, act == "silu", l2 if fused else 0)
    return normalize_heads(y, l2) if l2 is not None and not fused else y


def normalize_heads(y: torch.Tensor, d: int) -> torch.Tensor:
    """``y [..., C]`` with each head of ``d`` channels divided by its norm, ``F.normalize(eps=1e-6)``:
    what ``short_conv(..., l2=d)`` computes, in PyTorch."""
    return F.normalize(y.unflatten(-1, (y.shape[-1] // d, d)), dim=-1, eps=1e-6).flatten(-2)
