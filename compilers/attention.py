"""Execution forms of non-parametric softmax attention (``kind: attention``).

Softmax attention is the Nadaraya–Watson minimiser of a weighted L2 regression over the stored
(key, value) pairs (nested-learning-math.md §2.9): for a query ``q``,

    y = argmin_m Σ_i s_i ‖v_i − m‖²,   s_i = exp(q·k_i / √d),

over all past tokens (causal) or the last ``window`` of them, whose solution is
``Σ s_i v_i / Σ s_i``. The ``reference`` form computes that minimiser token by token from the
normal equations; the ``chunked`` form is ``softmax(QKᵀ/√d + mask) V`` over the whole sequence.

Rotary embeddings, query/key norms and persistent tokens are the caller's (they act on the
streams); grouped keys and values (``kv_heads``) are shared by ``heads / kv_heads`` query heads.
State: ``keys`` / ``values`` (the cache, ``[B, S, H_kv, D]``: everything for global attention, the
last ``window − 1`` tokens for a window) and ``position``.
"""

from __future__ import annotations

import math

import torch

from nlgraph.spec.schema import AttentionSpec

from . import register_form

__all__ = ["attention_parallel", "attention_reference"]


def _setup(spec: AttentionSpec, keys, values, queries, state):
    if queries is None:
        queries = keys
    for name, x in (("keys", keys), ("values", values), ("queries", queries)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a [B, T, H, D] tensor")
    heads = spec.heads
    kv = spec.kv_heads or heads
    if queries.shape[2] != heads or keys.shape[2] != kv or values.shape[2] != kv:
        raise ValueError(f"attention with {heads} query heads and {kv} key/value heads got queries "
                         f"with {queries.shape[2]}, keys with {keys.shape[2]}, values with {values.shape[2]}")
    b = keys.shape[0]
    if state is None:
        state = {
            "keys": keys.new_zeros(b, 0, kv, keys.shape[-1]),
            "values": values.new_zeros(b, 0, kv, values.shape[-1]),
            "position": torch.zeros((), dtype=torch.int64, device=keys.device),
        }
    ks = torch.cat([state["keys"], keys], dim=1)
    vs = torch.cat([state["values"], values], dim=1)
    return queries, ks, vs, state["keys"].shape[1], heads // kv, state


def _new_state(spec: AttentionSpec, ks, vs, state, t):
    keep = ks.shape[1] if spec.window is None else min(ks.shape[1], spec.window - 1)
    return {"keys": ks[:, ks.shape[1] - keep:], "values": vs[:, vs.shape[1] - keep:],
            "position": state["position"] + t}


@register_form("attention", "reference", priority=0)
def attention_reference(spec: AttentionSpec, *, keys, values, queries, state=None):
    """Per token: the Nadaraya–Watson minimiser from its normal equations. ``[B, T, H, D_v]``."""
    q, ks, vs, cached, group, state = _setup(spec, keys, values, queries, state)
    t_len = q.shape[1]
    outs = []
    for t in range(t_len):
        stop = cached + t + 1
        start = 0 if spec.window is None else max(0, stop - spec.window)
        k = ks[:, start:stop].repeat_interleave(group, dim=2)  # [B, S, H, D]
        v = vs[:, start:stop].repeat_interleave(group, dim=2)
        logits = torch.einsum("bhd,bshd->bsh", q[:, t], k) / math.sqrt(q.shape[-1])
        s = torch.exp(logits - logits.amax(dim=1, keepdim=True))  # weights up to a common factor
        # normal equations of Σ s_i ‖v_i − m‖²: (Σ s_i) m = Σ s_i v_i
        outs.append(torch.einsum("bsh,bshd->bhd", s, v) / s.sum(1).unsqueeze(-1))
    y = torch.stack(outs, dim=1) if outs else q.new_zeros(q.shape[0], 0, q.shape[2], vs.shape[-1])
    return y, _new_state(spec, ks, vs, state, t_len)


@register_form("attention", "chunked", priority=10)
def attention_parallel(spec: AttentionSpec, *, keys, values, queries, state=None):
    """``softmax(QKᵀ/√d + mask) V`` for the whole sequence at once. ``[B, T, H, D_v]``."""
    q, ks, vs, cached, group, state = _setup(spec, keys, values, queries, state)
    t_len, s_len = q.shape[1], ks.shape[1]
    k = ks.repeat_interleave(group, dim=2)
    v = vs.repeat_interleave(group, dim=2)
    pos_q = torch.arange(cached, cached + t_len, device=q.device)[:, None]
    pos_k = torch.arange(s_len, device=q.device)[None, :]
    allowed = pos_k <= pos_q
    if spec.window is not None:
        allowed &= pos_k > pos_q - spec.window
    logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", torch.softmax(logits, dim=-1), v)
    return y, _new_state(spec, ks, vs, state, t_len)
