"""Resource bounds: what a spec may make nlgraph read, loop over or allocate.

Specs are shared data (papers publish them, checkpoints keep them), so every size a spec controls is
bounded *before* anything is allocated:

* reading: the file size and the number and nesting of YAML nodes (aliases expanded), checked by the
  loader before the YAML is built (:class:`Limits`);
* looping: ``model.repeat``, memory ``depth``, Newton–Schulz steps and the nesting of optimizer
  levels, checked by the schema (the constants below);
* allocating: parameters and memory per model, checked by :func:`check_model_size` in
  :func:`nlgraph.build` and ``nlgraph compile`` (and training) against the target device, with the
  estimate in the error.

Every bound a trusted spec might legitimately exceed can be raised (``--max-spec-bytes``,
``--max-params``, ``--max-memory`` on the command line; :class:`Limits` in Python).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from .errors import NLGraphError

__all__ = [
    "MAX_MEMORY_DEPTH",
    "MAX_NS_STEPS",
    "MAX_OPTIMIZER_DEPTH",
    "MAX_REPEAT",
    "Limits",
    "ModelSize",
    "ResourceError",
    "check_model_size",
    "count_parameters",
    "device_memory",
    "estimate_model_size",
    "format_bytes",
    "parse_size",
]

MAX_REPEAT = 1024
"""Largest ``model.repeat`` (GPT-3 has 96 layers; 1024 blocks is already far beyond practice)."""
MAX_MEMORY_DEPTH = 64
"""Largest ``depth`` of an ``mlp`` / ``residual_mlp`` memory."""
MAX_NS_STEPS = 100
"""Largest ``ns_steps`` of a Muon optimizer."""
MAX_OPTIMIZER_DEPTH = 4
"""Deepest nesting of optimizer levels (``deep_momentum`` inside ``deep_momentum`` …)."""

MAX_INT = 2**53
"""Largest magnitude of an integer in a spec (exactly representable as a float, so JSON-safe)."""


class ResourceError(NLGraphError):
    """A spec would make nlgraph read, loop over or allocate more than the configured bounds."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a spec may make nlgraph read and allocate; pass a raised copy for a trusted
    spec (``Limits(max_params=10**11)``)."""

    max_spec_bytes: int = 1 << 20
    """Largest spec file (or YAML text) in bytes; the library specs are about 3 kB."""
    max_yaml_nodes: int = 10_000
    """Most YAML nodes in one file, aliases expanded, and most nodes after interpolation."""
    max_yaml_depth: int = 48
    """Deepest nesting of YAML mappings and lists."""
    max_string: int = 10_000
    """Longest string an interpolation may produce."""
    max_params: int = 10**10
    """Most parameters per model (10 B)."""
    max_memory: int | None = None
    """Most bytes a model may need on its device (parameters, gradients and activations where
    known); ``None``: the device's memory (GPU memory, or the machine's RAM for the CPU)."""

    def raised(self, **kw: Any) -> Limits:
        """A copy with the given fields replaced (``None`` values keep the current one)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgtKMGT]?)(i?)[bB]?\s*$")


def parse_size(text: str) -> int:
    """``'80G'`` → 80·2³⁰ bytes, ``'1.5e9'`` → 1 500 000 000, ``'2M'`` → 2·2²⁰ (binary units; a plain
    number is taken as is). Raises ``ValueError`` on anything else."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"expected a size such as 1000000, 1.5e9, 512M or 80G, got {text!r}")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"expected a positive size, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _format_count(n: int) -> str:
    for div, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def device_memory(device: Any) -> int | None:
    """Total memory of ``device`` in bytes: the GPU's memory, the machine's RAM for the CPU,
    ``None`` for devices that allocate nothing (``meta``) or cannot be queried."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "meta":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    if dev.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return None
    return None


def count_parameters(spec: Any) -> int:
    """Parameters of the model of ``spec``, counted without allocating anything and without
    building all ``repeat`` copies: one structure-only build (PyTorch's ``meta`` device) with
    ``repeat: 1`` gives the parameters of one copy of ``blocks`` (each copy has fresh parameters of
    the same shapes) and those shared by all (embedding, head, final norm)."""
    import torch

    from .model import NLModel

    one = spec.model_copy(update={"model": spec.model.model_copy(update={"repeat": 1})})
    with torch.device("meta"):
        model = NLModel(one)
    total = sum(p.numel() for p in model.parameters())
    per_copy = sum(p.numel() for p in model.blocks.parameters())
    return total + (spec.model.repeat - 1) * per_copy


@dataclass(frozen=True)
class ModelSize:
    """What a model of a spec needs: parameters, and bytes for weights (+ gradients when training)
    and activations (``batch`` × ``length`` tokens, when given)."""

    params: int
    weight_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def estimate_model_size(
    spec: Any,
    *,
    dtype_bytes: int = 4,
    batch: int = 0,
    length: int = 0,
    training: bool = False,
    optimizer_states: int = 0,
) -> ModelSize:
    """Parameters (exact, :func:`count_parameters`) and a coarse memory estimate.

    Weights take ``params × dtype_bytes``; training adds gradients of the same size, and
    ``optimizer_states`` more copies (2 for Adam / AdamW, kept in float32). Activations
    (``batch`` × ``length`` tokens) are estimated per token as the residual stream, saved a few
    times per block entry (norm, entry input and output: 4 × d_model) for every entry of every
    repeat, plus the logits and their gradient (2 × vocab); and per sequence, the state of every
    matrix memory (``heads × d_key × d_value``). Deep memories' states, per-token states of
    reference forms and attention scores are left out: the estimate is a floor, meant to refuse the
    absurd before allocating, not to predict peak memory.
    """
    params = count_parameters(spec)
    weights = params * dtype_bytes * (2 if training else 1) + params * 4 * optimizer_states
    acts = 0
    if batch and length:
        entries = sum(len(b) for b in spec.model.blocks) * spec.model.repeat
        per_token = 4 * spec.model.d_model * entries + 2 * spec.model.vocab
        acts = batch * (length * per_token + spec.model.repeat * _state_size(spec)) * dtype_bytes
    return ModelSize(params, weights, acts)


def _state_size(spec: Any) -> int:
    """Values in one sequence's in-context state of one copy of ``blocks``: ``heads × d_key ×
    d_value`` for every matrix memory updated in context (deep memories and attention caches are
    left out: a floor)."""
    from .graph import build_graph

    total = 0
    for _, node in build_graph(spec).nodes(data=True):
        entry = node.get("spec")
        matrix = node["kind"] in ("linear_attention", "delta_rule") or (
            node["kind"] == "level" and getattr(getattr(entry, "memory", None), "kind", None) == "linear"
            and entry.frequency != "never")
        if matrix:
            total += node["heads"] * node["d_in"] * node["d_out"]
    return total


def check_model_size(
    spec: Any,
    *,
    device: Any = None,
    dtype_bytes: int = 4,
    batch: int = 0,
    length: int = 0,
    training: bool = False,
    optimizer_states: int = 0,
    limits: Limits | None = None,
) -> ModelSize:
    """Refuse, before allocating, a model over ``limits.max_params`` parameters or over the memory
    of ``device`` (``limits.max_memory`` when set). Returns the estimate.

    Raises:
        ResourceError: one line with the estimate, the bound and the flag that raises it.
    """
    limits = limits or Limits()
    try:
        size = estimate_model_size(spec, dtype_bytes=dtype_bytes, batch=batch, length=length,
                                   training=training, optimizer_states=optimizer_states)
    except (RuntimeError, ValueError, OverflowError) as e:
        # torch refuses shapes past its index range before we could count them
        raise ResourceError(f"the model's sizes are too large to build ({str(e).splitlines()[0]}); "
                            f"reduce the widths in the spec") from None
    name = getattr(spec, "name", None) or "spec"
    if size.params > limits.max_params:
        raise ResourceError(
            f"{name}: the model has {_format_count(size.params)} parameters ({size.params:,}), over "
            f"the limit of {_format_count(limits.max_params)}; reduce the spec's sizes or raise the "
            f"limit with --max-params (Limits(max_params=...))")
    cap = limits.max_memory if limits.max_memory is not None else device_memory(device)
    if cap is not None and size.total_bytes > cap:
        what = f"{format_bytes(size.weight_bytes)} of weights" + (" and gradients" if training else "") \
            + (" and optimizer states" if optimizer_states else "")
        if size.activation_bytes:
            what += f" + {format_bytes(size.activation_bytes)} of activations at {batch}x{length} tokens"
        where = "the limit" if limits.max_memory is not None else f"the memory of device '{device or 'cpu'}'"
        raise ResourceError(
            f"{name}: the model needs at least {format_bytes(size.total_bytes)} ({what}, "
            f"{_format_count(size.params)} parameters), over {where} ({format_bytes(cap)}); reduce "
            f"the spec's sizes or raise the limit with --max-memory SIZE (Limits(max_memory=...))")
    return size
