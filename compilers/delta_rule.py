"""Execution forms of the closed-form ``kind: delta_rule`` entry (DeltaNet, Gated DeltaNet).

The rule (M acts on column vectors, ``y = S q``)::

    S_t = α_t S_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,   y_t = S_t q_t.

``reference`` applies it token by token. ``chunked`` is exact: write the step as
``S_t = α_t S_{t−1} + δ_t k_tᵀ`` with the pseudo-value ``δ_t = β_t (v_t − α_t S_{t−1} k_t)``. Inside a
chunk starting from ``S_0``, with ``γ_t = Π_{i≤t} α_i`` and ``D[t, i] = γ_t / γ_i`` (``i ≤ t``)::

    S_t = γ_t S_0 + Σ_{i≤t} D[t, i] δ_i k_iᵀ
    δ_t + β_t Σ_{i<t} D[t, i] (k_t·k_i) δ_i = β_t v_t − β_t γ_t S_0 k_t

a unit lower-triangular system ``(I + A) Δ = diag(β) V − diag(βγ) K S_0ᵀ``. Its inverse ``T`` does not
depend on ``S_0``, so ``U = T diag(β) V`` and ``W = T diag(βγ) K`` are computed for all chunks at once
(the WY / UT representation), and only ``Δ = U − W S_0ᵀ``, the outputs
``γ_t S_0 q_t + Σ_{i≤t} D[t, i] (q_t·k_i) δ_i`` and the next ``S_0`` walk the chunks in order.
Decays are handled in log space (``D = exp(log γ_t − log γ_i)``), so long chunks do not underflow.

Inputs ``keys / queries [B, T, H, D_k]``, ``values [B, T, H, D_v]``, ``beta`` and ``decay`` (the
activated α) ``[B, T, H]`` or broadcastable (``[B, T, 1]``, a number); output ``[B, T, H, D_v]``.
State: ``memory [B, H, D_v, D_k]`` and ``position`` (0-d int64, tokens consumed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlgraph.spec.schema import DeltaRuleSpec, GateSpec

from . import register_form

__all__ = ["delta_rule_chunked", "delta_rule_reference"]


def _rate(name: str, value, spec_value, like: torch.Tensor) -> torch.Tensor | None:
    """A rate as ``[B, T, H]``, from the tensor passed or the spec's constant."""
    if value is None:
        if isinstance(spec_value, GateSpec):
            raise ValueError(f"{name} is a data-dependent gate in the spec: pass its values [B, T, H]")
        if spec_value is None:
            return None
        value = spec_value
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.expand(like.shape[:3])


def _setup(spec: DeltaRuleSpec, keys, values, queries, beta, decay, state):
    queries = keys if queries is None else queries
    for name, x in (("keys", keys), ("values", values), ("queries", queries)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a [B, T, H, D] tensor")
    if values.shape[:3] != keys.shape[:3] or queries.shape != keys.shape:
        raise ValueError(f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and queries "
                         f"{tuple(queries.shape)} must agree on [B, T, H] (and queries on D_k)")
    b, _, h, dk = keys.shape
    if state is None:
        state = {"memory": keys.new_zeros(b, h, values.shape[-1], dk),
                 "position": torch.zeros((), dtype=torch.int64, device=keys.device)}
    if set(state) != {"memory", "position"}:
        raise ValueError(f"delta_rule state has entries {sorted(state)}, expected ['memory', 'position']")
    beta = _rate("beta", beta, spec.beta, keys)
    alpha = _rate("decay", decay, spec.decay, keys)
    return queries, beta, alpha, state


@register_form("delta_rule", "reference", priority=0)
def delta_rule_reference(spec: DeltaRuleSpec, *, keys, values, queries, beta=None, decay=None,
                         state=None, **_):
    """Token by token, as the rule is written. Returns ``(y [B, T, H, D_v], state)``."""
    queries, beta, alpha, state = _setup(spec, keys, values, queries, beta, decay, state)
    s = state["memory"]
    ys = []
    for t in range(keys.shape[1]):
        k, v, q = keys[:, t], values[:, t], queries[:, t]  # [B, H, D]
        if alpha is not None:
            s = alpha[:, t, :, None, None] * s
        err = (s @ k.unsqueeze(-1)).squeeze(-1) - v  # S k − v
        s = s - beta[:, t, :, None, None] * err.unsqueeze(-1) * k.unsqueeze(-2)
        ys.append((s @ q.unsqueeze(-1)).squeeze(-1))
    y = torch.stack(ys, 1) if ys else values.new_zeros(values.shape)
    return y, {"memory": s, "position": state["position"] + keys.shape[1]}


@register_form("delta_rule", "chunked", priority=10)
def delta_rule_chunked(spec: DeltaRuleSpec, *, keys, values, queries, beta=None, decay=None,
                       state=None, chunk_size: int | None = None, **_):
    """Exact chunkwise WY / UT form (see the module docstring), in PyTorch. ``chunk_size`` default 64.
    The same form in Triton is the ``triton`` form (:mod:`nlgraph.compilers.kernels.forms`)."""
    queries, beta, alpha, state = _setup(spec, keys, values, queries, beta, decay, state)
    return chunked_from_setup(queries, keys, values, beta, alpha, state, chunk_size)


def chunked_from_setup(queries, keys, values, beta, alpha, state, chunk_size):
    """The chunked form after :func:`_setup` (rates activated, state complete)."""
    out_dtype, state_dtype = values.dtype, state["memory"].dtype
    keys, values, queries, beta, alpha, state = _upcast(keys, values, queries, beta, alpha, state)
    b, t_len, h, dk = keys.shape
    if t_len == 0:
        return values.new_zeros(values.shape, dtype=out_dtype), {**state, "memory": state["memory"].to(state_dtype)}
    c = max(1, min(chunk_size or 64, max(t_len, 1)))
    n = -(-t_len // c)
    pad = n * c - t_len

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.transpose(1, 2).unflatten(2, (n, c))

    # padded tokens write nothing (β = 0, k = 0) and keep the state (log α = 0)
    k, v, q, bt = blocks(keys), blocks(values), blocks(queries), blocks(beta)  # bt: [B, H, N, C]
    log_a = torch.log(alpha) if alpha is not None else torch.zeros_like(beta)
    g = blocks(log_a).cumsum(-1)  # log γ_t within each chunk
    causal = torch.ones(c, c, dtype=torch.bool, device=keys.device).tril()
    # D[t, i] = γ_t / γ_i on and below the diagonal; masked before exp so nothing overflows
    decay_mat = torch.exp((g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
    strict = (decay_mat * (k @ k.transpose(-1, -2))).tril(-1) * bt.unsqueeze(-1)
    eye = torch.eye(c, dtype=keys.dtype, device=keys.device)
    lhs = eye + strict
    u = torch.linalg.solve_triangular(lhs, bt.unsqueeze(-1) * v, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(lhs, (bt * g.exp()).unsqueeze(-1) * k, upper=False,
                                      unitriangular=True)
    read = decay_mat * (q @ k.transpose(-1, -2))  # D[t, i] (q_t·k_i), i ≤ t
    gamma = g.exp().unsqueeze(-1)  # γ_t, [B, H, N, C, 1]
    to_end = (g[..., -1:] - g).exp().unsqueeze(-1)  # γ_C / γ_i
    s = state["memory"]
    outs = []
    for j in range(n):
        delta = u[:, :, j] - w[:, :, j] @ s.transpose(-1, -2)  # [B, H, C, Dv]
        outs.append(gamma[:, :, j] * (q[:, :, j] @ s.transpose(-1, -2)) + read[:, :, j] @ delta)
        s = gamma[:, :, j, -1:] * s + (to_end[:, :, j] * delta).transpose(-1, -2) @ k[:, :, j]
    y = torch.stack(outs, 2).flatten(2, 3)[:, :, :t_len].transpose(1, 2)
    return y.to(out_dtype), {"memory": s.to(state_dtype), "position": state["position"] + t_len}


def _upcast(*xs):
    """bf16 / fp16 inputs run in float32: the triangular solve has no half-precision kernel, and the
    state summed over thousands of tokens needs the mantissa (fla keeps its states in float32 too)."""
    def up(x):
        if isinstance(x, dict):
            return {k: up(v) for k, v in x.items()}
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
            return x.float()
        return x
    return tuple(up(x) for x in xs)
