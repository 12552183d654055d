"""A parametric level inside a model: the outer parameters around the level runtime.

The outer loop owns the projections that produce keys, values and queries, the gate projections,
the meta-learned initial states ``M_0`` of the memory and its adaptive projections, the output norm,
gate and projection. The inner loop — the memory's in-context updates — is
:func:`nlgraph.runtime.run_level`, whose state this module carries between segments.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Gate, MatmulInputs, RMSNorm, ShortConv, Stream
from .levels.memories import build_memory
from .spec.schema import (
    DeltaRuleSpec,
    GateSpec,
    LevelSpec,
    LinearAttentionSpec,
    LinearMemorySpec,
    MlpMemorySpec,
)

__all__ = ["ClosedFormLevel", "MemoryLevel", "level_widths", "self_read_chunk"]


#: gates projecting the same tensor share one matmul (:meth:`_Entry._gates`); False builds entries
#: with a matmul a gate, as before 2026-12-07 (``benchmarks/profile_layer.py --separate-gates`` times both)
FUSE_GATES = True


def level_widths(spec: LevelSpec, width: int) -> tuple[int, int, int]:
    """``(heads, d_key, d_value)`` per head of a level fed a ``width``-wide input (as the graph's
    dimension checks infer them)."""
    mem = spec.memory
    heads = mem.heads
    if isinstance(mem, LinearMemorySpec):
        dk, dv = mem.d_key or width // heads, mem.d_value or width // heads
    elif isinstance(mem, MlpMemorySpec):
        dk = mem.d_in or width // heads
        dv = mem.d_out or dk
    else:
        dk = dv = width // heads
    return heads, dk, dv


class _AdaptiveInput(nn.Module):
    """The input of an adaptive projection: the level input (optionally projected and convolved),
    split into heads. Feature map and norm are applied by the runtime to the memory's read."""

    def __init__(self, spec, width: int, heads: int, d: int) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.proj = nn.Linear(width, heads * d, bias=False) if spec.project else None
        self.conv = ShortConv(heads * d, spec.conv) if spec.conv > 1 else None

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = self.proj(x) if self.proj is not None else x
        new = None
        if self.conv is not None:
            y, new = self.conv(y, state)
        return y.unflatten(-1, (self.heads, self.d)), new


def self_read_chunk(spec: Any) -> int | None:
    """The chunk a level that reads its own output (``from: self``) can run whole: its gradient-point
    chunk (or period) when it reads at the chunk start (``read: chunk_start``) and its queries read
    neither its own output nor an adaptive projection; ``None`` when it runs token by token."""
    from .levels.run import periods

    if not isinstance(spec, LevelSpec) or spec.read != "chunk_start" or spec.frequency == "never" \
            or spec.queries.from_ == "self" or spec.queries.from_.startswith("adaptive."):
        return None
    chunk = periods(spec)[1]
    return chunk if chunk > 1 else None


class _Entry(nn.Module):
    """The outer parameters every memory-like entry shares: stream projections (with their short
    convolutions), gate projections, and the read's norm, gate and output projection."""

    heads: int
    d_key: int
    d_value: int

    def _build_inputs(self, spec: Any, width: int, rates: dict[str, Any]) -> None:
        heads, dk, dv = self.heads, self.d_key, self.d_value
        # role or gate name -> the level whose output (same token, same block) it reads
        self.reads: dict[str, str] = {}
        for role in ("keys", "values", "queries"):
            s = getattr(spec, role)
            if s.from_ != "input" and not s.from_.startswith("adaptive."):
                self.reads[role] = s.from_
        d_role = {"keys": dk, "values": dv, "queries": dk}
        # ModuleDict keys k / v / q: `keys` and `values` are ModuleDict methods
        self.streams = nn.ModuleDict()
        for role in ("keys", "values", "queries"):
            s = getattr(spec, role)
            mod = _AdaptiveInput(s, width, heads, d_role[role]) if s.from_.startswith("adaptive.") else (
                Stream(s, width, heads, d_role[role]))
            self.streams[role[0]] = mod
        self.gates = nn.ModuleDict()
        for name, rate in rates.items():
            if isinstance(rate, GateSpec) and not rate.from_.startswith("adaptive."):
                if rate.from_ != "input":
                    self.reads[name] = rate.from_
                self.gates[name] = Gate(rate, width, heads, dk)
        # gates projecting the same tensor share one matmul (their weights stacked at each call):
        # Gated DeltaNet's two per-head gates were two launches of a [B·T, C] × [C, H] product,
        # each reading all of x for H outputs (8 µs each on an H200 at B=8, T=2048, C=512)
        by_source: dict[str, list[str]] = {}
        for name in self.gates:
            by_source.setdefault(self.reads.get(name, "") if FUSE_GATES else name, []).append(name)
        self.gate_groups = tuple(tuple(names) for names in by_source.values())

    def _build_output(self, spec: Any, width: int) -> None:
        dv = self.d_value
        self.out_norm = RMSNorm(dv, eps=1e-6) if spec.output.norm == "rms" else (
            nn.LayerNorm(dv, eps=1e-6) if spec.output.norm == "layer" else None)
        self.out_gate = nn.Linear(width, self.heads * dv, bias=False) if spec.output.gate != "none" else None
        self.out = nn.Linear(self.heads * dv, width, bias=False)

    def _inputs(self, x: torch.Tensor, state: dict, sources: dict | None,
                cast: MatmulInputs | None = None) -> tuple[dict, dict, dict]:
        """``(streams {role: [B, T, H, D]}, gates {name: [B, T, H]}, conv tails)``; a stream or
        gate that reads another level takes that level's output from ``sources`` instead of ``x``.
        ``cast``: the call's :class:`MatmulInputs`, which the projections read their input through."""
        cast = cast or MatmulInputs()
        src = lambda name: sources[self.reads[name]] if name in self.reads else x  # noqa: E731
        conv_state: dict[str, torch.Tensor] = {}
        tensors = {}
        for role in ("keys", "values", "queries"):
            stream = self.streams[role[0]]
            inp = src(role)
            tensors[role], cs = stream(cast(inp) if stream.proj is not None else inp, state.get(f"conv.{role}"))
            if cs is not None:
                conv_state[f"conv.{role}"] = cs
        return tensors, self._gates(lambda name: cast(src(name))), conv_state

    def _gates(self, src) -> dict[str, torch.Tensor]:
        """Every gate's value, ``{name: [B, T, H] | [B, T, H, D] | [B, T, 1]}``, those reading one
        tensor (``src(name)``) projected together."""
        out = {}
        for names in self.gate_groups:
            x = src(names[0])
            if len(names) == 1:
                out[names[0]] = self.gates[names[0]](x)
                continue
            projs = [self.gates[n].proj for n in names]
            pre = F.linear(x, torch.cat([p.weight for p in projs]), torch.cat([p.bias for p in projs]))
            for n, part in zip(names, pre.split([p.out_features for p in projs], dim=-1)):
                out[n] = self.gates[n].activate(part)
        return out

    @property
    def reads_self(self) -> bool:
        """A stream or gate reads the entry's own previous output (``from: self``)."""
        return "self" in self.reads.values()

    def _run(self, x: torch.Tensor, state: dict, sources: dict | None, step) -> tuple[torch.Tensor, dict]:
        """Streams and gates, the level's run and the output, over ``x [B, T, C]``.

        ``step(tensors, gates, level_state) -> (y [B, T, H, D_v], level_state)`` runs the level's
        form. A level that reads its own output (``from: self``: the stream or gate of token t
        reads this entry's output at token t − 1, zero before a fresh sequence's first token) runs
        token by token. The previous output is carried in the state (``self.prev``, ``[B, 1, C]``), so
        a sequence fed in pieces gives the outputs of one pass."""
        if not self.reads_self:
            cast = MatmulInputs()
            tensors, gates, conv_state = self._inputs(x, state, sources, cast)
            y, level_state = step(tensors, gates, state.get("level"))
            return self._output(x, y, cast), {"level": level_state, **conv_state}
        prev = state.get("self.prev")
        if prev is None:
            prev = x.new_zeros(x.shape[0], 1, x.shape[-1])
        carry = {k: v for k, v in state.items() if k.startswith("conv.")}
        level_state = state.get("level")
        outs = []
        segments = self._self_segments(level_state, x.shape[1])
        if segments is None:
            # token by token: each token runs the level's own form on one token, a continued
            # sequence, exact by the runtime's contract (segments give the outputs of one pass)
            segments = [(t, t + 1) for t in range(x.shape[1])]
        for s, e in segments:
            xs = x[:, s:e]
            src = {n: v[:, s:e] for n, v in (sources or {}).items()}
            if e - s == 1:
                src["self"] = prev
            else:
                # the outputs of the whole segment are known before it runs: its reads are taken
                # at the segment-start state (read: chunk_start), so token t's source o_{t−1} is
                # the previous output for the first token and this read for the others
                o = self._read_at_start(xs, carry, level_state, src)
                src["self"] = torch.cat([prev, o[:, :-1]], dim=1)
            cast = MatmulInputs()
            tensors, gates, conv_state = self._inputs(xs, carry, src, cast)
            carry.update(conv_state)
            y, level_state = step(tensors, gates, level_state)
            out = self._output(xs, y, cast)
            prev = out[:, -1:]
            outs.append(out)
        if not outs:  # an empty sequence: nothing read, nothing carried forward
            tensors, gates, conv_state = self._inputs(x, state, {**(sources or {}), "self": x})
            y, level_state = step(tensors, gates, level_state)
            return self._output(x, y), {**state, "level": level_state}
        return torch.cat(outs, dim=1), {"level": level_state, **carry, "self.prev": prev}

    def _self_segments(self, level_state: dict | None, length: int) -> list[tuple[int, int]] | None:
        """Segments a level reading its own output can run whole, or ``None`` (token by token)."""
        return None

    def _output(self, x: torch.Tensor, y: torch.Tensor, cast: MatmulInputs | None = None) -> torch.Tensor:
        """The read ``y [B, T, H, D_v]`` normalised, gated by the input ``x`` and projected back to
        ``[B, T, C]`` (``cast``: the call's :class:`MatmulInputs`, shared with the streams')."""
        if self.out_norm is not None:
            y = self.out_norm(y)
        if self.out_gate is not None:
            g = self.out_gate((cast or MatmulInputs())(x)).unflatten(-1, (self.heads, self.d_value))
            y = y * (torch.sigmoid(g) if self.spec.output.gate == "sigmoid" else F.silu(g))
        return self.out(y.flatten(2))


class MemoryLevel(_Entry):
    """A level of the spec as a block entry: ``forward(x [B, T, C], state) -> (y [B, T, C], state)``.

    ``state`` holds the runtime's state (memory parameters, pending sums, optimizer buffers,
    position) and the short-convolution tails, so a sequence continued in segments gives the output
    of one pass. A fresh state starts every memory at its meta-learned initial parameters.

    ``form`` is the execution form :func:`~nlgraph.runtime.run_level` runs the level with, as the
    plan chose it (:attr:`nlgraph.lower.LevelPlan.execution`); the level never chooses its own.
    """

    def __init__(self, spec: LevelSpec, width: int, form: str) -> None:
        super().__init__()
        self.spec = spec
        heads, dk, dv = level_widths(spec, width)
        self.heads, self.d_key, self.d_value = heads, dk, dv
        self.form = form
        from .levels.run import cycle

        # the schedule's cycle, and the phase of the next call's position within it when the
        # caller knows the position on the host (NLModel sets it; see run_level's `phase`)
        self.cycle = cycle(spec)
        self.phase: int | None = None
        if getattr(spec.optimizer, "inner_errors", "raw") == "gain":
            # DGD's gain runs torch.func.jvp, whose first call loads torch's decompositions with a
            # warning; done here, at construction, a compiled block never traces it
            from .levels.memories import _quiet_jvp_setup

            _quiet_jvp_setup()
        self._build_inputs(spec, width, self._rates())
        # meta-learned initial states M_0 of the memory and of every adaptive projection
        self.init_params = nn.ParameterDict()
        slots = {"memory": (spec.memory, dk, dv), **{f"adaptive.{n}": (m, dk, dk) for n, m in spec.adaptive.items()}}
        gen = torch.Generator().manual_seed(0)
        for slot, (mspec, din, dout) in slots.items():
            mem = build_memory(mspec, din, dout)
            learned = mspec.init == "learned"
            if isinstance(mspec, LinearMemorySpec):
                init = {p: torch.zeros(heads, *shape) for p, shape in mem.shapes().items()}
            else:
                init = mem.init(heads, zeros=mspec.init == "zeros", generator=gen)
            for p, t in init.items():
                key = f"{slot}.{p}".replace(".", "__")
                self.init_params[key] = nn.Parameter(t, requires_grad=learned)
        self._build_output(spec, width)

    def _rates(self) -> dict[str, Any]:
        opt = self.spec.optimizer
        rates = {"lr": getattr(opt, "lr", None)}
        if opt.kind in ("momentum", "dgd"):
            rates["momentum"] = opt.momentum
        if self.spec.retention is not None:
            rates["retention"] = self.spec.retention.gate
        return rates

    def _self_segments(self, level_state: dict | None, length: int) -> list[tuple[int, int]] | None:
        """With ``read: chunk_start`` the reads of a whole gradient-point chunk (or period) are taken
        at one state, the anchor or the committed parameters at the chunk's start, so a level whose
        keys, values or gates read its own output can run chunk by chunk (its queries must not read
        it, nor an adaptive projection). ``None`` otherwise."""
        from .levels.run import periods, schedule

        if self_read_chunk(self.spec) is None:
            return None
        start = int(level_state["position"]) if level_state is not None and "position" in level_state else 0
        return schedule(start, length, periods(self.spec)[1])

    def _read_at_start(self, x: torch.Tensor, carry: dict, level_state: dict | None, src: dict) -> torch.Tensor:
        """``out(M_L(q))`` over a segment ``x [B, n, C]``: the entry's output with the memory read at
        the segment-start state ``L`` (the anchor when the level keeps one, else the committed
        parameters), which is what ``read: chunk_start`` gives every token of the segment."""
        name = self.reads.get("queries")
        q, _ = self.streams["q"](src[name] if name else x, carry.get("conv.queries"))
        return self._read_memory(x, q, level_state, "anchor.")

    def _read_memory(self, x: torch.Tensor, q: torch.Tensor, level: dict | None, prefer: str = "") -> torch.Tensor:
        """``out(M(q))`` for queries ``q [B, T, H, D_k]``, the memory's parameters taken from the
        level state (``prefer``: a state prefix such as ``anchor.`` used where present; ``None``:
        the initial ``M_0``)."""
        if level is None:
            level = self.initial_state(x.shape[0])
        mem = build_memory(self.spec.memory, self.d_key, self.d_value)
        params = {p: level.get(f"{prefer}memory.{p}", level[f"memory.{p}"]) for p in mem.shapes()}
        y = mem.forward(params, q.transpose(1, 2)).transpose(1, 2)  # [B, T, H, Dv]
        return self._output(x, y)

    def initial_state(self, batch: int) -> dict[str, torch.Tensor]:
        """The memory parameters every sequence starts from, expanded over the batch."""
        return {k.replace("__", "."): p.unsqueeze(0).expand(batch, *p.shape) for k, p in self.init_params.items()}

    def read(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Read the memory without writing: ``h = out(M(q(x)))`` with the committed parameters of
        ``state`` (``None``: the initial ``M_0``). ``x [B, T, C] -> (h [B, T, C], state)``; only
        the query stream's convolution tail (``conv.read``) advances.

        Titans MAC retrieves its context tokens this way (Eq. 21)."""
        if self.reads.get("queries") == "self":
            raise ValueError("a memory read without a write needs queries that do not read the level's own output")
        state = dict(state or {})
        q, tail = self.streams["q"](x, state.get("conv.read"))
        if tail is not None:
            state["conv.read"] = tail
        return self._read_memory(x, q, state.get("level")), state

    def forward(self, x: torch.Tensor, state: dict | None = None,
                sources: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """``sources``: outputs ``[B, T, C]`` of earlier levels of the block, by name, for the
        streams and gates that read them."""
        from .runtime import run_level

        def step(tensors: dict, gates: dict, level_state: dict | None):
            if level_state is None:
                level_state = self.initial_state(x.shape[0])
            # a level reading its own output continues its state within this call: its later
            # steps are at other phases, so it reads the position (such blocks stay eager)
            phase = None if self.reads_self else self.phase
            return run_level(self.spec, keys=tensors["keys"], values=tensors["values"],
                             queries=tensors["queries"], lr=gates.get("lr"), retention=gates.get("retention"),
                             momentum=gates.get("momentum"), state=level_state, form=self.form, phase=phase)

        return self._run(x, state or {}, sources, step)


class ClosedFormLevel(_Entry):
    """A ``linear_attention`` or ``delta_rule`` entry: the same outer parameters as a level
    (streams, gates, output), with the update rule run by its own execution forms
    (:mod:`nlgraph.compilers.linear_attention`, :mod:`nlgraph.compilers.delta_rule`).

    ``forward(x [B, T, C], state) -> (y [B, T, C], state)``; the state is the ``[B, H, D_v, D_k]``
    matrix (plus the normaliser), its position and the convolution tails. ``form``: the plan's
    execution form, as for :class:`MemoryLevel`.
    """

    def __init__(self, spec: LinearAttentionSpec | DeltaRuleSpec, width: int, form: str) -> None:
        super().__init__()
        self.spec = spec
        self.heads = spec.heads
        self.d_key = spec.d_key or width // spec.heads
        self.d_value = spec.d_value or width // spec.heads
        self.form = form
        rates = {"beta": spec.beta, "decay": spec.decay} if isinstance(spec, DeltaRuleSpec) else {}
        self._build_inputs(spec, width, rates)
        self._build_output(spec, width)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                sources: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """``sources``: outputs ``[B, T, C]`` of earlier levels of the block, by name, for the
        streams and gates that read them."""
        from .runtime import run_level

        def step(tensors: dict, gates: dict, level_state: dict | None):
            return run_level(self.spec, keys=tensors["keys"], values=tensors["values"],
                             queries=tensors["queries"], lr=gates.get("beta"), retention=gates.get("decay"),
                             state=level_state, form=self.form)

        return self._run(x, state or {}, sources, step)
