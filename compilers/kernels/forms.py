"""The Triton kernels as registered execution forms: ``triton`` for the closed-form ``delta_rule``
family and for the ``memory`` family's (gated) delta-rule and linear-attention levels, the other
online linear levels with per-head gates (momentum, DGD with momentum, the ``outer`` objective: the
chunked form's all-chunks solve with its state recurrence in a kernel, on CUDA while
``dispatch.ONLINE_RECURRENCE_ON_GPU`` is on, the default), and Titans' mini-batch MLP memory (on CUDA while
``dispatch.MLP_MEMORY_ON_GPU`` is on, the default).

A form is chosen once per level by the plan (:func:`nlgraph.lower.plan`) from the registry, for the
target device and dtype; this module is how the kernels enter that choice, with nothing else in the
pipeline knowing about them. ``triton`` has a higher priority than ``chunked``, so the plan takes it
wherever :func:`why_not_delta_rule` / :func:`why_not_memory` say it applies: CUDA (or CPU under
``NLGRAPH_KERNELS=interpret``), float32 / bfloat16 / float16 parameters, kernels not switched off, and
for memory levels the (gated) delta rules :func:`~nlgraph.compilers.kernels.dispatch.why_no_online_kernel`
lists, linear attention, the online recurrence (``dispatch.why_no_online_recurrence``) and Titans' MLP
memory (``dispatch.why_no_mlp_memory_kernel``). ``build(spec, forms={"memory": "chunked"})`` forces the PyTorch form for one level instead.

Both forms compute the maths of the ``chunked`` form exactly, which is their registered fallback: a
model planned for CUDA that is given CPU or float64 tensors, or whose kernels were switched off after
it was built (``set_kernels("off")``), runs ``chunked`` (:func:`nlgraph.compilers.select_form`).
Inside the form, what the kernel does not take runs the PyTorch code too: a chunk size other than 16,
32 or 64, head dims above 256 (key widths above 128 for the recurrence kernel), mixed dtypes, bfloat16
on the CPU interpreter.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import register_form
from . import dispatch

__all__ = ["why_not_delta_rule", "why_not_linear_attention", "why_not_memory"]

#: the forms' priority: above ``chunked`` (10), so the plan prefers the kernel where it applies
PRIORITY = 20


def _why_not_target(device: str, dtype: Any) -> str | None:
    why = dispatch.why_no_kernel(device)
    if why is not None:
        return why
    if dtype is not None and dtype not in dispatch._DTYPES:
        return f"{str(dtype).removeprefix('torch.')} parameters (the kernels take float32, bfloat16 and float16)"
    return None


def why_not_delta_rule(spec: Any, device: str = "cpu", dtype: Any = None) -> str | None:
    """``None`` when the ``triton`` form runs this closed-form ``delta_rule`` on ``device`` in
    ``dtype``, else why not."""
    return _why_not_target(device, dtype)


def why_not_memory(spec: Any, device: str = "cpu", dtype: Any = None, head_dim: int | None = None) -> str | None:
    """``None`` when the ``triton`` form runs this memory level on ``device`` in ``dtype`` at
    ``head_dim`` (``None``: not known), else why not: the level must be a (gated) delta rule or
    linear attention of the online driver, another online linear level with per-head gates (the
    recurrence kernel, key widths up to 128), Titans' mini-batch MLP memory (on CUDA, a chunk ×
    head-dim tile the kernel runs there), or a mini-batch DGD level with per-head gates (the chunk
    walk; on CUDA for the chunks ``dispatch.why_no_chunk_walk_on_cuda`` allows)."""
    from ..chunked import why_not_chunked

    why = why_not_chunked(spec)
    if why is not None:
        return why
    if dispatch.why_no_mlp_memory_kernel(spec) is None:
        return _mlp_on(device) or _mlp_tile(spec, device, head_dim) or _why_not_target(device, dtype)
    if dispatch.why_no_chunk_walk(spec) is None:
        off = dispatch.why_no_chunk_walk_on_cuda(spec) if torch.device(device).type == "cuda" else None
        if off:
            return f"a mini-batch DGD level: {off}"
        wide = dispatch.why_chunk_walk_too_wide(spec, head_dim) if head_dim is not None else None
        return wide or _why_not_target(device, dtype)
    why = dispatch.why_no_online_kernel(spec)
    if why is None and dispatch._channel_decay(spec):
        off = dispatch.why_no_channel_kernel(device, head_dim, dispatch.DELTA_RULE_CHANNEL_ON_GPU,
                                             "NLGRAPH_DELTA_RULE_CHANNEL_GPU")
        if off:
            return f"a delta rule with a per-channel decay: {off}"
    if why is not None:
        if dispatch.why_no_online_linear_attention(spec) is not None:
            if dispatch.why_no_online_recurrence(spec) is not None:
                return why
            if torch.device(device).type == "cuda" and not dispatch.ONLINE_RECURRENCE_ON_GPU:
                return (f"{why}; the online recurrence kernel that would take it is off on CUDA "
                        "(NLGRAPH_ONLINE_RECURRENCE_GPU=0)")
            if head_dim is not None and head_dim > dispatch.RECURRENCE_MAX_KEY:
                return (f"{why}; the online recurrence kernel takes key widths up to "
                        f"{dispatch.RECURRENCE_MAX_KEY}, not {head_dim}")
            return _why_not_target(device, dtype)
        if _la_on(device):
            return _la_on(device)
        if dispatch._channel_decay(spec):
            off = dispatch.why_no_channel_kernel(device, head_dim, dispatch.LINEAR_ATTENTION_CHANNEL_ON_GPU,
                                                 "NLGRAPH_LINEAR_ATTENTION_CHANNEL_GPU")
            if off:
                return f"linear attention with a per-channel decay: {off}"
    return _why_not_target(device, dtype)


@register_form("delta_rule", "triton", priority=PRIORITY, supports=why_not_delta_rule, fallback="chunked")
def delta_rule_triton(spec: Any, *, keys, values, queries, beta=None, decay=None, state=None,
                      chunk_size: int | None = None, **_):
    """The chunked WY / UT form in Triton (fp32 state, the inputs' dtype in the products). Returns
    ``(y [B, T, H, D_v], state)``."""
    from ..delta_rule import _setup, chunked_from_setup

    queries, beta, alpha, state = _setup(spec, keys, values, queries, beta, decay, state)
    chunk = chunk_size or 64
    if keys.shape[1] > 0 and dispatch.closed_form_fits(keys, values, chunk):
        y, memory = dispatch.delta_rule(queries, keys, values, beta if beta is not None else torch.ones_like(
            keys[..., 0]), alpha, state["memory"], chunk)
        return y, {"memory": memory, "position": state["position"] + keys.shape[1]}
    return chunked_from_setup(queries, keys, values, beta, alpha, state, chunk_size)


def describe_memory(spec: Any, device: str = "cpu") -> str | None:
    """What of a memory level the ``triton`` form leaves to PyTorch (on any ``device`` it takes),
    for the plan's label (``nlgraph compile``): ``None`` where a kernel runs the level's recurrence
    and reads whole (the (gated) delta rules, linear attention, Titans' MLP memory)."""
    if dispatch.why_no_mlp_memory_kernel(spec) is None:
        return None
    if dispatch.why_no_chunk_walk(spec) is None:
        return "each chunk's recurrences walked in a kernel; the chunks' products and solves in PyTorch"
    if dispatch.why_no_online_kernel(spec) is None or dispatch.why_no_online_linear_attention(spec) is None:
        return None
    if dispatch.why_no_online_recurrence(spec) is None:
        return "the state recurrence in a kernel; the chunks' products, solves and reads in PyTorch"
    return None


@register_form("memory", "triton", priority=PRIORITY, supports=why_not_memory, fallback="chunked",
               describe=describe_memory)
def memory_triton(run: Any, chunk_size: int | None = None, loop: str | None = None):
    """A memory level through its kernel: Titans' MLP memory (``dispatch.minibatch_mlp_memory``), a
    (gated) delta rule (``dispatch.online_delta_rule``), linear attention
    (``dispatch.online_linear_attention``) or, for other online linear levels, the ``chunked`` form
    with its state recurrence in a kernel (``dispatch.online_recurrence_for``); what a kernel does
    not take (a run starting inside a chunk, an adaptive gate ...) runs the ``chunked`` form. Returns ``(outputs [B, T, H, D_v], state)``."""
    from ..chunked import DEFAULT_CHUNK, run_chunked

    done = dispatch.minibatch_mlp_memory(run)  # None at once for any other level
    if done is None and run.period is not None and run.online:
        done = dispatch.online_delta_rule(run, chunk_size or DEFAULT_CHUNK)
        if done is None:
            done = dispatch.online_linear_attention(run, chunk_size or DEFAULT_CHUNK)
    if done is not None:
        return done
    recurrence = walk = None
    if run.period is not None and run.online:  # the all-chunks solve with its recurrence in a kernel
        recurrence = dispatch.online_recurrence_for(run, chunk_size or DEFAULT_CHUNK)
    elif run.period is not None:  # mini-batch DGD: each chunk's recurrences walked by a kernel
        walk = dispatch.chunk_walk_for(run)
    return run_chunked(run, chunk_size, loop, recurrence, walk)


def _mlp_on(device: str) -> str | None:
    if torch.device(device).type == "cuda" and not dispatch.MLP_MEMORY_ON_GPU:
        return ("Titans' MLP memory: its Triton kernel is switched off on CUDA (NLGRAPH_MLP_MEMORY_GPU=0; "
                "unset it to turn the kernel on)")
    return None


def _mlp_tile(spec: Any, device: str, head_dim: int | None) -> str | None:
    if torch.device(device).type != "cuda" or head_dim is None:
        return None
    from nlgraph.levels.run import periods

    from .mlp_memory import why_not_on_cuda

    why = why_not_on_cuda(periods(spec)[1], head_dim)
    return f"Titans' MLP memory: {why}" if why else None


def _la_on(device: str) -> str | None:
    if torch.device(device).type == "cuda" and not dispatch.LINEAR_ATTENTION_ON_GPU:
        return "linear attention: its Triton kernel is switched off on CUDA (dispatch.LINEAR_ATTENTION_ON_GPU)"
    return None


def why_not_linear_attention(spec: Any, device: str = "cpu", dtype: Any = None) -> str | None:
    """``None`` when the ``triton`` form runs this closed-form ``linear_attention`` on ``device`` in
    ``dtype``, else why not (``normalize: true`` divides by a running normaliser the kernel lacks)."""
    if spec.normalize:
        return "normalize: true (the kernel has no normaliser)"
    return _la_on(device) or _why_not_target(device, dtype)


@register_form("linear_attention", "triton", priority=PRIORITY, supports=why_not_linear_attention,
               fallback="chunked")
def linear_attention_triton(spec: Any, *, keys, values, queries, state=None, chunk_size: int | None = None, **_):
    """``S_t = S_{t−1} + v_t k_tᵀ``, ``y_t = S_t q_t`` through ``chunk_linear_attention`` (fp32 state).
    Returns ``(y [B, T, H, D_v], state)``."""
    from ..linear_attention import _setup, linear_attention_chunked

    q, st = _setup(spec, keys, values, queries, state)
    chunk = chunk_size or 64
    if keys.shape[1] == 0 or not dispatch.closed_form_fits(keys, values, chunk):
        return linear_attention_chunked(spec, keys=keys, values=values, queries=queries, state=state,
                                        chunk_size=chunk_size)
    from .linear_attention import chunk_linear_attention

    work = dispatch._work_dtype(q, keys, values)
    m = st["memory"]
    y, ht = chunk_linear_attention(q.to(work), keys.to(work), values.to(work), None,
                                   initial_state=m.transpose(-1, -2).float(), output_final_state=True, scale=1.0,
                                   chunk=chunk)
    return y.to(values.dtype), {"memory": ht.transpose(-1, -2).to(m.dtype), "position": st["position"] + keys.shape[1]}
