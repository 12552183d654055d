"""The reference execution form: one token at a time, the definition of every level kind.

It is deliberately plain: gradients come from autograd on the token's inner loss, the optimizer is
applied as written in :mod:`nlgraph.levels.optimizers`, and retention, periods and gradient points
follow the rules below literally. It runs in any dtype (float64 for the equivalence tests) and is
differentiable end to end (outer gradients flow through every inner step).

Token ``t`` (global position ``p``), for every memory slot (the level memory and its adaptive
projections), with ``L`` the linearisation point — the anchor (state at the last ``N``-boundary)
when the gradient-point chunk ``N`` exceeds the period ``C``, else the committed state:

1. streams and gates are read at ``L``: ``k = M_k,L(x)`` for adaptive keys, ``η = gate(M_η,L(x))``;
2. ``read: before_write`` reads the committed level memory: ``y = M(q)``; ``read: chunk_start``
   reads it at ``L``;
3. targets: ``v̂ = M_L(v)`` with ``self_target``, else ``v``;
4. ``decay`` retention scales the working state first: ``W ← α W`` (``toward: initial``:
   ``W ← W_0 + α (W − W_0)`` with ``W_0`` the sequence's initial state, here and in 6);
5. the gradient ``g = ∇ℓ(M(k), v̂)`` is taken at the (decayed) working state when the level is
   exact online (C = 1, gradient point ``token``), else at ``L``;
6. the optimizer turns ``g`` into ``Δ``; ``weight_decay`` retention gives ``W ← α W + Δ``, otherwise
   ``W ← W + Δ``;
7. commit every ``C`` tokens (``(p + 1) mod C = 0``): the committed state becomes the working
   state; with C = 1 every token commits. The anchor moves every ``N`` tokens the same way;
8. ``read: after_write`` reads the committed level memory.

A period that the sequence ends inside is not committed: its summed updates stay in ``pending``.
"""

from __future__ import annotations

import torch

from nlgraph.levels.gates import AdaptiveGate
from nlgraph.levels.memories import apply_layer, gain_scales, layer_errors
from nlgraph.levels.optimizers import gradients
from nlgraph.levels.run import LevelRun, Stream, final_state

from . import register_form

__all__ = ["run_reference", "retain"]

Params = dict[str, torch.Tensor]


def retain(params: Params, alpha: torch.Tensor, origin: Params | None = None) -> Params:
    """Scale parameters by the retention factor: ``α [B, H]`` everywhere, or ``α [B, H, D]`` on the
    key channels of a matrix memory (``W·Diag(α)``). With ``origin`` (``W_0``) the deviation from
    it is scaled instead: ``W_0 + α (W − W_0)``."""
    out = {}
    for k, p in params.items():
        d = p if origin is None else p - origin[k]
        if alpha.dim() == 3:
            d = d * alpha.unsqueeze(-2)
        else:
            d = d * alpha.reshape(alpha.shape + (1,) * (p.dim() - 2))
        out[k] = d if origin is None else origin[k] + d
    return out


def _stream_at(run: LevelRun, stream: Stream, t: int, lin: dict[str, Params]) -> torch.Tensor:
    x = stream.data[:, t].unsqueeze(2)  # [B, H, 1, D]
    if stream.slot is None:
        return x
    return stream.post(run.memories[stream.slot].forward(lin[stream.slot], x))


def _rate_at(run: LevelRun, rate, t: int, lin: dict[str, Params]) -> torch.Tensor | None:
    if rate is None:
        return None
    if isinstance(rate, AdaptiveGate):
        slot = f"adaptive.{rate.memory}"
        read = run.memories[slot].forward(lin[slot], rate.x[:, t].unsqueeze(2))
        return rate.value(read).squeeze(2)
    return rate[:, t]


def _gain_normalized_grads(mem, params: dict, k: torch.Tensor, target: torch.Tensor, obj, grads: dict) -> dict:
    """DGD's ``inner_errors: gain`` on one token: every layer's gradient divided by the read's gain
    along the layer's error ``δ = ∂ℓ/∂z`` (:func:`~nlgraph.levels.memories.gain_scales`). ``δ`` is
    the loss's gradient with respect to a zero probe added to the layer's pre-activation, at
    ``params``; the outer gradient goes through it and the gain (see ``gain_scales``)."""
    _, deltas = layer_errors(mem, params, k, lambda read: obj.loss(read, target).sum())
    scales = gain_scales(mem, params, k, deltas)  # [B, H, 1, 1]
    out = dict(grads)
    for layer in mem.layers:
        out[layer.weight] = grads[layer.weight] / scales[layer.weight]
        if layer.bias is not None:
            out[layer.bias] = grads[layer.bias] / scales[layer.weight].squeeze(-1)
    return out


@register_form("memory", "reference", priority=0)
def run_reference(run: LevelRun) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Execute ``run`` token by token. Returns ``(outputs [B, T, H, D_v], state)``."""
    b, T, h = run.shape
    slots = list(run.memories)
    main = run.memories["memory"]
    committed = {s: run.params("", s) for s in slots}
    working = {s: {p: committed[s][p] + run.params("pending", s)[p] for p in committed[s]} for s in slots} \
        if run.has_pending else dict(committed)
    anchor = {s: run.params("anchor", s) for s in slots} if run.has_anchor else None
    buffers = {s: run.buffers(s) for s in slots}
    opt, obj = run.optimizer, run.objective
    outputs = []
    for t in range(T):
        pos = run.position + t
        lin = anchor if anchor is not None else committed
        q = _stream_at(run, run.queries, t, lin)
        if run.period is None:  # frequency never: a static memory
            outputs.append(main.forward(committed["memory"], q))
            continue
        k = _stream_at(run, run.keys, t, lin)
        v = _stream_at(run, run.values, t, lin)
        if run.read_before:
            outputs.append(main.forward((lin if run.read == "chunk_start" else committed)["memory"], q))
        lr = _rate_at(run, run.lr, t, lin)
        alpha = _rate_at(run, run.alpha, t, lin)
        mu = _rate_at(run, run.mu, t, lin)
        new_working = {}
        for s in slots:
            mem = run.memories[s]
            target = mem.forward(lin[s], v) if run.self_target else v
            w = working[s]
            origin = run.params("origin", s) if run.has_origin else None
            if run.retention == "decay":
                w = retain(w, alpha, origin)
            point = w if run.online else lin[s]

            def loss(p: Params, mem=mem, target=target) -> tuple[torch.Tensor, Params]:
                trace: Params = {}

                def apply(layer, x):
                    trace[layer.weight] = x
                    return apply_layer(p, layer, x)

                return obj.loss(mem.forward_with(k, apply), target).sum(), trace

            grads, inputs = gradients(loss, point)
            if getattr(opt, "gain", False):
                grads = _gain_normalized_grads(mem, point, k, target, obj, grads)
            delta, buffers[s] = opt.step(mem, w, grads, lr=lr, momentum=mu, buffers=buffers[s], inputs=inputs)
            if run.retention == "weight_decay":
                w = retain(w, alpha, origin)
            new_working[s] = {p: w[p] + delta[p] for p in w}
        working = new_working
        if run.period == 1 or (pos + 1) % run.period == 0:
            committed = working
        if anchor is not None and (pos + 1) % run.chunk == 0:
            anchor = working
        if not run.read_before:
            outputs.append(main.forward(committed["memory"], q))
    y = torch.cat(outputs, dim=2).transpose(1, 2) if outputs else run.values.data.new_zeros(b, 0, h, main.d_out)
    return y, final_state(run, committed, working, anchor, buffers, T)
