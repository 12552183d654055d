"""Stages 3–5 of the pipeline: passes over the checked level graph, the execution plan, and lowering
to a (optionally ``torch.compile``d) :class:`~nlgraph.model.NLModel`.

    load_spec → build_graph → plan (infer shapes, recognise families, choose forms) → NLModel
    → torch.compile per block (fullgraph)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .families import recognise
from .graph import GROUP_KINDS, _sources, build_graph, format_period, level_order
from .model import NLModel
from .limits import check_model_size
from .spec.loader import current_options, load_spec
from .spec.schema import Spec

__all__ = ["LevelPlan", "Plan", "build", "plan"]


@dataclass(frozen=True)
class LevelPlan:
    """How one graph node is executed: its family, execution form and shapes."""

    node: str
    family: str
    form: str
    frequency: str
    shapes: str


@dataclass(frozen=True)
class Plan:
    """The execution plan of a spec: one :class:`LevelPlan` per level node, in data-flow order."""

    spec: Spec
    levels: tuple[LevelPlan, ...]
    hash: str

    def render(self, model: NLModel | None = None) -> str:
        """A table of the plan; with ``model``, parameter counts per node and in total."""
        params = _params_by_node(model) if model is not None else {}
        header = ["node", "family", "form", "frequency", "shapes"] + (["params"] if model else [])
        rows = []
        for lv in self.levels:
            row = [lv.node, lv.family, lv.form, lv.frequency, lv.shapes]
            if model is not None:
                row.append(f"{params.get(lv.node, 0):,}")
            rows.append(row)
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
        if model is not None:
            total = sum(p.numel() for p in model.parameters())
            out.append(f"parameters: {total:,} in all (per block instance above; embedding "
                       f"{model.embed.weight.numel():,}, x{self.spec.model.repeat} repeat)")
        return "\n".join(out)


def _params_by_node(model: NLModel) -> dict[str, int]:
    """Parameters of each entry of the first block instance, keyed like graph nodes."""
    out: dict[str, int] = {}
    for b, names in enumerate(model.spec.model.blocks):
        block = model.blocks[b]
        for name in names:
            mod = block.entries[name]
            out[f"b{b}.{name}"] = sum(p.numel() for p in mod.parameters())
            inner = getattr(mod, "inner", mod)
            members = getattr(inner, "links", None)
            if members is None and hasattr(inner, "branches"):
                members = list(inner.branches.values())
            if members is None and hasattr(inner, "segment"):
                members = [inner.memory, inner.attention]
            for j, member in enumerate(members or []):
                out[f"b{b}.{name}[{j}]"] = sum(p.numel() for p in member.parameters())
    return out


def _form_of(node: dict, device: str | None = None) -> str:
    form = _entry_form(node, device)
    if node["kind"] in ("level", "linear_attention", "delta_rule") and any(
            src == "self" for _, src in _sources(node["spec"])):
        from .memory import self_read_chunk

        chunk = self_read_chunk(node["spec"])
        if chunk is not None:
            return f"{form}, {chunk} tokens at a time (reads its own previous output)"
        return f"{form}, token by token (reads its own previous output)"
    return form


def _entry_form(node: dict, device: str | None = None) -> str:
    kind = node["kind"]
    if kind == "attention":
        return "sdpa (sliding window)" if node["spec"].window else "sdpa"
    if kind in GROUP_KINDS:
        return kind
    spec = node["spec"]
    if kind == "level" and spec.objective.kind == "outer":
        if spec.frequency == "never":
            return "static mlp"
        if spec.objective.updates == "outer_loop":
            return f"static mlp; the outer optimizer steps it every {spec.frequency} training tokens"
        order = ", second-order meta-gradient" if spec.objective.meta_gradient == "second_order" else ""
        life = ", persistent" if spec.lifetime == "persistent" else ""
        return (f"in context: commits every {spec.frequency} tokens "
                f"({spec.optimizer.kind}, {spec.objective.reduce}{order}{life})")
    if kind in ("adaptive", "optimizer"):
        return "with its level"
    if kind in ("linear_attention", "delta_rule"):
        from .runtime import level_form

        return level_form(node["spec"], device=device)
    if device is not None:
        from .runtime import level_form

        return level_form(spec, device=device)  # choose_form's choice, labelled for the device
    from .memory import choose_form

    return choose_form(spec)


def plan(spec: Any, overrides: tuple[str, ...] | list[str] = (), device: str | None = None) -> Plan:
    """Check the spec's graph and decide how every level node runs. With ``device``, forms that
    hand their work to a Triton kernel on it say so (``chunked (triton)``)."""
    spec = load_spec(spec, overrides)
    graph = build_graph(spec)
    levels = []
    for nid in level_order(graph):
        node = graph.nodes[nid]
        if node["kind"] in ("embed", "head"):
            continue
        entry = node.get("spec")
        entry_kinds = ("level", "attention", "linear_attention", "delta_rule", *GROUP_KINDS)
        family = recognise(entry) if node["kind"] in entry_kinds else node["kind"]
        if node["kind"] == "attention":
            shapes = f"{node['heads']} heads x {node['d_head']}"
            freq = "every token (in context)"
        elif node["kind"] in ("level", "linear_attention", "delta_rule"):
            shapes = f"{node['heads']} heads, {node['d_in']} -> {node['d_out']}"
            freq = format_period(node["frequency"])
        else:
            shapes = ""
            freq = format_period(node.get("frequency")) if node["kind"] not in GROUP_KINDS else ""
        levels.append(LevelPlan(nid, family, _form_of(node, device), freq, shapes))
    return Plan(spec, tuple(levels), graph.graph["hash"])


def build(
    spec: Any,
    *,
    compile: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    overrides: tuple[str, ...] | list[str] = (),
) -> NLModel:
    """Lower a spec to a model.

    Args:
        spec: a :class:`Spec`, a spec file, a library name, YAML text or a mapping.
        compile: compile every block with ``torch.compile(fullgraph=True)``; the uncompiled blocks
            stay in ``model.blocks`` (checkpoints and state dicts are unaffected).
        device, dtype: where and in which dtype to create the parameters.
        overrides: ``key=value`` strings applied to the spec first.

    Raises:
        ResourceError: the model would exceed ``Limits.max_params`` or the memory of ``device``
            (raise them with :func:`nlgraph.spec.loader.load_options`).

    Returns:
        :class:`~nlgraph.model.NLModel` with ``model(tokens [B, T]) -> logits [B, T, vocab]`` and
        ``model.stream(tokens, state) -> (logits, state)``.
    """
    spec = load_spec(spec, overrides)
    build_graph(spec)  # every graph check runs before any module is built
    # refuse a model too large for its device before allocating it (docs/security.md)
    check_model_size(spec, device=device, dtype_bytes=(dtype or torch.get_default_dtype()).itemsize,
                     limits=current_options().limits)
    model = NLModel(spec)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    if compile:
        model.compile_blocks()
    return model
