"""Memories: the parametric maps ``M_θ`` of a level, written as pure functions of their parameters.

A memory is a stack of *layers* (matrices acting on column vectors, with an optional bias) and
fixed non-linearities. Parameters live in plain dicts of tensors with two leading dimensions,
batch and head, ``{"w0": [B, H, d_out, d_in], "b0": [B, H, d_out], ...}``, because every
sequence and every head carries its own copy of the state in context.

``forward(params, x)`` reads the memory on ``x [B, H, N, d_in]`` (N tokens, same parameters) and
returns ``[B, H, N, d_out]``. ``forward_with(x, apply)`` is the same computation with the
application of each layer delegated to ``apply(layer, h)``: the reference form applies the
parameters directly, the chunked form applies a layer whose weights change token by token inside
a chunk (the dual form), and DGD records every layer's input. Keeping one description of the
architecture for all three is what makes the execution forms agree by construction.

Naming: ``w<i>`` is layer i (first layer first), ``b<i>`` its bias, ``g<i>`` / ``c<i>`` the gate
branch and its bias of a gated (``swiglu`` / ``geglu``) hidden layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..spec.schema import LinearMemorySpec, MlpMemorySpec, ResidualMlpMemorySpec, resolve_width

__all__ = ["Layer", "Memory", "build_memory", "memory_groups"]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layer:
    """One affine map ``z = W h + b`` of a memory: ``weight`` ``[d_out, d_in]`` per head."""

    weight: str
    bias: str | None
    d_in: int
    d_out: int


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    if name == "tanh":
        return torch.tanh(x)
    raise ValueError(f"unknown activation {name!r}")


def _norm(kind: str, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # parameter-free: a learned scale would be an outer parameter, not part of the memory's state
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), eps=eps)
    if kind == "rms":
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    return x


def apply_layer(params: Params, layer: Layer, h: torch.Tensor) -> torch.Tensor:
    """``h [B, H, N, d_in] -> h Wᵀ + b  [B, H, N, d_out]`` with the layer's own parameters."""
    z = h @ params[layer.weight].transpose(-1, -2)
    if layer.bias is not None:
        z = z + params[layer.bias].unsqueeze(-2)
    return z


def layer_errors(memory: "Memory", params: Params, x: torch.Tensor,
                 loss: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Params, Params]:
    """Every layer's input and output gradient ``δ = ∂ℓ_r/∂z_r`` for all tokens of ``x [..., N, d_in]``
    at once, at ``params``, for ``loss(read) -> scalar`` (a sum over tokens): one batched forward
    and backward. A zero *probe* is added to every layer's pre-activations and the loss is
    differentiated with respect to the probes; each token's loss depends only on its own
    pre-activations, so that gradient is every token's own δ (no per-sample gradients needed)."""

    def probed(probes: Params) -> tuple[torch.Tensor, Params]:
        inputs: Params = {}

        def apply(layer, h):
            inputs[layer.weight] = h
            return apply_layer(params, layer, h) + probes[layer.weight]

        return loss(memory.forward_with(x, apply)), inputs

    # probes carry the parameters' leading axes (a stacked slot axis too) and the tokens
    lead = params[memory.layers[0].weight].shape[:-2] + x.shape[-2:-1]
    zeros = {layer.weight: x.new_zeros(lead + (layer.d_out,)) for layer in memory.layers}
    deltas, inputs = torch.func.grad(probed, has_aux=True)(zeros)
    return inputs, deltas


_JVP_READY = False


def _quiet_jvp_setup() -> None:
    """torch.func.jvp loads torch's forward-mode decompositions on its first call, which are
    TorchScript and warn that ``torch.jit.script`` is deprecated (torch's own code, not a caller's):
    load them once, quietly, on a tiny call."""
    global _JVP_READY
    if _JVP_READY:
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.func.jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))
    _JVP_READY = True


def gain_scales(memory: "Memory", params: Params, x: torch.Tensor, deltas: Params) -> Params:
    """``max(1, ρ_ℓ) [..., N, 1]`` for every layer's error ``δ_ℓ [..., N, d_out_ℓ]``, with
    ``ρ_ℓ = ‖J_ℓ δ_ℓ‖² / ‖δ_ℓ‖²`` per token and ``J_ℓ`` the Jacobian of the read on ``x`` at
    ``params`` with respect to the layer's pre-activation: what DGD's ``inner_errors: gain``
    divides the errors by; ``ρ = 1`` where ``δ = 0``. Differentiable: the outer gradient goes through
    ``ρ`` too. Holding it constant there (an earlier choice) made the backward through time follow a
    map that is not the level's — a HOPE of 4 layers at T=2048 then had a first-step gradient norm
    of 5e2 on CPU (d_model 256, 2.55 with ``ρ`` differentiated) and 1e8 on the GPU (d_model 512,
    1.96 differentiated; docs/hope_stability.md). Where the layer's output reaches the read unchanged
    (``J = I``) the tangent passes through exactly and ``ρ`` is exactly 1, so such a layer keeps its
    error bit for bit."""
    if not _JVP_READY and not torch.compiler.is_compiling():
        _quiet_jvp_setup()  # a compiled block relies on the model's construction having done it
    zeros = {layer.weight: torch.zeros_like(deltas[layer.weight]) for layer in memory.layers}

    def read(probes: Params) -> torch.Tensor:
        return memory.forward_with(x, lambda layer, h: apply_layer(params, layer, h) + probes[layer.weight])

    scales = {}
    for layer in memory.layers:
        d = deltas[layer.weight]
        if layer.weight == memory.direct:
            # J = I: the forward-mode pass would return δ itself, so ρ = 1 (tests/levels/test_dgd_gain.py)
            scales[layer.weight] = d.new_ones(d.shape[:-1] + (1,))
            continue
        # ρ is unchanged when δ is scaled, so ρ(δ/s) with s > 0 held constant has ρ's value and its
        # gradient in δ. With s = δ's largest entry ‖δ/s‖² ≥ 1, so a tiny δ (1e-3 in float16 already)
        # cannot overflow the division's backward, which squares the denominator
        top = d.detach().abs().amax(-1, keepdim=True)
        d = d / torch.where(top > 0, top, torch.ones_like(top))
        tangent = {w: (d if w == layer.weight else z) for w, z in zeros.items()}
        _, jd = torch.func.jvp(read, (zeros,), (tangent,))  # J δ in one forward-mode pass
        den = d.square().sum(-1)
        safe = torch.where(den > 0, den, torch.ones_like(den))  # δ = 0: ρ = 1, no 0/0 in the gradient
        rho = torch.where(den > 0, jd.square().sum(-1) / safe, torch.ones_like(den))
        scales[layer.weight] = rho.clamp_min(1.0).unsqueeze(-1)
    return scales


def gain_normalized(memory: "Memory", params: Params, x: torch.Tensor, deltas: Params) -> Params:
    """Every layer's error divided by :func:`gain_scales` (DGD's ``inner_errors: gain``)."""
    scales = gain_scales(memory, params, x, deltas)
    return {w: d if w == memory.direct else d / scales[w] for w, d in deltas.items()}


class Memory:
    """A memory of one kind at fixed widths (per head).

    Attributes:
        kind: ``linear``, ``mlp`` or ``residual_mlp``.
        d_in: input (key / query) width per head.
        d_out: output (value) width per head.
        layers: the affine layers, in forward order (gate branches right after their layer).
    """

    kind: str
    d_in: int
    d_out: int
    layers: tuple[Layer, ...]
    #: the layer whose pre-activation reaches the read unchanged (up to a residual addition), so the
    #: read's Jacobian with respect to it is the identity; None when a norm or gate follows every layer
    direct: str | None = None
    #: what makes two memories the same function of their parameters (kind, widths, layers,
    #: activation, norm): an explicit tuple, since ``vars()`` of a memory does not trace under
    #: ``torch.compile`` on torch 2.11
    signature: tuple

    def forward_with(self, x: torch.Tensor, apply: Callable[[Layer, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Read on ``x [B, H, N, d_in]`` with layers applied by ``apply``: ``[B, H, N, d_out]``."""
        raise NotImplementedError

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Read on ``x [B, H, N, d_in]`` with ``params`` (leading ``[B, H]``): ``[B, H, N, d_out]``."""
        return self.forward_with(x, lambda layer, h: apply_layer(params, layer, h))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name → per-head shape."""
        out: dict[str, tuple[int, ...]] = {}
        for layer in self.layers:
            out[layer.weight] = (layer.d_out, layer.d_in)
            if layer.bias is not None:
                out[layer.bias] = (layer.d_out,)
        return out

    def init(
        self,
        heads: int,
        *,
        zeros: bool,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Params:
        """Initial parameters per head, ``[H, *shape]``.

        Weights are normal with std ``1/sqrt(d_in)``, biases zero. ``zeros`` zeroes the last layer,
        so an MLP starts as the zero map and a residual MLP as the identity.
        """
        out: Params = {}
        last = self.layers[-1].weight
        for layer in self.layers:
            w = torch.randn(heads, layer.d_out, layer.d_in, generator=generator, dtype=dtype or torch.get_default_dtype())
            w = w.to(device) / math.sqrt(layer.d_in)
            if zeros and layer.weight == last:
                w = torch.zeros_like(w)
            out[layer.weight] = w
            if layer.bias is not None:
                out[layer.bias] = torch.zeros(heads, layer.d_out, dtype=w.dtype, device=w.device)
        return out


class LinearMemory(Memory):
    """``M(x) = W x`` with ``W [d_value, d_key]`` per head (no bias): the matrix memory."""

    def __init__(self, d_in: int, d_out: int) -> None:
        self.kind, self.d_in, self.d_out = "linear", d_in, d_out
        self.layers = (Layer("w0", None, d_in, d_out),)
        self.direct = "w0"
        self.signature = ("linear", d_in, d_out)

    def forward_with(self, x, apply):
        return apply(self.layers[0], x)


class MlpMemory(Memory):
    """``M(x) = W_L σ(… σ(W_1 x))`` with ``depth`` layers; gated activations multiply each hidden
    layer by ``act(G x)`` (SwiGLU: ``silu``, GeGLU: ``gelu``)."""

    def __init__(self, spec: MlpMemorySpec, d_in: int, d_out: int) -> None:
        self.kind, self.d_in, self.d_out = "mlp", d_in, d_out
        self.activation = spec.activation
        self.gated = spec.activation in ("swiglu", "geglu")
        hidden = resolve_width(spec.hidden, d_in)
        dims = [d_in] + [hidden] * (spec.depth - 1) + [d_out]
        layers = []
        for i in range(spec.depth):
            layers.append(Layer(f"w{i}", f"b{i}" if spec.bias else None, dims[i], dims[i + 1]))
            if self.gated and i < spec.depth - 1:
                layers.append(Layer(f"g{i}", f"c{i}" if spec.bias else None, dims[i], dims[i + 1]))
        self.layers = tuple(layers)
        self._by_name = {layer.weight: layer for layer in layers}
        self.depth = spec.depth
        self.direct = f"w{spec.depth - 1}"  # returned as it is (forward_with)
        self.signature = ("mlp", d_in, d_out, self.activation, self.layers)

    def forward_with(self, x, apply):
        h = x
        for i in range(self.depth):
            z = apply(self._by_name[f"w{i}"], h)
            if i == self.depth - 1:
                return z
            if self.gated:
                gate = apply(self._by_name[f"g{i}"], h)
                h = (F.silu(gate) if self.activation == "swiglu" else F.gelu(gate)) * z
            else:
                h = _activation(self.activation, z)
        raise AssertionError("unreachable")


class ResidualMlpMemory(Memory):
    """``M(x) = x + N(W_L σ(… σ(W_1 x)))``: HOPE's memories (``depth`` 2: ``x + W_1 σ(W_2 x)``),
    TTT's ``x + LN(f(x))`` with ``norm: layer``. The norm has no learned scale."""

    def __init__(self, spec: ResidualMlpMemorySpec, d: int) -> None:
        self.kind, self.d_in, self.d_out = "residual_mlp", d, d
        self.activation, self.norm = spec.activation, spec.norm
        hidden = resolve_width(spec.hidden, d)
        dims = [d] + [hidden] * (spec.depth - 1) + [d]
        self.layers = tuple(
            Layer(f"w{i}", f"b{i}" if spec.bias else None, dims[i], dims[i + 1]) for i in range(spec.depth)
        )
        # x + h with the last layer's h, unless a norm follows it
        self.direct = self.layers[-1].weight if spec.norm in (None, "none") else None
        self.signature = ("residual_mlp", d, self.activation, self.norm, self.layers)

    def forward_with(self, x, apply):
        h = x
        for i, layer in enumerate(self.layers):
            h = apply(layer, h)
            if i < len(self.layers) - 1:
                h = _activation(self.activation, h)
        return x + _norm(self.norm, h)


def build_memory(spec, d_in: int, d_out: int) -> Memory:
    """The :class:`Memory` of a memory spec for per-head widths ``d_in → d_out``.

    Raises:
        ValueError: the spec pins widths that differ from the data (``d_key``, ``d_in`` ...), or a
            residual memory is asked to change width.
    """
    if isinstance(spec, LinearMemorySpec):
        for name, want, got in (("d_key", spec.d_key, d_in), ("d_value", spec.d_value, d_out)):
            if want is not None and want != got:
                raise ValueError(f"memory.{name} is {want} but the data is {got} wide per head")
        return LinearMemory(d_in, d_out)
    if isinstance(spec, MlpMemorySpec):
        for name, want, got in (("d_in", spec.d_in, d_in), ("d_out", spec.d_out, d_out)):
            if want is not None and want != got:
                raise ValueError(f"memory.{name} is {want} but the data is {got} wide per head")
        return MlpMemory(spec, d_in, d_out)
    if isinstance(spec, ResidualMlpMemorySpec):
        if d_in != d_out:
            raise ValueError(
                f"a residual_mlp memory maps a width to itself, but keys are {d_in} and values "
                f"{d_out} wide per head"
            )
        return ResidualMlpMemory(spec, d_in)
    raise TypeError(f"not a memory spec: {spec!r}")


def memory_groups(memories: dict[str, Memory]) -> tuple[tuple[str, ...], ...]:
    """The slots grouped by memory architecture, in slot order: slots whose memories are the same
    function of their parameters (kind, widths, layers, activation, norm ...) are solved stacked
    (HOPE's five memories are one group: one stacked solve per layer instead of five).

    Computed once when a run is prepared, not in every chunk step."""
    groups: dict[tuple, list[str]] = {}
    for slot, mem in memories.items():
        groups.setdefault(mem.signature, []).append(slot)
    return tuple(tuple(g) for g in groups.values())
