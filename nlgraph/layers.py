"""The outer-level building blocks around the levels: streams (projection, short convolution,
feature map, normalisation), gates, MLPs, softmax attention and norms.

Every module that carries information across tokens takes and returns an explicit streaming state,
so a sequence fed in segments gives the same outputs as one pass. Shapes: tokens ``[B, T]``,
residual stream ``[B, T, C]``, per-head tensors ``[B, T, H, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .levels.gates import scaled
from .levels.memories import _activation
from .spec.schema import AttentionSpec, GateSpec, MlpMemorySpec, StreamSpec, resolve_width

__all__ = ["Attention", "Gate", "Mlp", "ShortConv", "Stream", "make_norm", "rotary"]


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight follows the input's dtype: under bf16 autocast a bf16 input with
    the fp32 master weight would leave torch's fused kernel for the slow composite path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, w, self.eps)


def make_norm(kind: str, width: int, eps: float = 1e-6) -> nn.Module:
    """``rms`` → RMSNorm, ``layer`` → LayerNorm, ``none`` → identity."""
    if kind == "rms":
        return RMSNorm(width, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(width, eps=eps)
    return nn.Identity()


class ShortConv(nn.Module):
    """Causal depthwise convolution over time with kernel ``k``.

    ``forward(x [B, T, C], state [B, k-1, C] | None) -> (y [B, T, C], state [B, k-1, C])``; the
    state holds the last ``k - 1`` inputs so segments chain exactly.
    """

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        # start near the identity (weight on the current token) so a fresh model is well behaved
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02)
            self.weight[:, -1] += 1.0

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, act: str = "identity",
                l2: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``act`` (``identity`` or ``silu``) is applied to the output, then, with ``l2 = D``, each
        head's ``D`` channels are divided by their norm (``F.normalize``, eps 1e-6): fused into the
        Triton kernel where it runs (CUDA tensors, float32 / bfloat16 / float16, kernels on)."""
        b, t, c = x.shape
        if _conv_kernel_runs(x):
            from .compilers.kernels.short_conv import short_conv

            y = short_conv(x, self.weight, state, act, l2)
            if t >= self.kernel - 1:
                return y, x[:, t - (self.kernel - 1):]
            prev = state if state is not None else x.new_zeros(b, self.kernel - 1, c)
            return y, torch.cat([prev.to(x.dtype), x], dim=1)[:, t:]
        if state is None:
            state = x.new_zeros(b, self.kernel - 1, c)
        xp = torch.cat([state, x], dim=1)  # [B, k-1+T, C]
        y = _feature_map(act, F.conv1d(xp.transpose(1, 2), self.weight.unsqueeze(1), groups=c).transpose(1, 2))
        if l2 is not None:
            from .compilers.kernels.short_conv import normalize_heads

            y = normalize_heads(y, l2)
        return y, xp[:, xp.shape[1] - (self.kernel - 1):]


def _conv_kernel_runs(x: torch.Tensor) -> bool:
    """Whether :func:`nlgraph.compilers.kernels.short_conv.short_conv` takes ``x``: the kernel mode
    (``NLGRAPH_KERNELS``) allows its device, and its dtype is one the kernel computes exactly
    (float64 stays in PyTorch; so does bfloat16 on CPU, which Triton's interpreter gets wrong)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.shape[1] == 0:
        return False
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return False
    from .compilers.kernels.dispatch import why_no_kernel

    return why_no_kernel(x.device) is None


def _feature_map(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "identity":
        return x
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "elu1":
        return 1.0 + F.elu(x)
    if name == "exp":
        return torch.exp(x)
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    raise ValueError(f"unknown feature map {name!r}")


#: an entry's projections share one 16-bit copy of each input (:class:`MatmulInputs`); False leaves
#: each autocast matmul to cast its own, as before 2026-12-07 (``benchmarks/profile_layer.py
#: --separate-casts`` times both)
SHARE_CASTS = True


class _CastCopy(torch.autograd.Function):
    """``low``, a 16-bit copy of ``t`` made once, handed to one consumer with a gradient path of its
    own back to ``t``: each consumer's gradient is widened to ``t``'s dtype before autograd adds them
    at ``t``, in float32, as the per-matmul casts it replaces did (one shared cast would have its
    gradients summed in 16 bits first)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        ctx.dtype = t.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class MatmulInputs:
    """Each tensor an entry projects, cast once to autocast's 16-bit dtype (the same value every
    projection's autocast cast gives it), shared by all the entry's projections of that tensor in
    one call. Each autocast matmul casts its float32 input itself, and inductor kept the casts apart:
    Gated DeltaNet's layer wrote five bf16 copies of its input in one kernel (0.042 ms of its 0.39
    ms forward on an H100 at B=8, T=2048, d_model 512; docs/benchmarks.md), each then saved for the
    backward. The gradients are those of the separate casts (:class:`_CastCopy`). Without autocast,
    or for a tensor already in 16 bits, the tensor itself."""

    def __init__(self) -> None:
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        from nlgraph.compilers.chunked import autocast_dtype  # here: not on `import nlgraph.layers`'s path

        low = autocast_dtype(t.device.type) if SHARE_CASTS and t.dtype == torch.float32 else None
        if low not in (torch.float16, torch.bfloat16):
            return t
        copy = next((c for src, c in self._seen if src is t), None)
        if copy is None:
            copy = t.detach().to(low)
            self._seen.append((t, copy))
        return _CastCopy.apply(t, copy) if t.requires_grad else copy


class Stream(nn.Module):
    """A level's keys, values or queries: ``x [B, T, C_in] -> [B, T, H, D]``.

    Projection (unless ``project: false``), causal short convolution, feature map, then a per-head
    norm (``l2`` or ``rms``), in that order.
    """

    def __init__(self, spec: StreamSpec, width_in: int, heads: int, d_head: int) -> None:
        super().__init__()
        self.spec, self.heads, self.d_head = spec, heads, d_head
        width = heads * d_head
        self.proj = nn.Linear(width_in, width, bias=False) if spec.project else None
        self.conv = ShortConv(width, spec.conv) if spec.conv > 1 else None
        self.norm_weight = nn.Parameter(torch.ones(d_head)) if spec.norm == "rms" else None

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = self.proj(x) if self.proj is not None else x
        new_state = None
        fm = self.spec.feature_map
        normed = False
        if self.conv is not None and fm in ("identity", "silu"):
            # the activation, and an L2 norm, fused into the convolution
            normed = self.spec.norm == "l2"
            y, new_state = self.conv(y, state, act=fm, l2=self.d_head if normed else None)
        else:
            if self.conv is not None:
                y, new_state = self.conv(y, state)
            y = _feature_map(fm, y)
        y = y.unflatten(-1, (self.heads, self.d_head))
        if self.spec.norm == "l2" and not normed:
            y = F.normalize(y, dim=-1, eps=1e-6)
        elif self.spec.norm == "rms":
            y = F.rms_norm(y, (self.d_head,), self.norm_weight, eps=1e-6)
        return y, new_state


class Gate(nn.Module):
    """A data-dependent rate: ``x [B, T, C_in] -> [B, T, H]`` (``per: head``), ``[B, T, H, D]``
    (``per: channel``) or ``[B, T, 1]`` (``per: scalar``), equal to ``scale * act(W x + b)``.

    ``logsigmoid`` gates are returned exponentiated (a factor in (0, 1)), because the runtime takes
    activated values; their ``scale`` acts in log space (``sigmoid^scale``).
    """

    def __init__(self, spec: GateSpec, width_in: int, heads: int, d_head: int) -> None:
        super().__init__()
        self.spec, self.heads, self.d_head = spec, heads, d_head
        out = {"scalar": 1, "head": heads, "channel": heads * d_head}[spec.per]
        self.proj = nn.Linear(width_in, out, bias=True)
        with torch.no_grad():
            self.proj.weight.normal_(0.0, 0.02)
            self.proj.bias.fill_(spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.proj(x))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The gate from its projection ``pre = W x + b`` (``[B, T, out]``): what :meth:`forward`
        returns, for a caller that projected several gates' inputs in one matmul."""
        y = scaled(self.spec.act, pre, self.spec.scale)
        if self.spec.per == "channel":
            return y.unflatten(-1, (self.heads, self.d_head))
        return y


class Mlp(nn.Module):
    """A static MLP ``x [B, T, C] -> [B, T, C_out]`` from an ``mlp`` memory spec (the Transformer++
    feed-forward block when ``activation: swiglu``)."""

    def __init__(self, spec: MlpMemorySpec, width_in: int, width_out: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        width_out = width_out or width_in
        hidden = resolve_width(spec.hidden, width_in)
        dims = [width_in] + [hidden] * (spec.depth - 1) + [width_out]
        self.gated = spec.activation in ("swiglu", "geglu")
        self.layers = nn.ModuleList(
            nn.Linear(a, b * (2 if self.gated and i < len(dims) - 2 else 1), bias=spec.bias)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.hidden(x)
        return x

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The non-linearity after a hidden layer (a gated one halves the width)."""
        if self.gated:
            a, g = x.chunk(2, dim=-1)
            return a * (F.silu(g) if self.spec.activation == "swiglu" else F.gelu(g))
        return _activation(self.spec.activation, x)


def rotary(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of ``x [B, H, T, D]`` at absolute positions ``pos [T]``."""
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-torch.arange(0, half, device=x.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out, x[..., 2 * half :]], dim=-1) if d % 2 else out


class Attention(nn.Module):
    """Softmax attention as a non-parametric level: causal, optionally sliding-window, with rotary
    positions, grouped-query heads, QK-norm and learned persistent tokens (Titans).

    ``forward(x [B, T, C], state) -> (y [B, T, C], state)``; the state is a KV cache
    (``k``, ``v`` ``[B, Hkv, S, D]`` and the absolute position ``pos``), trimmed to the window for
    sliding-window attention so generation runs in constant memory.
    """

    def __init__(self, spec: AttentionSpec, width: int) -> None:
        super().__init__()
        self.spec = spec
        self.heads = spec.heads
        self.kv_heads = spec.kv_heads or spec.heads
        self.d_head = spec.d_head or width // spec.heads
        # role -> the level whose output (same token, same block) it reads instead of the input
        self.reads = {r: getattr(spec, r).from_ for r in ("keys", "values", "queries")
                      if getattr(spec, r).from_ != "input"}
        if "self" in self.reads.values():
            raise ValueError("attention cannot read 'self': its output at a token needs that token's "
                             "keys; read from input or an earlier level")
        self.q = Stream(spec.queries, width, self.heads, self.d_head)
        self.k = Stream(spec.keys, width, self.kv_heads, self.d_head)
        self.v = Stream(spec.values, width, self.kv_heads, self.d_head)
        self.out = nn.Linear(self.heads * self.d_head, width, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.d_head, eps=1e-6)
            self.k_norm = RMSNorm(self.d_head, eps=1e-6)
        n = spec.persistent_tokens
        self.persistent_k = nn.Parameter(torch.randn(self.kv_heads, n, self.d_head) * 0.02) if n else None
        self.persistent_v = nn.Parameter(torch.randn(self.kv_heads, n, self.d_head) * 0.02) if n else None

    def forward(self, x: torch.Tensor, state: dict | None = None,
                sources: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """``sources``: outputs ``[B, T, C]`` of earlier levels of the block, by name, for the
        streams that read another level instead of the input."""
        b, t, _ = x.shape
        state = state or {}
        src = lambda role: sources[self.reads[role]] if role in self.reads else x  # noqa: E731
        cast = MatmulInputs()
        inputs = {role: (cast(src(role)) if stream.proj is not None else src(role))
                  for role, stream in (("queries", self.q), ("keys", self.k), ("values", self.v))}
        q, sq = self.q(inputs["queries"], state.get("conv_q"))
        k, sk = self.k(inputs["keys"], state.get("conv_k"))
        v, sv = self.v(inputs["values"], state.get("conv_v"))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        if self.spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        start = state.get("pos", torch.zeros((), dtype=torch.long, device=x.device))
        pos = start + torch.arange(t, device=x.device)
        if self.spec.rotary:
            q = rotary(q, pos, self.spec.rope_base)
            k = rotary(k, pos, self.spec.rope_base)
        past_k, past_v = state.get("k"), state.get("v")
        kk = k if past_k is None else torch.cat([past_k, k], dim=2)
        vv = v if past_v is None else torch.cat([past_v, v], dim=2)
        s = kk.shape[2]
        kpos = (start + t - s) + torch.arange(s, device=x.device)  # absolute positions of kk
        mask = kpos[None, :] <= pos[:, None]
        if self.spec.window is not None:
            mask = mask & (kpos[None, :] > pos[:, None] - self.spec.window)
        if self.persistent_k is not None:
            n = self.persistent_k.shape[1]
            pk = self.persistent_k.unsqueeze(0).expand(b, -1, -1, -1).to(kk.dtype)
            pv = self.persistent_v.unsqueeze(0).expand(b, -1, -1, -1).to(vv.dtype)
            kk_all, vv_all = torch.cat([pk, kk], dim=2), torch.cat([pv, vv], dim=2)
            mask = torch.cat([mask.new_ones(t, n), mask], dim=1)
        else:
            kk_all, vv_all = kk, vv
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            kk_all = kk_all.repeat_interleave(rep, dim=1)
            vv_all = vv_all.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, kk_all, vv_all, attn_mask=mask)
        y = self.out(y.transpose(1, 2).flatten(2))
        keep = kk.shape[2] if self.spec.window is None else min(kk.shape[2], self.spec.window - 1)
        new_state = {
            "k": kk[:, :, kk.shape[2] - keep:],
            "v": vv[:, :, vv.shape[2] - keep:],
            "pos": start + t,
        }
        for name, st in (("conv_q", sq), ("conv_k", sk), ("conv_v", sv)):
            if st is not None:
                new_state[name] = st
        return y, new_state
