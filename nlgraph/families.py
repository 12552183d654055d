"""Recognise known architecture families in level specs ("this level is Gated DeltaNet").

The rules are the derivations of nested-learning-math.md §2 read backwards: a linear memory with
the dot objective and GD is linear attention, with the L2 objective it is the delta rule, a decay
in front makes it gated, and so on. Anything else is reported by its parts.
"""

from __future__ import annotations

from typing import Any

from .spec.schema import (
    AttentionSpec,
    ChainSpec,
    DeltaRuleSpec,
    GateSpec,
    LevelSpec,
    LinearAttentionSpec,
    MemoryContextSpec,
    ParallelSpec,
)

__all__ = ["describe_level", "recognise"]


def _const(rate: Any, value: float | None = None) -> bool:
    if isinstance(rate, GateSpec):
        return False
    return value is None or rate == value


def recognise(entry: Any) -> str:
    """The family name of a level entry, or ``"custom"`` when no known family matches."""
    if isinstance(entry, AttentionSpec):
        return "sliding-window attention" if entry.window else "softmax attention"
    if isinstance(entry, ChainSpec):
        if all(lv.objective.kind == "outer" for lv in entry.levels):
            periods = {lv.frequency for lv in entry.levels}
            return "MLP chain" if periods == {"never"} else "CMS"
        return "chain"
    if isinstance(entry, ParallelSpec):
        return f"parallel ({entry.combine})"
    if isinstance(entry, MemoryContextSpec):
        return "Titans MAC (memory as context)"
    if isinstance(entry, LinearAttentionSpec):
        return "linear attention (normalised)" if entry.normalize else "linear attention"
    if isinstance(entry, DeltaRuleSpec):
        return "DeltaNet" if entry.decay is None else "Gated DeltaNet"
    lv: LevelSpec = entry
    mem, obj, opt, ret = lv.memory.kind, lv.objective.kind, lv.optimizer.kind, lv.retention
    if obj == "outer":
        return "MLP" if lv.frequency == "never" else "CMS level"
    if lv.adaptive and lv.values.self_target:
        return "self-modifying Titans" if opt == "dgd" else "self-modifying memory"
    if mem == "linear" and lv.frequency == 1 and lv.gradient_point == "token":
        if opt == "gd":
            if obj == "dot":
                if ret is None:
                    return "linear attention" if _const(lv.optimizer.lr, 1.0) else "linear attention (scaled)"
                gate = ret.gate
                if isinstance(gate, GateSpec):
                    return "GLA" if gate.per == "channel" else "Mamba2-style decay"
                return "RetNet"
            if obj == "l2":
                if ret is None:
                    return "DeltaNet"
                if ret.kind != "decay":
                    return "Titans-form gated delta rule"
                per_channel = isinstance(ret.gate, GateSpec) and ret.gate.per == "channel"
                return "Kimi Delta Attention" if per_channel else "Gated DeltaNet"
        if opt == "dgd" and obj == "l2":
            return "gated DGD memory" if ret is not None else "DGD memory"
    shallow = mem == "linear" or (mem == "residual_mlp" and lv.memory.depth == 1)
    if shallow and obj == "l2" and opt == "gd" and lv.gradient_point != "token":
        return "TTT-linear"
    if mem in ("mlp", "residual_mlp") and obj == "l2":
        if opt == "momentum":
            return "Titans (LMM)"
        if opt == "gd" and lv.gradient_point != "token":
            return "TTT-MLP"
        if opt == "muon":
            return "Atlas-style memory"
    return "custom"


def describe_level(entry: Any) -> dict[str, str]:
    """Short strings for the ``show`` table: memory, objective, optimizer, retention."""
    if isinstance(entry, AttentionSpec):
        window = f", window {entry.window}" if entry.window else ""
        return {"memory": f"non-parametric ({entry.heads} heads{window})", "objective": "nadaraya-watson",
                "optimizer": "-", "retention": "-"}
    if isinstance(entry, ParallelSpec):
        return {"memory": f"parallel: {', '.join(entry.branches)}", "objective": "-", "optimizer": "-",
                "retention": "-"}
    if isinstance(entry, MemoryContextSpec):
        return {"memory": f"{entry.memory} + {entry.attention}, segment {entry.segment}", "objective": "-",
                "optimizer": "-", "retention": "-"}
    if isinstance(entry, ChainSpec):
        return {"memory": f"chain of {len(entry.levels)}", "objective": "-", "optimizer": "-",
                "retention": "-"}
    if isinstance(entry, (LinearAttentionSpec, DeltaRuleSpec)):
        heads = f" x{entry.heads}" if entry.heads > 1 else ""
        delta = isinstance(entry, DeltaRuleSpec)
        return {"memory": f"linear{heads} (closed form)", "objective": "l2" if delta else "dot",
                "optimizer": "gd (β)" if delta else "gd (lr 1)",
                "retention": "decay" if delta and entry.decay is not None else "-"}
    mem = entry.memory
    memory = mem.kind + (f" x{mem.heads}" if mem.heads > 1 else "")
    if mem.kind != "linear":
        memory += f" (depth {mem.depth}, hidden {mem.hidden})"
    obj = entry.objective
    objective = obj.kind + (f"(p={obj.p:g})" if obj.kind == "lp" else "")
    opt = entry.optimizer
    optimizer = opt.kind
    if opt.kind == "dgd":
        optimizer += f" {opt.form}" + (" + momentum" if opt.momentum is not None else "")
    if opt.kind == "deep_momentum":
        optimizer += f" [{opt.level.memory.kind} momentum]"
    retention = entry.retention.kind if entry.retention else "-"
    if entry.adaptive:
        memory += f" + adaptive {','.join(entry.adaptive)}"
    return {"memory": memory, "objective": objective, "optimizer": optimizer, "retention": retention}
