"""The spec schema: frozen pydantic models for every field of the Nested Learning semantic model.

A spec is a set of named *levels* plus a *model* that stacks them into blocks. A level is an
associative memory ``M_θ`` with an inner objective ``ℓ(M(k), v)``, an inner optimizer (itself
possibly a nested level), a retention rule, stream sources for keys / values / queries / gates, an
update period in tokens, a gradient point and a state lifetime (BRIEF §1).

Conventions every docstring below relies on:

* memories act on column vectors: a linear memory is ``M ∈ R^{d_value × d_key}`` per head, read as
  ``y = M q``;
* gradients follow descent-consistent signs (nested-learning-math.md §8): every optimizer moves the
  memory *down* its inner objective;
* a *rate* (learning rate, retention factor, momentum, Huber δ) is either a constant number or a
  data-dependent gate ``{from: ..., act: ...}`` computed per token.

Every model forbids unknown keys and is immutable, so a validated spec is a hashable value.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ValidationInfo,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from ..limits import MAX_MEMORY_DEPTH, MAX_NS_STEPS, MAX_OPTIMIZER_DEPTH, MAX_REPEAT

__all__ = [
    "ACTIVATIONS",
    "AttentionSpec",
    "ChainSpec",
    "ChunkPointSpec",
    "ClosedFormSpec",
    "DeepMomentumSpec",
    "DeltaRuleSpec",
    "DgdSpec",
    "DotObjectiveSpec",
    "GateSpec",
    "GdSpec",
    "HuberObjectiveSpec",
    "L2ObjectiveSpec",
    "LevelEntry",
    "LevelSpec",
    "LinearAttentionSpec",
    "LinearMemorySpec",
    "LpObjectiveSpec",
    "MemoryContextSpec",
    "MemorySpec",
    "MlpMemorySpec",
    "ModelSpec",
    "MomentumSpec",
    "MuonSpec",
    "AdamSpec",
    "ObjectiveSpec",
    "OptimizerLevelSpec",
    "OptimizerSpec",
    "OuterObjectiveSpec",
    "OutputSpec",
    "ParallelSpec",
    "Rate",
    "ResidualMlpMemorySpec",
    "RetentionSpec",
    "Spec",
    "StreamSpec",
    "Width",
    "resolve_width",
]

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# `from:` of a stream or gate: the level input, the level's own previous output, one of its
# adaptive projections, or another level's output.
SOURCE_RE = re.compile(r"^(input|self|adaptive\.[A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][A-Za-z0-9_]*)$")
WIDTH_RE = re.compile(r"^[0-9]+(\.[0-9]+)?x$")
RESERVED_NAMES = frozenset({"input", "self", "adaptive", "embed", "head", "output"})

ACTIVATIONS = ("identity", "sigmoid", "logsigmoid", "softplus", "exp", "tanh", "silu", "relu")


def _non_ascii_hint(name: str) -> str:
    """``; it contains 'і' (U+0456 CYRILLIC SMALL LETTER …)`` for the first non-ASCII character, so
    a confusable that looks like an ASCII letter is visible in the error."""
    c = next((c for c in name if ord(c) > 127), None)
    if c is None:
        return ""
    return f"; it contains U+{ord(c):04X} {unicodedata.name(c, 'an unnamed character')}, not ASCII"


def _shown(name: str) -> str:
    """A name from the spec as an error shows it: escaped and short (never the whole input)."""
    out = name.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in out)
    return out if len(out) <= 40 else out[:39] + "…"


def _check_identifier(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"name '{_shown(name)}' is not an identifier (ASCII letters, digits and _)"
                         f"{_non_ascii_hint(name)}")
    return name


def _check_level_name(name: str) -> str:
    _check_identifier(name)
    if name in RESERVED_NAMES:
        raise ValueError(f"level name {name!r} is reserved; rename the level")
    return name


Identifier = Annotated[str, AfterValidator(_check_identifier)]
LevelName = Annotated[str, AfterValidator(_check_level_name)]


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,  # a NaN or infinite rate or size is never meant
        use_attribute_docstrings=True,
        validate_default=True,
        populate_by_name=True,
        serialize_by_alias=True,
    )


def _check_width(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a width: a positive integer or a multiple of the input like '4x'")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"width must be at least 1, got {value}")
        return value
    if isinstance(value, str) and WIDTH_RE.match(value.strip()):
        if float(value.strip()[:-1]) <= 0:
            raise ValueError(f"width multiple must be positive, got {value!r}")
        return value.strip()
    raise ValueError(
        f"expected a width: a positive integer or a multiple of the input like '4x', got {value!r}"
    )


Width = Annotated[Union[int, str], Field(union_mode="left_to_right")]
"""A hidden width: an integer number of units, or ``'<k>x'`` meaning k times the input width."""


def resolve_width(width: int | str, base: int) -> int:
    """Turn a :data:`Width` into units, given the width ``base`` of the memory's input."""
    if isinstance(width, int):
        return width
    return max(1, int(round(float(width[:-1]) * base)))


# --------------------------------------------------------------------------- rates and gates


class GateSpec(_Spec):
    """A data-dependent scalar produced per token (and per head or channel) from a stream.

    The value is ``scale * act(W x + b)`` where ``x`` is the source stream at the same token and
    ``W, b`` are outer-level parameters (or, for ``from: adaptive.<name>``, the output of that
    adaptive projection, reduced to the gate's granularity by a fixed linear map).
    """

    from_: str = Field("input", alias="from")
    """Source of the gate: ``input`` (the level input), ``self`` (the entry's own previous output),
    ``adaptive.<name>`` (one of this level's adaptive projections) or the name of another level."""
    act: Literal["identity", "sigmoid", "logsigmoid", "softplus", "exp", "tanh", "silu", "relu"] = (
        "sigmoid"
    )
    """Activation applied to the projected source. ``logsigmoid`` yields a log-space factor that the
    runtime exponentiates (numerically stable decays, as in Mamba2 / Gated DeltaNet); its ``scale``
    multiplies the log, ``α = exp(scale · logsigmoid(z)) = sigmoid(z)^scale`` (GLA's temperature)."""
    per: Literal["scalar", "head", "channel"] = "head"
    """Granularity: one value per token (``scalar``), per token and head (``head``), or per token,
    head and key channel (``channel``: diagonal gates as in GLA / per-channel Titans)."""
    scale: float = 1.0
    """Constant factor applied after the activation (e.g. TTT's η_base); for ``logsigmoid``, to the
    log-space value, before it is exponentiated."""
    bias: float = 0.0
    """Initial value of the projection bias, so a gate can start near a chosen operating point."""

    @field_validator("from_")
    @classmethod
    def _source(cls, v: str) -> str:
        if not SOURCE_RE.match(v):
            raise ValueError(
                f"bad source {v!r}: expected 'input', 'self', 'adaptive.<name>' or a level name"
            )
        return v


def _rate_tag(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return "constant"
    if isinstance(value, (dict, GateSpec)):
        return "gate"
    return None


Rate = Annotated[
    Union[
        Annotated[float, Tag("constant")],
        Annotated[GateSpec, Tag("gate")],
    ],
    Discriminator(
        _rate_tag,
        custom_error_type="rate",
        custom_error_message="expected a number or a gate like {from: input, act: sigmoid}",
    ),
]
"""A constant number, or a :class:`GateSpec` computed from the data at every token."""


# --------------------------------------------------------------------------- memories


class LinearMemorySpec(_Spec):
    """Matrix memory ``M ∈ R^{d_value × d_key}`` per head, read as ``y = M q``."""

    kind: Literal["linear"]
    heads: int = Field(1, ge=1)
    """Number of independent heads; each head has its own matrix."""
    d_key: int | None = Field(None, ge=1)
    """Key (and query) width per head. Default: the level input width divided by ``heads``."""
    d_value: int | None = Field(None, ge=1)
    """Value (and output) width per head. Default: the level input width divided by ``heads``."""
    init: Literal["zeros", "learned"] = "zeros"
    """Initial state ``M_0`` of every sequence: zeros, or a parameter meta-learned by the outer
    loop."""


class MlpMemorySpec(_Spec):
    """Deep memory ``M(x) = W_L σ(… σ(W_1 x))`` with ``depth`` linear layers, per head."""

    kind: Literal["mlp"]
    heads: int = Field(1, ge=1)
    """Number of independent heads; each head has its own MLP acting on its slice."""
    depth: int = Field(2, ge=1, le=MAX_MEMORY_DEPTH)
    """Number of linear layers (1 is a matrix memory with a bias)."""
    hidden: Width = "4x"
    """Hidden width: units, or a multiple of the per-head input width (``'4x'``)."""
    activation: Literal["gelu", "silu", "relu", "relu2", "tanh", "swiglu", "geglu"] = "gelu"
    """Non-linearity between layers; ``swiglu`` / ``geglu`` add a gating branch to each hidden
    layer (Transformer++ MLP)."""
    bias: bool = False
    """Whether each linear layer has a bias."""
    d_in: int | None = Field(None, ge=1)
    """Input width per head. Default: the width of the stream that feeds it."""
    d_out: int | None = Field(None, ge=1)
    """Output width per head. Default: equal to ``d_in``."""
    init: Literal["zeros", "learned"] = "learned"
    """Initial parameters of every sequence: meta-learned by the outer loop (``learned``) or
    ``zeros`` for the last layer (the memory starts as the zero map)."""

    @field_validator("hidden", mode="before")
    @classmethod
    def _hidden(cls, v: Any) -> Any:
        return _check_width(v)


class ResidualMlpMemorySpec(_Spec):
    """Residual deep memory ``M(x) = x + W_1 σ(W_2 x)`` (HOPE's memories; TTT / Miras add a norm)."""

    kind: Literal["residual_mlp"]
    heads: int = Field(1, ge=1)
    """Number of independent heads; each head has its own residual MLP on its slice."""
    depth: int = Field(2, ge=1, le=MAX_MEMORY_DEPTH)
    """Number of linear layers inside the residual branch."""
    hidden: Width = "2x"
    """Hidden width of the residual branch: units, or a multiple of the per-head width."""
    activation: Literal["gelu", "silu", "relu", "relu2", "tanh"] = "gelu"
    """Non-linearity σ inside the residual branch."""
    norm: Literal["none", "layer", "rms"] = "none"
    """Normalisation of the residual branch: ``x + N(W_1 σ(W_2 x))`` (TTT uses ``layer``)."""
    bias: bool = False
    """Whether each linear layer has a bias."""
    init: Literal["zeros", "learned"] = "learned"
    """Initial parameters: meta-learned (``learned``), or ``zeros`` for ``W_1`` so the memory starts
    as the identity (then ``v̂ = v`` and ``k = x`` at the first token)."""

    @field_validator("hidden", mode="before")
    @classmethod
    def _hidden(cls, v: Any) -> Any:
        return _check_width(v)


MemorySpec = Annotated[
    Union[LinearMemorySpec, MlpMemorySpec, ResidualMlpMemorySpec], Field(discriminator="kind")
]
"""The parametric form of a memory, chosen by ``kind``."""


# --------------------------------------------------------------------------- objectives


class DotObjectiveSpec(_Spec):
    """``ℓ(M; k, v) = −⟨M(k), v⟩``: Hebbian; one GD step with lr 1 is linear attention."""

    kind: Literal["dot"]


class L2ObjectiveSpec(_Spec):
    """``ℓ(M; k, v) = ½‖M(k) − v‖²``: regression; one GD step with lr β is the delta rule."""

    kind: Literal["l2"]


class LpObjectiveSpec(_Spec):
    """``ℓ(M; k, v) = ‖M(k) − v‖_p^p`` (Miras / Moneta attentional bias)."""

    kind: Literal["lp"]
    p: float = Field(3.0, ge=1.0)
    """The exponent p ≥ 1."""


class HuberObjectiveSpec(_Spec):
    """Huber loss on ``M(k) − v`` with threshold δ (Miras / Yaad), elementwise."""

    kind: Literal["huber"]
    delta: Rate = 1.0
    """Threshold δ between the quadratic and the linear regime; constant or a gate."""


class OuterObjectiveSpec(_Spec):
    """The model's own training loss: the level is an MLP ``y = M(x)`` whose in-context updates (if
    its frequency is finite) use the gradient of the outer loss (CMS, NeurIPS Eqs. 30–31): at every
    multiple e of the period C the level commits ``θ ← θ − η Σ_{t=e−C}^{e−1} ∇_θ ℓ_t``, every
    gradient at the period-start θ, ℓ_t the model's next-token loss at t."""

    kind: Literal["outer"]
    reduce: Literal["sum", "mean"] = "sum"
    """How the period's per-token gradients combine: their ``sum`` (NeurIPS Eq. 31) or their
    ``mean`` (the sum divided by C)."""
    updates: Literal["in_context", "outer_loop"] = "in_context"
    """``in_context``: the period is run while the model reads a stream (training forward, eval,
    generation, ``model.stream``), each sequence with its own trajectory. ``outer_loop``: the level
    is static inside the forward and the outer optimizer updates it only once every C training
    tokens (the multi-rate outer-optimizer reading; `nlgraph.cms.MultiRateOuter` applies it)."""
    meta_gradient: Literal["first_order", "second_order"] = "first_order"
    """How the outer loop differentiates through the in-context updates: ``first_order`` treats
    each committed step as a constant (the outer gradient of θ_0 is the sum of the gradients at
    every period's parameters); ``second_order`` differentiates through every step (exact, keeps
    the graph of the inner gradients)."""


ObjectiveSpec = Annotated[
    Union[
        DotObjectiveSpec,
        L2ObjectiveSpec,
        LpObjectiveSpec,
        HuberObjectiveSpec,
        OuterObjectiveSpec,
    ],
    Field(discriminator="kind"),
]
"""The inner objective ("attentional bias"), chosen by ``kind``."""


# --------------------------------------------------------------------------- optimizers


class GdSpec(_Spec):
    """Gradient descent: ``M ← M − η ∇ℓ(M)``."""

    kind: Literal["gd"]
    lr: Rate = 1.0
    """Step size η: constant or a gate (DeltaNet's β_t = sigmoid(x W_β))."""


class MomentumSpec(_Spec):
    """Momentum in the Titans form, a second level that compresses past gradients:
    ``S ← μ S − η ∇ℓ(M)``, then ``M ← M + S`` (NeurIPS Eq. 17)."""

    kind: Literal["momentum"]
    lr: Rate = 1.0
    """Step size η (Titans' θ_t) applied to the gradient."""
    momentum: Rate = 0.9
    """Decay μ of the momentum buffer (Titans' η_t); constant or a gate."""
    nesterov: bool = False
    """Apply the look-ahead update ``M ← M + μ S − η ∇ℓ`` instead of ``M ← M + S``."""


class DgdSpec(_Spec):
    """Delta gradient descent (HOPE): GD on an L2 regression of the local surprise, which adds an
    input-direction decay ``M ← M (I − η' k kᵀ) − η' ∇_y ℓ ⊗ k`` (NeurIPS Eqs. 27–29)."""

    kind: Literal["dgd"]
    lr: Rate = 1.0
    """Step size η."""
    form: Literal["explicit", "proximal"] = "explicit"
    """``explicit``: one GD step, η' = η. ``proximal``: the exact proximal argmin (Sherman–Morrison),
    η' = η / (1 + η ‖k‖²)."""
    momentum: Rate | None = None
    """Optional momentum decay μ on top of the DGD step (HOPE's ablation implies one); ``null``
    means none."""
    inner_errors: Literal["raw", "gain"] = "raw"
    """How each layer of a deep memory takes its error ``δ_ℓ = ∂ℓ/∂z_ℓ`` (``z_ℓ`` the layer's
    pre-activation): ``raw``, as the papers write it; ``gain``, divided by
    ``max(1, ‖J_ℓ δ_ℓ‖² / ‖δ_ℓ‖²)``, where ``J_ℓ`` is the Jacobian of the memory's output with
    respect to ``z_ℓ``: the curvature of the read along the layer's error, computed at the gradient
    point; the outer gradient goes through it. A layer whose output reaches the read
    with gain at most 1 (every linear memory, the last layer of an MLP) is unchanged. Why: DGD's
    proximal step bounds a layer's step by its input only; with gradients at a chunk's start, an
    inner layer's step overshoots once the layers above it amplify by more than about 1, and the
    memory's state then grows geometrically from chunk to chunk (docs/hope_stability.md)."""


class AdamSpec(_Spec):
    """Adam on the memory's parameters, step for step as ``torch.optim.Adam`` (bias-corrected)."""

    kind: Literal["adam"]
    lr: Rate = 1e-3
    """Step size."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay of the first and second moment estimates."""
    eps: float = Field(1e-8, gt=0)
    """Added to the square root of the second moment."""
    bias_correction: bool = True
    """Divide the moments by ``1 − β^t``."""

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {list(v)}")
        return v


class MuonSpec(_Spec):
    """Muon: momentum, then Newton–Schulz orthogonalisation of the update, as ``torch.optim.Muon``
    (Atlas' inner optimizer; NeurIPS: a linear momentum memory with a Newton–Schulz output)."""

    kind: Literal["muon"]
    lr: Rate = 0.02
    """Step size."""
    momentum: float = Field(0.95, ge=0.0, lt=1.0)
    """Momentum coefficient of the buffer ``B ← μ B + G``."""
    nesterov: bool = True
    """Orthogonalise ``G + μ B`` instead of ``B``."""
    ns_steps: int = Field(5, ge=1, le=MAX_NS_STEPS)
    """Newton–Schulz iterations."""
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315)
    """Quintic Newton–Schulz coefficients (a, b, c)."""
    eps: float = Field(1e-7, gt=0)
    """Added to the Frobenius norm before the first iteration."""
    adjust_lr: Literal["original", "match_rms_adamw", "none"] = "original"
    """Learning-rate adjustment by the matrix shape, as ``torch.optim.Muon``'s ``adjust_lr_fn``."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay."""


class DeepMomentumSpec(_Spec):
    """Deep momentum GD (DMGD): the momentum buffer is itself a level — a memory trained on its
    own objective over the stream of gradients, with its own inner optimizer — and the memory
    moves by ``M ← M − η · m(∇ℓ)`` (NeurIPS Eqs. 19–24)."""

    kind: Literal["deep_momentum"]
    lr: Rate = 1.0
    """Step size η applied to the momentum memory's output."""
    level: OptimizerLevelSpec
    """The momentum level: its memory, objective, optimizer, retention and frequency."""


class OptimizerLevelSpec(_Spec):
    """A level whose event stream is the gradients of the level it optimizes (keys are the
    gradients; the objective's values are the gradients too, or zero for ``dot``)."""

    memory: MemorySpec
    """The momentum memory (``mlp`` for DMGD, ``linear`` for plain momentum as a memory)."""
    objective: ObjectiveSpec = Field(default_factory=lambda: DotObjectiveSpec(kind="dot"))
    """Its inner objective over gradients; ``dot`` is classic momentum."""
    optimizer: OptimizerSpec = Field(default_factory=lambda: GdSpec(kind="gd"))
    """How the momentum memory itself is updated (an optimizer may nest again)."""
    retention: RetentionSpec | None = None
    """Retention of the momentum memory (the momentum decay)."""
    frequency: Frequency = 1
    """Update period in tokens; must be at most the optimized level's period."""

    @model_validator(mode="after")
    def _nesting(self) -> OptimizerLevelSpec:
        depth, opt = 1, self.optimizer
        while getattr(opt, "kind", None) == "deep_momentum":
            depth, opt = depth + 1, opt.level.optimizer
        if depth > MAX_OPTIMIZER_DEPTH:
            raise ValueError(f"optimizer levels nested {depth} deep; at most {MAX_OPTIMIZER_DEPTH} "
                             f"(deep_momentum inside deep_momentum ...)")
        return self


OptimizerSpec = Annotated[
    Union[GdSpec, MomentumSpec, DgdSpec, AdamSpec, MuonSpec, DeepMomentumSpec],
    Field(discriminator="kind"),
]
"""The inner optimizer, chosen by ``kind``; ``deep_momentum`` nests a level."""


# --------------------------------------------------------------------------- retention, streams


class RetentionSpec(_Spec):
    """How much of the previous state is kept, and in which order relative to the step.

    With retention factor α (``gate``):

    * ``decay``: ``M' = α M``, then the optimizer step on ``M'`` (Gated DeltaNet / Mamba2 order:
      ``M_t = α M (I − β k kᵀ) + β v kᵀ``);
    * ``weight_decay``: the gradient is taken at the undecayed ``M``: ``M_t = α M − η ∇ℓ(M)``
      (Titans / HOPE-DGD order: ``M_t = M (α I − η k kᵀ) + η v kᵀ``).
    """

    kind: Literal["decay", "weight_decay"]
    gate: Rate = 1.0
    """Retention factor α ∈ [0, 1] (1 keeps everything; Titans' forget gate is 1 − α). A gate
    with ``per: channel`` gives a diagonal (GLA-style) retention."""
    toward: Literal["zero", "initial"] = "zero"
    """What the state decays toward. ``zero``: ``α M`` (the papers' ``α_t I``, HOPE Eq. 88, Titans'
    ``(1 − α) M``). ``initial``: ``M_0 + α (M − M_0)``, the sequence's initial (meta-learned) state
    is kept and only what was learned in context decays — with ``zero`` a deep memory forgets its
    meta-learned ``M_0`` like ``α^t`` over a sequence."""


class StreamSpec(_Spec):
    """Where a level's keys, values or queries come from, and how they are shaped."""

    from_: str = Field("input", alias="from")
    """``input`` (the level input), ``self`` (the entry's own output ``[C]`` at the previous token,
    zero before a sequence's first token; the level then runs token by token), ``adaptive.<name>``
    (this level's adaptive projection ``<name>``, a memory updated in context) or the name of an
    earlier level of the block (its output at the same token)."""
    project: bool = True
    """Apply a learned linear projection to the memory's width. With ``false`` the source width
    must already equal it."""
    norm: Literal["none", "l2", "rms"] = "none"
    """Per-head normalisation after projection and convolution (DeltaNet / HOPE use ``l2`` on
    keys and queries)."""
    conv: int = Field(0, ge=0)
    """Kernel size of a causal depthwise short convolution (0: none; HOPE and Gated DeltaNet use
    4)."""
    feature_map: Literal["identity", "silu", "relu", "elu1", "exp", "softmax"] = "identity"
    """Feature map φ applied per head before the normalisation (``elu1`` is 1 + ELU)."""
    self_target: bool = False
    """Values only: every memory regresses onto its own read of the value, ``v̂ = M_{t−1}(v_t)``
    (self-modifying Titans, arXiv Eqs. 83–85)."""

    @field_validator("from_")
    @classmethod
    def _source(cls, v: str) -> str:
        if not SOURCE_RE.match(v):
            raise ValueError(
                f"bad source {v!r}: expected 'input', 'self', 'adaptive.<name>' or a level name"
            )
        return v


class ChunkPointSpec(_Spec):
    """Mini-batch gradient point: gradients are taken at the state of the last chunk boundary."""

    chunk: int = Field(ge=1)
    """Chunk length in tokens (TTT's b, Titans' chunk). A multiple of the level's frequency."""


def _check_gradient_point(value: Any) -> Any:
    if value == "chunk":
        raise ValueError("gradient_point 'chunk' needs a size: write {chunk: 16}")
    if isinstance(value, str) and value != "token":
        raise ValueError(f"expected 'token' or {{chunk: N}}, got {value!r}")
    if not isinstance(value, (str, dict, ChunkPointSpec)):
        raise ValueError(f"expected 'token' or {{chunk: N}}, got {value!r}")
    return value


def _check_frequency(value: Any) -> Any:
    if value == "never":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a period in tokens (an integer >= 1) or 'never', got {value!r}")
    if value < 1:
        raise ValueError(f"period must be at least 1 token (or 'never'), got {value}")
    return value


GradientPoint = Annotated[
    Union[Literal["token"], ChunkPointSpec], BeforeValidator(_check_gradient_point)
]
"""``token`` or ``{chunk: N}``."""

Frequency = Annotated[Union[int, Literal["never"]], BeforeValidator(_check_frequency)]
"""Update period in tokens: 1 is online, C commits every C tokens, ``never`` leaves the level to
the outer training loop."""


class OutputSpec(_Spec):
    """Post-processing of a level's read before the output projection (Titans / GDN style)."""

    norm: Literal["none", "rms", "layer"] = "none"
    """Per-head normalisation of the read."""
    gate: Literal["none", "sigmoid", "silu"] = "none"
    """Multiplicative output gate computed from the level input."""


# --------------------------------------------------------------------------- level entries


class LevelSpec(_Spec):
    """A parametric associative memory updated by an inner optimizer on an inner objective."""

    kind: Literal["level"] = "level"
    memory: MemorySpec
    """The parametric form of ``M_θ`` and its initial state."""
    objective: ObjectiveSpec = Field(default_factory=lambda: L2ObjectiveSpec(kind="l2"))
    """The inner loss ℓ(M(k), v)."""
    optimizer: OptimizerSpec = Field(default_factory=lambda: GdSpec(kind="gd"))
    """The rule turning inner gradients into updates (itself a level for ``deep_momentum``)."""
    retention: RetentionSpec | None = None
    """Retention (decay or weight decay); ``null`` keeps the whole previous state."""
    keys: StreamSpec = Field(default_factory=StreamSpec)
    """Source of the keys k_t (the memory's inputs when writing)."""
    values: StreamSpec = Field(default_factory=StreamSpec)
    """Source of the values v_t (the regression targets when writing)."""
    queries: StreamSpec = Field(default_factory=StreamSpec)
    """Source of the queries q_t (the memory's inputs when reading)."""
    adaptive: dict[Identifier, MemorySpec] = Field(default_factory=dict)
    """Adaptive projections: named memories updated in context by this level's objective and
    optimizer, whose outputs feed streams and gates through ``from: adaptive.<name>``
    (self-modifying Titans: ``k``, ``v``, ``eta``, ``alpha``)."""
    frequency: Frequency = 1
    """Update period C in tokens: the summed updates of every C tokens are committed together and
    reads see only committed state. ``never``: only the outer training loop updates it."""
    gradient_point: GradientPoint = "token"
    """Where gradients are linearised: ``token`` (at the current state, exact online) or
    ``{chunk: N}`` (at the last N-token boundary: TTT / Titans mini-batch semantics)."""
    lifetime: Literal["sequence", "persistent"] = "sequence"
    """``sequence``: state resets to the initial state for every sequence. ``persistent``: state
    carries over across sequences (continual learning): a fresh sequence starts from the committed
    parameters and optimizer buffers the level had at the end of the model's last call, per batch
    row (``model.save_memory`` / ``load_memory`` / ``reset_memory``); its position, uncommitted
    partial period, gradient-point anchor and retention origin start afresh. The memory of a
    ``memory_context`` group does not carry its state yet."""
    read: Literal["after_write", "before_write", "chunk_start"] = "after_write"
    """What the output at token t reads: the memory after the write of token t (``after_write``),
    before it (``before_write``: the rolling state ``M_{t−1}``, HOPE arXiv Eq. 94), or the state at
    the gradient point — the last chunk boundary of ``gradient_point: {chunk: N}`` or the committed
    state of a period (``chunk_start``: arXiv Eq. 90, where the read is among the quantities taken
    at the chunk boundary). For an exact-online level ``chunk_start`` equals ``before_write``."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Normalisation and gating of the read."""

    @model_validator(mode="after")
    def _outer_has_no_streams(self) -> LevelSpec:
        if self.objective.kind == "outer":
            # compared with the defaults, not `model_fields_set`, so a fully dumped spec reloads
            for field in ("keys", "values", "adaptive"):
                if getattr(self, field) != type(self).model_fields[field].get_default(call_default_factory=True):
                    raise ValueError(
                        f"an 'outer' objective learns from the model's training loss and maps its "
                        f"input directly; remove '{field}'"
                    )
        if self.values.self_target and self.objective.kind not in ("l2", "lp", "huber", "dot"):
            raise ValueError("values.self_target needs a regression objective (l2, lp, huber, dot)")
        if self.keys.self_target or self.queries.self_target:
            raise ValueError("self_target applies to values only")
        return self

    @field_validator("gradient_point")
    @classmethod
    def _chunk_multiple(cls, v: Any, info: ValidationInfo) -> Any:
        freq = info.data.get("frequency")
        if isinstance(v, ChunkPointSpec) and isinstance(freq, int) and v.chunk % freq:
            raise ValueError(f"chunk ({v.chunk}) must be a multiple of frequency ({freq})")
        return v


def in_context_outer_problem(level: LevelSpec) -> tuple[str, str] | None:
    """Why a model cannot run ``level`` as an in-context ``outer`` level (a CMS link with a finite
    period), as ``(message, YAML sub-path)``, or ``None``. Its step is one update per period from
    the period's summed gradient, so per-token quantities have no meaning there. (The level runtime
    reads an ``outer`` objective per token, so a level spec alone is not refused: the graph stage
    asks this of the levels a model stacks.)"""
    opt = level.optimizer
    if opt.kind in ("dgd", "deep_momentum"):
        return (f"an in-context 'outer' level commits one step per period from the period's gradient; "
                f"optimizer '{opt.kind}' is defined per event; use gd, momentum, adam or muon", "optimizer.kind")
    if opt.kind == "muon" and getattr(level.memory, "bias", False):
        return "optimizer muon orthogonalises matrices, but the memory has biases; set memory.bias: false", "memory.bias"
    for name in ("lr", "momentum"):
        if isinstance(getattr(opt, name, None), GateSpec):
            return (f"an in-context 'outer' level takes a constant {name} (one step per period, not per "
                    f"token); write a number", f"optimizer.{name}")
    return None


class AttentionSpec(_Spec):
    """Softmax attention as a non-parametric memory: the Nadaraya–Watson minimiser of a weighted L2
    regression over all past (key, value) pairs, or the last ``window`` of them."""

    kind: Literal["attention"]
    heads: int = Field(ge=1)
    """Number of attention heads."""
    d_head: int | None = Field(None, ge=1)
    """Width per head. Default: the model width divided by ``heads``."""
    kv_heads: int | None = Field(None, ge=1)
    """Key/value heads for grouped-query attention; must divide ``heads``. Default: ``heads``."""
    window: int | None = Field(None, ge=1)
    """Sliding-window length in tokens; ``null`` is global causal attention."""
    rotary: bool = True
    """Rotary position embedding on queries and keys."""
    rope_base: float = Field(10000.0, gt=0)
    """Base of the rotary frequencies."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head."""
    persistent_tokens: int = Field(0, ge=0)
    """Learned input-independent tokens prepended to the keys and values (Titans persistent
    memory)."""
    keys: StreamSpec = Field(default_factory=StreamSpec)
    """Source of the keys."""
    values: StreamSpec = Field(default_factory=StreamSpec)
    """Source of the values."""
    queries: StreamSpec = Field(default_factory=StreamSpec)
    """Source of the queries."""

    @field_validator("kv_heads")
    @classmethod
    def _kv_heads_divide(cls, v: int | None, info: ValidationInfo) -> int | None:
        heads = info.data.get("heads")
        if v is not None and heads and heads % v:
            raise ValueError(f"kv_heads ({v}) must divide heads ({heads})")
        return v


class _ClosedFormEntry(_Spec):
    """Fields every closed-form kind shares: heads, widths, streams and the read's output."""

    heads: int = Field(1, ge=1)
    """Number of heads, each with its own ``d_value × d_key`` state."""
    d_key: int | None = Field(None, ge=1)
    """Key (and query) width per head. Default: the model width divided by ``heads``."""
    d_value: int | None = Field(None, ge=1)
    """Value width per head. Default: the model width divided by ``heads``."""
    keys: StreamSpec = Field(default_factory=StreamSpec)
    """Source of the keys k_t (L2-normalise them for the delta rule: it is stable for ‖k‖ ≤ 1,
    β ≤ 1)."""
    values: StreamSpec = Field(default_factory=StreamSpec)
    """Source of the values v_t."""
    queries: StreamSpec = Field(default_factory=StreamSpec)
    """Source of the queries q_t."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Normalisation and gating of the read."""

    @model_validator(mode="after")
    def _plain_streams(self) -> _ClosedFormEntry:
        _check_closed_form_streams(self)
        return self


class LinearAttentionSpec(_ClosedFormEntry):
    """Linear attention (Katharopoulos et al. 2020) as a closed-form kind: no inner objective or
    optimizer is declared, the rule is written out,

        S_t = S_{t−1} + v_t k_tᵀ,   y_t = S_t q_t = Σ_{s≤t} (q_t·k_s) v_s   (S_0 = 0),

    with φ applied by the streams' ``feature_map``. Nested learning derives the same function as one
    GD step (lr 1) on the dot objective of a zero-initialised linear memory; ``nlgraph equiv`` checks
    the pair ``linear_attention`` / ``equiv/linear_attention_kind``."""

    kind: Literal["linear_attention"]
    normalize: bool = False
    """Divide the read by ``q_t · Σ_{s≤t} k_s`` (the original paper's normaliser; needs positive
    feature maps such as ``elu1``). Off, the read is unnormalised (use ``output.norm``)."""

class DeltaRuleSpec(_ClosedFormEntry):
    """The (gated) delta rule as a closed-form kind (DeltaNet, Schlag et al. 2021 / Yang et al.
    2024; Gated DeltaNet, Yang et al. 2025 with ``decay``):

        S_t = α_t S_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,   y_t = S_t q_t   (S_0 = 0).

    Nested learning derives it as one GD step (lr β_t) on ½‖S k_t − v_t‖² after decaying the state
    by α_t; ``nlgraph equiv`` checks the pairs ``deltanet`` / ``equiv/deltanet_rule`` and
    ``gated_deltanet`` / ``equiv/gated_deltanet_rule``."""

    kind: Literal["delta_rule"]
    beta: Rate = Field(default_factory=lambda: GateSpec(act="sigmoid", per="head"))
    """Writing strength β_t ∈ (0, 1]: constant or a gate (per head or scalar)."""
    decay: Rate | None = None
    """State decay α_t ∈ (0, 1], applied before the step (Gated DeltaNet); ``null``: none. A gate
    with ``act: logsigmoid`` gives α = sigmoid(z) computed in log space."""

    @model_validator(mode="after")
    def _scalar_rates(self) -> DeltaRuleSpec:
        for name in ("beta", "decay"):
            rate = getattr(self, name)
            if isinstance(rate, GateSpec) and rate.per == "channel":
                raise ValueError(
                    f"{name} of a delta_rule is per head or scalar; for per-channel rates write the "
                    f"level out (memory: linear, objective: l2, optimizer: gd, retention: decay)"
                )
        return self


def _check_closed_form_streams(entry: Any) -> None:
    for role in ("keys", "values", "queries"):
        s = getattr(entry, role)
        if s.self_target:
            raise ValueError(f"{role}.self_target needs a level with an inner objective")
        if s.from_.startswith("adaptive."):
            raise ValueError(
                f"{role} from '{s.from_}': a {entry.kind} has no adaptive projections; read from "
                f"input or another level"
            )
    for name in ("beta", "decay"):
        rate = getattr(entry, name, None)
        if isinstance(rate, GateSpec) and rate.from_.startswith("adaptive."):
            raise ValueError(f"{name} from '{rate.from_}': a {entry.kind} has no adaptive projections")


class ChainSpec(_Spec):
    """A chain of levels applied one after another, ``y = M_K(… M_1(x))`` — the Continuum Memory
    System when its links are MLPs with increasing periods (NeurIPS Eqs. 30–31)."""

    kind: Literal["chain"]
    levels: list[LevelSpec] = Field(min_length=1)
    """The links, applied in order (fastest first in a CMS)."""
    order: Literal["increasing", "any"] = "increasing"
    """``increasing``: periods must not decrease along the chain (CMS: high to low frequency);
    ``any`` lifts the rule for experiments."""
    residual: bool = True
    """Each link adds its input back: ``x ← x + M_i(norm(x))``."""


class ParallelSpec(_Spec):
    """Levels run side by side on the same input and combined — Titans' memory as a gate (MAG,
    Titans Eq. 28: ``o = y ⊗ M(x)`` with y the sliding-window attention output)."""

    kind: Literal["parallel"]
    branches: list[LevelName] = Field(min_length=2)
    """Names of the levels (defined under ``levels``) that read the same input; each keeps its own
    state. A branch may be a level, attention or a closed-form kind, not a chain or another group."""
    combine: Literal["gate", "sum", "mean"] = "gate"
    """``gate`` (two branches): ``o = N_1(y_1) ⊙ σ(N_2(y_2))`` with learned RMS norms (Titans MAG:
    "we normalize the outputs using learnable vector-valued weights, followed by a non-linearity");
    ``sum`` / ``mean`` of the branch outputs."""

    @model_validator(mode="after")
    def _gate_pairs(self) -> ParallelSpec:
        if self.combine == "gate" and len(self.branches) != 2:
            raise ValueError(f"combine: gate needs exactly two branches, got {len(self.branches)}; "
                             f"use sum or mean for more")
        if len(set(self.branches)) != len(self.branches):
            raise ValueError("a level appears twice in branches; define a second level for a copy")
        return self


class MemoryContextSpec(_Spec):
    """Titans' memory as a context (MAC, Titans Eqs. 21–25): the sequence is cut into segments;
    for every segment the memory is read with the segment's queries (``h = M_{s−1}(q)``, the state
    at the segment start), attention runs over the persistent tokens, ``h`` and the segment, the
    memory is then trained on the attention output ``y`` and read after its writes, and
    ``o = N_1(y) ⊙ σ(N_2(M(y)))``.

    Causality (a reading of the paper, math.md §8): token i of a segment sees ``h_j`` and ``x_j`` only
    for ``j ≤ i`` (both are interleaved, ``[h_1, x_1, h_2, x_2, …]``, under a causal mask), and
    the memory's output at token i reads the state after writing token i — never a state that has
    seen later tokens of the segment."""

    kind: Literal["memory_context"]
    memory: LevelName
    """Name of the neural memory level (a parametric ``level`` with a linear or deep memory, keys,
    values and queries from its input, no adaptive projections)."""
    attention: LevelName
    """Name of the ``attention`` level that attends within a segment (its ``persistent_tokens``
    are the persistent memory); its ``window`` must be unset."""
    segment: int = Field(ge=1)
    """Segment length C in tokens (attention never looks past the current segment)."""


def _entry_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("kind", "level")
        return kind if isinstance(kind, str) else None
    return getattr(value, "kind", None)


LevelEntry = Annotated[
    Union[
        Annotated[LevelSpec, Tag("level")],
        Annotated[AttentionSpec, Tag("attention")],
        Annotated[ChainSpec, Tag("chain")],
        Annotated[LinearAttentionSpec, Tag("linear_attention")],
        Annotated[DeltaRuleSpec, Tag("delta_rule")],
        Annotated[ParallelSpec, Tag("parallel")],
        Annotated[MemoryContextSpec, Tag("memory_context")],
    ],
    Discriminator(_entry_tag),
]
"""An entry of ``levels``: a parametric ``level`` (the default kind), non-parametric
``attention``, a ``chain`` of levels, a closed-form ``linear_attention`` / ``delta_rule``, or a
group of other levels (``parallel``, ``memory_context``)."""

ClosedFormSpec = Union[LinearAttentionSpec, DeltaRuleSpec]
"""Entry kinds whose update rule is written out instead of derived from an objective."""


# --------------------------------------------------------------------------- model and spec


class ModelSpec(_Spec):
    """How levels are stacked into a language model."""

    vocab: int = Field(ge=2)
    """Vocabulary size (256 for the byte-level tokenizer)."""
    d_model: int = Field(ge=1)
    """Residual stream width."""
    blocks: list[list[str]] = Field(min_length=1)
    """Ordered blocks; each block is an ordered list of level names applied one after another,
    each wrapped in a residual connection."""
    repeat: int = Field(1, ge=1, le=MAX_REPEAT)
    """How many times the whole ``blocks`` list is stacked (with fresh parameters each time)."""
    norm: Literal["rms", "layer", "none"] = "rms"
    """Normalisation used around every level and before the head."""
    norm_position: Literal["pre", "post"] = "pre"
    """``pre``: ``x + f(norm(x))``; ``post``: ``norm(x + f(x))``."""
    residual: bool = True
    """Wrap every block entry in a residual connection."""
    final_norm: bool = True
    """Normalise the residual stream before the head."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""

    @field_validator("blocks", mode="before")
    @classmethod
    def _blocks_shorthand(cls, v: Any) -> Any:
        # `blocks: [mixer, mlp]` is one block; `blocks: [[a, b], [c]]` lists several.
        if isinstance(v, list) and v and all(isinstance(b, str) for b in v):
            return [v]
        if isinstance(v, list):
            return [[b] if isinstance(b, str) else b for b in v]
        return v

    @field_validator("blocks")
    @classmethod
    def _blocks_nonempty(cls, v: list[list[str]]) -> list[list[str]]:
        for i, block in enumerate(v):
            if not block:
                raise ValueError(f"block {i} is empty; list at least one level name")
            for name in block:
                if not NAME_RE.match(name):
                    raise ValueError(f"block {i} names '{_shown(name)}', not a level name (ASCII "
                                     f"letters, digits and _){_non_ascii_hint(name)}")
        return v


class Spec(_Spec):
    """A whole nlgraph spec: named levels and the model that stacks them."""

    name: str | None = None
    """Short name of the architecture (shown by ``nlgraph show``)."""
    description: str | None = None
    """One-paragraph description."""

    @field_validator("name")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        # `validate` prints the name in its one-line verdict: a line break could forge a second line
        if v is not None and (len(v) > 100 or any(c in v for c in "\n\r\x0b\x0c\x85\u2028\u2029")):
            raise ValueError("a name is one line of at most 100 characters; put more in 'description'")
        return v
    vars: dict[str, Any] = Field(default_factory=dict)
    """Free values for ``${vars.<name>}`` interpolation (shared sizes, rates); not interpreted."""
    levels: dict[LevelName, LevelEntry] = Field(min_length=1)
    """The levels, keyed by name. Names are identifiers and may not be reserved words
    (``input``, ``self``, ``adaptive``, ``embed``, ``head``, ``output``)."""
    model: ModelSpec
    """How the levels are stacked into a model."""



LinearAttentionSpec.model_rebuild()
DeltaRuleSpec.model_rebuild()
DeepMomentumSpec.model_rebuild()
OptimizerLevelSpec.model_rebuild()
LevelSpec.model_rebuild()
ChainSpec.model_rebuild()
Spec.model_rebuild()
