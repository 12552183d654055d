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

from .errors import GraphError
from .layers import Gate, ShortConv, Stream
from .levels.memories import build_memory
from .spec.schema import GateSpec, LevelSpec, LinearMemorySpec, MlpMemorySpec

__all__ = ["MemoryLevel", "choose_form", "level_widths"]


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


def choose_form(spec: LevelSpec) -> str:
    """The execution form the model runs a level with: the parallel ``chunked`` form when the
    runtime has one for this level, else the per-token ``reference`` form."""
    from .runtime import level_form

    return level_form(spec, "auto")


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


class MemoryLevel(nn.Module):
    """A level of the spec as a block entry: ``forward(x [B, T, C], state) -> (y [B, T, C], state)``.

    ``state`` holds the runtime's state (memory parameters, pending sums, optimizer buffers,
    position) and the short-convolution tails, so a sequence continued in segments gives the output
    of one pass. A fresh state starts every memory at its meta-learned initial parameters.
    """

    def __init__(self, spec: LevelSpec, width: int) -> None:
        super().__init__()
        self.spec = spec
        heads, dk, dv = level_widths(spec, width)
        self.heads, self.d_key, self.d_value = heads, dk, dv
        self.form = choose_form(spec)
        for role in ("keys", "values", "queries"):
            s = getattr(spec, role)
            if s.from_ not in ("input",) and not s.from_.startswith("adaptive."):
                raise GraphError(
                    f"the compiler cannot lower {role} from '{s.from_}' yet; read from input or an "
                    f"adaptive projection",
                    path=f"{role}.from",
                )
        d_role = {"keys": dk, "values": dv, "queries": dk}
        # ModuleDict keys k / v / q: `keys` and `values` are ModuleDict methods
        self.streams = nn.ModuleDict()
        for role in ("keys", "values", "queries"):
            s = getattr(spec, role)
            mod = _AdaptiveInput(s, width, heads, d_role[role]) if s.from_.startswith("adaptive.") else (
                Stream(s, width, heads, d_role[role]))
            self.streams[role[0]] = mod
        self.gates = nn.ModuleDict()
        for name, rate in self._rates().items():
            if isinstance(rate, GateSpec) and not rate.from_.startswith("adaptive."):
                if rate.from_ != "input":
                    raise GraphError(
                        f"the compiler cannot lower a {name} gate from '{rate.from_}' yet; read it "
                        f"from input or an adaptive projection",
                        path=name,
                    )
                self.gates[name] = Gate(rate, width, heads, dk)
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
        self.out_norm = nn.RMSNorm(dv, eps=1e-6) if spec.output.norm == "rms" else (
            nn.LayerNorm(dv, eps=1e-6) if spec.output.norm == "layer" else None)
        self.out_gate = nn.Linear(width, heads * dv, bias=False) if spec.output.gate != "none" else None
        self.out = nn.Linear(heads * dv, width, bias=False)

    def _rates(self) -> dict[str, Any]:
        opt = self.spec.optimizer
        rates = {"lr": getattr(opt, "lr", None)}
        if opt.kind in ("momentum", "dgd"):
            rates["momentum"] = opt.momentum
        if self.spec.retention is not None:
            rates["retention"] = self.spec.retention.gate
        return rates

    def initial_state(self, batch: int) -> dict[str, torch.Tensor]:
        """The memory parameters every sequence starts from, expanded over the batch."""
        return {k.replace("__", "."): p.unsqueeze(0).expand(batch, *p.shape) for k, p in self.init_params.items()}

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        from .runtime import run_level

        b = x.shape[0]
        state = state or {}
        conv_state: dict[str, torch.Tensor] = {}
        tensors = {}
        for role in ("keys", "values", "queries"):
            tensors[role], cs = self.streams[role[0]](x, state.get(f"conv.{role}"))
            if cs is not None:
                conv_state[f"conv.{role}"] = cs
        gates = {name: g(x) for name, g in self.gates.items()}
        level_state = state.get("level")
        if level_state is None:
            level_state = self.initial_state(b)
        y, level_state = run_level(
            self.spec,
            keys=tensors["keys"],
            values=tensors["values"],
            queries=tensors["queries"],
            lr=gates.get("lr"),
            retention=gates.get("retention"),
            momentum=gates.get("momentum"),
            state=level_state,
            form=self.form,
        )  # y: [B, T, H, Dv]
        if self.out_norm is not None:
            y = self.out_norm(y)
        if self.out_gate is not None:
            g = self.out_gate(x).unflatten(-1, (self.heads, self.d_value))
            y = y * (torch.sigmoid(g) if self.spec.output.gate == "sigmoid" else F.silu(g))
        return self.out(y.flatten(2)), {"level": level_state, **conv_state}
