"""Inner objectives ("attentional bias") ``ℓ(y, v)`` of a memory's read ``y = M(k)``.

Every objective is summed over channels and returned per token, ``[B, H, N]``; the gradient of a
level is the gradient of the sum over tokens, batch and heads, which gives each batch element and
head the gradient of its own loss because their parameters are separate tensors slices.

Signs are descent-consistent (nested-learning-math.md §8): every optimizer subtracts the gradient.

* ``dot``:   ``ℓ = −⟨y, v⟩``            (Hebbian; GD with lr 1 is linear attention)
* ``l2``:    ``ℓ = ½‖y − v‖²``           (regression; GD with lr β is the delta rule)
* ``lp``:    ``ℓ = Σ |y − v|^p``
* ``huber``: ``ℓ = Σ huber_δ(y − v)``   (½r² inside ``|r| ≤ δ``, ``δ(|r| − δ/2)`` outside)
* ``outer``: ``ℓ = ⟨y, u⟩`` where the values ``u = ∂L/∂y`` are the outer loss's gradient at the
  level's output (the local surprise signal): its parameter gradient is exactly the outer loss's
  gradient through this level (NeurIPS Eqs. 2–6), which is what a CMS level accumulates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Objective", "build_objective"]


@dataclass(frozen=True)
class Objective:
    """A per-token inner loss. ``delta`` is Huber's threshold (constant)."""

    kind: str
    p: float = 2.0
    delta: float = 1.0

    def loss(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``y, v [..., N, d] -> ℓ [..., N]``."""
        if self.kind == "dot":
            return -(y * v).sum(-1)
        if self.kind == "outer":
            return (y * v).sum(-1)
        r = y - v
        if self.kind == "l2":
            return 0.5 * r.square().sum(-1)
        if self.kind == "lp":
            return r.abs().pow(self.p).sum(-1)
        if self.kind == "huber":
            a = r.abs()
            return torch.where(a <= self.delta, 0.5 * r.square(), self.delta * (a - 0.5 * self.delta)).sum(-1)
        raise ValueError(f"unknown objective {self.kind!r}")

    @property
    def linear_in_memory(self) -> bool:
        """Whether ``∇ℓ`` is affine in the memory's read (dot / outer: constant, l2: ``y − v``) — the
        condition for an exact chunkwise form of an online linear memory."""
        return self.kind in ("dot", "l2", "outer")


def build_objective(spec) -> Objective:
    """The :class:`Objective` of an objective spec.

    Raises:
        ValueError: a data-dependent Huber threshold (``delta`` as a gate) — the runtime takes
            constant thresholds only.
    """
    if spec.kind == "lp":
        return Objective("lp", p=float(spec.p))
    if spec.kind == "huber":
        if not isinstance(spec.delta, (int, float)):
            raise ValueError("objective.delta: run_level takes a constant Huber threshold, not a gate")
        return Objective("huber", delta=float(spec.delta))
    return Objective(spec.kind)
