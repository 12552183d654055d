"""Rates of a level (learning rate, retention factor, momentum decay) as tensors per token.

A rate reaches the runtime in one of three ways:

* a tensor passed to ``run_level`` — the *activated* value (α ∈ (0, 1), β ∈ (0, 1), ...), shaped
  ``[B, T, H]`` (per head), ``[B, T, H, D]`` (per key channel, retention only) or anything that
  broadcasts to ``[B, T, H]`` (a Python number, ``[B, T, 1]`` ...);
* the spec's constant, when nothing is passed;
* an *adaptive* gate (``from: adaptive.<name>``), computed in context from that adaptive memory's
  read of the level input: ``scale · act(reduce(M_name(x)) + bias)``, where ``reduce`` is the mean
  over channels (``per: head``), over heads and channels (``per: scalar``) or nothing
  (``per: channel``) — the "fixed linear map" of the schema.

A spec that declares a data-dependent gate from anything else (``from: input``, another level)
needs the tensor: the runtime does not own the outer projection that makes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..spec.schema import GateSpec

__all__ = ["AdaptiveGate", "activate", "resolve_rate"]


def scaled(act: str, x: torch.Tensor, scale: float) -> torch.Tensor:
    """A gate's value ``scale · act(x)``. ``logsigmoid`` is a log-space factor: its scale acts in log
    space, ``exp(scale · logsigmoid(x)) = sigmoid(x)^scale`` (GLA's temperature: ``scale: 1/16``),
    returned exponentiated, because the runtime works with activated factors. Shared by
    :class:`nlgraph.layers.Gate` and :class:`AdaptiveGate`."""
    if act == "logsigmoid":
        return torch.exp(scale * F.logsigmoid(x)) if scale != 1.0 else torch.sigmoid(x)
    return scale * activate(act, x)


def activate(act: str, x: torch.Tensor) -> torch.Tensor:
    """A gate activation. ``logsigmoid`` returns the factor ``exp(logsigmoid(x)) = sigmoid(x)``,
    matching :class:`nlgraph.layers.Gate`, because the runtime works with activated factors (its
    scale, in log space, is :func:`scaled`'s)."""
    if act == "identity":
        return x
    if act in ("sigmoid", "logsigmoid"):
        return torch.sigmoid(x)
    if act == "softplus":
        return F.softplus(x)
    if act == "exp":
        return torch.exp(x)
    if act == "tanh":
        return torch.tanh(x)
    if act == "silu":
        return F.silu(x)
    if act == "relu":
        return F.relu(x)
    raise ValueError(f"unknown gate activation {act!r}")


@dataclass(frozen=True)
class AdaptiveGate:
    """A gate read from adaptive memory ``memory`` on the input ``x [B, T, H, D]``."""

    memory: str
    spec: GateSpec
    x: torch.Tensor

    def value(self, read: torch.Tensor) -> torch.Tensor:
        """``read [B, H, N, D]`` (the memory on ``x``) → gate ``[B, H, N]`` (or ``[B, H, N, D]``)."""
        per = self.spec.per
        if per == "head":
            z = read.mean(-1)
        elif per == "scalar":
            z = read.mean(dim=(1, -1), keepdim=True).squeeze(-1).expand(read.shape[:-1])
        else:
            z = read
        return scaled(self.spec.act, z + self.spec.bias, self.spec.scale)


Resolved = torch.Tensor | AdaptiveGate


def resolve_rate(
    name: str,
    spec: Any,
    value: Any,
    *,
    shape: tuple[int, int, int],
    width: int,
    channel_ok: bool,
    like: torch.Tensor,
    adaptive_input: torch.Tensor | None,
    adaptive: set[str],
) -> Resolved:
    """Normalise one rate to ``[B, T, H]`` / ``[B, T, H, D]`` (or an :class:`AdaptiveGate`).

    Args:
        name: the argument name, for messages (``lr``, ``retention``, ``momentum``).
        spec: the spec's :data:`~nlgraph.spec.schema.Rate` (a number or a :class:`GateSpec`).
        value: what the caller passed (``None``, a number or a tensor).
        shape: ``(B, T, H)``.
        width: the key width ``D`` a per-channel gate must have.
        channel_ok: whether a per-channel gate is meaningful here.
        like: a tensor whose dtype and device the rate takes.
        adaptive_input: the level input ``x`` adaptive gates read when no tensor is passed.
        adaptive: names of the level's adaptive memories.
    """
    b, t, h = shape
    if isinstance(spec, GateSpec) and spec.from_.startswith("adaptive."):
        mem = spec.from_.split(".", 1)[1]
        if mem not in adaptive:
            raise ValueError(f"{name}: gate reads adaptive.{mem}, which the level does not declare")
        x = value if value is not None else adaptive_input
        if x is None:
            raise ValueError(
                f"{name}: the gate is read from adaptive.{mem}; pass its input x [B, T, H, D] as "
                f"{name}= (or as keys=, when keys come from an adaptive projection too)"
            )
        x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
        if x.dim() != 4 or tuple(x.shape[:3]) != shape:
            raise ValueError(
                f"{name}: the input of adaptive.{mem} must be [B, T, H, D] = [{b}, {t}, {h}, D], got {list(x.shape)}"
            )
        return AdaptiveGate(mem, spec, x)
    if value is None:
        if isinstance(spec, GateSpec):
            raise ValueError(
                f"{name}: the level declares a data-dependent gate (from: {spec.from_}); pass its "
                f"activated value as {name}= (a [B, T, H] tensor)"
            )
        value = float(spec)
    if isinstance(value, (int, float)):
        # a constant: filled on the device, not copied from the host (a copy breaks CUDA-graph capture)
        v = torch.full((), float(value), dtype=like.dtype, device=like.device)
    else:
        v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if v.dim() == 4:
        if not channel_ok:
            raise ValueError(
                f"{name}: a per-channel [B, T, H, D] gate is only meaningful for the retention of a linear "
                f"memory; pass [B, T, H]"
            )
        if tuple(v.shape) != (b, t, h, width):
            raise ValueError(f"{name}: per-channel gate must be [B, T, H, D] = [{b}, {t}, {h}, {width}], got {list(v.shape)}")
        return v
    try:
        return torch.broadcast_to(v, shape)
    except RuntimeError:
        raise ValueError(
            f"{name}: expected [B, T, H] = [{b}, {t}, {h}] or something that broadcasts to it, got {list(v.shape)}"
        ) from None
