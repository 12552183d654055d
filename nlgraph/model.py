"""Stage 4 of the pipeline: the language model a spec lowers to.

``NLModel(tokens [B, T]) -> logits [B, T, vocab]`` and ``NLModel.stream(tokens, state) -> (logits,
state)``, where feeding a sequence in segments with the returned state gives the logits of one pass.
The model is ``repeat`` copies of the spec's blocks between a token embedding and a head; every block
entry is wrapped in a residual connection with the spec's norm placement.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .layers import Attention, Mlp, RMSNorm, make_norm
from .spec.schema import (
    AttentionSpec,
    ChainSpec,
    DeltaRuleSpec,
    LevelSpec,
    LinearAttentionSpec,
    MemoryContextSpec,
    ModelSpec,
    ParallelSpec,
    Spec,
)

__all__ = ["Block", "MemoryContext", "NLModel", "Parallel", "Residual"]

State = dict[str, Any]
Forms = Mapping[str, str]  # level key -> execution form, from the plan (nlgraph.lower.Plan.executions)


class Residual(nn.Module):
    """``x + f(norm(x))`` (pre-norm) or ``norm(x + f(x))`` (post-norm) around a stateful entry."""

    def __init__(self, inner: nn.Module, model: ModelSpec, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.pre = model.norm_position == "pre"
        self.residual = model.residual
        self.norm = make_norm(model.norm, width)

    def forward(self, x: torch.Tensor, state: State | None, sources: dict[str, torch.Tensor] | None = None,
                with_output: bool = False) -> tuple:
        """``(new stream, state)``, or ``(new stream, state, y)`` with ``with_output``, where ``y`` is
        the entry's own output — what other levels of the block read with ``from: <name>``.
        ``sources`` (outputs of earlier levels by name) reaches entries that read other levels."""
        h = self.norm(x) if self.pre else x
        y, state = self.inner(h, state, sources) if reads_levels(self.inner) else self.inner(h, state)
        out = (x + y if self.residual else y) if self.pre else self.norm(x + y if self.residual else y)
        return (out, state, y) if with_output else (out, state)


def reads_levels(module: nn.Module) -> bool:
    """Whether an entry module reads other levels' outputs (and so takes ``sources``)."""
    return bool(getattr(module, "reads", None))


class StaticMlp(nn.Module):
    """An ``outer`` level: an MLP trained by the outer loop, static inside a forward pass."""

    def __init__(self, level: LevelSpec, width: int) -> None:
        super().__init__()
        self.spec = level
        self.mlp = Mlp(level.memory, width) if level.memory.kind == "mlp" else ResidualMlp(level, width)

    def forward(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State | None]:
        return self.mlp(x), state


class ResidualMlp(nn.Module):
    """``residual_mlp``'s branch as an outer level: ``x + norm(mlp(x))`` (the norm has no state)."""

    def __init__(self, level: LevelSpec, width: int) -> None:
        super().__init__()
        from .spec.schema import MlpMemorySpec

        mem = level.memory
        inner = MlpMemorySpec(kind="mlp", depth=max(mem.depth, 1), hidden=mem.hidden,
                              activation=mem.activation, bias=mem.bias)
        self.branch = Mlp(inner, width)
        self.norm = make_norm(mem.norm, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.branch(x))


class AttentionEntry(nn.Module):
    """Softmax attention as a block entry (its KV cache is its streaming state)."""

    def __init__(self, spec: AttentionSpec, width: int) -> None:
        super().__init__()
        self.attn = Attention(spec, width)
        self.reads = self.attn.reads

    def forward(self, x: torch.Tensor, state: State | None,
                sources: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, State]:
        return self.attn(x, state, sources)


class Chain(nn.Module):
    """A chain of levels applied in turn: ``x ← x + M_i(norm(x))`` per link when ``residual``
    (the block then adds no residual of its own), else ``y = M_K(… M_1(x))``."""

    def __init__(self, spec: ChainSpec, model: ModelSpec, width: int, forms: Forms, key: str) -> None:
        super().__init__()
        links = [make_entry(lv, model, width, forms=forms, key=f"{key}.levels[{j}]")
                 for j, lv in enumerate(spec.levels)]
        self.links = nn.ModuleList(Residual(m, model, width) if spec.residual else m for m in links)
        self.residual = spec.residual

    def forward(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        states = (state or {}).get("links") or [None] * len(self.links)
        new = []
        h = x
        for link, st in zip(self.links, states):
            h, st = link(h, st)
            new.append(st)
        return h, {"links": new}


class Parallel(nn.Module):
    """Levels run side by side on the same input (``kind: parallel``; Titans MAG), combined by a
    gate ``N_1(y_1) ⊙ σ(N_2(y_2))``, a sum or a mean. Each branch keeps its own state."""

    def __init__(self, spec: ParallelSpec, levels: dict[str, Any], model: ModelSpec, width: int,
                 forms: Forms) -> None:
        super().__init__()
        self.names = list(spec.branches)
        self.combine = spec.combine
        self.branches = nn.ModuleDict({n: make_entry(levels[n], model, width, levels, forms, n) for n in self.names})
        if spec.combine == "gate":
            self.norms = nn.ModuleList([RMSNorm(width, eps=1e-6), RMSNorm(width, eps=1e-6)])
        self.reads = {n: n for n in self.names if reads_levels(self.branches[n])}

    def forward(self, x: torch.Tensor, state: State | None,
                sources: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, State]:
        state = state or {}
        outs, new = [], {}
        for name in self.names:
            branch = self.branches[name]
            if reads_levels(branch):
                y, new[name] = branch(x, state.get(name), sources)
            else:
                y, new[name] = branch(x, state.get(name))
            outs.append(y)
        if self.combine == "gate":
            return gate(self.norms, outs[0], outs[1]), new
        total = torch.stack(outs).sum(0)
        return (total / len(outs) if self.combine == "mean" else total), new


def gate(norms: nn.ModuleList, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Titans' non-linear gate ``y ⊗ M``: ``N_1(y) ⊙ σ(N_2(m))`` with learned RMS norms."""
    return norms[0](y) * torch.sigmoid(norms[1](m))


def _reads_self(block: nn.Module) -> bool:
    return any(getattr(m, "reads_self", False) for m in block.modules())


class MemoryContext(nn.Module):
    """Titans memory as a context (``kind: memory_context``, MAC): see
    :class:`~nlgraph.spec.schema.MemoryContextSpec` for the rule.

    ``forward(x [B, T, C], state) -> (o [B, T, C], state)``. Per segment: ``h = M_{s−1}(q(x))``
    (read at the segment-start state), attention over ``[h_1, x_1, h_2, x_2, …]`` (persistent tokens
    in front, reset at every segment), ``y`` = its outputs at the x positions, the memory trained on
    ``y`` and read after each write (``m``), ``o = N_1(y) ⊙ σ(N_2(m))``. The state carries the memory,
    its segment-start copy, the attention cache of the current segment and the position, so a
    sequence fed in pieces gives the output of one pass.
    """

    def __init__(self, spec: MemoryContextSpec, levels: dict[str, Any], width: int, forms: Forms) -> None:
        super().__init__()
        from .memory import MemoryLevel

        self.segment = spec.segment
        self.memory = _keyed(MemoryLevel(levels[spec.memory], width, _planned(forms, spec.memory)), spec.memory)
        # the host position's phase within the segments and the memory's schedule (NLModel.phases)
        self.cycle = math.lcm(self.segment, self.memory.cycle)
        self.phase: int | None = None
        self.attention = Attention(levels[spec.attention], width)
        self.norms = nn.ModuleList([RMSNorm(width, eps=1e-6), RMSNorm(width, eps=1e-6)])

    def forward(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        state = dict(state or {})
        # a fresh sequence starts at 0 without reading a tensor (keeps compiled graphs static), and
        # a continued one at the phase the model gives, when it knows the position on the host
        known = self.phase is not None and "position" in state
        pos = self.phase if known else (int(state["position"]) if "position" in state else 0)
        t0 = pos
        memory, start = state.get("memory"), state.get("start")
        attn, read = state.get("attention"), state.get("read")
        outs = []
        t, done = x.shape[1], 0
        while done < t:
            offset = pos % self.segment
            if offset == 0:  # a new segment: the memory as it is now answers the whole segment
                start, attn = memory, None
            n = min(self.segment - offset, t - done)
            piece = x[:, done:done + n]
            h, read_state = self.memory.read(piece, {**(start or {}), **(read or {})})
            read = {k: v for k, v in read_state.items() if k == "conv.read"}
            both = torch.stack([h, piece], dim=2).flatten(1, 2)  # [h_1, x_1, h_2, x_2, ...]
            a, attn = self.attention(both, attn)
            y = a[:, 1::2]
            # pos is a host int here: the memory continues at its phase, never reading its tensor
            self.memory.phase = pos % self.memory.cycle
            m, memory = self.memory(y, memory)
            outs.append(gate(self.norms, y, m))
            done, pos = done + n, pos + n
        # the position stays on the host, like a level's: on a GPU, torch.tensor(pos, device=...)
        # is a pageable host-to-device copy (refused inside CUDA-graph capture) and the int()
        # above would then wait for the device when the next segment continues
        self.memory.phase = None
        position = state["position"] + (pos - t0) if known else torch.tensor(pos, dtype=torch.int64)
        new = {"memory": memory, "start": start, "attention": attn, "read": read, "position": position}
        return torch.cat(outs, dim=1), new


def _planned(forms: Forms, key: str) -> str:
    """The plan's execution form of the level ``key`` (the model builds no level the plan did not
    decide: forms are chosen in one place, :func:`nlgraph.lower.plan`)."""
    if key not in forms:
        raise KeyError(f"the plan has no execution form for level '{key}' (planned: {', '.join(forms) or 'none'}); "
                       f"build the model from the plan of this spec")
    return forms[key]


def _keyed(module: nn.Module, key: str) -> nn.Module:
    """Record the level key a runtime level was planned under, so a new plan can reach it."""
    module.plan_key = key
    return module


def make_entry(entry: Any, model: ModelSpec, width: int, levels: dict[str, Any] | None = None,
               forms: Forms | None = None, key: str = "") -> nn.Module:
    """The module for one block entry of the spec (``levels``: the spec's levels, which groups
    such as ``parallel`` and ``memory_context`` refer to by name; ``forms``: the plan's execution
    form of each runtime level by level key, :meth:`nlgraph.lower.Plan.executions`; ``key``: this
    entry's level key, its name in ``levels`` or ``<chain>.levels[j]``)."""
    forms = forms or {}
    if isinstance(entry, AttentionSpec):
        return AttentionEntry(entry, width)
    if isinstance(entry, ChainSpec):
        return Chain(entry, model, width, forms, key)
    if isinstance(entry, ParallelSpec):
        return Parallel(entry, levels or {}, model, width, forms)
    if isinstance(entry, MemoryContextSpec):
        return MemoryContext(entry, levels or {}, width, forms)
    if isinstance(entry, (LinearAttentionSpec, DeltaRuleSpec)):
        from .memory import ClosedFormLevel

        return _keyed(ClosedFormLevel(entry, width, _planned(forms, key)), key)
    if entry.objective.kind == "outer":
        from .cms import InContextMlp, is_in_context

        # a finite period run in context; `never` and `updates: outer_loop` are static in the forward
        return InContextMlp(entry, width) if is_in_context(entry) else StaticMlp(entry, width)
    from .memory import MemoryLevel

    return _keyed(MemoryLevel(entry, width, _planned(forms, key)), key)


class Block(nn.Module):
    """One block of the spec: its entries applied in order, each in a residual connection.
    ``forms``: the plan's execution forms by level key (:meth:`nlgraph.lower.Plan.executions`)."""

    def __init__(self, names: list[str], spec: Spec, forms: Forms) -> None:
        super().__init__()
        width = spec.model.d_model
        self.names = list(names)
        entries = {}
        for n in names:
            entry, module = spec.levels[n], make_entry(spec.levels[n], spec.model, width, spec.levels, forms, n)
            # a residual chain wraps each link itself; anything else gets one residual here
            own = isinstance(entry, ChainSpec) and entry.residual
            entries[n] = module if own else Residual(module, spec.model, width)
        self.entries = nn.ModuleDict(entries)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        state = state or {}
        new: State = {}
        outputs: dict[str, torch.Tensor] = {}  # each entry's own output, for `from: <level>`
        for name in self.names:
            entry = self.entries[name]
            if isinstance(entry, Residual):
                h, new[name], outputs[name] = entry(x, state.get(name), outputs, True)
            else:  # a residual chain: its output is what it added to the stream
                h, new[name] = entry(x, state.get(name))
                outputs[name] = h - x
            x = h
        return x, new


#: Inductor options that let its FX-graph and AOT-autograd caches keep nlgraph's compiled graphs.
#: torch bypasses a cache for a graph that calls a function it does not know to be safe, and two
#: kinds of call are in nlgraph's graphs:
#:
#: - torch's ``scan`` and ``while_loop`` (the chunk loops of the mini-batch and online drivers), for
#:   which both caches were bypassed: every new process recompiled those graphs; Titans (d_model 64,
#:   one layer, CPU) took 46 s from a warm cache instead of 10 s;
#: - the enter / exit calls of ``torch.func.jvp``'s forward-mode level (DGD's ``inner_errors:
#:   gain``, :func:`nlgraph.levels.memories.gain_scales`), for which AOT autograd's cache was
#:   bypassed (inductor's own then hit): every process traced HOPE's blocks again;
#:   ``hope_large_chunk`` (d_model 64, one layer, T=512, CPU) took 21.9 s from a warm cache instead
#:   of 7.8 s (docs/benchmarks.md).
#:
#: Marking is safe here because the cache key pickles the whole graph module, the loop bodies' and
#: the forward-mode calls' code included (the forward-mode calls take no argument but the level
#: number, which is in the graph): changing only the memory's activation inside a loop body, or
#: the differentiated function, was a cache miss, and the result equalled an uncached compile's
#: (docs/benchmarks.md, "Compile time"; tests/test_compile_cache.py). Keyed by the torch version, as
#: torch asks. :func:`compile_options` adds the key of :func:`materialize_efficient_zeros`.
CACHEABLE_FUNCTIONS: dict[str, Any] = {"unsafe_marked_cacheable_functions": {
    name: torch.__version__ for name in (
        "torch.ops.higher_order.scan", "torch.ops.higher_order.while_loop",
        "torch._functorch.predispatch._jvp_increment_nesting",
        "torch._functorch.predispatch._jvp_decrement_nesting",
        "torch._functorch.predispatch._enter_dual_level",
        "torch._functorch.predispatch._exit_dual_level")}}

#: Not a mark (an operator is cacheable anyway) but a key: the entry :func:`compile_options` adds
#: to the marks, with whether :func:`materialize_efficient_zeros` is in force. AOT autograd's cache
#: key does not cover inductor's decomposition table, so without it a graph compiled without the
#: registration (its zero tensors a fallback, the failing backward) was taken from the cache for one
#: with it.
EFFICIENT_ZEROS_KEY = "torch.ops.aten._efficientzerotensor"


def materialize_efficient_zeros() -> bool:
    """Have inductor trace torch's efficient zero tensors as ordinary zeros (once per process);
    whether that is in force.

    Forward-mode differentiation (``torch.func.jvp``, DGD's ``inner_errors: gain``) gives a
    non-differentiated operand of a product the tangent ``aten._efficientzerotensor``, a zero tensor
    without storage. Inductor runs that operator as a fallback and then reuses its output buffer
    for a later kernel's output, which a zero tensor refuses: compiled ``hope_large_chunk`` at
    T=64 (d_model 64, one layer, CPU) failed in its backward with "ZeroTensors are immutable"
    (``extern_kernels.bmm(..., out=buf)``), a buffer-size coincidence that other shapes may meet on
    any device. Registered in inductor's decomposition table, the operator traces as an
    ``aten.zeros`` (a zero fill inductor fuses or allocates like any buffer). The values are the
    same for finite operands (a zero tensor skips its products, so ``0 · inf`` would give 0 where
    zeros give NaN; the tangents here are finite). Process-wide, since inductor keeps one table
    (registered after inductor's import, it still applies: AOT autograd's trace decomposes the
    operator before inductor's fallback for it is reached); other compiled code in the process
    gets the same treatment."""
    from torch._inductor import decomposition

    op = torch.ops.aten._efficientzerotensor.default
    table = getattr(decomposition, "decompositions", None)
    if not isinstance(table, dict):  # another torch layout: leave it as it is
        return False
    if op in table:
        return True

    def zeros(size, *, dtype=None, layout=None, device=None, pin_memory=None):
        return torch.zeros(size, dtype=dtype, layout=layout, device=device, pin_memory=pin_memory)

    table[op] = zeros
    cached = getattr(decomposition, "fast_random_decomps", None)  # a cached copy of the table
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()
    return True


#: Inductor's option for a module on an accelerator: its graphs' CPU tensors (a level's position,
#: kept on the host so that reading it never waits for the device) run as ATen calls instead of
#: C++ kernels. A C++ kernel, even one adding two integers, makes every process that loads the graph
#: check the CPU's vector instructions (child processes that import torch, on torch 2.11) and build
#: C++ headers: on an H200, Gated DeltaNet's first step from a warm cache took 36.8 s with the
#: C++ kernel and 1.9 s without (docs/benchmarks.md, "Compile time").
HOST_OPS_AS_ATEN = {"disable_cpp_codegen": True}


def compile_options(device: torch.device | str | None = None, **options: Any) -> dict[str, Any]:
    """The ``torch.compile`` arguments nlgraph compiles its modules with: ``fullgraph=True``,
    ``dynamic=False`` and ``options``. With inductor (the default backend) it calls
    :func:`materialize_efficient_zeros` and, without a ``mode``, passes the marks of
    :data:`CACHEABLE_FUNCTIONS` (merged with any the caller passes) with
    :data:`EFFICIENT_ZEROS_KEY` saying whether the registration is in force, and for a ``device``
    other than the CPU, :data:`HOST_OPS_AS_ATEN` (an option the caller gives wins; left out under
    inductor's ``cpp_wrapper``, which needs C++ code generation). torch takes a ``mode`` or
    ``options``, not both, so with a ``mode`` none of these options is passed."""
    opts = {"fullgraph": True, "dynamic": False, **options}
    if opts.get("backend", "inductor") == "inductor":
        zeros = "materialized" if materialize_efficient_zeros() else "fallback"
        if "mode" not in opts:
            given = dict(opts.get("options", {}))
            marks = {**CACHEABLE_FUNCTIONS["unsafe_marked_cacheable_functions"],
                     **given.pop("unsafe_marked_cacheable_functions", {}), EFFICIENT_ZEROS_KEY: zeros}
            from torch._inductor import config as inductor_config

            accelerator = device is not None and torch.device(device).type != "cpu"
            cpp_wrapper = given.get("cpp_wrapper", inductor_config.cpp_wrapper)
            host = HOST_OPS_AS_ATEN if accelerator and not cpp_wrapper else {}
            opts["options"] = {**host, **given, "unsafe_marked_cacheable_functions": marks}
    return opts


class _Recompute(torch.autograd.Function):
    """``fn(*args)`` run without a graph, and again with one in the backward (activation
    checkpointing in the manner of torch's reentrant checkpoint, which keeps no saved-tensor hooks
    active: levels that take inner gradients with ``torch.func`` refuse those). The parameters are
    explicit inputs and the backward returns their gradients, so ``torch.autograd.grad`` through it
    (an in-context level's commit) gets them instead of their ``.grad`` filling."""

    @staticmethod
    def forward(ctx, fn, box, spec_in, n_in, context, *inputs):
        from torch.utils._pytree import tree_flatten, tree_unflatten

        flat = list(inputs[:n_in])
        ctx.fn, ctx.spec_in, ctx.n_in, ctx.context = fn, spec_in, n_in, context
        ctx.tensor_at = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.others = {i: a for i, a in enumerate(inputs) if not isinstance(a, torch.Tensor)}
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_at))
        dev = next((a.device for a in flat if isinstance(a, torch.Tensor)), torch.device("cpu"))
        ctx.autocast = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        ctx.dev = dev
        with torch.no_grad():
            out = fn(*tree_unflatten(flat, spec_in))
        flat_out, box["spec"] = tree_flatten(out)
        ctx.spec_out = box["spec"]
        ctx.out_float = [isinstance(o, torch.Tensor) and o.is_floating_point() for o in flat_out]
        ctx.mark_non_differentiable(*(o for o, f in zip(flat_out, ctx.out_float)
                                      if isinstance(o, torch.Tensor) and not f))
        return tuple(flat_out)

    @staticmethod
    @once_differentiable  # a second derivative through it would see the recomputation's constants
    def backward(ctx, *grads):
        from torch.utils._pytree import tree_flatten, tree_unflatten

        saved = dict(zip(ctx.tensor_at, ctx.saved_tensors))
        n_all = len(ctx.tensor_at) + len(ctx.others)
        wants = ctx.needs_input_grad[5:]
        inputs = []
        for i in range(n_all):
            if i in ctx.others:
                inputs.append(ctx.others[i])
            elif i < ctx.n_in:  # an activation or a state tensor: a new leaf of the recomputation
                inputs.append(saved[i].detach().requires_grad_(wants[i]))
            else:  # a parameter: the module reads it itself
                inputs.append(saved[i])
        devices = [ctx.dev] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(ctx.dev.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]), ctx.context():
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.dev)
            out = ctx.fn(*tree_unflatten(inputs[:ctx.n_in], ctx.spec_in))
        flat_out, spec_out = tree_flatten(out)
        if spec_out != ctx.spec_out:
            from .errors import NLGraphError

            raise NLGraphError(f"recomputing {type(ctx.fn).__name__} in the backward gave outputs of another structure "
                               "than its forward without gradients; train without --recompute-blocks",
                               path="recompute_blocks")
        pairs = [(o, g) for o, g, f in zip(flat_out, grads, ctx.out_float)
                 if f and g is not None and o.requires_grad]
        targets = [i for i in range(n_all) if wants[i] and isinstance(inputs[i], torch.Tensor)]
        got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in targets], [g for _, g in pairs],
                                  allow_unused=True) if pairs and targets else [None] * len(targets)
        out_grads: list = [None] * n_all
        for i, g in zip(targets, got):
            out_grads[i] = g
        return (None, None, None, None, None, *out_grads)


def recompute_call(fn: Any, args: tuple, params: list[torch.Tensor], context: Any = nullcontext) -> Any:
    """``fn(*args)`` (any nesting of tensors in ``args`` and the result), its intermediates dropped
    and recomputed in the backward under ``context()`` (entered again there), with the RNG and
    autocast state of the forward. ``params``: the tensors ``fn`` reads besides ``args`` that need
    gradients (a module's parameters)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat, spec_in = tree_flatten(args)
    box: dict = {}
    out = _Recompute.apply(fn, box, spec_in, len(flat), context, *flat, *params)
    return tree_unflatten(list(out), box["spec"])


class NLModel(nn.Module):
    """A language model lowered from a spec.

    Every level the runtime runs is built with the execution form the plan chose for it
    (:attr:`nlgraph.lower.LevelPlan.execution`): ``plan`` when given (it must be the plan of
    ``spec``, e.g. from :func:`nlgraph.lower.plan` with ``forms=``), else ``plan(spec)`` for CPU.

    Attributes:
        spec: the validated spec it was built from.
        plan: the :class:`~nlgraph.lower.Plan` it was built from.
        blocks: ``repeat × len(spec.model.blocks)`` :class:`Block` modules, in order.
    """

    def __init__(self, spec: Spec, plan: Any = None) -> None:
        super().__init__()
        if plan is None:
            from .lower import plan as make_plan

            plan = make_plan(spec)
        elif plan.spec != spec:
            raise ValueError("NLModel(spec, plan): the plan is of another spec; pass plan.spec")
        self.spec = spec
        self.plan = plan
        forms = plan.executions()
        m = spec.model
        self.embed = nn.Embedding(m.vocab, m.d_model)
        self.blocks = nn.ModuleList(Block(names, spec, forms) for _ in range(m.repeat) for names in m.blocks)
        self.norm = make_norm(m.norm, m.d_model) if m.final_norm else nn.Identity()
        self.head = nn.Linear(m.d_model, m.vocab, bias=False)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, 0.0, 0.02)

        self._compiled: list[nn.Module] | None = None
        from .cms import find_carried, find_slots

        # in-context levels (CMS with a finite period): the model commits their updates
        self._slots = find_slots(self)
        # `lifetime: persistent` levels of the runtime: their state carries into the next sequence
        self._carried = find_carried(self)
        from .memory import MemoryLevel

        # levels whose schedule (periods, gradient-point chunks) depends on the position
        self._phased = [m for m in self.modules()
                        if isinstance(m, (MemoryLevel, MemoryContext)) and m.cycle > 1]
        self._persistent: dict[str, dict] = {}
        self.learn = True
        self.recompute_blocks = False

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .double() move the parameters: choose the forms again for where they
        # are now, so a model planned on the CPU runs the GPU forms once moved there (and back)
        out = super()._apply(fn, recurse)
        self._follow_parameters()
        return out

    def _follow_parameters(self) -> None:
        """Re-plan for the parameters' device type and dtype when they differ from the plan's
        target; the forms ``forms=`` forced are kept where they can run there."""
        p = next(self.parameters(), None)
        if p is None or "plan" not in self.__dict__:
            return
        if (p.device.type, p.dtype) == (self.plan.device, self.plan.dtype or p.dtype):
            return
        from .lower import PlanError
        from .lower import plan as make_plan

        try:
            new = make_plan(self.spec, device=p.device, dtype=p.dtype, forms=dict(self.plan.forced))
        except PlanError:  # a forced form that cannot run there: its fallback runs (run_level);
            # the forced forms stay recorded, so moving back restores them
            new = dataclasses.replace(make_plan(self.spec, device=p.device, dtype=p.dtype),
                                      forced=self.plan.forced)
        forms = new.executions()
        for module in self.modules():
            key = getattr(module, "plan_key", None)
            if key is not None:
                module.form = forms[key]
        self.plan = new

    def compile_blocks(self, **options: Any) -> NLModel:
        """Compile every block with ``torch.compile(fullgraph=True, dynamic=False, **options)``.

        The compiled wrappers are kept outside the module tree, so ``state_dict`` keys, checkpoints
        and :meth:`eager` use the plain blocks. With inductor (the default backend, no ``mode``),
        graphs holding the chunk loops' ``scan`` / ``while_loop`` or DGD's forward-mode products go
        to inductor's and AOT autograd's caches (:data:`CACHEABLE_FUNCTIONS`), so a later process
        compiles them from the cache; see :func:`compile_options`.
        """
        param = next(self.parameters(), None)
        opts = compile_options(param.device if param is not None else None, **options)
        # a block with a level reading its own output (`from: self`) stays eager: it calls its
        # level once per token or chunk, continuing the level's state, which reads the position
        # (a graph of data-dependent sizes), and the unrolled loop would grow with the length.
        # A block holding a level whose form the plan runs eagerly (a form measured slower
        # compiled, `compiles=False`) is compiled around it: without fullgraph, the level between graphs
        eager = {lv.level for lv in self.plan.levels if not lv.compiles}
        split = dict(opts, fullgraph=False)

        def compiled(b: nn.Module) -> nn.Module:
            if _reads_self(b):
                return b
            runs_eager = any(getattr(m, "plan_key", None) in eager for m in b.modules())
            return torch.compile(b, **(split if runs_eager else opts))

        self._compiled = [compiled(b) for b in self.blocks]
        return self

    def recompute(self, on: bool = True) -> NLModel:
        """Recompute blocks: keep only each block's inputs for the backward and run the block again
        there (activation checkpointing, in the manner of ``torch.utils.checkpoint``'s reentrant
        form): a training step's activation memory falls from every block's intermediates to one
        block's, for about one more forward of compute (more with in-context levels: each commit
        differentiates its period's blocks, which runs them again). Gradients are unchanged;
        compiled blocks are recomputed by their compiled code. Only calls with gradients enabled
        are affected.

        Raises:
            NLGraphError: an in-context level differentiates through its commits
                (``meta_gradient: second_order``), which a recomputation cannot carry."""
        if on:
            second = [s.key for s in self._slots if s.module.second_order]
            if second:
                from .errors import NLGraphError

                raise NLGraphError(f"level {second[0]} learns with meta_gradient: second_order, which "
                                   "differentiates through the recomputed blocks' inner steps; train it without "
                                   "recomputing the blocks (drop --recompute-blocks)", path="recompute_blocks")
        self.recompute_blocks = bool(on)
        return self

    def run_block(self, block: nn.Module, x: torch.Tensor, state: State | None,
                  position: int | None) -> tuple[torch.Tensor, State]:
        """``block(x, state)``, recomputed in the backward when :meth:`recompute` is on. The
        recomputation runs after the forward's :meth:`phases` has ended, so it enters the phases of
        ``position`` (the host position the forward ran at) again."""
        if not (self.recompute_blocks and torch.is_grad_enabled()):
            return block(x, state)
        return recompute_call(block, (x, state), list(block.parameters()), lambda: self.phases(position))

    @property
    def compiled(self) -> bool:
        """Whether :meth:`stream` runs the compiled blocks."""
        return self._compiled is not None

    def eager(self) -> NLModel:
        """Drop the compiled blocks: run the plain modules again."""
        self._compiled = None
        return self

    def forward(self, tokens: torch.Tensor, *, learn: bool | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` of ``tokens [B, T]`` from a fresh state (``learn``: see
        :meth:`stream`)."""
        return self.stream(tokens, learn=learn)[0]

    @property
    def in_context(self) -> bool:
        """Whether some level commits updates while the model reads (a CMS with a finite period)."""
        return bool(self._slots)

    def stream(self, tokens: torch.Tensor, state: State | None = None, *,
               learn: bool | None = None) -> tuple[torch.Tensor, State]:
        """Continue from ``state`` (``None``: a fresh sequence): ``(logits [B, T, vocab], state)``.

        Feeding a sequence in segments, passing each returned state to the next call, gives the
        logits of one pass over the whole sequence. In-context levels (``objective: outer`` with a
        finite period) commit their updates as the tokens arrive (:mod:`nlgraph.cms`);
        ``learn=False`` (default: ``self.learn``) freezes them at their committed parameters.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T] token ids, got shape {tuple(tokens.shape)}")
        if self._slots:
            from .cms import stream_in_context

            return stream_in_context(self, tokens, state, self.learn if learn is None else learn)
        blocks = (state or {}).get("blocks") or [None] * len(self.blocks)
        if self._carried and state is None:
            from .cms import start_carried

            blocks = start_carried(self, blocks, tokens.shape[0])
        # the sequence position on the host (a state from before it was kept has none: then the
        # levels read their own)
        pos = 0 if state is None else state.get("position")
        x = self.embed(tokens)
        new = []
        with self.phases(pos):
            for block, st in zip(self._compiled or self.blocks, blocks):
                x, st = self.run_block(block, x, st, pos)
                new.append(st)
        if self._carried:
            from .cms import keep_carried

            keep_carried(self, new)
        out: State = {"blocks": new}
        if pos is not None:
            out["position"] = pos + tokens.shape[1]
        return self.head(self.norm(x)), out

    @contextmanager
    def phases(self, position: int | None):
        """While a call runs from host ``position`` (``None``: not known), every scheduled runtime
        level gets its phase (``position mod`` its cycle) instead of reading its state's position
        tensor: a host read that ``torch.compile`` sees as data-dependent. A compiled block then
        depends on the phases only, which stay fixed when calls start on the schedule's boundaries
        (HOPE's 16-token segments), so it is not recompiled per call."""
        before = [m.phase for m in self._phased]  # a recomputation may run inside another call's
        for m in self._phased:
            m.phase = None if position is None else position % m.cycle
        try:
            yield
        finally:
            for m, phase in zip(self._phased, before):
                m.phase = phase

    def save_memory(self, path: Any) -> Any:
        """Write the persistent memory (the committed parameters and optimizer buffers of every
        ``lifetime: persistent`` level, per batch row) to a safetensors file, atomically."""
        from .cms import save_memory

        return save_memory(self, path)

    def load_memory(self, path: Any) -> None:
        """Load a file written by :meth:`save_memory` (raises ``MemoryStateError``, one line)."""
        from .cms import load_memory

        load_memory(self, path)

    def reset_memory(self) -> None:
        """Forget the persistent memory: the next sequence starts from the initial parameters."""
        self._persistent = {}
