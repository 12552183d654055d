"""A level ready to execute: the spec resolved against the data, and the state layout.

:func:`prepare` turns ``run_level``'s arguments into a :class:`LevelRun`: memories at their widths,
objective, optimizer, rates as tensors, streams, the update period and the gradient point, and a
complete state. Execution forms (:mod:`nlgraph.compilers.reference`, :mod:`nlgraph.compilers.chunked`)
only read a ``LevelRun``; they never look at arguments again.

State layout (a flat ``dict[str, Tensor]``; every memory tensor has leading ``[B, H]``):

* ``position``: 0-d int64, tokens consumed so far (decides where chunk and period boundaries fall
  when a sequence is continued);
* ``memory.<p>``: the level memory's *committed* parameters — what reads see;
* ``adaptive.<name>.<p>``: the same for each adaptive projection;
* ``pending.<slot>.<p>``: with period C > 1, the summed updates of the current period that are not
  committed yet (zero right after a commit; a partial last period stays here);
* ``anchor.<slot>.<p>``: with a gradient-point chunk N longer than the period, the parameters at
  the last N-boundary, where gradients are linearised;
* ``origin.<slot>.<p>``: with ``retention: {toward: initial}``, the initial parameters ``M_0`` of
  the sequence, which retention decays toward (constant over the sequence);
* ``optimizer.<slot>.<buffer>``: the inner optimizer's buffers (``momentum.w0``, ``exp_avg.w0``,
  ``step``, deep-momentum memories ``w0.memory.w0`` ...).

``<slot>`` is ``memory`` or ``adaptive.<name>``.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..spec.schema import ChunkPointSpec, LevelSpec, LinearMemorySpec, StreamSpec
from .gates import AdaptiveGate, resolve_rate
from .memories import Memory, build_memory, memory_groups
from .objectives import Objective, build_objective
from .optimizers import InnerOptimizer, build_optimizer

__all__ = ["LevelRun", "Stream", "init_state", "periods", "prepare", "schedule"]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Stream:
    """Keys, values or queries: the tensor itself (``slot is None``), or the input ``x`` of the
    adaptive memory ``slot`` that produces it (then ``feature_map`` and ``norm`` of the stream
    spec are applied to the memory's read)."""

    data: torch.Tensor  # [B, T, H, D]
    slot: str | None
    spec: StreamSpec

    def post(self, y: torch.Tensor) -> torch.Tensor:
        """Feature map and norm of an adaptive stream's read ``[..., D]`` (no learned scale)."""
        fm = self.spec.feature_map
        if fm == "silu":
            y = F.silu(y)
        elif fm == "relu":
            y = F.relu(y)
        elif fm == "elu1":
            y = 1.0 + F.elu(y)
        elif fm == "exp":
            y = torch.exp(y)
        elif fm == "softmax":
            y = torch.softmax(y, dim=-1)
        if self.spec.norm == "l2":
            y = F.normalize(y, dim=-1, eps=1e-6)
        elif self.spec.norm == "rms":
            y = F.rms_norm(y, (y.shape[-1],), eps=1e-6)
        return y


@dataclass
class LevelRun:
    """Everything an execution form needs. Rates are ``[B, T, H]`` (retention may be
    ``[B, T, H, D]``) or :class:`~nlgraph.levels.gates.AdaptiveGate`; ``None`` when unused."""

    spec: LevelSpec
    shape: tuple[int, int, int]
    memories: dict[str, Memory]
    objective: Objective
    optimizer: InnerOptimizer
    retention: str | None
    period: int | None
    chunk: int
    read_before: bool
    self_target: bool
    keys: Stream
    values: Stream
    queries: Stream
    lr: Any
    alpha: Any
    mu: Any
    state: dict[str, torch.Tensor]
    position: int  # tokens consumed before this call; 0 when no period or chunk depends on it
    read: str = "after_write"  # after_write, before_write or chunk_start (the gradient point)
    groups: tuple[tuple[str, ...], ...] = ()  # slots by memory architecture (memory_groups)

    @property
    def has_origin(self) -> bool:
        """Retention decays toward the sequence's initial state ``M_0`` (``origin.*`` entries)."""
        return self.spec.retention is not None and self.spec.retention.toward == "initial"

    @property
    def online(self) -> bool:
        """Exact online semantics: every token commits and gradients are at the current state."""
        return self.period == 1 and self.chunk == 1

    @property
    def has_pending(self) -> bool:
        return self.period is not None and self.period > 1

    @property
    def has_anchor(self) -> bool:
        return self.period is not None and self.chunk > self.period

    def params(self, kind: str, slot: str) -> Params:
        """A slot's parameters from the input state: ``kind`` ``""`` (committed), ``"pending"``
        or ``"anchor"``; keys are parameter names, tensors ``[B, H, ...]``."""
        prefix = f"{kind}.{slot}." if kind else f"{slot}."
        return {p: self.state[prefix + p] for p in self.memories[slot].shapes()}

    def buffers(self, slot: str) -> Params:
        """A slot's optimizer buffers from the input state, by buffer name."""
        prefix = f"optimizer.{slot}."
        return {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}


def schedule(start: int, length: int, period: int) -> list[tuple[int, int]]:
    """Split tokens ``[0, length)`` of a sequence continued at global position ``start`` into
    segments that end on global multiples of ``period``: ``[(begin, end), ...]``."""
    out, t = [], 0
    while t < length:
        end = min(length, t + period - (start + t) % period)
        out.append((t, end))
        t = end
    return out


def _slot_widths(spec: LevelSpec, dk: int, dv: int) -> dict[str, tuple[Any, int, int]]:
    out: dict[str, tuple[Any, int, int]] = {"memory": (spec.memory, dk, dv)}
    for name, mem in spec.adaptive.items():
        out[f"adaptive.{name}"] = (mem, dk, dk)
    return out


def periods(spec: LevelSpec) -> tuple[int | None, int]:
    """``(period C, linearisation chunk N)``: C is ``None`` for ``frequency: never``; N is the
    gradient-point chunk, or C itself (gradients at the committed, period-start state), or 1."""
    period = None if spec.frequency == "never" else int(spec.frequency)
    if isinstance(spec.gradient_point, ChunkPointSpec):
        chunk = spec.gradient_point.chunk
    else:
        # with period C gradients are taken at the committed (period-start) state: chunk C
        chunk = period or 1
    return period, chunk


def cycle(spec: LevelSpec) -> int:
    """The period after which a level's schedule repeats: ``lcm(period, chunk)`` (1 for a level
    updated every token at its own state, or never). Only the position modulo it decides where
    periods and gradient-point chunks fall, so it is all a caller must know to continue a level."""
    period, chunk = periods(spec)
    return math.lcm(period, chunk) if period is not None else 1


def init_state(
    level: LevelSpec,
    *,
    batch: int,
    d_key: int,
    d_value: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    given: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A fresh state for ``level`` at position 0, or one built around ``given`` entries.

    Linear memories start at zero; deep memories at a normal init (std ``1/sqrt(d_in)``; the last
    layer zero for ``init: zeros``) drawn from ``generator`` (a fixed seed 0 when ``None``, so a
    level without a state is deterministic). In a model these initial states are outer parameters
    (meta-learned ``M_0``): pass them in ``state`` instead.

    Args:
        level: a validated :class:`LevelSpec`.
        batch, d_key, d_value: ``B`` and the per-head key and value widths.
        given: entries to take instead of building them: memory parameters to start from
            (``memory.<p>``, ``adaptive.<name>.<p>``), and the anchor, pending update and
            optimizer buffers of a carried state (``anchor.…``, ``pending.…``, ``optimizer.…``,
            taken where given at the shape; the optimizer's only when all of a slot's are). What
            is not given is built: a fresh sequence's zeros and an anchor at the parameters. The
            position is always 0 (a caller continuing a sequence merges its own).
    """
    dtype = dtype or torch.get_default_dtype()
    gen = generator
    period, chunk = periods(level)
    heads = level.memory.heads
    # on the host whatever the device: where periods and chunks fall is read from it (int()), which
    # for a GPU tensor would be a synchronisation, and one that breaks CUDA-graph capture
    state: dict[str, torch.Tensor] = {"position": torch.zeros((), dtype=torch.int64)}
    optimizer = build_optimizer(level.optimizer)
    for slot, (mspec, din, dout) in _slot_widths(level, d_key, d_value).items():
        mem = build_memory(mspec, din, dout)
        shapes = {f"{slot}.{p}": (batch, heads, *shape) for p, shape in mem.shapes().items()}
        if given is not None and all(k in given and tuple(given[k].shape) == s for k, s in shapes.items()):
            # the caller's parameters (a model's meta-learned M_0): nothing to draw, which also
            # keeps random-number generators out of compiled regions
            params = {p: given[f"{slot}.{p}"] for p in mem.shapes()}
        else:
            if isinstance(mspec, LinearMemorySpec):
                init = {p: torch.zeros(heads, *s, dtype=dtype, device=device) for p, s in mem.shapes().items()}
            else:
                if gen is None:
                    gen = torch.Generator().manual_seed(0)
                init = mem.init(heads, zeros=mspec.init == "zeros", generator=gen, dtype=dtype, device=device)
            params = {p: t.unsqueeze(0).expand(batch, *t.shape).clone() for p, t in init.items()}
        state.update({f"{slot}.{p}": t for p, t in params.items()})
        if period is not None and period > 1:
            state.update(_or_given(given, "pending", slot, params, torch.zeros_like))
        if period is not None and chunk > period:
            state.update(_or_given(given, "anchor", slot, params, torch.clone))
        if level.retention is not None and level.retention.toward == "initial":
            state.update({f"origin.{slot}.{p}": t for p, t in params.items()})
        # a caller's state that holds all the slot's buffers (a level called segment after segment)
        # costs no fills, which on a GPU are launches per call. Compiled, the fills are dead code
        # inductor drops, so the check is left out of the graph
        layout = None if given is None or torch.compiler.is_compiling() else _buffer_layout(
            level.optimizer, optimizer, mem, params)
        if layout is not None and all(_given_at(given, f"optimizer.{slot}.{k}", s) for k, s in layout.items()):
            state.update({f"optimizer.{slot}.{k}": given[f"optimizer.{slot}.{k}"] for k in layout})
        else:
            state.update({f"optimizer.{slot}.{k}": v for k, v in optimizer.buffers(mem, params).items()})
    return state


#: ``(optimizer spec, memory, parameter shapes) -> (the spec, {buffer: shape})``: what
#: ``optimizer.buffers`` makes, worked out once on meta tensors (64 µs a slot on the host, more than
#: the fills it spares an eager GPU step, were it done every call). The spec is kept in the entry so
#: that its ``id`` in the key cannot be reused by another object.
_BUFFER_LAYOUTS: dict[tuple, tuple[Any, dict[str, tuple[int, ...]]]] = {}


def _buffer_layout(spec: Any, optimizer: Any, mem: Any, params: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    key = (id(spec), mem.signature, tuple((p, tuple(t.shape), t.dtype) for p, t in params.items()))
    hit = _BUFFER_LAYOUTS.get(key)
    if hit is None or hit[0] is not spec:
        if len(_BUFFER_LAYOUTS) >= 1024:  # specs generated by the thousand (property tests)
            _BUFFER_LAYOUTS.clear()
        meta = {p: torch.empty(t.shape, dtype=t.dtype, device="meta") for p, t in params.items()}
        hit = _BUFFER_LAYOUTS[key] = (spec, {k: tuple(v.shape) for k, v in optimizer.buffers(mem, meta).items()})
    return hit[1]


def _or_given(given: dict[str, torch.Tensor] | None, kind: str, slot: str, params: dict[str, torch.Tensor],
              make) -> dict[str, torch.Tensor]:
    """``{kind.slot.p: …}``: the caller's tensor where ``given`` holds it at the shape, else ``make(param)``."""
    out = {}
    for p, t in params.items():
        key = f"{kind}.{slot}.{p}"
        out[key] = given[key] if given is not None and _given_at(given, key, t.shape) else make(t)
    return out


def _given_at(given: dict[str, Any], key: str, shape) -> bool:
    """Whether ``given`` holds ``key`` as a tensor of ``shape`` (anything else is built, and
    :func:`_merge_state` then converts or rejects what was given)."""
    g = given.get(key)
    return isinstance(g, torch.Tensor) and tuple(g.shape) == tuple(shape)


def _tensor(name: str, x: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a [B, T, H, D] tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a [B, T, H, D] tensor, got shape {list(x.shape)}")
    if like is not None and tuple(x.shape[:3]) != tuple(like.shape[:3]):
        raise ValueError(f"{name}: [B, T, H] = {list(x.shape[:3])} differs from keys' {list(like.shape[:3])}")
    return x


def _stream(role: str, spec: StreamSpec, x: torch.Tensor, adaptive: set[str]) -> Stream:
    src = spec.from_
    if src.startswith("adaptive."):
        name = src.split(".", 1)[1]
        if name not in adaptive:
            raise ValueError(f"{role}: reads adaptive.{name}, which the level does not declare")
        return Stream(x, f"adaptive.{name}", spec)
    return Stream(x, None, spec)


def prepare(
    spec: LevelSpec,
    *,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor | None,
    lr: Any = None,
    retention: Any = None,
    momentum: Any = None,
    state: dict[str, torch.Tensor] | None = None,
    phase: int | None = None,
) -> LevelRun:
    """Resolve a level against its inputs (see :func:`nlgraph.runtime.run_level` for the contract).

    Raises:
        ValueError: shapes disagree with each other or with the spec, a data-dependent gate has no
            tensor, a state has unknown or mis-shaped entries, or the combination is not defined.
    """
    keys = _tensor("keys", keys)
    values = _tensor("values", values, keys)
    queries = keys if queries is None else _tensor("queries", queries, keys)
    b, t, h, dk = keys.shape
    dv = values.shape[-1]
    if queries.shape[-1] != dk:
        raise ValueError(f"queries are {queries.shape[-1]} wide per head but keys {dk}")
    if h != spec.memory.heads:
        raise ValueError(f"the level has {spec.memory.heads} heads but the tensors have H = {h}")
    adaptive = set(spec.adaptive)
    if adaptive or spec.values.self_target:
        if dk != dv:
            raise ValueError(
                f"a self-modifying level regresses every memory on the same (k, v̂): keys and "
                f"values must have one width, got {dk} and {dv}"
            )
    period, chunk = periods(spec)
    objective = build_objective(spec.objective)
    optimizer = build_optimizer(spec.optimizer)
    memories = {slot: build_memory(m, din, dout) for slot, (m, din, dout) in _slot_widths(spec, dk, dv).items()}
    for slot, mem in memories.items():
        if slot != "memory" and mem.d_in != mem.d_out:
            raise ValueError(f"{slot}: an adaptive memory must map the width to itself ({mem.d_in} -> {mem.d_out})")

    streams = {
        "keys": _stream("keys", spec.keys, keys, adaptive),
        "values": _stream("values", spec.values, values, adaptive),
        "queries": _stream("queries", spec.queries, queries, adaptive),
    }
    x_level = next((s.data for s in streams.values() if s.slot is not None), None)
    common = dict(shape=(b, t, h), width=dk, like=keys, adaptive_input=x_level, adaptive=adaptive)
    opt = spec.optimizer
    lr_t = resolve_rate("lr", getattr(opt, "lr", 1.0), lr, channel_ok=False, **common)
    mu_spec = getattr(opt, "momentum", None) if opt.kind in ("momentum", "dgd") else None
    mu_t = None
    if optimizer.uses_momentum:
        mu_t = resolve_rate("momentum", mu_spec, momentum, channel_ok=False, **common)
    elif momentum is not None:
        raise ValueError(f"momentum: the {opt.kind} optimizer has no momentum gate")
    alpha_t = None
    if spec.retention is not None:
        alpha_t = resolve_rate("retention", spec.retention.gate, retention, channel_ok=True, **common)
        channel = isinstance(alpha_t, torch.Tensor) and alpha_t.dim() == 4
        channel |= isinstance(alpha_t, AdaptiveGate) and alpha_t.spec.per == "channel"
        if channel and (spec.memory.kind != "linear" or adaptive):
            raise ValueError(
                "retention: a per-channel gate decays the key channels of a matrix memory "
                "(M ← M·Diag(α)); deep and adaptive memories take [B, T, H] gates"
            )
    elif retention is not None:
        raise ValueError("retention: the level has no retention; add retention: {kind: decay} to the spec")
    for name, gate in (("lr", lr_t), ("momentum", mu_t)):
        if isinstance(gate, AdaptiveGate) and gate.spec.per == "channel":
            raise ValueError(f"{name}: a per-channel gate is only meaningful for retention")

    full = init_state(spec, batch=b, d_key=dk, d_value=dv, dtype=keys.dtype, device=keys.device, given=state)
    if state is not None:
        full = _merge_state(full, state)
    # where periods or chunks fall depends on the position; read it from the tensor only then (a
    # host read, data-dependent under torch.compile), unless the caller gave its phase. A state
    # without one starts a sequence.
    scheduled = period is not None and (period > 1 or chunk > 1)
    position = 0
    if scheduled and state is not None and "position" in state:
        position = int(full["position"]) if phase is None else phase % cycle(spec)
    return LevelRun(
        spec=spec,
        shape=(b, t, h),
        memories=memories,
        groups=memory_groups(memories),
        objective=objective,
        optimizer=optimizer,
        retention=spec.retention.kind if spec.retention is not None else None,
        period=period,
        chunk=chunk,
        read_before=spec.read in ("before_write", "chunk_start"),
        self_target=spec.values.self_target,
        keys=streams["keys"],
        values=streams["values"],
        queries=streams["queries"],
        lr=lr_t,
        alpha=alpha_t,
        mu=mu_t,
        state=full,
        position=position,
        read=spec.read,
    )


def _merge_state(default: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    unknown = sorted(set(given) - set(default))
    if unknown:
        raise ValueError(
            f"state: unknown entries {unknown} for this level (expected some of: {', '.join(sorted(default))})"
        )
    out = dict(default)
    for k, v in given.items():
        v = torch.as_tensor(v)
        if tuple(v.shape) != tuple(default[k].shape):
            raise ValueError(f"state[{k!r}]: expected shape {list(default[k].shape)}, got {list(v.shape)}")
        out[k] = v
    # a state that gives a memory but not its anchor starts a chunk there: the anchor is the memory
    for k in default:
        if k.startswith("anchor.") and k not in given and k[len("anchor."):] in given:
            out[k] = given[k[len("anchor."):]]
    # ... and one that gives a memory but not its origin starts the sequence there: M_0 is the memory
    for k in default:
        if k.startswith("origin.") and k not in given and k[len("origin."):] in given:
            out[k] = given[k[len("origin."):]]
    return out


def final_state(run: LevelRun, committed, working, anchor, buffers, steps: int,
                origin=None) -> dict[str, torch.Tensor]:
    """The state a form returns after ``steps`` tokens: committed parameters, what is pending of
    the current period, the anchor and the optimizer buffers (layout in the module docstring).
    ``origin``: ``{slot: params}`` to return as ``origin.*`` (default: the input state's, as is)."""
    state: dict[str, torch.Tensor] = {"position": run.state["position"] + steps}
    for s in run.memories:
        for p, v in committed[s].items():
            state[f"{s}.{p}"] = v
            if run.has_pending:
                state[f"pending.{s}.{p}"] = working[s][p] - v
            if anchor is not None:
                state[f"anchor.{s}.{p}"] = anchor[s][p]
            if run.has_origin:
                state[f"origin.{s}.{p}"] = run.state[f"origin.{s}.{p}"] if origin is None else origin[s][p]
        for n, v in buffers[s].items():
            state[f"optimizer.{s}.{n}"] = v
    return state
