"""The chunked execution form: parallel inside a chunk, exact, for every level whose update is a
linear recurrence in its parameters.

One engine covers all of them. Per weight matrix ``W [d_out, d_in]`` (a bias is a last column fed
by a constant input 1), token ``r`` of a chunk updates

    e_r = b_r · W_{r−1} ḱ_r + f_r                      (the "written error", [d_out])
    S_r = μ_r S_{r−1} − e_r x_rᵀ,   W_r = W_{r−1} D_r + S_r      (with momentum)
    W_r = W_{r−1} D_r − e_r x_rᵀ                                  (without)

with ``x_r`` the layer input, ``D_r`` the retention (``α_r I`` or ``Diag(α_r)`` on key channels),
``ḱ_r = D_r x_r`` for ``decay`` (the erase sees the decayed state) and ``x_r`` for ``weight_decay``.
The table below puts every supported level in that form (``η'`` is DGD's step, ``η`` or
``η/(1 + η‖x‖²)``; ``δ`` the output gradient of the inner loss at the linearisation point):

====================================  ==================  ===================
level                                 ``b``               ``f``
====================================  ==================  ===================
online linear, gd / momentum, dot     0                   ``−η v``
online linear, gd / momentum, l2      ``η``               ``−η v``
online linear, dgd, dot / l2          ``η'`` / ``2η'``    ``−η' v``
mini-batch (any memory), gd / mom.    0                   ``η δ``
mini-batch (any memory), dgd          ``η'``              ``η' δ``
====================================  ==================  ===================

(``outer`` is ``dot`` with ``v = −u``.) Unrolling the recurrence over a chunk from ``(W_0, S_0)``
gives, with transfer products ``G[r, j] = Π_{l=j+1..r} D_l``, ``Y[r, j] = Π_{l=j+1..r} μ_l`` and
``Ω[r, j] = Σ_{i=j..r} G[r, i] Y[i, j]`` (``Ω = G`` without momentum), ``Z_r = Ω[r, 0] − G[r, 0]``:

    W_r = W_0 G[r, 0] + S_0 Z_r − Σ_{j≤r} e_j (x_j ⊙ Ω[r, j])ᵀ

so every ``e_r`` depends linearly on the earlier ones: ``(I + diag(b) K) E = diag(b) B + F`` with
``K`` strictly lower triangular — the WY / UT representation, solved by one triangular solve per
chunk. Reads ``W_r q_r`` (after the write) or ``W_{r−1} q_r`` (before) are the same expansion.
The products ``G`` and ``Y`` are formed by masked cumulative products (no division, so α = 0 and
μ = 0 are exact), in float32 at least whatever the working precision (see :func:`transfer`).

Retention toward the initial state (``retention: {toward: initial}``, ``W ← W_0 + α (W − W_0)``)
is the same recurrence in the deviation ``U = W − W_0``: ``U_r = U_{r−1} D_r − e_r x_rᵀ`` with
``e_r = b_r U_{r−1} ḱ_r + (f_r + b_r W_0 x_r)`` (the erase reads the whole state ``W = U + W_0``);
reads and the end state add ``W_0`` back.

Two drivers use the engine:

* **online** (linear memory, period 1, gradient point ``token``): the exact chunkwise form of
  DeltaNet, Gated DeltaNet, Titans-form / HOPE-form delta rules, linear attention, RetNet, Mamba2,
  GLA, with or without momentum; the chunk size is a free knob with no effect on results;
* **mini-batch** (gradient point ``{chunk: N}``, or period ``C`` = the gradient chunk): for any
  memory and objective, the gradients of a chunk are taken at its linearisation point in one
  batched forward / backward (local errors ``δ`` and layer inputs ``x`` of every token), then each
  layer's recurrence is solved as above and the memory is read through the per-token weights one
  layer after another — TTT's dual form (and Titans' mini-batch form) as masked matmuls.
  Self-modifying levels run here too: their adaptive projections, gates and self-targets are read
  at the linearisation point, which is what makes a chunk parallel.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from nlgraph.errors import NLGraphError
from nlgraph.levels.gates import AdaptiveGate
from nlgraph.levels.memories import Memory, gain_normalized, layer_errors
from nlgraph.levels.optimizers import newton_schulz, sqrt_second_moment
from nlgraph.levels.run import LevelRun, Stream, final_state, periods, schedule
from nlgraph.spec.schema import LevelSpec

from . import register_form

__all__ = ["ChunkRows", "ChunkSolution", "chunk_rows", "recurrence_step", "run_chunked", "solve_chunk", "transfer",
           "why_not_chunked"]

Params = dict[str, torch.Tensor]
DEFAULT_CHUNK = 64

# torch 2.13: scan's autograd calls GraphModule.compile() on its joint graph, which imports
# torch._inductor; that import pulls in torch.utils.mkldnn, whose class bodies call the deprecated
# torch.jit.script_method — a DeprecationWarning from torch's own code, once per process, raised
# inside the compile (an error under -W error / pytest's filterwarnings=error). Import that one
# module here (~20 ms) with that one warning ignored.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"`torch\.jit\.script_method` is deprecated", DeprecationWarning)
    import torch.utils.mkldnn  # noqa: F401


def transfer(f: torch.Tensor, channel: bool) -> torch.Tensor:
    """Products of factors over a chunk: ``G[..., r, j] = Π_{l=j+1..r} f_l`` for ``0 ≤ j ≤ r ≤ n``
    (index 0 is the chunk start, token l sits at index l), zero above the diagonal.

    The products are taken in float32 (float64 stays float64) and returned in ``f``'s dtype: in
    bfloat16 a product underflows to exact zeros sooner. Casting explicitly, with autocast off,
    keeps input, output and gradient of the products in one dtype.

    Args:
        f: ``[..., n]``, or ``[..., n, D]`` with ``channel``.

    Returns:
        ``[..., n+1, n+1]`` or ``[..., n+1, n+1, D]``, in ``f``'s dtype.
    """
    dtype = f.dtype
    if dtype in (torch.float16, torch.bfloat16):
        with _no_autocast(f):
            return _transfer(f.float(), channel, dtype).to(dtype)
    return _transfer(f, channel, _autocast_low(f))


def _transfer(f: torch.Tensor, channel: bool, low: torch.dtype | None = None) -> torch.Tensor:
    return _Transfer.apply(f, channel, low)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype on a device type while autocast is on there, else ``None`` (autocast's devices
    by name: a meta tensor has none to ask)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_low(x: torch.Tensor) -> torch.dtype | None:
    """Autocast's 16-bit dtype on ``x``'s device when it is on and ``x`` is float32, else ``None``:
    the dtype the products made from ``x`` are multiplied in downstream."""
    low = autocast_dtype(x.device.type) if x.dtype == torch.float32 else None
    return low if low in (torch.float16, torch.bfloat16) else None


def _no_autocast(x: torch.Tensor):
    """Autocast off for ``x``'s device type; nothing to turn off on the others (``meta``, which the
    capture-safety tests run on). Told by the name, not ``torch.amp.is_autocast_available``: that is
    a C function which torch 2.11's Dynamo refuses to trace ("marked as skipped"), so every compiled
    model whose levels build transfer products (Titans' MLP-memory kernel among them) failed to
    compile on the GPU machine, while 2.13's Dynamo traces it."""
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _lower_masks(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(strictly, lower)`` of ``[n+1, n+1]`` on ``like``'s device: ``r > j`` and ``r ≥ j``."""
    idx = torch.arange(n + 1, device=like.device)
    return idx[:, None] > idx[None, :], idx[:, None] >= idx[None, :]


class _Transfer(torch.autograd.Function):
    """:func:`transfer`'s products as one cumulative product forward and one batched matmul backward.

    Forward, column ``j`` of ``G`` is the cumulative product down the rows of the factors
    ``f_{j+1}, f_{j+2}, …`` (ones above them). Backward, with ``Ḡ`` the incoming gradient on the
    lower triangle: ``G[r, j] = G[k−1, j] · f_k · G[r, k]`` for ``j < k ≤ r``, so
    ``∂L/∂f_k = Σ_{j<k} G[k−1, j] · (Gᵀ Ḡ)[k, j]``: products only, exact when a factor is 0
    (``torch.cumprod``'s own backward asks whether one is, a host synchronisation that breaks
    CUDA-graph capture), and ``G``, made again from the saved factors, is all it needs (the doubling
    scan this replaces kept ⌈log₂(n+1)⌉ copies of the ``[n+1, n+1]`` products for its backward).
    The backward is made of differentiable operations, so a second-order meta-gradient
    differentiates through it, and ``torch.func.vmap`` takes the rule PyTorch derives from them. No
    forward mode (``torch.func.jvp``): Dynamo refuses a custom ``jvp`` inside a compiled graph, and
    nothing differentiates the products forward. ``low``: the 16-bit dtype ``G`` is used in downstream
    (it came from 16-bit factors, or autocast was on), in which the backward's matmul then
    multiplies, accumulating in float32, as autocast's backward of a matmul would: in float32 it
    ran on the GPU's CUDA cores (`hope_large_chunk`'s `[257, 257]` products are among the float32
    GEMMs that took 4.3 % of its step on an H100, docs/benchmarks.md). Otherwise the matmul follows
    PyTorch's float32 matmul precision: with TF32 allowed
    (``torch.set_float32_matmul_precision("high")``) the gates' gradients carry its rounding."""

    generate_vmap_rule = True

    @staticmethod
    def forward(f: torch.Tensor, channel: bool, low: torch.dtype | None = None) -> torch.Tensor:
        with _no_autocast(f):
            n = f.shape[-2] if channel else f.shape[-1]
            strictly, lower = _lower_masks(n, f)
            lower = lower.to(f.dtype)
            one = torch.ones((), dtype=f.dtype, device=f.device)
            if channel:
                pad = torch.cat([torch.ones_like(f[..., :1, :]), f], dim=-2)  # [..., n+1, D]
                g = torch.cumprod(torch.where(strictly[..., None], pad.unsqueeze(-2), one), -3) * lower[..., None]
            else:
                pad = torch.cat([torch.ones_like(f[..., :1]), f], dim=-1)  # [..., n+1]
                g = torch.cumprod(torch.where(strictly, pad.unsqueeze(-1), one), -2) * lower
        return g

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward, as torch.func's transforms ask
        # the factors, not G: under autocast `transfer` returns a 16-bit copy and this float32 G
        # was kept for the backward alone (32 MiB of `hope_large_chunk`'s T=2048 forward on CPU)
        ctx.channel, ctx.low = inputs[1], inputs[2]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def _front(g: torch.Tensor, channel: bool) -> torch.Tensor:
        """The channel axis in front of the token axes: ``[..., D, n+1, n+1]``."""
        return g.movedim(-1, -3) if channel else g

    @staticmethod
    def _before(g: torch.Tensor) -> torch.Tensor:
        """``G[k−1, j]`` at ``[k, j]``, 0 in row 0; it is 0 unless ``j < k``."""
        return torch.cat([torch.zeros_like(g[..., :1, :]), g[..., :-1, :]], dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (f,) = ctx.saved_tensors
        # G made again from the factors: as this function when the backward is itself differentiated
        # (second order), so G's dependence on f has this backward, not torch.cumprod's; otherwise
        # (every compiled or first-order backward) its forward's operations alone
        g = (_Transfer.apply(f, ctx.channel, ctx.low) if torch.is_grad_enabled()
             else _Transfer.forward(f, ctx.channel))
        with _no_autocast(g):
            g, grad = _Transfer._front(g, ctx.channel), _Transfer._front(grad.to(g.dtype), ctx.channel)
            # Ḡ on the lower triangle only, selected rather than multiplied: G is a constant 0 above
            # it, and an inf there would otherwise meet a 0 of G in the product
            grad = torch.where(_lower_masks(g.shape[-1] - 1, g)[1], grad, 0.0)
            if ctx.low is None:
                s = g.transpose(-1, -2) @ grad  # (Gᵀ Ḡ)[k, j]
            else:
                s = _aligned_matmul(g.transpose(-1, -2).to(ctx.low), grad.to(ctx.low)).to(g.dtype)
            # the sum over j < k comes from G[k−1, j] itself
            df = (_Transfer._before(g) * s).sum(-1)[..., 1:]  # [..., n] (or [..., D, n])
            return (df.movedim(-2, -1) if ctx.channel else df), None, None


def _cumprod(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Inclusive cumulative product along ``dim`` by ⌈log₂ n⌉ doubling steps of multiplications.

    Not ``torch.cumprod``: its backward asks whether the input holds a zero (a retention or momentum
    gate may be exactly 0), a host synchronisation that breaks CUDA-graph capture and stalls the
    stream; products of multiplications differentiate without one, zeros included."""
    n = x.shape[dim]
    step = 1
    while step < n:
        # x[r] ← x[r] · x[r − step] for r ≥ step (Hillis–Steele)
        head, tail = x.narrow(dim, 0, step), x.narrow(dim, step, n - step)
        x = torch.cat([head, tail * x.narrow(dim, 0, n - step)], dim=dim)
        step *= 2
    return x



def _linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Every ``s_k = a_k s_{k−1} + b_k`` along ``dim`` from ``s_{−1} = 0``, by ⌈log₂ n⌉ doubling steps
    that compose the affine maps (multiplications and additions only, like :func:`_cumprod`)."""
    n = b.shape[dim]
    step = 1
    while step < n:
        a_head, a_tail = a.narrow(dim, 0, step), a.narrow(dim, step, n - step)
        b_head, b_tail = b.narrow(dim, 0, step), b.narrow(dim, step, n - step)
        b = torch.cat([b_head, b_tail + a_tail * b.narrow(dim, 0, n - step)], dim=dim)
        a = torch.cat([a_head, a_tail * a.narrow(dim, 0, n - step)], dim=dim)
        step *= 2
    return b


@dataclass
class ChunkRows:
    """The last rows of a chunk's transfer products, all that its end state needs:
    ``g [..., n+1(, D)]`` = ``G[n, j]``, ``omega`` = ``Ω[n, j]`` (``g`` without momentum) and
    ``y [..., n+1]`` = ``Y[n, j]`` (``None`` without momentum), for ``j = 0..n``."""

    g: torch.Tensor
    omega: torch.Tensor
    y: torch.Tensor | None
    channel: bool


def chunk_rows(alpha: torch.Tensor | None, mu: torch.Tensor | None, n: int, like: torch.Tensor) -> ChunkRows:
    """:class:`ChunkRows` of retention ``alpha`` (``[..., n]``, ``[..., n, D]`` per channel, or ``None``)
    and momentum ``mu [..., n]`` (or ``None``), in O(n log n) where :func:`transfer` builds
    ``[n+1, n+1]`` matrices: a chunk whose tokens do not read its per-token weights (``read:
    chunk_start``) needs only its end state, whose cost per token then does not grow with the chunk. Products are taken in float32 at least and returned in the gates' dtype, as in
    :func:`transfer`."""
    keep = alpha is None
    if keep:
        alpha = like.new_ones(like.shape[:2] + (n,))
    channel = alpha.dim() == 4
    dtype = alpha.dtype
    work = torch.promote_types(dtype, torch.float32)
    dim = -2 if channel else -1
    with torch.autocast(like.device.type, enabled=False):
        # without retention every product is 1: no scan to launch
        g = alpha.new_ones(alpha.shape[:-1] + (n + 1,), dtype=work) if keep else _suffix(alpha.to(work), dim)
        y = omega = None
        if mu is not None:
            m = mu.to(work)
            y = _suffix(m, -1)
            # Ω[n, j] = Σ_{i=j..n} G[n, i] Y[i, j] satisfies Ω[n, j] = G[n, j] + μ_{j+1} Ω[n, j+1]
            # from Ω[n, n] = 1: a linear recurrence run from j = n down to 0
            a = torch.cat([torch.zeros_like(m[..., :1]), m.flip(-1)], dim=-1)
            omega = _linear_scan(a.unsqueeze(-1) if channel else a, g.flip(dim), dim).flip(dim)
    cast = (lambda t: t if t is None else t.to(dtype))
    return ChunkRows(cast(g), cast(omega if omega is not None else g), cast(y), channel)


def _suffix(f: torch.Tensor, dim: int) -> torch.Tensor:
    """``[Π_{i=j..n−1} f_i for j = 0..n−1] + [1]`` along ``dim``: row ``n`` of :func:`transfer`."""
    suffix = _cumprod(f.flip(dim), dim).flip(dim)
    return torch.cat([suffix, torch.ones_like(f.narrow(dim, 0, 1))], dim=dim)


def _chunk_end(w0: torch.Tensor, s0: torch.Tensor | None, x: torch.Tensor, e: torch.Tensor,
               rows: ChunkRows, origin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_n, S_n)`` after a chunk from its written errors ``e [..., n, o]``, layer inputs
    ``x [..., n, i]``, the start ``w0`` (the deviation from ``origin`` when there is one) and ``s0``,
    and the last rows of its transfer products (module docstring: ``W_n = W_0 G[n, 0] + S_0 Z_n −
    Σ_j e_j (x_j ⊙ Ω[n, j])ᵀ``)."""

    def col(w, f):  # a matrix [..., o, i] times a factor per head ([...]) or per column ([..., i])
        return w * (f.unsqueeze(-2) if rows.channel else f[..., None, None])

    def scale(u, f):  # u [..., n, i] times per-token factors [..., n] or [..., n, i]
        return u * (f if rows.channel else f.unsqueeze(-1))

    g_end = rows.g[..., 0, :] if rows.channel else rows.g[..., 0]
    om = rows.omega[..., 1:, :] if rows.channel else rows.omega[..., 1:]
    w = col(w0, g_end) - e.transpose(-1, -2) @ scale(x, om)
    if origin is not None:
        w = w + origin
    if s0 is None:
        return w, None
    z_end = (rows.omega[..., 0, :] if rows.channel else rows.omega[..., 0]) - g_end
    w = w + col(s0, z_end)
    s = s0 * rows.y[..., 0, None, None] - e.transpose(-1, -2) @ (x * rows.y[..., 1:, None])
    return w, s

@dataclass
class ChunkSolution:
    """One chunk of one weight matrix, solved: read it at any queries, or take its end state.

    Shapes: ``w0, s0 [..., o, i]``, ``x [..., n, i]``, ``e [..., n, o]``, ``g, omega
    [..., n+1, n+1(, i)]``, ``z [..., n+1(, i)]``, ``y [..., n+1, n+1]`` (``(, i)``: per-channel
    retention).
    """

    w0: torch.Tensor
    s0: torch.Tensor | None
    x: torch.Tensor
    g: torch.Tensor
    omega: torch.Tensor
    z: torch.Tensor | None
    y: torch.Tensor | None
    channel: bool
    e: torch.Tensor | None = None
    origin: torch.Tensor | None = None  # W_0 [..., o, i] of retention toward the initial state

    def _at(self, t: torch.Tensor, rows, cols) -> torch.Tensor:
        """``t[..., rows, cols]`` on the two token axes, keeping a trailing channel axis."""
        return t[..., rows, cols, :] if self.channel else t[..., rows, cols]

    def _factor(self, f: torch.Tensor) -> torch.Tensor:
        """Per-token factors ``[..., n]`` (or per channel ``[..., n, i]``) as ``[..., n, 1 or i]``."""
        return f if self.channel else f.unsqueeze(-1)

    def _base(self, u: torch.Tensor, rows: slice) -> torch.Tensor:
        out = _ScaledProduct.apply(u, self._factor(self._at(self.g, rows, 0)), self.w0)
        if self.s0 is not None:
            z = self.z[..., rows, :] if self.channel else self.z[..., rows]
            out = out + _ScaledProduct.apply(u, self._factor(z), self.s0)
        return out

    def _kernel(self, u: torch.Tensor, rows: slice) -> torch.Tensor:
        om = self._at(self.omega, rows, slice(1, None))
        if self.channel:
            return torch.einsum("...rd,...jd,...rjd->...rj", u, self.x, om)
        return (u @ self.x.transpose(-1, -2)) * om

    def read(self, u: torch.Tensor, before: bool) -> torch.Tensor:
        """``W_r u_r`` (or ``W_{r−1} u_r`` when ``before``) for ``u [..., n, i]``: ``[..., n, o]``."""
        n = u.shape[-2]
        rows = slice(0, n) if before else slice(1, n + 1)
        if self.channel:
            scored = self._kernel(u, rows) @ self.e
        else:
            scored = _ScoreRead.apply(u, None if u is self.x else self.x, self._at(self.omega, rows, slice(1, None)),
                                      self.e)
        out = self._base(u, rows) - scored
        return out if self.origin is None else out + u @ self.origin.transpose(-1, -2)

    def pick(self, i: int) -> ChunkSolution:
        """Slot ``i`` of a solution stacked on a leading slot axis (weights ``[S, ..., o, i]``;
        transfer products and inputs shared by the slots carry no slot axis)."""
        if self.w0.dim() == self._lead() + 2:
            return self
        def one(t):
            return t if t is None or t.dim() == self._lead() + 2 else t[i]
        return ChunkSolution(one(self.w0), one(self.s0), one(self.x), self.g, self.omega, self.z, self.y,
                             self.channel, one(self.e), one(self.origin))

    def _lead(self) -> int:
        """How many leading axes an unstacked solution has (``B, H``), read off ``g``."""
        return self.g.dim() - 2 - int(self.channel)

    def end(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W_n, S_n)`` after the chunk."""
        rows = ChunkRows(self._at(self.g, -1, slice(None)), self._at(self.omega, -1, slice(None)),
                         None if self.y is None else self.y[..., -1, :], self.channel)
        return _chunk_end(self.w0, self.s0, self.x, self.e, rows, self.origin)


def _product_dtype(u: torch.Tensor, x: torch.Tensor, u_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype ``u @ xᵀ`` comes out in here: autocast's on its device for float32 or 16-bit operands
    (matmul is on every device's lower-precision list), else the operands' promoted dtype.
    ``u_dtype``: the dtype ``u`` has by the time it is multiplied, when not its own (a product's
    operand made inside the forward)."""
    both = torch.promote_types(u_dtype or u.dtype, x.dtype)
    low = autocast_dtype(u.device.type)
    return low if low is not None and both in (torch.float32, torch.float16, torch.bfloat16) else both


def _save_scores(ctx, u: torch.Tensor, x: torch.Tensor | None, *rest: torch.Tensor) -> None:
    """The context of a function of the scores ``U Xᵀ`` (``x`` None for X = U, passed once: Dynamo
    refuses one tensor passed twice to an autograd.Function): saves ``(u, x, *rest)`` with ``x``
    resolved, and records X = U and the dtype the forward's product came out in."""
    ctx.same = x is None
    x = u if x is None else x
    ctx.save_for_backward(u, x, *rest)
    ctx.mdt = _product_dtype(u, x)


class _ScaledProduct(torch.autograd.Function):
    """``(U ⊙ F) Wᵀ`` (``u [..., n, i]``, ``f [..., n, 1 or i]`` broadcast against it, ``w [..., o, i]``),
    saving its inputs instead of the scaled ``U ⊙ F`` (a new ``[n, i]`` tensor each time, which
    autograd kept for the product's backward, beside a copy of ``W`` cast to autocast's dtype); the
    backward scales ``U`` again. The same value, and the expression's gradients up to where its
    products round (in the forward product's dtype, as autocast's backward takes them); differentiable
    operations (second order, ``vmap``); no forward mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u: torch.Tensor, f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (u * f) @ w.transpose(-1, -2)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        u, f, w = inputs
        ctx.save_for_backward(u, f, w)
        ctx.sdt = torch.promote_types(u.dtype, f.dtype)
        ctx.mdt = _product_dtype(u, w, ctx.sdt)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, f, w = ctx.saved_tensors
        gu = gf = gw = None
        with _no_autocast(u):
            if ctx.needs_input_grad[2]:
                gw = (g.to(ctx.mdt).transpose(-1, -2) @ (u * f).to(ctx.mdt)).sum_to_size(w.shape).to(w.dtype)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                gs = (g.to(ctx.mdt) @ w.to(ctx.mdt)).to(ctx.sdt)  # ∂/∂(U ⊙ F)
                if ctx.needs_input_grad[0]:
                    gu = (gs * f).sum_to_size(u.shape).to(u.dtype)
                if ctx.needs_input_grad[1]:
                    gf = (gs * u).sum_to_size(f.shape).to(f.dtype)
        return gu, gf, gw


class _ScoreRead(torch.autograd.Function):
    """``((U Xᵀ) ⊙ Ω) E`` (``u [..., n, i]``, ``x [..., n, i]`` or None for X = U, ``Ω [..., n, n]``,
    ``e [..., n, o]``): a chunk's read through its scores, saving its inputs where autograd kept the
    scores ``U Xᵀ`` and their product with Ω (two ``[n, n]`` a read), and making the scores again in
    the backward in the forward product's dtype. The expression's value; its gradients up to where
    the products round; differentiable operations (second order, ``vmap``); no forward mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u: torch.Tensor, x: torch.Tensor | None, om: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        x = u if x is None else x
        return ((u @ x.transpose(-1, -2)) * om) @ e

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        u, x, om, e = inputs
        _save_scores(ctx, u, x, om, e)
        ctx.kdt = torch.promote_types(ctx.mdt, om.dtype)  # the scores times Ω
        ctx.edt = _product_dtype(u, e, ctx.kdt)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, x, om, e = ctx.saved_tensors
        gu = gx = gom = ge = None
        with _no_autocast(u):
            ul, xl = u.to(ctx.mdt), x.to(ctx.mdt)
            # the scores again, for E's and Ω's gradients only (U's and X's need Ω, not the scores)
            m = ul @ xl.transpose(-1, -2) if ctx.needs_input_grad[3] or ctx.needs_input_grad[2] else None
            if ctx.needs_input_grad[3]:
                k = (m * om).to(ctx.edt)
                ge = (k.transpose(-1, -2) @ g.to(ctx.edt)).sum_to_size(e.shape).to(e.dtype)
            if any(ctx.needs_input_grad[:3]):
                gk = (g.to(ctx.edt) @ e.to(ctx.edt).transpose(-1, -2)).to(ctx.kdt)  # ∂/∂((U Xᵀ) ⊙ Ω)
                if ctx.needs_input_grad[2]:
                    gom = (gk * m).sum_to_size(om.shape).to(om.dtype)
                if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                    gu, gx = _score_grads((gk * om).to(ctx.mdt), ul, xl, u, x, ctx.same, ctx.needs_input_grad[:2])
        return gu, gx, gom, ge


def _score_grads(gm: torch.Tensor, ul: torch.Tensor, xl: torch.Tensor, u: torch.Tensor, x: torch.Tensor,
                 same: bool, needs: tuple) -> tuple:
    """``(∂U, ∂X)`` of the scores ``M = U Xᵀ`` from their gradient ``gm`` (``ul``, ``xl``: the operands
    in the product's dtype; ``u``, ``x``: as given, for the shapes and dtypes the gradients take);
    ``same``: X = U, x no input of its own, so U takes both operands' parts."""
    gu = gx = None
    if needs[0]:
        gu = gm @ xl
        if same:
            gu = gu + gm.transpose(-1, -2) @ ul
        gu = gu.sum_to_size(u.shape).to(u.dtype)
    if needs[1]:
        gx = (gm.transpose(-1, -2) @ ul).sum_to_size(x.shape).to(x.dtype)
    return gu, gx


class _EraseSystem(torch.autograd.Function):
    """A chunk's unit lower-triangular system ``I + diag(b) ((U Xᵀ) ⊙ Ω)`` (``u, x [..., n, i]``, ``x``
    None for X = U, ``b [..., n]``, ``Ω [..., n, n]``), saving only its inputs: autograd saved the
    score matrix ``U Xᵀ`` and its product with Ω, two more ``[n, n]`` a system (at
    `hope_large_chunk`'s chunks of 256, 256 values a token, head and memory each), and the backward
    makes ``U Xᵀ`` again, in the dtype the forward's product had (autocast's, when it was on). The
    same values and gradients as the expression, in the same dtypes; made of differentiable
    operations (second order, ``vmap``). No forward mode (``torch.func.jvp``), as :class:`_Transfer`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u: torch.Tensor, x: torch.Tensor | None, b: torch.Tensor, om: torch.Tensor) -> torch.Tensor:
        x = u if x is None else x
        return _erase_system(u @ x.transpose(-1, -2), x, b, om)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _save_scores(ctx, *inputs)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, x, b, om = ctx.saved_tensors
        with _no_autocast(u):
            ul, xl = u.to(ctx.mdt), x.to(ctx.mdt)
            return _erase_system_grads(g, ul @ xl.transpose(-1, -2), ul, xl, (u, x, b, om), ctx.same,
                                       ctx.needs_input_grad[:4])


def _erase_system(m: torch.Tensor, x: torch.Tensor, b: torch.Tensor, om: torch.Tensor) -> torch.Tensor:
    """``I + diag(b) (M ⊙ Ω)`` from the score matrix ``M = U Xᵀ`` (``x`` gives the identity's dtype)."""
    n = x.shape[-2]
    return torch.eye(n, dtype=x.dtype, device=x.device) + b.unsqueeze(-1) * (m * om)


def _erase_system_grads(g: torch.Tensor, m: torch.Tensor, ul: torch.Tensor, xl: torch.Tensor, inputs: tuple,
                        same: bool, needs: tuple) -> tuple:
    """The gradients of :func:`_erase_system`'s ``(u, x, b, Ω)`` (``inputs``, for their shapes and dtypes)
    from the system's gradient ``g``, with ``m = ul xlᵀ`` made again in the forward product's dtype
    (``ul``, ``xl`` the operands cast to it); ``same``: X = U, x no input of its own."""
    u, x, b, om = inputs
    gk = g * b.unsqueeze(-1) if any(needs[i] for i in (0, 1, 3)) else None
    gb = gom = gu = gx = None
    if needs[2]:
        gb = (g * (m * om)).sum(-1).sum_to_size(b.shape).to(b.dtype)
    if needs[3]:
        gom = (gk * m).sum_to_size(om.shape).to(om.dtype)
    if needs[0] or needs[1]:
        gu, gx = _score_grads((gk * om).to(ul.dtype), ul, xl, u, x, same, needs[:2])
    return gu, gx, gb, gom


def _aligned_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``[..., m, k] @ [..., k, n]``; when it multiplies in a 16-bit dtype and a size
    is not a multiple of 8, on operands zero-padded to multiples of 8 and the result cut back (the
    same values). cuBLAS takes 16-bit operands whose rows are not 16-byte aligned only in
    Turing-era tiles (``cutlass_75…align1``), which took 5.3 % of `hope_large_chunk`'s step on an
    H100; its ``[n+1, n+1]`` transfer products at chunks of 256 (``n+1`` = 257) are among them
    (docs/benchmarks.md)."""
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    dt = _product_dtype(a, b)
    if dt not in (torch.float16, torch.bfloat16) or not (m % 8 or k % 8 or n % 8):
        return a @ b
    pm, pk, pn = -m % 8, -k % 8, -n % 8
    # cast before padding: one copy of each operand, as autocast would have made
    return (F.pad(a.to(dt), (0, pk, 0, pm)) @ F.pad(b.to(dt), (0, pn, 0, pk)))[..., :m, :n]


def solve_chunk(
    w0: torch.Tensor,
    s0: torch.Tensor | None,
    x: torch.Tensor,
    erase: torch.Tensor,
    b: torch.Tensor | None,
    f: torch.Tensor,
    g: torch.Tensor,
    y: torch.Tensor | None,
    channel: bool,
    origin: torch.Tensor | None = None,
) -> ChunkSolution:
    """Solve one chunk of the recurrence in the module docstring.

    Args:
        w0: ``[..., o, i]`` the weights at the chunk start; s0: the momentum buffer or ``None``.
        x: ``[..., n, i]`` layer inputs; erase: ``ḱ`` ``[..., n, i]``.
        b: ``[..., n]`` erase coefficients, ``None`` when the update does not read the state.
        f: ``[..., n, o]`` forcing. g: :func:`transfer` of the retention; y: of the momentum.
        origin: ``W_0 [..., o, i]`` when retention decays toward the initial state, else ``None``.
    """
    if origin is not None:
        # solve for the deviation U = W − W_0; the erase of the W_0 part is a known forcing. (Added
        # to the erase's base before b multiplies both, one product fewer would be saved, but under
        # autocast that sum rounds to bf16: the solution's error grew by 12–20 % in a review's check)
        w0 = w0 - origin
        if b is not None:
            f = f + b.unsqueeze(-1) * (x @ origin.transpose(-1, -2))
    if y is None:
        omega, z = g, None
    else:
        omega = torch.einsum("...rid,...ij->...rjd", g, y) if channel else _aligned_matmul(g, y)
        z = omega[..., :, 0, :] - g[..., :, 0, :] if channel else omega[..., :, 0] - g[..., :, 0]
    sol = ChunkSolution(w0, s0, x, g, omega, z, y, channel, origin=origin)
    if b is None:
        sol.e = f
        return sol
    n = x.shape[-2]
    rows = slice(0, n)  # W_{r−1}: the state each token's erase sees
    rhs = b.unsqueeze(-1) * sol._base(erase, rows) + f
    if channel:
        a = torch.eye(n, dtype=x.dtype, device=x.device) + b.unsqueeze(-1) * sol._kernel(erase, rows)
        sol.e = _solve_lower(a, rhs)
    else:
        # one tensor passed twice to an autograd.Function is what Dynamo refuses: None stands for x = U.
        # (System and solve in one function that saved neither's [n, n] system, building it again in
        # the backward, kept 8 % less alive on CPU but made hope_large_chunk's step 21 % slower on an
        # H100, with the same peak: docs/benchmarks.md, "The four later memory changes on the GPU")
        a = _EraseSystem.apply(erase, None if x is erase else x, b, sol._at(omega, rows, slice(1, None)))
        sol.e = _solve_lower(a, rhs)
    return sol


#: How :func:`_solve_lower` solves a chunk's unit lower-triangular system, from
#: ``NLGRAPH_CHUNK_SOLVE``: ``auto`` (default): nlgraph's Triton solve (``kernel``) for float32 work
#: on CUDA, ``triangular`` elsewhere. ``kernel``: :func:`_triangular`'s solves (both the forward's
#: and the backward's transposed one) in nlgraph's Triton kernel
#: (:mod:`nlgraph.compilers.kernels.solve_lower`: ``a`` read in place, broadcast or transposed,
#: 16-row blocks in float32) for float32 work on tensors the kernels take (CUDA, or CPU under
#: ``NLGRAPH_KERNELS=interpret``), the others as ``triangular``. On an H100 it took
#: ``hope_large_chunk`` (d_model 512, T=2048, B=8) from 46,251 to 56,154 tokens/s against cuBLAS's
#: batched solve, whose calls had been 12-16 % of the step (docs/benchmarks.md, "The chunk solve as a
#: Triton kernel"). ``triangular``: one ``torch.linalg.solve_triangular`` everywhere. ``blocked``:
#: the inverse built from the diagonal blocks' inverses by doubling and applied as one matmul
#: (:func:`_inverse_lower`), for chunks of 64 · 2^k rows (k ≥ 1; others stay triangular), meant to
#: shorten the sequential chain to one 64-row block at the price of saving about three times ``a``'s
#: size for the backward; slower on an H100 (the solve alone 0.77 / 2.65 against 0.70 / 1.71 ms
#: forward / forward + backward, the model 0.99x), so opt-in. An unknown value is an error at the
#: first chunk solve.
CHUNK_SOLVE = os.environ.get("NLGRAPH_CHUNK_SOLVE", "").strip().lower() or "auto"
_SOLVE_BLOCK = 64


def _chunk_solve() -> str:
    """:data:`CHUNK_SOLVE`, checked."""
    if CHUNK_SOLVE not in ("auto", "triangular", "blocked", "kernel"):
        raise NLGraphError(f"unknown chunk solve {CHUNK_SOLVE!r}; set it to 'auto', 'triangular', 'blocked' or "
                           "'kernel', or unset it", path="NLGRAPH_CHUNK_SOLVE")
    return CHUNK_SOLVE


def _triangular(a: torch.Tensor, rhs: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``a⁻¹ rhs`` (``a⁻ᵀ rhs`` with ``transpose``) for unit lower-triangular ``a``, operands of one
    dtype: nlgraph's Triton solve for float32 on CUDA (``auto``) or on any tensors the kernels take
    (``kernel``), else ``torch.linalg.solve_triangular``."""
    wanted = CHUNK_SOLVE == "kernel" or (CHUNK_SOLVE == "auto" and rhs.device.type == "cuda")
    if wanted and a.dtype == rhs.dtype == torch.float32:
        from .kernels import dispatch

        if dispatch.why_no_kernel(rhs.device) is None:
            from .kernels.solve_lower import solve_unit_lower

            return solve_unit_lower(a, rhs, transpose)
    return torch.linalg.solve_triangular(a.mT if transpose else a, rhs, upper=transpose, unitriangular=True)


def _solve_lower(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ rhs`` for unit lower-triangular ``a [..., n, n]``, ``rhs [..., n, o]``, in the promoted
    dtype of the two. Half precisions are solved in float32 (no triangular solve takes bfloat16;
    under autocast the operands arrive in mixed dtypes) and cast back."""
    if _chunk_solve() != "blocked":
        return _SolveLower.apply(a, rhs)
    work = torch.promote_types(a.dtype, rhs.dtype)
    # autocast off: the blocked form's matmuls would otherwise run in half precision
    with _no_autocast(a):
        return _solve_lower_in(a.to(_wide(work)), rhs.to(_wide(work))).to(work)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype a triangular solve runs in: float32 for the half precisions (none takes them)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _SolveLower(torch.autograd.Function):
    """``a⁻¹ rhs`` (unit lower-triangular ``a``) solved in float32 or wider, returned in the promoted
    dtype of the two, saving for the backward ``a`` as it came and the returned solution: the
    solve's own autograd saved the widened copy of ``a`` and the float32 solution, so under bf16
    autocast a chunk's solution was kept twice, once in float32 (``benchmarks/live_bytes.py``). The
    backward is ``torch.linalg.solve_triangular``'s: ``∂rhs = a⁻ᵀ g``, ``∂a = −tril₋₁(∂rhs xᵀ)``, with
    ``x`` the saved (work-dtype) solution, so under autocast ``∂a`` carries its rounding; in float32
    it is the same computation. Made of differentiable operations (a second-order meta-gradient
    differentiates through it) and vmapped by the rule PyTorch derives from them. No forward mode
    (``torch.func.jvp``), as :class:`_Transfer`: nothing differentiates the solve forward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(a.dtype, rhs.dtype)
        wide = _wide(work)
        with _no_autocast(a):
            x = _triangular(a.to(wide), rhs.to(wide))
        # x itself when it is already in ``work``, not ``x.to(work)``: that no-op cast returns an alias
        # of x, and torch 2.11's ``scan`` (not 2.13's) then differentiates a chunk loop through this
        # function into wrong gradients of every input, the carried state's among them (relative
        # errors ~1: tests/compilers/test_scan.py on torch 2.11, the GPU machine's)
        return x if x.dtype == work else x.to(work)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        a, rhs = inputs
        ctx.save_for_backward(a, output)
        ctx.rhs_dtype, ctx.rhs_shape = rhs.dtype, rhs.shape
        ctx.pdt = _product_dtype(a, rhs)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, x = ctx.saved_tensors
        with _no_autocast(a):
            return _solve_lower_grads(a, x, g, ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.rhs_dtype,
                                      ctx.rhs_shape, ctx.pdt)


def _solve_lower_grads(a: torch.Tensor, x: torch.Tensor, g: torch.Tensor, need_a: bool, need_rhs: bool,
                       rhs_dtype: torch.dtype, rhs_shape: torch.Size, pdt: torch.dtype | None = None) -> tuple:
    """``(∂a, ∂rhs)`` of ``x = a⁻¹ rhs`` from ``g`` (``None`` where not needed), as
    ``torch.linalg.solve_triangular``'s backward: ``∂rhs = a⁻ᵀ g``, ``∂a = −tril₋₁(∂rhs xᵀ)``.
    ``pdt``: the dtype the forward's products came out in (:func:`_product_dtype`); a 16-bit one
    (the solve ran under autocast) multiplies ``∂rhs xᵀ`` in it, accumulated in float32, as
    autocast's backward of a matmul would: in float32 that ``[n, o] × [o, n]`` product runs on the
    GPU's CUDA cores, not its tensor cores (float32 GEMMs of that kind are in the profile of
    `hope_large_chunk`'s step; in bf16 the step ran 4.7 % faster on an H100, docs/benchmarks.md).
    The triangular solve itself stays float32 (none takes 16 bits)."""
    wide = _wide(torch.promote_types(a.dtype, g.dtype))
    grhs = _triangular(a.to(wide), g.to(wide), transpose=True)
    ga = None
    if need_a:
        low = pdt if pdt in (torch.float16, torch.bfloat16) else wide
        # summed over the dims a was broadcast along (the model's slots) in the wide dtype, then cast
        ga = (-(grhs.to(low) @ x.to(low).mT).to(wide).tril(-1)).sum_to_size(a.shape).to(a.dtype)
    return ga, (grhs.sum_to_size(rhs_shape).to(rhs_dtype) if need_rhs else None)


def _solve_lower_in(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    n = a.shape[-1]
    blocks = n // _SOLVE_BLOCK
    if CHUNK_SOLVE == "blocked" and n % _SOLVE_BLOCK == 0 and blocks > 1 and blocks & (blocks - 1) == 0:
        return _inverse_lower(a, _SOLVE_BLOCK) @ rhs
    return torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)


def _inverse_lower(a: torch.Tensor, block: int) -> torch.Tensor:
    """The inverse of unit lower-triangular ``a [..., n, n]`` with ``n = block · 2^k``: the diagonal
    blocks inverted in one batched triangular solve, then neighbouring inverses merged, doubling the
    size each time, by ``[[A⁻¹, 0], [−D⁻¹ C A⁻¹, D⁻¹]]`` for ``[[A, 0], [C, D]]`` (two matmuls per
    merge, all pairs at once)."""
    n = a.shape[-1]
    m = n // block
    lead = a.shape[:-2]
    # the diagonal blocks [..., m, b, b]
    tiles = a.reshape(*lead, m, block, m, block)
    diag = torch.diagonal(tiles, dim1=-4, dim2=-2).movedim(-1, -3)
    eye = torch.eye(block, dtype=a.dtype, device=a.device).expand_as(diag)
    inv = torch.linalg.solve_triangular(diag, eye, upper=False, unitriangular=True)
    size = block
    while size < n:
        pairs = n // (2 * size)
        # each pair's lower-left block C: rows of its second half, columns of its first
        grid = a.reshape(*lead, pairs, 2, size, pairs, 2, size)
        c = torch.diagonal(grid, dim1=-6, dim2=-3)[..., 1, :, 0, :, :].movedim(-1, -3)  # [..., pairs, s, s]
        first, second = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        lower = -(second @ (c @ first))
        top = torch.cat([first, torch.zeros_like(first)], dim=-1)
        bottom = torch.cat([lower, second], dim=-1)
        inv = torch.cat([top, bottom], dim=-2)  # [..., pairs, 2s, 2s]
        size *= 2
    return inv[..., 0, :, :]


# --------------------------------------------------------------------------- support


def why_not_chunked(spec: LevelSpec, device: str = "cpu") -> str | None:
    """``None`` when the chunked form computes ``spec``'s semantics exactly, else why not."""
    if spec.frequency == "never":
        return None
    opt = spec.optimizer
    if opt.kind not in ("gd", "momentum", "dgd", *MAPPED):
        return f"the {opt.kind} optimizer's update is not a linear recurrence in the memory"
    if opt.kind == "momentum" and opt.nesterov:
        return "nesterov momentum has no chunkwise form here"
    period, chunk = periods(spec)
    if opt.kind in MAPPED:
        if period == 1 and chunk == 1:
            return (f"an exact-online {opt.kind} memory (frequency 1, gradient_point token) steps on "
                    "each token's gradient at the previous token's state, which is sequential; use "
                    "gradient_point: {chunk: N} for its mini-batch form")
    if period == 1 and chunk == 1:
        if spec.memory.kind != "linear":
            return (
                f"an exact-online {spec.memory.kind} memory (frequency 1, gradient_point token) "
                "has no parallel form: each token's gradient passes through the non-linearity at "
                "the previous token's state; use gradient_point: {chunk: N} for mini-batch semantics"
            )
        if spec.adaptive or spec.values.self_target:
            return (
                "an exact-online self-modifying level reads its projections at the previous "
                "token's state, which is sequential; use gradient_point: {chunk: N}"
            )
        if spec.objective.kind not in ("dot", "l2", "outer"):
            return f"the {spec.objective.kind} objective's gradient is not affine in the memory"
        return None
    if period > 1 and chunk != period:
        return f"a gradient-point chunk ({chunk}) longer than the period ({period})"
    return None


#: Whether the online form computes its full chunks' state-independent parts for all chunks at once
#: (:func:`_online_full`; levels with per-head gates). ``False`` walks them with one
#: :func:`solve_chunk` each, as before (kept for A/B checks).
ONLINE_FULL = True

#: Optimizers whose mini-batch form materialises the per-token states (:func:`_mapped_chunk`).
MAPPED = ("adam", "muon")


# --------------------------------------------------------------------------- chunk loops

#: How the drivers step through chunks: ``"python"`` (a Python loop), ``"scan"`` (torch's
#: higher-order ``scan`` over the run of full chunks) or ``"auto"`` (scan while
#: ``torch.compile`` traces, the Python loop in eager). :func:`run_chunked`'s ``loop=None`` reads it.
LOOP = "auto"
LOOPS = ("auto", "python", "scan")
#: ``auto`` scans a run of at least this many full chunks. A scan's compile has a fixed cost (its
#: step is traced, partitioned into forward and backward and checked several times): for HOPE's
#: block on CPU, torch 2.13, it was 2.5× the unrolled loop's at 2 chunks (83 s vs 33 s, aot_eager)
#: and half of it at 8 (73 s vs 103 s aot_eager, 284 s vs 550 s inductor).
MIN_SCAN_CHUNKS = 4


def _use_scan(loop: str, n_chunks: int) -> bool:
    if loop == "python" or n_chunks < 1:
        return False
    if loop == "scan":
        return True
    return n_chunks >= MIN_SCAN_CHUNKS and torch.compiler.is_compiling()


def _seq(x: torch.Tensor) -> torch.Tensor:
    """``[B, n, H, ...] -> [B, H, n, ...]``.

    Built by unbinding heads and stacking them, not by a transpose: the gradient that flows back
    to the caller is then a freshly stacked, contiguous ``[B, n, H, ...]`` tensor. A transposed
    gradient breaks callers whose backward views it (a ``Linear`` after ``softplus``) in a compiled
    (AOT) backward on torch 2.13."""
    return torch.stack(x.unbind(2), dim=1)


@dataclass(frozen=True)
class _Chunk:
    """The per-token inputs of one chunk: ``parts`` are ``[B, n, H, ...]`` slices of the level's
    distinct per-token tensors (:class:`_Inputs`), ``index`` says which part each role reads."""

    parts: list[torch.Tensor]
    index: dict[str, int]

    def seq(self, role: str) -> torch.Tensor:
        """Role ``keys`` / ``values`` / ``queries`` (stream data) or ``lr`` / ``alpha`` / ``mu``
        (a rate, or an adaptive gate's input) over the chunk: ``[B, H, n, ...]``."""
        return _seq(self.parts[self.index[role]])


class _Inputs:
    """Every per-token tensor a level reads (``[B, T, H, ...]``), each once.

    A tensor read in several roles (HOPE passes its input ``x`` as keys, values and the gates'
    input) is one part, so the slices a :func:`scan` body receives never alias each other."""

    def __init__(self, run: LevelRun) -> None:
        found = {role: getattr(run, role).data for role in ("keys", "values", "queries")}
        for role in ("lr", "alpha", "mu"):
            rate = getattr(run, role)
            if rate is not None:
                found[role] = rate.x if isinstance(rate, AdaptiveGate) else rate
        self.tensors: list[torch.Tensor] = []
        self.index: dict[str, int] = {}
        for role, t in found.items():
            for i, u in enumerate(self.tensors):
                if u is t:
                    self.index[role] = i
                    break
            else:
                self.index[role] = len(self.tensors)
                self.tensors.append(t)

    def chunk(self, s: int, e: int) -> _Chunk:
        """Tokens ``[s, e)``."""
        return _Chunk([t[:, s:e] for t in self.tensors], self.index)

    def split(self, bounds: list[tuple[int, int]]) -> dict[int, _Chunk]:
        """The chunks ``[s, e)`` of consecutive ``bounds`` (keyed by ``s``), as one ``split`` of each
        tensor: its backward is one concatenation, where a slice per chunk would zero-fill a
        gradient of the whole sequence per chunk and add them up (quadratic in the length)."""
        if not bounds:
            return {}
        if torch.compiler.is_compiling():
            # traced, a continued sequence's bounds derive from its position tensor (data-dependent
            # sizes that a split must guard on); slices keep them symbolic, and the compiler fuses
            # their backward
            return {s: self.chunk(s, e) for s, e in bounds}
        first, last = bounds[0][0], bounds[-1][1]
        sizes = [e - s for s, e in bounds]
        parts = [t[:, first:last].split(sizes, dim=1) for t in self.tensors]
        return {s: _Chunk([p[i] for p in parts], self.index) for i, (s, _) in enumerate(bounds)}

    def scan(self, step, carry, s: int, n_chunks: int, size: int):
        """``n_chunks`` full chunks of ``size`` tokens from token ``s`` through torch's :func:`scan`:
        ``step(carry, chunk) -> (carry, out [B, H, size, ...])`` is traced once, not once per chunk.
        Returns ``(carry, outs [B, H, n_chunks·size, ...])``.

        ``carry`` is a pytree of ``[B, H, ...]`` tensors of one dtype. The scan carries them packed
        into one contiguous ``[B, H, Σ numel]`` tensor, for three of scan's rules: the carry must
        alias nothing (a layer's weight and bias are views of one solved matrix; a buffer the step
        does not change would be its own input), keep its strides from step to step, and in the
        backward scan the gradient that arrives for the final carry must have the strides of the
        one each step returns — a split's gradient is a concatenation, contiguous on both sides."""
        # contiguous chunks, so each step's slice has the strides scan traced its step with
        xs = [t[:, s:s + n_chunks * size].unflatten(1, (n_chunks, size)).movedim(1, 0).contiguous()
              for t in self.tensors]
        carry, ys = _scan(lambda c, parts: step(c, _Chunk(list(parts), self.index)), carry, xs)
        # joined by unbind and cat, not by a view, for the same reason: the gradient that comes
        # back for ys is then a stack, contiguous, as the backward scan traced its step with
        return carry, torch.cat(ys.unbind(0), dim=2)


def _scan(step, carry, xs: list[torch.Tensor]):
    """torch's :func:`scan` of ``step(carry, [x[i] for x in xs]) -> (carry, y)`` over the leading axis
    of ``xs``, with ``carry`` (a pytree of ``[B, H, ...]`` tensors) packed into one contiguous
    ``[B, H, Σ numel]`` tensor (:meth:`_Inputs.scan` says why). Returns ``(carry, ys)``, ``ys``
    stacked on a new leading axis."""
    from torch._higher_order_ops.scan import scan

    leaves, spec = tree_flatten(carry)
    lead = leaves[0].shape[:2]
    shapes = [t.shape[2:] for t in leaves]
    sizes = [math.prod(shape) for shape in shapes]

    def pack(c) -> torch.Tensor:
        return torch.cat([t.reshape(*lead, -1) for t in tree_flatten(c)[0]], dim=2)

    def unpack(flat: torch.Tensor):
        parts = torch.split(flat, sizes, dim=2)
        return tree_unflatten([p.reshape(*lead, *shape) for p, shape in zip(parts, shapes)], spec)

    def body(flat, parts):
        c, out = step(unpack(flat), parts)
        return pack(c), out

    if torch.compiler.is_compiling():
        flat, ys = scan(body, pack(carry), xs)
    else:
        # eager (loop="scan" forced): torch's scan compiles the step with dynamo on every call;
        # keep that compile's shapes static (a recompile with dynamic shapes lifts a
        # torch.Size into the scan, which torch 2.13 refuses)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            flat, ys = scan(body, pack(carry), xs)
    return unpack(flat), ys


# --------------------------------------------------------------------------- drivers


def _stream(run: LevelRun, role: str, chunk: _Chunk, lin: dict[str, Params]) -> torch.Tensor:
    stream: Stream = getattr(run, role)
    x = chunk.seq(role)
    if stream.slot is None:
        return x
    return stream.post(run.memories[stream.slot].forward(lin[stream.slot], x))


def _rate(run: LevelRun, role: str, chunk: _Chunk, lin: dict[str, Params]) -> torch.Tensor | None:
    rate = getattr(run, role)
    if rate is None:
        return None
    if isinstance(rate, AdaptiveGate):
        slot = f"adaptive.{rate.memory}"
        return rate.value(run.memories[slot].forward(lin[slot], chunk.seq(role)))
    return chunk.seq(role)


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def _stack(params: list[Params]) -> Params:
    """Per-slot parameter dicts ``[B, H, ...]`` → one dict ``[S, B, H, ...]`` (a view for one slot,
    or the tensor the slots were unbound from)."""
    if len(params) == 1:
        return {p: t.unsqueeze(0) for p, t in params[0].items()}
    out = {}
    for p in params[0]:
        parts = [d[p] for d in params]
        base = _unbound_from(parts)
        out[p] = torch.stack(parts) if base is None else base
    return out


def _unbound_from(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor ``X`` with ``parts == X.unbind(0)``, when they are exactly its views, else None
    (``X`` may be a view of their common base, taken here).

    A chunk's end state is unbound into per-slot views and the next chunk (or the level's next call,
    through the state) stacks them again: a copy of every slot's parameters and optimizer buffers
    per chunk, each kept for the backward (in HOPE about a quarter of what a forward leaves alive,
    `benchmarks/live_bytes.py`). ``X`` itself is the same values with the same gradient path.
    Eager only: a compiled graph reads no ``_base``, and inductor removes such copies itself."""
    if torch.compiler.is_compiling():
        return None
    root = parts[0]._base
    if (root is None or any(t.dtype != root.dtype or t.is_conj() or t.is_neg() for t in parts)
            # views taken under no_grad of a tensor that needs grads: no gradient path through them
            or (root.requires_grad and any(t.grad_fn is None for t in parts))):
        return None
    base = root
    if root.dim() != parts[0].dim() + 1 or root.shape[0] != len(parts):
        # views of a view have the first tensor as their _base: the chunk walk's flat
        # [S·B·H, o, i] end state seen as [S, B, H, o, i]. Its storage read as the stack is the stack.
        if not root.is_contiguous() or root.numel() != len(parts) * parts[0].numel():
            return None
        base = root.view(len(parts), *parts[0].shape)
    step = base.stride(0)
    if step == 0:  # expanded along the slot axis: a stack would be a real copy, keep it one
        return None
    for i, t in enumerate(parts):
        if (t._base is not root or t.shape != base.shape[1:] or t.stride() != base.stride()[1:]
                or t.storage_offset() != base.storage_offset() + i * step):
            return None
    return base


def _local_errors(mem: Memory, params: Params, k: torch.Tensor, target: torch.Tensor, run: LevelRun):
    """Every layer's input ``x`` and error ``δ`` for all tokens of a chunk at ``params``
    (:func:`~nlgraph.levels.memories.layer_errors` on the level's objective)."""
    return layer_errors(mem, params, k, lambda read: run.objective.loss(read, target).sum())


def _float_local_errors(mem: Memory, params: Params, k: torch.Tensor, target: torch.Tensor, run: LevelRun):
    """:func:`_local_errors` in float32 at least, autocast off: adam's gradients.

    Adam's step ``m̂ / (√v̂ + ε)`` is ``g / (|g| + ε)`` on a sequence's first gradient, whose
    derivative is ``1/ε`` at ``g = 0`` (10⁶ for ε = 1e-6). In bfloat16 an output equals its target
    (``δ = 0`` exactly) for about one coordinate in a few hundred, and each such coordinate adds a
    ``1/ε``-sized term to the outer gradients (adam_memory under bf16 autocast: a gradient norm of
    1,738 against 7.6 in float32, the same step). In float32 the errors are exact zeros only where
    the maths makes them so."""
    half = (torch.float16, torch.bfloat16)
    autocast = k.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(k.device.type)
    if not autocast and all(t.dtype not in half for t in (k, target, *params.values())):
        return _local_errors(mem, params, k, target, run)  # float32 already (and a device may lack autocast)
    work = torch.promote_types(k.dtype, torch.float32)
    with torch.autocast(k.device.type, enabled=False):
        return _local_errors(mem, {p: t.to(work) for p, t in params.items()}, k.to(work), target.to(work), run)


def _no_decay(n: int, lead: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """:func:`transfer` of factors that are all 1 (no retention): the lower-triangular ones
    ``[*lead, n+1, n+1]`` in ``like``'s dtype, made directly (two ops where the scan takes ~20)."""
    return torch.ones(n + 1, n + 1, dtype=like.dtype, device=like.device).tril().expand(*lead, n + 1, n + 1)


def _decays(alpha: torch.Tensor | None, n: int, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if alpha is None:
        return _no_decay(n, tuple(like.shape[:2]), like), False
    channel = alpha.dim() == 4
    return transfer(alpha, channel), channel


def _erase(x: torch.Tensor, alpha: torch.Tensor | None, run: LevelRun) -> torch.Tensor:
    if run.retention != "decay":
        return x
    return x * (alpha if alpha.dim() == 4 else alpha.unsqueeze(-1))


def _online_chunk(run: LevelRun, chunk: _Chunk, w: torch.Tensor, s_buf: torch.Tensor | None,
                  origin: torch.Tensor | None = None):
    """One chunk of the exact online form from ``(W, S)`` at its start: ``(reads [B, H, n, D_v],
    W, S)`` at its end (``S`` is ``None`` without momentum). ``origin``: ``W_0`` of retention
    toward the initial state."""
    k, v, q = (chunk.seq(role) for role in ("keys", "values", "queries"))
    lr, alpha = chunk.seq("lr"), _rate(run, "alpha", chunk, {})
    g, channel = _decays(alpha, k.shape[-2], w)
    if run.optimizer.kind == "dgd":
        eta = lr / (1.0 + lr * k.square().sum(-1)) if run.optimizer.proximal else lr
        coef = eta * (2.0 if run.objective.kind == "l2" else 1.0)
    else:
        eta, coef = lr, (lr if run.objective.kind == "l2" else None)
    y = transfer(chunk.seq("mu"), False) if run.optimizer.uses_momentum else None
    sign = 1.0 if run.objective.kind == "outer" else -1.0  # δ = −v (dot, l2's constant part), +u (outer)
    sol = solve_chunk(w, s_buf, k, _erase(k, alpha, run), coef, sign * eta.unsqueeze(-1) * v, g, y, channel,
                      origin)
    return (sol.read(q, run.read_before), *sol.end())


def recurrence_step(w: torch.Tensor, s: torch.Tensor | None, u: torch.Tensor, xt: torch.Tensor, ge: torch.Tensor,
                    p1: torch.Tensor | None = None, yt: torch.Tensor | None = None, ze: torch.Tensor | None = None,
                    ye: torch.Tensor | None = None, p2: torch.Tensor | None = None):
    """One chunk of :func:`_online_full`'s state recurrence: ``E = U + P1 Wᵀ + P2 Sᵀ``,
    ``W' = ge W + ze S − Eᵀ X̃``, ``S' = ye S − Eᵀ Ỹ`` (``s``, ``yt``, ``ze``, ``ye``, ``p2``: momentum;
    ``p1`` / ``p2``: ``None`` when the update does not read the state). ``w, s [..., O, I]``,
    ``u [..., n, O]``, ``xt, p1, yt, p2 [..., n, I]``, ``ge, ze, ye [...]``. Returns
    ``(W', S' or None, E)``, the states in their own dtypes. (The Triton kernel of the whole walk is
    ``nlgraph.compilers.kernels.recurrence``; its PyTorch loop runs this.)"""
    e = u
    if p1 is not None:
        e = e + p1 @ w.transpose(-1, -2).to(p1.dtype)
    if p2 is not None:
        e = e + p2 @ s.transpose(-1, -2).to(p2.dtype)
    w_new = w * ge[..., None, None] - e.transpose(-1, -2) @ xt
    if s is not None:
        w_new = w_new + s * ze[..., None, None]
        s = (s * ye[..., None, None] - e.transpose(-1, -2) @ yt).to(s.dtype)
    return w_new.to(w.dtype), s, e


def gate_pieces(g: torch.Tensor, y: torch.Tensor | None, after: bool) -> dict[str, torch.Tensor | None]:
    """The rows and columns of a chunk's transfer products the online form takes, from the
    retention's ``g`` and (with momentum) the momentum's ``y`` (:func:`transfer`'s ``[..., n+1, n+1]``,
    index 0 the chunk start), with ``Ω = G Y`` (``G`` without momentum) and ``z = Ω[:, 0] − G[:, 0]``:
    ``omp = Ω[:n, 1:]`` (the system's mask; a read before the write's), ``om = Ω[1:, 1:]`` (a read
    after it, with ``after``), ``gp = G[:n, 0]``, ``ga = G[1:, 0]``, ``zp = z[:n]``, ``z = z[1:]``,
    ``yu = Y[1:, 0]``, ``yend = Y[n, 1:]``, ``oml = Ω[n, 1:]`` (``z``-s and ``y``-s ``None`` without
    momentum). ``nlgraph.compilers.kernels.recurrence.online_gates`` forms the momentum case's in one
    kernel."""
    n = g.shape[-1] - 1
    pieces = dict(gp=g[..., :n, 0], ga=g[..., 1:, 0], zp=None, z=None, yu=None, yend=None)
    omega = g
    if y is not None:
        omega = g @ y
        z = omega[..., :, 0] - g[..., :, 0]  # [..., n+1]
        pieces.update(zp=z[..., :n], z=z[..., 1:], yu=y[..., 1:, 0], yend=y[..., n, 1:])
    return {**pieces, "omp": omega[..., :n, 1:], "om": omega[..., 1:, 1:] if after else None,
            "oml": omega[..., n, 1:]}


def solve_chunks(k: torch.Tensor, erase: torch.Tensor, coef: torch.Tensor, m: torch.Tensor, g0: torch.Tensor,
                 z: torch.Tensor | None, f: torch.Tensor):
    """The online form's chunk systems and their three solutions, every chunk at once::

        T = (I + strict(diag(coef) (erase kᵀ ⊙ M)))⁻¹,
        P₁ = T diag(coef g0) erase,   P₂ = T diag(coef z) erase,   U = T f

    ``k, erase [B, H, C, n, I]``, ``coef, g0, z [B, H, C, n]`` (``z`` ``None`` without momentum),
    ``m [B, H, C, n, n]`` (strictly lower part read: the transfer product ``Ω[:n, 1:]``),
    ``f [B, H, C, n, O]``. Returns ``(P₁, P₂ or None, U)``. The chunk's errors are
    ``E = U + P₁ W_cᵀ + P₂ S_cᵀ``; ``nlgraph.compilers.kernels.recurrence.online_prepare`` is the
    same in one Triton kernel."""
    n = k.shape[-2]
    kern = (erase @ k.transpose(-1, -2)) * m  # W_{r−1}: strictly lower
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    a = eye + coef.unsqueeze(-1) * kern
    # the system's inverse T = a⁻¹ once (n columns), then P₁, P₂ and U as products with it, as the
    # delta-rule kernels apply their UT transform: solving the three right-hand sides (3 · D
    # columns) took 2.7 of a momentum layer's 18.2 ms forward + backward on an H100, compiled
    tinv = _solve_lower(a, eye.expand(a.shape))
    p1 = tinv @ (coef.unsqueeze(-1) * erase * g0.unsqueeze(-1))
    p2 = tinv @ (coef.unsqueeze(-1) * erase * z.unsqueeze(-1)) if z is not None else None
    return p1, p2, tinv @ f


def _online_full(run: LevelRun, inputs: _Inputs, n_chunks: int, n: int, w: torch.Tensor,
                 s_buf: torch.Tensor | None, origin: torch.Tensor | None, loop: str, recurrence=None):
    """The first ``n_chunks`` full chunks of ``n`` tokens of the online form, for levels whose gates
    are per head: ``(reads [B, H, n_chunks·n, D_v], W, S)`` at their end.

    A chunk's written errors are ``E = P₁ W_cᵀ + P₂ S_cᵀ + U`` (the triangular solve of
    :func:`solve_chunk` applied to its right-hand side's three terms: ``P₁``, ``P₂`` and ``U`` do not
    depend on the state), so everything but the state's recurrence is computed for all chunks at
    once — transfer products, the erase kernel, the solve, the reads' kernel — and the recurrence
    itself is a few matmuls a chunk::

        E = U + P₁ Wᵀ + P₂ Sᵀ,   W' = G[n, 0] W + Z[n] S − Eᵀ X̃,   S' = Y[n, 0] S − Eᵀ Ỹ

    (``X̃ = x ⊙ Ω[n, 1:]``, ``Ỹ = x ⊙ Y[n, 1:]``; without momentum ``S``, ``P₂``, ``Z`` drop out).
    With retention toward ``W_0`` the recurrence runs on ``W − W_0``. The reads then take every
    chunk's start state at once. ``recurrence``: a function that runs the recurrence instead of the
    loop (``nlgraph.compilers.kernels.recurrence.online_recurrence``, the Triton kernel, or
    ``None``)."""
    momentum = s_buf is not None
    obj = run.objective.kind
    ch = inputs.chunk(0, n_chunks * n)

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, H, C·n, ...] → [B, H, C, n, ...]
        return t.unflatten(2, (n_chunks, n))

    k, v, q, lr = (split(ch.seq(role)) for role in ("keys", "values", "queries", "lr"))
    alpha = _rate(run, "alpha", ch, {})
    alpha = split(alpha) if alpha is not None else None
    if run.optimizer.kind == "dgd":
        eta = lr / (1.0 + lr * k.square().sum(-1)) if run.optimizer.proximal else lr
        coef = eta * (2.0 if obj == "l2" else 1.0)
    else:
        eta, coef = lr, (lr if obj == "l2" else None)
    sign = 1.0 if obj == "outer" else -1.0  # δ = −v (dot, l2's constant part), +u (outer)
    f = sign * eta.unsqueeze(-1) * v  # [B, H, C, n, o]
    erase = k * alpha.unsqueeze(-1) if run.retention == "decay" else k
    if origin is not None:
        # the rule of the deviation U = W − W_0: the erase of the W_0 part is a known forcing
        w = w - origin
        if coef is not None:
            f = f + coef.unsqueeze(-1) * (k @ origin.unsqueeze(2).transpose(-1, -2))
    from .kernels.recurrence import gates_in_kernel, online_gates

    after = not run.read_before
    if momentum and recurrence is not None and gates_in_kernel(n):  # NLGRAPH_RECURRENCE_GATES
        mu = split(ch.seq("mu"))
        gates = online_gates(alpha if alpha is not None else torch.ones_like(mu), mu, after)
    else:
        # [B, H, C, n+1, n+1]
        g = transfer(alpha, False) if alpha is not None else _no_decay(n, tuple(lr.shape[:3]), lr)
        gates = gate_pieces(g, transfer(split(ch.seq("mu")), False) if momentum else None, after)
    if coef is not None:
        from .kernels.recurrence import online_prepare, operand_dtype, prepare_in_kernel

        sys_args = (k, erase, coef, gates["omp"], gates["gp"], gates["zp"], f)
        if recurrence is not None and prepare_in_kernel(n, f.shape[-1], k.shape[-1]):  # NLGRAPH_RECURRENCE_PREPARE
            work = operand_dtype(torch.promote_types(k.dtype, erase.dtype), k.device)
            p1, p2, u = online_prepare(k.to(work), erase.to(work), *sys_args[2:], out=work)
        else:
            p1, p2, u = solve_chunks(*sys_args)
    else:  # the update does not read the state: the written errors are the forcing
        p1 = p2 = None
        u = f
    # the recurrence's per-chunk inputs [B, H, C, ...], by name (recurrence_step's arguments)
    parts = {"u": u, "xt": k * gates["oml"].unsqueeze(-1), "ge": gates["ga"][..., -1], "p1": p1}
    if momentum:
        parts.update(yt=k * gates["yend"].unsqueeze(-1), ze=gates["z"][..., -1], ye=gates["yu"][..., -1], p2=p2)
    parts = {name: t for name, t in parts.items() if t is not None}
    if recurrence is not None:
        mats = [parts[name] for name in ("xt", "p1", "yt", "p2") if name in parts]
        work = mats[0].dtype
        for t in mats[1:]:
            work = torch.promote_types(work, t.dtype)
        # tl.dot takes one dtype for the [n, ·] operands
        from .kernels.recurrence import operand_dtype, states_dtype

        work = operand_dtype(work, u.device)  # NLGRAPH_RECURRENCE_PRODUCTS
        kernel_in = {name: (t.to(work) if name in ("xt", "p1", "yt", "p2") else t) for name, t in parts.items()}
        starts = states_dtype(u.device)  # NLGRAPH_RECURRENCE_STATES
        if starts != torch.float32:
            kernel_in["states"] = starts
        # the chunk starts stay in the kernel's dtype: the reads below cast them for their products
        starts_w, starts_s, es, w_end, s_end = recurrence(w, s_buf, **kernel_in)
        w, s_buf = w_end.to(w.dtype), (s_end.to(s_buf.dtype) if momentum else None)
        es = es.to(u.dtype)
    elif _use_scan(loop, n_chunks):
        lead = w.shape[:2]
        names = list(parts)

        def scan_step(c, xs):
            w_c, s_c = c["w"], c.get("s")
            w_n, s_n, e = recurrence_step(w_c, s_c, **dict(zip(names, xs)))
            out = [w_c.reshape(*lead, -1), e.reshape(*lead, -1)]
            if momentum:
                out.insert(1, s_c.reshape(*lead, -1))
            dtype = torch.promote_types(e.dtype, w_c.dtype)  # the states keep their precision
            return ({"w": w_n, "s": s_n} if momentum else {"w": w_n}), torch.cat([o.to(dtype) for o in out], dim=-1)

        carry = {"w": w, "s": s_buf} if momentum else {"w": w}
        carry, ys = _scan(scan_step, carry, [parts[name].movedim(2, 0).contiguous() for name in names])
        w, s_buf = carry["w"], carry.get("s")
        ys = ys.movedim(0, 2)  # [B, H, C, ...]
        sizes = [w.shape[-2] * w.shape[-1]] * (2 if momentum else 1) + [n * u.shape[-1]]
        pieces = ys.split(sizes, dim=-1)
        starts_w = pieces[0].unflatten(-1, w.shape[-2:]).to(w.dtype)
        starts_s = pieces[1].unflatten(-1, w.shape[-2:]).to(w.dtype) if momentum else None
        es = pieces[-1].unflatten(-1, (n, u.shape[-1])).to(u.dtype)
    else:
        per_chunk = {name: t.unbind(2) for name, t in parts.items()}  # unbind, not an index a chunk
        ws, ss, es_ = [], [], []
        for c in range(n_chunks):
            ws.append(w)
            ss.append(s_buf)
            w, s_buf, e = recurrence_step(w, s_buf, **{name: t[c] for name, t in per_chunk.items()})
            es_.append(e)
        starts_w = torch.stack(ws, dim=2)
        starts_s = torch.stack(ss, dim=2) if momentum else None
        es = torch.stack(es_, dim=2)
    # the reads' rows: the state before each token's write, or after it
    ra, rz, rm = (gates["ga"], gates["z"], gates["om"]) if after else (gates["gp"], gates["zp"], gates["omp"])

    low = autocast_dtype(q.device.type)

    def read(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        # x stateᵀ taken as (state xᵀ)ᵀ: the chunk starts' gradient then comes out in their own
        # [O, I] layout, not as a transposed view that the recurrence's backward copied again (two
        # strided copies of [B, H, C, O, I] float32 a state). Under autocast the state (and E
        # below) goes straight to autocast's dtype, not widened to the queries' float32 first
        return (state.to(low or q.dtype) @ x.transpose(-1, -2)).transpose(-1, -2)

    from .kernels.recurrence import online_reads, reads_in_kernel

    if recurrence is not None and reads_in_kernel(n, starts_w.shape[-2], q.shape[-1]):  # NLGRAPH_RECURRENCE_READS
        work = low or torch.promote_types(q.dtype, k.dtype)
        out = online_reads(q.to(work), k.to(work), ra, rz, rm, starts_w, starts_s, es).to(low or q.dtype)
    else:
        out = read(q * ra.unsqueeze(-1), starts_w)
        if momentum:
            out = out + read(q * rz.unsqueeze(-1), starts_s)
        out = out - ((q @ k.transpose(-1, -2)) * rm) @ es.to(low or q.dtype)
    if origin is not None:
        out = out + q @ origin.unsqueeze(2).transpose(-1, -2).to(q.dtype)
    return out.flatten(2, 3), (w if origin is None else w + origin), s_buf


def _online(run: LevelRun, chunk_size: int, loop: str, recurrence=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    T = run.shape[1]
    w = run.state["memory.w0"]
    momentum = run.optimizer.uses_momentum
    s_buf = run.state["optimizer.memory.momentum.w0"] if momentum else None
    origin = run.state["origin.memory.w0"] if run.has_origin else None
    inputs = _Inputs(run)
    outs, start = [], 0
    full = T // chunk_size
    channel = isinstance(run.alpha, torch.Tensor) and run.alpha.dim() == 4
    if full and ONLINE_FULL and not channel:
        out, w, s_buf = _online_full(run, inputs, full, chunk_size, w, s_buf, origin, loop, recurrence)
        outs.append(out)
        full = 0
        start = T // chunk_size * chunk_size
    if _use_scan(loop, full):

        def step(c, chunk):
            out, w, s = _online_chunk(run, chunk, c["w"], c.get("s"), c.get("o"))
            new = {"w": w, "s": s} if momentum else {"w": w}
            if "o" in c:  # W_0 rides along unchanged: a constant of the step, not a closure
                new["o"] = c["o"]
            return new, out

        carry = {"w": w, "s": s_buf} if momentum else {"w": w}
        if origin is not None:
            carry["o"] = origin
        carry, out = inputs.scan(step, carry, 0, full, chunk_size)
        w, s_buf = carry["w"], carry.get("s")
        outs.append(out)
        start = full * chunk_size
    pieces = inputs.split([(s, min(T, s + chunk_size)) for s in range(start, T, chunk_size)])
    for s in range(start, T, chunk_size):
        out, w, s_buf = _online_chunk(run, pieces[s], w, s_buf, origin)
        outs.append(out)
    state = dict(run.state)
    state["position"] = run.state["position"] + T
    state["memory.w0"] = w
    if origin is not None:
        state["origin.memory.w0"] = origin
    if momentum:
        state["optimizer.memory.momentum.w0"] = s_buf
    return _outputs(outs, run), state


def _outputs(outs: list[torch.Tensor], run: LevelRun) -> torch.Tensor:
    """Chunk reads ``[B, H, n, D_v]`` → ``[B, T, H, D_v]`` (an empty sequence gives T = 0)."""
    if not outs:
        b, _, h = run.shape
        return run.values.data.new_zeros(b, 0, h, run.memories["memory"].d_out)
    return torch.cat(outs, dim=2).transpose(1, 2)


def _minibatch_chunk(run: LevelRun, chunk: _Chunk, lin: dict[str, Params], committed: dict[str, Params],
                     working: dict[str, Params], buffers: dict[str, Params], commits: bool,
                     origin: dict[str, Params] | None = None, walk=None):
    """One segment of the mini-batch form: gradients at ``lin`` (the anchor, or the committed
    parameters), every slot's recurrence solved from ``working`` and the optimizer ``buffers``;
    reads through the per-token weights, or of ``committed`` while updates are pending
    (``commits``: the segment ends a period, so its last token reads the new state), or of ``lin``
    with ``read: chunk_start``. ``origin``: every slot's ``W_0`` (retention toward the initial
    state). ``walk``: DGD's recurrences through the chunk-walk kernel (:func:`_walked`) instead of
    :func:`solve_chunk`.

    Returns ``(reads [B, H, n, D_v], working, buffers)`` at the segment's end."""
    main = run.memories["memory"]
    momentum = run.optimizer.uses_momentum
    dgd = run.optimizer.kind == "dgd"
    buffers = dict(buffers)
    q, k, v = (_stream(run, role, chunk, lin) for role in ("queries", "keys", "values"))
    lr, alpha, mu = (_rate(run, role, chunk, lin) for role in ("lr", "alpha", "mu"))
    n = k.shape[-2]
    # the reads walk the memory's per-token weights only for rolling reads; DGD's erase couples every
    # token to the earlier ones. Other slots need just the chunk's end state, which the last rows of
    # the transfer products give without the [n+1, n+1] matrices (what makes large chunks pay).
    walks = not (run.read == "chunk_start" or run.has_pending)
    products: dict[str, tuple] = {}

    def full():
        if "full" not in products:
            products["full"] = (*_decays(alpha, n, k), transfer(mu, False) if momentum else None)
        return products["full"]

    def last():
        if "last" not in products:
            products["last"] = chunk_rows(alpha, mu if momentum else None, n, k)
        return products["last"]

    sols: dict[str, tuple[ChunkSolution, int]] = {}
    out = None
    new_working: dict[str, Params] = {}
    for group in run.groups:
        # the group's slots share one architecture: their parameters are stacked on a leading slot
        # axis [S, B, H, ...] and every layer's recurrence of all of them is solved at once
        mem = run.memories[group[0]]
        at = _stack([lin[s] for s in group])
        work = _stack([working[s] for s in group])
        bufs = _stack([buffers[s] for s in group]) if momentum else None
        orig = _stack([origin[s] for s in group]) if origin is not None else None
        target = mem.forward(at, v) if run.self_target else v
        inputs, deltas = _local_errors(mem, at, k, target, run)
        if dgd and run.optimizer.gain:
            deltas = gain_normalized(mem, at, k, deltas)
        params: Params = {}
        moms: Params = {}

        def keep(layer, w_end, s_end):
            if layer.bias is not None:
                params[layer.weight], params[layer.bias] = w_end[..., :-1], w_end[..., -1]
                if momentum:
                    moms[f"momentum.{layer.weight}"], moms[f"momentum.{layer.bias}"] = s_end[..., :-1], s_end[..., -1]
            else:
                params[layer.weight] = w_end
                if momentum:
                    moms[f"momentum.{layer.weight}"] = s_end

        walkable = dgd and walk is not None and (alpha is None or alpha.dim() == 3)
        # with the chunk walk the memory slot reads inside its group's walks, one layer after
        # another as the memory reads (a layer's queries are the previous one's reads)
        reading = walkable and walks and "memory" in group
        steps: dict[str, tuple] = {}
        for layer in mem.layers:
            x, w0 = inputs[layer.weight], work[layer.weight]
            s0 = bufs[f"momentum.{layer.weight}"] if momentum else None
            o0 = orig[layer.weight] if orig is not None else None
            if layer.bias is not None:
                x = _augment(x)
                w0 = torch.cat([w0, work[layer.bias].unsqueeze(-1)], dim=-1)
                if o0 is not None:
                    o0 = torch.cat([o0, orig[layer.bias].unsqueeze(-1)], dim=-1)
                if momentum:
                    s0 = torch.cat([s0, bufs[f"momentum.{layer.bias}"].unsqueeze(-1)], dim=-1)
            if dgd:
                eta = lr / (1.0 + lr * x.square().sum(-1)) if run.optimizer.proximal else lr
                coef = eta
            else:
                eta, coef = lr, None
            f = eta.unsqueeze(-1) * deltas[layer.weight]
            if walkable:
                step = (w0, s0, x, _erase(x, alpha, run), coef, f, alpha, mu if momentum else None, o0)
                if reading:
                    steps[layer.weight] = (layer, step)
                    continue
                w_end, s_end = _walked(walk, *step)[1:]
            elif dgd or (walks and "memory" in group):
                g, channel, y = full()
                sol = solve_chunk(w0, s0, x, _erase(x, alpha, run), coef, f, g, y, channel, o0)
                if "memory" in group:
                    sols[layer.weight] = (sol, group.index("memory"))
                w_end, s_end = sol.end()
            else:  # without an erase the written errors are the forcing itself (module docstring)
                w_end, s_end = _chunk_end(w0 if o0 is None else w0 - o0, s0, x, f, last(), o0)
            keep(layer, w_end, s_end)
        if reading:
            slot = group.index("memory")

            def read_walk(layer, h):
                layer, step = steps.pop(layer.weight)
                rd, w_end, s_end = _walked(walk, *step, u=_augment(h) if layer.bias is not None else h,
                                           before=run.read_before, slot=slot)
                keep(layer, w_end, s_end)
                return rd

            out = main.forward_with(q, read_walk)
            assert not steps, f"the memory's read did not pass through {sorted(steps)}"
        # unbind, not an index per slot: its backward is one stack, where each index would zero-fill
        # a gradient of the whole stack
        per_param = {p: t.unbind(0) for p, t in params.items()}
        per_mom = {n: t.unbind(0) for n, t in moms.items()}
        for i, slot in enumerate(group):
            new_working[slot] = {p: t[i] for p, t in per_param.items()}
            if momentum:
                buffers[slot] = {**buffers[slot], **{n: t[i] for n, t in per_mom.items()}}
    if run.read == "chunk_start" or run.has_pending:
        out = _period_reads(run, q, lin, committed, new_working, commits)
    elif out is None:  # not read inside the chunk walk

        def apply(layer, x):
            sol = sols[layer.weight][0].pick(sols[layer.weight][1])
            return sol.read(_augment(x) if layer.bias is not None else x, run.read_before)

        out = main.forward_with(q, apply)
    return out, new_working, buffers


def _walked(walk, w0: torch.Tensor, s0: torch.Tensor | None, x: torch.Tensor, erase: torch.Tensor,
            b: torch.Tensor, f: torch.Tensor, alpha: torch.Tensor | None, mu: torch.Tensor | None,
            origin: torch.Tensor | None, u: torch.Tensor | None = None, before: bool = True,
            slot: int | None = None):
    """:func:`solve_chunk`'s chunk through ``walk`` (``chunk_walk``), the leading axes (``[S, B, H]``
    or ``[B, H]``; gates broadcast against them) flattened: ``(reads [..., n, o] or None, W_n, S_n)``.
    ``alpha``, ``mu``: per-head gates ``[..., n]`` (``None``: no retention, no momentum). With
    ``slot``, only that slot of the stack reads: ``u`` and the reads are ``[B, H, n, ·]``."""
    w0_origin = origin
    if origin is not None:  # the deviation from W_0, as solve_chunk
        w0 = w0 - origin
        f = f + b.unsqueeze(-1) * (x @ origin.transpose(-1, -2))
    lead = w0.shape[:-2]
    n = x.shape[-2]

    def flat(t, tail):
        if t is None:
            return None
        shape = t.shape[t.dim() - tail:]
        return t.expand(*lead, *shape).reshape(-1, *shape)

    rows, reader = None, lead
    if slot is not None and u is not None:  # the slot's rows of the flattened [S, B, H]
        reader = lead[1:]
        per = math.prod(reader)
        rows = (slot * per, (slot + 1) * per)
        origin = origin[slot] if origin is not None else None
    uf = None if u is None else u.expand(*reader, *u.shape[-2:]).reshape(-1, *u.shape[-2:])
    xf = flat(x, 2)
    # Titans' order erases along the input itself: one flattened copy (x is expanded over the slots
    # for the first layer, so each flat() is a copy)
    ef = xf if erase is x else flat(erase, 2)
    rd, w, s = walk(flat(w0, 2), flat(s0, 2), xf, ef, flat(b, 1), flat(f, 2), flat(alpha, 1),
                    flat(mu, 1), uf, "none" if u is None else ("before" if before else "after"), rows)
    w = w.view(lead + w.shape[-2:])
    out = None
    if rd is not None:  # in the dtype the chunked form's read has: autocast's, else the inputs'
        out = rd.view(*reader, n, -1).to(_product_dtype(u, f))
        if origin is not None:
            out = out + u @ origin.transpose(-1, -2).to(u.dtype)
    if w0_origin is not None:
        w = w + w0_origin
    return out, w.to(w0.dtype), (s.view(s0.shape).to(s0.dtype) if s is not None else None)


def _states(f: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, last: bool = False,
            channel: bool = False) -> torch.Tensor:
    """Every state of ``s_r = f_r s_{r−1} + x_r`` over a chunk, from ``s_0 = x0``: ``f [..., n]``
    (per-token factors, broadcast against ``x``'s leading axes), ``x [..., n, P]``, ``x0 [..., P]``
    → ``[..., n, P]`` (``s_1 .. s_n``), or only ``s_n`` as ``[..., 1, P]`` when ``last``. One matmul
    with the chunk's :func:`transfer` products. With ``channel``, ``f [..., n, D]`` scales the key
    channels of a matrix ``[O, D]`` flattened into ``P = O·D`` (a per-channel retention)."""
    g = transfer(f, channel)
    rows = slice(-1, None) if last else slice(1, None)
    if channel:
        d = f.shape[-1]
        xs = x.unflatten(-1, (-1, d)).movedim(-1, -3)  # [..., D, n, O]
        body = (g[..., rows, 1:, :].to(x.dtype).movedim(-1, -3) @ xs).movedim(-3, -1)  # [..., r, O, D]
        head = g[..., rows, 0, :].unsqueeze(-2) * x0.unflatten(-1, (-1, d)).unsqueeze(-3)
        return (body + head).flatten(-2).to(x0.dtype)
    # the products meet x in x's dtype (without autocast a matmul takes one dtype); the result is
    # in the state's dtype, which float32 factors or bias corrections would otherwise promote
    out = g[..., rows, 1:].to(x.dtype) @ x + g[..., rows, 0:1] * x0.unsqueeze(-2)
    return out.to(x0.dtype)


def _constant(value: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """``value`` per token, in float32 at least: in bfloat16 β₂ = 0.999 rounds to 1 (no decay) and
    0.9 to 0.898 (under autocast the gradients ``like`` are bfloat16)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.full((n,), value, dtype=dtype, device=like.device)


def _mapped_updates(run: LevelRun, grads: Params, bufs: Params, step0: torch.Tensor | None,
                    lr: torch.Tensor, shapes: dict[str, tuple[int, ...]]):
    """The adam / muon update of every token of a chunk from its gradients ``g_t`` (all at the
    linearisation point, so known at once): the buffers are linear recurrences with constant
    coefficients (:func:`_states`) and the update a per-token map of them (elementwise for adam,
    a batched Newton–Schulz for muon).

    ``grads``: name → ``[S, B, H, n, P]`` (flattened parameter); ``bufs``: buffer name →
    ``[S, B, H, P]``; ``lr [B, H, n]``. Returns ``(u, wd, new_bufs)``: ``u`` name → ``[S, B, H, n, P]``
    with ``Δ_t = u_t − wd_t ⊙ W`` (``wd [B, H, n]`` or ``None``), and the buffers after the chunk."""
    opt = run.optimizer
    n = lr.shape[-1]
    eta = lr.unsqueeze(-1)  # [B, H, n, 1]
    u: Params = {}
    new: Params = {}
    if opt.kind == "adam":
        b1, b2 = opt.betas
        # the bias corrections in float32 at least: 1 − β₂ᵗ is small for the first steps
        steps = (step0 + torch.arange(1, n + 1, device=lr.device)).to(
            torch.promote_types(lr.dtype, torch.float32)).unsqueeze(-1)  # [n, 1]
        if opt.bias_correction:
            bc1, bc2 = 1 - b1**steps, (1 - b2**steps).sqrt()
        else:
            bc1 = bc2 = torch.ones_like(steps)
        for name, g in grads.items():
            m = _states(_constant(b1, n, g), (1 - b1) * g, bufs[f"exp_avg.{name}"])
            v = _states(_constant(b2, n, g), (1 - b2) * g * g, bufs[f"exp_avg_sq.{name}"])
            u[name] = -(eta / bc1) * (m / (sqrt_second_moment(v) / bc2 + opt.eps))
            new[f"exp_avg.{name}"], new[f"exp_avg_sq.{name}"] = m[..., -1, :], v[..., -1, :]
        return u, None, new
    spec = opt.spec  # muon
    mu = spec.momentum
    for name, g in grads.items():
        buf = _states(_constant(mu, n, g), (1 - mu) * g, bufs[f"momentum.{name}"])
        new[f"momentum.{name}"] = buf[..., -1, :]
        update = (1 - mu) * g + mu * buf if spec.nesterov else buf
        shape = shapes[name]
        o = newton_schulz(update.unflatten(-1, shape), spec.ns_coefficients, spec.ns_steps, spec.eps,
                          opt.ns_dtype, batched=True).to(g.dtype).flatten(-2)
        u[name] = -(eta * opt._ratio(shape)) * o
    return u, (lr * spec.weight_decay if spec.weight_decay else None), new


def _mapped_chunk(run: LevelRun, chunk: _Chunk, lin: dict[str, Params], committed: dict[str, Params],
                  working: dict[str, Params], buffers: dict[str, Params], commits: bool,
                  origin: dict[str, Params] | None = None):
    """One segment of the mini-batch form for ``adam`` and ``muon``: the contract of
    :func:`_minibatch_chunk`. Their update is not linear in the gradients, so the per-token states
    are materialised instead of solved: every token's gradient ``g_t = δ_t x_tᵀ`` at ``lin``, the
    optimizer's buffers and updates ``u_t`` for all tokens at once (:func:`_mapped_updates`), and
    the weights ``W_t = a_t W_{t−1} + b_t W_0 + u_t`` by one matmul with the chunk's transfer
    products, where ``a_t, b_t`` fold in the retention (``decay`` scales the state before the
    optimizer reads it, ``weight_decay`` after; ``b`` is the pull toward the initial state ``W_0``)
    and muon's decoupled weight decay. Costs ``n`` copies of each memory per chunk."""
    main = run.memories["memory"]
    buffers = dict(buffers)
    q, k, v = (_stream(run, role, chunk, lin) for role in ("queries", "keys", "values"))
    lr, alpha = _rate(run, "lr", chunk, lin), _rate(run, "alpha", chunk, lin)
    n = k.shape[-2]
    per_token = run.read != "chunk_start" and not run.has_pending
    new_working: dict[str, Params] = {}
    weights: Params = {}  # the level memory's per-token weights [B, H, n, ...] for the reads
    for group in run.groups:
        mem = run.memories[group[0]]
        shapes = mem.shapes()
        at = _stack([lin[s] for s in group])
        work = _stack([working[s] for s in group])
        target = mem.forward(at, v) if run.self_target else v
        errors = _float_local_errors if run.optimizer.kind == "adam" else _local_errors
        inputs, deltas = errors(mem, at, k, target, run)
        grads: Params = {}
        for layer in mem.layers:
            grads[layer.weight] = (deltas[layer.weight].unsqueeze(-1) * inputs[layer.weight].unsqueeze(-2)).flatten(-2)
            if layer.bias is not None:
                grads[layer.bias] = deltas[layer.weight]
        bufs = {b: t.flatten(3) for b, t in _stack([{b: t for b, t in buffers[s].items() if b != "step"}
                                                     for s in group]).items()}
        step0 = buffers[group[0]].get("step")
        u, wd, new_bufs = _mapped_updates(run, grads, bufs, step0, lr, shapes)
        keep = alpha if run.retention is not None else torch.ones_like(lr)
        # a retention per key channel, [B, H, n, D] (a linear memory, given as a tensor or by a
        # `per: channel` gate): the per-head rates broadcast over its channel axis
        channel = keep.dim() > lr.dim()
        if wd is not None and channel:
            wd = wd.unsqueeze(-1)
        if run.retention == "decay":
            a = keep if wd is None else (1 - wd) * keep
        else:
            a = keep if wd is None else keep - wd
        pull = None
        if origin is not None:
            pull = 1 - keep if run.retention != "decay" or wd is None else (1 - wd) * (1 - keep)
            orig = _stack([origin[s] for s in group])
        ends: Params = {}
        for name, shape in shapes.items():
            x = u[name]
            if pull is not None:
                if channel:  # [B, H, n, 1, D] · [S, B, H, 1, O, D]
                    x = x + (pull.unsqueeze(-2) * orig[name].unsqueeze(-3)).flatten(-2)
                else:
                    x = x + pull.unsqueeze(-1) * orig[name].flatten(3).unsqueeze(-2)
            w0 = work[name].flatten(3)
            if per_token and "memory" in group:
                # every token's weights only for the level memory, which is read through them; the
                # other slots of the group (adaptive projections) need their end state only
                i = group.index("memory")
                states = _states(a, x[i], w0[i], channel=channel)  # [B, H, n, P]
                before = torch.cat([w0[i].unsqueeze(-2), states[..., :-1, :]], dim=-2)
                weights[name] = (before if run.read_before else states).unflatten(-1, shape)
                if len(group) == 1:
                    ends[name] = states[..., -1, :].unsqueeze(0)
                else:
                    rest = _states(a, x, w0, last=True, channel=channel).squeeze(-2)
                    ends[name] = torch.cat([rest[:i], states[..., -1, :].unsqueeze(0), rest[i + 1:]])
            else:
                ends[name] = _states(a, x, w0, last=True, channel=channel).squeeze(-2)
        per_param = {p: t.unflatten(-1, shapes[p]).unbind(0) for p, t in ends.items()}
        per_buf = {b: t.unbind(0) for b, t in new_bufs.items()}
        for i, slot in enumerate(group):
            new_working[slot] = {p: t[i] for p, t in per_param.items()}
            upd = {b: t[i].unflatten(-1, buffers[slot][b].shape[2:]) for b, t in per_buf.items()}
            if step0 is not None:
                upd["step"] = buffers[slot]["step"] + n
            buffers[slot] = {**buffers[slot], **upd}
    if per_token:

        def apply(layer, x):
            z = (weights[layer.weight] @ x.unsqueeze(-1)).squeeze(-1)
            return z + weights[layer.bias] if layer.bias is not None else z

        out = main.forward_with(q, apply)
    else:
        out = _period_reads(run, q, lin, committed, new_working, commits)
    return out, new_working, buffers


def _period_reads(run: LevelRun, q: torch.Tensor, lin, committed, new_working, commits: bool) -> torch.Tensor:
    """Reads that do not walk the per-token weights: at the chunk boundary (``read: chunk_start``)
    or, with a period, of the committed state (the last token of a committing segment reads after
    its write when ``read: after_write``)."""
    main = run.memories["memory"]
    if run.read == "chunk_start":
        # Eq. 90: the read is taken at the chunk boundary, with the gradients
        return main.forward(lin["memory"], q)
    # reads see the committed state, which moves only at the period's last token
    out = main.forward(committed["memory"], q)
    if not run.read_before and commits:
        last = main.forward(new_working["memory"], q[..., -1:, :])
        out = torch.cat([out[..., :-1, :], last], dim=-2)
    return out


def _minibatch(run: LevelRun, loop: str, walk=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    T = run.shape[1]
    slots = list(run.memories)
    committed = {s: run.params("", s) for s in slots}
    if run.has_pending:
        pend = {s: run.params("pending", s) for s in slots}
        working = {s: {p: committed[s][p] + pend[s][p] for p in committed[s]} for s in slots}
    else:
        working = dict(committed)
    anchor = {s: run.params("anchor", s) for s in slots} if run.has_anchor else None
    buffers = {s: run.buffers(s) for s in slots}
    origin = {s: run.params("origin", s) for s in slots} if run.has_origin else None
    if origin is not None and not torch.compiler.is_compiling():
        # W_0 of a group of slots as the views of one stack, which this and the level's later calls
        # (through the returned state) then use without stacking it again per chunk
        for group in run.groups:
            if len(group) > 1:
                for p, t in _stack([origin[s] for s in group]).items():
                    for s, view in zip(group, t.unbind(0)):
                        origin[s] = {**origin[s], p: view}
    inputs = _Inputs(run)
    segments = schedule(run.position, T, run.chunk)
    # A scan runs full chunks that each start where committed = working = anchor, the same step
    # each time: gradients and reads at the carried parameters, and a chunk that ends on a chunk
    # boundary, which is a period boundary too (the period is 1 or the chunk), so it commits and
    # re-anchors. Every segment after the first but a partial last one is such a chunk. So is the
    # first when it is a full chunk with nothing pending (period 1) whose anchor is the committed
    # parameters themselves (a fresh sequence, or one continued from a chunk boundary); otherwise
    # (inside a chunk, from pending updates or an anchor of its own) it runs in Python.
    chunk_fn = _mapped_chunk if run.optimizer.kind in MAPPED else _minibatch_chunk
    extra = {"walk": walk} if walk is not None and chunk_fn is _minibatch_chunk else {}
    shared = not run.has_pending and (
        anchor is None or all(anchor[s][p] is committed[s][p] for s in slots for p in committed[s]))
    full = [i for i, (s, e) in enumerate(segments) if e - s == run.chunk and (i > 0 or shared)]
    # adam's step count is a 0-d integer buffer, which the scan's packed [B, H, ...] carry cannot hold
    scannable = run.optimizer.kind != "adam"
    start = full[0] if scannable and _use_scan(loop, len(full)) else -1
    # every segment as one split (the scanned ones go unused: their gradient is zeros in one cat)
    pieces = inputs.split(segments) if start < 0 or len(full) < len(segments) else {}
    outs, i = [], 0
    while i < len(segments):
        if i == start:

            def step(c, chunk):
                w = c["working"]
                out, w, b = chunk_fn(run, chunk, w, w, w, c["buffers"], True, c.get("origin"), **extra)
                new = {"working": w, "buffers": b}
                if "origin" in c:  # W_0 rides along unchanged: a constant of the step, not a closure
                    new["origin"] = c["origin"]
                return new, out

            carry = {"working": working, "buffers": buffers}
            if origin is not None:
                carry["origin"] = origin
            carry, out = inputs.scan(step, carry, segments[i][0], len(full), run.chunk)
            outs.append(out)
            committed = working = carry["working"]
            buffers = carry["buffers"]
            if anchor is not None:
                anchor = working
            i += len(full)
            continue
        s, e = segments[i]
        end = run.position + e
        lin = anchor if anchor is not None else committed
        out, working, buffers = chunk_fn(run, pieces[s], lin, committed, working, buffers,
                                         end % run.period == 0, origin, **extra)
        outs.append(out)
        if not run.has_pending or end % run.period == 0:
            committed = working
        if anchor is not None and end % run.chunk == 0:
            anchor = working
        i += 1
    return _outputs(outs, run), final_state(run, committed, working, anchor, buffers, T, origin)


def _static(run: LevelRun) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    main = run.memories["memory"]
    q = _stream(run, "queries", _Inputs(run).chunk(0, run.shape[1]), {s: run.params("", s) for s in run.memories})
    state = dict(run.state)
    state["position"] = run.state["position"] + run.shape[1]
    return main.forward(run.params("", "memory"), q).transpose(1, 2), state


@register_form("memory", "chunked", priority=10, supports=why_not_chunked)
def run_chunked(
    run: LevelRun, chunk_size: int | None = None, loop: str | None = None, recurrence=None, walk=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Execute ``run`` in parallel chunks. Returns ``(outputs [B, T, H, D_v], state)``.

    Args:
        chunk_size: implementation chunk of the online form (default 64); the mini-batch form
            chunks at the level's own gradient-point boundaries.
        loop: how to step through the chunks — ``"python"``, ``"scan"`` or ``"auto"``; ``None``
            takes the module default :data:`LOOP` (``"auto"``). Results are the same either way.
            A Python loop is what eager wants, but ``torch.compile`` unrolls it: the graph holds
            one copy of the chunk's maths per chunk, and compile time grows with ``T / chunk``
            (minutes for HOPE at T = 256, chunk 16). ``scan`` traces the chunk once and loops in
            the graph; ``auto`` uses it while compiling, for at least :data:`MIN_SCAN_CHUNKS`
            full chunks. In eager, torch's scan compiles its body on every call, so ``auto``
            keeps the Python loop there. What scans: the online form's full chunks, and the
            mini-batch form's full chunks from the first that starts where the committed, working
            and anchor parameters are one (the first chunk of a fresh sequence of a ``frequency:
            1`` level, else the second segment). A first segment inside a chunk, or with pending
            updates (a period), and a partial last chunk run in Python, so a graph holds at most
            three copies of the chunk's maths.
        recurrence: the online form's state recurrence as a kernel (the ``triton`` form passes
            ``nlgraph.compilers.kernels.recurrence.online_recurrence``); ``None``: in PyTorch.
        walk: the mini-batch form's DGD recurrences as a kernel, a chunk and layer at a time (the
            ``triton`` form passes ``nlgraph.compilers.kernels.chunk_walk.chunk_walk``); ``None``:
            :func:`solve_chunk`'s triangular solve in PyTorch.
    """
    why = why_not_chunked(run.spec)
    if why is not None:
        raise ValueError(f"the chunked form cannot run this level: {why}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    loop = LOOP if loop is None else loop
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if run.period is None:
        return _static(run)
    if run.online:
        return _online(run, chunk_size or DEFAULT_CHUNK, loop, recurrence)
    return _minibatch(run, loop, walk)
