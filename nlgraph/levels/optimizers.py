"""Inner optimizers as pure per-token update rules, each with its state in plain tensors.

An optimizer turns the gradient of one token's inner loss into an additive update ``Δ`` of the
memory's working parameters; retention (``decay`` / ``weight_decay``) is applied by the caller
around it (:mod:`nlgraph.compilers.reference`), so every optimizer composes with either order.

Rules, with η the learning rate and μ the momentum of the token (``[B, H]``, broadcast over the
parameter):

* ``gd``:       ``Δ = −η g``
* ``momentum``: ``S ← μ S − η g``, ``Δ = S`` (Titans form, NeurIPS Eq. 17); nesterov ``Δ = μ S − η g``.
  With constant η this is ``torch.optim.SGD(lr=η, momentum=μ)`` with buffer ``−S/η``.
* ``dgd``:      per affine layer with input ``x̂`` (augmented by 1 when the layer has a bias, so
  ``[W b]`` is treated as one matrix), ``Δ = −η' (W x̂ x̂ᵀ + g)`` where ``W`` is the working
  parameter and ``η' = η`` (explicit, NeurIPS Eq. 28 with η in the decay) or
  ``η' = η / (1 + η‖x̂‖²)`` (proximal, the exact argmin of ½‖W x̂ − u‖² + ‖W − W_t‖²/(2η) with
  ``u = −∇_y ℓ``, Sherman–Morrison); optional momentum ``S ← μ S + Δ``, ``Δ = S``.
* ``adam``:     ``torch.optim.Adam``'s step, operation for operation (bias-corrected moments).
* ``muon``:     ``torch.optim.Muon``'s step: ``B ← lerp(B, g, 1 − μ)``, Newton–Schulz of ``B``
  (nesterov: of ``lerp(g, B, μ)``), decoupled weight decay, shape-adjusted lr.
* ``deep_momentum``: per parameter a momentum *memory* ``m`` (a level of its own, trained on its
  own objective over the gradient's rows: keys and values are the rows of ``g``) and
  ``Δ = −η m(g)`` read with the updated ``m`` (DMGD, NeurIPS Eqs. 23–24).

Buffers are named ``<buffer>.<param>`` (``momentum.w0``, ``exp_avg.w0``, ``step``) and for deep
momentum ``<param>.memory.<mparam>`` and ``<param>.optimizer.<its buffers>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..spec.schema import GateSpec
from .memories import Memory, build_memory
from .objectives import build_objective

__all__ = ["InnerOptimizer", "build_optimizer", "gradients", "newton_schulz", "sqrt_second_moment"]

Params = dict[str, torch.Tensor]


def _bc(rate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``[B, H]`` rate over a ``[B, H, ...]`` parameter."""
    return rate.reshape(rate.shape + (1,) * (like.dim() - rate.dim()))


def gradients(
    fn: Callable[[Params], tuple[torch.Tensor, Any]], params: Params
) -> tuple[Params, Any]:
    """``∇_params fn(params)[0]`` and ``fn``'s auxiliary output.

    ``torch.func.grad`` differentiates with respect to ``params`` *as an argument of fn* only: a
    parameter that also made the loss's inputs outside ``fn`` (an adaptive memory's own keys, its
    self-generated target) counts only through its use inside ``fn``, which is the definition of
    the inner gradient. The result stays differentiable for outer autograd (meta-learned initial
    states and gates), and the transform traces under ``torch.compile(fullgraph=True)``.
    """
    return torch.func.grad(fn, has_aux=True)(params)


def newton_schulz(
    x: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype | None = torch.bfloat16,
    batched: bool = False,
) -> torch.Tensor:
    """The quintic Newton–Schulz orthogonalisation of ``torch.optim.Muon``, on every matrix of
    ``x [..., m, n]``: normalise by the Frobenius norm, then ``steps`` times
    ``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ`` on the wide orientation.

    ``dtype`` is the working precision (bfloat16 like torch; ``None`` keeps ``x``'s dtype). By
    default the matrices are processed one by one with the 2-D operations torch uses, so results
    match it bit for bit; ``batched`` runs all of them as batched matmuls (the same maths, a few
    kernels instead of a few per matrix; roundings may differ in the last bit). The result is
    returned in the working precision.
    """
    a, b, c = coefficients
    if batched:
        return _newton_schulz_batched(x, a, b, c, steps, eps, dtype)
    flat = x.reshape(-1, *x.shape[-2:])
    out = []
    for g in flat.unbind(0):
        o = g if dtype is None else g.to(dtype)
        wide = g.shape[0] > g.shape[1]
        if wide:
            o = o.T
        o = o / o.norm().clamp(min=eps)
        for _ in range(steps):
            gram = o @ o.T
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            o = torch.addmm(o, update, o, beta=a)
        out.append(o.T if wide else o)
    return torch.stack(out).reshape(x.shape[:-2] + out[0].shape)


def _newton_schulz_batched(x, a, b, c, steps, eps, dtype):
    o = x if dtype is None else x.to(dtype)
    wide = x.shape[-2] > x.shape[-1]
    if wide:
        o = o.mT
    o = o / torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = o @ o.mT
        o = a * o + (b * gram + c * (gram @ gram)) @ o
    return o.mT if wide else o


def sqrt_second_moment(v: torch.Tensor) -> torch.Tensor:
    """``√v`` of Adam's second moment ``v ≥ 0`` (any shape), with derivative 0 where ``v = 0``.

    The forward is ``v.sqrt()`` bit for bit (NaN and inf included). Only the backward at an exact
    zero changes: torch's is ``grad / (2·√0)``, and there ``grad = 0`` (the first moment is 0 too),
    so ``0 / 0 = NaN``, which then poisons every outer gradient. ``v = 0`` means every gradient of
    that coordinate so far was 0 (a silent key channel, a memory whose last layer starts at zero,
    an output that equals its target in bfloat16), and there the update ``m̂ / (√v̂ + ε)`` is
    ``m̂ / ε + O(|g|²)``: ``√v̂ = O(|g|)`` enters only beside ``m̂ = O(g)``, so the exact derivative
    of the update receives nothing through ``√v``, which is what 0 gives (it is also the symmetric
    subgradient of ``√(c g²) = √c |g|``). Two ``where`` with the same mask rather than a clamp, so
    the unselected branch's ``√1`` has a finite derivative and nothing non-zero is altered."""
    zero = v == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, v).sqrt())  # scalars: no full-size temporaries


class InnerOptimizer:
    """A per-token update rule. Subclasses implement :meth:`buffers` and :meth:`step`."""

    kind: str
    uses_momentum = False
    needs_inputs = False

    def buffers(self, memory: Memory, params: Params) -> Params:
        """Initial buffers for ``params`` (leading ``[B, H]``)."""
        return {}

    def step(
        self,
        memory: Memory,
        params: Params,
        grads: Params,
        *,
        lr: torch.Tensor,
        momentum: torch.Tensor | None,
        buffers: Params,
        inputs: Params | None = None,
    ) -> tuple[Params, Params]:
        """One token: ``(Δ, new buffers)``.

        Args:
            memory: the memory being optimised (its layer structure).
            params: the working parameters (already decayed for ``retention: decay``).
            grads: ``∇ℓ`` at the gradient point, same keys and shapes as ``params``.
            lr, momentum: the token's rates, ``[B, H]``.
            buffers: the optimizer's state.
            inputs: each layer's input at the gradient point, ``{weight: [B, H, 1, d_in]}`` (DGD).
        """
        raise NotImplementedError


class Gd(InnerOptimizer):
    kind = "gd"

    def step(self, memory, params, grads, *, lr, momentum, buffers, inputs=None):
        return {k: -_bc(lr, g) * g for k, g in grads.items()}, {}


class Momentum(InnerOptimizer):
    kind = "momentum"
    uses_momentum = True

    def __init__(self, nesterov: bool) -> None:
        self.nesterov = nesterov

    def buffers(self, memory, params):
        return {f"momentum.{k}": torch.zeros_like(v) for k, v in params.items()}

    def step(self, memory, params, grads, *, lr, momentum, buffers, inputs=None):
        delta, new = {}, {}
        for k, g in grads.items():
            s = _bc(momentum, g) * buffers[f"momentum.{k}"] - _bc(lr, g) * g
            new[f"momentum.{k}"] = s
            delta[k] = _bc(momentum, g) * s - _bc(lr, g) * g if self.nesterov else s
        return delta, new


class Dgd(InnerOptimizer):
    kind = "dgd"
    needs_inputs = True

    def __init__(self, proximal: bool, with_momentum: bool, gain: bool = False) -> None:
        # gain: the inner layers' errors are divided by the read's gain along them (DgdSpec.inner_errors),
        # which the level drivers apply to the errors before the step
        self.proximal, self.uses_momentum, self.gain = proximal, with_momentum, gain

    def buffers(self, memory, params):
        if not self.uses_momentum:
            return {}
        return {f"momentum.{k}": torch.zeros_like(v) for k, v in params.items()}

    def step(self, memory, params, grads, *, lr, momentum, buffers, inputs=None):
        assert inputs is not None, "dgd needs the layer inputs"
        delta: Params = {}
        for layer in memory.layers:
            x = inputs[layer.weight]  # [B, H, 1, d_in]
            w = params[layer.weight]
            r = x @ w.transpose(-1, -2)  # [B, H, 1, d_out]: the working layer's read of its input
            sq = x.square().sum(-1).squeeze(-1)  # ‖x̂‖², [B, H]
            if layer.bias is not None:
                r = r + params[layer.bias].unsqueeze(-2)
                sq = sq + 1.0  # the bias is the weight of a constant input 1
            eta = lr / (1.0 + lr * sq) if self.proximal else lr
            delta[layer.weight] = -_bc(eta, w) * (r.transpose(-1, -2) @ x + grads[layer.weight])
            if layer.bias is not None:
                b = params[layer.bias]
                delta[layer.bias] = -_bc(eta, b) * (r.squeeze(-2) + grads[layer.bias])
        if not self.uses_momentum:
            return delta, {}
        new = {f"momentum.{k}": _bc(momentum, d) * buffers[f"momentum.{k}"] + d for k, d in delta.items()}
        return {k: new[f"momentum.{k}"] for k in delta}, new


class Adam(InnerOptimizer):
    kind = "adam"

    def __init__(self, betas: tuple[float, float], eps: float, bias_correction: bool) -> None:
        self.betas, self.eps, self.bias_correction = betas, eps, bias_correction

    def buffers(self, memory, params):
        out = {"step": torch.zeros((), dtype=torch.int64, device=next(iter(params.values())).device)}
        for k, v in params.items():
            out[f"exp_avg.{k}"] = torch.zeros_like(v)
            out[f"exp_avg_sq.{k}"] = torch.zeros_like(v)
        return out

    def step(self, memory, params, grads, *, lr, momentum, buffers, inputs=None):
        b1, b2 = self.betas
        step = buffers["step"] + 1
        new: Params = {"step": step}
        delta: Params = {}
        for k, g in grads.items():
            # the same operations, in the same order, as torch.optim.adam._single_tensor_adam
            m = torch.lerp(buffers[f"exp_avg.{k}"], g, 1 - b1)
            v = (buffers[f"exp_avg_sq.{k}"] * b2).addcmul(g, g, value=1 - b2)
            new[f"exp_avg.{k}"], new[f"exp_avg_sq.{k}"] = m, v
            if self.bias_correction:
                # the step count stays a tensor (no host sync, traceable); torch's capturable path
                n = step.to(g.dtype)
                bc1, bc2_sqrt = 1 - b1**n, (1 - b2**n).sqrt()
            else:
                bc1, bc2_sqrt = 1.0, 1.0
            denom = sqrt_second_moment(v) / bc2_sqrt + self.eps
            delta[k] = -(_bc(lr, g) / bc1) * (m / denom)
        return delta, new


class Muon(InnerOptimizer):
    kind = "muon"

    def __init__(self, spec) -> None:
        self.spec = spec
        # torch.optim.Muon iterates in bfloat16; so does the inner muon, to match it step for step
        self.ns_dtype = torch.bfloat16

    def buffers(self, memory, params):
        for k, v in params.items():
            if v.dim() != 4:
                raise ValueError(
                    f"muon orthogonalises matrices, but memory parameter '{k}' is a vector "
                    f"(a bias); set the memory's bias: false"
                )
        return {f"momentum.{k}": torch.zeros_like(v) for k, v in params.items()}

    def _ratio(self, shape: tuple[int, ...]) -> float:
        a, b = shape[-2:]
        if self.spec.adjust_lr == "original":
            return math.sqrt(max(1, a / b))
        if self.spec.adjust_lr == "match_rms_adamw":
            return 0.2 * math.sqrt(max(a, b))
        return 1.0

    def step(self, memory, params, grads, *, lr, momentum, buffers, inputs=None):
        mu, wd = self.spec.momentum, self.spec.weight_decay
        delta, new = {}, {}
        for k, g in grads.items():
            buf = torch.lerp(buffers[f"momentum.{k}"], g, 1 - mu)
            new[f"momentum.{k}"] = buf
            update = torch.lerp(g, buf, mu) if self.spec.nesterov else buf
            o = newton_schulz(update, self.spec.ns_coefficients, self.spec.ns_steps, self.spec.eps, self.ns_dtype)
            o = o.to(g.dtype)
            p = params[k]
            delta[k] = -_bc(lr * wd, p) * p - _bc(lr * self._ratio(tuple(p.shape)), o) * o
        return delta, new


class DeepMomentum(InnerOptimizer):
    kind = "deep_momentum"

    def __init__(self, spec) -> None:
        level = spec.level
        if level.frequency != 1:
            raise ValueError("optimizer.level.frequency: a deep momentum level runs every token (frequency 1)")
        self.level = level
        self.objective = build_objective(level.objective)
        if self.objective.kind == "outer":
            raise ValueError("optimizer.level.objective: a momentum level learns from gradients, not the outer loss")
        self.inner = build_optimizer(level.optimizer)
        if self.inner.needs_inputs:
            raise ValueError(
                "optimizer.level.optimizer: dgd is defined per event, but a momentum level sees all "
                "rows of a gradient at once; use gd, momentum, adam or muon"
            )
        self.retention = level.retention
        self.rates = {
            "lr": _constant(getattr(level.optimizer, "lr", 1.0), "optimizer.level.optimizer.lr"),
            "momentum": _constant(getattr(level.optimizer, "momentum", None) or 0.0, "optimizer.level.optimizer.momentum"),
            "retention": _constant(level.retention.gate if level.retention is not None else 1.0, "optimizer.level.retention.gate"),
        }
        self._memories: dict[int, Memory] = {}

    def memory_for(self, width: int) -> Memory:
        if width not in self._memories:
            mem = self.level.memory
            self._memories[width] = build_memory(mem, width, width)
        return self._memories[width]

    def buffers(self, memory, params):
        out: Params = {}
        gen = torch.Generator().manual_seed(0)
        for k, v in params.items():
            b, h = v.shape[:2]
            m = self.memory_for(v.shape[-1])
            zeros = self.level.memory.kind == "linear" or self.level.memory.init == "zeros"
            init = m.init(h, zeros=zeros, generator=gen, dtype=v.dtype, device=v.device)
            mp = {n: t.unsqueeze(0).expand(b, *t.shape).clone() for n, t in init.items()}
            out.update({f"{k}.memory.{n}": t for n, t in mp.items()})
            out.update({f"{k}.optimizer.{n}": t for n, t in self.inner.buffers(m, mp).items()})
        return out

    def step(self, memory, params, grads, *, lr, momentum, buffers, inputs=None):
        delta, new = {}, {}
        for k, g in grads.items():
            rows = g if g.dim() == 4 else g.unsqueeze(-2)  # [B, H, rows, width]: the events
            m = self.memory_for(rows.shape[-1])
            mp = {n: buffers[f"{k}.memory.{n}"] for n in m.shapes()}
            mb = {n: buffers[f"{k}.optimizer.{n}"] for n in self.inner.buffers(m, mp)}
            rate = lambda c: torch.full(g.shape[:2], c, dtype=g.dtype, device=g.device)  # noqa: E731
            alpha = rate(self.rates["retention"])
            kind = self.retention.kind if self.retention else None
            if kind == "decay":
                mp = {n: _bc(alpha, t) * t for n, t in mp.items()}

            def loss(p: Params) -> tuple[torch.Tensor, Params]:
                return self.objective.loss(m.forward(p, rows), rows).sum(), {}

            mg, _ = gradients(loss, mp)
            mdelta, mb = self.inner.step(
                m, mp, mg, lr=rate(self.rates["lr"]), momentum=rate(self.rates["momentum"]), buffers=mb
            )
            if kind == "weight_decay":
                mp = {n: _bc(alpha, t) * t for n, t in mp.items()}
            mp = {n: mp[n] + mdelta[n] for n in mp}
            new.update({f"{k}.memory.{n}": t for n, t in mp.items()})
            new.update({f"{k}.optimizer.{n}": t for n, t in mb.items()})
            delta[k] = -_bc(lr, g) * m.forward(mp, rows).reshape(g.shape)
        return delta, new


def _constant(rate: Any, where: str) -> float:
    if isinstance(rate, GateSpec):
        raise ValueError(f"{where}: a deep momentum level takes constant rates, not gates")
    return float(rate)


def build_optimizer(spec) -> InnerOptimizer:
    """The :class:`InnerOptimizer` of an optimizer spec."""
    if spec.kind == "gd":
        return Gd()
    if spec.kind == "momentum":
        return Momentum(spec.nesterov)
    if spec.kind == "dgd":
        return Dgd(spec.form == "proximal", spec.momentum is not None, spec.inner_errors == "gain")
    if spec.kind == "adam":
        return Adam(tuple(spec.betas), spec.eps, spec.bias_correction)
    if spec.kind == "muon":
        return Muon(spec)
    if spec.kind == "deep_momentum":
        return DeepMomentum(spec)
    raise ValueError(f"unknown optimizer {spec.kind!r}")
