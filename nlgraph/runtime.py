"""``run_level``: execute one level of a spec on tensors, in the reference or a parallel form.

Contract (issue 3):

* ``level`` is a :class:`~nlgraph.spec.schema.LevelSpec` (or ``AttentionSpec``), a mapping or
  YAML text; it is validated with :func:`nlgraph.spec.loader.load_level`.
* ``keys``, ``values``, ``queries`` are ``[B, T, H, D]`` (keys and queries share ``D_k``; values are
  ``D_v``). They are the level's streams *after* their outer projection, convolution, feature map
  and norm — the runtime owns only the memory. ``queries=None`` reads at the keys (an ``outer``
  level maps its input).
* Self-modifying levels: a stream with ``from: adaptive.<name>`` is produced by the runtime, which
  reads the adaptive memory on the tensor passed in that stream's place — pass the level input
  ``x`` as ``keys=`` for ``keys: {from: adaptive.k}`` — then applies the stream's ``feature_map``
  and ``norm`` (a ``conv`` belongs to the caller, on ``x``). Gates with ``from: adaptive.<name>``
  read the tensor passed for them, or by default the input of the first adaptive stream (keys,
  then values, then queries).
* Rates: ``lr``, ``retention`` (α) and ``momentum`` (μ) are *activated* values, ``[B, T, H]``,
  ``[B, T, H, D]`` for a per-channel retention of a linear memory, or anything broadcastable to
  ``[B, T, H]``. When one is not passed, the spec's constant is used; a spec that declares a
  data-dependent gate needs its tensor.
* An ``outer`` objective takes as ``values`` the outer loss's gradient at the level's output
  (``u = ∂L/∂y``), so its in-context updates follow the outer loss exactly (CMS).
* ``state`` (see :mod:`nlgraph.levels.run` for the layout) continues a sequence: running
  ``[0, t)`` then ``[t, T)`` with the returned state equals running ``[0, T)``, for any ``t``.
  Entries may be omitted (they take their initial values); unknown entries are an error.
* ``form``: ``"reference"`` (per token, the definition), ``"chunked"`` (parallel), or ``"auto"``
  (chunked when the level has a parallel form, else the reference form with one warning).
  ``chunk_size`` is the implementation chunk of the exact chunkwise form; it never changes results.
* ``torch.compile(fullgraph=True)`` traces a call whole, in either form, given a validated spec
  object (validation itself is pydantic, outside the graph) and an explicit ``form``. Continuing
  a level with a period or a gradient-point chunk reads ``state["position"]`` to place the
  boundaries, which is data-dependent; exact online levels never read it.

Returns ``(outputs [B, T, H, D_v], state)``; outputs read the memory after the write of the same
token unless the level says ``read: before_write`` (the state before it) or ``read: chunk_start``
(the state at the gradient point: the last chunk boundary). With ``retention: {toward: initial}``
the state also carries ``origin.*``, the sequence's initial parameters that retention decays toward;
a state without them starts the sequence at the memory it gives.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .compilers import attention as _attention  # noqa: F401  (registers the attention forms)
from .compilers import chunked as _chunked  # noqa: F401  (registers the chunked form)
from .compilers import delta_rule as _delta_rule  # noqa: F401  (registers the delta_rule forms)
from .compilers import linear_attention as _linear_attention  # noqa: F401
from .compilers import forms, select_form
from .compilers import reference as _reference  # noqa: F401  (registers the reference form)
from .compilers.kernels import forms as _kernel_forms  # noqa: F401  (registers the triton forms)
from .levels.run import init_state, prepare
from .spec.loader import load_level
from .spec.schema import AttentionSpec, ChainSpec, DeltaRuleSpec, LevelSpec, LinearAttentionSpec

__all__ = ["init_state", "level_form", "run_level"]

FORMS = ("auto", "reference", "chunked", "triton")
"""The built-in forms; a backend adds more names by registering forms (:mod:`nlgraph.compilers`)."""


def level_form(level: Any, form: str = "auto", device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, head_dim: int | None = None) -> str:
    """The execution form ``run_level`` would use for ``level`` on ``device`` (default CPU) with
    tensors of ``dtype`` whose keys are ``head_dim`` wide per head (``None``: any width a form
    takes): ``"triton"``, ``"chunked"`` or ``"reference"`` (or a form another backend registered).
    It is a ``form`` that ``run_level`` accepts.

    Raises:
        ValueError: ``form`` is not ``auto`` or a registered form of the level's family, or the form
            cannot run the level there (the message says why).
    """
    spec = load_level(level)
    return _select(_family(spec), spec, form, torch.device(device).type if device is not None else "cpu",
                   dtype, head_dim=head_dim).name


def _family(spec: Any) -> str:
    if isinstance(spec, (AttentionSpec, LinearAttentionSpec, DeltaRuleSpec)):
        return spec.kind
    return "memory"


def _select(family: str, spec: Any, form: str, device: str = "cpu", dtype: torch.dtype | None = None,
            head_dim: int | None = None):
    registered = [f.name for f in forms(family)]
    if form != "auto" and form not in registered:
        raise ValueError(f"form must be 'auto' or a form registered for {family} ({', '.join(registered)}), "
                         f"got {form!r}")
    if form != "auto":
        try:
            # a model's plan names its forms for the device it was planned for: a form that cannot
            # take these tensors hands over to its fallback (the same function; the triton forms
            # fall back to chunked)
            return select_form(family, spec, device, dtype, want=form, fall_back=True, head_dim=head_dim)
        except LookupError as e:
            raise ValueError(str(e)) from None
    return select_form(family, spec, device, dtype, head_dim=head_dim)


def run_level(
    level: Any,
    *,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor | None,
    lr: Any = None,
    retention: Any = None,
    momentum: Any = None,
    state: dict[str, torch.Tensor] | None = None,
    form: str = "auto",
    chunk_size: int | None = None,
    phase: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run a level over a sequence. See the module docstring for the full contract.

    Args:
        level: a level spec (object, mapping or YAML text).
        keys: ``[B, T, H, D_k]`` (or the level input ``x`` when keys are adaptive).
        values: ``[B, T, H, D_v]`` (for ``outer``: the gradient of the outer loss at the output).
        queries: ``[B, T, H, D_k]``, or ``None`` to read at the keys.
        lr: learning-rate gate η, activated. Default: the spec's constant.
        retention: retention factor α, activated. Default: the spec's constant.
        momentum: momentum decay μ, activated. Default: the spec's constant.
        state: the state returned by a previous call, or ``None`` for a fresh sequence.
        form: ``"auto"``, ``"reference"`` or ``"chunked"``.
        chunk_size: implementation chunk of the exact chunkwise form (default 64).
        phase: for a continued ``state``, its position modulo the level's schedule cycle
            (:func:`nlgraph.levels.run.cycle`), when the caller knows it on the host; the level then
            does not read ``state["position"]``, a host read that is data-dependent under
            ``torch.compile``. A wrong phase moves the period and chunk boundaries.

    Returns:
        ``(outputs [B, T, H, D_v], state)``.

    Raises:
        ValueError: bad shapes, a missing data-dependent gate, an unknown state entry, or a form
            that cannot run the level (e.g. ``"chunked"`` for an exact-online deep memory).
    """
    spec = load_level(level)
    if isinstance(spec, ChainSpec):
        raise ValueError("run_level runs one level; run the links of a chain one after another")
    if isinstance(spec, AttentionSpec):
        if any(r is not None for r in (lr, retention, momentum)):
            raise ValueError("softmax attention has no learning rate, retention or momentum gates")
        chosen = _select("attention", spec, form, keys.device.type)
        return chosen.run(spec, keys=keys, values=values, queries=queries, state=state)
    if isinstance(spec, (LinearAttentionSpec, DeltaRuleSpec)):
        # closed-form kinds: the learning rate is the delta rule's β, the retention its decay α
        if momentum is not None or (isinstance(spec, LinearAttentionSpec) and (lr, retention) != (None, None)):
            raise ValueError(f"a {spec.kind} takes no {'momentum' if momentum is not None else 'lr or retention'} gate")
        chosen = _select(spec.kind, spec, form, keys.device.type, keys.dtype)
        extra = {"beta": lr, "decay": retention} if isinstance(spec, DeltaRuleSpec) else {}
        return chosen.run(spec, keys=keys, values=values, queries=queries, state=state,
                          chunk_size=chunk_size, **extra)
    assert isinstance(spec, LevelSpec)
    chosen = _select("memory", spec, form, keys.device.type, keys.dtype, head_dim=keys.shape[-1])
    if form == "auto" and chosen.name == "reference":
        reasons = "; ".join(f"{f.name}: {why}" for f in forms("memory")
                            if (why := f.supports(spec, keys.device.type, keys.dtype, head_dim=keys.shape[-1])))
        warnings.warn(
            f"this level has no parallel form, running the per-token reference form ({reasons})",
            stacklevel=2,
        )
    if phase is not None and (not isinstance(phase, int) or phase < 0):
        raise ValueError(f"phase must be a non-negative int (the position modulo the level's cycle), got {phase!r}")
    run = prepare(spec, keys=keys, values=values, queries=queries, lr=lr, retention=retention,
                  momentum=momentum, state=state, phase=phase)
    tensors = [keys, values, queries, lr, retention, momentum, *(state or {}).values()]
    # inner gradients are built with autograd; keep their graphs only when someone will backprop
    graph = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors)
    with torch.set_grad_enabled(graph):
        if "chunk_size" in chosen.options:
            return chosen.run(run, chunk_size=chunk_size)
        return chosen.run(run)
