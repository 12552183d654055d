"""In-context Continuum Memory System: ``outer`` levels whose period runs while the model reads.

A level with ``objective: {kind: outer}`` and a finite period C (``frequency: C``) is an MLP whose
parameters θ change while the model processes a token stream (NeurIPS Eqs. 30–31). At every
multiple e of C from the sequence start it commits

    θ ← θ − η Σ_{t=e−C}^{e−1} ∇_θ ℓ_t            (``reduce: mean`` divides the sum by C)

where ℓ_t is the model's next-token loss at t (target x_{t+1}) and every gradient is taken at the
period-start θ — the θ all tokens of the period were read with. The last term needs x_e, so the
commit happens when token e arrives, before it is read; tokens from e on read the new θ. The partial
last period of a sequence is never committed. ``η`` and the step are those of the level's inner
optimizer (``gd``, ``momentum``, ``adam``, ``muon`` of :mod:`nlgraph.levels.optimizers`), whose
buffers live in the level's state. Every sequence of a batch has its own trajectory: the in-context
parameters carry a leading batch dimension ``[B, 1, d_out, d_in]`` (one head, as the optimizers
expect ``[B, H, ...]``).

How the model computes it (:func:`stream_in_context`): the sequence is run through the whole model
in segments that end at every boundary of any in-context level (segments of ``gcd`` of the periods),
with the streaming state of every other entry carried between segments, so the logits are those of
one pass. Each level uses, for the tokens of one period, one tensor ``θ_p`` that stays in the
autograd graph; the running sum of the model's per-token losses since the last multiple of each
period is kept, and at a boundary e one ``torch.autograd.grad`` of the sum over the longest period
ending at e, with respect to the ``θ_p`` of every level committing at e, gives each level its
period's gradient (tokens before a level's period do not depend on its ``θ_p``). The gradient goes
through everything the period's tokens computed with ``θ_p`` — later blocks, attention over earlier
tokens of the period — but not through another level's committed steps (no backprop across levels,
NeurIPS Def. 2).

Outer training (``meta_gradient``): ``first_order`` (default) writes ``θ_p = θ_0 + sg(θ_p − θ_0)``,
so the outer gradient of the meta-learned θ_0 is the sum of the outer gradients at every period's
parameters and the inner gradients are constants; ``second_order`` keeps the committed steps in the
graph (``create_graph``), so the outer gradient also flows through every inner gradient.

``lifetime: persistent``: the committed parameters and optimizer buffers at the end of every call
are kept by the model and a fresh sequence starts from them (per batch row; see
:meth:`NLModel.save_memory`). ``learn=False`` reads the committed parameters without updating them;
from a fresh state that is the static model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NLGraphError
from .layers import Mlp
from .levels.optimizers import build_optimizer
from .spec.schema import LevelSpec

__all__ = ["InContextMlp", "MemoryStateError", "MultiRateOuter", "is_in_context", "stream_in_context"]

State = dict[str, Any]


class MemoryStateError(NLGraphError):
    """A persistent-memory file cannot be loaded into this model (unreadable, from another spec, or
    for another batch size)."""


def is_in_context(level: Any) -> bool:
    """Whether a spec entry is an ``outer`` level whose finite period runs in context."""
    return (isinstance(level, LevelSpec) and level.objective.kind == "outer"
            and level.frequency != "never" and level.objective.updates == "in_context")


def mlp_forward(mlp: Mlp, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """:class:`~nlgraph.layers.Mlp`'s forward with per-sequence parameters.

    ``x [B, T, C]``, ``params {"layers.<i>.weight": [B, 1, out, in], "layers.<i>.bias": [B, 1, out]}``
    -> ``[B, T, C_out]``.
    """
    n = len(mlp.layers)
    for i in range(n):
        w = params[f"layers.{i}.weight"][:, 0]
        x = torch.einsum("btc,boc->bto", x, w)
        bias = params.get(f"layers.{i}.bias")
        if bias is not None:
            x = x + bias[:, 0].unsqueeze(1)
        if i < n - 1:
            x = mlp.hidden(x)
    return x


class InContextMlp(nn.Module):
    """An in-context ``outer`` level as a block entry: ``forward(x [B, T, C], state) -> (y, state)``.

    Its meta-learned initial parameters θ_0 are the MLP's own (``mlp.layers.<i>.weight``, named as
    in the static :class:`~nlgraph.model.StaticMlp`, so a ``frequency: never`` spec's weights load
    into it). The forward reads ``state["params"]`` (per-sequence parameters, put there by
    :func:`stream_in_context`) and, without them, is the static MLP. It never changes its state:
    the model commits the updates, because they need the model's loss.
    """

    def __init__(self, level: LevelSpec, width: int) -> None:
        super().__init__()
        self.spec = level
        self.period: int = int(level.frequency)
        self.residual = level.memory.kind != "mlp"
        from .model import ResidualMlp

        # the static level's modules, so a `frequency: never` spec's weights load into this one
        self.mlp = Mlp(level.memory, width) if not self.residual else ResidualMlp(level, width)
        self.optimizer = build_optimizer(level.optimizer)
        self.reduce = level.objective.reduce
        self.second_order = level.objective.meta_gradient == "second_order"
        self.persistent = level.lifetime == "persistent"

    @property
    def core(self) -> Mlp:
        """The MLP whose parameters change in context."""
        return self.mlp.branch if self.residual else self.mlp

    def base(self) -> dict[str, torch.Tensor]:
        """θ_0 as ``{name: [out, in] or [out]}``."""
        return dict(self.core.named_parameters())

    def initial(self, batch: int) -> dict[str, torch.Tensor]:
        """θ_0 for every sequence, detached: ``{name: [B, 1, ...]}``."""
        return {k: p.detach().unsqueeze(0).unsqueeze(0).expand(batch, 1, *p.shape).clone()
                for k, p in self.base().items()}

    def forward(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State | None]:
        params = (state or {}).get("params")
        if params is None:
            return (x + self.mlp.norm(self.mlp.branch(x)) if self.residual else self.mlp(x)), state
        y = mlp_forward(self.core, params, x)
        # no state of its own: the model holds the parameters (and re-supplies them every segment)
        return (x + self.mlp.norm(y) if self.residual else y), None


# --------------------------------------------------------------------------- the model's driver


@dataclass(frozen=True)
class Slot:
    """Where an in-context level sits: its module, its key (``blocks.0.cms.links.1``) and the path
    to its streaming state inside ``state["blocks"]`` (str keys of dicts, ``(index, length)`` of
    lists)."""

    key: str
    module: InContextMlp
    path: tuple[Any, ...]


def find_slots(model: nn.Module, kind: type | None = None) -> list[Slot]:
    """Every in-context level of an :class:`~nlgraph.model.NLModel` in model order (``kind``:
    modules of that class instead, e.g. :class:`~nlgraph.memory.MemoryLevel`)."""
    from .model import Chain, MemoryContext, Parallel, Residual

    slots: list[Slot] = []
    kind = kind or InContextMlp

    def visit(mod: nn.Module, key: str, path: tuple) -> None:
        mod = mod.inner if isinstance(mod, Residual) else mod
        if isinstance(mod, kind):
            slots.append(Slot(key, mod, path))
        elif isinstance(mod, Chain):
            n = len(mod.links)
            for j, link in enumerate(mod.links):
                visit(link, f"{key}.links.{j}", path + ("links", (j, n)))
        elif isinstance(mod, Parallel):
            for name, branch in mod.branches.items():
                visit(branch, f"{key}.{name}", path + (name,))
        elif isinstance(mod, MemoryContext):
            # Titans MAC: its memory's state is the context's "memory" entry (a `lifetime:
            # persistent` memory carries into the next sequence, which answers its first segment
            # from it)
            visit(mod.memory, f"{key}.memory", path + ("memory",))

    for i, block in enumerate(model.blocks):
        for name in block.names:
            visit(block.entries[name], f"blocks.{i}.{name}", ((i, len(model.blocks)), name))
    return slots


def _put(root: list, path: tuple, value: Any) -> list:
    """``root`` (the list of block states) with ``value`` at ``path``, creating containers (copies
    of the ones on the way, so the caller's state is never mutated)."""

    def put(node: Any, rest: tuple) -> Any:
        head, tail = rest[0], rest[1:]
        if isinstance(head, tuple):
            j, n = head
            out = list(node) if node is not None else [None] * n
            out[j] = put(out[j], tail) if tail else value
            return out
        out = dict(node or {})
        out[head] = put(out.get(head), tail) if tail else value
        return out

    return put(root, path)


def _detach_tree(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detach_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detach_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_detach_tree(v) for v in obj)
    return obj


def _fresh(model: Any, slots: list[Slot], batch: int, use_memory: bool = True) -> State:
    """The in-context state of a new sequence: θ_0 (or, with ``use_memory``, the persistent
    memory) and empty buffers."""
    values, buffers = {}, {}
    for s in slots:
        kept = model._persistent.get(s.key) if s.module.persistent and use_memory else None
        if kept is not None:
            kb = next(iter(kept["values"].values())).shape[0]
            if kb not in (1, batch):
                raise MemoryStateError(
                    f"the persistent memory of '{s.key}' holds {kb} sequences' trajectories but "
                    f"this batch has {batch} rows; keep the batch size, use 1 row, or call "
                    f"model.reset_memory()", path="lifetime")
            values[s.key] = {k: v.expand(batch, *v.shape[1:]).clone() for k, v in kept["values"].items()}
            buffers[s.key] = {k: (v.expand(batch, *v.shape[1:]).clone() if v.dim() else v.clone())
                              for k, v in kept["buffers"].items()}
        else:
            values[s.key] = s.module.initial(batch)
            buffers[s.key] = s.module.optimizer.buffers(None, values[s.key])
    return {"values": values, "buffers": buffers, "position": 0, "leaves": None, "sums": {}, "last": None}


class _Anchor(torch.autograd.Function):
    """``x`` (a copy) placed in the autograd graph after ``frontier`` — the tensors that carry
    everything before it — without any gradient flowing to them.

    Why: ``torch.autograd.grad`` walks the graph from the loss only down to nodes whose
    topological number is at least that of the inputs. A period's parameters anchored after the
    streaming state of the period start have a higher number than everything before, so each
    commit walks the graph of its own period only, not the whole history (which would make a
    sequence cost quadratic in its length)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *frontier: torch.Tensor) -> torch.Tensor:
        ctx.n = len(frontier)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return (grad,) + (None,) * ctx.n


def _frontier(blocks: list) -> list[torch.Tensor]:
    """The tensors of the streaming state that hold a graph (see :class:`_Anchor`)."""
    leaves, _ = torch.utils._pytree.tree_flatten(blocks)
    return [t for t in leaves if torch.is_tensor(t) and t.grad_fn is not None]


def _leaves(slots: list[Slot], ic: State, outer_grad: bool, frontier: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors each level is read with during its current period (see the module docstring)."""
    out = {}
    for s in slots:
        vals = ic["values"][s.key]
        if s.module.second_order and outer_grad and any(v.grad_fn is not None for v in vals.values()):
            leaf = dict(vals)  # a function of θ_0 through every earlier step: differentiate through it
        else:
            base = s.module.base()
            leaf = {}
            for k, v in vals.items():
                p = base[k]
                if outer_grad and p.requires_grad:
                    p0 = p.unsqueeze(0).unsqueeze(0).expand_as(v)
                    leaf[k] = p0 + (v - p0).detach()  # value v, outer gradient into θ_0
                else:
                    leaf[k] = v.detach().requires_grad_(True)
        if frontier:
            leaf = {k: _Anchor.apply(v, *frontier) for k, v in leaf.items()}
        out[s.key] = leaf
    return out


def _commit(slots: list[Slot], ic: State, position: int, outer_grad: bool) -> None:
    """At boundary ``position``: one optimizer step for every level whose period divides it."""
    due = [s for s in slots if position % s.module.period == 0]
    if not due:
        return
    longest = max(s.module.period for s in due)
    loss = ic["sums"].get(longest)
    leaves = ic["leaves"]
    flat = [(s, k) for s in due for k in leaves[s.key]]
    create = outer_grad and any(s.module.second_order for s in due)
    if loss is not None and loss.requires_grad:
        grads = torch.autograd.grad(loss, [leaves[s.key][k] for s, k in flat], retain_graph=True,
                                    allow_unused=True, create_graph=create)
    else:
        grads = [None] * len(flat)
    by_slot: dict[str, dict[str, torch.Tensor]] = {s.key: {} for s in due}
    for (s, k), g in zip(flat, grads):
        by_slot[s.key][k] = torch.zeros_like(leaves[s.key][k]) if g is None else g
    for s in due:
        mod = s.module
        keep_graph = mod.second_order and outer_grad
        g = by_slot[s.key]
        if mod.reduce == "mean":
            g = {k: v / mod.period for k, v in g.items()}
        if not keep_graph:
            g = {k: v.detach() for k, v in g.items()}
        # second order steps from the tensors the period was read with (in the graph of θ_0)
        params = leaves[s.key] if keep_graph else {k: v.detach() for k, v in ic["values"][s.key].items()}
        ref = next(iter(params.values()))
        rate = lambda c: torch.full(ref.shape[:2], float(c), dtype=ref.dtype, device=ref.device)  # noqa: E731
        opt = mod.spec.optimizer
        delta, buffers = mod.optimizer.step(None, params, g, lr=rate(opt.lr),
                                            momentum=rate(getattr(opt, "momentum", 0.0)),
                                            buffers=ic["buffers"][s.key])
        new = {k: params[k] + delta[k] for k in params}
        ic["values"][s.key] = new if keep_graph else {k: v.detach() for k, v in new.items()}
        ic["buffers"][s.key] = buffers if keep_graph else _detach_tree(buffers)
        leaves[s.key] = None
    for c in list(ic["sums"]):
        if position % c == 0:
            ic["sums"][c] = None


def stream_in_context(model: Any, tokens: torch.Tensor, state: State | None, learn: bool) -> tuple[torch.Tensor, State]:
    """:meth:`NLModel.stream` for a model with in-context levels (see the module docstring):
    ``tokens [B, T]`` -> ``(logits [B, T, V], state)``."""
    if model._compiled:
        # a commit differentiates the period's segments (retain_graph) before the outer backward
        # does, so a compiled block's backward runs more than once: it must not donate (free) its
        # saved buffers, which AOT autograd does by default. The flag is read when the forward is
        # compiled, in the first call here.
        with torch._functorch.config.patch(donated_buffer=False):
            return _stream_in_context(model, tokens, state, learn)
    return _stream_in_context(model, tokens, state, learn)


def _stream_in_context(model: Any, tokens: torch.Tensor, state: State | None, learn: bool) -> tuple[torch.Tensor, State]:
    slots: list[Slot] = model._slots
    b, t = tokens.shape
    fresh = state is None  # a fresh sequence: persistent levels start from what they carry
    blocks = start_carried(model, [None] * len(model.blocks), b) if fresh else (
        state.get("blocks") or [None] * len(model.blocks))
    state = state or {}
    ic = state.get("in_context")
    if ic is None:
        ic = _fresh(model, slots, b, use_memory=fresh)
    else:  # copies: the caller's state stays valid (it can be continued twice)
        ic = {**ic, "values": dict(ic["values"]), "buffers": dict(ic["buffers"]), "sums": dict(ic["sums"]),
              "leaves": dict(ic["leaves"]) if ic["leaves"] is not None else None}
    run = model._compiled or model.blocks
    cast = _ReadCasts(tokens.device.type)

    def forward(seg: torch.Tensor, blocks: list, params: dict) -> tuple[torch.Tensor, list]:
        for s in slots:
            blocks = _put(blocks, s.path, {"params": cast(s.key, params[s.key])})
        x = model.embed(seg)
        new = []
        # the segment starts at ic["position"], known here on the host: the levels get its phase
        # instead of reading their state's position (data-dependent in a compiled block)
        with model.phases(ic["position"]):
            for block, st in zip(run, blocks):
                x, st = model.run_block(block, x, st, ic["position"])
                new.append(st)
        return model.head(model.norm(x)), new

    if not learn:
        # frozen: every level reads its committed parameters; nothing is accumulated
        frozen = {s.key: {k: v.detach() for k, v in ic["values"][s.key].items()} for s in slots}
        logits, blocks = forward(tokens, blocks, frozen)
        ic.update(position=ic["position"] + t, leaves=None, sums={}, last=None)
        _keep_persistent(model, slots, ic, blocks)
        return logits, {"blocks": blocks, "in_context": ic}

    if torch.is_inference_mode_enabled():
        raise MemoryStateError("in-context levels learn from gradients while they read, which "
                               "torch.inference_mode() forbids; use torch.no_grad(), or learn=False",
                               path="learn")
    outer_grad = torch.is_grad_enabled()
    grain = math.gcd(*(s.module.period for s in slots))
    every = math.lcm(*(s.module.period for s in slots))
    periods = sorted({s.module.period for s in slots})
    outs = []
    with torch.enable_grad():
        done = 0
        while done < t:
            pos = ic["position"]
            if ic["last"] is not None:  # ℓ_{pos−1} needs x_pos, which has just arrived
                _add(ic, periods, F.cross_entropy(ic["last"], tokens[:, done], reduction="sum"))
                ic["last"] = None
            if pos > 0 and pos % grain == 0:
                _commit(slots, ic, pos, outer_grad)
                if not outer_grad and pos % every == 0:
                    # every period restarts here: nothing before needs a gradient any more
                    blocks = _detach_tree(blocks)
            old = ic["leaves"] or {}
            due = [s for s in slots if old.get(s.key) is None]
            if due:
                ic["leaves"] = {**old, **_leaves(due, ic, outer_grad, _frontier(blocks))}
            n = min(grain - pos % grain, t - done)
            seg = tokens[:, done:done + n]
            logits, blocks = forward(seg, blocks, ic["leaves"])
            if n > 1:
                _add(ic, periods, F.cross_entropy(logits[:, :-1].flatten(0, 1), seg[:, 1:].flatten(),
                                                  reduction="sum"))
            ic["last"] = logits[:, -1]
            ic["position"] = pos + n
            outs.append(logits if outer_grad else logits.detach())
            done += n
    _keep_persistent(model, slots, ic, blocks)
    logits = torch.cat(outs, dim=1) if outs else model.head.weight.new_zeros(b, 0, model.spec.model.vocab)
    return logits, {"blocks": blocks, "in_context": ic}


class _ReadCasts:
    """The per-sequence parameters a segment reads, cast once to autocast's dtype (when autocast is on
    for ``device_type``) and the cast reused while a level's parameters stay the same tensors, within
    one call (a period that spans several calls is cast once in each).

    Under autocast each of :func:`mlp_forward`'s einsums would cast its float32 weight itself and
    save that copy for the backward, once a segment: a level whose period spans n segments kept n
    copies of the same weights (``hope_large_chunk``'s CMS levels of periods 1024 and 2048 read at
    256-token segments: 8 copies a level at T=2048). Cast here, one copy a period is made and every
    segment's einsum saves it. The biases are cast too, as ``F.linear`` does under autocast (its
    output, bias added, in the lower precision), so the in-context MLP computes what the static one
    does. Gradients reach the float32 tensors through the casts."""

    def __init__(self, device_type: str) -> None:
        # autocast's devices by name: torch.amp.is_autocast_available is untraceable on torch 2.11,
        # and a meta tensor (a shape-only run) has no autocast to ask
        on = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if on else None
        self.made: dict[tuple[str, str], tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __call__(self, key: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.dtype is None:
            return params
        out = {}
        for name, value in params.items():
            # autocast's own rule: it casts float32 and the 16-bit floats, never float64
            if value.dtype not in (torch.float32, torch.float16, torch.bfloat16) or value.dtype == self.dtype:
                out[name] = value
                continue
            kept = self.made.get((key, name))
            if kept is None or kept[0] is not value or kept[1] != value._version:  # changed in place: cast again
                kept = (value, value._version, value.to(self.dtype))
                self.made[(key, name)] = kept
            out[name] = kept[2]
        return out


def _add(ic: State, periods: list[int], loss: torch.Tensor) -> None:
    for c in periods:
        prev = ic["sums"].get(c)
        ic["sums"][c] = loss if prev is None else prev + loss


def _keep_persistent(model: Any, slots: list[Slot], ic: State, blocks: list) -> None:
    keep_carried(model, blocks)
    for s in slots:
        if s.module.persistent:
            model._persistent[s.key] = {"values": {k: v.detach() for k, v in ic["values"][s.key].items()},
                                        "buffers": _detach_tree(ic["buffers"][s.key])}


# --------------------------------------------------------------------------- persistent ordinary levels

#: Entries of a level's runtime state (nlgraph.levels.run) that a persistent level carries into the
#: next sequence: committed parameters and optimizer buffers. Position, the uncommitted sum of a
#: partial period, the gradient-point anchor and the retention origin start afresh (a state without
#: ``origin.*`` takes the memory it starts from as the sequence's origin).
CARRIED = ("memory.", "adaptive.", "optimizer.")


def find_carried(model: nn.Module) -> list[Slot]:
    """The ``lifetime: persistent`` levels run by the level runtime (not in-context CMS levels)."""
    from .memory import MemoryLevel

    return [s for s in find_slots(model, MemoryLevel) if s.module.spec.lifetime == "persistent"]


def start_carried(model: Any, blocks: list, batch: int) -> list:
    """Block states of a fresh sequence with every persistent level's carried state put in."""
    for s in model._carried:
        kept = model._persistent.get(s.key)
        if kept is None:
            continue
        vals = kept["values"]
        rows = {v.shape[0] for v in vals.values() if v.dim()}
        if rows - {1, batch}:
            raise MemoryStateError(
                f"the persistent memory of '{s.key}' holds {max(rows)} sequences' states but this "
                f"batch has {batch} rows; keep the batch size, use 1 row, or call model.reset_memory()",
                path="lifetime")
        level = {k: (v.expand(batch, *v.shape[1:]).clone() if v.dim() else v.clone()) for k, v in vals.items()}
        blocks = _put(blocks, s.path, {"level": level})
    return blocks


def keep_carried(model: Any, blocks: list) -> None:
    """Store what every persistent level carries, from the block states a call returned."""
    for s in model._carried:
        node: Any = blocks
        for step in s.path:
            node = node[step[0]] if isinstance(step, tuple) else node.get(step)
            if node is None:
                break
        level = node.get("level") if isinstance(node, dict) else None
        if level is not None:
            model._persistent[s.key] = {"values": {k: v.detach() for k, v in level.items()
                                                   if k.startswith(CARRIED)}, "buffers": {}}


# --------------------------------------------------------------------------- persistent memory files


def save_memory(model: Any, path: str | Path) -> Path:
    """Write the persistent in-context memory (parameters and optimizer buffers of every
    ``lifetime: persistent`` level) to a safetensors file, atomically."""
    from safetensors.torch import save

    from .io import atomic_write
    from .spec.loader import spec_hash

    flat = {}
    for key, entry in model._persistent.items():
        for kind in ("values", "buffers"):
            for name, v in entry[kind].items():
                flat[f"{key}/{kind}/{name}"] = v.detach().contiguous().cpu()
    meta = {"spec_hash": spec_hash(model.spec), "format": "nlgraph-memory-1"}
    return atomic_write(path, save(flat, metadata=meta))


def load_memory(model: Any, path: str | Path) -> None:
    """Load a file written by :func:`save_memory` into ``model`` (same spec)."""
    from safetensors import SafetensorError, safe_open

    from .spec.loader import spec_hash

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise MemoryStateError(f"cannot read the memory file: {e}; pass a file written by "
                               f"model.save_memory", file=str(path)) from None
    if meta.get("format") != "nlgraph-memory-1":
        raise MemoryStateError("not an nlgraph memory file; pass a file written by model.save_memory",
                               file=str(path))
    if meta.get("spec_hash") != spec_hash(model.spec):
        raise MemoryStateError(f"the memory was saved from another spec (hash {meta.get('spec_hash')}, "
                               f"this model {spec_hash(model.spec)}); load it into the model it came from",
                               file=str(path))
    persistent = {s.key: s for s in model._slots if s.module.persistent}
    carried = {s.key: s for s in model._carried}
    out: dict[str, dict] = {}
    ref = next((p for p in model.parameters()), None)
    for name, v in tensors.items():
        key, kind, pname = name.split("/", 2)
        if key not in persistent and key not in carried or kind not in ("values", "buffers"):
            raise MemoryStateError(f"entry '{name}' matches no persistent level of this model",
                                   file=str(path))
        if ref is not None and v.is_floating_point():
            v = v.to(device=ref.device, dtype=ref.dtype)
        elif ref is not None:
            v = v.to(device=ref.device)
        out.setdefault(key, {"values": {}, "buffers": {}})[kind][pname] = v
    for key, s in persistent.items():
        base = s.module.base()
        vals = out.get(key, {}).get("values", {})
        if set(vals) != set(base) or any(vals[k].shape[2:] != base[k].shape for k in base):
            raise MemoryStateError(f"the memory of '{key}' does not match this model's level (other "
                                   f"widths or layers); load it into the model it came from",
                                   file=str(path))
    for key, s in carried.items():
        vals = out.get(key, {}).get("values", {})
        want = s.module.initial_state(1)
        if any(k not in vals or vals[k].shape[1:] != v.shape[1:] for k, v in want.items()):
            raise MemoryStateError(f"the memory of '{key}' does not match this model's level (other "
                                   f"widths or memories); load it into the model it came from",
                                   file=str(path))
    model._persistent = out


class MultiRateOuter:
    """The ``updates: outer_loop`` reading of a finite period: the level is static in the forward
    and the outer optimizer moves it only once every C training tokens, with the gradients of
    those C tokens' steps summed (``reduce: sum``) or averaged over the steps (``mean``).

    Use around any ``torch.optim`` optimizer: call :meth:`before_step` after ``backward`` and
    before ``optimizer.step()`` with the number of training tokens of the step; the gradients of
    a multi-rate level are moved into an accumulator (the optimizer skips a parameter whose
    ``grad`` is ``None``) and handed back on the step where the token count crosses a multiple of
    C.
    """

    def __init__(self, model: nn.Module) -> None:
        self.groups: list[tuple[int, str, list[nn.Parameter]]] = []
        from .model import StaticMlp

        for name, mod in model.named_modules():
            spec = getattr(mod, "spec", None)
            if isinstance(mod, StaticMlp) and spec is not None and spec.frequency != "never" \
                    and spec.objective.updates == "outer_loop":
                params = [p for p in mod.parameters() if p.requires_grad]
                self.groups.append((int(spec.frequency), spec.objective.reduce, params))
        self.tokens = 0
        self.acc: dict[int, torch.Tensor] = {}
        self.steps: dict[int, int] = {}

    def before_step(self, tokens: int) -> None:
        """Account for ``tokens`` training tokens and hold back or release the gradients."""
        start, self.tokens = self.tokens, self.tokens + tokens
        for period, reduce, params in self.groups:
            release = self.tokens // period > start // period
            for p in params:
                if p.grad is not None:
                    a = self.acc.get(id(p))
                    self.acc[id(p)] = p.grad.detach().clone() if a is None else a + p.grad
                    self.steps[id(p)] = self.steps.get(id(p), 0) + 1
                if release and id(p) in self.acc:
                    g = self.acc.pop(id(p))
                    n = self.steps.pop(id(p))
                    p.grad = g / n if reduce == "mean" else g
                else:
                    p.grad = None
