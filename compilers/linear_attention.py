"""Execution forms of the closed-form ``kind: linear_attention`` entry.

The rule (M acts on column vectors, ``y = S q``)::

    S_t = S_{t−1} + v_t k_tᵀ,   z_t = z_{t−1} + k_t,
    y_t = S_t q_t                       (normalize: false)
    y_t = S_t q_t / (q_t · z_t + ε)     (normalize: true, Katharopoulos et al. 2020)

``reference`` applies it token by token. ``chunked`` is exact and loop-free: inside a chunk the
causal part is ``(Q Kᵀ ⊙ mask) V``; the state every chunk starts from is ``S_0`` plus an exclusive
prefix sum of the chunks' ``Vᵀ K``. The chunk size changes nothing but the cost.

Inputs ``keys / queries [B, T, H, D_k]``, ``values [B, T, H, D_v]`` (feature maps already applied;
bf16 / fp16 chunk products stay in their dtype, the running state is float32);
output ``[B, T, H, D_v]``. State: ``memory [B, H, D_v, D_k]``, ``normalizer [B, H, D_k]`` (with
``normalize``) and ``position`` (0-d int64, tokens consumed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlgraph.spec.schema import LinearAttentionSpec

from . import register_form

__all__ = ["EPS", "linear_attention_chunked", "linear_attention_reference"]

EPS = 1e-6
"""Added to the normaliser ``q · z`` so an all-zero prefix reads 0 instead of 0/0."""


def _setup(spec: LinearAttentionSpec, keys, values, queries, state):
    queries = keys if queries is None else queries
    for name, x in (("keys", keys), ("values", values), ("queries", queries)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a [B, T, H, D] tensor")
    b, _, h, dk = keys.shape
    dv = values.shape[-1]
    if values.shape[:3] != keys.shape[:3] or queries.shape != keys.shape:
        raise ValueError(f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and queries "
                         f"{tuple(queries.shape)} must agree on [B, T, H] (and queries on D_k)")
    if state is None:
        state = {"memory": keys.new_zeros(b, h, dv, dk),
                 "position": torch.zeros((), dtype=torch.int64, device=keys.device)}
        if spec.normalize:
            state["normalizer"] = keys.new_zeros(b, h, dk)
    want = {"memory", "position"} | ({"normalizer"} if spec.normalize else set())
    if set(state) != want:
        raise ValueError(f"linear_attention state has entries {sorted(state)}, expected {sorted(want)}")
    return queries, state


def _finish(spec, num, den, state, s, z, t_len):
    y = num / (den.unsqueeze(-1) + EPS) if spec.normalize else num
    new = {"memory": s, "position": state["position"] + t_len}
    if spec.normalize:
        new["normalizer"] = z
    return y, new


@register_form("linear_attention", "reference", priority=0)
def linear_attention_reference(spec: LinearAttentionSpec, *, keys, values, queries, state=None, **_):
    """Token by token, as the rule is written. Returns ``(y [B, T, H, D_v], state)``."""
    queries, state = _setup(spec, keys, values, queries, state)
    s, z = state["memory"], state.get("normalizer")
    nums, dens = [], []
    for t in range(keys.shape[1]):
        k, v, q = keys[:, t], values[:, t], queries[:, t]  # [B, H, D]
        s = s + v.unsqueeze(-1) * k.unsqueeze(-2)
        nums.append((s @ q.unsqueeze(-1)).squeeze(-1))
        if spec.normalize:
            z = z + k
            dens.append((q * z).sum(-1))
    num = torch.stack(nums, 1) if nums else values.new_zeros(values.shape)
    den = (torch.stack(dens, 1) if dens else keys.new_zeros(keys.shape[:3])) if spec.normalize else None
    return _finish(spec, num, den, state, s, z, keys.shape[1])


@register_form("linear_attention", "chunked", priority=10)
def linear_attention_chunked(spec: LinearAttentionSpec, *, keys, values, queries, state=None,
                             chunk_size: int | None = None, **_):
    """Exact chunkwise-parallel form (see the module docstring). ``chunk_size`` default 64."""
    queries, state = _setup(spec, keys, values, queries, state)
    t_len = keys.shape[1]
    if t_len == 0:
        return values.new_zeros(values.shape), dict(state)
    out_dtype = values.dtype
    low = (torch.float16, torch.bfloat16)
    # half-precision inputs: chunk products in their dtype, the running state in float32
    state = {k: (v.float() if v.dtype in low else v) for k, v in state.items()}
    b, _, h, dk = keys.shape
    c = max(1, min(chunk_size or 64, max(t_len, 1)))
    n = -(-t_len // c)
    pad = n * c - t_len

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, H, N, C, D]
        return F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(1, 2).unflatten(2, (n, c))

    k, v, q = blocks(keys), blocks(values), blocks(queries)
    acc = state["memory"].dtype
    mask = torch.ones(c, c, dtype=torch.bool, device=keys.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0.0)  # [B, H, N, C, C]
    per_chunk = (v.transpose(-1, -2) @ k).to(acc)  # Σ_i v_i k_iᵀ of each chunk, [B, H, N, Dv, Dk]
    # the state each chunk starts from: S_0 + Σ of the chunks before it
    starts = state["memory"].unsqueeze(2) + per_chunk.cumsum(2) - per_chunk
    num = (scores @ v).to(acc) + q.to(acc) @ starts.transpose(-1, -2)
    den = z = None
    if spec.normalize:
        k_sum = k.sum(3, dtype=acc)  # [B, H, N, Dk]
        z_starts = state["normalizer"].unsqueeze(2) + k_sum.cumsum(2) - k_sum
        den = scores.sum(-1, dtype=acc) + (q.to(acc) * z_starts.unsqueeze(3)).sum(-1)
        den = den.flatten(2, 3)[:, :, :t_len].transpose(1, 2)
        z = state["normalizer"] + keys.sum(1, dtype=acc)
    num = num.flatten(2, 3)[:, :, :t_len].transpose(1, 2)
    s = state["memory"] + per_chunk.sum(2)
    y, new = _finish(spec, num, den, state, s, z, t_len)
    return y.to(out_dtype), new
